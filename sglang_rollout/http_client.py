"""A small JSON-over-HTTP/1.1 client for SGLang servers (standard library only).

Keep-alive connections are pooled per thread and server. Every call has a timeout (connect and read). Failures
are classified for the retry logic above it:

* `ConnectError`   - refused / reset / closed before a response: the server is down or restarting (retryable);
* `RequestTimeout` - no (complete) response within the timeout: a hung or overloaded server (retryable);
* `HTTPStatusError`- a non-2xx answer; retryable for 5xx and 429, not for other 4xx (a bad request stays bad);
* `ProtocolError`  - a 2xx answer whose body is not the JSON it should be (not retryable: a broken server).

All of them derive from `ServerError` and carry the server URL and endpoint in their message.

API key: every request carries ``Authorization: Bearer <key>`` when the client has one. ``HttpClient()`` without
``api_key`` finds it in the environment (``DASD_ROLLOUT_API_KEY``, ``DASD_ROLLOUT_API_KEY_FILE``, or the run folder's
``rollout_api_key`` via ``DASD_RUN_DIR``; see `sglang_rollout.auth`), so code that builds clients needs no change when
the servers require a key; ``api_key=""`` sends none. A 401 re-reads the key (it may have been made or rotated since)
and retries once with the new one.
"""

from __future__ import annotations

import http.client
import json
import socket
import threading
from dataclasses import dataclass
from typing import Any, Callable, Optional
from urllib.parse import urlencode, urlsplit

from sglang_rollout.auth import API_KEY_ENV, API_KEY_FILE_ENV, AuthError, key_from_env

__all__ = [
    "HttpClient",
    "Response",
    "ServerError",
    "ConnectError",
    "RequestTimeout",
    "HTTPStatusError",
    "ProtocolError",
]


class ServerError(RuntimeError):
    """A failed call to a rollout server."""

    retryable = False

    def __init__(self, url: str, path: str, message: str):
        super().__init__(f"{url}{path}: {message}")
        self.url, self.path = url, path


class ConnectError(ServerError):
    retryable = True


class RequestTimeout(ServerError):
    retryable = True


class HTTPStatusError(ServerError):
    def __init__(self, url: str, path: str, status: int, message: str):
        super().__init__(url, path, f"HTTP {status}: {message}")
        self.status = status
        self.server_message = message
        self.retryable = status >= 500 or status == 429


class ProtocolError(ServerError):
    retryable = False


@dataclass
class Response:
    status: int
    data: Any  # parsed JSON, or the text for text/plain answers, or None for an empty body
    raw: bytes


def _error_message(raw: bytes) -> str:
    text = raw.decode("utf-8", "replace").strip()
    try:
        obj = json.loads(text)
    except ValueError:
        return text[:2000] or "(empty body)"
    if isinstance(obj, dict):
        err = obj.get("error", obj.get("detail", obj.get("message")))
        if isinstance(err, dict):
            err = err.get("message", err)
        if err is not None:
            return str(err)[:2000]
    return text[:2000]


class HttpClient:
    """JSON requests to rollout servers with pooled keep-alive connections and bounded timeouts."""

    def __init__(self, *, api_key: Optional[str] = None, connect_timeout_s: float = 5.0,
                 on_request: Optional[Callable[[str, str, str, Any], None]] = None):
        #: None: from the environment (see module docstring), now and again after a 401; "": never send a key
        self._key_from_env = api_key is None
        self.api_key = _env_key() if api_key is None else api_key
        self.connect_timeout_s = connect_timeout_s
        #: called as on_request(url, method, path, body) with the body exactly as encoded (tests record it)
        self.on_request = on_request
        self._local = threading.local()

    def _conn(self, netloc: str, fresh: bool) -> tuple[http.client.HTTPConnection, bool]:
        pool = getattr(self._local, "pool", None)
        if pool is None:
            pool = self._local.pool = {}
        conn = pool.get(netloc)
        if conn is not None and not fresh:
            return conn, True
        if conn is not None:
            conn.close()
        host, _, port = netloc.rpartition(":")
        conn = http.client.HTTPConnection(host, int(port), timeout=self.connect_timeout_s)
        pool[netloc] = conn
        return conn, False

    def _drop(self, netloc: str) -> None:
        pool = getattr(self._local, "pool", {})
        conn = pool.pop(netloc, None)
        if conn is not None:
            conn.close()

    def close(self) -> None:
        for netloc in list(getattr(self._local, "pool", {})):
            self._drop(netloc)

    def request(self, url: str, method: str, path: str, body: Any = None, *, timeout_s: float,
                query: Optional[dict] = None) -> Response:
        """One request; raises a `ServerError` subclass on failure (see module docstring)."""
        parts = urlsplit(url)
        if parts.scheme != "http" or not parts.port:
            raise ValueError(f"server url {url!r}: expected http://host:port")
        target = path + (f"?{urlencode(query)}" if query else "")
        data = None if body is None else json.dumps(body).encode()
        headers = {"Accept": "application/json"}
        if data is not None:
            headers["Content-Type"] = "application/json"
        if self.on_request is not None:
            self.on_request(url, method, path, None if data is None else json.loads(data))
        status, ctype, raw = self._send(url, parts.netloc, method, path, target, data, headers, timeout_s)
        if status == 401 and self._key_from_env:  # the key may have been made (or rotated) since we read it
            key = _env_key()
            if key and key != self.api_key:
                self.api_key = key
                status, ctype, raw = self._send(url, parts.netloc, method, path, target, data, headers, timeout_s)
        if status == 401:
            raise HTTPStatusError(url, path, status, f"{_error_message(raw)}: "
                                  + ("the key this client sent was refused" if self.api_key else
                                     "the server requires an API key and this client has none")
                                  + f". Fix: give the client the servers' key ({API_KEY_ENV}, or {API_KEY_FILE_ENV} "
                                    "pointing at the run folder's rollout_api_key)")
        if not 200 <= status < 300:
            raise HTTPStatusError(url, path, status, _error_message(raw))
        if not raw.strip():
            return Response(status, None, raw)
        if "json" in ctype or raw.lstrip()[:1] in (b"{", b"["):
            try:
                return Response(status, json.loads(raw), raw)
            except (ValueError, UnicodeDecodeError) as e:
                raise ProtocolError(url, path, f"malformed JSON in a {status} response ({e}): "
                                    f"{raw[:200]!r}") from None
        return Response(status, raw.decode("utf-8", "replace"), raw)

    def _send(self, url: str, netloc: str, method: str, path: str, target: str, data: Optional[bytes],
              headers: dict, timeout_s: float) -> tuple[int, str, bytes]:
        """One exchange on a pooled connection: (status, content type, body); connection failures raise."""
        headers = dict(headers)
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        for fresh in (False, True):
            conn, reused = self._conn(netloc, fresh)
            connecting = conn.sock is None
            try:
                if connecting:
                    conn.connect()
                    conn.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                    connecting = False
                conn.sock.settimeout(timeout_s)
                conn.request(method, target, body=data, headers=headers)
                resp = conn.getresponse()
                raw = resp.read()
                if resp.will_close:
                    self._drop(netloc)
                return resp.status, resp.getheader("Content-Type", ""), raw
            except socket.timeout:
                self._drop(netloc)
                if connecting:
                    raise ConnectError(url, path, f"connect timed out after {self.connect_timeout_s}s") from None
                raise RequestTimeout(url, path, f"no response within the {timeout_s}s timeout") from None
            except (ConnectionError, http.client.HTTPException, OSError) as e:
                self._drop(netloc)
                # A pooled keep-alive connection the server already closed: retry once on a fresh one.
                if reused and isinstance(e, (http.client.RemoteDisconnected, BrokenPipeError,
                                             ConnectionResetError)):
                    continue
                raise ConnectError(url, path, f"{type(e).__name__}: {e}") from None
        raise AssertionError("unreachable")  # the fresh attempt either returns or raises


def _env_key() -> Optional[str]:
    """The key from the environment (see `sglang_rollout.auth.key_from_env`); a broken key file is an error."""
    try:
        return key_from_env()
    except AuthError as e:
        raise AuthError(f"rollout client: {e}") from None
