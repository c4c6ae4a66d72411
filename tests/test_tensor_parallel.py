"""Tensor parallelism: each rank holds only its slices, and merges as one device would.

The slices come from vLLM's own weight loaders (recorded while they load); the first tests build
each sharded layer type of vLLM for every rank of a TP group, without starting an engine, and
check the recorded slices against what the loaders put into the parameters. The last starts a
real TP=2 engine on vLLM's CPU build and scores merges against the transformers engine.
"""

from __future__ import annotations

import types
from unittest import mock

import pytest
import torch

from optimizer.engines._tp_shards import Shard, ShardLayout, narrow_delta, record_shards
from optimizer.low_rank import LowRankDelta, combine

HIDDEN, HEAD, HEADS, KV_HEADS, VOCAB = 64, 16, 4, 1, 1000


def _layers(rank: int, size: int) -> dict[str, torch.nn.Module]:
    """One of each sharded vLLM layer, as rank ``rank`` of ``size`` builds it."""
    import vllm.distributed.parallel_state as parallel_state
    import vllm.model_executor.layers.linear as linear
    import vllm.model_executor.layers.vocab_parallel_embedding as vocab
    from vllm.config import VllmConfig, set_current_vllm_config

    group = types.SimpleNamespace(rank_in_group=rank, world_size=size)
    with mock.patch.object(parallel_state, "_TP", group), set_current_vllm_config(VllmConfig()):
        torch.manual_seed(0)
        return {
            "column": linear.ColumnParallelLinear(HIDDEN, 128, bias=False),
            "row": linear.RowParallelLinear(128, HIDDEN, bias=False),
            "qkv": linear.QKVParallelLinear(HIDDEN, HEAD, HEADS, KV_HEADS, bias=False),
            "qkv_gqa": linear.QKVParallelLinear(HIDDEN, HEAD, HEADS, 2, bias=False),
            "gate_up": linear.MergedColumnParallelLinear(HIDDEN, [96, 96], bias=False),
            "embed": vocab.VocabParallelEmbedding(VOCAB, HIDDEN),
            "head": vocab.ParallelLMHead(VOCAB, HIDDEN),
            "replicated": linear.ReplicatedLinear(HIDDEN, 32, bias=False),
        }


#: Checkpoint tensors: (name, layer, shard id the model's load_weights passes, shape).
CHECKPOINT = [
    ("column.weight", "column", None, (128, HIDDEN)),
    ("row.weight", "row", None, (HIDDEN, 128)),
    ("q_proj.weight", "qkv", "q", (HEADS * HEAD, HIDDEN)),
    ("k_proj.weight", "qkv", "k", (KV_HEADS * HEAD, HIDDEN)),
    ("v_proj.weight", "qkv", "v", (KV_HEADS * HEAD, HIDDEN)),
    ("gqa.q_proj.weight", "qkv_gqa", "q", (HEADS * HEAD, HIDDEN)),
    ("gqa.k_proj.weight", "qkv_gqa", "k", (2 * HEAD, HIDDEN)),
    ("gqa.v_proj.weight", "qkv_gqa", "v", (2 * HEAD, HIDDEN)),
    ("gate_proj.weight", "gate_up", 0, (96, HIDDEN)),
    ("up_proj.weight", "gate_up", 1, (96, HIDDEN)),
    ("embed_tokens.weight", "embed", None, (VOCAB, HIDDEN)),
    ("lm_head.weight", "head", None, (VOCAB, HIDDEN)),
    ("replicated.weight", "replicated", None, (32, HIDDEN)),
]


def _checkpoint() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    return {name: torch.randn(shape, generator=gen) for name, _, _, shape in CHECKPOINT}


def _load_into(layers: dict[str, torch.nn.Module]):
    """What a model's ``load_weights`` does for these tensors: each to its layer's loader."""
    route = {name: (layer, shard_id) for name, layer, shard_id, _ in CHECKPOINT}

    def load(weights) -> None:
        for name, tensor in weights:
            layer, shard_id = route[name]
            param = layers[layer].weight
            args = (shard_id,) if shard_id is not None else ()
            param.weight_loader(param, tensor, *args)

    return load


@pytest.mark.parametrize("size", [2, 4])
def test_recorded_slices_are_what_vllms_loaders_load_on_every_rank(size: int) -> None:
    ckpt = _checkpoint()
    tables = []
    for rank in range(size):
        layers = _layers(rank, size)
        shards = record_shards(_load_into(layers), ckpt)
        tables.append(shards)
        weights = {k: m.weight.data for k, m in layers.items()}
        take = {name: s.take(ckpt[name]) for name, s in shards.items() if s is not None}
        # Plain column / row parallel: the parameter is the slice.
        assert torch.equal(weights["column"], take["column.weight"])
        assert torch.equal(weights["row"], take["row.weight"])
        assert shards["row.weight"].dim == 1
        # Fused: the parameter is the sources' slices, one after the other.
        # One KV head over `size` ranks: every rank loads it whole (vLLM replicates it), so it is
        # not sharded.
        assert shards["k_proj.weight"] is None and shards["v_proj.weight"] is None
        qkv = [take["q_proj.weight"], ckpt["k_proj.weight"], ckpt["v_proj.weight"]]
        assert torch.equal(weights["qkv"], torch.cat(qkv))
        # Two KV heads: one per rank at TP 2; at TP 4 each is replicated on two ranks (same slice).
        gqa = [take["gqa.q_proj.weight"], take["gqa.k_proj.weight"], take["gqa.v_proj.weight"]]
        assert torch.equal(weights["qkv_gqa"], torch.cat(gqa))
        assert shards["gqa.k_proj.weight"] == Shard(0, (rank * 2 // size) * HEAD, HEAD)
        assert torch.equal(weights["gate_up"], torch.cat([take["gate_proj.weight"], take["up_proj.weight"]]))
        # Vocabulary-parallel: the slice, then zero padding (the last rank holds fewer real rows).
        for layer, name in (("embed", "embed_tokens.weight"), ("head", "lm_head.weight")):
            rows = take[name].shape[0]
            assert torch.equal(weights[layer][:rows], take[name])
            assert not weights[layer][rows:].any()
        # Copied whole: not sharded.
        assert shards["replicated.weight"] is None
    # Together the ranks' slices cover each sharded tensor, and a gather rebuilds it.
    shapes = {name: tuple(t.shape) for name, t in ckpt.items()}
    for rank in range(size):
        gather = _FakeAllGather(tables, ckpt)
        layout = ShardLayout(tables, rank, shapes, all_gather=gather)
        assert set(layout.shards) == set(ckpt) - {"replicated.weight", "k_proj.weight", "v_proj.weight"}
        for name, tensor in ckpt.items():
            gather.name = name
            piece = layout.narrow(name, tensor)
            assert torch.equal(layout.gather(name, piece), tensor)
            full = layout.for_loader(name, piece)
            assert full.shape == tensor.shape
            own = layout.own(name)
            assert torch.equal(own.take(full) if own else full, own.take(tensor) if own else tensor)


class _FakeAllGather:
    """Stands in for the TP group's all-gather: every rank's (padded) slice of tensor ``name``."""

    def __init__(self, tables, ckpt) -> None:
        self.tables, self.ckpt, self.name = tables, ckpt, ""

    def __call__(self, moved: torch.Tensor) -> list[torch.Tensor]:
        cuts = [t[self.name] for t in self.tables]
        longest = max(c.length for c in cuts)
        out = []
        for c in cuts:
            part = c.take(self.ckpt[self.name]).movedim(c.dim, 0)
            out.append(torch.cat([part, torch.zeros(longest - c.length, *part.shape[1:])]))
        assert out[0].shape == moved.shape
        return out


def test_the_recorder_follows_a_loaders_reshaping_and_keeps_what_it_cannot_follow_whole() -> None:
    """The cut is found below whatever views a loader takes (vLLM's expert loader adds a dimension
    and unbinds it before narrowing); reads it cannot map to one box keep the tensor whole."""
    gen = torch.Generator().manual_seed(3)
    ckpt = {name: torch.randn(96, 64, generator=gen) for name in ("expert", "kw", "transposed", "fused", "cast", "cat")}

    def load(weights) -> None:
        for name, t in weights:
            if name == "expert":  # routed_experts.py: unsqueeze(0).unbind(), then rank 1 of 2's rows
                torch.empty(48, 64).copy_(t.unsqueeze(0).unbind()[0].narrow(0, 48, 48))
            elif name == "kw":
                torch.empty(4, 64).copy_(t.narrow(0, 2, length=4))
            elif name == "transposed":  # a column cut, copied transposed
                torch.empty(32, 96).copy_(t.narrow(1, 32, 32).t())
            elif name == "fused":  # a checkpoint's fused qkv: three pieces per rank
                for start in (0, 32, 64):
                    torch.empty(16, 64).copy_(t.narrow(0, start, 16))
            elif name == "cast":  # converted before the cut: the copy no longer reads the checkpoint
                torch.empty(48, 64, dtype=torch.float64).copy_(t.to(torch.float64).narrow(0, 0, 48))
            elif name == "cat":
                torch.empty(192, 64).copy_(torch.cat([t, t]))

    shards = record_shards(load, ckpt)
    # Fed one tensor at a time (as the engine streams the base), the same slices.
    assert record_shards(load, ((name, t.clone()) for name, t in ckpt.items())) == shards
    assert shards["expert"] == Shard(0, 48, 48)
    assert shards["kw"] == Shard(0, 2, 4)
    assert shards["transposed"] == Shard(1, 32, 32)
    assert shards["fused"] is None and shards["cast"] is None and shards["cat"] is None


@pytest.mark.parametrize("transpose", [False, True])
@pytest.mark.parametrize("dim", [0, 1])
def test_an_adapters_slice_stays_factors_and_equals_the_slice_of_its_product(dim: int, transpose: bool) -> None:
    """A rank keeps a LoRA task vector's slice as factors: expanded, it is the dense slice."""
    gen = torch.Generator().manual_seed(2)
    out, inp, r = 48, 40, 4
    b = torch.randn(inp if transpose else out, r, generator=gen)
    a = torch.randn(r, out if transpose else inp, generator=gen)
    dense_part = torch.randn(out, inp, generator=gen)
    delta = LowRankDelta(b, a, 0.5, (out, inp), transpose=transpose, dense_part=dense_part)
    shard = Shard(dim, 8, 16)
    cut = narrow_delta(delta, shard)
    assert isinstance(cut, LowRankDelta) and cut.rank == r
    assert torch.allclose(cut.expand(), shard.take(delta.expand()), atol=1e-5)
    base = torch.randn(out, inp, generator=gen)
    merged = combine(shard.take(base), [cut, shard.take(dense_part)], 0.9, [0.7, 0.3])
    assert torch.allclose(merged, shard.take(combine(base, [delta, dense_part], 0.9, [0.7, 0.3])), atol=1e-5)


def test_cpu_workers_get_disjoint_cores() -> None:
    import os

    from optimizer.engines.vllm_engine import cpu_binding

    cores = sorted(os.sched_getaffinity(0))
    groups = [g.split(",") for g in cpu_binding(len(cores)).split("|")]
    assert len(groups) == len(cores) and sorted(int(c) for g in groups for c in g) == cores


@pytest.mark.slow
def test_a_tp2_engine_holds_half_and_merges_like_one_device(zoo, monkeypatch) -> None:
    """vLLM's CPU build at tensor_parallel_size 2: each rank holds its slices (about half of base +
    task vectors), and TIES (gathered whole) and task arithmetic (merged on the slices) score as the
    transformers engine does. The workers load one at a time here, as on a host whose memory holds
    one worker's whole checkpoints only."""
    monkeypatch.setenv("MERGEOPT_TP_LOAD_AT_ONCE", "1")
    from optimizer.config import VllmConfig
    from optimizer.engines.hf_engine import HFEngine
    from optimizer.engines.vllm_engine import VLLMEngine
    from tests.test_vllm_engine import PLAN_A, PLAN_B, TASKS, _examples, _zoo_models

    models = _zoo_models()
    whole = sum(p.stat().st_size for p in models.base.glob("*.safetensors")) * (1 + len(models.specialists))
    engine = VLLMEngine(models, settings=VllmConfig(max_num_seqs=32, tensor_parallel_size=2))
    try:
        assert len(engine.held_bytes) == 2
        assert all(held < 0.6 * whole for held in engine.held_bytes), (engine.held_bytes, whole)
        reference = HFEngine(models)
        for plan in (PLAN_A, PLAN_B):
            engine.apply_plan(plan)
            reference.apply_plan(plan)
            for task in TASKS:
                requests = [(e["prompt"], e["target"]) for e in _examples(task, 16)]
                got = [x.logprob for x in engine.loglikelihood(requests)]
                want = [x.logprob for x in reference.loglikelihood(requests)]
                worst = max(abs(x - y) for x, y in zip(got, want, strict=True))
                assert worst < 1e-3, f"{plan.method} on {task}: |Δ log-likelihood| up to {worst:.2e} nats"
    finally:
        engine.close()


@pytest.mark.slow
def test_a_search_with_tensor_parallel_workers_runs_through_the_cli(zoo, tmp_path) -> None:
    """``vllm: {tensor_parallel_size: 2}`` in a study config: the search runs its TIES trials on two
    CPU workers and records every trial; more workers than cores is one line, exit 2."""
    import os

    from tests._cli import run_cli, trial_states, write_config, zoo_config

    tp2 = {"tensor_parallel_size": 2, "max_num_seqs": 32}
    search = {"trials": 3, "seed": 0, "baselines": False}
    cfg = zoo_config("tp2", limit=8, engine="vllm", method="ties", vllm=tp2, search=search)
    proc = run_cli("search", str(write_config(tmp_path / "study.yaml", cfg)), cwd=tmp_path, check=True)
    assert trial_states(tmp_path / "studies" / "tp2" / "study.db") == {"COMPLETE": 3}, proc.stdout[-2000:]
    assert "trial 2 [search] complete" in proc.stdout + proc.stderr

    cores = len(os.sched_getaffinity(0))
    too_many = zoo_config("tp-many", engine="vllm", vllm={"tensor_parallel_size": cores + 1})
    proc = run_cli("search", str(write_config(tmp_path / "many.yaml", too_many)), cwd=tmp_path)
    assert proc.returncode == 2
    assert f"{cores} cores are visible here" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "studies" / "tp-many").exists()


@pytest.mark.slow
def test_a_mixture_of_experts_is_sharded_by_expert_loaders_too(tmp_path) -> None:
    """Mixtral at TP 2 on vLLM's CPU build: vLLM's expert loader (which reshapes each expert's
    checkpoint tensor before cutting it) still yields slices, each rank holds about half, and a
    TIES merge scores as the transformers engine's."""
    from optimizer.checkpoints import ModelSet
    from optimizer.config import VllmConfig
    from optimizer.engines.hf_engine import HFEngine
    from optimizer.engines.vllm_engine import VLLMEngine
    from optimizer.merge import MergePlan
    from tests._tiny_models import build_tiny_models
    from tests.test_families import MODELS, PLAN

    built = build_tiny_models(
        tmp_path, names=MODELS, family="mixtral", num_layers=2, vocab=320, delta_scale=0.05, tokenizer=True
    )
    models = ModelSet(built.base, built.specialists)
    whole = sum(p.stat().st_size for p in models.base.glob("*.safetensors")) * (1 + len(MODELS))
    requests = [("rev: abcd =", " dcba"), ("sort: dcab =", " abcd"), ("add: 12+30 =", " 42")]
    plan = MergePlan("ties", MODELS, PLAN)
    with HFEngine(models, device="cpu") as hf:
        hf.apply_plan(plan)
        expected = [ll.logprob for ll in hf.loglikelihood(requests)]
    with VLLMEngine(models, settings=VllmConfig(tensor_parallel_size=2, max_num_seqs=8)) as engine:
        assert all(held < 0.6 * whole for held in engine.held_bytes), (engine.held_bytes, whole)
        engine.apply_plan(plan)
        merged = [ll.logprob for ll in engine.loglikelihood(requests)]
    assert merged == pytest.approx(expected, abs=1e-3)
