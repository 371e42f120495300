"""`Recipe`: what a recipe function returns — the complete run config plus where its processes run.

Dotted overrides address the run config as `dasd smoke` does (`parallel.tensor=2`, `train.steps=10`), and the two
launch parts by their own prefixes: `trainer.nodes=2`, `placement.servers_per_node=4` (see
`dasd_megatron.launch.placement`). Unknown fields fail with the list of valid ones.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from dasd_megatron.config import ConfigError, RunConfig, apply_overrides
from dasd_megatron.launch.placement import RolloutPlacement, TrainerResources

LAUNCH_PREFIXES = ("trainer", "placement")


@dataclass(frozen=True)
class Recipe:
    """A named, complete run: `config` (what to train), `trainer` and `placement` (where it runs)."""

    name: str
    config: RunConfig
    trainer: TrainerResources
    placement: RolloutPlacement
    description: str = ""
    """One paragraph: what the recipe fixes, and which values are ours rather than the paper's."""

    @property
    def world_size(self) -> int:
        return self.trainer.world_size

    @property
    def total_nodes(self) -> int:
        """Nodes the whole job allocates (trainer nodes + rollout-only nodes)."""
        return self.trainer.nodes + (self.placement.nodes if self.placement.mode == "separate" else 0)

    def with_overrides(self, overrides: list[str] | tuple[str, ...]) -> "Recipe":
        """A copy with dotted `key=value` overrides applied; `trainer.*` and `placement.*` go to the launch parts.
        Their order does not matter (see `apply_in_valid_order`)."""
        config_items, launch_items = [], []
        for item in overrides:
            head = item.split("=", 1)[0].strip().split(".", 1)[0]
            (launch_items if head in LAUNCH_PREFIXES else config_items).append(item)
        config, _ = apply_in_valid_order(self.config, config_items)
        recipe, _ = apply_in_valid_order(dataclasses.replace(self, config=config), launch_items)
        return recipe


def apply_in_valid_order(cfg, overrides: list[str]):
    """Apply dotted overrides in an order in which every intermediate config is valid; returns (cfg, that order).

    `apply_overrides` validates after each item, so `train.max_response_tokens=8192 train.micro_batch_tokens=16384`
    fails in that order (the first item alone breaks micro_batch_tokens >= prompt + response) but not in the other.
    Items that fail are retried after the others; when none of the rest can go alone they are applied together
    (two fields that must change at once); an unknown field or a value that is wrong in every order raises the
    error of the first item that cannot be placed.
    """
    pending, order = list(overrides), []
    while pending:
        first_error = None
        for item in pending:
            try:
                cfg = apply_overrides(cfg, [item])
            except (ConfigError, ValueError) as e:
                first_error = first_error or e
                continue
            order.append(item)
            pending.remove(item)
            break
        else:
            # items that are only valid together (loss.temperature and rollout.temperature must be equal):
            # `apply_overrides` applies a list at once, so the rest goes in as one group
            try:
                cfg = apply_overrides(cfg, pending)
            except (ConfigError, ValueError):
                raise first_error from None
            order += pending
            pending = []
    return cfg, order
