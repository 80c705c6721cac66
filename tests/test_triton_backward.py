"""Triton backward kernels (nsa.triton.backward) against torch autograd through the reference.

Without CUDA the kernels run on the CPU under TRITON_INTERPRET=1 at small shapes. Tolerance
(fp32): max abs error <= 1e-4 * max(1, max |ref grad|); observed ~1e-6 (both sides accumulate
in fp32, in a different order; IEEE fp32 dots). The upstream gradient is random, so no
gradient is accidentally zero.
"""

from __future__ import annotations

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

import nsa  # noqa: E402
from nsa import reference as R  # noqa: E402
from conftest import Launches, nan_fenced, shared_tile_lists, tiles_taken  # noqa: E402
from nsa.triton import backward as BW  # noqa: E402
from nsa.triton import compressed_attention_triton, selected_attention_triton  # noqa: E402

CUDA = torch.cuda.is_available()
DEV = "cuda" if CUDA else "cpu"
gpu = pytest.mark.skipif(not CUDA, reason="needs a CUDA device")


def _close(a, b, tol=1e-4):
    assert a.shape == b.shape and a.dtype == b.dtype, (a.shape, b.shape, a.dtype, b.dtype)
    assert not torch.isnan(a).any(), "NaN in the Triton gradient"
    err = (a.double() - b.double()).abs().max().item() if a.numel() else 0.0
    assert err <= tol * max(1.0, b.double().abs().max().item() if b.numel() else 1.0), err


def _inputs(T, HQ, H, Dk, Dv, l, d, cu=None, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    mk = lambda *s: torch.randn(*s, generator=g).to(dtype).to(DEV)  # noqa: E731
    q, k, v = mk(1, T, HQ, Dk), mk(1, T, H, Dk), mk(1, T, H, Dv)
    spans = [(0, T)] if cu is None else list(zip(cu[:-1], cu[1:]))
    kc = torch.cat([R.compress_mean(k[:, s:e], l, d) for s, e in spans], 1)
    vc = torch.cat([R.compress_mean(v[:, s:e], l, d) for s, e in spans], 1)
    do = mk(1, T, HQ, Dv)
    cu_t = None if cu is None else torch.tensor(cu, dtype=torch.int32, device=DEV)
    return q, k, v, kc, vc, do, cu_t


def _ref_grads(fn, args, do):
    leaves = [x.detach().clone().requires_grad_() for x in args]
    o = fn(*leaves)
    o = o[0] if isinstance(o, tuple) else o
    return torch.autograd.grad(o, leaves, do)


# (T, HQ, H, Dk, Dv, l, d, l', n, w, cu_seqlens)
CASES = [
    pytest.param(37, 2, 2, 32, 32, 8, 4, 16, 3, 12, None, id="mha-oddT"),
    pytest.param(45, 4, 2, 48, 32, 8, 4, 16, 3, 12, None, id="gqa2-48/32"),
    pytest.param(33, 8, 2, 32, 48, 8, 8, 8, 4, 9, None, id="gqa4-DvgtDk-l=d=l'"),
    pytest.param(29, 16, 1, 48, 32, 8, 4, 8, 3, 8, None, id="gqa16-48/32"),
    pytest.param(50, 4, 2, 32, 32, 8, 4, 16, 3, 10, [0, 13, 14, 50], id="varlen"),
]
# longer cases for the band backward kernels (cmp, win): several key tiles per query tile and
# several query tiles per key tile, which the short cases above barely reach
BAND_CASES = CASES + [
    pytest.param(300, 4, 2, 32, 32, 8, 2, 16, 3, 70, None, id="long-unmasked-tiles"),
    pytest.param(260, 2, 1, 48, 32, 4, 2, 16, 3, 60, [0, 120, 121, 260], id="varlen-unmasked-tiles"),
    # 3 heads a group: the dk/dv reads its query tiles row by row (padded), not as blocks
    pytest.param(70, 6, 2, 48, 32, 8, 4, 16, 3, 20, [0, 33, 70], id="gqa3-varlen-row-loads"),
]


@pytest.mark.parametrize("T,HQ,H,Dk,Dv,l,d,lp,n,w,cu", CASES)
def test_selected_backward(T, HQ, H, Dk, Dv, l, d, lp, n, w, cu):
    q, k, v, kc, _, do, cu_t = _inputs(T, HQ, H, Dk, Dv, l, d, cu)
    idx = R.select_blocks_ref(q, kc, cmp_block=l, cmp_stride=d, sel_block=lp, sel_count=n,
                              cu_seqlens=cu_t)
    kw = dict(sel_block=lp, cu_seqlens=cu_t)
    o, lse = selected_attention_triton(q, k, v, idx, return_lse=True, **kw)
    with_lse = T % 2 == 1  # odd T: the forward's lse; even T: the kernel recomputes it
    got = BW.selected_attention_backward(q, k, v, idx, o, do, lse=lse if with_lse else None, **kw)
    ref = _ref_grads(lambda a, b, c: R.selected_attention_ref(a, b, c, idx, **kw), (q, k, v), do)
    for a, b in zip(got, ref):
        _close(a, b)


@pytest.mark.parametrize("dkdv,chunk,det", [("transposed", 3, False), ("transposed", 3, True), ("atomic", None, False)],
                         ids=["transposed-chunk3", "transposed-chunk3-deterministic", "atomic"])
def test_selected_backward_arbitrary_lists(dkdv, chunk, det):
    """Unsorted lists with -1 holes, blocks shared between neighbours (the tile dedup of dq)
    and blocks past the keys (5 and 6: no keys, no gradient; the transposed index once wrote
    them out of bounds), both dk/dv paths, and blocks split into many chunks of the transposed
    index (with deterministic=True, the chunks' shares summed in order by _segment_sum)."""
    T, lp = 40, 8
    q, k, v, _, _, do, _ = _inputs(T, 4, 2, 48, 32, 8, 4)
    g = torch.Generator().manual_seed(3)
    rows = []
    for t in range(T):  # per group: the block holding t, then 3 distinct others or -1, shuffled
        grp = []
        for _ in range(2):
            others = [b for b in torch.randperm(7, generator=g).tolist() if b != t // lp][:3]
            row = [t // lp] + [b if torch.rand(1, generator=g).item() < 0.7 else -1 for b in others]
            grp.append([row[i] for i in torch.randperm(4, generator=g).tolist()])
        rows.append(grp)
    idx = torch.tensor(rows, device=DEV).view(1, T, 2, 4)
    o = selected_attention_triton(q, k, v, idx, sel_block=lp)
    seq, lens = BW._seq(q, k, q[:, :0], q[:, :0], None, 1, 1)
    got = BW.selected_backward(q, k, v, idx, o, do, sel_block=lp, scale=48 ** -0.5, seq=seq,
                               lens=lens, dkdv=dkdv, chunk=chunk, deterministic=det)
    ref = _ref_grads(lambda a, b, c: R.selected_attention_ref(a, b, c, idx, sel_block=lp), (q, k, v), do)
    for a, b in zip(got, ref):
        _close(a, b)


@pytest.mark.parametrize("tma", [True, False], ids=["descriptors", "pointers"])
def test_selected_one_position_tiles_descriptors_and_pointers(tma, monkeypatch):
    """16 heads a group (one position a tile): the slc forward and dq read each block through
    tensor descriptors (selected.use_tma) or through pointer loads, and both equal the
    reference, with -1 holes, blocks past a sequence's keys and partial last blocks in two
    packed sequences (a block's rows past its sequence are the next one's, hidden by the mask)."""
    SL = selected_attention_triton.__globals__
    monkeypatch.setitem(SL, "TMA", tma)
    cu, lp, HQ, H = [0, 27, 43], 8, 32, 2
    q, k, v, _, _, do, cu_t = _inputs(cu[-1], HQ, H, 48, 32, 8, 4, cu, seed=5)
    g = torch.Generator().manual_seed(4)
    rows = []
    for s0, s1 in zip(cu[:-1], cu[1:]):
        for t in range(s1 - s0):  # per group: the local block, then 2 others (up to 1 past the keys) or -1
            grp = []
            for _ in range(H):
                others = [b for b in torch.randperm(5, generator=g).tolist() if b != t // lp][:2]
                grp.append([t // lp] + [b if torch.rand(1, generator=g).item() < 0.8 else -1 for b in others])
            rows.append(grp)
    idx = torch.tensor(rows, device=DEV).view(1, cu[-1], H, 3)
    kw = dict(sel_block=lp, cu_seqlens=cu_t)
    rec = Launches(SL["_selected_fwd_tuned"], 0)
    monkeypatch.setitem(SL, "_selected_fwd_tuned", rec)
    o, lse = selected_attention_triton(q, k, v, idx, return_lse=True, **kw)
    assert [c["TMA"] for c, _ in rec.calls] == [tma]
    _close(o, R.selected_attention_ref(q, k, v, idx, **kw))
    got = BW.selected_attention_backward(q, k, v, idx, o, do, lse=lse, **kw)
    ref = _ref_grads(lambda a, b, c: R.selected_attention_ref(a, b, c, idx, **kw), (q, k, v), do)
    for a, b in zip(got, ref):
        _close(a, b)


@pytest.mark.parametrize("HQ,H,cu,off,with_lse", [pytest.param(32, 2, [0, 37, 38, 70], 0, True, id="h16-2groups-varlen"),
                                                  pytest.param(16, 1, [0, 70], 0, False, id="h16-lse-recomputed"),
                                                  pytest.param(32, 1, [0, 45], 60, True, id="h32-offset")])
def test_selected_backward_split_launch(HQ, H, cu, off, with_lse, monkeypatch):
    """The slc dq kernel's split launch, as the forward's (test_triton.py,
    test_selected_split_launch): tiles that share their blocks in the first launch, the other
    positions in the second, with SHARE_FRACTION as tuned and 1; the flags are the ones
    the lists imply and every gradient equals autograd through the reference."""
    SL = BW.share_split.__globals__  # the module of the one BW calls, whichever import this is
    lp, n = 8, 4
    monkeypatch.setitem(SL, "SPLIT", True)  # off by default (selected.SPLIT)
    bt, share = SL["share_split"](HQ // H, n)
    T = cu[-1]
    q, k, v, _, _, do, _ = _inputs(off + T, HQ, H, 48, 32, 8, 4, seed=T)
    q, do = q[:, off:], do[:, off:]
    groups = [shared_tile_lists(cu, bt, n, max(24, bt * n), seed=HQ + off + g) for g in range(H)]
    idx = torch.tensor([rows for rows, _ in groups], device=DEV).permute(1, 0, 2)[None]  # [1, T, H, n]
    taken = lambda most: [tiles_taken(tiles, most) for _, tiles in groups]  # noqa: E731  [H][T]
    cu_t = torch.tensor(cu, dtype=torch.int32, device=DEV) if len(cu) > 2 else None
    kw = dict(sel_block=lp, cu_seqlens=cu_t, q_offset=off)
    assert 0 < sum(map(sum, taken(share))) < T * H
    o, lse = selected_attention_triton(q, k, v, idx, return_lse=True, **kw)
    ref = _ref_grads(lambda a, b, c: R.selected_attention_ref(a, b, c, idx, **kw), (q, k, v), do)
    kernel = BW._selected_bwd
    for frac in (SL["SHARE_FRACTION"], 1.0):
        monkeypatch.setitem(SL, "SHARE_FRACTION", frac)
        rec = Launches(kernel, 16)  # FLAGS
        monkeypatch.setattr(BW, "_selected_bwd", rec)
        got = BW.selected_attention_backward(q, k, v, idx, o, do, lse=lse if with_lse else None, **kw)
        assert [(c["BT"], c["SHARE"], c["SKIP"]) for c, _ in rec.calls] == [(bt, int(frac * bt * n), False),
                                                                              (1, -1, True)]
        assert rec.calls[1][1].T.tolist() == taken(int(frac * bt * n))  # flags [rows, H]
        for a, b in zip(got, ref):
            _close(a, b)


@pytest.mark.parametrize("T,HQ,H,Dk,Dv,l,d,lp,n,cu,off,tma", [
    pytest.param(100, 32, 2, 40, 24, 8, 4, 8, 4, [0, 7, 8, 61, 100], 0, True, id="h16-2groups-varlen-oddD"),
    pytest.param(90, 32, 1, 32, 48, 8, 4, 16, 3, None, 45, False, id="h32-offset-pointers"),
])
def test_selected_forced_blocks(T, HQ, H, Dk, Dv, l, d, lp, n, cu, off, tma, monkeypatch):
    """forced=True (nsa_func's own selection): the forced blocks of every list (block 0, the
    position's own block and the one before it) are attended by tiles of several positions
    (_forced_fwd, _forced_bwd_dq) and the one-position tiles walk the rest; output, lse and all
    three gradients equal the reference's, and both forced kernels ran; their blocks through
    descriptors (selected.TMA) or pointers."""
    SL = selected_attention_triton.__globals__
    for mod in (SL, BW.use_forced.__globals__):
        monkeypatch.setitem(mod, "FORCED", True)  # off by default until timed
        monkeypatch.setitem(mod, "TMA", tma)
    q, k, v, kc, _, do, cu_t = _inputs(off + T, HQ, H, Dk, Dv, l, d, cu if off == 0 else None, seed=T)
    q, do = q[:, off:], do[:, off:]
    kw = dict(sel_block=lp, cu_seqlens=cu_t, q_offset=off)
    idx = R.select_blocks_ref(q, kc, cmp_block=l, cmp_stride=d, sel_count=n, **kw)
    runs = []
    for name, mod in (("_forced_fwd", SL), ("_forced_bwd_dq", BW.__dict__)):
        kernel = mod[name]

        class Counted:
            def __getitem__(self, grid, kernel=kernel, name=name):
                runs.append(name)
                return kernel[grid]

        monkeypatch.setitem(mod, name, Counted())
    o, lse = selected_attention_triton(q, k, v, idx, return_lse=True, forced=True, **kw)
    _close(o, R.selected_attention_ref(q, k, v, idx, **kw))
    _close(lse, selected_attention_triton(q, k, v, idx, return_lse=True, **kw)[1])
    seq, lens = BW._seq(q, k, k[:, :0], k[:, :0], cu_t, 1, 1)
    got = BW.selected_backward(q, k, v, idx, o, do, scale=Dk ** -0.5, seq=seq, lens=lens, lse=lse, forced=True,
                               **{k_: kw[k_] for k_ in ("sel_block", "q_offset")})
    ref = _ref_grads(lambda a, b, c: R.selected_attention_ref(a, b, c, idx, **kw), (q, k, v), do)
    for a, b in zip(got, ref):
        _close(a, b)
    assert runs == ["_forced_fwd", "_forced_bwd_dq"]


def test_transposed_index():
    """Items cover every (position, group, block) entry once, in chunks, positions ascending;
    blocks that start after their position (block 2 for positions 0 and 1) are left out."""
    idx = torch.tensor([[[[0, -1, 2]], [[2, 0, -1]], [[0, 1, 2]]]], device=DEV)  # [1, 3, 1, 3]
    seq, lens = BW._seq(idx.new_zeros(1, 3, 1, 1), idx.new_zeros(1, 3, 1, 1), idx[:, :0], idx[:, :0],
                        None, 1, 1)
    items, qpos, segs = BW.transposed_index(idx, seq, lens, 1, 1, chunk=2)
    real = [r for r in items.tolist() if r[4] > 0]  # sized by a bound: empty items follow
    assert all(r[4] == 0 for r in items.tolist()[len(real):])
    got = [(int(j), tuple(qpos[s:s + c].tolist())) for _, _, j, s, c in real]
    assert got == [(0, (0, 1)), (0, (2,)), (1, (2,)), (2, (2,))]
    # segments: each block's items, consecutive; empty segments follow
    assert [(items[f, 2].item(), c) for f, c in segs.tolist() if c] == [(0, 2), (1, 1), (2, 1)]
    assert all(c == 0 for _, c in segs.tolist()[3:])


def _random_selection(B, T, H, n, lp, cu, q_offset, seed):
    """block_indices [B, T, H, n] as the selection makes them: distinct causal blocks per row
    (its own block always among them), -1 in the slots past the row's reachable blocks."""
    g = torch.Generator().manual_seed(seed)
    idx = torch.full((B, T, H, n), -1, dtype=torch.int32)
    starts = [0] * T if cu is None else [s for s, e in zip(cu[:-1], cu[1:]) for _ in range(s, e)]
    for b in range(B):
        for t in range(T):
            own = (q_offset + t - starts[t]) // lp
            for h in range(H):
                pick = torch.randperm(own, generator=g)[:n - 1].tolist()
                row = [own] + pick
                idx[b, t, h, :len(row)] = torch.tensor(row, dtype=torch.int32)[torch.randperm(len(row), generator=g)]
    return idx.to(DEV)


@pytest.mark.parametrize("B,T,H,n,lp,chunk,cu,q_offset,span", [
    (1, 150, 2, 4, 16, 8, None, 0, 0),
    (1, 150, 2, 4, 16, 8, None, 0, 40),  # positions cut into spans of 40
    (2, 97, 1, 3, 8, 4, None, 0, 0),
    (2, 97, 1, 3, 8, 4, None, 0, 16),
    (1, 160, 2, 5, 16, 16, [0, 37, 100, 160], 0, 0),
    (1, 160, 2, 5, 16, 16, [0, 37, 100, 160], 0, 32),
    (1, 90, 3, 4, 16, 8, None, 21, 0),  # a prefill after 21 cached positions
    (1, 90, 3, 4, 16, 8, None, 21, 25),
])
def test_transposed_index_triton(B, T, H, n, lp, chunk, cu, q_offset, span):
    _check_counted_index(B, T, H, n, lp, chunk, cu, q_offset, seed=T, span=span)


def test_transposed_index_leaves_out_blocks_without_gradient():
    """Entries of blocks that start after their position (or past the keys) are not indexed:
    every item's count is of blocks the position sees part of."""
    B, T, H, n, lp = 1, 70, 2, 3, 8
    idx = _random_selection(B, T, H, n, lp, None, 0, seed=3)
    t = torch.arange(T, device=DEV)[None, :, None, None]
    future = torch.randint(0, 40, idx.shape, device=DEV).to(idx.dtype)  # blocks 0..39 of 8: some past T
    idx = torch.where((idx < 0) & (future % 2 == 0), future, idx)
    z = idx.new_zeros(B, T, 1, 1)
    seq, lens = BW._seq(idx[..., :1, :1], z, z[:, :0], z[:, :0], None, 1, 1)
    seen = int(((idx >= 0) & (idx * lp <= t)).sum())
    assert seen < int((idx >= 0).sum())  # some entries are of blocks the position does not see
    for span in (0, 16):
        for items, _, _ in (BW.transposed_index(idx, seq, lens, H, lp, 4, 0, span),
                            BW.transposed_index_triton(idx, seq, lens, H, lp, 4, 0, span)):
            assert int(items[:, 4].sum()) == seen


@settings(max_examples=12, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
@given(data=st.data())
def test_transposed_index_triton_random_shapes(data):
    B = data.draw(st.integers(1, 2))
    T = data.draw(st.integers(1, 130))
    cu = None
    if B == 1 and T > 2 and data.draw(st.booleans()):
        cuts = sorted(set(data.draw(st.lists(st.integers(1, T - 1), min_size=1, max_size=3))))
        cu = [0, *cuts, T]
    lp = data.draw(st.sampled_from([4, 8, 16]))
    _check_counted_index(B, T, data.draw(st.integers(1, 3)), data.draw(st.integers(1, 6)), lp,
                         data.draw(st.sampled_from([2, 4, 8, 64])), cu,
                         0 if cu else data.draw(st.integers(0, 40)), seed=T,
                         span=data.draw(st.sampled_from([0, 1, 7, 32])))


@settings(max_examples=25, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
@given(data=st.data())
def test_transposed_index_items_bound(data):
    """The host's bound on the index's work items (which sizes the dk/dv grid): its keys part is
    the number of (sequence, group, span, block) keys that can hold an entry, exactly what lists
    naming every block fill (future blocks and blocks past the keys included, which are left
    out), and each key adds at most one item beyond its entries // chunk."""
    T = data.draw(st.integers(1, 120))
    cu = [0, T]
    if T > 2 and data.draw(st.booleans()):
        cu = [0, *sorted(set(data.draw(st.lists(st.integers(1, T - 1), min_size=1, max_size=3)))), T]
    H, lp = data.draw(st.integers(1, 3)), data.draw(st.sampled_from([4, 8, 16]))
    chunk, span = data.draw(st.sampled_from([1, 2, 8, 64])), data.draw(st.sampled_from([0, 1, 5, 16, 64]))
    q_offset = 0 if len(cu) > 2 else data.draw(st.integers(0, 30))
    n = (T + q_offset) // lp + 3  # every block of the longest sequence and two past its keys
    idx = torch.arange(n, dtype=torch.int32).expand(1, T, H, n).contiguous()
    z = idx.new_zeros(1, T + q_offset, 1, 1)
    cu_t = torch.tensor(cu, dtype=torch.int32) if len(cu) > 2 else None
    seq, lens = BW._seq(idx[..., :1, :1], z, z[:, :0], z[:, :0], cu_t, 1, 1)
    counts = {}
    for a, b in zip(cu[:-1], cu[1:]):
        k_len = b - a + q_offset
        for t in range(b - a):
            for h in range(H):
                for blk in range(n):
                    if blk * lp < k_len and blk * lp <= q_offset + t:
                        key = (a, h, t // span if span else 0, blk)
                        counts[key] = counts.get(key, 0) + 1
    big = T * H * n + 1  # one item a key
    assert BW._items_bound(lens, H, lp, big, span, q_offset, T * H * n) == len(counts)
    items = sum(-(-c // chunk) for c in counts.values())
    assert items <= BW._items_bound(lens, H, lp, chunk, span, q_offset, T * H * n)


def test_slc_span_by_lengths(monkeypatch):
    """The slc index's span on a GPU: T / 16 within 1024..4096 for one sequence, longer spans for
    packs of many (at most 64 sequence-spans, so the keys stay few), 32 in the interpreter."""
    seqlens = lambda *n: BW.C.SeqLens(n, n, n, n)  # noqa: E731
    assert BW._slc_span(None, seqlens(8192)) == 32 and BW._slc_span(100, seqlens(8192)) == 100
    monkeypatch.setattr(BW.C, "interpreting", lambda: False)
    assert [BW._slc_span(None, seqlens(t)) for t in (1000, 8192, 65536, 131072)] == [1024, 1024, 4096, 4096]
    assert BW._slc_span(None, seqlens(65536, 100)) == 4096  # 2 x 16 spans
    assert BW._slc_span(None, seqlens(65536, *[100] * 7)) == 8192  # 8 sequences x 8 spans
    assert BW._slc_span(None, seqlens(65536, *[100] * 99)) == 65536  # one span each
    assert BW._slc_span(0, seqlens(65536)) == 0  # the whole sequence, asked for


def _check_counted_index(B, T, H, n, lp, chunk, cu, q_offset, seed, span=0):
    """The counted index (Triton) against the sorted one: the same items and segments, each
    item the same positions; a segment's own positions (those that see part of the block)
    first, as the dk/dv kernel's unmasked tiles need. Every item's positions lie in one span."""
    idx = _random_selection(B, T, H, n, lp, cu, q_offset, seed=seed)
    cu_t = None if cu is None else torch.tensor(cu, dtype=torch.int32, device=DEV)
    z = idx.new_zeros(B, T + q_offset, 1, 1)
    seq, lens = BW._seq(idx[..., :1, :1], z, z[:, :0], z[:, :0], cu_t, 1, 1)
    want = BW.transposed_index(idx, seq, lens, H, lp, chunk, q_offset, span)
    got = BW.transposed_index_triton(idx, seq, lens, H, lp, chunk, q_offset, span)
    (wi, wq, ws), (gi, gq, gs) = [[x.cpu() for x in r] for r in (want, got)]
    real = int((wi[:, 4] > 0).sum())
    assert real == int((gi[:, 4] > 0).sum()) and (gi[real:, 4] == 0).all()
    assert torch.equal(gi[:real], wi[:real])
    segs = lambda s: sorted(tuple(r) for r in s.tolist() if r[1])  # noqa: E731
    assert segs(gs) == segs(ws)
    n_entries = int((idx >= 0).sum())
    assert int(wi[:real, 4].sum()) == n_entries
    for f, c in (r for r in gs.tolist() if r[1]):
        blk, st, cnt = int(gi[f, 2]), int(gi[f, 3]), int(gi[f:f + c, 4].sum())
        pos, ref = gq[st:st + cnt].tolist(), wq[st:st + cnt].tolist()
        assert sorted(pos) == ref  # the same positions ...
        if span:
            assert len({t // span for t in pos}) == 1
        own = [q_offset + t < (blk + 1) * lp - 1 for t in pos]
        assert own == sorted(own, reverse=True)  # ... the own ones first


@pytest.mark.parametrize("T,HQ,H,Dk,Dv,l,d,lp,n,w,cu", BAND_CASES)
def test_window_backward(T, HQ, H, Dk, Dv, l, d, lp, n, w, cu):
    q, k, v, _, _, do, cu_t = _inputs(T, HQ, H, Dk, Dv, l, d, cu)
    kw = dict(window=w, cu_seqlens=cu_t)
    got = BW.sliding_window_backward(q, k, v, do, **kw)
    ref = _ref_grads(lambda a, b, c: R.sliding_window_ref(a, b, c, **kw), (q, k, v), do)
    for a, b in zip(got, ref):
        _close(a, b)


def _check_compressed_backward(q, kc, vc, do, q_chunk, **kw):
    """The cmp backward (after the Triton forward) against autograd through the reference."""
    o, lse = compressed_attention_triton(q, kc, vc, **kw)
    got = BW.compressed_attention_backward(q, kc, vc, o, lse, do, q_chunk=q_chunk, **kw)
    ref = _ref_grads(lambda a, b, c: R.compressed_attention_ref(a, b, c, **kw), (q, kc, vc), do)
    for a, b in zip(got, ref):
        _close(a, b)


@pytest.mark.parametrize("q_chunk", [pytest.param(None, id="auto"), pytest.param(1, id="split")])
@pytest.mark.parametrize("T,HQ,H,Dk,Dv,l,d,lp,n,w,cu", BAND_CASES)
def test_compressed_backward(T, HQ, H, Dk, Dv, l, d, lp, n, w, cu, q_chunk):
    """q_chunk=1 (rounded up to one tile of positions): every dk/dv program takes one query
    tile and stores its share into its chunk's buffer, summed in chunk order (what long
    sequences do on GPUs)."""
    q, _, _, kc, vc, do, cu_t = _inputs(T, HQ, H, Dk, Dv, l, d, cu)
    _check_compressed_backward(q, kc, vc, do, q_chunk, cmp_block=l, cmp_stride=d, cu_seqlens=cu_t)


@pytest.mark.parametrize("branch", ["win", "cmp", "cmp-chunks"])
@pytest.mark.parametrize("T,HQ,H,Dk,Dv,l,d,lp,n,w,cu", BAND_CASES[-3:-1])
def test_band_backward_edge_tiles_smaller_than_the_descriptor_tiles(T, HQ, H, Dk, Dv, l, d, lp, n, w, cu, branch,
                                                                   monkeypatch):
    """backward.EDGE_ROWS = 32: the dk/dv's masked edge tiles walked in tiles of half the
    descriptor tiles' rows (on the descriptor launch's grid of tiles), with cmp's chunks too;
    the gradients equal the reference's and the edges launch took the smaller tile."""
    monkeypatch.setattr(BW, "EDGE_ROWS", 32)
    SL = BW.band_backward.__globals__
    rec = Launches(SL["_band_bwd_dkdv"], 9)
    monkeypatch.setitem(SL, "_band_bwd_dkdv", rec)
    q, k, v, kc, vc, do, cu_t = _inputs(T, HQ, H, Dk, Dv, l, d, cu)
    if branch == "win":
        kw = dict(window=w, cu_seqlens=cu_t)
        got = BW.sliding_window_backward(q, k, v, do, **kw)
        ref = _ref_grads(lambda a, b, c: R.sliding_window_ref(a, b, c, **kw), (q, k, v), do)
        for a, b in zip(got, ref):
            _close(a, b)
    else:
        _check_compressed_backward(q, kc, vc, do, 1 if branch == "cmp-chunks" else 0, cmp_block=l, cmp_stride=d,
                                   cu_seqlens=cu_t)
    (main, _), (edges, _) = rec.calls
    assert main["TMA"] and edges["EDGES"] and edges["BT"] * 2 == main["BT"] == edges["BTG"]


@pytest.mark.parametrize("HQ,H", [(8, 2), (6, 2)], ids=["block-rows", "row-loads"])
def test_band_backward_batch_rows_are_independent(HQ, H):
    """Batch 2 without cu_seqlens: the dk/dv's query blocks of the group-major copies start at
    each sequence's rows (b * T + t), for cmp and win, as the reference on each sequence."""
    g = torch.Generator().manual_seed(5)
    T, Dk, Dv, l, d, w = 41, 32, 16, 8, 4, 10
    mk = lambda *s: torch.randn(*s, generator=g).to(DEV)  # noqa: E731
    q, k, v, do = mk(2, T, HQ, Dk), mk(2, T, H, Dk), mk(2, T, H, Dv), mk(2, T, HQ, Dv)
    kc, vc = R.compress_mean(k, l, d), R.compress_mean(v, l, d)
    _check_compressed_backward(q, kc, vc, do, None, cmp_block=l, cmp_stride=d)
    got = BW.sliding_window_backward(q, k, v, do, window=w)
    ref = _ref_grads(lambda a, b, c: R.sliding_window_ref(a, b, c, window=w), (q, k, v), do)
    for a, b in zip(got, ref):
        _close(a, b)


@settings(max_examples=25, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
@given(data=st.data())
def test_property_compressed_backward_any_chunk(data):
    """cmp dq/dk/dv equal autograd through the reference for any geometry, GQA ratio, query
    offset and dk/dv query chunk (0: unsplit; else each chunk's share is added atomically)."""
    d = data.draw(st.integers(1, 4), label="d")
    l = d * data.draw(st.integers(1, 3), label="l/d")
    H = data.draw(st.sampled_from([1, 2]), label="H")
    h = data.draw(st.sampled_from([1, 2, 4, 8]), label="h")
    T = data.draw(st.integers(1, 48), label="T")
    off = data.draw(st.integers(0, 20), label="q_offset")
    q_chunk = data.draw(st.integers(0, T + 4), label="q_chunk")
    Dk = data.draw(st.sampled_from([32, 48]), label="Dk")
    q, _, _, kc, vc, do, _ = _inputs(off + T, h * H, H, Dk, 32, l, d, seed=data.draw(st.integers(0, 99)))
    _check_compressed_backward(q[:, off:], kc, vc, do[:, off:], q_chunk, cmp_block=l, cmp_stride=d,
                               q_offset=off)


def test_selected_forward_lse():
    """The slc forward's lse (return_lse) equals the reference's log-sum-exp of the slc scores."""
    q, k, v, kc, _, _, _ = _inputs(37, 4, 2, 48, 32, 8, 4)
    idx = R.select_blocks_ref(q, kc, cmp_block=8, cmp_stride=4, sel_block=8, sel_count=3)
    o, lse = selected_attention_triton(q, k, v, idx, sel_block=8, return_lse=True)
    _close(o, selected_attention_triton(q, k, v, idx, sel_block=8), 0)
    t = torch.arange(37, device=DEV)
    pos = idx[..., None] * 8 + torch.arange(8, device=DEV)  # [1, T, H, n, 8]
    ok = (idx[..., None] >= 0) & (pos <= t[None, :, None, None, None])
    kk = k[0][pos.clamp(0, 36).flatten(-2)[0], torch.arange(2, device=DEV)[None, :, None]]  # [T, H, S, Dk]
    s = torch.einsum("thgd,thsd->thgs", q[0].view(37, 2, 2, 48).double(), kk.double()) * 48 ** -0.5
    s = s.masked_fill(~ok.flatten(-2)[0][:, :, None, :], float("-inf"))
    _close(lse[0], torch.logsumexp(s, -1).reshape(37, 4).float())


def test_compressed_backward_T_lt_l():
    """No compressed token at all (T < l): zero gradients, no NaN."""
    q, _, _, kc, vc, do, _ = _inputs(6, 2, 1, 32, 32, 8, 4)
    o, lse = compressed_attention_triton(q, kc, vc, cmp_block=8, cmp_stride=4)
    dq, dk, dv = BW.compressed_attention_backward(q, kc, vc, o, lse, do, cmp_block=8, cmp_stride=4)
    assert (dq == 0).all() and dk.shape == kc.shape and dv.shape == vc.shape


def test_nsa_func_backward_without_compressed_tokens():
    """T < l: the cmp branch has no key, so its dq kernel (the one that starts the dq buffer in
    NSA's backward) never runs; the buffer is zeroed instead and the gradients still equal the
    reference's. The window branch, the last, writes dq in q's dtype."""
    T, HQ, H, D, l, d = 6, 4, 2, 16, 8, 4
    q, k, v, kc, vc, do, _ = _inputs(T, HQ, H, D, D, l, d)
    assert kc.shape[1] == 0
    gates = torch.rand(1, T, HQ, 3, generator=torch.Generator().manual_seed(4)).to(DEV)
    kw = dict(cmp_block=l, cmp_stride=d, sel_block=4, sel_count=3, window=3)
    args = (q, kc, vc, k, v, k, v, gates)
    got = _ref_grads(lambda *a: nsa.nsa_func(*a, backend="triton", **kw), args, do)
    ref = _ref_grads(lambda *a: R.nsa_ref(*a, **kw), args, do)
    for a, b in zip(got, ref):
        _close(a, b)
    seq, lens = BW._seq(q, k, k, kc, None, l, d)
    buf = torch.full(q.shape, float("nan"), device=DEV)  # what an uninitialised buffer may hold
    dq, _, _ = BW.band_backward(q, kc, vc, do, do[..., 0], do, mode=0, scale=0.25, seq=seq, lens=lens,
                                cmp_block=l, cmp_stride=d, dq_acc=buf, dq_mode=1)
    assert (dq == 0).all()
    with pytest.raises(ValueError, match="dq_mode"):
        BW.band_backward(q, kc, vc, do, do[..., 0], do, mode=0, scale=0.25, seq=seq, lens=lens, dq_mode=2)


def test_branch_backward_offsets():
    """q_offset (queries continuing a sequence) and the window's k_offset."""
    T, off, w = 40, 25, 10
    q, k, v, kc, vc, do, _ = _inputs(T, 4, 2, 32, 32, 8, 4)
    qs, dos = q[:, off:], do[:, off:]
    idx = R.select_blocks_ref(qs, kc, cmp_block=8, cmp_stride=4, sel_block=8, sel_count=3,
                              q_offset=off)
    o = selected_attention_triton(qs, k, v, idx, sel_block=8, q_offset=off)
    got = BW.selected_attention_backward(qs, k, v, idx, o, dos, sel_block=8, q_offset=off)
    ref = _ref_grads(lambda a, b, c: R.selected_attention_ref(a, b, c, idx, sel_block=8, q_offset=off),
                     (qs, k, v), dos)
    for a, b in zip(got, ref):
        _close(a, b)
    k0 = off - (w - 1)
    kw = dict(window=w, q_offset=off, k_offset=k0)
    got = BW.sliding_window_backward(qs, k[:, k0:], v[:, k0:], dos, **kw)
    ref = _ref_grads(lambda a, b, c: R.sliding_window_ref(a, b, c, **kw), (qs, k[:, k0:], v[:, k0:]), dos)
    for a, b in zip(got, ref):
        _close(a, b)
    for q_chunk in (None, 1):
        _check_compressed_backward(qs, kc, vc, dos, q_chunk, cmp_block=8, cmp_stride=4, q_offset=off)


NSA_CASES = [
    pytest.param(dict(T=53, HQ=4, H=2, Dk=32, Dv=48, l=8, d=4, lp=16, n=3, w=12), False, id="gqa2-ownkv"),
    pytest.param(dict(T=31, HQ=16, H=1, Dk=48, Dv=32, l=8, d=4, lp=8, n=3, w=8), True, id="gqa16-48/32-sharedkv"),
    pytest.param(dict(T=47, HQ=2, H=2, Dk=32, Dv=32, l=8, d=8, lp=8, n=4, w=8, cu=[0, 17, 47]), False,
                 id="varlen-mha"),
]


def key_loads(monkeypatch, descriptors: bool):
    """Every kernel that can read its key tiles through tensor descriptors (the interpreter
    takes them wherever their flag is on) reads them so, or by pointers (the path of GPUs
    before Hopper, fp32 inputs and inexact head dims)."""
    from nsa.triton import band, select

    SL = selected_attention_triton.__globals__
    monkeypatch.setitem(SL, "TMA", descriptors)
    monkeypatch.setattr(band, "TMA", descriptors)
    monkeypatch.setattr(select, "TMA", descriptors)
    monkeypatch.setattr(BW, "BAND_DQ_TMA", descriptors)


@pytest.mark.parametrize("loads", ["descriptors", "pointers"])
@pytest.mark.parametrize("c,shared", NSA_CASES)
def test_nsa_func_backward(c, shared, loads, monkeypatch):
    """nsa_func(backend='triton') gradients of all 8 inputs equal the reference's, with the key
    tiles through tensor descriptors where the kernels take them and through pointers; the
    descriptor run also takes the forced blocks apart (selected.FORCED) where a group has 16+
    heads."""
    key_loads(monkeypatch, loads == "descriptors")
    monkeypatch.setitem(BW.use_forced.__globals__, "FORCED", loads == "descriptors")
    c = dict(c)
    cu = c.pop("cu", None)
    q, k, v, kc, vc, do, cu_t = _inputs(c["T"], c["HQ"], c["H"], c["Dk"], c["Dv"], c["l"], c["d"], cu)
    g = torch.Generator().manual_seed(5)
    gates = torch.rand(1, c["T"], c["HQ"], 3, generator=g).to(DEV)
    kw_, vw_ = (k, v) if shared else (torch.randn_like(k), torch.randn_like(v))
    kw = dict(cmp_block=c["l"], cmp_stride=c["d"], sel_block=c["lp"], sel_count=c["n"],
              window=c["w"], cu_seqlens=cu_t)
    args = (q, kc, vc, k, v, kw_, vw_, gates)
    got = _ref_grads(lambda *a: nsa.nsa_func(*a, backend="triton", **kw), args, do)
    ref = _ref_grads(lambda *a: R.nsa_ref(*a, **kw), args, do)
    for a, b in zip(got, ref):
        _close(a, b)


@pytest.mark.parametrize("cu", [None, [0, 5, 6, 61]], ids=["dense", "varlen"])
def test_nsa_func_reads_within_its_inputs(cu):
    """Every input and the output's gradient fenced by NaN: forward and backward read nothing
    past any of them (the output and all 8 gradients equal the unfenced ones, bit for bit).
    Odd head dims (40 / 24: masked dot chunks), GQA 8, a sequence shorter than a block."""
    T, HQ, H, Dk, Dv, l, d = 61, 8, 1, 40, 24, 8, 4
    q, k, v, kc, vc, do, cu_t = _inputs(T, HQ, H, Dk, Dv, l, d, cu)
    gates = torch.rand(1, T, HQ, 3, generator=torch.Generator().manual_seed(1)).to(DEV)
    kw = dict(cmp_block=l, cmp_stride=d, sel_block=8, sel_count=4, window=12, cu_seqlens=cu_t)
    args = (q, kc, vc, k, v, torch.randn_like(k), torch.randn_like(v), gates)

    def run(fence):
        f = nan_fenced if fence else torch.clone
        leaves = [f(x).requires_grad_() for x in args]
        o = nsa.nsa_func(*leaves, backend="triton", **kw)
        return (o.detach(), *torch.autograd.grad(o, leaves, f(do)))

    want, got = run(False), run(True)
    for a, b in zip(got, want):
        assert not torch.isnan(b).any() and torch.equal(a, b)


@pytest.mark.parametrize("c,shared", [NSA_CASES[0], NSA_CASES[-1]])
def test_nsa_func_backward_deterministic(c, shared):
    """deterministic=True (slc shares summed per block in item order; the cmp chunks are split
    on GPUs only) gives the reference's gradients too, through nsa_func and the layer's config."""
    c = dict(c)
    cu = c.pop("cu", None)
    q, k, v, kc, vc, do, cu_t = _inputs(c["T"], c["HQ"], c["H"], c["Dk"], c["Dv"], c["l"], c["d"], cu)
    gates = torch.rand(1, c["T"], c["HQ"], 3, generator=torch.Generator().manual_seed(5)).to(DEV)
    kw = dict(cmp_block=c["l"], cmp_stride=c["d"], sel_block=c["lp"], sel_count=c["n"],
              window=c["w"], cu_seqlens=cu_t)
    args = (q, kc, vc, k, v, k, v, gates)
    got = _ref_grads(lambda *a: nsa.nsa_func(*a, backend="triton", deterministic=True, **kw), args, do)
    ref = _ref_grads(lambda *a: R.nsa_ref(*a, **kw), args, do)
    for a, b in zip(got, ref):
        _close(a, b)
    with pytest.raises(ValueError, match="deterministic"):
        nsa.NSAConfig(d_model=32, n_heads=2, n_kv_heads=1, head_dim=16, deterministic="yes")


def test_nsa_backward_offsets_and_partial_requires_grad():
    """q_offset / win_k_offset, and only some inputs requiring grad (others get None)."""
    from nsa.triton import nsa_triton
    T, off, w = 45, 30, 8
    q, k, v, kc, vc, do, _ = _inputs(T, 4, 2, 32, 32, 8, 4)
    gates = torch.rand(1, T - off, 4, 3, generator=torch.Generator().manual_seed(2)).to(DEV)
    w0 = off - (w - 1)
    kw = dict(cmp_block=8, cmp_stride=4, sel_block=8, sel_count=3, window=w, q_offset=off,
              win_k_offset=w0)
    qs, dos = q[:, off:].clone().requires_grad_(), do[:, off:]
    kk, vv = k.clone().requires_grad_(), v.clone().requires_grad_()
    o = nsa_triton(qs, kc, vc, kk, vv, k[:, w0:], v[:, w0:], gates, **kw)
    got = torch.autograd.grad(o, (qs, kk, vv), dos)
    o = R.nsa_ref(qs, kc, vc, kk, vv, k[:, w0:], v[:, w0:], gates, **kw)
    ref = torch.autograd.grad(o, (qs, kk, vv), dos)
    for a, b in zip(got, ref):
        _close(a, b)


def test_nsa_backward_bf16_error_within_2x_of_torch():
    """bf16: relative gradient error against fp64 within 2x (3x for bf16 under the CPU
    interpreter, whose fp32 -> bf16 cast truncates) of the reference's own bf16 error."""
    c = dict(T=40, HQ=4, H=2, Dk=32, Dv=32, l=8, d=4)
    q, k, v, kc, vc, do, _ = _inputs(*c.values(), dtype=torch.bfloat16)
    gates = torch.rand(1, 40, 4, 3, generator=torch.Generator().manual_seed(3)).to(torch.bfloat16).to(DEV)
    kw = dict(cmp_block=8, cmp_stride=4, sel_block=8, sel_count=3, window=8)
    args = (q, kc, vc, k, v, k, v, gates)
    exact = _ref_grads(lambda *a: R.nsa_ref(*a, **kw), [a.double() for a in args], do.double())
    ref = _ref_grads(lambda *a: R.nsa_ref(*a, **kw), args, do)
    got = _ref_grads(lambda *a: nsa.nsa_func(*a, backend="triton", **kw), args, do)
    factor = 2 if CUDA else 3
    for a, b, e in zip(got, ref, exact):
        assert a.dtype == torch.bfloat16 and not torch.isnan(a).any()
        rel = lambda x: ((x.double() - e).norm() / e.norm()).item()  # noqa: E731
        assert rel(a) <= factor * rel(b) + 1e-3, (rel(a), rel(b))


# ------------------------------------------------------------------------------ GPU only
GPU_CASES = [
    pytest.param(dict(T=2053, HQ=64, H=4, Dk=192, Dv=128), id="paper-2k"),
    pytest.param(dict(T=2500, HQ=16, H=1, Dk=128, Dv=128), id="gqa16-2.5k"),
    pytest.param(dict(T=1500, HQ=8, H=8, Dk=64, Dv=64), id="mha-1.5k"),
]


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("c", GPU_CASES)
@pytest.mark.parametrize("dense", [False, True], ids=["cmp-band", "cmp-cudnn"])
def test_gpu_nsa_backward_bf16(c, dense, monkeypatch):
    """Paper geometry (l=32, d=16, l'=64, n=16, w=512), bf16: every gradient's relative error
    against the fp32 reference within 2x of the reference's own bf16 error (+1e-3), with cmp
    through the band kernel and through cuDNN (nsa.triton.cmp_dense)."""
    from nsa.triton import cmp_dense
    monkeypatch.setattr(cmp_dense, "ENABLED", dense)
    monkeypatch.setattr(cmp_dense, "MIN_LEN", 0)
    T, HQ, H, Dk, Dv = c["T"], c["HQ"], c["H"], c["Dk"], c["Dv"]
    q, k, v, kc, vc, do, _ = _inputs(T, HQ, H, Dk, Dv, 32, 16, dtype=torch.bfloat16)
    gates = torch.rand(1, T, HQ, 3, device=DEV).to(torch.bfloat16)
    kw = dict(cmp_block=32, cmp_stride=16, sel_block=64, sel_count=16, window=512)
    args = (q, kc, vc, k, v, k, v, gates)
    exact = _ref_grads(lambda *a: R.nsa_ref(*a, **kw), [a.float() for a in args], do.float())
    ref = _ref_grads(lambda *a: R.nsa_ref(*a, **kw), args, do)
    got = _ref_grads(lambda *a: nsa.nsa_func(*a, backend="triton", **kw), args, do)
    for a, b, e in zip(got, ref, exact):
        assert not torch.isnan(a).any()
        rel = lambda x: ((x.double() - e.double()).norm() / e.double().norm()).item()  # noqa: E731
        assert rel(a) <= 2 * rel(b) + 1e-3, (rel(a), rel(b))


@gpu
@pytest.mark.gpu
def test_gpu_nsa_backward_deterministic():
    """deterministic=True: the gradients of two runs are bitwise equal (at 4099 positions the
    cmp dk/dv runs split over query chunks and block 0 of slc over many work items, which the
    default path adds atomically), and equal the default path's to bf16 rounding."""
    T, HQ, H, Dk, Dv = 4099, 64, 4, 192, 128
    q, k, v, kc, vc, do, _ = _inputs(T, HQ, H, Dk, Dv, 32, 16, dtype=torch.bfloat16)
    gates = torch.rand(1, T, HQ, 3, device=DEV).to(torch.bfloat16)
    args = (q, kc, vc, k, v, k, v, gates)
    run = lambda det: _ref_grads(lambda *a: nsa.nsa_func(*a, backend="triton", deterministic=det), args, do)  # noqa: E731
    first, second, fast = run(True), run(True), run(False)
    for a, b, f in zip(first, second, fast):
        assert torch.equal(a, b)
        assert ((a.float() - f.float()).norm() / f.float().norm()).item() < 1e-2


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("cu", [None, [0, 77, 3000, 3001, 4099]], ids=["one", "varlen"])
def test_gpu_dkdv_beside_equals_one_stream(cu, monkeypatch):
    """The cmp and slc dk/dv launches on a side stream (backward.DKDV_BESIDE) give the
    gradients of one stream bit for bit (deterministic=True), also when the stream's memory is
    reused by the next step at once; the default path's within its atomics' reordering."""
    T, HQ, H, Dk, Dv = 4099, 64, 4, 192, 128
    q, k, v, kc, vc, do, cu_t = _inputs(T, HQ, H, Dk, Dv, 32, 16, cu=cu, dtype=torch.bfloat16)
    gates = torch.rand(1, T, HQ, 3, device=DEV).to(torch.bfloat16)
    args = (q, kc, vc, k, v, k.flip(1), v.flip(1), gates)

    def run(det):
        return _ref_grads(lambda *a: nsa.nsa_func(*a, backend="triton", deterministic=det, cu_seqlens=cu_t), args, do)

    outs = {}
    for beside in (False, True):
        monkeypatch.setattr(BW, "DKDV_BESIDE", beside)
        outs[beside] = [[g.clone() for g in run(det)] for det in (True, False, True)]
    for one, side in zip(outs[False], outs[True]):
        for a, b in zip(one, side):
            assert not torch.isnan(b).any()
            assert ((a.float() - b.float()).norm() / a.float().norm().clamp_min(1e-12)).item() < 1e-2
    for det in (0, 2):
        for a, b in zip(outs[False][det], outs[True][det]):
            assert torch.equal(a, b)


def test_branch_backward_varlen_empty_sequence():
    """A zero-length sequence inside cu_seqlens contributes no program and no gradient."""
    q, k, v, kc, vc, do, cu_t = _inputs(30, 4, 2, 32, 32, 8, 4, cu=[0, 0, 11, 11, 30])
    kw = dict(window=6, cu_seqlens=cu_t)
    got = BW.sliding_window_backward(q, k, v, do, **kw)
    ref = _ref_grads(lambda a, b, c: R.sliding_window_ref(a, b, c, **kw), (q, k, v), do)
    for a, b in zip(got, ref):
        _close(a, b)
    idx = R.select_blocks_ref(q, kc, cmp_block=8, cmp_stride=4, sel_block=8, sel_count=3, cu_seqlens=cu_t)
    o, lse = selected_attention_triton(q, k, v, idx, sel_block=8, cu_seqlens=cu_t, return_lse=True)
    got = BW.selected_attention_backward(q, k, v, idx, o, do, sel_block=8, cu_seqlens=cu_t, lse=lse)
    ref = _ref_grads(lambda a, b, c: R.selected_attention_ref(a, b, c, idx, sel_block=8, cu_seqlens=cu_t),
                     (q, k, v), do)
    for a, b in zip(got, ref):
        _close(a, b)


@pytest.mark.parametrize("compress", ["mean", "mlp"])
def test_layer_parameter_gradients_triton_equal_torch(compress):
    """A training step of the layer (RoPE, phi, gates MLP around nsa_func): parameter
    gradients with backend='triton' equal those with backend='torch'."""
    torch.manual_seed(0)
    kw = dict(d_model=32, n_heads=4, n_kv_heads=2, head_dim=16, v_head_dim=16, cmp_block=8,
              cmp_stride=4, sel_block=8, sel_count=3, window=8, compress=compress)
    layers = []
    for backend in ("triton", "torch"):
        torch.manual_seed(0)
        layers.append(nsa.NSAAttention(nsa.NSAConfig(backend=backend, **kw)).to(DEV))
    x = torch.randn(1, 37, 32, generator=torch.Generator().manual_seed(1)).to(DEV)
    w = torch.randn(1, 37, 32, generator=torch.Generator().manual_seed(2)).to(DEV)
    grads = []
    for layer in layers:
        (layer(x) * w).sum().backward()
        grads.append({n: p.grad for n, p in layer.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and grads[0]
    for n in grads[0]:
        _close(grads[0][n], grads[1][n])


@pytest.mark.parametrize("cu", [None, [0, 17, 47]], ids=["dense", "varlen"])
def test_forward_keeps_the_window_branch_for_the_backward(cu, monkeypatch):
    """A forward whose output will be differentiated keeps o_win and its lse (the gated epilogue
    writes them; the backward then skips the window's recompute): they equal the window branch
    of the reference and the recomputed lse, and the gradients through the kept state equal
    those through the recompute. Without grad (inference) nothing is kept."""
    from nsa.ops import needs_backward
    from nsa.triton.band import band_attention
    from nsa.triton.nsa import _nsa_forward

    T, HQ, H, Dk, Dv, l, d = 47, 4, 2, 32, 16, 8, 4
    q, k, v, kc, vc, do, cu_t = _inputs(T, HQ, H, Dk, Dv, l, d, cu)
    kw_, vw_ = torch.randn_like(k), torch.randn_like(v)
    gates = torch.rand(1, T, HQ, 3, generator=torch.Generator().manual_seed(3)).to(DEV)
    args = (q, kc, vc, k, v, kw_, vw_, gates)
    cu_cpu = None if cu is None else torch.tensor(cu, dtype=torch.int32)  # as the op receives it
    geo = dict(cmp_block=l, cmp_stride=d, sel_block=8, sel_count=3, window=9, scale=None, q_offset=0,
               win_k_offset=0)
    o, aux = _nsa_forward(*args, cu_seqlens=cu_cpu, aux=True, save_win=True, **geo)
    o_win, lse_win = aux[5:]
    _close(o_win, R.sliding_window_ref(q, kw_, vw_, window=9, cu_seqlens=cu_t))
    seq, lens = BW._seq(q, k, kw_, kc, cu_cpu, l, d)
    _, lse_ref = band_attention(q, kw_, vw_, mode=1, scale=Dk ** -0.5, seq=seq, lens=lens, window=9,
                                write_lse=True)
    _close(lse_win, lse_ref)
    kwb = dict(geo, cu_seqlens=cu_cpu, deterministic=False)
    import nsa.triton.band as band_module

    def recompute(*a, **k):
        raise AssertionError("the backward recomputed the window although the forward kept it")

    monkeypatch.setattr(band_module, "band_attention", recompute)
    kept = BW.nsa_backward(do, args, aux, kwb, needs=(True,) * 8)
    monkeypatch.undo()
    redone = BW.nsa_backward(do, args, (*aux[:5], o_win.new_empty(0), lse_win.new_empty(0)), kwb, needs=(True,) * 8)
    for a, b in zip(kept, redone):
        _close(a, b)
    _, aux = _nsa_forward(*args, cu_seqlens=cu_cpu, aux=True, save_win=False, **geo)
    assert aux[5].numel() == 0 and aux[6].numel() == 0
    leaves = [x.clone().requires_grad_() for x in args]
    assert needs_backward(leaves) and not needs_backward(args)
    with torch.no_grad():
        assert not needs_backward(leaves)


def test_backward_materialises_no_gradient_for_the_saved_outputs():
    """The op's seven saved outputs (o_cmp, lse_cmp, block indices, o_slc, lse_slc, o_win,
    lse_win) get no zero gradients: autograd materialised them by default (three [B, T, HQ, Dv]
    tensors among them, 3.2 GB at 64k in the paper configuration), and the backward does not
    read them. Counted as the zero tensors created outside the backward op while it runs."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Zeros(TorchDispatchMode):
        made = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func.overloadpacket in (torch.ops.aten.zeros, torch.ops.aten.zeros_like, torch.ops.aten.new_zeros,
                                       torch.ops.aten.full, torch.ops.aten.full_like):
                self.made.append(func)
            return func(*args, **(kwargs or {}))

    q, k, v, kc, vc, do, _ = _inputs(40, 4, 1, 16, 16, 8, 4)
    leaves = [t.requires_grad_() for t in (q, kc, vc, k, v)]
    gates = torch.rand(1, 40, 4, 3, device=DEV, requires_grad=True)
    o = nsa.nsa_func(*leaves, k, v, gates, cmp_block=8, cmp_stride=4, sel_block=8, sel_count=3, window=8,
                     backend="triton")
    with Zeros():
        o.backward(do)
    assert Zeros.made == [] and q.grad is not None and gates.grad.abs().sum() > 0
