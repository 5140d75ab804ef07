"""``make demo``: a live collaborative training of several Lightning peers on this machine.

    python -m examples.demo --peers 4 --steps 40 --output-dir demo_out

What happens:

1. A bootstrap peer starts (a bare DHT node, its own process) and prints its join hint.
2. Training peers start as separate processes of ``examples/lightning/train.py`` (digits, LightningCLI) with
   ``Trainer(strategy="collaborative")``, configured only by that hint and ``COLLAB_*`` variables, exactly as a user
   on another machine joins. Each has its own data shard and batch size.
3. One peer joins late (it downloads the state), one leaves with SIGINT (Ctrl-C: it shuts down cleanly), one is
   killed with SIGKILL (the others go on after at most ``averaging_timeout``). A live table shows every peer.
4. At the end: a summary table (steps, samples, accuracy, whether the surviving peers hold identical weights, checked
   on the saved models) and ``demo_out/``: the final model, each peer's log, ``metrics.csv`` and ``plot.png``.

``collab monitor`` watches the run from the start (its URL is printed first); near the end of training a headless
Chromium saves a screenshot of its dashboard as ``demo_out/dashboard.png`` (skipped, with the reason, if Chromium
is not installed).

Every process the demo starts ends with it, also on Ctrl-C or failure.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
TRAIN = REPO_ROOT / "examples" / "lightning" / "train.py"
CONFIG = REPO_ROOT / "examples" / "lightning" / "config.yaml"
HINT = re.compile(r'COLLAB_RUN_ID=(\S+) COLLAB_INITIAL_PEERS="([^"]+)"')
BATCH_SIZES = (32, 24, 16, 28, 20, 36, 12, 40)
# when (fraction of the collaborative steps reached) the late peer joins, the leaver gets SIGINT, the victim SIGKILL
# (the late peer's process starts with the others, since imports take 10-20 s on a busy 2-core machine, and joins
# when told to)
JOIN_AT, LEAVE_AT, KILL_AT = 0.25, 0.4, 0.6
POLL_SECONDS = 0.25
# a peer whose status file (rewritten every 0.3 s) is older than this has stopped reporting: the plot and the table
# count it as gone (the DHT view of the other peers keeps a crashed peer's record until it expires, 60 s)
STALE_SECONDS = 2.0
# the dashboard screenshot is taken once the collaboration reached this fraction of the steps (peers still train)
SCREENSHOT_AT = 0.9
# DiLoCo in this demo has 40 outer steps of only 2-3 inner steps per peer: the paper's outer momentum 0.9 (the default,
# for hundreds of inner steps) then amplifies the example's SGD steps until training diverges (measured, 4 peers:
# validation accuracy 0.49, weights up to 26). The README's advice for few outer steps, outer_momentum 0.5: 0.955.
DILOCO_DEMO_ENV = {"COLLAB_OUTER_MOMENTUM": "0.5"}
MONITOR_URL = re.compile(r"open (http://\S+) to watch")


@dataclass
class DemoPeer:
    """One training peer of the demo and what the driver knows about it."""

    name: str
    role: str  # "stable", "late" (joins late), "leave" (SIGINT mid-run) or "kill" (SIGKILL mid-run)
    batch_size: int
    shard: int
    workdir: Path
    process: subprocess.Popen | None = None
    exit_state: str | None = None  # set once the process is gone
    signalled: bool = False  # got its SIGINT/SIGKILL
    status: dict = field(default_factory=dict)

    @property
    def status_file(self) -> Path:
        return self.workdir / "status.json"

    @property
    def log(self) -> Path:
        return self.workdir / "peer.log"

    @property
    def state(self) -> str:
        if self.exit_state is not None:
            return self.exit_state
        if self.process is None:
            return "waiting"
        if self.role == "late" and not (self.workdir / "go").exists():
            return "waits to join"
        return self.status.get("state", "starting")

    def read_status(self) -> None:
        try:
            self.status = json.loads(self.status_file.read_text())
        except (OSError, ValueError):
            pass

    @property
    def reporting(self) -> bool:
        """Whether this peer is still reporting: alive, with a status written in the last ``STALE_SECONDS``."""
        if self.exit_state is not None or self.process is None or "time" not in self.status:
            return False
        return time.time() - self.status["time"] <= STALE_SECONDS


def roles_for(peers: int) -> list[str]:
    """Who does what: the first peer always stays; with 4+ peers every event happens once."""
    roles = ["stable", "late", "leave", "kill"][: max(peers, 0)]
    if peers == 3:
        roles = ["stable", "late", "kill"]
    return roles + ["stable"] * (peers - len(roles))


#: replicas count as identical when no weight differs by more than this, relative to the largest weight (at least 1)
IDENTICAL_RELATIVE_TOLERANCE = 1e-6


def replicas_identical(models: list[dict]) -> tuple[bool, float, float]:
    """Whether the state dicts ``models`` hold the same weights, the largest absolute difference and the tolerance.

    "Identical" up to float32 rounding: hivemind's all-reduce hands every peer the *delta* to the average
    (``averaged - local``, hivemind ``allreduce.py``) and the averager adds it to the local tensor, so peers that
    started a round from different values end it a few ulps apart. An ulp grows with the weight (2e-6 at 30), so the
    tolerance is relative to the largest weight; a fork (peers that took different steps) differs by a learning-rate
    step, orders of magnitude more.
    """
    if len(models) < 2:
        return bool(models), 0.0, 0.0
    first = models[0]
    diff = max((m[k] - first[k]).abs().max().item() for m in models[1:] for k in first)
    scale = max([1.0] + [v.abs().max().item() for v in first.values() if v.numel()])
    tolerance = IDENTICAL_RELATIVE_TOLERANCE * scale
    return diff <= tolerance, diff, tolerance


def start_process(command: list[str], log: Path, env: dict[str, str]) -> subprocess.Popen:
    with open(log, "wb") as out:
        return subprocess.Popen(
            command,
            cwd=REPO_ROOT,
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            # this checkout's packages first (a script's own folder, not the repository, is on its sys.path)
            env={**os.environ, **env, "PYTHONUNBUFFERED": "1", "PYTHONPATH": _python_path()},
            start_new_session=True,  # its own process group: we can end it with its DHT/averager children
            preexec_fn=_default_sigint,
        )


def _python_path() -> str:
    return os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))


def _default_sigint() -> None:
    """Let the peer get Ctrl-C: a shell starts background jobs with SIGINT ignored, and children inherit that."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def end_process_group(process: subprocess.Popen, grace: float = 10.0) -> None:
    """SIGTERM the process group, SIGKILL what is left after ``grace`` seconds."""
    if process.poll() is None:
        try:
            os.killpg(process.pid, signal.SIGTERM)
            process.wait(grace)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            pass
    try:
        os.killpg(process.pid, signal.SIGKILL)  # children (p2pd, averager) outlive their leader otherwise
    except ProcessLookupError:
        pass
    if process.poll() is None:
        process.wait(grace)


class Demo:
    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.out = Path(args.output_dir).resolve()
        self.peers: list[DemoPeer] = []
        self.bootstrap: subprocess.Popen | None = None
        self.monitor: subprocess.Popen | None = None
        self.monitor_url: str | None = None
        self.screenshot: threading.Thread | None = None
        self.screenshot_result = "not taken (the run ended before the screenshot step)"
        self.join_env: dict[str, str] = {}
        self.timeline: list[dict] = []
        self.presence: list[dict] = []  # {"time", "reporting"}: how many peers were reporting at each poll
        self.events: list[str] = []
        self.started = time.monotonic()
        from rich.console import Console

        console = Console()
        # not a terminal (e.g. piped to a log): rich would assume 80 columns and truncate the table
        self.console = console if console.is_terminal else Console(width=120)

    # ------------------------------------------------------------------ processes

    def start_bootstrap(self) -> None:
        log = self.out / "bootstrap.log"
        env = {"COLLAB_RUN_ID": self.args.run_id, "COLLAB_HOST_MADDRS": "/ip4/127.0.0.1/tcp/0"}
        self.bootstrap = start_process([sys.executable, "-m", "examples.demo", "--bootstrap"], log, env)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            match = HINT.search(log.read_text(errors="replace")) if log.exists() else None
            if match:
                self.join_env = {"COLLAB_RUN_ID": match.group(1), "COLLAB_INITIAL_PEERS": match.group(2)}
                return
            if self.bootstrap.poll() is not None:
                break
            time.sleep(0.1)
        raise RuntimeError(f"the bootstrap peer printed no join hint; see {log}")

    def launch_monitor(self, port: int) -> None:
        """Start ``collab monitor`` of the run (its own process) on ``port``."""
        initial = self.join_env["COLLAB_INITIAL_PEERS"].split()
        command = [sys.executable, "-m", "collab_core", "monitor", "--run-id", self.join_env["COLLAB_RUN_ID"],
                   "--initial-peers", *initial, "--host", "127.0.0.1", "--port", str(port)]  # fmt: skip
        self.monitor = start_process(command, self.out / "monitor.log", {"COLLAB_HOST_MADDRS": "/ip4/127.0.0.1/tcp/0"})

    def await_monitor(self) -> None:
        """Wait (bounded) for the monitor's URL and print it; if its port was taken, try again on a free one."""
        log = self.out / "monitor.log"
        for retry_port in (0, None):
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline and self.monitor is not None and self.monitor.poll() is None:
                match = MONITOR_URL.search(log.read_text(errors="replace")) if log.exists() else None
                if match:
                    self.monitor_url = match.group(1)
                    print(f"open {self.monitor_url} to watch (collab monitor of run {self.args.run_id!r})", flush=True)
                    return
                time.sleep(0.1)
            if self.monitor is not None:
                end_process_group(self.monitor)
            if retry_port is not None:
                self.launch_monitor(retry_port)
        print(f"the monitor did not start (see {log}); the demo runs without it", flush=True)

    def maybe_capture_dashboard(self, step: int) -> None:
        """Once near the end of training, screenshot the dashboard in the background (the table keeps updating)."""
        if self.monitor_url is None or self.screenshot is not None or step < SCREENSHOT_AT * self.args.steps:
            return
        from examples.dashboard_capture import capture

        url = self.monitor_url

        def take() -> None:
            reason = capture(url, self.out / "dashboard.png")
            self.screenshot_result = "dashboard.png" if reason is None else f"no dashboard screenshot: {reason}"

        self.screenshot = threading.Thread(target=take, daemon=True)
        self.screenshot.start()

    def start_peer(self, peer: DemoPeer) -> None:
        peer.workdir.mkdir(parents=True, exist_ok=True)
        command = [
            sys.executable, str(TRAIN), "fit", "--config", str(CONFIG),
            "--trainer.strategy", "collaborative",  # by name: every setting comes from the COLLAB_* environment
            "--trainer.enable_progress_bar", "false", "--trainer.logger", "false",
            "--model.collaborative_steps", str(self.args.steps),
            "--data.batch_size", str(peer.batch_size),
            "--data.shard", str(peer.shard), "--data.num_shards", str(len(self.peers)),
            "--data.seed", str(peer.shard),
            "--output_dir", str(peer.workdir), "--status_file", str(peer.status_file),
        ]  # fmt: skip
        env = {
            "DEMO_START_FILE": str(peer.workdir / "go") if peer.role == "late" else "",
            **self.join_env,  # the join hint, as a user on another machine would paste it
            "COLLAB_HOST_MADDRS": "/ip4/127.0.0.1/tcp/0",
            "COLLAB_TARGET_BATCH_SIZE": str(self.args.target_batch_size),
            "COLLAB_MATCHMAKING_TIME": "3",
            "COLLAB_AVERAGING_TIMEOUT": "10",
            "COLLAB_VERBOSE": "1",
            "COLLAB_ALGORITHM": self.args.algorithm,  # gradient (default), adaptive or diloco
            **self.algorithm_env(),
        }
        peer.process = start_process(command, peer.log, env)
        self.event(f"{peer.name} started (batch size {peer.batch_size}, shard {peer.shard})")

    def algorithm_env(self) -> dict[str, str]:
        """The demo's settings for its algorithm (DiLoCo: ``DILOCO_DEMO_ENV``); a variable the user set wins."""
        defaults = DILOCO_DEMO_ENV if self.args.algorithm == "diloco" else {}
        return {name: value for name, value in defaults.items() if name not in os.environ}

    def event(self, text: str) -> None:
        self.events.append(f"{time.monotonic() - self.started:6.1f}s  {text}")

    # ------------------------------------------------------------------ the run

    def run(self) -> int:
        self.out.mkdir(parents=True, exist_ok=True)
        roles = roles_for(self.args.peers)
        self.peers = [
            DemoPeer(f"peer{i}", role, BATCH_SIZES[i % len(BATCH_SIZES)], i, self.out / "peers" / f"peer{i}")
            for i, role in enumerate(roles)
        ]
        self.start_bootstrap()
        self.event(f"bootstrap peer up; join hint: {' '.join(f'{k}={v}' for k, v in self.join_env.items())}")
        if extra := " ".join(f"{name}={value}" for name, value in self.algorithm_env().items()):
            self.event(f"{self.args.algorithm} settings of every peer: {extra}")
        if self.args.monitor:
            self.launch_monitor(self.args.monitor_port)
        for peer in self.peers:
            self.start_peer(peer)  # the late one waits (imports done) until its start file exists
        if self.args.monitor:
            self.await_monitor()  # the URL comes first, before the live table
        return self.watch()

    def watch(self) -> int:
        from rich.live import Live

        deadline = time.monotonic() + self.args.timeout
        with Live(self.render(), console=self.console, refresh_per_second=4, transient=False) as live:
            while True:
                self.poll()
                live.update(self.render())
                if all(peer.exit_state is not None for peer in self.peers):
                    break
                if time.monotonic() > deadline:
                    self.event(f"timeout after {self.args.timeout:.0f}s: stopping every peer")
                    for peer in self.peers:
                        if peer.process is not None and peer.exit_state is None:
                            end_process_group(peer.process)
                    self.poll()
                    live.update(self.render())
                    return 1
                time.sleep(POLL_SECONDS)
        return 0

    def poll(self) -> None:
        step = max((peer.status.get("step", 0) for peer in self.peers), default=0)
        now = time.monotonic() - self.started
        self.maybe_capture_dashboard(step)
        for peer in self.peers:
            if peer.process is None:
                continue
            go = peer.workdir / "go"
            if peer.role == "late" and not go.exists() and step >= JOIN_AT * self.args.steps:
                go.touch()
                self.event(f"{peer.name} joins now (step {step})")
            peer.read_status()
            if peer.exit_state is None and peer.process.poll() is not None:
                code = peer.process.returncode
                expected = {"leave": "left", "kill": "killed"}.get(peer.role) if peer.signalled else None
                peer.exit_state = expected or ("finished" if code == 0 else f"failed ({code})")
                end_process_group(peer.process)  # its DHT/averager children, if any
                self.event(f"{peer.name} exited: {peer.exit_state} (exit code {code})")
                continue
            if peer.exit_state is None and peer.status.get("state") == "training":
                if peer.role == "leave" and step >= LEAVE_AT * self.args.steps and not peer.signalled:
                    os.kill(peer.process.pid, signal.SIGINT)  # Lightning shuts down gracefully on Ctrl-C
                    peer.signalled = True
                    self.event(f"{peer.name}: SIGINT (Ctrl-C) at step {step}")
                if peer.role == "kill" and step >= KILL_AT * self.args.steps and not peer.signalled:
                    os.killpg(peer.process.pid, signal.SIGKILL)  # with its DHT and averager: a crashed machine
                    peer.signalled = True
                    self.event(f"{peer.name}: SIGKILL at step {step}")
            if peer.reporting:  # a peer that stopped reporting drops out of the plot at once
                self.timeline.append({**peer.status, "time": round(now, 2), "peer": peer.name})
        self.presence.append({"time": round(now, 2), "reporting": sum(peer.reporting for peer in self.peers)})

    # ------------------------------------------------------------------ output

    def render(self):
        from rich.console import Group
        from rich.table import Table
        from rich.text import Text

        from collab_core.reporting import format_eta  # the rule of every integration: an unknown ETA says so

        table = Table(
            title=f"collaborative training ({self.args.algorithm}) — run {self.args.run_id!r}, "
            f"target {self.args.target_batch_size}"
        )
        for column in ("peer", "role", "state", "samples/s", "step", "peers", "toward target", "ETA", "loss", "acc"):
            table.add_column(column, justify="right" if column not in ("peer", "role", "state") else "left")
        for peer in self.peers:
            s = peer.status
            toward = f"{s['samples_accumulated']}/{s['target_batch_size']}" if "samples_accumulated" in s else ""
            live = peer.reporting
            eta = format_eta(s.get("eta")) if live and "eta" in s else ""
            rate = s.get("samples_per_second") if live else None
            state = peer.state if live or peer.exit_state is not None or not s else "not reporting"
            table.add_row(
                peer.name,
                peer.role,
                state,
                f"{rate:.0f}" if rate is not None else "",
                str(s.get("step", "")),
                str(s.get("peers", "")),
                toward,
                eta,
                f"{s['train_loss']:.3f}" if "train_loss" in s else "",
                f"{s['val_accuracy']:.3f}" if "val_accuracy" in s else "",
            )
        return Group(table, Text("\n".join(self.events[-8:]), style="dim"))

    def finish(self, code: int) -> int:
        from rich.table import Table

        console = self.console
        console.print()
        if self.screenshot is not None:
            self.screenshot.join(timeout=90)
        summaries = {}
        for peer in self.peers:
            path = peer.workdir / "summary.json"
            if path.exists():
                summaries[peer.name] = json.loads(path.read_text())
        survivors = [p for p in self.peers if p.exit_state == "finished" and (p.workdir / "model.pt").exists()]
        identical, max_diff, tolerance = self.compare(survivors)
        if survivors:
            shutil.copy(survivors[0].workdir / "model.pt", self.out / "model.pt")
        self.write_metrics()
        plot = self.plot()

        table = Table(title="summary")
        for column in ("peer", "role", "ended", "collaborative steps", "samples contributed", "val accuracy"):
            table.add_column(column)
        for peer in self.peers:
            summary = summaries.get(peer.name, {})
            accuracy = summary.get("val_accuracy")
            table.add_row(
                peer.name,
                peer.role,
                peer.state,
                str(summary.get("collaborative_step", peer.status.get("step", ""))),
                str(peer.status.get("samples", "")),
                f"{accuracy:.3f}" if accuracy is not None else "",
            )
        console.print(table)
        verdict = "yes" if identical else "NO"
        console.print(
            f"surviving peers with identical weights: {verdict} ({len(survivors)} compared, max |difference| "
            f"{max_diff:.2e}, float32 rounding allows {tolerance:.1e})"
        )
        console.print(
            f"outputs: {self.out}/ (model.pt, metrics.csv, peers.csv, {plot.name if plot else 'no plot'}, "
            f"{self.screenshot_result if self.args.monitor else 'no monitor (--no-monitor)'}, peers/*/)"
        )
        if not identical or not survivors:
            return code or 1
        return code

    def compare(self, survivors: list[DemoPeer]) -> tuple[bool, float, float]:
        import torch

        return replicas_identical([torch.load(peer.workdir / "model.pt") for peer in survivors])

    def write_metrics(self) -> None:
        columns = [
            "time",
            "peer",
            "state",
            "step",
            "peers",
            "samples",
            "samples_per_second",
            "train_loss",
            "val_accuracy",
        ]
        with open(self.out / "metrics.csv", "w", newline="") as out:
            writer = csv.DictWriter(out, columns, extrasaction="ignore")
            writer.writeheader()
            writer.writerows(self.timeline)
        with open(self.out / "peers.csv", "w", newline="") as out:
            writer = csv.DictWriter(out, ["time", "reporting"])
            writer.writeheader()
            writer.writerows(self.presence)

    def plot(self) -> Path | None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        from collab_core.reporting import RATE_WINDOW_SECONDS

        if not self.timeline:
            return None
        fig, axes = plt.subplots(2, 2, figsize=(12, 8))
        for peer in self.peers:
            rows = [r for r in self.timeline if r["peer"] == peer.name]
            if not rows:
                continue
            label = f"{peer.name} ({peer.role})"
            with_loss = [r for r in rows if "train_loss" in r and "step" in r]
            axes[0, 0].plot([r["step"] for r in with_loss], [r["train_loss"] for r in with_loss], ".", label=label)
            with_acc = [r for r in rows if "val_accuracy" in r and "step" in r]
            axes[0, 1].plot([r["step"] for r in with_acc], [r["val_accuracy"] for r in with_acc], "-", label=label)
            # this peer's samples/s over the last seconds of real time (collab_core.reporting.RateMeter, as in the
            # live table); the line ends when the peer stops reporting
            rates = [r.get("samples_per_second") for r in rows]
            axes[1, 1].plot([r["time"] for r in rows], [math.nan if v is None else v for v in rates], label=label)
            if peer.exit_state is not None and peer.exit_state != "finished":
                axes[1, 0].axvline(rows[-1]["time"], color="grey", linestyle=":", linewidth=1)
                axes[1, 0].annotate(f"{peer.name} {peer.exit_state}", (rows[-1]["time"], 0.2), fontsize=7, rotation=90)
        if self.presence:
            times, counts = [p["time"] for p in self.presence], [p["reporting"] for p in self.presence]
            axes[1, 0].step(times, counts, where="post", color="black", label="peers reporting")
        titles = [
            ("training loss", "collaborative step"),
            ("validation accuracy", "collaborative step"),
            (f"peers in the collaboration (gone: no status for {STALE_SECONDS:g} s)", "seconds"),
            (f"samples/s per peer (over the last {RATE_WINDOW_SECONDS:g} s)", "seconds"),
        ]
        for axis, (title, xlabel) in zip(axes.flat, titles, strict=True):
            axis.set_title(title)
            axis.set_xlabel(xlabel)
            axis.legend(fontsize=7)
            axis.grid(alpha=0.3)
        fig.tight_layout()
        path = self.out / "plot.png"
        fig.savefig(path, dpi=90)
        plt.close(fig)
        return path

    def stop_everything(self) -> None:
        for peer in self.peers:
            if peer.process is not None:
                end_process_group(peer.process)
        if self.monitor is not None:
            end_process_group(self.monitor)
        if self.bootstrap is not None:
            end_process_group(self.bootstrap)


def run_bootstrap() -> int:
    """The bootstrap peer: a DHT node that prints the join hint and serves until it is told to stop."""
    from collab_core import CollaborativeSettings, start_dht

    dht, _hint = start_dht(CollaborativeSettings.from_env())
    stop = False

    def request_stop(*_args) -> None:
        nonlocal stop
        stop = True

    signal.signal(signal.SIGTERM, request_stop)
    signal.signal(signal.SIGINT, request_stop)
    while not stop:
        time.sleep(0.2)
    dht.shutdown()
    return 0


def _interrupt(*_args) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m examples.demo", description=__doc__.split("\n\n")[0])
    parser.add_argument("--peers", type=int, default=4, help="training peers, 2 or more (default 4)")
    parser.add_argument("--steps", type=int, default=40, help="collaborative steps to train (default 40)")
    parser.add_argument("--target-batch-size", type=int, default=256, help="samples per step, all peers together")
    parser.add_argument("--output-dir", default="demo_out", help="where the results go (default demo_out/)")
    parser.add_argument("--run-id", default="demo", help="the run's name in the DHT")
    parser.add_argument(
        "--algorithm", default="gradient", choices=["gradient", "adaptive", "diloco"],
        help="the collaboration's algorithm (COLLAB_ALGORITHM of every peer; default gradient)",
    )  # fmt: skip
    parser.add_argument("--timeout", type=float, default=600, help="stop everything after this many seconds")
    parser.add_argument("--monitor-port", type=int, default=8765, help="port of the dashboard (default 8765)")
    parser.add_argument("--no-monitor", dest="monitor", action="store_false", help="do not start collab monitor")
    parser.add_argument("--bootstrap", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.bootstrap:
        return run_bootstrap()
    if args.peers < 2:
        parser.error("--peers must be at least 2")
    if args.steps < 5:
        parser.error("--steps must be at least 5 (peers join, leave and are killed at fractions of it)")

    demo = Demo(args)
    if demo.out.exists():
        shutil.rmtree(demo.out)
    signal.signal(signal.SIGINT, signal.default_int_handler)  # also when started in the background (SIG_IGN)
    previous = signal.getsignal(signal.SIGTERM)
    signal.signal(signal.SIGTERM, _interrupt)  # treat `kill <demo>` like Ctrl-C: stop every peer, then summarize
    code = 1
    try:
        code = demo.run()
    except KeyboardInterrupt:
        print("interrupted: stopping every peer", flush=True)
        code = 130
    finally:
        demo.stop_everything()
        signal.signal(signal.SIGTERM, previous)
    return demo.finish(code)


if __name__ == "__main__":
    sys.exit(main())
