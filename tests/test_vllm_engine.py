"""The vLLM engine against the transformers reference: same plan, same scores; no stale state.

These start real vLLM engines (the CPU build here), so each module-level engine is shared by the
tests that can share it; a fresh engine is started only where freshness is the point.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from objectives.metrics import ExactMatch
from optimizer.checkpoints import ModelSet, load_state_dict
from optimizer.engines.hf_engine import HFEngine
from optimizer.export import write_model_dir
from optimizer.merge import MergePlan, ModelParams, merge_state_dict, task_vectors
from tests._cli import zoo_tasks

pytestmark = pytest.mark.slow
TASKS = tuple(zoo_tasks())


def _zoo_models() -> ModelSet:
    from optimizer.zoo import default_zoo_dir

    zoo = default_zoo_dir()
    return ModelSet(zoo / "base", {t: zoo / "specialists" / t for t in TASKS})


def _examples(task: str, n: int) -> list[dict]:
    from objectives.data import load_split
    from optimizer.zoo import default_zoo_dir

    return load_split(default_zoo_dir() / "tasks" / task, "held_out")[:n]


PLAN_A = MergePlan("ties", TASKS, {t: ModelParams(0.8, 0.5) for t in TASKS})
PLAN_B = MergePlan("task_arithmetic", TASKS, {t: ModelParams(w) for t, w in zip(TASKS, (1.0, 0.2, 0.6), strict=False)})


def _score_all(engine) -> dict[str, list[float]]:
    """Per-example exact-match verdicts and golden NLLs on every zoo task."""
    out = {}
    for task in TASKS:
        ex = _examples(task, 48)
        out[f"{task}/em"] = (
            ExactMatch(prompt_field="prompt", target_field="target", stop=["\n"], max_tokens=13)
            .score(engine, ex)
            .per_example
        )
        out[f"{task}/ll"] = [ll.logprob for ll in engine.loglikelihood([(e["prompt"], e["target"]) for e in ex])]
    return out


@pytest.fixture(scope="module")
def vllm_engine(zoo):
    from optimizer.config import VllmConfig
    from optimizer.engines.vllm_engine import VLLMEngine

    engine = VLLMEngine(_zoo_models(), settings=VllmConfig(max_num_seqs=64))
    yield engine
    engine.close()


@pytest.fixture(scope="module")
def hf_engine(zoo):
    return HFEngine(_zoo_models())


def test_the_configs_vllm_settings_reach_the_engine(vllm_engine) -> None:
    """``vllm:`` in a study config is passed to vLLM (here the fixture's max_num_seqs)."""
    assert vllm_engine.llm.llm_engine.vllm_config.scheduler_config.max_num_seqs == 64


def test_vllm_agrees_with_transformers(vllm_engine, hf_engine) -> None:
    for plan in (PLAN_A, PLAN_B):
        vllm_engine.apply_plan(plan)
        hf_engine.apply_plan(plan)
        v, h = _score_all(vllm_engine), _score_all(hf_engine)
        for task in TASKS:
            lv, lh = v[f"{task}/ll"], h[f"{task}/ll"]
            mad = sum(abs(a - b) for a, b in zip(lv, lh, strict=True)) / len(lv)
            assert mad <= 0.05, f"{task}: mean |Δ log-likelihood| {mad:.4f} nats"
            ev, eh = v[f"{task}/em"], h[f"{task}/em"]
            same = sum(a == b for a, b in zip(ev, eh, strict=True)) / len(ev)
            assert same >= 0.98, f"{task}: exact-match verdicts agree on only {same:.0%}"


def test_tasks_scored_together_match_each_scored_alone(vllm_engine, hf_engine) -> None:
    """A trial's tasks share one engine call per kind (different stops and lengths per prompt in
    one vLLM generate); the verdicts and NLLs are those of scoring each task on its own."""
    from objectives.metrics import make_metric, score_together

    jobs = []
    for i, task in enumerate(TASKS):  # a different generation limit per task: per-prompt params
        jobs.append((make_metric("exact_match", max_tokens=12 + i), _examples(task, 32)))
        jobs.append((make_metric("nll"), _examples(task, 16)))
    vllm_engine.apply_plan(PLAN_B)
    together = score_together(vllm_engine, jobs)
    alone = [metric.score(vllm_engine, examples) for metric, examples in jobs]
    for (metric, _), t, a in zip(jobs, together, alone, strict=True):
        if metric.binary:
            same = sum(x == y for x, y in zip(t.per_example, a.per_example, strict=True)) / len(a.per_example)
            assert same >= 0.97, f"{metric.name}: together and alone agree on only {same:.0%}"
        else:
            assert t.value == pytest.approx(a.value, abs=0.02)
    # The transformers engine (one call per batch) gives the same verdicts through the same path.
    hf_engine.apply_plan(PLAN_B)
    hf = score_together(hf_engine, jobs[:2])
    assert hf[0].value == pytest.approx(together[0].value, abs=0.07)


def test_no_stale_state_after_switching_plans(vllm_engine, tmp_path: Path) -> None:
    from optimizer.engines.vllm_engine import VLLMEngine

    vllm_engine.apply_plan(PLAN_A)
    a1 = _score_all(vllm_engine)
    vllm_engine.apply_plan(PLAN_B)
    b_live = _score_all(vllm_engine)
    vllm_engine.apply_plan(PLAN_A)
    assert _score_all(vllm_engine) == a1, "A → B → A did not give A's scores back"
    assert b_live != a1  # the plans are different models

    models = _zoo_models()
    base = load_state_dict(models.base)
    merged = merge_state_dict(
        PLAN_B, base, task_vectors(base, [load_state_dict(p) for p in models.specialists.values()])
    )
    out = write_model_dir(tmp_path / "b", models.base, merged, {"plan": PLAN_B.to_dict()})
    vllm_engine.close()  # one engine at a time on a 2-core box
    fresh = VLLMEngine(ModelSet(out, {}))
    try:
        fresh.apply_plan(MergePlan("task_arithmetic", ()))
        b_fresh = _score_all(fresh)
    finally:
        fresh.close()
    for key in b_live:
        if key.endswith("/em"):
            assert b_live[key] == b_fresh[key], key
        else:
            assert b_live[key] == pytest.approx(b_fresh[key], abs=1e-4), key


def test_qwen2_family_with_biases_and_tied_embeddings(tmp_path: Path) -> None:
    """A second architecture family: attention biases and a tied head, merged in place in vLLM."""
    from optimizer.engines.vllm_engine import VLLMEngine
    from optimizer.zoo._tokenizer import build_tokenizer
    from tests._tiny_models import build_tiny_models

    tokenizer = build_tokenizer()
    vocab = -(-len(tokenizer) // 8) * 8
    tiny = build_tiny_models(
        tmp_path, names=("math", "code"), family="qwen2", tie_word_embeddings=True, vocab=vocab, delta_scale=0.05
    )
    for path in (tiny.base, *tiny.specialists.values()):
        tokenizer.save_pretrained(str(path))
    models = ModelSet(tiny.base, dict(tiny.specialists))
    assert "lm_head.weight" not in load_state_dict(tiny.base)
    plan = MergePlan("ties", ("math", "code"), {"math": ModelParams(1.0, 0.5), "code.embed": ModelParams(0.7, 0.9)})
    requests = [("rev: abcd =", " dcba"), ("sort: dcab =", " abcd"), ("add: 12+30 =", " 42")]
    hf = HFEngine(models)
    hf.apply_plan(plan)
    expected = [ll.logprob for ll in hf.loglikelihood(requests)]
    engine = VLLMEngine(models)
    try:
        engine.apply_plan(
            MergePlan("task_arithmetic", ("math", "code"), {m: ModelParams(0.0) for m in ("math", "code")})
        )
        base_scores = [ll.logprob for ll in engine.loglikelihood(requests)]
        engine.apply_plan(plan)
        got = [ll.logprob for ll in engine.loglikelihood(requests)]
    finally:
        engine.close()
    assert got == pytest.approx(expected, abs=0.05)
    assert base_scores != pytest.approx(got, abs=1e-3)  # the merge really changed the live weights


def test_a_refusal_found_inside_vllms_worker_reaches_the_user_as_mergeopts_own_error(tmp_path) -> None:
    """vLLM hands a worker's exception on as text; a mergeopt error raised there (here: a
    specialist that is not a fine-tune of the base, given to the engine directly so no earlier
    check stops it) comes back as the same error class and one-line message."""
    from optimizer.engines.vllm_engine import VLLMEngine, worker_error
    from optimizer.errors import ConfigError, ModelError
    from tests._tiny_models import build_tiny_models

    wrapped = RuntimeError("Worker failed with error '[mergeopt] ConfigError: use 'x' here', please check the trace")
    again = worker_error(wrapped)
    assert isinstance(again, ConfigError) and str(again) == "use 'x' here"
    assert worker_error(RuntimeError("Worker failed with error 'CUDA out of memory'")) is None

    built = build_tiny_models(
        tmp_path, names=("a", "b"), num_layers=2, vocab=320, tokenizer=True, variant="shape_mismatch"
    )
    with pytest.raises(ModelError) as err:
        VLLMEngine(ModelSet(built.base, built.specialists))
    message = str(err.value)
    assert "\n" not in message and "model 'b'" in message and "same base" in message
    assert "[mergeopt]" not in message
