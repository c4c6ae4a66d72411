"""Runs inside each vLLM worker process: holds the base and task vectors, merges plans in place.

vLLM injects this class into its worker (``LLM(worker_extension_cls=...)``) and the engine calls
its methods through ``collective_rpc``, so only a plan — a few kilobytes of coefficients — ever
crosses the process boundary. The merged tensors are written with vLLM's own in-place reload
(``model_runner.reload_weights``): the model's ``load_weights`` handles fused qkv / gate_up and
tensor-parallel sharding, and the reload re-runs the kernel-specific post-processing (e.g. the
CPU backend's oneDNN weight packing) that a bare parameter copy would silently bypass.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import torch

from optimizer.checkpoints import ModelSet, iter_tensors, model_config, read_shapes
from optimizer.engines._allocator import retain_freed_memory
from optimizer.engines._tp_shards import ShardLayout, iter_merged_sharded, record_shards
from optimizer.errors import WORKER_ERROR_TAG, MergeoptError, ModelError
from optimizer.families import family_of
from optimizer.low_rank import Delta
from optimizer.low_rank import nbytes as delta_bytes
from optimizer.memory_plan import Machine
from optimizer.merge._precision import all_finite
from optimizer.merge._registry import MergeMethod
from optimizer.merge.plan import MergePlan
from optimizer.merge.streaming import Placement, load_for_merging, merged_tensors
from optimizer.merge.study_data import bind

__all__ = ["MergeWorkerExtension"]

T = TypeVar("T")


class MergeWorkerExtension:
    """Mixed into vLLM's worker class; every name starts with ``mergeopt_`` to avoid clashes."""

    def mergeopt_load(self, *args: Any, **kwargs: Any) -> dict[str, Any]:
        """:meth:`_mergeopt_load`, with mergeopt's own errors tagged so the engine can rebuild them."""
        try:
            return self._mergeopt_load(*args, **kwargs)
        except MergeoptError as exc:
            raise type(exc)(f"{WORKER_ERROR_TAG}{type(exc).__name__}: {exc}") from None

    def _mergeopt_load(
        self,
        base: str,
        specialists: dict[str, str],
        owner_pid: int | None = None,
        data_dir: str | None = None,
        placement: Placement = "resident",
    ) -> dict[str, Any]:
        """Load the base and each specialist once; keep base + task vectors for every later merge.

        ``data_dir`` holds the study's measured data for methods that need it (RegMean's Grams); it
        is read here, in the worker, so no tensor crosses the process boundary. ``placement``
        (the memory plan's) keeps the task vectors on the device or streams them from pinned host
        memory.
        """
        if owner_pid is not None:
            _watch_owner(owner_pid)
        # Every in-place reload warns that RotaryEmbedding (buffers only, nothing to load) kept its
        # tensors; that is expected for a merge, and would otherwise print once per trial.
        logging.getLogger("vllm.model_executor.model_loader.reload.layerwise").setLevel(logging.ERROR)
        model = self.model_runner.get_model()  # type: ignore[attr-defined]  # vLLM's worker provides it
        self.mergeopt_cpu_experts = _check_cpu_experts(model)  # packed again after each merge
        param = next(model.parameters())
        dtype = torch.float32 if param.dtype == torch.float32 else param.dtype
        # One specialist at a time, turned into its task vector at once: the load never holds more
        # than base + N task vectors + one checkpoint (a list of all checkpoints first would peak
        # at 2N + 1 model copies; measured in benchmarks/memory.py).
        models = ModelSet(Path(base), {k: Path(v) for k, v in specialists.items()})
        self.mergeopt_placement: Placement = placement
        # Under tensor parallelism each rank keeps only the slices its part of the model loads.
        self.mergeopt_layout = _shard_layout(self.model_runner, models.base, dtype)  # type: ignore[attr-defined]
        layout = self.mergeopt_layout

        def load() -> tuple[dict[str, torch.Tensor], dict[str, list[Delta]]]:
            narrow = layout.narrow if layout is not None else None
            return load_for_merging(models, dtype=dtype, device=param.device, placement=placement, narrow=narrow)

        self.mergeopt_base, self.mergeopt_deltas = load() if layout is None else _in_waves(models.base, dtype, load)
        self.mergeopt_models = tuple(specialists)
        self.mergeopt_family = family_of(model_config(Path(base)))
        # From here on every merge allocates the same sizes again: keep freed pages mapped. Not
        # before: the checkpoints read above are freed for good and should go back to the system.
        retain_freed_memory()
        self.mergeopt_data_dir = Path(data_dir) if data_dir else None
        self.mergeopt_base_dir = Path(base)
        self.mergeopt_bound: dict[str, MergeMethod] = {}
        held = sum(t.numel() * t.element_size() for t in self.mergeopt_base.values())
        held += sum(delta_bytes(d) for taus in self.mergeopt_deltas.values() for d in taus)
        return {
            "tensors": len(self.mergeopt_base),
            "bytes": held,
            "device": str(param.device),
        }

    @torch.no_grad()
    def mergeopt_apply_plan(self, plan: dict[str, Any]) -> dict[str, float]:
        """Merge ``plan`` tensor by tensor straight into the live model."""
        merge_plan = MergePlan.from_dict(plan)
        if tuple(merge_plan.models) != self.mergeopt_models:
            raise ValueError(f"plan is for models {merge_plan.models}, the worker holds {self.mergeopt_models}")
        t0 = time.perf_counter()
        finite = True
        method = self.mergeopt_bound.get(merge_plan.method)
        if method is None:
            method = bind(merge_plan.method, self.mergeopt_models, self.mergeopt_data_dir, self.mergeopt_base_dir)
            self.mergeopt_bound[merge_plan.method] = method

        def sharded_weights():
            nonlocal finite
            assert self.mergeopt_layout is not None and method is not None
            for name, for_loader, piece in iter_merged_sharded(
                merge_plan, self.mergeopt_base, self.mergeopt_deltas, method, self.mergeopt_layout, self.mergeopt_family
            ):
                if finite and not all_finite(piece):
                    finite = False
                yield name, for_loader

        def weights():
            nonlocal finite
            tensors = merged_tensors(
                merge_plan,
                self.mergeopt_base,
                self.mergeopt_deltas,
                method,
                self.mergeopt_placement,
                self.mergeopt_family,
            )
            for name, tensor in tensors:
                if finite and not all_finite(tensor):
                    finite = False
                yield name, tensor

        runner = self.model_runner  # type: ignore[attr-defined]  # vLLM's worker provides it
        iterator = weights() if self.mergeopt_layout is None else sharded_weights()
        runner.reload_weights(weights_iterator=iterator, is_checkpoint_format=True)
        _retie_head(runner.get_model(), runner.model_config.hf_config)
        _repack_cpu_experts(self.mergeopt_cpu_experts)
        return {"seconds": time.perf_counter() - t0, "finite": float(finite)}


def _shard_layout(runner: Any, base: Path, dtype: torch.dtype) -> ShardLayout | None:
    """Which slice of each tensor this rank owns, found by reloading the base through vLLM's loaders.

    None without tensor parallelism. The reload writes the base's own values, so the model is
    unchanged; every rank runs it, then the ranks exchange their tables (each needs all of them to
    gather a tensor whole for the methods that read whole tensors).
    """
    from vllm.distributed import get_tp_group

    group = get_tp_group()
    if group.world_size == 1:
        return None

    # Every rank at once (a reload may hold collectives), the base read one tensor at a time.
    own = record_shards(
        lambda it: runner.reload_weights(weights_iterator=it, is_checkpoint_format=True), iter_tensors(base, dtype)
    )
    model = runner.get_model()
    _retie_head(model, runner.model_config.hf_config)
    _repack_cpu_experts(_cpu_experts(model))
    tables: list[Any] = [None] * group.world_size
    torch.distributed.all_gather_object(tables, own, group=group.cpu_group)

    def all_gather(tensor: torch.Tensor) -> list[torch.Tensor]:
        return list(group.all_gather(tensor, dim=0).chunk(group.world_size, dim=0))

    return ShardLayout(tables, group.rank_in_group, read_shapes(base), all_gather)


def _in_waves(base: Path, dtype: torch.dtype, work: Callable[[], T]) -> T:
    """Run ``work`` on the tensor-parallel ranks a few at a time: as many as host memory holds.

    A rank forms its slices from whole checkpoints in host memory (the base and one specialist at
    a time); k ranks on one host doing that at once would need k times as much. Rank 0 decides how
    many go together (``MERGEOPT_TP_LOAD_AT_ONCE`` overrides it) so that every rank agrees.
    """
    from vllm.distributed import get_tp_group

    group = get_tp_group()
    need = 2 * sum(math.prod(s) for s in read_shapes(base).values()) * torch.finfo(dtype).bits // 8
    mine = int(os.environ.get("MERGEOPT_TP_LOAD_AT_ONCE") or max(1, Machine.here().host_bytes // max(need, 1)))
    choices: list[Any] = [None] * group.world_size
    torch.distributed.all_gather_object(choices, mine, group=group.cpu_group)
    at_once = max(1, min(int(choices[0]), group.world_size))
    result: T | None = None
    for first in range(0, group.world_size, at_once):
        if first <= group.rank_in_group < first + at_once:
            result = work()
        torch.distributed.barrier(group=group.cpu_group)
    assert result is not None
    return result


def _watch_owner(owner_pid: int) -> None:
    """End this worker and its engine-core parent when the process that owns the engine is gone.

    A study killed with SIGKILL (OOM killer, pre-emption, ``kill -9``) cannot shut vLLM down, and
    vLLM's engine-core and worker processes then live on as orphans holding the model's memory.
    A daemon thread polls the owner once a second; when it has vanished it takes the engine-core
    process (this worker's parent) and itself down.
    """

    def watch() -> None:
        while True:
            time.sleep(1.0)
            try:
                os.kill(owner_pid, 0)
            except ProcessLookupError:
                parent = os.getppid()
                if parent not in (0, 1, owner_pid):
                    with contextlib.suppress(ProcessLookupError, PermissionError):
                        os.kill(parent, signal.SIGKILL)
                os._exit(1)
            except PermissionError:
                pass  # exists, owned by someone else: still alive

    threading.Thread(target=watch, name="mergeopt-owner-watch", daemon=True).start()


def _retie_head(model: torch.nn.Module, hf_config: object) -> None:
    """Point a tied LM head at the freshly loaded embedding again.

    vLLM's in-place reload (0.32) loads only ``embed_tokens`` for a tied model and leaves the
    ``ParallelLMHead`` untouched: it keeps the old Parameter object and, on CPU, the oneDNN
    weights it packed at start-up, so logits would come from the *previous* candidate's head.
    Re-tying and re-running the head's own post-load processing (its quant method, the public
    hook the loader itself calls) restores the tie. Untied models are left alone.
    """
    if not getattr(hf_config, "tie_word_embeddings", False):
        return
    from vllm.model_executor.layers.vocab_parallel_embedding import ParallelLMHead, VocabParallelEmbedding

    embeds = [m for m in model.modules() if type(m) is VocabParallelEmbedding]
    heads = [m for m in model.modules() if isinstance(m, ParallelLMHead)]
    if len(embeds) != 1:
        return  # not the plain decoder layout this fix is for; vLLM handles the rest
    for head in heads:
        head.tie_weights(embeds[0])
        head.quant_method.process_weights_after_loading(head)


def _cpu_experts(model: torch.nn.Module) -> list[tuple[torch.nn.Module, Any]]:
    """(layer, experts) for every mixture-of-experts layer running vLLM's CPU unquantized kernel."""
    try:
        from vllm.model_executor.layers.fused_moe.experts.cpu_moe import CPUUnquantizedExperts
    except ImportError:
        return []
    found = []
    for module in model.modules():
        kernel = getattr(getattr(module, "quant_method", None), "moe_kernel", None)
        experts = getattr(kernel, "fused_experts", None)
        if isinstance(experts, CPUUnquantizedExperts):
            found.append((module, experts))
    return found


def _check_cpu_experts(model: torch.nn.Module) -> list[tuple[torch.nn.Module, Any]]:
    """The model's CPU expert layers; refuses, at load, the layouts :func:`_repack_cpu_experts` cannot restore."""
    found = _cpu_experts(model)
    for _, experts in found:
        config = experts.moe_config
        if experts._padded_intermediate_size(config) != config.intermediate_size_per_partition:
            raise ModelError(
                f"vLLM's CPU build pads this model's expert width ({config.intermediate_size_per_partition})"
                " for its kernel, which mergeopt cannot redo after an in-place merge; use engine: hf on CPU"
            )
    return found


def _repack_cpu_experts(layers: list[tuple[torch.nn.Module, Any]]) -> None:
    """Pack mixture-of-experts weights for vLLM's CPU kernel again after an in-place reload.

    The CPU build packs expert weights into its grouped-GEMM layout once, after loading. On a
    weight update its unquantized MoE method copies the new weights in checkpoint layout and skips
    that packing (measured: vLLM's own load and an in-place reload of the same base scored
    differently), so the experts would compute with unpacked weights. Running the experts'
    post-load step again packs them (tests/test_families.py: in-place merges then equal the
    transformers engine's). Layers that need padding are refused at load instead.
    """
    for module, experts in layers:
        experts.process_weights_after_loading(module)
