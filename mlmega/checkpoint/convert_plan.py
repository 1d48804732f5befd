"""A conversion's plan: the operator, the source(s) and the target layout, validated before any
tensor is read or written."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

from mlmega.checkpoint.atomic import check_destination
from mlmega.checkpoint.formats import FORMATS, open_checkpoint
from mlmega.checkpoint.layout import ShardLayout, tokenizer_args
from mlmega.config.errors import CheckpointError, ConfigError
from mlmega.config.schemes import LevelSchemes
from mlmega.operators import LevelMap

OPS = ("reshard", "coalesce", "decoalesce", "interpolate")


@dataclass(frozen=True)
class ConversionPlan:
    """What to convert, validated before any tensor is read or written."""

    op: str
    src: Path
    dst: Optional[Path]
    target: ShardLayout
    iteration: int
    level: Optional[LevelMap] = None
    large: Optional[Path] = None  # interpolate: the large level's pre-coalescing checkpoint
    alpha: float = 0.5
    format: str = "torch"
    checksums: bool = False  # zip CRC32 per record (torch format): torch.load never checks them
    vocab_size: Optional[int] = None  # the source's true vocabulary, resolved once (workers reopen)
    vocab_source: str = ""  # where vocab_size came from
    source_args: Optional[dict] = None  # Megatron args carried to the output (the tokenizer's)
    verify: bool = True  # check the sources' record checksums before reading (--no-verify)
    check_finite: bool = False  # refuse source tensors holding NaN/Inf (--check-finite)

    @property
    def ranks(self) -> list[tuple[int, int]]:
        return self.target.ranks

    @property
    def output_args(self) -> dict:
        """Args the output's files hold besides its layout's (:meth:`ShardLayout.megatron_args`)."""
        return {**(self.source_args or {}), "mlmega_converted_by": self.op}

    @property
    def sources(self) -> list[Path]:
        """The checkpoints read (which the destination must not overlap)."""
        return [self.src] + ([self.large] if self.large else [])


def plan_conversion(op: str, src: str | Path, dst: Optional[str | Path], *, target_tp: Optional[int] = None,
                    target_pp: Optional[int] = None,
                    target_layers: Optional[Sequence[int]] = None,
                    schemes: Optional[LevelSchemes] = None,
                    large: Optional[str | Path] = None, alpha: Optional[float] = None,
                    fmt: str = "torch", overwrite: bool = False, checksums: bool = False,
                    vocab_size: Optional[int] = None,
                    tokenizer: Optional[str | Path] = None, verify: bool = True,
                    check_finite: bool = False,
                    target_impl: Optional[str] = None) -> ConversionPlan:
    """Open and validate the inputs and the target layout; raises ConfigError on bad input.

    ``target_layers``: the layers of each output pipeline stage (an uneven split).
    ``vocab_size`` / ``tokenizer``: the source's true vocabulary where its args lack it
    (:func:`mlmega.checkpoint.vocab.true_vocab_size`). The target's vocabulary is padded by
    Megatron-LM's rule for its TP size (rows past the source's padding are zero).
    ``verify``: check records' checksums; ``check_finite``: refuse NaN/Inf source tensors.
    ``target_impl``: the layer spec whose parameter names the target uses (local or
    transformer_engine; default: the source's)."""
    if op not in OPS:
        raise ConfigError(f"unknown conversion {op!r}; expected one of {OPS}")
    if fmt not in FORMATS:
        raise ConfigError(f"--format={fmt!r}: expected one of {FORMATS}")
    src = Path(src)
    if dst is not None:  # None: the tensors are consumed in memory (training's initial load)
        dst = Path(dst)
        check_destination(dst, overwrite, [src] + ([Path(large)] if large else []))
    source = open_checkpoint(src, vocab_size=vocab_size, tokenizer=tokenizer, verify=verify,
                             check_finite=check_finite)
    source.validate_tensors()
    layout = source.layout
    level = None
    if op != "reshard" and schemes is None:
        raise ConfigError(f"convert {op} needs a scheme (--scheme FILE or --width-factor/"
                          f"--depth-factor)")
    if op == "coalesce":
        level = LevelMap.from_large(layout.cfg, schemes)
        cfg = level.small
    elif op in ("decoalesce", "interpolate"):
        level = LevelMap.from_small(layout.cfg, schemes)
        cfg = level.large
    else:
        cfg = layout.cfg
    if op == "interpolate":
        if large is None:
            raise ConfigError("convert interpolate needs --large DIR (the large level's checkpoint "
                              "from before coalescing)")
        if alpha is None or not 0.0 <= alpha <= 1.0:
            raise ConfigError(f"--alpha={alpha!r}: expected a number in [0, 1]")
        large_ckpt = open_checkpoint(large, vocab_size=cfg.vocab_size)
        if large_ckpt.layout.cfg != cfg:
            raise CheckpointError(f"--large {large}: its model is not --src {src} de-coalesced "
                                  f"(--large vs de-coalesced --src): "
                                  f"{large_ckpt.layout.cfg.differences(cfg)}")
        large_ckpt.validate_tensors()
        layout = large_ckpt.layout  # default target layout: the large level's own
    if target_layers is not None:
        if target_pp is not None and target_pp != len(target_layers):
            raise ConfigError(f"--target-pp={target_pp} and --target-pp-layers="
                              f"{','.join(map(str, target_layers))}: expected "
                              f"{len(target_layers)} stages in both")
        target_pp, target_layers = len(target_layers), tuple(target_layers)
    target = ShardLayout(cfg, target_tp or layout.tp, target_pp or layout.pp, target_layers,
                         transformer_impl=target_impl or layout.transformer_impl)
    same = (target.tp, target.layers_per_pp_stage, target.padded_vocab,
            target.transformer_impl) == (layout.tp, layout.layers_per_pp_stage,
                                         layout.padded_vocab, layout.transformer_impl)
    if op == "reshard" and dst is not None and fmt == source.format and same:
        raise ConfigError(f"convert reshard: --src {src} is already TP={layout.tp}, "
                          f"PP={layout.pp} (layers per stage "
                          f"{','.join(map(str, layout.layers_per_pp_stage))}) in format {fmt}; "
                          f"give another --target-tp, --target-pp, --target-pp-layers or --format")
    return ConversionPlan(op, src, dst, target, source.iteration, level,
                          Path(large) if large else None, 0.5 if alpha is None else alpha, fmt,
                          checksums, source.layout.cfg.vocab_size, source.vocab_source,
                          tokenizer_args(source.args), verify, check_finite)
