"""``mlmega train CONFIG``: one rank's training entry (run by srun, torchrun or the local launcher)."""

from __future__ import annotations

import argparse


def register(sub) -> None:
    train = sub.add_parser("train", help="train one stage (every rank of the job runs this)",
                           description="Train one V-cycle stage on megatron-core. Ranks come from "
                                       "RANK/WORLD_SIZE/MASTER_ADDR/MASTER_PORT or SLURM's "
                                       "variables; use --nproc to start local ranks.")
    train.add_argument("config", help="stage config (YAML)")
    train.add_argument("--nproc", type=int, default=0,
                       help="start this many local ranks (gloo on CPU) instead of being one")
    train.set_defaults(handler=_train)


def _train(args: argparse.Namespace) -> int:
    if args.nproc:
        from mlmega.launch.local import run_ranks_locally

        return run_ranks_locally(["train", args.config], args.nproc)
    from mlmega.models import lazy_compile

    lazy_compile.install()  # before megatron-core is imported
    from mlmega.train.loop import main

    return main(args.config)
