"""The rollout client against two built-in servers over loopback HTTP: G samples per prompt, seeds, scoring."""

from __future__ import annotations

import pytest
import torch

from sglang_rollout.builtin_server import BuiltinServer, ServerArgs
from sglang_rollout.rollout_client import ClientConfig, RolloutClient, RolloutError, SamplingConfig, derive_seed
from sglang_rollout.testing import make_tiny_hf_model

PROMPTS = [[5, 17, 33], [101, 7], [9, 9, 9, 9, 2 + 1]]


@pytest.fixture(scope="module")
def servers(tmp_path_factory):
    d = make_tiny_hf_model(str(tmp_path_factory.mktemp("tiny") / "hf"), seed=0)
    ss = [BuiltinServer(ServerArgs(model_path=d, port=0, random_seed=i)).start() for i in range(2)]
    yield ss
    for s in ss:
        s.shutdown()


def test_g_samples_per_prompt_across_two_servers(servers):
    client = RolloutClient([s.url for s in servers], ClientConfig(samples_per_request=2, max_inflight_per_server=2))
    G = 4
    out = client.generate(PROMPTS, n=G, sampling=SamplingConfig(max_new_tokens=6, temperature=1.0),
                          batch_id="step7")
    assert len(out) == len(PROMPTS)
    for i, group in enumerate(out):
        assert [s.sample_index for s in group] == list(range(G))
        assert [s.rid for s in group] == [f"step7-{i}-{j}" for j in range(G)]
        for s in group:
            assert s.prompt_index == i and list(s.prompt_ids) == PROMPTS[i]
            assert len(s.output_ids) == len(s.output_logprobs) >= 1
            assert s.finish_type in ("length", "stop") and s.weight_version == "default"
            assert all(lp <= 0 for lp in s.output_logprobs)
    assert {s.server for g in out for s in g} == {srv.url for srv in servers}  # work spread over both
    assert client.stats["retries"] == 0 and client.stats["requests"] == len(PROMPTS) * G // 2


def test_seeded_rollouts_reproduce_and_samples_differ(servers):
    client = RolloutClient([s.url for s in servers])
    sc = SamplingConfig(max_new_tokens=8, seed=1234)
    a = client.generate(PROMPTS, n=3, sampling=sc)
    b = client.generate(PROMPTS, n=3, sampling=sc)  # other batch id, other server placement: same tokens
    assert [[s.output_ids for s in g] for g in a] == [[s.output_ids for s in g] for g in b]
    for g in a:
        assert len({s.output_ids for s in g}) == 3
    assert derive_seed(1234, 0, 0) != derive_seed(1234, 0, 1) != derive_seed(1234, 1, 0)


def test_greedy_rollout_is_deterministic_and_stop_ids_are_sent(servers):
    client = RolloutClient([s.url for s in servers])
    g = client.generate(PROMPTS[:1], n=2, sampling=SamplingConfig(max_new_tokens=6, temperature=0.0))[0]
    assert g[0].output_ids == g[1].output_ids
    stop = g[0].output_ids[2]
    s = client.generate(PROMPTS[:1], n=1, sampling=SamplingConfig(max_new_tokens=6, temperature=0.0,
                                                                  stop_token_ids=(stop,)))[0][0]
    assert s.output_ids[-1] == stop and s.finish_reason == {"type": "stop", "matched": stop}


def test_scored_logprobs_match_the_sampled_ones(servers):
    """Prefill scoring of prompt+response reproduces the decode-time log-probs of the response tokens."""
    client = RolloutClient([s.url for s in servers])
    for t in (1.0, 0.6):
        s = client.generate(PROMPTS[:1], n=1, sampling=SamplingConfig(max_new_tokens=10, temperature=t,
                                                                      seed=7))[0][0]
        scored = client.logprobs(list(s.prompt_ids) + list(s.output_ids), temperature=t)
        assert len(scored) == len(s.prompt_ids) + len(s.output_ids) - 1
        torch.testing.assert_close(torch.tensor(scored[-len(s.output_ids):]), torch.tensor(s.output_logprobs),
                                   atol=1e-4, rtol=0)


def test_api_key_is_sent_and_a_wrong_key_fails_fast(tmp_path):
    d = make_tiny_hf_model(str(tmp_path / "hf"), seed=0)
    with BuiltinServer(ServerArgs(model_path=d, port=0, api_key="k1")) as s:
        ok = RolloutClient([s.url], ClientConfig(api_key="k1"))
        assert len(ok.generate([[1, 2]], n=2, sampling=SamplingConfig(max_new_tokens=2))[0]) == 2
        bad = RolloutClient([s.url], ClientConfig(api_key="nope", max_retries=3))
        with pytest.raises(RolloutError, match="HTTP 401.*not retryable"):
            bad.generate([[1, 2]], n=1, sampling=SamplingConfig(max_new_tokens=2))
        assert bad.stats["retries"] == 0


def test_bad_request_is_not_retried(servers):
    client = RolloutClient([servers[0].url], ClientConfig(max_retries=3))
    with pytest.raises(RolloutError, match="out of range"):
        client.generate([[10**6]], n=1, sampling=SamplingConfig(max_new_tokens=1))
    assert client.stats["retries"] == 0


def test_config_validation_names_the_field():
    with pytest.raises(ValueError, match=r"rollout.sampling.top_p=0"):
        SamplingConfig(top_p=0)
    with pytest.raises(ValueError, match=r"rollout.client.request_timeout_s"):
        ClientConfig(request_timeout_s=0)
