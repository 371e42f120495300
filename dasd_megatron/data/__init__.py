"""Math data for DASD training and evaluation: loading, schema mapping, prompts, and the resumable prompt iterator.

Typical use::

    cfg = DataConfig(source="BytedTsinghua-SIA/DAPO-Math-17k")      # or a local .jsonl / .parquet / folder
    data = load_math_dataset(cfg, tokenizer)                           # MathDataset of MathExample
    it = PromptIterator.from_config(data.examples, cfg)
    for ex in it.next_batch(64):
        pair = build_prompt_pair(tokenizer, ex, cfg.prompt, sibling=None)   # student/teacher ids, context kind
    ckpt["data"] = it.state_dict()                                      # ... it.load_state_dict(ckpt["data"])
"""

from dasd_megatron.data.config import CONTEXT_KINDS, SCHEMAS, DataConfig, PromptConfig
from dasd_megatron.data.dataset import MathDataset, load_math_dataset
from dasd_megatron.data.errors import BadLineError, BadRowError, DataError, DataLoadError
from dasd_megatron.data.example import BadRow, MathExample
from dasd_megatron.data.instructions import strip_instructions
from dasd_megatron.data.iterator import PromptIterator, epoch_permutation
from dasd_megatron.data.prompts import PromptPair, build_prompt_pair, build_prompt_pairs, student_prompt
from dasd_megatron.data.schemas import detect_schema
from dasd_megatron.data.tokenizer import load_tokenizer, qwen25_tokenizer

__all__ = [
    "CONTEXT_KINDS",
    "SCHEMAS",
    "BadLineError",
    "BadRow",
    "BadRowError",
    "DataConfig",
    "DataError",
    "DataLoadError",
    "MathDataset",
    "MathExample",
    "PromptConfig",
    "PromptIterator",
    "PromptPair",
    "build_prompt_pair",
    "build_prompt_pairs",
    "detect_schema",
    "epoch_permutation",
    "load_math_dataset",
    "load_tokenizer",
    "qwen25_tokenizer",
    "strip_instructions",
    "student_prompt",
]
