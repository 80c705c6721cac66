"""The slc dk/dv's work items cut into spans of query positions (``backward.SLC_SPAN``; 0: each
block's items over the whole sequence) so that the programs running at once gather the q and
do rows of one span, which the L2 cache can hold: the slc backward (dq + index + dk/dv) and
the index alone at each span, alternated twice in one process, dk / dv against span 0's, then
the whole NSA training step at span 0 against the best span. Paper configuration, random bf16
inputs.

    python benchmarks/slc_span.py OUT.json 8192 65536
"""

from __future__ import annotations

import traceback

from nsa.apps import bench as Bn
from nsa.triton import backward as BW
from tma_ab import ab_main, ab_state, alternated_steps  # benchmarks/ (the script's folder is on the path)

SPANS = (0, 1024, 2048, 4096)


def ab(T: int, c: dict) -> dict:
    x, state, dq, g = ab_state(T, c)
    q, kc, vc, k, v, kw, vw, gates = x
    o_cmp, lse_cmp, idx, o_slc, lse_slc, o_win, lse_win, do, sc, seq, lens, win = state
    row, ref = dict(T=T), None
    for rnd in range(2):
        for span in SPANS:
            bwd = lambda: BW.selected_backward(q, k, v, idx, o_slc, do, sel_block=c["lp"], scale=sc,  # noqa: E731
                                               seq=seq, lens=lens, dq_acc=dq, lse=lse_slc, span=span, **g)
            index = lambda: BW.transposed_index_triton(idx, seq, lens, c["H"], c["lp"], 256, 0, span)  # noqa: E731
            try:
                if rnd == 0:
                    _, dk, dv = bwd()
                    items = index()[0]
                    row[f"items_{span}"] = int((items[:, 4] > 0).sum())
                    row[f"grid_{span}"] = items.shape[0]
                    if ref is None:
                        ref = dk.clone(), dv.clone()
                    else:
                        row[f"dk_maxdiff_{span}"] = (dk - ref[0]).abs().max().item()
                        row[f"dv_maxdiff_{span}"] = (dv - ref[1]).abs().max().item()
                row.setdefault(f"bwd_ms_{span}", []).append(Bn._bench(bwd, 200)[0])
                row.setdefault(f"index_ms_{span}", []).append(Bn._bench(index, 200)[0])
            except Exception as e:
                traceback.print_exc(limit=5)
                row[f"error_{span}"] = repr(e)[:300]
    best = min(SPANS[1:], key=lambda s: min(row.get(f"bwd_ms_{s}", [1e9])))
    row["step_span"] = best
    row.update(alternated_steps(T, c, x, lambda on: setattr(BW, "SLC_SPAN", best if on else 0)))
    print(row, flush=True)
    return row


def main() -> None:
    ab_main(ab, "do_bench median; spans alternated")


if __name__ == "__main__":
    main()
