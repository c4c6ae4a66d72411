"""Optuna storages by URL, with crash recovery switched on.

Three kinds, chosen by the URL:

* ``sqlite:///PATH`` (or a plain ``PATH.db``): one file, one search process at a time is the safe
  use. ``sqlite:///rel/study.db`` is relative to the working folder, ``sqlite:////abs/study.db``
  absolute (SQLAlchemy's convention).
* ``journal:///ABS/PATH.log`` (or a plain ``PATH.log`` / ``PATH.journal``): Optuna's append-only
  journal file, for several search processes on one machine (or on a shared file system). The
  part after ``journal://`` is the path, so ``journal:///abs/x.log`` is absolute and
  ``journal://rel/x.log`` relative. ``optuna-dashboard`` opens such a study by the plain path.
* ``postgresql://USER:PASSWORD@HOST:PORT/DB`` (``postgresql+psycopg2://`` likewise): one server,
  any number of search processes on any number of machines. Needs ``pip install 'mergeopt[postgres]'``.

An RDB storage (SQLite, PostgreSQL) gets a heartbeat: a trial whose process died (SIGKILL, power
loss) stops beating, is marked FAIL once the grace period passes, and is re-enqueued with the
same parameters and labels by Optuna's own retry callback, so a killed search loses nothing.

A journal has no heartbeat. Instead each trial records its owner (:func:`mark_owner`: host, pid,
process start, a beat time) and every worker, when it starts, calls :func:`fail_stale_running`:
RUNNING trials whose owner is gone (:func:`owner_alive`) become FAIL and are re-enqueued the way
Optuna's retry callback does it, so both kinds of storage recover a killed worker the same way.

Every mistake in a URL (unknown scheme, unreachable server, wrong password, missing database or
driver, a file of the wrong kind) raises :class:`ConfigError` with one line naming the fix, and a
storage that could not be opened leaves no file or folder behind.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import random
import re
import socket
import time
import warnings
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState

from optimizer.errors import ConfigError

__all__ = [
    "GRACE_SECONDS",
    "HEARTBEAT_SECONDS",
    "MAX_RETRY",
    "OWNER_ATTR",
    "STALE_SECONDS",
    "display_url",
    "fail_stale_running",
    "journal_path",
    "make_storage",
    "mark_owner",
    "owner_alive",
    "recover_stale",
    "requeue",
    "sqlite_path",
]

HEARTBEAT_SECONDS = 5
GRACE_SECONDS = 20
#: How often a trial whose worker died is re-run before it is left as FAIL (per storage kind alike).
MAX_RETRY = 3
#: A journal trial owned by a process on another machine counts as dead after this long without a beat.
STALE_SECONDS = 1800.0
#: How long to wait for a database server to answer before saying it cannot be reached.
CONNECT_TIMEOUT_SECONDS = 5
#: The trial user attr :func:`mark_owner` writes.
OWNER_ATTR = "owner"

_JOURNAL_SUFFIXES = (".log", ".journal")
_SQLITE_SUFFIXES = (".db", ".sqlite", ".sqlite3")
_SQLITE_MAGIC = b"SQLite format 3\x00"
_KINDS_HELP = (
    "use sqlite:///PATH.db (one process), journal:///ABS/PATH.log (several processes on one machine)"
    " or postgresql://USER:PASSWORD@HOST:PORT/DB (several machines)"
)
# SQLAlchemy driver name → (module to import, pip package, connect_args key of its connect timeout).
_DRIVERS = {
    "psycopg2": ("psycopg2", "psycopg2-binary", "connect_timeout"),
    "psycopg": ("psycopg", "psycopg[binary]", "connect_timeout"),
    "pg8000": ("pg8000", "pg8000", "timeout"),
    "mysqldb": ("MySQLdb", "mysqlclient", "connect_timeout"),
    "pymysql": ("pymysql", "pymysql", "connect_timeout"),
}
#: The driver of each backend that mergeopt installs (extra ``postgres``) or names in its messages.
_PREFERRED_DRIVER = {"postgresql": "psycopg2", "mysql": "pymysql"}
_CREATION_RACE = ("already exists", "duplicate key", "unique constraint failed")
_DEFAULT_PORT = {"postgresql": 5432, "mysql": 3306}


# -- URLs --------------------------------------------------------------------------------------


def sqlite_path(url: str) -> Path | None:
    """The database file of a ``sqlite:///`` URL, else None."""
    m = re.match(r"sqlite(\+\w+)?:///", url)
    return Path(url[m.end() :]) if m and url[m.end() :] else None


def journal_path(url: str) -> Path | None:
    """The journal file of a ``journal://`` URL or of a plain ``.log``/``.journal`` path, else None."""
    if url.startswith("journal://"):
        rest = url[len("journal://") :]
        if rest.startswith("//"):  # journal:////abs, as SQLAlchemy writes absolute SQLite paths
            rest = "/" + rest.lstrip("/")
        return Path(rest) if rest else None
    if "://" not in url and url.endswith(_JOURNAL_SUFFIXES):
        return Path(url)
    return None


def make_storage(
    url: str,
    *,
    create: bool = True,
    heartbeat_interval: int = HEARTBEAT_SECONDS,
    grace_period: int = GRACE_SECONDS,
) -> optuna.storages.BaseStorage:
    """Open the storage at ``url``; with ``create``, make its file (and folder) if missing.

    Without ``create`` (readers: pareto, export) a missing SQLite or journal file is an error
    instead of a new empty study. ``heartbeat_interval`` and ``grace_period`` (seconds) apply to
    SQLite and PostgreSQL: a RUNNING trial that has not beaten for ``grace_period`` is failed and
    retried when a worker next starts a trial.
    """
    if "://" not in url:  # a plain path, as users type it
        if url.endswith(_SQLITE_SUFFIXES):
            url = f"sqlite:///{url}"
        elif url.endswith(_JOURNAL_SUFFIXES):
            url = f"journal://{url}"
        else:
            raise ConfigError(f"storage {url!r} is neither a URL nor a .db or .log file; {_KINDS_HELP}")
    scheme = url.split("://", 1)[0].lower()
    backend = scheme.split("+", 1)[0]
    if backend in ("sqlite", "journal"):
        path = sqlite_path(url) if backend == "sqlite" else journal_path(url)
        if path is None:
            raise ConfigError(f"storage URL {url!r} names no file; {_KINDS_HELP}")
        if backend == "sqlite":
            return _open_sqlite(url, path, create, heartbeat_interval, grace_period)
        return _open_journal(path, create)
    if backend == "postgres":
        raise ConfigError(
            f"storage URL {display_url(url)!r}: SQLAlchemy does not accept postgres://; write postgresql://"
        )
    if backend in _PREFERRED_DRIVER:
        return _open_server(url, heartbeat_interval, grace_period)
    raise ConfigError(f"storage URL {display_url(url)!r} has an unknown scheme {scheme!r}; {_KINDS_HELP}")


def display_url(url: str) -> str:
    """``url`` with its password (if any) replaced by ***: what messages and logs may show."""
    return re.sub(r"(://[^:/@]*):[^@/]*@", r"\1:***@", url)


# -- files: SQLite and journal -----------------------------------------------------------------


def _sniff(path: Path) -> str:
    """What an existing file holds: "empty", "sqlite", "journal" or "other"."""
    with path.open("rb") as f:
        head = f.read(64 * 1024)
    if not head:
        return "empty"
    if head.startswith(_SQLITE_MAGIC):
        return "sqlite"
    first = head.split(b"\n", 1)[0]
    return "journal" if first.startswith(b"{") and b'"op_code"' in first else "other"


def _make_parents(folder: Path, what: Path) -> list[Path]:
    """Create ``folder`` and its missing parents; returns those created, outermost first."""
    missing = [p for p in (folder, *folder.parents) if not p.exists()][::-1]
    made: list[Path] = []
    for p in missing:
        try:
            p.mkdir()
        except FileExistsError:  # another worker made it meanwhile
            continue
        except OSError as exc:
            _remove_new(None, made)
            raise ConfigError(
                f"cannot create the folder {p} for {what}: {exc.strerror}; choose a writable location"
            ) from None
        made.append(p)
    return made


def _remove_new(file: Path | None, made: list[Path]) -> None:
    """Undo a failed open: the file it created, then the folders it created (innermost first).

    The file goes only while empty: a worker that started at the same time may be filling it.
    """
    if file is not None:
        with contextlib.suppress(OSError):
            if file.stat().st_size == 0:
                file.unlink()
    for p in reversed(made):
        with contextlib.suppress(OSError):
            p.rmdir()


def _check_file(path: Path, kind: str, create: bool) -> bool:
    """Refuse a folder or a file of the other kind; returns whether the file exists already."""
    if path.is_dir():
        example = path / ("study.db" if kind == "database" else "journal.log")
        raise ConfigError(f"storage {path} is a folder; name the {kind} file inside it, e.g. {example}")
    if not path.exists():
        if not create:
            raise ConfigError(f"no study {kind} at {path}; run `mergeopt search CONFIG` first")
        return False
    try:
        found = _sniff(path)
    except OSError as exc:
        raise ConfigError(f"cannot read the study {kind} {path}: {exc.strerror}; check its permissions") from None
    if found == "empty" or (kind == "database" and found == "sqlite") or (kind == "journal" and found == "journal"):
        return True
    if found == "sqlite":
        raise ConfigError(f"{path} is a SQLite database, not a journal; open it as sqlite:///{path}")
    if found == "journal":
        raise ConfigError(f"{path} is an Optuna journal, not a SQLite database; open it as journal://{path}")
    raise ConfigError(f"{path} is neither a SQLite database nor an Optuna journal; point the storage at a new file")


def _open_sqlite(
    url: str, db: Path, create: bool, heartbeat_interval: int, grace_period: int
) -> optuna.storages.BaseStorage:
    existed = _check_file(db, "database", create)
    made = _make_parents(db.parent, db) if create else []
    try:
        return _rdb(url, {"connect_args": {"timeout": 60}}, heartbeat_interval, grace_period)
    except Exception as exc:
        _remove_new(None if existed else db, made)
        reason = _first_line(getattr(exc, "orig", None) or exc)
        raise ConfigError(
            f"cannot open the SQLite database {db}: {reason}; check the path and its permissions"
        ) from None


def _open_journal(path: Path, create: bool) -> optuna.storages.BaseStorage:
    from optuna.storages.journal import JournalFileBackend, JournalStorage

    existed = _check_file(path, "journal", create)
    made = _make_parents(path.parent, path) if create else []
    try:
        # Optuna's default lock (a symlink next to the file) is the one optuna-dashboard uses too.
        return JournalStorage(JournalFileBackend(str(path)))
    except Exception as exc:
        _remove_new(None if existed else path, made)
        raise ConfigError(
            f"cannot open the journal {path}: {_first_line(exc)}; check the path and its permissions"
        ) from None


def _rdb(
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


# -- servers: PostgreSQL (and MySQL) -----------------------------------------------------------


def _open_server(url: str, heartbeat_interval: int, grace_period: int) -> optuna.storages.BaseStorage:
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
                f" use {backend}+{_PREFERRED_DRIVER[backend]}://"
            )
        if not _importable(driver):
            raise ConfigError(_missing_driver(shown, backend, driver))
    else:
        # No driver named: SQLAlchemy's default (psycopg 3 for PostgreSQL since SQLAlchemy 2.1),
        # else the one mergeopt's extra installs, whichever is there.
        choices = dict.fromkeys([u.get_dialect().driver, _PREFERRED_DRIVER[backend]])
        driver = next((d for d in choices if d in _DRIVERS and _importable(d)), "")
        if not driver:
            raise ConfigError(_missing_driver(shown, backend, _PREFERRED_DRIVER[backend]))
        u = u.set(drivername=f"{backend}+{driver}")
        url = u.render_as_string(hide_password=False)
    timeout_key = _DRIVERS[driver][2]
    connect_args = {} if timeout_key in u.query else {timeout_key: CONNECT_TIMEOUT_SECONDS}
    engine_kwargs = {"pool_pre_ping": True, "connect_args": connect_args}
    try:
        return _rdb(url, engine_kwargs, heartbeat_interval, grace_period)
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
            f"cannot reach the {backend} server at {where} ({_first_line(text)}); start it, or fix host and port"
            f" in the storage URL {shown}"
        )
    return f"cannot open storage {shown}: {type(exc).__name__}: {_first_line(text)}"


def _first_line(exc: object) -> str:
    """The first meaningful line of an error, with libpq's "connection to server ... failed: " cut."""
    text = str(exc).strip()
    line = text.splitlines()[0] if text else type(exc).__name__
    return re.sub(r'^connection to server at "[^"]*"(, port \d+)? failed: ', "", line).strip()


# -- owners of journal trials ------------------------------------------------------------------


def _proc_stat(pid: int) -> tuple[str, int] | None:
    """(state, start time in clock ticks since boot) of a process, from /proc; None where unknown."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text.rsplit(")", 1)[1].split()  # after "pid (comm)": field 3 (state) onwards
    return fields[0], int(fields[19])  # field 22: starttime


def _boot_id() -> str:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return ""


def _this_process() -> dict[str, Any]:
    stat = _proc_stat(os.getpid())
    return {
        "host": socket.gethostname(),
        "boot": _boot_id(),
        "pid": os.getpid(),
        "pid_start": stat[1] if stat else None,
    }


def mark_owner(trial: optuna.Trial, *, min_interval: float = 0.0) -> None:
    """Record in ``trial`` which process runs it, and when it last showed life.

    Call it when a trial starts, and again now and then in a long trial (after each scored task,
    say): the first call writes the user attr ``owner`` = {host, boot, pid, pid_start, started,
    beat}; a later call from the same process only moves ``beat`` on. :func:`owner_alive` reads it.
    Each call is a storage write, so a beat younger than ``min_interval`` seconds is not moved
    on: a beat only matters after :data:`STALE_SECONDS`, and short trials should not pay a write
    per task for it. On a heartbeat storage it only serves as a label.
    """
    now = time.time()
    me = _this_process()
    owner = trial.user_attrs.get(OWNER_ATTR)
    if isinstance(owner, dict) and all(owner.get(k) == v for k, v in me.items()):
        if now - float(owner.get("beat", 0.0)) < min_interval:
            return
        owner = {**owner, "beat": now}
    else:
        owner = {**me, "started": now, "beat": now}
    trial.set_user_attr(OWNER_ATTR, owner)


def owner_alive(trial: FrozenTrial, *, stale_after: float = STALE_SECONDS) -> bool:
    """Whether the process that runs ``trial`` may still be running it.

    * Owner on this machine (same host name and boot): alive while its pid exists, is not a
      zombie, and (where /proc tells) started when the owner did, so a reused pid is not taken
      for the owner.
    * Owner on another machine (or this one before a reboot): its pid means nothing here, so it
      counts as alive until its last beat is ``stale_after`` seconds old.
    * No owner recorded (a trial popped a moment ago, or run by code that does not call
      :func:`mark_owner`): alive until ``stale_after`` seconds after the trial started.
    """
    now = time.time()
    owner = trial.user_attrs.get(OWNER_ATTR)
    if not isinstance(owner, dict):
        started = trial.datetime_start.timestamp() if trial.datetime_start else now
        return now - started < stale_after
    me = _this_process()
    if owner.get("host") != me["host"] or owner.get("boot") != me["boot"]:
        return now - float(owner.get("beat", 0.0)) < stale_after
    pid = int(owner.get("pid", -1))
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # it exists, as another user
    except OSError:
        return False  # not a valid pid
    stat = _proc_stat(pid)
    if stat is None:
        return True
    state, start = stat
    return state not in ("Z", "X") and (owner.get("pid_start") is None or start == owner["pid_start"])


def fail_stale_running(
    study: optuna.Study,
    *,
    stale_after: float = STALE_SECONDS,
    max_retry: int | None = MAX_RETRY,
    provably_dead_only: bool = False,
) -> list[int]:
    """Fail the RUNNING trials whose owner is gone and re-enqueue each; returns the failed numbers.

    For a journal storage, which has no heartbeat: call it when a worker starts (before it runs
    trials). A failed trial gets the user attr ``fail_reason``; its retry is a WAITING trial with
    the same params and distributions, the same user attrs (``baseline``, ``plan``...; not
    ``owner`` nor ``fail_reason``) and the system attrs ``failed_trial`` (the first trial of the
    chain) and ``retry_history``, exactly as Optuna's RetryHeartbeatStaleTrialCallback writes them,
    so one reading of retries serves every storage. A chain is retried at most ``max_retry`` times.
    Two workers starting at once cannot both fail (and so double) the same trial: the storage lets
    only the first state change through.

    On a heartbeat storage (SQLite, PostgreSQL) this does nothing and returns []: Optuna does the
    same from the heartbeat when the worker starts its next trial. With ``provably_dead_only``
    it acts on any storage, but only on trials whose owner ran on this machine and is gone: a
    fact, where the heartbeat needs its grace period to tell, and the last live worker may
    finish before then.
    """
    storage = study._storage  # Optuna's own fail_stale_trials works on it the same way
    if not provably_dead_only and getattr(storage, "get_heartbeat_interval", lambda: None)() is not None:
        return []
    failed = []
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        if provably_dead_only and not _owner_here(t):
            continue
        if owner_alive(t, stale_after=stale_after):
            continue
        owner = t.user_attrs.get(OWNER_ATTR) or {}
        who = f"{owner.get('host', '?')} pid {owner.get('pid', '?')}"
        try:
            storage.set_trial_user_attr(t._trial_id, "fail_reason", f"its worker ({who}) stopped mid-trial")
            storage.set_trial_user_attr(t._trial_id, "fail_kind", "worker")
            if not storage.set_trial_state_values(t._trial_id, state=TrialState.FAIL):
                continue
        except optuna.exceptions.UpdateFinishedTrialError:
            continue  # finished meanwhile, or another worker failed it first
        failed.append(t.number)
        requeue(study, t, max_retry=max_retry)
    return failed


def _owner_here(trial: FrozenTrial) -> bool:
    """Whether ``trial``'s owner ran on this machine since its last boot (its pid means something)."""
    owner = trial.user_attrs.get(OWNER_ATTR)
    me = _this_process()
    return isinstance(owner, dict) and owner.get("host") == me["host"] and owner.get("boot") == me["boot"]


def requeue(study: optuna.Study, trial: FrozenTrial, *, max_retry: int | None = MAX_RETRY) -> bool:
    """Enqueue a retry of ``trial`` (failed by a dead or interrupted worker); False once retries are spent.

    The retry is a WAITING trial with the same params and distributions, the same user attrs
    (``baseline``, ``plan``...; not ``owner`` nor ``fail_reason``) and the system attrs
    ``failed_trial`` (the first trial of the chain) and ``retry_history``, exactly as Optuna's
    RetryHeartbeatStaleTrialCallback writes them, so one reading of retries serves every storage.
    """
    history = [*trial.system_attrs.get("retry_history", []), trial.number]
    if max_retry is not None and len(history) > max_retry:
        return False
    study.add_trial(
        optuna.trial.create_trial(
            state=TrialState.WAITING,
            params=trial.params,
            distributions=trial.distributions,
            user_attrs={k: v for k, v in trial.user_attrs.items() if k not in (OWNER_ATTR, "fail_reason", "fail_kind")},
            system_attrs={
                **trial.system_attrs,
                "failed_trial": trial.system_attrs.get("failed_trial", trial.number),
                "retry_history": history,
            },
        )
    )
    return True


def recover_stale(study: optuna.Study) -> None:
    """Fail and retry the RUNNING trials of dead workers, on any storage; cheap enough to call often.

    A heartbeat storage (SQLite, PostgreSQL) asks Optuna's heartbeat (a trial silent for the grace
    period is dead); a journal asks :func:`fail_stale_running` (is the owner process alive?).
    Optuna does the former itself before each trial; a worker waiting for others' last trials
    calls this so that a dead worker's trial is retried instead of waited for forever.
    """
    if getattr(study._storage, "get_heartbeat_interval", lambda: None)() is not None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            optuna.storages.fail_stale_trials(study)
        fail_stale_running(study, provably_dead_only=True)  # a dead pid here needs no grace period
    else:
        fail_stale_running(study)
