"""Golden data (HILA-Merging, ``docs/methods.md``): each specialist's own greedy answers to its task.

A merged candidate is scored on golden data by the NLL of the specialist's answers under teacher
forcing (metric ``nll``), or by whether it reproduces them (``exact_match``). That needs no
labels, and it measures exactly "does the merge still do what the specialist did", which is also
the loss HILA's head importance is measured with (:mod:`optimizer.analysis.importance`).

This module owns generating, caching and reading that data. The layout, one folder per task::

    <out_dir>/<task>/search.jsonl      {"prompt", "target" (golden), "original_target"}
    <out_dir>/<task>/held_out.jsonl
    <out_dir>/<task>/manifest.json     the cache key, the specialist, row counts and file hashes

so an objective points ``data:`` at :func:`golden_task_dir` and reads it with the default fields
and split names, whatever the source task called them. Files are written to a temporary name
and renamed, and the manifest is written last: a crash leaves a folder that the next run
regenerates, never a half-written one that looks valid.

The cache key holds everything the answers depend on: the specialist's name and a fingerprint of
its files and of the base's (the engine reads the tokenizer from the base), the prompts, the stop
strings and ``max_tokens``. See :mod:`optimizer.fingerprint` for what each fingerprint mode can miss.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING

from objectives.data import load_split
from optimizer.atomic import write_text
from optimizer.config import stated_specialist
from optimizer.errors import ConfigError, DataError
from optimizer.fingerprint import Mode, model_fingerprint
from optimizer.merge.plan import specialist_plan

if TYPE_CHECKING:
    from objectives.tasks import Task
    from optimizer.config import ObjectiveConfig, StudyConfig
    from optimizer.engines.base import Engine

__all__ = [
    "FORMAT_VERSION",
    "MANIFEST",
    "SPLITS",
    "generate_golden",
    "golden_by_specialist",
    "golden_task_dir",
    "read_manifest",
    "specialist_for",
]

#: Bumped when the files' meaning changes, so old caches are regenerated rather than misread.
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
#: The split names golden folders always use (the objective defaults), whatever the source's were.
SPLITS: tuple[str, str] = ("search", "held_out")


# --------------------------------------------------------------------------- which model answers


def specialist_for(objective: ObjectiveConfig, models: Sequence[str]) -> str:
    """The model whose answers are an objective's golden data: the one the config states
    (:func:`optimizer.config.stated_specialist`), which must exist here.

    Picking "the model that scores best" where the config is silent, as normalized gain does,
    would cost engine calls on every cache check and could silently change with the data, so an
    ambiguous objective must name its specialist.
    """
    named = stated_specialist(objective, tuple(models))
    if named is None:
        raise ConfigError(
            f"objective {objective.name!r}: no model is called {objective.name!r}, so golden data cannot tell which"
            f" specialist answers it; add 'specialist: NAME' to the objective (one of: {', '.join(models)})"
        )
    if named not in models:
        raise ConfigError(
            f"objective {objective.name!r} names specialist {named!r}, which is not among the models"
            f" ({', '.join(models)}); use one of those names"
        )
    return named


# --------------------------------------------------------------------------- paths and reading


def golden_task_dir(cache_dir: Path, task: str) -> Path:
    """The folder an objective's ``data:`` points at to use ``task``'s golden data."""
    return Path(cache_dir) / task


def read_manifest(task_dir: Path) -> dict | None:
    """A golden folder's manifest, or None where there is none (or it is unreadable: regenerate)."""
    path = Path(task_dir) / MANIFEST
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    return data if isinstance(data, dict) else None


def golden_by_specialist(cache_dir: Path, split: str = "search") -> dict[str, list[dict]]:
    """Specialist name → its golden rows over every task it answers (what importance is measured on)."""
    out: dict[str, list[dict]] = {}
    folders = sorted(p for p in Path(cache_dir).iterdir() if p.is_dir()) if Path(cache_dir).is_dir() else []
    for task_dir in folders:
        manifest = read_manifest(task_dir)
        if manifest is None or manifest.get("format") != FORMAT_VERSION:
            continue
        out.setdefault(str(manifest["specialist"]), []).extend(load_split(task_dir, split))
    if not out:
        raise DataError(f"{cache_dir}: holds no golden data; generate it first with `mergeopt golden CONFIG`")
    return out


# --------------------------------------------------------------------------- writing


def _sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def _jsonl(rows: Iterable[Mapping[str, object]]) -> str:
    return "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)


def _valid(task_dir: Path, manifest: dict | None, key: Mapping[str, object]) -> bool:
    """A cache hit: same key, and each split file is still the one the manifest describes."""
    if manifest is None or manifest.get("key") != key:
        return False
    for split in SPLITS:
        entry = manifest.get("splits", {}).get(split, {})
        file = task_dir / f"{split}.jsonl"
        if not file.is_file() or _sha256_text(file.read_text(encoding="utf-8")) != entry.get("sha256"):
            return False
    return True


def generate_golden(
    config: StudyConfig,
    tasks: Sequence[Task],
    engine: Engine,
    *,
    out_dir: Path,
    max_tokens: int | None = None,
    fingerprint: Mode = "stat",
    force: bool = False,
) -> dict[str, Path]:
    """Write (or find cached) golden data for every objective of ``config``; task → its folder.

    ``config``'s objectives are the *source* tasks (``tasks``, as loaded from it: their prompts;
    the study that scores on golden data then points its objectives at the folders returned here).
    Each objective's specialist (:func:`specialist_for`) answers the objective's search and held-out
    prompts (after its ``limit``s) greedily through ``engine``, with the objective's ``stop`` and
    ``max_tokens`` (or ``max_tokens`` given here). ``engine`` must hold the config's models in the
    config's order, since it is asked for one specialist at a time; pass a lazily started one
    (:func:`optimizer.engines.lazy_engine`), so that a run that finds everything cached never
    starts it (tens of seconds for vLLM).

    A task whose folder holds a manifest with the same cache key is skipped without any engine
    call; ``force`` regenerates regardless. The engine keeps the last specialist applied.
    """
    names = tuple(config.models)
    if tuple(engine.models.names) != names:
        raise ConfigError(
            f"the engine holds models {', '.join(engine.models.names)} but the config lists"
            f" {', '.join(names)}; build the engine from this config"
        )
    base_dir = config.path(config.base)
    model_dirs = {name: config.model_path(name) for name in config.models}
    by_name = {t.name: t for t in tasks}
    out_dir = Path(out_dir)
    base_fp = model_fingerprint(base_dir, mode=fingerprint)
    model_fps: dict[str, str] = {}
    written: dict[str, Path] = {}
    for obj in config.objectives:
        task = by_name[obj.name]
        model = specialist_for(obj, names)
        if model not in model_fps:
            model_fps[model] = model_fingerprint(model_dirs[model], mode=fingerprint)
        limit = max_tokens if max_tokens is not None else obj.max_tokens
        if limit < 1:
            raise ConfigError(f"golden max_tokens={limit}: must be a positive number of tokens")
        # The prompts as the task renders them (template, shots, chat template, BOS): the golden
        # answers are what the specialist says to exactly what a trial asks.
        fmt = task.metric.format
        prompts = {split: [fmt.prompt(ex) for ex in task.examples(split)] for split in SPLITS}
        key = {
            "format": FORMAT_VERSION,
            "specialist": model,
            "fingerprint": fingerprint,
            "specialist_weights": model_fps[model],
            "base_weights": base_fp,
            "prompts": _sha256_text(json.dumps(prompts, ensure_ascii=False)),
            "stop": list(obj.stop),
            "max_tokens": limit,
        }
        task_dir = golden_task_dir(out_dir, obj.name)
        written[obj.name] = task_dir
        if not force and _valid(task_dir, read_manifest(task_dir), key):
            continue
        # Drop the old manifest first: if generation dies below, no stale manifest vouches for new files.
        (task_dir / MANIFEST).unlink(missing_ok=True)
        engine.apply_plan(specialist_plan(names, model))
        splits: dict[str, dict[str, object]] = {}
        for split in SPLITS:
            answers = engine.generate(prompts[split], max_tokens=limit, stop=list(obj.stop))
            rows = []
            for ex, prompt, answer in zip(task.examples(split), prompts[split], answers, strict=True):
                row: dict[str, object] = {"prompt": prompt, "target": answer}
                if obj.target_template is not None or obj.target_field in ex:
                    row["original_target"] = fmt.target(ex)
                rows.append(row)
            text = _jsonl(rows)
            write_text(task_dir / f"{split}.jsonl", text)
            splits[split] = {
                "rows": len(rows),
                "empty": sum(not a for a in answers),  # an empty answer has no tokens to score
                "sha256": _sha256_text(text),
            }
        manifest = {
            "format": FORMAT_VERSION,
            "task": obj.name,
            "specialist": model,
            "key": key,
            "splits": splits,
            "engine": engine.name,
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        }
        write_text(task_dir / MANIFEST, json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    return written
