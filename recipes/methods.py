"""The training methods a recipe can run, as `DASDLossConfig`s (see docs/METHOD.md, "Special cases").

| method | loss settings | meaning |
| --- | --- | --- |
| `dasd` | the DASDLossConfig defaults (tanh router, gate, rho 0.2 'upper', beta 1.0, 'full' estimator) | DASD |
| `grpo` | router constant omega = 0, no gate, beta = 0 | GRPO: the PPO surrogate on A_G only; beta 0 tells the trainer the teacher term is off, so it can skip the teacher forward |
| `opsd` | reward term off, router constant omega = +1, no gate, beta 1.0 | pure on-policy self-distillation |

The method study's DASD ablations (`ABLATIONS`, METHOD.md's router choices; registered for the CPU main job only):

| method | loss settings | meaning |
| --- | --- | --- |
| `dasd_hard` | DASD with `router_mode='hard'` (omega = sign(tau - H)) | hard direction routing instead of tanh |
| `dasd_nogate` | DASD with `router_gate=False` | no reliability gate on omega |

All three share the PPO clip (0.2 / 0.28), truncated IS (cap 2.0) and the GRPO advantage normalisation, so the
baselines differ from DASD only in the routed teacher term.
"""

from __future__ import annotations

import dataclasses

from dasd_megatron.config import ConfigError
from dasd_megatron.loss.config import DASDLossConfig

METHODS = ("dasd", "grpo", "opsd")
ABLATIONS = ("dasd_hard", "dasd_nogate")


def loss_for(method: str, *, temperature: float = 1.0) -> DASDLossConfig:
    """The loss config of `method`, with the rollout sampling `temperature` applied to the training logits."""
    base = DASDLossConfig(temperature=temperature)
    if method == "dasd":
        return base
    if method == "dasd_hard":
        return dataclasses.replace(base, router_mode="hard")
    if method == "dasd_nogate":
        return dataclasses.replace(base, router_gate=False)
    if method == "grpo":
        return dataclasses.replace(base, router_mode="constant", router_constant=0.0, router_gate=False, beta=0.0)
    if method == "opsd":
        return dataclasses.replace(base, router_mode="constant", router_constant=1.0, router_gate=False,
                                   reward_term=False, beta=1.0)
    raise ConfigError(f"method={method!r}: unknown training method. Fix: use one of {list(METHODS + ABLATIONS)}")
