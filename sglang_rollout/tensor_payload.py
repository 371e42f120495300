"""The `serialized_named_tensors` payload of `/update_weights_from_tensor`, both directions.

SGLang's format (`MultiprocessingSerializer.serialize(obj, output_str=True)`): a `ForkingPickler` pickle of
either `list[(name, tensor)]` (load_format null/"direct") or, for `load_format="flattened_bucket"`,
`{"flattened_tensor": 1-D tensor, "metadata": [FlattenedTensorMetadata(name, shape, dtype, start_idx, end_idx,
numel)]}`, base64-encoded. `ForkingPickler` turns a CUDA tensor into a CUDA-IPC handle and a CPU tensor into a
shared-memory segment: the receiver maps the sender's memory, so the payload is only valid on the same host and
only while the sender keeps the tensor alive (the sender must hold its bucket until the HTTP call returns).

CPU tensors are shared with torch's ``file_system`` strategy while serialising: the default
``file_descriptor`` strategy passes descriptors through a multiprocessing resource sharer that only processes of
one multiprocessing family (same authkey) can reach, which a separately launched server is not.

When sglang is importable its own `FlattenedTensorBucket`/`FlattenedTensorMetadata` classes are used, because a
real SGLang server unpickles with an allow-list that only knows its own classes. The built-in server accepts
either class (and nothing outside an allow-list: `deserialize` refuses arbitrary globals).
"""

from __future__ import annotations

import base64
import contextlib
import io
import pickle
import threading
from dataclasses import dataclass
from multiprocessing.reduction import ForkingPickler
from typing import Any, Iterable, Sequence

import torch
import torch.multiprocessing as tmp

__all__ = [
    "FlattenedTensorMetadata",
    "flatten_bucket",
    "unflatten_bucket",
    "serialize_named_tensors",
    "deserialize_named_tensors",
    "PayloadError",
]


class PayloadError(ValueError):
    """A `serialized_named_tensors` payload that cannot be decoded or has the wrong shape."""


try:  # pragma: no cover - sglang is not installable on the CPU machines
    from sglang.srt.weight_sync.tensor_bucket import FlattenedTensorMetadata as _SGLMeta  # type: ignore
except Exception:  # noqa: BLE001
    _SGLMeta = None


@dataclass
class FlattenedTensorMetadata:
    """Same fields as sglang's `FlattenedTensorMetadata` (used when sglang is not installed)."""

    name: str
    shape: torch.Size
    dtype: torch.dtype
    start_idx: int
    end_idx: int
    numel: int


_META_CLS = _SGLMeta or FlattenedTensorMetadata


def flatten_bucket(named: Sequence[tuple[str, torch.Tensor]]) -> dict:
    """`{"flattened_tensor", "metadata"}` as sglang's FlattenedTensorBucket builds it (one dtype per bucket)."""
    if not named:
        raise PayloadError("cannot flatten an empty bucket")
    dtypes = {t.dtype for _, t in named}
    if len(dtypes) != 1:
        raise PayloadError(
            f"a flattened bucket must hold one dtype, got {sorted(map(str, dtypes))}; plan buckets per dtype"
        )
    metadata, flat, idx = [], [], 0
    for name, t in named:
        n = t.numel()
        metadata.append(_META_CLS(name=name, shape=t.shape, dtype=t.dtype, start_idx=idx, end_idx=idx + n, numel=n))
        flat.append(t.reshape(-1))
        idx += n
    return {"flattened_tensor": torch.cat(flat), "metadata": metadata}


def unflatten_bucket(obj: Any) -> list[tuple[str, torch.Tensor]]:
    """Inverse of `flatten_bucket` (views into the flat tensor)."""
    if not isinstance(obj, dict) or "flattened_tensor" not in obj or "metadata" not in obj:
        raise PayloadError("load_format='flattened_bucket' expects {'flattened_tensor': ..., 'metadata': [...]}")
    flat = obj["flattened_tensor"]
    out = []
    for m in obj["metadata"]:
        get = m.get if isinstance(m, dict) else lambda k, m=m: getattr(m, k)
        t = flat[get("start_idx"):get("end_idx")]
        if t.dtype != get("dtype"):
            t = t.to(get("dtype"))
        out.append((get("name"), t.reshape(tuple(get("shape")))))
    return out


_strategy_lock = threading.Lock()


@contextlib.contextmanager
def _file_system_sharing():
    with _strategy_lock:
        old = tmp.get_sharing_strategy()
        tmp.set_sharing_strategy("file_system")
        try:
            yield
        finally:
            tmp.set_sharing_strategy(old)


def serialize_named_tensors(obj: Any) -> str:
    """`MultiprocessingSerializer.serialize(obj, output_str=True)`: ForkingPickler pickle, base64 text."""
    buf = io.BytesIO()
    with _file_system_sharing():
        ForkingPickler(buf, pickle.HIGHEST_PROTOCOL).dump(obj)
    return base64.b64encode(buf.getvalue()).decode("ascii")


# Globals a weight payload may reference: torch's own rebuild functions, storages and dtypes, our metadata class
# and sglang's. Anything else (os.system, ...) is refused.
_ALLOWED_MODULE_PREFIXES = ("torch", "multiprocessing.resource_sharer", "collections")
_ALLOWED_EXACT = {
    ("builtins", n) for n in ("list", "tuple", "dict", "set", "frozenset", "int", "float", "str", "bytes", "bool",
                              "slice", "getattr")
}


class _WeightUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if name == "FlattenedTensorMetadata":
            return FlattenedTensorMetadata if _SGLMeta is None else _SGLMeta
        if (module, name) in _ALLOWED_EXACT or module.split(".")[0] in _ALLOWED_MODULE_PREFIXES:
            return super().find_class(module, name)
        raise PayloadError(f"refused to unpickle {module}.{name}: not allowed in a weight payload")


def deserialize_named_tensors(data: str, load_format: str | None) -> list[tuple[str, torch.Tensor]]:
    """Decode one TP rank's entry of `serialized_named_tensors` into (name, tensor) pairs."""
    try:
        raw = base64.b64decode(data, validate=True)
    except (ValueError, TypeError) as e:
        raise PayloadError(f"serialized_named_tensors entry is not valid base64: {e}") from None
    try:
        obj = _WeightUnpickler(io.BytesIO(raw)).load()
    except PayloadError:
        raise
    except Exception as e:  # noqa: BLE001 - any unpickling failure is the caller's bad payload
        raise PayloadError(f"cannot unpickle the tensor payload ({type(e).__name__}: {e}); it is only valid on the "
                           "sending host while the sender keeps its tensors alive") from None
    if load_format == "flattened_bucket":
        return unflatten_bucket(obj)
    if load_format not in (None, "direct"):
        raise PayloadError(f"load_format={load_format!r} is not supported (use null, 'direct' or 'flattened_bucket')")
    if not isinstance(obj, (list, tuple)) or not all(
        isinstance(p, (list, tuple)) and len(p) == 2 and isinstance(p[0], str) and isinstance(p[1], torch.Tensor)
        for p in obj
    ):
        raise PayloadError("expected a list of (name, tensor) pairs in the tensor payload")
    return [(n, t) for n, t in obj]


def named_tensors_nbytes(named: Iterable[tuple[str, torch.Tensor]]) -> int:
    return sum(t.numel() * t.element_size() for _, t in named)
