"""Context parallelism: bring the teacher's response logits rows to the CP rank that holds the matching student row.

The problem. The teacher sees `[privileged prompt ; response]`, the student `[prompt ; response]`; the teacher
sequence is longer, so under Megatron's zig-zag CP layout the teacher row that scores response token j usually
lives on a different CP rank than the student row that scores it. The loss needs both on one rank, row by row.

The alignment chosen here: **move teacher rows to the student's layout, with one all_to_all_single.**

* Layout (`ZigZagLayout`, dasd_megatron/parallel_layout.py, shared with the attention): a batch of sequences
  concatenated into one stream of global positions; each sequence is cut into 2*cp chunks and CP rank r holds
  chunks r and 2*cp-1-r (megatron's `get_batch_on_this_cp_rank`). A rank's local rows must be in the order of
  `local_positions(rank)` (for BSHD: flatten the local `[b, S/cp, ...]` batch-major).
* Positions are positions of *logits rows*: the row at position p predicts token p + 1 (labels shifted before the
  split). `ResponseSpans` says, per rollout i, that student rows `[student_start_i, student_start_i + length_i)` and
  teacher rows `[teacher_start_i, teacher_start_i + length_i)` score the same response tokens (global positions;
  for a response y at token positions [P, P + L) of the student sequence, the rows are [P - 1, P - 1 + L)).
* Every rank knows both layouts and the spans (batch metadata), so each rank computes *locally*, without any
  exchange of indices, both what it sends (its teacher rows that fall in a span, to the owner of the matching
  student position) and what it receives (for its student rows in a span, from the owner of the matching teacher
  position). Both sides order the rows of each (sender, receiver) pair by global student position, so a single
  `all_to_all_single` with variable splits moves the rows, `[n, V/tp]` in the logits dtype (sent as raw bytes, so
  any dtype works on gloo and NCCL). TP ranks of one CP rank each move their own vocabulary shard.
* Student rows outside any span get a zero teacher row (a uniform teacher); they carry `rollout_index = -1`, so the
  loss ignores them. The returned mask says which rows were filled.

Cost: the response rows of the teacher logits shard cross the CP group once (about T_response * V/tp * 2 bytes in
bf16); the alternative, all-gathering the teacher's logits, would move cp times more. Per-token teacher scalars
would suffice for the 'sampled' estimator, but 'full' needs the teacher's distribution over the vocabulary, so rows
of the V/tp shard are moved; `align_teacher_rows` accepts any `[T_local, ...]` tensor, scalars included.

After alignment, the per-rollout router statistics still need the whole rollout: compute them with
`compute_rollout_stats(..., group=cp_group)` (rollout_stats.py), and give `dasd_loss` the global token count.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist

from dasd_megatron.parallel_layout import ZigZagLayout

__all__ = ["ZigZagLayout", "ResponseSpans", "align_teacher_rows"]


@dataclass(frozen=True)
class ResponseSpans:
    """Per rollout: global start of its response logits rows in the student and in the teacher stream, and length."""

    student_start: torch.Tensor
    teacher_start: torch.Tensor
    length: torch.Tensor

    def __post_init__(self):
        for f in ("student_start", "teacher_start", "length"):
            object.__setattr__(self, f, torch.as_tensor(getattr(self, f), dtype=torch.int64).flatten().cpu())
        if not (self.student_start.shape == self.teacher_start.shape == self.length.shape):
            raise ValueError("student_start, teacher_start and length must have the same length")
        if (self.length < 0).any():
            raise ValueError("span lengths must be >= 0")
        for name in ("student_start", "teacher_start"):
            start = getattr(self, name)
            order = torch.argsort(start)
            end = start[order] + self.length[order]
            if (end[:-1] > start[order][1:]).any():
                raise ValueError(f"ResponseSpans: spans overlap in {name.split('_')[0]} positions; each logits row "
                                 "may belong to at most one response")

    @staticmethod
    def _map(pos: torch.Tensor, start: torch.Tensor, length: torch.Tensor, other: torch.Tensor):
        """For each position: (inside some span, matching position in the other stream)."""
        if start.numel() == 0:
            return torch.zeros_like(pos, dtype=torch.bool), torch.zeros_like(pos)
        order = torch.argsort(start)
        s, ln, o = start[order], length[order], other[order]
        j = torch.searchsorted(s, pos, right=True) - 1
        jc = j.clamp(min=0)
        inside = (j >= 0) & (pos < s[jc] + ln[jc])
        return inside, o[jc] + (pos - s[jc])

    def teacher_to_student(self, teacher_pos: torch.Tensor):
        return self._map(teacher_pos, self.teacher_start, self.length, self.student_start)

    def student_to_teacher(self, student_pos: torch.Tensor):
        return self._map(student_pos, self.student_start, self.length, self.teacher_start)


def align_teacher_rows(
    teacher_rows: torch.Tensor,
    *,
    student_layout: ZigZagLayout,
    teacher_layout: ZigZagLayout,
    spans: ResponseSpans,
    cp_group: Optional["dist.ProcessGroup"] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Teacher rows (this rank's `[T_teacher_local, ...]`, e.g. its logits shard) re-laid out on the student's rows.

    Returns `(aligned [T_student_local, ...], filled [T_student_local] bool)`; row k of `aligned` is the teacher row
    that scores the same response token as this rank's student row k (zeros where `filled` is False).
    Collective: one `all_to_all_single` over `cp_group` with variable splits (none when CP = 1).
    """
    cp = student_layout.cp_size
    if teacher_layout.cp_size != cp:
        raise ValueError(f"student and teacher layouts have different cp sizes ({cp} vs {teacher_layout.cp_size})")
    world = dist.get_world_size(cp_group) if (cp_group is not None and dist.is_initialized()) else 1
    if world != cp:
        raise ValueError(f"cp_group has {world} ranks but the layouts are for cp_size={cp}")
    rank = dist.get_rank(cp_group) if world > 1 else 0
    dev = teacher_rows.device

    t_pos = teacher_layout.local_positions(rank)
    if teacher_rows.shape[0] != t_pos.numel():
        raise ValueError(f"teacher_rows has {teacher_rows.shape[0]} rows, the teacher layout gives CP rank {rank} "
                         f"{t_pos.numel()} rows")
    s_pos = student_layout.local_positions(rank)

    # What this rank sends: its teacher rows inside a span, ordered by (receiving rank, student position).
    t_in, t_to_s = spans.teacher_to_student(t_pos)
    send_rows = torch.nonzero(t_in).flatten()
    dest = student_layout.owner(t_to_s[send_rows])
    key = dest * (student_layout.total + 1) + t_to_s[send_rows]
    send_rows = send_rows[torch.argsort(key)]
    send_counts = torch.bincount(dest, minlength=cp).tolist()

    # What this rank receives: for its student rows inside a span, ordered by (sending rank, student position).
    s_in, s_to_t = spans.student_to_teacher(s_pos)
    recv_rows = torch.nonzero(s_in).flatten()
    src = teacher_layout.owner(s_to_t[recv_rows])
    key = src * (student_layout.total + 1) + s_pos[recv_rows]
    recv_rows = recv_rows[torch.argsort(key)]
    recv_counts = torch.bincount(src, minlength=cp).tolist()

    tail = tuple(teacher_rows.shape[1:])
    send = teacher_rows.detach()[send_rows.to(dev)].contiguous()
    if world > 1:
        # Raw bytes: gloo lacks some dtypes (bf16), and bytes make the transfer exactly lossless.
        width = 1
        for d in tail:
            width *= d
        send_b = send.reshape(send.shape[0], width).view(torch.uint8)
        recv_b = torch.empty(sum(recv_counts), width * teacher_rows.element_size(), dtype=torch.uint8, device=dev)
        dist.all_to_all_single(recv_b, send_b, output_split_sizes=recv_counts, input_split_sizes=send_counts,
                               group=cp_group)
        recv = recv_b.view(teacher_rows.dtype).reshape((sum(recv_counts),) + tail)
    else:
        recv = send
    aligned = teacher_rows.new_zeros((s_pos.numel(),) + tail)
    aligned[recv_rows.to(dev)] = recv
    filled = torch.zeros(s_pos.numel(), dtype=torch.bool, device=dev)
    filled[recv_rows.to(dev)] = True
    return aligned, filled
