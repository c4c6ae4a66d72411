"""Export a trial as a transformers model directory that reproduces its scores.

The merged weights are rebuilt from the plan stored with the trial (not from its parameters),
with the same merge core the engine used, and written next to a copy of the base's config and
tokenizer, a ``mergekit.yaml`` that rebuilds the same tensors with mergekit (for the methods
mergekit has), ``mergeopt.json`` (the plan: our own reproducible config) and a model card. The
directory appears atomically: it is assembled under a temporary name and renamed at the end, so a
failed export leaves nothing that looks like a model.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Mapping
from pathlib import Path

import optuna
import torch
from optuna.trial import TrialState
from safetensors import SafetensorError

from optimizer.atomic import building_dir
from optimizer.checkpoints import DTYPES, ModelSet, load_task_vectors, model_config
from optimizer.config import StudyConfig
from optimizer.errors import ConfigError, MergeoptError
from optimizer.merge import MergePlan, get_method, merge_state_dict
from optimizer.merge.study_data import bind
from optimizer.model_card import model_card
from optimizer.search import attrs
from optimizer.search.storage import study_url
from optimizer.search.study import load_study, located, study_config

__all__ = ["export_study_trial", "export_trial", "get_trial", "write_model_dir"]

_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")


def get_trial(study: optuna.Study, number: int) -> optuna.trial.FrozenTrial:
    """A COMPLETE trial by number, or a ConfigError that says which ones exist."""
    trials = {t.number: t for t in study.get_trials(deepcopy=False)}
    if number not in trials:
        raise ConfigError(f"study {study.study_name!r} has no trial {number} (trials 0..{len(trials) - 1})")
    trial = trials[number]
    if trial.state != TrialState.COMPLETE:
        raise ConfigError(f"trial {number} is {trial.state.name}, not COMPLETE; export a complete trial")
    if attrs.PLAN not in trial.user_attrs:
        raise ConfigError(f"trial {number} has no stored plan; was it made by mergeopt?")
    return trial


def _check_out_dir(out: Path) -> None:
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ConfigError(f"output {str(out)!r} already exists and is not empty; choose another --out or remove it")


def write_model_dir(
    out: Path,
    base_dir: Path,
    state: dict[str, torch.Tensor],
    extra: dict[str, object],
    files: Mapping[str, str] | None = None,
) -> Path:
    """Write ``state`` as ``model.safetensors`` beside the base's config and tokenizer, atomically.

    ``files`` are further text files (name → content) written into the same directory.
    """
    from safetensors.torch import save_file

    out = Path(out).resolve()
    _check_out_dir(out)
    try:
        with building_dir(out, umask_modes=True) as tmp:
            for item in Path(base_dir).iterdir():
                if item.is_file() and not item.name.endswith(_WEIGHT_SUFFIXES) and "index.json" not in item.name:
                    shutil.copy2(item, tmp / item.name)
            config = model_config(base_dir)
            dtype = DTYPES.get(str(config.get("torch_dtype") or config.get("dtype") or "float32"), torch.float32)
            tensors = {k: v.to(dtype).contiguous() for k, v in state.items()}
            save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
            (tmp / "mergeopt.json").write_text(json.dumps(extra, indent=2, sort_keys=True) + "\n")
            for name, text in (files or {}).items():
                (tmp / name).write_text(text)
    except (OSError, SafetensorError) as exc:  # safetensors reports a full disk as its own error
        reason = getattr(exc, "strerror", None) or str(exc).rsplit(": ", 1)[-1]
        raise MergeoptError(f"cannot write export to {out}: {reason}; nothing was written") from None
    return out


def export_trial(
    study: optuna.Study, config: StudyConfig, number: int, out: Path, *, storage_arg: str | None = None
) -> Path:
    """Merge trial ``number``'s plan on the CPU and write it as an HF model directory.

    ``storage_arg`` is how the user named the study on the command line, quoted back in the
    model card's reproduce command.
    """
    trial = get_trial(study, number)
    _check_out_dir(Path(out))
    plan = MergePlan.from_dict(trial.user_attrs[attrs.PLAN])
    base_dir = config.path(config.base)
    model_dirs = {name: config.path(config.models[name]) for name in plan.models}
    base, deltas = load_task_vectors(ModelSet(base_dir, model_dirs))
    method = bind(plan.method, plan.models, config.study_dir(), base_dir)
    merged = merge_state_dict(plan, base, deltas, method)
    values = dict(zip(study.metric_names or [], trial.values, strict=False))
    extra = {
        "study": study.study_name,
        "trial": number,
        "baseline": trial.user_attrs.get(attrs.BASELINE),
        "values": values,
        "plan": plan.to_dict(),
    }
    base_config = model_config(base_dir)
    num_layers = int(base_config.get("num_hidden_layers", 0))
    dtype = str(base_config.get("torch_dtype") or base_config.get("dtype") or "float32")
    files: dict[str, str] = {}
    has_mergekit = get_method(plan.method).mergekit is not None
    if has_mergekit:
        from optimizer.mergekit_yaml import to_yaml

        files["mergekit.yaml"] = to_yaml(
            plan, base_path=base_dir, model_paths=model_dirs, num_layers=num_layers, dtype=dtype
        )
    files["README.md"] = model_card(
        study=study.study_name,
        trial=number,
        label=trial.user_attrs.get(attrs.BASELINE),
        plan=plan,
        base=str(base_dir),
        models={name: str(path) for name, path in model_dirs.items()},
        num_layers=num_layers,
        search=values,
        held_out=study.user_attrs.get(attrs.HELD_OUT, {}).get(str(number)),
        storage_arg=storage_arg or f"studies/{study.study_name}",
        has_mergekit=has_mergekit,
    )
    return write_model_dir(Path(out), base_dir, merged, extra, files)


def export_study_trial(study: str, number: int, out: Path, *, name: str | None = None) -> Path:
    """``mergeopt export``: trial ``number`` of the study a user names (folder, file or URL)."""
    url = study_url(study)
    opened = load_study(url, name)
    return export_trial(opened, located(study_config(opened), url), number, out, storage_arg=study)
