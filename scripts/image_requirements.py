"""Write the images' requirement files: the closure, in requirements.lock, of what each needs.

    .venv/bin/python scripts/image_requirements.py          # rewrite both files
    .venv/bin/python scripts/image_requirements.py --check  # exit 1 if a file is out of date

Each image installs its file with ``pip install --no-deps -r``, so the file must be the complete
pinned closure: the project's dependencies plus the image's extras (``operator`` for
images/operator-requirements.txt, ``tf`` for images/member-requirements.txt), followed through every
package's ``Requires-Dist`` (with extras and environment markers, evaluated for CPython 3.11 on
Linux, the images' platform), each at its requirements.lock pin.

The dependency metadata is read from the installed distributions of the running environment,
so run it with the project's virtual environment (``make install`` installs requirements.lock
there); a package of the closure that is missing there, or installed at another version than
requirements.lock pins, is an error, not a guess.
"""

from __future__ import annotations

import argparse
import importlib.metadata as md
import sys
import tomllib
from pathlib import Path

from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[1]
LOCK = ROOT / "requirements.lock"
PYPROJECT = ROOT / "pyproject.toml"

# requirement file -> the project's extras that image installs
IMAGES = {
    "images/operator-requirements.txt": ("operator",),
    "images/member-requirements.txt": ("tf",),
}

# The images' interpreter: python:3.11.x-slim-bookworm (platform_machine stays the build
# machine's; no package of the lock has a machine-dependent dependency).
TARGET_ENV = {
    "implementation_name": "cpython",
    "platform_python_implementation": "CPython",
    "platform_system": "Linux",
    "sys_platform": "linux",
    "os_name": "posix",
    "python_version": "3.11",
}


# Packages `pip freeze` leaves out of requirements.lock although the tree needs them:
# tensorflow-cpu requires setuptools, astunparse requires wheel. Pinned here, with their own
# unconditional dependencies as their METADATA declares them (read from the wheels). setuptools
# is the build-system pin of pyproject.toml. A pin in requirements.lock takes precedence.
def _build_setuptools() -> str:
    build = tomllib.loads(PYPROJECT.read_text())["build-system"]["requires"]
    return next(r.split("==")[1] for r in build if r.startswith("setuptools=="))


UNLOCKED: dict[str, tuple[str, tuple[str, ...]]] = {
    "setuptools": (_build_setuptools(), ()),
    "wheel": ("0.48.0", ("packaging>=24.0",)),
}


class ClosureError(Exception):
    pass


def read_lock(path: Path = LOCK) -> dict[str, tuple[str, str]]:
    """canonical name -> (name as spelled in the lock, version)."""
    pins = {}
    for raw in path.read_text().splitlines():
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        name, sep, version = line.partition("==")
        if not sep:
            raise ClosureError(f"{path.name}: not a '==' pin: {raw!r}")
        pins[canonicalize_name(name)] = (name.strip(), version.strip())
    return pins


def project_requirements(extras: tuple[str, ...], path: Path = PYPROJECT) -> list[Requirement]:
    project = tomllib.loads(path.read_text())["project"]
    reqs = [Requirement(r) for r in project["dependencies"]]
    for extra in extras:
        reqs += [Requirement(r) for r in project["optional-dependencies"][extra]]
    return reqs


def closure(extras: tuple[str, ...], pins: dict[str, tuple[str, str]]) -> list[str]:
    """The ``name==version`` lines (lock spelling, sorted) the project with ``extras`` needs."""
    pins = dict(pins)
    env = {**default_environment(), **TARGET_ENV}

    def applies(req: Requirement, asked: list[str]) -> bool:
        return req.marker is None or any(req.marker.evaluate({**env, "extra": e}) for e in asked)

    wanted: dict[str, set[str]] = {}  # canonical name -> the extras asked of it
    queue = [r for r in project_requirements(extras) if applies(r, [""])]
    while queue:
        req = queue.pop()
        name = canonicalize_name(req.name)
        if name not in pins and name in UNLOCKED:
            pins[name] = (name, UNLOCKED[name][0])
        if name not in pins:
            raise ClosureError(f"{req.name} is needed ({req}) but requirements.lock has no pin")
        locked = pins[name][1]
        if not req.specifier.contains(locked, prereleases=True):
            raise ClosureError(f"requirements.lock pins {name}=={locked}, which is not {req}")
        first = name not in wanted
        new_extras = {canonicalize_name(e) for e in req.extras} - wanted.get(name, set())
        if not first and not new_extras:
            continue
        wanted.setdefault(name, set()).update(new_extras)
        if name in UNLOCKED and UNLOCKED[name][0] == locked:
            queue += [Requirement(r) for r in UNLOCKED[name][1]] if first else []
            continue
        try:
            dist = md.distribution(name)
        except md.PackageNotFoundError:
            raise ClosureError(f"{name} is not installed here: run `make install` first") from None
        if dist.version != locked:
            raise ClosureError(
                f"{name} {dist.version} is installed, requirements.lock pins {locked}: "
                "run `make install` first"
            )
        # Its own requirements: the unconditional ones the first time it is met, and those of
        # each extra when that extra is first asked for.
        asked = ([""] if first else []) + sorted(new_extras)
        queue += [
            dep
            for dep in map(Requirement, dist.requires or [])
            if (first if dep.marker is None else applies(dep, asked))
        ]
    return [f"{pins[n][0]}=={pins[n][1]}" for n in sorted(wanted)]


def render(path: str, extras: tuple[str, ...], pins: dict[str, tuple[str, str]]) -> str:
    lines = closure(extras, pins)
    header = [
        f"# {path}: the complete closure of the project's dependencies and its",
        f"# extras [{','.join(extras)}], pinned as in requirements.lock; the image installs it",
        "# with `pip install --no-deps -r`.",
        "# Generated by scripts/image_requirements.py: do not edit.",
    ]
    return "\n".join([*header, *lines]) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="only check the files are current")
    args = parser.parse_args(argv)
    try:
        pins = read_lock()
        rendered = {path: render(path, extras, pins) for path, extras in IMAGES.items()}
    except ClosureError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    stale = []
    for path, text in rendered.items():
        target = ROOT / path
        current = target.read_text() if target.exists() else None
        if current == text:
            continue
        stale.append(path)
        if not args.check:
            target.write_text(text)
            count = sum(not line.startswith("#") for line in text.splitlines())
            print(f"wrote {path} ({count} packages)")
    if args.check and stale:
        print(
            f"out of date: {', '.join(stale)}; run scripts/image_requirements.py", file=sys.stderr
        )
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
