"""Reading prepared data: the indexed datasets, the tokenizer, and megatron-core's GPTDataset.

megatron-core 0.16.1 on CPU, as checked here:

* ``GPTDataset`` builds its sample index with the compiled extension
  ``megatron.core.datasets.helpers_cpp``. The cp311 manylinux wheel ships it prebuilt, so nothing is
  compiled. megatron's ``compile_helpers()`` would run ``make`` in site-packages, but the wheel has
  no Makefile (only ``helpers.cpp``) and the function calls ``sys.exit(1)`` on failure, so mlmega
  never calls it; :func:`check_dataset_helpers` turns a missing extension into a clear error instead.
* No ``torch.distributed`` group is needed. Without one, the builder builds every split in this
  process. With one (a single-process gloo group included), rank 0 builds first and writes the
  index cache, then the other ranks load it after a barrier, so every rank must call the builder.
* The sample/shuffle indices are cached as ``.npy`` files. megatron keys the cache on the prefix
  path, the config and the tokenizer's ``unique_identifiers``, not on the data bytes. Its default
  location is the odd ``<prefix>/cache/GPTDataset_indices`` (a folder named after the prefix). So
  the cache goes to ``OUT/index-cache/<content hash>/``, and ``prepare`` deletes ``OUT/index-cache``
  whenever it rewrites the data.
* ``GPTDatasetConfig`` reads ``tokenizer.vocab_size``, ``.eod``, ``.pad`` and
  ``.unique_identifiers`` (an object without the last one makes ``json.dumps`` fail).
  :class:`mlmega.data.Tokenizer` provides them.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Optional, Union

from mlmega.config.errors import ConfigError
from mlmega.data.prepare import INDEX_CACHE_DIR, TOKENIZER_NAME, read_meta
from mlmega.data.tokenizer import Tokenizer

if TYPE_CHECKING:  # pragma: no cover
    from megatron.core.datasets.gpt_dataset import GPTDataset
    from megatron.core.datasets.indexed_dataset import IndexedDataset

PathLike = Union[str, os.PathLike]


def load_indexed(prefix: PathLike) -> "IndexedDataset":
    """Open ``PREFIX.bin`` / ``PREFIX.idx`` (memory-mapped) as a megatron-core IndexedDataset.

    Keep the returned object alive while using anything read from it. ``ds[i]``,
    ``ds.sequence_lengths`` and ``ds.document_indices`` are views of its memory maps, and
    megatron's ``__del__`` unmaps them explicitly. ``load_indexed(p)[0].sum()`` can therefore read
    unmapped memory and crash the interpreter (SIGSEGV). Copy an array (``np.array(ds[i])``) to
    keep it past the dataset.
    """
    prefix = str(prefix)
    for ext in (".bin", ".idx"):
        if not os.path.isfile(prefix + ext):
            raise ConfigError(f"{prefix}{ext}: no such file (expected a prepared dataset prefix, e.g. OUT/train)")
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    return IndexedDataset(prefix, multimodal=False, mmap=True)


def load_tokenizer(data_dir: PathLike) -> Tokenizer:
    """The tokenizer a prepared directory was encoded with."""
    meta = read_meta(data_dir)
    return Tokenizer.load(Path(data_dir) / meta.get("tokenizer", {}).get("path", TOKENIZER_NAME))


def check_dataset_helpers() -> None:
    """Fail clearly when megatron-core's compiled dataset helpers are not importable."""
    try:
        import megatron.core.datasets.helpers_cpp  # noqa: F401
    except ImportError as err:
        raise RuntimeError(
            "megatron-core's compiled dataset helpers (megatron.core.datasets.helpers_cpp) cannot be "
            f"imported ({err}). The megatron-core wheels ship them prebuilt; an install from source needs "
            "pybind11 and a C++ compiler at build time. Reinstall megatron-core from a wheel for this "
            "Python/platform."
        ) from err


def build_gpt_datasets(
    data_dir: PathLike,
    seq_length: int,
    seed: int = 1234,
    train_samples: Optional[int] = None,
    val_samples: Optional[int] = None,
    *,
    cache_dir: Optional[PathLike] = None,
    create_attention_mask: bool = True,
    reset_position_ids: bool = False,
    reset_attention_mask: bool = False,
    eod_mask_loss: bool = False,
) -> tuple["GPTDataset", "GPTDataset"]:
    """megatron-core GPTDatasets (train, validation) over a directory written by ``prepare --arch gpt``.

    The prepared ``train`` and ``val`` prefixes become the two splits (``blend_per_split``), so the
    document split made at preparation time is the one used. ``*_samples``: how many samples to
    draw. With None, one epoch is drawn. More samples than one epoch holds repeat the data with a
    new shuffle. Each sample is a dict with ``tokens``, ``labels`` (each of ``seq_length``),
    ``loss_mask``, ``position_ids`` and ``attention_mask`` (when ``create_attention_mask``).
    Deterministic in ``seed``.
    """
    if seq_length < 1:
        raise ConfigError(f"seq_length {seq_length}: expected a positive number of tokens")
    data_dir = Path(data_dir)
    meta = read_meta(data_dir)
    if meta.get("arch") != "gpt":
        raise ConfigError(f"{data_dir}: prepared with --arch {meta.get('arch')}; GPT training needs --arch gpt")
    tokenizer = load_tokenizer(data_dir)
    for split in ("train", "val"):
        load_indexed(data_dir / split)  # existence check with a clear message
    check_dataset_helpers()

    from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
    from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig

    if cache_dir is None:
        cache_dir = data_dir / INDEX_CACHE_DIR / meta["content_hash"][:16]
    config = GPTDatasetConfig(
        random_seed=seed,
        sequence_length=seq_length,
        blend_per_split=[([str(data_dir / "train")], None), ([str(data_dir / "val")], None), None],
        path_to_cache=str(cache_dir),
        tokenizer=tokenizer,
        reset_position_ids=reset_position_ids,
        reset_attention_mask=reset_attention_mask,
        eod_mask_loss=eod_mask_loss,
        create_attention_mask=create_attention_mask,
    )
    train, val, _ = BlendedMegatronDatasetBuilder(
        GPTDataset, [train_samples, val_samples, None], lambda: True, config
    ).build()
    return train, val
