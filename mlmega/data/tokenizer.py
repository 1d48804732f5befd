"""A small wrapper around a Hugging Face ``tokenizers.Tokenizer`` (byte-level BPE) with the special
tokens that mlmega's GPT and BERT data need.

Every :class:`Tokenizer` has all of ``[PAD] [UNK] [CLS] [SEP] [MASK] <|endoftext|>`` (missing ones are
added), so one tokenizer file serves both architectures: GPT uses ``<|endoftext|>`` as end-of-document
(``eod``) and BERT the bracketed ones. A trained tokenizer has them as ids 0-5; a GPT-2
``vocab.json``/``merges.txt`` pair keeps its own ``<|endoftext|>`` (50256) and gets the others appended.

It also carries what megatron-core's ``GPTDatasetConfig`` reads from its ``tokenizer``: ``vocab_size``,
``eod``, ``pad`` and ``unique_identifiers`` (hashed into the dataset index cache key).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Iterable, Optional, Sequence, Union

import tokenizers
from tokenizers import decoders, models, pre_tokenizers, trainers

from mlmega.config.errors import ConfigError

PAD, UNK, CLS, SEP, MASK, EOD = "[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "<|endoftext|>"
SPECIAL_TOKENS: tuple[str, ...] = (PAD, UNK, CLS, SEP, MASK, EOD)
MIN_VOCAB_SIZE = 256 + len(SPECIAL_TOKENS)  # the byte alphabet plus the special tokens

PathLike = Union[str, os.PathLike]


class Tokenizer:
    """Byte-level BPE tokenizer: ``encode`` / ``decode`` round-trip any text exactly, and ``encode``
    never returns a special id (those are inserted by the data code only)."""

    def __init__(self, backend: tokenizers.Tokenizer) -> None:
        missing = [t for t in SPECIAL_TOKENS if backend.token_to_id(t) is None]
        # add_special_tokens also marks tokens already in the vocabulary (GPT-2's <|endoftext|>) special
        backend.add_special_tokens([t for t in SPECIAL_TOKENS if t in missing or t == EOD])
        # Text is data: a literal "[SEP]" or "<|endoftext|>" in a corpus is encoded as plain text, never
        # as the special id (a runtime setting; it is not stored in tokenizer.json).
        backend.encode_special_tokens = True
        self._tk = backend
        self._ids = {t: backend.token_to_id(t) for t in SPECIAL_TOKENS}
        self._fingerprint = hashlib.sha256(backend.to_str().encode("utf-8")).hexdigest()

    # -- construction ------------------------------------------------------------------------------
    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int = 4096) -> "Tokenizer":
        """Train a byte-level BPE of (at most) ``vocab_size`` entries on ``texts``.

        Deterministic: the same texts in the same order give a byte-identical ``tokenizer.json``
        (checked across processes with tokenizers 0.23). A small corpus may yield fewer entries.
        """
        if vocab_size < MIN_VOCAB_SIZE:
            raise ConfigError(f"--vocab-size {vocab_size}: expected at least {MIN_VOCAB_SIZE} (256 bytes + special tokens)")
        tk = tokenizers.Tokenizer(models.BPE())
        tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tk.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            special_tokens=list(SPECIAL_TOKENS),
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
        tk.train_from_iterator(texts, trainer)
        return cls(tk)

    @classmethod
    def from_gpt2_files(cls, vocab_file: PathLike, merges_file: PathLike) -> "Tokenizer":
        """A GPT-2 style byte-level BPE from ``vocab.json`` + ``merges.txt``."""
        for option, path in (("--vocab-file", vocab_file), ("--merges-file", merges_file)):
            if not Path(path).is_file():
                raise ConfigError(f"{option} {path}: no such file")
        try:
            with open(vocab_file, encoding="utf-8") as f:
                vocab = json.load(f)
            if not isinstance(vocab, dict):
                raise ValueError("not a JSON object of token -> id")
        except (ValueError, UnicodeDecodeError) as err:
            raise ConfigError(f"--vocab-file {vocab_file}: expected a GPT-2 vocab.json ({err})") from None
        try:
            model = models.BPE.from_file(str(vocab_file), str(merges_file))
        except Exception as err:
            raise ConfigError(
                f"--merges-file {merges_file}: cannot build a BPE from it with --vocab-file {vocab_file} ({err})"
            ) from None
        tk = tokenizers.Tokenizer(model)
        tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tk.decoder = decoders.ByteLevel()
        return cls(tk)

    @classmethod
    def load(cls, path: PathLike) -> "Tokenizer":
        """Load a ``tokenizer.json`` (as written by :meth:`save` or by ``tokenizers``)."""
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"--tokenizer {path}: no such file (expected a tokenizer.json or 'train')")
        try:
            return cls(tokenizers.Tokenizer.from_file(str(path)))
        except Exception as err:
            raise ConfigError(f"--tokenizer {path}: not a tokenizers JSON file ({err})") from None

    def save(self, path: PathLike) -> None:
        """Write ``tokenizer.json`` atomically (temp name, then rename)."""
        path = Path(path)
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        tmp.write_text(self.to_str(), encoding="utf-8")
        os.replace(tmp, path)

    def to_str(self) -> str:
        return self._tk.to_str()

    # -- use ---------------------------------------------------------------------------------------
    @property
    def backend(self) -> tokenizers.Tokenizer:
        return self._tk

    @property
    def vocab_size(self) -> int:
        """Number of ids, special tokens included (every id is < vocab_size)."""
        return self._tk.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        return self._tk.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """Encode many texts at once (parallel in the Rust library)."""
        return [e.ids for e in self._tk.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        return self._tk.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> Optional[int]:
        return self._tk.token_to_id(token)

    def id_to_token(self, token_id: int) -> Optional[str]:
        return self._tk.id_to_token(int(token_id))

    @property
    def pad(self) -> int:
        return self._ids[PAD]

    @property
    def unk(self) -> int:
        return self._ids[UNK]

    @property
    def cls(self) -> int:
        return self._ids[CLS]

    @property
    def sep(self) -> int:
        return self._ids[SEP]

    @property
    def mask(self) -> int:
        return self._ids[MASK]

    @property
    def eod(self) -> int:
        """End-of-document id (``<|endoftext|>``), appended to every GPT document."""
        return self._ids[EOD]

    @property
    def special_ids(self) -> frozenset[int]:
        return frozenset(self._ids.values())

    @property
    def fingerprint(self) -> str:
        """SHA-256 of the serialized tokenizer."""
        return self._fingerprint

    @property
    def unique_identifiers(self) -> dict:
        """Read by megatron-core when it hashes a dataset config (``json.dumps(default=...)``)."""
        return {"class": "mlmega.data.Tokenizer", "vocab_size": self.vocab_size, "sha256": self._fingerprint}

    def __repr__(self) -> str:
        return f"Tokenizer(vocab_size={self.vocab_size}, sha256={self._fingerprint[:12]})"


def vocabulary_size(path: PathLike) -> int:
    """The vocabulary size of a tokenizer file, counted as Megatron-LM's tokenizers count it: a
    Hugging Face ``tokenizer.json`` (or a directory holding one, e.g. a prepared data directory)
    with its added tokens, a GPT-2 ``vocab.json`` (its entries) or a WordPiece ``vocab.txt`` (its
    lines)."""
    path = Path(path)
    if path.is_dir():
        path = path / "tokenizer.json"
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(f"{path}: cannot read the tokenizer ({type(err).__name__}: {err})") \
            from None
    if path.suffix != ".json":
        return len(text.splitlines())
    try:
        data = json.loads(text)
        if isinstance(data, dict) and "model" in data:
            return tokenizers.Tokenizer.from_str(text).get_vocab_size(with_added_tokens=True)
    except Exception as err:  # json / tokenizers parse errors
        raise ConfigError(f"{path}: not a tokenizer file ({type(err).__name__}: {err})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a tokenizer.json or a GPT-2 vocab.json (a mapping), "
                          f"got {type(data).__name__}")
    return len(data)
