"""Teacher weights other than the current policy: `train.teacher=frozen` (the initial policy) or `ema` (an
exponential moving average of the policy).

METHOD.md's teacher is the policy itself shown privileged context (`train.teacher=current`, no extra memory). The
other two modes keep a second megatron model of the same architecture and parallel layout, never trained
(`requires_grad=False`, eval mode, no DDP wrapper, no optimizer state):

- `frozen`: a copy of the policy's weights taken before the first step; the teacher never moves.
- `ema`: after every optimizer step, `teacher <- decay * teacher + (1 - decay) * policy` (`train.ema_decay`). The
  average is kept in fp32 (a shadow copy when the parameters are bf16/fp16, whose rounding would swallow the small
  `(1 - decay)` increments); the teacher's parameters are the shadow cast to their dtype.

Memory: one more copy of the parameters in their dtype (plus the fp32 shadow for `ema` in bf16), no gradients.
Checkpoints store the teacher as its own distributed checkpoint (`<step>/teacher`), so a resumed run continues with
the same teacher; in bf16 the fp32 shadow restarts from the stored (bf16) teacher.
"""

from __future__ import annotations

import torch

from dasd_megatron.train.checkpoint import inner_module


class TeacherWeights:
    """The frozen or EMA teacher network (see the module docstring)."""

    def __init__(self, model, mode: str, decay: float):
        if mode not in ("frozen", "ema"):
            raise ValueError(f"TeacherWeights: mode={mode!r}; 'current' needs no separate teacher")
        self.model, self.mode, self.decay = model, mode, float(decay)
        self.model.eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
        self._shadow: list[torch.Tensor] | None = None

    def _pairs(self, policy):
        src = list(inner_module(policy).named_parameters())
        dst = list(self.model.named_parameters())
        if [n for n, _ in src] != [n for n, _ in dst]:
            raise RuntimeError("teacher and policy parameters differ in names or order; they must be built from the "
                               "same config")
        for (name, s), (_, t) in zip(src, dst):
            if s.shape != t.shape:
                raise RuntimeError(f"teacher parameter {name} has shape {tuple(t.shape)}, the policy's "
                                   f"{tuple(s.shape)}")
            yield s, t

    @torch.no_grad()
    def copy_from(self, policy) -> None:
        """Teacher := policy (the start of a run)."""
        for s, t in self._pairs(policy):
            t.copy_(s)
        self._shadow = None

    @torch.no_grad()
    def update(self, policy) -> None:
        """After an optimizer step: EMA toward the policy (`ema`), nothing (`frozen`)."""
        if self.mode != "ema":
            return
        pairs = list(self._pairs(policy))
        if self._shadow is None:
            self._shadow = [t.detach().float().clone() if t.dtype != torch.float32 else t for _, t in pairs]
        for (s, t), sh in zip(pairs, self._shadow):
            sh.lerp_(s.float(), 1.0 - self.decay)
            if sh is not t:
                t.copy_(sh)

    def parameters(self):
        return self.model.parameters()


class AdapterTeacher:
    """The teacher of a LoRA run (`model.lora.rank > 0`), sharing the policy's frozen base (no second model):

    - `base`: the policy with every adapter disabled (`lora.adapters_disabled`): the base network, which is the
      frozen initial policy (the adapter starts at zero) at no extra memory.
    - `ema`: the base plus an exponential moving average of the adapter: after every optimizer step
      `A_t <- decay * A_t + (1 - decay) * A` and the same for B, in fp32. This averages A and B separately, which
      is not the EMA of the product B A (the EMA of a product is not the product of EMAs); for the slow averages
      used here (decay ~0.99) the two differ by a second-order term in the step-to-step change of the adapter.

    `applied(policy)` is the context in which a forward of the policy computes the teacher: adapters off (`base`)
    or the EMA tensors swapped into the adapter parameters (`ema`, restored on exit). Memory: none (`base`), one
    fp32 copy of the adapter (`ema`). Checkpoints store the EMA adapter (`save_to` / `load_from`)."""

    model = None  # the teacher forward runs the policy itself, inside `applied`

    def __init__(self, policy, mode: str, decay: float):
        if mode not in ("base", "ema"):
            raise ValueError(f"AdapterTeacher: mode={mode!r}; expected base or ema")
        from dasd_megatron.model.lora import adapter_params

        self.mode, self.decay = mode, float(decay)
        self._owner = inner_module(policy)
        self._params = adapter_params(self._owner)
        self._shadow = [p.detach().float().clone() for p in self._params] if mode == "ema" else None

    def copy_from(self, policy) -> None:
        """Teacher := policy (the start of a run): the EMA starts at the initial adapter."""
        if self._shadow is not None:
            self._shadow = [p.detach().float().clone() for p in self._params]

    @torch.no_grad()
    def update(self, policy) -> None:
        if self._shadow is None:
            return
        for p, sh in zip(self._params, self._shadow):
            sh.lerp_(p.detach().float(), 1.0 - self.decay)

    def applied(self, policy):
        """Context manager: inside it, the policy's forward is the teacher's."""
        from dasd_megatron.model.lora import adapters_disabled

        if self.mode == "base":
            return adapters_disabled(inner_module(policy))
        return self._swapped()

    def _swapped(self):
        import contextlib

        @contextlib.contextmanager
        def swap():
            saved = [p.data for p in self._params]
            for p, sh in zip(self._params, self._shadow):
                p.data = sh.to(p.dtype)
            try:
                yield
            finally:
                for p, d in zip(self._params, saved):
                    p.data = d

        return swap()

    # -- checkpoints (train/checkpoint.py calls these for the `teacher/` folder) ---------------------------------------
    def save_to(self, path: str) -> None:
        from megatron.core import dist_checkpointing

        from dasd_megatron.model.lora import adapter_sharded_state_dict

        policy = self._owner
        with self._swapped():
            dist_checkpointing.save(adapter_sharded_state_dict(policy), path)

    def load_from(self, path: str) -> None:
        from megatron.core import dist_checkpointing

        from dasd_megatron.model.lora import adapter_sharded_state_dict, load_adapter_state

        policy = self._owner
        with self._swapped():
            load_adapter_state(policy, dist_checkpointing.load(adapter_sharded_state_dict(policy), path))
            self._shadow = [p.detach().float().clone() for p in self._params]

    def parameters(self):
        return iter(self._shadow or [])
