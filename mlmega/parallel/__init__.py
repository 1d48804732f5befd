"""torch.distributed and megatron-core parallel state set-up."""

from mlmega.parallel.setup import init_model_parallel, init_process_group, teardown

__all__ = ["init_model_parallel", "init_process_group", "teardown"]
