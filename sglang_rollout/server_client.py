"""Typed calls to one SGLang (or built-in) server: one method per endpoint, request bodies per the contract.

Every request body the rollout stack sends is built here (generation bodies in `rollout_client.py` too), so the contract
tests that record what goes over the wire cover all of it. Control calls that answer `{"success": false}` raise
`UpdateFailed` with the server's message.
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

from sglang_rollout.http_client import HttpClient, ServerError

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
