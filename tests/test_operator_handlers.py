"""The operator's reconcilers against a real S3 store and an in-memory Kubernetes API.

``alliance_operator.k8s`` (the only module that calls the API) is replaced by ``FakeCluster``:
dicts of pods, Secrets and custom resources that behave like the API server where the
reconcilers can tell (create returns the stored object with a uid, 409 returns the existing
pod, 404s are None, pods are validated against the Kubernetes 1.37 schemas, deletion can be
graceful). Custom resources are stored the way the API server stores them: CRD defaults applied,
nulls pruned, and every status patch merged in and checked against the CRD's status schema.
kopf's Events are recorded; ``kopf.adopt`` is the real one. The store is the session's real S3
server with a fresh bucket per test.
"""

from __future__ import annotations

import copy
import itertools
import json
import logging
import re
import threading
import time
import uuid

import kopf
import kubernetes_validate
import numpy as np
import pytest
from alliance_operator import k8s, stores
from alliance_operator.config import OperatorConfig
from alliance_operator.constants import (
    ALLIANCES,
    ANNOTATION_ALLIANCES,
    ANNOTATION_CLAIM_MEMBER,
    ANNOTATION_SPEC_HASH,
    ANNOTATION_STORE_ENDPOINT,
    API_VERSION,
    LABEL_ALLIANCE,
    LABEL_COMPONENT,
    LABEL_MEMBER,
    MEMBERS,
    TRAININGRUNS,
)
from alliance_operator.context import Context
from alliance_operator.handlers import alliance as alliance_handler
from alliance_operator.handlers import member as member_handler
from alliance_operator.handlers import trainingrun as run_handler

from alliance import weights
from alliance.s3server import free_port
from alliance.store import Store, StoreConfig, StoreError, run_key
from tests.test_crds import KUBERNETES_VERSION, admit

NS = "federation"
IMAGE = "alliance-member:test"
SECRET = "s3-creds"
LOG = logging.getLogger(__name__)
KINDS = {
    "Alliance": (ALLIANCES, alliance_handler),
    "Member": (MEMBERS, member_handler),
    "TrainingRun": (TRAININGRUNS, run_handler),
}

# --- the fake Kubernetes API -------------------------------------------------------------------


def merge_patch(target, patch):
    """RFC 7386 JSON merge patch (what kopf sends for a status patch)."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    out = dict(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            out.pop(key, None)
        else:
            out[key] = merge_patch(out.get(key), value)
    return out


def matches(labels: dict, selector: str) -> bool:
    """A label selector of equality and existence terms: a=b, a==b, a!=b, a, !a."""
    for term in (t.strip() for t in selector.split(",")):
        if not term:
            continue
        if "!=" in term:
            key, value = term.split("!=", 1)
            if labels.get(key) == value:
                return False
        elif "=" in term:
            key, value = re.split("==?", term, maxsplit=1)
            if labels.get(key) != value:
                return False
        elif term.startswith("!"):
            if term[1:] in labels:
                return False
        elif term not in labels:
            return False
    return True


class FakeCluster:
    """What ``alliance_operator.k8s`` offers, over dicts; every call is logged in ``calls``."""

    def __init__(self):
        self.pods: dict[tuple[str, str], dict] = {}
        #: Secrets as the k8s module returns them: data decoded.
        self.secrets: dict[tuple[str, str], dict] = {}
        self.claims: dict[tuple[str, str], dict] = {}
        self.custom: dict[tuple[str, str, str], dict] = {}
        self.calls: list[tuple] = []
        self.status_patches: list[dict] = []
        #: When True, a deleted pod lingers with a deletionTimestamp until finish_deletions().
        self.graceful = False
        self._versions = itertools.count(1)

    # the k8s module's functions

    def get_pod(self, namespace: str, name: str) -> dict | None:
        self.calls.append(("get_pod", namespace, name))
        return copy.deepcopy(self.pods.get((namespace, name)))

    def list_pods(self, namespace: str, label_selector: str) -> list[dict]:
        self.calls.append(("list_pods", namespace, label_selector))
        return [
            copy.deepcopy(p)
            for (ns, _), p in sorted(self.pods.items())
            if ns == namespace and matches(p["metadata"].get("labels") or {}, label_selector)
        ]

    def create_pod(self, namespace: str, body: dict) -> dict:
        self.calls.append(("create_pod", namespace, body["metadata"]["name"]))
        # What the API server checks before it stores anything.
        assert body["metadata"].get("namespace", namespace) == namespace
        kubernetes_validate.validate(body, KUBERNETES_VERSION, strict=True)
        key = (namespace, body["metadata"]["name"])
        if key in self.pods:  # 409: k8s.create_pod returns the existing pod
            return copy.deepcopy(self.pods[key])
        pod = copy.deepcopy(body)
        pod["metadata"].update(
            namespace=namespace,
            uid=str(uuid.uuid4()),
            resourceVersion=str(next(self._versions)),
            creationTimestamp="2030-01-01T00:00:00Z",
        )
        pod["status"] = {"phase": "Pending", "qosClass": "Burstable"}
        self.pods[key] = pod
        return copy.deepcopy(pod)

    def delete_pod(self, namespace: str, name: str) -> None:
        self.calls.append(("delete_pod", namespace, name))
        pod = self.pods.get((namespace, name))
        if pod is None:
            return
        if self.graceful:
            pod["metadata"].setdefault("deletionTimestamp", "2030-01-01T00:00:30Z")
        else:
            del self.pods[(namespace, name)]

    def get_secret(self, namespace: str, name: str) -> dict | None:
        self.calls.append(("get_secret", namespace, name))
        return copy.deepcopy(self.secrets.get((namespace, name)))

    def create_secret(self, namespace: str, body: dict) -> None:
        self.calls.append(("create_secret", namespace, body["metadata"]["name"]))
        kubernetes_validate.validate(body, KUBERNETES_VERSION, strict=True)
        key = (namespace, body["metadata"]["name"])
        assert key not in self.secrets, "409"
        secret = copy.deepcopy(body)
        secret["metadata"].update(namespace=namespace, uid=str(uuid.uuid4()))
        secret["data"] = secret.pop("stringData")
        self.secrets[key] = secret

    def patch_secret(self, namespace: str, name: str, patch: dict) -> None:
        self.calls.append(("patch_secret", namespace, name))
        secret = self.secrets[(namespace, name)]
        secret["metadata"].setdefault("annotations", {}).update(patch["metadata"]["annotations"])
        secret["data"].update(patch.get("stringData") or {})

    def get_claim(self, namespace: str, name: str) -> dict | None:
        self.calls.append(("get_claim", namespace, name))
        return copy.deepcopy(self.claims.get((namespace, name)))

    def get_custom(self, namespace: str, plural: str, name: str) -> dict | None:
        self.calls.append(("get_custom", namespace, plural, name))
        return copy.deepcopy(self.custom.get((namespace, plural, name)))

    def list_custom(self, namespace: str, plural: str) -> list[dict]:
        self.calls.append(("list_custom", namespace, plural))
        return [
            copy.deepcopy(o)
            for (ns, pl, _), o in sorted(self.custom.items())
            if (ns, pl) == (namespace, plural)
        ]

    def patch_custom_status(self, namespace: str, plural: str, name: str, patch: dict) -> None:
        self.calls.append(("patch_custom_status", namespace, plural, name))
        kind = next(k for k, (pl, _) in KINDS.items() if pl == plural)
        self.patch_status(kind, name, patch)
        self.status_patches.append(copy.deepcopy(patch))

    # test helpers

    def finish_deletions(self) -> None:
        for key in [k for k, p in self.pods.items() if p["metadata"].get("deletionTimestamp")]:
            del self.pods[key]

    def pod(self, name: str) -> dict | None:
        return self.pods.get((NS, name))

    def set_pod_status(self, name: str, status: dict) -> None:
        self.pods[(NS, name)]["status"] = copy.deepcopy(status)

    def apply(self, kind: str, name: str, spec: dict, *, check: bool = True) -> dict:
        """Create or update a custom resource's spec, as `kubectl apply` would (the generation
        moves when the stored spec changes); returns the stored object. A Member's claim is
        made, marked for it, when there is none of that name (as its owner would)."""
        if kind == "Member" and spec.get("dataVolumeClaim"):
            key = (NS, spec["dataVolumeClaim"])
            self.claims.setdefault(
                key,
                {"metadata": {"name": key[1], "annotations": {ANNOTATION_CLAIM_MEMBER: name}}},
            )
        plural = KINDS[kind][0]
        old = self.custom.get((NS, plural, name))
        meta = (
            copy.deepcopy(old["metadata"])
            if old
            else {
                "name": name,
                "namespace": NS,
                "uid": str(uuid.uuid4()),
                "generation": 1,
                "creationTimestamp": "2030-01-01T00:00:00Z",
                "labels": {"team": "ml"},
            }
        )
        body = {"apiVersion": API_VERSION, "kind": kind, "metadata": meta, "spec": spec}
        if old and "status" in old:
            body["status"] = old["status"]
        stored, errors = admit(kind, body)
        if check:
            assert errors == [], errors
        if old and stored["spec"] != old["spec"]:
            stored["metadata"]["generation"] += 1
        stored["metadata"]["resourceVersion"] = str(next(self._versions))
        self.custom[(NS, plural, name)] = stored
        return copy.deepcopy(stored)

    def get(self, kind: str, name: str) -> dict:
        return copy.deepcopy(self.custom[(NS, KINDS[kind][0], name)])

    def delete_custom(self, kind: str, name: str) -> None:
        del self.custom[(NS, KINDS[kind][0], name)]

    def begin_deletion(self, kind: str, name: str) -> None:
        """A delete of an object with finalizers: it stays, with a deletionTimestamp."""
        self.custom[(NS, KINDS[kind][0], name)]["metadata"]["deletionTimestamp"] = (
            "2030-01-01T00:01:00Z"
        )

    def alliance_members(self) -> MemberIndex:
        return MemberIndex(self)

    def patch_status(self, kind: str, name: str, patch: dict) -> None:
        """Merge a status patch in, as the status subresource does, and check the result
        against the CRD (nulls pruned, unknown fields rejected)."""
        key = (NS, KINDS[kind][0], name)
        obj = copy.deepcopy(self.custom[key])
        obj["status"] = merge_patch(obj.get("status") or {}, json.loads(json.dumps(patch)))
        stored, errors = admit(kind, obj)
        # A spec that no longer fits the schema is left alone (validation ratcheting).
        errors = [e for e in errors if e.startswith("status")]
        assert errors == [], f"{kind} status rejected by the CRD: {errors}"
        self.custom[key] = stored


class MemberIndex:
    """kopf's index of Member names by (namespace, alliance), main.alliance_members: Members
    not being deleted. Read live, as kopf keeps it current from the watch."""

    def __init__(self, cluster: FakeCluster):
        self.cluster = cluster

    def get(self, key: tuple[str, str], default=()):
        names = [
            m["metadata"]["name"]
            for (ns, plural, _), m in self.cluster.custom.items()
            if plural == KINDS["Member"][0]
            and (ns, m["spec"].get("alliance")) == key
            and not m["metadata"].get("deletionTimestamp")
        ]
        return names or default


class OneStep:
    """kopf's stop flag for a daemon, set by the first wait: the daemon takes one step."""

    def __init__(self) -> None:
        self.stopped = False

    def __bool__(self) -> bool:
        return self.stopped

    def wait(self, seconds: float | None = None) -> bool:
        self.stopped = True
        return True


class Operator:
    """Runs the handlers the way main.py does, and writes their status patches back."""

    def __init__(self, cluster: FakeCluster, ctx: Context, events: list):
        self.cluster, self.ctx, self.events = cluster, ctx, events

    def reconcile(self, kind: str, name: str, body: dict | None = None) -> dict:
        """One pass: a timer's reconcile, or one step of a TrainingRun's daemon (its loop
        stopped after one look at the store). Returns the status patch written (merged)."""
        stored = self.cluster.get(kind, name) if body is None else body
        raw = copy.deepcopy(stored)
        if kind == "TrainingRun":
            mark = len(self.cluster.status_patches)
            run_handler.daemon(
                self.ctx, kopf.Body(raw), OneStep(), LOG, self.cluster.alliance_members()
            )
            patch = {}
            for written in self.cluster.status_patches[mark:]:
                patch = merge_patch(patch, written) | {
                    k: None for k, v in written.items() if v is None
                }
        else:
            patch = KINDS[kind][1].reconcile(self.ctx, kopf.Body(raw), LOG)
            if patch:
                self.cluster.patch_status(kind, name, patch)
        assert raw == stored, "the handler modified the body kopf handed it"
        return patch

    def status(self, kind: str, name: str) -> dict:
        return self.cluster.get(kind, name).get("status") or {}

    def conditions(self, kind: str, name: str) -> dict[str, dict]:
        return {c["type"]: c for c in self.status(kind, name).get("conditions", [])}

    def condition(self, kind: str, name: str, type_: str) -> tuple[str, str]:
        found = self.conditions(kind, name)[type_]
        return found["status"], found["reason"]

    def new_events(self, since: int) -> list[tuple[str, str, str]]:
        return self.events[since:]


# --- fixtures ----------------------------------------------------------------------------------


@pytest.fixture
def cluster(monkeypatch) -> FakeCluster:
    fake = FakeCluster()
    for name in (
        "get_pod",
        "list_pods",
        "create_pod",
        "delete_pod",
        "get_secret",
        "create_secret",
        "patch_secret",
        "get_claim",
        "get_custom",
        "list_custom",
        "patch_custom_status",
    ):
        monkeypatch.setattr(k8s, name, getattr(fake, name))
    # Nothing may reach a real API server.
    monkeypatch.setattr(k8s, "_api", lambda: pytest.fail("a call went past the fake cluster"))
    return fake


@pytest.fixture
def events(monkeypatch) -> list[tuple[str, str, str]]:
    recorded: list[tuple[str, str, str]] = []

    def event(objs, *, type, reason, message="", backoffs=None):
        assert objs["metadata"]["uid"]  # an Event names its object
        recorded.append((type, reason, message))

    monkeypatch.setattr(kopf, "event", event)
    monkeypatch.setattr(kopf, "info", lambda objs, **kw: event(objs, type="Normal", **kw))
    monkeypatch.setattr(kopf, "warn", lambda objs, **kw: event(objs, type="Warning", **kw))
    return recorded


@pytest.fixture
def ctx() -> Context:
    return Context.from_config(OperatorConfig(store_retry_seconds=2, member_image=IMAGE))


@pytest.fixture
def op(cluster, ctx, events) -> Operator:
    return Operator(cluster, ctx, events)


@pytest.fixture
def bucket() -> str:
    return f"op-{uuid.uuid4().hex[:12]}"


@pytest.fixture
def s3(s3_server, bucket) -> Store:
    """The alliance's bucket, seen from the test (not created: the Alliance creates it)."""
    cfg = s3_server.config
    return Store(StoreConfig(cfg.endpoint, cfg.access_key, cfg.secret_key, bucket), retry_seconds=5)


def secret(name: str, data: dict, annotations: dict | None = None) -> dict:
    meta = {"name": name, "namespace": NS, "annotations": annotations or {}}
    return {"metadata": meta, "data": data}


def good_secret(cluster: FakeCluster, s3_server, name: str = SECRET) -> None:
    """The store's admin keys, marked for the Alliance mnist."""
    cfg = s3_server.config
    cluster.secrets[(NS, name)] = secret(
        name,
        {"accessKey": cfg.access_key, "secretKey": cfg.secret_key},
        {ANNOTATION_ALLIANCES: "other,mnist"},
    )


def claim(cluster: FakeCluster, name: str, member: str | None) -> None:
    """A PersistentVolumeClaim, marked for ``member`` (None: not marked)."""
    annotations = {} if member is None else {ANNOTATION_CLAIM_MEMBER: member}
    cluster.claims[(NS, name)] = {"metadata": {"name": name, "annotations": annotations}}


def alliance_spec(s3_server, bucket: str, store_extra: dict | None = None, **extra) -> dict:
    return {
        "store": {
            "endpoint": s3_server.config.endpoint,
            "bucket": bucket,
            "credentialsSecret": {"name": SECRET},
            **(store_extra or {}),
        },
        **extra,
    }


# --- pod statuses as the kubelet reports them -------------------------------------------------

TRACEBACK = (
    "Traceback (most recent call last):\n"
    '  File "/usr/local/bin/alliance", line 8, in <module>\n'
    "alliance.store.StoreError: put models/x.npz: the store refused: AccessDenied: denied\n"
)
LAST_LINE = "alliance.store.StoreError: put models/x.npz: the store refused: AccessDenied: denied"


def running(restarts: int = 0) -> dict:
    last = (
        {"terminated": {"exitCode": 1, "reason": "Error", "message": TRACEBACK}} if restarts else {}
    )
    return {
        "phase": "Running",
        "conditions": [{"type": "Ready", "status": "True"}],
        "containerStatuses": [
            {
                "name": "agent",
                "ready": True,
                "restartCount": restarts,
                "state": {"running": {"startedAt": "2030-01-01T00:00:05Z"}},
                "lastState": last,
            }
        ],
    }


def crash_looping(restarts: int) -> dict:
    return {
        "phase": "Running",
        "conditions": [{"type": "Ready", "status": "False", "reason": "ContainersNotReady"}],
        "containerStatuses": [
            {
                "name": "agent",
                "ready": False,
                "restartCount": restarts,
                "state": {
                    "waiting": {
                        "reason": "CrashLoopBackOff",
                        "message": "back-off 40s restarting failed container=agent",
                    }
                },
                "lastState": {
                    "terminated": {"exitCode": 1, "reason": "Error", "message": TRACEBACK}
                },
            }
        ],
    }


EVICTED = {
    "phase": "Failed",
    "reason": "Evicted",
    "message": "The node was low on resource: memory.",
    "containerStatuses": [
        {
            "name": "agent",
            "ready": False,
            "restartCount": 0,
            "state": {"terminated": {"exitCode": 137, "reason": "ContainerStatusUnknown"}},
        }
    ],
}

# --- Alliance ----------------------------------------------------------------------------------


def test_alliance_without_its_secret(op, cluster, events, s3_server, bucket):
    cluster.apply("Alliance", "mnist", alliance_spec(s3_server, bucket))
    patch = op.reconcile("Alliance", "mnist")
    conds = op.conditions("Alliance", "mnist")
    assert op.condition("Alliance", "mnist", "StoreReady") == ("False", "SecretNotFound")
    assert conds["StoreReady"]["message"] == (
        f'spec.store.credentialsSecret: Secret "{SECRET}" not found in namespace {NS}'
    )
    assert op.condition("Alliance", "mnist", "ModelReady") == ("Unknown", "WaitingForStore")
    assert op.condition("Alliance", "mnist", "Ready") == ("False", "SecretNotFound")
    assert all(c["observedGeneration"] == 1 for c in conds.values())
    assert patch["observedGeneration"] == 1
    message = conds["StoreReady"]["message"]
    assert ("Warning", "SecretNotFound", f"StoreReady=False: {message}") in events
    assert cluster.pods == {}
    # A second pass learns nothing new: no patch, no Events.
    seen = len(events)
    assert op.reconcile("Alliance", "mnist") == {}
    assert op.new_events(seen) == []


@pytest.mark.parametrize(
    "secret_ref,data,missing",
    [
        ({"name": SECRET}, {"accessKey": "someone"}, "secretKey"),
        ({"name": SECRET}, {"accessKey": "someone", "secretKey": ""}, "secretKey"),
        (
            {"name": SECRET, "accessKeyKey": "AWS_ACCESS_KEY_ID", "secretKeyKey": "AWS_SECRET"},
            {"accessKey": "someone", "secretKey": "something"},
            "AWS_ACCESS_KEY_ID",
        ),
    ],
)
def test_alliance_secret_without_the_key(
    op, cluster, events, s3_server, bucket, secret_ref, data, missing
):
    spec = alliance_spec(s3_server, bucket)
    spec["store"]["credentialsSecret"] = secret_ref
    cluster.apply("Alliance", "mnist", spec)
    cluster.secrets[(NS, SECRET)] = secret(SECRET, data, {ANNOTATION_ALLIANCES: "mnist"})
    op.reconcile("Alliance", "mnist")
    assert op.condition("Alliance", "mnist", "StoreReady") == ("False", "SecretKeyMissing")
    message = op.conditions("Alliance", "mnist")["StoreReady"]["message"]
    assert f'has no key "{missing}"' in message
    assert op.condition("Alliance", "mnist", "Ready") == ("False", "SecretKeyMissing")
    assert any(e[:2] == ("Warning", "SecretKeyMissing") for e in events)
    assert cluster.pods == {}


@pytest.mark.parametrize(
    "annotations,message",
    [
        ({}, 'is not marked for Alliance "mnist"'),
        ({ANNOTATION_ALLIANCES: "mnist-2, other"}, 'is not marked for Alliance "mnist"'),
        (
            {ANNOTATION_ALLIANCES: "mnist", ANNOTATION_STORE_ENDPOINT: "https://s3.example.org"},
            "is for the store https://s3.example.org only",
        ),
    ],
)
def test_a_secret_not_marked_for_the_alliance_is_not_used(
    op, cluster, events, s3_server, bucket, annotations, message
):
    """The confused deputy: an Alliance naming a Secret its owner did not give it (or pointing
    its keys at another endpoint) gets nothing: no store call, no init pod."""
    cfg = s3_server.config
    cluster.apply("Alliance", "mnist", alliance_spec(s3_server, bucket))
    data = {"accessKey": cfg.access_key, "secretKey": cfg.secret_key}
    cluster.secrets[(NS, SECRET)] = secret(SECRET, data, annotations)
    op.reconcile("Alliance", "mnist")
    assert op.condition("Alliance", "mnist", "StoreReady") == ("False", "SecretNotMarked")
    text = op.conditions("Alliance", "mnist")["StoreReady"]["message"]
    assert message in text and cfg.secret_key not in text
    if not annotations:
        assert f"kubectl annotate secret {SECRET} -n {NS} {ANNOTATION_ALLIANCES}=mnist" in text
    assert cluster.pods == {}
    admin = Store(StoreConfig(cfg.endpoint, cfg.access_key, cfg.secret_key, bucket))
    assert not admin._client.bucket_exists(bucket)  # the operator did not use the keys


@pytest.mark.parametrize("where", ["wrong-secret-key", "nobody-listening"])
def test_alliance_unreachable_store_fails_fast(op, cluster, events, s3_server, bucket, s3, where):
    spec = alliance_spec(s3_server, bucket)
    good_secret(cluster, s3_server)
    if where == "wrong-secret-key":
        cluster.secrets[(NS, SECRET)]["data"]["secretKey"] = "not-the-secret-key"
        expected = "SignatureDoesNotMatch"
    else:
        spec["store"]["endpoint"] = f"http://127.0.0.1:{free_port()}"
        expected = "did not answer for 2 s"
    cluster.apply("Alliance", "mnist", spec)
    started = time.monotonic()
    op.reconcile("Alliance", "mnist")
    assert time.monotonic() - started < 6  # the 2 s store retry budget, not minutes
    assert op.condition("Alliance", "mnist", "StoreReady") == ("False", "StoreUnreachable")
    assert expected in op.conditions("Alliance", "mnist")["StoreReady"]["message"]
    assert op.condition("Alliance", "mnist", "ModelReady") == ("Unknown", "WaitingForStore")
    assert op.condition("Alliance", "mnist", "Ready") == ("False", "StoreUnreachable")
    assert any(e[:2] == ("Warning", "StoreUnreachable") for e in events)
    assert cluster.pods == {}
    with pytest.raises(StoreError):  # no bucket was created
        s3.list("")


def test_alliance_lifecycle(op, cluster, events, s3_server, bucket, s3):
    good_secret(cluster, s3_server)
    alliance = cluster.apply("Alliance", "mnist", alliance_spec(s3_server, bucket, seed=7))
    with pytest.raises(StoreError):
        s3.list("")  # no bucket yet

    # 1. The store answers: the bucket is created and the init pod started.
    op.reconcile("Alliance", "mnist")
    assert s3.list("") == []  # the bucket exists, empty
    assert op.condition("Alliance", "mnist", "StoreReady") == ("True", "Connected")
    assert bucket in op.conditions("Alliance", "mnist")["StoreReady"]["message"]
    assert op.condition("Alliance", "mnist", "ModelReady") == ("False", "Initializing")
    assert op.condition("Alliance", "mnist", "Ready") == ("False", "Initializing")
    pod = cluster.pod("mnist-init")
    assert pod is not None
    assert pod["metadata"]["namespace"] == NS
    assert pod["metadata"]["ownerReferences"] == [
        {
            "apiVersion": API_VERSION,
            "kind": "Alliance",
            "name": "mnist",
            "uid": alliance["metadata"]["uid"],
            "controller": True,
            "blockOwnerDeletion": True,
        }
    ]
    assert pod["metadata"]["labels"][LABEL_COMPONENT] == "init"
    assert pod["metadata"]["labels"][LABEL_ALLIANCE] == "mnist"
    assert pod["spec"]["containers"][0]["args"][:3] == ["init", "--seed", "7"]
    assert pod["spec"]["containers"][0]["image"] == IMAGE
    assert ("Normal", "Connected") in [e[:2] for e in events]

    # 2. Still initialising: nothing changes, nothing is created twice.
    seen = len(events)
    assert op.reconcile("Alliance", "mnist") == {}
    assert op.new_events(seen) == []
    assert [c for c in cluster.calls if c[0] == "create_pod"] == [("create_pod", NS, "mnist-init")]

    # 3. The init pod crash-loops: ModelReady says why, with the last line of its log.
    cluster.set_pod_status("mnist-init", crash_looping(restarts=3))
    op.reconcile("Alliance", "mnist")
    assert op.condition("Alliance", "mnist", "ModelReady") == ("False", "InitFailed")
    message = op.conditions("Alliance", "mnist")["ModelReady"]["message"]
    assert message.startswith("pod mnist-init: CrashLoopBackOff: ")
    assert f"exit code 1: {LAST_LINE}" in message
    assert op.condition("Alliance", "mnist", "Ready") == ("False", "InitFailed")
    assert op.conditions("Alliance", "mnist")["Ready"]["message"] == message
    assert ("Warning", "InitFailed", f"ModelReady=False: {message}") in events
    assert cluster.pod("mnist-init") is not None  # a crash-looping pod is left to retry

    # 4. The bucket is initialised: Ready, the seed model in status, the init pod gone.
    s3.put_alliance(
        {"model": {"kind": "builtin", "name": "cnn"}, "seedModelId": "ab" * 32, "parameters": 10}
    )
    seen = len(events)
    patch = op.reconcile("Alliance", "mnist")
    status = op.status("Alliance", "mnist")
    assert status["seedModelId"] == patch["seedModelId"] == "ab" * 32
    assert op.condition("Alliance", "mnist", "StoreReady") == ("True", "Connected")
    assert op.condition("Alliance", "mnist", "ModelReady") == ("True", "Initialized")
    assert op.conditions("Alliance", "mnist")["ModelReady"]["message"] == (
        "cnn with 10 parameters, seed model abababababab"
    )
    assert op.condition("Alliance", "mnist", "Ready") == ("True", "Ready")
    assert status["observedGeneration"] == 1
    assert cluster.pod("mnist-init") is None
    assert ("Normal", "Initialized") in [e[:2] for e in op.new_events(seen)]
    # Ready summarises the others: it has no Event of its own.
    assert "Ready" not in [e[1] for e in op.new_events(seen)]

    # 5. Idempotent: an identical pass writes nothing and says nothing.
    seen = len(events)
    assert op.reconcile("Alliance", "mnist") == {}
    assert op.new_events(seen) == []
    assert cluster.pod("mnist-init") is None


def test_alliance_failed_init_pod_is_replaced(op, cluster, events, s3_server, bucket):
    good_secret(cluster, s3_server)
    cluster.apply("Alliance", "mnist", alliance_spec(s3_server, bucket))
    op.reconcile("Alliance", "mnist")
    first = cluster.pod("mnist-init")["metadata"]["uid"]
    cluster.set_pod_status("mnist-init", EVICTED)
    op.reconcile("Alliance", "mnist")
    assert op.condition("Alliance", "mnist", "ModelReady") == ("False", "InitFailed")
    assert (
        "Evicted: The node was low on resource: memory."
        in (op.conditions("Alliance", "mnist")["ModelReady"]["message"])
    )
    assert cluster.pod("mnist-init") is None  # deleted: the next pass tries again
    op.reconcile("Alliance", "mnist")
    assert cluster.pod("mnist-init")["metadata"]["uid"] != first
    assert op.condition("Alliance", "mnist", "ModelReady") == ("False", "Initializing")


def test_alliance_picks_up_a_secret_created_later(op, cluster, s3_server, bucket, monkeypatch):
    monkeypatch.setattr(stores, "SECRET_TTL_SECONDS", 0.2)
    cluster.apply("Alliance", "mnist", alliance_spec(s3_server, bucket))
    op.reconcile("Alliance", "mnist")
    assert op.condition("Alliance", "mnist", "StoreReady") == ("False", "SecretNotFound")
    good_secret(cluster, s3_server)
    time.sleep(0.3)  # the cached "no such Secret" expires
    op.reconcile("Alliance", "mnist")
    assert op.condition("Alliance", "mnist", "StoreReady") == ("True", "Connected")


def test_a_healthy_start_emits_no_warning(op, cluster, events, s3_server, bucket, s3):
    good_secret(cluster, s3_server)
    cluster.apply("Alliance", "mnist", alliance_spec(s3_server, bucket))
    cluster.apply("Member", "hospital-a", {"alliance": "mnist", "dataVolumeClaim": "data-a"})
    op.reconcile("Alliance", "mnist")
    op.reconcile("Member", "hospital-a")
    cluster.set_pod_status("hospital-a-agent", {"phase": "Pending"})
    op.reconcile("Member", "hospital-a")
    cluster.set_pod_status("hospital-a-agent", running())
    s3.put_heartbeat("hospital-a", {"state": "ready", "trainRows": 600, "testRows": 200})
    op.reconcile("Member", "hospital-a")
    assert op.condition("Member", "hospital-a", "Ready") == ("True", "Ready")
    assert [e for e in events if e[0] == "Warning"] == []


# --- Member ------------------------------------------------------------------------------------

MEMBER = "hospital-a"
POD = "hospital-a-agent"


@pytest.fixture
def alliance(cluster, s3_server, bucket, s3) -> dict:
    """An Alliance whose store is reachable (its bucket exists)."""
    good_secret(cluster, s3_server)
    s3.ensure_bucket()
    return cluster.apply("Alliance", "mnist", alliance_spec(s3_server, bucket))


def member_spec(**extra) -> dict:
    return {"alliance": "mnist", "dataVolumeClaim": "hospital-a-data", **extra}


def test_member_without_its_alliance(op, cluster, events, s3_server, bucket, s3):
    cluster.apply("Member", MEMBER, member_spec())
    op.reconcile("Member", MEMBER)
    status = op.status("Member", MEMBER)
    assert op.condition("Member", MEMBER, "AllianceFound") == ("False", "AllianceNotFound")
    assert op.condition("Member", MEMBER, "Ready") == ("False", "AllianceNotFound")
    assert status["phase"] == "Pending"
    assert status["message"] == 'waiting for Alliance "mnist"'
    assert cluster.pods == {}
    assert ("Warning", "AllianceNotFound") in [e[:2] for e in events]
    seen = len(events)
    assert op.reconcile("Member", MEMBER) == {}
    assert op.new_events(seen) == []

    # The Alliance appears: the next pass starts the agent.
    good_secret(cluster, s3_server)
    s3.ensure_bucket()
    cluster.apply("Alliance", "mnist", alliance_spec(s3_server, bucket))
    op.reconcile("Member", MEMBER)
    assert op.condition("Member", MEMBER, "AllianceFound") == ("True", "Found")
    assert cluster.pod(POD) is not None


def test_member_lifecycle(op, cluster, events, alliance, s3):
    member = cluster.apply("Member", MEMBER, member_spec())

    # 1. The agent's pod is created, owned by the Member, bound to its claim.
    op.reconcile("Member", MEMBER)
    pod = cluster.pod(POD)
    assert pod is not None
    assert pod["metadata"]["ownerReferences"] == [
        {
            "apiVersion": API_VERSION,
            "kind": "Member",
            "name": MEMBER,
            "uid": member["metadata"]["uid"],
            "controller": True,
            "blockOwnerDeletion": True,
        }
    ]
    assert pod["metadata"]["namespace"] == NS
    assert pod["metadata"]["labels"][LABEL_MEMBER] == MEMBER
    assert pod["metadata"]["labels"][LABEL_ALLIANCE] == "mnist"
    (claim,) = [v for v in pod["spec"]["volumes"] if "persistentVolumeClaim" in v]
    assert claim["persistentVolumeClaim"] == {"claimName": "hospital-a-data", "readOnly": True}
    status = op.status("Member", MEMBER)
    assert status["pod"] == POD
    assert status["phase"] == "Starting"
    assert status["restarts"] == 0
    assert op.condition("Member", MEMBER, "AllianceFound") == ("True", "Found")
    assert op.condition("Member", MEMBER, "PodReady")[0] == "False"
    assert op.condition("Member", MEMBER, "DataReady") == ("Unknown", "NoHeartbeat")
    assert ("Normal", "PodCreated", f"created pod {POD}") in events

    # 2. The pod runs and the agent found valid data: Ready.
    cluster.set_pod_status(POD, running())
    s3.put_heartbeat(MEMBER, {"state": "ready", "trainRows": 600, "testRows": 200})
    op.reconcile("Member", MEMBER)
    status = op.status("Member", MEMBER)
    assert op.condition("Member", MEMBER, "PodReady") == ("True", "Running")
    assert op.condition("Member", MEMBER, "DataReady") == ("True", "Valid")
    assert op.condition("Member", MEMBER, "Ready") == ("True", "Ready")
    assert (status["trainRows"], status["testRows"]) == (600, 200)
    assert (status["phase"], status["message"]) == ("Ready", "taking work")
    seen, mark = len(events), len(cluster.calls)
    assert op.reconcile("Member", MEMBER) == {}
    assert op.new_events(seen) == []
    assert [c for c in cluster.calls[mark:] if c[0] in ("create_pod", "delete_pod")] == []

    # 3. The agent reports invalid data: DataReady says exactly what it said.
    message = "train.csv: line 3, column '1x1': not a number: 'abc' (rule: numeric)"
    s3.put_heartbeat(
        MEMBER,
        {
            "state": "invalid",
            "message": message,
            "error": {"file": "train.csv", "line": 3, "column": "1x1", "rule": "numeric"},
        },
    )
    seen = len(events)
    op.reconcile("Member", MEMBER)
    status = op.status("Member", MEMBER)
    assert op.condition("Member", MEMBER, "DataReady") == ("False", "InvalidData")
    assert op.conditions("Member", MEMBER)["DataReady"]["message"] == message
    assert op.condition("Member", MEMBER, "Ready") == ("False", "InvalidData")
    assert (status["phase"], status["message"]) == ("InvalidData", message)
    assert ("Warning", "InvalidData", f"DataReady=False: {message}") in op.new_events(seen)

    # 4. The agent crash-loops: PodReady says so, restarts are counted, each one an Event.
    s3.put_heartbeat(MEMBER, {"state": "ready", "trainRows": 600, "testRows": 200})
    cluster.set_pod_status(POD, crash_looping(restarts=2))
    seen = len(events)
    op.reconcile("Member", MEMBER)
    status = op.status("Member", MEMBER)
    assert op.condition("Member", MEMBER, "PodReady") == ("False", "CrashLoopBackOff")
    assert f"exit code 1: {LAST_LINE}" in op.conditions("Member", MEMBER)["PodReady"]["message"]
    assert op.condition("Member", MEMBER, "Ready") == ("False", "CrashLoopBackOff")
    assert status["restarts"] == 2
    assert status["phase"] == "CrashLoopBackOff"
    restarted = [e for e in op.new_events(seen) if e[1] == "AgentRestarted"]
    assert restarted == [
        ("Warning", "AgentRestarted", f"pod {POD} restarted (2 restarts): exit code 1: {LAST_LINE}")
    ]
    seen = len(events)
    op.reconcile("Member", MEMBER)  # no new restart: no Event
    assert [e for e in op.new_events(seen) if e[1] == "AgentRestarted"] == []
    cluster.set_pod_status(POD, crash_looping(restarts=3))
    op.reconcile("Member", MEMBER)
    assert [e[1] for e in op.new_events(seen)].count("AgentRestarted") == 1
    assert op.status("Member", MEMBER)["restarts"] == 3

    # 5. The pod is evicted: deleted with a Warning; the next pass creates a new one.
    first_uid = cluster.pod(POD)["metadata"]["uid"]
    cluster.set_pod_status(POD, EVICTED)
    seen = len(events)
    op.reconcile("Member", MEMBER)
    assert cluster.pod(POD) is None
    assert (
        "Warning",
        "PodFailed",
        f"pod {POD}: Evicted: The node was low on resource: memory.",
    ) in op.new_events(seen)
    assert op.condition("Member", MEMBER, "PodReady") == ("False", "Evicted")
    assert op.status("Member", MEMBER)["phase"] == "Evicted"
    op.reconcile("Member", MEMBER)
    assert cluster.pod(POD)["metadata"]["uid"] != first_uid
    assert ("Normal", "PodCreated", f"created pod {POD}") in op.new_events(seen)
    cluster.set_pod_status(POD, running())
    op.reconcile("Member", MEMBER)
    assert op.status("Member", MEMBER)["restarts"] == 0
    assert op.condition("Member", MEMBER, "Ready") == ("True", "Ready")


def test_member_spec_change_replaces_the_pod(op, cluster, events, alliance, s3):
    cluster.graceful = True  # a deleted pod terminates for a while, as on a real node
    cluster.apply("Member", MEMBER, member_spec())
    op.reconcile("Member", MEMBER)
    cluster.set_pod_status(POD, running())
    s3.put_heartbeat(MEMBER, {"state": "ready", "trainRows": 600, "testRows": 200})
    op.reconcile("Member", MEMBER)
    old_hash = cluster.pod(POD)["metadata"]["annotations"][ANNOTATION_SPEC_HASH]

    resources = {"requests": {"cpu": "2", "memory": "2Gi"}, "limits": {"cpu": 4, "memory": "8Gi"}}
    assert (
        cluster.apply("Member", MEMBER, member_spec(resources=resources))["metadata"]["generation"]
        == 2
    )
    seen = len(events)
    op.reconcile("Member", MEMBER)
    assert (
        "Normal",
        "PodReplaced",
        f"the spec or the store keys changed: replacing {POD}",
    ) in op.new_events(seen)
    assert cluster.pod(POD)["metadata"].get("deletionTimestamp")

    # While the old pod terminates, nothing is created or deleted.
    mark = len(cluster.calls)
    op.reconcile("Member", MEMBER)
    assert [c for c in cluster.calls[mark:] if c[0] in ("create_pod", "delete_pod")] == []
    assert op.condition("Member", MEMBER, "PodReady") == ("False", "Terminating")

    # Once it is gone, the new pod is created with the new spec.
    cluster.finish_deletions()
    op.reconcile("Member", MEMBER)
    pod = cluster.pod(POD)
    assert pod["spec"]["containers"][0]["resources"] == {  # quantities as strings in the pod
        "requests": {"cpu": "2", "memory": "2Gi"},
        "limits": {"cpu": "4", "memory": "8Gi"},
    }
    assert pod["metadata"]["annotations"][ANNOTATION_SPEC_HASH] != old_hash
    assert op.status("Member", MEMBER)["observedGeneration"] == 2
    assert all(c["observedGeneration"] == 2 for c in op.conditions("Member", MEMBER).values())
    # ... and a pass with the same spec leaves it alone.
    cluster.set_pod_status(POD, running())
    mark = len(cluster.calls)
    op.reconcile("Member", MEMBER)
    assert [c for c in cluster.calls[mark:] if c[0] in ("create_pod", "delete_pod")] == []
    assert op.condition("Member", MEMBER, "Ready") == ("True", "Ready")


def test_member_whose_store_is_unavailable(op, cluster, s3_server, bucket, s3, monkeypatch):
    """Without the store there are no member keys, so no pod yet: it starts once they exist."""
    cluster.apply("Alliance", "mnist", alliance_spec(s3_server, bucket))  # no Secret
    cluster.apply("Member", MEMBER, member_spec())
    op.reconcile("Member", MEMBER)
    assert cluster.pod(POD) is None
    assert op.condition("Member", MEMBER, "CredentialsReady") == ("False", "SecretNotFound")
    assert op.condition("Member", MEMBER, "Ready") == ("False", "SecretNotFound")
    assert op.condition("Member", MEMBER, "DataReady") == ("Unknown", "StoreUnreachable")
    message = op.conditions("Member", MEMBER)["DataReady"]["message"]
    assert message.startswith("cannot read the agent's heartbeat: ")
    assert f'Secret "{SECRET}" not found' in message
    monkeypatch.setattr(stores, "SECRET_TTL_SECONDS", 0)  # the cached "no such Secret" expires
    good_secret(cluster, s3_server)
    s3.ensure_bucket()
    op.reconcile("Member", MEMBER)
    assert op.condition("Member", MEMBER, "CredentialsReady") == ("True", "Issued")
    assert cluster.pod(POD) is not None


def test_member_with_a_stale_heartbeat_is_not_ready(cluster, events, alliance, s3):
    op = Operator(
        cluster,
        Context.from_config(OperatorConfig(store_retry_seconds=2, heartbeat_timeout=1.0)),
        events,
    )
    cluster.apply("Member", MEMBER, member_spec())
    op.reconcile("Member", MEMBER)
    cluster.set_pod_status(POD, running())
    s3.put_heartbeat(MEMBER, {"state": "ready", "trainRows": 600, "testRows": 200})
    op.reconcile("Member", MEMBER)
    assert op.condition("Member", MEMBER, "Ready") == ("True", "Ready")
    time.sleep(2.5)  # well past the 1 s heartbeat timeout, even at 1 s mtime resolution
    seen = len(events)
    op.reconcile("Member", MEMBER)
    assert op.condition("Member", MEMBER, "Ready") == ("False", "HeartbeatStale")
    assert op.status("Member", MEMBER)["phase"] == "Unresponsive"
    assert [e[:2] for e in op.new_events(seen)] == [("Warning", "HeartbeatStale")]
    seen = len(events)
    op.reconcile("Member", MEMBER)  # still stale: no second Warning
    assert op.new_events(seen) == []


# --- TrainingRun -------------------------------------------------------------------------------

RUN = "mnist-fedavg"
RUN_DEFAULTS = {"localEpochs": 2, "batchSize": 16, "roundDeadlineSeconds": 300}


def run_spec(**extra) -> dict:
    return {"alliance": "mnist", **extra}


@pytest.fixture
def seed(s3) -> str:
    s3.ensure_bucket()
    return s3.put_model([np.zeros((2, 2), np.float32)])


@pytest.fixture
def federation(op, cluster, s3_server, bucket, s3, seed) -> dict:
    """An initialised Alliance (with runDefaults) and two Members whose agents run and are
    ready, with 600 training and 200 test rows each."""
    good_secret(cluster, s3_server)
    s3.put_alliance(
        {"model": {"kind": "builtin", "name": "cnn"}, "seedModelId": seed, "parameters": 4}
    )
    cluster.apply(
        "Alliance", "mnist", alliance_spec(s3_server, bucket, runDefaults=dict(RUN_DEFAULTS))
    )
    op.reconcile("Alliance", "mnist")
    assert op.condition("Alliance", "mnist", "Ready") == ("True", "Ready")
    for name in ("m1", "m2"):
        cluster.apply("Member", name, {"alliance": "mnist", "dataVolumeClaim": f"{name}-data"})
        op.reconcile("Member", name)
        cluster.set_pod_status(f"{name}-agent", running())
        s3.put_heartbeat(name, {"state": "ready", "trainRows": 600, "testRows": 200})
        op.reconcile("Member", name)
        assert op.condition("Member", name, "Ready") == ("True", "Ready")
    return {"seed": seed}


def task_key(store_run: str) -> str:
    return f"tasks/{store_run}.json"


def test_run_without_its_alliance(op, cluster, events):
    cluster.apply("TrainingRun", RUN, run_spec())
    op.reconcile("TrainingRun", RUN)
    status = op.status("TrainingRun", RUN)
    assert op.condition("TrainingRun", RUN, "AllianceFound") == ("False", "AllianceNotFound")
    assert status["phase"] == "Pending"
    assert status["message"] == 'waiting for Alliance "mnist"'
    assert ("Warning", "AllianceNotFound") in [e[:2] for e in events]
    seen = len(events)
    assert op.reconcile("TrainingRun", RUN) == {}
    assert op.new_events(seen) == []


def test_run_waits_for_the_store_and_the_seed_model(op, cluster, events, s3_server, bucket, s3):
    cluster.apply("Alliance", "mnist", alliance_spec(s3_server, bucket))
    cluster.apply("TrainingRun", RUN, run_spec())
    op.reconcile("TrainingRun", RUN)  # no Secret yet
    assert op.condition("TrainingRun", RUN, "AllianceFound") == ("True", "Found")
    assert op.condition("TrainingRun", RUN, "StoreReady") == ("False", "SecretNotFound")
    assert op.status("TrainingRun", RUN)["message"].startswith("store unavailable: spec.store")
    assert ("Warning", "SecretNotFound") in [e[:2] for e in events]

    good_secret(cluster, s3_server)
    s3.ensure_bucket()
    op.ctx.stores = stores.Stores(retry_seconds=2)  # forget the cached missing Secret
    op.reconcile("TrainingRun", RUN)
    status = op.status("TrainingRun", RUN)
    assert op.condition("TrainingRun", RUN, "StoreReady") == ("True", "Connected")
    assert (status["phase"], status["round"]) == ("Pending", 0)
    assert status["message"] == "waiting for the alliance's seed model"
    assert op.condition("TrainingRun", RUN, "Progressing") == ("False", "Pending")
    assert op.condition("TrainingRun", RUN, "Completed") == ("False", "Pending")
    assert not s3.exists(task_key(status["storeRun"]))

    # Initialised, but no member is ready yet.
    s3.put_alliance({"model": {"kind": "builtin"}, "seedModelId": "ab" * 32, "parameters": 4})
    op.reconcile("TrainingRun", RUN)
    assert op.status("TrainingRun", RUN)["message"] == "waiting for members: 0 of 1 ready"
    assert op.status("TrainingRun", RUN)["phase"] == "Pending"


@pytest.mark.parametrize(
    "bad,field,schema_ok",
    [
        # Refused by the CRD's CEL rule today; stored under an older CRD, the engine refuses it.
        ({"minMembers": 3, "membersPerRound": 2}, "minMembers", False),
        # Past the CRD's enum (e.g. stored under an older CRD).
        ({"aggregator": "fedsomething"}, "aggregator", False),
        # Only the engine knows each aggregator's parameters.
        ({"aggregator": "median", "aggregatorParams": {"trimFraction": 0.1}}, "aggregator", True),
    ],
)
def test_run_with_an_invalid_spec_then_fixed(
    op, cluster, events, federation, s3, bad, field, schema_ok
):
    cluster.apply("TrainingRun", RUN, run_spec(**bad), check=schema_ok)
    op.reconcile("TrainingRun", RUN)
    status = op.status("TrainingRun", RUN)
    invalid = op.conditions("TrainingRun", RUN)["Invalid"]
    assert (invalid["status"], invalid["reason"]) == ("True", "InvalidSpec")
    assert invalid["message"].startswith(f"spec.{field}: ")
    assert status["phase"] == "Failed"
    assert status["message"] == invalid["message"]
    assert status["observedGeneration"] == 1
    assert ("Warning", "InvalidSpec", f"Invalid=True: {invalid['message']}") in events
    store_run = run_handler.store_run(cluster.get("TrainingRun", RUN))
    assert s3.list(f"runs/{store_run}/") == []  # nothing was started
    assert not s3.exists(task_key(store_run))

    # Invalid and terminal, same generation: only reads (the Alliance's runDefaults may have
    # been fixed since), no write, no Event.
    mark, seen = len(cluster.calls), len(events)
    assert op.reconcile("TrainingRun", RUN) == {}
    assert {c[0] for c in cluster.calls[mark:]} <= {"get_custom"}
    assert op.new_events(seen) == []

    # Fixed (a new generation): valid again, and the run starts afresh.
    fixed = cluster.apply("TrainingRun", RUN, run_spec(minMembers=2))
    assert fixed["metadata"]["generation"] == 2
    op.reconcile("TrainingRun", RUN)
    status = op.status("TrainingRun", RUN)
    assert op.condition("TrainingRun", RUN, "Invalid") == ("False", "Valid")
    assert status["observedGeneration"] == 2
    assert status["phase"] == "Running"
    assert status["round"] == 1
    assert status["finishedAt"] == 0
    assert s3.get_json(run_key(store_run, "spec.json"))["minMembers"] == 2
    assert s3.get_json(task_key(store_run))["members"] == ["m1", "m2"]


def test_run_defaults_fill_what_the_run_leaves_unset(op, cluster, federation, s3):
    cluster.apply("TrainingRun", RUN, run_spec(batchSize=8, rounds=2))
    op.reconcile("TrainingRun", RUN)
    store_run = op.status("TrainingRun", RUN)["storeRun"]
    pinned = s3.get_json(run_key(store_run, "spec.json"))
    assert pinned["localEpochs"] == 2  # runDefaults
    assert pinned["roundDeadlineSeconds"] == 300  # runDefaults
    assert pinned["batchSize"] == 8  # the run's own, over runDefaults' 16
    assert pinned["rounds"] == 2
    assert pinned["aggregator"] == "fedavg"  # neither: the engine's default
    task = s3.get_json(task_key(store_run))
    assert (task["epochs"], task["batchSize"]) == (2, 8)


def update(s3: Store, store_run: str, member: str, value: float = 1.0) -> None:
    arrays = [np.full((2, 2), value, np.float32)]
    meta = {"numExamples": 600, "loss": 0.5, "accuracy": 0.8, "seconds": 1.5}
    s3.put_update(store_run, 1, member, weights.dumps(arrays), meta)


def test_run_rounds_with_a_member_lost(op, cluster, events, federation, s3, ctx):
    run = cluster.apply("TrainingRun", RUN, run_spec(rounds=1))
    store_run = f"{RUN}-{run['metadata']['uid'][:8]}"

    # 1. Two ready members: round 1 starts on both.
    op.reconcile("TrainingRun", RUN)
    status = op.status("TrainingRun", RUN)
    assert status["storeRun"] == store_run
    assert (status["phase"], status["round"], status["stage"]) == ("Running", 1, "Training")
    assert status["selected"] == ["m1", "m2"]
    assert status["modelId"] == federation["seed"]
    task = s3.get_json(task_key(store_run))
    assert task["members"] == ["m1", "m2"]
    assert (task["run"], task["round"], task["kind"]) == (store_run, 1, "train")
    assert task["modelId"] == federation["seed"]
    assert op.condition("TrainingRun", RUN, "StoreReady") == ("True", "Connected")
    assert op.condition("TrainingRun", RUN, "Progressing") == ("True", "RoundInProgress")
    assert op.condition("TrainingRun", RUN, "Completed") == ("False", "Running")
    assert op.condition("TrainingRun", RUN, "Invalid") == ("False", "Valid")
    assert ("Normal", "Started") in [e[:2] for e in events]

    # 2. m1 answers; m2 is still awaited (its pod runs, the deadline is 300 s away).
    update(s3, store_run, "m1")
    op.reconcile("TrainingRun", RUN)
    status = op.status("TrainingRun", RUN)
    assert status["stage"] == "Training"
    assert status["message"] == "round 1: training, 1 of 2 updates in"

    # 3. m2's pod fails: the Member handler sees it (and replaces the pod); for the run it is
    # lost at once, dropped from the round, which moves on.
    cluster.set_pod_status("m2-agent", EVICTED)
    op.reconcile("Member", "m2")
    assert ctx.losses.lost(NS, "mnist") == {"m2"}
    op.reconcile("TrainingRun", RUN)
    status = op.status("TrainingRun", RUN)
    (record,) = status["history"]
    assert record["dropped"] == ["m2"]
    assert record["members"] == ["m1"]
    assert record["numExamples"] == 600
    assert status["stage"] == "Validating"
    assert status["validators"] == ["m1"]  # a lost member does not validate either
    assert status["modelId"] not in (None, federation["seed"])
    task = s3.get_json(task_key(store_run))
    assert (task["kind"], task["members"]) == ("validate", ["m1"])

    # 4. m1's score comes in: the run is complete, its task withdrawn.
    s3.put_result(
        store_run,
        1,
        "validations",
        "m1",
        {"accuracy": 0.75, "loss": 0.6, "numExamples": 200, "seconds": 0.5},
    )
    seen = len(events)
    op.reconcile("TrainingRun", RUN)
    status = op.status("TrainingRun", RUN)
    assert status["phase"] == "Completed"
    assert "stage" not in status  # null: dropped from the stored status
    assert (status["accuracy"], status["loss"]) == (0.75, 0.6)
    assert status["history"][0]["accuracy"] == 0.75
    assert status["finishedAt"] > 0
    assert op.condition("TrainingRun", RUN, "Completed") == ("True", "AllRoundsDone")
    assert op.condition("TrainingRun", RUN, "Progressing") == ("False", "Completed")
    assert not s3.exists(task_key(store_run))
    page = s3.get_bytes(f"runs/{store_run}/report.html").decode()  # the run's report page
    assert "<svg" in page and "m1" in page
    new = op.new_events(seen)
    (done,) = [e for e in new if e[1] == "RoundCompleted"]
    assert done[0] == "Normal"
    assert done[2].startswith("round 1: accuracy 0.7500, 1 members, 1 dropped, ")
    assert ("Normal", "Completed", "completed 1 rounds, accuracy 0.7500") in new

    # 5. Terminal and the same generation: {} without a single API or store call.
    mark, seen = len(cluster.calls), len(events)
    ctx.stores.for_alliance = lambda *a: pytest.fail("the store was used")
    assert op.reconcile("TrainingRun", RUN) == {}
    assert cluster.calls[mark:] == [] and op.new_events(seen) == []


def _started_run(op, cluster, s3, policy: str) -> str:
    cluster.apply("TrainingRun", RUN, run_spec(storeCleanupPolicy=policy))
    op.reconcile("TrainingRun", RUN)
    store_run = op.status("TrainingRun", RUN)["storeRun"]
    update(s3, store_run, "m1")
    assert s3.exists(task_key(store_run))
    assert s3.exists(run_key(store_run, "spec.json"))
    return store_run


@pytest.mark.parametrize("policy", ["Delete", "Retain"])
def test_cleanup(op, cluster, federation, s3, ctx, policy):
    store_run = _started_run(op, cluster, s3, policy)
    body = cluster.get("TrainingRun", RUN)
    before = {o.key for o in s3.list(f"runs/{store_run}/")}
    assert len(before) == 2  # spec.json and m1's update
    run_handler.cleanup(ctx, kopf.Body(body), LOG)
    assert not s3.exists(task_key(store_run))
    after = {o.key for o in s3.list(f"runs/{store_run}/")}
    assert after == (set() if policy == "Delete" else before)
    assert s3.exists(f"models/{federation['seed']}.npz")  # shared models stay
    assert s3.exists("alliance.json")


def test_cleanup_without_the_alliance_or_its_store(op, cluster, federation, s3, ctx):
    store_run = _started_run(op, cluster, s3, "Delete")
    body = kopf.Body(cluster.get("TrainingRun", RUN))
    del cluster.secrets[(NS, SECRET)]
    ctx.stores = stores.Stores(retry_seconds=2)  # no cached Secret
    with pytest.raises(kopf.TemporaryError, match="cannot clean up the store"):
        run_handler.cleanup(ctx, body, LOG)
    assert s3.exists(task_key(store_run))
    cluster.delete_custom("Alliance", "mnist")
    run_handler.cleanup(ctx, body, LOG)  # nothing to clean: done, no error
    assert s3.exists(task_key(store_run))


def test_an_invalid_edit_of_a_running_run_does_not_leave_its_task_behind(
    op, cluster, federation, s3
):
    cluster.apply("TrainingRun", RUN, run_spec())
    op.reconcile("TrainingRun", RUN)
    store_run = op.status("TrainingRun", RUN)["storeRun"]
    assert s3.exists(task_key(store_run))
    cluster.apply("TrainingRun", RUN, run_spec(aggregatorParams={"serverLearningRate": 0.1}))
    op.reconcile("TrainingRun", RUN)
    failed = op.status("TrainingRun", RUN)["phase"] == "Failed"
    assert not (failed and s3.exists(task_key(store_run)))


def test_a_run_pass_with_nothing_new_writes_nothing(op, cluster, federation):
    cluster.apply("TrainingRun", RUN, run_spec())
    op.reconcile("TrainingRun", RUN)
    assert op.status("TrainingRun", RUN)["stage"] == "Training"
    assert op.reconcile("TrainingRun", RUN) == {}


def test_a_run_invalid_through_run_defaults_recovers_when_the_alliance_is_fixed(
    op, cluster, s3_server, bucket, federation
):
    spec = alliance_spec(s3_server, bucket, runDefaults={"aggregatorParams": {"beta1": 0.8}})
    cluster.apply("Alliance", "mnist", spec)
    cluster.apply("TrainingRun", RUN, run_spec())
    op.reconcile("TrainingRun", RUN)
    assert op.condition("TrainingRun", RUN, "Invalid") == ("True", "InvalidSpec")
    cluster.apply("Alliance", "mnist", alliance_spec(s3_server, bucket, runDefaults={}))
    op.reconcile("TrainingRun", RUN)
    assert op.condition("TrainingRun", RUN, "Invalid") == ("False", "Valid")
    assert op.status("TrainingRun", RUN)["phase"] == "Running"


def test_edits_apply_until_round_one_and_are_reported_ignored_after(
    op, cluster, events, federation, s3, seed
):
    # Pending (one member only is ready, minMembers 2): an edit still applies.
    s3.put_heartbeat("m2", {"state": "starting"})
    cluster.apply("TrainingRun", RUN, run_spec(minMembers=2, rounds=2))
    op.reconcile("TrainingRun", RUN)
    status = op.status("TrainingRun", RUN)
    assert status["phase"] == "Pending"
    cluster.apply("TrainingRun", RUN, run_spec(minMembers=2, rounds=3))
    op.reconcile("TrainingRun", RUN)
    pinned = s3.get_json(run_key(status["storeRun"], "spec.json"))
    assert pinned["rounds"] == 3
    # Started: the spec is pinned; a valid edit is reported as ignored, once.
    s3.put_heartbeat("m2", {"state": "ready", "trainRows": 600, "testRows": 200})
    time.sleep(1.1)  # the coordinator re-lists heartbeats at most once a second
    op.reconcile("TrainingRun", RUN)
    assert op.status("TrainingRun", RUN)["round"] == 1
    cluster.apply("TrainingRun", RUN, run_spec(minMembers=2, rounds=5))
    seen = len(events)
    op.reconcile("TrainingRun", RUN)
    assert ("Warning", "SpecChangeIgnored") in [e[:2] for e in op.new_events(seen)]
    assert s3.get_json(run_key(status["storeRun"], "spec.json"))["rounds"] == 3
    seen = len(events)
    op.reconcile("TrainingRun", RUN)
    assert op.new_events(seen) == []


class Stopper(threading.Event):
    """kopf's stop flag for a sync daemon: true once set, and wait() returns whether it is."""

    def __bool__(self) -> bool:
        return self.is_set()


def test_the_daemon_moves_the_run_as_soon_as_the_last_update_lands(
    op, cluster, ctx, events, federation, s3
):
    """The daemon drives the run in one loop (alliance.driver.drive): it looks at the store
    every run_interval (0.05 s) and writes the status as the run moves, until stopped."""
    cluster.apply("TrainingRun", RUN, run_spec())
    op.reconcile("TrainingRun", RUN)
    store_run = op.status("TrainingRun", RUN)["storeRun"]
    update(s3, store_run, "m1")
    stopped = Stopper()
    body = kopf.Body(cluster.get("TrainingRun", RUN))
    daemon = threading.Thread(
        target=run_handler.daemon,
        args=(ctx, body, stopped, LOG, cluster.alliance_members()),
    )
    daemon.start()
    try:
        time.sleep(0.5)
        assert op.status("TrainingRun", RUN)["stage"] == "Training"  # m2 still training
        update(s3, store_run, "m2")
        landed = time.monotonic()
        while op.status("TrainingRun", RUN)["stage"] != "Validating":
            assert time.monotonic() - landed < 2.0, op.status("TrainingRun", RUN)
            time.sleep(0.01)
        moved = time.monotonic() - landed
    finally:
        stopped.set()
        daemon.join(timeout=10)
    assert not daemon.is_alive(), "the daemon did not stop when told"
    assert moved < 1.0, moved  # a poll (0.05 s) and the aggregation, not a timer's interval


def test_a_member_deleted_mid_round_is_dropped_at_once(op, cluster, ctx, federation, s3):
    # Not after the heartbeat timeout (60 s): the Member's deletion reaches the runs at once.
    cluster.apply("TrainingRun", RUN, run_spec())
    op.reconcile("TrainingRun", RUN)
    store_run = op.status("TrainingRun", RUN)["storeRun"]
    update(s3, store_run, "m1")
    cluster.begin_deletion("Member", "m2")
    op.reconcile("TrainingRun", RUN)
    status = op.status("TrainingRun", RUN)
    assert status["stage"] == "Validating"
    assert status["history"][0]["dropped"] == ["m2"] and status["validators"] == ["m1"]


def test_an_alliance_deleted_mid_run_pauses_the_run_until_it_is_back(
    op, cluster, events, federation, s3
):
    cluster.apply("TrainingRun", RUN, run_spec())
    op.reconcile("TrainingRun", RUN)
    store_run = op.status("TrainingRun", RUN)["storeRun"]
    spec = cluster.get("Alliance", "mnist")["spec"]
    cluster.delete_custom("Alliance", "mnist")
    seen = len(events)
    op.reconcile("TrainingRun", RUN)
    status = op.status("TrainingRun", RUN)
    assert op.condition("TrainingRun", RUN, "AllianceFound") == ("False", "AllianceNotFound")
    assert op.conditions("TrainingRun", RUN)["AllianceFound"]["message"] == (
        'Alliance "mnist" not found; the run is paused in round 1 until it is back'
    )
    assert (status["phase"], status["round"], status["stage"]) == ("Running", 1, "Training")
    assert ("Warning", "AllianceNotFound") in [e[:2] for e in op.new_events(seen)]

    cluster.apply("Alliance", "mnist", spec)  # back: the run goes on where it was
    for member in ("m1", "m2"):
        update(s3, store_run, member)
    op.reconcile("TrainingRun", RUN)
    status = op.status("TrainingRun", RUN)
    assert op.condition("TrainingRun", RUN, "AllianceFound") == ("True", "Found")
    assert (status["round"], status["stage"]) == (1, "Validating")
    assert status["history"][0]["members"] == ["m1", "m2"]


def test_member_data_warnings_keep_data_ready_true_with_their_reason(
    op, cluster, events, alliance, s3
):
    cluster.apply("Member", MEMBER, member_spec())
    op.reconcile("Member", MEMBER)
    cluster.set_pod_status(POD, running())
    warning = (
        "/data/train.csv has one label only (all 600 rows are one class): this member's updates "
        "pull the model"
    )
    beat = {"state": "ready", "trainRows": 600, "testRows": 200, "warnings": [warning]}
    s3.put_heartbeat(MEMBER, beat)
    op.reconcile("Member", MEMBER)
    assert op.condition("Member", MEMBER, "DataReady") == ("True", "ValidWithWarnings")
    message = op.conditions("Member", MEMBER)["DataReady"]["message"]
    assert message == f"600 training rows, 200 test rows; warning: {warning}"
    assert op.condition("Member", MEMBER, "Ready") == ("True", "Ready")
    assert [e for e in events if e[0] == "Warning"] == []

    # The heartbeat is the member's word: at most 5 warnings, each cut to 300 characters ...
    s3.put_heartbeat(MEMBER, {**beat, "warnings": ["x" * 1000] * 9})
    op.reconcile("Member", MEMBER)
    message = op.conditions("Member", MEMBER)["DataReady"]["message"]
    assert message == "600 training rows, 200 test rows; warnings: " + "; ".join(
        ["x" * 299 + "…"] * 5
    )
    # ... and anything but a list of strings is no warning at all.
    for bad in ("not a list", [1, 2], {"a": "b"}, [warning, None]):
        s3.put_heartbeat(MEMBER, {**beat, "warnings": bad})
        op.reconcile("Member", MEMBER)
        assert op.condition("Member", MEMBER, "DataReady") == ("True", "Valid"), bad


def test_refused_results_are_in_the_history_and_a_warning_event(
    op, cluster, events, federation, s3
):
    cluster.apply("TrainingRun", RUN, run_spec(rounds=1, minMembers=1))
    op.reconcile("TrainingRun", RUN)
    store_run = op.status("TrainingRun", RUN)["storeRun"]
    update(s3, store_run, "m1")
    update(s3, store_run, "m2", value=float("nan"))
    op.reconcile("TrainingRun", RUN)
    for member, accuracy in (("m1", 0.75), ("m2", 50.0)):  # m2 lies about its score too
        s3.put_result(
            store_run, 1, "validations", member, {"accuracy": accuracy, "numExamples": 200}
        )
    op.reconcile("TrainingRun", RUN)
    status = op.status("TrainingRun", RUN)
    assert status["phase"] == "Completed" and status["accuracy"] == 0.75
    reason = (
        "update rejected: array 0 has 4 non-finite values (NaN or Inf); "
        "validation rejected: accuracy 50.0 is not [0, 1]"
    )
    assert status["history"][0]["rejected"] == {"m2": reason}
    assert ("Warning", "ResultsRejected", f"round 1: m2: {reason}") in events


def test_a_heartbeat_that_is_not_one_reads_as_invalid_data(op, cluster, alliance, s3):
    cluster.apply("Member", MEMBER, member_spec())
    op.reconcile("Member", MEMBER)
    cluster.set_pod_status(POD, running())
    for content, why in (
        ([1, 2], "expected a JSON object, got list"),
        ({"state": "ready", "trainRows": "lots"}, "trainRows must be an integer in [0, "),
        ({"state": "hacked"}, "state must be starting, ready, invalid or stopped, got 'hacked'"),
    ):
        s3.put_bytes(f"members/{MEMBER}.json", json.dumps(content).encode())
        op.reconcile("Member", MEMBER)  # no exception: the member's word is checked
        assert op.condition("Member", MEMBER, "DataReady") == ("False", "InvalidData")
        message = op.conditions("Member", MEMBER)["DataReady"]["message"]
        assert message.startswith(f"the agent's heartbeat is refused: {why}"), message
        assert op.condition("Member", MEMBER, "Ready") == ("False", "InvalidData")


# --- a member's own store identity, claims, remote members (issue 11) ---------------------------


def member_keys(cluster: FakeCluster, name: str = MEMBER) -> StoreConfig:
    secret = cluster.secrets[(NS, f"{name}-store")]
    data = secret["data"]
    endpoint = cluster.get("Alliance", "mnist")["spec"]["store"]["endpoint"]
    bucket = cluster.get("Alliance", "mnist")["spec"]["store"]["bucket"]
    return StoreConfig(endpoint, data["accessKey"], data["secretKey"], bucket)


def test_a_member_gets_its_own_keys_that_write_only_its_objects(op, cluster, events, alliance, s3):
    member = cluster.apply("Member", MEMBER, member_spec())
    cluster.apply("Member", "hospital-b", member_spec(dataVolumeClaim="hospital-b-data"))
    op.reconcile("Member", MEMBER)
    op.reconcile("Member", "hospital-b")
    assert op.condition("Member", MEMBER, "CredentialsReady") == ("True", "Issued")
    secret = cluster.secrets[(NS, f"{MEMBER}-store")]
    (owner,) = secret["metadata"]["ownerReferences"]
    assert owner["uid"] == member["metadata"]["uid"] and owner["kind"] == "Member"
    keys = member_keys(cluster)
    assert keys.access_key != s3.config.access_key and keys.secret_key != s3.config.secret_key
    # The pod gets this Secret and nothing of the Alliance's.
    env = {e["name"]: e for e in cluster.pod(POD)["spec"]["containers"][0]["env"]}
    assert env["ALLIANCE_S3_SECRET_KEY"]["valueFrom"]["secretKeyRef"]["name"] == f"{MEMBER}-store"
    assert SECRET not in json.dumps(cluster.pod(POD))
    assert ("Normal", "CredentialsIssued") in [e[:2] for e in events]
    # The keys work for its own objects and are refused for b's.
    mine = Store(keys, retry_seconds=2)
    mine.put_heartbeat(MEMBER, {"state": "ready", "trainRows": 5, "testRows": 0})
    with pytest.raises(StoreError, match="AccessDenied"):
        mine.put_heartbeat("hospital-b", {"state": "ready", "trainRows": 5, "testRows": 0})
    # A second pass changes nothing: same keys, same pod.
    seen, pod_uid = len(events), cluster.pod(POD)["metadata"]["uid"]
    op.reconcile("Member", MEMBER)
    assert member_keys(cluster) == keys and cluster.pod(POD)["metadata"]["uid"] == pod_uid
    assert "CredentialsIssued" not in [e[1] for e in op.new_events(seen)]


def test_rotating_a_members_keys_replaces_its_pod_and_revokes_the_old_key(
    op, cluster, events, alliance, s3
):
    cluster.apply("Member", MEMBER, member_spec())
    op.reconcile("Member", MEMBER)
    old_keys, old_hash = member_keys(cluster), cluster.pod(POD)["metadata"]["annotations"]
    cluster.custom[(NS, MEMBERS, MEMBER)]["metadata"]["annotations"] = {
        "alliance.dev/rotate-credentials": "2030-01-02"
    }
    op.reconcile("Member", MEMBER)  # new keys; the old pod goes
    new_keys = member_keys(cluster)
    assert new_keys.secret_key != old_keys.secret_key
    assert ("Normal", "PodReplaced") in [e[:2] for e in events]
    with pytest.raises(StoreError, match=r"SignatureDoesNotMatch|InvalidAccessKeyId"):
        Store(old_keys, retry_seconds=1).put_heartbeat(MEMBER, {"state": "ready"})
    Store(new_keys, retry_seconds=2).put_heartbeat(MEMBER, {"state": "ready"})
    op.reconcile("Member", MEMBER)  # the new pod, with a new digest
    assert cluster.pod(POD)["metadata"]["annotations"] != old_hash
    op.reconcile("Member", MEMBER)
    assert member_keys(cluster) == new_keys  # once per new annotation value


def test_the_store_losing_a_members_user_or_a_service_account_is_repaired(
    op, cluster, events, alliance, s3
):
    from alliance import identities

    cluster.apply("Member", MEMBER, member_spec())
    op.reconcile("Member", MEMBER)
    identities.remove(s3.config, MEMBER)  # e.g. the store was reinstalled
    op.reconcile("Member", MEMBER)
    Store(member_keys(cluster), retry_seconds=2).put_heartbeat(MEMBER, {"state": "ready"})
    assert any("lost the member's user" in e[2] for e in events)


def test_a_deleted_member_loses_its_store_user(op, cluster, alliance, s3):
    cluster.apply("Member", MEMBER, member_spec())
    op.reconcile("Member", MEMBER)
    keys = member_keys(cluster)
    body = cluster.get("Member", MEMBER)
    member_handler.deleted(op.ctx, body, LOG)
    with pytest.raises(StoreError, match="InvalidAccessKeyId"):
        Store(keys, retry_seconds=1).put_heartbeat(MEMBER, {"state": "ready"})
    member_handler.deleted(op.ctx, body, LOG)  # again: done


def test_a_secret_of_the_members_name_that_is_not_its_own_is_left_alone(
    op, cluster, events, alliance
):
    cluster.secrets[(NS, f"{MEMBER}-store")] = secret(f"{MEMBER}-store", {"token": "theirs"})
    cluster.apply("Member", MEMBER, member_spec())
    op.reconcile("Member", MEMBER)
    assert op.condition("Member", MEMBER, "CredentialsReady") == ("False", "SecretConflict")
    assert op.condition("Member", MEMBER, "Ready") == ("False", "SecretConflict")
    assert cluster.secrets[(NS, f"{MEMBER}-store")]["data"] == {"token": "theirs"}
    assert cluster.pod(POD) is None


@pytest.mark.parametrize(
    "claim_owner,reason,message",
    [
        ("hospital-b", "ClaimNotMarked", 'is marked for Member "hospital-b", not this one'),
        (None, "ClaimNotMarked", "kubectl annotate pvc hospital-b-data -n federation"),
        ("missing", "ClaimNotFound", 'PersistentVolumeClaim "hospital-b-data" not found'),
    ],
)
def test_a_member_may_mount_only_a_claim_marked_for_it(
    op, cluster, events, alliance, claim_owner, reason, message
):
    """The spy: a Member naming another member's claim (or one nobody marked) gets no pod."""
    if claim_owner != "missing":
        claim(cluster, "hospital-b-data", claim_owner)
    cluster.apply("Member", "spy", member_spec(dataVolumeClaim="hospital-b-data"))
    if claim_owner == "missing":
        del cluster.claims[(NS, "hospital-b-data")]  # apply made one, as an owner would
    op.reconcile("Member", "spy")
    assert op.condition("Member", "spy", "ClaimAllowed") == ("False", reason)
    assert op.condition("Member", "spy", "Ready") == ("False", reason)
    assert message in op.conditions("Member", "spy")["ClaimAllowed"]["message"]
    assert op.status("Member", "spy")["phase"] == "Refused"
    assert cluster.pod("spy-agent") is None
    assert ("Warning", reason) in [e[:2] for e in events]


def test_a_pod_whose_claim_is_no_longer_marked_for_it_is_deleted(op, cluster, alliance):
    cluster.apply("Member", MEMBER, member_spec())
    op.reconcile("Member", MEMBER)
    assert cluster.pod(POD) is not None
    claim(cluster, "hospital-a-data", "someone-else")
    op.reconcile("Member", MEMBER)
    assert cluster.pod(POD) is None
    assert op.condition("Member", MEMBER, "PodReady") == ("False", "ClaimNotMarked")


def test_a_remote_member_gets_a_join_bundle_and_no_pod(op, cluster, events, s3_server, bucket, s3):
    import yaml

    from alliance import contract

    good_secret(cluster, s3_server)
    s3.ensure_bucket()
    remote_url = "https://store.example.org:9443"
    spec = alliance_spec(s3_server, bucket, store_extra={"remoteEndpoint": remote_url})
    cluster.apply("Alliance", "mnist", spec)
    cluster.apply("Member", MEMBER, {"alliance": "mnist", "remote": True})
    op.reconcile("Member", MEMBER)
    assert cluster.pod(POD) is None
    conds = op.conditions("Member", MEMBER)
    assert "PodReady" not in conds and "ClaimAllowed" not in conds
    assert op.condition("Member", MEMBER, "CredentialsReady") == ("True", "Issued")
    assert op.condition("Member", MEMBER, "DataReady") == ("Unknown", "NoHeartbeat")
    data = cluster.secrets[(NS, f"{MEMBER}-store")]["data"]
    bundle = contract.read_join_bundle(yaml.safe_load(data["bundle.yaml"]))
    assert bundle["member"] == MEMBER and bundle["alliance"] == "mnist"
    assert bundle["endpoint"] == remote_url and bundle["bucket"] == bucket
    assert (bundle["access_key"], bundle["secret_key"]) == (data["accessKey"], data["secretKey"])
    # Its agent, wherever it runs, reports through the store with these keys: Ready.
    keys = StoreConfig(
        s3_server.config.endpoint, bundle["access_key"], bundle["secret_key"], bucket
    )
    Store(keys, retry_seconds=2).put_heartbeat(
        MEMBER, {"state": "ready", "trainRows": 600, "testRows": 200}
    )
    op.reconcile("Member", MEMBER)
    assert op.condition("Member", MEMBER, "Ready") == ("True", "Ready")
    assert op.status("Member", MEMBER)["trainRows"] == 600


def test_provided_member_keys_are_only_checked_and_used(op, cluster, s3_server, bucket, s3):
    """memberKeys: Provided (an S3 service without MinIO's admin API): the store's admin made
    the user and the Secret; the operator makes none, and uses the Secret once it is marked."""
    from alliance import identities

    good_secret(cluster, s3_server)
    s3.ensure_bucket()
    spec = alliance_spec(s3_server, bucket, store_extra={"memberKeys": "Provided"})
    cluster.apply("Alliance", "mnist", spec)
    cluster.apply("Member", MEMBER, member_spec())
    op.reconcile("Member", MEMBER)
    assert op.condition("Member", MEMBER, "CredentialsReady") == ("False", "SecretNotFound")
    assert "alliance identities policy" in op.conditions("Member", MEMBER)["Ready"]["message"]
    assert cluster.pod(POD) is None and not identities.exists(s3.config, MEMBER)
    (keys,) = identities.provision(s3.config, [MEMBER]).values()  # the admin, by hand
    data = {"accessKey": keys.access_key, "secretKey": keys.secret_key}
    cluster.secrets[(NS, f"{MEMBER}-store")] = secret(f"{MEMBER}-store", data)
    op.reconcile("Member", MEMBER)
    assert op.condition("Member", MEMBER, "CredentialsReady") == ("False", "SecretNotMarked")
    cluster.secrets[(NS, f"{MEMBER}-store")]["metadata"]["annotations"] = {
        ANNOTATION_CLAIM_MEMBER: MEMBER
    }
    op.reconcile("Member", MEMBER)
    assert op.condition("Member", MEMBER, "CredentialsReady") == ("True", "Issued")
    assert cluster.secrets[(NS, f"{MEMBER}-store")]["data"] == data  # untouched
    assert cluster.pod(POD) is not None
    member_handler.deleted(op.ctx, cluster.get("Member", MEMBER), LOG)
    assert identities.exists(s3.config, MEMBER)  # the admin's to remove


@pytest.fixture(scope="module")
def tls_store(tmp_path_factory):
    """The gateway serving https with a certificate of a CA of its own."""
    import trustme

    from alliance.s3server import TLS, S3Server

    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1")
    tls = TLS(
        cert_chain="".join(p.bytes().decode() for p in cert.cert_chain_pems),
        private_key=cert.private_key_pem.bytes().decode(),
        ca_cert=ca.cert_pem.bytes().decode(),
    )
    with S3Server(tmp_path_factory.mktemp("s3-tls"), tls=tls) as server:
        yield server


def test_an_https_store_is_verified_with_the_alliances_ca_and_members_get_it(
    op, cluster, tls_store, bucket
):
    """spec.store.caSecret: the operator verifies the store with it (and with nothing else),
    and each member's Secret and pod carry it."""
    cfg = tls_store.config
    good_secret(cluster, tls_store)
    spec = alliance_spec(tls_store, bucket, store_extra={"caSecret": {"name": "store-ca"}})
    cluster.apply("Alliance", "mnist", spec)
    op.reconcile("Alliance", "mnist")  # no CA Secret yet
    assert op.condition("Alliance", "mnist", "StoreReady") == ("False", "SecretNotFound")
    ca_secret = secret("store-ca", {"ca.crt": cfg.ca_cert}, {ANNOTATION_ALLIANCES: "mnist"})
    cluster.secrets[(NS, "store-ca")] = ca_secret
    op.ctx.stores._secrets.clear()  # past the operator's Secret cache
    op.reconcile("Alliance", "mnist")
    assert op.condition("Alliance", "mnist", "StoreReady") == ("True", "Connected")
    cluster.apply("Member", MEMBER, member_spec())
    op.reconcile("Member", MEMBER)
    assert op.condition("Member", MEMBER, "CredentialsReady") == ("True", "Issued")
    data = cluster.secrets[(NS, f"{MEMBER}-store")]["data"]
    assert data["ca.crt"] == cfg.ca_cert
    keys = StoreConfig(cfg.endpoint, data["accessKey"], data["secretKey"], bucket, data["ca.crt"])
    Store(keys, retry_seconds=2).put_heartbeat(MEMBER, {"state": "ready"})
    env = {e["name"]: e for e in cluster.pod(POD)["spec"]["containers"][0]["env"]}
    assert env["ALLIANCE_S3_CA_FILE"]["value"].endswith("/ca.crt")
