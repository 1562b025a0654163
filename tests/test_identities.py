"""A store identity per member (alliance/identities.py), on the real S3 gateway: each member's
keys write its own objects and nothing of anyone else's."""

from __future__ import annotations

import numpy as np
import pytest

from alliance import identities, weights
from alliance.store import Store, StoreError


@pytest.fixture
def members(store):
    seed = store.put_model([np.zeros(3, np.float32)])
    store.put_alliance({"model": {"kind": "builtin", "name": "cnn"}, "seedModelId": seed})
    store.put_task("r", {"run": "r", "round": 1, "kind": "train", "members": ["member-a"]})
    store.put_run_spec("r", {"rounds": 1})
    configs = identities.provision(store.config, ["member-a", "member-b"])
    return {m: Store(c, retry_seconds=5) for m, c in configs.items()}, seed


def test_a_member_writes_its_own_objects_and_reads_what_it_needs(members, store):
    stores, seed = members
    a = stores["member-a"]
    assert a.config.access_key == "member-a" and a.config.secret_key != store.config.secret_key
    a.put_heartbeat("member-a", {"state": "ready", "trainRows": 5, "testRows": 0})
    a.put_update("r", 1, "member-a", weights.dumps([np.ones(3, np.float32)]), {"numExamples": 5})
    a.put_result("r", 1, "validations", "member-a", {"accuracy": 0.5, "numExamples": 1})
    a.put_result("r", 1, "failures", "member-a", {"reason": "x"})
    assert a.get_alliance()["seedModelId"] == seed
    assert a.get_model(seed)[0].shape == (3,)
    assert [o.key for o in a.list_tasks()] == ["tasks/r.json"]
    assert a.get_json("tasks/r.json")["members"] == ["member-a"]
    assert a.get_run_spec("r") == {"rounds": 1}
    assert a.update_exists("r", 1, "member-a")
    assert not a.update_exists("r", 2, "member-a")  # missing, not denied


def test_a_member_cannot_touch_another_members_or_the_runs_objects(members, store):
    stores, _ = members
    a, b = stores["member-a"], stores["member-b"]
    b.put_update("r", 1, "member-b", weights.dumps([np.ones(3, np.float32)]), {"numExamples": 5})
    update = weights.dumps([np.zeros(3, np.float32)])
    attempts = {
        "write b's update": lambda: a.put_update("r", 1, "member-b", update, {"numExamples": 9}),
        "read b's update": lambda: a.get_update("r", 1, "member-b"),
        "write b's heartbeat": lambda: a.put_heartbeat("member-b", {"state": "stopped"}),
        "write the task": lambda: a.put_task("r", {"members": ["member-a"]}),
        "write the spec": lambda: a.put_run_spec("r", {"rounds": 99}),
        "write the status": lambda: a.put_run_status("r", {"phase": "Completed"}),
        "write an aggregate": lambda: a.put_aggregate("r", 1, {"modelId": None}),
        "write a model": lambda: a.put_model([np.zeros(3, np.float32)]),
        "delete the task": lambda: a.delete_task("r"),
        "list the members": lambda: a.list_heartbeats(),
    }
    for what, attempt in attempts.items():
        with pytest.raises(StoreError, match="AccessDenied"):
            attempt()
            pytest.fail(f"member-a could {what}")
    # Nothing changed: b's update, the task and the spec are as they were.
    data, meta = store.get_update("r", 1, "member-b")
    assert weights.loads(data)[0].tolist() == [1, 1, 1] and meta["numExamples"] == 5
    assert store.get_json("tasks/r.json")["kind"] == "train"
    assert store.get_run_spec("r") == {"rounds": 1}


def test_provisioning_again_rotates_the_secret_and_bad_names_are_refused(members, store):
    stores, _ = members
    old = stores["member-a"]
    (new,) = identities.provision(store.config, ["member-a"]).values()
    assert new.secret_key != old.config.secret_key
    with pytest.raises(StoreError, match=r"SignatureDoesNotMatch|InvalidAccessKeyId"):
        old.put_heartbeat("member-a", {"state": "ready"})
    Store(new, retry_seconds=5).put_heartbeat("member-a", {"state": "ready"})
    for bad in ("A", "x", "member_1", "-lead", "a" * 64, "bad,name"):
        with pytest.raises(StoreError, match="member name"):
            identities.provision(store.config, [bad])


def test_the_policy_names_the_member_literally():
    policy = identities.member_policy("bkt", "hospital-a")
    text = str(policy)
    assert "${aws:username}" not in text
    assert "arn:aws:s3:::bkt/runs/*/rounds/*/updates/hospital-a.npz" in text
    assert "arn:aws:s3:::bkt/members/hospital-a.json" in text
