"""Merge-core throughput: each method on large tensors against the machine's copy bandwidth.

A merge of N specialists must read the base and N task vectors and write the result, so its
floor is (N + 2) × tensor bytes over the memory bandwidth. This measures, in one run:

- ``copy``: a plain ``dst.copy_(src)`` on the same size (read + write bytes / time);
- each method's time per tensor (median of ``--repeats``), as *effective* GB/s = the minimal
  bytes (N + 2) × tensor bytes / time, and as a share of the copy bandwidth.

Where a GPU is available the same run repeats on it (``--device cuda``); the JSON records the
device. RegMean includes its per-trial solve (Gram given), so it is compute-bound by design.

    .venv/bin/python benchmarks/merge_core.py [--rows 4096 --cols 4096 --models 3 --device cpu]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from optimizer.merge import ModelParams, get_method  # noqa: E402
from optimizer.merge.regmean import RegMeanMerge  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
METHODS = ("linear", "task_arithmetic", "ties", "dare_ties", "breadcrumbs_ties", "widen", "regmean")


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _time(fn, repeats: int, device: str) -> float:
    fn()  # warm-up (allocations, kernels)
    _sync(device)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def measure(rows: int, cols: int, models: int, repeats: int, dev: str) -> dict:
    """Copy bandwidth and each method's time on one ``rows × cols`` float32 tensor on ``dev``."""
    # The engines tune the allocator this way before their first merge (freed output buffers stay
    # mapped, so a merge does not page-fault its output in again); measure what they run.
    allocator_tuned = False
    if dev == "cpu":  # imported here: the engines package needs pydantic, absent on the GPU machine
        from optimizer.engines._allocator import retain_freed_memory

        allocator_tuned = retain_freed_memory()
    gen = torch.Generator().manual_seed(0)
    base = torch.randn(rows, cols, generator=gen).to(dev)
    deltas = [(torch.randn(rows, cols, generator=gen) * 0.01).to(dev) for _ in range(models)]
    nbytes = base.numel() * base.element_size()
    src, dst = torch.randn_like(base), torch.empty_like(base)
    copy_s = _time(lambda: dst.copy_(src), repeats, dev)
    copy_gbs = 2 * nbytes / copy_s / 1e9
    minimal = (models + 2) * nbytes
    params = [ModelParams(0.5 + 0.2 * i, 0.5) for i in range(models)]
    generator = torch.Generator(device=dev).manual_seed(0)
    table = {}
    for name in METHODS:
        method = get_method(name)
        options = dict(method.options)
        merge = method.merge
        if name == "regmean":
            # Grams of the layer inputs (cols × cols): measured once per study, given here.
            grams = []
            for _ in range(models):
                x = torch.randn(4 * cols, cols, generator=gen).to(dev)
                grams.append(x.T @ x / x.shape[0])
            merge = RegMeanMerge({"model.layers.0.mlp.down_proj": grams})
        assert merge is not None
        tensor = "model.layers.0.mlp.down_proj.weight"
        seconds = _time(lambda m=merge, o=options, t=tensor: m(t, base, deltas, params, o, generator), repeats, dev)
        gbs = minimal / seconds / 1e9
        table[name] = {
            "seconds": round(seconds, 5),
            "effective_GBps": round(gbs, 2),
            "of_copy": round(gbs / copy_gbs, 3),
        }
        print(f"{name:18s} {seconds * 1000:8.1f} ms  {gbs:6.1f} GB/s  {gbs / copy_gbs:6.1%} of copy", flush=True)
    return {
        "device": torch.cuda.get_device_name(0) if dev.startswith("cuda") else "CPU only (no GPU on this run)",
        "threads": torch.get_num_threads(),
        "allocator_retains_freed_memory": allocator_tuned,
        "tensor": [rows, cols],
        "dtype": "float32",
        "models": models,
        "copy_GBps": round(copy_gbs, 2),
        "methods": table,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=4096)
    parser.add_argument("--cols", type=int, default=4096)
    parser.add_argument("--models", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    result = measure(args.rows, args.cols, args.models, args.repeats, args.device)
    out = {
        "date": time.strftime("%Y-%m-%d"),
        "machine": f"{platform.machine()}, {__import__('os').cpu_count()} cores",
        **result,
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    suffix = "" if args.device == "cpu" else "-gpu"
    path = RESULTS / f"merge_core{suffix}.json"
    path.write_text(json.dumps(out, indent=2) + "\n")
    print(f"copy {result['copy_GBps']:.1f} GB/s; wrote {path}")


if __name__ == "__main__":
    main()
