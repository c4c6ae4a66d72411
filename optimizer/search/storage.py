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

A journal has no heartbeat: :mod:`optimizer.search.owners` recovers a killed worker's trials
there, from the owner each trial records.

Every mistake in a URL (unknown scheme, unreachable server, wrong password, missing database or
driver, a file of the wrong kind) raises :class:`ConfigError` with one line naming the fix, and a
storage that could not be opened leaves no file or folder behind.
"""

from __future__ import annotations

import contextlib
import re
from pathlib import Path

import optuna

from optimizer.errors import ConfigError
from optimizer.search._rdb import PREFERRED_DRIVER, display_url, first_line, open_server, rdb_storage

__all__ = [
    "GRACE_SECONDS",
    "HEARTBEAT_SECONDS",
    "display_url",
    "journal_path",
    "make_storage",
    "sqlite_path",
    "study_url",
]

HEARTBEAT_SECONDS = 5
GRACE_SECONDS = 20

_JOURNAL_SUFFIXES = (".log", ".journal")
_SQLITE_SUFFIXES = (".db", ".sqlite", ".sqlite3")
_SQLITE_MAGIC = b"SQLite format 3\x00"
_KINDS_HELP = (
    "use sqlite:///PATH.db (one process), journal:///ABS/PATH.log (several processes on one machine)"
    " or postgresql://USER:PASSWORD@HOST:PORT/DB (several machines)"
)


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
    if backend in PREFERRED_DRIVER:
        return open_server(url, heartbeat_interval, grace_period)
    raise ConfigError(f"storage URL {display_url(url)!r} has an unknown scheme {scheme!r}; {_KINDS_HELP}")


def study_url(study: str) -> str:
    """The storage URL of what users naturally type for a study: a folder, a .db or .log file, or a URL."""
    if "://" in study:
        return study
    path = Path(study)
    if path.suffix in _JOURNAL_SUFFIXES and path.is_file():
        return f"journal://{path.resolve()}"
    if path.is_dir():
        path = path / "study.db"
    if not path.is_file():
        raise ConfigError(f"no study at {study!r}; give the study folder (e.g. studies/demo) or a storage URL")
    return f"sqlite:///{path.resolve()}"


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
        return rdb_storage(url, {"connect_args": {"timeout": 60}}, heartbeat_interval, grace_period)
    except Exception as exc:
        _remove_new(None if existed else db, made)
        reason = first_line(getattr(exc, "orig", None) or exc)
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
            f"cannot open the journal {path}: {first_line(exc)}; check the path and its permissions"
        ) from None
