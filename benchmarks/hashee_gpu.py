"""HashEE token-level benchmark (implementation: benchmarks/token_methods.py).

    python benchmarks/hashee_gpu.py --out hashee-results          # GPU: BERT-base shape, fp16
    python benchmarks/hashee_gpu.py --tiny --device cpu --repeats 2

Writes hashee.json: the e2e rows (frequency hash, seq 128/512, batch 32/128: FLOPs speed-up,
realized speed-up vs the fastest full model, efficiency) and the single-layer study (full
layer, plain torch gather/SDPA/scatter, pack, sorted at 50% and 25% active tokens).
"""

import argparse
import json
import os
import sys

import torch

from common import print_rows
from token_methods import hashee_e2e_rows, token_layer_rows


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch-sizes", default="32,128")
    p.add_argument("--seq-lens", default="128,512")
    p.add_argument("--active-fracs", default="0.5,0.25")
    p.add_argument("--device", default=None)
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--backend", default=None, help="token ops backend for the pack layout")
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile baseline")
    p.add_argument("--tiny", action="store_true", help="a 3-layer H=64 model (smoke test on CPU)")
    p.add_argument("--out", default="hashee-results")
    a = p.parse_args()
    shape = dict(num_layers=3, hidden=64, heads=4, intermediate=128, vocab_size=1000) if a.tiny else {}
    layer_shape = {k: shape[k] for k in ("hidden", "heads", "intermediate")} if a.tiny else {}
    bs = [int(x) for x in a.batch_sizes.split(",")]
    e2e_rows = hashee_e2e_rows(bs, [int(x) for x in a.seq_lens.split(",")], device=a.device,
                                            repeats=a.repeats, compile_baseline=not a.no_compile,
                                            backend=a.backend, **shape)
    print_rows(e2e_rows)
    layer_rows = token_layer_rows([float(x) for x in a.active_fracs.split(",")], batch=max(bs),
                                               seq_len=128, device=a.device, repeats=max(a.repeats, 20),
                                               backend=a.backend, **layer_shape)
    print_rows(layer_rows)
    os.makedirs(a.out, exist_ok=True)
    path = os.path.join(a.out, "hashee.json")
    with open(path, "w") as f:
        json.dump(dict(torch=torch.__version__, e2e=e2e_rows, layer=layer_rows), f, indent=1)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
