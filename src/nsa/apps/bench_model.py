"""``nsa bench model-train``: training tokens/s of whole model presets, NSA against full attention.

For each preset (default ``small`` and ``base``), context T (default 8k, 16k, 32k) and attention
kind (default ``nsa`` and ``full``) it builds :class:`nsa.model.NSAModel` as ``nsa train --dtype
bfloat16`` trains it - fp32 weights, the forward under bf16 autocast, AdamW, gradient clipping -
and times whole optimizer steps on ``--batch`` random sequences of T tokens (default 1):
forward + backward (``fwd_bwd_ms``), the clipping and optimizer step (``opt_ms``) and their sum
(``step_ms``), medians over ``--timed-steps`` steps after two warm-up steps (compilation and
autotuning). NSA runs the Triton kernels (``backend="triton"``); full attention runs PyTorch SDPA
with the cuDNN backend, or flash attention where cuDNN refuses the shapes (the row's ``sdpa``
says which). ``window`` (SDPA under a sliding-window mask, PyTorch's choice of backend) can be
added with ``--attentions``. Peak memory is ``torch.cuda.max_memory_allocated`` over the timed
steps (weights, gradients and optimizer state included). A cell that runs out of memory is
recorded (``"error": "out of memory"``) and the sweep goes on.

Writes JSON (+ PNG) with the device, versions, date and commit, after every cell.
"""

from __future__ import annotations

import gc
import json
import os
import statistics
import subprocess
import time
import traceback

from .runtime import COMPILE_MODES, compile_model, compiled_step_begin

MODEL_TRAIN_T = [8192, 16384, 32768]
PRESETS_TIMED = ["small", "base"]
KINDS = ("nsa", "full", "window")


def add_model_train_arguments(parser) -> None:
    """The options of ``nsa bench model-train`` (next to bench's shared --seqlens, --batch, --out)."""
    from .runtime import positive_int

    parser.add_argument("--presets", nargs="+", default=PRESETS_TIMED,
                        help="model-train: model presets (default small base)")
    parser.add_argument("--attentions", nargs="+", default=["nsa", "full"], choices=KINDS,
                        help="model-train, generate: attention kinds (default nsa full; generate: window-only "
                             "is the floor of NSA's step, which runs a window branch too)")
    parser.add_argument("--timed-steps", type=positive_int, default=5,
                        help="model-train: optimizer steps timed per cell, after 2 warm-up steps (default 5)")
    parser.add_argument("--compile", nargs="?", const="default", default=None, choices=COMPILE_MODES, metavar="MODE",
                        help="model-train: torch.compile each model (inductor; both attention kinds), as "
                             "`nsa train --compile [MODE]`; the warm-up steps compile")


def git_commit() -> str | None:
    """The repository's commit (short hash, "+dirty" when the tree has changes), None outside git."""
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        head = subprocess.run(["git", "-C", here, "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "-C", here, "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return (head + ("+dirty" if dirty else "")) or None


def _sdpa_context(name):
    import contextlib

    if name is None:
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel({"cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION}[name])


def time_train_steps(model, tokens, steps: int, warmup: int = 2, sdpa: str | None = None,
                     autocast_dtype=None, compile: str | None = None) -> dict:
    """Time optimizer steps of ``model`` on ``tokens`` [B, T + 1] (inputs and shifted targets), as
    ``nsa train`` runs them (AdamW betas (0.9, 0.95), clipping at 1, fp32 cross-entropy).

    Returns {"fwd_bwd_ms", "opt_ms", "step_ms": medians over ``steps`` timed steps, "tokens_per_s":
    B * T / step time, "peak_gb": peak CUDA memory of the timed steps (0 on a CPU), "losses":
    the loss of every step, warm-up included}. ``sdpa`` ("cudnn", "flash" or None) pins PyTorch's
    attention backend; ``autocast_dtype`` (e.g. torch.bfloat16) runs the forward under autocast;
    ``compile``: the forward (and so the backward) through ``torch.compile(model)`` in this
    mode (:data:`nsa.apps.runtime.COMPILE_MODES`; None: eager).
    """
    import contextlib

    import torch
    import torch.nn.functional as F

    dev = tokens.device
    cuda = dev.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95))
    x, y = tokens[:, :-1], tokens[:, 1:]
    model.train()
    fwd = compile_model(model, compile) if compile else model
    fb, op, losses = [], [], []
    for i in range(warmup + steps):
        if i == warmup and cuda:
            torch.cuda.reset_peak_memory_stats()
        sync()
        t0 = time.perf_counter()
        compiled_step_begin(compile)
        with _sdpa_context(sdpa), (torch.autocast(dev.type, dtype=autocast_dtype) if autocast_dtype
                                   else contextlib.nullcontext()):
            logits = fwd(x)
        loss = F.cross_entropy(logits.float().flatten(0, 1), y.flatten())
        opt.zero_grad(set_to_none=True)
        with _sdpa_context(sdpa):
            loss.backward()
        sync()
        t1 = time.perf_counter()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sync()
        t2 = time.perf_counter()
        losses.append(float(loss.detach()))
        if i >= warmup:
            fb.append((t1 - t0) * 1e3)
            op.append((t2 - t1) * 1e3)
    step = statistics.median(a + b for a, b in zip(fb, op))
    return {"fwd_bwd_ms": statistics.median(fb), "opt_ms": statistics.median(op), "step_ms": step,
            "tokens_per_s": tokens.shape[0] * x.shape[1] * 1e3 / step,
            "peak_gb": torch.cuda.max_memory_allocated() / 2**30 if cuda else 0.0, "losses": losses}


def model_and_tokens(preset: str, attention: str, T: int, batch: int, dev):
    """(model, tokens [batch, T + 1]) of one `model-train` cell: the preset with ``attention``
    (NSA on the Triton kernels), weights seeded 0, random tokens seeded by T."""
    import torch

    from ..model import PRESETS, ModelConfig, NSAModel

    over = {"backend": "triton"} if attention == "nsa" else {}
    cfg = ModelConfig.preset(preset, attention=attention, max_seq_len=max(T, PRESETS[preset].max_seq_len), **over)
    torch.manual_seed(0)
    model = NSAModel(cfg).to(dev)
    g = torch.Generator(device=dev).manual_seed(T)
    return model, torch.randint(0, cfg.vocab_size, (batch, T + 1), device=dev, generator=g)


def _cell(preset: str, attention: str, T: int, batch: int, steps: int, dev, compile: str | None = None) -> dict:
    import torch

    model, tokens = model_and_tokens(preset, attention, T, batch, dev)
    res = {"params": model.num_params(), "compiled": bool(compile), "compile_mode": compile}
    kw = dict(autocast_dtype=torch.bfloat16, compile=compile)
    if compile:
        torch._dynamo.reset()  # each cell compiles afresh (one function's recompile limit)
    if attention != "full":
        res.update(time_train_steps(model, tokens, steps, **kw))
        return res
    try:  # cuDNN where it takes these shapes, else flash
        res.update(time_train_steps(model, tokens, steps, sdpa="cudnn", **kw), sdpa="cudnn")
    except RuntimeError as e:
        if isinstance(e, torch.cuda.OutOfMemoryError):
            raise
        res["cudnn_error"] = " ".join(str(e).split())[:300]
        res.update(time_train_steps(model, tokens, steps, sdpa="flash", **kw), sdpa="flash")
    return res


def finish(rows: list[dict]) -> None:
    """NSA's speedup over full attention (step time) in each NSA row that has both."""
    full = {(r["preset"], r["T"], r["batch"]): r for r in rows if r["attention"] == "full" and "step_ms" in r}
    for r in rows:
        f = full.get((r["preset"], r["T"], r["batch"]))
        if r["attention"] == "nsa" and "step_ms" in r and f:
            r["speedup_vs_full"] = f["step_ms"] / r["step_ms"]


def model_train_sweep(args, meta: dict, out_path: str, dev) -> int:
    import torch

    meta = dict(meta, commit=git_commit(),
                timing=f"wall clock of whole optimizer steps (synchronized), median of {args.timed_steps} "
                       f"after 2 warm-up steps; fp32 weights, bf16 autocast, AdamW; batch {args.batch}, "
                       f"{f'torch.compile (inductor, mode {args.compile}), ' if args.compile else 'eager, '}"
                       f"random tokens; NSA backend triton, full attention SDPA cuDNN (else flash)")
    rows = []
    for preset in args.presets:
        for T in args.seqlens:
            for attention in args.attentions:
                res = dict(preset=preset, attention=attention, T=T, batch=args.batch)
                try:
                    res.update(_cell(preset, attention, T, args.batch, args.timed_steps, dev, args.compile))
                except torch.cuda.OutOfMemoryError:
                    res["error"] = "out of memory"
                except Exception as e:  # keep going: report what failed
                    traceback.print_exc(limit=3)
                    res["error"] = " ".join(repr(e).split())[:300]
                gc.collect()
                torch.cuda.empty_cache()
                rows.append(res)
                finish(rows)
                print(" ".join(f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}" for k, v in res.items()
                               if k != "losses"), flush=True)
                _save(dict(meta=meta, results=rows), out_path)
    out = dict(meta=meta, results=rows)
    _save(out, out_path)
    try:
        plot(out, out_path + ".png")
    except Exception:
        traceback.print_exc()
    print(markdown_table(out))
    return 0


def _save(out, path) -> None:
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path + ".json", "w") as f:
        json.dump(out, f, indent=1)


def markdown_table(out) -> str:
    """One row per (preset, T): ms per optimizer step and tokens/s of NSA and full attention,
    NSA's speedup, peak memory."""
    lines = ["| preset | T | batch | NSA ms/step (fwd+bwd / opt) | full ms/step (fwd+bwd / opt) | "
             "tokens/s NSA / full | NSA vs full | peak GiB NSA / full |", "|---|---|---|---|---|---|---|---|"]
    by = {(r["preset"], r["T"], r["batch"], r["attention"]): r for r in out["results"]}
    keys = list(dict.fromkeys((r["preset"], r["T"], r["batch"]) for r in out["results"]))

    def ms(r):
        if r is None:
            return "-"
        if "step_ms" not in r:
            return "OOM" if r.get("error") == "out of memory" else "error"
        return f"{r['step_ms']:.1f} ({r['fwd_bwd_ms']:.1f} / {r['opt_ms']:.1f})"

    g = lambda r, k, fmt: fmt.format(r[k]) if r and k in r else "-"  # noqa: E731
    for p, T, b in keys:
        n, f = by.get((p, T, b, "nsa")), by.get((p, T, b, "full"))
        lines.append(f"| {p} | {T // 1024}k | {b} | {ms(n)} | {ms(f)} | {g(n, 'tokens_per_s', '{:,.0f}')} / "
                     f"{g(f, 'tokens_per_s', '{:,.0f}')} | {g(n, 'speedup_vs_full', '{:.2f}x')} | "
                     f"{g(n, 'peak_gb', '{:.1f}')} / {g(f, 'peak_gb', '{:.1f}')} |")
    return "\n".join(lines)


def plot(out, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    presets = list(dict.fromkeys(r["preset"] for r in out["results"]))
    fig, axes = plt.subplots(1, len(presets), figsize=(5 * len(presets), 4), squeeze=False)
    for ax, p in zip(axes[0], presets):
        for kind in KINDS:
            pts = sorted((r["T"], r["tokens_per_s"]) for r in out["results"]
                         if r["preset"] == p and r["attention"] == kind and "tokens_per_s" in r)
            if pts:
                ax.plot([t for t, _ in pts], [v for _, v in pts], marker="o", label=kind)
        ax.set_xscale("log", base=2)
        ax.set(xlabel="T (tokens per sequence)", ylabel="training tokens/s", title=f"preset {p}")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    m = out["meta"]
    fig.suptitle(f"{m['gpu']}, torch {m['torch']}, triton {m['triton']}, {m['date'][:10]}, commit {m.get('commit')}",
                 fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
