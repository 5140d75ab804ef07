"""Publishes malformed metrics records under a run's ``{run_id}_metrics`` key (each with its own identity), then
stays until stopped. Records that break the schema are refused by validating nodes; the ones that pass it (NaN
loss, a time stamp an hour ahead) reach the monitor, which must skip them."""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import hivemind
from hivemind.utils import get_dht_time

from collab_core.peer_metrics import metrics_key
from tests.peers.hostile_peer import ForgedIdentities


def record(**changes) -> dict:
    base = dict(
        peer_id=os.urandom(38), step=1, loss=1.0, samples_per_second=5.0, samples_contributed=10,
        target_batch_size=64, client_mode=False, time=get_dht_time(), version="x", maddrs=[],
    )  # fmt: skip
    base.update(changes)
    return base


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--run-id", required=True)
    parser.add_argument("--initial-peers", nargs="+", required=True)
    parser.add_argument("--ready-file", required=True)
    args = parser.parse_args()
    forged = [
        record(loss=float("nan")),
        record(time=get_dht_time() + 3600),
        record(samples_contributed="many"),
        "not a record",
    ]
    identities = ForgedIdentities(len(forged))
    dht = hivemind.DHT(
        initial_peers=args.initial_peers,
        host_maddrs=["/ip4/127.0.0.1/tcp/0"],
        record_validators=[identities],
        start=True,
    )
    for signer, value in zip(identities.signers, forged, strict=True):
        dht.store(metrics_key(args.run_id), subkey=signer.local_public_key, value=value,
                  expiration_time=get_dht_time() + 600)  # fmt: skip
    Path(args.ready_file).write_text("published")
    while True:
        time.sleep(1)


if __name__ == "__main__":
    sys.exit(main())
