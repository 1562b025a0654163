"""``make bench``: run the README's benchmarks, print a Markdown table, write results.json.

.venv/bin/python -m benchmarks.run                 all of them (about 30 minutes on 2 cores)
.venv/bin/python -m benchmarks.run --only 9c,9d    some of them
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
import traceback
from pathlib import Path

from benchmarks.common import Result, Skip, markdown_table, python_info, say

HERE = Path(__file__).resolve().parent

BENCHMARKS = {
    "9a": "3 members × 20,000 MNIST rows vs a centralized epoch",
    "9b": "orchestration overhead per round (from 9a's run)",
    "9c": "FedAvg time and peak memory for K = 2 ... 64 CNN-sized updates",
    "9d": "the coordinator with 1,000 simulated members",
    "9e": "orchestration overhead per round with the Kubernetes operator",
    "9f": "time to 0.988 test accuracy, federated (defaults) vs centralized (from 9a's runs)",
}

EPILOG = """\
benchmarks:
  9a  A real embedded alliance (alliance.embedded: S3 gateway, 3 member agent processes
      sharing the cores as `alliance run` does by default (alliance.cpulease.plan; set with
      --cpu-sharing), the coordinator in this process via alliance.driver.drive) on the full
      MNIST set from ../shared/data/mnist: each member has an IID third of the 60,000
      training rows and of the 10,000 test rows, so the round accuracy is the accuracy on the
      whole test set. --repeats (default 3) alternations of: a federated run with the
      platform's defaults (FedAvg, 1 local epoch, batch 32) until 0.988 or 5 rounds, then, in
      its own process, the same model trained centrally on the same 60,000 rows (default
      threading), evaluated after each epoch, until 0.988 or 4 epochs. The members' data is
      parsed before the run (alliance check-data, one parse cache) and every member is ready
      (TensorFlow loaded) before round 1. Per alternation: each round's wall time and
      accuracy, and the mean round wall time ÷ the centralized first epoch (fit + evaluation).
      Target: the median of those ratios <= 1.1.
  9b  From 9a's runs, per round (medians): wall time - the slowest member's fit (with its wait
      for the CPU lease, when members take turns) - the slowest validator's evaluate: the
      orchestration overhead, target <= 1 s; and the CPU the platform's own processes used,
      sampled from /proc every 0.2 s: the gateway and the coordinator over the round, and,
      while members train (round start to aggregation), the gateway, the coordinator and each
      member from its upload on (idle, polling), as % of one core, target < 2 %. Then one
      more 3-round run with the coordinator polling every 0.05 s, as before it waited on the
      store's notifications, for comparison.
  9f  From 9a's runs: the wall time from the start of round 1 to the end of the first round
      whose global model reaches 0.988 on the 10,000 test rows, against the centralized time
      (fit + evaluation, epoch by epoch) to the same accuracy in the same alternation; both
      accuracy curves. Target: the median ratio <= 1.25. (benchmarks/tune_defaults.py
      simulates server-side variants of the defaults in one process.)
  9c  FedAvg of K = 2, 4, 8, 16, 32, 64 updates shaped like the base CNN (1,199,882 float32),
      streamed from .npz files on disk through strategies.create("fedavg").aggregate, and from
      a real S3 gateway through Coordinator.aggregate (prefetching, checks, writes the model;
      checked updates kept for the aggregation up to 64 MiB, the rest read again).
      Seconds, tracemalloc peak and RSS delta of each aggregation; the result is checked
      against the exact weighted mean. Target: peak memory does not grow with K (K=64 vs
      K=32).
  9d  The coordinator and engine alone, no TensorFlow: a real S3 gateway, 1,000 members
      simulated by one child process (heartbeats, and an update or validation for each task
      addressed to them), 3 rounds driven by Coordinator.reconcile in alliance.driver's loop.
      Per round: seconds inside reconcile (observe + step + execute, with a breakdown), the
      round wall time, and the coordinator's time on the critical path. Target: <= 10 s of
      orchestration per round; when over, one more round is profiled with cProfile.

  9e  The operator as its own process against the test API server (tests/kube/apiserver.py),
      member pods run as local processes by the kubelet stand-in, a real S3 gateway, real
      TensorFlow: 3 members x 2,000 rows of the shipped sample, 4 rounds of 1 local epoch, the
      TrainingRun driven by the operator's daemon (alliance.driver.drive, as 9a/9b) at its
      default run interval (BENCH_9E_INTERVALS=0.1,0.05 compares others). Per round, as 9b:
      wall time - slowest fit - slowest evaluate. Target: <= 9b + 0.05 s, round 1 likewise.

Results: a Markdown table on stdout (paste it into the README) and every number, with the
per-round details, in benchmarks/results.json. Timings depend on what else the machine runs.
"""


def parse_only(text: str | None) -> list[str]:
    if not text:
        return list(BENCHMARKS)
    chosen = []
    for part in text.split(","):
        key = part.strip().lower()
        key = key if key.startswith("9") else "9" + key
        if key not in BENCHMARKS:
            raise SystemExit(
                f"--only: unknown benchmark {part.strip()!r}; known: {', '.join(BENCHMARKS)}"
            )
        if key not in chosen:
            chosen.append(key)
    return [k for k in BENCHMARKS if k in chosen]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.run",
        description="Run the alliance benchmarks (make bench).",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--only", metavar="IDS", help="comma-separated benchmarks to run, e.g. 9a,9c (default: all)"
    )
    p.add_argument(
        "--work-dir",
        type=Path,
        help="where the stores, member data and logs go (default: a temporary "
        "directory, removed at the end unless --keep)",
    )
    p.add_argument("--keep", action="store_true", help="keep the work directory")
    p.add_argument(
        "--output",
        type=Path,
        default=HERE / "results.json",
        help="the JSON results file (default: benchmarks/results.json)",
    )
    p.add_argument(
        "--profile",
        action="store_true",
        help="9d: profile one more round with cProfile even when on target",
    )
    p.add_argument(
        "--members", type=int, default=1000, help="9d: number of simulated members (default 1000)"
    )
    p.add_argument(
        "--repeats",
        type=int,
        default=3,
        help="9a/9b/9f: alternations of a federated and a centralized run (default 3)",
    )
    p.add_argument(
        "--cpu-sharing",
        default="auto",
        help="9a/9b/9f: how the members share the cores, as `alliance run --cpu-sharing` "
        "(default auto)",
    )
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    selected = parse_only(args.only)
    if args.work_dir:
        work = args.work_dir.resolve()
        if work.exists() and any(work.iterdir()):
            raise SystemExit(f"--work-dir {work} is not empty; give a new or empty directory")
        work.mkdir(parents=True, exist_ok=True)
    else:
        work = Path(tempfile.mkdtemp(prefix="alliance-bench-"))
    load_before = _loadavg()
    say(
        f"benchmarks {', '.join(selected)}; work dir {work}; {python_info()['cores']} cores; "
        f"load average {load_before}"
    )
    if load_before and load_before[0] > 0.5:
        say("note: the machine is busy; timings will be disturbed")
    started = time.perf_counter()
    results: list[Result] = []

    if {"9a", "9b", "9f"} & set(selected):
        from benchmarks import federated

        wanted = [k for k in ("9a", "9b", "9f") if k in selected]
        out = _guard(
            wanted,
            lambda: federated.run(
                work / "federated",
                with_centralized="9a" in selected or "9f" in selected,
                repeats=args.repeats,
                cpu_sharing=args.cpu_sharing,
            ),
        )
        results += [r for r in out if r.bench in wanted]
    if "9c" in selected:
        from benchmarks import aggregation

        results += _guard(["9c"], lambda: [aggregation.run(_mkdir(work / "aggregation"))])
    if "9d" in selected:
        from benchmarks import engine_scale

        results += _guard(
            ["9d"],
            lambda: [
                engine_scale.run(
                    _mkdir(work / "engine"), members=args.members, profile=args.profile
                )
            ],
        )

    if "9e" in selected:
        from benchmarks import operator as operator_bench

        results += _guard(["9e"], lambda: [operator_bench.run(_mkdir(work / "operator"))])

    total = time.perf_counter() - started
    table = markdown_table(results)
    print("\n" + table + "\n", flush=True)
    report = {
        "generatedAt": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": {
            **python_info(),
            "loadAverageBefore": load_before,
            "loadAverageAfter": _loadavg(),
        },
        "selected": selected,
        "totalSeconds": total,
        "markdown": table,
        "results": [r.to_dict() for r in results],
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(report, indent=1, default=str) + "\n")
    say(f"done in {total:.0f} s; results in {args.output}")
    if args.keep or args.work_dir:
        say(f"work dir kept: {work}")
    else:
        shutil.rmtree(work, ignore_errors=True)
    return 1 if any(r.error for r in results) else 0


def _guard(benches: list[str], fn) -> list[Result]:
    """Run a benchmark; a skip or an error becomes a result instead of ending the run."""
    started = time.perf_counter()
    try:
        out = list(fn())
    except Skip as exc:
        say(f"{'/'.join(benches)} skipped: {exc}")
        return [Result(b, BENCHMARKS[b], skipped=str(exc)) for b in benches]
    except Exception as exc:  # keep going with the other benchmarks
        traceback.print_exc()
        say(f"{'/'.join(benches)} failed: {exc}")
        return [Result(b, BENCHMARKS[b], error=f"{type(exc).__name__}: {exc}") for b in benches]
    for r in out:
        r.seconds = time.perf_counter() - started
    return out


def _mkdir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path


def _loadavg() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


if __name__ == "__main__":
    sys.exit(main())
