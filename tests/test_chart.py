"""The Helm chart (charts/alliance): lint, rendered scenarios, security, and the operator it starts.

helm comes from ``scripts/install_helm.py`` (``make install`` puts it next to the venv's python).
Each scenario is rendered with ``helm template`` and checked: ``helm lint --strict``, every
built-in object through the ``kubernetes-validate --strict`` command (the real Kubernetes 1.37
schemas, offline); the kinds that tool has no schema for by their own rules (the Alliance against
its CRD's schema, the Prometheus Operator's ServiceMonitor/PodMonitor field by field). Then the
default rendering is applied to the test API server (tests/kube/apiserver.py) and the operator
is started as a local process with the rendered Deployment's command, arguments and environment:
it must answer its liveness probe and reconcile the chart's Alliance. Last, the chart is
installed for real (``helm install``, ``helm test``, ``helm uninstall``) with the kubelet stand-in
(tests/kube/kubelet.py) running the operator's pod, the test pod and the pre-delete hook as local
processes: what stays after the uninstall is exactly what docs/operations.md says stays.

Not checked here: that MinIO starts with these settings (no container runtime), that the
Prometheus Operator accepts the monitors (its CRDs are not available offline), RBAC enforcement
(the test API server authorizes everything), the pods' in-cluster login (the stand-in mounts no
service-account token: they use KUBECONFIG) and NetworkPolicy enforcement (no CNI). MinIO's
generated certificate is checked without MinIO: its names (DER) and a TLS handshake with Python's
ssl module that verifies it against the generated CA.
"""

from __future__ import annotations

import base64
import concurrent.futures
import contextlib
import ipaddress
import json
import os
import re
import signal
import socket
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import jsonschema
import pytest
import yaml
from alliance_operator.resources.pods import init_pod, member_pod

from tests.test_crds import admit

ROOT = Path(__file__).resolve().parents[1]
CHART = ROOT / "charts" / "alliance"
BIN = Path(sys.executable).parent
HELM = BIN / "helm"
KUBECTL = BIN / "kubectl"
VALIDATE = BIN / "kubernetes-validate"
KUBERNETES_VERSION = "1.37.0"
RELEASE = "alliance"
NAMESPACE = "federation"

#: The scenarios CI renders, as values files. Each is also linted with --strict.
SCENARIOS: dict[str, dict] = {
    "defaults": {},
    "external-s3": {
        "minio": {"enabled": False},
        "externalStore": {
            "endpoint": "https://s3.example.org:8443",
            "existingSecret": "s3-keys",
            "accessKeyKey": "AWS_ACCESS_KEY_ID",
            "secretKeyKey": "AWS_SECRET_ACCESS_KEY",
            "caSecret": {"name": "s3-ca", "key": "ca.pem"},
        },
        "networkPolicy": {"externalStoreCIDRs": ["203.0.113.0/24", "2001:db8::/32"]},
    },
    # MinIO for members outside the cluster too: a node port, the names they use in the
    # certificate, their networks admitted; the operator's API server pinned.
    "remote-members": {
        "minio": {
            "tls": {"extraSANs": ["s3.alliance.example", "198.51.100.7", "2001:db8::7"]},
            "service": {"type": "NodePort", "nodePort": 30900},
        },
        "alliance": {"remoteEndpoint": "https://s3.alliance.example:30900"},
        "networkPolicy": {
            "remoteMembersFrom": [
                {"ipBlock": {"cidr": "192.0.2.0/24"}},
                {"ipBlock": {"cidr": "2001:db8:1::/48"}},
            ],
            "apiServer": {"cidrs": ["10.0.0.1/32", "172.18.0.2/32"], "ports": [6443]},
        },
    },
    "cert-manager": {
        "minio": {
            "tls": {
                "extraSANs": ["s3.alliance.example", "198.51.100.7"],
                "certManager": {"issuerRef": {"name": "alliance-ca", "kind": "ClusterIssuer"}},
            },
            "service": {"type": "LoadBalancer"},
        },
        "alliance": {"remoteEndpoint": "https://s3.alliance.example:9000"},
        "networkPolicy": {"remoteMembersFrom": [{"ipBlock": {"cidr": "192.0.2.0/24"}}]},
    },
    "metrics-dashboard": {
        "metrics": {
            "serviceMonitor": {
                "enabled": True,
                "interval": "15s",
                "labels": {"release": "prometheus"},
            },
            "dashboard": {"enabled": True, "namespace": "monitoring"},
        },
    },
    "custom-images-resources": {
        "imagePullSecrets": [{"name": "regcred"}],
        "operator": {
            "image": {"repository": "example/alliance-operator", "tag": "1.2.3"},
            "resources": {
                "requests": {"cpu": "250m", "memory": "512Mi"},
                "limits": {"cpu": 2, "memory": "2Gi"},
            },
            "nodeSelector": {"kubernetes.io/os": "linux"},
            "tolerations": [{"key": "dedicated", "operator": "Equal", "value": "ml"}],
            "affinity": {
                "nodeAffinity": {
                    "requiredDuringSchedulingIgnoredDuringExecution": {
                        "nodeSelectorTerms": [
                            {
                                "matchExpressions": [
                                    {"key": "pool", "operator": "In", "values": ["control"]}
                                ]
                            }
                        ]
                    }
                }
            },
            "heartbeatTimeout": 120,
            "runInterval": 0.5,
            "logFormat": "json",
            "verbose": True,
        },
        "member": {
            "image": {"repository": "example/alliance-member", "tag": "1.2.3-gpu"},
            "runAsUser": 20002,
        },
        "minio": {
            "image": {"tag": "RELEASE.2025-04-22T22-12-26Z", "pullPolicy": "Always"},
            "resources": {
                "requests": {"cpu": "1", "memory": "1Gi"},
                "limits": {"cpu": 4, "memory": "4Gi"},
            },
            "persistence": {"size": "100Gi", "storageClass": "fast-ssd"},
            "auth": {"existingSecret": "my-minio-root"},
        },
        "tests": {"resources": {"limits": {"cpu": "100m", "memory": "128Mi"}}},
        "alliance": {
            "name": "cifar",
            "bucket": "cifar-fl",
            "model": {"kerasObject": "uploads/cifar.keras"},
            "seed": 7,
            "runDefaults": {
                "localEpochs": 2,
                "aggregator": "fedadam",
                # As `--set` passes decimals: strings.
                "aggregatorParams": {"serverLearningRate": "0.01", "tau": "1e-3", "beta1": 0.9},
                "roundDeadlineSeconds": "90.5",
                "weighting": "equal",
                "maxUpdateNorm": "1e3",
            },
        },
    },
    "watched-namespaces": {
        "operator": {"watchNamespaces": [NAMESPACE, "team-a", "team-b"]},
        "metrics": {"serviceMonitor": {"enabled": True}},
    },
}

TEST_POD = f"{RELEASE}-test"  # helm test
HOOK = f"{RELEASE}-uninstall"  # the pre-delete hook: Pod, ServiceAccount, Role, RoleBinding
API_CLIENT_PODS = {f"Deployment/{RELEASE}-operator", f"Pod/{HOOK}"}

ALLIANCE_RESOURCES = ("alliances", "members", "trainingruns")
OPERATOR_RULES = {  # (apiGroup, resource) -> verbs: exactly what the operator and kopf call
    ("", "pods"): {"get", "list", "create", "delete"},
    # Named Secrets only (no list/watch); Members' own Secrets go by garbage collection.
    ("", "secrets"): {"get", "create", "patch"},
    ("", "persistentvolumeclaims"): {"get"},
    ("", "events"): {"create"},
    **{("alliance.dev", r): {"get", "list", "watch", "patch"} for r in ALLIANCE_RESOURCES},
    **{("alliance.dev", f"{r}/status"): {"patch"} for r in ALLIANCE_RESOURCES},
}
SCANNING_CRDS = {("apiextensions.k8s.io", "customresourcedefinitions"): {"list", "watch"}}
SCANNING_NAMESPACES = {("", "namespaces"): {"list", "watch"}}

DASHBOARD_METRICS = {
    "alliance_rounds_completed_total": "counter",
    "alliance_round_duration_seconds": "histogram",
    "alliance_round_accuracy": "gauge",
    "alliance_round_loss": "gauge",
    "alliance_members_ready": "gauge",
    "alliance_members_dropped_total": "counter",
    "alliance_update_bytes_total": "counter",
    "alliance_aggregation_seconds": "histogram",
    "alliance_member_samples_per_second": "gauge",
    "alliance_member_task_seconds": "histogram",
}


# --- helpers ---------------------------------------------------------------------------------


def helm(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    if not HELM.exists():
        pytest.fail(f"{HELM} is missing: run make install (scripts/install_helm.py)", pytrace=False)
    result = subprocess.run(
        [str(HELM), *args], capture_output=True, text=True, timeout=60, cwd=ROOT
    )
    if check and result.returncode != 0:
        pytest.fail(f"helm {' '.join(args)} failed:\n{result.stderr}{result.stdout}", pytrace=False)
    return result


def values_file(tmp_path: Path, name: str, values: dict) -> Path:
    path = tmp_path / f"{name}.values.yaml"
    path.write_text(yaml.safe_dump(values, sort_keys=False))
    return path


def template(values_path: Path, *extra: str, check: bool = True) -> subprocess.CompletedProcess:
    return helm(
        "template", RELEASE, str(CHART), "--namespace", NAMESPACE, "-f", str(values_path),
        *extra, check=check,
    )  # fmt: skip


def docs(text: str) -> list[dict]:
    return [d for d in yaml.safe_load_all(text) if d]


@pytest.fixture(scope="module")
def rendered(tmp_path_factory) -> dict[str, tuple[str, list[dict]]]:
    """Each scenario's rendered text and its documents, rendered once for the module."""
    tmp = tmp_path_factory.mktemp("chart")
    out = {}
    for name, values in SCENARIOS.items():
        text = template(values_file(tmp, name, values)).stdout
        out[name] = (text, docs(text))
    return out


def find(objs: list[dict], kind: str, name: str | None = None) -> list[dict]:
    return [
        o for o in objs if o["kind"] == kind and (name is None or o["metadata"]["name"] == name)
    ]


def one(objs: list[dict], kind: str, name: str | None = None) -> dict:
    found = find(objs, kind, name)
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


def not_hooks(objs: list[dict]) -> list[dict]:
    """What ``helm install`` applies; hooks run apart (``helm test``, ``helm uninstall``)."""
    return [o for o in objs if "helm.sh/hook" not in (o["metadata"].get("annotations") or {})]


def pod_specs(objs: list[dict]) -> list[tuple[str, dict, dict]]:
    """(kind/name, pod labels, pod spec) of every pod the chart runs."""
    out = []
    for o in objs:
        if o["kind"] in ("Deployment", "StatefulSet"):
            pod = o["spec"]["template"]
        elif o["kind"] == "Pod":
            pod = o
        else:
            continue
        out.append((f"{o['kind']}/{o['metadata']['name']}", pod["metadata"]["labels"], pod["spec"]))
    return out


def selector_matches(selector: dict, labels: dict) -> bool:
    """A Kubernetes label selector (matchLabels, matchExpressions) against labels."""
    for key, value in (selector.get("matchLabels") or {}).items():
        if labels.get(key) != value:
            return False
    for expr in selector.get("matchExpressions") or []:
        key, op, values = expr["key"], expr["operator"], expr.get("values") or []
        if op == "In" and labels.get(key) not in values:
            return False
        if op == "NotIn" and labels.get(key) in values:
            return False
        if op == "Exists" and key not in labels:
            return False
        if op == "DoesNotExist" and key in labels:
            return False
    return True


def rules_of(role: dict) -> dict[tuple[str, str], set[str]]:
    out: dict[tuple[str, str], set[str]] = {}
    for rule in role["rules"]:
        assert set(rule) <= {"apiGroups", "resources", "verbs"}, rule
        for group in rule["apiGroups"]:
            for resource in rule["resources"]:
                out.setdefault((group, resource), set()).update(rule["verbs"])
    return out


def member_pods(alliance: str = "mnist") -> list[dict]:
    """The pods the operator really builds, for checking the chart's selectors against."""
    alliance_spec = {
        "store": {
            "endpoint": "http://alliance-minio:9000",
            "bucket": "alliance",
            "credentialsSecret": {"name": "alliance-minio"},
        }
    }
    member_spec = {"alliance": alliance, "dataVolumeClaim": "hospital-a-data"}
    return [
        member_pod(
            "hospital-a",
            member_spec,
            alliance_spec,
            "alliance-member:0.1.0",
            credentials_secret="hospital-a-store",
            credentials_digest="0",
        ),
        init_pod(alliance, alliance_spec, "alliance-member:0.1.0"),
    ]


# --- helm lint and the schema ----------------------------------------------------------------


def test_helm_is_installed():
    assert HELM.exists(), f"{HELM} is missing: run make install (scripts/install_helm.py)"
    assert helm("version", "--short").stdout.startswith("v3.17.2")


@pytest.mark.parametrize("scenario", sorted(SCENARIOS))
def test_helm_lint_strict(scenario, tmp_path):
    path = values_file(tmp_path, scenario, SCENARIOS[scenario])
    result = helm("lint", "--strict", str(CHART), "--namespace", NAMESPACE, "-f", str(path))
    assert "1 chart(s) linted, 0 chart(s) failed" in result.stdout
    assert "[WARNING]" not in result.stdout and "[ERROR]" not in result.stdout


@pytest.mark.parametrize(
    "values, message",
    [
        ({"operator": {"logFormat": "xml"}}, "operator.logFormat"),  # an enum
        ({"operator": {"metricsPort": 70000}}, "operator.metricsPort"),  # a maximum
        ({"operator": {"runInterval": 0}}, "operator.runInterval"),  # exclusiveMinimum
        ({"operator": {"watchNamespaces": ["Team_A"]}}, "operator.watchNamespaces"),  # a pattern
        ({"member": {"runAsUser": 0}}, "member.runAsUser"),  # non-root
        ({"alliance": {"bucket": "No"}}, "alliance.bucket"),
        ({"minio": {"persistence": {"size": "lots"}}}, "minio.persistence.size"),
        ({"networkPolicy": {"enabled": "yes"}}, "networkPolicy.enabled"),  # a type
        ({"uninstallHook": {"timeoutSeconds": 0}}, "uninstallHook.timeoutSeconds"),
        ({"operator": {"replicas": 2}}, "replicas"),  # unknown keys, at every level
        ({"minio": {"auth": {"rootPassword": "hunter2"}}}, "rootPassword"),  # never a password
        ({"operator": {"resources": {"limit": {"cpu": 1}}}}, "limit"),
        ({"bogus": True}, "bogus"),
        ({"minio": {"service": {"type": "ExternalName"}}}, "minio.service.type"),
        ({"minio": {"tls": {"extraSANs": ["https://s3.example"]}}}, "minio.tls.extraSANs"),
        ({"alliance": {"remoteEndpoint": "s3.example:9000"}}, "alliance.remoteEndpoint"),
        ({"networkPolicy": {"apiServer": {"ports": []}}}, "networkPolicy.apiServer.ports"),
        ({"networkPolicy": {"remoteMembersFrom": [{}]}}, "networkPolicy.remoteMembersFrom"),
        ({"externalStore": {"caSecret": {"name": "s3-ca", "cert": "x"}}}, "cert"),
    ],
)
def test_schema_refuses_bad_values(values, message, tmp_path):
    result = template(values_file(tmp_path, "bad", values), check=False)
    assert result.returncode != 0, f"{values} was accepted"
    assert "values don't meet the specifications of the schema" in result.stderr, result.stderr
    assert message in result.stderr, result.stderr


@pytest.mark.parametrize(
    "values, message",
    [
        ({"minio": {"enabled": False}}, "set externalStore.endpoint"),
        (
            {"minio": {"enabled": False}, "externalStore": {"endpoint": "https://s3.example.org"}},
            "set externalStore.existingSecret",
        ),
        ({"externalStore": {"endpoint": "https://s3.example.org"}}, "set minio.enabled=false"),
        ({"operator": {"watchNamespaces": ["team-a"]}}, "does not list"),
        ({"minio": {"service": {"nodePort": 30900}}}, "minio.service.type is ClusterIP"),
        (
            {"minio": {"tls": {"enabled": False, "certManager": {"issuerRef": {"name": "ca"}}}}},
            "minio.tls.enabled is false",
        ),
        ({"externalStore": {"caSecret": {"name": "s3-ca"}}}, "set minio.enabled=false"),
    ],
)
def test_inconsistent_values_fail_with_a_message(values, message, tmp_path):
    result = template(values_file(tmp_path, "bad", values), check=False)
    assert result.returncode != 0
    assert message in result.stderr, result.stderr


#: Kubernetes structures passed through as they are: documented as one value each.
PASS_THROUGH = {"resources", "affinity", "tolerations", "nodeSelector", "stringMap"}


def schema_leaves(values, schema: dict, root: dict | None = None, path: str = ""):
    """Every documented unit of values.yaml: a key whose schema is a closed object of the chart
    recurses; anything else (scalars, lists, maps, Kubernetes structures) is one leaf.
    ``root``: the whole values.schema.json (its definitions), default ``schema``."""
    root = schema if root is None else root
    closed = schema.get("additionalProperties") is False and "properties" in schema
    if isinstance(values, dict) and closed:
        for key, value in values.items():
            sub = schema["properties"].get(key)
            assert sub is not None, f"values.yaml key {path + key} is not in values.schema.json"
            if _definition(sub) in PASS_THROUGH:
                yield f"{path}{key}"
            else:
                yield from schema_leaves(value, resolve(sub, root), root, f"{path}{key}.")
    else:
        yield path.rstrip(".")


def _definition(node: dict) -> str | None:
    if "allOf" in node and len(node["allOf"]) == 1:
        node = node["allOf"][0]
    return node["$ref"].rsplit("/", 1)[1] if "$ref" in node else None


def resolve(node: dict, root: dict) -> dict:
    """``node`` with its $ref (or single allOf) followed into ``root``'s definitions."""
    while "$ref" in node or ("allOf" in node and len(node["allOf"]) == 1):
        ref = node["$ref"] if "$ref" in node else node["allOf"][0]["$ref"]
        node = root["definitions"][ref.rsplit("/", 1)[1]]
    return node


def assert_closed(schema: dict) -> None:
    """Every object of a values schema sets additionalProperties (false when it lists
    properties), and every property has a type."""

    def walk(node, where):
        node = resolve(node, schema)
        types = node.get("type")
        types = types if isinstance(types, list) else [types]
        if "object" in types:
            assert "additionalProperties" in node, f"{where}: additionalProperties not set"
            if "properties" in node:
                assert node["additionalProperties"] is False, f"{where} is not closed"
            for key, sub in node.get("properties", {}).items():
                assert "type" in resolve(sub, schema), f"{where}.{key} has no type"
                walk(sub, f"{where}.{key}")
            if isinstance(node["additionalProperties"], dict):
                walk(node["additionalProperties"], f"{where}.*")
        if "array" in types:
            walk(node["items"], f"{where}[]")

    walk(schema, "values")


def test_schema_covers_every_value_and_closes_every_object():
    schema = json.loads((CHART / "values.schema.json").read_text())
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    assert schema["$schema"] == "http://json-schema.org/draft-07/schema#"
    jsonschema.Draft7Validator.check_schema(schema)
    jsonschema.Draft7Validator(schema).validate(values)
    leaves = list(schema_leaves(values, schema))
    assert len(leaves) > 50
    assert_closed(schema)


def test_values_are_documented_key_by_key():
    text = (CHART / "values.yaml").read_text()
    documented = re.findall(r"^\s*## @param (\S+) \S", text, re.M)
    assert len(documented) == len(set(documented)), "a key is documented twice"
    schema = json.loads((CHART / "values.schema.json").read_text())
    leaves = set(schema_leaves(yaml.safe_load(text), schema))
    assert set(documented) == leaves, (
        f"undocumented: {sorted(leaves - set(documented))}; "
        f"documented but absent: {sorted(set(documented) - leaves)}"
    )
    assert not re.search(r"(?i)^\s*(\w*password|\w*secretkey|accesskey)\s*:", text, re.M)


# --- the CRDs --------------------------------------------------------------------------------


def test_chart_crds_are_copies_of_crds():
    ours = {p.name: p.read_bytes() for p in (ROOT / "crds").glob("*.yaml")}
    chart = {p.name: p.read_bytes() for p in (CHART / "crds").glob("*.yaml")}
    drifted = sorted(n for n in ours.keys() | chart.keys() if ours.get(n) != chart.get(n))
    assert not drifted, (
        f"charts/alliance/crds/ differs from crds/ ({', '.join(drifted)}): "
        "run: cp crds/*.yaml charts/alliance/crds/"
    )


# --- the rendered manifests ------------------------------------------------------------------

CUSTOM_KINDS = {"Alliance", "ServiceMonitor", "PodMonitor", "Certificate"}


@pytest.mark.parametrize("scenario", sorted(SCENARIOS))
def test_rendered_manifests_pass_kubernetes_validate(scenario, rendered, tmp_path):
    text, objs = rendered[scenario]
    path = tmp_path / f"{scenario}.yaml"
    path.write_text(text)
    result = subprocess.run(
        [str(VALIDATE), "--strict", "-k", KUBERNETES_VERSION, str(path)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    builtin = [o for o in objs if o["kind"] not in CUSTOM_KINDS]
    passed = re.findall(r"^INFO .* passed for resource (\S+) ", result.stdout, re.M)
    expected = [f"{o['kind'].lower()}/{o['metadata']['name']}" for o in builtin]
    assert sorted(passed) == sorted(expected), result.stdout
    assert "ERROR" not in result.stdout
    warned = re.findall(r"^WARN .*schema for kind (\S+) ", result.stdout, re.M)
    assert set(warned) <= CUSTOM_KINDS, result.stdout  # checked by their own rules below
    assert len(warned) == len(objs) - len(builtin)


@pytest.mark.parametrize("scenario", sorted(SCENARIOS))
def test_alliance_is_valid_for_its_crd(scenario, rendered):
    _, objs = rendered[scenario]
    (alliance,) = find(objs, "Alliance")
    _, errors = admit("Alliance", alliance)
    assert not errors
    assert alliance["metadata"]["namespace"] == NAMESPACE


def test_default_alliance_points_at_the_chart_store(rendered):
    _, objs = rendered["defaults"]
    store = one(objs, "Alliance", "mnist")["spec"]["store"]
    assert store["endpoint"] == f"https://alliance-minio.{NAMESPACE}.svc:9000"
    assert store["bucket"] == "alliance"
    secret = one(objs, "Secret", "alliance-minio")
    assert store["credentialsSecret"] == {
        "name": secret["metadata"]["name"],
        "accessKeyKey": "accessKey",
        "secretKeyKey": "secretKey",
    }
    assert set(secret["data"]) == {"accessKey", "secretKey"}
    # The operator uses the keys only for the Alliance named, with the endpoint named.
    annotations = secret["metadata"]["annotations"]
    assert annotations["alliance.dev/alliances"] == "mnist"
    assert annotations["alliance.dev/store-endpoint"] == store["endpoint"]
    tls = one(objs, "Secret", "alliance-minio-tls")
    assert store["caSecret"] == {"name": tls["metadata"]["name"], "key": "ca.crt"}
    assert tls["metadata"]["annotations"]["alliance.dev/alliances"] == "mnist"
    assert "remoteEndpoint" not in store
    service = one(objs, "Service", "alliance-minio")
    assert [p["port"] for p in service["spec"]["ports"]] == [9000]
    assert service["spec"]["type"] == "ClusterIP" and "nodePort" not in service["spec"]["ports"][0]
    assert "externalTrafficPolicy" not in service["spec"]


def test_alliance_names_what_the_values_name(tmp_path):
    """Another Alliance name goes into the Secrets' annotations too; without TLS, http and no CA."""
    values = {"alliance": {"name": "cifar"}, "minio": {"tls": {"enabled": False}}}
    objs = docs(template(values_file(tmp_path, "cifar", values)).stdout)
    store = one(objs, "Alliance", "cifar")["spec"]["store"]
    assert store["endpoint"] == f"http://alliance-minio.{NAMESPACE}.svc:9000"
    assert "caSecret" not in store
    (secret,) = find(objs, "Secret")
    assert secret["metadata"]["annotations"]["alliance.dev/alliances"] == "cifar"
    assert secret["metadata"]["annotations"]["alliance.dev/store-endpoint"] == store["endpoint"]
    (c,) = one(objs, "StatefulSet")["spec"]["template"]["spec"]["containers"]
    assert "--certs-dir" not in c["args"]
    assert c["readinessProbe"]["httpGet"]["scheme"] == "HTTP"
    (test,) = one(objs, "Pod", TEST_POD)["spec"]["containers"]
    assert test["command"][-1] == ""  # the system's CAs (none needed for http)


def test_external_store_scenario(rendered):
    _, objs = rendered["external-s3"]
    assert not find(objs, "StatefulSet") and not find(objs, "Secret")
    assert not [o for o in objs if "minio" in o["metadata"]["name"]]
    store = one(objs, "Alliance")["spec"]["store"]
    assert store == {
        "endpoint": "https://s3.example.org:8443",
        "bucket": "alliance",
        "credentialsSecret": {
            "name": "s3-keys",
            "accessKeyKey": "AWS_ACCESS_KEY_ID",
            "secretKeyKey": "AWS_SECRET_ACCESS_KEY",
        },
        "caSecret": {"name": "s3-ca", "key": "ca.pem"},
    }
    policy = one(objs, "NetworkPolicy", "alliance-members")
    (to_store, dns) = policy["spec"]["egress"]
    assert to_store["ports"] == [{"port": 8443, "protocol": "TCP"}]
    assert to_store["to"] == [
        {"ipBlock": {"cidr": "203.0.113.0/24"}},
        {"ipBlock": {"cidr": "2001:db8::/32"}},
    ]
    assert {p["port"] for p in dns["ports"]} == {53}


def test_custom_images_and_resources(rendered):
    _, objs = rendered["custom-images-resources"]
    values = SCENARIOS["custom-images-resources"]
    op = one(objs, "Deployment")["spec"]["template"]["spec"]
    (container,) = op["containers"]
    assert container["image"] == "example/alliance-operator:1.2.3"
    assert container["resources"] == values["operator"]["resources"]
    assert op["nodeSelector"] == values["operator"]["nodeSelector"]
    assert op["tolerations"] == values["operator"]["tolerations"]
    assert op["affinity"] == values["operator"]["affinity"]
    assert op["imagePullSecrets"] == [{"name": "regcred"}]
    env = {e["name"]: e["value"] for e in container["env"]}
    assert env["ALLIANCE_OPERATOR_MEMBER_IMAGE"] == "example/alliance-member:1.2.3-gpu"
    assert env["ALLIANCE_OPERATOR_RUN_AS_USER"] == "20002"
    assert env["ALLIANCE_OPERATOR_HEARTBEAT_TIMEOUT"] == "120"
    assert env["ALLIANCE_OPERATOR_RUN_INTERVAL"] == "0.5"
    assert container["args"][-3:] == ["--log-format", "json", "--verbose"]
    minio = one(objs, "StatefulSet")["spec"]
    (mc,) = minio["template"]["spec"]["containers"]
    assert mc["imagePullPolicy"] == "Always"
    assert mc["resources"] == values["minio"]["resources"]
    (claim,) = minio["volumeClaimTemplates"]
    assert claim["spec"]["storageClassName"] == "fast-ssd"
    assert claim["spec"]["resources"]["requests"]["storage"] == "100Gi"
    # A Secret named in values replaces the generated one, everywhere (the certificate's stays).
    assert [s["metadata"]["name"] for s in find(objs, "Secret")] == ["alliance-minio-tls"]
    refs = {e["valueFrom"]["secretKeyRef"]["name"] for e in mc["env"] if "valueFrom" in e}
    assert refs == {"my-minio-root"}
    assert one(objs, "Alliance")["spec"]["store"]["credentialsSecret"]["name"] == "my-minio-root"
    spec = one(objs, "Alliance", "cifar")["spec"]
    assert spec["model"] == {"kerasObject": "uploads/cifar.keras"} and spec["seed"] == 7
    assert spec["runDefaults"] == {
        "localEpochs": 2,
        "aggregator": "fedadam",
        "aggregatorParams": {"serverLearningRate": 0.01, "tau": 0.001, "beta1": 0.9},
        "roundDeadlineSeconds": 90.5,
        "weighting": "equal",
        "maxUpdateNorm": 1000,
    }
    (tc,) = one(objs, "Pod", TEST_POD)["spec"]["containers"]
    assert tc["image"] == "example/alliance-member:1.2.3-gpu"
    # Maps merge with the chart's defaults (Helm): the requests stay.
    assert tc["resources"]["limits"] == values["tests"]["resources"]["limits"]
    assert tc["resources"]["requests"]


def test_decimals_given_with_set(tmp_path):
    """``--set`` passes 0.5 as a string: the schema takes decimal strings for those settings."""
    path = values_file(tmp_path, "defaults", {})
    result = template(
        path, "--set", "operator.runInterval=0.25", "--set", "operator.heartbeatTimeout=90"
    )
    (c,) = one(docs(result.stdout), "Deployment")["spec"]["template"]["spec"]["containers"]
    env = {e["name"]: e["value"] for e in c["env"]}
    assert env["ALLIANCE_OPERATOR_RUN_INTERVAL"] == "0.25"
    assert env["ALLIANCE_OPERATOR_HEARTBEAT_TIMEOUT"] == "90"
    for bad in ("0", "soon", "-1"):
        refused = template(path, "--set", f"operator.runInterval={bad}", check=False)
        assert refused.returncode != 0 and "operator.runInterval" in refused.stderr, bad


def test_images_default_to_the_app_version(rendered):
    _, objs = rendered["defaults"]
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    app = chart["appVersion"]
    assert (chart["apiVersion"], chart["version"], app) == ("v2", "0.1.0", "0.1.0")
    (container,) = one(objs, "Deployment")["spec"]["template"]["spec"]["containers"]
    assert container["image"] == f"alliance-operator:{app}"
    env = {e["name"]: e["value"] for e in container["env"]}
    assert env["ALLIANCE_OPERATOR_MEMBER_IMAGE"] == f"alliance-member:{app}"
    (mc,) = one(objs, "StatefulSet")["spec"]["template"]["spec"]["containers"]
    assert re.fullmatch(r"minio/minio:RELEASE\.\d{4}-\d\d-\d\dT\d\d-\d\d-\d\dZ", mc["image"])


def test_operator_deployment(rendered):
    _, objs = rendered["defaults"]
    deploy = one(objs, "Deployment", "alliance-operator")
    assert deploy["spec"]["replicas"] == 1
    assert deploy["spec"]["strategy"] == {"type": "Recreate"}
    pod = deploy["spec"]["template"]
    assert selector_matches(deploy["spec"]["selector"], pod["metadata"]["labels"])
    spec = pod["spec"]
    assert one(objs, "ServiceAccount", spec["serviceAccountName"])  # the operator's own
    (c,) = spec["containers"]
    assert c["command"] == ["alliance-operator"]
    assert c["args"][:3] == ["--all-namespaces", "--liveness", "http://0.0.0.0:8080/healthz"]
    assert c["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "healthz"}
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert ports == {"healthz": 8080, "metrics": 9090}
    env = {e["name"]: e["value"] for e in c["env"]}
    assert env["ALLIANCE_OPERATOR_METRICS_PORT"] == "9090"
    assert env["ALLIANCE_OPERATOR_IMAGE_PULL_POLICY"] == "IfNotPresent"
    for key in ("HEARTBEAT_TIMEOUT", "RUN_INTERVAL", "MEMBER_INTERVAL", "ALLIANCE_INTERVAL"):
        assert f"ALLIANCE_OPERATOR_{key}" in env
    service = one(objs, "Service", "alliance-operator-metrics")
    assert selector_matches({"matchLabels": service["spec"]["selector"]}, pod["metadata"]["labels"])
    assert service["spec"]["ports"] == [
        {"name": "metrics", "port": 9090, "targetPort": "metrics", "protocol": "TCP"}
    ]


# --- RBAC ------------------------------------------------------------------------------------


def test_rbac_cluster_wide_by_default(rendered):
    objs = not_hooks(rendered["defaults"][1])
    assert not find(objs, "Role") and not find(objs, "RoleBinding")
    role = one(objs, "ClusterRole")
    assert rules_of(role) == {**OPERATOR_RULES, **SCANNING_CRDS}
    binding = one(objs, "ClusterRoleBinding")
    assert binding["roleRef"] == {
        "apiGroup": "rbac.authorization.k8s.io",
        "kind": "ClusterRole",
        "name": role["metadata"]["name"],
    }
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": "alliance-operator", "namespace": NAMESPACE}
    ]


def test_rbac_per_watched_namespace(rendered):
    objs = not_hooks(rendered["watched-namespaces"][1])
    watched = SCENARIOS["watched-namespaces"]["operator"]["watchNamespaces"]
    roles = find(objs, "Role")
    assert sorted(r["metadata"]["namespace"] for r in roles) == sorted(watched)
    for role in roles:
        assert rules_of(role) == OPERATOR_RULES
    bindings = find(objs, "RoleBinding")
    assert sorted(b["metadata"]["namespace"] for b in bindings) == sorted(watched)
    for b in bindings:
        assert b["roleRef"]["kind"] == "Role"
        assert b["subjects"][0]["namespace"] == NAMESPACE
    # Cluster-wide only what kopf scans with: CRDs and namespaces, list and watch.
    (cluster_role,) = find(objs, "ClusterRole")
    assert rules_of(cluster_role) == {**SCANNING_CRDS, **SCANNING_NAMESPACES}
    (c,) = one(objs, "Deployment")["spec"]["template"]["spec"]["containers"]
    args = c["args"]
    assert "--all-namespaces" not in args
    assert [args[i + 1] for i, a in enumerate(args) if a == "--namespace"] == watched


def test_rbac_without_cluster_scanning(tmp_path):
    values = {"operator": {"watchNamespaces": [NAMESPACE]}, "rbac": {"clusterScanning": False}}
    objs = not_hooks(docs(template(values_file(tmp_path, "noscan", values)).stdout))
    assert not find(objs, "ClusterRole") and not find(objs, "ClusterRoleBinding")
    assert rules_of(one(objs, "Role")) == OPERATOR_RULES


API_VERBS = {"read": "get", "get": "get", "list": "list", "create": "create", "delete": "delete",
             "patch": "patch", "replace": "update"}  # fmt: skip


OPERATOR_PACKAGE = ROOT / "operator" / "alliance_operator"
UNINSTALL_MODULE = OPERATOR_PACKAGE / "uninstall.py"  # the pre-delete hook, with its own Role


def api_calls(text: str) -> set[tuple[str, str]]:
    """(verb, kind) of each call of the kubernetes client in the code (kind: pod, custom_object)."""
    found = re.findall(
        r"\.(read|get|list|create|delete|patch|replace)_namespaced_([a-z_]+?)\(", text
    )
    return {(API_VERBS[verb], kind) for verb, kind in found}


def test_rbac_grants_every_api_call_of_the_operator():
    """Each call of the kubernetes client in the operator's code has its rule (and the rules
    grant nothing the code and kopf do not use: OPERATOR_RULES is exact, see above). On Secrets
    and claims, which only the operator's code touches (not kopf), the rights are exactly its
    calls: no list or watch of Secrets, no delete."""
    calls = set()
    for path in OPERATOR_PACKAGE.rglob("*.py"):
        if path == UNINSTALL_MODULE:
            continue
        for verb, kind in api_calls(path.read_text()):
            if kind == "custom_object_status":  # a daemon's own status writes
                resources = tuple(f"{r}/status" for r in ALLIANCE_RESOURCES)
            elif kind == "custom_object":
                resources = ALLIANCE_RESOURCES
            else:  # persistent_volume_claim -> persistentvolumeclaims
                resources = (kind.replace("_", "") + "s",)
            group = "alliance.dev" if kind.startswith("custom_object") else ""
            calls |= {(group, r, verb) for r in resources}
    assert calls, "no API calls found: has k8s.py moved?"
    for group, resource, verb in sorted(calls):
        assert verb in OPERATOR_RULES.get((group, resource), set()), (
            f"the operator calls {verb} on {group or 'core'}/{resource}: grant it in "
            "charts/alliance/templates/operator-rbac.yaml (alliance.operator.rules) and here"
        )
    for resource in ("secrets", "persistentvolumeclaims"):
        called = {verb for group, r, verb in calls if (group, r) == ("", resource)}
        assert OPERATOR_RULES[("", resource)] == called, resource


def test_no_wildcards_in_rbac(rendered):
    for _, objs in rendered.values():
        for role in find(objs, "Role") + find(objs, "ClusterRole"):
            for rule in role["rules"]:
                for field in ("apiGroups", "resources", "verbs"):
                    assert "*" not in rule[field], role["metadata"]["name"]
                assert "resourceNames" not in rule or rule["resourceNames"]


# --- security --------------------------------------------------------------------------------


@pytest.mark.parametrize("scenario", sorted(SCENARIOS))
def test_every_pod_is_hardened(scenario, rendered):
    _, objs = rendered[scenario]
    specs = pod_specs(objs)
    assert specs
    for where, _, spec in specs:
        sc = spec["securityContext"]
        assert sc["runAsNonRoot"] is True, where
        assert sc["runAsUser"] > 0 and sc["runAsGroup"] > 0, where
        assert sc["seccompProfile"] == {"type": "RuntimeDefault"}, where
        # Only the pods that call the Kubernetes API get a token: their own account's.
        assert spec["automountServiceAccountToken"] is (where in API_CLIENT_PODS), where
        if where in API_CLIENT_PODS:
            assert spec["serviceAccountName"] not in ("", "default"), where
        assert spec["enableServiceLinks"] is False, where
        tmp = [v["name"] for v in spec["volumes"] if "emptyDir" in v]
        assert "hostNetwork" not in spec and "hostPID" not in spec, where
        for c in spec.get("initContainers", []) + spec["containers"]:
            csc = c["securityContext"]
            assert csc["allowPrivilegeEscalation"] is False, where
            assert csc["readOnlyRootFilesystem"] is True, where
            assert csc["capabilities"] == {"drop": ["ALL"]}, where
            assert "privileged" not in csc, where
            mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
            assert mounts.get("/tmp") in tmp, f"{where}: /tmp is not an emptyDir"
            assert c["resources"].get("limits"), f"{where}: no resource limits"
            assert ":" in c["image"] and not c["image"].endswith(":latest"), where
    by_kind = {w.split("/")[0]: s for w, _, s in specs}
    assert by_kind["Deployment"]["securityContext"]["runAsUser"] == 10001
    if "StatefulSet" in by_kind:
        assert by_kind["StatefulSet"]["securityContext"]["runAsUser"] == 1000


SECRET_ENV = re.compile(r"(?i)(password|secret|access_?key|token|credential)")


@pytest.mark.parametrize("scenario", sorted(SCENARIOS))
def test_no_literal_secret_in_the_manifests(scenario, rendered):
    text, objs = rendered[scenario]
    secrets = find(objs, "Secret")
    minio = SCENARIOS[scenario].get("minio", {})
    enabled = minio.get("enabled", True)
    keys = enabled and not minio.get("auth", {}).get("existingSecret")
    cert = enabled and not minio.get("tls", {}).get("certManager")  # else cert-manager's Secret
    expected = ["alliance-minio"] * bool(keys) + ["alliance-minio-tls"] * bool(cert)
    assert sorted(s["metadata"]["name"] for s in secrets) == expected
    for secret in secrets:
        assert "stringData" not in secret
        assert secret["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"
        for key, value in secret["data"].items():
            plain = base64.b64decode(value).decode()
            if secret["type"] == "kubernetes.io/tls":
                assert plain.startswith("-----BEGIN "), key
            else:
                assert len(plain) >= 20 and plain.isalnum()
            # Appears in the Secret only: nowhere else, neither plain nor encoded.
            assert text.count(plain) == 0 and text.count(value) == 1
    for where, _, spec in pod_specs(objs):
        for c in spec["containers"]:
            for e in c.get("env", []):
                if SECRET_ENV.search(e["name"]):
                    assert "valueFrom" in e and "value" not in e, f"{where}: {e['name']}"
    assert not find(objs, "ConfigMap") or all(
        not SECRET_ENV.search(k) for cm in find(objs, "ConfigMap") for k in cm["data"]
    )


def test_generated_credentials_differ_on_each_install(tmp_path):
    path = values_file(tmp_path, "defaults", {})

    def keys():
        return one(docs(template(path).stdout), "Secret", "alliance-minio")["data"]

    first, second = keys(), keys()
    assert first["accessKey"] != second["accessKey"]
    assert first["secretKey"] != second["secretKey"]
    text = (CHART / "templates" / "minio-secret.yaml").read_text()
    assert 'lookup "v1" "Secret"' in text  # kept on upgrade: helm template cannot show it


# --- TLS: MinIO's certificate ----------------------------------------------------------------

SERVICE_NAMES = [
    "alliance-minio",
    f"alliance-minio.{NAMESPACE}",
    f"alliance-minio.{NAMESPACE}.svc",
    f"alliance-minio.{NAMESPACE}.svc.cluster.local",
]


def _der(data: bytes, pos: int = 0) -> tuple[int, bytes, int]:
    """The DER element at ``pos``: (tag, content, position after it)."""
    tag, length = data[pos], data[pos + 1]
    pos += 2
    if length & 0x80:
        size = length & 0x7F
        length = int.from_bytes(data[pos : pos + size], "big")
        pos += size
    return tag, data[pos : pos + length], pos + length


def _der_children(content: bytes):
    pos = 0
    while pos < len(content):
        tag, value, pos = _der(content, pos)
        yield tag, value


def subject_alt_names(pem: str) -> tuple[set[str], set[str]]:
    """(DNS names, IP addresses) of a PEM certificate's subjectAltName extension."""
    _, cert, _ = _der(ssl.PEM_cert_to_DER_cert(pem))
    _, tbs, _ = _der(cert)
    for tag, value in _der_children(tbs):
        if tag != 0xA3:  # [3]: the extensions
            continue
        _, extensions, _ = _der(value)
        for _, extension in _der_children(extensions):
            parts = list(_der_children(extension))
            if parts[0] == (0x06, bytes.fromhex("551d11")):  # OID 2.5.29.17
                _, names, _ = _der(parts[-1][1])
                general = list(_der_children(names))
                dns = {v.decode() for tag, v in general if tag == 0x82}  # [2] dNSName
                ips = {str(ipaddress.ip_address(v)) for tag, v in general if tag == 0x87}
                return dns, ips
    return set(), set()


def tls_handshake(secret: dict, server_name: str, tmp_path: Path) -> None:
    """A TLS handshake between a server with the Secret's tls.crt/tls.key and a client that
    trusts only its ca.crt and checks ``server_name``, as a member does; raises ssl.SSLError
    when the client refuses."""
    files = {}
    for key, value in secret["data"].items():
        files[key] = tmp_path / key
        files[key].write_bytes(base64.b64decode(value))
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.load_cert_chain(files["tls.crt"], files["tls.key"])
    client_ctx = ssl.create_default_context(cafile=str(files["ca.crt"]))
    left, right = socket.socketpair()
    with left, right, concurrent.futures.ThreadPoolExecutor(1) as pool:
        left.settimeout(10)
        right.settimeout(10)
        server = pool.submit(server_ctx.wrap_socket, left, server_side=True)
        try:
            client_ctx.wrap_socket(right, server_hostname=server_name).close()
        finally:
            right.close()  # the server sees the end of the handshake either way
            with contextlib.suppress(ssl.SSLError, OSError):
                server.result(timeout=10).close()


@pytest.mark.parametrize("scenario", ["defaults", "remote-members"])
def test_generated_certificate_names_the_service_and_the_extra_sans(scenario, rendered, tmp_path):
    _, objs = rendered[scenario]
    secret = one(objs, "Secret", "alliance-minio-tls")
    assert secret["type"] == "kubernetes.io/tls"
    assert set(secret["data"]) == {"tls.crt", "tls.key", "ca.crt"}
    extra = SCENARIOS[scenario].get("minio", {}).get("tls", {}).get("extraSANs", [])
    dns, ips = subject_alt_names(base64.b64decode(secret["data"]["tls.crt"]).decode())
    assert dns == set(SERVICE_NAMES) | {n for n in extra if not n[0].isdigit() and ":" not in n}
    assert ips == {str(ipaddress.ip_address(n)) for n in extra if n[0].isdigit() or ":" in n}
    annotations = secret["metadata"]["annotations"]
    assert annotations["alliance.dev/tls-sans"] == ",".join(
        SERVICE_NAMES + [n for n in extra if n not in ips] + [n for n in extra if n in ips]
    )
    # A member trusting only ca.crt accepts the store under each of its names, and no other.
    for name in [*SERVICE_NAMES, *extra]:
        tls_handshake(secret, name, tmp_path)
    with pytest.raises(ssl.SSLCertVerificationError):
        tls_handshake(secret, "s3.attacker.example", tmp_path)


def test_generated_certificate_differs_on_each_install(tmp_path):
    path = values_file(tmp_path, "defaults", {})
    first, second = (
        one(docs(template(path).stdout), "Secret", "alliance-minio-tls")["data"] for _ in range(2)
    )
    assert all(first[k] != second[k] for k in first)
    text = (CHART / "templates" / "minio-tls.yaml").read_text()
    assert 'lookup "v1" "Secret"' in text  # kept on upgrade: see the test with the server below


def test_minio_serves_https_with_the_certificate(rendered):
    _, objs = rendered["defaults"]
    spec = one(objs, "StatefulSet")["spec"]["template"]["spec"]
    (c,) = spec["containers"]
    certs_dir = c["args"][c["args"].index("--certs-dir") + 1]
    (mount,) = [m for m in c["volumeMounts"] if m["mountPath"] == certs_dir]
    assert mount["readOnly"] is True
    (volume,) = [v for v in spec["volumes"] if v["name"] == mount["name"]]
    assert volume["secret"]["secretName"] == "alliance-minio-tls"
    assert volume["secret"]["defaultMode"] == 0o440  # readable by MinIO's group (fsGroup) only
    items = {i["key"]: i["path"] for i in volume["secret"]["items"]}
    assert items == {"tls.crt": "public.crt", "tls.key": "private.key", "ca.crt": "CAs/ca.crt"}
    for probe in ("readinessProbe", "livenessProbe"):
        assert c[probe]["httpGet"]["scheme"] == "HTTPS", probe


def test_cert_manager_issues_the_certificate(rendered):
    _, objs = rendered["cert-manager"]
    assert not find(objs, "Secret", "alliance-minio-tls")  # cert-manager writes it
    cert = one(objs, "Certificate", "alliance-minio-tls")
    assert cert["apiVersion"] == "cert-manager.io/v1"
    spec = cert["spec"]
    # cert-manager.io/v1 Certificate fields (no schema offline: checked by name here).
    assert set(spec) <= {
        "secretName", "secretTemplate", "commonName", "dnsNames", "ipAddresses", "usages",
        "privateKey", "issuerRef", "duration", "renewBefore",
    }  # fmt: skip
    assert spec["secretName"] == "alliance-minio-tls"
    assert spec["secretTemplate"]["annotations"] == {"alliance.dev/alliances": "mnist"}
    assert spec["dnsNames"] == [*SERVICE_NAMES, "s3.alliance.example"]
    assert spec["ipAddresses"] == ["198.51.100.7"]
    assert spec["commonName"] == SERVICE_NAMES[0]
    assert "server auth" in spec["usages"]
    assert spec["issuerRef"] == {
        "name": "alliance-ca", "kind": "ClusterIssuer", "group": "cert-manager.io",
    }  # fmt: skip
    # Everything else as with a generated certificate: the same Secret.
    store = one(objs, "Alliance")["spec"]["store"]
    assert store["caSecret"] == {"name": "alliance-minio-tls", "key": "ca.crt"}
    (c,) = one(objs, "StatefulSet")["spec"]["template"]["spec"]["containers"]
    assert "--certs-dir" in c["args"]
    volumes = one(objs, "StatefulSet")["spec"]["template"]["spec"]["volumes"]
    assert "alliance-minio-tls" in [v.get("secret", {}).get("secretName") for v in volumes]


# --- network policies ------------------------------------------------------------------------


def test_network_policies_restrict_members_to_the_store(rendered):
    _, objs = rendered["defaults"]
    members = one(objs, "NetworkPolicy", "alliance-members")
    spec = members["spec"]
    assert spec["policyTypes"] == ["Ingress", "Egress"]
    # It selects the operator's pods (as the operator builds them) and none of the chart's own.
    for pod in member_pods():
        assert selector_matches(spec["podSelector"], pod["metadata"]["labels"])
    for where, labels, _ in pod_specs(objs):
        assert not selector_matches(spec["podSelector"], labels), where
    (ingress,) = spec["ingress"]
    assert ingress == {"ports": [{"port": 9100, "protocol": "TCP"}]}
    member = member_pods()[0]["spec"]["containers"][0]
    metrics_ports = [p["containerPort"] for p in member.get("ports", []) if p["name"] == "metrics"]
    assert metrics_ports == [9100], "the member metrics port moved: update member.metricsPort"
    to_store, dns = spec["egress"]
    minio_labels = one(objs, "StatefulSet")["spec"]["template"]["metadata"]["labels"]
    (peer,) = to_store["to"]
    assert selector_matches(peer["podSelector"], minio_labels)
    assert peer["namespaceSelector"] == {"matchLabels": {"kubernetes.io/metadata.name": NAMESPACE}}
    assert to_store["ports"] == [{"port": 9000, "protocol": "TCP"}]
    assert sorted(p["protocol"] for p in dns["ports"]) == ["TCP", "UDP"]
    assert dns["to"], "DNS must not be open to every address"

    minio = one(objs, "NetworkPolicy", "alliance-minio")["spec"]
    assert selector_matches(minio["podSelector"], minio_labels)
    (allowed,) = minio["ingress"]
    assert allowed["ports"] == [{"port": 9000, "protocol": "TCP"}]
    operator_labels = one(objs, "Deployment")["spec"]["template"]["metadata"]["labels"]
    test_labels = one(objs, "Pod", TEST_POD)["metadata"]["labels"]
    peers = allowed["from"]
    assert len(peers) == 3
    for labels in (operator_labels, test_labels, *(p["metadata"]["labels"] for p in member_pods())):
        assert any(selector_matches(p["podSelector"], labels) for p in peers), labels
    assert not any(selector_matches(p["podSelector"], minio_labels) for p in peers)


def test_network_policies_follow_the_watched_namespaces(rendered):
    _, objs = rendered["watched-namespaces"]
    watched = SCENARIOS["watched-namespaces"]["operator"]["watchNamespaces"]
    policies = find(objs, "NetworkPolicy", "alliance-members")
    assert sorted(p["metadata"]["namespace"] for p in policies) == sorted(watched)
    minio = one(objs, "NetworkPolicy", "alliance-minio")["spec"]
    members_peer = minio["ingress"][0]["from"][0]
    assert members_peer["namespaceSelector"]["matchExpressions"] == [
        {"key": "kubernetes.io/metadata.name", "operator": "In", "values": watched}
    ]


def test_remote_members_reach_minio(rendered):
    _, objs = rendered["remote-members"]
    values = SCENARIOS["remote-members"]
    service = one(objs, "Service", "alliance-minio")["spec"]
    assert service["type"] == "NodePort" and service["externalTrafficPolicy"] == "Local"
    assert service["ports"][0]["nodePort"] == 30900
    store = one(objs, "Alliance")["spec"]["store"]
    assert store["remoteEndpoint"] == values["alliance"]["remoteEndpoint"]
    assert store["endpoint"] == f"https://alliance-minio.{NAMESPACE}.svc:9000"  # in the cluster
    minio = one(objs, "NetworkPolicy", "alliance-minio")["spec"]
    in_cluster, remote = minio["ingress"]
    assert len(in_cluster["from"]) == 3  # as by default
    assert remote == {
        "from": values["networkPolicy"]["remoteMembersFrom"],
        "ports": [{"port": 9000, "protocol": "TCP"}],
    }
    # A LoadBalancer too, with the node port left to Kubernetes.
    _, objs = rendered["cert-manager"]
    service = one(objs, "Service", "alliance-minio")["spec"]
    assert service["type"] == "LoadBalancer" and "nodePort" not in service["ports"][0]


def test_operator_network_policy(rendered, tmp_path):
    for scenario in ("defaults", "remote-members", "external-s3", "watched-namespaces"):
        _, objs = rendered[scenario]
        (policy,) = [
            p for p in find(objs, "NetworkPolicy", "alliance-operator")
            if p["metadata"]["namespace"] == NAMESPACE
        ]  # fmt: skip
        spec = policy["spec"]
        assert spec["policyTypes"] == ["Ingress", "Egress"]
        operator_labels = one(objs, "Deployment")["spec"]["template"]["metadata"]["labels"]
        assert selector_matches(spec["podSelector"], operator_labels)
        others = [labels for where, labels, _ in pod_specs(objs) if not where.startswith("Deploy")]
        for labels in [*others, *(p["metadata"]["labels"] for p in member_pods())]:
            assert not selector_matches(spec["podSelector"], labels), labels
        # Only its probe and metrics ports accept connections.
        assert spec["ingress"] == [
            {"ports": [{"port": 8080, "protocol": "TCP"}]},
            {"ports": [{"port": 9090, "protocol": "TCP"}]},
        ], scenario
        api, store, dns = spec["egress"]
        cidrs = SCENARIOS[scenario].get("networkPolicy", {}).get("apiServer", {}).get("cidrs")
        ports = SCENARIOS[scenario].get("networkPolicy", {}).get("apiServer", {}).get("ports")
        assert [p["port"] for p in api["ports"]] == (ports or [443, 6443]), scenario
        if cidrs:
            assert api["to"] == [{"ipBlock": {"cidr": c}} for c in cidrs]
        else:
            assert "to" not in api  # the API server's address is the cluster's own
        if scenario == "external-s3":
            assert store["ports"] == [{"port": 8443, "protocol": "TCP"}]
            assert [peer["ipBlock"]["cidr"] for peer in store["to"]] == [
                "203.0.113.0/24", "2001:db8::/32",
            ]  # fmt: skip
        else:
            (peer,) = store["to"]
            minio_labels = one(objs, "StatefulSet")["spec"]["template"]["metadata"]["labels"]
            assert selector_matches(peer["podSelector"], minio_labels)
            assert store["ports"] == [{"port": 9000, "protocol": "TCP"}]
        assert sorted(p["protocol"] for p in dns["ports"]) == ["TCP", "UDP"]
        members = find(objs, "NetworkPolicy", "alliance-members")[0]["spec"]
        assert dns["to"] and dns["to"] == members["egress"][1]["to"]  # networkPolicy.dnsPeers
    # Who may scrape: networkPolicy.metricsFrom, as for the members.
    peers = [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}}]
    values = {"networkPolicy": {"metricsFrom": peers}}
    objs = docs(template(values_file(tmp_path, "metrics-from", values)).stdout)
    ingress = one(objs, "NetworkPolicy", "alliance-operator")["spec"]["ingress"]
    assert ingress[1]["from"] == peers and "from" not in ingress[0]


def test_network_policies_can_be_turned_off(tmp_path):
    objs = docs(
        template(values_file(tmp_path, "nonp", {"networkPolicy": {"enabled": False}})).stdout
    )
    assert not find(objs, "NetworkPolicy")


# --- metrics: ServiceMonitor, PodMonitor, dashboard ------------------------------------------

MONITOR_FIELDS = {  # the Prometheus Operator's monitoring.coreos.com/v1 fields the chart may use
    "ServiceMonitor": ({"selector", "namespaceSelector", "endpoints"}, "endpoints"),
    "PodMonitor": ({"selector", "namespaceSelector", "podMetricsEndpoints"}, "podMetricsEndpoints"),
}
ENDPOINT_FIELDS = {"port", "path", "scheme", "interval", "honorLabels"}


def test_monitors_off_by_default(rendered):
    _, objs = rendered["defaults"]
    assert not find(objs, "ServiceMonitor") and not find(objs, "PodMonitor")
    assert not find(objs, "ConfigMap")


def test_service_and_pod_monitors(rendered):
    _, objs = rendered["metrics-dashboard"]
    service = one(objs, "Service", "alliance-operator-metrics")
    for kind, (fields, endpoints_key) in MONITOR_FIELDS.items():
        monitor = one(objs, kind)
        assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
        assert monitor["metadata"]["labels"]["release"] == "prometheus"
        assert set(monitor["spec"]) == fields, kind
        (endpoint,) = monitor["spec"][endpoints_key]
        assert set(endpoint) <= ENDPOINT_FIELDS
        assert endpoint["port"] == "metrics" and endpoint["path"] == "/metrics"
        assert endpoint["scheme"] == "http" and endpoint["interval"] == "15s"
        assert set(monitor["spec"]["namespaceSelector"]) <= {"any", "matchNames"}
    sm = one(objs, "ServiceMonitor")["spec"]
    assert selector_matches(sm["selector"], service["metadata"]["labels"])
    assert "metrics" in [p["name"] for p in service["spec"]["ports"]]
    assert sm["namespaceSelector"] == {"matchNames": [NAMESPACE]}
    assert sm["endpoints"][0]["honorLabels"] is True  # the metrics' own namespace label
    pm = one(objs, "PodMonitor")["spec"]
    agent, init = member_pods()
    assert selector_matches(pm["selector"], agent["metadata"]["labels"])
    assert not selector_matches(pm["selector"], init["metadata"]["labels"])
    assert pm["namespaceSelector"] == {"any": True}
    _, watched_objs = rendered["watched-namespaces"]
    assert one(watched_objs, "PodMonitor")["spec"]["namespaceSelector"] == {
        "matchNames": SCENARIOS["watched-namespaces"]["operator"]["watchNamespaces"]
    }


def test_grafana_dashboard(rendered):
    _, objs = rendered["metrics-dashboard"]
    cm = one(objs, "ConfigMap")
    assert cm["metadata"]["namespace"] == "monitoring"
    assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
    (name,) = cm["data"]
    dashboard = json.loads(cm["data"][name])
    assert dashboard["uid"] and dashboard["title"]
    panels = [p for p in dashboard["panels"] if p["type"] != "row"]
    assert len({p["id"] for p in dashboard["panels"]}) == len(dashboard["panels"])
    exprs = [t["expr"] for p in panels for t in p["targets"]]
    variables = {v["name"] for v in dashboard["templating"]["list"]}
    for p in panels:
        assert p["datasource"]["uid"] == "${datasource}" and p["targets"], p["title"]
        g = p["gridPos"]
        assert g["x"] >= 0 and g["x"] + g["w"] <= 24, p["title"]
    for expr in exprs:
        assert expr.count("(") == expr.count(")"), expr
        for var in re.findall(r"\$(\w+)", expr):
            assert var in variables or var.startswith("__"), expr
    for metric, kind in DASHBOARD_METRICS.items():
        used = [e for e in exprs if re.search(rf"\b{metric}(_bucket|_sum|_count)?\{{", e)]
        assert used, f"no panel shows {metric}"
        if kind == "histogram":
            assert any("histogram_quantile(" in e and f"{metric}_bucket{{" in e for e in used), (
                metric
            )
    assert set(json.loads((CHART / "dashboards" / "alliance.json").read_text())) == set(dashboard)


# --- NOTES.txt and the helm test pod ---------------------------------------------------------


def test_notes_tell_the_next_steps(tmp_path):
    notes = (CHART / "templates" / "NOTES.txt").read_text()
    for needle in (
        "examples/member.yaml",
        "docs/data-format.md",
        "kubectl -n {{ $ns }} apply -f examples/trainingrun.yaml",
        "get trainingruns -w",
        "describe trainingrun",
        "/metrics",
        "helm test",
    ):
        assert needle in notes, needle
    for path in ((ROOT / "examples" / "member.yaml"), (ROOT / "docs" / "data-format.md")):
        assert path.exists(), path


def test_helm_test_pod(rendered):
    for scenario in ("defaults", "external-s3"):
        _, objs = rendered[scenario]
        pod = one(objs, "Pod", TEST_POD)
        assert pod["metadata"]["annotations"]["helm.sh/hook"] == "test"
        (c,) = pod["spec"]["containers"]
        assert c["command"][:2] == ["python", "-c"]
        code, store, mode, metrics, cafile = c["command"][2:]
        compile(code, "helm-test", "exec")  # valid Python
        assert metrics == f"http://alliance-operator-metrics.{NAMESPACE}.svc:9090/metrics"
        alliance_store = one(objs, "Alliance")["spec"]["store"]
        assert store == alliance_store["endpoint"] and store.startswith("https://")
        assert mode == ("minio" if scenario == "defaults" else "external")
        assert "/minio/health/live" in code
        # The store is verified with the Alliance's CA, and only the CA is mounted.
        assert "ssl.create_default_context(cafile=" in code and "context=context" in code
        ca = alliance_store["caSecret"]
        (mount,) = [m for m in c["volumeMounts"] if m["name"] == "ca"]
        assert cafile == f"{mount['mountPath']}/{ca['key']}" and mount["readOnly"] is True
        (volume,) = [v for v in pod["spec"]["volumes"] if v["name"] == "ca"]
        assert volume["secret"] == {
            "secretName": ca["name"], "items": [{"key": ca["key"], "path": ca["key"]}],
        }  # fmt: skip
        assert pod["spec"]["restartPolicy"] == "Never"
        # Deleted after the run whatever its outcome (and before the next one).
        policy = pod["metadata"]["annotations"]["helm.sh/hook-delete-policy"].split(",")
        assert set(policy) == {"before-hook-creation", "hook-succeeded", "hook-failed"}


# --- the pre-delete hook: the chart's Alliance goes while the operator still runs -----------


def hook_objs(objs: list[dict]) -> dict[str, dict]:
    found = [o for o in objs if o["metadata"]["name"] == HOOK]
    return {o["kind"]: o for o in found}


def label_selector(text: str) -> dict:
    """A selector of the form k=v,k=v (what the hook is given) as matchLabels."""
    return {"matchLabels": dict(term.split("=", 1) for term in text.split(","))}


def test_uninstall_hook(rendered):
    _, objs = rendered["defaults"]
    hook = hook_objs(objs)
    assert set(hook) == {"ServiceAccount", "Role", "RoleBinding", "Pod"}
    weight = {}
    for kind, o in hook.items():
        annotations = o["metadata"]["annotations"]
        assert annotations["helm.sh/hook"] == "pre-delete", kind
        weight[kind] = int(annotations["helm.sh/hook-weight"])
        policy = set(annotations["helm.sh/hook-delete-policy"].split(","))
        # Gone once it worked; a failed pod stays for its log until the next attempt.
        assert policy == {"before-hook-creation", "hook-succeeded"}, kind
        assert o["metadata"]["namespace"] == NAMESPACE, kind
    # Helm creates hooks by weight: the account and its rights exist before the pod runs.
    assert max(weight[k] for k in ("ServiceAccount", "Role", "RoleBinding")) < weight["Pod"]
    assert hook["ServiceAccount"]["automountServiceAccountToken"] is False
    assert hook["RoleBinding"]["roleRef"] == {
        "apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": HOOK,
    }  # fmt: skip
    assert hook["RoleBinding"]["subjects"] == [
        {"kind": "ServiceAccount", "name": HOOK, "namespace": NAMESPACE}
    ]
    spec = hook["Pod"]["spec"]
    assert spec["serviceAccountName"] == HOOK and spec["restartPolicy"] == "Never"
    (c,) = spec["containers"]
    operator = one(objs, "Deployment")["spec"]["template"]["spec"]["containers"][0]
    assert c["image"] == operator["image"]  # it holds the module
    assert c["command"] == ["python", "-m", "alliance_operator.uninstall"]
    args = dict(zip(c["args"][::2], c["args"][1::2], strict=True))
    assert set(args) == {"--namespace", "--release", "--selector", "--timeout"}
    assert (args["--namespace"], args["--release"], args["--timeout"]) == (
        NAMESPACE,
        RELEASE,
        "120",
    )
    # The selector finds the chart's Alliance (the hook then checks Helm's ownership
    # annotations, which only a real install writes: see the test on the test API server).
    alliance_labels = one(objs, "Alliance")["metadata"]["labels"]
    assert selector_matches(label_selector(args["--selector"]), alliance_labels)
    for where, labels, _ in pod_specs(objs):
        assert not selector_matches(label_selector(args["--selector"]), labels), where


def test_uninstall_hook_follows_the_values(tmp_path):
    def hook(values):
        return hook_objs(docs(template(values_file(tmp_path, "v", values)).stdout))

    # No Alliance of the chart, nothing to delete: no hook.
    assert hook({"alliance": {"create": False}}) == {}
    # The operator's RBAC is yours to make: the hook's too (it needs list, delete on alliances).
    assert set(hook({"rbac": {"create": False}})) == {"ServiceAccount", "Pod"}
    pod = hook({"uninstallHook": {"timeoutSeconds": 30}, "operator": {"nodeSelector": {"a": "b"}}})
    spec = pod["Pod"]["spec"]
    assert spec["containers"][0]["args"][-2:] == ["--timeout", "30"]
    assert spec["nodeSelector"] == {"a": "b"}  # where the operator's image runs


def test_uninstall_hook_role_grants_exactly_its_api_calls(rendered):
    text = UNINSTALL_MODULE.read_text()
    calls = api_calls(text)
    assert {kind for _, kind in calls} == {"custom_object"}
    assert "ALLIANCES" in text and "MEMBERS" not in text and "TRAININGRUNS" not in text
    role = hook_objs(rendered["defaults"][1])["Role"]
    assert rules_of(role) == {("alliance.dev", "alliances"): {verb for verb, _ in calls}}


# --- helm against the test API server: lookups and NOTES ------------------------------------


def _kubectl(kubeconfig: Path, *args: str, input: str | None = None) -> str:
    result = subprocess.run(
        [str(KUBECTL), "--kubeconfig", str(kubeconfig), *args],
        capture_output=True, text=True, input=input, timeout=60,
    )  # fmt: skip
    assert result.returncode == 0, f"kubectl {' '.join(args)}: {result.stderr}{result.stdout}"
    return result.stdout


def _stand_in_crd(kind: str, group: str = "monitoring.coreos.com") -> dict:
    """A stand-in for a CRD of the Prometheus Operator (or cert-manager), so that helm finds the
    kind (schema-less)."""
    plural = kind.lower() + "s"
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": f"{plural}.{group}"},
        "spec": {
            "group": group,
            "scope": "Namespaced",
            "names": {"kind": kind, "plural": plural, "singular": kind.lower()},
            "versions": [
                {
                    "name": "v1",
                    "served": True,
                    "storage": True,
                    "schema": {
                        "openAPIV3Schema": {
                            "type": "object",
                            "x-kubernetes-preserve-unknown-fields": True,
                        }
                    },
                }
            ],
        },
    }


def _dry_run_install(kubeconfig: Path, values_path: Path) -> dict:
    """``helm install --dry-run=server``: rendered with lookups against the server, not applied
    (real installs are tested at the end of this module)."""
    result = helm(
        "--kubeconfig", str(kubeconfig), "install", RELEASE, str(CHART), "--namespace", NAMESPACE,
        "-f", str(values_path), "--dry-run=server", "--disable-openapi-validation", "-o", "json",
    )  # fmt: skip
    return json.loads(result.stdout)


def test_generated_credentials_are_kept_on_upgrade(kubeconfig, tmp_path):
    """The MinIO Secret's keys come from the existing Secret when there is one (lookup)."""
    _kubectl(kubeconfig, "create", "namespace", NAMESPACE)
    _kubectl(kubeconfig, "apply", "-f", str(ROOT / "crds"))
    existing = {"accessKey": "a2VwdC1hY2Nlc3M=", "secretKey": "a2VwdC1zZWNyZXQ="}
    secret = {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {
            "name": "alliance-minio",
            "namespace": NAMESPACE,
            "labels": {"app.kubernetes.io/managed-by": "Helm"},
            "annotations": {
                "meta.helm.sh/release-name": RELEASE,
                "meta.helm.sh/release-namespace": NAMESPACE,
            },
        },
        "data": existing,
    }
    _kubectl(kubeconfig, "apply", "-f", "-", input=json.dumps(secret))
    release = _dry_run_install(kubeconfig, values_file(tmp_path, "defaults", {}))
    assert one(docs(release["manifest"]), "Secret", "alliance-minio")["data"] == existing


def test_generated_certificate_is_kept_on_upgrade(rendered, kubeconfig, tmp_path):
    """MinIO's certificate and CA come from the existing Secret (lookup): the members' trust
    outlives upgrades. An upgrade asking for other names fails and says what to do."""
    _kubectl(kubeconfig, "create", "namespace", NAMESPACE)
    _kubectl(kubeconfig, "apply", "-f", str(ROOT / "crds"))
    installed = one(rendered["defaults"][1], "Secret", "alliance-minio-tls")
    installed["metadata"]["annotations"].update({
        "meta.helm.sh/release-name": RELEASE, "meta.helm.sh/release-namespace": NAMESPACE,
    })  # fmt: skip
    _kubectl(kubeconfig, "apply", "-f", "-", input=json.dumps(installed))
    release = _dry_run_install(kubeconfig, values_file(tmp_path, "defaults", {}))
    kept = one(docs(release["manifest"]), "Secret", "alliance-minio-tls")
    assert kept["data"] == installed["data"]
    assert kept["metadata"]["annotations"]["alliance.dev/alliances"] == "mnist"
    # New names would need a new certificate: refused rather than silently kept.
    values = values_file(
        tmp_path, "more-sans", {"minio": {"tls": {"extraSANs": ["s3.new.example"]}}}
    )
    result = helm(
        "--kubeconfig", str(kubeconfig), "install", RELEASE, str(CHART), "--namespace", NAMESPACE,
        "-f", str(values), "--dry-run=server", "--disable-openapi-validation", check=False,
    )  # fmt: skip
    assert result.returncode != 0
    assert "minio.tls.extraSANs changed" in result.stderr, result.stderr
    assert f"kubectl -n {NAMESPACE} delete secret alliance-minio-tls" in result.stderr


def test_notes_render_in_every_scenario(kubeconfig, tmp_path):
    _kubectl(kubeconfig, "create", "namespace", NAMESPACE)
    _kubectl(kubeconfig, "apply", "-f", str(ROOT / "crds"))
    crds = [_stand_in_crd("ServiceMonitor"), _stand_in_crd("PodMonitor"),
            _stand_in_crd("Certificate", "cert-manager.io")]  # fmt: skip
    _kubectl(kubeconfig, "apply", "-f", "-", input=yaml.safe_dump_all(crds))
    for name, values in SCENARIOS.items():
        notes = _dry_run_install(kubeconfig, values_file(tmp_path, name, values))["info"]["notes"]
        assert "examples/trainingrun.yaml" in notes and "get trainingruns -w" in notes, name
        assert "/metrics" in notes and f"helm test {RELEASE}" in notes, name
        assert "{{" not in notes and "<no value>" not in notes, name
        endpoint = "https://s3.example.org:8443" if name == "external-s3" else "alliance-minio"
        assert endpoint in notes, name
        # A Secret of the user's: the operator uses it only once annotated (the exact command).
        user_secret = {"external-s3": "s3-keys", "custom-images-resources": "my-minio-root"}
        if name in user_secret:
            alliance = values.get("alliance", {}).get("name", "mnist")
            store = "https://s3.example.org:8443" if name == "external-s3" else (
                f"https://alliance-minio.{NAMESPACE}.svc:9000"
            )  # fmt: skip
            assert (
                f"kubectl -n {NAMESPACE} annotate secret {user_secret[name]} --overwrite \\\n"
                f"    alliance.dev/alliances={alliance} alliance.dev/store-endpoint={store}\n"
            ) in notes, notes
        else:
            assert "annotate secret" not in notes, name
        if name == "external-s3":
            assert (f"kubectl -n {NAMESPACE} annotate secret s3-ca --overwrite "
                    "alliance.dev/alliances=mnist") in notes  # fmt: skip
        if name == "remote-members":
            assert "members outside the cluster may reach it" in notes
            assert "https://s3.alliance.example:30900" in notes


# --- the default rendering on the test API server, and the operator it starts ---------------


def _port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("0.0.0.0", port))
        except OSError:
            return False
    return True


def _get(url: str) -> int | None:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return response.status
    except urllib.error.HTTPError as exc:
        return exc.code
    except OSError:
        return None


def _wait(check, timeout: float, what: str, diagnose=lambda: ""):
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = check()
        if last:
            return last
        time.sleep(0.25)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}; last: {last!r}\n"
                         f"{diagnose()}")  # fmt: skip


@pytest.fixture
def kubeconfig(tmp_path):
    """A test API server (tests/kube/apiserver.py) and a kubeconfig for it."""
    from tests.kube.apiserver import ApiServer

    server = ApiServer().start()
    try:
        yield server.write_kubeconfig(tmp_path / "kubeconfig")
    finally:
        server.stop()


def test_default_rendering_runs_the_operator_on_the_test_api_server(rendered, kubeconfig, tmp_path):
    text, objs = rendered["defaults"]

    def kubectl(*args: str, input: str | None = None) -> str:
        return _kubectl(kubeconfig, *args, input=input)

    kubectl("apply", "-f", str(ROOT / "crds"))
    kubectl("create", "namespace", NAMESPACE)
    kubectl("apply", "-f", "-", input=text)
    for o in objs:
        ns = ["-n", o["metadata"]["namespace"]] if "namespace" in o["metadata"] else []
        got = json.loads(kubectl("get", o["kind"], o["metadata"]["name"], *ns, "-o", "json"))
        assert got["kind"] == o["kind"] and got["metadata"]["uid"]

    # The operator exactly as the Deployment runs it: command, arguments, environment.
    (container,) = one(objs, "Deployment")["spec"]["template"]["spec"]["containers"]
    env = {}
    for e in container["env"]:
        assert "value" in e, f"{e['name']}: only literal values can be resolved here"
        env[e["name"]] = e["value"]
    liveness = container["args"][container["args"].index("--liveness") + 1]
    health_port = int(re.fullmatch(r"http://0\.0\.0\.0:(\d+)/healthz", liveness).group(1))
    metrics_port = int(env["ALLIANCE_OPERATOR_METRICS_PORT"])
    for port in (health_port, metrics_port):
        if not _port_free(port):
            pytest.fail(
                f"port {port} (from the rendered Deployment) is busy on this machine: free it "
                "to run this test (the rendering is not changed to fit the machine)",
                pytrace=False,
            )
    (command,) = container["command"]
    executable = BIN / command
    assert executable.exists(), f"{executable} is missing: run make install"
    log_path = tmp_path / "operator.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [str(executable), *container["args"]],
            env={**os.environ, **env, "KUBECONFIG": str(kubeconfig)},
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
            cwd=tmp_path,
        )

    def diagnose() -> str:
        tail = "\n".join(log_path.read_text(errors="replace").splitlines()[-40:])
        return f"operator exit code: {proc.poll()}\noperator log (tail):\n{tail}"

    try:
        _wait(
            lambda: proc.poll() is None and _get(f"http://127.0.0.1:{health_port}/healthz") == 200,
            30, "the operator's /healthz", diagnose,
        )  # fmt: skip

        def store_ready():
            alliance = json.loads(
                kubectl("get", "alliance", "mnist", "-n", NAMESPACE, "-o", "json")
            )
            conds = (alliance.get("status") or {}).get("conditions") or []
            return next((c for c in conds if c["type"] == "StoreReady"), None)

        # The metrics Service's target: the port ALLIANCE_OPERATOR_METRICS_PORT names.
        _wait(
            lambda: _get(f"http://127.0.0.1:{metrics_port}/metrics") == 200,
            10, "the operator's /metrics", diagnose,
        )  # fmt: skip
        cond = _wait(store_ready, 40, "the Alliance's StoreReady condition", diagnose)
        # No MinIO runs here, and the in-cluster name does not resolve from this machine.
        assert cond["status"] == "False"
        assert cond["reason"] in ("StoreUnreachable", "SecretNotFound", "SecretKeyMissing")
        assert cond["reason"] == "StoreUnreachable", cond  # the Secret was applied with it
        assert cond["message"]
        assert proc.poll() is None, diagnose()
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=5)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, 0)
            pytest.fail(f"operator process group {proc.pid} outlived the test")


# --- the uninstall hook's module against the test API server ----------------------------------

FINALIZER = "alliance.dev/finalizer"
NO_FINALIZERS = json.dumps({"metadata": {"finalizers": None}}, separators=(",", ":"))


def _alliance(rendered, name: str, release: str | None, finalizer: bool) -> dict:
    """The chart's Alliance under another name; ``release``: as Helm marks the objects of that
    release (None: a user's copy, with the chart's labels but no Helm annotations)."""
    alliance = json.loads(json.dumps(one(rendered["defaults"][1], "Alliance")))
    meta = alliance["metadata"]
    meta["name"] = name
    if release:
        meta["annotations"] = {
            "meta.helm.sh/release-name": release,
            "meta.helm.sh/release-namespace": NAMESPACE,
        }
    if finalizer:
        meta["finalizers"] = [FINALIZER]
    return alliance


def _uninstall_module(kubeconfig: Path, *args: str) -> subprocess.Popen:
    selector = f"app.kubernetes.io/instance={RELEASE},app.kubernetes.io/component=alliance"
    return subprocess.Popen(
        [sys.executable, "-m", "alliance_operator.uninstall", "--namespace", NAMESPACE,
         "--release", RELEASE, "--selector", selector, *args],
        env={**os.environ, "KUBECONFIG": str(kubeconfig)},
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip


def _alliances(kubeconfig: Path) -> dict[str, dict]:
    items = json.loads(_kubectl(kubeconfig, "get", "alliances", "-n", NAMESPACE, "-o", "json"))
    return {o["metadata"]["name"]: o for o in items["items"]}


def test_uninstall_module_deletes_only_the_release_alliances_and_waits_for_the_operator(
    rendered, kubeconfig
):
    _kubectl(kubeconfig, "apply", "-f", str(ROOT / "crds"))
    _kubectl(kubeconfig, "create", "namespace", NAMESPACE)
    alliances = [
        _alliance(rendered, "mnist", RELEASE, finalizer=True),  # the chart's, as installed
        _alliance(rendered, "plain", RELEASE, finalizer=False),
        _alliance(rendered, "copy", None, finalizer=True),  # a user's, with copied labels
        _alliance(rendered, "other", "other-release", finalizer=False),
    ]
    _kubectl(kubeconfig, "create", "-f", "-", input=yaml.safe_dump_all(alliances))
    proc = _uninstall_module(kubeconfig, "--timeout", "60")
    try:
        # It deletes, then waits while the finalizer is there (as long as the operator works).
        _wait(lambda: _alliances(kubeconfig)["mnist"]["metadata"].get("deletionTimestamp"),
              20, "the deletion of mnist")  # fmt: skip
        assert "plain" not in _alliances(kubeconfig)
        time.sleep(1.5)  # more than one poll
        assert proc.poll() is None, proc.communicate()
        # What the operator does once it has handled the deletion:
        _kubectl(kubeconfig, "patch", "alliance", "mnist", "-n", NAMESPACE, "--type=merge",
                 "-p", NO_FINALIZERS)  # fmt: skip
        out, err = proc.communicate(timeout=20)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err
    assert f"deleting Alliance {NAMESPACE}/mnist" in out and "gone after" in out
    left = _alliances(kubeconfig)
    assert set(left) == {"copy", "other"}
    assert not any(o["metadata"].get("deletionTimestamp") for o in left.values())
    # Nothing (left) of the release: done at once.
    again = _uninstall_module(kubeconfig, "--timeout", "5")
    out, err = again.communicate(timeout=30)
    assert again.returncode == 0, err
    assert f"no Alliance of the release {RELEASE} in {NAMESPACE}: nothing to delete" in out


def test_uninstall_module_says_what_holds_an_alliance_when_it_times_out(rendered, kubeconfig):
    _kubectl(kubeconfig, "apply", "-f", str(ROOT / "crds"))
    _kubectl(kubeconfig, "create", "namespace", NAMESPACE)
    alliance = _alliance(rendered, "mnist", RELEASE, finalizer=True)
    _kubectl(kubeconfig, "create", "-f", "-", input=json.dumps(alliance))
    started = time.monotonic()
    proc = _uninstall_module(kubeconfig, "--timeout", "1")  # no operator removes the finalizer
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 1, out + err
    assert time.monotonic() - started >= 1
    assert err.splitlines()[:2] == [
        "FAILED: after 1 s, 1 Alliance(s) are still there:",
        f"  Alliance {NAMESPACE}/mnist: being deleted, finalizers: {FINALIZER}",
    ]
    assert "Is it running?" in err
    assert f"kubectl -n {NAMESPACE} patch alliance NAME --type=merge -p '{NO_FINALIZERS}'" in err
    assert _alliances(kubeconfig)["mnist"]["metadata"]["deletionTimestamp"]


# --- helm install, helm test, helm uninstall on the test API server ---------------------------

OPERATOR_DEPLOYMENT = f"{RELEASE}-operator"
#: Left in the namespace after ``helm uninstall`` on purpose (docs/operations.md, section 5):
KEPT = {
    "Secret/alliance-minio",  # MinIO's keys: helm.sh/resource-policy keep, like its data claim
    "Secret/alliance-minio-tls",  # its certificate and CA, which members trust: kept likewise
    "ServiceAccount/default",  # the namespace's own
}
#: MinIO's data claim stays too, but no StatefulSet controller runs here to create it.


def _helm_on(kubeconfig: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    return helm("--kubeconfig", str(kubeconfig), *args, "--namespace", NAMESPACE, check=check)


def _get_json(kubeconfig: Path, *what: str) -> dict:
    return json.loads(_kubectl(kubeconfig, "get", *what, "-n", NAMESPACE, "-o", "json"))


def _names(kubeconfig: Path, kinds: str) -> set[str]:
    return {o["metadata"]["name"] for o in _get_json(kubeconfig, kinds)["items"]}


def _namespace_content(kubeconfig: Path) -> set[str]:
    """kind/name of every object in NAMESPACE, of every kind the server serves. Events are left
    out: they are nobody's objects, and a real server expires them (after an hour by default)."""
    kinds = _kubectl(kubeconfig, "api-resources", "--namespaced=true", "--verbs=list", "-o", "name")
    items = _get_json(kubeconfig, ",".join(kinds.split()))["items"]
    return {f"{o['kind']}/{o['metadata']['name']}" for o in items if o["kind"] != "Event"}


def _release_cluster_objects(kubeconfig: Path) -> set[str]:
    """kind/name of the cluster-scoped objects labelled as the release's."""
    kinds = _kubectl(
        kubeconfig, "api-resources", "--namespaced=false", "--verbs=list", "-o", "name"
    )
    selector = f"app.kubernetes.io/instance={RELEASE}"
    text = _kubectl(kubeconfig, "get", ",".join(kinds.split()), "-l", selector, "-o", "json")
    return {f"{o['kind']}/{o['metadata']['name']}" for o in json.loads(text)["items"]}


def _run_operator_pod(kubeconfig: Path, name: str) -> None:
    """The operator's pod, as its Deployment would have it run: the test API server runs no
    controllers, so the test creates the pod from the Deployment's template, owned by the
    Deployment (a real one is owned by a ReplicaSet the Deployment owns). Deleting the Deployment
    deletes it (garbage collection), and the kubelet stand-in then stops the process."""
    deployment = _get_json(kubeconfig, "deployment", OPERATOR_DEPLOYMENT)
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    ports = [p["containerPort"] for p in container["ports"]]
    busy = [port for port in ports if not _port_free(port)]
    if busy:
        pytest.fail(f"ports {busy} (from the Deployment) are busy on this machine: free them to "
                    "run this test", pytrace=False)  # fmt: skip
    owner = {
        "apiVersion": "apps/v1", "kind": "Deployment", "name": OPERATOR_DEPLOYMENT,
        "uid": deployment["metadata"]["uid"], "controller": True, "blockOwnerDeletion": True,
    }  # fmt: skip
    template = deployment["spec"]["template"]
    pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {**template["metadata"], "name": name, "ownerReferences": [owner]},
        "spec": template["spec"],
    }
    _kubectl(kubeconfig, "create", "-n", NAMESPACE, "-f", "-", input=json.dumps(pod))


def _operator_holds_the_alliance(kubeconfig: Path, kubelet, pod: str) -> None:
    """Wait until the operator has put its finalizer on the chart's Alliance."""
    _wait(
        lambda: FINALIZER in (_alliances(kubeconfig)["mnist"]["metadata"].get("finalizers") or []),
        60, "the operator's finalizer on the Alliance",
        lambda: "operator log (tail):\n" + kubelet.logs(NAMESPACE, pod)[-3000:],
    )  # fmt: skip


def _kubelet(kubeconfig: Path, tmp_path: Path):
    from tests.kube.kubelet import KubeletStandIn

    # Service-account tokens are not mounted here: the operator and the hook, whose in-cluster
    # login fails, find the server through KUBECONFIG (their fallback).
    return KubeletStandIn(
        kubeconfig, tmp_path / "kubelet", namespace=NAMESPACE, bin_dirs=[BIN],
        extra_env={"KUBECONFIG": str(kubeconfig)},
    )  # fmt: skip


def test_install_test_and_uninstall_leave_only_what_is_kept(kubeconfig, tmp_path):
    """The default rendering, installed for real; the operator runs as its Deployment's pod, and
    the kubelet stand-in runs it, the helm test pod and the pre-delete hook as local processes."""
    _helm_on(kubeconfig, "install", RELEASE, str(CHART), "--create-namespace")
    operator_pod = f"{OPERATOR_DEPLOYMENT}-0"
    user_member = {
        "apiVersion": "alliance.dev/v1alpha1",
        "kind": "Member",
        "metadata": {"name": "hospital-a"},
        "spec": {"alliance": "mnist", "dataVolumeClaim": "hospital-a-data"},
    }
    user_claim = {  # the member's data, marked for it by its owner
        "apiVersion": "v1",
        "kind": "PersistentVolumeClaim",
        "metadata": {
            "name": "hospital-a-data",
            "annotations": {"alliance.dev/member": "hospital-a"},
        },
        "spec": {"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": "1Gi"}}},
    }
    with _kubelet(kubeconfig, tmp_path) as kubelet:
        _run_operator_pod(kubeconfig, operator_pod)
        _operator_holds_the_alliance(kubeconfig, kubelet, operator_pod)
        # A user's claim, Member and TrainingRun: not the chart's. The operator reads the claim
        # (its mark); the Member's own store keys, and so its agent pod, need the store, which
        # does not run here.
        for obj in (user_claim, user_member):
            _kubectl(kubeconfig, "apply", "-n", NAMESPACE, "-f", "-", input=json.dumps(obj))
        _kubectl(
            kubeconfig, "apply", "-n", NAMESPACE, "-f", str(ROOT / "examples/trainingrun.yaml")
        )

        def member_conditions():
            status = _get_json(kubeconfig, "member", "hospital-a").get("status") or {}
            conds = {c["type"]: c["status"] for c in status.get("conditions") or []}
            return conds if "ClaimAllowed" in conds and "CredentialsReady" in conds else None

        conds = _wait(member_conditions, 30, "the Member's conditions",
                      lambda: kubelet.logs(NAMESPACE, operator_pod)[-3000:])  # fmt: skip
        assert conds["ClaimAllowed"] == "True" and conds["CredentialsReady"] == "False", conds

        # No MinIO runs here, and its in-cluster name does not resolve: the check would fail
        # after its 30 tries (a minute). Once it has tried, it is ended as it would end: exit > 0.
        test = subprocess.Popen(
            [str(HELM), "--kubeconfig", str(kubeconfig), "test", RELEASE, "-n", NAMESPACE],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )  # fmt: skip
        try:
            kubelet.wait_for(lambda: "try 1/30" in kubelet.logs(NAMESPACE, TEST_POD), 30)
            assert kubelet.kill_process(NAMESPACE, TEST_POD)
            output = test.communicate(timeout=60)[0]
        finally:
            if test.poll() is None:
                test.kill()
        assert test.returncode != 0 and f"pod {TEST_POD} failed" in output, output
        assert TEST_POD not in _names(kubeconfig, "pods")  # hook-failed

        result = _helm_on(kubeconfig, "uninstall", RELEASE)
        kept = result.stdout.split("These resources were kept due to the resource policy:\n")[1]
        assert set(kept.splitlines()[:2]) == {
            "[Secret] alliance-minio", "[Secret] alliance-minio-tls",
        }, result.stdout  # fmt: skip
        hook_log = kubelet.logs(NAMESPACE, HOOK)
        assert f"deleting Alliance {NAMESPACE}/mnist" in hook_log and "gone after" in hook_log
        # The operator's pod went with its Deployment, after the hook.
        kubelet.wait_for(lambda: kubelet.pid(NAMESPACE, operator_pod) is None, 20)

    user_objects = {
        "PersistentVolumeClaim/hospital-a-data", "Member/hospital-a", "TrainingRun/mnist-fedavg",
    }  # fmt: skip
    assert _namespace_content(kubeconfig) == KEPT | user_objects
    assert _release_cluster_objects(kubeconfig) == set()  # the ClusterRole and its binding
    crds = json.loads(_kubectl(kubeconfig, "get", "crds", "-o", "json"))["items"]
    assert {f"{r}.alliance.dev" for r in ALLIANCE_RESOURCES} <= {
        o["metadata"]["name"] for o in crds
    }  # Helm never deletes the CRDs of a chart's crds/
    assert RELEASE not in _helm_on(kubeconfig, "list", "--all", "-q").stdout.split()

    # The user's resources are untouched and keep the operator's finalizer: with the operator
    # gone, deleting them waits for ever; clearing the finalizer ends it (docs/operations.md).
    for kind, name in (("member", "hospital-a"), ("trainingrun", "mnist-fedavg")):
        obj = _get_json(kubeconfig, kind, name)
        assert obj["metadata"]["finalizers"] == [FINALIZER], kind
        assert "deletionTimestamp" not in obj["metadata"], kind
    _kubectl(kubeconfig, "delete", "-n", NAMESPACE, "members,trainingruns", "--all", "--wait=false")
    time.sleep(1)
    assert {"Member/hospital-a", "TrainingRun/mnist-fedavg"} <= _namespace_content(kubeconfig)
    for kind, name in (("member", "hospital-a"), ("trainingrun", "mnist-fedavg")):
        _kubectl(kubeconfig, "patch", kind, name, "-n", NAMESPACE, "--type=merge",
                 "-p", NO_FINALIZERS)  # fmt: skip
    _kubectl(kubeconfig, "delete", "-n", NAMESPACE, "pvc", "hospital-a-data")
    _wait(lambda: _namespace_content(kubeconfig) == KEPT, 20, "the user's objects to go",
          lambda: str(_namespace_content(kubeconfig)))  # fmt: skip


def test_uninstall_with_the_operator_down_fails_clearly_then_succeeds_once_it_is_back(
    kubeconfig, tmp_path
):
    _helm_on(kubeconfig, "install", RELEASE, str(CHART), "--create-namespace",
             "--set", "uninstallHook.timeoutSeconds=2")  # fmt: skip
    with _kubelet(kubeconfig, tmp_path) as kubelet:
        _run_operator_pod(kubeconfig, "operator-1")
        _operator_holds_the_alliance(kubeconfig, kubelet, "operator-1")
        _kubectl(kubeconfig, "delete", "pod", "operator-1", "-n", NAMESPACE)  # down (crashing...)
        kubelet.wait_for(lambda: kubelet.pid(NAMESPACE, "operator-1") is None, 20)

        result = _helm_on(kubeconfig, "uninstall", RELEASE, check=False)
        assert result.returncode != 0 and f"pod {HOOK} failed" in result.stderr, result.stderr
        hook_log = kubelet.logs(NAMESPACE, HOOK)
        assert "FAILED: after 2 s, 1 Alliance(s) are still there:" in hook_log
        assert f"Alliance {NAMESPACE}/mnist: being deleted, finalizers: {FINALIZER}" in hook_log
        # Nothing else was deleted, and the failed hook pod stays for its log and its status.
        pod = _get_json(kubeconfig, "pod", HOOK)
        assert pod["status"]["phase"] == "Failed"
        (state,) = pod["status"]["containerStatuses"]
        assert "FAILED: after 2 s" in state["state"]["terminated"]["message"]
        assert OPERATOR_DEPLOYMENT in _names(kubeconfig, "deployments")

        # The operator back: it ends the Alliance's deletion; helm uninstall then goes through.
        _run_operator_pod(kubeconfig, "operator-2")
        _wait(lambda: "mnist" not in _alliances(kubeconfig), 60, "the Alliance to go")
        _helm_on(kubeconfig, "uninstall", RELEASE)
        assert "nothing to delete" in kubelet.logs(NAMESPACE, HOOK)
        kubelet.wait_for(lambda: kubelet.pid(NAMESPACE, "operator-2") is None, 20)

    assert _namespace_content(kubeconfig) == KEPT
    assert _release_cluster_objects(kubeconfig) == set()
