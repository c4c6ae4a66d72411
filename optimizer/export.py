"""Export a trial as a transformers model directory that reproduces its scores.

The merged weights are rebuilt from the plan stored with the trial (not from its parameters),
with the same merge core the engine used, and written next to a copy of the base's config and
tokenizer. The directory appears atomically: it is assembled under a temporary name and renamed
at the end, so a failed export leaves nothing that looks like a model.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import optuna
import torch
from optuna.trial import TrialState

from optimizer.config import StudyConfig
from optimizer.errors import ConfigError, MergeoptError
from optimizer.merge import MergePlan, merge_state_dict, task_vectors
from optimizer.models import check_compatible, load_config, load_state_dict

__all__ = ["export_trial", "get_trial", "write_model_dir"]

_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def get_trial(study: optuna.Study, number: int) -> optuna.trial.FrozenTrial:
    """A COMPLETE trial by number, or a ConfigError that says which ones exist."""
    trials = {t.number: t for t in study.get_trials(deepcopy=False)}
    if number not in trials:
        raise ConfigError(f"study {study.study_name!r} has no trial {number} (trials 0..{len(trials) - 1})")
    trial = trials[number]
    if trial.state != TrialState.COMPLETE:
        raise ConfigError(f"trial {number} is {trial.state.name}, not COMPLETE; export a complete trial")
    if "plan" not in trial.user_attrs:
        raise ConfigError(f"trial {number} has no stored plan; was it made by mergeopt?")
    return trial


def _check_out_dir(out: Path) -> None:
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ConfigError(f"output {str(out)!r} already exists and is not empty; choose another --out or remove it")


def write_model_dir(out: Path, base_dir: Path, state: dict[str, torch.Tensor], extra: dict[str, object]) -> Path:
    """Write ``state`` as ``model.safetensors`` beside the base's config and tokenizer, atomically."""
    from safetensors.torch import save_file

    out = Path(out).resolve()
    _check_out_dir(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        for item in Path(base_dir).iterdir():
            if item.is_file() and not item.name.endswith(_WEIGHT_SUFFIXES) and "index.json" not in item.name:
                shutil.copy2(item, tmp / item.name)
        config = load_config(base_dir)
        dtype = _DTYPES.get(str(config.get("torch_dtype") or config.get("dtype") or "float32"), torch.float32)
        tensors = {k: v.to(dtype).contiguous() for k, v in state.items()}
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        (tmp / "mergeopt.json").write_text(json.dumps(extra, indent=2, sort_keys=True) + "\n")
        if out.exists():
            out.rmdir()  # empty, checked above
        os.replace(tmp, out)
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        raise MergeoptError(f"cannot write export to {out}: {exc.strerror or exc}; nothing was written") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def export_trial(study: optuna.Study, config: StudyConfig, number: int, out: Path) -> Path:
    """Merge trial ``number``'s plan on the CPU and write it as an HF model directory."""
    trial = get_trial(study, number)
    _check_out_dir(Path(out))
    plan = MergePlan.from_dict(trial.user_attrs["plan"])
    base_dir = config.path(config.base)
    base = load_state_dict(base_dir)
    specialists = []
    for name in plan.models:
        state = load_state_dict(config.path(config.models[name]))
        check_compatible(base, state, name)
        specialists.append(state)
    merged = merge_state_dict(plan, base, task_vectors(base, specialists))
    extra = {
        "study": study.study_name,
        "trial": number,
        "baseline": trial.user_attrs.get("baseline"),
        "values": dict(zip(study.metric_names or [], trial.values, strict=False)),
        "plan": plan.to_dict(),
    }
    return write_model_dir(Path(out), base_dir, merged, extra)
