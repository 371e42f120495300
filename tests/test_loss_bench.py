"""bench/loss.py runs end to end on a tiny CPU case and prints a final JSON line with consistent numbers."""

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_bench_cpu_smoke():
    cmd = [sys.executable, os.path.join(ROOT, "bench", "loss.py"), "--tokens", "64", "--vocab", "500",
           "--dtype", "fp32", "--chunk-size", "16", "--check-tokens", "64"]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    assert res["tokens"] == 64 and res["vocab"] == 500 and not res["naive_extrapolated"]
    assert res["fused_time_s"] > 0 and res["naive_time_s"] > 0 and res["speedup"] > 0
    assert res["fused_memory_method"] == "rss_high_water"
    # same inputs, same math: the two implementations agree (fp32, V=500 sums)
    assert res["loss_rel_diff"] < 1e-5 and res["fused_check_grad_max_err_rel"] < 1e-5
    assert "ratio: fused is" in proc.stdout
