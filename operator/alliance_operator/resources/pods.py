"""The pods the operator runs: a Member's agent and an Alliance's one-off initialisation.

Both run the member image's ``alliance`` command: the agent with the member's own store keys
(its Secret, resources/secrets.py), the initialisation with the Alliance's. They verify an
https store with the CA from those Secrets. They are hardened the same way: non-root, read-only
root filesystem, no capabilities, no service-account token (members need no Kubernetes API
rights: the store is their only channel), writable scratch space only in emptyDirs.
"""

from __future__ import annotations

import copy
import hashlib
import json

from alliance import contract
from alliance_operator.constants import (
    ANNOTATION_CREDENTIALS,
    ANNOTATION_SPEC_HASH,
    CA_MOUNT_PATH,
    CACHE_MOUNT_PATH,
    DATA_MOUNT_PATH,
    LABEL_ALLIANCE,
    LABEL_COMPONENT,
    LABEL_MEMBER,
    MANAGED_BY,
    MEMBER_METRICS_PORT,
    TMP_MOUNT_PATH,
)

#: Used when a Member sets no resources: enough for the built-in CNN on MNIST-sized data. The
#: CPU limit also sizes the agent's TensorFlow thread pools (ALLIANCE_CPU_THREADS).
DEFAULT_MEMBER_RESOURCES = {
    "requests": {"cpu": "500m", "memory": "1Gi"},
    "limits": {"cpu": "2", "memory": "4Gi"},
}


def _quantities(resources: dict) -> dict:
    """Limits and requests with every quantity a string: the CRD admits ``cpu: 2`` (int or
    string), the kubernetes client refuses an int in a Pod."""
    return {kind: {k: str(v) for k, v in values.items()} for kind, values in resources.items()}


INIT_RESOURCES = {
    "requests": {"cpu": "250m", "memory": "512Mi"},
    "limits": {"cpu": "1", "memory": "2Gi"},
}


#: A pod's name is its hostname, and label values have the same limit: a DNS label.
MAX_NAME = 63


def short_name(name: str, suffix: str = "") -> str:
    """``name + suffix`` within 63 characters: a custom resource's name may have 253, so a long
    one keeps its head and gets a digest of the whole, which keeps distinct names distinct."""
    if len(name) + len(suffix) <= MAX_NAME:
        return name + suffix
    digest = hashlib.sha256(name.encode()).hexdigest()[:8]
    head = name[: MAX_NAME - len(suffix) - len(digest) - 1].rstrip("-.")
    return f"{head}-{digest}{suffix}"


def member_pod_name(member: str) -> str:
    return short_name(member, "-agent")


def init_pod_name(alliance: str) -> str:
    return short_name(alliance, "-init")


def labels(component: str, alliance: str, member: str | None = None) -> dict[str, str]:
    out = {
        "app.kubernetes.io/name": "alliance",
        "app.kubernetes.io/part-of": "alliance",
        "app.kubernetes.io/managed-by": MANAGED_BY,
        LABEL_COMPONENT: component,
        LABEL_ALLIANCE: short_name(alliance),
    }
    if member is not None:
        out[LABEL_MEMBER] = short_name(member)
    return out


def store_env(store: dict, secret: str, access_key: str, secret_key: str) -> list[dict]:
    """The store's endpoint and bucket, and the keys from ``secret``, as the agent's variables."""

    def from_secret(key: str) -> dict:
        return {"secretKeyRef": {"name": secret, "key": key}}

    return [
        {"name": contract.ENV_S3_ENDPOINT, "value": store["endpoint"]},
        {"name": contract.ENV_BUCKET, "value": store["bucket"]},
        {"name": contract.ENV_S3_ACCESS_KEY, "valueFrom": from_secret(access_key)},
        {"name": contract.ENV_S3_SECRET_KEY, "valueFrom": from_secret(secret_key)},
    ]


def ca_file(secret: str, key: str) -> tuple[dict, dict, dict]:
    """The store's CA, ``key`` of ``secret``, as a file: (volume, mount, variable)."""
    volume = {
        "name": "store-ca",
        "secret": {"secretName": secret, "items": [{"key": key, "path": "ca.crt"}]},
    }
    mount = {"name": "store-ca", "mountPath": CA_MOUNT_PATH, "readOnly": True}
    env = {"name": contract.ENV_S3_CA_FILE, "value": f"{CA_MOUNT_PATH}/ca.crt"}
    return volume, mount, env


def _runtime_env() -> list[dict]:
    return [
        # The root filesystem is read-only: every library that writes under $HOME (Keras,
        # matplotlib) writes to the scratch emptyDir instead.
        {"name": "HOME", "value": TMP_MOUNT_PATH},
        {"name": "PYTHONUNBUFFERED", "value": "1"},
        # TensorFlow sizes its thread pools from this: the pod's CPU limit, not the node's
        # cores (several members on one node would otherwise oversubscribe it).
        {
            "name": contract.ENV_CPU_THREADS,
            "valueFrom": {"resourceFieldRef": {"containerName": "agent", "resource": "limits.cpu"}},
        },
    ]


def _pod_security(run_as_user: int) -> dict:
    return {
        "runAsNonRoot": True,
        "runAsUser": run_as_user,
        "runAsGroup": run_as_user,
        "fsGroup": run_as_user,
        # Re-own the data volume only when its root is not already ours: a recursive chown of
        # a large dataset on every start would be slow.
        "fsGroupChangePolicy": "OnRootMismatch",
        "seccompProfile": {"type": "RuntimeDefault"},
    }


def _container_security() -> dict:
    return {
        "allowPrivilegeEscalation": False,
        "readOnlyRootFilesystem": True,
        "runAsNonRoot": True,
        "capabilities": {"drop": ["ALL"]},
    }


def _scratch_volumes() -> tuple[list[dict], list[dict]]:
    volumes = [{"name": "tmp", "emptyDir": {}}]
    mounts = [{"name": "tmp", "mountPath": TMP_MOUNT_PATH}]
    return volumes, mounts


def spec_hash(pod: dict) -> str:
    """A short digest of what the operator asked for; a change replaces the pod."""
    meta = pod["metadata"]
    annotations = {k: v for k, v in meta["annotations"].items() if k != ANNOTATION_SPEC_HASH}
    what = {"spec": pod["spec"], "labels": meta["labels"], "annotations": annotations}
    payload = json.dumps(what, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def _pod(name: str, pod_labels: dict, spec: dict, annotations: dict | None = None) -> dict:
    pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "labels": pod_labels, "annotations": dict(annotations or {})},
        "spec": spec,
    }
    pod["metadata"]["annotations"][ANNOTATION_SPEC_HASH] = spec_hash(pod)
    return pod


def member_pod(
    member: str,
    member_spec: dict,
    alliance_spec: dict,
    default_image: str,
    image_pull_policy: str = "IfNotPresent",
    run_as_user: int = 10001,
    *,
    credentials_secret: str,
    credentials_digest: str,
    has_ca: bool = False,
) -> dict:
    """The pod of a Member's agent, bound read-only to the Member's data claim, with the
    member's own keys from ``credentials_secret`` (whose content has ``credentials_digest``:
    new keys replace the pod, as a running container never sees a changed Secret)."""
    args = contract.member_args(
        member,
        DATA_MOUNT_PATH,
        log_level="info",
        validator=bool(member_spec.get("validator")),
        train_command=member_spec.get("trainCommand"),
        validate_command=member_spec.get("validateCommand"),
    )
    env = [
        *store_env(
            alliance_spec["store"],
            credentials_secret,
            contract.SECRET_ACCESS_KEY,
            contract.SECRET_SECRET_KEY,
        ),
        # Parsed CSV data is cached here between restarts of the container.
        {"name": contract.ENV_CACHE_DIR, "value": CACHE_MOUNT_PATH},
        # The agent's Prometheus metrics (the only port it listens on; it serves nothing else).
        {"name": contract.ENV_METRICS_PORT, "value": str(MEMBER_METRICS_PORT)},
        *_runtime_env(),
    ]
    if member_spec.get("dataSchema"):
        schema = json.dumps(member_spec["dataSchema"], sort_keys=True, separators=(",", ":"))
        env.append({"name": contract.ENV_DATA_SCHEMA, "value": schema})
    volumes, mounts = _scratch_volumes()
    volumes += [
        {
            "name": "data",
            "persistentVolumeClaim": {
                "claimName": member_spec["dataVolumeClaim"],
                "readOnly": True,
            },
        },
        {"name": "cache", "emptyDir": {}},
    ]
    mounts += [
        {"name": "data", "mountPath": DATA_MOUNT_PATH, "readOnly": True},
        {"name": "cache", "mountPath": CACHE_MOUNT_PATH},
    ]
    if has_ca:
        volume, mount, variable = ca_file(credentials_secret, contract.SECRET_CA_CERT)
        volumes.append(volume)
        mounts.append(mount)
        env.append(variable)
    container = {
        "name": "agent",
        "image": member_spec.get("image") or alliance_spec.get("memberImage") or default_image,
        "imagePullPolicy": image_pull_policy,
        "command": [contract.COMMAND],
        "args": args,
        "env": env,
        "ports": [{"name": "metrics", "containerPort": MEMBER_METRICS_PORT, "protocol": "TCP"}],
        "resources": _quantities(member_spec.get("resources") or DEFAULT_MEMBER_RESOURCES),
        "volumeMounts": mounts,
        "securityContext": _container_security(),
        # A container that dies leaves the tail of its log as the termination message: the
        # operator shows it in the Member's status.
        "terminationMessagePolicy": "FallbackToLogsOnError",
    }
    alliance = member_spec["alliance"]
    return _pod(
        member_pod_name(member),
        labels("member", alliance, member),
        {
            "restartPolicy": "Always",
            "automountServiceAccountToken": False,
            "enableServiceLinks": False,
            "securityContext": _pod_security(run_as_user),
            "terminationGracePeriodSeconds": 30,
            "containers": [container],
            "volumes": volumes,
        },
        {ANNOTATION_CREDENTIALS: credentials_digest},
    )


def init_pod(
    alliance: str,
    alliance_spec: dict,
    default_image: str,
    image_pull_policy: str = "IfNotPresent",
    run_as_user: int = 10001,
) -> dict:
    """A run-to-completion pod that creates the bucket, the model and its seed weights.

    It needs TensorFlow to build the model, which is why it runs in the member image and not
    in the operator (whose image carries no TensorFlow).
    """
    model = alliance_spec.get("model") or {}
    args = contract.init_args(
        alliance_spec.get("seed", 0), log_level="info", keras_object=model.get("kerasObject")
    )
    volumes, mounts = _scratch_volumes()
    store = alliance_spec["store"]
    keys = store["credentialsSecret"]
    env = store_env(
        store,
        keys["name"],
        keys.get("accessKeyKey", contract.SECRET_ACCESS_KEY),
        keys.get("secretKeyKey", contract.SECRET_SECRET_KEY),
    )
    if store.get("caSecret"):
        ca = store["caSecret"]
        volume, mount, variable = ca_file(ca["name"], ca.get("key", contract.SECRET_CA_CERT))
        volumes.append(volume)
        mounts.append(mount)
        env.append(variable)
    container = {
        "name": "agent",
        "image": alliance_spec.get("memberImage") or default_image,
        "imagePullPolicy": image_pull_policy,
        "command": [contract.COMMAND],
        "args": args,
        "env": [*env, *_runtime_env()],
        "resources": copy.deepcopy(INIT_RESOURCES),
        "volumeMounts": mounts,
        "securityContext": _container_security(),
        "terminationMessagePolicy": "FallbackToLogsOnError",
    }
    return _pod(
        init_pod_name(alliance),
        labels("init", alliance),
        {
            "restartPolicy": "OnFailure",
            "automountServiceAccountToken": False,
            "enableServiceLinks": False,
            "securityContext": _pod_security(run_as_user),
            "containers": [container],
            "volumes": volumes,
        },
    )
