"""The cmp and slc dk/dv launches on a side stream beside the next branches' dq kernels
(``backward.DKDV_BESIDE``) against one stream: the NSA training step, the two alternated twice
in one process, and the gradients of both with ``deterministic=True`` compared bitwise (and
of the default path, whose slc dk/dv atomics add in any order, by their largest difference).
Paper configuration, random bf16 inputs.

    python benchmarks/dkdv_beside.py OUT.json 8192 16384 65536
"""

from __future__ import annotations

import torch

from nsa import nsa_func
from nsa.triton import backward as BW
from tma_ab import ab_main, alternated_steps  # benchmarks/ (the script's folder is on the path)
from nsa.apps import bench as Bn


def grads(x, c: dict, deterministic: bool) -> list:
    leaves = [t.detach().clone().requires_grad_() for t in x]
    geo = dict(cmp_block=c["l"], cmp_stride=c["d"], sel_block=c["lp"], sel_count=c["n"], window=c["w"])
    o = nsa_func(*leaves, backend="triton", deterministic=deterministic, **geo)
    o.backward(torch.ones_like(o))
    return [t.grad for t in leaves]


def ab(T: int, c: dict) -> dict:
    x = Bn._inputs(T, c, "cuda")
    row = dict(T=T)
    for det in (True, False):
        out = {}
        for on in (False, True):
            BW.DKDV_BESIDE = on
            out[on] = grads(x, c, det)
        tag = "det" if det else "default"
        row[f"grads_equal_{tag}"] = all(torch.equal(a, b) for a, b in zip(out[False], out[True]))
        row[f"grads_maxdiff_{tag}"] = max((a.float() - b.float()).abs().max().item()
                                          for a, b in zip(out[False], out[True]))
    row.update(alternated_steps(T, c, x, lambda on: setattr(BW, "DKDV_BESIDE", on), names=("serial", "beside")))
    BW.DKDV_BESIDE = False
    print(row, flush=True)
    return row


if __name__ == "__main__":
    ab_main(ab, "do_bench median; one stream / dk/dv on a side stream, alternated")
