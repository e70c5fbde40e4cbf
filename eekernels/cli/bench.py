"""``eekernels bench``: the end-to-end benchmark, which lives in ``benchmarks/e2e.py`` of a
source checkout (benchmark code is not part of the package). Its flags pass through."""

from __future__ import annotations

import os
import subprocess
import sys

from .errors import user_error


def script_path():
    """``benchmarks/e2e.py`` beside the package in a source checkout, or None."""
    here = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    path = os.path.join(here, "benchmarks", "e2e.py")
    return path if os.path.isfile(path) else None


#: the flags after ``bench`` are benchmarks/e2e.py's: passed on unparsed
PASS_THROUGH = True


def add_arguments(p) -> None:
    p.description = "Runs benchmarks/e2e.py of this source checkout; see `python benchmarks/e2e.py --help`."


def run(args) -> int:
    path = script_path()
    if path is None:
        return user_error("bench", "the benchmarks are not part of the installed package; run "
                                   "`python benchmarks/e2e.py` from a source checkout of eekernels")
    return subprocess.call([sys.executable, path, *args.extra])
