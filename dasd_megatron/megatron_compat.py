"""CPU compatibility layer for megatron-core: the one place that patches it. A no-op where CUDA exists.

megatron-core assumes a CUDA device in a handful of places that are irrelevant to the maths. On a CPU-only torch
(this project's CI and developer machines) we patch exactly those, each with a note naming the megatron code it
works around. With these, TP, SP, PP, CP, DP, the DDP wrapper, the optimizer and dist-checkpointing run on gloo
and match a single-process reference (see tests/test_parallel_parity.py).

Call `apply_cpu_compat()` before building megatron objects; `parallel.initialize_parallel` does it for you.
"""

from __future__ import annotations

import contextlib
import logging
import types

import torch

log = logging.getLogger(__name__)
_applied = False


KNOWN_WARNINGS = (
    r"Transformer Engine and Apex are not installed",   # megatron-core at import: torch fallbacks are used
    r"Apex is not installed",                            # the same, for norms
    r"full scope is deprecated",                         # megatron 0.16's own default cuda_graph_scope
)
"""Import-time UserWarnings of megatron-core that say nothing a user can act on (the layout line names the attention
backend and precision in use). `quiet_known_warnings` hides exactly these; everything else still shows."""


def quiet_known_warnings() -> None:
    import warnings

    for pattern in KNOWN_WARNINGS:
        warnings.filterwarnings("ignore", message=pattern, category=UserWarning)


def cuda_available() -> bool:
    return torch.cuda.is_available()


def device() -> torch.device:
    """The device this process computes on: its local CUDA device, else the CPU."""
    if cuda_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


class _NullStream:
    """Stands in for torch.cuda.Stream on CPU: work is synchronous, so waits are no-ops."""

    def __init__(self, *args, **kwargs):
        pass

    def wait_stream(self, other) -> None:
        pass

    def synchronize(self) -> None:
        pass

    def record_event(self, event=None):
        return _NullEvent()


class _NullEvent:
    def __init__(self, *args, **kwargs):
        pass

    def record(self, stream=None) -> None:
        pass

    def wait(self, stream=None) -> None:
        pass

    def synchronize(self) -> None:
        pass

    def query(self) -> bool:
        return True


def _map_device(kwargs: dict) -> dict:
    dev = kwargs.get("device")
    if dev is not None and str(dev).startswith("cuda"):
        kwargs = dict(kwargs, device="cpu")
    if kwargs.get("pin_memory"):  # no pinned-memory allocator without an accelerator
        kwargs = dict(kwargs, pin_memory=False)
    return kwargs


class _CpuTorch(types.ModuleType):
    """A view of the `torch` module for megatron modules that hard-code device="cuda" in tensor factories.

    Only factory calls with a `device` argument and `torch.autocast("cuda", ...)` are rewritten; every other
    attribute is torch's own.
    """

    _FACTORIES = ("zeros", "ones", "empty", "full", "tensor", "arange", "zeros_like", "ones_like", "empty_like")

    def __init__(self):
        super().__init__("torch")

    def __getattr__(self, name):
        attr = getattr(torch, name)
        if name in self._FACTORIES:
            def factory(*args, _f=attr, **kwargs):
                return _f(*args, **_map_device(kwargs))

            return factory
        if name == "autocast":
            def autocast(device_type, *args, **kwargs):
                if device_type == "cuda":
                    device_type = "cpu"
                    if kwargs.get("enabled", True) is False:
                        return contextlib.nullcontext()
                return torch.autocast(device_type, *args, **kwargs)

            return autocast
        return attr


def _install_cpu_rng_tracker() -> None:
    """megatron.core.tensor_parallel.random.CudaRNGStatesTracker stores CUDA generator states; keep CPU ones.

    Forking a named state swaps torch's default CPU generator state in and out, which is what the CUDA version
    does with the CUDA generator.
    """
    from megatron.core.tensor_parallel import random as mrandom

    class CpuRNGStatesTracker(mrandom.CudaRNGStatesTracker):
        def add(self, name, seed):
            self._is_initialized = True
            if seed in self.seeds_:
                raise Exception(f"seed {seed} already exists")
            self.seeds_.add(seed)
            if name in self.states_:
                raise Exception(f"rng state {name} already exists")
            orig = torch.get_rng_state()
            torch.manual_seed(seed)
            self.states_[name] = torch.get_rng_state()
            torch.set_rng_state(orig)

        @contextlib.contextmanager
        def fork(self, name=mrandom._MODEL_PARALLEL_RNG_TRACKER_NAME):
            if name not in self.states_:
                raise Exception(f"rng state {name} is not added")
            orig = torch.get_rng_state()
            torch.set_rng_state(self.states_[name])
            try:
                yield
            finally:
                self.states_[name] = torch.get_rng_state()
                torch.set_rng_state(orig)

    tracker = CpuRNGStatesTracker()
    mrandom._CUDA_RNG_STATE_TRACKER = tracker
    mrandom._CUDA_RNG_STATE_TRACKER_INITIALIZED = True
    # megatron.core.tensor_parallel.random.initialize_rng_tracker would replace it with a CUDA one.
    mrandom.initialize_rng_tracker = lambda *a, **k: None
    # _set_cuda_rng_state is used by activation recomputation (CheckpointFunction).
    mrandom._set_cuda_rng_state = lambda new_state, device=-1, graph_safe=False: torch.set_rng_state(new_state)
    mrandom._get_cuda_rng_state = lambda *a, **k: torch.get_rng_state()


def _install_cpu_type_names() -> None:
    """megatron.core.optimizer (optimizer.py Float16OptimizerWithFloat16Params, distrib_optimizer.py,
    clip_grads.clip_grad_by_total_norm_fp32) asserts `param.type() == 'torch.cuda.FloatTensor'` (or Half/BFloat16).

    For calls made from those modules only, a no-argument `Tensor.type()` answers with the CUDA type name of the
    same dtype; every other caller gets torch's own answer.
    """
    import sys

    original = torch.Tensor.type

    def type_(self, *args, **kwargs):
        name = original(self, *args, **kwargs)
        if args or kwargs or not isinstance(name, str) or not name.startswith("torch."):
            return name
        caller = sys._getframe(1).f_globals.get("__name__", "")
        if caller.startswith("megatron.core.optimizer") and not name.startswith("torch.cuda."):
            return "torch.cuda." + name[len("torch."):]
        return name

    torch.Tensor.type = type_


def apply_cpu_compat() -> bool:
    """Patch megatron-core for a CPU-only torch. Returns True if patches were applied (False on CUDA)."""
    global _applied
    if cuda_available():
        return False
    if _applied:
        return True
    cuda = torch.cuda
    # parallel_state, p2p_communication, param_and_grad_buffer, tensor_parallel.layers: device=current_device().
    cuda.current_device = lambda: "cpu"
    # parallel_state.initialize_model_parallel, p2p_communication, DDP.free/alloc: torch.cuda.synchronize().
    cuda.synchronize = lambda device=None: None
    cuda.empty_cache = lambda: None
    # distributed_data_parallel / param_and_grad_buffer: communication streams.
    cuda.Stream = _NullStream
    cuda.Event = _NullEvent
    cuda.current_stream = lambda device=None: _NullStream()
    cuda.default_stream = lambda device=None: _NullStream()
    cuda.stream = lambda s=None: contextlib.nullcontext()
    cuda.set_device = lambda d: None
    cuda.get_rng_state = lambda device="cuda": torch.get_rng_state()
    cuda.manual_seed = lambda seed: None
    cuda.manual_seed_all = lambda seed: None
    cuda.memory_allocated = lambda device=None: 0
    cuda.max_memory_allocated = lambda device=None: 0
    cuda.reset_peak_memory_stats = lambda device=None: None
    cuda.nvtx.range_push = lambda *a, **k: None
    cuda.nvtx.range_pop = lambda *a, **k: None

    # rope_utils.get_pos_emb_on_this_cp_rank and the optimizer's state reload call `.cuda()` on CPU tensors.
    torch.Tensor.cuda = lambda self, *args, **kwargs: self

    _install_cpu_type_names()
    _install_cpu_rng_tracker()

    # Hard-coded device="cuda" / torch.autocast("cuda") in tensor factories of these modules.
    import importlib

    cpu_torch = _CpuTorch()
    for modname in (
        "megatron.core.pipeline_parallel.schedules",  # total_num_tokens = torch.zeros(..., device="cuda")
        "megatron.core.optimizer.optimizer",  # found_inf / _scale_one / _dummy_overflow_buf on 'cuda'
        "megatron.core.optimizer.clip_grads",  # total_norm tensors on 'cuda'
        "megatron.core.distributed.param_and_grad_buffer",  # tmp_warmup_tensor on "cuda"
        "megatron.core.dist_checkpointing.strategies.torch",  # torch.cuda.current_device() buffers
        "megatron.core.dist_checkpointing.exchange_utils",
        "megatron.core.utils",  # local_multi_tensor_l2_norm: torch.tensor(..., device="cuda")
        "megatron.core.transformer.utils",
        "megatron.core.models.common.embeddings.rope_utils",  # get_pos_emb_on_this_cp_rank: pin_memory=True  # get_default_causal_mask: torch.ones(sq, sq, device="cuda")
    ):
        try:
            mod = importlib.import_module(modname)
        except ImportError:
            continue
        if getattr(mod, "torch", None) is torch:
            mod.torch = cpu_torch
    _applied = True
    log.info("CPU compatibility layer for megatron-core applied (no CUDA device)")
    return True
