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


def apply() -> None:
    """Install collab_core's hivemind workarounds in this process (idempotent, thread-safe).

    Today one: a DHT node that reads a dictionary value (such as the ``{run_id}_progress`` records) from another node
    drops only the sub-records that fail validation instead of the node's whole answer.

    Call it before starting a ``hivemind.DHT`` yourself; :func:`collab_core.start_dht` and the collaborative
    optimizers call it for you.
    """
    with _lock:
        if DHTProtocol._validate_dictionary is not _drop_invalid_subkeys:
            DHTProtocol._validate_dictionary = _drop_invalid_subkeys  # type: ignore[method-assign]


def is_applied() -> bool:
    """Whether :func:`apply` has installed the workarounds in this process."""
    return DHTProtocol._validate_dictionary is _drop_invalid_subkeys
