"""`dasd eval` on a Megatron checkpoint: exported to a temporary HF folder, served, evaluated, cleaned up.

The tiny HF model is imported with `tools/convert_hf.py import`; evaluating the checkpoint greedily must give the
same responses and log-probs as evaluating the HF folder itself (the export is exact), and leave no export behind.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from dasd_megatron.eval.cli import main
from dasd_megatron.eval.records import read_run_records
from dasd_megatron.eval.testing import BYTE_EOS_ID, save_byte_tokenizer
from sglang_rollout.testing import make_tiny_hf_model

DATA = Path(__file__).parents[1].parent / "shared" / "data"
pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not DATA.is_dir(), reason=f"shared math data not found at {DATA}")]


def test_megatron_checkpoint_is_exported_served_and_matches_hf(tmp_path, caplog):
    hf = save_byte_tokenizer(make_tiny_hf_model(str(tmp_path / "hf"), seed=3, eos_token_id=BYTE_EOS_ID,
                                                max_position_embeddings=4096, init_scale=0.05))
    ckpt = tmp_path / "ckpt"
    subprocess.run([sys.executable, "-m", "tools.convert_hf", "import", hf, str(ckpt)], check=True,
                   capture_output=True, cwd=Path(__file__).parents[1])
    assert (ckpt / "metadata.json").exists()

    def evaluate(model, out):
        return main(["eval", "--model", model, "--backend", "builtin", "--output", str(out), "--benchmarks",
                     "aime24", "--limit", "1", "-n", "2", "--temperature", "0", "--max-new-tokens", "6",
                     "--no-progress", "--data-dir", str(DATA)])

    assert evaluate(str(ckpt), tmp_path / "from_ckpt") == 0
    assert evaluate(hf, tmp_path / "from_hf") == 0
    assert "exporting the Megatron checkpoint" in caplog.text
    assert not list((tmp_path / "from_ckpt").glob(".hf_export-*"))  # the temporary export is gone
    got = read_run_records(str(tmp_path / "from_ckpt"))["aime24"][0]["samples"]
    want = read_run_records(str(tmp_path / "from_hf"))["aime24"][0]["samples"]
    assert [s["tokens"] for s in got] == [s["tokens"] for s in want] and got[0]["tokens"] > 0
    for g, w in zip(got, want):
        assert g["logprob_sum"] == pytest.approx(w["logprob_sum"], abs=1e-4)
        assert g["status"] == w["status"]
