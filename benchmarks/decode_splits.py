"""The decode cmp kernel's split of the compressed tokens: the shipped count (programs to fill
the GPU twice, :func:`nsa.triton.decode._n_split`) against 4, 8 and 16 programs per
multiprocessor, each retuned: per-kernel device time (L2 flushed) and the graph-replayed step,
the settings alternated twice in one process, outputs against the shipped split. Paper
configuration, random bf16 inputs, one new token.

    python benchmarks/decode_splits.py OUT.json
"""

from __future__ import annotations

import json
import sys

import torch
import triton

from nsa import nsa_decode
from nsa.apps.bench import result_meta
from nsa.triton import _common as C
from nsa.triton import decode as D
from decode_kernels import paper_inputs  # benchmarks/ (the script's folder is on the path)
from profile_kernels import device_ms

CASES = [(16, 65536), (4, 65536), (1, 131072)]  # (batch, cached tokens)
SHIPPED = D._n_split


def per_sm(k: int):
    """_n_split with k programs per multiprocessor instead of 2."""
    def n_split(tc, bh, BN, device):
        return max(1, min(C.cdiv(tc, BN), C.cdiv(k * D._sms(device), max(bh, 1))))
    return n_split


def main() -> None:
    out, rows = sys.argv[1], []
    flush = torch.empty(256 * 2 ** 20, dtype=torch.int8, device="cuda")
    for B, T in CASES:
        x, lens = paper_inputs(B, T)
        step = lambda: nsa_decode(*x, cache_seqlens=lens, max_seqlen=T)  # noqa: E731
        row, ref = dict(batch=B, T=T), None
        for rnd in range(2):
            for k in (2, 4, 8, 16):
                D._n_split = SHIPPED if k == 2 else per_sm(k)
                D._plan.cache_clear()
                tuned = D._decode_cmp_tuned
                if rnd == 0:  # retune each split (the key does not hold it)
                    tuned.cache.clear()
                    tuned._fast.clear()
                    tuned.cache_results = False
                for _ in range(3):
                    o = step()
                torch.cuda.synchronize()
                if ref is None:
                    ref = o.clone()
                row[f"split{k}_maxdiff"] = (o.float() - ref.float()).abs().max().item()
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph):
                    step()
                row.setdefault(f"split{k}_graph_us", []).append(triton.testing.do_bench(graph.replay, rep=200) * 1e3)
                us = device_ms(graph.replay, 50, before=flush.zero_, skip=("zero", "fill"))
                row.setdefault(f"split{k}_cmp_us", []).append(
                    sum(t for n, t in us.items() if "decode_cmp" in n) * 1e3)
                row[f"split{k}_nsplit"] = D._n_split(D.geometry.num_cmp_blocks(T, 32, 16), B * 4, 64,
                                                     torch.device("cuda"))
                del graph
        D._n_split = SHIPPED
        D._plan.cache_clear()
        print(row, flush=True)
        rows.append(row)
        with open(out, "w") as f:
            json.dump(dict(meta=result_meta("graph step: do_bench median; cmp: torch.profiler device time, L2 "
                                            "flushed, mean of 50; 2/4/8/16 programs per SM alternated twice"),
                           rows=rows), f, indent=1)


if __name__ == "__main__":
    main()
