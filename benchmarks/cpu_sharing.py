"""How co-located members should share the cores: measured on 9a's workload, W.

W: 3 members, each an IID third of the full MNIST training rows (20,000) and test rows, one
local epoch of the seed CNN at batch 32 and an evaluation of its test rows: one round's
computation. Each option runs W in fresh processes that import TensorFlow, build the model
and load their (cached) data first, then start together; the time is from the start to the
last one done. Options (``alliance.cpulease.plan``):

  shared   all members at once, cores ÷ members TensorFlow threads each (time-slicing when
           there are more members than cores)
  turns    one member at a time through the local CPU lease, every core each
  N        N members at a time through N leases, cores ÷ N threads each (2: pairs)
  central  the reference: one process, all 60,000 rows, every core

    .venv/bin/python -m benchmarks.cpu_sharing [--options shared,turns,2,central] [--repeat 1]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

from benchmarks.common import PROJECT_ROOT, cores, mnist_files, say

MEMBERS = 3


def worker(args: argparse.Namespace) -> None:
    """One member's computation, started by ``measure``: ready → wait for "go" → fit, evaluate."""
    from alliance.cpulease import CpuLease
    from alliance.data.datadir import load_split
    from alliance.model import build_cnn, configure_threads

    configure_threads(args.threads)
    import keras
    import tensorflow as tf

    if os.environ.get("BENCH_INTER_OP"):
        tf.config.threading.set_inter_op_parallelism_threads(int(os.environ["BENCH_INTER_OP"]))
    if os.environ.get("BENCH_INTRA_OP"):
        tf.config.threading.set_intra_op_parallelism_threads(int(os.environ["BENCH_INTRA_OP"]))

    train = load_split(args.data_dir, "train", cache_dir=args.cache_dir)
    test = load_split(args.data_dir, "test", cache_dir=args.cache_dir)
    keras.utils.set_random_seed(0)
    model = build_cnn()
    model.fit(train.x[:64], train.y[:64], epochs=1, batch_size=32, verbose=0)  # warm the graph
    model.evaluate(test.x[:64], test.y[:64], verbose=0)
    lease = CpuLease(args.lease_dir, args.slots) if args.slots else None
    print("ready", flush=True)
    sys.stdin.readline()
    out = {"waitSeconds": 0.0}
    with lease.hold() if lease else _nothing() as waited:
        out["waitSeconds"] += waited or 0.0
        t, before = time.monotonic(), resource.getrusage(resource.RUSAGE_SELF)
        model.fit(train.x, train.y, epochs=1, batch_size=32, shuffle=True, verbose=0)
        out["fitSeconds"] = time.monotonic() - t
        after = resource.getrusage(resource.RUSAGE_SELF)
        out["fitUser"] = after.ru_utime - before.ru_utime
        out["fitSystem"] = after.ru_stime - before.ru_stime
        out["fitMajorFaults"] = after.ru_majflt - before.ru_majflt
        out["fitMinorFaults"] = after.ru_minflt - before.ru_minflt
        out["fitSwitches"] = after.ru_nivcsw - before.ru_nivcsw
    with lease.hold() if lease else _nothing() as waited:
        out["waitSeconds"] += waited or 0.0
        t = time.monotonic()
        out["accuracy"] = float(model.evaluate(test.x, test.y, batch_size=256, verbose=0)[1])
        out["evalSeconds"] = time.monotonic() - t
    print(json.dumps(out), flush=True)


class _nothing:
    def __enter__(self):
        return 0.0

    def __exit__(self, *exc):
        return False


def measure(option: str, dirs: list[Path], central_dir: Path, work: Path) -> dict:
    """Run W (or the centralized reference) once with ``option``; seconds and per-process
    numbers."""
    from alliance.cpulease import plan

    n = cores()
    if option == "central":
        procs = [(central_dir, n, 0)]
    else:
        p = plan(n, len(dirs), option)
        procs = [(d, p.threads, p.slots or 0) for d in dirs]
    lease_dir = work / f"lease-{option}-{time.monotonic_ns()}"
    children = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "benchmarks.cpu_sharing",
                "--worker",
                "--data-dir",
                str(d),
                "--threads",
                str(threads),
                "--slots",
                str(slots),
                "--lease-dir",
                str(lease_dir),
                "--cache-dir",
                str(work / "cache"),
            ],
            cwd=PROJECT_ROOT,
            env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "PYTHONUNBUFFERED": "1"},
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
        )
        for d, threads, slots in procs
    ]
    for c in children:
        line = c.stdout.readline().strip()
        if line != "ready":
            raise RuntimeError(f"a worker did not start: {line!r}")
    started = time.monotonic()
    for c in children:
        c.stdin.write("go\n")
        c.stdin.flush()
    results = []
    for c in children:
        results.append(json.loads(c.stdout.readline()))
        c.wait()
    seconds = time.monotonic() - started
    return {
        "option": option,
        "threads": procs[0][1],
        "slots": procs[0][2] or None,
        "seconds": seconds,
        "processes": results,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--options", default="shared,turns,2,central")
    p.add_argument("--repeat", type=int, default=1, help="alternate the options this many times")
    p.add_argument("--work-dir", type=Path, default=Path("/tmp/alliance-cpu-sharing"))
    p.add_argument("--output", type=Path, default=None, help="write the results as JSON")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--data-dir", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--threads", type=int, default=1, help=argparse.SUPPRESS)
    p.add_argument("--slots", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--lease-dir", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--cache-dir", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        worker(args)
        return

    from alliance.data.split import split_dataset

    train_file, test_file = mnist_files()
    work = args.work_dir
    work.mkdir(parents=True, exist_ok=True)
    members = work / "members"
    if not members.exists():
        split_dataset(train_file, test_file, members, MEMBERS, "iid", seed=0)
    dirs = sorted(d for d in members.iterdir() if d.is_dir())
    options = [o.strip() for o in args.options.split(",") if o.strip()]
    runs: dict[str, list[dict]] = {o: [] for o in options}
    for i in range(args.repeat):
        for option in options:
            r = measure(option, dirs, train_file.parent, work)
            runs[option].append(r)
            fits = ", ".join(f"{x['fitSeconds']:.1f}" for x in r["processes"])
            say(
                f"W {i + 1}/{args.repeat} {option:8s}: {r['seconds']:6.1f} s "
                f"(fits {fits} s; "
                f"threads {r['threads']}, slots {r['slots']})"
            )
    summary = {
        o: {
            "median": statistics.median(x["seconds"] for x in rs),
            "all": [x["seconds"] for x in rs],
        }
        for o, rs in runs.items()
    }
    for o, s in summary.items():
        say(f"{o:8s} median {s['median']:.1f} s of {', '.join(f'{x:.1f}' for x in s['all'])}")
    if args.output:
        args.output.write_text(json.dumps({"cores": cores(), "runs": runs, "summary": summary}))


if __name__ == "__main__":
    main()
