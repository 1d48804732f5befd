"""A small GPT checkpoint in both formats (TP=2, PP=2, iteration 3), written once per session:
tests that damage one copy it first (:func:`copy_of`)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from mlmega.config.model import ModelConfig

SMALL_GPT = ModelConfig(arch="gpt", num_layers=4, hidden_size=32, num_attention_heads=4,
                        vocab_size=100, max_sequence_length=16)


@pytest.fixture(scope="session")
def small_checkpoints(tmp_path_factory, model_parallel) -> dict[str, Path]:
    """{"torch": root, "torch_dist": root} of SMALL_GPT (seed 0) saved at TP=2, PP=2."""
    from mlmega.checkpoint.convert import save_full_state
    from mlmega.checkpoint.layout import ShardLayout
    from tests.helpers import make_model_state

    root = tmp_path_factory.mktemp("small-checkpoints")
    state = make_model_state(SMALL_GPT, seed=0)
    for fmt in ("torch", "torch_dist"):
        save_full_state(state, ShardLayout(SMALL_GPT, 2, 2), root / fmt, iteration=3, fmt=fmt)
    return {fmt: root / fmt for fmt in ("torch", "torch_dist")}


def copy_of(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst
