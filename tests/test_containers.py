"""The images built and run for real, on a Docker engine.

tests/test_images.py checks the Dockerfile and replays its install steps in virtual
environments; this module builds both targets (``make image-operator``, ``make image-member``:
the wheels from ``make wheels``, ``docker build --network none``) and runs them the way the
chart's pods do: as uid 10001, ``--read-only``, ``--cap-drop ALL``, ``--security-opt
no-new-privileges``, a tmpfs where the program needs to write (``/tmp``, the member's cache dir),
the member's data mounted read-only. No bridge network is needed (``--network host``): the
containers reach the S3 server and the test API server that this process starts on loopback.

* Each image: its user, capabilities and read-only filesystem from the inside, the environment
  copied from the build stage (its interpreter symlinks resolve), no pip, and a size budget.
* The member image: ``alliance init`` in a container, then two member containers, each with its
  own store keys (alliance.identities, as alliance/embedded.py gives them), train and validate
  one real round that ``alliance coordinate`` drives from this machine; they stop cleanly on
  SIGTERM (``docker stop``).
* The operator image: ``alliance-operator`` against the test API server (tests/kube/apiserver.py,
  its kubeconfig mounted read-only) answers /healthz and /metrics.

The base is $BASE_IMAGE when set, else the Dockerfile's pinned official image when the engine
has it, else the stand-in scripts/local_base.sh makes (local/python:3.11-bookworm).

Without a Docker daemon the tests skip, saying so, unless ALLIANCE_REQUIRE_DOCKER=1 (.ci/run sets
it): then they fail. Build times, image sizes and the round's timings are printed.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import pytest
import yaml

from alliance import contract, identities
from alliance.s3server import S3Server, free_port
from alliance.store import Store, heartbeat_key
from tests.conftest import SAMPLE_DIR, write_rows

# An empty build cache: ~5 minutes on 2 busy cores, before the first test.
pytestmark = [pytest.mark.slow, pytest.mark.timeout(1800)]

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
VERSION = re.search(r'^version = "([^"]+)"', (ROOT / "pyproject.toml").read_text(), re.M).group(1)
OPERATOR = f"alliance-operator:{VERSION}"
MEMBER = f"alliance-member:{VERSION}"
OFFICIAL_BASE = re.search(r"^ARG BASE_IMAGE=(\S+)$", (ROOT / "Dockerfile").read_text(), re.M)[1]
LOCAL_BASE = "local/python:3.11-bookworm"  # scripts/local_base.sh's default tag
UID = "10001"
CACHE_DIR = "/var/cache/alliance"  # where the operator mounts a member pod's cache emptyDir
LABEL = "dev.alliance.test=test_containers"  # on every container started here

# Uncompressed, as `docker image ls` counts (decimal units): the whole image, and what the image
# adds to its base (its environment). Built here: operator 548 MB (330 MB over the base), member
# 1.86 GB (1.64 GB over it); the official base is ~90 MB smaller than the stand-in.
BUDGET_TOTAL = {OPERATOR: 600e6, MEMBER: 2.0e9}
BUDGET_OVER_BASE = {OPERATOR: 380e6, MEMBER: 1.75e9}

# How the chart runs its pods, in docker run's words.
HARDENED = [
    "--user",
    f"{UID}:{UID}",
    "--read-only",
    "--cap-drop",
    "ALL",
    "--security-opt",
    "no-new-privileges",
    "--network",
    "host",
    "--tmpfs",
    "/tmp:rw,nosuid,nodev,size=512m,mode=1777",
    "--label",
    LABEL,
]

#: Run inside a container (``--entrypoint python``): what it is from the inside, as JSON.
PROBE = r"""
import importlib.util, json, os, sys, tempfile
def writable(path):
    try:
        with tempfile.NamedTemporaryFile(dir=path):
            return True
    except OSError:
        return False
status = dict(l.split(":", 1) for l in open("/proc/self/status").read().splitlines() if ":" in l)
links = {}
for top, dirs, files in os.walk(sys.prefix):
    for name in dirs + files:
        path = os.path.join(top, name)
        if os.path.islink(path):
            links[path] = os.path.exists(path)
print(json.dumps({
    "uid": os.getuid(), "gid": os.getgid(), "home": os.path.expanduser("~"), "cwd": os.getcwd(),
    "capEff": status["CapEff"].strip(), "capBnd": status["CapBnd"].strip(),
    "noNewPrivs": status["NoNewPrivs"].strip(),
    "prefix": sys.prefix, "python": os.path.realpath(sys.executable),
    "links": links,
    "modules": {n: importlib.util.find_spec(n) is not None
                for n in ("pip", "alliance", "alliance_operator", "tensorflow", "kopf", "pytest")},
    "writable": {p: writable(p) for p in sys.argv[1:]},
}))
"""


def docker(*args: str, timeout: float = 120, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(["docker", *args], capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"docker {' '.join(args[:3])} ... failed ({proc.returncode}):\n"
                             f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")  # fmt: skip
    return proc


def daemon_problem() -> str | None:
    """Why no Docker engine can be used here, or None."""
    if not shutil.which("docker"):
        return "no docker command on PATH"
    try:
        proc = docker("version", "--format", "{{.Server.Version}}", timeout=30, check=False)
    except subprocess.TimeoutExpired:
        return "the Docker daemon does not answer within 30 s"
    if proc.returncode != 0 or not proc.stdout.strip():
        why = (proc.stderr.strip().splitlines() or ["no answer"])[-1]
        return f"no Docker daemon answers ({why})"
    return None


def image_exists(name: str) -> bool:
    return docker("image", "inspect", name, check=False, timeout=60).returncode == 0


def base_image() -> str:
    if os.environ.get("BASE_IMAGE"):
        return os.environ["BASE_IMAGE"]
    if not image_exists(OFFICIAL_BASE) and image_exists(LOCAL_BASE):
        return LOCAL_BASE
    return OFFICIAL_BASE  # the engine pulls it if it can


def image_size(name: str) -> int:
    return int(docker("image", "inspect", "--format", "{{.Size}}", name).stdout)


def make(target: str, base: str) -> float:
    """``make TARGET`` as a user runs it (apart from an outer make); the seconds it took."""
    env = {k: v for k, v in os.environ.items() if k not in ("MAKELEVEL", "MAKEFLAGS", "MFLAGS")}
    started = time.monotonic()
    proc = subprocess.run(
        ["make", "--no-print-directory", target, f"PYTHON={sys.executable}", f"BASE_IMAGE={base}"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env=env,
        timeout=1500,
    )
    assert proc.returncode == 0, (
        f"make {target} failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    )
    return time.monotonic() - started


TIMINGS: dict[str, float] = {}


def say(capsys, title: str, lines: list[str]) -> None:
    with capsys.disabled():
        print(f"\n{title}:")
        for line in lines:
            print(f"  {line}")


@pytest.fixture(scope="module")
def engine() -> None:
    problem = daemon_problem()
    if problem:
        if os.environ.get("ALLIANCE_REQUIRE_DOCKER") == "1":
            pytest.fail(f"ALLIANCE_REQUIRE_DOCKER=1 and {problem}", pytrace=False)
        pytest.skip(
            f"{problem}: start dockerd to build and run the images "
            "(.ci/run does; ALLIANCE_REQUIRE_DOCKER=1 turns this skip into a failure)"
        )


@pytest.fixture(scope="module")
def images(engine) -> str:
    """Both images, built from the working tree (cached layers are reused): the base."""
    base = base_image()
    TIMINGS["make wheels"] = make("wheels", base)
    TIMINGS[f"make image-operator ({OPERATOR})"] = make("image-operator", base)
    TIMINGS[f"make image-member ({MEMBER})"] = make("image-member", base)
    return base


class Containers:
    """The containers a test starts, removed at its end (even when it fails)."""

    def __init__(self, work: Path):
        self.work = work
        self.prefix = f"alliance-test-{uuid.uuid4().hex[:8]}"
        self.started: list[str] = []  # the names given to run()

    def env_file(self, name: str, env: dict[str, str]) -> Path:
        """Variables (the store's keys among them) in a file, not on a command line."""
        path = self.work / f"{name}.env"
        path.write_text("".join(f"{k}={v}\n" for k, v in env.items()))
        path.chmod(0o600)
        return path

    def run(self, name: str, image: str, *args: str, options=(), env=None, detach=False,
            timeout: float = 300) -> subprocess.CompletedProcess:  # fmt: skip
        self.started.append(name)
        opts = [*HARDENED, "--name", self.name(name), *options]
        if env:
            opts += ["--env-file", str(self.env_file(name, env))]
        return docker("run", *(["-d"] if detach else []), *opts, image, *args, timeout=timeout)

    def name(self, name: str) -> str:
        return f"{self.prefix}-{name}"

    def state(self, name: str) -> dict:
        out = docker("inspect", "--format", "{{json .State}}", self.name(name)).stdout
        return json.loads(out)

    def logs(self, name: str, tail: int = 30) -> str:
        proc = docker("logs", "--tail", str(tail), self.name(name), check=False)
        return proc.stdout + proc.stderr

    def diagnose(self) -> str:
        return "\n".join(
            f"--- {n} ({self.state(n).get('Status')}):\n{self.logs(n)}"
            for n in self.started
            if docker("inspect", self.name(n), check=False).returncode == 0
        )

    def remove_all(self) -> None:
        if self.started:
            docker("rm", "--force", "--volumes", *map(self.name, self.started), check=False)


@pytest.fixture
def containers(images, tmp_path):
    c = Containers(tmp_path)
    yield c
    c.remove_all()


def probe(containers: Containers, image: str, label: str, *writable: str, options=()) -> dict:
    out = containers.run(
        label, image, "-c", PROBE, *writable, options=["--entrypoint", "python", *options]
    ).stdout
    return json.loads(out.strip().splitlines()[-1])


def check_hardening(found: dict) -> None:
    assert (found["uid"], found["gid"]) == (int(UID), int(UID))
    assert found["home"] == "/tmp" and found["cwd"] == "/tmp"
    assert found["capEff"] == found["capBnd"] == "0000000000000000", "capabilities left"
    assert found["noNewPrivs"] == "1"
    assert found["writable"]["/"] is False and found["writable"]["/opt/alliance"] is False
    assert found["writable"]["/tmp"] is True
    # The environment copied out of the build stage: its interpreter is the base image's (the
    # venv's bin/python symlinks resolve), and no symlink in it dangles.
    assert found["prefix"] == "/opt/alliance" and not found["python"].startswith("/opt/")
    assert found["links"] and all(found["links"].values()), found["links"]
    assert found["modules"]["pip"] is False and found["modules"]["pytest"] is False


def wait_for(check, timeout: float, what: str, diagnose=lambda: ""):
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = check()
        if last:
            return last
        time.sleep(0.25)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}; last: {last!r}\n"
                         f"{diagnose()}")  # fmt: skip


def http_get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=5) as resp:
            return resp.status, resp.read().decode(errors="replace")
    except urllib.error.HTTPError as exc:
        return exc.code, ""
    except OSError:
        return 0, ""


# ---------------------------------------------------------------------------------------------


def test_images_build_and_fit_their_size_budget(images, capsys):
    base = images
    base_size = image_size(base)
    lines = [f"{seconds:6.1f} s  {what}" for what, seconds in TIMINGS.items()]
    lines.append(f"base {base}: {base_size / 1e6:.0f} MB")
    for image in (OPERATOR, MEMBER):
        size = image_size(image)
        lines.append(
            f"{image}: {size / 1e6:.0f} MB ({(size - base_size) / 1e6:.0f} MB over the base; "
            f"budget {BUDGET_TOTAL[image] / 1e6:.0f} MB, {BUDGET_OVER_BASE[image] / 1e6:.0f} MB)"
        )
        config = json.loads(
            docker("image", "inspect", "--format", "{{json .Config}}", image).stdout
        )
        assert config["User"] == f"{UID}:{UID}"
        assert config["Labels"]["org.opencontainers.image.version"] == VERSION
        assert size <= BUDGET_TOTAL[image], f"{image}: {size / 1e6:.0f} MB, over its budget"
        assert size - base_size <= BUDGET_OVER_BASE[image], f"{image}: its environment grew"
    say(capsys, "images", lines)


def test_operator_image_serves_healthz_and_metrics(containers, tmp_path, capsys):
    from tests.kube.apiserver import ApiServer

    found = probe(containers, OPERATOR, "probe", "/", "/opt/alliance", "/tmp")
    check_hardening(found)
    assert found["modules"]["alliance_operator"] and found["modules"]["kopf"]
    assert not found["modules"]["tensorflow"], "the operator image has no TensorFlow"

    namespace = "image-test"
    with ApiServer() as server:
        kubeconfig = server.write_kubeconfig(tmp_path / "kubeconfig", namespace=namespace)
        kubeconfig.chmod(0o644)  # read by uid 10001 in the container
        for args in (["apply", "-f", str(ROOT / "crds")], ["create", "namespace", namespace]):
            subprocess.run([str(BIN / "kubectl"), "--kubeconfig", str(kubeconfig), *args],
                           check=True, capture_output=True, timeout=60)  # fmt: skip
        health, metrics = free_port(), free_port()
        started = time.monotonic()
        containers.run(
            "operator",
            OPERATOR,
            "--namespace", namespace, "--liveness", f"http://0.0.0.0:{health}/healthz",
            options=[
                "--cpus", "1",
                "--volume", f"{kubeconfig}:/etc/alliance/kubeconfig:ro",
            ],
            env={
                "KUBECONFIG": "/etc/alliance/kubeconfig",
                "ALLIANCE_OPERATOR_METRICS_PORT": str(metrics),
            },
            detach=True,
        )  # fmt: skip

        def answers(port: int, path: str):
            assert containers.state("operator")["Running"], containers.diagnose()
            code, body = http_get(f"http://127.0.0.1:{port}{path}")
            return body if code == 200 else None

        wait_for(lambda: answers(health, "/healthz"), 90, "/healthz", containers.diagnose)
        healthy = time.monotonic() - started
        text = wait_for(lambda: answers(metrics, "/metrics"), 30, "/metrics", containers.diagnose)
        assert "alliance_" in text, text[:2000]
        log = containers.logs("operator", tail=400)
        assert "Traceback" not in log and "Read-only file system" not in log, log
        started_stop = time.monotonic()
        docker("stop", "--time", "20", containers.name("operator"), timeout=60)
        stopped = time.monotonic() - started_stop
        assert containers.state("operator")["ExitCode"] == 0, containers.logs("operator")
    say(capsys, OPERATOR, [f"{healthy:5.1f} s  started to /healthz 200",
                           f"{stopped:5.1f} s  docker stop (exit 0)"])  # fmt: skip


def test_member_containers_train_a_round(containers, tmp_path, capsys):
    found = probe(
        containers,
        MEMBER,
        "probe",
        "/", "/opt/alliance", "/tmp", CACHE_DIR, "/data",
        options=["--tmpfs", f"{CACHE_DIR}:rw,nosuid,nodev,size=256m,mode=1777",
                 "--volume", f"{SAMPLE_DIR}:/data:ro"],
    )  # fmt: skip
    check_hardening(found)
    assert found["modules"]["alliance"] and found["modules"]["tensorflow"]
    assert not found["modules"]["kopf"], "the member image has no operator"
    assert found["writable"][CACHE_DIR] and not found["writable"]["/data"]

    timings = []
    names = ["member-1", "member-2"]
    with S3Server(tmp_path / "s3") as server:
        admin = server.config
        store = Store(admin)
        store.ensure_bucket()
        keys = identities.provision(admin, names)
        common = {
            contract.ENV_CPU_THREADS: "1",
            "TF_CPP_MIN_LOG_LEVEL": "2",
        }

        # The Alliance's init pod: the alliance's (admin) keys.
        started = time.monotonic()
        out = containers.run(
            "init",
            MEMBER,
            *contract.init_args(0, log_level="info"),
            options=["--cpus", "1"],
            env={**admin.to_env(), **common},
            timeout=300,
        )
        assert "alliance initialised" in out.stdout, out.stdout + out.stderr
        timings.append((time.monotonic() - started, "alliance init (a container)"))

        # Two member pods, each with its own data (read-only) and keys, 1 CPU each.
        data_root = Path(tempfile.mkdtemp(dir=tmp_path))
        started = time.monotonic()
        for i, name in enumerate(names):
            data = data_root / name
            write_rows(data / "train.csv", 300, skip=300 * i)
            write_rows(data / "test.csv", 100, SAMPLE_DIR / "test.csv.gz", skip=100 * i)
            for path in (data_root, data, *data.iterdir()):
                path.chmod(0o755 if path.is_dir() else 0o644)  # for uid 10001
            containers.run(
                name,
                MEMBER,
                *contract.member_args(name, "/data", log_level="info"),
                options=[
                    "--cpus", "1",
                    "--tmpfs", f"{CACHE_DIR}:rw,nosuid,nodev,size=256m,mode=1777",
                    "--volume", f"{data}:/data:ro",
                ],
                env={**keys[name].to_env(), **common, contract.ENV_CACHE_DIR: CACHE_DIR},
                detach=True,
            )  # fmt: skip

        def all_ready():
            for name in names:
                assert containers.state(name)["Running"], containers.diagnose()
            states = [(store.get_json(heartbeat_key(n)) or {}).get("state") for n in names]
            return states == ["ready"] * len(names)

        wait_for(all_ready, 180, "both member containers ready", containers.diagnose)
        timings.append((time.monotonic() - started, "both members ready (data checked, TF)"))

        # The coordinator on this machine, with the alliance's keys.
        spec = {"rounds": 1, "minMembers": 2, "localEpochs": 1, "batchSize": 32,
                "roundDeadlineSeconds": 180, "validationDeadlineSeconds": 120}  # fmt: skip
        spec_path = tmp_path / "run.yaml"
        spec_path.write_text(yaml.safe_dump(spec))
        started = time.monotonic()
        coordinate = subprocess.run(
            [str(BIN / "alliance"), "coordinate", "--run", "containers", "--spec", str(spec_path),
             "--members", ",".join(names)],
            env={**os.environ, **admin.to_env()},
            capture_output=True,
            text=True,
            timeout=300,
        )  # fmt: skip
        timings.append((time.monotonic() - started, "alliance coordinate: 1 round (host)"))
        assert coordinate.returncode == 0, (
            f"{coordinate.stdout[-2000:]}\n{coordinate.stderr[-2000:]}\n{containers.diagnose()}"
        )
        status = store.get_run_status("containers")
        assert status["phase"] == "Completed", status
        (record,) = status["history"]
        assert sorted(record["members"]) == names and not record["dropped"], record
        assert record["validators"] == 2 and record["accuracy"] is not None, record
        assert record["numExamples"] == 600

        for name in names:
            # The parse cache on its tmpfs, written by uid 10001.
            cached = docker(
                "exec", containers.name(name), "python", "-c",
                f"import os; print(len(os.listdir({CACHE_DIR!r})))",
            )  # fmt: skip
            assert int(cached.stdout) > 0, f"{name}: nothing in its cache dir"
        started = time.monotonic()
        docker("stop", "--time", "30", *(containers.name(n) for n in names), timeout=90)
        timings.append((time.monotonic() - started, "docker stop, both members"))
        for name in names:
            state, log = containers.state(name), containers.logs(name, tail=400)
            assert state["ExitCode"] == 0, f"{name}: exit {state['ExitCode']}\n{log}"
            assert "Traceback" not in log and "Read-only file system" not in log, log
    rnd = record["finishedAt"] - record["startedAt"]
    timings.append((rnd, f"the round itself (accuracy {record['accuracy']:.3f})"))
    say(capsys, f"{MEMBER}: a round of two containers", [f"{s:5.1f} s  {w}" for s, w in timings])


def test_kind_recipe_applies_the_documented_minio():
    """scripts/e2e_kind.sh (make e2e-kind) applies the MinIO of docs/kubernetes.md, section 7."""
    docs = (ROOT / "docs" / "kubernetes.md").read_text()
    section = docs[docs.index("## 7. ") :]
    documented = re.search(r"`minio\.yaml`:.*?```yaml\n(.*?)```", section, re.S)[1]
    script = (ROOT / "scripts" / "e2e_kind.sh").read_text()
    applied = re.search(r"<<'EOF'.*?\n(.*?)\nEOF\n", script, re.S)[1]
    assert list(yaml.safe_load_all(applied)) == list(yaml.safe_load_all(documented))
    assert f"kind load docker-image {OPERATOR} {MEMBER}" in section
    assert "ALLIANCE_E2E_OPERATOR_IMAGE" in section and "make e2e-kind" in section
