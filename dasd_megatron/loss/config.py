"""`DASDLossConfig`: the frozen, validated configuration of the DASD objective (see docs/METHOD.md).

The config is meant to live at `loss` in the run config, so validation errors name fields as `loss.<field>`
(for example `loss.rho=1.5: must satisfy 0 < rho < 1. Fix: ...`) and are raised as `dasd_megatron.errors.ConfigError`
(a `ValueError`) at construction.

Defaults marked "ours" are not published by the paper (METHOD.md, "Defaults and the points the paper leaves open")
and are fields precisely so runs can change them:

| field | default | source |
| --- | --- | --- |
| beta | 1.0 | ours |
| rho, convention | 0.2, 'upper': tau = Quantile_{1-rho}(H), the top 20% entropy tokens are pushed | rho: paper |
| router_mode | 'tanh' ('hard' = sign(tau - H), 'constant' = router_constant) | paper |
| router_gate | True: omega *= sigmoid(abs(dbar) - 1) | paper |
| c_max | 5.0 (clip of the normalised gap) | ours, a safety bound |
| gap_scale | 'mean_abs' (s = mean abs(delta) + eps), or 'std' (population std + eps) | paper / option |
| estimator | 'full' (exact routed KL over the vocabulary), or 'sampled' (paper's PPO realisation) | ours |
| clip_eps_low / high | 0.2 / 0.28 (clip-higher) | ours (DAPO's values) |
| is_cap | 2.0: truncated IS against the rollout engine's log-probs (None = off) | ours |
| reward_term | True (the PPO surrogate on the GRPO advantage A_G) | paper |
| advantage_std_normalize | True: A_G = (r - mean_g) / (std_g + advantage_eps), Bessel-corrected std | paper |
| temperature | 1.0: must equal the rollout engine's sampling temperature | - |
| chunk_size | None: tokens per kernel chunk from `default_chunk_size` | - |
| kernel_backend | 'auto' (triton on CUDA, torch on CPU), 'torch', 'triton' | - |
| compile_kernels | None (auto: on with CUDA, off on CPU): torch.compile the torch backend's chunk math, see below | - |
| check_finite | True: raise on NaN/inf logits (one host sync per kernel call) | - |

compile_kernels: eager chunked kernels launch many small ops per chunk; compiled, the chunk math fuses (the
measured gap is in the README's `bench/loss.py` paragraph). Eager is the CPU and reference path.
kernel_backend: 'triton' (`triton_kernels.py`) reads the logits once per direction and needs two collectives per
call (compile_kernels has no effect on it). 'auto' picks it for CUDA logits where triton imports (see the README
for what has been measured of it), the torch path on the CPU.

`cfg.kernel_kwargs` holds the keyword arguments of `vocab_parallel_token_stats` that come from this config.

Special cases (baselines/ablations) come out of the same code:
GRPO = `router_mode='constant', router_constant=0.0, router_gate=False`;
uniform conformity (OPSD-style) = `router_constant=+1.0`; uniform novelty = `router_constant=-1.0`;
pure self-distillation = `reward_term=False, router_mode='constant', router_constant=1.0, router_gate=False`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Optional

from dasd_megatron.errors import config_error

from .vocab_parallel import KERNEL_BACKENDS

_SECTION = "loss"


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def _fail(name: str, value: object, rule: str, fix: str) -> None:
    """Raise the `ConfigError` of field `loss.<name>` (its fix ends with a period)."""
    raise config_error(f"{_SECTION}.{name}", value, rule, f"{fix}.")


def _finite(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        _fail(name, value, "must be a finite number", f"set {_SECTION}.{name} to a finite float")
    return float(value)


@dataclass(frozen=True)
class DASDLossConfig:
    """Configuration of the DASD loss; every field is validated in `__post_init__` (see module docstring)."""

    beta: float = 1.0
    rho: float = 0.2
    convention: str = "upper"
    router_mode: str = "tanh"
    router_constant: float = 0.0
    router_gate: bool = True
    c_max: float = 5.0
    eps: float = 1e-6
    gap_scale: str = "mean_abs"
    estimator: str = "full"
    clip_eps_low: float = 0.2
    clip_eps_high: float = 0.28
    is_cap: Optional[float] = 2.0
    reward_term: bool = True
    advantage_std_normalize: bool = True
    advantage_eps: float = 1e-6
    temperature: float = 1.0
    chunk_size: Optional[int] = None
    kernel_backend: str = "auto"
    compile_kernels: Optional[bool] = None
    check_finite: bool = True

    def __post_init__(self) -> None:
        for f in fields(self):
            if f.type in ("bool",) and not isinstance(getattr(self, f.name), bool):
                _fail(f.name, getattr(self, f.name), "must be a bool", f"set {_SECTION}.{f.name} to true or false")
        if _finite("beta", self.beta) < 0:
            _fail("beta", self.beta, "must be >= 0 (it scales the teacher term)", "use a non-negative beta, e.g. 1.0")
        if not 0.0 < _finite("rho", self.rho) < 1.0:
            _fail("rho", self.rho, "must satisfy 0 < rho < 1 (it is a quantile level)", "use e.g. 0.2")
        if self.convention not in ("upper", "lower"):
            _fail("convention", self.convention, "must be 'upper' (tau = Quantile_{1-rho}(H)) or 'lower' "
                  "(tau = Quantile_rho(H))", "use 'upper' (the default) or 'lower'")
        if self.router_mode not in ("tanh", "hard", "constant"):
            _fail("router_mode", self.router_mode, "must be one of 'tanh', 'hard', 'constant'", "use 'tanh'")
        if not -1.0 <= _finite("router_constant", self.router_constant) <= 1.0:
            _fail("router_constant", self.router_constant, "must lie in [-1, 1] (omega's range)",
                  "use 0 (GRPO), +1 (conformity) or -1 (novelty)")
        if self.router_mode == "constant" and self.router_gate:
            _fail("router_gate", self.router_gate, "must be False when router_mode='constant' (the constant IS "
                  "omega; a gate would silently change it)", f"set {_SECTION}.router_gate=false")
        if self.router_mode != "constant" and self.router_constant != 0.0:
            _fail("router_constant", self.router_constant, f"must be 0 unless router_mode='constant' (it is only "
                  f"used there; router_mode is {self.router_mode!r})", f"set {_SECTION}.router_mode=constant or leave "
                  f"{_SECTION}.router_constant at 0")
        if _finite("c_max", self.c_max) <= 0:
            _fail("c_max", self.c_max, "must be > 0 (clip bound of the normalised gap)", "use e.g. 5.0")
        if _finite("eps", self.eps) <= 0:
            _fail("eps", self.eps, "must be > 0 (it keeps per-rollout scales away from 0)", "use e.g. 1e-6")
        if self.gap_scale not in ("mean_abs", "std"):
            _fail("gap_scale", self.gap_scale, "must be 'mean_abs' or 'std'", "use 'mean_abs'")
        if self.estimator not in ("sampled", "full"):
            _fail("estimator", self.estimator, "must be 'sampled' or 'full'", "use 'full'")
        if not 0.0 <= _finite("clip_eps_low", self.clip_eps_low) < 1.0:
            _fail("clip_eps_low", self.clip_eps_low, "must satisfy 0 <= eps_low < 1", "use 0.2")
        if _finite("clip_eps_high", self.clip_eps_high) < 0.0:
            _fail("clip_eps_high", self.clip_eps_high, "must be >= 0", "use 0.28")
        if self.is_cap is not None and _finite("is_cap", self.is_cap) < 1.0:
            _fail("is_cap", self.is_cap, "must be >= 1 or None (truncation level of the importance weight)",
                  "use 2.0, or None to turn truncated importance sampling off")
        if _finite("advantage_eps", self.advantage_eps) <= 0:
            _fail("advantage_eps", self.advantage_eps, "must be > 0", "use 1e-6")
        if _finite("temperature", self.temperature) <= 0:
            _fail("temperature", self.temperature, "must be > 0 (logits are divided by it)",
                  "set it to the rollout engine's sampling temperature, e.g. 1.0")
        if self.chunk_size is not None and (
            isinstance(self.chunk_size, bool) or not isinstance(self.chunk_size, int) or self.chunk_size <= 0
        ):
            _fail("chunk_size", self.chunk_size, "must be a positive int (tokens per chunk) or None (automatic)",
                  "use None or e.g. 1024")
        if self.kernel_backend not in KERNEL_BACKENDS:
            _fail("kernel_backend", self.kernel_backend, "must be 'auto' (triton on CUDA, torch on CPU), 'torch' or "
                  "'triton'", f"use {_SECTION}.kernel_backend=auto")
        if not self.reward_term and self.beta == 0.0:
            _fail("beta", self.beta, "must be > 0 when reward_term is False (the loss would be identically 0)",
                  f"set {_SECTION}.beta>0 or {_SECTION}.reward_term=true")

    @property
    def kernel_kwargs(self) -> dict:
        """Keyword arguments for `vocab_parallel_token_stats`: temperature, chunk_size, check_finite, compile,
        kernel_backend."""
        return {"temperature": self.temperature, "chunk_size": self.chunk_size, "check_finite": self.check_finite,
                "compile": _cuda_available() if self.compile_kernels is None else self.compile_kernels,
                "kernel_backend": self.kernel_backend}

    @property
    def teacher_term_on(self) -> bool:
        """Whether the loss uses the teacher at all: beta != 0 and omega not the constant 0 (GRPO)."""
        return self.beta != 0.0 and not (self.router_mode == "constant" and self.router_constant == 0.0)

    @property
    def quantile_level(self) -> float:
        """The quantile level q of tau = Quantile_q(H): 1 - rho for 'upper', rho for 'lower'."""
        return 1.0 - self.rho if self.convention == "upper" else self.rho
