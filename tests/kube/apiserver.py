"""An in-memory Kubernetes API server for end-to-end tests.

No real control plane can run on the test machines, so this module speaks the Kubernetes REST API
itself, with the real server's semantics wherever kopf, kubectl, the official ``kubernetes``
client or the kubelet stand-in (kubelet.py) can tell: the same tests can run on a real cluster.

In a test::

    with ApiServer() as server:
        kubeconfig = server.write_kubeconfig(tmp_path / "kubeconfig")
        ...  # kubectl --kubeconfig, KUBECONFIG=... kopf run, kubernetes.config.load_kube_config

As a process, until SIGTERM or SIGINT (prints ``listening on URL`` once ready)::

    python -m tests.kube.apiserver --port 8001 --kubeconfig kubeconfig.yaml

Served: discovery (/version, /api, /apis, per group and version), the built-in kinds listed in
BUILTINS (stored as given, with the real server's most visible defaults), and every kind a
CustomResourceDefinition defines, from the moment the CRD is written. Verbs: get, list, watch,
create, update, patch (merge, JSON, strategic), delete, deletecollection; subresources status,
pods/log and pods/binding. Semantics: uid, one global resourceVersion, generation (where the
real kind has one), optimistic concurrency, no-op writes that change nothing, finalizers and
deletionTimestamp, owner-reference garbage collection (background, foreground, orphan),
namespace deletion, CRD schema pruning, defaulting and validation, label and field selectors,
watches resumed from an event log (past it: an ERROR event, 410 Expired) with bookmarks,
server-side Tables with printer columns and categories, paging (limit/continue), dryRun,
fieldValidation (Strict rejects unknown fields of custom resources, Warn sends Warning headers).

OpenAPI, verified with kubectl 1.37: client-side ``kubectl apply`` validates unless
``--validate=false``, and first asks /openapi/v3 whether the server validates fields itself (a
``fieldValidation`` query parameter on the kind's PATCH operation). When /openapi/v3 and
/openapi/v2 both answer 404, ``kubectl apply`` FAILS ("failed to download openapi"). So
/openapi/v3 serves, per group/version, a minimal document saying exactly that for every kind (no
schemas): kubectl then sends ``fieldValidation=Strict`` and leaves validation to this server.
/openapi/v2 answers 404, which kubectl tolerates once v3 works (it only asks v2 for strategic
merge patch metadata, then uses its compiled-in types).

Protobuf: kubectl's typed clients (``kubectl create secret|configmap|namespace|serviceaccount|
role|rolebinding|clusterrole|clusterrolebinding``) send protobuf bodies and never fall back to
JSON, so those kinds are decoded (PROTOBUF_KINDS); other protobuf bodies get 415 (``kubectl create
deployment|job`` fail: apply a manifest instead). Answers are always JSON.

Not faithful (on purpose, or not worth it for tests):

* No controllers but the garbage collector, the namespace controller (deletes a deleted
  namespace's content, makes the ``default`` ServiceAccount) and the CRD controller (names,
  Established, instance cleanup). Deployments make no Pods, Services no Endpoints, PVCs stay
  Pending, nothing schedules or runs Pods (kubelet.py does), namespaces get no
  ``kube-root-ca.crt`` ConfigMap.
* Pods are deleted at once, not gracefully. An object kept by finalizers gets
  ``deletionGracePeriodSeconds: 0``, as non-graceful kinds do.
* Built-in objects are neither validated nor pruned (no schemas): names are checked, and a few
  defaults applied (Pod specs and templates, Service, Secret ``stringData``, Namespace). CRDs and
  custom resources go through crdschema.py: a CRD's schema must be one the real server accepts
  (structural, metadata untouched, valid defaults, CEL rules that compile); resources are
  pruned, defaulted, validated (type, required, enum, bounds with int64 semantics, lengths,
  pattern, items, properties, junctors) and checked by their CEL rules; not ``format``; no
  ratcheting. The size limits are the real ones: 3 MiB per request (413), 256 KiB of annotations
  per object (422), ~1.5 MiB per stored object (500, as etcd's refusal).
* A CRD's status (Established...) is set in the same write, not a moment later. CRD versions
  convert by rewriting apiVersion only (strategy None). Core and events.k8s.io Events are
  stored apart. No scale subresource, no server-side apply (415), no managedFields, no
  aggregated discovery (the legacy documents are answered, and kubectl falls back), no
  authentication or authorization. Built-in Tables have real columns for Pods and Namespaces
  only (NAME and AGE elsewhere).
* Strategic merge patch is approximated: maps merge; lists of objects merge by a key chosen by
  field name (SMP_MERGE_KEYS), ``finalizers`` merge as a set, other lists are replaced;
  ``$patch``, ``$retainKeys`` and ``$deleteFromPrimitiveList`` work, ``$setElementOrder`` is
  ignored. Custom resources refuse it (415), as on a real server.
* Lists are not snapshots: ``continue`` pages show the current state; a list's resourceVersion
  parameters are ignored; a watch from a future resourceVersion streams from now.
* Pod logs are whatever ``ApiServer.set_pod_log`` stored, one text per pod.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import copy
import dataclasses
import datetime as dt
import functools
import hashlib
import itertools
import json
import logging
import operator
import random
import re
import signal
import socket
import threading
import uuid
from collections import defaultdict, deque
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import yaml
from aiohttp import web
from multidict import CIMultiDict

from tests.kube.crdschema import admit, check_schema, decode_numbers, has_type, json_equal

log = logging.getLogger(__name__)
Obj = dict[str, Any]

VERSION_INFO = {
    "major": "1",
    "minor": "37",
    "gitVersion": "v1.37.1",
    "gitCommit": "0" * 40,
    "gitTreeState": "clean",
    "buildDate": "2026-01-01T00:00:00Z",
    "goVersion": "go1.25.0",
    "compiler": "gc",
    "platform": "linux/amd64",
}
EVENT_LOG_SIZE = 100_000  # changes kept for watches that resume; older ones get 410 Gone
BOOKMARK_SECONDS = 5.0  # an idle watch with allowWatchBookmarks=true gets a BOOKMARK this often
# The size limits a real server has: the request body (kube-apiserver's MaxRequestBodyBytes),
# an object's annotations together (keys and values), and what etcd stores (its default
# --max-request-bytes; the apiserver answers etcd's refusal with a 500).
MAX_REQUEST_BYTES = 3 * 2**20
MAX_ANNOTATION_BYTES = 256 * 2**10
MAX_STORED_BYTES = 3 * 2**19
UNDELETABLE_NAMESPACES = ("default", "kube-system", "kube-public")
CRD_FINALIZER = "customresourcecleanup.apiextensions.k8s.io"
NS_KEY, POD_KEY, SA_KEY = ("", "namespaces"), ("", "pods"), ("", "serviceaccounts")
CRD_KEY = ("apiextensions.k8s.io", "customresourcedefinitions")
VERBS = ["create", "delete", "deletecollection", "get", "list", "patch", "update", "watch"]
SERVER_METADATA = (
    "name",
    "namespace",
    "uid",
    "resourceVersion",
    "generation",
    "creationTimestamp",
    "deletionTimestamp",
    "deletionGracePeriodSeconds",
)
STALE = (
    "the object has been modified; please apply your changes to the latest version and try again"
)
# The built-in kinds with metadata.generation (custom resources all have it).
GENERATION_KINDS = {
    "Pod",
    "Deployment",
    "StatefulSet",
    "DaemonSet",
    "ReplicaSet",
    "Job",
    "CronJob",
    "HorizontalPodAutoscaler",
    "NetworkPolicy",
    "Ingress",
    "PodDisruptionBudget",
    "CustomResourceDefinition",
}
NS_MISMATCH = (
    "the namespace of the provided object does not match the namespace sent on the request"
)
DNS_NAME = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*")


# --------------------------------------------------------------------------------------------
# Errors: each is answered as a ``kind: Status`` with the real server's reason and message.
# --------------------------------------------------------------------------------------------


class ApiError(Exception):
    def __init__(self, code: int, reason: str, message: str, details: Obj | None = None):
        super().__init__(message)
        self.code, self.reason, self.message, self.details = code, reason, message, details

    def status(self) -> Obj:
        body = {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure"}
        body.update(message=self.message, reason=self.reason, code=self.code)
        return body if self.details is None else {**body, "details": self.details}


def bad_request(message: str) -> ApiError:
    return ApiError(400, "BadRequest", message)


def no_such_path() -> ApiError:
    return ApiError(404, "NotFound", "the server could not find the requested resource", {})


# --------------------------------------------------------------------------------------------
# Resource types: the built-in ones, and those CRDs define.
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass
class ResourceType:
    group: str
    version: str
    plural: str
    kind: str
    namespaced: bool = True
    short_names: tuple[str, ...] = ()
    categories: tuple[str, ...] = ()
    subresources: tuple[str, ...] = ()
    singular: str = ""
    list_kind: str = ""
    crd: Obj | None = None  # a custom resource's CRD version entry (schema, printer columns)
    crd_name: str = ""

    def __post_init__(self) -> None:
        self.singular = self.singular or self.kind.lower()
        self.list_kind = self.list_kind or f"{self.kind}List"

    @property
    def api_version(self) -> str:
        return f"{self.group}/{self.version}" if self.group else self.version

    @property
    def key(self) -> tuple[str, str]:
        """Where its objects are stored: one place per group and plural, for all versions."""
        return (self.group, self.plural)

    @property
    def resource(self) -> str:  # how messages name it: "pods", "alliances.alliance.dev"
        return f"{self.plural}.{self.group}" if self.group else self.plural

    @property
    def schema(self) -> Obj | None:
        return dig(self.crd, "schema", "openAPIV3Schema")

    def error(self, code: int, reason: str, name: str, message: str) -> ApiError:
        details = {"name": name, "group": self.group, "kind": self.plural}
        if not self.group:
            del details["group"]
        return ApiError(code, reason, message, details)

    def not_found(self, name: str) -> ApiError:
        return self.error(404, "NotFound", name, f'{self.resource} "{name}" not found')

    def conflict(self, name: str, why: str = STALE) -> ApiError:
        message = f'Operation cannot be fulfilled on {self.resource} "{name}": {why}'
        return self.error(409, "Conflict", name, message)

    def invalid(self, name: str, *causes: tuple[str, str, str]) -> ApiError:
        """422 Invalid; each cause is (field, reason, detail), shown as ``field: detail``."""
        errors = [f"{field}: {detail}" for field, _, detail in causes]
        text = errors[0] if len(errors) == 1 else f"[{', '.join(errors)}]"
        kind = f"{self.kind}.{self.group}" if self.group else self.kind
        details = {"name": name, "group": self.group, "kind": self.kind}
        details["causes"] = [{"reason": r, "message": d, "field": f} for f, r, d in causes]
        return ApiError(422, "Invalid", f'{kind} "{name}" is invalid: {text}', details)


# group/version  plural  Kind  scope  shortNames  categories  subresources ("-": none)
BUILTINS = """
v1 namespaces Namespace cluster ns - status
v1 pods Pod ns po all status,log,binding
v1 services Service ns svc all status
v1 configmaps ConfigMap ns cm - -
v1 secrets Secret ns - - -
v1 serviceaccounts ServiceAccount ns sa - -
v1 persistentvolumeclaims PersistentVolumeClaim ns pvc - status
v1 persistentvolumes PersistentVolume cluster pv - status
v1 events Event ns ev - -
v1 endpoints Endpoints ns ep - -
v1 nodes Node cluster no - status
v1 resourcequotas ResourceQuota ns quota - status
v1 limitranges LimitRange ns limits - -
apps/v1 deployments Deployment ns deploy all status
apps/v1 statefulsets StatefulSet ns sts all status
apps/v1 replicasets ReplicaSet ns rs all status
apps/v1 daemonsets DaemonSet ns ds all status
apps/v1 controllerrevisions ControllerRevision ns - - -
batch/v1 jobs Job ns - all status
batch/v1 cronjobs CronJob ns cj all status
autoscaling/v2 horizontalpodautoscalers HorizontalPodAutoscaler ns hpa all status
rbac.authorization.k8s.io/v1 roles Role ns - - -
rbac.authorization.k8s.io/v1 rolebindings RoleBinding ns - - -
rbac.authorization.k8s.io/v1 clusterroles ClusterRole cluster - - -
rbac.authorization.k8s.io/v1 clusterrolebindings ClusterRoleBinding cluster - - -
networking.k8s.io/v1 networkpolicies NetworkPolicy ns netpol - -
networking.k8s.io/v1 ingresses Ingress ns ing - status
networking.k8s.io/v1 ingressclasses IngressClass cluster - - -
policy/v1 poddisruptionbudgets PodDisruptionBudget ns pdb - status
events.k8s.io/v1 events Event ns ev - -
coordination.k8s.io/v1 leases Lease ns - - -
discovery.k8s.io/v1 endpointslices EndpointSlice ns - - -
storage.k8s.io/v1 storageclasses StorageClass cluster sc - -
scheduling.k8s.io/v1 priorityclasses PriorityClass cluster pc - -
apiextensions.k8s.io/v1 customresourcedefinitions CustomResourceDefinition cluster crd,crds api-extensions status
"""  # noqa: E501


def builtin_types() -> list[ResourceType]:
    def names(text: str) -> tuple[str, ...]:
        return () if text == "-" else tuple(text.split(","))

    types = []
    for line in BUILTINS.strip().splitlines():
        gv, plural, kind, scope, short, categories, subresources = line.split()
        group, _, version = gv.rpartition("/")
        lists = names(short), names(categories), names(subresources)
        types.append(ResourceType(group, version, plural, kind, scope == "ns", *lists))
    return types


def version_priority(version: str) -> tuple:
    """A sort key putting the version kubectl prefers first: v2, v1, v1beta2, v1alpha1, other."""
    m = re.fullmatch(r"v(\d+)(?:(alpha|beta)(\d+))?", version)
    if not m:
        return (3, 0, 0, version)
    return ({None: 0, "beta": 1, "alpha": 2}[m[2]], -int(m[1]), -int(m[3] or 0), version)


# --------------------------------------------------------------------------------------------
# Small helpers.
# --------------------------------------------------------------------------------------------


def now_iso() -> str:
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_time(value: Any) -> dt.datetime | None:
    try:
        return dt.datetime.fromisoformat(value.replace("Z", "+00:00"))
    except (AttributeError, ValueError):
        return None


def human_duration(seconds: float) -> str:
    """k8s.io/apimachinery's duration.HumanDuration, in which AGE columns are written."""
    s = int(seconds)
    if s < 0:
        return "0s" if s == -1 else "<invalid>"
    if s < 120:
        return f"{s}s"
    minutes, hours, days = s // 60, s // 3600, s // 86400
    if minutes < 10:
        return f"{minutes}m{s % 60}s" if s % 60 else f"{minutes}m"
    if minutes < 180:
        return f"{minutes}m"
    if hours < 8:
        return f"{hours}h{minutes % 60}m" if minutes % 60 else f"{hours}h"
    if hours < 48:
        return f"{hours}h"
    if hours < 24 * 8:
        return f"{days}d{hours % 24}h" if hours % 24 else f"{days}d"
    if days < 365 * 2:
        return f"{days}d"
    if days < 365 * 8:
        return f"{days // 365}y{days % 365}d" if days % 365 else f"{days // 365}y"
    return f"{days // 365}y"


def age(timestamp: Any) -> str:
    when = parse_time(timestamp)
    if when is None:
        return "<unknown>"
    return human_duration((dt.datetime.now(dt.UTC) - when).total_seconds())


def dig(obj: Any, *path: str | int, default: Any = None) -> Any:
    """obj[path[0]][path[1]]..., or default where that is missing."""
    for step in path:
        in_dict = isinstance(obj, dict) and isinstance(step, str) and step in obj
        in_list = isinstance(obj, list) and isinstance(step, int) and -len(obj) <= step < len(obj)
        if not (in_dict or in_list):
            return default
        obj = obj[step]
    return obj


def parse_bool(value: str | None) -> bool:
    """Go's strconv.ParseBool, as the server reads ?watch= and friends."""
    return (value or "").strip() in ("1", "t", "T", "true", "TRUE", "True")


# --------------------------------------------------------------------------------------------
# Patches: JSON merge patch (RFC 7386), JSON patch (RFC 6902), strategic merge (approximated).
# --------------------------------------------------------------------------------------------


def merge_patch(target: Any, patch: Any) -> Any:
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    result = dict(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        else:
            result[key] = merge_patch(result.get(key), value)
    return result


def patch_error(message: str) -> ApiError:
    """A JSON patch that does not apply: 422, which kopf expects of a failed ``test``."""
    return ApiError(422, "Invalid", message)


def _pointer(path: Any) -> list[str]:
    if not isinstance(path, str) or (path and not path.startswith("/")):
        raise patch_error(f"invalid JSON pointer: {path!r}")
    return [p.replace("~1", "/").replace("~0", "~") for p in path.split("/")[1:]]


def _index(items: list, token: str, adding: bool = False) -> int:
    if adding and token == "-":
        return len(items)
    if not re.fullmatch(r"0|[1-9]\d*", token) or int(token) > len(items) - (not adding):
        raise patch_error(f"invalid or out of bounds array index: {token}")
    return int(token)


def _walk(doc: Any, parts: list[str], path: str) -> Any:
    for token in parts:
        if isinstance(doc, dict) and token in doc:
            doc = doc[token]
        elif isinstance(doc, list):
            doc = doc[_index(doc, token)]
        else:
            raise patch_error(f"doc is missing path: {path}")
    return doc


def _put(doc: Any, path: Any, value: Any = None, mode: str = "add") -> Any:
    """Add, replace or remove the value at a JSON pointer; returns the document."""
    parts = _pointer(path)
    if not parts:
        if mode == "remove":
            raise patch_error("cannot remove the whole document")
        return value
    parent, last = _walk(doc, parts[:-1], path), parts[-1]
    if isinstance(parent, dict):
        if mode != "add" and last not in parent:
            raise patch_error(f"doc is missing key: {path}")
        if mode == "remove":
            del parent[last]
        else:
            parent[last] = value
    elif isinstance(parent, list):
        i = _index(parent, last, adding=mode == "add")
        if mode == "add":
            parent.insert(i, value)
        elif mode == "remove":
            del parent[i]
        else:
            parent[i] = value
    else:
        raise patch_error(f"doc is missing path: {path}")
    return doc


def json_patch(doc: Any, ops: Any) -> Any:
    if not isinstance(ops, list):
        raise bad_request("json: cannot unmarshal object into Go value of type jsonpatch.Patch")
    doc = copy.deepcopy(doc)
    for op in ops:
        kind = op.get("op") if isinstance(op, dict) else None
        if kind in ("add", "replace", "test") and "value" not in op:
            raise patch_error(f"missing value in {kind} operation")
        if kind == "test":
            if not json_equal(_walk(doc, _pointer(op.get("path")), op["path"]), op["value"]):
                raise patch_error(f"testing value {op['path']} failed: test failed")
        elif kind in ("add", "replace", "remove"):
            doc = _put(doc, op.get("path"), copy.deepcopy(op.get("value")), kind)
        elif kind in ("move", "copy"):
            value = copy.deepcopy(_walk(doc, _pointer(op.get("from")), op.get("from")))
            if kind == "move":
                doc = _put(doc, op["from"], mode="remove")
            doc = _put(doc, op.get("path"), value)
        else:
            raise patch_error(f"unexpected JSON patch operation: {op!r}")
    return doc


# Strategic merge patch merges these lists item by item, by these keys (the first one present).
SMP_MERGE_KEYS = {
    **{field: ("name",) for field in ("containers", "initContainers", "ephemeralContainers")},
    **{field: ("name",) for field in ("env", "volumes", "imagePullSecrets", "resourceClaims")},
    "volumeMounts": ("mountPath",),
    "ports": ("containerPort", "port"),
    "conditions": ("type",),
    "ownerReferences": ("uid",),
    "hostAliases": ("ip",),
}
SMP_SET_LISTS = {"finalizers"}  # lists of strings merged as sets


def _no_directives(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _no_directives(v) for k, v in value.items() if not k.startswith("$")}
    if isinstance(value, list):
        return [_no_directives(v) for v in value if not (isinstance(v, dict) and "$patch" in v)]
    return copy.deepcopy(value)


def strategic_merge_patch(target: Any, patch: Any) -> Any:
    """Returns the patched value; None where the patch says ``$patch: delete``."""
    if not isinstance(patch, dict) or patch.get("$patch") == "replace":
        return _no_directives(patch)
    if patch.get("$patch") == "delete":
        return None
    result = dict(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        current = result.get(key)
        if key.startswith("$deleteFromPrimitiveList/"):
            field = key.split("/", 1)[1]
            result[field] = [v for v in result.get(field) or [] if v not in (value or [])]
        elif key.startswith("$"):
            continue  # $retainKeys is below; $setElementOrder is not honoured
        elif value is None:
            result.pop(key, None)
        elif isinstance(value, list) and isinstance(current, list):
            result[key] = _merge_list(key, current, value)
        elif isinstance(value, dict):
            result[key] = strategic_merge_patch(current, value)
            if result[key] is None:
                del result[key]
        else:
            result[key] = copy.deepcopy(value)
    if isinstance(patch.get("$retainKeys"), list):
        result = {k: v for k, v in result.items() if k in patch["$retainKeys"]}
    return result


def _merge_list(field: str, current: list, patch: list) -> list:
    if field in SMP_SET_LISTS:
        return current + [v for v in patch if v not in current]
    keys = [
        k
        for k in SMP_MERGE_KEYS.get(field, ())
        if any(k in (p if isinstance(p, dict) else {}) for p in patch)
    ]
    if not keys:
        return _no_directives(patch)
    key, merged = keys[0], list(current)
    for item in patch:
        if not isinstance(item, dict) or key not in item:
            continue
        at = next((i for i, c in enumerate(merged) if dig(c, key) == item[key]), None)
        if item.get("$patch") == "delete":
            merged = [c for c in merged if dig(c, key) != item[key]]
        elif at is None:
            merged.append(_no_directives(item))
        else:
            merged[at] = strategic_merge_patch(merged[at], item)
    return merged


# --------------------------------------------------------------------------------------------
# Label and field selectors.
# --------------------------------------------------------------------------------------------

LABEL_REQUIREMENT = re.compile(
    r"(?P<not>!)?\s*(?P<key>[A-Za-z0-9][-A-Za-z0-9_./]*)\s*(?:(?P<op>==|=|!=)\s*"
    r"(?P<value>[-A-Za-z0-9_.]*)|\s(?P<set>in|notin)\s*\((?P<values>[^)]*)\))?"
)
FIELD_SELECTORS = {  # what a built-in kind may be selected by, besides metadata.name/namespace
    "Pod": "spec.nodeName spec.restartPolicy spec.schedulerName spec.serviceAccountName "
    "spec.hostNetwork status.phase status.podIP status.nominatedNodeName",
    "Event": "involvedObject.kind involvedObject.namespace involvedObject.name involvedObject.uid "
    "involvedObject.apiVersion involvedObject.resourceVersion involvedObject.fieldPath reason "
    "reportingComponent source type",
    "Secret": "type",
    "Namespace": "status.phase",
    "Node": "spec.unschedulable",
    "Job": "status.successful",
    "ReplicaSet": "status.replicas",
}


def _requirements(text: str) -> list[str]:
    """A selector's requirements: it split at the commas outside parentheses."""
    parts, depth, current = [], 0, ""
    for ch in text:
        depth += (ch == "(") - (ch == ")")
        if ch == "," and depth == 0:
            parts.append(current)
            current = ""
        else:
            current += ch
    return [p.strip() for p in [*parts, current] if p.strip()]


def label_selector(text: str) -> Callable[[dict], bool]:
    checks: list[Callable[[dict], bool]] = []
    for req in _requirements(text):
        m = LABEL_REQUIREMENT.fullmatch(req)
        if not m or (m["not"] and (m["op"] or m["set"])):
            raise bad_request(f"unable to parse requirement: found '{req}'")
        key, value = m["key"], m["value"]
        values = {v.strip() for v in (m["values"] or "").split(",") if v.strip()}
        if m["not"]:
            checks.append(lambda labels, k=key: k not in labels)
        elif m["op"]:
            equal = m["op"] != "!="
            checks.append(lambda labels, k=key, v=value, eq=equal: (labels.get(k) == v) == eq)
        elif m["set"]:
            inside = m["set"] == "in"
            checks.append(lambda labels, k=key, vs=values, i=inside: (labels.get(k) in vs) == i)
        else:
            checks.append(lambda labels, k=key: k in labels)
    return lambda labels: all(check(labels) for check in checks)


def field_selector(rt: ResourceType, text: str) -> Callable[[Obj], bool]:
    known = {"metadata.name", "metadata.namespace"}
    known |= {f["jsonPath"].lstrip(".") for f in dig(rt.crd, "selectableFields") or []}
    known |= set(FIELD_SELECTORS.get(rt.kind, "").split()) if rt.crd is None else set()
    checks = []
    for req in _requirements(text):
        m = re.fullmatch(r"([A-Za-z0-9._-]+)\s*(==|=|!=)\s*(.*)", req)
        if not m:
            raise bad_request(f"invalid selector: '{text}'; can't understand '{req}'")
        field, op, value = m.groups()
        if field not in known and rt.crd is not None:
            raise bad_request(
                f'"{field}" is not a known field selector: only "metadata.name", '
                '"metadata.namespace"'
            )
        if field not in known:
            raise bad_request(f"field label not supported: {field}")
        path = "source.component" if field == "source" else field
        checks.append((path.split("."), op == "!=", value))

    def text_of(value: Any) -> str:
        if isinstance(value, bool):
            return str(value).lower()
        return "" if value is None else str(value)

    return lambda obj: all((text_of(dig(obj, *p)) == v) != neg for p, neg, v in checks)


# --------------------------------------------------------------------------------------------
# JSONPath, the part printer columns use: .a.b, .a\.b, ['a'], [0], [*], .*, [?(@.x=="y")].
# --------------------------------------------------------------------------------------------


def jsonpath(obj: Any, expr: str) -> list[Any]:
    expr = expr.strip().removeprefix("{").removesuffix("}").strip().removeprefix("$")
    nodes, i = [obj], 0
    while i < len(expr) and nodes:
        if expr[i] == ".":
            name, i = "", i + 1
            while i < len(expr) and expr[i] not in ".[":
                if expr[i] == "\\" and i + 1 < len(expr):  # escaped, like a dot in a label key
                    i += 1
                name, i = name + expr[i], i + 1
            if name == "*":
                nodes = [v for n in nodes for v in _members(n)]
            elif name:
                nodes = [n[name] for n in nodes if isinstance(n, dict) and name in n]
        elif expr.startswith("[?(", i) and ")]" in expr[i:]:
            end = expr.index(")]", i)
            test, i = _filter(expr[i + 3 : end]), end + 2
            nodes = [x for n in nodes if isinstance(n, list) for x in n if test(x)]
        elif expr[i] == "[" and "]" in expr[i:]:
            end = expr.index("]", i)
            inner, i = expr[i + 1 : end].strip().strip("'\""), end + 1
            if inner == "*":
                nodes = [v for n in nodes for v in _members(n)]
            elif re.fullmatch(r"-?\d+", inner):
                k = int(inner)
                nodes = [n[k] for n in nodes if isinstance(n, list) and -len(n) <= k < len(n)]
            else:
                nodes = [n[inner] for n in nodes if isinstance(n, dict) and inner in n]
        else:
            return []
    return nodes


def _members(node: Any) -> list:
    return list(node.values()) if isinstance(node, dict) else node if isinstance(node, list) else []


def _filter(text: str) -> Callable[[Any], bool]:
    m = re.fullmatch(r"\s*@((?:\.[^\s=!<>]+)*)\s*(?:(==|!=|<=|>=|<|>)\s*(.+?))?\s*", text)
    if not m:
        return lambda item: False
    path, op, literal = m[1], m[2], (m[3] or "").strip()
    if literal[:1] in ("'", '"'):
        literal = literal[1:-1]
    else:
        with contextlib.suppress(ValueError):
            literal = json.loads(literal)
    compare = {
        "==": operator.eq,
        "!=": operator.ne,
        "<": operator.lt,
        ">": operator.gt,
        "<=": operator.le,
        ">=": operator.ge,
    }

    def test(item: Any) -> bool:
        found = jsonpath(item, path) if path else [item]
        if op is None or not found:
            return bool(found)
        try:
            return compare[op](found[0], literal)
        except TypeError:
            return False

    return test


# --------------------------------------------------------------------------------------------
# Server-side printing: the Table kubectl asks for.
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Column:
    name: str
    type: str
    cell: Callable[[Obj], Any]
    priority: int = 0
    description: str = ""
    format: str = ""

    def definition(self) -> Obj:
        fields = ("name", "type", "format", "description", "priority")
        return {field: getattr(self, field) for field in fields}


NAME_COLUMN = Column(
    "Name",
    "string",
    lambda o: o["metadata"]["name"],
    format="name",
    description="Name must be unique within a namespace.",
)
AGE_COLUMN = Column(
    "Age",
    "string",
    lambda o: age(o["metadata"].get("creationTimestamp")),
    description="The time since the object was created.",
)


def _pod_status(pod: Obj) -> str:
    """The STATUS column of ``kubectl get pods`` (the common cases of the real printer)."""
    reason = dig(pod, "status", "reason") or dig(pod, "status", "phase") or ""
    running_ready = False
    for cs in reversed(dig(pod, "status", "containerStatuses") or []):
        state = cs.get("state") or {}
        if dig(state, "waiting", "reason"):
            reason = state["waiting"]["reason"]
        elif "terminated" in state:
            term = state["terminated"]
            signal_ = f"Signal:{term['signal']}" if term.get("signal") else ""
            reason = term.get("reason") or signal_ or f"ExitCode:{term.get('exitCode', 0)}"
        elif "running" in state and cs.get("ready"):
            running_ready = True
    if reason == "Completed" and running_ready:
        reason = "Running"
    return "Terminating" if pod["metadata"].get("deletionTimestamp") else reason


def _pod_ready(pod: Obj) -> str:
    ready = sum(1 for s in dig(pod, "status", "containerStatuses") or [] if s.get("ready"))
    return f"{ready}/{len(dig(pod, 'spec', 'containers') or [])}"


def _pod_restarts(pod: Obj) -> str:
    return str(sum(s.get("restartCount", 0) for s in dig(pod, "status", "containerStatuses") or []))


BUILTIN_COLUMNS = {
    "Pod": [
        NAME_COLUMN,
        Column("Ready", "string", _pod_ready, description="The containers ready / all."),
        Column("Status", "string", _pod_status, description="The aggregate pod status."),
        Column("Restarts", "string", _pod_restarts, description="The container restarts."),
        AGE_COLUMN,
        Column("IP", "string", lambda o: dig(o, "status", "podIP") or "<none>", 1),
        Column("Node", "string", lambda o: dig(o, "spec", "nodeName") or "<none>", 1),
    ],
    "Namespace": [
        NAME_COLUMN,
        Column("Status", "string", lambda o: dig(o, "status", "phase")),
        AGE_COLUMN,
    ],
}


def printer_cell(obj: Obj, column: Obj) -> Any:
    """A cell of a CRD's additionalPrinterColumn, typed as the real server types it."""
    found = jsonpath(obj, column.get("jsonPath", ""))
    value, kind = (found[0] if found else None), column.get("type")
    number = has_type(value, "number")
    if value is None:
        return None
    if kind == "date":
        return age(value) if parse_time(value) else None
    if kind == "integer":
        return int(value) if number else None
    if kind in ("number", "boolean"):
        return value if has_type(value, kind) else None
    if isinstance(value, bool):
        return str(value).lower()
    return value if isinstance(value, str) else str(value) if number else json.dumps(value)


def table_columns(rt: ResourceType) -> list[Column]:
    if rt.crd is None:
        return BUILTIN_COLUMNS.get(rt.kind, [NAME_COLUMN, AGE_COLUMN])
    printer = rt.crd.get("additionalPrinterColumns") or [
        {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"}
    ]
    return [NAME_COLUMN] + [
        Column(
            c["name"],
            c.get("type", "string"),
            functools.partial(printer_cell, column=c),
            c.get("priority", 0),
            c.get("description", ""),
            c.get("format", ""),
        )
        for c in printer
    ]


# --------------------------------------------------------------------------------------------
# Built-in kinds: the real server's most visible defaults and initial status.
# --------------------------------------------------------------------------------------------

INITIAL_STATUS = {  # a created object's status, where status is a subresource (others: {})
    "Pod": {"phase": "Pending"},
    "PersistentVolumeClaim": {"phase": "Pending"},
    "PersistentVolume": {"phase": "Pending"},
    "Namespace": {"phase": "Active"},
    "Service": {"loadBalancer": {}},
}
POD_SPEC_DEFAULTS = {
    "dnsPolicy": "ClusterFirst",
    "schedulerName": "default-scheduler",
    "terminationGracePeriodSeconds": 30,
    "securityContext": {},
}
CONTAINER_DEFAULTS = {
    "terminationMessagePath": "/dev/termination-log",
    "terminationMessagePolicy": "File",
    "resources": {},
}


def _pod_spec_defaults(spec: Any, restart: bool = True) -> None:
    if not isinstance(spec, dict):
        return
    for key, value in POD_SPEC_DEFAULTS.items():
        spec.setdefault(key, copy.deepcopy(value))
    if restart:
        spec.setdefault("restartPolicy", "Always")
    for container in (spec.get("containers") or []) + (spec.get("initContainers") or []):
        image = str(container.get("image", ""))
        tag = image.rsplit("/", 1)[-1].partition(":")[2]
        latest = "@" not in image and tag in ("", "latest")
        container.setdefault("imagePullPolicy", "Always" if latest else "IfNotPresent")
        for key, value in CONTAINER_DEFAULTS.items():
            container.setdefault(key, copy.deepcopy(value))
        for port in container.get("ports") or []:
            port.setdefault("protocol", "TCP")


def builtin_defaults(rt: ResourceType, obj: Obj, old: Obj | None, next_ip: Callable[[], str]):
    kind, meta, spec = rt.kind, obj["metadata"], obj.get("spec")
    if kind == "Secret":
        data = obj.get("data") or {}
        for key, value in (obj.pop("stringData", None) or {}).items():  # write-only: into data
            data[key] = base64.b64encode(str(value).encode()).decode()
        obj.update({"data": data} if data else {})
        obj.setdefault("type", "Opaque")
    elif kind == "Namespace":
        meta.setdefault("labels", {})["kubernetes.io/metadata.name"] = meta["name"]
        obj.setdefault("spec", {}).setdefault("finalizers", ["kubernetes"])
    elif kind == "Service" and isinstance(spec, dict):
        spec.setdefault("type", "ClusterIP")
        spec.setdefault("sessionAffinity", "None")
        if spec["type"] != "ExternalName":
            spec.setdefault("clusterIP", dig(old, "spec", "clusterIP") or next_ip())
            spec.setdefault("clusterIPs", [spec["clusterIP"]])
        for port in spec.get("ports") or []:
            port.setdefault("protocol", "TCP")
            port.setdefault("targetPort", port.get("port"))
    elif kind == "Pod" and isinstance(spec, dict):
        _pod_spec_defaults(spec)
        spec.setdefault("serviceAccountName", "default")  # the ServiceAccount admission plugin
        spec.setdefault("serviceAccount", spec["serviceAccountName"])
        spec.setdefault("enableServiceLinks", True)
    elif kind in ("Deployment", "StatefulSet", "ReplicaSet", "DaemonSet", "Job"):
        if kind not in ("DaemonSet", "Job") and isinstance(spec, dict):
            spec.setdefault("replicas", 1)
        _pod_spec_defaults(dig(spec, "template", "spec"), restart=kind != "Job")  # Jobs choose


# --------------------------------------------------------------------------------------------
# Protobuf request bodies (see the module docstring): the wire format, and field tables for the
# kinds kubectl's typed clients create.
# --------------------------------------------------------------------------------------------

STR, BOOL, INT, MAP, BYTES_MAP = "string", "bool", "int", "map", "bytes-map"
PB_META = {
    1: ("name", STR),
    2: ("generateName", STR),
    3: ("namespace", STR),
    6: ("resourceVersion", STR),
    11: ("labels", MAP),
    12: ("annotations", MAP),
    13: (
        "ownerReferences",
        [
            {
                1: ("kind", STR),
                3: ("name", STR),
                4: ("uid", STR),
                5: ("apiVersion", STR),
                6: ("controller", BOOL),
                7: ("blockOwnerDeletion", BOOL),
            }
        ],
    ),
    14: ("finalizers", [STR]),
}
PB_RULE = {
    1: ("verbs", [STR]),
    2: ("apiGroups", [STR]),
    3: ("resources", [STR]),
    4: ("resourceNames", [STR]),
    5: ("nonResourceURLs", [STR]),
}
PB_BINDING = {
    1: ("metadata", PB_META),
    2: (
        "subjects",
        [{1: ("kind", STR), 2: ("apiGroup", STR), 3: ("name", STR), 4: ("namespace", STR)}],
    ),
    3: ("roleRef", {1: ("apiGroup", STR), 2: ("kind", STR), 3: ("name", STR)}),
}
PROTOBUF_KINDS = {
    "ConfigMap": {
        1: ("metadata", PB_META),
        2: ("data", MAP),
        3: ("binaryData", BYTES_MAP),
        4: ("immutable", BOOL),
    },
    "Secret": {
        1: ("metadata", PB_META),
        2: ("data", BYTES_MAP),
        3: ("type", STR),
        4: ("stringData", MAP),
        5: ("immutable", BOOL),
    },
    "Namespace": {1: ("metadata", PB_META), 2: ("spec", {1: ("finalizers", [STR])})},
    "ServiceAccount": {
        1: ("metadata", PB_META),
        3: ("imagePullSecrets", [{1: ("name", STR)}]),
        4: ("automountServiceAccountToken", BOOL),
    },
    "Role": {1: ("metadata", PB_META), 2: ("rules", [PB_RULE])},
    "ClusterRole": {1: ("metadata", PB_META), 2: ("rules", [PB_RULE])},
    "RoleBinding": PB_BINDING,
    "ClusterRoleBinding": PB_BINDING,
    "DeleteOptions": {
        1: ("gracePeriodSeconds", INT),
        2: ("preconditions", {1: ("uid", STR), 2: ("resourceVersion", STR)}),
        3: ("orphanDependents", BOOL),
        4: ("propagationPolicy", STR),
        5: ("dryRun", [STR]),
    },
}


def _pb_fields(data: bytes) -> list[tuple[int, Any]]:
    """One message's (field number, value) pairs: varints and length-delimited bytes."""

    def varint(i: int) -> tuple[int, int]:
        result = shift = 0
        while data[i] & 0x80:
            result, i, shift = result | (data[i] & 0x7F) << shift, i + 1, shift + 7
        return result | data[i] << shift, i + 1

    fields, i = [], 0
    try:
        while i < len(data):
            key, i = varint(i)
            if key & 7 == 0:
                value, i = varint(i)
            elif key & 7 == 2:
                size, i = varint(i)
                value, i = data[i : i + size], i + size
            else:  # fixed-size numbers: none in the tables
                i += 8 if key & 7 == 1 else 4
                continue
            fields.append((key >> 3, value))
    except IndexError:
        raise bad_request("the protobuf body is truncated") from None
    return fields


def _pb_message(data: bytes, table: dict) -> Obj:
    obj: Obj = {}
    for number, value in _pb_fields(data):
        name, kind = table.get(number, (None, None))  # the rest (timestamps...) is server-set
        if kind in (MAP, BYTES_MAP):
            entry = dict(_pb_fields(value))
            item = entry.get(2, b"")
            item = item.decode() if kind == MAP else base64.b64encode(item).decode()
            obj.setdefault(name, {})[entry.get(1, b"").decode()] = item
        elif kind is not None:
            repeated, kind = isinstance(kind, list), kind[0] if isinstance(kind, list) else kind
            if kind == STR:
                value = value.decode()
            elif kind == BOOL:
                value = bool(value)
            elif kind == INT:
                value = value - (1 << 64) if value >= 1 << 63 else value
            else:
                value = _pb_message(value, kind)
            if repeated:
                obj.setdefault(name, []).append(value)
            else:
                obj[name] = value
    return obj


def decode_protobuf(raw: bytes) -> Obj:
    """A body framed as ``k8s\\x00`` + runtime.Unknown{typeMeta, raw}, as JSON would have it."""
    if not raw.startswith(b"k8s\x00"):
        raise bad_request("the protobuf body lacks the k8s magic number")
    envelope = dict(_pb_fields(raw[4:]))
    type_meta = dict(_pb_fields(envelope.get(1, b"")))
    api_version, kind = type_meta.get(1, b"").decode(), type_meta.get(2, b"").decode()
    if kind not in PROTOBUF_KINDS:
        known = ", ".join(PROTOBUF_KINDS)
        message = f"this test API server decodes protobuf for {known}, not {kind}: send JSON"
        raise ApiError(415, "UnsupportedMediaType", f"{message} (e.g. kubectl apply -f)")
    obj = _pb_message(envelope.get(2, b""), PROTOBUF_KINDS[kind])
    return obj if kind == "DeleteOptions" else {"apiVersion": api_version, "kind": kind, **obj}


# --------------------------------------------------------------------------------------------
# The store: all state, and every rule that changes it. Only the server's event loop thread
# touches it, so each request's changes are atomic without locks.
# --------------------------------------------------------------------------------------------


class Change(NamedTuple):
    rv: int
    type: str  # ADDED, MODIFIED or DELETED
    key: tuple[str, str]
    old: Obj | None
    new: Obj


@dataclasses.dataclass
class WriteOptions:
    dry_run: bool = False
    strict: bool = False  # fieldValidation=Strict: unknown fields are an error, not a warning
    warnings: list[str] = dataclasses.field(default_factory=list)


class Watcher:
    """One open watch: the events it selects are queued for its response; None ends it."""

    def __init__(self, rt: ResourceType, namespace: str | None, selector: Callable[[Obj], bool]):
        self.rt, self.namespace, self.selector = rt, namespace, selector
        self.queue: asyncio.Queue[tuple[str, Obj] | None] = asyncio.Queue()

    def matches(self, obj: Obj | None) -> bool:
        if obj is None or self.namespace not in (None, obj["metadata"].get("namespace")):
            return False
        return self.selector(obj)

    def event(self, change: Change) -> tuple[str, Obj] | None:
        """The event this watch sees. As on the real server, an object that starts (stops)
        matching the selectors arrives as ADDED (DELETED)."""
        if change.key != self.rt.key:
            return None
        before, now = self.matches(change.old), self.matches(change.new)
        if change.type == "ADDED":
            return ("ADDED", change.new) if now else None
        if change.type == "DELETED":
            return ("DELETED", change.new) if before or now else None
        if before or now:
            return ("MODIFIED" if before and now else "ADDED" if now else "DELETED", change.new)
        return None


class Store:
    """The objects, the resource types, the change log and the watchers, and every rule that
    changes them (create, update, delete, and the controllers)."""

    def __init__(self) -> None:
        self.rv = 0  # the last resourceVersion given: one counter for all objects
        self.log: deque[Change] = deque()  # the latest changes, for watches that resume
        self.log_floor = 0  # a watch resuming from before this resourceVersion gets 410 Gone
        self.types: dict[tuple[str, str, str], ResourceType] = {}  # (group, version, plural)
        self.by_key: dict[tuple[str, str], ResourceType] = {}  # the storage version, per key
        self.objects: dict[tuple[str, str], dict[tuple[str, str], Obj]] = defaultdict(dict)
        self.watchers: set[Watcher] = set()
        self.pod_logs: dict[tuple[str, str], str] = {}
        self._ips = itertools.count(10)  # Service clusterIPs (10.96.0.1 is the API's own)
        self._controllers_due = False
        self.loop: asyncio.AbstractEventLoop | None = None  # the server's, once serving
        for rt in builtin_types():
            self.types[(rt.group, rt.version, rt.plural)] = self.by_key[rt.key] = rt
        for name in (*UNDELETABLE_NAMESPACES, "kube-node-lease"):
            self.create(self.by_key[NS_KEY], None, {"metadata": {"name": name}})
        ports = [{"name": "https", "port": 443, "targetPort": 6443}]
        api = {
            "metadata": {"name": "kubernetes"},
            "spec": {"clusterIP": "10.96.0.1", "ports": ports},
        }
        self.create(self.by_key[("", "services")], "default", api)
        self.run_controllers()

    # ---- reading

    def resource_type(self, group: str, version: str, plural: str) -> ResourceType:
        if (group, version, plural) not in self.types:
            raise no_such_path()
        return self.types[(group, version, plural)]

    def get(self, rt: ResourceType, namespace: str | None, name: str) -> Obj:
        obj = self.objects[rt.key].get((namespace or "", name))
        if obj is None:
            raise rt.not_found(name)
        return obj

    def list(self, rt: ResourceType, namespace: str | None, selector) -> list[Obj]:
        """The objects by namespace and name, as etcd's keys sort."""
        found = sorted(self.objects.get(rt.key, {}).items())
        return [o for (ns, _), o in found if namespace in (None, ns) and selector(o)]

    def watch(self, rt: ResourceType, namespace: str | None, selector, since: str):
        """Register a watcher; returns it with the events to send first. It is all synchronous,
        so no change can fall between those events and the live ones."""
        watcher = Watcher(rt, namespace, selector)
        if since in ("", "0"):  # the current objects first, as ADDED
            backlog = [("ADDED", obj) for obj in self.list(rt, namespace, selector)]
        else:  # every change since
            if not since.isdigit():
                raise bad_request(f'invalid resource version "{since}"')
            if int(since) < self.log_floor:
                message = f"too old resource version: {since} ({self.log_floor + 1})"
                raise ApiError(410, "Expired", message)
            newer = itertools.takewhile(lambda c: c.rv > int(since), reversed(self.log))
            backlog = [e for c in reversed(list(newer)) if (e := watcher.event(c))]
        self.watchers.add(watcher)
        return watcher, backlog

    def close_watchers(self, which: Callable[[Watcher], bool] = lambda w: True) -> None:
        for watcher in [w for w in self.watchers if which(w)]:
            self.watchers.discard(watcher)
            watcher.queue.put_nowait(None)

    # ---- writing

    def _decode(self, rt: ResourceType, body: Any) -> Obj:
        if not isinstance(body, dict) or not isinstance(body.get("metadata", {}), dict):
            raise bad_request("the body of the request must be a JSON object with metadata")
        api_version, kind = body.get("apiVersion"), body.get("kind")
        if api_version and api_version.rpartition("/")[0] != rt.group:
            raise bad_request(
                f"the API version in the data ({api_version}) does not match the "
                f"expected API version ({rt.api_version})"
            )
        if kind and kind != rt.kind:
            raise bad_request(
                f"the kind in the data ({kind}) does not match the expected kind ({rt.kind})"
            )
        obj = decode_numbers(body)  # a copy, with integers beyond int64 as floats
        obj.setdefault("metadata", {})
        return {**obj, "apiVersion": rt.api_version, "kind": rt.kind}

    def _check_name(self, rt: ResourceType, name: str) -> None:
        if not name:
            detail = "Required value: name or generateName is required"
            raise rt.invalid("", ("metadata.name", "FieldValueRequired", detail))
        if rt.group == "rbac.authorization.k8s.io":  # path segments: "system:foo" is fine
            ok, rule = name not in (".", "..") and not re.search("[/%]", name), "no '/' or '%'"
        else:
            limit = 63 if rt.kind in ("Namespace", "Service") else 253  # DNS labels, subdomains
            ok = len(name) <= limit and DNS_NAME.fullmatch(name) and ("." not in name or limit > 63)
            rule = (
                "a lowercase RFC 1123 name must consist of lower case alphanumeric "
                "characters, '-' or '.', and must start and end with an alphanumeric character"
            )
        if not ok:
            detail = f"Invalid value: {json.dumps(name)}: {rule}"
            raise rt.invalid(name, ("metadata.name", "FieldValueInvalid", detail))

    def create(
        self, rt: ResourceType, namespace: str | None, body: Any, opts: WriteOptions | None = None
    ) -> Obj:
        opts = opts or WriteOptions()
        obj = self._decode(rt, body)
        meta = obj["metadata"]
        if meta.get("resourceVersion"):
            raise bad_request("resourceVersion should not be set on objects to be created")
        if meta.get("namespace") not in (None, "", namespace) and rt.namespaced:
            raise bad_request(NS_MISMATCH)
        meta.pop("namespace", None)
        if rt.namespaced:
            meta["namespace"] = namespace
        if not meta.get("name") and meta.get("generateName"):
            alphabet = "bcdfghjklmnpqrstvwxz2456789"  # the real name generator's
            meta["name"] = meta["generateName"] + "".join(random.choices(alphabet, k=5))
        name = meta.get("name") or ""
        self._check_name(rt, name)
        ns = self.objects[NS_KEY].get(("", namespace or ""))
        if rt.namespaced and ns is None:
            raise self.by_key[NS_KEY].not_found(namespace)
        if rt.namespaced and ns["metadata"].get("deletionTimestamp"):
            why = (
                f"unable to create new content in namespace {namespace} because it is being "
                "terminated"
            )
            raise rt.error(403, "Forbidden", name, f'{rt.resource} "{name}" is forbidden: {why}')
        if (namespace or "", name) in self.objects[rt.key]:
            raise rt.error(409, "AlreadyExists", name, f'{rt.resource} "{name}" already exists')
        crd = self.objects[CRD_KEY].get(("", rt.crd_name)) if rt.crd else None
        if crd and crd["metadata"].get("deletionTimestamp"):
            why = "create not allowed while custom resource definition is terminating"
            raise rt.error(405, "MethodNotAllowed", name, why)
        for key in ("deletionTimestamp", "deletionGracePeriodSeconds"):
            meta.pop(key, None)
        meta.update(uid=str(uuid.uuid4()), creationTimestamp=now_iso())
        meta.update({"generation": 1} if rt.crd or rt.kind in GENERATION_KINDS else {})
        self._admit(rt, obj, None, opts)
        return obj if opts.dry_run else self._commit(rt, "ADDED", None, obj)

    def update(
        self,
        rt: ResourceType,
        namespace: str | None,
        name: str,
        change: Callable[[Obj], Any],
        opts: WriteOptions | None = None,
        subresource: str | None = None,
    ) -> Obj:
        """Replace an object with ``change(a copy of it)``: PUT and PATCH come here, for the
        object or its ``status`` (or a pod's ``binding``, which may change both)."""
        opts = opts or WriteOptions()
        old = self.get(rt, namespace, name)
        new = self._decode(rt, change(copy.deepcopy(old)))
        meta, old_meta = new["metadata"], old["metadata"]
        if meta.get("name", name) != name:
            raise bad_request(
                f"the name of the object ({meta['name']}) does not match the name "
                f"on the URL ({name})"
            )
        # An empty namespace in the body means "the URL's", as on a real server (helm sends it).
        if rt.namespaced and (meta.get("namespace") or namespace) != namespace:
            raise bad_request(NS_MISMATCH)
        if rt.namespaced:
            meta["namespace"] = namespace
        uid, rv = old_meta["uid"], old_meta["resourceVersion"]
        if (meta.get("uid") or uid) != uid:
            raise rt.conflict(name, f"Precondition failed: UID in precondition: {meta['uid']}")
        if (meta.get("resourceVersion") or rv) != rv:
            raise rt.conflict(name)  # optimistic concurrency: the writer saw an older version
        for key in SERVER_METADATA:
            meta.pop(key, None)
            meta.update({key: old_meta[key]} if key in old_meta else {})
        if subresource == "status":  # only the status changes through /status...
            new = _with_status({**copy.deepcopy(old), "apiVersion": rt.api_version}, new)
        elif subresource != "binding" and "status" in rt.subresources:  # ...and only there
            new = _with_status(new, old)
        self._admit(rt, new, old, opts)
        finalizers = new["metadata"].get("finalizers") or []
        added = [f for f in finalizers if f not in old_meta.get("finalizers", [])]
        if old_meta.get("deletionTimestamp") and added:
            detail = (
                "Forbidden: no new finalizers can be added if the object is being deleted, "
                f"found new finalizers {json.dumps(added)}"
            )
            raise rt.invalid(name, ("metadata.finalizers", "FieldValueForbidden", detail))
        if "generation" in old_meta and self._spec(rt, new) != self._spec(rt, old):
            new["metadata"]["generation"] = old_meta["generation"] + 1
        if json_equal({**new, "apiVersion": ""}, {**old, "apiVersion": ""}):
            return old  # a no-op write: no new resourceVersion, no watch event
        if opts.dry_run:
            return new
        removed = new["metadata"].get("deletionTimestamp") and not finalizers
        return self._commit(rt, "DELETED" if removed else "MODIFIED", old, new)

    def delete(
        self,
        rt: ResourceType,
        namespace: str | None,
        name: str,
        options: Obj | None = None,
        opts: WriteOptions | None = None,
    ) -> Obj:
        """Delete at once, or mark for deletion (deletionTimestamp) while finalizers remain."""
        options, opts = options or {}, opts or WriteOptions()
        old = self.get(rt, namespace, name)
        meta = old["metadata"]
        for field, title in (("uid", "UID"), ("resourceVersion", "ResourceVersion")):
            expected = dig(options, "preconditions", field)
            if expected and expected != meta[field]:
                raise rt.conflict(
                    name,
                    f"Precondition failed: {title} in precondition: "
                    f"{expected}, {title} in object meta: {meta[field]}",
                )
        if rt.key == NS_KEY and name in UNDELETABLE_NAMESPACES:
            why = f'namespaces "{name}" is forbidden: this namespace may not be deleted'
            raise rt.error(403, "Forbidden", name, why)
        orphan = options.get("orphanDependents")
        policy = options.get("propagationPolicy") or ("Orphan" if orphan else "Background")
        if policy not in ("Orphan", "Background", "Foreground"):
            raise bad_request(f"propagationPolicy: Unsupported value: {json.dumps(policy)}")
        if meta.get("deletionTimestamp") or opts.dry_run:
            return old
        if policy == "Orphan":  # dependents forget this owner, and stay
            for dep_rt, dep in self._dependents(meta["uid"]):
                refs = [
                    r for r in dep["metadata"]["ownerReferences"] if r.get("uid") != meta["uid"]
                ]
                self._patch(dep_rt, dep, {"metadata": {"ownerReferences": refs}})
        finalizers = list(meta.get("finalizers") or [])
        if policy == "Foreground" and "foregroundDeletion" not in finalizers:
            finalizers.append("foregroundDeletion")  # removed once the dependents are gone
        if not finalizers and rt.key != NS_KEY:
            return self._commit(rt, "DELETED", old, old)
        new = copy.deepcopy(old)
        new["metadata"].update(deletionTimestamp=now_iso(), deletionGracePeriodSeconds=0)
        if "generation" in meta:  # as the real server does
            new["metadata"]["generation"] = meta["generation"] + 1
        new["metadata"].update({"finalizers": finalizers} if finalizers else {})
        if rt.key == NS_KEY:  # the namespace controller empties it, then it goes
            new["status"] = {"phase": "Terminating"}
        return self._commit(rt, "MODIFIED", old, new)

    def set_pod_log(self, namespace: str, name: str, text: str, append: bool = False) -> None:
        self.get(self.by_key[POD_KEY], namespace, name)
        before = self.pod_logs.get((namespace, name), "") if append else ""
        self.pod_logs[(namespace, name)] = before + text

    def _commit(self, rt: ResourceType, kind: str, old: Obj | None, new: Obj) -> Obj:
        """Store a change with a new resourceVersion, log it, and tell the watchers."""
        self.rv += 1
        new = {**new, "metadata": {**new["metadata"], "resourceVersion": str(self.rv)}}
        at = (new["metadata"].get("namespace", ""), new["metadata"]["name"])
        if kind == "DELETED":
            del self.objects[rt.key][at]
            if rt.key == POD_KEY:
                self.pod_logs.pop(at, None)
        else:
            self.objects[rt.key][at] = new
        change = Change(self.rv, kind, rt.key, old, new)
        if len(self.log) >= EVENT_LOG_SIZE:
            self.log_floor = self.log.popleft().rv
        self.log.append(change)
        for watcher in self.watchers:
            if (event := watcher.event(change)) is not None:
                watcher.queue.put_nowait(event)
        if rt.key == CRD_KEY:
            self._serve_crd(new, removed=kind == "DELETED")
        self._schedule_controllers()
        return new

    @staticmethod
    def _spec(rt: ResourceType, obj: Obj) -> Obj:
        """What generation counts: all but metadata (and status where it is a subresource)."""
        skip = {"metadata", "apiVersion", "kind", *({"status"} & set(rt.subresources))}
        return {k: v for k, v in obj.items() if k not in skip}

    # ---- admission: what a kind does to an object before it is stored

    def _admit(self, rt: ResourceType, obj: Obj, old: Obj | None, opts: WriteOptions) -> None:
        if old is None and "status" in rt.subresources and rt.kind != "Node":
            obj.pop("status", None)  # creating sets no status where it is a subresource
            if rt.crd is None:
                obj["status"] = copy.deepcopy(INITIAL_STATUS.get(rt.kind, {}))
        if rt.crd is not None:
            self._admit_custom(rt, obj, opts)
        elif rt.key == CRD_KEY:
            self._admit_crd(obj, old)
        else:
            builtin_defaults(rt, obj, old, self._next_ip)
        meta = obj["metadata"]
        meta.pop("managedFields", None)  # server-side apply's bookkeeping: not kept here
        for key in ("finalizers", "labels", "annotations", "ownerReferences"):
            if key in meta and not meta[key]:  # the real server leaves them out when empty
                del meta[key]
        annotations = meta.get("annotations") or {}
        if sum(len(k) + len(str(v)) for k, v in annotations.items()) > MAX_ANNOTATION_BYTES:
            detail = f"Too long: may not be more than {MAX_ANNOTATION_BYTES} bytes"
            raise rt.invalid(
                meta.get("name", ""), ("metadata.annotations", "FieldValueTooLong", detail)
            )
        if not opts.dry_run and len(json.dumps(obj, separators=(",", ":"))) > MAX_STORED_BYTES:
            raise ApiError(500, "InternalError", "etcdserver: request is too large")

    def _next_ip(self) -> str:
        n = next(self._ips)
        return f"10.96.{n // 250}.{n % 250 + 1}"

    def _admit_custom(self, rt: ResourceType, obj: Obj, opts: WriteOptions) -> None:
        causes, unknown = admit(obj, rt.schema or {})
        if unknown and opts.strict:
            fields = ", ".join(f'unknown field "{f}"' for f in unknown)
            raise bad_request(
                f'{rt.kind} in version "{rt.version}" cannot be handled as a '
                f"{rt.kind}: strict decoding error: {fields}"
            )
        opts.warnings += [f'unknown field "{f}"' for f in unknown]
        if causes:
            raise rt.invalid(obj["metadata"]["name"], *causes)

    def _admit_crd(self, crd: Obj, old: Obj | None) -> None:
        """Check a CRD (what matters) and set the status the CRD controller would."""
        name, spec = crd["metadata"]["name"], crd.setdefault("spec", {})
        names, versions = spec.setdefault("names", {}), spec.get("versions") or []
        required = {
            "spec.group": spec.get("group"),
            "spec.names.plural": names.get("plural"),
            "spec.names.kind": names.get("kind"),
        }
        causes = [(f, "FieldValueRequired", "Required value") for f, v in required.items() if not v]
        if spec.get("scope") not in ("Namespaced", "Cluster"):
            causes.append(
                (
                    "spec.scope",
                    "FieldValueNotSupported",
                    f"Unsupported value: "
                    f'{json.dumps(spec.get("scope"))}: supported values: "Cluster", '
                    '"Namespaced"',
                )
            )
        if not causes and name != f"{names['plural']}.{spec['group']}":
            causes.append(
                (
                    "metadata.name",
                    "FieldValueInvalid",
                    f'Invalid value: "{name}": must be spec.names.plural+"."+spec.group',
                )
            )
        if sum(1 for v in versions if v.get("storage")) != 1:
            causes.append(
                (
                    "spec.versions",
                    "FieldValueInvalid",
                    'Invalid value: "array": must '
                    "have exactly one version marked as storage version",
                )
            )
        causes += [
            (
                f"spec.versions[{i}].schema.openAPIV3Schema",
                "FieldValueRequired",
                "Required value: schemas are required",
            )
            for i, v in enumerate(versions)
            if not dig(v, "schema", "openAPIV3Schema")
        ]
        for i, v in enumerate(versions):  # structural, valid defaults, CEL rules that compile
            schema = dig(v, "schema", "openAPIV3Schema")
            field = (
                "spec.validation.openAPIV3Schema"
                if len(versions) == 1
                else (f"spec.versions[{i}].schema.openAPIV3Schema")
            )
            causes += check_schema(schema, field) if schema else []
        causes += [
            (
                f"spec.{f}",
                "FieldValueInvalid",
                f"Invalid value: {json.dumps(spec.get(f))}: field is immutable",
            )
            for f in ("group", "scope")
            if old and spec.get(f) != old["spec"].get(f)
        ]
        if causes:
            raise self.by_key[CRD_KEY].invalid(name, *causes)
        spec.setdefault("conversion", {"strategy": "None"})
        names.setdefault("singular", names["kind"].lower())
        names.setdefault("listKind", names["kind"] + "List")
        if old is None:
            crd["metadata"]["finalizers"] = [*crd["metadata"].get("finalizers", []), CRD_FINALIZER]
        since = {c["type"]: c["lastTransitionTime"] for c in dig(old, "status", "conditions") or []}
        conditions = [
            ("NamesAccepted", "NoConflicts", "no conflicts found"),
            ("Established", "InitialNamesAccepted", "the initial names have been accepted"),
        ]
        stored = list(dig(old, "status", "storedVersions") or [])
        stored += [v["name"] for v in versions if v.get("storage") and v["name"] not in stored]
        crd["status"] = {
            "conditions": [
                {
                    "type": t,
                    "status": "True",
                    "lastTransitionTime": since.get(t) or now_iso(),
                    "reason": r,
                    "message": m,
                }
                for t, r, m in conditions
            ],
            "acceptedNames": copy.deepcopy(names),
            "storedVersions": stored,
        }

    def _serve_crd(self, crd: Obj, removed: bool) -> None:
        """(Re)register the resource a CRD defines, or stop serving it and drop its objects."""
        name, spec, names = crd["metadata"]["name"], crd["spec"], crd["spec"]["names"]
        key = (spec["group"], names["plural"])
        for k in [k for k, t in self.types.items() if t.crd_name == name]:
            del self.types[k]
        self.by_key.pop(key, None)
        if removed:
            self.objects.pop(key, None)
        for version in [] if removed else [v for v in spec["versions"] if v.get("served")]:
            subresources = tuple(s for s in ("status",) if s in (version.get("subresources") or {}))
            rt = ResourceType(
                spec["group"],
                version["name"],
                names["plural"],
                names["kind"],
                spec["scope"] == "Namespaced",
                tuple(names.get("shortNames", ())),
                tuple(names.get("categories", ())),
                subresources,
                names["singular"],
                names["listKind"],
                version,
                name,
            )
            self.types[(rt.group, rt.version, rt.plural)] = rt
            if version.get("storage") or key not in self.by_key:
                self.by_key[key] = rt
        self.close_watchers(
            lambda w: (
                w.rt.crd_name == name
                and ((w.rt.group, w.rt.version, w.rt.plural) not in self.types)
            )
        )

    # ---- controllers: what kube-controller-manager and the CRD controller would do

    def _schedule_controllers(self) -> None:
        """Run the controllers soon after the request that changed something, as their own
        step (the constructor runs them itself)."""
        if self.loop is not None and not self._controllers_due:
            self.loop.call_soon(self.run_controllers)
            self._controllers_due = True

    def _objects(self, key: tuple[str, str]) -> list[Obj]:
        return list(self.objects.get(key, {}).values())

    def _everything(self) -> list[tuple[ResourceType, Obj]]:
        return [
            (self.by_key[key], obj)
            for key in list(self.objects)
            if key in self.by_key
            for obj in self._objects(key)
        ]

    def _dependents(self, uid: str) -> list[tuple[ResourceType, Obj]]:
        return [
            (rt, obj)
            for rt, obj in self._everything()
            if any(r.get("uid") == uid for r in obj["metadata"].get("ownerReferences", []))
        ]

    def _patch(self, rt: ResourceType, obj: Obj, patch: Obj) -> None:
        meta = obj["metadata"]
        self.update(rt, meta.get("namespace"), meta["name"], lambda o: merge_patch(o, patch))

    def _drop_finalizer(self, rt: ResourceType, obj: Obj, finalizer: str) -> None:
        left = [f for f in obj["metadata"].get("finalizers", []) if f != finalizer]
        self._patch(rt, obj, {"metadata": {"finalizers": left}})

    def _remove(self, rt: ResourceType, obj: Obj) -> None:
        self.delete(rt, obj["metadata"].get("namespace"), obj["metadata"]["name"])

    def _quietly(self, action: Callable, rt: ResourceType, obj: Obj, *args: Any) -> None:
        """A controller's action; one that fails (the object went or changed meanwhile) is
        retried by the next pass if still needed."""
        try:
            action(rt, obj, *args)
        except ApiError as e:
            log.debug("controller action skipped: %s", e.message)

    def run_controllers(self) -> None:
        """One pass of the garbage collector, the namespace and the CRD controllers. Their
        changes schedule the next pass, until there is nothing left to do."""
        self._controllers_due = False
        everything = self._everything()
        uids = {obj["metadata"]["uid"] for _, obj in everything}
        for rt, obj in everything:
            meta = obj["metadata"]
            refs = meta.get("ownerReferences") or []
            alive = [r for r in refs if r.get("uid") in uids]
            if refs and not alive:  # its owners are gone: it goes too (background propagation)
                self._quietly(self._remove, rt, obj)
            elif len(alive) < len(refs):  # some owners are left: it only forgets the others
                self._quietly(self._patch, rt, obj, {"metadata": {"ownerReferences": alive}})
            if meta.get("deletionTimestamp") and "foregroundDeletion" in meta.get("finalizers", []):
                dependents = self._dependents(meta["uid"])
                for dependent in dependents:  # foreground: the dependents go first
                    self._quietly(self._remove, *dependent)
                if not dependents:
                    self._quietly(self._drop_finalizer, rt, obj, "foregroundDeletion")
        for ns in self._objects(NS_KEY):
            name = ns["metadata"]["name"]
            if not ns["metadata"].get("deletionTimestamp"):
                if (name, "default") not in self.objects[SA_KEY]:  # the ServiceAccount controller
                    self._quietly(self._create_default_sa, self.by_key[SA_KEY], ns)
                continue
            for rt, obj in self._content(name):  # the namespace controller empties it...
                self._quietly(self._remove, rt, obj)
            if not self._content(name):  # ...then it goes
                self._commit(self.by_key[NS_KEY], "DELETED", ns, ns)
        for crd in self._objects(CRD_KEY):
            meta = crd["metadata"]
            if meta.get("deletionTimestamp") and CRD_FINALIZER in meta.get("finalizers", []):
                key = (crd["spec"]["group"], crd["spec"]["names"]["plural"])
                for obj in self._objects(key):  # the instances go first
                    self._quietly(self._remove, self.by_key[key], obj)
                if not self.objects.get(key):
                    self._quietly(self._drop_finalizer, self.by_key[CRD_KEY], crd, CRD_FINALIZER)

    def _content(self, namespace: str) -> list[tuple[ResourceType, Obj]]:
        return [
            (rt, o)
            for rt, o in self._everything()
            if rt.namespaced and o["metadata"]["namespace"] == namespace
        ]

    def _create_default_sa(self, rt: ResourceType, namespace: Obj) -> None:
        self.create(rt, namespace["metadata"]["name"], {"metadata": {"name": "default"}})


def _with_status(obj: Obj, source: Obj) -> Obj:
    """obj with the status of source (or without one)."""
    result = {k: v for k, v in obj.items() if k != "status"}
    return {**result, "status": copy.deepcopy(source["status"])} if "status" in source else result


# --------------------------------------------------------------------------------------------
# HTTP: routing, discovery, OpenAPI, and the REST verbs on top of the store.
# --------------------------------------------------------------------------------------------


def json_response(body: Any, status: int = 200, warnings: list[str] | None = None):
    headers = CIMultiDict([("Content-Type", "application/json")])
    for warning in warnings or ():
        headers.add("Warning", f"299 - {json.dumps(warning)}")
    return web.Response(body=json.dumps(body).encode(), status=status, headers=headers)


def present(rt: ResourceType, obj: Obj) -> Obj:
    """An object as ``rt``'s version serves it (conversion strategy None: apiVersion only)."""
    return obj if obj.get("apiVersion") == rt.api_version else {**obj, "apiVersion": rt.api_version}


def partial_metadata(obj: Obj, version: str = "v1") -> Obj:
    kind = "PartialObjectMetadata"
    return {"kind": kind, "apiVersion": f"meta.k8s.io/{version}", "metadata": obj["metadata"]}


SUBRESOURCE_DISCOVERY = {  # subresource: (its kind, or "" for the resource's, verbs)
    "status": ("", ["get", "patch", "update"]),
    "log": ("Pod", ["get"]),
    "binding": ("Binding", ["create"]),
}


class Api:
    def __init__(self, store: Store):
        self.store = store
        self.stopping = False

    async def handle(self, request: web.Request) -> web.StreamResponse:
        try:
            return await self.route(request)
        except ApiError as e:
            return json_response(e.status(), e.code)
        except Exception as e:  # a bug here: answer like the real server, and log it
            log.exception("%s %s failed", request.method, request.path_qs)
            error = ApiError(500, "InternalError", f"Internal error occurred: {e!r}")
            return json_response(error.status(), 500)

    async def route(self, request: web.Request) -> web.StreamResponse:
        parts = [p for p in request.path.split("/") if p]
        head = parts[0] if parts else ""
        if head == "api" and len(parts) >= 3:
            group, version, rest = "", parts[1], parts[2:]
        elif head == "apis" and len(parts) >= 4:
            group, version, rest = parts[1], parts[2], parts[3:]
        elif request.method == "GET":
            return self.discovery(request, parts)
        else:
            raise no_such_path()
        namespace = None
        if rest[0] == "namespaces" and len(rest) >= 3 and rest[2] not in ("status", "finalize"):
            namespace, rest = rest[1], rest[2:]
        rt = self.store.resource_type(group, version, rest[0])
        name, sub = [*rest, None, None][1:3]
        if (
            len(rest) > 3
            or (sub and sub not in rt.subresources)
            or (rt.namespaced and name and namespace is None)
            or (namespace is not None and not rt.namespaced)
        ):
            raise no_such_path()
        return await self.serve(request, rt, namespace, name, sub)

    # ---- discovery and OpenAPI

    def discovery(self, request: web.Request, parts: list[str]) -> web.Response:
        head = parts[0] if parts else ""
        if head in ("healthz", "livez", "readyz"):
            return web.Response(text="ok")
        if parts == ["version"]:
            return json_response(VERSION_INFO)
        if head == "openapi":
            return json_response(self.openapi(parts[1:]))
        if parts == ["api"]:
            address = [{"clientCIDR": "0.0.0.0/0", "serverAddress": request.host}]
            body = {
                "kind": "APIVersions",
                "versions": ["v1"],
                "serverAddressByClientCIDRs": address,
            }
            return json_response(body)
        groups = self.groups()
        if parts == ["apis"]:
            listed = [self.group(g, vs) for g, vs in groups.items()]
            return json_response({"kind": "APIGroupList", "apiVersion": "v1", "groups": listed})
        if head == "apis" and len(parts) == 2 and parts[1] in groups:
            body = {
                "kind": "APIGroup",
                "apiVersion": "v1",
                **self.group(parts[1], groups[parts[1]]),
            }
            return json_response(body)
        if (head, len(parts)) in (("api", 2), ("apis", 3)):
            return json_response(self.resource_list("/".join(parts[1:])))
        raise no_such_path()

    def groups(self) -> dict[str, list[str]]:
        """The API groups (not core) and their versions, the preferred one first."""
        found: dict[str, set[str]] = defaultdict(set)
        for group, version, _ in self.store.types:
            if group:
                found[group].add(version)
        return {g: sorted(vs, key=version_priority) for g, vs in found.items()}

    @staticmethod
    def group(name: str, versions: list[str]) -> Obj:
        entries = [{"groupVersion": f"{name}/{v}", "version": v} for v in versions]
        return {"name": name, "versions": entries, "preferredVersion": entries[0]}

    def types_of(self, group_version: str) -> list[ResourceType]:
        return [rt for rt in self.store.types.values() if rt.api_version == group_version]

    def resource_list(self, group_version: str) -> Obj:
        resources = []
        for rt in self.types_of(group_version):
            entry = {
                "name": rt.plural,
                "singularName": rt.singular,
                "namespaced": rt.namespaced,
                "kind": rt.kind,
                "verbs": VERBS,
            }
            entry.update({"shortNames": list(rt.short_names)} if rt.short_names else {})
            entry.update({"categories": list(rt.categories)} if rt.categories else {})
            resources.append(entry)
            for sub in rt.subresources:
                kind, verbs = SUBRESOURCE_DISCOVERY[sub]
                resources.append(
                    {
                        "name": f"{rt.plural}/{sub}",
                        "singularName": "",
                        "namespaced": rt.namespaced,
                        "kind": kind or rt.kind,
                        "verbs": verbs,
                    }
                )
        if not resources:
            raise no_such_path()
        return {
            "kind": "APIResourceList",
            "apiVersion": "v1",
            "groupVersion": group_version,
            "resources": resources,
        }

    def openapi(self, rest: list[str]) -> Obj:
        """Just enough OpenAPI v3 for kubectl: every kind's PATCH takes ``fieldValidation``, so
        kubectl leaves validation to the server (see the module docstring)."""
        if rest == ["v3"]:
            paths = {}
            for gv in sorted({rt.api_version for rt in self.store.types.values()}):
                key = f"apis/{gv}" if "/" in gv else f"api/{gv}"
                text = json.dumps(self.openapi(["v3", *key.split("/")]), sort_keys=True)
                digest = hashlib.sha256(text.encode()).hexdigest().upper()
                paths[key] = {"serverRelativeURL": f"/openapi/v3/{key}?hash={digest}"}
            return {"paths": paths}
        group_version = "/".join(rest[2:])
        types = self.types_of(group_version) if rest[:2] in (["v3", "api"], ["v3", "apis"]) else []
        if not types:
            raise no_such_path()
        prefix = f"/{rest[1]}/{group_version}"
        parameters = [
            {"name": name, "in": "query", "schema": {"type": "string"}}
            for name in ("dryRun", "fieldManager", "fieldValidation")
        ]
        paths = {}
        for rt in types:
            scope = "/namespaces/{namespace}" if rt.namespaced else ""
            gvk = {"group": rt.group, "version": rt.version, "kind": rt.kind}
            paths[f"{prefix}{scope}/{rt.plural}/{{name}}"] = {
                "patch": {
                    "operationId": f"patch{rt.kind}",
                    "parameters": parameters,
                    "responses": {"200": {"description": "OK"}},
                    "x-kubernetes-action": "patch",
                    "x-kubernetes-group-version-kind": gvk,
                }
            }
        info = {"title": "Kubernetes", "version": VERSION_INFO["gitVersion"]}
        return {"openapi": "3.0.0", "info": info, "paths": paths, "components": {"schemas": {}}}

    # ---- the REST verbs

    async def serve(
        self,
        request: web.Request,
        rt: ResourceType,
        namespace: str | None,
        name: str | None,
        sub: str | None,
    ) -> web.StreamResponse:
        store, method, query = self.store, request.method, request.query
        opts = WriteOptions(query.get("dryRun") == "All", query.get("fieldValidation") == "Strict")
        if name is None and method == "GET":
            if parse_bool(query.get("watch")):
                return await self.watch(request, rt, namespace)
            return self.list_response(request, rt, namespace)
        if name is None and method == "POST" and (namespace or not rt.namespaced):
            obj = store.create(rt, namespace, await self.body(request), opts)
            return self.respond(request, rt, obj, 201, opts)
        if name is None and method == "DELETE":
            options, deleted = await self.delete_options(request, opts), []
            for obj in store.list(rt, namespace, self.selector(rt, query)):
                with contextlib.suppress(ApiError):  # e.g. an undeletable namespace
                    meta = obj["metadata"]
                    deleted.append(
                        store.delete(rt, meta.get("namespace"), meta["name"], options, opts)
                    )
            return self.respond_list(request, rt, deleted, {"resourceVersion": str(store.rv)})
        if name and sub in (None, "status") and method in ("GET", "PUT", "PATCH"):
            if method == "GET":
                return self.respond(request, rt, store.get(rt, namespace, name))
            if method == "PUT":
                body = await self.body(request)
                change: Callable[[Obj], Any] = lambda _: body  # noqa: E731
            else:
                change = await self.patcher(request, rt)
            obj = store.update(rt, namespace, name, change, opts, sub)
            return self.respond(request, rt, obj, 200, opts)
        if name and sub is None and method == "DELETE":
            options = await self.delete_options(request, opts)
            obj = store.delete(rt, namespace, name, options, opts)
            # 202 only for an object kept after orphanDependents=false: the real server's quirk
            kept = obj["metadata"].get("deletionTimestamp")
            code = 202 if kept and options.get("orphanDependents") is False else 200
            return self.respond(request, rt, obj, code, opts)
        if sub == "log" and method == "GET":
            return await self.pod_log(request, rt, namespace, name)
        if sub == "binding" and method == "POST":
            return await self.bind(request, rt, namespace, name, opts)
        msg = "the server does not allow this method on the requested resource"
        raise ApiError(405, "MethodNotAllowed", msg, {})

    def shape(self, request: web.Request) -> tuple[str, str]:
        """What the client asked for: "" (objects), "Table" or "PartialObjectMetadata[List]";
        and the meta.k8s.io version. Only JSON is spoken."""
        header = request.headers.get("Accept", "").strip()
        for item in header.split(",") if header else ["*/*"]:
            media, *params = [p.strip() for p in item.split(";")]
            options = dict(p.split("=", 1) for p in params if "=" in p)
            if media not in ("application/json", "application/*", "*/*"):
                continue
            if "as" not in options:
                return "", "v1"
            if options.get("g") == "meta.k8s.io" and options["as"] in (
                "Table",
                "PartialObjectMetadata",
                "PartialObjectMetadataList",
            ):
                return options["as"], options.get("v", "v1")
        raise ApiError(
            406,
            "NotAcceptable",
            "only the following media types are accepted: "
            "application/json, application/yaml, application/vnd.kubernetes.protobuf",
        )

    def render(self, request: web.Request, rt: ResourceType, objs: list[Obj], meta: Obj) -> Obj:
        """Objects as the client asked for them, in a list (or a Table)."""
        shape, version = self.shape(request)
        objs = [present(rt, obj) for obj in objs]
        if shape == "Table":
            include, columns = request.query.get("includeObject", "Metadata"), table_columns(rt)
            rows = []
            for obj in objs:
                rows.append({"cells": [_cell(column, obj) for column in columns]})
                if include != "None":
                    rows[-1]["object"] = (
                        obj if include == "Object" else partial_metadata(obj, version)
                    )
            return {
                "kind": "Table",
                "apiVersion": f"meta.k8s.io/{version}",
                "metadata": meta,
                "columnDefinitions": [c.definition() for c in columns],
                "rows": rows,
            }
        if shape:
            items = [partial_metadata(obj, version) for obj in objs]
            kind, api_version = "PartialObjectMetadataList", f"meta.k8s.io/{version}"
        else:
            items, kind, api_version = objs, rt.list_kind, rt.api_version
        return {"kind": kind, "apiVersion": api_version, "metadata": meta, "items": items}

    def render_one(self, request: web.Request, rt: ResourceType, obj: Obj) -> Obj:
        rendered = self.render(
            request, rt, [obj], {"resourceVersion": obj["metadata"].get("resourceVersion", "")}
        )
        return rendered if rendered["kind"] == "Table" else rendered["items"][0]

    def respond(
        self,
        request: web.Request,
        rt: ResourceType,
        obj: Obj,
        status: int = 200,
        opts: WriteOptions | None = None,
    ) -> web.Response:
        return json_response(self.render_one(request, rt, obj), status, opts and opts.warnings)

    def respond_list(self, request: web.Request, rt: ResourceType, objs: list[Obj], meta: Obj):
        return json_response(self.render(request, rt, objs, meta))

    def selector(self, rt: ResourceType, query: Any) -> Callable[[Obj], bool]:
        labels = label_selector(query.get("labelSelector", ""))
        fields = field_selector(rt, query.get("fieldSelector", ""))
        return lambda obj: labels(obj["metadata"].get("labels") or {}) and fields(obj)

    def list_response(self, request: web.Request, rt: ResourceType, namespace: str | None):
        query = request.query
        items = self.store.list(rt, namespace, self.selector(rt, query))
        meta: Obj = {"resourceVersion": str(self.store.rv)}
        try:
            limit = int(query.get("limit") or 0)
            if query.get("continue"):  # our token: the list's resourceVersion and the last key
                token = json.loads(base64.urlsafe_b64decode(query["continue"]))
                meta["resourceVersion"], start = token["rv"], tuple(token["start"])
                items = [o for o in items if _position(o) > start]
        except (ValueError, KeyError, TypeError):
            raise bad_request("invalid limit or continue parameter") from None
        if 0 < limit < len(items):
            token = {"rv": meta["resourceVersion"], "start": _position(items[limit - 1])}
            meta["continue"] = base64.urlsafe_b64encode(json.dumps(token).encode()).decode()
            meta["remainingItemCount"] = len(items) - limit
            items = items[:limit]
        return self.respond_list(request, rt, items, meta)

    async def watch(self, request: web.Request, rt: ResourceType, namespace: str | None):
        """A watch: one JSON event per line, each sent as it happens."""
        query, loop = request.query, asyncio.get_running_loop()
        selector, bookmarks = self.selector(rt, query), parse_bool(query.get("allowWatchBookmarks"))
        self.shape(request)  # 406 now, not in the stream
        try:
            timeout = float(query.get("timeoutSeconds") or 0)
        except ValueError:
            raise bad_request("invalid timeoutSeconds") from None
        response = web.StreamResponse(headers={"Content-Type": "application/json"})
        response.enable_chunked_encoding()

        async def send(kind: str, obj: Obj) -> None:
            obj = obj if kind in ("ERROR", "BOOKMARK") else self.render_one(request, rt, obj)
            await response.write(json.dumps({"type": kind, "object": obj}).encode() + b"\n")

        def bookmark(rv: int, **annotations: str) -> Obj:
            meta = {"resourceVersion": str(rv)}
            meta.update({"annotations": annotations} if annotations else {})
            return {"kind": rt.kind, "apiVersion": rt.api_version, "metadata": meta}

        try:
            watcher, backlog = self.store.watch(
                rt, namespace, selector, query.get("resourceVersion", "")
            )
        except ApiError as e:
            if e.code != 410:
                raise
            await response.prepare(request)  # as the real server does: 200, then an ERROR event
            await send("ERROR", e.status())
            return response
        started, deadline = self.store.rv, loop.time() + timeout if timeout > 0 else None
        try:
            await response.prepare(request)
            for kind, obj in backlog:
                await send(kind, obj)
            if bookmarks and parse_bool(query.get("sendInitialEvents")):
                end_of_initial_events = {"k8s.io/initial-events-end": "true"}
                await send("BOOKMARK", bookmark(started, **end_of_initial_events))
            while not self.stopping and (deadline is None or loop.time() < deadline):
                wait = BOOKMARK_SECONDS if deadline is None else deadline - loop.time()
                try:
                    event = await asyncio.wait_for(watcher.queue.get(), min(wait, BOOKMARK_SECONDS))
                except TimeoutError:
                    if request.transport is None or request.transport.is_closing():
                        break  # the client went away
                    if bookmarks:  # the queue is empty: everything up to now has been sent
                        await send("BOOKMARK", bookmark(self.store.rv))
                    continue
                if event is None:
                    break
                await send(*event)
        except ConnectionResetError:
            pass
        finally:
            self.store.watchers.discard(watcher)
        return response

    async def body(self, request: web.Request) -> Any:
        raw = await request.read()
        if len(raw) > MAX_REQUEST_BYTES:
            raise ApiError(
                413,
                "RequestEntityTooLarge",
                f"Request entity too large: limit is {MAX_REQUEST_BYTES}",
            )
        if request.content_type == "application/vnd.kubernetes.protobuf":
            return decode_protobuf(raw)
        try:
            return yaml.safe_load(raw) if "yaml" in request.content_type else json.loads(raw)
        except (ValueError, yaml.YAMLError) as e:
            raise bad_request(f"error decoding the request body: {e}") from None

    async def delete_options(self, request: web.Request, opts: WriteOptions) -> Obj:
        raw = await request.read()
        options = await self.body(request) if raw.strip() else {}
        if not isinstance(options, dict):
            raise bad_request("DeleteOptions must be an object")
        query = request.query
        if "propagationPolicy" in query:
            options["propagationPolicy"] = query["propagationPolicy"]
        if "orphanDependents" in query:
            options["orphanDependents"] = parse_bool(query["orphanDependents"])
        opts.dry_run = opts.dry_run or "All" in (options.get("dryRun") or [])
        return options

    async def patcher(self, request: web.Request, rt: ResourceType) -> Callable[[Obj], Any]:
        media = request.content_type
        functions = {
            "application/merge-patch+json": merge_patch,
            "application/json-patch+json": json_patch,
        }
        if rt.crd is None:  # custom resources have no strategic merge patch, as on a real server
            functions["application/strategic-merge-patch+json"] = strategic_merge_patch
        if media not in functions:
            raise ApiError(
                415,
                "UnsupportedMediaType",
                "the body of the request was in an "
                f"unknown format - accepted media types include: {', '.join(functions)}",
            )
        patch = await self.body(request)
        if media != "application/json-patch+json" and not isinstance(patch, dict):
            raise bad_request("the patch must be a JSON object")
        return lambda obj: functions[media](obj, patch)

    async def bind(
        self, request: web.Request, rt: ResourceType, namespace: str, name: str, opts: WriteOptions
    ) -> web.Response:
        """pods/binding, the scheduler's verb: sets spec.nodeName and the PodScheduled condition."""
        node = dig(await self.body(request), "target", "name")
        if not node:
            raise rt.invalid(name, ("target.name", "FieldValueRequired", "Required value"))

        def change(pod: Obj) -> Obj:
            if dig(pod, "spec", "nodeName"):
                why = f'pod {name} is already assigned to node "{pod["spec"]["nodeName"]}"'
                raise rt.conflict(name, why)
            pod.setdefault("spec", {})["nodeName"] = node
            status = pod.setdefault("status", {})
            conditions = [
                c for c in status.get("conditions") or [] if c.get("type") != "PodScheduled"
            ]
            status["conditions"] = [
                *conditions,
                {"type": "PodScheduled", "status": "True", "lastTransitionTime": now_iso()},
            ]
            return pod

        self.store.update(rt, namespace, name, change, opts, "binding")
        body = {
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Success",
            "code": 201,
        }
        return json_response(body, 201)

    async def pod_log(self, request: web.Request, rt: ResourceType, namespace: str, name: str):
        pod, query = self.store.get(rt, namespace, name), request.query
        main = [c.get("name") for c in dig(pod, "spec", "containers") or []]
        known = main + [c.get("name") for c in dig(pod, "spec", "initContainers") or []]
        container = query.get("container")
        if container and container not in known:
            raise bad_request(f"container {container} is not valid for pod {name}")
        if not container and len(main) > 1:
            raise bad_request(
                f"a container name must be specified for pod {name}, choose one "
                f"of: [{' '.join(main)}]"
            )
        key = (namespace, name)
        text = self.store.pod_logs.get(key, "")
        tail = int(query.get("tailLines") or -1)
        shown = (
            text if tail < 0 else "".join(text.splitlines(keepends=True)[-tail:] if tail else [])
        )
        if not parse_bool(query.get("follow")):
            return web.Response(text=shown, content_type="text/plain")
        response = web.StreamResponse(headers={"Content-Type": "text/plain"})
        response.enable_chunked_encoding()
        await response.prepare(request)
        await response.write(shown.encode())
        sent = len(text)
        with contextlib.suppress(ConnectionResetError):
            while not self.stopping:  # until the pod ends or goes
                await asyncio.sleep(0.1)
                text, now = self.store.pod_logs.get(key, ""), self.store.objects[POD_KEY].get(key)
                if len(text) > sent:
                    await response.write(text[sent:].encode())
                    sent = len(text)
                elif dig(now, "metadata", "uid") != pod["metadata"]["uid"] or dig(
                    now, "status", "phase"
                ) in ("Succeeded", "Failed"):
                    break
        return response


def _cell(column: Column, obj: Obj) -> Any:
    try:
        return column.cell(obj)
    except Exception:  # an odd object must not break `kubectl get`
        return None


def _position(obj: Obj) -> tuple[str, str]:
    return (obj["metadata"].get("namespace", ""), obj["metadata"]["name"])


# --------------------------------------------------------------------------------------------
# The server: a background thread with its own event loop, or a foreground process.
# --------------------------------------------------------------------------------------------


class ApiServer:
    """An in-memory Kubernetes API server at ``url``; see the module docstring."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0):
        self.host, self.port = host, port
        self.store = Store()  # only touch it in the server's thread: see call()
        self.api = Api(self.store)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._runner: web.AppRunner | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self) -> ApiServer:
        """Serve from a background thread; returns once listening."""
        if self._thread is not None:
            raise RuntimeError("the server is already running")
        sock = socket.create_server((self.host, self.port), backlog=128)
        self.port = sock.getsockname()[1]
        self.api.stopping = False
        self._loop = asyncio.new_event_loop()
        ready, failure = threading.Event(), []
        self._thread = threading.Thread(
            target=self._serve,
            args=(sock, ready, failure),
            name=f"kube-apiserver:{self.port}",
            daemon=True,
        )
        self._thread.start()
        ready.wait()
        if failure:
            self._thread = None
            raise failure[0]
        return self

    def _serve(self, sock: socket.socket, ready: threading.Event, failure: list) -> None:
        loop = self._loop
        asyncio.set_event_loop(loop)
        self.store.loop = loop
        try:
            app = web.Application(client_max_size=64 * 2**20)
            app.router.add_route("*", "/{path:.*}", self.api.handle)
            self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=1.0)
            loop.run_until_complete(self._runner.setup())
            loop.run_until_complete(web.SockSite(self._runner, sock).start())
            loop.call_soon(ready.set)
            loop.run_forever()
        except BaseException as e:
            failure.append(e)
            ready.set()
        finally:
            loop.close()

    def stop(self) -> None:
        """End the watches cleanly, stop listening, stop the thread. The state is kept: start()
        serves it again."""
        if self._thread is None or self._loop is None:
            return

        async def shutdown() -> None:
            self.api.stopping = True
            self.store.close_watchers()
            await self._runner.cleanup()

        with contextlib.suppress(Exception):
            asyncio.run_coroutine_threadsafe(shutdown(), self._loop).result(timeout=15)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=15)
        self._thread = None

    def call(self, fn: Callable[[], Any]) -> Any:
        """Run ``fn()`` in the server's thread, where the store may be touched; its result."""
        if self._thread is None or threading.current_thread() is self._thread:
            return fn()

        async def run() -> Any:
            return fn()

        return asyncio.run_coroutine_threadsafe(run(), self._loop).result(timeout=15)

    def set_pod_log(self, namespace: str, name: str, text: str, append: bool = False) -> None:
        """Set (or append to) what ``pods/log`` answers for an existing pod."""
        self.call(lambda: self.store.set_pod_log(namespace, name, text, append))

    def write_kubeconfig(self, path: str | Path, namespace: str = "default") -> Path:
        """A kubeconfig for this server: plain HTTP, a dummy token, one current context."""
        context = {"cluster": "emulator", "user": "emulator", "namespace": namespace}
        config = {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [{"name": "emulator", "cluster": {"server": self.url}}],
            "users": [{"name": "emulator", "user": {"token": "emulator-token"}}],
            "contexts": [{"name": "emulator", "context": context}],
            "current-context": "emulator",
        }
        path = Path(path)
        path.write_text(yaml.safe_dump(config, sort_keys=False))
        return path

    def __enter__(self) -> ApiServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m tests.kube.apiserver",
        description=("An in-memory Kubernetes API server for tests."),
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="0 (the default): any free port")
    parser.add_argument("--kubeconfig", help="write a kubeconfig for the server to this file")
    parser.add_argument("--namespace", default="default", help="the kubeconfig's namespace")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    with ApiServer(args.host, args.port) as server:
        if args.kubeconfig:
            server.write_kubeconfig(args.kubeconfig, args.namespace)
        print(f"listening on {server.url}", flush=True)
        while not stop.wait(0.5):
            pass


if __name__ == "__main__":
    main()
