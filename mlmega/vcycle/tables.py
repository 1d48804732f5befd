"""Tables for the terminal: the plan and a run's status (rich)."""

from __future__ import annotations

from pathlib import Path

from rich.console import Console
from rich.table import Table

from mlmega.progress import console as wide_console, format_seconds
from mlmega.vcycle.plan import Plan, Stage


def _si(value: float) -> str:
    for unit, scale in (("E", 1e18), ("P", 1e15), ("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(value) >= scale:
            return f"{value / scale:.3g}{unit}"
    return f"{value:.3g}"


def print_plan(plan: Plan, console: Console | None = None) -> None:
    console = console or wide_console()
    sizing = plan.recipe.sizing
    gpu = plan.recipe.cluster.gpus_per_node > 0
    table = Table(title=f"V-cycle plan: {plan.recipe.name} ({plan.recipe.num_levels} levels)")
    for col in ("stage", "level", "L / hidden / heads", "params", "steps", "tokens", "FLOPs",
                "nodes x ranks", "TP/PP/DP", "micro/global", "GB/GPU", "GPU-h"):
        table.add_column(col, justify="left" if col == "stage" else "right")

    def row(stage: Stage, style: str = "") -> None:
        r, m = stage.resources, stage.model
        table.add_row(stage.name, str(stage.level),
                      f"{m.num_layers} / {m.hidden_size} / {m.num_attention_heads}",
                      _si(stage.parameters), str(stage.steps), _si(stage.tokens),
                      _si(stage.flops), f"{r.nodes} x {r.tasks_per_node}",
                      f"{r.tp}/{r.pp}/{r.dp}", f"{r.micro_batch_size}/{r.global_batch_size}",
                      f"{r.memory_gb:.1f}" if gpu else "-",
                      f"{stage.gpu_hours(sizing.gpu_peak_tflops, sizing.mfu):.1f}" if gpu else "-",
                      style=style)

    for stage in plan.stages:
        row(stage)
    total_h = sum(s.gpu_hours(sizing.gpu_peak_tflops, sizing.mfu) for s in plan.stages)
    table.add_section()
    table.add_row("V-cycle total", "", "", "", str(sum(s.steps for s in plan.stages)),
                  _si(sum(s.tokens for s in plan.stages)), _si(plan.flops), "", "", "", "",
                  f"{total_h:.1f}" if gpu else "-", style="bold")
    row(plan.baseline, style="dim")
    console.print(table)
    console.print(f"predicted FLOPs saving vs the baseline: [bold]{plan.flops_saving_pct:.1f}%"
                  f"[/bold] ({_si(plan.flops)} vs {_si(plan.baseline.flops)} model FLOPs)")


def print_status(state, plan: Plan, console: Console | None = None) -> None:
    from mlmega.vcycle.report import read_metrics
    from mlmega.vcycle.run import stage_dir

    console = console or wide_console()
    table = Table(title=f"run {state.run_dir} ({state.executor})")
    for col in ("stage", "status", "job", "step", "loss", "val loss", "wall"):
        table.add_column(col)
    for stage in plan.stages:
        entry = state.stage(stage.name)
        records = read_metrics(stage_dir(Path(state.run_dir), stage.name))
        train = [r for r in records if "loss" in r]
        val = [r for r in records if "val_loss" in r]
        wall = entry.wall_s  # every attempt: resumed jobs and requeued runs
        table.add_row(stage.name, entry.status, entry.job_id or "-",
                      f"{train[-1]['step'] if train else 0}/{stage.steps}",
                      f"{train[-1]['loss']:.4f}" if train else "-",
                      f"{val[-1]['val_loss']:.4f}" if val else "-",
                      "-" if wall is None else format_seconds(wall))
    console.print(table)
