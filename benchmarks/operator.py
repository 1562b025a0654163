"""9e: the orchestration overhead per round when the Kubernetes operator drives the rounds.

The same measure as 9b (round wall time - slowest member's fit - slowest validator's evaluate),
but with the operator as its own process against the test API server (tests/kube/apiserver.py),
member pods run as local processes by the kubelet stand-in, a real S3 gateway and real
TensorFlow: what the operator's TrainingRun daemon, its API reads and its status writes add to
a round. Three members with 2,000 rows of the shipped sample each; 4 rounds of 1 local epoch;
the operator's run interval (how often the daemon looks at the store) at its default, the
embedded runner's pace (alliance.driver.POLL_SECONDS). Set BENCH_9E_INTERVALS (seconds,
comma-separated) to compare others.
"""

from __future__ import annotations

import os
import statistics
import time
from pathlib import Path

from alliance_operator.config import OperatorConfig

from alliance.s3server import S3Server
from benchmarks.common import Result, say

MEMBERS = ("bench-a", "bench-b", "bench-c")
ROWS, TEST_ROWS = 2000, 500
ROUNDS = 4
INTERVALS = tuple(
    float(v) for v in os.environ.get("BENCH_9E_INTERVALS", "").split(",") if v.strip()
) or (OperatorConfig().run_interval,)


def run(work: Path) -> Result:
    result = Result("9e", "orchestration overhead per round, operator on the test API server")
    server = S3Server(work / "s3")
    server.start()
    try:
        for interval in INTERVALS:
            _one_run(work, server, interval, result)
    finally:
        server.stop()
    return result


def _one_run(work: Path, server: S3Server, interval: float, result: Result) -> None:
    from tests import e2e_cluster
    from tests.conftest import SAMPLE_DIR, write_rows

    # The operator reads its settings at start: one operator process per interval.
    e2e_cluster.OPERATOR_ENV["ALLIANCE_OPERATOR_RUN_INTERVAL"] = str(interval)
    cluster = e2e_cluster.EmulatedCluster(_mkdir(work / f"cluster-{interval}"), server.config)
    try:
        ns = cluster.create_namespace()
        cluster.create_store_secret(ns, "store", alliances="bench")
        for i, name in enumerate(MEMBERS):
            d = work / f"data-{interval}" / name
            train = write_rows(d / "train.csv", ROWS, skip=ROWS * i)
            test = write_rows(
                d / "test.csv", TEST_ROWS, SAMPLE_DIR / "test.csv.gz", skip=TEST_ROWS * i
            )
            cluster.provide_data(
                ns, f"{name}-data", {"train.csv": train, "test.csv": test}, member=name
            )
        cluster.start_operator(ns)
        cluster.apply(ns, *_manifests(cluster, ns))

        def diagnose() -> str:
            return cluster.diagnose(ns)

        for name in MEMBERS:
            e2e_cluster.wait_for(
                lambda name=name: _ready(cluster.get(ns, "member", name)),
                300,
                f"member {name} Ready",
                interval=0.5,
                diagnose=diagnose,
            )
        say(f"9e: members ready; a run with the operator's run interval {interval} s")
        started = time.perf_counter()
        cluster.apply(ns, _run_manifest())

        def ended() -> dict | None:
            tr = cluster.get(ns, "trainingrun", "bench")
            phase = ((tr or {}).get("status") or {}).get("phase")
            return tr if phase in ("Completed", "Failed") else None

        tr = e2e_cluster.wait_for(ended, 600, "the run to end", interval=0.25, diagnose=diagnose)
        _report(result, interval, tr["status"], time.perf_counter() - started)
    finally:
        cluster.close()


def _report(result: Result, interval: float, status: dict, wall: float) -> None:
    if status["phase"] != "Completed":
        raise RuntimeError(f"the run ended {status['phase']}: {status.get('message')}")
    rounds = status["history"]
    overheads = [
        (r["finishedAt"] - r["startedAt"]) - r["trainSeconds"] - r["validationSeconds"]
        for r in rounds
    ]
    per_round = [round(r["finishedAt"] - r["startedAt"], 2) for r in rounds]
    # Where the overhead goes, as 9b shows it: the training stage beyond the slowest fit
    # (aggregation included), the aggregation itself, the validation stage beyond the slowest
    # evaluation.
    parts = [
        {
            "training": r["aggregatedAt"] - r["startedAt"] - r["trainSeconds"],
            "aggregation": r["aggregationSeconds"],
            "validation": r["finishedAt"] - r["aggregatedAt"] - r["validationSeconds"],
        }
        for r in rounds
    ]
    say(
        f"9e: interval {interval} s: rounds {per_round} s, overhead "
        f"{[round(o, 2) for o in overheads]} s, accuracy {status.get('accuracy')}"
    )
    result.details[f"interval{interval}"] = {
        "roundSeconds": per_round,
        "overheadSeconds": overheads,
        "overheadParts": parts,
        "runWallSeconds": wall,
        "accuracy": status.get("accuracy"),
    }
    # Round 1 is shown apart, as in 9a: it also carries the run's start.
    mean = statistics.mean(overheads[1:])
    result.row(
        f"overhead per round, run interval {interval:g} s",
        f"{mean:.2f} s (rounds 2-{len(rounds)}; each: {', '.join(f'{o:.2f}' for o in overheads)})",
        value=mean,
    )
    first = parts[0]
    result.row(
        f"overhead of round 1, run interval {interval:g} s",
        f"{overheads[0]:.2f} s = training stage {first['training']:.2f} (aggregation "
        f"{first['aggregation']:.2f}) + validation stage {first['validation']:.2f}",
    )


def _ready(member: dict | None) -> bool:
    for c in ((member or {}).get("status") or {}).get("conditions") or []:
        if c["type"] == "Ready":
            return c["status"] == "True"
    return False


def _manifests(cluster, ns: str) -> list[dict]:
    alliance = {
        "apiVersion": "alliance.dev/v1alpha1",
        "kind": "Alliance",
        "metadata": {"name": "bench"},
        "spec": {
            "store": {
                "endpoint": cluster.store_config.endpoint,
                "bucket": f"bench-{ns}",
                "credentialsSecret": {"name": "store"},
            }
        },
    }
    members = [
        {
            "apiVersion": "alliance.dev/v1alpha1",
            "kind": "Member",
            "metadata": {"name": name},
            "spec": {
                "alliance": "bench",
                "dataVolumeClaim": f"{name}-data",
                "resources": {"limits": {"cpu": "1", "memory": "2Gi"}},
            },
        }
        for name in MEMBERS
    ]
    return [alliance, *members]


def _run_manifest() -> dict:
    return {
        "apiVersion": "alliance.dev/v1alpha1",
        "kind": "TrainingRun",
        "metadata": {"name": "bench"},
        "spec": {"alliance": "bench", "rounds": ROUNDS, "minMembers": 3, "localEpochs": 1},
    }


def _mkdir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path
