"""``mlmega plan | run | status | cancel | resume``: the V-cycle from a login node."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from mlmega.config.errors import ConfigError

DEFAULT_RECIPE = "configs/tiny-gpt.yaml"


RECIPE_HELP = ("a V-cycle recipe (YAML): the model, its levels (coalescing schemes), the "
               "schedule, data, training, cluster and sizing sections; see configs/ "
               f"(default: {DEFAULT_RECIPE})")
SET_HELP = ("override one recipe value, KEY a dotted path into the recipe and VALUE parsed as "
            "YAML (repeatable), e.g. --set schedule.alpha=0.5 --set cluster.partition=gpu "
            "--set schedule.lr=[1e-3,3e-3]")


def _recipe_arguments(parser) -> None:
    parser.add_argument("recipe", nargs="?", default=DEFAULT_RECIPE, metavar="RECIPE",
                        help=RECIPE_HELP)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help=SET_HELP)


def register(sub) -> None:
    plan = sub.add_parser("plan", help="show the stages, their jobs and the predicted saving")
    _recipe_arguments(plan)
    plan.set_defaults(handler=_plan)

    run = sub.add_parser("run", help="run (or submit) every stage of a V-cycle")
    _recipe_arguments(run)
    run.add_argument("--executor", choices=("local", "slurm"), help="default: the recipe's")
    run.add_argument("--run-dir", help="default: runs/NAME-TIMESTAMP")
    run.add_argument("--dry-run", action="store_true", help="print the jobs, submit nothing")
    run.set_defaults(handler=_run)

    for name, text, handler in (("status", "show a run's stages, jobs and losses", _status),
                                ("cancel", "cancel a run's unfinished stages", _cancel),
                                ("resume", "continue a run: skip completed stages, restart the "
                                           "others from their latest checkpoints", _resume)):
        cmd = sub.add_parser(name, help=text)
        cmd.add_argument("run_dir")
        if name == "resume":
            cmd.add_argument("--set", action="append", default=[], metavar="cluster.KEY=VALUE",
                             help="change a cluster setting for the rest of the run (time limit, "
                                  "partition, ...), recorded in RUN_DIR/recipe.yaml")
        cmd.set_defaults(handler=handler)
    sub.choices["status"].add_argument(
        "--baseline", metavar="PATH", help="plot this baseline run's validation loss too (its run "
        "directory, a stage directory or a metrics.jsonl; default: the recipe's baseline)")


def _load(recipe: str, overrides):
    from mlmega.vcycle.plan import plan_vcycle
    from mlmega.vcycle.recipe import load_recipe

    return plan_vcycle(load_recipe(recipe, overrides))


def _plan(args: argparse.Namespace) -> int:
    from mlmega.vcycle.tables import print_plan

    print_plan(_load(args.recipe, args.set))
    return 0


def _run(args: argparse.Namespace) -> int:
    from mlmega.cli.executors import make_executor
    from mlmega.vcycle.lock import RunLock
    from mlmega.vcycle.run import create_run
    from mlmega.vcycle.tables import print_plan

    plan = _load(args.recipe, args.set)
    recipe = plan.recipe
    executor = make_executor(args.executor or recipe.cluster.executor)
    run_dir = Path(args.run_dir or f"runs/{recipe.name}-{time.strftime('%Y%m%d-%H%M%S')}")
    run_dir = run_dir.resolve()
    print_plan(plan)
    executor.check(plan, run_dir)
    _baseline(recipe.baseline)  # refused before anything is written or submitted
    if args.dry_run:
        print(executor.describe(plan, run_dir))
        return 0
    executor.check_cluster(plan)
    data_dir = _ensure_data(recipe)
    run_dir.mkdir(parents=True, exist_ok=True)
    with RunLock(run_dir, "run"):
        state = create_run(plan, run_dir, data_dir, executor.name)
        print(f"run directory: {run_dir}")
        executor.launch(state, plan)
        return _report(state, plan)


def _ensure_data(recipe) -> Path:
    """The recipe's prepared data directory (prepared now when it is missing and may be), checked
    against the recipe's model (arch, vocabulary, tokenizer)."""
    from mlmega.data.prepare import PrepareOptions, check_prepared, prepare

    data_dir = Path(recipe.data.dir.format(arch=recipe.model.arch)).resolve()
    if not (data_dir / "meta.json").exists():
        if not recipe.data.prepare:
            raise ConfigError(f"{recipe.source}: data.dir={data_dir} holds no prepared data "
                              f"(run `mlmega data prepare --out {data_dir}` or set "
                              f"data.prepare: true)")
        print(f"preparing data in {data_dir}")
        prepare(PrepareOptions(out=data_dir, inputs=recipe.data.inputs,
                               vocab_size=recipe.data.vocab_size, arch=recipe.model.arch))
    check_prepared(data_dir, recipe.model.arch, recipe.model.vocab_size, recipe.source,
                   recipe.data.vocab_size if recipe.data.prepare else None)
    return data_dir


def _baseline(path):
    """The baseline's validation curve (None without one)."""
    from mlmega.vcycle.report import run_curve

    return run_curve(Path(path)) if path else None


def _plot(run_dir: Path, plan, baseline: str | None = None) -> Path:
    from mlmega.vcycle.report import plot_run

    return plot_run(run_dir, [s.name for s in plan.stages], run_dir / "loss.png",
                    title=plan.recipe.name, baseline=_baseline(baseline or plan.recipe.baseline))


def _report(state, plan) -> int:
    from mlmega.vcycle.run import COMPLETED, stage_dir

    run_dir = Path(state.run_dir)
    png = _plot(run_dir, plan)
    done = [s for s in state.stages if s.status == COMPLETED]
    print(f"loss plot: {png}")
    if len(done) == len(state.stages):
        print(f"final checkpoint: {stage_dir(run_dir, state.stages[-1].name)}")
        return 0
    pending = [s.name for s in state.stages if s.status != COMPLETED]
    print(f"not finished: {', '.join(pending)} (`mlmega status {run_dir}`)")
    return 0 if state.executor == "slurm" else 1


def _reload(run_dir: str, overrides=()):
    """A run's state, plan (its recorded recipe, with ``overrides``) and executor."""
    from mlmega.cli.executors import make_executor
    from mlmega.vcycle.run import RunState

    state = RunState.load(run_dir)
    for item in overrides:
        key = item.split("=", 1)[0]
        if not key.startswith("cluster.") or key == "cluster.executor":
            raise ConfigError(f"resume --set {item}: only cluster settings (cluster.KEY=VALUE, "
                              f"not cluster.executor) can change in a run that exists")
    plan = _load(str(Path(run_dir) / "recipe.yaml"), overrides)
    return state, plan, make_executor(state.executor)


def _status(args: argparse.Namespace) -> int:
    from mlmega.vcycle.lock import RunBusy, RunLock
    from mlmega.vcycle.tables import print_status

    state, plan, executor = _reload(args.run_dir)
    executor.refresh(state, plan)
    try:  # record what the jobs did, unless another process writes the run now
        with RunLock(Path(args.run_dir), "status"):
            state.save()
    except RunBusy:
        pass
    print_status(state, plan)
    print(f"loss plot: {_plot(Path(args.run_dir), plan, args.baseline)}")
    return 0


def _cancel(args: argparse.Namespace) -> int:
    from mlmega.vcycle.lock import RunLock, stop_local_holder
    from mlmega.vcycle.run import RunState

    run_dir = Path(args.run_dir)
    if RunState.load(run_dir).executor == "local":
        stop_local_holder(run_dir)  # its stage saves, and it records the cancel itself
    with RunLock(run_dir, "cancel"):
        state, plan, executor = _reload(args.run_dir)
        executor.cancel(state)
    print(f"cancelled the unfinished stages of {args.run_dir}")
    return 0


def _resume(args: argparse.Namespace) -> int:
    from mlmega.vcycle.lock import RunLock
    from mlmega.vcycle.run import COMPLETED, PENDING, record_recipe

    with RunLock(Path(args.run_dir), "resume"):
        state, plan, executor = _reload(args.run_dir, args.set)
        executor.check(plan, Path(state.run_dir))
        executor.check_cluster(plan)
        _ensure_data(plan.recipe)
        if args.set:
            record_recipe(Path(state.run_dir), plan.recipe)
        executor.refresh(state, plan)
        for entry in state.stages:
            if entry.status != COMPLETED:
                entry.status = PENDING
        state.save()
        executor.launch(state, plan)
        return _report(state, plan)
