"""One preflight (`dasd_megatron.preflight.preflight`) for every entry point: what the trainer refuses at start is
refused by `dasd validate`, `dasd submit` (dry runs included) and `dasd train` before any process starts, with the
trainer's own message, in one line, exit status 2. Every registered recipe passes it at its own world size."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from dasd_megatron.config import ConfigError
from dasd_megatron.launch.checks import resolve_recipe
from dasd_megatron.model.hf_config import tiny_config
from dasd_megatron.preflight import check_model_files, preflight
from dasd_megatron.train.dasd_step import check_supported
from recipes import get_recipe, list_recipes
from recipes.models import TINY_QWEN3
import test_preflight_paths
from test_preflight_paths import ENV, cfg

ROOT = Path(__file__).parents[1]
data = test_preflight_paths.data  # the fixture: a one-row training file
NO_WEIGHTS = r"model.hf_config='.*': the folder has a config.json but no weights.*Fix: .*`dasd smoke`"


@pytest.fixture
def config_only(tmp_path) -> Path:
    """A model folder with a config.json and nothing else (random weights: what `dasd smoke` builds)."""
    d = tmp_path / "config_only"
    d.mkdir()
    (d / "config.json").write_text(json.dumps(tiny_config("qwen3", num_hidden_layers=2)))
    return d


# -- every recipe ------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", list_recipes())
def test_every_recipe_passes_the_preflight_at_its_world_size(name, monkeypatch):
    """GPU recipes as on their GPU image (Transformer Engine there), training on DAPO-Math-17k by hub name (reachable
    there; offline here, `dasd submit` only warns). The tiny recipes' model is a config-only folder: they run as
    smoke jobs; training refuses them."""
    recipe = get_recipe(name)
    c, world = recipe.config, recipe.trainer.world_size
    te = True if recipe.trainer.accelerator == "gpu" else None
    assert preflight(c, world, job="smoke", te_available=te) == []
    if name.startswith("tiny_qwen3_"):
        with pytest.raises(ConfigError, match=NO_WEIGHTS):
            preflight(c, world, te_available=te, need_data=False)
        assert preflight(c, world, te_available=te, need_data=False, need_weights=False) == []
        return
    if recipe.trainer.accelerator == "gpu":
        assert len(preflight(c, world, te_available=te, on_cluster=True)) == 1  # offline here: a warning
        monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
        monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    assert preflight(c, world, te_available=te) == []  # the complete training preflight


# -- the trainer's rules -----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("overrides", [
    ["train.updates_per_batch=100000"],
    ["optim.lr_schedule=cosine", "optim.warmup_steps=10", "train.steps=5"],  # the decay ends inside the warm-up
])
def test_the_trainer_rules_fail_with_the_trainers_message(overrides, data):
    c = cfg(f"data.source={data}", *overrides)
    with pytest.raises(ConfigError) as trainer:
        check_supported(c, 2)
    with pytest.raises(ConfigError) as pre:
        preflight(c, 2, need_weights=False)
    assert str(pre.value) == str(trainer.value)
    assert preflight(c, 2, job="smoke") == []  # `dasd smoke` never runs the DASD step: its rules do not apply


def test_layout_is_checked_before_the_paths(tmp_path):
    """A config with a bad layout and a missing data file reports the layout (what every rank would hit first)."""
    c = cfg(f"data.source={tmp_path / 'missing.jsonl'}", "parallel.tensor=3")
    with pytest.raises(ConfigError, match=r"parallel.tensor=3: must divide the model's num_attention_heads"):
        preflight(c, 3)
    with pytest.raises(ConfigError, match=r"data.source='.*missing.jsonl': no such file or folder"):
        preflight(cfg(f"data.source={tmp_path / 'missing.jsonl'}"), 2)
    assert preflight(cfg(f"data.source={tmp_path / 'missing.jsonl'}"), 2, job="smoke") == []  # smoke reads no data


# -- model folders -----------------------------------------------------------------------------------------------------

def _save_weights(folder: Path) -> None:
    from safetensors.torch import save_file
    import torch

    save_file({"model.embed_tokens.weight": torch.zeros(4, 2)}, str(folder / "model.safetensors"))


def test_model_folder_without_weights_is_refused_for_training_only(config_only, data):
    with pytest.raises(ConfigError, match=NO_WEIGHTS):
        preflight(cfg(f"data.source={data}", f"model.hf_config={config_only}"), 1)
    # random weights from a config-only folder are what `dasd smoke` (and `dasd validate` of a layout) use
    assert preflight(cfg(f"model.hf_config={config_only}"), 1, job="smoke") == []
    assert preflight(cfg(f"model.hf_config={config_only}"), 1, need_data=False, need_weights=False) == []
    # a config.json file is a config, not a model to train from
    with pytest.raises(ConfigError, match=r"model.hf_config='.*config.json': a config.json file, but training"):
        check_model_files(str(config_only / "config.json"))


def test_model_folder_needs_safetensors_and_a_tokenizer(config_only):
    (config_only / "pytorch_model.bin").write_bytes(b"")  # weights, but not in a form the trainer imports
    with pytest.raises(ConfigError, match=r"model.hf_config='.*': no safetensors weights in .* \(found "
                                          r"pytorch_model.bin: re-save with transformers' save_pretrained"):
        check_model_files(str(config_only))
    (config_only / "pytorch_model.bin").unlink()
    (config_only / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {"model.embed_tokens.weight": "model-00001-of-00002.safetensors"}}))
    with pytest.raises(ConfigError, match=r"lists 1 missing weight file\(s\): model-00001-of-00002.safetensors"):
        check_model_files(str(config_only))
    (config_only / "model.safetensors.index.json").unlink()
    _save_weights(config_only)
    with pytest.raises(ConfigError, match=r"the folder has no tokenizer"):
        check_model_files(str(config_only))
    (config_only / "tokenizer.json").write_text("{}")
    check_model_files(str(config_only))  # weights and a tokenizer: what the trainer loads
    check_model_files("Qwen/Qwen3-4B")  # a hub id: fetched or materialised by the trainer, nothing to check here


# -- the entry points, as a user runs them -----------------------------------------------------------------------------

def _dasd(*args, timeout=240):
    t0 = time.perf_counter()
    r = subprocess.run([sys.executable, "-m", "dasd_megatron.cli", *args], capture_output=True, text=True,
                       timeout=timeout, env=ENV, cwd=ROOT)
    return r, time.perf_counter() - t0


def _one_line(r: subprocess.CompletedProcess) -> str:
    """The single `dasd:` error line of a command that exited 2 without a traceback or a torchrun rank."""
    assert r.returncode == 2, r.stderr[-3000:]
    lines = [line for line in r.stderr.splitlines() if line.startswith("dasd:")]
    assert len(lines) == 1, r.stderr  # two ranks would print two
    for marker in ("Traceback", "torch.distributed", "ChildFailedError"):
        assert marker not in r.stderr, r.stderr
    return lines[0]


def test_submit_and_validate_refuse_what_the_trainer_refuses(tmp_path):
    recipe = resolve_recipe("smollm2_135m_dasd_cpu", ["train.updates_per_batch=100000"])
    with pytest.raises(ConfigError) as trainer:
        check_supported(recipe.config, recipe.trainer.world_size)
    want = f"dasd: config error: {trainer.value}"
    r, _ = _dasd("submit", "--recipe", "smollm2_135m_dasd_cpu", "--executor", "local", "--dryrun",
                 "train.updates_per_batch=100000", f"run_dir={tmp_path / 'run'}")
    assert _one_line(r).startswith(want) and r.stdout == ""
    r, _ = _dasd("validate", "--world-size", "2", f"model.hf_config={TINY_QWEN3}", "train.prompts_per_step=8",
                 "train.samples_per_prompt=4", "train.updates_per_batch=100000", f"run_dir={tmp_path / 'run'}")
    assert _one_line(r) == want  # the same world size and batch: the same words
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("problem", ["missing data", "model without weights"])
def test_train_fails_in_one_line_before_any_process_starts(problem, tmp_path, data, config_only):
    if problem == "missing data":
        model, source = TINY_QWEN3, tmp_path / "missing" / "train.jsonl"
        want = f"dasd: config error: data.source={str(source)!r}: no such file or folder"
    else:
        model, source = config_only, data
        want = f"dasd: config error: model.hf_config={str(model)!r}: the folder has a config.json but no weights"
    r, seconds = _dasd("train", "--nproc", "2", "parallel.tensor=2", f"model.hf_config={model}",
                       f"data.source={source}", f"run_dir={tmp_path / 'run'}")
    assert _one_line(r).startswith(want)
    assert not (tmp_path / "run").exists() and seconds < 60  # no rank started, nothing written


def test_fused_triton_kernels_need_a_cuda_job(tmp_path):
    """`model.fused_kernels=triton` is refused up front where the job computes on CPUs (here), accepted for a GPU
    recipe submitted from here (its job runs on CUDA), and 'auto' resolves per device (torch here)."""
    c = cfg("model.fused_kernels=triton")
    with pytest.raises(ConfigError, match=r"model.fused_kernels='triton': Triton kernels need a CUDA device"):
        preflight(c, 2, job="smoke", cuda_available=False)
    assert preflight(c, 2, job="smoke", cuda_available=True) == []
    gpu = resolve_recipe("qwen3_1p7b_dasd_1node_h100_bf16", ["model.fused_kernels=triton"])
    assert gpu.trainer.accelerator == "gpu"
    from dasd_megatron.launch.checks import check_recipe

    check_recipe(gpu, job="smoke")  # submitted from this CPU host: the job's CUDA decides, not this host's
    r, _ = _dasd("validate", "--world-size", "1", "model.fused_kernels=triton", f"run_dir={tmp_path / 'run'}")
    assert _one_line(r).startswith("dasd: config error: model.fused_kernels='triton'")


def test_async_rollouts_are_refused_for_colocated_servers(tmp_path):
    """Colocated servers release their memory while the trainer trains, so they cannot generate ahead: a colocated
    recipe with `rollout.max_staleness=1` fails `dasd submit --dryrun` in one line naming the field and the fix,
    and the separate-rollout-node recipe ships with it."""
    r, _ = _dasd("submit", "--recipe", "qwen3_1p7b_dasd_1node_h100_bf16", "--dryrun", "rollout.max_staleness=1",
                 f"run_dir={tmp_path / 'run'}")
    line = _one_line(r)
    assert line.startswith("dasd: config error: rollout.max_staleness=1: colocated servers") and "Fix:" in line
    assert resolve_recipe("qwen3_8b_dasd_2node_2rollout_h100_bf16", []).config.rollout.max_staleness == 1
    assert resolve_recipe("qwen3_4b_dasd_2node_h100_bf16", []).config.rollout.max_staleness == 0
    with pytest.raises(ConfigError, match=r"rollout.max_staleness=-1: must be an integer >= 0"):
        cfg("rollout.max_staleness=-1")
