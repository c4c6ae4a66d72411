"""What a tensor is: the one place that maps checkpoint tensor names to layers and module kinds.

Every other part of mergeopt (search-space names, merge plans, exports) asks this module which
layer a tensor belongs to and whether it is attention, MLP, embedding or head. What differs
between architecture families (which block a norm belongs to, experts, routers) is declared in
:mod:`optimizer.families`, so supporting a new family means adding one entry there. Reading the
files of a model directory is :mod:`optimizer.checkpoints`'s job.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass

from optimizer.errors import ModelError
from optimizer.families import LLAMA, Family, known_families

__all__ = ["KINDS", "TensorInfo", "describe", "expert_key", "layer_key", "num_layers"]

#: Module kinds a plan can address. ``embed`` is the token embedding, ``head`` the final norm
#: and the LM head; per-layer norms belong to their block (``attn`` or ``mlp``; see optimizer.families).
KINDS: tuple[str, ...] = ("attn", "mlp", "embed", "head")

# ``model.layers.N.`` in most checkpoints; ``model.language_model.layers.N.`` in Gemma 3's.
_LAYER_RE = re.compile(r"^(?:model\.)?(?:language_model\.)?layers\.(\d+)\.(.+)$")
_EXPERT_RE = re.compile(r"^(\d+)\.(.+)$")


@dataclass(frozen=True, slots=True)
class TensorInfo:
    """Where one tensor sits in the network.

    ``layer`` is None for tensors outside the decoder stack; ``role`` is the module's own name
    (``q_proj``, ``input_layernorm``, ``lm_head``, ``router``...), which methods such as RegMean or
    head-level importance need beyond the coarse ``kind``. ``expert`` is the expert's index for a
    mixture-of-experts layer's expert tensors, else None.
    """

    name: str
    layer: int | None
    kind: str
    role: str
    expert: int | None = None


def _module(path: str) -> str:
    """The module's own name in ``a.b.q_proj.weight`` (or the path itself without a dot)."""
    return path.split(".")[-2] if "." in path else path


def describe(name: str, family: Family = LLAMA) -> TensorInfo:
    """Classify a checkpoint tensor name of ``family``, or raise naming the tensor and the families."""
    m = _LAYER_RE.match(name)
    if m:
        layer, rest = int(m.group(1)), m.group(2)
        if family.experts and rest.startswith(family.experts):
            e = _EXPERT_RE.match(rest.removeprefix(family.experts))
            if e:
                return TensorInfo(name, layer, "mlp", _module(e.group(2)), int(e.group(1)))
        if any(rest.startswith(p) for p in family.router):
            return TensorInfo(name, layer, "mlp", "router")
        kind = family.block_of(rest)
        if kind is not None:
            return TensorInfo(name, layer, kind, _module(rest))
        raise ModelError(
            f"tensor {name!r}: unknown module in layer {layer} for a {family.name}-style model;"
            f" mergeopt knows the layers of these model types: {known_families()}"
        )
    if name.endswith("embed_tokens.weight"):
        return TensorInfo(name, None, "embed", "embed_tokens")
    if name in ("lm_head.weight", "model.norm.weight", "norm.weight", "model.language_model.norm.weight"):
        return TensorInfo(name, None, "head", name.split(".")[-2])
    raise ModelError(
        f"tensor {name!r} is outside the decoder layers mergeopt can place (embed_tokens,"
        f" layers.N.*, norm, lm_head); mergeopt knows these model types: {known_families()}"
    )


def layer_key(layer: int) -> str:
    """Stable, sortable layer label used in parameter names (``L03``)."""
    return f"L{layer:02d}"


def expert_key(expert: int) -> str:
    """Label of a mixture-of-experts layer's expert in scope and parameter names (``e05``)."""
    return f"e{expert:02d}"


def num_layers(names: list[str] | Mapping[str, object], family: Family = LLAMA) -> int:
    """Number of decoder layers, read off the tensor names."""
    layers = [describe(n, family).layer for n in names]
    return 1 + max((x for x in layers if x is not None), default=-1)
