"""Convert checkpoints between Hugging Face (safetensors) and megatron-core distributed checkpoints.

    python tools/convert_hf.py import HF_DIR CKPT_DIR [--dtype auto|float32|bfloat16|float16]
    python tools/convert_hf.py export CKPT_OR_RUN_DIR HF_OUT [--step N] [--teacher] [--dtype ...]
    torchrun --nproc_per_node 2 tools/convert_hf.py export CKPT_DIR HF_OUT --tp 2    # a larger layout

`import` validates the HF folder (config, weight files, names, shapes) before writing anything, fills a megatron
GPTModel through the declarative mapping (`dasd_megatron.model.hf_mapping`) and saves it with megatron's
dist-checkpointing, which reloads at any TP/PP layout. The HF config.json, tokenizer and other non-weight files are
kept in `CKPT_DIR/hf/`, so `export` can restore them (and `model.hf_config=CKPT_DIR/hf` builds the model).
`export` reads any checkpoint this project writes: one from `import`, a training checkpoint (`RUN/checkpoints/
step_N`, at whatever layout and dtype it was saved; the model alone is read, `--teacher` reads its EMA/frozen
teacher) or a run folder (its newest checkpoint, or `--step N`). A LoRA run's checkpoint (adapters only) is merged
into its recorded base model (`--base PATH` for a moved copy; its fingerprint is checked), or written as a PEFT
adapter folder with `--adapter`. The HF config and tokenizer come from the
checkpoint (`--hf-config` overrides). It streams the weights through `dasd_megatron.model.export` into sharded
safetensors with `model.safetensors.index.json`, loadable by transformers. `dasd export RUN_DIR` does the same with
a default output folder.

Both write into a hidden sibling folder and rename it at the end; on failure it is removed. One process is enough
(a gloo group of one is created); under torchrun, `--tp/--pp` spread the model over the processes. The work is done
by `dasd_megatron.model.convert`.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import warnings

if __package__ in (None, ""):  # `python tools/convert_hf.py`: make the repository importable without installing
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from dasd_megatron.config import ConfigError  # noqa: E402
from dasd_megatron.model.convert import DTYPES, export_summary, run_export, run_import  # noqa: E402
from dasd_megatron.model.hf_mapping import ConversionError  # noqa: E402

log = logging.getLogger("convert_hf")


def _rank() -> int:
    import torch.distributed as dist

    return dist.get_rank() if dist.is_initialized() else 0


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
                         description="A checkpoint (imported, written by training, or a run folder's newest) -> "
                                     "Hugging Face folder: sharded safetensors with model.safetensors.index.json, "
                                     "config.json and tokenizer files, loadable by transformers' from_pretrained.")
    exp.add_argument("ckpt_dir", metavar="CKPT_DIR", help="a checkpoint folder, or a run folder (its newest checkpoint)")
    exp.add_argument("out_dir", metavar="OUT_DIR")
    exp.add_argument("--dtype", default="auto", choices=["auto", *DTYPES], help="output dtype: auto (the checkpoint's), float32, bfloat16, "
                                                     "float16")
    exp.add_argument("--step", type=int, default=None, help="with a run folder: the step to export (default newest)")
    exp.add_argument("--teacher", action="store_true",
                     help="export the training checkpoint's teacher (train.teacher=ema|frozen) instead of the policy")
    exp.add_argument("--hf-config", default=None,
                     help="HF folder with config.json/tokenizer (default: the checkpoint's hf/, or its run's model)")
    exp.add_argument("--adapter", action="store_true",
                     help="LoRA training checkpoints: write the adapter alone as a PEFT folder instead of the merged "
                          "model (reads no base weights)")
    exp.add_argument("--base", default=None, metavar="PATH",
                     help="LoRA training checkpoints: the base HF folder, when moved (default: the recorded one; its "
                          "fingerprint must match)")
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
            stats = run_export(args.ckpt_dir, args.out_dir, step=args.step, teacher=args.teacher, dtype=args.dtype,
                               hf_config=args.hf_config, max_shard_size=args.max_shard_size,
                               bucket_size=args.bucket_size, tp=args.tp, pp=args.pp, overwrite=args.overwrite,
                               base=args.base, adapter=args.adapter)
            if _rank() == 0:
                log.info("%s", export_summary(stats))
    except (ConversionError, ConfigError) as e:
        print(f"convert_hf.py {args.command}: error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
