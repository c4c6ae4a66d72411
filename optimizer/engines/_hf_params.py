"""The live tensor of a transformers model that each checkpoint tensor is merged into.

Dense families keep checkpoint names in memory: a checkpoint tensor is the parameter of the same
name. transformers 5 loads mixture-of-experts checkpoints differently: the per-expert tensors on
disk (``…experts.3.w1.weight``, or ``gate_proj``/``up_proj``/``down_proj``) become slices of two
3-D parameters per layer, ``mlp.experts.gate_up_proj`` (experts × [gate; up] × hidden) and
``mlp.experts.down_proj``, and Mixtral's ``block_sparse_moe.`` becomes ``mlp.``. Merges work on
checkpoint tensors (task vectors, exports and mergekit all use them), so the engine writes each
merged tensor into its slice; every parameter must be covered, or the engine refuses to start.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import torch

from optimizer.errors import ModelError

__all__ = ["live_views"]

_EXPERT = re.compile(
    r"^(?P<layer>.*layers\.\d+\.)(?:mlp|block_sparse_moe)\.experts\.(?P<e>\d+)\.(?P<proj>\w+)\.weight$"
)
_GATE_UP = {"w1": 0, "gate_proj": 0, "w3": 1, "up_proj": 1}  # halves of gate_up_proj's rows
_DOWN = ("w2", "down_proj")


def _expert_view(params: Mapping[str, torch.Tensor], name: str) -> tuple[str, torch.Tensor] | None:
    m = _EXPERT.match(name)
    if m is None:
        return None
    e, proj, prefix = int(m["e"]), m["proj"], m["layer"] + "mlp.experts."
    if proj in _GATE_UP and prefix + "gate_up_proj" in params:
        fused = params[prefix + "gate_up_proj"]
        half = fused.shape[1] // 2
        start = _GATE_UP[proj] * half
        return prefix + "gate_up_proj", fused[e, start : start + half]
    if proj in _DOWN and prefix + "down_proj" in params:
        return prefix + "down_proj", params[prefix + "down_proj"][e]
    return None


def live_views(model: torch.nn.Module, shapes: Mapping[str, tuple[int, ...]]) -> dict[str, torch.Tensor]:
    """Checkpoint tensor name → the live tensor (a parameter or a view of one) it is written into.

    ``shapes`` are the checkpoint's tensors. A checkpoint
    tensor with no parameter of its own is left out when the model ties it to another (the LM head
    of a tied model); a parameter that no checkpoint tensor fills, or a shape that differs, is an
    error naming the tensor: the merge would otherwise leave it unmerged without a word.
    """
    params: dict[str, torch.Tensor] = dict(model.named_parameters())
    views: dict[str, torch.Tensor] = {}
    covered: set[str] = set()
    for name, shape in shapes.items():
        view: torch.Tensor
        if name in params:
            target, view = name, params[name]
        else:
            found = _expert_view(params, name)
            if found is None and "block_sparse_moe." in name:
                renamed = name.replace("block_sparse_moe.", "mlp.")
                found = (renamed, params[renamed]) if renamed in params else None
            if found is None:
                continue  # tied to another parameter (checked below: every parameter is filled)
            target, view = found
        if tuple(view.shape) != tuple(shape):
            raise ModelError(
                f"checkpoint tensor {name!r} has shape {tuple(shape)} but transformers' model holds"
                f" {tuple(view.shape)} for it; is config.json the checkpoint's own?"
            )
        views[name] = view
        covered.add(target)
    missing = [p for p in params if p not in covered]
    if missing:
        raise ModelError(
            f"transformers' model has parameter {missing[0]!r} that no checkpoint tensor fills"
            f" ({len(missing)} in all); mergeopt cannot merge this layout in the transformers engine"
        )
    return views
