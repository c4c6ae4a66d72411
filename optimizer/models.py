"""What a tensor is: the one place that maps checkpoint tensor names to layers and module kinds.

Every other part of mergeopt (search-space names, merge plans, exports) asks this module which
layer a tensor belongs to and whether it is attention, MLP, embedding or head, so supporting a
new architecture family means teaching only this file its tensor names. It also reads model
directories: safetensors only, because a pickle from a stranger can run code.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from optimizer.errors import ModelError

__all__ = [
    "KINDS",
    "TensorInfo",
    "check_compatible",
    "describe",
    "layer_key",
    "load_config",
    "load_state_dict",
    "num_layers",
    "read_shapes",
    "weight_files",
]

#: Module kinds a plan can address. ``embed`` is the token embedding, ``head`` the final norm
#: and the LM head; per-layer norms belong to the block they feed (``attn`` or ``mlp``).
KINDS: tuple[str, ...] = ("attn", "mlp", "embed", "head")

# Llama / Mistral / Qwen2 / Qwen3 share these names in transformers checkpoints.
_LAYER_RE = re.compile(r"^(?:model\.)?layers\.(\d+)\.(.+)$")
_ATTN_ROLES = ("q_proj", "k_proj", "v_proj", "o_proj", "q_norm", "k_norm")
_MLP_ROLES = ("gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True, slots=True)
class TensorInfo:
    """Where one tensor sits in the network.

    ``layer`` is None for tensors outside the decoder stack; ``role`` is the module's own name
    (``q_proj``, ``input_layernorm``, ``lm_head``...), which methods such as RegMean or head-level
    importance need beyond the coarse ``kind``.
    """

    name: str
    layer: int | None
    kind: str
    role: str


def describe(name: str) -> TensorInfo:
    """Classify a checkpoint tensor name, or raise if the architecture family is unknown."""
    m = _LAYER_RE.match(name)
    if m:
        layer, rest = int(m.group(1)), m.group(2)
        module = rest.split(".")[-2] if "." in rest else rest
        if rest.startswith("self_attn.") or module == "input_layernorm":
            return TensorInfo(name, layer, "attn", module)
        if rest.startswith("mlp.") or module == "post_attention_layernorm":
            return TensorInfo(name, layer, "mlp", module)
        raise ModelError(
            f"tensor {name!r}: unknown module in layer {layer}; mergeopt knows Llama/Mistral/Qwen2"
            " style names (self_attn.*, mlp.*, *_layernorm)"
        )
    if name.endswith("embed_tokens.weight"):
        return TensorInfo(name, None, "embed", "embed_tokens")
    if name in ("lm_head.weight", "model.norm.weight", "norm.weight"):
        return TensorInfo(name, None, "head", name.split(".")[-2])
    raise ModelError(
        f"tensor {name!r} is not a Llama/Mistral/Qwen2 style name; mergeopt cannot place it in"
        " a layer (supported: embed_tokens, layers.N.self_attn/mlp/*_layernorm, norm, lm_head)"
    )


def layer_key(layer: int) -> str:
    """Stable, sortable layer label used in parameter names (``L03``)."""
    return f"L{layer:02d}"


def num_layers(names: list[str] | Mapping[str, object]) -> int:
    """Number of decoder layers, read off the tensor names."""
    layers = [describe(n).layer for n in names]
    return 1 + max((x for x in layers if x is not None), default=-1)


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


def load_config(model_dir: Path) -> dict:
    """The model's ``config.json`` as a dict."""
    path = Path(model_dir) / "config.json"
    if not path.is_file():
        raise ModelError(f"model directory {str(model_dir)!r} has no config.json; is it a transformers model?")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ModelError(f"{path}: config.json is not valid JSON ({exc.msg} at line {exc.lineno})") from None


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
    if load_config(model_dir).get("tie_word_embeddings"):
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
    if load_config(model_dir).get("tie_word_embeddings"):
        shapes.pop("lm_head.weight", None)
    return shapes


def _shape(x: torch.Tensor | tuple[int, ...]) -> tuple[int, ...]:
    return tuple(x.shape) if isinstance(x, torch.Tensor) else tuple(x)


def check_compatible(
    base: Mapping[str, torch.Tensor | tuple[int, ...]],
    other: Mapping[str, torch.Tensor | tuple[int, ...]],
    other_name: str,
) -> None:
    """Refuse a specialist whose tensors differ from the base, naming the first offender.

    Takes tensors or bare shapes (from :func:`read_shapes`), so configs are checked before
    any weight is loaded.
    """
    for name, tensor in base.items():
        if name not in other:
            raise ModelError(
                f"model {other_name!r} lacks tensor {name!r} that the base has; all models must be"
                " fine-tunes of the same base architecture"
            )
        if _shape(other[name]) != _shape(tensor):
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
