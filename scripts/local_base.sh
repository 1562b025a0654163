#!/usr/bin/env bash
# A stand-in for the images' base (python:3.11.14-slim-bookworm) made without a registry, for
# machines that reach none (the project's build machines): Debian bookworm's own Python 3.11 with
# what the Dockerfile relies on from the official image: `python` on PATH, a pip in /usr/local
# that the images uninstall, no PEP 668 marker (the official image has none), CA certificates,
# PATH and LANG set. Needs root, debootstrap, a Docker engine, and ~2 minutes.
#
#   scripts/local_base.sh [TAG]                     # TAG: local/python:3.11-bookworm
#   make images BASE_IMAGE=local/python:3.11-bookworm
#
# DEBIAN_MIRROR overrides the archive (default: the one in /etc/apt/sources.list.d/debian.sources,
# else deb.debian.org).
set -euo pipefail

TAG=${1:-local/python:3.11-bookworm}
PIP_VERSION=25.3 # the Makefile's pin
PYTHON=${PYTHON:-python3}
sources=/etc/apt/sources.list.d/debian.sources
default_mirror=$(sed -n 's/^URIs: *//p' "$sources" 2>/dev/null | head -n 1)
MIRROR=${DEBIAN_MIRROR:-${default_mirror:-http://deb.debian.org/debian}}

rootfs=$(mktemp -d)
trap 'rm -rf "$rootfs"' EXIT

debootstrap --variant=minbase --include=python3,python-is-python3,ca-certificates,netbase \
    bookworm "$rootfs" "$MIRROR"
rm -rf "$rootfs"/var/lib/apt/lists/* "$rootfs"/var/cache/apt/*.bin
rm "$rootfs"/usr/lib/python3.11/EXTERNALLY-MANAGED

# pip, installed by itself from its wheel (downloaded here: the chroot has no network needs).
wheel=pip-$PIP_VERSION-py3-none-any.whl
"$PYTHON" -m pip download --quiet --no-deps --only-binary=:all: --dest "$rootfs/tmp" \
    "pip==$PIP_VERSION"
chroot "$rootfs" python "/tmp/$wheel/pip" install --quiet --no-index --no-cache-dir \
    --root-user-action=ignore --disable-pip-version-check "/tmp/$wheel"
rm "$rootfs/tmp/$wheel"

tar -C "$rootfs" -c . | docker import \
    -c 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    -c 'ENV LANG=C.UTF-8' \
    -c 'CMD ["python3"]' \
    - "$TAG"
