"""The built-in rollout server over real loopback HTTP: generation, batching, sampling parameters, errors.

The server runs in this process (HTTP thread + scheduler thread) on a free port; requests go through sockets with
`urllib`. Greedy outputs and every log-prob are checked against a plain transformers forward of the same model
(no KV cache, no padding), so the server's batched, left-padded, KV-cached decoding must be right, not just
self-consistent. Tolerance 1e-4 on log-probs: fp32, the same weights, only the summation order differs (SDPA with
a padding mask, cached K/V).
"""

from __future__ import annotations

import json
import threading
import time
import urllib.error
import urllib.request

import pytest
import torch

from sglang_rollout.builtin_server import BuiltinServer, ServerArgs
from sglang_rollout.contract import ENDPOINTS
from sglang_rollout.testing import make_tiny_hf_model

LP_ATOL = 1e-4
PROMPT = [5, 17, 33, 101, 7]


def call(url, path, body=None, *, method="POST", raw=None, headers=None, timeout=60):
    data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
    req = urllib.request.Request(url + path, data=data, method=method,
                                 headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            text = r.read().decode()
            status = r.status
    except urllib.error.HTTPError as e:
        text, status = e.read().decode(), e.code
    try:
        return status, json.loads(text) if text else None
    except json.JSONDecodeError:
        return status, text


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_tiny_hf_model(str(tmp_path_factory.mktemp("tiny") / "hf"), seed=0)


@pytest.fixture(scope="module")
def server(model_dir):
    s = BuiltinServer(ServerArgs(model_path=model_dir, port=0, random_seed=1)).start()
    yield s
    s.shutdown()


@pytest.fixture(scope="module")
def hf(model_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()


@torch.no_grad()
def hf_logprobs(hf, ids, temperature=1.0):
    """log p(x_t | x_<t), t>=1, from one unpadded, uncached forward."""
    logits = hf(torch.tensor([ids])).logits[0].float() / temperature
    return torch.log_softmax(logits[:-1], -1).gather(-1, torch.tensor(ids[1:]).unsqueeze(-1)).squeeze(-1)


@torch.no_grad()
def hf_greedy(hf, ids, n):
    ids = list(ids)
    for _ in range(n):
        ids.append(int(hf(torch.tensor([ids])).logits[0, -1].argmax()))
    return ids[-n:]


def gen(server, prompt=PROMPT, **sp):
    body = {"input_ids": prompt, "sampling_params": sp, "return_logprob": True}
    status, out = call(server.url, "/generate", body)
    assert status == 200, out
    return out


def test_health_model_info_and_api_key(model_dir):
    s = BuiltinServer(ServerArgs(model_path=model_dir, port=0, api_key="sekret")).start()
    try:
        assert call(s.url, "/health", method="GET")[0] == 200  # /health needs no key (as SGLang)
        status, out = call(s.url, "/model_info", method="GET")
        assert status == 401 and "error" in out
        auth = {"Authorization": "Bearer sekret"}
        status, info = call(s.url, "/model_info", method="GET", headers=auth)
        assert status == 200
        for key in ("model_path", "served_model_name", "tokenizer_path", "is_generation", "weight_version",
                    "model_type", "architectures", "preferred_sampling_params", "load_format"):
            assert key in info, key
        assert info["weight_version"] == "default" and info["model_type"] == "qwen3" and info["is_generation"]
        bad = {"Authorization": "Bearer wrong"}
        assert call(s.url, "/generate", {"input_ids": [1]}, headers=bad)[0] == 401
        assert call(s.url, "/generate", {"input_ids": [1], "sampling_params": {"max_new_tokens": 1}},
                    headers=auth)[0] == 200
    finally:
        s.shutdown()


def test_generate_response_shapes(server):
    out = gen(server, max_new_tokens=6, temperature=0)
    assert set(out) == {"text", "output_ids", "meta_info"}
    meta = out["meta_info"]
    assert meta["finish_reason"] == {"type": "length", "length": 6}
    assert meta["prompt_tokens"] == len(PROMPT) and meta["completion_tokens"] == 6
    assert meta["weight_version"] == "default" and isinstance(meta["id"], str)
    lps = meta["output_token_logprobs"]
    assert [e[1] for e in lps] == out["output_ids"] and all(isinstance(e[0], float) and e[0] <= 0 for e in lps)
    assert all(e[2] is None for e in lps)

    # batch input: a JSON array in input order, each keeping its rid
    body = {"input_ids": [PROMPT, [9, 8], [3]], "rid": ["a", "b", "c"],
            "sampling_params": {"max_new_tokens": 3, "temperature": 0}, "return_prompt_token_ids": True}
    status, outs = call(server.url, "/generate", body)
    assert status == 200 and isinstance(outs, list) and len(outs) == 3
    assert [o["meta_info"]["id"] for o in outs] == ["a", "b", "c"]
    assert [o["prompt_token_ids"] for o in outs] == [PROMPT, [9, 8], [3]]
    assert "output_token_logprobs" not in outs[0]["meta_info"]  # return_logprob not asked

    # n > 1: an array, prompt-major, fresh rids (as SGLang)
    status, outs = call(server.url, "/generate", {"input_ids": [PROMPT, [9, 8]],
                                                  "sampling_params": {"max_new_tokens": 2, "n": 3}})
    assert status == 200 and len(outs) == 6
    assert [o["meta_info"]["prompt_tokens"] for o in outs] == [5, 5, 5, 2, 2, 2]
    assert len({o["meta_info"]["id"] for o in outs}) == 6


def test_greedy_matches_transformers_solo_and_in_a_padded_batch(server, hf):
    n = 12
    want = hf_greedy(hf, PROMPT, n)
    solo = gen(server, max_new_tokens=n, temperature=0)
    assert solo["output_ids"] == want
    assert gen(server, max_new_tokens=n, temperature=0)["output_ids"] == want  # deterministic
    ref_lp = hf_logprobs(hf, PROMPT + want)[-n:]
    got_lp = torch.tensor([e[0] for e in solo["meta_info"]["output_token_logprobs"]])
    torch.testing.assert_close(got_lp, ref_lp, atol=LP_ATOL, rtol=0)

    # the same prompt left-padded inside a batch with longer and shorter prompts
    others = [[1] * 11, [4, 4]]
    body = {"input_ids": [others[0], PROMPT, others[1]], "sampling_params": {"max_new_tokens": n, "temperature": 0},
            "return_logprob": True}
    status, outs = call(server.url, "/generate", body)
    assert status == 200
    assert outs[1]["output_ids"] == want
    assert outs[0]["output_ids"] == hf_greedy(hf, others[0], n)
    assert outs[2]["output_ids"] == hf_greedy(hf, others[1], n)


def test_sampled_logprobs_match_temperature_scaled_distribution(server, hf):
    out = gen(server, max_new_tokens=8, temperature=0.7, sampling_seed=3)
    ids = out["output_ids"]
    ref = hf_logprobs(hf, PROMPT + ids, temperature=0.7)[-len(ids):]
    got = torch.tensor([e[0] for e in out["meta_info"]["output_token_logprobs"]])
    torch.testing.assert_close(got, ref, atol=LP_ATOL, rtol=0)


def test_seed_reproducibility(server):
    a = gen(server, max_new_tokens=10, sampling_seed=42)["output_ids"]
    b = gen(server, max_new_tokens=10, sampling_seed=42)["output_ids"]
    c = gen(server, max_new_tokens=10, sampling_seed=43)["output_ids"]
    d, e = (gen(server, max_new_tokens=10)["output_ids"] for _ in range(2))
    assert a == b
    assert a != c  # 10 tokens from a ~flat 509-way distribution: a collision is ~impossible
    assert d != e  # unseeded requests draw fresh seeds


def test_top_k_one_and_tiny_top_p_equal_greedy_and_top_k_restricts(server, hf):
    greedy = gen(server, max_new_tokens=8, temperature=0)["output_ids"]
    assert gen(server, max_new_tokens=8, temperature=1.0, top_k=1, sampling_seed=5)["output_ids"] == greedy
    assert gen(server, max_new_tokens=8, temperature=1.0, top_p=1e-6, sampling_seed=5)["output_ids"] == greedy
    k = 3
    ids = gen(server, max_new_tokens=10, temperature=1.0, top_k=k, sampling_seed=9)["output_ids"]
    with torch.no_grad():
        logits = hf(torch.tensor([PROMPT + ids])).logits[0, len(PROMPT) - 1:-1]
    topk = logits.topk(k, dim=-1).indices
    assert all(tok in topk[i].tolist() for i, tok in enumerate(ids))
    unrestricted = gen(server, max_new_tokens=10, temperature=1.0, sampling_seed=9)["output_ids"]
    with torch.no_grad():
        logits = hf(torch.tensor([PROMPT + unrestricted])).logits[0, len(PROMPT) - 1:-1]
    # without top-k the sampled tokens are mostly outside the top 3 of ~509 near-uniform choices
    assert sum(tok in logits.topk(k, -1).indices[i].tolist() for i, tok in enumerate(unrestricted)) < 5


def test_stop_token_ids_min_new_tokens_and_max_new_tokens(server):
    greedy = gen(server, max_new_tokens=10, temperature=0)["output_ids"]
    stop = greedy[3]
    first = greedy.index(stop)
    out = gen(server, max_new_tokens=10, temperature=0, stop_token_ids=[stop])
    assert out["output_ids"] == greedy[:first + 1]  # the matched stop token is part of the output
    assert out["meta_info"]["finish_reason"] == {"type": "stop", "matched": stop}
    assert len(out["meta_info"]["output_token_logprobs"]) == first + 1

    # min_new_tokens masks the stop token until then
    out = gen(server, max_new_tokens=10, temperature=0, stop_token_ids=[greedy[0]], min_new_tokens=4)
    assert len(out["output_ids"]) >= 4 and greedy[0] not in out["output_ids"][:4]

    for n in (1, 7):
        out = gen(server, max_new_tokens=n, temperature=0)
        assert len(out["output_ids"]) == n and out["meta_info"]["finish_reason"] == {"type": "length", "length": n}


def test_eos_stops_unless_ignore_eos(tmp_path, hf):
    greedy = hf_greedy(hf, PROMPT, 6)
    eos = greedy[2]
    d = make_tiny_hf_model(str(tmp_path / "eos"), seed=0, eos_token_id=eos)  # same weights, that token is EOS
    with BuiltinServer(ServerArgs(model_path=d, port=0)) as s:
        out = gen(s, max_new_tokens=6, temperature=0)
        assert out["output_ids"] == greedy[:greedy.index(eos) + 1]
        assert out["meta_info"]["finish_reason"] == {"type": "stop", "matched": eos}
        out = gen(s, max_new_tokens=6, temperature=0, ignore_eos=True)
        assert out["output_ids"] == greedy and out["meta_info"]["finish_reason"]["type"] == "length"


def test_prefill_only_input_logprobs(server, hf):
    ids = PROMPT + [44, 45, 46]
    for t in (1.0, 0.5):
        body = {"input_ids": ids, "sampling_params": {"max_new_tokens": 0, "temperature": t},
                "return_logprob": True, "logprob_start_len": 0}
        status, out = call(server.url, "/generate", body)
        assert status == 200
        assert out["output_ids"] == [] and out["meta_info"]["finish_reason"] == {"type": "length", "length": 0}
        entries = out["meta_info"]["input_token_logprobs"]
        assert [e[1] for e in entries] == ids and entries[0][0] is None
        torch.testing.assert_close(torch.tensor([e[0] for e in entries[1:]]), hf_logprobs(hf, ids, t),
                                   atol=LP_ATOL, rtol=0)
    body["logprob_start_len"] = 3
    status, out = call(server.url, "/generate", body)
    assert [e[1] for e in out["meta_info"]["input_token_logprobs"]] == ids[3:]


@pytest.mark.parametrize(
    "body, status, needle",
    [
        (b"{not json", 400, "invalid JSON"),
        ({"input_ids": [1, 2], "sampling_params": {"bogus": 1}}, 400, "unknown field 'bogus'"),
        ({"input_ids": [1, 2], "sampling_params": {"max_new_tokens": "8"}}, 400, 'invalid type: string "8"'),
        ({"input_ids": [1, 2], "sampling_params": {"temperature": True}}, 400, "invalid type: boolean"),
        ({"input_ids": "1 2"}, 400, "input_ids: invalid type"),
        ({"sampling_params": {}}, 400, "exactly one of text, input_ids"),
        ({"text": "hello"}, 400, "no tokenizer"),
        ({"input_ids": [1, 2], "sampling_params": {"top_k": 0}}, 400, "top_k"),
        ({"input_ids": [1, 2], "sampling_params": {"top_p": 0}}, 400, "top_p"),
        ({"input_ids": [1, 2], "sampling_params": {"max_new_tokens": -1}}, 400, "max_new_tokens"),
        ({"input_ids": [1, 99999]}, 400, "out of range"),
        ({"input_ids": [1, 2], "sampling_params": {"regex": "a+"}}, 400, "not implemented by the built-in"),
        ({"input_ids": [[1], [2]], "rid": ["only-one"]}, 400, "1 values for a batch of 2"),
    ],
)
def test_bad_generate_requests_are_400_with_error(server, body, status, needle):
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    got, out = call(server.url, "/generate", raw=raw)
    assert got == status and isinstance(out, dict) and isinstance(out["error"], str), out
    assert needle in out["error"], out["error"]


def test_routing_errors_and_unknown_top_level_keys(server):
    assert call(server.url, "/nope", {})[0] == 404
    assert call(server.url, "/generate", method="GET")[0] == 405
    # unknown top-level keys pass (SGLang ignores them); unknown sampling keys do not (above)
    status, _ = call(server.url, "/generate", {"input_ids": [1, 2], "sampling_params": {"max_new_tokens": 1},
                                               "some_future_field": 1})
    assert status == 200
    status, out = call(server.url, "/update_weights_from_disk", {})
    assert status == 400 and "missing required field 'model_path'" in out["error"]
    status, out = call(server.url, "/get_model_info", method="GET")  # deprecated alias
    assert status == 200 and out["model_type"] == "qwen3"


def _in_thread(fn):
    box = {}
    t = threading.Thread(target=lambda: box.setdefault("out", fn()), daemon=True)
    t.start()
    return t, box


def _wait_running(server, timeout=10):
    deadline = time.monotonic() + timeout
    while not server.api.scheduler.num_running() and time.monotonic() < deadline:
        time.sleep(0.005)
    assert server.api.scheduler.num_running(), "request did not start"


def test_pause_abort_in_place_continue_and_flush(server):
    long = {"max_new_tokens": 400, "temperature": 1.0, "ignore_eos": True}
    # abort mode: the running request comes back with an abort finish_reason
    t, box = _in_thread(lambda: gen(server, **long))
    _wait_running(server)
    assert call(server.url, "/pause_generation", {"mode": "abort"}) == (
        200, {"message": "Generation paused successfully.", "status": "ok"})
    t.join(30)
    reason = box["out"]["meta_info"]["finish_reason"]
    assert reason["type"] == "abort" and len(box["out"]["output_ids"]) < 400
    assert call(server.url, "/flush_cache", method="POST")[0] == 200  # nothing running
    # while paused, new requests wait
    t, box = _in_thread(lambda: gen(server, max_new_tokens=2))
    time.sleep(0.3)
    assert "out" not in box
    assert call(server.url, "/continue_generation", {})[1]["status"] == "ok"
    t.join(30)
    assert box["out"]["meta_info"]["finish_reason"]["type"] == "length"

    # in_place: the running request is held, flush refuses, then it finishes normally after continue
    t, box = _in_thread(lambda: gen(server, **long))
    _wait_running(server)
    assert call(server.url, "/pause_generation", {"mode": "in_place"})[0] == 200
    status, text = call(server.url, "/flush_cache", method="POST")
    assert status == 400 and "pending requests" in text
    time.sleep(0.2)
    assert "out" not in box
    call(server.url, "/continue_generation", {})
    t.join(60)
    assert box["out"]["meta_info"]["finish_reason"] == {"type": "length", "length": 400}


def test_release_resume_memory_follow_sglangs_rules(server, model_dir):
    """200 null as SGLang; SGLang's bookkeeping (null/empty tags = every type, resuming a type that is not released
    fails, releasing needs an idle server); while released, generation and (weights) updates are refused, and a
    refused update changes nothing. Calls are counted in /server_info and logged."""
    rel, res = "/release_memory_occupation", "/resume_memory_occupation"
    info = lambda: call(server.url, "/server_info", method="GET")[1]  # noqa: E731
    calls0, version0 = info()["memory_calls"], info()["weight_version"]
    assert call(server.url, rel, {"tags": ["weights", "kv_cache"]}) == (200, None)
    assert info()["memory_released"] == ["kv_cache", "weights"]
    status, body = call(server.url, rel, {"tags": ["weights"]})
    assert status == 400 and "already released" in body["error"]
    status, body = call(server.url, "/generate", {"input_ids": PROMPT, "sampling_params": {"max_new_tokens": 2}})
    assert status == 400 and "memory is released" in body["error"]
    status, body = call(server.url, "/update_weights_from_disk", {"model_path": model_dir, "weight_version": "x"})
    assert status == 400 and not body["success"] and "weights are released" in body["message"]
    assert info()["weight_version"] == version0
    status, body = call(server.url, res, {"tags": ["cuda_graph"]})  # never released: SGLang's KeyError
    assert status == 400 and "not released" in body["error"]
    status, body = call(server.url, res, {"tags": ["bogus"]})
    assert status == 400 and "unknown memory type" in body["error"]
    assert call(server.url, res, {"tags": ["weights"]}) == (200, None)
    assert call(server.url, "/update_weights_from_disk", {"model_path": model_dir,
                                                          "weight_version": version0})[1]["success"]
    assert call(server.url, res, {"tags": ["kv_cache"]}) == (200, None)
    assert info()["memory_released"] == []
    assert len(gen(server, max_new_tokens=3, temperature=0.0)["output_ids"]) == 3
    # null and empty tags: every type (weights, KV cache, CUDA graphs), both ways; GET works too
    assert call(server.url, rel, {}) == (200, None)
    assert info()["memory_released"] == ["cuda_graph", "kv_cache", "weights"]
    assert call(server.url, res, {"tags": []}) == (200, None)
    assert call(server.url, rel, method="GET") == (200, None)
    assert call(server.url, res, {"tags": None}) == (200, None)
    calls = info()["memory_calls"]
    assert (calls["release"] - calls0["release"], calls["resume"] - calls0["resume"]) == (3, 4)
    # a busy server refuses to release (SGLang asserts is_fully_idle)
    t, box = _in_thread(lambda: gen(server, max_new_tokens=400, temperature=1.0, ignore_eos=True))
    _wait_running(server)
    status, body = call(server.url, rel, {})
    assert status == 400 and "idle" in body["error"]
    t.join(60)
    assert info()["memory_released"] == [] and box["out"]["meta_info"]["finish_reason"]["type"] == "length"


def test_every_builtin_route_is_in_the_contract_table():
    from sglang_rollout.builtin_server.api import ROUTES

    aliases = {"/get_model_info", "/get_server_info"}
    for path, (methods, _) in ROUTES.items():
        if path in aliases:
            continue
        assert path in ENDPOINTS, path
        assert set(methods) == set(ENDPOINTS[path].methods), path
