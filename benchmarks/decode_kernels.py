"""Where a graph-replayed decode step's GPU time goes, kernel by kernel (torch.profiler), with L2
flushed before each replay as ``triton.testing.do_bench`` does (``nsa bench decode``): the
paper configuration (HQ 64, H 4, Dk 192, Dv 128, l 32, d 16, l' 64, n 16, w 512), random bf16
inputs, B sequences of T cached tokens, S new tokens each. Prints and writes the mean
microseconds per step of each kernel.

    python benchmarks/decode_kernels.py --batch 1 --seqlen 65536 --new-tokens 1
writes benchmarks/results/decode_kernels_b{B}_{gpu}.json (``--out`` to choose).
"""

from __future__ import annotations

import argparse
import json

import torch

from nsa import nsa_decode
from nsa.apps.bench import gpu_tag, result_meta
from profile_kernels import device_ms

PAPER = dict(HQ=64, H=4, Dk=192, Dv=128, l=32, d=16, w=512)


def paper_inputs(B: int, T: int, S: int = 1):
    """((q, k_cmp, v_cmp, k_slc, v_slc, k_win, v_win, gates), cache_seqlens) of a decode step in
    the paper configuration: B sequences of T cached tokens, S new tokens each, random bf16."""
    c, dev = PAPER, "cuda"
    gen = torch.Generator(device=dev).manual_seed(0)
    mk = lambda *s: torch.randn(*s, device=dev, dtype=torch.bfloat16, generator=gen)  # noqa: E731
    H, HQ, Dk, Dv, w = c["H"], c["HQ"], c["Dk"], c["Dv"], c["w"]
    tc = (T - c["l"]) // c["d"] + 1
    x = (mk(B, S, HQ, Dk), mk(B, tc, H, Dk), mk(B, tc, H, Dv), mk(B, T, H, Dk), mk(B, T, H, Dv), mk(B, w, H, Dk),
         mk(B, w, H, Dv), torch.rand(B, S, HQ, 3, device=dev, generator=gen).to(torch.bfloat16))
    return x, torch.full((B,), T, dtype=torch.int32, device=dev)


def kernel_us(B: int, T: int, S: int, steps: int = 50) -> dict:
    """Mean device microseconds per replayed step of each kernel of ``nsa_decode``."""
    x, lens = paper_inputs(B, T, S)

    def step():
        return nsa_decode(*x, cache_seqlens=lens, max_seqlen=T)

    for _ in range(3):  # compile and autotune outside the graph
        step()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    flush = torch.empty(256 * 2 ** 20, dtype=torch.int8, device="cuda")  # larger than L2
    for _ in range(10):
        flush.zero_()
        graph.replay()
    ms = device_ms(graph.replay, steps, before=flush.zero_, skip=("zero", "fill"))
    return {name: t * 1e3 for name, t in ms.items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--seqlen", type=int, default=65536)
    p.add_argument("--new-tokens", type=int, default=1)
    p.add_argument("--out", default=None)
    a = p.parse_args()
    us = kernel_us(a.batch, a.seqlen, a.new_tokens)
    print({k: round(v, 2) for k, v in us.items()}, "sum", round(sum(us.values()), 2))
    meta = result_meta("torch.profiler device time of graph replays, L2 flushed before each, mean of 50")
    out = dict(meta=meta, results=[dict(batch=a.batch, T=a.seqlen, new_tokens=a.new_tokens, kernel_us=us,
                                        sum_us=sum(us.values()))])
    path = a.out or f"benchmarks/results/decode_kernels_b{a.batch}_{gpu_tag(meta['gpu'])}.json"
    with open(path, "w") as f:
        json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
