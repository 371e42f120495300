"""Context parallelism: the zig-zag layout equals Megatron's, teacher rows land exactly on the matching student rows,
and the DASD loss and its gradients are the same at CP=1, CP=2 and TP=2 x CP=2."""

import pytest
import torch
import torch.distributed as dist

from dasd_megatron.loss import (
    DASDLossConfig,
    ResponseSpans,
    ZigZagLayout,
    align_teacher_rows,
    compute_rollout_stats,
    dasd_loss,
    global_token_count,
    vocab_parallel_token_stats,
)
from dasd_megatron.testing.distributed import run_distributed

V = 37
S_LENS, T_LENS = [16, 24, 16], [24, 32, 24]  # teacher sequences are longer (privileged prompt)
# per rollout: (student prompt length, teacher prompt length, response length) -> logits rows start at prompt - 1
RESP = [(5, 13, 9), (7, 15, 14), (3, 9, 12)]


def make_cp_batch(seed, dtype):
    g = torch.Generator().manual_seed(seed)
    s_cu = [0, 16, 40]
    t_cu = [0, 24, 56]
    spans = ResponseSpans(
        student_start=[s_cu[i] + p - 1 for i, (p, _, _) in enumerate(RESP)],
        teacher_start=[t_cu[i] + p - 1 for i, (_, p, _) in enumerate(RESP)],
        length=[n for _, _, n in RESP],
    )
    Ts, Tt = sum(S_LENS), sum(T_LENS)
    ri = torch.full((Ts,), -1)
    t_of_s = torch.full((Ts,), -1)
    for i in range(len(RESP)):
        a, b, n = int(spans.student_start[i]), int(spans.teacher_start[i]), int(spans.length[i])
        ri[a : a + n] = i
        t_of_s[a : a + n] = torch.arange(b, b + n)
    s = (torch.randn(Ts, V, generator=g, dtype=torch.float64) * 2).to(dtype)
    t = (torch.randn(Tt, V, generator=g, dtype=torch.float64) * 2).to(dtype)
    t[t_of_s[ri >= 0]] = (s[ri >= 0].double() + torch.randn(int((ri >= 0).sum()), V, generator=g,
                                                             dtype=torch.float64)).to(dtype)
    y = torch.randint(0, V, (Ts,), generator=g)
    old = torch.randn(Ts, generator=g, dtype=torch.float64) * 0.2 - 3.0
    roll = old + torch.randn(Ts, generator=g, dtype=torch.float64) * 0.3
    adv = torch.randn(len(RESP), generator=g, dtype=torch.float64)
    return dict(s=s, t=t, y=y, ri=ri, t_of_s=t_of_s, spans=spans, old=old, roll=roll, adv=adv)


def cp1_loss(b, cfg):
    """CP = 1, TP = 1: teacher rows picked by the span map directly."""
    x = b["s"].clone().requires_grad_(True)
    zero = torch.zeros((), dtype=b["t"].dtype)
    aligned = torch.where((b["ri"] >= 0)[:, None], b["t"][b["t_of_s"].clamp(min=0)], zero)
    st = vocab_parallel_token_stats(x, aligned, b["y"], chunk_size=7)
    loss, _ = dasd_loss(st, b["ri"], b["adv"], cfg, old_logp=b["old"], rollout_logp=b["roll"])
    loss.backward()
    return loss.detach().double(), x.grad.double()


def _cp_worker(rank, world, tp, cases):
    cp = world // tp
    cp_rank, tp_rank = divmod(rank, tp)
    tp_groups = [dist.new_group([c * tp + i for i in range(tp)]) for c in range(cp)]
    cp_groups = [dist.new_group([c * tp + i for c in range(cp)]) for i in range(tp)]
    tp_group, cp_group = tp_groups[cp_rank], cp_groups[tp_rank]
    widths = [V // tp + (1 if i < V % tp else 0) for i in range(tp)]  # uneven vocabulary split (37 = 19 + 18)
    v0 = sum(widths[:tp_rank])
    out = []
    for seed, dtype, cfg_kwargs in cases:
        cfg = DASDLossConfig(**cfg_kwargs)
        b = make_cp_batch(seed, dtype)
        s_lay, t_lay = ZigZagLayout(S_LENS, cp), ZigZagLayout(T_LENS, cp)
        s_pos, t_pos = s_lay.local_positions(cp_rank), t_lay.local_positions(cp_rank)
        x = b["s"][s_pos][:, v0 : v0 + widths[tp_rank]].clone().requires_grad_(True)
        t_local = b["t"][t_pos][:, v0 : v0 + widths[tp_rank]].clone()
        aligned, filled = align_teacher_rows(t_local, student_layout=s_lay, teacher_layout=t_lay, spans=b["spans"],
                                             cp_group=cp_group)
        ri = b["ri"][s_pos]
        st = vocab_parallel_token_stats(x, aligned, b["y"][s_pos], tp_group, vocab_start=v0, vocab_size=V,
                                        chunk_size=5)
        # pre-pass over whole rollouts (their tokens are split across the CP group), global token count
        rs = compute_rollout_stats(st.entropy, st.teacher_logp - st.logp, ri, len(RESP), cfg, group=cp_group)
        n = global_token_count(ri, group=cp_group)
        loss, _ = dasd_loss(st, ri, b["adv"], cfg, old_logp=b["old"][s_pos], rollout_logp=b["roll"][s_pos],
                            rollout_stats=rs, num_global_tokens=n)
        loss.backward()
        out.append(dict(loss=loss.detach().double(), grad=x.grad.double(), s_pos=s_pos, v0=v0, aligned=aligned,
                        filled=filled))
    return out


CASES = [
    (1, torch.float64, dict(estimator="full")),
    (2, torch.bfloat16, dict(estimator="sampled", temperature=0.8)),
]


def _check(world, tp):
    res = run_distributed(_cp_worker, world, tp, CASES)
    cp = world // tp
    for ci, (seed, dtype, cfg_kwargs) in enumerate(CASES):
        b = make_cp_batch(seed, dtype)
        cfg = DASDLossConfig(**cfg_kwargs)
        ref_loss, ref_grad = cp1_loss(b, cfg)
        assert ref_grad.abs().max() > 0
        grad = torch.full_like(ref_grad, float("nan"))
        total = 0.0
        for rank in range(world):
            r = res[rank][ci]
            s_pos, v0 = r["s_pos"], r["v0"]
            # teacher rows moved exactly (bitwise) onto the student rows that need them; zeros elsewhere
            need = b["ri"][s_pos] >= 0
            assert torch.equal(r["filled"], need)
            want = b["t"][b["t_of_s"][s_pos].clamp(min=0)][:, v0 : v0 + r["aligned"].shape[1]]
            assert torch.equal(r["aligned"][need], want[need]) and torch.all(r["aligned"][~need] == 0)
            grad[s_pos, v0 : v0 + r["grad"].shape[1]] = r["grad"]
            if rank % tp == 0:
                total = total + r["loss"]  # TP ranks of one CP rank hold the same loss
            else:
                assert torch.equal(r["loss"], res[rank - rank % tp][ci]["loss"])
        assert not torch.isnan(grad).any()
        # Per-token math is identical; only the order of float64 sums in the per-rollout statistics and of the
        # loss over ranks changes, so float64 agrees to ~1e-12 and bf16 (fp32 math) to fp32 ulps.
        tol = 1e-10 if dtype == torch.float64 else 1e-5
        torch.testing.assert_close(total, ref_loss, rtol=tol, atol=tol)
        torch.testing.assert_close(grad, ref_grad, rtol=tol, atol=tol * ref_grad.abs().max().item())
        assert cp == 2


def test_cp2_matches_cp1():
    _check(2, 1)


def test_tp2_cp2_matches_cp1():
    _check(4, 2)


class _FakeGroup:
    def __init__(self, size, rank):
        self._s, self._r = size, rank

    def size(self):
        return self._s

    def rank(self):
        return self._r


@pytest.mark.filterwarnings("ignore::UserWarning", "ignore::DeprecationWarning")  # megatron import noise
@pytest.mark.parametrize("cp", [2, 4])
def test_zigzag_layout_matches_megatron(cp, monkeypatch):
    from megatron.core.utils import get_batch_on_this_cp_rank

    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)  # megatron reads size/rank off the group
    b, S = 3, 8 * cp
    pos = torch.arange(b * S).view(b, S)  # BSHD batch: global position = row * S + column
    lay = ZigZagLayout([S] * b, cp)
    for r in range(cp):
        local = get_batch_on_this_cp_rank({"tokens": pos.clone()}, cp_group=_FakeGroup(cp, r))["tokens"]
        assert torch.equal(lay.local_positions(r), local.flatten())
        assert torch.all(lay.owner(local.flatten()) == r)


def test_zigzag_rejects_bad_lengths():
    with pytest.raises(ValueError, match="multiples of 2\\*cp_size=4"):
        ZigZagLayout([16, 10], 2)


def test_gathered_index_hand_computed():
    """Documents of 4 and 8 tokens at CP=2. Rank 0 holds chunks 0 and 3 of each: positions [0, 3, 4, 5, 10, 11];
    rank 1 chunks 1 and 2: [1, 2, 6, 7, 8, 9]. In the rank-major concatenation of both, global position p sits at
    row idx[p]."""
    from dasd_megatron.parallel_layout import zigzag_global_index

    lay = ZigZagLayout([4, 8], 2)
    assert lay.local_positions(0).tolist() == [0, 3, 4, 5, 10, 11]
    assert lay.local_positions(1).tolist() == [1, 2, 6, 7, 8, 9]
    want = [0, 6, 7, 1, 2, 3, 8, 9, 10, 11, 4, 5]
    assert lay.gathered_index().tolist() == want
    assert zigzag_global_index([4, 0, 8], 2).tolist() == want  # an empty document holds no rows
    assert lay.local_index(torch.arange(12)).tolist() == [0, 0, 1, 1, 2, 3, 2, 3, 4, 5, 4, 5]
    with pytest.raises(ValueError, match="document length 6 is not a multiple of 2\\*cp = 4"):
        zigzag_global_index([4, 6], 2)


@pytest.mark.parametrize("cp", [1, 2, 3])
def test_gathered_index_inverts_the_rank_major_concatenation(cp):
    lay = ZigZagLayout([2 * cp * n for n in (3, 1, 5)], cp)
    gathered = torch.cat([lay.local_positions(r) for r in range(cp)])  # global position of each gathered row
    assert torch.equal(gathered[lay.gathered_index()], torch.arange(lay.total))


def test_overlapping_spans_rejected():
    with pytest.raises(ValueError, match="spans overlap in teacher"):
        ResponseSpans(student_start=[0, 10], teacher_start=[0, 4], length=[5, 5])
