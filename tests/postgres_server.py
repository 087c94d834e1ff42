"""A throwaway PostgreSQL server for tests: the distribution's ``initdb`` and ``pg_ctl``, a Unix
socket in a temporary folder, no TCP port, no password (trust), removed afterwards.

``initdb`` refuses to run as root; as root (CI) the server runs as an unprivileged user
(``postgres``, which the distribution's package creates, else ``nobody``) through ``runuser``.
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Optional

#: set by .ci/run after it installed the server: a server that cannot start fails the tests there
REQUIRED = "CALBENCH_REQUIRE_POSTGRES"
USER = "calbench"


class Unavailable(Exception):
    """Why no server can run on this machine (a test skips with this reason, or fails under CI)."""


def server_bin() -> Path:
    """The folder holding ``initdb`` and ``pg_ctl``: on PATH, else Debian/Ubuntu's versioned folder."""
    found = shutil.which("initdb")
    candidates = [Path(found).resolve().parent] if found else []
    versions = sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=lambda p: int(Path(p).parent.name), reverse=True)
    candidates += [Path(p) for p in versions]
    for folder in candidates:
        if (folder / "initdb").is_file() and (folder / "pg_ctl").is_file():
            return folder
    raise Unavailable(
        "PostgreSQL server binaries (initdb, pg_ctl) are not installed: install the distribution's "
        "postgresql package (.ci/run does) to run these tests"
    )


def _runner() -> tuple[list[str], Optional[pwd.struct_passwd]]:
    """Command prefix that drops root (initdb refuses root), and the user it runs as (None: ourselves)."""
    if os.geteuid() != 0:
        return [], None
    for name in ("postgres", "nobody"):
        try:
            user = pwd.getpwnam(name)
        except KeyError:
            continue
        if shutil.which("runuser"):
            return ["runuser", "-u", name, "--"], user
        if shutil.which("su"):
            return ["su", name, "-s", "/bin/sh", "-c", 'exec "$0" "$@"'], user
    raise Unavailable(
        "running as root, and no unprivileged user (postgres, nobody) with runuser or su to run initdb as"
    )


class PostgresServer:
    """``with PostgresServer() as server: server.database("x")`` gives a URL for an empty database."""

    def __init__(self) -> None:
        try:
            import psycopg  # noqa: F401
        except ImportError:
            raise Unavailable("the PostgreSQL driver is not installed: pip install 'calbench[postgres]'") from None
        self.bin = server_bin()
        self.prefix, self.user = _runner()
        self.home: Optional[Path] = None

    def _run(self, *args: str) -> None:
        done = subprocess.run([*self.prefix, *args], capture_output=True, text=True, timeout=120, cwd=self.home)
        if done.returncode != 0:
            raise Unavailable(f"{Path(args[0]).name} failed: {(done.stderr or done.stdout).strip().splitlines()[-1:]}")

    def __enter__(self) -> PostgresServer:
        # a short path of its own: socket paths are limited to ~100 bytes, and the server user must reach it
        self.home = Path(tempfile.mkdtemp(prefix="calbench-pg-"))
        data, log = self.home / "data", self.home / "log"
        options = f"-k {self.home} -c listen_addresses='' -F"  # Unix socket only; -F: no fsync (a test server)
        try:
            if self.user is not None:
                os.chown(self.home, self.user.pw_uid, self.user.pw_gid)
            self._run(
                str(self.bin / "initdb"),
                "-D",
                str(data),
                "-A",
                "trust",
                "-U",
                USER,
                "-E",
                "UTF8",
                "--locale=C",
                "--no-sync",
            )
            self._run(str(self.bin / "pg_ctl"), "-D", str(data), "-o", options, "-l", str(log), "-w", "start")
        except (Unavailable, OSError, subprocess.TimeoutExpired) as exc:
            shutil.rmtree(self.home, ignore_errors=True)
            raise exc if isinstance(exc, Unavailable) else Unavailable(f"cannot start PostgreSQL: {exc}") from None
        return self

    def __exit__(self, *exc: object) -> None:
        if self.home is None:
            return
        subprocess.run(
            [*self.prefix, str(self.bin / "pg_ctl"), "-D", str(self.home / "data"), "-m", "immediate", "stop"],
            capture_output=True,
            timeout=60,
        )
        shutil.rmtree(self.home, ignore_errors=True)

    def database(self, name: str) -> str:
        """Create database ``name`` and return its SQLAlchemy URL (psycopg 3 over the Unix socket)."""
        import psycopg

        with psycopg.connect(host=str(self.home), user=USER, dbname="postgres", autocommit=True) as connection:
            connection.execute(f'CREATE DATABASE "{name}"')
        return f"postgresql+psycopg://{USER}@/{name}?host={self.home}"
