"""GPU: backward kernels' time per tile config (torch.profiler per kernel), regs/spills (bwd_tiles_h200.json).

python benchmarks/bwd_tiles.py OUT.json [T ...] [--band-only] [--tma]
"""
import json
import sys
import time
import traceback

import torch

from nsa.apps import bench
from nsa.triton import backward as BW
from profile_kernels import wall_ms

band_only = "--band-only" in sys.argv or "--tma" in sys.argv  # the cmp and win tiles only
argv = [a for a in sys.argv[1:] if a not in ("--band-only", "--tma")]
out_path = argv[0]
Ts = [int(x) for x in argv[1:]] or [65536]
dev = "cuda"
results = []


def kernel_times(fn, iters=5):
    """{kernel name: avg ms} of fn() over iters calls (after one warm-up)."""
    fn()
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(iters):
            fn()
        torch.cuda.synchronize()
    res = {}
    for e in prof.key_averages():
        if e.device_type == torch.autograd.DeviceType.CUDA or getattr(e, "device_time_total", 0):
            t = getattr(e, "device_time_total", None) or getattr(e, "cuda_time_total", 0)
            if t:
                res[e.key[:60]] = res.get(e.key[:60], 0) + t / 1e3 / iters
    return res


def compiled_info(jit):
    """[(regs, spills)] of every compiled variant of a jitted kernel."""
    out = []
    for dc in getattr(jit, "device_caches", {}).values():
        cache = dc[0] if isinstance(dc, tuple) else dc
        for k in cache.values():
            out.append((getattr(k, "n_regs", None), getattr(k, "n_spills", None)))
    return out


def wall(fn, n=10):
    return wall_ms(fn, n, warmup=1)


c = dict(bench.CONFIGS["paper"], name="paper")
band_q = [dict(BT=4, BN=32, num_warps=4, num_stages=3)]
# the tiles that compile without spills at the paper geometry (HQ 64, H 4) for sm_90 with triton 3.6
band_kv = [dict(BT=8, BN=64, num_warps=8, num_stages=1), dict(BT=2, BN=64, num_warps=8, num_stages=2),
           dict(BT=2, BN=64, num_warps=8, num_stages=3), dict(BT=4, BN=32, num_warps=8, num_stages=2),
           dict(BT=8, BN=32, num_warps=8, num_stages=1)]
band_kv = [dict(cfg, TMA=False) for cfg in band_kv]
if "--tma" in sys.argv:  # query tiles through tensor descriptors (group-major copies), against the plain tile
    band_kv = [dict(BT=8, BN=64, num_warps=8, num_stages=1, TMA=False), dict(BT=2, BN=64, num_warps=8, num_stages=3,
                                                                           TMA=False)] + [
        dict(BT=bt, BN=64, num_warps=8, num_stages=st, TMA=True) for bt, st in ((8, 2), (4, 3))]
slc_q = [dict(BT=1, num_warps=4, num_stages=2)]
slc_kv = [dict(BT=4, num_warps=8, num_stages=2, chunk=256), dict(BT=8, num_warps=8, num_stages=1, chunk=256),
          dict(BT=2, num_warps=4, num_stages=1, chunk=256)]
orig_band, orig_slc = BW._band_configs, BW._slc_configs
first_grads = {}  # mode -> (dk, dv) of the first band config run

for T in Ts:
    x = bench._inputs(T, c, dev)
    q, kc, vc, k, v, kw, vw, gates = x
    o_cmp, lse_cmp, idx, o_slc, lse_slc, o_win, lse_win, do, sc, seq, lens, win = bench.backward_state(c, x)
    dq = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
    g = dict(gates=gates, d_gates=torch.zeros(gates.shape, dtype=torch.float32, device=q.device))  # as shipped

    def run_band(mode, cq, ckv):
        BW._band_configs = lambda h, Dk, Dv, mode, interp, tma=False: (dict(cq, HP=16), dict(ckv, HP=16))
        try:
            if mode == 0:
                f = lambda: BW.band_backward(q, kc, vc, o_cmp, lse_cmp, do, mode=0, scale=sc, seq=seq,  # noqa
                                             lens=lens, cmp_block=c["l"], cmp_stride=c["d"], dq_acc=dq, gate=0, **g)
            else:
                f = lambda: BW.band_backward(q, kw, vw, o_win, lse_win, do, dq_acc=dq, gate=2, **g, **win)  # noqa
            dq.zero_()
            _, dk, dv = f()
            chk = (dk.float().norm().item(), dv.float().norm().item())
            first = first_grads.setdefault(mode, (dk.clone(), dv.clone()))  # the first config's, to compare
            chk += tuple(((a.float() - b.float()).abs().max() / b.float().abs().max()).item()
                         for a, b in zip((dk, dv), first))
            kt = kernel_times(f)
            return dict(kernels=kt, wall=wall(f), check=chk)
        finally:
            BW._band_configs = orig_band

    def run_slc(cq, ckv):
        BW._slc_configs = lambda h, Dk, Dv, interp: (dict(cq, HP=16), dict(ckv, HP=16))
        try:
            f = lambda: BW.selected_backward(q, k, v, idx, o_slc, do, sel_block=c["lp"], scale=sc,  # noqa
                                             seq=seq, lens=lens, dq_acc=dq, lse=lse_slc, **g)
            dq.zero_()
            _, dk, dv = f()
            chk = (dk.float().norm().item(), dv.float().norm().item())
            return dict(kernels=kernel_times(f), wall=wall(f), check=chk)
        finally:
            BW._slc_configs = orig_slc

    # cmp: vary dq tiles with kv fixed, then kv tiles with dq fixed
    for i, cq in enumerate(band_q):
        for j, ckv in enumerate(band_kv):
            if i and j:
                continue
            for mode in (0, 1):
                t0 = time.time()
                try:
                    r = run_band(mode, cq, ckv)
                except Exception as e:
                    traceback.print_exc(limit=2)
                    r = dict(error=repr(e)[:300])
                r.update(T=T, branch="cmp" if mode == 0 else "win", cfg_q=cq, cfg_kv=ckv, secs=time.time() - t0)
                results.append(r)
                print(json.dumps({k_: r[k_] for k_ in r if k_ != "kernels"}), {k_[:30]: round(v_, 3) for k_, v_ in r.get("kernels", {}).items()}, flush=True)
                json.dump(results, open(out_path, "w"), indent=1)
    for i, cq in enumerate([] if band_only else slc_q):
        for j, ckv in enumerate(slc_kv):
            if i and j:
                continue
            t0 = time.time()
            try:
                r = run_slc(cq, ckv)
            except Exception as e:
                traceback.print_exc(limit=2)
                r = dict(error=repr(e)[:300])
            r.update(T=T, branch="slc", cfg_q=cq, cfg_kv=ckv, secs=time.time() - t0)
            results.append(r)
            print(json.dumps({k_: r[k_] for k_ in r if k_ != "kernels"}), {k_[:30]: round(v_, 3) for k_, v_ in r.get("kernels", {}).items()}, flush=True)
            json.dump(results, open(out_path, "w"), indent=1)
    del x, q, kc, vc, k, v, kw, vw, gates, o_cmp, lse_cmp, idx, o_slc, lse_slc, do, dq
    torch.cuda.empty_cache()

info = {name: compiled_info(getattr(BW, name)) for name in ("_band_bwd_dq", "_band_bwd_dkdv", "_selected_bwd",
                                                             "_selected_bwd_dkdv")}
results.append(dict(compiled=info))
json.dump(results, open(out_path, "w"), indent=1)
print(json.dumps(info))
