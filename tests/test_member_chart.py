"""The member organisation's chart (charts/alliance-member): lint, schema, rendering, contract.

A member runs its agent in its own cluster with ``helm install NAME charts/alliance-member -f
bundle.yaml``, the join bundle the alliance's operator publishes. Each scenario below is that
bundle plus the organisation's own values (a second ``-f`` file, as a user would pass it); it
is linted with ``--strict`` and rendered with ``helm template``, and every rendered object goes
through ``kubernetes-validate --strict`` (the real Kubernetes 1.37 schemas, offline). The agent's
pod is compared with what ``alliance/contract.py`` names and with the operator's own member pod
(``member_pod``), its arguments are parsed by the real ``alliance`` parser, its data schema by
the engine's ``DataSchema``. NOTES are rendered by ``helm install --dry-run=client`` against the
test API server (tests/kube/apiserver.py); the helm test pod's check runs here against a local
HTTP and HTTPS server.

Not checked here: that the agent reaches a real store from a pod (no container runtime) and
NetworkPolicy enforcement (no CNI).
"""

from __future__ import annotations

import base64
import copy
import http.server
import inspect
import json
import re
import ssl
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import jsonschema
import pytest
import yaml
from alliance_operator.resources.pods import member_pod

from alliance import cli, contract
from alliance.data.schema import DataSchema
from tests.test_chart import (
    HELM,
    KUBERNETES_VERSION,
    VALIDATE,
    assert_closed,
    docs,
    find,
    one,
    schema_leaves,
    selector_matches,
)

ROOT = Path(__file__).resolve().parents[1]
CHART = ROOT / "charts" / "alliance-member"
RELEASE = "hospital-a"
NAMESPACE = "hospital"
FULLNAME = "hospital-a-alliance-member"  # <release>-<chart>
SECRET = f"{FULLNAME}-store"

ACCESS_KEY = "AKMEMBERHOSPITALA0001"
SECRET_KEY = "wJalrXUtnFEMIK7MDENGbPxRfiCYhospitalA0001"
# Not a usable certificate: the chart only checks that it is PEM (the agent and the test pod
# read it); test_helm_test_pod_checks_the_store_with_the_ca uses a real one.
CA_CERT = (
    "-----BEGIN CERTIFICATE-----\n"
    "MIIBszCCAVmgAwIBAgIUJoinBundleTestCertificateOfTheStore0wCgYIKoZIzj0EAwIw\n"
    "-----END CERTIFICATE-----\n"
)


def bundle_text(
    *,
    alliance: str = "mnist",
    member: str = "hospital-a",
    endpoint: str = "https://store.example.org:9000",
    bucket: str = "alliance",
    access_key: str | None = ACCESS_KEY,
    secret_key: str | None = SECRET_KEY,
    ca_cert: str = "",
) -> str:
    """A join bundle, written as the alliance's operator writes it (a values file of the chart).
    A key given as None is left out."""

    def scalar(value: str) -> str:
        return value if re.fullmatch(r"[a-z][-a-z0-9.:/\[\]]*", value) else json.dumps(value)

    store = {"endpoint": endpoint, "bucket": bucket, "accessKey": access_key}
    store |= {"secretKey": secret_key}
    lines = [
        f"# Join bundle: member {member} of alliance {alliance}. Holds the member's own store"
        " keys: keep it secret.",
        f"alliance: {scalar(alliance)}",
        f"member: {scalar(member)}",
        "store:",
        *(f"  {key}: {scalar(value)}" for key, value in store.items() if value is not None),
        "  caCert: " + ("|\n" + textwrap.indent(ca_cert, "    ") if ca_cert else '""'),
    ]
    return "\n".join(lines) + "\n"


#: Each scenario: the join bundle's arguments, and the organisation's own values.
SCENARIOS: dict[str, tuple[dict, dict]] = {
    "minimal-bundle": ({}, {}),
    "existing-claim": ({}, {"data": {"existingClaim": "hospital-a-mnist"}}),
    "created-claim-storage-class": (
        {},
        {
            "data": {
                "size": "20Gi",
                "storageClass": "fast-ssd",
                "accessModes": ["ReadWriteOnce", "ReadOnlyMany"],
            }
        },
    ),
    "https-ca": ({"endpoint": "https://store.example.org", "ca_cert": CA_CERT}, {}),
    "http": ({"endpoint": "http://192.0.2.10:9000"}, {}),
    "custom-schema": (
        {},
        {
            "dataSchema": {
                "labelColumn": "outcome",
                "featureShape": [20],
                "numClasses": 2,
                "minValue": -1000,
                "maxValue": 1000.5,
                "scale": 1,
                "delimiter": ";",
            },
            "validator": True,
            "logLevel": "debug",
        },
    ),
    "no-network-policy": ({}, {"networkPolicy": {"enabled": False}}),
    "store-cidrs": (
        {"endpoint": "https://store.example.org:8443/"},
        {
            "networkPolicy": {
                "storeCIDRs": ["203.0.113.10/32", "2001:db8::/64"],
                "dnsPeers": [],
                "metricsFrom": [
                    {"namespaceSelector": {"matchLabels": {"name": "monitoring"}}},
                    {"ipBlock": {"cidr": "10.0.0.0/8"}},
                ],
            }
        },
    ),
    "custom-image-resources": (
        {"alliance": "cifar", "member": "lab.b-2"},
        {
            "image": {"repository": "registry.example.org/fl/alliance-member", "tag": "1.2.3"},
            "imagePullSecrets": [{"name": "regcred"}],
            "podAnnotations": {"prometheus.io/scrape": "true"},
            "resources": {
                "requests": {"cpu": "1", "memory": "2Gi"},
                "limits": {"cpu": 4, "memory": "8Gi"},
            },
            "nodeSelector": {"kubernetes.io/os": "linux"},
            "tolerations": [{"key": "dedicated", "operator": "Equal", "value": "ml"}],
            "affinity": {
                "nodeAffinity": {
                    "requiredDuringSchedulingIgnoredDuringExecution": {
                        "nodeSelectorTerms": [
                            {
                                "matchExpressions": [
                                    {"key": "pool", "operator": "In", "values": ["gpu"]}
                                ]
                            }
                        ]
                    }
                }
            },
            "metricsPort": 9200,
        },
    ),
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


def values_args(tmp_path: Path, name: str, bundle: dict, values: dict) -> list[str]:
    """``-f bundle.yaml -f values.yaml``, as the organisation passes them."""
    bundle_path = tmp_path / f"{name}.bundle.yaml"
    bundle_path.write_text(bundle_text(**bundle))
    out = ["-f", str(bundle_path)]
    if values:
        values_path = tmp_path / f"{name}.values.yaml"
        values_path.write_text(yaml.safe_dump(values, sort_keys=False))
        out += ["-f", str(values_path)]
    return out


def template(args: list[str], *extra: str, check: bool = True) -> subprocess.CompletedProcess:
    return helm(
        "template", RELEASE, str(CHART), "--namespace", NAMESPACE, *args, *extra, check=check
    )


def effective(bundle: dict, values: dict) -> dict:
    """A scenario's values as the chart sees them (bundle, then the organisation's values)."""
    merged = yaml.safe_load((CHART / "values.yaml").read_text())

    def merge(into: dict, over: dict) -> None:
        for key, value in over.items():
            if isinstance(value, dict) and isinstance(into.get(key), dict):
                merge(into[key], value)
            else:
                into[key] = copy.deepcopy(value)

    merge(merged, yaml.safe_load(bundle_text(**bundle)))
    merge(merged, values)
    return merged


@pytest.fixture(scope="module")
def rendered(tmp_path_factory) -> dict[str, tuple[str, list[dict]]]:
    """Each scenario's rendered text and its documents, rendered once for the module."""
    tmp = tmp_path_factory.mktemp("member-chart")
    out = {}
    for name, (bundle, values) in SCENARIOS.items():
        text = template(values_args(tmp, name, bundle, values)).stdout
        out[name] = (text, docs(text))
    return out


def agent(objs: list[dict]) -> tuple[dict, dict, dict]:
    """The Deployment, its pod spec and the agent container."""
    deployment = one(objs, "Deployment")
    spec = deployment["spec"]["template"]["spec"]
    (container,) = spec["containers"]
    return deployment, spec, container


def pod_specs(objs: list[dict]) -> list[tuple[str, dict, dict]]:
    """(kind/name, pod labels, pod spec) of every pod the chart runs."""
    out = []
    for o in objs:
        if o["kind"] == "Deployment":
            pod = o["spec"]["template"]
        elif o["kind"] == "Pod":
            pod = o
        else:
            continue
        out.append((f"{o['kind']}/{o['metadata']['name']}", pod["metadata"]["labels"], pod["spec"]))
    return out


def operator_member_pod(values: dict) -> dict:
    """The pod the alliance's operator builds for the same member in its own cluster (with the
    member's own keys and the store's CA where the operator's member_pod takes them)."""
    member_spec = {"alliance": values["alliance"], "dataVolumeClaim": "claim"}
    if values.get("validator"):
        member_spec["validator"] = True
    if values.get("dataSchema"):
        member_spec["dataSchema"] = values["dataSchema"]
    alliance_spec = {
        "store": {
            "endpoint": values["store"]["endpoint"].rstrip("/"),
            "bucket": values["store"]["bucket"],
            "credentialsSecret": {"name": SECRET},
        }
    }
    options = {"credentials_secret": SECRET, "credentials_digest": "0", "has_ca": True}
    accepted = inspect.signature(member_pod).parameters
    options = {k: v for k, v in options.items() if k in accepted}
    if "has_ca" in options:
        options["has_ca"] = bool(values["store"]["caCert"])
    return member_pod(
        values["member"], member_spec, alliance_spec, "alliance-member:0.1.0", **options
    )


# --- helm lint, the join bundle and the schema -----------------------------------------------


@pytest.mark.parametrize("scenario", sorted(SCENARIOS))
def test_helm_lint_strict(scenario, tmp_path):
    bundle, values = SCENARIOS[scenario]
    args = values_args(tmp_path, scenario, bundle, values)
    result = helm("lint", "--strict", str(CHART), "--namespace", NAMESPACE, *args)
    assert "1 chart(s) linted, 0 chart(s) failed" in result.stdout
    assert "[WARNING]" not in result.stdout and "[ERROR]" not in result.stdout


def test_a_join_bundle_is_the_charts_values_file(tmp_path):
    """The bundle format of the brief, as the operator's ``contract.join_bundle`` makes it, is
    accepted by the agent's reader and installs as ``-f bundle.yaml`` alone."""
    text = bundle_text(ca_cert=CA_CERT)
    assert text.startswith("# Join bundle: member hospital-a of alliance mnist.")
    parsed = yaml.safe_load(text)
    assert parsed == contract.join_bundle(
        alliance="mnist",
        member="hospital-a",
        endpoint="https://store.example.org:9000",
        bucket="alliance",
        access_key=ACCESS_KEY,
        secret_key=SECRET_KEY,
        ca_cert=CA_CERT,
    )
    assert contract.read_join_bundle(parsed)["ca_cert"] == CA_CERT
    path = tmp_path / "bundle.yaml"
    path.write_text(text)
    result = helm("lint", "--strict", str(CHART), "--namespace", NAMESPACE, "-f", str(path))
    assert "0 chart(s) failed" in result.stdout and "[WARNING]" not in result.stdout
    # The operator writes the bundle with yaml.safe_dump: that form installs too.
    path.write_text(yaml.safe_dump(parsed))
    objs = docs(template(["-f", str(path)]).stdout)
    assert base64.b64decode(one(objs, "Secret")["data"]["ca.crt"]).decode() == CA_CERT


def test_the_chart_needs_a_bundle():
    result = helm("template", RELEASE, str(CHART), check=False)
    assert result.returncode != 0
    assert "values don't meet the specifications of the schema" in result.stderr


def _bad(**bundle) -> tuple[dict, dict]:
    return bundle, {}


@pytest.mark.parametrize(
    "bundle, values, message",
    [
        (*_bad(member="Hospital_A"), "member"),  # a pattern
        (*_bad(member="a" * 64), "member"),  # 63 characters at most
        (*_bad(member="-hospital"), "member"),
        (*_bad(member="hospital-"), "member"),
        (*_bad(member="h" * 64), "member"),
        (*_bad(access_key=None), "store.accessKey"),  # missing
        (*_bad(access_key=""), "store.accessKey"),  # empty
        (*_bad(secret_key=None), "store.secretKey"),
        (*_bad(access_key="two words"), "store.accessKey"),
        (*_bad(endpoint="store.example.org:9000"), "store.endpoint"),  # no scheme
        (*_bad(endpoint="ftp://store.example.org"), "store.endpoint"),
        (*_bad(endpoint="https://store.example.org/alliance"), "store.endpoint"),  # a path
        (*_bad(bucket=""), "store.bucket"),
        (*_bad(alliance=""), "alliance"),
        (*_bad(ca_cert="not a certificate\n"), "store.caCert"),
        ({}, {"logLevel": "verbose"}, "logLevel"),  # an enum
        ({}, {"validator": "yes"}, "validator"),  # a type
        ({}, {"metricsPort": 70000}, "metricsPort"),
        ({}, {"data": {"size": "lots"}}, "data.size"),
        ({}, {"data": {"accessModes": ["ReadWriteSometimes"]}}, "data.accessModes"),
        ({}, {"networkPolicy": {"storeCIDRs": ["store.example.org"]}}, "networkPolicy.storeCIDRs"),
        ({}, {"dataSchema": {"numClasses": 1}}, "dataSchema.numClasses"),
        ({}, {"dataSchema": {"delimiter": "."}}, "dataSchema.delimiter"),
        ({}, {"dataSchema": {"num_classes": 2}}, "num_classes"),  # unknown keys, at every level
        ({}, {"store": {"region": "eu-west-1"}}, "region"),
        ({}, {"data": {"readOnly": False}}, "readOnly"),
        ({}, {"networkPolicy": {"egress": []}}, "egress"),
        ({}, {"resources": {"limit": {"cpu": 1}}}, "limit"),
        ({}, {"image": {"digest": "sha256:0"}}, "digest"),
        ({}, {"serviceAccount": {"create": True}}, "serviceAccount"),  # no RBAC, no account
        ({}, {"bogus": True}, "bogus"),
    ],
)
def test_schema_refuses_bad_values(bundle, values, message, tmp_path):
    result = template(values_args(tmp_path, "bad", bundle, values), check=False)
    assert result.returncode != 0, f"{bundle} {values} was accepted"
    assert "values don't meet the specifications of the schema" in result.stderr, result.stderr
    assert message in result.stderr, result.stderr


def _schema() -> dict:
    return json.loads((CHART / "values.schema.json").read_text())


def test_schema_covers_every_value_and_closes_every_object():
    schema = _schema()
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    assert schema["$schema"] == "http://json-schema.org/draft-07/schema#"
    jsonschema.Draft7Validator.check_schema(schema)
    # values.yaml alone lacks the bundle (the chart refuses to install without one); with it,
    # the schema accepts the defaults.
    errors = {e.json_path for e in jsonschema.Draft7Validator(schema).iter_errors(values)}
    assert errors == {
        "$.alliance", "$.member", "$.store.endpoint", "$.store.bucket", "$.store.accessKey",
        "$.store.secretKey",
    }  # fmt: skip
    jsonschema.Draft7Validator(schema).validate(effective({}, {}))
    for bundle, extra in SCENARIOS.values():
        jsonschema.Draft7Validator(schema).validate(effective(bundle, extra))
    leaves = list(schema_leaves(values, schema))
    assert len(leaves) > 25
    assert_closed(schema)
    assert schema["additionalProperties"] is False


def test_values_are_documented_key_by_key():
    text = (CHART / "values.yaml").read_text()
    documented = re.findall(r"^\s*## @param (\S+) \S", text, re.M)
    assert len(documented) == len(set(documented)), "a key is documented twice"
    leaves = set(schema_leaves(yaml.safe_load(text), _schema()))
    assert set(documented) == leaves, (
        f"undocumented: {sorted(leaves - set(documented))}; "
        f"documented but absent: {sorted(set(documented) - leaves)}"
    )
    # The bundle's keys are the contract's, and values.yaml holds no key of its own.
    bundle = contract.join_bundle(
        alliance="", member="", endpoint="", bucket="", access_key="", secret_key=""
    )
    values = yaml.safe_load(text)
    assert {k: values[k] for k in bundle} == bundle


def test_chart_is_released_with_the_alliance_chart():
    ours = yaml.safe_load((CHART / "Chart.yaml").read_text())
    alliance = yaml.safe_load((ROOT / "charts" / "alliance" / "Chart.yaml").read_text())
    assert ours["apiVersion"] == "v2" and ours["type"] == "application"
    assert ours["name"] == "alliance-member"
    assert (ours["version"], ours["appVersion"]) == (alliance["version"], alliance["appVersion"])
    assert ours["kubeVersion"] == alliance["kubeVersion"]
    ignored = (CHART / ".helmignore").read_text().splitlines()
    assert "bundle.yaml" in ignored  # a bundle next to the chart is never packaged


# --- the rendered manifests ------------------------------------------------------------------


def test_rendered_manifests_pass_kubernetes_validate(rendered, tmp_path):
    """Every scenario's objects, in one run of the validator (one process: fast)."""
    paths, expected = [], []
    for scenario, (text, objs) in sorted(rendered.items()):
        path = tmp_path / f"{scenario}.yaml"
        path.write_text(text)
        paths.append(str(path))
        expected += [f"{path}:{o['kind'].lower()}/{o['metadata']['name']}" for o in objs]
    result = subprocess.run(
        [str(VALIDATE), "--strict", "-k", KUBERNETES_VERSION, *paths],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    passed = re.findall(r"^INFO (\S+) passed for resource (\S+) ", result.stdout, re.M)
    assert sorted(f"{f}:{r}" for f, r in passed) == sorted(expected), result.stdout
    assert "ERROR" not in result.stdout and "WARN" not in result.stdout, result.stdout


def test_what_the_chart_creates(rendered):
    kinds = {
        name: sorted(f"{o['kind']}/{o['metadata']['name']}" for o in objs)
        for name, (_, objs) in rendered.items()
    }
    assert kinds["minimal-bundle"] == sorted(
        [
            f"Deployment/{FULLNAME}",
            f"NetworkPolicy/{FULLNAME}",
            f"PersistentVolumeClaim/{FULLNAME}-data",
            f"Pod/{FULLNAME}-test",
            f"Secret/{SECRET}",
        ]
    )
    assert f"PersistentVolumeClaim/{FULLNAME}-data" not in kinds["existing-claim"]
    assert f"NetworkPolicy/{FULLNAME}" not in kinds["no-network-policy"]
    # No Kubernetes API rights for a member: no account, no role, no binding.
    for objs in kinds.values():
        assert not [k for k in objs if re.match(r"(ServiceAccount|(Cluster)?Role(Binding)?)/", k)]
    for _, objs in rendered.values():
        for o in objs:
            assert o["metadata"]["namespace"] == NAMESPACE
            labels = o["metadata"]["labels"]
            assert labels["app.kubernetes.io/part-of"] == "alliance"
            assert labels["app.kubernetes.io/instance"] == RELEASE


def test_labels_name_the_alliance_and_the_member(rendered):
    for scenario, (_, objs) in rendered.items():
        values = effective(*SCENARIOS[scenario])
        for o in objs:
            labels = o["metadata"]["labels"]
            assert labels["alliance.dev/alliance"] == values["alliance"], scenario
            assert labels["alliance.dev/member"] == values["member"], scenario


def test_long_alliance_names_still_make_valid_labels(tmp_path):
    name = "a" * 62 + "-x" + ".b" * 20  # a 104-character object name: too long for a label
    objs = docs(template(values_args(tmp_path, "long", {"alliance": name}, {})).stdout)
    for o in objs:
        value = o["metadata"]["labels"]["alliance.dev/alliance"]
        assert len(value) <= 63 and re.fullmatch(r"[a-z0-9]([-a-z0-9.]*[a-z0-9])?", value)


# --- the agent's Deployment ------------------------------------------------------------------


def test_one_agent_replaced_not_rolled(rendered):
    deployment, _, _ = agent(rendered["minimal-bundle"][1])
    assert deployment["spec"]["replicas"] == 1
    assert deployment["spec"]["strategy"] == {"type": "Recreate"}
    template_labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert selector_matches(deployment["spec"]["selector"], template_labels)
    assert template_labels["app.kubernetes.io/component"] == "agent"


def test_new_keys_roll_the_agent(tmp_path):
    def checksum(**bundle) -> str:
        objs = docs(template(values_args(tmp_path, "keys", bundle, {})).stdout)
        annotations = one(objs, "Deployment")["spec"]["template"]["metadata"]["annotations"]
        return annotations["checksum/secret"]

    first = checksum()
    assert re.fullmatch(r"[0-9a-f]{64}", first)
    assert checksum() == first  # stable
    assert checksum(secret_key="another-secret-key-0001") != first
    assert checksum(access_key="ANOTHERACCESSKEY0001") != first
    assert checksum(ca_cert=CA_CERT) != first


@pytest.mark.parametrize("scenario", sorted(SCENARIOS))
def test_agent_pod_is_hardened_as_the_operators_member_pods(scenario, rendered):
    _, objs = rendered[scenario]
    values = effective(*SCENARIOS[scenario])
    operator_pod = operator_member_pod(values)["spec"]
    operator_container = operator_pod["containers"][0]
    specs = pod_specs(objs)
    assert sorted(w for w, _, _ in specs) == [f"Deployment/{FULLNAME}", f"Pod/{FULLNAME}-test"]
    for where, _, spec in specs:
        assert spec["securityContext"] == {
            "runAsNonRoot": True,
            "runAsUser": 10001,
            "runAsGroup": 10001,
            "fsGroup": 10001,
            "fsGroupChangePolicy": "OnRootMismatch",
            "seccompProfile": {"type": "RuntimeDefault"},
        }, where
        assert spec["securityContext"] == operator_pod["securityContext"], where
        assert spec["automountServiceAccountToken"] is False, where
        assert spec["enableServiceLinks"] is False, where
        assert "serviceAccountName" not in spec and "serviceAccount" not in spec, where
        for forbidden in ("hostNetwork", "hostPID", "hostIPC", "initContainers"):
            assert forbidden not in spec, f"{where}: {forbidden}"
        empty_dirs = {v["name"] for v in spec["volumes"] if "emptyDir" in v}
        (c,) = spec["containers"]
        assert c["securityContext"] == {
            "allowPrivilegeEscalation": False,
            "readOnlyRootFilesystem": True,
            "runAsNonRoot": True,
            "capabilities": {"drop": ["ALL"]},
        }, where
        assert c["securityContext"] == operator_container["securityContext"], where
        assert c["terminationMessagePolicy"] == "FallbackToLogsOnError", where
        mounts = {m["mountPath"]: m for m in c["volumeMounts"]}
        assert mounts["/tmp"]["name"] in empty_dirs, f"{where}: /tmp is not an emptyDir"
        assert c["resources"].get("limits"), f"{where}: no resource limits"
        assert ":" in c["image"] and not c["image"].endswith(":latest"), where
        for m in c["volumeMounts"]:  # only scratch space is writable
            assert m["name"] in empty_dirs or m.get("readOnly") is True, f"{where}: {m}"
    _, spec, _ = agent(objs)
    assert spec["restartPolicy"] == "Always"
    assert spec["terminationGracePeriodSeconds"] == operator_pod["terminationGracePeriodSeconds"]


def test_default_resources_are_the_operators(rendered):
    _, _, container = agent(rendered["minimal-bundle"][1])
    assert container["resources"] == {
        "requests": {"cpu": "500m", "memory": "1Gi"},
        "limits": {"cpu": "2", "memory": "4Gi"},
    }
    values = effective(*SCENARIOS["minimal-bundle"])
    assert (
        container["resources"] == operator_member_pod(values)["spec"]["containers"][0]["resources"]
    )


def test_image_defaults_to_the_app_version(rendered):
    app_version = yaml.safe_load((CHART / "Chart.yaml").read_text())["appVersion"]
    for where, _, spec in pod_specs(rendered["minimal-bundle"][1]):
        assert spec["containers"][0]["image"] == f"alliance-member:{app_version}", where
        assert spec["containers"][0]["imagePullPolicy"] == "IfNotPresent", where
        assert "imagePullSecrets" not in spec, where


def test_custom_image_and_scheduling(rendered):
    _, objs = rendered["custom-image-resources"]
    values = SCENARIOS["custom-image-resources"][1]
    deployment, spec, container = agent(objs)
    assert container["image"] == "registry.example.org/fl/alliance-member:1.2.3"
    assert container["resources"]["requests"] == {"cpu": "1", "memory": "2Gi"}
    assert container["resources"]["limits"] == {"cpu": 4, "memory": "8Gi"}
    for key in ("nodeSelector", "tolerations", "affinity", "imagePullSecrets"):
        assert spec[key] == values[key], key
    annotations = deployment["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true" and "checksum/secret" in annotations
    test_pod = one(objs, "Pod")
    assert test_pod["spec"]["imagePullSecrets"] == values["imagePullSecrets"]
    assert test_pod["spec"]["containers"][0]["image"] == container["image"]


def env_of(container: dict) -> dict[str, dict]:
    names = [e["name"] for e in container["env"]]
    assert len(names) == len(set(names)), names
    return {e["name"]: e for e in container["env"]}


@pytest.mark.parametrize("scenario", sorted(SCENARIOS))
def test_agent_command_follows_the_contract(scenario, rendered):
    _, objs = rendered[scenario]
    values = effective(*SCENARIOS[scenario])
    _, _, container = agent(objs)
    assert container["name"] == "agent"  # ALLIANCE_CPU_THREADS' resourceFieldRef names it
    assert container["command"] == [contract.COMMAND]
    assert container["args"] == contract.member_args(
        values["member"], "/data", log_level=values["logLevel"], validator=values["validator"]
    )
    args = cli.build_parser().parse_args(container["args"])
    assert args.func is cli.cmd_member
    assert args.name == values["member"]
    assert args.data_dir == Path("/data")
    assert args.log_level == values["logLevel"]
    assert args.validator is values["validator"]
    assert args.schema is None and args.metrics_port is None  # both travel in the environment
    assert args.train_command is None and args.validate_command is None


@pytest.mark.parametrize("scenario", sorted(SCENARIOS))
def test_agent_environment_follows_the_contract(scenario, rendered):
    _, objs = rendered[scenario]
    values = effective(*SCENARIOS[scenario])
    _, spec, container = agent(objs)
    env = env_of(container)
    known = {v for k, v in vars(contract).items() if k.startswith("ENV_")}
    assert set(env) - known == {"HOME", "PYTHONUNBUFFERED"}
    # The same variables as the operator's member pod, plus the CA file of an https store.
    operator_env = env_of(operator_member_pod(values)["spec"]["containers"][0])
    ca = {contract.ENV_S3_CA_FILE} if values["store"]["caCert"] else set()
    assert set(env) == (set(operator_env) - {contract.ENV_S3_CA_FILE}) | ca
    for name in set(env) & set(operator_env) - {contract.ENV_METRICS_PORT}:
        assert env[name] == operator_env[name], name  # the same value, the same source

    assert env[contract.ENV_S3_ENDPOINT]["value"] == values["store"]["endpoint"].rstrip("/")
    assert env[contract.ENV_BUCKET]["value"] == values["store"]["bucket"]
    secret = one(objs, "Secret", SECRET)
    for name, key in (
        (contract.ENV_S3_ACCESS_KEY, contract.SECRET_ACCESS_KEY),
        (contract.ENV_S3_SECRET_KEY, contract.SECRET_SECRET_KEY),
    ):
        assert env[name] == {
            "name": name,
            "valueFrom": {"secretKeyRef": {"name": SECRET, "key": key}},
        }
        assert key in secret["data"]
    assert env[contract.ENV_CPU_THREADS]["valueFrom"] == {
        "resourceFieldRef": {"containerName": "agent", "resource": "limits.cpu"}
    }
    assert env["HOME"]["value"] == "/tmp" and env["PYTHONUNBUFFERED"]["value"] == "1"

    volumes = {v["name"]: v for v in spec["volumes"]}
    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    cache = mounts[env[contract.ENV_CACHE_DIR]["value"]]
    assert cache["mountPath"] == "/var/cache/alliance"
    assert "emptyDir" in volumes[cache["name"]]
    assert "emptyDir" in volumes[mounts[env["HOME"]["value"]]["name"]]

    port = values["metricsPort"]
    assert env[contract.ENV_METRICS_PORT]["value"] == str(port)
    assert container["ports"] == [{"name": "metrics", "containerPort": port, "protocol": "TCP"}]

    data = mounts["/data"]
    assert data["readOnly"] is True
    claim = volumes[data["name"]]["persistentVolumeClaim"]
    assert claim["readOnly"] is True
    assert claim["claimName"] == (values["data"]["existingClaim"] or f"{FULLNAME}-data")

    if values["store"]["caCert"]:
        path = Path(env[contract.ENV_S3_CA_FILE]["value"])
        mount = mounts[str(path.parent)]
        assert mount["readOnly"] is True
        source = volumes[mount["name"]]["secret"]
        assert source["secretName"] == SECRET
        assert source["items"] == [{"key": contract.SECRET_CA_CERT, "path": path.name}]
        assert base64.b64decode(secret["data"][contract.SECRET_CA_CERT]).decode() == CA_CERT
        if contract.ENV_S3_CA_FILE in operator_env:  # the operator mounts it the same way
            operator_spec = operator_member_pod(values)["spec"]
            assert volumes["store-ca"] in operator_spec["volumes"]
            assert mount in operator_spec["containers"][0]["volumeMounts"]
    else:
        assert contract.SECRET_CA_CERT not in secret["data"]
        assert not [v for v in spec["volumes"] if "secret" in v]

    if values["dataSchema"]:
        inline = env[contract.ENV_DATA_SCHEMA]["value"]
        assert json.loads(inline) == values["dataSchema"]
        # What the agent makes of it (alliance.cli._schema) is the schema the values describe.
        assert DataSchema.from_dict(json.loads(inline)) == DataSchema.from_dict(
            values["dataSchema"]
        )
        assert json.loads(inline) == json.loads(operator_env[contract.ENV_DATA_SCHEMA]["value"])
    else:
        assert contract.ENV_DATA_SCHEMA not in env


def test_data_claims(rendered):
    _, objs = rendered["existing-claim"]
    assert not find(objs, "PersistentVolumeClaim")
    _, spec, _ = agent(objs)
    (data,) = [v for v in spec["volumes"] if v["name"] == "data"]
    assert data["persistentVolumeClaim"] == {"claimName": "hospital-a-mnist", "readOnly": True}

    _, objs = rendered["minimal-bundle"]
    pvc = one(objs, "PersistentVolumeClaim", f"{FULLNAME}-data")
    assert pvc["spec"] == {
        "accessModes": ["ReadWriteOnce"],
        "resources": {"requests": {"storage": "5Gi"}},
    }
    # The organisation's data: kept when the release goes.
    assert pvc["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"

    _, objs = rendered["created-claim-storage-class"]
    pvc = one(objs, "PersistentVolumeClaim", f"{FULLNAME}-data")
    assert pvc["spec"] == {
        "accessModes": ["ReadWriteOnce", "ReadOnlyMany"],
        "storageClassName": "fast-ssd",
        "resources": {"requests": {"storage": "20Gi"}},
    }


# --- secrets ---------------------------------------------------------------------------------


@pytest.mark.parametrize("scenario", sorted(SCENARIOS))
def test_no_secret_value_outside_the_secret(scenario, rendered):
    text, objs = rendered[scenario]
    secret = one(objs, "Secret", SECRET)
    assert secret["type"] == "Opaque" and "stringData" not in secret
    expected = {contract.SECRET_ACCESS_KEY: ACCESS_KEY, contract.SECRET_SECRET_KEY: SECRET_KEY}
    if effective(*SCENARIOS[scenario])["store"]["caCert"]:
        expected[contract.SECRET_CA_CERT] = CA_CERT
    assert {k: base64.b64decode(v).decode() for k, v in secret["data"].items()} == expected
    for key in (ACCESS_KEY, SECRET_KEY):
        encoded = base64.b64encode(key.encode()).decode()
        assert text.count(key) == 0, "a key in plain text"
        assert text.count(encoded) == 1, "a key outside the Secret"
        for o in objs:
            if o is not secret:
                assert key not in json.dumps(o) and encoded not in json.dumps(o), o["kind"]


# --- the network policy ----------------------------------------------------------------------


def network_policy(tmp_path: Path, endpoint: str, **values) -> dict:
    args = values_args(tmp_path, "np", {"endpoint": endpoint}, values)
    text = template(args, "--show-only", "templates/networkpolicy.yaml").stdout
    (policy,) = docs(text)
    return policy["spec"]


@pytest.mark.parametrize(
    "endpoint, port",
    [
        ("https://store.example.org", 443),
        ("https://store.example.org/", 443),
        ("https://store.example.org:9000", 9000),
        ("http://store.example.org", 80),
        ("http://192.0.2.10:9000", 9000),
        ("https://[2001:db8::10]", 443),
        ("https://[2001:db8::10]:8443/", 8443),
    ],
)
def test_network_policy_egress_port_follows_the_endpoint(endpoint, port, tmp_path):
    spec = network_policy(tmp_path, endpoint)
    to_store, _ = spec["egress"]
    assert to_store == {"ports": [{"port": port, "protocol": "TCP"}]}  # any address: no CIDRs


def test_network_policy_restricts_the_agent_to_dns_and_the_store(rendered):
    _, objs = rendered["minimal-bundle"]
    spec = one(objs, "NetworkPolicy", FULLNAME)["spec"]
    assert spec["policyTypes"] == ["Ingress", "Egress"]
    # It selects the agent and the helm test pod (same egress), and only the release's pods.
    for where, labels, _ in pod_specs(objs):
        assert selector_matches(spec["podSelector"], labels), where
    other = dict(pod_specs(objs)[0][1], **{"app.kubernetes.io/instance": "hospital-b"})
    assert not selector_matches(spec["podSelector"], other)
    _, _, container = agent(objs)
    (metrics,) = container["ports"]
    (ingress,) = spec["ingress"]
    assert ingress == {"ports": [{"port": metrics["containerPort"], "protocol": "TCP"}]}
    to_store, dns = spec["egress"]
    assert to_store == {"ports": [{"port": 9000, "protocol": "TCP"}]}
    assert sorted((p["protocol"], p["port"]) for p in dns["ports"]) == [("TCP", 53), ("UDP", 53)]
    assert dns["to"] == [
        {
            "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "kube-system"}},
            "podSelector": {"matchLabels": {"k8s-app": "kube-dns"}},
        }
    ]


def test_network_policy_with_store_cidrs_and_peers(rendered):
    _, objs = rendered["store-cidrs"]
    values = SCENARIOS["store-cidrs"][1]["networkPolicy"]
    spec = one(objs, "NetworkPolicy", FULLNAME)["spec"]
    to_store, dns = spec["egress"]
    assert to_store == {
        "ports": [{"port": 8443, "protocol": "TCP"}],
        "to": [{"ipBlock": {"cidr": "203.0.113.10/32"}}, {"ipBlock": {"cidr": "2001:db8::/64"}}],
    }
    assert "to" not in dns  # dnsPeers: [] lets DNS go anywhere (port 53 only)
    (ingress,) = spec["ingress"]
    assert ingress["from"] == values["metricsFrom"]
    _, objs = rendered["custom-image-resources"]
    (ingress,) = one(objs, "NetworkPolicy")["spec"]["ingress"]
    assert ingress == {"ports": [{"port": 9200, "protocol": "TCP"}]}


# --- NOTES.txt -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def notes(tmp_path_factory) -> dict[str, str]:
    """Each scenario's NOTES, from ``helm install --dry-run=client`` on the test API server."""
    from tests.kube.apiserver import ApiServer

    tmp = tmp_path_factory.mktemp("member-notes")
    server = ApiServer().start()
    try:
        kubeconfig = server.write_kubeconfig(tmp / "kubeconfig")
        out = {}
        for name, (bundle, values) in SCENARIOS.items():
            result = helm(
                "--kubeconfig", str(kubeconfig), "install", RELEASE, str(CHART),
                "--namespace", NAMESPACE, *values_args(tmp, name, bundle, values),
                "--dry-run=client", "-o", "json",
            )  # fmt: skip
            out[name] = json.loads(result.stdout)["info"]["notes"]
        return out
    finally:
        server.stop()


@pytest.mark.parametrize("scenario", sorted(SCENARIOS))
def test_notes_render(scenario, notes):
    text = notes[scenario]
    values = effective(*SCENARIOS[scenario])
    assert "{{" not in text and "<no value>" not in text
    assert f"kubectl -n {NAMESPACE} logs -f deploy/{FULLNAME}" in text
    assert f"kubectl get member {values['member']}" in text
    assert "heartbeat" in text and "DataReady" in text and "Ready" in text
    assert "docs/data-format.md" in text and (ROOT / "docs" / "data-format.md").exists()
    assert "test.csv (or test.csv.gz)" in text
    assert ("train.csv (or train.csv.gz)" in text) is not values["validator"]
    assert f"helm test {RELEASE}" in text
    assert values["store"]["endpoint"].rstrip("/") in text
    for key in (ACCESS_KEY, SECRET_KEY, base64.b64encode(SECRET_KEY.encode()).decode()):
        assert key not in text
    assert "BEGIN CERTIFICATE" not in text
    assert ("storeCIDRs is empty" in text) is (
        values["networkPolicy"]["enabled"] and not values["networkPolicy"]["storeCIDRs"]
    )
    assert ("data-loader" in text) is not values["data"]["existingClaim"]


def test_notes_loader_pod_is_valid_and_non_root(notes, tmp_path):
    text = notes["minimal-bundle"]
    block = re.search(r"<<'YAML'\n(.*?)\n\s*YAML\n", text, re.S)
    assert block, text
    pod = yaml.safe_load(textwrap.dedent(block.group(1)))
    path = tmp_path / "loader.yaml"
    path.write_text(yaml.safe_dump(pod))
    result = subprocess.run(
        [str(VALIDATE), "--strict", "-k", KUBERNETES_VERSION, str(path)],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    sc = pod["spec"]["securityContext"]
    assert sc["runAsNonRoot"] is True and sc["runAsUser"] == 10001 and sc["fsGroup"] == 10001
    (c,) = pod["spec"]["containers"]
    assert c["securityContext"]["allowPrivilegeEscalation"] is False
    assert c["securityContext"]["capabilities"] == {"drop": ["ALL"]}
    (volume,) = pod["spec"]["volumes"]
    assert volume["persistentVolumeClaim"]["claimName"] == f"{FULLNAME}-data"
    assert f"{pod['metadata']['name']}:/data/train.csv.gz" in text
    assert f"scale deployment/{FULLNAME} --replicas 0" in text


# --- helm test -------------------------------------------------------------------------------


def test_helm_test_pod(rendered):
    for scenario in ("minimal-bundle", "https-ca", "http"):
        _, objs = rendered[scenario]
        values = effective(*SCENARIOS[scenario])
        pod = one(objs, "Pod", f"{FULLNAME}-test")
        assert pod["metadata"]["annotations"]["helm.sh/hook"] == "test"
        policy = pod["metadata"]["annotations"]["helm.sh/hook-delete-policy"].split(",")
        assert set(policy) == {"before-hook-creation", "hook-succeeded", "hook-failed"}
        assert pod["spec"]["restartPolicy"] == "Never"
        (c,) = pod["spec"]["containers"]
        assert c["command"][:2] == ["python", "-c"]
        code, endpoint, ca_file = c["command"][2:]
        compile(code, "helm-test", "exec")
        assert endpoint == values["store"]["endpoint"].rstrip("/")
        assert "env" not in c or not [e for e in c["env"] if "valueFrom" in e]  # no keys
        mounts = {m["mountPath"]: m for m in c["volumeMounts"]}
        if values["store"]["caCert"]:
            _, _, container = agent(objs)
            assert ca_file == env_of(container)[contract.ENV_S3_CA_FILE]["value"]
            assert str(Path(ca_file).parent) in mounts
        else:
            assert ca_file == "" and len(mounts) == 1


class _Store(http.server.BaseHTTPRequestHandler):
    def do_GET(self):  # an S3 store answers an anonymous request with 403
        self.send_response(403)
        self.end_headers()

    def log_message(self, *args):
        pass


def _serve(context: ssl.SSLContext | None):
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Store)
    if context:
        server.socket = context.wrap_socket(server.socket, server_side=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def _run_check(code: str, endpoint: str, ca_file: str, monkeypatch) -> tuple[int | str | None, str]:
    """The test pod's program, in this process (its retries do not sleep)."""
    monkeypatch.setattr(sys, "argv", ["helm-test", endpoint, ca_file])
    monkeypatch.setattr("time.sleep", lambda s: None)
    output: list[str] = []
    monkeypatch.setattr("builtins.print", lambda *a, **k: output.append(" ".join(map(str, a))))
    try:
        exec(compile(code, "helm-test", "exec"), {"__name__": "__main__"})
    except SystemExit as exc:
        return exc.code, "\n".join(output)
    return 0, "\n".join(output)


def test_helm_test_pod_checks_the_store_with_the_ca(rendered, tmp_path, monkeypatch):
    (c,) = one(rendered["https-ca"][1], "Pod")["spec"]["containers"]
    code = c["command"][2]
    key, cert = tmp_path / "store.key", tmp_path / "store.crt"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
         "-subj", "/CN=localhost", "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1",
         "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True, timeout=60,
    )  # fmt: skip
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    https, http_ = _serve(context), _serve(None)
    try:
        port = https.server_address[1]
        status, out = _run_check(code, f"https://localhost:{port}", str(cert), monkeypatch)
        assert status == 0 and "answers (HTTP 403)" in out, out
        # Without the CA the certificate is not trusted: the check fails, saying so.
        status, out = _run_check(code, f"https://localhost:{port}", "", monkeypatch)
        assert isinstance(status, str) and "CERTIFICATE_VERIFY_FAILED" in status, (status, out)
        port = http_.server_address[1]
        status, out = _run_check(code, f"http://127.0.0.1:{port}", "", monkeypatch)
        assert status == 0 and "answers (HTTP 403)" in out, out
    finally:
        https.shutdown()
        http_.shutdown()
