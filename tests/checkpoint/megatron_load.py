"""Load a checkpoint the way Megatron-LM's training does, on a CPU: a script run in a subprocess.

    python megatron_load.py PEER CKPT OUT GPT|BERT [SAVE]

Megatron-LM's ``parse_args`` with ``--load CKPT --use-checkpoint-args`` (the model comes from the
checkpoint's args, ``load_args_from_checkpoint``), ``validate_args``, its own model provider
(``model_provider.py`` + ``gpt_builders.py``, or ``pretrain_bert.py``) and
``megatron.training.checkpointing.load_checkpoint`` (strict); then one forward pass on fixed token
ids. Writes {"state": the model's state dict, "logits": ...} to OUT; with SAVE, also saves the
model there with Megatron-LM's ``save_checkpoint`` in torch_dist format. TP=1, PP=1. The
CPU patches are run_convert_on_cpu.py's (imported, none touches a tensor) and megatron_peer's BERT
import patch.
"""

import contextlib
import os
import sys

import torch

PEER, CKPT, OUT, MODEL_TYPE = sys.argv[1:5]
SAVE = sys.argv[5] if len(sys.argv) > 5 else None
IDS = torch.randint(0, 200, (2, 16), generator=torch.Generator().manual_seed(0))


def main() -> None:
    sys.path.insert(0, PEER)
    os.environ["MLM_PATCH_CUDA_DEVICE"] = "1"  # RoPE asks torch.cuda.current_device(): the CPU
    import run_convert_on_cpu  # noqa: F401  (its CPU patches)
    import megatron.core.models.bert.bert_layer_specs as bert_specs

    bert_specs.bert_layer_with_transformer_engine_spec = None  # see megatron_peer.py
    from megatron.core import mpu
    from megatron.training.arguments import parse_args, validate_args
    from megatron.training.checkpointing import load_args_from_checkpoint, load_checkpoint
    from megatron.training.global_vars import set_global_variables

    sys.argv = ["pretrain", "--load", CKPT, "--use-checkpoint-args", "--micro-batch-size", "1",
                "--no-load-optim", "--no-load-rng", "--use-cpu-initialization", "--mock-data",
                "--no-masked-softmax-fusion", "--no-bias-gelu-fusion", "--no-bias-dropout-fusion",
                "--no-persist-layer-norm", "--no-gradient-accumulation-fusion", "--no-rope-fusion",
                "--exit-on-missing-checkpoint", "--no-one-logger", "--transformer-impl", "local"]
    args, checkpoint_args = load_args_from_checkpoint(parse_args())
    args.fp16, args.bf16 = checkpoint_args.fp16, checkpoint_args.bf16
    # load_args_from_checkpoint does not carry the norm epsilon: a user passes --layernorm-epsilon
    args.layernorm_epsilon = checkpoint_args.layernorm_epsilon
    args.world_size = 1
    validate_args(args)
    set_global_variables(args, build_tokenizer=False)
    run_convert_on_cpu._init_gloo("load")
    mpu.destroy_model_parallel()  # the converter's fake groups: real one-rank groups instead
    mpu.initialize_model_parallel(1, 1)
    if MODEL_TYPE == "GPT":
        from functools import partial

        from gpt_builders import gpt_builder
        from model_provider import model_provider

        model = partial(model_provider, gpt_builder)(pre_process=True, post_process=True)
    else:
        from pretrain_bert import model_provider

        model = model_provider(pre_process=True, post_process=True)
    args.consumed_train_samples = args.consumed_valid_samples = 0
    iteration, _ = load_checkpoint([model], None, None, strict=True)
    model.eval()
    # attention dropout (off in eval) draws under the CUDA RNG tracker, which needs CUDA: no fork
    from megatron.core import tensor_parallel

    tensor_parallel.get_cuda_rng_tracker().fork = lambda *a, **k: contextlib.nullcontext()
    positions = torch.arange(IDS.shape[1]).expand_as(IDS)
    with torch.no_grad():
        if MODEL_TYPE == "GPT":
            causal = torch.ones(IDS.shape[1], IDS.shape[1]).triu(1).bool()  # True: masked out
            logits = model(IDS, positions, causal[None, None])
        else:
            logits, _ = model(IDS, torch.ones_like(IDS, dtype=torch.bool),
                              tokentype_ids=torch.zeros_like(IDS))
    if SAVE is not None:
        from megatron.training.checkpointing import save_checkpoint

        args.save, args.ckpt_format, args.use_dist_ckpt = SAVE, "torch_dist", True
        args.no_save_optim = args.no_save_rng = True
        save_checkpoint(iteration, [model], None, None, num_floating_point_operations_so_far=0)
    torch.save({"iteration": iteration, "logits": logits,
                "state": {k: v for k, v in model.state_dict().items()
                          if isinstance(v, torch.Tensor)}}, OUT)


if __name__ == "__main__":
    os.environ.setdefault("WORLD_SIZE", "1")
    main()
