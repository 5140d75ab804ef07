"""Hugging Face Accelerate integration for collaborative training (planned, issue 4).

This package will provide a wrapper that lets an ``accelerate`` training loop take its
optimizer steps through ``collab_core.CollaborativeOptimizer``. Nothing is exported yet;
Accelerate itself is deliberately not imported here.
"""

__all__: list[str] = []
