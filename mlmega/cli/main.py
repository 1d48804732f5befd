"""The ``mlmega`` command line: one sub-command per user task, each a thin layer over the package.

Each concern registers its own sub-commands (``register(subparsers)`` in its ``cli`` module); this
file only assembles them and turns bad input (:class:`ConfigError`, :class:`CheckpointError`) into a
one-line message and exit code 2.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from typing import Optional, Sequence

from mlmega.config.errors import InputError

# pytest workers at most: each holds torch and megatron-core (~1 GiB) beside its tests' ranks
TEST_WORKERS = 4

# Modules that contribute sub-commands, in the order they appear in --help.
COMMAND_MODULES: list[str] = ["mlmega.cli.vcycle", "mlmega.cli.data", "mlmega.cli.train",
                               "mlmega.cli.checkpoint", "mlmega.cli.bench"]


def _cmd_test(args: argparse.Namespace) -> int:
    """Run the test suite (what CI runs) on one pytest-xdist worker per core, at most
    ``TEST_WORKERS``, unless the extra arguments (which go to pytest) choose the workers."""
    import os
    import subprocess

    chosen = any(a.startswith(("-n", "--numprocesses", "--dist")) or a == "no:xdist"
                 for a in args.extra)
    workers = [] if chosen else ["-n", str(min(TEST_WORKERS, len(os.sched_getaffinity(0))))]
    code = subprocess.call([sys.executable, "-m", "pytest", *workers, *args.extra])
    if code == 5:
        print("mlmega test: pytest collected no tests", file=sys.stderr)
    return code


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mlmega",
        description="Multi-level (V-cycle) training of Megatron GPT/BERT models on SLURM.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for module in COMMAND_MODULES:
        importlib.import_module(module).register(sub)
    test = sub.add_parser("test", help="run the test suite (any further arguments go to pytest)")
    test.set_defaults(handler=_cmd_test, takes_extra=True)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra and not getattr(args, "takes_extra", False):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    args.extra = extra
    try:
        return args.handler(args)
    except InputError as err:  # a config or a checkpoint: one line, exit code 2
        print(f"mlmega: error: {err}", file=sys.stderr)
        return 2
