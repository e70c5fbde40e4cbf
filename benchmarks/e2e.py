"""End-to-end benchmark runner (the implementation is eekernels/e2e.py, also `eekernels bench`).

    python benchmarks/e2e.py --out e2e-results            # GPU: BERT-base shape, fp16
    python benchmarks/e2e.py --tiny --device cpu --batch-sizes 1,8 --repeats 3
"""

import argparse
import sys

from eekernels import e2e

if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__)
    e2e.add_arguments(p)
    sys.exit(e2e.main(p.parse_args()))
