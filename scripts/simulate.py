"""`python scripts/simulate.py [options]` is `settlement simulate [options]`: see `--help`."""

from __future__ import annotations

import sys

from settlement.cli.main import app

if __name__ == "__main__":
    sys.exit(app(["simulate", *sys.argv[1:]]))
