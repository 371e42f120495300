"""Megatron's zig-zag context-parallel layout: which CP rank holds which token, and in what local order.

A batch of sequences is concatenated into one stream of global positions (THD packing; a BSHD batch of b sequences
of length S is `seq_lens=[S] * b`). With CP size cp > 1, each sequence of length L (a multiple of 2*cp) is cut
into 2*cp chunks of c = L / (2*cp) positions; chunk k belongs to CP rank k if k < cp, else to rank 2*cp-1-k, so
rank r holds chunks r and 2*cp-1-r. A rank's local rows are, sequence after sequence, [chunk r, chunk 2*cp-1-r]:
exactly `megatron.core.utils.get_batch_on_this_cp_rank` applied to each sequence (and Transformer Engine's THD
partitioning for packed sequences). Sequence i therefore starts at local row `cu[i] / cp` on every rank.

The attention (`model/attention.py`, gathering K/V over CP) and the loss (`loss/cp_align.py`, moving teacher rows
to the student's rank) both read the layout from `ZigZagLayout`; this module depends on torch only.
"""

from __future__ import annotations

from typing import Sequence, Union

import torch

__all__ = ["ZigZagLayout", "zigzag_global_index"]


class ZigZagLayout:
    """Megatron's zig-zag CP layout of a concatenated batch of sequences (see the module docstring)."""

    def __init__(self, seq_lens: Union[Sequence[int], torch.Tensor], cp_size: int):
        lens = torch.as_tensor(seq_lens, dtype=torch.int64).flatten().cpu()
        if cp_size < 1:
            raise ValueError(f"cp_size must be >= 1, got {cp_size}")
        bad = lens[(lens % (2 * cp_size) != 0) | (lens <= 0)] if cp_size > 1 else lens[lens <= 0]
        if bad.numel():
            raise ValueError(f"sequence lengths {bad.tolist()} are not positive multiples of 2*cp_size={2 * cp_size}; "
                             "pad each sequence to a multiple of 2*cp_size before the CP split")
        self.cp_size = cp_size
        self.seq_lens = lens
        self.cu = torch.cat([lens.new_zeros(1), torch.cumsum(lens, 0)])
        self.total = int(self.cu[-1])

    def _chunk(self, pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per global position (cp > 1): (sequence index, offset in the sequence, chunk length, chunk index)."""
        seq = torch.searchsorted(self.cu[1:], pos, right=True)
        off = pos - self.cu[seq]
        c = self.seq_lens[seq] // (2 * self.cp_size)
        return seq, off, c, off // c

    def owner(self, pos: torch.Tensor) -> torch.Tensor:
        """CP rank holding each global position: chunk k belongs to rank min(k, 2*cp-1-k)."""
        cp = self.cp_size
        pos = pos.cpu()
        if cp == 1:
            return torch.zeros_like(pos)
        _, _, _, chunk = self._chunk(pos)
        return torch.where(chunk < cp, chunk, 2 * cp - 1 - chunk)

    def local_positions(self, cp_rank: int) -> torch.Tensor:
        """Global positions of the rows held by `cp_rank`, in local order."""
        pos = torch.arange(self.total, dtype=torch.int64)
        if self.cp_size == 1:
            return pos
        return pos[self.owner(pos) == cp_rank]  # owner() is monotone within a rank's rows: local order = global order

    def local_index(self, pos: torch.Tensor) -> torch.Tensor:
        """Row of each global position inside its owner's local rows: the sequence's local start `cu[seq] / cp`,
        plus `c` for the second (mirrored) chunk, plus the offset inside the chunk."""
        pos = pos.cpu()
        if self.cp_size == 1:
            return pos.clone()
        seq, off, c, chunk = self._chunk(pos)
        second = (chunk >= self.cp_size).to(torch.int64)
        return self.cu[seq] // self.cp_size + second * c + (off - chunk * c)

    def gathered_index(self) -> torch.Tensor:
        """`idx` such that `gathered[idx]` is in global order, where `gathered` is the rank-major concatenation of
        every rank's local rows (what an all-gather over the CP group returns): `owner * (total / cp) +
        local_index` for every global position."""
        pos = torch.arange(self.total, dtype=torch.int64)
        return self.owner(pos) * (self.total // self.cp_size) + self.local_index(pos)


def zigzag_global_index(doc_lengths: Sequence[int], cp: int, device=None) -> torch.Tensor:
    """`ZigZagLayout(doc_lengths, cp).gathered_index()` on `device`, for the documents of one pack.

    Every length must be a multiple of 2*cp (documents padded for the CP split); empty documents hold no rows and
    are skipped."""
    for length in doc_lengths:
        if length % (2 * cp):
            raise ValueError(f"document length {length} is not a multiple of 2*cp = {2 * cp}")
    lengths = [int(n) for n in doc_lengths if n]
    if not lengths:
        return torch.zeros(0, dtype=torch.long, device=device)
    return ZigZagLayout(lengths, cp).gathered_index().to(device)
