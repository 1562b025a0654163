#!/usr/bin/env bash
# A Docker engine and the images' base, for building and running the images (make images,
# tests/test_containers.py) on a machine without an init system, as .ci/run does:
#
#   1. docker.io and debootstrap from apt-get, when dockerd or debootstrap are missing;
#   2. dockerd started in the background when no daemon answers (no bridge, no iptables: the
#      builds run with --network none and the tests' containers with --network host), then
#      waited for; it keeps running afterwards (its log: $TMPDIR/alliance-dockerd.log);
#   3. the base: the Dockerfile's pinned official image when the engine has it or can pull it,
#      else the stand-in scripts/local_base.sh makes (made once, when absent).
#
# Prints the base on stdout, for BASE_IMAGE:   BASE_IMAGE=$(scripts/docker_engine.sh)
# Needs root. Everything else goes to stderr.
set -euo pipefail
cd "$(dirname "$0")/.."

LOCAL_BASE=local/python:3.11-bookworm # scripts/local_base.sh's default tag
say() { echo "docker_engine: $*" >&2; }

missing=()
command -v dockerd >/dev/null || missing+=(docker.io)
command -v debootstrap >/dev/null || missing+=(debootstrap)
if ((${#missing[@]})); then
    say "installing ${missing[*]}"
    apt-get update -qq >&2
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >&2
fi

if ! docker version >/dev/null 2>&1; then
    log=${TMPDIR:-/tmp}/alliance-dockerd.log
    say "starting dockerd (log: $log)"
    setsid dockerd --iptables=false --ip6tables=false --bridge=none \
        --storage-driver=overlay2 --exec-opt native.cgroupdriver=cgroupfs \
        </dev/null >"$log" 2>&1 &
    for _ in $(seq 120); do
        docker version >/dev/null 2>&1 && break
        sleep 1
    done
    docker version >/dev/null 2>&1 || {
        say "dockerd did not answer within 120 s:"
        tail -n 30 "$log" >&2
        exit 1
    }
fi
say "engine $(docker version --format '{{.Server.Version}}'), storage $(docker info --format '{{.Driver}}')"

official=$(sed -n 's/^ARG BASE_IMAGE=//p' Dockerfile)
if docker image inspect "$official" >/dev/null 2>&1 || timeout 300 docker pull -q "$official" >&2; then
    echo "$official"
    exit 0
fi
if ! docker image inspect "$LOCAL_BASE" >/dev/null 2>&1; then
    say "no registry: making the stand-in base $LOCAL_BASE (scripts/local_base.sh)"
    scripts/local_base.sh "$LOCAL_BASE" >&2
fi
say "base: $LOCAL_BASE (a stand-in for $official)"
echo "$LOCAL_BASE"
