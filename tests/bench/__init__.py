"""Benchmarks that are not part of the default test run (see peers.py)."""
