"""Skipping the decoder layers a unit's removal cannot change, for HILA's exact importance.

Removing unit u of layer L changes nothing below L: layers 0 … L−1 compute exactly what they
computed for the whole specialist. :func:`~optimizer.merge.hila._importance.importance_exact`
runs one forward pass per unit, so recomputing that prefix is about half its work. A
:class:`PrefixCache` records the output of some decoder layers during the specialist's own pass
(``record``) and, for a unit of layer L, makes every layer up to the last recorded one below L
return that recorded output instead of computing (``skipping``): the layers from there on see
the very tensors they saw before, so the loss is the one a full pass gives, bit for bit.

Why this shape:

* Each skipped layer returns the *recorded output object* of the last skipped layer, whatever
  its structure (a tensor, or a tuple in older architectures): the model's own loop unpacks it
  as it unpacks a real layer's output, so no architecture's calling convention is assumed. A
  skipped layer's own inputs are ignored, so what the earlier skipped layers hand it is moot.
* Only what fits ``budget`` bytes is recorded: every layer where it fits, else evenly spaced
  layers (a unit then starts from the nearest recorded layer below its own). Golden sets that do
  not fit one layer's outputs are measured without skipping.
* A unit whose tensors do not all lie under ``<stack>.<L>.`` (the layer index the units name) is
  measured whole: skipping is an optimisation and never a guess.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch

from optimizer.merge.hila._units import Unit

__all__ = ["DEFAULT_BUDGET", "PrefixCache"]

#: Bytes of recorded layer outputs kept per specialist (the golden batches' hidden states).
DEFAULT_BUDGET = 2 * 2**30


def _decoder_stack(model: torch.nn.Module) -> tuple[str, torch.nn.ModuleList] | None:
    """The model's list of decoder layers and its qualified name, or None where it is not plain."""
    n = getattr(getattr(model, "config", None), "num_hidden_layers", None)
    found = [
        (name, module)
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.ModuleList) and len(module) == n and name.split(".")[-1] in {"layers", "h"}
    ]
    return found[0] if len(found) == 1 else None


def _nbytes(output: object) -> int:
    if isinstance(output, torch.Tensor):
        return output.numel() * output.element_size()
    if isinstance(output, (tuple, list)):
        return sum(_nbytes(x) for x in output)
    return 0


class PrefixCache:
    """Recorded decoder-layer outputs of one specialist's pass over its golden batches.

    The caller sets :attr:`batch` to the batch index before each forward pass, while recording
    and while skipping, so each pass reads and writes its own batch's outputs.
    """

    def __init__(self, model: torch.nn.Module, *, budget: int = DEFAULT_BUDGET) -> None:
        stack = _decoder_stack(model)
        self.prefix, self.layers = (stack[0], stack[1]) if stack else ("", torch.nn.ModuleList())
        self.budget = budget
        self.batch = 0
        self.saved: list[dict[int, Any]] = []  # per batch: layer index → its recorded output

    def plan(self, layer_bytes: int) -> list[int]:
        """The layers to record: as many as fit the budget at ``layer_bytes`` each, evenly spaced.

        ``layer_bytes`` is one layer's output summed over the batches (B·T·hidden·element size).
        """
        n = len(self.layers)
        affordable = self.budget // max(layer_bytes, 1)
        if n < 2 or affordable < 1:
            return []
        if affordable >= n - 1:
            return list(range(n - 1))  # the last layer's output starts nothing
        # k recorded layers at the (j + 1)/(k + 1) points of the stack: with units spread evenly
        # over the layers, this is where they save the most passes (one layer: the middle one).
        return sorted({(j + 1) * n // (affordable + 1) - 1 for j in range(affordable)})

    @contextmanager
    def record(self, batches: int, layers: Sequence[int]) -> Iterator[None]:
        """Inside the block, each forward pass records ``layers``' outputs for batch :attr:`batch`."""
        self.saved = [{} for _ in range(batches)]

        def hook(i: int) -> Any:
            def save(_module: torch.nn.Module, _args: object, output: object) -> None:
                self.saved[self.batch][i] = output

            return save

        handles = [self.layers[i].register_forward_hook(hook(i)) for i in layers]
        try:
            yield
        finally:
            for h in handles:
                h.remove()

    def start(self, unit: Unit) -> int | None:
        """The recorded layer a pass for ``unit`` may start after, or None: compute every layer."""
        if not self.saved or not self.saved[0]:
            return None
        under = f"{self.prefix}.{unit.layer}."
        if not all(s.tensor.startswith(under) for s in unit.slices):
            return None
        below = [i for i in self.saved[0] if i < unit.layer]
        return max(below) if below else None

    @contextmanager
    def skipping(self, upto: int | None) -> Iterator[None]:
        """Inside the block, layers 0 … ``upto`` return ``upto``'s recorded output for :attr:`batch`."""
        if upto is None:
            yield
            return

        def recorded(*_args: object, **_kwargs: object) -> object:
            return self.saved[self.batch][upto]

        skipped = list(self.layers[: upto + 1])
        own = [layer.__dict__.get("forward") for layer in skipped]  # an instance-level wrapper, kept
        for layer in skipped:
            layer.forward = recorded
        try:
            yield
        finally:
            for layer, forward in zip(skipped, own, strict=True):
                if forward is None:
                    del layer.forward
                else:
                    layer.forward = forward

    def clear(self) -> None:
        """Drop the recorded outputs (the next specialist records its own)."""
        self.saved = []
