"""Test helpers for the evaluation: a byte-level tokenizer that round-trips any text, and a scripted generator.

- `byte_tokenizer()`: a real `transformers` fast tokenizer whose vocabulary is the 256 bytes (byte-level BPE with no
  merges) plus the ChatML tokens `<|endoftext|>` 256, `<|im_start|>` 257, `<|im_end|>` 258 (the EOS), with a ChatML
  chat template. Any text encodes and decodes back exactly, so scripted responses can say `\\boxed{...}`, and it
  fits the vocabulary of the tiny random test models (509). `save_byte_tokenizer(dir)` writes it next to a model.
- `ScriptedGenerator(respond)`: a `Generator` that answers `respond(request, sample_index) -> str` (encoded with the
  tokenizer, log-prob -0.5 per token, finish 'stop'), and counts what it was asked; `fail_after` makes it raise
  like a dead server once that many problems were served.
"""

from __future__ import annotations

import threading
from typing import Any, Callable, Optional

from dasd_megatron.eval.generation import Completion, GenerationRequest

CHATML_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
BYTE_EOS_ID = 258


def byte_tokenizer() -> Any:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from tokenizers.pre_tokenizers import ByteLevel
    from transformers import PreTrainedTokenizerFast

    alphabet = ByteLevel.alphabet()  # the 256 printable stand-ins of the bytes
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet, key=lambda c: ord(c)))}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(["<|endoftext|>", "<|im_start|>", "<|im_end|>"])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    fast.chat_template = CHATML_TEMPLATE
    assert fast.convert_tokens_to_ids("<|im_end|>") == BYTE_EOS_ID, fast.convert_tokens_to_ids("<|im_end|>")
    return fast


def save_byte_tokenizer(out_dir: str) -> str:
    byte_tokenizer().save_pretrained(out_dir)
    return out_dir


class ScriptedGenerator:
    """A `Generator` answering scripted text (see module docstring). Thread-safe."""

    def __init__(self, tokenizer: Any, respond: Callable[[GenerationRequest, int], str], *,
                 fail_after: Optional[int] = None, logprob: float = -0.5):
        self.tokenizer, self.respond, self.fail_after, self.logprob = tokenizer, respond, fail_after, logprob
        self.requests: list[GenerationRequest] = []
        self._lock = threading.Lock()

    def generate(self, request: GenerationRequest) -> list[Completion]:
        with self._lock:
            if self.fail_after is not None and len(self.requests) >= self.fail_after:
                raise ConnectionError("scripted server died")
            self.requests.append(request)
        out = []
        for j in range(request.n):
            ids = tuple(self.tokenizer(self.respond(request, j), add_special_tokens=False)["input_ids"])
            out.append(Completion(ids, tuple(self.logprob for _ in ids), "stop", "scripted"))
        return out
