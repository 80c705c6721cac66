"""Branch cmp (semantics §2) as dense causal attention, run by cuDNN on CUDA.

Query t sees compressed token i iff i*d + l - 1 <= t. So the d positions
t = l - 1 + j*d + r (r = 0 .. d-1) all see tokens 0 .. j: query block j against token j is a
causal square. With the offset r as the batch of one attention call, q[b, l - 1 + j*d + r, h]
is the view ``[r, h, j]`` of q (strides HQ*Dk, Dk, d*HQ*Dk): one causal GQA attention of
n x n (n the complete blocks) over the compressed keys, without a copy of q, o, do or dq.
The last block, when T - l + 1 is not a multiple of d, has fewer than d positions, which see
every compressed token: a second, non-causal call. Rows before l - 1 see nothing: o = 0,
lse = -inf.

cuDNN's fused attention runs this at the card's dense-attention rate (what the band kernel's
cmp dk/dv, latency-bound without a producer warp, does not reach; docs/kernels.md). Used by
the Triton backend's forward and backward when :func:`use` holds; the band kernel (MODE 0)
otherwise. Reference: :func:`nsa.reference.compressed_attention_ref`.

The attention calls go through ``attend`` / ``attend_bwd`` (q ``[b, h, s, Dk]``, k and v
``[b, h_kv, s_k, D]``, lse ``[b, h, s]`` fp32): cuDNN's by default, :func:`attend_math` and
:func:`attend_math_bwd` (the same contract in PyTorch) on the CPU, where the tests check the
folding.
"""

from __future__ import annotations

import warnings

import torch
import triton
import triton.language as tl

from . import _common as C

ENABLED = True
"""Whether the Triton backend runs cmp through :func:`cmp_dense` where :func:`use` holds
(False: the band kernel everywhere; for timing one against the other)."""

MIN_LEN = 32768
"""Calls of fewer positions (q's T) keep the band kernel. A training step on an H100, paper
configuration (train_cmp_dense_ab_h100.json): band 13.90 / 29.89 / 179.67 ms at 8k / 16k / 64k,
cuDNN 14.26 / 29.68 / 158.60; cuDNN's backward also holds more memory (its fp32
dq accumulator, ~75 MB per 1k positions: 16.8 -> 21.6 GB at 64k), so at 16k, a tie, the band
kernel stays."""

OFFSETS_PER_CALL = 4
"""The backward's offsets per cuDNN call (:func:`cmp_dense_backward`); None: all d at once.
cuDNN's fp32 dq workspace scales with the offsets of a call. At 64k on an H100 (paper
configuration, train_cmp_dense_opc_h100.json) a training step peaks at 21.6 GB with all 16
offsets at once, 18.8 with 8 a call and 16.8 with 4 (the band kernel's peak), in steps of
160.8 / 162.7 (all at once, twice), 163.6 (8) and 161.2 ms (4); the cmp backward alone
(cmp_dense_opc_h100.json) 38.2 -> 38.5 (8) and 41.7 ms (4)."""

_FAILED: str | None = None  # why a cuDNN call failed in this process (then the band kernel from there on)


@triton.jit
def _gate_split(DO, O, GATES, DOB, DG, n_rows, GIDX: tl.constexpr, DV: tl.constexpr, BV: tl.constexpr,
                BR: tl.constexpr):
    """Eq. 5 for one branch, BR rows a program: DOB = g * do (fp32 product rounded once, as the
    band dq kernel forms it) and DG[., GIDX] = rowsum(do * o) in fp32."""
    r = tl.program_id(0) * BR + tl.arange(0, BR)
    c = tl.arange(0, BV)
    ok = r < n_rows
    m = ok[:, None] & (c[None, :] < DV)
    off = r.to(tl.int64)[:, None] * DV + c[None, :]
    do = tl.load(DO + off, mask=m, other=0.0).to(tl.float32)
    o = tl.load(O + off, mask=m, other=0.0).to(tl.float32)
    g = tl.load(GATES + r.to(tl.int64) * 3 + GIDX, mask=ok, other=0.0).to(tl.float32)
    tl.store(DG + r.to(tl.int64) * 3 + GIDX, tl.sum(do * o, 1), mask=ok)
    tl.store(DOB + off, (do * g[:, None]).to(DOB.dtype.element_ty), mask=m)


def gate_split(do, o, gates, d_gates, gate: int):
    """The branch's do_i = gates[..., gate] * do (in do's dtype) and, into d_gates[..., gate],
    the gate's gradient rowsum(do * o_i): do, o ``[B, T, HQ, Dv]``, gates ``[B, T, HQ, 3]``,
    d_gates fp32 of gates' shape. Reference: :func:`gate_split_ref`."""
    do, o, gates = do.contiguous(), o.contiguous(), gates.contiguous()
    dob = torch.empty_like(do)
    rows, dv = do.numel() // do.shape[-1], do.shape[-1]
    if rows:
        BR = 16
        _gate_split[(C.cdiv(rows, BR),)](do, o, gates, dob, d_gates, rows, GIDX=gate, DV=dv,
                                         BV=C.next_pow2(dv), BR=BR, num_warps=4)
    return dob


def gate_split_ref(do, o, gates, d_gates, gate: int):
    """:func:`gate_split` in PyTorch."""
    d_gates[..., gate] = (do.float() * o.float()).sum(-1)
    return (do.float() * gates[..., gate:gate + 1].float()).to(do.dtype)


def attend_cudnn(q, k, v, causal: bool, scale: float):
    """(o ``[b, h, s, Dv]``, lse ``[b, h, s]`` fp32) of softmax(scale q k^T) v, causal top-left."""
    out = torch.ops.aten._scaled_dot_product_cudnn_attention(q, k, v, None, True, 0.0, causal, False, scale=scale)
    return out[0], out[1].view(q.shape[:3])


def attend_cudnn_bwd(do, q, k, v, o, lse, causal: bool, scale: float):
    """(dq, dk, dv) of :func:`attend_cudnn` from its o and lse."""
    none = torch.empty(0, dtype=torch.int64, device=q.device)  # no dropout: no seed, no offset
    return torch.ops.aten._scaled_dot_product_cudnn_attention_backward(
        do, q, k, v, o, lse.contiguous().unsqueeze(-1), none, none, None, None, None, q.shape[2], k.shape[2],
        0.0, causal, scale=scale)


def _math_scores(q, k, causal: bool, scale: float):
    """scale q k^T in fp32, ``[b, h, s, s_k]``, GQA (query head i reads kv head i // g), the
    causal mask top-left."""
    s = scale * torch.einsum("bhsd,bhkd->bhsk", q.float(), k.repeat_interleave(q.shape[1] // k.shape[1], 1).float())
    if causal:
        s = s.masked_fill(torch.ones(s.shape[-2:], dtype=torch.bool, device=q.device).triu(1), float("-inf"))
    return s


def attend_math(q, k, v, causal: bool, scale: float):
    """:func:`attend_cudnn` in PyTorch (fp32 math, outputs in q's dtype): the CPU stand-in."""
    s = _math_scores(q, k, causal, scale)
    lse = torch.logsumexp(s, -1)
    vr = v.repeat_interleave(q.shape[1] // k.shape[1], 1).float()
    return torch.einsum("bhsk,bhkd->bhsd", torch.exp(s - lse[..., None]), vr).to(q.dtype), lse


def attend_math_bwd(do, q, k, v, o, lse, causal: bool, scale: float):
    """:func:`attend_cudnn_bwd` in PyTorch (recomputes p from q, k and lse)."""
    B, hk, g = q.shape[0], k.shape[1], q.shape[1] // k.shape[1]
    p = torch.exp(_math_scores(q, k, causal, scale) - lse[..., None])
    do32, kr, vr = do.float(), k.repeat_interleave(g, 1).float(), v.repeat_interleave(g, 1).float()
    dv = torch.einsum("bhsk,bhsd->bhkd", p, do32)
    ds = p * (torch.einsum("bhsd,bhkd->bhsk", do32, vr) - (do32 * o.float()).sum(-1, keepdim=True))
    dq = scale * torch.einsum("bhsk,bhkd->bhsd", ds, kr)
    dk = scale * torch.einsum("bhsk,bhsd->bhkd", ds, q.float())
    fold = lambda x: x.view(B, hk, g, *x.shape[2:]).sum(2)  # noqa: E731  (GQA: a kv head's g heads)
    return dq.to(q.dtype), fold(dk).to(k.dtype), fold(dv).to(v.dtype)


def _eligible(q, v_cmp, q_offset: int, deterministic: bool) -> bool:
    """What :func:`use` and :func:`dense_spans` require besides the lengths."""
    HQ, Dk = q.shape[2:]
    Dv = v_cmp.shape[-1]
    return (ENABLED and _FAILED is None and q_offset == 0 and not deterministic
            and q.is_cuda and q.dtype in (torch.bfloat16, torch.float16)
            and all(x % 8 == 0 and x <= 256 for x in (Dk, Dv)) and torch.backends.cudnn.is_available())


def _fits(T: int, q, v_cmp) -> bool:
    """A sequence of T positions is long enough (:data:`MIN_LEN`) and under 2^31 elements a
    tensor (cuDNN's tensor dims and strides are int32)."""
    return T >= MIN_LEN and T * q.shape[2] * max(q.shape[3], v_cmp.shape[-1]) < 2 ** 31


def use(q, v_cmp, *, cu_seqlens, q_offset: int, deterministic: bool = False) -> bool:
    """Whether :func:`cmp_dense` runs the cmp branch of this call (:data:`ENABLED`): at least
    :data:`MIN_LEN` positions from position 0 (q_offset 0), one sequence a batch row (no
    cu_seqlens, or one that holds a single sequence; several packed sequences:
    :func:`dense_spans`), CUDA tensors in bf16/fp16, head dims that cuDNN's fused attention
    takes (multiples of 8, at most 256), a batch element under 2^31 elements, cuDNN present, no
    cuDNN call of this process failed (:func:`attempt`); not ``deterministic`` (the band
    kernel's backward has a fixed order of sums)."""
    one_seq = cu_seqlens is None or (len(cu_seqlens) == 2 and q.shape[0] == 1)  # [0, T]: one sequence
    return one_seq and _fits(q.shape[1], q, v_cmp) and _eligible(q, v_cmp, q_offset, deterministic)


def dense_spans(q, v_cmp, lens, *, cu_seqlens, q_offset: int, deterministic: bool = False) -> list[tuple]:
    """The packed sequences (``cu_seqlens`` of several sequences, q ``[1, T, HQ, Dk]``) that
    :func:`cmp_dense` runs, each of at least :data:`MIN_LEN` positions, under :func:`use`'s
    other conditions: (sequence, q0, q1, c0, c1), its rows of q and of the compressed stream;
    ``lens``: the host lengths of :func:`nsa.triton._common.seq_table`. The band kernel runs
    the others (:func:`band_lens`). Empty where :func:`use` decides (no cu_seqlens, one
    sequence) or no sequence qualifies."""
    if cu_seqlens is None or q.shape[0] != 1 or len(lens) < 2 or not _eligible(q, v_cmp, q_offset, deterministic):
        return []
    spans, q0, c0 = [], 0, 0
    for i, (n, tc) in enumerate(zip(lens, lens.k_cmp)):
        if _fits(n, q, v_cmp):
            spans.append((i, q0, q0 + n, c0, c0 + tc))
        q0, c0 = q0 + n, c0 + tc
    return spans


def band_lens(lens, spans):
    """``lens`` with the query and compressed-key lengths of the sequences in ``spans`` set to 0:
    the band kernel's programs then leave those sequences to :func:`cmp_dense_spans`."""
    dense = {s[0] for s in spans}
    zero = lambda xs: tuple(0 if i in dense else x for i, x in enumerate(xs))  # noqa: E731
    return C.SeqLens(zero(lens), lens.k_slc, lens.k_win, zero(lens.k_cmp))


def attempt(fn, *args, **kwargs):
    """fn(*args, **kwargs), or None when cuDNN refuses the call (a RuntimeError: a card, cuDNN
    version or head-dim pair its fused attention does not support); then :func:`use` is False
    for the rest of the process and one warning says why. The caller runs the band kernel."""
    global _FAILED
    try:
        return fn(*args, **kwargs)
    except RuntimeError as e:
        _FAILED = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
        warnings.warn(f"nsa: cuDNN attention failed for the cmp branch ({_FAILED}); the Triton band kernel "
                      "runs it from now on", RuntimeWarning, stacklevel=2)
        return None


def _plan(T: int, l: int, d: int) -> tuple[int, int, int]:
    """(s0, n, rem): rows from s0 = l - 1 on see compressed tokens; n complete blocks of d
    positions, then rem positions of a last block (which sees n + 1 tokens)."""
    s0 = l - 1
    n = max(0, T - s0) // d
    return s0, n, max(0, T - s0 - n * d)


def _fold(x, b: int, s0: int, n: int, d: int):
    """Rows s0 .. s0 + n*d of batch b of x ``[B, T, H, *D]`` as ``[d, H, n, *D]`` (a view)."""
    rows = x[b, s0:s0 + n * d]
    return rows.view(n, d, *rows.shape[1:]).movedim(0, 2)


def _keys(k, b: int, n: int, reps: int):
    """Compressed tokens 0 .. n-1 of batch b as ``[reps, H, n, D]`` (reps views of one copy)."""
    return k[b, :n].transpose(0, 1).unsqueeze(0).expand(reps, -1, -1, -1)


def cmp_dense(q, k_cmp, v_cmp, *, cmp_block: int, cmp_stride: int, scale: float, attend=attend_cudnn, out=None):
    """Branch cmp: (o ``[B, T, HQ, Dv]`` in q's dtype, lse ``[B, T, HQ]`` fp32); contract of
    :func:`nsa.triton.compressed_attention_triton` (no cu_seqlens, q_offset 0). ``out``: (o, lse)
    to write into (views of a larger pair: :func:`cmp_dense_spans`)."""
    B, T, HQ, _ = q.shape
    Dv = v_cmp.shape[-1]
    s0, n, rem = _plan(T, cmp_block, cmp_stride)
    d = cmp_stride
    if out is None:
        out = q.new_empty(B, T, HQ, Dv), q.new_empty(B, T, HQ, dtype=torch.float32)
    o, lse = out
    o[:, :s0] = 0
    lse[:, :s0] = float("-inf")
    for b in range(B):
        if n:
            ob, lb = attend(_fold(q, b, s0, n, d), _keys(k_cmp, b, n, d), _keys(v_cmp, b, n, d), True, scale)
            _fold(o, b, s0, n, d).copy_(ob)
            _fold(lse, b, s0, n, d).copy_(lb)
        if rem:
            t = s0 + n * d
            ob, lb = attend(q[b, t:].transpose(0, 1).unsqueeze(0), _keys(k_cmp, b, n + 1, 1),
                            _keys(v_cmp, b, n + 1, 1), False, scale)
            o[b, t:] = ob[0].transpose(0, 1)
            lse[b, t:] = lb[0].transpose(0, 1)
    return o, lse


def cmp_dense_backward(q, k_cmp, v_cmp, o, lse, do, *, cmp_block: int, cmp_stride: int, scale: float,
                       dq=None, offsets_per_call=None, attend_bwd=attend_cudnn_bwd):
    """Gradients of :func:`cmp_dense`: (dq, dk_cmp, dv_cmp); o, lse its outputs, do ``[B, T, HQ, Dv]``
    (the branch's own, in q's dtype). dq is stored into ``dq`` when given (fp32 or q's dtype,
    q's shape; rows before l - 1 get 0), else a new tensor in q's dtype; dk, dv in k's / v's
    dtype (each the fp32 sum of the d offsets' shares). ``offsets_per_call`` (default all d):
    the offsets of one backward call; fewer hold less of cuDNN's dq workspace at once (an fp32
    copy of the call's dq: 3.2 GB at 64k in the paper configuration with all 16)."""
    B, T, HQ, Dk = q.shape
    s0, n, rem = _plan(T, cmp_block, cmp_stride)
    d = cmp_stride
    step = d if offsets_per_call is None else max(1, min(d, int(offsets_per_call)))
    dq = torch.empty_like(q) if dq is None else dq
    dk = torch.zeros(k_cmp.shape, dtype=torch.float32, device=q.device)
    dv = torch.zeros(v_cmp.shape, dtype=torch.float32, device=q.device)
    dq[:, :s0] = 0
    for b in range(B):
        for r in range(0, d if n else 0, step):
            part = lambda x: _fold(x, b, s0, n, d)[r:r + step]  # noqa: E731  offsets r .. r + step - 1
            m = min(step, d - r)
            gq, gk, gv = attend_bwd(part(do), part(q), _keys(k_cmp, b, n, m), _keys(v_cmp, b, n, m), part(o),
                                    part(lse), True, scale)
            part(dq).copy_(gq)
            dk[b, :n] += gk.sum(0, dtype=torch.float32).transpose(0, 1)
            dv[b, :n] += gv.sum(0, dtype=torch.float32).transpose(0, 1)
        if rem:
            t = s0 + n * d
            row = lambda x: x[b, t:].transpose(0, 1).unsqueeze(0)  # noqa: E731  [1, H, rem, D]
            gq, gk, gv = attend_bwd(row(do), row(q), _keys(k_cmp, b, n + 1, 1), _keys(v_cmp, b, n + 1, 1),
                                    row(o), row(lse), False, scale)
            dq[b, t:] = gq[0].transpose(0, 1)
            dk[b, :n + 1] += gk[0].transpose(0, 1)
            dv[b, :n + 1] += gv[0].transpose(0, 1)
    return dq, dk.to(k_cmp.dtype), dv.to(v_cmp.dtype)


def cmp_dense_spans(q, k_cmp, v_cmp, o, lse, spans, *, cmp_block: int, cmp_stride: int, scale: float):
    """:func:`cmp_dense` of each packed sequence in ``spans`` (:func:`dense_spans`), into its rows
    of o ``[1, T, HQ, Dv]`` and lse ``[1, T, HQ]`` (the band kernel writes the others)."""
    for _, a, b, c0, c1 in spans:
        cmp_dense(q[:, a:b], k_cmp[:, c0:c1], v_cmp[:, c0:c1], cmp_block=cmp_block, cmp_stride=cmp_stride,
                  scale=scale, out=(o[:, a:b], lse[:, a:b]))
    return o, lse


def gated_backward_spans(grad_o, q, k_cmp, v_cmp, o, lse, gates, d_gates, spans, dk, dv, *, cmp_block: int,
                         cmp_stride: int, scale: float, dq):
    """:func:`gated_backward` of each packed sequence in ``spans``: its rows of dq and d_gates[..., 0]
    and its compressed keys' rows of dk, dv (the band kernel's backward did the other sequences,
    leaving these rows of dk and dv 0). (dq, dk, dv)."""
    for _, a, b, c0, c1 in spans:
        _, gk, gv = gated_backward(grad_o[:, a:b], q[:, a:b], k_cmp[:, c0:c1], v_cmp[:, c0:c1], o[:, a:b],
                                   lse[:, a:b], gates[:, a:b], d_gates[:, a:b], cmp_block=cmp_block,
                                   cmp_stride=cmp_stride, scale=scale, dq=dq[:, a:b])
        dk[:, c0:c1] = gk
        dv[:, c0:c1] = gv
    return dq, dk, dv


def gated_backward(grad_o, q, k_cmp, v_cmp, o, lse, gates, d_gates, *, cmp_block: int, cmp_stride: int,
                   scale: float, dq=None):
    """The cmp branch's share of NSA's backward from the gated output's gradient ``grad_o``: Eq. 5
    (:func:`gate_split`: the branch's do and, into d_gates[..., 0], the gate's gradient), then
    :func:`cmp_dense_backward` (:data:`OFFSETS_PER_CALL` offsets a call). (dq, dk_cmp, dv_cmp)."""
    do_cmp = gate_split(grad_o, o, gates, d_gates, 0)
    return cmp_dense_backward(q, k_cmp, v_cmp, o, lse, do_cmp, cmp_block=cmp_block, cmp_stride=cmp_stride,
                              scale=scale, dq=dq, offsets_per_call=OFFSETS_PER_CALL)
