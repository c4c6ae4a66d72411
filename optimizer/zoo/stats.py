"""How large a zoo's task vectors are and how much they point the same way.

Two numbers decide how hard a set of specialists is to merge: the size of each task vector
τₘ = θₘ − θ₀ relative to the base weights, and the cosine between task vectors. Large, aligned
vectors collide when added; real LLM fine-tunes are small and nearly orthogonal. The zoo records
both in its ``zoo.json`` so that anyone comparing results across zoo versions can see what changed.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

__all__ = ["task_vector_stats"]


def task_vector_stats(zoo: Path | str, tasks: Sequence[str]) -> dict[str, dict[str, float]]:
    """‖τₘ‖ / ‖θ₀‖ over all weights and for the LM head, and the cosine of every two τₘ.

    ``zoo`` is a zoo directory with ``base/`` and ``specialists/<task>/``. The LM head's figure is
    left out for a model whose head is tied to its embeddings (it has no head tensor of its own).
    """
    import torch  # here, not at module level: importing the zoo's build must not load torch

    from optimizer.checkpoints import load_state_dict
    from optimizer.merge import task_vectors

    zoo = Path(zoo)
    base = load_state_dict(zoo / "base", torch.float32)
    deltas = task_vectors(base, [load_state_dict(zoo / "specialists" / t, torch.float32) for t in tasks])
    taus = {t: {k: d[i] for k, d in deltas.items()} for i, t in enumerate(tasks)}
    norm_base = math.sqrt(sum(float(v.square().sum()) for v in base.values()))
    sq = {t: sum(float(v.square().sum()) for v in tau.values()) for t, tau in taus.items()}
    cosine: dict[str, float] = {}
    for i, a in enumerate(tasks):
        for b in tasks[i + 1 :]:
            dot = sum(float((taus[a][k] * taus[b][k]).sum()) for k in base)
            # A specialist identical to the base has no direction: its cosine is undefined (NaN).
            cosine[f"{a}-{b}"] = round(dot / math.sqrt(sq[a] * sq[b]), 3) if sq[a] * sq[b] > 0 else math.nan
    stats = {"relative_norm": {t: round(math.sqrt(sq[t]) / norm_base, 4) for t in tasks}}
    head = next((k for k in base if k.startswith("lm_head")), None)  # None with tied embeddings
    if head is not None:
        stats["relative_norm_lm_head"] = {t: round(float(taus[t][head].norm() / base[head].norm()), 4) for t in tasks}
    stats["cosine"] = cosine
    return stats
