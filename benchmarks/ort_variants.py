"""A/B of the ORT executor's options, side by side in one process.

    python benchmarks/ort_variants.py --variants heads-apart,heads-in-graph --batch-sizes 1,8,32 --rounds 11
    python benchmarks/ort_variants.py --variants sleep,spin-in-run

Copies of all-MiniLM-L6-v2 with the same weights run ``early_exit(executor="ort")``; each
variant changes one option of its executor (:class:`eekernels.engine.ort.OrtExecutor`) from
the executor's defaults:

- ``sleep``: the sessions' threads sleep between operators and between runs;
- ``spin-in-run`` (default): they spin between the operators of a run and stop when it
  returns (:func:`eekernels.engine.ort.make_session`);
- ``spin-always`` (ORT's own default): they spin after the run too, while torch runs the
  exit heads;
- ``heads-in-graph`` (default): each exit point's layer graph also computes that exit's
  logits, and the rule applies only its criterion;
- ``heads-apart``: the rule runs the fused exit head after each layer's session.

Each is timed with no exits and with the controlled 2x profile (half the rows leave after
layer 2, half after layer 4), beside the whole-model ORT session (spinning: ORT's default),
on the first SST-2 dev sentences in order with dynamic padding. Paths are interleaved in a
fresh order every round; the table gives medians in ms per sentence, the speed-up over
ORT's full model, and each variant's speed-up over the first variant named, taken round by
round (both paths in the same round see the same machine noise) and then the median.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import cpu_e2e  # noqa: E402
from common import print_rows  # noqa: E402
from eekernels.data import batches  # noqa: E402
from eekernels.engine.ort import require_onnxruntime  # noqa: E402
from exit_profiles import stratified_exit_layers  # noqa: E402

#: variant -> the executor options it sets (the others keep the executor's defaults)
VARIANTS = {
    "sleep": {"spin": False, "spin_between_runs": True},
    "spin-in-run": {"spin": True, "spin_between_runs": False},
    "spin-always": {"spin": True, "spin_between_runs": True},
    "heads-in-graph": {"heads_in_graph": True},
    "heads-apart": {"heads_in_graph": False},
}


def model_with_variant(state, options: dict, exit_pooling: str):
    """A fresh MiniLM with ``state``'s weights whose ORT executor takes ``options``."""
    model, _ = cpu_e2e.load_model(exit_pooling=exit_pooling)
    model.load_state_dict(state)
    ex = model._executor("ort", "rows")
    for name, value in options.items():
        setattr(ex, name, value)
    return model


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data-dir", default=cpu_e2e.DEFAULT_DATA)
    p.add_argument("--rows", type=int, default=128)
    p.add_argument("--batch-sizes", default="1,8,32")
    p.add_argument("--rounds", type=int, default=11)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--variants", default="heads-apart,heads-in-graph", help=f"from: {', '.join(VARIANTS)}")
    p.add_argument("--exit-pooling", default="mean", choices=("cls", "mean"),
                   help="what the exit heads read (mean: as the trained MiniLM models)")
    args = p.parse_args(argv)
    try:
        sizes = cpu_e2e._ints(args.batch_sizes, "--batch-sizes")
        variants = [x.strip() for x in args.variants.split(",") if x.strip()]
        bad = [x for x in variants if x not in VARIANTS]
        if bad or not variants:
            raise ValueError(f"--variants: unknown {bad or variants}; choose from {', '.join(VARIANTS)}")
        path = cpu_e2e.task_file(args.data_dir, "sst2")
        if not os.path.isfile(path):
            raise cpu_e2e.Skip(f"data not found: {path} (set --data-dir)")
        require_onnxruntime()
    except cpu_e2e.Skip as e:
        print(f"skipped: {e}")
        return 0
    except (ValueError, ImportError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    torch.set_num_threads(args.threads)
    base, tok = cpu_e2e.load_model(exit_pooling=args.exit_pooling)
    state = base.state_dict()
    models = {name: model_with_variant(state, VARIANTS[name], args.exit_pooling) for name in variants}
    from ort_full import OrtFullModel

    full = OrtFullModel(base.hf, threads=args.threads, spin=True)
    enc = cpu_e2e.encode_task(tok, path, args.rows, 128)
    from tqdm import tqdm

    rows = []
    bar = tqdm(total=len(sizes) * args.rounds, desc="ort variant rounds")
    with torch.no_grad():
        for b in sizes:
            data = batches(enc, b)
            two_x = stratified_exit_layers(args.rows, b, base.num_layers, *cpu_e2e.CONTROLLED_2X[1:])
            none = [torch.full_like(t, base.num_layers) for t in two_x]
            paths = [cpu_e2e.Path("ort-fp32", "full model", lambda i, bt: full(*bt))]
            for name, m in models.items():
                for label, prof in (("no exits", none), ("2x", two_x)):
                    paths.append(cpu_e2e.Path(name, label, cpu_e2e.early_exit_path(m, "ort", prof)))
            for pt in paths:
                pt.run(0, data[0])
            times = cpu_e2e.time_paths(paths, data, args.rounds, 0, bar)
            full_ms = statistics.median(times[("ort-fp32", "full model")])
            for (name, label), ts in times.items():
                ms = statistics.median(ts)
                variant = name in VARIANTS
                # paired: this variant's speed-up over the first one in each round (same noise), median
                first = times.get((variants[0], label)) if variant else None
                paired = statistics.median(f / t for f, t in zip(first, ts)) if first else float("nan")
                rows.append(dict(batch=b, path="ee-ort" if variant else name, variant=name if variant else "ORT default",
                                 profile=label, ms_per_sentence=round(ms, 3),
                                 vs_ort_full=round(full_ms / ms, 3), vs_first_variant=round(paired, 3)))
    bar.close()
    print_rows(rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
