"""The two interfaces both Megatron checkpoint formats implement: a reader of canonical tensors and
a writer of ranks. Callers (conversion, training) hold one of each and never ask which format."""

from __future__ import annotations

import abc
from pathlib import Path
from typing import Any, Callable, ClassVar, Iterator, Mapping, Optional, Sequence

import torch

from mlmega.checkpoint.directory import iteration_dir_name
from mlmega.checkpoint.integrity import StoredFile
from mlmega.checkpoint.layout import ShardLayout
from mlmega.config.model import ModelConfig

# tp_ranks -> (local name, [shard per TP rank]) for every tensor of a stage, in stage order
StageTensors = Callable[[Sequence[int]], Iterator[tuple[str, list]]]


class CheckpointReader(abc.ABC):
    """An opened, validated checkpoint: its layout and args; tensors read on demand."""

    format: ClassVar[str]  # the name ``--format`` and the writers use
    root: Path
    iteration: int
    release: bool
    layout: ShardLayout

    @property
    def directory(self) -> Path:
        return self.root / iteration_dir_name(self.iteration, self.release)

    @classmethod
    @abc.abstractmethod
    def open(cls, root: str | Path, arch: Optional[str] = None,
             cfg: Optional[ModelConfig] = None, verify: bool = True,
             check_finite: bool = False) -> "CheckpointReader":
        """Validate the files and ``args`` before any tensor is read; ``verify``: check records'
        checksums before reading them; ``check_finite``: refuse NaN/Inf."""

    @abc.abstractmethod
    def stored_files(self) -> list[StoredFile]:
        """Every file of the checkpoint, as its checksums are checked."""

    @abc.abstractmethod
    def validate_tensors(self) -> None:
        """Every parameter of the args' model is stored, with its expected shape; nothing extra."""

    @abc.abstractmethod
    def read(self, global_name: str) -> torch.Tensor:
        """The canonical full tensor (TP=1 layout) of ``global_name``, in fresh memory."""

    @abc.abstractmethod
    def read_rows(self, global_name: str, start: int, count: int) -> torch.Tensor:
        """Rows [start, start + count) of :meth:`read` (a parameter TP splits on the vocab, or
        not at all), in fresh memory, reading as little else as the format allows."""

    @abc.abstractmethod
    def read_shard(self, global_name: str, tp_rank: int) -> torch.Tensor:
        """``layout.split(read(global_name), tp_rank)`` at this checkpoint's own layout."""

    def stores_shards_of(self, layout: ShardLayout) -> bool:
        """Whether :meth:`read_shard` reads ``layout``'s shards as stored (no gather)."""
        return False


class CheckpointWriter(abc.ABC):
    """Writes a checkpoint rank by rank into a checkpoint root (no process group); :meth:`finish`
    runs once after every rank. The ``latest`` marker is the caller's, written last."""

    name: str

    @abc.abstractmethod
    def write_rank(self, root: Path, layout: ShardLayout, tp_rank: int, pp_rank: int,
                   model: Mapping[str, Any], iteration: int,
                   extra_args: Optional[dict] = None) -> Path:
        """Write rank (tp_rank, pp_rank)'s tensors ``model`` (local names -> TP shards)."""

    @abc.abstractmethod
    def write_pp_stage(self, root: Path, layout: ShardLayout, pp_rank: int, tp_ranks: Sequence[int],
                    tensors: StageTensors, iteration: int, extra_args: Optional[dict],
                    written: Callable[[int, int], None], checksums: bool = False) -> None:
        """Write ranks (tp, ``pp_rank``) for tp in ``tp_ranks`` from ``tensors`` (made one
        parameter at a time); ``written(tp_rank, nbytes)`` after each tensor."""

    def finish(self, root: Path, layout: ShardLayout, iteration: int,
               extra_args: Optional[dict] = None) -> None:
        """After every rank was written (a format's index, if it has one)."""
