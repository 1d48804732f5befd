"""The run ledger: a finished run's curve and spreads, reused where its run directory is gone."""

from __future__ import annotations

import json

import pytest

from benchmarks.ledger import LedgerEntry, RunLedger, schemes_key
from benchmarks.savings import SCALES, Curve, Protocol, comparisons, recipe_key, variant
from mlmega.config.errors import CheckpointError, ConfigError


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
    its curve is the ledger's. Its spread comes from the entry; one it lacks is measured on the
    run's checkpoint, which is gone here, so asking for it fails rather than inventing one."""
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
    with pytest.raises(CheckpointError, match="final: not a Megatron torch checkpoint"):
        protocol.spread(name, "final", schemes)
