"""Engines own the weights: they merge a plan in place and score requests.

:func:`make_engine` is the one place that maps a config's ``engine`` name to a class, importing the
heavy backend only when it is chosen; :func:`lazy_engine` wraps it in the
:class:`~optimizer.engines.supervisor.EngineSupervisor` every command uses: started on first use,
restarted after repeated engine failures.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from optimizer.checkpoints import ModelSet
from optimizer.config import StudyConfig, VllmConfig
from optimizer.engines.base import Engine, GenerateBatch, LogLikelihood
from optimizer.engines.supervisor import RESTART_AFTER, EngineSupervisor
from optimizer.errors import ConfigError

if TYPE_CHECKING:
    from optimizer.memory_plan import MemoryPlan
    from optimizer.merge.streaming import Placement

__all__ = [
    "Engine",
    "EngineSupervisor",
    "GenerateBatch",
    "LogLikelihood",
    "lazy_engine",
    "make_engine",
    "study_engine",
]


def make_engine(
    kind: str,
    models: ModelSet,
    *,
    device: str = "auto",
    dtype: str = "auto",
    vllm: VllmConfig | None = None,
    placement: Placement = "resident",
) -> Engine:
    """Start the engine called ``kind`` on ``models`` (slow: do it once per process).

    ``placement``: where the task vectors live (the memory plan's choice; resident on the device
    unless they do not fit there).
    """
    if kind == "hf":
        from optimizer.engines.hf_engine import HFEngine

        return HFEngine(models, device=device, dtype=dtype, placement=placement)
    if kind == "vllm":
        from optimizer.engines.vllm_engine import VLLMEngine

        return VLLMEngine(models, dtype=dtype, settings=vllm, placement=placement)
    raise ConfigError(f"unknown engine {kind!r}; use 'vllm' or 'hf'")


def lazy_engine(
    kind: str,
    models: ModelSet,
    *,
    device: str = "auto",
    dtype: str = "auto",
    vllm: VllmConfig | None = None,
    placement: Placement = "resident",
    restart_after: int | None = RESTART_AFTER,
) -> EngineSupervisor:
    """The engine called ``kind``, started on first use (a start costs tens of seconds; a run that
    finds everything cached starts none) and restarted after ``restart_after`` engine failures in a
    row (None: never). Close it when done."""
    return EngineSupervisor(
        lambda: make_engine(kind, models, device=device, dtype=dtype, vllm=vllm, placement=placement),
        models,
        restart_after=restart_after,
    )


def study_engine(
    config: StudyConfig,
    models: ModelSet,
    *,
    memory: MemoryPlan | None = None,
    restart_after: int | None = RESTART_AFTER,
) -> EngineSupervisor:
    """The lazy engine a study's config asks for (its ``engine``, ``device``, ``dtype``, ``vllm``),
    placed as the memory plan says (``memory``, else planned here: it refuses what cannot fit)."""
    from optimizer.memory_plan import Machine, plan_memory

    memory = memory or plan_memory(config, models, Machine.here())
    vllm = config.vllm
    if memory.gpu_memory_utilization is not None:
        vllm = vllm.model_copy(update={"gpu_memory_utilization": memory.gpu_memory_utilization})
    return lazy_engine(
        config.engine,
        models,
        device=config.device,
        dtype=config.dtype,
        vllm=vllm,
        placement=memory.placement,
        restart_after=restart_after,
    )
