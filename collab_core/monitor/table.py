"""The peer table of ``collab status`` (and the summary line above it), as plain text (pure)."""

from __future__ import annotations

from collab_core.monitor.swarm import SwarmState
from collab_core.reporting import format_eta, format_rate

__all__ = ["NO_PEERS", "render_table"]

NO_PEERS = "no peers yet"
COLUMNS = ("peer", "step", "samples/s", "contributed", "loss", "client", "reached at", "last seen")


def _row(values: list[str], widths: list[int]) -> str:
    return "  ".join(value.ljust(width) for value, width in zip(values, widths, strict=True)).rstrip()


def render_table(state: SwarmState) -> str:
    """A summary line and one row per peer (or :data:`NO_PEERS`)."""
    target = state.target_batch_size if state.target_batch_size is not None else "?"
    head = (
        f"run {state.run_id!r}: step {state.step}, {state.samples_accumulated}/{target} samples, "
        f"{state.num_peers} peer(s), {format_rate(state.samples_per_second)}, "
        f"ETA {format_eta(state.eta_seconds)}"
    )
    if not state.peers:
        return f"{head}\n{NO_PEERS} (no peer of run {state.run_id!r} has published a record)"
    rows = [
        [
            peer.short_id,
            str(peer.step),
            format_rate(peer.samples_per_second).removesuffix(" samples/s"),
            "" if peer.samples_contributed is None else str(peer.samples_contributed),
            "" if peer.loss is None else f"{peer.loss:.4f}",
            "yes" if peer.client_mode else "no",
            peer.reached_at,
            f"{peer.last_seen:.1f}s ago" + (" (silent)" if peer.silent else ""),
        ]
        for peer in state.peers
    ]
    widths = [max(len(c), *(len(r[i]) for r in rows)) for i, c in enumerate(COLUMNS)]
    return "\n".join([head, _row(list(COLUMNS), widths), *(_row(r, widths) for r in rows)])
