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
Not counted: the CUDA context, NCCL buffers, allocator fragmentation (``sizing.memory_headroom``
leaves room for them).

Layouts: nodes x ranks per node is exactly TP x PP x DP, one rank per GPU: the ranks fit one node
(all or part of it) or fill whole nodes, and a TP group (consecutive ranks) stays inside a node
(TP divides the GPUs of a node). Search order: total GPUs ascending (from ``min_gpus``); for each,
TP = 1, 2, 4, ... up to the GPUs of one node before any PP > 1; the global batch is kept (DP must
divide it). TP, PP or DP
forced in the recipe (``sizing.tp/pp/dp``) restrict the search: a forced layout passes the same
checks (memory, ``min_gpus``, whole nodes, TP inside a node) as a chosen one. Each layout takes the
least recomputation that fits (none, selective, full) unless the recipe fixes it; the distributed
optimizer and sequence parallelism count as the recipe's ``performance`` section resolves them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Optional

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

    def __post_init__(self) -> None:
        if self.nodes * self.tasks_per_node != self.world:
            raise ValueError(f"{self.nodes} node(s) x {self.tasks_per_node} rank(s) do not hold "
                             f"TP {self.tp} x PP {self.pp} x DP {self.dp} ranks")

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
        elif layer is None and spec.pp_stage == "first":
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


def _tp_sizes(cfg: ModelConfig, per_node: int) -> list[int]:
    return [tp for tp in (1, 2, 4, 8, 16) if per_node % tp == 0 and cfg.num_query_groups % tp == 0
            and cfg.num_attention_heads % tp == 0 and cfg.ffn_hidden_size % tp == 0]


def placement(world: int, per_node: int, tp: int, gpus: bool) -> Optional[tuple[int, int]]:
    """(nodes, ranks per node) holding exactly ``world`` ranks, at most ``per_node`` per node: one
    node when they fit in it, else whole nodes; on GPU nodes each TP group inside one node. None
    when no such split exists."""
    if world <= per_node:
        return 1, world
    if world % per_node or (gpus and per_node % tp):
        return None
    return world // per_node, per_node


def size_stage(cfg: ModelConfig, micro: int, global_batch: int, seq: int, gpus_per_node: int,
               max_nodes: int, gpu_memory_gb: float, headroom: float, min_gpus: int = 1,
               what: str = "stage", tp: Optional[int] = None, pp: Optional[int] = None,
               dp: Optional[int] = None,
               perf: PerformanceConfig = PerformanceConfig()) -> Resources:
    """The smallest GPU job holding ``cfg``, TP/PP/DP as forced, with the least recomputation
    that fits (see the module docstring)."""
    _check_forced(cfg, tp, pp, dp, micro, global_batch, gpus_per_node, what)
    forced = tp and pp and dp
    if forced:
        _check_forced_world(tp * pp * dp, tp, gpus_per_node, max_nodes, min_gpus, what)
    budget = gpu_memory_gb * headroom
    pp_sizes = [pp] if pp else [p for p in range(1, cfg.num_layers + 1) if cfg.num_layers % p == 0]
    tp_sizes = [tp] if tp else _tp_sizes(cfg, gpus_per_node)
    best = None
    for gpus in range(max(min_gpus, 1), gpus_per_node * max_nodes + 1):
        for p in pp_sizes:
            for t in tp_sizes:
                d = gpus // (t * p)
                where = placement(gpus, gpus_per_node, t, gpus=True)
                if gpus % (t * p) or (dp and d != dp) or global_batch % (micro * d) or not where:
                    continue
                recompute, need = _least_recompute(cfg, t, p, d, micro, seq, perf, budget)
                best = need if best is None else min(best, need)
                if need <= budget:
                    return Resources(*where, gpus_per_node, t, p, d, micro, global_batch, need,
                                     recompute)
    if forced:
        raise ConfigError(f"{what}: sizing.tp/pp/dp={tp}/{pp}/{dp} needs {best:.1f} GB per GPU "
                          f"but sizing.gpu_memory_gb={gpu_memory_gb:g} x memory_headroom="
                          f"{headroom:g} allows {budget:.1f} GB; force a layout with more GPUs "
                          f"(or leave sizing.tp/pp/dp unset to let the plan choose)")
    fixed = ", ".join(f"sizing.{k}={v}" for k, v in (("tp", tp), ("pp", pp), ("dp", dp)) if v)
    raise ConfigError(f"{what} ({cfg.num_layers}L-{cfg.hidden_size}, "
                      f"{cfg.num_attention_heads} heads{', ' + fixed if fixed else ''}) does "
                      f"not fit {max_nodes} node(s) x {gpus_per_node} GPU(s) of "
                      f"{gpu_memory_gb:g} GB (headroom {headroom:g}): the best layout needs "
                      f"{best or float('nan'):.1f} GB per GPU; raise cluster.max_nodes, lower "
                      f"training.micro_batch_size or use larger GPUs")


def fixed_resources(cfg: ModelConfig, tp: int, pp: int, dp: int, micro: int, global_batch: int,
                    tasks_per_node: int, what: str = "stage") -> Resources:
    """A CPU job of exactly TP x PP x DP ranks (gloo): as many ranks per node as divide the world,
    at most ``tasks_per_node``."""
    _check_forced(cfg, tp, pp, dp, micro, global_batch, 0, what)
    world = tp * pp * dp
    per_node = max(n for n in range(1, min(tasks_per_node, world) + 1) if world % n == 0)
    return Resources(world // per_node, per_node, 0, tp, pp, dp, micro, global_batch, 0.0)


def _check_forced(cfg: ModelConfig, tp: Optional[int], pp: Optional[int], dp: Optional[int],
                  micro: int, global_batch: int, gpus_per_node: int, what: str) -> None:
    """ConfigError naming the sizing key when a forced TP, PP or DP cannot hold the model."""
    if tp and (cfg.num_attention_heads % tp or cfg.num_query_groups % tp
               or cfg.ffn_hidden_size % tp):
        raise ConfigError(f"{what}: sizing.tp={tp} does not divide the model "
                          f"({cfg.num_attention_heads} heads, {cfg.num_query_groups} query groups, "
                          f"FFN {cfg.ffn_hidden_size})")
    if pp and cfg.num_layers % pp:
        raise ConfigError(f"{what}: sizing.pp={pp} does not divide the model's "
                          f"{cfg.num_layers} layers")
    if tp and gpus_per_node and gpus_per_node % tp:
        raise ConfigError(f"{what}: sizing.tp={tp} does not divide cluster.gpus_per_node="
                          f"{gpus_per_node}: a TP group stays inside one node")
    if dp and global_batch % (micro * dp):
        raise ConfigError(f"{what}: sizing.dp={dp}: global batch {global_batch} is not divisible "
                          f"by micro batch {micro} x DP {dp}")


def _check_forced_world(world: int, tp: int, gpus_per_node: int, max_nodes: int, min_gpus: int,
                        what: str) -> None:
    """ConfigError naming what a fully forced layout of ``world`` GPUs breaks."""
    layout = f"sizing.tp x pp x dp = {world} GPU(s)"
    if world < min_gpus:
        raise ConfigError(f"{what}: {layout} is below sizing.min_gpus={min_gpus}")
    where = placement(world, gpus_per_node, tp, gpus=True)
    if where is None:
        raise ConfigError(f"{what}: {layout} do not fill whole nodes of cluster.gpus_per_node="
                          f"{gpus_per_node}")
    if where[0] > max_nodes:
        raise ConfigError(f"{what}: {layout} need {where[0]} nodes of {gpus_per_node} GPUs but "
                          f"cluster.max_nodes={max_nodes}")
