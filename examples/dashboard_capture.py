"""A screenshot of ``collab monitor``'s dashboard with Debian's headless Chromium (for ``make demo``)."""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from pathlib import Path

#: headless Chromium on a machine with a closed network: without the background-networking flags, its connections
#: are refused many at a time (also used by the browser tests, tests/support/monitor.py)
HEADLESS_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--window-size=1400,1000",
)
FLAGS = (
    *HEADLESS_FLAGS,
    "--hide-scrollbars",
    "--virtual-time-budget=5000",  # lets the page's script fetch /api/state and draw before the capture
)


def find_chromium() -> str | None:
    """The Chromium binary, or None."""
    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    return None


def capture(url: str, path: Path, timeout: float = 60.0) -> str | None:
    """Save a screenshot of ``url`` to ``path``; returns why not (None on success)."""
    chromium = find_chromium()
    if chromium is None:
        return "chromium is not installed (apt-get install chromium)"
    profile = tempfile.mkdtemp(prefix="collab-demo-chromium-")
    try:
        command = [chromium, *FLAGS, f"--user-data-dir={profile}", f"--screenshot={path}", url]
        done = subprocess.run(command, capture_output=True, timeout=timeout, start_new_session=True)
    except subprocess.TimeoutExpired:
        return f"chromium took more than {timeout:g} s"
    finally:
        shutil.rmtree(profile, ignore_errors=True)
    if done.returncode != 0 or not path.exists():
        return f"chromium failed (exit {done.returncode}): {done.stderr.decode(errors='replace').strip()[-300:]}"
    return None
