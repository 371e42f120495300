"""How the evaluation asks for samples: a small `Generator` interface and its adapter to the rollout client.

The runner only needs "n completions of these prompt token ids"; `RolloutGenerator` provides them from one or more
SGLang (or built-in) servers through `sglang_rollout.rollout_client.RolloutClient`, which spreads requests over the servers
and retries failed ones (connection errors, timeouts, 5xx, aborted samples) with the same request ids. A failure
that survives the retries raises (`RolloutError`); the runner then stops and keeps what it has recorded.

Tests use other generators (`dasd_megatron.eval.testing.ScriptedGenerator`), so the runner's logic does not need a
server. A generator is called from several threads at once (one per problem in flight).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, replace
from typing import Optional, Protocol, Sequence

from dasd_megatron.eval.errors import EvalError
from sglang_rollout.rollout_client import ClientConfig, RolloutClient, SamplingConfig


@dataclass(frozen=True)
class GenerationRequest:
    """The samples wanted for one problem."""

    benchmark: str
    problem_id: int
    prompt_ids: tuple[int, ...]
    n: int
    sampling: SamplingConfig
    """Sampling parameters, with `seed` already set to this problem's seed."""


@dataclass(frozen=True)
class Completion:
    """One generated response: its token ids, the server's log-prob of each, and why it ended."""

    output_ids: tuple[int, ...]
    logprobs: tuple[float, ...]
    finish: str
    """'stop' (EOS or a stop token), 'length' (max_new_tokens reached), or what the server said."""
    weight_version: str = ""


class Generator(Protocol):
    def generate(self, request: GenerationRequest) -> list[Completion]:
        """`request.n` completions, in sample order (raise on failure)."""


def problem_seed(seed: int, benchmark: str, problem_id: int) -> int:
    """A 31-bit seed for one problem, stable across runs and resumes."""
    h = hashlib.blake2b(f"{seed}/{benchmark}/{problem_id}".encode(), digest_size=8).digest()
    return int.from_bytes(h, "little") & 0x7FFFFFFF


def sampling_config(temperature: float, top_p: float, top_k: int, max_new_tokens: int,
                    stop_token_ids: Sequence[int] = ()) -> SamplingConfig:
    return SamplingConfig(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, top_k=top_k,
                          stop_token_ids=tuple(sorted(set(int(t) for t in stop_token_ids))))


def default_client_config(n_samples: int, concurrency: int, num_servers: int = 1, *,
                          request_timeout_s: float = 3600.0, max_retries: int = 5) -> ClientConfig:
    """Client settings for evaluation: one request carries all samples of a problem; enough requests may be in
    flight per server for every problem of `concurrency` to run; long requests (thinking traces) are allowed."""
    per_server = max(1, -(-concurrency // max(1, num_servers)))
    try:
        return ClientConfig(request_timeout_s=request_timeout_s, max_retries=max_retries,
                            samples_per_request=n_samples, max_inflight_per_server=per_server,
                            rollout_timeout_s=max(request_timeout_s * 4, 3600.0))
    except ValueError as e:
        raise EvalError(f"{e}. Fix: check --request-timeout (> 0) and --max-retries (>= 0)") from None


class RolloutGenerator:
    """`Generator` backed by `RolloutClient` (see module docstring)."""

    def __init__(self, urls: Sequence[str], config: ClientConfig, *, on_server_error=None,
                 client: Optional[RolloutClient] = None):
        self.client = client or RolloutClient(list(urls), config, on_server_error=on_server_error)

    def generate(self, request: GenerationRequest) -> list[Completion]:
        groups = self.client.generate([list(request.prompt_ids)], request.n, request.sampling)
        return [Completion(tuple(s.output_ids), tuple(s.output_logprobs), s.finish_type or "unknown",
                           s.weight_version) for s in groups[0]]


def with_seed(sampling: SamplingConfig, seed: int) -> SamplingConfig:
    return replace(sampling, seed=seed)
