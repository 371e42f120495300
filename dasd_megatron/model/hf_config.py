"""Model architecture read from a Hugging Face `config.json` (Qwen2, Qwen3 and Llama dense families).

The architecture is never typed by hand: `load_hf_architecture(path)` turns the HF config into an
`HFArchitecture`, and `dasd_megatron.model.builder` turns that into megatron's `TransformerConfig` in one function.
Anything we cannot reproduce exactly (MoE, sliding windows, unknown RoPE scaling) is refused with a message that
lists what is supported.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Optional

from dasd_megatron.errors import ConfigError

SUPPORTED_MODEL_TYPES = {
    "qwen2": "Qwen2 / Qwen2.5 dense (QKV bias)",
    "qwen3": "Qwen3 dense (QK-norm)",
    "llama": "Llama 2/3/3.1/3.2 dense and SmolLM/SmolLM2",
}

# Megatron's RoPE scaling is Llama-3 style with these constants fixed (rotary_pos_embedding._apply_scaling);
# only the factor is configurable.
_LLAMA3_FIXED = {"low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}


@dataclass(frozen=True)
class HFArchitecture:
    model_type: str
    hidden_size: int
    ffn_hidden_size: int
    num_layers: int
    num_attention_heads: int
    num_query_groups: int
    kv_channels: int
    vocab_size: int
    max_position_embeddings: int
    rope_theta: float
    rope_scaling_factor: Optional[float]
    rms_norm_eps: float
    tie_word_embeddings: bool
    qk_layernorm: bool
    add_qkv_bias: bool
    bos_token_id: Optional[int] = None
    eos_token_id: Optional[object] = None

    @property
    def family(self) -> str:
        return self.model_type


def _config_path(path: str) -> str:
    if not path:
        raise ConfigError(
            "model.hf_config='': no model given. Fix: set model.hf_config to a Hugging Face model directory "
            "(with config.json) or to the config.json file"
        )
    p = os.path.join(path, "config.json") if os.path.isdir(path) else path
    if os.path.isfile(p):
        return p
    if not os.path.exists(path) and path.count("/") == 1 and not path.startswith((".", "/")):
        hub = _hub_config(path)
        if hub:
            return hub
    raise ConfigError(
        f"model.hf_config={path!r}: no config.json found at {p} (nor in the Hugging Face cache or the configs "
        "shipped under recipes/hf_configs). Fix: point it at a HF model folder, or a hub id with network"
    )


def _hub_config(repo_id: str) -> Optional[str]:
    """config.json of a hub model id: the HF cache, else the shape shipped with the recipes, else the hub (network).

    The shipped shapes come before the network: they are copies of the published configs, and a hub request from
    a machine without network retries for ~20 s before it fails."""
    try:
        from huggingface_hub import hf_hub_download
    except ImportError:
        hf_hub_download = None
    if hf_hub_download is not None:
        try:
            return hf_hub_download(repo_id, "config.json", local_files_only=True)
        except Exception:  # noqa: BLE001 - not in the cache
            pass
    try:
        from recipes.models import shipped_config_dir

        d = shipped_config_dir(repo_id)
        if d is not None:
            return str(d / "config.json")
    except ImportError:
        pass
    if hf_hub_download is not None:
        try:
            return hf_hub_download(repo_id, "config.json")
        except Exception:  # noqa: BLE001 - offline or unknown repo
            pass
    return None


def load_hf_architecture(path_or_dict) -> HFArchitecture:
    """Parse a HF config (path to a folder or config.json, or an already-loaded dict)."""
    if isinstance(path_or_dict, dict):
        cfg, where = path_or_dict, "<dict>"
    else:
        where = _config_path(path_or_dict)
        try:
            with open(where) as f:
                cfg = json.load(f)
        except json.JSONDecodeError as e:
            raise ConfigError(f"model.hf_config: {where} is not valid JSON ({e}). Fix: restore the file") from None
    return architecture_from_dict(cfg, where)


def architecture_from_dict(cfg: dict, where: str = "<dict>") -> HFArchitecture:
    mt = cfg.get("model_type")
    if mt not in SUPPORTED_MODEL_TYPES:
        supported = "; ".join(f"{k} ({v})" for k, v in SUPPORTED_MODEL_TYPES.items())
        raise ConfigError(
            f"model.hf_config: model_type={mt!r} in {where} is not supported. Supported: {supported}. "
            "Fix: use a model of one of these families"
        )
    for unsupported in ("num_experts", "num_local_experts"):
        if cfg.get(unsupported):
            raise ConfigError(f"model.hf_config: {where} is a mixture-of-experts model ({unsupported}); only dense "
                              "models are supported. Fix: use a dense checkpoint")
    if cfg.get("use_sliding_window") and cfg.get("sliding_window"):
        raise ConfigError(f"model.hf_config: {where} enables sliding-window attention, which is not supported. "
                          "Fix: set use_sliding_window=false (Qwen2/3 ship it disabled)")
    act = cfg.get("hidden_act", "silu")
    if act != "silu":
        raise ConfigError(f"model.hf_config: hidden_act={act!r} in {where}; only SwiGLU (silu) MLPs are supported")

    heads = int(cfg["num_attention_heads"])
    hidden = int(cfg["hidden_size"])
    head_dim = cfg.get("head_dim") or hidden // heads
    rope_scaling_factor = None
    rs = cfg.get("rope_scaling")
    if rs:
        rtype = rs.get("rope_type", rs.get("type"))
        if rtype in ("default", None):
            pass
        elif rtype == "llama3":
            for k, v in _LLAMA3_FIXED.items():
                if float(rs.get(k, v)) != v:
                    raise ConfigError(
                        f"model.hf_config: rope_scaling.{k}={rs.get(k)} in {where}; megatron-core's Llama-3 RoPE "
                        f"scaling fixes it at {v}. Fix: use a checkpoint with the standard Llama-3.1 scaling"
                    )
            rope_scaling_factor = float(rs["factor"])
        else:
            raise ConfigError(
                f"model.hf_config: rope_scaling type {rtype!r} in {where} is not supported (supported: none, llama3). "
                "Fix: remove rope_scaling or use a supported checkpoint"
            )
    rope_theta = cfg.get("rope_theta")
    if rope_theta is None:  # transformers 5 nests it under rope_parameters
        rope_theta = (cfg.get("rope_parameters") or {}).get("rope_theta", 10000.0)
    qkv_bias = mt == "qwen2" or bool(cfg.get("attention_bias", False))
    if mt == "llama" and cfg.get("mlp_bias"):
        raise ConfigError(f"model.hf_config: mlp_bias=true in {where} is not supported. Fix: use a model without it")
    return HFArchitecture(
        model_type=mt,
        hidden_size=hidden,
        ffn_hidden_size=int(cfg["intermediate_size"]),
        num_layers=int(cfg["num_hidden_layers"]),
        num_attention_heads=heads,
        num_query_groups=int(cfg.get("num_key_value_heads") or heads),
        kv_channels=int(head_dim),
        vocab_size=int(cfg["vocab_size"]),
        max_position_embeddings=int(cfg.get("max_position_embeddings", 4096)),
        rope_theta=float(rope_theta),
        rope_scaling_factor=rope_scaling_factor,
        rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        qk_layernorm=mt == "qwen3",
        add_qkv_bias=qkv_bias,
        bos_token_id=cfg.get("bos_token_id"),
        eos_token_id=cfg.get("eos_token_id"),
    )


def padded_vocab_size(vocab_size: int, divisible_by: int, tp: int) -> int:
    """Megatron's padding rule: round the vocabulary up to a multiple of divisible_by * tp."""
    multiple = divisible_by * tp
    return ((vocab_size + multiple - 1) // multiple) * multiple


def tiny_config(model_type: str = "qwen3", **overrides) -> dict:
    """A small HF-style config dict for tests and the CPU smoke run (random weights)."""
    base = {
        "model_type": model_type,
        "architectures": [{"qwen3": "Qwen3ForCausalLM", "qwen2": "Qwen2ForCausalLM", "llama": "LlamaForCausalLM"}[
            model_type]],
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 4,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 16,
        "vocab_size": 509,
        "max_position_embeddings": 512,
        "rope_theta": 10000.0,
        "rms_norm_eps": 1e-6,
        "tie_word_embeddings": False,
        "hidden_act": "silu",
        "torch_dtype": "float32",
        "bos_token_id": 1,
        "eos_token_id": 2,
    }
    base.update(overrides)
    return base
