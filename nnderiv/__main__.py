"""``python -m nnderiv``: the command line (see :mod:`nnderiv.cli`)."""

from .cli import main

if __name__ == "__main__":
    raise SystemExit(main())
