"""Inspecting trade-offs: report files and their numbers, the page in a real browser, pick.

The study is the shared finished task-arithmetic study on the zoo (three tasks), so the front is
a real one and the held-out scores come from the real engine.
"""

from __future__ import annotations

import csv
import itertools
import json
import math
from pathlib import Path

import numpy as np
import optuna
import pytest

from optimizer.gain import normalized_gain
from optimizer.merge.plan import MergePlan, ModelParams
from optimizer.report.coefficients import coefficient_grid
from optimizer.report.hypervolume import hypervolume_history
from optimizer.report.pick import parse_assignments, pick
from optimizer.report.rows import ReportRow
from tests._browser import Browser
from tests._cli import run_cli, zoo_tasks


def _load(study_dir: Path) -> optuna.Study:
    return optuna.load_study(study_name=None, storage=f"sqlite:///{study_dir / 'study.db'}")


@pytest.fixture(scope="module")
def report(finished_study) -> tuple[Path, dict, optuna.Study]:
    cwd, study_dir = finished_study
    out = cwd / "report"
    run_cli("report", str(study_dir), "--out", str(out), cwd=cwd, check=True)
    return out, json.loads((out / "front.json").read_text()), _load(study_dir)


def test_report_holds_front_and_baselines_with_held_out_and_gain(report) -> None:
    out, data, study = report
    tasks = zoo_tasks()
    rows = {r["trial"] if "trial" in r else r["number"]: r for r in data["trials"]}
    best = {t.number for t in study.best_trials}
    labelled = {t.number for t in study.get_trials() if t.user_attrs.get("baseline") and t.values is not None}
    assert set(rows) == best | labelled
    assert {n for n, r in rows.items() if r["on_front"]} == best
    # Held-out scores are the ones cached in the study (measured once, by the real engine) ...
    cached = study.user_attrs["held_out"]
    for n, r in rows.items():
        assert r["held_out"] == cached[str(n)]
        assert r["search"] == dict(zip(study.metric_names, study.trials[n].values, strict=True))
    # ... and the gain is (merged − base) / (specialist − base) against the base and specialist trials.
    by_label = {r["label"]: r for r in rows.values() if r["label"]}
    for t in tasks:
        base, spec = by_label["base"]["held_out"][t], by_label[f"specialist:{t}"]["held_out"][t]
        assert data["references"]["base"][t] == base and data["references"]["specialist_of"][t] == t
        for r in rows.values():
            expected = normalized_gain(r["held_out"][t], base, spec)
            assert r["gain"][t] == (None if math.isnan(expected) else pytest.approx(expected, abs=1e-6))
    # front.csv carries the same numbers, one row per trial.
    with (out / "front.csv").open() as fh:
        table = list(csv.DictReader(fh))
    assert [int(r["trial"]) for r in table] == [r["number"] for r in data["trials"]]
    for line in table:
        r = rows[int(line["trial"])]
        assert float(line[f"held_out:{tasks[0]}"]) == pytest.approx(r["held_out"][tasks[0]], rel=1e-5)
    for name in ("report.html", "report.md", "front.png", "hypervolume.png", "front.html", "hypervolume.html"):
        assert (out / name).stat().st_size > 0, name
    assert list(out.glob("coefficients-trial-*.png")) and list(out.glob("coefficients-trial-*.html"))


def test_report_page_loads_in_chromium_with_the_studys_numbers(report) -> None:
    out, data, _ = report
    with Browser() as browser:
        browser.open((out / "report.html").as_uri())
        images = browser.eval("[...document.images].map(i => [i.alt, i.complete && i.naturalWidth > 0])")
        assert len(images) == 3 and all(ok for _, ok in images), images
        cells = browser.eval(
            "[...document.querySelectorAll('#front tr[data-trial]')].map(tr =>"
            " [Number(tr.dataset.trial), [...tr.querySelectorAll('td[data-value]')].map(td => td.dataset.value)])"
        )
        browser.screenshot(out / "screenshot.png")
    tasks = data["tasks"]
    assert [n for n, _ in cells] == [r["number"] for r in data["trials"]]
    for (_, values), r in zip(cells, data["trials"], strict=True):
        held = [float(v) for v in values[: len(tasks)]]
        assert held == pytest.approx([r["held_out"][t] for t in tasks], abs=1e-12)
    # The interactive plot pages load their (local) plotly and draw.
    with Browser() as browser:
        browser.open((out / "front.html").as_uri())
        assert browser.eval("document.querySelectorAll('.main-svg').length") > 0


def test_pick_follows_preferences_and_floors(report, finished_study) -> None:
    _out, data, _ = report
    cwd, study_dir = finished_study
    tasks = data["tasks"]
    front = [r for r in data["trials"] if r["on_front"] and all(r["gain"][t] is not None for t in tasks)]

    def weighted(r: dict, w: dict) -> float:
        return sum(w[t] * r["gain"][t] for t in tasks) / sum(w.values())

    weights = {tasks[0]: 5.0, tasks[1]: 1.0, tasks[2]: 1.0}
    expected = max(front, key=lambda r: (weighted(r, weights), min(r["gain"].values()), -r["number"]))
    proc = run_cli("pick", str(study_dir), "--prefer", f"{tasks[0]}=5", cwd=cwd, check=True)
    assert f"picked trial {expected['number']}" in proc.stdout
    # A floor no member meets: one clear line, exit 2.
    proc = run_cli("pick", str(study_dir), "--require", f"{tasks[1]}=5", cwd=cwd)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "no front member" in proc.stderr
    proc = run_cli("pick", str(study_dir), "--prefer", "nope=1", cwd=cwd)
    assert proc.returncode == 2 and "unknown task 'nope'" in proc.stderr


def test_pick_ranks_by_weighted_gain_within_floors() -> None:
    def row(n: int, a: float, b: float) -> ReportRow:
        return ReportRow(n, "", True, {}, {"a": a, "b": b}, {"a": a, "b": b}, {"a": a, "b": b})

    rows = [row(0, 1.0, 0.2), row(1, 0.7, 0.7), row(2, 0.3, 1.0)]
    assert pick(rows, ["a", "b"], {}, {})[0].row.number == 1  # mean gain .7 beats .6 and .65
    assert pick(rows, ["a", "b"], {"a": 4}, {})[0].row.number == 0
    assert pick(rows, ["a", "b"], {"a": 4}, {"b": 0.5})[0].row.number == 1
    best, ranked = pick(rows, ["a", "b"], {}, {"a": 2})
    assert best is None and all(c.misses for c in ranked)
    assert parse_assignments(["a=2"], ["a", "b"], "--prefer") == {"a": 2.0}
    with pytest.raises(Exception, match="TASK=NUMBER"):
        parse_assignments(["a"], ["a", "b"], "--prefer")


def test_hypervolume_history_matches_a_hand_computed_2d_front() -> None:
    study = optuna.create_study(directions=["maximize", "minimize"])
    points = [(0.2, 0.8), (0.5, 0.5), (0.4, 0.9), (0.9, 0.6)]
    for p in points:
        study.add_trial(optuna.trial.create_trial(values=list(p), params={}, distributions={}))
    history = hypervolume_history(study)
    losses = np.array([(-x, y) for x, y in points])
    ref = losses.max(axis=0) + 0.01 * (losses.max(axis=0) - losses.min(axis=0))

    def hv2(front: list[tuple[float, float]]) -> float:
        # 2-D: sweep by the first loss, area of the staircase to the reference point.
        area, prev_y = 0.0, ref[1]
        for x, y in sorted(front):
            if y < prev_y:
                area += (ref[0] - x) * (prev_y - y)
                prev_y = y
        return area

    expected = [hv2([tuple(p) for p in losses[: i + 1]]) for i in range(len(points))]
    assert [hv for _, hv in history] == pytest.approx(expected)
    assert all(a <= b for a, b in itertools.pairwise(expected))


def test_coefficient_grid_resolves_the_plan_like_the_merge_core() -> None:
    plan = MergePlan(
        "ties",
        ("a", "b"),
        {
            "a": ModelParams(0.5, 0.3),
            "a.L01.mlp": ModelParams(0.9, 0.8),
            "b.L00": ModelParams(0.1, 0.2),
            "b.head": ModelParams(2, 1),
        },
    )
    grid = coefficient_grid(plan, num_layers=2)
    assert grid.columns == ["embed", "L00", "L01", "head"]
    assert grid.rows == ["a.attn", "a.mlp", "b"]
    assert grid.weight[0] == [0.5, 0.5, 0.5, 0.5] and grid.weight[1] == [0.5, 0.5, 0.9, 0.5]
    assert grid.weight[2] == [1.0, 0.1, 1.0, 2.0] and grid.density[2] == [1.0, 0.2, 1.0, 1.0]
