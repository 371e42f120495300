"""Logits parity with transformers for imported tiny Qwen2, Qwen3 and Llama models at TP=1 and TP=2 (fp32).

The HF model is transformers' own class loaded from the original folder; the megatron model is built from the same
config.json, loaded from the imported dist checkpoint and run with `model(ids, positions, None)`; its vocabulary-
parallel logits are gathered over TP with a real all_gather and the padding columns are dropped.

Tolerance (fp32): both sides compute the same function; they differ only in the order of floating-point sums (one
fused QKV / gate-up GEMM vs separate ones, TP-split reductions, SDPA kernels, RoPE tables computed in a different
order). With 4 layers, sums of length <= 128 and activations O(1), the accumulated rounding is a few 1e-7 relative
to the largest logit; we allow 1e-5 of it, still >1000x below the O(|logit|) error of any mapping mistake (a
swapped head, K/V, gate/up or a misplaced norm), which the round-trip test cannot see because import and export
would be wrong symmetrically.
"""

from __future__ import annotations

import pytest
import torch

from dasd_megatron.testing.distributed import run_distributed
from hf_fixtures import FAMILIES, hf_logits, make_tiny_hf, megatron_logits

B, S = 2, 24
REL_TOL = 1e-5


def _tokens(vocab: int) -> torch.Tensor:
    return torch.randint(0, vocab, (B, S), generator=torch.Generator().manual_seed(0))


def _vocab(root: str, family: str) -> int:
    from dasd_megatron.model.hf_config import load_hf_architecture

    return load_hf_architecture(f"{root}/{family}/hf").vocab_size


def _import_and_run_tp1(rank, world_size, root):
    from dasd_megatron.model.convert import run_import

    out = {}
    for fam in FAMILIES:
        run_import(f"{root}/{fam}/hf", f"{root}/{fam}/ckpt")
        out[fam] = megatron_logits(f"{root}/{fam}/ckpt", _tokens(_vocab(root, fam)), tp=1)
    return out


def _run_tp2(rank, world_size, root):
    return {fam: megatron_logits(f"{root}/{fam}/ckpt", _tokens(_vocab(root, fam)), tp=2) for fam in FAMILIES}


@pytest.fixture(scope="module")
def logits(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("logits"))
    for seed, fam in enumerate(FAMILIES):
        make_tiny_hf(f"{root}/{fam}/hf", fam, seed=seed)
    tp1 = run_distributed(_import_and_run_tp1, 1, root)[0]
    tp2 = run_distributed(_run_tp2, 2, root)
    return root, tp1, tp2


@pytest.mark.parametrize("family", list(FAMILIES))
def test_logits_match_transformers_at_tp1_and_tp2(logits, family):
    root, tp1, tp2 = logits
    vocab = _vocab(root, family)
    ref = hf_logits(f"{root}/{family}/hf", _tokens(vocab))
    scale = ref.abs().max().item()
    assert scale > 0.1, "logits too small for the comparison to mean anything"
    for name, got in [("TP1", tp1[family]), ("TP2 rank0", tp2[0][family]), ("TP2 rank1", tp2[1][family])]:
        assert got.shape == ref.shape == (B, S, vocab)
        err = (got - ref).abs().max().item()
        print(f"{family} {name}: max|diff|={err:.3g} max|logit|={scale:.3g} rel={err / scale:.3g}")
        torch.testing.assert_close(got, ref, rtol=0, atol=REL_TOL * scale, msg=lambda m: f"{family} {name}: {m}")
