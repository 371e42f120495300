"""Read a Hugging Face safetensors checkpoint, validate it against its config.json, load it into megatron shards.

`open_hf_checkpoint(dir)` checks everything that can be checked from the headers, before any weight is read or any
output is written: the architecture is supported, the weight files exist and parse, every tensor the mapping needs
is present with the shape config.json implies, and nothing unknown is left over. `load_hf_weights(model, ...)`
then fills this rank's model chunk (any TP/PP layout): each parameter's HF tensors are read one at a time, fused by
`hf_mapping.from_hf`, and this TP rank's slice is copied in.
"""

from __future__ import annotations

import json
import logging
import os
from typing import Iterable, Optional

import torch

from dasd_megatron.config import ConfigError
from dasd_megatron.model.hf_config import HFArchitecture, load_hf_architecture
from dasd_megatron.model.hf_mapping import ConversionError, from_hf, hf_shapes, is_ignored_hf, resolve

log = logging.getLogger(__name__)

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".msgpack", ".h5", ".ckpt")
_DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16, "F64": torch.float64}


class HFCheckpoint:
    """A validated HF safetensors checkpoint: name -> file, header shapes and dtypes, lazy tensor reads."""

    def __init__(self, hf_dir: str, arch: HFArchitecture, files: dict[str, str], shapes: dict, dtypes: dict):
        self.hf_dir, self.arch, self.files, self.shapes, self.dtypes = hf_dir, arch, files, shapes, dtypes
        self._handles: dict[str, object] = {}

    @property
    def dtype(self) -> torch.dtype:
        """The checkpoint's floating dtype (the one used by most of its bytes)."""
        counts: dict[torch.dtype, int] = {}
        for name, dt in self.dtypes.items():
            n = 1
            for s in self.shapes[name]:
                n *= s
            counts[dt] = counts.get(dt, 0) + n
        return max(counts, key=counts.get)

    def get(self, name: str) -> torch.Tensor:
        from safetensors import safe_open

        path = self.files[name]
        if path not in self._handles:
            self._handles[path] = safe_open(path, framework="pt")
        try:
            return self._handles[path].get_tensor(name)
        except Exception as e:  # noqa: BLE001 - a truncated or damaged data section
            raise ConversionError(f"{path}: cannot read tensor {name!r} ({e}). "
                                  "Fix: re-download or re-save the checkpoint") from None

    def close(self) -> None:
        self._handles.clear()


def weight_files(hf_dir: str) -> dict[str, str]:
    """HF tensor name -> safetensors path, from the index if there is one, else from model.safetensors."""
    index = os.path.join(hf_dir, INDEX_FILE)
    if os.path.isfile(index):
        try:
            with open(index) as f:
                weight_map = json.load(f)["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise ConversionError(f"{index} is not a valid safetensors index ({e!r}). "
                                  "Fix: restore it, or delete it if model.safetensors holds all weights") from None
        files = {name: os.path.join(hf_dir, fn) for name, fn in weight_map.items()}
        missing = sorted({p for p in files.values() if not os.path.isfile(p)})
        if missing:
            raise ConversionError(f"{index} lists {len(missing)} missing weight file(s): "
                                  f"{', '.join(os.path.basename(p) for p in missing[:3])}. "
                                  "Fix: download the complete checkpoint")
        return files
    single = os.path.join(hf_dir, SINGLE_FILE)
    if os.path.isfile(single):
        return {name: single for name in _header(single)}
    others = sorted(f for f in os.listdir(hf_dir) if f.endswith(WEIGHT_SUFFIXES))
    hint = (f" (found {', '.join(others[:3])}: re-save with transformers' save_pretrained, which writes safetensors)"
            if others else "")
    raise ConversionError(f"no safetensors weights in {hf_dir}: neither {SINGLE_FILE} nor {INDEX_FILE}{hint}. "
                          "Fix: point at a Hugging Face model folder with safetensors weights")


def _header(path: str) -> dict[str, tuple[tuple[int, ...], str]]:
    """name -> (shape, safetensors dtype string), from the file header (no data read)."""
    from safetensors import safe_open

    try:
        with safe_open(path, framework="pt") as f:
            out = {}
            for name in f.keys():
                sl = f.get_slice(name)
                out[name] = (tuple(sl.get_shape()), sl.get_dtype())
            return out
    except Exception as e:  # noqa: BLE001 - safetensors raises its own error types for bad headers
        raise ConversionError(f"{path} is not a readable safetensors file ({type(e).__name__}: {e}). "
                              "Fix: re-download or re-save the checkpoint") from None


def open_hf_checkpoint(hf_dir: str) -> HFCheckpoint:
    """Validate `hf_dir` (config, files, names, shapes) and return a lazy reader. Raises ConversionError."""
    if not os.path.isdir(hf_dir):
        raise ConversionError(f"{hf_dir} is not a folder. Fix: pass a Hugging Face model folder")
    try:
        arch = load_hf_architecture(hf_dir)
    except ConfigError as e:
        raise ConversionError(str(e)) from None
    files = weight_files(hf_dir)
    shapes, dtypes = {}, {}
    for path in sorted(set(files.values())):
        for name, (shape, dt) in _header(path).items():
            if files.get(name) == path:
                shapes[name] = shape
                if dt not in _DTYPES:
                    raise ConversionError(f"{path}: tensor {name!r} has dtype {dt}, not a float type. "
                                          "Fix: convert a non-quantized float checkpoint")
                dtypes[name] = _DTYPES[dt]
    absent = sorted(set(files) - set(shapes))
    if absent:
        raise ConversionError(f"{INDEX_FILE} in {hf_dir} lists {absent[0]!r} (and {len(absent) - 1} more) but its "
                              "file does not contain it. Fix: download the complete checkpoint")
    _check_names_and_shapes(hf_dir, arch, shapes)
    return HFCheckpoint(hf_dir, arch, files, shapes, dtypes)


def _check_names_and_shapes(hf_dir: str, arch: HFArchitecture, shapes: dict) -> None:
    expected = hf_shapes(arch)
    missing = [n for n in expected if n not in shapes]
    if missing:
        raise ConversionError(f"{hf_dir}: {len(missing)} tensor(s) that config.json implies are missing, e.g. "
                              f"{missing[0]!r}. Fix: use the config.json that belongs to these weights")
    tied_head = arch.tie_word_embeddings and "lm_head.weight" in shapes
    extra = [n for n in shapes
             if n not in expected and not is_ignored_hf(n) and not (tied_head and n == "lm_head.weight")]
    if extra:
        raise ConversionError(f"{hf_dir}: {len(extra)} tensor(s) the {arch.model_type} mapping does not know, e.g. "
                              f"{extra[0]!r}. Fix: check that config.json (model_type, qk-norm, bias, tying) "
                              "matches the weights")
    for name, shape in expected.items():
        if tuple(shapes[name]) != shape:
            raise ConversionError(f"{hf_dir}: shape mismatch for {name!r}: the file has {list(shapes[name])}, "
                                  f"config.json implies {list(shape)}. Fix: use the config.json that belongs to "
                                  "these weights")
    if tied_head:
        log.warning("%s: tie_word_embeddings=true; ignoring the stored lm_head.weight", hf_dir)


def local_params(model) -> Iterable[tuple[str, torch.nn.Parameter, torch.nn.Module]]:
    """(global name, parameter, GPTModel) for every base parameter of this rank's model chunk(s) (a model or a
    list); LoRA adapter parameters (`model/lora.py`) are not part of the HF checkpoint and are skipped."""
    from dasd_megatron.model.lora import is_adapter_param
    from dasd_megatron.model.sharding import global_name

    for chunk in model if isinstance(model, (list, tuple)) else [model]:
        inner = unwrap(chunk)
        for name, p in inner.named_parameters():
            if not is_adapter_param(p):
                yield global_name(inner, name), p, inner


def unwrap(module):
    """The GPTModel inside DDP / Float16Module wrappers."""
    while hasattr(module, "module") and not hasattr(module, "decoder"):
        module = module.module
    return module


@torch.no_grad()
def load_hf_weights(model, ckpt: HFCheckpoint, *, progress: Optional[object] = None) -> int:
    """Copy the HF weights into this rank's model chunk(s) (any TP/PP layout). Returns the bytes loaded.

    The vocabulary padding is read off the model (rows per TP rank x TP size) and filled with zeros.
    `progress` (e.g. a tqdm bar) is advanced once per parameter.
    """
    from megatron.core import parallel_state as ps

    from dasd_megatron.model.sharding import is_glu_fc1, split_tp_shard

    tp, tp_rank = ps.get_tensor_model_parallel_world_size(), ps.get_tensor_model_parallel_rank()
    arch, done = ckpt.arch, 0
    for gname, param, inner in local_params(model):
        res = resolve(gname, arch)
        sharded = getattr(param, "tensor_model_parallel", False)
        dim = getattr(param, "partition_dim", 0)
        padded_vocab = param.shape[0] * (tp if sharded else 1)
        full = from_hf(res, [ckpt.get(n) for n in res.hf_names], arch, padded_vocab)
        shard = split_tp_shard(gname, full, dim, is_glu_fc1(gname, inner.config), tp_rank, tp) if sharded else full
        if tuple(shard.shape) != tuple(param.shape):
            raise ConversionError(f"{gname}: built from {list(res.hf_names)} it has shape {list(shard.shape)} on "
                                  f"TP rank {tp_rank}, the model expects {list(param.shape)}. Fix: build the model "
                                  "from the checkpoint's own config.json")
        param.data.copy_(shard)
        done += shard.numel() * shard.element_size()
        if progress is not None:
            progress.update(1)
    ckpt.close()
    return done


def count_local_params(model) -> int:
    """How many parameters this rank holds (for progress bars)."""
    return sum(1 for _ in local_params(model))
