"""Shared fixtures for the data tests: a small synthetic corpus and directories prepared from it."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from mlmega.data import PrepareOptions, prepare

_SYLLABLES = ["ka", "lo", "mi", "ru", "te", "sa", "po", "ne", "vi", "da", "or", "el", "an", "is", "um"]


def write_corpus(root: Path, n_files: int = 8, paragraphs: int = 5, seed: int = 0) -> list[Path]:
    """``n_files`` text files of ``paragraphs`` blank-line-separated paragraphs each, every paragraph a
    few lines of pseudo-words. Every paragraph starts with a unique tag (``File 3 para 4.``), so each
    paragraph-document is distinct."""
    rng = random.Random(seed)
    words = ["".join(rng.choice(_SYLLABLES) for _ in range(rng.randint(1, 3))) for _ in range(150)]
    root.mkdir(parents=True, exist_ok=True)
    paths = []
    for f in range(n_files):
        paras = []
        for p in range(paragraphs):
            lines = [f"File {f} para {p}."]
            for _ in range(rng.randint(2, 6)):
                line = " ".join(rng.choice(words) for _ in range(rng.randint(4, 12)))
                lines.append(line.capitalize() + rng.choice([".", ",", "!", "?", ";"]))
            paras.append("\n".join(lines))
        path = root / f"text_{f:02d}.txt"
        path.write_text("\n\n".join(paras) + "\n", encoding="utf-8")
        paths.append(path)
    return paths


@pytest.fixture
def corpus_dir(tmp_path: Path) -> Path:
    write_corpus(tmp_path / "corpus")
    return tmp_path / "corpus"


def small_options(corpus: Path, out: Path, **kw) -> PrepareOptions:
    """Options for a fast preparation of a ``write_corpus`` directory (40 paragraph documents)."""
    defaults = dict(out=out, inputs=[str(corpus / "*.txt")], doc_mode="paragraph", vocab_size=512,
                    val_fraction=0.25, seed=7)
    defaults.update(kw)
    return PrepareOptions(**defaults)


@pytest.fixture
def options():
    """``options(corpus_dir, out, **overrides)`` -> fast PrepareOptions (see ``small_options``)."""
    return small_options


@pytest.fixture
def make_corpus():
    """``make_corpus(root, n_files=8, paragraphs=5, seed=0)`` -> the written files."""
    return write_corpus


@pytest.fixture(scope="session")
def shared_corpus(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("shared") / "corpus"
    write_corpus(root, n_files=12, paragraphs=8, seed=1)
    return root


@pytest.fixture(scope="session")
def gpt_dir(shared_corpus: Path) -> Path:
    out = shared_corpus.parent / "gpt"
    prepare(small_options(shared_corpus, out, arch="gpt", val_fraction=0.1))
    return out


@pytest.fixture(scope="session")
def bert_dir(shared_corpus: Path) -> Path:
    out = shared_corpus.parent / "bert"
    prepare(small_options(shared_corpus, out, arch="bert", val_fraction=0.1))
    return out
