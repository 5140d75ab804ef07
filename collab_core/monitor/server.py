"""``collab monitor``: the web server (aiohttp) with the dashboard page, ``/api/state`` and ``/metrics``.

The DHT is read by a worker thread every ``interval`` seconds (hivemind's calls block); requests are answered from
the latest read, so a slow or unreachable DHT never makes a request hang. Backups, when enabled, run after a read
in the same worker.
"""

from __future__ import annotations

import asyncio
import json
import math
import signal
import threading
import time
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from aiohttp import web
from hivemind.utils import get_dht_time

from collab_core.log import get_logger
from collab_core.monitor.history import History
from collab_core.monitor.prometheus import CONTENT_TYPE, render_prometheus
from collab_core.monitor.reader import SwarmReader
from collab_core.monitor.swarm import SwarmState

logger = get_logger(__name__)

__all__ = ["MonitorOptions", "MonitorService", "serve"]

STATIC_FILES = {"dashboard.js": "application/javascript", "dashboard.css": "text/css"}


@dataclass(frozen=True)
class MonitorOptions:
    """What ``collab monitor`` serves and how often it reads (see ``collab monitor --help``)."""

    run_id: str
    host: str = "127.0.0.1"
    port: int = 8765
    interval: float = 1.0
    read_timeout: float = 5.0


class MonitorService:
    """The latest state, its history and the worker thread that reads the DHT.

    Args:
        reader: reads the run's records.
        options: the monitor's options.
        backups: a :class:`~collab_core.monitor.backups.SwarmBackups`, or None.
    """

    def __init__(self, reader: SwarmReader, options: MonitorOptions, backups: Any | None = None) -> None:
        self.reader, self.options, self.backups = reader, options, backups
        self.history = History()
        self.state = SwarmState(options.run_id, get_dht_time(), 0, None, 0, 0.0, None, None, error="not read yet")
        self.reads = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._work, name="collab-monitor-reader", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=self.options.read_timeout + 5)

    def read_once(self) -> SwarmState:
        """Read the DHT now, record the result and return it."""
        state = self.reader.read(self.options.read_timeout)
        with self._lock:
            self.state = state
            self.history.add(state)
            self.reads += 1
        return state

    def _work(self) -> None:
        while not self._stop.is_set():
            started = time.monotonic()
            try:
                state = self.read_once()
                if self.backups is not None and not state.error:
                    self.backups.maybe_backup(state.step)
            except Exception as e:  # the monitor must outlive anything a peer publishes
                logger.warning(f"monitor read failed: {e!r}")
            self._stop.wait(max(0.05, self.options.interval - (time.monotonic() - started)))

    def snapshot(self) -> dict[str, Any]:
        """``GET /api/state``: the latest state as JSON, with ``history`` and ``reads``."""
        with self._lock:
            data = self.state.to_json()
            data["history"] = self.history.to_json()
            data["reads"] = self.reads
            if self.backups is not None:
                data["backups"] = [str(path) for path in self.backups.written[-5:]]
        return data

    def prometheus(self) -> str:
        with self._lock:
            return render_prometheus(self.state)


def finite_json(value: Any) -> Any:
    """``value`` with every non-finite float replaced by None (JSON has no NaN or infinity)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {key: finite_json(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite_json(item) for item in value]
    return value


def _static(name: str) -> str:
    return resources.files("collab_core.monitor").joinpath("static", name).read_text(encoding="utf-8")


def make_app(service: MonitorService) -> web.Application:
    """The aiohttp application: ``/``, ``/api/state``, ``/metrics`` and the page's script and style."""

    async def index(_request: web.Request) -> web.Response:
        page = _static("index.html").replace("{{run_id}}", json.dumps(service.options.run_id)[1:-1])
        return web.Response(text=page, content_type="text/html")

    async def state(_request: web.Request) -> web.Response:
        return web.json_response(finite_json(service.snapshot()), dumps=lambda data: json.dumps(data, allow_nan=False))

    async def metrics(_request: web.Request) -> web.Response:
        return web.Response(body=service.prometheus().encode(), headers={"Content-Type": CONTENT_TYPE})

    async def static(request: web.Request) -> web.Response:
        name = request.match_info["name"]
        if name not in STATIC_FILES:
            raise web.HTTPNotFound()
        return web.Response(text=_static(name), content_type=STATIC_FILES[name])

    app = web.Application()
    app.add_routes(
        [
            web.get("/", index),
            web.get("/api/state", state),
            web.get("/metrics", metrics),
            web.get("/static/{name}", static),
        ]
    )
    return app


async def _serve(service: MonitorService, options: MonitorOptions, ready: Any) -> None:
    runner = web.AppRunner(make_app(service), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, options.host, options.port)
    try:
        await site.start()
    except OSError as e:
        await runner.cleanup()
        raise OSError(
            f"cannot serve the dashboard on {options.host}:{options.port} ({e.strerror or e}); choose another "
            "--port (0 picks a free one) or --host"
        ) from e
    server = getattr(site, "_server", None)
    sockets = getattr(server, "sockets", None) or []
    port = sockets[0].getsockname()[1] if sockets else options.port
    ready(f"http://{options.host}:{port}")
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        await runner.cleanup()


def serve(service: MonitorService, options: MonitorOptions, ready: Any) -> None:
    """Serve until SIGINT/SIGTERM; ``ready(url)`` is called once the server listens."""
    service.start()
    try:
        asyncio.run(_serve(service, options, ready))
    finally:
        service.stop()


def static_dir() -> Path:
    """The folder of the page's files (for packaging checks)."""
    return Path(str(resources.files("collab_core.monitor").joinpath("static")))
