"""mergeopt's engine as an lm-evaluation-harness model: the candidate merged in place, scored by the
harness's own pipeline (prompts, few-shot examples, chat templates, filters, metrics).

The harness asks a model for three kinds of request. :class:`EngineLM` answers each kind for all of
an evaluation's tasks in one engine call: log-likelihoods through
:meth:`~optimizer.engines.base.Engine.loglikelihood_tokens` (the harness tokenizes, so contexts and
continuations split exactly as for its own ``hf`` model), greedy generations through
:meth:`~optimizer.engines.base.Engine.generate_batches` (one batch per stop-strings/length pair).
Tokenization follows the harness's ``hf`` model: the tokenizer's own special tokens unless the text
already starts with the BOS token; an empty context is the BOS token (else EOS).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from lm_eval.api.model import TemplateLM
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

from optimizer.checkpoints import model_config
from optimizer.engines.base import Engine, GenerateBatch
from optimizer.tokens import tokenizer_info, with_bos

__all__ = ["DEFAULT_MAX_GEN_TOKS", "EngineLM", "max_length"]

#: The harness's default generation limit when a task sets no ``max_gen_toks``.
DEFAULT_MAX_GEN_TOKS = 256
#: Context length assumed when the model's config states none (the harness's own default).
_DEFAULT_MAX_LENGTH = 2048
_LENGTH_KEYS = ("n_positions", "max_position_embeddings", "n_ctx", "seq_length")


def max_length(base: Path) -> int:
    """The longest sequence the base model takes, read from its config as the harness reads it."""
    config = model_config(base)
    for key in _LENGTH_KEYS:
        if isinstance(config.get(key), int):
            return int(config[key])
    return _DEFAULT_MAX_LENGTH


class EngineLM(TemplateLM):
    """An ``lm_eval.api.model.LM`` whose weights are whatever the engine holds now (the trial's merge)."""

    def __init__(self, engine: Engine, tokenizer: Any, max_length: int):
        super().__init__()
        self.engine = engine
        self.tokenizer = tokenizer
        self._info = tokenizer_info(tokenizer)
        self._max_length = max_length

    # -- tokenization, as the harness's hf model does it ------------------------------------------
    @property
    def eot_token_id(self) -> int:
        return int(self.tokenizer.eos_token_id)

    @property
    def prefix_token_id(self) -> int:
        bos = self.tokenizer.bos_token_id
        return int(bos) if bos is not None else self.eot_token_id

    @property
    def max_length(self) -> int:
        return self._max_length

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs: Any) -> list[int]:
        if add_special_tokens is None:  # the tokenizer's rule, unless the text carries its own BOS
            bos = self._info.bos_token
            add_special_tokens = not (bos is not None and string.startswith(bos))
        return list(self.tokenizer.encode(string, add_special_tokens=add_special_tokens))

    @property
    def tokenizer_name(self) -> str:
        return str(getattr(self.tokenizer, "name_or_path", "tokenizer")).replace("/", "__")

    def apply_chat_template(self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        """The base tokenizer's chat template (a prefilled assistant turn is continued, not closed)."""
        return str(
            self.tokenizer.apply_chat_template(
                chat_history,
                tokenize=False,
                add_generation_prompt=add_generation_prompt,
                continue_final_message=not add_generation_prompt,
            )
        )

    # -- the three request kinds -------------------------------------------------------------------
    def loglikelihood(self, requests: list[Any], disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        return super().loglikelihood(requests, disable_tqdm=True)  # a bar per trial is noise in a study log

    def _loglikelihood_tokens(
        self, requests: list[tuple[tuple[str, str], list[int], list[int]]], **kwargs: Any
    ) -> list[tuple[float, bool]]:
        pairs = [self._fit(context, continuation) for _, context, continuation in requests]
        return [(ll.logprob, ll.is_greedy) for ll in self.engine.loglikelihood_tokens(pairs)]

    def _fit(self, context: list[int], continuation: list[int]) -> tuple[list[int], list[int]]:
        """Cut the context from the left so the pair fits the model (as the harness's hf model does)."""
        room = self._max_length + 1 - len(continuation)
        if len(context) + len(continuation) > self._max_length + 1 and room > 0:
            context = context[-room:]
        return context, continuation

    def loglikelihood_rolling(self, requests: list[Any], disable_tqdm: bool = False) -> list[float]:
        """Each text's total log-likelihood, in windows of the model's length (perplexity tasks)."""
        windows: list[tuple[list[int], list[int]]] = []
        owners: list[int] = []
        for i, request in enumerate(requests):
            (text,) = request.args
            tokens = self.tok_encode(text, add_special_tokens=False)
            for window in get_rolling_token_windows(
                token_list=tokens, prefix_token=self.prefix_token_id, max_seq_len=self._max_length, context_len=1
            ):
                windows.append(make_disjoint_window(window))
                owners.append(i)
        totals = [0.0] * len(requests)
        for owner, ll in zip(owners, self.engine.loglikelihood_tokens(windows), strict=True):
            totals[owner] += ll.logprob
        return totals

    def generate_until(self, requests: list[Any], disable_tqdm: bool = False) -> list[str]:
        """Greedy completions, cut at the task's stop strings; every request in one engine call."""
        eos = self.tokenizer.decode([self.eot_token_id], skip_special_tokens=False)
        groups: dict[tuple[tuple[str, ...], int], list[int]] = {}
        prompts: list[str] = []
        for i, request in enumerate(requests):
            context, gen_kwargs = request.args
            kwargs = dict(gen_kwargs)
            until = kwargs.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            limit = int(kwargs.get("max_gen_toks", DEFAULT_MAX_GEN_TOKS))
            groups.setdefault((tuple([*until, eos]), limit), []).append(i)
            prompts.append(with_bos(context, self._info))
        keys = list(groups)
        batches = [GenerateBatch([prompts[i] for i in groups[key]], key[1], key[0]) for key in keys]
        out = [""] * len(requests)
        for key, texts in zip(keys, self.engine.generate_batches(batches), strict=True):
            for i, text in zip(groups[key], texts, strict=True):
                out[i] = _cut(text, key[0])
        return out


def _cut(text: str, stops: Sequence[str]) -> str:
    """The text before its first stop string (the harness cuts its model's output the same way)."""
    for stop in stops:
        if stop:
            text = text.split(stop)[0]
    return text
