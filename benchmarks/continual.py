#!/usr/bin/env python
"""Continual stream benchmark of CA-SAM and its baselines (same as ``casam benchmark``).

Examples::

    python benchmarks/continual.py --help
    python benchmarks/continual.py --quick --out /tmp/bench          # smoke run, < 1 min
    python benchmarks/continual.py --epochs 4 --max-images 48        # reduced CPU recipe (results in benchmarks/results/)
    python benchmarks/continual.py --full                            # METHOD.md recipe (24 epochs, all images; GPU)
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from casam.evaluation.benchmark import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
