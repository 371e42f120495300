"""Megatron training machinery: DDP wrapping, the optimizer, and one forward-backward over micro-batches.

The loss convention is megatron's `calculate_per_token_loss`: each micro-batch's loss function returns the *sum*
of its per-token losses and its token count; megatron's `finalize_model_grads` all-reduces the token count over
DP (and CP) and divides the gradients by it, so the step optimises the token mean over the global batch whatever
the DP/CP/micro-batch split.
"""

from __future__ import annotations

from typing import Callable, Iterable

from dasd_megatron.train.config import OptimConfig


def wrap_ddp(model, *, use_distributed_optimizer: bool = False, bucket_size: int | None = None):
    """megatron's DistributedDataParallel around one model chunk, grads accumulated in fp32 main_grad."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads

    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True,
        overlap_grad_reduce=False,
        use_distributed_optimizer=use_distributed_optimizer,
        bucket_size=bucket_size,
    )
    ddp = DistributedDataParallel(config=model.config, ddp_config=ddp_config, module=model)
    cfg = model.config
    cfg.no_sync_func = ddp.no_sync
    cfg.finalize_model_grads_func = finalize_model_grads
    return ddp


def build_optimizer(ddp_model, cfg: OptimConfig):
    """megatron's optimizer (Adam) over the DDP-wrapped model; sharded over DP when the DDP wrapper was built with
    the distributed optimizer (`parallel.use_distributed_optimizer`)."""
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    mcfg = ddp_model.config
    ocfg = OptimizerConfig(
        optimizer="adam",
        lr=cfg.lr,
        weight_decay=cfg.weight_decay,
        adam_beta1=cfg.adam_beta1,
        adam_beta2=cfg.adam_beta2,
        adam_eps=cfg.adam_eps,
        clip_grad=cfg.clip_grad,
        bf16=mcfg.bf16,
        fp16=mcfg.fp16,
        params_dtype=mcfg.params_dtype,
        use_distributed_optimizer=ddp_model.ddp_config.use_distributed_optimizer,
    )
    return get_megatron_optimizer(ocfg, [ddp_model])


def forward_backward(
    model,
    microbatches: Iterable,
    forward_step: Callable,
    *,
    seq_length: int,
    micro_batch_size: int = 1,
    forward_only: bool = False,
):
    """Run megatron's forward-backward schedule (no pipelining or 1F1B by the PP size) over `microbatches`.

    `forward_step(batch, model) -> (output_tensor, loss_func)`, where `loss_func(output_tensor)` returns
    `(loss_sum, num_tokens, reports)` (megatron's per-token-loss convention). Returns the schedule's list of
    per-micro-batch reports (last pipeline stage; empty elsewhere).
    """
    from megatron.core.pipeline_parallel import get_forward_backward_func

    items = list(microbatches)

    def step(data_iterator, model_chunk):
        return forward_step(next(data_iterator), model_chunk)

    fb = get_forward_backward_func()
    if not forward_only:
        model.zero_grad_buffer()
    return fb(
        forward_step_func=step,
        data_iterator=iter(items),
        model=[model],
        num_microbatches=len(items),
        seq_length=seq_length,
        micro_batch_size=micro_batch_size,
        forward_only=forward_only,
    )


def set_lr(optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


def optimizer_step(optimizer, lr: float | None = None) -> dict:
    """One optimizer step (at learning rate `lr` when given); returns {'grad_norm', 'update_successful', ...}."""
    if lr is not None:
        set_lr(optimizer, lr)
    ok, grad_norm, num_zeros = optimizer.step()
    optimizer.zero_grad()
    return {"update_successful": bool(ok), "grad_norm": float(grad_norm or 0.0), "num_zeros": num_zeros,
            "optim/lr": optimizer.param_groups[0]["lr"]}
