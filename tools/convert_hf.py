"""Convert checkpoints between Hugging Face (safetensors) and megatron-core distributed checkpoints.

    python tools/convert_hf.py import HF_DIR CKPT_DIR [--dtype auto|float32|bfloat16|float16]
    python tools/convert_hf.py export CKPT_DIR HF_OUT [--dtype ...] [--max-shard-size 2GB]
    torchrun --nproc_per_node 2 tools/convert_hf.py export CKPT_DIR HF_OUT --tp 2    # a larger layout

`import` validates the HF folder (config, weight files, names, shapes) before writing anything, fills a megatron
GPTModel through the declarative mapping (`dasd_megatron.model.hf_mapping`) and saves it with megatron's
dist-checkpointing, which reloads at any TP/PP layout. The HF config.json, tokenizer and other non-weight files are
kept in `CKPT_DIR/hf/`, so `export` can restore them (and `model.hf_config=CKPT_DIR/hf` builds the model).
`export` loads a checkpoint (from `import` or from training; `--hf-config` names the HF folder when the checkpoint
has no `hf/`) and streams it through `dasd_megatron.model.export.iter_hf_weights` into sharded safetensors with
`model.safetensors.index.json`, loadable by transformers.

Both write into a hidden sibling folder and rename it at the end; on failure it is removed. One process is enough
(a gloo group of one is created); under torchrun, `--tp/--pp` spread the model over the processes.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import shutil
import sys
import time
import uuid
import warnings

if __package__ in (None, ""):  # `python tools/convert_hf.py`: make the repository importable without installing
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from dasd_megatron.config import ConfigError  # noqa: E402
from dasd_megatron.model.hf_mapping import ConversionError  # noqa: E402

log = logging.getLogger("convert_hf")
HF_SUBDIR = "hf"
META_FILE = "dasd_convert.json"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_NON_AUX = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".msgpack", ".h5", ".ckpt", ".distcp")
_NON_AUX_NAMES = {"model.safetensors.index.json", "pytorch_model.bin.index.json", META_FILE}


# ---------------------------------------------------------------------------------------------------------------
# Helpers: output staging, parallel session, auxiliary files


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _barrier() -> None:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


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
            if os.path.exists(out_dir):  # only reachable with --overwrite
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


def copy_aux_files(src: str, dst: str, config_override: dict | None = None) -> list[str]:
    """Copy config, tokenizer and other non-weight files (not sub-folders); optionally rewrite config.json keys."""
    os.makedirs(dst, exist_ok=True)
    copied = []
    for name in sorted(os.listdir(src)):
        path = os.path.join(src, name)
        if not os.path.isfile(path) or name.endswith(_NON_AUX) or name in _NON_AUX_NAMES or name.startswith("."):
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


def _progress(total: int, desc: str, unit: str = "it", **kw):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit=unit, disable=_rank() != 0, mininterval=1.0, **kw)


def _run_config(hf_config_dir: str, dtype: torch.dtype, tp: int, pp: int, vocab_divisor: int):
    from dasd_megatron.config import ModelConfig, ParallelConfig, PrecisionConfig, RunConfig

    name = {v: k for k, v in DTYPES.items()}[dtype]
    return RunConfig(
        model=ModelConfig(hf_config=hf_config_dir, seq_length=1, attention_backend="sdpa",
                          make_vocab_size_divisible_by=vocab_divisor),
        parallel=ParallelConfig(tensor=tp, pipeline=pp),
        precision=PrecisionConfig(params_dtype=name),
    )


def _one_line(exc, limit: int = 200) -> str:
    """A short one-line description of `exc`; for torch's CheckpointException, of the first rank's failure."""
    failures = getattr(exc, "failures", None)
    if isinstance(failures, dict) and failures:
        exc = next(iter(failures.values()))
        exc = exc[0] if isinstance(exc, tuple) else exc  # (exception, traceback) per rank
    if isinstance(exc, KeyError) and exc.args:
        exc = exc.args[0]
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else int(os.environ.get("WORLD_SIZE", "1"))


def _dtype_arg(name: str, where: str) -> torch.dtype | None:
    if name == "auto":
        return None
    if name not in DTYPES:
        raise ConversionError(f"--dtype {name}: {where} supports {', '.join(['auto', *DTYPES])}. Fix: pick one")
    return DTYPES[name]


# ---------------------------------------------------------------------------------------------------------------
# import


def run_import(hf_dir: str, out_dir: str, *, dtype: str = "auto", tp: int = 1, pp: int = 1, overwrite: bool = False,
               vocab_divisor: int = 128) -> dict:
    """HF safetensors folder -> megatron dist checkpoint (+ `hf/` with config and tokenizer). Returns stats."""
    from dasd_megatron.model.hf_import import count_local_params, load_hf_weights, open_hf_checkpoint

    ckpt = open_hf_checkpoint(hf_dir)  # all validation that needs no weights, before anything is written
    arch = ckpt.arch
    target = _dtype_arg(dtype, "import")
    if target is None:
        if ckpt.dtype not in DTYPES.values():
            raise ConversionError(f"{hf_dir} stores {ckpt.dtype}, which megatron parameters cannot use. "
                                  "Fix: pass --dtype float32 (or bfloat16)")
        target = ckpt.dtype
    cfg = _run_config(hf_dir, target, tp, pp, vocab_divisor)
    cfg.validate_layout(_world_size(), arch, te_available=False)
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
                    "dtype": {v: k for k, v in DTYPES.items()}[target], "model_type": arch.model_type,
                    "make_vocab_size_divisible_by": vocab_divisor, "import_layout": {"tensor": tp, "pipeline": pp}}
            with open(os.path.join(tmp, META_FILE), "w") as f:
                json.dump(meta, f, indent=2)
                f.write("\n")
        del model
    seconds = time.perf_counter() - t0
    return {"bytes": nbytes, "seconds": seconds, "out_dir": out_dir, "dtype": str(target)}


# ---------------------------------------------------------------------------------------------------------------
# export


def _checkpoint_dtype(ckpt_dir: str) -> torch.dtype:
    meta_path = os.path.join(ckpt_dir, META_FILE)
    if os.path.isfile(meta_path):
        with open(meta_path) as f:
            return DTYPES[json.load(f)["dtype"]]
    from megatron.core import dist_checkpointing

    meta = dist_checkpointing.load_tensors_metadata(ckpt_dir)
    emb = meta.get("embedding.word_embeddings.weight")
    return emb.dtype if emb is not None and emb.dtype in DTYPES.values() else torch.float32


def run_export(ckpt_dir: str, out_dir: str, *, dtype: str = "auto", hf_config: str | None = None,
               max_shard_size: str = "2GB", bucket_size: str = "512MiB", tp: int = 1, pp: int = 1,
               overwrite: bool = False) -> dict:
    """Megatron dist checkpoint -> HF folder (sharded safetensors + index, config, tokenizer). Returns stats."""
    from dasd_megatron.model.export import SafetensorsShardWriter, is_sender, iter_hf_weight_buckets, parse_size
    from dasd_megatron.model.export import plan_export
    from dasd_megatron.model.hf_config import load_hf_architecture

    if not os.path.isfile(os.path.join(ckpt_dir, "metadata.json")):
        raise ConversionError(f"{ckpt_dir} is not a megatron distributed checkpoint (no metadata.json). Fix: pass a "
                              "folder written by `convert_hf.py import` or by training")
    hf_src = hf_config or os.path.join(ckpt_dir, HF_SUBDIR)
    if not os.path.isfile(os.path.join(hf_src, "config.json")):
        raise ConversionError(f"no HF config.json in {hf_src}. Fix: pass --hf-config with the model's HF folder "
                              "(config and tokenizer)")
    try:
        arch = load_hf_architecture(hf_src)
    except ConfigError as e:
        raise ConversionError(str(e)) from None
    out_dtype = _dtype_arg(dtype, "export")
    shard_bytes, bucket_bytes = parse_size(max_shard_size), parse_size(bucket_size)
    check_output(out_dir, overwrite)
    src_dtype = _checkpoint_dtype(ckpt_dir)
    cfg = _run_config(hf_src, src_dtype, tp, pp, 128)
    cfg.validate_layout(_world_size(), arch, te_available=False)

    from dasd_megatron.model.builder import build_model
    from dasd_megatron.train.checkpoint import load_model

    t0 = time.perf_counter()
    with parallel_session(tp, pp) as ctx, staged_output(out_dir, overwrite) as tmp:
        model = build_model(cfg, arch)
        try:
            load_model(model, ckpt_dir)
        except BaseException as e:  # noqa: BLE001 - torch's CheckpointException derives from BaseException
            if isinstance(e, (KeyboardInterrupt, SystemExit)):
                raise
            raise ConversionError(f"cannot load {ckpt_dir} into a {arch.model_type} model built from {hf_src}: "
                                  f"{_one_line(e)}. Fix: pass the checkpoint's own HF config (--hf-config)") from None
        t_load = time.perf_counter()
        nbytes = 0
        if ctx.dp_rank == 0 and ctx.cp_rank == 0:  # one replica exports; the others hold the same weights
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
            final = out_dtype or src_dtype
            cfg_dtype = {v: k for k, v in DTYPES.items()}[final]
            with open(os.path.join(hf_src, "config.json")) as f:
                hf_cfg = json.load(f)
            override = {}
            for key in ("dtype", "torch_dtype"):
                if key in hf_cfg and hf_cfg[key] != cfg_dtype:
                    override[key] = cfg_dtype
            if not any(k in hf_cfg for k in ("dtype", "torch_dtype")):
                override["torch_dtype"] = cfg_dtype
            copy_aux_files(hf_src, tmp, override)
        del model
    return {"bytes": nbytes, "seconds": time.perf_counter() - t0, "load_seconds": t_load - t0,
            "stream_seconds": t_stream - t_load, "out_dir": out_dir}


# ---------------------------------------------------------------------------------------------------------------
# Command line


def build_parser() -> argparse.ArgumentParser:
    fmt = argparse.RawDescriptionHelpFormatter
    p = argparse.ArgumentParser(prog="convert_hf.py", description=__doc__, formatter_class=fmt)
    sub = p.add_subparsers(dest="command", required=True, metavar="{import,export}")

    def layout(sp):
        sp.add_argument("--tp", type=int, default=1, help="tensor-parallel size (under torchrun; default 1)")
        sp.add_argument("--pp", type=int, default=1, help="pipeline-parallel size (under torchrun; default 1)")
        sp.add_argument("--overwrite", action="store_true", help="replace OUT_DIR if it exists (at the very end)")

    imp = sub.add_parser("import", formatter_class=fmt, help="HF safetensors folder -> megatron dist checkpoint",
                         description="Hugging Face folder (config.json + safetensors) -> megatron distributed "
                                     "checkpoint, loadable at any TP/PP. config.json and tokenizer files are kept "
                                     "in OUT_DIR/hf/.")
    imp.add_argument("hf_dir", metavar="HF_DIR")
    imp.add_argument("out_dir", metavar="OUT_DIR")
    imp.add_argument("--dtype", default="auto", choices=["auto", *DTYPES], help="parameter dtype: auto (the safetensors dtype), float32, "
                                                     "bfloat16, float16")
    imp.add_argument("--make-vocab-size-divisible-by", type=int, default=128, dest="vocab_divisor",
                     help="vocabulary padding multiple (megatron convention; default 128)")
    layout(imp)

    exp = sub.add_parser("export", formatter_class=fmt, help="megatron dist checkpoint -> HF safetensors folder",
                         description="Megatron distributed checkpoint -> Hugging Face folder: sharded safetensors "
                                     "with model.safetensors.index.json, config.json and tokenizer files, loadable "
                                     "by transformers' from_pretrained.")
    exp.add_argument("ckpt_dir", metavar="CKPT_DIR")
    exp.add_argument("out_dir", metavar="OUT_DIR")
    exp.add_argument("--dtype", default="auto", choices=["auto", *DTYPES], help="output dtype: auto (the checkpoint's), float32, bfloat16, "
                                                     "float16")
    exp.add_argument("--hf-config", default=None, help="HF folder with config.json/tokenizer (default CKPT_DIR/hf)")
    exp.add_argument("--max-shard-size", default="2GB", help="largest safetensors file (default 2GB)")
    exp.add_argument("--bucket-size", default="512MiB", help="bytes gathered per step (default 512MiB)")
    layout(exp)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    for noisy in ("megatron", "dasd_megatron"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message=".*(Apex|Transformer Engine).*")
    try:
        if args.command == "import":
            stats = run_import(args.hf_dir, args.out_dir, dtype=args.dtype, tp=args.tp, pp=args.pp,
                               overwrite=args.overwrite, vocab_divisor=args.vocab_divisor)
            if _rank() == 0:
                log.info("imported %s -> %s (%.1f MB, %s) in %.1f s", args.hf_dir, args.out_dir, stats["bytes"] / 1e6,
                         stats["dtype"], stats["seconds"])
        else:
            stats = run_export(args.ckpt_dir, args.out_dir, dtype=args.dtype, hf_config=args.hf_config,
                               max_shard_size=args.max_shard_size, bucket_size=args.bucket_size, tp=args.tp,
                               pp=args.pp, overwrite=args.overwrite)
            if _rank() == 0:
                mbps = stats["bytes"] / 1e6 / max(stats["stream_seconds"], 1e-9)
                log.info("exported %s -> %s (%.1f MB) in %.1f s (stream+write %.1f MB/s)", args.ckpt_dir,
                         args.out_dir, stats["bytes"] / 1e6, stats["seconds"], mbps)
    except (ConversionError, ConfigError) as e:
        print(f"convert_hf.py {args.command}: error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
