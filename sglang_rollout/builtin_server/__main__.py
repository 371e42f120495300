"""`python -m sglang_rollout.builtin_server --model-path DIR --host 127.0.0.1 --port PORT [--api-key KEY]`."""

from sglang_rollout.builtin_server.server import main

if __name__ == "__main__":
    main()
