"""BERT with ``bert_binary_head``: the sentence-order head trains with Megatron-LM's loss (masked
LM + cross-entropy of the binary logits against ``is_random``): its weights and the pooler's move."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as nnf

from mlmega.checkpoint.formats import load_full_state, save_full_state
from mlmega.checkpoint.layout import ShardLayout
from mlmega.config.model import ModelConfig
from mlmega.models.build import build_model
from mlmega.models.state import load_full_state_dict
from mlmega.config.train import TrainConfig
from mlmega.train.data import Batches, open_datasets
from tests.helpers import init_model_state
from tests.train.conftest import losses, model_section, run_stage, stage_config

pytestmark = [pytest.mark.slow]

HEAD = ("binary_head.weight", "binary_head.bias", "pooler.dense.weight", "pooler.dense.bias")


def first_batch_losses(cfg: TrainConfig, state) -> tuple[float, float]:
    """(masked-LM loss, sentence-order loss) of ``state`` on the first training batch."""
    train_set, _ = open_datasets("bert", cfg.data_dir, cfg.seq_length, cfg.seed,
                                 cfg.last_sample, cfg.global_batch_size)
    model = build_model(cfg.model)
    load_full_state_dict(model, state)
    model.eval()
    micro = Batches(train_set, cfg.global_batch_size, cfg.micro_batch_size, 1, 0).microbatches(0)
    lm = sop = 0.0
    with torch.no_grad():
        for batch in micro:
            per_token, logits = model(batch["text"], batch["padding_mask"],
                                      tokentype_ids=batch["types"],
                                      lm_labels=batch["labels"].clamp(min=0))
            mask = batch["loss_mask"]
            lm += ((per_token * mask).sum() / mask.sum()).item()
            sop += nnf.cross_entropy(logits.view(-1, 2), batch["is_random"]).item()
    return lm / len(micro), sop / len(micro)


def test_binary_head_trains_with_the_sentence_order_loss(tmp_path, prepared, model_parallel):
    section = model_section("bert", bert_binary_head=True)
    cfg = ModelConfig.from_dict(section)
    init = init_model_state(cfg, seed=0)
    assert set(HEAD) <= set(init)
    save_full_state(init, ShardLayout(cfg), tmp_path / "init")
    path = stage_config(tmp_path, "sop", prepared["bert"], "bert", model=section, steps=3,
                        optimizer=dict(lr=1e-2, warmup_steps=0),
                        init=dict(checkpoint=str(tmp_path / "init"), op="reshard"))
    run_stage(path)
    lm, sop = first_batch_losses(TrainConfig.from_yaml(path), init)
    assert sop > 0.3, "the sentence-order loss of an untrained head is near ln 2"
    assert losses(tmp_path / "sop")[1] == pytest.approx(lm + sop, rel=1e-4)
    trained, _ = load_full_state(tmp_path / "sop")
    for name in HEAD:
        assert not torch.allclose(trained[name], init[name]), f"{name} did not train"
