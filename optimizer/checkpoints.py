"""Reading model directories: safetensors only, because a pickle from a stranger can run code.

The one place that opens a checkpoint: its weight files, its ``config.json``, its tensors (all of
them, or only their shapes from the headers), and the base + task vectors every engine and
export merges from. :class:`ModelSet` names the models a study merges.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Container, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from optimizer.adapters import Adapter, is_adapter, read_adapter
from optimizer.errors import ConfigError, ModelError
from optimizer.low_rank import Delta
from optimizer.vocab import RowMap, added_tokens, is_vocab_tensor, shown_tokens, vocab_delta, vocab_rows

__all__ = [
    "DTYPES",
    "CheckpointReader",
    "ModelSet",
    "check_compatible",
    "check_specialist",
    "load_state_dict",
    "load_task_vector",
    "load_task_vectors",
    "model_config",
    "read_shapes",
    "task_delta",
    "torch_dtype",
    "weight_files",
]

#: The dtypes a config, an engine or an export may name.
DTYPES: Mapping[str, torch.dtype] = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def torch_dtype(name: str | torch.dtype) -> torch.dtype:
    """The torch dtype called ``name`` (a dtype passes through); an unknown name lists the valid ones."""
    if isinstance(name, torch.dtype):
        return name
    if name not in DTYPES:
        raise ConfigError(f"dtype {name!r} is not known; use one of: {', '.join(DTYPES)}")
    return DTYPES[name]


@dataclass(frozen=True)
class ModelSet:
    """The models a study merges: the base and the specialists, by name, in a fixed order."""

    base: Path
    specialists: Mapping[str, Path]
    # Folder of the study's measured data (``<kind>.safetensors``: RegMean's Grams, HILA's
    # importances); engines bind the methods that need it (optimizer.merge.study_data).
    data_dir: Path | None = None

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(self.specialists)


def weight_files(model_dir: Path) -> list[Path]:
    """The safetensors files of a model directory; pickled weights are refused, not loaded."""
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise ModelError(f"model directory {str(model_dir)!r} does not exist; check the path in the config")
    files = sorted(model_dir.glob("*.safetensors"))
    if files:
        return files
    pickles = sorted(p.name for p in model_dir.glob("*.bin")) + sorted(p.name for p in model_dir.glob("*.pt"))
    if pickles:
        raise ModelError(
            f"model directory {str(model_dir)!r} holds pickled weights ({pickles[0]}); mergeopt only"
            " reads safetensors (a pickle can run code). Convert it with transformers:"
            " model.save_pretrained(dir, safe_serialization=True)"
        )
    raise ModelError(f"model directory {str(model_dir)!r} has no *.safetensors weight file")


def model_config(model_dir: Path) -> dict:
    """The model's ``config.json`` as a dict."""
    path = Path(model_dir) / "config.json"
    if not path.is_file():
        raise ModelError(f"model directory {str(model_dir)!r} has no config.json; is it a transformers model?")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ModelError(f"{path}: config.json is not valid JSON ({exc.msg} at line {exc.lineno})") from None


def iter_tensors(model_dir: Path, dtype: torch.dtype = torch.float32) -> Iterator[tuple[str, torch.Tensor]]:
    """``(name, tensor)`` of a model directory one at a time, cast to ``dtype``: a pass over a
    checkpoint that never holds more than one of its tensors (a tied head's copy is skipped)."""
    from safetensors import SafetensorError, safe_open

    tied = bool(model_config(model_dir).get("tie_word_embeddings"))
    for path in weight_files(model_dir):
        try:
            with safe_open(str(path), framework="pt") as f:
                for name in f.keys():  # noqa: SIM118  (safe_open is not a Mapping)
                    if tied and name == "lm_head.weight":
                        continue
                    tensor = f.get_tensor(name)
                    yield name, tensor.to(dtype) if tensor.is_floating_point() else tensor
        except (SafetensorError, OSError, ValueError) as exc:
            raise ModelError(f"{path}: not a readable safetensors file ({exc}); re-export the model") from None


def load_state_dict(model_dir: Path, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """All tensors of a model directory, cast to ``dtype``.

    A tied head is not a tensor of its own (the embedding is the head), exactly as the checkpoint,
    vLLM's loader and mergekit see it: merging the embedding merges the head.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    state: dict[str, torch.Tensor] = {}
    for path in weight_files(model_dir):
        try:
            shard = load_file(str(path))
        except (SafetensorError, OSError, ValueError) as exc:
            raise ModelError(f"{path}: not a readable safetensors file ({exc}); re-export the model") from None
        for name, tensor in shard.items():
            state[name] = tensor.to(dtype) if tensor.is_floating_point() else tensor
    if model_config(model_dir).get("tie_word_embeddings"):
        state.pop("lm_head.weight", None)  # some exporters store the tied copy too
    return state


def read_shapes(model_dir: Path) -> dict[str, tuple[int, ...]]:
    """Tensor shapes from the safetensors headers alone: validation without loading weights."""
    from safetensors import SafetensorError, safe_open

    shapes: dict[str, tuple[int, ...]] = {}
    for path in weight_files(model_dir):
        try:
            with safe_open(str(path), framework="pt") as f:
                for name in f.keys():  # noqa: SIM118  (safe_open is not a Mapping)
                    shapes[name] = tuple(f.get_slice(name).get_shape())
        except (SafetensorError, OSError, ValueError) as exc:
            raise ModelError(f"{path}: not a readable safetensors file ({exc}); re-export the model") from None
    if model_config(model_dir).get("tie_word_embeddings"):
        shapes.pop("lm_head.weight", None)
    return shapes


class CheckpointReader:
    """A model directory's tensors read one at a time, for work that must not hold a whole model.

    Opens every safetensors file once (memory-mapped) and reads a tensor only when asked; a tied
    head is left out, as :func:`load_state_dict` leaves it.
    """

    def __init__(self, model_dir: Path):
        from safetensors import SafetensorError, safe_open

        self._where: dict[str, object] = {}
        for path in weight_files(model_dir):
            try:
                handle = safe_open(str(path), framework="pt")
            except (SafetensorError, OSError, ValueError) as exc:
                raise ModelError(f"{path}: not a readable safetensors file ({exc}); re-export the model") from None
            for name in handle.keys():  # noqa: SIM118  (safe_open is not a Mapping)
                self._where[name] = handle
        if model_config(model_dir).get("tie_word_embeddings"):
            self._where.pop("lm_head.weight", None)

    def names(self) -> list[str]:
        """Tensor names in file order."""
        return list(self._where)

    def get(self, name: str, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """One tensor, floating ones cast to ``dtype``."""
        tensor = self._where[name].get_tensor(name)  # type: ignore[attr-defined]
        return tensor.to(dtype) if tensor.is_floating_point() else tensor


def _shape(x: torch.Tensor | tuple[int, ...]) -> tuple[int, ...]:
    return tuple(x.shape) if isinstance(x, torch.Tensor) else tuple(x)


def check_compatible(
    base: Mapping[str, torch.Tensor | tuple[int, ...]],
    other: Mapping[str, torch.Tensor | tuple[int, ...]],
    other_name: str,
    vocab_rows: int | RowMap | None = None,
) -> None:
    """Refuse a specialist whose tensors differ from the base, naming the first offender.

    Takes tensors or bare shapes (from :func:`read_shapes`), so configs are checked before
    any weight is loaded. With ``vocab_rows`` (the base tokenizer's rows), the embedding and LM
    head may differ in padding rows past it; with a :class:`~optimizer.vocab.RowMap` (another
    tokenizer), in any rows, as long as both hold every token row the map names (see
    :mod:`optimizer.vocab`).
    """
    for name, tensor in base.items():
        if name not in other:
            raise ModelError(
                f"model {other_name!r} lacks tensor {name!r} that the base has; all models must be"
                " fine-tunes of the same base architecture"
            )
        mine, theirs = _shape(tensor), _shape(other[name])
        if isinstance(vocab_rows, RowMap) and is_vocab_tensor(name) and mine[1:] == theirs[1:]:
            if not vocab_rows.fits(mine[0], theirs[0]):
                raise ModelError(
                    f"model {other_name!r}: tensor {name!r} has {theirs[0]} rows and the base {mine[0]}, fewer"
                    " than their tokenizers' ids need; save it after model.resize_token_embeddings(len(tokenizer))"
                )
            continue
        if isinstance(vocab_rows, int) and is_vocab_tensor(name) and mine[1:] == theirs[1:] and mine != theirs:
            if min(mine[0], theirs[0]) < vocab_rows:
                raise ModelError(
                    f"model {other_name!r}: tensor {name!r} has {theirs[0]} rows and the base {mine[0]},"
                    f" but the base's tokenizer has {vocab_rows} tokens; both need a row for every token"
                )
            continue  # they differ only in padding rows past the tokenizer
        if theirs != mine:
            raise ModelError(
                f"model {other_name!r}: tensor {name!r} has shape {_shape(other[name])}, the base"
                f" has {_shape(tensor)}; all models must be fine-tunes of the same base"
            )
    extra = sorted(set(other) - set(base))
    if extra:
        raise ModelError(
            f"model {other_name!r} has tensor {extra[0]!r} that the base lacks; all models must be"
            " fine-tunes of the same base architecture"
        )


def check_specialist(
    path: Path,
    name: str,
    base_shapes: Mapping[str, tuple[int, ...]],
    base_dir: Path | None = None,
    *,
    added_ok: bool = False,
) -> Adapter | None:
    """Refuse a specialist that does not fit the base, from headers alone; its :class:`Adapter` if it is one.

    With ``base_dir``, a full checkpoint's tokenizer is compared with the base's: its embedding may
    differ from the base's in padding rows, or, with another tokenizer, in the rows the two place by
    token. Tokens the base lacks are refused unless ``added_ok`` (a study's check against the user's
    base, before it builds the union vocabulary: :mod:`optimizer.union_vocab`).
    """
    if is_adapter(path):
        added = added_tokens(base_dir, path) if base_dir is not None else []
        if added:
            raise ModelError(
                f"adapter {name!r} adds tokens the base's tokenizer lacks ({shown_tokens(added)}); mergeopt"
                " builds the union vocabulary from full checkpoints only: merge the adapter into its base"
                " (peft's merge_and_unload, saved with its tokenizer) and name that folder instead"
            )
        adapter = read_adapter(path, name)
        adapter.check_against(base_shapes, name)
        return adapter
    rows = None
    if base_dir is not None:
        rows = vocab_rows(base_dir, path, name, added_ok=added_ok)
    check_compatible(base_shapes, read_shapes(path), name, rows)
    return None


def load_task_vector(
    base: Mapping[str, torch.Tensor],
    model_dir: Path,
    name: str,
    *,
    dtype: torch.dtype = torch.float32,
    shapes: Mapping[str, tuple[int, ...]] | None = None,
    vocab_rows: int | RowMap | None = None,
    narrow: Callable[[str, Delta], Delta] | None = None,
) -> dict[str, Delta]:
    """τ = θ − θ₀ of one specialist, for every tensor of ``base`` (on ``base``'s devices).

    A LoRA adapter's τ is returned as its factors (:class:`~optimizer.low_rank.LowRankDelta`),
    never expanded here: merges expand one tensor at a time.

    The specialist must match ``shapes`` (the whole base's; by default ``base``'s own tensors).
    ``vocab_rows`` places its embedding and head rows on the base's (:func:`optimizer.vocab.vocab_rows`).
    Its checkpoint is freed tensor by tensor as the deltas are formed, so loading N specialists
    never holds more than base + N task vectors + one checkpoint. ``narrow(name, tau)`` cuts each
    task vector as soon as it is formed (a tensor-parallel rank's slice).
    """
    cut = narrow if narrow is not None else (lambda _name, tau: tau)
    if is_adapter(model_dir):  # held as factors: a few percent of a dense task vector
        adapter = read_adapter(model_dir, name)
        adapter.check_against(shapes if shapes is not None else {k: tuple(v.shape) for k, v in base.items()}, name)
        device = next(iter(base.values())).device if base else "cpu"
        return {k: cut(k, tau) for k, tau in adapter.deltas(base, dtype=dtype, device=device).items()}
    state = load_state_dict(model_dir, dtype)
    check_compatible(
        shapes if shapes is not None else base,
        state if shapes is not None else {k: v for k, v in state.items() if k in base},
        name,
        vocab_rows,
    )
    return {k: cut(k, task_delta(state.pop(k), b, vocab_rows if is_vocab_tensor(k) else None)) for k, b in base.items()}


def task_delta(tensor: torch.Tensor, base: torch.Tensor, vocab_rows: int | RowMap | None = None) -> torch.Tensor:
    """θ − θ₀ of one tensor. ``vocab_rows`` only for the embedding or head: with a row count, on the
    base's rows where the tensors differ in padding; with a :class:`~optimizer.vocab.RowMap`, row by
    token."""
    if isinstance(vocab_rows, RowMap) or (tensor.shape != base.shape and vocab_rows is not None):
        return vocab_delta(tensor, base, vocab_rows)
    return tensor.to(base.device) - base


def load_task_vectors(
    models: ModelSet,
    *,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    keep: Container[str] | None = None,
    narrow: Callable[[str, Delta], Delta] | None = None,
) -> tuple[dict[str, torch.Tensor], dict[str, list[Delta]]]:
    """The base and every specialist's task vector, per tensor in ``models`` order: what a merge reads.

    Computed once per engine (never per trial), one specialist at a time. ``keep`` restricts the
    tensors to those an engine actually owns (a tied head appears once, as the embedding); every
    specialist is still checked against the whole base. ``narrow(name, tensor)`` cuts each task
    vector as it is formed, and the base at the end, to what a tensor-parallel rank keeps; the
    task vectors are formed against the whole base.
    """
    state = load_state_dict(models.base, dtype)
    shapes = {k: tuple(v.shape) for k, v in state.items()}
    base = {k: v.to(device) for k, v in state.items() if keep is None or k in keep}
    del state
    deltas: dict[str, list[Delta]] = {k: [] for k in base}
    for name, path in models.specialists.items():
        rows = vocab_rows(models.base, path, name)
        taus = load_task_vector(base, path, name, dtype=dtype, shapes=shapes, vocab_rows=rows, narrow=narrow)
        for k, tau in taus.items():
            deltas[k].append(tau)
    if narrow is not None:
        base = {k: narrow(k, v) for k, v in base.items()}  # type: ignore[misc]  # a dense tensor stays dense
    return base, deltas
