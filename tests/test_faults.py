"""Fault tests: real member, coordinator and S3 gateway processes, real TensorFlow, real faults.

Each test builds its own alliance (``faultkit.Alliance``): its own S3 server, members started as
``python -m alliance member`` and the coordinator as ``python -m alliance coordinate``. Progress is
watched through ``runs/<run>/status.json`` in the store, every wait has a timeout, and every test
ends by checking that no child process is left behind.
"""

from __future__ import annotations

import shlex
import signal
import sys
import time
import urllib.request

import numpy as np
import psutil
import pytest

from alliance import weights
from alliance.data.schema import DataSchema
from alliance.engine import Phase, Stage
from alliance.store import Store

from .conftest import SAMPLE_DIR, write_rows
from .faultkit import Alliance, TaskWatcher, assert_models_close, fedavg64

pytestmark = [pytest.mark.slow, pytest.mark.timeout(400)]

RUN = "faults"
TWO = ["member-1", "member-2"]
THREE = ["member-1", "member-2", "member-3"]


@pytest.fixture(scope="module")
def seed(tmp_path_factory):
    """``alliance init`` run once for the module (importing TensorFlow and building the CNN costs
    ~10 s); each test's store gets what it wrote: alliance.json and the seed model."""
    with Alliance(tmp_path_factory.mktemp("init")) as a:
        init = a.init()
        assert a.finish(init, 240) == 0, a.diagnostics()
        manifest = a.store.get_alliance()
        assert manifest["model"] == {"kind": "builtin", "name": "cnn"}
        out = (a.logs / "init.out").read_text()
        assert out == f"alliance initialised: seed model {manifest['seedModelId']}\n"
        data = a.store.get_model_bytes(manifest["seedModelId"])
    return manifest, data


def training(round_: int):
    return lambda s: s.round == round_ and s.stage == Stage.TRAINING


def start(a: Alliance, seed, dirs, train_commands: dict[str, str] | None = None) -> None:
    """Adopt the seed, start a member per dir and wait until every one is ready."""
    a.adopt(*seed)
    for d in dirs:
        a.start_member(d.name, d, (train_commands or {}).get(d.name))
    a.wait_states(dict.fromkeys((d.name for d in dirs), "ready"), timeout=90)


# --- 1. a member killed mid-round --------------------------------------------------------


def test_a_member_killed_mid_round_is_dropped_and_the_run_completes(tmp_path, member_dirs, seed):
    # member-3 has no test.csv, so once dead it is not also waited for as a validator: the
    # rounds' timing below is the training deadline's alone.
    (member_dirs[2] / "test.csv").unlink()
    deadline = 15
    spec = {
        "rounds": 3,
        "minMembers": 2,
        "localEpochs": 1,
        "batchSize": 32,
        "roundDeadlineSeconds": deadline,
        "validationDeadlineSeconds": 60,
    }
    with Alliance(tmp_path / "work") as a:
        start(a, seed, member_dirs)
        # A first run makes every member import TensorFlow and trace its model, which takes
        # longer than the round deadline on a busy 2-core machine; the run under test then sees
        # only the training time in its rounds.
        warmup = a.coordinate(
            "warmup",
            {"rounds": 1, "minMembers": 3, "validation": "none", "roundDeadlineSeconds": 300},
            log="warmup",
        )
        assert a.finish(warmup, 300) == 0, a.diagnostics()

        with TaskWatcher(Store(a.server.config, retry_seconds=10), RUN) as tasks:
            # --heartbeat-timeout 60: a dead member's heartbeat stays fresh for 60 s, so the
            # coordinator has only the round deadline to go by.
            coord = a.coordinate(RUN, spec, "--heartbeat-timeout", "60")
            a.wait_status(RUN, "round 2 training", training(2), 120, alive=(coord,))
            victim = a.members["member-3"].process
            cpu = psutil.Process(victim.pid)
            busy = sum(cpu.cpu_times()[:2])
            # Mid-round for real: member-3 has picked the task up and is computing.
            a.wait_for(
                "member-3 to be training round 2",
                lambda: sum(cpu.cpu_times()[:2]) - busy >= 0.3,
                60,
                poll=0.05,
            )
            assert not a.store.update_exists(RUN, 2, "member-3")
            a.kill(victim)
            assert victim.returncode == -signal.SIGKILL
            assert a.finish(coord, 180) == 0, a.diagnostics()
        status = a.status(RUN)
        models = {r.round: a.store.get_model(r.model_id) for r in status.history}
        round3_task = tasks.seen("train", 3)
        updates = {r: a.store.list_round(RUN, r)["updates"] for r in (1, 2, 3)}

    assert status.phase == Phase.COMPLETED, status.message
    assert [r.round for r in status.history] == [1, 2, 3]
    first, *later = status.history
    assert (first.members, first.dropped) == (THREE, [])
    for record in later:
        assert record.members == TWO
        assert record.dropped == ["member-3"]
        assert (record.failed, record.rejected) == ({}, {})
        # The round waited for member-3 until the deadline, and moved on at the deadline.
        assert deadline <= record.aggregated_at - record.started_at < deadline + 10
        assert record.accuracy is not None and record.validators == 2
    # A dead member whose heartbeat is still fresh is asked again, and dropped again.
    assert round3_task and round3_task[0]["members"] == THREE
    assert updates == {1: set(THREE), 2: set(TWO), 3: set(TWO)}
    for record in status.history:
        assert record.model_id and all(np.isfinite(w).all() for w in models[record.round])
    assert len({r.model_id for r in status.history}) == 3
    assert status.model_id == status.history[-1].model_id


# --- 2. the coordinator killed mid-round ----------------------------------------------------


def test_a_coordinator_killed_mid_round_resumes_without_losing_or_repeating_work(
    tmp_path, member_dirs, seed
):
    dirs = member_dirs[:2]
    spec = {
        "rounds": 3,
        "minMembers": 2,
        "localEpochs": 1,
        "batchSize": 32,
        "roundDeadlineSeconds": 300,
        "validationDeadlineSeconds": 120,
    }
    manifest, _ = seed
    with Alliance(tmp_path / "work") as a:
        start(a, seed, dirs)
        with TaskWatcher(Store(a.server.config, retry_seconds=10), RUN) as tasks:
            first = a.coordinate(RUN, spec, log="coordinator-1")
            a.wait_status(RUN, "round 2 training", training(2), 180, alive=(first,))
            a.kill(first)
            assert first.returncode == -signal.SIGKILL
            frozen = a.status(RUN)
            assert (frozen.round, frozen.stage) == (2, Stage.TRAINING)
            # Without a coordinator the members finish round 2; nothing else moves.
            a.wait_for(
                "round 2's updates", lambda: a.store.list_round(RUN, 2)["updates"] == set(TWO), 120
            )
            assert a.status(RUN).to_dict() == frozen.to_dict()
            assert a.store.get_aggregate(RUN, 2) is None

            second = a.coordinate(RUN, spec, log="coordinator-2")
            assert a.finish(second, 180) == 0, a.diagnostics()
        status = a.status(RUN)
        aggregates = {r: a.store.get_aggregate(RUN, r) for r in (1, 2, 3)}
        stored = {r.round: a.store.get_model(r.model_id) for r in status.history}
        recomputed = {
            r.round: fedavg64(a.store, RUN, r.round, aggregates[r.round]["accepted"])
            for r in status.history
        }
        updates = {r: a.store.list_round(RUN, r)["updates"] for r in (1, 2, 3)}
        out = (a.logs / "coordinator-2.out").read_text()

    assert status.phase == Phase.COMPLETED, status.message
    assert f"run {RUN}: Completed — completed 3 rounds" in out
    assert [r.round for r in status.history] == [1, 2, 3]
    # Round 2 is the one that was interrupted, continued, not started again.
    assert status.history[1].started_at == frozen.history[1].started_at
    assert status.history[0] == frozen.history[0]
    for record in status.history:
        agg = aggregates[record.round]
        assert agg["accepted"] == TWO == record.members
        assert agg["rejected"] == {} and record.dropped == []
        assert agg["modelId"] == record.model_id and agg["numExamples"] == 1200
        assert updates[record.round] == set(TWO)
        # No update applied twice (nor left out): the stored model is the FedAvg of the round's
        # updates, each counted once.
        assert_models_close(stored[record.round], recomputed[record.round])
    # Each round trained on the previous round's model (round 1 on the seed), and each round's
    # training task was issued once, on one model: the tasks went 1, 2, 3 and never back.
    bases = [manifest["seedModelId"], *(r.model_id for r in status.history)]
    for r in (1, 2, 3):
        assert {t["modelId"] for t in tasks.seen("train", r)} == {bases[r - 1]}
        # A validation stage can be shorter than the watcher's poll; the ones seen are checked.
        assert {t["modelId"] for t in tasks.seen("validate", r)} <= {bases[r]}
    assert any(t["kind"] == "validate" for t in tasks.tasks)
    rounds_seen = [t["round"] for t in tasks.tasks]
    assert rounds_seen == sorted(rounds_seen) and set(rounds_seen) == {1, 2, 3}


# --- 3. the S3 server down for 20 s -----------------------------------------------------------


def test_the_store_down_for_20_seconds_delays_the_run_and_it_completes(tmp_path, member_dirs, seed):
    dirs = member_dirs[:2]
    outage = 20
    spec = {
        "rounds": 3,
        "minMembers": 2,
        "roundDeadlineSeconds": 300,
        "validationDeadlineSeconds": 120,
    }
    with Alliance(tmp_path / "work") as a:
        start(a, seed, dirs)
        coord = a.coordinate(RUN, spec)
        a.wait_status(RUN, "round 2 training", training(2), 180, alive=(coord,))
        endpoint = a.server.endpoint
        a.server.stop()
        with pytest.raises(OSError):
            urllib.request.urlopen(endpoint + "/minio/health/live", timeout=2)
        time.sleep(outage)
        # Nobody gave up while the store was down.
        assert coord.poll() is None and all(m.alive for m in a.members.values())
        a.restart_server()
        assert a.server.endpoint == endpoint
        assert a.finish(coord, 240) == 0, a.diagnostics()
        status = a.status(RUN)

    assert status.phase == Phase.COMPLETED, status.message
    assert [r.round for r in status.history] == [1, 2, 3]
    for record in status.history:
        assert (record.members, record.dropped, record.failed) == (TWO, [], {})
        assert record.model_id and record.accuracy is not None
    # Round 2 was in progress when the store went away and could only end after it came back.
    round2 = status.history[1]
    assert round2.finished_at - round2.started_at >= outage
    coordinator_log = (a.logs / "coordinator.err").read_text()
    assert "retrying in" in coordinator_log and "Traceback" not in coordinator_log
    for name in TWO:
        assert "retrying in" in (a.logs / f"{name}.log").read_text(), name


# --- 4. bad CSV files, through the member process and check-data --------------------------------


def _replace_cell(path, line: int, column: int, value: str) -> None:
    """Set the cell at 1-based physical ``line`` and 1-based ``column`` of a CSV file."""
    lines = path.read_text().splitlines()
    cells = lines[line - 1].split(",")
    cells[column - 1] = value
    lines[line - 1] = ",".join(cells)
    path.write_text("\n".join(lines) + "\n")


def test_bad_csv_files_give_their_exact_error_and_a_fixed_file_makes_the_member_ready(
    tmp_path, seed
):
    base = tmp_path / "bad"
    dirs = {f"member-{i}": base / f"member-{i}" for i in range(1, 5)}
    good = {}
    for d in dirs.values():
        write_rows(d / "train.csv", 600)
        write_rows(d / "test.csv", 200, SAMPLE_DIR / "test.csv.gz")
    # member-1: a non-numeric cell in train.csv (line 3, pixel 1x5 = column 6)
    good["member-1"] = ("train.csv", (dirs["member-1"] / "train.csv").read_text())
    _replace_cell(dirs["member-1"] / "train.csv", 3, 6, "abc")
    # member-2: a pixel out of range in test.csv (line 5, pixel 14x14 = column 1 + 13*28 + 14)
    good["member-2"] = ("test.csv", (dirs["member-2"] / "test.csv").read_text())
    _replace_cell(dirs["member-2"] / "test.csv", 5, 379, "256")
    # member-3: train.csv written with ';'
    good["member-3"] = ("train.csv", (dirs["member-3"] / "train.csv").read_text())
    (dirs["member-3"] / "train.csv").write_text(good["member-3"][1].replace(",", ";"))
    # member-4: no train.csv at all
    good["member-4"] = ("train.csv", (dirs["member-4"] / "train.csv").read_text())
    (dirs["member-4"] / "train.csv").unlink()

    d1, d2, d3, d4 = (str(d) for d in dirs.values())
    expected = {
        "member-1": {
            "rule": "non-numeric",
            "file": f"{d1}/train.csv",
            "line": 3,
            "column": "1x5",
            "columnIndex": 6,
            "message": "value 'abc' is not a number",
        },
        "member-2": {
            "rule": "pixel-range",
            "file": f"{d2}/test.csv",
            "line": 5,
            "column": "14x14",
            "columnIndex": 379,
            "message": "value 256 is outside 0–255",
        },
        "member-3": {
            "rule": "wrong-delimiter",
            "file": f"{d3}/train.csv",
            "line": 1,
            "column": None,
            "columnIndex": None,
            "message": "the header is a single column but contains ';': the file seems to be "
            "separated by ';', but the schema expects ','. Rewrite the file with ',' "
            "or set the schema's delimiter",
        },
        "member-4": {
            "rule": "missing-file",
            "file": f"{d4}/train.csv",
            "line": None,
            "column": None,
            "columnIndex": None,
            "message": f"no train.csv or train.csv.gz in {d4} (the training data is required)",
        },
    }
    text = {
        "member-1": f"{d1}/train.csv, line 3, column '1x5' (col 6): non-numeric: "
        "value 'abc' is not a number",
        "member-2": f"{d2}/test.csv, line 5, column '14x14' (col 379): pixel-range: "
        "value 256 is outside 0–255",
        "member-3": f"{d3}/train.csv, line 1: wrong-delimiter: " + expected["member-3"]["message"],
        "member-4": f"{d4}/train.csv: missing-file: " + expected["member-4"]["message"],
    }
    with Alliance(tmp_path / "work") as a:
        a.adopt(*seed)  # a member loads the alliance's model before it says it is ready
        for name, d in dirs.items():
            a.start_member(name, d)
        checks = {
            name: a.alliance("check-data", str(d), log=f"check-{name}") for name, d in dirs.items()
        }
        beats = a.wait_states(dict.fromkeys(dirs, "invalid"), timeout=90)
        for name, beat in beats.items():
            want = {"state": "invalid", "error": expected[name], "message": text[name]}
            assert beat == want, name
        for name, check in checks.items():
            assert a.finish(check, 90) == 1, name
            assert (a.logs / f"check-{name}.err").read_text() == f"error: {text[name]}\n"
            assert (a.logs / f"check-{name}.out").read_text() == ""

        # Fixed files: each member re-checks (every 5 s) and becomes ready, no restart needed.
        for name, (file, content) in good.items():
            (dirs[name] / file).write_text(content)
        beats = a.wait_states(dict.fromkeys(dirs, "ready"), timeout=120)
        for name, beat in beats.items():
            assert beat == {
                "state": "ready",
                "trainRows": 600,
                "testRows": 200,
                "schema": DataSchema().to_dict(),
            }, name
        assert all(m.alive for m in a.members.values())
        # A member stops cleanly on SIGTERM and says so in its heartbeat.
        for member in a.members.values():
            member.process.send_signal(signal.SIGTERM)
        for member in a.members.values():
            assert a.finish(member.process, 30) == 0, member.name
        assert {n: a.heartbeat(n)["state"] for n in dirs} == dict.fromkeys(dirs, "stopped")


# --- 5. a poisoned update -------------------------------------------------------------------

POISON = """\
import json
import sys

import numpy as np

model_in, model_out, metrics_out = sys.argv[1:4]
with np.load(model_in) as npz:
    arrays = [npz[f"arr_{i}"] for i in range(len(npz.files))]
np.savez(model_out, *[np.full(a.shape, np.nan, a.dtype) for a in arrays])
with open(metrics_out, "w") as f:
    json.dump({"numExamples": 600}, f)
"""


def test_a_poisoned_update_is_rejected_and_the_rounds_complete(tmp_path, member_dirs, seed):
    script = tmp_path / "poison.py"
    script.write_text(POISON)
    command = (
        f"{shlex.quote(sys.executable)} {shlex.quote(str(script))} "
        "{model_in} {model_out} {metrics_out}"
    )
    (member_dirs[2] / "test.csv").unlink()  # the poisoner trains (badly) and does not validate
    spec = {
        "rounds": 2,
        "minMembers": 2,
        "roundDeadlineSeconds": 300,
        "validationDeadlineSeconds": 120,
    }
    seed_arrays = weights.loads(seed[1])
    with Alliance(tmp_path / "work") as a:
        start(a, seed, member_dirs, train_commands={"member-3": command})
        coord = a.coordinate(RUN, spec)
        assert a.finish(coord, 240) == 0, a.diagnostics()
        status = a.status(RUN)
        aggregates = {r: a.store.get_aggregate(RUN, r) for r in (1, 2)}
        stored = {r.round: a.store.get_model(r.model_id) for r in status.history}
        honest = {r.round: fedavg64(a.store, RUN, r.round, TWO) for r in status.history}
        poisoned = {r: a.store.get_update(RUN, r, "member-3") for r in (1, 2)}

    assert status.phase == Phase.COMPLETED, status.message
    assert [r.round for r in status.history] == [1, 2]
    reason = f"update rejected: array 0 has {seed_arrays[0].size} non-finite values (NaN or Inf)"
    for record in status.history:
        # member-3 really sent its update: every weight NaN, claiming 600 examples.
        data, meta = poisoned[record.round]
        arrays = weights.loads(data)
        assert [w.shape for w in arrays] == [w.shape for w in seed_arrays]
        assert all(np.isnan(w).all() for w in arrays) and meta["numExamples"] == 600
        assert record.rejected == {"member-3": reason} == aggregates[record.round]["rejected"]
        assert record.members == TWO == aggregates[record.round]["accepted"]
        assert (record.dropped, record.failed) == ([], {})
        assert record.num_examples == 1200
        # Its weights did not enter the model: finite, and exactly the honest members' FedAvg.
        model = stored[record.round]
        assert all(np.isfinite(w).all() for w in model)
        assert_models_close(model, honest[record.round])
        # ...and the model works: a NaN model scores ~0.1 (it always says 0).
        assert record.validators == 2 and 0.3 < record.accuracy <= 1.0
