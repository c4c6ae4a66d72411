"""LoRA adapters as specialists: what holding them as factors saves, and what a merge costs.

On the real zoo's base (SmolLM2-135M-Instruct), three random LoRA adapters (peft, r = 16 on every
linear module, non-zero factors) and their full checkpoints (peft's ``merge_and_unload``, saved
bf16 as hub checkpoints are). Measured, in one run:

- ``memory``: the vLLM engine's peak RSS (all its processes) on the base alone, with the three
  adapters, and with the three full checkpoints (``memory.run``: start + 5 merges); what the
  specialists add, against the adapters' bytes on disk (target: ≤ 2×).
- ``merge``: one candidate merged over every tensor (``iter_merged``, float32, in this process),
  task arithmetic and TIES, adapters vs full task vectors. Task arithmetic on adapters runs the
  stacked matmul per tensor (Σ λ·s·B·A as [B₁…Bₙ]·diag(λ·s)·[A₁;…;Aₙ], ``low_rank.combine``);
  ``task_arithmetic_adapters_expanded_s`` times the expansion it replaced (each adapter expanded,
  then added), in the same run; TIES expands each adapter, tensor by tensor.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/adapters.py [--rank 16] [--plans 5]
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
sys.path.insert(0, str(ROOT / "benchmarks"))

import torch  # noqa: E402

from optimizer.checkpoints import ModelSet, load_task_vectors  # noqa: E402
from optimizer.low_rank import all_zero, dense_all, nbytes  # noqa: E402
from optimizer.merge import MergePlan, ModelParams, get_method  # noqa: E402
from optimizer.merge.apply import iter_merged  # noqa: E402
from optimizer.models import describe  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
WORK = ROOT / "benchmarks" / ".work" / "adapters"
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def make_adapters(base: Path, n: int, rank: int) -> tuple[list[Path], list[Path]]:
    """n random adapters of ``base`` and their merged full checkpoints (cached under .work)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    adapters, fulls = [], []
    for i in range(n):
        adapter, full = WORK / f"r{rank}-{i}", WORK / f"r{rank}-{i}-full"
        if not (full / "config.json").is_file():
            torch.manual_seed(i)
            model = AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32)
            peft_model = get_peft_model(
                model, LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=TARGETS, init_lora_weights=False)
            )
            with torch.no_grad():
                for name, p in peft_model.named_parameters():
                    if "lora_B" in name:
                        p.normal_(0, 0.01)
            peft_model.save_pretrained(str(adapter))
            merged = peft_model.merge_and_unload().to(torch.bfloat16)
            merged.save_pretrained(str(full), safe_serialization=True)
            copy_tokenizer(base, full)
        adapters.append(adapter)
        fulls.append(full)
    return adapters, fulls


def copy_tokenizer(base: Path, out: Path) -> None:
    """The tokenizer files beside a full checkpoint (vLLM loads them from the model folder)."""
    import shutil

    for item in base.iterdir():
        weights = item.name.endswith(".safetensors") or "index" in item.name
        if item.is_file() and not weights and not (out / item.name).exists():
            shutil.copy2(item, out / item.name)


def _median_time(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def merge_times(models_low: ModelSet, models_full: ModelSet, repeats: int) -> dict:
    names = models_low.names
    base, low = load_task_vectors(models_low)
    _, full = load_task_vectors(models_full)
    out: dict = {
        "held_bytes_adapters": sum(nbytes(d) for taus in low.values() for d in taus),
        "held_bytes_full": sum(nbytes(d) for taus in full.values() for d in taus),
    }
    for method, params in (
        ("task_arithmetic", {m: ModelParams(0.4 + 0.1 * i) for i, m in enumerate(names)}),
        ("ties", {m: ModelParams(0.5, 0.3) for m in names}),
    ):
        plan = MergePlan(method, tuple(names), params)
        for label, deltas in (("adapters", low), ("full", full)):

            def run(d=deltas, p=plan) -> None:
                for _ in iter_merged(p, base, d):
                    pass

            out[f"{method}_{label}_s"] = round(_median_time(run, repeats), 3)
            print(method, label, out[f"{method}_{label}_s"], flush=True)
    ta_plan = MergePlan("task_arithmetic", tuple(names), {m: ModelParams(0.4 + 0.1 * i) for i, m in enumerate(names)})
    method = get_method("task_arithmetic")

    def expanded() -> None:
        """Task arithmetic as merge_tensor did before the stacked path: each adapter expanded."""
        for name, b in base.items():
            taus = low[name]
            if all_zero(taus):
                b.clone()
                continue
            params = ta_plan.for_tensor(describe(name))
            method.merge(name, b, dense_all(taus), params, dict(method.options), torch.Generator())

    out["task_arithmetic_adapters_expanded_s"] = round(_median_time(expanded, repeats), 3)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--plans", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--skip-memory", action="store_true")
    args = parser.parse_args()
    from memory import run

    from optimizer.zoo.real import build_real_zoo, default_real_zoo_dir

    info = build_real_zoo(default_real_zoo_dir(), log=print)
    base = Path(info["root"]) / "base"
    adapters, fulls = make_adapters(base, 3, args.rank)
    names = [f"s{i}" for i in range(3)]
    low = ModelSet(base, dict(zip(names, adapters, strict=True)))
    full = ModelSet(base, dict(zip(names, fulls, strict=True)))
    disk = sum(p.stat().st_size for a in adapters for p in a.glob("*.safetensors"))
    result: dict = {
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "machine": f"{platform.machine()}, {__import__('os').cpu_count()} cores, CPU only",
        "model": "SmolLM2-135M-Instruct (real zoo base), float32 in the engines",
        "rank": args.rank,
        "targets": TARGETS,
        "adapter_bytes_on_disk": disk,
    }
    result["merge"] = merge_times(low, full, args.repeats)
    if not args.skip_memory:
        alone = run(ModelSet(base, {}), 2)
        with_adapters = run(low, args.plans)
        with_full = run(full, args.plans)
        gib = 1 << 30
        added_low = with_adapters["after_trials"]["peak_rss_gib"] - alone["after_trials"]["peak_rss_gib"]
        added_full = with_full["after_trials"]["peak_rss_gib"] - alone["after_trials"]["peak_rss_gib"]
        result["memory"] = {
            "engine_on_base_alone": alone,
            "with_adapters": with_adapters,
            "with_full": with_full,
            "added_by_adapters_gib": round(added_low, 3),
            "added_by_full_gib": round(added_full, 3),
            "adapters_on_disk_gib": round(disk / gib, 4),
            "added_over_disk": round(added_low * gib / disk, 2),
            "within_2x_of_disk": bool(added_low * gib <= 2 * disk),
        }
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / "adapters.json"
    if args.skip_memory and path.exists():  # keep the memory part of the last full run
        previous = json.loads(path.read_text())
        if "memory" in previous:
            result["memory"] = {**previous["memory"], "date": previous.get("date")}
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
