"""WIDEN's setting: merge a fine-tuned specialist with a *continually pre-trained* model.

WIDEN (Yu et al., 2024) was designed for a pair whose task vectors differ in size by orders of
magnitude: a short fine-tune (small delta) and a long continued pre-training (large delta).
Task arithmetic adds both at one scale, so the large delta swamps the small one. This benchmark
builds that pair from the zoo:

- ``rev``: the zoo's rev specialist (100 steps at lr 1.5e-4 from the base: a small delta);
- ``cpt``: the base continually pre-trained on a sort + rot mixture (``--steps`` steps at
  ``--lr`` 1e-3, a third of the zoo's pre-training rate: a large delta), cached under
  ``benchmarks/.work/widen_cpt`` per zoo version;

and scores, on held-out data (transformers engine), task arithmetic at λ = 1, task arithmetic with
(λ_rev, λ_cpt) chosen on the search split from a grid, the plain average, and WIDEN at its
defaults and with (t, s) chosen on the search split from a grid.

    .venv/bin/python benchmarks/widen_cpt.py [--steps 600]
"""

from __future__ import annotations

import argparse
import itertools
import json
import platform
import random
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from objectives.tasks import load_tasks  # noqa: E402
from optimizer.checkpoints import ModelSet, load_state_dict  # noqa: E402
from optimizer.config import config_from_dict  # noqa: E402
from optimizer.engines.hf_engine import HFEngine  # noqa: E402
from optimizer.merge import MergePlan, ModelParams  # noqa: E402
from optimizer.zoo import build_zoo, default_zoo_dir  # noqa: E402
from optimizer.zoo.build import ZOO_VERSION  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
WORK = ROOT / "benchmarks" / ".work" / "widen_cpt"
TASKS = ("rev", "sort", "rot")


def continually_pretrain(zoo: Path, out: Path, *, steps: int, lr: float, seed: int = 0) -> Path:
    """The base trained on a sort + rot mixture for ``steps`` steps at ``lr`` (cached)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from optimizer.zoo import _train
    from optimizer.zoo.tasks import TASKS as GENERATORS

    marker = out / "cpt.json"
    key = {"steps": steps, "lr": lr, "seed": seed, "zoo_version": ZOO_VERSION}  # a new zoo, a new base
    if marker.is_file() and json.loads(marker.read_text()) == key:
        return out
    torch.manual_seed(seed)
    torch.set_num_threads(1)
    tokenizer = AutoTokenizer.from_pretrained(str(zoo / "base"))
    model = AutoModelForCausalLM.from_pretrained(str(zoo / "base"), dtype=torch.float32)
    exclude = set()
    for t in TASKS:
        for split in ("search", "held_out"):
            for line in (zoo / "tasks" / t / f"{split}.jsonl").read_text().splitlines():
                exclude.add(json.loads(line)["prompt"])
    trainer = _train._Trainer(model, tokenizer)
    rng = random.Random(f"mergeopt-bench:cpt:{seed}")
    mix = [GENERATORS["sort"], GENERATORS["rot"]]
    for step in range(steps):
        loss = trainer.step(_train._draw(mix, [1.0, 1.0], 32, rng, exclude), lr)
        if step % 100 == 0:
            print(f"  cpt step {step}: loss {loss:.3f}", flush=True)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out), safe_serialization=True)
    tokenizer.save_pretrained(str(out))
    marker.write_text(json.dumps(key))
    return out


def _relative_delta(base: dict, other: dict) -> float:
    num = sum(float((other[k] - base[k]).float().norm() ** 2) for k in base)
    den = sum(float(base[k].float().norm() ** 2) for k in base)
    return (num / den) ** 0.5


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--limit", type=int, default=32)
    parser.add_argument("--held-out", type=int, default=128)
    args = parser.parse_args()
    zoo = default_zoo_dir()
    build_zoo(zoo)
    t0 = time.perf_counter()
    cpt = continually_pretrain(zoo, WORK / "cpt", steps=args.steps, lr=args.lr)
    train_s = time.perf_counter() - t0
    models = {"rev": zoo / "specialists" / "rev", "cpt": cpt}
    base_sd = load_state_dict(zoo / "base")
    size = {m: _relative_delta(base_sd, load_state_dict(p)) for m, p in models.items()}
    config = config_from_dict(
        {
            "name": "widen-cpt",
            "base": str(zoo / "base"),
            "models": {m: str(p) for m, p in models.items()},
            "objectives": [
                {
                    "name": t,
                    "data": str(zoo / "tasks" / t),
                    "metric": "exact_match",
                    "max_tokens": 14,
                    "limit": args.limit,
                    "held_out_limit": args.held_out,
                }
                for t in TASKS
            ],
        }
    )
    tasks = load_tasks(config)
    engine = HFEngine(ModelSet(zoo / "base", models))
    names = tuple(models)

    def score(plan: MergePlan, split: str) -> dict[str, float]:
        engine.apply_plan(plan)
        return {t.name: t.score(engine, split).value for t in tasks}

    def plan(method: str, weights: tuple[float, float] = (1.0, 1.0), **options: float) -> MergePlan:
        return MergePlan(method, names, {m: ModelParams(w) for m, w in zip(names, weights, strict=True)}, options)

    def chosen(candidates: list[MergePlan]) -> MergePlan:
        # The balanced choice on the search split: best worst task (held-out never seen).
        return max(candidates, key=lambda p: min(score(p, "search").values()))

    rows = {
        "base": plan("task_arithmetic", (0.0, 0.0)),
        "rev specialist": plan("task_arithmetic", (1.0, 0.0)),
        "cpt model": plan("task_arithmetic", (0.0, 1.0)),
        "average": plan("linear"),
        "task arithmetic λ=1": plan("task_arithmetic"),
    }
    grid = (0.25, 0.5, 0.75, 1.0)
    rows["task arithmetic, λ grid (search split)"] = chosen(
        [plan("task_arithmetic", w) for w in itertools.product(grid, grid)]
    )
    rows["WIDEN defaults (t=s=1)"] = plan("widen")
    rows["WIDEN, t/s grid (search split)"] = chosen(
        [plan("widen", t=t, s=s) for t, s in itertools.product((0.5, 1.0, 1.5, 2.5), (0.5, 1.0, 1.5, 2.0))]
    )
    results = {label: {"plan": p.to_dict(), "held_out": score(p, "held_out")} for label, p in rows.items()}
    for label, r in results.items():
        print(f"{label:40s} " + "  ".join(f"{t} {r['held_out'][t]:.3f}" for t in TASKS), flush=True)
    out = {
        "date": time.strftime("%Y-%m-%d"),
        "zoo_version": ZOO_VERSION,
        "machine": f"{platform.machine()}, {__import__('os').cpu_count()} cores, CPU only",
        "engine": "hf",
        "cpt": {"steps": args.steps, "lr": args.lr, "train_s": round(train_s, 1)},
        "relative_delta_norm": size,
        "held_out_examples": args.held_out,
        "results": results,
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "widen_cpt.json").write_text(json.dumps(out, indent=2) + "\n")
    print(f"relative ‖τ‖/‖θ0‖: {size}; wrote {RESULTS / 'widen_cpt.json'}")


if __name__ == "__main__":
    main()
