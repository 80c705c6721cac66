"""The slc forward at 1 warp a program (the autotuner's candidates are 2, 4 and 8) and the slc dq
kernel at 2 warps (shipped: 4), both spill-free for sm_90 at the paper geometry (1-warp forward
~205 registers, 2-warp dq ~243; tests/sm90.py), against the shipped kernels: each alone, the two
variants alternated twice in one process, outputs against the shipped ones. Paper configuration,
random bf16 inputs.

    python benchmarks/slc_warps.py OUT.json 8192 65536
"""

from __future__ import annotations

import json
import sys
import traceback

from nsa.apps import bench as Bn
from nsa.triton import _common as C
from nsa.triton import backward as BW
from nsa.triton import selected as S
from tma_ab import ab_state  # benchmarks/ (the script's folder is on the path)

KEY = ['TUNE_T', 'HQ', 'G', 'DK', 'DV', 'SEL_L', 'N_SEL', 'BT', 'WRITE_LSE', 'CLAMP', 'SHARE', 'TMA']


def main() -> None:
    out, seqlens = sys.argv[1], [int(a) for a in sys.argv[2:]]
    c = dict(Bn.CONFIGS["paper"], name="paper")
    shipped_fwd, shipped_cfg = S._selected_fwd_tuned, BW._slc_configs
    one_warp = C.autotuned(S._selected_fwd, KEY, [1], [1, 2, 3])

    def dq_two_warps(h, Dk, Dv, interp):
        cq, ckv = shipped_cfg(h, Dk, Dv, interp)
        return dict(cq, num_warps=2), ckv

    rows = []
    for T in seqlens:
        x, state, dq, g = ab_state(T, c)
        q, kc, vc, k, v, kw, vw, gates = x
        o_cmp, lse_cmp, idx, o_slc, lse_slc, o_win, lse_win, do, sc, seq, lens, win = state
        fwd = lambda: S.selected_attention_triton(q, k, v, idx, sel_block=c["lp"], return_lse=True)  # noqa: E731
        bwd = lambda: BW.selected_backward(q, k, v, idx, o_slc, do, sel_block=c["lp"], scale=sc,  # noqa: E731
                                           seq=seq, lens=lens, dq_acc=dq, lse=lse_slc, **g)
        row, outs = dict(T=T), {}
        for rnd in range(2):
            for tag in ("shipped", "fewer_warps"):
                S._selected_fwd_tuned = shipped_fwd if tag == "shipped" else one_warp
                BW._slc_configs = shipped_cfg if tag == "shipped" else dq_two_warps
                try:
                    if rnd == 0:
                        o = fwd()[0]
                        dq.zero_()
                        bwd()
                        outs[tag] = (o.clone(), dq.clone())
                    row.setdefault(f"fwd_{tag}_ms", []).append(Bn._bench(fwd, 200)[0])
                    row.setdefault(f"bwd_{tag}_ms", []).append(Bn._bench(bwd, 200)[0])
                except Exception as e:
                    traceback.print_exc(limit=4)
                    row[f"{tag}_error"] = repr(e)[:300]
        S._selected_fwd_tuned, BW._slc_configs = shipped_fwd, shipped_cfg
        if len(outs) == 2:
            row["o_maxdiff"] = (outs["shipped"][0].float() - outs["fewer_warps"][0].float()).abs().max().item()
            row["dq_maxdiff"] = (outs["shipped"][1] - outs["fewer_warps"][1]).abs().max().item()
        print(row, flush=True)
        rows.append(row)
        with open(out, "w") as f:
            json.dump(dict(meta=Bn.result_meta("do_bench median; shipped / 1-warp slc forward and 2-warp slc dq, "
                                               "alternated"), rows=rows), f, indent=1)


if __name__ == "__main__":
    main()
