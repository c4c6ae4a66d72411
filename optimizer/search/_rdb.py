"""RDB storages (SQLite, PostgreSQL, MySQL): Optuna's RDBStorage with heartbeats, and what a
database server's refusal means, as one line naming the fix.
"""

from __future__ import annotations

import importlib
import random
import re
import time
import warnings
from typing import Any

import optuna

from optimizer.errors import ConfigError
from optimizer.search.owners import MAX_RETRY

__all__ = ["display_url", "first_line", "open_server", "rdb_storage"]

#: How long to wait for a database server to answer before saying it cannot be reached.
CONNECT_TIMEOUT_SECONDS = 5

# SQLAlchemy driver name → (module to import, pip package, connect_args key of its connect timeout).
_DRIVERS = {
    "psycopg2": ("psycopg2", "psycopg2-binary", "connect_timeout"),
    "psycopg": ("psycopg", "psycopg[binary]", "connect_timeout"),
    "pg8000": ("pg8000", "pg8000", "timeout"),
    "mysqldb": ("MySQLdb", "mysqlclient", "connect_timeout"),
    "pymysql": ("pymysql", "pymysql", "connect_timeout"),
}
#: The driver of each backend that mergeopt installs (extra ``postgres``) or names in its messages.
PREFERRED_DRIVER = {"postgresql": "psycopg2", "mysql": "pymysql"}
_CREATION_RACE = ("already exists", "duplicate key", "unique constraint failed")
_DEFAULT_PORT = {"postgresql": 5432, "mysql": 3306}


def display_url(url: str) -> str:
    """``url`` with its password (if any) replaced by ***: what messages and logs may show."""
    return re.sub(r"(://[^:/@]*):[^@/]*@", r"\1:***@", url)


def rdb_storage(
    url: str, engine_kwargs: dict[str, Any], heartbeat_interval: int, grace_period: int
) -> optuna.storages.RDBStorage:
    """An RDBStorage with heartbeats, retried when another worker is creating the same tables."""
    for attempt in range(4):
        try:
            with warnings.catch_warnings():
                # Heartbeats have been "experimental" since Optuna 2.8; they are what we rely on.
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                return optuna.storages.RDBStorage(
                    url,
                    engine_kwargs=engine_kwargs,
                    heartbeat_interval=heartbeat_interval,
                    grace_period=grace_period,
                    heartbeat_stale_trial_callback=optuna.storages.RetryHeartbeatStaleTrialCallback(
                        max_retry=MAX_RETRY
                    ),
                )
        except Exception as exc:
            # Workers that start together on a new storage race to create Optuna's tables and
            # version rows; the losers see one of these, and the tables once they try again.
            text = str(exc).lower()
            race = isinstance(exc, AssertionError) or any(s in text for s in _CREATION_RACE)
            if attempt == 3 or not race:
                raise
            time.sleep(0.2 + random.random() * 0.5)
    raise AssertionError("unreachable")


def open_server(url: str, heartbeat_interval: int, grace_period: int) -> optuna.storages.BaseStorage:
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    try:
        u = make_url(url)
    except ArgumentError:
        raise ConfigError(
            f"storage URL {display_url(url)!r} is not a valid database URL;"
            " write postgresql://USER:PASSWORD@HOST:PORT/DB"
        ) from None
    shown = u.render_as_string(hide_password=True)
    backend = u.get_backend_name()
    if "+" in u.drivername:
        driver = u.drivername.split("+", 1)[1]
        if driver not in _DRIVERS:
            raise ConfigError(
                f"storage {shown}: driver {driver!r} is not supported (Optuna needs a synchronous one);"
                f" use {backend}+{PREFERRED_DRIVER[backend]}://"
            )
        if not _importable(driver):
            raise ConfigError(_missing_driver(shown, backend, driver))
    else:
        # No driver named: SQLAlchemy's default (psycopg 3 for PostgreSQL since SQLAlchemy 2.1),
        # else the one mergeopt's extra installs, whichever is there.
        choices = dict.fromkeys([u.get_dialect().driver, PREFERRED_DRIVER[backend]])
        driver = next((d for d in choices if d in _DRIVERS and _importable(d)), "")
        if not driver:
            raise ConfigError(_missing_driver(shown, backend, PREFERRED_DRIVER[backend]))
        u = u.set(drivername=f"{backend}+{driver}")
        url = u.render_as_string(hide_password=False)
    timeout_key = _DRIVERS[driver][2]
    connect_args = {} if timeout_key in u.query else {timeout_key: CONNECT_TIMEOUT_SECONDS}
    engine_kwargs = {"pool_pre_ping": True, "connect_args": connect_args}
    try:
        return rdb_storage(url, engine_kwargs, heartbeat_interval, grace_period)
    except Exception as exc:
        raise ConfigError(_explain_server_error(exc, u, shown)) from None


def _importable(driver: str) -> bool:
    try:
        importlib.import_module(_DRIVERS[driver][0])
    except ImportError:
        return False
    return True


def _missing_driver(shown: str, backend: str, driver: str) -> str:
    module, package, _ = _DRIVERS[driver]
    fix = f"pip install '{package}'"
    if driver == "psycopg2":
        fix = f"pip install 'mergeopt[postgres]' (or {fix})"
    return f"storage {shown} needs the {backend} driver {module!r}, which is not installed; install it: {fix}"


def _explain_server_error(exc: BaseException, u: Any, shown: str) -> str:
    """One line naming what went wrong with a database server and how to fix it."""
    text = str(getattr(exc, "orig", None) or exc)
    low = text.lower()
    backend = u.get_backend_name()
    where = f"{u.host or 'localhost'}:{u.port or _DEFAULT_PORT[backend]}"
    if "host" in u.query:
        where = f"{u.query['host']} (socket)"
    if "password authentication failed" in low or "access denied for user" in low:
        return (
            f"{backend} at {where} refused user {u.username!r}: password authentication failed;"
            f" fix the user or password in the storage URL {shown}"
        )
    m = re.search(r'role "([^"]+)" does not exist', text)
    if m:
        return f"{backend} at {where} has no user {m.group(1)!r}; create it or fix the user in the storage URL {shown}"
    m = re.search(r'database "([^"]+)" does not exist', text) or re.search(r"unknown database '([^']+)'", text, re.I)
    if m:
        return (
            f"{backend} at {where} has no database {m.group(1)!r}; create it (e.g. createdb {m.group(1)})"
            f" or fix the name in the storage URL {shown}"
        )
    if "no pg_hba.conf entry" in low:
        return (
            f"{backend} at {where} does not accept this user/host (pg_hba.conf); allow it on the server or fix {shown}"
        )
    unreachable = (
        "connection refused",
        "timeout expired",
        "timed out",
        "could not translate host name",
        "no route to host",
        "network is unreachable",
        "can't connect to",
        "no such file or directory",
    )
    if any(s in low for s in unreachable):
        return (
            f"cannot reach the {backend} server at {where} ({first_line(text)}); start it, or fix host and port"
            f" in the storage URL {shown}"
        )
    return f"cannot open storage {shown}: {type(exc).__name__}: {first_line(text)}"


def first_line(exc: object) -> str:
    """The first meaningful line of an error, with libpq's "connection to server ... failed: " cut."""
    text = str(exc).strip()
    line = text.splitlines()[0] if text else type(exc).__name__
    return re.sub(r'^connection to server at "[^"]*"(, port \d+)? failed: ', "", line).strip()
