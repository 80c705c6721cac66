"""Distinct blocks per slc tile: how many different blocks the 4 consecutive positions of one
group select (4 x n = 64 slots in the paper geometry), for the prefill benchmark's random and
realistic inputs (:mod:`nsa.apps.bench_inputs`, the realistic ones with the parameters that
``nsa bench prefill --inputs realistic`` fitted at 64k). This is the statistic the slc split
launch decides on (``nsa.triton.selected.share_split``: a tile walks its distinct blocks together
when it has at most SHARE_FRACTION x 64 of them).

Positions: 3 windows of 512 at T/4, T/2 and the end; selection by the PyTorch reference on the
CPU (~1 min on 2 cores).

    PYTHONPATH=src python benchmarks/slc_tile_distinct.py
    # 8k, with the parameters nsa bench fitted there (prefill_realistic_h200.json)
    PYTHONPATH=src python benchmarks/slc_tile_distinct.py --seqlen 8192 --params 109.99 0.6381 \
        --out benchmarks/results/slc_tile_distinct_8k_cpu.json
writes benchmarks/results/slc_tile_distinct_cpu.json (and .png).
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform

import torch

from nsa.apps.bench import CONFIGS, git_commit
from nsa.apps.bench_inputs import synth_qk
from nsa.reference import select_blocks_ref

# the realistic inputs' (drift, noise) at 64k, paper configuration: input_params of
# benchmarks/results/prefill_slc_tile_ab_h100.json (nsa.apps.bench_inputs.calibrate)
PARAMS_64K = dict(drift=157.24550862167936, noise=0.5298046875)


def tile_distinct(idx: torch.Tensor, bt: int) -> torch.Tensor:
    """int64 ``[tiles]``: the distinct valid blocks of each tile of ``bt`` consecutive positions
    and one group, for ``idx [1, P, H, n]`` (P a multiple of bt, -1 ignored)."""
    _, P, H, n = idx.shape
    tiles = idx[0].view(P // bt, bt, H, n).permute(0, 2, 1, 3).reshape(-1, bt * n)
    s = tiles.sort(-1).values
    new = torch.cat([torch.ones_like(s[:, :1], dtype=torch.bool), s[:, 1:] != s[:, :-1]], 1)
    return ((s >= 0) & new).sum(-1)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seqlen", type=int, default=65536)
    p.add_argument("--params", type=float, nargs=2, default=None, metavar=("DRIFT", "NOISE"),
                   help="the realistic inputs' synthesis parameters (default: those fitted at 64k)")
    p.add_argument("--out", default="benchmarks/results/slc_tile_distinct_cpu.json")
    a = p.parse_args()
    c, T, bt = CONFIGS["paper"], a.seqlen, 4
    params = PARAMS_64K if a.params is None else dict(drift=a.params[0], noise=a.params[1])
    res = {}
    for mode in ("realistic", "random"):
        counts = []
        for s0 in (T // 4, T // 2, T - 512):
            pos = torch.arange(s0, s0 + 512)
            if mode == "realistic":
                q, kc = synth_qk(T, c["HQ"], c["H"], c["Dk"], c["l"], c["d"], positions=pos, seed=T, **params)
            else:  # as the benchmark's random inputs: i.i.d. normal queries and compressed keys
                g = torch.Generator().manual_seed(s0)
                q = torch.randn(1, len(pos), c["HQ"], c["Dk"], generator=g).bfloat16()
                kc = torch.randn(1, (T - c["l"]) // c["d"] + 1, c["H"], c["Dk"], generator=g).bfloat16()
            idx = select_blocks_ref(q.float(), kc.float(), cmp_block=c["l"], cmp_stride=c["d"], sel_block=c["lp"],
                                    sel_count=c["n"], q_offset=s0)
            counts.append(tile_distinct(idx, bt))
        u = torch.cat(counts).double()
        res[mode] = dict(tiles=len(u), mean=float(u.mean()),
                         quantiles={str(q): float(u.quantile(q)) for q in (0.1, 0.25, 0.5, 0.75, 0.9)},
                         histogram={str(k): int(v) for k, v in enumerate(torch.bincount(u.long())) if v})
        print(mode, {k: v for k, v in res[mode].items() if k != "histogram"})
    meta = dict(device="cpu", torch=torch.__version__, python=platform.python_version(),
                date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"), commit=git_commit(),
                config="paper", T=T, positions_a_tile=bt, slots_a_tile=bt * c["n"], realistic_params=params,
                windows="512 positions at T/4, T/2 and the end; selection by nsa.reference.select_blocks_ref")
    with open(a.out, "w") as f:
        json.dump(dict(meta=meta, results=res), f, indent=1)
    print(f"wrote {a.out} and {plot(a.out)}")


def plot(path: str) -> str:
    """Histograms of both input modes, with the split launch's threshold."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from nsa.triton.selected import SHARE_FRACTION

    with open(path) as f:
        out = json.load(f)
    slots = out["meta"]["slots_a_tile"]
    fig, ax = plt.subplots(figsize=(6, 3.2))
    for mode, r in out["results"].items():
        k = [int(x) for x in r["histogram"]]
        ax.bar(k, [v / r["tiles"] for v in r["histogram"].values()], alpha=0.6, label=f"{mode} (mean {r['mean']:.1f})")
    ax.axvline(int(SHARE_FRACTION * slots) + 0.5, color="k", ls="--", lw=1,
               label=f"split threshold ({int(SHARE_FRACTION * slots)} of {slots})")
    ax.set_xlabel(f"distinct blocks of a tile (4 positions, {slots} slots)")
    ax.set_ylabel("fraction of tiles")
    ax.set_title(f"slc tiles, paper configuration at {out['meta']['T'] // 1024}k", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    png = path.replace(".json", ".png")
    fig.savefig(png, dpi=120)
    return png


if __name__ == "__main__":
    main()
