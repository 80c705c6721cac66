"""Launches on side streams against one stream: the window's forward beside the slc kernel
(``nsa.WIN_BESIDE``, then mixed by ``band.gate_mix``) and the cmp and slc dk/dv beside the
next branches' dq (``backward.DKDV_BESIDE``). The NSA training step of each of the four
settings, alternated twice in one process; the output of both forward paths compared bitwise,
and the gradients with ``deterministic=True`` bitwise (the default path's, whose slc dk/dv
atomics add in any order, by their largest difference). Paper configuration, random bf16 inputs.

    python benchmarks/beside.py OUT.json 8192 16384 65536
"""

from __future__ import annotations

import torch

from nsa import nsa_func
from nsa.apps import bench as Bn
from nsa.triton import backward as BW
from nsa.triton import nsa as N
from tma_ab import ab_main  # benchmarks/ (the script's folder is on the path)

SETTINGS = {"serial": (False, False), "win": (True, False), "dkdv": (False, True), "both": (True, True)}


def setting(name: str) -> None:
    N.WIN_BESIDE, BW.DKDV_BESIDE = SETTINGS[name]


def grads(x, c: dict, deterministic: bool):
    leaves = [t.detach().clone().requires_grad_() for t in x]
    geo = dict(cmp_block=c["l"], cmp_stride=c["d"], sel_block=c["lp"], sel_count=c["n"], window=c["w"])
    o = nsa_func(*leaves, backend="triton", deterministic=deterministic, **geo)
    o.backward(torch.ones_like(o))
    return [o.detach()] + [t.grad for t in leaves]


def ab(T: int, c: dict) -> dict:
    x = Bn._inputs(T, c, "cuda")
    row = dict(T=T)
    for det in (True, False):
        out = {}
        for name in ("serial", "both"):
            setting(name)
            out[name] = grads(x, c, det)
        tag = "det" if det else "default"
        row[f"o_equal_{tag}"] = torch.equal(out["serial"][0], out["both"][0])
        row[f"grads_equal_{tag}"] = all(torch.equal(a, b) for a, b in zip(out["serial"][1:], out["both"][1:]))
        row[f"grads_maxdiff_{tag}"] = max((a.float() - b.float()).abs().max().item()
                                          for a, b in zip(out["serial"][1:], out["both"][1:]))
        del out
    for _ in range(2):
        for name in SETTINGS:
            setting(name)
            f, b, p = Bn._run_train(T, c, x, [], rep=300 if T > 16384 else 200)["nsa"]
            row.setdefault(f"step_{name}", []).append(dict(fwd_ms=f, fwd_bwd_ms=b, peak_gb=p))
    setting("serial")
    print(row, flush=True)
    return row


if __name__ == "__main__":
    ab_main(ab, "do_bench median; one stream / window beside slc / dk/dv beside dq / both, alternated twice")
