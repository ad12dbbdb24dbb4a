"""``python -m diffrl.reward_servers serve NAME ...`` (same as ``diffrl reward serve NAME ...``)."""

import sys

from diffrl.reward_servers.cli import main

if __name__ == "__main__":
    sys.exit(main())
