"""Benchmark suites, runner and comparison: see issues 3 and 5."""
