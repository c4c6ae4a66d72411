"""HILA's exact importance: seconds per unit pass with and without skipping the layers below a unit.

:func:`~optimizer.merge.hila.importance_exact` runs one forward pass over a specialist's golden
answers per unit. Two savings, measured here side by side on the same units, golden answers and
process, in alternating rounds so a shared machine's drift falls on every setting alike:

- *before*: every decoder layer every pass, logits at every position (mergeopt before this);
- *head*: logits only at the positions whose next token is a golden answer token;
- *head + prefix*: also starting each unit's pass above the layers below it, from the outputs
  the specialist's own pass recorded (the default).

Each setting's table must equal the others' (the head setting changes only which logits are
computed, so its losses may differ in the last bits; the prefix setting repeats them exactly).

    .venv/bin/python benchmarks/hila_importance_speed.py [--zoo real|tiny] [--golden 16] [--every 4] [--rounds 2]
        [--model NAME]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

RESULTS = ROOT / "benchmarks" / "results"
WORK = ROOT / "benchmarks" / ".work"


def _inputs(zoo: str, golden: int):
    """The zoo's models and each specialist's first ``golden`` golden answers (generated once, cached)."""
    from objectives.golden import generate_golden, golden_by_specialist
    from optimizer.config import config_from_dict, load_config
    from optimizer.engines.hf_engine import HFEngine
    from optimizer.search.prepare import prepare
    from tests._cli import zoo_config

    work = WORK / f"hila_importance_speed_{zoo}"
    storage = f"sqlite:///{work / 'study.db'}"
    if zoo == "real":
        from optimizer.zoo.real import build_real_zoo, default_real_zoo_dir

        build_real_zoo(default_real_zoo_dir(), log=print)
        config = load_config(ROOT / "configs" / "real.yaml")
        config = config.model_copy(update={"name": "hila-speed", "storage": storage, "granularity": "model"})
    else:
        from optimizer.zoo import build_zoo, default_zoo_dir

        build_zoo(default_zoo_dir())
        config = config_from_dict({**zoo_config("hila-speed", limit=golden), "storage": storage})
    # Golden answers for the first `golden` search prompts (and one held-out prompt: both splits are written).
    limited = [o.model_copy(update={"limit": golden, "held_out_limit": 1}) for o in config.objectives]
    prepared = prepare(config.model_copy(update={"objectives": limited, "method": "task_arithmetic"}))
    out = work / "golden"
    if not out.exists():
        with HFEngine(prepared.models, device="cpu", dtype="float32") as engine:
            generate_golden(prepared.config, prepared.tasks, engine, out_dir=out)
    return prepared.models, golden_by_specialist(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--zoo", choices=("real", "tiny"), default="real")
    parser.add_argument("--golden", type=int, default=16, help="golden answers per specialist")
    parser.add_argument("--every", type=int, default=4, help="measure every n-th unit (all layers stay covered)")
    parser.add_argument("--rounds", type=int, default=2, help="alternating rounds of the three settings")
    parser.add_argument("--model", default=None, help="measure this specialist only (default: every one)")
    parser.add_argument("--out", default=None, help="results file (default hila_importance_speed_<zoo>.json)")
    args = parser.parse_args()

    import torch

    from optimizer.checkpoints import ModelSet, load_state_dict, model_config
    from optimizer.merge.hila import _importance, importance_exact, unit_slices
    from optimizer.merge.hila._prefix import DEFAULT_BUDGET

    models, golden = _inputs(args.zoo, args.golden)
    if args.model and args.model not in golden:
        parser.error(f"--model {args.model}: no specialist of that name (have: {', '.join(sorted(golden))})")
    if args.model:
        models = ModelSet(models.base, {args.model: models.specialists[args.model]})
        golden = {args.model: golden[args.model]}
    units = unit_slices(model_config(models.base), load_state_dict(models.base))[:: args.every]

    class _AllLogits(_importance._Probe):  # the "before" head: logits at every position
        def __init__(self, *a, **k) -> None:
            super().__init__(*a, **k)
            self.logits_at_targets = False

    def run(setting: str) -> tuple[float, dict]:
        original = _importance._Probe
        _importance._Probe = _AllLogits if setting == "before" else original  # type: ignore[misc]
        try:
            budget = DEFAULT_BUDGET if setting == "head+prefix" else 0
            t0 = time.perf_counter()
            table = importance_exact(models, golden, units=units, prefix_bytes=budget)
            return time.perf_counter() - t0, table
        finally:
            _importance._Probe = original  # type: ignore[misc]

    settings = ("before", "head", "head+prefix")
    seconds: dict[str, list[float]] = {s: [] for s in settings}
    tables: dict[str, dict] = {}
    for r in range(args.rounds):
        for s in settings if r % 2 == 0 else reversed(settings):
            took, tables[s] = run(s)
            seconds[s].append(round(took, 1))
            print(f"round {r}: {s} {took:.1f} s", flush=True)
    worst = {
        s: max(abs(tables[s][m][u] - tables["before"][m][u]) for m in tables[s] for u in tables[s][m]) for s in settings
    }
    if tables["head+prefix"] != tables["head"]:
        raise SystemExit("skipping the layers below each unit changed a loss: a bug to report")
    best = {s: min(v) for s, v in seconds.items()}
    out = {
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "zoo": args.zoo,
        "machine": f"{platform.machine()}, {platform.processor() or 'cpu'}, {os.cpu_count()} cores",
        "torch_threads": torch.get_num_threads(),
        "golden_per_specialist": args.golden,
        "units_measured": len(units),
        "specialists": sorted(golden),
        "seconds": seconds,
        "speedup_vs_before": {s: round(best["before"] / best[s], 2) for s in settings},
        "max_abs_difference_vs_before": worst,
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / (args.out or f"hila_importance_speed_{args.zoo}.json")
    path.write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps(out["speedup_vs_before"]), f"wrote {path}")


if __name__ == "__main__":
    main()
