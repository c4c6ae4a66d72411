"""Batched greedy decoding for a transformers causal LM, cut at a stop string.

This is the reference decoder: the exact-match metric, the zoo's build-time checks and the HF
engine all score completions through it, and the vLLM engine is checked against it. Prompts are
left-padded (so every row's next token sits in the last column) and decoded with the model's KV
cache; a completion is everything generated up to, not including, the first ``stop``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

__all__ = ["greedy_generate"]


def greedy_generate(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    *,
    max_new_tokens: int,
    stop: str | None = "\n",
    batch_size: int = 64,
    add_special_tokens: bool = True,
) -> list[str]:
    """The greedy completion of each prompt, in input order, truncated at the first ``stop``.

    Prompts are tokenized as the tokenizer does by default (with its BOS), or, with
    ``add_special_tokens=False``, exactly as written (what the engines do: a prompt's text carries
    its own BOS, see :mod:`optimizer.tokens`).
    Batches hold prompts of similar length, which keeps padding, and so the work and any padding
    sensitivity of the numerics, small. Generation ends early once every row has emitted EOS or a
    token that is exactly ``stop``; a stop string spanning several tokens is still honoured, by
    truncation after decoding. Without a ``stop`` the completion runs to EOS or ``max_new_tokens``.
    """
    import torch

    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if not prompts:
        return []
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad_id is None:
        raise ValueError("the tokenizer has neither a pad nor an eos token; set tokenizer.pad_token")
    eos_ids = _stop_token_ids(model, tokenizer, stop)

    encoded = tokenizer(list(prompts), add_special_tokens=add_special_tokens)["input_ids"]
    order = sorted(range(len(prompts)), key=lambda i: len(encoded[i]))
    out: list[str] = [""] * len(prompts)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        for start in range(0, len(order), batch_size):
            rows = order[start : start + batch_size]
            width = max(len(encoded[i]) for i in rows)
            ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
            mask = torch.zeros((len(rows), width), dtype=torch.long)
            for r, i in enumerate(rows):  # left padding
                n = len(encoded[i])
                ids[r, width - n :] = torch.tensor(encoded[i])
                mask[r, width - n :] = 1
            with torch.inference_mode():
                # transformers' annotations resolve ``generate`` through nn.Module.__getattr__ (a Tensor)
                gen = model.generate(  # type: ignore[operator]
                    input_ids=ids.to(device),
                    attention_mask=mask.to(device),
                    do_sample=False,
                    max_new_tokens=max_new_tokens,
                    eos_token_id=eos_ids,
                    pad_token_id=pad_id,
                )
            for r, i in enumerate(rows):
                out[i] = _completion(tokenizer, gen[r, width:].tolist(), eos_ids, stop)
    finally:
        model.train(was_training)
    return out


def _stop_token_ids(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, stop: str | None) -> list[int]:
    """EOS ids that end a row: the model's and tokenizer's EOS, plus ``stop`` if it is one token."""
    ids: list[int] = []
    for eos in (getattr(model.generation_config, "eos_token_id", None), tokenizer.eos_token_id):
        for e in eos if isinstance(eos, list) else [eos]:
            if e is not None and e not in ids:
                ids.append(int(e))
    if stop:
        stop_ids = tokenizer.encode(stop, add_special_tokens=False)
        if len(stop_ids) == 1 and stop_ids[0] not in ids:
            ids.append(stop_ids[0])
    return ids


def _completion(tokenizer: PreTrainedTokenizerBase, new_ids: list[int], eos_ids: list[int], stop: str | None) -> str:
    # Drop everything from the first EOS on (the padding after it included), then cut at `stop`:
    # a multi-token stop string, or one inside a longer token, is found in the decoded text.
    for k, tok in enumerate(new_ids):
        if tok in eos_ids:
            new_ids = new_ids[: k + 1]
            break
    text = str(tokenizer.decode(new_ids, skip_special_tokens=True))
    if stop:
        cut = text.find(stop)
        if cut >= 0:
            text = text[:cut]
    return text
