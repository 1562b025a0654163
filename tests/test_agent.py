"""The member agent with the member's own commands (no TensorFlow), against a real store."""

import os
import sys
import threading
import time

import numpy as np
import pytest

from alliance import contract, weights
from alliance.coordinator import Coordinator
from alliance.data.schema import DataSchema
from alliance.engine import Phase, RunSpec, RunStatus
from alliance.member import Agent, AgentConfig, cpu_threads

from .conftest import write_rows

# A member's own training program under the documented contract: adds 1 to every weight.
TRAIN = """
import json, sys, numpy as np
model_in, data_dir, model_out, metrics_out, epochs = sys.argv[1:6]
with np.load(model_in) as npz:
    arrays = [npz[f"arr_{i}"] + 1 for i in range(len(npz.files))]
np.savez(model_out, *arrays)
rows = sum(1 for _ in open(data_dir + "/train.csv")) - 1
json.dump({"numExamples": rows, "loss": 0.5, "epochsSeen": int(epochs)}, open(metrics_out, "w"))
"""
VALIDATE = """
import json, sys, numpy as np
model_in, metrics_out = sys.argv[1:3]
with np.load(model_in) as npz:
    mean = float(np.mean(npz["arr_0"]))
json.dump({"numExamples": 4, "accuracy": min(1.0, mean / 10)}, open(metrics_out, "w"))
"""
FAIL = "import sys; print('CUDA out of memory', file=sys.stderr); sys.exit(3)"


@pytest.fixture
def alliance(store):
    seed = store.put_model([np.zeros((2, 2), np.float32), np.zeros(2, np.float32)])
    store.put_alliance({"model": {"kind": "builtin", "name": "cnn"}, "seedModelId": seed})
    return store, seed


def start_agent(store, tmp_path, name, rows=8, train=TRAIN, validate=VALIDATE, **config):
    """A real agent in a thread, training with tiny command scripts; ``config``: more
    AgentConfig fields (e.g. metrics_port)."""
    data = tmp_path / name
    write_rows(data / "train.csv", rows)
    write_rows(data / "test.csv", 4)
    scripts = []
    for kind, code in (("train", train), ("validate", validate)):
        path = tmp_path / f"{name}-{kind}.py"
        path.write_text(code)
        scripts.append(path)
    agent_config = AgentConfig(
        name=name,
        data_dir=data,
        schema=DataSchema(),
        cache_dir=tmp_path / "cache",
        train_command=f"{sys.executable} {scripts[0]} {{model_in}} {{data_dir}} {{model_out}} "
        "{metrics_out} {epochs}",
        validate_command=f"{sys.executable} {scripts[1]} {{model_in}} {{metrics_out}}",
        **{"poll_seconds": 0.05, **config},
    )
    agent = Agent(store, agent_config)
    thread = threading.Thread(target=agent.run, daemon=True)
    thread.start()
    return agent, thread


def wait_ready(store, names, timeout=20.0):
    deadline = time.monotonic() + timeout
    while any((store.get_json(f"members/{n}.json") or {}).get("state") != "ready" for n in names):
        assert time.monotonic() < deadline, "members did not become ready"
        time.sleep(0.05)


def drive(store, spec, timeout=60.0):
    coord = Coordinator(store, "run", spec)
    status = RunStatus()
    deadline = time.monotonic() + timeout
    while status.phase not in (Phase.COMPLETED, Phase.FAILED):
        assert time.monotonic() < deadline, status.message
        status = coord.reconcile(status)
        time.sleep(0.05)
    return status


def test_members_own_commands_train_and_validate(alliance, tmp_path):
    store, _ = alliance
    agents = [start_agent(store, tmp_path, n, rows=r) for n, r in (("a", 8), ("b", 24))]
    try:
        status = drive(store, RunSpec(rounds=2, min_members=2, local_epochs=3))
    finally:
        for agent, thread in agents:
            agent.stop()
            thread.join(10)
    assert status.phase == Phase.COMPLETED, status.message
    # Two rounds of "+1" from zeros: every weight is 2.
    np.testing.assert_array_equal(store.get_model(status.model_id)[0], np.full((2, 2), 2.0))
    first, second = status.history
    assert first.num_examples == 32 and first.members == ["a", "b"]
    assert first.accuracy == pytest.approx(0.1) and second.accuracy == pytest.approx(0.2)
    _, meta = store.get_update("run", 1, "b")
    assert meta["numExamples"] == 24 and meta["epochsSeen"] == 3
    assert store.get_json("members/a.json")["state"] == "stopped"


def test_a_validator_holds_only_a_test_set_and_never_trains(alliance, tmp_path):
    store, _ = alliance
    trainer = start_agent(store, tmp_path, "a")
    data = tmp_path / "v"
    write_rows(data / "test.csv", 4)
    script = tmp_path / "validate.py"
    script.write_text(VALIDATE)
    validator = Agent(
        store,
        AgentConfig(
            name="v",
            data_dir=data,
            schema=DataSchema(),
            cache_dir=tmp_path / "cache",
            poll_seconds=0.05,
            validator=True,
            validate_command=f"{sys.executable} {script} {{model_in}} {{metrics_out}}",
        ),
    )
    thread = threading.Thread(target=validator.run, daemon=True)
    thread.start()
    try:
        wait_ready(store, ["a", "v"])
        assert store.get_json("members/v.json")["trainRows"] == 0
        status = drive(store, RunSpec(rounds=1, min_members=1))
    finally:
        for agent, t in (trainer, (validator, thread)):
            agent.stop()
            t.join(10)
    assert status.phase == Phase.COMPLETED, status.message
    record = status.history[0]
    assert record.members == ["a"] and record.validators == 2
    assert store.list_round("run", 1)["validations"] == {"a", "v"}


def test_a_failing_command_is_reported_with_its_stderr(alliance, tmp_path):
    store, _ = alliance
    good = start_agent(store, tmp_path, "a")
    bad = start_agent(store, tmp_path, "b", train=FAIL)
    try:
        wait_ready(store, ["a", "b"])
        status = drive(store, RunSpec(rounds=1, min_members=1, validation="none"))
    finally:
        for agent, thread in (good, bad):
            agent.stop()
            thread.join(10)
    assert status.phase == Phase.COMPLETED
    reason = status.history[0].failed["b"]
    assert "exited with 3" in reason and "CUDA out of memory" in reason


def test_invalid_data_is_published_with_the_exact_error(store, tmp_path):
    data = tmp_path / "m"
    write_rows(data / "train.csv", 3)
    lines = (data / "train.csv").read_text().splitlines()
    cells = lines[2].split(",")
    cells[5] = "300"
    lines[2] = ",".join(cells)
    (data / "train.csv").write_text("\n".join(lines) + "\n")
    config = AgentConfig(name="m", data_dir=data, cache_dir=tmp_path / "c", schema=DataSchema())
    agent = Agent(store, config)
    thread = threading.Thread(target=agent.run, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 10
        while (beat := store.get_json("members/m.json") or {}).get("state") != "invalid":
            assert time.monotonic() < deadline, beat
            time.sleep(0.05)
    finally:
        agent.stop()
        thread.join(10)
    error = beat["error"]
    assert (error["rule"], error["line"]) == ("pixel-range", 3)
    assert error["column"] in ("1x5", "1x5 (col 6)") or "1x5" in str(error["column"])
    assert "300" in beat["message"]


def test_a_restarted_member_does_not_redo_a_stored_update(alliance, tmp_path):
    store, seed = alliance
    store.put_task(
        "run",
        {
            "run": "run",
            "round": 1,
            "kind": "train",
            "members": ["a"],
            "modelId": seed,
            "deadline": time.time() + 60,
            "epochs": 1,
            "batchSize": 32,
        },
    )
    store.put_update(
        "run", 1, "a", weights.dumps([np.ones((2, 2), np.float32)]), {"numExamples": 1}
    )
    agent, thread = start_agent(store, tmp_path, "a")
    time.sleep(1.5)
    agent.stop()
    thread.join(10)
    assert agent.tasks_done == 0
    _, meta = store.get_update("run", 1, "a")
    assert meta == {"numExamples": 1, "sha256": meta["sha256"]}


def test_cpu_threads_follow_the_environment_then_the_pods_cpu_limit(monkeypatch, tmp_path):
    cpu_max = tmp_path / "cpu.max"
    cpu_max.write_text("250000 100000\n")  # a pod with limits.cpu: 2.5
    monkeypatch.setenv(contract.ENV_CPU_THREADS, "3")
    assert cpu_threads(cpu_max) == 3
    monkeypatch.delenv(contract.ENV_CPU_THREADS)
    assert cpu_threads(cpu_max) == 2
    cpu_max.write_text("50000 100000\n")  # half a core: still one thread
    assert cpu_threads(cpu_max) == 1
    cpu_max.write_text("max 100000\n")  # no limit: every core this process may use
    assert cpu_threads(cpu_max) == len(os.sched_getaffinity(0))


def test_without_a_schema_the_agent_uses_the_one_the_alliance_was_made_with(store, tmp_path):
    """No --schema: the agent waits for alliance.json and checks its data with the schema
    recorded there (here 2×2 images, values 0–255), not with mnist-in-csv."""
    from alliance.data.schema import DataSchema

    tiny = DataSchema(feature_shape=(2, 2, 1))
    data = tmp_path / "m"
    data.mkdir()
    (data / "train.csv").write_text("label,1x1,1x2,2x1,2x2\n3,0,255,51,102\n1,1,2,3,4\n")
    agent = Agent(store, AgentConfig(name="m", data_dir=data, train_command="true"))
    thread = threading.Thread(target=agent.run, daemon=True)
    thread.start()
    try:
        time.sleep(0.5)
        assert (store.get_json("members/m.json") or {}).get("state") == "starting"  # waits
        store.put_alliance(
            {"model": {"kind": "builtin", "name": "cnn"}, "dataSchema": tiny.to_dict()}
        )
        deadline = time.monotonic() + 10
        while (beat := store.get_json("members/m.json") or {}).get("state") != "ready":
            assert time.monotonic() < deadline, beat
            time.sleep(0.05)
    finally:
        agent.stop()
        thread.join(10)
    assert beat["trainRows"] == 2 and beat["schema"]["featureShape"] == [2, 2, 1]


def test_polling_slows_down_once_the_next_stage_is_not_near(tmp_path):
    """Fast right after a task (the next stage usually follows within seconds), slower while
    a run still counts on the member, slowest when none does: a poll costs CPU."""
    agent = Agent(None, AgentConfig(name="m", data_dir=tmp_path))
    cfg = agent.config
    assert agent._poll_interval(0.0) == cfg.poll_seconds == 0.1
    assert agent._poll_interval(cfg.fast_seconds + 1) == cfg.idle_poll_seconds
    agent._tasks["tasks/r.json"] = ("etag", {"members": ["m"]})
    assert agent._poll_interval(cfg.fast_seconds + 1) == cfg.waiting_poll_seconds


def test_only_a_change_of_its_own_tasks_makes_an_agent_poll_fast(store, tmp_path):
    """Another run's task coming and going is no reason for this member to poll at 10 Hz."""
    agent = Agent(store, AgentConfig(name="m", data_dir=tmp_path))
    late = {"round": 1, "kind": "train", "modelId": "x", "deadline": time.time() - 1}
    store.put_task("others", {**late, "run": "others", "members": ["a", "b"]})
    assert not agent.poll_near()
    store.put_task("others", {**late, "run": "others", "round": 2, "members": ["a"]})
    assert not agent.poll_near()
    store.put_task("mine", {**late, "run": "mine", "members": ["a", "m"]})
    assert agent.poll_near()  # past its deadline, so not done, but the run counts on it
    assert not agent.poll_near()
    store.delete_task("mine")
    assert agent.poll_near()


def test_an_agent_waits_for_tasks_on_notifications_not_polls(alliance, tmp_path):
    """With the notice bucket the agent needs no polls: polling every 30 s, it still trains
    and validates a round within seconds, and stops at once."""
    store, _ = alliance
    slow = {"poll_seconds": 30.0, "waiting_poll_seconds": 30.0, "idle_poll_seconds": 30.0}
    agent, thread = start_agent(store, tmp_path, "a", **slow, recheck_seconds=30.0)
    try:
        wait_ready(store, ["a"])
        time.sleep(0.5)  # past its first look at the (empty) task list
        started = time.monotonic()
        status = drive(store, RunSpec(rounds=1, min_members=1), timeout=15)
        assert status.phase == Phase.COMPLETED, status.message
        assert time.monotonic() - started < 10
    finally:
        agent.stop()
        stopping = time.monotonic()
        thread.join(10)
    assert time.monotonic() - stopping < 2
