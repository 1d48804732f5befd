#!/usr/bin/env python
"""The saving a careful user would get: the V-cycle against a tuned baseline, over seeds.

For each comparison (an architecture and a number of levels), on the local executor, every run
reading the same sample stream (one data order per seed):

1. Baseline sweep at the full budget: peak LRs a factor 2 apart (at least 4), extended while
   the best sits at an end, so that the sweep brackets it; then the half-steps (factor sqrt 2)
   either side of that best; then, at the best LR, warm-ups a factor 2 either side of the
   recipe's, extended the same way up to a quarter of the steps; then the LR's half-steps again
   at the best warm-up, extended while the best of them sits at an end.
2. The tuned baseline (best LR and warm-up) at 50, 62.5, 75, 87.5, 100, 125 and 150% of the
   budget, each its own complete LR schedule (the same warm-up, linear decay to zero at its last
   step). The frontier C_base(L) is the least cost at which any of these runs reached loss L, at
   its end or at an evaluation on the way, in model FLOPs and in wall-clock seconds
   (benchmarks/frontier.py).
3. The V-cycle gets as many tuning trials as the baseline's sweep had runs, over its own knobs
   (LRs, the small level's LR, alpha, E_a, the final stage's and the small levels' length, the
   warm-ups), its level-0 LR starting at the baseline's best (its warm-up starts at the
   recipe's: it must end within E_a): a greedy search in rounds of two trials (side by side),
   each trial turning one knob of the best trial before its round (as the sweep moves from its
   best LR), passing over the knobs again once all have turned; the best has the largest
   compute-equivalent saving.
4. The headline pair (tuned baseline, best V-cycle) over every seed (model init and data order):
   compute-equivalent saving 1 - C_vcycle / C_base(L_vcycle) in FLOPs and wall-clock, and the
   FLOPs / seconds the V-cycle's final stage needs to reach the 100% baseline's final loss.
   Mean, min and max over seeds; the headline holds only if every seed saves. Each V-cycle's
   final model also gets its copies' spread (benchmarks/spread.py): how far it moved from the
   small level it was de-coalesced from.

Every run lives in OUT/runs/NAME and is reused when finished (an interrupted protocol continues
where it stopped, an interrupted run from its checkpoint); with --ledger DIR, each finished run's
curve and spreads also go to DIR/NAME.json (benchmarks/ledger.py), small enough to commit, and are
reused from there: a protocol continues from them on a machine where OUT is gone. Wall-clock
counts what a user waits for: process start-up, loading and the operator applied at load time,
training and the periodic evaluations (the same interval in every run); of an interrupted run,
the time its attempts ran, not the pause between them.

    python benchmarks/savings.py [--scale S] [--only NAME,...] [--all] [--seeds N]
                                 [--second-pass] [--ledger DIR] --out DIR
    (the same as: mlmega bench savings [CONFIG] [--scale S] [--only ...] [--all] ... --out DIR)

Default: the GPT 2-level comparison; --all adds GPT's 3-level ones and BERT 2- and 3-level; --only
names the comparisons (COMPARISONS: gpt-2level, gpt-3level, gpt-3level-depth, whose second level
halves depth only, bert-2level, bert-3level). The comparisons of one
architecture share its baseline runs (sweep and frontiers). --scale (SCALES): quick runs the whole
protocol at toy scale (minutes; the savings mean nothing there), small (the default) runs GPT's two
comparisons in about 6 hours of one core (BERT's train 4x the steps: its masked LM needs them to
leave the unigram plateau), medium is the 4L-256 GPT of the first measurements (about 36 hours),
deep is small at twice the depth (8L-128), made for cycles of three levels.
Writes DIR/report.json, DIR/report.md and DIR/savings.png.
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from functools import partial
from itertools import islice
from pathlib import Path
from typing import Callable, Optional, TypeVar

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # loaded by path (mlmega bench) or run as a script

from benchmarks.frontier import AT_MOST, EXACT, pareto, saving  # noqa: E402
from benchmarks.ledger import LedgerEntry, RunLedger, schemes_key, this_machine  # noqa: E402
from benchmarks.spread import checkpoint_spread  # noqa: E402
from mlmega.checkpoint.directory import TRACKER  # noqa: E402
from mlmega.config.errors import ConfigError  # noqa: E402
from mlmega.config.schemes import LevelSchemes  # noqa: E402
from mlmega.config.sections import section_from_mapping  # noqa: E402
from mlmega.data.prepare import PrepareOptions, prepare  # noqa: E402
from mlmega.launch.executor import LocalExecutor  # noqa: E402
from mlmega.launch.local import forwarding_signals  # noqa: E402
from mlmega.vcycle.plan import Plan, plan_vcycle  # noqa: E402
from mlmega.vcycle.recipe import Recipe, TrainingConfig, recipe_from_dict  # noqa: E402
from mlmega.vcycle.report import read_metrics  # noqa: E402
from mlmega.vcycle.lock import RunLock  # noqa: E402
from mlmega.train.signals import EXIT_INTERRUPTED  # noqa: E402
from mlmega.vcycle.run import (CANCELLED, COMPLETED, RunState, as_run, create_run,  # noqa: E402
                               recipe_dict, stage_dir)

# of the baseline's steps, each its own LR schedule; beyond 100% so that a V-cycle ending below the
# 100% run's loss still gets an exact compute-equivalent figure, not only a bound
BUDGETS = (0.5, 0.625, 0.75, 0.875, 1.0, 1.25, 1.5)
MAX_SWEEP = 6  # ladder LRs at most (4 to start, extended while the best is at an end), + 2 refined
# V-cycle trials per round of the search (side by side with --jobs 2 or more); a constant, so
# that the search's decisions do not depend on --jobs
TRIALS_AT_ONCE = 2
SEEDS = (1234, 1235, 1236)
T = TypeVar("T")
RUN_WAIT_S = 4 * 3600  # the longest a run is waited for while another process trains it
# steps between a run's checkpoints: a process killed without a signal loses at most these (how
# often a run saves changes none of its numbers, so it is not part of the run's key)
SAVE_INTERVAL = 500
# name -> (architecture, what each level below the full model halves: "width+depth" as in the
# paper, or "depth" only)
COMPARISONS = {
    "gpt-2level": ("gpt", ("width+depth",)),
    "gpt-3level": ("gpt", ("width+depth", "width+depth")),
    "gpt-3level-depth": ("gpt", ("width+depth", "depth")),  # the bottom keeps the middle's width
    "bert-2level": ("bert", ("width+depth",)),
    "bert-3level": ("bert", ("width+depth", "width+depth")),
}


@dataclass(frozen=True)
class Scale:
    """The size of every run of the protocol: the model, the baseline's budget, the first LR."""

    layers: int
    hidden: int
    heads: int
    seq_length: int
    batch: int  # the global batch
    steps: int  # the baseline's budget
    lr: float  # level 0's LR before the sweep (the sweep starts at 0.5, 1, 2, 4 x this)
    evals: int = 24  # validation points per baseline run (the same interval in every run)
    eval_iters: int = 4  # batches per validation point
    # BERT's masked LM learns from 15% of the positions: it leaves the unigram plateau several
    # times later than GPT (4L-128, LR 1e-3: validation 6.02 after 1200 steps, 5.40 after 4800)
    bert_steps_factor: int = 1

    def baseline_steps(self, arch: str) -> int:
        """The baseline's budget for ``arch``."""
        return self.steps * (self.bert_steps_factor if arch == "bert" else 1)


SCALES = {
    "quick": Scale(4, 32, 4, 32, 8, 32, 4e-3, 4, 1),  # 32 steps of a toy model want larger LRs
    # ~3.5 min per GPT baseline run on one core, ~14 min per BERT one
    "small": Scale(4, 128, 4, 128, 16, 1200, 2e-3, bert_steps_factor=4),
    "medium": Scale(4, 256, 8, 128, 16, 2400, 1e-3, bert_steps_factor=4),  # ~20 / 80 min per run
    # small's width at twice the depth: two halvings of 4 layers leave a 1-layer bottom (GPT
    # 3-level: 1L-32 reaches 4.30 where 2L-64 reaches 4.09 in 1200 steps); here they leave 2
    "deep": Scale(8, 128, 4, 128, 16, 1200, 2e-3, bert_steps_factor=4),
}


@dataclass
class Curve:
    """A run's validation curve: cumulative model FLOPs, wall-clock seconds and loss per point."""

    name: str
    flops: list[float] = field(default_factory=list)
    seconds: list[float] = field(default_factory=list)
    loss: list[float] = field(default_factory=list)
    stage: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return dict(name=self.name, flops=self.flops, seconds=self.seconds, loss=self.loss,
                    stage=self.stage)


class RunStopped(RuntimeError):
    """A run of the protocol was stopped by a signal (SIGTERM, ``mlmega cancel``) and saved."""


def run_recipe(recipe: Recipe, run_dir: Path, data_dir: Path, baseline: bool,
               log=print) -> tuple[Plan, Curve]:
    """Run the V-cycle (or its baseline) of ``recipe`` in ``run_dir``; reuse a finished run."""
    plan = plan_vcycle(recipe)
    stages = [plan.baseline] if baseline else list(plan.stages)
    Path(run_dir).mkdir(parents=True, exist_ok=True)
    # another protocol process on the same --out may be training this run (comparisons share
    # their baseline runs): wait for it, then reuse what it finished
    with RunLock(run_dir, "bench savings", wait_s=RUN_WAIT_S):
        if (run_dir / "state.json").exists():
            state = RunState.load(run_dir)
            stored = run_dir / "recipe.yaml"  # read as today's Recipe: new options take defaults
            if same_run(recipe_from_dict(yaml.safe_load(stored.read_text()), str(stored))) != \
                    same_run(as_run(recipe, data_dir)):
                raise ConfigError(f"{stored}: another recipe than {recipe.name} is now (the "
                                  f"benchmark changed?); delete {run_dir} or use another --out")
        else:
            state = create_run(plan, run_dir, data_dir, "local", stages)
        LocalExecutor().launch(state, plan, log=log)
    if any(s.status == CANCELLED for s in state.stages):
        raise RunStopped(f"{run_dir}: stopped by a signal; it saved")
    if any(s.status != COMPLETED for s in state.stages):
        raise RuntimeError(f"{run_dir}: the run did not complete; see {run_dir}/logs")
    return plan, curve_of(run_dir, state, "baseline" if baseline else recipe.name)


def same_run(recipe: Recipe) -> dict:
    """What two recipes share when they make the same run: all but how often they save."""
    data = recipe_dict(recipe)
    data["training"].pop("save_interval")
    return data


def curve_of(run_dir: Path, state: RunState, name: str) -> Curve:
    """The run's validation points (a step evaluated again after a resume: the last). Seconds
    count the time the stages' attempts ran (their spans), not the pauses between them: an
    interrupted protocol's pause counts nowhere, work an attempt lost does."""
    curve = Curve(name)
    before = 0.0
    for entry in state.stages:
        # a state written before spans were recorded: its stages' last attempts
        spans = sorted(span for runs in entry.spans.values() for span in runs) or [
            [entry.started, entry.ended]]
        shifts = []  # a time in span i, plus shifts[i]: the seconds the run had run by then
        for start, end in spans:
            shifts.append(before - start)
            before += end - start
        points = {}
        for record in read_metrics(stage_dir(run_dir, entry.name)):
            ran = [i for i, (start, end) in enumerate(spans) if start <= record["time"] <= end]
            if "val_loss" in record and ran:
                points[record["step"]] = (record["flops"], record["val_loss"],
                                          record["time"] + shifts[ran[-1]])
        for step in sorted(points):
            flops, loss, seconds = points[step]
            curve.flops.append(flops)
            curve.loss.append(loss)
            curve.seconds.append(seconds)
            curve.stage.append(entry.name)
    return curve


def reach(curve: Curve, target: float, stage: str) -> Optional[tuple[float, float]]:
    """(FLOPs, seconds) at which ``stage``'s part of the curve first reaches ``target``."""
    points = [(f, s, l) for f, s, l, st in zip(curve.flops, curve.seconds, curve.loss,
                                               curve.stage) if st == stage]
    for i, (f, s, loss) in enumerate(points):
        if loss <= target:
            if i == 0:
                return f, s
            f0, s0, l0 = points[i - 1]
            w = (l0 - target) / (l0 - loss)
            return f0 + w * (f - f0), s0 + w * (s - s0)
    return None


def compare(baseline: Curve, vcycle: Curve, final_stage: str) -> dict:
    target = baseline.loss[-1]
    hit = reach(vcycle, target, final_stage)
    out = dict(baseline_final_val_loss=target, vcycle_final_val_loss=vcycle.loss[-1],
               baseline_flops=baseline.flops[-1], baseline_seconds=baseline.seconds[-1],
               vcycle_flops=vcycle.flops[-1], vcycle_seconds=vcycle.seconds[-1],
               reached=hit is not None, flops_to_reach=None, seconds_to_reach=None,
               flops_saving_pct=None, wallclock_saving_pct=None)
    if hit is not None:
        out.update(flops_to_reach=hit[0], seconds_to_reach=hit[1],
                   flops_saving_pct=100.0 * (1 - hit[0] / baseline.flops[-1]),
                   wallclock_saving_pct=100.0 * (1 - hit[1] / baseline.seconds[-1]))
    return out


def variant(base: dict, name: str, **changes) -> dict:
    """A copy of recipe dict ``base`` named ``name`` with dotted-key ``changes``."""
    data = copy.deepcopy(base)
    data["name"] = name
    for key, value in changes.items():
        node = data
        *parents, last = key.split("__")
        for part in parents:
            node = node.setdefault(part, {})
        node[last] = value
    return data


def recipe_key(recipe: dict) -> str:
    """``recipe`` without its name, floats to 6 digits: equal for the same run (0.006 x 2 and
    0.004 x 3 are one LR)."""
    def rounded(node):
        if isinstance(node, dict):
            return {k: rounded(v) for k, v in node.items() if k != "name"}
        if isinstance(node, list):
            return [rounded(v) for v in node]
        return float(f"{node:.6g}") if isinstance(node, float) else node
    return yaml.safe_dump(rounded(recipe), sort_keys=True)


def rank(trial: dict) -> tuple[float, float]:
    """Trials order by compute-equivalent saving, then by lower final loss."""
    return trial["compute_saving_pct"], -trial["vcycle_final_loss"]


def base_recipe(name: str, arch: str, shrinks: tuple[str, ...], scale: Scale) -> dict:
    """The benchmark's recipe: the paper's shape (E_a ~5% of the budget at the full size, the
    small level at a higher LR for half the steps, de-coalescing + interpolation, the rest at the
    full size), scaled to a CPU, with the choices measured on it (see the comments)."""
    steps, batch = scale.baseline_steps(arch), scale.batch
    levels = len(shrinks) + 1
    # preserve_function: de-coalescing keeps the small model's function (width: residual writers
    # scaled with the tied embeddings; depth: identity copies). On the 4L-256 GPT the final stage
    # starts at the small model's 3.93 (3.96 after interpolation) instead of 4.64.
    halves = {"width": {"kind": "stacked", "factor": 2}, "depth": {"kind": "adjacent", "factor": 2}}
    level_of = {"width+depth": {**halves, "preserve_function": True},
                "depth": {"depth": halves["depth"], "preserve_function": True}}
    # bottom_decay constant: a small level annealed to LR 0 sits in a minimum that the final
    # stage's fresh peak LR throws it out of (validation loss 3.99 -> 4.08 in 100 steps); kept at
    # its peak LR it hands over a model that keeps improving (3.96 -> 3.88): 0.18 lower after 300
    # final-stage steps. The final stage runs 5/8 of the baseline's steps (the paper: 1/2): at
    # 1/2 it ends at 3.532 against the baseline's 3.496 (measured), just short of it.
    lr = scale.lr
    if levels == 2:
        schedule = dict(coalesce_steps=[steps // 20], bottom_steps=steps // 2,
                        decoalesce_steps=[steps * 5 // 8], lr=[lr, 3 * lr])
    else:
        schedule = dict(coalesce_steps=[steps // 20, steps // 20], bottom_steps=steps // 2,
                        decoalesce_steps=[steps * 5 // 8, steps // 8], lr=[lr, 2 * lr, 4 * lr])
    # alpha: the paper uses 0.25 (GPT) and 0.5 (BERT); with function-preserving de-coalescing
    # the large model's early weights only need to break the copies' symmetry: 0.9 (start 3.96;
    # 0.5: 4.56); BERT: the same reasoning, not measured
    schedule.update(alpha=0.9, baseline_steps=steps, bottom_decay="constant")
    return dict(
        name=name,
        model=dict(arch=arch, num_layers=scale.layers, hidden_size=scale.hidden,
                   num_attention_heads=scale.heads, vocab_size=2048, max_sequence_length=128),
        levels=[level_of[shrink] for shrink in shrinks],
        schedule=schedule,
        training=dict(seq_length=scale.seq_length, micro_batch_size=batch,
                      global_batch_size=batch, warmup_steps=steps // 40, seed=SEEDS[0],
                      eval_interval=steps // scale.evals, eval_iters=scale.eval_iters,
                      log_interval=100, data_samples=2 * steps * batch),  # one stream for all runs
        data=dict(prepare=False),
        cluster=dict(executor="local"),
        sizing=dict(tp=1),
    )


def comparisons(scale: Scale, names: list[str]) -> list[dict]:
    """The base recipes of the named comparisons, in COMPARISONS' order."""
    unknown = sorted(set(names) - set(COMPARISONS))
    if unknown:
        raise ConfigError(f"--only: no comparison {', '.join(unknown)}; there are "
                          f"{', '.join(COMPARISONS)}")
    return [base_recipe(name, *COMPARISONS[name], scale) for name in COMPARISONS if name in names]


def vcycle_knobs(recipe: dict) -> list[tuple[str, dict]]:
    """The V-cycle's knobs, in the order they are turned: (name, changes to ``recipe``)."""
    s, warmup = recipe["schedule"], recipe["training"]["warmup_steps"]
    lr = s["lr"]
    # the final stage's length first (the CPU measurements found it sets the saving), then each
    # LR knob in both directions, then alpha, E_a, the smallest level's length (both ways), the
    # middle levels' length and the warm-ups
    return [
        ("default", {}),
        ("final-x0.8", dict(schedule__decoalesce_steps=[
            max(1, s["decoalesce_steps"][0] * 4 // 5), *s["decoalesce_steps"][1:]])),
        ("small-lr-x0.5", dict(schedule__lr=[lr[0], *(x / 2 for x in lr[1:])])),
        ("small-lr-x2", dict(schedule__lr=[lr[0], *(2 * x for x in lr[1:])])),
        ("lr-x0.5", dict(schedule__lr=[x / 2 for x in lr])),
        ("lr-x2", dict(schedule__lr=[2 * x for x in lr])),
        ("alpha-0.5", dict(schedule__alpha=0.5)),
        ("Ea-x2", dict(schedule__coalesce_steps=[2 * x for x in s["coalesce_steps"]])),
        ("bottom-x0.5", dict(schedule__bottom_steps=max(1, s["bottom_steps"] // 2))),
        # the smallest level's steps cost a fraction of the full model's (GPT 2L-64: 22%), and on
        # GPT 4L-128 it reaches a loss the baseline needs 2.9x its FLOPs for (seed 1234)
        ("bottom-x2", dict(schedule__bottom_steps=2 * s["bottom_steps"])),
        # at 3 levels the middle level's steps are cheap too (GPT 4L-64 under 8L-128: 4 times its
        # stage raised seed 1234's saving from 31.9% to 35.4%, a probe outside the protocol)
        *([("middle-x4", longer_middle(recipe, 4))] if len(s["decoalesce_steps"]) > 1 else []),
        # the large model's warm-up doubled, E_a lengthened where it would not hold it
        ("warmup-x2", dict(training__warmup_steps=2 * warmup, schedule__coalesce_steps=[
            max(s["coalesce_steps"][0], 4 * warmup), *s["coalesce_steps"][1:]])),
        # the de-coalesced stages' fresh optimizers warm up for a fifth of their steps (the tuned
        # GPT baseline's warm-up fraction, 240 of 1200) instead of starting at their peak LR
        ("final-warmup", dict(schedule__decoalesce_warmup_steps=[
            steps // 5 for steps in s["decoalesce_steps"]])),
    ]


def longer_middle(recipe: dict, factor: int) -> dict:
    """The middle levels' de-coalesced stages at ``factor`` times their steps, the final stage
    shortened only as far as the sample stream requires (to fewer than 1 step: ``valid`` refuses
    it)."""
    s = recipe["schedule"]
    train = section_from_mapping(TrainingConfig, recipe.get("training", {}), "training")
    final, *middle = s["decoalesce_steps"]
    middle = [factor * steps for steps in middle]
    if train.data_samples is not None:
        others = sum(s["coalesce_steps"]) + s["bottom_steps"] + sum(middle)
        final = min(final, train.data_samples // train.global_batch_size - others)
    return dict(schedule__decoalesce_steps=[final, *middle])


def valid(recipe: dict) -> bool:
    """Whether ``recipe`` plans (a V-cycle that fits its sample stream, its warm-ups in their
    stages)."""
    try:
        plan_vcycle(recipe_from_dict(recipe, f"<{recipe['name']}>"))
    except ConfigError:
        return False
    return True


def greedy_trials(tuned: dict, count: int,
                  evaluate: Callable[[list[tuple[str, dict]]], list[dict]]
                  ) -> tuple[list[dict], dict]:
    """``count`` V-cycle trials of a greedy search, in rounds of TRIALS_AT_ONCE: each trial of a
    round turns the next knob (vcycle_knobs, cyclically) of the best trial before the round, and
    becomes the best if it saves more; a turn that repeats a tried recipe (one undoing a kept
    knob), or that the recipe cannot take (a V-cycle longer than the sample stream), is passed
    over; the search ends after ``count`` trials or once a whole pass over the
    knobs found no new recipe. ``evaluate([(name, changes), ...])`` runs a round's trials and
    returns their results (``compute_saving_pct``, ``vcycle_final_loss``). Returns the trials
    (the best marked) and the best one's changes."""
    knobs = [knob for knob, _ in vcycle_knobs(tuned)]
    kept, kept_names, tried, trials, changes_of = {}, [], set(), [], {}
    turn, passed_over = 0, 0  # the next knob (counting on past the last); repeats in a row
    while len(trials) < count and passed_over < len(knobs):
        batch = []
        while len(batch) < min(TRIALS_AT_ONCE, count - len(trials)) and \
                passed_over < len(knobs):
            knob, turn = knobs[turn % len(knobs)], turn + 1
            changes = {**kept, **dict(vcycle_knobs(variant(tuned, "", **kept)))[knob]}
            turn_recipe = variant(tuned, "turn", **changes)
            key = recipe_key(turn_recipe)
            if key in tried or not valid(turn_recipe):
                passed_over += 1
                continue
            tried.add(key)
            passed_over = 0
            names = kept_names + [knob] if knob != "default" else kept_names
            batch.append(("_".join(names) or "default", changes, names))
        results = evaluate([(name, changes) for name, changes, _ in batch]) if batch else []
        for (name, changes, names), result in zip(batch, results):
            trials.append(dict(trial=name, changes={k.replace("__", "."): v
                                                    for k, v in changes.items()}, **result))
            changes_of[name] = changes
            if max(trials, key=rank) is trials[-1]:
                kept, kept_names = changes, names
    best = max(trials, key=rank)
    for trial in trials:
        trial["best"] = trial is best
    return trials, changes_of[best["trial"]]


@dataclass
class Protocol:
    """Runs (cached under ``out/runs``, and in ``ledger`` once finished) and the decisions of the
    protocol for one comparison. Runs that do not depend on each other train ``jobs`` at once."""

    out: Path
    data_dirs: dict[str, Path]
    seeds: tuple[int, ...] = SEEDS
    log: Callable[[str], None] = print
    ledger: Optional[RunLedger] = None
    entries: dict[str, LedgerEntry] = field(default_factory=dict)  # this process's finished runs
    used: list[str] = field(default_factory=list)  # the runs the current comparison used
    planned: dict[str, tuple[Recipe, bool]] = field(default_factory=dict)  # run: (recipe, baseline)
    jobs: int = 1
    second_pass: bool = False  # see sweep_baseline

    def concurrently(self, calls: list[Callable[[], T]]) -> list[T]:
        """The results of ``calls``, in their order, up to ``self.jobs`` of them running at
        once (threads: each run trains in its own processes). Once one fails (a run stopped by
        a signal, or broken), no further call starts: its error is raised when those running
        have ended."""
        jobs = min(self.jobs, len(calls))
        if jobs <= 1:
            return [call() for call in calls]
        results, waiting = {}, iter(enumerate(calls))
        with forwarding_signals(), ThreadPoolExecutor(jobs) as pool:
            running = {pool.submit(call): i for i, call in islice(waiting, jobs)}
            while running:
                done, _ = wait(running, return_when=FIRST_COMPLETED)
                for future in sorted(done, key=lambda f: f.exception() is None):  # failed first
                    results[running.pop(future)] = future.result()
                    running.update((pool.submit(call), i) for i, call in islice(waiting, 1))
        return [results[i] for i in range(len(calls))]

    def run(self, name: str, recipe: dict, baseline: bool) -> tuple[Plan, Curve]:
        """Run ``recipe`` as ``name``: from the ledger if it has the run, else trained (or
        reused) in ``out/runs/name`` and then entered in the ledger."""
        named = variant(recipe, name)
        key = recipe_key(named)
        parsed = recipe_from_dict(variant(named, name, training__save_interval=SAVE_INTERVAL),
                                  f"<{name}>")
        self.log(f"== {name}")
        self.used.append(name)
        self.planned[name] = (parsed, baseline)
        entry = self.ledger.get(name, key) if self.ledger else None
        if entry is not None:
            self.entries[name] = entry
            return plan_vcycle(parsed), Curve(**entry.curve)
        plan, curve = run_recipe(parsed, self.out / "runs" / name,
                                 self.data_dirs[parsed.model.arch], baseline, log=self.log)
        self.entries[name] = LedgerEntry(name, key, curve.to_dict(), machine=this_machine())
        if self.ledger:
            self.ledger.put(self.entries[name])
        return plan, curve

    def spread(self, name: str, stage: str, schemes: LevelSchemes) -> Optional[float]:
        """The copies' spread of finished run ``name``'s ``stage`` under ``schemes``
        (benchmarks/spread.py): from its ledger entry, else measured on its checkpoint, which a
        run taken from the ledger does not have here: it is trained again for it (its curve stays
        the ledger's)."""
        entry, key = self.entries[name], f"{stage} {schemes_key(schemes)}"
        if key not in entry.spreads:
            run_dir = self.out / "runs" / name
            if not (stage_dir(run_dir, stage) / TRACKER).exists():
                self.log(f"== {name} (trained again: the spread needs its checkpoint)")
                recipe, baseline = self.planned[name]
                run_recipe(recipe, run_dir, self.data_dirs[recipe.model.arch], baseline,
                           log=self.log)
            entry.spreads[key] = checkpoint_spread(stage_dir(run_dir, stage), schemes)
            if self.ledger:
                self.ledger.put(entry)
        return entry.spreads[key]

    def baseline(self, recipe: dict, lr: float, budget: float, seed: int,
                 warmup: Optional[int] = None) -> Curve:
        """The baseline at peak LR ``lr`` for ``budget`` of its steps, its decay fitted to them,
        after ``warmup`` steps of warm-up (None: the recipe's).

        The warm-up does not scale with the budget: it keeps the tuned peak LR stable (scaled,
        15 steps at 50% threw the run off for ~100 steps and left it 0.4 above the 100% run's loss
        at the same step: a frontier weaker than the baseline)."""
        s = recipe["schedule"]
        warmup = recipe["training"]["warmup_steps"] if warmup is None else warmup
        name = baseline_name(recipe, lr, budget, seed, warmup)
        # the V-cycle's own settings do not reach the baseline: written as one 2-level V-cycle's,
        # so that every comparison of an architecture shares (and reuses) its baseline runs (its
        # first stage only has to hold the warm-up, which a recipe checks)
        changed = variant(recipe, name, levels=recipe["levels"][:1], schedule__lr=[lr, lr],
                          schedule__coalesce_steps=[max(s["coalesce_steps"][0], 2 * warmup)],
                          schedule__decoalesce_steps=s["decoalesce_steps"][:1],
                          schedule__baseline_steps=round(s["baseline_steps"] * budget),
                          training__seed=seed, training__warmup_steps=warmup)
        return self.run(name, changed, baseline=True)[1]

    def vcycle(self, recipe: dict, trial: str, changes: dict, seed: int
               ) -> tuple[Plan, Curve, Optional[float]]:
        """V-cycle ``trial``: its plan, its curve and its final model's copies' spread."""
        name = f"{recipe['name']}-{trial}-s{seed}"
        plan, curve = self.run(name, variant(recipe, name, training__seed=seed, **changes), False)
        final = plan.stages[-1]
        return plan, curve, self.spread(name, final.name, final.init.schemes)

    def sweep_baseline(self, recipe: dict) -> list[dict]:
        """Peak LRs a factor 2 apart around the recipe's, until the best is not at an end; the
        two LRs a factor sqrt(2) either side of that best; then, at the best LR, warm-ups a
        factor 2 either side of the recipe's, until the best is not at an end, is none or is a
        quarter of the steps; then the LR's half-steps again at that warm-up, extended the same
        way while the best of them sits at an end. With ``second_pass``, then the LR's
        quarter-steps (factor 2^1/4) at the best warm-up and the warm-up's half-steps (factor
        sqrt 2) at the best LR: 4 more runs, and so 4 more V-cycle trials."""
        seed, lr0, w0 = self.seeds[0], recipe["schedule"]["lr"][0], \
            recipe["training"]["warmup_steps"]
        finals = {}  # (lr, warm-up) -> (final loss, FLOPs, seconds)

        def train(settings) -> tuple[float, int]:
            todo = [setting for setting in dict.fromkeys(settings) if setting not in finals]
            curves = self.concurrently([partial(self.baseline, recipe, lr, 1.0, seed, warmup)
                                        for lr, warmup in todo])
            for setting, curve in zip(todo, curves):
                finals[setting] = (curve.loss[-1], curve.flops[-1], curve.seconds[-1])
            return min(finals, key=lambda setting: finals[setting][0])

        def half_steps(lr: float, warmup: int, factor: float = 2 ** 0.5
                       ) -> set[tuple[float, int]]:
            """The LRs a ``factor`` (by default sqrt(2)) either side of ``lr`` (as the run's
            name shows them)."""
            return {(float(f"{lr * f:.3g}"), warmup) for f in (1 / factor, factor)}

        def best_along(axis: int, at) -> tuple[float, int, int]:
            """Among the runs whose other setting is ``at``: the best value along ``axis`` (0: LR,
            1: warm-up), the end of the tried values it sits at (-1 low, 1 high, 0 inside), and
            how many values were tried."""
            tried = sorted(s[axis] for s in finals if s[1 - axis] == at)
            top = min(tried, key=lambda v: finals[(v, at) if axis == 0 else (at, v)][0])
            return top, -1 if top == tried[0] else int(top == tried[-1]), len(tried)

        todo = {(lr0 * f, w0) for f in (0.5, 1, 2, 4)}
        while True:  # the LR ladder, a factor 2 a step
            train(todo)
            best, end, _ = best_along(0, w0)
            if not end or len(finals) >= MAX_SWEEP:
                break
            todo = {(best * 2.0 ** end, w0)}
        refined = half_steps(best, w0)
        best, _ = train(refined)
        longest = recipe["schedule"]["baseline_steps"] // 4
        todo = {(best, w) for w in (w0 // 2, max(1, 2 * w0)) if w <= longest}
        while True:  # the warm-ups at that LR, a factor 2 a step, up to a quarter of the steps
            train(todo)
            top, end, _ = best_along(1, best)
            if not end or top == 0 or 2 * top > longest:
                break
            todo = {(best, top // 2 if end < 0 else 2 * top)}
        if top != w0:  # the LR's half-steps again at the best warm-up, until they bracket it
            refined |= half_steps(best, top)
            while True:
                train(refined)
                lr_top, end, tried = best_along(0, top)
                if not end or tried >= MAX_SWEEP:
                    break
                refined |= {step for step in half_steps(lr_top, top) if step not in finals}
        top = min(finals, key=lambda setting: finals[setting][0])
        second = set()
        if self.second_pass:  # finer steps on both axes around the best, once
            lr, w = top
            second = (half_steps(lr, w, 2 ** 0.25) |
                      {(lr, round(w * f)) for f in (2 ** -0.5, 2 ** 0.5)}) - set(finals)
            top = train(second)
        return [dict(lr=lr, warmup=warmup, final_loss=loss, flops=flops, seconds=secs,
                     best=(lr, warmup) == top, refined=(lr, warmup) in refined,
                     second_pass=(lr, warmup) in second)
                for (lr, warmup), (loss, flops, secs) in sorted(finals.items())]

    def frontiers(self, recipe: dict, lr: float, warmup: int) -> dict[int, list[dict]]:
        """Each seed's frontier: the baseline at ``lr`` and ``warmup`` for each of BUDGETS."""
        grid = [(seed, budget) for seed in self.seeds for budget in BUDGETS]
        curves = self.concurrently([partial(self.baseline, recipe, lr, budget, seed, warmup)
                                    for seed, budget in grid])
        frontiers: dict[int, list[dict]] = {seed: [] for seed in self.seeds}
        for (seed, budget), curve in zip(grid, curves):
            frontiers[seed].append(dict(budget=budget, flops=curve.flops[-1],
                                        seconds=curve.seconds[-1], final_loss=curve.loss[-1],
                                        curve=curve))
        return frontiers

    def compare(self, recipe: dict) -> dict:
        """The whole protocol for one base recipe; returns its report section (with the
        machines its runs were timed on: seconds compare only on one)."""
        self.used = []
        sweep = self.sweep_baseline(recipe)
        best_lr, warmup = next((r["lr"], r["warmup"]) for r in sweep if r["best"])
        scale = best_lr / recipe["schedule"]["lr"][0]  # the V-cycle starts from the tuned LR
        tuned = variant(recipe, recipe["name"],
                        schedule__lr=[x * scale for x in recipe["schedule"]["lr"]])
        frontiers = self.frontiers(recipe, best_lr, warmup)

        def trial_round(batch: list[tuple[str, dict]]) -> list[dict]:
            runs = self.concurrently([partial(self.vcycle, tuned, name, changes, self.seeds[0])
                                      for name, changes in batch])
            return [seed_result(self.seeds[0], frontiers[self.seeds[0]], *run) for run in runs]

        trials, best_changes = greedy_trials(tuned, len(sweep), trial_round)
        best = next(r for r in trials if r["best"])
        vcycles = self.concurrently([partial(self.vcycle, tuned, best["trial"], best_changes,
                                             seed) for seed in self.seeds])
        per_seed, curves = [], {}
        for seed, (plan, curve, spread) in zip(self.seeds, vcycles):
            frontier = frontiers[seed]
            per_seed.append(seed_result(seed, frontier, plan, curve, spread))
            if seed == self.seeds[0]:
                curves = dict(frontier=[(p["flops"], p["final_loss"]) for p in frontier],
                              baseline=full_budget(frontier)["curve"].to_dict(),
                              vcycle=curve.to_dict())
                # the same measure of this seed's 100% baseline (trained from scratch), with the
                # V-cycle's scheme
                scratch = self.spread(baseline_name(recipe, best_lr, 1.0, seed, warmup),
                                      "baseline", plan.stages[-1].init.schemes)
        return dict(name=recipe["name"], arch=recipe["model"]["arch"],
                    levels=len(recipe["levels"]) + 1, baseline_sweep=sweep, best_lr=best_lr,
                    best_warmup=warmup,
                    baseline_copies_spread=scratch,
                    vcycle_trials=trials, best_trial=best["trial"], seeds=per_seed,
                    headline=headline(per_seed), curves=curves,
                    machines=sorted({self.entries[name].machine for name in self.used}))


def baseline_name(recipe: dict, lr: float, budget: float, seed: int, warmup: int) -> str:
    """The run name of a baseline: shared by every comparison of the recipe's architecture (the
    warm-up named where it is not the recipe's)."""
    tag = "" if warmup == recipe["training"]["warmup_steps"] else f"-w{warmup}"
    return f"{recipe['model']['arch']}-baseline-lr{lr:.3g}{tag}-b{budget:g}-s{seed}"


def seed_result(seed: int, frontier: list[dict], plan: Plan, vcycle: Curve,
                spread: Optional[float]) -> dict:
    """One seed's V-cycle against that seed's baseline frontier (FLOPs and wall-clock), with the
    final model's copies' spread (benchmarks/spread.py)."""
    loss = vcycle.loss[-1]
    flops_points, seconds_points = baseline_points(frontier)
    flops = saving(vcycle.flops[-1], loss, flops_points)
    secs = saving(vcycle.seconds[-1], loss, seconds_points)
    reached = compare(full_budget(frontier)["curve"], vcycle, plan.stages[-1].name)
    return dict(seed=seed, frontier=[{k: v for k, v in p.items() if k != "curve"}
                                     for p in frontier],
                frontier_flops=pareto(flops_points), frontier_seconds=pareto(seconds_points),
                vcycle_final_loss=loss, vcycle_flops=vcycle.flops[-1],
                vcycle_seconds=vcycle.seconds[-1], copies_spread=spread,
                compute_saving_pct=100 * flops.value, compute_saving_bound=flops.bound,
                wallclock_saving_pct=100 * secs.value, wallclock_saving_bound=secs.bound,
                baseline_final_loss=reached["baseline_final_val_loss"],
                flops_to_reach_baseline=reached["flops_to_reach"],
                flops_saving_at_baseline_loss_pct=reached["flops_saving_pct"],
                seconds_to_reach_baseline=reached["seconds_to_reach"],
                wallclock_saving_at_baseline_loss_pct=reached["wallclock_saving_pct"])


def full_budget(frontier: list[dict]) -> dict:
    """The frontier's 100% point: the baseline a user would have trained."""
    return next(p for p in frontier if p["budget"] == 1.0)


def baseline_points(frontier: list[dict]) -> tuple[list, list]:
    """Every (FLOPs, loss) and (seconds, loss) the budget runs reached, at their ends and at each
    evaluation on the way: C_base(L) is the least cost at which any baseline run reached L (at
    this scale a longer schedule passes through losses a shorter one ends above)."""
    flops, seconds = [], []
    for point in frontier:
        curve = point["curve"]
        flops += [(f, loss) for f, loss in zip(curve.flops, curve.loss) if f > 0]
        seconds += [(t, loss) for t, loss in zip(curve.seconds, curve.loss) if t > 0]
    return flops, seconds


def one_way(bounds: set[str]) -> str:
    """The bound of a mean of values with ``bounds``: one direction if only that one occurs."""
    one = bounds - {EXACT}
    return one.pop() if len(one) == 1 else EXACT


def headline(per_seed: list[dict]) -> dict:
    """Mean, min and max over seeds ('>=' where a seed's value is only a lower bound: the V-cycle
    ended below every loss its baseline reached); it holds only if every seed shows a saving.
    Also the FLOPs saving at the 100% baseline's final loss, over the seeds that reached it."""
    out = {}
    for kind in ("compute", "wallclock"):
        values = [r[f"{kind}_saving_pct"] for r in per_seed]
        bounds = {r[f"{kind}_saving_bound"] for r in per_seed}
        out[kind] = dict(mean=sum(values) / len(values), min=min(values), max=max(values),
                         bound=one_way(bounds),
                         holds=all(r[f"{kind}_saving_pct"] > 0 and
                                   r[f"{kind}_saving_bound"] != AT_MOST for r in per_seed))
    reached = [r["flops_saving_at_baseline_loss_pct"] for r in per_seed
               if r["flops_saving_at_baseline_loss_pct"] is not None]
    out["at_baseline_loss"] = dict(seeds=len(reached), mean=sum(reached) / len(reached),
                                   min=min(reached), max=max(reached)) if reached else None
    return out


def prepare_data(recipes: list[dict], out: Path) -> dict[str, Path]:
    dirs = {}
    for arch in sorted({r["model"]["arch"] for r in recipes}):
        dirs[arch] = (out / f"data-{arch}").resolve()
        prepare(PrepareOptions(out=dirs[arch], vocab_size=2048, arch=arch))
    return dirs


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="The V-cycle against a tuned baseline, over "
                                                 "seeds: compute-equivalent FLOPs and wall-clock "
                                                 "saving on the embedded corpus.")
    add_arguments(parser)
    return run(parser.parse_args(argv))


def at_least_one(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"a whole number of at least 1, not {text!r}")
    return int(text)


def add_arguments(parser) -> None:
    parser.add_argument("config", nargs="?", help="a recipe to compare (default: the built-in "
                                                  "GPT 2-level recipe)")
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--scale", choices=sorted(SCALES), default="small",
                        help="the runs' size: quick (the whole protocol at toy scale in minutes; "
                             "savings not meaningful), small (default), medium, deep")
    parser.add_argument("--only", type=lambda text: text.split(","), default=["gpt-2level"],
                        help=f"comparisons to run, comma-separated: {', '.join(COMPARISONS)} "
                             "(default gpt-2level)")
    parser.add_argument("--all", action="store_true", help="every comparison (as --only with all)")
    parser.add_argument("--seeds", type=int, default=len(SEEDS),
                        help=f"seeds of the headline pair (default {len(SEEDS)})")
    parser.add_argument("--ledger", type=Path,
                        help="keep each finished run's curve and spreads here, one small JSON "
                             "per run (the committed one: benchmarks/ledger/SCALE), and reuse "
                             "them: a protocol that lost its --out continues from them")
    parser.add_argument("--jobs", type=at_least_one, default=1,
                        help="runs trained at once where they do not depend on each other (the "
                             "sweep's LRs, the frontiers' budgets and seeds, a round's two V-cycle "
                             "trials, the seeds' V-cycles). Each run is timed as it ran: keep it "
                             "at most the cores (CPU; the runs share this machine's GPUs)")
    parser.add_argument("--second-pass", action="store_true",
                        help="tune both sides further, equally: the baseline's sweep adds the "
                             "LR's quarter-steps and the warm-up's half-steps around its best (4 "
                             "runs), the V-cycle's search as many trials")


def run(args) -> int:
    from benchmarks.report import write_report

    if args.config:
        recipe = yaml.safe_load(Path(args.config).read_text())
        recipe.setdefault("data", {})["prepare"] = False
        plan = plan_vcycle(recipe_from_dict(recipe, args.config))
        # one sample stream for every run of the protocol, long enough for any trial's V-cycle
        recipe.setdefault("training", {}).setdefault("data_samples", 2 * plan.data_samples)
        recipes = [recipe]
    else:
        recipes = comparisons(SCALES[args.scale], list(COMPARISONS) if args.all else args.only)
    out = args.out.resolve()
    protocol = Protocol(out, prepare_data(recipes, out),
                        tuple(SEEDS[0] + i for i in range(args.seeds)),
                        ledger=RunLedger(args.ledger) if args.ledger else None,
                        jobs=args.jobs, second_pass=args.second_pass)
    try:
        # a signal at any point (between runs, or waiting for a run another process trains)
        # stops the protocol at its next run, not at once: no run is left without its save
        with forwarding_signals():
            sections = [protocol.compare(r) for r in recipes]
    except RunStopped as stop:
        print(f"savings: {stop}; finished runs are kept and interrupted ones saved: the same "
              f"command continues", file=sys.stderr)
        return EXIT_INTERRUPTED
    report = dict(date=time.strftime("%Y-%m-%d %H:%M:%S"), scale=args.scale,
                  command=" ".join(["python", "benchmarks/savings.py", *sys.argv[1:]]),
                  budgets=list(BUDGETS), seeds=list(protocol.seeds), comparisons=sections)
    for path in write_report(report, out):
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
