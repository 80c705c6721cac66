"""The band dq kernel's tiles (BT positions x BN keys, warps, stages) for cmp and win, each
timed as ``band_backward`` (dq + dk/dv, the dk/dv tiles as shipped), its dq against the
shipped tile's; and the cmp dk/dv's masked edge tiles walked by one program a key tile (as
before) against spread over the query chunks' programs (as shipped). Paper configuration, random
bf16 inputs, gated as in NSA's backward. The candidate tiles compile for sm_90 without spills
(tests/sm90.py).

    python benchmarks/dq_tiles.py OUT.json 8192 65536
"""

from __future__ import annotations

import inspect
import json
import sys
import traceback

from nsa.apps import bench as Bn
from nsa.triton import backward as BW
from tma_ab import ab_state  # benchmarks/ (the script's folder is on the path)

TILES = [(4, 32, 4, 3), (4, 64, 4, 2), (8, 64, 8, 2), (4, 64, 8, 2)]  # shipped first


def old_edges():
    """band_backward with the edge tiles as before: one program a key tile, into chunk 0's slice."""
    src = inspect.getsource(BW.band_backward)
    new = "_band_bwd_dkdv[grid](q, k, v, do, q, q, do, *args, QCH=qch, TMA=False, EDGES=True"
    assert new in src
    ns = dict(BW.__dict__)
    exec(src.replace(new, "_band_bwd_dkdv[grid[:2] + (1,)](q, k, v, do, q, q, do, *args, QCH=0, TMA=False, "
                          "EDGES=True"), ns)
    return ns["band_backward"]


def main() -> None:
    out, seqlens = sys.argv[1], [int(a) for a in sys.argv[2:]]
    c = dict(Bn.CONFIGS["paper"], name="paper")
    rows = []
    orig_cfg, orig_fn = BW._band_configs, BW.band_backward
    before = old_edges()

    def save():
        with open(out, "w") as f:
            json.dump(dict(meta=Bn.result_meta("do_bench median"), tiles=TILES, rows=rows), f, indent=1)

    for T in seqlens:
        x, state, dq, g = ab_state(T, c)
        q, kc, vc, k, v, kw, vw, gates = x
        o_cmp, lse_cmp, idx, o_slc, lse_slc, o_win, lse_win, do, sc, seq, lens, win = state

        def run(mode, fn):
            if mode == 0:
                return fn(q, kc, vc, o_cmp, lse_cmp, do, mode=0, scale=sc, seq=seq, lens=lens, cmp_block=c["l"],
                          cmp_stride=c["d"], dq_acc=dq, gate=0, **g)
            return fn(q, kw, vw, o_win, lse_win, do, dq_acc=dq, gate=2, **g, **win)

        if T <= 16384:  # the edge tiles (cmp runs through cuDNN from 32k)
            row = dict(T=T, what="cmp edges: one program a key tile (before) / over the chunks (now)")
            grads = {}
            for rnd in range(2):
                for tag, fn in (("before", before), ("now", orig_fn)):
                    try:
                        if rnd == 0:
                            dq.zero_()
                            grads[tag] = [t.clone() for t in run(0, fn)[1:]]
                        row.setdefault(f"{tag}_ms", []).append(Bn._bench(lambda: run(0, fn), 200)[0])
                    except Exception as e:
                        traceback.print_exc(limit=4)
                        row[f"{tag}_error"] = repr(e)[:300]
            if len(grads) == 2:
                row["dk_dv_maxdiff"] = max((a.float() - b.float()).abs().max().item()
                                           for a, b in zip(grads["now"], grads["before"]))
            print(row, flush=True)
            rows.append(row)
            save()
        for mode in ((0, 1) if T <= 16384 else (1,)):
            row = dict(T=T, branch=("cmp", "win")[mode])
            ref = None
            for bt, bn, w, st in TILES:
                tag = f"bt{bt}_bn{bn}_w{w}_s{st}"

                def cfg(h, Dk, Dv, mode_, interp, tma=False, _t=(bt, bn, w, st)):
                    cq, ckv = orig_cfg(h, Dk, Dv, mode_, interp, tma)
                    return dict(cq, BT=_t[0], BN=_t[1], num_warps=_t[2], num_stages=_t[3]), ckv

                BW._band_configs = cfg
                try:
                    dq.zero_()
                    run(mode, orig_fn)
                    if ref is None:
                        ref = dq.clone()
                    else:
                        row[f"{tag}_dq_maxdiff"] = (dq - ref).abs().max().item()
                    row[f"{tag}_ms"] = Bn._bench(lambda: run(mode, orig_fn), 200)[0]
                except Exception as e:
                    traceback.print_exc(limit=4)
                    row[f"{tag}_error"] = repr(e)[:300]
                finally:
                    BW._band_configs = orig_cfg
            print(row, flush=True)
            rows.append(row)
            save()


if __name__ == "__main__":
    main()
