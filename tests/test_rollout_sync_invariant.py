"""The sync invariant: after a training step and a weight sync, the rollout server's log-probs of a fixed sequence
equal the trainer's recomputed log-probs; before the sync they differ.

Trainer: megatron-core GPTModel at TP=2 on two gloo processes, loaded from a tiny random Qwen3 HF folder
(`dasd_megatron.model.hf_import`), one DDP + Adam step per transport. Weights leave through the streaming exporter
(`dasd_megatron.model.export.iter_hf_weights`, gathered over TP to the sender rank) into `WeightSync`; the other
rank drains the same iterator (it runs the gathers). Server: the built-in server in the pytest process, on loopback,
started from the same HF folder. Each of the three transports (disk, tensor, distributed over gloo) is used for
one step.

Tolerance: atol 2e-4 on log-probs. Both sides hold the same fp32 weights after the sync and compute the same
function; they differ only in summation order (TP-split matmuls and all-gathered vocab shards vs one HF forward
with a KV-cache-free prefill; SDPA kernels). The convert tests bound the logits difference at 1e-5 of the largest
logit (~5 here), and log_softmax at most doubles an absolute logit error: ~1e-4. A training step moves the
log-probs by far more (asserted: > 1e-2 on some token), so "before" and "after" are told apart with margin.
"""

from __future__ import annotations

import torch

from dasd_megatron.testing.distributed import free_port, run_distributed
from sglang_rollout.builtin_server import BuiltinServer, ServerArgs
from sglang_rollout.testing import make_tiny_hf_model

SEQ = [3, 14, 15, 92, 65, 35, 89, 79, 32, 38, 46, 26, 43, 38, 32, 7]
ATOL = 2e-4
LR = 5e-3
S = 16


def _trainer(rank, world_size, hf_dir, url, sync_root, master_port):
    import torch.distributed as dist

    from dasd_megatron.config import ModelConfig, ParallelConfig, RunConfig
    from dasd_megatron.model.builder import build_model
    from dasd_megatron.model.export import is_sender, iter_hf_weights
    from dasd_megatron.model.hf_config import load_hf_architecture, padded_vocab_size
    from dasd_megatron.model.hf_import import load_hf_weights, open_hf_checkpoint
    from dasd_megatron.parallel import initialize_parallel
    from dasd_megatron.train.config import OptimConfig
    from dasd_megatron.train.engine import build_optimizer, forward_backward, optimizer_step, wrap_ddp
    from sglang_rollout.rollout_client import RolloutClient
    from sglang_rollout.http_client import HttpClient
    from sglang_rollout.server_client import ServerClient
    from sglang_rollout.weight_sync import DiskTransport, DistributedTransport, TensorTransport, WeightSync, drain

    cfg = RunConfig(model=ModelConfig(hf_config=hf_dir, seq_length=S, attention_backend="sdpa"),
                    parallel=ParallelConfig(tensor=2))
    arch = load_hf_architecture(hf_dir)
    ctx = initialize_parallel(cfg.parallel)
    model = build_model(cfg, arch)
    vpad = padded_vocab_size(arch.vocab_size, cfg.model.make_vocab_size_divisible_by, ctx.tp)
    import inspect

    extra = {"padded_vocab": vpad} if "padded_vocab" in inspect.signature(load_hf_weights).parameters else {}
    load_hf_weights(model, open_hf_checkpoint(hf_dir), **extra)  # (its signature changed while this was written)
    ddp = wrap_ddp(model)
    opt = build_optimizer(ddp, OptimConfig(lr=LR, clip_grad=0.0, adam_eps=1e-8))
    sender = is_sender()
    client = RolloutClient([url]) if sender else None

    @torch.no_grad()
    def trainer_logprobs():
        ids = torch.tensor([SEQ])
        out = model(ids, torch.arange(len(SEQ)).unsqueeze(0), None).float()
        parts = [torch.empty_like(out) for _ in range(ctx.tp)]
        dist.all_gather(parts, out.contiguous(), group=ctx.tp_group)
        logits = torch.cat(parts, -1)[0, :, : arch.vocab_size]
        return torch.log_softmax(logits[:-1], -1).gather(-1, ids[0, 1:, None]).squeeze(-1)

    def server_logprobs():
        return torch.tensor(client.logprobs(SEQ)) if sender else None

    def train_step(seed):
        g = torch.Generator().manual_seed(seed)
        tokens = torch.randint(0, arch.vocab_size, (2, S), generator=g)
        w = torch.randn(2, S, vpad, generator=g)[..., ctx.tp_rank * vpad // 2:(ctx.tp_rank + 1) * vpad // 2]

        def forward_step(batch, m):
            out = m(batch["tokens"], torch.arange(S).expand(2, -1), None)

            def loss_func(logits):
                loss = (logits.float() * batch["w"]).sum() / 100
                n = torch.tensor(batch["tokens"].numel(), dtype=torch.int)
                return loss, n, {"loss": torch.stack([loss.detach(), n.float()])}

            return out, loss_func

        forward_backward(ddp, [{"tokens": tokens, "w": w}], forward_step, seq_length=S)
        optimizer_step(opt)

    results = {"initial": (trainer_logprobs(), server_logprobs()), "steps": []}
    transports = {
        "disk": lambda: DiskTransport(sync_root, base_model_path=hf_dir, keep=1),
        "tensor": lambda: TensorTransport(),
        "distributed": lambda: DistributedTransport(master_address="127.0.0.1", master_port=master_port,
                                                    backend="gloo", timeout_s=120),
    }
    for step, (name, make) in enumerate(transports.items(), start=1):
        train_step(seed=step)
        trained = trainer_logprobs()
        before = server_logprobs()
        weights = iter_hf_weights(model, arch, bucket_bytes=96 << 10, dtype=torch.float32)
        report = None
        if sender:
            sync = WeightSync([ServerClient(url, HttpClient(), timeout_s=120)], make(), bucket_bytes=96 << 10)
            report = sync.sync(weights, version=f"step-{step}")
            sync.close()
        else:
            drain(weights)
        after = server_logprobs()
        version = client.generate([[1, 2]], n=1)[0][0].weight_version if sender else None
        results["steps"].append({"transport": name, "trained": trained, "before": before, "after": after,
                                 "version": version, "buckets": report.buckets if report else None,
                                 "timing": report.timing if report else None})
    return results


def test_server_logprobs_equal_trainer_logprobs_after_each_sync(tmp_path):
    hf_dir = make_tiny_hf_model(str(tmp_path / "hf"), seed=0, init_scale=0.15)
    with BuiltinServer(ServerArgs(model_path=hf_dir, port=0)) as server:
        results = run_distributed(_trainer, 2, hf_dir, server.url, str(tmp_path / "sync"), free_port())
    r0 = results[0]
    trainer0, server0 = r0["initial"]
    torch.testing.assert_close(server0, trainer0, atol=ATOL, rtol=0)  # same weights loaded on both sides
    assert trainer0.std() > 0.5, "log-probs too flat for the comparison to mean anything"
    previous = trainer0
    for i, s in enumerate(r0["steps"], start=1):
        name = s["transport"]
        torch.testing.assert_close(s["trained"], results[1]["steps"][i - 1]["trained"], atol=1e-6, rtol=0)
        assert (s["trained"] - previous).abs().max() > 1e-2, f"{name}: the step did not move the log-probs"
        assert (s["before"] - s["trained"]).abs().max() > 1e-2, f"{name}: server already had the new weights?"
        torch.testing.assert_close(s["after"], s["trained"], atol=ATOL, rtol=0,
                                   msg=lambda m: f"{name}: server vs trainer after sync: {m}")
        assert s["version"] == f"step-{i}" and s["buckets"] > 1
        print(f"{name}: max|server-trainer| after sync {(s['after'] - s['trained']).abs().max():.2e}, "
              f"before {(s['before'] - s['trained']).abs().max():.2e}; {s['buckets']} buckets; "
              + " ".join(f"{k}={v:.3f}s" for k, v in s["timing"].items()))
        previous = s["trained"]
