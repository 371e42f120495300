"""`dasd train`: the DASD training loop, one method per phase (`Trainer.train_one_step` is one step).

    generate -> reward -> select groups (dynamic sampling) -> teacher prompts -> advantages -> DASD step (score,
    train, optimizer) -> sync -> evaluate -> log -> checkpoint

With `rollout.max_staleness = k >= 1` the first three phases run ahead on rank 0's producer thread
(`dasd_megatron.train.async_rollout`): step s trains on the batch the weights of step max(0, s - k) generated while
the trainer trained the steps before, and the sync waits only for the batch in progress (bounded staleness).

A step's scored prompts are `ScoredGroup`s; which of them the step trains on is decided by the pure
`select_groups` / `collect_groups` (dynamic sampling, DAPO-style: groups whose rewards are all equal are dropped and
fresh prompts drawn until the batch is full).

Roles: every rank trains (megatron TP x PP x DP). Rank 0 also drives the rollout servers (launching the built-in
server where SGLang is absent), scores rewards in its process pool and writes logs; the rollouts are broadcast to
all ranks. Weights reach the servers after every step through the streaming exporter (TP/PP gathered onto rank 0)
and the configured transport (`rollout.transport`; with 'distributed', rank 0 is rank 0 of the weight-update group
and the servers are its other ranks). With `rollout.colocated` (servers on the trainer's GPUs), rank 0 releases the
servers' memory before each DASD step and the weight sync after it resumes it. The policy starts from the HF
folder `model.hf_config` (its safetensors are imported into megatron's layout); a run folder with checkpoints
resumes from the newest complete one.

LoRA (`model.lora.rank > 0`, `model/lora.py`): the base is loaded from the HF folder and frozen, adapters go on
before the DDP wrapper, checkpoints hold the adapters (and the base's fingerprint, checked on resume), the teacher is
`AdapterTeacher` (base: adapters off; ema: an EMA adapter) or the policy, and with `model.lora.sync=adapter` the
servers run LoRA and each sync sends only the adapter (PEFT names) that every request names (`ADAPTER_NAME`).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import threading
import time
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
import torch.distributed as dist
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from dasd_megatron.config import ConfigError, RunConfig, to_dict
from dasd_megatron.data import (MathExample, PromptIterator, build_prompt_pair, load_math_dataset, load_tokenizer,
                                student_prompt)
from dasd_megatron.data.synthetic import kind_of
from dasd_megatron.eval.markers import epistemic_marker_density
from dasd_megatron.loss import grpo_advantages
from dasd_megatron.model.builder import build_model, layout_summary
from dasd_megatron.model.export import iter_hf_weight_buckets
from dasd_megatron.model.hf_config import load_hf_architecture
from dasd_megatron.model.hf_import import load_hf_weights, open_hf_checkpoint
from dasd_megatron.model.lora import apply_lora, base_fingerprint, iter_adapter_buckets, peft_config
from dasd_megatron.model.pretrained import has_weights, resolve_pretrained
from dasd_megatron.packing import balanced_dp_split
from dasd_megatron.parallel import destroy_parallel, env_world_size, initialize_parallel
from dasd_megatron.preflight import preflight
from dasd_megatron.reward import RewardResult, RewardScorer
from dasd_megatron.train.async_rollout import (ProducedBatch, RolloutProducer, pending_from_json, pending_to_json,
                                               staleness_metrics, version_label, version_number)
from dasd_megatron.train.batch import Rollout
from dasd_megatron.train.checkpoint import PENDING_ROLLOUTS, load_training_checkpoint, save_training_checkpoint
from dasd_megatron.train.config import TrainConfig
from dasd_megatron.train.dasd_step import DASDStep
from dasd_megatron.train.engine import build_optimizer, wrap_ddp
from dasd_megatron.train.metrics_log import MetricsLogger, truncate_jsonl_after
from dasd_megatron.train.teacher import AdapterTeacher, TeacherWeights
from sglang_rollout.http_client import HttpClient
from sglang_rollout.manager import ManagerConfig, ServerConfig, ServerManager
from sglang_rollout.process_group import free_store_port, master_address_for
from sglang_rollout.rollout_client import ClientConfig, RolloutClient, Sample, SamplingConfig
from sglang_rollout.server_client import ServerClient
from sglang_rollout.weight_sync.sync import WeightSync, drain
from sglang_rollout.weight_sync.lora import AdapterDiskTransport, AdapterTensorTransport
from sglang_rollout.weight_sync.transports import DiskTransport, DistributedTransport, TensorTransport

log = logging.getLogger(__name__)

#: Sampling seeds are `rollout.seed + offset`. Training step s, dynamic-sampling round r uses the offset
#: s + RESAMPLE_ROUND_SEED_STRIDE * r: round 0 keeps the seeds of runs without dynamic sampling, and the stride is
#: a prime above any step count, so no two (step, round) pairs of a run share a seed.
RESAMPLE_ROUND_SEED_STRIDE = 100_003
#: The evaluation after step s samples with offset EVAL_SEED_OFFSET + s (the 1000th prime; any offset beyond the
#: steps near s would do): its seeds are not those of the training steps around it, so a sampled evaluation
#: (`train.eval_temperature > 0`) does not replay their responses. Greedy decoding does not use them.
EVAL_SEED_OFFSET = 7_919
#: the adapter's name on the rollout servers (`model.lora.sync=adapter`): every request names it (`lora_path`)
ADAPTER_NAME = "policy"


# -- scored rollouts and dynamic sampling (pure: no model, no server) ------------------------------------------------
@dataclass
class ScoredGroup:
    """One prompt and its G sampled responses, decoded and scored: `texts[i]` / `results[i]` belong to
    `samples[i]` (the server's token ids, sampling log-probs and weight version)."""

    example: MathExample
    prompt_ids: list[int]
    samples: Sequence[Sample]
    texts: list[str]
    results: list[RewardResult]

    @property
    def rewards_vary(self) -> bool:
        """Whether the G rewards are not all equal. A group of equal rewards has zero GRPO advantage everywhere, so
        its policy-gradient term is zero; dynamic sampling (DAPO) drops such groups."""
        return len({r.score for r in self.results}) > 1


@dataclass(frozen=True)
class GroupSelection:
    """The groups one step trains on, in batch order, and how they were collected."""

    batch: list[ScoredGroup]
    #: the kept groups (all of them, or under dynamic sampling the varied ones) reach the batch size
    enough: bool
    #: groups whose rewards were all equal (dynamic sampling only; 0 without it)
    dropped: int
    #: how many of the dropped groups fill the batch because too few varied ones were found
    filled: int
    dynamic_sampling: bool
    #: generation rounds it took
    rounds: int = 1
    #: seconds spent scoring rewards over all rounds
    reward_s: float = 0.0

    def metrics(self) -> dict:
        """`timing/reward_s`, and under dynamic sampling its `rollout/ds_*` counts."""
        out = {"timing/reward_s": self.reward_s}
        if self.dynamic_sampling:
            out.update({"rollout/ds_rounds": self.rounds, "rollout/ds_dropped_groups": self.dropped,
                        "rollout/ds_filled_groups": self.filled})
        return out


def select_groups(scored: Sequence[ScoredGroup], batch_size: int, dynamic_sampling: bool) -> GroupSelection:
    """The batch of `batch_size` groups out of `scored` (every group scored so far this step, oldest first).

    Without dynamic sampling every group is kept. With it the groups whose rewards vary are kept and the others
    dropped; the batch is the kept groups, oldest first, then (when fewer than `batch_size` were kept) dropped groups,
    oldest first, fill the rest."""
    if dynamic_sampling:
        kept = [g for g in scored if g.rewards_vary]
        dropped = [g for g in scored if not g.rewards_vary]
    else:
        kept, dropped = list(scored), []
    missing = max(0, batch_size - len(kept))
    return GroupSelection(batch=(kept + dropped[:missing])[:batch_size], enough=len(kept) >= batch_size,
                          dropped=len(dropped), filled=min(missing, len(dropped)), dynamic_sampling=dynamic_sampling)


def collect_groups(score_round: Callable[[int], tuple[list[ScoredGroup], float]], train: TrainConfig
                   ) -> GroupSelection:
    """Rounds of scored groups until the batch is full: `score_round(r)` generates and scores round r's
    `prompts_per_step` fresh prompts and returns them with the seconds the scoring took. Without dynamic sampling:
    one round. With it: rounds until `prompts_per_step` groups with varied rewards are kept or
    `dynamic_sampling_max_rounds` rounds were run (`select_groups` then fills the rest with dropped groups)."""
    max_rounds = train.dynamic_sampling_max_rounds if train.dynamic_sampling else 1
    scored: list[ScoredGroup] = []
    reward_s = 0.0
    for round_ in range(max_rounds):
        groups, seconds = score_round(round_)
        scored += groups
        reward_s += seconds
        selection = select_groups(scored, train.prompts_per_step, train.dynamic_sampling)
        if selection.enough:
            break
    return dataclasses.replace(selection, rounds=round_ + 1, reward_s=reward_s)


def rollout_metrics(rollouts: Sequence[Rollout], batch: Sequence[ScoredGroup]) -> dict:
    """`rollout/*` metrics of one step's batch: reward, accuracy and status fractions over every scored response
    (empty ones included), response length over the rollouts trained on (non-empty responses)."""
    texts = [x for g in batch for x in g.texts]
    results = [x for g in batch for x in g.results]
    n = max(len(results), 1)
    lens = [len(r.response_ids) for r in rollouts]
    return {
        "rollout/reward_mean": sum(r.score for r in results) / n,
        "rollout/accuracy": sum(r.status == "correct" for r in results) / n,
        "rollout/unparseable_frac": sum(r.status == "unparseable" for r in results) / n,
        "rollout/timeout_count": sum(r.status == "timeout" for r in results),
        "rollout/response_length_mean": sum(lens) / max(len(lens), 1),
        "rollout/epistemic_marker_density": epistemic_marker_density(texts),
        "rollout/num_samples": len(results),
    }


# -- trainer ----------------------------------------------------------------------------------------------------------
def _with_local_model(cfg: RunConfig) -> RunConfig:
    """`cfg` with `model.hf_config` resolved to a local folder holding weights and a tokenizer (a hub id is looked up
    in the HF cache, downloaded, or materialised from a packaged offline copy: `model.pretrained`)."""
    path = resolve_pretrained(cfg.model.hf_config)
    if not os.path.isdir(path) or not has_weights(path):
        raise ConfigError(f"model.hf_config={cfg.model.hf_config!r}: training needs a HF model folder with weights "
                          "(*.safetensors) and a tokenizer. Fix: download or convert one and point model.hf_config at "
                          "it")
    if path == cfg.model.hf_config:
        return cfg
    log.info("model.hf_config=%s -> %s", cfg.model.hf_config, path)
    return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, hf_config=path))


def _broadcast_object(obj, src: int = 0):
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


class Trainer:
    """Owns the model, optimizer, data, rollout servers and logs of one run. `run()` trains to `train.steps`."""

    def __init__(self, cfg: RunConfig):
        self.arch = load_hf_architecture(cfg.model.hf_config)
        preflight(cfg, env_world_size(), arch=self.arch)  # the same checks as dasd validate / submit
        cfg = _with_local_model(cfg)
        self.cfg = cfg
        self.ctx = initialize_parallel(cfg.parallel, seed=cfg.model.seed)
        model = build_model(cfg, self.arch)
        self.lora = cfg.model.lora if cfg.model.lora.enabled else None
        if self.lora is not None:
            # LoRA: the frozen base is always the HF folder's; the adapters go on before the DDP wrapper, so only
            # they get gradient buffers and optimizer state (a checkpoint holds the adapters only)
            load_hf_weights(model, open_hf_checkpoint(cfg.model.hf_config))
            apply_lora(model, self.lora, seed=cfg.model.seed)
        self.model = wrap_ddp(model, use_distributed_optimizer=cfg.parallel.use_distributed_optimizer)
        self.optimizer = build_optimizer(self.model, cfg.optim)
        self.teacher = None
        if cfg.train.teacher != "current" and self.lora is not None:
            self.teacher = AdapterTeacher(self.model, cfg.train.teacher, cfg.train.ema_decay)
        elif cfg.train.teacher != "current":
            self.teacher = TeacherWeights(build_model(cfg, self.arch), cfg.train.teacher, cfg.train.ema_decay)
        #: LoRA: the base's identity, stored in every checkpoint and checked on resume (`lora.base_fingerprint`)
        self.base_fingerprint = base_fingerprint(cfg.model.hf_config) if self.lora is not None else None
        self.step_fn = DASDStep(self.model, self.optimizer, cfg, self.arch, self.ctx, teacher=self.teacher)
        self.ckpt_dir = os.path.join(cfg.run_dir, "checkpoints")
        self.step = 0
        self.tokenizer = None
        self.data = None
        self.prompts = None
        self.eval_examples = None
        self.scorer = None
        self.servers = None
        self.client = None
        self.sync = None
        self.logger = None
        #: rank 0, max_staleness >= 1: the thread that generates the next steps' batches
        self.producer: RolloutProducer | None = None
        #: rank 0: finished batches restored from a checkpoint, trained before any new one
        self.pending: list[ProducedBatch] = []
        #: rank 0: the tokenizer and the reward pool are shared by the producer thread and the evaluation
        self._rank0_lock = threading.RLock()

    # -- set-up ------------------------------------------------------------------------------------------------------
    def setup(self) -> "Trainer":
        cfg = self.cfg
        self.tokenizer = load_tokenizer(cfg.model.hf_config)
        self.data = load_math_dataset(cfg.data, self.tokenizer)
        if not self.data.examples:
            raise ConfigError(f"data.source={cfg.data.source!r}: no usable rows. Fix: check the file and schema")
        self.prompts = PromptIterator.from_config(self.data.examples, cfg.data)
        if cfg.train.eval_interval:
            self.eval_examples = self._load_eval_examples()
        meta = load_training_checkpoint(self.ckpt_dir, self.model, self.optimizer, teacher=self._stored_teacher())
        if meta is None:
            if self.lora is None:
                load_hf_weights(self.model, open_hf_checkpoint(cfg.model.hf_config))
            if self.teacher is not None:
                self.teacher.copy_from(self.model)
        else:
            self._check_base(meta)
            self.step = int(meta["step"])
            self.prompts.load_state_dict(meta["prompts"])
            pending = os.path.join(meta["checkpoint_dir"], PENDING_ROLLOUTS)
            if self.ctx.is_logging_rank and os.path.exists(pending):  # batches an async run had generated ahead
                with open(pending) as f:
                    self.pending = pending_from_json(json.load(f), ScoredGroup)
        if self.ctx.is_logging_rank:
            os.makedirs(cfg.run_dir, exist_ok=True)
            with open(os.path.join(cfg.run_dir, "config.json"), "w") as f:
                json.dump(to_dict(cfg), f, indent=2, default=str)
            self._start_rollout()
            self.scorer = RewardScorer(cfg.reward)
            # a fresh start (step 0) drops every earlier line, the step-0 evaluation included: it is redone
            self.logger = MetricsLogger(cfg.run_dir, enabled=True, resume_step=self.step if self.step else -1)
            samples = os.path.join(cfg.run_dir, "samples.jsonl")
            if os.path.exists(samples):  # a resumed run redoes the steps after its checkpoint
                truncate_jsonl_after(samples, self.step)
        if meta is not None or self._adapter_sync:
            # servers start from the HF folder: bring them to the checkpoint's weights (an adapter-only sync also
            # loads the initial adapter, which every request names)
            self.sync_weights()
        return self

    @property
    def _adapter_sync(self) -> bool:
        """LoRA with `model.lora.sync=adapter`: the servers run LoRA and only the adapter is sent."""
        return self.lora is not None and self.lora.sync == "adapter"

    def _stored_teacher(self):
        """What the checkpoint's `teacher/` folder holds: the frozen/EMA network, the EMA adapter, or nothing
        (`current`; LoRA `base`: the base network is the HF folder)."""
        if self.teacher is None or getattr(self.teacher, "mode", None) == "base":
            return None
        return self.teacher if isinstance(self.teacher, AdapterTeacher) else self.teacher.model

    def _check_base(self, meta: dict) -> None:
        """A LoRA checkpoint resumes only on the base it was trained on."""
        if self.lora is None:
            return
        stored = (meta.get("model") or {}).get("base") or {}
        if stored.get("fingerprint") not in (None, self.base_fingerprint):
            raise ConfigError(f"{meta['checkpoint_dir']}: its LoRA adapter was trained on the base "
                              f"{stored.get('path')!r} (fingerprint {stored.get('fingerprint', '')[:12]}), but "
                              f"model.hf_config={self.cfg.model.hf_config!r} holds other weights (fingerprint "
                              f"{self.base_fingerprint[:12]}). Fix: resume with the original base model, or start a "
                              "new run_dir")

    def _start_rollout(self) -> None:
        r = self.cfg.rollout
        urls = list(r.urls)
        if not urls:
            lora = {}
            if self._adapter_sync:  # SGLang's --enable-lora --max-lora-rank --lora-target-modules
                lora = dict(enable_lora=True, max_lora_rank=self.lora.rank,
                            lora_target_modules=tuple(peft_config(self.lora)["target_modules"]))
            servers = tuple(
                ServerConfig(model_path=self.cfg.model.hf_config, port=r.base_port + i, backend=r.backend,
                             tp_size=r.server_tp, mem_fraction_static=r.mem_fraction_static,
                             log_file=os.path.join(self.cfg.run_dir, "logs", f"rollout_server_{i}.log"),
                             env=self._server_env(), **lora)
                for i in range(r.num_servers)
            )
            os.makedirs(os.path.join(self.cfg.run_dir, "logs"), exist_ok=True)
            self.servers = ServerManager(ManagerConfig(servers=servers)).start()
            urls = self.servers.urls
        # a server that fails is checked (and restarted by the manager) at once; its requests are re-sent
        self.client = RolloutClient(urls, ClientConfig(request_timeout_s=r.request_timeout_s,
                                                       lora_path=ADAPTER_NAME if self._adapter_sync else None),
                                    on_server_error=None if self.servers is None else self.servers.report_failure)
        clients = [ServerClient(u, HttpClient()) for u in urls]
        if self._adapter_sync:
            # only the adapter travels (PEFT names): /load_lora_adapter of a PEFT folder, or from tensors
            config = peft_config(self.lora, base_model=self.cfg.model.hf_config)
            if r.transport == "disk":
                transport = AdapterDiskTransport(os.path.join(self.cfg.run_dir, "weights"), ADAPTER_NAME, config,
                                                 keep=2 + r.max_staleness)
            else:
                transport = AdapterTensorTransport(ADAPTER_NAME, config)
        elif r.transport == "disk":
            # the folders of every version a batch not yet trained may come from stay on disk (k + 1 of them, and
            # the newest): a restarted server loads the newest, and samples can be checked against their own weights
            transport = DiskTransport(os.path.join(self.cfg.run_dir, "weights"), base_model_path=self.cfg.model.hf_config,
                                      keep=2 + r.max_staleness)
        elif r.transport == "tensor":
            transport = TensorTransport()
        else:
            transport = self._distributed_transport(urls)
        self.sync = WeightSync(clients, transport)
        if r.transport == "distributed":
            self.sync.connect()  # join the group now: a server that cannot join fails the run before any step

    def _distributed_transport(self, urls: Sequence[str]) -> DistributedTransport:
        """rollout.transport=distributed: the weight-update group of this process (trainer rank 0: group rank 0,
        host of its TCP store) and every server TP rank (ranks 1.., joined over HTTP by `/init_weights_update_group`
        when `_start_rollout` connects). Backend by where the servers hold their weights: gloo for the built-in
        server (CPU; the buckets are copied to CPU, also from a GPU trainer), NCCL for SGLang (GPU to GPU).
        Address and port: `rollout.weight_update_address` / `weight_update_port`, by default 127.0.0.1 for servers
        on this host (the ones `dasd train` launches) or this host's address towards them, and a free port.
        A server that `ServerManager` restarts is not in the group (nor, colocated, released): the next sync to it
        fails with `WeightSyncError` and the run ends (`close` destroys the group on every server that answers)."""
        r = self.cfg.rollout
        backend = "gloo" if r.backend == "builtin" else "nccl"
        address = r.weight_update_address or master_address_for(urls)
        port = r.weight_update_port or free_store_port()
        if backend == "nccl" and os.environ.get("NCCL_CUMEM_ENABLE") != "0":
            log.warning("rollout.transport=distributed over NCCL: SGLang runs with NCCL_CUMEM_ENABLE=0 and this "
                        "process has %r; the group spans both, so export NCCL_CUMEM_ENABLE=0 for the trainer "
                        "(`dasd submit` does)", os.environ.get("NCCL_CUMEM_ENABLE"))
        log.info("weight-update group: %s at %s:%d, %d server(s) of TP %d", backend, address, port, len(urls),
                 r.server_tp)
        return DistributedTransport(master_address=address, master_port=port, backend=backend,
                                    tp_sizes=[r.server_tp] * len(urls), timeout_s=r.request_timeout_s)

    def _server_env(self) -> tuple:
        """The built-in (CPU) server generates while the trainers wait: let it use every core, not the one thread
        torchrun gives each trainer (OMP_NUM_THREADS=1)."""
        if self.cfg.rollout.backend != "builtin" or torch.cuda.is_available():
            return ()
        return (("OMP_NUM_THREADS", str(os.cpu_count() or 1)),)

    # -- phases -------------------------------------------------------------------------------------------------------
    def _sampling(self, max_new_tokens: int, temperature: float, seed_offset: int, top_p=None, top_k=None):
        r = self.cfg.rollout
        eos = self.tokenizer.eos_token_id
        return SamplingConfig(
            max_new_tokens=max_new_tokens, temperature=temperature, top_p=r.top_p if top_p is None else top_p,
            top_k=r.top_k if top_k is None else top_k, stop_token_ids=(eos,) if eos is not None else (),
            seed=None if r.seed is None else r.seed + seed_offset,
        )

    def generate(self, examples=None, round_: int = 0, index: int | None = None, version: int | None = None):
        """Rank 0: G samples for each of `examples` (default: the next `prompts_per_step` prompts) for the batch of
        step `index` (default: this step; it seeds the sampling), generated by weight version `version` (default:
        this step's): once the servers were synced, samples stamped with any other version are re-sent."""
        cfg = self.cfg
        index = self.step if index is None else index
        version = self.step if version is None else version
        if examples is None:
            examples = self.prompts.next_batch(cfg.train.prompts_per_step)
        with self._rank0_lock:
            prompt_ids = [student_prompt(self.tokenizer, ex, cfg.data.prompt)[1] for ex in examples]
        sampling = self._sampling(cfg.train.max_response_tokens, cfg.rollout.temperature,
                                  index + RESAMPLE_ROUND_SEED_STRIDE * round_)
        batch_id = f"step{index}" + (f"r{round_}" if round_ else "")
        # before this process's first sync the servers announce their own label for the weights they started with
        accept = None if self.sync.version is None else (lambda label: version_number(label) == version)
        groups = self.client.generate(prompt_ids, n=cfg.train.samples_per_prompt, sampling=sampling,
                                      batch_id=batch_id, accept_version=accept)
        return examples, prompt_ids, groups

    def reward(self, examples, groups):
        """Rank 0: math-verify rewards for every sample (process pool, parent-enforced deadline)."""
        texts, golds = [], []
        with self._rank0_lock:
            for ex, group in zip(examples, groups):
                for s in group:
                    texts.append(self.tokenizer.decode(list(s.output_ids), skip_special_tokens=True))
                    golds.append(ex.answer)
            results = self.scorer.score(texts, golds)
        return texts, results

    def score_round(self, round_: int, index: int | None = None, version: int | None = None
                    ) -> tuple[list[ScoredGroup], float]:
        """Rank 0: round `round_` of step `index`'s batch (default: this step): the next `prompts_per_step` prompts,
        their G samples (by weight version `version`), decoded and scored; and the seconds the scoring took."""
        examples, prompt_ids, groups = self.generate(round_=round_, index=index, version=version)
        t0 = time.perf_counter()
        texts, results = self.reward(examples, groups)
        reward_s = time.perf_counter() - t0
        G = self.cfg.train.samples_per_prompt
        return [ScoredGroup(ex, pids, group, texts[g * G:(g + 1) * G], results[g * G:(g + 1) * G])
                for g, (ex, pids, group) in enumerate(zip(examples, prompt_ids, groups))], reward_s

    def collect(self) -> tuple[list[ScoredGroup], dict]:
        """Rank 0: the `prompts_per_step` scored groups of this step (`collect_groups`: one round, or dynamic
        sampling's rounds) and their metrics (`timing/reward_s`, and `rollout/ds_*` under dynamic sampling)."""
        selection = collect_groups(self.score_round, self.cfg.train)
        return selection.batch, selection.metrics()

    def produce(self, index: int, version: int) -> tuple[list[ScoredGroup], dict, dict]:
        """Rank 0, the producer thread: step `index`'s scored groups generated by weight version `version`, their
        metrics, and the prompt position after them (`RolloutProducer`'s `produce`)."""
        selection = collect_groups(lambda r: self.score_round(r, index=index, version=version), self.cfg.train)
        return selection.batch, selection.metrics(), self.prompts.state_dict()

    def next_batch(self) -> tuple[list[ScoredGroup], dict, dict]:
        """Rank 0: this step's scored groups, their metrics (`timing/*`, `rollout/ds_*`) and the prompt position
        after them: a batch restored from a checkpoint, else the producer's (max_staleness >= 1; `timing/rollout_s`
        is then the batch's generation time in the background, `timing/rollout_wait_s` how long the trainer
        waited for it), else collected now."""
        t0 = time.perf_counter()
        if self.pending or self.producer is not None:
            made = self.pending.pop(0) if self.pending else self.producer.take(self.step)
            if made.index != self.step:
                raise RuntimeError(f"step {self.step} got the batch of step {made.index}")
            stats = dict(made.stats)
            stats["timing/rollout_wait_s"] = time.perf_counter() - t0
            stats["timing/rollout_s"] = max(0.0, made.finished - made.started - stats.get("timing/reward_s", 0.0))
            return made.groups, stats, made.prompt_state
        batch, stats = self.collect()
        stats["timing/rollout_s"] = time.perf_counter() - t0 - stats["timing/reward_s"]
        return batch, stats, self.prompts.state_dict()

    def start_producer(self) -> None:
        """Rank 0, max_staleness >= 1: start generating ahead, from the batch after the restored ones, under the
        weights on the servers now (this step's)."""
        k = self.cfg.rollout.max_staleness
        if k < 1 or not self.ctx.is_logging_rank or self.step >= self.cfg.train.steps:
            return
        self.producer = RolloutProducer(self.produce, max_staleness=k, total=self.cfg.train.steps,
                                        first_index=self.step + len(self.pending), synced=self.step,
                                        ready=self.pending).start()
        self.pending = []

    def build_rollouts(self, batch: Sequence[ScoredGroup]) -> list[Rollout]:
        """Rank 0: rollouts with teacher prompts (reference solution, else a verified sibling, else the answer);
        `Rollout.group` is the group's position in `batch`. Empty responses are left out."""
        out = []
        for g, sg in enumerate(batch):
            sibling = next((t for t, rr in zip(sg.texts, sg.results) if rr.status == "correct"), None)
            with self._rank0_lock:  # the producer thread encodes with the same tokenizer
                pair = build_prompt_pair(self.tokenizer, sg.example, self.cfg.data.prompt, sibling=sibling)
            for s, rr in zip(sg.samples, sg.results):
                if not s.output_ids:
                    continue
                out.append(Rollout(sg.prompt_ids, pair.teacher_ids, list(s.output_ids), list(s.output_logprobs),
                                   reward=float(rr.score), group=g, weight_version=s.weight_version))
        return out

    def train_step(self, rollouts: list[Rollout]) -> dict:
        """All ranks: GRPO advantages over groups, then the DASD step on this DP rank's share."""
        cfg = self.cfg
        rewards = torch.tensor([r.reward for r in rollouts], dtype=torch.float32)
        groups = torch.tensor([r.group for r in rollouts], dtype=torch.long)
        adv = grpo_advantages(rewards, groups, std_normalize=cfg.loss.advantage_std_normalize,
                              eps=cfg.loss.advantage_eps)
        # Token-balanced shares (Karmarkar-Karp over student + teacher tokens, both forwards run): no DP rank waits
        # for one holding the longest responses. The loss is a global token mean, so the split changes no maths.
        cost = [r.length(False) + r.length(True) for r in rollouts]
        mine = balanced_dp_split(cost, self.ctx.dp)[self.ctx.dp_rank]
        return self.step_fn.run([rollouts[i] for i in mine], mine, adv, step=self.step)

    def release_rollout_memory(self) -> dict:
        """Rank 0, colocated servers (`rollout.colocated`): release the servers' weights and KV cache
        (`WeightSync.release_memory`; they are idle: every rollout of the step has come back) before the DASD step
        trains on the same GPUs. The `sync_weights(resume_memory=True)` after the step resumes them."""
        if not self.cfg.rollout.colocated:
            return {}
        t0 = time.perf_counter()
        self.sync.release_memory()
        return {"timing/release_memory_s": time.perf_counter() - t0}

    def sync_weights(self, resume_memory: bool = False) -> dict:
        """All ranks iterate the exporter (it gathers TP/PP shards); rank 0 sends the buckets to the servers.
        `resume_memory` (after `release_rollout_memory`): on GPUs every rank first hands its cached free memory
        back to the driver and waits for the others, then rank 0's sync resumes the servers' weights, loads the new
        ones and resumes their KV cache (`WeightSync.sync`)."""
        if resume_memory and torch.cuda.is_available():
            torch.cuda.empty_cache()
            dist.barrier()
        if self._adapter_sync:  # the adapter only, in PEFT names (`model/lora.py`)
            buckets = iter_adapter_buckets(self.model, self.arch)
        else:  # every weight (with LoRA: merged, W + alpha/rank B A)
            buckets = iter_hf_weight_buckets(self.model, self.arch)
        if self.ctx.is_logging_rank:
            version = version_label(self.step)
            report = self.sync.sync(buckets, version=version, resume_memory=resume_memory)
            if self.servers is not None and isinstance(self.sync.transport, DiskTransport):
                self.servers.set_weights(self.sync.transport.last_path, version)  # what a restarted server loads
            if self.servers is not None and isinstance(self.sync.transport, AdapterDiskTransport):
                self.servers.set_adapter(ADAPTER_NAME, self.sync.transport.last_path, version)
            return report.metrics()
        drain(buckets)
        return {}

    def checkpoint(self) -> None:
        cfg = self.cfg
        model_meta = {"hf_config": cfg.model.hf_config, "teacher": cfg.train.teacher,
                      "params_dtype": cfg.precision.params_dtype,
                      "layout": {"tensor": self.ctx.tp, "pipeline": self.ctx.pp, "context": self.ctx.cp,
                                 "data": self.ctx.dp}}
        if self.lora is not None:  # the checkpoint holds the adapters; the base is this folder
            model_meta["lora"] = dataclasses.asdict(self.lora)
            model_meta["base"] = {"path": cfg.model.hf_config, "fingerprint": self.base_fingerprint}
        # max_staleness >= 1: the batches generated ahead are stored, and the prompt position is the one after them
        # (a batch still in progress is regenerated on resume: the checkpoint's weights are the ones generating it)
        pending = self.producer.pending() if self.producer is not None else self.pending
        prompts = self.producer.resume_state() if self.producer is not None else self.prompts.state_dict()
        extra = {PENDING_ROLLOUTS: json.dumps(pending_to_json(pending))} if pending else {}
        save_training_checkpoint(self.ckpt_dir, self.step, self.model, self.optimizer,
                                 {"prompts": prompts, "model": model_meta}, extra_files=extra,
                                 keep_last=cfg.train.keep_last_checkpoints, teacher=self._stored_teacher(),
                                 hf_dir=cfg.model.hf_config)

    # -- evaluation ---------------------------------------------------------------------------------------------------
    def _load_eval_examples(self):
        t = self.cfg.train
        dcfg = dataclasses.replace(self.cfg.data, source=t.eval_source, split=t.eval_split, limit=t.eval_limit,
                                   shuffle=False, dedupe=False, name=None)
        examples = load_math_dataset(dcfg, self.tokenizer).examples
        if not examples:
            raise ConfigError(f"train.eval_source={t.eval_source!r}: no usable rows. Fix: check the file and "
                              "data.schema (evaluation reads it with the training data's schema)")
        return examples

    def evaluate(self) -> dict:
        """Rank 0: `eval_samples` answers per evaluation problem from the servers (greedy by default), scored like
        training rollouts. Metrics under `eval/`; every answer's record (problem row, its kind where the problems
        are easy arithmetic, extracted answer, status) in `eval_records/step_XXXXXXXX.jsonl` (`dasd sweep-report`
        reads them for accuracy by kind)."""
        t = self.cfg.train
        t0 = time.perf_counter()
        with self._rank0_lock:
            prompt_ids = [student_prompt(self.tokenizer, ex, self.cfg.data.prompt)[1] for ex in self.eval_examples]
        greedy = t.eval_temperature == 0
        sampling = self._sampling(t.max_response_tokens, t.eval_temperature, EVAL_SEED_OFFSET + self.step,
                                  top_p=1.0 if greedy else None, top_k=-1 if greedy else None)
        groups = self.client.generate(prompt_ids, n=t.eval_samples, sampling=sampling, batch_id=f"eval{self.step}")
        texts, results = self.reward(self.eval_examples, groups)
        G = t.eval_samples
        self._write_step_jsonl("eval_records", [
            {"index": ex.index, "sample": j, "problem": ex.problem, "kind": kind_of(ex.problem),
             "extracted": results[i * G + j].extracted, "status": results[i * G + j].status}
            for i, ex in enumerate(self.eval_examples) for j in range(G)])
        n = max(len(results), 1)
        lens = [len(s.output_ids) for g in groups for s in g]
        return {
            "eval/accuracy": sum(r.status == "correct" for r in results) / n,
            "eval/reward_mean": sum(r.score for r in results) / n,
            "eval/unparseable_frac": sum(r.status == "unparseable" for r in results) / n,
            "eval/response_length_mean": sum(lens) / max(len(lens), 1),
            "eval/num_problems": len(self.eval_examples),
            "timing/eval_s": time.perf_counter() - t0,
        }

    def _save_rollouts(self, rollouts: Sequence[Rollout]) -> None:
        """Rank 0, `train.save_rollouts`: the step's trained rollouts in `rollouts/step_XXXXXXXX.jsonl` (numbered
        like its metrics; a resumed run rewrites the steps it redoes)."""
        if self.cfg.train.save_rollouts:
            self._write_step_jsonl("rollouts", [
                {"group": r.group, "reward": r.reward, "weight_version": r.weight_version,
                 "prompt_ids": list(r.prompt_ids), "response_ids": list(r.response_ids),
                 "rollout_logprobs": list(r.rollout_logprobs)} for r in rollouts])

    def _write_step_jsonl(self, folder: str, rows: Sequence[dict]) -> None:
        """`run_dir/folder/step_XXXXXXXX.jsonl` (this step), written whole or not at all."""
        folder = os.path.join(self.cfg.run_dir, folder)
        os.makedirs(folder, exist_ok=True)
        path = os.path.join(folder, f"step_{self.step:08d}.jsonl")
        with open(path + ".tmp", "w") as f:
            f.writelines(json.dumps(row, default=str) + "\n" for row in rows)
        os.replace(path + ".tmp", path)

    def _log_samples(self, batch: Sequence[ScoredGroup]) -> None:
        """Rank 0: the first group of the step just taken (problem, gold, responses, rewards), appended to
        samples.jsonl under the step number its metrics carry."""
        if not batch:
            return
        first = batch[0]
        rec = {"step": self.step, "problem": first.example.problem, "answer": first.example.answer,
               "responses": [{"text": tx, "reward": r.score, "status": r.status, "extracted": r.extracted}
                             for tx, r in zip(first.texts, first.results)]}
        with open(os.path.join(self.cfg.run_dir, "samples.jsonl"), "a") as f:
            f.write(json.dumps(rec, default=str) + "\n")

    # -- the loop -----------------------------------------------------------------------------------------------------
    def run(self) -> list[dict]:
        """Train from `self.step` to `train.steps` (evaluating the starting policy first on a fresh run); returns
        every step's metrics."""
        cfg = self.cfg
        history = []
        console = Console(stderr=True, quiet=not self.ctx.is_logging_rank)
        with Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                      TimeElapsedColumn(), TimeRemainingColumn(), console=console) as progress:
            console.print(f"layout {layout_summary(cfg, self.arch, self.ctx.world_size)} | model {cfg.model.hf_config}"
                          f" | data {len(self.data.examples)} problems"
                          + (f" | resuming after step {self.step}" if self.step else ""),
                          soft_wrap=True, highlight=False)
            task = progress.add_task("DASD training", total=cfg.train.steps, completed=self.step)
            if cfg.train.eval_interval and self.step == 0 and self.ctx.is_logging_rank:
                base = self.evaluate()  # where the policy starts
                self.logger.log(0, base)
                console.print(f"step 0 | eval accuracy {base['eval/accuracy']:.1%} on "
                              f"{base['eval/num_problems']} problems | {base['timing/eval_s']:.1f}s",
                              soft_wrap=True, highlight=False)
            self.start_producer()
            while self.step < cfg.train.steps:
                history.append(self.train_one_step(console))
                progress.update(task, advance=1)
        return history

    def train_one_step(self, console: Console) -> dict:
        """One DASD step, all ranks: rank 0 collects the scored groups and builds the rollouts, which every rank
        receives; then the DASD step, weight sync, evaluation (every `eval_interval` steps and at the last), logging
        (before the checkpoint: a run killed in between redoes this step from the previous checkpoint, and the
        logger drops the lines after it, so no record is lost or duplicated) and checkpoint. Returns the metrics."""
        cfg = self.cfg
        t0 = time.perf_counter()
        metrics: dict = {}
        payload = None
        if self.ctx.is_logging_rank:
            batch, collect_stats, prompt_state = self.next_batch()
            rollouts = self.build_rollouts(batch)
            metrics.update(rollout_metrics(rollouts, batch))
            metrics.update(staleness_metrics([version_number(r.weight_version) for r in rollouts], self.step,
                                             cfg.rollout.max_staleness))
            metrics.update(collect_stats)
            payload = (rollouts, prompt_state)
            metrics.update(self.release_rollout_memory())  # before any rank starts training on the GPUs
        rollouts, prompt_state = _broadcast_object(payload)
        # rank 0 drew the prompts (a variable number under dynamic sampling): every rank takes its position
        if not self.ctx.is_logging_rank:
            self.prompts.load_state_dict(prompt_state)
        t2 = time.perf_counter()
        out = self._loss_on_rank0(self.train_step(rollouts))
        metrics.update({k: v for k, v in out.items() if isinstance(v, (int, float))})
        metrics["timing/train_s"] = time.perf_counter() - t2
        self.step += 1
        if self.producer is not None:  # the batches the outgoing weights generate must be done first
            t3 = time.perf_counter()
            self.producer.wait_before_sync(self.step)
            metrics["timing/sync_wait_s"] = time.perf_counter() - t3
        t3 = time.perf_counter()
        metrics.update(self.sync_weights(resume_memory=cfg.rollout.colocated))
        metrics["timing/sync_s"] = time.perf_counter() - t3
        if self.producer is not None:
            self.producer.synced(self.step)
        if cfg.train.eval_interval and (self.step % cfg.train.eval_interval == 0
                                        or self.step == cfg.train.steps) and self.ctx.is_logging_rank:
            metrics.update(self.evaluate())
        metrics["timing/step_s"] = time.perf_counter() - t0
        if self.ctx.is_logging_rank:
            self.logger.log(self.step, metrics)
            self._log_samples(batch)
            self._save_rollouts(rollouts)
            console.print(self.logger.console_line(self.step, metrics), soft_wrap=True, highlight=False)
        if cfg.train.checkpoint_interval and (self.step % cfg.train.checkpoint_interval == 0
                                              or self.step == cfg.train.steps):
            self.checkpoint()
        return metrics

    def _loss_on_rank0(self, out: dict) -> dict:
        """The step's outputs as the last pipeline stage computed them (the loss lives there): with PP > 1 every
        rank gathers all outputs and takes the first that has `loss/dasd`."""
        if self.ctx.pp == 1:
            return out
        outs = [None] * self.ctx.world_size
        dist.all_gather_object(outs, out)
        return next((o for o in outs if "loss/dasd" in o), out)

    def close(self) -> None:
        """End of the run, or its error: close the weight sync (the weight-update group: servers' end over HTTP,
        bounded by `DistributedTransport.close_timeout_s`, then ours), the reward pool, the servers, the log, the
        parallel state. Every part is closed even when an earlier one fails (logged: the run's own error, if
        any, is the one raised)."""
        if self.producer is not None:
            self.producer.close()
            self.producer = None
        parts = (("weight sync", self.sync, "close"), ("reward scorer", self.scorer, "close"),
                 ("rollout servers", self.servers, "stop"), ("metrics log", self.logger, "close"))
        for what, obj, method in parts:
            if obj is None:
                continue
            try:
                getattr(obj, method)()
            except Exception:  # noqa: BLE001 - keep closing the rest
                log.exception("closing the %s failed", what)
        self.sync = self.scorer = self.servers = self.logger = None
        destroy_parallel()


def train(cfg: RunConfig) -> list[dict]:
    trainer = Trainer(cfg)
    try:
        return trainer.setup().run()
    finally:
        trainer.close()
