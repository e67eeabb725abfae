"""A throwaway PostgreSQL server from Debian's packages (`make test` installs them), on loopback,
for running the graph with the Dagster instance on PostgreSQL."""

import glob
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator


def _server_binaries() -> Path:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    initdb = Path(found[-1]) if found else (Path(shutil.which("initdb")) if shutil.which("initdb") else None)
    if initdb is None:
        raise RuntimeError("no PostgreSQL server here: install Debian's postgresql package (`make test` does)")
    return initdb.parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def postgres_server() -> Iterator[dict]:
    """A fresh cluster (trust authentication, loopback only) with a database `dagster`; yields
    the DAGSTER_PG_* environment for configs/dagster-postgres.yaml."""
    binaries = _server_binaries()
    root = Path(tempfile.mkdtemp(prefix="slm-postgres-"))
    run_as: list[str] = []
    if os.geteuid() == 0:  # the server refuses to run as root: it runs as Debian's postgres user
        account = pwd.getpwnam("postgres")
        os.chown(root, account.pw_uid, account.pw_gid)
        run_as = ["runuser", "-u", "postgres", "--"]
    port = _free_port()
    data = root / "data"

    def run(*command: str) -> None:
        subprocess.run([*run_as, *command], check=True, capture_output=True, text=True, timeout=120)

    try:
        run(str(binaries / "initdb"), "-D", str(data), "-U", "dagster", "-A", "trust", "--no-sync")
        run(str(binaries / "pg_ctl"), "-D", str(data), "-l", str(root / "server.log"), "-w", "start",
            "-o", f"-c listen_addresses=127.0.0.1 -p {port} -k {root} -c fsync=off")
        run(str(binaries / "createdb"), "-h", "127.0.0.1", "-p", str(port), "-U", "dagster", "dagster")
        yield {"DAGSTER_PG_HOST": "127.0.0.1", "DAGSTER_PG_PORT": str(port), "DAGSTER_PG_USER": "dagster",
               "DAGSTER_PG_PASSWORD": "unused-with-trust", "DAGSTER_PG_DB": "dagster"}
    finally:
        subprocess.run([*run_as, str(binaries / "pg_ctl"), "-D", str(data), "-m", "fast", "stop"], capture_output=True, timeout=60)
        shutil.rmtree(root, ignore_errors=True)
