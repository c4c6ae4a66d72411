"""RegMean's measurement: the Gram matrix of every linear layer's input, from forward hooks.

Each specialist runs its own training-like text (its tasks' prompts and answers) through a
transformers copy of itself; a hook at the input of every RegMean linear sums xᵀx in float64 and
counts tokens, padding left out. Measured once per study (``GramsData`` in
:mod:`optimizer.merge.regmean`) and cached beside it.
"""

from __future__ import annotations

from collections.abc import Callable, Container, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING

import torch

from optimizer.merge.regmean._solve import gram_key

if TYPE_CHECKING:
    from torch import nn

__all__ = ["GramCollector", "collect_grams", "model_grams"]

#: Sequences per forward pass while collecting.
BATCH = 16

# --------------------------------------------------------------------------- collecting Grams


@dataclass
class GramCollector:
    """Forward hooks that sum xᵀx (float64) and count tokens at the input of each RegMean linear.

    Use as a context manager around forward passes: hooks are attached on enter and removed on
    exit, also when a forward raises. Padding is left out when :meth:`set_mask` is given the batch's
    attention mask. ``keys`` limits collection to some Grams (e.g. a few layers per pass, when all
    float64 sums would not fit on the device at once).
    """

    model: nn.Module
    keys: Container[str] | None = None
    sums: dict[str, torch.Tensor] = field(default_factory=dict)
    counts: dict[str, int] = field(default_factory=dict)
    _handles: list[torch.utils.hooks.RemovableHandle] = field(default_factory=list, repr=False)
    _mask: torch.Tensor | None = field(default=None, repr=False)

    def modules(self) -> dict[str, nn.Module]:
        """Gram key → the one linear module whose input defines it (q_proj for q/k/v, and so on)."""
        from torch import nn

        chosen: dict[str, nn.Module] = {}
        for name, module in self.model.named_modules():
            if not isinstance(module, nn.Linear):
                continue
            key = gram_key(f"{name}.weight")
            if key is not None and key not in chosen and (self.keys is None or key in self.keys):
                chosen[key] = module
        return chosen

    def set_mask(self, attention_mask: torch.Tensor | None) -> None:
        """Tokens where ``attention_mask`` is 0 (padding) are skipped until the next call."""
        self._mask = None if attention_mask is None else attention_mask.reshape(-1).bool()

    def _hook(self, key: str) -> Callable[[nn.Module, tuple, torch.Tensor], None]:
        def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
            x = args[0].detach().reshape(-1, args[0].shape[-1])  # (tokens, in)
            if self._mask is not None and self._mask.numel() == x.shape[0]:
                x = x[self._mask.to(x.device)]
            x = x.to(torch.float64)
            if key not in self.sums:
                self.sums[key] = torch.zeros(x.shape[1], x.shape[1], dtype=torch.float64, device=x.device)
                self.counts[key] = 0
            self.sums[key].addmm_(x.T, x)
            self.counts[key] += x.shape[0]

        return hook

    def __enter__(self) -> GramCollector:
        for key, module in self.modules().items():
            self._handles.append(module.register_forward_hook(self._hook(key)))
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._mask = None

    def grams(self, *, mean: bool = True, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
        """The collected Grams on the CPU: XᵀX / n (the paper's Gram) when ``mean``, else the sums XᵀX."""
        out = {}
        for key, total in self.sums.items():
            g = total / max(self.counts[key], 1) if mean else total
            out[key] = g.to(device="cpu", dtype=dtype)
        return out


def collect_grams(
    model: nn.Module,
    batches: Iterable[Mapping[str, torch.Tensor]],
    *,
    keys: Container[str] | None = None,
    mean: bool = True,
    dtype: torch.dtype = torch.float32,
) -> dict[str, torch.Tensor]:
    """Gram key → Gram of the inputs ``model`` feeds that Gram's linears over ``batches``.

    Each batch is passed as ``model(**batch)`` (tensors moved to the model's device) in eval mode
    without gradients; the mode is restored afterwards. Padding tokens (``attention_mask`` 0) are
    left out. ``mean`` divides by the token count, so models seen on different amounts of data
    weigh the same in :func:`regmean_solve`.
    """
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        with GramCollector(model, keys) as collector, torch.no_grad():
            for batch in batches:
                moved = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
                collector.set_mask(moved.get("attention_mask"))
                model(**moved)
    finally:
        model.train(was_training)
    return collector.grams(mean=mean, dtype=dtype)


def model_grams(model_dir: Path, texts: list[str], tokenizer_dir: Path) -> dict[str, torch.Tensor]:
    """The Grams of the model in ``model_dir`` on ``texts`` (tokenized by the base's tokenizer)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    # The texts carry their own BOS (optimizer.tokens): tokenized exactly as written.
    batches = (
        dict(tokenizer(texts[i : i + BATCH], return_tensors="pt", padding=True, add_special_tokens=False))
        for i in range(0, len(texts), BATCH)
    )
    grams = collect_grams(model, batches)
    del model
    return grams
