"""TP / SP / PP / CP / DP forward+backward and one optimizer step match a single-process TP=1 reference.

Real gloo process groups, megatron's own schedules, DDP, optimizer and dist-checkpointing (weights move from the
reference to each layout through a checkpoint saved at TP=1 and loaded at the other layout, and back).

Tolerances (fp32 everywhere): a layout changes only the order of floating-point sums (TP splits matmul
reductions and all-reduces partial results; CP changes the attention's key blocking), so values agree to a few
ulps of the largest magnitude involved. Logits ~O(1): atol 2e-5; gradients: rtol 1e-4 + atol 1e-6 relative to
their scale; parameters after one Adam step: the first Adam update is lr * g / (|g| + eps), whose sensitivity to a
gradient difference dg is at most lr * dg / eps. With lr=1e-3, eps=1e-4 and dg <= ~1e-7 (fp32 rounding of O(0.1)
gradients) that is 1e-6, so atol 2e-6. (With a tiny eps an element whose gradient is rounding noise could move by
anything in +-lr, and the comparison would test noise.)
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist

from dasd_megatron.testing.distributed import run_distributed

B, S = 2, 16
LR = 1e-3
ADAM_EPS = 1e-4


def _hf(model_type="qwen3", **kw):
    from dasd_megatron.model.hf_config import tiny_config

    return tiny_config(model_type, **kw)


def _run_cfg(hf_dir, tp=1, pp=1, cp=1, sp=False, backend="sdpa", seq=S, distopt=False):
    from dasd_megatron.config import ModelConfig, ParallelConfig, RunConfig

    return RunConfig(
        model=ModelConfig(hf_config=hf_dir, seq_length=seq, attention_backend=backend),
        parallel=ParallelConfig(tensor=tp, pipeline=pp, context=cp, sequence_parallel=sp,
                                use_distributed_optimizer=distopt),
    )


def _batch(vocab, seed=0):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, vocab, (B, S), generator=g)
    weights = torch.randn(B, S, 512, generator=g)  # 512 = padded vocab at TP 1 and 2
    return tokens, weights


def zigzag_index(seq: int, cp: int, cp_rank: int) -> torch.Tensor:
    """Positions held by `cp_rank` in megatron's zig-zag CP layout."""
    chunk = seq // (2 * cp)
    a = torch.arange(cp_rank * chunk, (cp_rank + 1) * chunk)
    b = torch.arange((2 * cp - 1 - cp_rank) * chunk, (2 * cp - cp_rank) * chunk)
    return torch.cat([a, b])


def _train_one_step(cfg, hf_dir, load_dir, tokens, weights, save_dir=None):
    """Build at cfg's layout, load `load_dir`, fwd+bwd via megatron's schedule, one Adam step. Full results."""
    from megatron.core import parallel_state as ps

    from dasd_megatron.model.builder import build_model
    from dasd_megatron.model.hf_config import load_hf_architecture
    from dasd_megatron.model.sharding import full_named_tensors
    from dasd_megatron.parallel import initialize_parallel
    from dasd_megatron.train.checkpoint import load_model, save_model
    from dasd_megatron.train.config import OptimConfig
    from dasd_megatron.train.engine import build_optimizer, forward_backward, optimizer_step, wrap_ddp

    arch = load_hf_architecture(hf_dir)
    ctx = initialize_parallel(cfg.parallel)
    model = build_model(cfg, arch)
    if load_dir is not None:
        load_model(model, load_dir)
    ddp = wrap_ddp(model, use_distributed_optimizer=cfg.parallel.use_distributed_optimizer)
    opt = build_optimizer(ddp, OptimConfig(lr=LR, clip_grad=0.0, adam_eps=ADAM_EPS))

    # This rank's data: DP splits the batch, CP takes zig-zag slices of the sequence.
    b_idx = torch.arange(B).chunk(ctx.dp)[ctx.dp_rank]
    s_idx = zigzag_index(S, ctx.cp, ctx.cp_rank) if ctx.cp > 1 else torch.arange(S)
    tok = tokens[b_idx][:, s_idx]
    vshard = 512 // ctx.tp
    w = weights[b_idx][:, s_idx][..., ctx.tp_rank * vshard:(ctx.tp_rank + 1) * vshard]
    pos = s_idx.unsqueeze(0).expand(len(b_idx), -1)
    captured = {}

    def forward_step(batch, m):
        out = m(batch["tokens"], batch["pos"], None)

        def loss_func(logits):
            captured["logits"] = logits.detach()
            loss = (logits.float() * batch["w"]).sum()
            n = torch.tensor(batch["tokens"].numel(), dtype=torch.int)
            return loss, n, {"loss": torch.stack([loss.detach(), n.float()])}

        return out, loss_func

    forward_backward(ddp, [{"tokens": tok, "pos": pos, "w": w}], forward_step, seq_length=S)
    grads = full_named_tensors(ddp, grads=True)
    step = optimizer_step(opt)
    params = full_named_tensors(ddp)
    logits = None
    if ctx.is_last_stage:
        lg = captured["logits"].float()
        if ctx.tp > 1:  # vocab shards -> full vocab
            parts = [torch.empty_like(lg) for _ in range(ctx.tp)]
            dist.all_gather(parts, lg, group=ctx.tp_group)
            lg = torch.cat(parts, dim=-1)
        if ctx.cp > 1:  # zig-zag -> natural order
            parts = [torch.empty_like(lg) for _ in range(ctx.cp)]
            dist.all_gather(parts, lg.contiguous(), group=ctx.cp_group)
            full = torch.empty(lg.shape[0], S, lg.shape[-1])
            for r, part in enumerate(parts):
                full[:, zigzag_index(S, ctx.cp, r)] = part
            lg = full
        if ctx.dp > 1:
            parts = [torch.empty_like(lg) for _ in range(ctx.dp)]
            dist.all_gather(parts, lg.contiguous(), group=ctx.dp_group)
            lg = torch.cat(parts, dim=0)
        logits = lg
    if save_dir is not None:
        save_model(ddp, save_dir)
    ps.destroy_model_parallel()
    return {"logits": logits, "grads": grads, "params": params, "grad_norm": step["grad_norm"]}


def _reference(rank, world_size, hf_dir, ckpt_dir, backend):
    from dasd_megatron.model.builder import build_model
    from dasd_megatron.model.hf_config import load_hf_architecture
    from dasd_megatron.parallel import initialize_parallel
    from dasd_megatron.train.checkpoint import save_model

    cfg = _run_cfg(hf_dir, backend=backend)
    arch = load_hf_architecture(hf_dir)
    initialize_parallel(cfg.parallel)
    save_model(build_model(cfg, arch), ckpt_dir)
    from megatron.core import parallel_state as ps

    ps.destroy_model_parallel()
    tokens, weights = _batch(arch.vocab_size)
    return _train_one_step(cfg, hf_dir, ckpt_dir, tokens, weights)


def _layouts(rank, world_size, hf_dir, ckpt_dir, layouts, backend, save_dir=None):
    from dasd_megatron.model.hf_config import load_hf_architecture

    arch = load_hf_architecture(hf_dir)
    tokens, weights = _batch(arch.vocab_size)
    out = {}
    for name, kw in layouts:
        cfg = _run_cfg(hf_dir, backend=backend, **kw)
        out[name] = _train_one_step(cfg, hf_dir, ckpt_dir, tokens, weights, save_dir=save_dir)
    return out


def _load_at_tp1(rank, world_size, hf_dir, ckpt_dir):
    from dasd_megatron.model.builder import build_model
    from dasd_megatron.model.hf_config import load_hf_architecture
    from dasd_megatron.model.sharding import full_named_tensors
    from dasd_megatron.parallel import initialize_parallel
    from dasd_megatron.train.checkpoint import load_model

    cfg = _run_cfg(hf_dir)
    initialize_parallel(cfg.parallel)
    model = build_model(cfg, load_hf_architecture(hf_dir))
    load_model(model, ckpt_dir)
    return full_named_tensors(model)


def _compare(ref, got, layout, check_grads=True):
    torch.testing.assert_close(got["logits"], ref["logits"], atol=2e-5, rtol=0, msg=lambda m: f"{layout} logits: {m}")
    assert set(got["grads"]) == set(ref["grads"]), f"{layout}: parameter names differ"
    for k, g in (ref["grads"] if check_grads else {}).items():
        scale = g.abs().max().item() + 1e-12
        torch.testing.assert_close(got["grads"][k], g, rtol=1e-4, atol=1e-6 * max(scale, 1.0),
                                   msg=lambda m: f"{layout} grad {k}: {m}")
        assert g.abs().sum() > 0 or "bias" in k, f"reference grad of {k} is zero: the test would be vacuous"
    for k, p in ref["params"].items():
        torch.testing.assert_close(got["params"][k], p, atol=2e-6, rtol=0, msg=lambda m: f"{layout} param {k}: {m}")


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    import json

    d = tmp_path_factory.mktemp("parity")
    hf_dir = str(d / "hf")
    os.makedirs(hf_dir)
    with open(os.path.join(hf_dir, "config.json"), "w") as f:
        json.dump(_hf("qwen3"), f)
    ckpt = str(d / "ref_ckpt")
    ref = run_distributed(_reference, 1, hf_dir, ckpt, "sdpa")[0]
    return hf_dir, ckpt, ref, d


def test_two_process_layouts_match_reference(reference):
    hf_dir, ckpt, ref, _ = reference
    layouts = [
        ("TP2", dict(tp=2)),
        ("TP2+SP", dict(tp=2, sp=True)),
        ("PP2", dict(pp=2)),
        ("CP2", dict(cp=2)),
        ("DP2", dict()),
        ("DP2+distributed optimizer", dict(distopt=True)),
    ]
    results = run_distributed(_layouts, 2, hf_dir, ckpt, layouts, "sdpa")
    for name, kw in layouts:
        # the last rank holds the last pipeline stage in every layout here. With the distributed optimizer each DP
        # rank's grad buffer is reduced only on its own shard, so it is checked through grad norm and the step.
        _compare(ref, results[-1][name], name, check_grads=not kw.get("distopt"))
        assert abs(results[-1][name]["grad_norm"] - ref["grad_norm"]) < 1e-4 * ref["grad_norm"]


def test_tp2_pp2_matches_reference_and_checkpoint_reloads_at_tp1(reference):
    hf_dir, ckpt, ref, d = reference
    save_dir = str(d / "tp2pp2_after_step")
    results = run_distributed(_layouts, 4, hf_dir, ckpt, [("TP2xPP2", dict(tp=2, pp=2))], "sdpa", save_dir=save_dir)
    _compare(ref, results[-1]["TP2xPP2"], "TP2xPP2")
    # Saved at TP2xPP2 after the step, loaded at TP1: the stepped weights come back bit for bit.
    reloaded = run_distributed(_load_at_tp1, 1, hf_dir, save_dir)[0]
    stepped = results[-1]["TP2xPP2"]["params"]
    assert set(reloaded) == set(stepped)
    for k, p in stepped.items():
        torch.testing.assert_close(reloaded[k], p, atol=0, rtol=0, msg=lambda m: f"reloaded {k}: {m}")
