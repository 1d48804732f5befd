"""The run ledger: a finished run's curve and spreads, reused where its run directory is gone."""

from __future__ import annotations

import json

import pytest

from benchmarks.ledger import LedgerEntry, RunLedger, schemes_key
from benchmarks.savings import (SCALES, Curve, Protocol, baseline_name, comparisons, prepare_data,
                                recipe_key, variant)
from benchmarks.spread import checkpoint_spread
from mlmega.config.errors import ConfigError
from mlmega.vcycle.plan import plan_vcycle
from mlmega.vcycle.recipe import recipe_from_dict
from mlmega.vcycle.run import stage_dir


def test_an_entry_round_trips_and_another_recipes_entry_is_refused(tmp_path):
    ledger = RunLedger(tmp_path / "ledger")
    curve = Curve("baseline", flops=[1.5e9, 3e9], seconds=[0.1, 0.30000000000000004],
                  loss=[6.25, 5.125], stage=["baseline", "baseline"])
    ledger.put(LedgerEntry("run-a", "lr: 0.001\n", curve.to_dict(), {"baseline {}": 0.5}))
    assert ledger.get("run-b", "lr: 0.001\n") is None
    entry = ledger.get("run-a", "lr: 0.001\n")
    assert Curve(**entry.curve) == curve and entry.spreads == {"baseline {}": 0.5}
    assert [p.name for p in (tmp_path / "ledger").iterdir()] == ["run-a.json"]  # no temp left

    with pytest.raises(ConfigError, match=r"run-a\.json: recorded for another recipe"):
        ledger.get("run-a", "lr: 0.002\n")
    ledger.path("run-a").write_text('{"name": "run-a"')
    with pytest.raises(ConfigError, match=r"run-a\.json: not a ledger entry"):
        ledger.get("run-a", "lr: 0.001\n")


def test_the_protocol_takes_a_ledgered_run_without_training_it(tmp_path):
    """A run the ledger has (its recipe unchanged) is not trained: no run directory appears and
    its curve is the ledger's, and so is its spread."""
    (recipe,) = comparisons(SCALES["quick"], ["gpt-2level"])
    name = "gpt-baseline-lr0.004-b1-s1234"
    protocol = Protocol(tmp_path / "out", {}, ledger=RunLedger(tmp_path / "ledger"))
    planned = variant(recipe, name, levels=recipe["levels"][:1])
    curve = Curve(name, flops=[1.0, 2.0], seconds=[3.0, 4.0], loss=[7.0, 6.5],
                  stage=["baseline"] * 2)
    protocol.ledger.put(LedgerEntry(name, recipe_key(planned), curve.to_dict()))

    plan, got = protocol.run(name, planned, baseline=True)
    assert got == curve and plan.baseline.model.num_layers == recipe["model"]["num_layers"]
    assert not (tmp_path / "out").exists()

    schemes = plan.stages[-1].init.schemes
    entry = json.loads(protocol.ledger.path(name).read_text())
    entry["spreads"] = {f"baseline {schemes_key(schemes)}": 0.25}
    protocol.ledger.path(name).write_text(json.dumps(entry))
    protocol = Protocol(tmp_path / "out", {}, ledger=RunLedger(tmp_path / "ledger"))
    protocol.run(name, planned, baseline=True)
    assert protocol.spread(name, "baseline", schemes) == 0.25
    assert not (tmp_path / "out").exists()


def test_a_spread_the_ledger_lacks_trains_the_run_again_for_its_checkpoint(tmp_path):
    """On a new --out a ledgered run has no checkpoint: a spread its entry lacks trains the run
    again there and is measured on that checkpoint, as on the first --out's (training is
    deterministic); the entry gains the spread and keeps its curve."""
    (recipe,) = comparisons(SCALES["quick"], ["gpt-2level"])
    first, ledger = tmp_path / "first", RunLedger(tmp_path / "ledger")
    data = prepare_data([recipe], first)
    curve = Protocol(first, data, ledger=ledger).baseline(recipe, 4e-3, 1.0, 1234)
    name = baseline_name(recipe, 4e-3, 1.0, 1234, recipe["training"]["warmup_steps"])
    schemes = plan_vcycle(recipe_from_dict(recipe, "<quick>")).stages[-1].init.schemes
    measured = checkpoint_spread(stage_dir(first / "runs" / name, "baseline"), schemes)

    fresh = Protocol(tmp_path / "fresh", data, ledger=ledger)
    assert fresh.baseline(recipe, 4e-3, 1.0, 1234) == curve
    assert not (tmp_path / "fresh" / "runs").exists()
    assert fresh.spread(name, "baseline", schemes) == pytest.approx(measured, rel=1e-5)
    assert (tmp_path / "fresh" / "runs" / name / "state.json").exists()
    entry = json.loads(ledger.path(name).read_text())
    assert Curve(**entry["curve"]) == curve
    assert entry["spreads"] == {f"baseline {schemes_key(schemes)}": fresh.spread(name, "baseline",
                                                                                schemes)}
