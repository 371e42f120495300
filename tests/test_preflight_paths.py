"""Every input path of a run is checked before any process starts (`dasd_megatron.preflight.check_paths`):
`data.source`, `train.eval_source` (when evaluation is on) and `model.hf_config`, by `dasd train` (also with
`--nproc 2`), `dasd validate` and `dasd submit --dryrun`. One line naming the field, the value and the fix; exit 2; no
traceback. Hub ids are legitimate values, checked offline only (spelling; with the offline variables, the cache)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from dasd_megatron.config import ConfigError, RunConfig, apply_overrides
from dasd_megatron.launch.checks import check_recipe, resolve_recipe
from dasd_megatron.preflight import check_paths
from recipes.models import TINY_QWEN3

ROOT = Path(__file__).parents[1]
ENV = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
ROW = json.dumps({"question": "What is 1 + 1?", "answer": "1 + 1 = 2 #### 2"})


def cfg(*overrides: str) -> RunConfig:
    return apply_overrides(RunConfig(), [f"model.hf_config={TINY_QWEN3}", *overrides])


@pytest.fixture
def data(tmp_path) -> Path:
    f = tmp_path / "train.jsonl"
    f.write_text(ROW + "\n")
    return f


def test_existing_paths_and_hub_ids_pass(data, tmp_path):
    assert check_paths(cfg(f"data.source={data}")) == []
    assert check_paths(cfg(f"data.source={tmp_path}", "data.split=train")) == []  # a folder with the split's file
    assert check_paths(cfg(f"data.source={data}", "model.hf_config=Qwen/Qwen3-4B")) == []  # shipped config
    assert check_paths(cfg(f"data.source={data}", "model.hf_config=HuggingFaceTB/SmolLM2-135M-Instruct")) == []
    assert check_paths(cfg(), need_data=False) == []  # `dasd validate` of a layout needs no data


def test_missing_data_source_names_field_value_and_fix(tmp_path, monkeypatch):
    missing = tmp_path / "nope" / "train.jsonl"
    with pytest.raises(ConfigError) as e:
        check_paths(cfg(f"data.source={missing}"))
    assert str(e.value) == (f"data.source={str(missing)!r}: no such file or folder. Fix: check the path, or give a "
                            "hub id such as openai/gsm8k")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match=rf"data.source='./x.jsonl': no such file or folder \(relative paths are "
                                          rf"resolved from {tmp_path}\)"):
        check_paths(cfg("data.source=./x.jsonl"))
    (tmp_path / "data").mkdir()  # a path whose first folder exists here is a path, not the hub id 'data/trian'
    with pytest.raises(ConfigError, match=r"data.source='data/trian': no such file or folder"):
        check_paths(cfg("data.source=data/trian"))
    with pytest.raises(ConfigError, match=r"data.source='': no data set given. Fix: set data.source"):
        check_paths(cfg())


def test_folder_without_the_split_and_eval_source_only_when_evaluating(data, tmp_path):
    (tmp_path / "test.jsonl").write_text(ROW + "\n")
    with pytest.raises(ConfigError, match=r"train.eval_split='valid': no file in .* starts with it.*Fix: set "
                                          r"train.eval_split to a file-name prefix or train.eval_source to one file"):
        check_paths(cfg(f"data.source={data}", "train.eval_interval=2", f"train.eval_source={tmp_path}",
                        "train.eval_split=valid"))
    missing = str(tmp_path / "eval.jsonl")
    with pytest.raises(ConfigError, match=r"train.eval_source='.*eval.jsonl': no such file or folder"):
        check_paths(cfg(f"data.source={data}", "train.eval_interval=2", f"train.eval_source={missing}"))
    assert check_paths(cfg(f"data.source={data}", "train.eval_interval=0", f"train.eval_source={missing}")) == []


def test_hub_ids_are_checked_offline_only(data, tmp_path, monkeypatch):
    with pytest.raises(ConfigError, match=r"data.source='openai/gsm8k': a Hugging Face hub data set, but "
                                          r"HF_DATASETS_OFFLINE=1 and it is not in the local cache. Fix: use a local"):
        check_paths(cfg("data.source=openai/gsm8k"))
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "ds_cache"))
    (tmp_path / "ds_cache" / "openai___gsm8k").mkdir(parents=True)  # what `datasets` leaves after a download
    assert check_paths(cfg("data.source=openai/gsm8k")) == []
    (tmp_path / "ds_cache" / "BytedTsinghua-SIA___dapo-math-17k").mkdir()  # datasets' snake-cased folder name
    assert check_paths(cfg("data.source=BytedTsinghua-SIA/DAPO-Math-17k")) == []
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "0")  # online: a hub id is not looked up (no network call here)
    assert check_paths(cfg("data.source=someone/uncached")) == []
    with pytest.raises(ConfigError, match=r"data.source='a/b/c': neither an existing local path nor a Hugging Face "
                                          r"hub id \(Repo id must be in the form .*\)\. Fix: give a local path"):
        check_paths(cfg("data.source=a/b/c"))
    with pytest.raises(ConfigError, match=r"model.hf_config='nobody/no-model': a Hugging Face hub model, but "
                                          r"HF_HUB_OFFLINE=1 and it is not in the local cache"):
        check_paths(cfg(f"data.source={data}", "model.hf_config=nobody/no-model"))


def test_model_folder_must_hold_a_config(data, tmp_path):
    with pytest.raises(ConfigError, match=r"model.hf_config='.*': the folder has no config.json"):
        check_paths(cfg(f"data.source={data}", f"model.hf_config={tmp_path}"))
    with pytest.raises(ConfigError, match=r"model.hf_config='/nonexistent/model': no such folder or config.json"):
        check_paths(cfg(f"data.source={data}", "model.hf_config=/nonexistent/model"))


def test_malformed_json_line_is_found_before_start_with_on_bad_row_error(tmp_path):
    f = tmp_path / "d.jsonl"
    f.write_text(ROW + "\n{broken\n")
    assert check_paths(cfg(f"data.source={f}")) == []  # skip (the default): the line is left out at load time
    with pytest.raises(ConfigError, match=rf"data.source='{f}': line 2 of {f}: not valid JSON"):
        check_paths(cfg(f"data.source={f}", "data.on_bad_row=error"))


def test_on_cluster_missing_paths_warn_only_where_they_cannot_be_checked(data, tmp_path, caplog):
    c = cfg("data.source=/cluster-only-fs/me/train.jsonl")
    warnings = check_paths(c, on_cluster=True)
    assert len(warnings) == 1 and "data.source='/cluster-only-fs/me/train.jsonl': not on this machine" in warnings[0]
    assert warnings[0] in caplog.text
    with pytest.raises(ConfigError, match="no such file or folder"):  # its folder is here: the file is really missing
        check_paths(cfg(f"data.source={tmp_path / 'missing.jsonl'}"), on_cluster=True)
    with pytest.raises(ConfigError, match="no such file or folder"):
        check_paths(c)  # `dasd train` / `dasd validate` run here: strict
    recipe = resolve_recipe("smollm2_135m_dasd_cpu", [f"data.source={tmp_path / 'missing.jsonl'}"])
    with pytest.raises(ConfigError, match=r"data.source='.*missing.jsonl': no such file or folder"):
        check_recipe(recipe)
    local = resolve_recipe("smollm2_135m_dasd_cpu", ["data.source=/cluster-only-fs/me/train.jsonl"])
    assert any("not on this machine" in w for w in check_recipe(local))  # warned
    with pytest.raises(ConfigError, match="no such file or folder"):
        check_recipe(local, on_cluster=False)


def _dasd(*args, timeout=240, cwd=ROOT):
    t0 = time.perf_counter()
    r = subprocess.run([sys.executable, "-m", "dasd_megatron.cli", *args], capture_output=True, text=True,
                       timeout=timeout, env=ENV, cwd=cwd)
    return r, time.perf_counter() - t0


def _one_line(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.startswith("dasd:")]
    assert len(lines) == 1, stderr
    assert "Traceback" not in stderr and "torch.distributed" not in stderr and "ChildFailedError" not in stderr, stderr
    return lines[0]


def test_cli_entry_points_fail_before_any_process_starts(tmp_path):
    missing = str(tmp_path / "missing" / "train.jsonl")
    want = f"dasd: config error: data.source={missing!r}: no such file or folder. Fix: check the path"
    r, _ = _dasd("train", "--nproc", "2", f"data.source={missing}", f"model.hf_config={TINY_QWEN3}",
                 f"run_dir={tmp_path / 'run'}")
    assert r.returncode == 2 and _one_line(r.stderr).startswith(want)
    assert not (tmp_path / "run").exists()  # nothing started, nothing written
    r, _ = _dasd("validate", "--world-size", "2", f"data.source={missing}")
    assert r.returncode == 2 and _one_line(r.stderr).startswith(want)
    r, _ = _dasd("submit", "--recipe", "smollm2_135m_dasd_cpu", "--executor", "local", "--dryrun",
                 f"train.eval_source={tmp_path / 'eval.jsonl'}", f"run_dir={tmp_path / 'run'}")
    assert r.returncode == 2
    assert _one_line(r.stderr).startswith(f"dasd: config error: train.eval_source='{tmp_path / 'eval.jsonl'}': no "
                                          "such file or folder")
    r, _ = _dasd("train", "--recipe", "smollm2_135m_dasd_cpu", "data.source=openai/gsm8k")
    assert r.returncode == 2 and "HF_DATASETS_OFFLINE=1 and it is not in the local cache" in _one_line(r.stderr)


def test_data_error_inside_train_is_one_line(tmp_path, monkeypatch, capsys, data):
    """A data error that only loading can find (a bad row with data.on_bad_row=error) is a one-line error too."""
    from dasd_megatron import cli
    from dasd_megatron.data import BadRowError
    from dasd_megatron.train import loop

    def train(cfg):
        raise BadRowError(3, "answer", "gold answer is missing or empty", "repair or remove row 3")

    monkeypatch.setattr(loop, "train", train)
    # a hub model (its shipped config): the preflight does not look for its weights, so the run reaches `train`
    assert cli.main(["train", f"data.source={data}", "model.hf_config=HuggingFaceTB/SmolLM2-135M-Instruct"]) == 2
    err = capsys.readouterr().err
    assert err == ("dasd: config error: row 3: field 'answer': gold answer is missing or empty. Fix: repair or remove "
                   "row 3\n")


def test_check_paths_does_not_touch_the_network(data, monkeypatch):
    """With the offline variables unset, hub ids are only spelled out, never requested (no hang without network)."""
    import socket

    def no_network(*a, **k):
        raise AssertionError("check_paths opened a network connection")

    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "0")
    monkeypatch.setattr(socket.socket, "connect", no_network)
    c = cfg("data.source=someone/data", "model.hf_config=someone/model")
    assert check_paths(c) == []
