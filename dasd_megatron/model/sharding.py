"""Megatron parameter layout: global names across pipeline stages and full tensors from TP shards.

Megatron names a stage's layers from 0 (`decoder.layers.0` on every stage); the global index is the layer's
`layer_number - 1`. A TP-sharded parameter carries `tensor_model_parallel=True` and `partition_dim`; its full
tensor is the concatenation of the shards along that dim, except the gated MLP input projection
(`mlp.linear_fc1.weight` with GLU), where each rank holds `[gate_r; up_r]` and the full tensor is
`[gate_0 .. gate_{tp-1}; up_0 .. up_{tp-1}]` (megatron's own checkpoint layout for it).
"""

from __future__ import annotations

import re

import torch
import torch.distributed as dist

_LAYER = re.compile(r"^(.*?decoder\.layers\.)(\d+)(\..*)$")


def global_name(model, local_name: str) -> str:
    """`decoder.layers.{local}.x` -> `decoder.layers.{global}.x` for this pipeline stage."""
    m = _LAYER.match(local_name)
    if not m:
        return local_name
    module = model
    for part in m.group(1).rstrip(".").split("."):
        module = getattr(module, part)
    layer = module[int(m.group(2))]
    return f"{m.group(1)}{layer.layer_number - 1}{m.group(3)}"


def is_glu_fc1(name: str, model_config) -> bool:
    """The gated MLP's input projection, or its LoRA adapter's B (sharded the same way: `model/lora.py`)."""
    return (name.endswith(("mlp.linear_fc1.weight", "mlp.linear_fc1_lora.linear_out.weight"))
            and bool(getattr(model_config, "gated_linear_unit", False)))


def merge_tp_shards(name: str, shards: list[torch.Tensor], partition_dim: int, glu: bool) -> torch.Tensor:
    """Full tensor from the TP shards of one parameter (see module docstring for the GLU case)."""
    if len(shards) == 1:
        return shards[0]
    if glu:
        halves = [s.chunk(2, dim=0) for s in shards]
        return torch.cat([h[0] for h in halves] + [h[1] for h in halves], dim=0)
    return torch.cat(shards, dim=partition_dim)


def split_tp_shard(name: str, full: torch.Tensor, partition_dim: int, glu: bool, tp_rank: int, tp: int):
    """Inverse of `merge_tp_shards`: this TP rank's shard of a full tensor."""
    if tp == 1:
        return full
    if glu:
        gate, up = full.chunk(2, dim=0)
        return torch.cat([gate.chunk(tp, dim=0)[tp_rank], up.chunk(tp, dim=0)[tp_rank]], dim=0)
    return full.chunk(tp, dim=partition_dim)[tp_rank]


def gather_tp(name: str, param: torch.Tensor, tensor: torch.Tensor, tp_group, model_config) -> torch.Tensor:
    """All-gather `tensor` (the param itself or its grad) over TP if the param is TP-sharded."""
    tp = dist.get_world_size(tp_group) if tp_group is not None else 1
    if tp == 1 or not getattr(param, "tensor_model_parallel", False):
        return tensor
    shards = [torch.empty_like(tensor) for _ in range(tp)]
    dist.all_gather(shards, tensor.contiguous(), group=tp_group)
    return merge_tp_shards(name, shards, param.partition_dim, is_glu_fc1(name, model_config))


def full_named_tensors(model, *, grads: bool = False) -> dict[str, torch.Tensor]:
    """Every parameter (or its main_grad/grad) as a full tensor under its global name, on every rank.

    For tests and small models: it gathers TP shards and then exchanges pipeline stages by object all-gather.
    (The streaming exporter for checkpoints and weight sync, `dasd_megatron.model.export`, never holds the whole model.)
    """
    from megatron.core import parallel_state as ps

    inner = model.module if hasattr(model, "module") and hasattr(model, "ddp_config") else model
    tp_group = ps.get_tensor_model_parallel_group()
    local = {}
    for name, p in inner.named_parameters():
        if grads:
            t = getattr(p, "main_grad", None)
            t = p.grad if t is None else t
            if t is None:
                t = torch.zeros_like(p)
        else:
            t = p.data
        local[global_name(inner, name)] = gather_tp(name, p, t.detach().float(), tp_group, inner.config).cpu()
    pp_group = ps.get_pipeline_model_parallel_group()
    if dist.get_world_size(pp_group) == 1:
        return local
    stages: list = [None] * dist.get_world_size(pp_group)
    dist.all_gather_object(stages, local, group=pp_group)
    merged: dict[str, torch.Tensor] = {}
    for stage in stages:
        for k, v in stage.items():
            merged.setdefault(k, v)
    return merged
