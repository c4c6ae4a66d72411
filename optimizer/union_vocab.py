"""The union vocabulary: a study whose specialists added tokens merges over a base that has them all.

A full-checkpoint specialist whose tokenizer added tokens (``tokenizer.add_tokens`` and
``resize_token_embeddings``) has embedding and head rows the base lacks. Such a study merges over
a **union base**, built once per study in ``<study folder>/union_base``: the base's files, with

* ``tokenizer.json`` holding every added token after the base's own, in a fixed order (specialists
  in config order, each one's tokens by id; a token two specialists added is one token), with the
  first holder's settings (special or not, stripping, normalization); ``tokenizer_config.json``'s
  ``added_tokens_decoder`` likewise where the base's has one, and its list of extra special tokens
  with those a holder lists;
* ``config.json``'s ``vocab_size`` raised where the new ids pass it;
* the embedding and an untied LM head given a row for each added token: the **mean of the rows of
  the specialists that have it**. Each holder's task vector on that row is then its deviation from
  the holders' mean and every other specialist's is zero (:mod:`optimizer.vocab` places each
  specialist's rows on the union's by token string), so every method merges the new rows among
  their holders, a lone holder's row comes through unchanged, and shared rows merge as usual.

Only the weight files holding the embedding or head are rewritten; the others are symlinks to the
base's. The folder appears atomically and is reused while the base's and the holders' files
(tokenizer and config in full, weights by size and time) are unchanged; otherwise it is rebuilt.
Workers that start a new study together may each build it; the first one in place is kept.
The study's :class:`~optimizer.checkpoints.ModelSet` names it as its base, so both engines, the
export (which ships the union tokenizer) and the study's fingerprint see one vocabulary.

Refused, one line each (in :func:`check_union`, before anything is written): a method that
measures study data (RegMean, HILA: their measurement reads the user's base), and a LoRA adapter
that changes the embedding or head (its factors are sized for the base's rows). An adapter whose
own tokenizer added tokens is refused in :func:`optimizer.checkpoints.check_specialist`.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Callable, Mapping
from dataclasses import replace
from pathlib import Path

import torch

from optimizer.adapters import Adapter, is_adapter
from optimizer.atomic import building_dir
from optimizer.checkpoints import ModelSet, model_config, read_shapes, weight_files
from optimizer.errors import ConfigError, ModelError
from optimizer.fingerprint import model_fingerprint
from optimizer.vocab import is_vocab_tensor, shown_tokens, tokenizer_rows, union_tokens, vocab

__all__ = ["META", "UNION_DIR", "check_union", "union_base", "union_models", "union_plan"]

#: The union base's folder inside the study folder.
UNION_DIR = "union_base"
#: What the union base was built from, inside it (an export does not copy it).
META = "mergeopt_union.json"
_VERSION = 1


def union_plan(models: ModelSet) -> dict[str, list[str]]:
    """Added token → the full-checkpoint specialists that have it, in union order (empty: no union)."""
    full = {name: path for name, path in models.specialists.items() if not is_adapter(path)}
    return union_tokens(models.base, full)


def check_union(
    models: ModelSet,
    plan: Mapping[str, list[str]],
    method: str,
    adapters: Mapping[str, Adapter | None],
    method_measures: bool,
) -> None:
    """Refuse, one line naming the added tokens and the fix, what cannot merge over a union vocabulary
    (from headers and tokenizers alone: nothing is written)."""
    if not plan:
        return
    tokens = shown_tokens(list(plan))
    holders = list(dict.fromkeys(name for names in plan.values() for name in names))
    for name in holders:
        needed = tokenizer_rows(models.specialists[name]) or 0
        for tensor, shape in read_shapes(models.specialists[name]).items():
            if is_vocab_tensor(tensor) and shape[0] < needed:
                raise ModelError(
                    f"model {name!r}: tensor {tensor!r} has {shape[0]} rows, but its tokenizer has ids up to"
                    f" {needed - 1}; save it after model.resize_token_embeddings(len(tokenizer))"
                )
    if method_measures:
        raise ConfigError(
            f"model {holders[0]!r} adds tokens the base's tokenizer lacks ({tokens}); method {method!r} measures"
            " its study data on the base's vocabulary, so it cannot merge a union vocabulary: use another"
            " method, or add the tokens to the base first (tokenizer.add_tokens, then"
            " model.resize_token_embeddings, saved) and use that as the base"
        )
    for name, adapter in adapters.items():
        touched = [t for t in (*adapter.lora, *adapter.full) if is_vocab_tensor(t)] if adapter else []
        if touched:
            raise ModelError(
                f"adapter {name!r} changes {touched[0]!r}, but model {holders[0]!r} adds tokens the base's"
                f" tokenizer lacks ({tokens}) and an adapter's embedding is sized for the base's rows: merge"
                " the adapter into the base (peft's merge_and_unload, saved) and name that folder instead"
            )


def union_models(models: ModelSet, study_dir: Path, say: Callable[[str], None] = lambda _: None) -> ModelSet:
    """``models`` with the union base as their base where a specialist added tokens (else unchanged)."""
    plan = union_plan(models)
    if not plan:
        return models
    return replace(models, base=union_base(models, plan, Path(study_dir) / UNION_DIR, say))


def _key(models: ModelSet, plan: Mapping[str, list[str]]) -> str:
    holders = sorted({name for names in plan.values() for name in names})
    inputs = {
        "version": _VERSION,
        "base": model_fingerprint(models.base, mode="stat"),
        "holders": {name: model_fingerprint(models.specialists[name], mode="stat") for name in holders},
        "tokens": list(plan.items()),
    }
    return hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()


def union_base(
    models: ModelSet, plan: Mapping[str, list[str]], out: Path, say: Callable[[str], None] = lambda _: None
) -> Path:
    """The union base of ``models`` at ``out``: reused where it was built from the same files, else built."""
    key = _key(models, plan)
    if _built(out, key):
        return out
    say(f"building the union vocabulary ({len(plan)} added tokens: {shown_tokens(list(plan))}) in {out}")
    try:
        with building_dir(out) as tmp:
            _build(models, plan, tmp)
            (tmp / META).write_text(json.dumps({"key": key, "tokens": plan}, indent=2) + "\n")
            if _built(out, key):  # a worker started beside this one built it meanwhile: keep theirs,
                raise _Found  # which an engine may be reading (the temporary folder is removed)
    except _Found:
        pass
    except OSError as exc:
        raise ModelError(f"cannot write the union vocabulary's base to {out}: {exc.strerror or exc}") from None
    return out


class _Found(Exception):
    """The union base appeared while this process built its own."""


def _built(out: Path, key: str) -> bool:
    try:
        return bool(json.loads((out / META).read_text()).get("key") == key)
    except (OSError, ValueError, AttributeError):
        return False


def _added_settings(model_dir: Path) -> dict[str, dict]:
    """Token → its ``added_tokens`` entry in ``model_dir``'s tokenizer.json."""
    data = json.loads((model_dir / "tokenizer.json").read_text())
    return {entry["content"]: entry for entry in data.get("added_tokens", [])}


def _build(models: ModelSet, plan: Mapping[str, list[str]], tmp: Path) -> None:
    from tokenizers import AddedToken, Tokenizer

    base = models.base
    tokenizer = Tokenizer.from_file(str(base / "tokenizer.json"))
    settings = {name: _added_settings(models.specialists[name]) for name in {n for ns in plan.values() for n in ns}}
    entries: dict[str, dict] = {}
    for token, names in plan.items():
        entry = settings[names[0]].get(token, {"content": token, "special": False})
        entries[token] = entry
        added = AddedToken(
            token,
            single_word=entry.get("single_word", False),
            lstrip=entry.get("lstrip", False),
            rstrip=entry.get("rstrip", False),
            normalized=entry.get("normalized", not entry.get("special", False)),
            special=entry.get("special", False),
        )
        if entry.get("special"):
            tokenizer.add_special_tokens([added])
        else:
            tokenizer.add_tokens([added])
    tokenizer.save(str(tmp / "tokenizer.json"))
    ids = tokenizer.get_vocab(with_added_tokens=True)
    new_ids = {token: ids[token] for token in plan}
    rows = max(new_ids.values()) + 1

    tok_config = base / "tokenizer_config.json"
    if tok_config.is_file():
        data = json.loads(tok_config.read_text())
        if isinstance(data.get("added_tokens_decoder"), dict):
            for token, i in new_ids.items():
                fields = {k: v for k, v in entries[token].items() if k not in ("id", "content")}
                data["added_tokens_decoder"][str(i)] = {"content": token, **fields}
        _special_lists(data, plan, {name: models.specialists[name] for name in settings})
        (tmp / "tokenizer_config.json").write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n")

    config = model_config(base)
    if int(config.get("vocab_size") or 0) < rows:
        config["vocab_size"] = rows
    (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")

    grown = _write_weights(models, plan, new_ids, tmp)
    for item in base.iterdir():
        if item.is_file() and not (tmp / item.name).exists() and item.suffix != ".safetensors":
            if item.name.endswith("index.json"):
                _write_index(item, tmp / item.name, grown)
            elif not item.name.endswith((".bin", ".pt", ".pth")):
                shutil.copy2(item, tmp / item.name)


def _special_lists(data: dict, plan: Mapping[str, list[str]], holders: Mapping[str, Path]) -> None:
    """Add to the base's tokenizer_config ``data`` the added tokens its holders list as extra special
    tokens (``extra_special_tokens``, or the older ``additional_special_tokens``)."""
    for key in ("extra_special_tokens", "additional_special_tokens"):
        listed: set[str] = set()
        for path in holders.values():
            config = path / "tokenizer_config.json"
            value = json.loads(config.read_text()).get(key) if config.is_file() else None
            if isinstance(value, list):
                listed.update(v for v in value if isinstance(v, str))
        extra = [token for token in plan if token in listed]
        if extra:
            value = data.get(key)
            own: list = value if isinstance(value, list) else []
            data[key] = [*own, *(t for t in extra if t not in own)]


def _holder_rows(models: ModelSet, plan: Mapping[str, list[str]], tensor: str) -> dict[str, torch.Tensor]:
    """Added token → the mean of its holders' rows of ``tensor`` (a tied holder's head is its embedding)."""
    from safetensors import safe_open

    sums: dict[str, torch.Tensor] = {}
    for name in {n for ns in plan.values() for n in ns}:
        model_dir = models.specialists[name]
        ids = vocab(model_dir) or {}
        where = {}
        for path in weight_files(model_dir):
            with safe_open(str(path), framework="pt") as f:
                where.update(dict.fromkeys(f.keys(), path))
        source = tensor if tensor in where else next((k for k in where if k.endswith("embed_tokens.weight")), None)
        if source is None:
            raise ModelError(f"model {name!r} has no {tensor!r} to take its added tokens' rows from")
        with safe_open(str(where[source]), framework="pt") as f:
            weight = f.get_tensor(source).to(torch.float32)
        for token, names in plan.items():
            if name in names:
                row = weight[ids[token]]
                sums[token] = sums[token] + row if token in sums else row.clone()
    return {token: sums[token] / len(names) for token, names in plan.items()}


def _write_weights(
    models: ModelSet, plan: Mapping[str, list[str]], new_ids: Mapping[str, int], tmp: Path
) -> dict[str, int]:
    """Each base weight file into ``tmp``: rewritten where it holds the embedding or head, else a
    symlink; returns the bytes each rewritten file grew by."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    rows = max(new_ids.values()) + 1
    grown: dict[str, int] = {}
    for path in weight_files(models.base):
        with safe_open(str(path), framework="pt") as f:
            names, metadata = list(f.keys()), f.metadata()
        if not any(is_vocab_tensor(n) for n in names):
            os.symlink(path.resolve(), tmp / path.name)
            continue
        state = load_file(str(path))
        grown[path.name] = 0
        for name in [n for n in names if is_vocab_tensor(n)]:
            old = state[name]
            new = torch.cat([old, old.new_zeros((rows - len(old), *old.shape[1:]))]) if rows > len(old) else old.clone()
            for token, row in _holder_rows(models, plan, name).items():
                new[new_ids[token]] = row.to(new.dtype)
            grown[path.name] += (new.numel() - old.numel()) * new.element_size()
            state[name] = new.contiguous()
        save_file(state, str(tmp / path.name), metadata=metadata or {"format": "pt"})
    return grown


def _write_index(src: Path, dst: Path, grown: Mapping[str, int]) -> None:
    """The base's shard index, its total size counting the grown rows (the tensors stay in their files)."""
    data = json.loads(src.read_text())
    meta = data.get("metadata")
    if isinstance(meta, dict) and isinstance(meta.get("total_size"), int):
        meta["total_size"] += sum(grown.values())
    dst.write_text(json.dumps(data, indent=2) + "\n")
