"""Typed calls to one SGLang (or built-in) server: one method per endpoint, request bodies per the contract.

Every request body the rollout stack sends is built here (generation bodies in `rollout_client.py` too), so the contract
tests that record what goes over the wire cover all of it. Control calls that answer `{"success": false}` raise
`UpdateFailed` with the server's message.

LoRA (SGLang's `/load_lora_adapter`, `/load_lora_adapter_from_tensors`, `/unload_lora_adapter`): the answer is
SGLang's ``LoRAUpdateOutput`` ``{"success", "error_message", "loaded_adapters"}``, HTTP 400 when success is
false; the calls return it on success and raise `UpdateFailed` with ``error_message`` otherwise.
"""

from __future__ import annotations

import json
from typing import Any, Optional, Sequence

from sglang_rollout.http_client import HTTPStatusError, HttpClient, ServerError

__all__ = ["ServerClient", "UpdateFailed"]


class UpdateFailed(ServerError):
    """A control endpoint answered success=false."""


class ServerClient:
    """One server at `url`. `timeout_s` bounds control calls (weight loads can be slow: set it generously).

    Every call goes through `http`, which sends the servers' API key (default: an `HttpClient` that takes the key
    from the environment, see `sglang_rollout.auth`); only `/health` needs none.
    """

    def __init__(self, url: str, http: Optional[HttpClient] = None, *, timeout_s: float = 600.0):
        self.url = url.rstrip("/")
        self.http = http if http is not None else HttpClient()
        self.timeout_s = timeout_s

    def __repr__(self) -> str:
        return f"ServerClient({self.url})"

    def _post(self, path: str, body: Optional[dict], timeout_s: Optional[float] = None, query=None) -> Any:
        return self.http.request(self.url, "POST", path, body, timeout_s=timeout_s or self.timeout_s,
                                 query=query).data

    def _update(self, path: str, body: dict, timeout_s: Optional[float] = None) -> dict:
        out = self._post(path, body, timeout_s)
        if not isinstance(out, dict) or not out.get("success", False):
            msg = out.get("message") if isinstance(out, dict) else out
            raise UpdateFailed(self.url, path, f"success=false: {msg}")
        return out

    # ---- info ----------------------------------------------------------------------------------------------

    def health(self, timeout_s: float = 5.0) -> bool:
        """True if /health answers 200 within the timeout (False on 503, errors, timeouts)."""
        try:
            self.http.request(self.url, "GET", "/health", None, timeout_s=timeout_s)
            return True
        except ServerError:
            return False

    def model_info(self) -> dict:
        return self.http.request(self.url, "GET", "/model_info", None, timeout_s=30.0).data

    def weight_version(self) -> str:
        return self.model_info()["weight_version"]

    # ---- generation ----------------------------------------------------------------------------------------

    def generate(self, body: dict, timeout_s: float) -> Any:
        return self._post("/generate", body, timeout_s)

    def flush_cache(self, timeout_s: float = 30.0) -> None:
        self.http.request(self.url, "POST", "/flush_cache", None, timeout_s=timeout_s)

    def pause_generation(self, mode: str = "abort") -> dict:
        return self._post("/pause_generation", {"mode": mode})

    def continue_generation(self) -> dict:
        return self._post("/continue_generation", {})

    def release_memory_occupation(self, tags: Optional[Sequence[str]] = None) -> None:
        self._post("/release_memory_occupation", {"tags": None if tags is None else list(tags)})

    def resume_memory_occupation(self, tags: Optional[Sequence[str]] = None) -> None:
        self._post("/resume_memory_occupation", {"tags": None if tags is None else list(tags)})

    # ---- weights -------------------------------------------------------------------------------------------

    def update_weights_from_disk(self, model_path: str, *, weight_version: Optional[str] = None,
                                 flush_cache: bool = True) -> dict:
        body = {"model_path": model_path, "flush_cache": flush_cache}
        if weight_version is not None:
            body["weight_version"] = weight_version
        return self._update("/update_weights_from_disk", body)

    def update_weights_from_tensor(self, serialized: list[str], *, load_format: Optional[str] = None,
                                   weight_version: Optional[str] = None, flush_cache: bool = True) -> dict:
        body = {"serialized_named_tensors": serialized, "load_format": load_format, "flush_cache": flush_cache}
        if weight_version is not None:
            body["weight_version"] = weight_version
        return self._update("/update_weights_from_tensor", body)

    def init_weights_update_group(self, *, master_address: str, master_port: int, rank_offset: int,
                                  world_size: int, group_name: str, backend: str) -> dict:
        return self._update("/init_weights_update_group", {
            "master_address": master_address, "master_port": master_port, "rank_offset": rank_offset,
            "world_size": world_size, "group_name": group_name, "backend": backend,
        })

    def update_weights_from_distributed(self, *, names: list[str], dtypes: list[str], shapes: list[list[int]],
                                        group_name: str, load_format: Optional[str] = None,
                                        weight_version: Optional[str] = None, flush_cache: bool = True) -> dict:
        body = {"names": names, "dtypes": dtypes, "shapes": shapes, "group_name": group_name,
                "load_format": load_format, "flush_cache": flush_cache}
        if weight_version is not None:
            body["weight_version"] = weight_version
        return self._update("/update_weights_from_distributed", body)

    def destroy_weights_update_group(self, group_name: str, timeout_s: Optional[float] = None) -> dict:
        return self._update("/destroy_weights_update_group", {"group_name": group_name}, timeout_s)

    def get_weights_by_name(self, name: str, truncate_size: int = 100) -> list:
        return self._post("/get_weights_by_name", {"name": name, "truncate_size": truncate_size})

    def update_weight_version(self, new_version: str, *, abort_all_requests: bool = False) -> dict:
        """Announce `new_version` (SGLang aborts running requests by default; this call does not unless asked)."""
        return self._update("/update_weight_version", {"new_version": new_version,
                                                       "abort_all_requests": abort_all_requests})

    # ---- LoRA ----------------------------------------------------------------------------------------------

    def _lora(self, path: str, body: dict) -> dict:
        """One LoRA call; `LoRAUpdateOutput` on success, `UpdateFailed` with SGLang's error_message otherwise."""
        try:
            out = self._post(path, body)
        except HTTPStatusError as e:
            try:
                out = json.loads(e.server_message)
            except ValueError:
                raise e from None
            if not isinstance(out, dict) or "success" not in out:
                raise
        if not isinstance(out, dict) or not out.get("success", False):
            msg = out.get("error_message") if isinstance(out, dict) else out
            raise UpdateFailed(self.url, path, f"success=false: {msg}")
        return out

    def load_lora_adapter(self, name: str, path: str, pinned: bool = False) -> dict:
        """Load the PEFT folder `path` (readable by the server) as adapter `name`; requests name it in `lora_path`."""
        return self._lora("/load_lora_adapter", {"lora_name": name, "lora_path": path, "pinned": pinned})

    def unload_lora_adapter(self, name: str) -> dict:
        """Unload adapter `name` (the server first waits for in-flight requests that use it)."""
        return self._lora("/unload_lora_adapter", {"lora_name": name})

    def load_lora_adapter_from_tensors(self, name: str, config_dict: dict, serialized_tensors: str,
                                       load_format: Optional[str] = None, pinned: bool = False) -> dict:
        """Load an adapter from `serialized_tensors` (`tensor_payload.shared_payload` of {PEFT name: tensor}, or
        of a flattened bucket with load_format="flattened_bucket"; same host only) and its PEFT `config_dict`."""
        return self._lora("/load_lora_adapter_from_tensors", {
            "lora_name": name, "config_dict": config_dict, "serialized_tensors": serialized_tensors,
            "load_format": load_format, "pinned": pinned})
