"""Where a model's training step goes, kernel by kernel: torch.profiler device time of one
forward + backward of a preset (bf16 autocast, fp32 weights, batch 1, random tokens, as
``nsa bench model-train`` times them) with NSA (Triton kernels) and with full attention (SDPA
cuDNN), summed by kernel name, mean of ``--steps`` warm steps, next to the step's wall clock:
what the model-level gap to full attention is made of.

    python benchmarks/model_kernels.py --preset small --seqlen 8192
writes benchmarks/results/model_kernels_{preset}_{T // 1024}k_{gpu}.json (``--out`` to choose).
"""

from __future__ import annotations

import argparse
import json

import torch
import torch.nn.functional as F

from nsa.apps.bench import gpu_tag, result_meta
from nsa.apps.bench_model import _sdpa_context, model_and_tokens
from profile_kernels import device_ms, wall_ms


def profile(preset: str, attention: str, T: int, steps: int) -> dict:
    model, tokens = model_and_tokens(preset, attention, T, 1, "cuda")
    x, y = tokens[:, :-1], tokens[:, 1:]
    sdpa = "cudnn" if attention == "full" else None

    def step():
        with _sdpa_context(sdpa), torch.autocast("cuda", dtype=torch.bfloat16):
            logits = model(x)
        loss = F.cross_entropy(logits.float().flatten(0, 1), y.flatten())
        with _sdpa_context(sdpa):
            loss.backward()
        for p in model.parameters():
            p.grad = None

    wall = wall_ms(step, steps, warmup=3)  # the warm-up compiles and autotunes
    ms = device_ms(step, steps)
    return dict(preset=preset, attention=attention, T=T, wall_ms=wall, kernel_sum_ms=sum(ms.values()), kernel_ms=ms)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="small")
    p.add_argument("--seqlen", type=int, default=8192)
    p.add_argument("--attentions", nargs="+", default=["nsa", "full"])
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--out", default=None)
    a = p.parse_args()
    rows = []
    for att in a.attentions:
        r = profile(a.preset, att, a.seqlen, a.steps)
        rows.append(r)
        print(f"{a.preset} {att} T={a.seqlen}: wall {r['wall_ms']:.2f} ms a step, kernels {r['kernel_sum_ms']:.2f} ms")
        for name, v in list(r["kernel_ms"].items())[:20]:
            print(f"{v:9.3f} ms  {name[:100]}")
    meta = result_meta(f"torch.profiler device time by kernel, mean of {a.steps} warm forward + backward steps; "
                       "wall: the same steps synchronized")
    path = a.out or f"benchmarks/results/model_kernels_{a.preset}_{a.seqlen // 1024}k_{gpu_tag(meta['gpu'])}.json"
    with open(path, "w") as f:
        json.dump(dict(meta=meta, results=rows), f, indent=1)


if __name__ == "__main__":
    main()
