"""Helpers for the rollout tests and benchmarks: a tiny random HF model folder and loopback ports."""

from __future__ import annotations

import json
import os
import socket
from typing import Optional


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_tiny_hf_model(path: str, *, seed: int = 0, eos_token_id: Optional[int] = None,
                       init_scale: Optional[float] = None, **overrides) -> str:
    """Save a random tiny Qwen3ForCausalLM (`dasd_megatron.model.hf_config.tiny_config('qwen3')`) to `path`.

    The same seed gives the same weights. `eos_token_id` overrides the config's (and generation_config's) EOS.
    `init_scale` re-draws every weight as N(0, init_scale) (norm weights 1 + N(0, 0.1)): with ~0.05 the next-token
    distributions are far from uniform, so a wrong or stale weight changes log-probs visibly.
    """
    import torch
    from transformers import Qwen3Config, Qwen3ForCausalLM

    from dasd_megatron.model.hf_config import tiny_config

    cfg = tiny_config("qwen3", **overrides)
    if eos_token_id is not None:
        cfg["eos_token_id"] = eos_token_id
    kwargs = {k: v for k, v in cfg.items() if k not in ("model_type", "architectures", "torch_dtype")}
    torch.manual_seed(seed)
    model = Qwen3ForCausalLM(Qwen3Config(**kwargs)).to(torch.float32)
    if init_scale is not None:
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for name, p in sorted(model.named_parameters()):
                noise = torch.randn(p.shape, generator=g)
                p.copy_(1.0 + 0.1 * noise if "norm" in name else init_scale * noise)
    model.generation_config.eos_token_id = cfg["eos_token_id"]
    os.makedirs(path, exist_ok=True)
    model.save_pretrained(path)
    with open(os.path.join(path, "config.json")) as f:
        assert json.load(f)["model_type"] == "qwen3"
    return path
