"""bench/rollout.py runs end to end on tiny CPU shapes and prints a final JSON line with consistent numbers."""

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_bench_rollout_quick():
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "rollout.py"), "--quick"],
                          capture_output=True, text=True, cwd=ROOT, timeout=170)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    gen = res["generation"]
    assert gen["generated_tokens"] == gen["sequences"] * 8 and gen["server_tokens_per_s"] > 0
    assert gen["throughput_ratio"] > 0 and gen["max_batch"] >= 2  # the G samples were batched together
    sync = res["sync"]
    assert sync["torch_save_s_per_gb"] > 0
    for name in ("disk", "tensor", "distributed"):
        assert sync[name]["buckets"] > 1 and sync[name]["ratio_vs_torch_save"] > 0
        assert set(sync[name]["phases_s"]) >= {"pause", "flush", "export", "send", "continue", "total"}
    assert "ratio vs torch.save" in proc.stdout and "-> ratio" in proc.stdout
