"""``python -m meter_core``: the same commands as the ``meter`` console script."""

from meter_core.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
