"""The transformers engine: the reference every faster engine is checked against.

It holds the base weights and the task vectors in memory once, and each ``apply_plan`` writes
merged tensors straight into the live ``nn.Parameter`` storage: no checkpoint, no reload.
Scoring is plain PyTorch (batched greedy decoding, teacher-forced log-likelihoods), slow but
simple enough to trust.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from optimizer.checkpoints import ModelSet, model_config, read_shapes, torch_dtype
from optimizer.engines._allocator import retain_freed_memory
from optimizer.engines._hf_params import live_views
from optimizer.engines.base import Engine, LogLikelihood
from optimizer.families import family_of
from optimizer.merge._registry import MergeMethod
from optimizer.merge.plan import MergePlan
from optimizer.merge.streaming import Placement, load_for_merging, merged_tensors
from optimizer.merge.study_data import bind
from optimizer.tokens import encode_pair

__all__ = ["HFEngine"]


class HFEngine(Engine):
    """Merge-in-place and scoring with a transformers causal LM."""

    def __init__(
        self,
        models: ModelSet,
        *,
        device: str = "auto",
        dtype: str = "auto",
        batch_size: int = 64,
        placement: Placement = "resident",
    ):
        from transformers import AutoModelForCausalLM, AutoTokenizer
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # one engine start is not worth a progress bar in a study log
        self.models = models
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        if dtype == "auto":  # float32 on CPU: bf16 matmuls are several times slower on AVX2 CPUs
            dtype = "bfloat16" if device.startswith("cuda") else "float32"
        self.device = torch.device(device)
        self.batch_size = batch_size
        dtype_ = torch_dtype(dtype)
        self.tokenizer = AutoTokenizer.from_pretrained(str(models.base))
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.model = AutoModelForCausalLM.from_pretrained(str(models.base), dtype=dtype_)
        # transformers wraps .to() in a decorator whose annotations mypy reads as unbound
        self.model.to(self.device).eval()  # type: ignore[arg-type]
        # Tied weights appear once in named_parameters; merging only those keeps a tied head
        # governed by the embedding's coefficients instead of being written twice. Experts of a
        # mixture-of-experts layer are slices of fused parameters in memory (see _hf_params).
        self._params = live_views(self.model, read_shapes(models.base))
        self._family = family_of(model_config(models.base))
        self.placement: Placement = placement
        self._base, self._deltas = load_for_merging(
            models, dtype=dtype_, device=self.device, placement=placement, keep=self._params
        )
        self._bound: dict[str, MergeMethod] = {}
        retain_freed_memory()  # after the load (its checkpoints go back): merges reuse their pages

    @torch.no_grad()
    def apply_plan(self, plan: MergePlan) -> None:
        if tuple(plan.models) != self.models.names:
            raise ValueError(f"plan is for models {plan.models}, engine holds {self.models.names}")
        method = self._bound.get(plan.method)
        if method is None:
            method = self._bound[plan.method] = bind(
                plan.method, self.models.names, self.models.data_dir, self.models.base
            )
        tensors = merged_tensors(plan, self._base, self._deltas, method, self.placement, self._family)
        for name, merged in tensors:
            self._params[name].copy_(merged)

    @torch.no_grad()
    def generate(self, prompts: Sequence[str], *, max_tokens: int, stop: Sequence[str]) -> list[str]:
        from optimizer.engines._hf_generate import greedy_generate

        outputs = greedy_generate(
            self.model,
            self.tokenizer,
            list(prompts),
            max_new_tokens=max_tokens,
            # One stop string lets decoding end early; several are cut afterwards.
            stop=stop[0] if len(stop) == 1 else None,
            batch_size=self.batch_size,
            add_special_tokens=False,  # the prompt's text carries its own BOS (optimizer.tokens)
        )
        return [_cut_at_stop(text, stop) for text in outputs]

    def loglikelihood(self, requests: Sequence[tuple[str, str]]) -> list[LogLikelihood]:
        return self.loglikelihood_tokens([encode_pair(self.tokenizer, ctx, cont) for ctx, cont in requests])

    @torch.no_grad()
    def loglikelihood_tokens(self, requests: Sequence[tuple[list[int], list[int]]]) -> list[LogLikelihood]:
        encoded = list(requests)
        results: list[LogLikelihood] = []
        pad = self.tokenizer.pad_token_id
        for start in range(0, len(encoded), self.batch_size):
            batch = encoded[start : start + self.batch_size]
            seqs = [ctx + cont for ctx, cont in batch]
            width = max(len(s) for s in seqs)
            ids = torch.full((len(seqs), width), pad, dtype=torch.long)
            mask = torch.zeros((len(seqs), width), dtype=torch.long)
            for i, s in enumerate(seqs):  # right padding: positions stay 0..n-1 as in vLLM
                ids[i, : len(s)] = torch.tensor(s)
                mask[i, : len(s)] = 1
            logits = self.model(input_ids=ids.to(self.device), attention_mask=mask.to(self.device)).logits
            logprobs = torch.log_softmax(logits.float(), dim=-1)  # (B, T, V)
            for i, (ctx, cont) in enumerate(batch):
                # token t is predicted by position t-1
                pos = torch.arange(len(ctx) - 1, len(ctx) + len(cont) - 1)
                target = torch.tensor(cont)
                row = logprobs[i, pos]  # (len(cont), V)
                lp = row.gather(1, target[:, None].to(row.device)).sum().item()
                greedy = bool((row.argmax(-1).cpu() == target).all())
                results.append(LogLikelihood(lp, len(cont), greedy))
        return results


def _cut_at_stop(text: str, stop: Sequence[str]) -> str:
    """Cut a completion before the earliest stop string."""
    cut = len(text)
    for s in stop:
        i = text.find(s)
        if i != -1:
            cut = min(cut, i)
    return text[:cut]
