"""One DASD optimisation step on a batch of rollouts, through megatron's schedules.

`DASDStep.run(rollouts, rollout_ids, advantages, step=...)` does, for this data-parallel rank's rollouts:

1. split them, in order, into `train.updates_per_batch` PPO mini-batches, and `build_micro_batches` for each:
   `MicroBatch`es holding the same rollouts packed twice, as the student sees them (`prompt + response`) and as the
   teacher sees them (`teacher_prompt + response`); under context parallelism each pack is split zig-zag per
   document and this CP rank keeps its rows (train/batch.py).
2. with more than one update per batch: `score` (forward only) gives the `TokenScores` of every micro-batch with the
   weights before the first update (the student log-prob, the PPO ratio's old log-prob, and entropy, and the
   teacher log-prob of every response token), and `rollout_stats` turns them into the per-rollout router
   statistics, once per batch.
3. per mini-batch, forward-backward with the DASD loss over its micro-batches, then one optimizer step (learning
   rate of step `step`) and the frozen / EMA teacher's update (`train/teacher.py`; `train.teacher=current` uses the
   policy itself):

   - `train_single_pass` (one update per batch, the usual case): the teacher forward (no grad) runs inside each
     micro-batch, right before the student's forward-backward. Old log-probs are the student's own detached
     log-probs (exact: the policy has not moved since the rollouts were sampled, ratio 1) and the per-rollout
     statistics come from the micro-batch's own tokens (exact: every rollout lives whole in one micro-batch, spread
     over the CP group at most, which `compute_rollout_stats` gathers). This is METHOD.md's cost, one teacher
     forward on top of GRPO's work.
   - `train_after_scoring` (after `score`): old log-probs, router statistics and (`sampled` estimator) the teacher
     log-probs come from the scoring pass, fixed for the batch as verl fixes its old and reference log-probs, so from
     the second update on the ratio moves and the clip / clip-higher act. The `full` estimator needs the teacher's
     whole distribution, which cannot be kept for a batch: its teacher forward runs inside each micro-batch with the
     teacher weights of that moment (with `train.teacher=current`, the updated policy from the second update on).
   TIS always uses the rollout engine's log-probs.

The teacher forward under pipeline parallelism (`_paired_forward`). A teacher forward is itself spread over the
pipeline stages, so it travels with the student's micro-batch through megatron's own schedule: on every stage the
forward step runs the teacher's layers (no grad) on the teacher part of its input and the student's layers on the
student part, and hands the next stage both hidden states concatenated along the sequence. On the last stage the
student's logits go to megatron as the micro-batch's output and the teacher's logits to the loss; in 1F1B the last
stage runs each micro-batch's backward right after its forward, so at most one micro-batch of teacher logits is
alive there, as at PP = 1. The backward sends zeros for the teacher part (its input is detached).

Context parallelism. The teacher row scoring a response token usually lives on another CP rank than the student's
row: `align_teacher_rows` (loss/cp_align.py) moves the teacher's logits rows (`full`) or log-probs (`sampled`,
scoring pass) onto the student's layout with one all-to-all. Router statistics are computed over the CP group.

Normalisation ('sum' reduction): megatron's per-token-loss convention (train/engine.py). Each micro-batch's loss
function returns the *sum* of its token losses (`dasd_loss_sum`) and its token count; megatron sums the counts
over micro-batches and DP x CP ranks and divides the gradients by the total, so each update optimises the token
mean over its global mini-batch. `summarise` divides the reported sums by the same count and reduces the other
metrics over the CP group.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Optional, Sequence

import torch
import torch.distributed as dist

from dasd_megatron.config import ConfigError, RunConfig
from dasd_megatron.loss import (DASDLossConfig, RolloutStats, TokenStats, compute_rollout_stats, dasd_loss,
                                vocab_parallel_token_stats)
from dasd_megatron.loss.cp_align import ResponseSpans, align_teacher_rows
from dasd_megatron.parallel_layout import ZigZagLayout
from dasd_megatron.train.batch import PackedBatch, Rollout, pack, plan_micro_batches, response_spans
from dasd_megatron.train.checkpoint import inner_module
from dasd_megatron.train.engine import forward_backward, optimizer_step


def check_supported(cfg: RunConfig, world_size: int) -> None:
    """Refuse the configurations this step cannot train, naming the field and the fix. Part of the one preflight
    (`dasd_megatron.preflight`) that `dasd train`, `dasd validate` and `dasd submit` run before any process starts,
    and run again by the trainer."""
    dp = cfg.parallel.data_parallel_size(world_size)
    t = cfg.train
    per_rank = (t.prompts_per_step * t.samples_per_prompt) // dp
    if t.updates_per_batch > per_rank:
        raise ConfigError(
            f"train.updates_per_batch={t.updates_per_batch}: each of the {dp} data-parallel rank(s) gets "
            f"{per_rank} rollouts per step (train.prompts_per_step * train.samples_per_prompt / DP), too few for "
            f"{t.updates_per_batch} mini-batches. Fix: set train.updates_per_batch <= {max(per_rank, 1)} or raise "
            "train.prompts_per_step")
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
                  old_logp: Optional[torch.Tensor], rollout_stats: Optional[RolloutStats], stats_group=None):
    """`(sum over the micro-batch's response tokens of loss_t, metrics)`: `dasd_loss` on the loss rows of `batch`
    with the rollout engine's log-probs, in 'sum' reduction (`SUM_REDUCTION`).

    `old_logp` None: the student's own detached log-probs (on-policy); `rollout_stats` None: computed from this
    micro-batch's tokens, gathered over `stats_group` (the CP group; exact when the micro-batch holds its rollouts
    whole)."""
    rows = batch.loss_row_index()
    return dasd_loss(stats, batch.rollout_index.index_select(0, rows), advantages, cfg, old_logp=old_logp,
                     rollout_logp=batch.rollout_logp.index_select(0, rows), rollout_stats=rollout_stats,
                     num_global_tokens=SUM_REDUCTION, stats_group=stats_group)


# -- what the step passes between its phases -------------------------------------------------------------------------


@dataclass(frozen=True)
class MicroBatch:
    """The same rollouts, in the same order, packed as the student sees them and as the teacher sees them (this CP
    rank's rows of each). Without context parallelism their loss rows line up one to one (train/batch.py); with it,
    `spans` and the two whole-pack layouts say where each response's rows are, for `align_teacher_rows`."""

    student: PackedBatch
    teacher: PackedBatch
    spans: Optional[ResponseSpans] = None
    student_layout: Optional[ZigZagLayout] = None
    teacher_layout: Optional[ZigZagLayout] = None


@dataclass(frozen=True)
class TokenScores:
    """The scoring pass's values for one micro-batch, on its (student) loss rows (`[rows]` each, at the rollout
    temperature, with the weights before this batch's first update)."""

    logp: torch.Tensor
    """The student's log-prob of each response token: the old log-probs of the PPO ratio."""
    entropy: torch.Tensor
    """The student's entropy at each response token."""
    teacher_logp: torch.Tensor
    """The teacher's log-prob of each response token (the student's own when the teacher term is off)."""


@dataclass
class MicroBatchLosses:
    """What a forward-backward pass reports, per micro-batch (last pipeline stage; empty elsewhere)."""

    reports: list
    """megatron's per-micro-batch reports, each `{"loss": [loss sum, token count]}`."""
    metrics: list[tuple[int, dict[str, torch.Tensor]]]
    """`(token count, dasd_loss metrics)` per micro-batch: 0-dim device tensors, read back once by `summarise`."""


PER_UPDATE_METRICS = ("loss/dasd", "loss/clip_frac", "loss/ratio_mean", "loss/ratio_max")
"""Logged per PPO update as `ppo/update<j>/<last part of the name>` (`loss/dasd` as `ppo/update<j>/loss`), with
`ppo/update<j>/grad_norm`, when a batch takes more than one update."""


class DASDStep:
    def __init__(self, model, optimizer, cfg: RunConfig, arch, ctx, teacher=None):
        """`teacher`: a `TeacherWeights` (train.teacher=frozen/ema) whose model runs the teacher forwards, an
        `AdapterTeacher` (LoRA: base/ema) in whose context the policy runs them; None: the policy itself
        (train.teacher=current)."""
        check_supported(cfg, ctx.world_size)
        if (teacher is None) != (cfg.train.teacher == "current"):
            raise ValueError(f"DASDStep: train.teacher={cfg.train.teacher!r} but teacher weights were "
                             f"{'not ' if teacher is None else ''}given")
        self.model, self.optimizer, self.cfg, self.arch, self.ctx = model, optimizer, cfg, arch, ctx
        self.teacher = teacher
        self.score_first: Optional[bool] = None
        """None: `run` scores first (`score`, then `train_after_scoring`) when the batch takes more than one update,
        else trains in a single pass (`train_single_pass`). True: score first even for one update (to compare the
        two paths)."""
        self.pad_multiple = cfg.parallel.tensor if cfg.parallel.sequence_parallel else 1
        self.cp_group = ctx.cp_group if ctx.cp > 1 else None

    # -- the step ----------------------------------------------------------------------------------------------------
    def num_updates(self, num_rollouts: int) -> int:
        """Optimizer steps for a batch of `num_rollouts` (all DP ranks): `train.updates_per_batch`, fewer when some
        DP rank would hold fewer rollouts than that (empty samples dropped); the same on every rank."""
        return max(1, min(self.cfg.train.updates_per_batch, num_rollouts // self.ctx.dp))

    def run(self, rollouts: Sequence[Rollout], rollout_ids: Sequence[int], advantages: torch.Tensor,
            step: int = 0) -> dict:
        """All phases for this DP rank's rollouts (global ids `rollout_ids` index `advantages`, shape [N]);
        `step` (0-based) sets the learning rate (`optim.warmup_steps`, `optim.lr_schedule` over `train.steps`)."""
        if not rollouts:
            raise ValueError("DASDStep.run: this data-parallel rank received no rollouts (every sample came back "
                             "empty, or the batch is smaller than the DP size). Fix: raise train.prompts_per_step")
        num_rollouts = advantages.shape[0]
        updates = self.num_updates(num_rollouts)
        score_first = updates > 1 if self.score_first is None else self.score_first
        if updates > 1 and not score_first:
            raise ValueError("DASDStep.run: more than one update per batch needs the scoring pass (old log-probs "
                             "from the weights before the first update); leave score_first unset")
        n = len(rollouts)
        cuts = [round(j * n / updates) for j in range(updates + 1)]
        minis = [self.build_micro_batches(rollouts[a:b], rollout_ids[a:b]) for a, b in zip(cuts[:-1], cuts[1:])]
        advantages = advantages.to(self.ctx.device)
        scores: Optional[list[TokenScores]] = None
        rstats = None
        if score_first:
            flat = [mb for mini in minis for mb in mini]
            scores = self.score(flat)
            rstats = self.rollout_stats(flat, scores, num_rollouts)
        everything = MicroBatchLosses(reports=[], metrics=[])
        updates_out: list[dict] = []
        first = 0
        for mini in minis:
            if score_first:
                mine = None if scores is None else scores[first:first + len(mini)]
                first += len(mini)
                losses = self.train_after_scoring(mini, mine, advantages, rstats)
            else:
                losses = self.train_single_pass(mini, advantages)
            res = optimizer_step(self.optimizer, lr=self.cfg.optim.lr_at(step, self.cfg.train.steps))
            if self.teacher is not None and res.get("update_successful", True):
                self.teacher.update(self.model)
            if updates > 1:
                res.update(self.summarise(losses))
            updates_out.append(res)
            everything.reports += losses.reports
            everything.metrics += losses.metrics
        result = dict(updates_out[-1])
        if updates > 1:
            for j, res in enumerate(updates_out):
                res_metrics = {("loss" if k == "loss/dasd" else k.split("/")[-1]): res[k]
                               for k in PER_UPDATE_METRICS if k in res}
                res_metrics["grad_norm"] = res["grad_norm"]
                result.update({f"ppo/update{j}/{k}": v for k, v in res_metrics.items()})
            result["grad_norm"] = sum(r["grad_norm"] for r in updates_out) / updates
            result["update_successful"] = all(r.get("update_successful", True) for r in updates_out)
        result["optim/updates"] = updates
        result.update(self.summarise(everything))
        return result

    def build_micro_batches(self, rollouts: Sequence[Rollout], rollout_ids: Sequence[int]) -> list[MicroBatch]:
        """Pack `rollouts` (global ids `rollout_ids`) into micro-batches of at most `train.micro_batch_tokens`
        (`plan_micro_batches`), on this rank's device; with context parallelism, this CP rank's rows of each pack."""
        cp = self.ctx.cp
        plan = plan_micro_batches(rollouts, self.cfg.train.micro_batch_tokens, self.pad_multiple, cp)
        dev = self.ctx.device
        out = []
        for ids in plan:
            gids = [rollout_ids[i] for i in ids]
            s, t = (pack(rollouts, ids, teacher=teacher, rollout_ids=gids, pad_multiple=self.pad_multiple,
                         cp_size=cp) for teacher in (False, True))
            if cp == 1:
                out.append(MicroBatch(student=s.to(dev), teacher=t.to(dev)))
                continue
            r = self.ctx.cp_rank
            out.append(MicroBatch(student=s.cp_shard(cp, r).to(dev), teacher=t.cp_shard(cp, r).to(dev),
                                  spans=response_spans(rollouts, ids, s, t), student_layout=s.cp_layout(cp),
                                  teacher_layout=t.cp_layout(cp)))
        return out

    def train_single_pass(self, micro_batches: list[MicroBatch], advantages: torch.Tensor) -> MicroBatchLosses:
        """Forward-backward with the DASD loss, the teacher forward inside each micro-batch (one update per batch).

        When the teacher term is on (either estimator) the teacher pack runs with the student's (no grad), so only
        one micro-batch of teacher logits is alive at a time. Old log-probs: the student's own, detached; per-rollout
        statistics: from the micro-batch's own tokens (see the module docstring)."""
        return self._forward_backward(micro_batches, advantages, teacher_logits=self.cfg.loss.teacher_term_on,
                                      scores=None, rollout_stats=None)

    @torch.no_grad()
    def score(self, micro_batches: list[MicroBatch]) -> Optional[list[TokenScores]]:
        """One forward-only pass over the student packs, each with its teacher pack (`_paired_forward`, when the
        teacher term is on): the `TokenScores` of every micro-batch. Megatron runs the loss function on the last
        pipeline stage only: the values exist there, and this returns None on the other stages."""
        with_teacher = self.cfg.loss.teacher_term_on
        found: dict[int, TokenScores] = {}

        def forward_step(item, model):
            idx, mb = item
            out, t_logits = self._paired_forward(model, mb, with_teacher=with_teacher)

            def loss_func(logits):
                st = self._token_stats(self._loss_rows(logits, mb.student), None, mb.student)
                t_logp = st.logp
                if t_logits is not None:
                    tst = self._token_stats(self._loss_rows(t_logits, mb.teacher), None, mb.teacher)
                    t_logp = self._align_teacher_values(tst.logp, mb)
                found[idx] = TokenScores(logp=st.logp, entropy=st.entropy, teacher_logp=t_logp)
                n = torch.tensor(mb.student.num_loss_rows, dtype=torch.int, device=logits.device)
                return logits.new_zeros(()), n, {}

            return out, loss_func

        seq = max(mb.student.tokens.shape[1] for mb in micro_batches)
        forward_backward(self.model, list(enumerate(micro_batches)), forward_step, seq_length=seq, forward_only=True)
        if not self.ctx.is_last_stage:
            return None
        return [found[i] for i in range(len(micro_batches))]

    def rollout_stats(self, micro_batches: list[MicroBatch], scores: Optional[list[TokenScores]],
                      num_rollouts: int) -> Optional[RolloutStats]:
        """Per-rollout entropy quantile, spread and gap scale over whole rollouts, from the scoring pass (every
        rollout lives in one micro-batch on one DP rank; its tokens are gathered over the CP group). None where
        `scores` is."""
        if scores is None:
            return None
        H = torch.cat([s.entropy for s in scores])
        delta = torch.cat([s.teacher_logp - s.logp for s in scores])
        ri = torch.cat([mb.student.rollout_index.index_select(0, mb.student.loss_row_index())
                        for mb in micro_batches])
        return compute_rollout_stats(H, delta, ri, num_rollouts, self.cfg.loss, group=self.cp_group)

    def train_after_scoring(self, micro_batches: list[MicroBatch], scores: Optional[list[TokenScores]],
                            advantages: torch.Tensor, rollout_stats: Optional[RolloutStats]) -> MicroBatchLosses:
        """Forward-backward with the DASD loss after `score` and `rollout_stats`.

        Old log-probs and (`sampled` estimator) teacher log-probs come from `scores`. The `full` estimator needs
        the teacher's full-vocabulary logits of the same rows: the teacher pack runs with the student's, under
        no_grad, with the teacher weights of this moment (module docstring)."""
        cfg = self.cfg.loss
        teacher_logits = cfg.estimator == "full" and cfg.teacher_term_on
        return self._forward_backward(micro_batches, advantages, teacher_logits=teacher_logits, scores=scores,
                                      rollout_stats=rollout_stats)

    def summarise(self, losses: MicroBatchLosses) -> dict:
        """`loss/dasd`: the global token-mean loss (sums and token counts all-reduced over DP x CP),
        `loss/num_tokens`; the other metrics over this DP rank's micro-batches and its CP group: `*_max` metrics the
        largest, `SUMMED_LOSS_METRICS` (sums) divided by the token count, the others (per-micro-batch means)
        token-weighted."""
        ctx = self.ctx
        names: list[str] = []
        values: list[torch.Tensor] = []  # float64 on the device; read back once, at the end
        if losses.reports:
            tot = torch.stack([r["loss"] for r in losses.reports]).sum(0).double()
            if ctx.dp * ctx.cp > 1:
                dist.all_reduce(tot, group=ctx.dp_cp_group)
            names += ["loss/dasd", "loss/num_tokens"]
            values += [tot[0] / tot[1].clamp(min=1), tot[1]]
        metrics = losses.metrics
        if metrics:
            dev = ctx.device

            def value(v) -> torch.Tensor:
                return torch.as_tensor(v, dtype=torch.float64).to(dev) if not torch.is_tensor(v) else v.double()

            keys = [k for k in metrics[0][1] if k not in names]  # the same keys on every rank (one loss config)
            maxed = [k for k in keys if k.endswith("_max")]
            summed = [k for k in keys if k not in maxed]
            n_all = float(sum(n for n, _ in metrics))
            if summed:
                weights = torch.tensor([[1.0 if k in SUMMED_LOSS_METRICS else float(n) for k in summed]
                                        for n, _ in metrics], dtype=torch.float64)
                table = torch.stack([torch.stack([value(m[k]) for k in summed]) for _, m in metrics])
                sums = torch.cat([torch.tensor([n_all], dtype=torch.float64).to(dev),
                                  (table * weights.to(dev)).sum(0)])
            else:
                sums = torch.tensor([n_all], dtype=torch.float64).to(dev)
            maxes = (torch.stack([torch.stack([value(m[k]) for k in maxed]) for _, m in metrics]).amax(0)
                     if maxed else None)
            if self.cp_group is not None:
                dist.all_reduce(sums, group=self.cp_group)
                if maxes is not None:
                    dist.all_reduce(maxes, op=dist.ReduceOp.MAX, group=self.cp_group)
            n = sums[0]
            names += ["_n"] + summed + maxed
            values += [n, *(sums[1:] / n.clamp(min=1e-300))] + ([] if maxes is None else list(maxes))
        if not values:
            return {}
        host = torch.stack([v.reshape(()) for v in values]).tolist()  # the one read-back of the step's metrics
        out = dict(zip(names, host))
        if "loss/num_tokens" in out:
            out["loss/num_tokens"] = int(out["loss/num_tokens"])
        if out.pop("_n", 1.0) == 0:
            out = {k: v for k, v in out.items() if k in ("loss/dasd", "loss/num_tokens")}
        return out

    # -- helpers -----------------------------------------------------------------------------------------------------
    def _forward_backward(self, micro_batches: list[MicroBatch], advantages: torch.Tensor, *, teacher_logits: bool,
                          scores: Optional[list[TokenScores]],
                          rollout_stats: Optional[RolloutStats]) -> MicroBatchLosses:
        """megatron's forward-backward over the student packs, each micro-batch's loss `dasd_loss_sum`.

        `teacher_logits`: run the teacher pack (no grad) with the student's, and give the loss the teacher's
        logits rows. `scores` None: old log-probs are the student's own, detached, and without teacher logits the
        teacher log-probs equal them (the teacher term is off); else both come from `scores`."""
        cfg = self.cfg.loss
        metrics: list[tuple[int, dict]] = []

        def forward_step(item, model):
            idx, mb = item
            out, t_logits = self._paired_forward(model, mb, with_teacher=teacher_logits)

            def loss_func(logits):
                scored = scores[idx] if scores is not None else None
                t_rows = self._teacher_rows(t_logits, mb) if t_logits is not None else None
                st = self._token_stats(self._loss_rows(logits, mb.student), t_rows, mb.student)
                if t_rows is None:
                    st = st._replace(teacher_logp=st.logp.detach() if scored is None else scored.teacher_logp)
                loss_sum, m = dasd_loss_sum(st, mb.student, advantages, cfg,
                                            old_logp=None if scored is None else scored.logp,
                                            rollout_stats=rollout_stats, stats_group=self.cp_group)
                n = mb.student.num_loss_rows
                metrics.append((n, {k: v.detach() if torch.is_tensor(v) else v for k, v in m.items()}))
                nt = torch.tensor(n, dtype=torch.int, device=logits.device)
                return loss_sum, nt, {"loss": torch.stack([loss_sum.detach(), nt.float()])}

            return out, loss_func

        seq = max(mb.student.tokens.shape[1] for mb in micro_batches)
        reports = forward_backward(self.model, list(enumerate(micro_batches)), forward_step, seq_length=seq)
        return MicroBatchLosses(reports=reports, metrics=metrics)

    def _paired_forward(self, model, mb: MicroBatch, *, with_teacher: bool):
        """This pipeline stage's forward of the student pack and, `with_teacher`, of the teacher pack (no grad).

        Returns `(output, teacher logits)`: on the last stage the student's logits (megatron's output for the loss
        and the backward) and the teacher's `[1, T_teacher, V/tp]` (None without the teacher); on other stages the
        hidden states for the next stage, the student's and the teacher's concatenated along the sequence, and None.
        On stages after the first, megatron has set the received tensor (that same concatenation) as the policy's
        input; it is split here and each part given to its network (module docstring)."""
        ctx = self.ctx
        policy = inner_module(model)
        if not with_teacher:
            return self._forward(model, mb.student), None
        # a separate teacher network (frozen / EMA copy), or the policy itself: as it is (current), or inside the
        # LoRA teacher's context (adapter disabled: base; EMA adapter swapped in: ema)
        separate = self.teacher is not None and self.teacher.model is not None
        tnet = self.teacher.model if separate else policy
        within = (self.teacher.applied(policy) if self.teacher is not None and not separate
                  else contextlib.nullcontext())
        received = None if ctx.is_first_stage else policy.decoder.input_tensor
        if received is not None:
            ns, nt = self._stage_rows(mb.student), self._stage_rows(mb.teacher)
            if received.shape[0] != ns + nt:
                raise RuntimeError(f"pipeline stage received {received.shape[0]} rows, expected the student's {ns} + "
                                   f"the teacher's {nt}")
            tnet.set_input_tensor(received[ns:].detach())
        with torch.no_grad(), within:
            t_out = self._forward(tnet, mb.teacher)
        if received is not None:
            policy.set_input_tensor(received[:ns])
        out = self._forward(model, mb.student)
        if ctx.is_last_stage:
            return out, t_out
        return torch.cat([out, t_out], dim=0), None

    def _stage_rows(self, batch: PackedBatch) -> int:
        """Rows of this micro-batch's hidden states between pipeline stages on this rank (its CP rows, split over
        TP under sequence parallelism)."""
        return batch.tokens.shape[1] // self.pad_multiple

    def _teacher_rows(self, t_logits: torch.Tensor, mb: MicroBatch) -> torch.Tensor:
        """[1, T_teacher, V/tp] teacher logits -> [rows, V/tp] lined up with the student's loss rows (moved across
        the CP group with `align_teacher_rows` under context parallelism)."""
        if mb.spans is None:
            return self._loss_rows(t_logits, mb.teacher)
        aligned, _ = align_teacher_rows(t_logits[0], student_layout=mb.student_layout,
                                        teacher_layout=mb.teacher_layout, spans=mb.spans, cp_group=self.cp_group)
        return aligned.index_select(0, mb.student.loss_row_index())

    def _align_teacher_values(self, values: torch.Tensor, mb: MicroBatch) -> torch.Tensor:
        """Per-token teacher values on the teacher's loss rows -> the same values on the student's loss rows."""
        if mb.spans is None:
            return values
        full = values.new_zeros(mb.teacher.tokens.shape[1]).index_copy(0, mb.teacher.loss_row_index(), values)
        aligned, _ = align_teacher_rows(full, student_layout=mb.student_layout, teacher_layout=mb.teacher_layout,
                                        spans=mb.spans, cp_group=self.cp_group)
        return aligned.index_select(0, mb.student.loss_row_index())

    def _loss_rows(self, logits: torch.Tensor, batch: PackedBatch) -> torch.Tensor:
        """[1, T, V/tp] logits -> [rows, V/tp] at the positions that predict response tokens."""
        return logits[0].index_select(0, batch.loss_row_index())

    def _token_stats(self, s_rows, t_rows, batch: PackedBatch) -> TokenStats:
        """Vocab-parallel per-token statistics of the student rows (and teacher rows, when given)."""
        v_local = s_rows.shape[-1]
        return vocab_parallel_token_stats(
            s_rows, t_rows, batch.targets.index_select(0, batch.loss_row_index()), self.ctx.tp_group,
            vocab_start=self.ctx.tp_rank * v_local, vocab_size=self.arch.vocab_size, **self.cfg.loss.kernel_kwargs,
        )

    def _forward(self, model, batch: PackedBatch):
        return model(batch.tokens, batch.position_ids, None, packed_seq_params=batch.packed_seq_params())
