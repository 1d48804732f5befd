"""The true vocabulary of a checkpoint whose args lack it: given, or counted from a tokenizer, and
said; ambiguity is an error (mlmega.checkpoint.vocab)."""

from __future__ import annotations

import argparse
import json

import pytest
import torch

from mlmega.checkpoint.convert import save_full_state
from mlmega.checkpoint.dist_format import open_checkpoint
from mlmega.checkpoint.layout import ShardLayout
from mlmega.checkpoint.torch_format import load_file
from mlmega.config.errors import ConfigError
from mlmega.config.model import ModelConfig
from mlmega.data.tokenizer import vocabulary_size
from mlmega.models.params import param_shapes

CFG = ModelConfig(arch="gpt", num_layers=1, hidden_size=16, num_attention_heads=2, vocab_size=300,
                  max_sequence_length=8)


def random_state(cfg: ModelConfig, seed: int) -> dict[str, torch.Tensor]:
    """Every canonical tensor (padding rows included) random."""
    gen = torch.Generator().manual_seed(seed)
    return {name: torch.randn(shape, generator=gen) for name, shape in param_shapes(cfg).items()}


def as_megatron_training_saves(root, vocab_file=None, **changes) -> None:
    """Rewrite the args of torch checkpoint ``root`` as Megatron-LM's training saves them:
    vocab_size None (its tokenizer sets only padded_vocab_size), a GPT-2 tokenizer, no mlmega
    keys."""
    for path in root.glob("iter_*/mp_rank_*/model_optim_rng.pt"):
        content = load_file(path, mmap=False)
        args = {k: v for k, v in vars(content["args"]).items() if not k.startswith("mlmega_")}
        content["args"] = argparse.Namespace(**{**args, "vocab_size": None,
                                                "tokenizer_type": "GPT2BPETokenizer",
                                                "vocab_file": vocab_file, **changes})
        torch.save(content, path)


@pytest.fixture
def megatron_saved(tmp_path):
    """A TP2 checkpoint (512 padded rows) with Megatron-LM's args."""
    save_full_state(random_state(CFG, 5), ShardLayout(CFG, 2, 1), tmp_path / "ckpt")
    as_megatron_training_saves(tmp_path / "ckpt")
    return tmp_path / "ckpt"


def gpt2_vocab(path, size: int):
    path.write_text(json.dumps({f"t{i}": i for i in range(size)}))
    return path


def test_tokenizer_named_by_the_args_gives_the_vocabulary(tmp_path, megatron_saved):
    vocab = gpt2_vocab(tmp_path / "vocab.json", 300)
    as_megatron_training_saves(megatron_saved, vocab_file=str(vocab))
    ckpt = open_checkpoint(megatron_saved)
    assert (ckpt.layout.cfg.vocab_size, ckpt.layout.padded_vocab) == (300, 512)
    assert ckpt.vocab_source == f"the tokenizer args.vocab_file={vocab}"
    assert ckpt.args.tokenizer_type == "GPT2BPETokenizer"


def test_ambiguous_or_impossible_vocabularies_are_refused(tmp_path, megatron_saved):
    with pytest.raises(ConfigError, match=r"model_optim_rng\.pt: args\.vocab_size is None and "
                                          r"padded_vocab_size=512 \(shards: 512 rows\): the true "
                                          r"vocabulary is unknown; give it with --vocab-size N"):
        open_checkpoint(megatron_saved)
    with pytest.raises(ConfigError, match=r"vocabulary of 600 \(from --vocab-size\): expected a "
                                          r"positive size of at most the 512 rows the shards hold"):
        open_checkpoint(megatron_saved, vocab_size=600)
    save_full_state(random_state(CFG, 6), ShardLayout(CFG), tmp_path / "own")
    with pytest.raises(ConfigError, match=r"--vocab-size 301 differs from args\.vocab_size=300"):
        open_checkpoint(tmp_path / "own", vocab_size=301)
    as_megatron_training_saves(megatron_saved, padded_vocab_size=256)
    with pytest.raises(ConfigError, match=r"args\.padded_vocab_size=256 but embedding\.word_"
                                          r"embeddings\.weight has 256 rows per TP rank \(512 over "
                                          r"TP=2\)"):
        open_checkpoint(megatron_saved, vocab_size=300)


def test_vocabulary_size_of_tokenizer_files(tmp_path, prepared):
    """Counted as Megatron-LM's tokenizers count: GPT-2 vocab.json entries, WordPiece vocab.txt
    lines, a Hugging Face tokenizer.json with its added tokens (a prepared data directory's)."""
    from mlmega.data.gpt import load_tokenizer

    assert vocabulary_size(gpt2_vocab(tmp_path / "vocab.json", 77)) == 77
    (tmp_path / "vocab.txt").write_text("".join(f"w{i}\n" for i in range(41)))
    assert vocabulary_size(tmp_path / "vocab.txt") == 41
    assert vocabulary_size(prepared["gpt"]) == load_tokenizer(prepared["gpt"]).vocab_size
    (tmp_path / "bad.json").write_text("[1, 2]")
    with pytest.raises(ConfigError, match=r"bad\.json: expected a tokenizer\.json or a GPT-2 "
                                          r"vocab\.json \(a mapping\), got list"):
        vocabulary_size(tmp_path / "bad.json")
    with pytest.raises(ConfigError, match=r"missing\.json: cannot read the tokenizer"):
        vocabulary_size(tmp_path / "missing.json")


def test_cli_takes_and_says_the_vocabulary(tmp_path, megatron_saved, capsys):
    from mlmega.cli import main

    assert main(["inspect", str(megatron_saved), "--json"]) == 2
    assert "the true vocabulary is unknown; give it with --vocab-size N" in capsys.readouterr().err
    assert main(["inspect", str(megatron_saved), "--json", "--vocab-size", "300"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert (info["model"]["vocab_size"], info["padded_vocab"], info["vocab_source"]) == \
        (300, 512, "--vocab-size")
    vocab = gpt2_vocab(tmp_path / "vocab.json", 300)
    assert main(["convert", "reshard", "--src", str(megatron_saved), "--dst", str(tmp_path / "tp1"),
                 "--target-tp", "1", "--tokenizer", str(vocab)]) == 0
    assert f"vocabulary 300 (from --tokenizer {vocab}), padded to 384 rows for TP=1" in \
        capsys.readouterr().out
    out = open_checkpoint(tmp_path / "tp1")
    assert (out.layout.padded_vocab, out.args.vocab_size, out.vocab_source) == \
        (384, 300, "args.vocab_size")
