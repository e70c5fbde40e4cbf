"""The benchmark scripts import each other by module name (``from common import ...``), as
they do when run as ``python benchmarks/X.py``: put benchmarks/ on the path for their tests."""

import sys
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"
if str(BENCHMARKS) not in sys.path:
    sys.path.insert(0, str(BENCHMARKS))
