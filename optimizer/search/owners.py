"""Who runs a trial, and what happens to the trials of a worker that died.

An RDB storage (SQLite, PostgreSQL) has Optuna's heartbeat: a trial whose process died stops
beating, is failed once the grace period passes, and is re-enqueued by Optuna's own retry
callback. A journal has no heartbeat. Instead each trial records its owner (:func:`mark_owner`:
host, pid, process start, a beat time) and every worker, when it starts, calls
:func:`fail_stale_running`: RUNNING trials whose owner is gone (:func:`owner_alive`) become FAIL
and are re-enqueued the way Optuna's retry callback does it, so both kinds of storage recover a
killed worker the same way, and ``mergeopt status`` can name the workers a study has seen.
"""

from __future__ import annotations

import os
import socket
import time
import warnings
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState

from optimizer.search import attrs
from optimizer.search._optuna import storage_of, trial_id

__all__ = [
    "MAX_RETRY",
    "STALE_SECONDS",
    "UNOWNED_SECONDS",
    "fail_stale_running",
    "mark_owner",
    "owner_alive",
    "recover_stale",
    "requeue",
    "this_process",
]

#: How often a trial whose worker died is re-run before it is left as FAIL (per storage kind alike).
MAX_RETRY = 3
#: A journal trial owned by a process on another machine counts as dead after this long without a beat.
STALE_SECONDS = 1800.0
#: A RUNNING trial with no owner recorded counts as dead after this long. A live worker writes the
#: owner the moment it takes a trial (the first thing its objective does), so only a worker killed
#: in that moment leaves one; the heartbeat does not cover it either (killed before its first beat),
#: and a resumed search would otherwise wait for it for STALE_SECONDS.
UNOWNED_SECONDS = 120.0


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


def this_process() -> dict[str, Any]:
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
    me = this_process()
    owner = trial.user_attrs.get(attrs.OWNER)
    if isinstance(owner, dict) and all(owner.get(k) == v for k, v in me.items()):
        if now - float(owner.get("beat", 0.0)) < min_interval:
            return
        owner = {**owner, "beat": now}
    else:
        owner = {**me, "started": now, "beat": now}
    trial.set_user_attr(attrs.OWNER, owner)


def owner_alive(trial: FrozenTrial, *, stale_after: float = STALE_SECONDS) -> bool:
    """Whether the process that runs ``trial`` may still be running it.

    * Owner on this machine (same host name and boot): alive while its pid exists, is not a
      zombie, and (where /proc tells) started when the owner did, so a reused pid is not taken
      for the owner.
    * Owner on another machine (or this one before a reboot): its pid means nothing here, so it
      counts as alive until its last beat is ``stale_after`` seconds old.
    * No owner recorded (a trial popped a moment ago): alive until :data:`UNOWNED_SECONDS` (or
      ``stale_after``, if shorter) after the trial started.
    """
    now = time.time()
    owner = trial.user_attrs.get(attrs.OWNER)
    if not isinstance(owner, dict):
        started = trial.datetime_start.timestamp() if trial.datetime_start else now
        return now - started < min(stale_after, UNOWNED_SECONDS)
    me = this_process()
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
    finish before then; and on trials that never got an owner (:data:`UNOWNED_SECONDS`), which
    no heartbeat covers.
    """
    storage = storage_of(study)
    if not provably_dead_only and getattr(storage, "get_heartbeat_interval", lambda: None)() is not None:
        return []
    failed = []
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        if provably_dead_only and not (_owner_here(t) or t.user_attrs.get(attrs.OWNER) is None):
            continue
        if owner_alive(t, stale_after=stale_after):
            continue
        owner = t.user_attrs.get(attrs.OWNER) or {}
        who = f"{owner.get('host', '?')} pid {owner.get('pid', '?')}"
        try:
            storage.set_trial_user_attr(trial_id(t), attrs.FAIL_REASON, f"its worker ({who}) stopped mid-trial")
            storage.set_trial_user_attr(trial_id(t), attrs.FAIL_KIND, "worker")
            if not storage.set_trial_state_values(trial_id(t), state=TrialState.FAIL):
                continue
        except optuna.exceptions.UpdateFinishedTrialError:
            continue  # finished meanwhile, or another worker failed it first
        failed.append(t.number)
        requeue(study, t, max_retry=max_retry)
    return failed


def _owner_here(trial: FrozenTrial) -> bool:
    """Whether ``trial``'s owner ran on this machine since its last boot (its pid means something)."""
    owner = trial.user_attrs.get(attrs.OWNER)
    me = this_process()
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
            user_attrs={
                k: v for k, v in trial.user_attrs.items() if k not in (attrs.OWNER, attrs.FAIL_REASON, attrs.FAIL_KIND)
            },
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
    if getattr(storage_of(study), "get_heartbeat_interval", lambda: None)() is not None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            optuna.storages.fail_stale_trials(study)
        fail_stale_running(study, provably_dead_only=True)  # a dead pid here needs no grace period
    else:
        fail_stale_running(study)
