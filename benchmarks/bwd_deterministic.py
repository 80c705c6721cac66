"""GPU: nsa_func forward + backward at the paper geometry with given backward tiles; deterministic
mode's cost and bitwise repeatability. python benchmarks/bwd_deterministic.py OUT.json CFG.json T ..."""
import json, sys
import torch
from triton.testing import do_bench
from nsa.apps import bench
from nsa.triton import backward as BW
from nsa.triton.nsa import _nsa_forward

out, cfg = sys.argv[1], json.load(open(sys.argv[2]))
if cfg.get("band"):
    bq, bkv = cfg["band"]
    BW._band_configs = lambda h, Dk, Dv, mode, interp, tma=False: (dict(bq, HP=16), dict({"TMA": False}, **bkv, HP=16))
if cfg.get("slc"):
    sq, skv = cfg["slc"]
    BW._slc_configs = lambda h, Dk, Dv, interp: (dict(sq, HP=16), dict(skv, HP=16))
res = []
c = dict(bench.CONFIGS["paper"], name="paper")
for T in [int(t) for t in sys.argv[3:]]:
    x = [t.requires_grad_() for t in bench._inputs(T, c, "cuda")]
    geo = dict(cmp_block=c["l"], cmp_stride=c["d"], sel_block=c["lp"], sel_count=c["n"], window=c["w"],
               scale=None, cu_seqlens=None, q_offset=0, win_k_offset=0)
    with torch.no_grad():
        o, aux = _nsa_forward(*x, aux=True, save_win=True, **geo)
    do = torch.randn_like(o)
    fwd = do_bench(lambda: _nsa_forward(*x, aux=True, save_win=True, **geo), warmup=25, rep=200, return_mode="median")
    r = dict(T=T, fwd_ms=fwd, cfg=cfg)
    for det in (False, True):
        kw = dict(geo, deterministic=det)
        run = lambda: BW.nsa_backward(do, x, aux, kw)  # noqa: E731
        g1 = run()
        g2 = run()
        r[f"bwd_ms_det{int(det)}"] = do_bench(run, warmup=25, rep=200, return_mode="median")
        r[f"bitwise_det{int(det)}"] = all(torch.equal(a, b) for a, b in zip(g1, g2) if a is not None)
        torch.cuda.reset_peak_memory_stats()
        run()
        r[f"peak_gb_det{int(det)}"] = torch.cuda.max_memory_allocated() / 2**30
        if det:
            r["max_diff_det_vs_fast"] = max((a.float() - b.float()).abs().max().item()
                                            for a, b in zip(g1, g0) if a is not None)
        g0 = g1
    res.append(r)
    print(json.dumps(r), flush=True)
    json.dump(res, open(out, "w"), indent=1)
