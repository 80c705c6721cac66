"""The slc forward and backward with one-position tiles reading their blocks through TMA
descriptors (``nsa.triton.selected.TMA``, the default) against pointer loads, paper
configuration, random bf16 inputs: each kernel alone (forward, dq + dk/dv) and the whole NSA
training step, the two variants alternated twice in one process, with the outputs' differences.

    python benchmarks/slc_tma.py benchmarks/results/slc_tma_ab_h100.json 8192 65536
"""

from __future__ import annotations

import traceback

import torch

from nsa.apps import bench as Bn
from nsa.triton import backward as BW
from nsa.triton import selected as S
from tma_ab import ab_main, ab_state, alternated_steps, maxdiffs  # benchmarks/ (the script's folder is on the path)


def ab(T: int, c: dict) -> dict:
    x, state, dq, g = ab_state(T, c)
    q, kc, vc, k, v, kw, vw, gates = x
    o_cmp, lse_cmp, idx, o_slc, lse_slc, o_win, lse_win, do, sc, seq, lens, win = state
    fwd = lambda: S.selected_attention_triton(q, k, v, idx, sel_block=c["lp"], return_lse=True)  # noqa: E731
    bwd = lambda: BW.selected_backward(q, k, v, idx, o_slc, do, sel_block=c["lp"], scale=sc, seq=seq,  # noqa: E731
                                       lens=lens, dq_acc=dq, lse=lse_slc, **g)
    row, outs = dict(T=T), {}
    for tma in (False, True, False, True):
        S.TMA = tma
        tag = "tma" if tma else "ptr"
        try:
            outs[tag] = fwd()[0]
            dq.zero_()
            outs[tag + "_dk"] = bwd()[1].clone()
            outs[tag + "_dq"] = dq.clone()
            row.setdefault(f"fwd_{tag}_ms", []).append(Bn._bench(fwd, 200)[0])
            row.setdefault(f"bwd_{tag}_ms", []).append(Bn._bench(bwd, 200)[0])
        except Exception as e:
            traceback.print_exc(limit=5)
            row[f"{tag}_error"] = repr(e)[:300]
    if "tma" in outs and "ptr" in outs:
        row["o_same"] = bool(torch.equal(outs["tma"], outs["ptr"]))
    row.update(maxdiffs(outs, "tma", "ptr", ("", "_dq", "_dk")))
    row.update(alternated_steps(T, c, x, lambda on: setattr(S, "TMA", on)))
    print(row, flush=True)
    return row


def main() -> None:
    ab_main(ab, "do_bench median; ptr/tma alternated")


if __name__ == "__main__":
    main()
