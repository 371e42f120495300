"""End to end on the built-in rollout server with a tiny random Qwen3 model (byte-level tokenizer, real problems).

- `dasd eval` (through `dasd_megatron.eval.cli`) serves the HF folder with the built-in server in a subprocess,
  evaluates two problems of AIME24 and MATH500 with n = 2 and 8 new tokens, and writes records, metrics and the
  report; a random model answers garbage, which must be counted (unparseable / incorrect, never correct). The same
  command again generates nothing and starts no server.
- A server that dies mid-evaluation (shut down after the first problem) stops the run with `EvalIncomplete`; once
  a server is back on the same port, rerunning resumes from the records and ends with exactly the records and
  metrics of an uninterrupted run (the built-in server honours per-sample seeds).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from dasd_megatron.data import load_tokenizer
from dasd_megatron.eval import EvalConfig, EvalIncomplete, RolloutGenerator, run_eval
from dasd_megatron.eval.cli import main
from dasd_megatron.eval.records import read_run_records
from dasd_megatron.eval.testing import BYTE_EOS_ID, save_byte_tokenizer
from sglang_rollout.builtin_server import BuiltinServer, ServerArgs
from sglang_rollout.rollout_client import ClientConfig
from sglang_rollout.testing import make_tiny_hf_model

DATA = Path(__file__).parents[1].parent / "shared" / "data"
pytestmark = pytest.mark.skipif(not DATA.is_dir(), reason=f"shared math data not found at {DATA}")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    d = make_tiny_hf_model(str(tmp_path_factory.mktemp("tiny") / "hf"), seed=0, eos_token_id=BYTE_EOS_ID,
                           max_position_embeddings=4096)
    return save_byte_tokenizer(d)


def by_problem(run_dir):
    return {k: sorted(v, key=lambda r: r["problem_id"]) for k, v in read_run_records(str(run_dir)).items()}


def test_cli_eval_on_the_builtin_server(model_dir, tmp_path, capsys):
    out = tmp_path / "run"
    argv = ["eval", "--model", model_dir, "--backend", "builtin", "--output", str(out), "--benchmarks",
            "aime24,math500", "--limit", "2", "-n", "2", "--max-new-tokens", "8", "--concurrency", "2",
            "--no-progress", "--data-dir", str(DATA)]
    assert main(argv) == 0
    assert "(4 problems generated, 0 resumed)" in capsys.readouterr().out
    records = by_problem(out)
    assert set(records) == {"aime24", "math500"} and all(len(v) == 2 for v in records.values())
    metrics = json.loads((out / "metrics.json").read_text())
    for key, recs in records.items():
        assert [r["problem_id"] for r in recs] == [0, 1]
        tokens = nll = 0.0
        for r in recs:
            assert r["n"] == 2 and r["num_correct"] == 0 and r["weight_version"] == "default"
            for s in r["samples"]:
                assert s["status"] in ("unparseable", "incorrect")
                assert 1 <= s["tokens"] <= 8 and (s["finish"] == "stop" or s["tokens"] == 8)
                assert s["logprob_sum"] < 0 and s["logprob_min"] <= s["logprob_mean"]
                assert s["logprob_mean"] == pytest.approx(s["logprob_sum"] / s["tokens"])
                tokens += s["tokens"]
                nll -= s["logprob_sum"]
        m = metrics["benchmarks"][key]
        assert m["problems"] == 2 and m["samples"] == 4 and m["avg_at_n"] == 0.0
        counts = m["status_counts"]
        assert counts["correct"] == 0 and counts["unparseable"] + counts["incorrect"] == 4
        assert m["token_nll"] == pytest.approx(nll / tokens)
    assert metrics["settings"]["temperature"] == 0.6 and metrics["settings"]["top_p"] == 0.95
    report = (out / "report.md").read_text()
    assert "| AIME24 | 2 | 0.0 | 0.0 |" in report and "| MATH500 | 2 |" in report
    assert (out / "pass_at_k.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (out / "server_logs" / "server_0.log").exists()

    assert main(argv) == 0  # everything recorded: no server, same numbers
    assert "(0 problems generated, 4 resumed)" in capsys.readouterr().out
    assert json.loads((out / "metrics.json").read_text()) == metrics

    assert main(["eval", "--model", model_dir, "--output", str(out), "--benchmarks", "aime24", "--temperature",
                 "1.0", "--data-dir", str(DATA)]) == 2
    assert "temperature: recorded 0.6, now 1.0" in capsys.readouterr().err


class _ShutdownAfterFirst:
    """Passes requests to `inner`; after the first problem's samples arrive, the server goes down."""

    def __init__(self, inner, server):
        self.inner, self.server, self.calls = inner, server, 0

    def generate(self, request):
        out = self.inner.generate(request)
        self.calls += 1
        if self.calls == 1:
            self.server.shutdown()
        return out


def test_server_dying_mid_eval_then_resume(model_dir, tmp_path):
    tok = load_tokenizer(model_dir)
    cfg = EvalConfig(model=model_dir, benchmarks=("aime24", "math500"), limit=2, n_samples=2, max_new_tokens=6,
                     concurrency=1, reward_workers=1)
    client = ClientConfig(max_retries=1, backoff_base_s=0.05, request_timeout_s=60, samples_per_request=2)

    def evaluate(server, run_dir, wrap=None):
        gen = RolloutGenerator([server.url], client)
        return run_eval(cfg, wrap(gen) if wrap else gen, tok, str(run_dir), data_dir=str(DATA), progress=False,
                        report=False)

    server = BuiltinServer(ServerArgs(model_path=model_dir, port=0)).start()
    port = server.port
    ref = evaluate(server, tmp_path / "ref")
    with pytest.raises(EvalIncomplete, match="rerun the same command") as info:
        evaluate(server, tmp_path / "run", wrap=lambda g: _ShutdownAfterFirst(g, server))
    assert info.value.recorded == 1
    assert sum(len(v) for v in read_run_records(str(tmp_path / "run")).values()) == 1

    server = BuiltinServer(ServerArgs(model_path=model_dir, port=port)).start()  # back on the same address
    try:
        again = evaluate(server, tmp_path / "run")
    finally:
        server.shutdown()
    assert (again.generated, again.resumed) == (3, 1)
    assert by_problem(tmp_path / "run") == by_problem(tmp_path / "ref")
    assert again.metrics == ref.metrics
    assert ref.metrics["benchmarks"]["aime24"]["token_nll"] > 0
