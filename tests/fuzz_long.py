"""The long fuzz: every op's property of tests/ops/test_fuzz_ops.py on every CPU backend,
for many examples, tallied into a table (op, backend, examples, mismatches, near ties
excluded, time) written atomically as JSON and printed as Markdown.

    python tests/fuzz_long.py --examples 10000 --out fuzz.json
    python tests/fuzz_long.py --examples 10000 --backends triton --budget 1800 --out fuzz_triton.json

Examples run in chunks of hypothesis runs with consecutive seeds (``--seed`` the first);
``--budget`` (seconds per op and backend) stops an op early and the table says how many
examples ran. A mismatch does not stop the run: it is counted, the first ones are
described in the JSON with their case, and the chunk's seed is rerun once with shrinking
to report hypothesis's minimal failing case.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time
from pathlib import Path

if __name__ == "__main__":
    # The Triton kernels run in the interpreter on a CPU-only machine; it must be chosen
    # before triton is first imported. The checkout comes first on sys.path.
    import torch

    if not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from tqdm import tqdm  # noqa: E402

from eekernels._atomic import write_json  # noqa: E402
from tests.ops.test_fuzz_ops import PROPERTIES, Tally, backends_for, run_property  # noqa: E402


def fuzz(op: str, backend: str, examples: int, *, seed: int, chunk: int, budget: float, bar) -> Tally:
    """Run ``op`` on ``backend`` for ``examples`` examples (or until ``budget`` seconds)."""
    tally = Tally(op, backend)
    run = 0
    while tally.examples < examples and tally.seconds < budget:
        before, failed_before = tally.examples, tally.mismatches
        run_property(op, backend, min(chunk, examples - tally.examples), seed=seed + run, tally=tally)
        run += 1
        bar.update(tally.examples - before)
        if tally.mismatches > failed_before and not any(f.startswith("shrunk") for f in tally.failures):
            tally.failures.append("shrunk " + shrunk_failure(op, backend, chunk, seed + run - 1))
        if tally.examples == before:  # hypothesis ran out of distinct examples
            break
    return tally


def shrunk_failure(op: str, backend: str, chunk: int, seed: int) -> str:
    """Hypothesis's minimal failing case of that seed's chunk (rerun with shrinking)."""
    try:
        run_property(op, backend, chunk, seed=seed)
    except Exception as exc:  # noqa: BLE001  (the report is the point)
        notes = "\n".join(getattr(exc, "__notes__", []))
        return f"{type(exc).__name__}: {str(exc)[:300]}\n{notes}"
    return "(the rerun did not fail again)"


def markdown(rows) -> str:
    lines = ["| op | backend | examples | mismatches | near-tie rows excluded (flipped) | time (s) |",
             "|---|---|---:|---:|---:|---:|"]
    for t in rows:
        lines.append(f"| {t.op} | {t.backend} | {t.examples} | {t.mismatches} | {t.near_ties} ({t.near_tie_flips}) "
                     f"| {t.seconds:.0f} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--examples", type=int, default=10_000, help="examples per op and backend")
    p.add_argument("--ops", nargs="+", choices=sorted(PROPERTIES), default=list(PROPERTIES))
    p.add_argument("--backends", nargs="+", default=None, help="default: every CPU backend an op runs on")
    p.add_argument("--seed", type=int, default=0, help="seed of the first hypothesis run")
    p.add_argument("--chunk", type=int, default=200, help="examples per hypothesis run")
    p.add_argument("--threads", type=int, default=1, help="torch threads (the cases are tiny; 1 wastes least)")
    p.add_argument("--budget", type=float, default=float("inf"), help="seconds per op and backend at most")
    p.add_argument("--out", type=Path, required=True, help="JSON file for the table")
    args = p.parse_args(argv)
    if args.examples < 1 or args.chunk < 1:
        p.error("--examples and --chunk must be >= 1")
    if args.out.exists():
        p.error(f"--out {args.out} exists; pass a new file name")

    torch.set_num_threads(args.threads)
    plan = [(op, b) for op in args.ops for b in backends_for(op) if args.backends is None or b in args.backends]
    rows = []
    start = time.time()
    with tqdm(total=len(plan) * args.examples, unit="ex", mininterval=10) as bar:
        for op, backend in plan:
            bar.set_description(f"{op}/{backend}")
            rows.append(fuzz(op, backend, args.examples, seed=args.seed, chunk=args.chunk, budget=args.budget,
                             bar=bar))
            report = dict(examples_asked=args.examples, seed=args.seed, budget_s=args.budget,
                          wall_s=time.time() - start, rows=[dataclasses.asdict(t) for t in rows])
            write_json(str(args.out), report)  # after each op: a partial table survives
    print(markdown(rows))
    return 1 if any(t.mismatches for t in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
