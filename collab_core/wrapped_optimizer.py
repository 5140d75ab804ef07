"""The view of the user's optimizer that our optimizers present: its parameter groups, state and defaults.

``torch.optim.Optimizer`` keeps these as instance attributes. An optimizer of ours that wraps the user's (``self.opt``)
shows the user's own objects instead, so that schedulers, gradient clipping, Lightning and Accelerate read and change
the real ones.
"""

from __future__ import annotations

from typing import Any

import torch


class WrappedOptimizerView(torch.optim.Optimizer):
    """Base of an optimizer that wraps ``self.opt`` (set before anything reads these attributes)."""

    opt: torch.optim.Optimizer

    @property
    def param_groups(self) -> list[dict[str, Any]]:  # type: ignore[override]
        """The wrapped optimizer's parameter groups."""
        return self.opt.param_groups

    @param_groups.setter
    def param_groups(self, value: list[dict[str, Any]]) -> None:
        self.opt.param_groups = value

    @property
    def state(self) -> Any:  # type: ignore[override]
        """The wrapped optimizer's per-parameter state."""
        return self.opt.state

    @property
    def defaults(self) -> dict[str, Any]:  # type: ignore[override]
        """The wrapped optimizer's defaults."""
        return self.opt.defaults


__all__ = ["WrappedOptimizerView"]
