"""The only module of the operator that calls the Kubernetes API (besides kopf itself; the
chart's uninstall hook, uninstall.py, makes its own two calls under its own Role).

Every call is idempotent: creating what exists returns the existing object (409), deleting
what is gone is done (404), reading what is missing returns None. Objects are plain dicts in
the API's own camelCase form, as kopf hands them to handlers.
"""

from __future__ import annotations

import base64
import json
import threading
from typing import Any

import kubernetes
from kubernetes.client.rest import ApiException

from alliance_operator.constants import GROUP, VERSION

_local = threading.local()


def login() -> None:
    """In a pod: its service account; elsewhere: $KUBECONFIG or ~/.kube/config."""
    try:
        kubernetes.config.load_incluster_config()
    except kubernetes.config.ConfigException:
        kubernetes.config.load_kube_config()


def _api() -> kubernetes.client.ApiClient:
    # One client per thread: kopf runs sync handlers in a thread pool, and the client's
    # connection pool is cheaper to keep than to share under a lock.
    client = getattr(_local, "client", None)
    if client is None:
        client = _local.client = kubernetes.client.ApiClient()
    return client


def _json(response: Any) -> dict:
    return json.loads(response.data)


def _none_if_missing(call) -> dict | None:
    try:
        return _json(call())
    except ApiException as exc:
        if exc.status == 404:
            return None
        raise


# --- pods -------------------------------------------------------------------------------


def get_pod(namespace: str, name: str) -> dict | None:
    core = kubernetes.client.CoreV1Api(_api())
    return _none_if_missing(
        lambda: core.read_namespaced_pod(name, namespace, _preload_content=False)
    )


def list_pods(namespace: str, label_selector: str) -> list[dict]:
    core = kubernetes.client.CoreV1Api(_api())
    response = core.list_namespaced_pod(
        namespace, label_selector=label_selector, _preload_content=False
    )
    return _json(response).get("items", [])


def create_pod(namespace: str, body: dict) -> dict:
    """Create the pod, or return the one of that name that exists already."""
    core = kubernetes.client.CoreV1Api(_api())
    try:
        return _json(core.create_namespaced_pod(namespace, body, _preload_content=False))
    except ApiException as exc:
        if exc.status != 409:
            raise
    existing = get_pod(namespace, body["metadata"]["name"])
    if existing is None:  # deleted in between: the next reconcile creates it
        raise ApiException(status=409, reason="pod is being replaced")
    return existing


def delete_pod(namespace: str, name: str) -> None:
    core = kubernetes.client.CoreV1Api(_api())
    try:
        core.delete_namespaced_pod(name, namespace, _preload_content=False)
    except ApiException as exc:
        if exc.status != 404:
            raise


# --- secrets ----------------------------------------------------------------------------


def get_secret(namespace: str, name: str) -> dict | None:
    """The Secret with its data decoded into ``data`` (str values); None when missing."""
    core = kubernetes.client.CoreV1Api(_api())
    secret = _none_if_missing(
        lambda: core.read_namespaced_secret(name, namespace, _preload_content=False)
    )
    if secret is None:
        return None
    data = {k: base64.b64decode(v).decode() for k, v in (secret.get("data") or {}).items()}
    data.update(secret.get("stringData") or {})
    secret["data"] = data
    return secret


def read_secret(namespace: str, name: str) -> dict[str, str] | None:
    """The Secret's data, decoded; None when there is no such Secret."""
    secret = get_secret(namespace, name)
    return None if secret is None else secret["data"]


def create_secret(namespace: str, body: dict) -> None:
    """Create the Secret (``stringData``); one of that name existing already is a conflict
    the caller resolves (ApiException 409)."""
    core = kubernetes.client.CoreV1Api(_api())
    core.create_namespaced_secret(namespace, body, _preload_content=False)


def patch_secret(namespace: str, name: str, patch: dict) -> None:
    """Merge ``patch`` (``stringData``, ``metadata.annotations``) into the Secret."""
    core = kubernetes.client.CoreV1Api(_api())
    core.patch_namespaced_secret(name, namespace, patch, _preload_content=False)


# --- persistent volume claims -------------------------------------------------------------


def get_claim(namespace: str, name: str) -> dict | None:
    core = kubernetes.client.CoreV1Api(_api())
    return _none_if_missing(
        lambda: core.read_namespaced_persistent_volume_claim(
            name, namespace, _preload_content=False
        )
    )


# --- our custom resources ---------------------------------------------------------------


def get_custom(namespace: str, plural: str, name: str) -> dict | None:
    api = kubernetes.client.CustomObjectsApi(_api())
    return _none_if_missing(
        lambda: api.get_namespaced_custom_object(
            GROUP, VERSION, namespace, plural, name, _preload_content=False
        )
    )


def list_custom(namespace: str, plural: str) -> list[dict]:
    api = kubernetes.client.CustomObjectsApi(_api())
    response = api.list_namespaced_custom_object(
        GROUP, VERSION, namespace, plural, _preload_content=False
    )
    return _json(response).get("items", [])


def patch_custom_status(namespace: str, plural: str, name: str, status: dict) -> None:
    """Merge ``status`` (a JSON merge patch of .status) into the object's status subresource:
    a daemon's own writes, as kopf applies a daemon's patch only when it returns."""
    api = kubernetes.client.CustomObjectsApi(_api())
    api.patch_namespaced_custom_object_status(
        GROUP, VERSION, namespace, plural, name, {"status": status}, _preload_content=False
    )
