"""``mlmega convert``, ``inspect`` and ``verify``: sharded checkpoint conversion and inspection."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from mlmega.checkpoint.convert import run_conversion
from mlmega.checkpoint.convert_plan import OPS, plan_conversion
from mlmega.checkpoint.formats import FORMATS
from mlmega.config.schemes import LevelSchemes
from mlmega.models.naming import TRANSFORMER_IMPLS


def register(sub) -> None:
    convert = sub.add_parser(
        "convert", help="reshard a checkpoint or map it between V-cycle levels",
        description="Convert a sharded Megatron checkpoint: reshard to another TP/PP layout, "
                    "coalesce to the smaller level, de-coalesce to the larger one, or "
                    "de-coalesce and interpolate with the large level's checkpoint.")
    convert.add_argument("op", choices=OPS)
    convert.add_argument("--src", required=True, help="source checkpoint root")
    convert.add_argument("--dst", required=True, help="output checkpoint root (must not exist)")
    convert.add_argument("--target-tp", type=int, help="tensor-parallel size of the output")
    convert.add_argument("--target-pp", type=int, help="pipeline-parallel size of the output")
    convert.add_argument("--target-pp-layers", type=_layer_counts, metavar="N,N,...",
                         help="layers per pipeline stage of the output, for an uneven split "
                              "(e.g. 3,5; PP is their number; stages between the first and the "
                              "last hold equal counts, as Megatron's decoder_first/last_pipeline_"
                              "num_layers express)")
    convert.add_argument("--scheme", help="scheme file: mlmega YAML or the reference's JSON")
    convert.add_argument("--width-factor", type=int, help="merge K heads/query groups into one")
    convert.add_argument("--depth-factor", type=int, help="merge K layers into one")
    convert.add_argument("--width-kind", default="stacked", choices=("stacked", "adjacent"))
    convert.add_argument("--depth-kind", default="adjacent", choices=("stacked", "adjacent"))
    convert.add_argument("--large", help="interpolate: the large level's pre-coalescing checkpoint")
    convert.add_argument("--alpha", type=float, help="interpolate: weight of the de-coalesced model")
    convert.add_argument("--format", default="torch", choices=FORMATS, help="output format")
    convert.add_argument("--transformer-impl", choices=TRANSFORMER_IMPLS,
                         help="parameter names of the output: megatron-core's local or "
                              "TransformerEngine layer spec (default: the source's)")
    convert.add_argument("--workers", type=int, default=1,
                         help="parallel processes (local) or SLURM tasks (--executor slurm)")
    convert.add_argument("--executor", default="local", choices=("local", "slurm"),
                         help="slurm: one job whose tasks convert the ranks (shared filesystem)")
    convert.add_argument("--partition", help="slurm: the partition")
    convert.add_argument("--time-min", type=int, default=60, help="slurm: time limit (minutes)")
    convert.add_argument("--cpus-per-task", type=int, default=1, help="slurm: CPUs per task")
    convert.add_argument("--slurm-logs", help="slurm: submitit's folder (default: DST.slurm)")
    convert.add_argument("--overwrite", action="store_true", help="replace an existing --dst")
    convert.add_argument("--checksums", action="store_true",
                         help="also store zip CRC32s in torch-format files (for zip tools; "
                              "mlmega checks its own xxh3 manifests; writing is ~5x slower)")
    convert.add_argument("--no-verify", action="store_true",
                         help="skip checking the sources' record checksums before reading them")
    convert.add_argument("--check-finite", action="store_true",
                         help="refuse source tensors that hold NaN or Inf values")
    _vocab_options(convert)
    convert.set_defaults(handler=_convert)

    inspect = sub.add_parser("inspect", help="describe a Megatron checkpoint")
    inspect.add_argument("path", help="checkpoint root")
    inspect.add_argument("--tensors", action="store_true", help="also list every tensor")
    inspect.add_argument("--json", action="store_true", help="print JSON instead of tables")
    _vocab_options(inspect)
    inspect.set_defaults(handler=_inspect)

    verify = sub.add_parser(
        "verify", help="check a whole checkpoint's checksums",
        description="Check a Megatron checkpoint in full: the marker, every rank's args and "
                    "layout, tensor names and shapes, and every checksummed byte of every file "
                    "(mlmega's xxh3 manifests; the zip CRC32s of torch.save's files), including "
                    "optimizer state and padding that a conversion never reads. Damage: exit "
                    "code 2, naming the file and the record.")
    verify.add_argument("path", help="checkpoint root")
    _vocab_options(verify)
    verify.set_defaults(handler=_verify)


def _layer_counts(text: str) -> list[int]:
    try:
        return [int(part) for part in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected comma-separated layer counts, "
                                         f"e.g. 3,5") from None


def _vocab_options(parser) -> None:
    parser.add_argument("--vocab-size", type=int,
                        help="the source's true vocabulary size, where its args lack it "
                             "(Megatron-LM often saves only the padded size)")
    parser.add_argument("--tokenizer", help="or a tokenizer to count it from: tokenizer.json (or "
                                            "a directory holding one), GPT-2 vocab.json, "
                                            "WordPiece vocab.txt")


def _schemes(args: argparse.Namespace):
    if args.scheme:
        return LevelSchemes.load(args.scheme)
    if args.width_factor or args.depth_factor:
        return LevelSchemes.from_factors(args.width_factor, args.depth_factor,
                                         args.width_kind, args.depth_kind)
    return None


def _convert(args: argparse.Namespace) -> int:
    runner = None
    if args.executor == "slurm":
        from mlmega.launch.conversion_job import SlurmConversion

        runner = SlurmConversion(Path(args.slurm_logs or f"{args.dst.rstrip('/')}.slurm"),
                                 ntasks=args.workers, partition=args.partition,
                                 time_limit_min=args.time_min, cpus_per_task=args.cpus_per_task)
        runner.check()  # before the (possibly long) validation of the checkpoint
    plan = plan_conversion(args.op, args.src, args.dst, target_tp=args.target_tp,
                           target_pp=args.target_pp, target_layers=args.target_pp_layers,
                           schemes=_schemes(args), large=args.large,
                           alpha=args.alpha, fmt=args.format, overwrite=args.overwrite,
                           checksums=args.checksums, vocab_size=args.vocab_size,
                           tokenizer=args.tokenizer, verify=not args.no_verify,
                           check_finite=args.check_finite, target_impl=args.transformer_impl)
    run_conversion(plan, workers=args.workers, overwrite=args.overwrite, runner=runner)
    return 0


def _inspect(args: argparse.Namespace) -> int:
    from rich.table import Table

    from mlmega.checkpoint.inspect import describe
    from mlmega.progress import console as wide_console

    info = describe(args.path, tensors=args.tensors, vocab_size=args.vocab_size,
                    tokenizer=args.tokenizer)
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    console = wide_console()
    summary = Table(title=str(args.path), show_header=False)
    for key in ("format", "arch", "iteration", "tp", "pp", "layers_per_pp_stage", "parameters",
                "padded_vocab", "vocab_source"):
        summary.add_row(key, f"{info[key]:,}" if key == "parameters" else str(info[key]))
    for key, value in info["model"].items():
        summary.add_row(f"model.{key}", str(value))
    console.print(summary)
    if args.tensors:
        table = Table(title="tensors (global shapes)")
        for column in ("name", "shape", "TP dim", "PP rank", "dtype"):
            table.add_column(column)
        for row in info["tensors"]:
            table.add_row(row["name"], str(row["shape"]), str(row["tp_dim"]), str(row["pp_rank"]),
                          row["dtype"])
        console.print(table)
    return 0


def _verify(args: argparse.Namespace) -> int:
    from rich.table import Table

    from mlmega.checkpoint.verify import verify_checkpoint
    from mlmega.progress import console as wide_console

    checked = verify_checkpoint(args.path, vocab_size=args.vocab_size, tokenizer=args.tokenizer)
    table = Table(title=f"{args.path}: verified")
    for column in ("file", "bytes", "checksummed records", "checked bytes"):
        table.add_column(column, justify="left" if column == "file" else "right")
    root = Path(args.path)
    for f in checked:
        table.add_row(str(f.path.relative_to(root)), f"{f.size:,}",
                      f"{f.records:,}" if f.records else "none", f"{f.checked_bytes:,}")
    wide_console().print(table)
    bare = [str(f.path.relative_to(root)) for f in checked if not f.records]
    print(f"{sum(f.records for f in checked):,} records ({sum(f.checked_bytes for f in checked):,} "
          f"bytes) in {len(checked)} file{'s' * (len(checked) != 1)} match their checksums"
          + (f"; without checksums, nothing to check in: {', '.join(bare)}" if bare else ""))
    return 0
