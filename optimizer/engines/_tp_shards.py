"""Tensor parallelism: each vLLM rank holds and merges only its own slice of every task vector.

Under ``tensor_parallel_size: k`` vLLM splits most weights across k ranks, and a rank that kept
the whole base and every whole task vector would need as much memory as a single GPU does, k
times over. So each rank keeps only the slice of each tensor that its part of the model loads.

Which slice that is, vLLM's weight loaders decide: column- and row-parallel layers, fused qkv
(with KV heads replicated when there are fewer than ranks), fused gate_up, vocabulary-parallel
embeddings and heads (padded), experts. Rather than re-deriving their rules, mergeopt asks the
loaders: it reloads the base once through them under a dispatch mode that maps every copy out of
a checkpoint tensor back to the part of it the copy covers (:func:`record_shards`). A tensor cut
once along one dimension is sharded there; one copied whole (norms, replicated layers) or cut in
several pieces (a checkpoint that stores qkv or gate_up fused, as Phi-3's does) stays whole on
every rank — correct, only without the saving.

A merge then works on the slices. Task arithmetic and linear merges are elementwise, so the merged
slice is the slice of the merge. Every other method reads whole-tensor statistics (TIES' top-k,
DARE's masks drawn by tensor, WIDEN's norms, RegMean's Grams, HILA's heads), so the ranks gather
that one tensor's base and task vectors, merge it whole, and keep their slice: the result is the
single-GPU merge exactly, at the cost of one all-gather per tensor and one tensor's worth of
workspace. vLLM's loader reads only the rank's slice of what it is handed, so the slice is passed
inside an uninitialised tensor of the checkpoint's shape (:meth:`ShardLayout.for_loader`).
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from optimizer.families import LLAMA, Family
from optimizer.low_rank import Delta, LowRankDelta, all_zero, dense
from optimizer.merge._registry import MergeMethod
from optimizer.merge.apply import merge_tensor, resolved_options
from optimizer.merge.plan import MergePlan

__all__ = ["Shard", "ShardLayout", "iter_merged_sharded", "narrow_delta", "record_shards"]


@dataclass(frozen=True)
class Shard:
    """The part of a checkpoint tensor one rank owns: ``length`` entries from ``start`` along ``dim``."""

    dim: int
    start: int
    length: int

    def take(self, tensor: torch.Tensor) -> torch.Tensor:
        """This rank's view of a tensor of the checkpoint's shape."""
        return tensor.narrow(self.dim, self.start, self.length)


class _CopyRecorder(TorchDispatchMode):
    """Notes which part of each checkpoint tensor the weight loaders copy into the model.

    It watches at the dispatcher, below every Python-level reshaping a loader does (``narrow``,
    ``unsqueeze(0).unbind()`` for experts, ``chunk``, transposes): a ``copy_`` whose source is a
    view into a checkpoint tensor is mapped back to the box of that tensor it covers. Views
    themselves read nothing; any other op that reads a checkpoint tensor (a ``cat``, a dtype
    conversion, arithmetic) marks it "used whole", which keeps it unsharded. Checkpoint tensors
    are held by weak reference, so they can be fed and freed one at a time.
    """

    def __init__(self, log: dict[str, set[tuple[int, ...]]]):
        super().__init__()
        self.log = log
        self.by_storage: dict[int, list[tuple[str, weakref.ref[torch.Tensor]]]] = {}

    def add(self, name: str, tensor: torch.Tensor) -> None:
        """Watch ``tensor`` as checkpoint tensor ``name`` from now on."""
        self.log.setdefault(name, set())
        self.by_storage.setdefault(_storage(tensor), []).append((name, weakref.ref(tensor)))

    def _root(self, tensor: object) -> tuple[str, torch.Tensor] | None:
        if not isinstance(tensor, torch.Tensor) or tensor.device.type == "meta":
            return None
        for name, ref in self.by_storage.get(_storage(tensor), ()):
            root = ref()  # a freed root's storage may be reused: only a live one counts
            if root is not None and root.storage_offset() <= tensor.storage_offset() < root.storage_offset() + max(
                root.numel(), 1
            ):
                return name, root
        return None

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        schema = func._schema
        if func is torch.ops.aten.copy_.default:
            found = self._root(args[1])
            if found is not None:
                name, root = found
                self.log[name].add(_box(root, args[1]))
        elif schema.is_mutable or not any(r.alias_info is not None for r in schema.returns):
            for arg in [*args, *kwargs.values()]:
                for t in arg if isinstance(arg, list | tuple) else (arg,):
                    found = self._root(t)
                    if found is not None:
                        self.log[found[0]].add(())  # read whole, or in a way not traced here
        return func(*args, **kwargs)


def _storage(tensor: torch.Tensor) -> int:
    return tensor.untyped_storage().data_ptr()


def _box(root: torch.Tensor, view: torch.Tensor) -> tuple[int, ...]:
    """``(dim, start, length)`` of ``root`` that ``view`` covers; ``()`` when it is all of it or
    not a box cut along one dimension (then the tensor is kept whole)."""
    if not root.is_contiguous():
        return ()
    shape, strides = list(root.shape), list(root.stride())
    offset = view.storage_offset() - root.storage_offset()
    starts = []
    for stride in strides:
        starts.append(offset // stride if stride else 0)
        offset = offset % stride if stride else offset
    if offset:
        return ()
    lengths = [1] * len(shape)
    for size, stride in zip(view.shape, view.stride(), strict=True):
        if size == 1:
            continue
        dims = [d for d in range(len(shape)) if strides[d] == stride and shape[d] > 1]
        if len(dims) != 1 or lengths[dims[0]] != 1:
            return ()
        lengths[dims[0]] = size
    cut = [d for d in range(len(shape)) if (starts[d], lengths[d]) != (0, shape[d])]
    if any(starts[d] + lengths[d] > shape[d] for d in range(len(shape))) or len(cut) != 1:
        return ()
    return (cut[0], starts[cut[0]], lengths[cut[0]])


def record_shards(
    load: Callable[[Iterable[tuple[str, torch.Tensor]]], Any],
    tensors: Mapping[str, torch.Tensor] | Iterable[tuple[str, torch.Tensor]],
) -> dict[str, Shard | None]:
    """Load ``tensors`` through ``load`` (vLLM's loaders) and return the slice each one was cut to.

    ``tensors`` may be a generator: each is watched from the moment it is handed to the loader.
    None: the loader used the tensor whole, cut it more than one way (a checkpoint's fused qkv),
    read it other than by copying, or never touched it.
    """
    logs: dict[str, set[tuple[int, ...]]] = {}
    recorder = _CopyRecorder(logs)

    pairs = tensors.items() if isinstance(tensors, Mapping) else tensors

    def fed() -> Iterator[tuple[str, torch.Tensor]]:
        for name, tensor in pairs:
            recorder.add(name, tensor)
            yield name, tensor

    with recorder:
        load(fed())
    return {name: Shard(*next(iter(log))) if len(log) == 1 and () not in log else None for name, log in logs.items()}


def narrow_delta(delta: Delta, shard: Shard) -> Delta:
    """The rank's slice of one task vector, as its own storage (the whole one can then be freed).

    An adapter's factors are cut on the side the slice runs along, so they stay factors.
    """
    if not isinstance(delta, LowRankDelta):
        return shard.take(delta).clone()
    if len(delta.shape) != 2:
        return shard.take(delta.expand()).clone()
    shape = list(delta.shape)
    shape[shard.dim] = shard.length
    # weight = B·A, or (B·A)ᵀ for embeddings: a cut along the weight's rows falls on B's rows
    # (on A's columns when transposed).
    on_b = (shard.dim == 0) != delta.transpose
    b = delta.B.narrow(0, shard.start, shard.length).clone() if on_b else delta.B
    a = delta.A if on_b else delta.A.narrow(1, shard.start, shard.length).clone()
    part = None if delta.dense_part is None else shard.take(delta.dense_part).clone()
    return LowRankDelta(b, a, delta.scale, tuple(shape), delta.transpose, part)


#: ``all_gather(tensor)`` across the tensor-parallel ranks: every rank's tensor, in rank order.
AllGather = Callable[[torch.Tensor], list[torch.Tensor]]


class ShardLayout:
    """Every rank's slices (the same table on each rank), this rank's own, and how to gather.

    A tensor counts as sharded only where every rank has a slice along the same dimension and the
    slices together cover it; otherwise it is kept whole everywhere, so that a gather never
    assembles a tensor with a part no rank holds.
    """

    def __init__(
        self,
        tables: Sequence[Mapping[str, Shard | None]],
        rank: int,
        shapes: Mapping[str, tuple[int, ...]],
        all_gather: AllGather | None = None,
    ):
        self.rank = rank
        self.shapes = dict(shapes)
        self._all_gather = all_gather
        self.shards: dict[str, list[Shard]] = {}
        for name, shape in shapes.items():
            cuts = [t.get(name) for t in tables]
            if all(c is not None for c in cuts) and _covers([c for c in cuts if c is not None], shape):
                self.shards[name] = [c for c in cuts if c is not None]

    def own(self, name: str) -> Shard | None:
        """This rank's slice of ``name``, or None where every rank holds it whole."""
        cuts = self.shards.get(name)
        return cuts[self.rank] if cuts else None

    def narrow(self, name: str, delta: Delta) -> Delta:
        """What this rank keeps of a base tensor or task vector."""
        shard = self.own(name)
        return delta if shard is None else narrow_delta(delta, shard)

    def for_loader(self, name: str, piece: torch.Tensor) -> torch.Tensor:
        """A tensor of the checkpoint's shape holding ``piece`` where this rank's loader reads.

        The rest is left uninitialised: vLLM's loader narrows to this rank's slice and never
        reads it.
        """
        shard = self.own(name)
        if shard is None:
            return piece
        full = torch.empty(self.shapes[name], dtype=piece.dtype, device=piece.device)
        shard.take(full).copy_(piece)
        return full

    def gather(self, name: str, piece: torch.Tensor) -> torch.Tensor:
        """The whole tensor from every rank's slice (a collective: every rank calls it in turn)."""
        cuts = self.shards.get(name)
        if not cuts:
            return piece
        if self._all_gather is None:
            raise RuntimeError("this layout has no all-gather: it was built for one rank")
        dim = cuts[0].dim
        longest = max(c.length for c in cuts)
        moved = piece.movedim(dim, 0)
        if moved.shape[0] < longest:  # vocabulary slices can differ by a few rows
            pad = torch.zeros((longest - moved.shape[0], *moved.shape[1:]), dtype=piece.dtype, device=piece.device)
            moved = torch.cat([moved, pad])
        pieces = self._all_gather(moved.contiguous())
        shape = list(self.shapes[name])
        shape.insert(0, shape.pop(dim))
        whole = torch.empty(shape, dtype=piece.dtype, device=piece.device)
        for cut, got in zip(cuts, pieces, strict=True):
            whole[cut.start : cut.start + cut.length] = got[: cut.length]
        return whole.movedim(0, dim).contiguous()


def _covers(cuts: Sequence[Shard], shape: tuple[int, ...]) -> bool:
    """The slices lie along one dimension and together cover all of it."""
    if len({c.dim for c in cuts}) != 1 or not shape:
        return False
    size = shape[cuts[0].dim]
    covered = [False] * size
    for c in cuts:
        if c.start < 0 or c.start + c.length > size:
            return False
        covered[c.start : c.start + c.length] = [True] * c.length
    return all(covered)


def iter_merged_sharded(
    plan: MergePlan,
    base: Mapping[str, torch.Tensor],
    deltas: Mapping[str, Sequence[Delta]],
    method: MergeMethod,
    layout: ShardLayout,
    family: Family = LLAMA,
) -> Iterator[tuple[str, torch.Tensor, torch.Tensor]]:
    """``(name, tensor for vLLM's loader, this rank's merged slice)`` for every tensor.

    ``base`` and ``deltas`` hold this rank's slices (task vectors may sit in host memory: they are
    moved to the base's device one tensor at a time). Elementwise methods merge the slices; the
    others gather each tensor whole first, so every rank merges it as a single GPU would.
    """
    options = resolved_options(method, plan)
    elementwise = method.linear_in_deltas is not None
    for name, b in base.items():
        taus = [_to(d, b.device) for d in deltas[name]]
        shard = layout.own(name)
        if shard is None:
            merged = merge_tensor(plan, name, b, taus, method, options, family)
            yield name, merged, merged
        elif elementwise or all_zero(taus):  # (no adapter touches it: the merge is the base)
            piece = merge_tensor(plan, name, b, taus, method, options, family)
            yield name, layout.for_loader(name, piece), piece
        else:
            whole = _merge_gathered(plan, name, b, taus, method, options, family, layout)
            yield name, whole, shard.take(whole)


def _merge_gathered(
    plan: MergePlan,
    name: str,
    base: torch.Tensor,
    taus: Sequence[Delta],
    method: MergeMethod,
    options: Mapping[str, object],
    family: Family,
    layout: ShardLayout,
) -> torch.Tensor:
    """One tensor merged whole from every rank's slices (its gathered inputs freed on return)."""
    inputs = [layout.gather(name, dense(t)) for t in taus]
    return merge_tensor(plan, name, layout.gather(name, base), inputs, method, options, family)


def _to(delta: Delta, device: torch.device) -> Delta:
    return delta if delta.device == device else delta.to(device)
