#!/usr/bin/env python
"""The V-cycle against its baseline on the embedded corpus: FLOPs and wall-clock saving.

    python benchmarks/savings.py [--quick] [--all] [--sweep] --out DIR
    (the same as: mlmega bench savings [CONFIG] [--quick] [--all] [--sweep] --out DIR)

Default: the GPT 2-level comparison (baseline + V-cycle). --all adds GPT 3-level and BERT (MLM)
2- and 3-level; --sweep adds alpha / E_a / small-level-LR variants of the GPT 2-level V-cycle.
--quick shrinks every run to a smoke test (a minute; savings are not meaningful there).
Writes DIR/report.json, DIR/report.md and DIR/savings.png; prints the table.
"""

from mlmega.bench.savings import main

if __name__ == "__main__":
    raise SystemExit(main())
