"""The model description: one typed config for a megatron-core GPT or BERT.

A ``ModelConfig`` is all the operators, the shard layout and the model builder need to know about a
model. It loads from YAML (our recipes) and from a Megatron-LM checkpoint's ``args`` namespace.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Optional

import yaml

from mlmega.config.errors import ConfigError

ARCHS = ("gpt", "bert")
POSITION_EMBEDDINGS = ("learned_absolute", "rope")
NORMALIZATIONS = ("LayerNorm", "RMSNorm")
ACTIVATIONS = ("gelu", "swiglu")


@dataclass(frozen=True)
class ModelConfig:
    """Architecture of a Megatron GPT or BERT (global sizes, independent of TP/PP)."""

    arch: str
    num_layers: int
    hidden_size: int
    num_attention_heads: int
    vocab_size: int
    max_sequence_length: int
    num_query_groups: Optional[int] = None  # None: one group per head (MHA)
    ffn_hidden_size: Optional[int] = None  # None: 4 * hidden_size
    make_vocab_size_divisible_by: int = 128
    position_embedding: str = "learned_absolute"
    rotary_base: int = 10000
    normalization: str = "LayerNorm"
    norm_epsilon: float = 1e-5
    activation: str = "gelu"
    tie_embeddings: bool = True
    add_bias_linear: bool = True
    bert_binary_head: bool = False
    num_tokentypes: int = 2  # BERT only
    hidden_dropout: float = 0.0
    attention_dropout: float = 0.0
    init_method_std: float = 0.02
    source: str = field(default="<memory>", compare=False)  # where it was read from, for errors

    def __post_init__(self) -> None:
        if self.num_query_groups is None:
            object.__setattr__(self, "num_query_groups", self.num_attention_heads)
        if self.ffn_hidden_size is None:
            object.__setattr__(self, "ffn_hidden_size", 4 * self.hidden_size)
        self.validate()

    # -- derived sizes ------------------------------------------------------------------------------
    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def heads_per_group(self) -> int:
        return self.num_attention_heads // self.num_query_groups

    @property
    def gated(self) -> bool:
        return self.activation == "swiglu"

    def padded_vocab_size(self, tp: int = 1) -> int:
        """Megatron's padded vocabulary: a multiple of make_vocab_size_divisible_by * TP."""
        multiple = self.make_vocab_size_divisible_by * tp
        return int(math.ceil(self.vocab_size / multiple) * multiple)

    def replace(self, **changes: Any) -> "ModelConfig":
        return dataclasses.replace(self, **changes)

    def differences(self, other: "ModelConfig") -> str:
        """The options that differ, as ``key=mine vs theirs`` (empty when the models are equal)."""
        mine, theirs = self.to_dict(), other.to_dict()
        return ", ".join(f"{key}={mine[key]!r} vs {theirs[key]!r}" for key in mine
                         if mine[key] != theirs[key])

    # -- validation ---------------------------------------------------------------------------------
    def validate(self) -> None:
        def fail(key: str, expected: str) -> None:
            value = getattr(self, key)
            raise ConfigError(f"{self.source}: model.{key}={value!r}: expected {expected}")

        if self.arch not in ARCHS:
            fail("arch", f"one of {ARCHS}")
        for key in ("num_layers", "hidden_size", "num_attention_heads", "vocab_size",
                    "max_sequence_length", "num_query_groups", "ffn_hidden_size",
                    "make_vocab_size_divisible_by"):
            value = getattr(self, key)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                fail(key, "a positive integer")
        if self.hidden_size % self.num_attention_heads:
            fail("hidden_size", f"a multiple of num_attention_heads={self.num_attention_heads}")
        if self.num_attention_heads % self.num_query_groups:
            fail("num_query_groups", f"a divisor of num_attention_heads={self.num_attention_heads}")
        if self.position_embedding not in POSITION_EMBEDDINGS:
            fail("position_embedding", f"one of {POSITION_EMBEDDINGS}")
        if self.normalization not in NORMALIZATIONS:
            fail("normalization", f"one of {NORMALIZATIONS}")
        if self.activation not in ACTIVATIONS:
            fail("activation", f"one of {ACTIVATIONS}")
        if self.position_embedding == "rope" and self.head_dim % 2:
            fail("hidden_size", "an even head dimension (hidden_size / heads) for RoPE")
        if self.arch == "gpt" and self.bert_binary_head:
            fail("bert_binary_head", "false for arch 'gpt'")

    # -- loaders ------------------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, data: Mapping[str, Any], source: str = "<dict>") -> "ModelConfig":
        """Build from a mapping, refusing unknown keys (typos are errors, not silent defaults)."""
        if not isinstance(data, Mapping):
            raise ConfigError(f"{source}: model: expected a mapping, got {type(data).__name__}")
        known = {f.name for f in dataclasses.fields(cls)} - {"source"}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"{source}: unknown model option(s) {unknown}; known: {sorted(known)}")
        required = {f.name for f in dataclasses.fields(cls)
                    if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING}
        missing = sorted(required - set(data))
        if missing:
            raise ConfigError(f"{source}: model is missing required option(s) {missing}")
        return cls(**dict(data), source=source)

    @classmethod
    def from_yaml(cls, path: str | Path, key: Optional[str] = "model") -> "ModelConfig":
        """Load from a YAML file; the model lives under ``key`` (or at top level when key is None)."""
        path = Path(path)
        try:
            data = yaml.safe_load(path.read_text())
        except (OSError, yaml.YAMLError) as err:
            raise ConfigError(f"{path}: cannot read YAML: {err}") from err
        if key is not None and isinstance(data, Mapping) and key in data:
            data = data[key]
        return cls.from_dict(data, source=str(path))

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data.pop("source")
        return data

    @classmethod
    def from_megatron_args(cls, args: Any, arch: Optional[str] = None, source: str = "<args>",
                           vocab_size: Optional[int] = None) -> "ModelConfig":
        """Build from a Megatron-LM ``args`` namespace (as stored in torch-format checkpoints).

        ``arch`` is needed when args do not say it (Megatron-LM stores no model type); mlmega's own
        checkpoints record it as ``args.mlmega_arch``. ``vocab_size``: the true vocabulary, where
        the caller knows it better than ``args.vocab_size`` (Megatron-LM often saves None there: its
        tokenizer sets only ``padded_vocab_size``). Megatron-LM's names are read, and mlmega's
        earlier ``norm_epsilon``; features mlmega's models do not have are refused.
        """
        get = lambda name, default=None: getattr(args, name, default)  # noqa: E731
        arch = arch or get("mlmega_arch")
        if arch is None:
            raise ConfigError(f"{source}: args do not name the architecture; pass arch='gpt'|'bert'")
        unsupported = _unsupported_megatron_args(args)
        if unsupported:
            name, value = unsupported[0]
            raise ConfigError(f"{source}: args.{name}={value!r}: mlmega's models do not support it")
        groups = get("num_query_groups") if get("group_query_attention", False) else None
        vocab = vocab_size or get("vocab_size")
        if vocab is None:
            raise ConfigError(f"{source}: args.vocab_size is None (padded_vocab_size="
                              f"{get('padded_vocab_size')}): the true vocabulary is unknown; give "
                              f"it (--vocab-size N or --tokenizer FILE)")
        data = dict(
            arch=arch,
            num_layers=get("num_layers"),
            hidden_size=get("hidden_size"),
            num_attention_heads=get("num_attention_heads"),
            num_query_groups=groups,
            ffn_hidden_size=get("ffn_hidden_size"),
            vocab_size=vocab,
            make_vocab_size_divisible_by=get("make_vocab_size_divisible_by", 128),
            max_sequence_length=get("max_position_embeddings") or get("seq_length"),
            position_embedding=get("position_embedding_type", "learned_absolute"),
            rotary_base=get("rotary_base", 10000),
            normalization=get("normalization", "LayerNorm"),
            norm_epsilon=get("layernorm_epsilon", get("norm_epsilon", 1e-5)),
            activation="swiglu" if get("swiglu", False) else "gelu",
            tie_embeddings=not get("untie_embeddings_and_output_weights", False),
            add_bias_linear=get("add_bias_linear", True),
            bert_binary_head=bool(get("bert_binary_head", False)) if arch == "bert" else False,
            hidden_dropout=get("hidden_dropout", 0.0),
            attention_dropout=get("attention_dropout", 0.0),
            init_method_std=get("init_method_std", 0.02),
        )
        tokentypes = get("mlmega_num_tokentypes")  # recorded by mlmega's own checkpoints
        if tokentypes is None and arch == "bert":  # Megatron-LM's pretrain_bert.py rule
            tokentypes = 2 if data["bert_binary_head"] else 0
        if tokentypes is not None:
            data["num_tokentypes"] = tokentypes
        return cls.from_dict(data, source=source)

    def to_megatron_args(self) -> dict[str, Any]:
        """The args Megatron-LM saves for this model, under its names (TP/PP, vocabulary padding,
        precision and tokenizer not included), with mlmega's ``mlmega_*`` additions.

        Every model argument that Megatron-LM's ``load_args_from_checkpoint`` and its converter
        (tools/checkpoint) read is here, valued as Megatron-LM's own training would have saved it
        for a model built with the local transformer implementation (mlmega's keys).
        """
        return dict(
            mlmega_arch=self.arch,
            mlmega_num_tokentypes=self.num_tokentypes,
            num_layers=self.num_layers,
            encoder_num_layers=self.num_layers,
            hidden_size=self.hidden_size,
            num_attention_heads=self.num_attention_heads,
            group_query_attention=self.num_query_groups != self.num_attention_heads,
            num_query_groups=self.num_query_groups,
            ffn_hidden_size=self.ffn_hidden_size,
            kv_channels=self.head_dim,
            vocab_size=self.vocab_size,
            make_vocab_size_divisible_by=self.make_vocab_size_divisible_by,
            max_position_embeddings=self.max_sequence_length,
            seq_length=self.max_sequence_length,
            encoder_seq_length=self.max_sequence_length,
            position_embedding_type=self.position_embedding,
            add_position_embedding=True,
            use_rotary_position_embeddings=False,
            rotary_base=self.rotary_base,
            **_MEGATRON_FIXED_ARGS,
            normalization=self.normalization,
            layernorm_epsilon=self.norm_epsilon,
            swiglu=self.gated,
            untie_embeddings_and_output_weights=not self.tie_embeddings,
            add_bias_linear=self.add_bias_linear,
            add_qkv_bias=self.add_bias_linear,
            bert_binary_head=self.bert_binary_head,
            hidden_dropout=self.hidden_dropout,
            attention_dropout=self.attention_dropout,
            init_method_std=self.init_method_std,
            transformer_impl="local",
            # pretrain_bert.py picks its layer spec from args.spec (GPT: from transformer_impl)
            spec=["local"] if self.arch == "bert" else None,
        )


# Megatron-LM arguments for features mlmega's models do not have, at the value that turns them off
# (what to_megatron_args writes; a checkpoint with another value is refused).
_MEGATRON_FIXED_ARGS: dict[str, Any] = dict(
    rotary_percent=1.0, rotary_interleaved=False, apply_layernorm_1p=False, squared_relu=False,
    openai_gelu=False, qk_layernorm=False, num_experts=None, apply_query_key_layer_scaling=False,
    sequence_parallel=False, use_legacy_models=False)
_NOT_REFUSED = ("apply_query_key_layer_scaling", "sequence_parallel")  # no effect on the weights


def _unsupported_megatron_args(args: Any) -> list[tuple[str, Any]]:
    """(name, value) of the args that turn on a feature mlmega's models do not have."""
    found = [(name, getattr(args, name)) for name, off in _MEGATRON_FIXED_ARGS.items()
             if name not in _NOT_REFUSED and getattr(args, name, off) not in (off, None)]
    if getattr(args, "add_qkv_bias", None) not in (None, getattr(args, "add_bias_linear", True)):
        found.append(("add_qkv_bias", args.add_qkv_bias))
    return found
