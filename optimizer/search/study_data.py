"""Measure, once per study, the data a merge method needs.

- RegMean (``grams``): each linear layer's input Gram in each specialist, on its own task data.
- HILA (``importance``): each specialist answers its task's prompts (golden data, cached under
  ``golden/``), then every head's and MLP's delta is removed in turn and the loss change on that
  golden data measured (exact, not the first-order estimate: see optimizer.analysis.importance).

Measured with transformers in this process before any engine starts, on the search split only
(the held-out split must stay unseen), and cached beside the study with a fingerprint of the
models and data; a later run, a worker or an export reuses the file, and a changed model or
data set measures again.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from objectives.tasks import Task
from optimizer.config import StudyConfig
from optimizer.engines.base import ModelSet
from optimizer.merge import get_method
from optimizer.merge.study_data import data_file, read_meta, save_study_data

__all__ = ["ensure_study_data", "specialist_tasks", "study_data_path"]

_BATCH = 16
_MAX_EXAMPLES = 256  # per model: RegMean's Grams settle after a few hundred sequences


def study_data_path(config: StudyConfig) -> Path:
    return data_file(config.study_dir(), str(get_method(config.method).needs))


def specialist_tasks(config: StudyConfig, tasks: Sequence[Task]) -> dict[str, list[Task]]:
    """Each model's own tasks: those naming it as ``specialist``, or named like it; else all tasks."""
    named = {o.name: o.specialist for o in config.objectives}
    out: dict[str, list[Task]] = {}
    for model in config.models:
        own = [t for t in tasks if named.get(t.name) == model or (named.get(t.name) is None and t.name == model)]
        out[model] = own or list(tasks)
    return out


def _texts(task: Task) -> list[str]:
    prompt = getattr(task.metric, "prompt_field", "prompt")
    target = getattr(task.metric, "target_field", "target")
    out = []
    for ex in task.search:
        tail = ex.get(target)
        out.append(str(ex.get(prompt, "")) + (str(tail) if isinstance(tail, str) else ""))
    return out


def _fingerprint(config: StudyConfig, models: ModelSet, texts: dict[str, list[str]]) -> str:
    h = hashlib.sha256()
    h.update(config.method.encode())
    for path in [models.base, *models.specialists.values()]:
        for f in sorted(Path(path).glob("*.safetensors")):
            st = f.stat()
            h.update(f"{f.resolve()}:{st.st_size}:{st.st_mtime_ns}".encode())
    h.update(json.dumps(texts, sort_keys=True).encode())
    return h.hexdigest()


def _grams(model_dir: Path, texts: list[str], tokenizer_dir: Path) -> dict[str, torch.Tensor]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from optimizer.merge.regmean import collect_grams

    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    batches = (
        dict(tokenizer(texts[i : i + _BATCH], return_tensors="pt", padding=True)) for i in range(0, len(texts), _BATCH)
    )
    grams = collect_grams(model, batches)
    del model
    return grams


def ensure_study_data(
    config: StudyConfig, models: ModelSet, tasks: Sequence[Task], say: Callable[[str], None] = lambda _: None
) -> Path | None:
    """The study's data file for ``config.method`` (measured now if missing or stale), or None."""
    needs = get_method(config.method).needs
    if needs is None:
        return None
    if needs == "importance":
        return _ensure_importance(config, models, say)
    path = study_data_path(config)
    own = specialist_tasks(config, tasks)
    texts = {m: [text for task in own[m] for text in _texts(task)][:_MAX_EXAMPLES] for m in config.models}
    fingerprint = _fingerprint(config, models, texts)
    meta = read_meta(path) if path.is_file() else None
    if meta and meta.get("fingerprint") == fingerprint:
        return path
    per_model = {}
    for model, dir_ in models.specialists.items():
        say(f"measuring RegMean Grams of {model} on {len(texts[model])} search examples")
        per_model[model] = _grams(dir_, texts[model], models.base)
    save_study_data(path, per_model, {"fingerprint": fingerprint, "kind": needs, "models": list(config.models)})
    return path


def _ensure_importance(config: StudyConfig, models: ModelSet, say: Callable[[str], None]) -> Path:
    from objectives.golden import generate_golden, golden_by_specialist
    from optimizer.analysis.importance import importance_exact
    from optimizer.engines.hf_engine import HFEngine

    path = study_data_path(config)
    golden_dir = config.study_dir() / "golden"
    engine: list[HFEngine] = []

    def start() -> HFEngine:
        say("generating golden data: each specialist answers its task's prompts")
        engine.append(HFEngine(models))
        return engine[0]

    try:
        generate_golden(config, start, out_dir=golden_dir)  # cached: starts no engine when nothing changed
    finally:
        for e in engine:
            e.close()
    golden = golden_by_specialist(golden_dir)
    fingerprint = _fingerprint(
        config, models, {m: [json.dumps(r, sort_keys=True) for r in rows] for m, rows in golden.items()}
    )
    meta = read_meta(path) if path.is_file() else None
    if meta and meta.get("fingerprint") == fingerprint:
        return path
    say("measuring head and MLP importance on golden data (one loss per unit and specialist)")
    table = importance_exact(models, golden)
    per_model = {m: {u: torch.tensor(v, dtype=torch.float64) for u, v in row.items()} for m, row in table.items()}
    save_study_data(path, per_model, {"fingerprint": fingerprint, "kind": "importance", "models": list(config.models)})
    return path
