"""The rollout servers' API key: made per run when a server listens beyond loopback, kept off every command line.

A server bound to anything but loopback (``--host 0.0.0.0`` on a rollout node) can be reached from the whole cluster
network; without a key anyone there could call ``/generate``, ``/update_weights_from_disk`` (load any folder as the
policy) or ``/pause_generation``. So such servers get a key, and every client call sends it as
``Authorization: Bearer <key>`` (what SGLang's ``--api-key`` expects; see `sglang.srt.utils.auth`).

Where the key lives and how it travels (never on a command line: ``ps`` shows every process's argv to every user):

* ``<run_dir>/rollout_api_key`` (`KEY_FILE_NAME`), mode 0600, made once per run folder by the first process that needs
  it (`ensure_key_file`: written under a temporary name, then hard-linked into place, so concurrent node runners all
  end up with the same key). Delete it to rotate the key (restart the servers).
* servers and clients get it through the environment: ``DASD_ROLLOUT_API_KEY`` (the key) or
  ``DASD_ROLLOUT_API_KEY_FILE`` (a path to it). Clients also find ``$DASD_RUN_DIR/rollout_api_key``, the run folder
  every process of a launched job has in its environment (`key_from_env`).
* the built-in server reads ``DASD_ROLLOUT_API_KEY`` / ``--api-key-file``. SGLang has no environment variable for its
  key, and ``--api-key KEY`` would show it in ``ps``: it gets ``--config <file>.yaml`` instead (`write_sglang_config`),
  a mode-0600 YAML file with ``api-key: <key>`` that ``sglang.launch_server`` merges into its arguments in-process
  (SGLang's ``--config``; an SGLang too old to have it stops at start on the unknown flag). What then still shows
  the key: SGLang versions that log their ``server_args`` (the ``server_args=ServerArgs(... api_key=...)`` line)
  write it to the server's log — the manager creates its log files with mode 0600, and a rollout node's servers log
  to the job's output file, which should be private too; ``/server_info`` of SGLang versions that return the
  resolved arguments (only to callers holding the key); and ``/proc/<pid>/environ`` of the built-in server and of
  the clients, readable only by their own user and root.

Servers bound to loopback only (the single-node trainer's) may run without a key: only this machine's users reach them.
"""

from __future__ import annotations

import ipaddress
import os
import secrets
import stat
from typing import Mapping, Optional

__all__ = ["API_KEY_ENV", "API_KEY_FILE_ENV", "KEY_FILE_NAME", "SGLANG_CONFIG_NAME", "RUN_DIR_ENV", "AuthError",
           "is_loopback", "new_key", "ensure_key_file", "read_key_file", "key_from_env", "server_key_from_env",
           "write_private_file", "write_sglang_config", "bearer_matches"]

API_KEY_ENV = "DASD_ROLLOUT_API_KEY"
API_KEY_FILE_ENV = "DASD_ROLLOUT_API_KEY_FILE"
RUN_DIR_ENV = "DASD_RUN_DIR"  # set for every process of a launched job (dasd_megatron.launch.environment)
KEY_FILE_NAME = "rollout_api_key"
SGLANG_CONFIG_NAME = "rollout_api_key.sglang.yaml"


class AuthError(RuntimeError):
    """A key file that is missing, empty or readable by others (the message says how to fix it)."""


def is_loopback(host: str) -> bool:
    """True for hosts only this machine can reach: 127.0.0.0/8, ::1, 'localhost'. '0.0.0.0', '' and names are not."""
    h = host.strip().strip("[]")
    if h.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(h).is_loopback
    except ValueError:
        return False


def new_key() -> str:
    """A fresh 256-bit key (hex: safe in a header, a file and YAML)."""
    return secrets.token_hex(32)


def write_private_file(path: str, text: str) -> str:
    """Write `text` to `path` with mode 0600 from the first byte (temporary name, then an atomic rename)."""
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}.{secrets.token_hex(4)}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.chmod(tmp, 0o600)  # in case a umask or ACL widened it
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def read_key_file(path: str) -> str:
    """The key in `path`; refuses a file that others can read (then the key is no secret)."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise AuthError(f"API key file {path} does not exist. Fix: point {API_KEY_FILE_ENV} at the run folder's "
                        f"{KEY_FILE_NAME} (made by the rollout node runner)") from None
    if st.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise AuthError(f"API key file {path} has mode {stat.S_IMODE(st.st_mode):04o}: other users can read the key. "
                        f"Fix: chmod 600 {path} and rotate the key (delete the file, restart the servers)")
    with open(path) as f:
        key = f.read().strip()
    if not key:
        raise AuthError(f"API key file {path} is empty. Fix: delete it; the next server start makes a new key")
    return key


def ensure_key_file(run_dir: str) -> tuple[str, str]:
    """`(key, path)` of the run's key file, making it (mode 0600) if it does not exist yet.

    Safe when several processes (node runners on a shared file system) call it at once: the key is written under a
    private temporary name and hard-linked to the final name, which fails if another process got there first; then
    everybody reads the winner's key.
    """
    path = os.path.join(run_dir, KEY_FILE_NAME)
    if not os.path.exists(path):
        os.makedirs(run_dir, exist_ok=True)
        tmp = f"{path}.tmp{os.getpid()}.{secrets.token_hex(4)}"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            with os.fdopen(fd, "w") as f:
                f.write(new_key() + "\n")
            os.chmod(tmp, 0o600)
            try:
                os.link(tmp, path)
            except FileExistsError:
                pass
        finally:
            os.unlink(tmp)
    return read_key_file(path), path


def server_key_from_env(env: Mapping[str, str] = os.environ) -> Optional[str]:
    """A server's key: ``$DASD_ROLLOUT_API_KEY``, else the file ``$DASD_ROLLOUT_API_KEY_FILE``, else None."""
    key = env.get(API_KEY_ENV, "").strip()
    if key:
        return key
    path = env.get(API_KEY_FILE_ENV, "").strip()
    return read_key_file(path) if path else None


def key_from_env(env: Mapping[str, str] = os.environ) -> Optional[str]:
    """A client's key: as `server_key_from_env`, else ``$DASD_RUN_DIR/rollout_api_key`` if that exists, else None."""
    key = server_key_from_env(env)
    if key:
        return key
    run_dir = env.get(RUN_DIR_ENV, "").strip()
    if run_dir and os.path.exists(os.path.join(run_dir, KEY_FILE_NAME)):
        return read_key_file(os.path.join(run_dir, KEY_FILE_NAME))
    return None


def write_sglang_config(path: str, key: str) -> str:
    """A mode-0600 YAML file for ``sglang.launch_server --config PATH`` that sets ``api-key`` (the key stays off argv).

    SGLang requires the name to end in .yaml/.yml; flags given on its command line override the file's.
    """
    if not path.endswith((".yaml", ".yml")):
        raise ValueError(f"SGLang config {path!r}: SGLang's --config needs a .yaml or .yml file name")
    if not key or any(c in key for c in "\"\\\n\r"):
        raise ValueError("API key for SGLang: must be non-empty, without quotes, backslashes or newlines")
    return write_private_file(path, f'api-key: "{key}"\n')


def bearer_matches(authorization: Optional[str], key: str) -> bool:
    """Whether an ``Authorization`` header carries ``Bearer <key>`` (scheme case-insensitive, constant-time compare)."""
    import hmac

    if not authorization:
        return False
    scheme, _, token = authorization.strip().partition(" ")
    if scheme.lower() != "bearer":
        return False
    return hmac.compare_digest(token.strip().encode("utf-8", "surrogateescape"), key.encode("utf-8"))
