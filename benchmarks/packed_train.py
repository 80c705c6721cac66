"""A packed batch's training step (forward + backward of nsa_func with cu_seqlens) with the cmp
branch of its long sequences through cuDNN (``cmp_dense.dense_spans``) against the band kernel
everywhere (``cmp_dense.ENABLED`` off), alternated twice in one process; paper configuration,
random bf16 inputs, the pack given as sequence lengths.

    python benchmarks/packed_train.py OUT.json 40960 8192 16384
"""

from __future__ import annotations

import json
import sys
import traceback

import torch

from nsa import nsa_func
from nsa.apps import bench as Bn
from nsa.reference import compress_mean
from nsa.triton import cmp_dense


def main() -> None:
    out, lengths = sys.argv[1], [int(a) for a in sys.argv[2:]]
    c = Bn.CONFIGS["paper"]
    cu = [0]
    for n in lengths:
        cu.append(cu[-1] + n)
    T = cu[-1]
    g = torch.Generator(device="cuda").manual_seed(0)
    mk = lambda *s: torch.randn(*s, device="cuda", dtype=torch.bfloat16, generator=g)  # noqa: E731
    k, v = mk(1, T, c["H"], c["Dk"]), mk(1, T, c["H"], c["Dv"])
    comp = lambda x: torch.cat([compress_mean(x[:, a:b], c["l"], c["d"])  # noqa: E731
                                for a, b in zip(cu[:-1], cu[1:])], 1)
    gates = torch.rand(1, T, c["HQ"], 3, device="cuda", generator=g).to(torch.bfloat16)
    leaves = [x.requires_grad_() for x in (mk(1, T, c["HQ"], c["Dk"]), comp(k), comp(v), k, v,
                                            mk(1, T, c["H"], c["Dk"]), mk(1, T, c["H"], c["Dv"]), gates)]
    kw = dict(cmp_block=c["l"], cmp_stride=c["d"], sel_block=c["lp"], sel_count=c["n"], window=c["w"],
              cu_seqlens=torch.tensor(cu, dtype=torch.int32, device="cuda"), backend="triton")
    row = dict(lengths=lengths, min_len=cmp_dense.MIN_LEN)
    for on in (False, True, False, True):
        cmp_dense.ENABLED = on
        try:
            f, both, peak = Bn._fwd_bwd(lambda *a: nsa_func(*a, **kw), leaves, 300)
            row.setdefault("cudnn" if on else "band", []).append(dict(fwd_ms=f, fwd_bwd_ms=both, peak_gb=peak))
        except Exception as e:
            traceback.print_exc(limit=5)
            row["error"] = repr(e)[:300]
    cmp_dense.ENABLED = True
    print(row, flush=True)
    with open(out, "w") as f:
        json.dump(dict(meta=Bn.result_meta("do_bench median; band / cuDNN alternated"), rows=[row]), f, indent=1)


if __name__ == "__main__":
    main()
