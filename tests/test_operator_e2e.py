"""The operator end to end: its own process, an API server, pods running real member agents,
a real S3 server and real TensorFlow on small MNIST data.

By default against the emulated cluster (tests/e2e_cluster.py); with ALLIANCE_E2E_KUBECONFIG
set, the same tests against that real cluster, with the same expectations. One alliance with
four Members (three with valid data, one whose PVC holds a broken CSV) is shared by the tests of
this module; each test starts its own TrainingRun. The namespace is deleted at the end while the
operator still runs (its finalizers are on every resource in it).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import time

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from alliance import contract
from alliance.store import Store, StoreConfig, StoreError
from tests.conftest import SAMPLE_DIR, write_rows
from tests.e2e_cluster import BIN, KubectlError, make_cluster, wait_for

pytestmark = pytest.mark.slow

GOOD_MEMBERS = ("hospital-a", "hospital-b", "hospital-c")
BAD_MEMBER = "clinic-bad"
REMOTE_MEMBER = "lab-remote"
ALLIANCE = "mnist"
BUCKET = "e2e-alliance"
TRAIN_ROWS, TEST_ROWS = 1000, 300


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, s3_server):
    cluster = make_cluster(tmp_path_factory.mktemp("e2e"), s3_server)
    yield cluster
    cluster.close()


@pytest.fixture(scope="module")
def namespace(cluster):
    ns = cluster.create_namespace()
    yield ns
    cluster.delete_namespace(ns)  # before the cluster fixture stops the operator


@pytest.fixture(scope="module")
def alliance(cluster, namespace, tmp_path_factory):
    """The store's Secret, the Alliance, four Members and their data, the operator running;
    returns (namespace, store)."""
    ns = namespace
    cluster.create_store_secret(ns, "alliance-store", alliances=ALLIANCE)
    data = tmp_path_factory.mktemp("member-data")
    for i, name in enumerate(GOOD_MEMBERS):
        train = write_rows(data / name / "train.csv", TRAIN_ROWS, skip=TRAIN_ROWS * i)
        test = write_rows(
            data / name / "test.csv", TEST_ROWS, SAMPLE_DIR / "test.csv.gz", skip=TEST_ROWS * i
        )
        cluster.provide_data(ns, f"{name}-data", {"train.csv": train, "test.csv": test}, name)
    broken = write_rows(data / BAD_MEMBER / "train.csv", 50)
    lines = broken.read_text().splitlines()
    cells = lines[3].split(",")
    cells[5] = "dark"  # line 4 of the file, column 1x5 (the 6th column): not a number
    lines[3] = ",".join(cells)
    broken.write_text("\n".join(lines) + "\n")
    cluster.provide_data(ns, f"{BAD_MEMBER}-data", {"train.csv": broken}, BAD_MEMBER)

    cluster.start_operator(ns)
    cluster.apply(
        ns,
        {
            "apiVersion": "alliance.dev/v1alpha1",
            "kind": "Alliance",
            "metadata": {"name": ALLIANCE},
            "spec": {
                "store": {
                    "endpoint": cluster.store_config.endpoint,
                    "bucket": BUCKET + "-" + ns,
                    "credentialsSecret": {"name": "alliance-store"},
                },
                "runDefaults": {"localEpochs": 1, "batchSize": 32},
            },
        },
        *[member_manifest(name) for name in (*GOOD_MEMBERS, BAD_MEMBER)],
    )
    config = cluster.store_config
    store = Store(
        StoreConfig(config.endpoint, config.access_key, config.secret_key, BUCKET + "-" + ns),
        retry_seconds=10,
    )
    for name in GOOD_MEMBERS:
        wait_for(
            lambda name=name: condition(cluster.get(ns, "member", name), "Ready") == "True",
            240,
            f"Member {name} Ready",
            interval=0.5,
            diagnose=lambda: cluster.diagnose(ns),
        )
    yield ns, store


def member_manifest(name: str) -> dict:
    return {
        "apiVersion": "alliance.dev/v1alpha1",
        "kind": "Member",
        "metadata": {"name": name},
        "spec": {
            "alliance": ALLIANCE,
            "dataVolumeClaim": f"{name}-data",
            # One CPU each: three agents share this machine's two cores without thrashing.
            "resources": {"limits": {"cpu": "1", "memory": "2Gi"}},
        },
    }


def run_manifest(name: str, **spec) -> dict:
    return {
        "apiVersion": "alliance.dev/v1alpha1",
        "kind": "TrainingRun",
        "metadata": {"name": name},
        "spec": {
            "alliance": ALLIANCE,
            "rounds": 2,
            "minMembers": 2,
            "roundDeadlineSeconds": 600,
            "validationDeadlineSeconds": 120,
            **spec,
        },
    }


def condition(obj: dict | None, type_: str) -> str | None:
    for c in ((obj or {}).get("status") or {}).get("conditions") or []:
        if c["type"] == type_:
            return c["status"]
    return None


def wait_phase(cluster, ns: str, run: str, phases: set[str], timeout: float) -> dict:
    return wait_for(
        lambda: (
            (tr := cluster.get(ns, "trainingrun", run))
            and (tr.get("status") or {}).get("phase") in phases
            and tr
        ),
        timeout,
        f"TrainingRun {run} in {sorted(phases)}",
        interval=0.5,
        diagnose=lambda: cluster.diagnose(ns),
    )


def events(cluster, ns: str, name: str) -> list[dict]:
    out = cluster.kubectl("get", "events", "-n", ns, "-o", "json")
    return [e for e in json.loads(out)["items"] if e["involvedObject"]["name"] == name]


def agent(pod: dict | None) -> dict:
    """The agent container's status in a member pod ({} before it has one)."""
    return next(iter(((pod or {}).get("status") or {}).get("containerStatuses") or []), {})


def start_training(cluster, ns: str, run: str, victim: str) -> dict:
    """Start a one-round run and return it once ``victim`` is training. A long deadline: the
    round can only end early if a lost member is noticed. Five local epochs: the members are
    still training when the test strikes."""
    cluster.apply(ns, run_manifest(run, rounds=1, localEpochs=5, roundDeadlineSeconds=900))
    return wait_for(
        lambda: (
            (t := cluster.get(ns, "trainingrun", run))
            and (t.get("status") or {}).get("stage") == "Training"
            and victim in t["status"].get("selected", [])
            and t
        ),
        300,
        f"{run}: round 1 training with {victim}",
        diagnose=lambda: cluster.diagnose(ns),
    )


def wait_member_ready(cluster, ns: str, member: str) -> None:
    wait_for(
        lambda: condition(cluster.get(ns, "member", member), "Ready") == "True",
        240,
        f"{member} Ready",
        diagnose=lambda: cluster.diagnose(ns),
    )


# --- the tests -------------------------------------------------------------------------------


def test_the_alliance_is_initialised_by_its_init_pod(cluster, alliance):
    ns, store = alliance
    obj = wait_for(
        lambda: (
            (a := cluster.get(ns, "alliance", ALLIANCE)) and condition(a, "Ready") == "True" and a
        ),
        60,
        "Alliance Ready",
    )
    assert condition(obj, "StoreReady") == "True"
    assert condition(obj, "ModelReady") == "True"
    assert obj["status"]["seedModelId"] == store.get_alliance()["seedModelId"]
    # Its work done, the init pod is removed.
    wait_for(lambda: cluster.get(ns, "pod", f"{ALLIANCE}-init") is None, 30, "init pod gone")


def test_bad_data_in_a_members_claim_shows_in_its_status(cluster, alliance):
    ns, _ = alliance
    member = wait_for(
        lambda: (
            (m := cluster.get(ns, "member", BAD_MEMBER))
            and condition(m, "DataReady") == "False"
            and m
        ),
        120,
        "DataReady=False on the bad member",
        diagnose=lambda: cluster.diagnose(ns),
    )
    message = next(c["message"] for c in member["status"]["conditions"] if c["type"] == "DataReady")
    assert "train.csv" in message and "line 4" in message and "1x5" in message, message
    assert member["status"]["phase"] == "InvalidData"
    assert condition(member, "Ready") == "False"
    assert condition(member, "PodReady") == "True"  # the agent runs; it waits for good data
    reasons = {e["reason"] for e in events(cluster, ns, BAD_MEMBER)}
    assert "InvalidData" in reasons
    table = cluster.kubectl("get", "members", "-n", ns)
    assert table.split("\n")[0].split() == ["NAME", "ALLIANCE", "DATA", "READY", "AGE"]
    row = next(line for line in table.splitlines() if line.startswith(BAD_MEMBER))
    assert row.split()[1:4] == [ALLIANCE, f"{BAD_MEMBER}-data", "False"]


def test_a_training_run_completes_with_accuracy_in_status(cluster, alliance):
    ns, store = alliance
    cluster.apply(ns, run_manifest("first", rounds=2))
    tr = wait_phase(cluster, ns, "first", {"Completed", "Failed"}, 300)
    status = tr["status"]
    assert status["phase"] == "Completed", status.get("message")
    assert [r["round"] for r in status["history"]] == [1, 2]
    for record in status["history"]:
        assert sorted(record["members"]) == sorted(GOOD_MEMBERS)
        assert record["accuracy"] is not None
    assert status["accuracy"] == pytest.approx(status["history"][-1]["accuracy"], abs=1e-6)
    assert status["accuracy"] > 0.6  # 3,000 MNIST rows, 2 rounds: well above chance
    assert condition(tr, "Completed") == "True" and condition(tr, "Invalid") == "False"
    # kopf's bookkeeping lives under the API group, not under kopf's own names.
    assert tr["metadata"]["finalizers"] == ["alliance.dev/finalizer"]
    kopf_keys = [k for k in tr["metadata"].get("annotations", {}) if "kopf" in k]
    assert kopf_keys and all(k.startswith("alliance.dev/") for k in kopf_keys), kopf_keys
    assert "kopf" not in tr["status"]
    # The model of every round is in the store, and the run's report page.
    for record in status["history"]:
        assert store.exists(f"models/{record['modelId']}.npz")
    page = store.get_bytes(f"runs/{status['storeRun']}/report.html").decode()
    assert "<svg" in page and "hospital-a" in page
    # kubectl shows it.
    table = cluster.kubectl("get", "trainingruns", "-n", ns)
    header, *rows = table.strip().splitlines()
    assert header.split() == ["NAME", "PHASE", "ROUND", "ACCURACY", "AGE"]
    row = next(r.split() for r in rows if r.startswith("first"))
    assert row[1:3] == ["Completed", "2"]
    assert float(row[3]) == pytest.approx(status["accuracy"], abs=1e-3)
    reasons = [e["reason"] for e in events(cluster, ns, "first")]
    assert reasons.count("RoundCompleted") >= 2 and "Completed" in reasons
    # The operator's metrics endpoint saw both rounds (the status is patched after them).
    samples = {
        (s.name, s.labels.get("run") or s.labels.get("alliance")): s.value
        for family in text_string_to_metric_families(cluster.operator_metrics())
        for s in family.samples
        if s.labels.get("namespace") == ns
    }
    assert samples[("alliance_rounds_completed_total", "first")] == 2
    assert samples[("alliance_round_duration_seconds_count", "first")] == 2
    assert samples[("alliance_round_accuracy", "first")] == pytest.approx(status["accuracy"])
    assert samples[("alliance_update_bytes_total", "first")] > 0
    assert samples[("alliance_members_ready", ALLIANCE)] == len(GOOD_MEMBERS)


def test_the_operator_killed_mid_run_resumes_without_losing_or_repeating_a_round(cluster, alliance):
    ns, store = alliance
    cluster.apply(ns, run_manifest("resumed", rounds=3))
    tr = wait_for(
        lambda: (
            (t := cluster.get(ns, "trainingrun", "resumed"))
            and (t.get("status") or {}).get("round") == 2
            and t
        ),
        300,
        "round 2 of the run",
        diagnose=lambda: cluster.diagnose(ns),
    )
    cluster.kill_operator()
    time.sleep(2)  # the round goes on without a coordinator: members keep training
    cluster.start_operator(ns)
    tr = wait_phase(cluster, ns, "resumed", {"Completed", "Failed"}, 300)
    status = tr["status"]
    assert status["phase"] == "Completed", status.get("message")
    assert [r["round"] for r in status["history"]] == [1, 2, 3]
    # One aggregation per round, and the status's chain of models is the store's.
    run = status["storeRun"]
    rounds = sorted({o.key.split("/")[3] for o in store.list(f"runs/{run}/rounds/")})
    assert rounds == ["00001", "00002", "00003"]
    for record in status["history"]:
        saved = store.get_aggregate(run, record["round"])
        assert saved["modelId"] == record["modelId"]
    assert len({r["modelId"] for r in status["history"]}) == 3


def test_a_member_agent_that_crashes_is_restarted_in_place_and_stays_in_the_round(
    cluster, alliance
):
    ns, store = alliance
    victim = GOOD_MEMBERS[1]
    pod_name = f"{victim}-agent"
    tr = start_training(cluster, ns, "crash", victim)
    pod = cluster.get(ns, "pod", pod_name)
    assert not store.update_exists(tr["status"]["storeRun"], 1, victim)  # it is training
    cluster.crash_agent(ns, pod_name)
    # A first crash: the kubelet restarts the container at once, in the same pod.
    restarted = wait_for(
        lambda: (p := cluster.get(ns, "pod", pod_name)) and agent(p).get("restartCount") and p,
        60,
        f"{pod_name} restarted",
        diagnose=lambda: cluster.diagnose(ns),
    )
    assert restarted["metadata"]["uid"] == pod["metadata"]["uid"]
    assert agent(restarted)["restartCount"] == 1
    assert agent(restarted)["lastState"]["terminated"]["exitCode"] == 137
    # The run never counts it lost (its pod runs or starts): the restarted agent trains the
    # round's task again and the round waits for it.
    tr = wait_phase(cluster, ns, "crash", {"Completed", "Failed"}, 300)
    assert tr["status"]["phase"] == "Completed", tr["status"].get("message")
    record = tr["status"]["history"][0]
    assert victim in record["members"] and victim not in record["dropped"]
    # The Member tells of the crash.
    member = wait_for(
        lambda: (m := cluster.get(ns, "member", victim)) and m["status"].get("restarts") and m,
        30,
        f"{victim} status.restarts",
    )
    assert member["status"]["restarts"] == 1
    assert "AgentRestarted" in {e["reason"] for e in events(cluster, ns, victim)}
    wait_member_ready(cluster, ns, victim)


# Before the crash-loop test: its victim's last restart (after a 10 s back-off) can overlap
# the next run's start, and a member seen lost stays out of that round.
def test_a_deleted_member_pod_is_recreated_and_the_round_goes_on(cluster, alliance):
    ns, _ = alliance
    victim = GOOD_MEMBERS[0]
    pod_name = f"{victim}-agent"
    start_training(cluster, ns, "deleted", victim)
    old = cluster.get(ns, "pod", pod_name)["metadata"]["uid"]
    cluster.kubectl("delete", "pod", pod_name, "-n", ns, "--wait=false")
    # The Member wants its agent: the operator creates a new pod.
    wait_for(
        lambda: (
            (pod := cluster.get(ns, "pod", pod_name))
            and pod["metadata"]["uid"] != old
            and "running" in agent(pod).get("state", {})
        ),
        120,
        f"a new pod for {victim}",
        diagnose=lambda: cluster.diagnose(ns),
    )
    tr = wait_phase(cluster, ns, "deleted", {"Completed", "Failed"}, 300)
    assert tr["status"]["phase"] == "Completed", tr["status"].get("message")
    # Dropped if a pass of the run saw the pod terminating or absent; else its update, from
    # the old agent finishing its task or the new one training it again, counts. Never both.
    record = tr["status"]["history"][0]
    assert (victim in record["members"]) != (victim in record["dropped"]), record
    wait_member_ready(cluster, ns, victim)


def test_a_member_agent_that_keeps_crashing_drops_out_of_the_round_at_once(cluster, alliance):
    ns, _ = alliance
    victim = GOOD_MEMBERS[2]
    pod_name = f"{victim}-agent"
    start_training(cluster, ns, "crashloop", victim)
    # The kubelet restarts a first crash at once; a second one soon after waits out a
    # back-off (10 s, doubling), the container waiting in CrashLoopBackOff.
    cluster.crash_agent(ns, pod_name)
    wait_for(
        lambda: (
            (a := agent(cluster.get(ns, "pod", pod_name))).get("restartCount") == 1
            and "running" in a.get("state", {})
        ),
        60,
        f"{pod_name} running again",
        diagnose=lambda: cluster.diagnose(ns),
    )
    cluster.crash_agent(ns, pod_name)
    phases = set()

    def aggregated() -> dict | None:
        phases.add(((cluster.get(ns, "member", victim) or {}).get("status") or {}).get("phase"))
        t = cluster.get(ns, "trainingrun", "crashloop")
        history = ((t or {}).get("status") or {}).get("history") or [{}]
        return history[0].get("aggregatedAt") and t

    tr = wait_for(aggregated, 120, "round 1 aggregated", diagnose=lambda: cluster.diagnose(ns))
    # The round did not wait for the agent to come back and train again.
    first = tr["status"]["history"][0]
    assert victim in first["dropped"] and victim not in first["members"]
    assert "CrashLoopBackOff" in phases, phases
    # After the back-off the agent is back; later rounds and runs select it again.
    wait_member_ready(cluster, ns, victim)
    assert agent(cluster.get(ns, "pod", pod_name))["restartCount"] == 2
    tr = wait_phase(cluster, ns, "crashloop", {"Completed", "Failed"}, 300)
    assert tr["status"]["phase"] == "Completed", tr["status"].get("message")


def test_a_run_spec_the_crd_rejects_is_refused_when_applied(cluster, alliance):
    ns, _ = alliance
    # The CRD's CEL rule (x-kubernetes-validations on spec): the API server answers 422
    # Invalid, which kubectl shows as 'The TrainingRun "too-few" is invalid: spec: ...'.
    with pytest.raises(KubectlError) as refused:
        cluster.apply(ns, run_manifest("too-few", membersPerRound=2, minMembers=3))
    message = str(refused.value)
    assert 'TrainingRun "too-few" is invalid' in message and "minMembers" in message, message
    assert cluster.get(ns, "trainingrun", "too-few") is None


def test_a_run_spec_only_the_engine_rejects_gets_an_invalid_condition(cluster, alliance):
    ns, _ = alliance
    spec = {"aggregator": "trimmedmean", "aggregatorParams": {"trimFraction": 0.7}}
    cluster.apply(ns, run_manifest("invalid", **spec))  # the CRD allows any number
    tr = wait_for(
        lambda: (
            (t := cluster.get(ns, "trainingrun", "invalid"))
            and condition(t, "Invalid") == "True"
            and t
        ),
        30,
        "Invalid=True",
        diagnose=lambda: cluster.diagnose(ns),
    )
    message = next(c["message"] for c in tr["status"]["conditions"] if c["type"] == "Invalid")
    assert "trimFraction" in message and "0.7" in message, message
    assert tr["status"]["phase"] == "Failed"


def test_the_operator_acts_for_no_one_beyond_what_they_were_given(cluster, alliance, tmp_path):
    """Confused deputy: an Alliance naming a Secret given to another Alliance (its keys swapped,
    so the secret key would go out as the access key, to a listener of its author's); a spy
    Member mounting another member's claim (two Members, one claim); a Member on a claim nobody
    marked. Each is refused with a condition, no pod runs, nothing reaches the listener."""
    ns, _ = alliance
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    listener.setblocking(False)
    port = listener.getsockname()[1]
    rows = write_rows(tmp_path / "train.csv", 20)
    cluster.provide_data(ns, "unmarked-data", {"train.csv": rows}, None)
    thief = {
        "apiVersion": "alliance.dev/v1alpha1",
        "kind": "Alliance",
        "metadata": {"name": "thief"},
        "spec": {
            "store": {
                "endpoint": f"http://127.0.0.1:{port}",
                "bucket": "loot",
                "credentialsSecret": {
                    "name": "alliance-store",
                    "accessKeyKey": "secretKey",
                    "secretKeyKey": "accessKey",
                },
            }
        },
    }
    spy = member_manifest("spy") | {
        "spec": {"alliance": ALLIANCE, "dataVolumeClaim": "hospital-a-data"}
    }
    stray = member_manifest("stray") | {
        "spec": {"alliance": ALLIANCE, "dataVolumeClaim": "unmarked-data"}
    }
    cluster.apply(ns, thief, spy, stray)

    def refused(kind: str, name: str, type_: str) -> dict:
        return wait_for(
            lambda: (o := cluster.get(ns, kind, name)) and condition(o, type_) == "False" and o,
            60,
            f"{kind} {name}: {type_}=False",
            diagnose=lambda: cluster.diagnose(ns),
        )

    def message(obj: dict, type_: str) -> tuple[str, str]:
        c = next(c for c in obj["status"]["conditions"] if c["type"] == type_)
        return c["reason"], c["message"]

    reason, text = message(refused("alliance", "thief", "StoreReady"), "StoreReady")
    assert reason == "SecretNotMarked" and 'not marked for Alliance "thief"' in text
    reason, text = message(refused("member", "spy", "ClaimAllowed"), "ClaimAllowed")
    assert reason == "ClaimNotMarked" and 'marked for Member "hospital-a"' in text
    reason, text = message(refused("member", "stray", "ClaimAllowed"), "ClaimAllowed")
    assert reason == "ClaimNotMarked" and "kubectl annotate pvc unmarked-data" in text
    time.sleep(3)  # a few more passes of the operator
    for pod in ("thief-init", "spy-agent", "stray-agent"):
        assert cluster.get(ns, "pod", pod) is None, pod
    with pytest.raises(BlockingIOError):
        listener.accept()  # nobody called the thief's endpoint
    listener.close()
    assert "SecretNotMarked" in {e["reason"] for e in events(cluster, ns, "thief")}
    for kind, name in (("alliance", "thief"), ("member", "spy"), ("member", "stray")):
        cluster.kubectl("delete", kind, name, "-n", ns, "--wait=true", "--timeout=60s")


def test_a_remote_member_joins_with_its_bundle_and_trains_with_the_pod_members(
    cluster, alliance, tmp_path
):
    """A member outside the cluster: no pod; its join bundle (its own keys) is all its agent,
    started here as a process of its own, needs; it trains in a run with the pod members."""
    ns, store = alliance
    remote = {
        "apiVersion": "alliance.dev/v1alpha1",
        "kind": "Member",
        "metadata": {"name": REMOTE_MEMBER},
        "spec": {"alliance": ALLIANCE, "remote": True},
    }
    cluster.apply(ns, remote)
    secret = f"{REMOTE_MEMBER}-store"
    wait_for(
        lambda: "bundle.yaml" in ((cluster.get(ns, "secret", secret) or {}).get("data") or {}),
        60,
        "the remote member's join bundle",
        diagnose=lambda: cluster.diagnose(ns),
    )
    bundle = tmp_path / "bundle.yaml"
    bundle.write_text(cluster.read_secret(ns, secret, "bundle.yaml"))
    joined = contract.read_join_bundle(yaml.safe_load(bundle.read_text()))
    assert joined["member"] == REMOTE_MEMBER and joined["access_key"] != store.config.access_key
    data = tmp_path / "data"
    write_rows(data / "train.csv", TRAIN_ROWS, skip=TRAIN_ROWS * 3)
    write_rows(data / "test.csv", TEST_ROWS, SAMPLE_DIR / "test.csv.gz", skip=TEST_ROWS * 3)
    log = open(tmp_path / "remote-agent.log", "wb")  # noqa: SIM115 (the process's)
    agent = subprocess.Popen(
        [str(BIN / "alliance"), "member", "--join", str(bundle), "--data-dir", str(data)],
        stdout=log,
        stderr=subprocess.STDOUT,
        # Nothing of this machine's store settings: only the bundle.
        env={"PATH": os.environ["PATH"], "HOME": str(tmp_path), "ALLIANCE_CPU_THREADS": "1"},
        start_new_session=True,
    )
    try:
        wait_member_ready(cluster, ns, REMOTE_MEMBER)
        member = cluster.get(ns, "member", REMOTE_MEMBER)
        kinds = {c["type"] for c in member["status"]["conditions"]}
        assert "PodReady" not in kinds and "CredentialsReady" in kinds
        assert cluster.get(ns, "pod", f"{REMOTE_MEMBER}-agent") is None
        cluster.apply(ns, run_manifest("with-remote", rounds=1, minMembers=4))
        tr = wait_phase(cluster, ns, "with-remote", {"Completed", "Failed"}, 300)
        assert tr["status"]["phase"] == "Completed", tr["status"].get("message")
        (record,) = tr["status"]["history"]
        assert sorted(record["members"]) == sorted([*GOOD_MEMBERS, REMOTE_MEMBER])
        # Its keys reach nothing of the other members'.
        keys = StoreConfig(
            joined["endpoint"], joined["access_key"], joined["secret_key"], joined["bucket"]
        )
        with pytest.raises(StoreError, match="AccessDenied"):
            Store(keys, retry_seconds=2).get_update(tr["status"]["storeRun"], 1, GOOD_MEMBERS[0])
    finally:
        agent.terminate()
        agent.wait(timeout=30)
        log.close()
    # Deleting the Member removes its store user: the bundle's keys stop working.
    cluster.kubectl("delete", "member", REMOTE_MEMBER, "-n", ns, "--wait=true", "--timeout=60s")
    with pytest.raises(StoreError, match="InvalidAccessKeyId"):
        Store(keys, retry_seconds=2).put_heartbeat(REMOTE_MEMBER, {"state": "stopped"})


def test_deleting_a_run_with_the_delete_policy_removes_its_objects(cluster, alliance):
    ns, store = alliance
    cluster.apply(ns, run_manifest("scratch", rounds=1, storeCleanupPolicy="Delete"))
    tr = wait_phase(cluster, ns, "scratch", {"Completed", "Failed"}, 300)
    run = tr["status"]["storeRun"]
    assert store.list(f"runs/{run}/")
    cluster.kubectl("delete", "trainingrun", "scratch", "-n", ns, "--wait=true", "--timeout=60s")
    assert cluster.get(ns, "trainingrun", "scratch") is None
    assert store.list(f"runs/{run}/") == []
    assert not store.exists(f"tasks/{run}.json")


def test_deleting_a_pending_run_and_a_member_takes_seconds(cluster, alliance):
    """A run waiting for its Alliance and a Member (the bad one: no other test needs it any
    more) are gone within seconds of `kubectl delete`, finalizers and all."""
    ns, _ = alliance
    cluster.apply(ns, run_manifest("orphan", alliance="no-such-alliance"))
    wait_for(
        lambda: condition(cluster.get(ns, "trainingrun", "orphan"), "AllianceFound") == "False",
        60,
        "the orphan run waiting for its Alliance",
        diagnose=lambda: cluster.diagnose(ns),
    )
    for kind, name in (("trainingrun", "orphan"), ("member", BAD_MEMBER)):
        started = time.monotonic()
        cluster.kubectl("delete", kind, name, "-n", ns, "--wait=true", "--timeout=60s")
        took = time.monotonic() - started
        assert cluster.get(ns, kind, name) is None
        assert took < 10, f"deleting {kind} {name} took {took:.1f} s"
