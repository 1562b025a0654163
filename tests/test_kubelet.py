"""The kubelet stand-in (tests/kube/kubelet.py): its pure parts, then end to end on the emulator."""

from __future__ import annotations

import base64
import json
import os
import stat
import sys
import time
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path

import psutil
import pytest
from kubernetes.client import CoreV1Api
from kubernetes.client.exceptions import ApiException
from kubernetes.config import new_client_from_config

from .kube.kubelet import (
    LOCAL_PATH_ANNOTATION,
    ContainerConfigError,
    ContainerStatus,
    KubeletStandIn,
    MountError,
    NodeResources,
    PodState,
    backoff_delays,
    build_status,
    container_argv,
    container_mounts,
    expand,
    field_value,
    find_executable,
    go_duration,
    process_env,
    resolve_env,
    resource_value,
    rewrite_path,
    should_restart,
    tail_text,
    write_key_files,
)

NODE = NodeResources(cpu=Decimal(4), memory=8 * 2**30, ephemeral_storage=100 * 2**30)

POD = {
    "metadata": {
        "name": "web-0",
        "namespace": "team-a",
        "uid": "1234-abcd",
        "labels": {"app": "web", "tier": "front"},
        "annotations": {"note": 'say "hi"'},
    },
    "spec": {
        "serviceAccountName": "runner",
        "containers": [
            {
                "name": "main",
                "image": "python:3.11",
                "resources": {"limits": {"cpu": "1500m", "memory": "1Gi"}},
            },
            {"name": "side", "image": "busybox", "resources": {"requests": {"cpu": "250m"}}},
        ],
    },
}


class FakeLookup:
    """Secrets and ConfigMaps from dicts of str (None = the object does not exist)."""

    def __init__(self, secrets=None, config_maps=None):
        self.secrets = secrets or {}
        self.config_maps = config_maps or {}

    @staticmethod
    def _get(store, namespace, name):
        data = store.get((namespace, name))
        return None if data is None else {k: v.encode() for k, v in data.items()}

    def secret(self, namespace, name):
        return self._get(self.secrets, namespace, name)

    def config_map(self, namespace, name):
        return self._get(self.config_maps, namespace, name)


# ---------------------------------------------------------------------------------------------
# $(VAR) expansion and path rewriting
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("$(A)", "a"),
        ("x-$(A)-$(B)", "x-a-bee"),
        ("$(MISSING)", "$(MISSING)"),
        ("$$(A)", "$(A)"),
        ("$$$(A)", "$a"),
        ("$$", "$"),
        ("$(A", "$(A"),
        ("$()", "$()"),
        ("$x$(A)", "$xa"),
        ("cost: 5$", "cost: 5$"),
        ("", ""),
        ("$(A)$(A)", "aa"),
    ],
)
def test_expand_follows_the_kubelet(text, expected):
    assert expand(text, {"A": "a", "B": "bee"}) == expected


MOUNTS = {"/data": "/tmp/x/claim", "/data/models": "/tmp/x/models", "/etc/creds": "/tmp/x/sec"}


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("/data", "/tmp/x/claim"),
        ("/data/train.csv", "/tmp/x/claim/train.csv"),
        ("/data/models", "/tmp/x/models"),
        ("/data/models/round-1/w.npz", "/tmp/x/models/round-1/w.npz"),
        ("/data/modelsX", "/tmp/x/claim/modelsX"),
        ("/database", "/database"),
        ("--out=/data/x", "--out=/data/x"),
        ("data/x", "data/x"),
        ("/etc/creds/accessKey", "/tmp/x/sec/accessKey"),
        ("", ""),
    ],
)
def test_rewrite_path_replaces_the_longest_mount_prefix(value, expected):
    assert rewrite_path(value, MOUNTS) == expected


def test_argv_is_expanded_then_rewritten_and_env_values_are_rewritten():
    container = {
        "command": ["python", "-m", "alliance"],
        "args": ["member", "--data", "$(DATA_DIR)/train.csv", "--name=$(NAME)", "$$(DATA_DIR)"],
    }
    env = {"DATA_DIR": "/data", "NAME": "m1", "OUT": "/data/models/out", "URL": "http://x/data"}
    argv = container_argv(container, env, MOUNTS)
    assert argv == [
        "python",
        "-m",
        "alliance",
        "member",
        "--data",
        "/tmp/x/claim/train.csv",
        "--name=m1",
        "$(DATA_DIR)",
    ]
    base = {"PATH": "/bin", "HOME": "/data"}  # the base is not rewritten: it is the stand-in's
    full = process_env(base, {"EXTRA": "/data", "NAME": "extra"}, env, MOUNTS)
    assert full["HOME"] == "/data" and full["EXTRA"] == "/data"
    assert full["NAME"] == "m1"  # the container's env wins over extra_env
    assert full["DATA_DIR"] == "/tmp/x/claim"
    assert full["OUT"] == "/tmp/x/models/out"
    assert full["URL"] == "http://x/data"


def test_container_mounts_map_mount_paths_and_create_sub_paths(tmp_path):
    volumes = {"claim": tmp_path / "claim", "cfg": tmp_path / "cfg"}
    container = {
        "volumeMounts": [
            {"name": "claim", "mountPath": "/data/"},
            {"name": "claim", "mountPath": "/scratch", "subPathExpr": "members/$(NAME)"},
            {"name": "cfg", "mountPath": "/etc/app/settings.yaml", "subPath": "settings.yaml"},
        ]
    }
    (tmp_path / "cfg").mkdir()
    (tmp_path / "cfg" / "settings.yaml").write_text("a: 1\n")
    mounts = container_mounts(container, volumes, {"NAME": "m1"})
    assert mounts == {
        "/data": str(tmp_path / "claim"),
        "/scratch": str(tmp_path / "claim" / "members" / "m1"),
        "/etc/app/settings.yaml": str(tmp_path / "cfg" / "settings.yaml"),
    }
    assert (tmp_path / "claim" / "members" / "m1").is_dir()
    with pytest.raises(ContainerConfigError, match='volume "nope"'):
        container_mounts({"volumeMounts": [{"name": "nope", "mountPath": "/x"}]}, volumes, {})


# ---------------------------------------------------------------------------------------------
# Environment
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        ("metadata.name", "web-0"),
        ("metadata.namespace", "team-a"),
        ("metadata.uid", "1234-abcd"),
        ("metadata.labels['app']", "web"),
        ("metadata.labels['missing']", ""),
        ("metadata.annotations['note']", 'say "hi"'),
        ("metadata.labels", 'app="web"\ntier="front"'),
        ("spec.nodeName", "kubelet-standin"),
        ("spec.serviceAccountName", "runner"),
        ("status.podIP", "127.0.0.1"),
        ("status.hostIP", "127.0.0.1"),
    ],
)
def test_field_refs(path, expected):
    assert field_value(POD, path) == expected


def test_unknown_field_ref_is_a_config_error():
    with pytest.raises(ContainerConfigError, match="unsupported fieldPath"):
        field_value(POD, "spec.bogus")


@pytest.mark.parametrize(
    ("resources", "resource", "divisor", "expected"),
    [
        ({"limits": {"cpu": "1500m"}}, "limits.cpu", None, "2"),  # rounded up
        ({"limits": {"cpu": "1500m"}}, "limits.cpu", "1m", "1500"),
        ({"limits": {"cpu": "250m"}}, "limits.cpu", "100m", "3"),
        ({"limits": {"memory": "1Gi"}}, "limits.memory", "1Mi", "1024"),
        ({"limits": {"memory": "1000"}}, "limits.memory", "1Ki", "1"),
        ({"limits": {"memory": "129M"}}, "limits.memory", None, "129000000"),
        ({}, "limits.cpu", None, "4"),  # no limit: the node's allocatable
        ({}, "limits.memory", "1Gi", "8"),
        ({"limits": {"cpu": "2"}}, "requests.cpu", "1m", "2000"),  # request defaults to limit
        ({"requests": {"cpu": "100m"}, "limits": {"cpu": "2"}}, "requests.cpu", "1m", "100"),
        ({}, "requests.memory", None, "0"),
    ],
)
def test_resource_field_refs_round_up_like_the_kubelet(resources, resource, divisor, expected):
    assert resource_value({"resources": resources}, resource, divisor, NODE) == expected


def test_env_is_resolved_like_the_kubelet():
    lookup = FakeLookup(
        secrets={("team-a", "s3"): {"accessKey": "AK", "secretKey": "SK"}},
        config_maps={("team-a", "settings"): {"ROUNDS": "3", "bad name": "x", "MODE": "fast"}},
    )
    container = {
        "name": "main",
        "resources": {"limits": {"memory": "2Gi"}},
        "envFrom": [{"configMapRef": {"name": "settings"}, "prefix": "CFG_"}],
        "env": [
            {"name": "BASE", "value": "/data"},
            {"name": "TRAIN", "value": "$(BASE)/train.csv"},
            {"name": "ROUNDS_TEXT", "value": "rounds=$(CFG_ROUNDS) $(UNKNOWN)"},
            {"name": "CFG_MODE", "value": "slow"},  # env overrides envFrom
            {"name": "KEY", "valueFrom": {"secretKeyRef": {"name": "s3", "key": "accessKey"}}},
            {
                "name": "OPT",
                "valueFrom": {"secretKeyRef": {"name": "s3", "key": "nope", "optional": True}},
            },
            {
                "name": "OPT2",
                "valueFrom": {"configMapKeyRef": {"name": "gone", "key": "k", "optional": True}},
            },
            {"name": "N", "valueFrom": {"configMapKeyRef": {"name": "settings", "key": "ROUNDS"}}},
            {"name": "POD", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
            {"name": "IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}},
            {
                "name": "MEM_MI",
                "valueFrom": {"resourceFieldRef": {"resource": "limits.memory", "divisor": "1Mi"}},
            },
            {
                "name": "SIDE_CPU",
                "valueFrom": {
                    "resourceFieldRef": {
                        "containerName": "side",
                        "resource": "requests.cpu",
                        "divisor": "1m",
                    }
                },
            },
            {"name": "REFS_LATER", "value": "$(LATER)"},
            {"name": "LATER", "value": "x"},
        ],
    }
    env = resolve_env(POD, container, lookup, NODE)
    assert env == {
        "CFG_ROUNDS": "3",
        "CFG_MODE": "slow",
        "BASE": "/data",
        "TRAIN": "/data/train.csv",
        "ROUNDS_TEXT": "rounds=3 $(UNKNOWN)",
        "KEY": "AK",
        "N": "3",
        "POD": "web-0",
        "IP": "127.0.0.1",
        "MEM_MI": "2048",
        "SIDE_CPU": "250",
        "REFS_LATER": "$(LATER)",  # only variables defined before are expanded
        "LATER": "x",
    }


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        ({"secretKeyRef": {"name": "x", "key": "accessKey"}}, 'secret "x" not found'),
        (
            {"secretKeyRef": {"name": "s3", "key": "accessKey"}},
            "couldn't find key accessKey in Secret team-a/s3",
        ),
        ({"configMapKeyRef": {"name": "cm", "key": "k"}}, 'configmap "cm" not found'),
        (
            {"configMapKeyRef": {"name": "settings", "key": "k"}},
            "couldn't find key k in ConfigMap team-a/settings",
        ),
    ],
)
def test_missing_references_give_the_kubelets_messages(entry, message):
    lookup = FakeLookup(
        secrets={("team-a", "s3"): {"other": "v"}}, config_maps={("team-a", "settings"): {}}
    )
    container = {"name": "main", "env": [{"name": "V", "valueFrom": entry}]}
    with pytest.raises(ContainerConfigError) as info:
        resolve_env(POD, container, lookup, NODE)
    assert str(info.value) == message


def test_env_from_secret_missing_unless_optional():
    container = {"name": "main", "envFrom": [{"secretRef": {"name": "creds"}}]}
    with pytest.raises(ContainerConfigError, match=r'^secret "creds" not found$'):
        resolve_env(POD, container, FakeLookup(), NODE)
    container["envFrom"][0]["secretRef"]["optional"] = True
    assert resolve_env(POD, container, FakeLookup(), NODE) == {}
    lookup = FakeLookup(secrets={("team-a", "creds"): {"USER": "u"}})
    container["envFrom"][0]["prefix"] = "S3_"
    assert resolve_env(POD, container, lookup, NODE) == {"S3_USER": "u"}


# ---------------------------------------------------------------------------------------------
# Files, executables, output tails, durations
# ---------------------------------------------------------------------------------------------


def test_key_files_follow_items_and_modes(tmp_path):
    data = {"a": b"1", "b": b"2"}
    write_key_files(tmp_path / "all", data, None, 0o640, False, str)
    assert sorted(p.name for p in (tmp_path / "all").iterdir()) == ["a", "b"]
    assert stat.S_IMODE((tmp_path / "all" / "a").stat().st_mode) == 0o640
    items = [{"key": "b", "path": "sub/bee.txt", "mode": 0o600}]
    write_key_files(tmp_path / "some", data, items, 0o644, False, str)
    assert (tmp_path / "some" / "sub" / "bee.txt").read_bytes() == b"2"
    assert not (tmp_path / "some" / "a").exists()
    assert stat.S_IMODE((tmp_path / "some" / "sub" / "bee.txt").stat().st_mode) == 0o600
    with pytest.raises(MountError, match="missing key c"):
        write_key_files(tmp_path / "x", data, [{"key": "c", "path": "c"}], 0o644, False,
                        lambda k: f"missing key {k}")  # fmt: skip
    write_key_files(tmp_path / "y", data, [{"key": "c", "path": "c"}], 0o644, True, str)


def test_find_executable(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    tool = bin_dir / "tool"
    tool.write_text("#!/bin/sh\n")
    tool.chmod(0o755)
    (bin_dir / "data.txt").write_text("not executable")
    assert find_executable("tool", [bin_dir], "/usr/bin:/bin", tmp_path) == str(tool)
    assert find_executable("sh", [bin_dir], "/usr/bin:/bin", tmp_path).endswith("/sh")
    assert find_executable("data.txt", [bin_dir], "", tmp_path) is None
    assert find_executable("no-such-tool", [bin_dir], "/usr/bin:/bin", tmp_path) is None
    assert find_executable(sys.executable, [], "", tmp_path) == sys.executable
    # An absolute path from an image that this machine lacks: its basename in bin_dirs.
    assert find_executable("/opt/image/bin/tool", [bin_dir], "", tmp_path) == str(tool)
    assert find_executable("./bin/tool", [], "", tmp_path) == str(tmp_path / "bin" / "tool")


def test_tail_text_keeps_the_last_80_lines_and_4_kib():
    lines = b"".join(f"line {i}\n".encode() for i in range(200))
    tail = tail_text(lines)
    assert tail.splitlines() == [f"line {i}" for i in range(120, 200)]
    big = b"x" * 10_000 + b"\nend\n"
    assert len(tail_text(big).encode()) == 4096 and tail_text(big).endswith("x\nend")


@pytest.mark.parametrize(
    ("seconds", "text"),
    [(0.25, "250ms"), (1, "1s"), (1.5, "1.5s"), (10, "10s"), (80, "1m20s"), (300, "5m0s")],
)
def test_go_duration(seconds, text):
    assert go_duration(seconds) == text


@pytest.mark.parametrize(
    ("policy", "kind", "code", "restart"),
    [
        (None, "main", 0, True),  # Always is the default
        ("Always", "main", 0, True),
        ("Always", "main", 1, True),
        ("OnFailure", "main", 0, False),
        ("OnFailure", "main", 137, True),
        ("Never", "main", 0, False),
        ("Never", "main", 2, False),
        ("Always", "init", 0, False),
        ("Always", "init", 1, True),
        ("OnFailure", "init", 1, True),
        ("Never", "init", 1, False),
    ],
)
def test_restart_policy(policy, kind, code, restart):
    assert should_restart(policy, kind, code) is restart


def test_backoff_none_on_the_first_crash_then_doubling_and_forgotten_after_a_long_run():
    delays, current = [], 0.0  # no crash yet
    for _ in range(7):
        delay, current = backoff_delays(current, uptime=0.5, initial=1.0, maximum=10.0)
        delays.append(delay)
    assert delays == [0.0, 1.0, 2.0, 4.0, 8.0, 10.0, 10.0]  # the kubelet's: at once, then 10 s...
    assert backoff_delays(current, uptime=9.9, initial=1.0, maximum=10.0) == (10.0, 10.0)
    assert backoff_delays(current, uptime=10.0, initial=1.0, maximum=10.0) == (0.0, 1.0)


# ---------------------------------------------------------------------------------------------
# Status building
# ---------------------------------------------------------------------------------------------


def conditions(status):
    return {c["type"]: c for c in status["conditions"]}


def test_status_unschedulable_only_says_so():
    state = PodState.for_pod(POD)
    state.unschedulable = 'persistentvolumeclaim "data" not found'
    status = build_status(state, "2026-01-01T00:00:00Z")
    assert status == {
        "phase": "Pending",
        "conditions": [
            {
                "type": "PodScheduled",
                "status": "False",
                "reason": "Unschedulable",
                "message": 'persistentvolumeclaim "data" not found',
                "lastTransitionTime": "2026-01-01T00:00:00Z",
            }
        ],
    }


def test_status_running_then_succeeded_keeps_transition_times():
    state = PodState.for_pod(POD)
    assert [s.name for s in state.statuses] == ["main"]  # only the first container is reported
    state.start_time = "2026-01-01T00:00:00Z"
    waiting = build_status(state, "2026-01-01T00:00:00Z")
    assert waiting["phase"] == "Pending"
    assert waiting["containerStatuses"][0]["state"] == {"waiting": {"reason": "ContainerCreating"}}
    assert conditions(waiting)["Ready"]["status"] == "False"
    assert conditions(waiting)["Ready"]["message"] == "containers with unready status: [main]"

    main = state.statuses[0]
    main.state = {"running": {"startedAt": "2026-01-01T00:00:01Z"}}
    main.ready = main.started = True
    main.container_id = "standin://42"
    state.phase = "Running"
    running = build_status(state, "2026-01-01T00:00:01Z")
    assert running["phase"] == "Running"
    assert running["podIP"] == running["hostIP"] == "127.0.0.1"
    assert running["startTime"] == "2026-01-01T00:00:00Z"
    conds = conditions(running)
    assert {k: c["status"] for k, c in conds.items()} == {
        "PodReadyToStartContainers": "True",
        "Initialized": "True",
        "Ready": "True",
        "ContainersReady": "True",
        "PodScheduled": "True",
    }
    assert conds["Ready"]["lastTransitionTime"] == "2026-01-01T00:00:01Z"
    assert conds["PodScheduled"]["lastTransitionTime"] == "2026-01-01T00:00:00Z"
    cs = running["containerStatuses"][0]
    assert cs == {
        "name": "main",
        "image": "python:3.11",
        "imageID": "standin://python:3.11",
        "containerID": "standin://42",
        "ready": True,
        "started": True,
        "restartCount": 0,
        "state": {"running": {"startedAt": "2026-01-01T00:00:01Z"}},
        "lastState": {},
    }

    main.state = {"terminated": {"exitCode": 0, "reason": "Completed"}}
    main.ready = main.started = False
    state.phase = "Succeeded"
    done = build_status(state, "2026-01-01T00:00:09Z")
    conds = conditions(done)
    assert done["phase"] == "Succeeded"
    assert conds["Ready"]["status"] == "False" and conds["Ready"]["reason"] == "PodCompleted"
    assert conds["Ready"]["lastTransitionTime"] == "2026-01-01T00:00:09Z"
    assert conds["Initialized"]["lastTransitionTime"] == "2026-01-01T00:00:00Z"


def test_status_with_init_containers_pending():
    pod = {
        **POD,
        "spec": {
            **POD["spec"],
            "initContainers": [
                {"name": "fetch", "image": "busybox"},
                {"name": "sidecar", "image": "envoy", "restartPolicy": "Always"},
                {"name": "check", "image": "busybox"},
            ],
        },
    }
    state = PodState.for_pod(pod)
    assert [s.name for s in state.init_statuses] == ["fetch", "check"]  # sidecars are skipped
    status = build_status(state, "2026-01-01T00:00:00Z")
    init = conditions(status)["Initialized"]
    assert init["status"] == "False" and init["reason"] == "ContainersNotInitialized"
    assert init["message"] == "containers with incomplete status: [fetch check]"
    assert status["containerStatuses"][0]["state"]["waiting"]["reason"] == "PodInitializing"
    assert [s["name"] for s in status["initContainerStatuses"]] == ["fetch", "check"]
    state.stage = 2
    assert conditions(build_status(state))["Initialized"]["status"] == "True"


def test_failed_status_carries_reason_and_message():
    state = PodState.for_pod(POD)
    state.phase, state.reason, state.message = "Failed", "Evicted", "low on memory"
    state.statuses[0] = ContainerStatus("main", "python:3.11", state={"terminated": {}})
    status = build_status(state)
    assert (status["phase"], status["reason"], status["message"]) == (
        "Failed",
        "Evicted",
        "low on memory",
    )
    assert conditions(status)["Ready"]["reason"] == "ContainersNotReady"


def test_node_resources_are_this_machine():
    node = NodeResources.local()
    assert node.cpu == os.cpu_count() and node.memory > 2**28


# ---------------------------------------------------------------------------------------------
# End to end: the stand-in against the API server emulator, real processes.
# ---------------------------------------------------------------------------------------------

APISERVER = Path(__file__).parent / "kube" / "apiserver.py"
NS = "kubelet-e2e"
PY = sys.executable


@dataclass
class Cluster:
    server: object
    api: CoreV1Api
    kubelet: KubeletStandIn
    kubeconfig: Path

    def pod(self, name: str, namespace: str = NS) -> dict | None:
        try:
            resp = self.api.read_namespaced_pod(name, namespace, _preload_content=False)
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise
        return json.loads(resp.data)

    def wait_pod(self, name, predicate, timeout=10.0, namespace=NS) -> dict:
        """Poll the Pod until ``predicate(pod)``; the last Pod seen is in the timeout message."""
        seen: list = [None]

        def check():
            seen[0] = self.pod(name, namespace)
            return seen[0] is not None and predicate(seen[0])

        try:
            self.kubelet.wait_for(check, timeout)
        except TimeoutError:
            pytest.fail(f"pod {name} never matched; last seen: {json.dumps(seen[0], indent=1)}")
        return seen[0]

    def create_pod(self, manifest: dict, namespace: str = NS) -> dict:
        return self.api.create_namespaced_pod(namespace, manifest, _preload_content=False)


def start_server(tmp_path: Path):
    if not APISERVER.exists():
        pytest.skip("tests/kube/apiserver.py is not there yet")
    from .kube.apiserver import ApiServer

    server = ApiServer(port=0)
    server.start()
    kubeconfig = tmp_path / "kubeconfig"
    server.write_kubeconfig(kubeconfig)
    return server, kubeconfig


def create_namespace(api: CoreV1Api, name: str) -> None:
    body = {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}}
    api.create_namespace(body, _preload_content=False)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("kubelet-e2e")
    server, kubeconfig = start_server(tmp)
    client = new_client_from_config(config_file=str(kubeconfig))
    api = CoreV1Api(client)
    create_namespace(api, NS)
    kubelet = KubeletStandIn(
        kubeconfig,
        tmp / "kubelet",
        namespace=NS,
        bin_dirs=[Path(PY).parent],
        backoff_seconds=0.3,
        max_backoff_seconds=1.0,
        extra_env={"PYTHONUNBUFFERED": "1"},
    )
    kubelet.config_retry_seconds = 0.3
    kubelet.start()
    try:
        yield Cluster(server, api, kubelet, kubeconfig)
    finally:
        kubelet.stop()
        client.close()
        server.stop()


def python_pod(name, code, restart="Never", args=(), env=(), mounts=(), volumes=(), **extra):
    """A Pod whose one container runs ``python -c code args...``."""
    container = {
        "name": "main",
        "image": "python:3.11-slim",
        "command": [PY, "-c", code],
        "args": list(args),
        "env": list(env),
        "volumeMounts": list(mounts),
        **extra,
    }
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "labels": {"app": name}},
        "spec": {
            "restartPolicy": restart,
            "terminationGracePeriodSeconds": 2,
            "containers": [container],
            "volumes": list(volumes),
        },
    }


def claim(api: CoreV1Api, name: str, local: Path | None) -> None:
    annotations = {LOCAL_PATH_ANNOTATION: str(local)} if local else {}
    body = {
        "apiVersion": "v1",
        "kind": "PersistentVolumeClaim",
        "metadata": {"name": name, "annotations": annotations},
        "spec": {"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": "1Gi"}}},
    }
    api.create_namespaced_persistent_volume_claim(NS, body, _preload_content=False)


def main_status(pod: dict) -> dict:
    return ((pod.get("status") or {}).get("containerStatuses") or [{}])[0]


def state_of(pod: dict) -> str:
    return next(iter(main_status(pod).get("state") or {"": None}))


def gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def test_pod_runs_then_succeeds(cluster):
    code = "import os, time; print('hello from', os.environ['POD']); time.sleep(1.0)"
    env = [{"name": "POD", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}}]
    cluster.create_pod(python_pod("hello", code, env=env))
    running = cluster.wait_pod("hello", lambda p: p["status"].get("phase") == "Running")
    cs = main_status(running)
    assert cs["ready"] is True and cs["started"] is True and cs["restartCount"] == 0
    assert cs["containerID"] == f"standin://{cluster.kubelet.pid(NS, 'hello')}"
    assert "running" in cs["state"] and running["status"]["podIP"] == "127.0.0.1"
    assert {c["type"]: c["status"] for c in running["status"]["conditions"]}["Ready"] == "True"

    done = cluster.wait_pod("hello", lambda p: p["status"].get("phase") == "Succeeded")
    terminated = main_status(done)["state"]["terminated"]
    assert (terminated["exitCode"], terminated["reason"]) == (0, "Completed")
    assert "message" not in terminated
    assert main_status(done)["ready"] is False
    assert cluster.kubelet.logs(NS, "hello") == "hello from hello\n"
    assert cluster.kubelet.pid(NS, "hello") is None


def test_crashing_pod_backs_off_with_its_output_in_the_last_state(cluster):
    code = "import sys; print('starting'); print('boom: bad config', file=sys.stderr); sys.exit(3)"
    pod = python_pod(
        "crasher", code, restart="Always", terminationMessagePolicy="FallbackToLogsOnError"
    )
    cluster.create_pod(pod)
    seen_backoff: list[dict] = []

    def crash_looping(p):
        cs = main_status(p)
        waiting = (cs.get("state") or {}).get("waiting") or {}
        if waiting.get("reason") == "CrashLoopBackOff":
            seen_backoff.append(waiting)
        return cs.get("restartCount", 0) >= 3 and seen_backoff

    p = cluster.wait_pod("crasher", crash_looping, timeout=15)
    assert p["status"]["phase"] == "Running"
    assert seen_backoff[0]["message"].startswith("back-off ")
    assert "restarting failed container=main pod=crasher_kubelet-e2e(" in seen_backoff[0]["message"]
    last = main_status(p)["lastState"]["terminated"]
    assert (last["exitCode"], last["reason"]) == (3, "Error")
    assert last["message"] == "starting\nboom: bad config"  # this run's output only
    assert cluster.kubelet.logs(NS, "crasher").count("boom: bad config") >= 3
    cluster.api.delete_namespaced_pod("crasher", NS, _preload_content=False)


def test_secret_env_config_volume_and_mount_path_rewriting(cluster, tmp_path):
    claim(cluster.api, "results", tmp_path / "claim")
    secret = {"metadata": {"name": "s3-creds"}, "data": {"accessKey": b64("AKIA-123")}}
    cluster.api.create_namespaced_secret(NS, secret, _preload_content=False)
    config = {"metadata": {"name": "settings"}, "data": {"settings.yaml": "rounds: 3\n"}}
    cluster.api.create_namespaced_config_map(NS, config, _preload_content=False)
    code = (
        "import json, os, sys\n"
        "report = {'argv': sys.argv[1:], 'key': os.environ['ACCESS_KEY'],\n"
        "          'out': os.environ['OUT_DIR'], 'cwd': os.getcwd(),\n"
        "          'settings': open(sys.argv[2]).read()}\n"
        "open(sys.argv[1], 'w').write(json.dumps(report))\n"
    )
    key_ref = {"name": "s3-creds", "key": "accessKey"}
    pod = python_pod(
        "writer",
        code,
        args=["$(OUT_DIR)/report.json", "/etc/app/settings.yaml", "--flag=/data/x"],
        env=[
            {"name": "OUT_DIR", "value": "/data/out"},
            {"name": "ACCESS_KEY", "valueFrom": {"secretKeyRef": key_ref}},
        ],
        mounts=[
            {"name": "results", "mountPath": "/data"},
            {"name": "config", "mountPath": "/etc/app", "readOnly": True},
        ],
        volumes=[
            {"name": "results", "persistentVolumeClaim": {"claimName": "results"}},
            {"name": "config", "configMap": {"name": "settings"}},
        ],
        workingDir="/data/out",
    )
    cluster.create_pod(pod)
    cluster.wait_pod("writer", lambda p: p["status"].get("phase") == "Succeeded")
    report = json.loads((tmp_path / "claim" / "out" / "report.json").read_text())
    assert report == {
        "argv": [
            str(tmp_path / "claim" / "out" / "report.json"),
            report["argv"][1],
            "--flag=/data/x",  # embedded paths are not rewritten
        ],
        "key": "AKIA-123",
        "out": str(tmp_path / "claim" / "out"),
        "cwd": str(tmp_path / "claim" / "out"),
        "settings": "rounds: 3\n",
    }
    assert report["argv"][1].endswith("/volumes/config/settings.yaml")


def test_missing_secret_is_a_config_error_until_it_exists(cluster):
    code = "import os; print('key', os.environ['KEY'])"
    env = [{"name": "KEY", "valueFrom": {"secretKeyRef": {"name": "late", "key": "accessKey"}}}]
    cluster.create_pod(python_pod("late-secret", code, env=env))

    def waiting(message):
        def check(p):
            w = (main_status(p).get("state") or {}).get("waiting") or {}
            return w.get("reason") == "CreateContainerConfigError" and w.get("message") == message

        return check

    p = cluster.wait_pod("late-secret", waiting('secret "late" not found'))
    assert p["status"]["phase"] == "Pending"
    ready = {c["type"]: c for c in p["status"]["conditions"]}["Ready"]
    assert ready["status"] == "False" and ready["reason"] == "ContainersNotReady"
    body = {"metadata": {"name": "late"}, "data": {"secretKey": b64("x")}}
    cluster.api.create_namespaced_secret(NS, body, _preload_content=False)
    cluster.wait_pod("late-secret", waiting(f"couldn't find key accessKey in Secret {NS}/late"))
    patch = {"data": {"accessKey": b64("AK-late")}}
    cluster.api.patch_namespaced_secret("late", NS, patch, _preload_content=False)
    cluster.wait_pod("late-secret", lambda p: p["status"].get("phase") == "Succeeded")
    assert cluster.kubelet.logs(NS, "late-secret") == "key AK-late\n"


def test_missing_claim_is_unschedulable_and_a_claim_without_local_path_waits(cluster, tmp_path):
    code = "import sys; open(sys.argv[1], 'w').write('done')"
    pod = python_pod(
        "needs-claim",
        code,
        args=["/data/done.txt"],
        mounts=[{"name": "data", "mountPath": "/data"}],
        volumes=[{"name": "data", "persistentVolumeClaim": {"claimName": "later"}}],
    )
    cluster.create_pod(pod)

    def scheduled(p):
        return {c["type"]: c for c in p["status"].get("conditions") or []}.get("PodScheduled")

    p = cluster.wait_pod("needs-claim", lambda p: (scheduled(p) or {}).get("status") == "False")
    assert scheduled(p)["reason"] == "Unschedulable"
    assert scheduled(p)["message"] == 'persistentvolumeclaim "later" not found'
    assert p["status"]["phase"] == "Pending"

    claim(cluster.api, "later", None)
    p = cluster.wait_pod(
        "needs-claim",
        lambda p: (
            (main_status(p).get("state") or {}).get("waiting", {}).get("reason")
            == "ContainerCreating"
            and "message" in main_status(p)["state"]["waiting"]
        ),
    )
    assert LOCAL_PATH_ANNOTATION in main_status(p)["state"]["waiting"]["message"]
    assert scheduled(p)["status"] == "True"

    patch = {"metadata": {"annotations": {LOCAL_PATH_ANNOTATION: str(tmp_path / "later")}}}
    cluster.api.patch_namespaced_persistent_volume_claim("later", NS, patch, _preload_content=False)
    cluster.wait_pod("needs-claim", lambda p: p["status"].get("phase") == "Succeeded")
    assert (tmp_path / "later" / "done.txt").read_text() == "done"


def test_init_containers_run_first_in_order(cluster):
    init = {
        "name": "prepare",
        "image": "busybox",
        "command": [PY, "-c", "import sys; open(sys.argv[1], 'w').write('prepared')"],
        "args": ["/scratch/flag"],
        "volumeMounts": [{"name": "scratch", "mountPath": "/scratch"}],
    }
    code = "import sys; print(open(sys.argv[1]).read())"
    pod = python_pod(
        "with-init",
        code,
        args=["/scratch/flag"],
        mounts=[{"name": "scratch", "mountPath": "/scratch"}],
        volumes=[{"name": "scratch", "emptyDir": {}}],
    )
    pod["spec"]["initContainers"] = [init]
    cluster.create_pod(pod)
    p = cluster.wait_pod("with-init", lambda p: p["status"].get("phase") == "Succeeded")
    init_status = p["status"]["initContainerStatuses"][0]
    assert init_status["state"]["terminated"]["reason"] == "Completed"
    assert cluster.kubelet.logs(NS, "with-init") == "prepared\n"


def test_readiness_exec_probe_decides_ready(cluster, tmp_path):
    claim(cluster.api, "probe-claim", tmp_path / "probe")
    probe = {"exec": {"command": ["test", "-f", "/data/ready"]}, "periodSeconds": 1}
    pod = python_pod(
        "probed",
        "import time; time.sleep(60)",
        restart="Always",
        mounts=[{"name": "data", "mountPath": "/data"}],
        volumes=[{"name": "data", "persistentVolumeClaim": {"claimName": "probe-claim"}}],
        readinessProbe=probe,
    )
    cluster.create_pod(pod)
    p = cluster.wait_pod("probed", lambda p: state_of(p) == "running")
    assert main_status(p)["ready"] is False
    (tmp_path / "probe" / "ready").write_text("")
    p = cluster.wait_pod("probed", lambda p: main_status(p).get("ready") is True)
    assert {c["type"]: c["status"] for c in p["status"]["conditions"]}["Ready"] == "True"
    cluster.api.delete_namespaced_pod("probed", NS, _preload_content=False)


def test_killed_process_restarts_under_on_failure(cluster):
    pod = python_pod("victim", "import time; print('up'); time.sleep(60)", restart="OnFailure")
    cluster.create_pod(pod)
    cluster.wait_pod("victim", lambda p: state_of(p) == "running")
    first = cluster.kubelet.kill_process(NS, "victim")
    assert first is not None
    p = cluster.wait_pod(
        "victim", lambda p: main_status(p).get("restartCount") == 1 and state_of(p) == "running"
    )
    last = main_status(p)["lastState"]["terminated"]
    assert (last["exitCode"], last["reason"]) == (137, "Error")
    assert cluster.kubelet.pid(NS, "victim") not in (None, first)
    assert gone(first)
    cluster.api.delete_namespaced_pod("victim", NS, _preload_content=False)


def test_fail_pod_evicts_and_never_restarts(cluster):
    cluster.create_pod(python_pod("evictee", "import time; time.sleep(60)", restart="Always"))
    cluster.wait_pod("evictee", lambda p: state_of(p) == "running")
    pid = cluster.kubelet.pid(NS, "evictee")
    cluster.kubelet.fail_pod(NS, "evictee")
    assert gone(pid) and cluster.kubelet.pid(NS, "evictee") is None
    p = cluster.wait_pod("evictee", lambda p: p["status"].get("phase") == "Failed")
    assert p["status"]["reason"] == "Evicted"
    assert p["status"]["message"] == "The node was low on resource: memory."
    assert main_status(p)["state"]["terminated"]["exitCode"] == 137
    time.sleep(1.0)  # longer than the back-off: still no restart
    p = cluster.pod("evictee")
    assert p["status"]["phase"] == "Failed" and main_status(p)["restartCount"] == 0
    assert cluster.kubelet.pid(NS, "evictee") is None


def test_deleting_the_pod_kills_its_process(cluster):
    code = "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(60)"
    pod = python_pod("stubborn", code, restart="Always")
    pod["spec"]["terminationGracePeriodSeconds"] = 1
    cluster.create_pod(pod)
    cluster.wait_pod("stubborn", lambda p: state_of(p) == "running")
    pid = cluster.kubelet.pid(NS, "stubborn")
    cluster.api.delete_namespaced_pod("stubborn", NS, _preload_content=False)
    cluster.kubelet.wait_for(lambda: gone(pid), timeout=5)  # SIGTERM ignored: SIGKILL after 1 s
    cluster.kubelet.wait_for(lambda: cluster.pod("stubborn") is None, timeout=5)


def test_pod_without_command_fails(cluster):
    pod = python_pod("no-command", "")
    del pod["spec"]["containers"][0]["command"]
    cluster.create_pod(pod)
    p = cluster.wait_pod("no-command", lambda p: p["status"].get("phase") == "Failed")
    assert p["status"]["reason"] == "NoCommand"
    assert main_status(p)["state"]["terminated"]["reason"] == "NoCommand"


def test_missing_program_is_a_start_error(cluster):
    pod = python_pod("no-program", "")
    pod["spec"]["containers"][0]["command"] = ["no-such-program", "--flag"]
    cluster.create_pod(pod)
    p = cluster.wait_pod("no-program", lambda p: p["status"].get("phase") == "Failed")
    terminated = main_status(p)["state"]["terminated"]
    assert (terminated["exitCode"], terminated["reason"]) == (128, "StartError")
    assert 'exec: "no-such-program": executable file not found in $PATH' in terminated["message"]


def test_pods_of_other_namespaces_are_left_alone(cluster):
    create_namespace(cluster.api, "elsewhere")
    cluster.create_pod(python_pod("foreign", "print('no')"), namespace="elsewhere")
    cluster.create_pod(python_pod("marker", "print('yes')"))
    cluster.wait_pod("marker", lambda p: p["status"].get("phase") == "Succeeded")
    time.sleep(0.3)
    foreign = cluster.pod("foreign", "elsewhere")
    assert (
        foreign["status"].get("phase") == "Pending" and "containerStatuses" not in foreign["status"]
    )
    assert cluster.kubelet.logs("elsewhere", "foreign") == ""


def test_watch_survives_a_server_restart(cluster):
    cluster.server.stop()  # every watch ends; requests are refused until it serves again
    time.sleep(0.5)
    cluster.server.start()
    cluster.create_pod(python_pod("after-restart", "print('back')"))
    cluster.wait_pod("after-restart", lambda p: p["status"].get("phase") == "Succeeded")
    assert cluster.kubelet.logs(NS, "after-restart") == "back\n"


def test_stop_leaves_no_processes(tmp_path):
    server, kubeconfig = start_server(tmp_path)
    client = new_client_from_config(config_file=str(kubeconfig))
    api = CoreV1Api(client)
    try:
        create_namespace(api, "other")
        kubelet = KubeletStandIn(kubeconfig, tmp_path / "kubelet", bin_dirs=[Path(PY).parent])
        with kubelet:  # all namespaces
            code = (
                "import subprocess, sys, time\n"
                "child = subprocess.Popen(['sleep', '60'])\n"
                "print(child.pid, flush=True)\n"
                "time.sleep(60)\n"
            )
            api.create_namespaced_pod("other", python_pod("parent", code), _preload_content=False)
            kubelet.wait_for(lambda: kubelet.logs("other", "parent").strip(), timeout=10)
            pids = [kubelet.pid("other", "parent"), int(kubelet.logs("other", "parent"))]
            assert not any(gone(pid) for pid in pids)
        assert all(gone(pid) for pid in pids)
        ours = {p.pid for p in psutil.Process().children(recursive=True)}
        assert not ours & set(pids)
    finally:
        client.close()
        server.stop()


def b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()
