"""DASD loss: vocab-parallel kernels over TP-sharded logits and the direction-routed objective.

One training step uses it in this order (see each module's docstring for the math and the collectives):

1. scoring (no grad), whole local batch::

       st = vocab_parallel_token_stats(student_logits, teacher_logits, targets, tp_group,
                                       vocab_start=tp_rank * V_local, vocab_size=V, **cfg.kernel_kwargs)
       old_logp = st.logp; delta = st.teacher_logp - st.logp
       rs = compute_rollout_stats(st.entropy, delta, rollout_index, N, cfg, group=cp_group)   # whole rollouts
       adv = grpo_advantages(rewards, group_size=G, std_normalize=cfg.advantage_std_normalize, eps=cfg.advantage_eps)
       n_tok = global_token_count(rollout_index, group=dp_cp_group)

   With CP > 1, first move the teacher's response rows onto the student layout: `align_teacher_rows` (cp_align.py).

2. training, each micro-batch::

       st = vocab_parallel_token_stats(...)                  # same arguments, with grad to the student logits
       loss, metrics = dasd_loss(st, rollout_index_mb, adv, cfg, old_logp=old_logp_mb, rollout_logp=rollout_logp_mb,
                                 rollout_stats=rs, num_global_tokens=n_tok)
       loss.backward()

Layout of packed variable-length responses: per-token `[T]` tensors plus `rollout_index` `[T]` int64 (global rollout
id in [0, N), -1 for prompt/padding/non-response tokens); per-rollout arrays `[N]` are indexed by it.
"""

from .advantage import grpo_advantages
from .config import DASDLossConfig
from .cp_align import ResponseSpans, ZigZagLayout, align_teacher_rows
from .metrics import dasd_metrics, decile_means
from .objective import dasd_loss, global_token_count
from .ppo import ppo_clip_token_loss, truncated_is_weight
from .rollout_stats import RolloutStats, compute_rollout_stats, segment_quantile
from .router import normalized_gap, reliability_gate, router_omega
from .vocab_parallel import NonFiniteLogitsError, TokenStats, default_chunk_size, vocab_parallel_token_stats

__all__ = [
    "DASDLossConfig",
    "NonFiniteLogitsError",
    "ResponseSpans",
    "RolloutStats",
    "TokenStats",
    "ZigZagLayout",
    "align_teacher_rows",
    "compute_rollout_stats",
    "dasd_loss",
    "dasd_metrics",
    "decile_means",
    "default_chunk_size",
    "global_token_count",
    "grpo_advantages",
    "normalized_gap",
    "ppo_clip_token_loss",
    "reliability_gate",
    "router_omega",
    "segment_quantile",
    "truncated_is_weight",
    "vocab_parallel_token_stats",
]
