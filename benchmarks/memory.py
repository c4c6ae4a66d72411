"""Peak memory of a worker: measured RSS against (N + 2) × model bytes + the engine's budget.

A worker holds the live model (1×), the base (1×) and N task vectors (N×) — that is the design's
(N + 2) × model bytes — plus what the engine itself needs (on CPU, ``VLLM_CPU_KVCACHE_SPACE``: 1 GiB
by default here). This starts the real vLLM engine, applies a few plans (merges happen in place,
so the peak must not grow with the number of trials), and reads every process of the engine's
tree from /proc: VmHWM (peak RSS) and VmRSS. The engine's fixed runtime (torch, vLLM, compiled
kernels) is measured separately by starting the same engine on the base alone (N = 0), so the
report shows both the raw peak and the part that scales with the models.

    .venv/bin/python benchmarks/memory.py [--large]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from optimizer.checkpoints import ModelSet, load_state_dict  # noqa: E402
from optimizer.merge import MergePlan, ModelParams  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
GIB = 1 << 30


def _tree(pid: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(children.get(p, []))
    return out


def _status_kib(pid: int, key: str) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def tree_memory() -> dict[str, float]:
    """Sum over this process and its descendants of peak RSS (VmHWM) and current RSS, in GiB."""
    pids = _tree(os.getpid())
    return {
        "peak_rss_gib": sum(_status_kib(p, "VmHWM") for p in pids) / (1 << 20),
        "rss_gib": sum(_status_kib(p, "VmRSS") for p in pids) / (1 << 20),
        "processes": len(pids),
    }


def run(models: ModelSet, n_plans: int) -> dict:
    """Start the engine on ``models`` (in a fresh child process) and measure its tree."""
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_child, args=(models, n_plans, queue))
    proc.start()
    result = queue.get(timeout=900)
    proc.join(timeout=120)
    return result


def _child(models: ModelSet, n_plans: int, queue) -> None:
    from optimizer.engines.vllm_engine import VLLMEngine

    engine = VLLMEngine(models)
    after_start = tree_memory()
    names = models.names
    for i in range(n_plans):
        if names:
            params = {m: ModelParams(0.3 + 0.1 * ((i + j) % 7)) for j, m in enumerate(names)}
            engine.apply_plan(MergePlan("task_arithmetic", names, params))
        engine.generate(["REV: abcd ="], max_tokens=4, stop=["\n"])
    after_trials = tree_memory()
    engine.close()
    queue.put({"after_start": after_start, "after_trials": after_trials})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--large", action="store_true", help="also a random 123 M-parameter model")
    parser.add_argument("--plans", type=int, default=10)
    args = parser.parse_args()
    from optimizer.zoo import build_zoo, default_zoo_dir

    zoo = default_zoo_dir()
    build_zoo(zoo)
    cases = {"zoo": ModelSet(zoo / "base", {t: zoo / "specialists" / t for t in ("rev", "sort", "rot")})}
    tmp = None
    if args.large:
        from trial_overhead import random_family_model

        tmp = tempfile.TemporaryDirectory(prefix="mergeopt-mem-")
        cases["large"] = random_family_model(Path(tmp.name), hidden=768, layers=12, vocab=32000, n_specialists=3)
    kv_gib = float(os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1"))
    out: dict = {
        "date": time.strftime("%Y-%m-%d"),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, CPU only",
        "kv_cache_gib": kv_gib,
        "cases": {},
    }
    for name, models in cases.items():
        base = load_state_dict(models.base)
        model_gib = sum(t.numel() * 4 for t in base.values()) / GIB  # float32 on CPU
        n = len(models.names)
        runtime = run(ModelSet(models.base, {}), 2)  # the engine alone: base loaded, nothing to merge
        full = run(models, args.plans)
        budget = (n + 2) * model_gib + kv_gib
        # What scales with the models: the full run minus the engine on the base alone (which
        # already holds the live model and the worker's copy of the base: 2 × model bytes).
        extra = full["after_trials"]["peak_rss_gib"] - runtime["after_trials"]["peak_rss_gib"]
        row = {
            "parameters": sum(t.numel() for t in base.values()),
            "model_gib": round(model_gib, 4),
            "specialists": n,
            "budget_gib": round(budget, 3),
            "engine_alone": runtime,
            "with_specialists": full,
            "extra_over_engine_alone_gib": round(extra, 3),
            "expected_extra_gib": round(n * model_gib, 3),
            "peak_minus_budget_gib": round(full["after_trials"]["peak_rss_gib"] - budget, 3),
            # The budget with the engine's own footprint measured rather than assumed: the engine
            # on the base alone (runtime, KV cache, live model, the worker's base) + N task vectors.
            "budget_engine_measured_gib": round(runtime["after_trials"]["peak_rss_gib"] + n * model_gib, 3),
            "within_1_gib_of_measured_budget": bool(
                full["after_trials"]["peak_rss_gib"] <= runtime["after_trials"]["peak_rss_gib"] + n * model_gib + 1.0
            ),
        }
        out["cases"][name] = row
        print(
            f"{name}: model {model_gib:.3f} GiB, budget (N+2)×model + KV = {budget:.2f} GiB;"
            f" peak RSS {full['after_trials']['peak_rss_gib']:.2f} GiB"
            f" (engine on the base alone {runtime['after_trials']['peak_rss_gib']:.2f} GiB;"
            f" specialists add {extra:.2f} GiB, N×model = {n * model_gib:.2f} GiB)",
            flush=True,
        )
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "memory.json").write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {RESULTS / 'memory.json'}")
    if tmp is not None:
        tmp.cleanup()


if __name__ == "__main__":
    main()
