"""A throwaway PostgreSQL server for the distributed tests, on 127.0.0.1 in a temp folder.

PostgreSQL refuses to run as root, so as root the server runs as the ``postgres`` system
user, which cannot enter pytest's root-owned temp folders: the cluster lives in a folder of
its own under /tmp, owned by that user.
"""

from __future__ import annotations

import glob
import os
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest


PASSWORD = "s3cret-pw-7f3a"


def _bindir() -> Path | None:
    found = shutil.which("initdb")
    if found:
        return Path(found).resolve().parent
    dirs = sorted(glob.glob("/usr/lib/postgresql/*/bin"))
    return Path(dirs[-1]) if dirs else None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Server:
    bindir: Path
    base: Path
    port: int

    @property
    def url(self) -> str:
        return f"postgresql://lrsweep:{PASSWORD}@127.0.0.1:{self.port}/lrsweep"

    def _run(self, tool: str, *args: str) -> None:
        prefix = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
        subprocess.run(
            [*prefix, str(self.bindir / tool), *args], check=True, capture_output=True, text=True
        )

    def start(self) -> None:
        self._run(
            "pg_ctl",
            "-D",
            str(self.base / "data"),
            "-l",
            str(self.base / "log"),
            "-w",
            "-o",
            f"-p {self.port} -k {self.base} -c listen_addresses=127.0.0.1",
            "start",
        )

    def stop(self) -> None:
        self._run("pg_ctl", "-D", str(self.base / "data"), "-m", "fast", "-w", "stop")

    def sql(self, statement: str) -> None:
        self._run(
            "psql",
            "-h",
            str(self.base),
            "-p",
            str(self.port),
            "-U",
            "postgres",
            "-d",
            "postgres",
            "-v",
            "ON_ERROR_STOP=1",
            "-c",
            statement,
        )


@pytest.fixture(scope="session")
def postgres() -> Iterator[Server]:
    bindir = _bindir()
    if bindir is None:
        if os.environ.get("CI"):
            raise RuntimeError("PostgreSQL is not installed; .ci/run installs it")
        pytest.skip("PostgreSQL is not installed (apt-get install postgresql)")
    base = Path(tempfile.mkdtemp(prefix="lrsweep-pg-", dir="/tmp"))
    if os.geteuid() == 0:
        shutil.chown(base, "postgres", "postgres")
    server = Server(bindir, base, _free_port())
    server._run(
        "initdb",
        "-D",
        str(base / "data"),
        "-U",
        "postgres",
        "--auth-local=trust",
        "--auth-host=scram-sha-256",
        "--no-sync",
    )
    server.start()
    try:
        server.sql(f"CREATE ROLE lrsweep LOGIN PASSWORD '{PASSWORD}'")
        server.sql("CREATE DATABASE lrsweep OWNER lrsweep")
        yield server
    finally:
        try:
            server.stop()
        finally:
            shutil.rmtree(base, ignore_errors=True)
