"""A throwaway PostgreSQL server for tests: initdb and pg_ctl on a temporary folder and a free port.

The binaries are Debian's `postgresql` package (infra/scripts/install.sh installs it when missing): found on
PATH or in /usr/lib/postgresql/<version>/bin. initdb refuses to run as root, so as root (CI, containers) the
server runs as the `postgres` user the package creates (runuser), in a folder under /tmp it owns. The server
listens on 127.0.0.1 only, trusts local connections (user "latentwire"), and skips fsync: it is gone after the
test session anyway.
"""
from __future__ import annotations

import glob
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

USER = "latentwire"


def postgres_bin() -> Path | None:
    """The folder holding initdb and pg_ctl, or None when PostgreSQL is not installed."""
    found = shutil.which("initdb")
    if found and shutil.which("pg_ctl"):
        return Path(os.path.realpath(found)).parent
    versions = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(p.split("/")[4]))
    return Path(versions[-1]).parent if versions else None


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class PostgresServer:
    """A running server; ``dsn(db)`` is a libpq URI for database ``db``."""

    bin: Path
    folder: Path
    port: int
    run_as: list[str]

    def dsn(self, database: str = "postgres") -> str:
        return f"postgresql://{USER}@127.0.0.1:{self.port}/{database}"

    def create_database(self, name: str) -> str:
        """A new empty database; returns its URI."""
        import psycopg

        with psycopg.connect(self.dsn(), autocommit=True) as connection:
            connection.execute(f'CREATE DATABASE "{name}"')
        return self.dsn(name)

    def stop(self) -> None:
        subprocess.run([*self.run_as, str(self.bin / "pg_ctl"), "-D", str(self.folder / "data"), "-m", "immediate",
                        "-w", "stop"], capture_output=True, timeout=60)
        shutil.rmtree(self.folder, ignore_errors=True)


def start_postgres() -> PostgresServer:
    """initdb + pg_ctl start on a new temporary folder and a free port; stop() tears it down."""
    binaries = postgres_bin()
    if binaries is None:
        raise RuntimeError("PostgreSQL is not installed (initdb not found); run infra/scripts/install.sh, which "
                           "installs Debian's postgresql package")
    folder = Path(tempfile.mkdtemp(prefix="latentwire-pg-"))
    run_as: list[str] = []
    if os.geteuid() == 0:
        # initdb refuses root: run the server as the package's postgres user, in a folder it owns.
        try:
            pwd.getpwnam("postgres")
        except KeyError:
            shutil.rmtree(folder, ignore_errors=True)
            raise RuntimeError("running as root, and there is no postgres user to run PostgreSQL as (initdb refuses "
                               "root); install Debian's postgresql package, which creates it") from None
        shutil.chown(folder, user="postgres")
        run_as = ["runuser", "-u", "postgres", "--"]
    try:
        subprocess.run([*run_as, str(binaries / "initdb"), "-D", str(folder / "data"), "-A", "trust", "-U", USER,
                        "-E", "UTF8", "--no-sync"], check=True, capture_output=True, timeout=120)
        for _ in range(5):  # the port could be taken between picking and binding
            port = _free_port()
            started = subprocess.run(
                [*run_as, str(binaries / "pg_ctl"), "-D", str(folder / "data"), "-l", str(folder / "server.log"),
                 "-w", "-t", "60", "-o", f"-p {port} -k {folder} -c listen_addresses=127.0.0.1 -c fsync=off "
                 "-c synchronous_commit=off -c full_page_writes=off -c max_connections=200", "start"],
                capture_output=True, timeout=120)
            if started.returncode == 0:
                return PostgresServer(binaries, folder, port, run_as)
        log = (folder / "server.log").read_text(errors="replace")[-2000:] if (folder / "server.log").exists() else ""
        raise RuntimeError(f"PostgreSQL did not start: {started.stderr.decode(errors='replace')[-500:]}\n{log}")
    except BaseException:
        shutil.rmtree(folder, ignore_errors=True)
        raise
