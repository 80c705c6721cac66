"""The selection kernel at odd varlen shapes long enough for interior chunks (unmasked loads),
for compute-sanitizer memcheck: 16 heads a group (64-row tiles), 4 heads (the IEEE dot
mapping) and 1 head (the bf16-dot mapping), bf16, paper geometry; and queries that continue a
sequence (q_offset). Prints the share of rows equal to the reference's."""
import torch

import nsa
from nsa.reference import compress_mean, select_blocks_ref

torch.manual_seed(0)
dev = "cuda"
l, d, lp, n = 32, 16, 64, 16
kw = dict(cmp_block=l, cmp_stride=d, sel_block=lp, sel_count=n)
for HQ, H in ((16, 1), (16, 4), (4, 4)):
    bounds = [0, 77, 3078, 3079, 5581]  # 77, 3001, 1 and 2502 positions
    T = bounds[-1]
    cu = torch.tensor(bounds, dtype=torch.int32, device=dev)
    q = torch.randn(1, T, HQ, 192, device=dev, dtype=torch.bfloat16)
    k = torch.randn(1, T, H, 192, device=dev, dtype=torch.bfloat16)
    kc = torch.cat([compress_mean(k[:, a:b], l, d) for a, b in zip(bounds[:-1], bounds[1:])], 1)
    got = nsa.select_blocks(q, kc, cu_seqlens=cu, backend="triton", **kw)
    ref = select_blocks_ref(q.float(), kc.float(), cu_seqlens=cu, **kw)
    same = (got == ref).all(-1).float().mean().item()
    # queries far into a sequence: every chunk but the first and last is interior
    q2 = torch.randn(1, 37, HQ, 192, device=dev, dtype=torch.bfloat16)
    kc2 = compress_mean(torch.randn(1, 4037, H, 192, device=dev, dtype=torch.bfloat16), l, d)
    got2 = nsa.select_blocks(q2, kc2, q_offset=4000, backend="triton", **kw)
    ref2 = select_blocks_ref(q2.float(), kc2.float(), q_offset=4000, **kw)
    torch.cuda.synchronize()
    print(f"HQ {HQ} H {H}: rows equal to the reference {same:.4f}, with q_offset "
          f"{(got2 == ref2).all(-1).float().mean().item():.4f}", flush=True)
