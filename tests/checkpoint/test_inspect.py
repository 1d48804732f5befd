"""``mlmega inspect``: architecture, layout, iteration and parameter count of either format."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from mlmega.checkpoint.formats import save_full_state
from mlmega.checkpoint.layout import ShardLayout
from mlmega.config.model import ModelConfig
from mlmega.models.params import num_parameters
from tests.helpers import make_model_state

CFG = ModelConfig(arch="bert", num_layers=4, hidden_size=32, num_attention_heads=4,
                  vocab_size=100, max_sequence_length=16, bert_binary_head=True)


@pytest.mark.parametrize("fmt", ["torch", "torch_dist"])
def test_inspect_describes_the_checkpoint(tmp_path, fmt, model_parallel):
    save_full_state(make_model_state(CFG, seed=0), ShardLayout(CFG, 2, 2), tmp_path / "ck",
                    iteration=12, fmt=fmt)
    proc = subprocess.run([sys.executable, "-m", "mlmega", "inspect", str(tmp_path / "ck"),
                           "--tensors", "--json"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    info = json.loads(proc.stdout)
    assert (info["format"], info["arch"], info["iteration"], info["tp"], info["pp"]) == \
        (fmt, "bert", 12, 2, 2)
    assert info["parameters"] == num_parameters(CFG)
    rows = {row["name"]: row for row in info["tensors"]}
    assert rows["encoder.layers.3.mlp.linear_fc1.weight"]["shape"] == [128, 32]
    assert rows["encoder.layers.3.mlp.linear_fc1.weight"]["pp_rank"] == 1
    assert rows["embedding.word_embeddings.weight"]["shape"] == [256, 32]  # padded for TP=2
    table = subprocess.run([sys.executable, "-m", "mlmega", "inspect", str(tmp_path / "ck"),
                            "--tensors"], capture_output=True, text=True, timeout=120)
    assert table.returncode == 0 and "linear_qkv" in table.stdout
