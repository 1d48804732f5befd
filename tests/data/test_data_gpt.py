"""megatron-core GPTDataset over prepared data, on CPU, without torch.distributed."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mlmega.config.errors import ConfigError
from mlmega.data import build_gpt_datasets, check_dataset_helpers, load_indexed, load_tokenizer, read_meta


def test_samples_have_sequence_length_and_valid_ids(gpt_dir):
    vocab = load_tokenizer(gpt_dir).vocab_size
    train, val = build_gpt_datasets(gpt_dir, seq_length=32, seed=5, train_samples=500, val_samples=20)
    assert len(train) >= 500 and len(val) >= 20
    for ds in (train, val):
        for i in range(0, len(ds), max(1, len(ds) // 50)):
            s = ds[i]
            assert s["tokens"].shape == s["labels"].shape == s["loss_mask"].shape == (32,)
            assert s["attention_mask"].shape == (1, 32, 32)
            assert 0 <= int(s["tokens"].min()) and int(s["tokens"].max()) < vocab
            assert 0 <= int(s["labels"].min()) and int(s["labels"].max()) < vocab


def test_labels_are_tokens_shifted_by_one(gpt_dir):
    train, _ = build_gpt_datasets(gpt_dir, seq_length=16, seed=5)
    s = train[3]
    assert torch.equal(s["tokens"][1:], s["labels"][:-1])


def test_one_epoch_covers_the_training_tokens(gpt_dir):
    meta = read_meta(gpt_dir)
    train, val = build_gpt_datasets(gpt_dir, seq_length=16, seed=5)
    # one epoch: floor((tokens - 1) / seq_length) samples (each sample reads seq_length + 1 tokens)
    assert len(train) == (meta["splits"]["train"]["tokens"] - 1) // 16
    assert len(val) == (meta["splits"]["val"]["tokens"] - 1) // 16


def test_deterministic_in_seed_and_cache_reused(gpt_dir):
    a, _ = build_gpt_datasets(gpt_dir, seq_length=24, seed=11, train_samples=100, val_samples=5)
    b, _ = build_gpt_datasets(gpt_dir, seq_length=24, seed=11, train_samples=100, val_samples=5)
    c, _ = build_gpt_datasets(gpt_dir, seq_length=24, seed=12, train_samples=100, val_samples=5)
    first = [a[i]["tokens"] for i in range(20)]
    assert all(torch.equal(x, b[i]["tokens"]) for i, x in enumerate(first))
    assert not all(torch.equal(x, c[i]["tokens"]) for i, x in enumerate(first))
    cache = gpt_dir / "index-cache"
    assert cache.is_dir() and any(cache.rglob("*shuffle_index.npy"))


def test_indexed_dataset_matches_meta(gpt_dir):
    meta = read_meta(gpt_dir)
    for split in ("train", "val"):
        ds = load_indexed(gpt_dir / split)
        assert len(ds) == meta["splits"][split]["sequences"] == meta["splits"][split]["documents"]
        assert int(np.sum(ds.sequence_lengths)) == meta["splits"][split]["tokens"]


def test_helpers_are_available_without_compiling():
    check_dataset_helpers()  # the prebuilt extension of the wheel imports


def test_bert_directory_is_refused(bert_dir):
    with pytest.raises(ConfigError, match="prepared with --arch bert"):
        build_gpt_datasets(bert_dir, seq_length=16)


def test_missing_prefix_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match=r"train\.bin: no such file"):
        load_indexed(tmp_path / "train")


def test_same_samples_with_and_without_a_process_group(gpt_dir, tmp_path, monkeypatch):
    """No torch.distributed at all, and an initialized (gloo, world size 1) group where megatron
    takes its rank-0-builds-then-barrier path, give the same samples."""
    kw = dict(seq_length=20, seed=9, train_samples=50, val_samples=5)
    with monkeypatch.context() as m:  # another test module may have initialized a group already
        m.setattr(torch.distributed, "is_initialized", lambda: False)
        plain, _ = build_gpt_datasets(gpt_dir, cache_dir=tmp_path / "plain", **kw)
    own_group = not torch.distributed.is_initialized()
    if own_group:
        torch.distributed.init_process_group("gloo", init_method=f"file://{tmp_path}/store", rank=0, world_size=1)
    try:
        grouped, _ = build_gpt_datasets(gpt_dir, cache_dir=tmp_path / "grouped", **kw)
    finally:
        if own_group:
            torch.distributed.destroy_process_group()
    assert len(grouped) == len(plain)
    assert all(torch.equal(plain[i]["tokens"], grouped[i]["tokens"]) for i in range(len(plain)))
