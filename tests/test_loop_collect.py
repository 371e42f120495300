"""`Trainer.collect`: one round without dynamic sampling; with it, groups whose G rewards are all equal are dropped
and fresh prompts drawn until the batch is full, or the dropped groups fill what the last round left open.

The trainer's rollout and reward phases are replaced by a scripted sequence of groups (no server, no model):
`collect` only decides which groups make the batch."""

from __future__ import annotations

import types

from dasd_megatron.config import RunConfig, apply_overrides
from dasd_megatron.reward import RewardResult
from dasd_megatron.train.loop import Trainer


def _trainer(overrides, rounds_of_rewards):
    """A Trainer whose generate/reward return, round after round, groups with the given rewards."""
    t = object.__new__(Trainer)
    t.cfg = apply_overrides(RunConfig(), ["train.prompts_per_step=3", "train.samples_per_prompt=2", *overrides])
    t.step = 0
    script = iter(rounds_of_rewards)
    t.calls = []

    def generate(self, examples=None, round_=0):
        rewards = next(script)
        self.calls.append(round_)
        examples = [f"r{round_}p{g}" for g in range(len(rewards))]
        groups = [[types.SimpleNamespace(output_ids=[1]) for _ in r] for r in rewards]
        self._rewards = rewards
        return examples, [[7]] * len(rewards), groups

    def reward(self, examples, groups):
        flat = [x for r in self._rewards for x in r]
        res = [RewardResult(score=float(x), status="correct" if x else "incorrect", extracted=None) for x in flat]
        return [f"text{i}" for i in range(len(flat))], res

    t.generate = types.MethodType(generate, t)
    t.reward = types.MethodType(reward, t)
    return t


def test_without_dynamic_sampling_one_round_keeps_everything():
    t = _trainer([], [[(0, 0), (1, 0), (1, 1)]])
    (examples, _, groups, texts, results), stats = t.collect()
    assert examples == ["r0p0", "r0p1", "r0p2"] and t.calls == [0]
    assert [[r.score for r in g] for g in results] == [[0, 0], [1, 0], [1, 1]] and len(texts[0]) == 2
    assert "rollout/ds_rounds" not in stats and stats["timing/reward_s"] >= 0


def test_dynamic_sampling_keeps_varied_groups_across_rounds():
    t = _trainer(["train.dynamic_sampling=true"], [[(0, 0), (1, 0), (1, 1)], [(0, 1), (0, 0), (1, 0)]])
    (examples, *_), stats = t.collect()
    assert examples == ["r0p1", "r1p0", "r1p2"] and t.calls == [0, 1]
    assert stats["rollout/ds_rounds"] == 2 and stats["rollout/ds_dropped_groups"] == 3
    assert stats["rollout/ds_filled_groups"] == 0 and stats["timing/reward_s"] >= 0


def test_dynamic_sampling_fills_with_dropped_groups_after_the_last_round():
    t = _trainer(["train.dynamic_sampling=true", "train.dynamic_sampling_max_rounds=2"],
                 [[(0, 0), (1, 0), (1, 1)], [(0, 0), (0, 0), (1, 1)]])
    (examples, _, _, _, results), stats = t.collect()
    assert examples == ["r0p1", "r0p0", "r0p2"]  # the varied group, then the dropped ones oldest first
    assert (stats["rollout/ds_rounds"], stats["rollout/ds_dropped_groups"], stats["rollout/ds_filled_groups"]) == (2, 5, 2)
    assert stats["timing/reward_s"] >= 0
