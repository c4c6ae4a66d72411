"""Check everything a study needs before anything is written; then measure what its method needs.

:func:`prepare` only validates: models from their safetensors headers (cheap), task data loaded
and its fields checked, the search space built. It writes nothing, so a bad config leaves no
half-made study behind. :func:`measured` then measures, once per study, what the merge method
needs (RegMean's Grams, HILA's golden data and importances: :mod:`optimizer.search.study_data`),
or finds it cached beside the study.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

from optuna.study import StudyDirection

from objectives.tasks import Task, load_tasks
from optimizer.checkpoints import ModelSet, check_compatible, model_config, read_shapes
from optimizer.config import StudyConfig
from optimizer.search.space import SearchSpace
from optimizer.search.study_data import ensure_study_data

__all__ = ["Prepared", "check_models", "measured", "prepare"]


@dataclass(frozen=True)
class Prepared:
    """A validated study: models, tasks and the search space built from the config."""

    config: StudyConfig
    models: ModelSet
    tasks: list[Task]
    space: SearchSpace

    @property
    def directions(self) -> list[StudyDirection]:
        """One Optuna direction per task, in objective order."""
        return [StudyDirection.MAXIMIZE if t.direction == "maximize" else StudyDirection.MINIMIZE for t in self.tasks]


def check_models(config: StudyConfig) -> tuple[ModelSet, int]:
    """Resolve model paths and refuse missing or mismatched models; returns the layer count."""
    models = ModelSet(config.path(config.base), {n: config.path(p) for n, p in config.models.items()})
    base_shapes = read_shapes(models.base)
    for name, path in models.specialists.items():
        check_compatible(base_shapes, read_shapes(path), name)
    num_layers = int(model_config(models.base).get("num_hidden_layers", 0))
    return models, num_layers


def prepare(config: StudyConfig, *, layer_overrides: tuple[str, ...] = ()) -> Prepared:
    """Validate the config against its models and data; nothing is written.

    ``layer_overrides``: layers a contribution analysis gave coefficients of their own (a study
    records them; :func:`optimizer.search.study.open_study` passes them on).
    """
    models, num_layers = check_models(config)
    tasks = load_tasks(config)
    return Prepared(config, models, tasks, SearchSpace(config, num_layers, layer_overrides))


def measured(prepared: Prepared, say: Callable[[str], None] = lambda _: None) -> Prepared:
    """``prepared`` with the method's study data measured (or found cached) beside the study."""
    data = ensure_study_data(prepared.config, prepared.models, prepared.tasks, say)
    return replace(prepared, models=replace(prepared.models, data_dir=data.parent if data else None))
