"""Fixed-config sweep of the band forward (cmp; win with the gates) at 64- and 128-row tiles and
of the select kernel, each (num_warps, num_stages) its autotuner tries, against what the
autotuner picks (``*_tuned``, the shipped 64-row tile), paper configuration, random bf16 inputs.

    python benchmarks/fwd_configs.py benchmarks/results/fwd_configs_h100.json 8192 65536
"""

from __future__ import annotations

import json
import math
import sys

from nsa.apps import bench as Bn
from nsa.triton import _common as C
from nsa.triton import backward as BW
from nsa.triton import band, select


class Fixed:
    """A kernel launched at one (num_warps, num_stages), standing in for its autotuner."""

    def __init__(self, kernel, warps: int, stages: int):
        self.kernel, self.warps, self.stages = kernel, warps, stages

    def __getitem__(self, grid):
        return lambda *a, **kw: self.kernel[grid](*a, **kw, num_warps=self.warps, num_stages=self.stages)


def timed_at(module, attr: str, kernel, warps: int, stages: int, fn) -> float | str:
    keep = getattr(module, attr)
    setattr(module, attr, Fixed(kernel, warps, stages))
    try:
        return Bn._bench(fn, 100)[0]
    except Exception as e:  # a config that does not fit (shared memory)
        return repr(e)[:80]
    finally:
        setattr(module, attr, keep)


def rows_config(rows: int):
    def config(h, Dk, Dv, interp):
        HP, BT, _ = C.rows_for(h, rows)
        return dict(HP=HP, BT=BT, BN=64, num_warps=4, num_stages=2)
    return config


def sweep(T: int, c: dict) -> dict:
    q, kc, vc, k, v, kw, vw, gates = Bn._inputs(T, c, "cuda")
    sc = 1 / math.sqrt(c["Dk"])
    seq, lens = BW._seq(q, k, kw, kc, None, c["l"], c["d"])
    geo = dict(cmp_block=c["l"], cmp_stride=c["d"])
    o_cmp, lse = band.band_attention(q, kc, vc, mode=0, scale=sc, seq=seq, lens=lens, write_lse=True, **geo)
    o_slc = o_cmp.clone()
    fns = {"cmp": lambda: band.band_attention(q, kc, vc, mode=0, scale=sc, seq=seq, lens=lens, write_lse=True, **geo),
           "win": lambda: band.band_attention(q, kw, vw, mode=1, scale=sc, seq=seq, lens=lens, window=c["w"],
                                              gates=gates, o_cmp=o_cmp, o_slc=o_slc)}
    row = dict(T=T)
    shipped = band._config
    for name, fn in fns.items():
        row[f"{name}_tuned"] = Bn._bench(fn, 100)[0]  # first: the autotuner tunes the shipped tile
        for rows in (64, 128):
            band._config = rows_config(rows)
            for w in (4, 8):
                for st in (2, 3):
                    row[f"{name}_r{rows}_w{w}_s{st}"] = timed_at(band, "_band_fwd_tuned", band._band_fwd, w, st, fn)
        band._config = shipped
    sel = lambda: select.select_blocks_triton(q, kc, sel_block=c["lp"], sel_count=c["n"], lse=lse, **geo)  # noqa: E731
    row["select_tuned"] = Bn._bench(sel, 100)[0]
    for w in (4, 8):
        for st in (1, 2, 3):
            row[f"select_w{w}_s{st}"] = timed_at(select, "_select_fwd_tuned", select._select_fwd, w, st, sel)
    print(row, flush=True)
    return row


def main() -> None:
    out, seqlens = sys.argv[1], [int(a) for a in sys.argv[2:]]
    c = dict(Bn.CONFIGS["paper"], name="paper")
    rows = [sweep(T, c) for T in seqlens]
    with open(out, "w") as f:
        json.dump(dict(meta=Bn.result_meta("do_bench median"), rows=rows), f, indent=1)


if __name__ == "__main__":
    main()
