"""Benchmarks run by `make bench`: each `bench_*.py` module defines `run() -> dict[str, float]`."""
