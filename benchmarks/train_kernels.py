"""Where a training step's attention time goes, kernel by kernel: torch.profiler device time of
``nsa_func`` forward + backward (paper configuration: HQ 64, H 4, Dk 192, Dv 128, l 32, d 16,
l' 64, n 16, w 512; bf16, batch 1, random inputs), summed by kernel name, mean of ``--steps``
warm steps. What ``nsa bench train``'s breakdown cannot show: the pieces of the whole backward
as it runs (the breakdown times each branch alone).

    python benchmarks/train_kernels.py --seqlen 65536
writes benchmarks/results/train_kernels_{T // 1024}k_{gpu}.json (``--out`` to choose).
"""

from __future__ import annotations

import argparse
import json

import torch

from nsa import nsa_func
from nsa.apps.bench import gpu_tag, result_meta
from profile_kernels import device_ms


def kernel_ms(T: int, steps: int = 3) -> dict:
    """Mean device milliseconds per forward + backward of each kernel (and PyTorch op)."""
    HQ, H, Dk, Dv, l, d = 64, 4, 192, 128, 32, 16
    tc = (T - l) // d + 1
    gen = torch.Generator(device="cuda").manual_seed(0)
    mk = lambda *s: torch.randn(*s, device="cuda", dtype=torch.bfloat16, generator=gen)  # noqa: E731
    leaves = [x.requires_grad_() for x in (mk(1, T, HQ, Dk), mk(1, tc, H, Dk), mk(1, tc, H, Dv), mk(1, T, H, Dk),
                                           mk(1, T, H, Dv), mk(1, T, H, Dk), mk(1, T, H, Dv),
                                           torch.rand(1, T, HQ, 3, device="cuda", generator=gen,
                                                      dtype=torch.bfloat16))]
    do = mk(1, T, HQ, Dv)

    def step():
        nsa_func(*leaves, backend="triton").backward(do)
        for x in leaves:
            x.grad = None

    for _ in range(2):  # compile and autotune
        step()
    return device_ms(step, steps)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seqlen", type=int, default=65536)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--out", default=None)
    a = p.parse_args()
    ms = kernel_ms(a.seqlen, a.steps)
    for name, v in ms.items():
        print(f"{v:9.3f} ms  {name[:90]}")
    print(f"{sum(ms.values()):9.3f} ms  total")
    meta = result_meta(f"torch.profiler device time, mean of {a.steps} warm forward + backward steps")
    out = dict(meta=meta, results=[dict(T=a.seqlen, kernel_ms=ms, sum_ms=sum(ms.values()))])
    path = a.out or f"benchmarks/results/train_kernels_{a.seqlen // 1024}k_{gpu_tag(meta['gpu'])}.json"
    with open(path, "w") as f:
        json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
