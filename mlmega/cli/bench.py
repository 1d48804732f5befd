"""``mlmega bench savings``: the V-cycle against its baseline (the code lives in benchmarks/savings.py)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

SAVINGS = Path(__file__).resolve().parents[2] / "benchmarks" / "savings.py"


def _savings():
    """benchmarks/ ships with the checkout, not the wheel, so it is loaded by path."""
    spec = importlib.util.spec_from_file_location("mlmega_bench_savings", SAVINGS)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def register(sub) -> None:
    bench = sub.add_parser("bench", help="benchmarks that compare the V-cycle with its baseline")
    kinds = bench.add_subparsers(dest="bench", metavar="BENCH", required=True)
    savings = kinds.add_parser("savings", help="FLOPs and wall-clock to reach the baseline's loss")
    if not SAVINGS.is_file():  # an installed wheel without the checkout's benchmarks/
        savings.set_defaults(handler=lambda args: print(f"mlmega: error: {SAVINGS} is missing: "
                                                       "bench needs a source checkout") or 2)
        return
    module = _savings()
    module.add_arguments(savings)
    savings.set_defaults(handler=module.run)
