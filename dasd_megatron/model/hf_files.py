"""The non-weight files of a Hugging Face model folder (config.json, tokenizer, generation config, chat template).

They travel with every checkpoint this project writes (`CKPT/hf/`), so a checkpoint can be rebuilt, served and
exported without the user naming the folder it came from.
"""

from __future__ import annotations

import json
import os
import shutil

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".msgpack", ".h5", ".ckpt", ".distcp")
"""Files that hold weights (or shards of them): never copied as auxiliary files."""
PROVENANCE_FILES = {"model.safetensors.index.json", "pytorch_model.bin.index.json", "dasd_convert.json",
                    "dasd_export.json"}
"""Weight indexes and this project's own provenance records: they describe one folder, not the model."""


def copy_aux_files(src: str, dst: str, config_override: dict | None = None) -> list[str]:
    """Copy config, tokenizer and other non-weight files of `src` (not sub-folders) into `dst`; optionally rewrite
    keys of config.json. Returns the copied names."""
    os.makedirs(dst, exist_ok=True)
    copied = []
    for name in sorted(os.listdir(src)):
        path = os.path.join(src, name)
        if (not os.path.isfile(path) or name.endswith(WEIGHT_SUFFIXES) or name in PROVENANCE_FILES
                or name.startswith(".")):
            continue
        if name == "config.json" and config_override:
            with open(path) as f:
                cfg = json.load(f)
            cfg.update(config_override)
            with open(os.path.join(dst, name), "w") as f:
                json.dump(cfg, f, indent=2, sort_keys=True)
                f.write("\n")
        else:
            shutil.copy2(path, os.path.join(dst, name))
        copied.append(name)
    return copied
