"""``mergeopt zoo build``: the embedded model zoo, trained here (or found in the cache)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from optimizer.cli._common import console, print_zoo

zoo_app = typer.Typer(help="The embedded model zoo: a tiny base and specialists trained here.", no_args_is_help=True)


@zoo_app.command("build")
def build(
    out: Annotated[Path | None, typer.Option(help="zoo folder (default: the shared cache)")] = None,
    seed: int = 0,
    force: Annotated[bool, typer.Option(help="rebuild even if a complete zoo is cached")] = False,
    real: Annotated[
        bool, typer.Option("--real", help="the real-model zoo: SmolLM2-135M-Instruct and chat specialists (~12 min)")
    ] = False,
) -> None:
    """Train (or load from cache) a base model and its specialists: the tiny zoo, or with --real a real LLM's."""
    shown = console()
    say = lambda line: shown.print(line, highlight=False)  # noqa: E731
    if real:
        from optimizer.zoo.real import build_real_zoo, default_real_zoo_dir

        target = out or default_real_zoo_dir(seed=seed)
        info = build_real_zoo(target, seed=seed, force=force, log=say)
    else:
        from optimizer.zoo import build_zoo, default_zoo_dir

        target = out or default_zoo_dir(seed=seed)
        info = build_zoo(target, seed=seed, force=force, log=say)
    print_zoo(info, target)
