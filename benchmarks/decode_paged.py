"""Paged against contiguous decode, in one run: ``nsa_decode`` with k/v in pages (random page
order, ``--page-size``) and in one contiguous cache, same numbers, for each T, batch and S new
tokens per sequence; as CUDA graphs (GPU time alone) and eager. Checks that both give the same
output bit for bit. Writes a JSON of the timings and prints the paged / contiguous ratio (the
issue's bar: within 10%).

    python benchmarks/decode_paged.py --seqlens 8192 32768 131072 --batch 1 16 --new-tokens-per-step 1 2 4 8
"""

from __future__ import annotations

import argparse
import json
import sys

import torch
from triton.testing import do_bench

from nsa import nsa_decode
from nsa.apps.bench import gpu_tag, result_meta
from nsa.reference import compress_mean

PAPER = dict(HQ=64, H=4, Dk=192, Dv=128, l=32, d=16, lp=64, n=16, w=512)


def graphed(fn):
    fn()
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    return g.replay


def case(T, B, S, page_size, shared, rep):
    c = PAPER
    gen = torch.Generator(device="cuda").manual_seed(T + B + S)
    mk = lambda *s: torch.randn(*s, device="cuda", dtype=torch.bfloat16, generator=gen)  # noqa: E731
    H, HQ, Dk, Dv, w = c["H"], c["HQ"], c["Dk"], c["Dv"], c["w"]
    q, gates = mk(B, S, HQ, Dk), torch.rand(B, S, HQ, 3, device="cuda", generator=gen).to(torch.bfloat16)
    k, v = mk(B, T, H, Dk), mk(B, T, H, Dv)
    kc, vc = compress_mean(k, c["l"], c["d"]), compress_mean(v, c["l"], c["d"])
    kw, vw = (None, None) if shared else (mk(B, w + S - 1, H, Dk), mk(B, w + S - 1, H, Dv))
    P, cpp = -(-T // page_size), page_size // c["d"]
    table = torch.randperm(B * P, device="cuda").view(B, P).to(torch.int32)

    def pool(x, rows):
        x = torch.cat([x, x.new_zeros(B, P * rows - x.shape[1], *x.shape[2:])], 1)
        out = torch.empty(B * P, rows, *x.shape[2:], dtype=x.dtype, device="cuda")
        out[table.long().flatten()] = x.reshape(B * P, rows, *x.shape[2:])
        return out

    paged = (pool(kc, cpp), pool(vc, cpp), pool(k, page_size), pool(v, page_size))
    lens = torch.full((B,), T, dtype=torch.int32, device="cuda")
    geo = dict(cmp_block=c["l"], cmp_stride=c["d"], sel_block=c["lp"], sel_count=c["n"], window=w,
               cache_seqlens=lens, max_seqlen=T, backend="triton")
    with torch.no_grad():
        contiguous = lambda: nsa_decode(q, kc, vc, k, v, kw, vw, gates, **geo)  # noqa: E731
        paged_step = lambda: nsa_decode(q, *paged, kw, vw, gates, block_table=table, **geo)  # noqa: E731
        same = torch.equal(contiguous(), paged_step())
        res = dict(T=T, batch=B, S=S, page_size=page_size, shared_kv=shared, same_output=same)
        for name, fn in (("contiguous", contiguous), ("paged", paged_step)):
            res[f"{name}_ms"] = do_bench(fn, rep=rep)
            res[f"{name}_graph_ms"] = do_bench(graphed(fn), rep=rep)
    res["ratio_graph"] = res["paged_graph_ms"] / res["contiguous_graph_ms"]
    res["ratio"] = res["paged_ms"] / res["contiguous_ms"]
    return res


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seqlens", type=int, nargs="+", default=[8192, 32768, 131072])
    p.add_argument("--batch", type=int, nargs="+", default=[1, 16])
    p.add_argument("--new-tokens-per-step", type=int, nargs="+", default=[1, 2, 4, 8])
    p.add_argument("--page-size", type=int, default=64)
    p.add_argument("--shared-kv", action="store_true", help="the window reads the pages (no ring)")
    p.add_argument("--rep", type=int, default=200)
    p.add_argument("--out", default=None, help="default benchmarks/results/decode_paged_<gpu>.json")
    a = p.parse_args()
    a.out = a.out or f"benchmarks/results/decode_paged_{gpu_tag(torch.cuda.get_device_name())}.json"
    meta = dict(result_meta("triton.testing.do_bench median (CUDA graph replay and eager), bf16, random inputs"),
                command="python benchmarks/decode_paged.py " + " ".join(sys.argv[1:]))
    rows = []
    for T in a.seqlens:
        for B in a.batch:
            for S in a.new_tokens_per_step:
                torch.cuda.empty_cache()
                r = case(T, B, S, a.page_size, a.shared_kv, a.rep)
                rows.append(r)
                print(f"T={T:>6} B={B:>2} S={S} contiguous {r['contiguous_graph_ms'] * 1e3:.0f}us "
                      f"paged {r['paged_graph_ms'] * 1e3:.0f}us (graph) ratio {r['ratio_graph']:.3f} "
                      f"eager ratio {r['ratio']:.3f} same={r['same_output']}", flush=True)
                with open(a.out, "w") as f:
                    json.dump(dict(meta=meta, config=PAPER, results=rows), f, indent=1)
    plot(rows, a.out.rsplit(".", 1)[0] + ".png")


def plot(rows: list[dict], png: str) -> None:
    """Graph-replay time of each case, contiguous beside paged, with the paged / contiguous ratio."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [f"{r['T'] // 1024}k B{r['batch']} S{r['S']}" for r in rows]
    x = range(len(rows))
    fig, ax = plt.subplots(figsize=(max(6, len(rows) * 0.9), 3.6))
    ax.bar([i - 0.2 for i in x], [r["contiguous_graph_ms"] * 1e3 for r in rows], 0.4, label="contiguous cache")
    ax.bar([i + 0.2 for i in x], [r["paged_graph_ms"] * 1e3 for r in rows], 0.4, label="paged cache")
    for i, r in zip(x, rows):
        ax.text(i + 0.2, r["paged_graph_ms"] * 1e3, f"{r['ratio_graph']:.2f}x", ha="center", va="bottom", fontsize=7)
    ax.set_xticks(list(x), labels, rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("decode step, us (CUDA graph)")
    ax.set_title(f"nsa_decode, paged (page size {rows[0]['page_size']}) vs contiguous, paper configuration")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(png, dpi=120)


if __name__ == "__main__":
    main()
