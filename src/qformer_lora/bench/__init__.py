"""Benchmarks: one measured training step, sweeps over batch sizes, the memory model and reports."""
