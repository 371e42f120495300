"""`DataConfig` (what to load and how) and `PromptConfig` (how prompts are written): frozen, validated at construction.

The config lives at `data` in the run config, so errors name fields as `data.<field>` / `data.prompt.<field>`.
`source` may stay empty at construction (a run config has a default data section); `load_math_dataset` rejects an
empty source with the fix.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Optional

from dasd_megatron.errors import config_error

SCHEMAS = ("auto", "dapo", "gsm8k", "math", "minerva", "olympiadbench", "aime", "plain")
CONTEXT_KINDS = ("solution", "sibling", "answer_hint")


def _positive_or_none(name: str, value, fix: str) -> None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise config_error(name, value, "must be a positive integer or None", fix)


@dataclass(frozen=True)
class PromptConfig:
    """How the student and teacher prompts are written (see `dasd_megatron.data.prompts`)."""

    system_prompt: Optional[str] = None
    """A system message put before the user turn of both prompts (None: none, or the chat template's default)."""
    chat_template: Literal["auto", "plain"] = "auto"
    """'auto': the tokenizer's chat template when it has one, else the plain format; 'plain': always the plain
    format (`prompts.PLAIN_FORMAT`)."""
    instruction: Optional[str] = None
    """The request that ends both user messages (None: `prompts.INSTRUCTION`, "Think it through step by step, then
    write your final answer inside \\boxed{}.")."""
    enable_thinking: Optional[bool] = None
    """Passed to the chat template when not None (Qwen3 templates switch thinking mode with it)."""
    teacher_context: tuple[str, ...] = CONTEXT_KINDS
    """The privileged context kinds the teacher may see, in order of preference: 'solution' (the data set's
    reference solution), 'sibling' (a verified-correct rollout of the same problem, given by the caller),
    'answer_hint' (the gold answer). The first one available (and short enough) is used."""
    max_teacher_prompt_tokens: Optional[int] = None
    """A context kind whose teacher prompt would be longer than this is passed over for the next one (the answer
    hint is used even when longer, as the last resort). None: no limit."""

    def __post_init__(self) -> None:
        if self.chat_template not in ("auto", "plain"):
            raise config_error("data.prompt.chat_template", self.chat_template, "unknown mode", "use auto or plain")
        if self.enable_thinking not in (None, True, False):
            raise config_error("data.prompt.enable_thinking", self.enable_thinking, "must be true, false or null",
                               "use null unless the chat template reads enable_thinking")
        if self.instruction is not None and (not isinstance(self.instruction, str) or not self.instruction.strip()):
            raise config_error("data.prompt.instruction", self.instruction, "must be a non-empty string or null",
                               "write the request, e.g. 'Reply with just the number.', or null for the default")
        kinds = tuple(self.teacher_context)
        bad = [k for k in kinds if k not in CONTEXT_KINDS]
        if bad or len(set(kinds)) != len(kinds):
            raise config_error("data.prompt.teacher_context", kinds, f"each kind must be one of {CONTEXT_KINDS}, "
                               "each at most once", "e.g. data.prompt.teacher_context=solution,sibling,answer_hint")
        object.__setattr__(self, "teacher_context", kinds)
        _positive_or_none("data.prompt.max_teacher_prompt_tokens", self.max_teacher_prompt_tokens,
                          "set a token count such as 4096, or null for no limit")


@dataclass(frozen=True)
class DataConfig:
    """Which math data set to load, how to map its columns, and how to iterate over it."""

    source: str = ""
    """A `datasets` hub name (`BytedTsinghua-SIA/DAPO-Math-17k`, `openai/gsm8k`) or a local .jsonl/.json/.parquet/
    .csv file or a folder of them."""
    split: str = "train"
    """Hub split; for a local folder, the file whose name starts with it (gsm8k/test.jsonl); ignored for a file."""
    subset: Optional[str] = None
    """Hub configuration name (`openai/gsm8k` needs 'main')."""
    schema: Literal["auto", "dapo", "gsm8k", "math", "minerva", "olympiadbench", "aime", "plain"] = "auto"
    """Column layout (see `dasd_megatron.data.schemas`); 'auto' detects it from the column names."""
    problem_field: Optional[str] = None
    """Column holding the problem (dotted for nested fields); overrides the schema's default."""
    answer_field: Optional[str] = None
    """Column holding the gold answer (dotted, e.g. `reward_model.ground_truth`); overrides the schema's default."""
    solution_field: Optional[str] = None
    """Column holding a worked solution; overrides the schema's default."""
    name: Optional[str] = None
    """Label stored in `MathExample.source`; default: derived from `source` (folder or file name, or hub name)."""
    max_prompt_tokens: Optional[int] = None
    """Examples whose student prompt is longer than this are bad rows (needs a tokenizer at load time)."""
    on_bad_row: Literal["skip", "error"] = "skip"
    """What to do with a bad row: a line of a JSON Lines file that is not a JSON object, or a row without a usable
    problem or answer. 'skip' (default): leave it out, count it, log it (the first few with row index, file and line
    or field, and the reason) and go on; 'error': raise at the first one, naming the file and line (malformed JSON) or
    the row and field, and the fix. One policy for both kinds, so a typo in one line of a large file costs that line,
    as an empty answer does, not the run."""
    strip_instructions: bool = True
    """Remove known instruction wrappers around problems (DAPO's 'Solve the following math problem ...'), see
    `dasd_megatron.data.instructions`."""
    dedupe: bool = False
    """Drop rows whose (problem, answer) repeats an earlier row (the hub's DAPO-Math-17k repeats each row ~100x)."""
    shuffle: bool = True
    """The training iterator visits examples in a fresh seeded permutation each epoch."""
    seed: int = 1234
    limit: Optional[int] = None
    """Use only the first `limit` rows of the split (before any filtering)."""
    cache_dir: Optional[str] = None
    """`datasets` cache folder (None: its default, ~/.cache/huggingface/datasets)."""
    prompt: PromptConfig = field(default_factory=PromptConfig)

    def __post_init__(self) -> None:
        if not isinstance(self.source, str):
            raise config_error("data.source", self.source, "must be a string", "give a hub name or a local path")
        if self.schema not in SCHEMAS:
            raise config_error("data.schema", self.schema, "unknown schema", f"use one of {SCHEMAS}")
        if self.schema == "plain" and not (self.problem_field and self.answer_field):
            raise config_error(
                "data.schema", "plain", "the plain schema needs data.problem_field and data.answer_field",
                "set both column names, e.g. data.problem_field=question data.answer_field=target",
            )
        if self.on_bad_row not in ("skip", "error"):
            raise config_error("data.on_bad_row", self.on_bad_row, "unknown policy", "use skip or error")
        _positive_or_none("data.max_prompt_tokens", self.max_prompt_tokens,
                          "set a token count such as 1024, or null for no limit")
        _positive_or_none("data.limit", self.limit, "set a row count, or null for all rows")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise config_error("data.seed", self.seed, "must be an integer >= 0", "use e.g. 1234")
        if not self.split:
            raise config_error("data.split", self.split, "must not be empty", "use e.g. train or test")
        if not isinstance(self.prompt, PromptConfig):
            raise config_error("data.prompt", self.prompt, "must be a PromptConfig", "build it with PromptConfig(...)")
