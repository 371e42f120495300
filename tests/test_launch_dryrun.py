"""Dry-run sbatch scripts of the multi-node recipes carry the essentials: nodes, tasks, GPUs, torchrun rendezvous,
het groups for separate rollout nodes, and the environment — and they are valid bash."""

from __future__ import annotations

import io
import re
import subprocess

import pytest

from dasd_megatron.launch.checks import resolve_recipe
from dasd_megatron.launch.executors import SlurmSettings
from dasd_megatron.launch.submit import submit

CLUSTER = SlurmSettings(account="acct", partition="batch", time="02:00:00", packager="none",
                        container_image="nvcr.io/acme/dasd:1", container_mounts=("/lustre:/lustre",),
                        socket_ifname="ib0")


@pytest.fixture(autouse=True)
def no_stdin(monkeypatch):
    """nemo-run's packaging runs shell commands through `invoke`, which mirrors stdin; pytest forbids reading it."""
    monkeypatch.setattr("sys.stdin", io.StringIO(""))


DATA = "/lustre/data/dapo-math-17k.jsonl"
"""The GPU recipes leave data.source to the user; a train job needs one (a cluster path: warned about, not here)."""


def dryrun(name, job="train", overrides=(), settings=CLUSTER, executor="slurm"):
    data = [f"data.source={DATA}"] if job == "train" else []
    recipe = resolve_recipe(name, [*data, *overrides, f"run_dir=/lustre/runs/{name}"])
    sub = submit(recipe, executor=executor, job=job, slurm=settings if executor == "slurm" else None, dryrun=True)
    assert sub.dryrun and sub.script
    return sub.script


def sbatch_flags(script):
    return re.findall(r"^#SBATCH (.*)$", script, flags=re.M)


def srun_lines(script):
    return [line for line in script.splitlines() if line.startswith("srun ")]


def evaluated_env(script, **env):
    """Run the script's `export` lines in bash with the given SLURM variables; return what they set."""
    exports = "\n".join(dict.fromkeys(line for line in script.splitlines() if line.startswith("export DASD_")))
    preset = "".join(f"{k}={v}\n" for k, v in env.items())
    out = subprocess.run(["bash", "-c", f"{preset}{exports}\nenv"], capture_output=True, text=True, check=True).stdout
    return dict(line.split("=", 1) for line in out.splitlines() if line.startswith("DASD_"))


def assert_valid_bash(script, tmp_path):
    path = tmp_path / "script.sh"
    path.write_text(script)
    r = subprocess.run(["bash", "-n", str(path)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


def test_two_node_colocated(tmp_path):
    script = dryrun("qwen3_4b_dasd_2node_h100_bf16")
    flags = sbatch_flags(script)
    for flag in ("--nodes=2", "--ntasks-per-node=1", "--gpus-per-node=8", "--exclusive", "--account=acct",
                 "--partition=batch", "--time=02:00:00"):
        assert flag in flags, (flag, flags)
    assert "hetjob" not in flags
    for line in ("export NCCL_CUMEM_ENABLE=0", "export NCCL_SOCKET_IFNAME=ib0", "export GLOO_SOCKET_IFNAME=ib0",
                 "export CUDA_DEVICE_MAX_CONNECTIONS=1", "export DASD_RDZV_HOST=$head_node_ip",
                 "export DASD_RUN_DIR=/lustre/runs/qwen3_4b_dasd_2node_h100_bf16"):
        assert line in script, line
    (srun,) = srun_lines(script)
    assert "--container-image nvcr.io/acme/dasd:1" in srun and "/lustre:/lustre" in srun
    # colocated: one inline task per node starts this node's servers, then torchrun over both nodes
    body = script[script.index("(run by the srun above)"):]
    assert body.index("dasd_megatron.launch.rollout_node --run-dir /lustre/runs/") < body.index("torch.distributed.run")
    assert re.search(r"--nnodes=2 --nproc-per-node=8 --rdzv-backend=c10d "
                     r"\"--rdzv-endpoint=\$DASD_RDZV_HOST:\$DASD_RDZV_PORT\" \"--rdzv-id=\$SLURM_JOB_ID\" "
                     r"-m dasd_megatron.cli train --recipe qwen3_4b_dasd_2node_h100_bf16 "
                     rf"data.source={DATA} run_dir=", body)
    env = evaluated_env(script, SLURM_JOB_ID=12345, head_node_ip="10.0.0.7")
    assert (env["DASD_RDZV_HOST"], env["DASD_RDZV_PORT"], env["DASD_PORT_OFFSET"]) == ("10.0.0.7", "22345", "4500")
    assert_valid_bash(script.split("\n# ---- ")[0], tmp_path)


def test_separate_rollout_nodes_make_a_heterogeneous_job(tmp_path):
    script = dryrun("qwen3_8b_dasd_2node_2rollout_h100_fp8")
    flags = sbatch_flags(script)
    assert flags.count("hetjob") == 1
    trainer, rollout = "\n".join(flags).split("hetjob")
    for group in (trainer, rollout):
        for flag in ("--nodes=2", "--ntasks-per-node=1", "--gpus-per-node=8", "--exclusive"):
            assert flag in group, (flag, group)
    assert "export DASD_RDZV_HOST=$het_group_host_0" in script
    group0, group1 = srun_lines(script)
    assert group0.startswith("srun --het-group=0") and group1.startswith("srun --het-group=1")
    assert "--nnodes=2 --nproc-per-node=8 --rdzv-backend=c10d" in group0
    assert "-m dasd_megatron.cli train --recipe qwen3_8b_dasd_2node_2rollout_h100_fp8" in group0
    assert "-m dasd_megatron.launch.rollout_node --run-dir /lustre/runs/" in group1 and "torch.distributed" not in group1
    env = evaluated_env(script, SLURM_JOB_ID=7, het_group_host_0="gpu-a01")
    assert env["DASD_RDZV_HOST"] == "gpu-a01" and env["DASD_RDZV_PORT"] == "20007"
    assert_valid_bash(script, tmp_path)


def test_smoke_job_has_no_rollout_nodes_and_passes_the_whole_config():
    script = dryrun("qwen3_8b_dasd_2node_2rollout_h100_fp8", job="smoke")
    assert "hetjob" not in sbatch_flags(script) and "--nodes=2" in sbatch_flags(script)
    (srun,) = srun_lines(script)
    assert "rollout_node" not in srun
    for arg in ("smoke --steps 8", "precision.fp8=hybrid", "model.attention_backend=te", "parallel.tensor=4",
                "parallel.context=2", "parallel.sequence_parallel=true", "/recipes/hf_configs/Qwen3-8B"):
        assert arg in srun, arg


def test_single_node_uses_standalone_rendezvous():
    script = dryrun("qwen3_1p7b_grpo_1node_h100_bf16", job="smoke")
    assert "--nodes=1" in sbatch_flags(script)
    (srun,) = srun_lines(script)
    assert "--nnodes=1 --nproc-per-node=8 --standalone" in srun and "rdzv-endpoint" not in srun
    assert "loss.router_mode=constant" in srun and "loss.beta=0.0" in srun


def test_local_dryrun_prints_the_command_and_writes_nothing(tmp_path):
    recipe = resolve_recipe("tiny_qwen3_dasd_cpu", [f"run_dir={tmp_path / 'run'}"])
    sub = submit(recipe, executor="local", job="smoke", dryrun=True, smoke_steps=3)
    assert "-m torch.distributed.run --nnodes=1 --nproc-per-node=2 --standalone -m dasd_megatron.cli smoke" in sub.script
    assert "--steps 3" in sub.script and "parallel.tensor=2" in sub.script and "OMP_NUM_THREADS=1" in sub.script
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("settings", [SlurmSettings(account="acct", packager="none")])
def test_no_container_runs_in_the_job_folder(settings):
    (srun,) = srun_lines(dryrun("qwen3_1p7b_dasd_1node_h100_bf16", job="smoke", settings=settings))
    assert "--chdir" in srun and "--container-image" not in srun


def test_job_commands_rebuild_the_checked_recipe():
    from dasd_megatron.launch.command import dasd_args
    from dasd_megatron.launch.submit import smoke_model_path

    recipe = resolve_recipe("qwen3_4b_dasd_2node_h100_bf16", ["trainer.nodes=4", "placement.servers_per_node=4",
                                                               "train.steps=5", "parallel.context=4"])
    args = dasd_args(recipe, "train")
    assert args[:3] == ["train", "--recipe", "qwen3_4b_dasd_2node_h100_bf16"]
    assert resolve_recipe(recipe.name, args[3:]) == recipe  # what `dasd train --recipe` will rebuild
    assert "trainer.nodes=4" in args and "placement.servers_per_node=4" in args
    git = SlurmSettings(account="a", packager="git")
    assert smoke_model_path(recipe, git) == "recipes/hf_configs/Qwen3-4B"  # inside the shipped code
    assert smoke_model_path(recipe, None).endswith("/recipes/hf_configs/Qwen3-4B")
