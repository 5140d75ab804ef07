"""Benchmarks of collaborative training against raw ``hivemind.Optimizer`` (issue 5).

Run ``python -m bench --help`` (or ``make bench``). Every peer is a separate OS process on loopback; the harness
(:mod:`bench.cli`) starts them, collects per-call timings and prints a table of ratios measured in the same run.
"""
