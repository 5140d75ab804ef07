"""PyTorch Lightning integration for collaborative training (planned, issue 3).

This package will provide a Lightning strategy that wraps the model's optimizer in
``collab_core.CollaborativeOptimizer`` so that a ``Trainer`` can join a hivemind
collaboration. Nothing is exported yet; Lightning itself is deliberately not imported here.
"""

__all__: list[str] = []
