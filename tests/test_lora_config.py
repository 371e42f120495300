"""LoRA settings: `model.lora` parsing, the preflight's refusals (checked before any process starts), and the LoRA
flags the rollout servers get on their command lines (local launch and SLURM rollout nodes)."""

from __future__ import annotations

import pytest

from dasd_megatron.config import ConfigError, LoRAConfig, RunConfig, apply_overrides
from dasd_megatron.preflight import preflight


def test_targets_accept_megatron_and_hf_names():
    assert LoRAConfig(rank=8, targets=("q_proj", "down_proj")).modules() == ("linear_qkv", "linear_fc2")
    assert LoRAConfig(rank=8, targets=("all",)).modules() == ("linear_qkv", "linear_proj", "linear_fc1", "linear_fc2")
    assert LoRAConfig(rank=8, targets="linear_fc1,o_proj").modules() == ("linear_proj", "linear_fc1")
    assert LoRAConfig(rank=8, alpha=16).scale == 2.0 and not LoRAConfig().enabled
    with pytest.raises(ConfigError, match=r"model.lora.targets='qkv_proj': unknown target.*Fix: use some of"):
        LoRAConfig(rank=8, targets=("qkv_proj",))
    for kw, field in (({"rank": -1}, "model.lora.rank"), ({"rank": 4, "alpha": 0}, "model.lora.alpha"),
                      ({"rank": 4, "dropout": 1.0}, "model.lora.dropout"), ({"rank": 4, "sync": "x"}, "model.lora.sync")):
        with pytest.raises(ConfigError, match=field):
            LoRAConfig(**kw)


@pytest.mark.parametrize("overrides,message", [
    (["model.lora.rank=3", "parallel.tensor=2"], r"model.lora.rank=3: the adapter's rank dimension is split over "
                                                 r"parallel.tensor=2.*Fix: use a multiple of 2, e.g. 4"),
    (["train.teacher=base"], r"train.teacher='base': the base-network teacher.*Fix: set model.lora.rank > 0"),
    (["model.lora.rank=4", "train.teacher=frozen"], r"train.teacher='frozen': with LoRA.*Fix: use train.teacher=base"),
    (["model.lora.rank=4", "rollout.transport=distributed"],
     r"rollout.transport='distributed': an adapter-only sync.*Fix: use rollout.transport=disk or tensor"),
])
def test_preflight_refuses_bad_lora_settings(tmp_path, overrides, message):
    from test_preflight_paths import cfg

    with pytest.raises(ConfigError, match=message):
        preflight(cfg(*overrides), 2, need_data=False, need_weights=False)


def test_good_lora_settings_pass_the_preflight():
    from test_preflight_paths import cfg

    for extra in (["model.lora.rank=4", "train.teacher=base"], ["model.lora.rank=4", "train.teacher=ema"],
                  ["model.lora.rank=4", "parallel.tensor=2", "model.lora.sync=merged",
                   "rollout.transport=distributed"]):
        assert preflight(cfg(*extra), 2, need_data=False, need_weights=False) == []


def test_rollout_nodes_start_servers_with_lora_flags():
    from dasd_megatron.config import to_dict
    from dasd_megatron.launch.rollout_node import lora_server_args

    on = to_dict(apply_overrides(RunConfig(), ["model.lora.rank=8", "model.lora.targets=q_proj,k_proj,v_proj"]))
    assert lora_server_args(on) == ["--enable-lora", "--max-lora-rank", "8", "--lora-target-modules", "k_proj",
                                    "q_proj", "v_proj"]
    merged = to_dict(apply_overrides(RunConfig(), ["model.lora.rank=8", "model.lora.sync=merged"]))
    assert lora_server_args(merged) == [] and lora_server_args(to_dict(RunConfig())) == []
