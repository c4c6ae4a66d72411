"""LoRA adapters as specialists: held as factors, they merge to exactly what their full checkpoints
(peft's ``merge_and_unload()`` of the same adapters) merge to — every method, the transformers
engine, the vLLM engine and the export; and bad adapters are refused with one line.

The adapters are made with peft on the tiny zoo's base with random, non-zero factors (so every
adapted tensor really moves), covering plain LoRA, rsLoRA with a per-module alpha, an adapted
embedding (peft stores its factors transposed) and ``modules_to_save`` (a full lm_head).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from optimizer.checkpoints import ModelSet, load_task_vectors
from optimizer.merge import MergePlan, ModelParams, get_method, method_names
from optimizer.merge.apply import iter_merged
from optimizer.merge.regmean import RegMeanMerge, gram_key
from tests._cli import run_cli, trial_states, write_config, zoo_config

ADAPTERS = {
    "plain": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]),
    "rslora": dict(
        r=8, lora_alpha=16, use_rslora=True, target_modules=["k_proj", "o_proj", "up_proj", "gate_proj"],
        alpha_pattern={"up_proj": 4},
    ),
    "embed_head": dict(r=2, lora_alpha=2, target_modules=["embed_tokens", "q_proj"], modules_to_save=["lm_head"]),
}  # fmt: skip


@pytest.fixture(scope="module")
def lora_zoo(zoo, tmp_path_factory) -> dict[str, Path]:
    """``<name>``: the adapter folder; ``<name>-full``: peft's merge_and_unload of it, saved."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from optimizer.zoo import default_zoo_dir

    base = default_zoo_dir() / "base"
    root = tmp_path_factory.mktemp("lora")
    out = {"base": base}
    for i, (name, kwargs) in enumerate(ADAPTERS.items()):
        torch.manual_seed(i)
        model = AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32)
        peft_model = get_peft_model(model, LoraConfig(init_lora_weights=False, **kwargs))
        with torch.no_grad():  # peft's random init leaves B small; make every change visible
            for pname, p in peft_model.named_parameters():
                if "lora_B" in pname or "lora_embedding_B" in pname:
                    p.normal_(0, 0.05)
                elif "modules_to_save" in pname:
                    p.add_(torch.randn_like(p) * 0.01)
        peft_model.save_pretrained(str(root / name))
        config = json.loads((root / name / "adapter_config.json").read_text())
        config["base_model_name_or_path"] = str(base)
        (root / name / "adapter_config.json").write_text(json.dumps(config))
        full = peft_model.merge_and_unload()
        full.save_pretrained(str(root / f"{name}-full"), safe_serialization=True)
        out[name] = root / name
        out[f"{name}-full"] = root / f"{name}-full"
    return out


def _sets(lora_zoo: dict[str, Path]) -> tuple[ModelSet, ModelSet]:
    names = list(ADAPTERS)
    adapters = ModelSet(lora_zoo["base"], {n: lora_zoo[n] for n in names})
    full = ModelSet(lora_zoo["base"], {n: lora_zoo[f"{n}-full"] for n in names})
    return adapters, full


def _plan(method: str, names: list[str]) -> MergePlan:
    params = {n: ModelParams(0.5 + 0.25 * i, 0.6) for i, n in enumerate(names)}
    params[f"{names[0]}.L01"] = ModelParams(1.2, 0.4)  # a per-layer value too
    return MergePlan(method, tuple(names), params, {"seed": 3})


def _bound(method: str, base: dict[str, torch.Tensor], models: ModelSet):
    """The method, with made-up study data where it needs measured data (Grams, importances)."""
    from dataclasses import replace

    from optimizer.checkpoints import model_config, read_shapes
    from optimizer.merge.hila import HilaMerge
    from optimizer.merge.hila._units import unit_slices

    record = get_method(method)
    gen = torch.Generator().manual_seed(0)
    if method == "regmean":
        grams = {}
        for name, t in base.items():
            key = gram_key(name)
            if key is not None and key not in grams:
                xs = [torch.randn(64, t.shape[1], generator=gen) for _ in models.names]
                grams[key] = [x.T @ x / 64 for x in xs]
        return replace(record, merge=RegMeanMerge(grams))
    if method == "hila":
        units = tuple(unit_slices(model_config(models.base), read_shapes(models.base)))
        importance = {m: {u.name: float(torch.rand((), generator=gen)) for u in units} for m in models.names}
        return replace(record, merge=HilaMerge(importance, models.names, units))
    return record


def test_adapters_are_held_as_factors(lora_zoo) -> None:
    from optimizer.low_rank import LowRankDelta, nbytes

    adapters, full = _sets(lora_zoo)
    _, low = load_task_vectors(adapters)
    _, dense = load_task_vectors(full)
    assert all(isinstance(d, LowRankDelta) for taus in low.values() for d in taus)
    held = sum(nbytes(d) for taus in low.values() for d in taus)
    assert held < 0.2 * sum(nbytes(d) for taus in dense.values() for d in taus)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_weighted_sums_of_adapters_skip_the_expansion_and_equal_it(dtype: torch.dtype) -> None:
    """Task arithmetic / linear combine adapters' factors in one stacked matmul: the same tensor as
    expanding each (plain and transposed layouts, a dense part, a dense specialist, a zero weight)."""
    from optimizer.low_rank import LowRankDelta, combine, dense

    gen = torch.Generator().manual_seed(0)

    def rand(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen).to(dtype)

    base = rand(48, 32)
    deltas = [
        LowRankDelta(rand(48, 4), rand(4, 32), 0.5, (48, 32)),
        LowRankDelta(rand(32, 8), rand(8, 48), 2.0, (48, 32), transpose=True),  # an embedding's layout
        LowRankDelta(rand(48, 2), rand(2, 32), 1.0, (48, 32), dense_part=rand(48, 32)),
        rand(48, 32),  # a full fine-tune beside the adapters
        LowRankDelta(rand(48, 4), rand(4, 32), 1.0, (48, 32)),
    ]
    coefs = [0.7, -0.3, 1.2, 0.4, 0.0]
    for base_coef in (1.0, 1.9):
        expected = base.float() * base_coef + sum(c * dense(d).float() for c, d in zip(coefs, deltas, strict=True))
        got = combine(base, deltas, base_coef, coefs)
        assert got.dtype == dtype
        tol = 1e-5 if dtype == torch.float32 else 0.06  # bf16 keeps 8 bits of mantissa
        torch.testing.assert_close(got.float(), expected, atol=tol, rtol=tol if dtype == torch.bfloat16 else 0)


@pytest.mark.parametrize("method", sorted(method_names()))
def test_every_method_merges_adapters_as_their_full_checkpoints(lora_zoo, method: str) -> None:
    adapters, full = _sets(lora_zoo)
    base, low = load_task_vectors(adapters)
    _, dense = load_task_vectors(full)
    bound = _bound(method, base, adapters)
    plan = _plan(method, list(adapters.names))
    ours = dict(iter_merged(plan, base, low, bound))
    theirs = dict(iter_merged(plan, base, dense, bound))
    assert ours.keys() == theirs.keys()
    # DELLA ranks entries by |τ|: where two entries of a row are equal to rounding, the factors and
    # the stored checkpoint can order them apart, moving each one's keep probability by one rank
    # step (2ε/row width) and its 1/p rescale by ~1e-6 relative. The masks themselves agree.
    atol = 1e-4 if method.startswith("della") else 1e-6
    for name in ours:
        torch.testing.assert_close(ours[name], theirs[name], atol=atol, rtol=0, msg=lambda m, name=name: f"{name}: {m}")


def test_the_engines_and_the_export_merge_adapters_as_their_full_checkpoints(lora_zoo) -> None:
    from optimizer.engines.hf_engine import HFEngine
    from optimizer.export import merged_stream

    adapters, full = _sets(lora_zoo)
    plan = _plan("ties", list(adapters.names))
    engines = [HFEngine(models, device="cpu") for models in (adapters, full)]
    for engine in engines:
        engine.apply_plan(plan)
    ours, theirs = (e.model.state_dict() for e in engines)
    for name in ours:
        torch.testing.assert_close(ours[name], theirs[name], atol=1e-6, rtol=0, msg=lambda m, name=name: f"{name}: {m}")
    exported = dict(merged_stream(plan, adapters).tensors)
    reference = dict(merged_stream(plan, full).tensors)
    assert exported.keys() == reference.keys()
    for name in exported:
        torch.testing.assert_close(exported[name], reference[name], atol=1e-6, rtol=0, msg=name)
    base = ModelSet(lora_zoo["base"], {})
    moved = [n for n in exported if not torch.equal(exported[n], HFEngine(base, device="cpu").model.state_dict()[n])]
    assert any("q_proj" in n for n in moved) and "model.embed_tokens.weight" in moved and "lm_head.weight" in moved


def test_the_vllm_engine_merges_adapters_in_its_worker(lora_zoo) -> None:
    from optimizer.engines.hf_engine import HFEngine
    from optimizer.engines.vllm_engine import VLLMEngine

    adapters, full = _sets(lora_zoo)
    plan = _plan("task_arithmetic", list(adapters.names))
    requests = [("The quick brown fox", " jumps over"), ("1 + 2 =", " 3"), ("hello", " world")]
    reference = HFEngine(full, device="cpu")
    reference.apply_plan(plan)
    expected = [ll.logprob for ll in reference.loglikelihood(requests)]
    engine = VLLMEngine(adapters)
    try:
        engine.apply_plan(plan)
        got = [ll.logprob for ll in engine.loglikelihood(requests)]
    finally:
        engine.close()
    assert got == pytest.approx(expected, abs=0.02)
    unmerged = [ll.logprob for ll in HFEngine(ModelSet(adapters.base, {}), device="cpu").loglikelihood(requests)]
    assert max(abs(a - b) for a, b in zip(unmerged, expected, strict=True)) > 0.1  # the merge shows


def _write_adapter(folder: Path, tensors: dict[str, torch.Tensor], **config: object) -> Path:
    from safetensors.torch import save_file

    folder.mkdir(parents=True)
    body = {"peft_type": "LORA", "r": 2, "lora_alpha": 2, "target_modules": ["q_proj"], "bias": "none", **config}
    (folder / "adapter_config.json").write_text(json.dumps(body))
    if tensors:
        save_file(tensors, str(folder / "adapter_model.safetensors"))
    return folder


def _q(out: int = 128, inp: int = 128, module: str = "model.layers.0.self_attn.q_proj") -> dict[str, torch.Tensor]:
    p = f"base_model.model.{module}"
    return {f"{p}.lora_A.weight": torch.randn(2, inp), f"{p}.lora_B.weight": torch.randn(out, 2)}


BAD_ADAPTERS = {
    "another base's shapes": (lambda d: _write_adapter(d, _q(out=96)), ["make a 96×128 change", "another base"]),
    "a module the base lacks": (
        lambda d: _write_adapter(d, _q(module="model.layers.0.self_attn.qkv_proj")),
        ["adapts module 'model.layers.0.self_attn.qkv_proj'", "does not have"],
    ),
    "DoRA": (lambda d: _write_adapter(d, _q(), use_dora=True), ["uses use_dora", "plain LoRA only"]),
    "pickled weights": (
        lambda d: (_write_adapter(d, {}), (d / "adapter_model.bin").write_bytes(b"not read")),
        ["pickled weights (adapter_model.bin)", "safetensors"],
    ),
    "no weights": (lambda d: _write_adapter(d, {}), ["has no adapter_model.safetensors"]),
    "another PEFT type": (
        lambda d: _write_adapter(d, _q(), peft_type="IA3"),
        ["is a IA3 adapter", "LoRA adapters only"],
    ),
    "an adapter on another model": (None, ["applies an adapter to", "not to the study's base"]),
}


@pytest.mark.parametrize("case", list(BAD_ADAPTERS))
def test_a_bad_adapter_is_refused_in_one_line(case: str, zoo, tmp_path: Path) -> None:
    make, needles = BAD_ADAPTERS[case]
    cfg = zoo_config()
    first = next(iter(cfg["models"]))
    if make is None:
        other = cfg["models"][first]  # a specialist, not the base
        good = _write_adapter(tmp_path / "good", _q())
        cfg["models"]["lora"] = f"{other}+{good}"
    else:
        make(tmp_path / "lora")
        cfg["models"]["lora"] = str(tmp_path / "lora")
    path = write_config(tmp_path / "study.yaml", cfg)
    proc = run_cli("search", str(path), cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert all(n in lines[0] for n in needles), lines[0]
    assert not (tmp_path / "studies").exists()


def test_a_study_mixing_a_full_fine_tune_and_two_adapters(lora_zoo, tmp_path: Path) -> None:
    """Search (SIGKILLed mid-study, then resumed), export, and the export reproduces its trial."""
    import os
    import signal
    import subprocess
    import sys
    import time

    import optuna
    from optuna.trial import TrialState

    from objectives.tasks import load_tasks, score_tasks
    from optimizer.config import config_from_dict
    from optimizer.engines.hf_engine import HFEngine
    from optimizer.export import merged_stream

    cfg = zoo_config("mixed", limit=8)
    full_name = next(iter(cfg["models"]))
    cfg["models"] = {full_name: cfg["models"][full_name], "plain": str(lora_zoo["plain"])}
    cfg["models"]["rslora"] = f"{lora_zoo['base']}+{lora_zoo['rslora']}"  # mergekit's spelling
    cfg["granularity"] = "layer"
    cfg["search"] = {"trials": 16, "seed": 0}
    path = write_config(tmp_path / "mixed.yaml", cfg)
    db = tmp_path / "studies" / "mixed" / "study.db"
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "optimizer.cli", "search", str(path)],
        cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:
            s = trial_states(db)
            if s.get("COMPLETE", 0) >= 3:  # killed at once, mid-trial or between two
                break
            assert proc.poll() is None, f"the search ended before it could be killed: {proc.stderr.read()[-2000:]}"
            time.sleep(0.02)
        else:
            pytest.fail("the search never reached 3 complete trials")
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    storage = f"sqlite:///{db}"
    before = {t.number: t.values for t in optuna.load_study(study_name="mixed", storage=storage).get_trials()
              if t.state == TrialState.COMPLETE}  # fmt: skip
    time.sleep(25)  # past the heartbeat's grace period: the killed trial is stale
    run_cli("search", str(path), cwd=tmp_path, check=True, timeout=900)
    study = optuna.load_study(study_name="mixed", storage=storage)
    complete = study.get_trials(states=(TrialState.COMPLETE,))
    assert len(complete) == 16 and all({t.number: t.values for t in complete}[n] == v for n, v in before.items()), (
        "a completed trial was lost or changed"
    )
    trial = max((t for t in complete if "baseline" not in t.user_attrs), key=lambda t: sum(t.values))
    out = tmp_path / "merged"
    run_cli("export", str(tmp_path / "studies" / "mixed"), "--trial", str(trial.number), "--out", str(out),
            "--dtype", "float32", cwd=tmp_path, check=True)  # fmt: skip
    # The export is the merge of the adapters' full checkpoints (peft's merge_and_unload) ...
    from optimizer.checkpoints import load_state_dict

    plan = MergePlan.from_dict(trial.user_attrs["plan"])
    full = ModelSet(lora_zoo["base"], {full_name: Path(cfg["models"][full_name]),
                                       "plain": lora_zoo["plain-full"], "rslora": lora_zoo["rslora-full"]})  # fmt: skip
    reference = dict(merged_stream(plan, full).tensors)
    exported = load_state_dict(out)
    assert exported.keys() == reference.keys()
    for name in exported:
        torch.testing.assert_close(exported[name], reference[name], atol=1e-6, rtol=0, msg=name)
    # ... which mergekit rebuilds from the mergekit.yaml beside it (adapters as BASE+ADAPTER) ...
    import subprocess as sp

    rebuilt = tmp_path / "mergekit-out"
    cli = Path(sys.executable).with_name("mergekit-yaml")
    cmd = [str(cli), str(out / "mergekit.yaml"), str(rebuilt), "--no-copy-tokenizer", "--no-write-model-card"]
    cmd += ["--quiet", "--lora-merge-cache", str(tmp_path / "lora-cache")]
    done = sp.run(cmd, env=env, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    theirs = load_state_dict(rebuilt)
    for name in exported:
        torch.testing.assert_close(theirs[name].float(), exported[name], atol=1e-5, rtol=0, msg=name)
    # ... and scores what its trial scored.
    config = config_from_dict(cfg)
    tasks = load_tasks(config)
    engine = HFEngine(ModelSet(out, {}), device="cpu")
    scores = [r.value for r in score_tasks(engine, tasks, "search")]
    assert scores == pytest.approx(list(trial.values), abs=1e-9)


def test_the_memory_plan_counts_adapters_at_their_factors(lora_zoo) -> None:
    from optimizer.config import config_from_dict
    from optimizer.memory_plan import Machine, plan_memory

    adapters, full = _sets(lora_zoo)
    cfg = zoo_config()
    plans = []
    for models in (adapters, full):
        cfg["models"] = {n: str(p) for n, p in models.specialists.items()}
        plans.append(plan_memory(config_from_dict(cfg), models, Machine(gpus=0, device_bytes=0, host_bytes=16 * 10**9)))
    low, dense = plans
    assert dense.task_vector_bytes == 3 * dense.weight_bytes
    assert low.task_vector_bytes < 0.2 * dense.task_vector_bytes
