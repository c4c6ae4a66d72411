"""``mergeopt report``: the held-out trade-off of a study, as files a person can read and share.

The folder is assembled under a temporary name and swapped in at the end, so an interrupted
report never leaves a mix of old and new files.
"""

from __future__ import annotations

import math
from collections import Counter
from pathlib import Path

import optuna

from optimizer.atomic import building_dir
from optimizer.engines.base import Engine
from optimizer.errors import ConfigError, MergeoptError
from optimizer.merge import get_method
from optimizer.merge.plan import MergePlan
from optimizer.report.coefficients import coefficient_grid
from optimizer.report.hypervolume import hypervolume_history
from optimizer.report.rows import ReportRow, collect_rows, write_tables
from optimizer.search import attrs
from optimizer.search.prepare import Prepared
from optimizer.search.references import References

__all__ = ["ReportRow", "balanced_pick", "build_report", "default_report_dir"]


def balanced_pick(rows: list[ReportRow]) -> ReportRow | None:
    """The front member whose worst task's normalized gain is highest (ties: the earlier trial)."""
    front = [r for r in rows if r.on_front and not math.isnan(r.min_gain)]
    return max(front, key=lambda r: (r.min_gain, -r.number)) if front else None


def default_report_dir(study: str, name: str) -> Path:
    """Where a report goes by default: ``report/`` in the study's folder (from what the user typed:
    the folder, its study file, or a URL, which has no folder: ``studies/<name>/report``)."""
    if "://" not in study and Path(study).is_dir():
        return Path(study) / "report"
    if "://" not in study:
        return Path(study).resolve().parent / "report"
    return Path("studies") / name / "report"


def _heatmap_trial(
    study: optuna.Study, rows: list[ReportRow], requested: int | None, pick: ReportRow | None
) -> int | None:
    if requested is None:
        return pick.number if pick else None
    trials = {t.number: t for t in study.get_trials(deepcopy=False)}
    if requested not in trials or attrs.PLAN not in trials[requested].user_attrs:
        raise ConfigError(f"--trial {requested}: no such trial with a plan in study {study.study_name!r}")
    return requested


def build_report(
    study: optuna.Study,
    prepared: Prepared,
    engine: Engine,
    out: Path,
    *,
    trial: int | None = None,
    storage_arg: str = "STUDY",
) -> tuple[Path, list[ReportRow], ReportRow | None]:
    """Score what is missing on held-out data, then write the report folder ``out`` (atomically)."""
    out = Path(out).resolve()
    if out.exists() and not out.is_dir():
        raise ConfigError(f"report output {str(out)!r} is a file; give a folder with --out")
    rows, refs = collect_rows(study, prepared, engine)
    if not rows:
        raise ConfigError(f"study {study.study_name!r} has no complete trial yet; run `mergeopt search` first")
    pick = balanced_pick(rows)
    heat = _heatmap_trial(study, rows, trial, pick)
    try:
        with building_dir(out, umask_modes=True) as tmp:
            _write(study, prepared, rows, refs, pick, heat, tmp, out, storage_arg)
    except OSError as exc:
        raise MergeoptError(f"cannot write the report to {out}: {exc.strerror or exc}; nothing was changed") from None
    return out, rows, pick


def _write(
    study: optuna.Study,
    prepared: Prepared,
    rows: list[ReportRow],
    refs: References,
    pick: ReportRow | None,
    heat: int | None,
    tmp: Path,
    out: Path,
    storage_arg: str,
) -> None:
    """Every file of the report into ``tmp`` (the final folder is ``out``)."""
    from optimizer.report import interactive, plots
    from optimizer.report.render import ReportContext, render_html, render_markdown

    tasks = study.metric_names or [t.name for t in prepared.tasks]
    metrics = [t.metric_name for t in prepared.tasks]
    config = prepared.config
    write_tables(rows, refs, tasks, tmp)
    images = {"Pareto front": tmp / "front.png", "Hypervolume over trials": tmp / "hypervolume.png"}
    pages = {"Pareto front": "front.html", "Hypervolume over trials": "hypervolume.html"}
    plots.plot_front(rows, tasks, metrics, images["Pareto front"])
    interactive.front_html(rows, tasks, tmp / pages["Pareto front"])
    history = hypervolume_history(study)
    plots.plot_hypervolume(history, images["Hypervolume over trials"])
    interactive.hypervolume_html(history, tmp / pages["Hypervolume over trials"])
    if heat is not None:
        plan = MergePlan.from_dict(study.get_trials(deepcopy=False)[heat].user_attrs[attrs.PLAN])
        grid = coefficient_grid(plan, prepared.space.num_layers)
        title = f"Coefficients of trial {heat}"
        images[title] = tmp / f"coefficients-trial-{heat}.png"
        pages[title] = f"coefficients-trial-{heat}.html"
        method = get_method(plan.method)
        fields = tuple(f for f, used in (("weight", method.uses_weight), ("density", method.uses_density)) if used)
        plots.plot_heatmap(grid, title, images[title], fields=fields or ("weight",))
        interactive.heatmap_html(grid, title, tmp / pages[title], fields=fields or ("weight",))
    counts = Counter(t.state.name for t in study.get_trials(deepcopy=False))
    export_trial = pick.number if pick else rows[0].number
    ctx = ReportContext(
        study=study.study_name,
        tasks=list(tasks),
        metrics=metrics,
        method=config.method,
        granularity=config.granularity,
        counts=dict(sorted(counts.items())),
        refs=refs,
        pick=pick.number if pick else None,
        heatmap_trial=heat,
        images={k: out / v.name for k, v in images.items()},
        interactive=pages,
        commands=[
            f"mergeopt report {storage_arg} --out {out}",
            f"mergeopt pick {storage_arg}",
            f"mergeopt export {storage_arg} --trial {export_trial} --out merged-trial-{export_trial}",
        ],
    )
    # render from the temp copies (the final paths do not exist yet)
    html_ctx = ReportContext(**{**ctx.__dict__, "images": images})
    (tmp / "report.html").write_text(render_html(rows, html_ctx))
    (tmp / "report.md").write_text(render_markdown(rows, ctx))
