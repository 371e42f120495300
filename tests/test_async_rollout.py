"""Bounded-staleness asynchronous rollouts (`dasd_megatron.train.async_rollout`), driven the way `Trainer` drives
them, against a scripted slow SGLang server over real HTTP and a scripted slow trainer step.

`ScriptedServer` is a test double of SGLang's `/generate` (batch form: ``input_ids``/``rid`` lists, one result per
item with ``meta_info.id``, ``finish_reason``, ``output_token_logprobs`` and ``weight_version``): it sleeps
`delay_s` per call and answers tokens that are a function of (prompt, sampling seed, weight version), so a
regenerated batch is identical and a sample shows which version made it. The weight sync is scripted too (it sets
the server's version label after `SYNC_S`).

The timing assertions are on the recorded phase intervals (which phases overlap, and the span against the sum of
the phases), not on wall-clock thresholds.
"""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from dasd_megatron.data import MathExample
from dasd_megatron.reward import RewardResult
from dasd_megatron.train.async_rollout import (RolloutProducer, pending_from_json, pending_to_json, staleness_metrics,
                                               version_label, version_number)
from dasd_megatron.train.loop import ScoredGroup
from sglang_rollout.rollout_client import ClientConfig, RolloutClient, SamplingConfig

P, G = 2, 3  # prompts per batch, samples per prompt
GEN_S, TRAIN_S, SYNC_S = 0.30, 0.30, 0.02


class ScriptedServer:
    """A scripted slow SGLang `/generate` (see the module docstring)."""

    def __init__(self, delay_s: float, version: str = "default"):
        self.delay_s, self.version, self.calls = delay_s, version, 0
        owner = self

        class H(BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                assert self.path == "/generate", self.path
                owner.calls += 1
                version = owner.version  # the weights a call starts with generate all of it
                time.sleep(owner.delay_s)
                params = body["sampling_params"]
                out = []
                for i, (ids, rid) in enumerate(zip(body["input_ids"], body["rid"])):
                    p = params[i] if isinstance(params, list) else params
                    toks = [(sum(ids) * 7 + p["sampling_seed"] + 13 * version_number(version) + t) % 97 + 1
                            for t in range(3)]
                    out.append({"output_ids": toks, "meta_info": {
                        "id": rid, "finish_reason": {"type": "length", "length": 3}, "weight_version": version,
                        "output_token_logprobs": [[-0.5 - 0.01 * t, t, None] for t in toks]}})
                data = json.dumps(out).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), H)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server():
    s = ScriptedServer(GEN_S)
    yield s
    s.close()


class ScriptedRun:
    """The trainer's side of the loop, scripted: `Trainer.next_batch` / `train_one_step`'s order of take, train,
    wait_before_sync, sync, synced; every phase recorded as (name, index, start, end)."""

    def __init__(self, servers, k: int, steps: int, start_step: int = 0, ready=(), prompt_state=None,
                 samples_per_request: int = P * G):
        self.servers, self.k, self.steps = servers, k, steps
        self.client = RolloutClient([s.url for s in servers], ClientConfig(samples_per_request=samples_per_request,
                                                                           backoff_base_s=0.01))
        self.next_prompt = 0 if prompt_state is None else prompt_state["next"]
        self.synced_once = start_step > 0
        self.phases: list[tuple[str, int, float, float]] = []
        self.batches: dict[int, list] = {}
        self.producer = None
        self.start_step, self.ready, self.state0 = start_step, list(ready), prompt_state

    def produce(self, index: int, version: int):
        prompts = [[1 + self.next_prompt + i, 5, 9] for i in range(P)]
        self.next_prompt += P
        accept = (lambda label: version_number(label) == version) if self.synced_once else None
        t0 = time.perf_counter()
        groups = self.client.generate(prompts, n=G, sampling=SamplingConfig(max_new_tokens=3, seed=100 + index),
                                      batch_id=f"step{index}", accept_version=accept)
        self.phases.append(("generate", index, t0, time.perf_counter()))
        return groups, {}, {"next": self.next_prompt}

    def sync(self, version: int):
        t0 = time.perf_counter()
        time.sleep(SYNC_S)
        for s in self.servers:
            s.version = version_label(version)
        self.synced_once = True
        self.phases.append(("sync", version, t0, time.perf_counter()))

    def run(self) -> "ScriptedRun":
        if self.k:
            self.producer = RolloutProducer(self.produce, max_staleness=self.k, total=self.steps,
                                            first_index=self.start_step + len(self.ready), synced=self.start_step,
                                            ready=self.ready, prompt_state=self.state0, poll_s=0.05).start()
        for s in range(self.start_step, self.steps):
            groups = self.producer.take(s).groups if self.k else self.produce(s, s)[0]
            self.batches[s] = groups
            t0 = time.perf_counter()
            time.sleep(TRAIN_S)
            self.phases.append(("train", s, t0, time.perf_counter()))
            if self.k:
                self.producer.wait_before_sync(s + 1)
            self.sync(s + 1)
            if self.k:
                self.producer.synced(s + 1)
        if self.producer is not None:
            self.producer.close(timeout_s=5)
        return self

    def phase(self, name, index):
        return next((a, b) for n, i, a, b in self.phases if n == name and i == index)


def _overlap(a, b) -> float:
    return max(0.0, min(a[1], b[1]) - max(a[0], b[0]))


@pytest.mark.parametrize("k", [0, 1, 2])
def test_generation_overlaps_training_within_the_staleness_bound(server, k):
    N = 5
    r = ScriptedRun([server], k, N).run()
    gen = {i: r.phase("generate", i) for i in range(N)}
    train = {i: r.phase("train", i) for i in range(N)}
    span = max(b for *_, b in r.phases) - min(a for _, _, a, _ in r.phases)
    serial = sum(b - a for _, _, a, b in r.phases)  # every phase one after the other
    if k == 0:  # synchronous: nothing overlaps, the span is the sum of the phases
        for i in range(N):
            for j in range(N):
                assert _overlap(gen[i], train[j]) == 0.0
        assert span >= serial * 0.999
    else:  # the next batch is generated while this one trains
        for i in range(N - k):  # while batches are left to generate, one is generated during each training phase
            assert max(_overlap(gen[j], train[i]) for j in range(N)) > 0.5 * min(GEN_S, TRAIN_S), (i, gen, train)
        # about max(generate, train) per step: the span is the first batch's generation, then per step the longer
        # of the two phases, plus the syncs (and the scheduling slack of a thread hand-off per step)
        per_step = sum(max(gen[i][1] - gen[i][0], train[i][1] - train[i][0]) for i in range(1, N))
        syncs = sum(b - a for n, _, a, b in r.phases if n == "sync")
        bound = (gen[0][1] - gen[0][0]) + (train[0][1] - train[0][0]) + per_step + syncs
        assert span <= bound + 0.25 * N * GEN_S, (span, bound)
        assert span < 0.85 * serial
    # staleness: batch s is generated by version max(0, s - k), so no sample is older than the bound
    for s, groups in r.batches.items():
        versions = {version_number(x.weight_version) for g in groups for x in g}
        assert versions == {max(0, s - k)}, (s, versions)
        assert s - max(versions) <= k
    # every prompt got exactly G samples, once
    prompts = [tuple(g[0].prompt_ids) for s in sorted(r.batches) for g in r.batches[s]]
    assert len(prompts) == len(set(prompts)) == N * P
    for groups in r.batches.values():
        for g in groups:
            assert len(g) == G and len({x.rid for x in g}) == G and len({x.prompt_ids for x in g}) == 1


def test_no_generation_beyond_the_last_step_and_the_queue_is_bounded(server):
    N, k = 3, 2
    r = ScriptedRun([server], k, N).run()
    assert sorted(i for n, i, *_ in r.phases if n == "generate") == [0, 1, 2]
    assert r.producer.timeline and all(v == max(0, j - k) for j, v, *_ in r.producer.timeline)


def test_a_server_on_other_weights_is_refused_and_its_samples_resent():
    """A restarted server that came back on other weights (here: stuck on version 0 after the sync to 1): its
    samples are re-sent to the server with the right weights, none is kept."""
    good, stale = ScriptedServer(0.01), ScriptedServer(0.01)
    try:
        r = ScriptedRun([good, stale], 1, 3, samples_per_request=1)  # calls go to both servers
        real_sync = r.sync

        def sync(version):  # the second server never gets the new weights
            real_sync(version)
            stale.version = version_label(0)

        r.sync = sync
        r.run()
        for s, groups in r.batches.items():
            assert {version_number(x.weight_version) for g in groups for x in g} == {max(0, s - 1)}
        assert r.client.stats["rejected_version"] > 0
        assert {x.server for g in r.batches[2] for x in g} == {good.url}
    finally:
        good.close()
        stale.close()


def test_checkpointed_batches_and_the_regenerated_one_equal_the_uninterrupted_run(server):
    """Resume exactness at the producer level: a run "checkpointed" after step t stores the finished batches
    (pending) and the prompt position after them (resume_state); a new producer started from them under the
    checkpoint's weights (version t) trains exactly the uninterrupted run's batches."""
    N, k, t = 5, 2, 2
    full = ScriptedRun([server], k, N).run()
    server.version = "default"  # a fresh run again

    part = ScriptedRun([server], k, t)  # steps 0..t-1, then the state a checkpoint at step t holds
    part.steps = N  # the producer runs towards N, the trainer stops after step t - 1
    part.producer = RolloutProducer(part.produce, max_staleness=k, total=N, poll_s=0.05).start()
    for s in range(t):
        part.batches[s] = part.producer.take(s).groups
        part.producer.wait_before_sync(s + 1)
        part.sync(s + 1)
        part.producer.synced(s + 1)
    pending, state = part.producer.pending(), part.producer.resume_state()
    part.producer.close(timeout_s=5)
    assert [b.index for b in pending] == list(range(t, t + k))
    assert [b.version for b in pending] == [max(0, j - k) for j in range(t, t + k)]

    server.version = version_label(t)  # the resumed run syncs the checkpoint's weights first
    resumed = ScriptedRun([server], k, N, start_step=t, ready=pending, prompt_state=state).run()
    got = {**part.batches, **resumed.batches}
    assert sorted(got) == list(range(N))
    for s in range(N):
        assert [[(x.rid, x.output_ids, x.weight_version) for x in g] for g in got[s]] == \
               [[(x.rid, x.output_ids, x.weight_version) for x in g] for g in full.batches[s]], s


def test_producer_errors_reach_the_trainer():
    def produce(index, version):
        raise ConnectionError("server gone")

    p = RolloutProducer(produce, max_staleness=1, total=3, poll_s=0.05).start()
    with pytest.raises(RuntimeError, match="rollout producer failed.*server gone"):
        p.take(0)
    with pytest.raises(ValueError, match="max_staleness"):
        RolloutProducer(produce, max_staleness=0, total=3)


def test_pending_batches_round_trip_through_json(server):
    client = RolloutClient([server.url])
    server.delay_s = 0.0
    samples = client.generate([[3, 4, 5]], n=G, sampling=SamplingConfig(max_new_tokens=3, seed=7))[0]
    group = ScoredGroup(MathExample(3, "1+2?", ("3", "3.0"), None, "toy"), [3, 4, 5], samples,
                        ["a", "b", "c"], [RewardResult(1.0, "correct", "3")] * G)
    p = RolloutProducer(lambda j, v: ([group], {"timing/reward_s": 0.1}, {"offset": j + 1}), max_staleness=1,
                        total=1, poll_s=0.05).start()
    p.wait_before_sync(1)
    records = json.loads(json.dumps(pending_to_json(p.pending())))
    (back,) = pending_from_json(records, ScoredGroup)
    assert (back.index, back.version, back.stats, back.prompt_state) == (0, 0, {"timing/reward_s": 0.1},
                                                                         {"offset": 1})
    assert back.groups == [group]


def test_staleness_metrics_histogram():
    m = staleness_metrics([3, 3, 2, 3], trained_version=4, max_staleness=2)
    assert m["rollout/staleness_mean"] == pytest.approx(1.25) and m["rollout/staleness_max"] == 2
    assert (m["rollout/staleness_0_frac"], m["rollout/staleness_1_frac"], m["rollout/staleness_2_frac"]) == \
           (0.0, 0.75, 0.25)
    assert version_number("step12") == 12 and version_number("default") == 0 and version_label(3) == "step3"
