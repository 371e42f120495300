"""The distributed transport over gloo: this process is rank 0 of the weight-update group, two built-in server
processes (launched by `ServerManager`) are ranks 1 and 2. Per bucket, `/update_weights_from_distributed` runs on a
thread while this process broadcasts; afterwards both servers serve the new weights (log-probs of a fixed sequence
equal a transformers forward of them, atol 1e-4 as in test_rollout_weight_sync), per-tensor and flattened.
"""

from __future__ import annotations

import pytest
import torch

from sglang_rollout.rollout_client import RolloutClient
from sglang_rollout.http_client import HttpClient
from sglang_rollout.manager import ManagerConfig, ServerConfig, ServerManager
from sglang_rollout.server_client import ServerClient
from sglang_rollout.testing import free_port, make_tiny_hf_model
from sglang_rollout.weight_sync import DistributedTransport, WeightSync, WeightSyncError

SEQ = [3, 14, 15, 92, 65, 35, 89, 79, 32, 38]


@torch.no_grad()
def ref_logprobs(hf, ids):
    logits = hf(torch.tensor([ids])).logits[0].float()
    return torch.log_softmax(logits[:-1], -1).gather(-1, torch.tensor(ids[1:]).unsqueeze(-1)).squeeze(-1)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from transformers import AutoModelForCausalLM

    root = tmp_path_factory.mktemp("dist")
    a = make_tiny_hf_model(str(root / "a"), seed=0, init_scale=0.1)
    b = make_tiny_hf_model(str(root / "b"), seed=1, init_scale=0.1)
    load = lambda d: AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).eval()  # noqa: E731
    cfg = ManagerConfig(servers=tuple(ServerConfig(model_path=a, port=free_port()) for _ in range(2)),
                        startup_timeout_s=120)
    with ServerManager(cfg) as mgr:
        yield mgr, load(a), load(b)


def _check(mgr, hf, version):
    for url in mgr.urls:
        got = torch.tensor(RolloutClient([url]).logprobs(SEQ))
        torch.testing.assert_close(got, ref_logprobs(hf, SEQ), atol=1e-4, rtol=0)
        assert ServerClient(url, HttpClient()).weight_version() == version


def test_broadcast_sync_to_two_servers_per_tensor_and_flattened(setup):
    mgr, a, b = setup
    _check(mgr, a, "default")
    servers = mgr.clients(timeout_s=60)
    for flattened, (model, version) in ((False, (b, "v1")), (True, (a, "v2"))):
        tr = DistributedTransport(master_address="127.0.0.1", master_port=free_port(), backend="gloo",
                                  flattened=flattened, timeout_s=60)
        sync = WeightSync(servers, tr, bucket_bytes=128 << 10)
        try:
            rep = sync.sync(model.state_dict().items(), version)
            assert rep.buckets > 2 and rep.timing["connect"] > 0
            _check(mgr, model, version)
        finally:
            sync.close()  # destroys the group on both ends: the next iteration makes a new one


def test_refused_update_fails_the_sync_names_the_server_and_changes_nothing(setup):
    mgr, a, b = setup
    servers = mgr.clients(timeout_s=60)
    before = [(RolloutClient([u]).logprobs(SEQ), s.weight_version()) for u, s in zip(mgr.urls, servers)]
    tr = DistributedTransport(master_address="127.0.0.1", master_port=free_port(), backend="gloo", timeout_s=60)
    sync = WeightSync(servers, tr)
    try:
        # the broadcast completes (the servers receive), then the load is refused: nothing changes
        with pytest.raises(WeightSyncError, match=r"(?s)phase 'send'.*127.0.0.1:\d+/update_weights_from_distributed.*"
                                                  r"unknown weight 'model.bogus'"):
            sync.sync([("model.bogus", torch.zeros(4))], "bad")
    finally:
        sync.close()
    for s in servers:
        s.continue_generation()  # a failed sync leaves the servers paused
    after = [(RolloutClient([u]).logprobs(SEQ), s.weight_version()) for u, s in zip(mgr.urls, servers)]
    assert after == before


def test_a_server_that_cannot_join_fails_the_connect_at_once_and_close_cleans_up(setup):
    """Both servers already hold a group of that name, so they refuse to join a second one (400): the connect fails
    with their answer at once, not after `timeout_s` of waiting for ranks that will not come. Closing the first
    transport destroys the group on both servers (/server_info lists none), and a new group can then be made."""
    import time

    mgr, a, _ = setup
    servers = mgr.clients(timeout_s=60)
    first = DistributedTransport(master_address="127.0.0.1", master_port=free_port(), backend="gloo", timeout_s=60)
    first.connect(servers)
    try:
        assert all(s.http.request(s.url, "GET", "/server_info", None, timeout_s=10).data["weight_update_groups"]
                   == ["weight_update_group"] for s in servers)
        second = DistributedTransport(master_address="127.0.0.1", master_port=free_port(), backend="gloo",
                                      timeout_s=30)
        t0 = time.monotonic()
        with pytest.raises(Exception, match="already exists"):
            second.connect(servers)
        assert time.monotonic() - t0 < 10 and second.group is None
        second.close(servers)  # nothing to close: no request is sent
    finally:
        first.close(servers)
    assert all(s.http.request(s.url, "GET", "/server_info", None, timeout_s=10).data["weight_update_groups"] == []
               for s in servers)
    sync = WeightSync(servers, DistributedTransport(master_address="127.0.0.1", master_port=free_port(),
                                                    backend="gloo", timeout_s=60))
    try:
        sync.sync(a.state_dict().items(), "again")
        _check(mgr, a, "again")
    finally:
        sync.close()
