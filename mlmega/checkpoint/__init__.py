"""Megatron checkpoints: both formats behind one reader/writer interface, sharding, conversion."""
