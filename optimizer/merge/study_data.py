"""Data a method measures once per study and every trial reuses (RegMean's Grams, ...).

Stored as one safetensors file per kind, keys ``<model>/<key>``, so any process (the CLI, a vLLM
worker, an export) loads it from a path without anything crossing a process boundary, and never
through pickle. :func:`bind` turns a registry method that ``needs`` such data into one bound to
the study's file.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

import torch

from optimizer.errors import ConfigError
from optimizer.merge._registry import MergeMethod, get_method

__all__ = ["bind", "data_file", "load_study_data", "read_meta", "save_study_data"]


def save_study_data(path: Path, per_model: Mapping[str, Mapping[str, torch.Tensor]], meta: Mapping) -> None:
    """Write atomically: a partial file would bind every later trial to wrong data."""
    from safetensors.torch import save_file

    tensors = {f"{model}/{key}": t.contiguous() for model, data in per_model.items() for key, t in data.items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    save_file(tensors, str(tmp), metadata={"mergeopt": json.dumps(dict(meta), sort_keys=True)})
    tmp.replace(path)


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


def data_file(data_dir: Path, needs: str) -> Path:
    """Where a study keeps the data of kind ``needs``."""
    return Path(data_dir) / f"{needs}.safetensors"


def bind(method: str | MergeMethod, models: tuple[str, ...], data_dir: Path | None, base: Path) -> MergeMethod:
    """``method`` ready to merge: bound to the study's data when it needs some.

    ``data_dir`` is the study's data folder; ``base`` the base model's directory (methods that
    split tensors into heads read its config).
    """
    record = get_method(method) if isinstance(method, str) else method
    if record.bind is None:
        return record
    data = data_file(data_dir, str(record.needs)) if data_dir is not None else None
    if data is None or not data.is_file():
        raise ConfigError(
            f"merge method {record.name!r} needs its {record.needs} measured first; run it through a study"
            " (`mergeopt search`), which measures and caches them next to the study"
        )
    return record.bind(load_study_data(Path(data), models), Path(base))
