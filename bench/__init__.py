"""Benchmarks for collaborative training (planned, issue 5)."""
