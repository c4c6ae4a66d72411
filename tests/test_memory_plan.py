"""The memory plan sizes a study before any engine starts: where task vectors live, vLLM's share,
and a one-line refusal that says what would fit.

GPU machines are sized from real model shapes (Llama-3-8B's, from its config) on described
machines: the plan reads shapes and memory figures only, so what it decides for an H200 or an
80 GB card can be checked here. The CPU plan is checked on the tiny zoo as a search would see it.
"""

from __future__ import annotations

import pytest

from optimizer.config import config_from_dict
from optimizer.errors import ConfigError
from optimizer.memory_plan import Machine, plan_for_shapes, plan_memory

GB = 10**9


def llama_shapes(hidden: int, inter: int, layers: int, vocab: int, kv_heads: int, head_dim: int = 128) -> dict:
    """Tensor shapes of an untied Llama checkpoint."""
    kv = kv_heads * head_dim
    shapes = {
        "model.embed_tokens.weight": (vocab, hidden),
        "lm_head.weight": (vocab, hidden),
        "model.norm.weight": (hidden,),
    }
    for i in range(layers):
        p = f"model.layers.{i}."
        shapes |= {
            p + "self_attn.q_proj.weight": (hidden, hidden),
            p + "self_attn.k_proj.weight": (kv, hidden),
            p + "self_attn.v_proj.weight": (kv, hidden),
            p + "self_attn.o_proj.weight": (hidden, hidden),
            p + "mlp.gate_proj.weight": (inter, hidden),
            p + "mlp.up_proj.weight": (inter, hidden),
            p + "mlp.down_proj.weight": (hidden, inter),
            p + "input_layernorm.weight": (hidden,),
            p + "post_attention_layernorm.weight": (hidden,),
        }
    return shapes


LLAMA_8B = llama_shapes(4096, 14336, 32, 128256, 8)
H200 = Machine(gpus=1, device_bytes=143_771 * 2**20, host_bytes=120 * GB)
A100_80 = Machine(gpus=1, device_bytes=80 * GB, host_bytes=120 * GB)


def config(**extra):
    return config_from_dict(
        {
            "name": "plan",
            "base": "/models/base",
            "models": {"a": "/m/a", "b": "/m/b", "c": "/m/c"},
            "method": "task_arithmetic",
            "objectives": [{"name": "a", "data": "/d/a", "metric": "exact_match"}],
            **extra,
        }
    )


def test_an_8b_merge_of_three_fits_an_h200_with_its_task_vectors_on_the_gpu() -> None:
    plan = plan_for_shapes(config(), LLAMA_8B, 3, H200)
    assert plan.placement == "resident"
    assert 16.0 * GB < plan.weight_bytes < 16.1 * GB  # 8.03 B parameters in bf16
    # vLLM is given what mergeopt's 4 copies leave, not its default 0.9 (which would not fit them)
    assert plan.gpu_memory_utilization is not None and 0.4 < plan.gpu_memory_utilization < 0.6
    left = H200.device_bytes * (1 - plan.gpu_memory_utilization)
    assert left >= 4 * plan.weight_bytes + plan.workspace_bytes
    assert plan.kv_bytes > 10 * GB  # room to serve from
    assert any("resident" in line for line in plan.lines())


def test_on_an_80_gb_card_the_task_vectors_stream_from_host_memory() -> None:
    plan = plan_for_shapes(config(), LLAMA_8B, 3, A100_80)
    assert plan.placement == "streamed"
    assert plan.gpu_memory_utilization is not None
    assert any("streamed from pinned host memory" in line for line in plan.lines())


def test_no_room_on_the_gpu_nor_in_host_memory_is_one_line_saying_what_would_fit() -> None:
    small_host = Machine(gpus=1, device_bytes=80 * GB, host_bytes=32 * GB)
    with pytest.raises(ConfigError) as err:
        plan_for_shapes(config(), LLAMA_8B, 3, small_host)
    message = str(err.value)
    assert "\n" not in message
    assert "pinned host memory" in message and "at most" in message and "specialists" in message


def test_tensor_parallel_ranks_each_hold_a_slice_so_more_fits_per_gpu() -> None:
    """Eight 8B specialists do not fit one 80 GB card even streamed; over 4 GPUs each holds 1/4."""
    A100_X4 = Machine(gpus=4, device_bytes=80 * GB, host_bytes=400 * GB)
    with pytest.raises(ConfigError, match=r"a higher vllm\.tensor_parallel_size"):
        plan_for_shapes(config(), LLAMA_8B, 8, Machine(gpus=1, device_bytes=80 * GB, host_bytes=100 * GB))
    one = plan_for_shapes(config(), LLAMA_8B, 3, A100_X4)
    four = plan_for_shapes(config(vllm={"tensor_parallel_size": 4}), LLAMA_8B, 3, A100_X4)
    assert one.placement == "streamed" and four.placement == "resident"  # 64 GB of copies / 4 ranks
    assert four.tensor_parallel == 4 and any("each of 4 GPUs holds its slice" in line for line in four.lines())
    assert four.gpu_memory_utilization is not None and four.gpu_memory_utilization > 0.6
    eight = plan_for_shapes(config(vllm={"tensor_parallel_size": 4}), LLAMA_8B, 8, A100_X4)
    assert eight.placement == "resident"
    # Each worker forms its slices from whole checkpoints in host memory while loading (2 × 16 GB;
    # the workers take turns when fewer fit at once): below that, refused before any engine starts.
    plan_for_shapes(config(vllm={"tensor_parallel_size": 4}), LLAMA_8B, 3, Machine(4, 80 * GB, 40 * GB))
    with pytest.raises(ConfigError, match=r"each worker reads the base and one specialist whole"):
        plan_for_shapes(config(vllm={"tensor_parallel_size": 4}), LLAMA_8B, 3, Machine(4, 80 * GB, 30 * GB))
    # TIES gathers a tensor's N + 1 inputs whole to merge it: more workspace per GPU than task arithmetic.
    ties = plan_for_shapes(config(method="ties", vllm={"tensor_parallel_size": 4}), LLAMA_8B, 3, A100_X4)
    assert ties.gpu_memory_utilization is not None and ties.gpu_memory_utilization < four.gpu_memory_utilization


def test_tensors_fused_in_the_checkpoint_are_planned_whole_on_every_rank() -> None:
    """Phi-3 stores qkv and gate_up fused: vLLM's loaders cut them in several pieces per rank, so
    each rank keeps them whole, and the plan counts them so (less room for vLLM than Llama's)."""
    fused = {}
    for name, shape in LLAMA_8B.items():
        if ".k_proj." in name or ".v_proj." in name or ".up_proj." in name:
            continue
        if ".q_proj." in name:
            name, shape = name.replace("q_proj", "qkv_proj"), (shape[0] + 2 * 8 * 128, shape[1])
        elif ".gate_proj." in name:
            name, shape = name.replace("gate_proj", "gate_up_proj"), (2 * shape[0], shape[1])
        fused[name] = shape
    machine = Machine(gpus=4, device_bytes=80 * GB, host_bytes=400 * GB)
    tp4 = config(vllm={"tensor_parallel_size": 4})
    llama, phi = plan_for_shapes(tp4, LLAMA_8B, 3, machine), plan_for_shapes(tp4, fused, 3, machine)
    assert phi.weight_bytes == llama.weight_bytes  # the same parameters, stored differently
    assert phi.gpu_memory_utilization is not None and llama.gpu_memory_utilization is not None
    assert phi.gpu_memory_utilization < llama.gpu_memory_utilization - 0.2


def test_a_memory_share_that_leaves_no_room_is_refused() -> None:
    with pytest.raises(ConfigError, match="base \\+ 3 task vectors need"):
        plan_for_shapes(config(vllm={"gpu_memory_utilization": 0.97}), LLAMA_8B, 3, A100_80)
    with pytest.raises(ConfigError, match="weights alone take"):
        plan_for_shapes(config(vllm={"gpu_memory_utilization": 0.1}), LLAMA_8B, 3, A100_80)


def test_the_users_share_is_kept_when_it_fits() -> None:
    plan = plan_for_shapes(config(vllm={"gpu_memory_utilization": 0.3}), LLAMA_8B, 3, H200)
    assert plan.gpu_memory_utilization == 0.3
    assert plan.placement == "resident"


def test_ties_needs_more_workspace_than_task_arithmetic() -> None:
    ta = plan_for_shapes(config(), LLAMA_8B, 3, H200)
    ties = plan_for_shapes(config(method="ties"), LLAMA_8B, 3, H200)
    assert ties.workspace_bytes > ta.workspace_bytes >= ta.largest_tensor_bytes


def test_the_cpu_plan_of_the_tiny_zoo(zoo) -> None:
    from optimizer.search.prepare import check_models
    from tests._cli import zoo_config

    cfg = config_from_dict(zoo_config())
    models, _ = check_models(cfg)
    plan = plan_memory(cfg, models, Machine(gpus=0, device_bytes=0, host_bytes=16 * GB))
    assert plan.placement == "resident" and plan.gpu_memory_utilization is None
    assert plan.dtype_bytes == 4  # float32 on CPU
    with pytest.raises(ConfigError, match=r"needs .* of host memory"):
        plan_memory(cfg, models, Machine(gpus=0, device_bytes=0, host_bytes=1 * GB))


def test_an_engine_streaming_its_task_vectors_builds_the_same_candidates(zoo) -> None:
    """The streamed placement changes where task vectors live, never the merged model."""
    import torch

    from optimizer.checkpoints import ModelSet
    from optimizer.engines.hf_engine import HFEngine
    from optimizer.merge import MergePlan, ModelParams
    from optimizer.zoo import default_zoo_dir

    root = default_zoo_dir()
    names = sorted(p.name for p in (root / "specialists").iterdir() if p.is_dir())
    models = ModelSet(root / "base", {t: root / "specialists" / t for t in names})
    resident, streamed = HFEngine(models, device="cpu"), HFEngine(models, device="cpu", placement="streamed")
    plan = MergePlan("dare_ties", models.names, {m: ModelParams(0.4 + 0.2 * i, 0.5) for i, m in enumerate(names)})
    for engine in (resident, streamed):
        engine.apply_plan(plan)
    a, b = resident.model.state_dict(), streamed.model.state_dict()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(
        a["model.embed_tokens.weight"], HFEngine(models, device="cpu").model.state_dict()["model.embed_tokens.weight"]
    )


def test_search_check_shows_the_plan_and_the_study_and_writes_nothing(zoo, tmp_path) -> None:
    """``mergeopt search CONFIG --check``: every check and the memory plan, then what the search
    would run; no study, no study data, no engine. A config that would be refused is refused the same."""
    from tests._cli import run_cli, write_config, zoo_config

    cfg = zoo_config("checked", method="ties", engine="vllm", search={"trials": 7, "seed": 0})
    proc = run_cli("search", str(write_config(tmp_path / "s.yaml", cfg)), "--check", cwd=tmp_path, check=True)
    out = " ".join(proc.stdout.split())
    assert "memory: model" in out and "host memory" in out
    assert "objective rev: exact_match, 12 search and 24 held-out examples" in out
    assert "method ties, engine vllm, 6 parameters (rev.weight, rev.density" in out and "target 7 trials" in out
    assert "check passed: nothing written and no engine started" in out
    assert not (tmp_path / "studies").exists()

    bad = zoo_config("bad", vllm={"gpu_memory_utilization": 1.5})
    proc = run_cli("search", str(write_config(tmp_path / "bad.yaml", bad)), "--check", cwd=tmp_path)
    assert proc.returncode == 2 and "gpu_memory_utilization" in proc.stderr
