"""The built-in rollout server: SGLang's HTTP API subset served from a HF model on CPU (not SGLang).

`BuiltinServer(ServerArgs(...)).start()` runs one in this process; `python -m sglang_rollout.builtin_server
--model-path ... --port ...` runs one as a process (what `sglang_rollout.manager.ServerManager` launches).
"""

from sglang_rollout.builtin_server.server import BuiltinServer, ServerArgs, main, parse_args

__all__ = ["BuiltinServer", "ServerArgs", "main", "parse_args"]
