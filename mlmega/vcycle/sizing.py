"""Size a stage's job from its model: the fewest GPUs whose memory holds the stage.

Memory per GPU (:func:`memory_per_gpu`; bf16 mixed precision with megatron-core's optimizer), for
the largest pipeline stage's parameters / TP (P):
  weights       2 bytes x P (bf16);
  gradients     4 bytes x P (fp32 main grads, grad_reduce_in_fp32);
  optimizer     12 bytes x P (fp32 master weight 4, Adam moments 8), / DP with the distributed
                optimizer (ZeRO-1 shards it over the data-parallel ranks);
  activations   per layer and micro-batch (Korthikanti et al. 2022, bytes; t = TP, a = heads):
                  no recompute          s*b*h*(10 + 24/t + 5*a*s/(h*t)), sequence parallel: all / t
                  selective recompute   s*b*h*(10 + 24/t) (attention scores recomputed), SP: 34/t
                  full recompute        2*s*b*h per layer (its input, bf16), SP: / t, plus one
                                        layer's activations without recompute while it reruns;
                x layers on the stage x PP micro-batches in flight (1F1B on the first stage);
  logits        s*b*V/TP fp32 values, twice (output and gradient), on the last stage.
Search order: total GPUs ascending (from ``min_gpus``); for each, TP = 1, 2, 4, ... up to the GPUs of
one node before any PP > 1; the global batch is kept (DP must divide it). Each layout takes the
least recomputation that fits (none, selective, full) unless the recipe fixes it; the distributed
optimizer and sequence parallelism count as the recipe's ``performance`` section resolves them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

from mlmega.config.errors import ConfigError
from mlmega.config.model import ModelConfig
from mlmega.config.performance import RECOMPUTE, PerformanceConfig
from mlmega.models.params import iter_params, space_size

WEIGHT_BYTES, GRAD_BYTES, OPTIMIZER_BYTES = 2, 4, 12  # per parameter (bf16, fp32, fp32 + Adam)
RECOMPUTE_CHOICES = tuple(r for r in RECOMPUTE if r != "auto")  # least recomputation first


@dataclass(frozen=True)
class Resources:
    """A stage's job: nodes x tasks, and how its ranks split into TP x PP x DP."""

    nodes: int
    tasks_per_node: int
    gpus_per_node: int
    tp: int
    pp: int
    dp: int
    micro_batch_size: int
    global_batch_size: int
    memory_gb: float  # estimated peak per GPU (0 for CPU runs)
    recompute: str = "none"  # the activation recomputation the estimate assumes

    @property
    def world(self) -> int:
        return self.tp * self.pp * self.dp


def stage_param_counts(cfg: ModelConfig, pp: int) -> int:
    """Parameters of the largest pipeline stage (first or last, with embeddings/heads)."""
    per_layer, first, last = 0, 0, 0
    for name, spec, layer in iter_params(cfg):
        count = math.prod(cfg.vocab_size if d == "vocab" else space_size(cfg, d) for d in spec.dims)
        if layer == 0:
            per_layer += count
        elif layer is None and spec.stage == "first":
            first += count
        elif layer is None:
            last += count
    if cfg.tie_embeddings and pp > 1:
        last += cfg.vocab_size * cfg.hidden_size
    layers = math.ceil(cfg.num_layers / pp)
    if pp == 1:
        return per_layer * layers + first + last
    return per_layer * layers + max(first, last)


@dataclass(frozen=True)
class Memory:
    """Estimated peak bytes per GPU, by kind (see the module docstring)."""

    weights: float
    gradients: float
    optimizer: float
    activations: float
    logits: float

    @property
    def total_gb(self) -> float:
        return (self.weights + self.gradients + self.optimizer + self.activations
                + self.logits) / 1e9


def memory_per_gpu(cfg: ModelConfig, tp: int, pp: int, dp: int, micro: int, seq: int,
                   perf: PerformanceConfig) -> Memory:
    """Bytes per GPU of the largest pipeline stage at TP x PP x DP with the switches of ``perf``
    (resolved: distributed_optimizer, sequence_parallel and recompute are taken as they are)."""
    params = stage_param_counts(cfg, pp) / tp
    optimizer = OPTIMIZER_BYTES * params / (dp if perf.distributed_optimizer else 1)
    sbh, t = seq * micro * cfg.hidden_size, tp
    attention = 5 * cfg.num_attention_heads * seq / cfg.hidden_size  # the s x s scores, softmax
    sp = bool(perf.sequence_parallel) and tp > 1
    stored = (34 / t if sp else 10 + 24 / t) * sbh  # every layer keeps these but the scores
    whole_layer = stored + attention * sbh / t
    layers_in_flight = math.ceil(cfg.num_layers / pp) * pp
    if perf.recompute == "full":
        activations = 2 * sbh / (t if sp else 1) * layers_in_flight + whole_layer
    elif perf.recompute == "selective":
        activations = stored * layers_in_flight
    else:
        activations = whole_layer * layers_in_flight
    logits = 2 * 4 * seq * micro * cfg.padded_vocab_size(tp) / tp
    return Memory(WEIGHT_BYTES * params, GRAD_BYTES * params, optimizer, activations, logits)


def memory_per_gpu_gb(cfg: ModelConfig, tp: int, pp: int, micro: int, seq: int, dp: int = 1,
                      perf: PerformanceConfig = PerformanceConfig()) -> float:
    """Estimated peak GB per GPU, ``perf`` resolved for this layout on GPU nodes with
    TransformerEngine."""
    resolved = perf.resolved(cfg.arch, tp, dp, cuda=True, kernels=True)
    return memory_per_gpu(cfg, tp, pp, dp, micro, seq, resolved).total_gb


def _least_recompute(cfg: ModelConfig, tp: int, pp: int, dp: int, micro: int, seq: int,
                     perf: PerformanceConfig, budget_gb: float) -> tuple[str, float]:
    """(recompute, GB per GPU): the least recomputation that fits ``budget_gb`` (the recipe's own
    choice when it fixes one), or the most there is when none fits."""
    choices = RECOMPUTE_CHOICES if perf.recompute == "auto" else (perf.recompute,)
    for recompute in choices:
        need = memory_per_gpu_gb(cfg, tp, pp, micro, seq, dp, replace(perf, recompute=recompute))
        if need <= budget_gb:
            break
    return recompute, need


def _tp_sizes(cfg: ModelConfig, limit: int) -> list[int]:
    return [tp for tp in (1, 2, 4, 8, 16) if tp <= limit and cfg.num_query_groups % tp == 0
            and cfg.num_attention_heads % tp == 0 and cfg.ffn_hidden_size % tp == 0]


def size_stage(cfg: ModelConfig, micro: int, global_batch: int, seq: int, gpus_per_node: int,
               max_nodes: int, gpu_memory_gb: float, headroom: float, min_gpus: int = 1,
               what: str = "stage", perf: PerformanceConfig = PerformanceConfig()) -> Resources:
    """The smallest GPU job that holds ``cfg`` (see the module docstring for the rules)."""
    budget = gpu_memory_gb * headroom
    max_gpus = gpus_per_node * max_nodes
    best = None
    for gpus in range(max(min_gpus, 1), max_gpus + 1):
        for pp in [p for p in range(1, cfg.num_layers + 1) if cfg.num_layers % p == 0]:
            for tp in _tp_sizes(cfg, gpus_per_node):
                if gpus % (tp * pp):
                    continue
                dp = gpus // (tp * pp)
                if global_batch % (micro * dp):
                    continue
                recompute, need = _least_recompute(cfg, tp, pp, dp, micro, seq, perf, budget)
                best = need if best is None else min(best, need)
                if need <= budget:
                    return Resources(math.ceil(gpus / gpus_per_node), min(gpus, gpus_per_node),
                                     gpus_per_node, tp, pp, dp, micro, global_batch, need,
                                     recompute)
    raise ConfigError(f"{what} ({cfg.num_layers}L-{cfg.hidden_size}, "
                      f"{cfg.num_attention_heads} heads) does not fit {max_nodes} node(s) x "
                      f"{gpus_per_node} GPU(s) of {gpu_memory_gb:g} GB (headroom {headroom:g}): "
                      f"the best layout needs {best or float('nan'):.1f} GB per GPU; raise "
                      f"cluster.max_nodes, lower training.micro_batch_size or use larger GPUs")


def fixed_resources(cfg: ModelConfig, tp: int, pp: int, dp: int, micro: int, global_batch: int,
                    seq: int, tasks_per_node: int, gpus_per_node: int,
                    what: str = "stage", perf: PerformanceConfig = PerformanceConfig(),
                    gpu_memory_gb: float = math.inf) -> Resources:
    """A job of exactly TP x PP x DP ranks (CPU runs, or a forced layout)."""
    if cfg.num_attention_heads % tp or cfg.num_query_groups % tp or cfg.num_layers % pp:
        raise ConfigError(f"{what}: TP={tp}, PP={pp} do not divide the model "
                          f"({cfg.num_attention_heads} heads, {cfg.num_query_groups} query groups, "
                          f"{cfg.num_layers} layers)")
    if global_batch % (micro * dp):
        raise ConfigError(f"{what}: global batch {global_batch} is not divisible by micro batch "
                          f"{micro} x DP {dp}")
    world = tp * pp * dp
    per_node = min(tasks_per_node, world)
    recompute, need = ("none" if perf.recompute == "auto" else perf.recompute, 0.0)
    if gpus_per_node:
        recompute, need = _least_recompute(cfg, tp, pp, dp, micro, seq, perf, gpu_memory_gb)
    return Resources(math.ceil(world / per_node), per_node, gpus_per_node, tp, pp, dp, micro,
                     global_batch, need, recompute)
