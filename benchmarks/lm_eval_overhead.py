"""What scoring through lm-evaluation-harness costs per trial, against the same tasks as native
objectives (same docs, same prompts, same engine, one run; issue 19).

Two tiny-zoo tasks as the harness's YAMLs in ``configs/lm_eval/zoo`` define them — ``zoo_rev``
(greedy generation, regex answer filter, exact match) and ``zoo_rot_mc`` (multiple choice by
log-likelihood) — and as native objectives over the very docs the harness objectives search on
(the same rows written to a data folder, the same regex, choices and stop string). Each trial's
scoring is timed alternately for the two, on one engine holding one merge, and the verdicts are
compared: the harness's overhead is (harness − native) / native scoring time. Since the two
differ by a few percent and these machines are noisy, the bookkeeping of each is also timed alone,
on an engine that answers instantly: (harness − native) bookkeeping / native scoring time is the
overhead without the engine's noise.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/lm_eval_overhead.py [--engine vllm] [--repeats 12]

Run from the repository root (the task YAMLs' data paths are relative to it).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("TQDM_DISABLE", "1")

from collections.abc import Sequence  # noqa: E402

from objectives.harness_tasks import HarnessTask  # noqa: E402
from objectives.tasks import load_tasks, score_tasks  # noqa: E402
from optimizer.checkpoints import ModelSet  # noqa: E402
from optimizer.config import config_from_dict  # noqa: E402
from optimizer.engines import make_engine  # noqa: E402
from optimizer.engines.base import Engine, LogLikelihood  # noqa: E402
from optimizer.merge.plan import MergePlan, ModelParams  # noqa: E402
from optimizer.zoo import build_zoo, default_zoo_dir  # noqa: E402

TASKS = ROOT / "configs" / "lm_eval" / "zoo"
DATA = TASKS / "data"


def _study(zoo: Path, objectives: list[dict], root: Path, engine: str) -> dict:
    return {
        "name": "overhead",
        "base": str(zoo / "base"),
        "models": {t: str(zoo / "specialists" / t) for t in ("rev", "sort", "rot")},
        "method": "task_arithmetic",
        "granularity": "model",
        "weight": {"low": 0.0, "high": 1.5},
        "objectives": objectives,
        "engine": engine,
        "storage": f"sqlite:///{root / 's.db'}",
    }


def _native_folder(root: Path, name: str, file: str, ids: list[int]) -> Path:
    """The harness objective's search docs as a native data folder (search = held_out = those rows)."""
    rows = (DATA / file).read_text().splitlines()
    chosen = "".join(rows[i] + "\n" for i in ids)
    folder = root / name
    folder.mkdir()
    for split in ("search", "held_out"):
        (folder / f"{split}.jsonl").write_text(chosen)
    return folder


class _Instant(Engine):
    """Answers at once (a fixed text, a fixed log-likelihood): what is left of a scoring call is
    the bookkeeping around the engine, mergeopt's or the harness's."""

    def apply_plan(self, plan: MergePlan) -> None:
        pass

    def generate(self, prompts: Sequence[str], *, max_tokens: int, stop: Sequence[str]) -> list[str]:
        return [" abc"] * len(prompts)

    def loglikelihood(self, requests: Sequence[tuple[str, str]]) -> list[LogLikelihood]:
        return [LogLikelihood(-1.0, 1, True)] * len(requests)

    def loglikelihood_tokens(self, requests: Sequence[tuple[list[int], list[int]]]) -> list[LogLikelihood]:
        return [LogLikelihood(-1.0, 1, True)] * len(requests)


def _bookkeeping(tasks: list, repeats: int) -> float:
    """Median seconds of a scoring call on an engine that answers instantly."""
    engine = _Instant()
    score_tasks(engine, tasks)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        score_tasks(engine, tasks)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def run(engine_name: str, limit: int, repeats: int) -> dict:
    zoo = default_zoo_dir()
    build_zoo(zoo, log=lambda _: None)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        harness_objectives = [
            {"name": "rev", "lm_eval": {"task": "zoo_rev", "include_path": str(TASKS)}, "limit": limit},
            {"name": "rot", "lm_eval": {"task": "zoo_rot_mc", "include_path": str(TASKS)}, "limit": limit},
        ]
        config = config_from_dict(_study(zoo, harness_objectives, root, engine_name), root=root)
        harness = load_tasks(config)
        assert all(isinstance(t, HarnessTask) for t in harness)
        rev_ids = harness[0].docs["search"]["zoo_rev"]  # type: ignore[union-attr]
        rot_ids = harness[1].docs["search"]["zoo_rot_mc"]  # type: ignore[union-attr]
        native_objectives = [
            {
                "name": "rev",
                "data": str(_native_folder(root, "rev", "rev_test.jsonl", rev_ids)),
                "metric": "exact_match",
                "max_tokens": 14,
                "extract": "([a-z]+)",
            },
            {
                "name": "rot",
                "data": str(_native_folder(root, "rot", "rot_mc_test.jsonl", rot_ids)),
                "metric": "mc_loglik",
                "target_field": "label",
            },
        ]
        native = load_tasks(config_from_dict(_study(zoo, native_objectives, root, engine_name), root=root))
        names = tuple(config.models)
        bookkeeping = {"native": _bookkeeping(native, 3 * repeats), "lm_eval": _bookkeeping(harness, 3 * repeats)}
        engine = make_engine(engine_name, ModelSet(config.path(config.base), {n: config.model_path(n) for n in names}))
        try:
            plan = MergePlan("task_arithmetic", names, {n: ModelParams(weight=0.5) for n in names})
            engine.apply_plan(plan)
            for tasks in (native, harness):  # warm-up: compiled graphs, caches, first imports
                score_tasks(engine, tasks)
            times: dict[str, list[float]] = {"native": [], "lm_eval": []}
            values: dict[str, list[float]] = {}
            for _ in range(repeats):
                for label, tasks in (("native", native), ("lm_eval", harness)):
                    t0 = time.perf_counter()
                    results = score_tasks(engine, tasks)
                    times[label].append(time.perf_counter() - t0)
                    values[label] = [r.value for r in results]
                    verdicts = [r.per_example for r in results]
                    if label == "native":
                        native_verdicts = verdicts
                    else:
                        agree = sum(
                            a == b
                            for n, h in zip(native_verdicts, verdicts, strict=True)
                            for a, b in zip(n, h, strict=True)
                        )
        finally:
            engine.close()
    native_s, harness_s = statistics.median(times["native"]), statistics.median(times["lm_eval"])
    return {
        "engine": engine_name,
        "docs_per_task": limit,
        "repeats": repeats,
        "native_scoring_s": round(native_s, 4),
        "lm_eval_scoring_s": round(harness_s, 4),
        "overhead_s": round(harness_s - native_s, 4),
        "overhead_share": round((harness_s - native_s) / native_s, 4),
        "bookkeeping_s": {k: round(v, 4) for k, v in bookkeeping.items()},
        "bookkeeping_overhead_share": round((bookkeeping["lm_eval"] - bookkeeping["native"]) / native_s, 4),
        "scores": values,
        "verdicts_agree": f"{agree}/{2 * limit}",
        "all_times_s": {k: [round(x, 4) for x in v] for k, v in times.items()},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--engine", default="vllm", choices=["vllm", "hf"])
    parser.add_argument("--limit", type=int, default=64, help="search docs per task")
    parser.add_argument("--repeats", type=int, default=12)
    args = parser.parse_args()
    os.chdir(ROOT)
    result = {
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "machine": f"{platform.node()} {platform.machine()}, {os.cpu_count()} cores, CPU only",
        **run(args.engine, args.limit, args.repeats),
    }
    out = ROOT / "benchmarks" / "results" / f"lm_eval_overhead_{args.engine}.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
