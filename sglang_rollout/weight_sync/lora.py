"""Adapter-only weight sync: push a LoRA adapter (PEFT format) to every server after a training step.

Why: with LoRA training only the adapter changes, so only the adapter travels (a few MB instead of the model),
and the servers keep their base weights and add the adapter per request (SGLang's ``--enable-lora``; requests
name it with ``lora_path``, see `ClientConfig.lora_path`).

Both transports plug into the existing `WeightSync` (pause -> flush -> begin -> send buckets -> finish -> continue);
the buckets are (PEFT tensor name, tensor) pairs, e.g.
``base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight``:

    sync = WeightSync(servers, AdapterDiskTransport(root, "policy", peft_config(r=16, lora_alpha=32,
                                                                               target_modules=["q_proj", ...])))
    sync.sync(adapter_tensors, version="step-12")

* `AdapterDiskTransport` writes ``root/<version>/adapter_config.json + adapter_model.safetensors`` (a valid PEFT
  folder, written to a temporary folder and renamed) and has every server load it with `/load_lora_adapter`.
* `AdapterTensorTransport` sends the tensors with `/load_lora_adapter_from_tensors` (serialised as SGLang expects:
  a dict {name: tensor}, or a flattened bucket; CUDA-IPC / shared memory, same host only), held until every server
  answered.

At `finish`, per server: unload the adapter name if this transport loaded it before (a server that says it does not
exist, e.g. restarted, is fine; a server that already has the name, e.g. started with ``--lora-paths``, is unloaded
and loaded again) -> load the new adapter -> flush the cache -> `/update_weight_version` (abort_all_requests=false).
The version goes last, only once the whole adapter is loaded: a failed load leaves the server announcing its old
version (and `WeightSync` leaves the servers paused; between the unload and a failed load the server has no adapter
of that name, so nothing must be served until a sync succeeds). SGLang refuses to load a name that exists, hence the
unload first.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
from typing import Any, Mapping, Optional, Sequence

from sglang_rollout.server_client import ServerClient, UpdateFailed
from sglang_rollout.tensor_payload import flatten_bucket, shared_payload
from sglang_rollout.weight_sync.transports import NamedTensors, Transport, call_all, flush_until_idle, safe_version

log = logging.getLogger(__name__)

__all__ = ["AdapterDiskTransport", "AdapterTensorTransport", "peft_config", "check_peft_config",
           "check_adapter_names"]

_SUFFIXES = (".lora_A.weight", ".lora_B.weight")


def peft_config(*, r: int, lora_alpha: float, target_modules: Sequence[str], use_rslora: bool = False,
                base_model_name_or_path: Optional[str] = None, **extra: Any) -> dict:
    """A PEFT ``adapter_config.json`` (as a dict) for a plain LoRA adapter: what both transports send."""
    cfg = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "r": r,
        "lora_alpha": lora_alpha,
        "target_modules": list(target_modules),
        "lora_dropout": 0.0,
        "bias": "none",
        "use_rslora": use_rslora,
        "use_dora": False,
        "fan_in_fan_out": False,
        "modules_to_save": None,
        "base_model_name_or_path": base_model_name_or_path,
        "inference_mode": True,
    }
    cfg.update(extra)
    check_peft_config(cfg)
    return cfg


def check_peft_config(config: Mapping[str, Any]) -> None:
    """Refuse a config SGLang's LoRA loader would refuse, before anything is sent (ValueError naming the field)."""
    if not isinstance(config, Mapping):
        raise ValueError(f"lora config_dict: expected a dict (the PEFT adapter_config.json), got {type(config)}")
    if config.get("peft_type") != "LORA":
        raise ValueError(f"lora config_dict.peft_type={config.get('peft_type')!r}: must be 'LORA'. Fix: build it with "
                         "sglang_rollout.weight_sync.lora.peft_config(...)")
    r = config.get("r")
    if not isinstance(r, int) or isinstance(r, bool) or r < 1:
        raise ValueError(f"lora config_dict.r={r!r}: must be an integer >= 1 (the adapter's rank)")
    alpha = config.get("lora_alpha")
    if not isinstance(alpha, (int, float)) or isinstance(alpha, bool):
        raise ValueError(f"lora config_dict.lora_alpha={alpha!r}: must be a number (scale = lora_alpha / r)")
    tm = config.get("target_modules")
    if not isinstance(tm, (list, tuple)) or not tm or not all(isinstance(t, str) for t in tm):
        raise ValueError(f"lora config_dict.target_modules={tm!r}: must be a non-empty list of HF module names, "
                         "e.g. ['q_proj', 'k_proj', 'v_proj', 'o_proj']")
    if config.get("bias", "none") != "none":
        raise ValueError(f"lora config_dict.bias={config.get('bias')!r}: must be 'none'")
    try:
        json.dumps(dict(config))
    except (TypeError, ValueError) as e:
        raise ValueError(f"lora config_dict: not JSON-serialisable ({e})") from None


def check_adapter_names(named: NamedTensors) -> None:
    """Every name must be a PEFT LoRA tensor name (``...<module>.lora_A.weight`` / ``.lora_B.weight``), once."""
    if not named:
        raise ValueError("adapter sync: no tensors were sent (expected the adapter's lora_A / lora_B tensors)")
    seen = set()
    for name, _ in named:
        if not name.endswith(_SUFFIXES):
            raise ValueError(f"adapter sync: tensor {name!r} is not a PEFT LoRA tensor name. Fix: send "
                             "base_model.model.<hf module>.lora_A.weight / .lora_B.weight")
        if name in seen:
            raise ValueError(f"adapter sync: tensor {name!r} was sent twice")
        seen.add(name)


class _AdapterTransport(Transport):
    """Collects one sync's buckets; at `finish` replaces the adapter on every server (module docstring)."""

    def __init__(self, lora_name: str, config_dict: Mapping[str, Any], *, pinned: bool = False,
                 flush_timeout_s: float = 30.0):
        if not isinstance(lora_name, str) or not lora_name:
            raise ValueError(f"adapter sync: lora_name={lora_name!r}: must be a non-empty name (what requests send "
                             "as lora_path)")
        check_peft_config(config_dict)
        self.lora_name = lora_name
        self.config_dict = dict(config_dict)
        self.pinned = pinned
        self.flush_timeout_s = flush_timeout_s
        self._named: NamedTensors = []
        #: urls of the servers this transport loaded the adapter on
        self._loaded: set[str] = set()

    def begin(self, servers, version):
        self._named = []

    def send(self, servers, bucket, *, last, version):
        # a snapshot: the trainer may update its tensors in place before `finish`
        self._named.extend((n, t.detach().clone()) for n, t in bucket)

    def finish(self, servers, version):
        named, self._named = self._named, []
        check_adapter_names(named)
        with self._prepared(named, version) as load:
            call_all(servers, lambda s: self._replace(s, load, version))

    def _prepared(self, named: NamedTensors, version: str):
        """Context manager yielding `load(server)`, which loads the adapter on one server."""
        raise NotImplementedError

    def _replace(self, s: ServerClient, load, version: str) -> None:
        if s.url in self._loaded:
            self._unload(s)
        try:
            load(s)
        except UpdateFailed as e:
            if "already exists" not in str(e):
                raise
            log.warning("%s: adapter %r already loaded (not by this transport, e.g. --lora-paths at start): "
                        "unloading it first", s.url, self.lora_name)
            self._unload(s)
            load(s)
        self._loaded.add(s.url)
        self._flush(s)
        s.update_weight_version(version, abort_all_requests=False)

    def _unload(self, s: ServerClient) -> None:
        try:
            s.unload_lora_adapter(self.lora_name)
        except UpdateFailed as e:
            if "does not exist" not in str(e):
                raise
            log.info("%s: adapter %r was not loaded (restarted?): loading it fresh", s.url, self.lora_name)

    def _flush(self, s: ServerClient) -> None:
        flush_until_idle(s, self.flush_timeout_s)


class AdapterDiskTransport(_AdapterTransport):
    """Write a PEFT folder per sync under `root` and `/load_lora_adapter` it on every server.

    `root` must be readable by every server (shared storage for multi-node). The newest `keep` folders are kept;
    `last_path` is the newest (for `ServerManager.set_adapter`, so a restarted server loads it at start).
    """

    name = "lora-disk"

    def __init__(self, root: str, lora_name: str, config_dict: Mapping[str, Any], keep: int = 2, *,
                 pinned: bool = False, flush_timeout_s: float = 30.0):
        super().__init__(lora_name, config_dict, pinned=pinned, flush_timeout_s=flush_timeout_s)
        if keep < 1:
            raise ValueError(f"adapter sync keep={keep}: must be >= 1 (a restarted server loads the newest folder)")
        self.root = os.path.abspath(root)
        self.keep = keep
        self.last_path: Optional[str] = None
        self._written: list[str] = []

    def write(self, named: NamedTensors, version: str) -> str:
        """Write ``root/<version>/`` atomically (temporary folder, then rename); returns its path."""
        from safetensors.torch import save_file

        os.makedirs(self.root, exist_ok=True)
        safe = safe_version(version)
        final = os.path.join(self.root, safe)
        tmp = os.path.join(self.root, f".{safe}.partial")
        shutil.rmtree(tmp, ignore_errors=True)  # leftovers of a sync that failed half-way
        os.makedirs(tmp)
        try:
            tensors = {}
            for n, t in named:  # own contiguous CPU copies (safetensors refuses shared storage)
                tensors[n] = t.detach().to("cpu").contiguous().clone()
            save_file(tensors, os.path.join(tmp, "adapter_model.safetensors"), metadata={"format": "pt"})
            with open(os.path.join(tmp, "adapter_config.json"), "w") as f:
                json.dump(self.config_dict, f, indent=1)
            shutil.rmtree(final, ignore_errors=True)
            os.replace(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return final

    def _prepared(self, named, version):
        path = self.write(named, version)

        @contextlib.contextmanager
        def ctx():
            yield lambda s: s.load_lora_adapter(self.lora_name, path, pinned=self.pinned)
            self.last_path = path
            if path in self._written:
                self._written.remove(path)
            self._written.append(path)
            self._prune(path)

        return ctx()

    def _prune(self, newest: str) -> None:
        """Keep the newest `keep` adapter folders under `root` (ours in write order after older ones)."""
        folders = []
        for d in os.listdir(self.root):
            p = os.path.join(self.root, d)
            if not d.startswith(".") and os.path.isfile(os.path.join(p, "adapter_config.json")):
                folders.append(p)
        order = {p: i for i, p in enumerate(self._written)}
        folders.sort(key=lambda p: (order.get(p, -1), os.path.getmtime(p)))
        for p in folders[: max(0, len(folders) - self.keep)]:
            if p != newest:
                shutil.rmtree(p, ignore_errors=True)


class AdapterTensorTransport(_AdapterTransport):
    """`/load_lora_adapter_from_tensors` on every server (colocated: same host; see module docstring).

    `load_format`: "flattened_bucket" (default: one flat tensor + metadata, one dtype) or None (a dict
    {PEFT tensor name: tensor}).
    """

    name = "lora-tensor"

    def __init__(self, lora_name: str, config_dict: Mapping[str, Any], load_format: Optional[str] = "flattened_bucket",
                 *, pinned: bool = False, flush_timeout_s: float = 30.0):
        super().__init__(lora_name, config_dict, pinned=pinned, flush_timeout_s=flush_timeout_s)
        if load_format not in ("flattened_bucket", None):
            raise ValueError(f"adapter sync load_format={load_format!r}: expected 'flattened_bucket' or None")
        self.load_format = load_format

    def _prepared(self, named, version):
        if self.load_format == "flattened_bucket":
            dtypes = {t.dtype for _, t in named}
            if len(dtypes) != 1:
                raise ValueError(f"adapter sync: a flattened bucket holds one dtype, the adapter has "
                                 f"{sorted(map(str, dtypes))}. Fix: cast the adapter to one dtype, or use "
                                 "load_format=None")
            obj: Any = flatten_bucket(named)
        else:
            obj = dict(named)

        @contextlib.contextmanager
        def ctx():
            # the payload (CUDA-IPC handles / shared memory) stays valid until every server answered
            with shared_payload(obj) as payload:
                yield lambda s: s.load_lora_adapter_from_tensors(self.lora_name, self.config_dict, payload,
                                                                 load_format=self.load_format, pinned=self.pinned)

        return ctx()
