"""Data a method measures once per study and every trial reuses (RegMean's Grams, HILA's importances).

Stored as one safetensors file per kind beside the study, keys ``<model>/<key>``, so any process
(the CLI, a vLLM worker, an export) loads it from a path without anything crossing a process
boundary, and never through pickle. The file's metadata holds the key it was measured under: the
method's :meth:`StudyData.key`, its version and the models' fingerprints, so a changed model or
data set measures again (:func:`ensure`) and an unchanged one never does.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

import torch

from optimizer.atomic import write_file
from optimizer.errors import ConfigError
from optimizer.fingerprint import models_fingerprint
from optimizer.merge._registry import MergeMethod, StudyInputs, get_method

__all__ = ["bind", "data_file", "ensure", "load_study_data", "read_meta", "save_study_data"]


def data_file(data_dir: Path, kind: str) -> Path:
    """Where a study keeps the data of ``kind``."""
    return Path(data_dir) / f"{kind}.safetensors"


def save_study_data(path: Path, per_model: Mapping[str, Mapping[str, torch.Tensor]], meta: Mapping) -> None:
    """Write atomically: a partial file would bind every later trial to wrong data."""
    from safetensors.torch import save_file

    tensors = {f"{model}/{key}": t.contiguous() for model, data in per_model.items() for key, t in data.items()}
    metadata = {"mergeopt": json.dumps(dict(meta), sort_keys=True)}
    write_file(path, lambda tmp: save_file(tensors, str(tmp), metadata=metadata))


def read_meta(path: Path) -> dict | None:
    """The metadata the file was written with, or None when there is no readable file."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as fh:
            return json.loads((fh.metadata() or {}).get("mergeopt", "null"))
    except (OSError, SafetensorError, json.JSONDecodeError):
        return None


def load_study_data(path: Path, models: tuple[str, ...]) -> dict[str, dict[str, torch.Tensor]]:
    """model → ``key → tensor``, in ``models`` order."""
    from safetensors.torch import load_file

    flat = load_file(str(path))
    out: dict[str, dict[str, torch.Tensor]] = {m: {} for m in models}
    for name, tensor in flat.items():
        model, _, key = name.partition("/")
        if model in out:
            out[model][key] = tensor
    missing = [m for m, data in out.items() if not data]
    if missing:
        raise ConfigError(f"{path} holds no data for model {missing[0]!r}; delete the file so it is measured again")
    return out


def ensure(method: str | MergeMethod, inputs: StudyInputs, data_dir: Path) -> Path | None:
    """The study's data file for ``method``, measured now if missing or stale; None if it needs none."""
    record = get_method(method) if isinstance(method, str) else method
    spec = record.study_data
    if spec is None:
        return None
    models = inputs.models
    key = {
        "kind": spec.kind,
        "version": spec.version,
        "models": models_fingerprint(models.base, models.specialists, mode="stat"),
        "inputs": spec.key(inputs),
    }
    fingerprint = json.dumps(key, sort_keys=True)
    path = data_file(data_dir, spec.kind)
    meta = read_meta(path) if path.is_file() else None
    if meta and meta.get("fingerprint") == fingerprint:
        return path
    data = spec.measure(inputs)
    save_study_data(path, data, {"fingerprint": fingerprint, "kind": spec.kind, "models": list(models.names)})
    return path


def bind(method: str | MergeMethod, models: tuple[str, ...], data_dir: Path | None, base: Path) -> MergeMethod:
    """``method`` ready to merge: bound to the study's data when it needs some.

    ``data_dir`` is the study's data folder; ``base`` the base model's directory (methods that
    split tensors into heads read its config).
    """
    record = get_method(method) if isinstance(method, str) else method
    spec = record.study_data
    if spec is None or record.merge is not None:
        return record
    path = data_file(data_dir, spec.kind) if data_dir is not None else None
    if path is None or not path.is_file():
        raise ConfigError(
            f"merge method {record.name!r} needs its {spec.kind} measured first; run it through a study"
            " (`mergeopt search`), which measures and caches them next to the study"
        )
    from dataclasses import replace

    return replace(record, merge=spec.bind(load_study_data(path, models), Path(base)))
