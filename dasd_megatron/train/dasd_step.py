"""One DASD optimisation step on a batch of rollouts, through megatron's schedules.

`DASDStep.run(rollouts, rollout_ids, advantages, step=...)` does, for this data-parallel rank's rollouts:

1. `build_micro_batches`: pack the rollouts into `MicroBatch`es, each the same rollouts packed twice, as the student
   sees them (`prompt + response`) and as the teacher sees them (`teacher_prompt + response`).
2. forward-backward with the DASD loss over every micro-batch, by one of two schedules:

   - `train_single_pass` (pipeline parallelism 1, the usual case): each micro-batch runs the teacher forward (no
     grad) right before the student's forward-backward. Its loss takes the old log-probs as the student's own
     detached log-probs (one optimizer step per batch: the policy has not moved since the rollouts were sampled)
     and the per-rollout statistics from its own tokens (exact: every rollout lives whole in one micro-batch).
     This is METHOD.md's cost, one teacher forward on top of GRPO's work.
   - `score`, `rollout_stats`, then `train_after_scoring` (pipeline parallelism > 1: a teacher forward is itself
     spread over the stages, so it cannot run inside the student's micro-batch; a pass of its own brings the teacher
     log-probs to the last stage, where the loss sits). `score` is a forward-only pass over the student and teacher
     packs that returns, per micro-batch, `TokenScores`: the student log-prob and entropy and the teacher log-prob
     of every response token. `rollout_stats` turns them into per-rollout statistics; `train_after_scoring` then
     runs the student forward-backward with those values.

3. the optimizer step (learning rate of step `step`), the frozen / EMA teacher's update (`train/teacher.py`;
   `train.teacher=current` uses the policy itself), and `summarise`.

Normalisation ('sum' reduction): megatron's per-token-loss convention (train/engine.py). Each micro-batch's loss
function returns the *sum* of its token losses (`dasd_loss_sum`) and its token count; megatron sums the counts
over micro-batches and DP ranks and divides the gradients by the total, so the step optimises the token mean over
the global batch. `summarise` divides the reported sums by the same count.

Limits (checked by `check_supported`): the `full` estimator with pipeline parallelism > 1, and context
parallelism > 1, are refused.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from dasd_megatron.config import ConfigError, RunConfig
from dasd_megatron.loss import (DASDLossConfig, RolloutStats, TokenStats, compute_rollout_stats, dasd_loss,
                                vocab_parallel_token_stats)
from dasd_megatron.train.batch import PackedBatch, Rollout, pack, plan_micro_batches
from dasd_megatron.train.engine import forward_backward, optimizer_step


def check_supported(cfg: RunConfig) -> None:
    """Refuse the configurations this step does not implement (module docstring), naming the field and the fix."""
    if cfg.parallel.context > 1:
        raise ConfigError("parallel.context>1: the DASD step does not align teacher rows across CP ranks yet. "
                          "Fix: use parallel.context=1 for training")
    if cfg.parallel.pipeline > 1 and cfg.loss.estimator == "full":
        raise ConfigError("loss.estimator='full' with parallel.pipeline>1 is not implemented yet (the teacher's "
                          "full-vocabulary logits would cross the pipeline). Fix: set loss.estimator=sampled or "
                          "parallel.pipeline=1")
    if cfg.optim.lr_schedule != "constant":
        cfg.optim.decay_end(cfg.train.steps)  # a decay that follows train.steps must end after the warm-up


# -- the loss of one micro-batch, in 'sum' reduction -----------------------------------------------------------------

SUM_REDUCTION = 1
"""`num_global_tokens` for `dasd_loss` that makes it return the plain sum of its token losses: `dasd_loss` divides
that sum by `num_global_tokens`, and a division by 1 is exact."""

SUMMED_LOSS_METRICS = ("loss/total", "loss/pg", "loss/distill")
"""The `dasd_loss` metrics that are the loss or its parts: in 'sum' reduction they are sums over the micro-batch's
tokens (the other metrics are means over them)."""


def dasd_loss_sum(stats: TokenStats, batch: PackedBatch, advantages: torch.Tensor, cfg: DASDLossConfig, *,
                  old_logp: Optional[torch.Tensor], rollout_stats: Optional[RolloutStats]):
    """`(sum over the micro-batch's response tokens of loss_t, metrics)`: `dasd_loss` on the loss rows of `batch`
    with the rollout engine's log-probs, in 'sum' reduction (`SUM_REDUCTION`).

    `old_logp` None: the student's own detached log-probs (on-policy); `rollout_stats` None: computed from this
    micro-batch's tokens (exact when it holds its rollouts whole)."""
    mask = batch.loss_mask
    return dasd_loss(stats, batch.rollout_index[mask], advantages, cfg, old_logp=old_logp,
                     rollout_logp=batch.rollout_logp[mask], rollout_stats=rollout_stats,
                     num_global_tokens=SUM_REDUCTION)


# -- what the step passes between its phases -------------------------------------------------------------------------

@dataclass(frozen=True)
class MicroBatch:
    """The same rollouts, in the same order, packed as the student sees them and as the teacher sees them: their
    loss rows line up one to one (train/batch.py)."""

    student: PackedBatch
    teacher: PackedBatch


@dataclass(frozen=True)
class TokenScores:
    """The scoring pass's values for one micro-batch, on its loss rows (`[rows]` each, at the rollout temperature,
    with the weights before this step's update)."""

    logp: torch.Tensor
    """The student's log-prob of each response token: the old log-probs of the PPO ratio."""
    entropy: torch.Tensor
    """The student's entropy at each response token."""
    teacher_logp: torch.Tensor
    """The teacher's log-prob of each response token."""


@dataclass
class MicroBatchLosses:
    """What a forward-backward pass reports, per micro-batch (last pipeline stage; empty elsewhere)."""

    reports: list
    """megatron's per-micro-batch reports, each `{"loss": [loss sum, token count]}`."""
    metrics: list[tuple[int, dict[str, float]]]
    """`(token count, dasd_loss metrics)` per micro-batch."""


class DASDStep:
    def __init__(self, model, optimizer, cfg: RunConfig, arch, ctx, teacher=None):
        """`teacher`: a `TeacherWeights` (train.teacher=frozen/ema) whose model runs the teacher forwards; None: the
        policy itself (train.teacher=current)."""
        check_supported(cfg)
        if (teacher is None) != (cfg.train.teacher == "current"):
            raise ValueError(f"DASDStep: train.teacher={cfg.train.teacher!r} but teacher weights were "
                             f"{'not ' if teacher is None else ''}given")
        self.model, self.optimizer, self.cfg, self.arch, self.ctx = model, optimizer, cfg, arch, ctx
        self.teacher = teacher
        self.score_first = ctx.pp > 1
        """True: `run` scores the teacher in a pass of its own before training (`train_after_scoring`), as PP > 1
        needs; False: the single pass (`train_single_pass`). Settable at PP = 1 to compare the two."""
        self.pad_multiple = cfg.parallel.tensor if cfg.parallel.sequence_parallel else 1

    # -- the step ----------------------------------------------------------------------------------------------------
    def run(self, rollouts: Sequence[Rollout], rollout_ids: Sequence[int], advantages: torch.Tensor,
            step: int = 0) -> dict:
        """All phases for this DP rank's rollouts (global ids `rollout_ids` index `advantages`, shape [N]);
        `step` (0-based) sets the learning rate (`optim.warmup_steps`, `optim.lr_schedule` over `train.steps`)."""
        if not rollouts:
            raise ValueError("DASDStep.run: this data-parallel rank received no rollouts (every sample came back "
                             "empty, or the batch is smaller than the DP size). Fix: raise train.prompts_per_step")
        micro_batches = self.build_micro_batches(rollouts, rollout_ids)
        advantages = advantages.to(self.ctx.device)
        if self.score_first:
            scores = self.score(micro_batches)
            rstats = self.rollout_stats(micro_batches, scores, advantages.shape[0])
            losses = self.train_after_scoring(micro_batches, scores, advantages, rstats)
        else:
            losses = self.train_single_pass(micro_batches, advantages)
        result = optimizer_step(self.optimizer, lr=self.cfg.optim.lr_at(step, self.cfg.train.steps))
        if self.teacher is not None and result.get("update_successful", True):
            self.teacher.update(self.model)
        result.update(self.summarise(losses))
        return result

    def build_micro_batches(self, rollouts: Sequence[Rollout], rollout_ids: Sequence[int]) -> list[MicroBatch]:
        """Pack `rollouts` (global ids `rollout_ids`) into micro-batches of at most `train.micro_batch_tokens`
        (`plan_micro_batches`), on this rank's device."""
        plan = plan_micro_batches(rollouts, self.cfg.train.micro_batch_tokens, self.pad_multiple)
        dev = self.ctx.device
        out = []
        for ids in plan:
            gids = [rollout_ids[i] for i in ids]
            s = pack(rollouts, ids, teacher=False, rollout_ids=gids, pad_multiple=self.pad_multiple).to(dev)
            t = pack(rollouts, ids, teacher=True, rollout_ids=gids, pad_multiple=self.pad_multiple).to(dev)
            out.append(MicroBatch(student=s, teacher=t))
        return out

    def train_single_pass(self, micro_batches: list[MicroBatch], advantages: torch.Tensor) -> MicroBatchLosses:
        """Forward-backward with the DASD loss, the teacher forward inside each micro-batch (used at PP = 1).

        When the teacher term is on (either estimator) the teacher pack runs right before the student's, under
        no_grad, so only one micro-batch of teacher logits is alive at a time. Old log-probs: the student's own,
        detached; per-rollout statistics: from the micro-batch's own tokens (see the module docstring)."""
        return self._forward_backward(micro_batches, advantages, teacher_logits=self.cfg.loss.teacher_term_on,
                                      scores=None, rollout_stats=None)

    @torch.no_grad()
    def score(self, micro_batches: list[MicroBatch]) -> Optional[list[TokenScores]]:
        """Forward-only passes over the student packs, then the teacher packs: the `TokenScores` of every
        micro-batch (used at PP > 1). Megatron runs the loss function on the last pipeline stage only: the values
        exist there, and this returns None on the other stages."""
        found: dict[tuple[bool, int], TokenStats] = {}
        for teacher in (False, True):
            def forward_step(item, model, teacher=teacher):
                idx, mb = item
                batch = mb.teacher if teacher else mb.student
                out = self._forward(model, batch)

                def loss_func(logits):
                    found[teacher, idx] = self._token_stats(self._loss_rows(logits, batch), None, batch)
                    n = torch.tensor(int(batch.loss_mask.sum()), dtype=torch.int, device=logits.device)
                    return logits.new_zeros(()), n, {}

                return out, loss_func

            seq = max((mb.teacher if teacher else mb.student).tokens.shape[1] for mb in micro_batches)
            net = self.teacher.model if teacher and self.teacher is not None else self.model
            forward_backward(net, list(enumerate(micro_batches)), forward_step, seq_length=seq, forward_only=True)
        if not self.ctx.is_last_stage:
            return None
        return [TokenScores(logp=found[False, i].logp, entropy=found[False, i].entropy,
                            teacher_logp=found[True, i].logp) for i in range(len(micro_batches))]

    def rollout_stats(self, micro_batches: list[MicroBatch], scores: Optional[list[TokenScores]],
                      num_rollouts: int) -> Optional[RolloutStats]:
        """Per-rollout entropy quantile, spread and gap scale over whole rollouts, from the scoring pass (every
        rollout lives in one micro-batch on one DP rank, so no collective is needed). None where `scores` is."""
        if scores is None:
            return None
        H = torch.cat([s.entropy for s in scores])
        delta = torch.cat([s.teacher_logp - s.logp for s in scores])
        ri = torch.cat([mb.student.rollout_index[mb.student.loss_mask] for mb in micro_batches])
        return compute_rollout_stats(H, delta, ri, num_rollouts, self.cfg.loss)

    def train_after_scoring(self, micro_batches: list[MicroBatch], scores: Optional[list[TokenScores]],
                            advantages: torch.Tensor, rollout_stats: Optional[RolloutStats]) -> MicroBatchLosses:
        """Forward-backward with the DASD loss after `score` and `rollout_stats` (used at PP > 1).

        Old log-probs and (`sampled` estimator) teacher log-probs come from `scores`. The `full` estimator needs
        the teacher's full-vocabulary logits of the same rows: the teacher pack runs right before the student's,
        under no_grad, with the same weights (`check_supported` refuses it at PP > 1)."""
        cfg = self.cfg.loss
        teacher_logits = cfg.estimator == "full" and cfg.beta != 0.0
        return self._forward_backward(micro_batches, advantages, teacher_logits=teacher_logits, scores=scores,
                                      rollout_stats=rollout_stats)

    def summarise(self, losses: MicroBatchLosses) -> dict:
        """`loss/dasd`: the global token-mean loss (sums and token counts all-reduced over DP), `loss/num_tokens`;
        the other metrics: token-weighted means over this rank's micro-batches (`SUMMED_LOSS_METRICS` are sums, so
        they are divided by the token count)."""
        out: dict = {}
        if losses.reports:
            tot = torch.stack([r["loss"] for r in losses.reports]).sum(0)
            if self.ctx.dp > 1:
                torch.distributed.all_reduce(tot, group=self.ctx.dp_group)
            out["loss/dasd"] = (tot[0] / tot[1].clamp(min=1)).item()
            out["loss/num_tokens"] = int(tot[1].item())
        metrics = losses.metrics
        n_all = sum(n for n, _ in metrics)
        if n_all:
            for k in metrics[0][1].keys():
                if k in out:  # loss/num_tokens comes from the schedule's reports (global over DP)
                    continue
                if k in SUMMED_LOSS_METRICS:
                    out[k] = sum(m[k] for _, m in metrics) / n_all
                else:  # per-micro-batch means: token-weighted
                    out[k] = sum(n * m[k] for n, m in metrics) / n_all
        return out

    # -- helpers -----------------------------------------------------------------------------------------------------
    def _forward_backward(self, micro_batches: list[MicroBatch], advantages: torch.Tensor, *, teacher_logits: bool,
                          scores: Optional[list[TokenScores]],
                          rollout_stats: Optional[RolloutStats]) -> MicroBatchLosses:
        """megatron's forward-backward over the student packs, each micro-batch's loss `dasd_loss_sum`.

        `teacher_logits`: run the teacher pack (no grad) before the student's, and give the loss the teacher's
        logits rows. `scores` None: old log-probs are the student's own, detached, and without teacher logits the
        teacher log-probs equal them (the teacher term is off); else both come from `scores`."""
        cfg = self.cfg.loss
        metrics: list[tuple[int, dict]] = []

        def forward_step(item, model):
            idx, mb = item
            t_logits = None
            if teacher_logits:
                with torch.no_grad():
                    t_logits = self._forward(model if self.teacher is None else self.teacher.model, mb.teacher)
            out = self._forward(model, mb.student)

            def loss_func(logits):
                scored = scores[idx] if scores is not None else None
                t_rows = self._loss_rows(t_logits, mb.teacher) if t_logits is not None else None
                st = self._token_stats(self._loss_rows(logits, mb.student), t_rows, mb.student)
                if t_rows is None:
                    st = st._replace(teacher_logp=st.logp.detach() if scored is None else scored.teacher_logp)
                loss_sum, m = dasd_loss_sum(st, mb.student, advantages, cfg,
                                            old_logp=None if scored is None else scored.logp,
                                            rollout_stats=rollout_stats)
                n = int(mb.student.loss_mask.sum())
                metrics.append((n, {k: float(v) for k, v in m.items()}))
                nt = torch.tensor(n, dtype=torch.int, device=logits.device)
                return loss_sum, nt, {"loss": torch.stack([loss_sum.detach(), nt.float()])}

            return out, loss_func

        seq = max(mb.student.tokens.shape[1] for mb in micro_batches)
        reports = forward_backward(self.model, list(enumerate(micro_batches)), forward_step, seq_length=seq)
        return MicroBatchLosses(reports=reports, metrics=metrics)

    def _loss_rows(self, logits: torch.Tensor, batch: PackedBatch) -> torch.Tensor:
        """[1, T, V/tp] logits -> [rows, V/tp] at the positions that predict response tokens."""
        return logits[0][batch.loss_mask]

    def _token_stats(self, s_rows, t_rows, batch: PackedBatch) -> TokenStats:
        """Vocab-parallel per-token statistics of the student rows (and teacher rows, when given)."""
        v_local = s_rows.shape[-1]
        return vocab_parallel_token_stats(
            s_rows, t_rows, batch.targets[batch.loss_mask], self.ctx.tp_group,
            vocab_start=self.ctx.tp_rank * v_local, vocab_size=self.arch.vocab_size, **self.cfg.loss.kernel_kwargs,
        )

    def _forward(self, model, batch: PackedBatch):
        return model(batch.tokens, batch.position_ids, None, packed_seq_params=batch.packed_seq_params())
