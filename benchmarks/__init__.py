"""Microbenchmarks (installed as ``fastpref.benchmarks``)."""
