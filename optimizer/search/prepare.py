"""Check everything a study needs before anything is written; then measure what its method needs.

:func:`prepare` only validates: models from their safetensors headers (cheap), task data loaded
and its fields checked, the search space built. It writes nothing, so a bad config leaves no
half-made study behind. :func:`measured` then measures, once per study, what the merge method
needs (RegMean's Grams, HILA's golden data and importances: :mod:`optimizer.search.study_data`),
or finds it cached beside the study, and builds the union vocabulary of specialists that added
tokens (:mod:`optimizer.union_vocab`).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, replace

from optuna.study import StudyDirection

from objectives.tasks import AnyTask, check_stageable, load_tasks
from optimizer.adapters import Adapter, base_mismatch_warning
from optimizer.checkpoints import ModelSet, check_specialist, model_config, read_shapes
from optimizer.config import StudyConfig
from optimizer.errors import ConfigError
from optimizer.families import expert_count, family_of
from optimizer.memory_plan import Machine, MemoryPlan, plan_memory
from optimizer.merge import get_method
from optimizer.models import describe
from optimizer.search.space import SearchSpace
from optimizer.search.study_data import ensure_study_data
from optimizer.union_vocab import check_union, union_models, union_plan

__all__ = ["Prepared", "check_engine", "check_models", "measured", "prepare"]


@dataclass(frozen=True)
class Prepared:
    """A validated study: models, tasks and the search space built from the config."""

    config: StudyConfig
    models: ModelSet
    tasks: list[AnyTask]
    space: SearchSpace
    memory: MemoryPlan
    notes: tuple[str, ...] = ()  # lines worth a user's attention that are not errors

    @property
    def directions(self) -> list[StudyDirection]:
        """One Optuna direction per task, in objective order."""
        return [StudyDirection.MAXIMIZE if t.direction == "maximize" else StudyDirection.MINIMIZE for t in self.tasks]


def check_models(config: StudyConfig) -> tuple[ModelSet, int]:
    """Resolve model paths and refuse missing or mismatched models; returns the layer count."""
    models, num_layers, _ = _checked_models(config)
    return models, num_layers


def _checked_models(config: StudyConfig) -> tuple[ModelSet, int, tuple[str, ...]]:
    """:func:`check_models`, plus the notes a user should read (adapters trained on another path)."""
    models = ModelSet(config.path(config.base), {n: config.model_path(n) for n in config.models})
    base_shapes = read_shapes(models.base)
    family = family_of(model_config(models.base))
    for tensor in base_shapes:  # every tensor must have a place in a block, or no merge can plan it
        describe(tensor, family)
    notes: list[str] = []
    adapters: dict[str, Adapter | None] = {}
    for name, path in models.specialists.items():
        adapters[name] = adapter = check_specialist(path, name, base_shapes, models.base, added_ok=True)
        note = base_mismatch_warning(adapter, models.base, name) if adapter else None
        if note:
            notes.append(note)
    # Added tokens: merged over the union vocabulary, which measured() builds (prepare writes nothing).
    method = config.method
    check_union(models, union_plan(models), method, adapters, get_method(method).study_data is not None)
    num_layers = int(model_config(models.base).get("num_hidden_layers", 0))
    return models, num_layers, tuple(notes)


def searched_experts(config: StudyConfig, models: ModelSet) -> int:
    """Experts per layer that get coefficients of their own (``experts: each``), else 0."""
    if config.experts == "joint":
        return 0
    base_config = model_config(models.base)
    count = expert_count(base_config)
    if not family_of(base_config).experts or not count:
        raise ConfigError(
            f"experts: each needs a mixture-of-experts model; the base is a {base_config.get('model_type')!r}"
            " model without experts: remove the line"
        )
    if config.granularity == "model":
        raise ConfigError(
            "experts: each gives every expert of every layer its own coefficients; it needs granularity: layer or group"
        )
    return count


def check_engine(config: StudyConfig) -> None:
    """Refuse engine settings this machine cannot run, before any engine starts."""
    tp = config.vllm.tensor_parallel_size
    if config.engine == "vllm" and tp > 1:
        import torch

        if torch.cuda.is_available():
            visible = torch.cuda.device_count()
            if visible < tp:
                raise ConfigError(
                    f"vllm.tensor_parallel_size {tp} needs {tp} GPUs, but {visible} are visible here;"
                    f" lower it to {max(visible, 1)} or run on a machine with {tp} GPUs"
                )
            return
        # vLLM's CPU build runs one worker per rank on its own cores.
        cores = len(os.sched_getaffinity(0))
        if cores < tp:
            raise ConfigError(
                f"vllm.tensor_parallel_size {tp} needs {tp} GPUs (or {tp} CPU cores on vLLM's CPU build),"
                f" but no GPU and {cores} cores are visible here; lower it to {cores} or run on a machine"
                f" with {tp} GPUs"
            )


def prepare(config: StudyConfig, *, layer_overrides: tuple[str, ...] = ()) -> Prepared:
    """Validate the config against its models, data and machine; nothing is written.

    ``layer_overrides``: layers a contribution analysis gave coefficients of their own (a study
    records them; :func:`optimizer.search.study.open_study` passes them on).
    """
    check_engine(config)
    models, num_layers, notes = _checked_models(config)
    memory = plan_memory(config, models, Machine.here())
    tasks = load_tasks(config)
    if config.search.early_rejection is not None:
        check_stageable(tasks)
    space = SearchSpace(config, num_layers, layer_overrides, num_experts=searched_experts(config, models))
    if not space.distributions():
        # Every trial would build the same model (Model Stock; SCE with select_topk fixed).
        raise ConfigError(
            f"method {config.method!r} has nothing to search here (no per-model coefficients and no searchable"
            " option left); every study with 2+ specialists already runs model_stock as a baseline: choose"
            " another method, or a search_options range"
        )
    return Prepared(config, models, tasks, space, memory, notes)


def measured(prepared: Prepared, say: Callable[[str], None] = lambda _: None) -> Prepared:
    """``prepared`` with the method's study data measured (or found cached) beside the study, and the
    union vocabulary built (or found) there where a specialist added tokens (:mod:`optimizer.union_vocab`)."""
    models = union_models(prepared.models, prepared.config.study_dir(), say)
    data = ensure_study_data(prepared.config, models, prepared.tasks, say)
    return replace(prepared, models=replace(models, data_dir=data.parent if data else None))
