"""Every use of Optuna's private internals, behind one fence.

mergeopt speeds up Optuna's study loop in three places, each measured in
``benchmarks/trial_overhead.py`` (``benchmarks/README.md`` has the rows):

* :func:`trials_snapshot` — one read of the study per candidate instead of one per parameter;
* :func:`split_once` — TPE's split of the trials once per candidate instead of once per parameter;
* :func:`one_commit` — a candidate's parameters and plan stored in one RDB transaction instead of
  one commit each.

Each reaches into something Optuna does not promise to keep (a private module function, a
storage's private attributes and row writers). So every such name is read here and nowhere else,
against one tested range of Optuna (:data:`TESTED_MAJOR`): where Optuna is outside it, or a name
has another shape, that fast path switches itself off, one warning names what was switched off and
why (logged once per process), and the study runs call by call as Optuna would — slower, never
different. :func:`disabled` lists what is off; the test suite fails if anything is, so an Optuna
upgrade is caught by CI rather than by a slow overnight study.

The module also holds the two private handles the study loop needs for bookkeeping
(:func:`storage_of`, :func:`trial_id`) and the exact hypervolume (:func:`compute_hypervolume`,
Optuna's where it has the expected shape, else our own). It is one module, past the usual size,
on purpose: the fence is only a fence if every private name sits behind the one version check.
"""

from __future__ import annotations

import contextlib
import copy
import inspect
import logging
import threading
from collections.abc import Callable, Container, Iterator
from typing import Any

import numpy as np
import optuna
from optuna.distributions import BaseDistribution
from optuna.trial import FrozenTrial, TrialState

__all__ = [
    "TESTED_MAJOR",
    "compute_hypervolume",
    "disabled",
    "one_commit",
    "split_once",
    "storage_of",
    "trial_id",
    "trials_snapshot",
]

#: The Optuna major version these fast paths were written and tested against.
TESTED_MAJOR = 5

_log = logging.getLogger("mergeopt")
_disabled: dict[str, str] = {}  # fast path → why it is off
_warned: set[str] = set()
_lock = threading.Lock()


def _switch_off(path: str, reason: str) -> None:
    """Record that ``path`` is off; the first time in this process, say so once."""
    with _lock:
        _disabled.setdefault(path, reason)
        if path in _warned:
            return
        _warned.add(path)
    _log.warning(
        "mergeopt: Optuna %s: the %s fast path is off (%s); studies run slower, never differently",
        optuna.__version__,
        path,
        reason,
    )


def disabled() -> dict[str, str]:
    """Fast path → the reason it switched itself off, for every fast path that did so far."""
    with _lock:
        return dict(_disabled)


def _major_ok() -> bool:
    try:
        return int(optuna.__version__.split(".", 1)[0]) == TESTED_MAJOR
    except ValueError:  # pragma: no cover - an unusual version string
        return False


def _params(fn: object) -> tuple[str, ...] | None:
    try:
        return tuple(inspect.signature(fn).parameters)  # type: ignore[arg-type]  # any callable
    except (TypeError, ValueError):  # pragma: no cover - a future Optuna
        return None


# -- private handles ------------------------------------------------------------------------------


def storage_of(study: optuna.Study) -> optuna.storages.BaseStorage:
    """The study's storage; Optuna's own ``fail_stale_trials`` reads the same attribute."""
    return study._storage


def trial_id(trial: FrozenTrial) -> int:
    """The storage's id of a trial (what storage methods take; Optuna keeps it private)."""
    return trial._trial_id


# -- one read of the study per candidate ----------------------------------------------------------
#
# TPE samples parameters one at a time (its default, independent mode) and asks the storage for all
# trials at every suggest_* call; with the constant liar it uses by default, Optuna's trial cache is
# bypassed, so every call is a fresh database read. Within one candidate's suggestions nothing the
# sampler looks at changes, except what other workers write in those milliseconds, which a sampler
# never sees consistently anyway.

_GET_ALL_TRIALS = ("self", "study_id", "deepcopy", "states")


def _snapshot_ok() -> bool:
    if "snapshot" in _disabled:
        return False
    if not _major_ok():
        _switch_off("snapshot", f"tested with Optuna {TESTED_MAJOR}.x")
        return False
    if _params(optuna.storages.BaseStorage.get_all_trials) != _GET_ALL_TRIALS:
        _switch_off("snapshot", "BaseStorage.get_all_trials has another signature")
        return False
    return True


@contextlib.contextmanager
def trials_snapshot(study: optuna.Study) -> Iterator[None]:
    """Within the block, ``study``'s storage answers ``get_all_trials`` from one read.

    The read is taken lazily (a candidate that suggests nothing reads nothing) and dropped when the
    block ends; other threads (Optuna's heartbeat, a progress display) keep reading the database.
    Blocks on one storage nest, but must not interleave across threads (the study loop opens them
    from one thread).
    """
    if not _snapshot_ok():
        yield
        return
    storage = storage_of(study)
    read = storage.get_all_trials  # the storage's own method (or whoever wraps it already)
    shadowed = "get_all_trials" in vars(storage)
    taken: dict[int, list[FrozenTrial]] = {}
    owner = threading.get_ident()

    def get_all_trials(
        study_id: int, deepcopy: bool = True, states: Container[TrialState] | None = None
    ) -> list[FrozenTrial]:
        if threading.get_ident() != owner:
            return read(study_id, deepcopy=deepcopy, states=states)
        if study_id not in taken:
            taken[study_id] = read(study_id, deepcopy=False)
        trials = taken[study_id]
        if states is not None:
            trials = [t for t in trials if t.state in states]
        return copy.deepcopy(trials) if deepcopy else list(trials)

    storage.get_all_trials = get_all_trials  # type: ignore[method-assign]  # undone when the block ends
    try:
        yield
    finally:
        if vars(storage).get("get_all_trials") is get_all_trials:  # still ours: put back what was there
            if shadowed:
                storage.get_all_trials = read  # type: ignore[method-assign]  # the wrapper that was there
            else:
                del storage.get_all_trials  # the class's method shows through again


# -- TPE's split of the trials once per candidate -------------------------------------------------
#
# For each parameter TPE first splits every finished trial into "below" (the good ones) and "above":
# for several objectives a non-dominated sort with a hypervolume tie-break, over the whole study.
# Within one candidate's suggestions that split is the same every time (the trials do not change,
# and it draws no random numbers), so it is memoized per candidate; the draws are unchanged (tested).

_SPLIT = ("study", "trials", "n_below")
_Split = tuple[list[FrozenTrial], list[FrozenTrial]]
_active = threading.local()  # .memo: the current block's splits, absent outside a block
_split_installed = False


def _install_split() -> bool:
    """Put a memoizing wrapper in place of Optuna's split (once per process); False if it cannot."""
    global _split_installed
    with _lock:
        if _split_installed:
            return True
        if "split_once" in _disabled:
            return False
        tpe, split, reason = _tpe_split()
        if split is not None:
            tpe._split_trials = _memoized(split)  # wraps Optuna's function; same results
            _split_installed = True
            return True
    _switch_off("split_once", reason)
    return False


def _tpe_split() -> tuple[Any, Callable[..., _Split] | None, str]:
    """(TPE's sampler module, its split function, "") or (…, None, why it cannot be used)."""
    try:
        from optuna.samplers._tpe import sampler as tpe
    except ImportError:  # pragma: no cover - a future Optuna
        return None, None, "optuna.samplers._tpe.sampler is gone"
    split = getattr(tpe, "_split_trials", None)
    if not _major_ok():
        return tpe, None, f"tested with Optuna {TESTED_MAJOR}.x"
    if split is None or _params(split) != _SPLIT:
        return tpe, None, "TPE's _split_trials is gone or has another signature"
    return tpe, split, ""


def _memoized(split: Callable[..., _Split]) -> Callable[..., _Split]:
    def memoized(study: Any, trials: list[FrozenTrial], n_below: int) -> _Split:
        memo: dict[tuple, _Split] | None = getattr(_active, "memo", None)
        if memo is None:
            return split(study, trials, n_below)
        # The split depends on the trials' values, constraints and intermediate values, all fixed
        # once a trial has finished, and on which trials are still running, whose parameters only
        # ever grow: number, state and parameter count identify a trial, even without a snapshot.
        key = (id(study), n_below, tuple((t.number, t.state, len(t.params)) for t in trials))
        found = memo.get(key)
        if found is None:
            found = memo[key] = split(study, trials, n_below)
        below, above = found
        return list(below), list(above)  # fresh lists: a caller may reorder its own

    return memoized


@contextlib.contextmanager
def split_once() -> Iterator[None]:
    """Within the block, this thread's TPE computes each distinct split of the trials once.

    Meant around one candidate's suggestions; the memo is dropped when the block ends, so the next
    candidate sees the study as it is then. Blocks nest (the inner one has its own memo).
    """
    if not _install_split():
        yield
        return
    outer = getattr(_active, "memo", None)
    _active.memo = {}
    try:
        yield
    finally:
        if outer is None:
            del _active.memo
        else:
            _active.memo = outer


# -- one RDB transaction per candidate ------------------------------------------------------------
#
# Optuna stores each suggest_* at once, a commit each (on SQLite a journal write and an fsync). A
# per-layer search suggests dozens of parameters per candidate, and those commits were about half of
# the loop's own cost. Nothing reads a candidate's parameters from the storage before it completes,
# so the writes of one candidate's suggestions are held and stored together. Journal storages are
# written call by call: batching them meant writing Optuna's log entries by hand, and an entry
# format change would corrupt a study every worker and optuna-dashboard replays.

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
_CACHE_ATTRS = ("_backend", "_lock", "_studies", "_trial_id_to_study_id_and_number")
_Param = tuple[int, str, float, BaseDistribution]
_Attr = tuple[int, str, Any]


def _rdb_internals() -> tuple[Any, Any, Any, Any] | None:
    """(RDBStorage, _CachedStorage, the rdb models module, _create_scoped_session), or None if off."""
    if "one_commit" in _disabled:
        return None
    try:
        from optuna.storages import RDBStorage
        from optuna.storages._cached_storage import _CachedStorage
        from optuna.storages._rdb import models
        from optuna.storages._rdb.storage import _create_scoped_session
    except ImportError:  # pragma: no cover - a future Optuna
        _switch_off("one_commit", "Optuna's RDB storage modules moved")
        return None
    if not _major_ok():
        _switch_off("one_commit", f"tested with Optuna {TESTED_MAJOR}.x")
        return None
    for name, expected in _ROW_WRITERS.items():
        if _params(getattr(RDBStorage, name, None)) != expected:
            _switch_off("one_commit", f"RDBStorage.{name} is gone or has another signature")
            return None
    return RDBStorage, _CachedStorage, models, _create_scoped_session


def _batchable(storage: object) -> tuple[Any, Any, Any, Any] | None:
    """The internals to batch ``storage``'s writes with, or None: write call by call."""
    if "set_trial_param" in vars(storage) or "set_trial_user_attr" in vars(storage):
        return None  # an outer block (or a test double) holds the writes already
    internals = _rdb_internals()
    if internals is None:
        return None
    rdb, cached, _, _ = internals
    if not isinstance(storage, cached):
        return None  # a journal, or a custom storage: nothing to batch, not a disabled path
    if not all(hasattr(storage, a) for a in _CACHE_ATTRS) or not isinstance(storage._backend, rdb):
        _switch_off("one_commit", "Optuna's cached storage has other private attributes")
        return None
    return internals


@contextlib.contextmanager
def one_commit(study: optuna.Study) -> Iterator[None]:
    """Within the block, parameters and user attrs set from this thread are stored together.

    Meant for one trial's suggestions on an RDB storage (SQLite, PostgreSQL). They are written when
    the block ends without an exception, in one transaction; if the block raises, nothing it set is
    written (the trial fails, and a half-written candidate would only mislead), and if the write
    itself is refused (an incompatible distribution, a trial another worker has finished) nothing
    of it is stored. Writes from other threads (a progress display, Optuna's heartbeat) pass
    straight through. Other storages, and a block inside another, write call by call.
    """
    storage = storage_of(study)
    internals = _batchable(storage)
    if internals is None:
        yield
        return
    owner = threading.get_ident()
    params: list[_Param] = []
    attrs: list[_Attr] = []
    set_param, set_attr = storage.set_trial_param, storage.set_trial_user_attr

    def held_param(tid: int, param_name: str, param_value_internal: float, distribution: BaseDistribution) -> None:
        if threading.get_ident() != owner:
            return set_param(tid, param_name, param_value_internal, distribution)
        params.append((tid, param_name, param_value_internal, distribution))

    def held_attr(tid: int, key: str, value: Any) -> None:
        if threading.get_ident() != owner:
            return set_attr(tid, key, value)
        attrs.append((tid, key, value))

    # Instance attributes shadow the storage's methods until the block ends (no ``self``: bound).
    storage.set_trial_param = held_param  # type: ignore[method-assign,assignment]
    storage.set_trial_user_attr = held_attr  # type: ignore[method-assign,assignment]
    try:
        yield
    finally:
        for name, ours in (("set_trial_param", held_param), ("set_trial_user_attr", held_attr)):
            if vars(storage).get(name) is ours:  # still ours: the class's method shows through again
                delattr(storage, name)
    if params or attrs:
        _write_rdb(storage, internals, params, attrs)


def _write_rdb(storage: Any, internals: tuple[Any, Any, Any, Any], params: list[_Param], attrs: list[_Attr]) -> None:
    """One transaction doing what the cache's per-call methods do; any refusal rolls it all back."""
    _, _, models, scoped_session = internals
    backend = storage._backend
    known: dict[str, tuple[int, BaseDistribution | None, BaseDistribution]] = {}
    for tid, name, _value, distribution in params:
        # Like the cache: the study's first distribution of a name is the one the new must match.
        study_id, _number = storage._trial_id_to_study_id_and_number[tid]
        known[name] = (study_id, storage._studies[study_id].param_distribution.get(name), distribution)
    # No autoflush: each row writer's lookup query would otherwise send the rows added before it
    # one INSERT at a time; at commit they go out together.
    with scoped_session(backend.scoped_session) as session, session.no_autoflush:
        for tid, name, value, distribution in params:
            backend._set_trial_param_without_commit(session, tid, name, value, distribution, known[name][1])
        for tid, key, value in attrs:
            backend._set_trial_attr_without_commit(session, models.TrialUserAttributeModel, tid, key, value)
    with storage._lock:
        for name, (study_id, previous, distribution) in known.items():
            if previous is None:
                storage._studies[study_id].param_distribution.setdefault(name, distribution)


# -- hypervolume ----------------------------------------------------------------------------------


def _own_hypervolume(points: np.ndarray, reference: np.ndarray) -> float:
    """Exact hypervolume dominated by ``points`` (minimization) up to ``reference``, by slicing.

    The points are swept along the last objective; each slab between consecutive values is the
    (d − 1)-dimensional volume of the points seen so far times the slab's depth. Polynomial for a
    fixed dimension, ample for the fronts of a study (tens of points, a handful of objectives).
    """
    pts = points[np.all(points < reference, axis=1)]
    if len(pts) == 0:
        return 0.0
    if pts.shape[1] == 1:
        return float(reference[0] - pts[:, 0].min())
    order = np.argsort(pts[:, -1], kind="stable")
    pts = pts[order]
    volume = 0.0
    for i in range(len(pts)):
        top = pts[i + 1, -1] if i + 1 < len(pts) else reference[-1]
        depth = top - pts[i, -1]
        if depth > 0:
            volume += depth * _own_hypervolume(pts[: i + 1, :-1], reference[:-1])
    return float(volume)


def compute_hypervolume(points: np.ndarray, reference: np.ndarray, *, assume_pareto: bool = False) -> float:
    """Optuna's exact (WFG) hypervolume where it has the expected shape, else :func:`_own_hypervolume`."""
    fn: Callable[..., float] | None = None
    if "hypervolume" not in _disabled:
        try:
            from optuna._hypervolume import compute_hypervolume as fn
        except ImportError:  # pragma: no cover - a future Optuna
            _switch_off("hypervolume", "optuna._hypervolume is gone")
        if fn is not None and _params(fn) != ("loss_vals", "reference_point", "assume_pareto"):
            _switch_off("hypervolume", "optuna._hypervolume.compute_hypervolume has another signature")
            fn = None
    if fn is None:
        return _own_hypervolume(np.asarray(points, dtype=float), np.asarray(reference, dtype=float))
    return float(fn(points, reference, assume_pareto=assume_pareto))
