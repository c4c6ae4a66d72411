"""What a candidate costs: merge in place inside vLLM versus the reload-per-candidate practice.

For each model (the zoo's, and a random ≥100M-parameter model of the same family) this measures,
in one run on one machine:

- ``merge``: ``VLLMEngine.apply_plan`` (merge core + vLLM's in-place reload + prefix-cache reset),
  median of several plans;
- ``reload``: what tools without in-engine merging do per candidate — write the merged
  checkpoint, start a new vLLM ``LLM`` on it, score once — for one candidate;
- ``copy_floor``: the bytes a merge must move (read base + N task vectors, write the result)
  over this machine's measured copy bandwidth: the memory-bound floor of any merge.

It also runs a short zoo study with the vLLM engine and reports the share of trial wall time
spent scoring (trial user attrs ``seconds``), and the study loop's own cost per trial with an
engine that answers at once (``bookkeeping``) and how that cost grows over a long per-layer study
(``scaling``). Results go to ``benchmarks/results/trial_overhead.json``.

    .venv/bin/python benchmarks/trial_overhead.py [--quick] [--study-only | --bookkeeping-only | --scaling-only]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from optimizer.checkpoints import ModelSet, load_state_dict  # noqa: E402
from optimizer.merge import MergePlan, ModelParams, merge_state_dict, task_vectors  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"


def copy_bandwidth_gbs(nbytes: int = 1 << 30, repeats: int = 5) -> float:
    """Best-of-``repeats`` read+write bandwidth of a plain tensor copy (GB/s, bytes read + written)."""
    src = torch.ones(nbytes // 4, dtype=torch.float32)
    dst = torch.empty_like(src)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        dst.copy_(src)
        best = min(best, time.perf_counter() - t0)
    return 2 * nbytes / best / 1e9


def random_family_model(root: Path, *, hidden: int, layers: int, vocab: int, n_specialists: int) -> ModelSet:
    """A random Llama of the zoo's family at a chosen size, plus specialists = base + small deltas."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from optimizer.zoo._tokenizer import build_tokenizer

    tokenizer = build_tokenizer()
    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=int(hidden * 8 / 3) // 64 * 64,
        num_hidden_layers=layers,
        num_attention_heads=hidden // 64,
        num_key_value_heads=max(1, hidden // 256),
        head_dim=64,
        max_position_embeddings=512,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    model.save_pretrained(root / "base")
    tokenizer.save_pretrained(root / "base")
    names = {}
    for i in range(n_specialists):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p) * 1e-3)
        model.save_pretrained(root / f"s{i}")
        tokenizer.save_pretrained(root / f"s{i}")
        names[f"s{i}"] = root / f"s{i}"
    return ModelSet(root / "base", names)


def plans(models: tuple[str, ...], n: int) -> list[MergePlan]:
    return [
        MergePlan("task_arithmetic", models, {m: ModelParams(0.3 + 0.1 * ((i + j) % 7)) for j, m in enumerate(models)})
        for i in range(n)
    ]


#: Merges before the timed ones: the first merges of a process grow its heap (the allocator then
#: keeps those pages, see optimizer/engines/_allocator.py), which a study pays once, not per trial.
WARMUP_PLANS = 2


def cpu_weight_packing_s(base: dict[str, torch.Tensor], repeats: int = 3) -> float | None:
    """What vLLM's CPU backend spends re-packing every linear weight for oneDNN after a reload.

    Its in-place reload re-runs each layer's post-load processing, which on CPU builds copies the
    weight into oneDNN's blocked layout (``create_onednn_mm``); a merge pays it on top of the
    merge arithmetic and the copy into the parameters. Timed here on the checkpoint's weights
    (vLLM packs q/k/v and gate/up fused: the same bytes in fewer calls), on one thread as vLLM's
    CPU worker runs on a 2-core box (it pins one torch thread per worker), best of ``repeats``.
    None where vLLM has no oneDNN path (GPU builds: there the post-load step of an unquantized
    linear copies nothing).
    """
    from vllm import _custom_ops as ops

    if not getattr(ops, "_supports_onednn", False):
        return None
    linear = [t for name, t in base.items() if t.dim() == 2 and "embed_tokens" not in name]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        best = float("inf")
        for _ in range(repeats):
            t0 = time.perf_counter()
            for w in linear:
                ops.create_onednn_mm(w.t(), 32)
            best = min(best, time.perf_counter() - t0)
    finally:
        torch.set_num_threads(threads)
    return best


def measure(models: ModelSet, prompts: list[str], n_plans: int) -> dict:
    from optimizer.engines.vllm_engine import VLLMEngine
    from optimizer.export import write_model_dir

    base = load_state_dict(models.base)
    n_params = sum(t.numel() for t in base.values())
    t0 = time.perf_counter()
    engine = VLLMEngine(models)
    start_s = time.perf_counter() - t0
    merge_times, rpc_inner, warmup = [], [], []
    for i, plan in enumerate(plans(models.names, n_plans + WARMUP_PLANS)):
        t = time.perf_counter()
        engine.apply_plan(plan)
        if i < WARMUP_PLANS:
            warmup.append(time.perf_counter() - t)
            continue
        merge_times.append(time.perf_counter() - t)
        rpc_inner.append(engine.last_merge_seconds)
    t = time.perf_counter()
    engine.generate(prompts, max_tokens=8, stop=["\n"])
    score_s = time.perf_counter() - t
    engine.close()

    # Reload per candidate: write the merged checkpoint, start a new LLM on it, score once.
    plan = plans(models.names, 1)[0]
    deltas = task_vectors(base, [load_state_dict(p) for p in models.specialists.values()])
    with tempfile.TemporaryDirectory(dir=ROOT / "studies") as tmp:
        t = time.perf_counter()
        merged = merge_state_dict(plan, base, deltas)
        out = write_model_dir(Path(tmp) / "cand", models.base, merged, {})
        fresh = VLLMEngine(ModelSet(out, {}))
        fresh.generate(prompts, max_tokens=8, stop=["\n"])
        reload_s = time.perf_counter() - t
        fresh.close()

    bytes_moved = sum(t.numel() * 4 for t in base.values()) * (len(models.names) + 2)  # read base+N, write 1
    merge_med = statistics.median(merge_times)
    packing = cpu_weight_packing_s(base)
    return {
        "parameters": n_params,
        "specialists": len(models.names),
        "engine_start_s": round(start_s, 2),
        "merge_s_median": round(merge_med, 5),
        "merge_s_all": [round(x, 5) for x in merge_times],
        "warmup_merges_s": [round(x, 5) for x in warmup],
        "merge_inside_worker_s_median": round(statistics.median(rpc_inner), 5),
        "score_once_s": round(score_s, 4),
        "reload_per_candidate_s": round(reload_s, 2),
        "speedup_vs_reload": round(reload_s / merge_med, 1),
        "bytes_moved_per_merge": bytes_moved,
        # Part of every merge's reload that is vLLM's own CPU post-processing, not the merge.
        "vllm_cpu_weight_packing_s": None if packing is None else round(packing, 5),
    }


def zoo_study_share(trials: int) -> dict:
    """Share of trial wall time spent scoring in a short vLLM zoo study."""
    import optuna

    from optimizer.config import load_config
    from optimizer.engines import make_engine
    from optimizer.search.prepare import prepare
    from optimizer.search.study import open_study
    from optimizer.search.trials import run_trials

    config = load_config(ROOT / "configs" / "demo.yaml")
    with tempfile.TemporaryDirectory(dir=ROOT / "studies") as tmp:
        config = config.model_copy(update={"name": "bench", "storage": f"sqlite:///{tmp}/bench.db", "engine": "vllm"})
        prepared = prepare(config)
        study, prepared = open_study(prepared)
        engine = make_engine("vllm", prepared.models)
        try:
            t0 = time.perf_counter()
            run_trials(prepared, study, engine, trials)
            loop = time.perf_counter() - t0
        finally:
            engine.close()
        done = study.get_trials(states=(optuna.trial.TrialState.COMPLETE,))
        merge = sum(t.user_attrs["seconds"]["merge"] for t in done)
        score = sum(t.user_attrs["seconds"]["score"] for t in done)
        wall = sum((t.datetime_complete - t.datetime_start).total_seconds() for t in done)
    return {
        "trials": len(done),
        "merge_s": round(merge, 3),
        "score_s": round(score, 3),
        "trial_wall_s": round(wall, 3),
        # Per trial: from the trial's start (ask) to its end (tell), summed over trials.
        "score_share_of_wall": round(score / wall, 4),
        # The whole loop as the user waits for it: also the bookkeeping between trials.
        "study_loop_s": round(loop, 3),
        "score_share_of_study_loop": round(score / loop, 4),
        "merge_share_of_wall": round(merge / wall, 4),
        # The rest: asking the sampler, storage writes (params, attrs, tell), the trial loop.
        "other_share_of_wall": round(1 - (score + merge) / wall, 4),
        "per_trial_s": {
            "score": round(score / len(done), 4),
            "merge": round(merge / len(done), 4),
            "other": round((wall - score - merge) / len(done), 4),
            "between_trials": round((loop - wall) / len(done), 4),
        },
    }


def _counting(read: Callable[..., list], calls: list[int]) -> Callable[..., list]:
    """``read``, noting each call in ``calls``."""

    def counted(*args: object, **kwargs: object) -> list:
        calls.append(1)
        return read(*args, **kwargs)

    return counted


def study_bookkeeping(trials: int, repeats: int = 5) -> dict:
    """What the study loop costs per trial when merging and scoring cost nothing.

    ``run_trials`` with a stand-in engine that answers at once (``tests/_engines.py``):
    what is left is the sampler, the storage and the loop's checks (median of ``repeats`` studies
    per variant). Measured for the demo's per-model space and its per-layer version as shipped,
    and with each of the loop's two storage savings patched out (for comparison only): the
    one-read-per-candidate snapshot and the one-write-per-candidate transaction
    (both in ``optimizer/search/_optuna.py``).
    """
    import contextlib
    from unittest import mock

    from optimizer.config import load_config
    from optimizer.search.prepare import prepare
    from optimizer.search.study import open_study
    from optimizer.search.trials import run_trials
    from tests._engines import BlankEngine
    from tests._sqlite_writes import count_write_transactions

    def without(name: str) -> contextlib.AbstractContextManager:
        return mock.patch(f"optimizer.search.trials.{name}", lambda _study: contextlib.nullcontext())

    variants = {
        "": contextlib.nullcontext,
        "_without_one_commit": lambda: without("one_commit"),
        "_without_snapshot": lambda: without("trials_snapshot"),
    }
    config = load_config(ROOT / "configs" / "demo.yaml")
    out: dict = {"trials": trials, "repeats": repeats}
    # The demo's space and its per-layer version on SQLite (the default), and per layer on a
    # journal file (what several machines share over NFS).
    for granularity, kind in (("model", ""), ("layer", ""), ("layer", "_journal")):
        runs: dict[str, list[tuple[float, float, int, float | None]]] = {suffix: [] for suffix in variants}
        for _ in range(repeats):  # variants interleaved, so a slow spell of a shared box hits all
            for suffix, patched in variants.items():
                with tempfile.TemporaryDirectory(dir=ROOT / "studies") as tmp:
                    url = f"journal://{tmp}/b.log" if kind else f"sqlite:///{tmp}/b.db"
                    update = {"name": "book", "storage": url, "granularity": granularity}
                    prepared = prepare(config.model_copy(update=update))
                    study, prepared = open_study(prepared)
                    storage = study._storage
                    reads: list[int] = []
                    storage.get_all_trials = _counting(storage.get_all_trials, reads)
                    writes = None if kind else count_write_transactions(storage._backend.engine)
                    with patched():
                        engine = BlankEngine(prepared.models)
                        t0 = time.perf_counter()
                        run_trials(prepared, study, engine, trials)
                        loop = time.perf_counter() - t0
                n_params = len(prepared.space.distributions())
                per_write = None if writes is None else len(writes) / trials
                runs[suffix].append((loop / trials * 1000, len(reads) / trials, n_params, per_write))
        for suffix, results in runs.items():
            ms = [r[0] for r in results]
            out[granularity + kind + suffix] = {
                "parameters": results[0][2],
                "ms_per_trial": round(statistics.median(ms), 1),
                "ms_per_trial_all": [round(m, 1) for m in ms],
                "storage_reads_per_trial": round(results[0][1], 1),
            }
            if results[0][3] is not None:  # SQLite: transactions that wrote (a journal appends)
                out[granularity + kind + suffix]["write_transactions_per_trial"] = round(results[0][3], 1)
            print(granularity + kind + suffix, out[granularity + kind + suffix], flush=True)
    return out


def _varied_scores(engine: object) -> Callable[..., list]:
    """A stand-in for ``score_tasks``: scores that depend on the candidate, as a real study's do.

    A blank engine's scores are all equal, which makes TPE's split of the trials trivial; here
    each task rewards its own model's weights, penalizes the others' and adds seeded noise (a
    function of the plan), so the study's front grows as in a real search.
    """
    import hashlib
    import random

    from objectives.metrics import MetricResult

    def score(_engine: object, tasks: list, split: str = "search") -> list:
        plan = engine.plans[-1]
        weights = {m: 0.0 for m in plan.models}
        for scope, p in plan.params.items():
            weights[scope.split(".", 1)[0]] += p.weight
        seed = hashlib.sha256(json.dumps(plan.to_dict(), sort_keys=True).encode()).digest()
        noise = random.Random(seed)
        total = sum(weights.values())
        values = [weights[m] - 0.3 * total + 0.5 * noise.random() for m in plan.models]
        return [MetricResult(v, [v]) for v in values[: len(tasks)]]

    return score


def study_scaling(trials: int, window: int = 100) -> dict:
    """How the study loop's own cost grows with the study: per-layer space, SQLite, varied scores.

    Studies of the demo config at per-layer granularity (36 parameters), each with the progress
    line ``mergeopt search`` shows (written to a log, as overnight), advanced in turns by
    ``window`` trials so a slow spell of a shared box hits all; ms per trial of each window. One
    study as shipped, and for comparison one without ``split_once`` (``optimizer/search/_optuna.py``) and one
    whose progress line reads the front with Optuna's ``best_trials`` (a copy of the whole
    study per trial) instead of :mod:`optimizer.search.front`. All draw the same candidates
    (checked), so the differences are those costs alone.
    """
    import contextlib
    import io
    from unittest import mock

    from rich.console import Console

    from optimizer.config import load_config
    from optimizer.search.front import front_trials
    from optimizer.search.prepare import prepare
    from optimizer.search.progress import SearchProgress
    from optimizer.search.study import open_study
    from optimizer.search.trials import run_trials
    from tests._engines import BlankEngine

    config = load_config(ROOT / "configs" / "demo.yaml")

    def optunas_front(study: object, trials: object = None) -> list:
        return sorted(study.best_trials, key=lambda t: t.number)

    variants = {
        "layer": contextlib.nullcontext,
        "layer_without_split_once": lambda: mock.patch("optimizer.search.trials.split_once", contextlib.nullcontext),
        "layer_with_optunas_best_trials": lambda: mock.patch("optimizer.search.progress.front_trials", optunas_front),
    }
    out: dict = {"trials": trials, "window": window, "ms_per_trial": {k: [] for k in variants}}
    with tempfile.TemporaryDirectory(dir=ROOT / "studies") as tmp:
        runs = {}
        for name in variants:
            update = {"name": name, "storage": f"sqlite:///{tmp}/{name}.db", "granularity": "layer"}
            prepared = prepare(config.model_copy(update=update))
            engine = BlankEngine(prepared.models)
            study, prepared = open_study(prepared)
            runs[name] = (prepared, study, engine)
        out["parameters"] = len(prepared.space.distributions())
        for end in range(window, trials + 1, window):
            for name, patched in variants.items():
                prepared, study, engine = runs[name]
                log = Console(file=io.StringIO(), width=200)  # one plain line per trial, as in a log file
                with patched(), mock.patch("optimizer.search.trials.score_tasks", _varied_scores(engine)):
                    t0 = time.perf_counter()
                    with SearchProgress(study, end, console=log) as progress:
                        run_trials(prepared, study, engine, end, callbacks=[progress])
                    ms = (time.perf_counter() - t0) / window * 1000
                out["ms_per_trial"][name].append(round(ms, 1))
            print(end, {k: v[-1] for k, v in out["ms_per_trial"].items()}, flush=True)
        plans = [[t.user_attrs["plan"] for t in runs[name][1].trials] for name in variants]
        out["same_candidates"] = all(p == plans[0] for p in plans)
        study = runs["layer"][1]
        out["front_size"] = len(front_trials(study))
        # Reading the front of the finished study, as the progress line does after every trial.
        for key, read in (("front_trials_ms", front_trials), ("optunas_best_trials_ms", optunas_front)):
            times = []
            for _ in range(5):
                t0 = time.perf_counter()
                read(study)
                times.append((time.perf_counter() - t0) * 1000)
            out[key] = round(statistics.median(times), 1)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer plans, smaller large model")
    parser.add_argument(
        "--study-only", action="store_true", help="only the zoo study's scoring share (updates the JSON)"
    )
    parser.add_argument(
        "--bookkeeping-only", action="store_true", help="only the loop's own cost per trial (updates the JSON)"
    )
    parser.add_argument(
        "--scaling-only", action="store_true", help="only the loop's cost over a long study (updates the JSON)"
    )
    args = parser.parse_args()
    bookkeeping_trials = 20 if args.quick else 60
    scaling_trials = 200 if args.quick else 1000
    if args.study_only or args.bookkeeping_only or args.scaling_only:  # one part, measured again
        path = RESULTS / "trial_overhead.json"
        stored = json.loads(path.read_text()) if path.exists() else {}
        date = {"date": time.strftime("%Y-%m-%d %H:%M")}
        if args.study_only:
            key, part = "zoo_study", zoo_study_share(12 if args.quick else 48)
        elif args.bookkeeping_only:
            key, part = "bookkeeping", study_bookkeeping(bookkeeping_trials)
        else:
            key, part = "scaling", study_scaling(scaling_trials)
        stored[key] = {**date, **part}
        path.write_text(json.dumps(stored, indent=2) + "\n")
        print(json.dumps(stored[key], indent=2))
        return
    torch.set_num_threads(max(1, torch.get_num_threads()))
    from optimizer.zoo import build_zoo, default_zoo_dir

    info = build_zoo(default_zoo_dir())
    zoo = default_zoo_dir()
    lines = (zoo / "tasks" / "rev" / "search.jsonl").read_text().splitlines()[:64]
    prompts = [json.loads(line)["prompt"] for line in lines]
    bw = copy_bandwidth_gbs()
    result: dict = {
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "machine": f"{platform.node()} {platform.machine()} {torch.get_num_threads()} threads, CPU only",
        "copy_bandwidth_GBps": round(bw, 2),
    }
    zoo_models = ModelSet(zoo / "base", {t: zoo / "specialists" / t for t in info["specialists"]})
    result["zoo"] = measure(zoo_models, prompts, 5 if args.quick else 20)
    (ROOT / "studies").mkdir(exist_ok=True)
    with tempfile.TemporaryDirectory(dir=ROOT / "studies") as tmp:
        hidden, layers = (512, 8) if args.quick else (768, 12)
        big = random_family_model(Path(tmp), hidden=hidden, layers=layers, vocab=32000, n_specialists=3)
        result["large"] = measure(big, prompts, 3 if args.quick else 10)
    for key in ("zoo", "large"):
        r = result[key]
        floor = r["bytes_moved_per_merge"] / (bw * 1e9)
        r["copy_floor_s"] = round(floor, 5)
        r["merge_over_floor"] = round(r["merge_s_median"] / floor, 2)
    result["zoo_study"] = zoo_study_share(12 if args.quick else 48)
    result["bookkeeping"] = {"date": result["date"], **study_bookkeeping(bookkeeping_trials)}
    result["scaling"] = {"date": result["date"], **study_scaling(scaling_trials)}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "trial_overhead.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
