"""Masked-language-model samples for BERT from a directory prepared with ``--arch bert``.

The indexed dataset stores one sequence per non-empty line and marks document boundaries. A sample is
built from a *span*: consecutive lines of one document, packed greedily until they hold at least
``seq_length - 3`` tokens. Spans are fixed when the dataset is opened and use no randomness.

For sample ``idx`` a generator seeded with ``(seed, idx)`` does the rest, so a sample depends only on
``(seed, idx)``:

* It cuts the span at a line boundary into A and B. A one-line span is cut inside the line.
* With probability 1/2 it swaps A and B (``is_random = 1``, sentence-order prediction as in megatron).
* It truncates the longer of A and B from its end until ``[CLS] A [SEP] B [SEP]`` fits
  ``seq_length``, then pads with ``[PAD]``.
* It selects ``round(0.15 * n)`` of the ``n`` non-special positions, at least one. Each selected
  position becomes ``[MASK]`` with probability 0.8, a random non-special token with probability 0.1,
  and stays unchanged with probability 0.1.

Sample keys (torch tensors of length ``seq_length`` unless noted):
``text`` (input ids), ``types`` (0 for ``[CLS] A [SEP]``, 1 for ``B [SEP]``, 0 for padding),
``labels`` (the original id at selected positions, ``-100`` elsewhere), ``loss_mask`` (float, 1 at
selected positions), ``padding_mask`` (1 for real tokens, 0 for padding), ``is_random`` (scalar) and
``truncated`` (scalar).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional, Union

import numpy as np
import torch

from mlmega.config.errors import ConfigError
from mlmega.data.gpt import load_indexed, load_tokenizer
from mlmega.data.prepare import read_meta
from mlmega.data.tokenizer import Tokenizer

IGNORE_INDEX = -100


class BertMLMDataset(torch.utils.data.Dataset):
    """MLM + sentence-order samples over one split of a prepared BERT directory.

    ``num_samples``: the dataset length. With None it is one pass over the spans. A larger value
    goes around the spans again, with new cuts and masks.
    """

    def __init__(
        self,
        indexed,
        tokenizer: Tokenizer,
        seq_length: int,
        seed: int = 1234,
        num_samples: Optional[int] = None,
        mask_prob: float = 0.15,
        mask_token_prob: float = 0.8,
        random_token_prob: float = 0.1,
    ) -> None:
        if seq_length < 5:
            raise ConfigError(f"seq_length {seq_length}: expected at least 5 for [CLS] A [SEP] B [SEP]")
        if not 0.0 < mask_prob < 1.0 or mask_token_prob + random_token_prob > 1.0:
            raise ConfigError(f"mask probabilities {mask_prob}, {mask_token_prob}, {random_token_prob}: out of range")
        self.dataset = load_indexed(indexed) if isinstance(indexed, (str, os.PathLike)) else indexed
        self.tokenizer = tokenizer
        self.seq_length = seq_length
        self.seed = seed
        self.mask_prob = mask_prob
        self.mask_token_prob = mask_token_prob
        self.random_token_prob = random_token_prob
        self.special_ids = np.array(sorted(tokenizer.special_ids), dtype=np.int64)
        self.random_pool = np.setdiff1d(np.arange(tokenizer.vocab_size, dtype=np.int64), self.special_ids)
        self.spans = self._build_spans()
        if len(self.spans) == 0:
            raise ConfigError(f"{self.dataset.path_prefix}: no tokens to draw BERT samples from")
        self.num_samples = len(self.spans) if num_samples is None else int(num_samples)

    @classmethod
    def from_prepared(cls, data_dir: Union[str, os.PathLike], split: str, seq_length: int, seed: int = 1234,
                      num_samples: Optional[int] = None, **kwargs) -> "BertMLMDataset":
        """Open ``split`` (``train`` or ``val``) of a directory written by ``prepare --arch bert``."""
        meta = read_meta(data_dir)
        if meta.get("arch") != "bert":
            raise ConfigError(f"{data_dir}: prepared with --arch {meta.get('arch')}; BERT training needs --arch bert")
        if split not in ("train", "val"):
            raise ConfigError(f"split {split!r}: expected 'train' or 'val'")
        return cls(Path(data_dir) / split, load_tokenizer(data_dir), seq_length, seed, num_samples, **kwargs)

    def _build_spans(self) -> np.ndarray:
        lengths = np.asarray(self.dataset.sequence_lengths, dtype=np.int64)
        doc_bounds = np.asarray(self.dataset.document_indices, dtype=np.int64)
        target = self.seq_length - 3
        spans: list[tuple[int, int]] = []
        for d in range(len(doc_bounds) - 1):
            start, stop = int(doc_bounds[d]), int(doc_bounds[d + 1])
            begin, acc = start, 0
            for i in range(start, stop):
                acc += int(lengths[i])
                if acc >= target:
                    spans.append((begin, i + 1))
                    begin, acc = i + 1, 0
            if begin < stop and acc > 0:
                spans.append((begin, stop))
        return np.array(spans, dtype=np.int64).reshape(-1, 2)

    def __len__(self) -> int:
        return self.num_samples

    def __getitem__(self, idx: int) -> dict:
        idx = int(idx)
        if not 0 <= idx < self.num_samples:
            raise IndexError(f"sample {idx} out of range [0, {self.num_samples})")
        rng = np.random.default_rng([self.seed, idx])
        start, stop = self.spans[idx % len(self.spans)]
        lines = [np.asarray(self.dataset[i], dtype=np.int64) for i in range(start, stop)]

        if len(lines) >= 2:
            cut = int(rng.integers(1, len(lines)))
            a, b = np.concatenate(lines[:cut]), np.concatenate(lines[cut:])
        else:
            toks = lines[0]
            cut = int(rng.integers(1, len(toks))) if len(toks) > 1 else len(toks)
            a, b = toks[:cut], toks[cut:]
        is_random = bool(rng.random() < 0.5)
        if is_random:
            a, b = b, a

        budget = self.seq_length - 3
        truncated = len(a) + len(b) > budget
        while len(a) + len(b) > budget:
            if len(a) >= len(b):
                a = a[:-1]
            else:
                b = b[:-1]

        tok = self.tokenizer
        tokens = np.concatenate([[tok.cls], a, [tok.sep], b, [tok.sep]]).astype(np.int64)
        n = len(tokens)
        types = np.zeros(self.seq_length, dtype=np.int64)
        types[len(a) + 2 : n] = 1

        candidates = np.flatnonzero(~np.isin(tokens, self.special_ids))
        labels = np.full(self.seq_length, IGNORE_INDEX, dtype=np.int64)
        if len(candidates):
            k = max(1, int(round(self.mask_prob * len(candidates))))
            chosen = np.sort(rng.choice(candidates, size=k, replace=False))
            labels[chosen] = tokens[chosen]
            u = rng.random(k)
            to_mask = chosen[u < self.mask_token_prob]
            to_random = chosen[(u >= self.mask_token_prob) & (u < self.mask_token_prob + self.random_token_prob)]
            tokens[to_mask] = tok.mask
            tokens[to_random] = rng.choice(self.random_pool, size=len(to_random))

        text = np.full(self.seq_length, tok.pad, dtype=np.int64)
        text[:n] = tokens
        padding_mask = np.zeros(self.seq_length, dtype=np.int64)
        padding_mask[:n] = 1
        return {
            "text": torch.from_numpy(text),
            "types": torch.from_numpy(types),
            "labels": torch.from_numpy(labels),
            "loss_mask": torch.from_numpy((labels != IGNORE_INDEX).astype(np.float32)),
            "padding_mask": torch.from_numpy(padding_mask),
            "is_random": torch.tensor(int(is_random), dtype=torch.int64),
            "truncated": torch.tensor(int(truncated), dtype=torch.int64),
        }


def build_bert_datasets(
    data_dir: Union[str, os.PathLike],
    seq_length: int,
    seed: int = 1234,
    train_samples: Optional[int] = None,
    val_samples: Optional[int] = None,
    **kwargs,
) -> tuple[BertMLMDataset, BertMLMDataset]:
    """(train, validation) MLM datasets of a directory prepared with ``--arch bert``; the counterpart
    of :func:`mlmega.data.build_gpt_datasets`. The validation set uses its own seed stream
    (``seed + 1``) so that it never shares masks with training."""
    train = BertMLMDataset.from_prepared(data_dir, "train", seq_length, seed, train_samples, **kwargs)
    val = BertMLMDataset.from_prepared(data_dir, "val", seq_length, seed + 1, val_samples, **kwargs)
    return train, val
