"""Frozen, validated configuration dataclasses and dotted `key=value` overrides.

Each component owns its sub-config; `RunConfig` gathers them. Every check runs at construction (and the cross-field
layout check in `RunConfig.validate_layout`, before any process group starts), and every error names the dotted
field, the bad value, the rule and the fix. Model *architecture* is never typed here: it is read from a Hugging Face
`config.json` (see `dasd_megatron.model.hf_config`). `ConfigError` and `config_error` live in the leaf module
`dasd_megatron.errors` (the sub-configs import them from there) and are re-exported here.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Literal, Optional

from dasd_megatron.data.config import DataConfig
from dasd_megatron.errors import ConfigError, config_error
from dasd_megatron.loss.config import DASDLossConfig
from dasd_megatron.reward.config import RewardConfig
from dasd_megatron.train.config import OptimConfig, RolloutConfig, TrainConfig


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


DTYPES = ("float32", "bfloat16", "float16")


#: LoRA targets: megatron's linear layers, and the HF projections each one holds (fused QKV, fused gate/up)
LORA_TARGETS = {"linear_qkv": ("q_proj", "k_proj", "v_proj"), "linear_proj": ("o_proj",),
                "linear_fc1": ("gate_proj", "up_proj"), "linear_fc2": ("down_proj",)}
LORA_SYNC_MODES = ("adapter", "merged")


@dataclass(frozen=True)
class LoRAConfig:
    """LoRA adapters on the policy's linear layers (`dasd_megatron/model/lora.py`); rank 0 = off (full training).

    With rank > 0 the base weights are frozen and only the adapters train (and get optimizer state). Each targeted
    linear's output gains `alpha / rank * B @ A x`, with B = 0 at the start (the policy starts as the base model)."""

    rank: int = 0
    alpha: float = 32.0
    """Scale numerator: the adapter's output is multiplied by alpha / rank."""
    targets: tuple[str, ...] = ("linear_qkv", "linear_proj", "linear_fc1", "linear_fc2")
    """megatron linears (linear_qkv, linear_proj, linear_fc1, linear_fc2), HF names (q_proj, k_proj, v_proj: the
    fused linear_qkv; gate_proj, up_proj: linear_fc1; o_proj; down_proj) or 'all'."""
    dropout: float = 0.0
    """Dropout on the adapter's input (training only)."""
    sync: Literal["adapter", "merged"] = "adapter"
    """What reaches the rollout servers after each step: 'adapter' (only the adapter, PEFT format; servers run with
    LoRA enabled and every request names it) or 'merged' (W + alpha/rank B@A as full weights, any server)."""

    def __post_init__(self) -> None:
        if not isinstance(self.rank, int) or self.rank < 0:
            raise config_error("model.lora.rank", self.rank, "must be an integer >= 0", "use 0 (off) or e.g. 32")
        if not self.alpha > 0:
            raise config_error("model.lora.alpha", self.alpha, "must be > 0", "use e.g. 2 * rank")
        if not 0 <= self.dropout < 1:
            raise config_error("model.lora.dropout", self.dropout, "must be in [0, 1)", "use 0.0 or e.g. 0.05")
        if self.sync not in LORA_SYNC_MODES:
            raise config_error("model.lora.sync", self.sync, "unknown mode", "use adapter or merged")
        if isinstance(self.targets, str):
            object.__setattr__(self, "targets", tuple(t for t in self.targets.split(",") if t))
        self.modules()  # names checked here

    @property
    def enabled(self) -> bool:
        return self.rank > 0

    def modules(self) -> tuple[str, ...]:
        """The megatron linears adapted, in layer order."""
        known = {hf: m for m, hfs in LORA_TARGETS.items() for hf in hfs}
        out = set()
        for t in self.targets:
            if t in ("all", "all-linear"):
                out.update(LORA_TARGETS)
            elif t in LORA_TARGETS:
                out.add(t)
            elif t in known:
                out.add(known[t])
            else:
                raise config_error("model.lora.targets", t, "unknown target",
                                   f"use some of {list(LORA_TARGETS)} (or HF names {sorted(known)}, or all)")
        if self.enabled and not out:
            raise config_error("model.lora.targets", self.targets, "no linear targeted", "name at least one")
        return tuple(m for m in LORA_TARGETS if m in out)

    @property
    def scale(self) -> float:
        return self.alpha / self.rank if self.rank else 0.0


@dataclass(frozen=True)
class ModelConfig:
    """Which model to build. The architecture comes from `hf_config` (a directory with config.json, or the file)."""

    hf_config: str = ""
    """Path of a Hugging Face model directory (or its config.json). Required."""
    seq_length: int = 1024
    """Longest packed sequence (tokens) a micro-batch holds; also the RoPE table length."""
    make_vocab_size_divisible_by: int = 128
    """The embedding/output rows are padded to a multiple of this times the TP size (megatron convention)."""
    attention_backend: Literal["auto", "te", "sdpa", "local"] = "auto"
    """Layer spec: 'te' (Transformer Engine), 'sdpa' (megatron local spec with our torch SDPA core attention),
    'local' (megatron's own DotProductAttention; slow, for comparison). 'auto' = te if it imports, else sdpa."""
    init_method_std: float = 0.02
    seed: int = 1234
    fused_kernels: Literal["auto", "torch", "triton"] = "auto"
    """RMSNorm, SwiGLU and packed RoPE of the sdpa/local layer spec: 'triton' (`dasd_megatron/kernels`, one fused
    kernel each, forward and backward), 'torch' (unfused torch ops, megatron's arithmetic). 'auto' = triton on a CUDA
    device where Triton imports, else torch. The TE spec has its own fused modules."""
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    """LoRA adapters (rank 0: off, full training)."""

    def __post_init__(self) -> None:
        if self.fused_kernels not in ("auto", "torch", "triton"):
            raise config_error("model.fused_kernels", self.fused_kernels, "unknown choice", "use auto, torch or triton")
        if self.seq_length < 1:
            raise config_error("model.seq_length", self.seq_length, "must be >= 1", "set a positive token count")
        if self.make_vocab_size_divisible_by < 1:
            raise config_error(
                "model.make_vocab_size_divisible_by", self.make_vocab_size_divisible_by, "must be >= 1",
                "use 128 (megatron's default) or 1 to disable padding",
            )
        if self.attention_backend not in ("auto", "te", "sdpa", "local"):
            raise config_error(
                "model.attention_backend", self.attention_backend, "unknown backend", "use auto, te, sdpa or local"
            )


@dataclass(frozen=True)
class ParallelConfig:
    """Parallel layout. world size = tensor * pipeline * context * data."""

    tensor: int = 1
    pipeline: int = 1
    context: int = 1
    data: Optional[int] = None
    """Data-parallel degree; None = whatever the world size leaves after tensor*pipeline*context."""
    sequence_parallel: bool = False
    """Megatron sequence parallelism (needs tensor > 1)."""
    use_distributed_optimizer: bool = False
    """Shard optimizer state over DP (megatron's distributed optimizer)."""

    def __post_init__(self) -> None:
        for name in ("tensor", "pipeline", "context"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1:
                raise config_error(f"parallel.{name}", v, "must be an integer >= 1", "use 1 to disable it")
        if self.data is not None and (not isinstance(self.data, int) or self.data < 1):
            raise config_error("parallel.data", self.data, "must be an integer >= 1 or None", "use None to derive it")
        if self.sequence_parallel and self.tensor == 1:
            raise config_error(
                "parallel.sequence_parallel", True, "sequence parallelism needs parallel.tensor > 1",
                "set parallel.sequence_parallel=false or parallel.tensor >= 2",
            )

    def data_parallel_size(self, world_size: int) -> int:
        """The DP degree for `world_size`, after checking the product of all degrees equals it."""
        model_parallel = self.tensor * self.pipeline * self.context
        if world_size % model_parallel != 0:
            raise config_error(
                "parallel", f"tensor={self.tensor} pipeline={self.pipeline} context={self.context}",
                f"world size {world_size} is not divisible by tensor*pipeline*context={model_parallel}",
                f"launch a multiple of {model_parallel} processes or change the degrees",
            )
        dp = world_size // model_parallel
        if self.data is not None and self.data != dp:
            raise config_error(
                "parallel.data", self.data,
                f"world size {world_size} != tensor*pipeline*context*data = {model_parallel * self.data}",
                f"set parallel.data={dp} (or leave it unset) or launch {model_parallel * self.data} processes",
            )
        return dp


@dataclass(frozen=True)
class PrecisionConfig:
    params_dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    """Parameter and activation dtype (bf16 on GPUs; fp32 is the CPU default and the test reference)."""
    fp8: Optional[Literal["e4m3", "hybrid"]] = None
    """Transformer Engine FP8 format; needs attention_backend te (and TE installed)."""
    fp8_recipe: Literal["delayed", "tensorwise", "mxfp8", "blockwise"] = "delayed"
    fp8_amax_history_len: int = 1024
    fp8_amax_compute_algo: Literal["max", "most_recent"] = "max"

    def __post_init__(self) -> None:
        if self.params_dtype not in DTYPES:
            raise config_error("precision.params_dtype", self.params_dtype, "unknown dtype", f"use one of {DTYPES}")
        if self.fp8 not in (None, "e4m3", "hybrid"):
            raise config_error("precision.fp8", self.fp8, "unknown FP8 format", "use e4m3, hybrid or null")
        if self.fp8 is not None and self.params_dtype == "float32":
            raise config_error(
                "precision.fp8", self.fp8, "FP8 training runs with bf16 parameters",
                "set precision.params_dtype=bfloat16",
            )

    @property
    def torch_dtype(self):
        import torch

        return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[self.params_dtype]


@dataclass(frozen=True)
class RunConfig:
    """The whole run: each component's sub-config."""

    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    precision: PrecisionConfig = field(default_factory=PrecisionConfig)
    loss: DASDLossConfig = field(default_factory=DASDLossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    data: DataConfig = field(default_factory=DataConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    run_dir: str = "runs/default"

    def __post_init__(self) -> None:
        if abs(self.rollout.temperature - self.loss.temperature) > 1e-9:
            raise config_error(
                "loss.temperature", self.loss.temperature,
                f"must equal rollout.temperature={self.rollout.temperature} (the loss scores the tokens at the "
                "temperature they were sampled at)", f"set loss.temperature={self.rollout.temperature}",
            )

    def validate_layout(self, world_size: int, arch=None, te_available: Optional[bool] = None) -> None:
        """Cross-field checks against the architecture and world size. Call before any process group starts."""
        from dasd_megatron.model.hf_config import load_hf_architecture
        from dasd_megatron.model.specs import transformer_engine_available

        arch = arch if arch is not None else load_hf_architecture(self.model.hf_config)
        te = transformer_engine_available() if te_available is None else te_available
        validate_layout(self, arch, world_size, te)


def validate_layout(cfg: RunConfig, arch, world_size: int, te_available: bool) -> None:
    """All layout rules that need both the architecture and the parallel degrees."""
    p, m = cfg.parallel, cfg.model
    tp, pp, cp = p.tensor, p.pipeline, p.context
    dp = p.data_parallel_size(world_size)
    rollouts = cfg.train.prompts_per_step * cfg.train.samples_per_prompt
    if rollouts < dp:
        raise config_error(
            "train.prompts_per_step", cfg.train.prompts_per_step,
            f"prompts_per_step * samples_per_prompt = {rollouts} rollouts cannot feed {dp} data-parallel ranks",
            f"use at least {-(-dp // cfg.train.samples_per_prompt)} prompts per step",
        )
    if arch.num_attention_heads % tp:
        raise config_error(
            "parallel.tensor", tp,
            f"must divide the model's num_attention_heads={arch.num_attention_heads}",
            f"use one of {_divisors(arch.num_attention_heads)}",
        )
    if arch.num_query_groups % tp:
        raise config_error(
            "parallel.tensor", tp,
            f"must divide the model's num_key_value_heads={arch.num_query_groups} (GQA groups are split across TP)",
            f"use one of {_divisors(arch.num_query_groups)}",
        )
    if (arch.vocab_size % tp) and m.make_vocab_size_divisible_by == 1:
        raise config_error(
            "model.make_vocab_size_divisible_by", 1,
            f"vocab_size={arch.vocab_size} is not divisible by parallel.tensor={tp} and padding is disabled",
            "set model.make_vocab_size_divisible_by=128 (pads the vocabulary) or pick a tensor size dividing "
            f"{arch.vocab_size}",
        )
    if arch.num_layers % pp:
        raise config_error(
            "parallel.pipeline", pp, f"must divide the model's num_hidden_layers={arch.num_layers}",
            f"use one of {_divisors(arch.num_layers)}",
        )
    if cp > 1 and m.seq_length % (2 * cp):
        raise config_error(
            "model.seq_length", m.seq_length,
            f"context parallelism splits each sequence into 2*context={2 * cp} zig-zag chunks, so it must be "
            "divisible by that",
            f"use a multiple of {2 * cp}, e.g. {((m.seq_length + 2 * cp - 1) // (2 * cp)) * 2 * cp}",
        )
    if p.sequence_parallel and m.seq_length % tp:
        raise config_error(
            "model.seq_length", m.seq_length, f"sequence parallelism needs it divisible by parallel.tensor={tp}",
            f"use a multiple of {tp}",
        )
    lora = m.lora
    if lora.enabled and lora.rank % tp:
        raise config_error("model.lora.rank", lora.rank, f"the adapter's rank dimension is split over "
                           f"parallel.tensor={tp} (megatron's layout for A of a column-parallel linear)",
                           f"use a multiple of {tp}, e.g. {-(-lora.rank // tp) * tp}")
    if lora.enabled and lora.sync == "adapter" and cfg.rollout.transport == "distributed":
        raise config_error("rollout.transport", "distributed", "an adapter-only sync (model.lora.sync=adapter) goes "
                           "through SGLang's /load_lora_adapter (a PEFT folder) or /load_lora_adapter_from_tensors, "
                           "not the weight-update group", "use rollout.transport=disk or tensor, or "
                           "model.lora.sync=merged")
    if cfg.train.teacher == "base" and not lora.enabled:
        raise config_error("train.teacher", "base", "the base-network teacher is the model with its LoRA adapter "
                           "disabled, and model.lora.rank=0 trains the whole model",
                           "set model.lora.rank > 0, or use train.teacher=frozen (a frozen copy of the initial policy)")
    if cfg.train.teacher == "frozen" and lora.enabled:
        raise config_error("train.teacher", "frozen", "with LoRA the frozen initial policy is the base network (the "
                           "adapter starts at zero), which train.teacher=base gives with no extra copy",
                           "use train.teacher=base")
    backend = m.attention_backend
    if cfg.precision.fp8 is not None:
        if not te_available:
            raise config_error(
                "precision.fp8", cfg.precision.fp8, "FP8 needs Transformer Engine, which is not installed",
                "install the gpu extra (pip install 'dasd-megatron[gpu]') on a CUDA machine or set precision.fp8=null",
            )
        if backend not in ("auto", "te"):
            raise config_error(
                "precision.fp8", cfg.precision.fp8, f"FP8 runs through the TE layer spec, not attention_backend={backend}",
                "set model.attention_backend=te (or auto)",
            )
    if backend == "te" and not te_available:
        raise config_error(
            "model.attention_backend", "te", "Transformer Engine is not installed",
            "use model.attention_backend=sdpa (or auto), or install the gpu extra on a CUDA machine",
        )


# ---------------------------------------------------------------------------------------------------------------
# Dotted overrides and (de)serialisation


def _coerce(field_name: str, annotation: Any, raw: str) -> Any:
    """Parse a command-line string into the field's annotated type."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        non_none = [a for a in args if a is not type(None)]
        if raw.lower() in ("none", "null"):
            return None
        return _coerce(field_name, non_none[0], raw)
    if origin is Literal:
        for a in args:
            if str(a) == raw:
                return a
        raise ConfigError(f"{field_name}={raw!r}: not one of {list(args)}. Fix: pick one of them")
    if annotation is bool:
        if raw.lower() in ("1", "true", "yes", "on"):
            return True
        if raw.lower() in ("0", "false", "no", "off"):
            return False
        raise ConfigError(f"{field_name}={raw!r}: not a boolean. Fix: use true or false")
    if annotation in (int, float):
        try:
            return annotation(raw)
        except ValueError:
            raise ConfigError(f"{field_name}={raw!r}: not a valid {annotation.__name__}. Fix: give a number") from None
    if annotation is str:
        return raw
    if origin in (tuple, list):
        return annotation(json.loads(raw)) if raw.startswith("[") else tuple(x for x in raw.split(",") if x)
    return json.loads(raw)


@functools.lru_cache(maxsize=None)
def field_types(cls) -> dict[str, Any]:
    """The resolved annotation of each field of the config dataclass `cls` (string annotations evaluated in the
    module that defines it, by `typing.get_type_hints`)."""
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _nested_type(cls, name: str):
    """The dataclass type of a sub-config field, or None for a leaf field."""
    t = field_types(cls)[name]
    return t if isinstance(t, type) and dataclasses.is_dataclass(t) else None


def apply_overrides(cfg, overrides: list[str]):
    """Return a copy of `cfg` with dotted `key=value` overrides applied (e.g. `parallel.tensor=2`).

    All overrides are applied together: each sub-config is rebuilt once with every one of its overrides, so the
    result does not depend on their order (a cross-field rule sees the final values)."""
    tree: dict = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r}: expected key=value, e.g. parallel.tensor=2")
        key, raw = item.split("=", 1)
        node = tree
        parts = key.strip().split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"{key.strip()}: {part!r} is set as a value and used as a section. Fix: pick one")
        node[parts[-1]] = (raw.strip(), key.strip())
    return _rebuild(cfg, tree, "")


def _rebuild(obj, tree: dict, prefix: str):
    fields = {f.name: f for f in dataclasses.fields(obj)}
    kwargs = {}
    for name, sub in tree.items():
        full = f"{prefix}{name}"
        if name not in fields:
            raise ConfigError(f"{full}: unknown field {name!r} of {type(obj).__name__}. Fix: use one of "
                              f"{list(fields)}")
        value = getattr(obj, name)
        if isinstance(sub, dict):
            if not dataclasses.is_dataclass(value):
                raise ConfigError(f"{full}: {type(obj).__name__}.{name} has no sub-fields. Fix: set {full}=VALUE")
            kwargs[name] = _rebuild(value, sub, f"{full}.")
        else:
            raw, key = sub
            if dataclasses.is_dataclass(value):
                raise ConfigError(f"{key}: is a section; set its fields instead, e.g. {key}.<field>=VALUE")
            kwargs[name] = _coerce(key, field_types(type(obj))[name], raw)
    return dataclasses.replace(obj, **kwargs)


def to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)


def from_dict(cls, data: dict):
    """Build a (nested) config dataclass from a dict, rejecting unknown keys by name."""
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = set(data) - names
    if unknown:
        raise ConfigError(f"{cls.__name__}: unknown field(s) {sorted(unknown)}. Fix: use only {sorted(names)}")
    kwargs = {}
    for k, v in data.items():
        t = _nested_type(cls, k)
        if t is not None and isinstance(v, dict):
            v = from_dict(t, v)
        elif isinstance(v, list):
            v = tuple(v)
        kwargs[k] = v
    return cls(**kwargs)
