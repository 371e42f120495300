"""Build the policy: megatron-core `GPTModel` from a HF architecture, in this process's pipeline stage.

`transformer_config(arch, cfg)` is the one function that converts our config into megatron's `TransformerConfig`.
`build_model(cfg, arch)` builds this rank's model chunk (parallel state must be initialised; see
`dasd_megatron.parallel`).
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F

from dasd_megatron.config import RunConfig
from dasd_megatron.model.hf_config import HFArchitecture, padded_vocab_size
from dasd_megatron.model.specs import block_spec, resolve_backend

log = logging.getLogger(__name__)


def transformer_config(arch: HFArchitecture, cfg: RunConfig):
    """Our config + the HF architecture -> megatron's TransformerConfig (the only place this mapping lives)."""
    from megatron.core.transformer.transformer_config import TransformerConfig

    p, prec = cfg.parallel, cfg.precision
    dtype = prec.torch_dtype
    on_gpu = torch.cuda.is_available()
    kwargs = dict(
        num_layers=arch.num_layers,
        hidden_size=arch.hidden_size,
        ffn_hidden_size=arch.ffn_hidden_size,
        num_attention_heads=arch.num_attention_heads,
        num_query_groups=arch.num_query_groups,
        kv_channels=arch.kv_channels,
        normalization="RMSNorm",
        layernorm_epsilon=arch.rms_norm_eps,
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        add_qkv_bias=arch.add_qkv_bias,
        qk_layernorm=arch.qk_layernorm,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        init_method_std=cfg.model.init_method_std,
        tensor_model_parallel_size=p.tensor,
        pipeline_model_parallel_size=p.pipeline,
        context_parallel_size=p.context,
        sequence_parallel=p.sequence_parallel,
        params_dtype=dtype,
        pipeline_dtype=dtype,
        bf16=dtype == torch.bfloat16,
        fp16=dtype == torch.float16,
        # Full weights are initialised on the CPU from one seed and split, so every layout starts identical.
        use_cpu_initialization=not on_gpu,
        # Pipeline stages exchange each micro-batch's shape first, so packed micro-batches may differ in length.
        variable_seq_lengths=True,
        moe_token_dispatcher_type="alltoall",  # dense model; megatron rejects the default with variable lengths
        # Fusions that need apex/TE kernels or CUDA.
        bias_dropout_fusion=False,
        bias_activation_fusion=False,
        masked_softmax_fusion=False,
        gradient_accumulation_fusion=False,
        persist_layer_norm=False,
        apply_rope_fusion=False,
        # Sum (not average) of the per-micro-batch loss: the DASD loss normalises by global token counts itself.
        calculate_per_token_loss=True,
    )
    backend = resolve_backend(cfg.model.attention_backend)
    fused = fused_kernel_backend(cfg) if backend != "te" else "torch"
    if fused == "triton":
        # megatron's MLP applies `submodules.activation_func` (our fused SwiGLU, `layer_spec(fused_swiglu=True)`) to
        # the whole fc1 output only under this flag; the name says TE, but the hook is any module.
        kwargs["use_te_activation_func"] = True
    if prec.fp8 is not None:
        kwargs.update(
            fp8=prec.fp8,
            fp8_recipe=prec.fp8_recipe,
            fp8_amax_history_len=prec.fp8_amax_history_len,
            fp8_amax_compute_algo=prec.fp8_amax_compute_algo,
        )
    tcfg = TransformerConfig(**kwargs)
    tcfg.dasd_fused_kernels = fused  # read by our RMSNorm and the packed RoPE (model/packed.py)
    return tcfg


def fused_kernel_backend(cfg: RunConfig) -> str:
    """`model.fused_kernels` resolved for this process's device: 'triton' or 'torch'."""
    from dasd_megatron.kernels import resolve_fused_kernels
    from dasd_megatron.megatron_compat import device

    return resolve_fused_kernels(cfg.model.fused_kernels, device())


def build_model(cfg: RunConfig, arch: HFArchitecture, *, pre_process=None, post_process=None):
    """This rank's GPTModel (its pipeline stage), on this process's device, in params_dtype."""
    from megatron.core import parallel_state as ps
    from megatron.core.models.gpt import GPTModel

    from dasd_megatron.megatron_compat import device
    from dasd_megatron.model import packed

    packed.install()  # one RoPE op per layer over a packed micro-batch (model/packed.py)
    tcfg = transformer_config(arch, cfg)
    backend = resolve_backend(cfg.model.attention_backend)
    log.info("layer spec: %s (requested %s), fused kernels: %s", backend, cfg.model.attention_backend,
             tcfg.dasd_fused_kernels)
    pp = cfg.parallel.pipeline
    if pre_process is None:
        pre_process = ps.is_pipeline_first_stage()
    if post_process is None:
        post_process = ps.is_pipeline_last_stage()
    spec = block_spec(backend, qk_layernorm=arch.qk_layernorm, num_layers=arch.num_layers // pp,
                      fused_swiglu=tcfg.dasd_fused_kernels == "triton")
    vocab = padded_vocab_size(arch.vocab_size, cfg.model.make_vocab_size_divisible_by, cfg.parallel.tensor)
    torch.manual_seed(cfg.model.seed)
    model = GPTModel(
        config=tcfg,
        transformer_layer_spec=spec,
        vocab_size=vocab,
        max_sequence_length=max(cfg.model.seq_length, arch.max_position_embeddings),
        pre_process=pre_process,
        post_process=post_process,
        parallel_output=True,
        share_embeddings_and_output_weights=arch.tie_word_embeddings,
        position_embedding_type="rope",
        rotary_base=int(arch.rope_theta) if float(arch.rope_theta).is_integer() else arch.rope_theta,
        rope_scaling=arch.rope_scaling_factor is not None,
        rope_scaling_factor=arch.rope_scaling_factor or 8.0,
    )
    model.dasd_backend = backend
    model.dasd_vocab_size = arch.vocab_size
    return model.to(device())


def layout_summary(cfg: RunConfig, arch: HFArchitecture, world_size: int) -> str:
    """One line describing the parallel layout, for logs and the smoke run."""
    p = cfg.parallel
    dp = p.data_parallel_size(world_size)
    vocab = padded_vocab_size(arch.vocab_size, cfg.model.make_vocab_size_divisible_by, p.tensor)
    return (
        f"world={world_size} TP={p.tensor} PP={p.pipeline} CP={p.context} DP={dp} SP={p.sequence_parallel} | "
        f"{arch.model_type} L={arch.num_layers} H={arch.hidden_size} heads={arch.num_attention_heads}/"
        f"{arch.num_query_groups} vocab={arch.vocab_size}->{vocab} ({vocab // p.tensor}/TP rank) "
        f"layers/stage={arch.num_layers // p.pipeline} backend={resolve_backend(cfg.model.attention_backend)} "
        f"dtype={cfg.precision.params_dtype}"
    )
