"""9c: FedAvg of K updates of the base CNN's shape: seconds and peak memory against K.

Updates have the base CNN's shapes (1,199,882 float32 parameters, 4.8 MB as ``.npz``), built
with numpy. Update k is the base weights plus 0.001·(k+1), with 100·(k+1) examples, so the
result is checked against the closed-form weighted mean. Two paths, each for K = 2 ... 64:

- disk: ``strategies.create("fedavg").aggregate(base, updates, None)`` where each
  ``Update.load`` reads its ``.npz`` file from a temporary directory (no prefetching);
- s3: ``Coordinator.aggregate`` (the production path) against a real S3 gateway: the updates
  are fetched by ``Store.get_update`` with the coordinator's prefetch window, checked (sha256,
  metrics, shapes, dtypes, finiteness, distance from the model), averaged, and the new model
  is written back to the store.

Each aggregation runs twice: once timed with the process RSS sampled every 2 ms (``rss Δ``:
peak minus the RSS before the call, after ``malloc_trim``), once under ``tracemalloc`` (peak of
the Python and numpy allocations during the call, all threads, relative to the start).
"""

from __future__ import annotations

import gc
import tempfile
import time
import tracemalloc
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.common import Result, RssPeak, malloc_trim, mb, say

SHAPES = [(3, 3, 1, 32), (32,), (3, 3, 32, 64), (64,), (9216, 128), (128,), (128, 10), (10,)]
KS = (2, 4, 8, 16, 32, 64)
RUN = "bench-aggregation"
#: Peak memory "does not grow with K": the K=64 peak is within this factor of the K=32 peak.
#: From K=8 on the prefetch window (1 + PREFETCH updates) is full, and the S3 path keeps the
#: checked updates for the aggregation only up to coordinator.KEEP_BYTES (64 MiB: 13 updates
#: of 4.8 MB), reading the rest again, so it is flat from there on (measured: from K=32).
GROWTH_TARGET = 1.10
GROWTH_FROM_K = 32


def base_weights() -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    return [rng.normal(0, 0.05, s).astype(np.float32) for s in SHAPES]


def update_weights(base: list[np.ndarray], k: int) -> tuple[list[np.ndarray], int]:
    return [(w + np.float32(0.001 * (k + 1))) for w in base], 100 * (k + 1)


def expected_offset(k_count: int) -> float:
    ns = [100 * (k + 1) for k in range(k_count)]
    return sum(0.001 * (k + 1) * n for k, n in enumerate(ns)) / sum(ns)


def check(result: list[np.ndarray], base: list[np.ndarray], k_count: int) -> float:
    off = expected_offset(k_count)
    return max(
        float(np.max(np.abs(r - (b + np.float32(off))))) for r, b in zip(result, base, strict=True)
    )


def measure(fn: Callable[[], Any]) -> dict:
    """Run ``fn`` twice: timed with RSS sampling, then under tracemalloc."""
    gc.collect()
    malloc_trim()
    with RssPeak() as rss:
        started = time.perf_counter()
        out = fn()
        seconds = time.perf_counter() - started
    del out
    gc.collect()
    malloc_trim()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        tracemalloc.reset_peak()
        out = fn()
        peak = tracemalloc.get_traced_memory()[1] - before
    finally:
        tracemalloc.stop()
    return {
        "seconds": seconds,
        "rssDeltaMB": mb(rss.delta),
        "tracemallocPeakMB": mb(peak),
        "result": out,
    }


def run(work: Path, ks: tuple[int, ...] = KS) -> Result:
    from alliance import strategies, weights

    res = Result("9c", "FedAvg of K CNN-sized updates")
    base = base_weights()
    params = sum(w.size for w in base)
    size = len(weights.dumps(base))
    res.details.update(parameters=int(params), updateBytes=size, ks=list(ks))
    say(f"9c: {params:,} parameters, {mb(size):.1f} MB per update; writing {max(ks)} updates")

    disk = Path(tempfile.mkdtemp(prefix="updates-", dir=work))
    paths = []
    for k in range(max(ks)):
        arrays, n = update_weights(base, k)
        path = disk / f"m{k:03d}.npz"
        path.write_bytes(weights.dumps(arrays))
        paths.append((path, n))

    def disk_aggregate(k_count: int) -> list[np.ndarray]:
        updates = (
            strategies.Update(p.stem, n, lambda p=p: weights.loads(p.read_bytes()))
            for p, n in paths[:k_count]
        )
        return strategies.create("fedavg").aggregate(base, updates, None)[0]

    rows: dict[str, list[dict]] = {"disk": [], "s3": []}
    for k_count in ks:
        m = measure(lambda k_count=k_count: disk_aggregate(k_count))
        m["maxError"] = check(m.pop("result"), base, k_count)
        rows["disk"].append({"k": k_count, **m})
        say(
            f"9c: disk K={k_count:>2}: {m['seconds']:.2f} s, tracemalloc peak "
            f"{m['tracemallocPeakMB']:.0f} MB, rss Δ {m['rssDeltaMB']:.0f} MB"
        )

    try:
        rows["s3"] = _s3(work, base, ks)
    except Exception as exc:  # the gateway missing must not hide the disk numbers
        from alliance.s3server import S3ServerError

        if not isinstance(exc, S3ServerError):
            raise
        res.details["s3Skipped"] = str(exc)
        say(f"9c: s3 path skipped: {exc}")

    res.details.update(rows)
    by_k: dict[int, list[str]] = {}
    for path_name, label in (("disk", "disk"), ("s3", "S3")):
        for e in rows[path_name]:
            by_k.setdefault(e["k"], []).append(
                f"{label} {e['seconds']:.2f} s, {e['tracemallocPeakMB']:.0f} MB, "
                f"{e['rssDeltaMB']:.0f} MB"
            )
    for k_count, parts in by_k.items():
        res.row(
            f"K={k_count}: seconds, traced peak, RSS Δ",
            " · ".join(parts),
            value=rows["s3"][ks.index(k_count)]["seconds"] if rows["s3"] else None,
        )
    if rows["s3"]:
        per_update = [e["checkSeconds"] / e["k"] for e in rows["s3"]]
        res.row(
            "S3: the checks of an update's arrays (shapes, dtypes, NaN/Inf, distance)",
            f"{1000 * min(per_update):.1f}–{1000 * max(per_update):.1f} ms per update",
            value=max(per_update),
        )
    for path_name, label in (
        ("disk", "disk, strategy.aggregate"),
        ("s3", "S3, Coordinator.aggregate"),
    ):
        entries = rows[path_name]
        if not entries:
            continue
        worst = max(e["maxError"] for e in entries)
        if worst > 1e-5:
            res.row(
                f"{label}: result",
                f"max error {worst:.2g} vs the exact mean",
                "≤ 1e-5",
                False,
                worst,
            )
        lo = next((e for e in entries if e["k"] == GROWTH_FROM_K), entries[0])
        hi = entries[-1]
        growth = hi["tracemallocPeakMB"] / lo["tracemallocPeakMB"]
        res.row(
            f"{label}: traced peak K={hi['k']} ÷ K={lo['k']}",
            f"{growth:.2f} ({hi['tracemallocPeakMB']:.0f} MB vs {lo['tracemallocPeakMB']:.0f} MB)",
            f"≤ {GROWTH_TARGET:.2f} (flat)",
            growth <= GROWTH_TARGET,
            growth,
        )
    return res


def _s3(work: Path, base: list[np.ndarray], ks: tuple[int, ...]) -> list[dict]:
    from alliance import untrusted, weights
    from alliance.coordinator import Coordinator
    from alliance.engine import Aggregate, RunSpec, RunStatus
    from alliance.s3server import S3Server
    from alliance.store import Store, round_prefix

    out = []
    with S3Server(Path(tempfile.mkdtemp(prefix="s3-", dir=work))) as server:
        store = Store(server.config)
        store.ensure_bucket()
        base_id = store.put_model(base)
        names = [f"m{k:03d}" for k in range(max(ks))]

        def put(k: int) -> None:
            arrays, n = update_weights(base, k)
            store.put_update(
                RUN,
                1,
                names[k],
                weights.dumps(arrays),
                {"numExamples": n, "loss": 0.1, "seconds": 0.0},
            )

        started = time.perf_counter()
        store.map(put, range(max(ks)))
        say(
            f"9c: {max(ks)} updates uploaded to the S3 gateway in "
            f"{time.perf_counter() - started:.1f} s"
        )
        # The members declare their rows (an update's numExamples may not exceed them).
        beat = {"state": "ready", "trainRows": 100 * max(ks), "testRows": 0}
        store.map(lambda name: store.put_heartbeat(name, beat), names)
        coordinator = Coordinator(store, RUN, RunSpec(min_members=1))
        coordinator.observe(RunStatus())

        def aggregate(k_count: int):
            # A round's aggregation is written once; forget it so this one really runs.
            store.delete([round_prefix(RUN, 1) + "aggregate.json"])
            result = coordinator.aggregate(Aggregate(1, tuple(names[:k_count]), base_id, None))
            if len(result.accepted) != k_count or result.model_id is None:
                raise RuntimeError(f"aggregation of {k_count} updates: {result}")
            return result

        # The checks of each update's arrays (untrusted.update_arrays: shapes, dtypes, NaN/Inf,
        # distance from the model), timed apart: what the defence against members costs.
        checks: list[float] = []
        original = untrusted.update_arrays

        def timed_checks(*args):
            started = time.perf_counter()
            try:
                return original(*args)
            finally:
                checks.append(time.perf_counter() - started)

        untrusted.update_arrays = timed_checks
        try:
            for k_count in ks:
                checks.clear()
                m = measure(lambda k_count=k_count: aggregate(k_count))
                m["checkSeconds"] = sum(checks[:k_count])  # the timed run's, not tracemalloc's
                # The new model is read back outside the measurement.
                m["maxError"] = check(store.get_model(m.pop("result").model_id), base, k_count)
                out.append({"k": k_count, **m})
                say(
                    f"9c: s3   K={k_count:>2}: {m['seconds']:.2f} s (checks "
                    f"{m['checkSeconds']:.3f} s), tracemalloc peak "
                    f"{m['tracemallocPeakMB']:.0f} MB, rss Δ {m['rssDeltaMB']:.0f} MB"
                )
        finally:
            untrusted.update_arrays = original
    return out
