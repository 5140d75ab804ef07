"""The W1 timeline plot: per collaborative step, compute / waiting / all-reduce of both sides."""

from __future__ import annotations

from pathlib import Path
from typing import Any

COLORS = {"compute": "#4c72b0", "waiting": "#dd8452", "allreduce": "#55a868"}


def plot_w1(figures: dict[str, dict[str, Any]], path: Path) -> bool:
    """Stacked bars per step (first peer's view) for each side; False if there is nothing to plot."""
    sides = [side for side in ("ours", "raw") if figures.get(side, {}).get("timeline")]
    if not sides:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(sides), 1, figsize=(10, 3.2 * len(sides)), sharey=True, squeeze=False)
    for ax, side in zip(axes[:, 0], sides, strict=True):
        steps = [s for s in figures[side]["timeline"] if s["wall"] is not None]
        x = [s["step"] for s in steps]
        bottom = [0.0] * len(steps)
        for part in ("compute", "waiting", "allreduce"):
            values = [s[part] for s in steps]
            ax.bar(x, values, bottom=bottom, color=COLORS[part], label=part)
            bottom = [b + v for b, v in zip(bottom, values, strict=True)]
        for s in steps:
            if s["group"] < 2:
                ax.annotate("a", (s["step"], min(s["wall"], 2.3)), ha="center", va="bottom", fontsize=7)
        top = 2.5
        ax.set_ylim(0, top)
        for s in steps:
            if s["wall"] > top:
                ax.annotate(f"{s['wall']:.1f} s", (s["step"], top), ha="center", va="top", fontsize=7)
        ax.axhline(0.4, color="black", linestyle="--", linewidth=0.8, label="ideal 0.4 s")
        name = "ours (CollaborativeOptimizer)" if side == "ours" else "raw hivemind.Optimizer"
        ax.set_title(f"W1, {name}: time per collaborative step (first peer; a = alone)")
        ax.set_xlabel("collaborative step")
        ax.set_ylabel("seconds")
        ax.legend(loc="upper right", fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True
