"""One rank of a training stage: megatron-core model, DDP, optimizer, schedules, checkpoints.

Every rank of the stage's job runs :func:`train`. torch.distributed comes up from the environment
(RANK/WORLD_SIZE/MASTER_ADDR/MASTER_PORT, or SLURM's variables); megatron-core's parallel state
splits the world into TP x PP x DP. Pipeline stages run megatron-core's 1F1B schedule; gradients are
reduced over DP by megatron-core's DistributedDataParallel; megatron-core's optimizer (AdamW, grad
clipping; distributed over DP when ZeRO-1 is on) and LR scheduler (warm-up, linear/cosine decay)
step the weights. The performance switches (``cfg.performance``) are resolved once per run.
"""

from __future__ import annotations

import contextlib
import math
import os
from functools import partial
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist
import torch.nn.functional as nnf

from mlmega.checkpoint.layout import ShardLayout
from mlmega.config.errors import ConfigError
from mlmega.config.performance import PerformanceConfig
from mlmega.data.prepare import check_prepared
from mlmega.models.build import build_model
from mlmega.models.flops import training_flops_per_token
from mlmega.models.megatron_warnings import fallback_note
from mlmega.parallel.setup import init_model_parallel, init_process_group
from mlmega.train import checkpointing
from mlmega.config.train import TrainConfig
from mlmega.train.data import Batches, open_datasets
from mlmega.train.metrics import MetricsLog, StepTimer
from mlmega.train.signals import EXIT_INTERRUPTED, StopFlag


def train(cfg: TrainConfig) -> dict:
    """Train this rank's part of the model; returns a summary (identical on every rank)."""
    world = _init_distributed(cfg)
    from megatron.core import parallel_state as ps

    tp_rank, pp_rank = ps.get_tensor_model_parallel_rank(), ps.get_pipeline_model_parallel_rank()
    dp, dp_rank = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
    perf = cfg.performance.resolved(cfg.model.arch, cfg.tp, dp, torch.cuda.is_available())
    layout = ShardLayout(cfg.model, cfg.tp, cfg.pp, transformer_impl=perf.transformer_impl)
    is_logger = dist.get_rank() == 0
    dtype = _dtype(cfg)

    model = build_model(cfg.model, cfg.tp, cfg.pp, pre_process=ps.is_pipeline_first_stage(),
                        post_process=ps.is_pipeline_last_stage(), dtype=dtype, perf=perf)
    if torch.cuda.is_available():
        model.cuda()
    save_dir = Path(cfg.save_dir)
    start_step = 0
    resume = checkpointing.latest(save_dir)
    # The weights go in before the optimizer is built: under bf16 it keeps fp32 main copies of
    # the parameters, taken at construction, and its first step would write those back.
    if resume is not None:
        checkpointing.check_resumable(resume, layout)
        checkpointing.verify_rank_files(resume, tp_rank, pp_rank,
                                        perf.distributed_optimizer and dp_rank == 0)
        shard = resume.shard(tp_rank, pp_rank)
        _load_model(model, shard["model"], f"{resume.shard_path(tp_rank, pp_rank)}")
    elif cfg.init is not None:
        _load_init(model, cfg, layout, tp_rank, pp_rank)
        _log(is_logger, f"initialised from {cfg.init.checkpoint} ({cfg.init.op})")
    ddp, optimizer, scheduler = _optimizer(model, cfg, dtype, perf)
    if resume is not None:
        optimizer.load_state_dict(shard["optimizer"])
        if perf.distributed_optimizer:
            checkpointing.load_optimizer_shards(optimizer, resume, tp_rank, pp_rank, dp_rank)
        scheduler.load_state_dict(shard["opt_param_scheduler"])
        checkpointing.set_rng_state(shard["rng_state"])
        start_step = resume.iteration
        _check_consumed(cfg, start_step, shard["args"].consumed_train_samples, resume.directory)
        _log(is_logger, f"resumed from {resume.directory} at step {start_step}")

    train_set, val_set = open_datasets(cfg.model.arch, cfg.data_dir, cfg.seq_length, cfg.seed,
                                       cfg.data_samples or cfg.last_sample,
                                       max(cfg.eval_iters, 1) * cfg.global_batch_size)
    train_batches = Batches(train_set, cfg.global_batch_size, cfg.micro_batch_size, dp, dp_rank,
                            first_sample=cfg.first_sample)
    val_batches = Batches(val_set, cfg.global_batch_size, cfg.micro_batch_size, dp, dp_rank)

    flops_per_step = training_flops_per_token(cfg.model, cfg.seq_length) * \
        cfg.seq_length * cfg.global_batch_size
    tokens_per_step = cfg.seq_length * cfg.global_batch_size
    metrics = MetricsLog(cfg.metrics_path, is_logger)
    stop, timer = StopFlag(), StepTimer(start_step, cfg.steps)
    step_fn = partial(_run_step, ddp=ddp, cfg=cfg)
    _log(is_logger, f"training {cfg.model.arch} {cfg.model.num_layers}L-{cfg.model.hidden_size} "
                    f"TP={cfg.tp} PP={cfg.pp} DP={dp} steps {start_step}->{cfg.steps} "
                    f"({world} ranks, {str(dtype).replace('torch.', '')}, {_describe(perf)})")
    note = fallback_note()  # said once per job, here: megatron's own warnings are silenced
    if note:
        _log(is_logger, note)

    def save(step: int) -> None:
        with _params_gathered(ddp, perf):
            shards = checkpointing.gather_optimizer_shards(optimizer) \
                if perf.distributed_optimizer else None
            checkpointing.save(save_dir, layout, step, model.state_dict(), optimizer.state_dict(),
                               scheduler.state_dict(),
                               cfg.first_sample + step * cfg.global_batch_size, tp_rank,
                               pp_rank, dp_rank, extra_args=_checkpoint_args(cfg, perf),
                               optimizer_shards=shards)

    def evaluate(step: int) -> float:
        ddp.eval()
        with _params_gathered(ddp, perf):
            losses = [step_fn(val_batches.microbatches(i), forward_only=True)
                      for i in range(cfg.eval_iters)]
        ddp.train()
        val = sum(losses) / len(losses)
        metrics.write(step=step, val_loss=val, flops=cfg.flops_offset + step * flops_per_step,
                      tokens=step * tokens_per_step)
        _log(is_logger, f"step {step:6d} | validation loss {val:.4f}")
        return val

    val_loss, interrupted, step = None, False, start_step
    if start_step == 0 and cfg.init is not None:
        val_loss = evaluate(0)  # where the transformed weights start: the jump between levels
    for step in range(start_step + 1, cfg.steps + 1):
        ddp.zero_grad_buffer()
        optimizer.zero_grad()
        loss = step_fn(train_batches.microbatches(step - 1), forward_only=False)
        update_ok, grad_norm, _ = optimizer.step()
        scheduler.step(increment=1)
        seconds = timer.lap()
        lr = optimizer.param_groups[0]["lr"]
        if is_logger:
            metrics.write(step=step, loss=loss, lr=lr, grad_norm=grad_norm,
                          tokens_per_s=tokens_per_step / seconds,
                          tokens=step * tokens_per_step,
                          flops=cfg.flops_offset + step * flops_per_step,
                          flops_per_s=flops_per_step / seconds, seconds=seconds)
            if step % cfg.log_interval == 0 or step == cfg.steps:
                print(f"step {step:6d}/{cfg.steps} | loss {loss:.4f} | lr {lr:.3g} | grad norm "
                      f"{grad_norm:.3f} | {tokens_per_step / seconds:,.0f} tok/s | "
                      f"{flops_per_step / seconds / 1e9:.2f} GFLOP/s | ETA {timer.eta(step)}",
                      flush=True)
        if not math.isfinite(loss):
            raise FloatingPointError(f"loss became {loss} at step {step}")
        if cfg.eval_interval and step % cfg.eval_interval == 0 and step != cfg.steps:
            val_loss = evaluate(step)
        if stop.agreed():
            save(step)
            interrupted = True
            _log(is_logger, f"signal {stop.received}: saved step {step}, exiting for requeue")
            break
        if cfg.exit_interval and step % cfg.exit_interval == 0 and step != cfg.steps:
            save(step)
            interrupted = True
            _log(is_logger, f"exit_interval: saved step {step}, exiting")
            break
        if cfg.save_interval and step % cfg.save_interval == 0 and step != cfg.steps:
            save(step)
    if not interrupted:
        if start_step < cfg.steps or resume is None:
            val_loss = evaluate(cfg.steps)
            save(cfg.steps)
        step = cfg.steps
    return dict(step=step, interrupted=interrupted, val_loss=val_loss, save_dir=str(save_dir))


def _init_distributed(cfg: TrainConfig) -> int:
    env = os.environ
    if "RANK" not in env and "SLURM_PROCID" in env:  # srun without an exporting launcher
        env.setdefault("RANK", env["SLURM_PROCID"])
        env.setdefault("WORLD_SIZE", env["SLURM_NTASKS"])
        env.setdefault("LOCAL_RANK", env.get("SLURM_LOCALID", "0"))
    world = int(env.get("WORLD_SIZE", 1))
    if world % (cfg.tp * cfg.pp) or (cfg.dp and world != cfg.tp * cfg.pp * cfg.dp):
        raise ConfigError(f"{cfg.source}: world size {world} is not TP x PP x DP = {cfg.tp} x "
                          f"{cfg.pp} x {cfg.dp or '?'}")
    dp = world // (cfg.tp * cfg.pp)
    if cfg.global_batch_size % (cfg.micro_batch_size * dp):
        raise ConfigError(f"{cfg.source}: global_batch_size={cfg.global_batch_size} is not "
                          f"divisible by micro_batch_size x DP = {cfg.micro_batch_size} x {dp}")
    ShardLayout(cfg.model, cfg.tp, cfg.pp)  # heads/layers divisible by TP/PP
    check_prepared(cfg.data_dir, cfg.model.arch, cfg.model.vocab_size, cfg.source)
    init_process_group()
    init_model_parallel(cfg.tp, cfg.pp, seed=cfg.seed)
    return world


def _check_consumed(cfg: TrainConfig, step: int, consumed: int, source) -> None:
    expected = cfg.first_sample + step * cfg.global_batch_size
    if consumed != expected:
        raise ConfigError(f"{source}: consumed_train_samples={consumed} at step {step}, but "
                          f"{cfg.source} reads sample {expected} next (first_sample="
                          f"{cfg.first_sample}, global_batch_size={cfg.global_batch_size}); "
                          f"the stage's data settings changed since the checkpoint")


def _dtype(cfg: TrainConfig) -> torch.dtype:
    if cfg.precision == "auto":
        return torch.bfloat16 if torch.cuda.is_available() else torch.float32
    if cfg.precision == "bf16" and not torch.cuda.is_available():
        raise ConfigError(f"{cfg.source}: precision='bf16' needs a GPU (megatron-core's mixed "
                          f"precision optimizer is CUDA-only); use 'auto' or 'fp32' on CPU")
    return torch.bfloat16 if cfg.precision == "bf16" else torch.float32


def _describe(perf: PerformanceConfig) -> str:
    switches = [name for name, on in (("distributed optimizer", perf.distributed_optimizer),
                                      ("overlapped grad reduce", perf.overlap_grad_reduce),
                                      ("overlapped param gather", perf.overlap_param_gather),
                                      ("sequence parallel", perf.sequence_parallel),
                                      ("fused kernels", perf.fused_kernels)) if on]
    if perf.recompute != "none":
        switches.append(f"{perf.recompute} recompute")
    return ", ".join([f"{perf.transformer_impl} spec"] + switches)


def _checkpoint_args(cfg: TrainConfig, perf: PerformanceConfig) -> dict:
    """Checkpoint args: the run's config, and the switches under Megatron-LM's argument names."""
    recompute = None if perf.recompute == "none" else perf.recompute
    return {"mlmega_train": cfg.replace(performance=perf).to_dict(),
            "use_distributed_optimizer": perf.distributed_optimizer,
            "overlap_grad_reduce": perf.overlap_grad_reduce,
            "overlap_param_gather": perf.overlap_param_gather,
            "sequence_parallel": perf.sequence_parallel, "recompute_granularity": recompute}


@contextlib.contextmanager
def _params_gathered(ddp, perf: PerformanceConfig):
    """With overlapped param gather the weights are gathered lazily in the next forward's hooks:
    gather them now (for evaluation and checkpoints), and hook them again afterwards."""
    if not perf.overlap_param_gather:
        yield
        return
    ddp.disable_forward_pre_hook(param_sync=True)
    try:
        yield
    finally:
        ddp.enable_forward_pre_hook()


def _optimizer(model, cfg: TrainConfig, dtype: torch.dtype, perf: PerformanceConfig):
    from megatron.core.distributed import (DistributedDataParallel, DistributedDataParallelConfig,
                                           finalize_model_grads)
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    bf16 = dtype == torch.bfloat16
    ddp = DistributedDataParallel(model.config, DistributedDataParallelConfig(
        grad_reduce_in_fp32=True, overlap_grad_reduce=perf.overlap_grad_reduce,
        overlap_param_gather=perf.overlap_param_gather,
        use_distributed_optimizer=perf.distributed_optimizer), model)
    opt = cfg.optimizer
    optimizer = get_megatron_optimizer(OptimizerConfig(
        optimizer="adam", lr=opt.lr, min_lr=opt.min_lr, weight_decay=opt.weight_decay,
        adam_beta1=opt.beta1, adam_beta2=opt.beta2, adam_eps=opt.eps, clip_grad=opt.clip_grad,
        bf16=bf16, params_dtype=dtype, use_distributed_optimizer=perf.distributed_optimizer),
        [ddp])
    scheduler = OptimizerParamScheduler(
        optimizer, init_lr=0.0 if opt.warmup_steps else opt.lr, max_lr=opt.lr, min_lr=opt.min_lr,
        lr_warmup_steps=opt.warmup_steps, lr_decay_steps=cfg.steps,
        lr_decay_style=opt.decay_style, start_wd=opt.weight_decay, end_wd=opt.weight_decay,
        wd_incr_steps=cfg.steps, wd_incr_style="constant")
    config = model.config
    config.finalize_model_grads_func = finalize_model_grads
    config.no_sync_func = ddp.no_sync
    if perf.overlap_grad_reduce:  # as Megatron-LM: the schedule starts each stage's grad reduce
        config.grad_sync_func = ddp.start_grad_sync
    return ddp, optimizer, scheduler


def _run_step(microbatches: list[dict], forward_only: bool, ddp, cfg: TrainConfig) -> float:
    """Forward (and backward) over this rank's micro-batches; the mean loss on every rank."""
    from megatron.core import parallel_state as ps
    from megatron.core.pipeline_parallel import get_forward_backward_func

    device = torch.cuda.current_device() if torch.cuda.is_available() else "cpu"

    def forward_step(data_iterator, model):
        batch = {k: v.to(device) for k, v in next(data_iterator).items()}
        mask = batch["loss_mask"].float()
        sop_logits = None
        if cfg.model.arch == "gpt":
            output = model(batch["tokens"], batch["position_ids"], None, labels=batch["labels"])
        else:
            labels = batch["labels"].clamp(min=0)  # unmasked positions: ignored via loss_mask
            output = model(batch["text"], batch["padding_mask"], tokentype_ids=batch["types"],
                           lm_labels=labels)
            if isinstance(output, tuple):  # last pipeline stage: (MLM loss, binary logits)
                output, sop_logits = output

        def loss_func(per_token):
            loss = (per_token.float() * mask).sum() / mask.sum().clamp(min=1)
            if sop_logits is not None:  # Megatron-LM's BERT loss: MLM + sentence order
                loss = loss + nnf.cross_entropy(sop_logits.view(-1, 2).float(),
                                                batch["is_random"].view(-1), ignore_index=-1)
            # clone: the schedule divides the returned loss in place by the micro-batch count
            return loss, {"loss": loss.detach().clone()}

        return output, loss_func

    results = get_forward_backward_func()(
        forward_step_func=forward_step, data_iterator=iter(microbatches), model=[ddp],
        num_microbatches=len(microbatches), seq_length=cfg.seq_length,
        micro_batch_size=cfg.micro_batch_size, forward_only=forward_only)
    # The last stage holds the losses: average them over micro-batches and DP, then share.
    loss = torch.zeros(1, dtype=torch.float64, device=device)
    if ps.is_pipeline_last_stage():
        loss += sum(r["loss"].double() for r in results) / len(results)
        dist.all_reduce(loss, group=ps.get_data_parallel_group())
        loss /= ps.get_data_parallel_world_size()
    dist.all_reduce(loss, group=ps.get_pipeline_model_parallel_group())  # others hold zeros
    return loss.item()


def _load_model(model, state: dict, source: str) -> None:
    result = model.load_state_dict(state, strict=False)
    missing = [k for k in result.missing_keys if not k.endswith("_extra_state")]
    unexpected = [k for k in result.unexpected_keys if not k.endswith("_extra_state")]
    if missing or unexpected:
        raise ConfigError(f"{source}: does not fit this rank's model: missing {missing[:5]}, "
                          f"unexpected {unexpected[:5]}")


def _load_init(model, cfg: TrainConfig, layout: ShardLayout, tp_rank: int, pp_rank: int) -> None:
    """Load the previous level's checkpoint, transformed for this rank, into the model."""
    from mlmega.checkpoint.convert_plan import plan_conversion
    from mlmega.checkpoint.convert_tensors import rank_tensors

    init = cfg.init
    plan = plan_conversion(init.op, init.checkpoint, None, target_tp=cfg.tp, target_pp=cfg.pp,
                           schemes=init.schemes, large=init.large, alpha=init.alpha,
                           target_impl=layout.transformer_impl)
    if plan.target.cfg != cfg.model:
        raise ConfigError(f"{cfg.source}: init {init.op} of {init.checkpoint} gives another model "
                          f"than this stage trains (init vs stage): "
                          f"{plan.target.cfg.differences(cfg.model)}")
    dtype = next(model.parameters()).dtype
    state = {name: tensor.to(dtype) for name, tensor in rank_tensors(plan, tp_rank, pp_rank)}
    _load_model(model, state, f"init from {init.checkpoint}")


def _log(enabled: bool, message: str) -> None:
    if enabled:
        print(message, flush=True)


def main(config_path: str, overrides: Optional[list[str]] = None) -> int:
    """``mlmega train CONFIG``: the entry every rank runs."""
    from mlmega.parallel.setup import teardown

    cfg = TrainConfig.from_yaml(config_path)
    try:
        result = train(cfg)
    finally:
        teardown()
    return EXIT_INTERRUPTED if result["interrupted"] and result["step"] < cfg.steps else 0
