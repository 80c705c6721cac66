"""The shipped backward, decode and selection tiles compile for sm_90 without spills (no GPU needed).

The kernels are compiled on the CPU (``tests/sm90.py``) with the triton of the GPU machine the
tiles were timed on: 3.6.0, the version torch 2.11 pins. Other triton versions allocate
registers differently (3.9 spills these tiles), so the test installs 3.6.0 into a cache folder
of its own (pip, no dependencies) and skips when that is impossible.
"""

from __future__ import annotations

import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

# the kernels only compile in a subprocess (sm90.py); in this process they are built for the
# interpreter like in the other kernel test files, so that those find them so built
if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"
sys.path.insert(0, os.path.dirname(__file__))
from sm90 import compile_sm90  # noqa: E402

from nsa.triton import _common as C  # noqa: E402
from nsa.triton import backward as BW  # noqa: E402
from nsa.triton import decode as D  # noqa: E402
from nsa.triton import selected as S  # noqa: E402

GPU_TRITON = "3.6.0"
TYPES = dict(LSE="*fp32", DELTA="*fp32", GQ="*fp32", GK="*fp32", GV="*fp32", TBL="*i32", KTBL="*i32", FLAGS="*i8",
             SEQ="*i64", ITEMS="*i64", QPOS="*i64", IDX="*i64", LSEBUF="*fp32", sm_scale="fp32",
             q_offset="i32", k_offset="i32", part_k="i64", part_v="i64", DG="*fp32", NT="i32", OF="*fp32",
             LSEF="*fp32")
# (query heads, kv heads, Dk, Dv) as the benchmarks run them: the kv heads enter the address
# arithmetic (H = 4 made the window dk/dv tiles of H = 1 spill), so they are the real ones
GEOMETRIES = {"paper": (64, 4, 192, 128), "d128": (64, 4, 128, 128), "gqa4-d64": (16, 4, 64, 64)}


@pytest.fixture(scope="module")
def gpu_triton():
    path = os.path.join(os.path.expanduser("~"), ".cache", "nsa-tests", f"triton-{GPU_TRITON}")
    if not os.path.isfile(os.path.join(path, "triton", "__init__.py")):
        res = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", path,
                              f"triton=={GPU_TRITON}"], capture_output=True, text=True, timeout=600)
        if res.returncode:
            pytest.skip(f"cannot install triton=={GPU_TRITON}: {res.stderr.strip()[-300:]}")
    return path


def _variants():
    """The slc forward's autotune candidates, as the objects its prune function takes."""
    from types import SimpleNamespace

    return [SimpleNamespace(**c) for c in C.tuned_variants()["_selected_fwd"]]


def _specs(HQ, H, Dk, Dv):
    """(name, spec) of every backward kernel as the launchers configure it for bf16 on a GPU, in
    NSA's backward (each dq kernel applying its branch's gate: GIDX 0 cmp, 1 slc, 2 win; cmp
    storing dq first, win adding the last share and writing q's dtype: DQ_MODE 1 and 2)."""
    BK0, BK1 = C.split_dim(Dk)
    h = HQ // H
    dims = dict(HQ=HQ, G=h, DK=Dk, DV=Dv, BK0=BK0, BK1=BK1, BV=max(16, C.next_pow2(Dv)), PREC="tf32",
                UPCAST=False)
    band = dict(dims, CMP_L=32, CMP_D=16, WINDOW=512)
    cq, ckv = BW._band_configs(h, Dk, Dv, 0, False)
    cq_win, ckv_win = BW._band_configs(h, Dk, Dv, 1, False)
    # the descriptor tiles (bf16 on Hopper), where the launcher takes them
    tma = {mode: BW._band_configs(h, Dk, Dv, mode, False, True)[1] for mode in (0, 1)}
    sq, skv = BW._slc_configs(h, Dk, Dv, False)
    skv_chunk = skv["chunk"]
    ch = C.next_pow2(skv_chunk)  # the slc dk/dv item's positions, a constexpr of the kernel
    skv = {k: v for k, v in skv.items() if k not in ("chunk", "span")}
    slc = dict(dims, SEL_L=64, BS=64)

    def spec(kernel, cfg, types=TYPES, **const):
        tiles = {k: v for k, v in cfg.items() if k not in ("num_warps", "num_stages")}
        return dict(module="nsa.triton.backward", kernel=kernel, types=types, constexprs={**const, **tiles},
                    num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])

    plain = dict(EDGES=False, ADD=False, **band)
    # the dq kernels read their key tiles through descriptors (bf16 on Hopper), as shipped
    kdesc = dict(TYPES, KD0=f"tensordesc<bf16[{cq['BN']}, {BK0}]>", KD1=f"tensordesc<bf16[{cq['BN']}, {BK1 or BK0}]>",
                 VD=f"tensordesc<bf16[{cq['BN']}, {dims['BV']}]>")
    kdesc_win = dict(kdesc, **{name: f"tensordesc<bf16[{cq_win['BN']}, {kdesc[name].split(', ')[1]}"
                               for name in ("KD0", "KD1", "VD")})
    dq_tma = dict(GM=True, TMA=True, **band)
    specs = {
        # cmp's also writes the group-major q of the descriptor tiles, both write do_i group-major
        "band_dq_cmp": spec("_band_bwd_dq", cq, kdesc, MODE=0, GIDX=0, DQ_MODE=1, WRITE_QG=True, **dq_tma),
        "band_dq_win": spec("_band_bwd_dq", cq_win, kdesc_win, MODE=1, GIDX=2, DQ_MODE=2, WRITE_QG=False, **dq_tma),
        # the window's when cuDNN ran cmp's backward (nsa.triton.cmp_dense): it writes the q copy
        "band_dq_win_qg": spec("_band_bwd_dq", cq_win, kdesc_win, MODE=1, GIDX=2, DQ_MODE=2, WRITE_QG=True, **dq_tma),
        # a branch alone (no gates): copies q and do group-major for its descriptor tiles, or not
        "band_dq_add": spec("_band_bwd_dq", cq_win, kdesc_win, MODE=1, GIDX=-1, DQ_MODE=0, WRITE_QG=True, **dq_tma),
        "band_dq_add_rows": spec("_band_bwd_dq", cq_win, MODE=1, GIDX=-1, DQ_MODE=0, GM=False, WRITE_QG=False,
                                 TMA=False, **band),
        "band_dkdv_cmp_split": spec("_band_bwd_dkdv", ckv, MODE=0, QCH=1024, BTG=ckv["BT"], **plain),
        "band_dkdv_cmp": spec("_band_bwd_dkdv", ckv, MODE=0, QCH=0, BTG=ckv["BT"], **plain),
        "band_dkdv_win": spec("_band_bwd_dkdv", ckv_win, MODE=1, QCH=0, BTG=ckv_win["BT"], **plain),
        "slc_dq": spec("_selected_bwd", sq, N_SEL=16, NP=16, KV=False, HAVE_LSE=True, GIDX=1, SHARE=-1, SKIP=False,
                       FORCED=False,
                       TMA=False, **slc),
        "slc_dkdv": spec("_selected_bwd_dkdv", skv, PARTIAL=False, CH=ch, **slc),
    }
    # the counted transposed index (one launch config: 4 warps, 1 stage)
    tidx = dict(H=H, N_SEL=16, NP=16, N_BLK=1024, SEL_L=64, BR=64, SPAN=4096)
    itypes = dict(TYPES, BI="*i32", HIST="*i32", n_keys="i32", STARTS="*i64", ENDS="*i64", FIRST="*i64",
                  SEGS="*i64", q_offset="i32", n_r="i32", n_items="i32")
    one = dict(num_warps=4, num_stages=1)
    specs["tidx_count"] = spec("_tidx_count", one, itypes, **tidx)
    specs["tidx_place"] = spec("_tidx_place", one, itypes, **tidx)
    specs["tidx_items"] = spec("_tidx_items", one, itypes, H=H, N_BLK=1024, CHUNK=skv_chunk)
    for mode, cfg in tma.items():
        if not cfg["TMA"]:
            continue
        blk = cfg["BT"] * h  # [rows, columns] blocks of the group-major q and do
        descs = dict(TYPES, QD=f"tensordesc<bf16[{blk}, {BK0}]>", QD1=f"tensordesc<bf16[{blk}, {BK1 or BK0}]>",
                     DOD=f"tensordesc<bf16[{blk}, {dims['BV']}]>")
        name = ("cmp", "win")[mode]
        for qch in ((1024, 0) if mode == 0 else (0,)):
            specs[f"band_dkdv_{name}_tma_q{qch}"] = spec("_band_bwd_dkdv", cfg, descs, MODE=mode, QCH=qch,
                                                         BTG=cfg["BT"], **plain)
        # the edges launch takes the TMA launch's chunks, at each tile it may run (backward.EDGE_ROWS;
        # 32 rows, off until timed, at the paper's head dims)
        for qch in ((1024, 0) if mode == 0 else (0,)):
            for rows in ((0, 32) if (Dk, Dv) == (192, 128) else (0,)):
                edge = dict(BW._edge_config(cfg, h, rows or None), TMA=False)
                specs[f"band_dkdv_{name}_edges{rows or ''}_q{qch}"] = spec(
                    "_band_bwd_dkdv", edge, MODE=mode, QCH=qch, BTG=cfg["BT"], **dict(band, EDGES=True, ADD=True))
    if sq["BT"] == 1:  # one position a tile: the slc forward and dq read their blocks through descriptors
        ddesc = dict(TYPES, IDX="*i64", TUNE_T="i32", KD0=f"tensordesc<bf16[64, {BK0}]>",
                     KD1=f"tensordesc<bf16[64, {BK1 or BK0}]>", VD=f"tensordesc<bf16[64, {dims['BV']}]>")
        # one position a tile leaves its forced blocks to the forced-block kernels (nsa_func's path)
        specs["slc_dq_tma"] = spec("_selected_bwd", BW.slc_dq_config(sq, True), ddesc, N_SEL=16, NP=16, KV=False, HAVE_LSE=True, GIDX=1,
                                   SHARE=-1, SKIP=False, TMA=True, FORCED=True, **slc)
        cf = S.forced_config(h, False)
        fdims = {k_: slc[k_] for k_ in BW._FORCED_ARGS}
        # the forced-block kernels (selected.FORCED), with descriptors as on Hopper with 16-bit inputs
        specs["forced_fwd"] = dict(module="nsa.triton.selected", kernel="_forced_fwd", types=ddesc,
                                   constexprs=dict(fdims, HP=cf["HP"], BT=cf["BT"], TMA=True),
                                   num_warps=cf["num_warps"], num_stages=cf["num_stages"])
        specs["forced_dq"] = spec("_forced_bwd_dq", cf, ddesc, TMA=True, **fdims)
        fwd = dict(slc, HP=sq["HP"], BT=1, N_SEL=16, NP=16, WRITE_LSE=True, CLAMP=True, K0_FULL=True,
                   V_FULL=True, SHARE=-1, SKIP=False, TMA=True, FORCED=True)
        fewest = min(c.num_warps for c in S._prune(_variants(), {}, **fwd))
        assert fewest == 1
        for w, st in ((fewest, 1), (fewest, 3), (8, 3)):  # the fewest warps (most registers a thread), the most
            specs[f"slc_fwd_tma_w{w}_s{st}"] = dict(module="nsa.triton.selected", kernel="_selected_fwd",
                                                    types=ddesc, constexprs=fwd, num_warps=w, num_stages=st)
    # the band forward, its key tiles through descriptors (bf16 on Hopper) and through pointers,
    # at every config its autotuner keeps (band._prune)
    from nsa.triton import band as BD

    cf = BD._config(h, Dk, Dv, False)
    fdesc = dict(TYPES, TUNE_T="i32", KD0=f"tensordesc<bf16[{cf['BN']}, {BK0}]>",
                 KD1=f"tensordesc<bf16[{cf['BN']}, {BK1 or BK0}]>", VD=f"tensordesc<bf16[{cf['BN']}, {dims['BV']}]>")
    ftiles = dict(band, HP=cf["HP"], BT=cf["BT"], BN=cf["BN"], WRITE_LSE=True, WRITE_BRANCH=False)
    from triton import Config

    kept = BD._prune([Config({}, num_warps=w, num_stages=st) for w in (4, 8) for st in (2, 3)], {}, **ftiles)
    assert kept and all(c.num_warps == 8 for c in kept) == (cf["BT"] * cf["HP"] > 64)
    for w, st in ((c.num_warps, c.num_stages) for c in kept):
        for mode, gates in ((0, False), (1, True)):
            for tma in (True, False):
                specs[f"band_fwd_m{mode}_w{w}_s{st}_tma{int(tma)}"] = dict(
                    module="nsa.triton.band", kernel="_band_fwd", types=fdesc, num_warps=w, num_stages=st,
                    constexprs=dict(ftiles, MODE=mode, FUSE_GATES=gates, TMA=tma))
    # Eq. 5 for cmp when cuDNN runs its backward (nsa.triton.cmp_dense.gate_split)
    specs["gate_split"] = dict(module="nsa.triton.cmp_dense", kernel="_gate_split",
                               types=dict(DG="*fp32", n_rows="i32"), num_warps=4, num_stages=1,
                               constexprs=dict(GIDX=0, DV=Dv, BV=C.next_pow2(Dv), BR=16))
    return specs


@pytest.mark.slow
@pytest.mark.parametrize("geometry", list(GEOMETRIES))
def test_backward_tiles_do_not_spill(geometry, gpu_triton):
    specs = _specs(*GEOMETRIES[geometry])
    with ThreadPoolExecutor(2) as pool:
        res = dict(zip(specs, pool.map(lambda s: compile_sm90(s, triton_path=gpu_triton), specs.values())))
    spilled = {name: r for name, r in res.items() if r["stack"]}
    assert not spilled, f"{geometry}: stack frames (spills) in {spilled}"
    assert all(r["regs"] > 0 for r in res.values()), res  # the report was read


@pytest.mark.slow
@pytest.mark.parametrize("h", [1, 2, 4])
def test_selected_tiles_of_small_groups_do_not_spill(h, gpu_triton):
    """The slc forward and dq kernels at groups of fewer than 16 heads, where a tile holds 16 / h
    positions and walks their distinct blocks (selected.tile_uniques: the dedup and sort of up
    to 16 x 16 slots): the forward at the fewest warps its autotuner tries (the most registers a
    thread), at 1 and 3 stages, and at 4 warps x 3 stages; the dq at its configuration."""


    types = dict(TYPES, IDX="*i32", TUNE_T="i32")
    cfg = S._config(h, 64, 64, False)
    dims = dict(HQ=4 * h, G=h, DK=64, DV=64, SEL_L=64, BS=64, N_SEL=16, NP=16, HP=cfg["HP"], BT=cfg["BT"], BK0=64,
                BK1=0, BV=64, PREC="tf32", UPCAST=False)
    fwd = dict(dims, WRITE_LSE=True, CLAMP=True, K0_FULL=False, V_FULL=False, SHARE=-1, SKIP=False, TMA=False,
               FORCED=False)
    sq, _ = BW._slc_configs(h, 64, 64, False)
    fewest = min(c.num_warps for c in S._prune(_variants(), {}, **fwd))
    assert fewest == 2
    specs = {f"fwd-w{w}-s{st}": dict(module="nsa.triton.selected", kernel="_selected_fwd", types=types,
                                     constexprs=fwd, num_warps=w, num_stages=st)
             for w, st in ((fewest, 1), (fewest, 3), (4, 3))}
    specs["dq"] = dict(module="nsa.triton.backward", kernel="_selected_bwd", types=types,
                       constexprs=dict(dims, KV=False, HAVE_LSE=True, GIDX=1, SHARE=-1, SKIP=False, TMA=False,
                                       FORCED=False),
                       num_warps=sq["num_warps"],
                       num_stages=sq["num_stages"])
    with ThreadPoolExecutor(2) as pool:
        res = dict(zip(specs, pool.map(lambda s: compile_sm90(s, triton_path=gpu_triton), specs.values())))
    assert not {k: r for k, r in res.items() if r["stack"]}, res
    assert all(r["regs"] > 0 for r in res.values()), res


@pytest.mark.slow
@pytest.mark.parametrize("h", [16, 32])
def test_selected_split_launch_does_not_spill(h, gpu_triton):
    """The split launches (selected.share_split) of the slc forward and dq at the paper
    geometry's 192 / 128 head dims: the forward's shared pass (64 rows: 4 positions of 16
    heads, 2 of 32) at every config its autotuner keeps (selected._prune), its one-position
    pass that skips what the first took at the fewest warps, 1 and 3 stages, and at 4 warps x 3
    stages; the dq's two passes at their configs (backward.SLC_DQ_SHARED, _slc_configs)."""


    bt = 64 // h
    share = int(S.SHARE_FRACTION * bt * 16)  # as share_split, which selected.SPLIT turns off
    types = dict(TYPES, IDX="*i64", FLAGS="*i8", TUNE_T="i32", KD0="tensordesc<bf16[64, 128]>",
                 KD1="tensordesc<bf16[64, 64]>", VD="tensordesc<bf16[64, 128]>")
    dims = dict(HQ=4 * h, G=h, DK=192, DV=128, SEL_L=64, BS=64, N_SEL=16, NP=16, HP=h, BK0=128, BK1=64, BV=128,
                PREC="tf32", UPCAST=False, WRITE_LSE=True)
    shared = dict(dims, BT=bt, CLAMP=False, K0_FULL=False, V_FULL=False, SHARE=share, SKIP=False, TMA=False,
                  FORCED=False)
    kept = S._prune(_variants(), {}, SHARE=share)
    assert kept and min(c.num_warps for c in kept) == 4
    specs = {f"shared-w{c.num_warps}-s{c.num_stages}": dict(module="nsa.triton.selected", kernel="_selected_fwd",
                                                            types=types, constexprs=shared, num_warps=c.num_warps,
                                                            num_stages=c.num_stages) for c in kept}
    rest = dict(dims, BT=1, CLAMP=True, K0_FULL=True, V_FULL=True, SHARE=-1, SKIP=True, TMA=True, FORCED=False)
    fewest = min(c.num_warps for c in S._prune(_variants(), {}, **rest))
    assert fewest == (1 if h <= 16 else 2)
    specs.update({f"rest-w{w}-s{st}": dict(module="nsa.triton.selected", kernel="_selected_fwd", types=types,
                                           constexprs=rest, num_warps=w, num_stages=st)
                  for w, st in ((fewest, 1), (fewest, 3), (4, 3))})
    sq, _ = BW._slc_configs(h, 192, 128, False)
    dq = dict(dims, KV=False, HAVE_LSE=True, GIDX=1)
    del dq["WRITE_LSE"]
    for name, const, cfg in (("dq-shared", dict(dq, BT=bt, SHARE=share, SKIP=False, TMA=False, FORCED=False),
                              BW.SLC_DQ_SHARED),
                             ("dq-rest", dict(dq, BT=1, SHARE=-1, SKIP=True, TMA=True, FORCED=False),
                              BW.slc_dq_config(sq, True))):
        specs[name] = dict(module="nsa.triton.backward", kernel="_selected_bwd", types=types, constexprs=const,
                           num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    with ThreadPoolExecutor(2) as pool:
        res = dict(zip(specs, pool.map(lambda s: compile_sm90(s, triton_path=gpu_triton), specs.values())))
    assert not {k: r for k, r in res.items() if r["stack"]}, res
    assert all(r["regs"] > 0 for r in res.values()), res


DECODE_TYPES = dict(LENS="*i32", BT="*i32", IDX="*i32", SCORE="*fp32", S="*fp32", PM="*fp32", PL="*fp32",
                    PACC="*fp32", qk_scale="fp32", TC="i32", TS="i32", CH="i32", NSPLIT="i32", MAXP="i32",
                    NPAGES="i32", TK="i32", TW="i32", N_SEL_MAX="i32", TUNE_R="i32", TUNE_T="i32")


@pytest.mark.slow
def test_decode_kernels_compile_for_sm90(gpu_triton):
    """The decode kernels compile for sm_90 in every cache layout (contiguous, paged with a window
    ring, paged with the window in the pages), with the top-n in the slots or read from IDX, and
    keep no stack frame; so do the scores, top-n and combine kernels and the cache's step
    kernels (the append, the token's write, phi's MLP with the write). The CPU interpreter does
    not type-check: a paged attend kernel whose two branches gave the key rows different integer
    types ran there and failed to compile on GPUs."""
    # the paper geometry with its 4 kv heads (they enter the address arithmetic)
    # with their programmatic-dependent-launch waits and signals (decode.PDL), as on Hopper
    dims = dict(HQ=64, G=16, HP=16, DK=192, DV=128, BK0=128, BK1=64, BV=128, PREC="tf32", UPCAST=False, NQ=1,
                PDL=True)

    def spec(kernel, **const):
        names = getattr(D, kernel).arg_names  # the shared dims that this kernel takes
        return dict(module="nsa.triton.decode", kernel=kernel, types=DECODE_TYPES,
                    constexprs={k: v for k, v in {**dims, **const}.items() if k in names}, num_warps=4, num_stages=2)

    specs = {f"attend-paged{int(p)}-win{int(w)}-slots{int(sl)}-spp{spp}":
             spec("_decode_attend", N_SEL=16, NW=8, WINDOW=512, SEL_L=64, BS=64, NP=16, NSELP=64 if sl else 0,
                  PAGED=p, PAGED_WIN=w, PS=64, SPP=spp)
             for p, w, sl, spp in [(False, False, True, 1), (True, False, True, 1), (True, True, False, 1),
                                   (False, False, False, 4), (True, False, False, 4), (True, True, False, 4)]}
    # one new token, and four sharing the key tiles (64 rows; autotuned over 4 and 8 warps)
    specs.update({f"cmp-paged{int(p)}-qt{qt}": spec("_decode_cmp", L_CMP=32, D_CMP=16, BN=64, PAGED=p, CPP=4,
                                                    NQ=qt, QT=qt)
                  for p in (False, True) for qt in (1, 4)})
    # pages of 1,024 tokens: a 64-row cmp tile in one page (one table entry a tile)
    specs["cmp-paged1-qt1-cpp64"] = spec("_decode_cmp", L_CMP=32, D_CMP=16, BN=64, PAGED=True, CPP=64, NQ=1, QT=1)
    for w in (4, 8):
        specs[f"cmp-qt4-warps{w}"] = dict(specs["cmp-paged0-qt4"], num_warps=w, num_stages=3)
    for bj in (64, 16):  # 16 blocks a program at batch 1
        specs[f"scores-bj{bj}"] = spec("_decode_scores", NSP=128, BJ=bj, L_CMP=32, D_CMP=16, SEL_L=64, RP=4)
    # l'/d = 3: the gather path
    specs["scores-r3"] = spec("_decode_scores", NSP=128, BJ=64, L_CMP=16, D_CMP=4, SEL_L=12, RP=4)
    specs["top_n"] = spec("_decode_top_n", N_SEL=16, NP=16, NSELP=1024)
    specs["combine"] = spec("_decode_combine", N_SEL=16, NW=8, NSP=128, NS2=16, NW2=8)
    specs["combine-bv32"] = spec("_decode_combine", N_SEL=16, NW=8, NSP=128, NS2=16, NW2=8, BV=32)
    # the cache append of a layer's step (nsa.triton.append), separate and shared k/v, contiguous
    # and paged (pages of 64), bf16
    paging = dict(POS="*i64", BT="*i32", SLOT="*i64", MAXP="i32", NPAGES="i32")
    for nbr in (3, 1):
        for ps in (0, 64):
            specs[f"append-branches{nbr}-pages{ps}"] = dict(
                module="nsa.triton.append", kernel="_decode_append",
                types=dict(paging, ROPE="*fp32", CAP="i32", RING="i32"), num_warps=4, num_stages=1,
                constexprs=dict(HQ=64, H=4, DK=192, DV=128, NBR=nbr, L=32, HP=16, BL=32, BDK=256, BDV=128, PS=ps,
                                EMU_K=False, EMU_C=False))
    for ps in (0, 64):
        specs[f"write-cmp-pages{ps}"] = dict(module="nsa.triton.append", kernel="_decode_write_cmp",
                                            types=dict(paging, TC="i32"), num_warps=1, num_stages=1,
                                            constexprs=dict(H=4, DK=192, DV=128, L=32, D=16, BDK=256, BDV=128, PS=ps))
    # phi (the compressor's MLP) and the compressed token's write, paged, at the paper's dims and
    # the small preset's (hidden = head dim)
    from nsa.triton.append import compress_chunk
    for dk, dv in ((192, 128), (64, 64)):
        specs[f"compress-write-d{dk}"] = dict(
            module="nsa.triton.append", kernel="_decode_compress_write", types=dict(paging, TC="i32"), num_warps=4,
            num_stages=1, constexprs=dict(H=4, DK=dk, DV=dv, L=32, D=16, HIDK=dk, HIDV=dv, BDK=C.next_pow2(dk),
                                          BDV=dv, BL=32, BHK=C.next_pow2(dk), BHV=dv, BF=compress_chunk(dk, dv),
                                          MLP=True, EMU_L=False, EMU_C=False, PS=64 * 16))
    with ThreadPoolExecutor(2) as pool:
        res = dict(zip(specs, pool.map(lambda s: compile_sm90(s, triton_path=gpu_triton), specs.values())))
    assert not {name: r for name, r in res.items() if r["stack"]}, res
    assert all(r["regs"] > 0 for r in res.values()), res


SELECT_TYPES = dict(LSE="*fp32", OUT="*i64", TBL="*i32", SEQ="*i64", TUNE_T="i32", sm_scale="fp32", q_offset="i32",
                    KD0="tensordesc<bf16[64, 128]>", KD1="tensordesc<bf16[64, 64]>")


@pytest.mark.slow
def test_select_tiles_do_not_spill(gpu_triton):
    """The selection kernel at the paper geometry with 16 heads a group (fp32 Eq. 9 mapping) and
    one head a group (the mapping as bf16 tensor-core dots), at every num_warps its autotuner
    keeps after pruning (2 stages, the tuned choice at 64k), its chunks of compressed keys through
    tensor descriptors (bf16 on Hopper) and through pointers: no stack frame."""
    from triton import Config

    from nsa.triton import select as S

    specs = {}
    for h in (16, 1):
        cfg = S._config(h, 16, 32, 16, 64, False)
        assert cfg["EQ9_DOT"] == (h == 1)
        tiles = {k: v for k, v in cfg.items() if k not in ("num_warps", "num_stages")}
        const = dict(HQ=4 * h, G=h, DK=192, CMP_L=32, CMP_D=16, SEL_L=64, N_SEL=16, BK0=128, BK1=64, PREC="tf32",
                     INTERP=False, UPCAST=False, **tiles)
        kept = S._prune([Config({}, num_warps=w, num_stages=2) for w in (4, 8)], {}, G=h, **tiles)
        for c in kept:
            for tma in (True, False):
                specs[f"h{h}-warps{c.num_warps}-tma{int(tma)}"] = dict(
                    module="nsa.triton.select", kernel="_select_fwd", types=SELECT_TYPES,
                    constexprs=dict(const, TMA=tma), num_warps=c.num_warps, num_stages=2)
    # small groups: 8 warps only; 64-row tiles: 4
    assert {n.rsplit("-", 1)[0] for n in specs} == {"h16-warps4", "h1-warps8"}
    with ThreadPoolExecutor(2) as pool:
        res = dict(zip(specs, pool.map(lambda s: compile_sm90(s, triton_path=gpu_triton), specs.values())))
    assert not {name: r for name, r in res.items() if r["stack"]}, res
    assert all(r["regs"] > 0 for r in res.values()), res
