"""SDPACoreAttention against an independent float64 reference: causal, GQA, masks, packed thd, CP=2 (gloo).

Reference: naive softmax(Q K^T * scale + mask) V in float64, written here, with per-document loops for packed
sequences. CP layout slices come from megatron's own `get_batch_on_this_cp_rank` (sbhd) and a hand-written
per-document zig-zag split (thd), not from the module under test.

Megatron's local DotProductAttention cannot run forward on a CPU-only torch without patching megatron
(its forward takes a buffer from `parallel_state.get_global_memory_buffer()`, allocated on
`torch.cuda.current_device()`, forks the CUDA RNG tracker, and builds the default causal mask with
device="cuda"), so on CPU we check constructor/signature/shape parity with it and compare values against
the float64 reference; the `gpu`-marked test compares values with megatron's DotProductAttention and with
a whole SelfAttention from `get_gpt_layer_local_spec` on CUDA.
"""

from __future__ import annotations

import inspect
import math
import types

import pytest
import torch
import torch.distributed as dist

from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.transformer.dot_product_attention import DotProductAttention
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.transformer_config import TransformerConfig

from dasd_megatron.model.attention import SDPACoreAttention, sdpa
from dasd_megatron.testing.distributed import run_distributed

NP, NG, HN = 4, 2, 8  # query heads, query groups (GQA 2:1), head dim

# Tolerances (absolute, on outputs and grads of O(1) magnitude):
# - float64: both sides compute in float64; only summation order differs -> ~1e-15, allow 1e-10.
# - float32: SDPA in fp32 vs float64 reference; fp32 eps 1.2e-7 times sums over S<=32 keys and
#   d=8 features -> ~1e-6, allow 2e-5.
# - bfloat16: inputs are rounded to bf16 before both computations, then the module's output and grads are
#   rounded to bf16 (eps 7.8e-3 relative) and its softmax-weighted sums of O(1) values -> allow 3e-2.
TOL = {torch.float64: 1e-10, torch.float32: 2e-5, torch.bfloat16: 3e-2}


def make_config(cp: int = 1, **overrides) -> TransformerConfig:
    kw = dict(
        num_layers=1,
        hidden_size=NP * HN,
        num_attention_heads=NP,
        num_query_groups=NG,
        kv_channels=HN,
        use_cpu_initialization=True,
        context_parallel_size=cp,
        attention_dropout=0.0,  # TransformerConfig's default is 0.1; our training uses 0
    )
    kw.update(overrides)
    return TransformerConfig(**kw)


def make_attn(cp: int = 1, cp_group=None, mask_type=AttnMaskType.causal, **cfg) -> SDPACoreAttention:
    pg = None if cp_group is None else types.SimpleNamespace(cp=cp_group)
    return SDPACoreAttention(make_config(cp, **cfg), 1, mask_type, "self", pg_collection=pg)


# ------------------------------------------------------------------ reference (float64, naive)


def ref_attention(q, k, v, causal=True, masked=None):
    """q [sq, b, np, d], k/v [sk, b, ng, d] -> [sq, b, np*d]; `masked` (True = masked out) [.., sq, sk]."""
    q, k, v = q.double(), k.double(), v.double()
    rep = q.size(2) // k.size(2)
    k = k.repeat_interleave(rep, dim=2)
    v = v.repeat_interleave(rep, dim=2)
    scores = torch.einsum("qbhd,kbhd->bhqk", q, k) / math.sqrt(q.size(-1))
    sq, sk = q.size(0), k.size(0)
    allowed = torch.ones(sq, sk, dtype=torch.bool)
    if causal:
        allowed = allowed.tril(sk - sq)
    if masked is not None:
        allowed = allowed & ~masked
    scores = scores.masked_fill(~allowed, float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    out = torch.einsum("bhqk,kbhd->qbhd", probs, v)
    return out.reshape(sq, q.size(1), -1)


def ref_thd(q, k, v, cu, cu_pad=None, causal=True):
    """Packed q [t, np, d]; doc i = cu[i+1]-cu[i] tokens at cu_pad[i]; padding outputs are zero."""
    cu_pad = cu if cu_pad is None else cu_pad
    out = torch.zeros(q.size(0), q.size(1) * v.size(-1), dtype=torch.float64)
    pieces = []
    pos = 0
    for i in range(len(cu) - 1):
        s, n = cu_pad[i], cu[i + 1] - cu[i]
        pieces.append(out[pos:s])
        o = ref_attention(q[s:s + n, None], k[s:s + n, None], v[s:s + n, None], causal=causal)[:, 0]
        pieces.append(o)
        pos = s + n
    pieces.append(out[pos:])
    return torch.cat(pieces)


def rand(*shape, dtype=torch.float64, gen=None):
    return torch.randn(*shape, generator=gen, dtype=torch.float64).to(dtype)


def run_with_grads(fn, q, k, v, dout):
    q, k, v = (x.detach().clone().requires_grad_(True) for x in (q, k, v))
    out = fn(q, k, v)
    out.backward(dout.to(out.dtype))
    return out.detach(), q.grad, k.grad, v.grad


def assert_close(actual, expected, tol, what):
    actual = actual.double()
    err = (actual - expected).abs().max().item() if actual.numel() else 0.0
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    assert err <= tol, f"{what}: max abs error {err:.3g} > {tol:.3g}"


# ------------------------------------------------------------------ single process


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_causal_gqa_batch_matches_reference(dtype):
    g = torch.Generator().manual_seed(0)
    sq, b = 12, 3
    q, k, v = rand(sq, b, NP, HN, dtype=dtype, gen=g), rand(sq, b, NG, HN, dtype=dtype, gen=g), rand(sq, b, NG, HN, dtype=dtype, gen=g)
    dout = rand(sq, b, NP * HN, gen=g)
    attn = make_attn()
    got = run_with_grads(lambda q, k, v: attn(q, k, v, None), q, k, v, dout)
    ref = run_with_grads(lambda q, k, v: ref_attention(q, k, v), q.double(), k.double(), v.double(), dout)
    assert got[0].dtype == dtype and got[0].shape == (sq, b, NP * HN)
    for name, a, e in zip(("out", "dq", "dk", "dv"), got, ref):
        assert_close(a, e, TOL[dtype], f"{dtype} {name}")


def test_mask_types_and_explicit_masks():
    g = torch.Generator().manual_seed(1)
    sq, b = 10, 2
    q, k, v = rand(sq, b, NP, HN, gen=g), rand(sq, b, NG, HN, gen=g), rand(sq, b, NG, HN, gen=g)
    dout = rand(sq, b, NP * HN, gen=g)
    tol = TOL[torch.float64]
    # no_mask: full bidirectional attention
    attn = make_attn(mask_type=AttnMaskType.no_mask)
    got = run_with_grads(lambda q, k, v: attn(q, k, v, None), q, k, v, dout)
    ref = run_with_grads(lambda q, k, v: ref_attention(q, k, v, causal=False), q, k, v, dout)
    for name, a, e in zip(("out", "dq", "dk", "dv"), got, ref):
        assert_close(a, e, tol, f"no_mask {name}")
    # padding mask (megatron convention, True = masked), [b, 1, sq, sk], with padding_causal and padding
    masked = torch.zeros(b, 1, sq, sq, dtype=torch.bool)
    masked[0, :, :, 7:] = True  # sequence 0: last 3 keys are padding
    for mt, causal in ((AttnMaskType.padding_causal, True), (AttnMaskType.padding, False)):
        attn = make_attn(mask_type=mt)
        got = run_with_grads(lambda q, k, v: attn(q, k, v, masked), q, k, v, dout)
        ref = run_with_grads(lambda q, k, v: ref_attention(q, k, v, causal=causal, masked=masked), q, k, v, dout)
        for name, a, e in zip(("out", "dq", "dk", "dv"), got, ref):
            assert_close(a, e, tol, f"{mt.name} {name}")
    # the forward's attn_mask_type overrides the constructor's (as in TE's attention)
    out = make_attn(mask_type=AttnMaskType.causal)(q, k, v, None, attn_mask_type=AttnMaskType.no_mask)
    assert_close(out, ref_attention(q, k, v, causal=False), tol, "override")
    # a row with every key masked: uniform over all keys like megatron's masked_fill(-10000), never NaN
    all_masked = torch.zeros(1, 1, sq, sq, dtype=torch.bool)
    all_masked[..., 0, :] = True
    out, dq, dk, dv = run_with_grads(
        lambda q, k, v: make_attn(mask_type=AttnMaskType.padding)(q, k, v, all_masked), q, k, v, dout
    )
    assert torch.isfinite(out).all() and torch.isfinite(dk).all() and torch.isfinite(dv).all()
    vr = v.repeat_interleave(NP // NG, dim=2)
    assert_close(out[0], vr.mean(0).reshape(b, -1), tol, "fully masked row")
    assert dq[0].abs().max() == 0


def _pack(lens, pad=None, tail=0, gen=None):
    pad = lens if pad is None else pad
    cu = [0]
    cu_pad = [0]
    for n, p in zip(lens, pad):
        cu.append(cu[-1] + n)
        cu_pad.append(cu_pad[-1] + p)
    t = cu_pad[-1] + tail
    q, k, v = rand(t, NP, HN, gen=gen), rand(t, NG, HN, gen=gen), rand(t, NG, HN, gen=gen)
    return cu, cu_pad, q, k, v


def _psp(cu, cu_pad=None):
    i32 = lambda x: torch.tensor(x, dtype=torch.int32)  # noqa: E731
    kw = dict(qkv_format="thd", cu_seqlens_q=i32(cu), cu_seqlens_kv=i32(cu), max_seqlen_q=max(
        b - a for a, b in zip(cu[:-1], cu[1:])), max_seqlen_kv=max(b - a for a, b in zip(cu[:-1], cu[1:])))
    if cu_pad is not None:
        kw.update(cu_seqlens_q_padded=i32(cu_pad), cu_seqlens_kv_padded=i32(cu_pad))
    return PackedSeqParams(**kw)


def test_packed_thd_three_documents():
    g = torch.Generator().manual_seed(2)
    lens = [5, 9, 3]
    cu, _, q, k, v = _pack(lens, gen=g)
    t = cu[-1]
    dout = rand(t, NP * HN, gen=g)
    psp = _psp(cu)
    attn = make_attn()
    got = run_with_grads(lambda q, k, v: attn(q, k, v, None, packed_seq_params=psp), q, k, v, dout)
    ref = run_with_grads(lambda q, k, v: ref_thd(q, k, v, cu), q, k, v, dout)
    assert got[0].shape == (t, NP * HN)  # [t, np*hn]; megatron's Attention reshapes to [t, 1, np*hn]
    for name, a, e in zip(("out", "dq", "dk", "dv"), got, ref):
        assert_close(a, e, TOL[torch.float64], f"thd {name}")
    # no attention across documents: changing doc 0's tokens leaves docs 1 and 2 bit-identical
    q2, k2, v2 = q.clone(), k.clone(), v.clone()
    for x in (q2, k2, v2):
        x[: cu[1]] += 5.0
    out2 = attn(q2, k2, v2, None, packed_seq_params=psp)
    assert torch.equal(out2[cu[1]:], got[0][cu[1]:])
    assert not torch.allclose(out2[: cu[1]], got[0][: cu[1]])
    # ... while plain causal attention over the whole pack would differ there (the test can see a leak)
    leak = ref_attention(q[:, None], k[:, None], v[:, None])[:, 0]
    assert not torch.allclose(leak[cu[1]:], got[0][cu[1]:])
    # [t, 1, np, hn] input (unsqueezed batch) -> [t, 1, np*hn]
    out4 = attn(q[:, None], k[:, None], v[:, None], None, packed_seq_params=psp)
    assert out4.shape == (t, 1, NP * HN) and torch.equal(out4[:, 0], got[0])


def test_packed_thd_padded_documents():
    g = torch.Generator().manual_seed(3)
    lens, pad = [5, 9, 3], [8, 12, 4]
    cu, cu_pad, q, k, v = _pack(lens, pad, tail=2, gen=g)
    t = q.size(0)
    dout = rand(t, NP * HN, gen=g)
    psp = _psp(cu, cu_pad)
    attn = make_attn()
    got = run_with_grads(lambda q, k, v: attn(q, k, v, None, packed_seq_params=psp), q, k, v, dout)
    ref = run_with_grads(lambda q, k, v: ref_thd(q, k, v, cu, cu_pad), q, k, v, dout)
    for name, a, e in zip(("out", "dq", "dk", "dv"), got, ref):
        assert_close(a, e, TOL[torch.float64], f"thd padded {name}")
    pad_rows = torch.ones(t, dtype=torch.bool)
    for s, n in zip(cu_pad[:-1], lens):
        pad_rows[s:s + n] = False
    assert got[0][pad_rows].abs().max() == 0  # padding tokens: zero output ...
    for grad in got[1:]:
        assert grad[pad_rows].abs().max() == 0  # ... and no gradient


def test_constructor_forward_signature_and_shape_parity_with_megatron():
    cfg = make_config()
    pg = types.SimpleNamespace(tp=types.SimpleNamespace(size=lambda: 1, rank=lambda: 0))
    kwargs = dict(
        config=cfg, layer_number=1, attn_mask_type=AttnMaskType.causal, attention_type="self",
        attention_dropout=None, softmax_scale=None, cp_comm_type="p2p", pg_collection=pg,
    )
    theirs = DotProductAttention(**kwargs)
    ours = SDPACoreAttention(**kwargs)
    assert ours.softmax_scale == pytest.approx(theirs.softmax_scale)
    assert ours.attention_dropout_p == theirs.attention_dropout.p
    for name in ("__init__", "forward"):
        mine = inspect.signature(getattr(SDPACoreAttention, name)).parameters
        for p in inspect.signature(getattr(DotProductAttention, name)).parameters.values():
            assert p.name in mine and mine[p.name].default == p.default, (name, p.name)
    # MLA-style k/v channels and extra kwargs from newer megatron are accepted
    SDPACoreAttention(**kwargs, k_channels=HN, v_channels=HN, num_splits=None)
    with pytest.warns(UserWarning, match="ignores"):
        SDPACoreAttention(**kwargs, some_future_option=3)
    # Same output layout as DotProductAttention: [sq, b, np*hn] (hidden_size_per_partition).
    q, k, v = rand(6, 2, NP, HN), rand(6, 2, NG, HN), rand(6, 2, NG, HN)
    assert ours(q, k, v, None).shape == (6, 2, theirs.hidden_size_per_partition)
    # with megatron's own causal mask (True = masked) the result is the same as with the causal type alone
    causal_mask = torch.triu(torch.ones(6, 6, dtype=torch.bool), 1)[None, None]
    assert_close(ours(q, k, v, causal_mask), ours(q, k, v, None).double(), 1e-12, "mask == causal type")
    # apply_query_key_layer_scaling is accepted (same softmax in megatron: scale/coeff, then *coeff)
    cfg2 = make_config(apply_query_key_layer_scaling=True, fp16=True, params_dtype=torch.float16)
    assert SDPACoreAttention(cfg2, 3, AttnMaskType.causal, "self").softmax_scale == pytest.approx(1 / math.sqrt(HN))


def test_unsupported_features_fail_clearly():
    with pytest.raises(NotImplementedError, match="window_size"):
        make_attn(window_size=(4, 0))
    with pytest.raises(NotImplementedError, match="softmax_type"):
        make_attn(softmax_type="off-by-one")
    attn = make_attn()
    q, k, v = rand(4, 1, NP, HN), rand(4, 1, NG, HN), rand(4, 1, NG, HN)
    with pytest.raises(NotImplementedError, match="attention_bias"):
        attn(q, k, v, None, attention_bias=torch.zeros(1))
    with pytest.raises(TypeError, match="boolean"):
        attn(q, k, v, torch.zeros(1, 1, 4, 4))
    with pytest.raises(ValueError, match="needs an attention_mask"):
        make_attn(mask_type=AttnMaskType.padding)(q, k, v, None)
    # config says CP=2 but no CP group exists in this process
    with pytest.raises(ValueError, match="context_parallel_size=2"):
        make_attn(cp=2)(q, k, v, None)


# ------------------------------------------------------------------ context parallel (gloo, 2 ranks)

S_CP, B_CP = 16, 2


def _full_inputs(seed):
    g = torch.Generator().manual_seed(seed)
    q, k, v = rand(S_CP, B_CP, NP, HN, gen=g), rand(S_CP, B_CP, NG, HN, gen=g), rand(S_CP, B_CP, NG, HN, gen=g)
    dout = rand(S_CP, B_CP, NP * HN, gen=g)
    masked = torch.triu(torch.ones(S_CP, S_CP, dtype=torch.bool), 1).expand(B_CP, 1, S_CP, S_CP).clone()
    masked[1, :, :, 12:] = True  # sequence 1: last 4 keys are padding
    return q, k, v, dout, masked


def _cp_split_sbhd(rank, world_size, tensors):
    """megatron's own zig-zag split (seq dim 1 for [b, s, ...]; dim 2 for the attention mask)."""
    from megatron.core.utils import get_batch_on_this_cp_rank

    q, k, v, dout, masked = tensors
    batch = {
        "q": q.transpose(0, 1).contiguous(), "k": k.transpose(0, 1).contiguous(),
        "v": v.transpose(0, 1).contiguous(), "dout": dout.transpose(0, 1).contiguous(),
        "attention_mask": masked,
    }
    extra = {}
    if "is_hybrid_cp" in inspect.signature(get_batch_on_this_cp_rank).parameters:  # megatron-core >= 0.17
        extra["is_hybrid_cp"] = False
    batch = get_batch_on_this_cp_rank(batch, cp_group=dist.group.WORLD, **extra)
    return [batch[n].transpose(0, 1) for n in ("q", "k", "v", "dout")] + [batch["attention_mask"]]


def _cp_sbhd_worker(rank, world_size, seed):
    q, k, v, dout, masked = _cp_split_sbhd(rank, world_size, _full_inputs(seed))
    results = {}
    for name, mask_type, mask in (
        ("causal", AttnMaskType.causal, None),
        ("padding_causal", AttnMaskType.padding_causal, masked),
        ("no_mask", AttnMaskType.no_mask, None),
    ):
        attn = make_attn(cp=world_size, cp_group=dist.group.WORLD, mask_type=mask_type)
        results[name] = run_with_grads(lambda q, k, v: attn(q, k, v, mask), q, k, v, dout)
    return results


def test_cp2_sbhd_matches_full_sequence_reference():
    seed = 4
    per_rank = run_distributed(_cp_sbhd_worker, 2, seed)
    q, k, v, dout, masked = _full_inputs(seed)
    refs = {
        "causal": run_with_grads(lambda q, k, v: ref_attention(q, k, v), q, k, v, dout),
        "padding_causal": run_with_grads(lambda q, k, v: ref_attention(q, k, v, masked=masked), q, k, v, dout),
        "no_mask": run_with_grads(lambda q, k, v: ref_attention(q, k, v, causal=False), q, k, v, dout),
    }
    c = S_CP // 4
    for rank, res in enumerate(per_rank):
        rows = torch.cat([torch.arange(rank * c, (rank + 1) * c), torch.arange((3 - rank) * c, (4 - rank) * c)])
        for case, ref in refs.items():
            for name, a, e in zip(("out", "dq", "dk", "dv"), res[case], ref):
                assert_close(a, e[rows], TOL[torch.float64], f"CP rank {rank} {case} {name}")


# packed documents under CP=2: real lengths and lengths padded to a multiple of 2*cp = 4
CP_LENS, CP_PAD = [5, 11, 3], [8, 12, 4]


def _cp_thd_local_rows(rank, cp, cu_pad):
    """Hand-written per-document zig-zag split (TE's thd_get_partitioned_indices layout)."""
    rows = []
    for s, e in zip(cu_pad[:-1], cu_pad[1:]):
        c = (e - s) // (2 * cp)
        for chunk in (rank, 2 * cp - 1 - rank):
            rows.append(torch.arange(s + chunk * c, s + (chunk + 1) * c))
    return torch.cat(rows)


def _cp_thd_worker(rank, world_size, seed, registered=False):
    g = torch.Generator().manual_seed(seed)
    cu, cu_pad, q, k, v = _pack(CP_LENS, CP_PAD, gen=g)
    dout = rand(q.size(0), NP * HN, gen=g)
    rows = _cp_thd_local_rows(rank, world_size, cu_pad)
    attn = make_attn(cp=world_size, cp_group=dist.group.WORLD)
    psp = _psp(cu, cu_pad)  # global cu_seqlens, as megatron/TE pass them under CP
    if registered:  # the trainer's packs: host-side layout, batched attention (model/packed.py)
        from dasd_megatron.model import packed

        psp = packed.packed_seq_params(cu_seqlens=psp.cu_seqlens_q, cu_seqlens_padded=psp.cu_seqlens_q_padded,
                                       max_seqlen=psp.max_seqlen_q, host_cu=cu, host_cu_pad=cu_pad,
                                       position_ids=torch.zeros(len(rows), dtype=torch.long), cp=world_size)
    return run_with_grads(
        lambda q, k, v: attn(q, k, v, None, packed_seq_params=psp), q[rows], k[rows], v[rows], dout[rows]
    )


@pytest.mark.parametrize("registered", [False, True], ids=["per_document", "batched"])
def test_cp2_packed_thd_matches_full_reference(registered):
    seed = 5
    per_rank = run_distributed(_cp_thd_worker, 2, seed, registered)
    g = torch.Generator().manual_seed(seed)
    cu, cu_pad, q, k, v = _pack(CP_LENS, CP_PAD, gen=g)
    dout = rand(q.size(0), NP * HN, gen=g)
    ref = run_with_grads(lambda q, k, v: ref_thd(q, k, v, cu, cu_pad), q, k, v, dout)
    for rank, res in enumerate(per_rank):
        rows = _cp_thd_local_rows(rank, 2, cu_pad)
        for name, a, e in zip(("out", "dq", "dk", "dv"), res, ref):
            assert_close(a, e[rows], TOL[torch.float64], f"CP thd rank {rank} {name}")


# ------------------------------------------------------------------ CUDA (flash/efficient kernels, megatron parity)


def _megatron_parity_worker(rank, world_size):
    from megatron.core import parallel_state, tensor_parallel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer.spec_utils import build_module

    parallel_state.initialize_model_parallel()
    tensor_parallel.model_parallel_cuda_manual_seed(1234)
    report = {}
    dev = torch.device("cuda")
    # fp32: megatron's baddbmm/softmax vs SDPA's fused kernel, both fp32 -> ~1e-6; allow 1e-4.
    # bf16: megatron rounds scores and probabilities to bf16, flash keeps them in fp32 -> ~1e-2; allow 3e-2.
    for dtype, tol in ((torch.float32, 1e-4), (torch.bfloat16, 3e-2)):
        cfg = make_config(bf16=dtype == torch.bfloat16, params_dtype=dtype, use_cpu_initialization=False)
        g = torch.Generator().manual_seed(7)
        s, b = 64, 2
        q, k, v = (rand(s, b, h, HN, gen=g).to(dev, dtype) for h in (NP, NG, NG))
        dout = rand(s, b, NP * HN, gen=g).to(dev, dtype)
        theirs = DotProductAttention(cfg, 1, AttnMaskType.causal, "self")
        ours = SDPACoreAttention(cfg, 1, AttnMaskType.causal, "self")
        a = run_with_grads(lambda q, k, v: theirs(q, k, v, None), q, k, v, dout)
        o = run_with_grads(lambda q, k, v: ours(q, k, v, None), q, k, v, dout)
        for name, x, y in zip(("out", "dq", "dk", "dv"), o, a):
            # relative to the largest entry: bf16 grads of K/V sum over many queries and exceed 1
            err = ((x.double() - y.double()).abs().max() / y.double().abs().max().clamp_min(1)).item()
            report[f"DotProductAttention {dtype} {name}"] = err
            assert x.shape == y.shape and err <= tol, (dtype, name, err)
        # a whole SelfAttention from the local spec, core_attention swapped, same weights
        spec = get_gpt_layer_local_spec()
        attn_spec = spec.submodules.self_attention
        ref_layer = build_module(attn_spec, config=cfg, layer_number=1).to(dev)
        attn_spec.submodules.core_attention = SDPACoreAttention
        our_layer = build_module(attn_spec, config=cfg, layer_number=1).to(dev)
        assert isinstance(our_layer.core_attention, SDPACoreAttention)
        our_layer.load_state_dict(ref_layer.state_dict())
        x = rand(s, b, NP * HN, gen=g).to(dev, dtype)
        y_ref, _ = ref_layer(x, attention_mask=None)
        y_our, _ = our_layer(x, attention_mask=None)
        err = ((y_ref.double() - y_our.double()).abs().max() / y_ref.double().abs().max().clamp_min(1)).item()
        report[f"SelfAttention (local spec) {dtype}"] = err
        assert y_ref.shape == y_our.shape and err <= tol, (dtype, err)
    return report


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_parity_with_megatron_and_kernels():
    # SDPA alone on CUDA, bf16 (flash) against float64: causal square, bottom-right causal with GQA (the CP path)
    g = torch.Generator().manual_seed(8)
    for L, S in ((128, 128), (32, 96)):
        q, k, v = rand(2, NP, L, 64, gen=g), rand(2, NG, S, 64, gen=g), rand(2, NG, S, 64, gen=g)
        qc, kc, vc = (x.cuda().bfloat16() for x in (q, k, v))
        out = sdpa(qc, kc, vc, causal=True, allowed=None, scale=0.125, dropout_p=0.0)
        ref = ref_attention(*(x.permute(2, 0, 1, 3) for x in (qc.double().cpu(), kc.double().cpu(), vc.double().cpu())))
        assert_close(out.permute(2, 0, 1, 3).reshape(L, 2, -1).cpu(), ref, 3e-2, f"cuda sdpa L={L} S={S}")
    # packed thd on CUDA bf16: the varlen flash path and the per-document loop, padding and a tail included
    from dasd_megatron.model import attention as attention_mod

    print(f"varlen_attn available: {attention_mod._varlen_attn is not None}, params {sorted(attention_mod._VARLEN_PARAMS)}")
    lens, pad = [300, 517, 64, 1], [304, 520, 64, 8]
    cu, cu_pad, q, k, v = _pack(lens, pad, tail=8, gen=g)
    q, k, v = (x.bfloat16().double() for x in (q, k, v))  # the reference sees the same rounded inputs
    dout = rand(q.size(0), NP * HN, gen=g)
    ref = run_with_grads(lambda q, k, v: ref_thd(q, k, v, cu, cu_pad), q, k, v, dout)
    psp = _psp(cu, cu_pad)
    pad_rows = torch.ones(q.size(0), dtype=torch.bool)
    for s0, n in zip(cu_pad[:-1], lens):
        pad_rows[s0:s0 + n] = False
    for use_varlen in (True, False):
        attn = make_attn().cuda()
        attn.use_varlen = use_varlen
        got = run_with_grads(
            lambda q, k, v: attn(q, k, v, None, packed_seq_params=psp),
            *(x.cuda().bfloat16() for x in (q, k, v)), dout.cuda(),
        )
        for name, a, e in zip(("out", "dq", "dk", "dv"), got, ref):
            err = ((a.double().cpu() - e).abs().max() / e.abs().max().clamp_min(1)).item()
            print(f"thd cuda bf16 use_varlen={use_varlen} {name}: max error {err:.3g}")
            assert err <= 3e-2, (use_varlen, name, err)
            assert a[pad_rows.cuda()].abs().max() == 0, (use_varlen, name, "padding not zero")
    (report,) = run_distributed(_megatron_parity_worker, 1)
    for name, err in report.items():
        print(f"{name}: max error {err:.3g}")
