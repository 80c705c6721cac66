"""Tests of the public ops nsa_func / select_blocks (semantics §3-8, 10) on the torch backend."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import causal_attention, dense_nsa, draw_geometry, geom, loop_select, make_inputs, to_pages
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import nsa
from nsa import ops


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(1234)  # this module's unseeded draws are the same in every run and order


def run(x, l, d, lp, n, w, **kw):
    return nsa.nsa_func(*x, **geom(l, d, lp, n, w), backend=kw.pop("backend", "torch"), **kw)


def sel(q, k_cmp, l, d, lp, n, **kw):
    return nsa.select_blocks(q, k_cmp, cmp_block=l, cmp_stride=d, sel_block=lp, sel_count=n,
                             backend=kw.pop("backend", "torch"), **kw)


# --------------------------------------------------------------------------- semantics §10 equivalences

DTYPES = [pytest.param(torch.float64, 1e-12, id="fp64"), pytest.param(torch.float32, 1e-5, id="fp32")]


@pytest.mark.parametrize("dtype,tol", DTYPES)
@pytest.mark.parametrize("T,w,h", [
    pytest.param(1, 1, 1, id="T1-w1"),
    pytest.param(37, 37, 2, id="w-eq-T"),
    pytest.param(50, 64, 4, id="w-gt-T"),
])
def test_window_only_is_causal_attention(T, w, h, dtype, tol):
    x = make_inputs(2, T, 2 * h, 2, 8, 6, 4, 2, dtype=dtype, seed=T, gates=(0, 0, 1))
    got = run(x, 4, 2, 8, 3, w)
    want = causal_attention(x[0], x[5], x[6])
    assert got.dtype == dtype
    assert (got.double() - want).abs().max().item() <= tol


@pytest.mark.parametrize("dtype,tol", DTYPES)
@pytest.mark.parametrize("T,l,d,lp,n,h", [
    pytest.param(1, 4, 2, 8, 3, 1, id="T1"),
    pytest.param(24, 4, 2, 8, 3, 2, id="n-lp-eq-T"),
    pytest.param(43, 4, 2, 4, 11, 2, id="n-lp-gt-T"),
    pytest.param(64, 32, 16, 64, 3, 4, id="paper-lp"),
])
def test_full_coverage_selection_is_causal_attention(T, l, d, lp, n, h, dtype, tol):
    assert n * lp >= T
    x = make_inputs(1, T, 2 * h, 2, 8, 6, l, d, dtype=dtype, seed=T, gates=(0, 1, 0))
    got = run(x, l, d, lp, n, 3)
    want = causal_attention(x[0], x[3], x[4])
    assert (got.double() - want).abs().max().item() <= tol


@pytest.mark.parametrize("dtype,tol", DTYPES)
def test_compression_with_l_eq_d_eq_1_is_causal_attention(dtype, tol):
    # l = d = 1: each compressed token is one key, visible iff i <= t
    T = 29
    x = make_inputs(1, T, 4, 2, 8, 6, 1, 1, dtype=dtype, seed=5, gates=(1, 0, 0))
    got = run(x, 1, 1, 4, 3, 3)
    want = causal_attention(x[0], x[1], x[2])
    assert (got.double() - want).abs().max().item() <= tol


def test_mixed_gates_equal_dense_formulation():
    l, d, lp, n, w = 4, 2, 4, 3, 5
    x = make_inputs(2, 33, 6, 2, 8, 5, l, d, seed=1, qscale=2.0)
    idx = sel(x[0], x[1], l, d, lp, n)
    torch.testing.assert_close(run(x, l, d, lp, n, w), dense_nsa(*x, idx, l, d, lp, w),
                               rtol=1e-12, atol=1e-12)
    # backend "auto" on CPU is the torch reference
    assert torch.equal(run(x, l, d, lp, n, w, backend="auto"), run(x, l, d, lp, n, w))


def test_shared_kv_tensors_in_every_branch():
    l, d, lp, n, w, T = 4, 2, 4, 3, 5, 30
    x = make_inputs(1, T, 4, 2, 8, 8, l, d, seed=2)
    k, v = x[3], x[4]
    from conftest import mean_compress
    xs = [x[0], mean_compress(k, l, d), mean_compress(v, l, d), k, v, k, v, x[7]]
    idx = sel(xs[0], xs[1], l, d, lp, n)
    torch.testing.assert_close(run(xs, l, d, lp, n, w), dense_nsa(*xs, idx, l, d, lp, w),
                               rtol=1e-12, atol=1e-12)


# --------------------------------------------------------------------------- batch / varlen


def test_batch_alone_and_cu_seqlens_agree():
    l, d, lp, n, w = 4, 2, 4, 3, 5
    lens = [13, 0, 3, 1, 27, 8]  # includes an empty sequence and ones shorter than l
    seqs = [make_inputs(1, T, 4, 2, 6, 5, l, d, seed=10 + i, qscale=2.0) if T else None
            for i, T in enumerate(lens)]
    alone = [run(s, l, d, lp, n, w) if s is not None else None for s in seqs]
    # packed through cu_seqlens
    packed = [torch.cat([s[j] for s in seqs if s is not None], 1) for j in range(8)]
    cu = torch.tensor([0] + list(torch.tensor(lens).cumsum(0)), dtype=torch.int32)
    out = run(packed, l, d, lp, n, w, cu_seqlens=cu)
    idx = sel(packed[0], packed[1], l, d, lp, n, cu_seqlens=cu)
    for i, (a, b) in enumerate(zip(cu[:-1].tolist(), cu[1:].tolist())):
        if alone[i] is None:
            continue
        torch.testing.assert_close(out[:, a:b], alone[i], rtol=1e-13, atol=1e-13)
        assert torch.equal(idx[:, a:b], sel(seqs[i][0], seqs[i][1], l, d, lp, n))
    # inside a larger batch (equal lengths): row 1 of the batch = the sequence alone
    T = 27
    others = [make_inputs(1, T, 4, 2, 6, 5, l, d, seed=s) for s in (40, 41)]
    batch = [torch.cat([others[0][j], seqs[4][j], others[1][j]], 0) for j in range(8)]
    torch.testing.assert_close(run(batch, l, d, lp, n, w)[1:2], alone[4], rtol=1e-13, atol=1e-13)
    assert torch.equal(sel(batch[0], batch[1], l, d, lp, n)[1:2],
                       sel(seqs[4][0], seqs[4][1], l, d, lp, n))


# --------------------------------------------------------------------------- selection


SEL_CASES = [
    pytest.param(1, 4, 2, 8, 3, 2, id="T1"),
    pytest.param(2, 4, 2, 8, 3, 2, id="T-lt-l"),
    pytest.param(3, 4, 2, 8, 3, 2, id="T-eq-l-1"),
    pytest.param(4, 4, 2, 8, 3, 2, id="T-eq-l"),
    pytest.param(5, 4, 2, 8, 3, 2, id="T-eq-l+1"),
    pytest.param(7, 4, 2, 8, 3, 2, id="T-eq-lp-1"),
    pytest.param(8, 4, 2, 8, 3, 2, id="T-eq-lp"),
    pytest.param(9, 4, 2, 8, 3, 2, id="T-eq-lp+1"),
    pytest.param(47, 4, 2, 4, 4, 3, id="T47-n4"),
    pytest.param(40, 8, 4, 4, 5, 1, id="l-gt-lp"),
    pytest.param(130, 32, 16, 64, 3, 2, id="paper-l-d-lp"),
]


@pytest.mark.parametrize("T,l,d,lp,n,h", SEL_CASES)
def test_select_blocks_matches_loop(T, l, d, lp, n, h):
    H = 2
    q, k_cmp = make_inputs(2, T, H * h, H, 5, 3, l, d, seed=T + lp, qscale=3.0)[:2]
    got = sel(q, k_cmp, l, d, lp, n)
    assert got.shape == (2, T, H, n) and got.dtype == torch.int64
    assert torch.equal(got, loop_select(q, k_cmp, l, d, lp, n))


@pytest.mark.parametrize("T,l,d,lp,n,h", SEL_CASES)
def test_nsa_func_edge_lengths_equal_dense(T, l, d, lp, n, h):
    H = 2
    x = make_inputs(1, T, H * h, H, 5, 3, l, d, seed=T + 1, qscale=2.0)
    idx = loop_select(x[0], x[1], l, d, lp, n)
    torch.testing.assert_close(run(x, l, d, lp, n, 5), dense_nsa(*x, idx, l, d, lp, 5),
                               rtol=1e-12, atol=1e-12)


def test_selection_uses_summed_group_scores():
    # one group of two heads; head 0 strongly prefers block 1, head 1 mildly prefers block 2.
    # Per head they would differ; the group takes the larger summed score (block 1) for both.
    l = d = lp = 4
    T, n, Dk = 32, 4, 4
    k_cmp = torch.zeros(1, 8, 1, Dk, dtype=torch.float64)
    k_cmp[0, 1, 0, 0] = 1.0  # block 1
    k_cmp[0, 2, 0, 1] = 1.0  # block 2
    q = torch.zeros(1, T, 2, Dk, dtype=torch.float64)
    q[..., 0, 0] = 20.0
    q[..., 1, 1] = 4.0
    got = sel(q, k_cmp, l, d, lp, n)
    t = T - 1  # forced: 0, 6, 7
    assert got[0, t, 0].tolist() == [0, 1, 6, 7]
    # each head alone would pick its own favourite
    assert sel(q[:, :, :1], k_cmp, l, d, lp, n)[0, t, 0].tolist() == [0, 1, 6, 7]
    assert sel(q[:, :, 1:], k_cmp, l, d, lp, n)[0, t, 0].tolist() == [0, 2, 6, 7]
    # swapping the heads inside the group changes nothing (the score is a sum)
    assert torch.equal(sel(q.flip(2), k_cmp, l, d, lp, n), got)


def test_forced_blocks_always_present():
    # keys make block 1..2 very attractive; forced blocks 0, t//l', t//l'-1 still present
    l, d, lp, n, T = 4, 2, 4, 3, 40
    q, k_cmp = make_inputs(1, T, 4, 2, 6, 3, l, d, seed=9, qscale=5.0)[:2]
    got = sel(q, k_cmp, l, d, lp, n)
    for t in range(T):
        forced = {0, t // lp} | ({t // lp - 1} if t >= lp else set())
        for g in range(2):
            row = got[0, t, g].tolist()
            assert forced <= set(row), (t, g, row)
            valid = [j for j in row if j >= 0]
            assert valid == sorted(set(valid)) and all(j * lp <= t for j in valid)
            assert len(valid) == min(n, t // lp + 1)


@pytest.mark.parametrize("keys", [pytest.param("zero", id="zero-keys"),
                                  pytest.param("identical", id="identical-keys")])
@pytest.mark.parametrize("h", [pytest.param(1, id="h1"), pytest.param(2, id="h2")])
def test_ties_go_to_lower_index(keys, h):
    # l = d = l': block j's score is exactly p_cmp of token j; equal keys make p uniform,
    # so every eligible non-forced block ties and the lowest indices must win.
    l = d = lp = 4
    T, n, H = 44, 5, 2
    q = torch.randn(1, T, H * h, 6, dtype=torch.float64)
    tc = (T - l) // d + 1
    if keys == "zero":
        k_cmp = torch.zeros(1, tc, H, 6, dtype=torch.float64)
    else:
        k_cmp = torch.randn(1, 1, H, 6, dtype=torch.float64).expand(1, tc, H, 6).contiguous()
    got = sel(q, k_cmp, l, d, lp, n)
    for t in range(T):
        cur = t // lp
        forced = {0, cur} | ({cur - 1} if cur else set())
        others = [j for j in range(cur + 1) if j not in forced]
        want = sorted(forced | set(others[: n - len(forced)]))
        want += [-1] * (n - len(want))
        for g in range(H):
            assert got[0, t, g].tolist() == want, (t, g)


def test_more_selected_than_eligible_pads_with_minus_one():
    l, d, lp, n, T = 4, 2, 4, 16, 22
    q, k_cmp = make_inputs(2, T, 2, 1, 4, 3, l, d, seed=4)[:2]
    got = sel(q, k_cmp, l, d, lp, n)
    for t in range(T):
        want = list(range(t // lp + 1)) + [-1] * (n - t // lp - 1)
        assert got[1, t, 0].tolist() == want


def test_selection_not_differentiable_and_grad_reaches_k_cmp_through_cmp_only():
    l, d, lp, n, w = 4, 2, 4, 3, 3
    x = [a.requires_grad_() for a in make_inputs(1, 30, 2, 1, 4, 3, l, d, seed=8, gates=(0, 1, 1))]
    run(x, l, d, lp, n, w).sum().backward()
    # gate of cmp = 0: k_cmp gets exactly zero gradient (selection is not differentiable)
    assert torch.equal(x[1].grad, torch.zeros_like(x[1]))
    assert x[0].grad.abs().sum() > 0 and x[3].grad.abs().sum() > 0


@settings(max_examples=25, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
@given(data=st.data())
def test_property_select_blocks_matches_loop(data):
    l, d, lp, n = draw_geometry(data)
    h = data.draw(st.sampled_from([1, 2, 3]), label="h")
    T = data.draw(st.integers(1, 40), label="T")
    seed = data.draw(st.integers(0, 2**16), label="seed")
    q, k_cmp = make_inputs(1, T, 2 * h, 2, 4, 2, l, d, seed=seed, qscale=3.0)[:2]
    assert torch.equal(sel(q, k_cmp, l, d, lp, n), loop_select(q, k_cmp, l, d, lp, n))


# --------------------------------------------------------------------------- gradcheck


@pytest.mark.parametrize("T,l,d,lp,n,w", [
    pytest.param(13, 2, 1, 2, 3, 3, id="T13"),
    pytest.param(7, 4, 2, 4, 3, 2, id="T7"),
])
def test_gradcheck_nsa_func(T, l, d, lp, n, w):
    x = [a.requires_grad_() for a in make_inputs(1, T, 2, 1, 3, 2, l, d, seed=T)]
    assert torch.autograd.gradcheck(lambda *a: run(a, l, d, lp, n, w), x, eps=1e-6, atol=1e-7)


# --------------------------------------------------------------------------- low precision


def _sdpa_err(q, k, v, h):
    """PyTorch's own relative error: plain causal SDPA in q's dtype against fp64."""
    out = F.scaled_dot_product_attention(
        q.transpose(1, 2), k.repeat_interleave(h, 2).transpose(1, 2),
        v.repeat_interleave(h, 2).transpose(1, 2), is_causal=True).transpose(1, 2)
    want = causal_attention(q, k, v)
    return (out.double() - want).abs().max().item() / want.abs().max().item()


@pytest.mark.parametrize("dtype", [pytest.param(torch.bfloat16, id="bf16"),
                                   pytest.param(torch.float16, id="fp16")])
@pytest.mark.parametrize("T,H,h,Dk,Dv", [
    pytest.param(77, 1, 1, 192, 128, id="Dk192-Dv128-h1"),
    pytest.param(53, 2, 8, 64, 32, id="h8"),
    pytest.param(31, 1, 64, 16, 16, id="h64"),
    pytest.param(45, 4, 2, 32, 48, id="h2-odd"),
    pytest.param(29, 2, 3, 8, 8, id="h3"),
])
def test_low_precision_close_to_fp64(dtype, T, H, h, Dk, Dv):
    l, d, lp, n, w = 8, 4, 8, 4, 13
    x = [a.to(dtype) for a in make_inputs(1, T, H * h, H, Dk, Dv, l, d, seed=T)]
    got = run(x, l, d, lp, n, w)
    assert got.dtype == dtype
    idx = sel(x[0], x[1], l, d, lp, n)
    want = dense_nsa(*x, idx, l, d, lp, w)
    err = (got.double() - want).abs().max().item() / want.abs().max().item()
    base = _sdpa_err(x[0], x[5], x[6], h)
    print(f"nsa err {err:.3g}, sdpa err {base:.3g}, ratio {err / base:.2f}")
    assert err <= 2 * base + 1e-12


@pytest.mark.parametrize("h", [pytest.param(h, id=f"h{h}") for h in (1, 2, 4, 16, 64)])
def test_gqa_ratios_fp32(h):
    l, d, lp, n, w, T = 4, 2, 4, 3, 5, 23
    x = make_inputs(1, T, 2 * h, 2, 8, 4, l, d, seed=h, dtype=torch.float32, qscale=2.0)
    idx = sel(x[0], x[1], l, d, lp, n)
    want = dense_nsa(*x, idx, l, d, lp, w)
    assert (run(x, l, d, lp, n, w).double() - want).abs().max().item() <= 1e-5
    # the fp32 selection equals the fp64 loop selection on the same inputs
    assert torch.equal(idx, loop_select(x[0].double(), x[1].double(), l, d, lp, n))


# --------------------------------------------------------------------------- bad input


L, D, LP, N, W, TT = 4, 2, 4, 3, 4, 10


def _valid():
    return make_inputs(1, TT, 4, 2, 4, 3, L, D, seed=0)


def _kw():
    return dict(cmp_block=L, cmp_stride=D, sel_block=LP, sel_count=N, window=W, backend="torch")


def _bad(i, value):
    def f():
        x = _valid()
        x[i] = value(x) if callable(value) else value
        return x, _kw()
    return f


def _badkw(**over):
    def f():
        kw = _kw()
        kw.update(over)
        return _valid(), kw
    return f


BAD = [
    pytest.param(_bad(0, lambda x: x[0][0]), ValueError, ["q", "[B, T, HQ, Dk]"], id="q-rank"),
    pytest.param(_bad(0, lambda x: x[0].tolist()), TypeError, ["q"], id="q-not-tensor"),
    pytest.param(_bad(0, lambda x: x[0].long()), TypeError, ["q"], id="q-int"),
    pytest.param(_bad(0, lambda x: x[0][:, :, :3]), ValueError, ["HQ=3", "H=2"], id="HQ-not-multiple"),
    pytest.param(_bad(1, lambda x: x[1][:, :-1]), ValueError, ["k_cmp", "[1, 4, 2, 4]"], id="k_cmp-Tc"),
    pytest.param(_bad(1, lambda x: x[1][..., :3]), ValueError, ["k_cmp", "Dk"], id="k_cmp-Dk"),
    pytest.param(_bad(1, lambda x: x[1][0]), ValueError, ["k_cmp"], id="k_cmp-rank"),
    pytest.param(_bad(2, lambda x: x[2][:, :2]), ValueError, ["v_cmp"], id="v_cmp-Tc"),
    pytest.param(_bad(3, lambda x: x[3][:, :-1]), ValueError, ["k_slc", "[1, 10, 2, 4]"], id="k_slc-T"),
    pytest.param(_bad(4, lambda x: x[4][..., :2]), ValueError, ["v_slc", "Dv"], id="v_slc-Dv"),
    pytest.param(_bad(5, lambda x: x[5][:, :, :1]), ValueError, ["k_win"], id="k_win-H"),
    pytest.param(_bad(6, lambda x: x[6][None]), ValueError, ["v_win"], id="v_win-rank"),
    pytest.param(_bad(7, lambda x: x[7][..., :2]), ValueError, ["gates", "[B, T, HQ, 3]"], id="gates-shape"),
    pytest.param(_bad(7, lambda x: x[7].long()), TypeError, ["gates"], id="gates-int"),
    pytest.param(_bad(7, lambda x: x[7].half()), TypeError, ["gates", "dtype"], id="gates-dtype"),
    pytest.param(_bad(3, lambda x: x[3].float()), TypeError, ["k_slc", "dtype"], id="k_slc-dtype"),
    pytest.param(_bad(1, lambda x: x[1].float()), TypeError, ["k_cmp", "dtype"], id="k_cmp-dtype"),
    pytest.param(_bad(6, lambda x: x[6].half()), TypeError, ["v_win", "dtype"], id="v_win-dtype"),
    pytest.param(_bad(5, lambda x: x[5].to("meta")), ValueError, ["k_win", "device"], id="k_win-device"),
    pytest.param(_bad(2, lambda x: x[2].to("meta")), ValueError, ["v_cmp", "device"], id="v_cmp-device"),
    pytest.param(_bad(7, lambda x: x[7].to("meta")), ValueError, ["gates", "device"], id="gates-device"),
    pytest.param(_badkw(cmp_block=5), ValueError, ["cmp_stride", "cmp_block"], id="d-not-dividing-l"),
    pytest.param(_badkw(sel_block=5), ValueError, ["cmp_stride", "sel_block"], id="d-not-dividing-lp"),
    pytest.param(_badkw(sel_count=2), ValueError, ["sel_count"], id="n-lt-3"),
    pytest.param(_badkw(cmp_block=0), ValueError, ["cmp_block"], id="l-zero"),
    pytest.param(_badkw(window=0), ValueError, ["window"], id="w-zero"),
    pytest.param(_badkw(backend="cuda"), ValueError, ["backend"], id="backend-unknown"),
    pytest.param(_badkw(backend="triton"), ValueError, ["backend='triton'"], id="backend-triton-cpu"),
    pytest.param(_badkw(cu_seqlens=torch.tensor([0, 4, 9], dtype=torch.int32)), ValueError,
                 ["cu_seqlens", "T=10"], id="cu_seqlens-end"),
    pytest.param(_badkw(cu_seqlens=torch.tensor([0, 4.0, 10])), TypeError, ["cu_seqlens"],
                 id="cu_seqlens-float"),
    pytest.param(_badkw(cu_seqlens=[0, 4, 10]), TypeError, ["cu_seqlens"], id="cu_seqlens-list"),
    pytest.param(_badkw(cu_seqlens=torch.tensor([[0, 10]], dtype=torch.int32)), ValueError,
                 ["cu_seqlens"], id="cu_seqlens-rank"),
]


@pytest.mark.parametrize("make,exc,words", BAD)
def test_nsa_func_bad_input(make, exc, words, monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    x, kw = make()
    with pytest.raises(exc) as e:
        nsa.nsa_func(*x, **kw)
    for word in words:
        assert word in str(e.value), (word, str(e.value))


def test_cu_seqlens_needs_batch_one():
    x = [torch.cat([a, a], 0) for a in _valid()]
    with pytest.raises(ValueError, match="cu_seqlens"):
        nsa.nsa_func(*x, **_kw(), cu_seqlens=torch.tensor([0, 10], dtype=torch.int32))


SEL_BAD = [
    pytest.param(lambda q, k: (q[0], k), {}, ValueError, "q", id="q-rank"),
    pytest.param(lambda q, k: (q, k[:, 1:]), {}, ValueError, "k_cmp", id="k_cmp-Tc"),
    pytest.param(lambda q, k: (q, k.float()), {}, TypeError, "k_cmp", id="k_cmp-dtype"),
    pytest.param(lambda q, k: (q, k.to("meta")), {}, ValueError, "k_cmp", id="k_cmp-device"),
    pytest.param(lambda q, k: (q[:, :, :3], k), {}, ValueError, "HQ", id="HQ-not-multiple"),
    pytest.param(lambda q, k: (q, k), {"sel_count": 1}, ValueError, "sel_count", id="n-lt-3"),
    pytest.param(lambda q, k: (q, k), {"sel_block": 3}, ValueError, "sel_block", id="d-not-dividing-lp"),
    pytest.param(lambda q, k: (q, k), {"backend": "cpu"}, ValueError, "backend", id="backend-unknown"),
]


@pytest.mark.parametrize("mut,over,exc,word", SEL_BAD)
def test_select_blocks_bad_input(mut, over, exc, word):
    x = _valid()
    q, k = mut(x[0], x[1])
    kw = dict(cmp_block=L, cmp_stride=D, sel_block=LP, sel_count=N, backend="torch")
    kw.update(over)
    with pytest.raises(exc, match=word):
        nsa.select_blocks(q, k, **kw)


def test_resolve_backend():
    assert ops.resolve_backend("torch", torch.device("cpu")) == "torch"
    assert ops.resolve_backend("auto", torch.device("cpu")) == "torch"
    with pytest.raises(ValueError, match="backend"):
        ops.resolve_backend("xla", torch.device("cpu"))


def test_non_contiguous_inputs():
    l, d, lp, n, w = 4, 2, 4, 3, 5
    x = make_inputs(2, 27, 4, 2, 8, 6, l, d, seed=31)
    # the same values as [B, heads, T, D] tensors viewed in the [B, T, heads, D] layout
    xt = [a.transpose(1, 2).contiguous().transpose(1, 2) for a in x]
    assert not xt[0].is_contiguous()
    torch.testing.assert_close(run(xt, l, d, lp, n, w), run(x, l, d, lp, n, w), rtol=1e-14, atol=1e-14)
    assert torch.equal(sel(xt[0], xt[1], l, d, lp, n), sel(x[0], x[1], l, d, lp, n))


@settings(max_examples=20, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
@given(data=st.data())
def test_property_nsa_func_equals_dense(data):
    l, d, lp, n = draw_geometry(data)
    w = data.draw(st.integers(1, 12), label="w")
    h = data.draw(st.sampled_from([1, 2, 3, 8]), label="h")
    T = data.draw(st.integers(1, 40), label="T")
    seed = data.draw(st.integers(0, 2**16), label="seed")
    x = make_inputs(1, T, 2 * h, 2, 4, 3, l, d, seed=seed, qscale=2.0)
    idx = loop_select(x[0], x[1], l, d, lp, n)
    torch.testing.assert_close(run(x, l, d, lp, n, w), dense_nsa(*x, idx, l, d, lp, w),
                               rtol=1e-12, atol=1e-12)


def test_paper_geometry_long_sequence():
    # l=32, d=16, l'=64, n=16, w=512 at T > n*l' + w so that every branch is sparse
    l, d, lp, n, w, T, H, h = 32, 16, 64, 16, 512, 1100, 2, 2
    x = make_inputs(1, T, H * h, H, 16, 8, l, d, seed=77, qscale=4.0)
    idx = sel(x[0], x[1], l, d, lp, n)
    torch.testing.assert_close(run(x, l, d, lp, n, w), dense_nsa(*x, idx, l, d, lp, w),
                               rtol=1e-12, atol=1e-12)
    # the selection is a top-n of independently computed group scores (Eq. 8-10)
    q, k_cmp = x[0], x[1]
    tc, n_sel = k_cmp.shape[1], -(-T // lp)
    s = torch.einsum("bthd,bihd->bthi", q, k_cmp.repeat_interleave(h, 2)) / 4.0
    t = torch.arange(T)[:, None]
    vis = (torch.arange(tc)[None] * d + l - 1 <= t)
    p = torch.where(vis[None, :, None], s, float("-inf")).softmax(-1).nan_to_num(0.0)
    i, j = torch.arange(tc)[:, None], torch.arange(n_sel)[None]
    W = ((torch.minimum(i * d + l, (j + 1) * lp) - torch.maximum(i * d, j * lp)).clamp_min(0) / d)
    P = torch.einsum("bthi,ij->bthj", p, W.double()).view(1, T, H, h, n_sel).sum(3)
    for tt in range(0, T, 37):
        cur = tt // lp
        forced = {0, cur} | ({cur - 1} if cur else set())
        for g in range(H):
            chosen = [v for v in idx[0, tt, g].tolist() if v >= 0]
            assert forced <= set(chosen) and len(chosen) == min(n, cur + 1)
            free = [v for v in chosen if v not in forced]
            left = [v for v in range(cur + 1) if v not in chosen]
            if free and left:
                assert min(P[0, tt, g, free]) >= max(P[0, tt, g, left]) - 1e-12, tt


# --------------------------------------------------------------------------- nsa_decode
def _decode_step(x, lens, w):
    """nsa_decode's arguments for the last position of each sequence of a full input x, with
    the window keys in a ring of w rows (position p at row p % w)."""
    q, k_cmp, v_cmp, k_slc, v_slc, k_win, v_win, g = x
    B = q.shape[0]
    ring_k, ring_v = k_win.new_zeros(B, w, *k_win.shape[2:]), v_win.new_zeros(B, w, *v_win.shape[2:])
    for b, n in enumerate(lens):
        p = torch.arange(max(0, n - w), n)
        ring_k[b, p % w], ring_v[b, p % w] = k_win[b, p], v_win[b, p]
    last = torch.tensor(lens) - 1
    ar = torch.arange(B)
    return (q[ar, last][:, None], k_cmp, v_cmp, k_slc, v_slc, ring_k, ring_v, g[ar, last][:, None])


@settings(max_examples=25, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
@given(data=st.data())
def test_property_decode_equals_last_row_of_a_full_call(data):
    """A decode step of each sequence (own length, window in a ring) = the last row of nsa_func."""
    l, d, lp, n = draw_geometry(data)
    w = data.draw(st.integers(1, 12), label="w")
    h = data.draw(st.sampled_from([1, 2, 3]), label="h")
    lens = data.draw(st.lists(st.integers(1, 30), min_size=1, max_size=3), label="lens")
    x = make_inputs(len(lens), max(lens), 2 * h, 2, 4, 3, l, d, seed=data.draw(st.integers(0, 2**16)))
    step = nsa.nsa_decode(*_decode_step(x, lens, w), cache_seqlens=torch.tensor(lens), **geom(l, d, lp, n, w),
                          backend="torch")
    for b, t in enumerate(lens):
        tc = nsa.num_cmp_blocks(t, l, d)
        xb = [a[b:b + 1, :tc] if i in (1, 2) else a[b:b + 1, :t] for i, a in enumerate(x)]
        full = nsa.nsa_func(*xb, **geom(l, d, lp, n, w), backend="torch")
        torch.testing.assert_close(step[b:b + 1], full[:, -1:], rtol=1e-12, atol=1e-12)


def _decode_args(lens=(7, 10), w=W):
    x = make_inputs(len(lens), max(lens), 4, 2, 4, 3, L, D, seed=0)
    return list(_decode_step(x, list(lens), w)), dict(cache_seqlens=torch.tensor(lens), **geom(L, D, LP, N, w))


DECODE_BAD = [
    pytest.param(lambda a, k: a.__setitem__(0, torch.cat([a[0]] * 9, 1)), ValueError,
                 ["q", "[B, S, HQ, Dk]", "S <= 8"], id="q-nine-tokens"),
    pytest.param(lambda a, k: (a.__setitem__(0, torch.cat([a[0]] * 8, 1)), a.__setitem__(7, torch.cat([a[7]] * 8, 1))),
                 ValueError, ["cache_seqlens", ">= 8", "[7, 10]"], id="len-below-new-tokens"),
    pytest.param(lambda a, k: a.__setitem__(7, torch.cat([a[7]] * 2, 1)), ValueError,
                 ["gates", "[B, S, HQ, 3]"], id="gates-more-tokens-than-q"),
    pytest.param(lambda a, k: (a.__setitem__(0, torch.cat([a[0]] * 2, 1)), a.__setitem__(7, torch.cat([a[7]] * 2, 1))),
                 ValueError, ["k_win", "window + S - 1 = 5"], id="ring-short-for-two-tokens"),
    pytest.param(lambda a, k: k.update(cache_seqlens=torch.tensor([7, 0])), ValueError,
                 ["cache_seqlens", ">= 1"], id="len-zero"),
    pytest.param(lambda a, k: k.update(cache_seqlens=torch.tensor([7])), ValueError,
                 ["cache_seqlens", "[B]"], id="lens-shape"),
    pytest.param(lambda a, k: k.update(cache_seqlens=torch.tensor([7.0, 10.0])), TypeError,
                 ["cache_seqlens"], id="lens-float"),
    pytest.param(lambda a, k: k.update(cache_seqlens=11), ValueError,
                 ["k_slc", "Tk >= 11"], id="len-beyond-cache"),
    pytest.param(lambda a, k: a.__setitem__(1, a[1][:, :2]), ValueError, ["k_cmp", "Tc >= 4"], id="k_cmp-short"),
    pytest.param(lambda a, k: (a.__setitem__(5, a[5][:, :2]), a.__setitem__(6, a[6][:, :2])), ValueError,
                 ["k_win", "window=4"], id="ring-short"),
    pytest.param(lambda a, k: a.__setitem__(6, a[6][:, :2]), ValueError, ["v_win", "k_win"], id="ring-v-rows"),
    pytest.param(lambda a, k: a.__setitem__(6, a[6][..., :2]), ValueError, ["v_win", "Dv"], id="v_win-Dv"),
    pytest.param(lambda a, k: a.__setitem__(7, a[7][..., :2]), ValueError, ["gates", "[B, S, HQ, 3]"],
                 id="gates-shape"),
    pytest.param(lambda a, k: a.__setitem__(3, a[3].float()), TypeError, ["k_slc", "dtype"], id="k_slc-dtype"),
    pytest.param(lambda a, k: k.update(backend="gpu"), ValueError, ["backend"], id="backend-unknown"),
    pytest.param(lambda a, k: k.update(cache_seqlens=10, max_seqlen=9), ValueError, ["max_seqlen=9", "10"],
                 id="max_seqlen-below"),
    pytest.param(lambda a, k: k.update(max_seqlen=0), ValueError, ["max_seqlen"], id="max_seqlen-zero"),
    pytest.param(lambda a, k: k.update(max_seqlen=30), ValueError, ["k_cmp", "max_seqlen = 30"],
                 id="max_seqlen-beyond-cache"),
]


@pytest.mark.parametrize("mut,exc,words", DECODE_BAD)
def test_nsa_decode_bad_input(mut, exc, words):
    a, kw = _decode_args()
    mut(a, kw)
    with pytest.raises(exc) as e:
        nsa.nsa_decode(*a, **kw)
    for word in words:
        assert word in str(e.value), (word, str(e.value))


def test_nsa_decode_checks_a_signature_once(monkeypatch):
    """With tensor lengths and max_seqlen (nothing read back) a signature that passed the checks
    skips them on later calls, with the same result; any other shape, dtype or argument type is
    a new signature and is checked."""
    from nsa import ops

    a, kw = _decode_args()
    kw = dict(kw, max_seqlen=10)
    monkeypatch.setattr(ops, "_DECODE_CHECKED", {})
    first = nsa.nsa_decode(*a, **kw)
    assert len(ops._DECODE_CHECKED) == 1
    checked = []
    monkeypatch.setattr(ops, "_check_geometry", lambda *g: checked.append(g) or (_ for _ in ()).throw(AssertionError))
    torch.testing.assert_close(nsa.nsa_decode(*a, **kw), first, rtol=0, atol=0)  # no check ran
    assert not checked
    monkeypatch.undo()
    monkeypatch.setattr(ops, "_DECODE_CHECKED", {})
    nsa.nsa_decode(*a, **kw)  # the valid signature cached again; the calls below differ from it
    bad = list(a)
    bad[3] = bad[3].float()
    with pytest.raises(TypeError, match="k_slc"):
        nsa.nsa_decode(*bad, **kw)
    with pytest.raises(ValueError, match="max_seqlen = 30"):
        nsa.nsa_decode(*a, **dict(kw, max_seqlen=30))
    with pytest.raises((TypeError, ValueError), match="cmp_block"):
        nsa.nsa_decode(*a, **dict(kw, cmp_block=float(kw["cmp_block"])))
    with pytest.raises((TypeError, ValueError), match="cmp_block"):
        nsa.nsa_decode(*a, **dict(kw, cmp_block=[kw["cmp_block"]]))  # unhashable: checked, not cached


# --------------------------------------------------------------------------- nsa_decode: S new tokens, paged
def _last_rows(x, lens, S, w):
    """nsa_decode's arguments for the last S positions of each sequence of a full input x, the
    window keys in a ring of w + S - 1 rows."""
    q, k_cmp, v_cmp, k_slc, v_slc, k_win, v_win, g = x
    B, tw = q.shape[0], w + S - 1
    ring_k, ring_v = k_win.new_zeros(B, tw, *k_win.shape[2:]), v_win.new_zeros(B, tw, *v_win.shape[2:])
    for b, n in enumerate(lens):
        p = torch.arange(max(0, n - tw), n)
        ring_k[b, p % tw], ring_v[b, p % tw] = k_win[b, p], v_win[b, p]
    at = torch.tensor(lens)[:, None] - S + torch.arange(S)
    ar = torch.arange(B)[:, None]
    return [q[ar, at], k_cmp, v_cmp, k_slc, v_slc, ring_k, ring_v, g[ar, at]]


@settings(max_examples=25, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
@given(data=st.data())
def test_property_decode_several_tokens_paged_equals_last_rows_of_a_full_call(data):
    """S = 1..8 new tokens of each sequence (ragged lengths >= S, window in a ring), contiguous
    and paged (random page order, random page size a multiple of d, shared k/v window read
    through the pages): the last S rows of nsa_func on the whole sequence."""
    l, d, lp, n = draw_geometry(data)
    w = data.draw(st.integers(1, 12), label="w")
    h = data.draw(st.sampled_from([1, 2, 3]), label="h")
    S = data.draw(st.integers(1, 8), label="S")
    lens = data.draw(st.lists(st.integers(S, 30), min_size=1, max_size=3), label="lens")
    ps = d * data.draw(st.integers(1, 4), label="page_size / d")
    seed = data.draw(st.integers(0, 2**16))
    x = make_inputs(len(lens), max(lens), 2 * h, 2, 4, 3, l, d, seed=seed)
    a = _last_rows(x, lens, S, w)
    kw = dict(cache_seqlens=torch.tensor(lens), **geom(l, d, lp, n, w), backend="torch")
    step = nsa.nsa_decode(*a, **kw)
    *pools, table = to_pages(a[1], a[2], a[3], a[4], ps, d, seed=seed)
    paged = nsa.nsa_decode(a[0], *pools, a[5], a[6], a[7], block_table=table, **kw)
    shared = nsa.nsa_decode(a[0], *pools, None, None, a[7], block_table=table, **kw)
    for b, t in enumerate(lens):
        tc = nsa.num_cmp_blocks(t, l, d)
        xb = [z[b:b + 1, :tc] if i in (1, 2) else z[b:b + 1, :t] for i, z in enumerate(x)]
        full = nsa.nsa_func(*xb, **geom(l, d, lp, n, w), backend="torch")
        torch.testing.assert_close(step[b:b + 1], full[:, -S:], rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(paged[b:b + 1], full[:, -S:], rtol=1e-12, atol=1e-12)
        xb[5], xb[6] = xb[3], xb[4]  # the window of the slc keys
        full = nsa.nsa_func(*xb, **geom(l, d, lp, n, w), backend="torch")
        torch.testing.assert_close(shared[b:b + 1], full[:, -S:], rtol=1e-12, atol=1e-12)


def _paged_args(lens=(7, 10), ps=4):
    a, kw = _decode_args(lens)
    *pools, table = to_pages(a[1], a[2], a[3], a[4], ps, D)
    return [a[0], *pools, None, None, a[7]], dict(kw, block_table=table)


def _set_table(k, b, j, val):
    t = k["block_table"].clone()
    t[b, j] = val
    k.update(block_table=t)


PAGED_BAD = [
    pytest.param(lambda a, k: _set_table(k, 1, 2, 99), ValueError, ["block_table[1, 2] = 99", "num_pages"],
                 id="page-out-of-range"),
    pytest.param(lambda a, k: _set_table(k, 0, 0, -1), ValueError, ["block_table[0, 0] = -1"], id="page-negative"),
    pytest.param(lambda a, k: k.update(block_table=k["block_table"][:, :2]), ValueError,
                 ["block_table", "10", "3 pages"], id="too-few-pages"),
    pytest.param(lambda a, k: k.update(block_table=k["block_table"].long()), TypeError, ["block_table", "int32"],
                 id="table-dtype"),
    pytest.param(lambda a, k: k.update(block_table=k["block_table"][:1]), ValueError, ["block_table", "[B, max_pages]"],
                 id="table-batch"),
    pytest.param(lambda a, k: k.update(block_table=k["block_table"][0]), ValueError, ["block_table"], id="table-rank"),
    pytest.param(lambda a, k: a.__setitem__(1, a[1][:, :1]), ValueError, ["k_cmp", "page pool", "page_size // d"],
                 id="cmp-pool-rows"),
    pytest.param(lambda a, k: a.__setitem__(4, a[4][:-1]), ValueError, ["v_slc", "page pool"], id="pool-pages-differ"),
    pytest.param(lambda a, k: a.__setitem__(5, a[3]), ValueError, ["k_win", "v_win", "both"], id="one-window-none"),
]


@pytest.mark.parametrize("mut,exc,words", PAGED_BAD)
def test_nsa_decode_bad_block_table(mut, exc, words):
    a, kw = _paged_args()
    nsa.nsa_decode(*a, **kw)  # the unmodified call is fine
    mut(a, kw)
    with pytest.raises(exc) as e:
        nsa.nsa_decode(*a, **kw)
    for word in words:
        assert word in str(e.value), (word, str(e.value))


def test_nsa_decode_page_size_not_a_multiple_of_d():
    a, kw = _decode_args()
    *pools, table = to_pages(a[1], a[2], a[3], a[4], 2 * D, D)
    k, v = pools[2][:, :2 * D - 1], pools[3][:, :2 * D - 1]  # pages of 2d - 1 rows
    with pytest.raises(ValueError, match=f"page_size={2 * D - 1}.*multiple of cmp_stride={D}"):
        nsa.nsa_decode(a[0], pools[0], pools[1], k, v, None, None, a[7], block_table=table, **kw)
