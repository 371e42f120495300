"""Packed sequences (thd) without per-document work or host syncs inside the layer stack.

A packed micro-batch is one row of documents back to back (`cu_seqlens`). megatron-core, without Transformer Engine,
treats it per document in every layer: its unfused thd RoPE (`rope_utils._apply_rotary_pos_emb_thd`) reads
`cu_seqlens` back to the host (`.tolist()`, `.item()`) and slices the frequencies (0.16) or applies RoPE (0.19)
once per document, for the query and the key of every layer, forward and recompute; our SDPA core attention read
`cu_seqlens` back per layer too. On a GPU each of those is a host sync and dozens of tiny kernel launches.

Here everything that depends only on the pack's layout is computed once per micro-batch, on the host, when the
batch is packed (`PackInfo`, registered under the pack's `cu_seqlens` tensors by `packed_seq_params`):

- `positions`: the RoPE position of each local row (restarting at 0 per document; under context parallelism the
  zig-zag rows of megatron's layout), a device tensor. `apply_rotary_pos_emb` (installed in place of megatron's for
  `megatron.core.transformer.attention`) takes ``cos/sin = cos/sin(freqs[positions]) * mscale`` ONCE per forward
  (cached per frequency table and dtype) and applies them to the whole pack in one op per layer: the same values
  megatron computes document by document, so the result is bit-for-bit megatron's unfused path (tested).
- the host lists `cu`, `cu_pad` the SDPA core attention needs (no `.tolist()` per layer), and the batched-attention
  plan (`attention_plan`: documents bucketed by length, gather/scatter indices on the device), so attention is a
  fixed number of ops whatever the number of documents.

Anything this does not cover falls back to megatron's own function unchanged: TE's fused RoPE
(`apply_rope_fusion`), interleaved or MLA/mRoPE variants, a pack not registered here (e.g. built by other code),
positions beyond the frequency table. `set_fast_path(False)` restores the landed path everywhere (the benchmark's
`--baseline`).

The layer-wise RoPE arithmetic runs through `dasd_megatron.kernels.apply_rope` with the model's fused-kernel backend
(`model.fused_kernels`): 'torch' is megatron's exact arithmetic, 'triton' one fused kernel.
"""

from __future__ import annotations

import collections
import dataclasses
import threading
from typing import Any, Optional, Sequence

import torch
from torch import Tensor
from torch.utils.weak import WeakIdKeyDictionary

__all__ = ["PackInfo", "apply_rotary_pos_emb", "attention_plan", "cp_attention_plan", "fast_path_enabled", "install", "pack_info",
           "packed_seq_params", "set_fast_path"]

_FAST = True
_REGISTRY: "WeakIdKeyDictionary" = WeakIdKeyDictionary()
_LOCK = threading.Lock()
_ROPE_CACHE: "collections.OrderedDict" = collections.OrderedDict()
_ROPE_CACHE_SIZE = 4  # packs whose cos/sin tables stay cached (student + teacher of the current micro-batch, ...)
_ORIGINAL = None  # megatron's apply_rotary_pos_emb, as imported by megatron.core.transformer.attention


def set_fast_path(enabled: bool) -> None:
    """Turn the packed-sequence fast path on (default) or off (megatron's per-document path, as before)."""
    global _FAST
    _FAST = bool(enabled)


def fast_path_enabled() -> bool:
    return _FAST


@dataclasses.dataclass
class AttentionBucket:
    """Documents of similar length attended as one batch `[n_docs, heads, length, dim]` (causal)."""

    n_docs: int
    length: int
    gather: Tensor  # [n_docs * length] long: the local row each slot reads (pad slots repeat a real row)


@dataclasses.dataclass
class AttentionPlan:
    buckets: list[AttentionBucket]
    scatter: Tensor  # [t] long: for each local row, its slot in the concatenated bucket outputs, or `slots` (zero)
    slots: int


@dataclasses.dataclass
class PackInfo:
    """Host-side description of one packed micro-batch (this rank's rows). See the module docstring."""

    cu: tuple[int, ...]
    cu_pad: tuple[int, ...]
    positions: Tensor  # [t_local] long, on the model's device
    max_position: int  # largest value in `positions` (host)
    cp: int = 1
    _plans: dict = dataclasses.field(default_factory=dict, repr=False)

    @property
    def lengths(self) -> list[int]:
        return [b - a for a, b in zip(self.cu[:-1], self.cu[1:])]

    @property
    def padded_lengths(self) -> list[int]:
        return [b - a for a, b in zip(self.cu_pad[:-1], self.cu_pad[1:])]

    def rope_tables(self, freqs: Tensor, dtype: torch.dtype, mscale: float) -> tuple[Tensor, Tensor]:
        """`(cos, sin)` `[t, 1, rot_dim]` of this pack's rows for megatron's frequency table `freqs` `[S, 1, 1, rot]`:
        ``(cos(freqs[p]) * mscale).to(dtype)`` as megatron computes it, once per (pack, table, dtype, mscale) while
        the tables stay in `_ROPE_CACHE` (the few most recent packs: a forward's layers, its recompute)."""
        key = (id(self), id(freqs), dtype, float(mscale))
        with _LOCK:
            hit = _ROPE_CACHE.get(key)
            if hit is not None and hit[0] is self and hit[1] is freqs:
                _ROPE_CACHE.move_to_end(key)
                return hit[2], hit[3]
        f = freqs.reshape(freqs.shape[0], freqs.shape[-1]).index_select(0, self.positions).unsqueeze(1)
        cos = (torch.cos(f) * mscale).to(dtype)
        sin = (torch.sin(f) * mscale).to(dtype)
        with _LOCK:  # the value holds `self` and `freqs`, so their ids cannot be reused while the entry lives
            _ROPE_CACHE[key] = (self, freqs, cos, sin)
            while len(_ROPE_CACHE) > _ROPE_CACHE_SIZE:
                _ROPE_CACHE.popitem(last=False)
        return cos, sin

    def varlen_tables(self, t: int, device: torch.device) -> tuple[Tensor, Optional[Tensor]]:
        """For the one-kernel varlen flash attention of a `t`-row pack: the segment bounds (documents padded,
        plus a tail) as an int32 device tensor, and a `[t, 1, 1]` 0/1 mask of real rows (None when every row is
        real); built once per pack and device."""
        key = ("varlen", t, str(device))
        hit = self._plans.get(key)
        if hit is None:
            bounds = sorted(set(self.cu_pad) | {t})
            keep = None
            lens = self.lengths
            if lens != self.padded_lengths or self.cu_pad[-1] != t:
                keep = torch.zeros(t, 1, 1)
                for start, n in zip(self.cu_pad[:-1], lens):
                    keep[start:start + n] = 1
                keep = keep.to(device, non_blocking=True)
            hit = (torch.tensor(bounds, dtype=torch.int32).to(device, non_blocking=True), keep)
            self._plans[key] = hit
        return hit

    def cp_attention_plan(self, t: int, cp: int, cp_rank: int, device: torch.device) -> CPAttentionPlan:
        """This CP rank's batched causal attention (`cp_attention_plan`), built once per pack and device."""
        key = ("cp", t, cp, cp_rank, str(device))
        plan = self._plans.get(key)
        if plan is None:
            plan = cp_attention_plan(self.cu_pad, self.lengths, t=t, cp=cp, cp_rank=cp_rank, device=device)
            self._plans[key] = plan
        return plan

    def attention_plan(self, device: torch.device, max_waste: float = 1.25) -> AttentionPlan:
        """The batched causal attention of this pack (no context parallelism): see `attention_plan`."""
        key = str(device)
        plan = self._plans.get(key)
        if plan is None:
            plan = attention_plan(self.cu_pad, self.lengths, t=int(self.positions.shape[0]), device=device,
                                  max_waste=max_waste)
            self._plans[key] = plan
        return plan


def attention_plan(cu_pad: Sequence[int], lengths: Sequence[int], *, t: int, device, max_waste: float = 1.25
                   ) -> AttentionPlan:
    """Bucket the documents (start `cu_pad[i]`, `lengths[i]` real tokens) of a `t`-row pack for batched attention.

    Documents are sorted by length, longest first; a bucket takes the next documents while the shortest is at least
    1/`max_waste` of the bucket's longest, so a bucket spends at most `max_waste`^2 of the per-document attention
    FLOPs and the number of buckets grows with log(longest / shortest), not with the number of documents. Each slot
    `j` of document `i` reads row `start_i + min(j, len_i - 1)`: the slots past a document's end repeat its last
    row; as keys they sit after every real query (causal), so no real token sees them, and their outputs are never
    read. `scatter` maps each row back to its slot; padding rows map to one extra zero slot."""
    docs = sorted(((n, s) for s, n in zip(cu_pad[:-1], lengths) if n > 0), key=lambda d: (-d[0], d[1]))
    groups: list[list[tuple[int, int]]] = []
    for n, s in docs:
        if groups and n * max_waste >= groups[-1][0][0]:
            groups[-1].append((n, s))
        else:
            groups.append([(n, s)])
    buckets, scatter = [], [-1] * t
    slot = 0
    for group in groups:
        length = group[0][0]
        gather = []
        for n, s in group:
            gather += [s + min(j, n - 1) for j in range(length)]
            for j in range(n):
                scatter[s + j] = slot + j
            slot += length
        buckets.append(AttentionBucket(len(group), length, torch.tensor(gather, dtype=torch.long)))
    scatter = [slot if v < 0 else v for v in scatter]
    moved = [b.gather for b in buckets] + [torch.tensor(scatter, dtype=torch.long)]
    flat = torch.cat(moved).to(device, non_blocking=True) if moved else torch.zeros(0, dtype=torch.long)
    parts = list(torch.split(flat, [m.numel() for m in moved]))
    for b, g in zip(buckets, parts[:-1]):
        b.gather = g
    return AttentionPlan(buckets, parts[-1], slot)


@dataclasses.dataclass
class CPAttentionBucket:
    """Query chunks (one per document half on this CP rank) attending to their global key prefixes, as one batch:
    `[n, heads, q_len, dim]` queries over `[n, groups, k_len, dim]` keys with query `a` of chunk `i` seeing keys
    `b <= a + offset[i]` (bottom-right causal per chunk)."""

    n: int
    q_len: int
    k_len: int
    q_gather: Tensor  # [n * q_len] long: local query rows (slots past a chunk's end repeat its last row)
    k_gather: Tensor  # [n * k_len] long: rows of the globally ordered gathered keys
    offset: Tensor  # [n] long: n_keys - n_queries of each chunk


@dataclasses.dataclass
class CPAttentionPlan:
    buckets: list[CPAttentionBucket]
    scatter: Tensor  # [t] long: each local row's output slot, or `slots` (a zero row) for padding
    slots: int
    kv_index: Tensor  # permutation of the all-gathered local K/V rows into global order


def cp_attention_plan(cu_pad: Sequence[int], lengths: Sequence[int], *, t: int, cp: int, cp_rank: int, device,
                      max_waste: float = 1.25) -> CPAttentionPlan:
    """Causal attention of this CP rank's rows of a pack (megatron's zig-zag split: document i, padded to a
    multiple of 2*cp, holds chunks r and 2*cp-1-r of c_i = padded_i / (2*cp) rows on rank r) in a fixed number of
    batched SDPA calls: each chunk g's real queries attend to the document's first g*c_i + n_q keys (bottom-right
    causal); chunks are bucketed by key count as `attention_plan` buckets documents."""
    from dasd_megatron.parallel_layout import zigzag_global_index

    pad_lens = [b - a for a, b in zip(cu_pad[:-1], cu_pad[1:])]
    items = []  # (n_keys, n_q, local q start, global key start)
    for gstart, n, plen in zip(cu_pad[:-1], lengths, pad_lens):
        c = plen // (2 * cp)
        lstart = gstart // cp
        for half, g in ((0, cp_rank), (1, 2 * cp - 1 - cp_rank)):
            nq = max(0, min(c, n - g * c))
            if nq:
                items.append((g * c + nq, nq, lstart + half * c, gstart))
    items.sort(key=lambda it: (-it[0], it[2]))
    groups: list[list[tuple]] = []
    for it in items:
        if groups and it[0] * max_waste >= groups[-1][0][0]:
            groups[-1].append(it)
        else:
            groups.append([it])
    scatter = [-1] * t
    buckets, host = [], []
    slot = 0
    for group in groups:
        k_len = group[0][0]
        q_len = max(it[1] for it in group)
        qg, kg, off = [], [], []
        for nk, nq, q0, k0 in group:
            qg += [q0 + min(a, nq - 1) for a in range(q_len)]
            kg += [k0 + min(b, nk - 1) for b in range(k_len)]
            off.append(nk - nq)
            for a in range(nq):
                scatter[q0 + a] = slot + a
            slot += q_len
        host += [torch.tensor(qg, dtype=torch.long), torch.tensor(kg, dtype=torch.long),
                 torch.tensor(off, dtype=torch.long)]
        buckets.append(CPAttentionBucket(len(group), q_len, k_len, *host[-3:]))
    n_local = cu_pad[-1] // cp
    index = zigzag_global_index(pad_lens, cp)
    index = index + (index // max(n_local, 1)) * (t - n_local)  # a local tail after the pack on every rank
    host += [torch.tensor([slot if v < 0 else v for v in scatter], dtype=torch.long), index]
    moved = list(torch.split(torch.cat(host).to(device, non_blocking=True), [h.numel() for h in host]))
    for i, b in enumerate(buckets):
        b.q_gather, b.k_gather, b.offset = moved[3 * i:3 * i + 3]
    return CPAttentionPlan(buckets, moved[-2], slot, moved[-1])


def _register(info: PackInfo, *tensors: Optional[Tensor]) -> None:
    with _LOCK:
        for x in tensors:
            if x is not None:
                _REGISTRY[x] = info


def pack_info(cu_seqlens: Any) -> Optional[PackInfo]:
    """The `PackInfo` registered for this `cu_seqlens` tensor (None when the fast path is off or it is unknown)."""
    if not _FAST or not isinstance(cu_seqlens, Tensor):
        return None
    with _LOCK:
        return _REGISTRY.get(cu_seqlens)


def packed_seq_params(*, cu_seqlens: Tensor, cu_seqlens_padded: Optional[Tensor], max_seqlen: int,
                      host_cu: Sequence[int], host_cu_pad: Optional[Sequence[int]], position_ids: Tensor,
                      cp: int = 1):
    """megatron's `PackedSeqParams` (thd) for a pack, with its `PackInfo` registered (module docstring).

    `cu_seqlens[_padded]` are the device tensors megatron sees; `host_cu[_pad]` the same values as host lists;
    `position_ids` `[1, t]` or `[t]` the RoPE position of each of this rank's rows (on the device)."""
    from megatron.core.packed_seq_params import PackedSeqParams

    cu_pad_list = tuple(int(v) for v in (host_cu_pad if host_cu_pad is not None else host_cu))
    pad_lens = [b - a for a, b in zip(cu_pad_list[:-1], cu_pad_list[1:])]
    info = PackInfo(cu=tuple(int(v) for v in host_cu), cu_pad=cu_pad_list, positions=position_ids.reshape(-1),
                    max_position=max(pad_lens, default=1) - 1, cp=cp)
    _register(info, cu_seqlens, cu_seqlens_padded)
    return PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu_seqlens, cu_seqlens_kv=cu_seqlens,
                           cu_seqlens_q_padded=cu_seqlens_padded, cu_seqlens_kv_padded=cu_seqlens_padded,
                           max_seqlen_q=max_seqlen, max_seqlen_kv=max_seqlen)


def apply_rotary_pos_emb(t: Tensor, freqs: Tensor, config, cu_seqlens: Optional[Tensor] = None, mscale: float = 1.0,
                         cp_group=None, **kwargs):
    """megatron's `apply_rotary_pos_emb` (same signature, 0.16 and 0.19), one op over a registered pack.

    For a thd pack registered by `packed_seq_params` on the unfused, non-interleaved path: the pack's cached
    cos/sin tables and one rotation of all its rows (`t` `[t, heads, dim]`). Everything else: megatron's own."""
    info = pack_info(cu_seqlens) if cu_seqlens is not None else None
    if (
        info is None
        or getattr(config, "apply_rope_fusion", False)
        or getattr(config, "rotary_interleaved", False)
        or getattr(config, "multi_latent_attention", False)
        or kwargs.get("mla_rotary_interleaved")
        or getattr(config, "mrope_section", None) is not None
        or t.dim() != 3
        or t.shape[0] != info.positions.shape[0]
        or freqs.dim() != 4
        or info.max_position >= freqs.shape[0]
        or freqs.shape[-1] > t.shape[-1]
    ):
        return _ORIGINAL(t, freqs, config, cu_seqlens=cu_seqlens, mscale=mscale, cp_group=cp_group, **kwargs)
    from dasd_megatron.kernels import apply_rope

    cos, sin = info.rope_tables(freqs, t.dtype, mscale)
    return apply_rope(t, cos, sin, backend=getattr(config, "dasd_fused_kernels", "torch"))


def install() -> None:
    """Use `apply_rotary_pos_emb` in megatron's attention (idempotent). Called by `model.builder.build_model`."""
    global _ORIGINAL
    import megatron.core.transformer.attention as attention

    current = attention.apply_rotary_pos_emb
    if current is apply_rotary_pos_emb:
        return
    _ORIGINAL = current
    attention.apply_rotary_pos_emb = apply_rotary_pos_emb
