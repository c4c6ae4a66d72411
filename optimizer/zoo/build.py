"""Build, cache and load the embedded model zoo: a tiny base, one specialist per task, their data.

No model hub is reachable from where mergeopt's demo and tests run, so the project trains its own
merge problem: a small Llama pretrained on a mix of synthetic tasks, then briefly fine-tuned once
per task. The build measures, and refuses to ship a zoo that fails, the two properties that make
it a merge problem worth searching: each specialist clearly beats the base on its task, and plain
task arithmetic (λ = 1) clearly loses to a specialist somewhere.

A zoo directory is complete exactly when its ``zoo.json`` exists and matches the version, seed
and recipe asked for: the build happens in a sibling temp directory that is renamed into place
only at the end, so an interrupted build never looks complete.
"""

from __future__ import annotations

import glob
import json
import os
import random
import shutil
import socket
import tempfile
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from optimizer.atomic import replace_dir
from optimizer.errors import DataError, MergeoptError
from optimizer.zoo.stats import task_vector_stats
from optimizer.zoo.tasks import STOP, TASK_NAMES, TASKS, Example

if TYPE_CHECKING:
    from transformers import LlamaForCausalLM, PreTrainedTokenizerBase

    from optimizer.zoo._train import Recipe

__all__ = [
    "MIN_SPECIALIST_GAIN",
    "MIN_TA_LOSS",
    "merge_problem_criteria",
    "ZOO_VERSION",
    "build_zoo",
    "cached_build",
    "default_zoo_dir",
    "load_zoo",
]

#: Bumped whenever a change to tasks, tokenizer, model or training changes the built zoo.
ZOO_VERSION = 3
#: Held-out exact match each specialist must gain over the base on its own task.
MIN_SPECIALIST_GAIN = 0.20
#: Held-out exact match task arithmetic (λ = 1) must lose against the specialist on some task.
MIN_TA_LOSS = 0.10

_ZOO_JSON = "zoo.json"
# One thread, always: the zoo's matmuls are too small to gain much from more, a fixed count keeps
# the build bit-reproducible, and on a shared box a second thread that has to wait for a busy core
# at every OpenMP barrier made training 5-10x slower, not faster (measured on 2 shared cores).
_THREADS = 1

def merge_problem_criteria(gain: Mapping[str, float], loss: Mapping[str, float]) -> dict[str, object]:
    """What makes a zoo a merge problem, as its zoo.json records it (both zoos use the same bar)."""
    return {
        "specialists_beat_base": all(g >= MIN_SPECIALIST_GAIN for g in gain.values()),
        "task_arithmetic_loses": any(x >= MIN_TA_LOSS for x in loss.values()),
        "min_specialist_gain": MIN_SPECIALIST_GAIN,
        "min_task_arithmetic_loss": MIN_TA_LOSS,
        "specialist_gain": {t: round(g, 4) for t, g in gain.items()},
        "task_arithmetic_loss": {t: round(x, 4) for t, x in loss.items()},
    }



def default_zoo_dir(seed: int = 0) -> Path:
    """``$MERGEOPT_ZOO_DIR`` if set, else ``~/.cache/mergeopt/zoo-v<version>-seed<seed>``."""
    env = os.environ.get("MERGEOPT_ZOO_DIR")
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "mergeopt" / f"zoo-v{ZOO_VERSION}-seed{seed}"


def load_zoo(path: Path | str, *, manifest: str = _ZOO_JSON) -> dict[str, Any]:
    """The ``zoo.json`` of a built zoo (``path`` is its directory or the file itself).

    The returned dict also carries ``root``, the zoo directory as an absolute path, against which
    every path inside it (models, task data) is relative. ``manifest`` names another zoo's file
    (the LoRA zoo's ``lora_zoo.json``).
    """
    path = Path(path).expanduser()
    file = path if path.name == manifest else path / manifest
    if not file.is_file():
        raise DataError(f"{str(path)!r} holds no built zoo ({manifest} missing); build it with build_zoo()")
    try:
        info = json.loads(file.read_text())
    except json.JSONDecodeError as exc:
        raise DataError(f"{file}: not valid JSON ({exc.msg}); delete the directory and rebuild the zoo") from None
    info["root"] = str(file.parent.resolve())
    return info


def build_zoo(
    out: Path | str,
    *,
    seed: int = 0,
    force: bool = False,
    log: Callable[[str], None] | None = None,
    check_criteria: bool = True,
    _recipe: Recipe | None = None,
) -> dict[str, Any]:
    """Build the zoo into ``out`` (or return the one already there) and return its ``zoo.json``.

    An existing zoo for the same version, seed and recipe is returned at once unless ``force``.
    With ``check_criteria`` (the default) a zoo that is not a merge problem raises
    :class:`MergeoptError` instead of being written. ``_recipe`` shrinks the build for tests.
    """
    from optimizer.zoo._train import DEFAULT_RECIPE

    recipe = _recipe or DEFAULT_RECIPE
    info = cached_build(
        Path(out),
        key={"zoo_version": ZOO_VERSION, "seed": seed, "recipe": recipe.to_dict()},
        build=lambda tmp, say: _build(tmp, seed=seed, recipe=recipe, say=say),
        force=force,
        log=log,
        check_criteria=check_criteria,
        env_var="MERGEOPT_ZOO_DIR",
    )
    write_calibration_splits(Path(info["root"]), seed=seed)
    return info


#: Examples per task in the zoo's calibration split (``train.jsonl``).
CALIBRATION_EXAMPLES = 1024


def write_calibration_splits(zoo_dir: Path, *, seed: int = 0) -> None:
    """Give each task a ``train`` split: fresh examples of its generator, none a search or held-out
    prompt, for methods that measure the models on training-like text (RegMean's Grams).

    The zoo trains on examples drawn on the fly, so it has no training file to ship; these are drawn
    the same way from a seed of their own. Written once beside the other splits (atomically, so
    concurrent processes agree), also into a zoo cached before the split existed: the weights do not
    depend on it, so the cached build stays valid.
    """
    from optimizer.atomic import write_text

    for task in TASK_NAMES:
        folder = zoo_dir / "tasks" / task
        path = folder / "train.jsonl"
        if path.is_file():
            continue
        scored = {
            json.loads(line)["prompt"]
            for split in ("search", "held_out")
            for line in (folder / f"{split}.jsonl").read_text().splitlines()
            if line.strip()
        }
        rng = random.Random(f"mergeopt-zoo:{seed}:calibration:{task}")
        seen: set[str] = set()
        rows: list[str] = []
        for _ in range(100 * CALIBRATION_EXAMPLES):  # a bound, should a generator run out of prompts
            if len(rows) == CALIBRATION_EXAMPLES:
                break
            ex = TASKS[task].sample(rng)
            if ex.prompt not in scored and ex.prompt not in seen:
                seen.add(ex.prompt)
                rows.append(json.dumps(ex.to_dict()) + "\n")
        write_text(path, "".join(rows))


def cached_build(
    out: Path,
    *,
    key: Mapping[str, Any],
    build: Callable[[Path, Callable[[str], None]], dict[str, Any]],
    force: bool,
    log: Callable[[str], None] | None,
    check_criteria: bool,
    env_var: str,
    manifest: str = _ZOO_JSON,
    check: Callable[[Mapping[str, Any]], None] | None = None,
    summary: Callable[[Mapping[str, Any]], str] | None = None,
) -> dict[str, Any]:
    """A zoo folder made once: returned as it is when its ``zoo.json`` matches ``key``, else built.

    ``build(tmp, say)`` trains and measures into a temporary folder beside ``out`` and returns the
    ``zoo.json`` content; the folder is renamed into place only at the end (and only if no other
    process finished first), so an interrupted build never looks complete. With
    ``check_criteria`` a zoo that is not a merge problem raises instead of being written.
    ``manifest``, ``check`` and ``summary`` are the file that marks the folder complete, the
    criteria and the one-line summary of another kind of zoo (the defaults are this module's).
    """
    out = out.expanduser().resolve()
    say = log or (lambda _msg: None)
    check = check or _check
    summary = summary or _summary
    if not force and _matches(out, key, manifest):
        info = load_zoo(out, manifest=manifest)
        if check_criteria:
            check(info)
        say(f"zoo: cached at {out}")
        return info
    if out.exists() and not (out / manifest).is_file() and any(out.iterdir()):
        raise MergeoptError(
            f"zoo directory {str(out)!r} exists and is not a zoo (no {manifest}); refusing to replace"
            f" it. Pick an empty or new directory, or set {env_var}"
        )
    out.parent.mkdir(parents=True, exist_ok=True)
    _remove_orphans(out)
    tmp = Path(tempfile.mkdtemp(prefix=f"{_tmp_prefix(out)}{os.getpid()}-", dir=out.parent))
    try:
        info = build(tmp, say)
        (tmp / manifest).write_text(json.dumps(info, indent=2) + "\n")
        say(f"zoo: {summary(info)} ({info.get('build_seconds', 0):.0f} s)")
        if check_criteria:
            check(info)
        if force or not _matches(out, key, manifest):  # else another process finished first: keep theirs
            replace_dir(tmp, out, umask_modes=True)
            say(f"zoo: written to {out}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return load_zoo(out, manifest=manifest)


def _matches(out: Path, key: Mapping[str, Any], manifest: str = _ZOO_JSON) -> bool:
    """Whether ``out`` holds a complete zoo built with these version, seed and recipe."""
    try:
        info = json.loads((out / manifest).read_text())
    except (OSError, json.JSONDecodeError):
        return False
    return all(info.get(k) == v for k, v in key.items())


def _check(info: Mapping[str, Any]) -> None:
    """Raise unless the zoo is a merge problem (both criteria of zoo.json hold)."""
    if not (info["criteria"]["specialists_beat_base"] and info["criteria"]["task_arithmetic_loses"]):
        raise MergeoptError(
            f"the zoo built with seed {info['seed']} is not a merge problem: {_summary(info)}; need every"
            f" specialist +{MIN_SPECIALIST_GAIN:.2f} over the base and task arithmetic"
            f" -{MIN_TA_LOSS:.2f} below a specialist somewhere. Try another seed"
        )


def _tmp_prefix(out: Path) -> str:
    # Host and pid in the name let a later build tell a live concurrent build from an orphan.
    return f".{out.name}.building-{socket.gethostname()}-"


def _remove_orphans(out: Path) -> None:
    """Delete temp dirs of builds on this host whose process is gone (killed, not interrupted)."""
    prefix = _tmp_prefix(out)
    for path in out.parent.glob(f"{glob.escape(prefix)}*"):
        pid = path.name[len(prefix) :].split("-", 1)[0]
        if pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(path, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def _build(tmp: Path, *, seed: int, recipe: Recipe, say: Callable[[str], None]) -> dict[str, Any]:
    """Train and measure the zoo into ``tmp``, write its zoo.json there and return it."""
    import torch

    started = time.perf_counter()
    threads = torch.get_num_threads()
    torch.set_num_threads(_THREADS)
    try:
        with torch.random.fork_rng(devices=[]):  # seeding here must not reseed the caller's torch
            info = _train_and_measure(tmp, seed=seed, recipe=recipe, say=say)
    finally:
        torch.set_num_threads(threads)
    info["build_seconds"] = round(time.perf_counter() - started, 1)
    return info


def _train_and_measure(tmp: Path, *, seed: int, recipe: Recipe, say: Callable[[str], None]) -> dict[str, Any]:
    from optimizer.zoo import _train
    from optimizer.zoo._tokenizer import build_tokenizer

    tokenizer = build_tokenizer()
    splits = _make_splits(seed, recipe)
    _write_splits(tmp, splits)
    # No prompt the zoo is ever scored on (dev included) may be trained on.
    exclude = {ex.prompt for parts in splits.values() for part in parts.values() for ex in part}
    held_out = {task: parts["held_out"] for task, parts in splits.items()}
    dev = {task: parts["dev"] for task, parts in splits.items()}

    say(f"zoo: pretraining the base on {', '.join(TASK_NAMES)}")
    model = _train.new_model(recipe, seed)
    training = _train.pretrain(
        model,
        tokenizer,
        [TASKS[t] for t in TASK_NAMES],
        recipe=recipe,
        rng=random.Random(f"mergeopt-zoo:{seed}:pretrain"),
        exclude=exclude,
        dev_score=lambda m: _evaluate(m, tokenizer, dev, recipe),
        log=say,
    )
    _save(model, tokenizer, tmp / "base")
    base_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    scores: dict[str, Any] = {"base": _evaluate(model, tokenizer, held_out, recipe), "specialists": {}}
    say(f"zoo: base after {training['pretrain_steps']} steps, held-out exact match {_fmt(scores['base'])}")

    for task in TASK_NAMES:
        say(f"zoo: fine-tuning the {task} specialist ({recipe.finetune_steps} steps, lr {recipe.finetune_lr:g})")
        model.load_state_dict(base_state)
        _train.finetune(
            model,
            tokenizer,
            TASKS[task],
            recipe=recipe,
            rng=random.Random(f"mergeopt-zoo:{seed}:finetune:{task}"),
            exclude=exclude,
        )
        _save(model, tokenizer, tmp / "specialists" / task)
        scores["specialists"][task] = _evaluate(model, tokenizer, held_out, recipe)
        say(f"zoo: {task} specialist {_fmt(scores['specialists'][task])}")

    say("zoo: measuring task arithmetic (λ = 1)")
    _load_task_arithmetic(model, tmp)
    scores["task_arithmetic_lambda1"] = _evaluate(model, tokenizer, held_out, recipe)
    say(f"zoo: task arithmetic {_fmt(scores['task_arithmetic_lambda1'])}")

    gain = {t: scores["specialists"][t][t] - scores["base"][t] for t in TASK_NAMES}
    loss = {t: scores["specialists"][t][t] - scores["task_arithmetic_lambda1"][t] for t in TASK_NAMES}
    return {
        "zoo_version": ZOO_VERSION,
        "seed": seed,
        "stop": STOP,
        "tasks": {
            t: {
                "description": TASKS[t].description,
                "search": f"tasks/{t}/search.jsonl",
                "held_out": f"tasks/{t}/held_out.jsonl",
                "stop": STOP,
                "max_new_tokens": TASKS[t].max_new_tokens,
            }
            for t in TASK_NAMES
        },
        "base": "base",
        "specialists": {t: f"specialists/{t}" for t in TASK_NAMES},
        "metric": "exact_match",
        "eval_split": "held_out",
        "scores": scores,
        "criteria": merge_problem_criteria(gain, loss),
        "task_vectors": task_vector_stats(tmp, TASK_NAMES),
        "training": training,
        "recipe": recipe.to_dict(),
    }


def _make_splits(seed: int, recipe: Recipe) -> dict[str, dict[str, list[Example]]]:
    """Per task, held-out, search and dev examples with all prompts distinct.

    ``dev`` steers pretraining (see :func:`optimizer.zoo._train.pretrain`) and is not shipped:
    the shipped splits never influenced the weights.
    """
    sizes = {"held_out": recipe.n_held_out, "search": recipe.n_search, "dev": recipe.n_dev}
    splits: dict[str, dict[str, list[Example]]] = {}
    for task in TASK_NAMES:
        rng = random.Random(f"mergeopt-zoo:{seed}:eval:{task}")
        seen: set[str] = set()
        examples: list[Example] = []
        while len(examples) < sum(sizes.values()):
            ex = TASKS[task].sample(rng)
            if ex.prompt not in seen:
                seen.add(ex.prompt)
                examples.append(ex)
        splits[task] = {}
        for split, n in sizes.items():
            splits[task][split], examples = examples[:n], examples[n:]
    return splits


def _write_splits(tmp: Path, splits: Mapping[str, Mapping[str, list[Example]]]) -> None:
    for task, parts in splits.items():
        for split in ("search", "held_out"):
            path = tmp / "tasks" / task / f"{split}.jsonl"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text("".join(json.dumps(ex.to_dict()) + "\n" for ex in parts[split]))


def _save(model: LlamaForCausalLM, tokenizer: PreTrainedTokenizerBase, path: Path) -> None:
    """An ordinary HF model directory: safetensors float32, config, generation config, tokenizer."""
    from transformers import GenerationConfig

    from optimizer.zoo._tokenizer import BOS_ID, EOS_ID, PAD_ID

    longest = max(task.max_new_tokens for task in TASKS.values())
    model.generation_config = GenerationConfig(
        bos_token_id=BOS_ID, eos_token_id=EOS_ID, pad_token_id=PAD_ID, do_sample=False, max_new_tokens=longest
    )
    model.save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)


def _evaluate(
    model: LlamaForCausalLM,
    tokenizer: PreTrainedTokenizerBase,
    held_out: Mapping[str, list[Example]],
    recipe: Recipe,
) -> dict[str, float]:
    """Held-out exact match of greedy completions, per task."""
    from optimizer.engines._hf_generate import greedy_generate

    scores: dict[str, float] = {}
    for task, examples in held_out.items():
        completions = greedy_generate(
            model,
            tokenizer,
            [ex.prompt for ex in examples],
            max_new_tokens=TASKS[task].max_new_tokens,
            stop=STOP,
            batch_size=recipe.eval_batch_size,
        )
        hits = sum(c.strip() == ex.target.strip() for c, ex in zip(completions, examples, strict=True))
        scores[task] = round(hits / len(examples), 4)
    return scores


def _load_task_arithmetic(model: LlamaForCausalLM, zoo: Path) -> None:
    """Put θ₀ + Σₘ τₘ (every specialist at weight 1) into ``model``, via the merge core."""
    from optimizer.checkpoints import ModelSet, load_task_vectors
    from optimizer.merge import MergePlan, merge_state_dict

    models = ModelSet(zoo / "base", {t: zoo / "specialists" / t for t in TASK_NAMES})
    base, deltas = load_task_vectors(models)
    merged = merge_state_dict(MergePlan("task_arithmetic", TASK_NAMES), base, deltas)
    model.load_state_dict(merged, strict=True)


def _fmt(scores: Mapping[str, float]) -> str:
    return " ".join(f"{t}={s:.2f}" for t, s in scores.items())


def _summary(info: Mapping[str, Any]) -> str:
    s = info["scores"]
    return ", ".join(
        f"{t}: base {s['base'][t]:.2f} → specialist {s['specialists'][t][t]:.2f}, TA λ=1"
        f" {s['task_arithmetic_lambda1'][t]:.2f}"
        for t in info["tasks"]
    )
