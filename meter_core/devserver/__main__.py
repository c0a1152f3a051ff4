"""``python -m meter_core.devserver``: the same as ``python -m meter_core devserver``."""

import sys

from meter_core.cli import main

raise SystemExit(main(["devserver", *sys.argv[1:]]))
