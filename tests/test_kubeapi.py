"""The test Kubernetes API server (tests/kube/apiserver.py), through the clients that use it:
the official ``kubernetes`` client, kubectl 1.37 and (slow) a kopf operator in its own process.
Apart from what only the emulator has (set_pod_log, its own process, a tiny event log), each
check is one a real API server passes too."""

from __future__ import annotations

import contextlib
import copy
import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import kubernetes
import pytest
import yaml
from kubernetes.client.exceptions import ApiException

from tests.kube import apiserver
from tests.kube.apiserver import ApiServer

ROOT = Path(__file__).resolve().parents[1]
KUBECTL = Path(sys.executable).parent / "kubectl"
GROUP, VERSION = "alliance.dev", "v1alpha1"
MERGE = "application/merge-patch+json"
JSON_PATCH = "application/json-patch+json"
STRATEGIC = "application/strategic-merge-patch+json"


def load_yaml(path: Path) -> list[dict]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


def example(name: str, kind: str) -> dict:
    return next(d for d in load_yaml(ROOT / "examples" / name) if d["kind"] == kind)


def wait_for(predicate, timeout: float = 30.0, message: str = "condition"):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {message}")
        time.sleep(0.05)


# ---- fixtures


@pytest.fixture(scope="module")
def server():
    with ApiServer() as srv:
        yield srv


@pytest.fixture(scope="module")
def kubeconfig(server, tmp_path_factory) -> Path:
    return server.write_kubeconfig(tmp_path_factory.mktemp("kube") / "kubeconfig")


@pytest.fixture(scope="module")
def client(kubeconfig):
    api = kubernetes.config.new_client_from_config(config_file=str(kubeconfig))
    yield api
    api.close()


@pytest.fixture(scope="module")
def core(client):
    return kubernetes.client.CoreV1Api(client)


@pytest.fixture(scope="module")
def custom(client):
    return kubernetes.client.CustomObjectsApi(client)


@pytest.fixture(scope="module")
def kubectl(kubeconfig, tmp_path_factory):
    cache = tmp_path_factory.mktemp("kubectl-cache")

    def run(*args: str, stdin: str | None = None, check: bool = True):
        cmd = [str(KUBECTL), "--kubeconfig", str(kubeconfig), "--cache-dir", str(cache), *args]
        result = subprocess.run(cmd, input=stdin, capture_output=True, text=True, timeout=60)
        if check and result.returncode != 0:
            raise AssertionError(f"kubectl {' '.join(args)} failed:\n{result.stderr}")
        return result

    return run


@pytest.fixture(scope="module")
def crds(kubectl):
    kubectl("apply", "-f", str(ROOT / "crds"))
    return [
        doc["metadata"]["name"]
        for path in sorted((ROOT / "crds").glob("*.yaml"))
        for doc in load_yaml(path)
    ]


@pytest.fixture
def ns(core):
    """A fresh namespace per test, deleted afterwards."""
    name = f"t-{uuid.uuid4().hex[:8]}"
    core.create_namespace({"metadata": {"name": name}})
    yield name
    with contextlib.suppress(ApiException):
        core.delete_namespace(name)


def http(server: ApiServer, method: str, path: str, body=None, headers=None):
    """A raw request: (status, headers, parsed JSON body or text)."""
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(
        server.url + path,
        data=data,
        method=method,
        headers={"Content-Type": "application/json", **(headers or {})},
    )
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            status, headers_, raw = resp.status, resp.headers, resp.read()
    except urllib.error.HTTPError as e:
        status, headers_, raw = e.code, e.headers, e.read()
    try:
        return status, headers_, json.loads(raw)
    except ValueError:
        return status, headers_, raw.decode()


def status_of(exc: ApiException) -> dict:
    return json.loads(exc.body)


# ---- discovery


def test_discovery(server, crds):
    status, _, version = http(server, "GET", "/version")
    assert status == 200 and version["gitVersion"].startswith("v1.37.")
    assert (version["major"], version["minor"]) == ("1", "37")
    _, _, api = http(server, "GET", "/api")
    assert api["kind"] == "APIVersions" and api["versions"] == ["v1"]
    assert api["serverAddressByClientCIDRs"]
    _, _, core_v1 = http(server, "GET", "/api/v1")
    assert core_v1["kind"] == "APIResourceList" and core_v1["groupVersion"] == "v1"
    by_name = {r["name"]: r for r in core_v1["resources"]}
    assert by_name["pods"]["kind"] == "Pod" and by_name["pods"]["singularName"] == "pod"
    assert by_name["pods"]["shortNames"] == ["po"] and by_name["pods"]["namespaced"]
    assert not by_name["namespaces"]["namespaced"]
    assert {"pods/status", "pods/log", "persistentvolumeclaims/status"} <= by_name.keys()
    assert by_name["configmaps"]["shortNames"] == ["cm"]
    assert "watch" in by_name["secrets"]["verbs"]
    # Aggregated discovery is not served: the legacy document comes back, as kubectl expects.
    aggregated = (
        "application/json;g=apidiscovery.k8s.io;v=v2;as=APIGroupDiscoveryList,application/json"
    )
    _, headers, groups = http(server, "GET", "/apis", headers={"Accept": aggregated})
    assert headers["Content-Type"].startswith("application/json")
    assert groups["kind"] == "APIGroupList"
    names = {g["name"]: g for g in groups["groups"]}
    assert {
        "apps",
        "batch",
        "rbac.authorization.k8s.io",
        "apiextensions.k8s.io",
        GROUP,
    } <= names.keys()
    assert names[GROUP]["preferredVersion"]["groupVersion"] == f"{GROUP}/{VERSION}"
    _, _, group = http(server, "GET", f"/apis/{GROUP}")
    assert group["kind"] == "APIGroup"
    _, _, resources = http(server, "GET", f"/apis/{GROUP}/{VERSION}")
    alliance = next(r for r in resources["resources"] if r["name"] == "alliances")
    assert alliance["kind"] == "Alliance" and alliance["singularName"] == "alliance"
    assert alliance["shortNames"] == ["aln"] and alliance["categories"] == ["alliance-all"]
    assert "alliances/status" in {r["name"] for r in resources["resources"]}
    assert http(server, "GET", "/apis/nothing.dev/v1")[0] == 404


# ---- objects, verbs and errors


def test_create_get_list_replace_delete(core, ns):
    cm = core.create_namespaced_config_map(ns, {"metadata": {"name": "one"}, "data": {"a": "1"}})
    meta = cm.metadata
    assert uuid.UUID(meta.uid) and int(meta.resource_version) > 0
    assert meta.generation is None  # ConfigMaps have none (custom resources do: see below)
    assert meta.namespace == ns and cm.kind == "ConfigMap" and cm.api_version == "v1"
    assert meta.creation_timestamp.tzinfo is not None
    got = core.read_namespaced_config_map("one", ns)
    assert got.data == {"a": "1"} and got.metadata.uid == meta.uid
    listed = core.list_namespaced_config_map(ns, _preload_content=False)
    body = json.loads(listed.data)
    assert body["kind"] == "ConfigMapList" and body["apiVersion"] == "v1"
    assert int(body["metadata"]["resourceVersion"]) >= int(meta.resource_version)
    assert [i["kind"] for i in body["items"]] == ["ConfigMap"]
    assert "one" in [c.metadata.name for c in core.list_config_map_for_all_namespaces().items]

    got.data = {"a": "2"}
    replaced = core.replace_namespaced_config_map("one", ns, got)
    assert int(replaced.metadata.resource_version) > int(meta.resource_version)
    assert replaced.metadata.uid == meta.uid
    got.data = {"a": "3"}  # got carries the old resourceVersion: a conflict
    with pytest.raises(ApiException) as err:
        core.replace_namespaced_config_map("one", ns, got)
    assert err.value.status == 409 and status_of(err.value)["reason"] == "Conflict"

    with pytest.raises(ApiException) as err:
        core.create_namespaced_config_map(ns, {"metadata": {"name": "one"}})
    status = status_of(err.value)
    assert err.value.status == 409 and status["reason"] == "AlreadyExists"
    assert status["kind"] == "Status" and status["message"] == 'configmaps "one" already exists'

    core.delete_namespaced_config_map("one", ns)
    with pytest.raises(ApiException) as err:
        core.read_namespaced_config_map("one", ns)
    status = status_of(err.value)
    assert err.value.status == 404 and status["reason"] == "NotFound"
    assert status["message"] == 'configmaps "one" not found'
    assert status["details"] == {"name": "one", "kind": "configmaps"}


def test_namespaces_and_names(core, ns):
    with pytest.raises(ApiException) as err:
        core.create_namespaced_secret("nowhere", {"metadata": {"name": "s"}})
    assert err.value.status == 404
    assert status_of(err.value)["message"] == 'namespaces "nowhere" not found'
    with pytest.raises(ApiException) as err:
        core.create_namespaced_secret(ns, {"metadata": {"name": "s", "namespace": "default"}})
    assert err.value.status == 400 and status_of(err.value)["reason"] == "BadRequest"
    with pytest.raises(ApiException) as err:
        core.create_namespaced_secret(ns, {"metadata": {"name": "Bad_Name"}})
    assert err.value.status == 422 and "metadata.name" in status_of(err.value)["message"]
    made = core.create_namespaced_secret(
        ns, {"metadata": {"generateName": "gen-"}, "stringData": {"k": "v"}}
    )
    assert made.metadata.name.startswith("gen-") and len(made.metadata.name) == 9
    assert made.data == {"k": "dg=="} and made.type == "Opaque"  # stringData lands in data
    assert {"default", "kube-system", "kube-public"} <= {
        n.metadata.name for n in core.list_namespace().items
    }
    with pytest.raises(ApiException) as err:
        core.delete_namespace("default")
    assert err.value.status == 403


def test_patch_types(core, ns):
    core.create_namespaced_pod(
        ns,
        {
            "metadata": {"name": "p", "labels": {"a": "1"}},
            "spec": {
                "containers": [
                    {"name": "c", "image": "busybox", "env": [{"name": "X", "value": "1"}]}
                ]
            },
        },
    )
    patched = core.patch_namespaced_pod(
        "p", ns, {"metadata": {"labels": {"a": None, "b": "2"}}}, _content_type=MERGE
    )
    assert patched.metadata.labels == {"b": "2"}
    # Strategic merge: containers and env merge by name; directives are not stored.
    smp = {
        "spec": {
            "$setElementOrder/containers": [{"name": "c"}],
            "containers": [{"name": "c", "env": [{"name": "Y", "value": "2"}]}],
        }
    }
    patched = core.patch_namespaced_pod("p", ns, smp, _content_type=STRATEGIC)
    container = patched.spec.containers[0]
    assert container.image == "busybox" and [e.name for e in container.env] == ["X", "Y"]
    patched = core.patch_namespaced_pod(
        "p", ns, {"metadata": {"finalizers": ["x/y"]}}, _content_type=STRATEGIC
    )
    assert patched.metadata.finalizers == ["x/y"]
    rv = patched.metadata.resource_version
    ops = [
        {"op": "test", "path": "/metadata/resourceVersion", "value": rv},
        {"op": "remove", "path": "/metadata/finalizers/0"},
        {"op": "add", "path": "/metadata/labels/c", "value": "3"},
    ]
    patched = core.patch_namespaced_pod("p", ns, ops, _content_type=JSON_PATCH)
    assert patched.metadata.labels == {"b": "2", "c": "3"} and not patched.metadata.finalizers
    for bad in (
        [{"op": "test", "path": "/metadata/resourceVersion", "value": rv}],
        [{"op": "replace", "path": "/metadata/nothing/here", "value": 1}],
        [{"op": "remove", "path": "/spec/containers/5"}],
    ):
        with pytest.raises(ApiException) as err:
            core.patch_namespaced_pod("p", ns, bad, _content_type=JSON_PATCH)
        assert err.value.status == 422 and status_of(err.value)["kind"] == "Status"
    # A merge patch naming an old resourceVersion is a conflict (optimistic concurrency).
    with pytest.raises(ApiException) as err:
        core.patch_namespaced_pod(
            "p", ns, {"metadata": {"resourceVersion": rv, "labels": {}}}, _content_type=MERGE
        )
    assert err.value.status == 409
    with pytest.raises(ApiException) as err:
        core.patch_namespaced_pod(
            "p", ns, {"metadata": {}}, _content_type="application/apply-patch+yaml"
        )
    assert err.value.status == 415
    with pytest.raises(ApiException) as err:
        core.patch_namespaced_pod("missing", ns, {"metadata": {}}, _content_type=MERGE)
    assert err.value.status == 404


def test_pod_status_defaults_and_logs(server, core, ns):
    pod = core.create_namespaced_pod(
        ns,
        {
            "metadata": {"name": "p"},
            "spec": {"containers": [{"name": "c", "image": "busybox"}]},
            "status": {"phase": "Running"},
        },
    )
    assert pod.status.phase == "Pending"  # creating never sets a pod's status
    assert pod.spec.restart_policy == "Always" and pod.spec.containers[0].image_pull_policy
    status = {
        "metadata": {"uid": pod.metadata.uid},
        "status": {"phase": "Running", "podIP": "127.0.0.1"},
        "spec": {"nodeName": "ignored"},
    }
    running = core.patch_namespaced_pod_status("p", ns, status, _content_type=MERGE)
    assert running.status.phase == "Running" and running.spec.node_name is None
    assert running.metadata.generation == pod.metadata.generation
    assert [
        p.metadata.name
        for p in core.list_namespaced_pod(ns, field_selector="status.phase=Running").items
    ] == ["p"]
    assert core.read_namespaced_pod_log("p", ns) == ""
    server.set_pod_log(ns, "p", "one\ntwo\n")
    server.set_pod_log(ns, "p", "three\n", append=True)
    assert core.read_namespaced_pod_log("p", ns) == "one\ntwo\nthree\n"
    assert core.read_namespaced_pod_log("p", ns, tail_lines=1) == "three\n"
    core.create_namespaced_pod_binding(
        "p",
        ns,
        {"metadata": {"name": "p"}, "target": {"kind": "Node", "name": "node-1"}},
        _preload_content=False,
    )
    assert core.read_namespaced_pod("p", ns).spec.node_name == "node-1"
    core.delete_namespaced_pod("p", ns)  # pods go at once
    with pytest.raises(ApiException):
        core.read_namespaced_pod("p", ns)


def test_custom_resource_status_and_generation(custom, crds, ns):
    run = copy.deepcopy(example("trainingrun.yaml", "TrainingRun"))
    run["status"] = {"phase": "Running"}
    made = custom.create_namespaced_custom_object(GROUP, VERSION, ns, "trainingruns", run)
    assert "status" not in made and made["metadata"]["generation"] == 1
    args = (GROUP, VERSION, ns, "trainingruns", "mnist-fedavg")
    status = custom.patch_namespaced_custom_object_status(
        *args, {"status": {"phase": "Running", "round": 2, "accuracy": 0.9}}
    )
    assert status["status"]["round"] == 2 and status["metadata"]["generation"] == 1
    assert int(status["metadata"]["resourceVersion"]) > int(made["metadata"]["resourceVersion"])
    # The main resource ignores status; the status subresource ignores everything else.
    spec = custom.patch_namespaced_custom_object(
        *args, {"spec": {"rounds": 5}, "status": {"round": 9}}
    )
    assert spec["spec"]["rounds"] == 5 and spec["status"]["round"] == 2
    assert spec["metadata"]["generation"] == 2
    status = custom.patch_namespaced_custom_object_status(
        *args, {"spec": {"rounds": 7}, "status": {"round": 3}}
    )
    assert status["spec"]["rounds"] == 5 and status["status"]["round"] == 3
    assert status["metadata"]["generation"] == 2
    # A metadata-only change does not count as a new generation; a no-op changes nothing.
    labelled = custom.patch_namespaced_custom_object(*args, {"metadata": {"labels": {"x": "y"}}})
    assert labelled["metadata"]["generation"] == 2
    again = custom.patch_namespaced_custom_object(*args, {"metadata": {"labels": {"x": "y"}}})
    assert again["metadata"]["resourceVersion"] == labelled["metadata"]["resourceVersion"]
    # PUT of status with a stale resourceVersion conflicts; with the current one it works.
    current = custom.get_namespaced_custom_object(*args)
    current["status"]["phase"] = "Completed"
    replaced = custom.replace_namespaced_custom_object_status(*args, current)
    assert replaced["status"]["phase"] == "Completed"
    with pytest.raises(ApiException) as err:
        custom.replace_namespaced_custom_object_status(*args, current)
    assert err.value.status == 409
    with pytest.raises(ApiException) as err:
        custom.patch_namespaced_custom_object(*args, {"spec": {}}, _content_type=STRATEGIC)
    assert err.value.status == 415  # custom resources have no strategic merge patch


def test_crd_defaults_pruning_and_validation(server, custom, crds, ns):
    alliance = {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "Alliance",
        "metadata": {"name": "a"},
        "spec": {
            "store": {
                "endpoint": "http://minio:9000",
                "bucket": "alliance",
                "credentialsSecret": {"name": "creds"},
                "extra": 1,
            },
            "unknown": {"x": 1},
        },
    }
    made = custom.create_namespaced_custom_object(GROUP, VERSION, ns, "alliances", alliance)
    spec = made["spec"]
    assert spec["model"] == {"builtin": "cnn"} and spec["seed"] == 0  # schema defaults
    assert spec["store"]["credentialsSecret"] == {
        "name": "creds",
        "accessKeyKey": "accessKey",
        "secretKeyKey": "secretKey",
    }
    assert "unknown" not in spec and "extra" not in spec["store"]  # pruned
    member = copy.deepcopy(example("member.yaml", "Member"))
    member["spec"]["dataSchema"] = {"numClasses": 3}
    made = custom.create_namespaced_custom_object(GROUP, VERSION, ns, "members", member)
    assert made["spec"]["dataSchema"]["featureShape"] == [28, 28, 1]  # defaults inside
    assert made["spec"]["dataSchema"]["numClasses"] == 3

    def invalid(kind: str, body: dict) -> str:
        with pytest.raises(ApiException) as err:
            custom.create_namespaced_custom_object(GROUP, VERSION, ns, kind, body)
        status = status_of(err.value)
        assert err.value.status == 422 and status["reason"] == "Invalid", status
        return status["message"]

    bad = copy.deepcopy(alliance)
    bad["metadata"]["name"] = "b"
    bad["spec"]["model"] = {"builtin": "resnet"}
    assert 'spec.model.builtin: Unsupported value: "resnet"' in invalid("alliances", bad)
    del bad["spec"]["store"]
    assert "spec.store: Required value" in invalid("alliances", bad)
    run = copy.deepcopy(example("trainingrun.yaml", "TrainingRun"))
    run["spec"]["rounds"] = 0
    message = invalid("trainingruns", run)
    assert message.startswith('TrainingRun.alliance.dev "mnist-fedavg" is invalid: spec.rounds')
    assert "greater than or equal to 1" in message
    # fieldValidation=Strict rejects unknown fields, as a real server does (kubectl sends it).
    path = f"/apis/{GROUP}/{VERSION}/namespaces/{ns}/alliances?fieldValidation=Strict"
    alliance["metadata"]["name"] = "strict"
    status, _, body = http(server, "POST", path, alliance)
    assert status == 400 and 'unknown field "spec.store.extra"' in body["message"]
    status, headers, _ = http(server, "POST", path.replace("Strict", "Warn"), alliance)
    assert status == 201 and "unknown field" in headers["Warning"]


def test_cel_rules_int64_and_int32_bounds_as_a_real_server(custom, crds, ns):
    """What a v1.32 API server refused and this one accepted before: CEL rules on create and
    update, integers beyond int64, int32 fields past their maximum."""

    def refused(call, *args) -> str:
        with pytest.raises(ApiException) as err:
            call(GROUP, VERSION, ns, *args)
        assert err.value.status == 422, err.value.body
        return status_of(err.value)["message"]

    run = copy.deepcopy(example("trainingrun.yaml", "TrainingRun"))
    run["spec"].update(membersPerRound=2, minMembers=3)
    message = refused(custom.create_namespaced_custom_object, "trainingruns", run)
    assert 'spec: Invalid value: "object": spec.minMembers must not be more than' in message
    run["spec"].update(membersPerRound=3)
    custom.create_namespaced_custom_object(GROUP, VERSION, ns, "trainingruns", run)
    name = run["metadata"]["name"]
    patch = {"spec": {"membersPerRound": 1}}
    message = refused(custom.patch_namespaced_custom_object, "trainingruns", name, patch)
    assert "spec.minMembers must not be more than spec.membersPerRound" in message
    patch = {"spec": {"rounds": 2147483648}}
    message = refused(custom.patch_namespaced_custom_object, "trainingruns", name, patch)
    assert "spec.rounds: Invalid value: 2147483648: spec.rounds in body should be less" in message
    patch = {"spec": {"rounds": 2**64}}
    message = refused(custom.patch_namespaced_custom_object, "trainingruns", name, patch)
    assert 'spec.rounds in body must be of type integer: "number"' in message
    member = copy.deepcopy(example("member.yaml", "Member"))
    member["spec"]["dataSchema"] = {"minValue": 256}
    message = refused(custom.create_namespaced_custom_object, "members", member)
    assert "dataSchema.minValue must not be greater than dataSchema.maxValue" in message
    member["spec"]["dataSchema"] = {"minValue": -1, "maxValue": 1}  # integers in number fields
    custom.create_namespaced_custom_object(GROUP, VERSION, ns, "members", member)


def test_crds_the_real_server_refuses_are_refused(client, kubectl):
    ext = kubernetes.client.ApiextensionsV1Api(client)
    crd = load_yaml(ROOT / "crds" / "alliance.dev_members.yaml")[0]
    crd["metadata"]["name"] = "members.refused.dev"
    crd["spec"]["group"] = "refused.dev"
    schema = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    schema["properties"]["metadata"]["description"] = "Standard object metadata."
    data_schema = schema["properties"]["spec"]["properties"]["dataSchema"]["properties"]
    data_schema["maxValue"]["maximum"] = 3.4028234663852886e38
    with pytest.raises(ApiException) as err:
        ext.create_custom_resource_definition(crd)
    message = status_of(err.value)["message"]
    assert err.value.status == 422
    assert (
        "spec.validation.openAPIV3Schema.properties[metadata]: Forbidden: must not specify "
        "anything other than name and generateName, but metadata is implicitly specified"
    ) in message
    assert (
        "properties[maxValue].default: Invalid value: 255: in body should be less than or "
        "equal to -9223372036854775808"
    ) in message
    # kubectl shows the same, and the CRDs this project ships are accepted.
    result = kubectl("apply", "-f", "-", stdin=json.dumps(crd), check=False)
    assert result.returncode != 0 and "must not specify anything other than name" in result.stderr
    assert kubectl("apply", "--dry-run=server", "-f", str(ROOT / "crds")).returncode == 0


def test_size_limits_as_a_real_server(server, core, ns):
    def post_config_map(data: dict, annotations: dict | None = None):
        body = {"metadata": {"name": f"cm-{uuid.uuid4().hex[:6]}", "annotations": annotations}}
        return http(server, "POST", f"/api/v1/namespaces/{ns}/configmaps", {**body, "data": data})

    status, _, body = post_config_map({"k": "x" * (3 * 2**20)})
    assert (status, body["reason"]) == (413, "RequestEntityTooLarge")
    assert body["message"] == "Request entity too large: limit is 3145728"
    status, _, body = post_config_map({"k": "x" * (2 * 2**20)})  # fits the request, not etcd
    assert (status, body["message"]) == (500, "etcdserver: request is too large")
    status, _, body = post_config_map({}, {"a": "x" * (256 * 2**10)})
    assert (status, body["reason"]) == (422, "Invalid")
    assert "metadata.annotations: Too long: may not be more than 262144 bytes" in body["message"]
    status, _, _ = post_config_map({"k": "x" * 2**20}, {"a": "x" * (256 * 2**10 - 1)})
    assert status == 201


def test_finalizers(custom, crds, ns):
    member = copy.deepcopy(example("member.yaml", "Member"))
    member["metadata"]["finalizers"] = ["test/finalizer"]
    custom.create_namespaced_custom_object(GROUP, VERSION, ns, "members", member)
    args = (GROUP, VERSION, ns, "members", "hospital-a")
    deleting = custom.delete_namespaced_custom_object(*args)
    assert deleting["metadata"]["deletionTimestamp"]
    assert deleting["metadata"]["deletionGracePeriodSeconds"] == 0
    current = custom.get_namespaced_custom_object(*args)  # still there
    assert current["metadata"]["generation"] == 2
    with pytest.raises(ApiException) as err:
        custom.patch_namespaced_custom_object(
            *args, {"metadata": {"finalizers": ["test/finalizer", "another/one"]}}
        )
    assert err.value.status == 422 and "no new finalizers" in status_of(err.value)["message"]
    custom.patch_namespaced_custom_object(*args, {"metadata": {"finalizers": None}})
    with pytest.raises(ApiException) as err:
        custom.get_namespaced_custom_object(*args)
    assert err.value.status == 404


def test_garbage_collection(core, custom, crds, ns):
    def owned_by(owner, name: str, finalizers=None) -> dict:
        ref = {
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "name": owner.metadata.name,
            "uid": owner.metadata.uid,
            "controller": True,
            "blockOwnerDeletion": True,
        }
        return {"metadata": {"name": name, "ownerReferences": [ref], "finalizers": finalizers}}

    owner = core.create_namespaced_config_map(ns, {"metadata": {"name": "owner"}})
    core.create_namespaced_secret(ns, owned_by(owner, "child"))
    grandchild_owner = core.create_namespaced_config_map(ns, owned_by(owner, "middle"))
    core.create_namespaced_config_map(ns, owned_by(grandchild_owner, "grandchild"))
    core.create_namespaced_config_map(ns, owned_by(owner, "held", ["test/hold"]))
    core.delete_namespaced_config_map("owner", ns)
    names = lambda: {c.metadata.name for c in core.list_namespaced_config_map(ns).items}  # noqa: E731
    wait_for(lambda: names() == {"held"}, message="dependents to go")
    assert core.read_namespaced_config_map("held", ns).metadata.deletion_timestamp
    assert not core.list_namespaced_secret(ns, field_selector="metadata.name=child").items
    core.patch_namespaced_config_map(
        "held", ns, {"metadata": {"finalizers": None}}, _content_type=MERGE
    )
    wait_for(lambda: not names(), message="the held dependent to go")

    owner = core.create_namespaced_config_map(ns, {"metadata": {"name": "owner"}})
    core.create_namespaced_config_map(ns, owned_by(owner, "orphan"))
    core.delete_namespaced_config_map("owner", ns, propagation_policy="Orphan")
    time.sleep(0.2)
    assert not core.read_namespaced_config_map("orphan", ns).metadata.owner_references

    owner = core.create_namespaced_config_map(ns, {"metadata": {"name": "owner"}})
    core.create_namespaced_config_map(ns, owned_by(owner, "slow", ["test/hold"]))
    core.delete_namespaced_config_map("owner", ns, propagation_policy="Foreground")
    marked = core.read_namespaced_config_map("owner", ns)  # waits for its dependents
    assert "foregroundDeletion" in marked.metadata.finalizers
    core.patch_namespaced_config_map(
        "slow", ns, {"metadata": {"finalizers": None}}, _content_type=MERGE
    )
    wait_for(lambda: names() == {"orphan"}, message="the foreground deletion")


def test_namespace_deletion(core, custom, crds):
    core.create_namespace({"metadata": {"name": "doomed"}})
    core.create_namespaced_config_map("doomed", {"metadata": {"name": "c"}})
    member = copy.deepcopy(example("member.yaml", "Member"))
    member["metadata"]["finalizers"] = ["test/finalizer"]
    custom.create_namespaced_custom_object(GROUP, VERSION, "doomed", "members", member)
    core.delete_namespace("doomed")
    assert core.read_namespace("doomed").status.phase == "Terminating"
    wait_for(lambda: not core.list_namespaced_config_map("doomed").items, message="content")
    with pytest.raises(ApiException) as err:
        core.create_namespaced_config_map("doomed", {"metadata": {"name": "late"}})
    assert err.value.status == 403
    args = (GROUP, VERSION, "doomed", "members", "hospital-a")
    assert custom.get_namespaced_custom_object(*args)["metadata"]["deletionTimestamp"]
    custom.patch_namespaced_custom_object(*args, {"metadata": {"finalizers": []}})
    wait_for(
        lambda: "doomed" not in {n.metadata.name for n in core.list_namespace().items},
        message="the namespace to go",
    )


def test_selectors(core, ns):
    for name, labels in (("a", {"app": "x", "tier": "web"}), ("b", {"app": "y"}), ("c", {})):
        core.create_namespaced_config_map(ns, {"metadata": {"name": name, "labels": labels}})

    def select(labels: str = "", fields: str = "") -> list[str]:
        items = core.list_namespaced_config_map(ns, label_selector=labels, field_selector=fields)
        return [c.metadata.name for c in items.items if c.metadata.name != "kube-root-ca.crt"]

    assert select("app=x") == select("app==x") == ["a"]
    assert select("app!=x") == ["b", "c"]
    assert select("app in (x, y)") == ["a", "b"]
    assert select("app notin (x)") == ["b", "c"]
    assert select("app") == ["a", "b"] and select("!app") == ["c"]
    assert select("app,tier=web") == ["a"]
    assert select(fields="metadata.name=b") == ["b"]
    assert select(fields="metadata.name!=b,metadata.namespace=" + ns) == ["a", "c"]
    first = core.list_namespaced_config_map(ns, label_selector="app", limit=1)  # pages
    assert [c.metadata.name for c in first.items] == ["a"] and first.metadata._continue
    rest = core.list_namespaced_config_map(
        ns, label_selector="app", limit=1, _continue=first.metadata._continue
    )
    assert [c.metadata.name for c in rest.items] == ["b"] and not rest.metadata._continue
    core.delete_collection_namespaced_config_map(ns, label_selector="app")
    assert select() == ["c"]
    with pytest.raises(ApiException) as err:
        select(fields="data.a=1")
    assert err.value.status == 400
    with pytest.raises(ApiException) as err:
        select("a in (")
    assert err.value.status == 400


def test_watch_replays_and_streams(core, ns):
    first = core.create_namespaced_config_map(ns, {"metadata": {"name": "w1"}})
    rv = first.metadata.resource_version
    core.patch_namespaced_config_map("w1", ns, {"data": {"a": "1"}}, _content_type=MERGE)
    core.create_namespaced_config_map(ns, {"metadata": {"name": "w2", "labels": {"k": "v"}}})
    core.delete_namespaced_config_map("w1", ns)
    watch = kubernetes.watch.Watch()
    events = [
        (e["type"], e["object"].metadata.name, e["object"].metadata.resource_version)
        for e in watch.stream(
            core.list_namespaced_config_map, ns, resource_version=rv, timeout_seconds=1
        )
    ]
    assert [(t, n) for t, n, _ in events] == [
        ("MODIFIED", "w1"),
        ("ADDED", "w2"),
        ("DELETED", "w1"),
    ]
    rvs = [int(r) for _, _, r in events]
    assert rvs == sorted(rvs) and rvs[0] > int(rv)
    # Without a resourceVersion: the current objects first, as ADDED.
    started = time.monotonic()
    initial = [
        (e["type"], e["object"].metadata.name)
        for e in watch.stream(core.list_namespaced_config_map, ns, timeout_seconds=1)
    ]
    assert ("ADDED", "w2") in initial and ("ADDED", "w1") not in initial
    assert 0.9 < time.monotonic() - started < 5  # timeoutSeconds ends the stream

    # Live, with a label selector: objects entering and leaving it arrive as ADDED / DELETED.
    seen: list[tuple[str, str]] = []

    def collect():
        for e in watch.stream(
            core.list_namespaced_config_map,
            ns,
            label_selector="k=v",
            resource_version=core.list_namespaced_config_map(ns).metadata.resource_version,
            timeout_seconds=2,
        ):
            seen.append((e["type"], e["object"].metadata.name))

    thread = threading.Thread(target=collect)
    thread.start()
    time.sleep(0.3)
    core.create_namespaced_config_map(ns, {"metadata": {"name": "w3"}})
    core.patch_namespaced_config_map(
        "w3", ns, {"metadata": {"labels": {"k": "v"}}}, _content_type=MERGE
    )
    core.patch_namespaced_config_map("w3", ns, {"data": {"x": "1"}}, _content_type=MERGE)
    core.patch_namespaced_config_map(
        "w3", ns, {"metadata": {"labels": {"k": "z"}}}, _content_type=MERGE
    )
    thread.join()
    assert seen == [("ADDED", "w3"), ("MODIFIED", "w3"), ("DELETED", "w3")]


def test_watch_gone_and_bookmarks(monkeypatch, tmp_path):
    monkeypatch.setattr(apiserver, "EVENT_LOG_SIZE", 5)
    monkeypatch.setattr(apiserver, "BOOKMARK_SECONDS", 0.2)
    with ApiServer() as srv:
        api = kubernetes.config.new_client_from_config(
            config_file=str(srv.write_kubeconfig(tmp_path / "kc"))
        )
        core = kubernetes.client.CoreV1Api(api)
        rv = core.create_namespaced_config_map(
            "default", {"metadata": {"name": "x"}}
        ).metadata.resource_version
        for i in range(6):
            core.patch_namespaced_config_map(
                "x", "default", {"data": {"i": str(i)}}, _content_type=MERGE
            )
        with pytest.raises(ApiException) as err:
            list(
                kubernetes.watch.Watch().stream(
                    core.list_namespaced_config_map,
                    "default",
                    resource_version=rv,
                    timeout_seconds=2,
                )
            )
        assert err.value.status == 410
        url = (
            "/api/v1/namespaces/default/configmaps?watch=1&allowWatchBookmarks=true&"
            f"timeoutSeconds=1&resourceVersion={rv}"
        )
        with urllib.request.urlopen(srv.url + url, timeout=5) as resp:
            lines = [json.loads(line) for line in resp]
        assert lines[0]["type"] == "ERROR" and lines[0]["object"]["code"] == 410
        current = core.list_namespaced_config_map("default").metadata.resource_version
        with urllib.request.urlopen(srv.url + url.replace(rv, current), timeout=5) as resp:
            lines = [json.loads(line) for line in resp]
        assert lines and {e["type"] for e in lines} == {"BOOKMARK"}
        assert lines[-1]["object"]["metadata"]["resourceVersion"] == current
        api.close()


def test_crd_lifecycle(server, core, client, custom, ns):
    ext = kubernetes.client.ApiextensionsV1Api(client)
    crd = {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": "widgets.test.dev"},
        "spec": {
            "group": "test.dev",
            "scope": "Namespaced",
            "names": {"plural": "widgets", "singular": "widget", "kind": "Widget"},
            "versions": [
                {
                    "name": "v1",
                    "served": True,
                    "storage": True,
                    "schema": {
                        "openAPIV3Schema": {
                            "type": "object",
                            "properties": {
                                "spec": {
                                    "type": "object",
                                    "x-kubernetes-preserve-unknown-fields": True,
                                    "properties": {"size": {"type": "integer", "default": 1}},
                                }
                            },
                        }
                    },
                }
            ],
        },
    }
    ext.create_custom_resource_definition(crd)

    def established():
        made = ext.read_custom_resource_definition("widgets.test.dev")
        conditions = {c.type: c.status for c in made.status.conditions or []}
        return made if conditions.get("Established") == "True" else None

    made = wait_for(established, message="the CRD to be established")
    assert {c.type: c.status for c in made.status.conditions}["NamesAccepted"] == "True"
    assert made.status.accepted_names.kind == "Widget" and made.status.stored_versions == ["v1"]
    assert made.metadata.finalizers == ["customresourcecleanup.apiextensions.k8s.io"]
    widget = custom.create_namespaced_custom_object(
        "test.dev",
        "v1",
        ns,
        "widgets",
        {
            "apiVersion": "test.dev/v1",
            "kind": "Widget",
            "metadata": {"name": "w"},
            "spec": {"free": "form"},
        },
    )
    assert widget["spec"] == {"free": "form", "size": 1}  # preserved unknown fields, defaults
    listed = custom.list_cluster_custom_object("test.dev", "v1", "widgets")
    assert listed["kind"] == "WidgetList" and listed["items"][0]["kind"] == "Widget"
    with pytest.raises(ApiException) as err:
        bad = copy.deepcopy(crd)
        bad["metadata"]["name"] = "gadgets.test.dev"
        ext.create_custom_resource_definition(bad)
    assert err.value.status == 422
    ext.delete_custom_resource_definition("widgets.test.dev")
    wait_for(lambda: http(server, "GET", "/apis/test.dev/v1")[0] == 404, message="unserving")
    with pytest.raises(ApiException) as err:
        custom.list_cluster_custom_object("test.dev", "v1", "widgets")
    assert err.value.status == 404
    ext.create_custom_resource_definition(crd)  # the objects went with the CRD
    assert custom.list_cluster_custom_object("test.dev", "v1", "widgets")["items"] == []
    ext.delete_custom_resource_definition("widgets.test.dev")


def test_tables(server, core, ns, crds, custom):
    core.create_namespaced_pod(
        ns, {"metadata": {"name": "p"}, "spec": {"containers": [{"name": "c", "image": "x"}]}}
    )
    accept = {"Accept": "application/json;as=Table;v=v1;g=meta.k8s.io,application/json"}
    _, _, table = http(server, "GET", f"/api/v1/namespaces/{ns}/pods", headers=accept)
    assert table["kind"] == "Table" and table["apiVersion"] == "meta.k8s.io/v1"
    names = [c["name"] for c in table["columnDefinitions"] if c["priority"] == 0]
    assert names == ["Name", "Ready", "Status", "Restarts", "Age"]
    assert table["rows"][0]["cells"][:4] == ["p", "0/1", "Pending", "0"]
    assert table["rows"][0]["object"]["kind"] == "PartialObjectMetadata"
    run = example("trainingrun.yaml", "TrainingRun")
    custom.create_namespaced_custom_object(GROUP, VERSION, ns, "trainingruns", run)
    custom.patch_namespaced_custom_object_status(
        GROUP, VERSION, ns, "trainingruns", "mnist-fedavg", {"status": {"round": 1}}
    )
    path = f"/apis/{GROUP}/{VERSION}/namespaces/{ns}/trainingruns/mnist-fedavg"
    _, _, table = http(server, "GET", path + "?includeObject=Object", headers=accept)
    assert [c["name"] for c in table["columnDefinitions"]] == [
        "Name",
        "Phase",
        "Round",
        "Accuracy",
        "Age",
    ]
    cells = table["rows"][0]["cells"]
    assert cells[:4] == ["mnist-fedavg", None, 1, None] and cells[4].endswith("s")
    assert table["rows"][0]["object"]["kind"] == "TrainingRun"


def test_kubectl(kubectl, crds, core, custom):
    ns = f"k-{uuid.uuid4().hex[:6]}"
    examples = ROOT / "examples"

    def run(*args: str, **kwargs) -> str:
        return kubectl("-n", ns, *args, **kwargs).stdout

    kubectl("create", "namespace", ns)  # kubectl's typed clients send protobuf
    run("create", "secret", "generic", "alliance-minio", "--from-literal=accessKey=ak")
    assert core.read_namespaced_secret("alliance-minio", ns).data["accessKey"] == "YWs="
    assert kubectl("apply", "-f", str(ROOT / "crds")).stdout.count("unchanged") == 3
    assert "alliance.alliance.dev/mnist created" in run(
        "apply", "-f", str(examples / "alliance.yaml")
    )
    run("apply", "-f", str(examples / "member.yaml"))
    run("apply", "-f", str(examples / "trainingrun.yaml"))
    lines = run("get", "alliances").splitlines()
    assert lines[0].split() == ["NAME", "STORE", "MODEL", "READY", "AGE"]
    assert lines[1].split()[:3] == ["mnist", "http://alliance-minio:9000", "cnn"]
    assert "KERAS OBJECT" in run("get", "aln", "-o", "wide")

    # A second apply of a changed file updates the object (a three-way merge patch).
    changed = (examples / "alliance.yaml").read_text().replace("seed: 0 ", "seed: 42 ")
    assert "configured" in run("apply", "-f", "-", stdin=changed)
    alliance = custom.get_namespaced_custom_object(GROUP, VERSION, ns, "alliances", "mnist")
    assert alliance["spec"]["seed"] == 42

    status = '{"status": {"phase": "Running", "round": 2, "accuracy": 0.93}}'
    run("patch", "tr", "mnist-fedavg", "--subresource=status", "--type=merge", "-p", status)
    lines = run("get", "trainingruns").splitlines()
    assert lines[0].split() == ["NAME", "PHASE", "ROUND", "ACCURACY", "AGE"]
    assert lines[1].split()[:4] == ["mnist-fedavg", "Running", "2", "0.93"]
    everything = run("get", "alliance-all")
    for name in (
        "alliance.alliance.dev/mnist",
        "member.alliance.dev/hospital-a",
        "trainingrun.alliance.dev/mnist-fedavg",
    ):
        assert name in everything
    listed = json.loads(run("get", "members", "-o", "json"))
    assert listed["kind"] == "List" and listed["items"][0]["spec"]["dataSchema"]["numClasses"] == 10
    assert run("get", "pvc", "hospital-a-data", "-o", "jsonpath={.status.phase}") == "Pending"
    assert "Spec:" in run("describe", "alliance", "mnist")
    run("run", "pod-1", "--image=busybox", "--", "sleep", "1")
    assert run("get", "pods").split()[:6] == ["NAME", "READY", "STATUS", "RESTARTS", "AGE", "pod-1"]

    assert "deleted" in run("delete", "-f", str(examples / "member.yaml"))
    assert "No resources found" in kubectl("-n", ns, "get", "members", check=False).stderr
    kubectl("delete", "namespace", ns)  # waits until it is gone
    assert ns not in kubectl("get", "namespaces").stdout
    bad = "apiVersion: alliance.dev/v1alpha1\nkind: Alliance\nmetadata: {name: x}\nspec: {store: 1}"
    result = kubectl("apply", "-f", "-", stdin=bad, check=False)
    assert result.returncode != 0 and "spec.store" in result.stderr


def test_main_process(tmp_path):
    config = tmp_path / "kc"
    proc = subprocess.Popen(
        [sys.executable, "-m", "tests.kube.apiserver", "--port", "0", "--kubeconfig", str(config)],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        line = proc.stdout.readline()
        assert line.startswith("listening on http://127.0.0.1:")
        url = line.split()[-1]
        assert yaml.safe_load(config.read_text())["clusters"][0]["cluster"]["server"] == url
        with urllib.request.urlopen(url + "/version", timeout=5) as resp:
            assert json.load(resp)["major"] == "1"
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=10) == 0


# ---- kopf, as its own process


@pytest.mark.slow
def test_kopf_operator(tmp_path):
    with ApiServer() as srv:
        config = srv.write_kubeconfig(tmp_path / "kubeconfig")
        api = kubernetes.config.new_client_from_config(config_file=str(config))
        ext = kubernetes.client.ApiextensionsV1Api(api)
        for path in sorted((ROOT / "crds").glob("*.yaml")):
            ext.create_custom_resource_definition(load_yaml(path)[0])
        custom, core = kubernetes.client.CustomObjectsApi(api), kubernetes.client.CoreV1Api(api)
        log = (tmp_path / "kopf.log").open("w")
        env = {**os.environ, "KUBECONFIG": str(config)}
        kopf = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "kopf",
                "run",
                "--standalone",
                "--verbose",
                "--namespace",
                "default",
                "tests/kube/_kopf_smoke.py",
            ],
            cwd=ROOT,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        args = (GROUP, VERSION, "default", "alliances", "mnist")
        try:
            custom.create_namespaced_custom_object(*args[:-1], example("alliance.yaml", "Alliance"))
            created = time.monotonic()

            def ready():
                obj = custom.get_namespaced_custom_object(*args)
                conditions = obj.get("status", {}).get("conditions", [])
                return obj if any(c["type"] == "Ready" for c in conditions) else None

            obj = wait_for(ready, timeout=20, message="kopf to mark the alliance Ready")
            assert time.monotonic() - created < 8, "kopf should settle in seconds"
            assert obj["metadata"]["finalizers"] == ["alliance.dev/finalizer"]
            assert obj["status"]["observedGeneration"] == 1
            child = core.read_namespaced_config_map("mnist-child", "default")
            assert child.metadata.owner_references[0].uid == obj["metadata"]["uid"]

            custom.delete_namespaced_custom_object(*args)
            deleted = time.monotonic()

            def gone() -> bool:
                try:
                    core.read_namespaced_config_map("mnist-child", "default")
                except ApiException as e:
                    return e.status == 404
                return False

            wait_for(gone, timeout=10, message="the child to be garbage-collected")
            assert time.monotonic() - deleted < 5
            with pytest.raises(ApiException):
                custom.get_namespaced_custom_object(*args)
            selector = "involvedObject.name=mnist"
            events = lambda: core.list_namespaced_event("default", field_selector=selector).items  # noqa: E731
            reasons = lambda: {e.reason for e in events()}  # noqa: E731
            wait_for(lambda: {"ChildCreated", "Deleting"} <= reasons(), message="kopf's events")
        finally:
            kopf.send_signal(signal.SIGTERM)
            kopf.wait(timeout=20)
            log.close()
            api.close()
        output = (tmp_path / "kopf.log").read_text()
        for bad in (
            "Traceback",
            "ERROR",
            "WARNING",
            "Patching failed",
            "inconsistencies",
            "Throttling",
            "will retry",
        ):
            assert bad not in output, f"kopf logged {bad!r}:\n{output}"
