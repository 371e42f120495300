"""Rollouts -> packed micro-batches for the student and the privileged teacher.

A rollout is a student prompt, a teacher prompt (the same problem plus privileged context) and the sampled
response token ids with the rollout engine's log-probs. The student sequence is `prompt + response`, the teacher's
`teacher_prompt + response`; logits at position `j` predict token `j + 1`, so the response tokens are predicted by
the positions `P - 1 .. P + R - 2` of a sequence with prompt length P.

Micro-batches are packed in the `thd` layout (one row, documents back to back, `cu_seqlens` marking document
boundaries; the SDPA core attention keeps documents apart and RoPE restarts per document). The student and teacher
packs of one micro-batch hold the *same rollouts in the same order*, so their loss rows — the positions that predict
response tokens, taken in order — line up one to one: row k of the student is the same (rollout, response token)
as row k of the teacher. This alignment is what the vocab-parallel kernels need (student and teacher logits rows of
equal shape).

Context parallelism (`cp_size > 1`): every document is padded at its end to a multiple of 2*cp (megatron /
Transformer Engine's THD convention: `cu_seqlens` keeps the real lengths, `cu_seqlens_padded` the padded ones; the
padding comes after the document's tokens, so causal attention never lets a real token see it) and the pack is
split zig-zag per document (`PackedBatch.cp_shard`, `parallel_layout.ZigZagLayout`): CP rank r holds chunks r and
2*cp-1-r of every document. The teacher document is longer than the student's, so the rows scoring one response
token usually sit on different CP ranks: `response_spans` says where they are, and the DASD step moves the teacher
rows onto the student's (`loss/cp_align.align_teacher_rows`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Sequence

import torch

from dasd_megatron.packing import next_fit
from dasd_megatron.parallel_layout import ZigZagLayout


@dataclass(frozen=True)
class Rollout:
    """One sampled response, with everything the trainer needs."""

    prompt_ids: Sequence[int]
    teacher_prompt_ids: Sequence[int]
    response_ids: Sequence[int]
    rollout_logprobs: Sequence[float]
    """The rollout engine's log-prob of each response token (same length as response_ids)."""
    reward: float
    group: int
    """Index of the prompt this rollout answers: rollouts of one group share the GRPO baseline."""
    weight_version: Optional[str] = None

    def __post_init__(self) -> None:
        if len(self.response_ids) != len(self.rollout_logprobs):
            raise ValueError(f"rollout has {len(self.response_ids)} response tokens but "
                             f"{len(self.rollout_logprobs)} log-probs; the engine must return one per token")
        if not self.prompt_ids or not self.teacher_prompt_ids:
            raise ValueError("rollout prompts must not be empty")

    def length(self, teacher: bool) -> int:
        return len(self.teacher_prompt_ids if teacher else self.prompt_ids) + len(self.response_ids)


@dataclass
class PackedBatch:
    """One packed micro-batch (thd). `rollout_index`, `targets` and `rollout_logp` are per position `[T]`.

    After `cp_shard`, the per-position tensors hold one CP rank's rows (in megatron's local order) while
    `cu_seqlens` / `cu_seqlens_padded` / `max_seqlen` still describe the whole pack, as megatron expects."""

    tokens: torch.Tensor  # [1, T] int64
    position_ids: torch.Tensor  # [1, T] int64, restarting at 0 per document
    cu_seqlens: torch.Tensor  # [n_docs + 1] int32: cumulative real document lengths
    max_seqlen: int
    targets: torch.Tensor  # [T] int64: the token this position predicts, -1 where it is not a response token
    rollout_index: torch.Tensor  # [T] int64: global rollout id of the predicted response token, -1 elsewhere
    rollout_logp: torch.Tensor  # [T] fp32: engine log-prob of the predicted token, 0 elsewhere
    cu_seqlens_padded: Optional[torch.Tensor] = None
    """[n_docs + 1] int32: cumulative document lengths padded to 2*cp (context parallelism); None without CP."""
    host_cu: Optional[tuple] = None
    """`cu_seqlens` as a host tuple (set by `pack`), so nothing reads the device tensor back."""
    host_cu_padded: Optional[tuple] = None
    """`cu_seqlens_padded` as a host tuple (None without CP)."""
    cp_size: int = 1
    loss_rows: Optional[torch.Tensor] = None
    """[rows] int64: the positions of `loss_mask`, in order (computed on the host before the batch moves to its
    device, so selecting loss rows needs no boolean indexing, which reads the mask back)."""
    _psp: object = field(default=None, init=False, repr=False, compare=False)

    @property
    def loss_mask(self) -> torch.Tensor:
        return self.rollout_index >= 0

    def loss_row_index(self) -> torch.Tensor:
        """`loss_rows` (or, when absent, the mask's positions computed here: a host read-back on a device)."""
        return self.loss_rows if self.loss_rows is not None else self.loss_mask.nonzero().flatten()

    @property
    def num_loss_rows(self) -> int:
        """The number of loss rows (host int)."""
        return int(self.loss_row_index().numel())

    def padded_doc_lengths(self) -> list[int]:
        cu = self._host_cu_padded()
        return [b - a for a, b in zip(cu[:-1], cu[1:])]

    def _host_cu(self) -> tuple:
        return self.host_cu if self.host_cu is not None else tuple(self.cu_seqlens.tolist())

    def _host_cu_padded(self) -> tuple:
        if self.cu_seqlens_padded is None:
            return self._host_cu()
        return self.host_cu_padded if self.host_cu_padded is not None else tuple(self.cu_seqlens_padded.tolist())

    def packed_seq_params(self):
        """megatron's thd `PackedSeqParams` for this pack, built once, with its host-side layout registered for the
        packed fast path (`model/packed.py`: RoPE in one op per layer, no host sync in attention)."""
        if self._psp is None:
            from dasd_megatron.model.packed import packed_seq_params

            self._psp = packed_seq_params(
                cu_seqlens=self.cu_seqlens, cu_seqlens_padded=self.cu_seqlens_padded, max_seqlen=self.max_seqlen,
                host_cu=self._host_cu(), host_cu_pad=None if self.cu_seqlens_padded is None else self._host_cu_padded(),
                position_ids=self.position_ids, cp=self.cp_size)
        return self._psp

    def cp_layout(self, cp_size: int) -> ZigZagLayout:
        """The zig-zag layout of this (whole) pack over `cp_size` ranks."""
        return ZigZagLayout(self.padded_doc_lengths(), cp_size)

    def cp_shard(self, cp_size: int, cp_rank: int) -> "PackedBatch":
        """CP rank `cp_rank`'s rows of this whole pack (documents padded for `cp_size` by `pack`)."""
        if self.cu_seqlens_padded is None:
            raise ValueError("cp_shard: the pack was built without cp_size; pack(..., cp_size=cp) pads its documents")
        rows = self.cp_layout(cp_size).local_positions(cp_rank).to(self.tokens.device)
        return PackedBatch(self.tokens[:, rows], self.position_ids[:, rows], self.cu_seqlens, self.max_seqlen,
                           self.targets[rows], self.rollout_index[rows], self.rollout_logp[rows],
                           self.cu_seqlens_padded, self.host_cu, self.host_cu_padded, cp_size,
                           (self.rollout_index[rows] >= 0).nonzero().flatten())

    def to(self, device) -> "PackedBatch":
        cup = None if self.cu_seqlens_padded is None else self.cu_seqlens_padded.to(device)
        return PackedBatch(self.tokens.to(device), self.position_ids.to(device), self.cu_seqlens.to(device),
                           self.max_seqlen, self.targets.to(device), self.rollout_index.to(device),
                           self.rollout_logp.to(device), cup, self._host_cu(),
                           None if self.cu_seqlens_padded is None else self._host_cu_padded(), self.cp_size,
                           self.loss_row_index().to(device))


def cp_pad(n: int, cp_size: int) -> int:
    """Length `n` padded for the CP split: a multiple of 2*cp (n itself without CP)."""
    m = 2 * cp_size if cp_size > 1 else 1
    return -(-n // m) * m


def response_spans(rollouts: Sequence[Rollout], ids: Sequence[int], student: PackedBatch, teacher: PackedBatch):
    """Per rollout of the packs (`rollouts[i] for i in ids`, in pack order), the global position of its first
    response row in the student and in the teacher pack and its response length (`cp_align.ResponseSpans`)."""
    from dasd_megatron.loss.cp_align import ResponseSpans

    def starts(pack_: PackedBatch) -> list[int]:
        return list(pack_._host_cu_padded()[:len(ids)])

    s0, t0 = starts(student), starts(teacher)
    rs = [rollouts[i] for i in ids]
    return ResponseSpans(student_start=[s + len(r.prompt_ids) - 1 for s, r in zip(s0, rs)],
                         teacher_start=[t + len(r.teacher_prompt_ids) - 1 for t, r in zip(t0, rs)],
                         length=[len(r.response_ids) for r in rs])


def plan_micro_batches(rollouts: Sequence[Rollout], budget_tokens: int, pad_multiple: int = 1,
                       cp_size: int = 1, *, strategy: str = "ffd") -> list[list[int]]:
    """Group rollouts into micro-batches whose student and teacher packs both fit in `budget_tokens` (each rollout
    counted at its longer sequence, padded to `pad_multiple` times 2*cp under context parallelism, a bound on what
    `pack` adds). Returns lists of indices into `rollouts`, each sorted ascending.

    `strategy`: "ffd" (default) first-fit decreasing (`first_fit_decreasing`): largest rollouts first, each into the
    first micro-batch with room, so micro-batches are fuller and fewer; they are ordered by their smallest index.
    "in_order": greedy in-order packing (`next_fit`): consecutive rollouts share a micro-batch (the former plan).
    The loss is a token mean over the whole batch, so the grouping changes only the number of forward passes (and
    the floating-point summation order).
    Deterministic, so every run packs alike."""
    mult = pad_multiple * (2 * cp_size if cp_size > 1 else 1)

    def padded(n: int) -> int:
        return -(-n // mult) * mult

    need = [padded(max(r.length(False), r.length(True))) for r in rollouts]
    for i, n in enumerate(need):
        if n > budget_tokens:
            raise ValueError(f"rollout {i} needs {n} tokens, more than train.micro_batch_tokens={budget_tokens}; "
                             "raise the budget or lower max_prompt_tokens / max_response_tokens")
    if strategy == "ffd":
        from dasd_megatron.packing import first_fit_decreasing

        return first_fit_decreasing(need, budget_tokens)
    if strategy == "in_order":
        return next_fit(need, budget_tokens)
    raise ValueError(f"plan_micro_batches: unknown strategy {strategy!r}; use 'ffd' or 'in_order'")


def pack(rollouts: Sequence[Rollout], ids: Sequence[int], *, teacher: bool, rollout_ids: Sequence[int],
         pad_multiple: int = 1, pad_token: int = 0, cp_size: int = 1) -> PackedBatch:
    """Pack `rollouts[i] for i in ids` (student or teacher sequences); `rollout_ids` are their global ids.

    The pack's total length is padded to `pad_multiple` (the TP size under sequence parallelism; times 2*cp under
    context parallelism) with one extra padding document whose positions predict nothing. With `cp_size > 1`
    every document is also padded at its end to a multiple of 2*cp (`cu_seqlens_padded`; module docstring)."""
    toks, pos, tgt, rid, rlp, cu, cu_pad = [], [], [], [], [], [0], [0]
    for i, gid in zip(ids, rollout_ids):
        r = rollouts[i]
        prompt = list(r.teacher_prompt_ids if teacher else r.prompt_ids)
        resp = list(r.response_ids)
        seq = prompt + resp
        L, P, R = len(seq), len(prompt), len(resp)
        toks += seq
        pos += list(range(L))
        t = [-1] * L
        ri = [-1] * L
        lp = [0.0] * L
        for k in range(R):
            t[P - 1 + k] = resp[k]
            ri[P - 1 + k] = gid
            lp[P - 1 + k] = float(r.rollout_logprobs[k])
        extra = cp_pad(L, cp_size) - L  # CP: pad the document to a multiple of 2*cp
        toks += [pad_token] * extra
        pos += list(range(L, L + extra))
        tgt += t + [-1] * extra
        rid += ri + [-1] * extra
        rlp += lp + [0.0] * extra
        cu.append(cu[-1] + L)
        cu_pad.append(cu_pad[-1] + L + extra)
    pad = (-len(toks)) % (pad_multiple * (2 * cp_size if cp_size > 1 else 1))
    if pad:
        toks += [pad_token] * pad
        pos += list(range(pad))
        tgt += [-1] * pad
        rid += [-1] * pad
        rlp += [0.0] * pad
        cu.append(cu[-1] + pad)
        cu_pad.append(cu_pad[-1] + pad)
    lens = [b - a for a, b in zip(cu_pad[:-1], cu_pad[1:])]
    return PackedBatch(
        tokens=torch.tensor(toks, dtype=torch.long)[None],
        position_ids=torch.tensor(pos, dtype=torch.long)[None],
        cu_seqlens=torch.tensor(cu, dtype=torch.int32),
        max_seqlen=max(lens) if lens else 0,
        targets=torch.tensor(tgt, dtype=torch.long),
        rollout_index=torch.tensor(rid, dtype=torch.long),
        rollout_logp=torch.tensor(rlp, dtype=torch.float32),
        cu_seqlens_padded=torch.tensor(cu_pad, dtype=torch.int32) if cp_size > 1 else None,
        host_cu=tuple(cu),
        host_cu_padded=tuple(cu_pad) if cp_size > 1 else None,
        loss_rows=torch.tensor([i for i, v in enumerate(rid) if v >= 0], dtype=torch.long),
    )
