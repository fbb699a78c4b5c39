"""Kernel benchmarks, run as modules: `python -m benchmarks.<op>`."""
