"""Every recipe builds, validates against its own world size and writes a config that reads back; the registry,
the shipped model shapes and the method table hold what they claim."""

from __future__ import annotations

import dataclasses
import json

import pytest

from dasd_megatron.config import ConfigError, RunConfig, apply_overrides, from_dict, to_dict
from dasd_megatron.launch.checks import architecture, check_recipe, resolve_recipe, write_run_files
from dasd_megatron.launch.command import config_overrides
from recipes import get_recipe, list_recipes
from recipes.methods import loss_for
from recipes.models import resolve_hf_config

ALL = list_recipes()


def test_registry_lists_every_size_method_and_precision():
    for size in ("1p7b", "4b", "8b"):
        for method in ("dasd", "grpo", "opsd"):
            assert [n for n in ALL if n.startswith(f"qwen3_{size}_{method}_") and n.endswith("_bf16")], (size, method)
    assert "qwen3_4b_dasd_2node_h100_bf16" in ALL and "tiny_qwen3_dasd_cpu" in ALL
    assert {n for n in ALL if n.endswith("_fp8")} == {"qwen3_4b_dasd_2node_h100_fp8",
                                                      "qwen3_8b_dasd_2node_2rollout_h100_fp8"}
    with pytest.raises(ConfigError, match=r"not registered.*did you mean.*qwen3_4b_dasd_2node_h100_bf16"):
        get_recipe("qwen3_4b_dasd_2nodes_h100_bf16")


@pytest.mark.parametrize("name", ALL)
def test_recipe_validates_and_writes_its_config(name, tmp_path, monkeypatch):
    recipe = get_recipe(name)
    assert recipe.name == name and recipe.description
    assert isinstance(recipe.config, RunConfig)
    fp8 = recipe.config.precision.fp8 is not None
    te = True if fp8 else None
    assert check_recipe(recipe, te_available=te, job="smoke") == []  # raises on any layout/placement problem
    if name.startswith("tiny_qwen3_"):  # a config-only model (random weights): a smoke recipe, refused for training
        with pytest.raises(ConfigError, match=r"model.hf_config=.*config.json but no weights"):
            check_recipe(recipe.with_overrides(["data.source=../shared/data/gsm8k/test.jsonl"]), te_available=te,
                         on_cluster=False)
    else:  # the whole training preflight at the recipe's world size (layout, the trainer's rules, paths), as is
        warnings = check_recipe(recipe, te_available=te)
        if recipe.trainer.accelerator == "gpu":  # DAPO-Math-17k by hub name: only warned about while offline here
            assert recipe.config.data.source == "BytedTsinghua-SIA/DAPO-Math-17k"
            assert len(warnings) == 1 and "not in this host's cache" in warnings[0], warnings
            monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
            monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
            assert check_recipe(recipe, te_available=te) == []  # where the hub is reachable
            assert recipe.config.train.updates_per_batch == 2
        else:
            assert warnings == []
    if fp8:  # FP8 needs TE: without it the same recipe must be refused
        with pytest.raises(ConfigError, match="Transformer Engine"):
            check_recipe(recipe, te_available=False, job="smoke")
    # the dotted overrides the launcher passes rebuild exactly this config
    assert apply_overrides(RunConfig(), config_overrides(recipe.config)) == recipe.config
    recipe = recipe.with_overrides([f"run_dir={tmp_path / 'run'}"])
    config_path, launch_path = write_run_files(recipe, job="train", executor="slurm")
    assert from_dict(RunConfig, json.loads(open(config_path).read())) == recipe.config
    launch = json.loads(open(launch_path).read())
    assert launch["recipe"] == name and launch["trainer"]["nodes"] == recipe.trainer.nodes


def test_gpu_recipes_fill_their_nodes():
    for name in ALL:
        r = get_recipe(name)
        if r.trainer.accelerator != "gpu":
            continue
        assert r.trainer.procs_per_node == 8 and r.config.precision.params_dtype == "bfloat16", name
        p = r.placement
        gpus = p.gpus_per_node if p.mode == "separate" else r.trainer.procs_per_node
        assert p.servers_per_node * p.tensor_parallel == gpus, name
        par = r.config.parallel
        assert par.sequence_parallel and par.use_distributed_optimizer, name
        assert r.config.train.micro_batch_tokens == r.config.model.seq_length, name


@pytest.mark.parametrize("model,layers,hidden,heads,tied", [
    ("Qwen/Qwen3-1.7B", 28, 2048, 16, True),
    ("Qwen/Qwen3-4B", 36, 2560, 32, True),
    ("Qwen/Qwen3-8B", 36, 4096, 32, False),
])
def test_shipped_qwen3_shapes(model, layers, hidden, heads, tied):
    from dasd_megatron.model.hf_config import load_hf_architecture

    a = load_hf_architecture(resolve_hf_config(model))
    assert (a.num_layers, a.hidden_size, a.num_attention_heads, a.tie_word_embeddings) == (layers, hidden, heads, tied)
    assert (a.num_query_groups, a.kv_channels, a.vocab_size, a.rope_theta) == (8, 128, 151936, 1e6)
    assert a.qk_layernorm and a.model_type == "qwen3"


def test_model_resolution_offline(tmp_path):
    assert resolve_hf_config(str(tmp_path)) == str(tmp_path)  # an existing path wins
    with pytest.raises(ConfigError, match="neither a local path nor a model with a shipped config"):
        resolve_hf_config("Qwen/Qwen3-235B-A22B")
    assert architecture(get_recipe("qwen3_8b_dasd_2node_2rollout_h100_bf16")).hidden_size == 4096


def test_methods_are_the_paper_special_cases():
    dasd, grpo, opsd = loss_for("dasd"), loss_for("grpo"), loss_for("opsd")
    assert (dasd.router_mode, dasd.router_gate, dasd.rho, dasd.beta, dasd.reward_term) == ("tanh", True, 0.2, 1.0, True)
    assert (grpo.router_mode, grpo.router_constant, grpo.router_gate, grpo.beta) == ("constant", 0.0, False, 0.0)
    assert grpo.reward_term
    assert (opsd.router_mode, opsd.router_constant, opsd.reward_term, opsd.beta) == ("constant", 1.0, False, 1.0)
    # the baselines share the PPO machinery with DASD
    for cfg in (grpo, opsd):
        assert (cfg.clip_eps_low, cfg.clip_eps_high, cfg.is_cap) == (dasd.clip_eps_low, dasd.clip_eps_high, dasd.is_cap)
    # the method study's ablations: DASD with one router choice changed, everything else equal
    hard, nogate = loss_for("dasd_hard"), loss_for("dasd_nogate")
    assert hard == dataclasses.replace(dasd, router_mode="hard") and nogate == dataclasses.replace(dasd, router_gate=False)
    assert {"smollm2_135m_dasd_hard_cpu", "smollm2_135m_dasd_nogate_cpu"} <= set(ALL)
    with pytest.raises(ConfigError, match="unknown training method"):
        loss_for("ppo")


def test_main_job_dasd_uses_the_study_rho_and_nothing_else_changes():
    """The main job's DASD recipe routes with rho 0.05 (docs/method_study.md's search); the baselines, the study's
    ablations and the LoRA recipe keep the method's own loss (rho 0.2), and every SmolLM2 recipe shares the rest."""
    from recipes.smollm2 import MAIN_JOB_RHO, TEMPERATURE

    main = get_recipe("smollm2_135m_dasd_cpu").config
    assert MAIN_JOB_RHO == 0.05 and main.loss == dataclasses.replace(loss_for("dasd", temperature=TEMPERATURE),
                                                                     rho=MAIN_JOB_RHO)
    for method in ("grpo", "opsd", "dasd_hard", "dasd_nogate"):
        other = get_recipe(f"smollm2_135m_{method}_cpu").config
        assert other.loss == loss_for(method, temperature=TEMPERATURE)
        assert (other.train, other.data, other.optim, other.rollout) == (main.train, main.data, main.optim, main.rollout)
    assert get_recipe("smollm2_135m_dasd_lora_cpu").config.loss.rho == 0.2


def test_overrides_reach_config_trainer_and_placement():
    r = resolve_recipe("qwen3_4b_dasd_2node_h100_bf16",
                       ["train.max_response_tokens=12000", "trainer.nodes=4", "placement.servers_per_node=4",
                        "placement.tensor_parallel=2", "parallel.context=4"])
    assert r.config.train.max_response_tokens == 12000 and r.trainer.nodes == 4 and r.world_size == 32
    assert (r.placement.servers_per_node, r.placement.tensor_parallel) == (4, 2)
    check_recipe(r)
    assert to_dict(r.config)["parallel"]["context"] == 4
