"""LoRA adapters in the built-in server: SGLang's LoRA contract (load / unload / per-request ``lora_path``) on CPU.

Why: the trainer trains LoRA adapters and pushes only the adapter (PEFT format) to the rollout servers after each
step; on CPU machines the built-in server stands in for SGLang, so it takes the same adapters the same way.

What an adapter is here: per targeted HF Linear module (``model.layers.0.self_attn.q_proj``, ...) a pair A [r, in]
and B [out, r] in the served dtype, and one scale ``lora_alpha / r`` (``lora_alpha / sqrt(r)`` with
``use_rslora``). The forward adds ``scale * (x @ A.T) @ B.T`` to that Linear's output: a forward hook on every
targeted ``nn.Linear`` of the HF model reads the adapter of the batch being run (`LoRAManager.active`, set by
`ModelRunner.forward` under the model lock). A forward batch uses one adapter or none: the scheduler groups
sequences by adapter (see `scheduler.py`), so the math is exactly W x + scale B A x for each row, i.e. the merged
weights W + scale * B @ A.

Validation happens before anything changes (a failed load leaves the registry as it was): ``peft_type`` "LORA";
``r`` <= ``--max-lora-rank``; every ``target_modules`` entry within ``--lora-target-modules``; ``bias`` "none";
no DoRA / rank or alpha patterns / modules_to_save / fan_in_fan_out; tensor keys
``base_model.model.<hf module>.lora_A.weight`` / ``.lora_B.weight`` (also without the ``base_model.model.``
prefix), each module with both A and B, shapes [r, in_features] / [out_features, r] of the served Linear. An
unknown module is an error naming it.

Unloading follows SGLang's registry: the name disappears at once (new requests naming it are refused), then the
call waits for the in-flight requests that use the adapter to finish, bounded by ``--lora-unload-wait-s``
(SGLang waits unbounded; the trainer pauses generation with mode "abort" first, so normally nothing is in
flight). If they do not finish in time the adapter is registered again and the unload fails, naming the fix.
"""

from __future__ import annotations

import json
import logging
import math
import os
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Mapping, Optional, Sequence

import torch

from sglang_rollout.contract import LORA_TARGET_MODULES, lora_exists_error, lora_missing_error

log = logging.getLogger(__name__)

__all__ = ["LoRAError", "LoRAAdapter", "LoRAManager", "read_peft_folder", "decode_lora_tensors",
           "resolve_target_modules", "parse_lora_paths", "config_rank", "config_targets", "TENSOR_PATH"]

#: `lora_path` SGLang records for an adapter loaded from tensors
TENSOR_PATH = "__tensor__"
_PREFIX = "base_model.model."
_SUFFIXES = {".lora_A.weight": "A", ".lora_B.weight": "B"}
#: PEFT features that change the math this server implements: refused with a message naming the field
_UNSUPPORTED = {
    "use_dora": "DoRA adapters are not supported",
    "rank_pattern": "per-module ranks (rank_pattern) are not supported",
    "alpha_pattern": "per-module alphas (alpha_pattern) are not supported",
    "modules_to_save": "modules_to_save (full extra weights) is not supported",
    "fan_in_fan_out": "fan_in_fan_out (transposed Conv1D weights) is not supported",
}


class LoRAError(ValueError):
    """An adapter (config or tensors) the server refuses; nothing was changed."""


def resolve_target_modules(modules: Optional[Sequence[str]]) -> Optional[tuple[str, ...]]:
    """``--lora-target-modules`` as a tuple of HF names; ``all`` expands to every LoRA-capable module."""
    if modules is None:
        return None
    out: list[str] = []
    for m in modules:
        if m in ("all", "all-linear"):
            out.extend(LORA_TARGET_MODULES)
        elif m in LORA_TARGET_MODULES:
            out.append(m)
        else:
            raise ValueError(f"--lora-target-modules {m!r}: not a LoRA-capable module. Fix: use some of "
                             f"{' '.join(LORA_TARGET_MODULES)}, or all")
    return tuple(m for m in LORA_TARGET_MODULES if m in out)


def parse_lora_paths(items: Sequence[str]) -> list[tuple[str, str]]:
    """``--lora-paths name=path ...`` -> [(name, path)]; a bare ``path`` is its own name (as SGLang)."""
    out = []
    for item in items:
        name, sep, path = item.partition("=")
        if not sep:
            name, path = item, item
        if not name or not path:
            raise ValueError(f"--lora-paths {item!r}: expected name=path")
        out.append((name, path))
    names = [n for n, _ in out]
    if len(set(names)) != len(names):
        raise ValueError(f"--lora-paths: duplicate adapter names in {names}")
    return out


def config_targets(config: Mapping[str, Any]) -> list[str]:
    """The HF module kinds (last name component) that `config["target_modules"]` names."""
    tm = config.get("target_modules")
    if tm in ("all-linear", "all"):
        return list(LORA_TARGET_MODULES)
    if isinstance(tm, str):
        raise LoRAError(f"target_modules={tm!r}: a regex is not supported. Fix: list the module names, e.g. "
                        f"{list(LORA_TARGET_MODULES[:4])}")
    if not isinstance(tm, (list, tuple)) or not tm or not all(isinstance(t, str) for t in tm):
        raise LoRAError(f"target_modules={tm!r}: expected a non-empty list of module names, e.g. ['q_proj', 'v_proj']")
    return [t.rsplit(".", 1)[-1] for t in tm]


def config_rank(config: Mapping[str, Any]) -> int:
    """The adapter config's rank ``r`` (an integer >= 1)."""
    r = config.get("r")
    if not isinstance(r, int) or isinstance(r, bool) or r < 1:
        raise LoRAError(f"r={r!r}: the adapter_config's rank must be an integer >= 1")
    return r


def read_peft_folder(path: str) -> tuple[dict, dict[str, torch.Tensor]]:
    """(adapter_config.json as a dict, {tensor name: tensor}) of a PEFT folder."""
    from safetensors.torch import load_file

    if not os.path.isdir(path):
        raise LoRAError(f"lora_path={path!r}: not a folder. Fix: pass a PEFT adapter folder (adapter_config.json "
                        "+ adapter_model.safetensors) readable by the server")
    cfg_path = os.path.join(path, "adapter_config.json")
    weights = os.path.join(path, "adapter_model.safetensors")
    for f in (cfg_path, weights):
        if not os.path.isfile(f):
            extra = " (adapter_model.bin is not read: save with safe_serialization=True)" if f == weights else ""
            raise LoRAError(f"lora_path={path!r}: no {os.path.basename(f)}{extra}")
    try:
        with open(cfg_path) as fh:
            config = json.load(fh)
    except (OSError, ValueError) as e:
        raise LoRAError(f"{cfg_path}: cannot read the adapter config: {e}") from None
    if not isinstance(config, dict):
        raise LoRAError(f"{cfg_path}: expected a JSON object")
    try:
        tensors = load_file(weights)
    except Exception as e:  # noqa: BLE001 - a broken file is the caller's error
        raise LoRAError(f"{weights}: cannot read the adapter tensors: {e}") from None
    return config, tensors


def decode_lora_tensors(data: str, load_format: Optional[str]) -> dict[str, torch.Tensor]:
    """`serialized_tensors` of `/load_lora_adapter_from_tensors` -> {PEFT tensor name: tensor}.

    Decoded with `sglang_rollout.tensor_payload`'s allow-listed unpickler (never arbitrary globals): a dict
    {name: tensor} (load_format null) or a flattened bucket (load_format "flattened_bucket").
    """
    from sglang_rollout.tensor_payload import PayloadError, load_payload, unflatten_bucket

    if load_format not in (None, "flattened_bucket"):
        raise LoRAError(f"load_format={load_format!r}: expected null ({{name: tensor}}) or 'flattened_bucket'")
    try:
        obj = load_payload(data, "serialized_tensors")
    except PayloadError as e:
        raise LoRAError(str(e)) from None
    if load_format == "flattened_bucket":
        try:
            named = unflatten_bucket(obj)
        except PayloadError as e:
            raise LoRAError(f"serialized_tensors: {e}") from None
        out = dict(named)
        if len(out) != len(named):
            raise LoRAError("serialized_tensors: a tensor name appears twice in the flattened bucket")
        return out
    if not isinstance(obj, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                            for k, v in obj.items()):
        raise LoRAError("serialized_tensors: expected a dict {PEFT tensor name: tensor} (load_format null); for a "
                        "flattened bucket pass load_format='flattened_bucket'")
    return dict(obj)


@dataclass(frozen=True)
class LoRAAdapter:
    """One loaded adapter: per served Linear module name, (A [r, in], B [out, r]) in the served dtype."""

    name: str
    path: str
    lora_id: str
    pinned: bool
    rank: int
    scale: float
    weights: Mapping[str, tuple[torch.Tensor, torch.Tensor]] = field(repr=False)

    def ref(self) -> dict:
        """SGLang's `LoRARef` as JSON."""
        return {"lora_id": self.lora_id, "lora_name": self.name, "lora_path": self.path, "pinned": self.pinned}

    @property
    def nbytes(self) -> int:
        return sum(a.numel() * a.element_size() + b.numel() * b.element_size() for a, b in self.weights.values())


class LoRAManager:
    """The server's adapters: validation, registry with in-flight counts, and the forward hooks.

    `max_rank` / `target_modules` are the server's ``--max-lora-rank`` / ``--lora-target-modules`` (resolved).
    Hooks are installed on every served ``nn.Linear`` whose name ends in a target module.
    """

    def __init__(self, model: torch.nn.Module, dtype: torch.dtype, *, max_rank: int,
                 target_modules: Sequence[str], max_loras_per_batch: int = 8, unload_wait_s: float = 30.0):
        self.dtype = dtype
        self.max_rank = max_rank
        self.target_modules = tuple(target_modules)
        self.max_loras_per_batch = max_loras_per_batch
        self.unload_wait_s = unload_wait_s
        #: served module name -> its Linear (only the targeted kinds)
        self.modules: dict[str, torch.nn.Linear] = {}
        #: every module of a LoRA-capable kind, targeted or not (to tell "not targeted" from "unknown")
        self._capable: set[str] = set()
        for name, mod in model.named_modules():
            kind = name.rsplit(".", 1)[-1]
            if isinstance(mod, torch.nn.Linear) and kind in LORA_TARGET_MODULES:
                self._capable.add(name)
                if kind in self.target_modules:
                    self.modules[name] = mod
                    mod.register_forward_hook(self._hook(name))
        if not self.modules:
            kinds = sorted({n.rsplit(".", 1)[-1] for n in self._capable})
            raise ValueError(f"--lora-target-modules {list(self.target_modules)}: the model has no such nn.Linear "
                             f"module (its LoRA-capable modules: {kinds})")
        #: the adapter of the batch being run (set by ModelRunner.forward under the model lock)
        self.active: Optional[LoRAAdapter] = None
        self._cv = threading.Condition()
        self._adapters: dict[str, LoRAAdapter] = {}
        self._inflight: dict[int, int] = {}  # id(adapter) -> sequences using it
        #: serialises load/unload calls (a check-then-register must not interleave with another)
        self.op_lock = threading.Lock()

    # ---- forward ---------------------------------------------------------------------------------------------

    def _hook(self, name: str):
        def hook(module, inputs, out):
            ad = self.active
            if ad is None:
                return None
            w = ad.weights.get(name)
            if w is None:
                return None
            a, b = w
            return out + ad.scale * ((inputs[0] @ a.T) @ b.T)

        return hook

    # ---- registry --------------------------------------------------------------------------------------------

    def names(self) -> list[str]:
        with self._cv:
            return sorted(self._adapters)

    def loaded_adapters(self) -> dict[str, dict]:
        """SGLang's `loaded_adapters`: {name: LoRARef}."""
        with self._cv:
            return {n: a.ref() for n, a in sorted(self._adapters.items())}

    def exists(self, name: str) -> bool:
        with self._cv:
            return name in self._adapters

    def register(self, adapter: LoRAAdapter) -> None:
        with self._cv:
            if adapter.name in self._adapters:
                raise LoRAError(lora_exists_error(adapter.name, self._adapters))
            self._adapters[adapter.name] = adapter
        log.info("LoRA adapter %r loaded from %s (r=%d, scale=%g, %d modules, %.1f KB)", adapter.name, adapter.path,
                 adapter.rank, adapter.scale, len(adapter.weights), adapter.nbytes / 1e3)

    def unregister(self, name: str, wait_s: Optional[float] = None) -> LoRAAdapter:
        """Remove `name` (new requests naming it are refused at once), then wait for its in-flight requests."""
        wait_s = self.unload_wait_s if wait_s is None else wait_s
        with self._cv:
            adapter = self._adapters.pop(name, None)
            if adapter is None:
                raise LoRAError(lora_missing_error(name, self._adapters))
            deadline = time.monotonic() + wait_s
            while self._inflight.get(id(adapter), 0) and time.monotonic() < deadline:
                self._cv.wait(timeout=min(0.05, max(0.0, deadline - time.monotonic())))
            busy = self._inflight.get(id(adapter), 0)
            if busy:
                self._adapters.setdefault(name, adapter)  # back, as it was: the unload failed
                raise LoRAError(f"LoRA with name {name} is still used by {busy} in-flight request(s) after "
                                f"{wait_s:g}s; it stays loaded. Fix: /pause_generation with mode 'abort' (or let "
                                "them finish) before unloading")
        log.info("LoRA adapter %r unloaded", name)
        return adapter

    def acquire(self, names: Sequence[Optional[str]]) -> list[Optional[LoRAAdapter]]:
        """The adapters that the requests of `names` (None = base) run with, each counted in flight until
        `release`; all or nothing (an unknown name refuses the whole request)."""
        with self._cv:
            missing = sorted({n for n in names if n is not None and n not in self._adapters})
            if missing:
                raise KeyError(missing[0])
            out = [None if n is None else self._adapters[n] for n in names]
            for a in out:
                if a is not None:
                    self._inflight[id(a)] = self._inflight.get(id(a), 0) + 1
            return out

    def release(self, adapter: Optional[LoRAAdapter]) -> None:
        if adapter is None:
            return
        with self._cv:
            left = self._inflight.get(id(adapter), 0) - 1
            if left > 0:
                self._inflight[id(adapter)] = left
            else:
                self._inflight.pop(id(adapter), None)
            self._cv.notify_all()

    # ---- validation ------------------------------------------------------------------------------------------

    def build(self, name: str, path: str, config: Mapping[str, Any], tensors: Mapping[str, torch.Tensor], *,
              pinned: bool = False, lora_id: Optional[str] = None) -> LoRAAdapter:
        """Validate a PEFT config + tensors against the served model and this server's limits; nothing is
        registered here. Raises LoRAError naming the field and the fix."""
        if not isinstance(config, Mapping):
            raise LoRAError("config_dict: expected the PEFT adapter_config.json as a JSON object")
        peft_type = config.get("peft_type")
        if peft_type != "LORA":
            raise LoRAError(f"peft_type={peft_type!r}: only 'LORA' adapters are supported (adapter_config.json "
                            "must say \"peft_type\": \"LORA\")")
        r = config_rank(config)
        if r > self.max_rank:
            raise LoRAError(f"LoRA adapter {name} has rank r={r}, which exceeds --max-lora-rank {self.max_rank}. "
                            f"Fix: restart the server with --max-lora-rank >= {r}, or train a smaller rank")
        alpha = config.get("lora_alpha", 8)  # PEFT's default
        if not isinstance(alpha, (int, float)) or isinstance(alpha, bool) or not math.isfinite(alpha):
            raise LoRAError(f"lora_alpha={alpha!r}: expected a finite number")
        bias = config.get("bias", "none")
        if bias != "none":
            raise LoRAError(f"bias={bias!r}: only bias='none' adapters are supported (no bias tensors)")
        for key, why in _UNSUPPORTED.items():
            if config.get(key):
                raise LoRAError(f"{key}={config[key]!r}: {why}")
        kinds = config_targets(config)
        for k in kinds:
            if k not in LORA_TARGET_MODULES:
                raise LoRAError(f"target_modules: {k!r} is not a LoRA-capable module (expected some of "
                                f"{list(LORA_TARGET_MODULES)})")
            if k not in self.target_modules:
                raise LoRAError(f"LoRA adapter {name} targets {k!r}, which is not in the server's "
                                f"--lora-target-modules {list(self.target_modules)}. Fix: restart the server with "
                                f"--lora-target-modules including {k} (or all)")
        scale = alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r
        if not tensors:
            raise LoRAError("the adapter has no tensors")
        parts: dict[str, dict[str, torch.Tensor]] = {}
        for key, t in tensors.items():
            module, which = _split_key(key)
            if module not in self.modules:
                kind = module.rsplit(".", 1)[-1]
                if module in self._capable:
                    raise LoRAError(f"{key}: module {module} ({kind}) is not in the server's --lora-target-modules "
                                    f"{list(self.target_modules)}")
                raise LoRAError(f"{key}: unknown module {module!r} (not a LoRA-capable nn.Linear of the served "
                                f"model; e.g. {next(iter(self.modules))})")
            if module.rsplit(".", 1)[-1] not in kinds:
                raise LoRAError(f"{key}: module {module} is not in the adapter's target_modules {kinds}")
            if not isinstance(t, torch.Tensor) or not t.is_floating_point():
                raise LoRAError(f"{key}: expected a floating-point tensor, got "
                                f"{t.dtype if isinstance(t, torch.Tensor) else type(t).__name__}")
            parts.setdefault(module, {})[which] = t
        weights: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        for module, ab in sorted(parts.items()):
            lin = self.modules[module]
            for which in ("A", "B"):
                if which not in ab:
                    raise LoRAError(f"module {module}: lora_{which} is missing (each module needs both lora_A and "
                                    "lora_B)")
            want = {"A": (r, lin.in_features), "B": (lin.out_features, r)}
            for which, t in ab.items():
                if tuple(t.shape) != want[which]:
                    raise LoRAError(f"{_PREFIX}{module}.lora_{which}.weight: shape {list(t.shape)}, expected "
                                    f"{list(want[which])} ([r, in_features] for A, [out_features, r] for B; r={r})")
            # own copies in the served dtype (a shared-memory view must not outlive the request)
            weights[module] = tuple(ab[w].detach().to("cpu", self.dtype, copy=True).contiguous() for w in "AB")
        return LoRAAdapter(name=name, path=path, lora_id=lora_id or uuid.uuid4().hex, pinned=bool(pinned),
                           rank=r, scale=float(scale), weights=weights)


def _split_key(key: str) -> tuple[str, str]:
    """``base_model.model.<module>.lora_A.weight`` (or without the prefix) -> (module, "A")."""
    for suffix, which in _SUFFIXES.items():
        if key.endswith(suffix):
            module = key[: -len(suffix)]
            if module.startswith(_PREFIX):
                module = module[len(_PREFIX):]
            return module, which
    raise LoRAError(f"tensor {key!r}: expected PEFT names base_model.model.<module>.lora_A.weight / .lora_B.weight")
