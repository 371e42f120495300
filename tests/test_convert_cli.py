"""`tools/convert_hf.py` as users run it: help, a full import/export through the real command line (bf16 output,
several shards, transformers loads the result), torchrun with TP=2, and bad input: a one-line error with the fix,
exit code 1, and nothing half-written left behind (also when the failure happens half-way through writing)."""

from __future__ import annotations

import glob
import json
import os
import subprocess
import sys

import pytest
import torch

from dasd_megatron.testing.distributed import free_port, run_distributed
from hf_fixtures import assert_bytes_equal, make_tiny_hf, read_safetensors
from tools.convert_hf import main

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOOL = os.path.join(REPO, "tools", "convert_hf.py")


def _cli(*args, timeout=180):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, TOOL, *args], capture_output=True, text=True, timeout=timeout, env=env)


def _leftovers(parent: str, name: str) -> list[str]:
    return glob.glob(os.path.join(parent, name)) + glob.glob(os.path.join(parent, f".{name}.partial-*"))


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    return make_tiny_hf(str(tmp_path_factory.mktemp("cli") / "llama"), "llama", seed=3)


def test_help_explains_both_directions():
    r = _cli("--help")
    assert r.returncode == 0
    for word in ("import", "export", "safetensors", "dist", "torchrun", "--tp"):
        assert word in r.stdout, word
    for sub in ("import", "export"):
        r = _cli(sub, "--help")
        assert r.returncode == 0 and "--dtype" in r.stdout and "--overwrite" in r.stdout


def test_cli_import_export_bf16_sharded_loads_in_transformers(tmp_path, hf_dir):
    ck, out = str(tmp_path / "ckpt"), str(tmp_path / "hf_out")
    r = _cli("import", hf_dir, ck)
    assert r.returncode == 0, r.stderr
    assert os.path.isfile(os.path.join(ck, "metadata.json")) and os.path.isfile(os.path.join(ck, "hf", "config.json"))
    r = _cli("export", ck, out, "--dtype", "bfloat16", "--max-shard-size", "100KB")
    assert r.returncode == 0, r.stderr
    assert "MB/s" in r.stderr
    shards = sorted(glob.glob(os.path.join(out, "model-*.safetensors")))
    assert len(shards) > 3 and all(os.path.getsize(s) < 100_000 + 70_000 for s in shards)
    original = read_safetensors(hf_dir)
    assert_bytes_equal(read_safetensors(out), {k: v.to(torch.bfloat16) for k, v in original.items()}, "bf16 export")
    assert json.load(open(os.path.join(out, "config.json")))["dtype"] == "bfloat16"
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        assert open(os.path.join(out, name), "rb").read() == open(os.path.join(hf_dir, name), "rb").read(), name

    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.dtype == torch.bfloat16
    sd = model.state_dict()
    for k, v in original.items():
        assert torch.equal(sd[k], v.to(torch.bfloat16)), k
    assert AutoTokenizer.from_pretrained(out)("w3 w7")["input_ids"] == [3, 7]
    # --overwrite replaces an existing output (at the very end).
    r = _cli("export", ck, out, "--overwrite")
    assert r.returncode == 0, r.stderr
    assert_bytes_equal(read_safetensors(out), original, "fp32 overwrite")


def test_torchrun_export_at_tp2(tmp_path, hf_dir):
    ck, out = str(tmp_path / "ckpt"), str(tmp_path / "out")
    assert _cli("import", hf_dir, ck).returncode == 0
    env = dict(os.environ, OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                        str(free_port()), TOOL, "export", ck, out, "--tp", "2"],
                       capture_output=True, text=True, timeout=240, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    assert_bytes_equal(read_safetensors(out), read_safetensors(hf_dir), "torchrun TP2 export")


def _error_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0, f"expected one line, got:\n{err}"
    return err


def _broken_copy(src, dst, how):
    import shutil

    shutil.copytree(src, dst)
    st = os.path.join(dst, "model.safetensors")
    cfg = os.path.join(dst, "config.json")
    if how == "missing":
        os.remove(st)
    elif how == "corrupt":
        data = open(st, "rb").read()
        open(st, "wb").write(data[: len(data) // 3])
    elif how == "shape":
        json.dump({**json.load(open(cfg)), "hidden_size": 96}, open(cfg, "w"))
    elif how == "arch":
        json.dump({**json.load(open(cfg)), "model_type": "gemma"}, open(cfg, "w"))
    return str(dst)


@pytest.mark.parametrize("how,expect", [
    ("missing", "no safetensors weights"),
    ("corrupt", "not a readable safetensors file"),
    ("shape", "shape mismatch"),
    ("arch", "model_type='gemma'"),
])
def test_bad_import_input(tmp_path, hf_dir, capsys, how, expect):
    bad = _broken_copy(hf_dir, tmp_path / "bad", how)
    assert main(["import", bad, str(tmp_path / "ck")]) == 1
    line = _error_line(capsys)
    assert line.startswith("convert_hf.py import: error:") and expect in line and "Fix" in line, line
    assert _leftovers(str(tmp_path), "ck") == []


def test_existing_output_and_not_a_checkpoint(tmp_path, hf_dir, capsys):
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "keep.txt").write_text("mine")
    assert main(["import", hf_dir, str(tmp_path / "taken")]) == 1
    assert "already exists" in _error_line(capsys)
    assert main(["export", hf_dir, str(tmp_path / "x")]) == 1
    assert "is a Hugging Face folder already" in _error_line(capsys)
    (tmp_path / "empty").mkdir()
    assert main(["export", str(tmp_path / "empty"), str(tmp_path / "x")]) == 1
    assert "nor a megatron distributed checkpoint" in _error_line(capsys)
    assert (tmp_path / "taken" / "keep.txt").read_text() == "mine"
    r = _cli("export", str(tmp_path / "nope"), str(tmp_path / "y"))  # the real process exit code
    assert r.returncode == 1 and r.stderr.strip().count("\n") == 0 and "Fix" in r.stderr, r.stderr


def _fail_half_way(rank, world_size, hf_dir, root, other_hf):
    """Failures after the temporary folder exists: it must be removed and the output never appear."""
    from unittest import mock

    import dasd_megatron.model.convert as cli
    from dasd_megatron.model.export import SafetensorsShardWriter
    from dasd_megatron.model.hf_mapping import ConversionError

    errors = []
    with mock.patch.object(cli, "copy_aux_files", side_effect=OSError("disk full")):
        try:
            cli.run_import(hf_dir, f"{root}/ck_fail")
        except OSError as e:
            errors.append(str(e))
    cli.run_import(hf_dir, f"{root}/ck")
    real_add, calls = SafetensorsShardWriter.add, []

    def add_then_fail(self, name, tensor):
        calls.append(name)
        if len(calls) > 5:
            raise OSError("disk full")
        real_add(self, name, tensor)

    with mock.patch.object(SafetensorsShardWriter, "add", add_then_fail):
        try:
            cli.run_export(f"{root}/ck", f"{root}/out_fail", max_shard_size="20KB")
        except OSError as e:
            errors.append(str(e))
    try:  # a checkpoint of another model: the load error becomes one line with the fix
        cli.run_export(f"{root}/ck", f"{root}/out_wrong", hf_config=other_hf)
    except ConversionError as e:
        errors.append(str(e))
    return errors


def test_failures_half_way_leave_nothing_behind(tmp_path, hf_dir):
    other = make_tiny_hf(str(tmp_path / "other_qwen3"), "qwen3")
    root = str(tmp_path / "work")
    os.makedirs(root)
    errors = run_distributed(_fail_half_way, 1, hf_dir, root, other)[0]
    assert errors[:2] == ["disk full", "disk full"], errors
    # the tiny qwen3 "other" model has other shapes: the error names the first mismatching tensors
    assert "does not hold the model that" in errors[2], errors[2]
    assert "Fix" in errors[2] and "\n" not in errors[2], errors[2]
    assert sorted(os.listdir(root)) == ["ck"], os.listdir(root)  # no ck_fail, out_fail, out_wrong or .partial-*
