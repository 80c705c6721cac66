"""Read bandwidth of the GPU's L2 and HBM as a Triton kernel sees it: every SM streams tiles of
one buffer into registers, many times over; a buffer smaller than L2 is read from L2 after the
first pass. The slc kernels' floor is their L2-to-SM bytes over this rate (docs/kernels.md).

    python benchmarks/l2_bandwidth.py OUT.json

Writes {"meta", "results": {"<MB>": {"ms", "bytes", "TB_per_s"}}}: the best of a few tile
shapes and pipeline depths per buffer size.
"""

import json
import sys

import torch
import triton
import triton.language as tl
from triton.testing import do_bench

from nsa.apps.bench import result_meta


@triton.jit
def _stream(X, OUT, n_tiles, ITERS: tl.constexpr, BLOCK: tl.constexpr):
    """Program p reads tiles p, p + P, p + 2P, ... (mod n_tiles) of X, BLOCK elements each, and
    stores one sum, so no load is dead."""
    pid = tl.program_id(0)
    P = tl.num_programs(0)
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for it in range(ITERS):
        t = (pid + it * P) % n_tiles
        acc += tl.load(X + t.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)).to(tl.float32)
    tl.store(OUT + pid, tl.sum(acc))


def main(out: str) -> None:
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    res = {}
    for mb in (8, 16, 24, 32, 48, 1024):
        n = mb * 2 ** 20 // 2
        x = torch.randn(n, device="cuda", dtype=torch.bfloat16)
        best = None
        for block, warps, stages, per_sm in ((4096, 8, 3, 4), (8192, 8, 3, 2), (2048, 4, 4, 8), (4096, 4, 4, 8)):
            P = sms * per_sm
            n_tiles = n // block
            # L2-sized buffers: every tile read ~256 times (runs of ~1 ms); HBM: ~4 times
            iters = max(1, (256 if mb <= 64 else 4) * n_tiles // P)
            o = torch.empty(P, device="cuda", dtype=torch.float32)
            f = lambda: _stream[(P,)](x, o, n_tiles, ITERS=iters, BLOCK=block, num_warps=warps,  # noqa: E731
                                      num_stages=stages)
            f()
            ms = do_bench(f, warmup=25, rep=200)
            nbytes = P * iters * block * 2
            row = dict(ms=ms, bytes=nbytes, TB_per_s=nbytes / ms / 1e9, block=block, num_warps=warps,
                       num_stages=stages, programs=P)
            print(mb, row, flush=True)
            if best is None or row["TB_per_s"] > best["TB_per_s"]:
                best = row
        res[str(mb)] = best
    meta = result_meta("triton.testing.do_bench (median of 200 ms); bf16 tiles summed into fp32 registers")
    with open(out, "w") as fh:
        json.dump(dict(meta=meta, results=res), fh, indent=1)


if __name__ == "__main__":
    main(sys.argv[1])
