"""`tools/router_tokens.py`: the answer-token split and the per-token omega, checked on a tiny random Llama with a
word-level tokenizer that spells numbers, against an independent float64 implementation of METHOD.md's router."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from dasd_megatron.data.config import PromptConfig
from dasd_megatron.data.example import MathExample
from dasd_megatron.loss.config import DASDLossConfig
from dasd_megatron.reward import RewardConfig, RewardScorer
from tools.router_tokens import analyse, answer_span, markdown

WORDS = ["What", "is", "+", "?", "=", "The", "answer", "Reply", "with", "just", "the", "number.", "Reference",
         "solution", ":", "so"] + [str(i) for i in range(20)]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerFast

    from dasd_megatron.model.hf_config import tiny_config

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{w: i + 3 for i, w in enumerate(WORDS)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(**tiny_config("llama", vocab_size=len(vocab))))
    return model.eval(), fast


def test_answer_span():
    assert answer_span("3 + 4 = 7", "7") == (8, 9)
    assert answer_span("17 so 7", "7") == (6, 7)  # the last occurrence
    assert answer_span("it is 1,234", "1234") == (6, 11)
    assert answer_span("no number", None) is None and answer_span("abc", "5") is None


def reference_omega(H: np.ndarray, delta: np.ndarray, cfg: DASDLossConfig) -> np.ndarray:
    """METHOD.md's router for one rollout, in float64 numpy (numpy's default quantile is the linear one)."""
    s = np.abs(delta).mean() + cfg.eps
    dbar = np.clip(delta / s, -cfg.c_max, cfg.c_max)
    tau = np.quantile(H, 1 - cfg.rho)
    sigma = np.abs(H - H.mean()).mean() + cfg.eps
    return np.tanh((tau - H) / sigma) / (1 + np.exp(-(np.abs(dbar) - 1)))


def test_analyse_routes_every_token_as_the_method_says(tiny):
    model, tok = tiny
    examples = [MathExample(i, f"What is {a} + {b} ?", str(a + b), f"{a} + {b} = {a + b}", "test")
                for i, (a, b) in enumerate([(2, 3), (4, 5), (1, 6)])]
    cfg = DASDLossConfig(temperature=0.7)
    with RewardScorer(RewardConfig(num_workers=1, last_number_fallback=True)) as scorer:
        res = analyse(model, tok, examples, PromptConfig(instruction="Reply with just the number."), cfg,
                      samples=4, temperature=0.7, max_new_tokens=6, seed=0, scorer=scorer)
    d = res["detail"]
    assert res["rollouts"] == 12 and res["tokens"] == d["omega"].numel()
    assert sum(g["tokens"] for g in res["groups"].values()) == res["tokens"]
    for r in range(res["rollouts"]):
        sel = (d["rollout"] == r).numpy()
        want = reference_omega(d["entropy"].numpy()[sel], d["delta"].numpy()[sel], cfg)
        np.testing.assert_allclose(d["omega"].numpy()[sel], want, rtol=1e-12, atol=1e-12)
    assert res["pushed"] == pytest.approx(float((d["omega"] < 0).double().mean()))
    answer = d["answer"].numpy()
    n_answer = sum(g["tokens"] for k, g in res["groups"].items() if k.startswith("answer/"))
    assert n_answer == answer.sum() > 0
    rollout = d["rollout"].numpy()
    for r, text in enumerate(d["texts"]):  # a response with a number has exactly its last number's token as answer
        has_number = any(w.isdigit() for w in text.split())
        assert answer[rollout == r].sum() == (1 if has_number else 0), text
    assert math.isnan(res["answer_is_top_entropy"]) or 0 <= res["answer_is_top_entropy"] <= 1
    assert "| tokens | n |" in markdown(res)


def test_greedy_accuracy_of_student_and_teacher_prompts(tiny):
    """Both prompts are decoded greedily and scored by the real reward: the fractions agree with decoding the same
    prompts here and checking the last number against the gold."""
    from dasd_megatron.data.prompts import build_prompt_pair
    from dasd_megatron.reward import last_number
    from tools.router_tokens import greedy_accuracy

    model, tok = tiny
    examples = [MathExample(0, "What is 2 + 3 ?", "5", "2 + 3 = 5", "test")]
    with RewardScorer(RewardConfig(num_workers=1, last_number_fallback=True)) as scorer:
        acc = greedy_accuracy(model, tok, examples, PromptConfig(), max_new_tokens=4, scorer=scorer)
    pair = build_prompt_pair(tok, examples[0], PromptConfig())
    for side, ids in (("student", pair.student_ids), ("teacher", pair.teacher_ids)):
        out = model.generate(torch.tensor([ids]), do_sample=False, max_new_tokens=4, pad_token_id=2)
        said = last_number(tok.decode(out[0, len(ids):], skip_special_tokens=True))
        assert acc[side] == float(said == "5"), side
