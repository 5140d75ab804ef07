"""Drop-in home for code written against ``hivemind.optim.CollaborativeOptimizer`` (removed from hivemind 1.1)."""

from collab_core.optimizer import CollaborationState, CollaborativeAdaptiveOptimizer, CollaborativeOptimizer

__all__ = ["CollaborativeOptimizer", "CollaborativeAdaptiveOptimizer", "CollaborationState"]
