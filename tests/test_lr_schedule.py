"""`optim.lr_schedule`: warm-up, then constant / cosine / linear decay to `optim.min_lr` at the last training step.

The expected learning rates are closed forms written out here in float64 (Python floats), plus a few hand-computed
literals, and megatron's own OptimizerParamScheduler (whose semantics the schedule follows: 1-based step count, decay
reaching min_lr at `lr_decay_steps`, which defaults to the number of training steps). The last test runs the DASD
step itself and checks that the learning rate reaches megatron's optimizer: Adam's first update moves each weight by
~lr, whatever the gradient's size.
"""

from __future__ import annotations

import math

import pytest

import hf_fixtures
from dasd_megatron.config import ConfigError, RunConfig, apply_overrides
from dasd_megatron.train.config import OptimConfig

hf_dir = hf_fixtures.tiny_qwen3_dir  # the pytest fixture: a tiny Qwen3 config folder

LR, MIN_LR, WARMUP, STEPS = 1e-3, 1e-4, 4, 20


def _expected(schedule: str, step: int, lr=LR, min_lr=MIN_LR, warmup=WARMUP, end=STEPS) -> float:
    """Closed form for 0-based optimizer step `step`: n = step + 1 optimizer steps taken."""
    n = step + 1
    if warmup and n <= warmup:
        return lr * n / warmup
    if schedule == "constant":
        return lr
    t = min(1.0, (n - warmup) / (end - warmup))  # fraction of the decay done
    shape = (1 + math.cos(math.pi * t)) / 2 if schedule == "cosine" else 1 - t
    return min_lr + (lr - min_lr) * shape


def _cfg(schedule: str, **kw) -> OptimConfig:
    if schedule != "constant":
        kw.setdefault("min_lr", MIN_LR)
    return OptimConfig(lr=LR, warmup_steps=kw.pop("warmup_steps", WARMUP), lr_schedule=schedule, **kw)


# first step, during warm-up, end of warm-up, first decay step, a quarter and half of the decay, next-to-last, last
STEPS_CHECKED = [0, 1, WARMUP - 1, WARMUP, 7, 11, STEPS - 2, STEPS - 1]


@pytest.mark.parametrize("schedule", ["constant", "cosine", "linear"])
def test_lr_equals_closed_form(schedule):
    cfg = _cfg(schedule)
    for s in STEPS_CHECKED:
        assert math.isclose(cfg.lr_at(s, STEPS), _expected(schedule, s), rel_tol=1e-12, abs_tol=0), (schedule, s)


def test_hand_computed_points():
    """Anchors independent of any formula written in code: the warm-up ramp, the peak, the decay's midpoint (the
    same for cosine and linear), its quarter point, and min_lr at the last step."""
    cos, lin, const = _cfg("cosine"), _cfg("linear"), _cfg("constant")
    for cfg in (cos, lin, const):
        assert cfg.lr_at(0, STEPS) == pytest.approx(2.5e-4, rel=1e-12)   # 1/4 of the way up
        assert cfg.lr_at(WARMUP - 1, STEPS) == pytest.approx(1e-3, rel=1e-12)  # end of warm-up: the peak
    # n = 12: 8 of the 16 decay steps done
    assert cos.lr_at(11, STEPS) == pytest.approx(5.5e-4, rel=1e-12)
    assert lin.lr_at(11, STEPS) == pytest.approx(5.5e-4, rel=1e-12)
    # n = 8: a quarter done; cosine: 1e-4 + 9e-4 * (1 + sqrt(2)/2) / 2
    assert cos.lr_at(7, STEPS) == pytest.approx(1e-4 + 9e-4 * 0.8535533905932737, rel=1e-12)
    assert lin.lr_at(7, STEPS) == pytest.approx(1e-4 + 9e-4 * 0.75, rel=1e-12)
    assert cos.lr_at(STEPS - 1, STEPS) == lin.lr_at(STEPS - 1, STEPS) == 1e-4  # the last step runs at min_lr
    assert [const.lr_at(s, STEPS) for s in range(WARMUP - 1, STEPS)] == [1e-3] * (STEPS - WARMUP + 1)


@pytest.mark.parametrize("schedule", ["constant", "cosine", "linear"])
@pytest.mark.parametrize("warmup,steps,decay_steps", [(0, 10, 0), (3, 10, 0), (4, 20, 12), (2, 8, 30), (1, 2, 0)])
def test_matches_megatron_optimizer_param_scheduler(schedule, warmup, steps, decay_steps):
    """Every step of a run equals megatron's scheduler after the same number of `step(1)` calls."""
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    class _Opt:
        param_groups = [{}]

    cfg = _cfg(schedule, warmup_steps=warmup, decay_steps=decay_steps if schedule != "constant" else 0)
    ref = OptimizerParamScheduler(_Opt(), init_lr=0.0, max_lr=LR, min_lr=cfg.min_lr, lr_warmup_steps=warmup,
                                  lr_decay_steps=decay_steps or steps, lr_decay_style=schedule, start_wd=0.0,
                                  end_wd=0.0, wd_incr_steps=1, wd_incr_style="constant")
    got, want = [], []
    for s in range(steps + 5):  # past the end of the decay too: min_lr is held
        ref.step(1)
        want.append(_Opt.param_groups[0]["lr"])
        got.append(cfg.lr_at(s, steps))
    assert got == pytest.approx(want, rel=1e-12, abs=0)


def test_explicit_decay_steps():
    """`decay_steps` < train.steps: min_lr from then on; > train.steps: the run ends before the decay does."""
    short = _cfg("linear", decay_steps=10)
    assert short.lr_at(9, STEPS) == MIN_LR and short.lr_at(STEPS - 1, STEPS) == MIN_LR
    assert short.lr_at(6, STEPS) == pytest.approx(_expected("linear", 6, end=10), rel=1e-12)
    long = _cfg("cosine", decay_steps=2 * STEPS)
    assert long.lr_at(STEPS - 1, STEPS) == pytest.approx(_expected("cosine", STEPS - 1, end=2 * STEPS), rel=1e-12)
    assert long.lr_at(STEPS - 1, STEPS) > MIN_LR
    assert long.lr_at(5) == long.lr_at(5, 999)  # an explicit decay length does not need train.steps


def test_lr_depends_on_the_step_number_only():
    """Resume: the step number comes back from the checkpoint, and the schedule is a pure function of it and the
    config, so a resumed run sees the uninterrupted run's learning rates."""
    cfg = _cfg("cosine")
    uninterrupted = [cfg.lr_at(s, STEPS) for s in range(STEPS)]
    resumed = [_cfg("cosine").lr_at(s, STEPS) for s in range(9, STEPS)]  # a fresh config object, as after a restart
    assert resumed == uninterrupted[9:]
    assert len(set(uninterrupted)) == STEPS  # every step's lr differs, so a resume one step off would show


@pytest.mark.parametrize("kw,field,fix", [
    (dict(lr_schedule="step"), "optim.lr_schedule='step'", "use constant, cosine or linear"),
    (dict(lr_schedule="cosine", min_lr=2e-3), "optim.min_lr=0.002", r"must be in \[0, optim.lr=0.001\]"),
    (dict(lr_schedule="linear", min_lr=-1e-5), "optim.min_lr=-1e-05", "use e.g. optim.lr / 10, or 0"),
    (dict(min_lr=1e-4), "optim.min_lr=0.0001", "set optim.lr_schedule=cosine or linear, or leave optim.min_lr=0"),
    (dict(decay_steps=10), "optim.decay_steps=10", "set optim.lr_schedule=cosine or linear"),
    (dict(lr_schedule="cosine", warmup_steps=10, decay_steps=10), "optim.decay_steps=10",
     "make it larger than 10, lower optim.warmup_steps, or use optim.lr_schedule=constant"),
    (dict(warmup_steps=-1), "optim.warmup_steps=-1", "use 0 to disable"),
    (dict(lr_schedule="cosine", decay_steps=-5), "optim.decay_steps=-5", "must be an integer >= 0"),
])
def test_config_errors_name_the_field_and_the_fix(kw, field, fix):
    with pytest.raises(ConfigError, match=rf"^{field}:.*{fix}"):
        OptimConfig(lr=1e-3, **kw)


def test_decay_over_train_steps_must_end_after_warmup():
    """With decay_steps=0 the decay follows train.steps, known only to the run: the step refuses it before any
    process group starts (check_supported), naming train.steps."""
    from dasd_megatron.train.dasd_step import check_supported

    bad = apply_overrides(RunConfig(), ["optim.lr_schedule=cosine", "optim.warmup_steps=5", "train.steps=5"])
    with pytest.raises(ConfigError, match=r"^train.steps=5: optim.lr_schedule=cosine decays after "
                                          r"optim.warmup_steps=5.*Fix: make it larger than 5"):
        check_supported(bad, 1)
    check_supported(apply_overrides(bad, ["train.steps=6"]), 1)
    check_supported(apply_overrides(bad, ["optim.lr_schedule=constant"]), 1)  # no decay: any length is fine


def test_overrides_parse_the_schedule():
    cfg = apply_overrides(RunConfig(), ["optim.lr_schedule=linear", "optim.min_lr=1e-7", "optim.decay_steps=50"])
    assert (cfg.optim.lr_schedule, cfg.optim.min_lr, cfg.optim.decay_steps) == ("linear", 1e-7, 50)
    with pytest.raises(ConfigError, match="optim.lr_schedule='step'"):
        apply_overrides(RunConfig(), ["optim.lr_schedule=step"])


# -- the DASD step applies it ------------------------------------------------------------------------------------------

def _step_worker(rank, world_size, hf_dir, steps_to_run):
    """One DASD step at each step number of `steps_to_run`, each with a fresh optimizer (as after a resume); returns,
    for each, the logged lr and the median |weight change| of the weights that moved."""
    import random

    import torch
    from megatron.core import parallel_state as ps

    from dasd_megatron.config import ModelConfig, ParallelConfig
    from dasd_megatron.loss import grpo_advantages
    from dasd_megatron.model.builder import build_model
    from dasd_megatron.model.hf_config import load_hf_architecture
    from dasd_megatron.parallel import initialize_parallel
    from dasd_megatron.train.batch import Rollout
    from dasd_megatron.train.dasd_step import DASDStep
    from dasd_megatron.train.engine import build_optimizer, wrap_ddp

    arch = load_hf_architecture(hf_dir)
    cfg = apply_overrides(
        RunConfig(model=ModelConfig(hf_config=hf_dir, seq_length=64, init_method_std=0.5),
                  parallel=ParallelConfig()),
        ["train.max_prompt_tokens=12", "train.max_response_tokens=8", "train.micro_batch_tokens=40",
         "train.samples_per_prompt=2", f"train.steps={STEPS}", f"optim.lr={LR}", f"optim.warmup_steps={WARMUP}",
         "optim.lr_schedule=cosine", f"optim.min_lr={MIN_LR}", "optim.clip_grad=0"],
    )
    rng = random.Random(0)
    rollouts = []
    for g in range(2):
        prompt = [rng.randrange(arch.vocab_size) for _ in range(4)]
        for reward in (1.0, 0.0):  # varied rewards in each group: non-zero advantages
            resp = [rng.randrange(arch.vocab_size) for _ in range(5)]
            rollouts.append(Rollout(prompt, prompt, resp, [-1.0] * 5, reward=reward, group=g))
    adv = grpo_advantages(torch.tensor([r.reward for r in rollouts]), group_size=2)

    ctx = initialize_parallel(cfg.parallel)
    ddp = wrap_ddp(build_model(cfg, arch))
    out = []
    for step in steps_to_run:
        step_fn = DASDStep(ddp, build_optimizer(ddp, cfg.optim), cfg, arch, ctx)  # fresh Adam: first update ~ lr
        before = {n: p.detach().clone() for n, p in ddp.named_parameters()}
        res = step_fn.run(rollouts, list(range(len(rollouts))), adv, step=step)
        moved = [(p.detach() - before[n]).abs().flatten() for n, p in ddp.named_parameters()]
        moved = torch.cat(moved)
        moved = moved[moved > 0]  # weights with no gradient (unused token rows) stay put
        out.append({"step": step, "lr": res["optim/lr"], "median_move": moved.median().item(),
                    "n_moved": moved.numel()})
    ps.destroy_model_parallel()
    return out


def test_dasd_step_applies_the_schedule(hf_dir):
    """DASDStep.run at a mid-decay step, a warm-up step and the last step: the logged `optim/lr` is the closed form,
    and megatron's Adam used it. Adam's first update (fresh optimizer, no clipping, no weight decay) moves each
    weight by lr * g / (|g| + eps), i.e. by lr wherever |g| >> eps = 1e-8, so the median move is the lr applied."""
    from dasd_megatron.testing.distributed import run_distributed

    steps = [11, 0, STEPS - 1]
    res = run_distributed(_step_worker, 1, hf_dir, steps)[0]
    for r in res:
        want = _expected("cosine", r["step"])
        assert math.isclose(r["lr"], want, rel_tol=1e-12), r
        assert r["n_moved"] > 1000 and r["median_move"] == pytest.approx(want, rel=1e-2), r
    assert [r["lr"] for r in res] == pytest.approx([5.5e-4, 2.5e-4, 1e-4], rel=1e-12)
