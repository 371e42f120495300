"""LoRA adapters on the rollout side: SGLang's LoRA HTTP contract on the built-in server, the client calls, the
adapter-only weight-sync transports and the manager's restart with the current adapter.

Servers are real built-in servers on loopback sockets (in this process, and one `ServerManager` subprocess). The
reference for every adapter is a second server (no LoRA) serving the merged weights W + scale * B @ A, loaded with
`/update_weights_from_disk`: log-probs under ``lora_path`` must equal its log-probs (atol 1e-5, fp32: the same
math, only the summation order differs), while base and adapter log-probs differ by far more.
"""

from __future__ import annotations

import json
import math
import os
import signal
import threading
import time

import pytest
import torch

from sglang_rollout.builtin_server import BuiltinServer, ServerArgs
from sglang_rollout.builtin_server.api import LORA_ROUTES
from sglang_rollout.contract import LORA_ENDPOINTS, LORA_NOT_ENABLED, endpoint, validate_body
from sglang_rollout.http_client import HttpClient
from sglang_rollout.rollout_client import ClientConfig, RolloutClient, SamplingConfig
from sglang_rollout.server_client import ServerClient, UpdateFailed
from sglang_rollout.tensor_payload import flatten_bucket, shared_payload
from sglang_rollout.testing import free_port, make_tiny_hf_model
from sglang_rollout.weight_sync import WeightSync
from sglang_rollout.weight_sync.lora import AdapterDiskTransport, AdapterTensorTransport, peft_config
from test_rollout_builtin_server import call

ATOL = 1e-5
SEQ = [3, 14, 15, 92, 65, 35, 89, 79, 32, 38]
PROMPT = [5, 17, 33, 101, 7]
ALL = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
LAYERS = 4  # tiny qwen3


# ---- helpers --------------------------------------------------------------------------------------------------


def module_shape(kind):
    hidden, inter, kv = 64, 128, 32
    return {"q_proj": (hidden, hidden), "k_proj": (kv, hidden), "v_proj": (kv, hidden), "o_proj": (hidden, hidden),
            "gate_proj": (inter, hidden), "up_proj": (inter, hidden), "down_proj": (hidden, inter)}[kind]


def module_name(layer, kind):
    return f"model.layers.{layer}.{'mlp' if kind in ('gate_proj', 'up_proj', 'down_proj') else 'self_attn'}.{kind}"


def make_adapter(seed, *, r=4, alpha=8.0, targets=ALL, rslora=False, prefix="base_model.model.", layers=LAYERS):
    """(PEFT config dict, {PEFT tensor name: tensor}): random A and nonzero B on every targeted module."""
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for layer in range(layers):
        for kind in targets:
            out_f, in_f = module_shape(kind)
            base = f"{prefix}{module_name(layer, kind)}"
            tensors[f"{base}.lora_A.weight"] = 0.1 * torch.randn(r, in_f, generator=g)
            tensors[f"{base}.lora_B.weight"] = 0.1 * torch.randn(out_f, r, generator=g)
    return peft_config(r=r, lora_alpha=alpha, target_modules=list(targets), use_rslora=rslora), tensors


def write_peft(folder, config, tensors):
    from safetensors.torch import save_file

    os.makedirs(folder, exist_ok=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, os.path.join(folder, "adapter_model.safetensors"))
    with open(os.path.join(folder, "adapter_config.json"), "w") as f:
        json.dump(config, f)
    return str(folder)


def merged_folder(folder, base_dir, config, tensors):
    """The base weights with every adapted Linear replaced by W + scale * B @ A (one safetensors file)."""
    from safetensors.torch import load_file, save_file

    w = load_file(os.path.join(base_dir, "model.safetensors"))
    scale = config["lora_alpha"] / (math.sqrt(config["r"]) if config.get("use_rslora") else config["r"])
    for key, a in tensors.items():
        if key.endswith(".lora_A.weight"):
            mod = key[: -len(".lora_A.weight")].removeprefix("base_model.model.")
            b = tensors[key.replace("lora_A", "lora_B")]
            w[f"{mod}.weight"] = (w[f"{mod}.weight"].double() + scale * (b.double() @ a.double())).float()
    os.makedirs(folder, exist_ok=True)
    save_file(w, os.path.join(folder, "model.safetensors"))
    return str(folder)


def input_logprobs(url, ids=SEQ, lora=None):
    body = {"input_ids": ids, "sampling_params": {"max_new_tokens": 0}, "return_logprob": True,
            "logprob_start_len": 0}
    if lora is not None:
        body["lora_path"] = lora
    status, out = call(url, "/generate", body)
    assert status == 200, out
    return torch.tensor([e[0] for e in out["meta_info"]["input_token_logprobs"][1:]])


def greedy(url, prompt=PROMPT, lora=None, n=8):
    body = {"input_ids": prompt, "sampling_params": {"max_new_tokens": n, "temperature": 0}, "return_logprob": True}
    if lora is not None:
        body["lora_path"] = lora
    status, out = call(url, "/generate", body)
    assert status == 200, out
    return out["output_ids"], torch.tensor([e[0] for e in out["meta_info"]["output_token_logprobs"]])


# ---- fixtures -------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    return make_tiny_hf_model(str(tmp_path_factory.mktemp("tiny") / "hf"), seed=0, init_scale=0.05)


@pytest.fixture(scope="module")
def lora_server(base_dir):
    s = BuiltinServer(ServerArgs(model_path=base_dir, port=0, enable_lora=True, max_lora_rank=8,
                                 lora_target_modules=("all",))).start()
    yield s
    s.shutdown()


@pytest.fixture(scope="module")
def ref_server(base_dir):
    """No LoRA: serves the merged weights of whatever adapter a test asks for (see `merged`)."""
    s = BuiltinServer(ServerArgs(model_path=base_dir, port=0)).start()
    yield s
    s.shutdown()


@pytest.fixture(scope="module")
def merged(ref_server, base_dir, tmp_path_factory):
    """merged(config, tensors) -> the reference server's url, now serving W + scale * B @ A."""
    root = tmp_path_factory.mktemp("merged")
    count = [0]

    def load(config, tensors):
        count[0] += 1
        folder = merged_folder(str(root / f"m{count[0]}"), base_dir, config, tensors)
        status, out = call(ref_server.url, "/update_weights_from_disk", {"model_path": folder})
        assert status == 200 and out["success"], out
        return ref_server.url

    return load


@pytest.fixture(scope="module")
def adapter_x(lora_server, tmp_path_factory):
    """Adapter "x" (r=4 on every module) loaded from a PEFT folder; (config, tensors, folder)."""
    config, tensors = make_adapter(1)
    folder = write_peft(tmp_path_factory.mktemp("peft") / "x", config, tensors)
    status, out = call(lora_server.url, "/load_lora_adapter", {"lora_name": "x", "lora_path": folder})
    assert status == 200 and out["success"] and out["error_message"] is None, out
    return config, tensors, folder


# ---- tests ----------------------------------------------------------------------------------------------------


def test_lora_routes_are_in_the_lora_contract_table():
    for path, (methods, _) in LORA_ROUTES.items():
        assert path in LORA_ENDPOINTS and endpoint(path) is LORA_ENDPOINTS[path]
        assert set(methods) == set(LORA_ENDPOINTS[path].methods) == {"POST"}
    fields = {p: {f.name: f for f in e.fields} for p, e in LORA_ENDPOINTS.items()}
    assert {n for n, f in fields["/load_lora_adapter_from_tensors"].items() if f.required} == {
        "lora_name", "config_dict", "serialized_tensors"}
    assert fields["/load_lora_adapter"]["pinned"].default is False
    validate_body("/generate", {"input_ids": [[1], [2]], "lora_path": ["x", None]}, strict=True)
    with pytest.raises(ValueError, match="lora_path: invalid type"):
        validate_body("/generate", {"input_ids": [[1], [2]], "lora_path": ["x", 3]})
    with pytest.raises(ValueError, match="missing required field 'lora_path'"):
        validate_body("/load_lora_adapter", {"lora_name": "x"})


def test_disk_adapter_logprobs_equal_merged_weights(lora_server, adapter_x, merged, tmp_path):
    config, tensors, _ = adapter_x
    base = input_logprobs(lora_server.url)
    got = input_logprobs(lora_server.url, lora="x")
    assert (got - base).abs().max() > 1e-2  # the adapter changes the model visibly, else this proves nothing
    ref = merged(config, tensors)
    torch.testing.assert_close(got, input_logprobs(ref), atol=ATOL, rtol=0)
    ids, lps = greedy(lora_server.url, lora="x")
    ref_ids, ref_lps = greedy(ref)
    assert ids == ref_ids
    torch.testing.assert_close(lps, ref_lps, atol=ATOL, rtol=0)

    # rsLoRA scale (alpha / sqrt(r)), a subset of modules, keys without the base_model.model. prefix
    config2, tensors2 = make_adapter(2, r=8, alpha=4.0, targets=("q_proj", "v_proj", "down_proj"), rslora=True,
                                     prefix="")
    folder = write_peft(tmp_path / "rs", config2, tensors2)
    assert ServerClient(lora_server.url, HttpClient()).load_lora_adapter("rs", folder)["success"]
    torch.testing.assert_close(input_logprobs(lora_server.url, lora="rs"), input_logprobs(merged(config2, tensors2)),
                               atol=ATOL, rtol=0)
    status, info = call(lora_server.url, "/server_info", method="GET")
    assert info["loaded_adapters"]["rs"]["lora_path"] == folder and info["loaded_adapters"]["x"]["pinned"] is False
    call(lora_server.url, "/unload_lora_adapter", {"lora_name": "rs"})


@pytest.mark.parametrize("load_format", [None, "flattened_bucket"])
def test_tensor_load_equals_disk_load(lora_server, adapter_x, load_format):
    config, tensors, _ = adapter_x
    name = f"t-{load_format}"
    obj = flatten_bucket(list(tensors.items())) if load_format else dict(tensors)
    srv = ServerClient(lora_server.url, HttpClient())
    with shared_payload(obj) as payload:
        out = srv.load_lora_adapter_from_tensors(name, config, payload, load_format=load_format)
    assert out["loaded_adapters"][name]["lora_path"] == "__tensor__" and "x" in out["loaded_adapters"]
    assert torch.equal(input_logprobs(lora_server.url, lora=name), input_logprobs(lora_server.url, lora="x"))
    assert greedy(lora_server.url, lora=name)[0] == greedy(lora_server.url, lora="x")[0]
    srv.unload_lora_adapter(name)


def test_lora_paths_at_start_load_the_adapter_and_give_rank_and_targets(base_dir, lora_server, adapter_x):
    with pytest.raises(ValueError, match="needs both --max-lora-rank and --lora-target-modules"):
        ServerArgs(model_path=base_dir, enable_lora=True)
    with pytest.raises(ValueError, match="not a LoRA-capable module"):
        ServerArgs(model_path=base_dir, enable_lora=True, max_lora_rank=4, lora_target_modules=("lm_head",))
    with BuiltinServer(ServerArgs(model_path=base_dir, port=0, lora_paths=(f"x={adapter_x[2]}",))) as s:
        info = call(s.url, "/server_info", method="GET")[1]
        assert info["enable_lora"] and info["max_lora_rank"] == 4 and info["lora_target_modules"] == list(ALL)
        assert info["loaded_adapters"]["x"]["lora_path"] == adapter_x[2]
        assert torch.equal(input_logprobs(s.url, lora="x"), input_logprobs(lora_server.url, lora="x"))


def test_base_is_unchanged_by_loading_and_unload_refuses_the_name(lora_server, adapter_x, tmp_path):
    before = input_logprobs(lora_server.url)
    config, tensors = make_adapter(3)
    srv = ServerClient(lora_server.url, HttpClient())
    srv.load_lora_adapter("u", write_peft(tmp_path / "u", config, tensors))
    assert torch.equal(input_logprobs(lora_server.url), before)  # no lora_path: the base model, bit for bit
    assert (input_logprobs(lora_server.url, lora="u") - before).abs().max() > 1e-2
    out = srv.unload_lora_adapter("u")
    assert "u" not in out["loaded_adapters"] and "x" in out["loaded_adapters"]
    status, err = call(lora_server.url, "/generate", {"input_ids": SEQ, "lora_path": "u"})
    assert status == 400 and "'u' is not loaded" in err["error"] and "'x'" in err["error"], err
    status, err = call(lora_server.url, "/generate", {"input_ids": [SEQ, SEQ], "lora_path": [None, "nope"]})
    assert status == 400 and "'nope'" in err["error"]
    assert torch.equal(input_logprobs(lora_server.url), before)


def test_errors_change_nothing_and_name_the_problem(lora_server, ref_server, adapter_x, tmp_path):
    url = lora_server.url
    want = input_logprobs(url, lora="x")
    srv = ServerClient(url, HttpClient())

    def load(name, config, tensors, needle):
        folder = write_peft(tmp_path / name, config, tensors)
        status, out = call(url, "/load_lora_adapter", {"lora_name": name, "lora_path": folder})
        assert status == 400 and out["success"] is False and needle in out["error_message"], out
        assert name not in out["loaded_adapters"] and "x" in out["loaded_adapters"]
        torch.testing.assert_close(input_logprobs(url, lora="x"), want, atol=0, rtol=0)  # x still serves

    config, tensors = make_adapter(4)
    load("big", *make_adapter(4, r=16), "rank r=16, which exceeds --max-lora-rank 8")
    bad = dict(tensors)
    bad["base_model.model.model.layers.9.self_attn.q_proj.lora_A.weight"] = torch.zeros(4, 64)
    load("unknown", config, bad, "unknown module 'model.layers.9.self_attn.q_proj'")
    bad = dict(tensors)
    key = "base_model.model.model.layers.0.mlp.up_proj.lora_B.weight"
    bad[key] = torch.zeros(128, 3)
    load("shape", config, bad, f"{key}: shape [128, 3], expected [128, 4]")
    bad = {k: v for k, v in tensors.items() if not k.endswith("layers.1.self_attn.k_proj.lora_B.weight")}
    load("half", config, bad, "model.layers.1.self_attn.k_proj: lora_B is missing")
    load("bias", {**config, "bias": "all"}, tensors, "bias='all'")
    load("ia3", {**config, "peft_type": "IA3"}, tensors, "peft_type='IA3'")
    # the messages SGLang gives, as error_message and through the client
    status, out = call(url, "/load_lora_adapter", {"lora_name": "x", "lora_path": adapter_x[2]})
    assert status == 400 and out["error_message"].startswith("LoRA with name x already exists. Loaded LoRAs: [")
    with pytest.raises(UpdateFailed, match="LoRA with name ghost does not exist. Loaded LoRAs: \\["):
        srv.unload_lora_adapter("ghost")
    with pytest.raises(UpdateFailed, match="no adapter_config.json"):
        srv.load_lora_adapter("empty", str(tmp_path))
    status, out = call(ref_server.url, "/load_lora_adapter", {"lora_name": "x", "lora_path": adapter_x[2]})
    assert (status, out["success"], out["error_message"]) == (400, False, LORA_NOT_ENABLED)
    status, out = call(ref_server.url, "/unload_lora_adapter", {"lora_name": "x"})
    assert status == 400 and out["error_message"] == LORA_NOT_ENABLED
    status, out = call(ref_server.url, "/generate", {"input_ids": SEQ, "lora_path": "x"})
    assert status == 400 and LORA_NOT_ENABLED in out["error"]
    torch.testing.assert_close(input_logprobs(url, lora="x"), want, atol=0, rtol=0)


def test_a_mixed_batch_returns_each_request_as_when_sent_alone(lora_server, adapter_x, tmp_path):
    url = lora_server.url
    config, tensors = make_adapter(5, targets=("o_proj", "up_proj"))
    ServerClient(url, HttpClient()).load_lora_adapter("y", write_peft(tmp_path / "y", config, tensors))
    prompts = [PROMPT, [9, 8, 7], [1] * 11, PROMPT]
    loras = [None, "x", None, "y"]
    alone = [greedy(url, p, lora=lo) for p, lo in zip(prompts, loras)]
    assert alone[0][0] != alone[3][0] or not torch.equal(alone[0][1], alone[3][1])
    batches0 = lora_server.api.scheduler.stats["batches"]
    body = {"input_ids": prompts, "lora_path": loras, "return_logprob": True,
            "sampling_params": {"max_new_tokens": 8, "temperature": 0}}
    status, outs = call(url, "/generate", body)
    assert status == 200 and len(outs) == 4
    for (ids, lps), out in zip(alone, outs):
        assert out["output_ids"] == ids
        torch.testing.assert_close(torch.tensor([e[0] for e in out["meta_info"]["output_token_logprobs"]]), lps,
                                   atol=ATOL, rtol=0)
    assert lora_server.api.scheduler.stats["batches"] - batches0 == 3  # base, x, y: one adapter per batch
    ServerClient(url, HttpClient()).unload_lora_adapter("y")


def test_unload_waits_for_in_flight_requests(lora_server, adapter_x, tmp_path):
    url = lora_server.url
    config, tensors = make_adapter(6)
    lora = lora_server.api.runner.lora
    ServerClient(url, HttpClient()).load_lora_adapter("w", write_peft(tmp_path / "w", config, tensors))
    body = {"input_ids": PROMPT, "lora_path": "w", "sampling_params": {"max_new_tokens": 250, "ignore_eos": True}}
    box = {}
    gen = threading.Thread(target=lambda: box.setdefault("gen", call(url, "/generate", body)))
    gen.start()
    deadline = time.monotonic() + 10
    while not lora_server.api.scheduler.num_running() and time.monotonic() < deadline:
        time.sleep(0.005)
    lora.unload_wait_s = 0.2  # bounded: the unload fails and the adapter stays
    status, out = call(url, "/unload_lora_adapter", {"lora_name": "w"})
    assert status == 400 and "still used by 1 in-flight request" in out["error_message"] and "w" in \
        out["loaded_adapters"]
    lora.unload_wait_s = 30.0
    unload = threading.Thread(target=lambda: box.setdefault("unload", call(url, "/unload_lora_adapter",
                                                                           {"lora_name": "w"})))
    unload.start()
    time.sleep(0.1)
    if gen.is_alive():  # still generating: the unload waits, and the name is already refused
        assert unload.is_alive()
        assert call(url, "/generate", {"input_ids": PROMPT, "lora_path": "w"})[0] == 400
    gen.join(60)
    unload.join(60)
    assert box["gen"][0] == 200 and len(box["gen"][1]["output_ids"]) == 250
    assert box["unload"][0] == 200 and "w" not in box["unload"][1]["loaded_adapters"]


class Recorder:
    def __init__(self):
        self.calls = []

    def __call__(self, url, method, path, body):
        self.calls.append((path, body))


@pytest.mark.parametrize("transport", ["disk", "tensor-flattened", "tensor-dict"])
def test_weight_sync_pushes_the_newest_adapter(lora_server, merged, tmp_path, transport):
    name = f"policy-{transport}"
    adapters = [make_adapter(10), make_adapter(11)]
    # what each adapter should serve (the merged reference), computed before syncing
    want = [input_logprobs(merged(c, t)) for c, t in adapters]
    config = adapters[0][0]
    if transport == "disk":
        tr = AdapterDiskTransport(str(tmp_path / "adapters"), name, config, keep=1)
    else:
        tr = AdapterTensorTransport(name, config, load_format="flattened_bucket" if transport == "tensor-flattened"
                                    else None)
    rec = Recorder()
    srv = ServerClient(lora_server.url, HttpClient(on_request=rec), timeout_s=60)
    sync = WeightSync([srv], tr, bucket_bytes=16 << 10)
    client = RolloutClient([lora_server.url], ClientConfig(lora_path=name))
    for i, (cfg, tensors) in enumerate(adapters):
        version = f"lora-{i + 1}"
        rep = sync.sync(list(tensors.items()), version=version)
        assert rep.bytes == sum(t.numel() * t.element_size() for t in tensors.values()) and rep.buckets > 1
        assert srv.weight_version() == version
        torch.testing.assert_close(torch.tensor(client.logprobs(SEQ)), want[i], atol=ATOL, rtol=0)
        samples = client.generate([[1, 2, 3]], n=2, sampling=SamplingConfig(max_new_tokens=3))
        assert {s.weight_version for g in samples for s in g} == {version}
        loaded = srv.http.request(srv.url, "GET", "/server_info", None, timeout_s=10).data["loaded_adapters"]
        assert loaded[name]["lora_path"] == (tr.last_path if transport == "disk" else "__tensor__")
    if transport == "disk":
        assert os.listdir(tmp_path / "adapters") == ["lora-2"]  # keep=1
        from safetensors.torch import load_file

        stored = load_file(os.path.join(tr.last_path, "adapter_model.safetensors"))
        assert set(stored) == set(adapters[1][1]) and all(torch.equal(stored[k], v) for k, v in adapters[1][1].items())
        assert json.load(open(os.path.join(tr.last_path, "adapter_config.json")))["peft_type"] == "LORA"
    # every body went out as the contract says; the version travels after the (whole) load, once per sync
    paths = [p for p, _ in rec.calls if p != "/generate"]
    for p, b in rec.calls:
        validate_body(p, b, strict=True)
    load = "/load_lora_adapter" if transport == "disk" else "/load_lora_adapter_from_tensors"
    assert paths.count(load) == 2 and paths.count("/unload_lora_adapter") == 1
    assert [p for p in paths if p in (load, "/update_weight_version")] == [load, "/update_weight_version"] * 2
    assert all(b["abort_all_requests"] is False for p, b in rec.calls if p == "/update_weight_version")
    srv.unload_lora_adapter(name)


def test_failed_adapter_sync_keeps_the_old_version(lora_server, adapter_x):
    config, tensors = make_adapter(12, r=4)
    srv = ServerClient(lora_server.url, HttpClient(), timeout_s=60)
    sync = WeightSync([srv], AdapterTensorTransport("policy-fail", config))
    sync.sync(list(tensors.items()), version="good")
    served = input_logprobs(lora_server.url, lora="policy-fail")
    bad = [(k, v[:, :-1] if k.endswith("layers.0.self_attn.q_proj.lora_A.weight") else v) for k, v in tensors.items()]
    with pytest.raises(Exception, match="shape .* expected"):
        WeightSync([srv], AdapterTensorTransport("policy-fail", config)).sync(bad, version="bad")
    assert srv.weight_version() == "good"  # the version never travelled
    srv.continue_generation()
    # the new transport never loaded "policy-fail" itself: it met "already exists", unloaded, then failed to load
    assert call(lora_server.url, "/generate", {"input_ids": SEQ, "lora_path": "policy-fail"})[0] == 400
    sync.sync(list(tensors.items()), version="good-again")  # a later sync restores it
    assert torch.equal(input_logprobs(lora_server.url, lora="policy-fail"), served)
    srv.unload_lora_adapter("policy-fail")


def test_manager_restart_comes_back_with_the_adapter(base_dir, tmp_path):
    """`ServerManager` launches `--enable-lora ...`; after `set_adapter` a killed server restarts with
    `--lora-paths name=folder` and the version, serving the same adapter log-probs."""
    from sglang_rollout.manager import ManagerConfig, ServerConfig, ServerManager, server_command

    cfg = ServerConfig(model_path=base_dir, port=free_port(), enable_lora=True, max_lora_rank=4,
                       lora_target_modules=("q_proj", "v_proj"))
    cmd = server_command(cfg, python="py", weight_version="v", lora_paths=["p=/a"])
    assert cmd[cmd.index("--enable-lora"):] == ["--enable-lora", "--max-lora-rank", "4", "--lora-target-modules",
                                                "q_proj", "v_proj", "--lora-paths", "p=/a", "--weight-version", "v"]
    with pytest.raises(ValueError, match="max_lora_rank"):
        ServerConfig(model_path=base_dir, port=1, enable_lora=True, lora_target_modules=("all",))
    config, tensors = make_adapter(20, targets=("q_proj", "v_proj"))
    with ServerManager(ManagerConfig(servers=(cfg,), health_check_interval_s=0.3, startup_timeout_s=120)) as mgr:
        srv = mgr.clients(timeout_s=60)[0]
        with pytest.raises(UpdateFailed, match="not in the server's --lora-target-modules"):
            srv.load_lora_adapter("g", write_peft(tmp_path / "g", *make_adapter(21, targets=("gate_proj",))))
        tr = AdapterDiskTransport(str(tmp_path / "adapters"), "policy", config)
        sync = WeightSync([srv], tr)
        sync.sync(list(tensors.items()), "a1")
        mgr.set_adapter("policy", tr.last_path, sync.version)
        client = RolloutClient(mgr.urls, ClientConfig(lora_path="policy"))
        before = client.logprobs(SEQ)
        pid0 = mgr.pid(0)
        os.kill(pid0, signal.SIGKILL)
        deadline = time.monotonic() + 90
        while not any("healthy again" in e[2] for e in mgr.events) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert mgr.pid(0) != pid0 and srv.weight_version() == "a1"
        assert client.logprobs(SEQ) == before  # same adapter, same numbers
        sync.sync(list(tensors.items()), "a2")  # unloads the --lora-paths adapter, loads the new one
        assert srv.weight_version() == "a2" and client.logprobs(SEQ) == before
