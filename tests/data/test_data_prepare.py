"""Preparation: determinism, the document split, caching and re-preparation, output layout."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest

from mlmega.data import Tokenizer, load_indexed, open_corpus, prepare, split_documents

OUTPUTS = ["tokenizer.json", "train.bin", "train.idx", "val.bin", "val.idx"]


def _docs_of(prefix: str, tok: Tokenizer) -> list[str]:
    """Decode every GPT document of an indexed dataset (dropping its trailing EOD)."""
    ds = load_indexed(prefix)
    out = []
    for i in range(len(ds)):
        ids = ds[i].tolist()
        assert ids[-1] == tok.eod and tok.eod not in ids[:-1]
        out.append(tok.decode(ids[:-1]))
    return out


def test_same_inputs_give_identical_bytes_and_hash(corpus_dir, tmp_path, options):
    a = prepare(options(corpus_dir, tmp_path / "a"))
    b = prepare(options(corpus_dir, tmp_path / "b"))
    assert not a.cached and not b.cached
    for name in OUTPUTS:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name
    assert a.meta["content_hash"] == b.meta["content_hash"]
    assert a.meta["input_hash"] == b.meta["input_hash"]
    # meta.json holds no timestamp and no output path, so it is byte-identical too
    assert (tmp_path / "a" / "meta.json").read_text() == (tmp_path / "b" / "meta.json").read_text()


def test_split_is_disjoint_by_document_and_matches_fraction(corpus_dir, tmp_path, options):
    res = prepare(options(corpus_dir, tmp_path / "out", val_fraction=0.25))
    all_docs = list(open_corpus([str(corpus_dir / "*.txt")], doc_mode="paragraph").documents())
    assert len(all_docs) == 40 and len(set(all_docs)) == 40
    tok = Tokenizer.load(res.tokenizer_path)
    train, val = _docs_of(res.train_prefix, tok), _docs_of(res.val_prefix, tok)
    assert (len(train), len(val)) == (30, 10)  # round(0.25 * 40) documents held out
    assert set(train).isdisjoint(val)
    assert sorted(train + val) == sorted(all_docs)  # nothing lost, nothing altered
    splits = res.meta["splits"]
    assert splits["train"]["documents"] == 30 and splits["val"]["documents"] == 10
    train_ds = load_indexed(res.train_prefix)  # kept alive while its mmap-backed arrays are read
    assert splits["train"]["tokens"] == int(train_ds.sequence_lengths.sum())


@pytest.mark.parametrize("n,frac,expect", [(40, 0.25, 10), (960, 0.05, 48), (10, 0.01, 1), (3, 0.9, 2), (101, 0.5, 50)])
def test_split_documents_counts(n, frac, expect):
    mask = split_documents(n, frac, seed=3)
    assert mask.sum() == expect
    assert np.array_equal(mask, split_documents(n, frac, seed=3))  # deterministic in the seed


def test_split_depends_on_seed():
    assert not np.array_equal(split_documents(200, 0.1, seed=1), split_documents(200, 0.1, seed=2))


def test_rerun_is_cached(corpus_dir, tmp_path, options, caplog):
    out = tmp_path / "out"
    first = prepare(options(corpus_dir, out))
    mtimes = {n: (out / n).stat().st_mtime_ns for n in OUTPUTS + ["meta.json"]}
    with caplog.at_level(logging.INFO, logger="mlmega.data"):
        again = prepare(options(corpus_dir, out))
    assert again.cached and again.meta == first.meta
    assert "nothing to do" in caplog.text
    assert {n: (out / n).stat().st_mtime_ns for n in mtimes} == mtimes  # not one file rewritten


def test_changed_input_reprepares(corpus_dir, tmp_path, options):
    out = tmp_path / "out"
    first = prepare(options(corpus_dir, out))
    f = corpus_dir / "text_03.txt"
    f.write_text(f.read_text() + "\nA brand new closing paragraph.\n")
    second = prepare(options(corpus_dir, out))
    assert not second.cached
    assert second.meta["input_hash"] != first.meta["input_hash"]
    assert second.meta["content_hash"] != first.meta["content_hash"]
    assert second.meta["documents"] == first.meta["documents"] + 1
    assert prepare(options(corpus_dir, out)).cached


def test_changed_option_or_damaged_output_reprepares(corpus_dir, tmp_path, options):
    out = tmp_path / "out"
    first = prepare(options(corpus_dir, out))
    assert not prepare(options(corpus_dir, out, seed=8)).cached  # another split
    assert not prepare(options(corpus_dir, out, seed=7)).cached  # back: inputs differ from the last run
    (out / "val.bin").write_bytes(b"")
    fixed = prepare(options(corpus_dir, out))
    assert not fixed.cached and fixed.meta["content_hash"] == first.meta["content_hash"]


def test_no_temporary_files_left_and_meta_points_at_outputs(corpus_dir, tmp_path, options):
    out = tmp_path / "out"
    res = prepare(options(corpus_dir, out))
    assert sorted(p.name for p in out.iterdir()) == sorted(OUTPUTS + ["meta.json"])
    meta = json.loads((out / "meta.json").read_text())
    assert meta["tokenizer"]["path"] == "tokenizer.json"
    assert meta["vocab_size"] == Tokenizer.load(out / "tokenizer.json").vocab_size == res.meta["vocab_size"]
    assert meta["dtype"] == "uint16"
    for name, info in meta["files"].items():
        assert (out / name).stat().st_size == info["bytes"]


def test_bert_layout_one_sequence_per_line(corpus_dir, tmp_path, options):
    res = prepare(options(corpus_dir, tmp_path / "bert", arch="bert"))
    tok = Tokenizer.load(res.tokenizer_path)
    ds = load_indexed(res.train_prefix)
    docs = ds.document_indices
    assert len(docs) - 1 == res.meta["splits"]["train"]["documents"] == 30
    # every document is a paragraph of 3..7 lines, each line one sequence ending in a newline
    per_doc = np.diff(docs)
    assert per_doc.min() >= 3 and per_doc.max() <= 7
    first_doc = "".join(tok.decode(ds[i].tolist()) for i in range(docs[0], docs[1]))
    assert first_doc.startswith("File ") and first_doc.endswith("\n")
    all_ids = np.concatenate([ds[i] for i in range(len(ds))])
    assert not np.isin(all_ids, sorted(tok.special_ids)).any()  # no special token is stored


def test_hf_dataset_source(tmp_path, options):
    datasets = pytest.importorskip("datasets")
    rows = [f"Row {i} says hello to row {i + 1}.\nAnd a second line {i}." for i in range(20)] + ["", "   "]
    datasets.Dataset.from_dict({"body": rows, "n": list(range(22))}).save_to_disk(str(tmp_path / "ds"))
    res = prepare(options(tmp_path, tmp_path / "out", inputs=[], hf_dataset=str(tmp_path / "ds"),
                          text_field="body", doc_mode="auto", val_fraction=0.1))
    assert res.meta["documents"] == 20  # one per non-blank row
    assert res.meta["splits"]["val"]["documents"] == 2
    assert res.meta["source"]["kind"] == "hf"
    assert prepare(options(tmp_path, tmp_path / "out", inputs=[], hf_dataset=str(tmp_path / "ds"),
                           text_field="body", doc_mode="auto", val_fraction=0.1)).cached


def test_gpt2_vocab_and_merges_files(corpus_dir, tmp_path, options):
    trained = prepare(options(corpus_dir, tmp_path / "trained"))
    tok = Tokenizer.load(trained.tokenizer_path)
    files = tok.backend.model.save(str(tmp_path))  # -> vocab.json, merges.txt
    vocab, merges = sorted(files, key=lambda p: not p.endswith("vocab.json"))
    res = prepare(options(corpus_dir, tmp_path / "gpt2", vocab_file=vocab, merges_file=merges))
    assert res.meta["tokenizer"]["kind"] == "gpt2-files"
    assert Path(tmp_path / "gpt2" / "train.bin").read_bytes() == Path(tmp_path / "trained" / "train.bin").read_bytes()


def test_given_tokenizer_file(corpus_dir, tmp_path, options):
    trained = prepare(options(corpus_dir, tmp_path / "trained"))
    res = prepare(options(corpus_dir, tmp_path / "given", tokenizer=str(trained.tokenizer_path), seed=99))
    assert res.meta["tokenizer"]["kind"] == "file"
    assert Tokenizer.load(res.tokenizer_path).fingerprint == Tokenizer.load(trained.tokenizer_path).fingerprint


def test_jsonl_and_parquet_records_prepare_like_the_same_text(corpus_dir, tmp_path, options):
    """One record per paragraph (plus a null one, skipped): the prepared bytes equal those of the
    text files cut into paragraphs, whether the records come as JSONL or Parquet."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    docs = list(open_corpus([str(corpus_dir / "*.txt")], doc_mode="paragraph").documents())
    records = [{"body": doc, "id": i} for i, doc in enumerate(docs)] + [{"body": None, "id": -1}]
    half = len(records) // 2
    (tmp_path / "a.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records[:half]))
    pq.write_table(pa.Table.from_pylist(records[half:]), tmp_path / "b.parquet")
    prepare(options(corpus_dir, tmp_path / "text"))
    rows = prepare(options(corpus_dir, tmp_path / "rows", doc_mode="auto", text_field="body",
                           inputs=[str(tmp_path / "a.jsonl"), str(tmp_path / "b.parquet")]))
    assert rows.meta["documents"] == len(docs)
    assert rows.meta["source"]["text_field"] == "body"
    for name in OUTPUTS:
        assert (tmp_path / "rows" / name).read_bytes() == (tmp_path / "text" / name).read_bytes()
