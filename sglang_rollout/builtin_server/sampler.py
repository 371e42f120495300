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

from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from sglang_rollout.contract import SAMPLING_PARAMS, ContractError, broken_sampling_rule, sampling_default

GREEDY_EPS = 1e-6

# Keys the built-in server implements. The others are valid SGLang keys; a non-default value for one of them is
# refused with a 400 naming the key (rather than silently ignored).
_IMPLEMENTED = {
    "max_new_tokens", "temperature", "top_p", "top_k", "min_p", "stop_token_ids", "ignore_eos", "min_new_tokens",
    "n", "sampling_seed", "skip_special_tokens", "spaces_between_special_tokens", "no_stop_trim", "stream_interval",
}


@dataclass(frozen=True)
class SamplingSpec:
    """Validated sampling parameters of one sequence.

    Names and defaults come from `sglang_rollout.contract.SAMPLING_PARAMS` (`seed` is ``sampling_seed``), the value
    rules and their 400 messages from its `SAMPLING_RULES`.
    """

    max_new_tokens: int = sampling_default("max_new_tokens")
    temperature: float = sampling_default("temperature")
    top_p: float = sampling_default("top_p")
    top_k: int = sampling_default("top_k")
    min_p: float = sampling_default("min_p")
    min_new_tokens: int = sampling_default("min_new_tokens")
    stop_token_ids: tuple[int, ...] = sampling_default("stop_token_ids")
    ignore_eos: bool = sampling_default("ignore_eos")
    n: int = sampling_default("n")
    seed: Optional[int] = sampling_default("sampling_seed")

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
            return sampling_default(key) if v is None else v

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
        """Raise ContractError (-> 400) for the first broken rule of `SAMPLING_RULES`."""
        values = {**vars(self), "vocab_size": vocab_size}
        rule = broken_sampling_rule(values)
        if rule is not None:
            raise rule.server_error(values)


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
