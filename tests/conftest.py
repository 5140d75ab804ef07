"""Shared test set-up. Helpers live in ``tests/support/`` and are imported as ``tests.support.<module>``.

DHT nodes that tests start in this process (bootstrap nodes, in-process peers' nodes) run with collab_core's
hivemind workarounds, like the nodes ``collab_core.start_dht`` starts: they are applied here, before any of them
is started. ``tests/unit/test_hivemind_patches.py`` checks in fresh interpreters that importing collab_core alone
does not apply them.
"""

from collab_core import hivemind_patches

hivemind_patches.apply()
