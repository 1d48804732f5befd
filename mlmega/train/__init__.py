"""Training one V-cycle level on megatron-core (every rank of a stage's job runs this)."""
