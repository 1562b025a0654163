"""The object store: the only channel between the coordinator and the members.

This is the only module that talks S3 (through the ``minio`` client). Every object the
platform writes has one key, given by the functions below; ``docs/architecture.md`` documents
the layout::

    alliance.json                                  the alliance: model definition, seed model id
    model-files/<sha256>.keras                     a user-supplied Keras model file (immutable)
    models/<sha256>.npz                            every global model and server-optimizer state
                                                   (immutable, content-addressed, checked on read)
    members/<member>.json                          a member's heartbeat: state, data summary/error
    tasks/<run>.json                               the run's current task: round, kind of work
                                                   (train or validate), model id, the members asked
    runs/<run>/spec.json                           the run's spec (embedded runner)
    runs/<run>/status.json                         the coordinator's persisted status (embedded)
    runs/<run>/rounds/<round>/updates/<member>.npz   a member's weights after local training, its
                                                   metrics in the object's metadata
    runs/<run>/rounds/<round>/failures/<member>.json a member's report that it could not do the task
    runs/<run>/rounds/<round>/validations/<member>.json  a validator's score of the round's model
    runs/<run>/rounds/<round>/aggregate.json       the round's aggregation result (written once)

In the notice bucket ``<bucket>-notices`` (``contract.notice_bucket``) the coordinator alone
writes an empty ``tasks/<run>`` each time that task changes, for members to wait on its
notifications instead of polling ``tasks/``.

Rounds are zero-padded (``00003``) so keys sort in round order. Every call retries transport
errors and 5xx answers with exponential backoff for up to ``retry_seconds``, so a store that is
down for a while delays the platform instead of failing it.
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import logging
import os
import random
import ssl
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlparse

import numpy as np
import urllib3
from minio import Minio
from minio.error import InvalidResponseError, S3Error, ServerError

from alliance import contract, weights

log = logging.getLogger(__name__)
T = TypeVar("T")

_NOT_FOUND = {"NoSuchKey", "NoSuchObject", "ResourceNotFound"}


class StoreError(RuntimeError):
    """The store refused a request, or stayed unreachable past the retry budget."""


class BadObject(StoreError):
    """An object is there but unusable: larger than allowed, not what its key promises."""


class IntegrityError(BadObject):
    """An object's content does not match its content address."""


@dataclass(frozen=True)
class StoreConfig:
    endpoint: str  # "http://host:port" or "https://host"
    access_key: str
    secret_key: str
    bucket: str
    #: PEM of the CA that verifies an https endpoint; "": the system's CAs.
    ca_cert: str = field(default="", repr=False)

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None) -> StoreConfig:
        env = os.environ if env is None else env
        ca_cert = ""
        if env.get(contract.ENV_S3_CA_FILE):
            path = env[contract.ENV_S3_CA_FILE]
            try:
                ca_cert = Path(path).read_text(encoding="ascii")
            except (OSError, UnicodeDecodeError) as exc:
                raise StoreError(
                    f"{contract.ENV_S3_CA_FILE}={path}: cannot read it: {exc}"
                ) from exc
            if "BEGIN CERTIFICATE" not in ca_cert:
                raise StoreError(f"{contract.ENV_S3_CA_FILE}={path}: not a PEM certificate")
        names = (  # in the order of the fields
            contract.ENV_S3_ENDPOINT,
            contract.ENV_S3_ACCESS_KEY,
            contract.ENV_S3_SECRET_KEY,
            contract.ENV_BUCKET,
        )
        missing = [k for k in names if not env.get(k)]
        if missing:
            raise StoreError(
                "the object store is not configured: set "
                + ", ".join(missing)
                + " (there are no default credentials)"
            )
        return cls(*(env[k] for k in names), ca_cert=ca_cert)

    def to_env(self) -> dict[str, str]:
        """The variables an agent reads (a CA travels as a file: not here)."""
        if self.ca_cert:
            raise ValueError(f"a CA certificate is passed as a file ({contract.ENV_S3_CA_FILE})")
        return {
            contract.ENV_S3_ENDPOINT: self.endpoint,
            contract.ENV_S3_ACCESS_KEY: self.access_key,
            contract.ENV_S3_SECRET_KEY: self.secret_key,
            contract.ENV_BUCKET: self.bucket,
        }


@dataclass(frozen=True)
class ObjectInfo:
    key: str
    size: int
    last_modified: float  # epoch seconds
    etag: str


def round_prefix(run: str, round_: int) -> str:
    return f"runs/{run}/rounds/{round_:05d}/"


def result_key(run: str, round_: int, kind: str, member: str) -> str:
    """kind: "failures" or "validations"."""
    return round_prefix(run, round_) + f"{kind}/{member}.json"


def run_key(run: str, name: str) -> str:
    """A run's own objects: "spec.json", "status.json"."""
    return f"runs/{run}/{name}"


def heartbeat_key(member: str) -> str:
    return f"members/{member}.json"


def model_key(model_id: str) -> str:
    return f"models/{model_id}.npz"


class Store:
    def __init__(self, config: StoreConfig, retry_seconds: float = 120.0, workers: int = 16):
        url = urlparse(config.endpoint if "://" in config.endpoint else "http://" + config.endpoint)
        if not url.netloc:
            raise StoreError(
                f"{contract.ENV_S3_ENDPOINT}={config.endpoint!r} is not a host:port or URL"
            )
        # Our own retry loop handles outages; the client's pool only retries nothing, so a
        # request never hangs for minutes inside urllib3.
        tls = {}
        if config.ca_cert and url.scheme == "https":
            try:
                tls["ssl_context"] = ssl.create_default_context(cadata=config.ca_cert)
            except (ssl.SSLError, ValueError) as exc:
                raise StoreError(f"the store's CA certificate is not usable: {exc}") from exc
        http = urllib3.PoolManager(
            timeout=urllib3.Timeout(connect=5, read=60),
            maxsize=workers,
            retries=False,
            **tls,
        )
        self.config = config
        self.bucket = config.bucket
        self.retry_seconds = retry_seconds
        self._client = Minio(
            url.netloc,
            access_key=config.access_key,
            secret_key=config.secret_key,
            secure=url.scheme == "https",
            http_client=http,
        )
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="store")

    # --- plumbing -------------------------------------------------------------------------

    def _call(self, what: str, fn: Callable[[], T]) -> T:
        """Run one request, retrying transient failures with capped exponential backoff."""
        deadline = time.monotonic() + self.retry_seconds
        delay = 0.2
        while True:
            try:
                return fn()
            except S3Error as exc:
                if exc.code in _NOT_FOUND:
                    raise  # the callers turn this into None / False
                if not _transient_s3(exc):
                    raise StoreError(
                        f"{what}: the store refused: {exc.code}: {exc.message}"
                    ) from exc
                error: Exception = exc
            except ValueError as exc:  # the client's own checks, e.g. an invalid bucket name
                raise StoreError(f"{what}: {exc}") from exc
            except (
                urllib3.exceptions.HTTPError,
                OSError,
                ServerError,
                InvalidResponseError,
            ) as exc:
                error = exc
            pause = delay * (0.5 + random.random())  # jitter: members do not retry in step
            if time.monotonic() + pause > deadline:
                raise StoreError(
                    f"{what}: the store at {self.config.endpoint} did not answer for "
                    f"{self.retry_seconds:.0f} s ({error})"
                ) from error
            log.warning("%s: %s; retrying in %.1f s", what, error, pause)
            time.sleep(pause)
            delay = min(delay * 2, 5.0)

    def map(self, fn: Callable[[Any], T], items: Iterable[Any]) -> list[T]:
        """Run ``fn`` over items concurrently (store calls are I/O bound)."""
        return list(self._pool.map(fn, items))

    def with_retry(self, seconds: float) -> Store:
        """The same store (same connections) with another retry budget."""
        clone = copy.copy(self)
        clone.retry_seconds = seconds
        return clone

    def submit(self, fn: Callable[..., T], *args: Any) -> Future:
        return self._pool.submit(fn, *args)

    def watch(self, prefix: str) -> Changes:
        """Notifications of objects created or removed under ``prefix`` (see Changes)."""
        return Changes(self._client, self.bucket, prefix)

    def ensure_bucket(self) -> None:
        """Create the alliance's bucket, and its notice bucket (contract.notice_bucket) when
        the keys may: without one, members poll for tasks."""
        self._ensure(self.bucket)
        notices = contract.notice_bucket(self.bucket)
        if notices is not None:
            try:
                self._ensure(notices)
            except StoreError as exc:
                log.warning("no notice bucket %s (%s): members will poll for tasks", notices, exc)

    def _ensure(self, bucket: str) -> None:
        def make() -> None:
            try:
                self._client.make_bucket(bucket)
            except S3Error as exc:  # created meanwhile by another process: fine
                if exc.code not in ("BucketAlreadyOwnedByYou", "BucketAlreadyExists"):
                    raise

        if not self._call(f"check bucket {bucket}", lambda: self._client.bucket_exists(bucket)):
            self._call(f"create bucket {bucket}", make)

    def put_bytes(self, key: str, data: bytes, content_type: str = "application/octet-stream"):
        self._call(
            f"put {key}",
            lambda: self._client.put_object(
                self.bucket, key, io.BytesIO(data), len(data), content_type=content_type
            ),
        )

    def get_bytes(self, key: str, max_bytes: int | None = None) -> bytes | None:
        """The object's bytes, or None when it does not exist. An object larger than
        ``max_bytes`` raises BadObject without being read."""

        def get() -> bytes:
            resp = self._client.get_object(self.bucket, key)
            try:
                return _read(resp, key, max_bytes)
            finally:
                resp.close()
                resp.release_conn()

        try:
            return self._call(f"get {key}", get)
        except S3Error:  # only "not found" gets here
            return None

    def put_json(self, key: str, obj: Any) -> None:
        self.put_bytes(key, json.dumps(obj, sort_keys=True).encode(), "application/json")

    def get_json(
        self, key: str, max_bytes: int | None = None, attempts: int = 10, missing: Any = None
    ) -> Any:
        """A JSON object, or ``missing`` when it does not exist; BadObject when it is not JSON.

        Objects such as a run's task and status are overwritten in place, and a gateway may
        serve a read that overlaps a write cut short (seen with the JuiceFS gateway). Such a
        torn read does not parse; it is read again, up to ``attempts`` times.
        """
        for attempt in range(attempts):
            data = self.get_bytes(key, max_bytes)
            if data is None:
                return missing
            try:
                return json.loads(data)
            except (json.JSONDecodeError, UnicodeDecodeError) as exc:
                error = exc
                time.sleep(0.02 * (attempt + 1))
        raise BadObject(f"{key}: not valid JSON ({error})")

    def exists(self, key: str) -> bool:
        try:
            self._call(f"stat {key}", lambda: self._client.stat_object(self.bucket, key))
            return True
        except S3Error as exc:
            if exc.code in _NOT_FOUND:
                return False
            raise

    def list(self, prefix: str) -> list[ObjectInfo]:
        def listing() -> list[ObjectInfo]:
            return [
                ObjectInfo(
                    o.object_name,
                    o.size or 0,
                    _epoch(o.last_modified),
                    (o.etag or "").strip('"'),
                )
                for o in self._client.list_objects(self.bucket, prefix=prefix, recursive=True)
                # Some gateways keep empty "folder" keys after deletes.
                if not o.object_name.endswith("/")
            ]

        return self._call(f"list {prefix}", listing)

    def delete(self, keys: Sequence[str]) -> None:
        def remove(key: str) -> None:
            self._call(f"delete {key}", lambda: self._client.remove_object(self.bucket, key))

        self.map(remove, keys)

    def delete_prefix(self, prefix: str) -> int:
        keys = [o.key for o in self.list(prefix)]
        self.delete(keys)
        return len(keys)

    # --- models: immutable and content-addressed -------------------------------------------

    def put_model(self, arrays: Sequence[np.ndarray]) -> str:
        data = weights.dumps(arrays)
        model_id = weights.content_id(data)
        self.put_bytes(model_key(model_id), data)
        return model_id

    def get_model(self, model_id: str) -> list[np.ndarray]:
        return weights.loads(self.get_model_bytes(model_id))

    def get_model_bytes(self, model_id: str) -> bytes:
        data = self.get_bytes(model_key(model_id))
        if data is None:
            raise StoreError(f"model {model_id} is not in the store ({model_key(model_id)})")
        if weights.content_id(data) != model_id:
            raise IntegrityError(
                f"model {model_id}: stored bytes hash to {weights.content_id(data)}; "
                "the object was modified or corrupted"
            )
        return data

    def put_file(self, prefix: str, data: bytes, suffix: str) -> str:
        """Store immutable bytes under ``prefix/<sha256><suffix>``; returns the sha256."""
        sha = weights.content_id(data)
        self.put_bytes(f"{prefix}/{sha}{suffix}", data)
        return sha

    def get_file(self, prefix: str, sha: str, suffix: str) -> bytes:
        key = f"{prefix}/{sha}{suffix}"
        data = self.get_bytes(key)
        if data is None:
            raise StoreError(f"{key} is not in the store")
        if weights.content_id(data) != sha:
            raise IntegrityError(f"{key}: content does not match its address")
        return data

    # --- the alliance -----------------------------------------------------------------------

    def get_alliance(self) -> dict | None:
        return self.get_json("alliance.json")

    def put_alliance(self, manifest: dict) -> None:
        self.put_json("alliance.json", manifest)

    # --- members ----------------------------------------------------------------------------

    def put_heartbeat(self, member: str, info: dict) -> None:
        self.put_json(heartbeat_key(member), info)

    def list_heartbeats(self) -> list[ObjectInfo]:
        return self.list("members/")

    def get_heartbeat(self, member: str) -> tuple[dict | None, float | None]:
        """A member's heartbeat and when it was last written (epoch seconds)."""
        key = heartbeat_key(member)
        found = [o for o in self.list(key) if o.key == key]
        if not found:
            return None, None
        return self.get_json(key), found[0].last_modified

    # --- tasks: one object per run, naming the round, the kind of work and the members ------

    def put_task(self, run: str, task: dict) -> None:
        self.put_json(f"tasks/{run}.json", task)
        self._notice(run, remove=False)

    def delete_task(self, run: str) -> None:
        self.delete([f"tasks/{run}.json"])
        self._notice(run, remove=True)

    def list_tasks(self) -> list[ObjectInfo]:
        return self.list("tasks/")

    def watch_tasks(self) -> Changes | None:
        """Notifications of the coordinator's task changes (the notice bucket), for members;
        None when the alliance's bucket name leaves no room for one."""
        notices = contract.notice_bucket(self.bucket)
        return None if notices is None else Changes(self._client, notices, "tasks/")

    def _notice(self, run: str, remove: bool) -> None:
        """Mark a change of ``run``'s task in the notice bucket: best effort, for members'
        wake-ups only (they read the task itself from the alliance's bucket, and poll when
        the notice bucket is missing or theirs to listen to)."""
        notices = contract.notice_bucket(self.bucket)
        if notices is None:
            return
        key = f"tasks/{run}"
        try:
            if remove:
                self._client.remove_object(notices, key)
            else:
                self._client.put_object(notices, key, io.BytesIO(b""), 0)
        except (S3Error, ValueError, urllib3.exceptions.HTTPError, OSError) as exc:
            log.debug("no task notice in %s (%s): members poll", notices, exc)

    # --- round results ----------------------------------------------------------------------

    def put_update(self, run: str, round_: int, member: str, data: bytes, meta: dict) -> None:
        """A member's update: its weights, with its metrics in the object's metadata.

        One object, so it appears whole or not at all, and one GET returns both.
        """
        key = round_prefix(run, round_) + f"updates/{member}.npz"
        meta = {**meta, "sha256": weights.content_id(data)}
        self._call(
            f"put {key}",
            lambda: self._client.put_object(
                self.bucket,
                key,
                io.BytesIO(data),
                len(data),
                metadata={"alliance": json.dumps(meta, sort_keys=True)},
            ),
        )

    def get_update_meta(
        self, run: str, round_: int, member: str, max_bytes: int = 64 * 1024
    ) -> dict | None:
        """An update's metrics (its object's metadata, member-written: check them) without
        reading its weights; None when absent, refused, larger than ``max_bytes`` or not a
        JSON object."""
        key = round_prefix(run, round_) + f"updates/{member}.npz"
        try:
            stat = self._call(f"stat {key}", lambda: self._client.stat_object(self.bucket, key))
        except (S3Error, StoreError):
            return None
        header = (stat.metadata or {}).get("x-amz-meta-alliance") or ""
        if not header or len(header) > max_bytes:
            return None
        try:
            meta = json.loads(header)
        except ValueError:
            return None
        return meta if isinstance(meta, dict) else None

    def get_update(
        self, run: str, round_: int, member: str, max_bytes: int | None = None
    ) -> tuple[bytes, Any]:
        """An update's bytes and metrics (as the member wrote them: check them); BadObject
        when they do not match, are not JSON, or the update is larger than ``max_bytes``."""
        key = round_prefix(run, round_) + f"updates/{member}.npz"

        def get() -> tuple[bytes, str]:
            resp = self._client.get_object(self.bucket, key)
            try:
                return _read(resp, key, max_bytes), resp.headers.get("x-amz-meta-alliance") or "{}"
            finally:
                resp.close()
                resp.release_conn()

        try:
            data, header = self._call(f"get {key}", get)
        except S3Error as exc:  # listed, then gone: its author removed it
            raise BadObject(f"get {key}: {exc.code}: {exc.message}") from exc
        try:
            meta = json.loads(header)
        except ValueError as exc:
            raise BadObject(f"{key}: its metadata is not JSON ({exc})") from None
        if not isinstance(meta, dict) or weights.content_id(data) != meta.get("sha256"):
            raise IntegrityError(f"{key}: content does not match the sha256 in its metadata")
        return data, meta

    def update_exists(self, run: str, round_: int, member: str) -> bool:
        return self.exists(round_prefix(run, round_) + f"updates/{member}.npz")

    def put_result(self, run: str, round_: int, kind: str, member: str, result: dict) -> None:
        """kind: "failures" or "validations"."""
        self.put_json(result_key(run, round_, kind, member), result)

    def list_round(
        self, run: str, round_: int, kinds: tuple[str, ...] = ("updates", "failures", "validations")
    ) -> dict[str, set[str]]:
        """Who has answered in a round, for each kind asked ("updates", "failures",
        "validations"): one LIST per kind, so a stage does not re-list the others."""
        prefix = round_prefix(run, round_)
        return {
            kind: {
                o.key[len(prefix) + len(kind) + 1 :].rsplit(".", 1)[0]
                for o in self.list(f"{prefix}{kind}/")
            }
            for kind in kinds
        }

    def put_round_record(self, run: str, round_: int, record: dict) -> None:
        """A finished round's record (the engine's RoundRecord), kept for good."""
        self.put_json(round_prefix(run, round_) + "record.json", record)

    def get_round_record(self, run: str, round_: int) -> dict | None:
        return self.get_json(round_prefix(run, round_) + "record.json")

    def get_aggregate(self, run: str, round_: int) -> dict | None:
        """A round's aggregation result (written once: the new model's id, who was accepted)."""
        return self.get_json(round_prefix(run, round_) + "aggregate.json")

    def put_aggregate(self, run: str, round_: int, result: dict) -> None:
        self.put_json(round_prefix(run, round_) + "aggregate.json", result)

    # --- a run's own objects: the spec it keeps for its life, its status where no resource
    # holds it (the embedded runner, `alliance coordinate`)

    def get_run_spec(self, run: str) -> dict | None:
        return self.get_json(run_key(run, "spec.json"))

    def put_run_spec(self, run: str, spec: dict) -> None:
        self.put_json(run_key(run, "spec.json"), spec)

    def get_run_status(self, run: str) -> dict | None:
        return self.get_json(run_key(run, "status.json"))

    def put_run_status(self, run: str, status: dict) -> None:
        self.put_json(run_key(run, "status.json"), status)


class Changes:
    """Wakes a waiter when an object under a prefix is created or removed, so it need not poll.

    MinIO's ListenBucketNotification (served by the chart's MinIO and the embedded gateway,
    not by every S3 store) streams the bucket's events; a thread holds the stream and
    reconnects after an error. ``wait(timeout)`` returns True as soon as something changed
    since the last call. ``live`` is False while there is no stream (a store without
    notifications, or one that is down): the waiter then polls, as it would without this.
    The coordinator listens to the alliance's bucket; members only to the notice bucket
    (``Store.watch_tasks``), since the store's policies cannot limit a listener to a prefix.
    """

    EVENTS = ("s3:ObjectCreated:*", "s3:ObjectRemoved:*")
    #: How often ``wait_for`` asks whether its owner is stopping.
    STOP_CHECK_SECONDS = 0.25

    def __init__(self, client: Minio, bucket: str, prefix: str):
        import threading

        self._client, self._bucket, self._prefix = client, bucket, prefix
        # A counter under a condition, not an Event: a change that lands while the waiter
        # wakes up for another reason is never cleared unseen.
        self._changed = threading.Condition()
        self._count = 0
        self._seen = 0
        self._closed = threading.Event()
        self._stream: Any = None
        self._delay = 1.0  # before reconnecting; doubles up to 30 s while the store refuses
        self.live = False
        self.events = 0
        self._thread = threading.Thread(target=self._listen, name="store-watch", daemon=True)
        self._thread.start()

    def wait(self, timeout: float) -> bool:
        with self._changed:
            if self._count == self._seen:
                self._changed.wait(timeout)
            changed, self._seen = self._count != self._seen, self._count
        return changed

    def wait_for(self, seconds: float, stopped: Callable[[], bool]) -> bool:
        """Like ``wait(seconds)``, but asking ``stopped()`` every STOP_CHECK_SECONDS (a
        waiter's owner may want it back meanwhile); False on a timeout or a stop."""
        until = time.monotonic() + seconds
        while (left := until - time.monotonic()) > 0 and not stopped():
            if self.wait(min(left, self.STOP_CHECK_SECONDS)):
                return True
        return False

    def _notify(self) -> None:
        with self._changed:
            self._count += 1
            self._changed.notify_all()

    def close(self) -> None:
        self._closed.set()
        stream = self._stream
        if stream is not None:
            with contextlib.suppress(Exception):
                stream.close()  # ends the blocked read in the listening thread

    def _listen(self) -> None:
        while not self._closed.is_set():
            try:
                stream = self._client.listen_bucket_notification(
                    self._bucket, prefix=self._prefix, events=self.EVENTS
                )
                stream._func = self._subscribing(stream._func)
                self._stream = stream
                for _event in stream:
                    self.events += 1
                    self._notify()
                    if self._closed.is_set():
                        break
            except S3Error as exc:
                if exc.code in ("NotImplemented", "AccessDenied"):  # this store will not tell
                    log.info("the store sends no notifications (%s): polling", exc.code)
                    self.live = False
                    self._notify()  # the waiter polls from now on
                    return
            except Exception as exc:  # the stream broke: reconnect
                if not self._closed.is_set():
                    log.info("store notifications interrupted (%s): polling until back", exc)
            self.live = False
            self._notify()  # wake the waiter: it polls until the stream is back
            self._closed.wait(self._delay)
            self._delay = min(self._delay * 2, 30.0)

    def _subscribing(self, subscribe: Callable[[], Any]) -> Callable[[], Any]:
        """minio's stream makes its request on the first read: live once the store answered."""

        def subscribed() -> Any:
            response = subscribe()
            self.live = True
            self._delay = 1.0
            self._notify()  # whatever changed before the store took the subscription
            return response

        return subscribed


def _read(resp, key: str, max_bytes: int | None) -> bytes:
    """A response's body, refusing one longer than ``max_bytes`` before reading it."""
    if max_bytes is None:
        return resp.read()
    length = resp.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > max_bytes:
        raise BadObject(f"{key}: {int(length)} bytes, more than the {max_bytes} allowed")
    data = resp.read(max_bytes + 1)
    if len(data) > max_bytes:
        raise BadObject(f"{key}: more than the {max_bytes} bytes allowed")
    return data


def _transient_s3(exc: S3Error) -> bool:
    return exc.code in ("SlowDown", "InternalError", "ServiceUnavailable", "RequestTimeout") or (
        exc.response is not None and exc.response.status >= 500
    )


def _epoch(value: datetime | None) -> float:
    return value.timestamp() if value else 0.0
