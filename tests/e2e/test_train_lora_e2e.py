"""`dasd train` with LoRA end to end at TP=2 on gloo with the built-in rollout server (`model.lora.rank > 0`).

- adapter-only sync (`model.lora.sync=adapter`, the default): the servers run with LoRA enabled, get the base once
  (they start from the HF folder) and after every step only the adapter as a PEFT folder (`/load_lora_adapter`);
  every rollout request names it. Sync invariant in the running system: the server's sampling log-probs under the
  synced adapter equal the trainer's own (fp32 on both sides; HF + the server's LoRA hooks vs megatron + the
  adapters at TP=2: ~1e-6 nats, bound 1e-4 as the full-weight e2e test). Bytes per sync equal the adapter's PEFT
  tensors exactly. Checkpoints hold the adapters (and the EMA adapter of the teacher) only.
- a run killed hard after its second checkpoint resumes to the uninterrupted run's metrics (the EMA adapter teacher
  restored: the KL would differ otherwise).
- merged sync (`model.lora.sync=merged`): plain servers get W + alpha/r B A as full weights; the same invariant.
"""

from __future__ import annotations

import json
import math
import os

import pytest

from test_train_e2e import ENV, _cmd, _killed_and_resumed, _metrics

pytestmark = pytest.mark.e2e

LORA = ["model.lora.rank=4", "model.lora.alpha=8", "train.teacher=ema", "train.ema_decay=0.5"]


def _adapter_bytes(model_dir: str, rank: int) -> int:
    """PEFT tensor bytes (fp32) of an adapter on every linear: q/k/v share the fused QKV's A, gate/up fc1's."""
    cfg = json.load(open(os.path.join(model_dir, "config.json")))
    h, f, L = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"]
    q = cfg["num_attention_heads"] * cfg["head_dim"]
    kv = cfg["num_key_value_heads"] * cfg["head_dim"]
    per_layer = (3 * rank * h + rank * (q + 2 * kv)  # q, k, v: A [r, h] each, B [out, r]
                 + rank * q + h * rank  # o_proj
                 + 2 * rank * h + 2 * f * rank  # gate, up
                 + rank * f + h * rank)  # down
    return 4 * L * per_layer


def test_lora_adapter_sync_invariant_checkpoints_and_resume(assets):
    import subprocess

    from megatron.core import dist_checkpointing

    root, model, data = assets
    full, killed = str(root / "lora_full"), str(root / "lora_killed")
    r = subprocess.run(_cmd(model, data, full, 3) + LORA, capture_output=True, text=True, timeout=600, env=ENV)
    assert r.returncode == 0, r.stderr[-4000:]
    m = _metrics(full)
    assert [x["step"] for x in m] == [1, 2, 3]
    want_bytes = _adapter_bytes(model, 4)
    for x in m:
        assert math.isfinite(x["loss/dasd"]) and math.isfinite(x["loss/kl"]) and x["grad_norm"] > 0
        assert x["rollout/logp_mismatch_abs"] < 1e-4, x["rollout/logp_mismatch_abs"]
        assert x["weight_sync/bytes"] == want_bytes
    # the synced adapters are PEFT folders and they changed between steps
    from safetensors.torch import load_file

    w = sorted(os.listdir(os.path.join(full, "weights")))
    assert w == ["step2", "step3"]
    a, b = (load_file(os.path.join(full, "weights", d, "adapter_model.safetensors")) for d in w)
    assert sorted(a) == sorted(b) and all(k.startswith("base_model.model.model.layers.") for k in a)
    assert any(not (a[k] == b[k]).all() for k in a if "lora_B" in k)
    assert json.load(open(os.path.join(full, "weights", "step3", "adapter_config.json")))["r"] == 4
    # a checkpoint holds adapters (and their optimizer state) only, and the EMA adapter; its metadata the base
    ckpt = os.path.join(full, "checkpoints", "step_00000003")
    keys = list(dist_checkpointing.load_tensors_metadata(ckpt))
    assert keys and all("_lora." in k for k in keys), [k for k in keys if "_lora." not in k][:3]
    tkeys = list(dist_checkpointing.load_tensors_metadata(os.path.join(ckpt, "teacher")))
    assert tkeys and all("_lora." in k for k in tkeys)
    meta = json.load(open(os.path.join(ckpt, "dasd_meta.json")))["model"]
    assert meta["lora"]["rank"] == 4 and meta["base"]["path"] == model and len(meta["base"]["fingerprint"]) == 64

    _killed_and_resumed(_cmd(model, data, killed, 3) + LORA, killed)
    k = _metrics(killed)
    assert [x["step"] for x in k] == [1, 2, 3]
    for x, y in zip(m, k):
        for key in ("loss/dasd", "loss/kl", "grad_norm", "rollout/logp_mismatch_abs", "weight_sync/bytes"):
            assert x[key] == pytest.approx(y[key], rel=1e-5, abs=1e-8), (x["step"], key, x[key], y[key])


def test_lora_merged_sync_and_base_teacher(assets):
    import subprocess

    root, model, data = assets
    run = str(root / "lora_merged")
    extra = ["model.lora.rank=4", "model.lora.alpha=8", "model.lora.sync=merged", "train.teacher=base"]
    r = subprocess.run(_cmd(model, data, run, 2) + extra, capture_output=True, text=True, timeout=600, env=ENV)
    assert r.returncode == 0, r.stderr[-4000:]
    m = _metrics(run)
    from safetensors.torch import load_file

    full_bytes = sum(t.numel() * t.element_size()
                     for f in os.listdir(model) if f.endswith(".safetensors")
                     for t in load_file(os.path.join(model, f)).values())
    for x in m:
        assert x["rollout/logp_mismatch_abs"] < 1e-4 and math.isfinite(x["loss/kl"])
        assert x["weight_sync/bytes"] == full_bytes  # full (merged) weights
    assert not os.path.exists(os.path.join(run, "checkpoints", "step_00000002", "teacher"))  # base: nothing to store
