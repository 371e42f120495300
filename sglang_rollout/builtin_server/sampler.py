"""Per-sequence sampling parameters and the batched next-token sampler of the built-in server.

Semantics follow SGLang's sampler:

* temperature 0 (below 1e-6) is greedy; the reported log-prob is then `log_softmax(logits)` of the argmax token;
* otherwise the reported log-prob of the sampled token is taken from `log_softmax(logits / temperature)`, the
  temperature-scaled distribution *before* top-k / top-p / min-p truncation (SGLang's default; the trainer
  applies the rollout temperature to its logits to compare);
* top-k (-1 = all), top-p and min-p truncate and renormalise the distribution the token is drawn from;
* each sequence draws from its own `torch.Generator`: seeded by `sampling_seed` when given (same request, same
  tokens), else from the server's seed stream.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from sglang_rollout.contract import SAMPLING_PARAMS, ContractError

GREEDY_EPS = 1e-6

# Keys the built-in server implements. The others are valid SGLang keys; a non-default value for one of them is
# refused with a 400 naming the key (rather than silently ignored).
_IMPLEMENTED = {
    "max_new_tokens", "temperature", "top_p", "top_k", "min_p", "stop_token_ids", "ignore_eos", "min_new_tokens",
    "n", "sampling_seed", "skip_special_tokens", "spaces_between_special_tokens", "no_stop_trim", "stream_interval",
}


@dataclass(frozen=True)
class SamplingSpec:
    """Validated sampling parameters of one sequence."""

    max_new_tokens: int = 128
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    min_p: float = 0.0
    min_new_tokens: int = 0
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    n: int = 1
    seed: Optional[int] = None

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_EPS or self.top_k == 1

    @classmethod
    def from_params(cls, params: Optional[dict], vocab_size: int) -> "SamplingSpec":
        """Parse a (contract-checked) `sampling_params` dict; value errors raise ContractError (-> 400)."""
        params = dict(params or {})
        for key, value in params.items():
            if key in _IMPLEMENTED or value is None:
                continue
            default = SAMPLING_PARAMS[key].default
            if value != default and not (isinstance(value, (list, dict)) and not value):
                raise ContractError(
                    f"sampling_params.{key}={value!r}: not implemented by the built-in server "
                    f"(only {', '.join(sorted(_IMPLEMENTED))}); run SGLang for it"
                )

        def get(key):
            v = params.get(key)
            return SAMPLING_PARAMS[key].default if v is None else v

        spec = cls(
            max_new_tokens=int(get("max_new_tokens")),
            temperature=float(get("temperature")),
            top_p=float(get("top_p")),
            top_k=int(get("top_k")),
            min_p=float(get("min_p")),
            min_new_tokens=int(get("min_new_tokens")),
            stop_token_ids=tuple(int(t) for t in (params.get("stop_token_ids") or ())),
            ignore_eos=bool(get("ignore_eos")),
            n=int(get("n")),
            seed=None if params.get("sampling_seed") is None else int(params["sampling_seed"]),
        )
        spec._check(vocab_size)
        return spec

    def _check(self, vocab_size: int) -> None:
        def bad(key, rule):
            raise ContractError(f"sampling_params.{key}={getattr(self, key)!r}: {rule}")

        if self.max_new_tokens < 0:
            bad("max_new_tokens", "must be at least 0")
        if not self.temperature >= 0 or math.isinf(self.temperature):
            bad("temperature", "must be a finite number >= 0")
        if not 0 < self.top_p <= 1:
            bad("top_p", "must be in (0, 1]")
        if self.top_k != -1 and self.top_k < 1:
            bad("top_k", "must be -1 (disable) or at least 1")
        if not 0 <= self.min_p <= 1:
            bad("min_p", "must be in [0, 1]")
        if self.min_new_tokens < 0:
            bad("min_new_tokens", "must be at least 0")
        if self.min_new_tokens > self.max_new_tokens:
            bad("min_new_tokens", f"must be <= max_new_tokens ({self.max_new_tokens})")
        if self.n < 1:
            bad("n", "must be at least 1")
        if any(not 0 <= t < vocab_size for t in self.stop_token_ids):
            bad("stop_token_ids", f"token ids must be in [0, {vocab_size})")


def _truncate(probs: torch.Tensor, top_k: int, top_p: float, min_p: float) -> torch.Tensor:
    """Zero the tokens outside top-k / top-p / min-p of one row of probabilities (not renormalised)."""
    if top_k != -1 and top_k < probs.numel():
        kth = torch.topk(probs, top_k).values[-1]
        probs = torch.where(probs >= kth, probs, torch.zeros_like(probs))
    if top_p < 1.0:
        sorted_p, idx = torch.sort(probs, descending=True)
        cum = torch.cumsum(sorted_p, 0)
        drop = (cum - sorted_p) > top_p  # keep the smallest prefix whose mass reaches top_p
        sorted_p = sorted_p.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter_(0, idx, sorted_p)
    if min_p > 0.0:
        probs = torch.where(probs >= min_p * probs.max(), probs, torch.zeros_like(probs))
    return probs


def sample_next(
    logits: torch.Tensor, specs: Sequence[SamplingSpec], generators: Sequence[torch.Generator]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Next token and its log-prob for each row of `logits` [B, V] (float32)."""
    logits = logits.float()
    tokens = torch.empty(logits.shape[0], dtype=torch.long)
    logprobs = torch.empty(logits.shape[0], dtype=torch.float32)
    for i, spec in enumerate(specs):
        row = logits[i]
        if spec.temperature < GREEDY_EPS:
            tok = int(torch.argmax(row))
            lp = torch.log_softmax(row, -1)[tok]
        else:
            logp = torch.log_softmax(row / spec.temperature, -1)
            if spec.top_k == 1:
                tok = int(torch.argmax(row))
            else:
                probs = _truncate(logp.exp(), spec.top_k, spec.top_p, spec.min_p)
                tok = int(torch.multinomial(probs, 1, generator=generators[i]))
            lp = logp[tok]
        tokens[i] = tok
        logprobs[i] = lp
    return tokens, logprobs


def token_logprobs(logits: torch.Tensor, targets: torch.Tensor, temperature: float) -> torch.Tensor:
    """log p(targets[t] | logits[t]) under the temperature-scaled distribution (1 when greedy)."""
    t = temperature if temperature >= GREEDY_EPS else 1.0
    logp = torch.log_softmax(logits.float() / t, -1)
    return logp.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
