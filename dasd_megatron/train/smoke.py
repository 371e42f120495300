"""`dasd smoke`: a few optimizer steps of plain next-token training at any parallel layout, to prove it end to end.

Every step trains on the same batch: `micro_batches` rows per data-parallel rank of `model.seq_length + 1` random
token ids (a fixed seed, so every layout of one config sees the same rows). Row r is split into inputs `row[:-1]`
and labels `row[1:]`; under context parallelism each rank keeps its zig-zag share of the positions. The loss of a
step is the mean token cross-entropy over the whole batch: per-micro-batch (sum, count) pairs are summed and
all-reduced over the data x context group before dividing, so it is the same number at every layout. On random
tokens it starts near ln(vocab) and must decrease as the model memorises the batch.
"""

from __future__ import annotations

import json
import os
import time

import torch
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

from dasd_megatron.config import RunConfig, to_dict
from dasd_megatron.model.builder import build_model, layout_summary
from dasd_megatron.model.hf_config import load_hf_architecture
from dasd_megatron.parallel import ParallelContext, destroy_parallel, env_world_size, initialize_parallel
from dasd_megatron.parallel_layout import ZigZagLayout
from dasd_megatron.preflight import preflight
from dasd_megatron.train.config import OptimConfig
from dasd_megatron.train.engine import build_optimizer, forward_backward, optimizer_step, wrap_ddp

__all__ = ["SMOKE_DATA_SEED", "run_smoke", "smoke_batches", "lm_forward_step"]

#: Seed of the random token batch (any fixed value: it only has to be the same on every rank and every run).
SMOKE_DATA_SEED = 0


def smoke_batches(ctx: ParallelContext, vocab_size: int, seq: int, micro_batches: int) -> list[dict]:
    """This rank's micro-batches: its data-parallel share of `dp * micro_batches` random rows, each as
    `tokens`/`labels`/`pos` tensors of shape [1, seq / cp] on the rank's device (zig-zag positions under CP)."""
    g = torch.Generator().manual_seed(SMOKE_DATA_SEED)
    data = torch.randint(0, vocab_size, (ctx.dp * micro_batches, seq + 1), generator=g)
    mine = data.chunk(ctx.dp)[ctx.dp_rank]
    idx = ZigZagLayout([seq], ctx.cp).local_positions(ctx.cp_rank) if ctx.cp > 1 else torch.arange(seq)
    return [{"tokens": row[:-1][idx][None].to(ctx.device), "labels": row[1:][idx][None].to(ctx.device),
             "pos": idx[None].to(ctx.device)} for row in mine]


def lm_forward_step(batch: dict, model):
    """megatron's forward-step contract: the model's per-token cross-entropy, and a loss function returning
    (summed loss, token count, {"lm loss": [sum, count]}) so the schedule averages over tokens, not micro-batches."""
    out = model(batch["tokens"], batch["pos"], None, labels=batch["labels"])

    def loss_func(per_token):
        loss = per_token.float().sum()
        n = torch.tensor(per_token.numel(), dtype=torch.int, device=per_token.device)
        return loss, n, {"lm loss": torch.stack([loss.detach(), n.float()])}

    return out, loss_func


def _mean_loss(reports: list[dict], ctx: ParallelContext) -> float:
    """Token-mean loss of the step over the data x context group (NaN off the last pipeline stage, which has no
    reports)."""
    if not reports:
        return float("nan")
    tot = torch.stack([r["lm loss"] for r in reports]).sum(0)
    torch.distributed.all_reduce(tot, group=ctx.dp_cp_group)
    return (tot[0] / tot[1]).item()


def _prints_loss(ctx: ParallelContext) -> bool:
    """The one rank that prints the losses: first of its TP/DP/CP groups on the last pipeline stage."""
    return ctx.is_last_stage and ctx.tp_rank == 0 and ctx.dp_rank == 0 and ctx.cp_rank == 0


def _write_config(cfg: RunConfig) -> None:
    os.makedirs(cfg.run_dir, exist_ok=True)
    with open(os.path.join(cfg.run_dir, "config.json"), "w") as f:
        json.dump(to_dict(cfg), f, indent=2)


def run_smoke(cfg: RunConfig, *, steps: int = 8, micro_batches: int = 2, lr: float = 3e-3) -> list[float]:
    """Train `cfg`'s model `steps` steps on one random batch (this process is one rank of a torchrun world, or
    the only process). Prints one line per step and a summary on the printing rank; returns the losses (NaN on
    ranks off the last pipeline stage). Writes `run_dir/config.json`."""
    world = env_world_size()
    arch = load_hf_architecture(cfg.model.hf_config)
    preflight(cfg, world, job="smoke", arch=arch)  # the checks `dasd smoke` made before torchrun started
    ctx = initialize_parallel(cfg.parallel, seed=cfg.model.seed)
    console = Console(stderr=True, quiet=not ctx.is_logging_rank)
    console.print(f"[bold]layout[/bold] {layout_summary(cfg, arch, world)}")
    if ctx.is_logging_rank:
        _write_config(cfg)
    model = wrap_ddp(build_model(cfg, arch), use_distributed_optimizer=cfg.parallel.use_distributed_optimizer)
    opt = build_optimizer(model, OptimConfig(lr=lr))
    seq = cfg.model.seq_length
    batches = smoke_batches(ctx, arch.vocab_size, seq, micro_batches)
    losses = []
    with Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                  TimeElapsedColumn(), console=console) as progress:
        task = progress.add_task("smoke training", total=steps)
        for step in range(1, steps + 1):
            t0 = time.perf_counter()
            reports = forward_backward(model, batches, lm_forward_step, seq_length=seq)
            stats = optimizer_step(opt)
            loss = _mean_loss(reports, ctx)
            losses.append(loss)
            progress.update(task, advance=1, description=f"step {step} loss {loss:.4f}")
            if _prints_loss(ctx):
                print(f"step {step:3d} | loss {loss:.4f} | grad_norm {stats['grad_norm']:.3f} | "
                      f"{(time.perf_counter() - t0) * 1e3:.0f} ms", flush=True)
    if _prints_loss(ctx):
        print(f"smoke: loss {losses[0]:.4f} -> {losses[-1]:.4f} over {steps} steps "
              f"({'decreased' if losses[-1] < losses[0] else 'DID NOT DECREASE'})", flush=True)
    destroy_parallel()
    return losses
