"""``convert reshard --target-pp-layers``: an uneven pipeline split, written as Megatron expresses
it (decoder_first/last_pipeline_num_layers) and placed as megatron-core places the layers."""

from __future__ import annotations

import argparse

import pytest
import torch

from mlmega.checkpoint.formats import load_full_state, save_full_state
from mlmega.checkpoint.layout import ShardLayout
from mlmega.checkpoint.torch_format import TorchCheckpoint
from mlmega.cli.main import main
from mlmega.config.model import ModelConfig
from tests.helpers import make_model_state

CFG = ModelConfig(arch="gpt", num_layers=8, hidden_size=32, num_attention_heads=4, vocab_size=100,
                  max_sequence_length=16)


def megatron_placement(args: argparse.Namespace) -> list[range]:
    """The layers megatron-core builds on each pipeline rank for a checkpoint's args."""
    from megatron.core.transformer import TransformerConfig
    from megatron.core.transformer.transformer_block import get_num_layers_to_build
    from megatron.core.transformer.transformer_layer import get_transformer_layer_offset

    config = TransformerConfig(
        num_layers=args.num_layers, hidden_size=args.hidden_size,
        num_attention_heads=args.num_attention_heads,
        pipeline_model_parallel_size=args.pipeline_model_parallel_size,
        pipeline_dtype=torch.float32,
        num_layers_in_first_pipeline_stage=getattr(args, "decoder_first_pipeline_num_layers", None),
        num_layers_in_last_pipeline_stage=getattr(args, "decoder_last_pipeline_num_layers", None))
    placement = []
    for pp_rank in range(args.pipeline_model_parallel_size):
        start = get_transformer_layer_offset(config, pp_rank=pp_rank)
        placement.append(range(start, start + get_num_layers_to_build(config, pp_rank=pp_rank)))
    return placement


@pytest.mark.parametrize("layers", ["3,5", "1,3,3,1"])
def test_reshard_to_an_uneven_pipeline_split(tmp_path, model_parallel, layers):
    state = make_model_state(CFG, seed=0)
    save_full_state(state, ShardLayout(CFG, 2, 2), tmp_path / "src", iteration=2)
    assert main(["convert", "reshard", "--src", str(tmp_path / "src"), "--dst",
                 str(tmp_path / "out"), "--target-tp", "1", "--target-pp-layers", layers]) == 0
    ckpt = TorchCheckpoint.open(tmp_path / "out")
    counts = tuple(int(n) for n in layers.split(","))
    assert (ckpt.layout.tp, ckpt.layout.pp, ckpt.layout.layers_per_pp_stage) == \
        (1, len(counts), counts)
    args = ckpt.args
    assert (args.decoder_first_pipeline_num_layers, args.decoder_last_pipeline_num_layers) == \
        (counts[0], counts[-1])
    # megatron-core, reading those args, builds the layers where the checkpoint put them
    assert megatron_placement(args) == [ckpt.layout.pp_stage_layers(p) for p in range(len(counts))]
    back, _ = load_full_state(tmp_path / "out")
    assert all(torch.equal(back[k], state[k]) for k in state), "reshard must be bit-exact"


def test_an_unchanged_layout_is_an_error_not_a_copy(tmp_path, model_parallel, capsys):
    save_full_state(make_model_state(CFG, seed=0), ShardLayout(CFG, 2, 2), tmp_path / "src")
    assert main(["convert", "reshard", "--src", str(tmp_path / "src"), "--dst",
                 str(tmp_path / "out")]) == 2
    assert "give another --target-tp, --target-pp, --target-pp-layers or --format" in \
        capsys.readouterr().err
    assert not (tmp_path / "out").exists()
    with pytest.raises(SystemExit):
        main(["convert", "reshard", "--src", "x", "--dst", "y", "--target-pp-layers", "3;5"])
    assert "'3;5': expected comma-separated layer counts" in capsys.readouterr().err
