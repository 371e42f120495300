"""One DASD optimisation step on a batch of rollouts, through megatron's schedules.

Phases (one method each). With pipeline parallelism 1 (the usual case for the models we train) phases 1-2 fold
into phase 3 (`single_pass`): each micro-batch runs the teacher forward and the student forward-backward, and its
loss takes the old log-probs and per-rollout statistics from that same pass. That is METHOD.md's cost, one teacher
forward on top of GRPO's work, instead of a separate scoring pass over both models. With PP > 1:

1. `score`: forward-only passes over the packed student and teacher micro-batches (no grad): per response token the
   student log-prob and entropy, and the teacher's log-prob, at the rollout temperature (vocab-parallel kernels).
2. `rollout_stats`: per-rollout entropy quantile, spread and gap scale from whole rollouts (every rollout lives in one
   micro-batch on one DP rank here, so no collective is needed).
3. `train`: forward-backward over the student micro-batches with megatron's schedule; the loss function computes the
   DASD objective on each micro-batch. The `full` estimator needs the teacher's full-vocabulary logits of the same
   rows: the teacher pack of the micro-batch is run right before the student's, under no_grad, with the same
   (current) weights, so only one micro-batch of teacher logits is alive at a time. The `sampled` estimator only
   needs the teacher log-probs from phase 1.
4. the optimizer step.

Normalisation: megatron's per-token-loss convention (see train/engine.py). Each micro-batch returns the *sum* of its
token losses and its token count; megatron sums the counts over micro-batches and DP ranks and divides the gradients
by the total, so the step optimises the token mean over the global batch.

Teacher weights: the policy itself (`train.teacher=current`), or a separate frozen / EMA copy
(`train/teacher.py`), whose model then runs the teacher forwards of phases 1 and 3 (updated after each optimizer step).

Limits (checked by `check_supported`): the `full` estimator with pipeline parallelism > 1 and context parallelism > 1
are not implemented yet.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from dasd_megatron.config import ConfigError, RunConfig
from dasd_megatron.loss import compute_rollout_stats, dasd_loss, vocab_parallel_token_stats
from dasd_megatron.train.batch import PackedBatch, Rollout, pack, plan_micro_batches
from dasd_megatron.train.engine import forward_backward, optimizer_step


def check_supported(cfg: RunConfig) -> None:
    """Refuse configurations this step does not implement yet, naming the field and the fix."""
    if cfg.parallel.context > 1:
        raise ConfigError("parallel.context>1: the DASD step does not align teacher rows across CP ranks yet. "
                          "Fix: use parallel.context=1 for training")
    if cfg.parallel.pipeline > 1 and cfg.loss.estimator == "full":
        raise ConfigError("loss.estimator='full' with parallel.pipeline>1 is not implemented yet (the teacher's "
                          "full-vocabulary logits would cross the pipeline). Fix: set loss.estimator=sampled or "
                          "parallel.pipeline=1")
    if cfg.optim.lr_schedule != "constant":
        cfg.optim.decay_end(cfg.train.steps)  # a decay that follows train.steps must end after the warm-up


@dataclass
class ScoredPack:
    """Phase-1 results of one micro-batch, on its loss rows (last pipeline stage only; None elsewhere)."""

    student: PackedBatch
    teacher: PackedBatch
    logp: torch.Tensor | None = None
    entropy: torch.Tensor | None = None
    teacher_logp: torch.Tensor | None = None


_SUMMED = ("loss/total", "loss/pg", "loss/distill")


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
        # one pass (teacher forward + student forward-backward per micro-batch) where the loss sits on the only
        # pipeline stage; with PP > 1 the scoring pass brings the teacher log-probs to the last stage first
        self.single_pass = ctx.pp == 1
        self.pad_multiple = cfg.parallel.tensor if cfg.parallel.sequence_parallel else 1

    # -- helpers ---------------------------------------------------------------------------------------------------
    def _rows(self, logits: torch.Tensor, batch: PackedBatch) -> torch.Tensor:
        """[1, T, V/tp] logits -> [rows, V/tp] at the positions that predict response tokens."""
        return logits[0][batch.loss_mask]

    def _stats(self, s_rows, t_rows, batch: PackedBatch):
        v_local = s_rows.shape[-1]
        return vocab_parallel_token_stats(
            s_rows, t_rows, batch.targets[batch.loss_mask], self.ctx.tp_group,
            vocab_start=self.ctx.tp_rank * v_local, vocab_size=self.arch.vocab_size, **self.cfg.loss.kernel_kwargs,
        )

    def _forward(self, model, batch: PackedBatch):
        return model(batch.tokens, batch.position_ids, None, packed_seq_params=batch.packed_seq_params())

    # -- phases ----------------------------------------------------------------------------------------------------
    def pack(self, rollouts: Sequence[Rollout], rollout_ids: Sequence[int]) -> list[ScoredPack]:
        plan = plan_micro_batches(rollouts, self.cfg.train.micro_batch_tokens, self.pad_multiple)
        dev = self.ctx.device
        out = []
        for ids in plan:
            gids = [rollout_ids[i] for i in ids]
            s = pack(rollouts, ids, teacher=False, rollout_ids=gids, pad_multiple=self.pad_multiple).to(dev)
            t = pack(rollouts, ids, teacher=True, rollout_ids=gids, pad_multiple=self.pad_multiple).to(dev)
            out.append(ScoredPack(student=s, teacher=t))
        return out

    @torch.no_grad()
    def score(self, packs: list[ScoredPack]) -> None:
        """Phase 1: student log-prob/entropy and teacher log-prob of every response token (forward only)."""
        for teacher in (False, True):
            def forward_step(item, model, teacher=teacher):
                idx, p = item
                batch = p.teacher if teacher else p.student
                out = self._forward(model, batch)

                def loss_func(logits):
                    st = self._stats(self._rows(logits, batch), None, batch)
                    if teacher:
                        packs[idx].teacher_logp = st.logp
                    else:
                        packs[idx].logp, packs[idx].entropy = st.logp, st.entropy
                    n = torch.tensor(int(batch.loss_mask.sum()), dtype=torch.int, device=logits.device)
                    return logits.new_zeros(()), n, {}

                return out, loss_func

            seq = max(p.teacher.tokens.shape[1] if teacher else p.student.tokens.shape[1] for p in packs)
            net = self.teacher.model if teacher and self.teacher is not None else self.model
            forward_backward(net, list(enumerate(packs)), forward_step, seq_length=seq, forward_only=True)

    def rollout_stats(self, packs: list[ScoredPack], num_rollouts: int):
        """Phase 2: per-rollout statistics over whole rollouts (last stage; None elsewhere)."""
        if not self.ctx.is_last_stage:
            return None
        H = torch.cat([p.entropy for p in packs])
        delta = torch.cat([p.teacher_logp - p.logp for p in packs])
        ri = torch.cat([p.student.rollout_index[p.student.loss_mask] for p in packs])
        return compute_rollout_stats(H, delta, ri, num_rollouts, self.cfg.loss)

    def train(self, packs: list[ScoredPack], advantages: torch.Tensor, rstats, single_pass: bool = False) -> dict:
        """Phase 3: forward-backward with the DASD loss over every micro-batch. Returns summed reports.

        `single_pass`: phases 1-2 were skipped (`rstats` is None): each micro-batch runs the teacher forward (when
        the teacher term is on, for either estimator), takes the old log-probs as its own detached log-probs (one
        optimizer step per batch: the policy has not moved since the rollouts were scored) and computes the
        per-rollout statistics from its own tokens, exact because every rollout lives whole in one micro-batch."""
        cfg = self.cfg.loss
        full = cfg.teacher_term_on if single_pass else (cfg.estimator == "full" and cfg.beta != 0.0)
        metrics: list[tuple[int, dict]] = []

        def forward_step(item, model):
            idx, p = item
            t_logits = None
            if full:
                with torch.no_grad():
                    t_logits = self._forward(model if self.teacher is None else self.teacher.model, p.teacher)
            out = self._forward(model, p.student)

            def loss_func(logits):
                mask = p.student.loss_mask
                t_rows = self._rows(t_logits, p.teacher) if t_logits is not None else None
                st = self._stats(self._rows(logits, p.student), t_rows, p.student)
                if t_rows is None:
                    st = st._replace(teacher_logp=p.teacher_logp if not single_pass else st.logp.detach())
                loss_sum, m = dasd_loss(
                    st, p.student.rollout_index[mask], advantages, cfg, old_logp=None if single_pass else p.logp,
                    rollout_logp=p.student.rollout_logp[mask], rollout_stats=rstats, num_global_tokens=1,
                )
                n = int(mask.sum())
                metrics.append((n, {k: float(v) for k, v in m.items()}))
                nt = torch.tensor(n, dtype=torch.int, device=logits.device)
                return loss_sum, nt, {"loss": torch.stack([loss_sum.detach(), nt.float()])}

            return out, loss_func

        seq = max(p.student.tokens.shape[1] for p in packs)
        reports = forward_backward(self.model, list(enumerate(packs)), forward_step, seq_length=seq)
        return {"reports": reports, "metrics": metrics}

    def run(self, rollouts: Sequence[Rollout], rollout_ids: Sequence[int], advantages: torch.Tensor,
            step: int = 0) -> dict:
        """All phases for this DP rank's rollouts (global ids `rollout_ids` index `advantages`, shape [N]);
        `step` (0-based) sets the learning rate (`optim.warmup_steps`, `optim.lr_schedule` over `train.steps`)."""
        if not rollouts:
            raise ValueError("DASDStep.run: this data-parallel rank received no rollouts (every sample came back empty, "
                             "or the batch is smaller than the DP size). Fix: raise train.prompts_per_step")
        packs = self.pack(rollouts, rollout_ids)
        if self.single_pass:
            result = self.train(packs, advantages.to(self.ctx.device), None, single_pass=True)
        else:
            self.score(packs)
            rstats = self.rollout_stats(packs, advantages.shape[0])
            result = self.train(packs, advantages.to(self.ctx.device), rstats)
        result.update(optimizer_step(self.optimizer, lr=self.cfg.optim.lr_at(step, self.cfg.train.steps)))
        if self.teacher is not None and result.get("update_successful", True):
            self.teacher.update(self.model)
        result.update(self._summarise(result.pop("reports"), result.pop("metrics")))
        return result

    def _summarise(self, reports, metrics) -> dict:
        """Global token-mean loss (all-reduced over DP) and token-weighted metric means (this rank)."""
        out: dict = {}
        if reports:
            tot = torch.stack([r["loss"] for r in reports]).sum(0)
            if self.ctx.dp > 1:
                torch.distributed.all_reduce(tot, group=self.ctx.dp_group)
            out["loss/dasd"] = (tot[0] / tot[1].clamp(min=1)).item()
            out["loss/num_tokens"] = int(tot[1].item())
        n_all = sum(n for n, _ in metrics)
        if n_all:
            keys = metrics[0][1].keys()
            for k in keys:
                if k in out:  # loss/dasd and loss/num_tokens come from the schedule's reports (global over DP)
                    continue
                if k in _SUMMED:  # per-micro-batch sums (the loss is called with num_global_tokens=1)
                    out[k] = sum(m[k] for _, m in metrics) / n_all
                else:  # per-micro-batch means: token-weighted
                    out[k] = sum(n * m[k] for n, m in metrics) / n_all
        return out
