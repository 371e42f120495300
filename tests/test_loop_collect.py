"""Dynamic sampling (`collect_groups`, `select_groups`): one round without it; with it, groups whose G rewards are
all equal are dropped and fresh prompts drawn until the batch is full, or the dropped groups fill what the last round
left open.

The rounds are scripted lists of scored groups (no server, no model): these functions only decide which groups make
the batch."""

from __future__ import annotations

import types

from dasd_megatron.config import RunConfig, apply_overrides
from dasd_megatron.reward import RewardResult
from dasd_megatron.train.loop import ScoredGroup, collect_groups, select_groups


def _group(name: str, rewards) -> ScoredGroup:
    """A group named `name` (its example) with one sample per reward."""
    results = [RewardResult(score=float(x), status="correct" if x else "incorrect", extracted=None) for x in rewards]
    return ScoredGroup(example=name, prompt_ids=[7], samples=[types.SimpleNamespace(output_ids=[1]) for _ in rewards],
                       texts=[f"{name}t{i}" for i in range(len(rewards))], results=results)


def _round(round_: int, rewards_per_group) -> list[ScoredGroup]:
    return [_group(f"r{round_}p{g}", rewards) for g, rewards in enumerate(rewards_per_group)]


def _collect(overrides, rounds_of_rewards):
    """`collect_groups` over scripted rounds (round r's scoring "takes" 0.5 + r seconds); returns the selection and
    the rounds that were asked for."""
    train = apply_overrides(RunConfig(), ["train.prompts_per_step=3", "train.samples_per_prompt=2",
                                          *overrides]).train
    calls = []

    def score_round(round_):
        calls.append(round_)
        return _round(round_, rounds_of_rewards[round_]), 0.5 + round_

    return collect_groups(score_round, train), calls


def test_without_dynamic_sampling_one_round_keeps_everything():
    sel, calls = _collect([], [[(0, 0), (1, 0), (1, 1)]])
    assert [g.example for g in sel.batch] == ["r0p0", "r0p1", "r0p2"] and calls == [0]
    assert [[r.score for r in g.results] for g in sel.batch] == [[0, 0], [1, 0], [1, 1]]
    assert len(sel.batch[0].texts) == 2
    assert (sel.rounds, sel.dropped, sel.filled) == (1, 0, 0)
    assert sel.metrics() == {"timing/reward_s": 0.5}  # no rollout/ds_* metrics without dynamic sampling


def test_dynamic_sampling_keeps_varied_groups_across_rounds():
    sel, calls = _collect(["train.dynamic_sampling=true"], [[(0, 0), (1, 0), (1, 1)], [(0, 1), (0, 0), (1, 0)]])
    assert [g.example for g in sel.batch] == ["r0p1", "r1p0", "r1p2"] and calls == [0, 1]
    assert sel.metrics() == {"timing/reward_s": 0.5 + 1.5, "rollout/ds_rounds": 2, "rollout/ds_dropped_groups": 3,
                             "rollout/ds_filled_groups": 0}


def test_dynamic_sampling_fills_with_dropped_groups_after_the_last_round():
    sel, calls = _collect(["train.dynamic_sampling=true", "train.dynamic_sampling_max_rounds=2"],
                          [[(0, 0), (1, 0), (1, 1)], [(0, 0), (0, 0), (1, 1)]])
    assert [g.example for g in sel.batch] == ["r0p1", "r0p0", "r0p2"]  # the varied group, then dropped ones oldest first
    assert calls == [0, 1]
    m = sel.metrics()
    assert (m["rollout/ds_rounds"], m["rollout/ds_dropped_groups"], m["rollout/ds_filled_groups"]) == (2, 5, 2)
    assert m["timing/reward_s"] == 2.0


def test_dynamic_sampling_stops_after_the_first_round_that_fills_the_batch():
    sel, calls = _collect(["train.dynamic_sampling=true"],
                          [[(0, 1), (1, 0), (0, 1)], [(0, 1), (0, 1), (0, 1)]])
    assert calls == [0] and [g.example for g in sel.batch] == ["r0p0", "r0p1", "r0p2"]
    assert sel.metrics() == {"timing/reward_s": 0.5, "rollout/ds_rounds": 1, "rollout/ds_dropped_groups": 0,
                             "rollout/ds_filled_groups": 0}


def test_select_groups_trims_surplus_varied_groups_to_the_batch_size_oldest_first():
    scored = _round(0, [(0, 1), (0, 0), (1, 0)]) + _round(1, [(1, 0), (1, 1), (0, 1)])
    sel = select_groups(scored, 3, dynamic_sampling=True)
    assert [g.example for g in sel.batch] == ["r0p0", "r0p2", "r1p0"]
    assert sel.enough and (sel.dropped, sel.filled) == (2, 0)


def test_select_groups_without_dynamic_sampling_keeps_equal_reward_groups_in_order():
    sel = select_groups(_round(0, [(1, 1), (0, 0), (0, 1)]), 3, dynamic_sampling=False)
    assert [g.example for g in sel.batch] == ["r0p0", "r0p1", "r0p2"]
    assert sel.enough and (sel.dropped, sel.filled) == (0, 0)


def test_select_groups_with_too_few_groups_returns_what_there_is():
    sel = select_groups(_round(0, [(0, 0), (1, 0)]), 3, dynamic_sampling=True)
    assert [g.example for g in sel.batch] == ["r0p1", "r0p0"]
    assert not sel.enough and (sel.dropped, sel.filled) == (1, 1)


def test_rewards_vary_compares_scores():
    assert _group("a", (0, 1)).rewards_vary and not _group("b", (1, 1)).rewards_vary
    assert not _group("c", (0,)).rewards_vary
