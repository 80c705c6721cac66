"""Forward + backward at an odd varlen shape (for compute-sanitizer memcheck / racecheck)."""
import sys
import torch
from nsa import nsa_func
from nsa.reference import compress_mean
torch.manual_seed(0)
dev = "cuda"
cu = torch.tensor([0, 77, 300, 301, 1203], dtype=torch.int32, device=dev)
T, HQ, H, Dk, Dv, l, d, lp = 1203, 16, 1, 192, 128, 32, 16, 64
mk = lambda *s: torch.randn(*s, device=dev, dtype=torch.bfloat16)
q, k, v = mk(1, T, HQ, Dk), mk(1, T, H, Dk), mk(1, T, H, Dv)
bounds = cu.tolist()
kc = torch.cat([compress_mean(k[:, a:b], l, d) for a, b in zip(bounds[:-1], bounds[1:])], 1)
vc = torch.cat([compress_mean(v[:, a:b], l, d) for a, b in zip(bounds[:-1], bounds[1:])], 1)
g = torch.rand(1, T, HQ, 3, device=dev).to(torch.bfloat16)
leaves = [x.detach().clone().requires_grad_() for x in (q, kc, vc, k, v, k.clone(), v.clone(), g)]
for det in ([False, True] if len(sys.argv) < 2 else [sys.argv[1] == "det"]):
    kw = dict(cmp_block=l, cmp_stride=d, sel_block=lp, sel_count=5, window=100, cu_seqlens=cu, backend="triton")
    try:
        o = nsa_func(*leaves, deterministic=det, **kw)
    except TypeError:  # before the op takes deterministic=
        o = nsa_func(*leaves, **kw)
    o.backward(torch.randn_like(o))
    torch.cuda.synchronize()
    print("ok det", det, float(leaves[0].grad.float().norm()))
