"""Where a model's training step goes, kernel by kernel: torch.profiler device time of one
forward + backward of a preset (bf16 autocast, fp32 weights, batch 1, random tokens, as
``nsa bench model-train`` times them) with NSA (Triton kernels) and with full attention (SDPA
cuDNN), summed by kernel name, mean of ``--steps`` warm steps, next to the step's wall clock:
what the model-level gap to full attention is made of.

    python benchmarks/model_kernels.py --preset small --seqlen 8192   # --compile [MODE]: through torch.compile
writes benchmarks/results/model_kernels_{preset}_{T // 1024}k_{gpu}.json (``--out`` to choose).
"""

from __future__ import annotations

import argparse
import json

import torch
import torch.nn.functional as F

from nsa.apps.bench import gpu_tag, result_meta
from nsa.apps.bench_model import _sdpa_context, model_and_tokens
from nsa.apps.runtime import COMPILE_MODES, compile_model, compiled_step_begin
from profile_kernels import device_ms, wall_ms


def profile(preset: str, attention: str, T: int, steps: int, compile: str | None = None) -> dict:
    model, tokens = model_and_tokens(preset, attention, T, 1, "cuda")
    x, y = tokens[:, :-1], tokens[:, 1:]
    sdpa = "cudnn" if attention == "full" else None
    fwd = compile_model(model, compile) if compile else model

    def step():
        compiled_step_begin(compile)
        with _sdpa_context(sdpa), torch.autocast("cuda", dtype=torch.bfloat16):
            logits = fwd(x)
        loss = F.cross_entropy(logits.float().flatten(0, 1), y.flatten())
        with _sdpa_context(sdpa):
            loss.backward()
        for p in model.parameters():
            p.grad = None

    wall = wall_ms(step, steps, warmup=3)  # the warm-up compiles and autotunes
    ms = device_ms(step, steps)
    return dict(preset=preset, attention=attention, T=T, compiled=bool(compile), compile_mode=compile, wall_ms=wall,
                kernel_sum_ms=sum(ms.values()), kernel_ms=ms)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="small")
    p.add_argument("--seqlen", type=int, default=8192)
    p.add_argument("--attentions", nargs="+", default=["nsa", "full"])
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--compile", nargs="?", const="default", default=None, choices=COMPILE_MODES, metavar="MODE",
                   help="the model through torch.compile (inductor) in this mode (default: default)")
    p.add_argument("--out", default=None)
    a = p.parse_args()
    rows = []
    for att in a.attentions:
        r = profile(a.preset, att, a.seqlen, a.steps, a.compile)
        rows.append(r)
        print(f"{a.preset} {att} T={a.seqlen}: wall {r['wall_ms']:.2f} ms a step, kernels {r['kernel_sum_ms']:.2f} ms")
        for name, v in list(r["kernel_ms"].items())[:20]:
            print(f"{v:9.3f} ms  {name[:100]}")
    meta = result_meta(f"torch.profiler device time by kernel, mean of {a.steps} warm forward + backward steps; "
                       "wall: the same steps synchronized")
    tag = "" if not a.compile else "_compiled" if a.compile == "default" else f"_compiled_{a.compile}"
    path = a.out or f"benchmarks/results/model_kernels_{a.preset}_{a.seqlen // 1024}k{tag}_{gpu_tag(meta['gpu'])}.json"
    with open(path, "w") as f:
        json.dump(dict(meta=meta, results=rows), f, indent=1)
    plot(path)


def plot(path: str, top: int = 6) -> str:
    """Stacked bars next to the JSON (.png): per attention kind the device time of its
    ``top`` largest kernels, the rest, and the wall clock's excess over the kernels' sum
    (where the GPU waits on the host)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with open(path) as f:
        rows = json.load(f)["results"]
    fig, ax = plt.subplots(figsize=(7, 4))
    for i, r in enumerate(rows):
        parts = list(r["kernel_ms"].items())[:top]
        parts.append(("other kernels", r["kernel_sum_ms"] - sum(v for _, v in parts)))
        parts.append(("wall - kernels (host)", max(0.0, r["wall_ms"] - r["kernel_sum_ms"])))
        bottom = 0.0
        for name, v in parts:
            ax.bar(i, v, bottom=bottom, color="lightgrey" if name.startswith("wall") else None, edgecolor="k",
                   linewidth=0.3)
            if v > 0.04 * r["wall_ms"]:
                ax.text(i, bottom + v / 2, f"{name[:28]} {v:.1f}", ha="center", va="center", fontsize=6)
            bottom += v
    ax.set_xticks(range(len(rows)), [f"{r['attention']} (wall {r['wall_ms']:.1f} ms)" for r in rows])
    ax.set_ylabel("ms per forward + backward")
    ax.set_title(f"{rows[0]['preset']} at T={rows[0]['T']}: device time by kernel", fontsize=9)
    fig.tight_layout()
    png = path.rsplit(".json", 1)[0] + ".png"
    fig.savefig(png, dpi=120)
    plt.close(fig)
    return png


if __name__ == "__main__":
    main()
