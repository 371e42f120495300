"""`dasd train`: the DASD training loop, one method per phase.

    generate -> reward -> teacher prompts -> advantages -> DASD step (score, train, optimizer) -> sync -> log ->
    checkpoint

Roles: every rank trains (megatron TP x PP x DP). Rank 0 also drives the rollout servers (launching the built-in
server where SGLang is absent), scores rewards in its process pool and writes logs; the rollouts are broadcast to
all ranks. Weights reach the servers after every step through the streaming exporter (TP/PP gathered onto rank 0)
and the configured transport. The policy starts from the HF folder `model.hf_config` (its safetensors are imported
into megatron's layout); a run folder with checkpoints resumes from the newest complete one.
"""

from __future__ import annotations

import json
import logging
import os
import time
from typing import Optional

import torch
import torch.distributed as dist

from dasd_megatron.config import ConfigError, RunConfig, to_dict
from dasd_megatron.train.batch import Rollout

log = logging.getLogger(__name__)


def _with_local_model(cfg: RunConfig) -> RunConfig:
    """`cfg` with `model.hf_config` resolved to a local folder holding weights and a tokenizer (a hub id is looked up
    in the HF cache, downloaded, or materialised from a packaged offline copy: `model.pretrained`)."""
    import dataclasses

    from dasd_megatron.model.pretrained import has_weights, resolve_pretrained

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
        from dasd_megatron.model.builder import build_model
        from dasd_megatron.model.hf_config import load_hf_architecture
        from dasd_megatron.parallel import env_world_size, initialize_parallel
        from dasd_megatron.train.dasd_step import DASDStep, check_supported
        from dasd_megatron.train.engine import build_optimizer, wrap_ddp

        self.arch = load_hf_architecture(cfg.model.hf_config)
        cfg.validate_layout(env_world_size(), self.arch)
        check_supported(cfg)
        cfg = _with_local_model(cfg)
        self.cfg = cfg
        self.ctx = initialize_parallel(cfg.parallel, seed=cfg.model.seed)
        self.model = wrap_ddp(build_model(cfg, self.arch),
                              use_distributed_optimizer=cfg.parallel.use_distributed_optimizer)
        self.optimizer = build_optimizer(self.model, cfg.optim)
        self.teacher = None
        if cfg.train.teacher != "current":
            from dasd_megatron.train.teacher import TeacherWeights

            self.teacher = TeacherWeights(build_model(cfg, self.arch), cfg.train.teacher, cfg.train.ema_decay)
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

    # -- set-up ------------------------------------------------------------------------------------------------------
    def setup(self) -> "Trainer":
        from dasd_megatron.data import PromptIterator, load_math_dataset, load_tokenizer
        from dasd_megatron.model.hf_import import load_hf_weights, open_hf_checkpoint
        from dasd_megatron.train.checkpoint import load_training_checkpoint

        cfg = self.cfg
        self.tokenizer = load_tokenizer(cfg.model.hf_config)
        self.data = load_math_dataset(cfg.data, self.tokenizer)
        if not self.data.examples:
            raise ConfigError(f"data.source={cfg.data.source!r}: no usable rows. Fix: check the file and schema")
        self.prompts = PromptIterator.from_config(self.data.examples, cfg.data)
        if cfg.train.eval_interval:
            self.eval_examples = self._load_eval_examples()
        meta = load_training_checkpoint(self.ckpt_dir, self.model, self.optimizer,
                                        teacher=None if self.teacher is None else self.teacher.model)
        if meta is None:
            load_hf_weights(self.model, open_hf_checkpoint(cfg.model.hf_config))
            if self.teacher is not None:
                self.teacher.copy_from(self.model)
        else:
            self.step = int(meta["step"])
            self.prompts.load_state_dict(meta["prompts"])
        if self.ctx.is_logging_rank:
            os.makedirs(cfg.run_dir, exist_ok=True)
            with open(os.path.join(cfg.run_dir, "config.json"), "w") as f:
                json.dump(to_dict(cfg), f, indent=2, default=str)
            self._start_rollout()
            from dasd_megatron.reward import RewardScorer
            from dasd_megatron.train.metrics_log import MetricsLogger, truncate_jsonl_after

            self.scorer = RewardScorer(cfg.reward)
            # a fresh start (step 0) drops every earlier line, the step-0 evaluation included: it is redone
            self.logger = MetricsLogger(cfg.run_dir, enabled=True, resume_step=self.step if self.step else -1)
            samples = os.path.join(cfg.run_dir, "samples.jsonl")
            if os.path.exists(samples):  # a resumed run redoes the steps after its checkpoint
                truncate_jsonl_after(samples, self.step)
        if meta is not None:
            self.sync_weights()  # servers start from the HF folder; bring them to the checkpoint's weights
        return self

    def _start_rollout(self) -> None:
        from sglang_rollout.rollout_client import ClientConfig, RolloutClient
        from sglang_rollout.http_client import HttpClient
        from sglang_rollout.manager import ManagerConfig, ServerConfig, ServerManager
        from sglang_rollout.server_client import ServerClient
        from sglang_rollout.weight_sync.sync import WeightSync
        from sglang_rollout.weight_sync.transports import DiskTransport, TensorTransport

        r = self.cfg.rollout
        urls = list(r.urls)
        if not urls:
            servers = tuple(
                ServerConfig(model_path=self.cfg.model.hf_config, port=r.base_port + i, backend=r.backend,
                             tp_size=r.server_tp, mem_fraction_static=r.mem_fraction_static,
                             log_file=os.path.join(self.cfg.run_dir, "logs", f"rollout_server_{i}.log"),
                             env=self._server_env())
                for i in range(r.num_servers)
            )
            os.makedirs(os.path.join(self.cfg.run_dir, "logs"), exist_ok=True)
            self.servers = ServerManager(ManagerConfig(servers=servers)).start()
            urls = self.servers.urls
        self.client = RolloutClient(urls, ClientConfig(request_timeout_s=r.request_timeout_s))
        clients = [ServerClient(u, HttpClient()) for u in urls]
        if r.transport == "disk":
            transport = DiskTransport(os.path.join(self.cfg.run_dir, "weights"), base_model_path=self.cfg.model.hf_config)
        elif r.transport == "tensor":
            transport = TensorTransport()
        else:
            raise ConfigError("rollout.transport='distributed' is driven by the multi-node launcher; "
                              "Fix: use disk or tensor for single-node runs")
        self.sync = WeightSync(clients, transport)

    def _server_env(self) -> tuple:
        """The built-in (CPU) server generates while the trainers wait: let it use every core, not the one thread
        torchrun gives each trainer (OMP_NUM_THREADS=1)."""
        if self.cfg.rollout.backend != "builtin" or torch.cuda.is_available():
            return ()
        return (("OMP_NUM_THREADS", str(os.cpu_count() or 1)),)

    # -- phases -------------------------------------------------------------------------------------------------------
    def _sampling(self, max_new_tokens: int, temperature: float, seed_offset: int, top_p=None, top_k=None):
        from sglang_rollout.rollout_client import SamplingConfig

        r = self.cfg.rollout
        eos = self.tokenizer.eos_token_id
        return SamplingConfig(
            max_new_tokens=max_new_tokens, temperature=temperature, top_p=r.top_p if top_p is None else top_p,
            top_k=r.top_k if top_k is None else top_k, stop_token_ids=(eos,) if eos is not None else (),
            seed=None if r.seed is None else r.seed + seed_offset,
        )

    def generate(self, examples=None, round_: int = 0):
        """Rank 0: G samples for each of `examples` (default: the next `prompts_per_step` prompts)."""
        from dasd_megatron.data import student_prompt

        cfg = self.cfg
        if examples is None:
            examples = self.prompts.next_batch(cfg.train.prompts_per_step)
        prompt_ids = [student_prompt(self.tokenizer, ex, cfg.data.prompt)[1] for ex in examples]
        # seeds differ per step and per dynamic-sampling round (round 0 keeps the seeds of runs without it)
        sampling = self._sampling(cfg.train.max_response_tokens, cfg.rollout.temperature,
                                  self.step + 100_003 * round_)
        batch_id = f"step{self.step}" + (f"r{round_}" if round_ else "")
        groups = self.client.generate(prompt_ids, n=cfg.train.samples_per_prompt, sampling=sampling,
                                      batch_id=batch_id)
        return examples, prompt_ids, groups

    def reward(self, examples, groups):
        """Rank 0: math-verify rewards for every sample (process pool, parent-enforced deadline)."""
        texts, golds = [], []
        for ex, group in zip(examples, groups):
            for s in group:
                texts.append(self.tokenizer.decode(list(s.output_ids), skip_special_tokens=True))
                golds.append(ex.answer)
        results = self.scorer.score(texts, golds)
        return texts, results

    def collect(self):
        """Rank 0: `prompts_per_step` groups of G scored samples. Without dynamic sampling: one round. With it:
        rounds of `prompts_per_step` fresh prompts, keeping the groups whose rewards differ, until enough are kept
        or `dynamic_sampling_max_rounds` is reached (then dropped groups fill the rest, oldest first)."""
        t = self.cfg.train
        G = t.samples_per_prompt
        kept, dropped = [], []
        rounds, reward_s = 0, 0.0
        while rounds < (t.dynamic_sampling_max_rounds if t.dynamic_sampling else 1):
            examples, prompt_ids, groups = self.generate(round_=rounds)
            tr = time.perf_counter()
            texts, results = self.reward(examples, groups)
            reward_s += time.perf_counter() - tr
            rounds += 1
            for g, (ex, pids, group) in enumerate(zip(examples, prompt_ids, groups)):
                item = (ex, pids, group, texts[g * G:(g + 1) * G], results[g * G:(g + 1) * G])
                varied = len({r.score for r in item[4]}) > 1
                (kept if varied or not t.dynamic_sampling else dropped).append(item)
            if len(kept) >= t.prompts_per_step:
                break
        filled = max(0, t.prompts_per_step - len(kept))
        batch = (kept + dropped[:filled])[: t.prompts_per_step]
        stats = {"timing/reward_s": reward_s}
        if t.dynamic_sampling:
            stats.update({"rollout/ds_rounds": rounds, "rollout/ds_dropped_groups": len(dropped),
                          "rollout/ds_filled_groups": min(filled, len(dropped))})
        return [list(col) for col in zip(*batch)], stats

    def build_rollouts(self, examples, prompt_ids, groups, texts, results) -> list[Rollout]:
        """Rank 0: rollouts with teacher prompts (reference solution, else a verified sibling, else the answer).
        `texts[g]` / `results[g]` are the G decoded responses / rewards of group g."""
        from dasd_megatron.data import build_prompt_pair

        out = []
        for g, (ex, pids, group) in enumerate(zip(examples, prompt_ids, groups)):
            res, txt = results[g], texts[g]
            sibling = next((t for t, rr in zip(txt, res) if rr.status == "correct"), None)
            pair = build_prompt_pair(self.tokenizer, ex, self.cfg.data.prompt, sibling=sibling)
            for s, rr in zip(group, res):
                if not s.output_ids:
                    continue
                out.append(Rollout(pids, pair.teacher_ids, list(s.output_ids), list(s.output_logprobs),
                                   reward=float(rr.score), group=g, weight_version=s.weight_version))
        return out

    def train_step(self, rollouts: list[Rollout]) -> dict:
        """All ranks: GRPO advantages over groups, then the DASD step on this DP rank's share."""
        from dasd_megatron.loss import grpo_advantages

        cfg = self.cfg
        rewards = torch.tensor([r.reward for r in rollouts], dtype=torch.float32)
        groups = torch.tensor([r.group for r in rollouts], dtype=torch.long)
        adv = grpo_advantages(rewards, groups, std_normalize=cfg.loss.advantage_std_normalize,
                              eps=cfg.loss.advantage_eps)
        mine = list(range(len(rollouts)))[self.ctx.dp_rank::self.ctx.dp]
        return self.step_fn.run([rollouts[i] for i in mine], mine, adv, step=self.step)

    def sync_weights(self) -> dict:
        """All ranks iterate the exporter (it gathers TP/PP shards); rank 0 sends the buckets to the servers."""
        from dasd_megatron.model.export import iter_hf_weight_buckets
        from sglang_rollout.weight_sync.sync import drain

        buckets = iter_hf_weight_buckets(self.model, self.arch)
        if self.ctx.is_logging_rank:
            report = self.sync.sync(buckets, version=f"step{self.step}")
            return report.metrics()
        drain(buckets)
        return {}

    def checkpoint(self) -> None:
        from dasd_megatron.train.checkpoint import save_training_checkpoint

        cfg = self.cfg
        model_meta = {"hf_config": cfg.model.hf_config, "teacher": cfg.train.teacher,
                      "params_dtype": cfg.precision.params_dtype,
                      "layout": {"tensor": self.ctx.tp, "pipeline": self.ctx.pp, "context": self.ctx.cp,
                                 "data": self.ctx.dp}}
        save_training_checkpoint(self.ckpt_dir, self.step, self.model, self.optimizer,
                                 {"prompts": self.prompts.state_dict(), "model": model_meta},
                                 keep_last=cfg.train.keep_last_checkpoints,
                                 teacher=None if self.teacher is None else self.teacher.model,
                                 hf_dir=cfg.model.hf_config)

    # -- evaluation ---------------------------------------------------------------------------------------------------
    def _load_eval_examples(self):
        import dataclasses

        from dasd_megatron.data import load_math_dataset

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
        training rollouts. Metrics under `eval/`."""
        from dasd_megatron.data import student_prompt

        t = self.cfg.train
        t0 = time.perf_counter()
        prompt_ids = [student_prompt(self.tokenizer, ex, self.cfg.data.prompt)[1] for ex in self.eval_examples]
        greedy = t.eval_temperature == 0
        sampling = self._sampling(t.max_response_tokens, t.eval_temperature, 7_919 + self.step,
                                  top_p=1.0 if greedy else None, top_k=-1 if greedy else None)
        groups = self.client.generate(prompt_ids, n=t.eval_samples, sampling=sampling, batch_id=f"eval{self.step}")
        texts, results = self.reward(self.eval_examples, groups)
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

    def _log_samples(self, examples, texts, results) -> None:
        """Rank 0: the first group of the step just taken (problem, gold, responses, rewards), appended to
        samples.jsonl under the step number its metrics carry."""
        if not examples:
            return
        rec = {"step": self.step, "problem": examples[0].problem, "answer": examples[0].answer,
               "responses": [{"text": tx, "reward": r.score, "status": r.status, "extracted": r.extracted}
                             for tx, r in zip(texts[0], results[0])]}
        with open(os.path.join(self.cfg.run_dir, "samples.jsonl"), "a") as f:
            f.write(json.dumps(rec, default=str) + "\n")

    # -- the loop -----------------------------------------------------------------------------------------------------
    def run(self) -> list[dict]:
        from rich.console import Console
        from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

        from dasd_megatron.train.run_report import epistemic_marker_density

        cfg = self.cfg
        history = []
        console = Console(stderr=True, quiet=not self.ctx.is_logging_rank)
        with Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                      TimeElapsedColumn(), TimeRemainingColumn(), console=console) as progress:
            from dasd_megatron.model.builder import layout_summary

            console.print(f"layout {layout_summary(cfg, self.arch, self.ctx.world_size)} | model {cfg.model.hf_config}"
                          f" | data {len(self.data.examples)} problems"
                          + (f" | resuming after step {self.step}" if self.step else ""),
                          soft_wrap=True, highlight=False)
            task = progress.add_task("DASD training", total=cfg.train.steps, completed=self.step)
            if cfg.train.eval_interval and self.step == 0 and self.ctx.is_logging_rank:
                base = self.evaluate()  # where the policy starts
                self.logger.log(0, base)
                progress.console.print(f"step 0 | eval accuracy {base['eval/accuracy']:.1%} on "
                                       f"{base['eval/num_problems']} problems | {base['timing/eval_s']:.1f}s",
                                       soft_wrap=True, highlight=False)
            while self.step < cfg.train.steps:
                t0 = time.perf_counter()
                metrics: dict = {}
                payload = None
                if self.ctx.is_logging_rank:
                    (examples, prompt_ids, groups, texts, results), ds_stats = self.collect()
                    t1 = time.perf_counter()
                    rollouts = self.build_rollouts(examples, prompt_ids, groups, texts, results)
                    flat_texts = [x for g in texts for x in g]
                    flat_results = [x for g in results for x in g]
                    metrics.update(self._rollout_metrics(rollouts, flat_texts, flat_results,
                                                         epistemic_marker_density))
                    metrics.update(ds_stats)
                    metrics["timing/rollout_s"] = t1 - t0 - ds_stats["timing/reward_s"]
                    sample = (examples, texts, results)
                    payload = (rollouts, self.prompts.state_dict())
                rollouts, prompt_state = _broadcast_object(payload)
                # rank 0 drew the prompts (a variable number under dynamic sampling): every rank takes its position
                if not self.ctx.is_logging_rank:
                    self.prompts.load_state_dict(prompt_state)
                t2 = time.perf_counter()
                out = self.train_step(rollouts)
                if self.ctx.pp > 1:  # the loss lives on the last pipeline stage: bring it to rank 0
                    outs = [None] * self.ctx.world_size
                    dist.all_gather_object(outs, out)
                    out = next((o for o in outs if "loss/dasd" in o), out)
                metrics.update({k: v for k, v in out.items() if isinstance(v, (int, float))})
                metrics["timing/train_s"] = time.perf_counter() - t2
                self.step += 1
                t3 = time.perf_counter()
                metrics.update(self.sync_weights())
                metrics["timing/sync_s"] = time.perf_counter() - t3
                if cfg.train.eval_interval and (self.step % cfg.train.eval_interval == 0
                                                or self.step == cfg.train.steps) and self.ctx.is_logging_rank:
                    metrics.update(self.evaluate())
                metrics["timing/step_s"] = time.perf_counter() - t0
                # logged before the checkpoint: a run killed in between redoes this step from the previous
                # checkpoint, and the logger drops the lines after it, so no record is lost or duplicated
                if self.ctx.is_logging_rank:
                    self.logger.log(self.step, metrics)
                    self._log_samples(*sample)
                    progress.console.print(self.logger.console_line(self.step, metrics), soft_wrap=True,
                                           highlight=False)
                if cfg.train.checkpoint_interval and (self.step % cfg.train.checkpoint_interval == 0
                                                      or self.step == cfg.train.steps):
                    self.checkpoint()
                history.append(metrics)
                progress.update(task, advance=1)
        return history

    @staticmethod
    def _rollout_metrics(rollouts, texts, results, marker_density) -> dict:
        n = max(len(results), 1)
        lens = [len(r.response_ids) for r in rollouts]
        return {
            "rollout/reward_mean": sum(r.score for r in results) / n,
            "rollout/accuracy": sum(r.status == "correct" for r in results) / n,
            "rollout/unparseable_frac": sum(r.status == "unparseable" for r in results) / n,
            "rollout/timeout_count": sum(r.status == "timeout" for r in results),
            "rollout/response_length_mean": sum(lens) / max(len(lens), 1),
            "rollout/epistemic_marker_density": marker_density(texts),
            "rollout/num_samples": len(results),
        }

    def close(self) -> None:
        if self.scorer is not None:
            self.scorer.close()
        if self.servers is not None:
            self.servers.stop()
        if self.logger is not None:
            self.logger.close()
        from dasd_megatron.parallel import destroy_parallel

        destroy_parallel()


def train(cfg: RunConfig) -> list[dict]:
    trainer = Trainer(cfg)
    try:
        return trainer.setup().run()
    finally:
        trainer.close()
