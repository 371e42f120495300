"""`RewardScorer`: batched scoring in worker processes, hard deadlines, and replacement of hung or dead workers."""

from __future__ import annotations

import os
import time

import pytest

from dasd_megatron.reward import RewardConfig, RewardScorer, summarize

# A genuinely slow input, not a mock: with math-verify's own timeout switched off (as in our workers), verifying
# 9^(9^(9^9)) against 2 did not finish within 20 s here (sympy keeps evaluating the tower; memory stays ~70 MB).
HANGS = r"The answer is $\boxed{9^{9^{9^{9}}}}$."


def _dies_on_boom(pred: str, golds: tuple) -> bool:
    """Injected worker-side check: kills its own process for the answer 'boom', compares strings otherwise."""
    if pred == "boom":
        os._exit(3)
    return pred in golds


def _bad_status(pred: str, golds: tuple) -> str:
    return "maybe"


def _allocates(pred: str, golds: tuple) -> bool:
    """Injected check that needs `pred` MB of memory."""
    block = bytearray(int(pred) * 1024 * 1024)
    return len(block) > 0


def _slow_equal(pred: str, golds: tuple) -> bool:
    if pred == "slow":
        time.sleep(0.5)
    return pred in golds


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.fixture(scope="module")
def scorer():
    with RewardScorer(RewardConfig(num_workers=2, timeout_s=10.0)) as s:
        yield s


def test_correct_incorrect_unparseable(scorer):
    responses = [
        r"Half of it: $\boxed{\frac{1}{2}}$.",
        r"So the result is \boxed{2}.",
        "I am not sure.",
        r"Nested: \boxed{\frac{\sqrt{4}}{\left(1+1\right)}}",
        "Reasoning...\nAnswer: 34",
        r"\boxed{3} then \boxed{\frac{1}{",
    ]
    golds = ["0.5", "3", "1", "1", "34", "3"]
    res = scorer.score(responses, golds)
    assert [r.status for r in res] == ["correct", "incorrect", "unparseable", "correct", "correct", "unparseable"]
    assert [r.score for r in res] == [1.0, 0.0, 0.0, 1.0, 1.0, 0.0]
    assert res[0].extracted == r"\frac{1}{2}" and res[2].extracted is None and res[4].extracted == "34"
    assert summarize(res)["reward/correct_frac"] == pytest.approx(0.5)


def test_olympiadbench_list_golds(scorer):
    golds = [["$(2,3)$", "$(3,2)$"], ["$(1,8,19), (2,7,13), (4,5,7)$"], ["$69$,$84$"]]
    res = scorer.score([r"\boxed{(3,2)}", r"\boxed{(4,5,7),(1,8,19),(2,7,13)}", r"\boxed{69, 84}"], golds)
    assert [r.status for r in res] == ["correct", "correct", "correct"]
    assert scorer.score([r"\boxed{(2,2)}"], [golds[0]])[0].status == "incorrect"


def test_custom_scores_and_counters():
    cfg = RewardConfig(num_workers=1, correct_score=2.0, incorrect_score=-1.0, unparseable_score=-2.0,
                       answer_line_fallback=False)
    with RewardScorer(cfg) as s:
        res = s.score([r"\boxed{7}", r"\boxed{8}", "Answer: 7"], ["7", "7", "7"])
        assert [r.score for r in res] == [2.0, -1.0, -2.0]
        m = s.metrics()
    assert (m["reward/checks"], m["reward/correct"], m["reward/incorrect"], m["reward/unparseable"]) == (3, 1, 1, 1)


def test_last_number_fallback_scores_prose_answers():
    with RewardScorer(RewardConfig(num_workers=1, last_number_fallback=True)) as s:
        res = s.score(["7 + 5 = 12.", "7 + 5 = 13", "It is twelve", r"\boxed{11}, I mean 12"], ["12"] * 4)
    assert [r.status for r in res] == ["correct", "incorrect", "unparseable", "incorrect"]
    assert [r.extracted for r in res] == ["12", "13", None, "11"]


def test_mismatched_lengths_and_closed_scorer():
    s = RewardScorer(RewardConfig(num_workers=1))
    with pytest.raises(ValueError, match="2 responses but 1 golds"):
        s.score(["a", "b"], ["1"])
    with pytest.raises(ValueError, match=r"golds\[0\].*empty"):
        s.score([r"\boxed{1}"], [""])
    pids = s.worker_pids()
    s.close()
    s.close()  # idempotent
    assert not any(_alive(p) for p in pids)
    with pytest.raises(RuntimeError, match="closed"):
        s.score([r"\boxed{1}"], ["1"])


def test_timeout_kills_and_replaces_the_hung_worker():
    timeout = 1.0
    with RewardScorer(RewardConfig(num_workers=2, timeout_s=timeout)) as s:
        s.score([r"\boxed{1}"] * 2, ["1"] * 2)  # workers up
        before = s.worker_pids()
        t0 = time.monotonic()
        res = s.score([HANGS, r"\boxed{2}", r"\boxed{5}", r"\boxed{x^2}"], ["2", "2", "4", "x^2"])
        elapsed = time.monotonic() - t0
        assert [r.status for r in res] == ["timeout", "correct", "incorrect", "correct"]
        assert res[0].score == 0.0 and res[0].extracted == "9^{9^{9^{9}}}"
        assert timeout <= elapsed < timeout + 3.0, elapsed  # cut off at the deadline, not after the check
        after = s.worker_pids()
        replaced = set(before) - set(after)
        assert len(replaced) == 1 and len(set(after) - set(before)) == 1
        assert not _alive(replaced.pop())
        # the pool keeps working for the next batch, including the fresh worker
        res2 = s.score([rf"\boxed{{{i}}}" for i in range(8)], [str(i) for i in range(8)])
        assert all(r.status == "correct" for r in res2)
        m = s.metrics()
        assert m["reward/timeout"] == 1 and m["reward/workers_replaced"] == 1


def test_dead_worker_is_an_error_and_is_replaced():
    with RewardScorer(RewardConfig(num_workers=1, timeout_s=10.0), verify_fn=_dies_on_boom) as s:
        pid = s.worker_pids()[0]
        res = s.score([r"\boxed{boom}", r"\boxed{ok}", r"\boxed{no}"], ["x", "ok", "yes"])
        assert [r.status for r in res] == ["error", "correct", "incorrect"]
        assert s.worker_pids()[0] != pid and s.metrics()["reward/workers_replaced"] == 1


def test_invalid_status_from_custom_verifier_is_an_error():
    with RewardScorer(RewardConfig(num_workers=1), verify_fn=_bad_status) as s:
        assert s.score([r"\boxed{1}"], ["1"])[0].status == "error"


def test_worker_memory_cap_turns_a_runaway_check_into_an_error():
    with RewardScorer(RewardConfig(num_workers=1, worker_memory_mb=300), verify_fn=_allocates) as s:
        res = s.score([r"\boxed{50}", r"\boxed{1000}", r"\boxed{60}"], ["x"] * 3)
        assert [r.status for r in res] == ["correct", "error", "correct"]  # MemoryError; the worker lives on
        assert s.metrics()["reward/workers_replaced"] == 0


def test_interrupted_batch_does_not_leak_into_the_next(monkeypatch):
    import multiprocessing.connection as mpc

    with RewardScorer(RewardConfig(num_workers=1, timeout_s=10.0), verify_fn=_slow_equal) as s:
        s.score([r"\boxed{a}"], ["a"])  # worker ready
        real_wait = mpc.wait

        def interrupted_wait(*args, **kwargs):
            monkeypatch.setattr(mpc, "wait", real_wait)
            raise KeyboardInterrupt

        monkeypatch.setattr(mpc, "wait", interrupted_wait)
        with pytest.raises(KeyboardInterrupt):
            s.score([r"\boxed{slow}"], ["slow"])  # dispatched, then the caller is interrupted
        res = s.score([r"\boxed{a}", r"\boxed{b}"], ["x", "b"])  # the late 'correct' must not land in slot 0
        assert [r.status for r in res] == ["incorrect", "correct"]
        m = s.metrics()  # the late result was dropped, not counted (1 warm-up + 1 correct, 1 incorrect)
        assert (m["reward/correct"], m["reward/incorrect"]) == (2, 1)
