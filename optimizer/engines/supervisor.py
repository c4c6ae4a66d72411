"""Keeps a worker's engine usable: started on first use, restarted after repeated engine failures.

A failed trial is the fault of one of three things, and only one of them is the engine:

* the candidate: its merged weights or its scores are NaN/Inf (``FloatingPointError``), or a
  coefficient does not fit the weights' dtype (torch's "... without overflow");
* memory: the candidate or a batch did not fit (``torch.OutOfMemoryError``, ``MemoryError``);
* the engine: anything else raised while merging or scoring (a dead vLLM engine core, a CUDA
  error, a broken worker process).

One engine failure may still be the candidate's doing, so the supervisor only acts when they
repeat: after ``restart_after`` engine failures in a row it closes the engine and starts a new one
(between trials, never inside one). A restart that fails raises :class:`EngineRestartFailed`, a
:class:`MergeoptError`: the worker stops with one line, and since no trial is running at that
moment the study is left consistent.

The supervisor is itself an :class:`~optimizer.engines.base.Engine` that stands in for the one it
runs, so tasks, held-out scoring and golden data go through it and never hold an engine that a
restart has replaced; and since it starts the engine on first use, a command that finds everything
cached never pays for a start.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Literal

from optimizer.engines.base import Engine
from optimizer.errors import MergeoptError

if TYPE_CHECKING:
    from optimizer.checkpoints import ModelSet
    from optimizer.engines.base import GenerateBatch, LogLikelihood
    from optimizer.merge.plan import MergePlan

__all__ = [
    "RESTART_AFTER",
    "EngineRestartFailed",
    "EngineSupervisor",
    "FailureKind",
    "check_finite",
    "classify",
    "first_line",
]

FailureKind = Literal["candidate", "memory", "engine"]

#: Engine failures in a row after which the engine is restarted.
RESTART_AFTER = 3


class EngineRestartFailed(MergeoptError):
    """The engine kept failing and a new one could not be started."""


def classify(exc: BaseException) -> FailureKind:
    """Whose fault a trial's exception is: the candidate's, memory's, or the engine's."""
    if isinstance(exc, FloatingPointError):
        return "candidate"
    if isinstance(exc, RuntimeError) and "without overflow" in str(exc):
        return "candidate"  # torch: a coefficient beyond the weights' dtype (e.g. λ = 1e39 in float32)
    if isinstance(exc, MemoryError):
        return "memory"
    torch = sys.modules.get("torch")  # an OOM can only come from torch if torch is loaded
    oom = getattr(torch, "OutOfMemoryError", None) if torch is not None else None
    if oom is not None and isinstance(exc, oom):
        return "memory"
    return "engine"


def first_line(exc: BaseException) -> str:
    """``Type: first line of the message``, at most 300 characters: what a one-line report shows."""
    text = str(exc).strip()
    line = text.splitlines()[0] if text else ""
    return (f"{type(exc).__name__}: {line}" if line else type(exc).__name__)[:300]


def check_finite(engine: Engine) -> None:
    """Raise ``FloatingPointError`` if an in-process engine's live weights hold NaN or Inf.

    Engines that merge in other processes (vLLM) check there and raise the same error; an engine
    whose model lives here (``engine.model``, a torch module: the transformers engine) is checked
    here, because NaN weights generate text that merely scores 0 and would pass as a candidate.
    """
    model = getattr(engine, "model", None)
    parameters = getattr(model, "parameters", None)
    if parameters is None:
        return
    from optimizer.merge._precision import all_finite

    for p in parameters():
        if not all_finite(p):
            raise FloatingPointError("the merged weights contain NaN or Inf")


def _release_cached_memory() -> None:
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.empty_cache()


def _log_stderr(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


class EngineSupervisor(Engine):
    """One engine per process, started on first use, restarted after repeated engine failures.

    Call order: ``supervisor()`` (or any engine method) starts it; after each trial the caller
    reports the outcome with :meth:`record`; between trials it asks :attr:`needs_restart` and, if
    so, calls :meth:`restart`; :meth:`close` at the end.
    """

    def __init__(
        self,
        start: Callable[[], Engine],
        models: ModelSet,
        *,
        restart_after: int | None = RESTART_AFTER,
        log: Callable[[str], None] = _log_stderr,
    ):
        self._start = start
        self.models = models
        self.restart_after = restart_after
        self._log = log
        self.engine: Engine | None = None
        self.starts = 0
        self.engine_failures = 0  # in a row
        self.last_failure = ""

    @classmethod
    def around(cls, engine: Engine) -> EngineSupervisor:
        """Supervise an engine someone else started; it cannot be restarted (nothing to start it)."""

        def no_second_start() -> Engine:
            raise EngineRestartFailed("this engine was started outside the supervisor and cannot be restarted")

        supervisor = cls(no_second_start, engine.models, restart_after=None)
        supervisor.engine = engine
        supervisor.starts = 1
        return supervisor

    def __call__(self) -> Engine:
        """The running engine, started now if there is none (slow: tens of seconds for vLLM)."""
        if self.engine is None:
            self.engine = self._start()
            self.starts += 1
        return self.engine

    # -- the engine's interface, through whichever engine is current ------------------------------
    @property
    def name(self) -> str:
        return self().name

    def apply_plan(self, plan: MergePlan) -> None:
        engine = self()
        engine.apply_plan(plan)
        check_finite(engine)

    def generate(self, prompts: Sequence[str], *, max_tokens: int, stop: Sequence[str]) -> list[str]:
        return self().generate(prompts, max_tokens=max_tokens, stop=stop)

    def loglikelihood(self, requests: Sequence[tuple[str, str]]) -> list[LogLikelihood]:
        return self().loglikelihood(requests)

    def loglikelihood_tokens(self, requests: Sequence[tuple[list[int], list[int]]]) -> list[LogLikelihood]:
        return self().loglikelihood_tokens(requests)

    def generate_batches(self, batches: Sequence[GenerateBatch]) -> list[list[str]]:
        return self().generate_batches(batches)

    # -- failures and restarts ---------------------------------------------------------------------
    def record(self, failure: FailureKind | None, reason: str = "") -> None:
        """After a trial: ``None`` if it completed, else whose fault its failure was."""
        if failure is None:
            self.engine_failures = 0
        elif failure == "engine":
            self.engine_failures += 1
            self.last_failure = reason
        elif failure == "memory":
            _release_cached_memory()  # what the failed candidate held must not starve the next one
        # A candidate's NaN or an OOM says nothing about the engine either way.

    @property
    def needs_restart(self) -> bool:
        return self.restart_after is not None and self.engine_failures >= self.restart_after

    def restart(self) -> Engine:
        """Close the engine and start a new one; :class:`EngineRestartFailed` if that fails."""
        n, reason = self.engine_failures, self.last_failure
        self._log(f"the engine failed {n} trials in a row (last: {reason}); restarting it")
        try:
            self.close()
        except Exception as exc:  # a broken engine may not close cleanly; the new one matters
            self._log(f"closing the failed engine raised {first_line(exc)}; starting a new one anyway")
            self.engine = None
        try:
            engine = self()
        except Exception as exc:
            raise EngineRestartFailed(
                f"the engine failed {n} trials in a row (last: {reason}) and restarting it failed too:"
                f" {first_line(exc)}. Completed trials are saved; fix the cause, then resume"
            ) from None
        self.engine_failures = 0
        self._log(f"engine restarted (start {self.starts} in this process)")
        return engine

    def close(self) -> None:
        engine, self.engine = self.engine, None
        if engine is not None:
            engine.close()
