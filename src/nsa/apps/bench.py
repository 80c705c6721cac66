"""``nsa bench prefill`` / ``train`` / ``decode`` / ``generate`` / ``model-train`` / ``compile``: NSA
against full attention, and torch.compile against eager.

``prefill`` times the forward; ``train`` times forward + backward (all of q, k_cmp, v_cmp, k, v,
k_win, v_win and the gates require grad; full attention: q, k, v), and the backward alone as
the difference. For each T (default 8k..128k, batch 1) and configuration it times, in one run on one GPU:

* ``nsa``: :func:`nsa.nsa_func` (backend="triton"): k_cmp/v_cmp are inputs (phi is the
  layer's job), except in the fla configuration where mean pooling is timed too, as fla's
  ``parallel_nsa`` pools inside;
* the four kernels alone (per-kernel breakdown: cmp, select, slc, win + gates); cmp is what the
  forward runs: cuDNN where :func:`nsa.triton.cmp_dense.use` holds (then ``k_cmp_band`` times
  the band kernel beside it);
* PyTorch SDPA full causal attention, flash and cuDNN backends (GQA through enable_gqa, else
  expanded k/v), and FlexAttention (causal block mask, torch.compile);
* fla's ``parallel_nsa`` (package fla-core) in its own configuration (l = l' = d = 64, mean
  compression, shared k/v, n = 16), with window_size=0: its window branch needs the
  flash_attn package (not installed on the benchmark GPU), so fla does less work than ours
  (which includes the w = 512 window) in that comparison.

``decode`` times one decode step (one new query per sequence against a cache of T keys,
``--batch`` sequences): :func:`nsa.nsa_decode` (backend="triton"), the same step through the
prefill kernels (what the layer ran before ``nsa_decode`` existed), and SDPA full attention of
one query over all T keys; with the keys each reads per step (NSA: Tc + n*l' + w per KV head,
full: T) and the bytes of K/V behind them. ``--new-tokens-per-step 1 2 4 8`` adds steps of S
new tokens per sequence (``nsa_s{S}`` in the results). Paged against contiguous:
``benchmarks/decode_paged.py``.

``generate`` times :meth:`nsa.model.NSAModel.generate` of a model preset (random bf16 weights,
``--batch`` prompts of T random tokens), eager and with ``cuda_graph=True``: NSA decoding and the
same preset with full attention (SDPA over the cache; as a graph over the whole preallocated
cache under a mask, as gpt-fast does). Each call's time is
prefill + a one-time cost + N decode steps; two values of N (``--new-tokens`` and half of it)
give the decode step's time and the one-time cost (the graph's first eager step and capture),
and ``generate(..., 1)`` the prefill. Wall-clock medians of 3 calls after one warm-up call.

``first-call`` times the first forward + backward of a fresh process, with an empty and a warm
Triton cache (:mod:`nsa.apps.bench_first_call`).

``model-train`` times whole optimizer steps of model presets at T tokens, NSA against full
attention: training tokens/s (:mod:`nsa.apps.bench_model`).

``compile`` times a model preset (default ``small``, random bf16 weights, backend="triton") eager
and under ``torch.compile(fullgraph=True)``: the training step (``model.loss`` forward, backward
and an AdamW step, the optimizer eager in both; batch 1 of T tokens) and the decode step
(:meth:`nsa.model.NSAModel.decode_step` after a prefill of T tokens, ``--batch`` sequences, the
lengths reset on the device before each step), in ms and tokens/s; with the first call's
seconds (compiling; the kernels are autotuned by the eager calls before it).

Timing: ``triton.testing.do_bench`` median, after warm-up, on random bf16 inputs.
FLOP counts (multiply-add = 2 FLOPs; useful work only, masked tiles not counted):
full causal attention 2*(Dk+Dv)*HQ*T*(T+1)/2; NSA cmp 2*(Dk+Dv)*HQ*sum_t Tc(t) with Tc(t) the
compressed tokens visible at t, plus the selection pass's score recompute 2*Dk*HQ*sum_t Tc(t);
slc 2*(Dk+Dv)*HQ*sum_t min(n*l', t+1); win 2*(Dk+Dv)*HQ*sum_t min(w, t+1).
Peak memory: ``torch.cuda.max_memory_allocated`` during the call, inputs included.
Writes JSON (+ a PNG plot) with the GPU name, versions and date.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import re
import sys
import traceback

from .. import geometry
from ..geometry import visible_cmp_pairs
from .bench_model import MODEL_TRAIN_T, add_model_train_arguments, git_commit, model_train_sweep
from .runtime import out_stem, positive_int

CONFIGS = {
    # name: HQ, H, Dk, Dv, l, d, l', n, w, shared kv, mean pooling timed
    "paper": dict(HQ=64, H=4, Dk=192, Dv=128, l=32, d=16, lp=64, n=16, w=512, shared=False),
    "d128": dict(HQ=64, H=4, Dk=128, Dv=128, l=32, d=16, lp=64, n=16, w=512, shared=False),
    "fla": dict(HQ=64, H=4, Dk=128, Dv=128, l=64, d=64, lp=64, n=16, w=512, shared=True),
    # one attention layer of the model presets (nsa.model.PRESETS): what `model-train` runs
    "small": dict(HQ=8, H=2, Dk=64, Dv=64, l=32, d=16, lp=64, n=16, w=512, shared=False),
    "base": dict(HQ=16, H=4, Dk=64, Dv=64, l=32, d=16, lp=64, n=16, w=512, shared=False),
}
KERNEL_CONFIGS = ["paper", "d128", "fla"]  # the default of --configs
DEFAULT_T = [8192, 16384, 32768, 65536, 131072]
GENERATE_T = [1024, 4096, 16384]
COMPILE_T = [4096]
MODES = ("prefill", "train", "decode", "generate", "model-train", "compile", "first-call")  # ``nsa bench WHAT``
HELP = {"bench": f"benchmarks on a CUDA GPU, NSA against full attention (compile: torch.compile against eager): "
                 f"nsa bench {{{','.join(MODES)}}}"}


def add_arguments(name, parser: argparse.ArgumentParser) -> None:
    parser.add_argument("what", nargs="?", default="prefill", choices=MODES,
                        help="prefill: forward of the whole sequence; train: forward + backward; "
                             "decode: one new token against a cache of T keys; generate: a model's "
                             "tokens/s after a prompt of T tokens, eager and as a CUDA graph; model-train: "
                             "training tokens/s of model presets (optimizer steps); compile: a model's "
                             "training step and decode step, torch.compile against eager; first-call: seconds "
                             "to the first forward + backward in a fresh process, empty and warm Triton cache")
    parser.add_argument("--batch", type=positive_int, default=1,
                        help="decode, generate, model-train, compile (its decode step): sequences per step (default 1)")
    parser.add_argument("--seqlens", type=positive_int, nargs="+", default=None,
                        help="sequence lengths T (default 8k 16k 32k 64k 128k; generate: 1k 4k 16k; "
                             "model-train: 8k 16k 32k; compile: 4k; first-call: 8k)")
    parser.add_argument("--preset", default="small", help="generate, compile: model preset (default small)")
    parser.add_argument("--new-tokens", type=positive_int, default=256, help="generate: tokens per call (default 256)")
    parser.add_argument("--new-tokens-per-step", type=positive_int, nargs="+", default=[1], metavar="S",
                        help="decode: also time steps of S new tokens per sequence (speculative decoding, "
                             "multi-token prediction; S <= 8), e.g. 1 2 4 8 (default 1)")
    parser.add_argument("--configs", nargs="+", default=KERNEL_CONFIGS, choices=list(CONFIGS),
                        help="configurations (default: paper d128 fla; small and base: one attention layer "
                             "of those model presets)")
    parser.add_argument("--baselines", nargs="+", default=["sdpa_flash", "sdpa_cudnn", "flex", "fla"],
                        choices=["sdpa_flash", "sdpa_cudnn", "flex", "fla", "none"],
                        help="baselines to time (default: sdpa_flash sdpa_cudnn flex fla; 'none' for none)")
    parser.add_argument("--no-breakdown", action="store_true",
                        help="skip the per-kernel timings (prefill) / the backward pieces (train)")
    parser.add_argument("--out", default=None,
                        help="output path without extension (.json and .png are written; "
                             "default benchmarks/results/<what>_<gpu>, e.g. prefill_h200)")
    add_model_train_arguments(parser)
    parser.add_argument("--inputs", default="random", choices=["random", "realistic"],
                        help="prefill, train: random normal q/k (default), or realistic: q and k_cmp whose "
                             "block selection has a trained model's neighbour overlap (docs/benchmarks.md; "
                             "output name gets _realistic)")
    parser.add_argument("--rep", type=positive_int, default=200, help="do_bench repetition time in ms")
    parser.add_argument("--flex-max-t", type=positive_int, default=32768,
                        help="time FlexAttention only up to this T (each T recompiles it)")


# ------------------------------------------------------------------------------ FLOPs
def nsa_flops(T, c) -> dict:
    HQ, Dk, Dv = c["HQ"], c["Dk"], c["Dv"]
    sv = visible_cmp_pairs(T, c["l"], c["d"])
    S = c["n"] * c["lp"]
    slc_keys = sum(min(S, t + 1) for t in range(min(T, S))) + max(0, T - S) * S
    win_keys = sum(min(c["w"], t + 1) for t in range(min(T, c["w"]))) + max(0, T - c["w"]) * c["w"]
    f = dict(cmp=2 * (Dk + Dv) * HQ * sv, select=2 * Dk * HQ * sv,
             slc=2 * (Dk + Dv) * HQ * slc_keys, win=2 * (Dk + Dv) * HQ * win_keys)
    f["total"] = sum(f.values())
    return f


def nsa_bwd_flops(T, c) -> dict:
    """Useful FLOPs of the backward per branch: a flash-style backward does five matmuls per
    (query row, key) pair - the score recompute (Dk), dP = dO V^T (Dv), dV += P^T dO (Dv),
    dQ += dS K (Dk) and dK += dS^T Q (Dk) - so 2 * (3 Dk + 2 Dv) per pair. Recomputing a
    product twice (the dq and dk/dv kernels each redo S and dP) is not counted."""
    fwd = nsa_flops(T, c)
    per_pair = {k: fwd[k] // (2 * (c["Dk"] + c["Dv"])) for k in ("cmp", "slc", "win")}
    f = {k: 2 * (3 * c["Dk"] + 2 * c["Dv"]) * n for k, n in per_pair.items()}
    f["total"] = sum(f.values())
    return f


def full_flops(T, c) -> int:
    return 2 * (c["Dk"] + c["Dv"]) * c["HQ"] * T * (T + 1) // 2


# ------------------------------------------------------------------------------ runners
def _bench(fn, rep):
    import torch
    from triton.testing import do_bench

    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    fn()  # warm-up / compile
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated()
    ms = do_bench(fn, warmup=max(25, rep // 8), rep=rep, return_mode="median")
    return ms, peak / 2**30


def _bench_loop(fn, n: int = 200):
    """(ms per call, peak GiB) of n calls back to back, one sync at the end: what a loop of
    eager calls waits per call, max(host time, GPU time). do_bench's per-call L2 flush runs
    on the GPU while the host enqueues the next call, which hides host time (an H200 decode
    step read 212-451 us that way, whatever T)."""
    import time

    import torch

    for _ in range(20):
        fn()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    torch.cuda.synchronize()
    ms = (time.perf_counter() - t0) * 1e3 / n
    return ms, torch.cuda.max_memory_allocated() / 2**30


def _inputs(T, c, device):
    import torch

    from ..reference import compress_mean

    g = torch.Generator(device=device).manual_seed(T)
    mk = lambda *s: torch.randn(*s, device=device, dtype=torch.bfloat16, generator=g)  # noqa: E731
    q = mk(1, T, c["HQ"], c["Dk"])
    k, v = mk(1, T, c["H"], c["Dk"]), mk(1, T, c["H"], c["Dv"])
    if c["shared"]:
        kw, vw = k, v
    else:
        kw, vw = mk(1, T, c["H"], c["Dk"]), mk(1, T, c["H"], c["Dv"])
    kc, vc = compress_mean(k, c["l"], c["d"]), compress_mean(v, c["l"], c["d"])
    gates = torch.rand(1, T, c["HQ"], 3, device=device, generator=g).to(torch.bfloat16)
    return q, kc, vc, k, v, kw, vw, gates


def bench_inputs(T, c, device, realistic: bool) -> tuple[tuple, dict]:
    """(inputs, info) of one benchmark row: random (:func:`_inputs`) or realistic
    (:func:`nsa.apps.bench_inputs.realistic_inputs`); info records the mode, the synthesis
    parameters and the statistics of the inputs' block selection (Triton select) for both."""
    import time

    from .. import select_blocks
    from .bench_inputs import realistic_inputs, selection_stats

    t0 = time.perf_counter()
    if realistic:
        x, params = realistic_inputs(T, c, device)
    else:
        x, params = _inputs(T, c, device), None
    info = dict(inputs="realistic" if realistic else "random", inputs_s=time.perf_counter() - t0)
    if params is not None:
        info["input_params"] = params
    try:
        idx = select_blocks(x[0], x[1], cmp_block=c["l"], cmp_stride=c["d"], sel_block=c["lp"],
                            sel_count=c["n"], backend="triton")
        info["selection"] = selection_stats(idx, c["lp"])
        del idx
    except Exception as e:  # the statistics are a by-product: never lose the timings
        info["selection_error"] = repr(e)[:300]
    return x, info


def _run_nsa(T, c, x, breakdown, rep):
    from .. import nsa_func
    from ..reference import compress_mean
    from ..triton import band, cmp_dense, select, selected

    q, kc, vc, k, v, kw, vw, gates = x
    geo = dict(cmp_block=c["l"], cmp_stride=c["d"], sel_block=c["lp"], sel_count=c["n"], window=c["w"])
    if c["name"] == "fla":  # fla pools inside parallel_nsa: time the pooling too
        fn = lambda: nsa_func(q, compress_mean(k, c["l"], c["d"]), compress_mean(v, c["l"], c["d"]),  # noqa: E731
                              k, v, kw, vw, gates, backend="triton", **geo)
    else:
        fn = lambda: nsa_func(q, kc, vc, k, v, kw, vw, gates, backend="triton", **geo)  # noqa: E731
    out = {}
    out["nsa"] = _bench(fn, rep)
    if breakdown:
        from ..triton import _common as C

        sc = 1.0 / math.sqrt(c["Dk"])
        seq, lens = C.seq_table(1, T, T, T, kc.shape[1], None, c["l"], c["d"], q.device)
        o_cmp, lse = band.band_attention(q, kc, vc, mode=0, scale=sc, seq=seq, lens=lens, cmp_block=c["l"],
                                         cmp_stride=c["d"], write_lse=True)
        idx = select.select_blocks_triton(q, kc, cmp_block=c["l"], cmp_stride=c["d"], sel_block=c["lp"],
                                          sel_count=c["n"], lse=lse)
        o_slc = selected.selected_attention_triton(q, k, v, idx, sel_block=c["lp"])
        band_cmp = lambda: band.band_attention(q, kc, vc, mode=0, scale=sc, seq=seq, lens=lens,  # noqa: E731
                                               cmp_block=c["l"], cmp_stride=c["d"], write_lse=True)
        if cmp_dense.use(q, vc, cu_seqlens=None, q_offset=0):  # what the forward runs, the band kernel beside
            out["k_cmp"] = _bench(lambda: cmp_dense.cmp_dense(q, kc, vc, cmp_block=c["l"], cmp_stride=c["d"],
                                                              scale=sc), rep)
            out["k_cmp_band"] = _bench(band_cmp, rep)
        else:
            out["k_cmp"] = _bench(band_cmp, rep)
        out["k_select"] = _bench(lambda: select.select_blocks_triton(
            q, kc, cmp_block=c["l"], cmp_stride=c["d"], sel_block=c["lp"], sel_count=c["n"], lse=lse), rep)
        out["k_slc"] = _bench(lambda: selected.selected_attention_triton(q, k, v, idx, sel_block=c["lp"]), rep)
        out["k_win"] = _bench(lambda: band.band_attention(q, kw, vw, mode=1, scale=sc, seq=seq, lens=lens,
                                                          window=c["w"], gates=gates, o_cmp=o_cmp,
                                                          o_slc=o_slc), rep)
    return out


def _sdpa_backend(name):
    from torch.nn.attention import SDPBackend

    return {"sdpa_flash": SDPBackend.FLASH_ATTENTION, "sdpa_cudnn": SDPBackend.CUDNN_ATTENTION}[name]


def _fwd_bwd(fn, leaves, rep):
    """(forward ms, forward + backward ms, peak GiB of the latter) of ``fn(*leaves)``."""
    import torch

    fwd, _ = _bench(lambda: fn(*leaves), rep)
    do = torch.randn_like(fn(*leaves))

    def step():
        for x in leaves:
            x.grad = None
        fn(*leaves).backward(do)

    both, peak = _bench(step, rep)
    return fwd, both, peak


def backward_state(c, x) -> tuple:
    """What :func:`nsa.triton.backward.nsa_backward` starts from, for timing its pieces alone:
    (o_cmp, lse_cmp, idx, o_slc, lse_slc, o_win, lse_win, do, sc, seq, lens, win) from the
    forward kernels on the inputs ``x`` of :func:`_inputs`, a random output gradient do (of the
    gated output: each branch's backward takes it with the gates) and ``win`` the window
    launches' keywords."""
    import torch

    from ..triton import backward as BW
    from ..triton.nsa import _nsa_forward

    q, kc, vc, k, v, kw, vw, gates = x  # [B, T, heads, D] (no grad)
    geo = dict(cmp_block=c["l"], cmp_stride=c["d"], sel_block=c["lp"], sel_count=c["n"], window=c["w"],
               scale=None, cu_seqlens=None, q_offset=0, win_k_offset=0)
    o, (o_cmp, lse_cmp, idx, o_slc, lse_slc, o_win, lse_win) = _nsa_forward(q, kc, vc, k, v, kw, vw, gates,
                                                                             aux=True, save_win=True, **geo)
    do = torch.randn_like(o)
    sc = 1.0 / math.sqrt(c["Dk"])
    seq, lens = BW._seq(q, k, kw, kc, None, c["l"], c["d"])
    win = dict(mode=1, scale=sc, seq=seq, lens=lens, window=c["w"])
    return o_cmp, lse_cmp, idx, o_slc, lse_slc, o_win, lse_win, do, sc, seq, lens, win


def _bwd_breakdown(c, x, rep) -> dict:
    """The pieces of :func:`nsa.triton.backward.nsa_backward`, each timed alone on the saved
    forward state (which keeps o_win and its lse, as a training forward does), each branch from
    the gated output's do as the backward runs it (Eq. 5 in its dq kernel): cmp dq + dk/dv (and
    with dk/dv unsplit over query chunks, not part of the backward), slc dq + dk/dv (transposed
    index included), the transposed index alone, win dq + dk/dv. Where the backward runs cmp
    through cuDNN (:func:`nsa.triton.cmp_dense.use`), bwd_cmp times that (Eq. 5's kernel
    included) and bwd_cmp_band the band kernel."""
    import torch

    from ..triton import backward as BW
    from ..triton import cmp_dense

    q, kc, vc, k, v, kw, vw, gates = x
    o_cmp, lse_cmp, idx, o_slc, lse_slc, o_win, lse_win, do, sc, seq, lens, win = backward_state(c, x)
    dq = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
    g = dict(gates=gates, d_gates=torch.zeros(gates.shape, dtype=torch.float32, device=q.device))
    band_cmp = lambda: BW.band_backward(q, kc, vc, o_cmp, lse_cmp, do, mode=0, scale=sc, seq=seq,  # noqa: E731
                                        lens=lens, cmp_block=c["l"], cmp_stride=c["d"], dq_acc=dq, gate=0, **g)
    dense = cmp_dense.use(q, vc, cu_seqlens=None, q_offset=0)
    kv = BW._slc_configs(c["HQ"] // c["H"], c["Dk"], c["Dv"], False)[1]  # the slc dk/dv's chunk and span
    dense_cmp = lambda: cmp_dense.gated_backward(do, q, kc, vc, o_cmp, lse_cmp, gates, g["d_gates"],  # noqa: E731
                                                 cmp_block=c["l"], cmp_stride=c["d"], scale=sc, dq=dq)
    pieces = {
        "bwd_cmp": dense_cmp if dense else band_cmp,
        **({"bwd_cmp_band": band_cmp} if dense else {}),
        # the same without splitting dk/dv over query chunks (what the split buys)
        "bwd_cmp_unsplit": lambda: BW.band_backward(q, kc, vc, o_cmp, lse_cmp, do, mode=0, scale=sc,
                                                    seq=seq, lens=lens, cmp_block=c["l"], cmp_stride=c["d"],
                                                    dq_acc=dq, q_chunk=0, gate=0, **g),
        "bwd_slc": lambda: BW.selected_backward(q, k, v, idx, o_slc, do, sel_block=c["lp"], scale=sc,
                                                seq=seq, lens=lens, dq_acc=dq, lse=lse_slc, **g),
        # the work items of its dk/dv kernel: counted (what it runs), and sorted (deterministic=True)
        "bwd_slc_index": lambda: BW.transposed_index_triton(idx, seq, lens, c["H"], c["lp"], kv["chunk"], 0,
                                                            BW._slc_span(kv["span"], lens)),
        "bwd_slc_index_sorted": lambda: BW.transposed_index(idx, seq, lens, c["H"], c["lp"], kv["chunk"]),
        "bwd_win": lambda: BW.band_backward(q, kw, vw, o_win, lse_win, do, dq_acc=dq, gate=2, **g, **win),
    }
    out = {}
    for name, fn in pieces.items():
        try:
            out[name] = _bench(fn, rep)
        except Exception as e:
            traceback.print_exc(limit=3)
            out[f"{name}_error"] = repr(e)[:300]
    return out


def _run_train(T, c, x, baselines, rep, breakdown=False) -> dict:
    """Forward and forward + backward of NSA (Triton) and of full attention (SDPA)."""
    import torch.nn.functional as F
    from torch.nn.attention import sdpa_kernel

    from .. import nsa_func

    q, kc, vc, k, v, kw, vw, gates = (t.detach().clone().requires_grad_() for t in x)
    geo = dict(cmp_block=c["l"], cmp_stride=c["d"], sel_block=c["lp"], sel_count=c["n"], window=c["w"])
    res = {}
    if c["shared"]:
        nsa = lambda q, kc, vc, k, v, g: nsa_func(q, kc, vc, k, v, k, v, g, backend="triton", **geo)  # noqa: E731
        leaves = [q, kc, vc, k, v, gates]
    else:
        nsa = lambda *a: nsa_func(*a, backend="triton", **geo)  # noqa: E731
        leaves = [q, kc, vc, k, v, kw, vw, gates]
    try:
        res["nsa"] = _fwd_bwd(nsa, leaves, rep)
    except Exception as e:
        traceback.print_exc()
        res["nsa_error"] = repr(e)[:300]
    if breakdown:
        res.update(_bwd_breakdown(c, x, rep))
    for b in baselines:
        if not b.startswith("sdpa"):
            continue
        be = _sdpa_backend(b)

        def full(q, k, v):
            with sdpa_kernel(be):
                return F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                                      is_causal=True, enable_gqa=True)
        try:
            res[b] = _fwd_bwd(full, [q, k, v], rep)
        except Exception as e:
            traceback.print_exc(limit=3)
            res[f"{b}_error"] = repr(e)[:300]
    return res


def _run_sdpa(x, c, backend, rep):
    import torch.nn.functional as F
    from torch.nn.attention import sdpa_kernel

    q, _, _, k, v, _, _, _ = x
    qt, kt, vt = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # [B, heads, T, D]
    be = _sdpa_backend(backend)
    try:
        with sdpa_kernel(be):
            fn = lambda: F.scaled_dot_product_attention(qt, kt, vt, is_causal=True, enable_gqa=True)  # noqa: E731
            return _bench(fn, rep), "gqa"
    except Exception:  # backend without GQA (or this head-dim pair): expanded k/v
        h = c["HQ"] // c["H"]
        ke, ve = kt.repeat_interleave(h, 1), vt.repeat_interleave(h, 1)
        with sdpa_kernel(be):
            fn = lambda: F.scaled_dot_product_attention(qt, ke, ve, is_causal=True)  # noqa: E731
            return _bench(fn, rep), "expanded kv"


_FLEX = {}


def _run_flex(x, c, rep):
    import torch
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    q, _, _, k, v, _, _, _ = x
    T = q.shape[1]
    if "fn" not in _FLEX:
        _FLEX["fn"] = torch.compile(flex_attention, dynamic=False)
    bm = create_block_mask(lambda b, h, qi, ki: qi >= ki, None, None, T, T, device=q.device)
    qt, kt, vt = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    fn = lambda: _FLEX["fn"](qt, kt, vt, block_mask=bm, enable_gqa=True)  # noqa: E731
    return _bench(fn, rep)


def _run_fla(x, c, rep):
    import torch
    from fla.ops.nsa import parallel_nsa

    q, _, _, k, v, _, _, gates = x
    g = gates.float().sigmoid().to(q.dtype)
    gc, gs, gw = g[..., 0].contiguous(), g[..., 1].contiguous(), g[..., 2].contiguous()
    # window_size=0: fla's window branch calls the flash_attn package, absent on the H100 here,
    # so fla is timed on cmp + select + slc only while ours includes the w = 512 window
    fn = lambda: parallel_nsa(q, k, v, gc, gs, gw, block_counts=c["n"], block_size=c["lp"],  # noqa: E731
                              window_size=0)
    with torch.no_grad():
        return _bench(fn, rep)


def decode_reads(T, c) -> dict:
    """Keys read per KV head by one decode step at context T (the paper's Table 4 count)."""
    nsa = sum(geometry.decode_reads(T, cmp_block=c["l"], cmp_stride=c["d"], sel_block=c["lp"],
                                    sel_count=c["n"], window=c["w"]))
    return dict(keys_nsa=nsa, keys_full=T, bytes_nsa=nsa * (c["Dk"] + c["Dv"]) * 2 * c["H"],
                bytes_full=T * (c["Dk"] + c["Dv"]) * 2 * c["H"])


def _run_decode(T, c, B, baselines, rep, device, new_tokens_per_step=(1,)) -> dict:
    """One decode step at context T: nsa_decode, the prefill kernels on one query, SDPA; and
    nsa_decode with S new tokens per sequence for each S > 1 of ``new_tokens_per_step``
    (keys ``nsa_s{S}``, ``nsa_s{S}_graph``; the ring then holds w + S - 1 rows)."""
    import torch
    import torch.nn.functional as F
    from torch.nn.attention import sdpa_kernel

    from ..ops import nsa_decode
    from ..reference import compress_mean
    from ..triton import nsa_triton

    g = torch.Generator(device=device).manual_seed(T)
    mk = lambda *s: torch.randn(*s, device=device, dtype=torch.bfloat16, generator=g)  # noqa: E731
    H, HQ, Dk, Dv, w = c["H"], c["HQ"], c["Dk"], c["Dv"], c["w"]
    q = mk(B, 1, HQ, Dk)
    k, v = mk(B, T, H, Dk), mk(B, T, H, Dv)
    kw, vw = (k, v) if c["shared"] else (mk(B, w, H, Dk), mk(B, w, H, Dv))  # a ring of w rows
    kc, vc = compress_mean(k, c["l"], c["d"]), compress_mean(v, c["l"], c["d"])
    gates = torch.rand(B, 1, HQ, 3, device=device, generator=g).to(torch.bfloat16)
    geo = dict(cmp_block=c["l"], cmp_stride=c["d"], sel_block=c["lp"], sel_count=c["n"], window=w)
    res = {}
    with torch.no_grad():
        # the lengths as a device tensor with a bound, as a serving loop holds them (no host sync)
        lens = torch.full((B,), T, dtype=torch.int32, device=device)
        step = lambda: nsa_decode(q, kc, vc, k, v, kw, vw, gates, cache_seqlens=lens, max_seqlen=T,  # noqa: E731
                                  backend="triton", **geo)
        res["nsa"] = _bench_loop(step)  # eager: host time shows
        try:
            res["nsa_graph"] = _bench(_graphed(step), rep)  # GPU time alone: no launch overhead
        except Exception as e:
            traceback.print_exc(limit=3)
            res["nsa_graph_error"] = repr(e)[:300]
        for S in sorted(set(new_tokens_per_step) - {1}):
            qs, gs = mk(B, S, HQ, Dk), torch.rand(B, S, HQ, 3, device=device, generator=g).to(torch.bfloat16)
            kws, vws = (k, v) if c["shared"] else (mk(B, w + S - 1, H, Dk), mk(B, w + S - 1, H, Dv))
            multi = lambda: nsa_decode(qs, kc, vc, k, v, kws, vws, gs, cache_seqlens=lens,  # noqa: E731
                                       max_seqlen=T, backend="triton", **geo)
            try:
                res[f"nsa_s{S}"] = _bench_loop(multi)
                res[f"nsa_s{S}_graph"] = _bench(_graphed(multi), rep)
            except Exception as e:
                traceback.print_exc(limit=3)
                res[f"nsa_s{S}_error"] = repr(e)[:300]
        # the prefill kernels on one query need the window keys in position order
        lo = max(0, T - w)
        rows = torch.arange(lo, T, device=device) % kw.shape[1]
        kl, vl = kw[:, rows].contiguous(), vw[:, rows].contiguous()
        old = lambda: nsa_triton(q, kc, vc, k, v, kl, vl, gates, q_offset=T - 1, win_k_offset=lo, **geo)  # noqa: E731
        res["nsa_prefill_kernels"] = _bench_loop(old)
        qt, kt, vt = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        for b in baselines:
            if not b.startswith("sdpa"):
                continue
            try:
                with sdpa_kernel(_sdpa_backend(b)):
                    full = lambda: F.scaled_dot_product_attention(qt, kt, vt, enable_gqa=True)  # noqa: E731
                    res[b] = _bench_loop(full)
                    res[f"{b}_graph"] = _bench(_graphed(full), rep)
            except Exception as e:
                res[f"{b}_error"] = repr(e)[:300]
    return res


def _graphed(fn):
    """``fn`` captured in a CUDA graph (after one eager call: compiled and autotuned); returns
    its replay."""
    import torch

    fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph.replay


def result_meta(timing: str) -> dict:
    """The provenance of a GPU result file: GPU, torch, triton, Python, UTC date, git commit and
    how it was timed."""
    import torch
    import triton

    return dict(gpu=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__,
                python=platform.python_version(),
                date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                commit=git_commit(), timing=timing)


def gpu_tag(name: str) -> str:
    """Short GPU name for result files: "NVIDIA H200" -> "h200"."""
    m = re.search(r"\b([A-Z]{1,2}\d{2,4}[A-Z]?)\b", name)
    return (m.group(1) if m else re.sub(r"\W+", "_", name).strip("_")).lower()


def run(name, args) -> int:
    import torch

    if max(args.new_tokens_per_step) > 8:
        print(f"nsa: error: --new-tokens-per-step takes S <= 8 (nsa_decode's limit), got "
              f"{max(args.new_tokens_per_step)}", file=sys.stderr)
        return 2
    if not torch.cuda.is_available():
        print(f"nsa: error: nsa bench {args.what} needs a CUDA GPU", file=sys.stderr)
        return 2
    dev = torch.device("cuda")
    props = torch.cuda.get_device_properties(dev)
    meta = result_meta("triton.testing.do_bench median, bf16, batch 1, random inputs")
    try:
        import fla

        meta["fla"] = getattr(fla, "__version__", "?")
    except ImportError:
        meta["fla"] = None
    rows = []
    baselines = [] if args.baselines == ["none"] else args.baselines
    realistic = getattr(args, "inputs", "random") == "realistic" and args.what in ("prefill", "train")
    stem = args.what.replace('-', '_') + ("_realistic" if realistic else "")
    out_path = out_stem(args.out or f"benchmarks/results/{stem}_{gpu_tag(props.name)}", (".json", ".png"))
    meta["timing"] += {"train": ", forward + backward", "prefill": ", forward"}.get(
        args.what, f", one decode step, batch {args.batch}; eager rows: 200 calls back to back, one sync "
                   f"(max of host and GPU time); graph rows: do_bench of the replay")
    if args.what == "generate":
        args.seqlens = args.seqlens or GENERATE_T
        meta["timing"] = (f"wall clock, median of 3 generate calls, bf16 weights, batch {args.batch}, "
                          f"preset {args.preset}, random weights and prompts")
        return _generate_sweep(args, meta, out_path, dev)
    if args.what == "first-call":  # fresh processes, empty then warm Triton cache
        from .bench_first_call import first_call_sweep

        return first_call_sweep(args, meta, out_path, CONFIGS)
    if args.what == "model-train":
        args.seqlens = args.seqlens or MODEL_TRAIN_T
        return model_train_sweep(args, meta, out_path, dev)
    if args.what == "compile":
        args.seqlens = args.seqlens or COMPILE_T
        meta["timing"] = (f"triton.testing.do_bench median, bf16 weights, preset {args.preset}, backend triton, "
                          f"train: batch 1, decode: batch {args.batch}, random weights and tokens")
        return _compile_sweep(args, meta, out_path, dev)
    args.seqlens = args.seqlens or DEFAULT_T
    if args.what == "decode":
        meta["timing"] = meta["timing"].replace("batch 1, ", "")
        return _decode_sweep(args, meta, baselines, out_path, dev)
    meta["inputs"] = "realistic" if realistic else "random"
    if realistic:
        meta["timing"] = meta["timing"].replace("random inputs", "realistic inputs (nsa.apps.bench_inputs)")
    for cname in args.configs:
        c = dict(CONFIGS[cname], name=cname)
        for T in args.seqlens:
            torch.cuda.empty_cache()
            x, info = bench_inputs(T, c, dev, realistic)
            fl = nsa_flops(T, c)
            res = dict(config=cname, T=T, **{k: c[k] for k in ("HQ", "H", "Dk", "Dv", "l", "d", "lp", "n", "w")},
                       flops_nsa=fl["total"], flops_full=full_flops(T, c), **info)
            if args.what == "train":
                for key, val in _run_train(T, c, x, baselines, args.rep, not args.no_breakdown).items():
                    if key.endswith("_error"):
                        res[key] = val
                    elif key.startswith("bwd_"):
                        res[f"{key}_ms"] = val[0]
                    else:
                        fwd, both, mem = val
                        res[f"{key}_fwd_ms"], res[f"{key}_ms"], res[f"{key}_peak_gb"] = fwd, both, mem
                        res[f"{key}_bwd_ms"] = both - fwd
                _finish_train(res, baselines, T, c)
                rows.append(res)
                print(_row_line(res), flush=True)
                _save(dict(meta=meta, configs=CONFIGS, results=rows), out_path)
                del x
                continue
            try:
                for key, (ms, mem) in _run_nsa(T, c, x, not args.no_breakdown, args.rep).items():
                    res[f"{key}_ms"], res[f"{key}_peak_gb"] = ms, mem
            except Exception as e:  # keep going: report what failed
                traceback.print_exc()
                res["nsa_error"] = repr(e)[:300]
            for b in baselines:
                if (b == "fla" and cname != "fla") or (b == "flex" and T > args.flex_max_t):
                    continue
                try:
                    if b.startswith("sdpa"):
                        (ms, mem), how = _run_sdpa(x, c, b, args.rep)
                        res[f"{b}_how"] = how
                    elif b == "flex":
                        ms, mem = _run_flex(x, c, args.rep)
                    elif b == "fla":
                        ms, mem = _run_fla(x, c, args.rep)
                    else:
                        raise ValueError(f"unknown baseline {b}")
                    res[f"{b}_ms"], res[f"{b}_peak_gb"] = ms, mem
                except Exception as e:
                    traceback.print_exc(limit=3)
                    res[f"{b}_error"] = repr(e)[:300]
            del x
            _finish_prefill(res, baselines, T, c)
            rows.append(res)
            print(_row_line(res), flush=True)
            _save(dict(meta=meta, configs=CONFIGS, results=rows), out_path)  # partial results survive
    return _write_results(dict(meta=meta, configs=CONFIGS, results=rows), out_path, plot, markdown_table)


def _decode_sweep(args, meta, baselines, out_path, dev) -> int:
    import torch

    rows = []
    for cname in args.configs:
        c = dict(CONFIGS[cname], name=cname)
        for T in args.seqlens:
            torch.cuda.empty_cache()
            res = dict(config=cname, T=T, batch=args.batch, **decode_reads(T, c))
            try:
                for key, val in _run_decode(T, c, args.batch, baselines, args.rep, dev,
                                            args.new_tokens_per_step).items():
                    if key.endswith("_error"):
                        res[key] = val
                    else:
                        res[f"{key}_ms"], res[f"{key}_peak_gb"] = val
            except Exception as e:  # keep going: report what failed
                traceback.print_exc()
                res["nsa_error"] = repr(e)[:300]
            for sfx in ("", "_graph"):
                if f"nsa{sfx}_ms" not in res:
                    continue
                res[f"nsa{sfx}_gbps"] = res["bytes_nsa"] * args.batch / res[f"nsa{sfx}_ms"] / 1e6
                for b in (*baselines,) if sfx else ("nsa_prefill_kernels", *baselines):
                    if f"{b}{sfx}_ms" in res:
                        res[f"speedup{sfx}_vs_{b}"] = res[f"{b}{sfx}_ms"] / res[f"nsa{sfx}_ms"]
            rows.append(res)
            print(" ".join([f"{cname:>5} T={T:>6} B={args.batch}"] + [
                f"{k}={res[k + '_ms'] * 1e3:.0f}us" for k in ("nsa", "nsa_graph", "nsa_prefill_kernels", *baselines,
                                                               *[b + "_graph" for b in baselines],
                                                               *[f"nsa_s{S}{x}" for S in args.new_tokens_per_step
                                                                 for x in ("", "_graph")])
                if k + "_ms" in res]), flush=True)
            _save(dict(meta=meta, configs=CONFIGS, results=rows), out_path)
    return _write_results(dict(meta=meta, configs=CONFIGS, results=rows), out_path,
                   lambda out, path: plot(out, path, decode=True), markdown_table_decode)


def _generate_ms(model, prompt, new: int, graph: bool, compiled: bool = False) -> tuple[float, float, float]:
    """(prefill ms, one-time ms, ms per decode step) of model.generate, from calls with 1,
    new // 2 + 1 and new + 1 new tokens (the first new token needs no decode step)."""
    import statistics
    import time

    import torch

    def call(n):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        model.generate(prompt, n, cuda_graph=graph and n > 1, compile=compiled and n > 1)
        torch.cuda.synchronize()
        return (time.perf_counter() - t0) * 1e3

    if compiled:  # every cell compiles afresh: the decode_step of each model and cache length
        torch._dynamo.reset()  # counts toward one function's recompile limit (8) otherwise
        model._decode_compiled = None
    call(new + 1)  # warm-up: compiles and autotunes
    half = new // 2
    t1, th, tn = (statistics.median(call(n) for _ in range(3)) for n in (1, half + 1, new + 1))
    step = (tn - th) / (new - half)
    return t1, tn - t1 - new * step, step


def _generate_sweep(args, meta, out_path, dev) -> int:
    import torch

    from ..model import ModelConfig, NSAModel

    rows = []
    for attention in args.attentions:  # window: the floor of NSA's step (a branch of it)
        cfg = ModelConfig.preset(args.preset, attention=attention,
                                 max_seq_len=max(args.seqlens) + args.new_tokens + 1)
        torch.manual_seed(0)
        model = NSAModel(cfg).to(dev, torch.bfloat16).eval()
        for T in args.seqlens:
            prompt = torch.randint(0, cfg.vocab_size, (args.batch, T), device=dev)
            for graph, compiled in ((False, False), (True, False), (True, True)):
                res = dict(preset=args.preset, attention=attention, graph=graph, compiled=compiled, T=T,
                           batch=args.batch, new_tokens=args.new_tokens)
                try:
                    res["prefill_ms"], res["once_ms"], res["step_ms"] = _generate_ms(model, prompt, args.new_tokens,
                                                                                     graph, compiled)
                    if not graph:  # warmed up, eager has no one-time cost: the estimate is noise (H200: -396..+847 ms)
                        del res["once_ms"]
                    res["tokens_per_s"] = args.batch * 1e3 / res["step_ms"]
                except Exception as e:  # keep going: report what failed
                    traceback.print_exc()
                    res["error"] = repr(e)[:300]
                rows.append(res)
                print(" ".join(f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}" for k, v in res.items()), flush=True)
                _save(dict(meta=meta, results=rows), out_path)
        del model
        torch.cuda.empty_cache()
    return _write_results(dict(meta=meta, results=rows), out_path, plot_generate, markdown_table_generate)


def _timed_first_call(fn) -> float:
    """Seconds of ``fn()``'s first call (what compiling costs), the GPU waited for."""
    import time

    import torch

    torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    return time.perf_counter() - t0


def _compile_sweep(args, meta, out_path, dev) -> int:
    import torch

    from ..model import ModelConfig, NSAModel

    rows = []

    def record(res, fn, tokens, graph=False):
        try:
            res["first_call_s"] = _timed_first_call(fn)
            res["ms"], res["peak_gb"] = _bench(fn, args.rep)
            res["tokens_per_s"] = tokens * 1e3 / res["ms"]
            if graph:  # replayed as a CUDA graph, as generate(cuda_graph=True) runs it: GPU time alone
                res["graph_ms"] = _bench(_graphed(fn), args.rep)[0]
        except Exception as e:  # keep going: report what failed
            traceback.print_exc()
            res["error"] = repr(e)[:300]
        rows.append(res)
        print(" ".join(f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}" for k, v in res.items()), flush=True)
        _save(dict(meta=meta, results=rows), out_path)

    for T in args.seqlens:
        cfg = ModelConfig.preset(args.preset, backend="triton", max_seq_len=T + 1)
        torch.manual_seed(0)
        model = NSAModel(cfg).to(dev, torch.bfloat16)
        tok = torch.randint(0, cfg.vocab_size, (1, T + 1), device=dev)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-6)
        for compiled in (False, True):  # eager first: it autotunes the kernels
            loss_fn = torch.compile(model.loss, fullgraph=True) if compiled else model.loss

            def train_step():
                loss_fn(tok[:, :-1], tok[:, 1:]).backward()
                opt.step()
                opt.zero_grad(set_to_none=True)

            record(dict(preset=args.preset, step="train", compiled=compiled, T=T, batch=1), train_step, T)
        del opt
        model.eval()
        B = args.batch
        cache = model.new_cache(B, T + 1)
        with torch.no_grad():
            model(torch.randint(0, cfg.vocab_size, (B, T), device=dev), cache=cache)  # prefill
        nxt = torch.randint(0, cfg.vocab_size, (B, 1), device=dev)
        seqlens = torch.full((B,), T, dtype=torch.int64, device=dev)
        for compiled in (False, True):
            decode = torch.compile(model.decode_step, fullgraph=True) if compiled else model.decode_step

            def decode_step():
                seqlens.fill_(T)  # the same position every call (decode_step advances it)
                decode(nxt, cache, seqlens)

            record(dict(preset=args.preset, step="decode", compiled=compiled, T=T, batch=B), decode_step, B,
                   graph=True)
        del model, cache
        torch._dynamo.reset()
        torch.cuda.empty_cache()
    return _write_results(dict(meta=meta, results=rows), out_path, plot_compile, markdown_table_compile)


def markdown_table_compile(out) -> str:
    """One row per (step, T): ms eager and compiled, the speedup, tokens/s, first-call seconds,
    and (decode) the step replayed as a CUDA graph, eager and compiled."""
    lines = ["| preset | step | T | batch | eager ms | compiled ms | speedup | tokens/s eager / compiled | "
             "compiled first call s | CUDA graph ms eager / compiled |", "|---|---|---|---|---|---|---|---|---|---|"]
    by = {(r["step"], r["T"], r["compiled"]): r for r in out["results"] if "ms" in r}
    for step, T in sorted({(r["step"], r["T"]) for r in out["results"]}, key=lambda k: (k[0] != "train", k[1])):
        e, c = by.get((step, T, False)), by.get((step, T, True))
        any_r = e or c
        if any_r is None:
            continue
        f = lambda r, k, fmt: fmt.format(r[k]) if r else "-"  # noqa: E731
        g = lambda r: f"{r['graph_ms']:.3f}" if r and "graph_ms" in r else "-"  # noqa: E731
        sp = f"{e['ms'] / c['ms']:.2f}x" if e and c else "-"
        lines.append(f"| {any_r['preset']} | {step} | {T} | {any_r['batch']} | {f(e, 'ms', '{:.3f}')} | "
                     f"{f(c, 'ms', '{:.3f}')} | {sp} | {f(e, 'tokens_per_s', '{:.0f}')} / "
                     f"{f(c, 'tokens_per_s', '{:.0f}')} | {f(c, 'first_call_s', '{:.1f}')} | "
                     f"{g(e)} / {g(c)} |")
    return "\n".join(lines)


def plot_compile(out, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in out["results"] if "ms" in r]
    keys = sorted({(r["step"], r["T"]) for r in rows}, key=lambda k: (k[0] != "train", k[1]))
    fig, axes = plt.subplots(1, max(1, len(keys)), figsize=(3 * max(1, len(keys)), 3.5), squeeze=False)
    for ax, (step, T) in zip(axes[0], keys):
        ms = [next((r["ms"] for r in rows if (r["step"], r["T"], r["compiled"]) == (step, T, c)), 0.0)
              for c in (False, True)]
        ax.bar(["eager", "compiled"], ms, color=["tab:gray", "tab:blue"])
        ax.set_title(f"{step}, T={T}", fontsize=8)
        ax.set_ylabel("ms per step")
    _save_figure(fig, out["meta"], path)


def _write_results(out, out_path, plot_fn, table_fn) -> int:
    """Save the JSON, draw the PNG (a plotting error does not lose the numbers), print the table."""
    _save(out, out_path)
    try:
        plot_fn(out, out_path + ".png")
    except Exception:
        traceback.print_exc()
    print(table_fn(out))
    return 0


def markdown_table_generate(out) -> str:
    """One row per prompt length: ms per decode step of NSA and full attention, eager, as a CUDA
    graph and as a graph of the compiled step; NSA's graphed tokens/s and speedups over full
    attention (graphs, compiled graphs), the graph's one-time cost, the prefill."""
    lines = ["| preset | T | batch | NSA ms/step eager / graph / compiled graph | full ms/step eager / graph / "
             "compiled graph | tokens/s NSA graph | NSA vs full (graphs / compiled) | NSA graph one-time ms | "
             "prefill ms NSA / full | window-only graph / compiled graph ms |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    by = {(r["T"], r["attention"], r["graph"], r.get("compiled", False)): r for r in out["results"] if "step_ms" in r}
    f = lambda r, k, fmt="{:.3f}": fmt.format(r[k]) if r else "-"  # noqa: E731
    vs = lambda a, b: f"{a['step_ms'] / b['step_ms']:.1f}x" if a and b else "-"  # noqa: E731
    modes = ((False, False), (True, False), (True, True))
    for T in sorted({r["T"] for r in out["results"]}):
        (ne, ng, nc), (fe, fg, fc), (_, wg, wc) = ([by.get((T, a, *m)) for m in modes]
                                                  for a in ("nsa", "full", "window"))
        any_r = ne or ng or nc or fe or fg or fc
        if any_r is None:
            continue
        lines.append(f"| {any_r['preset']} | {T} | {any_r['batch']} | "
                     f"{' / '.join(f(r, 'step_ms') for r in (ne, ng, nc))} | "
                     f"{' / '.join(f(r, 'step_ms') for r in (fe, fg, fc))} | {f(ng, 'tokens_per_s', '{:.0f}')} | "
                     f"{vs(fg, ng)} / {vs(fc, nc)} | {f(ng, 'once_ms', '{:.1f}')} | "
                     f"{f(ne, 'prefill_ms', '{:.1f}')} / {f(fe, 'prefill_ms', '{:.1f}')} | "
                     f"{f(wg, 'step_ms')} / {f(wc, 'step_ms')} |")
    return "\n".join(lines)


def plot_generate(out, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for attention, graph, compiled, label in (
            ("nsa", False, False, "NSA eager"), ("nsa", True, False, "NSA, CUDA graph"),
            ("nsa", True, True, "NSA, compiled CUDA graph"), ("full", False, False, "full attention eager"),
            ("full", True, False, "full attention, CUDA graph"),
            ("full", True, True, "full attention, compiled CUDA graph"),
            ("window", True, True, "window-only, compiled CUDA graph")):
        pts = sorted((r["T"], r["step_ms"]) for r in out["results"]
                     if (r["attention"], r["graph"], r.get("compiled", False)) == (attention, graph, compiled)
                     and "step_ms" in r)
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=label)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("prompt tokens T")
    ax.set_ylabel("ms per generated token (decode step)")
    ax.set_title(f"generate, {out['meta']['timing']}", fontsize=7)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
    _save_figure(fig, out["meta"], path)


def _vs_best_sdpa(r, suffix="") -> str:
    """NSA's speedup over the faster SDPA backend of a result row ("-" when either is missing);
    suffix "_graph" compares the CUDA-graph timings (decode)."""
    sd = [r[k] for k in (f"sdpa_flash{suffix}_ms", f"sdpa_cudnn{suffix}_ms") if k in r]
    return f"{min(sd) / r[f'nsa{suffix}_ms']:.1f}x" if sd and f"nsa{suffix}_ms" in r else "-"


def markdown_table_decode(out) -> str:
    lines = ["| config | T | batch | NSA decode us (eager / graph) | prefill kernels on 1 query us | "
             "SDPA flash us (eager / graph) | SDPA cuDNN us (eager / graph) | keys read NSA / full | "
             "NSA GB/s (graph) | vs best SDPA (eager / graph) |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    f = lambda r, k: f"{r[k + '_ms'] * 1e3:.0f}" if k + "_ms" in r else "-"  # noqa: E731
    fg = lambda r, k: f"{f(r, k)} / {f(r, k + '_graph')}" if k + "_ms" in r else "-"  # noqa: E731
    for r in out["results"]:
        lines.append(f"| {r['config']} | {r['T'] // 1024}k | {r['batch']} | {fg(r, 'nsa')} | "
                     f"{f(r, 'nsa_prefill_kernels')} | {fg(r, 'sdpa_flash')} | {fg(r, 'sdpa_cudnn')} | "
                     f"{r['keys_nsa']} / {r['keys_full']} | {r.get('nsa_graph_gbps', 0):.0f} | "
                     f"{_vs_best_sdpa(r)} / {_vs_best_sdpa(r, '_graph')} |")
    return "\n".join(lines)


def slc_gather_bytes(T, c, elem_bytes: int = 2) -> int:
    """Bytes the slc kernel reads for its selected blocks, one position and group at a time
    (each (position, group) loads its own blocks' keys and values: from L2 mostly)."""
    return nsa_flops(T, c)["slc"] // (2 * c["HQ"]) * c["H"] * elem_bytes


def _finish_prefill(res, baselines, T, c) -> None:
    """Useful TFLOP/s of the forward and of each kernel of the breakdown (:func:`nsa_flops`;
    win's time holds the gate epilogue), the slc kernel's gathered bytes per second
    (:func:`slc_gather_bytes`), and the speedups against each baseline."""
    if "nsa_ms" not in res:
        return
    f = nsa_flops(T, c)
    res["nsa_tflops"] = res["flops_nsa"] / res["nsa_ms"] / 1e9
    for k in ("cmp", "select", "slc", "win"):
        if f"k_{k}_ms" in res:
            res[f"k_{k}_tflops"] = f[k] / res[f"k_{k}_ms"] / 1e9
    if "k_slc_ms" in res:
        res["k_slc_gather_tb_s"] = slc_gather_bytes(T, c) / res["k_slc_ms"] / 1e9
    for b in baselines:
        if f"{b}_ms" in res:
            res[f"speedup_vs_{b}"] = res[f"{b}_ms"] / res["nsa_ms"]
            if b != "fla":
                res[f"{b}_tflops"] = res["flops_full"] / res[f"{b}_ms"] / 1e9


def _finish_train(res, baselines, T, c) -> None:
    """Speedups of forward + backward and of the backward alone (train mode), and the useful
    TFLOP/s of the backward and of each branch's backward (:func:`nsa_bwd_flops`)."""
    bf = nsa_bwd_flops(T, c)
    res["flops_nsa_bwd"] = bf["total"]
    for key, branch in (("nsa_bwd", "total"), ("bwd_cmp", "cmp"), ("bwd_slc", "slc"), ("bwd_win", "win")):
        if f"{key}_ms" in res:
            res[f"{key}_tflops"] = bf[branch] / res[f"{key}_ms"] / 1e9
    for b in baselines:
        if "nsa_ms" in res and f"{b}_ms" in res:
            res[f"speedup_vs_{b}"] = res[f"{b}_ms"] / res["nsa_ms"]
            res[f"bwd_speedup_vs_{b}"] = res[f"{b}_bwd_ms"] / res["nsa_bwd_ms"]


def _save(out, path) -> None:
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path + ".json", "w") as f:
        json.dump(out, f, indent=1)


def _row_line(r) -> str:
    parts = [f"{r['config']:>5} T={r['T']:>6}"]
    for k in ("nsa_fwd", "nsa_bwd", "nsa", "k_cmp", "k_select", "k_slc", "k_win", "sdpa_flash_fwd",
              "sdpa_flash_bwd", "sdpa_flash", "sdpa_cudnn_fwd", "sdpa_cudnn_bwd", "sdpa_cudnn", "flex", "fla",
              *BWD_PIECES):
        if f"{k}_ms" in r:
            parts.append(f"{k}={r[f'{k}_ms']:.2f}ms")
        elif f"{k}_error" in r:
            parts.append(f"{k}=ERR")
    return " ".join(parts)


def markdown_table(out) -> str:
    if any("nsa_bwd_ms" in r for r in out["results"]):
        return _markdown_table_train(out)
    lines = ["| config | T | NSA ms | TFLOP/s | peak GiB | cmp / select / slc / win ms | its TFLOP/s | slc TB/s | "
             "SDPA flash ms | SDPA cuDNN ms | Flex ms | fla ms | speedup vs best SDPA | vs fla |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    f = lambda r, k: f"{r[k + '_ms']:.2f}" if k + "_ms" in r else "-"  # noqa: E731
    kernels = ("k_cmp", "k_select", "k_slc", "k_win")
    for r in out["results"]:
        sp = _vs_best_sdpa(r)
        spf = f"{r['speedup_vs_fla']:.2f}x" if "speedup_vs_fla" in r else "-"
        br = " / ".join(f(r, k) for k in kernels)
        tf = " / ".join(f"{r[k + '_tflops']:.0f}" if k + "_tflops" in r else "-" for k in kernels)
        gb = f"{r['k_slc_gather_tb_s']:.1f}" if "k_slc_gather_tb_s" in r else "-"
        lines.append(f"| {r['config']} | {r['T'] // 1024}k | {f(r, 'nsa')} | "
                     f"{r.get('nsa_tflops', 0):.0f} | {r.get('nsa_peak_gb', 0):.1f} | {br} | {tf} | {gb} | "
                     f"{f(r, 'sdpa_flash')} | {f(r, 'sdpa_cudnn')} | {f(r, 'flex')} | {f(r, 'fla')} | {sp} | {spf} |")
    return "\n".join(lines)


BWD_PIECES = ("bwd_cmp", "bwd_cmp_unsplit", "bwd_slc", "bwd_slc_index", "bwd_slc_index_sorted", "bwd_win")


def _markdown_table_train(out) -> str:
    lines = ["| config | T | NSA fwd / bwd ms | SDPA flash fwd / bwd ms | SDPA cuDNN fwd / bwd ms | "
             "fwd+bwd speedup vs best SDPA | bwd speedup | NSA bwd: cmp (unsplit) / "
             "slc (its index) / win ms |", "|---|---|---|---|---|---|---|---|"]
    fb = lambda r, k: (f"{r[k + '_fwd_ms']:.2f} / {r[k + '_bwd_ms']:.2f}" if k + "_ms" in r else "-")  # noqa: E731
    for r in out["results"]:
        best = min((b for b in ("sdpa_flash", "sdpa_cudnn") if f"{b}_ms" in r), key=lambda b: r[f"{b}_ms"],
                   default=None)
        sp = f"{r[best + '_ms'] / r['nsa_ms']:.1f}x" if best and "nsa_ms" in r else "-"
        bsp = f"{r[best + '_bwd_ms'] / r['nsa_bwd_ms']:.1f}x" if best and "nsa_ms" in r else "-"
        f = lambda k: f"{r[k + '_ms']:.2f}" if k + "_ms" in r else "-"  # noqa: E731
        br = (f"{f('bwd_cmp')} ({f('bwd_cmp_unsplit')}) / {f('bwd_slc')} "
              f"({f('bwd_slc_index')}) / {f('bwd_win')}")
        lines.append(f"| {r['config']} | {r['T'] // 1024}k | {fb(r, 'nsa')} | {fb(r, 'sdpa_flash')} | "
                     f"{fb(r, 'sdpa_cudnn')} | {sp} | {bsp} | {br} |")
    return "\n".join(lines)


def plot(out, path, decode=False) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    configs = sorted({r["config"] for r in out["results"]}, key=list(CONFIGS).index)
    fig, axes = plt.subplots(1, len(configs), figsize=(5 * len(configs), 4), squeeze=False)
    for ax, cname in zip(axes[0], configs):
        rs = [r for r in out["results"] if r["config"] == cname]
        for key, label in (("nsa", "NSA (ours, Triton)"), ("nsa_graph", "NSA, CUDA graph"),
                           ("nsa_prefill_kernels", "NSA, prefill kernels"),
                           ("sdpa_cudnn_graph", "SDPA cuDNN, CUDA graph"),
                           ("sdpa_flash", "SDPA flash"), ("sdpa_cudnn", "SDPA cuDNN"),
                           ("flex", "FlexAttention"), ("fla", "fla parallel_nsa")):
            pts = [(r["T"], r[f"{key}_ms"]) for r in rs if f"{key}_ms" in r]
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=label)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("context T (keys in the cache)" if decode else "T (batch 1)")
        ax.set_ylabel("ms per decode step" if decode else
                      "forward + backward ms" if "forward + backward" in out["meta"]["timing"] else "forward ms")
        ax.set_title(f"{cname}: " + ", ".join(f"{k}={CONFIGS[cname][k]}" for k in ("HQ", "H", "Dk", "Dv", "l", "d", "lp", "n")))
        ax.title.set_fontsize(7)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    _save_figure(fig, out["meta"], path)


def _save_figure(fig, meta, path) -> None:
    fig.suptitle(f"{meta['gpu']}, torch {meta['torch']}, triton {meta['triton']}, {meta['date'][:10]}", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="bench_prefill")
    add_arguments("bench", p)
    return run("bench", p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
