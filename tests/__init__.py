"""The test suite, a package tree: shared helpers are in ``tests.support``, peer programs in ``tests.peers``.

Tests import helpers as ``from tests.support.processes import PeerSet``; peer programs run as separate processes
with the repository root on ``PYTHONPATH`` (``tests.support.processes.peer_env``), so they import them the same way.
"""
