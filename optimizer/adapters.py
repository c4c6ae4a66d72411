"""LoRA adapters (PEFT directories) as specialists: read, checked against the base, held low-rank.

A PEFT LoRA directory holds ``adapter_config.json`` and ``adapter_model.safetensors`` with, for
each adapted module ``m``, ``base_model.model.<m>.lora_A.weight`` (r × in) and ``…lora_B.weight``
(out × r); embeddings use ``lora_embedding_A`` (r × vocab) / ``lora_embedding_B`` (hidden × r),
their product transposed. The module's weight changes by s·B·A with s = α/r (α/√r under
rsLoRA; ``alpha_pattern`` / ``rank_pattern`` override per module). ``modules_to_save`` are stored
as full tensors (``base_model.model.<m>.weight``): dense deltas of those tensors. Where peft
saved the embedding it adapts (``<m>.base_layer.weight``), that copy is the adapter's view of the
base: a difference from the study's base is a dense delta too.

Variants whose weight change is not s·B·A (DoRA's magnitude vector, biases trained with the
adapter, fan-in-fan-out layouts, other PEFT types) are refused with one line, never approximated.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from optimizer.errors import ModelError
from optimizer.low_rank import LowRankDelta

__all__ = ["ADAPTER_CONFIG", "Adapter", "base_mismatch_warning", "is_adapter", "read_adapter"]

ADAPTER_CONFIG = "adapter_config.json"
_PREFIX = "base_model.model."
_WEIGHTS = "adapter_model.safetensors"
#: Config switches mergeopt does not model, and why each changes the weight update.
_UNSUPPORTED = {
    "use_dora": "DoRA rescales each column by a trained magnitude",
    "fan_in_fan_out": "fan-in-fan-out (Conv1D) layouts transpose the factors",
    "lora_bias": "it trains a bias beside the factors",
    "use_qalora": "QA-LoRA pools the input groups",
    "use_bdlora": "BD-LoRA's block-diagonal factors",
    "layer_replication": "it duplicates layers of the base",
    "trainable_token_indices": "it trains single embedding rows",
    "target_parameters": "it adapts raw parameters (MoE experts), not modules",
}


def is_adapter(path: Path) -> bool:
    """A PEFT adapter directory (it has ``adapter_config.json``), not a full model."""
    return (Path(path) / ADAPTER_CONFIG).is_file()


@dataclass(frozen=True)
class _Lora:
    a_key: str
    b_key: str
    scale: float
    embedding: bool


@dataclass
class Adapter:
    """One LoRA adapter: which base tensors it changes, and how (read lazily from its file)."""

    path: Path
    declared_base: str | None
    rank: int
    lora: dict[str, _Lora] = field(default_factory=dict)  # base tensor name → its factors
    full: dict[str, str] = field(default_factory=dict)  # base tensor name → full tensor in the file
    shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)  # every key of the file
    _handle: Any = field(default=None, repr=False, compare=False)

    @property
    def weights(self) -> Path:
        return self.path / _WEIGHTS

    def bytes_held(self, dtype_bytes: int) -> int:
        """What the engines hold for this adapter: its factors and full tensors, at ``dtype_bytes``."""
        return sum(math.prod(s) for s in self.shapes.values()) * dtype_bytes

    def check_against(self, base_shapes: Mapping[str, tuple[int, ...]], name: str) -> None:
        """Refuse an adapter whose modules the base lacks or whose factors do not fit its shapes."""
        for tensor, lora in self.lora.items():
            if tensor not in base_shapes:
                module = tensor.removesuffix(".weight")
                raise ModelError(
                    f"adapter {name!r} ({self.path}) adapts module {module!r}, which the base does not have;"
                    " it was trained on another architecture: use an adapter of this base"
                )
            a, b = self.shapes[lora.a_key], self.shapes[lora.b_key]
            implied = (a[1], b[0]) if lora.embedding else (b[0], a[1])
            if tuple(base_shapes[tensor]) != implied or a[0] != b[1]:
                raise ModelError(
                    f"adapter {name!r}: the factors of {tensor!r} make a {implied[0]}×{implied[1]} change, the base's"
                    f" tensor is {'×'.join(map(str, base_shapes[tensor]))}; it was trained on another base: use an"
                    " adapter of this base"
                )
        for tensor, key in self.full.items():
            if tensor not in base_shapes or tuple(base_shapes[tensor]) != self.shapes[key]:
                raise ModelError(
                    f"adapter {name!r}: its saved module {tensor!r} has shape {self.shapes[key]}, the base's is"
                    f" {base_shapes.get(tensor)}; it was trained on another base: use an adapter of this base"
                )

    def deltas(
        self, base: Mapping[str, torch.Tensor], *, dtype: torch.dtype, device: torch.device | str
    ) -> dict[str, LowRankDelta]:
        """This adapter's task vector for every tensor of ``base``, as factors (rank 0 where untouched)."""
        return {name: self.delta(name, b, dtype=dtype, device=device) for name, b in base.items()}

    def delta(self, name: str, base: torch.Tensor, *, dtype: torch.dtype, device: torch.device | str) -> LowRankDelta:
        """The task vector of one tensor (``base`` is the study base's), read from the open file."""
        f = self._file()
        shape = tuple(base.shape)
        dense_part = None
        if name in self.full:
            diff = f.get_tensor(self.full[name]).to(device=base.device, dtype=torch.float32) - base.float()
            if bool(diff.any()):
                dense_part = diff.to(dtype=dtype, device=device)
        lora = self.lora.get(name)
        if lora is None:
            zero = LowRankDelta.zero(shape, dtype, device)
            return zero if dense_part is None else LowRankDelta(zero.B, zero.A, 0.0, shape, dense_part=dense_part)
        a = f.get_tensor(lora.a_key).to(dtype=dtype, device=device)
        b = f.get_tensor(lora.b_key).to(dtype=dtype, device=device)
        return LowRankDelta(b, a, lora.scale, shape, transpose=lora.embedding, dense_part=dense_part)

    def _file(self) -> Any:
        """The adapter's safetensors file, opened (memory-mapped) once and kept open."""
        if self._handle is None:
            from safetensors import safe_open

            self._handle = safe_open(str(self.weights), framework="pt")
        return self._handle


def read_adapter(path: Path, name: str) -> Adapter:
    """Read and check an adapter directory's config and file layout (no weights are loaded)."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    config = _config(path, name)
    weights = path / _WEIGHTS
    if not weights.is_file():
        if (path / "adapter_model.bin").is_file():
            raise ModelError(
                f"adapter {name!r} ({path}) holds pickled weights (adapter_model.bin); mergeopt only reads"
                " safetensors (a pickle can run code). Re-save it with peft: model.save_pretrained(dir)"
            )
        raise ModelError(f"adapter {name!r} ({path}) has no {_WEIGHTS}; is the adapter directory complete?")
    try:
        with safe_open(str(weights), framework="pt") as f:
            shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}  # noqa: SIM118
    except (SafetensorError, OSError, ValueError) as exc:
        raise ModelError(f"{weights}: not a readable safetensors file ({exc}); re-save the adapter") from None
    r, alpha = int(config.get("r", 8)), float(config.get("lora_alpha", 8))
    rslora = bool(config.get("use_rslora", False))
    rank_pattern: dict[str, int] = config.get("rank_pattern") or {}
    alpha_pattern: dict[str, float] = config.get("alpha_pattern") or {}
    adapter = Adapter(path, config.get("base_model_name_or_path"), r, shapes=shapes)
    for key in shapes:
        if not key.startswith(_PREFIX):
            raise ModelError(f"adapter {name!r}: tensor {key!r} is not a PEFT LoRA weight; is this a LoRA adapter?")
        inner = key[len(_PREFIX) :]
        match = re.fullmatch(r"(.+)\.(lora_A|lora_B)\.weight|(.+)\.(lora_embedding_A|lora_embedding_B)", inner)
        if match is None:
            target = inner.replace(".base_layer.", ".")  # the embedding's saved base copy, or modules_to_save
            adapter.full[target] = key
            continue
        module = match.group(1) or match.group(3)
        kind = match.group(2) or match.group(4)
        if not kind.endswith("A"):
            continue
        embedding = kind.startswith("lora_embedding")
        b_key = key[: -len(inner)] + inner.replace(f".{kind}", f".{kind[:-1]}B")
        if b_key not in shapes:
            raise ModelError(f"adapter {name!r}: {key!r} has no matching {b_key!r}; the adapter file is incomplete")
        rank = shapes[key][0]
        module_alpha = _pattern(alpha_pattern, module, alpha)
        module_rank = int(_pattern(rank_pattern, module, rank))
        scale = module_alpha / (math.sqrt(module_rank) if rslora else module_rank)
        adapter.lora[f"{module}.weight"] = _Lora(key, b_key, scale, embedding)
    if not adapter.lora and not adapter.full:
        raise ModelError(f"adapter {name!r} ({path}) has no LoRA weights; is the adapter directory complete?")
    return adapter


def _config(path: Path, name: str) -> dict:
    try:
        config = json.loads((path / ADAPTER_CONFIG).read_text())
    except json.JSONDecodeError as exc:
        raise ModelError(f"{path / ADAPTER_CONFIG}: not valid JSON ({exc.msg} at line {exc.lineno})") from None
    peft_type = str(config.get("peft_type", "LORA")).upper()
    if peft_type != "LORA":
        raise ModelError(f"adapter {name!r} is a {peft_type} adapter; mergeopt merges LoRA adapters only")
    for key, why in _UNSUPPORTED.items():
        if config.get(key):
            raise ModelError(
                f"adapter {name!r} uses {key} ({why}); mergeopt merges plain LoRA only: merge it into its model"
                " with peft's merge_and_unload() and give that model instead"
            )
    if config.get("bias", "none") != "none":
        raise ModelError(
            f"adapter {name!r} trains biases (bias: {config['bias']!r}); mergeopt merges plain LoRA only: merge"
            " it into its model with peft's merge_and_unload() and give that model instead"
        )
    return config


def _pattern(patterns: Mapping[str, float], module: str, default: float) -> float:
    """peft's per-module override: a pattern matches the module's name or a dotted suffix of it."""
    for pattern, value in patterns.items():
        if re.fullmatch(rf"(.*\.)?(?:{pattern})", module):
            return value
    return default


def base_mismatch_warning(adapter: Adapter, base: Path, name: str) -> str | None:
    """A log line when the adapter says it was trained on another base (often a hub id for a copy)."""
    declared = adapter.declared_base
    if not declared:
        return None
    if Path(declared).expanduser().resolve() == Path(base).resolve() or Path(declared).name == Path(base).name:
        return None
    return (
        f"note: adapter {name!r} was trained on {declared!r}; merging it into {str(base)!r} (its shapes match:"
        " fine if that is a copy of the same model)"
    )
