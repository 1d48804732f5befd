"""The savings measurement: where a curve reaches the baseline's loss, and the --quick smoke run."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from functools import partial
from pathlib import Path

import pytest

from benchmarks import savings
from benchmarks.frontier import cost_to_reach, saving
from benchmarks.ledger import RunLedger, this_machine
from benchmarks.savings import (BUDGETS, COMPARISONS, MAX_SWEEP, SCALES, SEEDS, Curve,
                                Protocol, baseline_name, compare, comparisons, curve_of,
                                greedy_trials, prepare_data, reach, valid, variant, vcycle_knobs)
from mlmega.config.errors import ConfigError
from mlmega.vcycle.recipe import recipe_from_dict
from mlmega.vcycle.run import RunState, StageState, as_run, recipe_dict, stage_dir

ROOT = Path(__file__).resolve().parents[2]


def test_reach_interpolates_between_evaluations():
    curve = Curve("v", flops=[0, 10, 20, 30, 40], seconds=[0, 1, 2, 3, 4],
                  loss=[9.0, 5.0, 4.0, 3.0, 2.0], stage=["a", "a", "b", "b", "b"])
    # stage "a" reaches 5.0 never below 4.5; stage b crosses 3.5 halfway between 20 and 30
    assert reach(curve, 4.5, "a") is None
    assert reach(curve, 3.5, "b") == pytest.approx((25.0, 2.5))
    assert reach(curve, 4.0, "b") == (20, 2)  # its first point already reaches it


@pytest.mark.parametrize("big_spans, stored", [
    ({"local:1": [[50.0, 80.0]], "local:2": [[100.0, 140.0]]}, None),  # two local attempts
    ({"17": [[50.0, 80.0], [100.0, 140.0]]}, None),  # one SLURM job, requeued: two runs
    # a state file from before a job's runs were kept apart (job id -> [start, end])
    ({"local:1": [[50.0, 80.0]], "local:2": [[100.0, 140.0]]},
     {"local:1": [50.0, 80.0], "local:2": [100.0, 140.0]}),
])
def test_an_interrupted_run_counts_the_time_its_attempts_ran_and_no_pause(tmp_path, big_spans,
                                                                          stored):
    """A stage resumed after a pause: a step evaluated again keeps its last point, and seconds add
    up the time the attempts (or a requeued job's runs) ran, the earlier one's included, never the
    pause."""
    state = RunState(str(tmp_path), "recipe.yaml", "local", [
        StageState("big", spans=big_spans), StageState("small", spans={"18": [[1000.0, 1030.0]]})])
    if stored is not None:
        state.save()
        data = json.loads(state.path.read_text())
        data["stages"][0]["spans"] = stored
        state.path.write_text(json.dumps(data))
        state = RunState.load(tmp_path)
        assert state.stages[0].spans == big_spans
    records = {"big": [(10, 5.0, 1.0, 70.0),  # the first attempt; the second evaluates it again
                       (10, 4.5, 1.0, 110.0), (20, 4.0, 2.0, 140.0)],
               "small": [(10, 3.9, 3.0, 1030.0)]}
    for stage, rows in records.items():
        stage_dir(tmp_path, stage).mkdir(parents=True)
        (stage_dir(tmp_path, stage) / "metrics.jsonl").write_text("".join(
            json.dumps(dict(step=step, val_loss=loss, flops=flops, time=t)) + "\n"
            for step, loss, flops, t in rows))
    curve = curve_of(tmp_path, state, "vcycle")
    assert (curve.loss, curve.flops, curve.seconds, curve.stage) == (
        [4.5, 4.0, 3.9], [1.0, 2.0, 3.0], [40.0, 70.0, 100.0], ["big", "big", "small"])


def test_compare_reports_savings_against_the_baseline():
    baseline = Curve("baseline", flops=[0, 50, 100], seconds=[0, 5, 10], loss=[9, 4, 3])
    vcycle = Curve("v", flops=[10, 40, 60, 80], seconds=[2, 4, 7, 9], loss=[6, 5, 3.5, 2.5],
                   stage=["pre", "post", "post", "post"])
    result = compare(baseline, vcycle, "post")
    assert result["reached"] and result["flops_to_reach"] == pytest.approx(70.0)
    assert result["flops_saving_pct"] == pytest.approx(30.0)
    assert result["wallclock_saving_pct"] == pytest.approx(20.0)

    never = compare(baseline, Curve("w", [10, 20], [1, 2], [8, 7], ["post", "post"]), "post")
    assert not never["reached"] and never["flops_saving_pct"] is None


def test_comparisons_of_one_architecture_share_their_baseline_runs(tmp_path):
    """The 2- and 3-level comparisons of an architecture train the same baseline recipe under the
    same run name (so the second reuses the first's sweep and frontiers); GPT's differ from BERT's.
    Their V-cycles differ in the levels: gpt-3level-depth's bottom keeps the middle's width."""
    runs = {}

    class Recorder(Protocol):
        def run(self, name, recipe, baseline):
            parsed = recipe_from_dict(variant(recipe, name), name)
            runs.setdefault(name, []).append(recipe_dict(as_run(parsed, tmp_path)))
            return None, None

    for recipe in comparisons(SCALES["small"], list(COMPARISONS)):
        Recorder(tmp_path, {}).baseline(recipe, 2e-3, 0.5, 1234)
    assert sorted(runs) == ["bert-baseline-lr0.002-b0.5-s1234", "gpt-baseline-lr0.002-b0.5-s1234"]
    for name, recipes in runs.items():
        assert len(recipes) == (3 if name.startswith("gpt") else 2), name
        assert all(recipe == recipes[0] for recipe in recipes), name
        assert recipes[0]["schedule"]["baseline_steps"] == \
            SCALES["small"].baseline_steps(recipes[0]["model"]["arch"]) // 2
    shapes = {recipe["name"]: [(m.num_layers, m.hidden_size) for m in recipe_from_dict(
        recipe, recipe["name"]).level_models()]
        for recipe in comparisons(SCALES["small"], list(COMPARISONS))}
    assert shapes == {"gpt-2level": [(4, 128), (2, 64)], "bert-2level": [(4, 128), (2, 64)],
                      "gpt-3level": [(4, 128), (2, 64), (1, 32)],
                      "bert-3level": [(4, 128), (2, 64), (1, 32)],
                      "gpt-3level-depth": [(4, 128), (2, 64), (1, 64)]}


def synthetic_sweep(tmp_path: Path, best_lr, best_warmup: int,
                    warmup_weight: float = 0.1, second_pass: bool = False) -> list[dict]:
    """The GPT baseline sweep over a synthetic loss, least at ``best_lr`` (a number, or a function
    of the warm-up) and ``best_warmup``, the warm-up's term weighted by ``warmup_weight``."""
    (recipe,) = comparisons(SCALES["small"], ["gpt-2level"])
    assert (recipe["schedule"]["lr"][0], recipe["training"]["warmup_steps"]) == (2e-3, 30)

    class Sweep(Protocol):
        def baseline(self, recipe, lr, budget, seed, warmup=None):
            warmup = recipe["training"]["warmup_steps"] if warmup is None else warmup
            lr_star = best_lr(warmup) if callable(best_lr) else best_lr
            loss = 4 + abs(math.log2(lr / lr_star)) + \
                abs(math.log2((warmup + 1) / (best_warmup + 1))) * warmup_weight
            return Curve("b", flops=[1.0], seconds=[1.0], loss=[loss])

    return Sweep(tmp_path, {}, second_pass=second_pass).sweep_baseline(recipe)


def test_the_baseline_sweep_brackets_its_best_lr_then_its_best_warmup(tmp_path):
    """LRs a factor 2 apart until the best is inside, the half-steps beside it; then warm-ups at
    that LR a factor 2 apart until the best is inside or a quarter of the steps (300), and the
    LR's half-steps again at that warm-up: here the loss is least at LR 4e-3 and 480 warm-up
    steps, from the recipe's 2e-3 and 30."""
    sweep = synthetic_sweep(tmp_path, 4e-3, 480)
    tried = [(r["lr"], r["warmup"]) for r in sweep]
    assert tried == [(1e-3, 30), (2e-3, 30), (0.00283, 30), (0.00283, 240), (4e-3, 15),
                     (4e-3, 30), (4e-3, 60), (4e-3, 120), (4e-3, 240), (0.00566, 30),
                     (0.00566, 240), (8e-3, 30)]
    assert [r["refined"] for r in sweep] == \
        [False, False, True, True] + [False] * 5 + [True, True, False]
    assert [(r["lr"], r["warmup"]) for r in sweep if r["best"]] == [(4e-3, 240)]


def test_a_refined_best_lr_gets_the_warmups_and_its_own_half_steps(tmp_path):
    """Least loss at LR 2.9e-3 and 60 warm-up steps: the half-step 2.83e-3 beats the ladder's
    4e-3, the warm-ups are tried at it (60 inside: 15, 30, 60, 120), then the LRs a half-step
    either side of it (2e-3, 4e-3) at 60."""
    sweep = synthetic_sweep(tmp_path, 2.9e-3, 60)
    assert [(r["lr"], r["warmup"], r["refined"]) for r in sweep] == [
        (1e-3, 30, False), (2e-3, 30, False), (2e-3, 60, True), (0.00283, 15, False),
        (0.00283, 30, True), (0.00283, 60, False), (0.00283, 120, False), (4e-3, 30, False),
        (4e-3, 60, True), (0.00566, 30, True), (8e-3, 30, False)]
    assert [(r["lr"], r["warmup"]) for r in sweep if r["best"]] == [(0.00283, 60)]


def test_the_second_lr_pass_extends_while_its_best_is_at_an_end(tmp_path):
    """A longer warm-up moves the best LR up (2.9e-3 below 240 warm-up steps, 5e-3 from 240): at
    the best warm-up (240) the half-steps 2e-3, 2.83e-3, 4e-3 leave the best at their upper end,
    so the pass goes on a half-step at a time (5.66e-3, 8e-3) until one brackets it."""
    sweep = synthetic_sweep(tmp_path, lambda warmup: 2.9e-3 if warmup < 240 else 5e-3, 300,
                            warmup_weight=1.0)
    at_240 = sorted(r["lr"] for r in sweep if r["warmup"] == 240)
    assert at_240 == [2e-3, 0.00283, 4e-3, 0.00566, 0.008]
    assert [(r["lr"], r["warmup"]) for r in sweep if r["best"]] == [(0.00566, 240)]


def test_the_second_pass_adds_finer_steps_around_the_best(tmp_path):
    """Least loss at LR 4.4e-3 and 339 warm-up steps: the first pass ends at (4e-3, 240); the
    second pass keeps its runs and adds the LR's quarter-steps (3.36e-3, 4.76e-3) and the
    warm-up's half-steps (170, 339) around that best: 4 more runs, and the best moves to
    (4e-3, 339)."""
    first = synthetic_sweep(tmp_path, 4.4e-3, 339)
    assert [(r["lr"], r["warmup"]) for r in first if r["best"]] == [(4e-3, 240)]
    sweep = synthetic_sweep(tmp_path, 4.4e-3, 339, second_pass=True)
    second = {(r["lr"], r["warmup"]) for r in sweep if r["second_pass"]}
    assert second == {(0.00336, 240), (0.00476, 240), (4e-3, 170), (4e-3, 339)}
    assert {(r["lr"], r["warmup"]) for r in sweep} - second == \
        {(r["lr"], r["warmup"]) for r in first}
    assert [(r["lr"], r["warmup"]) for r in sweep if r["best"]] == [(4e-3, 339)]


def test_unknown_comparison_is_named():
    with pytest.raises(ConfigError, match="no comparison gpt-4level; there are gpt-2level"):
        comparisons(SCALES["small"], ["gpt-2level", "gpt-4level"])


def test_the_vcycle_search_turns_knobs_of_its_best_trial():
    """Greedy, in rounds of two: each trial of a round turns the next knob of the best trial before
    the round, and one that saves more is kept; a turn that undoes a kept knob repeats a tried
    recipe and is passed over; as many trials as asked, in further passes over the knobs once
    every knob has turned."""
    (tuned,) = comparisons(SCALES["small"], ["gpt-2level"])
    final, (lr0, small) = tuned["schedule"]["decoalesce_steps"][0], tuned["schedule"]["lr"]
    rounds = []

    def evaluate(batch):  # saves more with a shorter final stage and a lower small LR
        rounds.append([name for name, _ in batch])
        results = []
        for name, changes in batch:
            recipe = variant(tuned, name, **changes)["schedule"]
            saving = (final - recipe["decoalesce_steps"][0]) / 10 + \
                (small - recipe["lr"][1]) * 1e3 - abs(lr0 - recipe["lr"][0]) * 1e4
            results.append(dict(compute_saving_pct=saving, vcycle_final_loss=4.0))
        return results

    trials, best = greedy_trials(tuned, 5, evaluate)
    kept = "final-x0.8_small-lr-x0.5"
    assert rounds == [["default", "final-x0.8"], ["final-x0.8_small-lr-x0.5",
                                                  "final-x0.8_small-lr-x2"], [f"{kept}_lr-x0.5"]]
    assert [t["trial"] for t in trials] == [name for batch in rounds for name in batch]
    assert [t["trial"] for t in trials if t["best"]] == [kept]
    assert best == dict(schedule__decoalesce_steps=[final * 4 // 5],
                        schedule__lr=[lr0, small / 2])
    assert trials[2]["changes"] == {"schedule.decoalesce_steps": [final * 4 // 5],
                                    "schedule.lr": [lr0, small / 2]}
    # the warm-up knob lengthens E_a (60 steps) to hold the doubled warm-up (60), a valid recipe
    warm = dict(vcycle_knobs(tuned))["warmup-x2"]
    assert warm == dict(training__warmup_steps=60, schedule__coalesce_steps=[120])
    recipe_from_dict(variant(tuned, "warm", **warm), "warm").validate()
    # the de-coalesced stage's warm-up is a fifth of that stage, which holds it
    final_warm = dict(vcycle_knobs(tuned))["final-warmup"]
    assert final_warm == dict(schedule__decoalesce_warmup_steps=[final // 5])
    recipe_from_dict(variant(tuned, "final-warm", **final_warm), "final-warm").validate()
    # past the last knob, the round goes on into a second pass (its "default" is the kept trial,
    # passed over), turning the knobs again from the best so far
    rounds.clear()
    trials, best = greedy_trials(tuned, 14, evaluate)
    assert len({t["trial"] for t in trials}) == 14 and all(len(r) == 2 for r in rounds)
    assert rounds[4] == [f"{kept}_bottom-x0.5", f"{kept}_bottom-x2"]
    assert rounds[-1] == [f"{kept}_final-x0.8", f"{kept}_small-lr-x0.5"]
    assert best == dict(schedule__decoalesce_steps=[final * 4 // 5 * 4 // 5],
                        schedule__lr=[lr0, small / 2])
    # a turn the recipe cannot take (a V-cycle longer than its sample stream) is passed over
    steps = sum(tuned["schedule"][k][0] for k in ("coalesce_steps", "decoalesce_steps")) + \
        tuned["schedule"]["bottom_steps"]
    short = variant(tuned, tuned["name"], training__data_samples=steps * 16)
    rounds.clear()
    trials, _ = greedy_trials(short, 14, evaluate)
    assert len(trials) == 14 and not any("bottom-x2" in t["trial"] for t in trials)
    assert rounds[4] == [f"{kept}_bottom-x0.5", f"{kept}_warmup-x2"]


def test_the_middle_knob_lengthens_the_middle_level_within_the_sample_stream():
    """3 levels only: the middle level's stage at 4x its steps; the final stage gives up only the
    steps the sample stream lacks, and a cycle the stream cannot hold at all is refused."""
    (two,) = comparisons(SCALES["small"], ["gpt-2level"])
    assert "middle-x4" not in dict(vcycle_knobs(two))
    (three,) = comparisons(SCALES["small"], ["gpt-3level-depth"])
    s, stream = three["schedule"], three["training"]["data_samples"] // 16
    (final, middle), others = s["decoalesce_steps"], sum(s["coalesce_steps"]) + s["bottom_steps"]
    assert others + final + 4 * middle <= stream  # room enough: the final stage keeps its steps
    assert dict(vcycle_knobs(three))["middle-x4"] == dict(
        schedule__decoalesce_steps=[final, 4 * middle])
    longer = variant(three, "longer", schedule__bottom_steps=2 * s["bottom_steps"])
    knob = dict(vcycle_knobs(longer))["middle-x4"]
    short_final = stream - others - s["bottom_steps"] - 4 * middle
    assert 0 < short_final < final and knob == dict(
        schedule__decoalesce_steps=[short_final, 4 * middle])
    assert valid(variant(longer, "fits", **knob))
    full = variant(three, "full",  # the stream holds all but the final stage, which gets 0 steps
                   schedule__bottom_steps=stream - sum(s["coalesce_steps"]) - 4 * middle)
    assert not valid(variant(full, "over", **dict(vcycle_knobs(full))["middle-x4"]))


def test_once_a_call_fails_no_further_call_starts(tmp_path):
    """--jobs: a run that fails (or was stopped by a signal) ends the protocol; the runs waiting
    for a slot never start, the ones running end first, and the error is the failed run's."""
    started, ended = [], []

    def call(i: int, seconds: float, fails: bool = False) -> int:
        started.append(i)
        time.sleep(seconds)
        ended.append(i)
        if fails:
            raise RuntimeError(f"run {i} did not complete")
        return i

    protocol = Protocol(tmp_path, {}, jobs=2)
    assert protocol.concurrently([partial(call, i, 0.01 * (3 - i)) for i in range(3)]) == [0, 1, 2]
    started.clear()
    ended.clear()
    with pytest.raises(RuntimeError, match="run 0 did not complete"):
        protocol.concurrently([partial(call, 0, 0.05, fails=True), partial(call, 1, 0.5),
                               partial(call, 2, 0), partial(call, 3, 0)])
    assert started == [0, 1] and sorted(ended) == [0, 1]


@pytest.mark.slow
def test_runs_save_periodically_and_how_often_is_not_part_of_a_run(tmp_path, monkeypatch):
    """A protocol run saves every SAVE_INTERVAL steps (a kill without a signal loses at most
    those), which changes none of its numbers: the interval stays out of the run's ledger key, and
    a run directory written under another interval is reused, not refused or trained again."""
    (recipe,) = comparisons(SCALES["quick"], ["gpt-2level"])
    out, steps = tmp_path / "out", SCALES["quick"].baseline_steps("gpt")
    data = prepare_data([recipe], out)
    monkeypatch.setattr(savings, "SAVE_INTERVAL", 10)
    protocol = Protocol(out, data, ledger=RunLedger(tmp_path / "ledger"))
    curve = protocol.baseline(recipe, 4e-3, 1.0, 1234)
    name = baseline_name(recipe, 4e-3, 1.0, 1234, recipe["training"]["warmup_steps"])
    checkpoints = stage_dir(out / "runs" / name, "baseline")
    assert sorted(p.name for p in checkpoints.glob("iter_*")) == \
        [f"iter_{step:07d}" for step in (10, 20, 30, steps)]
    assert "save_interval" not in protocol.entries[name].recipe

    monkeypatch.setattr(savings, "SAVE_INTERVAL", 0)
    metrics = checkpoints / "metrics.jsonl"
    written = metrics.stat().st_mtime_ns
    assert Protocol(out, data).baseline(recipe, 4e-3, 1.0, 1234) == curve
    assert metrics.stat().st_mtime_ns == written


@pytest.mark.slow
def test_a_sigterm_stops_the_protocol_which_says_how_to_continue(tmp_path):
    """SIGTERM (``mlmega cancel``) while runs train: the protocol stops (no further run: see
    test_once_a_call_fails_no_further_call_starts), says how to continue, and exits with the code
    of a stopped run (3)."""
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, str(ROOT / "benchmarks" / "savings.py"), "--scale",
                             "quick", "--jobs", "2", "--out", str(out)], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 300
        while len(list(out.glob("runs/*/stages/*/metrics.jsonl"))) < 2:
            assert time.monotonic() < deadline and proc.poll() is None
            time.sleep(0.2)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 3, err[-2000:]
    assert "stopped by a signal; it saved; finished runs are kept" in err


@pytest.mark.slow
def test_a_sigterm_while_no_run_trains_stops_the_protocol_at_its_next_run(tmp_path):
    """SIGTERM while no run of the protocol trains (here at --jobs 1, waiting for a run another
    process holds) is not the signal's default, a silent death: the protocol stops at its next
    run, which trains nothing, with the same message and code (3)."""
    (recipe,) = comparisons(SCALES["quick"], ["gpt-2level"])
    first = baseline_name(recipe, recipe["schedule"]["lr"][0] * 0.5, 1.0, SEEDS[0],
                          recipe["training"]["warmup_steps"])  # the sweep's first run
    out = tmp_path / "out"
    run_dir = out / "runs" / first
    run_dir.mkdir(parents=True)
    hold = ("import sys, time\nfrom mlmega.vcycle.lock import RunLock\n"
            "with RunLock(sys.argv[1], 'test'):\n"
            "    print('held', flush=True)\n    time.sleep(600)\n")
    holder = subprocess.Popen([sys.executable, "-c", hold, str(run_dir)], stdout=subprocess.PIPE,
                              text=True)
    proc = None
    try:
        assert holder.stdout.readline() == "held\n"
        proc = subprocess.Popen([sys.executable, str(ROOT / "benchmarks" / "savings.py"),
                                 "--scale", "quick", "--jobs", "1", "--out", str(out)], cwd=ROOT,
                                env={**os.environ, "PYTHONUNBUFFERED": "1"},
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for line in proc.stdout:  # until the protocol waits for the held run
            if line.strip() == f"== {first}":
                break
        time.sleep(1)
        proc.send_signal(signal.SIGTERM)
        time.sleep(1)
        assert proc.poll() is None, "the protocol waits for the run, not killed by the signal"
        holder.kill()
        output, _ = proc.communicate(timeout=120)
    finally:
        holder.kill()
        if proc is not None:
            proc.kill()
    assert proc.returncode == 3, output[-2000:]
    assert f"{first}: stopped by a signal; it saved; finished runs are kept" in output
    assert not list(run_dir.glob("stages/*/metrics.jsonl")), "the held run trained nothing"


@pytest.mark.slow
def test_quick_protocol_writes_a_consistent_report_and_reuses_its_runs(tmp_path):
    """The whole protocol at toy scale: sweeps, frontier, seeds; the report's savings follow from
    its own frontier numbers; with --jobs 2, runs train side by side; a second invocation trains
    nothing (every run is reused), nor does a third on a fresh --out with the first's --ledger
    (every run is in it)."""
    ledger = tmp_path / "ledger"

    def protocol(out: Path, timeout: int, *options: str) -> dict:
        command = [sys.executable, str(ROOT / "benchmarks" / "savings.py"), "--scale", "quick",
                   "--out", str(out), "--ledger", str(ledger), *options]
        proc = subprocess.run(command, capture_output=True, text=True, timeout=timeout, cwd=ROOT)
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
        return json.loads((out / "report.json").read_text())["comparisons"][0]

    out = tmp_path / "out"
    protocol(out, 1800, "--jobs", "2")
    gpt = check_report(out)
    spans = sorted(run_span(run) for run in (out / "runs").iterdir())
    assert any(later[0] < earlier[1] for earlier, later in zip(spans, spans[1:])), \
        "with --jobs 2, some run starts before the run started just before it ends"
    assert gpt["machines"] == [this_machine()]
    runs = sorted(p.name for p in (out / "runs").iterdir())
    assert sorted(p.stem for p in ledger.iterdir()) == runs

    metrics = sorted((out / "runs").glob("*/stages/*/metrics.jsonl"))
    before = {m: m.stat().st_mtime_ns for m in metrics}
    assert protocol(out, 600)["seeds"] == gpt["seeds"]
    assert {m: m.stat().st_mtime_ns for m in metrics} == before

    fresh = tmp_path / "fresh"
    again = protocol(fresh, 600)
    assert not (fresh / "runs").exists()
    assert again["seeds"] == gpt["seeds"] and again["baseline_copies_spread"] == \
        gpt["baseline_copies_spread"] and again["vcycle_trials"] == gpt["vcycle_trials"]


def run_span(run_dir: Path) -> tuple[float, float]:
    """When the run's first stage started and its last one ended (its state.json)."""
    state = json.loads((run_dir / "state.json").read_text())
    return (min(stage["started"] for stage in state["stages"]),
            max(stage["ended"] for stage in state["stages"]))


def check_report(out: Path) -> dict:
    """The report's structure, and its savings recomputed from its own frontier numbers."""
    report = json.loads((out / "report.json").read_text())
    (gpt,) = report["comparisons"]
    sweep = gpt["baseline_sweep"]
    w0 = comparisons(SCALES["quick"], ["gpt-2level"])[0]["training"]["warmup_steps"]
    ladder = [r for r in sweep if not r["refined"] and r["warmup"] == w0]
    lrs = [r["lr"] for r in ladder]
    assert len(lrs) >= 4 and all(b == pytest.approx(2 * a) for a, b in zip(lrs, lrs[1:]))
    top = min(ladder, key=lambda r: r["final_loss"])
    assert top not in (ladder[0], ladder[-1]) or len(ladder) == MAX_SWEEP
    assert sorted(r["lr"] for r in sweep if r["refined"] and r["warmup"] == w0) == \
        pytest.approx([top["lr"] / 2 ** 0.5, top["lr"] * 2 ** 0.5], rel=5e-3)
    lr_best = min((r for r in sweep if r["warmup"] == w0), key=lambda r: r["final_loss"])["lr"]
    warmups = sorted(r["warmup"] for r in sweep if r["lr"] == lr_best)
    assert all(r["lr"] == lr_best or r["refined"] for r in sweep if r["warmup"] != w0)
    assert len(warmups) >= 2
    best = [r for r in sweep if r["best"]]
    assert len(best) == 1 and best[0]["final_loss"] == min(r["final_loss"] for r in sweep)
    assert (best[0]["lr"], best[0]["warmup"]) == (gpt["best_lr"], gpt["best_warmup"])
    assert len(gpt["vcycle_trials"]) == len(sweep), "as many V-cycle trials as baseline runs"
    assert [r["seed"] for r in gpt["seeds"]] == report["seeds"] and len(report["seeds"]) >= 3
    for r in gpt["seeds"]:
        assert [p["budget"] for p in r["frontier"]] == list(BUDGETS)
        flops = [(p["flops"], p["final_loss"]) for p in r["frontier"]]
        assert flops[-1][0] == pytest.approx(3 * flops[0][0])  # 150% vs 50% of the steps
        envelope = r["frontier_flops"]  # every evaluation of every budget: no weaker than ends
        assert all(cost_to_reach(envelope, loss).value <= cost for cost, loss in flops)
        expected = saving(r["vcycle_flops"], r["vcycle_final_loss"], envelope)
        assert r["compute_saving_pct"] == pytest.approx(100 * expected.value)
        assert r["compute_saving_bound"] == expected.bound
    values = [r["compute_saving_pct"] for r in gpt["seeds"]]
    assert gpt["headline"]["compute"]["min"] == min(values)
    assert gpt["headline"]["compute"]["mean"] == pytest.approx(sum(values) / len(values))
    assert (out / "savings.png").stat().st_size > 10_000
    assert "Baseline sweep (LRs, then warm-ups" in (out / "report.md").read_text()
    return gpt
