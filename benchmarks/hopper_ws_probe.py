"""Which loops does Triton's automatic warp specialisation split on Hopper? Compile-only (sm_90
target, no GPU): each probe kernel walks 128-row tiles read through tensor descriptors (TMA)
in a ``tl.range(..., warp_specialize=True)`` loop, at 4 warps (the Hopper pass works per
4-warp group; at 8 warps it leaves the loop alone), and the report says whether the compile
succeeded and how many warp-specialised regions, warps and ``setmaxnreg`` register budgets
came out.

The probes grow from a GEMM to the dk/dv step of an attention backward (key tile k, v in
registers; q and do tiles loaded per step):

* ``one_dot``: ``acc_v += q^T @ do``, a GEMM (one dot a step), also at 8 warps
* ``s_then_pv``: ``s = q @ k^T``, ``p = exp2(s)``, ``acc_v += p^T @ do`` (a dot feeding a dot)
* ``s_then_pv_keys_major``: the same with s kept keys x rows (no register transpose)
* ``dkdv``: the whole step, ``acc_v += p^T do``, ``dp = do v^T``, ``acc_k += (p * dp)^T q``

    PYTHONPATH=~/.cache/nsa-tests/triton-3.6.0 python benchmarks/hopper_ws_probe.py
(~1 min on 2 CPU cores; that folder holds the GPU machine's triton 3.6.0, which tests/test_spills.py
installs)
writes benchmarks/results/hopper_ws_probe_cpu.json.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import subprocess

import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

PROBES = ("one_dot", "s_then_pv", "s_then_pv_keys_major", "dkdv")


@triton.jit
def _probe(QD, DOD, K, V, GK, GV, n_tiles, BM: tl.constexpr, BN: tl.constexpr, D: tl.constexpr, P: tl.constexpr):
    bn = tl.arange(0, BN)
    cols = tl.arange(0, D)
    k = tl.load(K + bn[:, None] * D + cols[None, :])  # [BN, D]
    v = tl.load(V + bn[:, None] * D + cols[None, :])
    acc_k = tl.zeros([BN, D], tl.float32)
    acc_v = tl.zeros([BN, D], tl.float32)
    for i in tl.range(0, n_tiles, warp_specialize=True):
        t = (i * BM).to(tl.int32)
        q = QD.load([t, 0])  # [BM, D]
        do = DOD.load([t, 0])
        if P == 0:  # one_dot
            acc_v += tl.dot(tl.trans(q), do)
        elif P == 1:  # s_then_pv
            p = tl.exp2(tl.dot(q, tl.trans(k)))
            acc_v += tl.dot(tl.trans(p.to(do.dtype)), do)
        elif P == 2:  # s_then_pv_keys_major
            pt = tl.exp2(tl.dot(k, tl.trans(q)))
            acc_v += tl.dot(pt.to(do.dtype), do)
        else:  # dkdv
            p = tl.exp2(tl.dot(q, tl.trans(k)))
            acc_v += tl.dot(tl.trans(p.to(do.dtype)), do)
            ds = (p * tl.dot(do, tl.trans(v))).to(q.dtype)
            acc_k += tl.dot(tl.trans(ds), q)
    tl.store(GK + bn[:, None] * D + cols[None, :], acc_k)
    tl.store(GV + bn[:, None] * D + cols[None, :], acc_v)


def probe(p: int, BM: int = 128, D: int = 64, warps: int = 4, stages: int = 2) -> dict:
    """Compile probe ``p`` for sm_90; its outcome."""
    BN = 64
    sig = dict(QD=f"tensordesc<bf16[{BM}, {D}]>", DOD=f"tensordesc<bf16[{BM}, {D}]>", K="*bf16",
               V="*bf16", GK="*fp32", GV="*fp32", n_tiles="i32")
    const = dict(BM=BM, BN=BN, D=D, P=p)
    sig.update({k: "constexpr" for k in const})
    names = _probe.arg_names
    src = ASTSource(fn=_probe, signature=sig, constexprs={(names.index(k),): v for k, v in const.items()})
    res = dict(probe=PROBES[p], rows=BM, keys=BN, head_dim=D, num_warps=warps, num_stages=stages)
    try:
        k = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=dict(num_warps=warps, num_stages=stages))
    except Exception as e:  # the pass pipeline's failure
        return dict(res, compiled=False, error=str(e).strip().splitlines()[-1][:200])
    regs = [int(line.split()[-1].rstrip(";")) for line in k.asm["ptx"].splitlines() if "setmaxnreg" in line]
    return dict(res, compiled=True, warp_specialized_regions=k.asm["ttgir"].count("ttg.warp_specialize"),
                total_warps=k.metadata.num_warps, setmaxnreg=sorted(set(regs)))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="benchmarks/results/hopper_ws_probe_cpu.json")
    a = p.parse_args()
    rows = [probe(i) for i in range(len(PROBES))] + [probe(0, warps=8)]
    for r in rows:
        print(r)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    meta = dict(device="cpu (compile only, target sm_90)", triton=triton.__version__, python=platform.python_version(),
                date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"), commit=commit or None)
    with open(a.out, "w") as f:
        json.dump(dict(meta=meta, results=rows), f, indent=1)
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
