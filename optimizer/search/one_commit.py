"""Write a candidate's parameters (and its plan) to the study's storage in one write.

Optuna stores each ``suggest_*`` at once, in a write of its own: on SQLite every parameter is a
commit (a journal write and an fsync), on a journal file an append under the file lock and an
fsync. A per-layer search suggests dozens of parameters per candidate, and those writes were
about half of the study loop's own cost (``benchmarks/trial_overhead.py``, ``bookkeeping``).
Nothing reads a candidate's parameters from the storage before the candidate is complete — the
trial object keeps its own copy, and samplers in other workers see a running trial only through
the constant liar — so :func:`one_commit` holds the writes of one candidate's suggestions and
stores them together when the block ends:

* an RDB storage (SQLite, PostgreSQL, MySQL) behind Optuna's cache: one transaction, through
  Optuna's own row writers;
* a journal storage: one append of the log entries Optuna would have appended one by one,
  checked first as Optuna's replay would check them.

Any other storage (a test double, a custom backend), or an Optuna whose internals this module
does not recognise, is written call by call as before: slower, never wrong.
"""

from __future__ import annotations

import contextlib
import inspect
import threading
from collections.abc import Iterator
from typing import Any

import optuna
from optuna.distributions import BaseDistribution, check_distribution_compatibility, distribution_to_json

try:  # Optuna's internals, pinned to the 5.x series; without them, writes are not batched
    from optuna.storages import RDBStorage
    from optuna.storages._cached_storage import _CachedStorage
    from optuna.storages._rdb import models
    from optuna.storages._rdb.storage import _create_scoped_session
    from optuna.storages.journal import JournalStorage
    from optuna.storages.journal._storage import JournalOperation

    _IMPORTED = True
except ImportError:  # pragma: no cover - a future Optuna
    _IMPORTED = False

#: The private methods this module calls, with the parameters it passes (Optuna 5.0).
_ROW_WRITERS = {
    "_set_trial_param_without_commit": (
        "self",
        "session",
        "trial_id",
        "param_name",
        "param_value_internal",
        "distribution",
        "previous_distribution",
    ),
    "_set_trial_attr_without_commit": ("self", "session", "model_cls", "trial_id", "key", "value"),
}
#: The private attributes it reads on a storage instance.
_RDB_ATTRS = ("_backend", "_lock", "_studies", "_trial_id_to_study_id_and_number")
_JOURNAL_ATTRS = ("_backend", "_thread_lock", "_replay_result", "_sync_with_backend")


def _internals_known() -> bool:
    """Whether Optuna's internals still have the shape this module was written against."""
    if not _IMPORTED:
        return False
    try:
        return all(
            tuple(inspect.signature(getattr(RDBStorage, name)).parameters) == expected
            for name, expected in _ROW_WRITERS.items()
        )
    except (AttributeError, TypeError, ValueError):  # pragma: no cover - a future Optuna
        return False


_INTERNALS = _internals_known()

__all__ = ["one_commit"]

_Param = tuple[int, str, float, BaseDistribution]
_Attr = tuple[int, str, Any]


@contextlib.contextmanager
def one_commit(study: optuna.Study) -> Iterator[None]:
    """Within the block, parameters and user attrs set from this thread are stored together.

    Meant for one trial's suggestions. They are written when the block ends without an
    exception, in one write; if the block raises, nothing it set is written (the trial fails, and
    a half-written candidate would only mislead), and if the write itself is refused (an
    incompatible distribution, a trial another worker has finished) nothing of it is stored.
    Writes from other threads (a progress display, Optuna's heartbeat) pass straight through.
    A block inside another on the same storage changes nothing: the outer block holds its writes.
    """
    storage = study._storage
    if not _batchable(storage) or _shadowed(storage):
        yield
        return
    owner = threading.get_ident()
    params: list[_Param] = []
    attrs: list[_Attr] = []
    set_param, set_attr = storage.set_trial_param, storage.set_trial_user_attr

    def held_param(trial_id: int, param_name: str, param_value_internal: float, distribution: BaseDistribution) -> None:
        if threading.get_ident() != owner:
            return set_param(trial_id, param_name, param_value_internal, distribution)
        params.append((trial_id, param_name, param_value_internal, distribution))

    def held_attr(trial_id: int, key: str, value: Any) -> None:
        if threading.get_ident() != owner:
            return set_attr(trial_id, key, value)
        attrs.append((trial_id, key, value))

    storage.set_trial_param = held_param  # type: ignore[method-assign]
    storage.set_trial_user_attr = held_attr  # type: ignore[method-assign]
    try:
        yield
    finally:
        for name, ours in (("set_trial_param", held_param), ("set_trial_user_attr", held_attr)):
            if vars(storage).get(name) is ours:  # still ours: the class's method shows through again
                delattr(storage, name)
    if not (params or attrs):
        return
    if isinstance(storage, JournalStorage):
        _append_journal(storage, study._study_id, params, attrs)
    else:
        _write_rdb(storage, params, attrs)


def _batchable(storage: object) -> bool:
    if not _INTERNALS:
        return False
    if isinstance(storage, JournalStorage):
        replay = getattr(storage, "_replay_result", None)
        return all(hasattr(storage, a) for a in _JOURNAL_ATTRS) and all(
            hasattr(replay, a) for a in ("worker_id", "log_number_read")
        )
    return (
        isinstance(storage, _CachedStorage)
        and all(hasattr(storage, a) for a in _RDB_ATTRS)
        and isinstance(storage._backend, RDBStorage)
    )


def _shadowed(storage: object) -> bool:
    return "set_trial_param" in vars(storage) or "set_trial_user_attr" in vars(storage)


def _write_rdb(storage: _CachedStorage, params: list[_Param], attrs: list[_Attr]) -> None:
    """One transaction doing what the cache's per-call methods do; any refusal rolls it all back."""
    backend: RDBStorage = storage._backend
    known: dict[str, tuple[int, BaseDistribution | None, BaseDistribution]] = {}
    for trial_id, name, _value, distribution in params:
        # Like the cache: the study's first distribution of a name is the one the new must match.
        study_id, _number = storage._trial_id_to_study_id_and_number[trial_id]
        known[name] = (study_id, storage._studies[study_id].param_distribution.get(name), distribution)
    # No autoflush: each row writer's lookup query would otherwise send the rows added before it
    # one INSERT at a time; at commit they go out together.
    with _create_scoped_session(backend.scoped_session) as session, session.no_autoflush:
        for trial_id, name, value, distribution in params:
            backend._set_trial_param_without_commit(session, trial_id, name, value, distribution, known[name][1])
        for trial_id, key, value in attrs:
            backend._set_trial_attr_without_commit(session, models.TrialUserAttributeModel, trial_id, key, value)
    with storage._lock:
        for name, (study_id, previous, distribution) in known.items():
            if previous is None:
                storage._studies[study_id].param_distribution.setdefault(name, distribution)


def _append_journal(storage: JournalStorage, study_id: int, params: list[_Param], attrs: list[_Attr]) -> None:
    """The entries ``set_trial_param`` / ``set_trial_user_attr`` append, appended in one go.

    Optuna checks a journal entry only when it replays it, and stops a replay at this worker's
    first refused entry, leaving the rest of a batch to fail later, unrelated reads one by one.
    So the batch is checked here first, against the log as replayed just now, as the replay
    would check it (the trial still running, each distribution compatible with the study's).
    """
    for trial_id in {p[0] for p in params} | {a[0] for a in attrs}:
        trial = storage.get_trial(trial_id)  # syncs with the file
        if trial.state.is_finished():
            raise optuna.exceptions.UpdateFinishedTrialError(
                f"trial #{trial.number} has already finished and cannot be updated"
            )
    # Each name's first stored distribution, found by scanning trials only until every name of
    # the batch is found (in a running study, usually in the first trial): not a pass over all.
    wanted = {name for _trial_id, name, _value, _dist in params}
    seen: dict[str, BaseDistribution] = {}
    for trial in storage.get_all_trials(study_id, deepcopy=False) if wanted else ():
        for name in wanted & trial.distributions.keys():
            seen[name] = trial.distributions[name]
        wanted -= seen.keys()
        if not wanted:
            break
    for _trial_id, name, _value, distribution in params:
        if name in seen:
            check_distribution_compatibility(seen[name], distribution)
        seen.setdefault(name, distribution)
    with storage._thread_lock:
        worker = storage._replay_result.worker_id
        logs: list[dict[str, Any]] = [
            {
                "op_code": JournalOperation.SET_TRIAL_PARAM,
                "worker_id": worker,
                "trial_id": trial_id,
                "param_name": name,
                "param_value_internal": value,
                "distribution": distribution_to_json(distribution),
            }
            for trial_id, name, value, distribution in params
        ]
        logs += [
            {"op_code": JournalOperation.SET_TRIAL_USER_ATTR, "worker_id": worker, "trial_id": t, "user_attr": {k: v}}
            for t, k, v in attrs
        ]
        storage._backend.append_logs(logs)
        # Another worker may still finish the trial between the check and the append: replay to
        # the end of the log whatever its entries raise, and raise the first error, once.
        first: Exception | None = None
        while True:
            read = storage._replay_result.log_number_read
            try:
                storage._sync_with_backend()
                break
            except Exception as exc:  # re-raised below, once the replay has reached the end
                if storage._replay_result.log_number_read == read:  # not a refused entry: the file
                    raise
                first = first or exc
    if first is not None:
        raise first
