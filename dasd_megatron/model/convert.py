"""Checkpoint conversion between Hugging Face folders and megatron-core distributed checkpoints.

`run_import`: HF safetensors folder -> megatron distributed checkpoint (loadable at any TP/PP) plus `hf/` with the
config and tokenizer. `run_export`: any checkpoint this project writes -> HF folder (sharded safetensors + index,
config, tokenizer), loadable by transformers. The checkpoints `run_export` takes (`resolve_checkpoint`):

- a run folder (`RUN/checkpoints/step_N/`): its newest complete checkpoint, or `step=N`;
- a training checkpoint (`step_N/`: model + optimizer + RNG + loop state; the model alone is read), at whatever
  TP/PP/CP/DP layout and dtype it was saved; `teacher=True` reads its `teacher/` weights (train.teacher=frozen|ema);
- a checkpoint written by `run_import` (the model alone).

A LoRA training checkpoint (`model.lora.rank > 0`, `model/lora.py`) holds only the adapter tensors; its
`dasd_meta.json` records the LoRA config and the base HF folder with its fingerprint (`lora.base_fingerprint`).
It exports merged by default: the model is built, the base is read from the recorded folder (`base=` / `--base`
for a moved copy; refused when it is missing or its fingerprint differs), the adapter applied and loaded, and the
streaming exporter writes W + alpha/rank B A (fp32, cast back). `adapter=True` (`--adapter`) writes a PEFT adapter
folder instead (`adapter_config.json` + `adapter_model.safetensors` + tokenizer files), which reads no base
weights. `teacher=True` on a train.teacher=ema LoRA checkpoint gives the base with the EMA adapter.

The HF config and tokenizer come from the checkpoint's own `hf/` folder (training writes one into every
checkpoint), else from the run's `config.json` (`model.hf_config`, for checkpoints written before checkpoints kept
`hf/`), else from `hf_config=`. The vocabulary padding and dtype are read from the checkpoint's tensor metadata, so
a checkpoint saved at TP=2 (rows padded to a multiple of 2 x 128) loads into a TP=1 export.

Both directions write into a hidden sibling folder and rename it at the end; on failure it is removed. One process
is enough (a gloo group of one is created); under torchrun, `tp`/`pp` spread the model over the processes.
`tools/convert_hf.py` and `dasd export` are the command lines.
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
import shutil
import time
import uuid
import warnings
from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist

from dasd_megatron.config import ConfigError
from dasd_megatron.model.hf_files import copy_aux_files
from dasd_megatron.model.hf_mapping import ConversionError

HF_SUBDIR = "hf"
IMPORT_META = "dasd_convert.json"
EXPORT_META = "dasd_export.json"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}
EMBEDDING_KEY = "embedding.word_embeddings.weight"
MODEL_PREFIXES = ("embedding", "decoder", "output_layer")  # GPTModel's top-level modules in checkpoint keys
# training checkpoints (dasd_megatron.train.checkpoint): the marker file, the model's sub-dict, the teacher folder
TRAIN_META, TRAIN_MODEL_KEY, TEACHER_SUBDIR, CKPT_SUBDIR = "dasd_meta.json", "model", "teacher", "checkpoints"


# ---------------------------------------------------------------------------------------------------------------
# Helpers: output staging, parallel session


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _barrier() -> None:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else int(os.environ.get("WORLD_SIZE", "1"))


def check_output(out_dir: str, overwrite: bool) -> None:
    if os.path.exists(out_dir) and not overwrite:
        raise ConversionError(f"output folder {out_dir} already exists. Fix: choose a new path, delete it, or pass "
                              "--overwrite")
    parent = os.path.dirname(os.path.abspath(out_dir))
    if not os.path.isdir(parent):
        raise ConversionError(f"parent folder {parent} of the output does not exist. Fix: create it first")


@contextlib.contextmanager
def staged_output(out_dir: str, overwrite: bool):
    """Yield a hidden temporary sibling of `out_dir` (same on all ranks); rename it to `out_dir` on success and
    remove it on any failure, so no half-written output is ever left under `out_dir`."""
    out_dir = os.path.abspath(out_dir)
    token = [uuid.uuid4().hex[:8]]
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.broadcast_object_list(token, src=0)
    tmp = os.path.join(os.path.dirname(out_dir), f".{os.path.basename(out_dir)}.partial-{token[0]}")
    if _rank() == 0:
        os.makedirs(tmp)
    _barrier()
    try:
        yield tmp
        _barrier()
        if _rank() == 0:
            if os.path.exists(out_dir):  # only reachable with overwrite
                shutil.rmtree(out_dir)
            os.replace(tmp, out_dir)
    except BaseException:
        if _rank() == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        raise


@contextlib.contextmanager
def parallel_session(tp: int, pp: int):
    """Megatron parallel state for the conversion; a gloo/NCCL group of one when not launched by torchrun."""
    from megatron.core import parallel_state as ps

    from dasd_megatron.config import ParallelConfig
    from dasd_megatron.parallel import initialize_parallel

    created = not dist.is_initialized()
    ctx = initialize_parallel(ParallelConfig(tensor=tp, pipeline=pp))
    try:
        yield ctx
    finally:
        ps.destroy_model_parallel()
        if created and dist.is_initialized():
            dist.destroy_process_group()


def _progress(total: int, desc: str, unit: str = "it", **kw):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit=unit, disable=_rank() != 0, mininterval=1.0, **kw)


def conversion_config(hf_config_dir: str, dtype: torch.dtype, tp: int, pp: int, vocab_divisor: int):
    """The RunConfig that builds the model to convert: SDPA spec, params in `dtype`, at (tp, pp)."""
    from dasd_megatron.config import ModelConfig, ParallelConfig, PrecisionConfig, RunConfig

    return RunConfig(
        model=ModelConfig(hf_config=hf_config_dir, seq_length=1, attention_backend="sdpa",
                          make_vocab_size_divisible_by=vocab_divisor),
        parallel=ParallelConfig(tensor=tp, pipeline=pp),
        precision=PrecisionConfig(params_dtype=DTYPE_NAMES[dtype]),
    )


def one_line(exc, limit: int = 200) -> str:
    """A short one-line description of `exc`; for torch's CheckpointException, of the first rank's failure."""
    failures = getattr(exc, "failures", None)
    if isinstance(failures, dict) and failures:
        exc = next(iter(failures.values()))
        exc = exc[0] if isinstance(exc, tuple) else exc  # (exception, traceback) per rank
    if isinstance(exc, KeyError) and exc.args:
        exc = exc.args[0]
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def dtype_arg(name: str, where: str) -> torch.dtype | None:
    if name == "auto":
        return None
    if name not in DTYPES:
        raise ConversionError(f"--dtype {name}: {where} supports {', '.join(['auto', *DTYPES])}. Fix: pick one")
    return DTYPES[name]


# ---------------------------------------------------------------------------------------------------------------
# Which checkpoint: run folder, training checkpoint, teacher, imported checkpoint


@dataclass(frozen=True)
class LoRASource:
    """What a LoRA training checkpoint says about its adapter and its base (`dasd_meta.json`, `model.lora` and
    `model.base`), with the base folder this export reads (the recorded one, or `--base`)."""

    config: dict
    """The `LoRAConfig` fields the run trained with (rank, alpha, targets, dropout, sync)."""
    base_dir: str
    """The base HF folder to read: the recorded one, or the `--base` override."""
    recorded_base: str
    """The base HF folder the run trained from, as recorded."""
    fingerprint: Optional[str]
    """`lora.base_fingerprint` of the base at training time (None in checkpoints that did not record it)."""
    base_present: bool = True
    """Whether `base_dir` holds weights here (an adapter-only export does without)."""

    def lora_config(self):
        from dasd_megatron.config import LoRAConfig, from_dict

        return from_dict(LoRAConfig, {k: v for k, v in self.config.items() if k in LoRAConfig.__dataclass_fields__})


@dataclass(frozen=True)
class CheckpointSource:
    """A checkpoint resolved for export: where the weights are and how to read them."""

    weights_dir: str
    """The megatron distributed checkpoint holding the weights (`step_N`, `step_N/teacher` or an imported one)."""
    hf_dir: str
    """The HF folder with config.json and the tokenizer files."""
    kind: str
    """'training' (written by `dasd train`) or 'model' (a model alone: `run_import`, a teacher folder)."""
    weights: str = "policy"
    """'policy' or 'teacher'."""
    model_key: Optional[str] = None
    """The model's sub-dict inside the checkpoint (training checkpoints also hold the optimizer), or None."""
    step: Optional[int] = None
    run_dir: Optional[str] = None
    lora: Optional[LoRASource] = None
    """Set for a LoRA checkpoint (its weights are adapters over a separate base model)."""

    @property
    def checkpoint_dir(self) -> str:
        """The checkpoint folder the user means (`step_N`, also for its teacher)."""
        return os.path.dirname(self.weights_dir) if self.weights == "teacher" else self.weights_dir

    def describe(self) -> str:
        what = f"the {self.weights} of step {self.step}" if self.step is not None else "the model"
        if self.lora is not None:
            what = f"the LoRA {self.weights} (adapter) of step {self.step}"
        return f"{what} in {self.checkpoint_dir}"


def _is_dist_checkpoint(path: str) -> bool:
    return os.path.isfile(os.path.join(path, "metadata.json"))


def _is_training_checkpoint(path: str) -> bool:
    return os.path.isfile(os.path.join(path, TRAIN_META))


def _training_checkpoints(root: str) -> list[tuple[int, str]]:
    from dasd_megatron.train.checkpoint import list_checkpoints

    return list_checkpoints(root)


def _pick_step(root: str, step: Optional[int], shown: str) -> str:
    ckpts = _training_checkpoints(root)
    if not ckpts:
        partial = glob.glob(os.path.join(root, ".tmp_step_*"))
        why = " (only an unfinished save, which is ignored)" if partial else ""
        raise ConversionError(f"{shown}: no complete training checkpoint under {root}{why}. Fix: train until a "
                              "checkpoint is written (every train.checkpoint_interval steps and at the last step)")
    if step is None:
        return ckpts[-1][1]
    for s, path in ckpts:
        if s == step:
            return path
    raise ConversionError(f"{shown}: no checkpoint of step {step}; the run kept steps "
                          f"{', '.join(str(s) for s, _ in ckpts)} (train.keep_last_checkpoints). Fix: pick one of them")


def _run_dir_of(step_dir: str) -> Optional[str]:
    parent = os.path.dirname(os.path.abspath(step_dir))
    return os.path.dirname(parent) if os.path.basename(parent) == CKPT_SUBDIR else None


def _hf_dir_from_run(run_dir: Optional[str]) -> Optional[str]:
    """`model.hf_config` of the run's config.json (a local folder once training resolved it), if it still exists."""
    if not run_dir or not os.path.isfile(os.path.join(run_dir, "config.json")):
        return None
    with open(os.path.join(run_dir, "config.json")) as f:
        path = (json.load(f).get("model") or {}).get("hf_config") or ""
    return path if path and os.path.isfile(os.path.join(path, "config.json")) else None


def _lora_source(meta: dict, shown: str, base: Optional[str], adapter: bool) -> Optional[LoRASource]:
    """The LoRA part of a training checkpoint's metadata with its base checked (None for a full checkpoint).

    The base must exist and match the recorded fingerprint, except that an adapter-only export (`adapter`) reads no
    base weights: a missing base is allowed there (the PEFT config still names it); a present but different one is
    still refused, since the PEFT config would name a base the adapter was not trained on."""
    model_meta = meta.get(TRAIN_MODEL_KEY) or {}
    cfg = model_meta.get("lora") or {}
    if not cfg or int(cfg.get("rank") or 0) <= 0:
        if base:
            raise ConversionError(f"--base {base} with {shown}, which holds full weights (not a LoRA adapter). Fix: "
                                  "drop --base")
        return None
    rec = model_meta.get("base") or {}
    recorded = rec.get("path") or model_meta.get("hf_config") or ""
    fingerprint = rec.get("fingerprint")
    base_dir = os.path.abspath(os.path.expanduser(base)) if base else recorded
    where = f"--base {base}" if base else f"its base model {recorded or '(none recorded)'}"
    fix_missing = ("Fix: export with --base PATH (`dasd export`, `convert_hf.py export`), PATH a copy of the base "
                   "model the run trained from (the same weights: their fingerprint is checked)"
                   + ("" if adapter else ", or export the adapter alone with --adapter (it needs no base weights)"))
    if not base_dir or not os.path.isdir(base_dir):
        if not adapter:
            raise ConversionError(f"{shown} is a LoRA checkpoint (only the rank-{cfg.get('rank')} adapter is "
                                  f"stored), and {where} is not a folder here: the merged export needs the base "
                                  f"weights. {fix_missing}")
        return LoRASource(cfg, base_dir, recorded, fingerprint, base_present=False)
    if not glob.glob(os.path.join(base_dir, "*.safetensors")):
        if not adapter:
            raise ConversionError(f"{shown} is a LoRA checkpoint, and {where} holds no *.safetensors weights: the "
                                  f"merged export needs the base weights. {fix_missing}")
        return LoRASource(cfg, base_dir, recorded, fingerprint, base_present=False)
    if fingerprint:
        from dasd_megatron.model.lora import base_fingerprint

        have = base_fingerprint(base_dir)
        if have != fingerprint:
            raise ConversionError(
                f"{shown} is a LoRA checkpoint, and the base model at {base_dir} is not the one its adapter was "
                f"trained on: its weights' fingerprint {have[:12]} differs from the recorded {fingerprint[:12]} "
                "(the files were replaced or changed). An adapter over other weights is a different model. Fix: "
                "export with --base PATH (`dasd export`, `convert_hf.py export`), PATH an unchanged copy of the "
                f"base the run trained from ({recorded})")
    return LoRASource(cfg, base_dir, recorded, fingerprint)


def resolve_checkpoint(path: str, *, step: Optional[int] = None, teacher: bool = False,
                       hf_config: Optional[str] = None, base: Optional[str] = None,
                       adapter: bool = False) -> CheckpointSource:
    """Find the weights and the HF folder of `path` (a run folder, its checkpoints/ folder, a training checkpoint,
    a teacher folder or an imported checkpoint). Errors say what was found and what to pass instead.

    For a LoRA checkpoint the base model is found and checked too (`_lora_source`): `base` overrides the recorded
    folder; `adapter` (an adapter-only export) allows a missing base."""
    shown = path
    path = os.path.abspath(os.path.expanduser(path))
    if not os.path.isdir(path):
        raise ConversionError(f"{shown}: no such folder. Fix: pass a run folder (runs/NAME), a checkpoint folder "
                              "(runs/NAME/checkpoints/step_N) or a folder written by `convert_hf.py import`")
    if os.path.basename(path) == TEACHER_SUBDIR and _is_training_checkpoint(os.path.dirname(path)):
        path, teacher = os.path.dirname(path), True  # step_N/teacher means the teacher of step_N
    if os.path.isdir(os.path.join(path, CKPT_SUBDIR)) and not _is_dist_checkpoint(path):
        path = _pick_step(os.path.join(path, CKPT_SUBDIR), step, shown)  # a run folder
    elif _training_checkpoints(path) and not _is_dist_checkpoint(path):
        path = _pick_step(path, step, shown)  # the run's checkpoints/ folder
    elif step is not None:
        raise ConversionError(f"--step {step} with {shown}, which is a single checkpoint. Fix: drop --step, or pass "
                              "the run folder")
    if _is_training_checkpoint(path):
        with open(os.path.join(path, TRAIN_META)) as f:
            meta = json.load(f)
        run_dir = _run_dir_of(path)
        lora = _lora_source(meta, shown, base, adapter)
        hf_dir = hf_config or next((d for d in (os.path.join(path, HF_SUBDIR), _hf_dir_from_run(run_dir),
                                                lora.base_dir if lora is not None else None)
                                    if d and os.path.isfile(os.path.join(d, "config.json"))), None)
        if hf_dir is None:
            raise ConversionError(f"{shown}: the checkpoint has no {HF_SUBDIR}/ folder and its run's config.json "
                                  "names no HF folder that exists here. Fix: pass --hf-config with the HF folder the "
                                  "run trained (config.json and tokenizer)")
        if teacher:
            tdir = os.path.join(path, TEACHER_SUBDIR)
            if not _is_dist_checkpoint(tdir):
                mode = (meta.get("model") or {}).get("teacher", "current")
                if lora is not None and mode == "base":
                    raise ConversionError(f"{shown}: step {meta.get('step')} has no teacher weights: the run used "
                                          "LoRA with train.teacher=base, whose teacher is the base model itself "
                                          f"({lora.recorded_base}). Fix: use that folder as it is, or export "
                                          "without --teacher")
                raise ConversionError(f"{shown}: step {meta.get('step')} has no teacher weights: the run used "
                                      f"train.teacher={mode}, whose teacher is the policy itself. Fix: export "
                                      "without --teacher")
            return CheckpointSource(tdir, hf_dir, "training", "teacher", None, int(meta["step"]), run_dir, lora)
        return CheckpointSource(path, hf_dir, "training", "policy", TRAIN_MODEL_KEY, int(meta["step"]), run_dir,
                                lora)
    if base:
        raise ConversionError(f"--base {base} with {shown}, which is not a LoRA training checkpoint. Fix: drop --base")
    if not _is_dist_checkpoint(path) and glob.glob(os.path.join(path, "*.safetensors")):
        raise ConversionError(f"{shown} is a Hugging Face folder already (config.json + safetensors): it needs no "
                              "export. Fix: use it as it is (transformers, SGLang, dasd eval --model), or pass a "
                              "checkpoint folder")
    if not _is_dist_checkpoint(path):
        raise ConversionError(f"{shown} is neither a run folder (no {CKPT_SUBDIR}/), a training checkpoint (no "
                              f"{TRAIN_META}) nor a megatron distributed checkpoint (no metadata.json). Fix: pass a "
                              "run folder, a folder written by training or by `convert_hf.py import`")
    if teacher:
        raise ConversionError(f"--teacher with {shown}: only training checkpoints hold a separate teacher. Fix: drop "
                              "--teacher, or pass a checkpoint of a run with train.teacher=frozen or ema")
    hf_dir = hf_config or os.path.join(path, HF_SUBDIR)
    if not os.path.isfile(os.path.join(hf_dir, "config.json")):
        raise ConversionError(f"no HF config.json in {hf_dir}. Fix: pass --hf-config with the model's HF folder "
                              "(config and tokenizer)")
    return CheckpointSource(path, hf_dir, "model")


def default_export_dir(src: CheckpointSource, adapter: bool = False) -> str:
    """Where `dasd export` writes by default: RUN/export/step_N (or step_N-teacher; `-adapter` appended for a PEFT
    adapter export), else a sibling `<ckpt>-hf` (`<ckpt>-adapter`)."""
    suffix = ("-teacher" if src.weights == "teacher" else "") + ("-adapter" if adapter else "")
    if adapter and (src.run_dir is None or src.step is None):
        return src.checkpoint_dir.rstrip("/") + suffix
    if src.run_dir is not None and src.step is not None:
        return os.path.join(src.run_dir, "export", f"step_{src.step:08d}{suffix}")
    return src.checkpoint_dir.rstrip("/") + f"{suffix}-hf"


# ---------------------------------------------------------------------------------------------------------------
# Reading the weights


@dataclass(frozen=True)
class StoredModel:
    """What the checkpoint's tensor metadata says about the model it holds."""

    dtype: torch.dtype
    padded_vocab: int
    shapes: dict  # key -> global shape of every model tensor


def stored_model(src: CheckpointSource) -> StoredModel:
    """The model tensors' dtype, vocabulary rows and shapes; for a LoRA checkpoint, the adapter tensors' dtype (the
    run's parameter dtype) and shapes, and no vocabulary rows (0: the base is read from its HF folder)."""
    from megatron.core import dist_checkpointing

    from dasd_megatron.model.lora import ADAPTER_SUFFIX

    meta = dist_checkpointing.load_tensors_metadata(src.weights_dir)
    if src.lora is not None:
        adapters = {k: v for k, v in meta.items()
                    if k.split(".", 1)[0] in MODEL_PREFIXES and f"{ADAPTER_SUFFIX}." in k}
        if not adapters:
            raise ConversionError(f"{src.describe()}: its metadata says LoRA (model.lora.rank="
                                  f"{src.lora.config.get('rank')}) but it holds no adapter tensors "
                                  f"(*{ADAPTER_SUFFIX}.*). Fix: check that the checkpoint folder is complete and was "
                                  "written by a LoRA run")
        first = next(iter(adapters.values()))
        dtype = first.dtype if first.dtype in DTYPE_NAMES else torch.float32
        return StoredModel(dtype, 0, {k: tuple(v.global_shape) for k, v in adapters.items()})
    emb = meta.get(EMBEDDING_KEY)
    if emb is None:
        if any(f"{ADAPTER_SUFFIX}." in k for k in meta):
            raise ConversionError(f"{src.describe()} holds LoRA adapter tensors only, but no LoRA metadata "
                                  "(dasd_meta.json: model.lora, model.base) to rebuild it from. Fix: pass the "
                                  "training checkpoint folder (step_N) of the LoRA run")
        raise ConversionError(f"{src.describe()}: no {EMBEDDING_KEY} among its tensors, so it holds no GPT model "
                              "this project wrote. Fix: pass a checkpoint written by training or by "
                              "`convert_hf.py import`")
    shapes = {k: tuple(v.global_shape) for k, v in meta.items()}
    dtype = emb.dtype if emb.dtype in DTYPE_NAMES else torch.float32
    return StoredModel(dtype, int(emb.global_shape[0]), shapes)


def vocab_divisor_for(stored: StoredModel, arch, tp: int, where: str) -> int:
    """`make_vocab_size_divisible_by` that makes a model at TP=`tp` hold exactly the stored (padded) rows."""
    if stored.padded_vocab < arch.vocab_size:
        raise ConversionError(f"{where} has {stored.padded_vocab} vocabulary rows but the HF config says "
                              f"vocab_size={arch.vocab_size}: the config is not the trained model's. Fix: pass "
                              "--hf-config with the model the checkpoint was trained from")
    if stored.padded_vocab % tp:
        raise ConversionError(f"{where} has {stored.padded_vocab} (padded) vocabulary rows, which TP={tp} cannot "
                              "split evenly. Fix: export with --tp 1 (or a divisor of the row count)")
    return stored.padded_vocab // tp


def check_model_matches(model, stored: StoredModel, where: str, hf_dir: str) -> None:
    """Name the first tensors that the checkpoint lacks or holds in another shape than the model built from
    `hf_dir` (before megatron's loader fails with a less helpful message)."""
    from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory

    from dasd_megatron.train.checkpoint import inner_module

    problems, missing, keys = [], 0, set()
    for t in _leaves(inner_module(model).sharded_state_dict()):
        if isinstance(t, ShardedTensorFactory):  # e.g. the fused SwiGLU fc1: stored under its own key
            keys.add(t.key)
        if not isinstance(t, ShardedTensor):
            continue
        keys.add(t.key)
        have = stored.shapes.get(t.key)
        if have is None:
            missing += 1
            if missing <= 2:
                problems.append(f"{t.key} is missing")
        elif have != tuple(t.global_shape):
            problems.append(f"{t.key} is {list(have)} in the checkpoint but {list(t.global_shape)} in the model")
    if dist.is_initialized() and dist.get_world_size() > 1:  # each pipeline stage knows only its own tensors
        every = [None] * dist.get_world_size()
        dist.all_gather_object(every, keys)
        keys = set().union(*every)
    # model tensors the checkpoint holds and the model has no place for (e.g. QK-norm weights of a Qwen3
    # checkpoint read into a Llama): loading would drop them silently (training checkpoints also hold optimizer
    # state, under other top-level names)
    extra = sorted(k for k in stored.shapes if k.split(".", 1)[0] in MODEL_PREFIXES and k not in keys)
    if extra:
        problems.append(f"{len(extra)} checkpoint tensors have no place in the model (e.g. {extra[0]})")
    if problems:
        more = f" ({missing} tensors missing in all)" if missing > 2 else ""
        raise ConversionError(f"{where} does not hold the model that {hf_dir}/config.json describes: "
                              f"{'; '.join(problems[:3])}{more}. Fix: pass --hf-config with the HF folder of the "
                              "model that was trained (a run's is in its config.json, model.hf_config)")


def check_adapters_match(model, stored: StoredModel, where: str) -> None:
    """Name the first adapter tensors that the LoRA checkpoint lacks, holds in another shape (another rank or
    target), or holds for linears the recorded config does not adapt."""
    from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory

    from dasd_megatron.model.lora import adapter_sharded_state_dict

    problems, keys = [], set()
    for t in _leaves(adapter_sharded_state_dict(model)):
        if isinstance(t, ShardedTensorFactory):  # the gated fc1's B: stored under its own key
            keys.add(t.key)
            if t.key not in stored.shapes:
                problems.append(f"{t.key} is missing")
        if not isinstance(t, ShardedTensor):
            continue
        keys.add(t.key)
        have = stored.shapes.get(t.key)
        if have is None:
            problems.append(f"{t.key} is missing")
        elif have != tuple(t.global_shape):
            problems.append(f"{t.key} is {list(have)} in the checkpoint but {list(t.global_shape)} in the model")
    if dist.is_initialized() and dist.get_world_size() > 1:
        every = [None] * dist.get_world_size()
        dist.all_gather_object(every, keys)
        keys = set().union(*every)
    extra = sorted(set(stored.shapes) - keys)
    if extra:
        problems.append(f"{len(extra)} adapter tensors have no place in the model (e.g. {extra[0]})")
    if problems:
        raise ConversionError(f"{where} does not hold the adapter its recorded LoRA config describes: "
                              f"{'; '.join(problems[:3])}. Fix: check dasd_meta.json's model.lora (rank, targets) "
                              "against the run's config.json")


def _leaves(tree):
    if isinstance(tree, dict):
        for v in tree.values():
            yield from _leaves(v)
    elif isinstance(tree, (list, tuple)):
        for v in tree:
            yield from _leaves(v)
    else:
        yield tree


def load_weights(model, src: CheckpointSource) -> None:
    """Load the model weights of `src` (for a training checkpoint, its model sub-dict only: the optimizer state,
    RNG and loop state stay on disk) into this rank's model chunk, resharding on read."""
    from megatron.core import dist_checkpointing

    from dasd_megatron.train.checkpoint import inner_module

    inner = inner_module(model)
    sharded = inner.sharded_state_dict()
    with warnings.catch_warnings():  # torch's deprecation notices about the APIs megatron's reader uses
        warnings.filterwarnings("ignore", category=FutureWarning, module=r"(torch\.distributed|megatron)\.")
        if src.model_key is None:
            state = dist_checkpointing.load(sharded, src.weights_dir)
        else:
            state = dist_checkpointing.load({src.model_key: sharded}, src.weights_dir)[src.model_key]
    inner.load_state_dict(state)


def _architecture(src: CheckpointSource):
    from dasd_megatron.model.hf_config import load_hf_architecture

    try:
        return load_hf_architecture(src.hf_dir)
    except ConfigError as e:
        raise ConversionError(str(e)) from None


@dataclass(frozen=True)
class LoadPlan:
    """How a checkpoint is rebuilt at a (tp, pp) layout: its architecture, what its tensors say, the model config."""

    arch: object
    stored: StoredModel
    cfg: object  # RunConfig of the model to build


def plan_load(src: CheckpointSource, tp: int = 1, pp: int = 1) -> LoadPlan:
    """Read the checkpoint's HF config and tensor metadata once (no process group needed). A LoRA checkpoint's
    model is built in its adapters' dtype (the run's parameter dtype) with the default vocabulary padding (the base
    is read from HF, and the padding rows are not exported)."""
    arch = _architecture(src)
    stored = stored_model(src)
    divisor = 128 if src.lora is not None else vocab_divisor_for(stored, arch, tp, src.describe())
    cfg = conversion_config(src.hf_dir, stored.dtype, tp, pp, divisor)
    return LoadPlan(arch, stored, cfg)


#: the architecture fields that decide tensor names and shapes (a base and the checkpoint's config must agree)
_SHAPE_FIELDS = ("model_type", "hidden_size", "ffn_hidden_size", "num_layers", "num_attention_heads",
                 "num_query_groups", "kv_channels", "vocab_size", "tie_word_embeddings", "qk_layernorm",
                 "add_qkv_bias")


def _load_lora(model, src: CheckpointSource, arch, stored: StoredModel, base_weights: bool) -> None:
    """A LoRA checkpoint into a freshly built model: base weights from the base HF folder (unless `base_weights` is
    False: an adapter-only export), adapters applied with the recorded config, adapter tensors loaded."""
    from megatron.core import dist_checkpointing

    from dasd_megatron.model.hf_import import load_hf_weights, open_hf_checkpoint
    from dasd_megatron.model.lora import adapter_sharded_state_dict, apply_lora, load_adapter_state

    if base_weights:
        ckpt = open_hf_checkpoint(src.lora.base_dir)
        differ = [f"{k}={getattr(ckpt.arch, k)} vs {getattr(arch, k)}" for k in _SHAPE_FIELDS
                  if getattr(ckpt.arch, k) != getattr(arch, k)]
        if differ:
            raise ConversionError(f"the base model {src.lora.base_dir} is not the model of {src.hf_dir}/config.json "
                                  f"({', '.join(differ[:3])}). Fix: pass --base with the base the run trained from")
        load_hf_weights(model, ckpt)
    try:
        lora_cfg = src.lora.lora_config()
    except (ConfigError, TypeError, ValueError) as e:
        raise ConversionError(f"{src.describe()}: its recorded LoRA config {src.lora.config} is not valid: {e}. "
                              "Fix: check dasd_meta.json's model.lora") from None
    apply_lora(model, lora_cfg, seed=0)  # A's initial values are replaced by the checkpoint's
    check_adapters_match(model, stored, src.describe())
    sharded = adapter_sharded_state_dict(model)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=FutureWarning, module=r"(torch\.distributed|megatron)\.")
        if src.model_key is None:
            state = dist_checkpointing.load(sharded, src.weights_dir)
        else:
            state = dist_checkpointing.load({src.model_key: sharded}, src.weights_dir)[src.model_key]
    load_adapter_state(model, state)


def load_checkpoint_model(src: CheckpointSource, tp: int = 1, pp: int = 1, plan: Optional[LoadPlan] = None, *,
                          base_weights: bool = True):
    """Build this rank's model chunk for the checkpoint `src` at (tp, pp), in the checkpoint's dtype and vocabulary
    padding, and load its weights. Call inside `parallel_session(tp, pp)` (or an initialised parallel state of that
    layout). `plan` is `plan_load(src, tp, pp)` when the caller has it already. Returns `(model, arch)`.

    A LoRA checkpoint gives the base model (read from `src.lora.base_dir`) with the trained adapters applied
    (`model/lora.py`): its forward is the trainer's, and the streaming exporter writes it merged. `base_weights=False`
    skips reading the base (the base parameters keep their initialisation): for an adapter-only export."""
    from dasd_megatron.model.builder import build_model

    plan = plan or plan_load(src, tp, pp)
    arch, stored, cfg = plan.arch, plan.stored, plan.cfg
    model = build_model(cfg, arch)
    if src.lora is not None:
        try:
            _load_lora(model, src, arch, stored, base_weights)
        except ConversionError:
            raise
        except BaseException as e:  # noqa: BLE001 - torch's CheckpointException derives from BaseException
            if isinstance(e, (KeyboardInterrupt, SystemExit)):
                raise
            raise ConversionError(f"cannot read {src.describe()} into a {arch.model_type} model built from "
                                  f"{src.hf_dir} with the base {src.lora.base_dir}: {one_line(e)}. Fix: check that "
                                  "the checkpoint folder is complete (a copy may have missed files) and "
                                  "readable") from None
        return model, arch
    check_model_matches(model, stored, src.describe(), src.hf_dir)
    try:
        load_weights(model, src)
    except BaseException as e:  # noqa: BLE001 - torch's CheckpointException derives from BaseException
        if isinstance(e, (KeyboardInterrupt, SystemExit)):
            raise
        raise ConversionError(f"cannot read {src.describe()} into a {arch.model_type} model built from "
                              f"{src.hf_dir}: {one_line(e)}. Fix: check that the checkpoint folder is complete "
                              "(a copy may have missed files) and readable") from None
    return model, arch


# ---------------------------------------------------------------------------------------------------------------
# import


def run_import(hf_dir: str, out_dir: str, *, dtype: str = "auto", tp: int = 1, pp: int = 1, overwrite: bool = False,
               vocab_divisor: int = 128) -> dict:
    """HF safetensors folder -> megatron dist checkpoint (+ `hf/` with config and tokenizer). Returns stats."""
    from dasd_megatron.model.hf_import import count_local_params, load_hf_weights, open_hf_checkpoint

    ckpt = open_hf_checkpoint(hf_dir)  # all validation that needs no weights, before anything is written
    arch = ckpt.arch
    target = dtype_arg(dtype, "import")
    if target is None:
        if ckpt.dtype not in DTYPES.values():
            raise ConversionError(f"{hf_dir} stores {ckpt.dtype}, which megatron parameters cannot use. "
                                  "Fix: pass --dtype float32 (or bfloat16)")
        target = ckpt.dtype
    cfg = conversion_config(hf_dir, target, tp, pp, vocab_divisor)
    cfg.validate_layout(world_size(), arch, te_available=False)
    check_output(out_dir, overwrite)

    from dasd_megatron.model.builder import build_model
    from dasd_megatron.train.checkpoint import save_model

    t0 = time.perf_counter()
    with parallel_session(tp, pp), staged_output(out_dir, overwrite) as tmp:
        model = build_model(cfg, arch)
        with _progress(count_local_params(model), "import: loading HF weights", "tensor") as bar:
            nbytes = load_hf_weights(model, ckpt, progress=bar)
        save_model(model, tmp)
        if _rank() == 0:
            copy_aux_files(hf_dir, os.path.join(tmp, HF_SUBDIR))
            meta = {"format": "dasd-megatron/convert_hf import", "source": os.path.abspath(hf_dir),
                    "dtype": DTYPE_NAMES[target], "model_type": arch.model_type,
                    "make_vocab_size_divisible_by": vocab_divisor, "import_layout": {"tensor": tp, "pipeline": pp}}
            with open(os.path.join(tmp, IMPORT_META), "w") as f:
                json.dump(meta, f, indent=2)
                f.write("\n")
        del model
    seconds = time.perf_counter() - t0
    return {"bytes": nbytes, "seconds": seconds, "out_dir": out_dir, "dtype": str(target)}


# ---------------------------------------------------------------------------------------------------------------
# export


def run_export(ckpt_dir: str, out_dir: Optional[str] = None, *, step: Optional[int] = None, teacher: bool = False,
               dtype: str = "auto", hf_config: Optional[str] = None, max_shard_size: str = "2GB",
               bucket_size: str = "512MiB", tp: int = 1, pp: int = 1, overwrite: bool = False,
               base: Optional[str] = None, adapter: bool = False) -> dict:
    """A checkpoint (see `resolve_checkpoint`) -> HF folder (sharded safetensors + index, config, tokenizer, and
    `dasd_export.json` naming the source). `out_dir=None` picks `default_export_dir`. Returns stats.

    A LoRA checkpoint is exported merged (its base from the recorded folder, or `base`), or with `adapter=True` as
    a PEFT adapter folder (`adapter_config.json`, `adapter_model.safetensors`, the tokenizer files), loadable by
    `peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), out_dir)`."""
    from dasd_megatron.model.export import SafetensorsShardWriter, is_sender, iter_hf_weight_buckets, parse_size
    from dasd_megatron.model.export import plan_export

    src = resolve_checkpoint(ckpt_dir, step=step, teacher=teacher, hf_config=hf_config, base=base, adapter=adapter)
    if adapter and src.lora is None:
        raise ConversionError(f"--adapter with {ckpt_dir}, which holds full weights, not a LoRA adapter. Fix: drop "
                              "--adapter (the export is a full HF folder)")
    load = plan_load(src, tp, pp)
    if out_dir is None:
        out_dir = default_export_dir(src, adapter)
        os.makedirs(os.path.dirname(out_dir), exist_ok=True)
    out_dtype = dtype_arg(dtype, "export")
    shard_bytes, bucket_bytes = parse_size(max_shard_size), parse_size(bucket_size)
    check_output(out_dir, overwrite)
    load.cfg.validate_layout(world_size(), load.arch, te_available=False)

    t0 = time.perf_counter()
    n_tensors = 0
    with parallel_session(tp, pp) as ctx, staged_output(out_dir, overwrite) as tmp:
        model, arch = load_checkpoint_model(src, tp, pp, load, base_weights=not adapter)
        t_load = time.perf_counter()
        nbytes = 0
        final = out_dtype or load.stored.dtype
        if adapter:
            nbytes, n_tensors = _write_adapter(model, arch, src, tmp, final)
        elif ctx.dp_rank == 0 and ctx.cp_rank == 0:  # one replica exports; the others hold the same weights
            plan = plan_export(model, arch, bucket_bytes=bucket_bytes, dtype=out_dtype)
            writer = SafetensorsShardWriter(tmp, plan.tensors(), shard_bytes) if is_sender() else None
            with _progress(plan.total_bytes, "export: writing safetensors", "B", unit_scale=True) as bar:
                for bucket in iter_hf_weight_buckets(model, arch, plan=plan):
                    for name, tensor in bucket:
                        writer.add(name, tensor)
                        bar.update(tensor.numel() * tensor.element_size())
            if writer is not None:
                writer.finish()
                nbytes = writer.total_size
        t_stream = time.perf_counter()
        if _rank() == 0:
            if adapter:
                _write_adapter_files(src, tmp, final)
            else:
                _write_hf_files(src, tmp, final)
        del model
    stats = {"bytes": nbytes, "seconds": time.perf_counter() - t0, "load_seconds": t_load - t0,
             "stream_seconds": t_stream - t_load, "out_dir": out_dir, "dtype": DTYPE_NAMES[final],
             "source": src.checkpoint_dir, "weights": src.weights, "step": src.step, "lora": None}
    if src.lora is not None:
        cfg = src.lora.config
        stats["lora"] = {"mode": "adapter" if adapter else "merged", "rank": cfg.get("rank"),
                         "alpha": cfg.get("alpha"), "base": src.lora.base_dir,
                         "base_present": src.lora.base_present, "tensors": n_tensors}
    return stats


def _write_adapter(model, arch, src: CheckpointSource, out: str, dtype: torch.dtype) -> tuple[int, int]:
    """The model's adapters as a PEFT folder's weights and config (rank 0 writes; every rank takes part in the
    gather). Returns (bytes, tensors) on rank 0."""
    from dasd_megatron.model.lora import peft_config, peft_state, write_peft_folder

    tensors = peft_state(model, arch, dtype=dtype)  # collective over the replica's TP and PP groups
    if _rank() != 0:
        return 0, 0
    config = peft_config(src.lora.lora_config(), base_model=src.lora.base_dir)
    write_peft_folder(out, tensors, config)
    os.chmod(os.path.join(out, "adapter_model.safetensors"), 0o644)  # safetensors creates files 0600
    return sum(t.numel() * t.element_size() for _, t in tensors), len(tensors)


def _export_record(src: CheckpointSource, name: str, mode: Optional[str]) -> dict:
    record = {"format": "dasd-megatron export", "source": src.checkpoint_dir, "kind": src.kind,
              "weights": src.weights, "step": src.step, "dtype": name}
    if src.lora is not None:
        record["lora"] = {"mode": mode, "config": src.lora.config, "base": src.lora.base_dir,
                          "recorded_base": src.lora.recorded_base, "base_fingerprint": src.lora.fingerprint}
    return record


def _write_json(path: str, obj: dict) -> None:
    with open(path, "w") as f:
        json.dump(obj, f, indent=2)
        f.write("\n")


def _write_hf_files(src: CheckpointSource, out: str, dtype: torch.dtype) -> None:
    """config.json (its dtype set to the exported one), tokenizer files, and the provenance record."""
    name = DTYPE_NAMES[dtype]
    with open(os.path.join(src.hf_dir, "config.json")) as f:
        hf_cfg = json.load(f)
    override = {key: name for key in ("dtype", "torch_dtype") if key in hf_cfg and hf_cfg[key] != name}
    if not any(k in hf_cfg for k in ("dtype", "torch_dtype")):
        override["torch_dtype"] = name
    copy_aux_files(src.hf_dir, out, override)
    _write_json(os.path.join(out, EXPORT_META), _export_record(src, name, "merged"))


#: files of a HF folder that make a folder look like a full model (to transformers and `dasd eval`): left out of a
#: PEFT adapter folder, which carries the tokenizer files only
_MODEL_FILES = ("config.json", "generation_config.json")


def _write_adapter_files(src: CheckpointSource, out: str, dtype: torch.dtype) -> None:
    """The tokenizer files (PEFT folders usually carry none; `AutoTokenizer.from_pretrained(out)` then works) and
    the provenance record, next to `adapter_config.json` and `adapter_model.safetensors`."""
    for name in copy_aux_files(src.hf_dir, out):
        if name in _MODEL_FILES:
            os.remove(os.path.join(out, name))
    _write_json(os.path.join(out, EXPORT_META), _export_record(src, DTYPE_NAMES[dtype], "adapter"))


def export_summary(stats: dict) -> str:
    """One line for the user after `run_export`: what was exported (full weights, a LoRA checkpoint merged into its
    base, or its PEFT adapter), where, how large and how fast."""
    what = (f"the {stats['weights']} of step {stats['step']} ({stats['source']})" if stats.get("step") is not None
            else stats["source"])
    lora = stats.get("lora")
    if lora and lora["mode"] == "adapter":
        note = "" if lora["base_present"] else "; not present here"
        return (f"exported the LoRA adapter (PEFT, rank {lora['rank']}, alpha {lora['alpha']}, {lora['tensors']} "
                f"tensors) of {what} -> {stats['out_dir']} ({stats['bytes'] / 1e6:.1f} MB, {stats['dtype']}; "
                f"base {lora['base']}{note}) in {stats['seconds']:.1f} s")
    if lora:
        what = (f"{what} merged with its LoRA adapter (rank {lora['rank']}, alpha {lora['alpha']}) into the base "
                f"{lora['base']}")
    mbps = stats["bytes"] / 1e6 / max(stats["stream_seconds"], 1e-9)
    return (f"exported {what} -> {stats['out_dir']} ({stats['bytes'] / 1e6:.1f} MB, {stats['dtype']}) in "
            f"{stats['seconds']:.1f} s (stream+write {mbps:.1f} MB/s)")
