"""The savings protocol's report, written small: report.json, report.md and savings.png."""

from __future__ import annotations

import json
from pathlib import Path


def write_report(report: dict, out: Path) -> list[Path]:
    """Write the report's three files into ``out``; returns their paths."""
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / "report.json", out / "report.md", out / "savings.png"]
    paths[0].write_text(json.dumps(report, indent=1) + "\n")
    paths[1].write_text(markdown(report))
    plot(report, paths[2])
    return paths


def _pct(value, bound: str = "=") -> str:
    if value is None:
        return "not reached"
    return f"{'' if bound == '=' else bound + ' '}{value:.1f}%"


def _num(value) -> str:
    return "-" if value is None else f"{value:.3g}"


def _bound(summary: dict) -> str:
    return {">=": ">= ", "<=": "<= "}.get(summary.get("bound", "="), "")


def markdown(report: dict) -> str:
    scale = f", scale {report['scale']}"
    lines = [f"# V-cycle vs tuned baseline ({report['date']}{scale})",
             "", f"`{report['command']}`", "",
             f"Budgets of the tuned baseline: {', '.join(f'{b:g}' for b in report['budgets'])} of "
             f"its steps, each with its own schedule; seeds {report['seeds']}. Compute-equivalent "
             "saving = 1 - C_vcycle / C_base(L_vcycle), C_base(L) the least cost at which any "
             "budget's run reached L, at its end or at an evaluation on the way ('>=': the "
             "V-cycle ends below every loss they reached, so at least this).", ""]
    lines += ["| comparison | compute-equivalent FLOPs saving: mean (min, max) | holds | "
              "wall-clock saving: mean (min, max) | holds | FLOPs saving at the 100% baseline's "
              "final loss: mean (min, max) |", "|---|---|---|---|---|---|"]
    for c in report["comparisons"]:
        h = c["headline"]
        cells = [f"{_bound(k)}{k['mean']:.1f}% ({k['min']:.1f}, {k['max']:.1f}) | "
                 f"{'yes' if k['holds'] else 'no'}" for k in (h["compute"], h["wallclock"])]
        at = h.get("at_baseline_loss")
        cells.append("not reached" if not at else f"{at['mean']:.1f}% ({at['min']:.1f}, "
                     f"{at['max']:.1f}), {at['seeds']} of {len(c['seeds'])} seeds")
        lines.append(f"| {c['name']} | {' | '.join(cells)} |")
    for c in report["comparisons"]:
        lines += ["", f"## {c['name']}", ""]
        machines = c.get("machines", [])
        if len(machines) > 1:
            lines += [f"Its runs were timed on {len(machines)} machines ({'; '.join(machines)}): "
                      "its wall-clock savings compare seconds of different CPUs; the FLOPs "
                      "savings do not depend on it.", ""]
        elif machines:
            lines += [f"Timed on one machine: {machines[0]}.", ""]
        lines += ["Baseline sweep (LRs, then warm-ups at the best LR; "
                  "full budget, first seed):", "",
                  "| peak LR | warm-up steps | final val loss | FLOPs | seconds |",
                  "|---|---|---|---|---|"]
        lines += [f"| {r['lr']:.3g}{' (best)' if r['best'] else ''}"
                  f"{' (refined)' if r['refined'] else ''}"
                  f"{' (second pass)' if r.get('second_pass') else ''} | {r['warmup']} | "
                  f"{r['final_loss']:.4f} | {r['flops']:.3g} | {r['seconds']:.0f} |"
                  for r in c["baseline_sweep"]]
        lines += ["", "V-cycle trials (as many as the baseline's sweep had runs, in rounds of "
                  "two, each turning one knob of the best before its round; first seed). Copies' "
                  "spread: how far the final model's width copies moved apart "
                  "(benchmarks/spread.py; 0: the small level's function; the 100% baseline, "
                  "trained from scratch: "
                  f"{_num(c.get('baseline_copies_spread'))}).", "",
                  "| trial | changes | final val loss | FLOPs | compute-equivalent saving | "
                  "copies' spread |", "|---|---|---|---|---|---|"]
        lines += [f"| {r['trial']}{' (best)' if r['best'] else ''} | {r['changes'] or '-'} | "
                  f"{r['vcycle_final_loss']:.4f} | {r['vcycle_flops']:.3g} | "
                  f"{_pct(r['compute_saving_pct'], r['compute_saving_bound'])} | "
                  f"{_num(r.get('copies_spread'))} |" for r in c["vcycle_trials"]]
        lines += ["", "Headline pair per seed (baseline frontier final losses at each budget):", "",
                  "| seed | frontier losses | V-cycle loss | FLOPs saving | wall-clock saving | "
                  "FLOPs to reach the 100% baseline's loss | saving there | copies' spread |",
                  "|---|---|---|---|---|---|---|---|"]
        for r in c["seeds"]:
            losses = ", ".join(f"{p['final_loss']:.3f}" for p in r["frontier"])
            lines.append(f"| {r['seed']} | {losses} | {r['vcycle_final_loss']:.4f} | "
                         f"{_pct(r['compute_saving_pct'], r['compute_saving_bound'])} | "
                         f"{_pct(r['wallclock_saving_pct'], r['wallclock_saving_bound'])} | "
                         f"{_num(r['flops_to_reach_baseline'])} | "
                         f"{_pct(r['flops_saving_at_baseline_loss_pct'])} | "
                         f"{_num(r.get('copies_spread'))} |")
    return "\n".join(lines + ["", "![validation loss vs model FLOPs](savings.png)", ""])


def plot(report: dict, out: Path) -> Path:
    """Per comparison (first seed): the tuned baseline's curve and budget frontier, the best
    V-cycle's curve; validation loss against model FLOPs."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    comparisons = report["comparisons"]
    fig, axes = plt.subplots(1, len(comparisons), figsize=(6 * len(comparisons), 4.5),
                             squeeze=False)
    for ax, c in zip(axes[0], comparisons):
        curves = c["curves"]
        ax.plot(curves["baseline"]["flops"], curves["baseline"]["loss"], color="grey", lw=1,
                label="tuned baseline (100%)")
        fx, fy = zip(*curves["frontier"])
        ax.plot(fx, fy, "ks", label="baseline budgets: final losses")
        ex, ey = zip(*c["seeds"][0]["frontier_flops"])
        ax.plot(ex, ey, "k-", lw=1.8, label="C_base: least FLOPs to each loss")
        ax.plot(curves["vcycle"]["flops"], curves["vcycle"]["loss"], marker=".", lw=1.4,
                label=f"V-cycle ({c['best_trial']})")
        ax.set_title(f"{c['name']}: FLOPs saving {_bound(c['headline']['compute'])}"
                     f"{c['headline']['compute']['mean']:.1f}% "
                     f"(mean of {len(c['seeds'])} seeds)", fontsize=10)
        ax.set_xlabel("cumulative model FLOPs")
        ax.set_ylabel("validation loss")
        ax.set_ylim(top=min(max(fy) + 1.0, max(curves["vcycle"]["loss"])))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
