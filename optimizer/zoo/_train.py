"""Model shape and training for the zoo: a tiny Llama trained from scratch on CPU.

Small algorithmic tasks are learned in sudden jumps (a circuit forms, then accuracy climbs within
a few hundred steps), and when that happens varies with the seed by hundreds of steps. A fixed
pretraining length therefore gives, seed to seed, a base that either has not learned a task yet
or has already mastered it; neither leaves a specialist a reliable gain. So pretraining is
*steered by measurement*: every ``check_every`` steps the base is scored on a small dev split and
each task's share of the next batches set by where it stands: full while it has not formed
(reached ``formed_at``), ``formed_weight`` once it has, ``over_weight`` while it is above
``ceiling`` (so a task learned early does not run on to mastery while the others catch up).
Pretraining ends at the first check where every task has formed and none is above the ceiling.
The rate stays constant, never annealed: the base keeps the errors of a mid-training
checkpoint, and a specialist's short, low-rate fine-tune both sharpens and specialises it.

The numbers model how real specialists relate to their base (zoo version 3). Pretraining aims
at a base that has every task about half learned (``formed_at`` 0.5, ``ceiling`` 0.75), so a
specialist sharpens a skill the base already has instead of learning it. With the rate constant,
dev scores swing by tens of points between checks, so the window is rarely hit exactly: the
seed-0 build runs to ``max_pretrain_steps`` (sort forms at step 950) and its base scores 0.67 /
0.52 / 0.43 on held-out rev / sort / rot. A fine-tune, at a twentieth of the pretraining rate,
moves the weights by ~3 % of their norm, and the three task vectors are near-orthogonal (cosine
0.10-0.30). Version 2 fine-tuned from a base at 0.2-0.4 and got task vectors of 7-8 % at cosine
0.28-0.54: there no merge method kept more than about 0.8 of every specialist's gain even
with coefficients chosen on the held-out answers, a harder problem than merging real
fine-tunes, whose task vectors are small and nearly orthogonal. Adding all three
(λ = 1) still loses part of the sort specialist's gain, and averaging loses more: a search has
something to find (``benchmarks/README.md``, the zoo's task vectors and merge quality).

Everything is seeded and single-process, so a zoo is a function of its seed on one machine.
Loss is on the answer tokens only: prompts are random letters, with nothing to learn.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

import torch

from optimizer.zoo._tokenizer import BOS_ID, EOS_ID, MAX_LENGTH, PAD_ID, VOCAB_SIZE
from optimizer.zoo.tasks import STOP, Example, Task

if TYPE_CHECKING:
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerBase

__all__ = ["DEFAULT_RECIPE", "Recipe", "finetune", "llama_config", "new_model", "pretrain"]

_IGNORE = -100


@dataclass(frozen=True)
class Recipe:
    """Every knob of a zoo build; the default is the shipped zoo, tests shrink it to build in seconds.

    Heads of 64 dims because vLLM's CPU attention kernels reject smaller; one KV head for two
    query heads so the zoo exercises GQA as the real model families do.
    """

    hidden_size: int = 128
    num_layers: int = 4
    num_heads: int = 2
    num_kv_heads: int = 1
    intermediate_size: int = 384
    batch_size: int = 64
    pretrain_lr: float = 3e-3
    warmup_steps: int = 30
    min_pretrain_steps: int = 200
    max_pretrain_steps: int = 1000
    check_every: int = 50
    formed_at: float = 0.5
    formed_weight: float = 0.5
    ceiling: float = 0.75
    over_weight: float = 0.05
    finetune_steps: int = 100
    finetune_lr: float = 1.5e-4
    n_dev: int = 64
    n_search: int = 128
    n_held_out: int = 256
    eval_batch_size: int = 128

    def to_dict(self) -> dict[str, int | float]:
        return asdict(self)


DEFAULT_RECIPE = Recipe()

#: Scores a model on the dev split: task name → exact match.
DevScore = Callable[["LlamaForCausalLM"], Mapping[str, float]]


def llama_config(recipe: Recipe) -> LlamaConfig:
    """A standard LlamaConfig (no custom code), so transformers and vLLM load it as any Llama."""
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=VOCAB_SIZE,
        hidden_size=recipe.hidden_size,
        intermediate_size=recipe.intermediate_size,
        num_hidden_layers=recipe.num_layers,
        num_attention_heads=recipe.num_heads,
        num_key_value_heads=recipe.num_kv_heads,
        head_dim=recipe.hidden_size // recipe.num_heads,
        max_position_embeddings=MAX_LENGTH,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
        bos_token_id=BOS_ID,
        eos_token_id=EOS_ID,
        pad_token_id=PAD_ID,
        dtype="float32",
    )


def new_model(recipe: Recipe, seed: int) -> LlamaForCausalLM:
    """A freshly initialised model; the init is drawn from ``seed`` alone."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    return LlamaForCausalLM(llama_config(recipe))


class _Trainer:
    """AdamW on right-padded batches of examples; the caller sets the rate of every step."""

    def __init__(self, model: LlamaForCausalLM, tokenizer: PreTrainedTokenizerBase) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.opt = torch.optim.AdamW(model.parameters(), lr=0.0, betas=(0.9, 0.98), weight_decay=0.0)

    def step(self, examples: Sequence[Example], lr: float) -> float:
        for group in self.opt.param_groups:
            group["lr"] = lr
        self.model.train()
        ids, labels = _batch(self.tokenizer, examples)
        loss = self.model(input_ids=ids, labels=labels).loss
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        self.opt.step()
        self.model.eval()
        return loss.item()


def _batch(tokenizer: PreTrainedTokenizerBase, examples: Sequence[Example]) -> tuple[torch.Tensor, torch.Tensor]:
    """``<s> prompt target STOP </s>`` right-padded, with labels on the answer only.

    Tokenized as inference sees it: the prompt with the tokenizer's BOS, then the answer without
    specials (the byte-level tokenizer makes the two halves tokenize as the whole would). ``</s>``
    after the stop string teaches the model to end even where no stop string is set. Right
    padding needs no attention mask: causal attention never looks at the pads after a row.
    """
    prompts = tokenizer([e.prompt for e in examples])["input_ids"]
    answers = tokenizer([e.target + STOP for e in examples], add_special_tokens=False)["input_ids"]
    width = max(len(p) + len(a) + 1 for p, a in zip(prompts, answers, strict=True))
    ids = torch.full((len(examples), width), PAD_ID, dtype=torch.long)
    labels = torch.full((len(examples), width), _IGNORE, dtype=torch.long)
    for r, (p, a) in enumerate(zip(prompts, answers, strict=True)):
        seq = torch.tensor([*p, *a, EOS_ID])
        ids[r, : len(seq)] = seq
        labels[r, len(p) : len(seq)] = seq[len(p) :]
    return ids, labels


def _draw(
    tasks: Sequence[Task], weights: Sequence[float], n: int, rng: random.Random, exclude: set[str]
) -> list[Example]:
    """``n`` examples, each from a task drawn by ``weights``, none whose prompt is in ``exclude``."""
    out: list[Example] = []
    while len(out) < n:
        ex = rng.choices(tasks, weights=weights)[0].sample(rng)
        if ex.prompt not in exclude:
            out.append(ex)
    return out


def pretrain(
    model: LlamaForCausalLM,
    tokenizer: PreTrainedTokenizerBase,
    tasks: Sequence[Task],
    *,
    recipe: Recipe,
    rng: random.Random,
    exclude: set[str],
    dev_score: DevScore,
    log: Callable[[str], None],
) -> dict[str, object]:
    """Train on the task mixture until every task is in [formed_at, ceiling] (module docstring).

    Returns what happened, for zoo.json: the steps taken, the step at which each task formed
    (None if it never did) and the last dev scores. Hitting ``max_pretrain_steps`` first is not
    an error here; the build's criteria decide whether the result is still a merge problem.
    """
    trainer = _Trainer(model, tokenizer)
    formed: dict[str, int | None] = {t.name: None for t in tasks}
    weights = [1.0] * len(tasks)
    scores: Mapping[str, float] = {}
    step = 0
    while step < recipe.max_pretrain_steps:
        for _ in range(recipe.check_every):
            lr = recipe.pretrain_lr * min(1.0, (step + 1) / max(1, recipe.warmup_steps))
            loss = trainer.step(_draw(tasks, weights, recipe.batch_size, rng, exclude), lr)
            step += 1
        if step < recipe.min_pretrain_steps:
            continue
        scores = dev_score(model)
        for t in tasks:
            if formed[t.name] is None and scores[t.name] >= recipe.formed_at:
                formed[t.name] = step
        weights = [_share(recipe, formed[t.name] is not None, scores[t.name]) for t in tasks]
        log(f"  step {step}: loss {loss:.3f}, dev exact match " + " ".join(f"{k}={v:.2f}" for k, v in scores.items()))
        if all(s is not None for s in formed.values()) and max(scores.values()) <= recipe.ceiling:
            break
    return {"pretrain_steps": step, "formed_at_step": formed, "dev_scores": dict(scores)}


def _share(recipe: Recipe, formed: bool, score: float) -> float:
    if not formed:
        return 1.0
    return recipe.over_weight if score > recipe.ceiling else recipe.formed_weight


def finetune(
    model: LlamaForCausalLM,
    tokenizer: PreTrainedTokenizerBase,
    task: Task,
    *,
    recipe: Recipe,
    rng: random.Random,
    exclude: set[str],
) -> None:
    """A specialist: ``finetune_steps`` on ``task`` alone at the constant, small ``finetune_lr``.

    A short run at a twentieth of the pretraining rate keeps the task vector small, as real
    fine-tunes' are; no warmup, since the optimizer state is fresh but the weights are not.
    """
    trainer = _Trainer(model, tokenizer)
    for _ in range(recipe.finetune_steps):
        trainer.step(_draw([task], [1.0], recipe.batch_size, rng, exclude), recipe.finetune_lr)
