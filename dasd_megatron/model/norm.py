"""RMSNorm for the local (non-TE) layer spec that also works with sequence parallelism.

megatron-core's `WrappedTorchNorm` (transformer/torch_norm.py) refuses `sequence_parallel` because without apex it
has no way to mark its weight. Here we mark it: with sequence parallelism each TP rank normalises a different slice
of the sequence, so the weight gradient is a partial sum, and megatron's `finalize_model_grads`
(`_allreduce_non_tensor_model_parallel_grads`) sums grads of params that carry `sequence_parallel=True` over the
TP group. QK-norm weights need the same TP sum (each rank sees other heads); megatron does that by name.
"""

from __future__ import annotations

import torch


class RMSNorm(torch.nn.Module):
    """y = x / sqrt(mean(x^2) + eps) * weight, computed in fp32 and cast back (as HF Llama/Qwen do)."""

    def __init__(self, config, hidden_size: int, eps: float = 1e-6, **kwargs):
        super().__init__()
        self.eps = eps
        dtype = config.params_dtype
        self.weight = torch.nn.Parameter(torch.ones(hidden_size, dtype=dtype))
        setattr(self.weight, "sequence_parallel", bool(config.sequence_parallel))
        self.config = config  # its `dasd_fused_kernels` (set by model.builder) picks the kernel

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if getattr(self.config, "dasd_fused_kernels", "torch") == "triton":
            from dasd_megatron.kernels import rms_norm

            return rms_norm(x, self.weight, self.eps, backend="triton")
        xf = x.float()
        y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * y.to(x.dtype)
