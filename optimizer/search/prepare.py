"""Check everything a study needs before anything is written.

Models are checked from their safetensors headers (cheap), task data is loaded and its fields
checked, and the search space is built. Only when all of it holds does a study file appear, so a
bad config leaves no half-made study behind.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

from objectives.tasks import Task, load_tasks
from optimizer.config import StudyConfig
from optimizer.engines.base import ModelSet
from optimizer.models import check_compatible, load_config, read_shapes
from optimizer.search.space import SearchSpace
from optimizer.search.study_data import ensure_study_data

__all__ = ["Prepared", "check_models", "prepare"]


@dataclass(frozen=True)
class Prepared:
    """A validated study: models, tasks and the search space built from the config."""

    config: StudyConfig
    models: ModelSet
    tasks: list[Task]
    space: SearchSpace

    @property
    def directions(self) -> list[str]:
        return [t.direction for t in self.tasks]


def check_models(config: StudyConfig) -> tuple[ModelSet, int]:
    """Resolve model paths and refuse missing or mismatched models; returns the layer count."""
    models = ModelSet(config.path(config.base), {n: config.path(p) for n, p in config.models.items()})
    base_shapes = read_shapes(models.base)
    for name, path in models.specialists.items():
        check_compatible(base_shapes, read_shapes(path), name)
    num_layers = int(load_config(models.base).get("num_hidden_layers", 0))
    return models, num_layers


def prepare(config: StudyConfig, say: Callable[[str], None] = lambda _: None) -> Prepared:
    """Validate the config; then measure (or find cached) what the method needs once per study."""
    models, num_layers = check_models(config)
    tasks = load_tasks(config)
    space = SearchSpace(config, num_layers)
    data = ensure_study_data(config, models, tasks, say)
    return Prepared(config, replace(models, data_dir=data.parent if data else None), tasks, space)
