"""The packed-sequence fast path (`dasd_megatron/model/packed.py`): RoPE over a whole pack in one op, attention
without per-document work, no host sync in the model forward, and a step whose op count does not grow with the
number of documents.

References: megatron-core's own unfused thd RoPE (`rope_utils.apply_rotary_pos_emb`, the landed path) for RoPE
(bit for bit: the same values and elementwise ops, only gathered once); a float64 per-document attention
(`test_attention.ref_thd`) for attention; the landed path (`set_fast_path(False)`) for the whole model.
"""

from __future__ import annotations

import collections
import contextlib
import json
import math
import os
import random
import types

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from megatron.core.models.common.embeddings import rope_utils
from megatron.core.transformer.transformer_config import TransformerConfig

from dasd_megatron.model import packed
from dasd_megatron.testing.distributed import run_distributed
from dasd_megatron.train.batch import Rollout, pack

from test_attention import NG, NP, TOL, assert_close, make_attn, rand, ref_thd, run_with_grads

TINY = dict(architectures=["Qwen3ForCausalLM"], model_type="qwen3", hidden_size=64, intermediate_size=128,
            num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16, vocab_size=1000,
            max_position_embeddings=4096, rms_norm_eps=1e-6, rope_theta=1000000.0, tie_word_embeddings=True,
            hidden_act="silu", attention_bias=False, torch_dtype="float32")


def _rollouts(lengths, *, prompt=6, seed=0):
    rng = random.Random(seed)
    out = []
    for i, n in enumerate(lengths):
        p = [rng.randrange(1000) for _ in range(prompt)]
        r = [rng.randrange(1000) for _ in range(n - prompt)]
        out.append(Rollout(p, p + [7, 8, 9], r, [-1.5] * len(r), reward=float(i % 2), group=i // 4))
    return out


def _freqs(n: int, dim: int = 16, base: float = 10000.0) -> torch.Tensor:
    """megatron's RoPE frequency table `[n, 1, 1, dim]` (RotaryEmbedding.get_emb: positions x inverse frequencies,
    the half-table repeated)."""
    inv = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    f = torch.outer(torch.arange(n, dtype=torch.float32), inv)
    return torch.cat([f, f], dim=-1)[:, None, None, :]


def _cp_group(size: int, rank: int):
    return types.SimpleNamespace(size=lambda: size, rank=lambda: rank)


# ------------------------------------------------------------------ RoPE


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("cp,rank", [(1, 0), (2, 0), (2, 1)])
def test_rope_over_the_pack_is_megatrons_thd_rope_bit_for_bit(dtype, cp, rank):
    lengths = [23, 9, 40, 14, 31]
    rs = _rollouts(lengths)
    whole = pack(rs, list(range(len(rs))), teacher=False, rollout_ids=list(range(len(rs))), pad_multiple=4,
                 cp_size=cp)
    b = whole if cp == 1 else whole.cp_shard(cp, rank)
    config = TransformerConfig(num_layers=1, hidden_size=64, num_attention_heads=4, kv_channels=16,
                               use_cpu_initialization=True)
    freqs = _freqs(256)
    cu = b.cu_seqlens if b.cu_seqlens_padded is None else b.cu_seqlens_padded
    psp = b.packed_seq_params()
    assert pack_info_of(psp) is not None
    g = torch.Generator().manual_seed(cp * 10 + rank)
    t = torch.randn(b.tokens.shape[1], 3, 16, generator=g).to(dtype)
    dy = torch.randn(t.shape, generator=g).to(dtype)

    def run(fn):
        x = t.clone().requires_grad_(True)
        y = fn(x, freqs, config, cu_seqlens=cu, cp_group=_cp_group(cp, rank))
        y.backward(dy)
        return y.detach(), x.grad

    packed.install()
    fast = run(packed.apply_rotary_pos_emb)
    landed = run(rope_utils.apply_rotary_pos_emb)
    assert torch.equal(fast[0], landed[0]) and torch.equal(fast[1], landed[1])
    # ... and it is RoPE: positions restart per document (a check that cannot pass by both sides being identity)
    assert not torch.equal(fast[0], t)
    # a pack not registered here (or the fast path off) goes to megatron's own function
    packed.set_fast_path(False)
    try:
        assert packed.pack_info(cu) is None
    finally:
        packed.set_fast_path(True)


def pack_info_of(psp):
    return packed.pack_info(psp.cu_seqlens_q_padded if psp.cu_seqlens_q_padded is not None else psp.cu_seqlens_q)


def test_rope_tables_are_computed_once_per_forward():
    rs = _rollouts([12, 20, 8])
    b = pack(rs, [0, 1, 2], teacher=False, rollout_ids=[0, 1, 2])
    info = pack_info_of(b.packed_seq_params())
    freqs = _freqs(64)
    c1, s1 = info.rope_tables(freqs, torch.float32, 1.0)
    c2, s2 = info.rope_tables(freqs, torch.float32, 1.0)
    assert c1 is c2 and s1 is s2  # cached: every layer's query and key reuse them
    expect = freqs[b.position_ids[0], 0]  # [t, 1, d]
    assert torch.equal(c1, torch.cos(expect)) and torch.equal(s1, torch.sin(expect))


# ------------------------------------------------------------------ attention


def test_attention_plan_buckets_by_length_not_by_document_count():
    lengths = [int(1.1 ** k) + 1 for k in range(60)]  # 2 .. ~276, geometric
    cu_pad = [0]
    for n in lengths:
        cu_pad.append(cu_pad[-1] + n + 1)  # one padding row per document
    t = cu_pad[-1] + 3
    plan = packed.attention_plan(cu_pad, lengths, t=t, device="cpu", max_waste=1.25)
    ratio = max(lengths) / min(lengths)
    assert len(plan.buckets) <= math.ceil(math.log(ratio) / math.log(1.25)) + 1 < len(lengths)
    slots = torch.zeros(plan.slots + 1, dtype=torch.long)
    first = 0
    for b in plan.buckets:
        gathered = b.gather.view(b.n_docs, b.length)
        for row in gathered:
            start = int(row[0])
            n = lengths[cu_pad.index(start)]
            assert b.length <= 1.25 * n or n == b.length  # waste bound
            assert row.tolist() == [start + min(j, n - 1) for j in range(b.length)]
            assert plan.scatter[start:start + n].tolist() == list(range(first, first + n))
            first += b.length
    assert first == plan.slots
    real = torch.zeros(t, dtype=torch.bool)
    for s, n in zip(cu_pad[:-1], lengths):
        real[s:s + n] = True
    assert (plan.scatter[~real] == plan.slots).all()  # padding rows read the zero slot
    slots.index_add_(0, plan.scatter[real], torch.ones(int(real.sum()), dtype=torch.long))
    assert slots[:-1].max() <= 1  # no slot read twice


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_batched_packed_attention_matches_float64_reference(dtype):
    g = torch.Generator().manual_seed(5)
    lens = [5, 37, 3, 36, 1, 12, 11]  # several length buckets, a 1-token document
    pad = [n + (k % 3) for k, n in enumerate(lens)]  # padding after some documents
    cu, cu_pad = [0], [0]
    for n, p in zip(lens, pad):
        cu.append(cu[-1] + n)
        cu_pad.append(cu_pad[-1] + p)
    t = cu_pad[-1] + 4  # and a tail after the pack
    q, k, v = rand(t, NP, 8, gen=g), rand(t, NG, 8, gen=g), rand(t, NG, 8, gen=g)
    q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
    dout = rand(t, NP * 8, gen=g)
    i32 = lambda x: torch.tensor(x, dtype=torch.int32)  # noqa: E731
    psp = packed.packed_seq_params(cu_seqlens=i32(cu), cu_seqlens_padded=i32(cu_pad), max_seqlen=max(pad),
                                   host_cu=cu, host_cu_pad=cu_pad, position_ids=torch.zeros(t, dtype=torch.long))
    attn = make_attn()
    calls = collections.Counter()
    real_sdpa = torch.nn.functional.scaled_dot_product_attention

    def counting(*a, **kw):
        calls["sdpa"] += 1
        return real_sdpa(*a, **kw)

    torch.nn.functional.scaled_dot_product_attention = counting
    try:
        got = run_with_grads(lambda q, k, v: attn(q, k, v, None, packed_seq_params=psp), q, k, v, dout)
    finally:
        torch.nn.functional.scaled_dot_product_attention = real_sdpa
    ref = run_with_grads(lambda q, k, v: ref_thd(q, k, v, cu, cu_pad), q.double(), k.double(), v.double(), dout)
    for name, a, e in zip(("out", "dq", "dk", "dv"), got, ref):
        assert_close(a, e, TOL[dtype], f"batched thd {dtype} {name}")
    n_buckets = len(pack_info_of(psp).attention_plan(q.device).buckets)
    assert calls["sdpa"] == n_buckets < len(lens)  # one SDPA per length bucket, not per document
    real = torch.zeros(t, dtype=torch.bool)
    for s, n in zip(cu_pad[:-1], lens):
        real[s:s + n] = True
    assert got[0][~real].abs().max() == 0
    for grad in got[1:]:
        assert grad[~real].abs().max() == 0


# ------------------------------------------------------------------ the model and the step


def _tiny_model(tmp):
    from dasd_megatron.config import ModelConfig, PrecisionConfig, RunConfig, apply_overrides
    from dasd_megatron.model.builder import build_model
    from dasd_megatron.model.hf_config import load_hf_architecture

    with open(os.path.join(tmp, "config.json"), "w") as f:
        json.dump(TINY, f)
    cfg = RunConfig(model=ModelConfig(hf_config=tmp, seq_length=4096), precision=PrecisionConfig(params_dtype="float32"))
    cfg = apply_overrides(cfg, ["train.max_prompt_tokens=64", "train.max_response_tokens=2048",
                                "train.micro_batch_tokens=4096", "optim.lr=1e-6"])
    arch = load_hf_architecture(tmp)
    return cfg, arch, build_model(cfg, arch)


class _SyncDetector(TorchDispatchMode):
    """Records host synchronisations: ops whose result depends on tensor data read on the host
    (`_local_scalar_dense` = `.item()`/`int()`/`float()`/`bool()`, `nonzero`, boolean-mask indexing,
    `masked_select`, `unique`, tensor-sized `repeat_interleave`) and, through patched methods, `.tolist()`,
    `.cpu()` and `.numpy()` (which on a CPU tensor do not dispatch)."""

    DATA_DEPENDENT = {"aten._local_scalar_dense", "aten.nonzero", "aten.masked_select", "aten._unique2",
                      "aten.unique_consecutive", "aten.unique_dim"}

    def __init__(self):
        super().__init__()
        self.events: list[str] = []

    def __torch_dispatch__(self, func, types_, args=(), kwargs=None):
        name = str(func.overloadpacket)
        if name in self.DATA_DEPENDENT:
            self.events.append(name)
        elif name == "aten.index" and any(isinstance(i, torch.Tensor) and i.dtype == torch.bool
                                          for i in (args[1] if len(args) > 1 else [])):
            self.events.append("boolean index")
        elif name == "aten.repeat_interleave" and isinstance(args[0], torch.Tensor) and len(args) > 1 \
                and isinstance(args[1], torch.Tensor):
            self.events.append(name)
        return func(*args, **(kwargs or {}))

    @contextlib.contextmanager
    def watching(self):
        saved = {m: getattr(torch.Tensor, m) for m in ("tolist", "cpu", "numpy")}

        def patched(m):
            def call(x, *a, **kw):
                self.events.append(f".{m}()")
                return saved[m](x, *a, **kw)
            return call

        for m in saved:
            setattr(torch.Tensor, m, patched(m))
        try:
            with self:
                yield self
        finally:
            for m, f in saved.items():
                setattr(torch.Tensor, m, f)


def _model_worker(rank, world_size, tmp):
    from dasd_megatron.parallel import destroy_parallel, initialize_parallel
    from dasd_megatron.config import RunConfig

    initialize_parallel(RunConfig().parallel)
    try:
        cfg, arch, model = _tiny_model(tmp)
        rs = _rollouts([17, 40, 9, 33, 25, 12])
        whole = pack(rs, list(range(len(rs))), teacher=False, rollout_ids=list(range(len(rs))), pad_multiple=8)
        weights = torch.linspace(-1, 1, 1000)

        def forward_backward(fast: bool, batched_attention: bool = True):
            import dataclasses

            import dasd_megatron.model.attention as attention

            packed.set_fast_path(fast)
            saved = attention.pack_info
            if not batched_attention:
                attention.pack_info = lambda _x: None
            try:
                b = dataclasses.replace(whole)
                model.zero_grad()
                out = model(b.tokens, b.position_ids, None, packed_seq_params=b.packed_seq_params())
                (out.float()[..., :1000] * weights).sum().backward()
            finally:
                attention.pack_info = saved
                packed.set_fast_path(True)
            return out.detach().clone(), [p.grad.clone() for p in model.parameters()]

        landed = forward_backward(False)
        fast = forward_backward(True)
        rope_only = forward_backward(True, batched_attention=False)
        res = {
            "rope_only_equal": torch.equal(rope_only[0], landed[0])
            and all(torch.equal(a, b) for a, b in zip(rope_only[1], landed[1])),
            "out_err": (fast[0] - landed[0]).abs().max().item() / landed[0].abs().max().item(),
            "grad_err": max(((a - b).abs().max() / b.abs().max().clamp(min=1e-30)).item()
                            for a, b in zip(fast[1], landed[1])),
        }
        # host syncs of one forward, fast path vs the landed path
        for fast_on in (True, False):
            import dataclasses

            packed.set_fast_path(fast_on)
            b = dataclasses.replace(whole)
            psp = b.packed_seq_params()  # built with the batch (at packing), outside the forward
            with torch.no_grad(), _SyncDetector().watching() as det:
                model(b.tokens, b.position_ids, None, packed_seq_params=psp)
            res[f"syncs_fast={fast_on}"] = det.events
        packed.set_fast_path(True)
        from dasd_megatron.model.builder import transformer_config

        res["fused"] = transformer_config(arch, cfg).dasd_fused_kernels
        return res
    finally:
        destroy_parallel()


def test_model_forward_fast_path_matches_landed_and_never_syncs(tmp_path):
    res = run_distributed(_model_worker, 1, str(tmp_path))[0]
    # RoPE over the pack: bit for bit megatron's per-document path (same values, same elementwise ops).
    assert res["rope_only_equal"]
    # Batched attention: the same softmax in other SDPA call shapes -> fp32 rounding only (eps 1.2e-7 times
    # a few layers' accumulation): 1e-5 relative to each tensor's largest entry.
    assert res["out_err"] < 1e-5 and res["grad_err"] < 1e-5, res
    assert res["syncs_fast=True"] == [], res["syncs_fast=True"]
    # The detector sees the landed path's syncs (megatron's thd RoPE, the attention's cu_seqlens read-back).
    assert len(res["syncs_fast=False"]) > 0
    assert res["fused"] == "torch"  # model.fused_kernels=auto on a CPU machine


class _OpCounter(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.n = 0

    def __torch_dispatch__(self, func, types_, args=(), kwargs=None):
        self.n += 1
        return func(*args, **(kwargs or {}))


def _step_ops_worker(rank, world_size, tmp, fast):
    from dasd_megatron.config import RunConfig
    from dasd_megatron.loss import grpo_advantages
    from dasd_megatron.parallel import destroy_parallel, initialize_parallel
    from dasd_megatron.train.dasd_step import DASDStep
    from dasd_megatron.train.engine import build_optimizer, wrap_ddp

    ctx = initialize_parallel(RunConfig().parallel)
    packed.set_fast_path(fast)
    try:
        cfg, arch, model = _tiny_model(tmp)
        ddp = wrap_ddp(model)
        step = DASDStep(ddp, build_optimizer(ddp, cfg.optim), cfg, arch, ctx)
        counts = {}
        for n_docs in (4, 32):
            rs = _rollouts([2048 // n_docs] * n_docs, prompt=16)  # the same 2048 tokens in 4 or 32 documents
            adv = grpo_advantages(torch.tensor([r.reward for r in rs]), torch.tensor([r.group for r in rs]))
            with _OpCounter() as c:
                step.run(rs, list(range(n_docs)), adv)
            counts[n_docs] = c.n
        return counts
    finally:
        packed.set_fast_path(True)
        destroy_parallel()


def test_step_op_count_does_not_grow_with_documents_per_pack(tmp_path):
    fast = run_distributed(_step_ops_worker, 1, str(tmp_path), True)[0]
    assert abs(fast[32] - fast[4]) <= 0.05 * fast[4], fast
    # The landed path launched ops per document (RoPE slices, one attention call per document): the test can fail.
    landed = run_distributed(_step_ops_worker, 1, str(tmp_path), False)[0]
    assert landed[32] > 1.3 * landed[4], landed
    assert fast[32] < landed[32]


def _fused_worker(rank, world_size, tmp):
    """The tiny model with model.fused_kernels=triton (Triton interpreter on CPU) against the torch path, same
    weights and pack."""
    import dataclasses

    from dasd_megatron import kernels
    from dasd_megatron.config import RunConfig, apply_overrides
    from dasd_megatron.parallel import destroy_parallel, initialize_parallel

    assert kernels.INTERPRETED
    initialize_parallel(RunConfig().parallel)
    try:
        cfg, arch, model = _tiny_model(tmp)
        from dasd_megatron.model.builder import build_model

        fused = build_model(apply_overrides(cfg, ["model.fused_kernels=triton"]), arch)
        fused.load_state_dict(model.state_dict())
        assert fused.config.dasd_fused_kernels == "triton" and fused.config.use_te_activation_func
        mlp = fused.decoder.layers[0].mlp
        assert type(mlp.activation_func).__name__ == "FusedSwiGLU"
        rs = _rollouts([11, 30, 7])
        whole = pack(rs, [0, 1, 2], teacher=False, rollout_ids=[0, 1, 2], pad_multiple=4)
        weights = torch.linspace(-1, 1, 1000)
        outs = []
        for m in (model, fused):
            b = dataclasses.replace(whole)
            m.zero_grad()
            out = m(b.tokens, b.position_ids, None, packed_seq_params=b.packed_seq_params())
            (out.float()[..., :1000] * weights).sum().backward()
            outs.append((out.detach(), [p.grad.clone() for p in m.parameters()]))
        (o0, g0), (o1, g1) = outs
        return {"out_err": ((o1 - o0).abs().max() / o0.abs().max()).item(),
                "grad_err": max(((a - b).abs().max() / b.abs().max().clamp(min=1e-30)).item()
                                for a, b in zip(g1, g0)),
                "disabled": dict(kernels.disabled_ops())}
    finally:
        destroy_parallel()


def test_fused_triton_kernels_in_the_model_match_the_torch_path(tmp_path, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # inherited by the spawned worker: the kernels run interpreted
    res = run_distributed(_fused_worker, 1, str(tmp_path))[0]
    assert res["disabled"] == {}  # no kernel fell back to torch
    # fp32: the fused kernels reorder fp32 sums (RMSNorm's mean, dw over rows): ~1e-6 relative per op, a few
    # layers deep -> 1e-5 relative to each tensor's largest entry.
    assert res["out_err"] < 1e-5 and res["grad_err"] < 1e-5, res
