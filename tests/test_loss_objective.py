"""DASD objective vs the float64 reference: per-rollout statistics, router, GRPO advantages, both estimators, special
cases against their plain formulas, micro-batch and DP token-mean invariance, empty/masked batches, metrics."""

import math

import pytest
import torch
import torch.distributed as dist

from dasd_megatron.loss import (
    DASDLossConfig,
    compute_rollout_stats,
    dasd_loss,
    global_token_count,
    grpo_advantages,
    reliability_gate,
    router_omega,
    segment_quantile,
    vocab_parallel_token_stats,
)
from dasd_megatron.testing.distributed import run_distributed

try:  # tests/ is on sys.path under pytest's default (rootdir-less) import mode
    from loss_reference import ref_dasd_loss, ref_grpo_advantages, ref_rollout_stats, ref_token_stats
except ImportError:  # tests/ imported as a package
    from tests.loss_reference import ref_dasd_loss, ref_grpo_advantages, ref_rollout_stats, ref_token_stats

# Tolerances. float64 logits: kernels and reference differ only in summation order (~1e-15 relative); 1e-9 leaves
# room for the quantile/tanh/exp chain. float32 logits: per-token values carry fp32 rounding (~1e-6 relative), and
# the loss is a mean of O(1) terms -> rtol 1e-4 / atol 1e-5; grads compared relative to their max (fp32 ulps).
TOL = {torch.float64: dict(rtol=1e-9, atol=1e-11), torch.float32: dict(rtol=1e-4, atol=1e-5)}
CONSTANT = dict(router_mode="constant", router_gate=False)


def make_batch(seed, V=61, lengths=(7, 1, 12, 5, 9, 4), group=3, pad_every=4):
    """A packed batch: rollouts of the given lengths with non-response tokens (-1) interleaved."""
    g = torch.Generator().manual_seed(seed)
    ri = []
    for r, n in enumerate(lengths):
        ri += [-1] * (1 + r % 2)  # prompt / padding tokens between responses
        ri += [r] * n
    ri += [-1] * pad_every
    ri = torch.tensor(ri)
    T = ri.numel()
    s = torch.randn(T, V, generator=g, dtype=torch.float64) * 2.0
    # A teacher close to the student on most tokens and far on a few (gives |dbar| > c_max clips and gate spread).
    far = (torch.rand(T, 1, generator=g) < 0.2).double() * 4.0 + 0.3
    t = s + torch.randn(T, V, generator=g, dtype=torch.float64) * far
    y = torch.randint(0, V, (T,), generator=g)
    rewards = torch.rand(len(lengths), generator=g, dtype=torch.float64).round(decimals=1)
    with torch.no_grad():
        logp = torch.log_softmax(s, -1).gather(-1, y[:, None])[:, 0]
    old = logp + torch.randn(T, generator=g, dtype=torch.float64) * 0.3  # ratios in ~[0.5, 2]: both clips fire
    roll = old + torch.randn(T, generator=g, dtype=torch.float64) * 0.5  # some IS weights capped at 2
    return dict(s=s, t=t, y=y, ri=ri, rewards=rewards, group=group, old=old, roll=roll)


def advantages_of(b, cfg):
    return grpo_advantages(b["rewards"], group_size=b["group"], std_normalize=cfg.advantage_std_normalize,
                           eps=cfg.advantage_eps)


def run_kernel_loss(b, cfg, dtype=torch.float64, teacher=True, **kw):
    x = b["s"].to(dtype).clone().requires_grad_(True)
    st = vocab_parallel_token_stats(x, b["t"].to(dtype) if teacher else None, b["y"], **cfg.kernel_kwargs)
    loss, metrics = dasd_loss(st, b["ri"], advantages_of(b, cfg), cfg, old_logp=b["old"], rollout_logp=b["roll"],
                              **kw)
    loss.backward()
    return loss.detach().double(), x.grad.double(), metrics


def run_reference_loss(b, cfg, dtype=torch.float64):
    x = b["s"].to(dtype).double().clone().requires_grad_(True)
    tok = ref_token_stats(x, b["t"].to(dtype).double(), b["y"], cfg.temperature)
    groups = [list(range(i, i + b["group"])) for i in range(0, len(b["rewards"]), b["group"])]
    adv = ref_grpo_advantages(b["rewards"].tolist(), groups, cfg.advantage_std_normalize, cfg.advantage_eps)
    loss = ref_dasd_loss(tok, b["ri"], adv, cfg, old_logp=b["old"], rollout_logp=b["roll"])
    loss.backward()
    return loss.detach(), x.grad, tok


def assert_loss_and_grad(got, ref, dtype):
    torch.testing.assert_close(got[0], ref[0], **TOL[dtype])
    g, gr = got[1], ref[1]
    assert gr.abs().max() > 0  # a comparison of two zero gradients would prove nothing
    torch.testing.assert_close(g, gr, rtol=TOL[dtype]["rtol"], atol=TOL[dtype]["rtol"] * gr.abs().max().item() + 1e-30)


# ------------------------------------------------------------------------------------------- statistics, router


def test_segment_quantile_matches_torch_quantile():
    g = torch.Generator().manual_seed(0)
    seg = torch.randint(0, 7, (200,), generator=g)
    seg[seg == 5] = 4  # segment 5 empty
    x = torch.randn(200, generator=g, dtype=torch.float64)
    for q in (0.0, 0.2, 0.5, 0.8, 1.0):
        got = segment_quantile(x, seg, 8, q)
        for r in range(8):
            want = torch.quantile(x[seg == r], q).item() if (seg == r).any() else 0.0
            assert got[r].item() == pytest.approx(want, abs=1e-12), (q, r)


@pytest.mark.parametrize("convention,gap_scale", [("upper", "mean_abs"), ("lower", "std")])
def test_rollout_stats_match_reference(convention, gap_scale):
    cfg = DASDLossConfig(convention=convention, gap_scale=gap_scale)
    b = make_batch(1)
    g = torch.Generator().manual_seed(1)
    H = torch.rand(b["ri"].numel(), generator=g, dtype=torch.float64) * 3
    d = torch.randn(b["ri"].numel(), generator=g, dtype=torch.float64)
    n = 7  # one more id than rollouts: an empty rollout
    rs = compute_rollout_stats(H, d, b["ri"], n, cfg)
    taus, sigmas, scales = ref_rollout_stats(H, d, b["ri"], n, cfg)
    for got, want in ((rs.tau, taus), (rs.sigma_h, sigmas), (rs.gap_scale, scales)):
        torch.testing.assert_close(got, torch.tensor(want, dtype=torch.float64), rtol=1e-12, atol=1e-14)
    assert rs.num_tokens.tolist() == [7, 1, 12, 5, 9, 4, 0]


def test_router_modes_match_formulas():
    H = torch.tensor([0.1, 1.0, 2.0, 3.0], dtype=torch.float64)
    dbar = torch.tensor([0.0, 1.0, -3.0, 5.0], dtype=torch.float64)
    tau, sig = torch.full_like(H, 1.5), torch.full_like(H, 0.5)
    sigm = lambda v: 1 / (1 + math.exp(-v))  # noqa: E731
    om = router_omega(H, dbar, tau, sig, DASDLossConfig())
    want = [math.tanh((1.5 - h) / 0.5) * sigm(abs(d) - 1) for h, d in zip(H.tolist(), dbar.tolist())]
    torch.testing.assert_close(om, torch.tensor(want, dtype=torch.float64))
    hard = router_omega(H, dbar, tau, sig, DASDLossConfig(router_mode="hard", router_gate=False))
    assert hard.tolist() == [1.0, 1.0, -1.0, -1.0]
    const = router_omega(H, dbar, tau, sig, DASDLossConfig(router_constant=-1.0, **CONSTANT))
    assert const.tolist() == [-1.0] * 4


def test_reliability_gate_formula_and_off_switch():
    dbar = torch.tensor([0.0, 1.0, -3.0, 5.0], dtype=torch.float64)
    want = [1 / (1 + math.exp(1.0)), 0.5, 1 / (1 + math.exp(-2.0)), 1 / (1 + math.exp(-4.0))]
    torch.testing.assert_close(reliability_gate(dbar), torch.tensor(want, dtype=torch.float64), rtol=1e-15, atol=0)
    off = reliability_gate(dbar, enabled=False)
    assert off.dtype == dbar.dtype and off.tolist() == [1.0] * 4
    # the router's omega is its map times this gate
    H, tau, sig = torch.tensor([0.1, 1.0, 2.0, 3.0], dtype=torch.float64), torch.full((4,), 1.5), torch.full((4,), 0.5)
    gated = router_omega(H, dbar, tau, sig, DASDLossConfig(router_mode="hard"))
    assert torch.equal(gated, torch.tensor([1.0, 1.0, -1.0, -1.0], dtype=torch.float64) * reliability_gate(dbar))


@pytest.mark.parametrize("std_normalize", [True, False])
def test_grpo_advantages_match_reference(std_normalize):
    r = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 1.0, 0.3, 0.9, 0.0, 2.0], dtype=torch.float64)
    gi = torch.tensor([0, 0, 0, 1, 1, 1, 2, 2, 2, 3])  # group 1 constant, group 3 singleton
    got = grpo_advantages(r, gi, std_normalize=std_normalize)
    want = ref_grpo_advantages(r.tolist(), [[0, 1, 2], [3, 4, 5], [6, 7, 8], [9]], std_normalize)
    torch.testing.assert_close(got, torch.tensor(want, dtype=torch.float64))
    assert torch.equal(grpo_advantages(r[:9], group_size=3, std_normalize=std_normalize), got[:9])


# ------------------------------------------------------------------------------------------ objective vs reference


CASES = {
    "default_full": dict(),
    "sampled": dict(estimator="sampled"),
    "full_lower_std_T": dict(convention="lower", gap_scale="std", temperature=0.7),
    "sampled_hard_nogate": dict(estimator="sampled", router_mode="hard", router_gate=False),
    "full_hard_gate_beta": dict(router_mode="hard", beta=0.5, clip_eps_high=0.2),
    "full_no_is_no_std": dict(is_cap=None, advantage_std_normalize=False, c_max=1.5),
    "sampled_no_reward": dict(estimator="sampled", reward_term=False),
}


@pytest.mark.parametrize("case", list(CASES))
def test_dasd_loss_matches_reference_float64(case):
    cfg = DASDLossConfig(**CASES[case])
    b = make_batch(2)
    assert_loss_and_grad(run_kernel_loss(b, cfg), run_reference_loss(b, cfg), torch.float64)


@pytest.mark.parametrize("estimator", ["full", "sampled"])
def test_dasd_loss_matches_reference_float32(estimator):
    cfg = DASDLossConfig(estimator=estimator, temperature=0.9, chunk_size=8)
    b = make_batch(3)
    assert_loss_and_grad(run_kernel_loss(b, cfg, torch.float32), run_reference_loss(b, cfg, torch.float32),
                         torch.float32)


# ------------------------------------------------------------------------- special cases vs their plain formulas


def plain_terms(b, cfg):
    """Per-valid-token plain PPO-clip-with-TIS on A_G and KL_t / s_r, with autograd to a fresh logits leaf."""
    x = b["s"].clone().requires_grad_(True)
    tok = ref_token_stats(x, b["t"], b["y"])
    v = b["ri"] >= 0
    ri = b["ri"][v]
    groups = [list(range(i, i + b["group"])) for i in range(0, len(b["rewards"]), b["group"])]
    A = torch.tensor(ref_grpo_advantages(b["rewards"].tolist(), groups), dtype=torch.float64)[ri]
    ratio = torch.exp(tok["logp"][v] - b["old"][v])
    w = torch.clamp(torch.exp(b["old"][v] - b["roll"][v]), max=2.0)
    delta = (tok["teacher_logp"] - tok["logp"]).detach()
    s = torch.zeros(len(b["rewards"]), dtype=torch.float64)
    for r in range(len(s)):
        s[r] = delta[b["ri"] == r].abs().mean() + cfg.eps
    dbar = torch.clamp(delta[v] / s[ri], -cfg.c_max, cfg.c_max)

    def ppo(adv):
        return -torch.minimum(ratio * adv, torch.clamp(ratio, 0.8, 1.28) * adv) * w

    return x, ppo, A, tok["kl"][v] / s[ri], dbar, int(v.sum())


def grad_of(x, loss):
    loss.backward()
    return loss.detach(), x.grad


def test_grpo_is_plain_ppo_clip_without_teacher():
    b = make_batch(4)
    cfg = DASDLossConfig(router_constant=0.0, **CONSTANT)
    got = run_kernel_loss(b, cfg, teacher=False)
    x, ppo, A, _, _, n = plain_terms(b, cfg)
    assert_loss_and_grad(got, grad_of(x, ppo(A).sum() / n), torch.float64)
    # and the same through the sampled estimator and with a teacher present (omega = 0 ignores it)
    got2 = run_kernel_loss(b, DASDLossConfig(router_constant=0.0, estimator="sampled", **CONSTANT))
    assert_loss_and_grad(got2, got[:2], torch.float64)


@pytest.mark.parametrize("omega", [1.0, -1.0])
def test_uniform_omega_full_is_grpo_plus_scaled_kl(omega):
    b = make_batch(5)
    cfg = DASDLossConfig(router_constant=omega, beta=0.7, **CONSTANT)
    x, ppo, A, kl_s, _, n = plain_terms(b, cfg)
    assert_loss_and_grad(run_kernel_loss(b, cfg), grad_of(x, (ppo(A) + 0.7 * omega * kl_s).sum() / n), torch.float64)


def test_uniform_conformity_sampled_folds_dbar_into_advantage():
    b = make_batch(6)
    cfg = DASDLossConfig(router_constant=1.0, estimator="sampled", **CONSTANT)
    x, ppo, A, _, dbar, n = plain_terms(b, cfg)
    assert_loss_and_grad(run_kernel_loss(b, cfg), grad_of(x, ppo(A + dbar).sum() / n), torch.float64)


def test_pure_self_distillation_is_mean_scaled_kl():
    b = make_batch(7)
    cfg = DASDLossConfig(reward_term=False, router_constant=1.0, beta=2.0, **CONSTANT)
    x, _, _, kl_s, _, n = plain_terms(b, cfg)
    assert_loss_and_grad(run_kernel_loss(b, cfg), grad_of(x, 2.0 * kl_s.sum() / n), torch.float64)


# ------------------------------------------------------------------------ token-mean: micro-batches, DP, masking


def test_micro_batches_sum_to_whole_batch():
    cfg = DASDLossConfig(estimator="full", chunk_size=5)
    b = make_batch(8)
    whole = run_kernel_loss(b, cfg)
    # pre-pass over the whole batch (detached), then micro-batches that cut rollouts in two
    with torch.no_grad():
        st = vocab_parallel_token_stats(b["s"], b["t"], b["y"])
        rs = compute_rollout_stats(st.entropy, st.teacher_logp - st.logp, b["ri"], len(b["rewards"]), cfg)
    n = global_token_count(b["ri"])
    adv = advantages_of(b, cfg)
    T = b["ri"].numel()
    total, grads = torch.zeros((), dtype=torch.float64), []
    for lo, hi in ((0, 10), (10, 23), (23, T)):
        x = b["s"][lo:hi].clone().requires_grad_(True)
        mst = vocab_parallel_token_stats(x, b["t"][lo:hi], b["y"][lo:hi])
        loss, _ = dasd_loss(mst, b["ri"][lo:hi], adv, cfg, old_logp=b["old"][lo:hi], rollout_logp=b["roll"][lo:hi],
                            rollout_stats=rs, num_global_tokens=n)
        loss.backward()
        total, grads = total + loss.detach(), grads + [x.grad]
    assert_loss_and_grad((total, torch.cat(grads)), whole[:2], torch.float64)


def _dp_worker(rank, world, cfg_kwargs, cut):
    cfg = DASDLossConfig(**cfg_kwargs)
    b = make_batch(9)
    group = dist.new_group(list(range(world)))
    lo, hi = (0, cut) if rank == 0 else (cut, b["ri"].numel())
    adv = advantages_of(b, cfg)
    out = {}
    # (a) explicit pre-pass over the group + global token count
    x = b["s"][lo:hi].clone().requires_grad_(True)
    st = vocab_parallel_token_stats(x, b["t"][lo:hi], b["y"][lo:hi])
    rs = compute_rollout_stats(st.entropy, st.teacher_logp - st.logp, b["ri"][lo:hi], len(b["rewards"]), cfg,
                               group=group)
    n = global_token_count(b["ri"][lo:hi], group=group)
    loss, _ = dasd_loss(st, b["ri"][lo:hi], adv, cfg, old_logp=b["old"][lo:hi], rollout_logp=b["roll"][lo:hi],
                        rollout_stats=rs, num_global_tokens=n)
    loss.backward()
    out["a"] = (loss.detach(), x.grad)
    # (b) everything inside dasd_loss: stats over stats_group, count all-reduced over token_count_group
    x = b["s"][lo:hi].clone().requires_grad_(True)
    st = vocab_parallel_token_stats(x, b["t"][lo:hi], b["y"][lo:hi])
    loss, _ = dasd_loss(st, b["ri"][lo:hi], adv, cfg, old_logp=b["old"][lo:hi], rollout_logp=b["roll"][lo:hi],
                        stats_group=group, token_count_group=group)
    loss.backward()
    out["b"] = (loss.detach(), x.grad)
    return out


@pytest.mark.parametrize("estimator", ["full", "sampled"])
def test_dp_ranks_sum_to_single_process(estimator):
    cfg_kwargs = dict(estimator=estimator)
    b = make_batch(9)
    whole = run_kernel_loss(b, DASDLossConfig(**cfg_kwargs))
    res = run_distributed(_dp_worker, 2, cfg_kwargs, 17)  # the cut splits rollout 2 across the two ranks
    for key in ("a", "b"):
        total = res[0][key][0] + res[1][key][0]
        grad = torch.cat([res[0][key][1], res[1][key][1]])
        assert_loss_and_grad((total, grad), whole[:2], torch.float64)


@pytest.mark.parametrize("estimator", ["full", "sampled"])
def test_empty_and_fully_masked_batches(estimator):
    cfg = DASDLossConfig(estimator=estimator)
    adv = torch.tensor([1.0, -1.0], dtype=torch.float64)
    for T in (0, 9):
        x = (torch.randn(T, 20) * 3).requires_grad_(True)
        st = vocab_parallel_token_stats(x, torch.randn(T, 20), torch.randint(0, 20, (T,)))
        bad = torch.full((T,), float("inf"))  # garbage log-probs on masked tokens must not leak
        loss, metrics = dasd_loss(st, torch.full((T,), -1), adv, cfg, old_logp=bad, rollout_logp=-bad)
        loss.backward()
        assert loss.item() == 0.0 and torch.isfinite(loss)
        assert x.grad.shape == (T, 20) and torch.all(x.grad == 0)
        assert all(torch.isfinite(torch.as_tensor(v)).all() for v in metrics.values()), metrics
        assert metrics["loss/num_tokens"].item() == 0


def test_metrics_values():
    cfg = DASDLossConfig()
    b = make_batch(10)
    _, _, m = run_kernel_loss(b, cfg)
    v = b["ri"] >= 0
    # recompute a few metrics from the reference pieces
    x = b["s"].clone()
    tok = ref_token_stats(x, b["t"], b["y"])
    delta = tok["teacher_logp"] - tok["logp"]
    taus, sigmas, scales = ref_rollout_stats(tok["entropy"], delta, b["ri"], 6, cfg)
    ri = b["ri"][v]
    s = torch.tensor(scales, dtype=torch.float64)[ri]
    dbar = torch.clamp(delta[v] / s, -5, 5)
    om = torch.tanh((torch.tensor(taus, dtype=torch.float64)[ri] - tok["entropy"][v])
                    / torch.tensor(sigmas, dtype=torch.float64)[ri]) * torch.sigmoid(dbar.abs() - 1)
    ratio = torch.exp(tok["logp"][v] - b["old"][v])
    w = torch.exp(b["old"][v] - b["roll"][v])
    assert m["loss/num_tokens"].item() == v.sum().item()
    assert m["router/omega_pos_frac"].item() == pytest.approx((om > 0).double().mean().item())
    assert m["router/omega_mean"].item() == pytest.approx(om.mean().item(), rel=1e-5)
    assert m["loss/kl"].item() == pytest.approx(tok["kl"][v].mean().item(), rel=1e-5)
    assert m["loss/is_capped_frac"].item() == pytest.approx((w >= 2.0).double().mean().item())
    assert m["loss/is_weight_max"].item() == pytest.approx(min(w.max().item(), 2.0), rel=1e-6)
    assert m["gap/dbar_clip_frac"].item() == pytest.approx((dbar.abs() >= 5).double().mean().item())
    assert 0 < m["gap/dbar_clip_frac"].item() < 1  # the batch exercises the clip
    assert m["rollout/logp_mismatch_abs"].item() == pytest.approx((b["old"] - b["roll"])[v].abs().mean().item(),
                                                                  rel=1e-5)
    A = advantages_of(b, cfg)[ri]
    clip = ((A > 0) & (ratio > 1.28)) | ((A < 0) & (ratio < 0.8))
    assert m["loss/clip_frac"].item() == pytest.approx(clip.double().mean().item())
    assert 0 < m["loss/clip_frac"].item() < 1
    ent = [m[f"router/entropy_mean_decile_{k}"].item() for k in range(10)]
    assert ent == sorted(ent)
    assert m["loss/total"].item() == pytest.approx(m["loss/pg"].item() + m["loss/distill"].item(), rel=1e-6)
    assert all(k.split("/")[0] in ("loss", "router", "gap", "adv", "rollout") for k in m)
    assert all(not t.requires_grad for t in m.values())


def test_teacher_required_when_teacher_term_on():
    b = make_batch(11)
    with pytest.raises(ValueError, match="teacher_logp is None"):
        run_kernel_loss(b, DASDLossConfig(), teacher=False)
