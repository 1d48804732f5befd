"""``mlmega data prepare``: text -> tokenizer -> Megatron indexed datasets (train + validation).

Layout of the output directory ``OUT``::

    OUT/tokenizer.json          the tokenizer (trained, or a copy of the one given)
    OUT/train.bin, train.idx    megatron-core IndexedDataset of the training documents
    OUT/val.bin,   val.idx      the held-out validation documents
    OUT/meta.json               what was prepared from what (written last)

The split is by document: a permutation drawn from ``seed`` puts ``round(val_fraction * n)``
documents (at least 1, at most n - 1) into ``val``; both splits keep the corpus order. A trained
tokenizer sees the training documents only.

GPT: each document is one sequence (item) of the indexed dataset, its tokens followed by
``<|endoftext|>``. BERT: each non-empty line of a document (with its newline) is one sequence, and
document boundaries are kept. No special tokens are stored: the ``[CLS] A [SEP] B [SEP]`` frame is
built when samples are drawn (:class:`mlmega.data.bert.BertMLMDataset`). Files are written with
megatron-core's ``IndexedDatasetBuilder``. It gets one ``add_document`` call per document, which
writes the same bytes as ``add_item`` per sequence plus ``end_document``.

Caching: ``meta.json`` records an ``input_hash`` over the source content, the options and the
library versions. When it matches and the outputs are present with their recorded sizes, nothing is
redone. Otherwise ``meta.json`` is removed first, every file is written under a temporary name and
renamed into place, and the new ``meta.json`` comes last, so a valid meta always describes complete
files. ``content_hash`` (over the tokenizer and the four dataset files) identifies the result.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator, Optional, Sequence

import numpy as np

from mlmega.config.errors import ConfigError
from mlmega.data.corpus import DEFAULT_DOC_LINES, Corpus, open_corpus
from mlmega.data.tokenizer import MIN_VOCAB_SIZE, Tokenizer

logger = logging.getLogger("mlmega.data")

FORMAT = "mlmega-data/1"  # bump when the prepared bytes change for the same inputs
META_NAME = "meta.json"
TOKENIZER_NAME = "tokenizer.json"
SPLITS = ("train", "val")
INDEX_CACHE_DIR = "index-cache"  # where build_gpt_datasets keeps megatron's sample indices
ARCHES = ("gpt", "bert")
_BATCH_DOCS = 256  # documents per encode_batch call
_PROGRESS_EVERY_S = 5.0


@dataclass
class PrepareOptions:
    """Everything ``prepare`` needs; the CLI fills it from its options."""

    out: Path
    inputs: Sequence[str] = ()  # empty and no hf_dataset: the embedded Shakespeare corpus
    hf_dataset: Optional[str] = None
    text_field: str = "text"
    hf_split: Optional[str] = None
    tokenizer: str = "train"  # "train" or the path of a tokenizer.json
    vocab_file: Optional[str] = None
    merges_file: Optional[str] = None
    vocab_size: int = 4096
    val_fraction: float = 0.05
    seed: int = 1234
    arch: str = "gpt"
    doc_mode: str = "auto"
    doc_lines: int = DEFAULT_DOC_LINES
    force: bool = False


@dataclass
class PrepareResult:
    out: Path
    meta: dict
    cached: bool  # True when nothing had to be done
    seconds: float
    prefixes: dict = field(default_factory=dict)  # split -> path prefix of the .bin/.idx pair

    @property
    def train_prefix(self) -> str:
        return self.prefixes["train"]

    @property
    def val_prefix(self) -> str:
        return self.prefixes["val"]

    @property
    def tokenizer_path(self) -> Path:
        return self.out / TOKENIZER_NAME


def prepare(opts: PrepareOptions) -> PrepareResult:
    """Prepare (or find up to date) the datasets described by ``opts``."""
    t0 = time.perf_counter()
    _check_options(opts)
    corpus = open_corpus(opts.inputs, opts.hf_dataset, opts.text_field, opts.hf_split, opts.doc_mode, opts.doc_lines)
    tok_spec = _tokenizer_spec(opts)
    out = Path(opts.out)
    prefixes = {s: str(out / s) for s in SPLITS}

    input_hash = _input_hash(opts, corpus, tok_spec)
    meta_path = out / META_NAME
    if not opts.force:
        meta = _read_meta(meta_path)
        if meta is not None and meta.get("input_hash") == input_hash and _outputs_intact(out, meta):
            secs = time.perf_counter() - t0
            logger.info("%s is up to date (input hash %s); nothing to do", out, input_hash[:12])
            return PrepareResult(out, meta, cached=True, seconds=secs, prefixes=prefixes)

    # 1. Count documents and choose the split.
    n_docs = sum(1 for _ in corpus.documents())
    if n_docs == 0:
        raise ConfigError(f"{_source_option(corpus)}: the corpus is empty (no non-blank document)")
    if n_docs < 2:
        raise ConfigError(f"{_source_option(corpus)}: only 1 document; need at least 2 to hold one out for validation "
                          "(try --doc-mode paragraph or lines)")
    is_val = split_documents(n_docs, opts.val_fraction, opts.seed)
    logger.info("%d documents from %s: %d train, %d validation", n_docs, corpus.kind, n_docs - is_val.sum(), is_val.sum())

    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ConfigError(f"--out {out}: cannot create the directory ({err.strerror or err})") from None
    # Invalidate before writing: a crash from here on leaves no meta, hence no false cache hit.
    meta_path.unlink(missing_ok=True)
    shutil.rmtree(out / INDEX_CACHE_DIR, ignore_errors=True)

    # 2. Tokenizer.
    t_tok = time.perf_counter()
    if tok_spec["kind"] == "trained-bpe":
        logger.info("training a byte-level BPE (vocab size %d) on %d documents", opts.vocab_size, n_docs - is_val.sum())
    tokenizer = _make_tokenizer(opts, corpus, is_val)
    tokenizer.save(out / TOKENIZER_NAME)
    tok_seconds = time.perf_counter() - t_tok
    logger.info("tokenizer (%s): vocab size %d in %.1f s", tok_spec["kind"], tokenizer.vocab_size, tok_seconds)

    # 3. Encode and write.
    import megatron.core.datasets.indexed_dataset  # noqa: F401  (import, ~2-5 s, outside the timing)

    t_enc = time.perf_counter()
    stats = _write_splits(out, corpus, tokenizer, is_val, opts.arch)
    enc_seconds = time.perf_counter() - t_enc

    files = {}
    for name in [TOKENIZER_NAME] + [f"{s}.{ext}" for s in SPLITS for ext in ("bin", "idx")]:
        p = out / name
        files[name] = {"bytes": p.stat().st_size, "sha256": _sha256_file(p)}
    content_hash = hashlib.sha256(json.dumps(files, sort_keys=True).encode()).hexdigest()
    meta = {
        "format": FORMAT,
        "arch": opts.arch,
        "source": corpus.describe(),
        "tokenizer": {"path": TOKENIZER_NAME, **tok_spec, "vocab_size": tokenizer.vocab_size,
                      "special_tokens": {k: getattr(tokenizer, k) for k in ("pad", "unk", "cls", "sep", "mask", "eod")}},
        "vocab_size": tokenizer.vocab_size,
        "dtype": stats.pop("dtype"),
        "seed": opts.seed,
        "val_fraction": opts.val_fraction,
        "documents": n_docs,
        "splits": stats,
        "files": files,
        "input_hash": input_hash,
        "content_hash": content_hash,
    }
    _write_json_atomic(meta_path, meta)
    secs = time.perf_counter() - t0
    logger.info("prepared %s in %.1f s (tokenizer %.1f s, encoding %.1f s); content hash %s",
                out, secs, tok_seconds, enc_seconds, content_hash[:12])
    return PrepareResult(out, meta, cached=False, seconds=secs, prefixes=prefixes)


def split_documents(n_docs: int, val_fraction: float, seed: int) -> np.ndarray:
    """Boolean mask of the validation documents: ``round(val_fraction * n_docs)`` of them, clipped to
    [1, n_docs - 1], chosen by a permutation seeded with ``seed``."""
    n_val = int(min(max(round(val_fraction * n_docs), 1), n_docs - 1))
    perm = np.random.default_rng(seed).permutation(n_docs)
    mask = np.zeros(n_docs, dtype=bool)
    mask[perm[:n_val]] = True
    return mask


def read_meta(out: os.PathLike | str) -> dict:
    """The ``meta.json`` of a prepared directory (a :class:`ConfigError` when there is none)."""
    path = Path(out) / META_NAME
    meta = _read_meta(path)
    if meta is None:
        raise ConfigError(f"{path}: no prepared data here (run `mlmega data prepare --out {out}`)")
    return meta


def check_prepared(out: os.PathLike | str, arch: str, vocab_size: int, where: str,
                   requested_vocab_size: Optional[int] = None) -> dict:
    """The prepared directory ``out`` serves a model of ``arch`` with ``vocab_size`` token ids (and,
    when given, was trained to ``requested_vocab_size`` tokens); its meta, or a ConfigError naming
    the mismatch. ``where`` names what asks (a recipe, a stage config)."""
    meta = read_meta(out)
    if meta.get("arch") != arch:
        raise ConfigError(f"{where}: {out} was prepared for arch {meta.get('arch')!r}, the model "
                          f"is {arch!r} (prepare it with --arch {arch}, or point data.dir elsewhere)")
    if not _outputs_intact(Path(out), meta):
        raise ConfigError(f"{out}: files are missing or differ from {META_NAME}; prepare it again")
    tokens = meta.get("vocab_size")
    if not isinstance(tokens, int) or tokens > vocab_size:
        raise ConfigError(f"{where}: model.vocab_size={vocab_size} is smaller than the tokenizer "
                          f"of {out} ({tokens} tokens)")
    requested = meta.get("tokenizer", {}).get("requested_vocab_size")
    if requested_vocab_size is not None and requested not in (None, requested_vocab_size):
        raise ConfigError(f"{where}: data.vocab_size={requested_vocab_size} but {out} was prepared "
                          f"with a {requested}-token tokenizer (prepare it again, or set "
                          f"data.vocab_size: {requested})")
    return meta


# -- internals -------------------------------------------------------------------------------------
def _check_options(opts: PrepareOptions) -> None:
    if opts.arch not in ARCHES:
        raise ConfigError(f"--arch {opts.arch!r}: expected one of {', '.join(ARCHES)}")
    if not (0.0 < opts.val_fraction < 1.0):
        raise ConfigError(f"--val-fraction {opts.val_fraction}: expected a fraction strictly between 0 and 1")
    if (opts.vocab_file is None) != (opts.merges_file is None):
        given, missing = ("--vocab-file", "--merges-file") if opts.vocab_file else ("--merges-file", "--vocab-file")
        raise ConfigError(f"{given}: needs {missing} as well (a GPT-2 style vocab.json + merges.txt pair)")
    if opts.vocab_file is not None and opts.tokenizer != "train":
        raise ConfigError(f"--tokenizer {opts.tokenizer} and --vocab-file: give one tokenizer, not both")
    if opts.tokenizer == "train" and opts.vocab_file is None and opts.vocab_size < MIN_VOCAB_SIZE:
        raise ConfigError(f"--vocab-size {opts.vocab_size}: expected at least {MIN_VOCAB_SIZE} (256 bytes + special tokens)")
    out = Path(opts.out)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out}: exists and is not a directory")


def _tokenizer_spec(opts: PrepareOptions) -> dict:
    """How the tokenizer is obtained, including a hash of any given file (part of the input hash)."""
    if opts.vocab_file is not None:
        for option, path in (("--vocab-file", opts.vocab_file), ("--merges-file", opts.merges_file)):
            if not Path(path).is_file():
                raise ConfigError(f"{option} {path}: no such file")
        return {"kind": "gpt2-files", "vocab_file": str(opts.vocab_file), "merges_file": str(opts.merges_file),
                "files_sha256": _sha256_files([Path(opts.vocab_file), Path(opts.merges_file)])}
    if opts.tokenizer == "train":
        return {"kind": "trained-bpe", "requested_vocab_size": opts.vocab_size}
    path = Path(opts.tokenizer)
    if not path.is_file():
        raise ConfigError(f"--tokenizer {opts.tokenizer}: no such file (expected 'train' or a tokenizer.json)")
    return {"kind": "file", "source": str(path), "files_sha256": _sha256_files([path])}


def _input_hash(opts: PrepareOptions, corpus: Corpus, tok_spec: dict) -> str:
    import tokenizers

    key = {
        "format": FORMAT,
        "arch": opts.arch,
        "val_fraction": opts.val_fraction,
        "seed": opts.seed,
        "tokenizer": {k: v for k, v in tok_spec.items() if k not in ("vocab_file", "merges_file", "source")},
        "tokenizers_version": tokenizers.__version__,
        "corpus": corpus.fingerprint(),
    }
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()


def _make_tokenizer(opts: PrepareOptions, corpus: Corpus, is_val: np.ndarray) -> Tokenizer:
    if opts.vocab_file is not None:
        return Tokenizer.from_gpt2_files(opts.vocab_file, opts.merges_file)
    if opts.tokenizer != "train":
        return Tokenizer.load(opts.tokenizer)
    train_docs = (doc for doc, v in zip(corpus.documents(), is_val) if not v)
    return Tokenizer.train(train_docs, opts.vocab_size)


def _batches(docs: Iterable[str], size: int) -> Iterator[list[str]]:
    batch: list[str] = []
    for d in docs:
        batch.append(d)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def _write_splits(out: Path, corpus: Corpus, tokenizer: Tokenizer, is_val: np.ndarray, arch: str) -> dict:
    from megatron.core.datasets.indexed_dataset import DType, IndexedDatasetBuilder

    dtype = DType.optimal_dtype(tokenizer.vocab_size)
    tmp = {s: {ext: out / f".{s}.{ext}.tmp-{os.getpid()}" for ext in ("bin", "idx")} for s in SPLITS}
    stats = {s: {"documents": 0, "sequences": 0, "tokens": 0} for s in SPLITS}
    builders = {s: IndexedDatasetBuilder(str(tmp[s]["bin"]), dtype=dtype) for s in SPLITS}
    eod = tokenizer.eod
    t0 = last = time.perf_counter()
    n_done = n_tokens = 0
    n_total = len(is_val)
    try:
        for batch in _batches(corpus.documents(), _BATCH_DOCS):
            if arch == "gpt":
                encoded = [[ids + [eod]] for ids in tokenizer.encode_batch(batch)]
            else:
                # keep each line's newline so that concatenated segments read as the text did
                lines = [[ln + "\n" for ln in doc.split("\n") if ln.strip()] for doc in batch]
                flat = tokenizer.encode_batch([ln for doc_lines in lines for ln in doc_lines])
                encoded, k = [], 0
                for doc_lines in lines:
                    encoded.append([ids for ids in flat[k : k + len(doc_lines)] if ids])
                    k += len(doc_lines)
            for seqs in encoded:
                if n_done >= n_total:  # the source grew between passes
                    raise ConfigError(f"{_source_option(corpus)}: changed while being read (more than {n_total} documents)")
                split = "val" if is_val[n_done] else "train"
                st = stats[split]
                lengths = [len(ids) for ids in seqs]
                # one call per document; the same bytes as add_item per sequence + end_document
                builders[split].add_document(np.fromiter(itertools.chain.from_iterable(seqs), np.int64, sum(lengths)), lengths)
                st["tokens"] += sum(lengths)
                n_tokens += sum(lengths)
                st["documents"] += 1
                st["sequences"] += len(seqs)
                n_done += 1
            now = time.perf_counter()
            if now - last >= _PROGRESS_EVERY_S:
                last = now
                el = now - t0
                logger.info("encoded %d/%d documents, %d tokens (%.0f documents/s, %.0f tokens/s)",
                            n_done, n_total, n_tokens, n_done / el, n_tokens / el)
        if n_done != n_total:  # the source changed between passes
            raise ConfigError(f"{_source_option(corpus)}: changed while being read ({n_total} then {n_done} documents)")
        for s in SPLITS:
            builders[s].finalize(str(tmp[s]["idx"]))
        for s in SPLITS:
            if stats[s]["tokens"] == 0:
                raise ConfigError(f"{_source_option(corpus)}: the {s} split has no tokens (the corpus is too small)")
        for s in SPLITS:
            for ext in ("bin", "idx"):
                os.replace(tmp[s][ext], out / f"{s}.{ext}")
    finally:
        for s in SPLITS:
            if not builders[s].data_file.closed:
                builders[s].data_file.close()
            for p in tmp[s].values():
                p.unlink(missing_ok=True)
    el = max(time.perf_counter() - t0, 1e-9)
    logger.info("encoded %d documents, %d tokens in %.1f s (%.0f documents/s, %.0f tokens/s)",
                n_done, n_tokens, el, n_done / el, n_tokens / el)
    return {**stats, "dtype": np.dtype(dtype).name}


def _source_option(corpus: Corpus) -> str:
    if corpus.kind == "hf":
        return f"--hf-dataset {corpus.hf_path}"
    if corpus.kind == "files":
        names = [str(p) for p in corpus.files[:3]]
        return "--input " + ", ".join(names) + (", ..." if len(corpus.files) > 3 else "")
    return "--input (default: embedded Shakespeare corpus)"


def _read_meta(path: Path) -> Optional[dict]:
    try:
        with open(path, encoding="utf-8") as f:
            meta = json.load(f)
    except (OSError, ValueError):
        return None
    return meta if isinstance(meta, dict) else None


def _outputs_intact(out: Path, meta: dict) -> bool:
    files = meta.get("files")
    if not isinstance(files, dict) or not files:
        return False
    for name, info in files.items():
        p = out / name
        if not p.is_file() or p.stat().st_size != info.get("bytes"):
            return False
    return True


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _sha256_files(paths: Sequence[Path]) -> str:
    h = hashlib.sha256()
    for p in paths:
        try:
            h.update(_sha256_file(p).encode())
        except OSError as err:
            raise ConfigError(f"{p}: cannot be read ({err.strerror or err})") from None
    return h.hexdigest()


def _write_json_atomic(path: Path, obj: dict) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2, sort_keys=True)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
