"""`dasd eval --data`: your own evaluation set, read like training data, evaluated as one more benchmark.

The first problems of the shared AIME24 copy are rewritten as a DAPO/verl-schema JSONL file (a training layout:
`prompt` messages, `reward_model.ground_truth`). Evaluated through `--data`, they must give exactly what the
benchmark path gives on the same problems: the same per-problem samples and statuses, the same metrics, under
`records/<name>.jsonl` and a report row of their own. Once with a scripted generator whose answers depend only on the
prompt (some right, some wrong, some without a box), once through the CLI with the built-in server serving a tiny
model greedily (temperature 0).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from dasd_megatron.data import load_math_dataset
from dasd_megatron.eval import EvalConfig, run_eval
from dasd_megatron.eval.benchmarks import custom_data_config, load_benchmark
from dasd_megatron.eval.cli import main
from dasd_megatron.eval.errors import EvalError
from dasd_megatron.eval.records import read_run_records
from dasd_megatron.eval.runner import format_summary
from dasd_megatron.eval.testing import BYTE_EOS_ID, ScriptedGenerator, byte_tokenizer, save_byte_tokenizer

DATA = Path(__file__).parents[1].parent / "shared" / "data"
pytestmark = pytest.mark.skipif(not DATA.is_dir(), reason=f"shared math data not found at {DATA}")
N = 4


@pytest.fixture(scope="module")
def aime():
    return load_benchmark("aime24", str(DATA), limit=3).examples


def write_dapo(path: Path, examples) -> str:
    """The problems in the DAPO/verl training layout (what `data.schema=dapo` / `auto` reads)."""
    with open(path, "w") as f:
        for ex in examples:
            f.write(json.dumps({"data_source": "aime24", "prompt": [{"role": "user", "content": ex.problem}],
                                "reward_model": {"ground_truth": ex.answer, "style": "rule"}}) + "\n")
    return str(path)


def without_identity(records):
    """Records minus the fields that name the set (its key and the key-derived seed)."""
    return [{k: v for k, v in r.items() if k not in ("benchmark", "seed")} for r in records]


def assert_same_records(got, want):
    """Equal records, log-prob statistics to 1e-4 relative (batched fp32 on the server), everything else exactly."""
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert {k: v for k, v in g.items() if k != "samples"} == {k: v for k, v in w.items() if k != "samples"}
        assert len(g["samples"]) == len(w["samples"])
        for gs, ws in zip(g["samples"], w["samples"]):
            lp = [k for k in ws if k.startswith("logprob_")]
            assert {k: v for k, v in gs.items() if k not in lp} == {k: v for k, v in ws.items() if k not in lp}
            for k in lp:
                assert gs[k] == pytest.approx(ws[k], rel=1e-4), k


def by_problem(run_dir):
    return {k: sorted(v, key=lambda r: r["problem_id"]) for k, v in read_run_records(str(run_dir)).items()}


def test_custom_set_equals_the_benchmark_path_on_the_same_problems(aime, tmp_path):
    tok = byte_tokenizer()
    golds = {ex.problem: ex.answer for ex in aime}

    def respond(req, j):  # depends on the prompt only, never on which set asked
        prompt = tok.decode(list(req.prompt_ids))
        gold = next(g for p, g in golds.items() if p in prompt)
        h = int(hashlib.sha1(f"{prompt}/{j}".encode()).hexdigest(), 16)
        return ["wait " * (h % 4) + f"\\boxed{{{gold}}}", f"\\boxed{{{int(gold) + 1}}}", "no idea"][h % 3]

    src = write_dapo(tmp_path / "my_aime.jsonl", aime)
    custom = custom_data_config(src)  # schema detected from the columns, as training does
    assert custom.name == "my_aime" and load_math_dataset(custom).schema == "dapo"

    def evaluate(out, **kw):
        cfg = EvalConfig(model="scripted", n_samples=N, limit=3, concurrency=2, reward_workers=1, **kw)
        return run_eval(cfg, ScriptedGenerator(tok, respond), tok, str(out), data_dir=str(DATA), progress=False)

    bench = evaluate(tmp_path / "bench", benchmarks=("aime24",))
    mine = evaluate(tmp_path / "mine", benchmarks=(), data=(custom,))
    b, m = bench.metrics["benchmarks"]["aime24"], mine.metrics["benchmarks"]["my_aime"]
    assert b == m and 0 < m["avg_at_n"] < 100 and m["status_counts"]["unparseable"] > 0
    assert list(mine.metrics["benchmarks"]) == ["my_aime"] and mine.metrics["macro"]["benchmarks"] == ["my_aime"]
    assert without_identity(by_problem(tmp_path / "bench")["aime24"]) == \
        without_identity(by_problem(tmp_path / "mine")["my_aime"])
    assert (tmp_path / "mine" / "records" / "my_aime.jsonl").exists()
    assert mine.metrics["settings"]["data"] == [{"name": "my_aime", "source": src, "split": "test", "schema": "auto"}]
    report = (tmp_path / "mine" / "report.md").read_text()
    assert f"| my_aime | 3 | {m['avg_at_n']:.1f} |" in report
    assert format_summary(mine.metrics).startswith("my_aime           3 problems")

    both = evaluate(tmp_path / "both", benchmarks=("aime24",), data=(custom,))  # side by side in one run
    assert list(both.metrics["benchmarks"]) == ["aime24", "my_aime"]
    assert both.metrics["benchmarks"]["aime24"] == both.metrics["benchmarks"]["my_aime"] == b
    again = evaluate(tmp_path / "mine", benchmarks=(), data=(custom,))  # resumable like the benchmarks
    assert (again.generated, again.resumed) == (0, 3) and again.metrics["benchmarks"] == mine.metrics["benchmarks"]


def test_schema_and_field_mapping_as_in_training(aime, tmp_path):
    src = tmp_path / "held_out.parquet"
    import datasets

    datasets.Dataset.from_list([{"q": ex.problem, "gold": {"value": ex.answer}} for ex in aime]).to_parquet(str(src))
    cfg = custom_data_config(str(src), schema="plain", problem_field="q", answer_field="gold.value")
    examples = load_math_dataset(cfg).examples
    assert cfg.name == "held_out" and [(e.problem, e.answer) for e in examples] == [(e.problem, e.answer)
                                                                                       for e in aime]
    folder = tmp_path / "heldout"
    folder.mkdir()
    write_dapo(folder / "test.jsonl", aime)
    assert custom_data_config(str(folder)).name == "heldout"  # generic file name: the folder names the set
    assert custom_data_config("openai/gsm8k", subset="main").name == "gsm8k"
    assert custom_data_config("openai/gsm8k", name="gsm8k_test").name == "gsm8k_test"


def test_bad_names_and_settings_are_refused(tmp_path):
    with pytest.raises(EvalError, match=r"'aime24' .* is also a built-in benchmark's name.*Fix: pass --data-name"):
        custom_data_config(str(tmp_path / "aime24.jsonl"))
    with pytest.raises(EvalError, match=r"name 'my data' .*Fix: pass --data-name NAME"):
        custom_data_config(str(tmp_path / "x.jsonl"), name="my data")
    a = custom_data_config(str(tmp_path / "a" / "x.jsonl"))
    b = custom_data_config(str(tmp_path / "b" / "x.jsonl"))
    with pytest.raises(ValueError, match=r"eval.data=\['x', 'x'\]: two evaluation sets have the same name"):
        EvalConfig(benchmarks=(), data=(a, b))
    assert EvalConfig(benchmarks=(), data=(a,)).sets == ("x",)
    assert EvalConfig(benchmarks=("aime24",), data=(a,)).sets == ("aime24", "x")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from sglang_rollout.testing import make_tiny_hf_model

    d = make_tiny_hf_model(str(tmp_path_factory.mktemp("tiny") / "hf"), seed=0, eos_token_id=BYTE_EOS_ID,
                           max_position_embeddings=4096)
    return save_byte_tokenizer(d)


def test_cli_data_on_the_builtin_server_matches_the_benchmark(aime, model_dir, tmp_path, capsys):
    src = write_dapo(tmp_path / "my_aime.jsonl", aime[:2])
    common = ["--model", model_dir, "--backend", "builtin", "--limit", "2", "-n", "2", "--temperature", "0",
              "--max-new-tokens", "8", "--concurrency", "2", "--no-progress", "--data-dir", str(DATA)]
    both = tmp_path / "both"
    assert main(["eval", *common, "--output", str(both), "--benchmarks", "aime24", "--data", src]) == 0
    out = capsys.readouterr().out
    assert "(4 problems generated, 0 resumed)" in out and "my_aime" in out
    records = by_problem(both)
    assert set(records) == {"aime24", "my_aime"}
    got, want = without_identity(records["my_aime"]), without_identity(records["aime24"])
    for g, w in zip(got, want, strict=True):  # greedy: the same responses from the same prompts
        assert [s["tokens"] for s in g["samples"]] == [s["tokens"] for s in w["samples"]]
        assert [s["status"] for s in g["samples"]] == [s["status"] for s in w["samples"]]
        assert [s["extracted"] for s in g["samples"]] == [s["extracted"] for s in w["samples"]]
        for gs, ws in zip(g["samples"], w["samples"]):
            assert gs["logprob_sum"] == pytest.approx(ws["logprob_sum"], abs=1e-4)
        assert (g["problem_id"], g["problem_hash"], g["gold"]) == (w["problem_id"], w["problem_hash"], w["gold"])
    metrics = json.loads((both / "metrics.json").read_text())
    mb, ma = metrics["benchmarks"]["my_aime"], metrics["benchmarks"]["aime24"]
    assert mb["problems"] == 2 and mb["samples"] == 4
    for key in ("avg_at_n", "pass_at_k", "status_counts", "mean_length", "truncated_pct", "markers_per_response"):
        assert mb[key] == ma[key], key
    assert mb["token_nll"] == pytest.approx(ma["token_nll"], rel=1e-5)
    report = (both / "report.md").read_text()
    assert "| AIME24 | 2 |" in report and "| my_aime | 2 |" in report

    alone = tmp_path / "alone"  # --data alone: only that set
    assert main(["eval", *common, "--output", str(alone), "--data", src]) == 0
    assert "(2 problems generated, 0 resumed)" in capsys.readouterr().out
    assert set(by_problem(alone)) == {"my_aime"}
    # same key, same seeds: the same records (log-probs up to fp32 summation order: the built-in server batches the
    # concurrent problems of a run together, and this run has 2 of them where the first had 4)
    assert_same_records(by_problem(alone)["my_aime"], records["my_aime"])
    assert main(["eval", *common, "--output", str(alone), "--data", src]) == 0  # all recorded: no server
    assert "(0 problems generated, 2 resumed)" in capsys.readouterr().out


def test_cli_errors_are_one_line_before_any_server(model_dir, tmp_path, capsys):
    base = ["eval", "--model", model_dir, "--backend", "builtin", "--output", str(tmp_path / "o"), "--no-progress"]
    assert main([*base, "--data", str(tmp_path / "missing.jsonl")]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("dasd eval: error: data.source=") and "no such file or folder. Fix:" in err
    assert main([*base, "--data", str(tmp_path / "math500.jsonl")]) == 2
    assert "also a built-in benchmark's name" in capsys.readouterr().err
    bad = tmp_path / "qa.jsonl"
    bad.write_text(json.dumps({"q": "1+1?", "a": "2"}) + "\n")
    assert main([*base, "--data", str(bad), "--schema", "plain"]) == 2
    assert "the plain schema needs data.problem_field and data.answer_field" in capsys.readouterr().err
    assert main([*base, "--data", str(bad)]) == 2  # columns that no schema knows: say how to map them
    assert "Fix: set data.schema=plain with data.problem_field=<column>" in capsys.readouterr().err
    assert not (tmp_path / "o" / "server_logs").exists()  # no server was started


def test_training_prompt_and_reward_settings(aime, tmp_path):
    """`--instruction` reaches the prompt and `--last-number-fallback` the scorer: a model trained like the main
    job (asked for "just the number", rewarded on the last number) is evaluated the way it was trained."""
    from dasd_megatron.eval.cli import eval_config
    from dasd_megatron.cli import build_parser

    args = build_parser().parse_args(["eval", "--model", "m", "--output", str(tmp_path / "x"), "--data", "f.jsonl",
                                      "--instruction", "Reply with just the number.", "--last-number-fallback"])
    cfg = eval_config(args, "m")
    assert cfg.prompt.instruction == "Reply with just the number." and cfg.last_number_fallback
    assert cfg.identity()["prompt"]["instruction"] == "Reply with just the number."
    assert "instruction" not in eval_config(build_parser().parse_args(
        ["eval", "--model", "m", "--output", "o", "--data", "f.jsonl"]), "m").identity()["prompt"]

    tok = byte_tokenizer()
    golds = {ex.problem: ex.answer for ex in aime}
    seen = []

    def respond(req, j):  # the gold number, unboxed, at the end of a sentence
        prompt = tok.decode(list(req.prompt_ids))
        seen.append(prompt)
        return f"I think it is {next(g for p, g in golds.items() if p in prompt)}"

    def evaluate(out, **kw):
        cfg = EvalConfig(model="scripted", benchmarks=("aime24",), n_samples=1, limit=3, concurrency=2,
                         reward_workers=1, **kw)
        return run_eval(cfg, ScriptedGenerator(tok, respond), tok, str(out), data_dir=str(DATA), progress=False)

    from dasd_megatron.data import PromptConfig

    boxed_only = evaluate(tmp_path / "boxed").metrics["benchmarks"]["aime24"]
    assert boxed_only["avg_at_n"] == 0 and "Reply with just the number." not in seen[-1]
    last = evaluate(tmp_path / "last", last_number_fallback=True,
                    prompt=PromptConfig(instruction="Reply with just the number.")).metrics["benchmarks"]["aime24"]
    assert last["avg_at_n"] == 100 and "?\n\nReply with just the number.<|im_end|>" in seen[-1]
