"""Every gold answer of the six DASD benchmarks, written back as a boxed response, verifies as correct against itself
through the real pool (so gold parsing never silently fails), and a wrong integer answer is incorrect."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest

from dasd_megatron.data import DataConfig, load_math_dataset
from dasd_megatron.reward import RewardConfig, RewardScorer

DATA = Path(__file__).parents[1].parent / "shared" / "data"
BENCHMARKS = ("aime24", "aime25", "hmmt_feb_2025", "math500", "minerva_math", "olympiadbench")

pytestmark = pytest.mark.skipif(not DATA.is_dir(), reason=f"shared math data not found at {DATA}")


def _strip_dollars(answer: str) -> str:
    return answer[1:-1] if len(answer) > 1 and answer.startswith("$") and answer.endswith("$") else answer


def test_benchmark_golds_verify_against_themselves():
    examples = [ex for b in BENCHMARKS for ex in load_math_dataset(DataConfig(source=str(DATA / b)))]
    assert len(examples) == 30 + 30 + 30 + 500 + 272 + 675
    responses = [f"Therefore the answer is $\\boxed{{{_strip_dollars(ex.answers[0])}}}$." for ex in examples]
    wrong = [ex for ex in examples if ex.source in ("aime24", "aime25", "hmmt_feb_2025") and ex.answer.isdigit()]
    with RewardScorer(RewardConfig(num_workers=2, timeout_s=20.0)) as scorer:
        results = scorer.score(responses, [ex.answer for ex in examples])
        bad = [(ex.source, ex.index, ex.answer, r.status) for ex, r in zip(examples, results) if r.status != "correct"]
        assert bad == []
        off_by_one = scorer.score([f"\\boxed{{{int(ex.answer) + 1}}}" for ex in wrong], [ex.answer for ex in wrong])
    assert len(wrong) == 73 and Counter(r.status for r in off_by_one) == {"incorrect": len(wrong)}
