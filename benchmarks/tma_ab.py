"""Key tiles through TMA descriptors against pointer loads, per kernel and for the whole NSA step:
the band forward (cmp; win with the gates; ``band.TMA``), the selection kernel (``select.TMA``),
the band dq (window backward; ``backward.BAND_DQ_TMA``) and the training step with every one of
them (and the slc kernels' ``selected.TMA``) on or off. Paper configuration, random bf16 inputs,
the two variants alternated twice in one process.

    python benchmarks/tma_ab.py OUT.json 8192 65536
"""

from __future__ import annotations

import json
import sys
import traceback

import torch

from nsa.apps import bench as Bn
from nsa.triton import backward as BW
from nsa.triton import band, select, selected

FLAGS = [(band, "TMA"), (select, "TMA"), (BW, "BAND_DQ_TMA"), (selected, "TMA")]


def set_all(on: bool) -> None:
    for mod, name in FLAGS:
        setattr(mod, name, on)


def ab_state(T: int, c: dict):
    """(x, the saved forward state of :func:`nsa.apps.bench.backward_state`, an fp32 dq buffer,
    the gate kwargs of a gated branch backward) for random inputs of T positions in config c:
    what every A/B script of this folder times its kernels on."""
    x = Bn._inputs(T, c, "cuda")
    q, gates = x[0], x[7]
    dq = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
    g = dict(gates=gates, d_gates=torch.zeros(gates.shape, dtype=torch.float32, device=q.device))
    return x, Bn.backward_state(c, x), dq, g


def ab_main(ab, timing: str) -> None:
    """``python SCRIPT OUT.json T ...``: ``ab(T, c)`` (a row) for each T in the paper
    configuration, the rows written to OUT.json with the result meta (``timing``)."""
    out, seqlens = sys.argv[1], [int(a) for a in sys.argv[2:]]
    c = dict(Bn.CONFIGS["paper"], name="paper")
    rows = [ab(T, c) for T in seqlens]
    with open(out, "w") as f:
        json.dump(dict(meta=Bn.result_meta(timing), rows=rows), f, indent=1)


def maxdiffs(outs: dict, a: str, b: str, parts=("",)) -> dict:
    """{"o_maxdiff", "<part>_maxdiff": max |outs[a + part] - outs[b + part]|} for each of
    ``parts`` ("" the output, "_dq", ...), or {} where either variant failed."""
    if a not in outs or b not in outs:
        return {}
    return {f"{n.strip('_') or 'o'}_maxdiff": (outs[a + n].float() - outs[b + n].float()).abs().max().item()
            for n in parts}


def alternated_steps(T: int, c: dict, x, switch, names=("ptr", "tma")) -> dict:
    """The NSA training step (``nsa bench train``'s) with ``switch(False)`` (pointer loads) and
    ``switch(True)`` (descriptors) alternated twice, ``switch(True)`` after: {"step_ptr": [...],
    "step_tma": [...]} of (fwd_ms, fwd_bwd_ms, peak_gb), or "step_error"; ``names``: the two
    keys' suffixes (off, on)."""
    row = {}
    for on in (False, True, False, True):
        switch(on)
        try:
            f, b, p = Bn._run_train(T, c, x, [], rep=300 if T > 16384 else 200)["nsa"]
            row.setdefault(f"step_{names[on]}", []).append(dict(fwd_ms=f, fwd_bwd_ms=b, peak_gb=p))
        except Exception as e:
            traceback.print_exc(limit=5)
            row["step_error"] = repr(e)[:300]
    switch(True)
    return row


def ab(T: int, c: dict) -> dict:
    x, state, dq, g = ab_state(T, c)
    q, kc, vc, k, v, kw, vw, gates = x
    o_cmp, lse_cmp, idx, o_slc, lse_slc, o_win, lse_win, do, sc, seq, lens, win = state
    geo = dict(cmp_block=c["l"], cmp_stride=c["d"])
    kernels = {  # name: (flag, fn)
        "cmp_fwd": ((band, "TMA"), lambda: band.band_attention(q, kc, vc, mode=0, scale=sc, seq=seq, lens=lens,
                                                               write_lse=True, **geo)),
        "win_fwd": ((band, "TMA"), lambda: band.band_attention(q, kw, vw, mode=1, scale=sc, seq=seq, lens=lens,
                                                               window=c["w"], gates=gates, o_cmp=o_cmp,
                                                               o_slc=o_slc)),
        "select": ((select, "TMA"), lambda: select.select_blocks_triton(q, kc, sel_block=c["lp"],
                                                                        sel_count=c["n"], lse=lse_cmp, **geo)),
        "win_bwd": ((BW, "BAND_DQ_TMA"), lambda: BW.band_backward(q, kw, vw, o_win, lse_win, do, dq_acc=dq, gate=2,
                                                                  **g, **win)),
    }
    row = dict(T=T)
    set_all(True)
    for name, ((mod, flag), fn) in kernels.items():
        outs = {}
        for on in (False, True, False, True):
            setattr(mod, flag, on)
            tag = "tma" if on else "ptr"
            try:
                r = fn()
                outs[tag] = (r[0] if isinstance(r, tuple) else r).float()
                row.setdefault(f"{name}_{tag}_ms", []).append(Bn._bench(fn, 200)[0])
            except Exception as e:
                traceback.print_exc(limit=5)
                row[f"{name}_{tag}_error"] = repr(e)[:300]
        setattr(mod, flag, True)
        if len(outs) == 2:
            row[f"{name}_maxdiff"] = (outs["tma"] - outs["ptr"]).abs().max().item()
    row.update(alternated_steps(T, c, x, set_all))
    print(row, flush=True)
    return row


def main() -> None:
    ab_main(ab, "do_bench median; pointer loads / TMA alternated")


if __name__ == "__main__":
    main()
