"""Declarative mapping between megatron-core GPTModel parameters and Hugging Face names (Qwen2, Qwen3, Llama).

One table (`RULES`) says which HF tensors make each megatron parameter and how (`Transform`). Both directions and
both consumers (`tools/convert_hf.py` and live weight sync through `dasd_megatron.model.export`) read it; nothing
else knows a parameter name. Tensors here are *full* (TP-merged) megatron tensors: TP splitting and merging live in
`dasd_megatron.model.sharding`.

Transforms (megatron full tensor <-> HF tensors):

- `copy`: identical.
- `qkv`: megatron's `linear_qkv` holds, for each of the `ng` query groups in order, `np/ng` query heads, then one
  key head, then one value head, each `hn` rows; HF keeps `q_proj` [np*hn], `k_proj` [ng*hn], `v_proj` [ng*hn].
  The bias (Qwen2) follows the same row layout. Because TP splits whole groups, the concatenation of TP shards
  along dim 0 is exactly this full layout.
- `gate_up`: megatron's GLU `linear_fc1` is `[gate; up]` (full tensor; the per-TP-rank `[gate_r; up_r]` layout is
  handled by `sharding.merge_tp_shards`); HF keeps `gate_proj` and `up_proj`.
- `vocab`: megatron pads the vocabulary rows to `padded_vocab_size` (zeros on import); export drops the padding.

Transformer Engine fuses the pre-attention and pre-MLP RMSNorm weights into the next linear layer
(`linear_qkv.layer_norm_weight`, `mlp.linear_fc1.layer_norm_weight`); these are aliases in the table.
Tied embeddings: HF has no `lm_head.weight`; megatron's last pipeline stage (when it is not also the first) holds
an `output_layer.weight` copy of the embedding, imported from `model.embed_tokens.weight` and never exported.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from dasd_megatron.model.hf_config import SUPPORTED_MODEL_TYPES, HFArchitecture


class ConversionError(ValueError):
    """A checkpoint cannot be converted. The message names the problem and the fix."""


COPY, QKV, GATE_UP, VOCAB = "copy", "qkv", "gate_up", "vocab"

_ALWAYS: Callable[[HFArchitecture], bool] = lambda arch: True  # noqa: E731


@dataclass(frozen=True)
class WeightRule:
    """One megatron parameter <-> one or more HF tensors. `{layer}` stands for the global layer index."""

    megatron: str
    hf: tuple[str, ...]
    transform: str = COPY
    aliases: tuple[str, ...] = ()
    """Other megatron spellings of the same parameter (Transformer Engine's fused layer norms)."""
    applies: Callable[[HFArchitecture], bool] = _ALWAYS
    """Whether the architecture has this parameter."""
    export: bool = True
    """False for a megatron-only copy (the tied output layer on the last pipeline stage)."""


_M = "decoder.layers.{layer}."
_H = "model.layers.{layer}."

RULES: tuple[WeightRule, ...] = (
    WeightRule("embedding.word_embeddings.weight", ("model.embed_tokens.weight",), VOCAB),
    WeightRule(_M + "input_layernorm.weight", (_H + "input_layernorm.weight",),
               aliases=(_M + "self_attention.linear_qkv.layer_norm_weight",)),
    WeightRule(_M + "self_attention.linear_qkv.weight",
               (_H + "self_attn.q_proj.weight", _H + "self_attn.k_proj.weight", _H + "self_attn.v_proj.weight"), QKV),
    WeightRule(_M + "self_attention.linear_qkv.bias",
               (_H + "self_attn.q_proj.bias", _H + "self_attn.k_proj.bias", _H + "self_attn.v_proj.bias"), QKV,
               applies=lambda a: a.add_qkv_bias),
    WeightRule(_M + "self_attention.q_layernorm.weight", (_H + "self_attn.q_norm.weight",),
               applies=lambda a: a.qk_layernorm),
    WeightRule(_M + "self_attention.k_layernorm.weight", (_H + "self_attn.k_norm.weight",),
               applies=lambda a: a.qk_layernorm),
    WeightRule(_M + "self_attention.linear_proj.weight", (_H + "self_attn.o_proj.weight",)),
    WeightRule(_M + "pre_mlp_layernorm.weight", (_H + "post_attention_layernorm.weight",),
               aliases=(_M + "mlp.linear_fc1.layer_norm_weight",)),
    WeightRule(_M + "mlp.linear_fc1.weight", (_H + "mlp.gate_proj.weight", _H + "mlp.up_proj.weight"), GATE_UP),
    WeightRule(_M + "mlp.linear_fc2.weight", (_H + "mlp.down_proj.weight",)),
    WeightRule("decoder.final_layernorm.weight", ("model.norm.weight",)),
    WeightRule("output_layer.weight", ("lm_head.weight",), VOCAB, applies=lambda a: not a.tie_word_embeddings),
    WeightRule("output_layer.weight", ("model.embed_tokens.weight",), VOCAB,
               applies=lambda a: a.tie_word_embeddings, export=False),
)

# HF tensors that carry no weights of ours and may be present in a checkpoint.
IGNORED_HF = (re.compile(r".*\.rotary_emb\.inv_freq$"),)


def _pattern(template: str) -> re.Pattern:
    return re.compile("^" + re.escape(template).replace(re.escape("{layer}"), r"(?P<layer>\d+)") + "$")


_COMPILED = [(rule, [_pattern(t) for t in (rule.megatron,) + rule.aliases]) for rule in RULES]


def check_supported(arch: HFArchitecture) -> None:
    """Refuse architectures the table does not describe, listing the supported ones."""
    if arch.model_type not in SUPPORTED_MODEL_TYPES:
        supported = ", ".join(SUPPORTED_MODEL_TYPES)
        raise ConversionError(f"model_type={arch.model_type!r} has no weight mapping (supported: {supported}). "
                              "Fix: convert a model of a supported family")


@dataclass(frozen=True)
class Resolved:
    """A megatron parameter resolved against the table: its rule, global layer and concrete HF names."""

    rule: WeightRule
    layer: Optional[int]
    hf_names: tuple[str, ...]

    @property
    def transform(self) -> str:
        return self.rule.transform


def resolve(megatron_name: str, arch: HFArchitecture) -> Resolved:
    """The rule for a megatron parameter given its *global* name (see `sharding.global_name`)."""
    check_supported(arch)
    for rule, patterns in _COMPILED:
        if not rule.applies(arch):
            continue
        for pat in patterns:
            m = pat.match(megatron_name)
            if m:
                layer = int(m.group("layer")) if "layer" in pat.groupindex else None
                names = tuple(h.format(layer=layer) for h in rule.hf)
                return Resolved(rule, layer, names)
    raise ConversionError(
        f"megatron parameter {megatron_name!r} has no HF mapping for model_type={arch.model_type!r} "
        f"(qk_layernorm={arch.qk_layernorm}, qkv_bias={arch.add_qkv_bias}, tied={arch.tie_word_embeddings}). "
        "Fix: build the model from the same config.json as the checkpoint, or add a rule to hf_mapping.RULES"
    )


def order_key(megatron_name: str) -> tuple:
    """Sort key giving HF's canonical order: embedding, layers 0..L-1 (table order within a layer), norm, head."""
    for idx, (rule, patterns) in enumerate(_COMPILED):
        for pat in patterns:
            m = pat.match(megatron_name)
            if m:
                layer = int(m.group("layer")) if "layer" in pat.groupindex else None
                section = 1 if layer is not None else (0 if idx == 0 else 2)
                return (section, layer if layer is not None else 0, idx)
    return (3, 0, 0)


def hf_shapes(arch: HFArchitecture) -> dict[str, tuple[int, ...]]:
    """Every HF tensor the architecture has, with its shape, in canonical order."""
    check_supported(arch)
    h, f, v = arch.hidden_size, arch.ffn_hidden_size, arch.vocab_size
    q, kv = arch.num_attention_heads * arch.kv_channels, arch.num_query_groups * arch.kv_channels
    out = {"model.embed_tokens.weight": (v, h)}
    for i in range(arch.num_layers):
        p = f"model.layers.{i}."
        out[p + "input_layernorm.weight"] = (h,)
        out[p + "self_attn.q_proj.weight"] = (q, h)
        out[p + "self_attn.k_proj.weight"] = (kv, h)
        out[p + "self_attn.v_proj.weight"] = (kv, h)
        if arch.add_qkv_bias:
            out[p + "self_attn.q_proj.bias"] = (q,)
            out[p + "self_attn.k_proj.bias"] = (kv,)
            out[p + "self_attn.v_proj.bias"] = (kv,)
        if arch.qk_layernorm:
            out[p + "self_attn.q_norm.weight"] = (arch.kv_channels,)
            out[p + "self_attn.k_norm.weight"] = (arch.kv_channels,)
        out[p + "self_attn.o_proj.weight"] = (h, q)
        out[p + "post_attention_layernorm.weight"] = (h,)
        out[p + "mlp.gate_proj.weight"] = (f, h)
        out[p + "mlp.up_proj.weight"] = (f, h)
        out[p + "mlp.down_proj.weight"] = (h, f)
    out["model.norm.weight"] = (h,)
    if not arch.tie_word_embeddings:
        out["lm_head.weight"] = (v, h)
    return out


def is_ignored_hf(name: str) -> bool:
    return any(p.match(name) for p in IGNORED_HF)


# ---------------------------------------------------------------------------------------------------------------
# Transforms on full tensors


def _qkv_dims(arch: HFArchitecture) -> tuple[int, int, int]:
    ng, hn = arch.num_query_groups, arch.kv_channels
    return ng, arch.num_attention_heads // ng, hn


def to_hf(res: Resolved, full: torch.Tensor, arch: HFArchitecture) -> list[tuple[str, torch.Tensor]]:
    """A full megatron tensor -> its HF tensors (views where possible; padding rows dropped)."""
    t = res.transform
    if t == COPY:
        return [(res.hf_names[0], full)]
    if t == VOCAB:
        return [(res.hf_names[0], full[: arch.vocab_size])]
    if t == GATE_UP:
        gate, up = full.chunk(2, dim=0)
        return list(zip(res.hf_names, (gate, up)))
    if t == QKV:
        ng, per, hn = _qkv_dims(arch)
        rest = full.shape[1:]
        g = full.reshape(ng, per + 2, hn, *rest)
        q = g[:, :per].reshape(ng * per * hn, *rest)
        k = g[:, per].reshape(ng * hn, *rest)
        v = g[:, per + 1].reshape(ng * hn, *rest)
        return list(zip(res.hf_names, (q, k, v)))
    raise AssertionError(f"unknown transform {t!r}")


def from_hf(res: Resolved, tensors: list[torch.Tensor], arch: HFArchitecture, padded_vocab: int) -> torch.Tensor:
    """HF tensors (in `res.hf_names` order) -> the full megatron tensor (vocabulary padded with zero rows)."""
    t = res.transform
    if t == COPY:
        return tensors[0]
    if t == VOCAB:
        w = tensors[0]
        if padded_vocab == w.shape[0]:
            return w
        pad = w.new_zeros((padded_vocab - w.shape[0], *w.shape[1:]))
        return torch.cat([w, pad], dim=0)
    if t == GATE_UP:
        return torch.cat(tensors, dim=0)
    if t == QKV:
        ng, per, hn = _qkv_dims(arch)
        q, k, v = tensors
        rest = q.shape[1:]
        g = torch.cat([q.reshape(ng, per, hn, *rest), k.reshape(ng, 1, hn, *rest), v.reshape(ng, 1, hn, *rest)],
                      dim=1)
        return g.reshape(ng * (per + 2) * hn, *rest)
    raise AssertionError(f"unknown transform {t!r}")
