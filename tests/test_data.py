"""Task data in every format users keep it in, through `datasets`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from objectives.data import load_split
from optimizer.errors import DataError

ROWS = {
    "search": [{"prompt": "rev: ab =", "target": " ba"}, {"prompt": "rev: abc =", "target": " cba"}],
    "held_out": [{"prompt": "rev: xy =", "target": " yx"}],
}


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


@pytest.mark.parametrize("fmt", ["jsonl", "csv", "parquet"])
def test_folder_of_split_files(tmp_path: Path, fmt: str) -> None:
    import datasets

    for split, rows in ROWS.items():
        ds = datasets.Dataset.from_list(rows)
        path = tmp_path / f"{split}.{fmt}"
        if fmt == "jsonl":
            _write_jsonl(path, rows)
        elif fmt == "csv":
            ds.to_csv(str(path), index=False)
        else:
            ds.to_parquet(str(path))
    for split, rows in ROWS.items():
        assert load_split(tmp_path, split) == rows


def test_save_to_disk_folder(tmp_path: Path) -> None:
    import datasets

    dd = datasets.DatasetDict({k: datasets.Dataset.from_list(v) for k, v in ROWS.items()})
    dd.save_to_disk(str(tmp_path / "dd"))
    assert load_split(tmp_path / "dd", "held_out") == ROWS["held_out"]
    with pytest.raises(DataError, match="no split 'dev'"):
        load_split(tmp_path / "dd", "dev")


def test_single_file_with_split_column(tmp_path: Path) -> None:
    path = tmp_path / "all.jsonl"
    _write_jsonl(path, [{**r, "split": s} for s, rows in ROWS.items() for r in rows])
    assert [r["prompt"] for r in load_split(path, "search")] == ["rev: ab =", "rev: abc ="]


def test_errors_name_the_problem(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="does not exist"):
        load_split(tmp_path / "nope", "search")
    _write_jsonl(tmp_path / "search.jsonl", ROWS["search"])
    with pytest.raises(DataError, match=r"no file for split .held_out.*search\.jsonl"):
        load_split(tmp_path, "held_out")
    (tmp_path / "held_out.jsonl").write_text("")
    with pytest.raises(DataError, match="empty"):
        load_split(tmp_path, "held_out")
    _write_jsonl(tmp_path / "plain.jsonl", ROWS["search"])
    with pytest.raises(DataError, match="'split' column"):
        load_split(tmp_path / "plain.jsonl", "search")
