"""Set up torch.distributed (gloo on CPU, nccl on GPU) and megatron-core's TP x PP x DP groups."""

from __future__ import annotations

import os
import random
import socket

import numpy as np
import torch
import torch.distributed as dist

from mlmega.models import cpu_shims


#: Rendezvous ports are drawn below Linux's default ephemeral range (32768-60999), where the
#: kernel hands ports to other sockets (gloo peers, SLURM's): a port it gave out once and found
#: free could be taken again before the TCPStore listens (EADDRINUSE, seen in CI).
RENDEZVOUS_PORTS = (20000, 32768)


def free_port() -> int:
    """A TCP port free on this host now, drawn from :data:`RENDEZVOUS_PORTS`."""
    draw = random.Random()  # not the seeded global generator: parallel runs draw different ports
    for _ in range(200):
        port = draw.randrange(*RENDEZVOUS_PORTS)
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError(f"no free TCP port in {RENDEZVOUS_PORTS} on this host")


def init_process_group(rank: int | None = None, world_size: int | None = None,
                       master_addr: str | None = None, master_port: int | None = None) -> None:
    """Join the default process group; unspecified values come from RANK/WORLD_SIZE/MASTER_* env."""
    if dist.is_initialized():
        return
    rank = int(os.environ.get("RANK", 0)) if rank is None else rank
    world_size = int(os.environ.get("WORLD_SIZE", 1)) if world_size is None else world_size
    addr = master_addr or os.environ.get("MASTER_ADDR", "127.0.0.1")
    port = master_port or int(os.environ.get("MASTER_PORT") or free_port())
    cuda = torch.cuda.is_available()
    device = None
    if cuda:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
    else:
        cpu_shims.install()
    dist.init_process_group("nccl" if cuda else "gloo", init_method=f"tcp://{addr}:{port}",
                            rank=rank, world_size=world_size, device_id=device)


def init_model_parallel(tp: int = 1, pp: int = 1, seed: int = 1234) -> None:
    """Initialise megatron-core parallel state and its RNG tracker (process group must exist)."""
    from megatron.core import parallel_state

    if not dist.is_initialized():
        init_process_group()
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=tp,
                                             pipeline_model_parallel_size=pp)
    seed_random_generators(seed)


def seed_random_generators(seed: int) -> None:
    """Megatron-LM's seeding: every generator at seed + 100 x pipeline rank (each pipeline stage
    its own dropout masks); megatron's RNG tracker adds a stream per TP rank (seed + 2718 + TP
    rank) that attention dropout draws from, so TP ranks drop different heads' probabilities."""
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    seed += 100 * parallel_state.get_pipeline_model_parallel_rank()
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    model_parallel_cuda_manual_seed(seed)  # the tracker's states; CPU generator's without CUDA


def teardown() -> None:
    from megatron.core import parallel_state

    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()
