"""The DASD step (packing, scoring, routed loss through megatron's schedule) against an unpacked float64 reference,
and its TP=2 / DP=2 layouts against TP=1.

Reference: each rollout's student and teacher sequences run *unpacked* through the same model; the float64 reference
loss of tests/loss_reference.py (independent of dasd_megatron.loss) is computed on their response rows and
back-propagated. Tolerances: the model runs in fp32 in both; packing changes only the attention's blocking and the
reference does the loss math in float64, so the loss agrees to ~1e-6 relative (checked at 1e-5 relative). Gradients
(fp32 sums over every token) agreed to ~1e-6 of each tensor's largest entry: elementwise rtol 1e-4 plus an absolute
slack of 2e-5 of the tensor's largest gradient for entries that are sums of cancelling terms.
"""

from __future__ import annotations

import dataclasses
import os
import random

import pytest
import torch

import hf_fixtures
from dasd_megatron.testing.distributed import run_distributed

hf_dir = hf_fixtures.tiny_qwen3_dir  # the pytest fixture: a tiny Qwen3 config folder

G, GROUPS = 3, 2


def _rollouts(vocab: int, seed: int = 0):
    from dasd_megatron.train.batch import Rollout

    rng = random.Random(seed)
    out = []
    for g in range(GROUPS):
        prompt = [rng.randrange(vocab) for _ in range(rng.randint(3, 6))]
        teacher = prompt[:1] + [rng.randrange(vocab) for _ in range(rng.randint(2, 5))] + prompt[1:]
        for _ in range(G):
            resp = [rng.randrange(vocab) for _ in range(rng.randint(2, 7))]
            out.append(Rollout(prompt, teacher, resp, [-1.0 - rng.random() for _ in resp],
                               reward=float(rng.random() < 0.5), group=g))
    return out


def _cfg(hf_dir, tp=1, sp=False, estimator="full", budget=40, cp=1, pp=1):
    from dasd_megatron.config import ModelConfig, ParallelConfig, RunConfig, apply_overrides

    # init std 0.5: a random model with the usual 0.02 has near-uniform entropy (spread ~1e-3 nats), and the tanh
    # router divides by that spread, amplifying rounding 1000x; wider logits make the router well conditioned.
    cfg = RunConfig(model=ModelConfig(hf_config=hf_dir, seq_length=64, init_method_std=0.5),
                    parallel=ParallelConfig(tensor=tp, sequence_parallel=sp, context=cp, pipeline=pp))
    return apply_overrides(cfg, [f"loss.estimator={estimator}", "loss.temperature=0.9", "rollout.temperature=0.9",
                                 "train.max_prompt_tokens=12", "train.max_response_tokens=8",
                                 f"train.micro_batch_tokens={budget}", "train.samples_per_prompt=3"])


def _advantages(rollouts):
    from dasd_megatron.loss import grpo_advantages

    return grpo_advantages(torch.tensor([r.reward for r in rollouts]), group_size=G)


def _reference(model, arch, rollouts, adv, lcfg, teacher_model=None):
    """Unpacked per-rollout forwards + float64 reference loss; returns (loss, {name: grad}). The teacher rows come
    from `teacher_model` when given, else from `model`."""
    import loss_reference as ref

    rows_s, rows_t, targets, rid, rlp = [], [], [], [], []
    for i, r in enumerate(rollouts):
        for teacher, rows in ((False, rows_s), (True, rows_t)):
            prompt = list(r.teacher_prompt_ids if teacher else r.prompt_ids)
            seq = torch.tensor(prompt + list(r.response_ids))[None]
            net = teacher_model if teacher and teacher_model is not None else model
            logits = net(seq, torch.arange(seq.shape[1])[None], None)[0]
            P, R = len(prompt), len(r.response_ids)
            rows.append(logits[P - 1:P - 1 + R, : arch.vocab_size])
        targets += list(r.response_ids)
        rid += [i] * len(r.response_ids)
        rlp += list(r.rollout_logprobs)
    s, t = torch.cat(rows_s), torch.cat(rows_t).detach()
    tok = ref.ref_token_stats(s, t, torch.tensor(targets), temperature=lcfg.temperature)
    loss = ref.ref_dasd_loss(tok, torch.tensor(rid), adv.tolist(), lcfg,
                             rollout_logp=torch.tensor(rlp, dtype=torch.float64))
    model.zero_grad()
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters()}
    model.zero_grad()
    return loss.item(), grads


def _worker(rank, world_size, hf_dir, ckpt, layouts, with_reference):
    from megatron.core import parallel_state as ps

    from dasd_megatron.model.builder import build_model
    from dasd_megatron.model.hf_config import load_hf_architecture
    from dasd_megatron.model.sharding import full_named_tensors
    from dasd_megatron.parallel import initialize_parallel
    from dasd_megatron.train.checkpoint import load_model, save_model
    from dasd_megatron.train.dasd_step import DASDStep
    from dasd_megatron.train.engine import build_optimizer, wrap_ddp

    arch = load_hf_architecture(hf_dir)
    rollouts = _rollouts(arch.vocab_size)
    adv = _advantages(rollouts)
    out = {}
    for name, kw in layouts:
        cfg = _cfg(hf_dir, **kw)
        ctx = initialize_parallel(cfg.parallel)
        model = build_model(cfg, arch)
        if ckpt and os.path.exists(os.path.join(ckpt, "metadata.json")):
            load_model(model, ckpt)
        elif ckpt:
            save_model(model, ckpt)
        res = {}
        if with_reference:
            res["ref_loss"], res["ref_grads"] = _reference(model, arch, rollouts, adv, cfg.loss)
        ddp = wrap_ddp(model)
        step = DASDStep(ddp, build_optimizer(ddp, cfg.optim), cfg, arch, ctx)
        mine = list(range(len(rollouts)))[ctx.dp_rank::ctx.dp]  # DP: interleaved share of the rollouts
        micro_batches = step.build_micro_batches([rollouts[i] for i in mine], mine)
        scores = step.score(micro_batches)
        rs = step.rollout_stats(micro_batches, scores, len(rollouts))
        summary = step.summarise(step.train_after_scoring(micro_batches, scores, adv, rs))
        res["loss"] = summary.get("loss/dasd")  # the last pipeline stage has it
        res["num_micro_batches"] = len(micro_batches)
        res["grads"] = {k: v.clone() for k, v in full_named_tensors(ddp, grads=True).items()}
        res["metrics"] = summary
        # the single pass (what `run` does at PP=1): teacher forward, old log-probs and rollout statistics from the
        # training pass itself; the same micro-batches, so the same loss and gradients
        single = step.train_single_pass(step.build_micro_batches([rollouts[i] for i in mine], mine), adv)
        res["sp_loss"] = step.summarise(single).get("loss/dasd")
        res["sp_grads"] = {k: v.clone() for k, v in full_named_tensors(ddp, grads=True).items()}
        out[name] = res
        ps.destroy_model_parallel()
    return out


@pytest.fixture(scope="module")
def single(hf_dir, tmp_path_factory):
    ckpt = str(tmp_path_factory.mktemp("ckpt") / "ref")
    layouts = [("full", dict(estimator="full")), ("sampled", dict(estimator="sampled"))]
    return ckpt, run_distributed(_worker, 1, hf_dir, ckpt, layouts, True)[0]


def _grads_close(got, ref, what):
    for k, g in ref.items():
        scale = g.abs().max().item()
        assert scale > 0 or "bias" in k, f"{what} {k}: reference gradient is zero, the comparison would be vacuous"
        torch.testing.assert_close(got[k], g, rtol=1e-4, atol=2e-5 * scale, msg=lambda m: f"{what} {k}: {m}")


@pytest.mark.parametrize("estimator", ["full", "sampled"])
def test_step_matches_unpacked_float64_reference(single, estimator):
    _, res = single
    r = res[estimator]
    assert r["num_micro_batches"] >= 3  # the budget forces several packed micro-batches
    assert abs(r["loss"] - r["ref_loss"]) <= 1e-5 * abs(r["ref_loss"]) + 1e-8, (r["loss"], r["ref_loss"])
    assert any(g.abs().sum() > 0 for g in r["ref_grads"].values())
    _grads_close(r["grads"], r["ref_grads"], estimator)
    assert abs(r["sp_loss"] - r["ref_loss"]) <= 1e-5 * abs(r["ref_loss"]) + 1e-8, (r["sp_loss"], r["ref_loss"])
    _grads_close(r["sp_grads"], r["ref_grads"], f"{estimator}, single pass")
    m = r["metrics"]
    assert 0.0 <= m["router/omega_pos_frac"] <= 1.0 and m["loss/num_tokens"] > 0
    # 'sum' reduction: the per-micro-batch loss sums, divided by the token count in `summarise`, give the token mean
    # (one rank: the same as loss/dasd), and its two parts add up to it
    assert m["loss/total"] == pytest.approx(r["loss"], rel=1e-6, abs=1e-9)
    assert m["loss/pg"] + m["loss/distill"] == pytest.approx(m["loss/total"], rel=1e-6, abs=1e-9)


def _layouts_match_single(got, res, layouts):
    """Both paths (scoring + training, and the single pass) of each layout against the TP=1 run of the same
    estimator, which the float64 reference checked: the same loss and gradients (only the order of fp32 sums
    differs, and under CP the attention's key blocking and the packing), at the tolerances above."""
    for name, kw in layouts:
        r, want = got[-1][name], res[kw.get("estimator", "full")]  # the last rank is on the last pipeline stage
        for loss, grads, path in ((r["loss"], r["grads"], "scoring"), (r["sp_loss"], r["sp_grads"], "single pass")):
            assert abs(loss - want["loss"]) <= 1e-5 * abs(want["loss"]) + 1e-8, (name, path, loss, want["loss"])
            _grads_close(grads, want["grads"], f"{name}, {path}")
        m = r["metrics"]  # reduced over CP: the loss parts add up to the global mean and the counts are global
        assert m["loss/total"] == pytest.approx(r["loss"], rel=1e-5, abs=1e-8), name
        assert m["loss/num_tokens"] == sum(len(x.response_ids) for x in _rollouts(509)), name


def test_step_tp2_sp_and_dp2_match_tp1(hf_dir, single):
    ckpt, res = single
    layouts = [("TP2+SP", dict(tp=2, sp=True)), ("DP2", dict())]
    got = run_distributed(_worker, 2, hf_dir, ckpt, layouts, False)
    for name, _ in layouts:
        r = got[-1][name]
        assert abs(r["loss"] - res["full"]["loss"]) <= 1e-5 * abs(res["full"]["loss"]) + 1e-8, name
        _grads_close(r["grads"], res["full"]["grads"], name)
        assert abs(r["sp_loss"] - res["full"]["loss"]) <= 1e-5 * abs(res["full"]["loss"]) + 1e-8, name
        _grads_close(r["sp_grads"], res["full"]["grads"], f"{name}, single pass")


def test_documents_have_odd_lengths_and_need_cp_padding():
    """The rollouts of the CP tests: documents of odd lengths, which the CP split must pad (to a multiple of 4)."""
    rs = _rollouts(509)
    lengths = [r.length(t) for r in rs for t in (False, True)]
    assert any(n % 2 for n in lengths) and any(n % 4 for n in lengths), lengths


def test_step_cp2_and_pp2_match_tp1(hf_dir, single):
    """CP=2 (each estimator; documents of odd lengths padded per document, teacher rows moved across the CP group)
    and PP=2 (the teacher travelling with the student through megatron's 1F1B schedule), both paths."""
    ckpt, res = single
    layouts = [("CP2 full", dict(cp=2, estimator="full")), ("CP2 sampled", dict(cp=2, estimator="sampled")),
               ("PP2 full", dict(pp=2, estimator="full")), ("PP2 sampled", dict(pp=2, estimator="sampled"))]
    _layouts_match_single(run_distributed(_worker, 2, hf_dir, ckpt, layouts, False), res, layouts)


def test_step_tp2_cp2_sp_and_pp2_cp2_match_tp1(hf_dir, single):
    ckpt, res = single
    layouts = [("TP2xCP2+SP full", dict(tp=2, sp=True, cp=2, estimator="full")),
               ("PP2xCP2 full", dict(pp=2, cp=2, estimator="full"))]
    _layouts_match_single(run_distributed(_worker, 4, hf_dir, ckpt, layouts, False), res, layouts)


def test_unsupported_configs_fail_clearly(hf_dir):
    from dasd_megatron.config import ConfigError, apply_overrides
    from dasd_megatron.train.dasd_step import check_supported

    # 2 prompts x 3 samples = 6 rollouts: 3 per DP rank at world size 2, too few for 4 mini-batches
    with pytest.raises(ConfigError, match=r"train.updates_per_batch=4: each of the 2 data-parallel rank\(s\) gets 3"):
        check_supported(apply_overrides(_cfg(hf_dir), ["train.prompts_per_step=2", "train.updates_per_batch=4"]), 2)
    check_supported(apply_overrides(_cfg(hf_dir), ["train.prompts_per_step=2", "train.updates_per_batch=3"]), 2)
    # context and pipeline parallelism with either estimator are supported
    for over in (["parallel.context=2"], ["parallel.pipeline=2", "loss.estimator=full"]):
        check_supported(apply_overrides(_cfg(hf_dir), over), 2)


def _teacher_worker(rank, world_size, hf_dir, mode, estimator, cp=1):
    """A separate (frozen / EMA) teacher whose weights differ from the policy's: the step must use it for every
    teacher row (checked against the reference run with that teacher; at CP > 1 there is no unpacked reference:
    compare with the CP = 1 run), and update it correctly after the step."""
    from dasd_megatron.config import apply_overrides
    from dasd_megatron.model.builder import build_model
    from dasd_megatron.model.hf_config import load_hf_architecture
    from dasd_megatron.model.sharding import full_named_tensors
    from dasd_megatron.parallel import initialize_parallel
    from dasd_megatron.train.dasd_step import DASDStep
    from dasd_megatron.train.engine import build_optimizer, wrap_ddp
    from dasd_megatron.train.teacher import TeacherWeights

    arch = load_hf_architecture(hf_dir)
    rollouts = _rollouts(arch.vocab_size)
    adv = _advantages(rollouts)
    cfg = apply_overrides(_cfg(hf_dir, estimator=estimator, cp=cp), [f"train.teacher={mode}", "train.ema_decay=0.75",
                                                                      "optim.lr=0.01"])
    ctx = initialize_parallel(cfg.parallel)
    model = build_model(cfg, arch)
    teacher = TeacherWeights(build_model(cfg, arch), mode, cfg.train.ema_decay)
    teacher.copy_from(model)
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():  # move the teacher away from the policy so that using the wrong one shows
        for p in teacher.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    ref_loss, ref_grads = (_reference(model, arch, rollouts, adv, cfg.loss, teacher_model=teacher.model) if cp == 1
                           else (None, None))
    teacher_before = {n: p.detach().clone() for n, p in teacher.model.named_parameters()}
    ddp = wrap_ddp(model)
    step = DASDStep(ddp, build_optimizer(ddp, cfg.optim), cfg, arch, ctx, teacher=teacher)
    micro_batches = step.build_micro_batches(rollouts, list(range(len(rollouts))))
    scores = step.score(micro_batches)
    losses = step.train_after_scoring(micro_batches, scores, adv, step.rollout_stats(micro_batches, scores,
                                                                                     len(rollouts)))
    loss = step.summarise(losses)["loss/dasd"]
    grads = {k: v.clone() for k, v in full_named_tensors(ddp, grads=True).items()}  # the step clips in place
    from dasd_megatron.train.engine import optimizer_step

    optimizer_step(step.optimizer, lr=cfg.optim.lr)
    teacher.update(ddp)
    policy_after = {n: p.detach().clone() for n, p in model.named_parameters()}
    teacher_after = {n: p.detach().clone() for n, p in teacher.model.named_parameters()}
    return dict(loss=loss, ref_loss=ref_loss, grads=grads, ref_grads=ref_grads, teacher_before=teacher_before,
                teacher_after=teacher_after, policy_after=policy_after)


@pytest.mark.parametrize("mode, estimator", [("ema", "full"), ("frozen", "sampled")])
def test_separate_teacher_is_used_and_updated(hf_dir, mode, estimator):
    r = run_distributed(_teacher_worker, 1, hf_dir, mode, estimator)[0]
    assert abs(r["loss"] - r["ref_loss"]) <= 1e-5 * abs(r["ref_loss"]) + 1e-8, (r["loss"], r["ref_loss"])
    _grads_close(r["grads"], r["ref_grads"], f"teacher={mode}")
    moved = 0
    for n, before in r["teacher_before"].items():
        after, policy = r["teacher_after"][n], r["policy_after"][n]
        if mode == "frozen":
            assert torch.equal(after, before), f"frozen teacher {n} changed"
        else:  # float64 EMA: 0.75 * old teacher + 0.25 * new policy
            want = (0.75 * before.double() + 0.25 * policy.double()).float()
            torch.testing.assert_close(after, want, rtol=1e-6, atol=1e-7, msg=lambda m: f"EMA {n}: {m}")
        moved += not torch.equal(policy, before)
    assert moved, "the policy did not move: the update check would be vacuous"


def test_ema_teacher_at_cp2_matches_cp1(hf_dir):
    one = run_distributed(_teacher_worker, 1, hf_dir, "ema", "full")[0]
    two = run_distributed(_teacher_worker, 2, hf_dir, "ema", "full", 2)
    for rank, r in enumerate(two):
        assert abs(r["loss"] - one["loss"]) <= 1e-5 * abs(one["loss"]) + 1e-8, (rank, r["loss"], one["loss"])
        _grads_close(r["grads"], one["grads"], f"EMA teacher CP2 rank {rank}")
        for n, want in one["teacher_after"].items():
            # the EMA update itself, exactly, on every CP rank (float64: 0.75 * old teacher + 0.25 * new policy)
            ema = (0.75 * r["teacher_before"][n].double() + 0.25 * r["policy_after"][n].double()).float()
            torch.testing.assert_close(r["teacher_after"][n], ema, rtol=1e-6, atol=1e-7,
                                       msg=lambda m: f"CP2 rank {rank} EMA {n}: {m}")
            # and the same teacher as at CP=1, up to Adam's first step: lr * g / (|g| + eps) turns a rounding-level
            # gradient difference into up to 2 * lr for entries whose gradient is itself rounding noise
            torch.testing.assert_close(r["teacher_after"][n], want, rtol=0, atol=0.25 * 2 * 0.01,
                                       msg=lambda m: f"CP2 rank {rank} teacher {n} vs CP1: {m}")


def _ref_rows(model, arch, rollouts, teacher: bool):
    """Unpacked fp32 forwards: per rollout, the logits rows that score its response tokens."""
    rows = []
    for r in rollouts:
        prompt = list(r.teacher_prompt_ids if teacher else r.prompt_ids)
        seq = torch.tensor(prompt + list(r.response_ids))[None]
        logits = model(seq, torch.arange(seq.shape[1])[None], None)[0]
        rows.append(logits[len(prompt) - 1:len(prompt) - 1 + len(r.response_ids), : arch.vocab_size])
    return torch.cat(rows)


def _minibatch_worker(rank, world_size, hf_dir, estimator):
    """Two PPO updates on one batch, by hand through the step's phases, against a float64 reference of two
    sequential updates; then `run` from the same start must take the same two updates."""
    import loss_reference as ref

    from dasd_megatron.config import apply_overrides
    from dasd_megatron.model.builder import build_model
    from dasd_megatron.model.hf_config import load_hf_architecture
    from dasd_megatron.model.sharding import full_named_tensors
    from dasd_megatron.parallel import initialize_parallel
    from dasd_megatron.train.dasd_step import DASDStep
    from dasd_megatron.train.engine import build_optimizer, optimizer_step, wrap_ddp

    arch = load_hf_architecture(hf_dir)
    # rewards that vary inside both groups (= both halves), so the GRPO advantage, and the clip, act in both updates
    rollouts = [dataclasses.replace(r, reward=float(i % 2)) for i, r in enumerate(_rollouts(arch.vocab_size))]
    adv = _advantages(rollouts)
    # a large step and a narrow clip range, so that the second update's ratio leaves [1 - eps, 1 + eps]
    cfg = apply_overrides(_cfg(hf_dir, estimator=estimator), ["train.updates_per_batch=2", "optim.lr=0.05",
                                                              "loss.clip_eps_low=0.05", "loss.clip_eps_high=0.05"])
    ctx = initialize_parallel(cfg.parallel)
    model = build_model(cfg, arch)
    theta0 = {k: v.clone() for k, v in model.state_dict().items() if torch.is_tensor(v)}
    ref0 = build_model(cfg, arch)
    ref0.load_state_dict(model.state_dict())
    ddp = wrap_ddp(model)
    step = DASDStep(ddp, build_optimizer(ddp, cfg.optim), cfg, arch, ctx)
    ids = list(range(len(rollouts)))
    halves = [ids[:3], ids[3:]]  # what `run` cuts: 6 rollouts, 2 updates
    minis = [step.build_micro_batches([rollouts[i] for i in h], h) for h in halves]
    scores = step.score(minis[0] + minis[1])
    rstats = step.rollout_stats(minis[0] + minis[1], scores, len(rollouts))
    got = []
    k = len(minis[0])
    for j, (mini, sc) in enumerate(zip(minis, (scores[:k], scores[k:]))):
        if j == 1:
            theta1 = build_model(cfg, arch)
            theta1.load_state_dict(model.state_dict())
        summary = step.summarise(step.train_after_scoring(mini, sc, adv, rstats))
        got.append((summary, {n: g.clone() for n, g in full_named_tensors(ddp, grads=True).items()}))
        optimizer_step(step.optimizer, lr=cfg.optim.lr)

    # the float64 reference: old log-probs, router statistics and (sampled) teacher log-probs from theta0 over the
    # whole batch; each update's token mean over its own half; the second update's student (and, for `full`, its
    # teacher: train.teacher=current) at theta1
    targets = torch.tensor([t for r in rollouts for t in r.response_ids])
    rid = torch.tensor([i for i, r in enumerate(rollouts) for _ in r.response_ids])
    rlp = torch.tensor([x for r in rollouts for x in r.rollout_logprobs], dtype=torch.float64)
    with torch.no_grad():
        s0, t0 = _ref_rows(ref0, arch, rollouts, False), _ref_rows(ref0, arch, rollouts, True)
        tok0 = ref.ref_token_stats(s0, t0, targets, temperature=cfg.loss.temperature)
    stats = ref.ref_rollout_stats(tok0["entropy"], tok0["teacher_logp"] - tok0["logp"], rid, len(rollouts), cfg.loss)
    out = []
    for j, net in enumerate((ref0, theta1)):
        sel = torch.isin(rid, torch.tensor(halves[j]))
        s = _ref_rows(net, arch, rollouts, False)[sel]
        t = (t0 if estimator == "sampled" else _ref_rows(net, arch, rollouts, True))[sel].detach()
        tok = ref.ref_token_stats(s, t, targets[sel], temperature=cfg.loss.temperature)
        if estimator == "sampled":
            tok["teacher_logp"] = tok0["teacher_logp"][sel]
        old = tok0["logp"][sel]
        ratio = torch.exp(tok["logp"].detach() - old)
        loss = ref.ref_dasd_loss(tok, rid[sel], adv.tolist(), cfg.loss, old_logp=old, rollout_logp=rlp[sel],
                                 stats=stats)
        net.zero_grad()
        loss.backward()
        out.append(dict(loss=loss.item(), grads={n: p.grad.detach().clone() for n, p in net.named_parameters()},
                         ratio_mean=ratio.mean().item(), ratio_max=ratio.max().item()))

    # `run` from theta0 on a fresh model and optimizer
    model2 = build_model(cfg, arch)
    model2.load_state_dict(theta0, strict=False)
    ddp2 = wrap_ddp(model2)
    result = DASDStep(ddp2, build_optimizer(ddp2, cfg.optim), cfg, arch, ctx).run(rollouts, ids, adv)
    return dict(got=[(m, None) for m, _ in got], got_grads=[g for _, g in got], ref=out, run=result)


@pytest.mark.parametrize("estimator", ["sampled", "full"])
def test_two_ppo_updates_match_float64_reference(hf_dir, estimator):
    r = run_distributed(_minibatch_worker, 1, hf_dir, estimator)[0]
    for j in range(2):
        m, want = r["got"][j][0], r["ref"][j]
        assert abs(m["loss/dasd"] - want["loss"]) <= 1e-5 * abs(want["loss"]) + 1e-8, (j, m["loss/dasd"], want)
        _grads_close(r["got_grads"][j], want["grads"], f"update {j}")
        assert m["loss/ratio_mean"] == pytest.approx(want["ratio_mean"], rel=1e-5)
        assert m["loss/ratio_max"] == pytest.approx(want["ratio_max"], rel=1e-5)
    first, second = r["got"][0][0], r["got"][1][0]
    assert first["loss/ratio_mean"] == pytest.approx(1.0, abs=1e-6) and first["loss/clip_frac"] == 0.0
    assert abs(second["loss/ratio_mean"] - 1.0) > 1e-3 and second["loss/clip_frac"] > 0.0, second
    run = r["run"]  # `run` takes the same two updates and logs each
    assert run["optim/updates"] == 2
    for j in range(2):
        m = r["got"][j][0]
        assert run[f"ppo/update{j}/loss"] == pytest.approx(m["loss/dasd"], rel=1e-5, abs=1e-8)
        assert run[f"ppo/update{j}/clip_frac"] == pytest.approx(m["loss/clip_frac"], abs=1e-9)
        assert run[f"ppo/update{j}/ratio_mean"] == pytest.approx(m["loss/ratio_mean"], rel=1e-5)
    assert run["loss/clip_frac"] > 0.0
