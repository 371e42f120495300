"""Streaming export of a megatron GPTModel to Hugging Face names and layout (checkpoints and live weight sync).

Public API (all collective: see "Who calls, who receives"):

    plan = plan_export(model, arch, bucket_bytes=512 << 20, dtype=torch.bfloat16)   # once; metadata only
    for bucket in iter_hf_weight_buckets(model, arch, plan=plan):   # list[(hf_name, tensor)] per bucket
        ...
    for hf_name, tensor in iter_hf_weights(model, arch, bucket_bytes=..., dtype=None):
        ...

What a bucket is: consecutive parameters in HF order (embedding, layer 0..L-1, final norm, lm_head) whose HF
bytes (in the output dtype, vocabulary padding excluded) add up to at most `bucket_bytes` (a larger tensor gets a
bucket of its own; `dasd_megatron.packing.next_fit`). `plan.buckets[i]` lists the HF names, shapes and dtypes of
bucket i before any data moves, so a receiver (a rollout server) can allocate buffers up front. At most one bucket
of gathered tensors is alive at a time (plus the model): the full model is never held twice.

Who calls, who receives (the contract):

- Every rank of one model replica's TP x PP grid must call the iterator and exhaust it, in step (each bucket runs
  collectives over the TP group and the PP group). Other data-/context-parallel replicas hold identical weights and
  may skip the call entirely; if they call it they run their own replica's collectives.
- `receivers="sender"` (default, for weight sync and checkpoint writing): the tensors appear only on the *sender*,
  the rank with TP rank 0 and PP rank 0 of the replica (global rank 0 when DP=CP=1). TP shards are gathered to TP
  rank 0 of each stage (`dist.gather`); stages other than the first then send their part of the bucket to the
  sender with point-to-point `send`/`recv` over the PP group, one flat buffer per dtype per bucket. On every other
  rank `iter_hf_weight_buckets` yields an empty list per bucket (same number of iterations everywhere) and
  `iter_hf_weights` yields nothing. Use `is_sender()` to pick the sending rank.
- `receivers="all"`: every rank of the replica gets every tensor (TP `all_gather`, then a PP `broadcast` from the
  owning stage), e.g. for colocated servers fed by each trainer rank.

Tensors are on the model's device, contiguous, in the output dtype, in HF layout (fused QKV split with the GQA
interleave undone, GLU split into gate/up, vocabulary padding removed). They are fresh buffers except where no
work was needed (TP=1, no cast, no transform): then they share storage with the parameter, so copy them if you
keep them past the next optimizer step. Cast to `dtype` happens before the gather, so bf16 export moves half the
bytes of an fp32 model. A weight with a LoRA adapter (`model/lora.py`) is exported merged: each TP shard becomes
W + alpha/r B A in fp32 before the cast (`lora.merged_local`); the adapters themselves are not HF weights.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Iterator, Literal, Optional

import torch
import torch.distributed as dist

from dasd_megatron.model.hf_config import HFArchitecture
from dasd_megatron.model.hf_import import local_params
from dasd_megatron.model.hf_mapping import ConversionError, hf_shapes, order_key, resolve, to_hf
from dasd_megatron.packing import next_fit

DEFAULT_BUCKET_BYTES = 512 << 20
Receivers = Literal["sender", "all"]


@dataclass(frozen=True)
class ExportItem:
    """One megatron parameter in the plan: its global name, owning PP stage and the HF tensors it becomes."""

    megatron_name: str
    stage: int
    hf_names: tuple[str, ...]
    hf_shapes: tuple[tuple[int, ...], ...]
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        size = torch.empty((), dtype=self.dtype).element_size()
        return sum(_numel(s) for s in self.hf_shapes) * size


@dataclass(frozen=True)
class ExportPlan:
    """The bucket plan, identical on every rank of the replica. Made by `plan_export`."""

    buckets: tuple[tuple[ExportItem, ...], ...]
    bucket_bytes: int
    dtype: Optional[torch.dtype]

    def bucket_tensors(self, i: int) -> list[tuple[str, tuple[int, ...], torch.dtype]]:
        """(hf_name, shape, dtype) of every tensor of bucket i, in the order it is yielded."""
        return [(n, s, it.dtype) for it in self.buckets[i] for n, s in zip(it.hf_names, it.hf_shapes)]

    def tensors(self) -> list[tuple[str, tuple[int, ...], torch.dtype]]:
        return [t for i in range(len(self.buckets)) for t in self.bucket_tensors(i)]

    @property
    def total_bytes(self) -> int:
        return sum(it.nbytes for b in self.buckets for it in b)


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def _groups(tp_group, pp_group):
    from megatron.core import parallel_state as ps

    tp_group = tp_group if tp_group is not None else ps.get_tensor_model_parallel_group()
    pp_group = pp_group if pp_group is not None else ps.get_pipeline_model_parallel_group()
    return tp_group, pp_group


def is_sender(tp_group=None, pp_group=None) -> bool:
    """True on the rank that receives the tensors with receivers='sender' (TP rank 0 of PP stage 0)."""
    tp_group, pp_group = _groups(tp_group, pp_group)
    return dist.get_rank(tp_group) == 0 and dist.get_rank(pp_group) == 0


def plan_export(model, arch: HFArchitecture, *, bucket_bytes: int = DEFAULT_BUCKET_BYTES,
                dtype: Optional[torch.dtype] = None, tp_group=None, pp_group=None) -> ExportPlan:
    """Plan the buckets (collective over the PP group: one all_gather_object of names and shapes, no weights)."""
    if bucket_bytes < 1:
        raise ConversionError(f"bucket_bytes={bucket_bytes}: must be >= 1. Fix: use e.g. 512 MiB (512 << 20)")
    tp_group, pp_group = _groups(tp_group, pp_group)
    stage = dist.get_rank(pp_group)
    shapes = hf_shapes(arch)
    local = []
    for gname, p, _ in local_params(model):
        res = resolve(gname, arch)
        if res.rule.export:
            local.append((gname, stage, res.hf_names, tuple(shapes[n] for n in res.hf_names), dtype or p.dtype))
    stages: list = [None] * dist.get_world_size(pp_group)
    dist.all_gather_object(stages, local, group=pp_group)
    items = sorted((ExportItem(*t) for s in stages for t in s), key=lambda it: order_key(it.megatron_name))
    covered = [n for it in items for n in it.hf_names]
    if sorted(covered) != sorted(shapes):
        missing = sorted(set(shapes) - set(covered))
        dup = sorted({n for n in covered if covered.count(n) > 1})
        raise ConversionError(f"the model's parameters do not cover the HF checkpoint exactly (missing "
                              f"{missing[:3]}, duplicated {dup[:3]}). Fix: build the model from the same config.json")
    buckets = tuple(tuple(items[i] for i in group) for group in next_fit([it.nbytes for it in items], bucket_bytes))
    return ExportPlan(buckets, bucket_bytes, dtype)


def iter_hf_weights(model, arch: HFArchitecture, *, bucket_bytes: int = DEFAULT_BUCKET_BYTES,
                    dtype: Optional[torch.dtype] = None, receivers: Receivers = "sender",
                    plan: Optional[ExportPlan] = None, tp_group=None,
                    pp_group=None) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield `(hf_name, tensor)` in HF order, one bucket gathered at a time (see the module docstring)."""
    for bucket in iter_hf_weight_buckets(model, arch, bucket_bytes=bucket_bytes, dtype=dtype, receivers=receivers,
                                         plan=plan, tp_group=tp_group, pp_group=pp_group):
        yield from bucket


@torch.no_grad()
def iter_hf_weight_buckets(model, arch: HFArchitecture, *, bucket_bytes: int = DEFAULT_BUCKET_BYTES,
                           dtype: Optional[torch.dtype] = None, receivers: Receivers = "sender",
                           plan: Optional[ExportPlan] = None, tp_group=None,
                           pp_group=None) -> Iterator[list[tuple[str, torch.Tensor]]]:
    """Yield one list of `(hf_name, tensor)` per planned bucket; empty lists on ranks that do not receive.

    A `plan` from `plan_export` (reusable across calls while the model's layout stays the same) overrides
    `bucket_bytes` and `dtype`.
    """
    if receivers not in ("sender", "all"):
        raise ConversionError(f"receivers={receivers!r}: unknown. Fix: use 'sender' or 'all'")
    tp_group, pp_group = _groups(tp_group, pp_group)
    if plan is None:
        plan = plan_export(model, arch, bucket_bytes=bucket_bytes, dtype=dtype, tp_group=tp_group,
                           pp_group=pp_group)
    local = {gname: (p, inner) for gname, p, inner in local_params(model)}
    for bucket in plan.buckets:
        yield _export_bucket(bucket, local, arch, receivers, tp_group, pp_group)


def _export_bucket(bucket, local, arch, receivers, tp_group, pp_group) -> list[tuple[str, torch.Tensor]]:
    stage, tp_rank = dist.get_rank(pp_group), dist.get_rank(tp_group)
    mine = [it for it in bucket if it.stage == stage]
    full = _gather_tp(mine, local, receivers, tp_group)
    have = {}
    if full is not None:
        for it, t in zip(mine, full):
            for name, h in to_hf(resolve(it.megatron_name, arch), t, arch):
                have[name] = h.contiguous()
    stages = sorted({it.stage for it in bucket})
    if dist.get_world_size(pp_group) > 1:
        if receivers == "all":
            _pp_broadcast(bucket, stages, have, pp_group)
        elif tp_rank == 0:
            _pp_to_first(bucket, stages, have, pp_group)
    if receivers == "sender" and not (tp_rank == 0 and stage == 0):
        return []
    return [(n, have[n]) for it in bucket for n in it.hf_names]


def _gather_tp(mine, local, receivers, tp_group) -> Optional[list[torch.Tensor]]:
    """Full (TP-merged) megatron tensors of this stage's items; None on TP ranks that do not receive."""
    from dasd_megatron.model.sharding import is_glu_fc1, merge_tp_shards

    from dasd_megatron.model.lora import merged_local

    tp, tp_rank = dist.get_world_size(tp_group), dist.get_rank(tp_group)
    # a LoRA-adapted weight is exported merged (W + scale * B A, fp32 then cast): `model/lora.py`
    tensors = [merged_local(local[it.megatron_name][0]).to(it.dtype) for it in mine]
    sharded = [i for i, it in enumerate(mine) if getattr(local[it.megatron_name][0], "tensor_model_parallel", False)]
    if tp == 1 or not sharded:
        return tensors if (receivers == "all" or tp_rank == 0) else None
    receive = receivers == "all" or tp_rank == 0
    for dt in sorted({tensors[i].dtype for i in sharded}, key=str):
        idx = [i for i in sharded if tensors[i].dtype == dt]
        flat = torch.cat([tensors[i].reshape(-1) for i in idx])
        parts = [torch.empty_like(flat) for _ in range(tp)] if receive else None
        if receivers == "all":
            dist.all_gather(parts, flat, group=tp_group)
        else:
            dist.gather(flat, parts, dst=dist.get_global_rank(tp_group, 0), group=tp_group)
        if not receive:
            continue
        off = 0
        for i in idx:
            p, inner = local[mine[i].megatron_name]
            n, shape = tensors[i].numel(), tensors[i].shape
            shards = [part[off:off + n].view(shape) for part in parts]
            tensors[i] = merge_tp_shards(mine[i].megatron_name, shards, p.partition_dim,
                                         is_glu_fc1(mine[i].megatron_name, inner.config))
            off += n
    return tensors if receive else None


def _flat_groups(bucket, stage):
    """For the items of `stage` in `bucket`: dtype -> [(hf_name, shape)] in plan order."""
    groups: dict[torch.dtype, list] = {}
    for it in bucket:
        if it.stage == stage:
            groups.setdefault(it.dtype, []).extend(zip(it.hf_names, it.hf_shapes))
    return sorted(groups.items(), key=lambda kv: str(kv[0]))


def _device(have):
    from dasd_megatron.megatron_compat import device

    return next(iter(have.values())).device if have else device()


def _unflatten(buf, entries, have):
    off = 0
    for name, shape in entries:
        n = _numel(shape)
        have[name] = buf[off:off + n].view(shape)
        off += n


def _pp_to_first(bucket, stages, have, pp_group) -> None:
    """Point-to-point: each other stage's TP-rank-0 sends its part of the bucket to PP stage 0."""
    stage = dist.get_rank(pp_group)
    first = dist.get_global_rank(pp_group, 0)
    for s in stages:
        if s == 0 or (stage not in (0, s)):
            continue
        for dt, entries in _flat_groups(bucket, s):
            if stage == s:
                dist.send(torch.cat([have[n].reshape(-1) for n, _ in entries]), dst=first, group=pp_group)
            else:
                buf = torch.empty(sum(_numel(sh) for _, sh in entries), dtype=dt, device=_device(have))
                dist.recv(buf, src=dist.get_global_rank(pp_group, s), group=pp_group)
                _unflatten(buf, entries, have)


def _pp_broadcast(bucket, stages, have, pp_group) -> None:
    """Broadcast each owning stage's part of the bucket to every stage."""
    stage = dist.get_rank(pp_group)
    for s in stages:
        for dt, entries in _flat_groups(bucket, s):
            if stage == s:
                buf = torch.cat([have[n].reshape(-1) for n, _ in entries])
            else:
                buf = torch.empty(sum(_numel(sh) for _, sh in entries), dtype=dt, device=_device(have))
            dist.broadcast(buf, src=dist.get_global_rank(pp_group, s), group=pp_group)
            if stage != s:
                _unflatten(buf, entries, have)


# ---------------------------------------------------------------------------------------------------------------
# Writing a sharded safetensors checkpoint from the stream


def parse_size(text: str) -> int:
    """'2GB', '512MB', '1GiB', '1000' -> bytes."""
    units = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
             "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}
    s = str(text).strip().upper().replace(" ", "")
    num = s.rstrip("KMGTIB")
    try:
        value = float(num) * units[s[len(num):]]
    except (ValueError, KeyError):
        raise ConversionError(f"size {text!r}: not understood. Fix: write e.g. 2GB, 512MB or 1GiB") from None
    if value < 1:
        raise ConversionError(f"size {text!r}: must be at least one byte. Fix: give a positive size")
    return int(value)


class SafetensorsShardWriter:
    """Writes HF-style shards `model-0000i-of-0000n.safetensors` plus `model.safetensors.index.json`.

    Shard boundaries are fixed up front from the plan (in HF order, at most `max_shard_bytes` each unless one tensor
    is larger), so each file is written as soon as its last tensor arrives and at most one shard is buffered.
    """

    def __init__(self, out_dir: str, tensors: list[tuple[str, tuple[int, ...], torch.dtype]], max_shard_bytes: int):
        self.out_dir = out_dir
        sizes = [_numel(shape) * torch.empty((), dtype=dt).element_size() for _, shape, dt in tensors]
        shards = [[tensors[i][0] for i in group] for group in next_fit(sizes, max_shard_bytes)]
        n = len(shards)
        self.file_of = {name: f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i, s in enumerate(shards) for name in s}
        self.remaining = {f"model-{i + 1:05d}-of-{n:05d}.safetensors": set(s) for i, s in enumerate(shards)}
        self.pending: dict[str, dict[str, torch.Tensor]] = {}
        self.total_size = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        from safetensors.torch import save_file

        fn = self.file_of.get(name)
        if fn is None:
            raise ConversionError(f"unexpected tensor {name!r} in the export stream (not in the plan)")
        self.pending.setdefault(fn, {})[name] = tensor.detach().to("cpu").contiguous()
        self.remaining[fn].discard(name)
        self.total_size += tensor.numel() * tensor.element_size()
        if not self.remaining[fn]:
            path = os.path.join(self.out_dir, fn)
            save_file(self.pending.pop(fn), path, metadata={"format": "pt"})
            os.chmod(path, 0o644)  # safetensors creates files 0600; checkpoints are meant to be shared

    def finish(self) -> None:
        left = sorted(n for s in self.remaining.values() for n in s)
        if left:
            raise ConversionError(f"export stream ended without {len(left)} tensor(s), e.g. {left[0]!r}")
        index = {"metadata": {"total_size": self.total_size}, "weight_map": dict(sorted(self.file_of.items()))}
        with open(os.path.join(self.out_dir, "model.safetensors.index.json"), "w") as f:
            json.dump(index, f, indent=2)
            f.write("\n")
