"""A decode step with its kernels 2-5 launched as programmatic dependents of the one before
(``nsa.triton.decode.PDL``, Hopper) against serial launches: graph-replayed and eager steps,
the two alternated twice in one process, outputs compared bitwise. Paper configuration
(HQ 64, H 4, Dk 192, Dv 128, l 32, d 16, l' 64, n 16, w 512), random bf16 inputs, one new token.

    python benchmarks/decode_pdl.py OUT.json
"""

from __future__ import annotations

import json
import sys

import torch
import triton

from nsa import nsa_decode
from nsa.apps.bench import result_meta
from nsa.triton import decode as D
from decode_kernels import paper_inputs  # benchmarks/ (the script's folder is on the path)

CASES = [(1, 65536), (1, 131072), (16, 65536)]  # (batch, cached tokens)


def main() -> None:
    out = sys.argv[1]
    rows = []
    for B, T in CASES:
        x, lens = paper_inputs(B, T)
        step = lambda: nsa_decode(*x, cache_seqlens=lens, max_seqlen=T)  # noqa: E731
        row, outs = dict(batch=B, T=T), {}
        for rnd in range(2):
            for tag, on in (("serial", False), ("pdl", True)):
                D.PDL = on
                for _ in range(3):  # compile and autotune outside the graph
                    o = step()
                torch.cuda.synchronize()
                outs[tag] = o.clone()
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph):
                    step()
                row.setdefault(f"{tag}_graph_us", []).append(triton.testing.do_bench(graph.replay, rep=200) * 1e3)
                row.setdefault(f"{tag}_eager_us", []).append(triton.testing.do_bench(step, rep=200) * 1e3)
                del graph
        D.PDL = False
        row["same_output"] = bool(torch.equal(outs["serial"], outs["pdl"]))
        print(row, flush=True)
        rows.append(row)
        with open(out, "w") as f:
            json.dump(dict(meta=result_meta("triton.testing.do_bench median (L2 flushed), serial / PDL "
                                            "alternated twice"), rows=rows), f, indent=1)


if __name__ == "__main__":
    main()
