"""`python -m dasd_megatron.eval eval|eval-report ...`: the parsers of `dasd eval` / `dasd eval-report`."""

import sys

from dasd_megatron.eval.cli import main

if __name__ == "__main__":
    sys.exit(main())
