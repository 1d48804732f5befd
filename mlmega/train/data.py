"""Deterministic batches for training and validation: sample indices depend only on the step.

Global batch ``step`` holds samples [first + step * G, first + (step + 1) * G), ``first`` being the
samples consumed before this stage (a V-cycle's earlier stages); DP rank r takes the r-th contiguous
slice and cuts it into micro-batches. Resuming at step k therefore continues with exactly the samples
an uninterrupted run would have seen, at any DP size, and a stage continues the previous stage's
stream.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from mlmega.config.errors import ConfigError


def open_datasets(arch: str, data_dir: str, seq_length: int, seed: int, train_samples: int,
                  val_samples: int) -> tuple[Any, Any]:
    """(train, validation) datasets over a directory written by ``mlmega data prepare``."""
    if arch == "gpt":
        from mlmega.data.gpt import build_gpt_datasets

        return build_gpt_datasets(data_dir, seq_length, seed, train_samples, val_samples,
                                  create_attention_mask=False)
    from mlmega.data.bert import BertMLMDataset

    return (BertMLMDataset.from_prepared(data_dir, "train", seq_length, seed, train_samples),
            BertMLMDataset.from_prepared(data_dir, "val", seq_length, seed, val_samples))


class Batches:
    """The micro-batches of one DP rank, by step."""

    def __init__(self, dataset, global_batch: int, micro_batch: int, dp: int, dp_rank: int,
                 first_sample: int = 0):
        if global_batch % (micro_batch * dp):
            raise ConfigError(f"global_batch_size={global_batch} is not divisible by "
                              f"micro_batch_size x DP = {micro_batch} x {dp}")
        self.dataset, self.global_batch, self.micro_batch = dataset, global_batch, micro_batch
        self.per_rank = global_batch // dp
        self.dp_rank = dp_rank
        self.first_sample = first_sample

    @property
    def num_microbatches(self) -> int:
        return self.per_rank // self.micro_batch

    def sample_indices(self, step: int) -> range:
        """The dataset indices this DP rank reads at ``step`` (0-based), in order."""
        first = self.first_sample + step * self.global_batch + self.dp_rank * self.per_rank
        return range(first, first + self.per_rank)

    def microbatches(self, step: int) -> list[dict[str, torch.Tensor]]:
        indices = self.sample_indices(step)
        return [_collate([self.dataset[i] for i in indices[m:m + self.micro_batch]])
                for m in range(0, len(indices), self.micro_batch)]


def _collate(samples: list[dict]) -> dict[str, torch.Tensor]:
    batch = {}
    for key in samples[0]:
        values = [s[key] for s in samples]
        if isinstance(values[0], torch.Tensor):
            batch[key] = torch.stack(values)
        else:
            batch[key] = torch.as_tensor(np.stack([np.asarray(v) for v in values]))
    return batch
