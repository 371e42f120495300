"""`python -m dasd_megatron.eval eval ...` / `... eval-report ...` (until `dasd eval` is wired in)."""

import sys

from dasd_megatron.eval.cli import main

if __name__ == "__main__":
    sys.exit(main())
