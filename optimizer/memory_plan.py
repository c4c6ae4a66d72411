"""The memory plan: will this study fit on this machine, and where do the task vectors live?

Computed from the safetensors headers and the machine's memory before any engine starts, so a
study that cannot fit stops with one line saying what would, instead of an out-of-memory minutes
into an engine start. Its figures (printed at the start of every search) are:

- the engine's copy of the model (vLLM's weights, or the transformers model), its KV budget;
- mergeopt's own: the base and the N dense task vectors every merge reads, and the merge's
  workspace (temporaries of one tensor);
- where the task vectors live. ``resident``: on the device beside the engine (fastest: a merge
  runs at device bandwidth). ``streamed``: in pinned host memory, copied in tensor by tensor
  while the previous tensor merges (``optimizer/merge/streaming.py``; at host-link speed, ~0.9 s
  per 8B candidate on an H200, benchmarks/README.md).

On a GPU with vLLM, vLLM claims ``gpu_memory_utilization`` of the device for its weights and KV
cache at start-up; mergeopt's tensors must fit in the rest. Unset, the plan picks the largest
share (at most vLLM's default 0.9) that leaves room for them. With tensor parallelism each rank
keeps only its slice of the base and of every task vector (``optimizer/engines/_tp_shards.py``),
so mergeopt's figure per GPU divides by the degree, plus one whole tensor of workspace (N + 2 for
methods that gather a tensor whole to merge it).
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

from optimizer.adapters import is_adapter, read_adapter
from optimizer.checkpoints import ModelSet, read_shapes
from optimizer.config import StudyConfig
from optimizer.errors import ConfigError

__all__ = ["Machine", "MemoryPlan", "plan_for_shapes", "plan_memory"]

GiB = 1 << 30
#: Kept free on every device for CUDA contexts, the allocator's fragmentation and NCCL buffers.
_MARGIN = 1 * GiB
#: vLLM's needs beyond its weights: a KV cache worth serving from and its activation peak.
_VLLM_MIN_KV = 1 * GiB
_VLLM_ACTIVATIONS = 2 * GiB
#: vLLM's own default share of the device.
_VLLM_DEFAULT_UTILIZATION = 0.9
#: Pinned host blocks are rounded up by PyTorch's host allocator; room for that.
_PINNED_OVERHEAD = 1.25
#: The CPU build's KV cache when ``vllm.cpu_kv_cache_gib`` is unset (vllm_engine's default).
_CPU_KV_DEFAULT_GIB = 1.0
#: Python, the tokenizer, vLLM's CPU worker and its compiled graphs (the real zoo's engine on the
#: base alone peaks at about this above its weights; benchmarks/results/real_zoo.json).
_PROCESS_OVERHEAD = 3 * GiB
#: Methods whose merge of one tensor needs only the output and one temporary.
_LIGHT_METHODS = frozenset({"linear", "task_arithmetic"})


@dataclass(frozen=True)
class Machine:
    """The memory a study may use here: each GPU's total, and the host's available RAM."""

    gpus: int
    device_bytes: int  # per GPU; 0 without one
    host_bytes: int

    @classmethod
    def here(cls) -> Machine:
        """This machine, read without initialising CUDA in this process (vLLM forks workers)."""
        gpus, device = _gpus()
        return cls(gpus=gpus, device_bytes=device, host_bytes=_host_available())


@dataclass(frozen=True)
class MemoryPlan:
    """What a study will hold where; ``lines()`` is what the search prints at its start."""

    engine: str
    on_gpu: bool
    specialists: int
    dtype_bytes: int
    weight_bytes: int  # one copy of the model in the engine's dtype
    task_vector_bytes: int  # the N specialists' task vectors as held (adapters: their factors)
    largest_tensor_bytes: int
    workspace_bytes: int
    kv_bytes: int
    placement: Literal["resident", "streamed"]
    gpu_memory_utilization: float | None  # what vLLM is given (None: not a GPU vLLM study)
    device_bytes: int
    host_bytes: int
    #: vLLM's tensor-parallel degree: each rank holds 1/k of the base and task vectors.
    tensor_parallel: int = 1

    def lines(self) -> list[str]:
        """The plan as a few log lines: every figure a user needs to see why it fits."""
        gb = _gb
        where = "the GPU" if self.on_gpu else "the host (CPU engine)"
        head = (
            f"memory: model {gb(self.weight_bytes)}, base + {self.specialists} task vectors"
            f" {gb(self.weight_bytes + self.task_vector_bytes)}, merge workspace {gb(self.workspace_bytes)}"
        )
        if self.tensor_parallel > 1:
            head += f"; each of {self.tensor_parallel} GPUs holds its slice, about 1/{self.tensor_parallel} of them"
        if self.placement == "streamed":
            place = (
                f"memory: task vectors streamed from pinned host memory ({gb(self.task_vector_bytes)} of"
                f" {gb(self.host_bytes)} available): they do not fit on the GPU beside the engine"
            )
        else:
            place = f"memory: task vectors resident on {where}"
        lines = [head, place]
        if self.gpu_memory_utilization is not None:
            lines.append(
                f"memory: vLLM gets {self.gpu_memory_utilization:.2f} of {gb(self.device_bytes)} per GPU"
                f" (about {gb(self.kv_bytes)} of it for the KV cache once its weights are in)"
            )
        elif not self.on_gpu:
            need = _cpu_need(self)
            lines.append(f"memory: {gb(need)} of {gb(self.host_bytes)} available host memory (KV {gb(self.kv_bytes)})")
        return lines


def plan_memory(config: StudyConfig, models: ModelSet, machine: Machine) -> MemoryPlan:
    """The plan for ``config`` on ``machine``, or a :class:`ConfigError` saying what would fit."""
    on_gpu = machine.gpus > 0 and config.device != "cpu"
    dtype_bytes = _dtype_bytes(config.dtype, on_gpu)
    shapes = read_shapes(models.base)
    weight = sum(math.prod(s) for s in shapes.values()) * dtype_bytes
    held = sum(
        read_adapter(path, name).bytes_held(dtype_bytes) if is_adapter(path) else weight
        for name, path in models.specialists.items()
    )
    return plan_for_shapes(config, shapes, len(models.specialists), machine, task_vector_bytes=held)


def plan_for_shapes(
    config: StudyConfig,
    shapes: Mapping[str, tuple[int, ...]],
    n: int,
    machine: Machine,
    *,
    task_vector_bytes: int | None = None,
) -> MemoryPlan:
    """The plan for a base of these tensor shapes and ``n`` specialists (what-if sizing, tests).

    ``task_vector_bytes``: what the specialists' task vectors take held (default: n dense ones;
    LoRA adapters are held as their factors, a few percent of that).
    """
    on_gpu = machine.gpus > 0 and config.device != "cpu"
    dtype_bytes = _dtype_bytes(config.dtype, on_gpu)
    numels = [math.prod(s) for s in shapes.values()]
    weight = sum(numels) * dtype_bytes
    held = n * weight if task_vector_bytes is None else task_vector_bytes
    largest = max(numels, default=0) * dtype_bytes
    # A TIES-like merge holds fp32 copies of a tensor's N task vectors, masks and its output.
    workspace = 2 * largest if config.method in _LIGHT_METHODS else (n + 2) * (largest // dtype_bytes) * 4
    common = dict(
        engine=config.engine, on_gpu=on_gpu, specialists=n, dtype_bytes=dtype_bytes, weight_bytes=weight,
        task_vector_bytes=held, largest_tensor_bytes=largest, workspace_bytes=workspace,
        device_bytes=machine.device_bytes, host_bytes=machine.host_bytes,
    )  # fmt: skip
    if not on_gpu:
        # vLLM's CPU build gives each tensor-parallel worker a KV cache of this size.
        per_worker = (config.vllm.cpu_kv_cache_gib or _CPU_KV_DEFAULT_GIB) * config.vllm.tensor_parallel_size
        kv = int(per_worker * GiB) if config.engine == "vllm" else 0
        plan = MemoryPlan(**common, kv_bytes=kv, placement="resident", gpu_memory_utilization=None)  # type: ignore[arg-type]
        _check_host(plan, config)
        return plan
    return _plan_gpu(config, common, machine, shapes)


def _plan_gpu(config: StudyConfig, common: dict, machine: Machine, shapes: Mapping[str, tuple[int, ...]]) -> MemoryPlan:
    weight, n, largest = common["weight_bytes"], common["specialists"], common["largest_tensor_bytes"]
    held = common["task_vector_bytes"]
    total = machine.device_bytes
    vllm = config.engine == "vllm"
    # Under tensor parallelism each rank holds its slice of the base and of every task vector; a
    # merge needs one tensor whole for vLLM's loader, and methods that read whole tensors gather
    # that tensor's N + 1 inputs (optimizer/engines/_tp_shards.py).
    tp = config.vllm.tensor_parallel_size if vllm else 1
    per_gpu = _tp_share(shapes, tp)
    gather = 0 if tp == 1 else largest * (1 if config.method in _LIGHT_METHODS else n + 2)
    workspace = common["workspace_bytes"] + gather
    resident = int((weight + held) * per_gpu) + workspace  # base + N task vectors + workspace, per GPU
    streamed = int(weight * per_gpu) + workspace + 2 * n * largest  # base + two tensors in flight
    host_streamed = int(held * _PINNED_OVERHEAD * per_gpu * tp)  # all ranks' slices together
    engine_min = (weight / config.vllm.tensor_parallel_size + _VLLM_MIN_KV + _VLLM_ACTIVATIONS) if vllm else weight
    user_share = config.vllm.gpu_memory_utilization if vllm else None
    if user_share is not None and user_share * total < engine_min:
        raise ConfigError(
            f"vllm.gpu_memory_utilization {user_share:g} gives vLLM {_gb(user_share * total)} per GPU, but its"
            f" weights alone take {_gb(weight / config.vllm.tensor_parallel_size)} plus a KV cache; raise it"
            f" (at least {engine_min / total:.2f}) or use tensor_parallel_size > 1"
        )

    def share_for(ours: int) -> float | None:
        """vLLM's share when mergeopt keeps ``ours`` on the device, or None when both cannot fit."""
        if user_share is not None:
            return user_share if ours + _MARGIN <= total * (1 - user_share) else None
        share = min(_VLLM_DEFAULT_UTILIZATION, (total - ours - _MARGIN) / total)
        return share if share * total >= engine_min else None

    if not vllm:  # the transformers engine: its model and mergeopt's tensors share the device
        fits_resident = weight + resident + _MARGIN <= total
        fits_streamed = weight + streamed + _MARGIN <= total
        share_resident = share_streamed = None
    else:
        share_resident, share_streamed = share_for(resident), share_for(streamed)
        fits_resident, fits_streamed = share_resident is not None, share_streamed is not None
    host_ok = host_streamed <= machine.host_bytes
    if tp > 1 and 2 * weight > machine.host_bytes:
        # Each worker forms its slices from the whole base and one whole specialist at a time in
        # host memory (optimizer/checkpoints.py: load_task_vectors); the workers take turns when
        # host memory holds fewer of them at once (optimizer/engines/_vllm_worker.py: _in_waves).
        raise ConfigError(
            f"memory: with vllm.tensor_parallel_size {tp} each worker reads the base and one specialist"
            f" whole into host memory while it loads ({_gb(2 * weight)}), and {_gb(machine.host_bytes)} is"
            " available; use a machine with more host memory"
        )
    if fits_resident:
        placement, share = "resident", share_resident
    elif fits_streamed and host_ok:
        placement, share = "streamed", share_streamed
    else:
        needs = (resident, streamed, host_streamed)
        raise ConfigError(_no_fit(config, common, machine, needs, fits_streamed, per_gpu, workspace))
    kv = int(share * total - weight / config.vllm.tensor_parallel_size) if share is not None else 0
    return MemoryPlan(
        **common,
        kv_bytes=kv,
        placement=placement,  # type: ignore[arg-type]
        gpu_memory_utilization=share,
        tensor_parallel=tp,
    )


#: Checkpoint tensors vLLM's loaders cut in several pieces per rank (fused in the checkpoint, as
#: Phi-3 stores them): each rank keeps them whole (optimizer/engines/_tp_shards.py).
_FUSED_IN_CHECKPOINT = ("qkv_proj.", "gate_up_proj.")


def _tp_share(shapes: Mapping[str, tuple[int, ...]], tp: int) -> float:
    """The share of a model's bytes each of ``tp`` ranks keeps: 1/tp of the tensors vLLM shards,
    all of those it keeps whole on every rank (1-D norms and biases, fused checkpoint tensors)."""
    if tp == 1:
        return 1.0
    numels = {k: math.prod(s) for k, s in shapes.items()}
    total = sum(numels.values()) or 1
    whole = sum(v for k, v in numels.items() if len(shapes[k]) < 2 or any(f in k for f in _FUSED_IN_CHECKPOINT))
    return (whole + (total - whole) / tp) / total


def _no_fit(
    config: StudyConfig,
    common: dict,
    machine: Machine,
    needs: tuple[int, int, int],
    fits_streamed: bool,
    per_gpu: float,
    workspace: int,
) -> str:
    """One line: why nothing fits, and what would (``needs``: resident, streamed, pinned host bytes)."""
    resident, streamed, host = needs
    weight, n = common["weight_bytes"], common["specialists"]
    total = machine.device_bytes
    share = config.vllm.gpu_memory_utilization
    if config.engine != "vllm":
        engine = weight
    elif share is not None:
        engine = share * total
    else:  # the plan would have lowered vLLM's share down to what it needs
        engine = weight / config.vllm.tensor_parallel_size + _VLLM_MIN_KV + _VLLM_ACTIVATIONS
    room = total - engine - _MARGIN
    per = int(weight * per_gpu)  # one copy's slice on each GPU
    fit_n = max(0, int((room - per - workspace) // per)) if per else 0
    more_gpus = " a higher vllm.tensor_parallel_size," if config.engine == "vllm" else ""
    where = (
        f"streaming them needs {_gb(host)} of pinned host memory and {_gb(machine.host_bytes)} is available"
        if fits_streamed
        else f"even streamed from host memory mergeopt needs {_gb(streamed)} on each GPU"
    )
    return (
        f"memory: base + {n} task vectors need {_gb(resident)} on each GPU beside the engine's {_gb(engine)}"
        f" of {_gb(total)}, and {where}; use at most {fit_n} specialists, LoRA adapters,{more_gpus} a lower"
        " vllm.gpu_memory_utilization, or a machine with more memory"
    )


def _cpu_need(plan: MemoryPlan) -> int:
    engine = plan.weight_bytes + plan.kv_bytes if plan.engine == "vllm" else plan.weight_bytes
    return engine + plan.weight_bytes + plan.task_vector_bytes + plan.workspace_bytes + _PROCESS_OVERHEAD


def _check_host(plan: MemoryPlan, config: StudyConfig) -> None:
    need = _cpu_need(plan)
    if need <= plan.host_bytes:
        return
    kv_hint = " a smaller vllm.cpu_kv_cache_gib," if config.engine == "vllm" and plan.kv_bytes > 2 * GiB else ""
    per = plan.weight_bytes
    spare = plan.host_bytes - (need - plan.task_vector_bytes)
    fit_n = max(0, int(spare // per)) if per else 0
    raise ConfigError(
        f"memory: this study needs {_gb(need)} of host memory (engine {_gb(plan.weight_bytes)} + KV"
        f" {_gb(plan.kv_bytes)}, base + {plan.specialists} task vectors"
        f" {_gb(plan.weight_bytes + plan.task_vector_bytes)}) and {_gb(plan.host_bytes)} is available;"
        f" use{kv_hint} at most {fit_n} specialists, or a machine with more memory"
    )


def _dtype_bytes(dtype: str, on_gpu: bool) -> int:
    if dtype == "auto":
        return 2 if on_gpu else 4  # the engines' rule: bf16 on GPUs, float32 on CPUs
    return {"float32": 4, "float16": 2, "bfloat16": 2}[dtype]


def _gb(n: float) -> str:
    return f"{n / 1e9:.1f} GB" if n >= 1e8 else f"{n / 1e6:.1f} MB"


def _gpus() -> tuple[int, int]:
    """(count, bytes per GPU) from NVML; torch's count (also NVML-based) when pynvml is absent."""
    try:
        import pynvml  # type: ignore[import-not-found]  # nvidia-ml-py: on GPU machines only

        pynvml.nvmlInit()
        try:
            count = pynvml.nvmlDeviceGetCount()
            if count == 0:
                return 0, 0
            visible = os.environ.get("CUDA_VISIBLE_DEVICES")
            index = int(visible.split(",")[0]) if visible and visible.split(",")[0].isdigit() else 0
            mem = pynvml.nvmlDeviceGetMemoryInfo(pynvml.nvmlDeviceGetHandleByIndex(index)).total
            if visible is not None:
                count = len([v for v in visible.split(",") if v.strip()])
            return count, int(mem)
        finally:
            pynvml.nvmlShutdown()
    except Exception:  # no NVML (CPU machines, or no driver): ask torch
        import torch

        if not torch.cuda.is_available():
            return 0, 0
        return torch.cuda.device_count(), torch.cuda.get_device_properties(0).total_memory


def _host_available() -> int:
    """MemAvailable from /proc/meminfo (what can be allocated without swapping); else total RAM."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
