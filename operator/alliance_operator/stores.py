"""The operator's handle on each Alliance's store: credentials from the Alliance's Secret.

The operator reads a Secret for an Alliance only when the Secret says so: it must be in the
Alliance's namespace (a namespaced reference cannot leave it) and carry the annotation
``alliance.dev/alliances`` listing the Alliance's name. With the annotation
``alliance.dev/store-endpoint`` it is used only with that endpoint. So whoever may write an
Alliance cannot make the operator use, or send to an endpoint of their choice, keys its owner
did not give to that Alliance.

One ``Store`` per distinct (endpoint, bucket, credentials, CA), reused across reconciles so its
connection pool and the coordinator's caches survive between timer ticks.
"""

from __future__ import annotations

import threading
import time

from alliance import contract
from alliance.store import Store, StoreConfig
from alliance_operator import k8s
from alliance_operator.constants import ANNOTATION_ALLIANCES, ANNOTATION_STORE_ENDPOINT

SECRET_TTL_SECONDS = 10.0  # a rotated Secret is picked up within this


class StoreUnavailable(Exception):
    """The Alliance's store cannot be used; ``reason`` is a CamelCase condition reason."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason
        self.message = message


def allowed_alliances(secret: dict) -> set[str]:
    annotations = secret.get("metadata", {}).get("annotations") or {}
    return {a.strip() for a in annotations.get(ANNOTATION_ALLIANCES, "").split(",") if a.strip()}


def check_marked(secret: dict, alliance: str, endpoint: str, field: str) -> None:
    """Refuse a Secret that is not marked for ``alliance`` (or is marked for another endpoint)."""
    meta = secret.get("metadata", {})
    name, namespace = meta.get("name"), meta.get("namespace")
    if alliance not in allowed_alliances(secret):
        raise StoreUnavailable(
            "SecretNotMarked",
            f'{field}: Secret "{name}" is not marked for Alliance "{alliance}": its owner '
            f"allows it with `kubectl annotate secret {name} -n {namespace} "
            f"{ANNOTATION_ALLIANCES}={alliance}` (a comma-separated list of Alliances)",
        )
    pinned = (meta.get("annotations") or {}).get(ANNOTATION_STORE_ENDPOINT)
    if pinned and pinned.rstrip("/") != endpoint.rstrip("/"):
        raise StoreUnavailable(
            "SecretNotMarked",
            f'{field}: Secret "{name}" is for the store {pinned} only (annotation '
            f"{ANNOTATION_STORE_ENDPOINT}), not {endpoint}",
        )


class Stores:
    def __init__(self, retry_seconds: float = 5.0):
        self.retry_seconds = retry_seconds
        self._lock = threading.Lock()
        self._stores: dict[StoreConfig, Store] = {}
        self._secrets: dict[tuple[str, str], tuple[float, dict | None]] = {}

    def for_alliance(self, namespace: str, alliance: dict) -> Store:
        """The store with the Alliance's (admin) keys; StoreUnavailable says why not."""
        config = self.admin_config(namespace, alliance)
        with self._lock:
            if config not in self._stores:
                self._stores[config] = Store(config, retry_seconds=self.retry_seconds)
            return self._stores[config]

    def admin_config(self, namespace: str, alliance: dict) -> StoreConfig:
        name = alliance["metadata"]["name"]
        store = alliance["spec"]["store"]
        ref = store["credentialsSecret"]
        field = "spec.store.credentialsSecret"
        secret = self._marked_secret(namespace, ref["name"], name, store["endpoint"], field)
        data = secret["data"]
        keys = (
            ref.get("accessKeyKey", contract.SECRET_ACCESS_KEY),
            ref.get("secretKeyKey", contract.SECRET_SECRET_KEY),
        )
        if keys[0] == keys[1]:
            raise StoreUnavailable(
                "SecretKeyMissing", f"{field}: accessKeyKey and secretKeyKey name one key"
            )
        for key in keys:
            if not data.get(key):
                raise StoreUnavailable(
                    "SecretKeyMissing",
                    f'Secret "{ref["name"]}" has no key "{key}" ({field} names the keys)',
                )
        ca = ""
        if store.get("caSecret"):
            ca_ref, field = store["caSecret"], "spec.store.caSecret"
            ca_secret = self._marked_secret(
                namespace, ca_ref["name"], name, store["endpoint"], field
            )
            key = ca_ref.get("key", contract.SECRET_CA_CERT)
            ca = ca_secret["data"].get(key) or ""
            if "BEGIN CERTIFICATE" not in ca:
                raise StoreUnavailable(
                    "SecretKeyMissing",
                    f'{field}: Secret "{ca_ref["name"]}" has no PEM certificate at key "{key}"',
                )
        return StoreConfig(store["endpoint"], data[keys[0]], data[keys[1]], store["bucket"], ca)

    def _marked_secret(
        self, namespace: str, name: str, alliance: str, endpoint: str, field: str
    ) -> dict:
        secret = self._secret(namespace, name)
        if secret is None:
            raise StoreUnavailable(
                "SecretNotFound", f'{field}: Secret "{name}" not found in namespace {namespace}'
            )
        check_marked(secret, alliance, endpoint, field)
        return secret

    def _secret(self, namespace: str, name: str) -> dict | None:
        key = (namespace, name)
        now = time.monotonic()
        with self._lock:
            cached = self._secrets.get(key)
        if cached and now - cached[0] < SECRET_TTL_SECONDS:
            return cached[1]
        secret = k8s.get_secret(namespace, name)
        with self._lock:
            self._secrets[key] = (now, secret)
        return secret
