"""Merge from task vectors kept in host memory, copying each tensor's in while the last one merges.

When the base and N dense task vectors do not fit on the device beside the serving engine's
weights and KV cache, the task vectors stay in page-locked (pinned) host memory. A merge then
reads each tensor's N task vectors across the host link once per candidate; with pinned memory
and a second CUDA stream that copy runs on the copy engine while the previous tensor merges on
the compute units, so the merge costs about max(copy, merge) per tensor instead of their sum.

The result is the same as :func:`optimizer.merge.apply.iter_merged` on device-resident task
vectors, tensor for tensor: only where the task vectors live changes.
"""

from __future__ import annotations

from collections.abc import Callable, Container, Iterator, Mapping, Sequence
from typing import Literal

import torch

from optimizer.checkpoints import ModelSet, load_task_vectors
from optimizer.families import LLAMA, Family
from optimizer.low_rank import Delta
from optimizer.merge._registry import MergeMethod, get_method
from optimizer.merge.apply import iter_merged, merge_tensor, resolved_options
from optimizer.merge.plan import MergePlan

#: Where an engine keeps the task vectors: on its device, or in pinned host memory, streamed in.
Placement = Literal["resident", "streamed"]

__all__ = ["Placement", "iter_merged_streamed", "load_for_merging", "merged_tensors", "pin"]


def pin(deltas: dict[str, list[Delta]]) -> dict[str, list[Delta]]:
    """Move the task vectors into page-locked (pinned) host memory, tensor by tensor, in place.

    Only pinned memory can be copied to the device asynchronously; pageable memory makes every
    copy wait for the host, and the overlap with merging is lost. Each tensor's pageable copy is
    dropped as soon as its pinned copy exists, so the host never holds two copies of them all.
    Without CUDA the tensors just move to host memory (nothing can be pinned).
    """
    can_pin = torch.cuda.is_available()
    for name, taus in deltas.items():
        for i, tau in enumerate(taus):
            host = tau.detach().to("cpu")
            taus[i] = host.pin_memory() if can_pin else host
        deltas[name] = taus
    return deltas


def iter_merged_streamed(
    plan: MergePlan,
    base: Mapping[str, torch.Tensor],
    host_deltas: Mapping[str, Sequence[Delta]],
    method: MergeMethod | None = None,
    family: Family = LLAMA,
) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield ``(name, merged tensor)`` on each base tensor's device, task vectors streamed in.

    ``base`` lives where the merged weights are wanted; ``host_deltas`` in host memory (see
    :func:`pin`). On a CUDA device the next tensor's task vectors are copied on a side stream
    while the current one merges; elsewhere the copy is plain and synchronous.
    """
    method = method or get_method(plan.method)
    options = resolved_options(method, plan)
    names = list(base)
    if not names:
        return
    device = base[names[0]].device
    if device.type != "cuda":
        for name in names:
            deltas = [t.to(device) for t in host_deltas[name]]
            yield name, merge_tensor(plan, name, base[name], deltas, method, options, family)
        return

    copy_stream = torch.cuda.Stream(device=device)
    compute = torch.cuda.current_stream(device)

    def fetch(name: str) -> tuple[list[Delta], torch.cuda.Event]:
        # The copy must not start before the compute stream is done with the buffers the caching
        # allocator may hand back (freed task vectors of two tensors ago).
        copy_stream.wait_stream(compute)
        with torch.cuda.stream(copy_stream):
            on_device = [t.to(device, non_blocking=True) for t in host_deltas[name]]
            done = torch.cuda.Event()
            done.record(copy_stream)
        return on_device, done

    pending = fetch(names[0])
    for i, name in enumerate(names):
        deltas, done = pending
        if i + 1 < len(names):
            pending = fetch(names[i + 1])
        compute.wait_event(done)
        for tau in deltas:  # allocated on the copy stream, used on the compute stream
            tau.record_stream(compute)
        yield name, merge_tensor(plan, name, base[name], deltas, method, options, family)


def load_for_merging(
    models: ModelSet,
    *,
    dtype: torch.dtype,
    device: torch.device | str,
    placement: Placement = "resident",
    keep: Container[str] | None = None,
    narrow: Callable[[str, Delta], Delta] | None = None,
) -> tuple[dict[str, torch.Tensor], dict[str, list[Delta]]]:
    """The base on ``device`` and the task vectors where ``placement`` says (the memory plan's choice).

    ``narrow`` (a tensor-parallel rank's cut) makes the load run in host memory, where the task
    vectors are formed against the whole base, so the device only ever receives the rank's slices.
    """
    if placement == "resident" and narrow is None:
        return load_task_vectors(models, dtype=dtype, device=device, keep=keep)
    base, deltas = load_task_vectors(models, dtype=dtype, device="cpu", keep=keep, narrow=narrow)
    if placement == "resident":
        return {k: v.to(device) for k, v in base.items()}, {
            k: [d.to(device) for d in taus] for k, taus in deltas.items()
        }
    return {k: v.to(device) for k, v in base.items()}, pin(deltas)


def merged_tensors(
    plan: MergePlan,
    base: Mapping[str, torch.Tensor],
    deltas: Mapping[str, Sequence[Delta]],
    method: MergeMethod | None,
    placement: Placement = "resident",
    family: Family = LLAMA,
) -> Iterator[tuple[str, torch.Tensor]]:
    """``(name, merged tensor)`` for every tensor, read from task vectors placed as ``placement``."""
    if placement == "streamed":
        return iter_merged_streamed(plan, base, deltas, method, family)
    return iter_merged(plan, base, deltas, method, family)
