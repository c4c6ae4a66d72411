"""Engines own the weights: they merge a plan in place and score requests.

:func:`make_engine` is the one place that maps a config's ``engine`` name to a class, importing the
heavy backend only when it is chosen; :func:`lazy_engine` wraps it in the
:class:`~optimizer.engines.supervisor.EngineSupervisor` every command uses: started on first use,
restarted after repeated engine failures.
"""

from __future__ import annotations

from optimizer.checkpoints import ModelSet
from optimizer.engines.base import Engine, GenerateBatch, LogLikelihood
from optimizer.engines.supervisor import RESTART_AFTER, EngineSupervisor
from optimizer.errors import ConfigError

__all__ = ["Engine", "EngineSupervisor", "GenerateBatch", "LogLikelihood", "lazy_engine", "make_engine"]


def make_engine(kind: str, models: ModelSet, *, device: str = "auto", dtype: str = "auto") -> Engine:
    """Start the engine called ``kind`` on ``models`` (slow: do it once per process)."""
    if kind == "hf":
        from optimizer.engines.hf_engine import HFEngine

        return HFEngine(models, device=device, dtype=dtype)
    if kind == "vllm":
        from optimizer.engines.vllm_engine import VLLMEngine

        return VLLMEngine(models, dtype=dtype)
    raise ConfigError(f"unknown engine {kind!r}; use 'vllm' or 'hf'")


def lazy_engine(
    kind: str,
    models: ModelSet,
    *,
    device: str = "auto",
    dtype: str = "auto",
    restart_after: int | None = RESTART_AFTER,
) -> EngineSupervisor:
    """The engine called ``kind``, started on first use (a start costs tens of seconds; a run that
    finds everything cached starts none) and restarted after ``restart_after`` engine failures in a
    row (None: never). Close it when done."""
    return EngineSupervisor(
        lambda: make_engine(kind, models, device=device, dtype=dtype), models, restart_after=restart_after
    )
