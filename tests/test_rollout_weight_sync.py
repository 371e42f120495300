"""Weight sync by disk and by tensor to the built-in server: after a sync, /generate log-probs are the new
weights' log-probs; versions are stamped on /model_info and on every sample; plans and failures behave.

The server starts with model A (seed 0); the trainer side holds model B (seed 1, same architecture). Log-probs of
a fixed sequence are compared with a plain transformers forward of A and of B: atol 1e-4 (fp32, same weights,
only summation order differs), while A and B differ by ~1e-2 or more on every token.
"""

from __future__ import annotations

import os
import threading
import time

import pytest
import torch

from sglang_rollout.builtin_server import BuiltinServer, ServerArgs
from sglang_rollout.rollout_client import ClientConfig, RolloutClient, SamplingConfig
from sglang_rollout.http_client import HttpClient
from sglang_rollout.server_client import ServerClient
from sglang_rollout.testing import make_tiny_hf_model
from sglang_rollout.weight_sync import (
    BucketPlan,
    DiskTransport,
    PlanMismatch,
    TensorSpec,
    TensorTransport,
    WeightSync,
    WeightSyncError,
)

SEQ = [3, 14, 15, 92, 65, 35, 89, 79, 32, 38]
ATOL = 1e-4


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    from transformers import AutoModelForCausalLM

    root = tmp_path_factory.mktemp("models")
    a = make_tiny_hf_model(str(root / "a"), seed=0)
    b = make_tiny_hf_model(str(root / "b"), seed=1)
    load = lambda d: AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).eval()  # noqa: E731
    return a, load(a), load(b)


@pytest.fixture
def server(models):
    s = BuiltinServer(ServerArgs(model_path=models[0], port=0)).start()
    yield s
    s.shutdown()


@torch.no_grad()
def ref_logprobs(hf, ids):
    logits = hf(torch.tensor([ids])).logits[0].float()
    return torch.log_softmax(logits[:-1], -1).gather(-1, torch.tensor(ids[1:]).unsqueeze(-1)).squeeze(-1)


def served(url):
    return torch.tensor(RolloutClient([url]).logprobs(SEQ))


def servers_of(*s):
    http = HttpClient()
    return [ServerClient(x.url, http, timeout_s=60) for x in s]


def assert_serves(url, hf):
    torch.testing.assert_close(served(url), ref_logprobs(hf, SEQ), atol=ATOL, rtol=0)


def test_reference_models_differ(models):
    _, a, b = models
    assert (ref_logprobs(a, SEQ) - ref_logprobs(b, SEQ)).abs().min() > 1e-3  # else the sync tests prove nothing


@pytest.mark.parametrize("transport", ["disk", "tensor-flattened", "tensor-direct"])
def test_sync_changes_served_logprobs_to_the_new_weights(server, models, tmp_path, transport):
    base, a, b = models
    assert_serves(server.url, a)
    if transport == "disk":
        tr = DiskTransport(str(tmp_path / "sync"), base_model_path=base, keep=1)
    else:
        tr = TensorTransport(load_format="flattened_bucket" if transport == "tensor-flattened" else None)
    sync = WeightSync(servers_of(server), tr, bucket_bytes=64 << 10)  # ~64 KiB: many buckets
    rep = sync.sync(b.state_dict().items(), version="step-1")
    assert rep.buckets > 3 and rep.tensors == len(b.state_dict())
    assert set(rep.timing) >= {"pause", "flush", "export", "send", "finish", "continue", "total"}
    assert_serves(server.url, b)
    info = ServerClient(server.url, HttpClient()).model_info()
    assert info["weight_version"] == "step-1"
    s = RolloutClient([server.url]).generate([[1, 2, 3]], n=2, sampling=SamplingConfig(max_new_tokens=3))
    assert {x.weight_version for x in s[0]} == {"step-1"}
    if transport == "disk":
        folders = os.listdir(tmp_path / "sync")
        assert folders == ["weights_step-1"]
        files = os.listdir(tmp_path / "sync" / "weights_step-1")
        assert "config.json" in files and "model.safetensors.index.json" in files

    # second sync back to A follows the recorded plan (no look-ahead) and restores A's log-probs
    plan = sync.plan
    sync.sync(a.state_dict().items(), version="step-2")
    assert sync.plan is plan
    assert_serves(server.url, a)
    if transport == "disk":
        assert os.listdir(tmp_path / "sync") == ["weights_step-2"]  # keep=1 pruned step-1


def test_sync_accepts_buckets_and_a_changed_stream_is_refused(server, models):
    _, a, b = models
    sync = WeightSync(servers_of(server), TensorTransport(), bucket_bytes=1 << 20)
    items = list(b.state_dict().items())
    sync.sync([items[:5], items[5:]], version="v1")  # buckets in, any cut
    assert_serves(server.url, b)
    with pytest.raises(WeightSyncError, match="differs from the bucket plan"):
        sync.sync(items[1:], version="v2")
    with pytest.raises(WeightSyncError, match="more tensors than the plan"):
        sync.sync(items + [("extra.weight", torch.zeros(2))], version="v2")


def test_failed_update_keeps_old_weights_version_and_leaves_servers_paused(server, models):
    _, a, b = models
    items = [(n, t.clone()) for n, t in b.state_dict().items()]
    bad = [(n, t[:-1] if n == "model.norm.weight" else t) for n, t in items]
    sync = WeightSync(servers_of(server), TensorTransport(), bucket_bytes=1 << 30)  # one bucket: all or nothing
    with pytest.raises(WeightSyncError, match=r"model.norm.weight.*shape.*Servers are left paused"):
        sync.sync(bad, version="broken")
    assert server.api.scheduler.paused
    srv = ServerClient(server.url, HttpClient())
    assert srv.model_info()["weight_version"] == "default"
    srv.continue_generation()
    assert_serves(server.url, a)  # nothing of B was applied
    with pytest.raises(WeightSyncError, match="unknown weight 'model.nope'"):
        WeightSync(servers_of(server), TensorTransport()).sync([("model.nope", torch.zeros(3))], "x")
    srv.continue_generation()


def test_sync_during_a_rollout_retries_aborted_samples_with_the_new_version(server, models):
    _, a, b = models
    client = RolloutClient([server.url], ClientConfig(samples_per_request=1, max_inflight_per_server=4,
                                                      backoff_base_s=0.05))
    box = {}
    sampling = SamplingConfig(max_new_tokens=300, ignore_eos=True)
    t = threading.Thread(target=lambda: box.setdefault("out", client.generate([[1, 2], [3, 4]], n=4,
                                                                              sampling=sampling)))
    t.start()
    deadline = time.monotonic() + 20
    while not server.api.scheduler.num_running() and time.monotonic() < deadline:
        time.sleep(0.005)
    WeightSync(servers_of(server), TensorTransport()).sync(b.state_dict().items(), version="new")
    t.join(120)
    groups = box["out"]
    assert [len(g) for g in groups] == [4, 4]
    versions = [s.weight_version for g in groups for s in g]
    assert client.stats["aborted_samples"] > 0 and "new" in versions
    assert set(versions) <= {"default", "new"}
    assert all(len(s.output_ids) == 300 for g in groups for s in g)  # retried samples are complete, not cut


def test_release_and_resume_memory_reach_every_server(server, models):
    """Both servers are released (weights + KV cache, while they refuse to generate), then the sync resumes the
    weights, loads the new ones and resumes the KV cache: each server counts one release and two resumes and
    serves the new weights."""
    with BuiltinServer(ServerArgs(model_path=models[0], port=0)) as other:
        clients = servers_of(server, other)
        sync = WeightSync(clients, TensorTransport())
        sync.release_memory()
        for s in (server, other):
            assert s.api.released == {"weights", "kv_cache"}
        with pytest.raises(Exception, match="memory is released"):
            RolloutClient([other.url]).logprobs(SEQ)
        rep = sync.sync(models[2].state_dict().items(), "v", resume_memory=True)
        assert "resume_weights" in rep.timing and "resume_kv_cache" in rep.timing
        for s in (server, other):
            assert s.api.released == set() and s.api.memory_calls == {"release": 1, "resume": 2}
            assert_serves(s.url, models[2])


def test_bucket_plan_cuts_by_bytes_and_dtype():
    f32, bf16 = torch.float32, torch.bfloat16
    specs = [TensorSpec("a", (10,), f32), TensorSpec("b", (10,), f32), TensorSpec("c", (30,), f32),
             TensorSpec("d", (4,), bf16), TensorSpec("e", (4,), f32), TensorSpec("big", (1000,), f32)]
    plan = BucketPlan.build(specs, bucket_bytes=100)
    assert [[s.name for s in b] for b in plan.buckets] == [["a", "b"], ["c"], ["d"], ["e"], ["big"]]
    assert plan.total_bytes == sum(s.nbytes for s in specs) and len(plan) == 5
    with pytest.raises(ValueError, match="bucket_bytes"):
        BucketPlan.build(specs, 0)


def test_bucket_stream_refuses_duplicates():
    from sglang_rollout.weight_sync.buckets import BucketStream

    with pytest.raises(PlanMismatch, match="twice"):
        list(BucketStream(None, 1 << 20)([("a", torch.zeros(1)), ("a", torch.zeros(1))]))
