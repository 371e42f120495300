"""Layer specs: which megatron-core modules build each transformer layer.

- `te`: megatron's Transformer Engine spec (fused layernorm-linear, TE attention with context parallelism, FP8
  through TransformerConfig's fp8 fields). Chosen by `auto` when Transformer Engine imports on a CUDA machine.
- `sdpa`: megatron's local spec with our RMSNorm (sequence-parallel aware) and our torch SDPA core attention
  (flash/efficient kernels on GPU, GQA, causal, CP by K/V all-gather in megatron's zig-zag layout, packed
  variable-length sequences). The default where TE is absent (CPU, or a GPU image without TE).
- `local`: megatron's own local spec and DotProductAttention, for comparison only (no CP, no packing, slow).
"""

from __future__ import annotations

import copy
import functools
import logging

from megatron.core.transformer.spec_utils import ModuleSpec

log = logging.getLogger(__name__)


@functools.lru_cache(maxsize=1)
def transformer_engine_available() -> bool:
    """True when Transformer Engine's torch bindings import and a CUDA device exists."""
    try:
        import torch

        if not torch.cuda.is_available():
            return False
        import transformer_engine.pytorch  # noqa: F401
    except Exception:  # noqa: BLE001 - any import failure means "not available"
        return False
    return True


def resolve_backend(requested: str) -> str:
    if requested == "auto":
        return "te" if transformer_engine_available() else "sdpa"
    return requested


def layer_spec(backend: str, *, qk_layernorm: bool, fused_swiglu: bool = False) -> ModuleSpec:
    """The transformer-layer ModuleSpec for a resolved backend ('te', 'sdpa' or 'local').

    `fused_swiglu` (sdpa/local): the MLP's activation is our one-kernel SwiGLU (`kernels.swiglu.FusedSwiGLU`);
    megatron applies it only with `TransformerConfig.use_te_activation_func`, which `transformer_config` sets."""
    if backend == "te":
        from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_with_transformer_engine_spec

        return get_gpt_layer_with_transformer_engine_spec(qk_layernorm=qk_layernorm)
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    spec = get_gpt_layer_local_spec(qk_layernorm=qk_layernorm, normalization="RMSNorm")
    if fused_swiglu:
        from dasd_megatron.kernels import FusedSwiGLU

        spec = copy.deepcopy(spec)
        spec.submodules.mlp = _with_activation(spec.submodules.mlp, FusedSwiGLU)
    if backend == "local":
        return spec
    if backend != "sdpa":
        raise ValueError(f"unknown attention backend {backend!r}; use te, sdpa or local")
    from dasd_megatron.model.attention import SDPACoreAttention
    from dasd_megatron.model.norm import RMSNorm

    spec = copy.deepcopy(spec)
    sub = spec.submodules
    sub.input_layernorm = RMSNorm
    sub.pre_mlp_layernorm = RMSNorm
    attn = sub.self_attention.submodules
    attn.core_attention = SDPACoreAttention
    if qk_layernorm:
        attn.q_layernorm = RMSNorm
        attn.k_layernorm = RMSNorm
    return spec


def _with_activation(mlp_spec, activation):
    """The MLP spec with `MLPSubmodules.activation_func = activation`: a `ModuleSpec` (megatron-core 0.16) or a
    `functools.partial(MLP.as_mlp_submodule, submodules=...)` (0.19)."""
    import dataclasses

    if isinstance(mlp_spec, functools.partial):
        sub = dataclasses.replace(mlp_spec.keywords["submodules"], activation_func=activation)
        return functools.partial(mlp_spec.func, *mlp_spec.args, **{**mlp_spec.keywords, "submodules": sub})
    mlp_spec.submodules = dataclasses.replace(mlp_spec.submodules, activation_func=activation)
    return mlp_spec


def block_spec(backend: str, *, qk_layernorm: bool, num_layers: int, fused_swiglu: bool = False):
    """TransformerBlockSubmodules with our final norm (so sequence parallelism works without apex)."""
    from megatron.core.transformer.transformer_block import TransformerBlockSubmodules

    layer = layer_spec(backend, qk_layernorm=qk_layernorm, fused_swiglu=fused_swiglu and backend != "te")
    if backend == "te":
        from megatron.core.extensions.transformer_engine import TENorm

        final_norm = TENorm
    else:
        from dasd_megatron.model.norm import RMSNorm

        final_norm = RMSNorm
    return TransformerBlockSubmodules(layer_specs=[layer] * num_layers, layer_norm=final_norm)
