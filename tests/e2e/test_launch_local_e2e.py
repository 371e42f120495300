"""The tiny recipe through nemo-run's LocalExecutor: torchrun with 2 CPU processes on this machine (~25 s)."""

from __future__ import annotations

import io
import json
import re
from pathlib import Path

import pytest

from dasd_megatron.launch.checks import resolve_recipe
from dasd_megatron.launch.submit import submit

pytestmark = pytest.mark.e2e


def test_tiny_recipe_runs_with_the_local_executor(tmp_path, monkeypatch):
    monkeypatch.setattr("sys.stdin", io.StringIO(""))  # nemo-run's `invoke` mirrors stdin; pytest forbids reading it
    recipe = resolve_recipe("tiny_qwen3_grpo_cpu", [f"run_dir={tmp_path / 'run'}"])
    sub = submit(recipe, executor="local", job="smoke", smoke_steps=3, experiments_dir=str(tmp_path / "exp"))
    assert sub.state == "SUCCEEDED", sub.logs
    saved = json.loads((tmp_path / "run" / "config.json").read_text())
    assert saved["loss"]["router_mode"] == "constant" and saved["parallel"]["tensor"] == 2
    out = "".join(Path(p).read_text() for p in sub.logs if p.endswith("stdout.log"))
    assert re.search(r"smoke: loss [\d.]+ -> [\d.]+ over 3 steps \(decreased\)", out), sub.logs
