"""Benchmarks of the engine's kernels (``python -m bench.kernels``); see bench/README.md."""
