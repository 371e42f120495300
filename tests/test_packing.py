"""`next_fit`: greedy in-order packing under a budget, and its users (micro-batch plans, export buckets)."""

from __future__ import annotations

import pytest

from dasd_megatron.packing import next_fit


def test_next_fit_hand_computed():
    # budget 10: 4+5 fit, +3 would be 12; 3+7 fit exactly; 11 is over budget: a group of its own; then 2+8
    assert next_fit([4, 5, 3, 7, 11, 2, 8], 10) == [[0, 1], [2, 3], [4], [5, 6]]
    assert next_fit([], 10) == []
    assert next_fit([0, 0, 10, 0], 10) == [[0, 1, 2, 3]]  # zero-sized items join whatever group is open


def test_micro_batch_plan_counts_the_longer_padded_sequence_and_refuses_oversized_rollouts():
    from dasd_megatron.train.batch import Rollout, plan_micro_batches

    def rollout(prompt, teacher, response):
        return Rollout([1] * prompt, [1] * teacher, [2] * response, [-1.0] * response, reward=0.0, group=0)

    # lengths max(student, teacher): 7 (teacher 3+4), 6, 9; padded to 4: 8, 8, 12
    rollouts = [rollout(2, 3, 4), rollout(4, 1, 2), rollout(5, 5, 4)]
    assert plan_micro_batches(rollouts, 16) == [[0, 1], [2]]
    assert plan_micro_batches(rollouts, 16, pad_multiple=4) == [[0, 1], [2]]
    assert plan_micro_batches(rollouts, 15) == [[0, 1], [2]]
    assert plan_micro_batches(rollouts, 15, pad_multiple=4) == [[0], [1], [2]]
    with pytest.raises(ValueError, match="rollout 2 needs 12 tokens, more than train.micro_batch_tokens=11"):
        plan_micro_batches(rollouts, 11, pad_multiple=4)
