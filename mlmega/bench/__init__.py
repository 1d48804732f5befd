"""Benchmarks that need the whole package (the V-cycle against its baseline)."""
