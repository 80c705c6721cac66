"""Triton kernels against the PyTorch reference (semantics §2-8).

Without CUDA the kernels run on the CPU under TRITON_INTERPRET=1 at small shapes (CI); on a
GPU the same cases run for real, plus larger ones and T = 64k / 128k (marked gpu).

Tolerances:
* fp32: max abs error <= 1e-4 * max(1, max |ref|) (the issue's 1e-4 relative). Both sides
  accumulate in fp32 with a different order; observed errors are ~1e-6. Kernels use IEEE fp32
  dots for fp32 inputs (tf32 would be ~3e-4).
* bf16/fp16: relative Frobenius error against an fp64 answer within 2x of the reference's own
  error in that dtype, plus 1e-3 of slack for the rows that select differently at near-ties.
  Under the CPU interpreter 3x for bf16: its fp32 -> bf16 cast truncates instead of rounding
  to nearest (measured: twice the rounding error), which GPUs do not.
* selection: indices identical, except rows whose differing blocks have fp64 scores within
  1e-5 (relative) of each other: near-ties that fp32 summation order may flip.
"""

from __future__ import annotations

import dataclasses
import importlib
import os
import sys

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"  # before any kernel module is imported
    for _m in [m for m in sys.modules if m.startswith("nsa.triton")]:
        del sys.modules[_m]  # kernels built without the interpreter elsewhere: rebuild them

triton = pytest.importorskip("triton")
import triton.language as tl  # noqa: E402

import nsa  # noqa: E402
from nsa import geometry as G  # noqa: E402
from nsa import reference as R  # noqa: E402
from nsa.triton import (compressed_attention_triton, nsa_triton, select_blocks_triton,  # noqa: E402
                        selected_attention_triton, sliding_window_triton)
from nsa.triton import select as S  # noqa: E402
from conftest import Launches, nan_fenced, shared_tile_lists, tiles_taken, to_pages  # noqa: E402

CUDA = torch.cuda.is_available()
DEV = "cuda" if CUDA else "cpu"
gpu = pytest.mark.skipif(not CUDA, reason="needs a CUDA device")


def _close(a, b, tol=1e-4):
    assert not torch.isnan(a).any(), "NaN in the Triton output"
    err = (a.double() - b.double()).abs().max().item() if a.numel() else 0.0
    assert err <= tol * max(1.0, b.double().abs().max().item() if b.numel() else 1.0), err


def _check_low_precision(op, ref, args, kw):
    """op(*args, backend="triton") in the inputs' 16-bit dtype: error against ref in fp64 within 2x of
    ref's own error in that dtype (3x for bf16 under the interpreter; see the module doc), no NaN."""
    dtype = args[0].dtype
    exact = ref(*[None if a is None else a.double() for a in args], **kw)
    rel = lambda o: ((o.double() - exact).norm() / exact.norm()).item()  # noqa: E731
    got = op(*args, backend="triton", **kw)
    assert got.dtype == dtype and not torch.isnan(got).any()
    factor = 3 if (not CUDA and dtype == torch.bfloat16) else 2
    assert rel(got) <= factor * rel(ref(*args, **kw)) + 1e-3


def _inputs(T, HQ, H, Dk, Dv, l=8, d=4, cu=None, dtype=torch.float32, seed=0, B=1):
    g = torch.Generator().manual_seed(seed)
    mk = lambda *s: torch.randn(*s, generator=g).to(dtype).to(DEV)  # noqa: E731
    q, k, v = mk(B, T, HQ, Dk), mk(B, T, H, Dk), mk(B, T, H, Dv)
    if cu is None:
        kc, vc = R.compress_mean(k, l, d), R.compress_mean(v, l, d)
    else:
        spans = list(zip(cu[:-1], cu[1:]))
        kc = torch.cat([R.compress_mean(k[:, s:e], l, d) for s, e in spans], 1)
        vc = torch.cat([R.compress_mean(v[:, s:e], l, d) for s, e in spans], 1)
    gates = torch.rand(B, T, HQ, 3, generator=g).to(dtype).to(DEV)
    cu_t = None if cu is None else torch.tensor(cu, dtype=torch.int32, device=DEV)
    return q, k, v, kc, vc, gates, cu_t


def _scores64(q, kc, l, d, lp, q_offset=0):
    """fp64 group scores [B, T, H, n_sel] of semantics §3 (no forced/eligible rules)."""
    B, T, HQ, Dk = q.shape
    H = kc.shape[2]
    t = torch.arange(T, device=q.device) + q_offset
    p, _ = R._cmp_probs(R._split_heads(q, H).double(), kc.double(), t, l, d, Dk ** -0.5)
    W = G.overlap_weights(kc.shape[1], G.num_sel_blocks(q_offset + T, lp), l, d, lp,
                          device=q.device, dtype=torch.float64)
    return torch.einsum("bhgcs,sj->bchj", p, W)


def _varlen_scores64(q, kc, l, d, lp, cu):
    """_scores64 per sequence of ``cu`` (a list, or None: one sequence a batch row), padded to the
    longest sequence's block count."""
    if cu is None:
        return _scores64(q, kc, l, d, lp)
    parts, c0 = [], 0
    nmax = G.num_sel_blocks(max(b - a for a, b in zip(cu[:-1], cu[1:])), lp)
    for a, b in zip(cu[:-1], cu[1:]):
        tc = G.num_cmp_blocks(b - a, l, d)
        s = _scores64(q[:, a:b], kc[:, c0:c0 + tc], l, d, lp)
        parts.append(torch.nn.functional.pad(s, (0, nmax - s.shape[-1])))
        c0 += tc
    return torch.cat(parts, 1)


def _check_selection(got, ref, scores, tol=1e-5):
    """Identical, except near-tie swaps: every differing block's score is within tol of the
    score of a block the other side took instead."""
    assert got.shape == ref.shape and got.dtype == torch.int64
    bad = (got != ref).any(-1).nonzero().tolist()
    for b, t, h in bad:
        a = set(got[b, t, h].tolist()) - {-1}
        r = set(ref[b, t, h].tolist()) - {-1}
        assert len(a) == len(r), (t, h, a, r)
        s = scores[b, t, h]
        only_a = torch.tensor(sorted(a - r), device=s.device)
        only_r = torch.tensor(sorted(r - a), device=s.device)
        gap = (s[only_a].min() - s[only_r].max()).abs().item()
        assert gap <= tol * max(1.0, s.abs().max().item()), (t, h, a, r, gap)
    assert len(bad) <= max(2, got.shape[1] * got.shape[2] // 100), f"{len(bad)} rows differ"


# ------------------------------------------------------------------------------ cases
# (T, HQ, H, Dk, Dv, l, d, l', n, w, cu_seqlens)
CASES = [
    pytest.param(61, 2, 2, 32, 32, 8, 4, 16, 3, 16, None, id="mha-oddT"),
    pytest.param(77, 4, 2, 48, 32, 8, 4, 16, 4, 20, None, id="gqa2-DkneDv-oddDk"),
    pytest.param(50, 8, 2, 32, 64, 16, 8, 16, 3, 9, None, id="gqa4-DvgtDk"),
    pytest.param(45, 16, 1, 192, 128, 16, 8, 32, 3, 24, None, id="gqa16-paperdims"),
    pytest.param(70, 6, 2, 32, 32, 8, 8, 8, 5, 13, None, id="gqa3-l=d=l'"),
    pytest.param(80, 4, 2, 32, 48, 8, 4, 16, 4, 16, [0, 13, 14, 50, 80], id="varlen"),
    pytest.param(6, 2, 1, 32, 32, 8, 4, 16, 3, 4, None, id="T-lt-l"),
    pytest.param(90, 16, 1, 40, 24, 8, 4, 8, 4, 12, [0, 7, 8, 90], id="gqa16-varlen-lp8-oddD"),
]


# the band kernels (cmp, win) run key tiles that every row sees without masks: these cases
# have such tiles (windows and compressed streams longer than a few 32-key tiles)
BAND_CASES = CASES + [
    pytest.param(400, 4, 2, 32, 32, 8, 4, 16, 4, 100, None, id="long-unmasked-tiles"),
    pytest.param(300, 2, 1, 48, 32, 8, 2, 16, 4, 70, [0, 130, 131, 300], id="varlen-unmasked-tiles"),
]


@pytest.mark.parametrize("T,HQ,H,Dk,Dv,l,d,lp,n,w,cu", BAND_CASES)
def test_compressed(T, HQ, H, Dk, Dv, l, d, lp, n, w, cu):
    q, k, v, kc, vc, _, cu_t = _inputs(T, HQ, H, Dk, Dv, l, d, cu)
    o, lse = compressed_attention_triton(q, kc, vc, cmp_block=l, cmp_stride=d, cu_seqlens=cu_t)
    o_r, lse_r = R.compressed_attention_ref(q, kc, vc, cmp_block=l, cmp_stride=d, cu_seqlens=cu_t)
    _close(o, o_r)
    assert torch.equal(torch.isinf(lse), torch.isinf(lse_r))  # empty rows: -inf, never NaN
    fin = torch.isfinite(lse_r)
    _close(lse[fin], lse_r[fin])
    assert (o[~fin.unsqueeze(-1).expand_as(o)] == 0).all()  # empty rows: exactly 0


@pytest.mark.parametrize("descriptors", [False, True], ids=["pointers", "descriptors"])
@pytest.mark.parametrize("T,HQ,H,Dk,Dv,l,d,lp,n,w,cu", BAND_CASES)
def test_window(T, HQ, H, Dk, Dv, l, d, lp, n, w, cu, descriptors, monkeypatch):
    """The window's key tiles through pointers and, where the head dims allow, through tensor
    descriptors (band.TMA)."""
    monkeypatch.setitem(sliding_window_triton.__globals__["band_attention"].__globals__, "TMA", descriptors)
    q, k, v, _, _, _, cu_t = _inputs(T, HQ, H, Dk, Dv, l, d, cu)
    _close(sliding_window_triton(q, k, v, window=w, cu_seqlens=cu_t),
           R.sliding_window_ref(q, k, v, window=w, cu_seqlens=cu_t))


@pytest.mark.parametrize("descriptors", [False, True], ids=["pointers", "descriptors"])
@pytest.mark.parametrize("T,HQ,H,Dk,Dv,l,d,lp,n,w,cu", CASES)
def test_select(T, HQ, H, Dk, Dv, l, d, lp, n, w, cu, descriptors, monkeypatch):
    """Chunks of compressed keys through pointers and, where the head dims allow, through tensor
    descriptors (select.TMA; the first chunk's rows start before row 0)."""
    monkeypatch.setitem(select_blocks_triton.__globals__, "TMA", descriptors)
    q, k, v, kc, vc, _, cu_t = _inputs(T, HQ, H, Dk, Dv, l, d, cu)
    kw = dict(cmp_block=l, cmp_stride=d, sel_block=lp, sel_count=n, cu_seqlens=cu_t)
    got = nsa.select_blocks(q, kc, backend="triton", **kw)
    _check_selection(got, R.select_blocks_ref(q, kc, **kw), _varlen_scores64(q, kc, l, d, lp, cu))


@pytest.mark.parametrize("Dk,cu", [pytest.param(40, [0, 7, 8, 90], id="D40-varlen"),
                                   pytest.param(80, None, id="D80"),
                                   pytest.param(192, [0, 33, 90], id="D192-varlen")])
def test_select_reads_within_keys(Dk, cu):
    """Inputs fenced by NaN: no load runs past q, the keys or lse. With Dk = 40 (dot chunks
    32 + 16) the second chunk's columns past Dk are masked; unmasked, the last compressed row's
    load ran past the keys and rows took other blocks when the bytes there were NaN (a CI run).
    80 and 192 split exactly (64 + 16, 128 + 64)."""
    q, _, _, kc, _, _, cu_t = _inputs(90, 16, 1, Dk, 24, 8, 4, cu)
    kw = dict(cmp_block=8, cmp_stride=4, sel_block=8, sel_count=4, cu_seqlens=cu_t)
    lse = compressed_attention_triton(q, kc, kc, cmp_block=8, cmp_stride=4, cu_seqlens=cu_t)[1]
    got = select_blocks_triton(nan_fenced(q), nan_fenced(kc), lse=nan_fenced(lse), **kw)
    assert torch.equal(got, select_blocks_triton(q, kc, lse=lse, **kw))
    _check_selection(got, R.select_blocks_ref(q, kc, **kw), _varlen_scores64(q, kc, 8, 4, 8, cu))


@pytest.mark.parametrize("T,HQ,H,Dk,Dv,l,d,lp,n,w,cu", CASES)
def test_selected(T, HQ, H, Dk, Dv, l, d, lp, n, w, cu):
    q, k, v, kc, _, _, cu_t = _inputs(T, HQ, H, Dk, Dv, l, d, cu)
    idx = R.select_blocks_ref(q, kc, cmp_block=l, cmp_stride=d, sel_block=lp, sel_count=n,
                              cu_seqlens=cu_t)
    _close(selected_attention_triton(q, k, v, idx, sel_block=lp, cu_seqlens=cu_t),
           R.selected_attention_ref(q, k, v, idx, sel_block=lp, cu_seqlens=cu_t))


@pytest.mark.parametrize("T,HQ,H,l,d,lp,n", [
    pytest.param(1100, 2, 1, 32, 16, 64, 16, id="paper-geometry-h2-2chunks"),
    pytest.param(1300, 8, 1, 32, 16, 64, 16, id="paper-geometry-h8-2chunks"),
    pytest.param(2100, 4, 1, 32, 16, 64, 16, id="paper-geometry-h4-3chunks"),
    pytest.param(700, 16, 1, 32, 16, 64, 16, id="paper-geometry-h16"),
    pytest.param(520, 4, 4, 8, 4, 16, 6, id="mha-3chunks"),
    pytest.param(700, 8, 2, 8, 8, 8, 5, id="fla-geometry-2chunks"),  # l = d = l': Eq. 9 is the identity
])
@pytest.mark.parametrize("tiles", ["interpreter", "gpu"])
def test_select_many_chunks(T, HQ, H, l, d, lp, n, tiles, monkeypatch):
    """Queries that see more blocks than one chunk of the kernel (15 blocks with the paper
    geometry, 64 with l = d = l'): the running top-n is merged across chunks, with the
    interpreter's tiles (up to 256 positions) and with the GPU's (128 rows of the group's
    heads: 8 to 128 positions)."""
    if tiles == "gpu":
        config = S._config
        monkeypatch.setattr(S, "_config", lambda *a: config(*a[:-1], False))
    q, _, _, kc, _, _, _ = _inputs(T, HQ, H, 32, 32, l, d, seed=T)
    kw = dict(cmp_block=l, cmp_stride=d, sel_block=lp, sel_count=n)
    got = nsa.select_blocks(q, kc, backend="triton", **kw)
    _check_selection(got, R.select_blocks_ref(q, kc, **kw), _scores64(q, kc, l, d, lp))


@pytest.mark.parametrize("HQ,H,q_offset,T", [
    pytest.param(16, 1, 3000, 40, id="h16"),
    pytest.param(4, 1, 2900, 70, id="h4"),
    pytest.param(32, 2, 3001, 9, id="h16-2groups-partial-tile"),
])
@pytest.mark.parametrize("tiles", ["interpreter", "gpu"])
def test_select_interior_chunks(HQ, H, q_offset, T, tiles, monkeypatch):
    """Queries far into a sequence (q_offset): between the first chunk (tokens before 0) and the
    last ones, every chunk is interior (each token complete before every row's position) and
    runs without the visibility mask; the blocks equal the reference's either way, with full
    tiles and with a tile cut by the sequence's end."""
    if tiles == "gpu":
        config = S._config
        monkeypatch.setattr(S, "_config", lambda *a: config(*a[:-1], False))
    l, d, lp, n = 32, 16, 64, 16
    g = torch.Generator().manual_seed(q_offset + T)
    q = torch.randn(1, T, HQ, 32, generator=g).to(DEV)
    kc = R.compress_mean(torch.randn(1, q_offset + T, H, 32, generator=g).to(DEV), l, d)
    kw = dict(cmp_block=l, cmp_stride=d, sel_block=lp, sel_count=n, q_offset=q_offset)
    got = nsa.select_blocks(q, kc, backend="triton", **kw)
    _check_selection(got, R.select_blocks_ref(q, kc, **kw), _scores64(q, kc, l, d, lp, q_offset))


# Compiles _select_fwd for sm_90 (no GPU needed) in a clean process (no interpreter) and prints
# the TTIR's dots.
_SELECT_TTIR_DOTS = r"""
import sys, triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from nsa.triton import select as S
HP, BT, G = (int(a) for a in sys.argv[1:4])
cfg = S._config(G, 16, 32, 16, 64, False)
const = dict(HQ=G, G=G, DK=128, CMP_L=32, CMP_D=16, SEL_L=64, N_SEL=16, HP=HP, BT=BT, BC=cfg["BC"],
             BJ=cfg["BJ"], NB=cfg["NB"], BJE=cfg["BJE"], BK0=128, BK1=0, PREC="tf32", INTERP=False, UPCAST=False,
             EQ9_DOT=cfg["EQ9_DOT"], TMA=False)
sig = dict(Q="*bf16", KC="*bf16", KD0="*bf16", KD1="*bf16", LSE="*fp32", OUT="*i64", TBL="*i32", SEQ="*i64",
           TUNE_T="i32", sm_scale="fp32", q_offset="i32", **{k: "constexpr" for k in const})
names = S._select_fwd.arg_names
src = ASTSource(fn=S._select_fwd, signature=sig, constexprs={(names.index(k),): v for k, v in const.items()})
k = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=dict(num_warps=8, num_stages=2))
print("\n".join(line for line in k.asm["ttir"].splitlines() if "tt.dot" in line))
"""


@pytest.mark.parametrize("HP,BT,G", [
    pytest.param(1, 128, 1, id="h1-128-positions"),
    pytest.param(2, 64, 2, id="h2-64-positions"),
    pytest.param(8, 8, 8, id="h8-8-positions"),
    pytest.param(16, 4, 16, id="h16-4-positions"),
])
def test_select_eq9_mapping_not_tf32(HP, BT, G):
    """The GPU tiles (the launcher's, checked here) compile without a tf32 fp32 dot. From 16
    positions per tile, triton's combine pass rewrote the Eq. 9 mapping sum(pg[:, :, None] * w,
    1) into a tf32 dot (triton <= 3.6, triton-lang/triton#9831): 0.3-2% of rows took a wrong
    block on the H100/H200, while the interpreter, which runs no compiler pass, was exact.
    Compile-only (sm_90 target, no GPU needed); with triton 3.6 this fails on the unfixed kernel."""
    import subprocess
    from triton.backends import backends
    if "nvidia" not in backends:
        pytest.skip("triton without its NVIDIA backend")
    cfg = S._config(G, 16, 32, 16, 64, False)
    assert (cfg["HP"], cfg["BT"]) == (HP, BT)  # the launcher's GPU tiles for this group size
    eq9_dot = cfg["EQ9_DOT"]  # one head a group: the mapping as bf16 dots
    assert eq9_dot == (HP == 1)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    res = subprocess.run([sys.executable, "-c", _SELECT_TTIR_DOTS, str(HP), str(BT), str(G)],
                         capture_output=True, text=True, env=env, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    dots = res.stdout.splitlines()
    f32 = [d for d in dots if "xf32> * tensor<" in d and "xbf16>" not in d]
    assert not any("tf32" in d for d in f32), f32
    # one QK dot per copy of the chunk's body (the masked and the interior chunks' loops)
    bodies = sum(f"tensor<{BT * HP}x128xbf16> * tensor<128x64xbf16>" in d for d in dots)
    assert bodies >= 2, res.stdout
    if eq9_dot:  # the QK dot and the three bf16 pieces times the overlaps, no fp32 dot
        assert not f32 and len(dots) == 4 * bodies, res.stdout
        assert sum(f"tensor<{BT * HP}x64xbf16> * tensor<64x16xbf16>" in d for d in dots) == 3 * bodies, res.stdout
    else:
        assert len(f32) == bodies * (BT >= 16), res.stdout  # the mapping is an explicit dot from 16 positions


@triton.jit
def _sort_kernel(X, Y, R: tl.constexpr, N: tl.constexpr, MERGE: tl.constexpr, DESC: tl.constexpr,
                 NETWORK: tl.constexpr):
    off = tl.arange(0, R)[:, None] * N + tl.arange(0, N)[None, :]
    x = tl.load(X + off)
    if MERGE:
        y = S._bitonic_merge_rows(x, DESC)
    else:
        y = S._sort_rows(x, DESC, NETWORK)
    tl.store(Y + off, y)


@pytest.mark.parametrize("R,N", [(1, 16), (8, 16), (16, 16), (128, 16), (16, 32), (4, 64)],
                         ids=lambda v: str(v))
@pytest.mark.parametrize("desc", [False, True], ids=["asc", "desc"])
@pytest.mark.parametrize("network", [True, False], ids=["network", "tl.sort"])
def test_sort_networks(R, N, desc, network):
    """The selection's sorts (the interpreter's network and tl.sort, used on GPUs) equal
    torch.sort on int64 rows with repeated values; the merge sorts rows made bitonic as the
    kernel makes them."""
    g = torch.Generator().manual_seed(R * N + desc)
    x = torch.randint(-50, 50, (R, N), generator=g, dtype=torch.int64).to(DEV)
    y = torch.empty_like(x)
    _sort_kernel[(1,)](x, y, R=R, N=N, MERGE=False, DESC=desc, NETWORK=network)
    assert torch.equal(y, x.sort(-1, descending=desc).values)
    # max(descending run, ascending run) is bitonic and holds the top N of both
    a = x.sort(-1, descending=True).values
    b = torch.randint(-50, 50, (R, N), generator=g, dtype=torch.int64).to(DEV).sort(-1).values
    _sort_kernel[(1,)](torch.maximum(a, b), y, R=R, N=N, MERGE=True, DESC=desc, NETWORK=network)
    top = torch.cat([a, b], -1).sort(-1, descending=True).values[:, :N]
    assert torch.equal(y, top.sort(-1, descending=desc).values)


@pytest.mark.parametrize("HQ", [pytest.param(2, id="h2-tiles-of-8-positions"),
                                pytest.param(16, id="h16-one-position-clamped-rows")])
def test_selected_arbitrary_lists(HQ):
    """Unsorted lists with -1 holes, blocks shared between neighbours (the tile dedup of h < 16)
    and a partial last block (the clamped rows of one-position tiles)."""
    T = 43  # blocks 0..5 of 8 keys, the last one partial
    q, k, v, *_ = _inputs(T, HQ, 1, 32, 24)
    g = torch.Generator().manual_seed(3)
    rows = []
    for t in range(T):  # the block holding t, then 3 distinct others or -1, shuffled
        others = [b for b in torch.randperm(6, generator=g).tolist() if b != t // 8][:3]
        row = [t // 8] + [b if torch.rand(1, generator=g).item() < 0.7 else -1 for b in others]
        rows.append([row[i] for i in torch.randperm(4, generator=g).tolist()])
    idx = torch.tensor(rows, device=DEV).view(1, T, 1, 4)
    _close(selected_attention_triton(q, k, v, idx, sel_block=8),
           R.selected_attention_ref(q, k, v, idx, sel_block=8))


@pytest.mark.parametrize("HQ,H,cu,off", [pytest.param(16, 1, [0, 150], 0, id="h16"),
                                         pytest.param(32, 2, [0, 37, 38, 90], 0, id="h16-2groups-varlen-cut-tiles"),
                                         pytest.param(32, 1, [0, 61], 90, id="h32-2-positions-a-tile-offset")])
def test_selected_split_launch(HQ, H, cu, off, monkeypatch):
    """At 16-32 heads a group the slc forward runs in two launches (selected.share_split):
    tiles of 64 rows (4 positions at h = 16, 2 at h = 32) that list at most SHARE distinct
    blocks walk them together and are marked in the flags; the second launch does every other
    position on its own. Tiles here either share one list (taken) or list disjoint blocks
    (left), so the flags are known; the output equals the reference either way, and with
    SHARE_FRACTION 1 (everything taken)."""
    SL = selected_attention_triton.__globals__  # its module's, whichever import of it this is
    lp, n = 8, 4
    monkeypatch.setitem(SL, "SPLIT", True)  # off by default (selected.SPLIT)
    bt, share = SL["share_split"](HQ // H, n)
    assert bt == 64 // (HQ // H) and share == int(SL["SHARE_FRACTION"] * bt * n)
    T = cu[-1]
    q, k, v, *_ = _inputs(off + T, HQ, H, 32, 24, seed=T)
    q = q[:, off:]
    groups = [shared_tile_lists(cu, bt, n, 24, seed=HQ + len(cu) + g) for g in range(H)]  # blocks 19-23: past the keys
    idx = torch.tensor([rows for rows, _ in groups], device=DEV).permute(1, 0, 2)[None]  # [1, T, H, n]
    taken = lambda most: [tiles_taken(tiles, most) for _, tiles in groups]  # noqa: E731  [H][T]
    cu_t = torch.tensor(cu, dtype=torch.int32, device=DEV) if len(cu) > 2 else None
    ref = R.selected_attention_ref(q, k, v, idx, sel_block=lp, cu_seqlens=cu_t, q_offset=off)
    assert 0 < sum(map(sum, taken(share))) < T * H  # both launches have work
    lses = []
    kernel = SL["_selected_fwd_tuned"]
    for frac in (SL["SHARE_FRACTION"], 1.0):
        monkeypatch.setitem(SL, "SHARE_FRACTION", frac)
        rec = Launches(kernel, 11)  # FLAGS
        monkeypatch.setitem(SL, "_selected_fwd_tuned", rec)
        o, lse = selected_attention_triton(q, k, v, idx, sel_block=lp, cu_seqlens=cu_t, q_offset=off,
                                           return_lse=True)
        assert [(kw["BT"], kw["SKIP"]) for kw, _ in rec.calls] == [(bt, False), (1, True)]
        assert rec.calls[0][0]["SHARE"] == int(frac * bt * n)
        assert rec.calls[1][1].T.tolist() == taken(int(frac * bt * n))  # flags [rows, H]
        _close(o, ref)
        lses.append(lse)
    fin = torch.isfinite(lses[0])  # the lse the backward reuses, whichever launch wrote it
    assert 0 < fin.sum() < fin.numel()  # rows whose blocks are all holes or past the keys: -inf
    assert torch.equal(torch.isfinite(lses[1]), fin)
    _close(lses[1][fin], lses[0][fin])


@settings(max_examples=12, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
@given(data=st.data())
def test_property_selected_any_lists(data):
    """slc for any group size (tiles of several positions or one, clamped rows), l' not a power
    of two, query offset and block lists: distinct blocks in any order, -1 holes, blocks wholly
    in the future (no visible key: 0, never NaN) or past the last key (ignored), rows of holes
    only."""
    H = data.draw(st.sampled_from([1, 2]), label="H")
    h = data.draw(st.sampled_from([1, 2, 3, 4, 16, 32]), label="h")
    lp = data.draw(st.sampled_from([8, 16, 24]), label="l'")
    T = data.draw(st.integers(1, 50), label="T")
    off = data.draw(st.integers(0, 30), label="q_offset")
    n = data.draw(st.integers(1, 5), label="n")
    Dk, Dv = data.draw(st.sampled_from([(16, 16), (40, 24), (64, 32)]), label="Dk, Dv")
    q, k, v, *_ = _inputs(off + T, h * H, H, Dk, Dv, seed=data.draw(st.integers(0, 99), label="seed"))
    g = torch.Generator().manual_seed(T * 131 + off)
    n_blk = -(-(off + T) // lp)
    idx = torch.stack([torch.randperm(max(n_blk + 3, n), generator=g)[:n] for _ in range(T * H)])
    idx = torch.where(torch.rand(idx.shape, generator=g) < 0.25, -1, idx)
    idx = idx.view(1, T, H, n).to(DEV)
    _close(selected_attention_triton(q[:, off:], k, v, idx, sel_block=lp, q_offset=off),
           R.selected_attention_ref(q[:, off:], k, v, idx, sel_block=lp, q_offset=off))


NSA_CASES = [
    pytest.param(dict(T=53, HQ=4, H=2, Dk=32, Dv=48, l=8, d=4, lp=16, n=3, w=12), id="gqa2"),
    pytest.param(dict(T=40, HQ=16, H=1, Dk=192, Dv=128, l=16, d=8, lp=16, n=3, w=16), id="gqa16-192/128"),
    pytest.param(dict(T=60, HQ=2, H=2, Dk=32, Dv=32, l=8, d=8, lp=8, n=4, w=8, cu=[0, 21, 60]),
                 id="varlen-mha"),
]


@pytest.mark.parametrize("c", NSA_CASES)
@pytest.mark.parametrize("shared", [True, False], ids=["sharedkv", "ownkv"])
def test_nsa_func(c, shared):
    c = dict(c)
    cu = c.pop("cu", None)
    q, k, v, kc, vc, gates, cu_t = _inputs(c["T"], c["HQ"], c["H"], c["Dk"], c["Dv"], c["l"], c["d"], cu)
    if shared:
        kw_, vw_ = k, v
    else:
        kw_, vw_ = torch.randn_like(k), torch.randn_like(v)
    kw = dict(cmp_block=c["l"], cmp_stride=c["d"], sel_block=c["lp"], sel_count=c["n"], window=c["w"],
              cu_seqlens=cu_t)
    args = (q, kc, vc, k, v, kw_, vw_, gates)
    _close(nsa.nsa_func(*args, backend="triton", **kw), R.nsa_ref(*args, **kw))


@pytest.mark.parametrize("c,dtype", [(NSA_CASES[1].values[0], torch.bfloat16), (NSA_CASES[2].values[0], torch.float32)],
                         ids=["bf16-gqa16-192/128", "fp32-varlen"])
def test_window_beside_equals_fused_epilogue(c, dtype, monkeypatch):
    """The window as a pass of its own, mixed by band.gate_mix (nsa.WIN_BESIDE; on a side stream
    on a GPU), gives the fused epilogue's output bit for bit, and for the backward the same o_win
    and lse_win."""
    from nsa.triton import nsa as N
    c = dict(c)
    cu = c.pop("cu", None)
    q, k, v, kc, vc, gates, cu_t = _inputs(c["T"], c["HQ"], c["H"], c["Dk"], c["Dv"], c["l"], c["d"], cu, dtype)
    args = (q, kc, vc, k, v, k.flip(1), v.flip(1), gates)
    kw = dict(cmp_block=c["l"], cmp_stride=c["d"], sel_block=c["lp"], sel_count=c["n"], window=c["w"], scale=None,
              cu_seqlens=cu_t, q_offset=0, win_k_offset=0, aux=True, save_win=True)
    outs = {}
    for beside in (False, True):
        monkeypatch.setattr(N, "WIN_BESIDE", beside)
        o, saved = N._nsa_forward(*args, **kw)
        outs[beside] = (o, saved[5], saved[6])
        assert torch.equal(N._nsa_forward(*args, **dict(kw, aux=False)), o)
    for a, b in zip(outs[False], outs[True]):
        assert torch.equal(a, b)
    _close(outs[True][0].float(), R.nsa_ref(*args, **{k_: kw[k_] for k_ in list(kw)[:5]}, cu_seqlens=cu_t).float(),
           tol=2e-2 if dtype == torch.bfloat16 else 1e-4)


def test_launch_tables_follow_the_packing():
    """The launchers cache their per-sequence tables (building one copies host -> device and
    waits for the stream): two packings of the same total length, one after the other, must
    each get their own table and the reference's output."""
    for cu in ([0, 30, 64], [0, 9, 64], [0, 9, 10, 64]):
        q, k, v, kc, vc, gates, cu_t = _inputs(64, 4, 2, 32, 32, 8, 4, cu)
        kw = dict(cmp_block=8, cmp_stride=4, sel_block=16, sel_count=3, window=12, cu_seqlens=cu_t)
        _close(nsa.nsa_func(q, kc, vc, k, v, k, v, gates, backend="triton", **kw),
               R.nsa_ref(q, kc, vc, k, v, k, v, gates, **kw))


def test_nsa_offsets_continue_a_sequence():
    """q_offset / win_k_offset (the KV cache's chunks) equal the rows of one full call."""
    T, off, w = 70, 45, 16
    q, k, v, kc, vc, gates, _ = _inputs(T, 4, 2, 32, 32, 8, 4)
    kw = dict(cmp_block=8, cmp_stride=4, sel_block=16, sel_count=4, window=w)
    full = R.nsa_ref(q, kc, vc, k, v, k, v, gates, **kw)
    w0 = off - (w - 1)
    got = nsa_triton(q[:, off:], kc, vc, k, v, k[:, w0:], v[:, w0:], gates[:, off:], q_offset=off,
                     win_k_offset=w0, **kw)
    _close(got, full[:, off:])


@pytest.mark.parametrize("seed,B,T,sel_count,bounds", [
    pytest.param(0, 1, 30, 3, (0, 11, 12, 30), id="chunked-prefill"),
    pytest.param(1, 2, 40, 4, (0, 29, *range(30, 41)), id="decode-steps"),
    pytest.param(2, 2, 40, 4, (0, 17, 19, 24, 25, 33, 40), id="few-token-chunks"),
])
def test_layer_cache_triton(seed, B, T, sel_count, bounds):
    """The layer's cache path equals one full call: chunks run nsa_triton with offsets, one-token
    steps nsa_decode on the cache's ring, chunks of 2-8 tokens nsa_decode on the window rolled
    into a ring."""
    torch.manual_seed(seed)
    cfg = nsa.NSAConfig(d_model=32, n_heads=4, n_kv_heads=2, head_dim=16, v_head_dim=16, cmp_block=8,
                        cmp_stride=4, sel_block=8, sel_count=sel_count, window=8, compress="mean",
                        backend="triton")
    layer = nsa.NSAAttention(cfg).to(DEV)
    x = torch.randn(B, T, 32, device=DEV)
    with torch.no_grad():
        full = layer(x)
        cache = layer.new_cache(B, T)
        parts = [layer(x[:, a:b], cache=cache) for a, b in zip(bounds[:-1], bounds[1:])]
    _close(torch.cat(parts, 1), full, 1e-5)


@pytest.mark.parametrize("shared_kv", [False, True], ids=["separate-kv", "shared-kv"])
def test_layer_decode_steps_keep_one_launch_plan(shared_kv):
    """The layer's eager one-token steps pass nsa_decode the whole cache buffers and a length
    bound that moves once per DECODE_BUCKET tokens: one launch plan serves token after token
    (on a GPU its kept kernels are relaunched), not a new one per token."""
    from nsa.triton import decode as D

    torch.manual_seed(4)
    cfg = nsa.NSAConfig(d_model=32, n_heads=4, n_kv_heads=2, head_dim=16, v_head_dim=16, cmp_block=8,
                        cmp_stride=4, sel_block=8, sel_count=3, window=8, compress="mean", shared_kv=shared_kv,
                        backend="triton")
    layer = nsa.NSAAttention(cfg).to(DEV)
    x = torch.randn(1, 26, 32, device=DEV)
    with torch.no_grad():
        full = layer(x)
        cache = layer.new_cache(1, 40)
        parts = [layer(x[:, :20], cache=cache)]
        D._plan.cache_clear()
        parts += [layer(x[:, t:t + 1], cache=cache) for t in range(20, 26)]
    info = D._plan.cache_info()
    assert (info.misses, info.hits) == (1, 5)
    _close(torch.cat(parts, 1), full, 1e-5)


# (HQ, H, Dk, Dv, l, w, layer dtype, cache dtype, shared k/v)
APPEND_CASES = [
    pytest.param(6, 2, 40, 24, 8, 12, torch.float32, torch.float32, False, id="gqa3-oddD-separate"),
    pytest.param(6, 2, 40, 24, 8, 12, torch.float32, torch.float32, True, id="gqa3-oddD-shared"),
    pytest.param(16, 1, 64, 32, 16, 20, torch.bfloat16, torch.bfloat16, False, id="gqa16-bf16-separate"),
    pytest.param(4, 4, 32, 32, 4, 6, torch.float32, torch.bfloat16, False, id="mha-fp32-layer-bf16-cache"),
    pytest.param(8, 2, 192, 128, 32, 40, torch.bfloat16, torch.bfloat16, True, id="paper-dims-shared"),
]


@pytest.mark.parametrize("HQ,H,Dk,Dv,l,w,dtype,cache_dtype,shared", APPEND_CASES)
def test_decode_append_equals_reference(HQ, H, Dk, Dv, l, w, dtype, cache_dtype, shared):
    """One launch rotating q and the new keys and writing the cache (selection rows, the window's
    ring, the raw tail moved up) equals its reference: the rotated q, the raw blocks and every
    buffer, over steps at positions 0, l - 2, a ring wrap and far ones, sequences at different
    positions in one batch. So does the write of the step's compressed tokens (d = l / 2: rows
    only where a position completes a block, l - 1 among them)."""
    from nsa.cache import decode_append_ref, write_cmp_step_ref
    from nsa.rope import rope_table
    from nsa.triton.append import decode_append_triton, write_cmp_step_triton

    B, cap, n = 3, 2 * w + 8, 1 if shared else 3
    g = torch.Generator().manual_seed(HQ + Dk + l)
    mk = lambda *sh, dt=cache_dtype: torch.randn(*sh, generator=g).to(dt).to(DEV)  # noqa: E731
    bufs = [mk(B, cap, H, Dk), mk(B, cap, H, Dv)]
    bufs += [None] * 4 if shared else [mk(B, w, H, Dk), mk(B, w, H, Dv), mk(B, l - 1, H, Dk), mk(B, l - 1, H, Dv)]
    ref_bufs = [None if t is None else t.clone() for t in bufs]
    rope = rope_table(cap, Dk, 1e4, torch.device(DEV), torch.float32)
    n_due = 0
    for pos in ([0, l - 2, w], [1, w + 3, cap - 1], [l - 1, 2 * w + 1, 5]):
        qp, kvp = mk(B, 1, HQ * Dk, dt=dtype), mk(B, 1, n * H * (Dk + Dv), dt=dtype)
        s = torch.tensor(pos, device=DEV)
        got = decode_append_triton(qp, kvp, s, rope, *bufs, n_heads=HQ, cmp_block=l)
        want = decode_append_ref(qp, kvp, s, rope, *ref_bufs, n_heads=HQ, cmp_block=l)
        for a, b in zip([*got, *bufs], [*want, *ref_bufs]):
            if b is not None:
                # PyTorch's tolerances for the dtype: a GPU may fuse the rotation's products
                # into one FMA, which moves a bf16 result by at most one unit in the last place
                torch.testing.assert_close(a, b)
        assert not torch.equal(got[0], qp.view_as(got[0]))  # q did rotate
        cmp = [mk(B, G.num_cmp_blocks(cap, l, l // 2), H, D) for D in (Dk, Dv)]
        ref_cmp = [t.clone() for t in cmp]
        tok = [mk(B, H, D) for D in (Dk, Dv)]
        write_cmp_step_triton(s, *tok, *cmp, cmp_block=l, cmp_stride=l // 2)
        write_cmp_step_ref(s, *tok, *ref_cmp, cmp_block=l, cmp_stride=l // 2)
        assert all(torch.equal(a, b) for a, b in zip(cmp, ref_cmp))
        due = [(b, (p + 1 - l) // (l // 2)) for b, p in enumerate(pos) if p + 1 >= l and (p + 1 - l) % (l // 2) == 0]
        assert all(torch.equal(cmp[0][b, i], tok[0][b]) for b, i in due)
        n_due += len(due)
    assert n_due  # position l - 1 completes block 0


@pytest.mark.parametrize("shared", [False, True], ids=["separate", "shared"])
def test_decode_append_paged_equals_reference(shared):
    """The append and the compressed token's write through a block table (page pools in a random
    order, the rings and tails of slots in another order than the batch's) equal their
    references, over positions on several pages, at a page's start and end."""
    from nsa.cache import decode_append_ref, write_cmp_step_ref
    from nsa.rope import rope_table
    from nsa.triton.append import decode_append_triton, write_cmp_step_triton

    HQ, H, Dk, Dv, l, d, w, ps, cap = 6, 2, 40, 24, 8, 4, 12, 16, 64
    B, n = 3, 1 if shared else 3
    g = torch.Generator().manual_seed(11)
    mk = lambda *sh: torch.randn(*sh, generator=g).to(DEV)  # noqa: E731
    P = cap // ps
    table = torch.randperm(B * P + 2, generator=g)[:B * P].view(B, P).to(torch.int32).to(DEV)
    slots = torch.tensor([2, 0, 1], device=DEV)
    pools = [mk(B * P + 2, ps, H, Dk), mk(B * P + 2, ps, H, Dv)]
    pools += [None] * 4 if shared else [mk(B, w + 7, H, Dk), mk(B, w + 7, H, Dv), mk(B, l - 1, H, Dk), mk(B, l - 1, H, Dv)]
    cmp = [mk(B * P + 2, ps // d, H, Dk), mk(B * P + 2, ps // d, H, Dv)]
    ref = [None if t is None else t.clone() for t in pools + cmp]
    rope = rope_table(cap, Dk, 1e4, torch.device(DEV), torch.float32)
    paging = dict(block_table=table, slots=slots)
    for pos in ([0, 15, 16], [7, 31, 47], [11, 62, 63]):
        qp, kvp = mk(B, 1, HQ * Dk), mk(B, 1, n * H * (Dk + Dv))
        s = torch.tensor(pos, device=DEV)
        got = decode_append_triton(qp, kvp, s, rope, *pools, n_heads=HQ, cmp_block=l, **paging)
        want = decode_append_ref(qp, kvp, s, rope, *ref[:6], n_heads=HQ, cmp_block=l, **paging)
        tok = [mk(B, H, D) for D in (Dk, Dv)]
        write_cmp_step_triton(s, *tok, *cmp, cmp_block=l, cmp_stride=d, **paging)
        write_cmp_step_ref(s, *tok, *ref[6:], cmp_block=l, cmp_stride=d, **paging)
        for a, b in zip([*got, *pools, *cmp], [*want, *ref]):
            if b is not None:
                torch.testing.assert_close(a, b)


@pytest.mark.parametrize("Dk,Dv,l,hidden,dtype,cache_dtype,mlp,paged", [
    pytest.param(16, 8, 8, 16, torch.float32, torch.float32, True, False, id="fp32-mlp"),
    pytest.param(64, 64, 32, 64, torch.bfloat16, torch.bfloat16, True, False, id="bf16-mlp-small-preset"),
    pytest.param(40, 24, 8, 12, torch.bfloat16, torch.float32, True, True, id="bf16-fp32cache-mlp-paged"),
    pytest.param(192, 128, 16, 48, torch.float16, torch.float16, True, False, id="fp16-mlp-192/128"),
    pytest.param(32, 16, 8, 0, torch.bfloat16, torch.bfloat16, False, True, id="bf16-mean-paged"),
])
def test_compress_write_step_equals_reference(Dk, Dv, l, hidden, dtype, cache_dtype, mlp, paged):
    """phi of a step's raw blocks (the compressor's MLP, or the mean) and the compressed token's
    write in one launch equal phi in PyTorch (nsa.reference.compress_phi, each op rounding to the
    layer's dtype) and write_cmp_step_ref: rows only where a position completes a block."""
    from nsa.cache import compress_write_step_ref
    from nsa.triton.append import compress_write_step_triton

    B, H, d, ps = 3, 2, l // 2, 2 * l
    g = torch.Generator().manual_seed(Dk + l + hidden)
    mk = lambda *sh, dt=dtype, sc=1.0: (sc * torch.randn(*sh, generator=g)).to(dt).to(DEV)  # noqa: E731
    params = [(mk(l, D, sc=0.3), mk(hidden, l * D, sc=(l * D) ** -0.5), mk(hidden, sc=0.1),
               mk(D, hidden, sc=hidden ** -0.5), mk(D, sc=0.1)) if mlp else None for D in (Dk, Dv)]
    cap = 6 * l
    if paged:
        P = cap // ps
        table = torch.randperm(B * P, generator=g).view(B, P).to(torch.int32).to(DEV)
        paging = dict(block_table=table, slots=torch.tensor([1, 2, 0], device=DEV))
        cmp = [mk(B * P, ps // d, H, D, dt=cache_dtype) for D in (Dk, Dv)]
    else:
        paging = {}
        cmp = [mk(B, G.num_cmp_blocks(cap, l, d), H, D, dt=cache_dtype) for D in (Dk, Dv)]
    ref, init = [t.clone() for t in cmp], [t.clone() for t in cmp]
    eps = 1e-6 if dtype == torch.float32 else torch.finfo(dtype).eps
    n_due = 0
    for pos in ([0, l - 1, l + d - 1], [l - 2, 2 * l + d - 1, 3 * l], [cap - 1, 5 * l - 1, l + 1]):
        s = torch.tensor(pos, device=DEV)
        raw = [mk(B, l, H, D, dt=cache_dtype) for D in (Dk, Dv)]
        compress_write_step_triton(s, *raw, *params, *cmp, cmp_block=l, cmp_stride=d, dtype=dtype, **paging)
        compress_write_step_ref(s, *raw, *params, *ref, cmp_block=l, cmp_stride=d, dtype=dtype, **paging)
        for a, b in zip(cmp, ref):  # sums in another order than PyTorch's: a rounding apart at most
            torch.testing.assert_close(a.float(), b.float(), rtol=2 * eps, atol=eps)
        n_due += sum(p + 1 >= l and (p + 1 - l) % d == 0 for p in pos)
    assert n_due >= 4
    assert not any(torch.equal(a, b) for a, b in zip(cmp, init))  # tokens were written


def _triton_and_torch_layers(shared_kv: bool, seed: int):
    """A small layer on the Triton backend and the same weights on the PyTorch one (the
    compression MLP's last layer, zero at init, made non-zero so that phi is not the mean)."""
    torch.manual_seed(seed)
    cfg = nsa.NSAConfig(d_model=32, n_heads=4, n_kv_heads=2, head_dim=16, v_head_dim=8, cmp_block=8,
                        cmp_stride=4, sel_block=8, sel_count=3, window=8, shared_kv=shared_kv, backend="triton")
    layer = nsa.NSAAttention(cfg).to(DEV)
    torch.nn.init.normal_(layer.phi_k.fc2.weight, std=0.1)
    ref = nsa.NSAAttention(dataclasses.replace(cfg, backend="torch")).to(DEV)
    ref.load_state_dict(layer.state_dict())
    return layer, ref


@pytest.mark.parametrize("shared_kv", [False, True], ids=["separate-kv", "shared-kv"])
def test_layer_decode_step_triton_equals_torch(shared_kv):
    """The layer's decode_step on the Triton backend (the rotation and the cache's writes in one
    launch, then nsa_decode) equals the PyTorch backend's step, and both the full layer, over
    steps that complete compression blocks and wrap the window's ring."""
    layer, ref = _triton_and_torch_layers(shared_kv, seed=7)
    x = torch.randn(2, 30, 32, device=DEV)
    with torch.no_grad():
        full = ref(x)
        caches = [m.new_cache(2, 32) for m in (layer, ref)]
        for m, c in zip((layer, ref), caches):
            m(x[:, :17], cache=c)
        seqlens = [torch.full((2,), 17, device=DEV) for _ in caches]
        for t in range(17, 30):
            y, y_ref = (m.decode_step(x[:, t:t + 1], c, n) for m, c, n in zip((layer, ref), caches, seqlens))
            _close(y, y_ref, 1e-5)
            _close(y[:, 0], full[:, t], 1e-5)
            for n in seqlens:
                n += 1


@pytest.mark.parametrize("shared_kv", [False, True], ids=["separate-kv", "shared-kv"])
def test_layer_paged_decode_step_triton_equals_torch(shared_kv):
    """decode_step on a paged batch (two slots of three, in another order), Triton against PyTorch
    backend, and both against the full layer on each sequence, over steps that complete
    compression blocks and cross pages."""
    layer, ref = _triton_and_torch_layers(shared_kv, seed=9)
    lens, T, n = [13, 6], 32, 10
    x = torch.randn(2, T, 32, device=DEV)
    with torch.no_grad():
        full = ref(x)
        views = []
        for m in (layer, ref):
            cache = m.new_cache(3, T, page_size=8)
            cache.add_sequence()  # slot 0 stays out of the batch
            slots = [cache.add_sequence() for _ in lens][::-1]
            for slot, b in zip(slots, (1, 0)):
                m(x[b:b + 1, :lens[b]], cache=cache.batch([slot]))
            view = cache.batch(slots)
            view.reserve(n)
            views.append(view)
        seqlens = [torch.tensor(lens[::-1], device=DEV) for _ in views]
        rows = torch.tensor([1, 0], device=DEV)
        for _ in range(n):
            t = seqlens[0]
            x_new = x[rows, t][:, None]
            y, y_ref = (m.decode_step(x_new, v, sl) for m, v, sl in zip((layer, ref), views, seqlens))
            _close(y, y_ref, 1e-5)
            _close(y[:, 0], full[rows, t], 1e-5)
            for sl in seqlens:
                sl += 1


# shared k/v (the window read from the pages) runs under the interpreter at the op level
# (MULTI_CASES "sharedkv"); here on a GPU only, for CI's time
@pytest.mark.parametrize("shared_kv", [False, pytest.param(True, marks=gpu)], ids=["separate-kv", "shared-kv"])
def test_layer_paged_cache_triton(shared_kv):
    """The paged cache through the kernels: two sequences of different lengths prefilled into
    slots, then steps of 1 and 3 tokens each through the paged nsa_decode; a third sequence
    joins in the first one's pages after it leaves. Each equals the full layer on it alone."""
    torch.manual_seed(2)
    cfg = nsa.NSAConfig(d_model=32, n_heads=4, n_kv_heads=2, head_dim=16, v_head_dim=16, cmp_block=8,
                        cmp_stride=4, sel_block=8, sel_count=3, window=8, compress="mean",
                        shared_kv=shared_kv, backend="triton")
    layer = nsa.NSAAttention(cfg).to(DEV)
    xs = [torch.randn(1, 30, 32, device=DEV) for _ in range(3)]
    with torch.no_grad():
        full = [layer(x)[0] for x in xs]
        cache = layer.new_cache(2, 30, page_size=8, num_pages=6)
        a, b = cache.add_sequence(), cache.add_sequence()
        ya, yb = [layer(xs[0][:, :17], cache=cache.batch([a]))[0]], [layer(xs[1][:, :9], cache=cache.batch([b]))[0]]
        sa, sb = 17, 9
        for C in (1, 3):
            y = layer(torch.cat([xs[0][:, sa:sa + C], xs[1][:, sb:sb + C]]), cache=cache.batch([a, b]))
            ya.append(y[0])
            yb.append(y[1])
            sa, sb = sa + C, sb + C
        cache.free(a)
        c = cache.add_sequence()
        yc = [layer(xs[2][:, :12], cache=cache.batch([c]))[0]]
        y = layer(torch.cat([xs[2][:, 12:14], xs[1][:, sb:sb + 2]]), cache=cache.batch([c, b]))
        yc.append(y[0])
        yb.append(y[1])
    for got, want in ((ya, full[0]), (yb, full[1]), (yc, full[2])):
        got = torch.cat(got)
        _close(got, want[:got.shape[0]], 1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_nsa_low_precision_error_within_2x_of_torch(dtype):
    c = dict(T=57, HQ=4, H=2, Dk=32, Dv=32, l=8, d=4, lp=16, n=3, w=12)
    q, k, v, kc, vc, gates, _ = _inputs(c["T"], c["HQ"], c["H"], c["Dk"], c["Dv"], 8, 4, dtype=dtype)
    kw = dict(cmp_block=8, cmp_stride=4, sel_block=16, sel_count=3, window=12)
    _check_low_precision(nsa.nsa_func, R.nsa_ref, (q, kc, vc, k, v, k, v, gates), kw)


def test_nsa_gradients_match_reference():
    """backend='triton' is differentiable: its gradients equal the reference's."""
    q, k, v, kc, vc, gates, _ = _inputs(24, 2, 1, 16, 16, 8, 4)
    leaves = [x.clone().requires_grad_() for x in (q, k, v, gates)]
    kw = dict(cmp_block=8, cmp_stride=4, sel_block=8, sel_count=3, window=8)

    def run(backend):
        qq, kk, vv, gg = leaves
        kc_, vc_ = R.compress_mean(kk, 8, 4), R.compress_mean(vv, 8, 4)
        o = nsa.nsa_func(qq, kc_, vc_, kk, vv, kk, vv, gg, backend=backend, **kw)
        return torch.autograd.grad(o.square().sum(), leaves)

    for a, b in zip(run("triton"), run("torch")):
        _close(a, b, 1e-5)


def test_import_error_without_triton(monkeypatch):
    saved = {m: sys.modules[m] for m in list(sys.modules) if m.startswith("nsa.triton")}
    for m in saved:
        monkeypatch.delitem(sys.modules, m)
    monkeypatch.setitem(sys.modules, "triton", None)  # "not installed"
    try:
        with pytest.raises(ImportError):
            importlib.import_module("nsa.triton")
    finally:
        sys.modules.update(saved)
        nsa.triton = saved["nsa.triton"]


# ------------------------------------------------------------------------------ decode
# one new token per sequence against its cache; lens = cache_seqlens (the new token included)
DECODE_CASES = [
    pytest.param(dict(lens=[5, 40], HQ=2, H=2, Dk=32, Dv=32, l=8, d=4, lp=8, n=3, w=16, ring=True),
                 id="mha-a-row-without-cmp"),
    pytest.param(dict(lens=[150], HQ=8, H=2, Dk=192, Dv=128, l=16, d=8, lp=16, n=5, w=32, ring=True),
                 id="gqa4-192/128"),
    pytest.param(dict(lens=[100, 77], HQ=16, H=1, Dk=64, Dv=64, l=8, d=4, lp=16, n=4, w=24, ring=False),
                 id="gqa16-sharedkv"),
    pytest.param(dict(lens=[1, 33, 97], HQ=4, H=2, Dk=48, Dv=32, l=8, d=8, lp=8, n=6, w=8, ring=True),
                 id="gqa2-l=d=l'-len1"),
    pytest.param(dict(lens=[300], HQ=64, H=1, Dk=32, Dv=32, l=8, d=4, lp=16, n=6, w=40, ring=True),
                 id="gqa64-3splits"),
    pytest.param(dict(lens=[50, 21], HQ=8, H=4, Dk=32, Dv=16, l=8, d=4, lp=8, n=4, w=12, ring=True, spare=40),
                 id="gqa2-cache-longer-than-lens"),
    # the paper's l/d/l' ratios over several tiles of the cmp kernel and blocks of the scores
    pytest.param(dict(lens=[1000, 555], HQ=4, H=1, Dk=32, Dv=32, l=32, d=16, lp=64, n=5, w=64, ring=True),
                 id="paper-ratios-tiles"),
    # l' / d = 3 (not a power of two) and l > l': a compressed token reaches into two later blocks
    pytest.param(dict(lens=[200, 131], HQ=8, H=2, Dk=32, Dv=32, l=16, d=4, lp=12, n=6, w=16, ring=True),
                 id="odd-ratios-l>l'"),
]


def _decode_inputs(c, dtype=torch.float32, seed=0, full=True, S=1):
    """(args of nsa_decode, its kwargs, the expected output: each sequence's last S rows of one
    full nsa_ref call, None without ``full``). The window keys go into a ring of w + S - 1 rows
    (position p at p % (w + S - 1)) or, for shared k/v, are k/v themselves."""
    lens, B, n_max = c["lens"], len(c["lens"]), max(c["lens"])
    q, k, v, kc, vc, gates, _ = _inputs(n_max, c["HQ"], c["H"], c["Dk"], c["Dv"], c["l"], c["d"],
                                        dtype=dtype, seed=seed, B=B)
    geo = dict(cmp_block=c["l"], cmp_stride=c["d"], sel_block=c["lp"], sel_count=c["n"], window=c["w"])
    if c["ring"]:
        tw = c["w"] + S - 1
        kw_, vw_ = torch.randn_like(k), torch.randn_like(v)
        ring_k = torch.zeros(B, tw, c["H"], c["Dk"], dtype=dtype, device=DEV)
        ring_v = torch.zeros(B, tw, c["H"], c["Dv"], dtype=dtype, device=DEV)
        for b, n in enumerate(lens):  # what a cache that wrote positions 0..n-1 holds
            p = torch.arange(max(0, n - tw), n, device=DEV)
            ring_k[b, p % tw], ring_v[b, p % tw] = kw_[b, p], vw_[b, p]
    else:
        kw_, vw_, ring_k, ring_v = k, v, k, v
    expect = []
    for b, n in enumerate(lens if full else []):
        tc = G.num_cmp_blocks(n, c["l"], c["d"])
        whole = R.nsa_ref(q[b:b + 1, :n], kc[b:b + 1, :tc], vc[b:b + 1, :tc], k[b:b + 1, :n], v[b:b + 1, :n],
                         kw_[b:b + 1, :n], vw_[b:b + 1, :n], gates[b:b + 1, :n], **geo)
        expect.append(whole[:, n - S:])
    at = torch.tensor(lens, device=DEV)[:, None] - S + torch.arange(S, device=DEV)  # [B, S]
    ar = torch.arange(B, device=DEV)[:, None]
    if c.get("spare"):  # a preallocated cache: rows past the longest sequence hold garbage
        kc, vc, k, v = (torch.cat([x, 1e3 * torch.randn_like(x[:, :c["spare"]])], 1) for x in (kc, vc, k, v))
    args = (q[ar, at], kc, vc, k, v, ring_k, ring_v, gates[ar, at])
    seqlens = torch.tensor(lens, dtype=torch.int32, device=DEV)
    return args, dict(geo, cache_seqlens=seqlens), torch.cat(expect, 0) if full else None


def _paged(args, c, page_size, seed=0):
    """``_decode_inputs``' args with k_cmp/v_cmp/k_slc/v_slc as page pools in a random order, the
    window (shared k/v) read through the table: (args, block_table)."""
    q, kc, vc, k, v, kw, vw, gates = args
    pkc, pvc, pk, pv, table = to_pages(kc, vc, k, v, page_size, c["d"], seed=seed)
    win = (kw, vw) if c["ring"] else (None, None)
    return (q, pkc, pvc, pk, pv, *win, gates), table


@pytest.mark.parametrize("c", DECODE_CASES)
def test_decode_equals_last_row_of_a_full_pass(c):
    """Also with max_seqlen = the cache's capacity (grids sized by it, no host sync): the
    programs past each sequence's length must add nothing."""
    args, kw, expect = _decode_inputs(c)
    _close(nsa.nsa_decode(*args, backend="torch", **kw), expect, 1e-5)
    _close(nsa.nsa_decode(*args, backend="triton", **kw), expect)
    cap = args[3].shape[1]
    cap = max(n for n in range(1, cap + 1) if G.num_cmp_blocks(n, c["l"], c["d"]) <= args[1].shape[1])
    _close(nsa.nsa_decode(*args, backend="triton", max_seqlen=cap, **kw), expect)


@pytest.mark.parametrize("where", ["slots", "kernel", "torch"])
def test_decode_selection_ties_go_to_the_lower_block(where, monkeypatch):
    """Equal block scores (the first 400 keys all the same): the decode's top-n keeps the
    lower blocks, as the reference, wherever it runs (in the attend kernel's slots, in its
    own kernel, or sorted in PyTorch past 4096 blocks)."""
    from nsa.triton import decode as D

    monkeypatch.setattr(D, "_top_n_where", lambda *a: where)
    D._plan.cache_clear()  # the launch plans hold where the top-n runs
    seen, kernel = [], D._decode_top_n

    class Recorded:  # the top-n kernel, its launches counted
        def __getitem__(self, grid):
            seen.append(grid)
            return kernel[grid]

    monkeypatch.setattr(D, "_decode_top_n", Recorded())
    g = torch.Generator(device=DEV).manual_seed(3)
    mk = lambda *s: torch.randn(*s, device=DEV, generator=g)  # noqa: E731
    B, T, HQ, H, Dk, Dv = 2, 700, 4, 2, 32, 16
    geo = dict(cmp_block=16, cmp_stride=8, sel_block=16, sel_count=5, window=32)
    q, k, v, gates = mk(B, 1, HQ, Dk), mk(B, T, H, Dk), mk(B, T, H, Dv), torch.rand(B, 1, HQ, 3, device=DEV, generator=g)
    k[:, :400] = k[:, :1]
    kc, vc = R.compress_mean(k, 16, 8), R.compress_mean(v, 16, 8)
    lens = torch.tensor([700, 333], device=DEV)
    args = (q, kc, vc, k, v, k, v, gates)
    expect = R.nsa_decode_ref(*args, cache_seqlens=lens, **geo)
    _close(nsa.nsa_decode(*args, cache_seqlens=lens, backend="triton", **geo), expect, 1e-5)
    assert bool(seen) == (where == "kernel")  # the top-n ran where it was sent
    D._plan.cache_clear()


@pytest.mark.parametrize("i", [1, 2])
def test_decode_combine_in_column_chunks(i, monkeypatch):
    """Where the rows alone would not fill the GPU (a small batch), the combine merges the
    partials in chunks of 32 value columns, a program each: the same step."""
    from nsa.triton import decode as D

    monkeypatch.setattr(D, "_sms", lambda device: 4096)
    D._plan.cache_clear()
    grids, kernel = [], D._decode_combine

    class Recorded:  # the combine kernel, its grids kept
        def __getitem__(self, grid):
            grids.append(grid)
            return kernel[grid]

    monkeypatch.setattr(D, "_decode_combine", Recorded())
    args, kw, expect = _decode_inputs(DECODE_CASES[i].values[0])
    _close(nsa.nsa_decode(*args, backend="triton", **kw), expect)
    assert grids and grids[0][1] == args[2].shape[-1] // 32  # Dv (v_cmp) in chunks of 32
    D._plan.cache_clear()


@pytest.mark.parametrize("spp", [1, 2])
@pytest.mark.parametrize("i", [0, 1, 4, 6])
def test_decode_slots_per_program(i, spp, monkeypatch):
    """The attend kernel's programs take 1, 2 or 4 selected blocks / window chunks each
    (partial slots past a branch's end stay empty; the interpreter's stand-in GPU takes 4):
    the same step, the combine merging fewer partials."""
    from nsa.triton import decode as D

    monkeypatch.setattr(D, "_slots_per_program", lambda *a: spp)
    plan, plans = D._plan, []
    plan.cache_clear()
    monkeypatch.setattr(D, "_plan", lambda *a: plans.append(plan(*a)) or plans[-1])
    c = DECODE_CASES[i].values[0]
    args, kw, expect = _decode_inputs(c)
    _close(nsa.nsa_decode(*args, backend="triton", **kw), expect)
    nw = -(-c["w"] // max(16, c["lp"]))  # window chunks of max(16, l') keys
    assert plans[0].attend[0][0] == -(-c["n"] // spp) + -(-nw // spp)  # the attend grid's programs
    plan.cache_clear()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_decode_low_precision_error_within_2x_of_torch(dtype):
    c = dict(lens=[90, 61], HQ=8, H=2, Dk=32, Dv=32, l=8, d=4, lp=8, n=4, w=16, ring=True)
    args, kw, _ = _decode_inputs(c, dtype, full=False)
    _check_low_precision(nsa.nsa_decode, R.nsa_decode_ref, args, kw)


# several new tokens per step and paged caches: (case, S, page_size); page_size a multiple of d
MULTI_CASES = [
    pytest.param(0, 2, 8, id="mha-S2-p8"),
    pytest.param(1, 5, 16, id="gqa4-192/128-S5-p16"),
    pytest.param(2, 8, 4, id="sharedkv-S8-p4"),
    pytest.param(3, 1, 8, id="len1-S1-p8"),
    pytest.param(5, 3, 12, id="spare-S3-p12"),
    pytest.param(4, 2, 128, id="gqa64-S2-p128"),  # cmp tiles (16 rows here) two to a page
]


def _multi_case(i, S):
    c = dict(DECODE_CASES[i].values[0])
    c["lens"] = [max(n, S) for n in c["lens"]]
    return c


@pytest.mark.parametrize("i,S,ps", MULTI_CASES)
def test_decode_several_tokens_and_paged_equal_a_full_pass(i, S, ps):
    """S new tokens per sequence (each its own selection and window, causal among them) equal
    the last S rows of a full pass, contiguous and paged (pages in a random order, garbage in
    the spare pages), through the reference and the kernels."""
    c = _multi_case(i, S)
    args, kw, expect = _decode_inputs(c, S=S)
    pargs, table = _paged(args, c, ps)
    _close(nsa.nsa_decode(*args, backend="torch", **kw), expect, 1e-5)
    _close(nsa.nsa_decode(*pargs, block_table=table, backend="torch", **kw), expect, 1e-5)
    _close(nsa.nsa_decode(*args, backend="triton", **kw), expect)
    _close(nsa.nsa_decode(*pargs, block_table=table, backend="triton", **kw), expect)
    # the CUDA-graph form (tensor lengths + a bound): grids sized by the table's capacity
    cap = table.shape[1] * ps
    _close(nsa.nsa_decode(*pargs, block_table=table, max_seqlen=cap, backend="triton", **kw), expect)


def test_decode_paged_bad_table_never_reads_outside_the_pool():
    """With the lengths unchecked (max_seqlen given) a table whose entries are out of range is
    clamped into the pool: the kernels read no row outside it and give finite numbers (on a
    GPU, compute-sanitizer checks the addresses: benchmarks/sanitize_decode.py)."""
    c = dict(DECODE_CASES[0].values[0])
    args, kw, _ = _decode_inputs(c)
    pargs, table = _paged(args, c, 8)
    table[0, 0], table[1, -1] = 10 ** 6, -5
    out = nsa.nsa_decode(*pargs, block_table=table, max_seqlen=table.shape[1] * 8, backend="triton", **kw)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("S", [1, 3])
@pytest.mark.parametrize("paged", [False, True], ids=["contiguous", "paged"])
def test_decode_reads_within_its_inputs(paged, S):
    """Every input fenced by NaN (integers by -1): the step reads nothing past any of them, so
    its output is the unfenced one, bit for bit. Odd head dims (40 / 24: masked dot chunks),
    GQA 4, a sequence shorter than a compressed block."""
    c = dict(lens=[6, 75, 43], HQ=8, H=2, Dk=40, Dv=24, l=8, d=4, lp=8, n=4, w=12, ring=True)
    args, kw, _ = _decode_inputs(c, full=False, S=S)
    if paged:
        args, table = _paged(args, c, 16)
        kw = dict(kw, block_table=table)
    want = nsa.nsa_decode(*args, backend="triton", **kw)
    fenced = {k: nan_fenced(x) if isinstance(x, torch.Tensor) else x for k, x in kw.items()}
    got = nsa.nsa_decode(*[nan_fenced(a) for a in args], backend="triton", **fenced)
    assert not torch.isnan(want).any() and torch.equal(got, want)


@pytest.mark.parametrize("dtype", [torch.bfloat16], ids=["bf16"])
def test_decode_paged_several_tokens_low_precision(dtype):
    c = dict(lens=[90, 61], HQ=8, H=2, Dk=32, Dv=32, l=8, d=4, lp=8, n=4, w=16, ring=True)
    args, kw, _ = _decode_inputs(c, dtype, full=False, S=4)
    pargs, table = _paged(args, c, 16)
    kw = dict(kw, block_table=table)
    _check_low_precision(nsa.nsa_decode, R.nsa_decode_ref, pargs, kw)


# ------------------------------------------------------------------------------ GPU only
GPU_CASES = [
    pytest.param(dict(T=4099, HQ=64, H=4, Dk=192, Dv=128), id="paper-4k"),
    pytest.param(dict(T=3001, HQ=8, H=8, Dk=128, Dv=128), id="mha-3k"),
    pytest.param(dict(T=2500, HQ=32, H=2, Dk=64, Dv=256), id="gqa16-Dv256"),
    pytest.param(dict(T=2048, HQ=8, H=1, Dk=256, Dv=32), id="gqa8-Dk256"),
    pytest.param(dict(T=65536, HQ=64, H=4, Dk=192, Dv=128), id="paper-64k"),
    pytest.param(dict(T=131072, HQ=16, H=1, Dk=128, Dv=128), id="gqa16-128k"),
]


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("c", GPU_CASES)
def test_gpu_nsa_bf16_and_selection(c):
    T, HQ, H, Dk, Dv = c["T"], c["HQ"], c["H"], c["Dk"], c["Dv"]
    l, d, lp, n, w = 32, 16, 64, 16, 512
    q, k, v, kc, vc, gates, _ = _inputs(T, HQ, H, Dk, Dv, l, d, dtype=torch.bfloat16)
    kw = dict(cmp_block=l, cmp_stride=d, sel_block=lp, sel_count=n, window=w)
    args = (q, kc, vc, k, v, k, v, gates)
    # fp32 reference of the bf16 inputs stands in for fp64 at these sizes
    exact = R.nsa_ref(*[a.float() for a in args], **kw).double()
    rel = lambda o: ((o.double() - exact).norm() / exact.norm()).item()  # noqa: E731
    if T <= 8192:  # the selection first: a wrong block shows up here, not as a vague output error
        sel = select_blocks_triton(q, kc, cmp_block=l, cmp_stride=d, sel_block=lp, sel_count=n)
        _check_selection(sel, R.select_blocks_ref(q, kc, cmp_block=l, cmp_stride=d, sel_block=lp,
                                                  sel_count=n), _scores64(q, kc, l, d, lp))
    got = nsa.nsa_func(*args, backend="triton", **kw)
    assert not torch.isnan(got).any()
    assert rel(got) <= 2 * rel(R.nsa_ref(*args, **kw)) + 1e-3


@gpu
@pytest.mark.gpu
def test_gpu_int64_addressing():
    """T * HQ * D >= 2^31 elements: offsets must not wrap in int32."""
    T, HQ, H, D = 131072, 128, 2, 128  # 2^31 elements in q
    q, k, v, kc, vc, gates, _ = _inputs(T, HQ, H, D, D, 32, 16, dtype=torch.bfloat16)
    o = sliding_window_triton(q, k, v, window=64)
    rows = torch.tensor([0, T // 2, T - 1], device=DEV)
    ref = R.sliding_window_ref(q[:, -200:], k[:, -263:], v[:, -263:], window=64, q_offset=T - 200,
                               k_offset=T - 263)
    assert (o[:, -200:].float() - ref.float()).abs().max().item() < 2e-2
    assert not torch.isnan(o[:, rows]).any()


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("lens", [[65536, 40001], [4099]], ids=["paper-64k-B2", "paper-4k"])
def test_gpu_decode_bf16(lens):
    """nsa_decode in the paper geometry on the GPU: bf16 error within 2x of the reference's."""
    c = dict(lens=lens, HQ=64, H=4, Dk=192, Dv=128, l=32, d=16, lp=64, n=16, w=512, ring=True)
    args, kw, _ = _decode_inputs(c, torch.bfloat16, full=False)
    _check_low_precision(nsa.nsa_decode, R.nsa_decode_ref, args, kw)


@gpu
@pytest.mark.gpu
def test_gpu_decode_cuda_graph_with_new_lengths():
    """A step captured once with a tensor cache_seqlens and max_seqlen, replayed after new
    lengths are written into that tensor, equals the eager step at those lengths."""
    c = dict(lens=[3000, 1234], HQ=16, H=2, Dk=128, Dv=128, l=32, d=16, lp=64, n=16, w=512, ring=False)
    args, kw, _ = _decode_inputs(c, torch.bfloat16, full=False)
    lens = kw.pop("cache_seqlens")
    step = lambda: nsa.nsa_decode(*args, cache_seqlens=lens, max_seqlen=3000, **kw)  # noqa: E731
    step()  # compile and autotune outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = step()
    for new in ([3000, 1234], [2999, 77], [1, 3000]):
        lens.copy_(torch.tensor(new, dtype=lens.dtype))
        graph.replay()
        eager = nsa.nsa_decode(*args, cache_seqlens=torch.tensor(new, device=DEV), max_seqlen=3000, **kw)
        _close(out, eager, 0)  # same grids, no atomics: bit for bit


@gpu
@pytest.mark.gpu
def test_gpu_decode_relaunch_equals_first_launch():
    """Eager steps after the first launch the kept compiled kernels directly (C.relaunch): on
    new tensors (other addresses, other values) they equal the reference as the first step
    did, and a q that is not 16-byte aligned goes through triton's run and is right too."""
    c = dict(lens=[4097, 640], HQ=64, H=4, Dk=192, Dv=128, l=32, d=16, lp=64, n=16, w=512, ring=True)
    for seed in range(3):
        args, kw, _ = _decode_inputs(c, torch.bfloat16, seed=seed, full=False)
        kw = dict(kw, max_seqlen=4097)
        _check_low_precision(nsa.nsa_decode, R.nsa_decode_ref, args, kw)
    from nsa.triton import decode as D
    assert any(p.compiled for p in _plans(D)), "no step kept its kernels"
    q = args[0]
    q_odd = torch.empty(q.numel() + 1, dtype=q.dtype, device=DEV)[1:].view(q.shape)
    q_odd.copy_(q)
    assert q_odd.data_ptr() % 16  # 2 bytes past a 16-byte boundary
    _check_low_precision(nsa.nsa_decode, R.nsa_decode_ref, (q_odd, *args[1:]), kw)


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("top_n", ["slots", "kernel"])
def test_gpu_decode_dependent_launches_equal_serial(top_n, monkeypatch):
    """The step with kernels 2-5 launched as programmatic dependents (decode.PDL) equals the
    serial step bit for bit, eager and replayed from a CUDA graph, with the top-n found by the
    slot programs (batch 1) and by its own kernel (more slots than the GPU holds four times)."""
    from nsa.triton import decode as D
    if not D._sm90(torch.device(DEV)):
        pytest.skip("programmatic dependent launch needs sm_90")
    lens = [5000] if top_n == "slots" else [5000, 4097, 3001, 640] * 4
    c = dict(lens=lens, HQ=64, H=4, Dk=192, Dv=128, l=32, d=16, lp=64, n=16, w=512, ring=True)
    args, kw, _ = _decode_inputs(c, torch.bfloat16, full=False)
    kw = dict(kw, max_seqlen=max(lens))
    outs = {}
    for pdl in (False, True):
        monkeypatch.setattr(D, "PDL", pdl)
        step = lambda: nsa.nsa_decode(*args, **kw)  # noqa: E731
        eager = step()
        assert D._top_n_where(G.num_sel_blocks(max(lens), 64), len(lens) * 4 * 16, torch.device(DEV)) == top_n
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = step()
        graph.replay()
        outs[pdl] = (eager, out.clone())
    _close(outs[True][0], outs[False][0], 0)
    _close(outs[True][1], outs[False][1], 0)


def _plans(D):
    """The decode plans alive in the launcher's cache (lru_cache keeps no list: walk the GC)."""
    import gc

    return [o for o in gc.get_objects() if isinstance(o, D._Plan)]


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("S", [1, 4, 8])
@pytest.mark.parametrize("ring", [True, False], ids=["ring", "sharedkv"])
def test_gpu_decode_paged_equals_contiguous(S, ring):
    """Paged (page_size 64, pages shuffled) against contiguous at the paper geometry, bf16, with
    S new tokens: the paged step's error within 2x of the reference's (as the contiguous one's),
    and the two steps within bf16 rounding of each other (the autotuner may pick other warps
    for the paged kernels, so not bit for bit)."""
    c = dict(lens=[8191, 3001, 530], HQ=64, H=4, Dk=192, Dv=128, l=32, d=16, lp=64, n=16, w=512, ring=ring)
    args, kw, _ = _decode_inputs(c, torch.bfloat16, full=False, S=S)
    pargs, table = _paged(args, c, 64)
    _check_low_precision(nsa.nsa_decode, R.nsa_decode_ref, pargs, dict(kw, block_table=table))
    n_max = max(c["lens"])  # the contiguous cache holds n_max rows: a larger max_seqlen is refused
    want = nsa.nsa_decode(*args, max_seqlen=n_max, backend="triton", **kw).float()
    got = nsa.nsa_decode(*pargs, block_table=table, max_seqlen=n_max, backend="triton", **kw).float()
    assert ((got - want).norm() / want.norm()).item() < 1e-2


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("shared_kv", [False, True], ids=["separate-kv", "shared-kv"])
def test_gpu_layer_paged_decode_step_cuda_graph(shared_kv):
    """The paged decode step captured once in a CUDA graph and replayed with the lengths advanced
    on the device (pages reserved ahead) equals the full layer on each sequence."""
    torch.manual_seed(3)
    cfg = nsa.NSAConfig(d_model=32, n_heads=4, n_kv_heads=2, head_dim=16, v_head_dim=16, cmp_block=8,
                        cmp_stride=4, sel_block=8, sel_count=3, window=8, compress="mean",
                        shared_kv=shared_kv, backend="triton")
    layer = nsa.NSAAttention(cfg).to(DEV)
    lens, T, n = [17, 9], 48, 12
    x = torch.randn(2, T, 32, device=DEV)
    with torch.no_grad():
        full = layer(x)
        cache = layer.new_cache(2, T, page_size=8)
        slots = [cache.add_sequence() for _ in lens]
        for b, m in zip(slots, lens):
            layer(x[b:b + 1, :m], cache=cache.batch([b]))
        view = cache.batch(slots)
        view.reserve(n + 1)
        rows = torch.arange(2, device=DEV)
        seqlens = torch.tensor(lens, device=DEV)
        x_new = x[rows, seqlens][:, None].clone()
        # an eager first step, which is also the warm-up (compiles); a step is not idempotent
        # (it shifts the raw tail), so the capture starts at the next position
        y0 = layer.decode_step(x_new, view, seqlens)
        assert (y0[:, 0] - full[rows, seqlens]).abs().max().item() <= 1e-4
        seqlens += 1
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            y = layer.decode_step(x_new, view, seqlens)
        for _ in range(n):
            x_new.copy_(x[rows, seqlens][:, None])
            graph.replay()
            assert (y[:, 0] - full[rows, seqlens]).abs().max().item() <= 1e-4, seqlens.tolist()
            seqlens += 1
        view.advance(n + 1)
        assert view.lengths == [m + n + 1 for m in lens]


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("shared_kv", [False, True], ids=["separate-kv", "shared-kv"])
def test_gpu_layer_decode_step_cuda_graph_outlives_the_table_caches(shared_kv):
    """The contiguous cache's step (the append kernels, then nsa_decode) captured once and
    replayed equals the full layer, also after the shared rotation and step tables' lru caches
    have let theirs go and the memory was reused: the cache keeps what its graph reads."""
    from nsa.rope import rope_table

    torch.manual_seed(5)
    cfg = nsa.NSAConfig(d_model=32, n_heads=4, n_kv_heads=2, head_dim=16, v_head_dim=16, cmp_block=8,
                        cmp_stride=4, sel_block=8, sel_count=3, window=8, shared_kv=shared_kv, backend="triton")
    layer = nsa.NSAAttention(cfg).to(DEV)
    T, m, n = 40, 13, 12
    x = torch.randn(2, T, 32, device=DEV)
    with torch.no_grad():
        full = layer(x)
        cache = layer.new_cache(2, T)
        layer(x[:, :m], cache=cache)
        seqlens = torch.full((2,), m, device=DEV)
        x_new = x[:, m:m + 1].clone()
        layer.decode_step(x_new, cache, seqlens)  # warm-up (compiles), not idempotent: capture the next
        seqlens += 1
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            y = layer.decode_step(x_new, cache, seqlens)
        for i in range(8):  # other geometries push this one out of the shared table cache
            rope_table(T + 1 + i, 16, cfg.rope_theta, torch.device(DEV), torch.float32)
        torch.cuda.empty_cache()
        junk = torch.full((1 << 20,), float("nan"), device=DEV)  # noqa: F841 - reuses freed memory
        for _ in range(n):
            t = int(seqlens[0])
            x_new.copy_(x[:, t:t + 1])
            graph.replay()
            assert (y[:, 0] - full[:, t]).abs().max().item() <= 1e-4, t
            seqlens += 1


def test_select_autotuner_keeps_8_warps_for_small_groups():
    """Groups of 1-2 heads time only 8-warp configs (their 4-warp tiles spill on sm_90), the
    64-row tiles of larger groups only 4-warp ones; 128-row tiles keep every config."""
    from triton import Config
    configs = [Config({}, num_warps=w, num_stages=s) for w in (4, 8) for s in (1, 2, 3)]
    for h in (1, 2):
        tiles = S._config(h, 16, 32, 16, 64, False)
        assert [(c.num_warps, c.num_stages) for c in S._prune(configs, {}, G=h, **tiles)] == [(8, 1), (8, 2), (8, 3)]
    for h in (4, 16):  # the paper geometry's 64-row tiles
        tiles = S._config(h, 16, 32, 16, 64, False)
        assert [(c.num_warps, c.num_stages) for c in S._prune(configs, {}, G=h, **tiles)] == [(4, 1), (4, 2), (4, 3)]
    tiles = S._config(16, 16, 64, 64, 64, False)  # fla's geometry: 128 rows
    assert tiles["BT"] * tiles["HP"] == 128 and S._prune(configs, {}, G=16, **tiles) == configs
