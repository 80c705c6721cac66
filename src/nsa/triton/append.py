"""A decode step's cache bookkeeping in two launches (:meth:`nsa.NSACache.append_step_projected`,
:meth:`nsa.cache.PagedBatch.append_step_projected`).

A step replayed as a CUDA graph at small batch and context pays per launch (a couple of
microseconds each whatever it does), and the step's bookkeeping was most of an NSA layer's
launches: the rotation of q and the keys (cat, gather of the cos/sin rows, roll, products, sum,
cast), the writes of the selection keys and the window's ring, the shift of the raw compression
tail, the compressed token's conditional write. :func:`_decode_append`, one program per
(sequence, KV head), rotates the group's query heads and the new keys of every branch by the
position's row of the rotation table, writes them where the cache keeps them, and returns the
raw block ending at the new position (what the compression phi pools) with the tail moved up
by one; :func:`_decode_compress_write` computes phi (the layer's compressor: the mean, or its
MLP) of that block and writes the token where the position completes a block, returning at
once on the other steps: two launches a step where phi in PyTorch took a dozen more.
:func:`_decode_write_cmp` writes a token computed elsewhere (another phi). Contiguous caches and
page pools through a block table (constexpr ``PS``, the page size) alike.

References: :func:`nsa.cache.decode_append_ref`, :func:`nsa.cache.compress_write_step_ref`,
:func:`nsa.cache.write_cmp_step_ref` (same signatures).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import _common as C


@triton.jit
def _rotate(base, rope, cols, ok, DK: tl.constexpr):
    """Rows at ``base`` (offsets [R, 1], columns ``cols`` [1, BD]) rotated by the table row
    ``rope`` ([cos, cos] then [-sin, sin], DK each): x * c + roll(x, DK / 2) * s, fp32."""
    x = tl.load(base + cols, mask=ok, other=0.0).to(tl.float32)
    xr = tl.load(base + (cols + DK // 2) % DK, mask=ok, other=0.0).to(tl.float32)
    c = tl.load(rope + cols, mask=cols < DK, other=0.0)
    s = tl.load(rope + DK + cols, mask=cols < DK, other=0.0)
    return x * c + xr * s


@triton.jit
def _to_cache(x, KDT: tl.constexpr, CDT: tl.constexpr, EMU_K: tl.constexpr, EMU_C: tl.constexpr):
    """fp32 x rounded to the projections' dtype KDT (as the layer's rotation returns it), then
    to the cache's CDT, each to nearest even (emulated where the CPU interpreter truncates)."""
    return C.round_out(C.round_out(x, KDT, EMU_K).to(tl.float32), CDT, EMU_C)


@triton.jit
def _rows(BT, sl, p, base, MAXP, NPAGES, PS: tl.constexpr, PER: tl.constexpr, STRIDE: tl.constexpr):
    """Rows (int64) of items p of a sequence: contiguous (PS = 0) base + p; paged, row p % PER of
    page ``BT[sl, p * STRIDE // PS]`` (a pool of PER rows a page), the page clamped into the pool
    so that a bad table never writes outside it."""
    if PS > 0:
        pg = tl.load(BT + sl * MAXP + (p * STRIDE) // PS)
        pg = tl.minimum(tl.maximum(pg, 0), NPAGES - 1).to(tl.int64)
        return pg * PER + p % PER
    else:
        return base + p


@triton.jit
def _decode_append(QP, KVP, POS, ROPE, QOUT, KS, VS, KW, VW, KT, VT, RAWK, RAWV, BT, SLOT, CAP, RING, MAXP,
                   NPAGES, HQ: tl.constexpr, H: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr,
                   NBR: tl.constexpr, L: tl.constexpr, HP: tl.constexpr, BL: tl.constexpr,
                   BDK: tl.constexpr, BDV: tl.constexpr, PS: tl.constexpr, EMU_K: tl.constexpr,
                   EMU_C: tl.constexpr):
    """Program (b, h). Contiguous caches (PS = 0): k_slc/v_slc [B, CAP, H, D], rings [B, RING,
    H, D], tails [B, L - 1, H, D]. Paged (PS = page size): k_slc/v_slc pools [num_pages, PS, H,
    D] through the block table BT [max_batch, MAXP], rings and tails of the cache's slots
    SLOT[b]."""
    b = tl.program_id(0)
    h = tl.program_id(1)
    G: tl.constexpr = HQ // H
    W: tl.constexpr = H * (DK + DV)  # one branch's k and v in a row of the kv projection
    s = tl.load(POS + b).to(tl.int64)
    sl = tl.load(SLOT + b).to(tl.int64) if PS > 0 else b.to(tl.int64)  # the slot of the ring and tail
    rope = ROPE + s * (2 * DK)
    ck = tl.arange(0, BDK)[None, :]
    cv = tl.arange(0, BDV)[None, :]
    k_ok = ck < DK
    v_ok = cv < DV
    row = tl.arange(0, HP)[:, None]
    # the group's query heads, rotated, in q's dtype
    q_at = (b * HQ + h * G + row).to(tl.int64) * DK
    q = _rotate(QP + q_at, rope, ck, (row < G) & k_ok, DK)
    tl.store(QOUT + q_at + ck, C.round_out(q, QOUT.dtype.element_ty, EMU_K), mask=(row < G) & k_ok)

    kv = KVP + b.to(tl.int64) * (NBR * W)
    SLC: tl.constexpr = 0 if NBR == 1 else 1  # the branches' order: cmp, slc, win
    kd = KS.dtype.element_ty
    pd = KVP.dtype.element_ty
    at_s = _rows(BT, sl, s, b * CAP, MAXP, NPAGES, PS, PS, 1) * H + h
    k_s = _to_cache(_rotate(kv + SLC * W + h * DK, rope, ck, k_ok, DK), pd, kd, EMU_K, EMU_C)
    v_s = C.round_out(tl.load(kv + SLC * W + H * DK + h * DV + cv, mask=v_ok).to(tl.float32), kd, EMU_C)
    tl.store(KS + at_s * DK + ck, k_s, mask=k_ok)
    tl.store(VS + at_s * DV + cv, v_s, mask=v_ok)

    r = tl.arange(0, BL)[:, None]  # the raw block's rows: positions s - L + 1 + r
    raw_k_at = ((b * L + r) * H + h).to(tl.int64)
    if NBR == 1:  # shared k/v: the block from the selection's keys (clamped at position 0)
        p = tl.maximum(s - (L - 1) + r, 0)
        old = (r < L) & (p != s)  # the new position comes from registers, not memory
        at_p = _rows(BT, sl, p, b * CAP, MAXP, NPAGES, PS, PS, 1) * H + h
        rk = tl.load(KS + at_p * DK + ck, mask=old & k_ok, other=0.0)
        rv = tl.load(VS + at_p * DV + cv, mask=old & v_ok, other=0.0)
        rk = tl.where(old, rk, k_s)
        rv = tl.where(old, rv, v_s)
    else:
        # window: the ring's row s % RING
        at_w = ((sl * RING + s % RING) * H + h)
        k_w = _to_cache(_rotate(kv + 2 * W + h * DK, rope, ck, k_ok, DK), pd, kd, EMU_K, EMU_C)
        v_w = C.round_out(tl.load(kv + 2 * W + H * DK + h * DV + cv, mask=v_ok).to(tl.float32), kd, EMU_C)
        tl.store(KW + at_w * DK + ck, k_w, mask=k_ok)
        tl.store(VW + at_w * DV + cv, v_w, mask=v_ok)
        # compression: the tail's L - 1 rows, then the new (rotated) key / value
        k_c = _to_cache(_rotate(kv + h * DK, rope, ck, k_ok, DK), pd, kd, EMU_K, EMU_C)
        v_c = C.round_out(tl.load(kv + H * DK + h * DV + cv, mask=v_ok).to(tl.float32), kd, EMU_C)
        tail = r < L - 1
        at_t = ((sl * (L - 1) + r) * H + h).to(tl.int64)
        rk = tl.load(KT + at_t * DK + ck, mask=tail & k_ok, other=0.0)
        rv = tl.load(VT + at_t * DV + cv, mask=tail & v_ok, other=0.0)
        rk = tl.where(tail, rk, k_c)
        rv = tl.where(tail, rv, v_c)
        # the tail moves up by one: row r takes block row r + 1 (every load above is done first)
        tl.debug_barrier()
        up = (r >= 1) & (r < L)
        at_u = ((sl * (L - 1) + r - 1) * H + h).to(tl.int64)
        tl.store(KT + at_u * DK + ck, rk, mask=up & k_ok)
        tl.store(VT + at_u * DV + cv, rv, mask=up & v_ok)
    tl.store(RAWK + raw_k_at * DK + ck, rk, mask=(r < L) & k_ok)
    tl.store(RAWV + raw_k_at * DV + cv, rv, mask=(r < L) & v_ok)


@triton.jit
def _decode_write_cmp(POS, TOKK, TOKV, KC, VC, BT, SLOT, TC, MAXP, NPAGES, H: tl.constexpr, DK: tl.constexpr,
                      DV: tl.constexpr, L: tl.constexpr, D: tl.constexpr, BDK: tl.constexpr, BDV: tl.constexpr,
                      PS: tl.constexpr):
    """Program (b, h): the step's compressed token of sequence b, head h, written to row
    i = (s + 1 - L) / D of k_cmp / v_cmp where the new position s completes that block
    (contiguous [B, TC, H, D]; paged, pools of PS / D rows a page, row i % (PS / D) of page
    ``BT[SLOT[b], i * D // PS]``)."""
    b = tl.program_id(0)
    h = tl.program_id(1)
    s = tl.load(POS + b).to(tl.int64)
    due = (s + 1 >= L) & ((s + 1 - L) % D == 0)
    slot = tl.where(due, (s + 1 - L) // D, 0)
    ck = tl.arange(0, BDK)
    cv = tl.arange(0, BDV)
    sl = tl.load(SLOT + b).to(tl.int64) if PS > 0 else b.to(tl.int64)
    at = _rows(BT, sl, slot, b * TC, MAXP, NPAGES, PS, PS // D if PS > 0 else 1, D) * H + h
    src = b * H + h
    mk = tl.where(due, ck < DK, False)  # (not `ck < DK & due`: the interpreter rejects that mask)
    mv = tl.where(due, cv < DV, False)
    tl.store(KC + at * DK + ck, tl.load(TOKK + src * DK + ck, mask=mk), mask=mk)
    tl.store(VC + at * DV + cv, tl.load(TOKV + src * DV + cv, mask=mv), mask=mv)


@triton.jit
def _phi_in(RAW, PE, row, t, d, ok, H: tl.constexpr, D: tl.constexpr, MLP: tl.constexpr, LDT: tl.constexpr,
            EMU: tl.constexpr):
    """The compressor's input at block row t, column d: the raw key in the layer's dtype LDT, plus
    the position embedding (MLP), each result rounded to LDT as PyTorch's ops round theirs."""
    x = C.round_out(tl.load(RAW + (row + t * H) * D + d, mask=ok, other=0.0).to(tl.float32), LDT, EMU)
    x = x.to(tl.float32)
    if MLP:
        pe = C.round_out(tl.load(PE + t * D + d, mask=ok, other=0.0).to(tl.float32), LDT, EMU).to(tl.float32)
        x = C.round_out(x + pe, LDT, EMU).to(tl.float32)
    return x


@triton.jit
def _phi(RAW, PE, W1, B1, W2, B2, row, H: tl.constexpr, D: tl.constexpr, L: tl.constexpr, HID: tl.constexpr,
         BD: tl.constexpr, BL: tl.constexpr, BH: tl.constexpr, BF: tl.constexpr, MLP: tl.constexpr,
         LDT: tl.constexpr, EMU: tl.constexpr):
    """:class:`nsa.layer.Compressor` over one raw block (rows ``row + t * H`` of RAW ``[.., D]``):
    the block's mean, plus with MLP ``fc2(silu(fc1(x flattened t-major)))`` (W1 ``[HID, L * D]``,
    W2 ``[D, HID]``). fp32 ``[BD]`` holding values of LDT: each op's output rounded to LDT."""
    t = tl.arange(0, BL)
    d = tl.arange(0, BD)
    x = _phi_in(RAW, PE, row, t[:, None], d[None, :], (t[:, None] < L) & (d[None, :] < D), H, D, MLP, LDT, EMU)
    tok = C.round_out(tl.sum(x, 0) * (1.0 / L), LDT, EMU).to(tl.float32)  # [BD]
    if MLP:
        j = tl.arange(0, BH)
        acc = tl.zeros([BH], dtype=tl.float32)
        for f0 in range(0, L * D, BF):  # fc1, BF inputs (index t * D + d) at a time
            f = f0 + tl.arange(0, BF)
            f_ok = f < L * D
            xf = _phi_in(RAW, PE, row, f // D, f % D, f_ok, H, D, MLP, LDT, EMU)
            w = tl.load(W1 + j[:, None] * (L * D) + f[None, :], mask=(j[:, None] < HID) & f_ok[None, :], other=0.0)
            acc += tl.sum(w.to(tl.float32) * xf[None, :], 1)
        h1 = acc + tl.load(B1 + j, mask=j < HID, other=0.0).to(tl.float32)
        h1 = C.round_out(h1, LDT, EMU).to(tl.float32)
        a = C.round_out(h1 / (1.0 + tl.exp(-h1)), LDT, EMU).to(tl.float32)  # silu
        w2 = tl.load(W2 + d[:, None] * HID + j[None, :], mask=(d[:, None] < D) & (j[None, :] < HID), other=0.0)
        o2 = tl.sum(w2.to(tl.float32) * a[None, :], 1) + tl.load(B2 + d, mask=d < D, other=0.0).to(tl.float32)
        tok = C.round_out(tok + C.round_out(o2, LDT, EMU).to(tl.float32), LDT, EMU).to(tl.float32)
    return tok


@triton.jit
def _decode_compress_write(POS, RAWK, RAWV, PK, W1K, B1K, W2K, B2K, PV, W1V, B1V, W2V, B2V, LD, KC, VC, BT, SLOT,
                           TC, MAXP, NPAGES, H: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr, L: tl.constexpr,
                           D: tl.constexpr, HIDK: tl.constexpr, HIDV: tl.constexpr, BDK: tl.constexpr,
                           BDV: tl.constexpr, BL: tl.constexpr, BHK: tl.constexpr, BHV: tl.constexpr,
                           BF: tl.constexpr, MLP: tl.constexpr, EMU_L: tl.constexpr, EMU_C: tl.constexpr,
                           PS: tl.constexpr):
    """Program (b, h, kv): where the new position s of sequence b completes a block, phi of its
    raw block ``[B, L, H, D]`` (:func:`_phi`, keys for kv = 0, values for 1; in the dtype of LD,
    the layer's, which is never read) written to row i = (s + 1 - L) / D of k_cmp / v_cmp (rows
    as :func:`_decode_write_cmp`); elsewhere nothing (most steps: the program returns at once)."""
    LDT: tl.constexpr = LD.dtype.element_ty
    b = tl.program_id(0)
    h = tl.program_id(1)
    s = tl.load(POS + b).to(tl.int64)
    if (s + 1 >= L) & ((s + 1 - L) % D == 0):
        sl = tl.load(SLOT + b).to(tl.int64) if PS > 0 else b.to(tl.int64)
        at = _rows(BT, sl, (s + 1 - L) // D, b * TC, MAXP, NPAGES, PS, PS // D if PS > 0 else 1, D) * H + h
        row = b.to(tl.int64) * L * H + h
        if tl.program_id(2) == 0:  # (names of their own in each branch: their shapes differ)
            tok_k = _phi(RAWK, PK, W1K, B1K, W2K, B2K, row, H, DK, L, HIDK, BDK, BL, BHK, BF, MLP, LDT, EMU_L)
            ck = tl.arange(0, BDK)
            tl.store(KC + at * DK + ck, C.round_out(tok_k, KC.dtype.element_ty, EMU_C), mask=ck < DK)
        else:
            tok_v = _phi(RAWV, PV, W1V, B1V, W2V, B2V, row, H, DV, L, HIDV, BDV, BL, BHV, BF, MLP, LDT, EMU_L)
            cv = tl.arange(0, BDV)
            tl.store(VC + at * DV + cv, C.round_out(tok_v, VC.dtype.element_ty, EMU_C), mask=cv < DV)


def _paging(block_table, slots, seqlens, pool) -> tuple:
    """(BT, SLOT, MAXP, NPAGES, PS) of a launch: the table and the slots, or stand-ins."""
    if block_table is None:
        return seqlens, seqlens, 1, 1, 0
    return block_table, slots, block_table.shape[1], pool.shape[0], pool.shape[1]


def decode_append_triton(q_proj, kv_proj, seqlens, rope, k_slc, v_slc, k_win, v_win, k_tail, v_tail, *,
                         n_heads: int, cmp_block: int, block_table=None, slots=None):
    """Same contract as :func:`nsa.cache.decode_append_ref`."""
    B = q_proj.shape[0]
    H, Dk, Dv = k_slc.shape[2], k_slc.shape[3], v_slc.shape[3]
    nbr = kv_proj.shape[-1] // (H * (Dk + Dv))
    q = torch.empty(B, 1, n_heads, Dk, dtype=q_proj.dtype, device=q_proj.device)
    raw_k = torch.empty(B, cmp_block, H, Dk, dtype=k_slc.dtype, device=k_slc.device)
    raw_v = torch.empty(B, cmp_block, H, Dv, dtype=v_slc.dtype, device=v_slc.device)
    shared = nbr == 1
    emu = C.interpreting()  # its fp32 -> bf16 cast truncates: round to nearest even as GPUs do
    kw, vw, kt, vt = (k_slc, v_slc, k_slc, v_slc) if shared else (k_win, v_win, k_tail, v_tail)
    q_proj, kv_proj = q_proj.contiguous(), kv_proj.contiguous()
    bt, sl, maxp, npages, ps = _paging(block_table, slots, seqlens, k_slc)
    args = (q_proj, kv_proj, seqlens, rope, q, k_slc, v_slc, kw, vw, kt, vt, raw_k, raw_v, bt, sl, k_slc.shape[1],
            1 if shared else k_win.shape[1], maxp, npages)
    const = dict(HQ=n_heads, H=H, DK=Dk, DV=Dv, NBR=nbr, L=cmp_block, HP=C.next_pow2(n_heads // H),
                 BL=C.next_pow2(cmp_block), BDK=C.next_pow2(Dk), BDV=C.next_pow2(Dv), PS=ps,
                 EMU_K=emu and q_proj.dtype == torch.bfloat16, EMU_C=emu and k_slc.dtype == torch.bfloat16,
                 num_warps=4)
    _launch(_decode_append, (B, H), args, const)
    return q, raw_k, raw_v


def write_cmp_step_triton(seqlens, tok_k, tok_v, k_cmp, v_cmp, *, cmp_block: int, cmp_stride: int,
                          block_table=None, slots=None) -> None:
    """Same contract as :func:`nsa.cache.write_cmp_step_ref`."""
    B, H, Dk = tok_k.shape
    Dv = tok_v.shape[2]
    bt, sl, maxp, npages, ps = _paging(block_table, slots, seqlens, k_cmp)
    ps *= cmp_stride  # pools of page_size / d compressed rows
    args = (seqlens, tok_k.contiguous(), tok_v.contiguous(), k_cmp, v_cmp, bt, sl, k_cmp.shape[1], maxp, npages)
    const = dict(H=H, DK=Dk, DV=Dv, L=cmp_block, D=cmp_stride, BDK=C.next_pow2(Dk), BDV=C.next_pow2(Dv), PS=ps,
                 num_warps=1)
    _launch(_decode_write_cmp, (B, H), args, const)


_STAND_INS: dict = {}  # (dtype, device) -> a one-element tensor


def _dtype_stand_in(dtype: torch.dtype, device) -> torch.Tensor:
    """A tensor whose only use is its dtype (a kernel's constexpr dtype from a pointer), kept."""
    key = (dtype, device)
    if key not in _STAND_INS:
        _STAND_INS[key] = torch.zeros(1, dtype=dtype, device=device)
    return _STAND_INS[key]


def compress_chunk(hid_k: int, hid_v: int) -> int:
    """fc1's inputs a step of :func:`_phi` takes: tiles of 4096 weights (8192 spilled at hidden
    64 on sm_90 in the paged kernel)."""
    return max(16, min(128, 4096 // max(C.next_pow2(hid_k), C.next_pow2(hid_v))))


def compress_write_step_triton(seqlens, raw_k, raw_v, phi_k: tuple, phi_v: tuple, k_cmp, v_cmp, *, cmp_block: int,
                               cmp_stride: int, dtype: torch.dtype, block_table=None, slots=None) -> None:
    """Same contract as :func:`nsa.cache.compress_write_step_ref`: phi and the compressed
    token's write in one launch."""
    raw_k, raw_v = raw_k.contiguous(), raw_v.contiguous()
    B, L, H, Dk = raw_k.shape
    Dv = raw_v.shape[3]
    mlp = phi_k is not None
    if mlp != (phi_v is not None):
        raise ValueError("phi_k and phi_v: both the MLP's parameters or both None (mean)")
    pk = tuple(x.contiguous() for x in phi_k) if mlp else (raw_k,) * 5
    pv = tuple(x.contiguous() for x in phi_v) if mlp else (raw_v,) * 5
    bt, sl, maxp, npages, ps = _paging(block_table, slots, seqlens, k_cmp)
    ps *= cmp_stride  # pools of page_size / d compressed rows
    ld = pk[1] if mlp else _dtype_stand_in(dtype, raw_k.device)
    args = (seqlens, raw_k, raw_v, *pk, *pv, ld, k_cmp, v_cmp, bt, sl, k_cmp.shape[1], maxp, npages)
    hid_k, hid_v = (pk[1].shape[0], pv[1].shape[0]) if mlp else (1, 1)
    emu = C.interpreting()  # its fp32 -> bf16 cast truncates: round to nearest even as GPUs do
    const = dict(H=H, DK=Dk, DV=Dv, L=cmp_block, D=cmp_stride, HIDK=hid_k, HIDV=hid_v, BDK=C.next_pow2(Dk),
                 BDV=C.next_pow2(Dv), BL=C.next_pow2(cmp_block), BHK=C.next_pow2(hid_k), BHV=C.next_pow2(hid_v),
                 BF=compress_chunk(hid_k, hid_v), MLP=mlp,
                 EMU_L=emu and dtype == torch.bfloat16, EMU_C=emu and k_cmp.dtype == torch.bfloat16, PS=ps,
                 num_warps=4)
    _launch(_decode_compress_write, (B, H, 2), args, const)


# the launches' compiled kernels, kept by the first launch of each signature (C.relaunch)
_KEPT: dict = {}


def _launch(kernel, grid, args, const) -> None:
    """kernel[grid](*args, **const), later launches of the same signature through its kept
    compiled kernel (a step's host time: triton's run costs tens of µs a launch)."""
    tensors = [a for a in args if isinstance(a, torch.Tensor)]
    key = (kernel, grid,
           *(a if isinstance(a, int) else (a.dtype, a.device) for a in args), *sorted(const.items()))
    C.relaunch(_KEPT, key, kernel, grid, args, const, C.launch_stream(*tensors))
