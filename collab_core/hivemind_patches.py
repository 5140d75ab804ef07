"""Workarounds that change hivemind 1.1.12 itself, applied explicitly by :func:`apply` (never on import).

Importing ``collab_core`` leaves hivemind as it is. :func:`collab_core.start_dht` and the collaborative optimizer
call :func:`apply` before they use the DHT; code that starts its own ``hivemind.DHT`` for a collaborative run
calls it before starting that DHT. A ``hivemind.DHT`` runs in a forked process, which sees the classes as they were
when it was started: a DHT that was already running when :func:`apply` was first called keeps hivemind's original
behaviour.

The patches change hivemind for the whole Python process (they replace methods on hivemind's classes), are
idempotent and cannot be undone. The list (with the hivemind behaviour behind each) is in
``docs/hivemind-behaviour.md``.
"""

from __future__ import annotations

import threading
from typing import Any

from hivemind.dht.protocol import DHTProtocol
from hivemind.dht.validation import DHTRecord

__all__ = ["apply", "is_applied"]

_lock = threading.Lock()


def _drop_invalid_subkeys(self: DHTProtocol, key_bytes: bytes, dictionary: Any) -> bool:
    """Keep the valid sub-records of a dictionary value found on another node, dropping only the invalid ones.

    WORKAROUND (hivemind 1.1.12, ``DHTProtocol._validate_dictionary``): hivemind discards a node's *whole* answer for
    a key if one sub-record fails validation. One malformed progress record (stored, say, by the node of whoever
    published it, which need not validate anything) then hides every honest peer's record from a reader that asks
    that node: in our tests such a peer saw nobody and trained alone. Installed on the class by :func:`apply`, so
    DHT processes started afterwards (they are forked) use it.
    """
    if self.record_validator is None:
        return True
    invalid = []
    with dictionary.freeze():
        for subkey, (value_bytes, expiration_time) in dictionary.items():
            record = DHTRecord(key_bytes, self.serializer.dumps(subkey), value_bytes, expiration_time)
            if not self.record_validator.validate(record):
                invalid.append(subkey)
    for subkey in invalid:
        del dictionary[subkey]
    return True


_original_update_routing_table = DHTProtocol.update_routing_table


async def _keep_the_last_peer(self: DHTProtocol, node_id: Any, peer_id: Any, responded: bool = True) -> None:
    """Update the routing table as hivemind does, except that the last peer in it is never removed.

    WORKAROUND (hivemind 1.1.12, ``DHTProtocol.update_routing_table``): every request that a peer does not answer
    removes that peer from the routing table, and nothing ever re-bootstraps from ``initial_peers``. A node whose
    link is down for a while (seen in ``tests/wan/test_cut_link.py``: 20 s) forgets every peer; after the link
    comes back it reads and writes only its own storage, sees nobody, and (before this) trained alone for good.
    Keeping the last peer lets its next request, once the link is back, reach the DHT again; that peer answers
    with its neighbours and the table fills up again. A peer that really left costs only the timeouts of requests
    that would have found nobody anyway.
    """
    if not responded:
        known = node_id if node_id is not None else self.routing_table.get(peer_id=peer_id)
        if known is not None and known in self.routing_table and len(self.routing_table.uid_to_peer_id) <= 1:
            return
    await _original_update_routing_table(self, node_id, peer_id, responded=responded)


def apply() -> None:
    """Install collab_core's hivemind workarounds in this process (idempotent, thread-safe).

    Today two: a DHT node that reads a dictionary value (such as the ``{run_id}_progress`` records) from another node
    drops only the sub-records that fail validation instead of the node's whole answer; and a DHT node never removes
    the last peer of its routing table (so it can rejoin after its link was down).

    Call it before starting a ``hivemind.DHT`` yourself; :func:`collab_core.start_dht` and the collaborative
    optimizers call it for you.
    """
    with _lock:
        if DHTProtocol._validate_dictionary is not _drop_invalid_subkeys:
            DHTProtocol._validate_dictionary = _drop_invalid_subkeys  # type: ignore[method-assign]
        if DHTProtocol.update_routing_table is not _keep_the_last_peer:
            DHTProtocol.update_routing_table = _keep_the_last_peer  # type: ignore[method-assign]


def is_applied() -> bool:
    """Whether :func:`apply` has installed the workarounds in this process."""
    return (
        DHTProtocol._validate_dictionary is _drop_invalid_subkeys
        and DHTProtocol.update_routing_table is _keep_the_last_peer
    )
