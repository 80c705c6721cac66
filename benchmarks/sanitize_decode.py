"""Paged and multi-token decode at odd shapes, for compute-sanitizer memcheck: the kernels must
read nothing outside the pools, on the first call and when relaunched, also with out-of-range
table entries (clamped) past and within what the lengths need (the max_seqlen path does not
check the table).

    compute-sanitizer --tool memcheck python benchmarks/sanitize_decode.py [--pdl]

--pdl: kernels 2-5 as programmatic dependent launches (nsa.triton.decode.PDL, off by default).
"""
import sys

import torch

from nsa import nsa_decode
from nsa.reference import compress_mean
from nsa.triton import decode

decode.PDL = "--pdl" in sys.argv[1:]

torch.manual_seed(0)
dev = "cuda"
B, HQ, H, Dk, Dv, l, d, lp, ps = 3, 16, 2, 192, 128, 32, 16, 64, 48
lens = [1003, 77, 8]
T = max(lens)
mk = lambda *s: torch.randn(*s, device=dev, dtype=torch.bfloat16)  # noqa: E731
k, v = mk(B, T, H, Dk), mk(B, T, H, Dv)
kc, vc = compress_mean(k, l, d), compress_mean(v, l, d)
P = -(-T // ps)
n_pages = B * P
table = torch.randperm(n_pages, device=dev).view(B, P).to(torch.int32)
pools = (mk(n_pages, ps // d, H, Dk), mk(n_pages, ps // d, H, Dv), mk(n_pages, ps, H, Dk), mk(n_pages, ps, H, Dv))
geo = dict(cmp_block=l, cmp_stride=d, sel_block=lp, sel_count=5, window=100, backend="triton")
seqlens = torch.tensor(lens, dtype=torch.int32, device=dev)
for S in (1, 3, 8):
    q, g = mk(B, S, HQ, Dk), torch.rand(B, S, HQ, 3, device=dev).to(torch.bfloat16)
    ring = (mk(B, 100 + S - 1, H, Dk), mk(B, 100 + S - 1, H, Dv))
    for win in (ring, (None, None)):
        o = nsa_decode(q, *pools, *win, g, cache_seqlens=seqlens, block_table=table, **geo)
        # the same plan again: the relaunch path (kept compiled kernels, C launchers)
        again = nsa_decode(q, *pools, *win, g, cache_seqlens=seqlens, block_table=table, **geo)
        bad = table.clone()
        bad[0, 3], bad[1, 0], bad[2, -1] = 10 ** 7, -3, 2 ** 31 - 1
        o2 = nsa_decode(q, *pools, *win, g, cache_seqlens=seqlens, block_table=bad, max_seqlen=P * ps, **geo)
        torch.cuda.synchronize()
        print("ok S", S, "shared" if win[0] is None else "ring", float(o.float().norm()),
              bool(torch.isfinite(o2).all()), "relaunch equal", bool(torch.equal(o, again)))

# a layer's graph-ready decode steps (the cache append kernels, then nsa_decode) at odd sizes:
# positions 0 and 1 (a block before position 0), a ring wrap, sequences at different lengths
import nsa  # noqa: E402


def layer_steps(layer, cache, pos, what):
    with torch.no_grad():
        for _ in range(24):
            x = torch.randn(pos.shape[0], 1, 96, device=dev, dtype=torch.bfloat16)
            y = layer.decode_step(x, cache, pos)
            pos += 1
    torch.cuda.synchronize()
    print("ok", what, float(y.float().norm()))


for shared in (False, True):
    cfg = nsa.NSAConfig(d_model=96, n_heads=6, n_kv_heads=2, head_dim=40, v_head_dim=24, cmp_block=8,
                        cmp_stride=4, sel_block=8, sel_count=3, window=12, shared_kv=shared, backend="triton")
    layer = nsa.NSAAttention(cfg).to(dev, torch.bfloat16)
    kind = "shared" if shared else "separate"
    layer_steps(layer, layer.new_cache(3, 41), torch.tensor([0, 1, 17], device=dev), f"layer steps {kind}")
    # the same on a paged batch: two of three slots, pages of 8 positions, a bad table entry
    # (clamped into the pool by the kernels) in a page the steps do not reach
    paged = layer.new_cache(3, 41, page_size=8)
    slots = [paged.add_sequence() for _ in range(3)][1:][::-1]
    view = paged.batch(slots)
    view.reserve(30)  # the second starts at position 5 on the device
    paged.block_table[slots[0], -1] = 10 ** 6
    layer_steps(layer, view, torch.tensor([0, 5], device=dev), f"paged layer steps {kind}")
