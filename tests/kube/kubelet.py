"""A stand-in for the kubelet: runs the Pods of a Kubernetes API server as local processes.

Nothing schedules or runs Pods on the test API server, so end-to-end tests start a
``KubeletStandIn`` next to it. It talks to the server only through the official ``kubernetes``
client, with the API's standard semantics, so it works the same against a real API server:

* It lists and watches Pods (one namespace or all), re-listing on ``410 Gone`` or a broken stream.
  Every Pod it has not started yet, whose ``status.phase`` is Pending or absent and that has no
  ``deletionTimestamp``, is bound to the node ``kubelet-standin`` (``pods/binding``, when
  ``spec.nodeName`` is empty) and run.
* Running a Pod means running its init containers to completion, in order, then its FIRST
  container as a local process (a warning is logged when there are more containers; the others
  are not run and get no ``containerStatuses`` entry). argv is ``command`` + ``args`` with the
  kubelet's ``$(VAR)`` expansion; without ``command`` the image's entrypoint is unknown and the
  Pod fails with reason ``NoCommand``. The executable is looked up in ``bin_dirs``, then in
  ``PATH``; an absolute path that does not exist here is looked up by its basename in
  ``bin_dirs`` (so ``/usr/local/bin/python`` runs the test's Python).
* The environment is a minimal base (``PATH`` with ``bin_dirs`` first, ``LANG``, ``HOSTNAME``, a
  per-pod ``HOME`` and ``TMPDIR``), then ``extra_env``, then the container's ``envFrom`` and
  ``env`` resolved like the kubelet does: ``value`` with ``$(VAR)``, ``secretKeyRef``,
  ``configMapKeyRef``, ``fieldRef``, ``resourceFieldRef`` (a missing limit is the node's
  allocatable: this machine's CPUs and memory). A missing Secret, ConfigMap or key that is not
  ``optional`` leaves the container waiting with reason ``CreateContainerConfigError`` and the
  kubelet's message; it is retried every few seconds.
* Volumes: ``persistentVolumeClaim`` (the claim's annotation
  ``kubelet-standin.alliance.dev/local-path`` names its local directory; a claim without it
  leaves the container waiting in ``ContainerCreating``; a missing claim leaves the Pod Pending
  with ``PodScheduled=False``/``Unschedulable``), ``emptyDir``, ``hostPath``, ``secret``,
  ``configMap``, ``downwardAPI`` and ``projected`` (service account tokens are not written), each
  a directory under ``work_dir`` (or the claim's / host's directory). ``subPath`` and
  ``subPathExpr`` are supported.
* Status is written with merge patches of ``pods/{name}/status``: phase, conditions, IPs
  (127.0.0.1), ``containerStatuses`` / ``initContainerStatuses`` with restart counts, last
  states, ``CrashLoopBackOff`` with exponential back-off, termination messages (the file at
  ``terminationMessagePath`` when it lies in a mounted volume, else with
  ``FallbackToLogsOnError`` the last 80 lines / 4 KiB of the output).
* ``restartPolicy`` Always / OnFailure / Never as the kubelet applies it. On deletion the process
  group gets SIGTERM, then SIGKILL after ``min(grace period, 10 s)``; a Pod that still exists
  (graceful deletion) is then deleted with grace period 0, as the kubelet does.
* When a container's main process exits, the rest of its process group is killed, as a container
  runtime kills a container's other processes.

Where it differs from a kubelet (on purpose):

* **Mount paths are rewritten.** The process does not run in a container, so a volume cannot
  appear at its ``mountPath``. Every argv element, every environment value, ``workingDir`` and
  readiness probe commands that equal a ``mountPath`` or start with ``mountPath + "/"`` get that
  prefix replaced by the volume's local directory (longest ``mountPath`` first). Paths built
  inside the program, or embedded in a longer string (``--out=/data/x``), are NOT rewritten.
  ``readOnly: true`` cannot be enforced: the process may write into a read-only mount.
* No isolation: processes share this machine's network (ports may collide; pod and host IP are
  127.0.0.1), file system, users and PID space. Resource limits are not enforced (they only feed
  ``resourceFieldRef``); ``securityContext`` (users, read-only root, capabilities) is ignored:
  processes run as the test's user. The image is ignored: the program must exist here.
* Only the first container runs; sidecar init containers (``restartPolicy: Always``) are skipped.
* Only readiness probes run (``exec``, ``httpGet``, ``tcpSocket``; ``grpc`` counts as success);
  liveness and startup probes are ignored, lifecycle hooks are not run.
* Back-off: as with the kubelet, a container's first crash restarts at once (no
  ``CrashLoopBackOff``); from the second on, the restart waits ``backoff_seconds`` (default 1 s,
  the kubelet: 10 s), doubling up to ``max_backoff_seconds`` (10 s; the kubelet: 5 min). A crash
  after the process stayed up 10 x ``backoff_seconds`` counts as a first one again (the kubelet
  forgets a container's back-off after 10 min).
* No Node object is registered, no Events are written, no service environment variables
  (``KUBERNETES_SERVICE_HOST`` ...) are set, Secrets and ConfigMaps mounted as volumes are not
  updated while the Pod runs, and volumes are kept after the Pod is deleted.
* Pods already Running when the stand-in starts are not adopted (their processes are unknown).
* A missing Secret / ConfigMap / claim is retried every ``config_retry_seconds`` (2 s), not with
  the kubelet's back-off; a container whose program cannot be found terminates with exit code 128
  and reason ``StartError`` (and is restarted per ``restartPolicy``), as with containerd.

Use it from a test::

    with KubeletStandIn(kubeconfig, tmp_path / "kubelet", bin_dirs=[Path(sys.executable).parent]):
        ...  # create Pods through the API; they run; .logs(ns, name), .fail_pod(ns, name), ...
"""

from __future__ import annotations

import atexit
import base64
import contextlib
import datetime as dt
import http.client
import json
import logging
import math
import os
import posixpath
import re
import shutil
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Any, Protocol

from kubernetes import config as k8s_config
from kubernetes import watch as k8s_watch
from kubernetes.client import CoreV1Api
from kubernetes.client.exceptions import ApiException
from kubernetes.utils import parse_quantity

log = logging.getLogger(__name__)

LOCAL_PATH_ANNOTATION = "kubelet-standin.alliance.dev/local-path"
NODE_NAME = "kubelet-standin"
LOCAL_IP = "127.0.0.1"
TAIL_LINES = 80
TAIL_BYTES = 4096
MAX_TERMINATION_GRACE = 10.0
DEFAULT_TERMINATION_MESSAGE_PATH = "/dev/termination-log"
_ENV_NAME = re.compile(r"^[-._a-zA-Z][-._a-zA-Z0-9]*$")
_KEYED_FIELD = re.compile(r"^metadata\.(labels|annotations)\['(.+)'\]$")
_TERMINAL = ("Succeeded", "Failed")


# --------------------------------------------------------------------------------------------
# Pure parts: expansion, environment, resources, paths, status.
# --------------------------------------------------------------------------------------------


class ContainerConfigError(Exception):
    """The container cannot be configured yet (reason ``CreateContainerConfigError``)."""


class MountError(Exception):
    """A volume cannot be set up yet (the container stays in ``ContainerCreating``)."""


class Unschedulable(Exception):
    """The Pod cannot be scheduled yet (``PodScheduled=False``, reason ``Unschedulable``)."""


class Lookup(Protocol):
    """Where Secrets and ConfigMaps come from: their data as bytes, or None if absent."""

    def secret(self, namespace: str, name: str) -> dict[str, bytes] | None: ...

    def config_map(self, namespace: str, name: str) -> dict[str, bytes] | None: ...


@dataclass(frozen=True)
class NodeResources:
    """The node's allocatable resources: what a missing limit means for resourceFieldRef."""

    cpu: Decimal
    memory: int
    ephemeral_storage: int

    @classmethod
    def local(cls) -> NodeResources:
        pages = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        return cls(Decimal(os.cpu_count() or 1), pages, shutil.disk_usage("/").total)


def timestamp(when: float | None = None) -> str:
    """An RFC 3339 time in UTC with second precision, as Kubernetes writes them."""
    moment = dt.datetime.fromtimestamp(time.time() if when is None else when, dt.UTC)
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")


def expand(text: str, env: Mapping[str, str]) -> str:
    """The kubelet's ``$(VAR)`` expansion: ``$$`` escapes, unknown references stay as they are."""
    out: list[str] = []
    i, n = 0, len(text)
    while i < n:
        if text[i] == "$" and i + 1 < n:
            nxt = text[i + 1]
            if nxt == "$":
                out.append("$")
                i += 2
                continue
            if nxt == "(":
                end = text.find(")", i + 2)
                if end != -1:
                    name = text[i + 2 : end]
                    out.append(env.get(name, f"$({name})"))
                    i = end + 1
                    continue
                out.append("$(")
                i += 2
                continue
            out.append("$" + nxt)
            i += 2
            continue
        out.append(text[i])
        i += 1
    return "".join(out)


def rewrite_path(value: str, mounts: Mapping[str, str]) -> str:
    """Replace the longest ``mountPath`` that ``value`` equals or starts with (+ "/")."""
    for mount in sorted(mounts, key=len, reverse=True):
        if value == mount:
            return mounts[mount]
        if value.startswith(mount + "/"):
            return mounts[mount] + value[len(mount) :]
    return value


def format_map(values: Mapping[str, str]) -> str:
    """``key="value"`` lines, sorted, as the downward API writes labels and annotations."""
    return "\n".join(f"{k}={json.dumps(values[k])}" for k in sorted(values))


def field_value(pod: Mapping[str, Any], path: str) -> str:
    """The value of a downward API ``fieldRef`` for a Pod running on this stand-in."""
    meta = pod.get("metadata") or {}
    spec = pod.get("spec") or {}
    simple = {
        "metadata.name": meta.get("name", ""),
        "metadata.namespace": meta.get("namespace") or "default",
        "metadata.uid": meta.get("uid", ""),
        "spec.nodeName": spec.get("nodeName") or NODE_NAME,
        "spec.serviceAccountName": (
            spec.get("serviceAccountName") or spec.get("serviceAccount") or "default"
        ),
        "status.podIP": LOCAL_IP,
        "status.podIPs": LOCAL_IP,
        "status.hostIP": LOCAL_IP,
        "status.hostIPs": LOCAL_IP,
    }
    if path in simple:
        return simple[path]
    keyed = _KEYED_FIELD.match(path)
    if keyed:
        return (meta.get(keyed[1]) or {}).get(keyed[2], "")
    if path in ("metadata.labels", "metadata.annotations"):
        return format_map(meta.get(path.split(".")[1]) or {})
    raise ContainerConfigError(f"unsupported fieldPath: {path}")


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def resource_value(
    container: Mapping[str, Any],
    resource: str,
    divisor: str | int | None = None,
    node: NodeResources | None = None,
) -> str:
    """A ``resourceFieldRef`` value: rounded up to a whole number of ``divisor``, like the kubelet.

    A missing limit is the node's allocatable; a missing request is the limit (the API server's
    defaulting), else 0.
    """
    node = node or NodeResources.local()
    resources = container.get("resources") or {}
    limits = resources.get("limits") or {}
    requests = resources.get("requests") or {}
    kind, _, name = resource.partition(".")
    allocatable = {
        "cpu": node.cpu,
        "memory": Decimal(node.memory),
        "ephemeral-storage": Decimal(node.ephemeral_storage),
    }
    if kind == "limits":
        raw = limits.get(name)
        quantity = parse_quantity(raw) if raw is not None else allocatable.get(name, Decimal(0))
    elif kind == "requests":
        raw = requests.get(name, limits.get(name))
        quantity = parse_quantity(raw) if raw is not None else Decimal(0)
    else:
        raise ContainerConfigError(f"unsupported container resource: {resource}")
    div = parse_quantity(str(divisor)) if divisor not in (None, "", 0, "0") else Decimal(1)
    if name == "cpu":
        return str(_ceil_div(math.ceil(quantity * 1000), max(1, math.ceil(div * 1000))))
    return str(_ceil_div(math.ceil(quantity), max(1, math.ceil(div))))


def _find_container(pod: Mapping[str, Any], name: str | None, default: Mapping[str, Any]):
    if not name:
        return default
    spec = pod.get("spec") or {}
    for c in [*(spec.get("initContainers") or []), *(spec.get("containers") or [])]:
        if c.get("name") == name:
            return c
    raise ContainerConfigError(f"container {name} not found")


def _decode(value: bytes) -> str:
    return value.decode("utf-8", errors="replace")


def _key_ref(lookup: Lookup, kind: str, namespace: str, ref: Mapping[str, Any]) -> str | None:
    """A secretKeyRef / configMapKeyRef value; None when optional and missing."""
    name, key, optional = ref.get("name", ""), ref.get("key", ""), bool(ref.get("optional"))
    if kind == "secret":
        data, label, title = lookup.secret(namespace, name), "secret", "Secret"
    else:
        data, label, title = lookup.config_map(namespace, name), "configmap", "ConfigMap"
    if data is None:
        if optional:
            return None
        raise ContainerConfigError(f'{label} "{name}" not found')
    if key not in data:
        if optional:
            return None
        raise ContainerConfigError(f"couldn't find key {key} in {title} {namespace}/{name}")
    return _decode(data[key])


def resolve_env(
    pod: Mapping[str, Any],
    container: Mapping[str, Any],
    lookup: Lookup,
    node: NodeResources | None = None,
) -> dict[str, str]:
    """The container's environment as the kubelet builds it: ``envFrom`` first, then ``env``.

    Raises ContainerConfigError with the kubelet's message when a reference cannot be resolved.
    """
    namespace = (pod.get("metadata") or {}).get("namespace") or "default"
    env: dict[str, str] = {}
    for source in container.get("envFrom") or []:
        prefix = source.get("prefix", "")
        if "secretRef" in source:
            ref, data = source["secretRef"], lookup.secret(namespace, source["secretRef"]["name"])
            label = "secret"
        elif "configMapRef" in source:
            ref = source["configMapRef"]
            data, label = lookup.config_map(namespace, ref["name"]), "configmap"
        else:
            continue
        if data is None:
            if ref.get("optional"):
                continue
            raise ContainerConfigError(f'{label} "{ref["name"]}" not found')
        for key, value in data.items():
            if not _ENV_NAME.match(prefix + key):
                log.warning("envFrom %s %s: skipping invalid name %r", label, ref["name"], key)
                continue
            env[prefix + key] = _decode(value)
    for var in container.get("env") or []:
        source = var.get("valueFrom")
        if source is None:
            env[var["name"]] = expand(var.get("value", ""), env)
            continue
        if "secretKeyRef" in source:
            value = _key_ref(lookup, "secret", namespace, source["secretKeyRef"])
        elif "configMapKeyRef" in source:
            value = _key_ref(lookup, "configmap", namespace, source["configMapKeyRef"])
        elif "fieldRef" in source:
            value = field_value(pod, source["fieldRef"]["fieldPath"])
        elif "resourceFieldRef" in source:
            ref = source["resourceFieldRef"]
            target = _find_container(pod, ref.get("containerName"), container)
            value = resource_value(target, ref["resource"], ref.get("divisor"), node)
        else:
            raise ContainerConfigError(f"unsupported valueFrom for {var['name']}: {source}")
        if value is not None:
            env[var["name"]] = value
    return env


def container_mounts(
    container: Mapping[str, Any], volumes: Mapping[str, Path], env: Mapping[str, str]
) -> dict[str, str]:
    """mountPath -> local path for a container's volumeMounts (subPath dirs are created)."""
    mounts: dict[str, str] = {}
    for mount in container.get("volumeMounts") or []:
        if mount["name"] not in volumes:
            raise ContainerConfigError(f'volume "{mount["name"]}" not found in the pod spec')
        local = volumes[mount["name"]]
        sub = mount.get("subPath") or expand(mount.get("subPathExpr", ""), env)
        if sub:
            local = local / sub
            if not local.exists():
                local.mkdir(parents=True, exist_ok=True)
        path = posixpath.normpath(mount["mountPath"])
        if path in ("/", "."):
            log.warning("mountPath %r cannot be rewritten; ignored", mount["mountPath"])
            continue
        mounts[path] = str(local)
    return mounts


def process_env(
    base: Mapping[str, str],
    extra: Mapping[str, str],
    container_env: Mapping[str, str],
    mounts: Mapping[str, str],
) -> dict[str, str]:
    """base < extra_env < the container's env, whose values get the mount path rewriting."""
    env = {**base, **{k: str(v) for k, v in extra.items()}}
    env.update({k: rewrite_path(v, mounts) for k, v in container_env.items()})
    return env


def container_argv(
    container: Mapping[str, Any], env: Mapping[str, str], mounts: Mapping[str, str]
) -> list[str]:
    """command + args with ``$(VAR)`` expanded from the container env, then paths rewritten."""
    raw = [*(container.get("command") or []), *(container.get("args") or [])]
    return [rewrite_path(expand(str(a), env), mounts) for a in raw]


def find_executable(name: str, bin_dirs: Iterable[Path], path: str, cwd: Path) -> str | None:
    """bin_dirs, then PATH; a path as is (if absolute and missing: its basename in bin_dirs)."""

    def runnable(candidate: Path) -> bool:
        return candidate.is_file() and os.access(candidate, os.X_OK)

    if "/" in name:
        candidate = Path(name) if os.path.isabs(name) else cwd / name
        if runnable(candidate):
            return str(candidate)
        if os.path.isabs(name):
            for d in bin_dirs:
                if runnable(Path(d) / candidate.name):
                    return str(Path(d) / candidate.name)
        return None
    for d in bin_dirs:
        if runnable(Path(d) / name):
            return str(Path(d) / name)
    return shutil.which(name, path=path)


def tail_text(data: bytes, lines: int = TAIL_LINES, max_bytes: int = TAIL_BYTES) -> str:
    """The last ``lines`` lines of output, at most ``max_bytes`` bytes of them."""
    kept = data.rstrip(b"\n").split(b"\n")[-lines:]
    return _decode(b"\n".join(kept)[-max_bytes:])


def go_duration(seconds: float) -> str:
    """A duration as Go prints it (``500ms``, ``10s``, ``1m20s``): the kubelet's back-off text."""
    if seconds < 1:
        return f"{round(seconds * 1000)}ms" if seconds > 0 else "0s"
    minutes, secs = divmod(round(seconds, 3), 60)
    hours, minutes = divmod(int(minutes), 60)
    text = f"{secs:.3f}".rstrip("0").rstrip(".") + "s"
    if hours:
        return f"{hours}h{minutes}m{text}"
    return f"{minutes}m{text}" if minutes else text


def should_restart(policy: str | None, kind: str, exit_code: int) -> bool:
    """Whether the kubelet restarts a container ("init" or "main") that exited with exit_code."""
    policy = policy or "Always"
    if kind == "init":  # a successful init container is done; a failed one is retried
        return exit_code != 0 and policy != "Never"
    return policy == "Always" or (policy == "OnFailure" and exit_code != 0)


def backoff_delays(
    current: float, uptime: float, initial: float, maximum: float
) -> tuple[float, float]:
    """(this restart's delay, the next one's). As the kubelet: a container's first crash (no
    back-off yet, ``current`` 0) restarts at once; from the second the delay starts at
    ``initial`` and doubles up to ``maximum``; a crash after the container stayed up
    10 x ``initial`` counts as a first one again."""
    if current == 0.0 or uptime >= 10 * initial:
        return 0.0, initial
    return current, min(current * 2, maximum)


@dataclass
class ContainerStatus:
    """One entry of ``containerStatuses`` / ``initContainerStatuses``."""

    name: str
    image: str = ""
    restart_count: int = 0
    state: dict[str, Any] = field(
        default_factory=lambda: {"waiting": {"reason": "ContainerCreating"}}
    )
    last_state: dict[str, Any] = field(default_factory=dict)
    ready: bool = False
    started: bool = False
    container_id: str | None = None

    def waiting(self, reason: str, message: str | None = None) -> None:
        self.state = {"waiting": {"reason": reason, **({"message": message} if message else {})}}
        self.ready = False
        self.started = False

    def to_api(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "name": self.name,
            "image": self.image,
            "imageID": f"standin://{self.image}" if self.container_id else "",
            "ready": self.ready,
            "started": self.started,
            "restartCount": self.restart_count,
            "state": self.state,
            "lastState": self.last_state,
        }
        if self.container_id:
            out["containerID"] = self.container_id
        return out


@dataclass
class PodState:
    """What the stand-in knows about one Pod; ``build_status`` turns it into ``status``."""

    pod: dict[str, Any]
    phase: str = "Pending"
    reason: str | None = None
    message: str | None = None
    unschedulable: str | None = None
    start_time: str | None = None
    init_statuses: list[ContainerStatus] = field(default_factory=list)
    statuses: list[ContainerStatus] = field(default_factory=list)
    stage: int = 0
    transitions: dict[str, tuple[str, str]] = field(default_factory=dict)

    @classmethod
    def for_pod(cls, pod: dict[str, Any]) -> PodState:
        spec = pod.get("spec") or {}
        inits = [c for c in spec.get("initContainers") or [] if c.get("restartPolicy") != "Always"]
        first = (spec.get("containers") or [{}])[:1]
        state = cls(pod=pod)
        for c in inits:
            status = ContainerStatus(c.get("name", ""), c.get("image", ""))
            status.waiting("PodInitializing")
            state.init_statuses.append(status)
        for c in first:
            status = ContainerStatus(c.get("name", ""), c.get("image", ""))
            if inits:
                status.waiting("PodInitializing")
            state.statuses.append(status)
        return state

    @property
    def namespace(self) -> str:
        return self.pod["metadata"].get("namespace") or "default"

    @property
    def name(self) -> str:
        return self.pod["metadata"]["name"]

    @property
    def uid(self) -> str:
        return self.pod["metadata"].get("uid", "")

    @property
    def initialized(self) -> bool:
        return self.stage >= len(self.init_statuses)

    def current(self) -> tuple[str, ContainerStatus]:
        """("init" | "main", status) of the container that runs next."""
        if not self.initialized:
            return "init", self.init_statuses[self.stage]
        return "main", self.statuses[0]


def _condition(state: PodState, kind: str, status: str, now: str, reason=None, message=None):
    previous = state.transitions.get(kind)
    if previous is None or previous[0] != status:
        state.transitions[kind] = (status, now)
    out = {"type": kind, "status": status, "lastTransitionTime": state.transitions[kind][1]}
    if reason:
        out["reason"] = reason
    if message:
        out["message"] = message
    return out


def build_status(state: PodState, now: str | None = None) -> dict[str, Any]:
    """The Pod's ``status`` as a kubelet would report it (for a merge patch)."""
    now = now or timestamp()
    if state.unschedulable is not None:
        cond = _condition(state, "PodScheduled", "False", now, "Unschedulable", state.unschedulable)
        return {"phase": "Pending", "conditions": [cond]}
    main = state.statuses[0] if state.statuses else None
    ready = bool(main and main.ready) and state.phase == "Running"
    completed = state.phase == "Succeeded"
    unready = f"containers with unready status: [{main.name if main else ''}]"
    pending = [s.name for s in state.init_statuses[state.stage :]]
    if state.initialized:
        initialized = _condition(
            state, "Initialized", "True", now, "PodCompleted" if completed else None
        )
    else:
        message = f"containers with incomplete status: [{' '.join(pending)}]"
        initialized = _condition(
            state, "Initialized", "False", now, "ContainersNotInitialized", message
        )
    if ready:
        why: tuple[str | None, str | None] = (None, None)
    elif completed:
        why = ("PodCompleted", None)
    else:
        why = ("ContainersNotReady", unready)
    flag = "True" if ready else "False"
    conditions = [
        _condition(state, "PodReadyToStartContainers", "True", now),
        initialized,
        _condition(state, "Ready", flag, now, *why),
        _condition(state, "ContainersReady", flag, now, *why),
        _condition(state, "PodScheduled", "True", now),
    ]
    status: dict[str, Any] = {
        "phase": state.phase,
        "conditions": conditions,
        "hostIP": LOCAL_IP,
        "hostIPs": [{"ip": LOCAL_IP}],
        "podIP": LOCAL_IP,
        "podIPs": [{"ip": LOCAL_IP}],
        "startTime": state.start_time or now,
        "containerStatuses": [s.to_api() for s in state.statuses],
    }
    if state.init_statuses:
        status["initContainerStatuses"] = [s.to_api() for s in state.init_statuses]
    if state.reason:
        status["reason"] = state.reason
    if state.message:
        status["message"] = state.message
    return status


# --------------------------------------------------------------------------------------------
# Volumes: files written for secret / configMap / downwardAPI / projected volumes.
# --------------------------------------------------------------------------------------------


def _write_file(directory: Path, relative: str, content: bytes, mode: int) -> None:
    target = directory / relative
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_bytes(content)
    target.chmod(mode)


def write_key_files(
    directory: Path,
    data: Mapping[str, bytes],
    items: list[Mapping[str, Any]] | None,
    mode: int,
    optional: bool,
    missing_key: Callable[[str], str],
) -> None:
    """Each key (or each listed item) of ``data`` as a file, like secret/configMap volumes."""
    if not items:
        for key, value in data.items():
            _write_file(directory, key, value, mode)
        return
    for item in items:
        if item["key"] not in data:
            if optional:
                continue
            raise MountError(missing_key(item["key"]))
        _write_file(directory, item["path"], data[item["key"]], item.get("mode", mode))


# --------------------------------------------------------------------------------------------
# The stand-in.
# --------------------------------------------------------------------------------------------


class _DictWatch(k8s_watch.Watch):
    """The client's watch, yielding objects as plain dicts (camelCase, as the server sent them)."""

    def unmarshal_event(self, data, return_type):
        return super().unmarshal_event(data, None)


@dataclass
class _Launch:
    argv: list[str]
    executable: str | None
    env: dict[str, str]
    cwd: Path
    mounts: dict[str, str]


@dataclass
class _Process:
    popen: subprocess.Popen
    kind: str
    container: dict[str, Any]
    status: ContainerStatus
    launch: _Launch
    started_mono: float
    started_at: str
    log_offset: int


@dataclass
class _Probe:
    next_at: float
    thread: threading.Thread | None = None
    result: list[bool] = field(default_factory=list)
    successes: int = 0
    failures: int = 0


@dataclass
class _Run(PodState):
    """A PodState plus the stand-in's bookkeeping for it."""

    directory: Path = Path()
    volumes: dict[str, Path] | None = None
    bound: bool = False
    proc: _Process | None = None
    probe: _Probe | None = None
    backoff: float = 0.0  # the next crash's restart delay; 0: no crash yet, restart at once
    next_action_at: float = 0.0
    done: bool = False
    dirty: bool = True
    next_patch_at: float = 0.0
    terminating: bool = False
    finalize: bool = False
    gone: bool = False
    kill_deadline: float = math.inf
    evict: tuple[str, str] | None = None
    last_exit: int | None = None


class _ApiLookup:
    """Secrets and ConfigMaps read through the API, cached for one start attempt."""

    def __init__(self, api: CoreV1Api) -> None:
        self.api = api
        self.cache: dict[tuple[str, str, str], dict[str, bytes] | None] = {}

    def _read(self, kind: str, namespace: str, name: str) -> dict[str, bytes] | None:
        key = (kind, namespace, name)
        if key not in self.cache:
            read = (
                self.api.read_namespaced_secret
                if kind == "secret"
                else self.api.read_namespaced_config_map
            )
            try:
                resp = read(name, namespace, _preload_content=False, _request_timeout=10)
                obj = json.loads(resp.data)
            except ApiException as exc:
                if exc.status != 404:
                    raise
                self.cache[key] = None
            else:
                data: dict[str, bytes] = {}
                if kind == "secret":
                    data.update(
                        {k: base64.b64decode(v) for k, v in (obj.get("data") or {}).items()}
                    )
                    # Write-only; a real server folds it into data. Harmless if it never appears.
                    string_data = obj.get("stringData") or {}
                    data.update({k: v.encode() for k, v in string_data.items()})
                else:
                    data.update({k: v.encode() for k, v in (obj.get("data") or {}).items()})
                    binary = obj.get("binaryData") or {}
                    data.update({k: base64.b64decode(v) for k, v in binary.items()})
                self.cache[key] = data
        return self.cache[key]

    def secret(self, namespace: str, name: str) -> dict[str, bytes] | None:
        return self._read("secret", namespace, name)

    def config_map(self, namespace: str, name: str) -> dict[str, bytes] | None:
        return self._read("configmap", namespace, name)


def _killpg(pid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, sig)


def group_alive(pgid: int) -> bool:
    """Whether a process group still has a live (non-zombie) member."""
    proc = Path("/proc")
    if not proc.is_dir():  # not Linux: any member, zombies included
        try:
            os.killpg(pgid, 0)
        except (ProcessLookupError, PermissionError):
            return False
        return True
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2 :].split()  # state, ppid, pgrp, ...
        if int(fields[2]) == pgid and fields[0] not in ("Z", "X"):
            return True
    return False


class KubeletStandIn:
    """Runs the Pods of an API server as local processes; see the module docstring."""

    config_retry_seconds = 2.0  # CreateContainerConfigError / ContainerCreating / Unschedulable
    tick_seconds = 0.1

    def __init__(
        self,
        kubeconfig: Path,
        work_dir: Path,
        namespace: str | None = None,
        bin_dirs: Iterable[Path] = (),
        backoff_seconds: float = 1.0,
        max_backoff_seconds: float = 10.0,
        extra_env: Mapping[str, str] | None = None,
    ) -> None:
        self.kubeconfig = Path(kubeconfig)
        self.work_dir = Path(work_dir)
        self.namespace = namespace
        self.bin_dirs = [Path(d) for d in bin_dirs]
        self.backoff_seconds = backoff_seconds
        self.max_backoff_seconds = max_backoff_seconds
        self.extra_env = dict(extra_env or {})
        self.node = NodeResources.local()
        self._lock = threading.RLock()
        self._runs: dict[str, _Run] = {}
        self._stopping = threading.Event()
        self._synced = threading.Event()
        self._threads: list[threading.Thread] = []
        self._watch: _DictWatch | None = None
        self._client = None
        self._api: CoreV1Api | None = None
        self._bind_warned = False

    # -- lifecycle ---------------------------------------------------------------------------

    def start(self, timeout: float = 10.0) -> KubeletStandIn:
        """Start the watch and supervisor threads; wait for the first list of Pods."""
        (self.work_dir / "logs").mkdir(parents=True, exist_ok=True)
        self._client = k8s_config.new_client_from_config(config_file=str(self.kubeconfig))
        self._api = CoreV1Api(self._client)
        atexit.register(self._atexit)
        for target, name in ((self._watch_loop, "watch"), (self._supervise, "supervisor")):
            thread = threading.Thread(target=target, name=f"kubelet-standin-{name}", daemon=True)
            thread.start()
            self._threads.append(thread)
        if not self._synced.wait(timeout):
            log.warning("kubelet stand-in: no Pod list after %.0f s; continuing", timeout)
        return self

    def stop(self, grace: float = 5.0) -> None:
        """Stop watching, terminate every process started (SIGTERM, SIGKILL after ``grace``)."""
        self._stopping.set()
        deadline = time.monotonic() + 15
        for thread in self._threads:
            while thread.is_alive() and time.monotonic() < deadline:
                self._interrupt_watch()  # again: a new watch may have begun meanwhile
                thread.join(timeout=0.2)
        self._threads.clear()
        self._kill_all(grace)
        atexit.unregister(self._atexit)
        if self._client is not None:
            with contextlib.suppress(Exception):
                self._client.close()
            self._client = None

    def __enter__(self) -> KubeletStandIn:
        return self.start()

    def __exit__(self, *exc_info) -> None:
        self.stop()

    def _atexit(self) -> None:
        self._stopping.set()
        self._kill_all(2.0)

    def _interrupt_watch(self) -> None:
        w = self._watch
        if w is None:
            return
        w.stop()
        resp = getattr(w, "_resp", None)
        if resp is not None:
            with contextlib.suppress(Exception):
                resp.shutdown()

    def _kill_all(self, grace: float) -> None:
        with self._lock:
            procs = [run.proc for run in self._runs.values() if run.proc is not None]
            for run in self._runs.values():
                run.proc = None
        for proc in procs:
            _killpg(proc.popen.pid, signal.SIGTERM)
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline and any(p.popen.poll() is None for p in procs):
            time.sleep(0.05)
        for proc in procs:
            _killpg(proc.popen.pid, signal.SIGKILL)
            with contextlib.suppress(Exception):
                proc.popen.wait(timeout=5)
        # SIGKILL is delivered asynchronously: wait until the groups' other members are gone too.
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and any(group_alive(p.popen.pid) for p in procs):
            time.sleep(0.02)

    # -- public helpers for tests ------------------------------------------------------------

    def log_path(self, namespace: str, name: str) -> Path:
        return self.work_dir / "logs" / f"{namespace}_{name}.log"

    def logs(self, namespace: str, name: str) -> str:
        path = self.log_path(namespace, name)
        return path.read_text(errors="replace") if path.exists() else ""

    def pid(self, namespace: str, name: str) -> int | None:
        """The pid of the Pod's running process (its process group id too), or None."""
        with self._lock:
            run = self._find(namespace, name)
            if run is None or run.proc is None or run.proc.popen.poll() is not None:
                return None
            return run.proc.popen.pid

    def kill_process(self, namespace: str, name: str, sig: int = signal.SIGKILL) -> int | None:
        """Send ``sig`` to the Pod's process group, like a crash; the restart policy applies."""
        with self._lock:
            pid = self.pid(namespace, name)
            if pid is not None:
                _killpg(pid, sig)
            return pid

    def fail_pod(
        self,
        namespace: str,
        name: str,
        reason: str = "Evicted",
        message: str = "The node was low on resource: memory.",
        timeout: float = 10.0,
    ) -> None:
        """Simulate an eviction: SIGKILL the process, phase Failed with reason/message, no restart.

        Returns once the process is gone and the Failed status is recorded (it is patched on the
        supervisor's next tick).
        """
        with self._lock:
            run = self._find(namespace, name)
            if run is None:
                raise KeyError(f"no pod {namespace}/{name} run by the kubelet stand-in")
            if run.done:
                return
            run.evict = (reason, message)
            if run.proc is not None:
                _killpg(run.proc.popen.pid, signal.SIGKILL)
            else:
                self._evicted(run, None)
        self.wait_for(lambda: run.done and run.proc is None, timeout)

    def wait_for(self, predicate: Callable[[], Any], timeout: float, interval: float = 0.05):
        """Poll ``predicate`` until it returns something truthy; TimeoutError after ``timeout``."""
        deadline = time.monotonic() + timeout
        while True:
            result = predicate()
            if result:
                return result
            if time.monotonic() >= deadline:
                raise TimeoutError(f"condition not met within {timeout} s")
            time.sleep(interval)

    def _find(self, namespace: str, name: str) -> _Run | None:
        found = None
        for run in self._runs.values():
            if (run.namespace, run.name) != (namespace, name):
                continue
            if found is None or (found.terminating and not run.terminating):
                found = run
        return found

    # -- watch -------------------------------------------------------------------------------

    def _watch_loop(self) -> None:
        assert self._api is not None
        list_pods = (
            (lambda **kw: self._api.list_namespaced_pod(self.namespace, **kw))
            if self.namespace
            else self._api.list_pod_for_all_namespaces
        )
        watch_fn = (
            self._api.list_namespaced_pod
            if self.namespace
            else self._api.list_pod_for_all_namespaces
        )
        watch_args = (self.namespace,) if self.namespace else ()
        while not self._stopping.is_set():
            try:
                resp = list_pods(_preload_content=False, _request_timeout=30)
                listed = json.loads(resp.data)
                self._relisted(listed.get("items") or [])
                version = listed["metadata"]["resourceVersion"]
                self._synced.set()
                while not self._stopping.is_set():
                    self._watch = _DictWatch()
                    for event in self._watch.stream(
                        watch_fn,
                        *watch_args,
                        resource_version=version,
                        allow_watch_bookmarks=True,
                        timeout_seconds=60,
                        _request_timeout=(10, 90),
                    ):
                        if self._stopping.is_set():
                            break
                        obj = event["raw_object"]
                        version = (obj.get("metadata") or {}).get("resourceVersion") or version
                        if event["type"] in ("ADDED", "MODIFIED", "DELETED"):
                            self._on_event(event["type"], obj)
            except ApiException as exc:
                if self._stopping.is_set():
                    break
                if exc.status == 410:
                    log.info("kubelet stand-in: watch expired (410); re-listing")
                    self._stopping.wait(0.1)
                else:
                    log.warning("kubelet stand-in: watch failed: %s; re-listing", exc)
                    self._stopping.wait(1.0)
            except Exception as exc:
                if self._stopping.is_set():
                    break
                log.warning("kubelet stand-in: watch broken (%r); re-listing", exc)
                self._stopping.wait(1.0)

    def _relisted(self, items: list[dict[str, Any]]) -> None:
        uids = {item["metadata"].get("uid") for item in items}
        with self._lock:
            for run in list(self._runs.values()):
                if run.uid not in uids:
                    run.gone = True
                    self._terminate(run, finalize=False)
        for item in items:
            self._on_event("ADDED", item)

    def _on_event(self, kind: str, pod: dict[str, Any]) -> None:
        meta = pod.get("metadata") or {}
        uid = meta.get("uid", "")
        with self._lock:
            run = self._runs.get(uid)
            if kind == "DELETED":
                if run is not None:
                    run.gone = True
                    run.pod = pod
                    self._terminate(run, finalize=False)
                return
            if run is not None:
                run.pod = pod
                if meta.get("deletionTimestamp"):
                    self._terminate(run, finalize=True)
                return
            phase = (pod.get("status") or {}).get("phase")
            if meta.get("deletionTimestamp") or phase not in (None, "", "Pending"):
                return
            if not (pod.get("spec") or {}).get("containers"):
                log.warning("pod %s/%s has no containers", meta.get("namespace"), meta.get("name"))
                return
            for other in self._runs.values():
                if (other.namespace, other.name) == (meta.get("namespace"), meta.get("name")):
                    other.gone = True  # replaced by a new Pod of the same name
                    self._terminate(other, finalize=False)
            run = _Run(**vars(PodState.for_pod(pod)))
            run.directory = self.work_dir / "pods" / f"{run.namespace}_{run.name}_{uid[:8]}"
            self._runs[uid] = run
            containers = pod["spec"]["containers"]
            if len(containers) > 1:
                log.warning(
                    "pod %s/%s has %d containers; the kubelet stand-in runs only %r",
                    run.namespace,
                    run.name,
                    len(containers),
                    containers[0].get("name"),
                )
            for c in (pod.get("spec") or {}).get("initContainers") or []:
                if c.get("restartPolicy") == "Always":
                    log.warning("pod %s/%s: sidecar %r skipped", run.namespace, run.name, c["name"])

    def _terminate(self, run: _Run, finalize: bool) -> None:
        """Begin stopping a Pod's process: SIGTERM now, SIGKILL after the grace period."""
        if run.terminating:
            return
        run.terminating = True
        run.finalize = finalize
        meta, spec = run.pod.get("metadata") or {}, run.pod.get("spec") or {}
        grace = meta.get("deletionGracePeriodSeconds")
        if grace is None:
            grace = spec.get("terminationGracePeriodSeconds")
        grace = min(float(30 if grace is None else grace), MAX_TERMINATION_GRACE)
        if run.proc is not None and run.proc.popen.poll() is None:
            _killpg(run.proc.popen.pid, signal.SIGTERM)
            run.kill_deadline = time.monotonic() + grace

    # -- supervisor --------------------------------------------------------------------------

    def _supervise(self) -> None:
        while not self._stopping.is_set():
            with self._lock:
                runs = list(self._runs.values())
            for run in runs:
                if self._stopping.is_set():
                    break
                try:
                    with self._lock:
                        self._step(run)
                except Exception:
                    log.exception("kubelet stand-in: pod %s/%s", run.namespace, run.name)
                    run.next_action_at = time.monotonic() + self.config_retry_seconds
            self._stopping.wait(self.tick_seconds)

    def _step(self, run: _Run) -> None:
        now = time.monotonic()
        if run.terminating:
            self._step_terminating(run, now)
            return
        if run.proc is not None:
            code = run.proc.popen.poll()
            if code is None:
                self._probe(run, now)
            else:
                self._exited(run, code)
        elif not run.done and now >= run.next_action_at:
            self._try_start(run, now)
        if run.dirty and now >= run.next_patch_at:
            self._patch_status(run)

    def _step_terminating(self, run: _Run, now: float) -> None:
        if run.proc is not None:
            if run.proc.popen.poll() is None:
                if now >= run.kill_deadline:
                    _killpg(run.proc.popen.pid, signal.SIGKILL)
                    run.kill_deadline = math.inf
                return
            proc, run.proc = run.proc, None
            _killpg(proc.popen.pid, signal.SIGKILL)
            code = self._exit_code(proc.popen.returncode)
            run.last_exit = code
            term = self._terminated(run, proc, code)
            proc.status.state = {"terminated": term}
            proc.status.ready = proc.status.started = False
            run.dirty = True
        if run.finalize and not run.gone:
            if now < run.next_patch_at:
                return
            if run.phase not in _TERMINAL:
                run.phase = "Succeeded" if run.last_exit == 0 and run.initialized else "Failed"
            for status in run.statuses:
                if status.ready:
                    status.ready = False
            if run.dirty:
                self._patch_status(run)
            if not run.gone and not self._delete_pod(run):
                run.next_patch_at = now + 1.0
                return
        self._runs.pop(run.uid, None)

    def _delete_pod(self, run: _Run) -> bool:
        """The kubelet's last word on a gracefully deleted Pod: delete it with grace period 0."""
        assert self._api is not None
        try:
            self._api.delete_namespaced_pod(
                run.name,
                run.namespace,
                body={"gracePeriodSeconds": 0, "preconditions": {"uid": run.uid}},
                _preload_content=False,
                _request_timeout=10,
            )
        except ApiException as exc:
            if exc.status in (404, 409):
                return True
            log.warning("kubelet stand-in: deleting %s/%s: %s", run.namespace, run.name, exc)
            return False
        except Exception as exc:
            log.warning("kubelet stand-in: deleting %s/%s: %r", run.namespace, run.name, exc)
            return False
        return True

    def _patch_status(self, run: _Run) -> None:
        assert self._api is not None
        body = {"metadata": {"uid": run.uid}, "status": build_status(run)}
        try:
            self._api.patch_namespaced_pod_status(
                run.name,
                run.namespace,
                body,
                _content_type="application/merge-patch+json",
                _preload_content=False,
                _request_timeout=10,
            )
        except ApiException as exc:
            if exc.status == 404:
                log.info("kubelet stand-in: pod %s/%s is gone", run.namespace, run.name)
                run.gone = True
                run.dirty = False
                self._terminate(run, finalize=False)
                return
            log.warning("kubelet stand-in: status of %s/%s: %s", run.namespace, run.name, exc)
            run.next_patch_at = time.monotonic() + 1.0
        except Exception as exc:
            log.warning("kubelet stand-in: status of %s/%s: %r", run.namespace, run.name, exc)
            run.next_patch_at = time.monotonic() + 1.0
        else:
            run.dirty = False

    # -- starting ----------------------------------------------------------------------------

    def _try_start(self, run: _Run, now: float) -> None:
        assert self._api is not None
        lookup = _ApiLookup(self._api)
        kind, status = run.current()
        try:
            if run.volumes is None:
                claims = self._claims(run)
                if run.unschedulable is not None:
                    run.unschedulable = None
                    run.dirty = True
                self._schedule(run)
                run.volumes = self._setup_volumes(run, claims, lookup)
            container = self._container(run, kind)
            if not container.get("command"):
                self._no_command(run, status)
                return
            env = resolve_env(run.pod, container, lookup, self.node)
            launch = self._prepare(run, container, env)
        except Unschedulable as exc:
            if run.unschedulable != str(exc):
                run.unschedulable = str(exc)
                run.dirty = True
            run.next_action_at = now + self.config_retry_seconds
            return
        except MountError as exc:
            self._waiting(run, status, "ContainerCreating", str(exc))
            return
        except ContainerConfigError as exc:
            self._waiting(run, status, "CreateContainerConfigError", str(exc))
            return
        self._launch(run, kind, container, status, launch)

    def _waiting(self, run: _Run, status: ContainerStatus, reason: str, message: str) -> None:
        if status.state.get("waiting") != {"reason": reason, "message": message}:
            log.info("pod %s/%s: %s: %s", run.namespace, run.name, reason, message)
            status.waiting(reason, message)
            run.dirty = True
        run.next_action_at = time.monotonic() + self.config_retry_seconds

    def _container(self, run: _Run, kind: str) -> dict[str, Any]:
        spec = run.pod.get("spec") or {}
        if kind == "main":
            return spec["containers"][0]
        inits = [c for c in spec.get("initContainers") or [] if c.get("restartPolicy") != "Always"]
        return inits[run.stage]

    def _no_command(self, run: _Run, status: ContainerStatus) -> None:
        message = (
            f"container {status.name} has no command: the kubelet stand-in cannot know the "
            "entrypoint of its image"
        )
        log.warning("pod %s/%s: %s", run.namespace, run.name, message)
        now = timestamp()
        status.state = {
            "terminated": {
                "exitCode": 128,
                "reason": "NoCommand",
                "message": message,
                "startedAt": now,
                "finishedAt": now,
            }
        }
        status.ready = status.started = False
        run.phase, run.reason, run.message = "Failed", "NoCommand", message
        run.done = run.dirty = True

    def _claims(self, run: _Run) -> dict[str, dict[str, Any]]:
        """The Pod's PersistentVolumeClaims; Unschedulable when one is missing or being deleted."""
        assert self._api is not None
        claims: dict[str, dict[str, Any]] = {}
        for volume in (run.pod.get("spec") or {}).get("volumes") or []:
            source = volume.get("persistentVolumeClaim")
            if not source:
                continue
            name = source["claimName"]
            try:
                resp = self._api.read_namespaced_persistent_volume_claim(
                    name, run.namespace, _preload_content=False, _request_timeout=10
                )
            except ApiException as exc:
                if exc.status == 404:
                    raise Unschedulable(f'persistentvolumeclaim "{name}" not found') from None
                raise
            claim = json.loads(resp.data)
            if (claim.get("metadata") or {}).get("deletionTimestamp"):
                raise Unschedulable(f'persistentvolumeclaim "{name}" is being deleted')
            claims[name] = claim
        return claims

    def _schedule(self, run: _Run) -> None:
        """Bind the Pod to this node (what the scheduler would do), once; failures are logged."""
        if run.start_time is None:
            run.start_time = timestamp()
            run.dirty = True
        if run.bound or (run.pod.get("spec") or {}).get("nodeName"):
            run.bound = True
            return
        assert self._api is not None
        run.bound = True
        body = {
            "apiVersion": "v1",
            "kind": "Binding",
            "metadata": {"name": run.name, "namespace": run.namespace},
            "target": {"apiVersion": "v1", "kind": "Node", "name": NODE_NAME},
        }
        try:
            self._api.create_namespaced_pod_binding(
                run.name, run.namespace, body, _preload_content=False, _request_timeout=10
            )
        except Exception as exc:
            if not self._bind_warned:
                log.warning("kubelet stand-in: binding pods is not possible (%s); ignored", exc)
                self._bind_warned = True

    def _setup_volumes(
        self, run: _Run, claims: Mapping[str, dict[str, Any]], lookup: _ApiLookup
    ) -> dict[str, Path]:
        volumes: dict[str, Path] = {}
        for volume in (run.pod.get("spec") or {}).get("volumes") or []:
            name = volume["name"]
            if "persistentVolumeClaim" in volume:
                claim_name = volume["persistentVolumeClaim"]["claimName"]
                claim = claims[claim_name]
                local = ((claim.get("metadata") or {}).get("annotations") or {}).get(
                    LOCAL_PATH_ANNOTATION
                )
                if not local:
                    raise MountError(
                        f"Unable to attach or mount volumes: unmounted volumes=[{name}]: "
                        f'persistentvolumeclaim "{claim_name}" has no annotation '
                        f"{LOCAL_PATH_ANNOTATION} (its local directory for the kubelet stand-in)"
                    )
                volumes[name] = Path(local)
                volumes[name].mkdir(parents=True, exist_ok=True)
            elif "hostPath" in volume:
                source = volume["hostPath"]
                path = Path(source["path"])
                if source.get("type") == "DirectoryOrCreate":
                    path.mkdir(parents=True, exist_ok=True)
                elif source.get("type") == "Directory" and not path.is_dir():
                    raise MountError(
                        f'MountVolume.SetUp failed for volume "{name}" : hostPath type check '
                        f"failed: {path} is not a directory"
                    )
                volumes[name] = path
            else:
                directory = run.directory / "volumes" / name
                if directory.exists():
                    shutil.rmtree(directory)
                directory.mkdir(parents=True)
                self._fill_volume(run, name, volume, directory, lookup)
                volumes[name] = directory
        return volumes

    def _fill_volume(
        self, run: _Run, name: str, volume: Mapping[str, Any], directory: Path, lookup: _ApiLookup
    ) -> None:
        prefix = f'MountVolume.SetUp failed for volume "{name}" : '
        if "emptyDir" in volume:
            return
        if "secret" in volume or "configMap" in volume:
            self._key_volume(run, volume, directory, lookup, prefix, volume.get("defaultMode"))
            return
        if "downwardAPI" in volume:
            source = volume["downwardAPI"]
            mode = source.get("defaultMode", 0o644)
            self._downward_files(run, source.get("items") or [], directory, mode)
            return
        if "projected" in volume:
            mode = volume["projected"].get("defaultMode", 0o644)
            for source in volume["projected"].get("sources") or []:
                if "downwardAPI" in source:
                    self._downward_files(
                        run, source["downwardAPI"].get("items") or [], directory, mode
                    )
                elif "secret" in source or "configMap" in source:
                    self._key_volume(run, source, directory, lookup, prefix, mode)
                else:
                    log.info(
                        "pod %s/%s: projected source %s not written",
                        run.namespace,
                        run.name,
                        sorted(source),
                    )
            return
        kinds = sorted(k for k in volume if k != "name")
        raise MountError(f"{prefix}volume type {kinds} is not supported by the kubelet stand-in")

    def _key_volume(self, run, volume, directory, lookup, prefix, mode) -> None:
        if "secret" in volume:
            source = volume["secret"]
            ref = source.get("secretName") or source.get("name", "")
            data = lookup.secret(run.namespace, ref)
            label, missing = "secret", "references non-existent secret key: {}"
        else:
            source = volume["configMap"]
            ref = source.get("name", "")
            data = lookup.config_map(run.namespace, ref)
            label, missing = "configmap", "configmap references non-existent config key: {}"
        optional = bool(source.get("optional"))
        if data is None:
            if optional:
                return
            raise MountError(f'{prefix}{label} "{ref}" not found')
        mode = source.get("defaultMode", mode if mode is not None else 0o644)
        write_key_files(
            directory,
            data,
            source.get("items"),
            mode,
            optional,
            lambda key: prefix + missing.format(key),
        )

    def _downward_files(self, run: _Run, items, directory: Path, mode: int) -> None:
        main = (run.pod.get("spec") or {}).get("containers", [{}])[0]
        for item in items:
            if "fieldRef" in item:
                value = field_value(run.pod, item["fieldRef"]["fieldPath"])
            else:
                ref = item["resourceFieldRef"]
                target = _find_container(run.pod, ref.get("containerName"), main)
                value = resource_value(target, ref["resource"], ref.get("divisor"), self.node)
            _write_file(directory, item["path"], value.encode(), item.get("mode", mode))

    def _prepare(self, run: _Run, container: Mapping[str, Any], env: dict[str, str]) -> _Launch:
        assert run.volumes is not None
        mounts = container_mounts(container, run.volumes, env)
        home, tmp = run.directory / "home", run.directory / "tmp"
        home.mkdir(parents=True, exist_ok=True)
        tmp.mkdir(parents=True, exist_ok=True)
        spec = run.pod.get("spec") or {}
        base = {
            "PATH": os.pathsep.join([*map(str, self.bin_dirs), os.environ.get("PATH", os.defpath)]),
            "LANG": "C.UTF-8",
            "HOME": str(home),
            "TMPDIR": str(tmp),
            "HOSTNAME": spec.get("hostname") or run.name,
        }
        proc_env = process_env(base, self.extra_env, env, mounts)
        argv = container_argv(container, env, mounts)
        cwd = run.directory / "work"
        working_dir = container.get("workingDir")
        if working_dir:
            local = rewrite_path(posixpath.normpath(working_dir), mounts)
            if local != posixpath.normpath(working_dir):
                Path(local).mkdir(parents=True, exist_ok=True)
                cwd = Path(local)
            elif Path(working_dir).is_dir():
                cwd = Path(working_dir)
            else:
                log.warning(
                    "pod %s/%s: workingDir %s is not a mount and does not exist here; using %s",
                    run.namespace,
                    run.name,
                    working_dir,
                    cwd,
                )
        cwd.mkdir(parents=True, exist_ok=True)
        executable = find_executable(argv[0], self.bin_dirs, proc_env["PATH"], cwd)
        return _Launch(argv, executable, proc_env, cwd, mounts)

    def _launch(
        self,
        run: _Run,
        kind: str,
        container: dict[str, Any],
        status: ContainerStatus,
        launch: _Launch,
    ) -> None:
        path = self.log_path(run.namespace, run.name)
        path.parent.mkdir(parents=True, exist_ok=True)
        offset = path.stat().st_size if path.exists() else 0
        started_mono, started_at = time.monotonic(), timestamp()
        error = None
        if launch.executable is None:
            error = f'exec: "{launch.argv[0]}": executable file not found in $PATH'
        else:
            try:
                with path.open("ab") as out:
                    popen = subprocess.Popen(
                        launch.argv,
                        executable=launch.executable,
                        env=launch.env,
                        cwd=launch.cwd,
                        stdin=subprocess.DEVNULL,
                        stdout=out,
                        stderr=subprocess.STDOUT,
                        start_new_session=True,
                    )
            except OSError as exc:
                error = f"exec: {exc}"
        if error is not None:
            message = f"failed to start container process: {error}"
            log.warning("pod %s/%s: %s", run.namespace, run.name, message)
            term = {
                "exitCode": 128,
                "reason": "StartError",
                "message": message,
                "startedAt": started_at,
                "finishedAt": started_at,
            }
            self._after_exit(run, kind, status, term, uptime=0.0)
            return
        log.info(
            "pod %s/%s: %s pid %d: %s", run.namespace, run.name, status.name, popen.pid, launch.argv
        )
        run.proc = _Process(
            popen, kind, container, status, launch, started_mono, started_at, offset
        )
        status.state = {"running": {"startedAt": started_at}}
        status.container_id = f"standin://{popen.pid}"
        status.started = True
        probe = container.get("readinessProbe") if kind == "main" else None
        status.ready = kind == "main" and not probe
        if probe:
            run.probe = _Probe(next_at=started_mono + float(probe.get("initialDelaySeconds", 0)))
        if kind == "main":
            run.phase = "Running"
        run.dirty = True

    # -- exits -------------------------------------------------------------------------------

    @staticmethod
    def _exit_code(returncode: int) -> int:
        return returncode if returncode >= 0 else 128 - returncode

    def _terminated(self, run: _Run, proc: _Process, code: int) -> dict[str, Any]:
        term: dict[str, Any] = {
            "exitCode": code,
            "reason": "Completed" if code == 0 else "Error",
            "startedAt": proc.started_at,
            "finishedAt": timestamp(),
            "containerID": proc.status.container_id,
        }
        message = self._termination_message(run, proc, code)
        if message:
            term["message"] = message
        return term

    def _termination_message(self, run: _Run, proc: _Process, code: int) -> str | None:
        container = proc.container
        path = container.get("terminationMessagePath") or DEFAULT_TERMINATION_MESSAGE_PATH
        local = rewrite_path(posixpath.normpath(path), proc.launch.mounts)
        if local != posixpath.normpath(path) and Path(local).is_file():
            with Path(local).open("rb") as f:
                text = _decode(f.read(TAIL_BYTES))
            if text:
                return text
        if container.get("terminationMessagePolicy") == "FallbackToLogsOnError" and code != 0:
            log_path = self.log_path(run.namespace, run.name)
            with contextlib.suppress(OSError), log_path.open("rb") as f:
                f.seek(proc.log_offset)
                return tail_text(f.read()) or None
        return None

    def _exited(self, run: _Run, returncode: int) -> None:
        proc, run.proc = run.proc, None
        assert proc is not None
        _killpg(proc.popen.pid, signal.SIGKILL)  # the container's other processes
        run.probe = None
        code = self._exit_code(returncode)
        run.last_exit = code
        log.info("pod %s/%s: %s exited with %d", run.namespace, run.name, proc.status.name, code)
        term = self._terminated(run, proc, code)
        if run.evict is not None:
            self._evicted(run, proc.status, term)
            return
        self._after_exit(run, proc.kind, proc.status, term, time.monotonic() - proc.started_mono)

    def _evicted(self, run: _Run, status: ContainerStatus | None, term=None) -> None:
        assert run.evict is not None
        status = status or run.current()[1]
        now = timestamp()
        term = dict(term or {"startedAt": now, "finishedAt": now})
        term.update(exitCode=137, reason="Error")
        status.state = {"terminated": term}
        status.ready = status.started = False
        run.phase, (run.reason, run.message) = "Failed", run.evict
        run.done = run.dirty = True

    def _after_exit(
        self, run: _Run, kind: str, status: ContainerStatus, term: dict[str, Any], uptime: float
    ) -> None:
        policy = (run.pod.get("spec") or {}).get("restartPolicy") or "Always"
        code = term["exitCode"]
        run.dirty = True
        if kind == "init" and code == 0:
            status.state = {"terminated": term}
            status.ready, status.started = True, False
            run.stage += 1
            run.backoff = 0.0  # the next container starts with no back-off
            run.next_action_at = 0.0
            if run.initialized and run.statuses:
                run.statuses[0].waiting("ContainerCreating")
            return
        if not should_restart(policy, kind, code):
            status.state = {"terminated": term}
            status.ready = status.started = False
            run.phase = "Succeeded" if kind == "main" and code == 0 else "Failed"
            run.done = True
            return
        delay, run.backoff = backoff_delays(
            run.backoff, uptime, self.backoff_seconds, self.max_backoff_seconds
        )
        status.restart_count += 1
        status.last_state = {"terminated": term}
        if delay:
            status.waiting(
                "CrashLoopBackOff",
                f"back-off {go_duration(delay)} restarting failed container={status.name} "
                f"pod={run.name}_{run.namespace}({run.uid})",
            )
        else:
            status.waiting("ContainerCreating")
        run.next_action_at = time.monotonic() + delay

    # -- readiness probes --------------------------------------------------------------------

    def _probe(self, run: _Run, now: float) -> None:
        proc, probe_state = run.proc, run.probe
        if proc is None or probe_state is None or proc.kind != "main":
            return
        probe = proc.container.get("readinessProbe") or {}
        if probe_state.thread is not None:
            if probe_state.thread.is_alive():
                return
            ok = bool(probe_state.result and probe_state.result[0])
            probe_state.thread, probe_state.result = None, []
            if ok:
                probe_state.successes, probe_state.failures = probe_state.successes + 1, 0
                if not proc.status.ready and probe_state.successes >= probe.get(
                    "successThreshold", 1
                ):
                    proc.status.ready = run.dirty = True
            else:
                probe_state.successes, probe_state.failures = 0, probe_state.failures + 1
                if proc.status.ready and probe_state.failures >= probe.get("failureThreshold", 3):
                    proc.status.ready = False
                    run.dirty = True
            probe_state.next_at = now + float(probe.get("periodSeconds", 10))
            return
        if now >= probe_state.next_at:
            result = probe_state.result
            launch, ports = proc.launch, proc.container.get("ports") or []
            probe_state.thread = threading.Thread(
                target=lambda: result.append(_run_probe(probe, launch, ports)),
                name=f"kubelet-standin-probe-{run.name}",
                daemon=True,
            )
            probe_state.thread.start()


def _run_probe(probe: Mapping[str, Any], launch: _Launch, ports: list[Mapping[str, Any]]) -> bool:
    """One readiness probe: exec (paths rewritten), httpGet, tcpSocket; grpc counts as success."""
    timeout = float(probe.get("timeoutSeconds", 1))

    def port_of(value: Any) -> int:
        if isinstance(value, int) or str(value).isdigit():
            return int(value)
        return next(int(p["containerPort"]) for p in ports if p.get("name") == value)

    try:
        if "exec" in probe:
            argv = [
                rewrite_path(expand(a, launch.env), launch.mounts)
                for a in probe["exec"].get("command") or []
            ]
            with subprocess.Popen(
                argv,
                executable=find_executable(argv[0], [], launch.env.get("PATH", ""), launch.cwd),
                env=launch.env,
                cwd=launch.cwd,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                start_new_session=True,
            ) as child:
                try:
                    return child.wait(timeout=timeout) == 0
                except subprocess.TimeoutExpired:
                    _killpg(child.pid, signal.SIGKILL)
                    child.wait()
                    return False
        if "httpGet" in probe:
            get = probe["httpGet"]
            cls = (
                http.client.HTTPSConnection
                if get.get("scheme") == "HTTPS"
                else http.client.HTTPConnection
            )
            conn = cls(get.get("host") or LOCAL_IP, port_of(get["port"]), timeout=timeout)
            try:
                headers = {h["name"]: h["value"] for h in get.get("httpHeaders") or []}
                conn.request("GET", get.get("path") or "/", headers=headers)
                return 200 <= conn.getresponse().status < 400
            finally:
                conn.close()
        if "tcpSocket" in probe:
            tcp = probe["tcpSocket"]
            address = (tcp.get("host") or LOCAL_IP, port_of(tcp["port"]))
            with socket.create_connection(address, timeout=timeout):
                return True
        return True
    except Exception as exc:
        log.debug("readiness probe failed: %r", exc)
        return False
