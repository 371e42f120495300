"""A stand-in for `python -m sglang.launch_server` (SGLang cannot run here): put `make_fake_sglang(dir)` on PYTHONPATH.

It does what matters to the launch code: parses SGLang's flags, merges ``--config FILE.yaml`` the way SGLang does
(YAML keys become flags, command-line flags win), and serves on ``--host:--port`` with SGLang's auth rule: every path
but ``/health*`` needs ``Authorization: Bearer <api-key>`` when a key is set (401 ``{"error": "Unauthorized"}``).
It writes ``{"argv", "api_key", "pid", "config"}`` to ``$FAKE_SGLANG_OUT`` once listening, and starts a child process
of its own (as SGLang starts its scheduler), whose pid is in that file too.
"""

from __future__ import annotations

import os
import textwrap

LAUNCH_SERVER = textwrap.dedent('''
    import argparse, json, os, subprocess, sys, threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    import yaml

    argv = sys.argv[1:]
    config = None
    if "--config" in argv:  # SGLang's ConfigArgumentMerger: config args first, command-line args after (they win)
        i = argv.index("--config")
        config = argv[i + 1]
        assert config.endswith((".yaml", ".yml")), config
        with open(config) as f:
            data = yaml.safe_load(f) or {}
        merged = []
        for k, v in data.items():
            merged += [f"--{k}", str(v)]
        argv = merged + argv[:i] + argv[i + 2:]
    ap = argparse.ArgumentParser()
    ap.add_argument("--model-path", required=True)
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=30000)
    ap.add_argument("--api-key", default=None)
    args, _ = ap.parse_known_args(argv)
    key = args.api_key

    class H(BaseHTTPRequestHandler):
        def log_message(self, *a):
            pass

        def _reply(self, status, body):
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def _handle(self):
            n = int(self.headers.get("Content-Length") or 0)
            if n:
                self.rfile.read(n)
            if self.path.startswith("/health"):
                return self._reply(200, {})
            if key and self.headers.get("Authorization") != "Bearer " + key:
                return self._reply(401, {"error": "Unauthorized"})
            if self.path == "/model_info":
                return self._reply(200, {"model_path": args.model_path, "weight_version": "default"})
            return self._reply(404, {"error": "no " + self.path})

        do_GET = do_POST = _handle

    httpd = ThreadingHTTPServer((args.host, args.port), H)
    helper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])  # like SGLang's scheduler
    out = os.environ.get("FAKE_SGLANG_OUT")
    if out:
        with open(out + ".tmp", "w") as f:
            json.dump({"argv": sys.argv, "api_key": key, "pid": os.getpid(), "helper_pid": helper.pid,
                       "config": config}, f)
        os.replace(out + ".tmp", out)
    print("fake sglang listening", flush=True)
    httpd.serve_forever()
''')


def make_fake_sglang(root: str) -> str:
    """Write the fake `sglang` package under `root`; returns `root` (to prepend to PYTHONPATH)."""
    pkg = os.path.join(root, "sglang")
    os.makedirs(pkg, exist_ok=True)
    with open(os.path.join(pkg, "__init__.py"), "w") as f:
        f.write('"""Fake SGLang for tests (see tests/fake_sglang.py)."""\n')
    with open(os.path.join(pkg, "launch_server.py"), "w") as f:
        f.write(LAUNCH_SERVER)
    return root
