"""What a study offers a merge method's measurement, and the call that measures it once per study.

A method declares what it measures (:class:`~optimizer.merge._registry.StudyData`: RegMean's Grams,
HILA's importances) and asks the study for its inputs through
:class:`~optimizer.merge._registry.StudyInputs`; this module provides them:

* ``texts(model)``: each model's own tasks' search examples, prompt and answer, as calibration text;
* ``golden(model)``: each model's own greedy answers to its tasks' prompts (golden data, generated
  once with the transformers engine and cached under ``golden/`` beside the study).

Measured in this process before any search engine starts, on the search split only (the held-out
split must stay unseen), and cached beside the study (:func:`optimizer.merge.study_data.ensure`);
a later run, a worker or an export reuses the file, and a changed model or data set measures again.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

from objectives.golden import generate_golden, golden_by_specialist
from objectives.tasks import AnyTask, Task, only_native
from optimizer.checkpoints import ModelSet
from optimizer.config import StudyConfig
from optimizer.engines import Engine, EngineSupervisor, make_engine
from optimizer.merge import get_method
from optimizer.merge.study_data import ensure

__all__ = ["ensure_study_data"]


class _Inputs:
    """The study's side of :class:`~optimizer.merge._registry.StudyInputs` (golden data made on first use)."""

    def __init__(self, config: StudyConfig, models: ModelSet, tasks: Sequence[AnyTask], say: Callable[[str], None]):
        self.config = config
        self._models = models
        self.tasks = {t.name: t for t in tasks}
        self._say = say
        self._golden: dict[str, list[dict[str, str]]] | None = None

    @property
    def models(self) -> ModelSet:
        return self._models

    def _own(self, model: str) -> list[AnyTask]:
        """The model's own tasks (the config's stated ones), else every task."""
        own = [self.tasks[t] for t in self.config.stated_tasks(model)]
        return own or list(self.tasks.values())

    def texts(self, model: str) -> list[str]:
        """Each search example's prompt as the task renders it, followed by its answer where it
        has a text one (a multiple-choice index is not text the model would write)."""
        out: list[str] = []
        for task in self._own(model):
            if not isinstance(task, Task):  # an lm-eval task: its questions as the task writes them
                out += task.texts("search")
                continue
            fmt = task.metric.format
            for ex in task.search:
                tail = ex.get(fmt.target_field) if fmt.target_template is None else fmt.target(ex)
                out.append(fmt.prompt(ex) + (tail if isinstance(tail, str) else ""))
        return out

    def golden(self, model: str) -> list[dict[str, str]]:
        if self._golden is None:
            folder = self.config.study_dir() / "golden"

            def start() -> Engine:  # only if some task misses the cache
                self.say("generating golden data: each specialist answers its task's prompts")
                return make_engine("hf", self._models)

            with EngineSupervisor(start, self._models) as engine:
                tasks = only_native(list(self.tasks.values()), f"method {self.config.method}'s golden data")
                generate_golden(self.config, tasks, engine, out_dir=folder)
            self._golden = golden_by_specialist(folder)
        return self._golden.get(model, [])

    def say(self, message: str) -> None:
        self._say(message)


def ensure_study_data(
    config: StudyConfig, models: ModelSet, tasks: Sequence[AnyTask], say: Callable[[str], None] = lambda _: None
) -> Path | None:
    """The study's data file for ``config.method`` (measured now if missing or stale), or None."""
    method = get_method(config.method)
    if method.study_data is None:
        return None
    return ensure(method, _Inputs(config, models, tasks, say), config.study_dir())
