"""The one-shot GPU benchmark: what a borrowed GPU machine can measure in one short call.

The GPU machine has PyTorch, transformers and safetensors but no vLLM, so this measures the parts
of a trial that run there through mergeopt's own merge code:

- ``bandwidth``: device-to-device copy (bytes read + written) and pinned host-to-device copy;
  the ceilings every figure below is compared with.
- ``merge_core``: each merge method on one large float32 tensor, as effective GB/s (the fewest
  bytes a merge of N specialists must move, (N + 2) × tensor bytes, over its time) and as a share
  of the copy bandwidth (benchmarks/merge_core.py, run on the device).
- ``models``: for random-weight Llama-shaped models in bf16 (the real zoo's SmolLM2-135M shape,
  ~1B, ~8B) with N specialists: merge-in-place (every tensor merged and written into the live
  model) against reload-per-candidate (save the merged model as safetensors, load it into a fresh
  model on the device, first score), the first score alone, the peak device memory against the
  resident figure (model + base + N task vectors) and the memory plan's figure (``plan_GB``), and
  the merge with task vectors streamed from pinned host memory (optimizer/merge/streaming.py)
  against the host-to-device bandwidth. Each model row checks that the streamed and the reloaded
  models equal the merged-in-place one.

Writes ``<out>/<device>.json`` after every step, so a run cut short keeps what it measured.
``--cpu-dry-run`` runs every step on the CPU at tiny sizes (a test runs it).

    bash benchmarks/gpu/run.sh [--out DIR] [--budget-s 420] [--cpu-dry-run]
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import re
import statistics
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import merge_core  # noqa: E402
import torch  # noqa: E402

from optimizer.merge.apply import iter_merged  # noqa: E402
from optimizer.merge.plan import MergePlan, ModelParams  # noqa: E402
from optimizer.merge.streaming import iter_merged_streamed, pin  # noqa: E402

#: Llama-shaped configurations: the real zoo's base (SmolLM2-135M), Llama-3.2-1B, Llama-3-8B.
SHAPES: dict[str, dict[str, Any]] = {
    "smollm2-135m": dict(
        hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
        num_key_value_heads=3, vocab_size=49152, tie_word_embeddings=True,
    ),
    "llama-1b": dict(
        hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
        num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=True,
    ),
    "llama-8b": dict(
        hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
        num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=False,
    ),
}  # fmt: skip
DRY_SHAPES: dict[str, dict[str, Any]] = {
    "tiny": dict(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=512, tie_word_embeddings=True,
    ),
}  # fmt: skip
#: Sizes whose task vectors are also pinned and streamed (8B's 48 GB of pinned host memory
#: would outgrow the machine's RAM once the host allocator rounds each block up).
STREAMED = {"smollm2-135m", "llama-1b", "tiny"}


class Clock:
    """Wall time of a region, synchronised with the device so queued kernels are counted."""

    def __init__(self, device: torch.device):
        self.device = device

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def time(self, fn: Callable[[], object], repeats: int = 1, warmup: int = 0) -> float:
        for _ in range(warmup):
            fn()
        self.sync()
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            self.sync()
            times.append(time.perf_counter() - t0)
        return statistics.median(times)


def bandwidth(device: torch.device, nbytes: int, clock: Clock) -> dict[str, float]:
    """Device copy and pinned host→device copy, in GB/s."""
    n = nbytes // 4
    src = torch.randn(n, device=device)
    dst = torch.empty_like(src)
    d2d = clock.time(lambda: dst.copy_(src), repeats=10, warmup=2)
    host = torch.randn(n)
    if device.type == "cuda":
        host = host.pin_memory()
    h2d = clock.time(lambda: dst.copy_(host, non_blocking=True), repeats=10, warmup=2)
    return {"device_copy_GBps": round(2 * nbytes / d2d / 1e9, 1), "host_to_device_GBps": round(nbytes / h2d / 1e9, 1)}


def build(shape: dict[str, Any], n: int, device: torch.device, dtype: torch.dtype) -> tuple[Any, dict, dict]:
    """A random-weight Llama on ``device``, a copy of its weights as the base, N random task vectors."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**shape, max_position_embeddings=2048)
    torch.manual_seed(0)
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(default)
    model.eval()
    params = dict(model.named_parameters())  # a tied head appears once, as the embedding
    base = {k: p.detach().clone() for k, p in params.items()}
    deltas = {k: [torch.randn_like(p) * 1e-3 for _ in range(n)] for k, p in params.items()}
    return model, base, deltas


def plan_figure(shapes: dict[str, tuple[int, ...]], n: int) -> float | None:
    """What mergeopt's memory plan expects the transformers engine to hold on the GPU for this
    model and a task-arithmetic merge (model + base + N task vectors + merge workspace), in GB:
    the figure the measured peak is compared with. None where the plan cannot be imported (its
    config needs pydantic and PyYAML, which a bare GPU machine may lack)."""
    try:
        from optimizer.config import config_from_dict
        from optimizer.memory_plan import Machine, plan_for_shapes
    except ImportError:
        return None
    config = config_from_dict(
        {
            "name": "gpu-bench", "base": "/b", "models": {f"m{i}": f"/m{i}" for i in range(n)},
            "method": "task_arithmetic", "engine": "hf",
            "objectives": [{"name": "t", "data": "/d", "metric": "exact_match"}],
        }
    )  # fmt: skip
    plan = plan_for_shapes(config, shapes, n, Machine(gpus=1, device_bytes=10**15, host_bytes=10**15))
    need = 2 * plan.weight_bytes + plan.task_vector_bytes + plan.workspace_bytes
    return round(need / 1e9, 3)


def score(model: Any, ids: torch.Tensor) -> torch.Tensor:
    """The first score of a candidate: one forward pass over a batch (last-position logits)."""
    with torch.no_grad():
        return model(ids).logits[:, -1].float()


def save_and_reload(model: Any, device: torch.device, dtype: torch.dtype, clock: Clock) -> tuple[Any, float, float]:
    """Reload-per-candidate: the merged model written as safetensors and loaded into a fresh one."""
    from transformers import LlamaForCausalLM

    with tempfile.TemporaryDirectory(dir=ROOT / "benchmarks" / "gpu") as tmp:
        clock.sync()
        t0 = time.perf_counter()
        model.save_pretrained(tmp, safe_serialization=True)
        save_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        import transformers
        from packaging.version import Version

        # transformers renamed torch_dtype to dtype in 4.56; the GPU machine's may be older.
        key = "dtype" if Version(transformers.__version__) >= Version("4.56") else "torch_dtype"
        kwargs: dict[str, Any] = {key: dtype}
        if device.type == "cuda":
            kwargs["device_map"] = {"": device.index or 0}
        fresh = LlamaForCausalLM.from_pretrained(tmp, **kwargs)
        fresh.to(device).eval()
        clock.sync()
        load_s = time.perf_counter() - t0
    return fresh, save_s, load_s


def model_row(name: str, shape: dict[str, Any], args: argparse.Namespace, device: torch.device, clock: Clock,
              write: Callable[[], None], row: dict[str, Any]) -> None:  # fmt: skip
    """Fill ``row`` step by step (``write`` saves the JSON after each step)."""
    dtype = torch.bfloat16
    n = args.models
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    model, base, deltas = build(shape, n, device, dtype)
    params = dict(model.named_parameters())
    p_bytes = sum(t.numel() * t.element_size() for t in base.values())
    row.update(
        parameters=sum(t.numel() for t in base.values()),
        weight_GB=round(p_bytes / 1e9, 3),
        specialists=n,
        dtype="bfloat16",
        resident_GB=round((2 + n) * p_bytes / 1e9, 3),
        plan_GB=plan_figure({k: tuple(t.shape) for k, t in base.items()}, n),
    )
    write()
    models = tuple(f"m{i}" for i in range(n))
    plan = MergePlan("task_arithmetic", models, {m: ModelParams(0.3 + 0.1 * i) for i, m in enumerate(models)})

    def merge_in_place(p: MergePlan = plan) -> None:
        with torch.no_grad():
            for tensor, merged in iter_merged(p, base, deltas):
                params[tensor].copy_(merged)

    row["merge_in_place_s"] = round(clock.time(merge_in_place, repeats=3, warmup=1), 5)
    if device.type == "cuda":
        row["peak_device_GB"] = round(torch.cuda.max_memory_allocated(device) / 1e9, 3)
        row["peak_over_resident_GB"] = round(row["peak_device_GB"] - row["resident_GB"], 3)
    write()
    ids = torch.randint(0, shape["vocab_size"], (8, 128), generator=torch.Generator().manual_seed(1)).to(device)
    reference = score(model, ids)
    row["first_score_s"] = round(clock.time(lambda: score(model, ids), repeats=3, warmup=1), 5)
    write()
    ties = MergePlan("ties", models, {m: ModelParams(0.5, 0.3) for m in models})
    row["ties_merge_in_place_s"] = round(clock.time(lambda: merge_in_place(ties), repeats=1, warmup=1), 5)
    merge_in_place(plan)
    write()

    if name in STREAMED or name in (args.streamed or ()):
        t0 = time.perf_counter()
        host = pin(deltas)
        row["pin_s"] = round(time.perf_counter() - t0, 3)
        merged_streamed: dict[str, torch.Tensor] = {}

        def streamed(keep: bool = False) -> None:
            with torch.no_grad():
                for tensor, merged in iter_merged_streamed(plan, base, host):
                    if keep:
                        merged_streamed[tensor] = merged
                    else:
                        del merged

        # Free the resident task vectors first: a streamed merge is for when they do not fit.
        deltas = {}
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
        seconds = clock.time(streamed, repeats=3, warmup=1)
        row["streamed_merge_s"] = round(seconds, 5)
        row["streamed_GBps"] = round(n * p_bytes / seconds / 1e9, 2)
        if device.type == "cuda":
            row["streamed_peak_device_GB"] = round(torch.cuda.max_memory_allocated(device) / 1e9, 3)
        streamed(keep=True)
        row["streamed_equals_resident"] = all(torch.equal(merged_streamed[k], params[k]) for k in merged_streamed)
        del merged_streamed, host
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
            if hasattr(torch._C, "_host_emptyCache"):  # frees the pinned host cache (torch ≥ 2.5)
                torch._C._host_emptyCache()
        write()
    else:
        row["streamed"] = "skipped: the task vectors would not fit in pinned host memory beside the rest"
        deltas = {}

    base = deltas = {}
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    if time.perf_counter() - args.started > args.budget_s:
        row["reload"] = "skipped: over the run's time budget"
        write()
        return
    fresh, save_s, load_s = save_and_reload(model, device, dtype, clock)
    model = None
    gc.collect()
    t0 = time.perf_counter()
    reloaded = score(fresh, ids)
    clock.sync()
    first = time.perf_counter() - t0  # a fresh model's first forward (kernels already loaded)
    row.update(save_s=round(save_s, 3), load_s=round(load_s, 3), reload_first_score_s=round(first, 4))
    reload_s = save_s + load_s + first
    row["reload_per_candidate_s"] = round(reload_s, 3)
    row["reload_over_merge_in_place"] = round(reload_s / row["merge_in_place_s"], 1)
    row["reload_over_merge_and_score"] = round(reload_s / (row["merge_in_place_s"] + row["first_score_s"]), 1)
    row["reload_equals_in_place"] = bool(torch.equal(reloaded, reference))
    del fresh
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    write()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "gpu")
    parser.add_argument("--models", type=int, default=3, help="specialists merged")
    parser.add_argument("--budget-s", type=float, default=420.0, help="skip further reloads past this")
    parser.add_argument("--cpu-dry-run", action="store_true", help="every step on the CPU at tiny sizes")
    parser.add_argument("--sizes", nargs="*", help="model shapes to run (default: all)")
    parser.add_argument("--streamed", nargs="*", help="also stream these shapes (needs (N + 1) × weights of RAM)")
    parser.add_argument("--suffix", default="", help="appended to the result file's name")
    args = parser.parse_args()
    args.started = time.perf_counter()
    if not args.cpu_dry_run and not torch.cuda.is_available():
        raise SystemExit("no CUDA device here: run with --cpu-dry-run to check the script on the CPU")
    device = torch.device("cpu" if args.cpu_dry_run else "cuda:0")
    clock = Clock(device)
    name = "cpu-dry-run" if args.cpu_dry_run else re.sub(r"[^a-z0-9]+", "-", torch.cuda.get_device_name(0).lower())
    import transformers

    out: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "device": name,
        "machine": f"{platform.machine()}, {__import__('os').cpu_count()} cores",
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "command": "bash benchmarks/gpu/run.sh " + " ".join(sys.argv[1:]),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"{name}{args.suffix}.json"

    def write() -> None:
        path.write_text(json.dumps(out, indent=2) + "\n")

    def step(key: str, fn: Callable[[], Any]) -> None:
        try:
            out[key] = fn()
        except Exception as exc:  # one failed step keeps the others' figures
            out[key] = {"error": f"{type(exc).__name__}: {exc}"}
            traceback.print_exc()
        write()
        print(f"[{time.perf_counter() - args.started:6.1f} s] {key}: {json.dumps(out[key])[:400]}", flush=True)

    step("bandwidth", lambda: bandwidth(device, (64 << 20) if args.cpu_dry_run else (2 << 30), clock))
    size = 256 if args.cpu_dry_run else 8192
    step("merge_core", lambda: merge_core.measure(size, size, args.models, 3 if args.cpu_dry_run else 10, str(device)))
    shapes = DRY_SHAPES if args.cpu_dry_run else SHAPES
    out["models"] = {}
    for shape_name in args.sizes or list(shapes):
        row: dict[str, Any] = {}
        out["models"][shape_name] = row
        try:
            model_row(shape_name, shapes[shape_name], args, device, clock, write, row)
        except Exception as exc:
            row["error"] = f"{type(exc).__name__}: {exc}"
            traceback.print_exc()
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
        write()
        print(f"[{time.perf_counter() - args.started:6.1f} s] {shape_name}: {json.dumps(row)}", flush=True)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
