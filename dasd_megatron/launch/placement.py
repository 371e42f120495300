"""Where a job's processes run: the trainer's nodes, and the rollout servers' layout.

`TrainerResources` says how many nodes the trainer gets and how many processes (one per GPU, or CPU processes) run on
each; its product is the world size the parallel layout is validated against.

`RolloutPlacement` says where the rollout servers run and how they are laid out:

* ``colocated``: on the trainer's own nodes and GPUs. Every trainer node runs ``servers_per_node`` servers of
  ``tensor_parallel`` GPUs each; server ``i`` uses GPUs ``[i*tp, (i+1)*tp)``, so trainer local rank ``r`` shares its
  GPU with server ``r // tp`` (what CUDA-IPC weight sync needs). Servers release weights/KV cache while training.
* ``separate``: on ``nodes`` nodes of their own (a heterogeneous SLURM job: group 0 the trainer, group 1 the
  servers), each with ``gpus_per_node`` GPUs; weights reach them by NCCL broadcast.
* ``builtin``: the CPU built-in server (``sglang_rollout.builtin_server``), one per trainer node, for CPU recipes.

Ports: server ``i`` on a node listens on ``base_port + i * port_stride + offset``, where ``offset`` is the job's port
offset (``DASD_PORT_OFFSET``, set per SLURM job so jobs sharing a node do not collide; 0 elsewhere). How the trainer
finds the servers is described in `dasd_megatron.launch.rendezvous`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from dasd_megatron.config import config_error

PLACEMENT_MODES = ("colocated", "separate", "builtin")
MAX_PORT_OFFSET = 9900
"""Largest per-job port offset (`dasd_megatron.launch.environment` draws it in steps of 100 below this)."""


@dataclass(frozen=True)
class TrainerResources:
    """The trainer's share of the job: `nodes` x `procs_per_node` processes (one per GPU on GPU nodes)."""

    nodes: int = 1
    procs_per_node: int = 1
    """Trainer processes per node; on GPU nodes also the GPUs per node the job asks for."""
    accelerator: Literal["cpu", "gpu"] = "cpu"

    def __post_init__(self) -> None:
        for name in ("nodes", "procs_per_node"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise config_error(f"trainer.{name}", v, "must be an integer >= 1", "set a positive count")
        if self.accelerator not in ("cpu", "gpu"):
            raise config_error("trainer.accelerator", self.accelerator, "unknown accelerator", "use cpu or gpu")

    @property
    def world_size(self) -> int:
        return self.nodes * self.procs_per_node

    @property
    def gpus_per_node(self) -> int:
        return self.procs_per_node if self.accelerator == "gpu" else 0


@dataclass(frozen=True)
class RolloutPlacement:
    """Layout of the rollout servers (see the module docstring for the three modes)."""

    mode: Literal["colocated", "separate", "builtin"] = "builtin"
    nodes: int = 0
    """Nodes holding only rollout servers (mode 'separate'); 0 otherwise."""
    servers_per_node: int = 1
    tensor_parallel: int = 1
    """GPUs (SGLang --tp-size) of each server."""
    gpus_per_node: int = 0
    """GPUs of each rollout node (mode 'separate'); colocated servers use the trainer's GPUs."""
    base_port: int = 30000
    port_stride: int = 10
    """Distance between the HTTP ports of servers on one node (SGLang opens a few more ports near its own)."""
    mem_fraction_static: float = 0.8
    """SGLang --mem-fraction-static: share of GPU memory for weights + KV cache."""
    nccl_cumem_enable: bool = False
    """NCCL_CUMEM_ENABLE for trainer and servers alike. SGLang sets 0 in its processes; the NCCL weight-update group
    spans both sides, so the trainer must use the same value."""

    def __post_init__(self) -> None:
        if self.mode not in PLACEMENT_MODES:
            raise config_error("placement.mode", self.mode, "unknown placement", f"use one of {PLACEMENT_MODES}")
        for name in ("nodes", "gpus_per_node"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise config_error(f"placement.{name}", v, "must be an integer >= 0", "use 0 or a positive count")
        for name in ("servers_per_node", "tensor_parallel", "port_stride"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise config_error(f"placement.{name}", v, "must be an integer >= 1", "set a positive count")
        if not 0.0 < self.mem_fraction_static < 1.0:
            raise config_error("placement.mem_fraction_static", self.mem_fraction_static, "must be in (0, 1)",
                               "use e.g. 0.8 on rollout-only nodes, 0.5-0.7 when colocated")
        last = self.base_port + (self.servers_per_node - 1) * self.port_stride + MAX_PORT_OFFSET
        if self.base_port < 1024 or last > 65535:
            raise config_error("placement.base_port", self.base_port,
                               f"ports {self.base_port}..{last} (servers, strides and the per-job offset up to "
                               f"{MAX_PORT_OFFSET}) must lie in 1024..65535", "use e.g. 30000")
        if self.mode == "separate":
            if self.nodes < 1 or self.gpus_per_node < 1:
                raise config_error("placement.nodes", self.nodes,
                                   "mode 'separate' needs rollout nodes with GPUs (nodes >= 1, gpus_per_node >= 1)",
                                   "set placement.nodes and placement.gpus_per_node, or use mode colocated")
        elif self.nodes != 0:
            raise config_error("placement.nodes", self.nodes, f"only mode 'separate' has nodes of its own "
                               f"(mode is {self.mode!r})", "set placement.nodes=0 or placement.mode=separate")

    @property
    def colocated(self) -> bool:
        """The servers share the trainer's GPUs: the trainer must release their memory while it trains (a recipe
        carries this into its run config as `rollout.colocated`, which is what `dasd train` reads)."""
        return self.mode == "colocated"

    def check_rollout(self, rollout) -> None:
        """The run config's rollout section agrees with this placement (`rollout`: a `RolloutConfig`):
        `rollout.colocated` is what tells the trainer to release the servers' GPU memory while it trains, so it must
        be set exactly for mode 'colocated' (unset there, servers and trainer compete for the GPUs' memory; set for
        servers on nodes of their own, the trainer would stall them for nothing)."""
        if rollout.colocated != self.colocated:
            want = "true" if self.colocated else "false"
            raise config_error("rollout.colocated", rollout.colocated,
                               f"placement.mode={self.mode} means the servers {'do' if self.colocated else 'do not'} "
                               "share the trainer's GPUs", f"set rollout.colocated={want}")

    def gpus_on_server_node(self, trainer: TrainerResources) -> int:
        return self.gpus_per_node if self.mode == "separate" else trainer.gpus_per_node

    def server_nodes(self, trainer: TrainerResources) -> int:
        """How many nodes run servers: the rollout nodes, or every trainer node."""
        return self.nodes if self.mode == "separate" else trainer.nodes

    def total_servers(self, trainer: TrainerResources) -> int:
        return self.server_nodes(trainer) * self.servers_per_node

    def port(self, server_index: int, offset: int = 0) -> int:
        return self.base_port + server_index * self.port_stride + offset

    def gpu_ids(self, server_index: int) -> tuple[int, ...]:
        """Local GPU indices of server `server_index` on its node."""
        tp = self.tensor_parallel
        return tuple(range(server_index * tp, (server_index + 1) * tp))

    def validate(self, trainer: TrainerResources, arch=None) -> None:
        """Checks against the trainer's resources and (when given) the model architecture."""
        if self.mode in ("colocated", "separate"):
            if trainer.accelerator != "gpu":
                raise config_error("placement.mode", self.mode, "SGLang servers need GPUs but trainer.accelerator "
                                   "is 'cpu'", "use placement.mode=builtin on CPU, or trainer.accelerator=gpu")
            gpus = self.gpus_on_server_node(trainer)
            need = self.servers_per_node * self.tensor_parallel
            if need > gpus:
                where = "each rollout node" if self.mode == "separate" else "each trainer node"
                raise config_error("placement.servers_per_node", self.servers_per_node,
                                   f"{self.servers_per_node} servers x tensor_parallel {self.tensor_parallel} = {need} "
                                   f"GPUs, but {where} has {gpus}",
                                   f"use at most {gpus // self.tensor_parallel} servers per node")
        if arch is not None and arch.num_attention_heads % self.tensor_parallel:
            raise config_error("placement.tensor_parallel", self.tensor_parallel,
                               f"must divide the model's num_attention_heads={arch.num_attention_heads} (SGLang "
                               "splits heads across its TP ranks)",
                               "use a divisor, e.g. 1, 2, 4 or 8")
