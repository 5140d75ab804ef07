"""Shared test set-up: make the helpers in tests/ importable (peer_processes, peers.core_peer)."""

import sys
from pathlib import Path

TESTS_DIR = Path(__file__).resolve().parent
if str(TESTS_DIR) not in sys.path:
    sys.path.insert(0, str(TESTS_DIR))
