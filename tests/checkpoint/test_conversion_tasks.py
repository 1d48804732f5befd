"""How conversion work is cut into worker tasks (each task writes its ranks' files)."""

import pytest

from mlmega.checkpoint.convert import conversion_tasks
from mlmega.checkpoint.layout import ShardLayout
from mlmega.config.model import ModelConfig


@pytest.mark.parametrize("tp,pp,workers,parts", [(4, 2, 1, 1), (4, 2, 2, 1), (4, 2, 4, 2),
                                                 (4, 2, 16, 4), (3, 1, 2, 2), (1, 4, 8, 1)])
def test_conversion_tasks_cover_every_rank_once(tp, pp, workers, parts):
    """A stage's TP ranks share a task (each full tensor mapped once) unless the workers need
    more tasks: then the stage is cut into ``parts`` (at most TP) tasks."""
    cfg = ModelConfig(arch="gpt", num_layers=4, hidden_size=96, num_attention_heads=12,
                      vocab_size=100, max_sequence_length=8)
    tasks = conversion_tasks(ShardLayout(cfg, tp, pp), workers)
    assert sorted((t, p) for p, ranks in tasks for t in ranks) == sorted(ShardLayout(cfg, tp, pp).ranks)
    assert len(tasks) == pp * parts
