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
    lora: Annotated[
        bool,
        typer.Option(
            "--lora",
            help="LoRA adapters (PEFT folders) for the zoo's tasks, trained on its base (tiny ~1 min, --real ~10 min)",
        ),
    ] = False,
) -> None:
    """Train (or load from cache) a base model and its specialists: the tiny zoo, or with --real a real LLM's.

    With --lora: one LoRA adapter per task of that zoo (built first if absent), on its base.
    """
    shown = console()
    say = lambda line: shown.print(line, highlight=False)  # noqa: E731
    if lora:
        from optimizer.zoo.lora import build_lora_zoo, default_lora_zoo_dir

        target = out or default_lora_zoo_dir("real" if real else "tiny", seed=seed)
        info = build_lora_zoo("real" if real else "tiny", target, seed=seed, force=force, log=say)
        root = Path(info["root"])
        say(f"base: {info['base']}")
        for task, rel in info["adapters"].items():
            say(f"adapter {task}: {root / rel}")
    elif real:
        from optimizer.zoo.real import build_real_zoo, default_real_zoo_dir

        target = out or default_real_zoo_dir(seed=seed)
        info = build_real_zoo(target, seed=seed, force=force, log=say)
    else:
        from optimizer.zoo import build_zoo, default_zoo_dir

        target = out or default_zoo_dir(seed=seed)
        info = build_zoo(target, seed=seed, force=force, log=say)
    print_zoo(info, target)
