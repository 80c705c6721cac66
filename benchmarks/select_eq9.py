"""The selection kernel's Eq. 9 mapping: fp32 on CUDA cores (after the group's head sum) against
three bf16 tensor-core dots (before it), at every num_warps x num_stages, with the share of
(position, group) rows whose blocks differ from the fp32 mapping's.

    python benchmarks/select_eq9.py OUT.json

Writes {"meta": ..., "results": {"config/T/EQ9_DOT/warps/stages": {"ms", "rows_differing"}}}.
"""

import json
import sys

import torch
from triton.testing import do_bench

from nsa.apps.bench import result_meta
from nsa.reference import compress_mean
from nsa.triton import select as S
from nsa.triton.compressed import compressed_attention_triton

# (query heads, kv heads, Dk, l, d, l', n): the paper's, fla's, and the paper's with 4 and 1 heads a group
CONFIGS = {"paper": (64, 4, 192, 32, 16, 64, 16), "fla": (64, 4, 128, 64, 64, 64, 16),
           "paper-h4": (16, 4, 192, 32, 16, 64, 16), "paper-h1": (4, 4, 192, 32, 16, 64, 16)}


class _Fixed:
    """Stands in for the autotuned kernel: one num_warps x num_stages."""

    def __init__(self, warps, stages):
        self.warps, self.stages = warps, stages

    def __getitem__(self, grid):
        return lambda *a, **k: S._select_fwd[grid](*a, **k, num_warps=self.warps, num_stages=self.stages)


def main(out: str) -> None:
    dev = "cuda"
    config = S._config
    res = {}
    for name, (HQ, H, Dk, l, d, lp, n) in CONFIGS.items():
        for T in ((8192, 65536, 131072) if name == "paper" else (65536,)):
            g = torch.Generator(device=dev).manual_seed(T)
            q = torch.randn(1, T, HQ, Dk, device=dev, dtype=torch.bfloat16, generator=g)
            kc = compress_mean(torch.randn(1, T, H, Dk, device=dev, dtype=torch.bfloat16, generator=g), l, d)
            _, lse = compressed_attention_triton(q, kc, kc, cmp_block=l, cmp_stride=d)
            base = None
            for eq in (False, True):
                S._config = lambda *a, eq=eq: {**config(*a), "EQ9_DOT": eq}
                for warps in (4, 8):
                    for stages in (2, 3):
                        S._select_fwd_tuned = _Fixed(warps, stages)
                        f = lambda: S.select_blocks_triton(q, kc, cmp_block=l, cmp_stride=d,  # noqa: E731
                                                           sel_block=lp, sel_count=n, lse=lse)
                        idx = f()
                        base = idx if base is None else base
                        ms = do_bench(f, warmup=10, rep=50)
                        diff = (idx != base).any(-1).float().mean().item()
                        print(f"{name} T={T} EQ9_DOT={eq} warps={warps} stages={stages}: {ms:.3f} ms, "
                              f"rows differing {diff:.2e}", flush=True)
                        res[f"{name}/{T}/{eq}/{warps}/{stages}"] = dict(ms=ms, rows_differing=diff)
            meta = result_meta("triton.testing.do_bench (median of 50 ms), bf16, batch 1, random inputs")
            with open(out, "w") as fh:
                json.dump(dict(meta=meta, results=res), fh, indent=1)


if __name__ == "__main__":
    main(sys.argv[1])
