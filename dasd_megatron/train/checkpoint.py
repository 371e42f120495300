"""Megatron distributed checkpoints of the model (and optimizer): save at one layout, load at any other."""

from __future__ import annotations

import os

import torch.distributed as dist


def _inner(model):
    return model.module if hasattr(model, "ddp_config") else model


def save_model(model, ckpt_dir: str) -> None:
    """Save the model's sharded state dict (each rank writes its shards; megatron dedups replicas)."""
    from megatron.core import dist_checkpointing

    if dist.get_rank() == 0:
        os.makedirs(ckpt_dir, exist_ok=True)
    dist.barrier()
    dist_checkpointing.save(_inner(model).sharded_state_dict(), ckpt_dir)


def load_model(model, ckpt_dir: str, strict: bool = True) -> None:
    """Load a checkpoint saved at any TP/PP layout into this rank's model chunk (resharding on read)."""
    from megatron.core import dist_checkpointing

    if not dist_checkpointing.check_is_distributed_checkpoint(ckpt_dir):
        raise FileNotFoundError(
            f"{ckpt_dir} is not a megatron distributed checkpoint (no metadata.json). "
            "Fix: point at a folder written by dasd (or tools/convert_hf.py import)"
        )
    inner = _inner(model)
    state = dist_checkpointing.load(inner.sharded_state_dict(), ckpt_dir)
    inner.load_state_dict(state, strict=strict)
