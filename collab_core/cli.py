"""The ``collab`` command (also ``python -m collab_core``): ``monitor``, ``status`` and ``doctor``."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

__all__ = ["main"]


def _common(parser: argparse.ArgumentParser, *, run_required: bool = True) -> None:
    parser.add_argument(
        "--run-id", required=run_required, default=None, help="the run's name (COLLAB_RUN_ID of its peers)"
    )
    parser.add_argument(
        "--initial-peers",
        nargs="+",
        default=[],
        metavar="MADDR",
        help="multiaddrs of running peers, with /p2p/<peer id> (the COLLAB_INITIAL_PEERS of the join hint)",
    )
    parser.add_argument("--client-mode", action="store_true", help="accept no incoming connections")
    parser.add_argument("--timeout", type=float, default=15.0, help="seconds to reach the DHT (default 15)")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="collab", description="Watch and diagnose collaborative training runs.")
    commands = parser.add_subparsers(dest="command", required=True)

    monitor = commands.add_parser("monitor", help="serve a live dashboard, /api/state and /metrics of a run")
    _common(monitor)
    monitor.add_argument("--host", default="127.0.0.1", help="address the web server listens on (default 127.0.0.1)")
    monitor.add_argument("--port", type=int, default=8765, help="web server port (default 8765; 0 picks a free one)")
    monitor.add_argument("--interval", type=float, default=1.0, help="seconds between DHT reads (default 1)")
    monitor.add_argument("--backup-dir", default=None, help="write swarm backups (resumable checkpoints) here")
    monitor.add_argument("--backup-every", type=int, default=10, help="back up every K collaborative steps")
    monitor.add_argument("--keep", type=int, default=3, help="keep the N newest backups (default 3)")

    status = commands.add_parser("status", help="print the peer table of a run once and exit")
    _common(status)
    status.add_argument("--json", action="store_true", help="print /api/state's JSON instead of the table")

    doctor = commands.add_parser("doctor", help="check what most often breaks joining, and say the fix")
    _common(doctor, run_required=False)
    return parser


def _fail(message: str) -> int:
    print(f"collab: error: {message}", file=sys.stderr, flush=True)
    return 2


def _join(args: argparse.Namespace):  # -> hivemind.DHT
    from collab_core.monitor.reader import join_as_observer

    return join_as_observer(args.run_id, args.initial_peers, client_mode=args.client_mode, timeout=args.timeout)


def _status(args: argparse.Namespace) -> int:
    from collab_core.monitor.reader import SwarmReader
    from collab_core.monitor.table import render_table

    dht = _join(args)
    try:
        reader = SwarmReader(dht, args.run_id)
        state = reader.read(timeout=args.timeout)
        if state.error:
            return _fail(f"could not read run {args.run_id!r} from the DHT ({state.error}) within {args.timeout:g} s")
        if args.json:
            print(json.dumps(state.to_json(), indent=2))
        else:
            print(render_table(state))
        return 0
    finally:
        dht.shutdown()


def _monitor(args: argparse.Namespace) -> int:
    from collab_core.monitor.reader import SwarmReader
    from collab_core.monitor.server import MonitorOptions, MonitorService, serve

    if args.interval <= 0:
        return _fail(f"--interval must be > 0, got {args.interval}")
    if args.backup_dir is not None and (args.backup_every < 1 or args.keep < 1):
        return _fail(f"--backup-every and --keep must be >= 1, got {args.backup_every} and {args.keep}")
    if not 0 <= args.port <= 65535:
        return _fail(f"--port must be 0-65535, got {args.port}")
    dht = _join(args)
    backups = None
    try:
        reader = SwarmReader(dht, args.run_id)
        if args.backup_dir is not None:
            from collab_core.monitor.backups import SwarmBackups

            backups = SwarmBackups(dht, args.run_id, args.backup_dir, every=args.backup_every, keep=args.keep)
        options = MonitorOptions(run_id=args.run_id, host=args.host, port=args.port, interval=args.interval)
        service = MonitorService(reader, options, backups)

        def ready(url: str) -> None:
            print(f"collab monitor of run {args.run_id!r}: open {url} to watch", flush=True)

        serve(service, options, ready)
        return 0
    finally:
        if backups is not None:
            backups.shutdown()
        dht.shutdown()


def _doctor(args: argparse.Namespace) -> int:
    from collab_core.doctor import format_findings, run_doctor

    findings = run_doctor(args.initial_peers, args.run_id, client_mode=args.client_mode, timeout=args.timeout)
    print(format_findings(findings), flush=True)
    return 0 if all(finding.ok for finding in findings) else 1


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``collab``; returns the exit status."""
    from collab_core.dht import DHTStartupError
    from collab_core.settings import CollaborativeConfigError

    args = _parser().parse_args(argv)
    if args.command in ("monitor", "status") and not args.initial_peers:
        return _fail(
            "--initial-peers is required: pass the COLLAB_INITIAL_PEERS addresses from the join hint of a running peer"
        )
    try:
        if args.command == "monitor":
            return _monitor(args)
        if args.command == "status":
            return _status(args)
        return _doctor(args)
    except (DHTStartupError, CollaborativeConfigError, OSError) as e:
        return _fail(str(e))
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
