"""Optuna storages by URL, with crash recovery switched on.

An RDB storage (SQLite, PostgreSQL) gets a heartbeat: a trial whose process died (SIGKILL, power
loss) stops beating, is marked FAIL once the grace period passes, and is re-enqueued with the
same parameters and labels by Optuna's own retry callback, so a killed search loses nothing.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import optuna

from optimizer.errors import ConfigError

__all__ = ["HEARTBEAT_SECONDS", "make_storage"]

HEARTBEAT_SECONDS = 5
GRACE_SECONDS = 20


def sqlite_path(url: str) -> Path | None:
    """The database file of a ``sqlite:///`` URL, else None."""
    prefix = "sqlite:///"
    return Path(url[len(prefix) :]) if url.startswith(prefix) else None


def make_storage(url: str, *, create: bool = True) -> optuna.storages.BaseStorage:
    """Open (and with ``create``, make the folder for) the storage at ``url``."""
    db = sqlite_path(url)
    if db is not None:
        if not create and not db.is_file():
            raise ConfigError(f"no study database at {db}; run `mergeopt search CONFIG` first")
        db.parent.mkdir(parents=True, exist_ok=True)
    elif not url.startswith(("postgresql", "mysql")):
        raise ConfigError(f"storage URL {url!r} is not supported; use sqlite:///PATH or postgresql://...")
    try:
        with warnings.catch_warnings():
            # Heartbeats have been "experimental" since Optuna 2.8; they are what we rely on.
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            return optuna.storages.RDBStorage(
                url,
                engine_kwargs={"connect_args": {"timeout": 60}} if db is not None else {},
                heartbeat_interval=HEARTBEAT_SECONDS,
                grace_period=GRACE_SECONDS,
                heartbeat_stale_trial_callback=optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=3),
            )
    except Exception as exc:  # sqlalchemy raises many kinds for an unreachable server
        raise ConfigError(f"cannot open storage {url!r}: {type(exc).__name__}: {exc}".splitlines()[0]) from None
