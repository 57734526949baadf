"""Benchmarks: each prints a table, writes JSON, and measures its own reference in the same run."""
