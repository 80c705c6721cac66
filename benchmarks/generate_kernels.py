"""Where a model's graph-replayed decode step goes, kernel by kernel: torch.profiler device time
of ``NSAModel.decode_step`` captured in a CUDA graph (as ``generate(cuda_graph=True)`` replays
it), eager and through torch.compile, NSA against full attention, summed by kernel name, with
the replay's own time (do_bench). What the gap of ``nsa bench generate`` is made of.

    python benchmarks/generate_kernels.py OUT.json [--preset small] [--batch 1 16] [--seqlens 4096 32768]
"""

from __future__ import annotations

import argparse
import json

import torch
import triton

from nsa.apps.bench import _graphed, result_meta
from nsa.model import ModelConfig, NSAModel
from profile_kernels import device_ms


def cell(preset: str, attention: str, T: int, B: int, compiled: bool) -> dict:
    cfg = ModelConfig.preset(preset, attention=attention, max_seq_len=T + 2)
    torch.manual_seed(0)
    model = NSAModel(cfg).to("cuda", torch.bfloat16).eval()
    cache = model.new_cache(B, T + 2)
    with torch.no_grad():
        model(torch.randint(0, cfg.vocab_size, (B, T), device="cuda"), cache=cache)  # prefill
    nxt = torch.randint(0, cfg.vocab_size, (B, 1), device="cuda")
    seqlens = torch.full((B,), T, dtype=torch.int64, device="cuda")
    torch._dynamo.reset()
    decode = torch.compile(model.decode_step, fullgraph=True) if compiled else model.decode_step

    @torch.no_grad()
    def step():
        seqlens.fill_(T)  # the same position every call (decode_step advances it)
        decode(nxt, cache, seqlens)

    step()
    replay = _graphed(step)
    us = {n: t * 1e3 for n, t in device_ms(replay, 50).items()}
    return dict(preset=preset, attention=attention, T=T, batch=B, compiled=compiled,
                replay_us=triton.testing.do_bench(replay, rep=200) * 1e3, kernels=len(us),
                kernel_sum_us=sum(us.values()), kernel_us=us)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("out")
    p.add_argument("--preset", default="small")
    p.add_argument("--batch", type=int, nargs="+", default=[1, 16])
    p.add_argument("--seqlens", type=int, nargs="+", default=[4096, 32768])
    a = p.parse_args()
    rows = []
    for B in a.batch:
        for T in a.seqlens:
            for attention in ("nsa", "full"):
                for compiled in (False, True):
                    r = cell(a.preset, attention, T, B, compiled)
                    print({k: (round(v, 1) if isinstance(v, float) else v) for k, v in r.items() if k != "kernel_us"},
                          flush=True)
                    rows.append(r)
                    with open(a.out, "w") as f:
                        json.dump(dict(meta=result_meta("graph replay: do_bench median; kernels: torch.profiler "
                                                        "device time, mean of 50 replays"), results=rows), f, indent=1)


if __name__ == "__main__":
    main()
