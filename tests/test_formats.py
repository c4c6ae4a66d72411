"""Task formats real data needs: templates, few-shot, chat, answer extraction, normalizers, BOS.

What a user relies on: a prompt is exactly what the options say (checked on rendered text, with
expected strings written out here), shots are the same in every trial and never the question,
an answer is judged as the options say, both engines receive the same text, and every bad option
is one line naming the problem, before anything is written.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest

from objectives.formats import PromptFormat, Verdict
from objectives.tasks import load_tasks
from optimizer.config import config_from_dict
from optimizer.errors import ConfigError, DataError
from optimizer.tokens import TokenizerInfo, with_bos
from tests._cli import run_cli, write_config, zoo_config

CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
ROWS = [{"q": f"word{i}", "a": f"ans{i}", "n": i} for i in range(6)]


def _data(tmp: Path, rows: list[dict] = ROWS, name: str = "data") -> Path:
    folder = tmp / name
    folder.mkdir(exist_ok=True)
    for split in ("search", "held_out"):
        (folder / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder


def _chat_base(tmp: Path, zoo_dir: Path) -> Path:
    """A copy of the zoo's base whose tokenizer has a chat template."""
    base = tmp / "chat_base"
    shutil.copytree(zoo_dir / "base", base)
    config = json.loads((base / "tokenizer_config.json").read_text())
    (base / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": CHATML}))
    return base


def _tasks(tmp: Path, objective: dict, **overrides: object):
    config = zoo_config("fmt", objectives=[{"name": "t", "data": str(_data(tmp)), **objective}], **overrides)
    return load_tasks(config_from_dict(config))


# -- rendering ---------------------------------------------------------------------------------------


def test_templates_render_prompts_and_targets_from_a_rows_fields(zoo, tmp_path) -> None:
    [task] = _tasks(
        tmp_path,
        {"metric": "exact_match", "prompt_template": "Say {{ q }} #{{ n }}:", "target_template": " {{ a|upper }}"},
    )
    fmt = task.metric.format
    row = task.search[2]
    assert fmt.prompt(row) == "<s>Say word2 #2:"  # the zoo's tokenizer puts a BOS first, so the text carries it
    assert fmt.target(row) == " ANS2"


def test_fewshot_shots_are_fixed_by_the_seed_and_never_the_question(zoo, tmp_path) -> None:
    objective = {"metric": "exact_match", "prompt_template": "Q {{ q }} =", "target_template": " {{ a }}", "fewshot": 2}
    [task] = _tasks(tmp_path, objective)
    again = _tasks(tmp_path, objective)[0]  # another load, as another trial's process would do
    other_seed = _tasks(tmp_path, objective, search={"seed": 7})[0]
    for i, row in enumerate(task.search):
        prompt = task.metric.format.prompt(row)
        blocks = prompt.removeprefix("<s>").split("\n\n")
        assert len(blocks) == 3 and blocks[-1] == f"Q word{i} ="  # two solved shots, then the question
        assert all(b.startswith("Q word") and b.endswith(" ans" + b.split("word")[1].split(" ")[0]) for b in blocks[:2])
        assert f"Q word{i} =" not in blocks[:2] and len(set(blocks[:2])) == 2
        assert again.metric.format.prompt(again.search[i]) == prompt
    assert [other_seed.metric.format.prompt(r) for r in other_seed.search] != [
        task.metric.format.prompt(r) for r in task.search
    ]
    held = task.metric.format.prompt(task.held_out[0])  # held-out questions take their shots from search
    assert held.count("\n\n") == 2


def test_chat_wraps_system_shots_and_question_in_the_tokenizers_template(zoo, tmp_path) -> None:
    base = _chat_base(tmp_path, Path(zoo["root"]))
    objective = {
        "metric": "exact_match",
        "chat": True,
        "system": "Answer briefly.",
        "prompt_template": "{{ q }}?",
        "target_template": "{{ a }}",
        "fewshot": 1,
    }
    [task] = _tasks(tmp_path, objective, base=str(base))
    prompt = task.metric.format.prompt(task.search[0])
    shot = prompt.split("<|im_start|>user\n")[1].split("<|im_end|>")[0]
    answer = prompt.split("<|im_start|>assistant\n")[1].split("<|im_end|>")[0]
    assert prompt == (
        "<s><|im_start|>system\nAnswer briefly.<|im_end|>\n"
        f"<|im_start|>user\n{shot}<|im_end|>\n<|im_start|>assistant\n{answer}<|im_end|>\n"
        "<|im_start|>user\nword0?<|im_end|>\n<|im_start|>assistant\n"
    )
    assert shot != "word0?" and answer == "ans" + shot.removeprefix("word").removesuffix("?")


# -- judging -----------------------------------------------------------------------------------------


def test_extraction_takes_the_first_group_else_the_match_and_no_match_is_a_miss() -> None:
    number = Verdict(extract=r"= *(-?\d+)")
    assert number("75 + 98 = 173.", "173") and not number("75 + 98 = 172", "173")
    assert not number("I don't know", "173")  # no match: a miss, not the whole output
    whole = Verdict(extract=r"-?\d+")
    assert whole("The answer is 173, surely", "173")
    assert Verdict()(" Paris \n", "Paris")  # the default normalizer strips


def test_normalizers_apply_in_order_to_answer_and_target() -> None:
    loose = Verdict(normalize=("strip", "lower", "punctuation", "whitespace"))
    assert loose("  The  Eiffel-Tower! ", "the eiffeltower")
    assert not Verdict(normalize=("strip",))("The Eiffel Tower", "the eiffel tower")
    with pytest.raises(ConfigError, match="normalize 'upper' is not known"):
        Verdict(normalize=("upper",))


def test_bos_follows_the_tokenizer_unless_forced() -> None:
    adds = TokenizerInfo(bos_token="<s>", adds_bos=True, has_chat_template=False)
    silent = TokenizerInfo(bos_token="<s>", adds_bos=False, has_chat_template=False)
    assert with_bos("Q:", adds) == "<s>Q:" and with_bos("<s>Q:", adds) == "<s>Q:"  # never doubled
    assert with_bos("Q:", silent) == "Q:" and with_bos("<s>Q:", silent) == "<s>Q:"  # a template's BOS is kept
    assert with_bos("Q:", silent, True) == "<s>Q:" and with_bos("<s>Q:", adds, False) == "Q:"
    assert with_bos("Q:", None, True) == "Q:"  # no tokenizer information: left as written


def test_an_exact_match_task_scores_the_extracted_normalized_answer(zoo, tmp_path) -> None:
    """The whole path with an engine: rendered prompt in, extracted answer judged."""
    from optimizer.checkpoints import ModelSet
    from optimizer.engines.hf_engine import HFEngine
    from optimizer.merge.plan import specialist_plan

    zoo_dir = Path(zoo["root"])
    rows = [json.loads(line) for line in (zoo_dir / "tasks" / "rev" / "held_out.jsonl").read_text().splitlines()[:12]]
    objective = {
        "name": "rev",
        "data": str(_data(tmp_path, [{"word": r["prompt"][5:-2], "answer": r["target"].upper()} for r in rows])),
        "metric": "exact_match",
        "prompt_template": "REV: {{ word }} =",
        "target_template": "{{ answer }}",
        "extract": r"(\w+)",
        "normalize": ["strip", "lower"],
        "max_tokens": 14,
    }
    [task] = load_tasks(config_from_dict(zoo_config("e", objectives=[objective])))
    assert task.metric.format.prompt(task.held_out[0]) == "<s>" + rows[0]["prompt"]
    with HFEngine(ModelSet(zoo_dir / "base", {"rev": zoo_dir / "specialists" / "rev"})) as engine:
        engine.apply_plan(specialist_plan(("rev",), "rev"))
        outputs = engine.generate([task.metric.format.prompt(r) for r in task.held_out], max_tokens=14, stop=["\n"])
        score = task.score(engine, "held_out")
    found = [re.search(r"(\w+)", o) for o in outputs]
    expected = [
        float(f is not None and f.group(1).lower() == r["target"].strip()) for f, r in zip(found, rows, strict=True)
    ]
    assert score.per_example == expected and sum(expected) >= 9  # the rev specialist reverses; case is ignored


# -- bad input: one line, exit 2, nothing written -----------------------------------------------------


def _refused(tmp: Path, objective: dict, *needles: str, **overrides: object) -> None:
    config = zoo_config("bad", objectives=[{"name": "t", "data": str(_data(tmp)), **objective}], **overrides)
    proc = run_cli("search", str(write_config(tmp / "bad.yaml", config)), cwd=tmp)
    assert proc.returncode == 2, (proc.stdout, proc.stderr)
    lines = [ln for ln in proc.stderr.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("mergeopt: error: "), proc.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]
    assert not (tmp / "studies").exists()


@pytest.mark.parametrize(
    ("objective", "needles"),
    [
        ({"metric": "exact_match", "prompt_template": "{{ q }}", "extract": "(\\d+"}, ["extract", "not a valid regex"]),
        (
            {"metric": "exact_match", "prompt_template": "{{ question }}", "target_template": "{{ a }}"},
            ["prompt_template", "question", "row 0", "q, a, n"],
        ),
        (
            {"metric": "exact_match", "prompt_template": "{{ q }}", "target_template": "{{ a }}", "fewshot": 6},
            ["fewshot 6", "search split has 6"],
        ),
        (
            {"metric": "exact_match", "prompt_template": "{{ q }}", "target_template": "{{ a }}.", "stop": ["."]},
            ["contains the stop string '.'", "can never match"],
        ),
        ({"metric": "exact_match", "prompt_template": "{{ q }}", "target_template": "{{ a }}", "chat": True}, ["chat"]),
    ],
    ids=["invalid regex", "template names a missing field", "fewshot too large", "target with a stop", "no template"],
)
def test_bad_format_options_are_refused(objective: dict, needles: list[str], zoo, tmp_path) -> None:
    _refused(tmp_path, objective, *needles)


def test_format_errors_name_the_problem_in_the_library_too(zoo, tmp_path) -> None:
    with pytest.raises(ConfigError, match="has no chat template"):
        _tasks(tmp_path, {"metric": "nll", "prompt_template": "{{ q }}", "target_template": "{{ a }}", "chat": True})
    with pytest.raises(DataError, match="names a field a row lacks"):
        PromptFormat(prompt_template="{{ missing }}").prompt({"q": 1})
