"""Commands around the seed methods: ``analyze contributions`` (Hi-Merging) and ``golden`` (HILA).

Each checks its input before it writes anything; user mistakes are one MergeoptError line.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from optimizer.cli._common import NameOpt, StudyArg, console, positive
from optimizer.errors import MergeoptError

analyze_app = typer.Typer(help="Analyses of a study's models that narrow its search.", no_args_is_help=True)


@analyze_app.command("contributions")
def contributions(
    study: StudyArg,
    name: NameOpt = None,
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
    probes: Annotated[
        str | None,
        typer.Option(help="authors (a layer at 1.0 alone, at 0.5 merged, normalized) or scaled (at its own scale)"),
    ] = None,
    embed_head: Annotated[
        bool | None, typer.Option("--embed-head/--no-embed-head", help="probe the embedding and head too")
    ] = None,
    enqueue: Annotated[bool, typer.Option(help="enqueue warm-start trials for the next 'mergeopt search'")] = True,
) -> None:
    """Hi-Merging's layer probes: which layers help alone but hurt merged (table, heatmap, JSON, warm starts)."""
    from optimizer.engines import study_engine
    from optimizer.report import default_report_dir
    from optimizer.report.contributions import contribution_table, write_contribution_files
    from optimizer.search.study import open_existing
    from optimizer.search.warm_starts import analyze_study

    if split not in ("search", "held_out"):
        raise MergeoptError(f"--split {split!r} is not a split; use 'search' or 'held_out'")
    out = console()
    opened, prepared = open_existing(study, name)
    config = prepared.config
    with (
        study_engine(config, prepared.models, memory=prepared.memory) as engine,
        out.status("probing layers") as spinner,
    ):
        outcome = analyze_study(
            opened,
            prepared,
            engine,
            trial=trial,
            split=split,
            cross=cross,
            refresh=refresh,
            threshold=threshold,
            margin=margin,
            enqueue=enqueue,
            probes=probes,
            embed_head=embed_head,
            progress=lambda msg: spinner.update(f"probing layers: {msg}"),
        )
    analysis = outcome.analysis
    if outcome.reused:
        out.print(f"using the analysis stored in the study ({analysis.probes} probes); --refresh to probe again")
    out.print(contribution_table(analysis, threshold=threshold, margin=margin))
    folder = default_report_dir(study, opened.study_name).parent  # the study folder
    data, png = write_contribution_files(analysis, folder, threshold=threshold, margin=margin)
    out.print(f"{len(outcome.conflicts)} conflicts; heatmap {png}; data {data}")
    if outcome.conflicts:
        own = "" if config.granularity == "model" else " (already: the study's granularity is per layer)"
        out.print(f"layers searched with their own coefficients from now on: {', '.join(outcome.layers)}{own}")
    if outcome.enqueued:
        out.print(f"enqueued {', '.join(outcome.enqueued)}; run 'mergeopt search' on the config to score them")


def golden(
    config: Annotated[Path, typer.Argument(help="config whose objectives are the source tasks")],
    out: Annotated[Path | None, typer.Option(help="golden folder (default: STUDY_DIR/golden)")] = None,
    max_tokens: Annotated[int | None, typer.Option(help="answer length cap (default: each objective's)")] = None,
    fingerprint: Annotated[str, typer.Option(help="'stat' (headers+size+mtime) or 'content' (every byte)")] = "stat",
    force: Annotated[bool, typer.Option(help="regenerate even when cached")] = False,
) -> None:
    """Each specialist answers its task's prompts greedily: golden data for metric nll / exact_match."""
    from objectives.golden import generate_golden, read_manifest
    from objectives.tasks import only_native
    from optimizer.config import load_config
    from optimizer.engines import study_engine
    from optimizer.search.prepare import prepare
    from optimizer.union_vocab import union_models

    positive(max_tokens, "--max-tokens", "the answer length must be a positive number")
    if fingerprint not in ("stat", "content"):
        raise MergeoptError(f"--fingerprint {fingerprint!r}: use 'stat' or 'content'")
    cfg = load_config(config)
    prepared = prepare(cfg)  # validated only: golden data needs none of the method's study data
    target = out or cfg.study_dir() / "golden"
    models = union_models(prepared.models, cfg.study_dir())  # specialists that added tokens answer with them
    with study_engine(cfg, models, memory=prepared.memory) as engine:
        written = generate_golden(
            cfg,
            only_native(prepared.tasks, "golden data"),  # the specialists answer prompts mergeopt renders
            engine,
            out_dir=target,
            max_tokens=max_tokens,
            fingerprint="content" if fingerprint == "content" else "stat",
            force=force,
        )
    for task, folder in written.items():
        m = read_manifest(folder) or {}
        splits = m.get("splits", {})
        rows = "+".join(str(splits.get(s, {}).get("rows", "?")) for s in ("search", "held_out"))
        console().print(
            f"{task}: {rows} answers by {m.get('specialist', '?')} in {folder}"
            f"  (use as an objective: data: {folder}, metric: nll)"
        )
