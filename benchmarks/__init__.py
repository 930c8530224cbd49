"""Benchmarks of nnderiv (run ``python benchmarks/bench.py --help``)."""
