"""The band dk/dv's masked edge tiles (the launch after the descriptor tiles') at 128 rows and 1
stage (``backward.EDGE_ROWS = None``, shipped) against 32 rows at 3 stages and 8 warps (32, the
one pipelined edge tile without spills on sm_90): ``band_backward`` of cmp (to 16k; cuDNN runs
it from 32k) and of the window, the two alternated twice, dk/dv against each other, then the
NSA training step. Paper configuration, random bf16 inputs, gated as in NSA's backward.

    python benchmarks/edge_tiles.py OUT.json 8192 65536
"""

from __future__ import annotations

import traceback

from nsa.apps import bench as Bn
from nsa.triton import backward as BW
from tma_ab import ab_main, ab_state, alternated_steps  # benchmarks/ (the script's folder is on the path)


def ab(T: int, c: dict) -> dict:
    x, state, dq, g = ab_state(T, c)
    q, kc, vc, k, v, kw, vw, gates = x
    o_cmp, lse_cmp, idx, o_slc, lse_slc, o_win, lse_win, do, sc, seq, lens, win = state
    runs = {"win": lambda: BW.band_backward(q, kw, vw, o_win, lse_win, do, dq_acc=dq, gate=2, **g, **win)}
    if T <= 16384:
        runs["cmp"] = lambda: BW.band_backward(q, kc, vc, o_cmp, lse_cmp, do, mode=0, scale=sc, seq=seq, lens=lens,
                                               cmp_block=c["l"], cmp_stride=c["d"], dq_acc=dq, gate=0, **g)
    row = dict(T=T)
    for name, fn in runs.items():
        grads = {}
        for rows in (None, 32, None, 32):
            BW.EDGE_ROWS = rows
            tag = f"edges{rows or 128}"
            try:
                if tag not in grads:
                    grads[tag] = [t.float().clone() for t in fn()[1:]]
                row.setdefault(f"{name}_{tag}_ms", []).append(Bn._bench(fn, 200)[0])
            except Exception as e:
                traceback.print_exc(limit=5)
                row[f"{name}_{tag}_error"] = repr(e)[:300]
        if len(grads) == 2:
            row[f"{name}_dkdv_maxdiff"] = max((a - b).abs().max().item()
                                              for a, b in zip(grads["edges128"], grads["edges32"]))
    BW.EDGE_ROWS = None

    def switch(on):
        BW.EDGE_ROWS = 32 if on else None

    row.update(alternated_steps(T, c, x, switch, names=("edges128", "edges32")))
    BW.EDGE_ROWS = None
    print(row, flush=True)
    return row


if __name__ == "__main__":
    ab_main(ab, "do_bench median; edge tiles of 128 rows x 1 stage / 32 rows x 3 stages, alternated")
