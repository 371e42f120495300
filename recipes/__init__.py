"""Recipes: plain functions returning a complete, validated-on-launch run (`dasd_megatron.launch.spec.Recipe`).

    from recipes import get_recipe, list_recipes
    recipe = get_recipe("qwen3_4b_dasd_2node_h100_bf16")      # .config (RunConfig), .trainer, .placement

A name says what the recipe fixes: model, method (dasd / grpo / opsd, see `recipes.methods`), nodes, hardware and
precision. Launch one with `dasd submit --recipe NAME --executor local|slurm [--dryrun] key=value ...`.
"""

from recipes import qwen3, smollm2, tiny  # noqa: F401  (importing registers the recipes)
from recipes.registry import get_recipe, list_recipes, register

__all__ = ["get_recipe", "list_recipes", "register"]
