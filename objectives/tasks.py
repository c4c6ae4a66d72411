"""A task = its examples (search and held-out splits) + the metric that scores them.

Tasks are built from the config before any study file is written, so a missing file, an empty
split or a missing column stops the run with one line instead of failing trial after trial.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from objectives.data import load_split
from objectives.metrics import Metric, MetricResult, make_metric, score_together
from optimizer.config import StudyConfig
from optimizer.engines.base import Engine
from optimizer.errors import DataError

__all__ = ["Task", "load_tasks", "score_tasks"]


@dataclass(frozen=True)
class Task:
    """One objective of the study."""

    name: str
    metric: Metric
    search: list[dict]
    held_out: list[dict]

    @property
    def direction(self) -> str:
        return self.metric.direction

    def examples(self, split: str) -> list[dict]:
        if split == "search":
            return self.search
        if split == "held_out":
            return self.held_out
        raise ValueError(f"unknown split {split!r}; use 'search' or 'held_out'")

    def score(self, engine: Engine, split: str = "search") -> MetricResult:
        return self.metric.score(engine, self.examples(split))


def score_tasks(engine: Engine, tasks: Sequence[Task], split: str = "search") -> list[MetricResult]:
    """Every task's score on ``split``, the tasks sharing the engine's batches (one call per kind)."""
    return score_together(engine, [(task.metric, task.examples(split)) for task in tasks])


def _check_fields(rows: Sequence[dict], fields: Sequence[str], where: str) -> None:
    missing = [f for f in fields if f not in rows[0]]
    if missing:
        raise DataError(
            f"{where}: examples lack the field {missing[0]!r} (they have: {', '.join(rows[0])});"
            f" rename the column or set the objective's '{missing[0]}'-field option"
        )


def load_tasks(config: StudyConfig) -> list[Task]:
    """Load and check every objective's data."""
    tasks = []
    for obj in config.objectives:
        metric = make_metric(
            obj.metric,
            prompt_field=obj.prompt_field,
            target_field=obj.target_field,
            choices_field=obj.choices_field,
            stop=obj.stop,
            max_tokens=obj.max_tokens,
        )
        path: Path = config.path(obj.data)
        search = load_split(path, obj.search_split)[: obj.limit]
        held_out = load_split(path, obj.held_out_split)[: obj.held_out_limit]
        for rows, split in ((search, obj.search_split), (held_out, obj.held_out_split)):
            _check_fields(rows, metric.required_fields, f"objective {obj.name!r}, {path} [{split}]")
        tasks.append(Task(obj.name, metric, search, held_out))
    return tasks
