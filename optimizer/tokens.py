"""How a request's text becomes token ids: one rule for every engine and every measurement.

Two engines (transformers, vLLM) and the measurements methods take (HILA's golden loss, RegMean's
Grams) must see the very same token ids, or their numbers cannot be compared. So engines tokenize
exactly the text they are given — no special tokens added — and everything a prompt needs is in
its text, the beginning-of-sequence token included: :func:`with_bos` puts it there (or takes it
away) by the tokenizer's own rule or by the objective's ``add_bos``, once, where the prompt is
built (``objectives/formats.py``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

__all__ = ["TokenizerInfo", "encode", "encode_pair", "tokenizer_info", "with_bos"]


@dataclass(frozen=True)
class TokenizerInfo:
    """What building a prompt needs to know of the base's tokenizer."""

    bos_token: str | None  # its text, e.g. "<s>"; None when the tokenizer has none
    adds_bos: bool  # whether it puts the BOS token first by default (add_special_tokens=True)
    has_chat_template: bool


def tokenizer_info(tokenizer: Any) -> TokenizerInfo:
    """Read :class:`TokenizerInfo` off a Hugging Face tokenizer."""
    bos_id = getattr(tokenizer, "bos_token_id", None)
    ids = tokenizer("a", add_special_tokens=True)["input_ids"]
    return TokenizerInfo(
        bos_token=getattr(tokenizer, "bos_token", None) if bos_id is not None else None,
        adds_bos=bos_id is not None and bool(ids) and ids[0] == bos_id,
        has_chat_template=bool(getattr(tokenizer, "chat_template", None)),
    )


def with_bos(text: str, info: TokenizerInfo | None, add_bos: bool | None = None) -> str:
    """``text`` with its beginning-of-sequence token as the model expects it.

    ``add_bos`` None follows the tokenizer: the BOS is put first where the tokenizer would add it,
    and a BOS the text already starts with (a chat template's) is kept, never doubled. True puts it
    first whatever the tokenizer does (a model trained with a BOS its tokenizer does not add);
    False takes a leading one away. Without tokenizer information the text is left as it is.
    """
    if info is None or info.bos_token is None:
        return text
    has = text.startswith(info.bos_token)
    want = (info.adds_bos or has) if add_bos is None else add_bos
    if want and not has:
        return info.bos_token + text
    if not want and has:
        return text[len(info.bos_token) :]
    return text


def encode(tokenizer: Any, text: str) -> list[int]:
    """The token ids of exactly ``text`` (no special tokens added: the text carries its own)."""
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def encode_pair(tokenizer: Any, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """Token ids of a context and of its continuation, tokenized apart.

    Tokenizing the two separately (not the concatenation) keeps the continuation's tokens the
    same whatever the context, which is what a golden-response NLL must compare across models.
    """
    return encode(tokenizer, context), encode(tokenizer, continuation)
