"""Qwen3-1.7B / 4B / 8B recipes for 8-GPU H100 (80 GB) nodes: DASD and, from the same functions, the GRPO and OPSD
baselines (`recipes.methods`), in bf16 and (with Transformer Engine) FP8.

From docs/METHOD.md: the method and its defaults (rho 0.2 'upper', tanh router with gate, beta 1.0, PPO clip
0.2 / 0.28, truncated IS cap 2.0, teacher = current policy), training data DAPO-Math-17k, the three model sizes.
METHOD.md gives no batch sizes, lengths, learning rate or step counts; ours, shared by every GPU recipe:

* training data DAPO-Math-17k from the hub (`BytedTsinghua-SIA/DAPO-Math-17k`, verl schema; override `data.source`
  with a local copy, e.g. ../shared/data/dapo_math_17k/dapo_math_17k.parquet, on clusters without hub access);
* 64 prompts x 8 samples (G = 8) per step, 300 steps (~1.1 epochs of DAPO-Math-17k's ~17.4k prompts), two PPO
  updates per batch (`train.updates_per_batch=2`: mini-batches of 256 rollouts, the paper's neighbouring recipes'
  ratio of train batch 256 to PPO mini-batch 128);
* prompts up to 1024 tokens, responses up to 8192 (Qwen3 thinking traces on AIME-level problems are long);
* packed micro-batches of 16384 student tokens, model.seq_length 16384 (the privileged teacher prompt must fit the
  same budget: the trainer packs teacher sequences with it);
* AdamW lr 1e-6, weight decay 0.1, 10 warm-up steps, grad clip 1.0 (DAPO's values);
* rollout temperature 1.0 for training (loss.temperature must equal it); METHOD.md's 0.6 / top-p 0.95 is for eval;
* evaluation and checkpoints every 25 steps;
* rollouts by placement: servers on their own nodes (the 8B recipe) generate the next batch while the trainer trains
  (`rollout.max_staleness=1`: samples one policy version old, corrected by the truncated IS weight); colocated
  servers (1.7B, 4B) release their GPU memory while the trainer holds the GPUs, so they cannot generate then and run
  synchronously (`rollout.max_staleness=0`).

Layouts (ours): all trainer layouts use sequence parallelism with TP and the distributed optimizer; FP8 is
E4M3/E5M2 'hybrid' with delayed scaling through the TE layer spec.
"""

from __future__ import annotations

from dataclasses import replace
from functools import partial

from dasd_megatron.config import DataConfig, LoRAConfig, ModelConfig, ParallelConfig, PrecisionConfig, RunConfig
from dasd_megatron.launch.placement import RolloutPlacement, TrainerResources
from dasd_megatron.launch.spec import Recipe
from dasd_megatron.train.config import TrainConfig
from dasd_megatron.train.config import OptimConfig, RolloutConfig
from recipes.methods import METHODS, loss_for
from recipes.models import QWEN3_1P7B, QWEN3_4B, QWEN3_8B
from recipes.registry import register

H100_GPUS_PER_NODE = 8
DAPO_MATH_17K = "BytedTsinghua-SIA/DAPO-Math-17k"
"""The training set (METHOD.md), by hub name; `dasd_megatron.data` loads it with `datasets`."""
SEQ_LENGTH = 16384
PRECISIONS = ("bf16", "fp8")


def _precision(precision: str) -> tuple[PrecisionConfig, str]:
    """(precision config, attention backend) for 'bf16' or 'fp8'."""
    if precision == "bf16":
        return PrecisionConfig(params_dtype="bfloat16"), "auto"
    if precision == "fp8":
        return PrecisionConfig(params_dtype="bfloat16", fp8="hybrid", fp8_recipe="delayed"), "te"
    raise ValueError(f"precision={precision!r}: use one of {PRECISIONS}")


def _qwen3(name: str, hub_id: str, method: str, precision: str, parallel: ParallelConfig,
           trainer: TrainerResources, placement: RolloutPlacement, doc: str) -> Recipe:
    prec, backend = _precision(precision)
    config = RunConfig(
        model=ModelConfig(hf_config=hub_id, seq_length=SEQ_LENGTH, attention_backend=backend),
        parallel=parallel,
        precision=prec,
        loss=loss_for(method, temperature=1.0),
        optim=OptimConfig(lr=1e-6, weight_decay=0.1, clip_grad=1.0, warmup_steps=10),
        train=TrainConfig(steps=300, prompts_per_step=64, samples_per_prompt=8, max_prompt_tokens=1024,
                          max_response_tokens=8192, micro_batch_tokens=SEQ_LENGTH, teacher="current", updates_per_batch=2,
                          eval_interval=0, checkpoint_interval=25, keep_last_checkpoints=2),  # eval: `dasd eval` on checkpoints
        data=DataConfig(source=DAPO_MATH_17K, schema="dapo"),
        # colocated servers release their memory while training (synchronous); separate ones generate meanwhile
        rollout=RolloutConfig(colocated=placement.colocated, max_staleness=0 if placement.colocated else 1),
        run_dir=f"runs/{name}",
    )
    summary = doc.strip().splitlines()[0]
    return Recipe(name=name, config=config, trainer=trainer, placement=placement,
                  description=f"{summary} Method: {method}; precision: {precision}.")


def qwen3_1p7b_1node_h100(method: str = "dasd", precision: str = "bf16") -> Recipe:
    """Qwen3-1.7B on one 8-GPU H100 node, rollout servers colocated on the trainer's GPUs.

    Trainer: TP 2 (+SP) x DP 4. Servers: 8 per node, TP 1 each, mem-fraction 0.6 (released while training).
    """
    return _qwen3(f"qwen3_1p7b_{method}_1node_h100_{precision}", QWEN3_1P7B, method, precision,
                  ParallelConfig(tensor=2, sequence_parallel=True, use_distributed_optimizer=True),
                  TrainerResources(nodes=1, procs_per_node=H100_GPUS_PER_NODE, accelerator="gpu"),
                  RolloutPlacement(mode="colocated", servers_per_node=8, tensor_parallel=1,
                                   mem_fraction_static=0.6),
                  qwen3_1p7b_1node_h100.__doc__)


def qwen3_4b_2node_h100(method: str = "dasd", precision: str = "bf16") -> Recipe:
    """Qwen3-4B on two 8-GPU H100 nodes, rollout servers colocated on the trainer's GPUs.

    Trainer: TP 2 (+SP) x CP 2 x DP 4 = 16 GPUs. Servers: 8 per node (16 in all), TP 1 each, mem-fraction 0.6.
    """
    return _qwen3(f"qwen3_4b_{method}_2node_h100_{precision}", QWEN3_4B, method, precision,
                  ParallelConfig(tensor=2, context=2, sequence_parallel=True, use_distributed_optimizer=True),
                  TrainerResources(nodes=2, procs_per_node=H100_GPUS_PER_NODE, accelerator="gpu"),
                  RolloutPlacement(mode="colocated", servers_per_node=8, tensor_parallel=1,
                                   mem_fraction_static=0.6),
                  qwen3_4b_2node_h100.__doc__)


def qwen3_8b_2node_2rollout_h100(method: str = "dasd", precision: str = "bf16") -> Recipe:
    """Qwen3-8B on two 8-GPU H100 trainer nodes plus two 8-GPU H100 rollout nodes (a heterogeneous SLURM job).

    Trainer: TP 4 (+SP) x CP 2 x DP 2 = 16 GPUs. Servers: 4 per rollout node (8 in all), TP 2 each,
    mem-fraction 0.85; weights are broadcast to them over NCCL after every step. Rollouts are asynchronous
    (`rollout.max_staleness=1`): the rollout nodes generate batch s+1 while the trainer nodes train batch s.
    """
    return _qwen3(f"qwen3_8b_{method}_2node_2rollout_h100_{precision}", QWEN3_8B, method, precision,
                  ParallelConfig(tensor=4, context=2, sequence_parallel=True, use_distributed_optimizer=True),
                  TrainerResources(nodes=2, procs_per_node=H100_GPUS_PER_NODE, accelerator="gpu"),
                  RolloutPlacement(mode="separate", nodes=2, servers_per_node=4, tensor_parallel=2,
                                   gpus_per_node=H100_GPUS_PER_NODE, mem_fraction_static=0.85),
                  qwen3_8b_2node_2rollout_h100.__doc__)


def qwen3_8b_lora_1node_1rollout_h100(method: str = "dasd") -> Recipe:
    """Qwen3-8B with LoRA (rank 32 on qkv/proj/fc1/fc2, alpha 64) on one 8-GPU H100 trainer node plus one rollout node.

    Trainer: TP 2 (+SP) x CP 2 x DP 2 = 8 GPUs: the frozen bf16 base (16.4 GB, split by TP) and 73M adapter
    parameters (0.9%) with their fp32 grads, master copy and Adam moments (~1.2 GB in all instead of ~147 GB), so
    half the trainer nodes of the full recipe. Learning rate 1e-5 (10x the full recipe's, the usual LoRA practice under alpha/rank scaling).
    Servers: 4 on the rollout node, TP 2 each, started with LoRA enabled; after every step only the adapter
    (175 MB in bf16 PEFT form, where q/k/v and gate/up carry copies of the fused A, vs 16.4 GB of weights) is written as a PEFT folder in the run folder (shared file
    system) and loaded by `/load_lora_adapter`; every request names it. Teacher: the base network with the adapter
    disabled (`train.teacher=base`, no extra memory). Asynchronous rollouts as the full 8B recipe.
    """
    name = f"qwen3_8b_{method}_lora_1node_1rollout_h100_bf16"
    recipe = _qwen3(name, QWEN3_8B, method, "bf16",
                    ParallelConfig(tensor=2, context=2, sequence_parallel=True, use_distributed_optimizer=True),
                    TrainerResources(nodes=1, procs_per_node=H100_GPUS_PER_NODE, accelerator="gpu"),
                    RolloutPlacement(mode="separate", nodes=1, servers_per_node=4, tensor_parallel=2,
                                     gpus_per_node=H100_GPUS_PER_NODE, mem_fraction_static=0.85),
                    qwen3_8b_lora_1node_1rollout_h100.__doc__)
    c = recipe.config
    config = replace(c, model=replace(c.model, lora=LoRAConfig(rank=32, alpha=64.0)),
                     optim=replace(c.optim, lr=1e-5),
                     train=replace(c.train, teacher="base" if method != "grpo" else "current"),
                     rollout=replace(c.rollout, transport="disk"))
    return replace(recipe, config=config)


for _method in METHODS:
    register(f"qwen3_1p7b_{_method}_1node_h100_bf16", partial(qwen3_1p7b_1node_h100, _method, "bf16"))
    register(f"qwen3_4b_{_method}_2node_h100_bf16", partial(qwen3_4b_2node_h100, _method, "bf16"))
    register(f"qwen3_8b_{_method}_2node_2rollout_h100_bf16", partial(qwen3_8b_2node_2rollout_h100, _method, "bf16"))
register("qwen3_4b_dasd_2node_h100_fp8", partial(qwen3_4b_2node_h100, "dasd", "fp8"))
register("qwen3_8b_dasd_2node_2rollout_h100_fp8", partial(qwen3_8b_2node_2rollout_h100, "dasd", "fp8"))
register("qwen3_8b_dasd_lora_1node_1rollout_h100_bf16", partial(qwen3_8b_lora_1node_1rollout_h100, "dasd"))
