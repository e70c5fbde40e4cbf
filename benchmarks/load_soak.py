"""Memory under load: many ``early_exit`` calls on random batches, the process's RSS sampled
as they run, and the slope of RSS over calls after a warm-up (bytes per call) fitted.

Each call draws its batch size B, length S, padding (per-row lengths), criterion, threshold
and engine at random, on a tiny random-weight BERT (the layer loop, the exit rules, the
executors and their caches are what is exercised; a big model only makes each call slower).
A leak of one small tensor per call shows as a slope of hundreds of bytes per call. RSS
grows while the allocator meets new shapes (on a 2-core CPU box: ~40 MiB over the first
~2,500 calls), then stays flat; hence the long default warm-up.

::

    python benchmarks/load_soak.py --calls 10000 --out soak.json

The JSON holds the settings, the samples (call index, RSS bytes), the fitted slope after
the warm-up and the RSS growth over that span. ``tests/benchmarks/test_load_soak.py`` runs a short
version in CI.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import time
from typing import Dict, List, Optional, Sequence

import torch

CRITERIA = {"entropy": (0.0, 1.2), "max_prob": (0.3, 1.0), "patience": (0.0, 4.0)}


def rss_bytes() -> int:
    """The resident set size of this process: psutil when installed, else /proc/self/statm."""
    try:
        import psutil

        return psutil.Process().memory_info().rss
    except ImportError:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def slope(xs: Sequence[float], ys: Sequence[float]) -> float:
    """Least-squares slope of ys over xs."""
    n = len(xs)
    mx, my = sum(xs) / n, sum(ys) / n
    var = sum((x - mx) ** 2 for x in xs)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / var if var else 0.0


def tiny_model(seed: int = 0):
    """A 4-layer, 32-wide random BERT classifier with an exit after every layer."""
    import transformers

    import eekernels

    torch.manual_seed(seed)
    cfg = transformers.BertConfig(hidden_size=32, num_hidden_layers=4, num_attention_heads=4, intermediate_size=48,
                                  vocab_size=120, max_position_embeddings=64, num_labels=3, initializer_range=0.3,
                                  hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return eekernels.convert(transformers.BertForSequenceClassification(cfg).eval())


def random_call(rng: random.Random, max_batch: int, max_len: int, vocab: int, engines: Sequence[str] = ("rows",)):
    """(input_ids, attention_mask, early_exit keyword arguments) of one random call."""
    b, s = rng.randint(1, max_batch), rng.randint(2, max_len)
    lengths = [s] + [rng.randint(1, s) for _ in range(b - 1)]
    rng.shuffle(lengths)
    mask = (torch.arange(s)[None] < torch.tensor(lengths)[:, None]).long()
    ids = torch.randint(5, vocab, (b, s), generator=torch.Generator().manual_seed(rng.randrange(2**31)))
    criterion = rng.choice(sorted(CRITERIA))
    lo, hi = CRITERIA[criterion]
    return ids * mask, mask, {"criterion": criterion, "threshold": rng.uniform(lo, hi),
                              "engine": rng.choice(list(engines))}


def soak(model, calls: int, warmup: int, sample_every: int = 50, seed: int = 0, max_batch: int = 16,
         max_len: int = 48, engines: Sequence[str] = ("rows",), cycle: Optional[int] = None,
         progress: bool = True) -> Dict:
    """Run ``calls`` random ``early_exit`` calls on ``model``; RSS every ``sample_every``
    calls. Returns the samples, the slope (bytes per call) over the calls after ``warmup``
    and over the last half of those (still growing at the end?), and the RSS growth after
    the warm-up. ``cycle``: repeat the same ``cycle`` random calls (the allocator has seen
    every shape after the first round, so a short run settles); None: every call new."""
    from tqdm import tqdm

    if not 0 <= warmup < calls:
        raise ValueError(f"warmup must be in [0, calls), got {warmup} with calls={calls}")
    rng = random.Random(seed)
    vocab = model.config.vocab_size
    samples: List[List[int]] = [[0, rss_bytes()]]
    t0 = time.time()
    for i in tqdm(range(1, calls + 1), desc="early_exit calls", disable=not progress, mininterval=2.0):
        if cycle and (i - 1) % cycle == 0:
            rng = random.Random(seed)
        ids, mask, kw = random_call(rng, max_batch, max_len, vocab, engines)
        model.early_exit(ids, mask, **kw)
        if i % sample_every == 0 or i == calls:
            samples.append([i, rss_bytes()])
    seconds = time.time() - t0
    after = [(i, r) for i, r in samples if i >= warmup]
    fit = slope([i for i, _ in after], [r for _, r in after])
    tail = after[len(after) // 2:]
    tail_fit = slope([i for i, _ in tail], [r for _, r in tail])
    return {"calls": calls, "warmup": warmup, "sample_every": sample_every, "seed": seed, "max_batch": max_batch,
            "max_len": max_len, "engines": list(engines), "cycle": cycle, "seconds": seconds,
            "slope_bytes_per_call": fit, "slope_last_half_bytes_per_call": tail_fit,
            "growth_after_warmup_bytes": after[-1][1] - after[0][1], "rss_start_bytes": samples[0][1],
            "rss_end_bytes": samples[-1][1], "rss_peak_bytes": max(r for _, r in samples), "samples": samples}


def main(argv: Optional[Sequence[str]] = None) -> int:
    from eekernels._atomic import write_json

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--calls", type=int, default=10_000)
    p.add_argument("--warmup", type=int, default=3_000,
                   help="calls left out of the slope: the allocator settles over the first ~2,500 random shapes")
    p.add_argument("--sample-every", type=int, default=50)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--engines", default="rows",
                   help="comma-separated engines drawn from per call (rows, fixed; on the CPU the fixed engine "
                        "traces torch.cond on every call: seconds per call)")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    p.add_argument("--out", default="load_soak.json", help="JSON report (written atomically)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    report = soak(tiny_model(args.seed), args.calls, args.warmup, args.sample_every, args.seed,
                  engines=[e.strip() for e in args.engines.split(",") if e.strip()])
    report["torch_threads"] = torch.get_num_threads()
    write_json(args.out, report)
    print(json.dumps({k: v for k, v in report.items() if k != "samples"}, indent=1))
    print(f"RSS slope after {args.warmup} warm-up calls: {report['slope_bytes_per_call']:.2f} bytes/call "
          f"({report['growth_after_warmup_bytes'] / 2**20:+.2f} MiB over {args.calls - args.warmup} calls; last half "
          f"{report['slope_last_half_bytes_per_call']:.2f} bytes/call); wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
