"""The benchmark suite: ``python benchmarks/bench.py [--quick] [--help]``.

The same as ``nnderiv bench``; the code lives in ``nnderiv/bench/`` so that the
installed command has it. Run from here, the JSON goes to ``benchmarks/results/``.
"""

import sys
from pathlib import Path

from nnderiv.bench import main

if __name__ == "__main__":
    sys.exit(main(default_dir=Path(__file__).resolve().parent / "results"))
