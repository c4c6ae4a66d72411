"""The embedded zoo: a real merge problem, loadable as ordinary HF models, cached, deterministic."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from optimizer.errors import DataError, MergeoptError
from optimizer.zoo import TASKS, build_zoo, load_zoo
from optimizer.zoo.build import MIN_SPECIALIST_GAIN, MIN_TA_LOSS

# A zoo that builds in seconds: same model shape, a handful of steps and examples.
TINY = {
    "batch_size": 8,
    "min_pretrain_steps": 0,
    "max_pretrain_steps": 4,
    "check_every": 2,
    "finetune_steps": 2,
    "n_dev": 4,
    "n_search": 4,
    "n_held_out": 8,
}


def _tiny_recipe():
    from optimizer.zoo._train import DEFAULT_RECIPE

    return replace(DEFAULT_RECIPE, **TINY)


def _read_jsonl(path: Path) -> list[dict[str, str]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _exact_match(completions: list[str], rows: list[dict[str, str]]) -> float:
    return sum(c.strip() == r["target"].strip() for c, r in zip(completions, rows, strict=True)) / len(rows)


def test_zoo_is_a_merge_problem(zoo: dict[str, Any]) -> None:
    scores = zoo["scores"]
    assert zoo["criteria"]["specialists_beat_base"] and zoo["criteria"]["task_arithmetic_loses"]
    for task in TASKS:
        assert scores["specialists"][task][task] - scores["base"][task] >= MIN_SPECIALIST_GAIN
    assert max(scores["specialists"][t][t] - scores["task_arithmetic_lambda1"][t] for t in TASKS) >= MIN_TA_LOSS
    assert set(scores["specialists"]) == set(TASKS)
    assert all(set(row) == set(TASKS) for row in scores["specialists"].values())


def test_specialists_sharpen_the_base_with_small_nearly_orthogonal_task_vectors(zoo: dict[str, Any]) -> None:
    # What makes the zoo a model of real fine-tunes rather than of retraining: a specialist moves
    # the weights a few percent and the three moves barely overlap. Version 2's did neither.
    from optimizer.zoo.stats import task_vector_stats

    stats = task_vector_stats(zoo["root"], list(TASKS))
    # zoo.json tells the truth about the saved weights (up to float32 sums in another thread count)
    for name, values in stats.items():
        assert values == pytest.approx(zoo["task_vectors"][name], abs=1e-3)
    assert all(0.005 < r < 0.05 for r in stats["relative_norm"].values())
    assert all(abs(c) < 0.4 for c in stats["cosine"].values())
    assert all(zoo["scores"]["base"][t] >= 0.3 for t in TASKS)  # the base has each skill in part


def test_scores_are_reproduced_from_the_saved_models(zoo: dict[str, Any]) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from optimizer.checkpoints import load_state_dict
    from optimizer.engines._hf_generate import greedy_generate
    from optimizer.merge import MergePlan, merge_state_dict, task_vectors

    root = Path(zoo["root"])
    task = "rev"
    spec = zoo["tasks"][task]
    rows = _read_jsonl(root / spec["held_out"])
    prompts = [r["prompt"] for r in rows]
    tokenizer = AutoTokenizer.from_pretrained(root / zoo["base"])

    def score(model: Any) -> float:
        out = greedy_generate(model, tokenizer, prompts, max_new_tokens=spec["max_new_tokens"], stop=spec["stop"])
        return _exact_match(out, rows)

    base = AutoModelForCausalLM.from_pretrained(root / zoo["base"])
    specialist = AutoModelForCausalLM.from_pretrained(root / zoo["specialists"][task])
    assert score(base) == pytest.approx(zoo["scores"]["base"][task], abs=0.02)
    assert score(specialist) == pytest.approx(zoo["scores"]["specialists"][task][task], abs=0.02)

    base_sd = load_state_dict(root / zoo["base"])
    deltas = task_vectors(base_sd, [load_state_dict(root / zoo["specialists"][t]) for t in TASKS])
    with torch.no_grad():
        base.load_state_dict(merge_state_dict(MergePlan("task_arithmetic", tuple(TASKS)), base_sd, deltas))
    assert score(base) == pytest.approx(zoo["scores"]["task_arithmetic_lambda1"][task], abs=0.02)


def test_tokenizer_round_trips_and_matches_the_config(zoo: dict[str, Any]) -> None:
    from transformers import AutoTokenizer

    root = Path(zoo["root"])
    tokenizer = AutoTokenizer.from_pretrained(root / zoo["base"])
    for text in ["REV: dbca = acbd\n", "  two  spaces\tand\ttabs\n\n", "héllo wörld 日本 🙂", ""]:
        ids = tokenizer.encode(text, add_special_tokens=False)
        assert tokenizer.decode(ids) == text
    assert tokenizer("ab")["input_ids"][0] == tokenizer.bos_token_id  # BOS first, as Llama
    assert tokenizer.decode(tokenizer("ab")["input_ids"], skip_special_tokens=True) == "ab"
    config = json.loads((root / zoo["base"] / "config.json").read_text())
    assert config["bos_token_id"] == tokenizer.bos_token_id
    assert config["eos_token_id"] == tokenizer.eos_token_id
    assert config["vocab_size"] == len(tokenizer)
    # Every specialist ships the same tokenizer, so each directory loads on its own.
    for task in TASKS:
        spec_dir = root / zoo["specialists"][task]
        assert (spec_dir / "tokenizer.json").read_bytes() == (root / zoo["base"] / "tokenizer.json").read_bytes()


def test_models_are_small_gqa_llamas_in_float32_safetensors(zoo: dict[str, Any]) -> None:
    from safetensors import safe_open

    root = Path(zoo["root"])
    for rel in [zoo["base"], *zoo["specialists"].values()]:
        model_dir = root / rel
        config = json.loads((model_dir / "config.json").read_text())
        assert config["model_type"] == "llama"
        assert config["architectures"] == ["LlamaForCausalLM"]
        assert config["head_dim"] == 64
        assert config["hidden_size"] == config["num_attention_heads"] * config["head_dim"]
        assert config["num_key_value_heads"] < config["num_attention_heads"]
        assert config["num_hidden_layers"] >= 4
        assert config["tie_word_embeddings"] is False
        generation = json.loads((model_dir / "generation_config.json").read_text())
        assert generation["eos_token_id"] == config["eos_token_id"]
        with safe_open(str(model_dir / "model.safetensors"), "pt") as f:
            names = list(f.keys())
            assert "lm_head.weight" in names
            assert {str(f.get_slice(n).get_dtype()) for n in names} == {"F32"}


def test_task_data_is_split_without_overlap(zoo: dict[str, Any]) -> None:
    root = Path(zoo["root"])
    assert set(zoo["tasks"]) == set(TASKS)
    for task, spec in zoo["tasks"].items():
        search = _read_jsonl(root / spec["search"])
        held_out = _read_jsonl(root / spec["held_out"])
        assert len(search) == zoo["recipe"]["n_search"] and len(held_out) == zoo["recipe"]["n_held_out"]
        for row in search + held_out:
            assert set(row) == {"prompt", "target"}
            assert spec["stop"] not in row["target"], task
        assert not {r["prompt"] for r in search} & {r["prompt"] for r in held_out}


def test_second_build_returns_the_cached_zoo(zoo: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    from optimizer.zoo import build

    def rebuild(*_: Any, **__: Any) -> None:
        pytest.fail("a cached zoo was trained again")

    monkeypatch.setattr(build, "_build", rebuild)
    root = Path(zoo["root"])
    weights = sorted(root.rglob("*.safetensors"))
    before = {p: p.stat().st_mtime_ns for p in weights}
    again = build_zoo(root, seed=zoo["seed"])
    assert again == zoo
    assert {p: p.stat().st_mtime_ns for p in weights} == before


def test_greedy_generate_batches_like_single_prompts(zoo: dict[str, Any]) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from optimizer.engines._hf_generate import greedy_generate

    root = Path(zoo["root"])
    model = AutoModelForCausalLM.from_pretrained(root / zoo["specialists"]["sort"])
    tokenizer = AutoTokenizer.from_pretrained(root / zoo["base"])
    # Different lengths, so the batch is left-padded.
    prompts = ["SORT: dcba =", "SORT: zyxwvutsrq =", "SORT: hello =", "REV: abcdefgh ="]
    batched = greedy_generate(model, tokenizer, prompts, max_new_tokens=14, batch_size=4)
    single = [greedy_generate(model, tokenizer, [p], max_new_tokens=14)[0] for p in prompts]
    assert batched == single
    assert batched[0] == " abcd"
    assert all("\n" not in c for c in batched)
    # Without a stop string the model still ends, at its trained </s>, and keeps the newline.
    assert greedy_generate(model, tokenizer, prompts[:1], max_new_tokens=14, stop=None) == [" abcd\n"]
    assert greedy_generate(model, tokenizer, [], max_new_tokens=4) == []


def test_tiny_builds_are_bit_identical(tmp_path: Path) -> None:
    recipe = _tiny_recipe()
    a = build_zoo(tmp_path / "a", seed=3, check_criteria=False, _recipe=recipe)
    b = build_zoo(tmp_path / "b", seed=3, check_criteria=False, _recipe=recipe)
    files = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*") if p.is_file())
    assert any(p.suffix == ".safetensors" for p in files)
    for rel in files:
        if rel.name != "zoo.json":
            assert (tmp_path / "a" / rel).read_bytes() == (tmp_path / "b" / rel).read_bytes(), rel
    assert a["scores"] == b["scores"]
    c = build_zoo(tmp_path / "c", seed=4, check_criteria=False, _recipe=recipe)
    base = "base/model.safetensors"
    assert (tmp_path / "a" / base).read_bytes() != (tmp_path / "c" / base).read_bytes()
    assert c["seed"] == 4


def test_a_zoo_that_is_no_merge_problem_is_not_written(tmp_path: Path) -> None:
    import socket

    # The temp dir of a build that was killed (pid beyond any pid_max) is cleaned up on the way.
    orphan = tmp_path / f".zoo.building-{socket.gethostname()}-999999999-x"
    (orphan / "base").mkdir(parents=True)
    # A few steps of training leave nothing for a specialist to gain.
    with pytest.raises(MergeoptError, match="not a merge problem"):
        build_zoo(tmp_path / "zoo", seed=0, _recipe=_tiny_recipe())
    assert list(tmp_path.iterdir()) == []  # neither the zoo, its temp dir nor the orphan


def test_an_interrupted_build_leaves_nothing_that_looks_complete(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from optimizer.zoo import build

    def interrupted(tmp: Path, **_: Any) -> dict[str, Any]:
        (tmp / "base").mkdir()
        raise KeyboardInterrupt

    monkeypatch.setattr(build, "_train_and_measure", interrupted)
    with pytest.raises(KeyboardInterrupt):
        build_zoo(tmp_path / "zoo", seed=0)
    assert list(tmp_path.iterdir()) == []


def test_refuses_to_replace_a_directory_that_is_not_a_zoo(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(MergeoptError, match="not a zoo"):
        build_zoo(tmp_path, seed=0)
    assert (tmp_path / "notes.txt").read_text() == "mine"


def test_load_zoo_explains_a_missing_zoo(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="build_zoo"):
        load_zoo(tmp_path)


def test_default_zoo_dir_honours_the_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from optimizer.zoo import default_zoo_dir
    from optimizer.zoo.build import ZOO_VERSION

    monkeypatch.setenv("MERGEOPT_ZOO_DIR", str(tmp_path / "z"))
    assert default_zoo_dir() == tmp_path / "z"
    monkeypatch.delenv("MERGEOPT_ZOO_DIR")
    assert default_zoo_dir(seed=2).name == f"zoo-v{ZOO_VERSION}-seed2"


def test_task_generators_are_seeded_and_unknown_names_are_listed() -> None:
    import random

    from optimizer.zoo.tasks import STOP, get_task

    for name in TASKS:
        a = [get_task(name).sample(random.Random(7)) for _ in range(3)]
        b = [get_task(name).sample(random.Random(7)) for _ in range(3)]
        assert a == b
        assert all(STOP not in ex.prompt + ex.target for ex in a)
    example = get_task("sort").make(random.Random(0), 4)
    assert example.target == " " + "".join(sorted(example.prompt.split()[1]))
    with pytest.raises(MergeoptError, match="rev, sort, rot"):
        get_task("nope")
