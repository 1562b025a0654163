"""The CustomResourceDefinitions (crds/), the example resources (examples/) and the engine agree.

Everything here is offline: no cluster, no network. The CRDs are checked as
apiextensions.k8s.io/v1 objects against the real Kubernetes OpenAPI schemas
(kubernetes-validate, strict), and against the rules the API server applies to a CRD's schema
before it accepts it (tests/kube/crdschema.py: structural schema, metadata, defaults valid for
their own field with the server's int64 comparisons, CEL rules). Resources are admitted as the
API server admits them (the same module: pruning, defaulting, validation, CEL rules), with
unknown fields rejected as under kubectl's default ``--validate=strict``.

What only a real API server shows: the exact CEL cost estimate (approximated), Go's RE2 in
patterns (Python's re here). The engine (``RunSpec.validate``, ``DataSchema``) re-checks every
spec anyway.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import re
import subprocess
import sys
from pathlib import Path

import kubernetes_validate
import numpy as np
import pytest
import yaml

from alliance import strategies
from alliance.data.errors import DataError
from alliance.data.schema import DataSchema
from alliance.engine import Phase, RoundRecord, RunSpec, RunStatus, SpecError, Stage
from tests.kube import crdschema

ROOT = Path(__file__).resolve().parents[1]
CRD_DIR = ROOT / "crds"
EXAMPLES = ROOT / "examples"

GROUP = "alliance.dev"
VERSION = "v1alpha1"
KUBERNETES_VERSION = "1.37.0"
# Not "alliance": kubectl expands a category before it looks up a resource type, so a category
# named like the Alliance kind's singular would make `kubectl get/delete alliance NAME` act on the
# Members and TrainingRuns called NAME too.
CATEGORY = "alliance-all"
KINDS = {  # kind -> (plural, short name)
    "Alliance": ("alliances", "aln"),
    "Member": ("members", "mbr"),
    "TrainingRun": ("trainingruns", "tr"),
}
# TrainingRun fields an Alliance's spec.runDefaults can supply: they have no schema default, since
# a server-side default would hide whether the run set them.
RUN_DEFAULTS_FIELDS = {
    "localEpochs",
    "batchSize",
    "aggregator",
    "aggregatorParams",
    "roundDeadlineSeconds",
    "weighting",
    "maxUpdateNorm",
}
JUNCTORS = ("oneOf", "anyOf", "allOf", "not")
PYTHON_TO_OPENAPI = {
    bool: "boolean",
    int: "integer",
    float: "number",
    str: "string",
    dict: "object",
}


def _load(path: Path) -> list[dict]:
    return [doc for doc in yaml.safe_load_all(path.read_text(encoding="utf-8")) if doc]


CRDS = {}
for _path in sorted(CRD_DIR.glob("*.yaml")):
    (_crd,) = _load(_path)
    CRDS[_crd["spec"]["names"]["kind"]] = (_path, _crd)


def crd(kind: str) -> dict:
    return CRDS[kind][1]


def version(kind: str) -> dict:
    (v,) = crd(kind)["spec"]["versions"]
    return v


def openapi(kind: str) -> dict:
    return version(kind)["schema"]["openAPIV3Schema"]


def spec_props(kind: str) -> dict:
    return openapi(kind)["properties"]["spec"]["properties"]


def status_props(kind: str) -> dict:
    return openapi(kind)["properties"]["status"]["properties"]


def example(name: str, kind: str) -> dict:
    (doc,) = [d for d in _load(EXAMPLES / name) if d["kind"] == kind]
    return doc


def camel(name: str) -> str:
    head, *rest = name.split("_")
    return head + "".join(part.title() for part in rest)


# --- what the API server does to a custom resource, offline ----------------------------------


def admit(kind: str, resource: dict) -> tuple[dict, list[str]]:
    """The resource as the API server would store it, and its errors ("field: detail"),
    unknown fields included (``kubectl apply`` asks for strict field validation)."""
    obj = crdschema.decode_numbers(copy.deepcopy(resource))
    obj.setdefault("metadata", {"name": "x"})
    causes, unknown = crdschema.admit(obj, openapi(kind))
    errors = [f"{field}: {detail}" for field, _, detail in causes]
    return obj, errors + [f'unknown field "{field}"' for field in unknown]


def walk(node: dict, path: str = ""):
    """Every schema node below ``node`` (itself included), with its path."""
    yield path, node
    for name, sub in node.get("properties", {}).items():
        yield from walk(sub, f"{path}.{name}")
    for key in ("items", "additionalProperties"):
        if isinstance(node.get(key), dict):
            yield from walk(node[key], f"{path}[{key}]")
    for key in JUNCTORS:
        subs = node.get(key, [])
        for i, sub in enumerate(subs if isinstance(subs, list) else [subs]):
            yield from walk(sub, f"{path}<{key}{i}>")


def in_junctor(path: str) -> bool:
    return "<" in path


# --- the CRDs as Kubernetes objects -----------------------------------------------------------


def test_the_three_crds_are_there():
    assert set(CRDS) == set(KINDS)
    for kind, (path, c) in CRDS.items():
        plural = KINDS[kind][0]
        assert path.name == f"{GROUP}_{plural}.yaml"
        assert c["apiVersion"] == "apiextensions.k8s.io/v1"
        assert c["kind"] == "CustomResourceDefinition"


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_crd_passes_strict_kubernetes_validation(kind):
    try:
        kubernetes_validate.validate(crd(kind), KUBERNETES_VERSION, strict=True)
    except kubernetes_validate.ValidationError as exc:
        pytest.fail(f"{'.'.join(map(str, exc.path))}: {exc.message}", pytrace=False)


def test_crds_pass_the_kubernetes_validate_command():
    cli = Path(sys.executable).with_name("kubernetes-validate")
    assert cli.exists(), f"{cli} is missing: install the dev extras"
    paths = [str(p) for p, _ in CRDS.values()]
    result = subprocess.run(
        [str(cli), "--strict", "-k", KUBERNETES_VERSION, *paths],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    # A kind the tool has no schema for only warns (exit 0): make sure all three were checked.
    assert result.stdout.count(" passed for resource customresourcedefinition/") == 3, result.stdout
    assert "WARN" not in result.stdout and "ERROR" not in result.stdout


@pytest.mark.parametrize(
    "where, key",
    [
        (lambda c: c["spec"]["versions"][0], "servedd"),  # a typo in the CRD's own fields
        (lambda c: c["spec"]["versions"][0]["schema"]["openAPIV3Schema"], "minimun"),
        (  # and deep inside a property's schema
            lambda c: c["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"][
                "properties"
            ]["alliance"],
            "patern",
        ),
    ],
)
def test_strict_validation_rejects_an_unknown_field(where, key):
    broken = copy.deepcopy(crd("TrainingRun"))
    where(broken)[key] = "x"
    assert kubernetes_validate.validate(broken, KUBERNETES_VERSION, strict=False)
    with pytest.raises(kubernetes_validate.ValidationError) as err:
        kubernetes_validate.validate(broken, KUBERNETES_VERSION, strict=True)
    assert key in err.value.message


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_names_version_and_subresources(kind):
    c = crd(kind)
    plural, short = KINDS[kind]
    names = c["spec"]["names"]
    assert c["metadata"]["name"] == f"{plural}.{GROUP}"
    assert c["spec"]["group"] == GROUP
    assert c["spec"]["scope"] == "Namespaced"
    assert names["plural"] == plural
    assert names["singular"] == kind.lower()
    assert names["listKind"] == f"{kind}List"
    assert names["shortNames"] == [short]
    assert names["categories"] == [CATEGORY]
    v = version(kind)
    assert (v["name"], v["served"], v["storage"]) == (VERSION, True, True)
    assert v["subresources"] == {"status": {}}
    assert {"apiVersion", "kind", "metadata", "spec", "status"} == set(openapi(kind)["properties"])


def test_the_category_is_no_resource_name():
    taken = set()
    for kind in KINDS:
        names = crd(kind)["spec"]["names"]
        taken |= {names["plural"], names["singular"], kind.lower(), *names["shortNames"]}
    assert CATEGORY not in taken


# --- structural schemas -----------------------------------------------------------------------


def _unbounded_rule(data_schema: dict) -> None:
    del data_schema["properties"]["featureShape"]["maxItems"]
    rule = {"rule": "self.featureShape.all(d, d < 100)", "message": "too big"}
    data_schema["x-kubernetes-validations"].append(rule)


def server_refusals(schema: dict) -> list[str]:
    return [f"{f}: {d}" for f, _, d in crdschema.check_schema(schema, "openAPIV3Schema")]


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_the_api_server_would_accept_the_crd(kind):
    # What a v1.32 API server refused in the first CRDs: a description under metadata, and
    # float32 bounds that overflow int64 when an integer value (a default of 255) meets them.
    assert not server_refusals(openapi(kind))


@pytest.mark.parametrize(
    "mistake, refusal",
    [
        (
            lambda root: root["properties"]["metadata"].update(description="Object metadata."),
            "openAPIV3Schema.properties[metadata]: Forbidden: must not specify anything other "
            "than name and generateName, but metadata is implicitly specified",
        ),
        (
            lambda root: root["properties"]["spec"]["properties"]["dataSchema"]["properties"][
                "maxValue"
            ].update(maximum=3.4028234663852886e38),
            "properties[maxValue].default: Invalid value: 255: in body should be less than or "
            "equal to -9223372036854775808",
        ),
        (
            lambda root: root["properties"]["spec"]["properties"]["dataSchema"]["properties"][
                "numClasses"
            ].update(default=1),
            "properties[numClasses].default: Invalid value: 1: in body should be greater than "
            "or equal to 2",
        ),
        (
            lambda root: root["properties"]["spec"].pop("type"),
            "openAPIV3Schema.properties[spec].type: Required value: must not be empty for "
            "specified object fields",
        ),
        (
            lambda root: root["properties"]["spec"]["properties"]["dataSchema"][
                "x-kubernetes-validations"
            ].append({"rule": "self.minValue <= self.maxValu", "message": "m"}),
            "compilation failed: undefined field 'maxValu'",
        ),
        (
            lambda root: _unbounded_rule(root["properties"]["spec"]["properties"]["dataSchema"]),
            "estimated rule cost exceeds budget",
        ),
    ],
)
def test_the_api_servers_crd_rules_catch_each_known_mistake(mistake, refusal):
    broken = copy.deepcopy(openapi("Member"))
    mistake(broken)
    refusals = server_refusals(broken)
    assert any(refusal in r for r in refusals), refusals


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_schema_conventions(kind):
    """Beyond what the server requires: every object declares its fields (none kept open), and
    junctors only constrain fields the node declares."""
    problems = []
    for path, node in walk(openapi(kind)):
        if in_junctor(path):
            continue  # checked with the node that holds the junctor
        for key in JUNCTORS:
            subs = node.get(key, [])
            for sub in subs if isinstance(subs, list) else [subs]:
                for name in [*sub.get("required", []), *sub.get("properties", {})]:
                    if name not in node.get("properties", {}):
                        problems.append(f"{path}: {key} names undeclared {name!r}")
        for name in node.get("required", []):
            if name not in node.get("properties", {}):
                problems.append(f"{path}: requires undeclared {name!r}")
        open_object = "properties" not in node and "additionalProperties" not in node
        if node.get("type") == "object" and path != ".metadata" and open_object:
            problems.append(f"{path}: an object with no fields (would keep nothing)")
    assert not problems, "\n".join(problems)
    assert openapi(kind)["properties"]["metadata"] == {"type": "object"}


def _jsonschemaprops_keys() -> set[str]:
    defs = Path(kubernetes_validate.__file__).parent / "kubernetes-json-schema"
    path = defs / f"v{KUBERNETES_VERSION}-local-strict" / "_definitions.json"
    props = json.loads(path.read_text(encoding="utf-8"))["$defs"][
        "io.k8s.apiextensions-apiserver.pkg.apis.apiextensions.v1.JSONSchemaProps"
    ]["properties"]
    return set(props)


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_every_schema_node_uses_only_known_keywords(kind):
    # kubernetes-validate does not look inside `items` and `additionalProperties` (typed there as
    # "JSONSchemaProps or bool/array", i.e. anything): a misspelt keyword would pass it.
    known = _jsonschemaprops_keys()
    assert {"type", "properties", "items", "x-kubernetes-validations"} <= known
    unknown = [f"{path}: {key}" for path, node in walk(openapi(kind)) for key in set(node) - known]
    assert not unknown


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_unknown_fields_are_preserved_nowhere(kind):
    assert "x-kubernetes-preserve-unknown-fields" not in str(crd(kind))


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_every_field_is_described(kind):
    # kubectl explain shows these.
    missing = [
        path
        for path, node in walk(openapi(kind))
        if not in_junctor(path)
        and path != ".metadata"  # the server allows no description there
        and not path.endswith("]")  # items / map values: described by their field
        and not node.get("description", "").strip()
    ]
    assert not missing


def test_the_conditions_have_the_metav1_condition_shape():
    shapes = [status_props(kind)["conditions"] for kind in sorted(KINDS)]

    def strip(schema):
        return {k: v for k, v in schema.items() if k != "description"}

    assert strip(shapes[0]) == strip(shapes[1]) == strip(shapes[2])
    item = shapes[0]["items"]
    assert set(item["properties"]) == {
        "type",
        "status",
        "observedGeneration",
        "lastTransitionTime",
        "reason",
        "message",
    }
    assert item["properties"]["status"]["enum"] == ["True", "False", "Unknown"]
    for kind in KINDS:
        assert status_props(kind)["observedGeneration"]["type"] == "integer"


# --- printer columns --------------------------------------------------------------------------


def columns(kind: str, priority: int = 0) -> list[dict]:
    cols = version(kind)["additionalPrinterColumns"]
    return [c for c in cols if c.get("priority", 0) == priority]


@pytest.mark.parametrize(
    "kind, expected",
    [
        (
            "TrainingRun",
            [
                ("PHASE", "string", ".status.phase"),
                ("ROUND", "integer", ".status.round"),
                ("ACCURACY", "number", ".status.accuracy"),
                ("AGE", "date", ".metadata.creationTimestamp"),
            ],
        ),
        (
            "Member",
            [
                ("ALLIANCE", "string", ".spec.alliance"),
                ("DATA", "string", ".spec.dataVolumeClaim"),
                ("READY", "string", '.status.conditions[?(@.type=="Ready")].status'),
                ("AGE", "date", ".metadata.creationTimestamp"),
            ],
        ),
        (
            "Alliance",
            [
                ("STORE", "string", ".spec.store.endpoint"),
                ("MODEL", "string", ".spec.model.builtin"),
                ("READY", "string", '.status.conditions[?(@.type=="Ready")].status'),
                ("AGE", "date", ".metadata.creationTimestamp"),
            ],
        ),
    ],
)
def test_printer_columns(kind, expected):
    got = [(c["name"].upper(), c["type"], c["jsonPath"]) for c in columns(kind)]
    assert got == expected


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_printer_columns_point_at_declared_fields_of_their_type(kind):
    for col in version(kind)["additionalPrinterColumns"]:
        if col["jsonPath"] == ".metadata.creationTimestamp":
            continue
        node = openapi(kind)
        for part in re.sub(r"\[\?\(.*?\)\]", "", col["jsonPath"]).strip(".").split("."):
            node = node["items"] if node.get("type") == "array" else node
            node = node["properties"][part]
        assert node["type"] == col["type"], col


# --- TrainingRun = RunSpec + RunStatus --------------------------------------------------------


def test_trainingrun_spec_fields_are_exactly_runspec():
    assert set(spec_props("TrainingRun")) == {"alliance", "storeCleanupPolicy"} | set(
        RunSpec().to_dict()
    )
    assert openapi("TrainingRun")["properties"]["spec"]["required"] == ["alliance"]


@pytest.mark.parametrize("field", [f.name for f in dataclasses.fields(RunSpec)])
def test_trainingrun_field_type_and_default_are_runspecs(field):
    name = camel(field)
    prop = spec_props("TrainingRun")[name]
    default = RunSpec().to_dict()[name]
    assert prop["type"] == PYTHON_TO_OPENAPI[type(default)]
    if name in RUN_DEFAULTS_FIELDS:
        assert "default" not in prop  # the Alliance's runDefaults, else the engine, decide
        shown = f"{default:g}" if isinstance(default, float) else str(default or "none")
        assert f"else {shown}" in " ".join(prop["description"].split())
    else:
        assert prop["default"] == default
        assert type(prop["default"]) is type(default) or isinstance(default, float)


def test_alliance_run_defaults_are_the_trainingrun_fields():
    run_defaults = spec_props("Alliance")["runDefaults"]["properties"]
    assert set(run_defaults) == RUN_DEFAULTS_FIELDS
    no_default = {n for n, p in spec_props("TrainingRun").items() if "default" not in p}
    assert no_default == RUN_DEFAULTS_FIELDS | {"alliance"}

    def strip(s):
        return {k: v for k, v in s.items() if k != "description"}

    for name in RUN_DEFAULTS_FIELDS:
        assert strip(run_defaults[name]) == strip(spec_props("TrainingRun")[name]), name


def test_aggregator_enums_are_the_engines_strategies():
    assert spec_props("TrainingRun")["aggregator"]["enum"] == sorted(strategies.STRATEGIES)
    alliance_run_defaults = spec_props("Alliance")["runDefaults"]["properties"]
    assert alliance_run_defaults["aggregator"]["enum"] == sorted(strategies.STRATEGIES)


def test_a_defaulted_trainingrun_is_runspecs_default():
    obj, errors = admit("TrainingRun", {"spec": {"alliance": "mnist"}})
    assert not errors
    spec = obj["spec"]
    assert spec.pop("alliance") == "mnist"
    assert spec.pop("storeCleanupPolicy") == "Retain"
    assert RunSpec.from_dict(spec) == RunSpec()


def _engine_ok(spec: dict) -> bool:
    try:
        RunSpec.from_dict(spec)
    except SpecError:
        return False
    return True


# (spec fields, the CRD accepts, the engine accepts). Where they differ, the engine's check is the
# one the operator reports (condition Invalid): the CRD rejects what it can express.
RUNSPEC_CASES = [
    ({}, True, True),
    ({"rounds": 1}, True, True),
    ({"rounds": 0}, False, False),
    ({"membersPerRound": 0}, True, True),
    ({"membersPerRound": -1}, False, False),
    ({"minMembers": 0}, False, False),
    ({"localEpochs": 0}, False, False),
    ({"batchSize": 0}, False, False),
    ({"rounds": 2.5}, False, False),
    ({"aggregator": "fedprox"}, False, False),
    ({"aggregator": "trimmedmean", "aggregatorParams": {"trimFraction": 0.2}}, True, True),
    ({"aggregator": "fedadam", "aggregatorParams": {"serverLearningRate": 0.01}}, True, True),
    ({"aggregatorParams": {"x": "fast"}}, False, False),
    ({"roundDeadlineSeconds": 0.5}, True, True),
    ({"roundDeadlineSeconds": 0}, False, False),
    ({"validationDeadlineSeconds": -1}, False, False),
    ({"validation": "none"}, True, True),
    ({"validation": "all"}, False, False),
    ({"seed": -7}, True, True),
    ({"membersPerRound": 3, "minMembers": 2}, True, True),
    # A CEL rule on spec (x-kubernetes-validations), and the engine.
    ({"membersPerRound": 2, "minMembers": 3}, False, False),
    ({"membersPerRound": 0, "minMembers": 3}, True, True),
    # int32 fields: the server does not enforce format: int32, so each has a maximum.
    ({"rounds": 2147483647}, True, True),
    ({"rounds": 2147483648}, False, True),
    ({"membersPerRound": 4294967296}, False, True),
    ({"rounds": 2**64}, False, True),  # beyond int64: a float to the server, not an integer
    ({"aggregatorParams": {"p" * 64: 1.0}}, False, False),  # a CEL rule on its names
    ({"aggregatorParams": {f"p{i}": 1.0 for i in range(17)}}, False, False),
    # Beyond the schema: the engine only.
    ({"aggregator": "fedavg", "aggregatorParams": {"trimFraction": 0.2}}, True, False),
    ({"aggregator": "trimmedmean", "aggregatorParams": {"trimFraction": 0.7}}, True, False),
    # The engine is lenient where the CRD is strict (one spelling on a cluster).
    ({"aggregator": "FedAvg"}, False, True),
]


@pytest.mark.parametrize("fields, crd_ok, engine_ok", RUNSPEC_CASES)
def test_trainingrun_schema_and_runspec_validate_alike(fields, crd_ok, engine_ok):
    _, errors = admit("TrainingRun", {"spec": {"alliance": "mnist", **fields}})
    assert (not errors) == crd_ok, errors
    assert _engine_ok(fields) == engine_ok
    for name in fields if not crd_ok else []:
        assert any(name in e for e in errors), errors


def test_trainingrun_status_holds_runstatus():
    status_fields = set(status_props("TrainingRun"))
    assert set(RunStatus().to_dict()) <= status_fields
    assert status_fields - set(RunStatus().to_dict()) == {
        "accuracy",
        "loss",
        "storeRun",
        "conditions",
        "observedGeneration",
    }
    history = status_props("TrainingRun")["history"]["items"]["properties"]
    assert set(history) == {camel(f.name) for f in dataclasses.fields(RoundRecord)}
    assert status_props("TrainingRun")["phase"]["enum"] == [p.value for p in Phase]
    assert status_props("TrainingRun")["stage"]["enum"] == [s.value for s in Stage]


def test_a_runstatus_round_trips_through_the_status_schema():
    # The operator resumes from status after a restart: nothing the engine keeps may be pruned.
    sha = "ab" * 32
    status = RunStatus(
        phase=Phase.RUNNING,
        round=2,
        stage=Stage.VALIDATING,
        stage_started_at=1700000100.5,
        selected=["hospital-a", "hospital-b"],
        validators=["hospital-a"],
        model_id=sha,
        history=[
            RoundRecord(
                round=1,
                model_id=sha,
                members=["hospital-a"],
                dropped=["hospital-b"],
                failed={"hospital-c": "exit status 1"},
                rejected={"hospital-d": "NaN in layer 3"},
                num_examples=20000,
                train_loss=0.31,
                accuracy=0.97,
                loss=0.1,
                validators=1,
                started_at=1700000000.0,
                aggregated_at=1700000050.0,
                finished_at=1700000060.0,
                train_seconds=48.2,
                validation_seconds=3.1,
                update_bytes=4_799_528,
                aggregation_seconds=0.31,
            ),
            RoundRecord(round=2, members=["hospital-a", "hospital-b"]),
        ],
        message="round 2: validating",
        started_at=1700000000.0,
    )
    body = {
        **status.to_dict(),
        "accuracy": 0.97,
        "loss": 0.1,
        "observedGeneration": 1,
        "conditions": [
            {
                "type": "Ready",
                "status": "True",
                "reason": "Running",
                "message": "round 2 of 3",
                "lastTransitionTime": "2026-11-27T10:00:00Z",
                "observedGeneration": 1,
            }
        ],
    }
    stored, errors = admit("TrainingRun", {"spec": {"alliance": "mnist"}, "status": body})
    assert not errors
    assert RunStatus.from_dict(stored["status"]) == status


# --- Member.spec.dataSchema = DataSchema ------------------------------------------------------


def test_member_dataschema_fields_are_exactly_dataschema():
    props = spec_props("Member")["dataSchema"]["properties"]
    assert set(props) == set(DataSchema().to_dict())
    for name, default in DataSchema().to_dict().items():
        assert props[name]["default"] == default, name
        assert props[name]["type"] == PYTHON_TO_OPENAPI.get(type(default), "array")
    # The float32 range is in CEL rules, with the engine's bound (float32's largest value).
    f32 = float(np.finfo(np.float32).max)
    rules = " ".join(
        r["rule"] for r in spec_props("Member")["dataSchema"]["x-kubernetes-validations"]
    )
    for name in ("minValue", "maxValue"):
        assert "minimum" not in props[name] and "maximum" not in props[name]
        assert f"self.{name} >= -{f32!r} && self.{name} <= {f32!r}" in rules


def _schema_ok(fields: dict) -> bool:
    try:
        DataSchema.from_dict(fields)
    except DataError:
        return False
    return True


DATASCHEMA_CASES = [
    ({}, True, True),
    ({"featureShape": [20], "numClasses": 2, "maxValue": 1, "scale": 1}, True, True),
    ({"labelColumn": " "}, False, False),
    ({"labelColumn": ""}, False, False),
    ({"featureShape": []}, False, False),
    ({"featureShape": [28, 0]}, False, False),
    ({"numClasses": 1}, False, False),
    ({"scale": 0}, False, False),
    ({"minValue": -1e39}, False, False),
    ({"delimiter": ";"}, True, True),
    ({"delimiter": "\t"}, True, True),
    ({"delimiter": ";;"}, False, False),
    ({"delimiter": "1"}, False, False),
    ({"delimiter": '"'}, False, False),
    ({"unknown": 1}, False, False),
    # CEL rules on dataSchema: minValue <= maxValue, both float32.
    ({"minValue": 300}, False, False),
    ({"minValue": 300, "maxValue": 300}, True, True),
    ({"maxValue": 3.4028234663852886e38}, True, True),
    ({"maxValue": 3.5e38}, False, False),
    ({"numClasses": 2147483648}, False, True),
    ({"featureShape": [1] * 9}, False, True),
]


@pytest.mark.parametrize("fields, crd_ok, engine_ok", DATASCHEMA_CASES)
def test_member_dataschema_and_dataschema_validate_alike(fields, crd_ok, engine_ok):
    member = {"spec": {"alliance": "mnist", "dataVolumeClaim": "data", "dataSchema": fields}}
    obj, errors = admit("Member", member)
    assert (not errors) == crd_ok, errors
    assert _schema_ok(fields) == engine_ok
    if crd_ok and engine_ok:  # the defaulted schema is the engine's
        assert DataSchema.from_dict(obj["spec"]["dataSchema"]) == DataSchema.from_dict(fields)


# --- the examples -----------------------------------------------------------------------------

EXAMPLE_FILES = {
    "Alliance": "alliance.yaml",
    "Member": "member.yaml",
    "TrainingRun": "trainingrun.yaml",
}


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_example_is_valid_for_its_crd(kind):
    resource = example(EXAMPLE_FILES[kind], kind)
    assert resource["apiVersion"] == f"{GROUP}/{VERSION}"
    _, errors = admit(kind, resource)
    assert not errors


def test_example_pvc_is_a_valid_kubernetes_object():
    pvc = example("member.yaml", "PersistentVolumeClaim")
    assert kubernetes_validate.validate(pvc, KUBERNETES_VERSION, strict=True)


def test_examples_fit_together():
    alliance = example("alliance.yaml", "Alliance")
    member = example("member.yaml", "Member")
    pvc = example("member.yaml", "PersistentVolumeClaim")
    run = example("trainingrun.yaml", "TrainingRun")
    assert alliance["metadata"]["name"] == "mnist"
    assert alliance["spec"]["store"]["endpoint"] == "http://alliance-minio:9000"
    assert alliance["spec"]["store"]["bucket"] == "alliance"
    assert alliance["spec"]["store"]["credentialsSecret"]["name"] == "alliance-minio"
    assert (member["metadata"]["name"], pvc["metadata"]["name"]) == (
        "hospital-a",
        "hospital-a-data",
    )
    assert member["spec"]["dataVolumeClaim"] == pvc["metadata"]["name"]
    assert pvc["metadata"]["annotations"] == {"alliance.dev/member": member["metadata"]["name"]}
    assert member["spec"]["alliance"] == run["spec"]["alliance"] == alliance["metadata"]["name"]
    assert run["metadata"]["name"] == "mnist-fedavg"


def test_a_remote_member_needs_no_claim():
    member = example("member.yaml", "Member")
    del member["spec"]["dataVolumeClaim"]
    member["spec"]["remote"] = True
    stored, errors = admit("Member", member)
    assert errors == [] and stored["spec"]["remote"] is True


def test_example_trainingrun_is_the_cli_run_spec():
    spec = dict(example("trainingrun.yaml", "TrainingRun")["spec"])
    del spec["alliance"], spec["storeCleanupPolicy"]
    (cli_spec,) = _load(EXAMPLES / "run.yaml")
    assert spec == cli_spec
    run_spec = RunSpec.from_dict(spec)
    assert (run_spec.rounds, run_spec.min_members, run_spec.aggregator) == (3, 2, "fedavg")


def test_example_member_schema_is_the_cli_schema():
    member = example("member.yaml", "Member")
    schema = DataSchema.from_dict(member["spec"]["dataSchema"])
    assert schema == DataSchema.load(EXAMPLES / "schema.yaml") == DataSchema()


def _set(path: tuple, value):
    def change(resource):
        node = resource
        for key in path[:-1]:
            node = node[key]
        if value is _DELETE:
            del node[path[-1]]
        else:
            node[path[-1]] = value

    return change


_DELETE = object()

BROKEN = [
    ("TrainingRun", ("spec", "rounds"), 0, "spec.rounds"),
    ("TrainingRun", ("spec", "aggregator"), "fedprox", "spec.aggregator"),
    ("TrainingRun", ("spec", "alliance"), _DELETE, "spec.alliance: Required value"),
    ("TrainingRun", ("spec", "roundz"), 5, 'unknown field "spec.roundz"'),
    ("TrainingRun", ("spec", "roundDeadlineSeconds"), 0, "spec.roundDeadlineSeconds"),
    ("TrainingRun", ("spec", "storeCleanupPolicy"), "Keep", "spec.storeCleanupPolicy"),
    ("TrainingRun", ("spec", "aggregatorParams"), {"tau": "x"}, "spec.aggregatorParams.tau"),
    ("Member", ("spec", "alliance"), _DELETE, "spec.alliance: Required value"),
    ("Member", ("spec", "dataVolumeClaim"), "Data_A", "spec.dataVolumeClaim"),
    ("Member", ("spec", "dataSchema", "numClasses"), 1, "spec.dataSchema.numClasses"),
    ("Member", ("spec", "dataSchema", "delimiter"), ",,", "spec.dataSchema.delimiter"),
    ("Member", ("spec", "resources", "limits", "memory"), "lots", "spec.resources.limits.memory"),
    ("Member", ("spec", "dataDir"), "/data", 'unknown field "spec.dataDir"'),
    ("Member", ("spec", "trainCommand"), "x" * 1025, "spec.trainCommand"),
    ("Member", ("spec", "dataVolumeClaim"), _DELETE, "set exactly one"),
    ("Member", ("spec", "remote"), True, "set exactly one"),  # remote, and a claim
    ("Alliance", ("spec", "store", "remoteEndpoint"), "store:9000", "spec.store.remoteEndpoint"),
    ("Alliance", ("spec", "store", "caSecret"), {"key": "ca.crt"}, "caSecret.name: Required"),
    (
        "Alliance",
        ("spec", "store", "credentialsSecret", "secretKeyKey"),
        "accessKey",
        "two different keys",
    ),
    ("Alliance", ("spec", "store", "endpoint"), "alliance-minio:9000", "spec.store.endpoint"),
    ("Alliance", ("spec", "store", "endpoint"), "http://minio:9000/path", "spec.store.endpoint"),
    ("Alliance", ("spec", "store", "bucket"), "Alliance_Bucket", "spec.store.bucket"),
    ("Alliance", ("spec", "store", "credentialsSecret"), {}, "credentialsSecret.name: Required"),
    ("Alliance", ("spec", "model", "kerasObject"), "m.keras", "spec.model"),  # both set
    ("Alliance", ("spec", "model"), {}, "spec.model"),  # neither set
    ("Alliance", ("spec", "model", "builtin"), "resnet", "spec.model.builtin"),
    ("Alliance", ("spec", "seed"), -1, "spec.seed"),
]


@pytest.mark.parametrize("kind, path, value, expected", BROKEN)
def test_broken_example_is_rejected_naming_the_field(kind, path, value, expected):
    resource = example(EXAMPLE_FILES[kind], kind)
    _set(path, value)(resource)
    _, errors = admit(kind, resource)
    assert errors
    assert any(expected in e for e in errors), errors


@pytest.mark.parametrize(
    "model, ok",
    [
        (None, True),  # defaulted to {builtin: cnn}
        ({"builtin": "cnn"}, True),
        ({"kerasObject": "uploads/model.keras"}, True),
        ({"kerasObject": "/abs/model.keras"}, False),
        ({"kerasObject": "model.h5"}, False),
    ],
)
def test_alliance_model_is_builtin_or_a_keras_object(model, ok):
    resource = example("alliance.yaml", "Alliance")
    resource["spec"]["model"] = model
    stored, errors = admit("Alliance", resource)
    assert (not errors) == ok, errors
    if model is None:
        assert stored["spec"]["model"] == {"builtin": "cnn"}


def test_alliance_defaults():
    minimal = {
        "spec": {
            "store": {
                "endpoint": "https://s3.example.org",
                "bucket": "fl.bucket-1",
                "credentialsSecret": {"name": "s3"},
            }
        }
    }
    stored, errors = admit("Alliance", minimal)
    assert not errors
    assert stored["spec"]["store"]["credentialsSecret"] == {
        "name": "s3",
        "accessKeyKey": "accessKey",
        "secretKeyKey": "secretKey",
    }
    assert stored["spec"]["model"] == {"builtin": "cnn"}
    assert stored["spec"]["seed"] == 0


# --- sizes: every spec stays far below the API server's limits --------------------------------

# A character costs at most 6 bytes in the JSON the API server and kubectl write (Go's encoder:
# UTF-8 up to 4 bytes, control characters as \u00XX).
JSON_BYTES_PER_CHAR = 6
NUMBER_BYTES = 24
MAP_KEY_RULE = re.compile(r"self\.all\(\w+, size\(\w+\) <= (\d+)\)")


def worst_case_json_bytes(node: dict, path: str = "") -> int:
    """The most bytes a value valid for ``node`` can take as JSON; unbounded fields fail."""
    if "enum" in node:
        return max(len(json.dumps(e)) for e in node["enum"])
    kind = "string" if node.get("x-kubernetes-int-or-string") else node.get("type")
    if kind == "string":
        assert "maxLength" in node, f"{path}: a string with no maxLength"
        return 2 + JSON_BYTES_PER_CHAR * node["maxLength"]
    if kind in ("integer", "number", "boolean"):
        return NUMBER_BYTES
    if kind == "array":
        assert "maxItems" in node, f"{path}: a list with no maxItems"
        return 2 + node["maxItems"] * (1 + worst_case_json_bytes(node["items"], f"{path}[]"))
    if "additionalProperties" in node:
        assert "maxProperties" in node, f"{path}: a map with no maxProperties"
        rules = " ".join(r["rule"] for r in node.get("x-kubernetes-validations", []))
        key_rule = MAP_KEY_RULE.search(rules)
        assert key_rule, f"{path}: a map with no rule bounding its keys' length"
        key = 2 + JSON_BYTES_PER_CHAR * int(key_rule.group(1))
        value = worst_case_json_bytes(node["additionalProperties"], f"{path}{{}}")
        return 2 + node["maxProperties"] * (key + 2 + value)
    return 2 + sum(
        len(json.dumps(name)) + 2 + worst_case_json_bytes(sub, f"{path}.{name}")
        for name, sub in node.get("properties", {}).items()
    )


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_every_spec_field_is_bounded_far_below_the_annotation_limit(kind):
    # kubectl's last-applied-configuration annotation holds the whole spec, and all annotations
    # together may hold 256 KiB; etcd stores ~1.5 MiB per object. An unbounded string made a
    # Member that could never be deleted once kopf copied it into an annotation.
    spec = openapi(kind)["properties"]["spec"]
    assert worst_case_json_bytes(spec, ".spec") < 64 * 2**10


def test_a_spec_at_every_bound_is_admitted_and_fits():
    member = example("member.yaml", "Member")
    spec = member["spec"]
    spec.update(trainCommand="\u00e9" * 1024, validateCommand="x" * 1024, image="i" * 1024)
    spec["dataSchema"]["labelColumn"] = "l" * 256
    spec["resources"] = {
        "limits": {f"{i}".rjust(128, "r"): "1" * 64 for i in range(8)},
        "requests": {f"{i}".rjust(128, "r"): "1" for i in range(8)},
    }
    stored, errors = admit("Member", member)
    assert not errors
    assert len(json.dumps(stored["spec"], ensure_ascii=False).encode()) < 64 * 2**10
    spec["trainCommand"] += "x"
    spec["resources"]["limits"]["r" * 129] = "1"
    _, errors = admit("Member", member)
    assert any("spec.trainCommand" in e and "at most 1024 chars" in e for e in errors), errors
    assert any("spec.resources.limits" in e and "at most 8 properties" in e for e in errors)
    assert any("a resource name has at most 128 characters" in e for e in errors), errors
