"""What a study offers a merge method's measurement, and the call that measures it once per study.

A method declares what it measures (:class:`~optimizer.merge._registry.StudyData`: RegMean's Grams,
HILA's importances) and asks the study for its inputs through
:class:`~optimizer.merge._registry.StudyInputs`; this module provides them:

* ``calibration(model)``: each model's training-like text — its own tasks' calibration split
  (``train`` by default) or the file the config's ``calibration.data`` names — prompt and answer;
* ``golden(model)``: each model's own greedy answers to its tasks' prompts (golden data, generated
  once with the transformers engine and cached under ``golden/`` beside the study).

Measured in this process before any search engine starts, never on the held-out split (it must
stay unseen) nor on the search split's answers (a merge fitted to its test), and cached beside the
study (:func:`optimizer.merge.study_data.ensure`);
a later run, a worker or an export reuses the file, and a changed model or data set measures again.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

from objectives.data import load_rows, load_split
from objectives.golden import generate_golden, golden_by_specialist
from objectives.tasks import AnyTask, Task, only_native
from optimizer.checkpoints import ModelSet
from optimizer.config import ObjectiveConfig, StudyConfig
from optimizer.engines import Engine, EngineSupervisor, make_engine
from optimizer.errors import DataError
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
        self._calibration: dict[str, list[str]] = {}

    @property
    def models(self) -> ModelSet:
        return self._models

    def _own(self, model: str) -> list[AnyTask]:
        """The model's own tasks (the config's stated ones), else every task."""
        own = [self.tasks[t] for t in self.config.stated_tasks(model)]
        return own or list(self.tasks.values())

    def calibration(self, model: str) -> list[str]:
        """Up to ``calibration.examples`` texts: the config's file for ``model``, else its own
        tasks' calibration splits, taken in turn so that every task is represented."""
        if model not in self._calibration:
            self._calibration[model] = self._read_calibration(model)
        return self._calibration[model]

    def _read_calibration(self, model: str) -> list[str]:
        settings = self.config.calibration
        own = [t for t in self._own(model) if isinstance(t, Task)]
        given = settings.data.get(model)
        if given is not None:
            path = self.config.path(given)
            task = own[0] if own else None
            split = task_objective(self.config, task.name).calibration_split if task else "train"
            rows = load_split(path, split) if path.is_dir() else load_rows(path)
            per_source = [[_render(row, task, f"calibration.data.{model} ({path})") for row in rows]]
        else:
            harness = [t.name for t in self._own(model) if not isinstance(t, Task)]
            if harness:
                raise DataError(
                    f"model {model!r}: objective {harness[0]!r} is an lm-eval task, which has no calibration"
                    f" split; name a file of the model's training-like text under calibration.data.{model}"
                )
            per_source = []
            for task in own:
                objective = task_objective(self.config, task.name)
                path = self.config.path(objective.data or "")
                try:
                    rows = load_split(path, objective.calibration_split)
                except DataError as exc:
                    raise DataError(
                        f"{exc}; method {self.config.method} measures model {model!r} on training-like text of"
                        f" its task, disjoint from the search split: add a {objective.calibration_split!r}"
                        f" split there, or name a file under calibration.data.{model}"
                    ) from None
                per_source.append([_render(row, task, f"objective {task.name!r}") for row in rows])
        texts = _interleave(per_source, settings.examples)
        searched = {_render(example, task, "") for task in own for example in task.search}
        overlap = sum(text in searched for text in texts)
        if overlap:
            self.say(f"warning: {overlap} of model {model}'s calibration examples are also search examples")
        return texts

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


def task_objective(config: StudyConfig, name: str) -> ObjectiveConfig:
    """The objective ``name`` of the config."""
    return next(o for o in config.objectives if o.name == name)


def _render(row: dict, task: Task | None, where: str) -> str:
    """A calibration row as text: its ``text`` field, else the prompt and answer as ``task`` renders
    them (a multiple-choice index is not text the model would write, so only the prompt then)."""
    text = row.get("text")
    if isinstance(text, str):
        return text
    if task is None:
        raise DataError(f"{where}: a row has no 'text' field and the model has no task of its own to render it")
    fmt = task.metric.format
    tail = row.get(fmt.target_field) if fmt.target_template is None else fmt.target(row)
    return fmt.prompt(row) + (tail if isinstance(tail, str) else "")


def _interleave(sources: Sequence[Sequence[str]], limit: int) -> list[str]:
    """Up to ``limit`` texts, one from each source in turn."""
    out: list[str] = []
    for i in range(max((len(s) for s in sources), default=0)):
        out += [s[i] for s in sources if i < len(s)]
        if len(out) >= limit:
            break
    return out[:limit]


def ensure_study_data(
    config: StudyConfig, models: ModelSet, tasks: Sequence[AnyTask], say: Callable[[str], None] = lambda _: None
) -> Path | None:
    """The study's data file for ``config.method`` (measured now if missing or stale), or None."""
    method = get_method(config.method)
    if method.study_data is None:
        return None
    return ensure(method, _Inputs(config, models, tasks, say), config.study_dir())
