"""bench/dasd_step.py: the model-FLOPs formula against a hand computation, the profile summary on synthetic events,
and a tiny CPU run with the baseline that reports every key."""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from bench.dasd_step import Ev, effective_params, peak_flops, step_flops, summarise_profile  # noqa: E402

# hidden 8, FFN 16, 2 layers, 2 query heads, 1 KV head, head dim 4, vocabulary 10
SHAPE = {"model_type": "qwen3", "architectures": ["Qwen3ForCausalLM"], "hidden_size": 8, "intermediate_size": 16,
         "num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 4,
         "vocab_size": 10, "max_position_embeddings": 64, "rope_theta": 10000.0, "rms_norm_eps": 1e-6,
         "tie_word_embeddings": True, "hidden_act": "silu"}
# Hand computation.
# Per layer: q 8*(2*4) = 64, k and v 2 * 8*(1*4) = 64, o (2*4)*8 = 64, SwiGLU 3*8*16 = 384: 576; 2 layers 1152;
# LM head 8*10 = 80: N_eff = 1232.
# Two rollouts: student documents of 3 and 5 tokens (S = 8), teacher documents of 4 and 7 tokens (T = 11).
# Attention forward per layer per document: 2 matmuls * 2 FLOPs * L^2/2 * (2 heads * 4) = 16 L^2.
#   student: 16 * (9 + 25) * 2 layers = 1088;  teacher: 16 * (16 + 49) * 2 layers = 2080.
# student fwd+bwd 6*1232*8 + 3*1088 = 62400; student fwd 2*1232*8 + 1088 = 20800; teacher fwd 2*1232*11 + 2080 = 29184.
PAIRS = [(3, 4), (5, 7)]
N_EFF = 1232
SINGLE = 62400 + 29184                   # train + teacher forward inside it (either estimator): 91584
FULL_TWO_PASS = 62400 + 29184 + 20800 + 29184    # + scoring student and teacher forwards; full: teacher again
SAMPLED_TWO_PASS = 62400 + 20800 + 29184         # sampled after scoring: no teacher forward in training
TEACHER_OFF_SINGLE = 62400
TEACHER_OFF_TWO_PASS = 62400 + 20800


def _rollouts():
    from dasd_megatron.train.batch import Rollout

    # student prompt 1 + 2 response, teacher prompt 2; student prompt 2 + 3 response, teacher prompt 4
    return [Rollout([1], [1, 2], [3, 4], [-1.0, -1.0], reward=1.0, group=0),
            Rollout([1, 2], [1, 2, 3, 4], [5, 6, 7], [-1.0] * 3, reward=0.0, group=0)]


def test_step_flops_matches_hand_computation(tmp_path):
    assert effective_params(SHAPE) == N_EFF
    assert SINGLE == 91584 and FULL_TWO_PASS == 141568 and SAMPLED_TWO_PASS == 112384
    for rollouts in (PAIRS, _rollouts()):
        assert step_flops(SHAPE, rollouts, "full", two_pass=False, updates=1) == SINGLE
        assert step_flops(SHAPE, rollouts, "sampled", two_pass=False, updates=1) == SINGLE
        assert step_flops(SHAPE, rollouts, "full", two_pass=True, updates=1) == FULL_TWO_PASS
        assert step_flops(SHAPE, rollouts, "sampled", two_pass=True, updates=1) == SAMPLED_TWO_PASS
        # more than one update implies the scoring pass; the updates split the batch (each token trained once)
        assert step_flops(SHAPE, rollouts, "sampled", two_pass=False, updates=2) == SAMPLED_TWO_PASS
        assert step_flops(SHAPE, rollouts, "full", two_pass=False, updates=2) == FULL_TWO_PASS
        for est in ("full", "sampled"):
            assert step_flops(SHAPE, rollouts, est, False, 1, teacher_term_on=False) == TEACHER_OFF_SINGLE
            assert step_flops(SHAPE, rollouts, est, True, 1, teacher_term_on=False) == TEACHER_OFF_TWO_PASS
    b = step_flops(SHAPE, PAIRS, "full", True, 1, breakdown=True)
    assert (b["student_tokens"], b["teacher_tokens"], b["n_eff"]) == (8, 11, N_EFF)
    assert (b["attention_fwd_student"], b["attention_fwd_teacher"]) == (1088, 2080)
    assert b["total"] == FULL_TWO_PASS
    # the same from the parsed architecture (megatron's field names)
    from dasd_megatron.model.hf_config import load_hf_architecture

    (tmp_path / "config.json").write_text(json.dumps(SHAPE))
    arch = load_hf_architecture(str(tmp_path))
    assert effective_params(arch) == N_EFF
    assert step_flops(arch, PAIRS, "full", True, 1) == FULL_TWO_PASS
    with pytest.raises(ValueError):
        step_flops(SHAPE, PAIRS, "bogus", False, 1)


def test_peak_flops_by_device_name():
    assert peak_flops("NVIDIA H100 80GB HBM3") == 989e12
    assert peak_flops("NVIDIA H100 PCIe") == 756e12
    assert peak_flops("NVIDIA H200") == 989e12
    assert peak_flops("NVIDIA A100-SXM4-80GB") == 312e12
    assert peak_flops("cpu") is None and peak_flops("NVIDIA GeForce RTX 4090") is None


def test_summarise_profile_synthetic_events():
    us = 1000
    ev = [
        Ev("aten::mm", "cpu_op", 0, 50 * us, corr=1),
        Ev("aten::add", "cpu_op", 60 * us, 70 * us, corr=2),
        Ev("aten::item", "cpu_op", 80 * us, 95 * us, corr=3),
        Ev("cudaLaunchKernel", "cuda_runtime", 10 * us, 12 * us, corr=100, linked=1),
        Ev("cudaLaunchKernel", "cuda_runtime", 20 * us, 22 * us, corr=101, linked=1),
        Ev("cuLaunchKernel", "cuda_driver", 62 * us, 63 * us, corr=102, linked=2),
        Ev("cudaMemcpyAsync", "cuda_runtime", 81 * us, 82 * us, corr=103, linked=3),
        Ev("cudaStreamSynchronize", "cuda_runtime", 82 * us, 94 * us, corr=104, linked=3),
        Ev("cudaDeviceSynchronize", "cuda_runtime", 96 * us, 98 * us, corr=105),
        # kernels: [20, 40] and [30, 50] overlap (busy 30 us), [70, 80] alone (10 us)
        Ev("gemm_kernel", "kernel", 20 * us, 40 * us, corr=100, linked=1),
        Ev("gemm_kernel", "kernel", 30 * us, 50 * us, corr=101, linked=1),
        Ev("add_kernel", "kernel", 70 * us, 80 * us, corr=102, linked=2),
        Ev("Memcpy DtoH (Device -> Pageable)", "gpu_memcpy", 85 * us, 86 * us, corr=103, linked=3),
    ]
    p = summarise_profile(ev, wall_s=100e-6, step_s=80e-6)
    assert (p["kernel_launches"], p["runtime_launches"], p["driver_launches"], p["kernels"]) == (3, 2, 1, 3)
    assert (p["host_syncs"], p["cuda_stream_synchronize"], p["cuda_device_synchronize"]) == (2, 1, 1)
    assert p["cuda_memcpy_async"] == 1
    assert p["kernel_time_s"] == pytest.approx(50e-6) and p["gpu_busy_s"] == pytest.approx(40e-6)
    assert p["gpu_busy_fraction"] == pytest.approx(0.4)
    assert p["gpu_busy_fraction_vs_unprofiled_step"] == pytest.approx(0.5)
    assert p["memcpy_memset_time_s"] == pytest.approx(1e-6)
    top = p["top_ops_by_device_time"]
    assert top[0] == {"op": "aten::mm", "device_time_s": pytest.approx(40e-6), "kernels": 2}
    assert top[1]["op"] == "aten::add" and top[1]["device_time_s"] == pytest.approx(10e-6)
    assert p["top_ops_by_launches"][0] == {"op": "aten::mm", "launches": 2}
    assert p["top_kernels"][0]["kernel"] == "gemm_kernel" and p["top_kernels"][0]["count"] == 2


def test_bench_tiny_cpu_baseline(tmp_path):
    out = tmp_path / "result.json"
    code = ("import sys; sys.path.insert(0, %r); from bench.dasd_step import main; "
            "main(['--tiny', '--steps', '1', '--baseline', '--profile', '--json', %r])") % (ROOT, str(out))
    env = dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=240, env=env)
    assert proc.returncode == 0, proc.stderr[-4000:]
    res = json.loads(out.read_text())
    assert res == json.loads(proc.stdout.split("RESULT ", 1)[1].splitlines()[0])
    names = ["full/single_pass", "full/two_pass", "sampled/single_pass", "sampled/two_pass",
             "sampled/two_pass_two_updates", "baseline/full/single_pass"]
    assert list(res["results"]) == names
    for k in ("single_pass_speedup_full", "single_pass_speedup_sampled", "full_vs_sampled_time_ratio",
              "two_updates_vs_one_time_ratio_sampled", "speedup_vs_baseline_full"):
        assert res[k] > 0, k
    assert res["mfu"] is None and res["peak_flops"] is None and res["model_tflops_per_step"] > 0
    assert res["aten_ops_per_step"] > 0
    assert set(res["baseline_switches"]) == {"set_fast_path(False)", "model.fused_kernels=torch",
                                             "loss.kernel_backend=torch"}
    base = res["results"]["baseline/full/single_pass"]
    assert base["loss_kernel_backend"] == "torch"
    # same model, same data: the baseline path computes the same loss
    assert base["loss"] == pytest.approx(res["results"]["full/single_pass"]["loss"], rel=0.05)
    for name, r in res["results"].items():
        assert r["step_s"] > 0 and r["achieved_tflops"] > 0 and r["mfu"] is None, name
        assert r["aten_ops_per_step"] > 0 and r["aten_top_ops"], name
        p = r["profile"]
        assert p["profiled_step_s"] > 0 and p["gpu_busy_fraction"] is None and p["kernel_launches"] is None, name
        assert p["top_ops_by_self_cpu_time"], name
    # FLOPs: the two-pass full variant adds the scoring forwards and the second teacher forward
    fl = {n: res["results"][n]["model_tflops_per_step"] for n in names}
    assert fl["full/single_pass"] == fl["sampled/single_pass"] == fl["baseline/full/single_pass"]
    assert fl["full/two_pass"] > fl["sampled/two_pass"] == fl["sampled/two_pass_two_updates"] > fl["sampled/single_pass"]
