"""The SGLang HTTP API subset we use, as data (transcribed from docs/SGLANG_HTTP_API.md, sglang 0.5.23).

One table serves two readers:

* the built-in server validates request bodies with it (`validate_body`), the way SGLang's request Structs and
  its `/generate` contract gate do: a missing required field, a wrong JSON type or an unknown *sampling* key is a
  400 with `{"error": "<message>"}`; unknown top-level keys pass (SGLang ignores them);
* the contract tests check every body the rollout client sends field by field (`validate_body(..., strict=True)`
  additionally refuses keys that are not in the table, so a typo in the client cannot hide).

It is also the one home of the sampling parameters: `SAMPLING_PARAMS` holds their names, JSON types and SGLang's
defaults, `SAMPLING_RULES` the value rules with their error messages. The trainer's `SamplingConfig`
(`sglang_rollout.rollout_client`) and the built-in server's `SamplingSpec` (`builtin_server.sampler`) take their
defaults from `sampling_default` and check their values with these rules, so the three cannot drift apart.

Types are written in a tiny JSON-type language: ``str``, ``int``, ``float`` (an int is accepted, as JSON does),
``bool``, ``null``, ``dict``, ``any``, ``list[T]`` (``list[str|null]``: every element one of the alternatives); a
field lists the alternatives it accepts. ``bool`` is never accepted where ``int``/``float`` is asked (unlike
Python's `isinstance`), matching serde/msgspec.

LoRA endpoints (`LORA_ENDPOINTS`, transcribed from SGLang's own ``io_struct.py`` / ``http_server.py``: the shared
API doc only names them, so they live beside the doc-checked `ENDPOINTS` table; `endpoint(path)` looks in both):

* ``POST /load_lora_adapter`` {**lora_name**, **lora_path** (a PEFT folder), pinned=false, lora_id=null};
* ``POST /unload_lora_adapter`` {**lora_name**, lora_id=null};
* ``POST /load_lora_adapter_from_tensors`` {**lora_name**, **config_dict** (the PEFT adapter_config.json as a
  dict), **serialized_tensors** (``MultiprocessingSerializer.serialize({PEFT tensor name: tensor},
  output_str=True)``, or with ``load_format="flattened_bucket"`` of ``{"flattened_tensor", "metadata"}`` as in
  `/update_weights_from_tensor`; see `sglang_rollout.tensor_payload`), pinned=false, added_tokens_config=null,
  lora_id=null, load_format=null}.

All three answer SGLang's ``LoRAUpdateOutput`` ``{"success", "error_message", "loaded_adapters": {name: {"lora_id",
"lora_name", "lora_path", "pinned"}}}``, 200 on success, else 400 (`LORA_NOT_ENABLED` and the messages of
`lora_exists_error` / `lora_missing_error` are SGLang's wording). `/generate`'s ``lora_path`` (a str, or one entry
per prompt, null = base model) names a *loaded* adapter by its ``lora_name``. Server flags (SGLang's names):
``--enable-lora``, ``--max-lora-rank N``, ``--lora-target-modules m1 m2 ...|all``, ``--lora-paths name=path ...``,
``--max-loras-per-batch`` (8).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Optional

__all__ = [
    "ContractError",
    "Field",
    "Endpoint",
    "ENDPOINTS",
    "LORA_ENDPOINTS",
    "LORA_NOT_ENABLED",
    "LORA_TARGET_MODULES",
    "endpoint",
    "lora_exists_error",
    "lora_missing_error",
    "SAMPLING_PARAMS",
    "SamplingRule",
    "SAMPLING_RULES",
    "sampling_default",
    "broken_sampling_rule",
    "CONTROL_COMMON",
    "check_type",
    "validate_body",
    "validate_sampling_params",
]


class ContractError(ValueError):
    """A request body that SGLang would refuse with a 400 (or 422 for the control Structs)."""


@dataclass(frozen=True)
class Field:
    """One request field: JSON types accepted, whether required, SGLang's default."""

    name: str
    types: tuple[str, ...]
    required: bool = False
    default: Any = None
    doc: str = ""


@dataclass(frozen=True)
class Endpoint:
    """One endpoint of the contract: HTTP methods, body fields, query parameters."""

    path: str
    methods: tuple[str, ...]
    fields: tuple[Field, ...] = ()
    query: tuple[Field, ...] = ()
    #: exactly one of these fields must be present (``/generate``: text / input_ids / input_embeds)
    one_of: tuple[str, ...] = ()
    has_body: bool = True

    def field_map(self) -> dict[str, Field]:
        return {f.name: f for f in self.fields}


def _f(name: str, *types: str, required: bool = False, default: Any = None, doc: str = "") -> Field:
    return Field(name, tuple(types), required, default, doc)


# Every control Struct also accepts these (SGLang ignores them for our purposes).
CONTROL_COMMON: tuple[Field, ...] = (_f("rid", "str", "null"), _f("http_worker_ipc", "str", "null"))

# ---- /generate -------------------------------------------------------------------------------------------------

_GENERATE = Endpoint(
    "/generate",
    ("POST", "PUT"),
    fields=(
        _f("text", "str", "list[str]"),
        _f("input_ids", "list[int]", "list[list[int]]"),
        _f("input_embeds", "any"),
        _f("sampling_params", "dict", "list[dict]", "null"),
        _f("stream", "bool", default=False),
        _f("return_logprob", "bool", "list[bool]", "null"),
        _f("logprob_start_len", "int", "list[int]", "null", default=-1, doc="-1 => output tokens only"),
        _f("top_logprobs_num", "int", "list[int]", "null"),
        _f("token_ids_logprob", "list[int]", "list[list[int]]", "null"),
        _f("return_text_in_logprobs", "bool", default=False),
        _f("return_prompt_token_ids", "bool", default=False),
        _f("rid", "str", "list[str]", "null"),
        _f("lora_path", "str", "list[str|null]", "null", doc="the lora_name of a loaded adapter (per prompt)"),
        _f("custom_logit_processor", "str", "list[str]", "null"),
        _f("return_hidden_states", "bool", "list[bool]", default=False),
        _f("image_data", "any"),
        _f("video_data", "any"),
        _f("audio_data", "any"),
        _f("priority", "int", "null"),
    ),
    one_of=("text", "input_ids", "input_embeds"),
)

#: `sampling_params` keys accepted by SGLang's `/generate` gate, with their JSON types and defaults.
#: Every key also accepts null (= the default).
SAMPLING_PARAMS: dict[str, Field] = {
    f.name: f
    for f in (
        _f("max_new_tokens", "int", default=128),
        _f("stop", "str", "list[str]"),
        _f("stop_token_ids", "list[int]"),
        _f("stop_regex", "str", "list[str]"),
        _f("temperature", "float", default=1.0),
        _f("top_p", "float", default=1.0),
        _f("top_k", "int", default=-1, doc="-1 = whole vocabulary"),
        _f("min_p", "float", default=0.0),
        _f("frequency_penalty", "float", default=0.0),
        _f("presence_penalty", "float", default=0.0),
        _f("repetition_penalty", "float", default=1.0),
        _f("min_new_tokens", "int", default=0),
        _f("n", "int", default=1),
        _f("json_schema", "str"),
        _f("regex", "str"),
        _f("ebnf", "str"),
        _f("structural_tag", "str"),
        _f("ignore_eos", "bool", default=False),
        _f("skip_special_tokens", "bool", default=True),
        _f("spaces_between_special_tokens", "bool", default=True),
        _f("no_stop_trim", "bool", default=False),
        _f("stream_interval", "int"),
        _f("logit_bias", "dict"),
        _f("sampling_seed", "int"),
        _f("custom_params", "dict"),
        _f("beam_width", "int"),
        _f("watermark", "any"),
        _f("choice", "any"),
    )
}


def sampling_default(key: str) -> Any:
    """SGLang's default of `sampling_params[key]` as the Python value both sides use.

    A list-typed key without a default (``stop_token_ids``) defaults to the empty tuple (absent = no ids); any other
    key without one to None.
    """
    f = SAMPLING_PARAMS[key]
    if f.default is None and any(t.startswith("list[") for t in f.types):
        return ()
    return f.default


@dataclass(frozen=True)
class SamplingRule:
    """One value rule on sampling parameters (SGLang's `SamplingParams.verify`), after the type check.

    `ok(values)` must hold, where `values` maps each parameter name to its value (and, on the server,
    ``vocab_size`` to the served vocabulary). `rule` is the server's wording (a 400: ``sampling_params.top_p=0.0:
    must be in (0, 1]``); it may name other values as ``{max_new_tokens}``. `client_rule` is the trainer's wording
    for the rules its `SamplingConfig` checks before anything is sent (``rollout.sampling.top_p=0: must be in
    (0, 1]. Fix: use 1.0 to disable``), with `fix`; None: only the server checks it.
    """

    key: str
    ok: Callable[[Mapping[str, Any]], bool]
    rule: str
    client_rule: Optional[str] = None
    fix: str = ""

    def server_error(self, values: Mapping[str, Any]) -> ContractError:
        return ContractError(f"sampling_params.{self.key}={values[self.key]!r}: {self.rule.format(**values)}")

    def client_error(self, values: Mapping[str, Any]) -> ValueError:
        return ValueError(f"rollout.sampling.{self.key}={values[self.key]!r}: {self.client_rule}. Fix: {self.fix}")


_FINITE_TEMPERATURE = "must be a finite number >= 0"

#: The value rules, checked in this order (the first broken one is reported).
SAMPLING_RULES: tuple[SamplingRule, ...] = (
    SamplingRule("max_new_tokens", lambda v: not v["max_new_tokens"] < 0, "must be at least 0",
                 "must be >= 0", "use e.g. 1024"),
    SamplingRule("temperature", lambda v: not v["temperature"] < 0, _FINITE_TEMPERATURE,
                 "must be >= 0", "use 1.0 for RL rollouts, 0 for greedy"),
    # NaN and inf pass the trainer's check above; the server refuses them
    SamplingRule("temperature", lambda v: v["temperature"] >= 0 and not math.isinf(v["temperature"]),
                 _FINITE_TEMPERATURE),
    SamplingRule("top_p", lambda v: 0 < v["top_p"] <= 1, "must be in (0, 1]", "must be in (0, 1]",
                 "use 1.0 to disable"),
    SamplingRule("top_k", lambda v: not (v["top_k"] != -1 and v["top_k"] < 1), "must be -1 (disable) or at least 1",
                 "must be -1 or >= 1", "use -1 to disable"),
    SamplingRule("min_p", lambda v: 0 <= v["min_p"] <= 1, "must be in [0, 1]"),
    SamplingRule("min_new_tokens", lambda v: not v["min_new_tokens"] < 0, "must be at least 0"),
    SamplingRule("min_new_tokens", lambda v: not v["min_new_tokens"] > v["max_new_tokens"],
                 "must be <= max_new_tokens ({max_new_tokens})"),
    SamplingRule("n", lambda v: not v["n"] < 1, "must be at least 1"),
    SamplingRule("stop_token_ids", lambda v: all(0 <= t < v["vocab_size"] for t in v["stop_token_ids"]),
                 "token ids must be in [0, {vocab_size})"),
)


def broken_sampling_rule(values: Mapping[str, Any], *, client: bool = False) -> Optional[SamplingRule]:
    """The first rule of `SAMPLING_RULES` that `values` break, None if all hold; `client=True`: only the rules the
    trainer checks (those with a `client_rule`)."""
    for r in SAMPLING_RULES:
        if client and r.client_rule is None:
            continue
        if not r.ok(values):
            return r
    return None


def _control(path: str, methods: tuple[str, ...], *fields: Field, query: tuple[Field, ...] = ()) -> Endpoint:
    return Endpoint(path, methods, fields=tuple(fields) + CONTROL_COMMON, query=query)


ENDPOINTS: dict[str, Endpoint] = {
    e.path: e
    for e in (
        Endpoint("/health", ("GET",), has_body=False),
        Endpoint("/health_generate", ("GET",), has_body=False),
        Endpoint("/model_info", ("GET",), has_body=False),
        Endpoint("/server_info", ("GET",), has_body=False),
        _GENERATE,
        Endpoint("/flush_cache", ("GET", "POST"), query=(_f("timeout", "float", default=0.0),), has_body=False),
        _control(
            "/update_weights_from_disk",
            ("POST",),
            _f("model_path", "str", required=True),
            _f("load_format", "str", "null"),
            _f("abort_all_requests", "bool", default=False),
            _f("weight_version", "str", "null"),
            _f("is_async", "bool", default=False),
            _f("torch_empty_cache", "bool", default=False),
            _f("keep_pause", "bool", default=False),
            _f("recapture_cuda_graph", "bool", default=False),
            _f("token_step", "int", default=0),
            _f("flush_cache", "bool", default=True),
            _f("manifest", "any"),
        ),
        _control(
            "/init_weights_update_group",
            ("POST",),
            _f("master_address", "str", required=True),
            _f("master_port", "int", required=True),
            _f("rank_offset", "int", required=True),
            _f("world_size", "int", required=True),
            _f("group_name", "str", default="weight_update_group"),
            _f("backend", "str", default="nccl"),
        ),
        _control(
            "/update_weights_from_distributed",
            ("POST",),
            _f("names", "list[str]", required=True),
            _f("dtypes", "list[str]", required=True),
            _f("shapes", "list[list[int]]", required=True),
            _f("group_name", "str", default="weight_update_group"),
            _f("flush_cache", "bool", default=True),
            _f("abort_all_requests", "bool", default=False),
            _f("weight_version", "str", "null"),
            _f("load_format", "str", "null"),
            _f("selector", "str", default="all"),
            _f("torch_empty_cache", "bool", default=False),
        ),
        _control("/destroy_weights_update_group", ("POST",), _f("group_name", "str", default="weight_update_group")),
        _control(
            "/update_weights_from_tensor",
            ("POST",),
            _f("serialized_named_tensors", "list[str]", required=True),
            _f("load_format", "str", "null"),
            _f("flush_cache", "bool", default=True),
            _f("abort_all_requests", "bool", default=False),
            _f("weight_version", "str", "null"),
            _f("selector", "str", default="all"),
            _f("torch_empty_cache", "bool", default=False),
        ),
        _control(
            "/update_weight_version",
            ("POST",),
            _f("new_version", "str", required=True),
            _f("abort_all_requests", "bool", default=True),
        ),
        _control("/get_weights_by_name", ("GET", "POST"), _f("name", "str", required=True),
                 _f("truncate_size", "int", default=100)),
        _control("/release_memory_occupation", ("GET", "POST"), _f("tags", "list[str]", "null")),
        _control("/resume_memory_occupation", ("GET", "POST"), _f("tags", "list[str]", "null")),
        _control("/pause_generation", ("POST",), _f("mode", "str", default="abort")),
        _control("/continue_generation", ("POST",), _f("torch_empty_cache", "bool", default=True)),
        _control(
            "/abort_request",
            ("POST",),
            _f("abort_all", "bool", default=False),
        ),
    )
}

PAUSE_MODES = ("abort", "retract", "in_place")

# ---- LoRA (SGLang io_struct: LoadLoRAAdapterReqInput, UnloadLoRAAdapterReqInput, LoadLoRAAdapterFromTensorsReqInput)

#: HF module names a LoRA adapter may target (SGLang's `--lora-target-modules` choices besides ``all``)
LORA_TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

#: SGLang's answer to a LoRA call on a server started without LoRA
LORA_NOT_ENABLED = "LoRA is not enabled. Please set `--enable-lora` to enable LoRA."


def lora_exists_error(name: str, loaded) -> str:
    """SGLang's message for loading a name that is already registered."""
    return f"LoRA with name {name} already exists. Loaded LoRAs: {sorted(loaded)}"


def lora_missing_error(name: str, loaded) -> str:
    """SGLang's message for unloading a name that is not registered."""
    return f"LoRA with name {name} does not exist. Loaded LoRAs: {sorted(loaded)}"


LORA_ENDPOINTS: dict[str, Endpoint] = {
    e.path: e
    for e in (
        _control(
            "/load_lora_adapter",
            ("POST",),
            _f("lora_name", "str", required=True),
            _f("lora_path", "str", required=True, doc="a PEFT folder: adapter_config.json + adapter_model.*"),
            _f("pinned", "bool", default=False),
            _f("lora_id", "str", "null"),
        ),
        _control(
            "/unload_lora_adapter",
            ("POST",),
            _f("lora_name", "str", required=True),
            _f("lora_id", "str", "null"),
        ),
        _control(
            "/load_lora_adapter_from_tensors",
            ("POST",),
            _f("lora_name", "str", required=True),
            _f("config_dict", "dict", required=True, doc="the PEFT adapter_config.json as a dict"),
            _f("serialized_tensors", "str", required=True,
               doc="MultiprocessingSerializer.serialize({name: tensor} or a flattened bucket, output_str=True)"),
            _f("pinned", "bool", default=False),
            _f("added_tokens_config", "dict", "null"),
            _f("lora_id", "str", "null"),
            _f("load_format", "str", "null", doc='null ({name: tensor}) or "flattened_bucket"'),
        ),
    )
}


def endpoint(path: str) -> Optional[Endpoint]:
    """The contract of `path`: `ENDPOINTS` (the shared doc's table) or `LORA_ENDPOINTS`; None if neither."""
    return ENDPOINTS.get(path) or LORA_ENDPOINTS.get(path)


# ---- type checking --------------------------------------------------------------------------------------------


def check_type(value: Any, spec: str) -> bool:
    """True if the JSON value matches one type of the little type language (see module docstring)."""
    if spec == "any":
        return True
    if spec == "null":
        return value is None
    if spec == "str":
        return isinstance(value, str)
    if spec == "bool":
        return isinstance(value, bool)
    if spec == "int":
        return isinstance(value, int) and not isinstance(value, bool)
    if spec == "float":
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if spec == "dict":
        return isinstance(value, dict)
    if spec.startswith("list[") and spec.endswith("]"):
        inner = _split_union(spec[5:-1])
        return isinstance(value, list) and all(any(check_type(v, t) for t in inner) for v in value)
    raise ValueError(f"unknown type spec {spec!r} in the contract table")


def _split_union(spec: str) -> list[str]:
    """``"str|null"`` -> ["str", "null"] (only `|` outside brackets splits)."""
    out, depth, cur = [], 0, ""
    for ch in spec:
        depth += ch == "["
        depth -= ch == "]"
        if ch == "|" and depth == 0:
            out.append(cur)
            cur = ""
        else:
            cur += ch
    return out + [cur]


def _type_name(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return f"boolean {str(value).lower()}"
    if isinstance(value, int):
        return f"integer {value}"
    if isinstance(value, float):
        return f"floating point {value}"
    if isinstance(value, str):
        return f'string "{value[:40]}"'
    if isinstance(value, list):
        return "sequence"
    if isinstance(value, dict):
        return "map"
    return type(value).__name__


def _check_field(where: str, f: Field, value: Any, allow_null: bool = False) -> None:
    if allow_null and value is None:
        return
    if not any(check_type(value, t) for t in f.types):
        raise ContractError(f"{where}{f.name}: invalid type: {_type_name(value)}, expected {' | '.join(f.types)}")


def validate_sampling_params(params: Any, where: str = "sampling_params.") -> None:
    """Raise ContractError for an unknown key or a wrong type (SGLang's `/generate` gate)."""
    if not isinstance(params, dict):
        raise ContractError(f"{where.rstrip('.')}: invalid type: {_type_name(params)}, expected a map")
    for key, value in params.items():
        f = SAMPLING_PARAMS.get(key)
        if f is None:
            raise ContractError(
                f"{where.rstrip('.')}: unknown field '{key}', expected one of {', '.join(repr(k) for k in SAMPLING_PARAMS)}"
            )
        _check_field(where, f, value, allow_null=True)


def validate_body(path: str, body: Any, *, strict: bool = False, query: Optional[Mapping[str, Any]] = None) -> None:
    """Check a request body (already parsed from JSON) against the contract of `path`.

    `strict=True` (contract tests) also refuses top-level keys that are not in the table.
    """
    ep = endpoint(path)
    if ep is None:
        raise ContractError(f"{path}: not an endpoint of the contract")
    for name, value in (query or {}).items():
        qf = {q.name: q for q in ep.query}.get(name)
        if qf is None:
            raise ContractError(f"{path}?{name}: unknown query parameter")
        _check_field(f"{path}?", qf, value)
    if not ep.has_body:
        if body not in (None, {}):
            if strict:
                raise ContractError(f"{path}: takes no request body, got {_type_name(body)}")
        return
    if not isinstance(body, dict):
        raise ContractError(f"{path}: request body must be a JSON object, got {_type_name(body)}")
    fields = ep.field_map()
    for f in ep.fields:
        if f.required and f.name not in body:
            raise ContractError(f"{path}: missing required field '{f.name}'")
    for key, value in body.items():
        f = fields.get(key)
        if f is None:
            if strict:
                raise ContractError(f"{path}: unknown field '{key}' (not in the contract table)")
            continue
        _check_field(f"{path}: ", f, value)
    if ep.one_of:
        given = [k for k in ep.one_of if body.get(k) is not None]
        if len(given) != 1:
            raise ContractError(f"{path}: exactly one of {', '.join(ep.one_of)} must be given, got {given or 'none'}")
    if path == "/generate":
        sp = body.get("sampling_params")
        if isinstance(sp, list):
            for i, p in enumerate(sp):
                validate_sampling_params(p, where=f"sampling_params[{i}].")
        elif sp is not None:
            validate_sampling_params(sp)
    if path == "/pause_generation" and body.get("mode", "abort") not in PAUSE_MODES:
        raise ContractError(f"/pause_generation: mode={body.get('mode')!r}, expected one of {PAUSE_MODES}")
