"""The results table (terminal) and the JSON file of a benchmark run."""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
import platform
from pathlib import Path
from typing import Any

from bench.stats import Summary
from bench.workloads import Row

HEADERS = ("workload", "metric", "ours", "raw hivemind", "ratio", "target", "pass/fail")


def table(rows: list[Row]) -> str:
    """A plain-text (Markdown) table of ``rows``."""
    cells = [HEADERS] + [(r.workload, r.metric, r.ours, r.raw, r.ratio, r.target, r.status) for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(HEADERS))]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) + " |" for row in cells]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)


def _plain(value: Any) -> Any:
    if isinstance(value, Summary):
        return value.as_dict()
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return _plain(dataclasses.asdict(value))
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def environment() -> dict[str, Any]:
    """Where and when the run happened (the load average matters on a shared machine)."""
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    return dict(
        date=datetime.datetime.now().isoformat(timespec="seconds"),
        host=platform.node(),
        python=platform.python_version(),
        cpus=os.cpu_count(),
        load_average=load,
    )


def write_json(path: Path, rows: list[Row], data: dict[str, Any], meta: dict[str, Any]) -> None:
    """Write the table rows, every raw figure and the environment to ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(_plain(dict(meta=meta, rows=rows, workloads=data)), indent=1, default=str))
