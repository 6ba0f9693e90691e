#!/usr/bin/env python
"""Continual stream benchmark of CA-SAM and its baselines (same as ``casam benchmark``).

Examples::

    python benchmarks/continual.py --help
    python benchmarks/continual.py --quick --out /tmp/bench          # smoke run, < 1 min
    python benchmarks/continual.py --epochs 4 --max-images 48        # reduced CPU recipe (benchmarks/results/)
    python benchmarks/continual.py --full                            # the method's recipe (24 epochs; GPU)
"""

import sys

from casam.evaluation.benchmark import main

if __name__ == "__main__":
    sys.exit(main())
