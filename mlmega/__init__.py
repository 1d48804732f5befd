"""mlmega: multi-level (V-cycle) training of Megatron GPT/BERT models on SLURM."""

from mlmega.models import megatron_warnings

__version__ = "0.1.0"

megatron_warnings.silence()  # every process: the CLI, SLURM tasks (submitit), workers
