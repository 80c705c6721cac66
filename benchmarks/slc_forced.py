"""The forced blocks of every selection (block 0, the position's own block and the one before
it) attended by tiles of 8 positions (``selected.FORCED``, nsa_func's path) against the
one-position tiles walking all 16 blocks: the slc forward and backward (dq, index, dk/dv) alone,
then the whole NSA training step, the two variants alternated twice in one process, with the
outputs' differences. Paper configuration, random bf16 inputs.

    python benchmarks/slc_forced.py OUT.json 8192 65536
"""

from __future__ import annotations

import traceback

from nsa.apps import bench as Bn
from nsa.triton import backward as BW
from nsa.triton import selected as S
from tma_ab import ab_main, ab_state, alternated_steps, maxdiffs  # benchmarks/ (the script's folder is on the path)


def ab(T: int, c: dict) -> dict:
    x, state, dq, g = ab_state(T, c)
    q, kc, vc, k, v, kw, vw, gates = x
    o_cmp, lse_cmp, idx, o_slc, lse_slc, o_win, lse_win, do, sc, seq, lens, win = state
    fwd = lambda: S.selected_attention_triton(q, k, v, idx, sel_block=c["lp"], return_lse=True,  # noqa: E731
                                              forced=True)
    bwd = lambda: BW.selected_backward(q, k, v, idx, o_slc, do, sel_block=c["lp"], scale=sc, seq=seq,  # noqa: E731
                                       lens=lens, dq_acc=dq, lse=lse_slc, forced=True, **g)
    row, outs = dict(T=T), {}
    for on in (False, True, False, True):
        S.FORCED = on
        tag = "forced" if on else "walk"
        try:
            outs[tag] = fwd()[0]
            dq.zero_()
            outs[tag + "_dq"] = bwd()[0].clone()
            row.setdefault(f"fwd_{tag}_ms", []).append(Bn._bench(fwd, 200)[0])
            row.setdefault(f"bwd_{tag}_ms", []).append(Bn._bench(bwd, 200)[0])
        except Exception as e:
            traceback.print_exc(limit=5)
            row[f"{tag}_error"] = repr(e)[:300]
    S.FORCED = True
    row.update(maxdiffs(outs, "forced", "walk", ("", "_dq")))
    row.update(alternated_steps(T, c, x, lambda on: setattr(S, "FORCED", on), names=("walk", "forced")))
    print(row, flush=True)
    return row


def main() -> None:
    ab_main(ab, "do_bench median; one-position walk / forced tiles alternated")


if __name__ == "__main__":
    main()
