"""Export a trial as a transformers model directory that reproduces its scores.

The merged weights are rebuilt from the plan stored with the trial (not from its parameters),
with the same merge core the engine used, and written next to a copy of the base's config and
tokenizer, a ``mergekit.yaml`` that rebuilds the same tensors with mergekit (for the methods
mergekit has), ``mergeopt.json`` (the plan: our own reproducible config) and a model card. A study
whose specialists added tokens exports from its union base (:mod:`optimizer.union_vocab`), so the
union tokenizer ships. The directory appears atomically: it is assembled under a temporary name
and renamed at the end, so a failed export leaves nothing that looks like a model.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator, Mapping
from pathlib import Path

import optuna
import torch
from optuna.trial import TrialState
from safetensors import SafetensorError

from optimizer.adapters import Adapter
from optimizer.atomic import building_dir
from optimizer.checkpoints import (
    DTYPES,
    CheckpointReader,
    ModelSet,
    check_specialist,
    model_config,
    read_shapes,
    task_delta,
    torch_dtype,
)
from optimizer.config import StudyConfig
from optimizer.errors import ConfigError, MergeoptError
from optimizer.families import Family, family_of
from optimizer.low_rank import Delta
from optimizer.merge import MergePlan, get_method
from optimizer.merge._registry import MergeMethod, number_option
from optimizer.merge.apply import merge_tensor, resolved_options
from optimizer.merge.plan import is_expert_scope
from optimizer.merge.study_data import bind
from optimizer.model_card import model_card
from optimizer.search import attrs
from optimizer.search.storage import study_url
from optimizer.search.study import load_study, located, study_config
from optimizer.shards import DEFAULT_MAX_SHARD_BYTES, TensorStream, write_shards
from optimizer.union_vocab import META as UNION_META
from optimizer.union_vocab import union_models
from optimizer.vocab import RowMap, is_vocab_tensor, vocab_rows

__all__ = ["base_dtype", "export_study_trial", "export_trial", "get_trial", "merged_stream", "write_model_dir"]

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
    state: Mapping[str, torch.Tensor] | TensorStream,
    extra: dict[str, object],
    files: Mapping[str, str] | None = None,
    dtype: str | None = None,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
) -> Path:
    """Write ``state`` as safetensors shards beside the base's config and tokenizer, atomically.

    ``state`` is a state dict or a :class:`TensorStream` (tensors made one at a time, never all
    held at once). One shard is ``model.safetensors``; more are ``model-0000k-of-N`` with their
    index. ``dtype`` is the weights' (default: the base's, as its ``config.json`` says); the copied
    ``config.json`` says the dtype written. ``files`` are further text files (name → content)
    written into the same directory.
    """
    out = Path(out).resolve()
    _check_out_dir(out)
    try:
        with building_dir(out, umask_modes=True) as tmp:
            for item in Path(base_dir).iterdir():
                skip = (
                    item.name.endswith(_WEIGHT_SUFFIXES)
                    or "index.json" in item.name
                    or item.name in ("config.json", UNION_META)
                )
                if item.is_file() and not skip:
                    shutil.copy2(item, tmp / item.name)
            config = model_config(base_dir)
            name = dtype or base_dtype(config)
            written = torch_dtype(name)
            config.update({"dtype": name, **({"torch_dtype": name} if "torch_dtype" in config else {})})
            (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
            stream = state if isinstance(state, TensorStream) else TensorStream.of(state)
            write_shards(tmp, stream, written, max_shard_bytes=max_shard_bytes)
            (tmp / "mergeopt.json").write_text(json.dumps(extra, indent=2, sort_keys=True) + "\n")
            for name, text in (files or {}).items():
                (tmp / name).write_text(text)
    except (OSError, SafetensorError) as exc:  # safetensors reports a full disk as its own error
        reason = getattr(exc, "strerror", None) or str(exc).rsplit(": ", 1)[-1]
        raise MergeoptError(f"cannot write export to {out}: {reason}; nothing was written") from None
    return out


def base_dtype(config: Mapping[str, object]) -> str:
    """The dtype a model's ``config.json`` names (float32 where it names none or an unknown one)."""
    name = str(config.get("torch_dtype") or config.get("dtype") or "float32")
    return name if name in DTYPES else "float32"


def merged_stream(plan: MergePlan, models: ModelSet, method: MergeMethod | None = None) -> TensorStream:
    """The merged model of ``plan`` as a stream, read from the checkpoints one tensor at a time."""
    base = CheckpointReader(models.base)
    shapes = read_shapes(models.base)
    specialists: list[tuple[CheckpointReader | Adapter, int | RowMap | None]] = []
    for name in plan.models:  # the models may have changed on disk since the study scored them
        path = models.specialists[name]
        adapter = check_specialist(path, name, shapes, models.base)
        specialists.append((adapter or CheckpointReader(path), vocab_rows(models.base, path, name)))
    method = method or get_method(plan.method)
    options = resolved_options(method, plan)
    family = family_of(model_config(models.base))

    def delta(source: CheckpointReader | Adapter, rows: int | RowMap | None, name: str, b: torch.Tensor) -> Delta:
        if isinstance(source, Adapter):
            return source.delta(name, b, dtype=torch.float32, device="cpu")
        return task_delta(source.get(name), b, rows if is_vocab_tensor(name) else None)

    def tensors() -> Iterator[tuple[str, torch.Tensor]]:
        for name in base.names():
            b = base.get(name)
            deltas = [delta(s, rows, name, b) for s, rows in specialists]
            yield name, merge_tensor(plan, name, b, deltas, method, options, family)

    return TensorStream({name: shapes[name] for name in base.names()}, tensors())


def mergekit_gap(method: MergeMethod, family: Family, plan: MergePlan) -> str | None:
    """Why mergekit cannot rebuild this merge (None where its YAML does, tensor for tensor)."""
    if method.mergekit is None:
        return f"mergekit has no `{method.name}` method"
    if method.mergekit in ("della", "della_linear"):
        eps = number_option(resolved_options(method, plan), "epsilon", 0.15, method.name)
        if any(0 < p.density < 1 and not eps < p.density < 1 - eps for p in plan.params.values()):
            return (
                f"mergekit refuses `{method.name}` densities within epsilon ({eps:g}) of 0 or 1, which"
                " this plan has (mergeopt narrows epsilon there)"
            )
    if any(is_expert_scope(scope) for scope in plan.params):
        return (
            "mergekit holds a layer's experts as one tensor, so it cannot give an expert (or the router)"
            " coefficients of its own"
        )
    if family.experts and method.uses_density:
        return (
            f"mergekit ranks the top-k share of `{method.name}` over all experts of a layer at once"
            " (one fused tensor), mergeopt over each expert's own tensor"
        )
    return None


def export_trial(
    study: optuna.Study,
    config: StudyConfig,
    number: int,
    out: Path,
    *,
    storage_arg: str | None = None,
    dtype: str | None = None,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
) -> Path:
    """Merge trial ``number``'s plan on the CPU and write it as an HF model directory.

    Tensor by tensor: each is read from the base and the specialists, merged and written into
    its shard, so the export holds one shard and one tensor's inputs, never a whole model.

    ``storage_arg`` is how the user named the study on the command line, quoted back in the
    model card's reproduce command. ``dtype`` is the weights' (default: the base's); float32
    keeps exactly what the engine scored, where a bf16 base rounds the merge.
    """
    if dtype is not None:
        torch_dtype(dtype)  # an unknown dtype is refused before any work
    trial = get_trial(study, number)
    _check_out_dir(Path(out))
    plan = MergePlan.from_dict(trial.user_attrs[attrs.PLAN])
    base_dir = config.path(config.base)
    model_dirs = {name: config.model_path(name) for name in plan.models}
    # Specialists that added tokens: the study merged over its union base, whose tokenizer ships.
    study_models = ModelSet(base_dir, {name: config.model_path(name) for name in config.models})
    merge_base = union_models(study_models, config.study_dir()).base
    method = bind(plan.method, plan.models, config.study_dir(), merge_base)
    merged = merged_stream(plan, ModelSet(merge_base, model_dirs), method)
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
    written = dtype or base_dtype(base_config)
    files: dict[str, str] = {}
    family = family_of(base_config)
    no_mergekit = mergekit_gap(get_method(plan.method), family, plan)
    if no_mergekit is None and merge_base != base_dir:
        no_mergekit = (
            "the specialists added tokens: mergeopt merged over its own union vocabulary, and mergekit builds"
            " its own (`tokenizer_source: union`), not checked to give the same token ids and rows"
        )
    if no_mergekit is None:
        from optimizer.mergekit_yaml import to_yaml

        files["mergekit.yaml"] = to_yaml(
            plan,
            base_path=base_dir,
            model_paths=model_dirs,
            num_layers=num_layers,
            dtype=written,
            family=family,
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
        no_mergekit=no_mergekit,
    )
    return write_model_dir(Path(out), merge_base, merged, extra, files, dtype=written, max_shard_bytes=max_shard_bytes)


def export_study_trial(
    study: str,
    number: int,
    out: Path,
    *,
    name: str | None = None,
    dtype: str | None = None,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
) -> Path:
    """``mergeopt export``: trial ``number`` of the study a user names (folder, file or URL)."""
    url = study_url(study)
    opened = load_study(url, name)
    config = located(study_config(opened), url)
    return export_trial(opened, config, number, out, storage_arg=study, dtype=dtype, max_shard_bytes=max_shard_bytes)
