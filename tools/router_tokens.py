"""Which tokens does DASD's router pull and which does it push? Per-token omega on sampled responses, by token role.

    python tools/router_tokens.py [--recipe smollm2_135m_dasd_cpu] [--model HF_DIR] [--data FILE] [--problems 64]
                                  [--samples 4] [--seed 0] [--greedy] [--out router_tokens.json]
                                  [key=value ...]

It samples `--samples` responses per problem from a Hugging Face model (default: the recipe's base model) at the
recipe's rollout temperature, scores them with the project's reward (`RewardScorer`), and computes what the DASD loss
would see at the first update (`dasd_megatron.loss`: `compute_rollout_stats`, `normalized_gap`, `router_omega`, with
the recipe's loss config): per token the student entropy H_t, the teacher-student gap delta_t (teacher = the same
model fed the recipe's privileged prompt) and omega_t. Tokens are split by role: `answer` (the tokens that spell the
extracted final answer, e.g. the last number with `reward.last_number_fallback`) and `other`, each for correct and
wrong responses. Printed: a Markdown table (tokens, mean entropy, fraction pushed (omega < 0), mean omega, mean
delta, mean teacher probability of the token; all at the rollout temperature, as the loss sees them) and how often
an answer token is its response's highest-entropy token. All statistics are float64, one process, no megatron (an
analysis, not the training path).

Why: on short-answer tasks the answer's digits are the uncertain tokens, and there the privileged teacher knows the
answer. If the router pushes them (omega < 0), the teacher term drives probability away from the right answer.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from typing import Any, Optional

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

ROLES = ("answer", "other")


def answer_span(text: str, extracted: Optional[str]) -> Optional[tuple[int, int]]:
    """The character span of the extracted answer's last occurrence in `text` (None when absent)."""
    if not extracted:
        return None
    for cand in (extracted, f"{int(extracted):,}" if extracted.lstrip("-").isdigit() else None):
        if cand and (i := text.rfind(cand)) >= 0:
            return i, i + len(cand)
    return None


def token_spans(tokenizer: Any, ids: list[int]) -> list[tuple[int, int]]:
    """Character span of each token in the decoded text of `ids` (by decoding growing prefixes)."""
    spans, prev = [], 0
    for i in range(len(ids)):
        end = len(tokenizer.decode(ids[: i + 1], skip_special_tokens=True))
        spans.append((prev, max(end, prev)))
        prev = max(end, prev)
    return spans


def response_stats(model, prompt_ids: list[int], resp_ids: list[int], temperature: float):
    """(log-prob of each response token, full-vocabulary entropy) at `temperature`, float64."""
    ids = torch.tensor([prompt_ids + resp_ids])
    with torch.no_grad():
        logits = model(ids).logits[0, len(prompt_ids) - 1: -1].double() / temperature
    logprobs = torch.log_softmax(logits, dim=-1)
    tok = torch.tensor(resp_ids)
    logp = logprobs.gather(1, tok[:, None])[:, 0]
    entropy = -(logprobs.exp() * logprobs).sum(-1)
    return logp, entropy


def analyse(model, tokenizer, examples, prompt_cfg, loss_cfg, *, samples: int, temperature: float,
            max_new_tokens: int, seed: int, scorer) -> dict:
    """Sample, score and route (see the module docstring). Returns the summary (`markdown` prints it) and, under
    `detail`, the per-token tensors (entropy, delta, omega, rollout id, is-answer) and the response texts."""
    from dasd_megatron.data.prompts import build_prompt_pair
    from dasd_megatron.loss.rollout_stats import compute_rollout_stats
    from dasd_megatron.loss.router import normalized_gap, router_omega

    torch.manual_seed(seed)
    rollouts = []  # (example, pair, response ids)
    eos = tokenizer.eos_token_id
    t0 = time.monotonic()
    for n, ex in enumerate(examples, 1):
        if n % 8 == 0 or n == len(examples):
            print(f"router_tokens: sampled {n}/{len(examples)} problems ({time.monotonic() - t0:.0f} s)",
                  file=sys.stderr, flush=True)
        pair = build_prompt_pair(tokenizer, ex, prompt_cfg)
        with torch.no_grad():
            out = model.generate(torch.tensor([pair.student_ids]), do_sample=True, temperature=temperature,
                                 top_p=1.0, top_k=0, max_new_tokens=max_new_tokens, num_return_sequences=samples,
                                 pad_token_id=eos if eos is not None else 0)
        for row in out[:, len(pair.student_ids):].tolist():
            if eos in row:
                row = row[: row.index(eos) + 1]
            rollouts.append((ex, pair, row))
    texts = [tokenizer.decode(r, skip_special_tokens=True) for _, _, r in rollouts]
    results = scorer.score(texts, [ex.answer for ex, _, _ in rollouts])
    print(f"router_tokens: scored {len(texts)} responses ({time.monotonic() - t0:.0f} s)", file=sys.stderr, flush=True)

    H, delta, p_teacher, index = [], [], [], []
    for i, (_, pair, resp) in enumerate(rollouts):
        logp, ent = response_stats(model, pair.student_ids, resp, temperature)
        t_logp, _ = response_stats(model, pair.teacher_ids, resp, temperature)
        H.append(ent), delta.append(t_logp - logp), p_teacher.append(t_logp.exp())
        index.append(torch.full((len(resp),), i, dtype=torch.long))
    H, delta, p_teacher, index = (torch.cat(x) for x in (H, delta, p_teacher, index))
    print(f"router_tokens: student and teacher forwards done ({time.monotonic() - t0:.0f} s)", file=sys.stderr,
          flush=True)
    stats = compute_rollout_stats(H, delta, index, len(rollouts), loss_cfg)
    dbar = normalized_gap(delta, stats.gap_scale[index], loss_cfg.c_max)
    omega = router_omega(H, dbar, stats.tau[index], stats.sigma_h[index], loss_cfg)

    groups: dict[str, list[int]] = {f"{role}/{verdict}": [] for role in ROLES for verdict in ("correct", "wrong")}
    top_is_answer, with_answer = 0, 0
    pos = 0
    for i, (_, _, resp) in enumerate(rollouts):
        span = answer_span(texts[i], results[i].extracted)
        verdict = "correct" if results[i].status == "correct" else "wrong"
        rows = list(range(pos, pos + len(resp)))
        answer_rows = [r for r, (a, b) in zip(rows, token_spans(tokenizer, resp))
                       if span is not None and a < span[1] and b > span[0]]
        for r in rows:
            groups[f"{'answer' if r in answer_rows else 'other'}/{verdict}"].append(r)
        if answer_rows:
            with_answer += 1
            top_is_answer += int(max(rows, key=lambda r: float(H[r])) in answer_rows)
        pos += len(resp)

    table = {}
    for name, rows in groups.items():
        if not rows:
            continue
        sel = torch.tensor(rows)
        table[name] = {"tokens": len(rows), "entropy": float(H[sel].mean()),
                       "pushed": float((omega[sel] < 0).double().mean()), "omega": float(omega[sel].mean()),
                       "delta": float(delta[sel].mean()), "p_teacher": float(p_teacher[sel].mean())}
    is_answer = torch.zeros(H.numel(), dtype=torch.bool)
    for name, rows in groups.items():
        if name.startswith("answer/") and rows:
            is_answer[torch.tensor(rows)] = True
    detail = {"entropy": H, "delta": delta, "omega": omega, "rollout": index, "answer": is_answer, "texts": texts}
    return {"detail": detail, "rollouts": len(rollouts), "correct": sum(r.status == "correct" for r in results),
            "tokens": int(H.numel()), "pushed": float((omega < 0).double().mean()), "groups": table,
            "answer_is_top_entropy": top_is_answer / with_answer if with_answer else math.nan,
            "responses_with_answer": with_answer}


def greedy_accuracy(model, tokenizer, examples, prompt_cfg, *, max_new_tokens: int, scorer) -> dict:
    """Greedy accuracy of the student prompt and of the teacher prompt (the privileged context in view): how much the
    teacher knows that the student does not."""
    from dasd_megatron.data.prompts import build_prompt_pair

    eos = tokenizer.eos_token_id
    texts: dict[str, list[str]] = {"student": [], "teacher": []}
    for ex in examples:
        pair = build_prompt_pair(tokenizer, ex, prompt_cfg)
        for side, ids in (("student", pair.student_ids), ("teacher", pair.teacher_ids)):
            with torch.no_grad():
                out = model.generate(torch.tensor([ids]), do_sample=False, max_new_tokens=max_new_tokens,
                                     pad_token_id=eos if eos is not None else 0)
            texts[side].append(tokenizer.decode(out[0, len(ids):], skip_special_tokens=True))
    golds = [ex.answer for ex in examples]
    return {side: sum(r.status == "correct" for r in scorer.score(t, golds)) / max(len(examples), 1)
            for side, t in texts.items()}


def markdown(res: dict) -> str:
    lines = [f"{res['rollouts']} responses ({res['correct']} correct), {res['tokens']} tokens, "
             f"{100 * res['pushed']:.1f}% pushed (omega < 0). The answer is its response's highest-entropy token in "
             f"{100 * res['answer_is_top_entropy']:.1f}% of the {res['responses_with_answer']} responses with an "
             "answer.", "",
             "| tokens | n | mean entropy | pushed (omega < 0) | mean omega | mean delta | mean p_teacher(token) |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    if "greedy" in res:
        lines = [f"Greedy accuracy on these problems: {100 * res['greedy']['student']:.1f}% from the student prompt, "
                 f"{100 * res['greedy']['teacher']:.1f}% from the teacher prompt (privileged context in view).", ""] \
            + lines
    for name, g in res["groups"].items():
        lines.append(f"| {name} | {g['tokens']} | {g['entropy']:.3f} | {100 * g['pushed']:.1f}% | {g['omega']:+.3f} | "
                     f"{g['delta']:+.3f} | {g['p_teacher']:.3f} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--recipe", default="smollm2_135m_dasd_cpu", help="prompt, loss, temperature and data from here")
    p.add_argument("--model", help="a Hugging Face model folder (default: the recipe's base model)")
    p.add_argument("--data", help="problems file (default: the recipe's training data)")
    p.add_argument("--problems", type=int, default=64)
    p.add_argument("--samples", type=int, default=4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", help="also write the numbers as JSON here")
    p.add_argument("overrides", nargs="*", help="dotted overrides of the recipe, as for dasd train (loss.rho=0.2)")
    p.add_argument("--greedy", action="store_true",
                   help="also decode every problem greedily from the student and from the teacher prompt and score "
                        "both: what the privileged context is worth to this model")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (default: torch's)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    import dataclasses

    from transformers import AutoModelForCausalLM

    from dasd_megatron.data.dataset import load_math_dataset
    from dasd_megatron.data.tokenizer import load_tokenizer
    from dasd_megatron.model.pretrained import resolve_pretrained
    from dasd_megatron.reward import RewardScorer
    from recipes import get_recipe

    from dasd_megatron.config import apply_overrides

    cfg = apply_overrides(get_recipe(args.recipe).config, args.overrides)
    model_dir = args.model or resolve_pretrained(cfg.model.hf_config)
    tokenizer = load_tokenizer(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    data = dataclasses.replace(cfg.data, source=args.data or cfg.data.source, max_prompt_tokens=None)
    examples = list(load_math_dataset(data).examples)
    g = torch.Generator().manual_seed(args.seed)
    examples = [examples[i] for i in torch.randperm(len(examples), generator=g)[: args.problems].tolist()]
    with RewardScorer(cfg.reward) as scorer:
        res = analyse(model, tokenizer, examples, cfg.data.prompt, cfg.loss, samples=args.samples,
                      temperature=cfg.rollout.temperature, max_new_tokens=cfg.train.max_response_tokens,
                      seed=args.seed, scorer=scorer)
        if args.greedy:
            res["greedy"] = greedy_accuracy(model, tokenizer, examples, cfg.data.prompt,
                                            max_new_tokens=cfg.train.max_response_tokens, scorer=scorer)
    res.pop("detail")
    res.update(recipe=args.recipe, overrides=args.overrides, model=model_dir, problems=len(examples),
               samples=args.samples)
    print(markdown(res))
    if args.out:
        with open(args.out, "w", encoding="utf-8") as f:
            json.dump(res, f, indent=2)
            f.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
