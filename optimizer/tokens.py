"""How a request's text becomes token ids: one rule for every engine and every measurement.

Two engines (transformers, vLLM) and the measurements methods take (HILA's golden loss) must score
the very same token ids, or their numbers cannot be compared; so they all tokenize here.
"""

from __future__ import annotations

from typing import Any

__all__ = ["encode_pair"]


def encode_pair(tokenizer: Any, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """Token ids of context (with the tokenizer's special prefix) and continuation (without).

    Tokenizing the two separately (not the concatenation) keeps the continuation's tokens the
    same whatever the context, which is what a golden-response NLL must compare across models.
    ``tokenizer`` is any Hugging Face tokenizer (called as ``tokenizer(text, add_special_tokens=)``).
    """
    ctx = tokenizer(context, add_special_tokens=True)["input_ids"]
    cont = tokenizer(continuation, add_special_tokens=False)["input_ids"]
    return list(ctx), list(cont)
