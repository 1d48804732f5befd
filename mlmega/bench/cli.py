"""``mlmega bench savings``: the V-cycle against its baseline (see mlmega.bench.savings)."""

from __future__ import annotations


def register(sub) -> None:
    bench = sub.add_parser("bench", help="benchmarks that compare the V-cycle with its baseline")
    kinds = bench.add_subparsers(dest="bench", metavar="BENCH", required=True)
    savings = kinds.add_parser("savings", help="FLOPs and wall-clock to reach the baseline's loss")
    from mlmega.bench.savings import add_arguments, run

    add_arguments(savings)
    savings.set_defaults(handler=run)
