"""Benchmarks run by `make bench`: each figure is printed next to a baseline measured in the same run."""
