"""The LoRA zoo: adapters trained here on the zoo's tasks, specialists a study merges, cached.

Only the tiny zoo's adapters are built here (about a minute); the real zoo's take ~10 minutes
(``mergeopt zoo build --real --lora``) and share all the code but the data and the recipe.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest

from optimizer.errors import MergeoptError
from optimizer.zoo.build import MIN_SPECIALIST_GAIN
from optimizer.zoo.lora import LORA_ZOO_JSON, build_lora_zoo
from tests._cli import run_cli, write_config, zoo_config

_PROJECTIONS = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}


def _read_jsonl(path: Path) -> list[dict[str, str]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _held_out_exact_match(model: Any, tokenizer: Any, rows: list[dict[str, str]], task: str) -> float:
    from optimizer.engines._hf_generate import greedy_generate
    from optimizer.zoo.tasks import STOP, TASKS

    prompts = [r["prompt"] for r in rows]
    completions = greedy_generate(model, tokenizer, prompts, max_new_tokens=TASKS[task].max_new_tokens, stop=STOP)
    return sum(c.strip() == r["target"].strip() for c, r in zip(completions, rows, strict=True)) / len(rows)


def test_each_adapter_is_a_peft_folder_on_the_zoo_base(tiny_lora_zoo: dict[str, Any], zoo: dict[str, Any]) -> None:
    from optimizer.checkpoints import check_specialist, read_shapes

    root = Path(tiny_lora_zoo["root"])
    base = Path(zoo["root"]) / zoo["base"]
    assert Path(tiny_lora_zoo["base"]) == base
    assert set(tiny_lora_zoo["adapters"]) == set(zoo["tasks"])
    recipe = tiny_lora_zoo["recipe"]
    shapes = read_shapes(base)
    for task, rel in tiny_lora_zoo["adapters"].items():
        folder = root / rel
        assert {p.name for p in folder.iterdir()} >= {"adapter_config.json", "adapter_model.safetensors"}
        assert not list(folder.glob("*.bin"))
        config = json.loads((folder / "adapter_config.json").read_text())
        assert config["base_model_name_or_path"] == str(base)
        assert config["r"] == recipe["rank"] and config["lora_alpha"] == recipe["alpha"]
        adapter = check_specialist(folder, task, shapes, base)
        assert adapter is not None, f"{task}: not read as an adapter"
        assert adapter.rank == recipe["rank"] and not adapter.full
        # every attention and MLP projection of every layer, nothing else
        modules = {name.removesuffix(".weight") for name in adapter.lora}
        assert {m.rsplit(".", 1)[1] for m in modules} == _PROJECTIONS
        assert len(modules) == len(_PROJECTIONS) * zoo["recipe"]["num_layers"]


def test_each_adapter_beats_the_base_on_its_own_held_out_task(
    tiny_lora_zoo: dict[str, Any], zoo: dict[str, Any]
) -> None:
    """Merged into the base by mergeopt's own merge core (not peft), measured again from the files."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from optimizer.checkpoints import ModelSet, load_task_vectors
    from optimizer.merge import MergePlan, merge_state_dict

    zoo_root, root = Path(zoo["root"]), Path(tiny_lora_zoo["root"])
    base_dir = zoo_root / zoo["base"]
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    model = AutoModelForCausalLM.from_pretrained(base_dir).eval()
    recorded = tiny_lora_zoo["scores"]
    for task, rel in tiny_lora_zoo["adapters"].items():
        rows = _read_jsonl(zoo_root / zoo["tasks"][task]["held_out"])
        base, deltas = load_task_vectors(ModelSet(base_dir, {task: root / rel}))
        model.load_state_dict(base)
        before = _held_out_exact_match(model, tokenizer, rows, task)
        model.load_state_dict(merge_state_dict(MergePlan("task_arithmetic", [task]), base, deltas))
        after = _held_out_exact_match(model, tokenizer, rows, task)
        assert after - before >= MIN_SPECIALIST_GAIN, f"{task}: base {before:.3f} → adapter {after:.3f}"
        assert before == pytest.approx(recorded["base"][task], abs=1e-3)
        assert after == pytest.approx(recorded["adapters"][task][task], abs=0.02)  # peft's merge vs mergeopt's
    assert tiny_lora_zoo["criteria"]["adapters_beat_base"]
    assert recorded["full_specialists"] == {t: {t: zoo["scores"]["specialists"][t][t]} for t in zoo["tasks"]}


def test_a_second_build_returns_the_cached_lora_zoo(
    tiny_lora_zoo: dict[str, Any], zoo: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    from optimizer.zoo import lora

    def rebuild(*_: Any, **__: Any) -> None:
        pytest.fail("a cached LoRA zoo was trained again")

    monkeypatch.setattr(lora, "_build", rebuild)
    root = Path(tiny_lora_zoo["root"])
    files = sorted(p for p in root.rglob("*") if p.is_file())
    before = {p: p.stat().st_mtime_ns for p in files}
    started = time.perf_counter()
    again = build_lora_zoo("tiny", root, zoo=zoo["root"])
    assert time.perf_counter() - started < 10
    assert again == tiny_lora_zoo
    assert {p: p.stat().st_mtime_ns for p in sorted(p for p in root.rglob("*") if p.is_file())} == before


def test_the_cli_builds_or_finds_the_lora_zoo_and_names_its_adapters(
    tiny_lora_zoo: dict[str, Any], zoo: dict[str, Any], tmp_path: Path
) -> None:
    root = Path(tiny_lora_zoo["root"])
    proc = run_cli("zoo", "build", "--lora", "--out", str(root), cwd=tmp_path, check=True, timeout=300)
    assert f"cached at {root}" in proc.stdout
    for task, rel in tiny_lora_zoo["adapters"].items():
        assert f"adapter {task}: {root / rel}" in proc.stdout
    assert "adapters:sort" in proc.stdout  # the scores table


def test_a_lora_zoo_follows_its_base_zoo_and_never_looks_complete_half_built(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from dataclasses import replace

    from optimizer.zoo import build_zoo, lora
    from tests.test_zoo import _tiny_recipe

    zoo_dir, out = tmp_path / "zoo", tmp_path / "lora"
    build_zoo(zoo_dir, seed=0, check_criteria=False, _recipe=_tiny_recipe())
    recipe = replace(lora.TINY_RECIPE, steps=(("rev", 1), ("sort", 1), ("rot", 1)))
    first = build_lora_zoo("tiny", out, zoo=zoo_dir, check_criteria=False, _recipe=recipe)
    # An adapter that gains nothing (one step) is refused, and nothing is written ...
    with pytest.raises(MergeoptError, match="does not beat the base"):
        build_lora_zoo("tiny", tmp_path / "refused", zoo=zoo_dir, _recipe=recipe)
    assert not (tmp_path / "refused").exists()
    # ... nor by an interrupted build ...
    calls: list[Path] = []
    real_build = lora._build

    def interrupted(tmp: Path, **_: Any) -> dict[str, Any]:
        calls.append(tmp)
        (tmp / "adapters").mkdir()
        raise KeyboardInterrupt

    monkeypatch.setattr(lora, "_build", interrupted)
    with pytest.raises(KeyboardInterrupt):
        build_lora_zoo("tiny", tmp_path / "cut", zoo=zoo_dir, check_criteria=False, _recipe=recipe)
    assert not (tmp_path / "cut").exists() and not any(p.name.startswith(".cut") for p in tmp_path.iterdir())
    # ... and a rebuilt base zoo makes the adapters stale: they are trained again on the new base.
    monkeypatch.setattr(lora, "_build", lambda tmp, **kw: calls.append(tmp) or real_build(tmp, **kw))
    assert build_lora_zoo("tiny", out, zoo=zoo_dir, check_criteria=False, _recipe=recipe) == first
    assert len(calls) == 1  # the interrupted build only
    weights = out / "adapters" / "rev" / "adapter_model.safetensors"
    trained = weights.read_bytes()
    build_zoo(zoo_dir, seed=1, force=True, check_criteria=False, _recipe=_tiny_recipe())  # other weights
    second = build_lora_zoo("tiny", out, zoo=zoo_dir, check_criteria=False, _recipe=recipe)
    assert len(calls) == 2
    assert second["base_zoo"]["zoo_json_sha256"] != first["base_zoo"]["zoo_json_sha256"]
    assert weights.read_bytes() != trained
    assert json.loads((out / LORA_ZOO_JSON).read_text())["base_zoo"] == second["base_zoo"]


def test_a_study_merges_the_lora_zoo_adapters_and_exports_the_merge(
    tiny_lora_zoo: dict[str, Any], tmp_path: Path
) -> None:
    import optuna
    from optuna.trial import TrialState

    from objectives.tasks import load_tasks, score_tasks
    from optimizer.checkpoints import ModelSet
    from optimizer.config import config_from_dict
    from optimizer.engines.hf_engine import HFEngine

    root = Path(tiny_lora_zoo["root"])
    cfg = zoo_config("lora", limit=16)
    cfg["models"] = {t: str(root / rel) for t, rel in tiny_lora_zoo["adapters"].items()}
    cfg["search"] = {"trials": 6, "seed": 0}
    path = write_config(tmp_path / "lora.yaml", cfg)
    run_cli("search", str(path), cwd=tmp_path, check=True, timeout=900)
    study = optuna.load_study(study_name="lora", storage=f"sqlite:///{tmp_path / 'studies' / 'lora' / 'study.db'}")
    complete = study.get_trials(states=(TrialState.COMPLETE,))
    assert len(complete) >= 6
    best = max(complete, key=lambda t: sum(t.values))
    out = tmp_path / "merged"
    run_cli("export", str(tmp_path / "studies" / "lora"), "--trial", str(best.number), "--out", str(out),
            "--dtype", "float32", cwd=tmp_path, check=True)  # fmt: skip
    assert (out / "config.json").is_file() and list(out.glob("*.safetensors"))
    # The exported model scores what its trial scored, and it merged the adapters' skills:
    # on the search split it beats the base on every task it was asked to do well.
    config = config_from_dict(cfg)
    tasks = load_tasks(config)
    merged = [r.value for r in score_tasks(HFEngine(ModelSet(out, {}), device="cpu"), tasks, "search")]
    assert merged == pytest.approx(list(best.values), abs=1e-9)
    base_engine = HFEngine(ModelSet(Path(tiny_lora_zoo["base"]), {}), device="cpu")
    base = [r.value for r in score_tasks(base_engine, tasks, "search")]
    assert sum(merged) > sum(base) + 0.2, (merged, base)
