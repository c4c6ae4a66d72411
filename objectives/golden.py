"""Golden data (HILA-Merging, METHODS.md seed 4): each specialist's own greedy answers to its task.

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
strings and ``max_tokens``. See :func:`weights_fingerprint` for what the fingerprint can miss.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import struct
import tempfile
from collections.abc import Callable, Iterable, Mapping, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from objectives.data import load_split
from optimizer.errors import ConfigError, DataError, ModelError
from optimizer.models import weight_files

if TYPE_CHECKING:
    from objectives.tasks import Task
    from optimizer.config import ObjectiveConfig, StudyConfig
    from optimizer.engines.base import Engine
    from optimizer.search.prepare import Prepared

__all__ = [
    "FORMAT_VERSION",
    "MANIFEST",
    "SPLITS",
    "generate_golden",
    "golden_by_specialist",
    "golden_task_dir",
    "load_golden",
    "read_manifest",
    "specialist_for",
    "weights_fingerprint",
]

#: Bumped when the files' meaning changes, so old caches are regenerated rather than misread.
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
#: The split names golden folders always use (the objective defaults), whatever the source's were.
SPLITS: tuple[str, str] = ("search", "held_out")

Fingerprint = Literal["stat", "content"]

# Small files next to the weights that change what the model generates; hashed in full.
_SIDE_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json")
_CHUNK = 16 * 2**20


# --------------------------------------------------------------------------- fingerprints


def weights_fingerprint(model_dir: Path, *, mode: Fingerprint = "stat") -> str:
    """A hex digest that changes when the model in ``model_dir`` changes.

    ``"stat"`` (the default) hashes each safetensors file's header (tensor names, dtypes, shapes,
    offsets) with its size and modification time in nanoseconds. It reads a few kilobytes, so a
    cache hit stays instant for a 70B model; it misses a rewrite that keeps the file's size and
    its mtime (``cp -p``/``rsync -t`` of another checkpoint of the same architecture over this
    one, or an mtime restored by hand), and it regenerates needlessly after a plain ``touch`` or
    copy, which is the safe direction. ``"content"`` hashes every byte of every weight file:
    exact, at the price of reading the whole model (roughly 10-30 s per 7B model) on every call,
    hit or miss. Both include the small config and tokenizer files in full.
    """
    if mode not in ("stat", "content"):
        raise ConfigError(f"fingerprint mode {mode!r} is not known; use 'stat' or 'content'")
    digest = hashlib.sha256(f"mergeopt-golden-fingerprint/{mode}".encode())
    for path in weight_files(Path(model_dir)):
        digest.update(path.name.encode() + b"\0")
        if mode == "content":
            with path.open("rb") as f:
                while chunk := f.read(_CHUNK):
                    digest.update(chunk)
        else:
            stat = path.stat()
            digest.update(f"{stat.st_size}:{stat.st_mtime_ns}:".encode())
            digest.update(_safetensors_header(path))
    for name in _SIDE_FILES:
        side = Path(model_dir) / name
        if side.is_file():
            digest.update(name.encode() + b"\0" + hashlib.sha256(side.read_bytes()).digest())
    return digest.hexdigest()


def _safetensors_header(path: Path) -> bytes:
    # A safetensors file starts with the header's length (u64, little endian), then the JSON header.
    with path.open("rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise ModelError(f"{path}: too short to be a safetensors file; re-export the model")
        (length,) = struct.unpack("<Q", raw)
        return raw + f.read(min(length, 100 * 2**20))


# --------------------------------------------------------------------------- which model answers


def specialist_for(objective: ObjectiveConfig | object, models: Sequence[str]) -> str:
    """The model whose answers are an objective's golden data.

    The objective's ``specialist`` field when set, else the model with the objective's name, else
    the only model. Picking "the model that scores best" instead would cost engine calls on every
    cache check and could silently change with the data, so an ambiguous objective must name its
    specialist.
    """
    name = str(getattr(objective, "name", objective))
    named = getattr(objective, "specialist", None)
    if named:
        if named not in models:
            raise ConfigError(
                f"objective {name!r} names specialist {named!r}, which is not among the models"
                f" ({', '.join(models)}); use one of those names"
            )
        return str(named)
    if name in models:
        return name
    if len(models) == 1:
        return models[0]
    raise ConfigError(
        f"objective {name!r}: no model is called {name!r}, so golden data cannot tell which specialist"
        f" answers it; add 'specialist: NAME' to the objective (one of: {', '.join(models)})"
    )


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


def load_golden(cache_dir: Path, task: str, split: str = "search") -> list[dict]:
    """The golden rows of one task and split (``prompt``, ``target``, maybe ``original_target``)."""
    task_dir = golden_task_dir(cache_dir, task)
    if read_manifest(task_dir) is None:
        raise DataError(
            f"{task_dir}: no golden data for task {task!r} (no {MANIFEST}); generate it first with"
            " `mergeopt golden CONFIG`"
        )
    return load_split(task_dir, split)


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


def _atomic_write(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` so readers see the old file or the new one, never a partial one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


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


def _prepared(source: Prepared | StudyConfig) -> tuple[StudyConfig, Path, Mapping[str, Path], list[Task]]:
    if hasattr(source, "tasks") and hasattr(source, "config"):
        return source.config, source.models.base, source.models.specialists, list(source.tasks)
    from objectives.tasks import load_tasks
    from optimizer.search.prepare import check_models

    # Models and tasks only: a full prepare() would measure the method's study data, which for
    # HILA is built from this very golden data.
    models, _ = check_models(source)  # type: ignore[arg-type]
    return source, models.base, models.specialists, load_tasks(source)  # type: ignore[return-value]


def generate_golden(
    source: Prepared | StudyConfig,
    engine: Engine | Callable[[], Engine],
    *,
    out_dir: Path,
    max_tokens: int | None = None,
    fingerprint: Fingerprint = "stat",
    force: bool = False,
) -> dict[str, Path]:
    """Write (or find cached) golden data for every objective of ``source``; task → its folder.

    ``source`` is a prepared study or a config whose objectives are the *source* tasks (their
    prompts; the study that scores on golden data then points its objectives at the folders
    returned here). Each objective's specialist (:func:`specialist_for`) answers the objective's
    search and held-out prompts (after its ``limit``s) greedily through ``engine``, with the
    objective's ``stop`` and ``max_tokens`` (or ``max_tokens`` given here). ``engine`` must hold the
    config's models in the config's order, since it is asked for one specialist at a time; it may
    be a zero-argument factory, called only when some task misses the cache, so that a run that
    finds everything cached never starts an engine (tens of seconds for vLLM).

    A task whose folder holds a manifest with the same cache key is skipped without any engine
    call; ``force`` regenerates regardless. The engine keeps the last specialist applied.
    """
    from optimizer.search.baselines import baseline_plans

    config, base_dir, model_dirs, tasks = _prepared(source)
    names = tuple(config.models)
    started: list[Engine] = []

    def get_engine() -> Engine:
        if not started:
            e = engine() if callable(engine) else engine
            if tuple(e.models.names) != names:
                raise ConfigError(
                    f"the engine holds models {', '.join(e.models.names)} but the config lists"
                    f" {', '.join(names)}; build the engine from this config"
                )
            started.append(e)
        return started[0]

    if not callable(engine):
        get_engine()  # a wrong engine is a mistake even when everything is cached
    plans = baseline_plans(names)
    by_name = {t.name: t for t in tasks}
    out_dir = Path(out_dir)
    base_fp = weights_fingerprint(base_dir, mode=fingerprint)
    model_fps: dict[str, str] = {}
    written: dict[str, Path] = {}
    for obj in config.objectives:
        task = by_name[obj.name]
        model = specialist_for(obj, names)
        if model not in model_fps:
            model_fps[model] = weights_fingerprint(model_dirs[model], mode=fingerprint)
        limit = max_tokens if max_tokens is not None else obj.max_tokens
        if limit < 1:
            raise ConfigError(f"golden max_tokens={limit}: must be a positive number of tokens")
        prompts = {split: [str(ex[obj.prompt_field]) for ex in task.examples(split)] for split in SPLITS}
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
        live = get_engine()
        live.apply_plan(plans[f"specialist:{model}"])
        splits: dict[str, dict[str, object]] = {}
        for split in SPLITS:
            answers = live.generate(prompts[split], max_tokens=limit, stop=list(obj.stop))
            rows = []
            for ex, prompt, answer in zip(task.examples(split), prompts[split], answers, strict=True):
                row: dict[str, object] = {"prompt": prompt, "target": answer}
                if obj.target_field in ex:
                    row["original_target"] = ex[obj.target_field]
                rows.append(row)
            text = _jsonl(rows)
            _atomic_write(task_dir / f"{split}.jsonl", text)
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
            "engine": type(live).__name__,
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        }
        _atomic_write(task_dir / MANIFEST, json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    return written
