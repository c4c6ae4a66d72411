"""The zoo's tokenizer: byte-level BPE with no merges, saved as ordinary HF tokenizer files.

One token per byte keeps the vocabulary tiny (3 specials + 256 bytes, byte ``b`` is id ``3 + b``)
and makes ``decode(encode(s)) == s`` exact for every string, yet it is a real ``tokenizer.json``
that ``AutoTokenizer`` and vLLM load like any Llama tokenizer. The post-processor prepends ``<s>``
as Llama's does, so a prompt tokenized by transformers, by vLLM or by the trainer is the same ids.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerFast

__all__ = ["BOS", "BOS_ID", "EOS", "EOS_ID", "MAX_LENGTH", "PAD", "PAD_ID", "VOCAB_SIZE", "build_tokenizer"]

PAD, BOS, EOS = "<pad>", "<s>", "</s>"
PAD_ID, BOS_ID, EOS_ID = 0, 1, 2
_N_SPECIAL = 3
VOCAB_SIZE = _N_SPECIAL + 256
#: Longest sequence the zoo models are built for (``max_position_embeddings``).
MAX_LENGTH = 128


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte → printable-char table, which the ByteLevel pre-tokenizer applies."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), 256)]
    table = {b: chr(b) for b in printable}
    extra = (b for b in range(256) if b not in table)
    table.update({b: chr(256 + n) for n, b in enumerate(extra)})
    return table


def build_tokenizer() -> PreTrainedTokenizerFast:
    """A fresh tokenizer; deterministic, so every zoo model ships byte-identical tokenizer files."""
    from tokenizers import Tokenizer, decoders, pre_tokenizers, processors
    from tokenizers.models import BPE
    from transformers import PreTrainedTokenizerFast

    vocab = {PAD: PAD_ID, BOS: BOS_ID, EOS: EOS_ID}
    vocab.update({ch: _N_SPECIAL + b for b, ch in sorted(_bytes_to_unicode().items())})
    tok = Tokenizer(BPE(vocab=vocab, merges=[]))
    tok.add_special_tokens([PAD, BOS, EOS])
    # No regex split and no prefix space: the text is mapped byte by byte and nothing is added.
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, BOS_ID)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        model_max_length=MAX_LENGTH,
        clean_up_tokenization_spaces=False,
    )
