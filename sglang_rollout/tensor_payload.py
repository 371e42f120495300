"""The `serialized_named_tensors` payload of `/update_weights_from_tensor`, both directions.

SGLang's format (`MultiprocessingSerializer.serialize(obj, output_str=True)`): a `ForkingPickler` pickle of
either `list[(name, tensor)]` (load_format null/"direct") or, for `load_format="flattened_bucket"`,
`{"flattened_tensor": 1-D tensor, "metadata": [FlattenedTensorMetadata(name, shape, dtype, start_idx, end_idx,
numel)]}`, base64-encoded. `ForkingPickler` turns a CUDA tensor into a CUDA-IPC handle: the receiver maps the
sender's memory, so the payload is only valid on the same host and only while the sender keeps the tensor alive.

CPU tensors (the built-in server on CPU machines) are put into POSIX shared-memory segments by our own reducer
(`reducer_override`) instead of torch's CPU reducers: torch's "file_descriptor" strategy only reaches processes of
one multiprocessing family, and its "file_system" strategy starts a `torch_shm_manager` daemon that can outlive
the sender and hold its inherited file descriptors. Our segments belong to the `shared_payload` context: they are
unlinked when it exits, i.e. after every server answered (the buffer is never reused or freed before the server
copied it). A real SGLang server only ever receives CUDA tensors (colocated GPUs) and never sees this reducer.

When sglang is importable its own `FlattenedTensorMetadata` class is used, because a real SGLang server unpickles
with an allow-list that only knows its own classes. The built-in server accepts either class and nothing outside
an allow-list (`deserialize_named_tensors` refuses arbitrary globals).
"""

from __future__ import annotations

import base64
import contextlib
import io
import pickle
from dataclasses import dataclass
from multiprocessing import shared_memory
from multiprocessing.reduction import ForkingPickler
from typing import Any, Iterator, Sequence

import torch
import torch.multiprocessing  # noqa: F401 - registers torch's CUDA-IPC reducers with ForkingPickler

__all__ = [
    "FlattenedTensorMetadata",
    "flatten_bucket",
    "unflatten_bucket",
    "shared_payload",
    "deserialize_named_tensors",
    "load_payload",
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


def _rebuild_cpu_shm(name: str, shape: tuple, dtype_name: str, nbytes: int) -> torch.Tensor:
    """Receiver side of `_ShmPickler`: a tensor over a private (copy-on-write) mapping of the sender's segment.

    No copy is made here; the mapping lives as long as the tensor (the loader copies it into the model and drops
    it) and stays valid after the sender unlinks the segment. The segment is mapped directly, not through
    `SharedMemory`, which would register it with this process's resource tracker (one a spawned sender may share)
    and unregister it twice.
    """
    import mmap
    import os

    import _posixshmem

    dtype = getattr(torch, dtype_name)
    if nbytes == 0:
        return torch.empty(shape, dtype=dtype)
    fd = _posixshmem.shm_open("/" + name.lstrip("/"), os.O_RDONLY, mode=0o600)
    try:
        m = mmap.mmap(fd, nbytes, access=mmap.ACCESS_COPY)
    finally:
        os.close(fd)
    return torch.frombuffer(m, dtype=torch.uint8, count=nbytes).view(dtype).reshape(shape)


class _ShmPickler(ForkingPickler):
    """ForkingPickler that puts CPU tensors into shared-memory segments owned by `segments`."""

    def __init__(self, buf, segments: list):
        super().__init__(buf, pickle.HIGHEST_PROTOCOL)
        self.segments = segments

    def reducer_override(self, obj):
        if isinstance(obj, torch.Tensor) and obj.device.type == "cpu":
            t = obj.detach().contiguous()
            nbytes = t.numel() * t.element_size()
            shm = shared_memory.SharedMemory(create=True, size=max(nbytes, 1))
            self.segments.append(shm)
            if nbytes:
                dst = torch.frombuffer(shm.buf, dtype=torch.uint8, count=nbytes)
                dst.copy_(t.reshape(-1).view(torch.uint8))
                del dst
            return _rebuild_cpu_shm, (shm.name, tuple(t.shape), str(t.dtype).removeprefix("torch."), nbytes)
        return NotImplemented  # CUDA tensors: torch's CUDA-IPC reducer (SGLang's format)


@contextlib.contextmanager
def shared_payload(obj: Any) -> Iterator[str]:
    """`MultiprocessingSerializer.serialize(obj, output_str=True)`; CPU tensor segments live until exit."""
    segments: list[shared_memory.SharedMemory] = []
    try:
        buf = io.BytesIO()
        _ShmPickler(buf, segments).dump(obj)
        yield base64.b64encode(buf.getvalue()).decode("ascii")
    finally:
        for shm in segments:
            shm.close()
            try:
                shm.unlink()
            except FileNotFoundError:
                pass


# Globals a weight payload may reference: torch's tensor/storage rebuild functions, dtypes and Size, our CPU
# shared-memory rebuild, the metadata classes, plain containers. Anything else (os.system, torch.load, ...) is refused.
_ALLOWED_EXACT = {(__name__, "_rebuild_cpu_shm"), ("torch", "Size"), ("torch", "Tensor"),
                  ("torch.storage", "UntypedStorage"), ("torch.storage", "TypedStorage"),
                  ("collections", "OrderedDict")} | {
    ("builtins", n) for n in ("list", "tuple", "dict", "set", "frozenset", "int", "float", "str", "bytes", "bool",
                              "slice")
}
_ALLOWED_PREFIX = {"torch.multiprocessing.reductions": "rebuild_", "torch._utils": "_rebuild_"}


def _allowed(module: str, name: str) -> bool:
    if (module, name) in _ALLOWED_EXACT:
        return True
    if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
        return True
    prefix = _ALLOWED_PREFIX.get(module)
    return prefix is not None and name.startswith(prefix)


class _WeightUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if name == "FlattenedTensorMetadata":
            return FlattenedTensorMetadata if _SGLMeta is None else _SGLMeta
        if _allowed(module, name):
            return super().find_class(module, name)
        raise PayloadError(f"refused to unpickle {module}.{name}: not allowed in a weight payload")


def load_payload(data: str, field: str = "serialized_named_tensors entry") -> Any:
    """Decode one `MultiprocessingSerializer.serialize(obj, output_str=True)` string with the allow-listed
    unpickler (tensors, their rebuild functions, plain containers; never arbitrary globals). `field` names the
    request field in errors (`PayloadError`)."""
    try:
        raw = base64.b64decode(data, validate=True)
    except (ValueError, TypeError) as e:
        raise PayloadError(f"{field} is not valid base64: {e}") from None
    try:
        return _WeightUnpickler(io.BytesIO(raw)).load()
    except PayloadError:
        raise
    except Exception as e:  # noqa: BLE001 - any unpickling failure is the caller's bad payload
        raise PayloadError(f"{field}: cannot unpickle the tensor payload ({type(e).__name__}: {e}); it is only "
                           "valid on the sending host while the sender keeps its tensors alive") from None


def deserialize_named_tensors(data: str, load_format: str | None) -> list[tuple[str, torch.Tensor]]:
    """Decode one TP rank's entry of `serialized_named_tensors` into (name, tensor) pairs."""
    obj = load_payload(data)
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
