"""Size a stage's job from its model: the fewest GPUs whose memory holds the stage.

Memory per GPU (bf16 mixed precision with megatron-core's optimizer, no distributed optimizer):
  model states  18 bytes per parameter on the GPU (bf16 weight 2, fp32 main grad 4, fp32 master
                weight 4, Adam moments 8), parameters = the largest pipeline stage's share / TP;
  activations   s*b*h*(34 + 5*a*s/h) bytes per layer and micro-batch (Korthikanti et al. 2022,
                no recomputation), / TP, x layers on the stage, x PP micro-batches in flight (1F1B);
  logits        s*b*V/TP fp32 values, twice (output and gradient), on the last stage.
Search order: total GPUs ascending (from ``min_gpus``); for each, TP = 1, 2, 4, ... up to the GPUs of
one node before any PP > 1; the global batch is kept (DP must divide it).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from mlmega.config.errors import ConfigError
from mlmega.config.model import ModelConfig
from mlmega.models.params import iter_params, space_size

BYTES_PER_PARAM = 18


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


def memory_per_gpu_gb(cfg: ModelConfig, tp: int, pp: int, micro: int, seq: int) -> float:
    states = BYTES_PER_PARAM * stage_param_counts(cfg, pp) / tp
    h, a = cfg.hidden_size, cfg.num_attention_heads
    per_layer = seq * micro * h * (34 + 5 * a * seq / h) / tp
    activations = per_layer * math.ceil(cfg.num_layers / pp) * pp
    logits = 2 * 4 * seq * micro * cfg.padded_vocab_size(tp) / tp
    return (states + activations + logits) / 1e9


def _tp_sizes(cfg: ModelConfig, limit: int) -> list[int]:
    return [tp for tp in (1, 2, 4, 8, 16) if tp <= limit and cfg.num_query_groups % tp == 0
            and cfg.num_attention_heads % tp == 0 and cfg.ffn_hidden_size % tp == 0]


def size_stage(cfg: ModelConfig, micro: int, global_batch: int, seq: int, gpus_per_node: int,
               max_nodes: int, gpu_memory_gb: float, headroom: float, min_gpus: int = 1,
               what: str = "stage") -> Resources:
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
                need = memory_per_gpu_gb(cfg, tp, pp, micro, seq)
                best = need if best is None else min(best, need)
                if need <= budget:
                    return Resources(math.ceil(gpus / gpus_per_node), min(gpus, gpus_per_node),
                                     gpus_per_node, tp, pp, dp, micro, global_batch, need)
    raise ConfigError(f"{what} ({cfg.num_layers}L-{cfg.hidden_size}, "
                      f"{cfg.num_attention_heads} heads) does not fit {max_nodes} node(s) x "
                      f"{gpus_per_node} GPU(s) of {gpu_memory_gb:g} GB (headroom {headroom:g}): "
                      f"the best layout needs {best or float('nan'):.1f} GB per GPU; raise "
                      f"cluster.max_nodes, lower training.micro_batch_size or use larger GPUs")


def fixed_resources(cfg: ModelConfig, tp: int, pp: int, dp: int, micro: int, global_batch: int,
                    seq: int, tasks_per_node: int, gpus_per_node: int,
                    what: str = "stage") -> Resources:
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
    return Resources(math.ceil(world / per_node), per_node, gpus_per_node, tp, pp, dp, micro,
                     global_batch, memory_per_gpu_gb(cfg, tp, pp, micro, seq) if gpus_per_node else 0)
