"""Config validation: every invalid layout fails before any process group starts, naming the field and the fix."""

from __future__ import annotations

import ast
import json
import typing
from pathlib import Path

import pytest
import torch.distributed as dist

from dasd_megatron.config import (
    ConfigError,
    ModelConfig,
    ParallelConfig,
    PrecisionConfig,
    RunConfig,
    apply_overrides,
    field_types,
    from_dict,
    to_dict,
    validate_layout,
)
from dasd_megatron.model.hf_config import architecture_from_dict, load_hf_architecture, padded_vocab_size, tiny_config

ARCH = architecture_from_dict(tiny_config("qwen3", num_attention_heads=6, num_key_value_heads=2, head_dim=16,
                                          hidden_size=96, num_hidden_layers=4, vocab_size=509))


def _cfg(**parallel):
    seq = parallel.pop("seq", 64)
    fp8 = parallel.pop("fp8", None)
    backend = parallel.pop("backend", "auto")
    divisible = parallel.pop("divisible", 128)
    return RunConfig(
        model=ModelConfig(hf_config="unused", seq_length=seq, attention_backend=backend,
                          make_vocab_size_divisible_by=divisible),
        parallel=ParallelConfig(**parallel),
        precision=PrecisionConfig(params_dtype="bfloat16" if fp8 else "float32", fp8=fp8),
    )


@pytest.mark.parametrize(
    "parallel, world, field, fix",
    [
        (dict(tensor=4), 4, "parallel.tensor", "[1, 2, 3, 6]"),  # heads 6 % 4
        (dict(tensor=3), 3, "parallel.tensor", "num_key_value_heads=2"),  # groups 2 % 3
        (dict(tensor=2, divisible=1), 2, "model.make_vocab_size_divisible_by", "make_vocab_size_divisible_by=128"),
        (dict(pipeline=3), 3, "parallel.pipeline", "[1, 2, 4]"),  # 4 layers % 3
        (dict(context=2, seq=102), 2, "model.seq_length", "multiple of 4, e.g. 104"),
        (dict(tensor=2), 3, "parallel", "world size 3"),
        (dict(tensor=2, data=2), 2, "parallel.data", "parallel.data=1"),
        (dict(fp8="hybrid"), 1, "precision.fp8", "Transformer Engine"),
        (dict(backend="te"), 1, "model.attention_backend", "sdpa"),
        (dict(tensor=2, sequence_parallel=True, seq=63), 2, "model.seq_length", "multiple of 2"),
    ],
)
def test_bad_layouts_fail_naming_field_and_fix(parallel, world, field, fix):
    cfg = _cfg(**parallel)
    with pytest.raises(ConfigError) as ei:
        validate_layout(cfg, ARCH, world, te_available=False)
    msg = str(ei.value)
    assert msg.startswith(field), msg
    assert "Fix:" in msg and fix in msg, msg
    assert not dist.is_initialized()  # nothing was started


@pytest.mark.parametrize("parallel, world", [
    (dict(tensor=2), 2), (dict(tensor=2, pipeline=2), 4), (dict(context=2, seq=64), 2), (dict(), 3),
    (dict(tensor=2, sequence_parallel=True), 2), (dict(pipeline=2, data=2), 4),
])
def test_good_layouts_pass(parallel, world):
    validate_layout(_cfg(**parallel), ARCH, world, te_available=False)


def test_fp8_with_te_passes_and_needs_bf16():
    validate_layout(_cfg(fp8="e4m3"), ARCH, 1, te_available=True)
    with pytest.raises(ConfigError, match=r"precision.fp8=.*bf16.*params_dtype=bfloat16"):
        PrecisionConfig(params_dtype="float32", fp8="e4m3")
    with pytest.raises(ConfigError, match=r"precision.fp8=.*TE layer spec.*attention_backend=te"):
        validate_layout(_cfg(fp8="e4m3", backend="sdpa"), ARCH, 1, te_available=True)
    with pytest.raises(ConfigError, match="model.attention_backend='flash'"):
        ModelConfig(attention_backend="flash")


def test_field_level_checks():
    with pytest.raises(ConfigError, match=r"parallel.sequence_parallel=True: .*tensor > 1"):
        ParallelConfig(sequence_parallel=True)
    with pytest.raises(ConfigError, match=r"parallel.tensor=0"):
        ParallelConfig(tensor=0)
    with pytest.raises(ConfigError, match=r"model.seq_length=0"):
        ModelConfig(seq_length=0)


def test_overrides_and_round_trip():
    cfg = apply_overrides(RunConfig(), ["parallel.tensor=2", "parallel.sequence_parallel=true",
                                       "precision.params_dtype=bfloat16", "model.seq_length=256",
                                       "parallel.data=none"])
    assert cfg.parallel.tensor == 2 and cfg.parallel.sequence_parallel is True
    assert cfg.precision.params_dtype == "bfloat16" and cfg.model.seq_length == 256 and cfg.parallel.data is None
    assert from_dict(RunConfig, json.loads(json.dumps(to_dict(cfg)))) == cfg
    with pytest.raises(ConfigError, match=r"parallel.tensr: unknown field 'tensr'.*'tensor'"):
        apply_overrides(cfg, ["parallel.tensr=2"])
    with pytest.raises(ConfigError, match=r"parallel.tensor='two': not a valid int"):
        apply_overrides(cfg, ["parallel.tensor=two"])
    with pytest.raises(ConfigError, match=r"precision.params_dtype='fp64': not one of"):
        apply_overrides(cfg, ["precision.params_dtype=fp64"])
    with pytest.raises(ConfigError, match="expected key=value"):
        apply_overrides(cfg, ["parallel.tensor"])
    with pytest.raises(ConfigError, match=r"unknown field\(s\) \['bogus'\]"):
        from_dict(RunConfig, {"bogus": 1})


def test_field_types_resolve_every_annotation_to_a_real_type():
    """Sub-config sections resolve to their dataclasses and leaves to their typing objects (no string annotations
    left), so overrides of every section's fields coerce by type."""
    from dasd_megatron.data.config import DataConfig, PromptConfig
    from dasd_megatron.loss.config import DASDLossConfig
    from dasd_megatron.reward import RewardConfig
    from dasd_megatron.train.config import OptimConfig, RolloutConfig, TrainConfig

    types = field_types(RunConfig)
    assert (types["loss"], types["optim"], types["train"], types["data"], types["reward"], types["rollout"]) == (
        DASDLossConfig, OptimConfig, TrainConfig, DataConfig, RewardConfig, RolloutConfig)
    assert field_types(DataConfig)["prompt"] is PromptConfig
    assert field_types(TrainConfig)["teacher"] == typing.Literal["current", "frozen", "ema", "base"]
    from dasd_megatron.config import LoRAConfig, ModelConfig

    assert field_types(ModelConfig)["lora"] is LoRAConfig
    assert field_types(RewardConfig)["worker_memory_mb"] == typing.Optional[int]
    for cls in (RunConfig, DASDLossConfig, OptimConfig, TrainConfig, DataConfig, PromptConfig, RewardConfig,
                RolloutConfig):
        assert not [n for n, t in field_types(cls).items() if isinstance(t, str)], cls
    cfg = apply_overrides(RunConfig(), ["reward.worker_memory_mb=null", "train.teacher=ema", "loss.is_cap=3",
                                        "data.prompt.chat_template=plain", "rollout.temperature=1.0"])
    assert (cfg.reward.worker_memory_mb, cfg.train.teacher, cfg.loss.is_cap, cfg.data.prompt.chat_template) == (
        None, "ema", 3.0, "plain")


def test_errors_module_is_a_leaf_and_config_re_exports_it():
    """`dasd_megatron.errors` imports nothing from the package (every sub-config imports it), and the `ConfigError`
    that `dasd_megatron.config` re-exports is the same class the sub-configs raise."""
    import dasd_megatron.errors as errors
    from dasd_megatron.reward import RewardConfig

    tree = ast.parse(Path(errors.__file__).read_text())
    imported = [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
    imported += [n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)]
    assert not [m for m in imported if m.split(".")[0] in ("dasd_megatron", "recipes")], imported
    assert ConfigError is errors.ConfigError
    with pytest.raises(errors.ConfigError, match=r"^reward.num_workers=0: must be an integer >= 1. Fix: "):
        RewardConfig(num_workers=0)
    assert str(errors.config_error("a.b", "x", "rule", "fix")) == "a.b='x': rule. Fix: fix"


def test_hf_architectures(tmp_path):
    q3 = architecture_from_dict(tiny_config("qwen3"))
    assert q3.qk_layernorm and not q3.add_qkv_bias and q3.kv_channels == 16
    q2 = architecture_from_dict(tiny_config("qwen2"))
    assert q2.add_qkv_bias and not q2.qk_layernorm
    ll = architecture_from_dict(tiny_config("llama", tie_word_embeddings=True, rope_scaling={
        "rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192}))
    assert ll.tie_word_embeddings and ll.rope_scaling_factor == 32.0 and not ll.add_qkv_bias
    with pytest.raises(ConfigError, match=r"model_type='mistral'.*Supported: qwen2"):
        architecture_from_dict(dict(tiny_config("llama"), model_type="mistral"))
    with pytest.raises(ConfigError, match="rope_scaling type 'yarn'"):
        architecture_from_dict(tiny_config("qwen3", rope_scaling={"rope_type": "yarn", "factor": 4.0}))
    with pytest.raises(ConfigError, match="original_max_position_embeddings"):
        architecture_from_dict(tiny_config("llama", rope_scaling={"rope_type": "llama3", "factor": 8.0,
                                                                  "original_max_position_embeddings": 4096}))
    with pytest.raises(ConfigError, match="no config.json found"):
        load_hf_architecture(str(tmp_path))
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        load_hf_architecture(str(tmp_path))
    assert padded_vocab_size(509, 128, 1) == 512 and padded_vocab_size(509, 128, 3) == 768
    assert padded_vocab_size(151936, 128, 1) == 151936 and padded_vocab_size(151936, 128, 8) == 152576


def test_learning_rate_warmup():
    from dasd_megatron.train.config import OptimConfig

    assert [OptimConfig(lr=1e-3, warmup_steps=4).lr_at(s) for s in range(6)] == [2.5e-4, 5e-4, 7.5e-4, 1e-3, 1e-3, 1e-3]
    assert OptimConfig(lr=2e-6).lr_at(0) == 2e-6


def test_batch_must_feed_every_data_parallel_rank():
    cfg = apply_overrides(_cfg(), ["train.prompts_per_step=1", "train.samples_per_prompt=2"])
    with pytest.raises(ConfigError, match=r"train.prompts_per_step=1: .*2 rollouts cannot feed 4 data-parallel.*use at least 2"):
        validate_layout(cfg, ARCH, 4, te_available=False)
    validate_layout(cfg, ARCH, 2, te_available=False)
