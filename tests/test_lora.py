"""LoRA on megatron-core (`dasd_megatron/model/lora.py`), on real gloo process groups.

- B = 0: the adapted model's logits equal the base model's bit for bit (the adapter adds exact zeros).
- TP=2 with sequence parallelism (and PP=2) against TP=1: logits, adapter gradients and the base's lack of gradients.
  Tolerances as in test_parallel_parity (fp32; a layout only reorders sums): logits atol 2e-5, gradients
  rtol 1e-4 + atol 1e-6 of their scale.
- merged forward (W + scale B A exported by the streaming exporter, loaded into a plain model) equals the adapter
  forward: both are fp32, the merged product is one rounding of scale*B@A added to W, the adapter path rounds
  A x, B(Ax) and the sum separately, so they agree to a few ulps of the logits' O(1) magnitude: atol 1e-5.
- `adapters_disabled` (the `base` teacher) equals the base model bit for bit.
- an adapter checkpoint saved at TP=2 (megatron dist-checkpointing, [gate; up] layout of fc1's B) reloads at TP=1
  to the same full tensors, exactly.
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist

from dasd_megatron.testing.distributed import run_distributed

S = 16
RANK = 4


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    from tests.hf_fixtures import make_tiny_hf

    return make_tiny_hf(str(tmp_path_factory.mktemp("lora_hf")), "qwen3", num_hidden_layers=2)


@pytest.fixture(scope="module")
def hf_tied(tmp_path_factory):
    from tests.hf_fixtures import make_tiny_hf

    return make_tiny_hf(str(tmp_path_factory.mktemp("lora_tied")), "llama", num_hidden_layers=2,
                        tie_word_embeddings=True)


def _cfg(hf_dir, tp=1, pp=1, sp=False, rank=RANK):
    from dasd_megatron.config import LoRAConfig, ModelConfig, ParallelConfig, RunConfig

    return RunConfig(model=ModelConfig(hf_config=hf_dir, seq_length=S, attention_backend="sdpa",
                                       lora=LoRAConfig(rank=rank, alpha=8.0)),
                     parallel=ParallelConfig(tensor=tp, pipeline=pp, sequence_parallel=sp))


def _build(cfg, hf_dir, lora=True, b_seed=None):
    """Base loaded from HF; adapters applied (B random from `b_seed` when given, else zero)."""
    from dasd_megatron.model.builder import build_model
    from dasd_megatron.model.hf_config import load_hf_architecture
    from dasd_megatron.model.hf_import import load_hf_weights, open_hf_checkpoint
    from dasd_megatron.model.lora import TARGET_SITES as TARGETS
    from dasd_megatron.model.lora import apply_lora, iter_adapters

    arch = load_hf_architecture(hf_dir)
    model = build_model(cfg, arch)
    load_hf_weights(model, open_hf_checkpoint(hf_dir))
    if lora:
        apply_lora(model, cfg.model.lora, seed=7)
        if b_seed is not None:
            for layer, a, _ in iter_adapters(model):  # one seed per (layer, target): the same B on every layout
                g = torch.Generator().manual_seed(b_seed * 1000 + 10 * layer + list(TARGETS).index(a.target))
                a.set_full(b=0.05 * torch.randn(a.out_features, a.rank, generator=g))
    return model, arch


def _tokens(vocab, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (2, S), generator=g)


def _full_logits(ctx, logits):
    lg = logits.float()
    if ctx.tp > 1:
        parts = [torch.empty_like(lg) for _ in range(ctx.tp)]
        dist.all_gather(parts, lg.contiguous(), group=ctx.tp_group)
        lg = torch.cat(parts, dim=-1)
    return lg


def _forward(model, tokens):
    pos = torch.arange(S).unsqueeze(0).expand(tokens.shape[0], -1)
    return model(tokens, pos, None)


def _bitwise(rank, world, hf_dir):
    """B = 0 and adapters_disabled against the plain base model (TP=world)."""
    from megatron.core import parallel_state as ps

    from dasd_megatron.model.lora import adapters_disabled
    from dasd_megatron.parallel import initialize_parallel

    cfg = _cfg(hf_dir, tp=world)
    ctx = initialize_parallel(cfg.parallel)
    base, arch = _build(cfg, hf_dir, lora=False)
    tok = _tokens(arch.vocab_size)
    with torch.no_grad():
        want = _full_logits(ctx, _forward(base, tok))
        zero_b, _ = _build(cfg, hf_dir)
        got_zero = _full_logits(ctx, _forward(zero_b, tok))
        live, _ = _build(cfg, hf_dir, b_seed=3)
        got_live = _full_logits(ctx, _forward(live, tok))
        with adapters_disabled(live):
            got_off = _full_logits(ctx, _forward(live, tok))
        got_live_again = _full_logits(ctx, _forward(live, tok))
    ps.destroy_model_parallel()
    return {"zero": torch.equal(got_zero, want), "off": torch.equal(got_off, want),
            "live_differs": (got_live - want).abs().max().item(), "restored": torch.equal(got_live_again, got_live)}


@pytest.mark.parametrize("world", [1, 2])
def test_zero_b_and_disabled_adapter_equal_the_base_bit_for_bit(hf_dir, world):
    for r in run_distributed(_bitwise, world, hf_dir):
        assert r["zero"], "B = 0 must add exact zeros"
        assert r["off"], "adapters_disabled must give the base network"
        assert r["live_differs"] > 1e-4, "a nonzero B must change the logits (else the test checks nothing)"
        assert r["restored"], "leaving adapters_disabled must restore the adapter"


def _train(rank, world, hf_dir, tp, pp, sp):
    """One forward-backward through megatron's schedule with DDP and the optimizer: full logits, every adapter
    gradient as a full tensor, whether any base parameter got a gradient, and the adapter's full tensors after one
    Adam step."""
    from megatron.core import parallel_state as ps

    from dasd_megatron.model.sharding import full_named_tensors
    from dasd_megatron.parallel import initialize_parallel
    from dasd_megatron.train.config import OptimConfig
    from dasd_megatron.train.engine import build_optimizer, forward_backward, optimizer_step, wrap_ddp

    cfg = _cfg(hf_dir, tp=tp, pp=pp, sp=sp)
    ctx = initialize_parallel(cfg.parallel)
    model, arch = _build(cfg, hf_dir, b_seed=3)
    ddp = wrap_ddp(model)
    opt = build_optimizer(ddp, OptimConfig(lr=1e-3, clip_grad=1.0, adam_eps=1e-4))
    n_opt = sum(p.numel() for g in opt.param_groups for p in g["params"])
    tok = _tokens(arch.vocab_size)
    from dasd_megatron.model.hf_config import padded_vocab_size

    g = torch.Generator().manual_seed(1)
    vpad = padded_vocab_size(arch.vocab_size, cfg.model.make_vocab_size_divisible_by, ctx.tp)
    w = torch.nn.functional.pad(torch.randn(2, S, arch.vocab_size, generator=g), (0, vpad - arch.vocab_size))
    vshard = vpad // ctx.tp
    w = w[..., ctx.tp_rank * vshard:(ctx.tp_rank + 1) * vshard]
    captured = {}

    def step(batch, m):
        out = _forward(m, batch)

        def loss_func(logits):
            captured["logits"] = logits.detach()
            loss = (logits.float() * w).sum()
            return loss, torch.tensor(tok.numel(), dtype=torch.int), {}

        return out, loss_func

    forward_backward(ddp, [tok], step, seq_length=S)
    # cloned: at TP=1 the full tensor is the main_grad buffer itself, which the step's clipping scales in place
    grads = {k: v.clone() for k, v in full_named_tensors(ddp, grads=True).items() if "_lora." in k}
    base_grads = [n for n, p in ddp.module.named_parameters()
                  if "_lora." not in n and (p.grad is not None or getattr(p, "main_grad", None) is not None)]
    optimizer_step(opt)
    params = {k: v for k, v in full_named_tensors(ddp).items() if "_lora." in k}
    logits = _full_logits(ctx, captured["logits"])[..., :arch.vocab_size] if ctx.is_last_stage else None
    ps.destroy_model_parallel()
    return {"logits": logits, "grads": grads, "base_grads": base_grads, "params": params, "n_opt": n_opt}


def _close(got, want, what):
    scale = want.abs().max().item() or 1.0
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6 * scale, msg=what)


@pytest.fixture(scope="module")
def tp1_reference(hf_dir):
    return run_distributed(_train, 1, hf_dir, 1, 1, False)[0]


@pytest.mark.parametrize("tp,pp,sp", [(2, 1, True), (1, 2, False)])
def test_adapter_forward_and_grads_match_tp1(hf_dir, tp1_reference, tp, pp, sp):
    ref = tp1_reference
    assert ref["grads"] and not ref["base_grads"], "only adapters get gradients"
    assert max(v.abs().max().item() for k, v in ref["grads"].items() if "linear_in" in k) > 0, "A gets gradients"
    res = run_distributed(_train, tp * pp, hf_dir, tp, pp, sp)
    logits = next(r["logits"] for r in res if r["logits"] is not None)
    torch.testing.assert_close(logits, ref["logits"], atol=2e-5, rtol=0)
    grads = {k: v for r in res for k, v in r["grads"].items()}
    params = {k: v for r in res for k, v in r["params"].items()}
    assert sorted(grads) == sorted(ref["grads"])
    for k, want in ref["grads"].items():
        _close(grads[k], want, k)
        torch.testing.assert_close(params[k], ref["params"][k], atol=2e-6, rtol=0, msg=k)
    assert all(not r["base_grads"] for r in res)
    # the optimizer holds the adapters only: 2 layers x 4 linears x (A + B) = rank x (in + out) each
    h, f, q, kv = 64, 128, 4 * 16, 2 * 16
    per_layer = RANK * ((h + q + 2 * kv) + (q + h) + (h + 2 * f) + (f + h))
    assert ref["n_opt"] == 2 * per_layer
    # each rank's optimizer holds its TP shard of its stage's adapters: together, the whole adapter once
    assert sum(r["n_opt"] for r in res) == 2 * per_layer


def _merged(rank, world, hf_dir, out_dir):
    """Adapter forward vs a plain model loaded from the merged export (TP=world)."""
    from megatron.core import parallel_state as ps

    from dasd_megatron.model.export import iter_hf_weights
    from dasd_megatron.parallel import initialize_parallel

    cfg = _cfg(hf_dir, tp=world)
    ctx = initialize_parallel(cfg.parallel)
    model, arch = _build(cfg, hf_dir, b_seed=3)
    tok = _tokens(arch.vocab_size)
    with torch.no_grad():
        adapter_logits = _full_logits(ctx, _forward(model, tok))
    merged = dict(iter_hf_weights(model, arch))
    ps.destroy_model_parallel()
    return adapter_logits, {k: v.clone() for k, v in merged.items()}


def test_merged_export_equals_adapter_forward(hf_dir, tmp_path):
    from tests.hf_fixtures import hf_logits

    res = run_distributed(_merged, 2, hf_dir, str(tmp_path))
    adapter_logits, merged = res[0]
    assert merged and not res[1][1], "the merged weights arrive on the sender only"
    # a HF folder with the merged weights, read by transformers' own model class
    import shutil

    from safetensors.torch import save_file

    out = tmp_path / "merged"
    shutil.copytree(hf_dir, out)
    for f in out.glob("*.safetensors"):
        f.unlink()
    (out / "model.safetensors.index.json").unlink(missing_ok=True)
    save_file({k: v.contiguous() for k, v in merged.items()}, str(out / "model.safetensors"),
              metadata={"format": "pt"})
    from dasd_megatron.model.hf_config import load_hf_architecture

    vocab = load_hf_architecture(hf_dir).vocab_size
    got = hf_logits(str(out), _tokens(vocab))
    torch.testing.assert_close(got, adapter_logits[..., :vocab], atol=1e-5, rtol=0)


def _ckpt(rank, world, hf_dir, ckpt_dir, save):
    from megatron.core import dist_checkpointing
    from megatron.core import parallel_state as ps

    from dasd_megatron.model.lora import adapter_sharded_state_dict, iter_adapters, load_adapter_state
    from dasd_megatron.parallel import initialize_parallel

    cfg = _cfg(hf_dir, tp=world)
    initialize_parallel(cfg.parallel)
    model, _ = _build(cfg, hf_dir, b_seed=3 if save else None)
    if save:
        if rank == 0:
            os.makedirs(ckpt_dir, exist_ok=True)
        dist.barrier()
        dist_checkpointing.save(adapter_sharded_state_dict(model), ckpt_dir)
    else:
        load_adapter_state(model, dist_checkpointing.load(adapter_sharded_state_dict(model), ckpt_dir))
    full = {f"{layer}.{a.target}": (a.full_a().clone(), a.full_b().clone()) for layer, a, _ in iter_adapters(model)}
    ps.destroy_model_parallel()
    return full


def test_adapter_checkpoint_saved_at_tp2_reloads_at_tp1(hf_dir, tmp_path):
    ckpt = str(tmp_path / "adapter")
    saved = run_distributed(_ckpt, 2, hf_dir, ckpt, True)[0]
    names = os.listdir(ckpt)
    assert "metadata.json" in names
    loaded = run_distributed(_ckpt, 1, hf_dir, ckpt, False)[0]
    assert sorted(saved) == sorted(loaded)
    for k, (a, b) in saved.items():
        assert torch.equal(loaded[k][0], a), k
        assert torch.equal(loaded[k][1], b), k
    # the gated fc1's B in [gate; up]: its gate rows are the same at both layouts (checked above) and not a
    # TP-rank-interleaved order: B differs from zero, so equality above would fail under the wrong layout
    assert saved["0.linear_fc1"][1].abs().max() > 0


def _tied_pp2(rank, world, hf_dir):
    """PP=2 with tied (frozen) embeddings: megatron's embedding-grad all-reduce skips the frozen weight."""
    return _train(rank, world, hf_dir, 1, 2, False)


def test_pp2_with_frozen_tied_embeddings_trains(hf_tied):
    res = run_distributed(_tied_pp2, 2, hf_tied)
    ref = run_distributed(_train, 1, hf_tied, 1, 1, False)[0]
    grads = {k: v for r in res for k, v in r["grads"].items()}
    for k, want in ref["grads"].items():
        _close(grads[k], want, k)
