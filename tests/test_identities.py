"""A store identity per member (alliance/identities.py), on the real S3 gateway: each member's
keys write its own objects and nothing of anyone else's."""

from __future__ import annotations

import io
import time

import numpy as np
import pytest
import trustme
from minio import MinioAdmin
from minio.credentials import StaticProvider
from minio.error import S3Error

from alliance import contract, identities, weights
from alliance.s3server import TLS, S3Server
from alliance.store import Store, StoreConfig, StoreError


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
    assert a.config.access_key == identities.user_name(store.bucket, "member-a")
    assert a.config.secret_key != store.config.secret_key
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


def test_a_member_hears_of_task_changes_from_the_notice_bucket_and_nothing_else(members, store):
    """Members wait on the notice bucket's notifications, which only the coordinator writes:
    the alliance's bucket would show them the other members' objects, so they may not listen
    there, nor write notices that would wake the others."""
    stores, _ = members
    a = stores["member-a"]
    notices = contract.notice_bucket(store.bucket)
    changes = a.watch_tasks()
    others = a.watch("runs/")
    try:
        deadline = time.monotonic() + 10
        while not changes.live:
            assert time.monotonic() < deadline, "the notice bucket's stream never came up"
            time.sleep(0.05)
        changes.wait(0)  # the wake-up every new stream gives
        store.put_task("r", {"run": "r", "round": 2, "kind": "train", "members": ["member-a"]})
        assert changes.wait(5)
        store.delete_task("r")
        assert changes.wait(5)
        others._thread.join(10)  # refused: the listener gives up and its owner polls
        assert not others.live and not others._thread.is_alive()
        with pytest.raises(S3Error, match="AccessDenied"):
            a._client.put_object(notices, "tasks/r", io.BytesIO(b""), 0)
    finally:
        changes.close()
        others.close()


def test_provisioning_again_rotates_the_secret_and_bad_names_are_refused(members, store):
    stores, _ = members
    old = stores["member-a"]
    (new,) = identities.provision(store.config, ["member-a"]).values()
    assert new.secret_key != old.config.secret_key
    with pytest.raises(StoreError, match=r"SignatureDoesNotMatch|InvalidAccessKeyId"):
        old.put_heartbeat("member-a", {"state": "ready"})
    Store(new, retry_seconds=5).put_heartbeat("member-a", {"state": "ready"})
    for bad in ("A", "", "member_1", "-lead", "a" * 64, "bad,name", "trail."):
        with pytest.raises(StoreError, match="member name"):
            identities.provision(store.config, [bad])


def test_the_policy_names_the_member_literally():
    policy = identities.member_policy("bkt", "hospital-a")
    text = str(policy)
    assert "${aws:username}" not in text
    assert "arn:aws:s3:::bkt/runs/*/rounds/*/updates/hospital-a.npz" in text
    assert "arn:aws:s3:::bkt/members/hospital-a.json" in text


def test_removal_revokes_the_key_and_is_idempotent(members, store):
    stores, _ = members
    identities.remove(store.config, "member-a")
    identities.remove(store.config, "member-a")  # gone already: done
    with pytest.raises(StoreError, match="InvalidAccessKeyId"):
        stores["member-a"].put_heartbeat("member-a", {"state": "ready"})
    stores["member-b"].put_heartbeat("member-b", {"state": "ready"})  # b is untouched


def test_a_service_account_named_like_another_member_is_swept(members, store):
    """MinIO lets any user create service accounts of its own: member-a names one like b's
    user and b's key stops working; the sweep deletes it and b's key works again."""
    stores, _ = members
    a, b = stores["member-a"].config, stores["member-b"].config
    admin_a = MinioAdmin(
        endpoint=a.endpoint.split("//")[1],
        credentials=StaticProvider(a.access_key, a.secret_key),
        secure=False,
    )
    admin_a.add_service_account(access_key=b.access_key, secret_key="x" * 30)
    with pytest.raises(StoreError, match="SignatureDoesNotMatch"):
        stores["member-b"].put_heartbeat("member-b", {"state": "ready"})
    assert identities.sweep(store.config, ["member-a", "member-b"]) == [b.access_key]
    stores["member-b"].put_heartbeat("member-b", {"state": "ready"})
    assert identities.sweep(store.config, ["member-a", "member-b"]) == []


def test_two_alliances_on_one_store_have_distinct_users(store, s3_server):
    cfg = s3_server.config
    other = Store(StoreConfig(cfg.endpoint, cfg.access_key, cfg.secret_key, store.bucket + "-x"))
    other.ensure_bucket()
    (mine,) = identities.provision(store.config, ["member-a"]).values()
    (theirs,) = identities.provision(other.config, ["member-a"]).values()
    assert mine.access_key != theirs.access_key
    Store(mine, retry_seconds=5).put_heartbeat("member-a", {"state": "ready"})  # not rotated
    Store(theirs, retry_seconds=5).put_heartbeat("member-a", {"state": "ready"})
    # Their member-a's keys open nothing in this alliance's bucket.
    crossing = StoreConfig(cfg.endpoint, theirs.access_key, theirs.secret_key, store.bucket)
    with pytest.raises(StoreError, match="AccessDenied"):
        Store(crossing, retry_seconds=5).put_heartbeat("member-a", {"state": "ready"})


@pytest.fixture(scope="module")
def tls_server(tmp_path_factory):
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1", "localhost")
    tls = TLS(
        cert_chain="".join(p.bytes().decode() for p in cert.cert_chain_pems),
        private_key=cert.private_key_pem.bytes().decode(),
        ca_cert=ca.cert_pem.bytes().decode(),
    )
    with S3Server(tmp_path_factory.mktemp("s3-tls"), bucket="tls", tls=tls) as server:
        yield server


def test_the_store_over_tls_is_verified_with_the_given_ca(tls_server, tmp_path):
    cfg = tls_server.config
    assert cfg.endpoint.startswith("https://") and cfg.ca_cert
    admin = Store(cfg, retry_seconds=5)
    admin.ensure_bucket()
    (member,) = identities.provision(cfg, ["member-a"]).values()  # the admin API over TLS
    assert member.ca_cert == cfg.ca_cert
    # An agent finds the CA in the file its environment names.
    ca_file = tmp_path / "ca.crt"
    ca_file.write_text(cfg.ca_cert)
    env = {
        contract.ENV_S3_ENDPOINT: member.endpoint,
        contract.ENV_S3_ACCESS_KEY: member.access_key,
        contract.ENV_S3_SECRET_KEY: member.secret_key,
        contract.ENV_BUCKET: member.bucket,
        contract.ENV_S3_CA_FILE: str(ca_file),
    }
    Store(StoreConfig.from_env(env), retry_seconds=5).put_heartbeat("member-a", {"state": "ok"})
    # Without the CA (the system's CAs) the certificate is refused, quickly and clearly.
    untrusted = StoreConfig(cfg.endpoint, cfg.access_key, cfg.secret_key, cfg.bucket)
    with pytest.raises(StoreError, match="CERTIFICATE_VERIFY_FAILED"):
        Store(untrusted, retry_seconds=1).get_alliance()
    # Another CA's certificate does not verify it either.
    stranger = StoreConfig(**{**cfg.__dict__, "ca_cert": trustme.CA().cert_pem.bytes().decode()})
    with pytest.raises(StoreError, match="CERTIFICATE_VERIFY_FAILED"):
        Store(stranger, retry_seconds=1).get_alliance()
    ca_file.write_text("not a certificate")
    with pytest.raises(StoreError, match="not a PEM certificate"):
        StoreConfig.from_env(env)


def test_the_identities_command_creates_bundles_prints_policies_and_removes(store, tmp_path):
    """`alliance identities`, the admin's command outside Kubernetes, on the real gateway."""
    import json
    import os
    import stat
    import subprocess
    import sys

    import yaml

    def cli(*args, env=None):
        return subprocess.run(
            [sys.executable, "-m", "alliance", "identities", *args],
            capture_output=True,
            text=True,
            timeout=60,
            env={**os.environ, **(env or {})},
        )

    admin_env = store.config.to_env()
    done = cli(
        "create", "member-a", "member-b", "--out", tmp_path, "--alliance", "mnist", env=admin_env
    )
    assert done.returncode == 0, done.stderr
    path = tmp_path / "member-a.bundle.yaml"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    bundle = contract.read_join_bundle(yaml.safe_load(path.read_text()), str(path))
    assert bundle["member"] == "member-a" and bundle["alliance"] == "mnist"
    keys = StoreConfig(
        bundle["endpoint"], bundle["access_key"], bundle["secret_key"], bundle["bucket"]
    )
    Store(keys, retry_seconds=5).put_heartbeat("member-a", {"state": "ready"})
    with pytest.raises(StoreError, match="AccessDenied"):
        Store(keys, retry_seconds=5).put_heartbeat("member-b", {"state": "ready"})
    # The policy, for a store without the admin API: the one the users got.
    printed = cli("policy", "member-a", "--bucket", store.bucket)
    assert json.loads(printed.stdout) == identities.member_policy(store.bucket, "member-a")
    # A bundle from keys made by hand.
    made = cli("bundle", "member-a", "--alliance", "mnist", env=keys.to_env())
    assert contract.read_join_bundle(yaml.safe_load(made.stdout))["secret_key"] == keys.secret_key
    assert cli("remove", "member-a", env=admin_env).returncode == 0
    with pytest.raises(StoreError, match="InvalidAccessKeyId"):
        Store(keys, retry_seconds=5).put_heartbeat("member-a", {"state": "ready"})
    # No admin keys: one clear line, no traceback.
    failed = cli("create", "member-c", "--out", tmp_path, env={"ALLIANCE_S3_ENDPOINT": ""})
    assert failed.returncode == 1 and "Traceback" not in failed.stderr
    assert "not configured" in failed.stderr


def test_the_store_command_serves_alone_and_prints_what_to_export(tmp_path):
    """`alliance store`: the separate commands' store, as the README says."""
    import os
    import signal
    import subprocess
    import sys

    from alliance.s3server import free_port

    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "alliance", "store", "--dir", tmp_path / "s", "--port", str(port)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        lines = []
        while not lines or not lines[-1].startswith("# Ctrl-C"):
            line = proc.stdout.readline()
            assert line, proc.stderr.read()
            lines.append(line.strip())
        env = dict(
            line.removeprefix("export ").split("=", 1)
            for line in lines
            if line.startswith("export")
        )
        assert set(env) == {
            contract.ENV_S3_ENDPOINT,
            contract.ENV_S3_ACCESS_KEY,
            contract.ENV_S3_SECRET_KEY,
            contract.ENV_BUCKET,
        }
        assert env[contract.ENV_S3_ENDPOINT] == f"http://127.0.0.1:{port}"
        store = Store(StoreConfig.from_env({k: v.strip("'") for k, v in env.items()}), 5)
        store.put_heartbeat("member-a", {"state": "ready"})
        assert store.get_json("members/member-a.json") == {"state": "ready"}
    finally:
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=30) == 0
    assert "Traceback" not in proc.stderr.read()
    assert os.path.exists(tmp_path / "s" / "credentials")  # kept for the next start
