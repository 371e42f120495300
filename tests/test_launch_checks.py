"""A bad recipe fails before anything is submitted or written, with the field, the rule and the fix."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from dasd_megatron.config import ConfigError
from dasd_megatron.launch.checks import check_recipe, resolve_recipe
from dasd_megatron.launch.executors import SlurmSettings
from dasd_megatron.launch.submit import submit
from recipes.smollm2 import EASY_ARITHMETIC as EASY

SLURM = SlurmSettings(account="acct", partition="batch", packager="none")
# the GPU recipes leave data.source to the user and a train job needs one: a cluster path (warned about, not here)
CLUSTER_DATA = "data.source=/cluster-only-fs/data/train.jsonl"


@pytest.mark.parametrize("overrides,match", [
    (["parallel.tensr=2"], r"parallel.tensr: unknown field 'tensr'.*Fix: use one of"),
    (["trainer.gpus=4"], r"trainer.gpus: unknown field 'gpus' of TrainerResources"),
    (["placement.servers=4"], r"placement.servers: unknown field 'servers' of RolloutPlacement"),
    (["loss.rho=1.5"], r"loss.rho=1.5: must satisfy 0 < rho < 1"),
])
def test_unknown_or_invalid_field(overrides, match):
    with pytest.raises(ConfigError, match=match):
        resolve_recipe("qwen3_8b_dasd_2node_2rollout_h100_bf16", overrides)


@pytest.mark.parametrize("name,overrides,match", [
    # 2 trainer nodes x 8 GPUs = 16 processes cannot hold TP 4 x CP 2 x DP 4 = 32
    ("qwen3_8b_dasd_2node_2rollout_h100_bf16", ["parallel.data=4"],
     r"world size 16 != tensor\*pipeline\*context\*data = 32.*trainer.nodes 2 x trainer.procs_per_node 8"),
    # one node (8 GPUs) cannot hold TP 4 x CP 2 x PP 2 = 16
    ("qwen3_8b_dasd_2node_2rollout_h100_bf16", ["trainer.nodes=1", "parallel.pipeline=2"],
     r"world size 8 is not divisible by tensor\*pipeline\*context=16"),
    ("qwen3_4b_dasd_2node_h100_bf16", ["parallel.tensor=3"], r"world size 16 is not divisible"),
    ("qwen3_1p7b_dasd_1node_h100_bf16", ["placement.tensor_parallel=2"],
     r"8 servers x tensor_parallel 2 = 16 GPUs, but each trainer node has 8"),
    ("qwen3_8b_dasd_2node_2rollout_h100_bf16", ["placement.servers_per_node=8"],
     r"= 16 GPUs, but each rollout node has 8"),
    ("smollm2_135m_dasd_cpu", ["placement.mode=colocated"], r"SGLang servers need GPUs"),
    ("smollm2_135m_dasd_cpu", ["model.seq_length=32"], r"a packed micro-batch must fit model.seq_length=32"),
])
def test_impossible_layout_for_the_nodes(name, overrides, match):
    recipe = resolve_recipe(name, [CLUSTER_DATA, *overrides])
    with pytest.raises(ConfigError, match=match):
        check_recipe(recipe)


def test_submit_refuses_before_writing_anything(tmp_path):
    run_dir = tmp_path / "run"
    bad = resolve_recipe("qwen3_4b_dasd_2node_h100_bf16", ["parallel.tensor=3", f"run_dir={run_dir}"])
    with pytest.raises(ConfigError, match="parallel"):
        submit(bad, executor="slurm", slurm=SLURM, experiments_dir=str(tmp_path / "exp"))
    two_nodes = resolve_recipe("qwen3_4b_dasd_2node_h100_bf16", [f"run_dir={run_dir}", f"data.source={EASY}"])
    with pytest.raises(ConfigError, match="needs 2 nodes.*local executor runs on this machine only"):
        submit(two_nodes, executor="local", experiments_dir=str(tmp_path / "exp"))
    in_container = SlurmSettings(account="acct", packager="none", container_image="img", container_mounts=("/lustre:/lustre",))
    with pytest.raises(ConfigError, match="not inside any container mount"):
        submit(two_nodes, executor="slurm", slurm=in_container, experiments_dir=str(tmp_path / "exp"))
    assert not run_dir.exists() and not (tmp_path / "exp").exists()
    with pytest.raises(ConfigError, match="SLURM needs an account"):
        SlurmSettings(account="")


def test_cli_reports_config_errors_with_status_2(tmp_path):
    env = dict(os.environ, NEMORUN_HOME=str(tmp_path / "home"))
    r = subprocess.run([sys.executable, "-W", "ignore", "-m", "dasd_megatron.launch", "submit", "--recipe",
                        "qwen3_8b_dasd_2node_2rollout_h100_bf16", "--account", "a", "--dryrun", "parallel.data=4",
                        f"run_dir={tmp_path / 'run'}"], capture_output=True, text=True, timeout=120, env=env)
    assert r.returncode == 2, r.stderr[-2000:]
    assert "dasd: config error: parallel.data=4" in r.stderr and "Fix:" in r.stderr
    assert r.stdout == "" and not (tmp_path / "run").exists() and not (tmp_path / "home").exists()
