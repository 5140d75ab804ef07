"""``python -m bench``: run workloads W1-W5 and W7, print the table, write ``bench/results/<date>.json``, W1 plot.

Examples::

    python -m bench                      # every workload (about 15-20 minutes on 2 cores)
    python -m bench --workload W1 W2     # some of them
    python -m bench --workload W1 --measure 3 --warmup 0 --sides ours   # the smoke test's quick run
"""

from __future__ import annotations

import argparse
import datetime
import sys
import tempfile
from pathlib import Path

from bench.plot import plot_w1
from bench.processes import LOOPBACK
from bench.report import environment, table, write_json
from bench.workloads import RETRIES, WORKLOADS, Config, Result, Row

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def _ints(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in text.split(","))


def _names(text: str) -> tuple[str, ...]:
    return tuple(part.strip() for part in text.split(",") if part.strip())


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n")[0])
    parser.add_argument("--workload", nargs="+", default=list(WORKLOADS), type=str.upper, choices=list(WORKLOADS))
    parser.add_argument("--measure", type=int, default=10, help="measured collaborative steps (after warm-up)")
    parser.add_argument("--warmup", type=int, default=2, help="collaborative steps not measured")
    parser.add_argument("--join-after", type=int, default=2, help="W1: the 2nd peer starts after this many steps")
    parser.add_argument("--sides", type=_names, default=("ours", "raw"), help="W1/W2/W4: ours,raw")
    parser.add_argument("--w3-peers", type=_ints, default=(2, 3, 4))
    parser.add_argument("--w3-compression", type=_names, default=("none", "float16", "uniform8bit"))
    parser.add_argument("--w3-params", type=int, default=25_000_000)
    parser.add_argument("--w3-measure", type=int, default=10, help="W3's measured steps (each takes seconds)")
    parser.add_argument("--w4-peers", type=_ints, default=(1, 2, 3, 4))
    parser.add_argument("--w5-rounds", type=int, default=3, help="W5: runs of each side, taken in turn, pooled")
    parser.add_argument("--w7-inner-steps", type=_ints, default=(8, 32, 128), help="W7: DiLoCo's inner steps H")
    parser.add_argument("--w7-lm-inner-steps", type=int, default=256, help="W7: inner steps per peer, char-LM runs")
    parser.add_argument("--w7-outer-lr", type=float, default=None, help="W7 char-LM: DiLoCo's outer lr (default 0.7)")
    parser.add_argument(
        "--w7-outer-momentum", type=float, default=None, help="W7 char-LM: DiLoCo's outer momentum (default 0.9)"
    )
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds per measurement (W3: 3x) before it fails")
    parser.add_argument("--results-dir", type=Path, default=RESULTS_DIR, help="where the JSON and PNG go")
    parser.add_argument("--workdir", type=Path, default=None, help="peer logs and records (default: a temp dir)")
    return parser.parse_args(argv)


def run(args: argparse.Namespace, initial_peers: list[str], workdir: Path) -> tuple[list[Row], dict[str, Result]]:
    config = Config(
        initial_peers=initial_peers,
        workdir=workdir,
        measure=args.measure,
        warmup=args.warmup,
        join_after=args.join_after,
        sides=args.sides,
        w3_peers=args.w3_peers,
        w3_compression=args.w3_compression,
        w3_params=args.w3_params,
        w3_measure=args.w3_measure,
        w4_peers=args.w4_peers,
        w5_rounds=args.w5_rounds,
        w7_inner_steps=args.w7_inner_steps,
        w7_lm_inner_steps=args.w7_lm_inner_steps,
        w7_outer_lr=args.w7_outer_lr,
        w7_outer_momentum=args.w7_outer_momentum,
        timeout=args.timeout,
    )
    results: dict[str, Result] = {}
    for name in args.workload:
        print(f"running {name} ...", flush=True)
        results[name] = WORKLOADS[name](config)
        print(table(results[name].rows), flush=True)
    rows = [row for result in results.values() for row in result.rows]
    return rows, results


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import hivemind

    meta = environment()
    stamp = datetime.datetime.now().strftime("%Y-%m-%d_%H%M%S")
    bootstrap = hivemind.DHT(host_maddrs=[LOOPBACK], start=True)
    try:
        initial_peers = [str(addr) for addr in bootstrap.get_visible_maddrs()]
        with tempfile.TemporaryDirectory(prefix="bench-") as tmp:
            workdir = args.workdir or Path(tmp)
            rows, results = run(args, initial_peers, workdir)
    finally:
        bootstrap.shutdown()
    meta["load_average_end"] = environment()["load_average"]
    meta["command"] = " ".join(["python -m bench", *(argv if argv is not None else sys.argv[1:])])
    json_path = args.results_dir / f"{stamp}.json"
    meta["repeated_measurements"] = RETRIES
    write_json(json_path, rows, {name: result.data for name, result in results.items()}, meta)
    print(f"\nload average (1/5/15 min) at start {meta['load_average']}, at end {meta['load_average_end']}")
    print(table(rows))
    print(f"results: {json_path}")
    if "W1" in results and plot_w1(results["W1"].data, args.results_dir / f"{stamp}_w1_timeline.png"):
        print(f"W1 timeline: {args.results_dir / f'{stamp}_w1_timeline.png'}")
    return 0
