"""Rollouts for dasd-megatron: an SGLang HTTP client, server supervision, weight sync, and a built-in server.

- `sglang_rollout.rollout_client`: `RolloutClient` (token ids in; G samples per prompt with sampled log-probs and the
  weight version out), `SamplingConfig`, `ClientConfig`, `Sample`.
- `sglang_rollout.manager`: `ServerManager` launches and supervises `sglang.launch_server` (or built-in server)
  processes from `ServerConfig`s and restarts dead or hung ones.
- `sglang_rollout.weight_sync`: `WeightSync` with the `TensorTransport`, `DistributedTransport` and
  `DiskTransport` (pause, flush, update, continue; versioned; bucket plan computed once).
- `sglang_rollout.builtin_server`: the built-in rollout server (NOT SGLang): the subset of SGLang's HTTP API the
  client uses, served from a HF model folder on CPU, for machines where SGLang cannot run.
- `sglang_rollout.contract`: that API subset as a data table (transcribed from docs/SGLANG_HTTP_API.md), used by
  the built-in server's validation and the contract tests.
"""
