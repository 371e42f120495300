"""LoRA adapters on megatron-core's parallel linears: trained, checkpointed, merged, exported and synced.

`apply_lora(model, lora_cfg, seed)` (after the base weights are loaded, before the DDP wrapper) freezes every base
parameter and gives each targeted linear of every layer (`model.lora.targets`: linear_qkv, linear_proj, linear_fc1,
linear_fc2) an adapter, so that the linear's output becomes

    y = W x + (alpha / rank) * B A x        (B = 0 at the start: the policy starts as the base model)

The layout follows Megatron-Bridge's `ParallelLinearAdapter` (`peft/lora.py`), built on megatron-core's own parallel
linears (Bridge imports Transformer Engine unconditionally):

- column-parallel base (linear_qkv, linear_fc1; output features split over TP): A is a `ColumnParallelLinear(in,
  rank, gather_output=True)` (its rank dimension split over TP, the product gathered), B a `ColumnParallelLinear(rank,
  out)` sharded like the base (for the gated fc1, each rank's B rows are its [gate_r; up_r], as the base's).
- row-parallel base (linear_proj, linear_fc2; input features split): A is a `RowParallelLinear(in, rank,
  input_is_parallel=True)` (all-reduced), B a `ColumnParallelLinear(rank, out, gather_output=True)`.
- Sequence parallelism: the adapters run without it. A column-parallel base's input is [s/tp, b, h]: it is
  all-gathered for the adapter (its gradient split back); a row-parallel base's output is reduce-scattered to
  [s/tp, b, h], so the adapter's full output is scattered the same way. (One extra all-gather of the layer input per
  adapted column-parallel linear under SP: the price of the simple layout.)
- The adapter is a sibling module of its base (`self_attention.linear_qkv_lora`), added to the base's output by a
  forward hook, so the base's parameter names, its checkpoint keys and the HF mapping are unchanged. With
  Transformer Engine's fused norm-linear (`TELayerNormColumnParallelLinear`) the hook needs the normalised input:
  the base is asked to return it (`return_layernorm_output`, gathered under SP), as Bridge does.
- Adapter dropout (`model.lora.dropout`) acts only in forwards that build a graph (training), never in the scoring
  pass or a teacher forward.
- A is initialised like PEFT's default (Kaiming-uniform, bound 1/sqrt(in)) from a generator seeded by (seed, layer,
  target) on the full tensor and then split, so every TP/PP layout starts from the same adapter.

Parameters: every adapter parameter carries `dasd_lora=True` (`is_adapter_param`); `hf_import.local_params` skips
them, so loading, planning and exporting the base see the base only. `merged_local(param)` gives a base weight's
local shard with its adapter merged (fp32 product, cast back), which the streaming exporter uses for merged weight
sync and merged HF export. `adapters_disabled(model)` turns every adapter off (the `base` teacher).

PEFT interchange (`peft_state`, `peft_config`): the adapter in Hugging Face PEFT's names and layout
(`base_model.model.model.layers.{i}.self_attn.q_proj.lora_A.weight` [rank, in], `...lora_B.weight` [out, rank]).
The fused QKV and gate/up linears become three and two PEFT modules with the same A and B split by rows (the HF
mapping's own QKV / gate-up transforms): exact, since (B A)[rows] = B[rows] A.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import math
import os
from typing import Iterator, Optional

import torch
import torch.distributed as dist

ADAPTER_FLAG = "dasd_lora"
ADAPTER_SUFFIX = "_lora"
#: target -> (where it lives in a transformer layer, kind)
TARGET_SITES = {"linear_qkv": ("self_attention", "column"), "linear_proj": ("self_attention", "row"),
                "linear_fc1": ("mlp", "column"), "linear_fc2": ("mlp", "row")}
PEFT_PREFIX = "base_model.model."


def is_adapter_param(p) -> bool:
    return bool(getattr(p, ADAPTER_FLAG, False))


def _tp_group():
    from megatron.core import parallel_state as ps

    return ps.get_tensor_model_parallel_group()


class LoRAAdapter(torch.nn.Module):
    """`scale * B(A(x))` in megatron's TP layout for one base linear (see the module docstring)."""

    def __init__(self, target: str, kind: str, in_features: int, out_features: int, rank: int, alpha: float,
                 dropout: float, config, glu: bool = False):
        from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear

        super().__init__()
        self.target, self.kind, self.glu = target, kind, glu
        self.in_features, self.out_features, self.rank = in_features, out_features, rank
        self.scale = alpha / rank
        self.dropout = dropout
        self.sequence_parallel = bool(config.sequence_parallel)
        self.enabled = True
        #: the input the hook passes is already gathered over the sequence (TE's gathered layer-norm output)
        self.input_gathered = False
        cfg = copy.copy(config)
        cfg.sequence_parallel = False
        zeros = torch.nn.init.zeros_
        if kind == "column":
            self.linear_in = ColumnParallelLinear(in_features, rank, config=cfg, init_method=zeros, bias=False,
                                                  gather_output=True)
            self.linear_out = ColumnParallelLinear(rank, out_features, config=cfg, init_method=zeros, bias=False,
                                                   gather_output=False)
        elif kind == "row":
            self.linear_in = RowParallelLinear(in_features, rank, config=cfg, init_method=zeros, bias=False,
                                               input_is_parallel=True, skip_bias_add=True)
            self.linear_out = ColumnParallelLinear(rank, out_features, config=cfg, init_method=zeros, bias=False,
                                                   gather_output=True)
        else:
            raise ValueError(f"LoRAAdapter kind={kind!r}: expected column or row")
        for p in self.parameters():
            setattr(p, ADAPTER_FLAG, True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from megatron.core.tensor_parallel.mappings import (gather_from_sequence_parallel_region,
                                                            scatter_to_sequence_parallel_region)

        if self.dropout and torch.is_grad_enabled() and self.training:
            x = torch.nn.functional.dropout(x, p=self.dropout, training=True)
        if self.kind == "column" and self.sequence_parallel and not self.input_gathered:
            # A's own input-gradient all-reduce already sums the TP ranks: the gather's backward only splits
            x = gather_from_sequence_parallel_region(x, tensor_parallel_output_grad=False)
        h, _ = self.linear_in(x)
        y, _ = self.linear_out(h)
        if self.kind == "row" and self.sequence_parallel:
            y = scatter_to_sequence_parallel_region(y)
        return y * self.scale

    def sharded_state_dict(self, prefix: str = "", sharded_offsets=(), metadata=None) -> dict:
        """A's and B's sharded tensors (their own TP axes); the gated fc1's B in megatron's [gate; up] global layout,
        as the base's, so an adapter saved at one TP size loads at another."""
        from megatron.core.transformer.mlp import apply_swiglu_sharded_factory

        out = {}
        out.update(self.linear_in.sharded_state_dict(f"{prefix}linear_in.", sharded_offsets, metadata))
        sub = self.linear_out.sharded_state_dict(f"{prefix}linear_out.", sharded_offsets, metadata)
        if self.glu:
            key = f"{prefix}linear_out.weight"
            sub[key] = apply_swiglu_sharded_factory(sub[key], sharded_offsets,
                                                    (metadata or {}).get("singleton_local_shards", False))
        out.update(sub)
        return out

    # -- full tensors (collective over TP) ------------------------------------------------------------------------
    def full_a(self) -> torch.Tensor:
        """A as one [rank, in] tensor on every TP rank."""
        return _gather(self.linear_in.weight.detach(), 0 if self.kind == "column" else 1)

    def full_b(self) -> torch.Tensor:
        """B as one [out, rank] tensor on every TP rank (the gated fc1's rows as [gate; up])."""
        from dasd_megatron.model.sharding import merge_tp_shards

        w = self.linear_out.weight.detach()
        tp = dist.get_world_size(_tp_group())
        if tp == 1:
            return w
        shards = [torch.empty_like(w) for _ in range(tp)]
        dist.all_gather(shards, w.contiguous(), group=_tp_group())
        return merge_tp_shards("", shards, 0, self.glu)

    @torch.no_grad()
    def set_full(self, a: Optional[torch.Tensor] = None, b: Optional[torch.Tensor] = None) -> None:
        """Set A [rank, in] and/or B [out, rank] from full tensors (this TP rank takes its shard)."""
        from dasd_megatron.model.sharding import split_tp_shard

        tp, r = dist.get_world_size(_tp_group()), dist.get_rank(_tp_group())
        if a is not None:
            dim = 0 if self.kind == "column" else 1
            self.linear_in.weight.copy_(a.chunk(tp, dim=dim)[r] if tp > 1 else a)
        if b is not None:
            self.linear_out.weight.copy_(split_tp_shard("", b, 0, self.glu, r, tp))

    def delta_local(self, base_param: torch.Tensor) -> torch.Tensor:
        """scale * B A on this TP rank's shard of the base weight, in fp32 (collective over TP)."""
        if self.kind == "column":  # base rows split like B's; A gathered
            return self.scale * (self.linear_out.weight.detach().float() @ self.full_a().float())
        return self.scale * (self.full_b().float() @ self.linear_in.weight.detach().float())


def _gather(t: torch.Tensor, dim: int) -> torch.Tensor:
    tp = dist.get_world_size(_tp_group())
    if tp == 1:
        return t
    parts = [torch.empty_like(t) for _ in range(tp)]
    dist.all_gather(parts, t.contiguous(), group=_tp_group())
    return torch.cat(parts, dim=dim)


def _hook(adapter: LoRAAdapter, te_norm: bool):
    def hook(module, args, output):
        if te_norm and len(output) == 3:  # TE with its bias returned: (linear output, bias, normalised input)
            out, bias, x = output
        elif te_norm:  # megatron's TE wrapper: ((linear output, normalised input), bias)
            (out, x), bias = output
        else:
            out, bias = output
            x = args[0]
        if adapter.enabled:
            out = out + adapter(x)
        return out, bias

    return hook


# -- applying, finding, switching -----------------------------------------------------------------------------------
def _inner(model):
    """The GPTModel inside DDP / Float16Module wrappers (as `hf_import.unwrap`, which imports this module)."""
    while hasattr(model, "module") and not hasattr(model, "decoder"):
        model = model.module
    return model


def iter_adapters(model) -> Iterator[tuple[int, LoRAAdapter, torch.nn.Module]]:
    """(global layer index, adapter, its base linear) of this rank's model chunk, in layer then target order."""
    inner = _inner(model)
    decoder = getattr(inner, "decoder", None)
    if decoder is None:
        return
    for layer in decoder.layers:
        for target, (site, _) in TARGET_SITES.items():
            parent = getattr(layer, site)
            adapter = getattr(parent, target + ADAPTER_SUFFIX, None)
            if adapter is not None:
                yield layer.layer_number - 1, adapter, getattr(parent, target)


def has_adapters(model) -> bool:
    return next(iter_adapters(model), None) is not None


def apply_lora(model, lora_cfg, seed: int) -> list[LoRAAdapter]:
    """Freeze the base and add an adapter to every targeted linear of this rank's layers (module docstring).
    Call after the base weights are loaded and before the DDP wrapper. Returns the adapters."""
    from dasd_megatron.megatron_compat import device

    inner = _inner(model)
    if has_adapters(inner):
        raise RuntimeError("apply_lora: the model already has LoRA adapters")
    for p in inner.parameters():
        p.requires_grad_(False)
    cfg = inner.config
    made = []
    dev = device()
    for layer in inner.decoder.layers:
        g = layer.layer_number - 1
        for target in lora_cfg.modules():
            site, kind = TARGET_SITES[target]
            parent = getattr(layer, site)
            base = getattr(parent, target)
            in_f, out_f = int(base.input_size), int(base.output_size)
            glu = target == "linear_fc1" and bool(cfg.gated_linear_unit)
            adapter = LoRAAdapter(target, kind, in_f, out_f, lora_cfg.rank, lora_cfg.alpha, lora_cfg.dropout, cfg,
                                  glu=glu).to(device=dev, dtype=base.weight.dtype)
            te_norm = hasattr(base, "return_layernorm_output")
            if te_norm:  # TE's fused norm-linear: the adapter reads the normalised input
                base.return_layernorm_output = True
                base.return_layernorm_output_gathered = True
                adapter.input_gathered = True
            setattr(parent, target + ADAPTER_SUFFIX, adapter)
            base.register_forward_hook(_hook(adapter, te_norm))
            base.weight.dasd_lora_adapter = adapter
            gen = torch.Generator().manual_seed(_init_seed(seed, g, target))
            a = torch.empty(lora_cfg.rank, in_f).uniform_(-1.0 / math.sqrt(in_f), 1.0 / math.sqrt(in_f),
                                                          generator=gen)
            adapter.set_full(a=a.to(device=dev, dtype=base.weight.dtype))
            made.append(adapter)
    return made


def _init_seed(seed: int, layer: int, target: str) -> int:
    h = hashlib.sha256(f"{seed}/{layer}/{target}".encode()).digest()
    return int.from_bytes(h[:8], "little") & ((1 << 63) - 1)


def adapter_params(model) -> list[torch.nn.Parameter]:
    return [p for p in _inner(model).parameters() if is_adapter_param(p)]


def count_adapter_params(model) -> int:
    """Trainable adapter parameters of the whole model (all TP/PP ranks)."""
    n = sum(p.numel() for p in adapter_params(model))
    from megatron.core import parallel_state as ps

    t = torch.tensor([n], dtype=torch.long)
    for group in (ps.get_tensor_model_parallel_group(), ps.get_pipeline_model_parallel_group()):
        if dist.get_world_size(group) > 1:
            dist.all_reduce(t, group=group)
    return int(t.item())


@contextlib.contextmanager
def adapters_disabled(model):
    """Every adapter off inside the block: the model computes the base network (bit for bit)."""
    adapters = [a for _, a, _ in iter_adapters(model)]
    before = [a.enabled for a in adapters]
    for a in adapters:
        a.enabled = False
    try:
        yield
    finally:
        for a, e in zip(adapters, before):
            a.enabled = e


@torch.no_grad()
def merged_local(param: torch.nn.Parameter) -> torch.Tensor:
    """This rank's shard of a base weight with its adapter merged: (W + scale * B A) computed in fp32 and cast to
    W's dtype; the weight itself when it has no adapter or the adapter is disabled. Collective over TP for adapted
    weights (every TP rank must call it for the same parameters in the same order)."""
    adapter = getattr(param, "dasd_lora_adapter", None)
    if adapter is None or not adapter.enabled:
        return param.detach()
    return (param.detach().float() + adapter.delta_local(param)).to(param.dtype)


# -- checkpoints --------------------------------------------------------------------------------------------------
def adapter_sharded_state_dict(model) -> dict:
    """The model's sharded state dict restricted to the adapters (what a LoRA checkpoint stores)."""
    sd = _inner(model).sharded_state_dict()
    out = {k: v for k, v in sd.items() if f"{ADAPTER_SUFFIX}." in k and not k.endswith("_extra_state")}
    if not out:
        raise RuntimeError("adapter_sharded_state_dict: the model has no LoRA adapters")
    return out


def load_adapter_state(model, state: dict) -> None:
    """Copy a loaded adapter state dict (from `dist_checkpointing.load(adapter_sharded_state_dict(model), ...)`)
    into the adapters; every adapter must be present."""
    inner = _inner(model)
    missing, unexpected = inner.load_state_dict(state, strict=False)
    want = {n for n, p in inner.named_parameters() if is_adapter_param(p)}
    lost = sorted(want & set(missing))
    if lost or unexpected:
        raise RuntimeError(f"LoRA checkpoint does not match the model's adapters (missing {lost[:3]}, unexpected "
                           f"{sorted(unexpected)[:3]}). Fix: resume with the same model.lora settings")


def base_fingerprint(hf_dir: str) -> str:
    """A cheap identity of a HF folder's weights: sha256 over each safetensors file's name, size, header (tensor
    names, dtypes, shapes, offsets) and first and last MiB. It changes when the weights are replaced or retrained
    (not a full-content hash: reading a 16 GB base at every checkpoint would cost minutes)."""
    import glob

    h = hashlib.sha256()
    files = sorted(glob.glob(os.path.join(hf_dir, "*.safetensors")))
    for path in files:
        size = os.path.getsize(path)
        h.update(f"{os.path.basename(path)}:{size}".encode())
        with open(path, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            h.update(f.read(min(n, 1 << 26)))
            f.seek(8 + n)
            h.update(f.read(1 << 20))
            f.seek(max(8 + n, size - (1 << 20)))
            h.update(f.read(1 << 20))
    return h.hexdigest()


# -- PEFT format ----------------------------------------------------------------------------------------------------
def peft_config(lora_cfg, base_model: str = "") -> dict:
    """PEFT's `adapter_config.json` for this adapter (`sglang_rollout.weight_sync.lora.peft_config`, the one the
    rollout servers check, with this config's rank, alpha, dropout and HF target modules)."""
    from dasd_megatron.config import LORA_TARGETS
    from sglang_rollout.weight_sync.lora import peft_config as sglang_peft_config

    alpha = lora_cfg.alpha
    return sglang_peft_config(
        r=lora_cfg.rank, lora_alpha=int(alpha) if float(alpha).is_integer() else alpha,
        target_modules=sorted(hf for m in lora_cfg.modules() for hf in LORA_TARGETS[m]),
        base_model_name_or_path=base_model, lora_dropout=lora_cfg.dropout, init_lora_weights=True,
        layers_to_transform=None, rank_pattern={}, alpha_pattern={})


def _peft_local(model, arch) -> list[tuple[str, torch.Tensor]]:
    """This stage's adapters as PEFT (name, tensor) pairs (collective over TP; every TP rank gets them)."""
    from dasd_megatron.model.hf_mapping import resolve, to_hf

    out = []
    for layer, adapter, _ in iter_adapters(model):
        site = TARGET_SITES[adapter.target][0]
        res = resolve(f"decoder.layers.{layer}.{site}.{adapter.target}.weight", arch)
        a, b = adapter.full_a(), adapter.full_b()
        for hf_name, b_rows in to_hf(res, b, arch):
            module = PEFT_PREFIX + hf_name[: -len(".weight")]
            out.append((module + ".lora_A.weight", a.contiguous()))
            out.append((module + ".lora_B.weight", b_rows.contiguous()))
    return out


def peft_state(model, arch, *, dtype: Optional[torch.dtype] = None) -> list[tuple[str, torch.Tensor]]:
    """The whole adapter as PEFT (name, tensor) pairs, in layer order, on the replica's sender (TP rank 0 of PP
    stage 0; `export.is_sender`); an empty list elsewhere. Collective over the TP and PP groups of the replica."""
    from megatron.core import parallel_state as ps

    local = [(n, (t.to(dtype) if dtype is not None else t).cpu()) for n, t in _peft_local(model, arch)]
    pp_group = ps.get_pipeline_model_parallel_group()
    tp_rank = ps.get_tensor_model_parallel_rank()
    if dist.get_world_size(pp_group) > 1:
        stages = [None] * dist.get_world_size(pp_group)
        dist.all_gather_object(stages, local if tp_rank == 0 else None, group=pp_group)
        local = [x for s in stages if s for x in s]
    if tp_rank != 0 or ps.get_pipeline_model_parallel_rank() != 0:
        return []
    return local


def iter_adapter_buckets(model, arch, *, dtype: Optional[torch.dtype] = None) -> Iterator[list]:
    """One bucket with the whole adapter in PEFT names (on the sender; an empty bucket elsewhere): the weight
    stream of an adapter-only sync (`model.lora.sync=adapter`)."""
    yield peft_state(model, arch, dtype=dtype)


def write_peft_folder(out_dir: str, tensors, config: dict) -> None:
    """`adapter_config.json` + `adapter_model.safetensors` (loadable by `peft.PeftModel.from_pretrained` and by
    SGLang's `/load_lora_adapter`)."""
    from safetensors.torch import save_file

    os.makedirs(out_dir, exist_ok=True)
    # cloned: q/k/v (gate/up) share the fused linear's A, and safetensors refuses tensors that share memory
    save_file({n: t.detach().cpu().clone().contiguous() for n, t in tensors},
              os.path.join(out_dir, "adapter_model.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(out_dir, "adapter_config.json"), "w") as f:
        json.dump(config, f, indent=2)
        f.write("\n")
