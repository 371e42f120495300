"""Model building: families (Qwen2 bias, Llama tied), packed sequences, spec selection, TP parity per family."""

from __future__ import annotations

import json
import os

import pytest
import torch
import torch.distributed as dist

from dasd_megatron.testing.distributed import run_distributed


def _write_hf(tmp, model_type, **kw):
    from dasd_megatron.model.hf_config import tiny_config

    d = os.path.join(tmp, model_type)
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, "config.json"), "w") as f:
        json.dump(tiny_config(model_type, **kw), f)
    return d


def _cfg(hf_dir, tp=1, seq=32, backend="sdpa"):
    from dasd_megatron.config import ModelConfig, ParallelConfig, RunConfig

    return RunConfig(model=ModelConfig(hf_config=hf_dir, seq_length=seq, attention_backend=backend),
                     parallel=ParallelConfig(tensor=tp))


def _packed_vs_separate(rank, world_size, hf_dir):
    from megatron.core.packed_seq_params import PackedSeqParams

    from dasd_megatron.model.builder import build_model
    from dasd_megatron.model.hf_config import load_hf_architecture
    from dasd_megatron.parallel import initialize_parallel

    cfg = _cfg(hf_dir)
    arch = load_hf_architecture(hf_dir)
    initialize_parallel(cfg.parallel)
    model = build_model(cfg, arch).eval()
    lens = [5, 9, 3]
    g = torch.Generator().manual_seed(1)
    docs = [torch.randint(0, arch.vocab_size, (n,), generator=g) for n in lens]
    separate = [model(d[None], torch.arange(len(d))[None], None)[0] for d in docs]
    cu = torch.tensor([0, 5, 14, 17], dtype=torch.int32)
    psp = PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu, max_seqlen_q=9, max_seqlen_kv=9)
    packed_ids = torch.cat(docs)[None]
    pos = torch.cat([torch.arange(n) for n in lens])[None]
    packed = model(packed_ids, pos, None, packed_seq_params=psp)[0]
    return torch.cat(separate), packed


def test_packed_sequences_equal_separate_forwards(tmp_path):
    """Three documents packed into one row (thd) give each document's own logits: no cross-document attention,
    RoPE positions restart per document. fp32, same kernels: only summation order differs -> atol 1e-5."""
    hf = _write_hf(str(tmp_path), "qwen3")
    separate, packed = run_distributed(_packed_vs_separate, 1, hf)[0]
    assert packed.shape == separate.shape
    torch.testing.assert_close(packed, separate, atol=1e-5, rtol=0)


def _tp_family(rank, world_size, hf_dirs, ckpt_root):
    """Reference at TP=1 (every rank computes it, DP=2), saved; then TP=2 loads it; logits and grads compared."""
    from megatron.core import parallel_state as ps

    from dasd_megatron.model.builder import build_model
    from dasd_megatron.model.hf_config import load_hf_architecture
    from dasd_megatron.model.sharding import full_named_tensors
    from dasd_megatron.parallel import initialize_parallel
    from dasd_megatron.train.checkpoint import load_model, save_model

    out = {}
    for hf_dir in hf_dirs:
        arch = load_hf_architecture(hf_dir)
        g = torch.Generator().manual_seed(2)
        tokens = torch.randint(0, arch.vocab_size, (2, 16), generator=g)
        pos = torch.arange(16).unsqueeze(0).expand(2, -1)
        res = {}
        ckpt = os.path.join(ckpt_root, os.path.basename(hf_dir))
        for tp in (1, 2):
            cfg = _cfg(hf_dir, tp=tp)
            ctx = initialize_parallel(cfg.parallel)
            model = build_model(cfg, arch)
            if tp == 1:
                save_model(model, ckpt)
            else:
                load_model(model, ckpt)
            logits = model(tokens, pos, None)
            # loss over the true vocabulary only (padding columns are never targets)
            vlocal = logits.shape[-1]
            cols = torch.arange(ctx.tp_rank * vlocal, (ctx.tp_rank + 1) * vlocal)
            w = torch.sin(cols.float())[None, None] * (cols < arch.vocab_size)
            (logits * w).sum().backward()
            full = logits.detach()
            if tp > 1:
                parts = [torch.empty_like(full) for _ in range(tp)]
                dist.all_gather(parts, full, group=ctx.tp_group)
                full = torch.cat(parts, -1)
            res[tp] = (full[..., : arch.vocab_size], full_named_tensors(model, grads=True))
            ps.destroy_model_parallel()
        out[os.path.basename(hf_dir)] = res
    return out


def test_tp2_matches_tp1_for_qwen2_bias_and_llama_tied(tmp_path):
    """TP=2 vs TP=1 logits and grads for Qwen2 (QKV bias) and Llama (tied embeddings, no QK-norm). fp32: only the
    order of partial sums differs -> logits atol 2e-5, grads rtol 1e-4 (+1e-6 of the largest grad)."""
    dirs = [_write_hf(str(tmp_path), "qwen2"), _write_hf(str(tmp_path), "llama", tie_word_embeddings=True)]
    results = run_distributed(_tp_family, 2, dirs, str(tmp_path / "ckpt"))
    for fam, res in results[0].items():
        (l1, g1), (l2, g2) = res[1], res[2]
        torch.testing.assert_close(l2, l1, atol=2e-5, rtol=0, msg=lambda m: f"{fam} logits: {m}")
        assert set(g1) == set(g2)
        if fam == "llama":
            assert "output_layer.weight" not in g1  # tied
        else:
            assert any(k.endswith("linear_qkv.bias") for k in g1)
        for k in g1:
            scale = g1[k].abs().max().item()
            assert scale > 0, f"{fam} {k}: zero reference grad"
            torch.testing.assert_close(g2[k], g1[k], rtol=1e-4, atol=1e-6 * max(scale, 1.0),
                                       msg=lambda m: f"{fam} grad {k}: {m}")


def test_backend_selection_on_cpu(caplog):
    from dasd_megatron.model.specs import layer_spec, resolve_backend, transformer_engine_available

    assert transformer_engine_available() is False  # no CUDA here
    assert resolve_backend("auto") == "sdpa"
    assert resolve_backend("local") == "local"
    from dasd_megatron.model.attention import SDPACoreAttention

    spec = layer_spec("sdpa", qk_layernorm=True)
    assert spec.submodules.self_attention.submodules.core_attention is SDPACoreAttention
    local = layer_spec("local", qk_layernorm=False)
    assert local.submodules.self_attention.submodules.core_attention is not SDPACoreAttention
    with pytest.raises(ValueError, match="unknown attention backend"):
        layer_spec("flash", qk_layernorm=False)


def test_transformer_config_carries_fp8_fields():
    """FP8 reaches megatron through TransformerConfig's fp8 fields (TE consumes them on GPU)."""
    from dasd_megatron.config import ModelConfig, PrecisionConfig, RunConfig
    from dasd_megatron.model.builder import transformer_config
    from dasd_megatron.model.hf_config import architecture_from_dict, tiny_config

    cfg = RunConfig(model=ModelConfig(hf_config="x"), precision=PrecisionConfig(
        params_dtype="bfloat16", fp8="hybrid", fp8_recipe="delayed", fp8_amax_history_len=16))
    tc = transformer_config(architecture_from_dict(tiny_config("qwen3")), cfg)
    assert tc.fp8 == "hybrid" and tc.fp8_amax_history_len == 16 and tc.bf16 and tc.params_dtype == torch.bfloat16
    assert tc.qk_layernorm and tc.num_query_groups == 2 and tc.kv_channels == 16 and tc.gated_linear_unit
