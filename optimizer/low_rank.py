"""A task vector kept as its low-rank factors: what a LoRA adapter's specialist contributes.

A LoRA adapter changes a weight by τ = s·B·A (B: out × r, A: r × in, s = α/r or α/√r), so its
task vector costs r·(out + in) numbers instead of out·in: at r = 16 on every linear module of
Llama-3-8B, 0.5 % of a dense task vector. Engines hold adapters' task vectors in this form and
expand one tensor at a time inside a merge (:func:`dense`), so N adapters never cost N dense
copies of the model.

A tensor the adapter does not touch is the rank-0 delta (no factors at all): zero, for free.
Where a specialist also carries dense changes of a tensor (peft's ``modules_to_save``), they ride
along as ``dense_part`` and are added on expansion.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

__all__ = ["Delta", "LowRankDelta", "all_zero", "combine", "dense", "dense_all", "nbytes"]


@dataclass(frozen=True)
class LowRankDelta:
    """τ = dense + scale · B @ A (transposed for embeddings, whose factors peft stores that way)."""

    B: torch.Tensor  # out × r
    A: torch.Tensor  # r × in
    scale: float
    shape: tuple[int, ...]  # the weight's shape
    transpose: bool = False
    dense_part: torch.Tensor | None = None

    @classmethod
    def zero(cls, shape: Sequence[int], dtype: torch.dtype, device: torch.device | str) -> LowRankDelta:
        """The delta of a tensor the adapter leaves alone."""
        rows, cols = shape[0], math.prod(shape[1:])
        b = torch.empty(rows, 0, dtype=dtype, device=device)
        a = torch.empty(0, cols, dtype=dtype, device=device)
        return cls(b, a, 0.0, tuple(shape))

    @property
    def device(self) -> torch.device:
        return self.B.device

    @property
    def dtype(self) -> torch.dtype:
        return self.B.dtype

    @property
    def rank(self) -> int:
        return self.A.shape[0]

    @property
    def is_zero(self) -> bool:
        """Nothing to add: a tensor the adapter leaves alone."""
        return self.rank == 0 and self.dense_part is None

    def expand(self) -> torch.Tensor:
        """The dense task vector of this one tensor (in the factors' dtype, computed in float32)."""
        if self.rank == 0:
            out = torch.zeros(self.shape, dtype=self.dtype, device=self.device)
        else:
            product = self.B.float() @ self.A.float()
            if self.transpose:
                product = product.T
            out = (product * self.scale).reshape(self.shape).to(self.dtype)
        if self.dense_part is not None:
            out += self.dense_part
        return out

    def map(self, fn) -> LowRankDelta:
        """The same delta with ``fn`` applied to every tensor it holds (device moves, pinning)."""
        return LowRankDelta(
            fn(self.B), fn(self.A), self.scale, self.shape, self.transpose,
            None if self.dense_part is None else fn(self.dense_part),
        )  # fmt: skip

    def to(self, device: torch.device | str, non_blocking: bool = False) -> LowRankDelta:
        return self.map(lambda t: t.to(device, non_blocking=non_blocking))

    def pin_memory(self) -> LowRankDelta:
        return self.map(lambda t: t.pin_memory())

    def detach(self) -> LowRankDelta:
        return self.map(lambda t: t.detach())

    def record_stream(self, stream: torch.cuda.Stream) -> None:
        for t in (self.B, self.A, self.dense_part):
            if t is not None:
                t.record_stream(stream)

    @property
    def nbytes(self) -> int:
        parts = [self.B, self.A] + ([self.dense_part] if self.dense_part is not None else [])
        return sum(t.numel() * t.element_size() for t in parts)


#: A task vector of one tensor as engines hold it: dense, or as factors.
Delta = torch.Tensor | LowRankDelta


def dense(delta: Delta) -> torch.Tensor:
    """A task vector as a tensor, expanding it if it is held as factors."""
    return delta.expand() if isinstance(delta, LowRankDelta) else delta


def all_zero(deltas: Sequence[Delta]) -> bool:
    """Every specialist leaves this tensor alone (adapters that do not adapt it): it merges to the base."""
    return bool(deltas) and all(isinstance(d, LowRankDelta) and d.is_zero for d in deltas)


def dense_all(deltas: Sequence[Delta]) -> list[torch.Tensor]:
    """One tensor's task vectors, all dense: what every merge method reads."""
    return [dense(d) for d in deltas]


def nbytes(delta: Delta) -> int:
    """Memory a held task vector takes (its factors, where it is low-rank)."""
    if isinstance(delta, LowRankDelta):
        return delta.nbytes
    return delta.numel() * delta.element_size()


def combine(base: torch.Tensor, deltas: Sequence[Delta], base_coef: float, coefs: Sequence[float]) -> torch.Tensor:
    """c₀·base + Σ cₘ τₘ without expanding any adapter: the factors of all low-rank task vectors are
    stacked, [c₁s₁B₁ … cₙsₙBₙ]·[A₁; …; Aₙ], and added in one matmul (one per layout: embeddings'
    factors are stored transposed). Computed in float32 at least, returned in the base's dtype.
    """
    acc = torch.promote_types(base.dtype, torch.float32)
    out = base.to(acc) * base_coef if base_coef != 1.0 else base.to(acc, copy=True)
    flat = out.view(out.shape[0], -1)
    stacks: dict[bool, tuple[list[torch.Tensor], list[torch.Tensor]]] = {False: ([], []), True: ([], [])}
    for delta, coef in zip(deltas, coefs, strict=True):
        if coef == 0.0:
            continue
        if not isinstance(delta, LowRankDelta):
            out.add_(delta.to(acc), alpha=coef)
            continue
        if delta.dense_part is not None:
            out.add_(delta.dense_part.to(acc), alpha=coef)
        if delta.rank:
            left, right = stacks[delta.transpose]
            left.append(delta.B.to(acc) * (coef * delta.scale))
            right.append(delta.A.to(acc))
    bs, as_ = stacks[False]
    if bs:  # Σ c·s·B·A
        flat.addmm_(torch.cat(bs, dim=1), torch.cat(as_, dim=0))
    bs, as_ = stacks[True]
    if bs:  # Σ c·s·(B·A)ᵀ = [A₁ᵀ … Aₙᵀ]·[c₁s₁B₁ᵀ; …]
        flat.addmm_(torch.cat([a.T for a in as_], dim=1), torch.cat([b.T for b in bs], dim=0))
    return out.to(base.dtype)
