"""BERT MLM samples: frame, masking statistics, special tokens, determinism."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mlmega.data import BertMLMDataset, load_tokenizer

SEQ = 64


@pytest.fixture(scope="module")
def ds(bert_dir) -> BertMLMDataset:
    return BertMLMDataset.from_prepared(bert_dir, "train", SEQ, seed=3, num_samples=2000)


def test_frame_types_and_padding(ds):
    tok = ds.tokenizer
    for i in range(0, 2000, 37):
        s = ds[i]
        text, types, pad = s["text"].numpy(), s["types"].numpy(), s["padding_mask"].numpy()
        assert text.shape == types.shape == pad.shape == s["labels"].shape == (SEQ,)
        n = int(pad.sum())
        assert pad[:n].all() and not pad[n:].any() and (text[n:] == tok.pad).all()
        seps = np.flatnonzero(text == tok.sep)
        assert text[0] == tok.cls and len(seps) == 2 and seps[1] == n - 1
        assert (types[: seps[0] + 1] == 0).all() and (types[seps[0] + 1 : n] == 1).all() and (types[n:] == 0).all()
        assert 0 <= text.min() and text.max() < tok.vocab_size


def test_masking_statistics(ds):
    tok = ds.tokenizer
    special = np.array(sorted(tok.special_ids))
    selected = candidates = as_mask = as_random = unchanged = 0
    for i in range(len(ds)):
        s = ds[i]
        text, labels = s["text"].numpy(), s["labels"].numpy()
        sel = labels != -100
        n_real = int(s["padding_mask"].sum())
        candidates += n_real - 3  # all but [CLS] and the two [SEP]
        selected += int(sel.sum())
        as_mask += int((text[sel] == tok.mask).sum())
        unchanged += int((text[sel] == labels[sel]).sum())
        as_random += int(((text[sel] != tok.mask) & (text[sel] != labels[sel])).sum())
        assert np.array_equal(s["loss_mask"].numpy() == 1, sel)
        # [MASK] appears only where a token was selected
        assert not (text[~sel] == tok.mask).any()
        # special positions are never selected and never replaced by a special id elsewhere
        assert not np.isin(labels[sel], special).any()
        assert not np.isin(text[sel & (text != tok.mask)], special).any()
    assert selected / candidates == pytest.approx(0.15, abs=0.01)
    assert as_mask / selected == pytest.approx(0.80, abs=0.02)
    assert as_random / selected == pytest.approx(0.10, abs=0.02)
    assert unchanged / selected == pytest.approx(0.10, abs=0.02)
    assert selected > 10_000  # enough draws for these tolerances (~5 standard deviations)


def test_sample_depends_only_on_seed_and_index(bert_dir, ds):
    twin = BertMLMDataset.from_prepared(bert_dir, "train", SEQ, seed=3, num_samples=2000)
    other = BertMLMDataset.from_prepared(bert_dir, "train", SEQ, seed=4, num_samples=2000)
    for i in (0, 7, 1999, 7):  # any order, repeated access
        assert all(torch.equal(v, twin[i][k]) for k, v in ds[i].items())
    assert not all(torch.equal(ds[i]["text"], other[i]["text"]) for i in range(10))


def test_sentence_order_and_lengths(ds):
    flags = [int(ds[i]["is_random"]) for i in range(400)]
    assert 0.4 < np.mean(flags) < 0.6
    lengths = ds.dataset.sequence_lengths
    for i in range(400):
        start, stop = ds.spans[i % len(ds.spans)]
        span_tokens = int(lengths[start:stop].sum())  # whole lines of one document
        s = ds[i]
        assert int(s["padding_mask"].sum()) == min(SEQ, span_tokens + 3)
        assert bool(s["truncated"]) == (span_tokens + 3 > SEQ)


def test_unmasked_sample_reads_as_text(bert_dir):
    tok = load_tokenizer(bert_dir)
    ds = BertMLMDataset.from_prepared(bert_dir, "val", 512, seed=0, mask_prob=1e-9)
    s = ds[0]
    text, labels = s["text"].numpy().copy(), s["labels"].numpy()
    sel = labels != -100
    assert sel.sum() == 1  # at least one token is always selected
    text[sel] = labels[sel]  # undo it
    n = int(s["padding_mask"].sum())
    decoded = tok.decode(text[1 : n - 1].tolist())
    assert "[SEP]" in decoded and "File " in decoded


def test_spans_cover_every_line_once_within_documents(ds):
    bounds = ds.dataset.document_indices
    starts, stops = ds.spans[:, 0], ds.spans[:, 1]
    assert starts[0] == 0 and stops[-1] == len(ds.dataset)
    assert np.array_equal(starts[1:], stops[:-1])  # contiguous, no line twice
    doc_of = np.searchsorted(bounds, np.arange(len(ds.dataset)), side="right") - 1
    assert np.array_equal(doc_of[starts], doc_of[stops - 1])  # a span never crosses a document boundary


def test_build_bert_datasets_pairs_train_and_val(bert_dir):
    from mlmega.data import build_bert_datasets, read_meta

    train, val = build_bert_datasets(bert_dir, SEQ, seed=3, train_samples=100)
    assert len(train) == 100 and len(val) == len(val.spans)
    assert len(val.dataset.document_indices) - 1 == read_meta(bert_dir)["splits"]["val"]["documents"]
