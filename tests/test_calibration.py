"""Calibration text: what RegMean measures its Grams on, kept apart from what the search scores.

The authors of RegMean measure each model on its own training data; measuring on the search split
would fit the merge to the examples it is then judged on. What a user relies on: the zoo ships a
``train`` split disjoint from search and held-out; a study reads each model's own tasks' split (or
the file its config names), capped at ``calibration.examples``; the Grams are measured again when
that text changes; and a study that has no calibration text is refused with one line before
anything is written.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from objectives.tasks import load_tasks
from optimizer.config import config_from_dict
from optimizer.errors import ConfigError, DataError
from optimizer.merge.regmean import GramsData
from optimizer.search.prepare import prepare
from optimizer.search.study_data import _Inputs
from tests._cli import run_cli, write_config, zoo_config


def _inputs(config: dict, log: list[str] | None = None) -> _Inputs:
    study = config_from_dict(config)
    prepared = prepare(study)
    return _Inputs(study, prepared.models, load_tasks(study), (log if log is not None else []).append)


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def test_the_zoo_ships_a_train_split_disjoint_from_what_is_scored(zoo) -> None:
    root = Path(zoo["root"])
    for task in ("rev", "sort", "rot"):
        folder = root / "tasks" / task
        train = [r["prompt"] for r in _rows(folder / "train.jsonl")]
        scored = {r["prompt"] for split in ("search", "held_out") for r in _rows(folder / f"{split}.jsonl")}
        assert len(train) == len(set(train)) == 1024
        assert not set(train) & scored
        modes = {oct((folder / f"{split}.jsonl").stat().st_mode & 0o777) for split in ("train", "search")}
        assert len(modes) == 1  # as readable as the other splits


def test_regmean_reads_each_models_own_train_split_capped_and_never_the_search_split(zoo) -> None:
    log: list[str] = []
    inputs = _inputs(zoo_config("cal", method="regmean", calibration={"examples": 100}), log)
    texts = inputs.calibration("rev")
    train = _rows(Path(zoo["root"]) / "tasks" / "rev" / "train.jsonl")
    fmt = inputs.tasks["rev"].metric.format  # rendered as the task renders its prompts
    assert texts == [fmt.prompt(r) + r["target"] for r in train[:100]]
    searched = {fmt.prompt(ex) + ex["target"] for ex in inputs.tasks["rev"].search}
    assert searched and not searched & set(texts)
    assert not [line for line in log if "warning" in line]
    # The Grams are keyed on that text: another cap is another measurement, the same cap is not.
    again = _inputs(zoo_config("cal", method="regmean", calibration={"examples": 100}))
    more = _inputs(zoo_config("cal", method="regmean", calibration={"examples": 200}))
    assert GramsData().key(inputs) == GramsData().key(again) != GramsData().key(more)


def test_a_calibration_file_named_in_the_config_replaces_the_split(zoo, tmp_path: Path) -> None:
    text_file = tmp_path / "rev_text.jsonl"
    text_file.write_text("".join(json.dumps({"text": f"REV: doc {i}"}) + "\n" for i in range(5)))
    rows_file = tmp_path / "sort_rows.jsonl"
    rows_file.write_text(json.dumps({"prompt": "SORT: cba =", "target": " abc"}) + "\n")
    # A calibration row that is also a search example is used, with a warning in the log.
    search = _rows(Path(zoo["root"]) / "tasks" / "rot" / "search.jsonl")[0]
    rot_file = tmp_path / "rot_rows.jsonl"
    rot_file.write_text(json.dumps(search) + "\n")
    log: list[str] = []
    inputs = _inputs(
        zoo_config(
            "cal",
            method="regmean",
            calibration={"data": {"rev": str(text_file), "sort": str(rows_file), "rot": str(rot_file)}},
        ),
        log,
    )
    assert inputs.calibration("rev") == [f"REV: doc {i}" for i in range(5)]
    assert inputs.calibration("sort") == [inputs.tasks["sort"].metric.format.prompt({"prompt": "SORT: cba ="}) + " abc"]
    assert inputs.calibration("rot") == [inputs.tasks["rot"].metric.format.prompt(search) + search["target"]]
    assert any("1 of model rot's calibration examples are also search examples" in line for line in log)


def test_calibration_for_a_model_the_study_lacks_is_one_line() -> None:
    with pytest.raises(ConfigError, match=r"calibration\.data names model 'nope'"):
        config_from_dict(zoo_config("cal", method="regmean", calibration={"data": {"nope": "x.jsonl"}}))


def test_a_regmean_study_without_calibration_text_is_refused_before_anything_is_written(zoo, tmp_path: Path) -> None:
    data = tmp_path / "rev_data"
    data.mkdir()
    for split in ("search", "held_out"):
        shutil.copy(Path(zoo["root"]) / "tasks" / "rev" / f"{split}.jsonl", data / f"{split}.jsonl")
    config = zoo_config("nocal", method="regmean", limit=4)
    config["objectives"][0]["data"] = str(data)
    with pytest.raises(DataError, match="add a 'train' split there"):
        _inputs(config).calibration("rev")
    path = write_config(tmp_path / "nocal.yaml", config)
    proc = run_cli("search", str(path), cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "calibration.data.rev" in lines[0], proc.stderr
    assert not (tmp_path / "studies" / "nocal" / "study.db").exists()
    assert not (tmp_path / "studies" / "nocal" / "grams.safetensors").exists()
