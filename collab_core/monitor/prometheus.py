"""The swarm's state as Prometheus text (``GET /metrics``), pure."""

from __future__ import annotations

import math

from collab_core.monitor.swarm import SwarmState

__all__ = ["CONTENT_TYPE", "render_prometheus"]

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

# name -> (type, help); the collaboration's series have the label run_id, per-peer ones run_id and peer
_SWARM = {
    "collab_peers": ("gauge", "Peers in the collaboration (with a progress or fresh metrics record)."),
    "collab_clients": ("gauge", "Peers in client mode (they accept no incoming connections)."),
    "collab_step": ("gauge", "Newest collaborative step of a peer that can share its state."),
    "collab_target_batch_size": ("gauge", "Samples the collaboration accumulates per step."),
    "collab_samples_accumulated": ("gauge", "Samples all peers accumulated toward the next step."),
    "collab_samples_per_second": ("gauge", "The collaboration's throughput (sum of the peers' samples/s)."),
    "collab_eta_seconds": ("gauge", "Estimated seconds until the next collaborative step."),
    "collab_loss": ("gauge", "Mean of the peers' latest training losses."),
    "collab_skipped_records": ("gauge", "Malformed records skipped in the last read."),
}
_PEER = {
    "collab_peer_step": ("gauge", "Collaborative step of the peer.", "step"),
    "collab_peer_samples_per_second": ("gauge", "Training speed of the peer (samples/s).", "samples_per_second"),
    "collab_peer_samples_contributed": (
        "counter",
        "Samples the peer contributed since it started.",
        "samples_contributed",
    ),  # fmt: skip
    "collab_peer_loss": ("gauge", "Latest training loss of the peer.", "loss"),
    "collab_peer_last_seen_seconds": ("gauge", "Seconds since the peer's newest record.", "last_seen"),
}


def _label(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _number(value: float) -> str:
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return repr(float(value)) if not float(value).is_integer() else str(int(value))


def render_prometheus(state: SwarmState) -> str:
    """Prometheus text exposition format 0.0.4: ``collab_*`` for the collaboration, ``collab_peer_*{peer=...}`` per
    peer (labelled by short peer id). Unknown values (no ETA, no loss) are left out, not written as 0."""
    run = f'run_id="{_label(state.run_id)}"'
    values: dict[str, float | None] = {
        "collab_peers": state.num_peers,
        "collab_clients": state.num_clients,
        "collab_step": state.step,
        "collab_target_batch_size": state.target_batch_size,
        "collab_samples_accumulated": state.samples_accumulated,
        "collab_samples_per_second": state.samples_per_second,
        "collab_eta_seconds": state.eta_seconds,
        "collab_loss": state.loss,
        "collab_skipped_records": state.skipped_records,
    }
    lines = []
    for name, (kind, text) in _SWARM.items():
        lines += [f"# HELP {name} {text}", f"# TYPE {name} {kind}"]
        if values[name] is not None:
            lines.append(f"{name}{{{run}}} {_number(float(values[name]))}")  # type: ignore[arg-type]
    for name, (kind, text, attribute) in _PEER.items():
        lines += [f"# HELP {name} {text}", f"# TYPE {name} {kind}"]
        for peer in state.peers:
            value = getattr(peer, attribute)
            if value is not None:
                lines.append(f'{name}{{{run},peer="{_label(peer.short_id)}"}} {_number(float(value))}')
    return "\n".join(lines) + "\n"
