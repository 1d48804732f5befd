"""Launching mlmega stages as SLURM jobs (submitit), and the local test cluster."""
