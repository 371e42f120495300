"""Training checkpoints export at any layout they were saved at: PP=2 in bf16, and CP=2 with the distributed
optimizer (its state sharded over the CP group), each exported by one process at TP=1; and each resumes.

Each case trains one Adam step on a tiny Llama with a random next-token batch (so the weights are not those of the
HF folder it started from), saves a training checkpoint (model + optimizer + RNG + `hf/`), and streams the live
model's weights out through the exporter, which is what weight sync sends to the rollout servers. The export of
the checkpoint must hold the same bytes: dtype, vocabulary padding and layout are read from the checkpoint alone.
"""

from __future__ import annotations

import glob
import json
import os

import pytest
import torch

from hf_fixtures import make_tiny_hf

from dasd_megatron.testing.distributed import run_distributed  # noqa: E402

pytestmark = pytest.mark.slow


def _train_and_save(rank, world_size, hf, root, pp, cp, dtype, dist_opt):
    from dasd_megatron.config import ModelConfig, ParallelConfig, PrecisionConfig, RunConfig
    from dasd_megatron.model.builder import build_model
    from dasd_megatron.model.export import iter_hf_weight_buckets
    from dasd_megatron.model.hf_config import load_hf_architecture
    from dasd_megatron.model.hf_import import load_hf_weights, open_hf_checkpoint
    from dasd_megatron.parallel import initialize_parallel
    from dasd_megatron.train.checkpoint import load_training_checkpoint, save_training_checkpoint
    from dasd_megatron.train.config import OptimConfig
    from dasd_megatron.train.engine import build_optimizer, forward_backward, optimizer_step, wrap_ddp

    cfg = RunConfig(model=ModelConfig(hf_config=hf, seq_length=16),
                    parallel=ParallelConfig(pipeline=pp, context=cp, use_distributed_optimizer=dist_opt),
                    precision=PrecisionConfig(params_dtype=dtype))
    arch = load_hf_architecture(hf)
    ctx = initialize_parallel(cfg.parallel)
    ddp = wrap_ddp(build_model(cfg, arch), use_distributed_optimizer=dist_opt)
    load_hf_weights(ddp, open_hf_checkpoint(hf))
    opt = build_optimizer(ddp, OptimConfig(lr=1e-2))
    torch.manual_seed(0)
    tokens = torch.randint(0, arch.vocab_size, (1, 17))
    if cp > 1:
        from dasd_megatron.parallel_layout import ZigZagLayout

        idx = ZigZagLayout([16], cp).local_positions(ctx.cp_rank)
    else:
        idx = torch.arange(16)

    def fs(b, m):
        out = m(b[:, :-1][:, idx], idx[None], None, labels=b[:, 1:][:, idx])
        return out, lambda o: (o.float().sum(), torch.tensor(o.numel(), dtype=torch.int), {})

    forward_backward(ddp, [tokens], fs, seq_length=16)
    assert optimizer_step(opt)["update_successful"]
    save_training_checkpoint(root, 1, ddp, opt, {"model": {"params_dtype": dtype}}, hf_dir=hf)
    live = {n: t.clone() for b in iter_hf_weight_buckets(ddp, arch) for n, t in b}
    # the same checkpoint resumes: a fresh model + optimizer loaded from it takes the same second step
    forward_backward(ddp, [tokens], fs, seq_length=16)
    optimizer_step(opt)
    after = {n: t.clone() for b in iter_hf_weight_buckets(ddp, arch) for n, t in b}
    ddp2 = wrap_ddp(build_model(cfg, arch), use_distributed_optimizer=dist_opt)
    opt2 = build_optimizer(ddp2, OptimConfig(lr=1e-2))
    assert load_training_checkpoint(root, ddp2, opt2)["step"] == 1
    forward_backward(ddp2, [tokens], fs, seq_length=16)
    optimizer_step(opt2)
    resumed = {n: t.clone() for b in iter_hf_weight_buckets(ddp2, arch) for n, t in b}
    assert resumed.keys() == after.keys() and all(torch.equal(resumed[k], after[k]) for k in after)
    return live


def _export(rank, world_size, root, out):
    from dasd_megatron.model.convert import run_export

    return run_export(root, out)


def _read(folder):
    from safetensors.torch import load_file

    out = {}
    for f in glob.glob(os.path.join(folder, "*.safetensors")):
        out.update(load_file(f))
    return out


@pytest.mark.parametrize("pp,cp,dtype,dist_opt", [(2, 1, "bfloat16", False), (1, 2, "float32", True)],
                         ids=["pp2-bf16", "cp2-fp32-distopt"])
def test_training_checkpoint_exports_at_tp1(tmp_path, pp, cp, dtype, dist_opt):
    hf = make_tiny_hf(str(tmp_path / "hf"), "qwen3", vocab_size=300)  # 384 padded rows at TP=1
    root = str(tmp_path / "run" / "checkpoints")
    live = run_distributed(_train_and_save, 2, hf, root, pp, cp, dtype, dist_opt)[0]
    stats = run_distributed(_export, 1, str(tmp_path / "run"), None)[0]
    assert stats["out_dir"] == str(tmp_path / "run" / "export" / "step_00000001") and stats["dtype"] == dtype
    got = _read(stats["out_dir"])
    assert sorted(got) == sorted(live)
    want_dtype = getattr(torch, dtype)
    for k, t in live.items():
        assert got[k].dtype == want_dtype and torch.equal(got[k], t), k
    start = _read(hf)
    assert max((got[k].float() - start[k].float()).abs().max().item() for k in start) > 1e-3  # it trained
    cfg = json.load(open(os.path.join(stats["out_dir"], "config.json")))
    assert cfg.get("torch_dtype", cfg.get("dtype")) == dtype
