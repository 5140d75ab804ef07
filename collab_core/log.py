"""The ``collab_core`` logger: hivemind's log handler covers only ``hivemind.*``, so ours gets its own."""

from __future__ import annotations

import logging
import os
import sys

LOGGER_NAME = "collab_core"


def get_logger(name: str) -> logging.Logger:
    """A logger under ``collab_core`` that prints to stderr (level from ``COLLAB_LOGLEVEL``, default INFO).

    Like Lightning's ``lightning.pytorch`` logger, the package logger gets one handler of its own and does not
    propagate, so users see our warnings and ``verbose=True`` progress without configuring logging.
    """
    root = logging.getLogger(LOGGER_NAME)
    if not root.handlers:
        handler = logging.StreamHandler(sys.stderr)
        line = "%(asctime)s.%(msecs)03d [%(levelname)s] [%(name)s] %(message)s"
        handler.setFormatter(logging.Formatter(line, "%b %d %H:%M:%S"))
        root.addHandler(handler)
        root.setLevel(os.environ.get("COLLAB_LOGLEVEL", "INFO").upper())
        root.propagate = False
    return logging.getLogger(name)
