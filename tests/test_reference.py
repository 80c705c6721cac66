"""Branch-level tests of nsa.reference against loop-based fp64 versions of docs/semantics.md."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import (causal_attention, dense_nsa, loop_cmp_probs, loop_select,
                      loop_selected_attention, make_inputs, mean_compress, num_cmp)

from nsa import geometry as G
from nsa import reference as R


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(1234)  # this module's unseeded draws are the same in every run and order

# --------------------------------------------------------------------------- Eq. 9 mapping


def brute_overlap(n_cmp, n_sel, l, d, lp):
    W = torch.zeros(n_cmp, n_sel, dtype=torch.float64)
    for i in range(n_cmp):
        for j in range(n_sel):
            W[i, j] = len(set(range(i * d, i * d + l)) & set(range(j * lp, (j + 1) * lp))) / d
    return W


@pytest.mark.parametrize("l,d,lp", [
    pytest.param(32, 16, 64, id="paper"),
    pytest.param(4, 2, 8, id="l4-d2-lp8"),
    pytest.param(8, 4, 4, id="l-gt-lp"),
    pytest.param(6, 3, 9, id="odd"),
    pytest.param(5, 5, 5, id="l-eq-d-eq-lp"),
    pytest.param(1, 1, 3, id="l1"),
    pytest.param(16, 2, 4, id="l-4x-lp"),
])
def test_overlap_weights_equal_brute_force(l, d, lp):
    n_cmp, n_sel = 13, 7
    W = G.overlap_weights(n_cmp, n_sel, l, d, lp, dtype=torch.float64)
    torch.testing.assert_close(W, brute_overlap(n_cmp, n_sel, l, d, lp), rtol=0, atol=0)


def test_overlap_weights_paper_multiplicities():
    W = G.overlap_weights(20, 4, 32, 16, 64, dtype=torch.float64)
    # selection block 1 = keys [64, 128): compressed blocks 3..7 with weights 1,2,2,2,1
    assert W[:, 1].tolist() == [0, 0, 0, 1, 2, 2, 2, 1] + [0] * 12
    # every interior selection block gets l'/d * l/d = 8 in total
    assert W[:, 1:3].sum(0).tolist() == [8.0, 8.0]


# --------------------------------------------------------------------------- compression


@pytest.mark.parametrize("T,l,d", [
    pytest.param(3, 4, 2, id="T-lt-l"),
    pytest.param(4, 4, 2, id="T-eq-l"),
    pytest.param(5, 4, 2, id="T-eq-l+1"),
    pytest.param(37, 8, 4, id="odd-T"),
    pytest.param(64, 32, 16, id="paper"),
    pytest.param(10, 3, 3, id="d-eq-l"),
])
def test_compress_mean_and_blocks(T, l, d):
    x = torch.randn(2, T, 3, 5, dtype=torch.float64)
    assert G.num_cmp_blocks(T, l, d) == num_cmp(T, l, d)
    got = R.compress_mean(x, l, d)
    torch.testing.assert_close(got, mean_compress(x, l, d), rtol=1e-14, atol=1e-14)
    blocks = R.cmp_blocks(x, l, d)
    assert blocks.shape[1] == num_cmp(T, l, d)
    for i in range(blocks.shape[1]):
        assert torch.equal(blocks[:, i], x[:, i * d:i * d + l])


# --------------------------------------------------------------------------- branch cmp


@pytest.mark.parametrize("T,l,d,h", [
    pytest.param(2, 4, 2, 1, id="T-lt-l"),
    pytest.param(19, 4, 2, 2, id="T19-h2"),
    pytest.param(23, 6, 3, 3, id="l6-d3-h3"),
    pytest.param(16, 4, 4, 1, id="d-eq-l"),
])
def test_compressed_attention_matches_loop(T, l, d, h):
    H = 2
    q, k_cmp, v_cmp = make_inputs(2, T, H * h, H, 6, 5, l, d, seed=T)[:3]
    o, lse = R.compressed_attention_ref(q, k_cmp, v_cmp, cmp_block=l, cmp_stride=d)
    p = loop_cmp_probs(q, k_cmp, l, d)
    vv = v_cmp.repeat_interleave(h, 2)  # [B, Tc, HQ, Dv]
    want = torch.einsum("bthi,bihd->bthd", p, vv)
    torch.testing.assert_close(o, want, rtol=1e-12, atol=1e-12)
    # rows with no visible compressed token: exactly 0 and lse = -inf
    n_empty = min(T, l - 1)
    assert torch.equal(o[:, :n_empty], torch.zeros_like(o[:, :n_empty]))
    assert bool(torch.isneginf(lse[:, :n_empty]).all())
    # lse of the other rows = logsumexp of the visible scores
    if T >= l:
        t = T - 1
        s = torch.einsum("bhd,bihd->bhi", q[:, t], k_cmp.repeat_interleave(h, 2)) / math.sqrt(6)
        vis = [i for i in range(k_cmp.shape[1]) if i * d + l - 1 <= t]
        torch.testing.assert_close(lse[:, t], s[..., vis].logsumexp(-1), rtol=1e-12, atol=1e-12)


# --------------------------------------------------------------------------- selection


@pytest.mark.parametrize("T,l,d,lp,n,h", [
    pytest.param(1, 4, 2, 8, 3, 2, id="T1"),
    pytest.param(3, 4, 2, 8, 3, 1, id="T-lt-l"),
    pytest.param(33, 4, 2, 8, 3, 2, id="n3"),
    pytest.param(41, 4, 2, 8, 5, 2, id="n5"),
    pytest.param(30, 4, 2, 4, 4, 3, id="lp-eq-l"),
    pytest.param(29, 6, 3, 3, 4, 1, id="l-gt-lp"),
    pytest.param(40, 4, 4, 8, 20, 2, id="n-gt-blocks"),
])
def test_select_blocks_ref_matches_loop(T, l, d, lp, n, h):
    H = 2
    q, k_cmp = make_inputs(1, T, H * h, H, 5, 3, l, d, seed=100 + T, qscale=3.0)[:2]
    got = R.select_blocks_ref(q, k_cmp, cmp_block=l, cmp_stride=d, sel_block=lp, sel_count=n)
    assert got.dtype == torch.int64
    assert torch.equal(got, loop_select(q, k_cmp, l, d, lp, n))


# --------------------------------------------------------------------------- branch slc


@pytest.mark.parametrize("T,lp,n,h", [
    pytest.param(1, 4, 3, 1, id="T1"),
    pytest.param(21, 4, 3, 2, id="T21"),
    pytest.param(17, 5, 4, 3, id="lp5"),
])
def test_selected_attention_matches_loop(T, lp, n, h):
    H = 2
    g = torch.Generator().manual_seed(T)
    q = torch.randn(2, T, H * h, 4, generator=g, dtype=torch.float64)
    k = torch.randn(2, T, H, 4, generator=g, dtype=torch.float64)
    v = torch.randn(2, T, H, 3, generator=g, dtype=torch.float64)
    # random block sets: the block holding t plus random others (some -1, some beyond t)
    idx = torch.full((2, T, H, n), -1, dtype=torch.int64)
    nb = -(-T // lp)
    for b in range(2):
        for t in range(T):
            for gg in range(H):
                others = torch.randperm(nb, generator=g)[: n - 1].tolist()
                sel = sorted({t // lp, *others[: int(torch.randint(0, n, (1,), generator=g))]})
                idx[b, t, gg, : len(sel)] = torch.tensor(sel)
    got = R.selected_attention_ref(q, k, v, idx, sel_block=lp)
    torch.testing.assert_close(got, loop_selected_attention(q, k, v, idx, lp), rtol=1e-12, atol=1e-12)


def test_selected_attention_all_blocks_is_causal_attention():
    T, lp, H, h = 26, 4, 2, 2
    q = torch.randn(1, T, H * h, 8, dtype=torch.float64)
    k, v = torch.randn(1, T, H, 8, dtype=torch.float64), torch.randn(1, T, H, 8, dtype=torch.float64)
    nb = -(-T // lp)
    idx = torch.arange(nb).expand(1, T, H, nb)
    got = R.selected_attention_ref(q, k, v, idx, sel_block=lp)
    torch.testing.assert_close(got, causal_attention(q, k, v), rtol=1e-12, atol=1e-12)


# --------------------------------------------------------------------------- branch win


@pytest.mark.parametrize("T,w,h", [
    pytest.param(1, 4, 1, id="T1"),
    pytest.param(30, 1, 2, id="w1"),
    pytest.param(30, 7, 2, id="w7"),
    pytest.param(30, 30, 1, id="w-eq-T"),
    pytest.param(30, 100, 4, id="w-gt-T"),
])
def test_sliding_window_is_banded_attention(T, w, h):
    H = 2
    q = torch.randn(2, T, H * h, 6, dtype=torch.float64)
    k, v = torch.randn(2, T, H, 6, dtype=torch.float64), torch.randn(2, T, H, 5, dtype=torch.float64)
    got = R.sliding_window_ref(q, k, v, window=w)
    torch.testing.assert_close(got, causal_attention(q, k, v, window=w), rtol=1e-12, atol=1e-12)
    if w == 1:  # a window of one: the query's own value
        torch.testing.assert_close(got, v.repeat_interleave(h, 2), rtol=1e-12, atol=1e-12)


def test_sliding_window_offsets_continue_a_sequence():
    # queries s..T-1 with only the last keys held (as the cache does) = rows s.. of the full pass
    T, w, s = 40, 9, 23
    q = torch.randn(1, T, 4, 6, dtype=torch.float64)
    k, v = torch.randn(1, T, 2, 6, dtype=torch.float64), torch.randn(1, T, 2, 6, dtype=torch.float64)
    full = R.sliding_window_ref(q, k, v, window=w)
    k0 = s - (w - 1)
    part = R.sliding_window_ref(q[:, s:], k[:, k0:], v[:, k0:], window=w, q_offset=s, k_offset=k0)
    torch.testing.assert_close(part, full[:, s:], rtol=1e-13, atol=1e-13)


def test_combine_gates_is_eq5():
    g = torch.rand(2, 5, 3, 3, dtype=torch.float64)
    a, b, c = (torch.randn(2, 5, 3, 4, dtype=torch.float64) for _ in range(3))
    got = R.combine_gates(g, a, b, c)
    want = g[..., :1] * a + g[..., 1:2] * b + g[..., 2:] * c
    torch.testing.assert_close(got, want, rtol=1e-15, atol=1e-15)


# --------------------------------------------------------------------------- nsa_ref


@pytest.mark.parametrize("T,l,d,lp,n,w,h", [
    pytest.param(1, 4, 2, 8, 3, 5, 2, id="T1"),
    pytest.param(37, 4, 2, 8, 3, 5, 2, id="T37"),
    pytest.param(45, 8, 4, 8, 4, 11, 1, id="l-eq-lp"),
    pytest.param(31, 6, 2, 4, 5, 3, 3, id="l-gt-lp"),
])
def test_nsa_ref_equals_dense_formulation(T, l, d, lp, n, w, h):
    H = 2
    x = make_inputs(2, T, H * h, H, 6, 4, l, d, seed=7 * T)
    idx = loop_select(x[0], x[1], l, d, lp, n)
    got = R.nsa_ref(*x, cmp_block=l, cmp_stride=d, sel_block=lp, sel_count=n, window=w)
    want = dense_nsa(*x, idx, l, d, lp, w)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


# --------------------------------------------------------------------------- causality


GEO = dict(l=4, d=2, lp=8, n=3, w=6)


def _branch_outputs(x, branch, g=GEO):
    q, k_cmp, v_cmp, k_slc, v_slc, k_win, v_win, gates = x
    if branch == "cmp":
        return R.compressed_attention_ref(q, k_cmp, v_cmp, cmp_block=g["l"], cmp_stride=g["d"])[0]
    if branch == "select":
        return R.select_blocks_ref(q, k_cmp, cmp_block=g["l"], cmp_stride=g["d"], sel_block=g["lp"],
                                   sel_count=g["n"])
    if branch == "slc":
        idx = R.select_blocks_ref(q, k_cmp, cmp_block=g["l"], cmp_stride=g["d"], sel_block=g["lp"],
                                  sel_count=g["n"])
        return R.selected_attention_ref(q, k_slc, v_slc, idx, sel_block=g["lp"])
    if branch == "win":
        return R.sliding_window_ref(q, k_win, v_win, window=g["w"])
    return R.nsa_ref(q, k_cmp, v_cmp, k_slc, v_slc, k_win, v_win, gates, cmp_block=g["l"],
                     cmp_stride=g["d"], sel_block=g["lp"], sel_count=g["n"], window=g["w"])


def _future(x, t, g=GEO):
    """Index of the first 'future' row of each input for query t (compressed: incomplete blocks)."""
    first_cmp = max(0, (t + 1 - g["l"]) // g["d"] + 1) if t + 1 >= g["l"] else 0
    return [t + 1, first_cmp, first_cmp, t + 1, t + 1, t + 1, t + 1, t + 1]


BRANCHES = [pytest.param(b, id=b) for b in ("cmp", "select", "slc", "win", "nsa")]


@pytest.mark.parametrize("branch", BRANCHES)
@pytest.mark.parametrize("t", [pytest.param(t, id=f"t{t}") for t in (0, 2, 3, 10, 17, 30)])
def test_branch_causality_values(branch, t):
    T = 33
    x = make_inputs(1, T, 4, 2, 6, 5, GEO["l"], GEO["d"], seed=t, qscale=2.0)
    y0 = _branch_outputs(x, branch)
    x2 = [a.clone() for a in x]
    for a, f in zip(x2, _future(x, t)):
        a[:, f:] = torch.randn_like(a[:, f:]) * 10
    y1 = _branch_outputs(x2, branch)
    assert torch.equal(y0[:, : t + 1], y1[:, : t + 1])
    if branch != "select" and t + 2 < T:  # the perturbation does reach later rows
        assert not torch.equal(y0[:, t + 2:], y1[:, t + 2:])


@pytest.mark.parametrize("branch", [b for b in BRANCHES if b.values[0] != "select"])
@pytest.mark.parametrize("t", [pytest.param(t, id=f"t{t}") for t in (0, 4, 9, 16, 27)])
def test_branch_causality_gradients(branch, t):
    T = 30
    x = [a.requires_grad_() for a in make_inputs(1, T, 4, 2, 6, 5, GEO["l"], GEO["d"], seed=t)]
    y = _branch_outputs(x, branch)
    y[:, t].pow(2).sum().backward()
    nonzero_past = False
    for a, f in zip(x, _future(x, t)):
        if a.grad is None:
            continue
        assert torch.equal(a.grad[:, f:], torch.zeros_like(a.grad[:, f:]))
        nonzero_past |= bool(a.grad[:, :f].abs().sum() > 0)
    assert nonzero_past or (branch == "cmp" and t < GEO["l"] - 1)


# --------------------------------------------------------------------------- no NaN / Inf


@pytest.mark.parametrize("dtype", [pytest.param(torch.float32, id="fp32"),
                                   pytest.param(torch.float64, id="fp64")])
def test_no_nan_or_inf_any_length(dtype):
    l, d, lp, n, w = 4, 2, 4, 3, 3
    for T in range(1, 3 * lp + 1):
        x = [a.requires_grad_() for a in make_inputs(1, T, 4, 2, 4, 3, l, d, dtype=dtype, seed=T)]
        o_cmp, lse = R.compressed_attention_ref(x[0], x[1], x[2], cmp_block=l, cmp_stride=d)
        o = R.nsa_ref(*x, cmp_block=l, cmp_stride=d, sel_block=lp, sel_count=n, window=w)
        (o.sum() + o_cmp.pow(2).sum()).backward()
        assert bool(torch.isfinite(o).all()) and bool(torch.isfinite(o_cmp).all()), T
        assert torch.equal(o_cmp[:, : l - 1], torch.zeros_like(o_cmp[:, : l - 1]))
        for a in x:
            assert bool(torch.isfinite(a.grad).all()), T
        # rows t < l - 1 put no gradient on q through the cmp branch: compare with gates (0,1,1)
        assert bool(torch.isfinite(lse[:, l - 1:]).all())


def test_empty_cmp_rows_have_zero_gradient():
    l, d = 8, 4
    x = [a.requires_grad_() for a in make_inputs(1, 20, 2, 1, 4, 3, l, d, seed=3)]
    o, _ = R.compressed_attention_ref(x[0], x[1], x[2], cmp_block=l, cmp_stride=d)
    o.sum().backward()
    assert torch.equal(x[0].grad[:, : l - 1], torch.zeros_like(x[0].grad[:, : l - 1]))
    # one visible token: softmax = 1, no gradient to q; two or more: a gradient
    assert bool((x[0].grad[:, l - 1 + d:].abs().sum((0, 2, 3)) > 0).all())


# --------------------------------------------------------------------------- dtypes


@pytest.mark.parametrize("dtype", [pytest.param(torch.float32, id="fp32"),
                                   pytest.param(torch.bfloat16, id="bf16"),
                                   pytest.param(torch.float16, id="fp16")])
def test_reference_low_precision_close_to_fp64(dtype):
    l, d, lp, n, w, T, H, h = 4, 2, 8, 4, 9, 45, 2, 4
    x64 = make_inputs(2, T, H * h, H, 16, 8, l, d, seed=11)
    xl = [a.to(dtype) for a in x64]
    xr = [a.double() for a in xl]  # the low-precision inputs, exactly, in fp64
    geo = dict(cmp_block=l, cmp_stride=d, sel_block=lp, sel_count=n, window=w)
    got = R.nsa_ref(*xl, **geo)
    assert got.dtype == dtype
    # the fp64 answer on the same inputs, with the same selection (selection runs in fp32 here)
    idx = R.select_blocks_ref(xl[0], xl[1], cmp_block=l, cmp_stride=d, sel_block=lp, sel_count=n)
    want = dense_nsa(*xr, idx, l, d, lp, w)
    err = (got.double() - want).abs().max().item() / want.abs().max().item()
    # PyTorch's own error: plain causal attention in this dtype against fp64 on the same inputs
    q, k, v = xl[0], xl[5], xl[6]
    base = torch.nn.functional.scaled_dot_product_attention(
        q.transpose(1, 2), k.repeat_interleave(h, 2).transpose(1, 2),
        v.repeat_interleave(h, 2).transpose(1, 2), is_causal=True).transpose(1, 2)
    base_want = causal_attention(q, k, v)
    base_err = (base.double() - base_want).abs().max().item() / base_want.abs().max().item()
    assert err <= 2 * base_err + 1e-12, (err, base_err)


# --------------------------------------------------------------------------- query chunking


@pytest.mark.parametrize("elems,T", [pytest.param(1, 70, id="one-query-chunks"),
                                     pytest.param(3000, 150, id="small-chunks")])
def test_query_chunking_does_not_change_results(elems, T, monkeypatch):
    # long enough for several window chunks (chunk <= max(w, 64) queries) at default size too
    l, d, lp, n, w = 4, 2, 8, 4, 5
    x = make_inputs(1, T, 4, 2, 8, 6, l, d, seed=21, qscale=2.0)
    kw = dict(cmp_block=l, cmp_stride=d, sel_block=lp, sel_count=n, window=w)
    o0 = R.nsa_ref(*x, **kw)
    i0 = R.select_blocks_ref(x[0], x[1], cmp_block=l, cmp_stride=d, sel_block=lp, sel_count=n)
    c0, lse0 = R.compressed_attention_ref(x[0], x[1], x[2], cmp_block=l, cmp_stride=d)
    monkeypatch.setattr(R, "_CHUNK_ELEMS", elems)
    torch.testing.assert_close(R.nsa_ref(*x, **kw), o0, rtol=1e-13, atol=1e-13)
    assert torch.equal(R.select_blocks_ref(x[0], x[1], cmp_block=l, cmp_stride=d, sel_block=lp,
                                           sel_count=n), i0)
    c1, lse1 = R.compressed_attention_ref(x[0], x[1], x[2], cmp_block=l, cmp_stride=d)
    torch.testing.assert_close(c1, c0, rtol=1e-13, atol=1e-13)
    assert torch.equal(torch.isinf(lse1), torch.isinf(lse0))
    # and both equal the dense formulation
    torch.testing.assert_close(o0, dense_nsa(*x, i0, l, d, lp, w), rtol=1e-12, atol=1e-12)


def test_custom_scale_in_every_branch():
    l, d, lp, n, w, T, sc = 4, 2, 4, 3, 5, 37, 0.77
    x = make_inputs(1, T, 4, 2, 8, 6, l, d, seed=22)
    idx = R.select_blocks_ref(x[0], x[1], cmp_block=l, cmp_stride=d, sel_block=lp, sel_count=n,
                              scale=sc)
    assert torch.equal(idx, loop_select(x[0], x[1], l, d, lp, n, scale=sc))
    got = R.nsa_ref(*x, cmp_block=l, cmp_stride=d, sel_block=lp, sel_count=n, window=w, scale=sc)
    torch.testing.assert_close(got, dense_nsa(*x, idx, l, d, lp, w, scale=sc), rtol=1e-12, atol=1e-12)
    default = R.nsa_ref(*x, cmp_block=l, cmp_stride=d, sel_block=lp, sel_count=n, window=w)
    assert (default - got).abs().max() > 1e-3


def test_gradcheck_branches_and_lse():
    l, d, lp, w = 2, 1, 2, 3
    x = [a.requires_grad_() for a in make_inputs(1, 9, 2, 1, 3, 2, l, d, seed=23)]
    q, k_cmp, v_cmp, k_slc, v_slc, k_win, v_win, _ = x

    def cmp(q, k, v):  # o and the lse of the rows that see a compressed token
        o, lse = R.compressed_attention_ref(q, k, v, cmp_block=l, cmp_stride=d)
        return o, lse[:, l - 1:]

    assert torch.autograd.gradcheck(cmp, (q, k_cmp, v_cmp), eps=1e-6, atol=1e-7)
    idx = R.select_blocks_ref(q, k_cmp, cmp_block=l, cmp_stride=d, sel_block=lp, sel_count=3)
    assert torch.autograd.gradcheck(
        lambda q, k, v: R.selected_attention_ref(q, k, v, idx, sel_block=lp), (q, k_slc, v_slc),
        eps=1e-6, atol=1e-7)
    assert torch.autograd.gradcheck(
        lambda q, k, v: R.sliding_window_ref(q, k, v, window=w), (q, k_win, v_win),
        eps=1e-6, atol=1e-7)
