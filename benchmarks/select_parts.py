"""Where the selection kernel's time goes: variants of `_select_fwd` that each leave one stage
out (the output still depends on the scores, so nothing compiles away), timed in one process.

    python benchmarks/select_parts.py OUT.json [--T 65536] [--warps 4] [--stages 2]

The variants are built from the source of `nsa/triton/select.py` by textual edits (each edit
must match, or the script stops), so the probe always measures the kernel as it is:

  shipped  the kernel as it is
  no_exp   p = s * scale - lse instead of exp2(...): the MUFU work
  no_eq9   the Eq. 9 mapping replaced by a sum of 4 neighbouring tokens
  no_sort  the chunk's keys go into the running list by an elementwise max (no sort, no merge)
  no_merge the chunk's sort kept, its merge into the running list replaced by a max
  dot_only everything after p replaced by one sum a position (loads, dots, exp, the mask)

Variants combine with "+" ("no_exp+no_sort"); "module:M" times the `_select_fwd` of module M
(for instance an earlier commit's select.py copied into the package).
Paper geometry by default (64 query heads, 4 kv heads, Dk 192, l 32, d 16, l' 64, n 16; --config
for fla's and smaller groups), bf16, batch 1, random inputs. Writes {"meta", "results": {variant: {"ms", "chunks", "ns_per_chunk_tile"}}}.
"""

import argparse
import importlib
import importlib.util
import inspect
import json

import torch
from triton.testing import do_bench

from nsa.apps.bench import result_meta
from nsa.reference import compress_mean
from nsa.triton import select as S
from nsa.triton.compressed import compressed_attention_triton

MERGE = """    top = _chunk_top(key, NB, INTERP)  # the chunk's NB best, ascending
    # max(descending, ascending) holds the top NB of both as a bitonic sequence: one merge
    # sorts it
    best = _bitonic_merge_rows(tl.maximum(best, top), True)"""
EDITS = {
    "no_exp": [("tl.exp2(s * qk_scale - lse[:, None])", "(s * qk_scale - lse[:, None])")],
    "no_eq9": [("sc = tl.sum(pg[:, :, None] * w[None, :, :], 1)", "sc = tl.sum(tl.reshape(pg, [BT, BJ, BC // BJ]), 2)")],
    "no_sort": [(MERGE, "    best = tl.maximum(best, key)")],
    "no_merge": [(MERGE, "    best = tl.maximum(best, _chunk_top(key, NB, INTERP))")],
    "dot_only": [("    j = j0 + cj\n", None)],  # from here to the merge's end
}
DOT_ONLY = "    best += tl.sum(tl.reshape(p, [BT, HP * BC]), 1).to(tl.int64)[:, None]\n"


# (query heads, kv heads, Dk, l, d, l', n)
CONFIGS = {"paper": (64, 4, 192, 32, 16, 64, 16), "fla": (64, 4, 128, 64, 64, 64, 16),
           "paper-h4": (16, 4, 192, 32, 16, 64, 16), "paper-h1": (4, 4, 192, 32, 16, 64, 16)}


def variant(name: str):
    """`_select_fwd` of the variant `name`: rebuilt from edited source (with the `_merge_chunk` it
    calls), or taken from another module ("module:M")."""
    import triton

    if name.startswith("module:"):  # another version of the kernel, e.g. a copy of an earlier commit's select.py
        return importlib.import_module(name[len("module:"):])._select_fwd
    # the chunk's work is in _merge_chunk, which _select_fwd calls: both are rebuilt
    src = inspect.getsource(S._merge_chunk.fn) + "\n\n" + inspect.getsource(S._select_fwd.fn)
    for part in name.split("+"):  # "no_exp+no_sort": both edits
        for old, new in EDITS.get(part, []):
            if old not in src or (new is None and MERGE not in src):
                raise SystemExit(f"select_parts: edit of {part} no longer matches select.py: {old[:60]!r}")
            if new is None:  # dot_only: cut from here to the end of the merge
                a, b = src.index(old), src.index(MERGE) + len(MERGE)
                src = src[:a] + DOT_ONLY + src[b:]
            else:
                src = src.replace(old, new)
    # triton reads a jitted function's source from its file: exec a file of its own
    mod = f"select_{name.replace('+', '_')}"
    path = f"/tmp/{mod}.py"
    with open(path, "w") as fh:
        fh.write("import triton\nimport triton.language as tl\nimport nsa.triton.select as _S\n"
                 "globals().update({k: v for k, v in vars(_S).items() if not k.startswith('__')})\n\n\n" + src)
    spec = importlib.util.spec_from_file_location(mod, path)
    m = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(m)
    assert isinstance(m._select_fwd, triton.runtime.JITFunction)
    return m._select_fwd


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--T", type=int, default=65536)
    ap.add_argument("--warps", type=int, default=4)
    ap.add_argument("--stages", type=int, default=2)
    ap.add_argument("--rows", type=int, default=128, help="rows a tile (positions x the group's heads)")
    ap.add_argument("--eq9-dot", action="store_true", help="the Eq. 9 mapping as bf16 dots before the head sum")
    ap.add_argument("--config", default="paper", choices=list(CONFIGS))
    ap.add_argument("--variants", default="shipped,no_exp,no_sort,no_merge,dot_only")
    a = ap.parse_args()
    dev, T = "cuda", a.T
    HQ, H, Dk, l, d, lp, n = CONFIGS[a.config]
    g = torch.Generator(device=dev).manual_seed(0)
    q = torch.randn(1, T, HQ, Dk, device=dev, dtype=torch.bfloat16, generator=g)
    kc = compress_mean(torch.randn(1, T, H, Dk, device=dev, dtype=torch.bfloat16, generator=g), l, d)
    _, lse = compressed_attention_triton(q, kc, kc, cmp_block=l, cmp_stride=d)
    cfg = S._config(HQ // H, n, l, d, lp, False)
    cfg["BT"] = a.rows // cfg["HP"]
    cfg["EQ9_DOT"] = cfg["EQ9_DOT"] or a.eq9_dot
    config = S._config
    # chunk-tiles the kernel walks: per tile of BT positions, ceil(n_blocks / BJE) chunks
    t_last = torch.arange(cfg["BT"] - 1, T, cfg["BT"]).clamp(max=T - 1)
    chunks = int(((t_last // lp + 1 + cfg["BJE"] - 1) // cfg["BJE"]).sum()) * H
    tuned = S._select_fwd_tuned
    S._config = lambda *x: cfg
    res, first = {}, None
    try:
        for name in a.variants.split(","):
            kern = variant(name)
            S._select_fwd_tuned = type("Fixed", (), {"__getitem__": lambda self, grid, k=kern: (
                lambda *x, **kw: k[grid](*x, **kw, num_warps=a.warps, num_stages=a.stages))})()
            f = lambda: S.select_blocks_triton(q, kc, cmp_block=l, cmp_stride=d, sel_block=lp,  # noqa: E731
                                               sel_count=n, lse=lse)
            idx = f()
            first = idx if first is None else first
            same = bool(torch.equal(idx, first))
            ms = do_bench(f, warmup=25, rep=100)
            res[name] = dict(config=a.config, rows=a.rows, num_warps=a.warps, num_stages=a.stages, eq9_dot=cfg["EQ9_DOT"], ms=ms, chunks=chunks,
                             ns_per_chunk_tile=ms * 1e6 / chunks, same_blocks_as_first=same)
            print(f"{name:16s} {a.config} rows {a.rows} warps {a.warps} stages {a.stages} eq9_dot {cfg['EQ9_DOT']}: "
                  f"{ms:8.3f} ms  same {same}", flush=True)
    finally:
        S._select_fwd_tuned, S._config = tuned, config
    meta = result_meta(f"triton.testing.do_bench (median of 100 ms), bf16, batch 1, random inputs, T={T}, "
                       f"{a.config} geometry, {a.rows} rows a tile, num_warps={a.warps}, num_stages={a.stages}")
    with open(a.out, "w") as fh:
        json.dump(dict(meta=meta, results=res), fh, indent=1)


if __name__ == "__main__":
    main()
