"""Session-wide fixtures: a one-process megatron-core parallel state (TP=1, PP=1, gloo on CPU)."""

import pytest


@pytest.fixture(scope="session")
def model_parallel():
    """Initialise torch.distributed + megatron parallel state once; tear down at session end."""
    from mlmega.parallel.setup import init_model_parallel, teardown

    init_model_parallel(1, 1)
    yield
    teardown()
