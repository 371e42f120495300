"""CPU recipes on a tiny Qwen3-shaped model, for `dasd submit --job smoke` on any machine.

The model is a config only (`recipes/hf_configs/tiny-qwen3`: random weights, no tokenizer), so these recipes run
the smoke job (a few LM steps at the recipe's layout, through the same launcher); the trainer needs a model with
weights and a tokenizer, and the preflight refuses them as train jobs (`dasd_megatron/preflight.py`). The trainable
CPU recipes are `smollm2_135m_*_cpu`.
"""

from __future__ import annotations

from functools import partial

from dasd_megatron.config import ModelConfig, ParallelConfig, PrecisionConfig, RunConfig
from dasd_megatron.launch.placement import RolloutPlacement, TrainerResources
from dasd_megatron.launch.spec import Recipe
from dasd_megatron.train.config import TrainConfig
from dasd_megatron.train.config import OptimConfig
from recipes.methods import METHODS, loss_for
from recipes.models import TINY_QWEN3
from recipes.registry import register


def tiny_qwen3_cpu(method: str = "dasd") -> Recipe:
    """Tiny Qwen3 (4 layers, hidden 64, vocabulary 1024, random weights), `method`'s config, smoke job on one CPU node.

    Two trainer processes at tensor parallel 2 (gloo), fp32, torch SDPA attention, the built-in rollout server.
    Batch sizes and lengths are chosen for a run of a few seconds per step on 2 cores, not for learning anything:
    2 prompts x 4 samples, 32 prompt + 32 response tokens, 64-token micro-batches, 4 steps.
    """
    name = f"tiny_qwen3_{method}_cpu"
    config = RunConfig(
        model=ModelConfig(hf_config=TINY_QWEN3, seq_length=64, attention_backend="sdpa"),
        parallel=ParallelConfig(tensor=2),
        precision=PrecisionConfig(params_dtype="float32"),
        loss=loss_for(method),
        optim=OptimConfig(lr=1e-3),
        train=TrainConfig(steps=4, prompts_per_step=2, samples_per_prompt=4, max_prompt_tokens=32,
                          max_response_tokens=32, micro_batch_tokens=64, checkpoint_interval=0),
        run_dir=f"runs/{name}",
    )
    return cpu_recipe(name, config, tiny_qwen3_cpu.__doc__, method)


def cpu_recipe(name: str, config: RunConfig, doc: str, method: str) -> Recipe:
    """A recipe on one CPU node: two trainer processes and the built-in rollout server; the description is the
    first line of the recipe function's docstring with `method` filled in."""
    return Recipe(
        name=name,
        config=config,
        trainer=TrainerResources(nodes=1, procs_per_node=2, accelerator="cpu"),
        placement=RolloutPlacement(mode="builtin", servers_per_node=1),
        description=doc.strip().splitlines()[0].replace("`method`", method),
    )


for _method in METHODS:
    register(f"tiny_qwen3_{_method}_cpu", partial(tiny_qwen3_cpu, _method))
