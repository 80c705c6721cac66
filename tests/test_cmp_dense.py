"""The cmp branch as one dense causal attention (nsa.triton.cmp_dense) against the reference.

On the CPU the attention calls are :func:`attend_math` (PyTorch, fp32), so what these tests
check is the folding: the d offsets as a batch over views of q, o, do, lse and dq, the short
last block, the rows that see nothing, the dk/dv sums over the offsets. On a GPU, cases of
the paper's geometry also run through cuDNN (bf16, against the band kernel's own error). The
gate kernel runs under TRITON_INTERPRET=1 without CUDA.
"""

from __future__ import annotations

import math
import os
import sys

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"  # before any kernel module is imported
    for _m in [m for m in sys.modules if m.startswith("nsa.triton")]:
        del sys.modules[_m]

pytest.importorskip("triton")

from nsa import reference as R  # noqa: E402
from nsa.triton import cmp_dense as CD  # noqa: E402

CUDA = torch.cuda.is_available()


def _live_module():
    """nsa.triton.cmp_dense as the kernels that nsa_func runs see it: other test files drop the
    nsa.triton modules and import them again (to build the kernels for the interpreter), so the
    CD imported above may no longer be the one that nsa.triton.nsa and .backward call."""
    import importlib

    live = importlib.import_module("nsa.triton.nsa").cmp_dense
    assert importlib.import_module("nsa.triton.backward").cmp_dense is live
    return live


def _case(B, T, HQ, H, Dk, Dv, l, d, seed=0, dtype=torch.float64, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    tc = 0 if T < l else (T - l) // d + 1
    mk = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64).to(dtype).to(device)  # noqa: E731
    return mk(B, T, HQ, Dk), mk(B, tc, H, Dk), mk(B, tc, H, Dv), mk(B, T, HQ, Dv)


def _reference(q, k, v, do, l, d):
    leaves = [x.detach().double().requires_grad_() for x in (q, k, v)]
    o, lse = R.compressed_attention_ref(*leaves, cmp_block=l, cmp_stride=d)
    return [o.detach(), lse.detach(), *torch.autograd.grad(o, leaves, do.double())]


def _folded(q, k, v, do, l, d, attend=CD.attend_math, attend_bwd=CD.attend_math_bwd, per_call=None):
    sc = 1 / math.sqrt(q.shape[-1])
    o, lse = CD.cmp_dense(q, k, v, cmp_block=l, cmp_stride=d, scale=sc, attend=attend)
    dq = torch.full(q.shape, float("nan"), dtype=torch.float32, device=q.device)  # every row gets stored
    _, dk, dv = CD.cmp_dense_backward(q, k, v, o, lse, do, cmp_block=l, cmp_stride=d, scale=sc, dq=dq,
                                      offsets_per_call=per_call, attend_bwd=attend_bwd)
    return [o, lse, dq, dk, dv]


# (B, T, HQ, H, Dk, Dv, l, d)
CASES = [
    pytest.param(1, 95, 4, 2, 16, 8, 32, 16, id="last-block-full"),  # T - l + 1 = 64: no short block
    pytest.param(2, 100, 4, 2, 16, 8, 32, 16, id="batch2-short-last-block"),
    pytest.param(1, 33, 8, 1, 16, 16, 32, 16, id="one-token-gqa8"),  # rows 31, 32: one block of 2
    pytest.param(1, 20, 2, 1, 8, 8, 32, 16, id="no-token"),  # T < l: o = 0, lse = -inf everywhere
    pytest.param(1, 70, 16, 4, 192, 128, 32, 16, id="paper-dims-gqa4"),
    pytest.param(2, 63, 6, 3, 24, 8, 8, 4, id="gqa2-l8-d4"),
    pytest.param(1, 41, 4, 4, 8, 8, 16, 16, id="mha-l16-d16"),
    pytest.param(1, 50, 64, 1, 8, 8, 16, 8, id="gqa64"),
]


@pytest.mark.parametrize("B,T,HQ,H,Dk,Dv,l,d", CASES)
@pytest.mark.parametrize("per_call", [None, 3], ids=["offsets-at-once", "offsets-3-a-call"])
def test_cmp_dense_matches_reference(B, T, HQ, H, Dk, Dv, l, d, per_call):
    """o, lse, dq, dk, dv against autograd through the reference, fp64 inputs (fp32 math):
    relative error <= 1e-5; rows that see no token have lse -inf and zero o and dq. The
    backward takes the d offsets at once, or 3 a call (the last call fewer)."""
    q, k, v, do = _case(B, T, HQ, H, Dk, Dv, l, d)
    ref = _reference(q, k, v, do, l, d)
    got = _folded(q, k, v, do, l, d, per_call=per_call)
    for name, a, r in zip(["o", "lse", "dq", "dk", "dv"], got, ref):
        fin = torch.isfinite(r)
        assert torch.equal(torch.isfinite(a), fin), name
        if fin.any():
            err = (a.double() - r)[fin].abs().max().item()
            assert err <= 1e-5 * max(1.0, r[fin].abs().max().item()), (name, err)
    assert not got[0][:, :l - 1].any() and not got[2][:, :l - 1].any()


@settings(max_examples=25, deadline=None)
@given(T=st.integers(1, 90), l_d=st.sampled_from([(8, 4), (16, 8), (32, 16), (8, 8), (12, 4)]),
       H=st.sampled_from([1, 2]), g=st.sampled_from([1, 3, 4]), B=st.integers(1, 2))
def test_cmp_dense_any_length(T, l_d, H, g, B):
    """Every length (short last blocks of every size, none at all), against the reference."""
    l, d = l_d
    q, k, v, do = _case(B, T, H * g, H, 8, 8, l, d, seed=T)
    for a, r in zip(_folded(q, k, v, do, l, d), _reference(q, k, v, do, l, d)):
        fin = torch.isfinite(r)
        assert torch.equal(torch.isfinite(a), fin)
        assert torch.allclose(a.double()[fin], r[fin], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gate_split_kernel(dtype):
    """The gate kernel against its reference: do_i exactly on a GPU (one rounding of the fp32 product),
    the gate's gradient to fp32 summation order; only column ``gate`` of d_gates is written."""
    dev = "cuda" if CUDA else "cpu"
    g = torch.Generator().manual_seed(1)
    do, o = (torch.randn(2, 9, 3, 40, generator=g).to(dtype).to(dev) for _ in range(2))
    gates = torch.rand(2, 9, 3, 3, generator=g).to(dtype).to(dev)
    dg, dg_ref = (torch.full(gates.shape, 7.0, device=dev) for _ in range(2))
    got = CD.gate_split(do, o, gates, dg, 1)
    ref = CD.gate_split_ref(do, o, gates, dg_ref, 1)
    if CUDA or dtype == torch.float32:
        assert torch.equal(got, ref)
    else:  # the interpreter's fp32 -> bf16 cast truncates where the GPU rounds: one ulp apart
        torch.testing.assert_close(got, ref, rtol=2 ** -7, atol=0)
    torch.testing.assert_close(dg, dg_ref, rtol=1e-6, atol=1e-5)
    assert (dg[..., 0] == 7).all() and (dg[..., 2] == 7).all()


def test_use_needs_cuda_bf16_dense_rows(monkeypatch):
    """The Triton backend takes the folded path only for CUDA bf16/fp16 without cu_seqlens or
    q_offset; the CPU always takes the band kernel, whatever the length."""
    monkeypatch.setattr(CD, "MIN_LEN", 0)
    q, _, v, _ = _case(1, 64, 4, 2, 16, 16, 32, 16, dtype=torch.bfloat16)
    assert not CD.use(q, v, cu_seqlens=None, q_offset=0)


@pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
@pytest.mark.gpu
@pytest.mark.parametrize("B,T", [(2, 1000), (1, 1039), (1, 4111)])
def test_gpu_cmp_dense_bf16(B, T):
    """cuDNN, paper geometry, bf16: each output's relative error against fp64 within 2x of the
    band kernel's (+1e-3)."""
    from nsa.triton.backward import compressed_attention_backward
    from nsa.triton.compressed import compressed_attention_triton

    q, k, v, do = _case(B, T, 64, 4, 192, 128, 32, 16, dtype=torch.bfloat16, device="cuda")
    ref = _reference(q, k, v, do, 32, 16)
    ob, lb = compressed_attention_triton(q, k, v)
    band = [ob, lb, *compressed_attention_backward(q, k, v, ob, lb, do)]
    got = _folded(q, k, v, do, 32, 16, CD.attend_cudnn, CD.attend_cudnn_bwd)
    for a, b, r in zip(got, band, ref):
        fin = torch.isfinite(r)
        rel = lambda x: ((x.double() - r)[fin].norm() / r[fin].norm()).item()  # noqa: E731
        assert rel(a) <= 2 * rel(b) + 1e-3, (rel(a), rel(b))


def test_attempt_falls_back_once_cuDNN_refuses(monkeypatch):
    """A RuntimeError from cuDNN (unsupported card, version or head dims) returns None with one
    warning naming it and turns the folded path off for the process; other errors propagate."""
    monkeypatch.setattr(CD, "_FAILED", None)
    assert CD.attempt(lambda x: x + 1, 1) == 2 and CD._FAILED is None

    def refuse(*_):
        raise RuntimeError("cuDNN Frontend error: no valid engine configs\nmore")

    with pytest.warns(RuntimeWarning, match="no valid engine configs"):
        assert CD.attempt(refuse) is None
    assert CD._FAILED.startswith("cuDNN Frontend error")
    with pytest.raises(ValueError):
        CD.attempt(lambda: (_ for _ in ()).throw(ValueError("a bug, not cuDNN")))


@pytest.mark.parametrize("B,T,one_seq", [(1, 45, False), (2, 38, False), (1, 41, True)])
def test_nsa_func_with_folded_cmp_matches_reference(B, T, one_seq, monkeypatch):
    """The Triton backend with the folded cmp switched on (on the CPU, with the PyTorch
    stand-in for cuDNN): the output and all eight gradients equal autograd through the
    reference (fp32), so the gate kernel, the dq buffer's first share and the window's dq
    kernel that follows are wired as the band kernel's path was; also with cu_seqlens that
    hold one sequence, which the folded path takes."""
    import functools

    import nsa

    live = _live_module()
    monkeypatch.setattr(live, "use", lambda *a, **k: True)
    ran = []
    folded, folded_bwd = (functools.partial(live.cmp_dense, attend=live.attend_math),
                          functools.partial(live.cmp_dense_backward, attend_bwd=live.attend_math_bwd))
    monkeypatch.setattr(live, "cmp_dense", lambda *a, **k: ran.append("f") or folded(*a, **k))
    monkeypatch.setattr(live, "cmp_dense_backward", lambda *a, **k: ran.append("b") or folded_bwd(*a, **k))
    HQ, H, Dk, Dv, l, d = 4, 2, 32, 16, 8, 4
    g = torch.Generator().manual_seed(T)
    mk = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    k, v = mk(B, T, H, Dk), mk(B, T, H, Dv)
    args = [mk(B, T, HQ, Dk), R.compress_mean(k, l, d), R.compress_mean(v, l, d), k, v, mk(B, T, H, Dk),
            mk(B, T, H, Dv), torch.rand(B, T, HQ, 3, generator=g)]
    do = mk(B, T, HQ, Dv)
    kw = dict(cmp_block=l, cmp_stride=d, sel_block=8, sel_count=3, window=10)
    if one_seq:
        kw["cu_seqlens"] = torch.tensor([0, T], dtype=torch.int32)
    grads = []
    for fn in (lambda *a: nsa.nsa_func(*a, backend="triton", **kw), lambda *a: R.nsa_ref(*a, **kw)):
        leaves = [x.clone().requires_grad_() for x in args]
        o = fn(*leaves)
        grads.append([o.detach(), *torch.autograd.grad(o, leaves, do)])
    for name, a, r in zip(["o", "q", "k_cmp", "v_cmp", "k_slc", "v_slc", "k_win", "v_win", "gates"], *grads):
        err = (a - r).abs().max().item()
        assert err <= 1e-4 * max(1.0, r.abs().max().item()), (name, err)
    assert ran == ["f", "b"]  # the folded path ran, forward and backward


@pytest.mark.parametrize("cu,long", [pytest.param([0, 45, 52, 100], [0, 2], id="long-short-long"),
                                     pytest.param([0, 9, 50, 53], [1], id="short-long-short"),
                                     pytest.param([0, 41, 90], [0, 1], id="all-long")])
def test_nsa_func_packed_long_sequences_through_cudnn(cu, long, monkeypatch):
    """A packed batch (cu_seqlens of several sequences): the sequences of at least MIN_LEN
    positions run the folded cmp (the PyTorch stand-in for cuDNN on the CPU), the band kernel the
    others, forward and backward; the output and all eight gradients equal the reference's, and
    each path ran the sequences it should (recorded)."""
    import functools

    import nsa

    live = _live_module()
    monkeypatch.setattr(live, "MIN_LEN", 40)
    monkeypatch.setattr(live, "_eligible", lambda *a: True)  # the CUDA/cuDNN conditions, on the CPU
    ran = []  # (forward or backward, positions) of each folded call

    def record(fn, tag):
        def run(q, *a, **k):
            ran.append((tag, q.shape[1]))
            return fn(q, *a, **k)
        return run

    monkeypatch.setattr(live, "cmp_dense", record(functools.partial(live.cmp_dense, attend=live.attend_math), "f"))
    monkeypatch.setattr(live, "cmp_dense_backward", record(
        functools.partial(live.cmp_dense_backward, attend_bwd=live.attend_math_bwd), "b"))
    HQ, H, Dk, Dv, l, d, T = 8, 1, 32, 16, 8, 4, cu[-1]
    g = torch.Generator().manual_seed(T)
    mk = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    k, v = mk(1, T, H, Dk), mk(1, T, H, Dv)
    spans = list(zip(cu[:-1], cu[1:]))
    comp = lambda x: torch.cat([R.compress_mean(x[:, a:b], l, d) for a, b in spans], 1)  # noqa: E731
    args = [mk(1, T, HQ, Dk), comp(k), comp(v), k, v, mk(1, T, H, Dk), mk(1, T, H, Dv),
            torch.rand(1, T, HQ, 3, generator=g)]
    do = mk(1, T, HQ, Dv)
    # a window of 44: the window's dk/dv has whole query tiles (8 positions x 32 keys under the
    # interpreter), which read the group-major q copy that the window's dq kernel writes for the
    # sequences that cuDNN ran
    kw = dict(cmp_block=l, cmp_stride=d, sel_block=8, sel_count=3, window=44,
              cu_seqlens=torch.tensor(cu, dtype=torch.int32))
    grads = []
    for fn in (lambda *a: nsa.nsa_func(*a, backend="triton", **kw), lambda *a: R.nsa_ref(*a, **kw)):
        leaves = [x.clone().requires_grad_() for x in args]
        o = fn(*leaves)
        grads.append([o.detach(), *torch.autograd.grad(o, leaves, do)])
    lengths = [spans[i][1] - spans[i][0] for i in long]
    assert ran == [("f", n) for n in lengths] + [("b", n) for n in lengths]
    for name, a, r in zip(["o", "q", "k_cmp", "v_cmp", "k_slc", "v_slc", "k_win", "v_win", "gates"], *grads):
        err = (a - r).abs().max().item()
        assert err <= 1e-4 * max(1.0, r.abs().max().item()), (name, err)


@pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
@pytest.mark.gpu
def test_gpu_use_conditions():
    """On a GPU: bf16 from MIN_LEN positions, one sequence (cu_seqlens of one or none), no
    q_offset, not deterministic, not fp32."""
    T = CD.MIN_LEN
    q = torch.zeros(1, T, 4, 16, device="cuda", dtype=torch.bfloat16)
    v = torch.zeros(1, (T - 32) // 16 + 1, 2, 16, device="cuda", dtype=torch.bfloat16)
    one, two = torch.tensor([0, T]), torch.tensor([0, 5, T])
    assert CD.use(q, v, cu_seqlens=None, q_offset=0) and CD.use(q, v, cu_seqlens=one, q_offset=0)
    assert not CD.use(q, v, cu_seqlens=two, q_offset=0)
    assert not CD.use(q, v, cu_seqlens=None, q_offset=1)
    assert not CD.use(q, v, cu_seqlens=None, q_offset=0, deterministic=True)
    assert not CD.use(q.float(), v.float(), cu_seqlens=None, q_offset=0)
    assert not CD.use(q[:, :T - 1], v, cu_seqlens=None, q_offset=0)


@pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
@pytest.mark.gpu
def test_gpu_packed_long_sequences_through_cudnn(monkeypatch):
    """On a GPU, paper geometry, bf16: a packed batch whose long sequences run cmp through cuDNN
    (dense_spans with MIN_LEN lowered) gives the output and gradients of the band kernel's run
    (ENABLED off) within bf16 rounding, and dense_spans picks the long ones."""
    import nsa

    live = _live_module()
    monkeypatch.setattr(live, "MIN_LEN", 1024)
    cu = [0, 1500, 1700, 3300]
    HQ, H, Dk, Dv, l, d, T = 64, 4, 192, 128, 32, 16, cu[-1]
    g = torch.Generator(device="cuda").manual_seed(7)
    mk = lambda *s: torch.randn(*s, device="cuda", generator=g).to(torch.bfloat16)  # noqa: E731
    k, v = mk(1, T, H, Dk), mk(1, T, H, Dv)
    comp = lambda x: torch.cat([R.compress_mean(x[:, a:b], l, d) for a, b in zip(cu[:-1], cu[1:])], 1)  # noqa: E731
    args = [mk(1, T, HQ, Dk), comp(k), comp(v), k, v, mk(1, T, H, Dk), mk(1, T, H, Dv),
            torch.rand(1, T, HQ, 3, device="cuda", generator=g).to(torch.bfloat16)]
    do = mk(1, T, HQ, Dv)
    cu_t = torch.tensor(cu, dtype=torch.int32, device="cuda")
    kw = dict(cmp_block=l, cmp_stride=d, cu_seqlens=cu_t)
    from nsa.triton._common import seq_table
    _, lens = seq_table(1, T, T, T, args[1].shape[1], cu_t, l, d, "cuda")
    assert [s[0] for s in live.dense_spans(args[0], args[2], lens, cu_seqlens=cu_t, q_offset=0)] == [0, 2]
    runs = []
    for on in (True, False):
        monkeypatch.setattr(live, "ENABLED", on)
        leaves = [x.clone().requires_grad_() for x in args]
        o = nsa.nsa_func(*leaves, backend="triton", **kw)
        runs.append([o.detach(), *torch.autograd.grad(o, leaves, do)])
    for name, a, b in zip(["o", "q", "k_cmp", "v_cmp", "k_slc", "v_slc", "k_win", "v_win", "gates"], *runs):
        rel = ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()
        assert rel < 2e-2, (name, rel)
