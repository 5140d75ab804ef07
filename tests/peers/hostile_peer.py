"""A hostile participant for the reliability tests: it joins the DHT and publishes malformed progress records.

It is not a trainer: it forges the records that honest peers read to decide when to step, under the run's progress
key, each signed by its own throw-away identity (records must be signed by the key named in their subkey, so one
identity can hold one record). What each kind tests is listed in ``FORGED_RECORDS``. It publishes once (the records
live ``--lifetime`` seconds), writes ``--out`` with the kinds it published (the test starts the honest peers only
then), and stays until it is stopped.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import hivemind
import torch
from hivemind.dht.crypto import RSASignatureValidator
from hivemind.dht.validation import DHTRecord, RecordValidatorBase
from hivemind.utils import get_dht_time

from collab_core.fingerprint import tensors_fingerprint
from tests.peers.core_peer import make_model


class ForgedIdentities(RecordValidatorBase):
    """Signs each record with the identity named in its subkey (a plain RSASignatureValidator holds one key)."""

    def __init__(self, count: int):
        self.signers = [RSASignatureValidator(hivemind.utils.crypto.RSAPrivateKey()) for _ in range(count)]

    def validate(self, record: DHTRecord) -> bool:
        return True  # it accepts anything it is sent: it is not here to protect the run

    def sign_value(self, record: DHTRecord) -> bytes:
        for signer in self.signers:
            if signer.local_public_key in record.subkey:
                return signer.sign_value(record)
        return record.value

    def strip_value(self, record: DHTRecord) -> bytes:
        return self.signers[0].strip_value(record)


def honest_looking(peer_id: bytes, **changes) -> dict:
    """A record as an honest peer publishes it (``LocalTrainingProgress.dict()``), with some fields changed."""
    record = dict(
        peer_id=peer_id, epoch=0, samples_accumulated=0, samples_per_second=10.0, time=get_dht_time(), client_mode=False
    )
    record.update(changes)
    return record


def forged_records(huge_steps: int) -> list[tuple[str, dict]]:
    """``(kind, record)`` pairs; each one gets its own identity."""
    fake_id = os.urandom(38)
    kinds = [
        ("wrong type: samples as a string", honest_looking(fake_id, samples_accumulated="lots")),
        ("wrong type: step as a float", honest_looking(fake_id, epoch=1.5)),
        ("wrong type: peer_id as a list", honest_looking([1, 2, 3])),
        ("negative samples", honest_looking(fake_id, samples_accumulated=-1000)),
        ("NaN samples/s", honest_looking(fake_id, samples_per_second=float("nan"))),
        ("inf samples/s", honest_looking(fake_id, samples_per_second=float("inf"))),
        ("NaN time", honest_looking(fake_id, time=float("nan"))),
        ("inf time", honest_looking(fake_id, time=float("inf"))),
        ("time an hour ahead", honest_looking(fake_id, time=get_dht_time() + 3600)),
        ("future step 10**6", honest_looking(os.urandom(38), epoch=10**6)),
        ("oversized peer_id (2 kB)", honest_looking(os.urandom(2_000), samples_accumulated=10**9)),
        ("not a record at all", "x" * 1000),
    ]
    # huge sample counts at each of the run's first steps: enough, if believed, to step at once. The attacker knows
    # the model, so it publishes the honest peers' starting state fingerprint (peers count only records of their own
    # state): the step-0 record looks like a replica of theirs; later steps' fingerprints it cannot know
    start = tensors_fingerprint(make_model(0).parameters())
    kinds += [
        (
            f"huge samples at step {step}",
            honest_looking(os.urandom(38), epoch=step, samples_accumulated=10**12, fingerprint=start),
        )
        for step in range(huge_steps)
    ]
    return kinds


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--name", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--initial-peers", required=True)
    parser.add_argument("--run-id", required=True)
    parser.add_argument("--huge-steps", type=int, default=4)
    parser.add_argument("--lifetime", type=float, default=300.0)
    args = parser.parse_args()

    records = forged_records(args.huge_steps)
    identities = ForgedIdentities(len(records))
    dht = hivemind.DHT(
        initial_peers=args.initial_peers.split(),
        host_maddrs=["/ip4/127.0.0.1/tcp/0"],
        record_validators=[identities],
        start=True,
    )
    key = f"{args.run_id}_progress"
    stored = {}
    for (kind, record), signer in zip(records, identities.signers, strict=True):
        stored[kind] = bool(dht.store(key, record, get_dht_time() + args.lifetime, subkey=signer.local_public_key))
    print(f"{args.name}: published {sum(stored.values())} of {len(stored)} forged records", flush=True)
    torch.save(stored, args.out + ".tmp")
    os.replace(args.out + ".tmp", args.out)
    try:
        while True:
            time.sleep(0.1)
    except KeyboardInterrupt:
        pass
    finally:
        dht.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
