"""Endpoint handlers of the built-in server: the SGLang API subset, same request and response shapes.

Each handler takes the parsed JSON body (and query) and returns a `Reply(status, body)`; `server.py` does the
HTTP. Request bodies are checked against `sglang_rollout.contract` first (400 `{"error": ...}` as SGLang does).
What the built-in server cannot do (text prompts: it has no tokenizer; streaming; top-logprobs; ...) is a
400 that names the field, never a silent approximation.

LoRA (``--enable-lora``; see `builtin_server/lora.py`): `/load_lora_adapter`, `/load_lora_adapter_from_tensors`
and `/unload_lora_adapter` answer SGLang's ``LoRAUpdateOutput`` (200 on success, 400 ``success: false`` with
SGLang's messages); `/generate`'s ``lora_path`` (str, or one entry per prompt, null = base) names a loaded
adapter, and an unknown name is a 400 listing the loaded ones. `/server_info` lists them (``loaded_adapters``).

Memory release/resume (`/release_memory_occupation`, `/resume_memory_occupation`): on CPU there is nothing to free,
but the server keeps SGLang's bookkeeping and its rules, so a trainer's choreography that would break a real
colocated SGLang server breaks here too. As SGLang's scheduler: release needs an idle server (it asserts
`is_fully_idle`), `tags` null or empty means every type (`MEMORY_TAGS`), and resuming a tag that is not released
fails (SGLang removes it from its `offload_tags` set: a KeyError). Beyond SGLang, which would touch unmapped memory:
while any tag is released `/generate` is refused (400), and while "weights" is released a weight update is refused
(after the distributed broadcast was received, so the trainer never hangs). Every call is logged (INFO) and counted
in `/server_info` (`memory_released`, `memory_calls`).
"""

from __future__ import annotations

import logging
import random
import threading
import time
import uuid
from dataclasses import dataclass
from typing import Any, Optional

import torch

from sglang_rollout.builtin_server.model_runner import ModelRunner, WeightLoadError
from sglang_rollout.builtin_server.sampler import SamplingSpec
from sglang_rollout.builtin_server.scheduler import Scheduler, Sequence
from sglang_rollout.builtin_server.lora import (TENSOR_PATH, LoRAError, config_rank, config_targets,
                                                decode_lora_tensors, parse_lora_paths, read_peft_folder,
                                                resolve_target_modules)
from sglang_rollout.contract import LORA_NOT_ENABLED, LORA_TARGET_MODULES, ContractError, lora_exists_error
from sglang_rollout.process_group import destroy_weights_update_group, init_weights_update_group, parse_dtype
from sglang_rollout.tensor_payload import PayloadError, deserialize_named_tensors, unflatten_bucket

log = logging.getLogger(__name__)

#: SGLang's memory types (`sglang.srt.constants.GPU_MEMORY_ALL_TYPES`): what `tags: null` releases or resumes
MEMORY_TAGS = ("kv_cache", "weights", "cuda_graph")


@dataclass
class Reply:
    status: int
    body: Any = None  # JSON-able, or str for text/plain
    text: bool = False


def _err(status: int, msg: str) -> Reply:
    return Reply(status, {"error": msg})


def _update_reply(ok: bool, message: str, **extra) -> Reply:
    return Reply(200 if ok else 400, {"success": ok, "message": message, **extra})


class Api:
    """State of one built-in server and its endpoint handlers."""

    def __init__(self, args):
        self.args = args
        self.runner: Optional[ModelRunner] = None
        self.scheduler: Optional[Scheduler] = None
        self.weight_version = args.weight_version
        self.ready = False
        self._seed_rng = random.Random(args.random_seed)
        self._seed_lock = threading.Lock()
        self._groups: dict[str, Any] = {}
        self._update_lock = threading.Lock()
        self.started = time.time()
        #: memory types released and not yet resumed, and how many release / resume calls succeeded
        self.released: set[str] = set()
        self.memory_calls = {"release": 0, "resume": 0}
        self._memory_lock = threading.Lock()

    def load(self) -> None:
        self.runner = ModelRunner(self.args.model_path, self.args.dtype)
        if self.args.enable_lora:
            self._start_lora()
        self.scheduler = Scheduler(self.runner, max_batch_size=self.args.max_batch_size)
        self.scheduler.start()
        self.ready = True

    def _start_lora(self) -> None:
        """Install the LoRA hooks and load ``--lora-paths``; rank / targets not given come from those adapters
        (as SGLang infers them). A bad startup adapter stops the server with the reason."""
        a = self.args
        initial = parse_lora_paths(a.lora_paths)
        read = []
        for name, path in initial:
            try:
                read.append((name, path, *read_peft_folder(path)))
            except LoRAError as e:
                raise ValueError(f"--lora-paths {name}={path}: {e}") from None
        try:
            rank = a.max_lora_rank or max(config_rank(cfg) for _, _, cfg, _ in read)
            targets = resolve_target_modules(a.lora_target_modules) or resolve_target_modules(
                sorted({k for _, _, cfg, _ in read for k in config_targets(cfg) if k in LORA_TARGET_MODULES}))
        except (LoRAError, ValueError) as e:
            raise ValueError(f"--lora-paths: cannot infer --max-lora-rank / --lora-target-modules: {e}") from None
        lora = self.runner.enable_lora(max_rank=rank, target_modules=targets,
                                       max_loras_per_batch=a.max_loras_per_batch, unload_wait_s=a.lora_unload_wait_s)
        for name, path, cfg, tensors in read:
            try:
                lora.register(lora.build(name, path, cfg, tensors))
            except LoRAError as e:
                raise ValueError(f"--lora-paths {name}={path}: {e}") from None
        log.info("LoRA enabled: max rank %d, target modules %s, %d adapter(s) at start", rank, list(targets),
                 len(read))

    def shutdown(self) -> None:
        self.ready = False
        if self.scheduler is not None:
            self.scheduler.stop()
        for pg in self._groups.values():
            destroy_weights_update_group(pg)
        self._groups.clear()

    # ---- info ----------------------------------------------------------------------------------------------

    def health(self, body, query) -> Reply:
        return Reply(200, "", text=True) if self.ready else Reply(503, "starting", text=True)

    def health_generate(self, body, query) -> Reply:
        if not self.ready:
            return Reply(503, "starting", text=True)
        if self.released:
            return Reply(503, f"memory released ({', '.join(sorted(self.released))})", text=True)
        seq = self._sequence("health", [0], SamplingSpec(max_new_tokens=1, temperature=0.0), False, -1)
        self.scheduler.submit([seq])
        try:
            seq.future.result(timeout=20)
        except Exception as e:  # noqa: BLE001
            return Reply(503, f"health generation failed: {e}", text=True)
        return Reply(200, "", text=True)

    def model_info(self, body, query) -> Reply:
        cfg = self.runner.config
        return Reply(200, {
            "model_path": self.runner.model_path,
            "served_model_name": self.args.served_model_name or self.args.model_path,
            "tokenizer_path": None,
            "is_generation": True,
            "preferred_sampling_params": None,
            "weight_version": self.weight_version,
            "load_format": "safetensors",
            "reasoning_parser": None,
            "tool_call_parser": None,
            "disaggregation_mode": "null",
            "has_image_understanding": False,
            "has_audio_understanding": False,
            "model_type": getattr(cfg, "model_type", None),
            "architectures": getattr(cfg, "architectures", None),
        })

    def server_info(self, body, query) -> Reply:
        info = {k: v for k, v in vars(self.args).items() if k != "api_key"}
        lora = self.runner.lora
        if lora is not None:  # the resolved limits (inferred from --lora-paths when not given)
            info.update(max_lora_rank=lora.max_rank, lora_target_modules=list(lora.target_modules))
        return Reply(200, {**info, "startup_time": self.started, "version": "builtin", "frontend": "python",
                           "internal_states": [dict(self.scheduler.stats)], "weight_version": self.weight_version,
                           "memory_released": sorted(self.released), "memory_calls": dict(self.memory_calls),
                           "weight_update_groups": sorted(self._groups),
                           "loaded_adapters": None if lora is None else lora.loaded_adapters()})

    # ---- generate ------------------------------------------------------------------------------------------

    def _sequence(self, rid, prompt, spec, return_logprob, start) -> Sequence:
        with self._seed_lock:
            seed = spec.seed if spec.seed is not None else self._seed_rng.getrandbits(63)
        return Sequence(rid=rid, prompt=prompt, spec=spec, generator=torch.Generator().manual_seed(seed),
                        return_logprob=return_logprob, logprob_start_len=start)

    def generate(self, body, query) -> Reply:
        if not self.ready:
            return _err(503, "server is starting")
        # (the body was checked against the contract by server.py)
        for key, why in (("text", "the built-in server has no tokenizer: send input_ids"),
                         ("input_embeds", "input_embeds is not supported by the built-in server"),
                         ("custom_logit_processor", "custom logit processors are not supported"),
                         ("token_ids_logprob", "token_ids_logprob is not supported by the built-in server")):
            if body.get(key) is not None:
                raise ContractError(f"{key}: {why}")
        if self.released:
            raise ContractError(f"generate while memory is released ({', '.join(sorted(self.released))}): call "
                                "/resume_memory_occupation first")
        if body.get("stream"):
            raise ContractError("stream=true is not supported by the built-in server")
        if any(_as_list(body.get("top_logprobs_num"))):
            raise ContractError("top_logprobs_num > 0 is not supported by the built-in server")
        if any(_as_list(body.get("return_hidden_states"))):
            raise ContractError("return_hidden_states is not supported by the built-in server")

        ids = body["input_ids"]
        batched = bool(ids) and isinstance(ids[0], list)
        prompts = ids if batched else [ids]
        if not prompts or any(len(p) == 0 for p in prompts):
            raise ContractError("input_ids: prompts must be non-empty")
        nb = len(prompts)
        for p in prompts:
            bad = [t for t in p if not 0 <= t < self.runner.vocab_size]
            if bad:
                raise ContractError(f"input_ids: token id {bad[0]} out of range [0, {self.runner.vocab_size})")
            if len(p) >= self.runner.max_context:
                raise ContractError(f"The input ({len(p)} tokens) is longer than the model's context length "
                                    f"({self.runner.max_context} tokens).")

        def per_item(key, default):
            """A batch field: a list gives one value per prompt, a scalar applies to all."""
            v = body.get(key)
            if v is None:
                return [default] * nb
            if isinstance(v, list):
                if len(v) != nb:
                    raise ContractError(f"{key}: {len(v)} values for a batch of {nb} prompts")
                return v
            return [v] * nb

        params = per_item("sampling_params", {})
        specs = [SamplingSpec.from_params(p, self.runner.vocab_size) for p in params]
        ret_lp = per_item("return_logprob", False)
        starts = per_item("logprob_start_len", -1)
        rids = per_item("rid", None)
        loras = per_item("lora_path", None)
        seqs: list[Sequence] = []
        for i, (prompt, spec) in enumerate(zip(prompts, specs)):
            for j in range(spec.n):
                rid = rids[i] if (rids[i] is not None and spec.n == 1) else uuid.uuid4().hex
                seqs.append(self._sequence(rid, list(prompt), spec, bool(ret_lp[i]),
                                           -1 if starts[i] is None else int(starts[i])))
        self._attach_adapters(seqs, [loras[i] for i, spec in enumerate(specs) for _ in range(spec.n)])
        try:
            self.scheduler.submit(seqs)
        except BaseException:
            if self.runner.lora is not None:
                for s in seqs:
                    self.runner.lora.release(s.adapter)
            raise
        outs = [self._result(s, body.get("return_prompt_token_ids", False)) for s in seqs]
        many = batched or any(s.n > 1 for s in specs)
        return Reply(200, outs if many else outs[0])

    def _attach_adapters(self, seqs: list[Sequence], names: list) -> None:
        """Resolve each sequence's `lora_path` to a loaded adapter, counted in flight until it finishes."""
        if all(n is None for n in names):
            return
        lora = self.runner.lora
        if lora is None:
            raise ContractError(f"lora_path: {LORA_NOT_ENABLED}")
        try:
            adapters = lora.acquire(names)
        except KeyError as e:
            raise ContractError(f"lora_path: LoRA adapter {e.args[0]!r} is not loaded. Loaded LoRAs: "
                                f"{lora.names()}. Fix: load it with /load_lora_adapter first (lora_path names a "
                                "loaded adapter's lora_name), or drop lora_path for the base model") from None
        for s, a in zip(seqs, adapters):
            s.adapter = a
            if a is not None:
                s.future.add_done_callback(lambda _f, a=a: lora.release(a))

    def _result(self, s: Sequence, return_prompt_ids: bool) -> dict:
        s.future.result()
        meta = {
            "id": s.rid,
            "finish_reason": s.finish_reason,
            "prompt_tokens": len(s.prompt),
            "completion_tokens": len(s.output_ids),
            "cached_tokens": 0,
            "weight_version": self.weight_version,
            "e2e_latency": time.monotonic() - s.created,
        }
        if s.return_logprob:
            meta["input_token_logprobs"] = s.input_logprobs or []
            meta["output_token_logprobs"] = [[lp, t, None] for lp, t in zip(s.output_logprobs, s.output_ids)]
            meta["output_token_logprobs_length"] = len(s.output_ids)
        out = {"text": "", "output_ids": list(s.output_ids), "meta_info": meta}
        if return_prompt_ids:
            out["prompt_token_ids"] = list(s.prompt)
        return out

    # ---- cache, pause, memory ------------------------------------------------------------------------------

    def flush_cache(self, body, query) -> Reply:
        if self.scheduler.busy():
            return Reply(400, "Cache not flushed because there are pending requests. #queue-req/#running-req > 0",
                         text=True)
        return Reply(200, "Cache flushed.\nPlease check backend logs for more details. "
                          "(When there are running or waiting requests, the operation will not be performed.)\n",
                     text=True)

    def pause_generation(self, body, query) -> Reply:
        self.scheduler.pause(body.get("mode") or "abort")
        return Reply(200, {"message": "Generation paused successfully.", "status": "ok"})

    def continue_generation(self, body, query) -> Reply:
        self.scheduler.resume()
        return Reply(200, {"message": "Generation continued successfully.", "status": "ok"})

    def abort_request(self, body, query) -> Reply:
        rid = None if body.get("abort_all") else body.get("rid")
        if rid is None and not body.get("abort_all"):
            return Reply(200, None)
        self.scheduler.abort(rid)
        return Reply(200, None)

    def release_memory_occupation(self, body, query) -> Reply:
        """Nothing to free on CPU; SGLang's bookkeeping and rules (module docstring). 200 null, as SGLang."""
        tags = self._memory_tags(body)
        with self._memory_lock:
            if self.scheduler.busy():
                return _err(400, "release_memory_occupation should be called only when server is idle.")
            again = sorted(set(tags) & self.released)
            if again:
                return _err(400, f"release_memory_occupation: {again} already released")
            self.released |= set(tags)
            self.memory_calls["release"] += 1
        log.info("release_memory_occupation tags=%s: released %s", body.get("tags"), sorted(self.released))
        return Reply(200, None)

    def resume_memory_occupation(self, body, query) -> Reply:
        tags = self._memory_tags(body)
        with self._memory_lock:
            missing = sorted(set(tags) - self.released)
            if missing:  # SGLang: offload_tags.remove(tag) raises KeyError
                return _err(400, f"resume_memory_occupation: {missing} not released")
            self.released -= set(tags)
            self.memory_calls["resume"] += 1
        log.info("resume_memory_occupation tags=%s: released %s", body.get("tags"), sorted(self.released))
        return Reply(200, None)

    @staticmethod
    def _memory_tags(body) -> tuple[str, ...]:
        tags = body.get("tags")
        if not tags:
            return MEMORY_TAGS
        unknown = [t for t in tags if t not in MEMORY_TAGS]
        if unknown:
            raise ContractError(f"tags: unknown memory type(s) {unknown}; expected some of {list(MEMORY_TAGS)}")
        return tuple(tags)

    def _require_weights_resident(self) -> None:
        if "weights" in self.released:
            raise ValueError("the weights are released (/release_memory_occupation): resume them first")

    # ---- weights -------------------------------------------------------------------------------------------

    def _apply(self, body, load, what: str) -> Reply:
        with self._update_lock:
            if body.get("abort_all_requests"):
                self.scheduler.abort(None, "aborted by a weight update")
            try:
                n = load()
            except (WeightLoadError, PayloadError, ValueError, RuntimeError) as e:
                log.warning("%s failed: %s", what, e)
                return _update_reply(False, f"Failed to update weights: {e}. Rolled back to the previous weights.",
                                     num_paused_requests=0)
            if body.get("weight_version") is not None:
                self.weight_version = body["weight_version"]
            log.info("%s: %d tensors, weight_version=%s", what, n, self.weight_version)
            return _update_reply(True, "Succeeded to update model weights.", num_paused_requests=0)

    def update_weights_from_disk(self, body, query) -> Reply:
        def load():
            self._require_weights_resident()
            return self.runner.load_from_disk(body["model_path"], body.get("load_format"))

        return self._apply(body, load, f"update_weights_from_disk({body['model_path']})")

    def update_weights_from_tensor(self, body, query) -> Reply:
        payloads = body["serialized_named_tensors"]

        def load():
            self._require_weights_resident()
            if not payloads:
                raise PayloadError("serialized_named_tensors is empty (one entry per TP rank expected)")
            named = deserialize_named_tensors(payloads[0], body.get("load_format"))  # TP rank 0: the only rank
            return self.runner.load_weights(named)

        return self._apply(body, load, "update_weights_from_tensor")

    def init_weights_update_group(self, body, query) -> Reply:
        name = body.get("group_name") or "weight_update_group"
        if name in self._groups:
            return _update_reply(False, f"process group {name!r} already exists; destroy it first")
        try:
            self._groups[name] = init_weights_update_group(
                master_address=body["master_address"], master_port=body["master_port"],
                rank=body["rank_offset"], world_size=body["world_size"], group_name=name,
                backend=body.get("backend") or "nccl", timeout_s=self.args.dist_timeout_s)
        except Exception as e:  # noqa: BLE001 - reported to the caller
            return _update_reply(False, f"Failed to init process group {name!r}: {type(e).__name__}: {e}")
        log.info("init_weights_update_group %r: rank %d of %d via %s at %s:%s", name, body["rank_offset"],
                 body["world_size"], body.get("backend") or "nccl", body["master_address"], body["master_port"])
        return _update_reply(True, "Succeeded to initialize custom process group.")

    def update_weights_from_distributed(self, body, query) -> Reply:
        name = body.get("group_name") or "weight_update_group"
        pg = self._groups.get(name)
        if pg is None:
            return _update_reply(False, f"no process group {name!r}; call /init_weights_update_group first")
        names, dtypes, shapes = body["names"], body["dtypes"], body["shapes"]
        if not len(names) == len(dtypes) == len(shapes):
            return _update_reply(False, f"names/dtypes/shapes lengths differ: {len(names)}/{len(dtypes)}/"
                                        f"{len(shapes)}")

        def load():
            import torch.distributed as dist

            tensors = [torch.empty(s, dtype=parse_dtype(d)) for d, s in zip(dtypes, shapes)]
            if body.get("load_format") == "flattened_bucket":
                from sglang_rollout.tensor_payload import flatten_bucket

                bucket = flatten_bucket(list(zip(names, tensors)))
                dist.broadcast(bucket["flattened_tensor"], src=0, group=pg)
                named = unflatten_bucket(bucket)
            else:
                works = [dist.broadcast(t, src=0, group=pg, async_op=True) for t in tensors]
                for w in works:
                    w.wait()
                named = list(zip(names, tensors))
            self._require_weights_resident()  # after the broadcast: the trainer must not wait for a receiver
            return self.runner.load_weights(named)

        return self._apply(body, load, "update_weights_from_distributed")

    def destroy_weights_update_group(self, body, query) -> Reply:
        name = body.get("group_name") or "weight_update_group"
        pg = self._groups.pop(name, None)
        if pg is None:
            return _update_reply(False, f"no process group {name!r}")
        destroy_weights_update_group(pg)
        log.info("destroy_weights_update_group %r", name)
        return _update_reply(True, "Succeeded to destroy custom process group.")

    def update_weight_version(self, body, query) -> Reply:
        if body.get("abort_all_requests", True):
            self.scheduler.abort(None, "aborted by /update_weight_version")
        self.weight_version = body["new_version"]
        return Reply(200, {"success": True, "message": f"Weight version updated to {self.weight_version}",
                           "new_version": self.weight_version})

    def get_weights_by_name(self, body, query) -> Reply:
        try:
            return Reply(200, self.runner.get_weight(body["name"], int(body.get("truncate_size", 100))))
        except WeightLoadError as e:
            return _err(400, str(e))


    # ---- LoRA ----------------------------------------------------------------------------------------------

    def _lora_reply(self, ok: bool, error: Optional[str] = None) -> Reply:
        """SGLang's `LoRAUpdateOutput`, 200 on success else 400."""
        lora = self.runner.lora
        return Reply(200 if ok else 400, {"success": ok, "error_message": error,
                                          "loaded_adapters": None if lora is None else lora.loaded_adapters()})

    def _lora_load(self, body, what: str, read) -> Reply:
        lora = self.runner.lora
        if lora is None:
            return self._lora_reply(False, LORA_NOT_ENABLED)
        name = body["lora_name"]
        with lora.op_lock:
            try:
                if lora.exists(name):
                    raise LoRAError(lora_exists_error(name, lora.names()))
                path, config, tensors = read()
                lora.register(lora.build(name, path, config, tensors, pinned=body.get("pinned", False),
                                         lora_id=body.get("lora_id")))
            except LoRAError as e:
                log.warning("%s %r failed: %s", what, name, e)
                return self._lora_reply(False, str(e))
        return self._lora_reply(True)

    def load_lora_adapter(self, body, query) -> Reply:
        path = body["lora_path"]
        return self._lora_load(body, "load_lora_adapter", lambda: (path, *read_peft_folder(path)))

    def load_lora_adapter_from_tensors(self, body, query) -> Reply:
        def read():
            if body.get("added_tokens_config"):
                raise LoRAError("added_tokens_config: adapters that add tokens are not supported by the built-in "
                                "server")
            return TENSOR_PATH, body["config_dict"], decode_lora_tensors(body["serialized_tensors"],
                                                                          body.get("load_format"))

        return self._lora_load(body, "load_lora_adapter_from_tensors", read)

    def unload_lora_adapter(self, body, query) -> Reply:
        lora = self.runner.lora
        if lora is None:
            return self._lora_reply(False, LORA_NOT_ENABLED)
        with lora.op_lock:
            try:
                lora.unregister(body["lora_name"])
            except LoRAError as e:
                log.warning("unload_lora_adapter %r failed: %s", body["lora_name"], e)
                return self._lora_reply(False, str(e))
        return self._lora_reply(True)


def _as_list(v) -> list:
    if v is None:
        return []
    return v if isinstance(v, list) else [v]


#: path -> (methods, handler name)
ROUTES: dict[str, tuple[tuple[str, ...], str]] = {
    "/health": (("GET",), "health"),
    "/health_generate": (("GET",), "health_generate"),
    "/model_info": (("GET",), "model_info"),
    "/get_model_info": (("GET",), "model_info"),
    "/server_info": (("GET",), "server_info"),
    "/get_server_info": (("GET",), "server_info"),
    "/generate": (("POST", "PUT"), "generate"),
    "/flush_cache": (("GET", "POST"), "flush_cache"),
    "/update_weights_from_disk": (("POST",), "update_weights_from_disk"),
    "/update_weights_from_tensor": (("POST",), "update_weights_from_tensor"),
    "/init_weights_update_group": (("POST",), "init_weights_update_group"),
    "/update_weights_from_distributed": (("POST",), "update_weights_from_distributed"),
    "/destroy_weights_update_group": (("POST",), "destroy_weights_update_group"),
    "/update_weight_version": (("POST",), "update_weight_version"),
    "/get_weights_by_name": (("GET", "POST"), "get_weights_by_name"),
    "/release_memory_occupation": (("GET", "POST"), "release_memory_occupation"),
    "/resume_memory_occupation": (("GET", "POST"), "resume_memory_occupation"),
    "/pause_generation": (("POST",), "pause_generation"),
    "/continue_generation": (("POST",), "continue_generation"),
    "/abort_request": (("POST",), "abort_request"),
}

#: the LoRA routes (their contract is `sglang_rollout.contract.LORA_ENDPOINTS`)
LORA_ROUTES: dict[str, tuple[tuple[str, ...], str]] = {
    "/load_lora_adapter": (("POST",), "load_lora_adapter"),
    "/unload_lora_adapter": (("POST",), "unload_lora_adapter"),
    "/load_lora_adapter_from_tensors": (("POST",), "load_lora_adapter_from_tensors"),
}
