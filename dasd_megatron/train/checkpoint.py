"""Megatron distributed checkpoints: save at one layout, load at any other.

`save_model`/`load_model`: the model alone (conversion, tests). `save_training_checkpoint`/`load_training_checkpoint`:
everything a resumed run needs to continue exactly as an uninterrupted one (model, optimizer, RNG, loop state).
"""

from __future__ import annotations

import glob
import json
import os
import random
import shutil

import torch
import torch.distributed as dist

from dasd_megatron.model.hf_files import copy_aux_files


def inner_module(model):
    """The megatron module inside a DDP wrapper (or the model itself)."""
    return model.module if hasattr(model, "ddp_config") else model



def trained_sharded_state_dict(model) -> dict:
    """What a training checkpoint stores of the model: every parameter, or with LoRA (`model/lora.py`) the adapters
    only (the frozen base is the HF folder the run started from, identified in the checkpoint's metadata)."""
    from dasd_megatron.model.lora import adapter_sharded_state_dict, has_adapters

    inner = inner_module(model)
    return adapter_sharded_state_dict(inner) if has_adapters(inner) else inner.sharded_state_dict()


def save_model(model, ckpt_dir: str) -> None:
    """Save the model's sharded state dict (each rank writes its shards; megatron dedups replicas)."""
    from megatron.core import dist_checkpointing

    if dist.get_rank() == 0:
        os.makedirs(ckpt_dir, exist_ok=True)
    dist.barrier()
    dist_checkpointing.save(inner_module(model).sharded_state_dict(), ckpt_dir)


def load_model(model, ckpt_dir: str, strict: bool = True) -> None:
    """Load a checkpoint saved at any TP/PP layout into this rank's model chunk (resharding on read)."""
    from megatron.core import dist_checkpointing

    if not dist_checkpointing.check_is_distributed_checkpoint(ckpt_dir):
        raise FileNotFoundError(
            f"{ckpt_dir} is not a megatron distributed checkpoint (no metadata.json). "
            "Fix: point at a folder written by dasd (or tools/convert_hf.py import)"
        )
    inner = inner_module(model)
    state = dist_checkpointing.load(inner.sharded_state_dict(), ckpt_dir)
    inner.load_state_dict(state, strict=strict)


# ---------------------------------------------------------------------------------------------------------------
# Training checkpoints: model + optimizer + RNG + loop state, written atomically, the last N kept.

CKPT_PREFIX = "step_"
META = "dasd_meta.json"  # written last: its presence marks a complete checkpoint
TEACHER_DIR = "teacher"
HF_DIR = "hf"  # config.json + tokenizer of the trained model
PENDING_ROLLOUTS = "pending_rollouts.json"  # batches an asynchronous run generated ahead (train.async_rollout)
# The distributed optimizer's state format (megatron-core; Megatron-LM's default): one sharded tensor per DP-local
# buffer, saved and loaded with no gather. Its default ('fully_sharded_model_space') cannot be saved by
# megatron-core 0.16 ("ShardedTensor.flattened_range is not supported"). A resume may change the DP size, not TP/PP.
# Ignored by the plain (non-distributed) optimizer, whose state is stored per parameter and reloads at any layout.
OPTIM_METADATA = {"distrib_optim_sharding_type": "dp_reshardable"}


def _step_dir(root: str, step: int) -> str:
    return os.path.join(root, f"{CKPT_PREFIX}{step:08d}")


def _rng_state() -> dict:
    import numpy as np

    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

    state["tracker"] = get_cuda_rng_tracker().get_states()
    return state


def _set_rng_state(state: dict) -> None:
    import numpy as np

    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

    get_cuda_rng_tracker().set_states(state["tracker"])


def list_checkpoints(root: str) -> list[tuple[int, str]]:
    """Complete checkpoints under `root` (those whose metadata was written), oldest first."""
    out = []
    for d in glob.glob(os.path.join(root, f"{CKPT_PREFIX}*")):
        name = os.path.basename(d)
        if name[len(CKPT_PREFIX):].isdigit() and os.path.isfile(os.path.join(d, META)):
            out.append((int(name[len(CKPT_PREFIX):]), d))
    return sorted(out)


def save_training_checkpoint(root: str, step: int, model, optimizer, state: dict, keep_last: int = 2,
                             teacher=None, hf_dir: str | None = None, extra_files: dict | None = None) -> str:
    """Save model (any layout can load it), optimizer (sharded; see OPTIM_METADATA), every rank's RNG and the loop `state` (JSON:
    step, data position, ...) as `root/step_XXXXXXXX`, atomically. A separate `teacher` model (train.teacher=frozen
    or ema) goes into its own distributed checkpoint in the `teacher` subfolder. `hf_dir`'s config and tokenizer
    files are copied into `hf/`, so the checkpoint exports and serves on its own (`dasd export`, `dasd eval`).
    `extra_files` ({name: text}, rank 0's) are written into the checkpoint folder before its metadata.

    All ranks write into a temporary sibling folder; after a barrier rank 0 writes the metadata (the completion
    marker) and renames the folder into place. A crash at any point leaves either the previous checkpoints intact
    or a temporary folder that resume ignores and the next save removes. Then only the newest `keep_last` complete
    checkpoints are kept (0 keeps all)."""
    from megatron.core import dist_checkpointing

    rank = dist.get_rank()
    final = _step_dir(root, step)
    tmp = os.path.join(root, f".tmp_{CKPT_PREFIX}{step:08d}")
    if rank == 0:
        os.makedirs(root, exist_ok=True)
        for stale in glob.glob(os.path.join(root, f".tmp_{CKPT_PREFIX}*")):
            shutil.rmtree(stale, ignore_errors=True)
        os.makedirs(tmp)
    dist.barrier()
    model_sd = trained_sharded_state_dict(model)
    sharded = {"model": model_sd, "optimizer": optimizer.sharded_state_dict(model_sd, metadata=OPTIM_METADATA)}
    dist_checkpointing.save(sharded, tmp)
    if teacher is not None:
        if rank == 0:
            os.makedirs(os.path.join(tmp, TEACHER_DIR))
        dist.barrier()
        if hasattr(teacher, "save_to"):  # a LoRA teacher (train/teacher.py): its adapter state only
            teacher.save_to(os.path.join(tmp, TEACHER_DIR))
        else:
            dist_checkpointing.save(inner_module(teacher).sharded_state_dict(), os.path.join(tmp, TEACHER_DIR))
    os.makedirs(os.path.join(tmp, "rng"), exist_ok=True)
    torch.save(_rng_state(), os.path.join(tmp, "rng", f"rank{rank:05d}.pt"))
    dist.barrier()
    if rank == 0:
        if hf_dir is not None:
            copy_aux_files(hf_dir, os.path.join(tmp, HF_DIR))
        for name, text in (extra_files or {}).items():
            with open(os.path.join(tmp, name), "w") as f:
                f.write(text)
        with open(os.path.join(tmp, META), "w") as f:
            json.dump(dict(state, step=step, world_size=dist.get_world_size()), f, indent=2)
        if os.path.exists(final):
            shutil.rmtree(final)
        os.replace(tmp, final)
        if keep_last > 0:
            for _, old in list_checkpoints(root)[:-keep_last]:
                shutil.rmtree(old, ignore_errors=True)
    dist.barrier()
    return final


def _torch_adam_distributed(optimizer) -> list:
    """The sub-optimizers that are megatron DistributedOptimizers around a plain torch Adam (no TE/Apex fused
    Adam: CPU machines, a GPU image without TE), with their index among the chained optimizers."""
    subs = getattr(optimizer, "chained_optimizers", [optimizer])
    return [(i, opt) for i, opt in enumerate(subs)
            if hasattr(opt, "model_param_gbuf_map") and type(getattr(opt, "optimizer", None)) in (torch.optim.Adam,
                                                                                                  torch.optim.AdamW)]


def _fill_empty_adam_state(optimizer) -> None:
    """Give a fresh distributed optimizer's inner torch Adam zero state with a `step` entry.

    megatron-core's `DistributedOptimizer.state_dict()` (called by `sharded_state_dict(is_loading=True)`) reads
    Adam's `step` from the inner torch optimizer's state and asserts there is exactly one value: a fresh optimizer
    has none (its own `init_state_fn` adds the moments but no step). The checkpoint overwrites the moments and the
    parameters; the step is set by `_restore_adam_step`."""
    for _, opt in _torch_adam_distributed(optimizer):
        inner = opt.optimizer
        if inner.state:
            continue
        for group in inner.param_groups:
            for p in group["params"]:
                inner.state[p] = {"step": torch.tensor(0.0), "exp_avg": torch.zeros_like(p.data),
                                  "exp_avg_sq": torch.zeros_like(p.data)}


def _loaded_adam_steps(optimizer, loaded: dict) -> dict:
    """Adam's step count per distributed sub-optimizer, as the checkpoint stored it (in its param groups)."""
    subs = getattr(optimizer, "chained_optimizers", [optimizer])
    steps = {}
    for i, _ in _torch_adam_distributed(optimizer):
        sd = loaded if len(subs) == 1 else loaded[i]
        values = {g["step"] for g in sd["optimizer"]["param_groups"] if "step" in g}
        if len(values) == 1:
            steps[i] = float(values.pop())
    return steps


def _restore_adam_step(optimizer, steps: dict) -> None:
    """Set the inner torch Adam's step after `load_state_dict`: megatron-core's dp_reshardable loader copies each
    parameter's `step` from the tensors of the load request (the placeholders of `_fill_empty_adam_state`) over the
    value it had just read from the checkpoint's param groups, so a resumed run would restart Adam's bias
    correction at step 0."""
    subs = getattr(optimizer, "chained_optimizers", [optimizer])
    for i, step in steps.items():
        for state in subs[i].optimizer.state.values():
            state["step"] = torch.tensor(step)


def load_training_checkpoint(root: str, model, optimizer, step: int | None = None, teacher=None) -> dict | None:
    """Restore the newest (or the given) complete checkpoint under `root`; returns its loop state (with
    `checkpoint_dir`, the folder it came from), or None when there is none. RNG states are restored per rank when the world size is unchanged. `teacher` (a separate teacher
    model) is restored from the checkpoint's `teacher` subfolder, which must exist."""
    from megatron.core import dist_checkpointing

    ckpts = list_checkpoints(root)
    if step is not None:
        ckpts = [c for c in ckpts if c[0] == step]
        if not ckpts:
            raise FileNotFoundError(f"no complete checkpoint for step {step} under {root}")
    if not ckpts:
        return None
    _, path = ckpts[-1]
    from dasd_megatron.model.lora import has_adapters, load_adapter_state

    inner = inner_module(model)
    model_sd = trained_sharded_state_dict(model)
    _fill_empty_adam_state(optimizer)
    sharded = {"model": model_sd,
               "optimizer": optimizer.sharded_state_dict(model_sd, is_loading=True, metadata=OPTIM_METADATA)}
    state = dist_checkpointing.load(sharded, path)
    if has_adapters(inner):
        load_adapter_state(inner, state["model"])
    else:
        inner.load_state_dict(state["model"])
    adam_steps = _loaded_adam_steps(optimizer, state["optimizer"])
    with torch.no_grad():  # the distributed optimizer copies into views of fp32 parameters that require grad
        optimizer.load_state_dict(state["optimizer"])
    _restore_adam_step(optimizer, adam_steps)
    if teacher is not None:
        tdir = os.path.join(path, TEACHER_DIR)
        if not dist_checkpointing.check_is_distributed_checkpoint(tdir):
            raise FileNotFoundError(
                f"{path} has no teacher weights ({TEACHER_DIR}/): it was written by a run with train.teacher=current. "
                "Fix: resume with the teacher mode the run was started with, or start a new run_dir")
        if hasattr(teacher, "load_from"):
            teacher.load_from(tdir)
        else:
            load_model(teacher, tdir)
    with open(os.path.join(path, META)) as f:
        meta = json.load(f)
    meta["checkpoint_dir"] = path
    rng = os.path.join(path, "rng", f"rank{dist.get_rank():05d}.pt")
    if meta.get("world_size") == dist.get_world_size() and os.path.exists(rng):
        _set_rng_state(torch.load(rng, weights_only=False))
    return meta
