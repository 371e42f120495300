"""DASDLossConfig: defaults from METHOD.md, frozen, and validation errors that name field, value, rule and fix."""

import dataclasses

import pytest

from dasd_megatron.loss import DASDLossConfig


def test_defaults_follow_method():
    c = DASDLossConfig()
    assert (c.beta, c.rho, c.convention, c.router_mode) == (1.0, 0.2, "upper", "tanh")
    assert (c.router_gate, c.c_max, c.estimator, c.compile_kernels) == (True, 5.0, "full", None)
    assert c.kernel_kwargs["compile"] is False  # auto: compiled only with CUDA (none here)
    assert (c.clip_eps_low, c.clip_eps_high, c.is_cap, c.gap_scale) == (0.2, 0.28, 2.0, "mean_abs")
    assert c.reward_term and c.advantage_std_normalize and c.advantage_eps == 1e-6
    assert c.quantile_level == pytest.approx(0.8)
    assert DASDLossConfig(convention="lower").quantile_level == pytest.approx(0.2)


def test_kernel_kwargs():
    c = DASDLossConfig(temperature=0.6, chunk_size=64, compile_kernels=True)
    assert c.kernel_kwargs == {"temperature": 0.6, "chunk_size": 64, "check_finite": True, "compile": True,
                               "kernel_backend": "auto"}


def test_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        DASDLossConfig().beta = 2.0


@pytest.mark.parametrize(
    "kwargs,field,value",
    [
        ({"rho": 1.5}, "loss.rho", "1.5"),
        ({"rho": 0.0}, "loss.rho", "0.0"),
        ({"beta": -1.0}, "loss.beta", "-1.0"),
        ({"beta": float("nan")}, "loss.beta", "nan"),
        ({"convention": "middle"}, "loss.convention", "'middle'"),
        ({"router_mode": "linear"}, "loss.router_mode", "'linear'"),
        ({"router_mode": "constant", "router_constant": 1.0}, "loss.router_gate", "True"),
        ({"router_constant": 0.5}, "loss.router_constant", "0.5"),
        ({"router_mode": "constant", "router_gate": False, "router_constant": 2.0}, "loss.router_constant", "2.0"),
        ({"c_max": 0}, "loss.c_max", "0"),
        ({"eps": 0.0}, "loss.eps", "0.0"),
        ({"gap_scale": "max"}, "loss.gap_scale", "'max'"),
        ({"estimator": "topk"}, "loss.estimator", "'topk'"),
        ({"clip_eps_low": 1.0}, "loss.clip_eps_low", "1.0"),
        ({"clip_eps_high": -0.1}, "loss.clip_eps_high", "-0.1"),
        ({"is_cap": 0.5}, "loss.is_cap", "0.5"),
        ({"temperature": 0.0}, "loss.temperature", "0.0"),
        ({"chunk_size": 0}, "loss.chunk_size", "0"),
        ({"chunk_size": 2.5}, "loss.chunk_size", "2.5"),
        ({"router_gate": "yes"}, "loss.router_gate", "'yes'"),
        ({"reward_term": False, "beta": 0.0}, "loss.beta", "0.0"),
    ],
)
def test_validation_names_field_value_rule_fix(kwargs, field, value):
    with pytest.raises(ValueError) as e:
        DASDLossConfig(**kwargs)
    msg = str(e.value)
    assert msg.startswith(f"{field}={value}: "), msg
    assert "must" in msg and "Fix:" in msg, msg


def test_special_case_configs_are_valid():
    DASDLossConfig(router_mode="constant", router_constant=0.0, router_gate=False)
    DASDLossConfig(router_mode="constant", router_constant=-1.0, router_gate=False, estimator="sampled")
    DASDLossConfig(reward_term=False, router_mode="constant", router_constant=1.0, router_gate=False)
    DASDLossConfig(router_mode="hard", router_gate=False, is_cap=None, gap_scale="std", chunk_size=128)
