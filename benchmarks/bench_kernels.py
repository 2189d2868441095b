"""Kernel benchmark of issue 4: ``python benchmarks/bench_kernels.py [--quick] [--write PATH]``.

Same as ``bnlab bench``; see :mod:`bnlab.bench` for the columns.
"""

from __future__ import annotations

import sys

from bnlab.bench import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
