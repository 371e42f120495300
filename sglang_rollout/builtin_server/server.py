"""The built-in rollout server: HTTP plumbing and lifecycle (a real HTTP/1.1 server on real sockets).

This is NOT SGLang. It serves the subset of SGLang's HTTP API the rollout client uses (see `api.py` and
`sglang_rollout.contract`) from a HF model folder on CPU, for machines where SGLang cannot run (CPU machines, CI).

Run it as a process (what `ServerManager` does)::

    python -m sglang_rollout.builtin_server --model-path /path/to/hf --host 127.0.0.1 --port 30000

or in-process for tests: ``BuiltinServer(ServerArgs(model_path=..., port=0)).start()`` then ``.url``.

The socket is bound before the model loads; `/health` answers 503 until the model is ready, then 200 (as SGLang).

API key (see `sglang_rollout.auth`): with a key, every endpoint but `/health*` (as SGLang, so probes need no secret)
needs ``Authorization: Bearer <key>`` — 401 ``{"error": "Unauthorized"}`` otherwise, checked before the route and
the body, compared in constant time. The process takes its key from ``$DASD_ROLLOUT_API_KEY``, ``--api-key-file PATH``
(mode 0600) or ``$DASD_ROLLOUT_API_KEY_FILE``; ``--api-key KEY`` works (SGLang's flag) but shows the key to everyone
in ``ps``. A server bound beyond loopback (e.g. ``--host 0.0.0.0``) refuses to start without a key.

LoRA (SGLang's flags): ``--enable-lora --max-lora-rank 16 --lora-target-modules q_proj v_proj`` (or ``all``),
``--lora-paths name=/adapter/folder ...`` (loaded at start; implies ``--enable-lora``, and gives the rank / target
modules when those flags are left out), ``--max-loras-per-batch 8`` (accepted for parity: a built-in batch runs
one adapter). ``--lora-unload-wait-s`` bounds how long an unload waits for in-flight requests (built-in only).
"""

from __future__ import annotations

import argparse
import json
import logging
import socket
import threading
from dataclasses import dataclass, fields
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Optional
from urllib.parse import parse_qs, urlsplit

from sglang_rollout.auth import API_KEY_ENV, API_KEY_FILE_ENV, bearer_matches, is_loopback, read_key_file, \
    server_key_from_env
from sglang_rollout.builtin_server.api import LORA_ROUTES, ROUTES, Api, Reply
from sglang_rollout.contract import ContractError, endpoint, validate_body
from sglang_rollout.supervise import PARENT_PID_ENV, ProcessWatch

log = logging.getLogger(__name__)

_ALIASES = {"/get_model_info": "/model_info", "/get_server_info": "/server_info"}
_MAX_BODY = 1 << 30
_MAX_UNAUTHORIZED_BODY = 1 << 20


@dataclass
class ServerArgs:
    """Command-line arguments of the built-in server (names follow `sglang.launch_server` where shared)."""

    model_path: str
    host: str = "127.0.0.1"
    port: int = 30000
    api_key: Optional[str] = None
    #: file holding the key (mode 0600); keeps it off the command line
    api_key_file: Optional[str] = None
    dtype: str = "float32"
    max_batch_size: int = 64
    random_seed: int = 0
    weight_version: str = "default"
    served_model_name: Optional[str] = None
    tp_size: int = 1
    mem_fraction_static: Optional[float] = None  # accepted for launch-flag parity; meaningless on CPU
    enable_memory_saver: bool = False  # idem
    dist_timeout_s: float = 300.0
    log_level: str = "info"
    #: LoRA (SGLang's flags; see the module docstring)
    enable_lora: bool = False
    max_lora_rank: Optional[int] = None
    lora_target_modules: Optional[tuple[str, ...]] = None
    lora_paths: tuple[str, ...] = ()
    max_loras_per_batch: int = 8
    lora_unload_wait_s: float = 30.0

    def __post_init__(self) -> None:
        from sglang_rollout.builtin_server.lora import parse_lora_paths, resolve_target_modules

        if self.tp_size != 1:
            raise ValueError(f"--tp-size {self.tp_size}: the built-in server runs one process (tp_size 1)")
        if self.max_batch_size < 1:
            raise ValueError(f"--max-batch-size {self.max_batch_size}: must be >= 1")
        if isinstance(self.lora_target_modules, str):
            self.lora_target_modules = (self.lora_target_modules,)
        if self.lora_target_modules is not None:
            self.lora_target_modules = tuple(self.lora_target_modules)
            resolve_target_modules(self.lora_target_modules)  # names checked here
        self.lora_paths = (self.lora_paths,) if isinstance(self.lora_paths, str) else tuple(self.lora_paths or ())
        parse_lora_paths(self.lora_paths)
        if self.lora_paths:
            self.enable_lora = True  # as SGLang: initial adapters turn LoRA on
        if self.max_lora_rank is not None and self.max_lora_rank < 1:
            raise ValueError(f"--max-lora-rank {self.max_lora_rank}: must be >= 1")
        if self.max_loras_per_batch < 1:
            raise ValueError(f"--max-loras-per-batch {self.max_loras_per_batch}: must be >= 1")
        if self.enable_lora and not self.lora_paths and (self.max_lora_rank is None or not self.lora_target_modules):
            raise ValueError("--enable-lora without --lora-paths needs both --max-lora-rank and "
                             "--lora-target-modules (SGLang's rule: nothing to infer them from). Fix: e.g. "
                             "--max-lora-rank 64 --lora-target-modules all")
        if not self.enable_lora and (self.max_lora_rank is not None or self.lora_target_modules):
            raise ValueError("--max-lora-rank / --lora-target-modules given without --enable-lora. Fix: add "
                             "--enable-lora")


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "dasd-builtin-rollout-server"

    def setup(self):
        super().setup()
        # Headers and body go out as two writes: without NODELAY, Nagle + the client's delayed ACK add ~40 ms.
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def log_message(self, fmt, *args):  # route http.server's access log through logging
        log.debug("%s %s", self.address_string(), fmt % args)

    def do_GET(self):
        self._dispatch("GET")

    def do_POST(self):
        self._dispatch("POST")

    def do_PUT(self):
        self._dispatch("PUT")

    def _send(self, reply: Reply) -> None:
        if reply.text:
            data, ctype = str(reply.body).encode(), "text/plain; charset=utf-8"
        else:
            data, ctype = json.dumps(reply.body).encode(), "application/json"
        self.send_response(reply.status)
        if reply.status == 401:
            self.send_header("WWW-Authenticate", "Bearer")
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _dispatch(self, method: str) -> None:
        api: Api = self.server.api  # type: ignore[attr-defined]
        parts = urlsplit(self.path)
        path = _ALIASES.get(parts.path, parts.path)
        try:
            length = int(self.headers.get("Content-Length") or 0)
        except ValueError:
            length = -1
        key = api.args.api_key
        if key and not parts.path.startswith("/health") and not bearer_matches(self.headers.get("Authorization"), key):
            # before the route: a caller without the key learns nothing about endpoints. A small body is drained
            # (closing on unread data resets the connection, and the client would see that instead of the 401); a
            # large one is not read at all
            if 0 <= length <= _MAX_UNAUTHORIZED_BODY:
                self.rfile.read(length)
            else:
                self.close_connection = True
            return self._send(Reply(401, {"error": "Unauthorized"}))
        if length < 0 or length > _MAX_BODY:
            self.close_connection = True
            return self._send(Reply(400, {"error": "bad or missing Content-Length"}))
        raw = self.rfile.read(length) if length else b""
        route = ROUTES.get(parts.path) or LORA_ROUTES.get(parts.path)
        if route is None:
            return self._send(Reply(404, {"error": f"no endpoint {parts.path}"}))
        methods, handler = route
        if method not in methods:
            return self._send(Reply(405, {"error": f"{parts.path} takes {'/'.join(methods)}, not {method}"}))
        if not api.ready and not path.startswith("/health"):
            return self._send(Reply(503, {"error": "server is starting"}))
        try:
            body = json.loads(raw) if raw.strip() else {}
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            return self._send(Reply(400, {"error": f"invalid JSON body: {e}"}))
        query = {k: v[-1] for k, v in parse_qs(parts.query).items()}
        try:
            ep = endpoint(path)
            if ep is not None and ep.has_body:
                validate_body(path, body)
            reply = getattr(api, handler)(body, query)
        except ContractError as e:
            reply = Reply(400, {"error": str(e)})
        except Exception as e:  # noqa: BLE001 - a server bug must still answer, as a 500
            log.exception("%s %s failed", method, path)
            reply = Reply(500, {"error": f"internal error: {type(e).__name__}: {e}"})
        self._send(reply)


class _HTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 128


class BuiltinServer:
    """One built-in rollout server (HTTP thread + scheduler thread) in this process."""

    def __init__(self, args: ServerArgs):
        if not args.api_key and not is_loopback(args.host):
            raise ValueError(f"built-in rollout server: host {args.host!r} listens beyond loopback without an API key. "
                             "Fix: pass ServerArgs(api_key=...) (see sglang_rollout.auth), or bind 127.0.0.1")
        self.args = args
        self.api = Api(args)
        self.httpd = _HTTPServer((args.host, args.port), _Handler)
        self.httpd.api = self.api  # type: ignore[attr-defined]
        self.port = self.httpd.server_address[1]
        self._thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05},
                                        name="builtin-http", daemon=True)

    @property
    def url(self) -> str:
        return f"http://{self.args.host}:{self.port}"

    def start(self) -> "BuiltinServer":
        """Serve (health 503) and load the model in this thread; returns once ready."""
        self._thread.start()
        self.api.load()
        log.info("built-in rollout server ready at %s (model %s)", self.url, self.args.model_path)
        return self

    def shutdown(self) -> None:
        self.api.shutdown()
        self.httpd.shutdown()
        self.httpd.server_close()
        self._thread.join(timeout=5)

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.shutdown()


def parse_args(argv: Optional[list[str]] = None) -> ServerArgs:
    p = argparse.ArgumentParser(prog="python -m sglang_rollout.builtin_server",
                                description="Built-in rollout server (a CPU stand-in for SGLang's HTTP API).")
    for f in fields(ServerArgs):
        flag = "--" + f.name.replace("_", "-")
        if f.type in ("bool", bool):
            p.add_argument(flag, action="store_true")
        elif f.name == "model_path":
            p.add_argument(flag, required=True)
        elif "tuple[str" in str(f.type):  # --lora-target-modules q_proj v_proj, --lora-paths a=/p b=/q
            p.add_argument(flag, nargs="+", default=f.default)
        else:
            conv = {"int": int, "float": float, "Optional[float]": float, "Optional[int]": int}.get(str(f.type), str)
            p.add_argument(flag, type=conv, default=f.default)
    return ServerArgs(**vars(p.parse_args(argv)))


def main(argv: Optional[list[str]] = None) -> None:
    import os
    import signal

    args = parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(),
                        format="%(asctime)s %(levelname)s builtin-server[%(process)d] %(name)s: %(message)s")
    try:
        args.api_key = resolve_api_key(args)
    except (ValueError, OSError) as e:
        raise SystemExit(f"built-in rollout server: {e}") from None
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    stop, done = threading.Event(), threading.Event()
    signal.signal(signal.SIGTERM, lambda *a: stop.set())
    signal.signal(signal.SIGINT, lambda *a: stop.set())
    parent = int(os.environ.get(PARENT_PID_ENV, "0") or 0)
    if parent:  # watched from the start: a launcher killed while the model loads must not leave us behind
        threading.Thread(target=_watch_parent, args=(parent, stop, done), name="parent-watch", daemon=True).start()
    server = BuiltinServer(args)
    server.start()
    print(f"built-in rollout server listening on {server.url}", flush=True)
    while not stop.wait(0.5):  # poll: a signal delivered to another thread only runs when the main thread wakes
        pass
    server.shutdown()
    done.set()


def _watch_parent(pid: int, stop: threading.Event, done: threading.Event, poll_s: float = 0.5,
                  grace_s: float = 2.0) -> None:
    """Stop the server when process `pid` (its launcher) is gone; exit outright if a clean stop takes too long
    (e.g. still loading the model)."""
    import os

    watch = ProcessWatch(pid, as_parent=pid == os.getppid())
    while not stop.wait(poll_s):
        if not watch.alive():
            logging.getLogger(__name__).warning("launcher pid %d is gone: shutting down", pid)
            stop.set()
            if not done.wait(grace_s):
                os._exit(0)
            return


def resolve_api_key(args: ServerArgs, env=None) -> Optional[str]:
    """The key the server process checks: --api-key, else --api-key-file, else $DASD_ROLLOUT_API_KEY(_FILE).

    Raises ValueError for a server bound beyond loopback without a key (anyone on the network could drive it).
    """
    import os

    env = os.environ if env is None else env
    key = args.api_key
    if key:
        logging.getLogger(__name__).warning("--api-key on the command line is visible to every user in `ps`; use "
                                            "$%s or --api-key-file", API_KEY_ENV)
    elif args.api_key_file:
        key = read_key_file(args.api_key_file)
    else:
        key = server_key_from_env(env)
    if not key and not is_loopback(args.host):
        raise ValueError(f"--host {args.host} listens beyond loopback but no API key is set: anyone on the network "
                         "could generate, pause the server or load any folder as its weights. Fix: set "
                         f"${API_KEY_ENV} (or ${API_KEY_FILE_ENV} / --api-key-file PATH, mode 0600), or bind "
                         "--host 127.0.0.1")
    return key or None
