"""The store against a real S3 server: layout, content addressing, integrity, retries."""

import threading
import time

import numpy as np
import pytest

from alliance import weights
from alliance.s3server import S3Server
from alliance.store import IntegrityError, Store, StoreConfig, StoreError, model_key


def arrays(value=1.0):
    return [np.full((3, 2), value, np.float32), np.arange(4, dtype=np.float32)]


def test_weights_format_is_deterministic_and_numpy_readable(tmp_path):
    data = weights.dumps(arrays())
    assert weights.dumps(arrays()) == data
    path = tmp_path / "w.npz"
    path.write_bytes(data)
    with np.load(path) as npz:  # anyone with numpy reads it
        assert npz.files == ["arr_0", "arr_1"]
        np.testing.assert_array_equal(npz["arr_1"], [0, 1, 2, 3])
    with pytest.raises(weights.WeightsError, match="not a weights archive"):
        weights.loads(b"not a zip")


def test_mismatch_and_nonfinite_name_what_is_wrong():
    ref = arrays()
    assert weights.mismatch(arrays(2.0), ref) is None
    assert weights.mismatch(ref[:1], ref) == "has 1 arrays, the model has 2"
    bad = arrays()
    bad[1] = np.zeros(5, np.float32)
    assert weights.mismatch(bad, ref) == "array 1 has shape (5,), the model's is (4,)"
    bad = arrays()
    bad[1] = np.zeros(4, np.int32)
    assert weights.mismatch(bad, ref) == "array 1 has dtype int32, expected a floating dtype"
    bad = arrays()
    bad[0][0, 0] = np.nan
    bad[0][1, 1] = np.inf
    assert weights.mismatch(bad, ref) is None
    assert weights.nonfinite(bad) == "array 0 has 2 non-finite values (NaN or Inf)"
    assert weights.nonfinite(ref) is None


def test_models_are_content_addressed_and_checked_on_read(store):
    model_id = store.put_model(arrays())
    assert model_id == weights.content_id(weights.dumps(arrays()))
    assert store.put_model(arrays()) == model_id  # same content, same id
    np.testing.assert_array_equal(store.get_model(model_id)[0], arrays()[0])
    store.put_bytes(model_key(model_id), weights.dumps(arrays(9.0)))  # tamper
    with pytest.raises(IntegrityError, match="modified or corrupted"):
        store.get_model(model_id)
    with pytest.raises(StoreError, match="is not in the store"):
        store.get_model("0" * 64)


def test_update_carries_its_metrics_in_one_object(store):
    data = weights.dumps(arrays())
    store.put_update("r", 2, "alice", data, {"numExamples": 7, "loss": 0.25})
    got, meta = store.get_update("r", 2, "alice")
    assert got == data
    assert meta == {"numExamples": 7, "loss": 0.25, "sha256": weights.content_id(data)}
    store.put_result("r", 2, "failures", "bob", {"reason": "oom"})
    store.put_result("r", 2, "validations", "carol", {"accuracy": 1.0})
    assert store.list_round("r", 2) == {
        "updates": {"alice"},
        "failures": {"bob"},
        "validations": {"carol"},
    }
    assert store.list_round("r", 3) == {"updates": set(), "failures": set(), "validations": set()}
    keys = {o.key for o in store.list("runs/")}
    assert "runs/r/rounds/00002/updates/alice.npz" in keys


def test_missing_credentials_are_an_error_naming_the_variables():
    with pytest.raises(StoreError, match="ALLIANCE_S3_SECRET_KEY"):
        StoreConfig.from_env(
            {
                "ALLIANCE_S3_ENDPOINT": "http://127.0.0.1:1",
                "ALLIANCE_S3_ACCESS_KEY": "a",
                "ALLIANCE_BUCKET": "b",
            }
        )


def test_wrong_secret_is_refused(s3_server):
    cfg = s3_server.config
    bad = Store(StoreConfig(cfg.endpoint, cfg.access_key, "wrong", "bucket"), retry_seconds=2)
    with pytest.raises(StoreError, match="SignatureDoesNotMatch"):
        bad.ensure_bucket()


def test_calls_retry_through_an_outage(tmp_path):
    """The server goes away for 3 s; a call made meanwhile waits and then succeeds."""
    server = S3Server(tmp_path / "s3").start()
    again = S3Server(tmp_path / "s3", port=server.port)
    try:
        store = Store(server.config, retry_seconds=30)
        store.ensure_bucket()
        store.put_json("k.json", {"v": 1})
        server.stop()
        restart = threading.Timer(3.0, again.start)
        restart.start()
        started = time.monotonic()
        assert store.get_json("k.json") == {"v": 1}
        assert time.monotonic() - started >= 2.5
        restart.join()
    finally:
        server.stop()
        again.stop()


def test_outage_longer_than_the_budget_is_a_clear_error(tmp_path):
    server = S3Server(tmp_path / "s3").start()
    store = Store(server.config, retry_seconds=1)
    store.ensure_bucket()
    server.stop()
    with pytest.raises(StoreError, match="did not answer for 1 s"):
        store.get_json("k.json")
    server.stop()


def test_a_torn_json_read_is_read_again(store, monkeypatch):
    store.put_json("s.json", {"round": 2})
    real = store.get_bytes
    answers = iter([b'{"round": ', None])

    def flaky(key, max_bytes=None):
        torn = next(answers)
        return torn if torn is not None else real(key, max_bytes)

    monkeypatch.setattr(store, "get_bytes", flaky)
    assert store.get_json("s.json") == {"round": 2}


def test_json_that_stays_invalid_is_a_clear_error(store):
    store.put_bytes("bad.json", b"{not json")
    with pytest.raises(StoreError, match=r"bad\.json: not valid JSON"):
        store.get_json("bad.json")


def test_changes_wake_a_waiter_for_its_prefix_only(store):
    changes = store.watch("runs/r/rounds/")
    try:
        deadline = time.monotonic() + 10
        while not changes.live and time.monotonic() < deadline:
            time.sleep(0.05)
        assert changes.live, "the gateway serves bucket notifications"
        changes.wait(0)  # the wake-up every new stream starts with
        store.put_json("runs/r/status.json", {})  # outside the prefix
        assert not changes.wait(0.5)
        started = time.monotonic()
        store.put_json("runs/r/rounds/00001/validations/m.json", {})
        assert changes.wait(5)
        assert time.monotonic() - started < 1.0
        assert not changes.wait(0.2)  # once per change
    finally:
        changes.close()
