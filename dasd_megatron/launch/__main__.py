"""`python -m dasd_megatron.launch submit ...` — see `dasd_megatron.launch.cli`."""

import sys

from dasd_megatron.launch.cli import main

if __name__ == "__main__":
    sys.exit(main())
