"""Exporting a LoRA training checkpoint (`dasd export`, `run_export`, `load_checkpoint_model`; `model/convert.py`).

A LoRA run's checkpoint holds only the adapter tensors (plus the optimizer); `dasd_meta.json` records the LoRA
config and the base HF folder with its fingerprint. The fixture writes one the way the trainer does, at TP=2 on a
tiny Qwen3 (vocabulary 300: 512 padded rows at TP=2, 384 at TP=1, so the export cannot lean on the stored padding):
base loaded from HF, `apply_lora` (rank 4, alpha 8, every target), B nonzero, DDP + optimizer,
`save_training_checkpoint` with an EMA `AdapterTeacher` (its adapter differs from the policy's). The trainer's own
fp32 forward logits (policy, and the policy inside `teacher.applied`) are the reference. Everything else reads
the checkpoint in one process at TP=1:

- merged export (default): transformers' logits of the folder equal the trainer's; `--teacher` gives base + EMA
  adapter; `load_checkpoint_model` (also megatron's forward at TP=1) and the path `dasd eval` takes to serve a
  checkpoint (`check_model_path`, `tokenizer_source`, `export_checkpoint`: `dasd export` in a subprocess) agree.
- `--adapter`: a PEFT folder whose state has the documented names and shapes, loaded by
  `peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), folder)` to the trainer's logits;
  it needs no base weights (a checkpoint whose base is gone still exports its adapter).
- refusals: the recorded base missing, the base's weights changed (fingerprint), `--base` with another model's
  weights; `--base` with an unchanged copy is accepted (the CLI flag, end to end).

Tolerance (logits, fp32): atol 1e-5 on logits of magnitude O(1). The merged model computes (W + s B A) x with the
product rounded once into W; the trainer computes W x + s B (A x) with A x, B(Ax) and the sum rounded separately,
and at TP=2 (its row-parallel sums reordered over two ranks); transformers' kernels reorder the sums again. Each is
a few fp32 ulps (~1e-7 relative) per layer, far below 1e-5, while a wrong or missing adapter moves the logits by
> 1e-3 (asserted). Same bound as tests/test_lora.py's merged-vs-adapter check; observed differences are ~1e-6.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

from dasd_megatron.testing.distributed import run_distributed
from hf_fixtures import hf_logits, make_tiny_hf, megatron_logits

S, RANK, ALPHA, LAYERS = 12, 4, 8.0, 2
ATOL = 1e-5


def _ids(vocab: int) -> torch.Tensor:
    return torch.randint(0, vocab, (2, S), generator=torch.Generator().manual_seed(0))


def _full_logits(ctx, logits, vocab):
    import torch.distributed as dist

    lg = logits.float()
    if ctx.tp > 1:
        parts = [torch.empty_like(lg) for _ in range(ctx.tp)]
        dist.all_gather(parts, lg.contiguous(), group=ctx.tp_group)
        lg = torch.cat(parts, dim=-1)
    return lg[..., :vocab]


def _train_and_save(rank, world, base, root):
    """The trainer's side at TP=world: a LoRA model with nonzero B and an EMA teacher, saved as the trainer does.
    Returns the policy's and the teacher's logits and the full adapter tensors."""
    from megatron.core import parallel_state as ps

    from dasd_megatron.config import LoRAConfig, ModelConfig, ParallelConfig, RunConfig
    from dasd_megatron.model.builder import build_model
    from dasd_megatron.model.hf_config import load_hf_architecture
    from dasd_megatron.model.hf_import import load_hf_weights, open_hf_checkpoint
    from dasd_megatron.model.lora import TARGET_SITES, apply_lora, base_fingerprint, iter_adapters
    from dasd_megatron.parallel import initialize_parallel
    from dasd_megatron.train.checkpoint import save_training_checkpoint
    from dasd_megatron.train.config import OptimConfig
    from dasd_megatron.train.engine import build_optimizer, wrap_ddp
    from dasd_megatron.train.teacher import AdapterTeacher

    lora = LoRAConfig(rank=RANK, alpha=ALPHA)
    cfg = RunConfig(model=ModelConfig(hf_config=base, seq_length=S, attention_backend="sdpa", lora=lora),
                    parallel=ParallelConfig(tensor=world))
    ctx = initialize_parallel(cfg.parallel)
    arch = load_hf_architecture(base)
    model = build_model(cfg, arch)
    load_hf_weights(model, open_hf_checkpoint(base))
    apply_lora(model, lora, seed=7)  # not the exporter's seed: A must come from the checkpoint

    def set_b(seed):  # one generator per (layer, target): the same full B whatever the layout
        for layer, a, _ in iter_adapters(model):
            g = torch.Generator().manual_seed(seed * 1000 + 10 * layer + list(TARGET_SITES).index(a.target))
            a.set_full(b=0.05 * torch.randn(a.out_features, a.rank, generator=g))

    set_b(3)
    ddp = wrap_ddp(model)
    opt = build_optimizer(ddp, OptimConfig(lr=1e-3))
    teacher = AdapterTeacher(ddp, "ema", 0.5)  # the EMA starts at the B of seed 3 ...
    set_b(5)
    teacher.update(ddp)  # ... and moves halfway to seed 5's: the teacher's adapter is neither the policy's nor 0
    ids = _ids(arch.vocab_size)
    pos = torch.arange(S).expand(2, -1)
    with torch.no_grad():
        policy = _full_logits(ctx, ddp(ids, pos, None), arch.vocab_size)
        with teacher.applied(ddp):
            ema = _full_logits(ctx, ddp(ids, pos, None), arch.vocab_size)
        base_logits = _full_logits(ctx, _base_forward(ddp, ids, pos), arch.vocab_size)
    meta_model = {"hf_config": base, "teacher": "ema", "params_dtype": "float32",
                  "layout": {"tensor": world, "pipeline": 1, "context": 1, "data": 1},
                  "lora": dataclasses.asdict(lora), "base": {"path": base, "fingerprint": base_fingerprint(base)}}
    save_training_checkpoint(root, 1, ddp, opt, {"prompts": {}, "model": meta_model}, teacher=teacher, hf_dir=base)
    full = {f"{layer}.{a.target}": (a.full_a().clone(), a.full_b().clone()) for layer, a, _ in iter_adapters(ddp)}
    ps.destroy_model_parallel()
    return {"policy": policy, "ema": ema, "base": base_logits, "adapters": full}


def _base_forward(ddp, ids, pos):
    from dasd_megatron.model.lora import adapters_disabled

    with adapters_disabled(ddp):
        return ddp(ids, pos, None)


def _export_all(rank, world, run, ckpt, orphan, out):
    """Everything that needs a process group, in one TP=1 process."""
    from dasd_megatron.model.convert import run_export

    stats = {"merged": run_export(run, None),  # the run folder: its newest checkpoint, default output folder
             "adapter": run_export(run, None, adapter=True),
             "teacher": run_export(ckpt, os.path.join(out, "teacher"), teacher=True),
             "orphan_adapter": run_export(orphan, os.path.join(out, "orphan_adapter"), adapter=True)}
    vocab = json.load(open(os.path.join(ckpt, "hf", "config.json")))["vocab_size"]
    return stats, megatron_logits(ckpt, _ids(vocab))  # load_checkpoint_model at TP=1


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("lora_export")
    base = make_tiny_hf(str(tmp / "base"), "qwen3", num_hidden_layers=LAYERS, vocab_size=300)
    run = tmp / "run"
    ref = run_distributed(_train_and_save, 2, base, str(run / "checkpoints"))[0]
    ckpt = run / "checkpoints" / "step_00000001"
    # a copy of the checkpoint whose recorded base is gone (a run moved to another machine)
    orphan = tmp / "orphan" / "step_00000001"
    shutil.copytree(ckpt, orphan)
    meta = json.loads((orphan / "dasd_meta.json").read_text())
    meta["model"]["base"]["path"] = meta["model"]["hf_config"] = str(tmp / "gone")
    (orphan / "dasd_meta.json").write_text(json.dumps(meta))
    out = tmp / "out"
    out.mkdir()
    stats, reloaded = run_distributed(_export_all, 1, str(run), str(ckpt), str(orphan), str(out))[0]
    return {"tmp": tmp, "base": base, "run": run, "ckpt": ckpt, "orphan": orphan, "ref": ref, "stats": stats,
            "reloaded": reloaded, "vocab": 300}


def test_reference_adapter_is_live(exported):
    ref = exported["ref"]
    assert (ref["policy"] - ref["base"]).abs().max() > 1e-3, "the adapter must move the logits (else nothing is tested)"
    assert (ref["ema"] - ref["policy"]).abs().max() > 1e-3, "the EMA teacher must differ from the policy"


def test_merged_export_matches_the_trainers_forward(exported):
    stats, ref = exported["stats"]["merged"], exported["ref"]
    out = stats["out_dir"]
    assert out == str(exported["run"] / "export" / "step_00000001")
    assert stats["lora"]["mode"] == "merged" and stats["lora"]["base"] == exported["base"]
    got = hf_logits(out, _ids(exported["vocab"]))
    torch.testing.assert_close(got, ref["policy"], atol=ATOL, rtol=0)
    record = json.load(open(os.path.join(out, "dasd_export.json")))
    assert record["lora"]["mode"] == "merged" and record["lora"]["config"]["rank"] == RANK
    cfg = json.load(open(os.path.join(out, "config.json")))
    assert cfg.get("torch_dtype", cfg.get("dtype")) == "float32"
    from dasd_megatron.model.convert import export_summary

    line = export_summary(stats)
    assert "merged with its LoRA adapter (rank 4" in line and " MB, float32" in line and exported["base"] in line


def test_teacher_export_is_base_plus_ema_adapter(exported):
    stats = exported["stats"]["teacher"]
    assert stats["weights"] == "teacher" and stats["lora"]["mode"] == "merged"
    got = hf_logits(stats["out_dir"], _ids(exported["vocab"]))
    torch.testing.assert_close(got, exported["ref"]["ema"], atol=ATOL, rtol=0)


def test_load_checkpoint_model_rebuilds_the_adapter_forward_at_tp1(exported):
    torch.testing.assert_close(exported["reloaded"], exported["ref"]["policy"], atol=ATOL, rtol=0)


def _peft_shapes(cfg: dict) -> dict:
    """The documented PEFT state: per layer and HF module, lora_A [rank, in] and lora_B [out, rank]."""
    h, f = cfg["hidden_size"], cfg["intermediate_size"]
    q, kv = cfg["num_attention_heads"] * cfg["head_dim"], cfg["num_key_value_heads"] * cfg["head_dim"]
    dims = {"self_attn.q_proj": (h, q), "self_attn.k_proj": (h, kv), "self_attn.v_proj": (h, kv),
            "self_attn.o_proj": (q, h), "mlp.gate_proj": (h, f), "mlp.up_proj": (h, f), "mlp.down_proj": (f, h)}
    out = {}
    for i in range(cfg["num_hidden_layers"]):
        for mod, (fin, fout) in dims.items():
            name = f"base_model.model.model.layers.{i}.{mod}"
            out[f"{name}.lora_A.weight"] = (RANK, fin)
            out[f"{name}.lora_B.weight"] = (fout, RANK)
    return out


def test_adapter_export_is_a_peft_folder_with_the_trainers_logits(exported):
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    stats, base, ref = exported["stats"]["adapter"], exported["base"], exported["ref"]
    out = stats["out_dir"]
    assert out == str(exported["run"] / "export" / "step_00000001-adapter")
    assert stats["lora"]["mode"] == "adapter" and stats["lora"]["base_present"]
    names = set(os.listdir(out))
    assert {"adapter_config.json", "adapter_model.safetensors", "tokenizer.json"} <= names
    assert "config.json" not in names, "a PEFT folder must not look like a full model"
    state = load_file(os.path.join(out, "adapter_model.safetensors"))
    want = _peft_shapes(json.load(open(os.path.join(base, "config.json"))))
    assert {k: tuple(v.shape) for k, v in state.items()} == want
    assert stats["lora"]["tensors"] == len(want) and stats["bytes"] == sum(v.numel() * 4 for v in state.values())
    # the fused QKV's one A serves q, k and v; its B rows split between them (the trainer's full tensors)
    a, b = ref["adapters"]["0.linear_qkv"]
    pre = "base_model.model.model.layers.0.self_attn"
    for m in ("q_proj", "k_proj", "v_proj"):
        assert torch.equal(state[f"{pre}.{m}.lora_A.weight"], a)
    assert sum(state[f"{pre}.{m}.lora_B.weight"].shape[0] for m in ("q_proj", "k_proj", "v_proj")) == b.shape[0]
    cfg = json.load(open(os.path.join(out, "adapter_config.json")))
    assert (cfg["r"], cfg["lora_alpha"], cfg["base_model_name_or_path"]) == (RANK, 8, base)
    assert sorted(cfg["target_modules"]) == sorted(["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                                     "down_proj"])
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32), out).eval()
    loaded = {k.replace(".default", ""): v for k, v in model.state_dict().items() if "lora_" in k}
    assert sorted(loaded) == sorted(state), "PEFT must load every tensor (and find no others)"
    with torch.no_grad():
        got = model(_ids(exported["vocab"])).logits.float()
    torch.testing.assert_close(got, ref["policy"], atol=ATOL, rtol=0)
    assert AutoTokenizer.from_pretrained(out).vocab_size > 0
    from dasd_megatron.model.convert import export_summary

    line = export_summary(stats)
    assert line.startswith("exported the LoRA adapter (PEFT, rank 4") and "tensors)" in line and " MB" in line


def test_adapter_export_needs_no_base_weights(exported):
    from dasd_megatron.model.convert import export_summary

    stats = exported["stats"]["orphan_adapter"]
    assert stats["lora"]["base_present"] is False and "not present here" in export_summary(stats)
    got = json.load(open(os.path.join(stats["out_dir"], "adapter_config.json")))
    assert got["base_model_name_or_path"] == str(exported["tmp"] / "gone")
    from safetensors.torch import load_file

    same = load_file(os.path.join(exported["stats"]["adapter"]["out_dir"], "adapter_model.safetensors"))
    mine = load_file(os.path.join(stats["out_dir"], "adapter_model.safetensors"))
    assert sorted(same) == sorted(mine) and all(torch.equal(same[k], mine[k]) for k in same)


def _changed_copy(src: str, dst: str) -> str:
    """A copy of the HF folder `src` with one weight changed (same names, shapes, file size)."""
    from safetensors.torch import load_file, save_file

    shutil.copytree(src, dst)
    path = os.path.join(dst, "model.safetensors")
    w = load_file(path)
    w["model.norm.weight"] = w["model.norm.weight"] + 1.0
    save_file(w, path, metadata={"format": "pt"})
    return dst


def test_refusals_name_the_base_and_the_fix(exported, tmp_path, capsys):
    from dasd_megatron.cli import main
    from dasd_megatron.model.convert import resolve_checkpoint, run_export
    from dasd_megatron.model.hf_mapping import ConversionError

    ckpt, orphan, gone = str(exported["ckpt"]), str(exported["orphan"]), str(exported["tmp"] / "gone")
    # the recorded base is missing: the merged export (API and CLI) refuses, naming the path and --base / --adapter
    with pytest.raises(ConversionError, match="is not a folder here") as e:
        run_export(orphan, str(tmp_path / "x"))
    assert gone in str(e.value) and "--base PATH" in str(e.value) and "--adapter" in str(e.value)
    assert main(["export", orphan, "--out", str(tmp_path / "y")]) == 2
    err = capsys.readouterr().err
    assert "dasd export: error:" in err and gone in err and "--base" in err
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()
    # the base's weights changed since training: refused (merged and adapter), naming the fingerprint and the fix
    changed = _changed_copy(exported["base"], str(tmp_path / "changed"))
    for adapter in (False, True):
        with pytest.raises(ConversionError, match="fingerprint") as e:
            run_export(ckpt, str(tmp_path / "z"), base=changed, adapter=adapter)
        assert changed in str(e.value) and "--base PATH" in str(e.value)
    # an unchanged copy elsewhere is accepted with --base
    moved = shutil.copytree(exported["base"], str(tmp_path / "moved"))
    src = resolve_checkpoint(orphan, base=moved)
    assert src.lora.base_dir == moved and src.lora.recorded_base == gone and src.lora.lora_config().rank == RANK
    # --base / --adapter with a checkpoint that holds full weights
    full = tmp_path / "full" / "step_00000001"
    shutil.copytree(exported["ckpt"], full)
    meta = json.loads((full / "dasd_meta.json").read_text())
    del meta["model"]["lora"]
    (full / "dasd_meta.json").write_text(json.dumps(meta))
    with pytest.raises(ConversionError, match="holds full weights"):
        resolve_checkpoint(str(full), base=moved)
    with pytest.raises(ConversionError, match="drop --adapter"):
        run_export(str(full), str(tmp_path / "w"), adapter=True)
    with pytest.raises(ConversionError, match="no LoRA metadata"):  # adapter tensors, but the metadata lost
        run_export(str(full), str(tmp_path / "w"))


def test_dasd_eval_serving_path_and_cli_base_flag(exported, tmp_path):
    """What `dasd eval --model RUN` does before serving (`eval/serving.py`): resolve the checkpoint, take its
    tokenizer, export it with `dasd export` in a subprocess. Then the CLI's --base on the checkpoint whose recorded
    base is gone, pointed at an unchanged copy."""
    from dasd_megatron.eval.serving import check_model_path, export_checkpoint, tokenizer_source

    run, ckpt = str(exported["run"]), str(exported["ckpt"])
    assert check_model_path(run) == ckpt
    assert tokenizer_source(run) == os.path.join(ckpt, "hf")
    served = export_checkpoint(ckpt, str(tmp_path / "served"))
    torch.testing.assert_close(hf_logits(served, _ids(exported["vocab"])), exported["ref"]["policy"], atol=ATOL,
                               rtol=0)
    moved = shutil.copytree(exported["base"], str(tmp_path / "moved"))
    proc = subprocess.run([sys.executable, "-m", "dasd_megatron.cli", "export", str(exported["orphan"]), "--base",
                           moved, "--teacher", "--out", str(tmp_path / "moved_teacher")],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "merged with its LoRA adapter" in proc.stdout and moved in proc.stdout
    torch.testing.assert_close(hf_logits(str(tmp_path / "moved_teacher"), _ids(exported["vocab"])),
                               exported["ref"]["ema"], atol=ATOL, rtol=0)
