"""The built-in server's model: a Hugging Face causal LM on CPU, its KV-cached forward, and weight loading.

The model folder is a HF layout (config.json + *.safetensors), loaded with `AutoModelForCausalLM`. Weights are
addressed by their HF names (`model.layers.0.self_attn.q_proj.weight`, ...), the names SGLang's `load_weights`
takes and the trainer's exporter yields. Tied embeddings appear under both names and share one tensor.

Every forward and every weight update holds `lock`, so an update lands between two decode steps, never inside
one. A weight load validates all names, shapes and dtypes first and only then copies, so a bad load leaves the old
weights in place (SGLang rolls back a failed disk load the same way).

With LoRA enabled (`enable_lora`), `forward(..., adapter=...)` runs the batch with that adapter (or none) by
setting `LoRAManager.active`, which the forward hooks of `builtin_server/lora.py` read.
"""

from __future__ import annotations

import glob
import inspect
import json
import logging
import os
import threading
from typing import Iterable, Optional

import torch

log = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class WeightLoadError(ValueError):
    """Weights that do not fit the served model (unknown name, wrong shape, missing tensors)."""


class ModelRunner:
    """A HF causal LM with a batched, KV-cached forward (see module docstring)."""

    def __init__(self, model_path: str, dtype: str = "float32", threads: Optional[int] = None):
        from transformers import AutoConfig, AutoModelForCausalLM

        if dtype not in _DTYPES:
            raise ValueError(f"--dtype {dtype!r}: expected one of {sorted(_DTYPES)}")
        if not os.path.isfile(os.path.join(model_path, "config.json")):
            raise FileNotFoundError(f"--model-path {model_path!r}: no config.json; expected a HF model folder")
        if threads:
            torch.set_num_threads(threads)
        self.model_path = model_path
        self.dtype = _DTYPES[dtype]
        self.config = AutoConfig.from_pretrained(model_path)
        self.model = AutoModelForCausalLM.from_pretrained(model_path, dtype=self.dtype).eval()
        self.lock = threading.RLock()
        self.vocab_size = int(self.config.vocab_size)
        self.max_context = int(getattr(self.config, "max_position_embeddings", 1 << 30))
        self.eos_ids = self._eos_ids(model_path)
        # HF name -> parameter; tied names map to the same Parameter.
        self._params: dict[str, torch.nn.Parameter] = dict(self.model.state_dict(keep_vars=True))
        fwd = inspect.signature(self.model.forward).parameters
        self._cache_kw = "cache" if "cache" in fwd else "past_key_values"
        #: the LoRA adapters (None: served without --enable-lora)
        self.lora = None
        log.info("loaded %s (%s, %d tensors, vocab %d, eos %s)", model_path, dtype, len(self._params),
                 self.vocab_size, sorted(self.eos_ids))

    def _eos_ids(self, model_path: str) -> set[int]:
        ids: set[int] = set()

        def add(v):
            if isinstance(v, int):
                ids.add(v)
            elif isinstance(v, (list, tuple)):
                ids.update(int(x) for x in v)

        add(getattr(self.config, "eos_token_id", None))
        gen = os.path.join(model_path, "generation_config.json")
        if os.path.isfile(gen):
            with open(gen) as f:
                add(json.load(f).get("eos_token_id"))
        return ids

    # ---- forward -------------------------------------------------------------------------------------------

    def new_cache(self):
        from transformers import DynamicCache

        try:
            return DynamicCache(config=self.config)
        except TypeError:  # older transformers
            return DynamicCache()

    def enable_lora(self, *, max_rank: int, target_modules, max_loras_per_batch: int = 8,
                    unload_wait_s: float = 30.0):
        """Install the LoRA forward hooks on the targeted Linear modules (once); returns the `LoRAManager`."""
        from sglang_rollout.builtin_server.lora import LoRAManager

        if self.lora is None:
            self.lora = LoRAManager(self.model, self.dtype, max_rank=max_rank, target_modules=target_modules,
                                    max_loras_per_batch=max_loras_per_batch, unload_wait_s=unload_wait_s)
        return self.lora

    @torch.no_grad()
    def forward(self, input_ids, attention_mask, position_ids, cache, all_logits: bool, adapter=None):
        """One forward: logits [B, T, V] (or [B, 1, V] unless all_logits) and the updated cache. `adapter`: the
        LoRA adapter every row of the batch runs with (None: the base model)."""
        if adapter is not None and self.lora is None:
            raise RuntimeError("forward with a LoRA adapter on a runner without LoRA enabled")
        with self.lock:
            if self.lora is not None:
                self.lora.active = adapter
            try:
                out = self.model(
                    input_ids=input_ids,
                    attention_mask=attention_mask,
                    position_ids=position_ids,
                    use_cache=True,
                    logits_to_keep=0 if all_logits else 1,
                    **{self._cache_kw: cache},
                )
            finally:
                if self.lora is not None:
                    self.lora.active = None
        new_cache = getattr(out, "cache", None)
        if new_cache is None:
            new_cache = out.past_key_values
        return out.logits, new_cache

    # ---- weights -------------------------------------------------------------------------------------------

    def _check(self, named: list[tuple[str, torch.Tensor]]) -> None:
        for name, t in named:
            p = self._params.get(name)
            if p is None:
                near = [k for k in self._params if k.split(".")[-2:] == name.split(".")[-2:]][:3]
                raise WeightLoadError(f"unknown weight {name!r} for {type(self.model).__name__}"
                                      + (f" (similar: {near})" if near else ""))
            if tuple(t.shape) != tuple(p.shape):
                raise WeightLoadError(f"weight {name!r}: shape {tuple(t.shape)} != served {tuple(p.shape)}")
            if not (t.is_floating_point() and p.is_floating_point()):
                raise WeightLoadError(f"weight {name!r}: dtype {t.dtype} is not floating point")

    def load_weights(self, named: Iterable[tuple[str, torch.Tensor]], *, require_all: bool = False) -> int:
        """Copy (name, tensor) pairs into the model; validates everything before changing anything."""
        named = list(named)
        self._check(named)
        if require_all:
            covered = {id(self._params[n]) for n, _ in named}
            missing = sorted({n for n, p in self._params.items() if id(p) not in covered})
            if missing:
                raise WeightLoadError(f"{len(missing)} weights missing, e.g. {missing[:3]}")
        with self.lock, torch.no_grad():
            for name, t in named:
                self._params[name].data.copy_(t.to(self._params[name].dtype))
        return len(named)

    def load_from_disk(self, model_path: str, load_format: Optional[str] = None) -> int:
        """Load every tensor of the safetensors files in a HF folder (all weights must be there)."""
        from safetensors import safe_open

        if load_format not in (None, "auto", "safetensors"):
            raise WeightLoadError(f"load_format={load_format!r}: the built-in server reads safetensors only")
        files = sorted(glob.glob(os.path.join(model_path, "*.safetensors")))
        if not files:
            raise WeightLoadError(f"model_path={model_path!r}: no *.safetensors files found")
        named = []
        for path in files:
            with safe_open(path, framework="pt") as f:
                named.extend((k, f.get_tensor(k)) for k in f.keys())
        n = self.load_weights(named, require_all=True)
        self.model_path = model_path
        return n

    def get_weight(self, name: str, truncate_size: int = 100) -> list:
        p = self._params.get(name)
        if p is None:
            raise WeightLoadError(f"unknown weight {name!r}")
        with self.lock:
            return p.detach()[:truncate_size].float().tolist()
