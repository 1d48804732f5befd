"""The true vocabulary of a checkpoint, which its files do not always say.

The shards hold the padded vocabulary (their shapes are the truth of the files). Megatron-LM's
training saves ``args.padded_vocab_size`` and often ``args.vocab_size=None`` (its tokenizer sets
only the padded size), so the true size comes, in this order, from the caller (``--vocab-size``), from
``args.vocab_size``, from a tokenizer file the caller names (``--tokenizer``), or from the tokenizer
file the args name (``vocab_file`` / ``tokenizer_model``) where it exists here. Two of them that
disagree, or none, is an error: a guess would move the padding rows into the vocabulary.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

from mlmega.config.errors import ConfigError


def true_vocab_size(args: Any, padded: Optional[int], source: str,
                    vocab_size: Optional[int] = None,
                    tokenizer: Optional[str | Path] = None) -> tuple[int, str]:
    """(vocabulary size, where it came from) for a checkpoint whose args are ``args`` and whose
    shards hold ``padded`` vocabulary rows (None: not known yet)."""
    from mlmega.data.tokenizer import vocabulary_size

    in_args = getattr(args, "vocab_size", None)
    if vocab_size is not None and in_args is not None and vocab_size != in_args:
        raise ConfigError(f"{source}: --vocab-size {vocab_size} differs from args.vocab_size="
                          f"{in_args}; give the checkpoint's own size or none")
    if vocab_size is not None:
        found = vocab_size, "--vocab-size"
    elif in_args is not None:
        found = in_args, "args.vocab_size"
    elif tokenizer is not None:
        found = vocabulary_size(tokenizer), f"--tokenizer {tokenizer}"
    else:
        named = [(k, getattr(args, k, None)) for k in ("vocab_file", "tokenizer_model")]
        named = [(k, v) for k, v in named if isinstance(v, str) and Path(v).exists()]
        if not named:
            raise ConfigError(
                f"{source}: args.vocab_size is None and padded_vocab_size="
                f"{getattr(args, 'padded_vocab_size', None)} (shards: {padded} rows): the true "
                f"vocabulary is unknown; give it with --vocab-size N or --tokenizer FILE")
        key, path = named[0]
        found = vocabulary_size(path), f"the tokenizer args.{key}={path}"
    if not isinstance(found[0], int) or found[0] < 1 or (padded is not None and found[0] > padded):
        raise ConfigError(f"{source}: vocabulary of {found[0]} (from {found[1]}): expected a "
                          f"positive size of at most the {padded} rows the shards hold")
    return found
