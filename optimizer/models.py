"""What a tensor is: the one place that maps checkpoint tensor names to layers and module kinds.

Every other part of mergeopt (search-space names, merge plans, exports) asks this module which
layer a tensor belongs to and whether it is attention, MLP, embedding or head, so supporting a
new architecture family means teaching only this file its tensor names. Reading the files of a
model directory is :mod:`optimizer.checkpoints`'s job.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass

from optimizer.errors import ModelError

__all__ = ["KINDS", "TensorInfo", "describe", "layer_key", "num_layers"]

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
