"""How local is a trained model's block selection? Measured on the committed trained model
(tests/data/needle_gpu_h8kv1_s3_model.safetensors: the tiny family, 8 query heads per KV head)
on CPU with the torch backend, for passkey prompts and a text sample (the source of Python's
``inspect`` module, bytes) at a few contexts.

Per layer and KV head: the neighbour overlap (the fraction of the n blocks position t selects
that t + k selects too, k in 1, 4, 16, 64), the same over the free picks only (not the forced
blocks 0, t // l', t // l' - 1), the share of selections that are forced, and how far back the
free picks lie (histogram in blocks). Also the same statistics of the benchmark's random inputs
at the model's geometry, for comparison. Statistics in :mod:`nsa.apps.bench_inputs`.

    PYTHONPATH=src python benchmarks/selection_locality.py            # ~2 min on 2 CPU cores
writes benchmarks/results/selection_locality_cpu.json and .png.
"""

from __future__ import annotations

import argparse
import datetime
import inspect
import json
import os
import platform
import subprocess
import sys

import numpy as np
import torch

from nsa.apps.bench_inputs import (OFFSETS, distance_histogram, forced_fraction, free_pick_distances,
                                   neighbour_overlap)
from nsa.apps.data import PasskeyTask
from nsa.model import load_model

HERE = os.path.dirname(os.path.abspath(__file__))
MODEL = os.path.join(HERE, "..", "tests", "data", "needle_gpu_h8kv1_s3_model.safetensors")


def selections(model, tokens: torch.Tensor) -> list[torch.Tensor]:
    """Block indices ``[B, T, H, n]`` of each layer for ``tokens [B, T]`` (the model's own
    forward, layer by layer, with return_selection=True)."""
    x = model.embed(tokens)
    if model.shift is not None:
        x = x + model.shift(torch.cat([torch.zeros_like(x[:, :1]), x[:, :-1]], 1))
    out = []
    for block in model.blocks:
        y, sel = block.attn(block.attn_norm(x), return_selection=True)
        x = x + y
        x = x + block.mlp(block.mlp_norm(x))
        out.append(sel)
    return out


def stats(idx: torch.Tensor, sel_block: int) -> dict:
    """Per KV head lists: overlap / free overlap at each offset, forced share, distance
    histogram of the free picks, and the number of positions measured."""
    H = idx.shape[2]
    r = dict(positions=max(0, idx.shape[1] - idx.shape[-1] * sel_block),
             overlap={k: neighbour_overlap(idx, k, sel_block=sel_block).tolist() for k in OFFSETS},
             free_overlap={k: neighbour_overlap(idx, k, sel_block=sel_block, free_only=True).tolist()
                           for k in OFFSETS},
             forced_fraction=forced_fraction(idx, sel_block=sel_block).tolist())
    d = free_pick_distances(idx, sel_block=sel_block)
    r["free_distance_blocks"] = [distance_histogram(d[g]) for g in range(H)]
    r["free_distance_median_blocks"] = [float(d[g].double().median()) if d[g].numel() else None for g in range(H)]
    return r


def prompts(T: int, n_passkey: int, seed: int) -> dict:
    """name -> uint8 tokens [T]: passkey prompts (needle at several depths) and a text sample."""
    task = PasskeyTask(T)
    rng = np.random.default_rng(seed)
    out = {}
    for i, depth in enumerate(np.linspace(0.1, 0.9, n_passkey)):
        toks, _, _ = task.example(T, float(depth), rng)
        out[f"passkey_depth{depth:.2f}"] = toks
    src = open(inspect.getsourcefile(inspect), "rb").read()
    reps = -(-T // len(src))
    out["text_inspect_py"] = np.frombuffer((src * reps)[:T], dtype=np.uint8)
    return out


def mean(xs):
    xs = [x for x in xs if x is not None]
    return sum(xs) / len(xs) if xs else None


def summarise(rows: list[dict]) -> dict:
    """Means over every (input, context, layer, group) of the overlaps and the forced share;
    means of the distance histograms; per input kind too."""
    def agg(rs):
        s = dict(overlap={}, free_overlap={})
        for key in ("overlap", "free_overlap"):
            for k in OFFSETS:
                s[key][k] = mean([v for r in rs for v in r[key][k]])
        s["forced_fraction"] = mean([v for r in rs for v in r["forced_fraction"]])
        bins = rs[0]["free_distance_blocks"][0].keys()
        s["free_distance_blocks"] = {b: mean([h[b] for r in rs for h in r["free_distance_blocks"]]) for b in bins}
        return s

    out = dict(all=agg([r for r in rows if r["input"] != "random"]))
    for kind in ("passkey", "text", "random"):
        rs = [r for r in rows if r["input"].startswith(kind)]
        if rs:
            out[kind] = agg(rs)
    for T in sorted({r["T"] for r in rows}):
        out[f"T{T}"] = agg([r for r in rows if r["T"] == T and r["input"] != "random"])
    return out


def random_selection(T: int, cfg, seed: int) -> torch.Tensor:
    """Selection of the benchmark's random inputs (``nsa bench prefill --inputs random``) at
    the model's attention geometry: normal q and k, k_cmp the mean pooling of k."""
    from nsa import select_blocks
    from nsa.reference import compress_mean

    a = cfg.attn
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(1, T, a.n_heads, a.head_dim, generator=g)
    k = torch.randn(1, T, a.n_kv_heads, a.head_dim, generator=g)
    kc = compress_mean(k, a.cmp_block, a.cmp_stride)
    return select_blocks(q, kc, cmp_block=a.cmp_block, cmp_stride=a.cmp_stride, sel_block=a.sel_block,
                         sel_count=a.sel_count, backend="torch")


def plot(out: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4))
    s = out["summary"]
    for kind, style in (("passkey", "o-"), ("text", "s-"), ("random", "x--")):
        if kind not in s:
            continue
        a1.plot(OFFSETS, [s[kind]["overlap"][k] for k in OFFSETS], style, label=f"{kind}: all n blocks")
        a1.plot(OFFSETS, [s[kind]["free_overlap"][k] for k in OFFSETS], style, alpha=0.5,
                label=f"{kind}: free picks")
    a1.set_xscale("log", base=2)
    a1.set_xlabel("offset k (positions)")
    a1.set_ylabel("fraction of t's blocks that t + k selects")
    a1.set_ylim(0, 1.02)
    a1.grid(True, alpha=0.3)
    a1.legend(fontsize=7)
    bins = list(s["all"]["free_distance_blocks"])
    for i, kind in enumerate(("passkey", "text", "random")):
        if kind in s:
            a2.bar(np.arange(len(bins)) + (i - 1) * 0.27, [s[kind]["free_distance_blocks"][b] for b in bins],
                   0.27, label=kind)
    a2.set_xticks(range(len(bins)), bins, rotation=45, fontsize=7)
    a2.set_xlabel("distance of a free pick t // l' - j (blocks)")
    a2.set_ylabel("share of free picks")
    a2.legend(fontsize=7)
    m = out["meta"]
    fig.suptitle(f"selection locality of {m['model']} (l'={m['geometry']['sel_block']}, n={m['geometry']['sel_count']}); "
                 f"torch {m['torch']}, {m['date'][:10]}, {m['commit']}", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--contexts", type=int, nargs="+", default=[1024, 2048, 4096])
    p.add_argument("--passkeys", type=int, default=3, help="passkey prompts per context (depths 0.1..0.9)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=os.path.join(HERE, "results", "selection_locality_cpu"))
    args = p.parse_args(argv)
    torch.manual_seed(args.seed)
    model = load_model(MODEL, backend="torch").eval()
    a = model.config.attn
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=HERE, capture_output=True,
                            text=True).stdout.strip() or None
    meta = dict(model=os.path.basename(MODEL), date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                commit=commit, torch=torch.__version__, numpy=np.__version__, python=platform.python_version(),
                device="cpu", backend="torch", text_sample=f"inspect.py of Python {platform.python_version()}",
                geometry=dict(n_heads=a.n_heads, n_kv_heads=a.n_kv_heads, head_dim=a.head_dim, cmp_block=a.cmp_block,
                              cmp_stride=a.cmp_stride, sel_block=a.sel_block, sel_count=a.sel_count, window=a.window),
                offsets=list(OFFSETS), distance_bins_blocks=list(distance_histogram(torch.zeros(0)).keys()),
                note="positions t < n*l' left out (everything eligible is selected there)")
    rows = []
    with torch.no_grad():
        for T in args.contexts:
            for name, toks in prompts(T, args.passkeys, args.seed).items():
                sels = selections(model, torch.from_numpy(toks.astype(np.int64))[None])
                for layer, idx in enumerate(sels):
                    rows.append(dict(input=name, T=T, layer=layer, **stats(idx, a.sel_block)))
                    r = rows[-1]
                    print(f"T={T} {name:>22} layer {layer}: overlap k=1 {mean(r['overlap'][1]):.3f} "
                          f"k=64 {mean(r['overlap'][64]):.3f}; free k=1 {mean(r['free_overlap'][1]):.3f} "
                          f"k=64 {mean(r['free_overlap'][64]):.3f}; forced {mean(r['forced_fraction']):.3f}",
                          flush=True)
            rows.append(dict(input="random", T=T, layer=None, **stats(random_selection(T, model.config, args.seed),
                                                                      a.sel_block)))
    out = dict(meta=meta, summary=summarise(rows), results=rows)
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out + ".json", "w") as f:
        json.dump(out, f, indent=1)
    plot(out, args.out + ".png")
    print(json.dumps(out["summary"]["all"], indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
