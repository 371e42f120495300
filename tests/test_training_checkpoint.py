"""Training checkpoints: resume reproduces the uninterrupted run bit for bit; a crash mid-save loses nothing.

The training here is next-token LM loss through megatron's schedule, DDP and Adam at TP=2 (gloo); dropout-free, so
the only state is weights, optimizer moments, the step counter and RNG — all of which must come back.
"""

from __future__ import annotations

import json
import os

import torch

from dasd_megatron.testing.distributed import run_distributed

STEPS, SPLIT = 4, 2


def _setup(hf_dir, tp):
    from dasd_megatron.config import ModelConfig, ParallelConfig, RunConfig
    from dasd_megatron.model.builder import build_model
    from dasd_megatron.model.hf_config import load_hf_architecture
    from dasd_megatron.parallel import initialize_parallel
    from dasd_megatron.train.config import OptimConfig
    from dasd_megatron.train.engine import build_optimizer, wrap_ddp

    cfg = RunConfig(model=ModelConfig(hf_config=hf_dir, seq_length=16), parallel=ParallelConfig(tensor=tp))
    arch = load_hf_architecture(hf_dir)
    ctx = initialize_parallel(cfg.parallel)
    ddp = wrap_ddp(build_model(cfg, arch))
    return ctx, arch, ddp, build_optimizer(ddp, OptimConfig(lr=1e-2))


def _train(ddp, opt, arch, steps):
    from dasd_megatron.train.engine import forward_backward, optimizer_step

    losses = []
    for _ in range(steps):
        # data drawn from the global RNG: a resume that forgot the RNG would train on different tokens
        tokens = torch.randint(0, arch.vocab_size, (1, 17))

        def fs(b, m):
            out = m(b[:, :-1], torch.arange(16)[None], None, labels=b[:, 1:])
            return out, lambda o: (o.sum(), torch.tensor(o.numel(), dtype=torch.int), {"l": o.sum().detach()})

        rep = forward_backward(ddp, [tokens], fs, seq_length=16)
        optimizer_step(opt)
        losses.append(float(rep[0]["l"]))
    return losses


def _full(rank, ws, hf_dir):
    from dasd_megatron.model.sharding import full_named_tensors

    ctx, arch, ddp, opt = _setup(hf_dir, 2)
    torch.manual_seed(7)
    losses = _train(ddp, opt, arch, STEPS)
    return losses, full_named_tensors(ddp)


def _first_half(rank, ws, hf_dir, root, crash_dir):
    from dasd_megatron.train.checkpoint import save_training_checkpoint

    ctx, arch, ddp, opt = _setup(hf_dir, 2)
    torch.manual_seed(7)
    losses = _train(ddp, opt, arch, 1)
    save_training_checkpoint(root, 1, ddp, opt, {"data_offset": 1}, keep_last=1)
    losses += _train(ddp, opt, arch, SPLIT - 1)
    save_training_checkpoint(root, SPLIT, ddp, opt, {"data_offset": SPLIT}, keep_last=1)
    if rank == 0:  # a later save that died half-way: a temporary folder with shards but no metadata
        os.makedirs(crash_dir)
        open(os.path.join(crash_dir, "__0_0.distcp"), "w").write("partial")
    return losses


def _resume(rank, ws, hf_dir, root):
    from dasd_megatron.model.sharding import full_named_tensors
    from dasd_megatron.train.checkpoint import load_training_checkpoint

    ctx, arch, ddp, opt = _setup(hf_dir, 2)
    torch.manual_seed(12345)  # garbage RNG: the checkpoint must restore the real one
    meta = load_training_checkpoint(root, ddp, opt)
    losses = _train(ddp, opt, arch, STEPS - meta["step"])
    return meta, losses, full_named_tensors(ddp)


def test_resume_matches_uninterrupted_run_and_survives_crash_mid_save(tmp_path):
    from dasd_megatron.model.hf_config import tiny_config
    from dasd_megatron.train.checkpoint import list_checkpoints

    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "config.json").write_text(json.dumps(tiny_config("qwen3", num_hidden_layers=2)))
    root = str(tmp_path / "ckpt")
    full_losses, full_params = run_distributed(_full, 2, str(hf))[0]
    crash = os.path.join(root, f".tmp_step_{STEPS:08d}")
    first = run_distributed(_first_half, 2, str(hf), root, crash)[0]
    assert [s for s, _ in list_checkpoints(root)] == [SPLIT]  # keep_last=1 pruned step 1; the crash is ignored
    meta, rest, params = run_distributed(_resume, 2, str(hf), root)[0]
    assert meta["step"] == SPLIT and meta["data_offset"] == SPLIT
    assert first + rest == full_losses  # bit for bit
    for k, p in full_params.items():
        assert torch.equal(params[k], p), k
    assert full_losses[-1] < full_losses[0]
