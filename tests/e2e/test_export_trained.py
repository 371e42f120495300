"""The trained policy leaves the run: `dasd export` / `tools/convert_hf.py export` of checkpoints that `dasd train`
wrote, and `dasd eval --model RUN_DIR`.

One real run: `dasd train --nproc 2 parallel.tensor=2` on a tiny random Qwen3 (vocabulary 300: megatron pads it to
512 rows at TP=2 but 384 at TP=1, so the TP=1 export must read the padding from the checkpoint) with an EMA teacher,
2 steps at a large learning rate (the weights move far from the HF model they started from), a checkpoint at step 2.

What the exported folders are checked against, each independent of the exporter's own reading of the checkpoint:
- the weights the trainer itself pushed to its rollout server after step 2 (the disk transport's folder, streamed
  from the live model in memory): the exported policy has the same bytes;
- the trainer's resume path (`load_training_checkpoint`: model + optimizer + teacher at the training layout, TP=2)
  and megatron's forward: transformers' logits of the exported policy / teacher equal megatron's on fixed ids.
  Both sides are fp32 with different kernels and summation orders (HF eager attention and matmuls vs megatron's
  SDPA spec and a TP=2 split of every matmul with an all-reduce); on this model (hidden 64, logits of magnitude ~1)
  such differences are ~1e-6, so atol 1e-4 leaves margin while a wrong tensor (a swapped layer, the policy for the
  teacher) moves logits by >1e-2.
"""

from __future__ import annotations

import glob
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from hf_fixtures import hf_logits, make_tiny_hf, write_sum_problems

from dasd_megatron.testing.distributed import free_port, run_distributed  # noqa: E402

pytestmark = pytest.mark.e2e

REPO = Path(__file__).parents[2]
DATA = REPO.parent / "shared" / "data"
ENV = dict(os.environ, OMP_NUM_THREADS="1")
IDS = torch.tensor([[1, 5, 9, 33, 120, 7, 250, 3], [2, 44, 44, 17, 299, 8, 61, 90]])


def _cli(*args, timeout=600):
    return subprocess.run([sys.executable, "-m", "dasd_megatron.cli", *args], capture_output=True, text=True,
                          timeout=timeout, env=ENV, cwd=REPO)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("export_trained")
    model = make_tiny_hf(str(root / "model"), "qwen3", vocab_size=300)
    data = write_sum_problems(root / "data.jsonl")
    run_dir = str(root / "run")
    r = _cli("train", "--nproc", "2", "parallel.tensor=2", f"model.hf_config={model}", f"data.source={data}",
             "train.steps=2", "train.prompts_per_step=2", "train.samples_per_prompt=2", "train.max_prompt_tokens=64",
             "train.max_response_tokens=8", "train.micro_batch_tokens=128", "model.seq_length=128",
             f"run_dir={run_dir}", f"rollout.base_port={free_port()}", "train.checkpoint_interval=2",
             "train.teacher=ema", "train.ema_decay=0.5", "optim.lr=1e-2")
    assert r.returncode == 0, r.stderr[-4000:]
    return root, model, run_dir


def _trainer_logits(rank, world_size, run_dir):
    """Policy and teacher logits after step 2, as the trainer's own resume path restores them at TP=2."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    from dasd_megatron.config import apply_overrides, RunConfig
    from dasd_megatron.model.builder import build_model
    from dasd_megatron.model.hf_config import load_hf_architecture
    from dasd_megatron.parallel import initialize_parallel
    from dasd_megatron.train.checkpoint import load_training_checkpoint
    from dasd_megatron.train.engine import build_optimizer, wrap_ddp

    with open(os.path.join(run_dir, "config.json")) as f:
        saved = json.load(f)
    cfg = apply_overrides(RunConfig(), [f"model.hf_config={saved['model']['hf_config']}", "parallel.tensor=2",
                                        "model.seq_length=128"])
    arch = load_hf_architecture(cfg.model.hf_config)
    initialize_parallel(cfg.parallel)
    policy = wrap_ddp(build_model(cfg, arch))
    opt = build_optimizer(policy, cfg.optim)
    teacher = build_model(cfg, arch)
    meta = load_training_checkpoint(os.path.join(run_dir, "checkpoints"), policy, opt, teacher=teacher)
    out = {"step": meta["step"]}
    for name, m in (("policy", policy.module), ("teacher", teacher)):
        m.eval()
        with torch.no_grad():
            logits = m(IDS, torch.arange(IDS.shape[1]).expand(IDS.shape[0], -1), None).float()
        parts = [torch.empty_like(logits) for _ in range(2)]
        dist.all_gather(parts, logits.contiguous(), group=ps.get_tensor_model_parallel_group())
        out[name] = torch.cat(parts, -1)[..., : arch.vocab_size]
    return out


@pytest.fixture(scope="module")
def trainer_logits(run):
    return run_distributed(_trainer_logits, 2, run[2])[0]


def _safetensors(folder):
    from safetensors.torch import load_file

    out = {}
    for f in sorted(glob.glob(os.path.join(folder, "*.safetensors"))):
        out.update(load_file(f))
    return out


def test_dasd_export_gives_the_trained_policy(run, trainer_logits):
    root, model, run_dir = run
    r = _cli("export", run_dir)
    assert r.returncode == 0, r.stderr[-3000:]
    out = os.path.join(run_dir, "export", "step_00000002")
    assert out in r.stdout and "the policy of step 2" in r.stdout, r.stdout
    assert trainer_logits["step"] == 2
    prov = json.load(open(os.path.join(out, "dasd_export.json")))
    assert prov["weights"] == "policy" and prov["step"] == 2 and prov["dtype"] == "float32"
    for name in ("config.json", "tokenizer.json", "model.safetensors.index.json"):
        assert os.path.isfile(os.path.join(out, name)), name

    # the same bytes as the weights the trainer streamed to its rollout server after step 2
    synced = [d for d in glob.glob(os.path.join(run_dir, "weights", "weights_*")) if d.endswith("step2")]
    assert len(synced) == 1, os.listdir(os.path.join(run_dir, "weights"))
    got, live = _safetensors(out), _safetensors(synced[0])
    assert sorted(got) == sorted(live)
    for k in live:
        assert torch.equal(got[k], live[k]), k
    # and not the HF model training started from
    start = _safetensors(model)
    assert max((got[k] - start[k]).abs().max().item() for k in start) > 1e-3

    # transformers' logits of the export == megatron's at the training layout, restored by the resume path
    hf = hf_logits(out, IDS)
    assert hf.shape == trainer_logits["policy"].shape == (2, 8, 300)
    torch.testing.assert_close(hf, trainer_logits["policy"], atol=1e-4, rtol=0)


def test_convert_hf_teacher_export_gives_the_ema_weights(run, trainer_logits):
    root, model, run_dir = run
    ckpt = os.path.join(run_dir, "checkpoints", "step_00000002")
    out = str(root / "teacher_hf")
    r = subprocess.run([sys.executable, "tools/convert_hf.py", "export", ckpt, out, "--teacher"], capture_output=True,
                       text=True, timeout=600, env=ENV, cwd=REPO)
    assert r.returncode == 0, r.stderr[-3000:]
    assert json.load(open(os.path.join(out, "dasd_export.json")))["weights"] == "teacher"
    hf = hf_logits(out, IDS)
    torch.testing.assert_close(hf, trainer_logits["teacher"], atol=1e-4, rtol=0)
    # the EMA teacher (decay 0.5 over two large steps) is neither the policy nor the starting model
    assert (trainer_logits["teacher"] - trainer_logits["policy"]).abs().max() > 1e-2
    assert (hf - hf_logits(model, IDS)).abs().max() > 1e-2
    # the policy through the same tool, from the checkpoint folder itself, equals `dasd export`'s
    pol = str(root / "policy_hf")
    r = subprocess.run([sys.executable, "tools/convert_hf.py", "export", ckpt, pol], capture_output=True, text=True,
                       timeout=600, env=ENV, cwd=REPO)
    assert r.returncode == 0, r.stderr[-3000:]
    torch.testing.assert_close(hf_logits(pol, IDS), trainer_logits["policy"], atol=1e-4, rtol=0)


def test_export_errors_say_what_is_wrong(run, tmp_path):
    root, model, run_dir = run
    r = _cli("export", run_dir, "--step", "1")  # checkpoint_interval=2: only step 2 was kept
    assert r.returncode == 2 and "no checkpoint of step 1" in r.stderr and "kept steps 2" in r.stderr, r.stderr
    assert r.stderr.strip().count("\n") == 0 and "Traceback" not in r.stderr, r.stderr

    # a run trained with the current policy as teacher has no teacher folder
    copy = tmp_path / "run_current"
    shutil.copytree(run_dir, copy, ignore=shutil.ignore_patterns("weights", "export"))
    step = copy / "checkpoints" / "step_00000002"
    shutil.rmtree(step / "teacher")
    meta = json.load(open(step / "dasd_meta.json"))
    meta["model"]["teacher"] = "current"
    json.dump(meta, open(step / "dasd_meta.json", "w"))
    r = _cli("export", str(copy), "--teacher")
    assert r.returncode == 2 and "train.teacher=current" in r.stderr and "without --teacher" in r.stderr, r.stderr

    # another model's HF config: the error names the tensors that do not fit, not a loader traceback
    other = make_tiny_hf(str(tmp_path / "llama"), "llama")
    r = _cli("export", run_dir, "--hf-config", other, "--out", str(tmp_path / "wrong"))
    assert r.returncode == 2 and "does not hold the model that" in r.stderr and "Fix" in r.stderr, r.stderr
    assert not os.path.exists(tmp_path / "wrong") and not glob.glob(str(tmp_path / ".wrong.partial-*"))

    # a checkpoint from before checkpoints kept hf/: the config and tokenizer come from the run's config.json
    shutil.rmtree(step / "hf")
    r = _cli("export", str(copy), "--out", str(tmp_path / "old_style"))
    assert r.returncode == 0, r.stderr[-3000:]
    assert _safetensors(tmp_path / "old_style").keys() == _safetensors(model).keys()

    r = _cli("export", run_dir, "--out", str(tmp_path / "old_style"))
    assert r.returncode == 2 and "already exists" in r.stderr, r.stderr


@pytest.mark.skipif(not DATA.is_dir(), reason=f"shared math data not found at {DATA}")
def test_dasd_eval_takes_the_run_folder(run, tmp_path):
    """`dasd eval --model RUN_DIR` serves the newest checkpoint (exported on the fly); its greedy answers equal
    those of the exported HF folder."""
    root, model, run_dir = run

    def evaluate(m, out):
        return _cli("eval", "--model", m, "--backend", "builtin", "--output", str(out), "--benchmarks", "aime24",
                    "--limit", "2", "-n", "1", "--temperature", "0", "--max-new-tokens", "6", "--no-progress",
                    "--data-dir", str(DATA), "--chat-template", "plain")

    r = evaluate(run_dir, tmp_path / "from_run")
    assert r.returncode == 0, r.stderr[-3000:]
    exported = os.path.join(run_dir, "export", "step_00000002")
    if not os.path.isdir(exported):
        assert _cli("export", run_dir).returncode == 0
    r2 = evaluate(exported, tmp_path / "from_hf")
    assert r2.returncode == 0, r2.stderr[-3000:]
    from dasd_megatron.eval.records import read_run_records

    got = read_run_records(str(tmp_path / "from_run"))["aime24"]
    want = read_run_records(str(tmp_path / "from_hf"))["aime24"]
    assert len(got) == 2
    for g, w in zip(got, want):
        assert [s["tokens"] for s in g["samples"]] == [s["tokens"] for s in w["samples"]]
        for a, b in zip(g["samples"], w["samples"]):
            # same weights and tokens; the built-in server batches concurrent problems together, so fp32 sums
            # run in another order (seen: 4e-5 relative on a 6-token sum of ~-24 nats); a wrong model is off by >1%
            assert a["logprob_sum"] == pytest.approx(b["logprob_sum"], rel=2e-4)
    assert not glob.glob(str(tmp_path / "from_run" / ".hf_export-*"))  # the temporary export is gone
