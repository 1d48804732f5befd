#!/usr/bin/env python
"""The V-cycle against a tuned baseline, over seeds: compute-equivalent FLOPs and wall-clock saving.

    python benchmarks/savings.py [--quick] [--all] [--seeds N] --out DIR
    (the same as: mlmega bench savings [CONFIG] [--quick] [--all] [--seeds N] --out DIR)

Default: the GPT 2-level comparison; --all adds GPT 3-level and BERT 2- and 3-level. Each: baseline
LR sweep, the tuned baseline at 50-100% budgets (the frontier), as many V-cycle tuning trials, the
best pair over N seeds (default 3). --quick runs the whole protocol at toy scale (minutes; the
savings mean nothing there). Every run is cached in DIR/runs and reused when finished, so an
interrupted protocol continues where it stopped. Writes DIR/report.json, DIR/report.md and
DIR/savings.png (see mlmega.bench.savings for the protocol).
"""

from mlmega.bench.savings import main

if __name__ == "__main__":
    raise SystemExit(main())
