"""Student and teacher prompts, as text and token ids.

The student sees the bare problem and an instruction; the teacher (the same network, see METHOD.md) additionally
sees privileged context. Both user messages end with the *same* instruction and go through the same chat template
with `add_generation_prompt=True`, so both prompts end with the same assistant-turn opener and the identical response
token ids `y` are appended to each: student `[student_ids ; y]`, teacher `[teacher_ids ; y]`. Prompts and responses
are concatenated as ids, never re-tokenised as text, so no BPE merge can cross the boundary.

User messages (our wording)::

    student:  {problem}\\n\\n{INSTRUCTION}
    teacher:  {problem}\\n\\n{context block}\\n\\n{INSTRUCTION}

`INSTRUCTION` is ours unless `data.prompt.instruction` replaces it (a small model may need a plainer request).

Context kinds, tried in the order of `data.prompt.teacher_context` (default solution, sibling, answer_hint):

- `solution`: the data set's reference solution (MATH, Minerva, OlympiadBench, AIME24, GSM8K);
- `sibling`: a verified-correct rollout of the same problem, passed in by the caller;
- `answer_hint`: the gold answer ("the correct final answer is ...") - always available.

A kind is passed over when missing or empty, or when its teacher prompt exceeds `max_teacher_prompt_tokens`
(except `answer_hint`, which is never passed over). When no kind is left, the kind is `none` and the teacher prompt is
the student prompt: the teacher then equals the student and the distillation signal of that rollout is exactly zero.

Templates: the tokenizer's chat template (`apply_chat_template(messages, add_generation_prompt=True,
tokenize=False)`, with `enable_thinking` when configured), encoded without adding special tokens (the template
writes them). Without a chat template (or with `chat_template=plain`) the documented `PLAIN_FORMAT` is used, encoded
with the tokenizer's own special tokens (e.g. a BOS) except a trailing EOS, which would end the prompt.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Sequence

from dasd_megatron.data.config import PromptConfig
from dasd_megatron.data.example import MathExample

INSTRUCTION = "Think it through step by step, then write your final answer inside \\boxed{}."

SOLUTION_BLOCK = (
    "For your reference only, here is a worked solution written by an expert. Read it to understand the problem, "
    "then write your own solution without mentioning it.\n\n<reference_solution>\n{context}\n</reference_solution>"
)
SIBLING_BLOCK = (
    "For your reference only, here is an earlier attempt at this problem that was checked and reaches the correct "
    "final answer. Use it to guide your own solution, without mentioning it.\n\n<checked_attempt>\n{context}\n"
    "</checked_attempt>"
)
HINT_BLOCK = (
    "For your reference only: the correct final answer is {context}. Do not simply state it; reason your way to it "
    "and do not mention that it was given to you."
)
PLAIN_FORMAT = "{system}User:\n{user}\n\nAssistant:\n"
"""Used without a chat template. `{system}` is the system prompt followed by a blank line, or empty."""

_BLOCKS = {"solution": SOLUTION_BLOCK, "sibling": SIBLING_BLOCK, "answer_hint": HINT_BLOCK}


@dataclass(frozen=True)
class PromptPair:
    """The student and teacher prompts of one example, and which privileged context the teacher got."""

    student_ids: list[int]
    teacher_ids: list[int]
    context_kind: str
    """'solution', 'sibling', 'answer_hint', or 'none' (teacher prompt == student prompt)."""
    student_text: str
    teacher_text: str


def format_answer_hint(answer: Any) -> str:
    """The gold as the hint states it: one answer as is; several acceptable ones joined with ' or '."""
    answers = answer if isinstance(answer, (list, tuple)) else (answer,)
    return " or ".join(f"${a}$" if "$" not in a else a for a in map(str, answers))


def student_message(problem: str, instruction: Optional[str] = None) -> str:
    return f"{problem.strip()}\n\n{instruction or INSTRUCTION}"


def teacher_message(problem: str, kind: str, context: str, instruction: Optional[str] = None) -> str:
    block = _BLOCKS[kind].format(context=context.strip())
    return f"{problem.strip()}\n\n{block}\n\n{instruction or INSTRUCTION}"


def uses_chat_template(tokenizer: Any, cfg: PromptConfig) -> bool:
    return cfg.chat_template == "auto" and bool(getattr(tokenizer, "chat_template", None))


def render(tokenizer: Any, user_message: str, cfg: PromptConfig) -> str:
    """The full prompt text of one user turn, ending where the assistant's response starts."""
    if uses_chat_template(tokenizer, cfg):
        messages = ([{"role": "system", "content": cfg.system_prompt}] if cfg.system_prompt else [])
        messages.append({"role": "user", "content": user_message})
        kwargs = {} if cfg.enable_thinking is None else {"enable_thinking": cfg.enable_thinking}
        return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False, **kwargs)
    system = f"{cfg.system_prompt}\n\n" if cfg.system_prompt else ""
    return PLAIN_FORMAT.format(system=system, user=user_message)


def encode(tokenizer: Any, text: str, cfg: PromptConfig) -> list[int]:
    """Token ids of a rendered prompt (see module docstring for the special-token rule)."""
    if uses_chat_template(tokenizer, cfg):
        return list(tokenizer(text, add_special_tokens=False)["input_ids"])
    ids = list(tokenizer(text, add_special_tokens=True)["input_ids"])
    eos = getattr(tokenizer, "eos_token_id", None)
    if eos is not None and ids and ids[-1] == eos and not text.endswith(str(tokenizer.eos_token)):
        ids.pop()
    return ids


def encode_batch(tokenizer: Any, texts: Sequence[str], cfg: PromptConfig) -> list[list[int]]:
    """`encode` over many rendered prompts in one tokenizer call (much faster for a whole data set)."""
    if not texts:
        return []
    if uses_chat_template(tokenizer, cfg):
        return [list(ids) for ids in tokenizer(list(texts), add_special_tokens=False)["input_ids"]]
    return [encode(tokenizer, t, cfg) for t in texts]


def student_prompt_lengths(tokenizer: Any, examples: Sequence[MathExample], cfg: PromptConfig,
                           chunk: int = 4096) -> list[int]:
    """Token counts of the student prompts of `examples`."""
    out: list[int] = []
    for start in range(0, len(examples), chunk):
        texts = [render(tokenizer, student_message(ex.problem, cfg.instruction), cfg)
                 for ex in examples[start:start + chunk]]
        out.extend(len(ids) for ids in encode_batch(tokenizer, texts, cfg))
    return out


def student_prompt(tokenizer: Any, example: MathExample, cfg: PromptConfig) -> tuple[str, list[int]]:
    """`(text, ids)` of the student prompt."""
    text = render(tokenizer, student_message(example.problem, cfg.instruction), cfg)
    return text, encode(tokenizer, text, cfg)


def _context_of(kind: str, example: MathExample, sibling: Optional[str]) -> Optional[str]:
    if kind == "solution":
        return example.solution
    if kind == "sibling":
        return sibling
    return format_answer_hint(example.answer)


def build_prompt_pair(tokenizer: Any, example: MathExample, cfg: PromptConfig = PromptConfig(),
                      sibling: Optional[str] = None) -> PromptPair:
    """Student and teacher prompt ids for `example`; `sibling` is a verified-correct rollout's text, if any."""
    s_text, s_ids = student_prompt(tokenizer, example, cfg)
    for kind in cfg.teacher_context:
        context = _context_of(kind, example, sibling)
        if not context or not context.strip():
            continue
        t_text = render(tokenizer, teacher_message(example.problem, kind, context, cfg.instruction), cfg)
        t_ids = encode(tokenizer, t_text, cfg)
        limit = cfg.max_teacher_prompt_tokens
        if limit is not None and len(t_ids) > limit and kind != "answer_hint":
            continue
        return PromptPair(s_ids, t_ids, kind, s_text, t_text)
    return PromptPair(s_ids, list(s_ids), "none", s_text, s_text)


def build_prompt_pairs(tokenizer: Any, examples: Sequence[MathExample], cfg: PromptConfig = PromptConfig(),
                       siblings: Optional[Sequence[Optional[str]]] = None) -> list[PromptPair]:
    """`build_prompt_pair` over a batch; `siblings[i]` (or None) belongs to `examples[i]`."""
    if siblings is not None and len(siblings) != len(examples):
        raise ValueError(f"got {len(siblings)} siblings for {len(examples)} examples. Fix: pass one entry (or None) "
                         "per example")
    sib = siblings if siblings is not None else [None] * len(examples)
    return [build_prompt_pair(tokenizer, ex, cfg, s) for ex, s in zip(examples, sib)]
