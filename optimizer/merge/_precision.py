"""The precision merges compute in.

Half-precision tensors lose exactly what merge methods work with (the small entries that
sparsification keeps, sign votes, ranks of tiny changes, Gram solves), so every method computes in
float32 when the weights are 16-bit and in the weights' own precision otherwise, and casts back.
"""

from __future__ import annotations

import torch

__all__ = ["work_dtype"]

_HALF = (torch.float16, torch.bfloat16)


def work_dtype(tensor: torch.Tensor) -> torch.dtype:
    """float32 for 16-bit tensors; the tensor's own dtype otherwise (float64 stays float64)."""
    return torch.float32 if tensor.dtype in _HALF else tensor.dtype
