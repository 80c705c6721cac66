"""The cmp branch as dense causal attention through cuDNN (``nsa.triton.cmp_dense``) against the
band kernel (MODE 0): forward and backward times, and both paths' errors against an fp64
reference (paper configuration: HQ 64, H 4, Dk 192, Dv 128, l 32, d 16; bf16, random inputs).

    python benchmarks/cmp_dense.py --seqlens 8192 16384 65536
writes benchmarks/results/cmp_dense_{gpu}.json (``--out`` to choose) and its PNG
(``--plot FILE``: only the PNG of an existing result file). ``--train-step T`` times instead
whole training steps (``nsa bench train``'s NSA step, paper configuration, one process) with
``cmp_dense.OFFSETS_PER_CALL`` None, each of ``--offsets-per-call``, then None again:

    python benchmarks/cmp_dense.py --train-step 65536 --offsets-per-call 4 8
"""

from __future__ import annotations

import argparse
import json
import math
import traceback

import torch

from nsa.apps.bench import _bench, gpu_tag, result_meta
from nsa.reference import compressed_attention_ref
from nsa.triton import cmp_dense as CD
from nsa.triton.backward import compressed_attention_backward
from nsa.triton.compressed import compressed_attention_triton

HQ, H, DK, DV, L, D = 64, 4, 192, 128, 32, 16


def inputs(B, T, dtype=torch.bfloat16, seed=0):
    tc = (T - L) // D + 1
    g = torch.Generator(device="cuda").manual_seed(seed)
    mk = lambda *s: torch.randn(*s, device="cuda", dtype=dtype, generator=g)  # noqa: E731
    return mk(B, T, HQ, DK), mk(B, tc, H, DK), mk(B, tc, H, DV), mk(B, T, HQ, DV)


def errors(B, T) -> dict:
    """Max |x - ref| / max |ref| of o, lse, dq, dk, dv for the band kernel and cmp_dense."""
    q, k, v, do = inputs(B, T)
    sc = 1 / math.sqrt(DK)
    leaves = [x.double().requires_grad_() for x in (q, k, v)]
    o_r, lse_r = compressed_attention_ref(*leaves, cmp_block=L, cmp_stride=D)
    ref = [o_r.detach(), lse_r.detach(), *torch.autograd.grad(o_r, leaves, do.double())]
    o_t, lse_t = compressed_attention_triton(q, k, v, cmp_block=L, cmp_stride=D)
    band = [o_t, lse_t, *compressed_attention_backward(q, k, v, o_t, lse_t, do, cmp_block=L, cmp_stride=D)]
    o_c, lse_c = CD.cmp_dense(q, k, v, cmp_block=L, cmp_stride=D, scale=sc)
    dense = [o_c, lse_c, *CD.cmp_dense_backward(q, k, v, o_c, lse_c, do, cmp_block=L, cmp_stride=D, scale=sc)]

    def rel(x, r):
        fin = torch.isfinite(r)
        return ((x.double() - r).abs()[fin].max() / r.abs()[fin].max()).item()

    names = ["o", "lse", "dq", "dk", "dv"]
    return dict(B=B, T=T, band={n: rel(x, r) for n, x, r in zip(names, band, ref)},
                dense={n: rel(x, r) for n, x, r in zip(names, dense, ref)},
                lse_inf_same=bool(torch.equal(torch.isinf(lse_c), torch.isinf(lse_r))))


def timings(T, rep, per_call=()) -> dict:
    q, k, v, do = inputs(1, T)
    sc = 1 / math.sqrt(DK)
    o_t, lse_t = compressed_attention_triton(q, k, v, cmp_block=L, cmp_stride=D)
    o_c, lse_c = CD.cmp_dense(q, k, v, cmp_block=L, cmp_stride=D, scale=sc)
    dq = torch.empty(q.shape, dtype=torch.float32, device="cuda")
    fns = {
        "band_fwd": lambda: compressed_attention_triton(q, k, v, cmp_block=L, cmp_stride=D),
        "dense_fwd": lambda: CD.cmp_dense(q, k, v, cmp_block=L, cmp_stride=D, scale=sc),
        "band_bwd": lambda: compressed_attention_backward(q, k, v, o_t, lse_t, do, cmp_block=L, cmp_stride=D),
        "dense_bwd": lambda: CD.cmp_dense_backward(q, k, v, o_c, lse_c, do, cmp_block=L, cmp_stride=D,
                                                   scale=sc, dq=dq),
    }
    for m in per_call:  # the backward a few offsets a cuDNN call (less of its fp32 dq workspace at once)
        fns[f"dense_bwd_per{m}"] = lambda m=m: CD.cmp_dense_backward(q, k, v, o_c, lse_c, do, cmp_block=L,
                                                                    cmp_stride=D, scale=sc, dq=dq, offsets_per_call=m)
    out = dict(T=T)
    for name, fn in fns.items():
        try:
            out[name + "_ms"], out[name + "_peak_gb"] = _bench(fn, rep)
        except Exception as e:
            traceback.print_exc(limit=4)
            out[name + "_error"] = repr(e)[:400]
    tc = (T - L) // D + 1
    pairs = sum(min(tc, (t - L + 1) // D + 1) for t in range(L - 1, T)) * HQ
    out["fwd_tflop"] = 2 * pairs * (DK + DV) / 1e12
    for p in ("band", "dense"):
        if p + "_fwd_ms" in out:
            out[p + "_fwd_tflops"] = out["fwd_tflop"] / out[p + "_fwd_ms"] * 1e3
        if p + "_bwd_ms" in out:  # the five matmuls of a flash backward: 2 (3 Dk + 2 Dv) a pair
            out[p + "_bwd_tflops"] = 2 * pairs * (3 * DK + 2 * DV) / 1e12 / out[p + "_bwd_ms"] * 1e3
    print(out, flush=True)
    return out


def train_steps(T, rep, per_call) -> list[dict]:
    """Forward, forward + backward and peak memory of the NSA training step at each
    OFFSETS_PER_CALL (None first and last: the spread of two runs of one setting)."""
    from nsa.apps import bench as Bn

    c = dict(Bn.CONFIGS["paper"], name="paper")
    x = Bn._inputs(T, c, "cuda")
    rows = []
    for m in [None, *per_call, None]:
        CD.OFFSETS_PER_CALL = m
        f, both, peak = Bn._run_train(T, c, x, [], rep=rep)["nsa"]
        rows.append(dict(T=T, offsets_per_call=m, fwd_ms=f, fwd_bwd_ms=both, bwd_ms=both - f, peak_gb=peak))
        print(rows[-1], flush=True)
    return rows


def plot(path: str) -> str:
    """Forward and backward ms of both paths per T, beside the JSON."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with open(path) as f:
        rows = json.load(f)["timings"]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    x = range(len(rows))
    for i, (key, label) in enumerate([("band_fwd_ms", "band fwd"), ("dense_fwd_ms", "cuDNN fwd"),
                                      ("band_bwd_ms", "band bwd"), ("dense_bwd_ms", "cuDNN bwd")]):
        ax.bar([j + (i - 1.5) * 0.2 for j in x], [r.get(key, 0) for r in rows], 0.2, label=label)
    ax.set_xticks(list(x), [f"{r['T'] // 1024}k" for r in rows])
    ax.set_yscale("log")
    ax.set_ylabel("ms")
    ax.set_title("cmp branch: band kernel vs dense causal (cuDNN)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    png = path.rsplit(".", 1)[0] + ".png"
    fig.savefig(png, dpi=100)
    return png


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seqlens", type=int, nargs="+", default=[8192, 16384, 65536])
    p.add_argument("--check", type=int, nargs="+", default=[4096, 4111], help="T of the error checks")
    p.add_argument("--rep", type=int, default=200)
    p.add_argument("--offsets-per-call", type=int, nargs="*", default=[], help="also time the backward so")
    p.add_argument("--train-step", type=int, default=None, metavar="T",
                   help="time training steps at T for each --offsets-per-call instead")
    p.add_argument("--out", default=None)
    p.add_argument("--plot", default=None, help="only draw the PNG of this result file")
    a = p.parse_args()
    if a.plot:
        print("wrote", plot(a.plot))
        return
    if a.train_step:
        meta = result_meta("triton.testing.do_bench median")
        path = a.out or f"benchmarks/results/train_cmp_dense_opc_{gpu_tag(meta['gpu'])}.json"
        with open(path, "w") as f:
            json.dump(dict(meta=meta, train_steps=train_steps(a.train_step, 400, a.offsets_per_call)), f, indent=1)
        print("wrote", path)
        return
    res = dict(errors=[], timings=[])
    for i, T in enumerate(a.check):
        try:
            res["errors"].append(errors(1 + i % 2, T))
            print(res["errors"][-1], flush=True)
        except Exception as e:
            traceback.print_exc(limit=4)
            res["errors"].append(dict(T=T, error=repr(e)[:400]))
    for T in a.seqlens:
        res["timings"].append(timings(T, a.rep, a.offsets_per_call))
    meta = result_meta("triton.testing.do_bench median (L2 flushed between calls)")
    path = a.out or f"benchmarks/results/cmp_dense_{gpu_tag(meta['gpu'])}.json"
    with open(path, "w") as f:
        json.dump(dict(meta=meta, **res), f, indent=1)
    print("wrote", path, plot(path))


if __name__ == "__main__":
    main()
