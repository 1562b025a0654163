"""Shared fixtures: a real S3 server (the JuiceFS gateway) and small real MNIST data."""

from __future__ import annotations

import gzip
import itertools
from pathlib import Path

import pytest

from alliance.s3server import S3Server
from alliance.store import Store, StoreConfig

PROJECT_ROOT = Path(__file__).resolve().parents[1]
SAMPLE_DIR = PROJECT_ROOT / "examples" / "mnist-sample"
_buckets = itertools.count(1)


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory) -> S3Server:
    """One real S3 server for the session; each test gets its own bucket."""
    server = S3Server(tmp_path_factory.mktemp("s3"))
    server.start()
    yield server
    server.stop()


@pytest.fixture
def store(s3_server) -> Store:
    cfg = s3_server.config
    config = StoreConfig(cfg.endpoint, cfg.access_key, cfg.secret_key, f"test-{next(_buckets)}")
    store = Store(config, retry_seconds=30)
    store.ensure_bucket()
    return store


def write_rows(
    path: Path, rows: int, source: Path = SAMPLE_DIR / "train.csv.gz", skip: int = 0
) -> Path:
    """Copy ``rows`` real MNIST rows (after ``skip``) from the shipped sample to ``path``."""
    with gzip.open(source, "rt", newline="") as f:
        lines = f.read().splitlines()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join([lines[0], *lines[1 + skip : 1 + skip + rows]]) + "\n")
    return path


@pytest.fixture
def member_dirs(tmp_path) -> list[Path]:
    """Three member data dirs of real MNIST: 600 train and 200 test rows each."""
    dirs = []
    for i in range(3):
        d = tmp_path / "members" / f"member-{i + 1}"
        write_rows(d / "train.csv", 600, skip=600 * i)
        write_rows(d / "test.csv", 200, SAMPLE_DIR / "test.csv.gz", skip=200 * i)
        dirs.append(d)
    return dirs
