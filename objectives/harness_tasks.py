"""lm-evaluation-harness tasks as objectives: loaded and checked once, scored through the harness's
own evaluator against whatever the engine holds.

An objective that names an lm-eval task (``lm_eval: {task: ..., include_path: ...}``) optimises
the very number the harness prints for it: prompts, few-shot examples, chat template, answer
filters and metric all come from the task, and :func:`score_harness` runs ``lm_eval.evaluate`` with
:class:`~objectives.harness_lm.EngineLM` over every such objective of a trial at once, so the
harness sends one request batch per request kind for all of them.

Loading (:func:`load_harness_task`) happens when the study's tasks load, before anything is
written: an unknown task, metric or filter, a missing include path, data that would come from a hub,
sampled generation or too few docs each stop the run with one line. The search and held-out docs
are disjoint (``split: seeded`` or ``split: task``, see :class:`~optimizer.config.LmEvalConfig`).
"""

from __future__ import annotations

import difflib
import json
import logging
import math
import os
import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from objectives.metrics import MetricResult
from optimizer.config import LmEvalConfig, ObjectiveConfig, StudyConfig
from optimizer.engines.base import Engine
from optimizer.errors import ConfigError, DataError

__all__ = ["FEWSHOT_SEED", "HarnessTask", "load_harness_task", "score_harness"]

#: The harness's default few-shot seed (``lm_eval --fewshot_random_seed``), set before every
#: evaluation so a doc sees the same shots in every trial and as ``lm_eval`` shows it.
FEWSHOT_SEED = 1234
#: Metrics whose per-doc values are 0 or 1 (a hit rate, with a binomial error).
_BINARY = frozenset({"acc", "acc_norm", "exact_match", "acc_mutual_info", "mcc_binary"})
SPLITS = ("search", "held_out")


def _require_lm_eval(where: str) -> None:
    try:
        import lm_eval  # noqa: F401
    except ImportError:
        raise ConfigError(
            f"{where} is an lm-eval task, which needs lm-evaluation-harness: pip install 'mergeopt[lmeval]'"
        ) from None
    # Tasks read local files; nothing is fetched from a hub unless the user says so.
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    logging.getLogger("lm_eval").setLevel(logging.ERROR)


@dataclass
class HarnessTask:
    """One lm-eval objective: the harness's task objects, the docs of each split, the number to read."""

    name: str
    direction: str
    key: str  # the harness's result key, "metric,filter"
    top: str  # the task or group the key is read from
    binary: bool
    #: The score is the plain mean over docs (every leaf's aggregation is a mean, a group weighs
    #: its tasks by size): a score of part of the docs then combines into the whole's
    #: (:func:`objectives.metrics.combine`), which early rejection needs.
    mean_of_docs: bool
    #: split -> the loaded task dict (``TaskManager.load``'s tasks / groups / group_map)
    loaded: dict[str, dict[str, Any]]
    #: split -> leaf task -> doc ids (indices into the task's evaluation docs)
    docs: dict[str, dict[str, list[int]]]
    settings: LmEvalConfig
    tokenizer: Any  # the base's, as the harness's hf model would load it
    max_length: int
    texts_cache: dict[str, list[str]] = field(default_factory=dict)

    @property
    def metric_name(self) -> str:
        return self.key.split(",")[0]

    @property
    def filter(self) -> str:
        return self.key.split(",")[1]

    def size(self, split: str) -> int:
        return sum(len(ids) for ids in self.docs[split].values())

    def items(self, split: str) -> list[tuple[str, int]]:
        """The split's docs as (leaf task, doc id), in a fixed order: item i of a subset."""
        return [(leaf, i) for leaf, ids in self.docs[split].items() for i in ids]

    def texts(self, split: str = "search") -> list[str]:
        """Each doc's question as the task writes it (no shots, no chat turns): what methods that
        measure activations (RegMean, HILA) run through the models."""
        if split not in self.texts_cache:
            out = []
            for leaf, ids in self.docs[split].items():
                task = self.loaded[split]["tasks"][leaf]
                docs = task.eval_docs
                out += [str(task.doc_to_text(docs[i])) for i in ids]
            self.texts_cache[split] = out
        return self.texts_cache[split]


def _manager(include_path: Path | None, with_defaults: bool) -> Any:
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=str(include_path) if include_path else None, include_defaults=with_defaults)


def _load(manager: Any, spec: str, where: str, task: str) -> dict[str, Any]:
    try:
        return dict(manager.load([spec]))
    except Exception as exc:  # the harness raises whatever its dataset loader raised
        text = str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
        if any(s in text for s in ("offline", "Offline", "hub", "Hub", "Couldn't reach", "huggingface.co")):
            raise DataError(
                f"{where}: lm-eval task {task!r} wants its data from a hub ({text}); make it local: in its"
                " YAML set dataset_path: json and dataset_kwargs: {data_files: {test: FILE.jsonl}}"
            ) from None
        raise DataError(f"{where}: lm-eval task {task!r} does not load ({text}); fix its YAML") from None


def _find(settings: LmEvalConfig, include: Path | None, where: str) -> Any:
    """The task manager that knows ``settings.task``: the include path first, then the built-ins."""
    manager = _manager(include, with_defaults=include is None)
    if settings.task in manager.all_tasks:
        return manager
    if include is not None:
        manager = _manager(include, with_defaults=True)
        if settings.task in manager.all_tasks:
            return manager
    near = difflib.get_close_matches(settings.task, manager.all_tasks, n=3)
    hint = f"; did you mean {', '.join(near)}?" if near else ""
    place = f" under {include} or" if include is not None else ""
    raise ConfigError(f"{where}: no lm-eval task or group {settings.task!r}{place} among the harness's tasks{hint}")


def _leaves(loaded: dict[str, Any], where: str) -> dict[str, Any]:
    tasks = dict(loaded["tasks"])
    if not tasks:
        raise ConfigError(f"{where}: lm-eval task {next(iter(loaded['groups']), '?')!r} holds no tasks")
    return tasks


#: A task's renderings of a doc from its YAML's Jinja templates. The harness compiles the template
#: anew for every doc on every evaluation (~1 ms each: most of its per-trial cost on small models);
#: a doc renders the same in every trial, so each task object remembers its renderings.
_RENDERERS = ("doc_to_text", "doc_to_target", "doc_to_choice")


def _remembered(render: Any) -> Any:
    memo: dict[str, Any] = {}

    def remembered(doc: Any, *args: Any, **kwargs: Any) -> Any:
        key = json.dumps([doc, args, kwargs], sort_keys=True, default=repr)
        if key not in memo:
            memo[key] = render(doc, *args, **kwargs)
        value = memo[key]
        return list(value) if isinstance(value, list) else value  # callers get a list of their own

    return remembered


def _prepare_leaf(task: Any, settings: LmEvalConfig, where: str) -> None:
    """What ``lm_eval``'s simple_evaluate does to a task before evaluating it (few-shot count); then
    what makes its per-trial cost small: renderings remembered per doc (:data:`_RENDERERS`), rows
    held as dicts. Both set attributes of the harness's task objects (lm-eval 0.4.13, pinned)."""
    for name in _RENDERERS:
        setattr(task, name, _remembered(getattr(task, name)))
    if task.config.process_docs is None and task.dataset is not None:
        # The harness walks every evaluation doc to pick the sampled ones, decoding each Arrow row
        # (~25 µs a row, every trial); rows held as dicts cost nothing to walk. A task whose
        # process_docs reshapes its Dataset keeps it.
        task.dataset = {split: list(rows) for split, rows in task.dataset.items()}
    name = task.config.task
    if settings.num_fewshot is not None and task.get_config("num_fewshot") != 0:
        task.set_config(key="num_fewshot", value=settings.num_fewshot)
    elif task.get_config("num_fewshot") is None:
        task.set_config(key="num_fewshot", value=0)
    if task.get_config("output_type") == "generate_until":
        kwargs = task.config.generation_kwargs or {}
        if kwargs.get("do_sample") or float(kwargs.get("temperature", 0.0) or 0.0) > 0.0:
            raise ConfigError(
                f"{where}: lm-eval task {name!r} samples its answers (do_sample / temperature); a search needs"
                " repeatable scores: set do_sample: false and temperature: 0 in its generation_kwargs"
            )


def _result_key(settings: LmEvalConfig, loaded: dict[str, Any], top: str, where: str) -> tuple[str, bool]:
    """The ``metric,filter`` key the objective reads, and whether higher is better."""
    group = loaded["groups"].get(top)
    if group is not None:
        aggs = list(group.aggregate_metric_list or [])
        if not aggs:
            raise ConfigError(
                f"{where}: lm-eval group {top!r} reports no aggregate score (aggregate_metric_list);"
                " name one of its tasks, or add aggregate_metric_list to the group's YAML"
            )
        keys = [f"{a.metric},{f}" for a in aggs for f in (a.filter_list or ["none"])]
        leaf = next(iter(loaded["tasks"].values()))
        higher = leaf.higher_is_better()
    else:
        leaf = loaded["tasks"][top]
        metrics = list(leaf.higher_is_better())
        filters = [f.name for f in leaf._filters] or ["none"]
        keys = [f"{m},{f}" for f in filters for m in metrics]
        higher = leaf.higher_is_better()
    metric = settings.metric or keys[0].split(",")[0]
    known_metrics = sorted({k.split(",")[0] for k in keys})
    if metric not in known_metrics:
        raise ConfigError(
            f"{where}: lm-eval task {top!r} reports no metric {metric!r}; choose one of: {', '.join(known_metrics)}"
        )
    filters = [k.split(",")[1] for k in keys if k.startswith(metric + ",")]
    chosen = settings.filter or filters[0]
    if chosen not in filters:
        raise ConfigError(
            f"{where}: lm-eval task {top!r} has no filter {chosen!r} for {metric}; choose one of: {', '.join(filters)}"
        )
    return f"{metric},{chosen}", bool(higher.get(metric, True))


def _mean_of_docs(loaded: dict[str, Any], top: str, metric: str) -> bool:
    group = loaded["groups"].get(top)
    if group is not None and not all(a.weight_by_size for a in group.aggregate_metric_list if a.metric == metric):
        return False
    return all(getattr(leaf.aggregation().get(metric), "__name__", "") == "mean" for leaf in loaded["tasks"].values())


def _split_docs(
    obj: ObjectiveConfig, loaded: dict[str, dict[str, Any]], seed: int, where: str
) -> dict[str, dict[str, list[int]]]:
    """Each split's doc ids per leaf task: disjoint, as :class:`~optimizer.config.LmEvalConfig` says."""
    docs: dict[str, dict[str, list[int]]] = {s: {} for s in SPLITS}
    limits = {"search": obj.limit, "held_out": obj.held_out_limit}
    if obj.lm_eval is not None and obj.lm_eval.split == "task":
        for split in SPLITS:
            for leaf, task in loaded[split]["tasks"].items():
                docs[split][leaf] = list(range(len(task.eval_docs)))[: limits[split]]
        return docs
    for leaf, task in loaded["search"]["tasks"].items():
        n = len(task.eval_docs)
        if n < 2:
            raise DataError(
                f"{where}: lm-eval task {leaf!r} has {n} evaluation doc(s); a search split and a held-out split"
                " need 2 or more"
            )
        order = list(range(n))
        random.Random(f"{seed}/{leaf}").shuffle(order)
        search_n = min(obj.limit or math.ceil(n / 2), n - 1)
        rest = order[search_n:]
        docs["search"][leaf] = sorted(order[:search_n])
        docs["held_out"][leaf] = sorted(rest[: obj.held_out_limit] if obj.held_out_limit else rest)
    return docs


def _task_splits(manager: Any, settings: LmEvalConfig, where: str) -> dict[str, dict[str, Any]]:
    """The loaded task dict of each split (``split: task``: search on validation, held out on test)."""
    held_out = _load(manager, settings.task, where, settings.task)
    if settings.split == "seeded":
        return {"search": held_out, "held_out": held_out}
    if held_out["groups"]:
        raise ConfigError(
            f"{where}: split: task reads one task's validation and test splits; for group {settings.task!r}"
            " use split: seeded"
        )
    task = held_out["tasks"][settings.task]
    validation, test = task.config.validation_split, task.config.test_split
    if not (validation and test and task.has_validation_docs() and task.has_test_docs()):
        raise ConfigError(
            f"{where}: split: task needs lm-eval task {settings.task!r} to have a validation_split and a"
            " test_split; add both to its YAML, or use split: seeded"
        )
    search = _load(manager, settings.task, where, settings.task)  # a second copy, evaluated on validation
    search["tasks"][settings.task].set_config(key="test_split", value=validation)
    return {"search": search, "held_out": held_out}


def load_harness_task(obj: ObjectiveConfig, config: StudyConfig, tokenizer: Any) -> HarnessTask:
    """Load and check one lm-eval objective (see the module docstring); nothing is written.

    ``tokenizer`` is the base model's."""
    settings = obj.lm_eval
    assert settings is not None, "load_harness_task takes an lm_eval objective"
    where = f"objective {obj.name!r}"
    _require_lm_eval(where)
    include = None
    if settings.include_path is not None:
        include = config.path(settings.include_path)
        if not include.is_dir():
            raise ConfigError(
                f"{where}: lm_eval.include_path {include} is not a folder; point it at the folder of the task YAMLs"
            )
    from objectives.harness_lm import max_length  # imports lm_eval: only once it is known to be there

    manager = _find(settings, include, where)
    loaded = _task_splits(manager, settings, where)
    leaves = {id(leaf): leaf for split in SPLITS for leaf in _leaves(loaded[split], where).values()}
    for leaf in leaves.values():  # a seeded split shares its task objects between the two splits
        _prepare_leaf(leaf, settings, where)
    top = settings.task
    key, higher = _result_key(settings, loaded["held_out"], top, where)
    docs = _split_docs(obj, loaded, config.search.seed, where)
    for split in SPLITS:
        if not any(docs[split].values()):
            raise DataError(f"{where}: lm-eval task {top!r} leaves no docs for the {split} split; lower limit")
    return HarnessTask(
        name=obj.name,
        direction="maximize" if higher else "minimize",
        key=key,
        top=top,
        binary=key.split(",")[0] in _BINARY,
        mean_of_docs=_mean_of_docs(loaded["held_out"], top, key.split(",")[0]),
        loaded=loaded,
        docs=docs,
        settings=settings,
        tokenizer=tokenizer,
        max_length=max_length(config.path(config.base)),  # the harness's own rule
    )


def _merged(dicts: Sequence[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {"tasks": {}, "groups": {}, "group_map": {}}
    for d in dicts:
        for part in out:
            out[part].update(d.get(part) or {})
    return out


def score_harness(
    engine: Engine,
    tasks: Sequence[HarnessTask],
    split: str,
    subsets: Sequence[Sequence[int]] | None = None,
) -> list[MetricResult]:
    """Every lm-eval objective's score on ``split``, in one ``lm_eval.evaluate`` (one request batch
    per request kind for all of them) of :class:`~objectives.harness_lm.EngineLM` on ``engine``.

    ``subsets``: per task, the items (:meth:`HarnessTask.items`) to score instead of the whole
    split (early rejection's stages); a part's score is then the mean over its docs, for
    :func:`~objectives.metrics.combine` to join. Objectives that share settings (chat template,
    system instruction) share the call; the rare study whose lm-eval objectives differ in them
    costs one call per setting."""
    from lm_eval.evaluator import evaluate

    from objectives.harness_lm import EngineLM

    if not tasks:
        return []
    lm = EngineLM(engine, tasks[0].tokenizer, tasks[0].max_length)
    results: dict[str, MetricResult] = {}
    by_setting: dict[tuple[bool, str | None, bool], list[HarnessTask]] = {}
    for task in tasks:
        s = task.settings
        by_setting.setdefault((s.chat, s.system, s.fewshot_as_multiturn), []).append(task)
    docs = {t.name: t.docs[split] for t in tasks}
    if subsets is not None:
        for t, subset in zip(tasks, subsets, strict=True):
            items = t.items(split)
            part: dict[str, list[int]] = {}
            for i in sorted(subset):
                leaf, doc = items[i]
                part.setdefault(leaf, []).append(doc)
            docs[t.name] = part
    for (chat, system, multiturn), group in by_setting.items():
        task_dict = _merged([t.loaded[split] for t in group])
        samples = {leaf: ids for t in group for leaf, ids in docs[t.name].items()}
        if subsets is not None:  # only the leaves with docs in this part; scores read per doc
            task_dict = {"tasks": {k: v for k, v in task_dict["tasks"].items() if k in samples}, "groups": {}}
            task_dict["group_map"] = {}
        for leaf in task_dict["tasks"].values():
            leaf.set_fewshot_seed(seed=FEWSHOT_SEED)
        out = evaluate(
            lm,
            task_dict,
            samples=samples,
            bootstrap_iters=0,
            log_samples=True,
            system_instruction=system,
            apply_chat_template=chat,
            fewshot_as_multiturn=multiturn,
            verbosity="ERROR",
        )
        assert out is not None  # a single process is always rank 0
        for t in group:
            per = [
                float(sample[t.metric_name])
                for leaf in docs[t.name]
                for sample in out["samples"][leaf]
                if sample["filter"] == t.filter
            ]
            whole = subsets is None  # the harness's own aggregate; a part's is the mean of its docs
            value = float(out["results"][t.top][t.key]) if whole else sum(per) / max(len(per), 1)
            results[t.name] = MetricResult(value, per)
    return [results[t.name] for t in tasks]
