"""A task = its examples (search and held-out splits) + the metric that scores them.

Tasks are built from the config before any study file is written, and every prompt and target is
rendered then (templates, shots, chat template: :mod:`objectives.formats`), so a missing file, an
empty split, a missing column, a template naming a field a row lacks, too few examples for the
shots or a target that can never match stops the run with one line instead of failing trial
after trial.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeAlias

from objectives.data import load_split
from objectives.formats import PromptFormat, Verdict
from objectives.metrics import ExactMatch, Metric, MetricResult, make_metric, score_together
from optimizer.config import ObjectiveConfig, StudyConfig
from optimizer.engines.base import Engine
from optimizer.errors import ConfigError, DataError, ModelError
from optimizer.tokens import TokenizerInfo, tokenizer_info

if TYPE_CHECKING:
    from objectives.harness_tasks import HarnessTask

__all__ = [
    "AnyTask",
    "Task",
    "check_stageable",
    "load_tasks",
    "native",
    "only_native",
    "score_parts",
    "score_tasks",
]


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

    @property
    def binary(self) -> bool:
        return self.metric.binary

    @property
    def metric_name(self) -> str:
        return self.metric.name

    def size(self, split: str) -> int:
        return len(self.examples(split))

    def score(self, engine: Engine, split: str = "search") -> MetricResult:
        return self.metric.score(engine, self.examples(split))


#: An objective: examples from a data file (:class:`Task`) or an lm-eval task (``HarnessTask``).
AnyTask: TypeAlias = "Task | HarnessTask"


def native(tasks: Sequence[AnyTask]) -> list[Task]:
    """The objectives scored from data files (those whose prompts mergeopt renders itself)."""
    return [task for task in tasks if isinstance(task, Task)]


def only_native(tasks: Sequence[AnyTask], feature: str) -> list[Task]:
    """``tasks``, all data-file objectives, or one line saying ``feature`` needs them."""
    harness = [task.name for task in tasks if not isinstance(task, Task)]
    if harness:
        raise ConfigError(
            f"{feature} works on data-file objectives; objective {harness[0]!r} is an lm-eval task"
            f" (score it in a study without {feature}, or give the objective a data file)"
        )
    return native(tasks)


def score_tasks(engine: Engine, tasks: Sequence[AnyTask], split: str = "search") -> list[MetricResult]:
    """Every task's score on ``split``, the tasks sharing the engine's batches: data-file tasks one
    call per request kind, lm-eval tasks one harness evaluation for all of them."""
    return _score(engine, [(task, None) for task in tasks], split)


def _score(engine: Engine, jobs: Sequence[tuple[AnyTask, Sequence[int] | None]], split: str) -> list[MetricResult]:
    """Each (task, item indices of ``split`` — None: all of it), every job sharing the engine's calls."""
    mine = [(i, t, idx) for i, (t, idx) in enumerate(jobs) if isinstance(t, Task)]
    rows = []
    for _, t, idx in mine:
        examples = t.examples(split)
        rows.append(examples if idx is None else [examples[j] for j in idx])
    scores = score_together(engine, [(t.metric, r) for (_, t, _), r in zip(mine, rows, strict=True)]) if mine else []
    out = dict(zip((i for i, _, _ in mine), scores, strict=True))
    rest = [(i, t, idx) for i, (t, idx) in enumerate(jobs) if not isinstance(t, Task)]
    if rest:
        from objectives.harness_tasks import score_harness

        whole = all(idx is None for _, _, idx in rest)
        subsets = None if whole else [list(range(t.size(split))) if idx is None else idx for _, t, idx in rest]
        parts = score_harness(engine, [t for _, t, _ in rest], split, subsets)
        out.update(zip((i for i, _, _ in rest), parts, strict=True))
    return [out[i] for i in range(len(jobs))]


def _check_fields(rows: Sequence[dict], fields: Sequence[str], where: str) -> None:
    missing = [f for f in fields if f not in rows[0]]
    if missing:
        raise DataError(
            f"{where}: examples lack the field {missing[0]!r} (they have: {', '.join(rows[0])});"
            f" rename the column or set the objective's '{missing[0]}'-field option"
        )


class _BaseTokenizer:
    """The base model's tokenizer, loaded once for all objectives (BOS rule, chat template)."""

    def __init__(self, base: Path):
        self.base = base
        self._tokenizer: Any = None

    def get(self) -> Any:
        if self._tokenizer is None:
            from transformers import AutoTokenizer

            try:
                self._tokenizer = AutoTokenizer.from_pretrained(str(self.base))
            except (OSError, ValueError) as exc:
                raise ModelError(
                    f"base model {str(self.base)!r}: cannot load its tokenizer ({str(exc).splitlines()[0][:160]});"
                    " mergeopt builds prompts with the base's tokenizer: save it beside the weights"
                ) from None
        return self._tokenizer

    def info(self) -> TokenizerInfo:
        return tokenizer_info(self.get())

    def chat(self, where: str) -> Callable[[list[dict[str, str]]], str]:
        tokenizer = self.get()
        if not getattr(tokenizer, "chat_template", None):
            raise ConfigError(
                f"{where}: chat: true, but the base's tokenizer ({self.base}) has no chat template; set"
                " chat: false and write the prompt with prompt_template, or add a chat_template to its"
                " tokenizer_config.json"
            )

        def render(messages: list[dict[str, str]]) -> str:
            return str(tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True))

        return render


def _format(obj: ObjectiveConfig, search: list[dict], seed: int, tokenizer: _BaseTokenizer) -> PromptFormat:
    where = f"objective {obj.name!r}"
    info = tokenizer.info()
    if obj.add_bos and info.bos_token is None:
        raise ConfigError(f"{where}: add_bos: true, but the base's tokenizer has no BOS token; remove add_bos")
    return PromptFormat(
        prompt_field=obj.prompt_field,
        target_field=obj.target_field,
        prompt_template=obj.prompt_template,
        target_template=obj.target_template,
        use_chat=obj.chat,
        system=obj.system,
        fewshot=obj.fewshot,
        fewshot_pool=search,
        seed=seed,
        add_bos=obj.add_bos,
        tokenizer=info,
        chat=tokenizer.chat(where) if obj.chat else None,
        where=where,
    )


def _check_rows(obj: ObjectiveConfig, metric: Metric, rows: Sequence[dict], where: str) -> None:
    """Render every prompt and target once: every template and shot problem surfaces here, with its row."""
    fmt = metric.format
    if obj.fewshot and len(fmt.fewshot_pool) <= obj.fewshot:
        raise DataError(
            f"{where}: fewshot {obj.fewshot} needs at least {obj.fewshot + 1} search examples (the shots and the"
            f" question), the search split has {len(fmt.fewshot_pool)}; lower fewshot or add search examples"
        )
    for i, row in enumerate(rows):
        try:
            fmt.prompt(row)
            target = fmt.target(row)
        except DataError as exc:
            raise DataError(f"{exc} (row {i} of {where})") from None
        if isinstance(metric, ExactMatch):
            normed = metric.verdict.norm(target)
            for stop in metric.stop:
                if stop and stop in normed:
                    raise DataError(
                        f"{where}, row {i}: the target {target!r} contains the stop string {stop!r}, so an answer"
                        " (cut before it) can never match; change the objective's stop or the target"
                    )


def check_stageable(tasks: Sequence[AnyTask]) -> None:
    """Early rejection scores parts of each task's docs and joins them: an lm-eval objective must
    be a plain mean over its docs for the parts to join into its score."""
    for task in tasks:
        if not isinstance(task, Task) and not task.mean_of_docs:
            raise ConfigError(
                f"objective {task.name!r}: early_rejection joins scores of parts of a task's docs, but lm-eval"
                f" task {task.top!r}'s {task.metric_name} is not a plain mean over its docs (its aggregation,"
                " or a group not weighted by size); remove early_rejection from this study"
            )


def score_parts(engine: Engine, jobs: Sequence[tuple[AnyTask, Sequence[int]]]) -> list[MetricResult]:
    """Each (task, item indices of its search split) scored, every job sharing the engine's calls:
    the parts early rejection scores a candidate on, stage by stage."""
    return _score(engine, list(jobs), "search")


def _harness_task(obj: ObjectiveConfig, config: StudyConfig, tokenizer: _BaseTokenizer, seen: dict[str, str]) -> Any:
    from objectives.harness_tasks import load_harness_task

    task = load_harness_task(obj, config, tokenizer.get())
    for split in ("search", "held_out"):
        for leaf in task.docs[split]:
            if seen.setdefault(leaf, obj.name) != obj.name:
                raise ConfigError(
                    f"objective {obj.name!r}: lm-eval task {leaf!r} is already scored by objective"
                    f" {seen[leaf]!r}; an lm-eval task may feed one objective"
                )
    return task


def load_tasks(config: StudyConfig) -> list[AnyTask]:
    """Load and check every objective's data, and render every prompt once."""
    tokenizer = _BaseTokenizer(config.path(config.base))
    tasks: list[AnyTask] = []
    seen: dict[str, str] = {}
    for obj in config.objectives:
        if obj.lm_eval is not None:
            tasks.append(_harness_task(obj, config, tokenizer, seen))
            continue
        assert obj.data is not None and obj.metric is not None  # the config's validator saw to it
        path: Path = config.path(obj.data)
        search = load_split(path, obj.search_split)[: obj.limit]
        held_out = load_split(path, obj.held_out_split)[: obj.held_out_limit]
        metric = make_metric(
            obj.metric,
            choices_field=obj.choices_field,
            stop=obj.stop,
            max_tokens=obj.max_tokens,
            format=_format(obj, search, config.search.seed, tokenizer),
            verdict=Verdict(obj.extract, tuple(obj.normalize)),
        )
        for rows, split in ((search, obj.search_split), (held_out, obj.held_out_split)):
            where = f"objective {obj.name!r}, {path} [{split}]"
            _check_fields(rows, metric.required_fields, where)
            _check_rows(obj, metric, rows, where)
        tasks.append(Task(obj.name, metric, search, held_out))
    return tasks
