"""The LoRA zoo: one PEFT LoRA adapter per task of a zoo, trained here on that zoo's own base.

The adapters see the data their zoo's full specialists were trained on — for the tiny zoo,
examples drawn on the fly with every scored prompt excluded (:func:`optimizer.zoo._train.finetune`);
for the real-model zoo, each task's ``train`` split in the chat format
(:func:`optimizer.zoo.real._finetune`) — with the same data order, only the base frozen and a
rank-``r`` update of every attention and MLP projection trained instead, at a higher rate.

Each adapter is an ordinary PEFT folder (``adapter_config.json`` + ``adapter_model.safetensors``,
``base_model_name_or_path`` the base's absolute path), a specialist mergeopt reads as its factors.
``lora_zoo.json`` records the recipe, the base zoo it belongs to and held-out exact match of
base + adapter (peft's ``merge_and_unload``) beside the base's and the full specialists'. Cached
as the zoos are (:func:`optimizer.zoo.build.cached_build`): built in a temporary folder, renamed
into place at the end, rebuilt when the recipe or the base zoo (its ``zoo.json``) changes.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from optimizer.errors import MergeoptError
from optimizer.zoo.build import MIN_SPECIALIST_GAIN, _fmt, cached_build

if TYPE_CHECKING:
    from transformers import PreTrainedModel

__all__ = [
    "LORA_ZOO_JSON",
    "LORA_ZOO_VERSION",
    "LoraRecipe",
    "build_lora_zoo",
    "default_lora_zoo_dir",
    "load_lora_zoo",
]

#: Bumped whenever a change to the recipes or the saving changes the built adapters.
LORA_ZOO_VERSION = 1
LORA_ZOO_JSON = "lora_zoo.json"
Kind = Literal["tiny", "real"]
_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class LoraRecipe:
    """The adapters' shape and training; batch, warm-up and data order are the base zoo's."""

    rank: int
    alpha: int
    lr: float
    steps: tuple[tuple[str, int], ...]
    target_modules: tuple[str, ...] = _PROJECTIONS
    # One thread, as the tiny zoo: on a shared box a second thread waiting for a busy core at every
    # OpenMP barrier cost more than it gained (the real zoo's own build uses two).
    threads: int = 1

    def to_dict(self) -> dict[str, object]:
        return {**asdict(self), "steps": dict(self.steps), "target_modules": list(self.target_modules)}

    def steps_for(self, task: str) -> int:
        return dict(self.steps)[task]


#: The tiny zoo's full specialists: 100 steps of 64 at 1.5e-4. A rank-8 update needs a rate
#: about ten times that to gain as much in as many steps.
TINY_RECIPE = LoraRecipe(rank=8, alpha=16, lr=2e-3, steps=(("rev", 100), ("sort", 100), ("rot", 100)))
#: The real zoo's full specialists: 40 / 24 / 20 steps of 16 at 1e-4 (see RealRecipe).
REAL_RECIPE = LoraRecipe(rank=16, alpha=32, lr=1e-3, steps=(("arith", 40), ("antonym", 24), ("extract", 20)))
RECIPES: dict[str, LoraRecipe] = {"tiny": TINY_RECIPE, "real": REAL_RECIPE}


def default_lora_zoo_dir(kind: Kind = "tiny", seed: int = 0) -> Path:
    """``lora-zoo-v<version>-<kind>-seed<seed>`` in ``$MERGEOPT_LORA_ZOO_DIR`` if set, else in
    ``~/.cache/mergeopt``."""
    parent = Path(os.environ.get("MERGEOPT_LORA_ZOO_DIR") or Path.home() / ".cache" / "mergeopt").expanduser()
    return parent / f"lora-zoo-v{LORA_ZOO_VERSION}-{kind}-seed{seed}"


def load_lora_zoo(path: Path | str) -> dict[str, Any]:
    """The ``lora_zoo.json`` of a built LoRA zoo, with ``root`` (its folder, absolute)."""
    from optimizer.zoo.build import load_zoo

    return load_zoo(path, manifest=LORA_ZOO_JSON)


def build_lora_zoo(
    kind: Kind = "tiny",
    out: Path | str | None = None,
    *,
    seed: int = 0,
    force: bool = False,
    log: Callable[[str], None] | None = None,
    zoo: Path | str | None = None,
    check_criteria: bool = True,
    _recipe: LoraRecipe | None = None,
) -> dict[str, Any]:
    """Train (or find cached) one LoRA adapter per task of the ``kind`` zoo; its ``lora_zoo.json``.

    ``zoo`` is a built base zoo's folder (default: that zoo's default folder, built first if absent). With
    ``check_criteria`` a build where some adapter gains less than
    :data:`~optimizer.zoo.build.MIN_SPECIALIST_GAIN` over the base on its task raises instead of
    being written. ``_recipe`` overrides the adapters' recipe (tests).
    """
    if kind not in RECIPES:
        raise MergeoptError(f"no {kind!r} zoo: a LoRA zoo is built on the 'tiny' or the 'real' zoo")
    base_zoo = _base_zoo(kind, seed, zoo, log)
    recipe = _recipe or RECIPES[kind]
    manifest = Path(base_zoo["root"]) / "zoo.json"
    key = {
        "lora_zoo_version": LORA_ZOO_VERSION,
        "kind": kind,
        "seed": base_zoo["seed"],  # the given zoo's, which may not be ``seed``
        "recipe": recipe.to_dict(),
        "base_zoo": {"root": base_zoo["root"], "zoo_json_sha256": hashlib.sha256(manifest.read_bytes()).hexdigest()},
    }
    return cached_build(
        Path(out) if out is not None else default_lora_zoo_dir(kind, seed),
        key=key,
        build=lambda tmp, say: _build(tmp, kind=kind, base_zoo=base_zoo, key=key, recipe=recipe, say=say),
        force=force,
        log=log,
        check_criteria=check_criteria,
        env_var="MERGEOPT_LORA_ZOO_DIR",
        manifest=LORA_ZOO_JSON,
        check=_check,
        summary=_summary,
    )


def _base_zoo(kind: str, seed: int, zoo: Path | str | None, log: Callable[[str], None] | None) -> dict[str, Any]:
    """The base zoo's zoo.json: the one in ``zoo`` as it is, else the default, built if absent."""
    if zoo is not None:
        from optimizer.zoo.build import load_zoo

        info = load_zoo(zoo)
        found = "real" if info.get("kind") == "real" else "tiny"
        if found != kind:
            raise MergeoptError(f"{str(zoo)!r} holds the {found} zoo, not the {kind} one; pass that zoo's folder")
        return info
    if kind == "real":
        from optimizer.zoo.real import build_real_zoo, default_real_zoo_dir

        return build_real_zoo(zoo or default_real_zoo_dir(seed), seed=seed, log=log)
    from optimizer.zoo.build import build_zoo, default_zoo_dir

    return build_zoo(zoo or default_zoo_dir(seed), seed=seed, log=log)


# -- building -----------------------------------------------------------------------------------------


def _build(
    tmp: Path,
    *,
    kind: str,
    base_zoo: Mapping[str, Any],
    key: Mapping[str, Any],
    recipe: LoraRecipe,
    say: Callable[[str], None],
) -> dict[str, Any]:
    import torch
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    started = time.perf_counter()
    threads = torch.get_num_threads()
    torch.set_num_threads(recipe.threads)
    try:
        with torch.random.fork_rng(devices=[]):  # seeding here must not reseed the caller's torch
            trainer = _TinyTasks(base_zoo) if kind == "tiny" else _RealTasks(base_zoo)
            info = _train_and_measure(tmp, trainer, base_zoo=base_zoo, recipe=recipe, say=say)
    finally:
        torch.set_num_threads(threads)
    return {**key, **info, "build_seconds": round(time.perf_counter() - started, 1)}


def _train_and_measure(
    tmp: Path, tasks: _Tasks, *, base_zoo: Mapping[str, Any], recipe: LoraRecipe, say: Callable[[str], None]
) -> dict[str, Any]:
    import torch
    from peft import LoraConfig, get_peft_model

    root = Path(base_zoo["root"])
    base_dir = root / base_zoo["base"]
    names = list(base_zoo["tasks"])
    seed = int(base_zoo["seed"])
    config = LoraConfig(
        r=recipe.rank,
        lora_alpha=recipe.alpha,
        lora_dropout=0.0,
        target_modules=list(recipe.target_modules),
        bias="none",
        task_type="CAUSAL_LM",
    )
    scores: dict[str, Any] = {"base": {t: base_zoo["scores"]["base"][t] for t in names}, "adapters": {}}
    scores["full_specialists"] = {t: {t: base_zoo["scores"]["specialists"][t][t]} for t in names}
    training: dict[str, Any] = {}
    for task in names:
        steps = recipe.steps_for(task)
        say(f"lora zoo: training the {task} adapter (rank {recipe.rank}, {steps} steps, lr {recipe.lr:g})")
        torch.manual_seed(seed)  # peft's init of the A factors
        model = get_peft_model(tasks.load(base_dir), config)
        model.peft_config["default"].base_model_name_or_path = str(base_dir)
        begun = time.perf_counter()
        training[task] = {"steps": steps, **tasks.train(model, task, steps=steps, lr=recipe.lr, seed=seed)}
        training[task]["seconds"] = round(time.perf_counter() - begun, 1)
        model.save_pretrained(str(tmp / "adapters" / task))
        merged = model.merge_and_unload()
        scores["adapters"][task] = tasks.evaluate(merged, task)
        say(f"lora zoo: {task} adapter {_fmt(scores['adapters'][task])} (base {scores['base'][task]:.2f})")
    gain = {t: scores["adapters"][t][t] - scores["base"][t] for t in names}
    return {
        "base_zoo_root": str(root),
        "base": str(base_dir),
        "tasks": {
            t: {split: str(root / rel) for split, rel in spec.items() if split in ("train", "search", "held_out")}
            for t, spec in base_zoo["tasks"].items()
        },
        "adapters": {t: f"adapters/{t}" for t in names},
        "metric": "exact_match",
        "eval_split": "held_out",
        "scores": scores,
        "criteria": {
            "adapters_beat_base": all(g >= MIN_SPECIALIST_GAIN for g in gain.values()),
            "min_adapter_gain": MIN_SPECIALIST_GAIN,
            "adapter_gain": {t: round(g, 4) for t, g in gain.items()},
        },
        "training": training,
    }


class _Tasks:
    """How one kind of zoo loads its base, trains a specialist and scores it (its own code)."""

    def load(self, base_dir: Path) -> PreTrainedModel:
        raise NotImplementedError

    def train(self, model: Any, task: str, *, steps: int, lr: float, seed: int) -> dict[str, Any]:
        raise NotImplementedError

    def evaluate(self, model: Any, task: str) -> dict[str, float]:
        raise NotImplementedError


class _TinyTasks(_Tasks):
    """The tiny zoo's examples: drawn on the fly as its specialists' were, scored on every task."""

    def __init__(self, base_zoo: Mapping[str, Any]) -> None:
        from optimizer.zoo._tokenizer import build_tokenizer
        from optimizer.zoo._train import Recipe
        from optimizer.zoo.build import _make_splits

        self.seed = int(base_zoo["seed"])
        self.recipe = Recipe(**base_zoo["recipe"])
        self.tokenizer = build_tokenizer()
        splits = _make_splits(self.seed, self.recipe)  # as the zoo drew them: its dev split is not shipped
        self.exclude = {ex.prompt for parts in splits.values() for part in parts.values() for ex in part}
        self.held_out = {t: parts["held_out"] for t, parts in splits.items()}

    def load(self, base_dir: Path) -> PreTrainedModel:
        import torch
        from transformers import LlamaForCausalLM

        return LlamaForCausalLM.from_pretrained(str(base_dir), dtype=torch.float32).eval()

    def train(self, model: Any, task: str, *, steps: int, lr: float, seed: int) -> dict[str, Any]:
        from optimizer.zoo._train import finetune
        from optimizer.zoo.tasks import TASKS

        finetune(
            model,  # a PeftModel around the Llama
            self.tokenizer,
            TASKS[task],
            recipe=replace(self.recipe, finetune_steps=steps, finetune_lr=lr),
            rng=random.Random(f"mergeopt-zoo:{seed}:finetune:{task}"),  # the full specialist's examples
            exclude=self.exclude,
        )
        return {}

    def evaluate(self, model: Any, task: str) -> dict[str, float]:
        from optimizer.zoo.build import _evaluate

        return _evaluate(model, self.tokenizer, self.held_out, self.recipe)


class _RealTasks(_Tasks):
    """The real zoo's ``train`` rows in its chat format, scored on the adapter's own task."""

    def __init__(self, base_zoo: Mapping[str, Any]) -> None:
        from transformers import AutoTokenizer

        from optimizer.zoo.real import RealRecipe, _chat_format

        root = Path(base_zoo["root"])
        recipe = base_zoo["recipe"]
        self.recipe = RealRecipe(**{**recipe, "steps": tuple(recipe["steps"].items())})
        self.tokenizer = AutoTokenizer.from_pretrained(str(root / base_zoo["base"]))
        self.format = _chat_format(self.tokenizer)
        self.rows = {
            t: {split: _jsonl(root / spec[split]) for split in ("train", "held_out")}
            for t, spec in base_zoo["tasks"].items()
        }

    def load(self, base_dir: Path) -> PreTrainedModel:
        from optimizer.zoo.real import _reload

        return _reload(base_dir)

    def train(self, model: Any, task: str, *, steps: int, lr: float, seed: int) -> dict[str, Any]:
        from optimizer.zoo.real import _finetune

        recipe = replace(self.recipe, steps=((task, steps),), lr=lr)
        done = _finetune(model, self.tokenizer, self.format, self.rows[task]["train"], recipe, task=task, seed=seed)
        return {k: v for k, v in done.items() if k.startswith("loss")}

    def evaluate(self, model: Any, task: str) -> dict[str, float]:
        from optimizer.zoo.real import _evaluate

        return _evaluate(model, self.tokenizer, self.format, {task: self.rows[task]["held_out"]}, self.recipe)


def _jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _check(info: Mapping[str, Any]) -> None:
    if not info["criteria"]["adapters_beat_base"]:
        raise MergeoptError(
            f"the {info['kind']} LoRA zoo (seed {info['seed']}) has an adapter that does not beat the base by"
            f" +{MIN_SPECIALIST_GAIN:.2f} on its task: {_summary(info)}"
        )


def _summary(info: Mapping[str, Any]) -> str:
    s = info["scores"]
    return ", ".join(
        f"{t}: base {s['base'][t]:.2f} → adapter {s['adapters'][t][t]:.2f} (full specialist"
        f" {s['full_specialists'][t][t]:.2f})"
        for t in info["adapters"]
    )
