"""The cluster the operator's end-to-end tests run against: emulated here, or a real one.

``EmulatedCluster`` (the default, what CI runs): the test API server (tests/kube/apiserver.py)
with the CRDs applied, the kubelet stand-in (tests/kube/kubelet.py) running each pod's
command as a local process with its PVC mapped to a local directory, and the operator as its
own process (``alliance-operator``, i.e. ``kopf.run``) — killable and restartable.

``RealCluster``: when ``ALLIANCE_E2E_KUBECONFIG`` names a kubeconfig, the same tests run
against that cluster: the operator still runs as a local process (with that kubeconfig, the
way operators are developed), member pods run the image ``ALLIANCE_E2E_MEMBER_IMAGE`` in the
cluster, data reaches each PVC through a short-lived loader pod and ``kubectl cp``, and the
store is ``ALLIANCE_E2E_S3_ENDPOINT`` with ``ALLIANCE_E2E_S3_ACCESS_KEY`` /
``ALLIANCE_E2E_S3_SECRET_KEY``: an S3 endpoint that both the pods and this machine reach (see
docs/kubernetes.md for a kind recipe). A pod "marked Failed" is a pod force-deleted there.

Both expose the same small interface; the tests use nothing else.
"""

from __future__ import annotations

import json
import os
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
    "ALLIANCE_OPERATOR_RUN_INTERVAL": "0.5",
    "ALLIANCE_OPERATOR_MEMBER_INTERVAL": "1",
    "ALLIANCE_OPERATOR_ALLIANCE_INTERVAL": "1",
    "ALLIANCE_OPERATOR_HEARTBEAT_TIMEOUT": "30",
}


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

    def kubectl(self, *args: str, check: bool = True, input: str | None = None) -> str:
        result = subprocess.run(
            [str(KUBECTL), "--kubeconfig", str(self.kubeconfig), *args],
            capture_output=True,
            text=True,
            input=input,
            timeout=60,
        )
        if check and result.returncode != 0:
            raise AssertionError(f"kubectl {' '.join(args)}: {result.stderr}{result.stdout}")
        return result.stdout

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

    def create_store_secret(self, namespace: str, name: str) -> None:
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

    def provide_data(self, namespace: str, claim: str, files: dict[str, Path]) -> None:
        """A PersistentVolumeClaim ``claim`` holding ``files`` (name in the volume → source)."""
        raise NotImplementedError

    def fail_pod(self, namespace: str, name: str) -> None:
        """The pod dies for good (eviction, node loss)."""
        raise NotImplementedError

    def diagnose(self, namespace: str) -> str:
        return self.operator_log()

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
        self.kubectl("apply", "-f", str(PROJECT_ROOT / "crds"))
        self.kubelet = KubeletStandIn(
            self.kubeconfig,
            work_dir / "kubelet",
            bin_dirs=[BIN],
            backoff_seconds=1.0,
            max_backoff_seconds=5.0,
        )
        self.kubelet.start()

    def provide_data(self, namespace: str, claim: str, files: dict[str, Path]) -> None:
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
                "annotations": {"kubelet-standin.alliance.dev/local-path": str(local)},
            },
            "spec": {
                "accessModes": ["ReadWriteOnce"],
                "resources": {"requests": {"storage": "1Gi"}},
            },
        }
        self.apply(namespace, pvc)

    def fail_pod(self, namespace: str, name: str) -> None:
        self.kubelet.fail_pod(namespace, name)

    def diagnose(self, namespace: str) -> str:
        pods = self.kubectl("get", "pods", "-n", namespace, "-o", "wide", check=False)
        logs = []
        for log in sorted((self.work_dir / "kubelet" / "logs").glob(f"{namespace}_*.log")):
            tail = "\n".join(log.read_text(errors="replace").splitlines()[-8:])
            logs.append(f"--- {log.name}\n{tail}")
        return "\n".join([pods, *logs, self.operator_log()])

    def close(self) -> None:
        super().close()
        self.kubelet.stop()
        self.api.stop()


class RealCluster(Cluster):
    """A real cluster (see the module docstring). Not exercised by CI: no cluster runs there."""

    def __init__(self, work_dir: Path, kubeconfig: Path):
        self.work_dir = work_dir
        self.kubeconfig = kubeconfig
        env = os.environ
        self.image = env["ALLIANCE_E2E_MEMBER_IMAGE"]
        self.store_config = StoreConfig(
            env["ALLIANCE_E2E_S3_ENDPOINT"],
            env["ALLIANCE_E2E_S3_ACCESS_KEY"],
            env["ALLIANCE_E2E_S3_SECRET_KEY"],
            "",
        )
        self.kubectl("apply", "-f", str(PROJECT_ROOT / "crds"))

    def operator_env(self) -> dict[str, str]:
        return {"ALLIANCE_OPERATOR_MEMBER_IMAGE": self.image}

    def provide_data(self, namespace: str, claim: str, files: dict[str, Path]) -> None:
        pvc = {
            "apiVersion": "v1",
            "kind": "PersistentVolumeClaim",
            "metadata": {"name": claim},
            "spec": {
                "accessModes": ["ReadWriteOnce"],
                "resources": {"requests": {"storage": "1Gi"}},
            },
        }
        loader = f"{claim}-loader"
        pod = {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": loader},
            "spec": {
                "restartPolicy": "Never",
                "securityContext": {"runAsUser": 10001, "runAsGroup": 10001, "fsGroup": 10001},
                "containers": [
                    {
                        "name": "loader",
                        "image": self.image,
                        "command": ["sleep", "600"],
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
            self.kubectl("cp", "-n", namespace, str(source), f"{loader}:/data/{name}")
        self.kubectl("delete", "-n", namespace, "pod", loader, "--wait=true")

    def fail_pod(self, namespace: str, name: str) -> None:
        self.kubectl("delete", "-n", namespace, "pod", name, "--grace-period=0", "--force")

    def close(self) -> None:
        super().close()


def make_cluster(work_dir: Path, s3_server) -> Cluster:
    kubeconfig = os.environ.get("ALLIANCE_E2E_KUBECONFIG")
    if kubeconfig:
        return RealCluster(work_dir, Path(kubeconfig))
    return EmulatedCluster(work_dir, s3_server.config)
