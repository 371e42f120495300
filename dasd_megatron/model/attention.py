"""Core attention on `torch.nn.functional.scaled_dot_product_attention`, with packing and context parallelism.

`SDPACoreAttention` is a drop-in replacement for megatron-core's local `DotProductAttention`: the
`core_attention` submodule of `SelfAttention` in `get_gpt_layer_local_spec()`. It has the same constructor
and forward signature (megatron-core 0.16 and 0.19) and the same input/output layout, so `linear_qkv`, rotary
embeddings and `linear_proj` around it are unchanged. On CUDA, SDPA picks the flash or memory-efficient kernel
(no [b, np, s, s] score tensor); on CPU it runs the math/flash-CPU kernel.

Layout (per tensor-parallel rank; np = query heads, ng = query groups (GQA), hk/hv = key/value head dims)

- sbhd (no packing, or ``packed_seq_params.qkv_format == 'sbhd'``):
  query ``[sq, b, np, hk]``, key ``[sk, b, ng, hk]``, value ``[sk, b, ng, hv]`` -> output ``[sq, b, np*hv]``.
- thd (``packed_seq_params.qkv_format == 'thd'``): megatron's ``Attention.forward`` squeezes the dummy batch
  dimension, so query arrives as ``[t, np, hk]`` (``[t, 1, np, hk]`` is accepted too) and the output is
  ``[t, np*hv]`` (``[t, 1, np*hv]`` for 4-D input); ``Attention`` reshapes it to ``[t, 1, np*hv]``.
  Document i holds the ``cu_seqlens_q[i+1] - cu_seqlens_q[i]`` tokens starting at ``cu_seqlens_q_padded[i]``
  (or ``cu_seqlens_q[i]`` without padding); padding tokens and any tail after the last document get a zero
  output and receive no gradient. Attention never crosses a document boundary: without CP, causal, fp16/bf16
  on CUDA, one ``torch.nn.attention.varlen.varlen_attn`` flash kernel covers the whole pack (torch >= 2.9;
  set ``use_varlen = False`` to turn it off); otherwise, for a pack registered by ``model/packed.py`` (every
  pack the trainer builds), causal attention runs as one batched SDPA per bucket of similar-length documents
  (``packed.attention_plan``: a fixed number of ops whatever the number of documents), and under CP one per
  bucket of document halves (``packed.cp_attention_plan``: the bottom-right causal mask of each half as an
  explicit boolean mask); else SDPA runs once per document (per half under CP). A registered pack's ``cu_seqlens`` come from its host-side ``PackInfo``, so the
  layer never reads them back from the device.

Masking: ``causal``/``padding_causal`` apply the causal constraint (aligned to the bottom-right when sq != sk,
as for decoding with a KV cache); ``causal_bottom_right`` likewise; ``no_mask``/``padding`` do not. A given
boolean ``attention_mask`` (megatron convention: True = masked out, broadcastable to [b, np, sq, sk]) is always
applied on top (``padding``/``arbitrary`` require one). Rows with every key masked average V uniformly over all
keys with no gradient to Q/K, as megatron's ``masked_fill(-10000)`` softmax does, instead of producing NaN. Masks are not accepted with thd (the
documents define the mask). Passing ``attention_mask=None`` keeps the fast flash path for causal attention.

Context parallelism (CP size cp > 1, self-attention only)

- Layout (megatron's ``get_batch_on_this_cp_rank``, computed by ``dasd_megatron.parallel_layout``): the
  sequence of length S is cut into 2*cp chunks of c = S / (2*cp) tokens; CP rank r holds chunks r and
  2*cp-1-r, locally ordered [chunk r, chunk 2*cp-1-r].
  With thd, every document is padded to a multiple of 2*cp (``cu_seqlens_q_padded``, global offsets) and split
  the same way (Transformer Engine's ``thd_get_partitioned_indices``); the local pack is the concatenation of
  each document's two local chunks, so document i starts at ``cu_seqlens_q_padded[i] / cp`` locally.
  An ``attention_mask`` under CP is megatron's split one: ``[b, 1, sq_local, S]`` (queries local, keys global).
- Collectives, per forward: ONE ``all_gather_into_tensor`` over the CP group of the stacked local [K; V]
  (two when hk != hv). The gathered keys/values are permuted to global order with one ``index_select``;
  each local query chunk (global chunk index g) then attends to the keys ``[0, (g+1)*c)`` with a
  bottom-right-aligned causal mask (``torch.nn.attention.bias.causal_lower_right``, which keeps the
  flash/efficient kernels). Backward: the gradient of the gathered K/V is summed back to its owner with ONE
  ``reduce_scatter_tensor`` (SUM) per gathered tensor (`_AllGatherCP`); queries never move.
- Cost: each rank holds the full-length K and V of its CP group (ng heads) for the layer; that is the price of
  the all-gather scheme (megatron/TE's ``cp_comm_type='all_gather'``), whatever ``cp_comm_type`` says.

Process groups: the CP group is ``pg_collection.cp`` when given, else a ``cp_group`` keyword or attribute of
``pg_collection``, else ``megatron.core.parallel_state.get_context_parallel_group(check_initialized=False)``;
without one, CP size is 1. ``set_context_parallel_group`` changes it later (as Transformer Engine's does).
Tensor parallelism needs nothing here: the heads per rank are read from the tensors.

Not supported (each fails with a clear error): attention_bias, window (sliding) attention, softmax_type other
than 'vanilla', qk_clip, float masks, thd with an attention_mask, CP with cross-attention or with a mask type
that has no causal/no-mask meaning. ``apply_query_key_layer_scaling`` is accepted: megatron divides the scale by
the layer number and multiplies the scores back inside the softmax, so the result is the same softmax.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import math
import warnings
from typing import Any, Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor

from megatron.core import parallel_state, tensor_parallel
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig

from dasd_megatron.model.packed import pack_info
from dasd_megatron.parallel_layout import zigzag_global_index

try:  # torch >= 2.3
    from torch.nn.attention.bias import causal_lower_right as _causal_lower_right
except ImportError:  # pragma: no cover - older torch: materialise the mask instead
    _causal_lower_right = None

try:  # torch >= 2.9: one flash-attention varlen kernel for a whole pack (CUDA, fp16/bf16)
    from torch.nn.attention.varlen import varlen_attn as _varlen_attn

    _VARLEN_PARAMS = frozenset(inspect.signature(_varlen_attn).parameters)
except Exception:  # noqa: BLE001 - absent or changed API: the per-document loop is used
    _varlen_attn, _VARLEN_PARAMS = None, frozenset()

logger = logging.getLogger(__name__)

__all__ = ["SDPACoreAttention", "all_gather_cp", "sdpa"]

_CAUSAL_TYPES = {"causal", "padding_causal", "causal_bottom_right"}
_NONCAUSAL_TYPES = {"no_mask", "padding", "arbitrary"}
# Keyword arguments that other megatron/TE core-attention builders pass and that need no action here.
_IGNORED_INIT_KWARGS = {"num_splits", "model_comm_pgs", "tp_comm_buffer_name"}


# --------------------------------------------------------------------------------------------------
# Collectives
# --------------------------------------------------------------------------------------------------


class _AllGatherCP(torch.autograd.Function):
    """All-gather along dim 0 over a process group; backward sums the gradients back to their owner.

    Forward:  y = concat_j x_j (``all_gather_into_tensor``), x_j = rank j's ``[n, ...]`` -> y ``[cp*n, ...]``.
    Backward: dL/dx_r = sum_j (dL/dy on rank j)[r*n:(r+1)*n] (``reduce_scatter_tensor``, SUM), because every
    rank's copy of x_r took part in that rank's loss.
    """

    @staticmethod
    def forward(ctx, x: Tensor, group) -> Tensor:  # noqa: D102
        ctx.group = group
        world = dist.get_world_size(group)
        x = x.contiguous()
        out = x.new_empty((world * x.shape[0],) + tuple(x.shape[1:]))
        dist.all_gather_into_tensor(out, x, group=group)
        return out

    @staticmethod
    def backward(ctx, grad: Tensor):  # noqa: D102
        world = dist.get_world_size(ctx.group)
        grad = grad.contiguous()
        out = grad.new_empty((grad.shape[0] // world,) + tuple(grad.shape[1:]))
        dist.reduce_scatter_tensor(out, grad, op=dist.ReduceOp.SUM, group=ctx.group)
        return out, None


def all_gather_cp(x: Tensor, group) -> Tensor:
    """Autograd-correct all-gather of ``x`` along dim 0 over ``group`` (see `_AllGatherCP`)."""
    return _AllGatherCP.apply(x, group)


# --------------------------------------------------------------------------------------------------
# The attention kernel call
# --------------------------------------------------------------------------------------------------


def sdpa(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    causal: bool,
    allowed: Optional[Tensor],
    scale: float,
    dropout_p: float,
) -> Tensor:
    """SDPA on q ``[B, H, L, hk]``, k ``[B, G, S, hk]``, v ``[B, G, S, hv]`` (H % G == 0) -> ``[B, H, L, hv]``.

    ``causal``: query i sees keys j <= i + (S - L) (bottom-right aligned; the usual mask when L == S).
    ``allowed``: optional boolean mask, True = may attend (SDPA convention), broadcastable to [B, H, L, S].
    """
    L, S = q.size(-2), k.size(-2)
    kwargs: dict[str, Any] = dict(dropout_p=dropout_p, scale=scale)
    if q.size(1) != k.size(1):
        if allowed is not None and q.is_cuda:
            # GQA in SDPA runs on the flash and math kernels only; flash takes no explicit mask, and math would
            # materialise [B, H, L, S] scores. Repeat K/V (megatron's own GQA mapping) for the efficient kernel.
            rep = q.size(1) // k.size(1)
            k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        else:
            kwargs["enable_gqa"] = True
    if allowed is None:
        if not causal:
            return F.scaled_dot_product_attention(q, k, v, **kwargs)
        if L == S:
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, **kwargs)
        if L > S:
            raise ValueError(f"causal attention with more queries ({L}) than keys ({S}) is not defined here")
        if _causal_lower_right is not None:
            return F.scaled_dot_product_attention(q, k, v, attn_mask=_causal_lower_right(L, S), **kwargs)
        allowed = torch.ones(L, S, dtype=torch.bool, device=q.device).tril(S - L)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, **kwargs)
    if causal:
        allowed = allowed & torch.ones(L, S, dtype=torch.bool, device=q.device).tril(S - L)
    # A row with no visible key: megatron's masked_fill(-10000) makes its scores constant, so it averages V
    # uniformly over all keys and sends no gradient to Q or K; SDPA would give NaN (or 0, by version).
    # Match megatron: unmask the row and zero its query (scores 0 -> uniform; the product zeroes dQ, dK).
    row_ok = allowed.any(dim=-1, keepdim=True)
    allowed = allowed | ~row_ok
    q = q * row_ok.to(q.dtype)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, **kwargs)


def _keep_rows(cu_pad: list[int], lens: list[int], t: int) -> Tensor:
    """[t, 1, 1] host mask: 1 on each document's real rows, 0 on padding and on a tail after the pack."""
    keep = torch.zeros(t, 1, 1)
    for start, n in zip(cu_pad[:-1], lens):
        keep[start:start + n] = 1
    return keep


def _varlen_causal(q: Tensor, k: Tensor, v: Tensor, bounds: list[int], scale: float,
                   cu: Optional[Tensor] = None) -> Optional[Tensor]:
    """Causal attention within each segment [bounds[i], bounds[i+1]) of a pack, with one varlen kernel.

    q ``[t, np, hk]``, k/v ``[t, ng, hk]``. Returns ``[t, np, hk]``, or None where this torch's
    ``varlen_attn`` lacks what is needed (the caller then loops over documents).
    """
    if _varlen_attn is None:
        return None
    kwargs: dict[str, Any] = {}
    if "window_size" in _VARLEN_PARAMS:  # torch >= 2.10 spells causal as a (-1, 0) window
        kwargs["window_size"] = (-1, 0)
    elif "is_causal" in _VARLEN_PARAMS:
        kwargs["is_causal"] = True
    else:
        return None
    if "scale" in _VARLEN_PARAMS:
        kwargs["scale"] = scale
    elif not math.isclose(scale, 1.0 / math.sqrt(q.size(-1))):
        return None
    if q.size(1) != k.size(1):
        if "enable_gqa" in _VARLEN_PARAMS:
            kwargs["enable_gqa"] = True
        else:
            rep = q.size(1) // k.size(1)
            k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    if cu is None:
        cu = torch.tensor(bounds, dtype=torch.int32).to(q.device, non_blocking=True)
    max_len = max(b - a for a, b in zip(bounds[:-1], bounds[1:]))
    return _varlen_attn(q, k, v, cu, cu, max_len, max_len, **kwargs)


# --------------------------------------------------------------------------------------------------
# The module
# --------------------------------------------------------------------------------------------------


class SDPACoreAttention(MegatronModule):
    """Drop-in for megatron-core's ``DotProductAttention`` built on torch SDPA (see the module docstring).

    Args (as megatron's ``DotProductAttention``):
        config: the TransformerConfig (kv_channels, attention_dropout, context_parallel_size, ...).
        layer_number: 1-based layer index (only kept for parity; the softmax does not depend on it).
        attn_mask_type: default mask type, e.g. ``AttnMaskType.causal`` from the local GPT spec.
        attention_type: 'self' or 'cross' (CP supports 'self' only).
        attention_dropout: overrides ``config.attention_dropout``.
        softmax_scale: overrides the default ``1/sqrt(k_channels or config.kv_channels)``.
        cp_comm_type: accepted for signature parity; communication is always the K/V all-gather.
        pg_collection: a ``ProcessGroupCollection``; its ``cp`` group (if any) is the CP group.
        k_channels, v_channels: key/value head dims when they differ from ``config.kv_channels``
            (what megatron passes to TE's attention for MLA).
        cp_group: an explicit CP group (overrides ``pg_collection``).
        **kwargs: other arguments a newer megatron may pass; unknown non-None ones are warned about.
    """

    def __init__(
        self,
        config: TransformerConfig,
        layer_number: int,
        attn_mask_type: AttnMaskType,
        attention_type: str,
        attention_dropout: Optional[float] = None,
        softmax_scale: Optional[float] = None,
        cp_comm_type: Optional[str] = None,
        pg_collection: Optional[Any] = None,
        k_channels: Optional[int] = None,
        v_channels: Optional[int] = None,
        cp_group: Optional[Any] = None,
        **kwargs: Any,
    ):
        super().__init__(config=config)
        self.config: TransformerConfig = config
        self.layer_number = max(1, int(layer_number))
        self.attn_mask_type = attn_mask_type
        self.attention_type = attention_type
        self.cp_comm_type = cp_comm_type
        self.pg_collection = pg_collection
        unknown = sorted(k for k, v in kwargs.items() if v is not None and k not in _IGNORED_INIT_KWARGS)
        if unknown:
            warnings.warn(f"SDPACoreAttention ignores the constructor arguments {unknown}", stacklevel=2)

        self._check_config(config)

        self.k_channels = int(k_channels if k_channels is not None else config.kv_channels)
        self.v_channels = int(v_channels if v_channels is not None else config.kv_channels)
        self.softmax_scale = (
            float(softmax_scale) if softmax_scale is not None else 1.0 / math.sqrt(self.k_channels)
        )
        # apply_query_key_layer_scaling: megatron divides the scale by layer_number and FusedScaleMaskSoftmax
        # multiplies the scores by layer_number again -> the same softmax; nothing to do (SDPA kernels keep
        # the scores in fp32).
        self.attention_dropout_p = float(
            config.attention_dropout if attention_dropout is None else attention_dropout
        )
        # For parity with DotProductAttention (megatron's inference path reads it with getattr).
        self.softmax_offset = None
        # thd on CUDA without CP: one torch varlen flash kernel per pack instead of one SDPA per document.
        self.use_varlen = True

        if cp_group is None and pg_collection is not None:
            cp_group = getattr(pg_collection, "cp", None)
            if cp_group is None:
                cp_group = getattr(pg_collection, "cp_group", None)
        if cp_group is None:
            cp_group = parallel_state.get_context_parallel_group(check_initialized=False)
        self.cp_group = cp_group

    @staticmethod
    def _check_config(config: TransformerConfig) -> None:
        softmax_type = getattr(config, "softmax_type", "vanilla")
        if softmax_type not in (None, "vanilla"):
            raise NotImplementedError(
                f"SDPACoreAttention: config.softmax_type={softmax_type!r} is not supported (needs 'vanilla'); "
                "use megatron's DotProductAttention or TE for off-by-one/learnable softmax."
            )
        if getattr(config, "window_size", None):
            raise NotImplementedError(
                f"SDPACoreAttention: config.window_size={config.window_size!r} (sliding-window attention) is "
                "not supported; set window_size=None or use the TE layer spec."
            )
        if getattr(config, "qk_clip", False):
            raise NotImplementedError(
                "SDPACoreAttention: config.qk_clip=True needs the max attention logits, which SDPA does not "
                "expose; set qk_clip=False."
            )
        if config.kv_channels is None:
            raise ValueError("SDPACoreAttention: config.kv_channels is None; TransformerConfig normally sets it.")

    # ---------------------------------------------------------------- process groups

    def set_context_parallel_group(self, cp_group: Any) -> None:
        """Use ``cp_group`` (None = no context parallelism) from now on."""
        self.cp_group = cp_group

    def _cp_size_rank(self) -> tuple[int, int]:
        group = self.cp_group
        size = 1 if group is None else dist.get_world_size(group)
        rank = 0 if group is None else dist.get_rank(group)
        expected = getattr(self.config, "context_parallel_size", 1) or 1
        if size != expected:
            raise ValueError(
                f"SDPACoreAttention: config.context_parallel_size={expected} but the CP group has {size} "
                "rank(s); pass pg_collection with the right .cp (or cp_group=...), or initialise megatron's "
                "parallel_state with the same context_parallel_size."
            )
        return size, rank

    # ---------------------------------------------------------------- forward

    def forward(
        self,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        attention_mask: Optional[Tensor],
        attn_mask_type: Optional[AttnMaskType] = None,
        attention_bias: Optional[Tensor] = None,
        packed_seq_params: Optional[PackedSeqParams] = None,
        **kwargs: Any,
    ) -> Tensor:
        """Attention of query over key/value; shapes as megatron's DotProductAttention (module docstring)."""
        extra = sorted(k for k, v in kwargs.items() if v is not None)
        if extra:
            raise TypeError(f"SDPACoreAttention.forward got unsupported arguments {extra}")
        if attention_bias is not None:
            raise NotImplementedError("SDPACoreAttention: attention_bias is not supported (as in DotProductAttention).")
        mask_type = self.attn_mask_type if attn_mask_type is None else attn_mask_type
        name = getattr(mask_type, "name", str(mask_type))
        if name in _CAUSAL_TYPES:
            causal = True
        elif name in _NONCAUSAL_TYPES:
            causal = False
        else:
            raise NotImplementedError(f"SDPACoreAttention: attn_mask_type={mask_type} is not supported.")
        if name in ("padding", "arbitrary") and attention_mask is None and packed_seq_params is None:
            raise ValueError(f"SDPACoreAttention: attn_mask_type={mask_type} needs an attention_mask.")
        if attention_mask is not None and attention_mask.dtype != torch.bool:
            raise TypeError(
                f"SDPACoreAttention: attention_mask must be boolean (True = masked out), got {attention_mask.dtype}."
            )
        if query.size(-2) % key.size(-2) != 0:
            raise ValueError(
                f"SDPACoreAttention: {query.size(-2)} query heads are not a multiple of {key.size(-2)} key heads."
            )

        dropout_p = self.attention_dropout_p if self.training else 0.0
        cp, cp_rank = self._cp_size_rank()
        if cp > 1 and self.attention_type != "self":
            raise NotImplementedError(
                f"SDPACoreAttention: context parallelism with attention_type={self.attention_type!r} is not supported."
            )

        # Megatron forks the model-parallel RNG state around attention dropout unless sequence parallel.
        rng = contextlib.nullcontext()
        if dropout_p > 0.0 and not self.config.sequence_parallel:
            rng = tensor_parallel.get_cuda_rng_tracker().fork()
        with rng:
            fmt = None if packed_seq_params is None else packed_seq_params.qkv_format
            if fmt == "thd":
                return self._forward_thd(query, key, value, attention_mask, packed_seq_params, causal, dropout_p, cp, cp_rank)
            if fmt not in (None, "sbhd"):
                raise NotImplementedError(
                    f"SDPACoreAttention: packed_seq_params.qkv_format={fmt!r} is not supported ('sbhd' or 'thd')."
                )
            return self._forward_sbhd(query, key, value, attention_mask, causal, dropout_p, cp, cp_rank)

    def _gather_kv_global(self, key: Tensor, value: Tensor, index: Tensor) -> tuple[Tensor, Tensor]:
        """All-gather local K, V (dim 0 = tokens) over CP and return them in global token order."""
        if key.shape[:-1] == value.shape[:-1] and key.shape[-1] == value.shape[-1]:
            kv = all_gather_cp(torch.stack([key, value], dim=1), self.cp_group)
            kv = kv.index_select(0, index)
            return kv[:, 0], kv[:, 1]
        k = all_gather_cp(key, self.cp_group).index_select(0, index)
        v = all_gather_cp(value, self.cp_group).index_select(0, index)
        return k, v

    def _forward_sbhd(self, query, key, value, attention_mask, causal, dropout_p, cp, cp_rank) -> Tensor:
        if query.dim() != 4 or key.dim() != 4 or value.dim() != 4:
            raise ValueError(
                "SDPACoreAttention: expected query/key/value [s, b, heads, dim], got "
                f"{tuple(query.shape)}, {tuple(key.shape)}, {tuple(value.shape)}"
            )
        sq, b, npr, _ = query.shape
        allowed = None if attention_mask is None else ~attention_mask
        q = query.permute(1, 2, 0, 3)  # [b, np, sq, hk]
        if cp == 1:
            k = key.permute(1, 2, 0, 3)
            v = value.permute(1, 2, 0, 3)
            out = sdpa(q, k, v, causal=causal, allowed=allowed, scale=self.softmax_scale, dropout_p=dropout_p)
        else:
            if key.size(0) != sq or sq % 2:
                raise ValueError(
                    f"SDPACoreAttention with CP={cp}: local query/key lengths ({sq}, {key.size(0)}) must be equal "
                    "and even (megatron's zig-zag split into 2*cp chunks)."
                )
            c = sq // 2
            index = zigzag_global_index([sq * cp], cp, device=key.device)
            kg, vg = self._gather_kv_global(key, value, index)  # [S, b, ng, h]
            kg = kg.permute(1, 2, 0, 3)
            vg = vg.permute(1, 2, 0, 3)
            if allowed is not None and allowed.size(-1) != sq * cp:
                raise ValueError(
                    f"SDPACoreAttention with CP={cp}: attention_mask must be [.., sq_local={sq}, S={sq * cp}] "
                    f"(megatron splits only the query dim), got {tuple(attention_mask.shape)}"
                )
            if not causal:
                out = sdpa(q, kg, vg, causal=False, allowed=allowed, scale=self.softmax_scale, dropout_p=dropout_p)
            else:
                outs = []
                for half, g in ((0, cp_rank), (1, 2 * cp - 1 - cp_rank)):
                    rows = slice(half * c, (half + 1) * c)
                    n_keys = (g + 1) * c
                    a = None if allowed is None else allowed[..., rows, :n_keys]
                    outs.append(
                        sdpa(
                            q[:, :, rows], kg[:, :, :n_keys], vg[:, :, :n_keys],
                            causal=True, allowed=a, scale=self.softmax_scale, dropout_p=dropout_p,
                        )
                    )
                out = torch.cat(outs, dim=2)
        # [b, np, sq, hv] -> [sq, b, np*hv]
        return out.permute(2, 0, 1, 3).reshape(sq, b, npr * out.size(-1))

    def _forward_thd(self, query, key, value, attention_mask, psp, causal, dropout_p, cp, cp_rank) -> Tensor:
        if attention_mask is not None:
            raise ValueError(
                "SDPACoreAttention: attention_mask must be None with qkv_format='thd' (cu_seqlens define the mask)."
            )
        four_d = query.dim() == 4
        if four_d:
            if query.size(1) != 1 or key.size(1) != 1 or value.size(1) != 1:
                raise ValueError(f"SDPACoreAttention thd: expected [t, 1, heads, dim], got {tuple(query.shape)}")
            query, key, value = query.squeeze(1), key.squeeze(1), value.squeeze(1)
        if query.dim() != 3:
            raise ValueError(f"SDPACoreAttention thd: expected [t, heads, dim], got {tuple(query.shape)}")
        t, npr, _ = query.shape
        hv = value.size(-1)

        # The pack's layout as host lists: from its registered PackInfo (computed once per micro-batch when it was
        # packed: no device read-back here, model/packed.py), else read back from the tensors (one sync per list).
        info = pack_info(psp.cu_seqlens_q)
        same_kv = psp.cu_seqlens_kv is None or psp.cu_seqlens_kv is psp.cu_seqlens_q
        same_kv_pad = getattr(psp, "cu_seqlens_kv_padded", None) is psp.cu_seqlens_q_padded
        if info is not None and same_kv and same_kv_pad and int(info.positions.shape[0]) == t:
            cu, cu_pad = list(info.cu), list(info.cu_pad)
            cu_kv, cu_kv_pad = cu, cu_pad
        else:
            info = None
            cu = _as_list(psp.cu_seqlens_q, "cu_seqlens_q")
            cu_kv = _as_list(psp.cu_seqlens_kv, "cu_seqlens_kv") if psp.cu_seqlens_kv is not None else cu
            cu_pad = (_as_list(psp.cu_seqlens_q_padded, "cu_seqlens_q_padded")
                      if psp.cu_seqlens_q_padded is not None else cu)
            cu_kv_pad = (
                _as_list(psp.cu_seqlens_kv_padded, "cu_seqlens_kv_padded")
                if getattr(psp, "cu_seqlens_kv_padded", None) is not None
                else cu_pad
            )
        if cu_kv != cu or cu_kv_pad != cu_pad or key.size(0) != t:
            raise NotImplementedError(
                "SDPACoreAttention thd: only self-attention is supported (cu_seqlens_kv[_padded] must equal "
                "cu_seqlens_q[_padded] and key/value must have the query's token count)."
            )
        if len(cu) != len(cu_pad) or cu[0] != 0 or cu_pad[0] != 0:
            raise ValueError(f"SDPACoreAttention thd: bad cu_seqlens {cu} / padded {cu_pad}")
        lens = [b - a for a, b in zip(cu[:-1], cu[1:])]
        pad_lens = [b - a for a, b in zip(cu_pad[:-1], cu_pad[1:])]
        if any(n < 0 or n > p for n, p in zip(lens, pad_lens)):
            raise ValueError(f"SDPACoreAttention thd: cu_seqlens_q {cu} do not fit in cu_seqlens_q_padded {cu_pad}")
        if cu_pad[-1] > t * cp:
            raise ValueError(
                f"SDPACoreAttention thd: the pack spans {cu_pad[-1]} tokens but the input holds {t} x cp={cp}"
            )

        def heads_first(x: Tensor) -> Tensor:  # [n, h, d] -> [1, h, n, d]
            return x.transpose(0, 1).unsqueeze(0)

        def attend(qs: Tensor, ks: Tensor, vs: Tensor, is_causal: bool) -> Tensor:  # -> [n, np, hv]
            o = sdpa(
                heads_first(qs), heads_first(ks), heads_first(vs),
                causal=is_causal, allowed=None, scale=self.softmax_scale, dropout_p=dropout_p,
            )
            return o[0].transpose(0, 1)

        pieces: list[Tensor] = []
        pos = 0  # local write position

        def zeros(n: int) -> None:
            if n > 0:
                pieces.append(query.new_zeros(n, npr, hv))

        fast = None
        if (
            cp == 1 and causal and self.use_varlen and query.is_cuda and dropout_p == 0.0
            and query.dtype in (torch.float16, torch.bfloat16) and query.size(-1) == hv and hv <= 256
        ):
            # Padded documents run as segments [cu_pad[i], cu_pad[i+1]) (their padding comes after the real
            # tokens, so causal real queries never see it); a tail after the pack is one more segment.
            bounds = sorted(set(cu_pad + [t]))
            cu_dev, keep = info.varlen_tables(t, query.device) if info is not None else (None, None)
            fast = _varlen_causal(query, key, value, bounds, self.softmax_scale, cu=cu_dev)
            if fast is not None and (lens != pad_lens or cu_pad[-1] != t):
                if keep is None:
                    keep = _keep_rows(cu_pad, lens, t).to(fast.device, non_blocking=True)
                fast = fast * keep.to(fast.dtype)  # padding: zero output, no gradient
        if fast is not None:
            pieces.append(fast)
            pos = t
        elif cp == 1 and causal and info is not None:
            # All documents in a fixed number of batched SDPA calls (documents bucketed by length), whatever
            # their number: see `model/packed.py::attention_plan`.
            plan = info.attention_plan(query.device)
            ng = key.size(1)
            outs = []
            for b in plan.buckets:
                def gather(x: Tensor, heads: int) -> Tensor:  # -> [n_docs, heads, length, dim]
                    return x.index_select(0, b.gather).view(b.n_docs, b.length, heads, x.size(-1)).transpose(1, 2)

                o = sdpa(gather(query, npr), gather(key, ng), gather(value, ng), causal=True, allowed=None,
                         scale=self.softmax_scale, dropout_p=dropout_p)
                outs.append(o.transpose(1, 2).reshape(b.n_docs * b.length, npr * hv))
            outs.append(query.new_zeros(1, npr * hv))
            out = torch.cat(outs, dim=0).index_select(0, plan.scatter)
            return out.unsqueeze(1) if four_d else out
        elif cp == 1:
            for start, n in zip(cu_pad[:-1], lens):
                if n == 0:
                    continue
                zeros(start - pos)
                pieces.append(attend(query[start:start + n], key[start:start + n], value[start:start + n], causal))
                pos = start + n
        else:
            bad = [p for p in pad_lens if p % (2 * cp)]
            if bad:
                raise ValueError(
                    f"SDPACoreAttention thd with CP={cp}: every padded document length must be a multiple of "
                    f"2*cp={2 * cp} (cu_seqlens_q_padded={cu_pad}); pad documents as megatron/TE require."
                )
            if causal and info is not None:
                # Every document half in a fixed number of batched SDPA calls (model/packed.py).
                plan = info.cp_attention_plan(t, cp, cp_rank, query.device)
                kg, vg = self._gather_kv_global(key, value, plan.kv_index)  # [cu_pad[-1], ng, h], global order
                ng = key.size(1)
                outs = []
                for b in plan.buckets:
                    qb = query.index_select(0, b.q_gather).view(b.n, b.q_len, npr, -1).transpose(1, 2)
                    kb = kg.index_select(0, b.k_gather).view(b.n, b.k_len, ng, -1).transpose(1, 2)
                    vb = vg.index_select(0, b.k_gather).view(b.n, b.k_len, ng, -1).transpose(1, 2)
                    rows = torch.arange(b.q_len, device=query.device)
                    cols = torch.arange(b.k_len, device=query.device)
                    allowed = (cols[None, None, :] <= rows[None, :, None] + b.offset[:, None, None]).unsqueeze(1)
                    o = sdpa(qb, kb, vb, causal=False, allowed=allowed, scale=self.softmax_scale, dropout_p=dropout_p)
                    outs.append(o.transpose(1, 2).reshape(b.n * b.q_len, npr * hv))
                outs.append(query.new_zeros(1, npr * hv))
                out = torch.cat(outs, dim=0).index_select(0, plan.scatter)
                return out.unsqueeze(1) if four_d else out
            n_local = cu_pad[-1] // cp
            # The gathered tensor is rank-major over the ranks' full local tensors (t tokens each).
            index = zigzag_global_index(pad_lens, cp, device=key.device)
            index = index + (index // n_local) * (t - n_local)  # account for a local tail after the pack
            kg, vg = self._gather_kv_global(key, value, index)  # [cu_pad[-1], ng, h], global order
            for gstart, n, plen in zip(cu_pad[:-1], lens, pad_lens):
                c = plen // (2 * cp)
                lstart = gstart // cp
                for half, g in ((0, cp_rank), (1, 2 * cp - 1 - cp_rank)):
                    q0 = lstart + half * c
                    nq = max(0, min(c, n - g * c))  # real (unpadded) queries in this chunk
                    if nq == 0:
                        continue
                    n_keys = g * c + nq if causal else n
                    zeros(q0 - pos)
                    pieces.append(
                        attend(query[q0:q0 + nq], kg[gstart:gstart + n_keys], vg[gstart:gstart + n_keys], causal)
                    )
                    pos = q0 + nq
        zeros(t - pos)
        if not pieces:  # t == 0
            out = query.new_zeros(0, npr, hv)
        else:
            out = torch.cat(pieces, dim=0) if len(pieces) > 1 else pieces[0]
        out = out.reshape(t, npr * hv)
        return out.unsqueeze(1) if four_d else out

    def sharded_state_dict(self, prefix: str = "", sharded_offsets=(), metadata: Optional[dict] = None):
        """No parameters or buffers: nothing to checkpoint."""
        return {}


def _as_list(x: Any, name: str) -> list[int]:
    if isinstance(x, Tensor):
        if x.dim() != 1:
            raise ValueError(f"SDPACoreAttention thd: {name} must be 1-D, got shape {tuple(x.shape)}")
        return [int(v) for v in x.tolist()]
    if x is None:
        raise ValueError(f"SDPACoreAttention thd: {name} is required")
    return [int(v) for v in x]
