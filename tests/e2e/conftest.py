"""Fixtures shared by the end-to-end runs."""

from __future__ import annotations

import pytest

from hf_fixtures import make_tiny_hf, write_sum_problems


@pytest.fixture(scope="module")
def assets(tmp_path_factory, request):
    """(root, model, data): a folder of the test module's own, a tiny random Qwen3 HF folder in it and a JSONL of
    sum problems, which the e2e training runs learn from."""
    root = tmp_path_factory.mktemp(request.module.__name__.rpartition(".")[2])
    model = make_tiny_hf(str(root / "model"), "qwen3")
    data = write_sum_problems(root / "data.jsonl")
    return root, model, str(data)
