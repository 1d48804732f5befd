"""mlmega: multi-level (V-cycle) training of Megatron GPT/BERT models on SLURM."""

__version__ = "0.1.0"
