"""Contract tests: every request body the rollout stack sends is checked field by field against the SGLang
contract table (`sglang_rollout.contract`), and the table itself is checked against docs/SGLANG_HTTP_API.md.

Bodies are recorded at the wire layer (`HttpClient.on_request` sees the JSON exactly as encoded) while the real
client code talks to a built-in server over loopback: generation, scoring, health/info, pause/flush/continue,
memory release/resume, and weight sync through the disk, tensor and distributed transports. Each body is
validated with `strict=True`: names must be in the table, types must match, required fields must be present.
"""

from __future__ import annotations

import dataclasses
import os
import re
import subprocess
import sys

import pytest
import torch

from sglang_rollout.builtin_server import BuiltinServer, ServerArgs
from sglang_rollout.rollout_client import ClientConfig, RolloutClient, SamplingConfig
from sglang_rollout.builtin_server.sampler import SamplingSpec
from sglang_rollout.contract import (ENDPOINTS, SAMPLING_PARAMS, SAMPLING_RULES, ContractError, check_type,
                                     sampling_default, validate_body)
from sglang_rollout.http_client import HttpClient
from sglang_rollout.server_client import ServerClient
from sglang_rollout.testing import free_port, make_tiny_hf_model
from sglang_rollout.weight_sync import DiskTransport, DistributedTransport, TensorTransport, WeightSync

#: every endpoint the rollout stack calls (a new one must be added here and to the contract table)
USED = {
    "/health", "/model_info", "/generate", "/flush_cache", "/pause_generation", "/continue_generation",
    "/release_memory_occupation", "/resume_memory_occupation", "/update_weights_from_disk",
    "/update_weights_from_tensor", "/init_weights_update_group", "/update_weights_from_distributed",
    "/destroy_weights_update_group", "/get_weights_by_name",
}


def _doc_path():
    here = os.path.dirname(os.path.abspath(__file__))
    for p in (os.environ.get("SGLANG_HTTP_API_DOC", ""), os.path.join(here, "..", "shared", "docs",
              "SGLANG_HTTP_API.md"),
              os.path.join(here, "..", "..", "shared", "docs", "SGLANG_HTTP_API.md"),  # shared/ beside the checkout
              "/work/shared/docs/SGLANG_HTTP_API.md"):
        if p and os.path.isfile(p):
            return p
    return None


class Recorder:
    def __init__(self):
        self.calls = []

    def __call__(self, url, method, path, body):
        self.calls.append((method, path, body))


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("m")
    return make_tiny_hf_model(str(root / "a"), seed=0), make_tiny_hf_model(str(root / "b"), seed=1)


@pytest.fixture(scope="module")
def recorded(model_dirs, tmp_path_factory):
    """Drive every client path once against real servers and return the recorded requests."""
    from transformers import AutoModelForCausalLM

    a, b = model_dirs
    new = AutoModelForCausalLM.from_pretrained(b, dtype=torch.float32).state_dict()
    rec = Recorder()
    http = HttpClient(on_request=rec)
    with BuiltinServer(ServerArgs(model_path=a, port=0)) as s:
        client = RolloutClient([s.url], ClientConfig(samples_per_request=3), http=http)
        client.generate([[1, 2, 3], [4, 5]], n=2, sampling=SamplingConfig(max_new_tokens=3))
        client.generate([[1, 2, 3]], n=3, sampling=SamplingConfig(max_new_tokens=2, temperature=0.8, top_p=0.9,
                                                                  top_k=5, min_p=0.01, stop_token_ids=(2, 3),
                                                                  ignore_eos=True, seed=1))
        client.logprobs([1, 2, 3, 4])
        srv = ServerClient(s.url, http)
        assert srv.health()
        srv.model_info()
        srv.get_weights_by_name("model.norm.weight", truncate_size=4)
        servers = [srv]
        tmp = tmp_path_factory.mktemp("sync")
        WeightSync(servers, DiskTransport(str(tmp), base_model_path=a), bucket_bytes=256 << 10).sync(
            new.items(), "disk-1")
        sync = WeightSync(servers, TensorTransport(), bucket_bytes=256 << 10)
        sync.release_memory(["weights", "kv_cache"])
        sync.sync(new.items(), "tensor-1", resume_memory=True)
        WeightSync(servers, TensorTransport(load_format=None)).sync(new.items(), "tensor-2")
    # the distributed transport needs the server in another process (one group name per process)
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "sglang_rollout.builtin_server", "--model-path", a,
                             "--port", str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        srv = ServerClient(f"http://127.0.0.1:{port}", http, timeout_s=60)
        _wait(srv, proc)
        tr = DistributedTransport(master_address="127.0.0.1", master_port=free_port(), backend="gloo",
                                  timeout_s=60)
        sync = WeightSync([srv], tr, bucket_bytes=256 << 10)
        sync.sync(new.items(), "dist-1")
        sync.close()
    finally:
        proc.terminate()
        proc.wait(30)
    return rec.calls


def _wait(srv, proc, timeout=90):
    import time

    deadline = time.monotonic() + timeout
    while not srv.health(timeout_s=2) and time.monotonic() < deadline:
        assert proc.poll() is None, "built-in server subprocess exited"
        time.sleep(0.2)


def test_every_sent_body_matches_the_contract_field_by_field(recorded):
    assert recorded
    for method, path, body in recorded:
        ep = ENDPOINTS[path]
        assert method in ep.methods, f"{method} {path}"
        validate_body(path, body, strict=True)
        if ep.has_body and body is not None:
            fields = ep.field_map()
            for key, value in body.items():  # (what validate_body does, spelled out per field)
                assert any(check_type(value, t) for t in fields[key].types), (path, key, value)
            for f in ep.fields:
                assert not f.required or f.name in body, (path, f.name)


def test_every_used_endpoint_was_exercised(recorded):
    assert {p for _, p, _ in recorded} == USED


def test_generation_bodies_carry_what_training_needs(recorded):
    gens = [b for _, p, b in recorded if p == "/generate"]
    rollouts = [b for b in gens if "rid" in b]
    assert rollouts and all(b["return_logprob"] is True and len(b["rid"]) == len(b["input_ids"]) for b in rollouts)
    seeded = [b for b in rollouts if isinstance(b["sampling_params"], list)]
    assert seeded and all("sampling_seed" in p for b in seeded for p in b["sampling_params"])
    for b in rollouts:
        for p in b["sampling_params"] if isinstance(b["sampling_params"], list) else [b["sampling_params"]]:
            assert "n" not in p or p["n"] == 1  # one sample per rid
    score = [b for b in gens if "rid" not in b]
    assert score == [{"input_ids": [1, 2, 3, 4], "sampling_params": {"max_new_tokens": 0, "temperature": 1.0},
                      "return_logprob": True, "logprob_start_len": 0}]


def test_weight_updates_stamp_the_version_on_the_last_call_only(recorded):
    syncs, cur = [], None  # each sync starts with /pause_generation
    for _, p, b in recorded:
        if p == "/pause_generation":
            cur = []
            syncs.append(cur)
        elif p.startswith("/update_weights_from_") and cur is not None:
            cur.append((p, b.get("weight_version")))
    assert [len(x) for x in syncs][:1] == [1] and len(syncs) == 4  # disk: one call; then tensor x2, distributed
    assert [x[-1][1] for x in syncs] == ["disk-1", "tensor-1", "tensor-2", "dist-1"]
    for x in syncs:
        assert all(v is None for _, v in x[:-1])
    assert sum(len(x) for x in syncs[1:]) > 4  # several buckets per sync: the rule was exercised
    disk = [b for _, p, b in recorded if p == "/update_weights_from_disk"]
    assert len(disk) == 1 and os.path.isdir(disk[0]["model_path"])


def test_validate_body_catches_what_it_should():
    with pytest.raises(ContractError, match="missing required field 'model_path'"):
        validate_body("/update_weights_from_disk", {})
    with pytest.raises(ContractError, match="master_port: invalid type: string"):
        validate_body("/init_weights_update_group", {"master_address": "h", "master_port": "1", "rank_offset": 1,
                                                      "world_size": 2})
    with pytest.raises(ContractError, match="unknown field 'model'"):
        validate_body("/update_weights_from_disk", {"model_path": "x", "model": 1}, strict=True)
    validate_body("/update_weights_from_disk", {"model_path": "x", "model": 1})  # lenient, as SGLang
    with pytest.raises(ContractError, match="shapes: invalid type"):
        validate_body("/update_weights_from_distributed", {"names": ["a"], "dtypes": ["bfloat16"], "shapes": [1]})
    with pytest.raises(ContractError, match="unknown field 'temp'"):
        validate_body("/generate", {"input_ids": [1], "sampling_params": [{"temperature": 1}, {"temp": 1}]})
    with pytest.raises(ContractError, match="invalid type: boolean true, expected int"):
        validate_body("/generate", {"input_ids": [1], "sampling_params": {"top_k": True}})
    with pytest.raises(ContractError, match="exactly one of"):
        validate_body("/generate", {"input_ids": [1], "text": "a"})
    with pytest.raises(ContractError, match="mode="):
        validate_body("/pause_generation", {"mode": "later"})
    assert check_type(1, "float") and not check_type(True, "int") and check_type([[1, 2]], "list[list[int]]")


def test_contract_table_matches_the_doc():
    path = _doc_path()
    if path is None:
        pytest.skip("SGLANG_HTTP_API.md not found (set SGLANG_HTTP_API_DOC)")
    doc = open(path).read()
    rows = {}
    for line in doc.splitlines():
        m = re.match(r"^\| `(/[a-z_]+)`[^|]*\| ([^|]*) \| (.*?) \| ", line)
        if m:
            rows[m.group(1)] = (set(re.findall(r"\b(GET|POST|PUT)\b", m.group(2))), m.group(3))
    for ep_path, ep in ENDPOINTS.items():
        assert ep_path in rows, f"{ep_path} is not in the doc"
        methods, cell = rows[ep_path]
        assert methods == set(ep.methods), ep_path
        required = set(re.findall(r"\*\*`([a-z_]+)`\*\*", cell))
        named = set(re.findall(r"`([a-z_]+)`", cell))
        table = ep.field_map()
        assert required == {f.name for f in ep.fields if f.required}, ep_path
        if ep_path != "/abort_request":  # the doc lists `rid` / `abort_all` (rid is in CONTROL_COMMON)
            assert named <= set(table) | {q.name for q in ep.query}, (ep_path, named - set(table))
    for used in USED:
        assert used in rows
    sp = doc[doc.index("`sampling_params` keys accepted"):doc.index("`meta_info` of a generate result")]
    assert set(re.findall(r"`([a-z_]+)`", sp)) - {"sampling_params", "generate"} == set(SAMPLING_PARAMS)


# ---- one home for the sampling parameters ------------------------------------------------------------------------

#: the one field of each class that is not a `sampling_params` key of the same name
_SEED_KEYS = {SamplingConfig: ("seed", None), SamplingSpec: ("seed", "sampling_seed")}


def _defaults(cls) -> dict:
    return {f.name: f.default for f in dataclasses.fields(cls)}


def test_client_server_and_contract_sampling_defaults_agree_field_by_field():
    """The trainer's `SamplingConfig`, the built-in server's `SamplingSpec` and the contract table name the same
    parameters with the same defaults (SGLang's); a default changed in one of them alone fails here."""
    client, server = _defaults(SamplingConfig), _defaults(SamplingSpec)
    for cls, fields in ((SamplingConfig, client), (SamplingSpec, server)):
        seed_field, seed_key = _SEED_KEYS[cls]
        assert fields.pop(seed_field) is None
        assert seed_key is None or sampling_default(seed_key) is None
        for name, default in fields.items():
            assert name in SAMPLING_PARAMS, (cls.__name__, name)
            assert default == sampling_default(name) and type(default) is type(sampling_default(name)), \
                (cls.__name__, name, default, sampling_default(name))
    for name in client.keys() & server.keys():
        assert client[name] == server[name], name
    assert set(client) <= set(server)  # the server parses every parameter the trainer sends
    assert sampling_default("temperature") == 1.0 and sampling_default("top_k") == -1  # SGLang's, per the doc
    assert sampling_default("stop_token_ids") == () and sampling_default("sampling_seed") is None
    assert SamplingSpec.from_params({}, 10) == SamplingSpec()  # an empty sampling_params means the defaults
    assert SamplingSpec.from_params({k: None for k in server}, 10) == SamplingSpec()


#: one value breaking each trainer-side rule
_CLIENT_BAD = {"max_new_tokens": -1, "temperature": -0.5, "top_p": 0.0, "top_k": 0}


def test_client_and_server_refuse_the_same_values_with_their_messages():
    """Each rule the trainer checks is the server's rule too: the client refuses the value before sending it
    (ValueError with a fix), the built-in server refuses it with a 400 message of SGLang's wording."""
    client_keys = {r.key for r in SAMPLING_RULES if r.client_rule is not None}
    assert client_keys == set(_CLIENT_BAD)
    for key, bad in _CLIENT_BAD.items():
        with pytest.raises(ValueError, match=rf"^rollout\.sampling\.{key}={bad!r}: .*\. Fix: "):
            SamplingConfig(**{key: bad})
        with pytest.raises(ContractError, match=rf"^sampling_params\.{key}={bad!r}: must be"):
            SamplingSpec.from_params({key: bad}, 10)
    with pytest.raises(ValueError, match=r"^rollout\.sampling\.top_k=0: must be -1 or >= 1\. Fix: use -1 to disable$"):
        SamplingConfig(top_k=0)
    with pytest.raises(ContractError, match=r"^sampling_params\.min_new_tokens=9: must be <= max_new_tokens \(8\)$"):
        SamplingSpec.from_params({"max_new_tokens": 8, "min_new_tokens": 9}, 10)
    with pytest.raises(ContractError,
                       match=r"^sampling_params\.stop_token_ids=\(3, 10\): token ids must be in \[0, 10\)$"):
        SamplingSpec.from_params({"stop_token_ids": [3, 10]}, 10)
    # the server alone refuses a non-finite temperature (the trainer sends it; the 400 names it)
    assert SamplingConfig(temperature=float("inf")).temperature == float("inf")
    with pytest.raises(ContractError, match=r"temperature=inf: must be a finite number >= 0"):
        SamplingSpec.from_params({"temperature": float("inf")}, 10)
