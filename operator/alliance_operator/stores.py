"""The operator's handle on each Alliance's store: credentials from the Alliance's Secret.

One ``Store`` per distinct (endpoint, bucket, credentials), reused across reconciles so its
connection pool and the coordinator's caches survive between timer ticks.
"""

from __future__ import annotations

import threading
import time

from alliance.store import Store, StoreConfig
from alliance_operator import k8s

SECRET_TTL_SECONDS = 10.0  # a rotated Secret is picked up within this


class StoreUnavailable(Exception):
    """The Alliance's store cannot be used; ``reason`` is a CamelCase condition reason."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason
        self.message = message


class Stores:
    def __init__(self, retry_seconds: float = 5.0):
        self.retry_seconds = retry_seconds
        self._lock = threading.Lock()
        self._stores: dict[StoreConfig, Store] = {}
        self._secrets: dict[tuple[str, str], tuple[float, dict | None]] = {}

    def for_alliance(self, namespace: str, alliance: dict) -> Store:
        store = alliance["spec"]["store"]
        ref = store["credentialsSecret"]
        data = self._secret(namespace, ref["name"])
        if data is None:
            raise StoreUnavailable(
                "SecretNotFound", f'Secret "{ref["name"]}" not found in namespace {namespace}'
            )
        keys = (ref.get("accessKeyKey", "accessKey"), ref.get("secretKeyKey", "secretKey"))
        for key in keys:
            if not data.get(key):
                raise StoreUnavailable(
                    "SecretKeyMissing",
                    f'Secret "{ref["name"]}" has no key "{key}" '
                    "(spec.store.credentialsSecret names the keys)",
                )
        config = StoreConfig(store["endpoint"], data[keys[0]], data[keys[1]], store["bucket"])
        with self._lock:
            if config not in self._stores:
                self._stores[config] = Store(config, retry_seconds=self.retry_seconds)
            return self._stores[config]

    def _secret(self, namespace: str, name: str) -> dict | None:
        key = (namespace, name)
        now = time.monotonic()
        with self._lock:
            cached = self._secrets.get(key)
        if cached and now - cached[0] < SECRET_TTL_SECONDS:
            return cached[1]
        data = k8s.read_secret(namespace, name)
        with self._lock:
            self._secrets[key] = (now, data)
        return data
