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
equal shape). Context parallelism would scatter those rows over CP ranks: the DASD step refuses it
(`check_supported`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from dasd_megatron.packing import next_fit


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
    """One packed micro-batch (thd). `rollout_index`, `targets` and `rollout_logp` are per position `[T]`."""

    tokens: torch.Tensor  # [1, T] int64
    position_ids: torch.Tensor  # [1, T] int64, restarting at 0 per document
    cu_seqlens: torch.Tensor  # [n_docs + 1] int32
    max_seqlen: int
    targets: torch.Tensor  # [T] int64: the token this position predicts, -1 where it is not a response token
    rollout_index: torch.Tensor  # [T] int64: global rollout id of the predicted response token, -1 elsewhere
    rollout_logp: torch.Tensor  # [T] fp32: engine log-prob of the predicted token, 0 elsewhere

    @property
    def loss_mask(self) -> torch.Tensor:
        return self.rollout_index >= 0

    def packed_seq_params(self):
        from megatron.core.packed_seq_params import PackedSeqParams

        cu = self.cu_seqlens
        return PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu,
                               max_seqlen_q=self.max_seqlen, max_seqlen_kv=self.max_seqlen)

    def to(self, device) -> "PackedBatch":
        return PackedBatch(self.tokens.to(device), self.position_ids.to(device), self.cu_seqlens.to(device),
                           self.max_seqlen, self.targets.to(device), self.rollout_index.to(device),
                           self.rollout_logp.to(device))


def plan_micro_batches(rollouts: Sequence[Rollout], budget_tokens: int, pad_multiple: int = 1) -> list[list[int]]:
    """Greedy in-order packing (`next_fit`): consecutive rollouts share a micro-batch while both the student and the
    teacher packs fit in `budget_tokens` (each rollout counted at its longer sequence, padded to `pad_multiple`).
    Deterministic, so every run packs alike."""
    def padded(n: int) -> int:
        return -(-n // pad_multiple) * pad_multiple

    need = [padded(max(r.length(False), r.length(True))) for r in rollouts]
    for i, n in enumerate(need):
        if n > budget_tokens:
            raise ValueError(f"rollout {i} needs {n} tokens, more than train.micro_batch_tokens={budget_tokens}; "
                             "raise the budget or lower max_prompt_tokens / max_response_tokens")
    return next_fit(need, budget_tokens)


def pack(rollouts: Sequence[Rollout], ids: Sequence[int], *, teacher: bool, rollout_ids: Sequence[int],
         pad_multiple: int = 1, pad_token: int = 0) -> PackedBatch:
    """Pack `rollouts[i] for i in ids` (student or teacher sequences); `rollout_ids` are their global ids.

    The pack's total length is padded to `pad_multiple` (the TP size under sequence parallelism) with one extra
    padding document whose positions predict nothing."""
    toks, pos, tgt, rid, rlp, cu = [], [], [], [], [], [0]
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
        tgt += t
        rid += ri
        rlp += lp
        cu.append(cu[-1] + L)
    pad = (-len(toks)) % pad_multiple
    if pad:
        toks += [pad_token] * pad
        pos += list(range(pad))
        tgt += [-1] * pad
        rid += [-1] * pad
        rlp += [0.0] * pad
        cu.append(cu[-1] + pad)
    lens = [b - a for a, b in zip(cu[:-1], cu[1:])]
    return PackedBatch(
        tokens=torch.tensor(toks, dtype=torch.long)[None],
        position_ids=torch.tensor(pos, dtype=torch.long)[None],
        cu_seqlens=torch.tensor(cu, dtype=torch.int32),
        max_seqlen=max(lens) if lens else 0,
        targets=torch.tensor(tgt, dtype=torch.long),
        rollout_index=torch.tensor(rid, dtype=torch.long),
        rollout_logp=torch.tensor(rlp, dtype=torch.float32),
    )
