"""Tests that submit real jobs to the local SLURM cluster (slurm/local-cluster.sh)."""
