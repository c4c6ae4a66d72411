"""The numbers a report shows: every front member and every baseline, scored on held-out data.

Search scores are measured on the few examples the sampler optimised against, so they are
optimistic; a choice should rest on held-out scores. One :class:`ReportRow` per trial carries
both, plus the held-out normalized gain per task (see :mod:`optimizer.gain`), and the
tables (``front.csv``, ``front.json``) are written from these rows only, so every file of a
report shows the same numbers.
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import optuna
from optuna.trial import TrialState

from optimizer.engines.base import Engine
from optimizer.search import attrs
from optimizer.search.front import front_trials
from optimizer.search.held_out import held_out_scores
from optimizer.search.prepare import Prepared
from optimizer.search.references import References, references

__all__ = ["ReportRow", "collect_rows", "write_tables"]


@dataclass(frozen=True)
class ReportRow:
    """One trial as the report shows it."""

    number: int
    label: str  # baseline label ("base", "specialist:rev"...) or "" for a searched trial
    on_front: bool
    params: dict[str, float]
    search: dict[str, float]
    held_out: dict[str, float]
    gain: dict[str, float]  # held-out normalized gain per task

    @property
    def min_gain(self) -> float:
        """The worst task's gain: the balanced-choice criterion (maximin)."""
        values = [g for g in self.gain.values() if not math.isnan(g)]
        return min(values) if values else math.nan

    @property
    def name(self) -> str:
        return f"trial {self.number}" + (f" ({self.label})" if self.label else "")


def collect_rows(study: optuna.Study, prepared: Prepared, engine: Engine) -> tuple[list[ReportRow], References]:
    """Front members (by trial number), then baselines that are not on the front."""
    front = front_trials(study)
    on_front = {t.number for t in front}
    baselines = [
        t
        for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
        if t.user_attrs.get(attrs.BASELINE) and t.number not in on_front
    ]
    trials = front + sorted(baselines, key=lambda t: t.number)
    held = held_out_scores(study, trials, prepared, engine)
    refs = references(study, prepared, engine)
    names = study.metric_names or [t.name for t in prepared.tasks]
    rows = []
    for t in trials:
        held_out = held[t.number]
        rows.append(
            ReportRow(
                number=t.number,
                label=str(t.user_attrs.get(attrs.BASELINE, "")),
                on_front=t.number in on_front,
                params={k: float(v) for k, v in t.params.items()},
                search=dict(zip(names, t.values, strict=True)),
                held_out=held_out,
                gain={n: refs.gain(n, held_out[n]) for n in names},
            )
        )
    return rows, refs


def _num(value: float) -> float | None:
    return None if math.isnan(value) else round(value, 6)


def write_tables(rows: Sequence[ReportRow], refs: References, tasks: Sequence[str], out: Path) -> None:
    """``front.csv`` (one flat row per trial) and ``front.json`` (nested, with the references)."""
    param_names = sorted({p for r in rows for p in r.params})
    header = ["trial", "label", "on_front"]
    header += [f"param:{p}" for p in param_names]
    header += [f"{kind}:{t}" for kind in ("search", "held_out", "gain") for t in tasks]
    header += ["min_gain"]
    with (out / "front.csv").open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(header)
        for r in rows:
            writer.writerow(
                [r.number, r.label, int(r.on_front)]
                + [r.params.get(p, "") for p in param_names]
                + [_fmt(d[t]) for d in (r.search, r.held_out, r.gain) for t in tasks]
                + [_fmt(r.min_gain)]
            )
    data = {
        "tasks": list(tasks),
        "references": asdict(refs),
        "trials": [
            {
                **asdict(r),
                "gain": {k: _num(v) for k, v in r.gain.items()},
                "min_gain": _num(r.min_gain),
            }
            for r in rows
        ],
    }
    (out / "front.json").write_text(json.dumps(data, indent=2) + "\n")


def _fmt(value: float) -> str:
    return "" if math.isnan(value) else f"{value:.6g}"
