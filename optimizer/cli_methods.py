"""Commands around the seed methods: contribution analysis, golden data, importance, Hi-Merging.

Registered into ``mergeopt`` by :func:`register`; each command checks its input before it writes
anything and reports user mistakes as one MergeoptError line (exit code 2).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from optimizer.errors import MergeoptError

__all__ = ["register", "run_hi_merging_stage"]

analyze_app = typer.Typer(help="Analyses of a study's models that narrow its search.", no_args_is_help=True)


@analyze_app.command("contributions")
def analyze_contributions_cmd(
    study: Annotated[str, typer.Argument(help="study folder (studies/NAME), its study.db, or a storage URL")],
    name: Annotated[str | None, typer.Option("--name", help="study name, if the storage holds several")] = None,
    trial: Annotated[
        int | None, typer.Option(help="analyse this trial's coefficients (default: every task vector at weight 1)")
    ] = None,
    split: Annotated[str, typer.Option(help="split the probes score: search or held_out")] = "search",
    threshold: Annotated[float, typer.Option(help="a conflict needs β below this")] = 0.0,
    margin: Annotated[float, typer.Option(help="a conflict needs β below α by more than this")] = 0.0,
    cross: Annotated[
        bool, typer.Option("--cross", help="score each single-layer probe on every task to name who hurts")
    ] = False,
    refresh: Annotated[bool, typer.Option("--refresh", help="probe again even if the study holds an analysis")] = False,
    enqueue: Annotated[bool, typer.Option(help="enqueue warm-start trials for the next 'mergeopt search'")] = True,
) -> None:
    """Hi-Merging's layer probes: which layers help alone but hurt merged (table, heatmap, JSON, warm starts)."""
    from optimizer.analysis.contribution_plots import contribution_heatmap, contribution_table
    from optimizer.analysis.contributions import ContributionAnalysis, analyze_contributions
    from optimizer.cli import _console, _default_report_dir, _LazyEngine, _open
    from optimizer.merge import MergePlan
    from optimizer.search.overrides import record_layer_overrides, with_study_overrides
    from optimizer.search.warm_starts import enqueue_warm_starts

    if split not in ("search", "held_out"):
        raise MergeoptError(f"--split {split!r} is not a split; use 'search' or 'held_out'")
    console = _console()
    st, prepared = _open(study, name)
    stored = st.user_attrs.get("contributions")
    if stored and not refresh and stored.get("trial") == trial:
        analysis = ContributionAnalysis.from_dict(stored)
        console.print(f"using the analysis stored in the study ({analysis.probes} probes); --refresh to probe again")
    else:
        kwargs = {}
        if trial is not None:
            found = [t for t in st.get_trials(deepcopy=False) if t.number == trial and "plan" in t.user_attrs]
            if not found:
                raise MergeoptError(f"study {st.study_name!r} has no trial {trial} with a plan; see 'mergeopt pareto'")
            plan = MergePlan.from_dict(found[0].user_attrs["plan"])
            kwargs = {"base_method": plan.method, "model_params": plan.params, "options": plan.options}
        engine = _LazyEngine(prepared)
        try:
            with console.status("probing layers") as status:
                analysis = analyze_contributions(
                    prepared,
                    engine(),
                    split=split,
                    cross=cross,
                    progress=lambda msg: status.update(f"probing layers: {msg}"),
                    **kwargs,
                )
        finally:
            engine.close()
        st.set_user_attr("contributions", {**analysis.to_dict(), "trial": trial})
    console.print(contribution_table(analysis, threshold=threshold, margin=margin))
    folder = _default_report_dir(study, st.study_name).parent  # the study folder
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "contributions.json").write_text(analysis.to_json())
    png = contribution_heatmap(analysis, folder / "contributions.png", threshold=threshold, margin=margin)
    found = analysis.conflicts(threshold, margin=margin)
    console.print(f"{len(found)} conflicts; heatmap {png}; data {folder / 'contributions.json'}")
    if found:
        layers = record_layer_overrides(st, prepared, (layer for _, layer in found))
        prepared = with_study_overrides(st, prepared)
        own = "" if prepared.config.granularity == "model" else " (already: the study's granularity is per layer)"
        console.print(f"layers searched with their own coefficients from now on: {', '.join(layers)}{own}")
    if enqueue:
        labels = enqueue_warm_starts(st, prepared, analysis, found)
        if labels:
            console.print(f"enqueued {', '.join(labels)}; run 'mergeopt search' on the config to score them")


def golden(
    config: Annotated[Path, typer.Argument(help="config whose objectives are the source tasks")],
    out: Annotated[Path | None, typer.Option(help="golden folder (default: STUDY_DIR/golden)")] = None,
    max_tokens: Annotated[int | None, typer.Option(help="answer length cap (default: each objective's)")] = None,
    fingerprint: Annotated[str, typer.Option(help="'stat' (headers+size+mtime) or 'content' (every byte)")] = "stat",
    force: Annotated[bool, typer.Option(help="regenerate even when cached")] = False,
) -> None:
    """Each specialist answers its task's prompts greedily: golden data for metric nll / exact_match."""
    from objectives.golden import generate_golden, read_manifest
    from objectives.tasks import load_tasks
    from optimizer.cli import _console, _LazyEngine
    from optimizer.config import load_config
    from optimizer.search.prepare import Prepared, check_models
    from optimizer.search.space import SearchSpace

    if max_tokens is not None and max_tokens <= 0:
        raise MergeoptError(f"--max-tokens {max_tokens}: the answer length must be a positive number")
    if fingerprint not in ("stat", "content"):
        raise MergeoptError(f"--fingerprint {fingerprint!r}: use 'stat' or 'content'")
    cfg = load_config(config)
    models, num_layers = check_models(cfg)
    prepared = Prepared(cfg, models, load_tasks(cfg), SearchSpace(cfg, num_layers))  # no study data needed
    target = out or cfg.study_dir() / "golden"
    engine = _LazyEngine(prepared)  # started only if some task misses the cache
    try:
        written = generate_golden(
            prepared, engine, out_dir=target, max_tokens=max_tokens, fingerprint=fingerprint, force=force
        )
    finally:
        engine.close()
    for task, folder in written.items():
        m = read_manifest(folder) or {}
        splits = m.get("splits", {})
        rows = "+".join(str(splits.get(s, {}).get("rows", "?")) for s in ("search", "held_out"))
        _console().print(
            f"{task}: {rows} answers by {m.get('specialist', '?')} in {folder}"
            f"  (use as an objective: data: {folder}, metric: nll)"
        )


def run_hi_merging_stage(study, prepared, engine, console) -> None:
    """``method: hi_merging``: run the unattended procedure once per study, record its plans as trials."""
    config = prepared.config
    if config.method != "hi_merging" or "hi_merging" in study.user_attrs:
        return
    from optimizer.analysis.contributions import hi_merging
    from optimizer.search.warm_starts import record_hi_merging

    hm = config.search.hi_merging
    with console.status("Hi-Merging") as status:
        result = hi_merging(
            prepared,
            engine(),
            rounds=hm.rounds,
            grid=tuple(hm.grid),
            method="hi_merging",
            options={**config.options, "seed": config.search.seed},
            margin=hm.margin,
            cross=hm.cross,
            progress=lambda msg: status.update(f"Hi-Merging: {msg}"),
        )
    n = record_hi_merging(study, prepared, result)
    console.print(
        f"Hi-Merging: {n} plans recorded as trials; chosen plan scores {result.score:+.3f} (mean normalized gain)"
    )


def register(app: typer.Typer) -> None:
    """Add this module's commands to the ``mergeopt`` app."""
    app.add_typer(analyze_app, name="analyze")
    app.command("golden")(golden)
