"""Benchmarks of the engine's kernels (``python -m sail.bench.kernels``); see bench/README.md."""
