"""GPU: one warm NSA forward + backward inside cudaProfilerStart/Stop, for Nsight Compute.

    ncu --clock-control none --profile-from-start off -k 'regex:^_' --set full -o step \
        python benchmarks/ncu_step.py [T]

(``^_``: the Triton kernels, whose names start with an underscore.) Paper geometry (HQ 64, H 4,
Dk 192, Dv 128), bf16, batch 1, T = 65536 by default, random inputs; two calls before the
profiled one compile and autotune. ncu_64k_h200.json summarises such a report.
"""
import sys

import torch

from nsa import nsa_func

T = int(sys.argv[1]) if len(sys.argv) > 1 else 65536
HQ, H, Dk, Dv, l, d = 64, 4, 192, 128, 32, 16
Tc = (T - l) // d + 1
dev, dt = "cuda", torch.bfloat16
torch.manual_seed(0)
mk = lambda *s: torch.randn(*s, device=dev, dtype=dt)  # noqa: E731
leaves = [x.requires_grad_() for x in (mk(1, T, HQ, Dk), mk(1, Tc, H, Dk), mk(1, Tc, H, Dv), mk(1, T, H, Dk),
                                       mk(1, T, H, Dv), mk(1, T, H, Dk), mk(1, T, H, Dv),
                                       torch.rand(1, T, HQ, 3, device=dev, dtype=dt))]
do = torch.randn(1, T, HQ, Dv, device=dev, dtype=dt)
for it in range(3):
    if it == 2:
        torch.cuda.synchronize()
        torch.cuda.profiler.start()
    o = nsa_func(*leaves, backend="triton")
    o.backward(do)
    torch.cuda.synchronize()
torch.cuda.profiler.stop()
print("ok", float(leaves[0].grad.float().norm()))
