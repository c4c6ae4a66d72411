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
  as it unpacks a real layer's output. What the skipped layers would have handed each other
  besides their outputs is lost, though: an architecture whose loop carries state from lower to
  upper layers (Gemma 3n's and Gemma 4's shared key/value states) would fail or differ. So the
  caller checks, once per specialist, that a pass skipping to the deepest recorded layer repeats
  the recorded loss bit for bit, and forgets the records (computing every layer) where it does
  not (:meth:`PrefixCache.clear`).
* Only what fits ``budget`` bytes is recorded: every layer where it fits, else evenly spaced
  layers (a unit then starts from the nearest recorded layer below its own). The plan uses the
  hidden states' size; outputs that turn out larger (attention weights returned beside them)
  are dropped after the pass rather than held past the budget.
* A unit whose tensors do not all lie under ``<stack>.<L>.`` (the layer index the units name) is
  measured whole: skipping is an optimisation and never a guess.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch

from optimizer.merge.hila._units import Unit

__all__ = ["DEFAULT_BUDGET", "PrefixCache"]

#: Bytes of recorded layer outputs kept per specialist (the golden batches' hidden states).
DEFAULT_BUDGET = 2 * 2**30


def _decoder_stack(model: torch.nn.Module) -> tuple[str, torch.nn.ModuleList] | None:
    """The model's list of decoder layers and its qualified name, or None where it is not plain.

    The layer count is the top-level ``num_hidden_layers`` that HILA's units are built from
    (:func:`~optimizer.merge.hila._units.unit_slices` refuses a config without one).
    """
    n = getattr(getattr(model, "config", None), "num_hidden_layers", None)
    found = [
        (name, module)
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.ModuleList) and len(module) == n and name.split(".")[-1] == "layers"
    ]
    return found[0] if len(found) == 1 else None


def _nbytes(output: object) -> int:
    """Bytes of the tensors in a layer's output (a tensor, or tuples/lists of them)."""
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
    def record(self, n_batches: int, layers: Sequence[int]) -> Iterator[None]:
        """Inside the block, each forward pass records ``layers``' outputs for batch :attr:`batch`.

        Records from a block that raised, or larger than the budget, are dropped.
        """
        self.saved = [{} for _ in range(n_batches)]

        def saver(i: int) -> Callable[[torch.nn.Module, object, object], None]:
            def save(_module: torch.nn.Module, _args: object, output: object) -> None:
                self.saved[self.batch][i] = output

            return save

        handles = [self.layers[i].register_forward_hook(saver(i)) for i in layers]
        try:
            yield
        except BaseException:
            self.clear()
            raise
        finally:
            for h in handles:
                h.remove()
        if sum(_nbytes(out) for per_batch in self.saved for out in per_batch.values()) > self.budget:
            self.clear()

    def deepest(self) -> int | None:
        """The deepest recorded layer, or None when nothing is recorded."""
        return max(self.saved[0]) if self.saved and self.saved[0] else None

    def start(self, unit: Unit) -> int | None:
        """The recorded layer a pass for ``unit`` may start after, or None: compute every layer."""
        if self.deepest() is None:
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
        """Forget the recorded outputs: every pass computes every layer until the next recording."""
        self.saved = []
