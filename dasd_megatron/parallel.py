"""The one place that initialises torch.distributed and megatron-core's parallel state.

`initialize_parallel(cfg)` -> `ParallelContext`: gloo on CPU, NCCL on GPU (one device per local rank), then
megatron's TP/PP/CP/DP groups (sequence parallelism is a TransformerConfig flag on top of TP) and the model-parallel
RNG seeds. Config errors are raised before any process group is created: call `RunConfig.validate_layout` first
(the CLI does) — `initialize_parallel` re-checks the world-size product itself.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from dasd_megatron.config import ParallelConfig
from dasd_megatron.megatron_compat import apply_cpu_compat, cuda_available

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ParallelContext:
    """Where this process sits. Groups are read from megatron's parallel_state (created once, here)."""

    rank: int
    world_size: int
    tp: int
    pp: int
    cp: int
    dp: int
    tp_rank: int
    pp_rank: int
    cp_rank: int
    dp_rank: int
    device: torch.device

    @property
    def tp_group(self):
        from megatron.core import parallel_state as ps

        return ps.get_tensor_model_parallel_group()

    @property
    def cp_group(self):
        from megatron.core import parallel_state as ps

        return ps.get_context_parallel_group()

    @property
    def dp_group(self):
        from megatron.core import parallel_state as ps

        return ps.get_data_parallel_group()

    @property
    def dp_cp_group(self):
        from megatron.core import parallel_state as ps

        return ps.get_data_parallel_group(with_context_parallel=True)

    @property
    def pp_group(self):
        from megatron.core import parallel_state as ps

        return ps.get_pipeline_model_parallel_group()

    @property
    def is_first_stage(self) -> bool:
        return self.pp_rank == 0

    @property
    def is_last_stage(self) -> bool:
        return self.pp_rank == self.pp - 1

    @property
    def is_logging_rank(self) -> bool:
        """Rank 0 of the world: the one that prints and writes run-level files."""
        return self.rank == 0


def env_world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def initialize_parallel(cfg: ParallelConfig, *, seed: int = 1234, timeout_minutes: int = 30) -> ParallelContext:
    """Initialise torch.distributed (if not yet) and megatron's parallel state for `cfg`."""
    from dasd_megatron.launch.orphans import install_launcher_watch

    install_launcher_watch()  # a torchrun rank exits when its launcher is gone (no orphans holding GPUs and ports)
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    world_size = dist.get_world_size() if dist.is_initialized() else env_world_size()
    dp = cfg.data_parallel_size(world_size)  # raises a ConfigError before any group exists
    on_gpu = cuda_available()
    if not on_gpu:
        apply_cpu_compat()
    if on_gpu:
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local_rank)
    if not dist.is_initialized():
        if "MASTER_ADDR" not in os.environ:  # a plain single process: make a group of one
            os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
            from dasd_megatron.testing.distributed import free_port

            os.environ.setdefault("MASTER_PORT", str(free_port()))
            os.environ.setdefault("RANK", "0")
            os.environ.setdefault("WORLD_SIZE", "1")
        dist.init_process_group(
            "nccl" if on_gpu else "gloo", timeout=timedelta(minutes=timeout_minutes)
        )
    ps.initialize_model_parallel(
        tensor_model_parallel_size=cfg.tensor,
        pipeline_model_parallel_size=cfg.pipeline,
        context_parallel_size=cfg.context,
        distributed_timeout_minutes=timeout_minutes,
    )
    model_parallel_cuda_manual_seed(seed)
    ctx = ParallelContext(
        rank=dist.get_rank(),
        world_size=world_size,
        tp=cfg.tensor,
        pp=cfg.pipeline,
        cp=cfg.context,
        dp=dp,
        tp_rank=ps.get_tensor_model_parallel_rank(),
        pp_rank=ps.get_pipeline_model_parallel_rank(),
        cp_rank=ps.get_context_parallel_rank(),
        dp_rank=ps.get_data_parallel_rank(),
        device=torch.device("cuda", torch.cuda.current_device()) if on_gpu else torch.device("cpu"),
    )
    log.info("parallel state: %s", ctx)
    return ctx


def destroy_parallel() -> None:
    from megatron.core import parallel_state as ps

    ps.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()
