"""The cluster the operator's end-to-end tests run against: emulated here, or a real one.

``EmulatedCluster`` (the default, what CI runs): the test API server (tests/kube/apiserver.py)
with the CRDs applied, the kubelet stand-in (tests/kube/kubelet.py) running each pod's
command as a local process with its PVC mapped to a local directory, and the operator as its
own process (``alliance-operator``, i.e. ``kopf.run``) — killable and restartable.

``RealCluster``: when ``ALLIANCE_E2E_KUBECONFIG`` names a kubeconfig, the same tests run
against that cluster: the operator still runs as a local process (with that kubeconfig, the
way operators are developed), member pods run the image ``ALLIANCE_E2E_MEMBER_IMAGE`` in the
cluster, data reaches each PVC through a short-lived loader pod (``kubectl exec`` into it), and
the store is ``ALLIANCE_E2E_S3_ENDPOINT`` with ``ALLIANCE_E2E_S3_ACCESS_KEY`` /
``ALLIANCE_E2E_S3_SECRET_KEY``: an S3 endpoint that both the pods and this machine reach (see
docs/kubernetes.md, section 7, for a kind recipe).

Both expose the same small interface and mean the same by it; the tests use nothing else. A
crashed agent (``crash_agent``) is a container that exits non-zero, 137, on both: SIGKILLed by
the kubelet stand-in, OOM-killed on a real node.
"""

from __future__ import annotations

import base64
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
import uuid
from pathlib import Path
from typing import Any

import yaml

from alliance.s3server import free_port
from alliance.store import StoreConfig

PROJECT_ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
KUBECTL = BIN / "kubectl"

#: Fast reconcile intervals: the tests wait on the operator, not on its timers.
OPERATOR_ENV = {
    "ALLIANCE_OPERATOR_MEMBER_INTERVAL": "1",
    "ALLIANCE_OPERATOR_ALLIANCE_INTERVAL": "1",
    "ALLIANCE_OPERATOR_HEARTBEAT_TIMEOUT": "30",
}


class KubectlError(AssertionError):
    """kubectl exited non-zero; the message is its output (the API server's error)."""


def wait_for(check, timeout: float, what: str, interval: float = 0.25, diagnose=None):
    """Poll ``check()`` until it returns a truthy value; fail naming ``what`` and the last
    value seen (and whatever ``diagnose()`` tells)."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = check()
        if last:
            return last
        time.sleep(interval)
    detail = f"\n{diagnose()}" if diagnose else ""
    raise AssertionError(
        f"timed out after {timeout:.0f} s waiting for {what}; last: {last!r}{detail}"
    )


class Cluster:
    """What the end-to-end tests need from a cluster."""

    kubeconfig: Path
    work_dir: Path
    store_config: StoreConfig  # endpoint as pods and the operator reach it; no bucket

    # --- kubectl --------------------------------------------------------------------------

    def kubectl(self, *args: str, check: bool = True, input: str | bytes | None = None) -> str:
        result = subprocess.run(
            [str(KUBECTL), "--kubeconfig", str(self.kubeconfig), *args],
            capture_output=True,
            input=input.encode() if isinstance(input, str) else input,
            timeout=120,
        )
        stdout = result.stdout.decode(errors="replace")
        if check and result.returncode != 0:
            stderr = result.stderr.decode(errors="replace")
            raise KubectlError(f"kubectl {shlex.join(args)}: {stderr}{stdout}")
        return stdout

    def install_crds(self) -> None:
        """The CRDs this repository ships, usable once the server says they are Established."""
        crds = str(PROJECT_ROOT / "crds")
        self.kubectl("apply", "-f", crds)
        self.kubectl("wait", "--for=condition=Established", "-f", crds, "--timeout=60s")

    def apply(self, namespace: str, *objects: dict) -> None:
        text = yaml.safe_dump_all(list(objects), sort_keys=False)
        self.kubectl("apply", "-n", namespace, "-f", "-", input=text)

    def get(self, namespace: str, kind: str, name: str) -> dict | None:
        out = self.kubectl(
            "get", "-n", namespace, kind, name, "-o", "json", "--ignore-not-found", check=False
        )
        return json.loads(out) if out.strip() else None

    def create_namespace(self) -> str:
        name = f"e2e-{uuid.uuid4().hex[:6]}"
        self.kubectl("create", "namespace", name)
        return name

    def delete_namespace(self, namespace: str, timeout: float = 180) -> None:
        """Delete the namespace and wait until it is gone. Its custom resources carry the
        operator's finalizer, so the operator must run until then: it is started if it is not
        (a test failed after killing it)."""
        if getattr(self, "operator", None) is None or self.operator.poll() is not None:
            self.start_operator(namespace)
        self.kubectl("delete", "namespace", namespace, "--wait=false", "--ignore-not-found")

        def gone() -> bool:
            return not self.kubectl("get", "namespace", namespace, "--ignore-not-found").strip()

        wait_for(
            gone,
            timeout,
            f"namespace {namespace} deleted",
            interval=1,
            diagnose=lambda: self.diagnose(namespace),
        )

    def create_store_secret(self, namespace: str, name: str, alliances: str) -> None:
        """The store's admin keys, marked for the Alliances named (comma-separated)."""
        self.kubectl(
            "create",
            "secret",
            "generic",
            name,
            "-n",
            namespace,
            f"--from-literal=accessKey={self.store_config.access_key}",
            f"--from-literal=secretKey={self.store_config.secret_key}",
        )
        self.kubectl(
            "annotate", "secret", name, "-n", namespace, f"alliance.dev/alliances={alliances}"
        )

    def read_secret(self, namespace: str, name: str, key: str) -> str:
        secret = self.get(namespace, "secret", name)
        return base64.b64decode(secret["data"][key]).decode()

    # --- the operator process -------------------------------------------------------------

    def start_operator(self, namespace: str) -> None:
        log = open(self.work_dir / "operator.log", "ab")  # noqa: SIM115 (kept for the process)
        if not getattr(self, "metrics_port", None):  # a restarted operator keeps its port
            self.metrics_port = free_port()
        env = {
            **os.environ,
            **OPERATOR_ENV,
            **self.operator_env(),
            "KUBECONFIG": str(self.kubeconfig),
            "ALLIANCE_OPERATOR_METRICS_PORT": str(self.metrics_port),
        }
        self.operator = subprocess.Popen(
            [str(BIN / "alliance-operator"), "--namespace", namespace, "--verbose"],
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=env,
            start_new_session=True,
        )

    def operator_metrics(self) -> str:
        """The operator's Prometheus exposition text, scraped from its endpoint."""
        url = f"http://127.0.0.1:{self.metrics_port}/metrics"
        with urllib.request.urlopen(url, timeout=10) as resp:
            return resp.read().decode()

    def kill_operator(self) -> None:
        """SIGKILL: no chance to save anything, the way a node loss or an OOM kill ends it."""
        os.killpg(self.operator.pid, signal.SIGKILL)
        self.operator.wait(timeout=10)

    def stop_operator(self) -> None:
        if getattr(self, "operator", None) and self.operator.poll() is None:
            os.killpg(self.operator.pid, signal.SIGTERM)
            try:
                self.operator.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(self.operator.pid, signal.SIGKILL)
                self.operator.wait(timeout=5)

    def operator_log(self, lines: int = 60) -> str:
        path = self.work_dir / "operator.log"
        text = path.read_text(errors="replace") if path.exists() else ""
        return "operator log (tail):\n" + "\n".join(text.splitlines()[-lines:])

    # --- to be provided by each kind of cluster -------------------------------------------

    def operator_env(self) -> dict[str, str]:
        return {}

    def provide_data(
        self, namespace: str, claim: str, files: dict[str, Path], member: str | None
    ) -> None:
        """A PersistentVolumeClaim ``claim`` holding ``files`` (name in the volume → source),
        marked for the Member ``member`` (None: not marked)."""
        raise NotImplementedError

    def crash_agent(self, namespace: str, pod: str) -> None:
        """The pod's running container exits non-zero (137, killed): a crash. What follows is
        the kubelet's doing (the pod's restartPolicy, back-off), as after any crash."""
        raise NotImplementedError

    def pod_log_tail(self, namespace: str, pod: str) -> str:
        raise NotImplementedError

    def diagnose(self, namespace: str) -> str:
        pods = self.kubectl("get", "pods", "-n", namespace, "-o", "wide", check=False)
        names = self.kubectl("get", "pods", "-n", namespace, "-o", "name", check=False).split()
        logs = [f"--- {n}\n{self.pod_log_tail(namespace, n.split('/')[-1])}" for n in names]
        return "\n".join([pods, *logs, self.operator_log()])

    def close(self) -> None:
        self.stop_operator()


class EmulatedCluster(Cluster):
    def __init__(self, work_dir: Path, store_config: StoreConfig):
        from tests.kube.apiserver import ApiServer
        from tests.kube.kubelet import KubeletStandIn

        self.work_dir = work_dir
        self.store_config = store_config
        self.kubeconfig = work_dir / "kubeconfig"
        self.api = ApiServer()
        self.api.start()
        self.api.write_kubeconfig(self.kubeconfig)
        self.install_crds()
        self.kubelet = KubeletStandIn(
            self.kubeconfig,
            work_dir / "kubelet",
            bin_dirs=[BIN],
            # The kubelet's own back-off: a crash-looping pod stays in CrashLoopBackOff long
            # enough for the operator to see it, as on a real node.
            backoff_seconds=10.0,
            max_backoff_seconds=300.0,
        )
        self.kubelet.start()

    def provide_data(
        self, namespace: str, claim: str, files: dict[str, Path], member: str | None
    ) -> None:
        local = self.work_dir / "volumes" / namespace / claim
        local.mkdir(parents=True, exist_ok=True)
        for name, source in files.items():
            shutil.copyfile(source, local / name)
        pvc = {
            "apiVersion": "v1",
            "kind": "PersistentVolumeClaim",
            "metadata": {
                "name": claim,
                # Where the kubelet stand-in finds this claim's volume.
                "annotations": {
                    "kubelet-standin.alliance.dev/local-path": str(local),
                    **claim_mark(member),
                },
            },
            "spec": {
                "accessModes": ["ReadWriteOnce"],
                "resources": {"requests": {"storage": "1Gi"}},
            },
        }
        self.apply(namespace, pvc)

    def crash_agent(self, namespace: str, pod: str) -> None:
        if self.kubelet.kill_process(namespace, pod, signal.SIGKILL) is None:
            raise AssertionError(f"pod {namespace}/{pod} has no running process to kill")

    def pod_log_tail(self, namespace: str, pod: str) -> str:
        return "\n".join(self.kubelet.logs(namespace, pod).splitlines()[-8:])

    def close(self) -> None:
        super().close()
        self.kubelet.stop()
        self.api.stop()


def claim_mark(member: str | None) -> dict[str, str]:
    """The annotation that lets one Member mount a claim (docs/kubernetes.md)."""
    return {} if member is None else {"alliance.dev/member": member}


#: Run in a member pod's container: take memory until the container's limit stops it.
EAT_MEMORY = "chunks = []\nwhile True:\n    chunks.append(b'x' * (64 << 20))"
#: Run in the loader pod: write stdin to the file named by the argument.
WRITE_STDIN = "import shutil, sys; shutil.copyfileobj(sys.stdin.buffer, open(sys.argv[1], 'wb'))"


class RealCluster(Cluster):
    """A real cluster (see the module docstring and docs/kubernetes.md, section 7): nodes with
    cgroup v2 (for ``crash_agent``), a default StorageClass, the member image where the nodes
    find it. Not exercised by CI: no cluster runs there (tests/test_containers.py runs both
    images on a Docker engine instead).

    With ``ALLIANCE_E2E_OPERATOR_IMAGE`` (the operator image, e.g. alliance-operator:0.1.0) the
    operator runs from that image on this machine's Docker engine, hardened as the chart runs it
    (uid 10001, read-only root filesystem, no capabilities, ``--network host`` to reach the
    cluster's API server and serve its metrics on loopback, the kubeconfig mounted read-only);
    killed with ``docker kill``. Without it, the venv's ``alliance-operator``."""

    def __init__(self, work_dir: Path, kubeconfig: Path):
        self.work_dir = work_dir
        self.kubeconfig = kubeconfig
        env = os.environ
        self.image = env["ALLIANCE_E2E_MEMBER_IMAGE"]
        self.operator_image = env.get("ALLIANCE_E2E_OPERATOR_IMAGE", "")
        self.operator_container = ""
        self.store_config = StoreConfig(
            env["ALLIANCE_E2E_S3_ENDPOINT"],
            env["ALLIANCE_E2E_S3_ACCESS_KEY"],
            env["ALLIANCE_E2E_S3_SECRET_KEY"],
            "",
        )
        self.install_crds()

    def operator_env(self) -> dict[str, str]:
        return {"ALLIANCE_OPERATOR_MEMBER_IMAGE": self.image}

    def start_operator(self, namespace: str) -> None:
        if not self.operator_image:
            super().start_operator(namespace)
            return
        if not getattr(self, "metrics_port", None):  # a restarted operator keeps its port
            self.metrics_port = free_port()
        # A copy uid 10001 may read (a kubeconfig is often 0600); mounted, not the original.
        kubeconfig = self.work_dir / "operator-kubeconfig"
        shutil.copyfile(self.kubeconfig, kubeconfig)
        kubeconfig.chmod(0o644)
        env = {
            **OPERATOR_ENV,
            **self.operator_env(),
            "KUBECONFIG": "/etc/alliance/kubeconfig",
            "ALLIANCE_OPERATOR_METRICS_PORT": str(self.metrics_port),
        }
        # A new name each time: a killed container may still be being removed (--rm).
        self.operator_container = f"alliance-e2e-operator-{uuid.uuid4().hex[:6]}"
        log = open(self.work_dir / "operator.log", "ab")  # noqa: SIM115 (kept for the process)
        self.operator = subprocess.Popen(
            [
                "docker", "run", "--rm", "--name", self.operator_container,
                "--network", "host", "--user", "10001:10001", "--read-only",
                "--cap-drop", "ALL", "--security-opt", "no-new-privileges",
                "--tmpfs", "/tmp:rw,nosuid,nodev,mode=1777",
                "--volume", f"{kubeconfig}:/etc/alliance/kubeconfig:ro",
                *(f"--env={k}={v}" for k, v in env.items()),
                self.operator_image, "--namespace", namespace, "--verbose",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )  # fmt: skip

    def kill_operator(self) -> None:
        if not self.operator_image:
            super().kill_operator()
            return
        # SIGKILL to the container's PID 1, the operator: as a node loss or an OOM kill ends it.
        subprocess.run(["docker", "kill", "--signal", "KILL", self.operator_container],
                       capture_output=True, timeout=60)  # fmt: skip
        self.operator.wait(timeout=30)

    def stop_operator(self) -> None:
        if not self.operator_image:
            super().stop_operator()
            return
        if getattr(self, "operator", None) and self.operator.poll() is None:
            subprocess.run(["docker", "stop", "--time", "15", self.operator_container],
                           capture_output=True, timeout=60)  # fmt: skip
            try:
                self.operator.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.operator.kill()
                self.operator.wait(timeout=5)

    def provide_data(
        self, namespace: str, claim: str, files: dict[str, Path], member: str | None
    ) -> None:
        pvc = {
            "apiVersion": "v1",
            "kind": "PersistentVolumeClaim",
            "metadata": {"name": claim, "annotations": claim_mark(member)},
            "spec": {
                "accessModes": ["ReadWriteOnce"],
                "resources": {"requests": {"storage": "1Gi"}},
            },
        }
        loader = f"{claim}-loader"
        # The member image has python but no shell tools to count on (kubectl cp needs tar):
        # the loader sleeps in python and each file goes in through python's stdin. It runs
        # as the agent's uid and passes Pod Security "restricted".
        pod = {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": loader},
            "spec": {
                "restartPolicy": "Never",
                "securityContext": {
                    "runAsNonRoot": True,
                    "runAsUser": 10001,
                    "runAsGroup": 10001,
                    "fsGroup": 10001,
                    "seccompProfile": {"type": "RuntimeDefault"},
                },
                "containers": [
                    {
                        "name": "loader",
                        "image": self.image,
                        "command": ["python", "-c", "import time; time.sleep(600)"],
                        "securityContext": {
                            "allowPrivilegeEscalation": False,
                            "capabilities": {"drop": ["ALL"]},
                        },
                        "volumeMounts": [{"name": "data", "mountPath": "/data"}],
                    }
                ],
                "volumes": [{"name": "data", "persistentVolumeClaim": {"claimName": claim}}],
            },
        }
        self.apply(namespace, pvc, pod)
        self.kubectl(
            "wait", "-n", namespace, "--for=condition=Ready", f"pod/{loader}", "--timeout=300s"
        )
        for name, source in files.items():
            command = ["python", "-c", WRITE_STDIN, f"/data/{name}"]
            self.kubectl(
                "exec", "-i", "-n", namespace, loader, "--", *command, input=source.read_bytes()
            )
        # python as PID 1 has no SIGTERM handler, so it ignores SIGTERM: no 30 s grace period.
        self.kubectl("delete", "-n", namespace, "pod", loader, "--grace-period=1", "--wait=true")

    def crash_agent(self, namespace: str, pod: str) -> None:
        # Nothing inside the container can SIGKILL its PID 1 (the kernel drops signals the
        # process has no handler for when they come from its own PID namespace), and the agent
        # stops cleanly, with 0, on SIGTERM and SIGINT. Going over the memory limit does it: on
        # cgroup v2 the kubelet (1.28+) has the kernel OOM-kill all of the container's
        # processes, the agent too: exit 137, OOMKilled. (kubectl reports the exec killed.)
        self.kubectl("exec", "-n", namespace, pod, "--", "python", "-c", EAT_MEMORY, check=False)

    def pod_log_tail(self, namespace: str, pod: str) -> str:
        return self.kubectl("logs", "-n", namespace, pod, "--tail=8", check=False)


def make_cluster(work_dir: Path, s3_server) -> Cluster:
    kubeconfig = os.environ.get("ALLIANCE_E2E_KUBECONFIG")
    if kubeconfig:
        return RealCluster(work_dir, Path(kubeconfig))
    return EmulatedCluster(work_dir, s3_server.config)
