"""Training-loop configuration (the DASD step: batch sizes, teacher weights, intervals) and the optimizer's."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, Optional

from dasd_megatron.errors import config_error


@dataclass(frozen=True)
class TrainConfig:
    steps: int = 20
    """Optimizer steps (one rollout batch each)."""
    prompts_per_step: int = 8
    """Prompts per step over the whole job (all DP ranks)."""
    samples_per_prompt: int = 8
    """G: rollouts per prompt (the GRPO group)."""
    max_prompt_tokens: int = 512
    max_response_tokens: int = 1024
    micro_batch_tokens: int = 4096
    """Token budget of one packed micro-batch (student sequences; the teacher's are packed the same way)."""
    updates_per_batch: int = 1
    """PPO mini-batches: optimizer steps per rollout batch. Each DP rank's rollouts are split, in order, into this
    many mini-batches and the policy takes one optimizer step on each. Old log-probs are the policy's before the
    first update (a scoring pass), so from the second update on the PPO ratio moves and `loss.clip_eps_low` /
    `loss.clip_eps_high` act. 1: on-policy, one step per batch (the ratio is 1). The paper's neighbouring recipes
    (train batch 256, PPO mini-batch 128) use 2."""
    teacher: Literal["current", "frozen", "ema", "base"] = "current"
    """Teacher weights: the current policy (METHOD.md default), the frozen initial policy, or an EMA of the policy.
    With LoRA (`model.lora.rank > 0`): 'base' is the base network with the adapter disabled (the frozen initial
    policy at no extra memory: the adapter starts at zero), and 'ema' an EMA of the adapter on the shared base."""
    ema_decay: float = 0.99
    dynamic_sampling: bool = False
    """DAPO's dynamic sampling: drop prompt groups whose G rewards are all equal (zero GRPO advantage) and draw
    more prompts until `prompts_per_step` groups with varied rewards are collected."""
    dynamic_sampling_max_rounds: int = 4
    """Generation rounds per step under dynamic sampling; when they do not yield enough varied groups, the batch is
    filled with the dropped groups (their reward term is zero, their distillation term is not) and the shortfall is
    logged as `rollout/ds_filled_groups`."""
    eval_interval: int = 0
    """Steps between evaluations on `eval_source` (0: never). With it on, the run also evaluates before the first
    step and after the last, so the log shows where the policy started and ended."""
    eval_source: str = ""
    """The evaluation problems: a local file / hub name read with the training data's schema and field mapping."""
    eval_split: str = "test"
    """Hub split (or the file name prefix in a local folder) of `eval_source`."""
    eval_limit: int = 64
    """Evaluate on the first `eval_limit` problems of `eval_source` (in file order)."""
    eval_samples: int = 1
    """Samples per evaluation problem."""
    eval_temperature: float = 0.0
    """Sampling temperature of evaluation (0: greedy, one deterministic answer per problem)."""
    checkpoint_interval: int = 10
    keep_last_checkpoints: int = 2
    save_rollouts: bool = False
    """Write every step's trained rollouts (prompt and response token ids, the engine's log-probs, the weight version
    that generated them, reward, group) to `run_dir/rollouts/step_XXXXXXXX.jsonl`: for debugging the sampler and for
    checking the sync invariant per weight version offline."""
    seed: int = 1234

    def __post_init__(self) -> None:
        for name in ("steps", "prompts_per_step", "samples_per_prompt", "max_prompt_tokens", "max_response_tokens",
                     "micro_batch_tokens", "updates_per_batch"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1:
                raise config_error(f"train.{name}", v, "must be an integer >= 1", "set a positive value")
        if self.samples_per_prompt < 2:
            raise config_error("train.samples_per_prompt", self.samples_per_prompt,
                               "GRPO needs at least 2 samples per prompt to compare them", "use 2 or more (8 is usual)")
        if self.micro_batch_tokens < self.max_prompt_tokens + self.max_response_tokens:
            raise config_error(
                "train.micro_batch_tokens", self.micro_batch_tokens,
                f"must hold one whole sequence (max_prompt_tokens + max_response_tokens = "
                f"{self.max_prompt_tokens + self.max_response_tokens})",
                f"set train.micro_batch_tokens >= {self.max_prompt_tokens + self.max_response_tokens}",
            )
        if self.teacher not in ("current", "frozen", "ema", "base"):
            raise config_error("train.teacher", self.teacher, "unknown teacher mode",
                               "use current, frozen, ema or base (LoRA)")
        if not 0.0 < self.ema_decay < 1.0:
            raise config_error("train.ema_decay", self.ema_decay, "must be in (0, 1)", "use e.g. 0.99")
        for name in ("eval_interval", "checkpoint_interval", "keep_last_checkpoints"):
            if getattr(self, name) < 0:
                raise config_error(f"train.{name}", getattr(self, name), "must be >= 0", "use 0 to disable")
        for name in ("dynamic_sampling_max_rounds", "eval_limit", "eval_samples"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise config_error(f"train.{name}", v, "must be an integer >= 1", "set a positive value")
        if not isinstance(self.eval_temperature, (int, float)) or self.eval_temperature < 0:
            raise config_error("train.eval_temperature", self.eval_temperature, "must be >= 0",
                               "use 0 for greedy evaluation")
        if not isinstance(self.save_rollouts, bool):
            raise config_error("train.save_rollouts", self.save_rollouts, "must be true or false",
                               "set train.save_rollouts=true to write each step's rollouts")
        if self.eval_interval and not self.eval_source:
            raise config_error("train.eval_source", self.eval_source, "train.eval_interval > 0 needs problems to "
                               "evaluate on", "set train.eval_source to a file or hub name, or train.eval_interval=0")


@dataclass(frozen=True)
class OptimConfig:
    lr: float = 1e-6
    """Peak learning rate: reached at the end of warm-up, then held (constant) or decayed to `min_lr`."""
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_eps: float = 1e-8
    clip_grad: float = 1.0
    warmup_steps: int = 0
    """Linear learning-rate warm-up from lr/warmup_steps to lr over the first `warmup_steps` steps."""
    lr_schedule: Literal["constant", "cosine", "linear"] = "constant"
    """After warm-up: hold `lr` (constant), or decay it to `min_lr` along a half cosine or a line, reaching `min_lr`
    at the last decay step and holding it after. The formulas are megatron's OptimizerParamScheduler's
    (`--lr-decay-style`), with its 1-based step count: optimizer step `s` (0-based) is its step s + 1."""
    min_lr: float = 0.0
    """The learning rate a decaying schedule ends at (megatron's `--min-lr`)."""
    decay_steps: int = 0
    """Steps from the start of training (warm-up included) to the end of the decay; 0: `train.steps`, so the last
    training step runs at `min_lr` (megatron's `--lr-decay-iters`, which defaults to `--train-iters`). A run resumed
    with a larger `train.steps` therefore re-stretches a decay that follows `train.steps`; give `decay_steps`
    explicitly to fix it."""

    def decay_end(self, train_steps: int | None) -> int:
        """The step count (1-based) at which the decay reaches `min_lr`: `decay_steps`, or `train_steps` when it is 0.
        Raises a ConfigError when that leaves no step to decay over (the warm-up covers it)."""
        end = self.decay_steps or train_steps
        if end is None:
            raise ValueError("OptimConfig.decay_end: optim.decay_steps=0 follows train.steps; pass train_steps")
        if end <= self.warmup_steps:
            field = "optim.decay_steps" if self.decay_steps else "train.steps"
            raise config_error(
                field, end,
                f"optim.lr_schedule={self.lr_schedule} decays after optim.warmup_steps={self.warmup_steps}, so the "
                "decay must end after the warm-up", f"make it larger than {self.warmup_steps}, lower "
                "optim.warmup_steps, or use optim.lr_schedule=constant",
            )
        return end

    def lr_at(self, step: int, train_steps: int | None = None) -> float:
        """Learning rate of optimizer step `step` (0-based) in a run of `train_steps` steps (needed only by a decay
        that follows train.steps). A function of the step number alone, so a resumed run (whose step number comes
        from the checkpoint) continues the schedule exactly."""
        n = step + 1  # megatron's step count: the first optimizer step is step 1
        if self.warmup_steps > 0 and n <= self.warmup_steps:
            return self.lr * (n / self.warmup_steps)
        if self.lr_schedule == "constant":
            return self.lr
        end = self.decay_end(train_steps)
        if n >= end:
            return self.min_lr
        ratio = (n - self.warmup_steps) / (end - self.warmup_steps)
        coeff = 0.5 * (math.cos(math.pi * ratio) + 1.0) if self.lr_schedule == "cosine" else 1.0 - ratio
        return self.min_lr + coeff * (self.lr - self.min_lr)

    def __post_init__(self) -> None:
        if self.lr <= 0:
            raise config_error("optim.lr", self.lr, "must be > 0", "use e.g. 1e-6 for RL fine-tuning")
        if not 0 <= self.adam_beta1 < 1 or not 0 <= self.adam_beta2 < 1:
            raise config_error("optim.adam_beta1/2", (self.adam_beta1, self.adam_beta2), "must be in [0, 1)",
                               "use 0.9 / 0.999")
        if self.clip_grad < 0:
            raise config_error("optim.clip_grad", self.clip_grad, "must be >= 0", "use 0 to disable clipping")
        for name in ("warmup_steps", "decay_steps"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise config_error(f"optim.{name}", v, "must be an integer >= 0", "use 0 to disable")
        if self.lr_schedule not in ("constant", "cosine", "linear"):
            raise config_error("optim.lr_schedule", self.lr_schedule, "unknown schedule",
                               "use constant, cosine or linear")
        if not isinstance(self.min_lr, (int, float)) or isinstance(self.min_lr, bool) or not 0 <= self.min_lr <= self.lr:
            raise config_error("optim.min_lr", self.min_lr, f"must be in [0, optim.lr={self.lr}]",
                               "use e.g. optim.lr / 10, or 0")
        if self.lr_schedule == "constant":
            # a decay setting under a constant schedule would be silently ignored: say so instead
            for name in ("min_lr", "decay_steps"):
                if getattr(self, name):
                    raise config_error(f"optim.{name}", getattr(self, name),
                                       "only a decaying schedule uses it, and optim.lr_schedule=constant",
                                       f"set optim.lr_schedule=cosine or linear, or leave optim.{name}=0")
        elif self.decay_steps:
            self.decay_end(None)  # an explicit decay_steps must end after the warm-up


@dataclass(frozen=True)
class RolloutConfig:
    """Where rollouts come from and how weights reach the servers."""

    backend: Literal["builtin", "sglang"] = "builtin"
    """'builtin': the CPU rollout server launched by the trainer; 'sglang': SGLang servers (launched here, or
    given by `urls`)."""
    urls: tuple = ()
    """Already-running servers (http://host:port); empty = launch `num_servers` of `backend` on this node."""
    num_servers: int = 1
    base_port: int = 31000
    server_tp: int = 1
    mem_fraction_static: Optional[float] = None
    temperature: float = 1.0
    """Sampling temperature of training rollouts; must equal loss.temperature (the loss applies it)."""
    top_p: float = 1.0
    top_k: int = -1
    transport: Literal["disk", "tensor", "distributed"] = "disk"
    """How weights reach the servers after each step: 'disk' (a safetensors folder per sync, loaded by every server),
    'tensor' (CUDA-IPC / shared memory; servers on this host), 'distributed' (a broadcast over a weight-update
    process group whose rank 0 is trainer rank 0 and whose other ranks are the servers' TP ranks: gloo for the
    built-in server, which holds its weights on CPU, NCCL for SGLang)."""
    weight_update_address: str = ""
    """transport=distributed: the address the servers reach trainer rank 0 at (it hosts the group's TCP store).
    Empty: 127.0.0.1 when every server URL is a loopback one (servers launched by `dasd train`), else the address of
    this host's interface that routes to the first server."""
    weight_update_port: int = 0
    """transport=distributed: the TCP store's port on trainer rank 0; 0 picks a free one when the run starts."""
    colocated: bool = False
    """The servers share the trainer's GPUs (recipes with placement 'colocated' set it). Before each training step
    the loop releases the servers' memory (`/release_memory_occupation`: weights and KV cache); the next weight sync
    resumes the weights before loading the new ones and the KV cache after them."""
    request_timeout_s: float = 600.0
    seed: Optional[int] = 1234
    max_staleness: int = 0
    """Asynchronous rollouts with bounded staleness (`dasd_megatron.train.async_rollout`). 0: the synchronous loop
    (generate, train, sync, repeat). k >= 1: trainer rank 0 generates the next steps' batches while the trainer trains;
    step s trains on samples generated by the weights of step max(0, s - k) (staleness <= k, exactly k once the
    pipeline is full), and the truncated IS weight corrects for it. A step then takes about
    max(generate, train) + sync. Needs servers that can generate while the trainer trains: not `colocated` ones."""

    def __post_init__(self) -> None:
        if self.backend not in ("builtin", "sglang"):
            raise config_error("rollout.backend", self.backend, "unknown backend", "use builtin or sglang")
        if self.num_servers < 1 and not self.urls:
            raise config_error("rollout.num_servers", self.num_servers, "must be >= 1", "use 1 or more")
        if self.temperature <= 0:
            raise config_error("rollout.temperature", self.temperature, "must be > 0 for RL rollouts",
                               "use 1.0 (and the same loss.temperature)")
        if self.transport not in ("disk", "tensor", "distributed"):
            raise config_error("rollout.transport", self.transport, "unknown transport",
                               "use disk, tensor or distributed")
        if isinstance(self.weight_update_port, bool) or not isinstance(self.weight_update_port, int) \
                or not 0 <= self.weight_update_port <= 65535:
            raise config_error("rollout.weight_update_port", self.weight_update_port, "must be a port in 0..65535",
                               "use 0 to pick a free port")
        if not isinstance(self.colocated, bool):
            raise config_error("rollout.colocated", self.colocated, "must be true or false",
                               "set it to whether the servers share the trainer's GPUs")
        if isinstance(self.max_staleness, bool) or not isinstance(self.max_staleness, int) or self.max_staleness < 0:
            raise config_error("rollout.max_staleness", self.max_staleness, "must be an integer >= 0",
                               "use 0 (synchronous) or 1 (generate the next batch while training)")
        if self.colocated and self.max_staleness:
            raise config_error("rollout.max_staleness", self.max_staleness, "colocated servers (rollout.colocated) "
                               "release their GPU memory while the trainer trains on the same GPUs, so they cannot "
                               "generate meanwhile", "use rollout.max_staleness=0 with colocated servers, or servers "
                               "on their own GPUs/nodes")
        if self.colocated and self.backend == "sglang" and self.transport == "distributed":
            raise config_error("rollout.transport", self.transport, "colocated SGLang servers share trainer rank 0's "
                               "GPU, and NCCL refuses two ranks of one group on the same GPU",
                               "use rollout.transport=tensor (CUDA IPC) for colocated servers")
