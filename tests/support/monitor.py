"""Running ``collab monitor`` as a real process, reading its endpoints, and a headless Chromium for its page."""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from examples.dashboard_capture import HEADLESS_FLAGS
from tests.support.processes import launch_logged, peer_env, stop_process_group

URL = re.compile(r"open (http://\S+) to watch")
CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
CHROMIUM_FLAGS = HEADLESS_FLAGS


def poll_until(probe: Callable[[], Any], timeout: float, what: str, interval: float = 0.2) -> Any:
    """Call ``probe`` until it returns something truthy (returned) or ``timeout`` runs out (AssertionError naming
    ``what`` and the last value or error)."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        try:
            last = probe()
        except Exception as e:  # e.g. the server is not up yet
            last = e
        else:
            if last:
                return last
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}; last: {last!r}")


def get_text(url: str, timeout: float = 5.0) -> str:
    with urllib.request.urlopen(url, timeout=timeout) as response:  # noqa: S310 - our own loopback server
        return response.read().decode()


def get_json(url: str, timeout: float = 5.0) -> dict:
    return json.loads(get_text(url, timeout))


class MonitorProcess:
    """``collab monitor`` on a free port, as its own process (session); :meth:`url` waits for the URL it prints."""

    def __init__(self, log: Path, run_id: str, initial_peers: list[str], *extra: str) -> None:
        command = [sys.executable, "-m", "collab_core", "monitor", "--run-id", run_id, "--initial-peers"]
        command += [*initial_peers, "--port", "0", "--host", "127.0.0.1", "--interval", "0.5", *extra]
        self.log = log
        self.process = launch_logged(command, log, peer_env({"COLLAB_HOST_MADDRS": "/ip4/127.0.0.1/tcp/0"}))

    def url(self, timeout: float = 60.0) -> str:
        def printed() -> str | None:
            if self.process.poll() is not None:
                raise AssertionError(f"the monitor exited with {self.process.returncode}:\n{self.log.read_text()}")
            match = URL.search(self.log.read_text(errors="replace")) if self.log.exists() else None
            return match.group(1) if match else None

        return poll_until(printed, timeout, "the monitor's URL")

    def stop(self) -> None:
        stop_process_group(self.process)


@contextmanager
def monitor_process(log: Path, run_id: str, initial_peers: list[str], *extra: str) -> Iterator[str]:
    """A :class:`MonitorProcess`; yields its URL; stopped (its process group) on exit."""
    monitor = MonitorProcess(log, run_id, initial_peers, *extra)
    try:
        yield monitor.url()
    finally:
        monitor.stop()


@contextmanager
def headless_chromium() -> Iterator[Any]:
    """A selenium driver of Debian's headless Chromium with a fresh profile (quit and removed on exit)."""
    if not (os.path.exists(CHROMIUM) and os.path.exists(CHROMEDRIVER)):
        if os.environ.get("CI"):
            pytest.fail("chromium and chromium-driver are not installed (.ci/run installs them)")
        pytest.skip("needs Debian's chromium and chromium-driver: apt-get install -y chromium chromium-driver")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    profile = tempfile.mkdtemp(prefix="collab-chromium-")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in (*CHROMIUM_FLAGS, f"--user-data-dir={profile}"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)
    try:
        driver.set_page_load_timeout(30)
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)
