"""The operator's pure parts: pod builders, pod state, conditions, settings, spec merging.

No cluster, no store, no network: the pods are checked against the real Kubernetes 1.37 schemas
(kubernetes-validate, strict) and their arguments against the ``alliance`` command's own parser.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import re
from pathlib import Path

import kubernetes_validate
import pytest
from alliance_operator.conditions import get_condition, is_true, set_condition
from alliance_operator.config import OperatorConfig
from alliance_operator.constants import (
    ANNOTATION_CREDENTIALS,
    ANNOTATION_SPEC_HASH,
    API_VERSION,
    CACHE_MOUNT_PATH,
    DATA_MOUNT_PATH,
    LABEL_ALLIANCE,
    LABEL_COMPONENT,
    LABEL_MEMBER,
    MANAGED_BY,
    TMP_MOUNT_PATH,
)
from alliance_operator.podstate import PodHealth, PodState, pod_state
from alliance_operator.resources import pods
from alliance_operator.run_report import store_run
from alliance_operator.runspec import RUN_FIELDS, effective_spec
from alliance_operator.status import changed

from alliance import cli, contract
from alliance.data import DataSchema
from alliance.engine import RunSpec, SpecError
from tests.test_crds import KUBERNETES_VERSION, admit, example

IMAGE = "alliance-member:test"

# --- pod builders ------------------------------------------------------------------------------


def alliance_spec(**extra) -> dict:
    """An Alliance's spec as the API server stores it (CRD defaults applied)."""
    body = {
        "apiVersion": API_VERSION,
        "kind": "Alliance",
        "metadata": {"name": "mnist"},
        "spec": {
            "store": {
                "endpoint": "http://alliance-minio:9000",
                "bucket": "alliance",
                "credentialsSecret": {"name": "alliance-minio"},
            },
            **extra,
        },
    }
    stored, errors = admit("Alliance", body)
    assert errors == []
    return stored["spec"]


def member_spec(**extra) -> dict:
    """A Member's spec as the API server stores it (CRD defaults applied)."""
    body = {
        "apiVersion": API_VERSION,
        "kind": "Member",
        "metadata": {"name": "hospital-a"},
        "spec": {"alliance": "mnist", "dataVolumeClaim": "hospital-a-data", **extra},
    }
    stored, errors = admit("Member", body)
    assert errors == []
    return stored["spec"]


TABULAR = {
    "labelColumn": "outcome",
    "featureShape": [20],
    "numClasses": 3,
    "minValue": -5,
    "maxValue": 5.5,
    "scale": 1,
    "delimiter": ";",
}
TRAIN_COMMAND = (
    "python /app/train.py {model_in} {data_dir} {model_out} {metrics_out} {epochs} {batch_size}"
)
VALIDATE_COMMAND = "python /app/validate.py {model_in} {data_dir} {metrics_out}"

#: id -> (member spec extras, alliance spec extras, the image the pod must run)
MEMBER_CASES = {
    "defaults": ({}, {}, IMAGE),
    "validator": ({"validator": True}, {}, IMAGE),
    "commands": ({"trainCommand": TRAIN_COMMAND, "validateCommand": VALIDATE_COMMAND}, {}, IMAGE),
    "train-command-only": ({"trainCommand": TRAIN_COMMAND}, {}, IMAGE),
    "data-schema": ({"dataSchema": TABULAR}, {}, IMAGE),
    "data-schema-partial": ({"dataSchema": {"numClasses": 2}}, {}, IMAGE),
    "resources": (
        {
            "resources": {
                "requests": {"cpu": "1", "memory": "2Gi"},
                "limits": {"cpu": 2, "memory": "4Gi"},
            }
        },
        {},
        IMAGE,
    ),
    "member-image": (
        {"image": "registry.example.org/mine:1"},
        {"memberImage": "registry.example.org/alliance:2"},
        "registry.example.org/mine:1",
    ),
    "alliance-image": (
        {},
        {"memberImage": "registry.example.org/alliance:2"},
        "registry.example.org/alliance:2",
    ),
    "custom-secret-keys": (
        {},
        {
            "store": {
                "endpoint": "https://s3.example.org",
                "bucket": "fed.bucket-1",
                "credentialsSecret": {
                    "name": "s3-creds",
                    "accessKeyKey": "AWS_ACCESS_KEY_ID",
                    "secretKeyKey": "AWS_SECRET_ACCESS_KEY",
                },
            }
        },
        IMAGE,
    ),
    "everything": (
        {
            "validator": True,
            "trainCommand": TRAIN_COMMAND,
            "validateCommand": VALIDATE_COMMAND,
            "dataSchema": TABULAR,
            "resources": {"limits": {"cpu": "500m", "memory": "1Gi"}},
            "image": "registry.example.org/mine:1",
        },
        {"memberImage": "registry.example.org/alliance:2", "seed": 7},
        "registry.example.org/mine:1",
    ),
}

#: id -> (alliance spec extras, the image the init pod must run)
INIT_CASES = {
    "defaults": ({}, IMAGE),
    "seed": ({"seed": 4294967295}, IMAGE),
    "keras-object": ({"model": {"kerasObject": "uploads/my-model.keras"}}, IMAGE),
    "alliance-image": (
        {"memberImage": "registry.example.org/alliance:2"},
        "registry.example.org/alliance:2",
    ),
    "run-defaults": ({"runDefaults": {"localEpochs": 2, "aggregator": "fedadam"}}, IMAGE),
}


#: The member's own Secret (identity.py makes it; here only its name and digest matter).
MEMBER_SECRET = "hospital-a-store"


def member_pod(*args, credentials_digest: str = "0" * 16, has_ca: bool = False, **kwargs):
    return pods.member_pod(
        *args,
        credentials_secret=MEMBER_SECRET,
        credentials_digest=credentials_digest,
        has_ca=has_ca,
        **kwargs,
    )


def build_member(case: str, name: str = "hospital-a", run_as_user: int = 10001):
    m_extra, a_extra, _ = MEMBER_CASES[case]
    m_spec, a_spec = member_spec(**m_extra), alliance_spec(**a_extra)
    return member_pod(name, m_spec, a_spec, IMAGE, "IfNotPresent", run_as_user), m_spec, a_spec


def build_init(case: str, run_as_user: int = 10001):
    a_extra, _ = INIT_CASES[case]
    a_spec = alliance_spec(**a_extra)
    return pods.init_pod("mnist", a_spec, IMAGE, "IfNotPresent", run_as_user), a_spec


def container(pod: dict) -> dict:
    (only,) = pod["spec"]["containers"]
    return only


def env_of(pod: dict) -> dict[str, dict]:
    entries = container(pod)["env"]
    names = [e["name"] for e in entries]
    assert len(names) == len(set(names)), f"duplicate env vars: {names}"
    return {e["name"]: e for e in entries}


#: Kubernetes' rule for a label value (and the 63-character limit).
LABEL_VALUE = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$")
DNS_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")


ALL_PODS = [pytest.param("member", case, id=f"member-{case}") for case in MEMBER_CASES] + [
    pytest.param("init", case, id=f"init-{case}") for case in INIT_CASES
]


def built(kind: str, case: str, run_as_user: int = 10001) -> tuple[dict, dict]:
    """(pod, alliance spec)"""
    if kind == "member":
        pod, _, a_spec = build_member(case, run_as_user=run_as_user)
    else:
        pod, a_spec = build_init(case, run_as_user=run_as_user)
    return pod, a_spec


@pytest.mark.parametrize("kind,case", ALL_PODS)
def test_pods_pass_strict_kubernetes_validation(kind, case):
    pod, _ = built(kind, case)
    assert kubernetes_validate.validate(pod, KUBERNETES_VERSION, strict=True)


@pytest.mark.parametrize("kind,case", ALL_PODS)
@pytest.mark.parametrize("run_as_user", [10001, 4242])
def test_pods_are_hardened(kind, case, run_as_user):
    pod, _ = built(kind, case, run_as_user)
    spec = pod["spec"]
    assert spec["automountServiceAccountToken"] is False
    assert spec.get("enableServiceLinks") is False
    for forbidden in ("hostNetwork", "hostPID", "hostIPC", "serviceAccountName", "nodeName"):
        assert forbidden not in spec
    pod_sc = spec["securityContext"]
    assert pod_sc["runAsNonRoot"] is True
    assert pod_sc["runAsUser"] == run_as_user != 0
    assert pod_sc["runAsGroup"] != 0
    assert pod_sc["seccompProfile"] == {"type": "RuntimeDefault"}
    for c in spec["containers"] + spec.get("initContainers", []):
        sc = c["securityContext"]
        assert sc["readOnlyRootFilesystem"] is True
        assert sc["allowPrivilegeEscalation"] is False
        assert sc.get("privileged", False) is False
        assert sc["capabilities"] == {"drop": ["ALL"]}
        assert sc.get("runAsUser", run_as_user) != 0
        assert sc.get("runAsNonRoot", True) is True
        # The store is the only channel; the agent listens only for Prometheus scrapes.
        if kind == "member":
            assert c["ports"] == [{"name": "metrics", "containerPort": 9100, "protocol": "TCP"}]
            assert env_of(pod)[contract.ENV_METRICS_PORT]["value"] == "9100"
        else:
            assert "ports" not in c
            assert contract.ENV_METRICS_PORT not in env_of(pod)
    # Writable places are emptyDirs only; no hostPath, no projected token.
    for volume in spec["volumes"]:
        assert set(volume) - {"name"} <= {"emptyDir", "persistentVolumeClaim"}, volume


@pytest.mark.parametrize("case", MEMBER_CASES)
def test_member_pod_mounts_its_claim_read_only_at_data(case):
    pod, m_spec, _ = build_member(case)
    volumes = {v["name"]: v for v in pod["spec"]["volumes"]}
    claims = [v for v in volumes.values() if "persistentVolumeClaim" in v]
    assert claims == [
        {
            "name": claims[0]["name"],
            "persistentVolumeClaim": {"claimName": m_spec["dataVolumeClaim"], "readOnly": True},
        }
    ]
    mounts = {m["mountPath"]: m for m in container(pod)["volumeMounts"]}
    assert DATA_MOUNT_PATH == "/data"
    data = mounts["/data"]
    assert data["name"] == claims[0]["name"]
    assert data["readOnly"] is True
    # Every other mount is a scratch emptyDir, and the claim is mounted nowhere else.
    for path, mount in mounts.items():
        if path != "/data":
            assert "emptyDir" in volumes[mount["name"]], path
    assert set(mounts) == {DATA_MOUNT_PATH, CACHE_MOUNT_PATH, TMP_MOUNT_PATH}
    assert env_of(pod)["HOME"]["value"] == TMP_MOUNT_PATH
    assert env_of(pod)[contract.ENV_CACHE_DIR]["value"] == CACHE_MOUNT_PATH


@pytest.mark.parametrize("case", INIT_CASES)
def test_init_pod_has_no_data_volume(case):
    pod, _ = build_init(case)
    assert all("persistentVolumeClaim" not in v for v in pod["spec"]["volumes"])
    assert [m["mountPath"] for m in container(pod)["volumeMounts"]] == [TMP_MOUNT_PATH]
    assert pod["spec"]["restartPolicy"] == "OnFailure"


@pytest.mark.parametrize("kind,case", ALL_PODS)
def test_store_credentials_come_only_from_the_secret(kind, case):
    """A member pod gets its own keys (its Secret, with the contract's key names); only the
    init pod, which the operator runs to create the bucket, gets the Alliance's."""
    pod, a_spec = built(kind, case)
    env = env_of(pod)
    secret = a_spec["store"]["credentialsSecret"]
    if kind == "member":
        name, keys = MEMBER_SECRET, (contract.SECRET_ACCESS_KEY, contract.SECRET_SECRET_KEY)
    else:
        name, keys = secret["name"], (secret["accessKeyKey"], secret["secretKeyKey"])
    assert env[contract.ENV_S3_ACCESS_KEY] == {
        "name": contract.ENV_S3_ACCESS_KEY,
        "valueFrom": {"secretKeyRef": {"name": name, "key": keys[0]}},
    }
    assert env[contract.ENV_S3_SECRET_KEY] == {
        "name": contract.ENV_S3_SECRET_KEY,
        "valueFrom": {"secretKeyRef": {"name": name, "key": keys[1]}},
    }
    assert contract.ENV_S3_CA_FILE not in env
    assert env[contract.ENV_S3_ENDPOINT]["value"] == a_spec["store"]["endpoint"]
    assert env[contract.ENV_BUCKET]["value"] == a_spec["store"]["bucket"]
    # Nothing else reaches for a Secret or carries something that looks like a credential.
    c = container(pod)
    assert "envFrom" not in c
    text = json.dumps(pod)
    assert text.count("secretKeyRef") == 2
    for name, entry in env.items():
        if re.search(r"KEY|SECRET|PASSWORD|TOKEN|CREDENTIAL", name):
            assert "value" not in entry, name


@pytest.mark.parametrize("kind,case", ALL_PODS)
def test_cpu_threads_follow_the_cpu_limit(kind, case):
    pod, _ = built(kind, case)
    assert env_of(pod)[contract.ENV_CPU_THREADS] == {
        "name": contract.ENV_CPU_THREADS,
        "valueFrom": {
            "resourceFieldRef": {"containerName": container(pod)["name"], "resource": "limits.cpu"}
        },
    }


@pytest.mark.parametrize("case", MEMBER_CASES)
def test_member_pod_args_are_what_alliance_member_accepts(case):
    pod, m_spec, _ = build_member(case)
    c = container(pod)
    assert c["command"] == [contract.COMMAND]
    # The Member's fields go through the contract's builder (whose output the parser accepts
    # in every combination: tests/test_contract.py) ...
    assert c["args"] == contract.member_args(
        "hospital-a",
        DATA_MOUNT_PATH,
        log_level="info",
        validator=bool(m_spec.get("validator")),
        train_command=m_spec.get("trainCommand"),
        validate_command=m_spec.get("validateCommand"),
    )
    # ... and reach the agent as they are.
    args = cli.build_parser().parse_args(c["args"])
    assert args.func is cli.cmd_member
    assert args.name == "hospital-a"
    assert args.data_dir == Path(DATA_MOUNT_PATH)
    assert args.validator is bool(m_spec.get("validator"))
    assert args.train_command == m_spec.get("trainCommand")
    assert args.validate_command == m_spec.get("validateCommand")
    assert args.schema is None  # the schema travels in contract.ENV_DATA_SCHEMA
    assert args.log_level == "info"


@pytest.mark.parametrize("case", INIT_CASES)
def test_init_pod_args_are_what_alliance_init_accepts(case):
    pod, a_spec = build_init(case)
    c = container(pod)
    assert c["command"] == [contract.COMMAND]
    assert c["args"] == contract.init_args(
        a_spec["seed"], log_level="info", keras_object=a_spec["model"].get("kerasObject")
    )
    args = cli.build_parser().parse_args(c["args"])
    assert args.func is cli.cmd_init
    assert args.seed == a_spec["seed"]
    assert args.keras_object == a_spec["model"].get("kerasObject")
    assert args.model is None


@pytest.mark.parametrize("case", MEMBER_CASES)
def test_data_schema_reaches_the_agent(case, monkeypatch):
    pod, m_spec, _ = build_member(case)
    env = env_of(pod)
    monkeypatch.delenv(contract.ENV_DATA_SCHEMA, raising=False)
    if "dataSchema" not in m_spec:
        assert contract.ENV_DATA_SCHEMA not in env
        return
    value = env[contract.ENV_DATA_SCHEMA]["value"]
    expected = DataSchema.from_dict(m_spec["dataSchema"])
    assert DataSchema.from_dict(json.loads(value)) == expected
    # ... and the agent's own reading of the variable gives the same schema.
    monkeypatch.setenv(contract.ENV_DATA_SCHEMA, value)
    assert cli._schema(None) == expected


def test_a_partial_data_schema_is_defaulted_by_the_crd_to_the_engine_schema():
    pod, _, _ = build_member("data-schema-partial")
    value = json.loads(env_of(pod)[contract.ENV_DATA_SCHEMA]["value"])
    assert DataSchema.from_dict(value) == DataSchema(num_classes=2)


@pytest.mark.parametrize("case", MEMBER_CASES)
def test_member_pod_image_resources_and_labels(case):
    pod, m_spec, _ = build_member(case)
    c = container(pod)
    assert c["image"] == MEMBER_CASES[case][2]
    assert c["imagePullPolicy"] == "IfNotPresent"
    resources = m_spec.get("resources") or pods.DEFAULT_MEMBER_RESOURCES
    assert c["resources"] == {k: {n: str(q) for n, q in v.items()} for k, v in resources.items()}
    assert c["terminationMessagePolicy"] == "FallbackToLogsOnError"
    assert pod["spec"]["restartPolicy"] == "Always"
    assert pod["metadata"]["name"] == pods.member_pod_name("hospital-a") == "hospital-a-agent"
    assert pod["metadata"]["labels"] == {
        "app.kubernetes.io/name": "alliance",
        "app.kubernetes.io/part-of": "alliance",
        "app.kubernetes.io/managed-by": MANAGED_BY,
        LABEL_COMPONENT: "member",
        LABEL_ALLIANCE: "mnist",
        LABEL_MEMBER: "hospital-a",
    }
    assert "namespace" not in pod["metadata"]  # kopf.adopt sets it from the owner
    assert pod["metadata"]["annotations"] == {
        ANNOTATION_SPEC_HASH: pods.spec_hash(pod),
        ANNOTATION_CREDENTIALS: "0" * 16,
    }


@pytest.mark.parametrize("case", MEMBER_CASES)
def test_member_pods_are_what_the_kubernetes_client_sends(case):
    # The client validates a Pod body before sending it: a Member's `cpu: 2` (the CRD admits an
    # int) made every create_namespaced_pod fail, and the Member never got its agent.
    import kubernetes

    pod, _, _ = build_member(case)
    kubernetes.client.V1Pod.model_validate(pod)


@pytest.mark.parametrize("case", INIT_CASES)
def test_init_pod_image_and_labels(case):
    pod, _ = build_init(case)
    assert container(pod)["image"] == INIT_CASES[case][1]
    assert container(pod)["resources"] == pods.INIT_RESOURCES
    assert pod["metadata"]["name"] == pods.init_pod_name("mnist") == "mnist-init"
    assert pod["metadata"]["labels"] == {
        "app.kubernetes.io/name": "alliance",
        "app.kubernetes.io/part-of": "alliance",
        "app.kubernetes.io/managed-by": MANAGED_BY,
        LABEL_COMPONENT: "init",
        LABEL_ALLIANCE: "mnist",
    }
    assert pod["metadata"]["annotations"] == {ANNOTATION_SPEC_HASH: pods.spec_hash(pod)}


def _names_are_valid(pod: dict) -> None:
    meta = pod["metadata"]
    assert len(meta["name"]) <= 253 and DNS_SUBDOMAIN.match(meta["name"]), meta["name"]
    for key, value in meta["labels"].items():
        assert len(value) <= 63 and LABEL_VALUE.match(value), f"label {key}={value!r}"


@pytest.mark.parametrize("name", ["a", "hospital-a", "hospital.a", "m" * 57])
def test_names_and_label_values_are_valid_for_ordinary_member_names(name):
    pod = member_pod(name, member_spec(), alliance_spec(), IMAGE)
    _names_are_valid(pod)
    assert pod["metadata"]["labels"][LABEL_MEMBER] == name
    assert cli.build_parser().parse_args(container(pod)["args"]).name == name


def test_a_long_member_name_still_gives_a_valid_pod():
    name = "university-hospital-of-somewhere-department-of-radiology-mnist-2"  # 64 characters
    assert len(name) == 64 and DNS_SUBDOMAIN.match(name)
    _names_are_valid(member_pod(name, member_spec(), alliance_spec(), IMAGE))


# --- the spec hash -----------------------------------------------------------------------------


def member_hash(m_spec: dict, a_spec: dict, **kwargs) -> str:
    pod = member_pod("hospital-a", m_spec, a_spec, kwargs.pop("image", IMAGE), **kwargs)
    return pod["metadata"]["annotations"][ANNOTATION_SPEC_HASH]


MEMBER_SPEC_CHANGES = {
    "validator": lambda m, a: m.update(validator=True),
    "train-command": lambda m, a: m.update(trainCommand=TRAIN_COMMAND),
    "validate-command": lambda m, a: m.update(validateCommand=VALIDATE_COMMAND),
    "data-schema": lambda m, a: m.update(dataSchema=TABULAR),
    "resources": lambda m, a: m.update(resources={"limits": {"cpu": "3", "memory": "8Gi"}}),
    "claim": lambda m, a: m.update(dataVolumeClaim="other-data"),
    "image": lambda m, a: m.update(image="registry.example.org/mine:2"),
    "alliance-image": lambda m, a: a.update(memberImage="registry.example.org/alliance:3"),
    "endpoint": lambda m, a: a["store"].update(endpoint="http://other:9000"),
    "bucket": lambda m, a: a["store"].update(bucket="other-bucket"),
}


def _reorder(d: dict) -> None:
    """The same mapping with its keys in reverse order, at every level (in place)."""
    items = list(d.items())
    d.clear()
    for key, value in reversed(items):
        if isinstance(value, dict):
            _reorder(value)
        d[key] = value


MEMBER_SPEC_NON_CHANGES = {
    "run-defaults": lambda m, a: a.update(runDefaults={"localEpochs": 5}),
    "seed": lambda m, a: a.update(seed=99),
    "model": lambda m, a: a.update(model={"kerasObject": "uploads/x.keras"}),
    "validator-not-defaulted": lambda m, a: m.pop("validator"),
    "key-order": lambda m, a: (_reorder(m), _reorder(a)),
    # The Alliance's admin keys never reach a member pod.
    "secret": lambda m, a: a["store"]["credentialsSecret"].update(name="other-secret"),
    "secret-key": lambda m, a: a["store"]["credentialsSecret"].update(secretKeyKey="sk"),
}


@pytest.mark.parametrize("change", MEMBER_SPEC_CHANGES)
def test_member_spec_hash_changes_with_what_the_pod_runs(change):
    m, a = member_spec(), alliance_spec()
    before = member_hash(m, a)
    m2, a2 = copy.deepcopy(m), copy.deepcopy(a)
    MEMBER_SPEC_CHANGES[change](m2, a2)
    assert member_hash(m2, a2) != before


@pytest.mark.parametrize("change", MEMBER_SPEC_NON_CHANGES)
def test_member_spec_hash_ignores_what_the_pod_does_not_run(change):
    m, a = member_spec(), alliance_spec()
    before = member_hash(m, a)
    m2, a2 = copy.deepcopy(m), copy.deepcopy(a)
    MEMBER_SPEC_NON_CHANGES[change](m2, a2)
    assert member_hash(m2, a2) == before


def test_new_keys_or_a_ca_replace_the_member_pod():
    m, a = member_spec(), alliance_spec()
    before = member_hash(m, a)
    assert member_hash(m, a, credentials_digest="1" * 16) != before
    assert member_hash(m, a, has_ca=True) != before


def test_the_store_ca_reaches_member_and_init_pods_as_a_file():
    pod = member_pod("hospital-a", member_spec(), alliance_spec(), IMAGE, has_ca=True)
    env = env_of(pod)
    path = env[contract.ENV_S3_CA_FILE]["value"]
    (mount,) = [m for m in container(pod)["volumeMounts"] if path.startswith(m["mountPath"] + "/")]
    (volume,) = [v for v in pod["spec"]["volumes"] if v["name"] == mount["name"]]
    assert mount["readOnly"] and volume["secret"] == {
        "secretName": MEMBER_SECRET,
        "items": [{"key": contract.SECRET_CA_CERT, "path": path.rsplit("/", 1)[1]}],
    }
    a = alliance_spec()
    a["store"]["caSecret"] = {"name": "store-ca", "key": "ca.pem"}
    init = pods.init_pod("mnist", a, IMAGE)
    path = env_of(init)[contract.ENV_S3_CA_FILE]["value"]
    (volume,) = [v for v in init["spec"]["volumes"] if "secret" in v]
    assert volume["secret"]["secretName"] == "store-ca"
    assert volume["secret"]["items"][0]["key"] == "ca.pem"
    assert kubernetes_validate.validate(init, KUBERNETES_VERSION, strict=True)
    assert kubernetes_validate.validate(pod, KUBERNETES_VERSION, strict=True)


def test_member_spec_hash_changes_with_the_operator_settings():
    m, a = member_spec(), alliance_spec()
    before = member_hash(m, a)
    assert member_hash(m, a, image="alliance-member:other") != before
    assert member_hash(m, a, image_pull_policy="Always") != before
    assert member_hash(m, a, run_as_user=20000) != before
    # ... but not the default image when the member or the alliance names one.
    a["memberImage"] = "registry.example.org/alliance:2"
    assert member_hash(m, a) == member_hash(m, a, image="alliance-member:other")


def test_init_spec_hash():
    def h(a: dict) -> str:
        return pods.init_pod("mnist", a, IMAGE)["metadata"]["annotations"][ANNOTATION_SPEC_HASH]

    base = alliance_spec()
    assert h(base) == h(copy.deepcopy(base))
    assert h(alliance_spec(seed=1)) != h(base)
    assert h(alliance_spec(model={"kerasObject": "uploads/x.keras"})) != h(base)
    assert h(alliance_spec(memberImage="registry.example.org/a:1")) != h(base)
    assert h(alliance_spec(runDefaults={"batchSize": 8})) == h(base)


@pytest.mark.parametrize("kind,case", ALL_PODS)
def test_builders_are_deterministic_and_leave_their_inputs_alone(kind, case):
    constants = copy.deepcopy((pods.DEFAULT_MEMBER_RESOURCES, pods.INIT_RESOURCES))
    if kind == "member":
        m_extra, a_extra, _ = MEMBER_CASES[case]
        m, a = member_spec(**m_extra), alliance_spec(**a_extra)
        m_copy, a_copy = copy.deepcopy(m), copy.deepcopy(a)
        first = member_pod("hospital-a", m, a, IMAGE, "Always", 10001)
        second = member_pod("hospital-a", m_copy, a_copy, IMAGE, "Always", 10001)
        assert (m, a) == (m_copy, a_copy)
    else:
        a = alliance_spec(**INIT_CASES[case][0])
        a_copy = copy.deepcopy(a)
        first = pods.init_pod("mnist", a, IMAGE, "Always", 10001)
        second = pods.init_pod("mnist", a_copy, IMAGE, "Always", 10001)
        assert a == a_copy
    assert first == second
    assert json.dumps(first, sort_keys=True) == json.dumps(second, sort_keys=True)
    assert constants == (pods.DEFAULT_MEMBER_RESOURCES, pods.INIT_RESOURCES)


# --- pod state ---------------------------------------------------------------------------------


def pod_with(
    phase: str | None = "Pending",
    *,
    ready: bool | None = None,
    state: dict | None = None,
    last: dict | None = None,
    restarts: int = 0,
    conditions: list | None = None,
    deleting: bool = False,
    **status,
) -> dict:
    """A pod as the API returns it, with one container named agent."""
    out: dict = {"metadata": {"name": "hospital-a-agent"}, "status": dict(status)}
    if phase is not None:
        out["status"]["phase"] = phase
    if conditions is not None:
        out["status"]["conditions"] = conditions
    if state is not None:
        out["status"]["containerStatuses"] = [
            {
                "name": "agent",
                "ready": bool(ready),
                "restartCount": restarts,
                "state": state,
                "lastState": last or {},
            }
        ]
    if deleting:
        out["metadata"]["deletionTimestamp"] = "2030-01-01T00:00:00Z"
    return out


TRACEBACK = (
    "Traceback (most recent call last):\n"
    '  File "/usr/local/bin/alliance", line 8, in <module>\n'
    "alliance.store.StoreError: check bucket: the store refused: AccessDenied: Access Denied.\n"
)
CRASHED = {"terminated": {"exitCode": 1, "reason": "Error", "message": TRACEBACK}}
LAST_LINE = (
    "alliance.store.StoreError: check bucket: the store refused: AccessDenied: Access Denied."
)
RUNNING = {"running": {"startedAt": "2030-01-01T00:00:00Z"}}

#: id -> (pod, health, reason, message (substring), restarts, exit message)
POD_STATES = {
    "absent": (None, PodHealth.ABSENT, "PodAbsent", "does not exist", 0, ""),
    "pending-bare": (pod_with("Pending"), PodHealth.STARTING, "Pending", "waiting", 0, ""),
    "no-status": ({"metadata": {"name": "p"}}, PodHealth.STARTING, "Pending", "", 0, ""),
    "unschedulable": (
        pod_with(
            "Pending",
            conditions=[
                {
                    "type": "PodScheduled",
                    "status": "False",
                    "reason": "Unschedulable",
                    "message": "0/3 nodes are available: 3 Insufficient memory.",
                }
            ],
        ),
        PodHealth.STARTING,
        "Unschedulable",
        "3 Insufficient memory",
        0,
        "",
    ),
    "container-creating": (
        pod_with("Pending", state={"waiting": {"reason": "ContainerCreating"}}),
        PodHealth.STARTING,
        "ContainerCreating",
        "",
        0,
        "",
    ),
    "running-ready": (
        pod_with("Running", ready=True, state=RUNNING),
        PodHealth.RUNNING,
        "Running",
        "running",
        0,
        "",
    ),
    "running-not-ready": (
        pod_with(
            "Running",
            ready=False,
            state=RUNNING,
            conditions=[
                {"type": "Ready", "status": "False", "reason": "ContainersNotReady"},
                {"type": "PodScheduled", "status": "True"},
            ],
        ),
        PodHealth.STARTING,
        "ContainersNotReady",
        "",
        0,
        "",
    ),
    "running-after-a-crash": (
        pod_with("Running", ready=True, state=RUNNING, last=CRASHED, restarts=1),
        PodHealth.RUNNING,
        "Running",
        "",
        1,
        f"exit code 1: {LAST_LINE}",
    ),
    "crash-loop": (
        pod_with(
            "Running",
            state={
                "waiting": {
                    "reason": "CrashLoopBackOff",
                    "message": "back-off 40s restarting failed container=agent",
                }
            },
            last=CRASHED,
            restarts=4,
        ),
        PodHealth.STUCK,
        "CrashLoopBackOff",
        f"back-off 40s restarting failed container=agent; last exit: exit code 1: {LAST_LINE}",
        4,
        f"exit code 1: {LAST_LINE}",
    ),
    "crash-loop-no-waiting-message": (
        pod_with(
            "Running", state={"waiting": {"reason": "CrashLoopBackOff"}}, last=CRASHED, restarts=2
        ),
        PodHealth.STUCK,
        "CrashLoopBackOff",
        f"exit code 1: {LAST_LINE}",
        2,
        f"exit code 1: {LAST_LINE}",
    ),
    "oom-killed": (
        pod_with(
            "Running",
            state={"waiting": {"reason": "CrashLoopBackOff"}},
            last={"terminated": {"exitCode": 137, "reason": "OOMKilled"}},
            restarts=3,
        ),
        PodHealth.STUCK,
        "CrashLoopBackOff",
        "exit code 137: OOMKilled",
        3,
        "exit code 137: OOMKilled",
    ),
    "image-pull-backoff": (
        pod_with(
            "Pending",
            state={
                "waiting": {
                    "reason": "ImagePullBackOff",
                    "message": 'Back-off pulling image "alliance-member:nope"',
                }
            },
        ),
        PodHealth.STUCK,
        "ImagePullBackOff",
        'Back-off pulling image "alliance-member:nope"',
        0,
        "",
    ),
    "err-image-pull": (
        pod_with("Pending", state={"waiting": {"reason": "ErrImagePull", "message": "not found"}}),
        PodHealth.STUCK,
        "ErrImagePull",
        "not found",
        0,
        "",
    ),
    "create-container-config-error": (
        pod_with(
            "Pending",
            state={
                "waiting": {
                    "reason": "CreateContainerConfigError",
                    "message": 'secret "alliance-minio" not found',
                }
            },
        ),
        PodHealth.STUCK,
        "CreateContainerConfigError",
        'secret "alliance-minio" not found',
        0,
        "",
    ),
    "evicted": (
        pod_with(
            "Failed",
            reason="Evicted",
            message="The node was low on resource: memory.",
            state={"terminated": {"exitCode": 137, "reason": "ContainerStatusUnknown"}},
        ),
        PodHealth.FAILED,
        "Evicted",
        "The node was low on resource: memory.",
        0,
        "exit code 137: ContainerStatusUnknown",
    ),
    "failed-exit": (
        pod_with("Failed", state=CRASHED),
        PodHealth.FAILED,
        "Failed",
        f"exit code 1: {LAST_LINE}",
        0,
        f"exit code 1: {LAST_LINE}",
    ),
    "failed-bare": (pod_with("Failed"), PodHealth.FAILED, "Failed", "the pod failed", 0, ""),
    "succeeded": (
        pod_with("Succeeded", state={"terminated": {"exitCode": 0, "reason": "Completed"}}),
        PodHealth.SUCCEEDED,
        "Completed",
        "completion",
        0,
        "",
    ),
    "terminating-running": (
        pod_with("Running", ready=True, state=RUNNING, deleting=True),
        PodHealth.TERMINATING,
        "Terminating",
        "being deleted",
        0,
        "",
    ),
    "terminating-failed": (
        pod_with("Failed", reason="Evicted", deleting=True),
        PodHealth.TERMINATING,
        "Terminating",
        "",
        0,
        "",
    ),
}


@pytest.mark.parametrize("case", POD_STATES)
def test_pod_state(case):
    pod, health, reason, message, restarts, exit_message = POD_STATES[case]
    frozen = copy.deepcopy(pod)
    state = pod_state(pod)
    assert pod == frozen
    assert (state.health, state.reason, state.restarts, state.exit_message) == (
        health,
        reason,
        restarts,
        exit_message,
    )
    assert message in state.message
    assert state.lost is (health not in (PodHealth.RUNNING, PodHealth.STARTING))
    # Reasons become condition reasons: CamelCase, as the CRDs' pattern requires.
    assert re.match(r"^[A-Za-z]([A-Za-z0-9_,:]*[A-Za-z0-9_])?$", state.reason)


@pytest.mark.parametrize(
    "health,lost",
    [
        (PodHealth.ABSENT, True),
        (PodHealth.STARTING, False),
        (PodHealth.RUNNING, False),
        (PodHealth.STUCK, True),
        (PodHealth.TERMINATING, True),
        (PodHealth.SUCCEEDED, True),
        (PodHealth.FAILED, True),
    ],
)
def test_lost(health, lost):
    assert PodState(health).lost is lost


# --- conditions --------------------------------------------------------------------------------

T0, T1 = "2030-01-01T00:00:00Z", "2030-01-01T00:01:00Z"


def test_set_condition_adds_and_leaves_the_input_alone():
    old = [{"type": "A", "status": "True", "reason": "R", "message": "m", "lastTransitionTime": T0}]
    frozen = copy.deepcopy(old)
    out = set_condition(old, "B", False, "Why", "because", 3, T1)
    assert old == frozen
    assert out == [
        frozen[0],
        {
            "type": "B",
            "status": "False",
            "reason": "Why",
            "message": "because",
            "lastTransitionTime": T1,
            "observedGeneration": 3,
        },
    ]
    assert set_condition(None, "A", True, "R", "m", None, T0) == [
        {"type": "A", "status": "True", "reason": "R", "message": "m", "lastTransitionTime": T0}
    ]


def test_set_condition_replaces_in_place():
    conds = set_condition(None, "A", True, "R", "m", 1, T0)
    conds = set_condition(conds, "B", True, "R", "m", 1, T0)
    conds = set_condition(conds, "A", True, "Other", "new message", 2, T1)
    assert [c["type"] for c in conds] == ["A", "B"]
    assert conds[0]["reason"] == "Other"
    assert conds[0]["message"] == "new message"
    assert conds[0]["observedGeneration"] == 2
    assert conds[0]["lastTransitionTime"] == T0  # same status: the transition time stays


def test_set_condition_moves_the_transition_time_when_the_status_changes():
    conds = set_condition(None, "A", True, "R", "m", 1, T0)
    conds = set_condition(conds, "A", False, "R", "m", 1, T1)
    assert conds[0]["status"] == "False"
    assert conds[0]["lastTransitionTime"] == T1
    conds = set_condition(conds, "A", None, "R", "m", 1, "2030-01-01T00:02:00Z")
    assert conds[0]["status"] == "Unknown"
    assert conds[0]["lastTransitionTime"] == "2030-01-01T00:02:00Z"


def test_get_condition_and_is_true():
    conds = set_condition(None, "A", True, "R", "m", 1, T0)
    conds = set_condition(conds, "B", False, "R", "m", 1, T0)
    conds = set_condition(conds, "C", None, "R", "m", 1, T0)
    assert get_condition(conds, "A")["status"] == "True"
    assert get_condition(conds, "Z") is None
    assert get_condition(None, "A") is None
    assert [is_true(conds, t) for t in "ABCZ"] == [True, False, False, False]
    assert is_true(None, "A") is False


# --- settings ----------------------------------------------------------------------------------

P = "ALLIANCE_OPERATOR_"


def test_config_defaults():
    config = OperatorConfig.from_env({})
    assert config == OperatorConfig()
    assert config.member_image.startswith("alliance-member:")
    assert config.image_pull_policy == "IfNotPresent"
    assert config.run_as_user > 0  # member pods run as non-root
    for name in ("heartbeat_timeout", "run_interval", "member_interval", "alliance_interval"):
        assert getattr(config, name) > 0, name
    assert 0 < config.store_retry_seconds < config.alliance_interval
    # Empty values and unrelated variables are ignored.
    assert OperatorConfig.from_env({P + "MEMBER_IMAGE": "", "OTHER": "x"}) == OperatorConfig()


def test_config_reads_os_environ(monkeypatch):
    monkeypatch.setenv(P + "RUN_INTERVAL", "0.5")
    assert OperatorConfig.from_env().run_interval == 0.5


@pytest.mark.parametrize(
    "name,raw,value",
    [
        ("member_image", "registry.example.org/alliance-member:1.2.3", None),
        ("image_pull_policy", "Always", None),
        ("run_as_user", "20000", 20000),
        ("heartbeat_timeout", "30", 30.0),
        ("heartbeat_timeout", "2.5", 2.5),
        ("run_interval", "0.25", 0.25),
        ("member_interval", "7", 7.0),
        ("alliance_interval", "1e1", 10.0),
        ("store_retry_seconds", "1.5", 1.5),
        ("metrics_port", "9191", 9191),
        ("metrics_port", "0", 0),
    ],
)
def test_config_overrides(name, raw, value):
    config = OperatorConfig.from_env({P + name.upper(): raw})
    expected = raw if value is None else value
    assert getattr(config, name) == expected
    assert type(getattr(config, name)) is type(getattr(OperatorConfig(), name))
    others = {k: v for k, v in vars(config).items() if k != name}
    assert others == {k: v for k, v in vars(OperatorConfig()).items() if k != name}


@pytest.mark.parametrize(
    "name,raw,kind",
    [
        ("HEARTBEAT_TIMEOUT", "soon", "float"),
        ("STORE_RETRY_SECONDS", "5s", "float"),
        ("RUN_AS_USER", "1.5", "int"),
        ("RUN_AS_USER", "nobody", "int"),
        ("METRICS_PORT", "http", "int"),
    ],
)
def test_config_bad_value_names_the_variable(name, raw, kind):
    with pytest.raises(ValueError) as err:
        OperatorConfig.from_env({P + name: raw})
    assert str(err.value) == f"{P}{name}: not a {kind}: {raw!r}"


@pytest.mark.parametrize("raw", ["-1", "65536"])
def test_config_metrics_port_out_of_range(raw):
    with pytest.raises(ValueError, match=f"^{P}METRICS_PORT: 0 \\(off\\) or a port"):
        OperatorConfig.from_env({P + "METRICS_PORT": raw})


# --- TrainingRun spec merging, store run name; status diffs -----------------------------------


def test_run_fields_are_runspecs():
    assert set(RUN_FIELDS) == set(RunSpec().to_dict())


def test_effective_spec_run_wins_defaults_fill_the_rest():
    spec = {
        "alliance": "mnist",
        "storeCleanupPolicy": "Delete",
        "rounds": 5,
        "batchSize": 8,
        "aggregator": None,  # null: unset
    }
    defaults = {
        "localEpochs": 3,
        "batchSize": 64,
        "aggregator": "fedadam",
        "aggregatorParams": {"beta1": 0.8},
        "roundDeadlineSeconds": 30,
        "notARunField": 1,
    }
    frozen = copy.deepcopy((spec, defaults))
    merged = effective_spec(spec, defaults)
    assert (spec, defaults) == frozen
    assert merged == {
        "rounds": 5,
        "batchSize": 8,
        "localEpochs": 3,
        "aggregator": "fedadam",
        "aggregatorParams": {"beta1": 0.8},
        "roundDeadlineSeconds": 30,
    }
    run = RunSpec.from_dict(merged)
    assert (run.rounds, run.batch_size, run.local_epochs, run.aggregator) == (5, 8, 3, "fedadam")


def test_effective_spec_without_defaults():
    assert effective_spec({"alliance": "a", "rounds": 2}, None) == {"rounds": 2}
    assert effective_spec({"alliance": "a"}, {}) == {}
    assert RunSpec.from_dict(effective_spec({"alliance": "a"}, None)) == RunSpec()


def test_effective_spec_of_a_defaulted_trainingrun_is_runspecs_default():
    body = {
        "apiVersion": API_VERSION,
        "kind": "TrainingRun",
        "metadata": {"name": "r"},
        "spec": {"alliance": "mnist"},
    }
    stored, errors = admit("TrainingRun", body)
    assert errors == []
    assert RunSpec.from_dict(effective_spec(stored["spec"], None)) == RunSpec()
    with_defaults = effective_spec(stored["spec"], {"localEpochs": 4, "aggregator": "median"})
    assert RunSpec.from_dict(with_defaults) == RunSpec(local_epochs=4, aggregator="median")


def test_run_with_its_own_aggregator_does_not_inherit_another_aggregators_params():
    merged = effective_spec(
        {"alliance": "mnist", "aggregator": "median"},
        {"aggregator": "fedadam", "aggregatorParams": {"beta1": 0.8}},
    )
    try:
        spec = RunSpec.from_dict(merged)
    except SpecError as exc:
        pytest.fail(f"rejected: {exc}")
    assert spec.aggregator == "median"


def test_store_run_is_the_name_and_the_uid_head():
    body = {"metadata": {"name": "mnist-fedavg", "uid": "0f1e2d3c-4b5a-6978-8796-a5b4c3d2e1f0"}}
    assert store_run(body) == "mnist-fedavg-0f1e2d3c"
    again = {"metadata": {"name": "mnist-fedavg", "uid": "11111111-2222-3333-4444-555555555555"}}
    assert store_run(again) != store_run(body)


def test_changed_is_the_merge_patch_from_old_to_new():
    old = {"a": 1, "b": [1, 2], "c": {"x": 1}, "gone": "x"}
    new = {"a": 1, "b": [1, 2, 3], "c": {"x": 1}, "d": "new", "e": None}
    frozen = copy.deepcopy((old, new))
    assert changed(old, new) == {"b": [1, 2, 3], "d": "new", "gone": None}
    assert (old, new) == frozen
    assert changed(old, dict(old)) == {}
    assert changed({}, {}) == {}
    assert changed({"a": 1}, {"a": None}) == {"a": None}  # null in a merge patch: delete


# --- kopf's diff-base annotation --------------------------------------------------------------


def test_kopf_keeps_a_digest_not_a_copy_of_what_the_author_wrote(monkeypatch):
    """A copy of the spec and annotations in kopf's annotation could pass the API's 256 KiB
    for all annotations together; then no patch of the object succeeded, and its finalizer was
    never removed."""
    import kopf
    from alliance_operator import main
    from alliance_operator.diffbase import DigestDiffBaseStorage

    monkeypatch.setattr(main.k8s, "login", lambda: None)
    monkeypatch.setattr(main, "CONFIG", dataclasses.replace(main.CONFIG, metrics_port=0))
    settings = kopf.OperatorSettings()
    main.configure(settings=settings)
    storage = settings.persistence.diffbase_storage
    assert isinstance(storage, DigestDiffBaseStorage)

    member = copy.deepcopy(example("member.yaml", "Member"))
    member["metadata"]["annotations"] = {"notes": "x" * (250 * 2**10)}
    member["spec"]["trainCommand"] = "t" * 1024
    patch = kopf.Patch()
    storage.store(
        body=kopf.Body(member), patch=patch, essence=storage.build(body=kopf.Body(member))
    )
    written = patch["metadata"]["annotations"]
    assert sum(len(k) + len(v) for k, v in written.items()) < 200
    member["metadata"]["annotations"].update(written)
    seen = kopf.Body(copy.deepcopy(member))
    assert storage.fetch(body=seen) == storage.build(body=seen)  # nothing changed
    member["spec"]["trainCommand"] = "u"
    assert storage.fetch(body=seen) != storage.build(body=kopf.Body(member))  # a change


def test_the_status_history_shows_the_newest_rounds_and_reasons_within_bounds():
    from alliance_operator import run_report

    from alliance.engine import RoundRecord, RunStatus

    rejected = {f"m{i:03d}": "update rejected: NaN" for i in range(50)}
    record = run_report._shortened({"round": 1, "rejected": dict(rejected), "failed": {"a": "x"}})
    assert len(record["rejected"]) == run_report.STATUS_REASONS + 1
    assert record["rejected"]["..."] == "30 more in the round's record.json"
    assert record["failed"] == {"a": "x"}
    # Rounds are news once, even when the status shows only the newest.
    old = {"history": [{"round": r, "aggregatedAt": 1.0, "finishedAt": 2.0} for r in (11, 12)]}
    status = RunStatus(
        history=[RoundRecord(r, aggregated_at=1.0, finished_at=2.0) for r in range(1, 14)]
    )
    aggregated, finished = run_report.new_rounds(old, status)
    assert [r.round for r in aggregated] == [r.round for r in finished] == [13]


def test_condition_messages_are_cut_to_the_api_limit():
    (cond,) = set_condition(None, "Ready", False, "Bad", "x" * 40_000, 1, "2030-01-01T00:00:00Z")
    assert len(cond["message"]) == 32768 and cond["message"].endswith("…")
