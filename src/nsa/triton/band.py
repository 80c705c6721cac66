"""Dense attention over a band of keys, group-centric: the kernel behind the cmp and win branches.

One program holds BT consecutive query positions x the h heads of one GQA group (BM rows), so
each key/value tile it loads serves all heads of the group. Two modes (constexpr MODE):

* MODE 0, compressed (semantics §2): keys are the compressed tokens i of the sequence; query t sees
  i iff i*d + l - 1 <= t. Writes o and the natural-log log-sum-exp (-inf for empty rows).
* MODE 1, sliding window (semantics §6): keys at positions u in [t - w + 1, t]; the key rows start
  at position ``k_offset``. With FUSE_GATES the epilogue also reads o_cmp, o_slc and the gates
  and writes g0*o_cmp + g1*o_slc + g2*o_win (semantics §7): one pass less over the outputs;
  with WRITE_BRANCH also o_win itself (what the backward needs: no recompute when trained).

Key tiles that every valid row of the program sees (all compressed tiles but the last; the
window's middle) run without the visibility mask and the key-row load masks (:func:`_band_step`
with MASKED false): on the H200 cmp at 64k went from 15.1 to 12.7 ms (paper) and 14.8 to 10.2 ms
(Dk = Dv = 128), win from 4.75 to 4.33 ms.

Arithmetic: fp32 accumulation, scores in base 2 (exp2), Dk split in two power-of-two chunks.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from . import _common as C
from ._common import LOG2E



@triton.jit
def _key_rows(base, bn, cols, n_ok, stride, D: tl.constexpr, MASKED: tl.constexpr,
              UPCAST: tl.constexpr):
    """Tile [BN, len(cols)] of the key/value rows bn (row stride ``stride``), columns past D masked;
    the rows masked by n_ok only when MASKED."""
    mask = cols[None, :] < D
    if MASKED:
        mask = mask & n_ok[:, None]
    x = tl.load(base + bn[:, None] * stride + cols[None, :], mask=mask, other=0.0)
    if UPCAST:  # the CPU interpreter's bf16 dot is wrong (triton 3.9)
        x = x.to(tl.float32)
    return x


@triton.jit
def _band_step(acc, m_i, l_i, q0, q1, K, V, KD0, KD1, VD, k_start, n0, n_hi, pos, g, H, qk_scale, k_offset,
               DK: tl.constexpr, DV: tl.constexpr, MODE: tl.constexpr, CMP_L: tl.constexpr,
               CMP_D: tl.constexpr, WINDOW: tl.constexpr, BN: tl.constexpr, BK0: tl.constexpr,
               BK1: tl.constexpr, BV: tl.constexpr, MASKED: tl.constexpr, PREC: tl.constexpr,
               UPCAST: tl.constexpr, TMA: tl.constexpr):
    """One BN-key tile of the online softmax. Without MASKED every key of the tile exists and
    every row sees it: no visibility mask and no load masks on the key rows. TMA: the tiles
    come through the descriptors KD0, KD1, VD (rows past n_hi: other keys or zeros, masked)."""
    bn = tl.arange(0, BN)
    dk0 = tl.arange(0, BK0)
    dv = tl.arange(0, BV)
    n = n0 + bn
    n_ok = n < n_hi
    kv_row = (k_start + n0).to(tl.int64) * H + g
    Kb = K + kv_row * DK
    Vb = V + kv_row * DV
    krow = (k_start + n0).to(tl.int32)
    if TMA:
        k0 = C.tma_tile(KD0, krow, g * DK, UPCAST)
    else:
        k0 = _key_rows(Kb, bn, dk0, n_ok, H * DK, DK, MASKED, UPCAST)
    s = tl.dot(q0, tl.trans(k0), input_precision=PREC)
    if BK1 > 0:
        if TMA:
            k1 = C.tma_tile(KD1, krow, g * DK + BK0, UPCAST)
        else:
            k1 = _key_rows(Kb, bn, BK0 + tl.arange(0, BK1), n_ok, H * DK, DK, MASKED, UPCAST)
        s += tl.dot(q1, tl.trans(k1), input_precision=PREC)
    if MASKED:
        if MODE == 0:
            vis = (n[None, :] * CMP_D + CMP_L - 1) <= pos[:, None]
        else:
            u = n + k_offset
            vis = (u[None, :] <= pos[:, None]) & (u[None, :] > pos[:, None] - WINDOW)
        vis = vis & n_ok[None, :]
        s = tl.where(vis, s * qk_scale, float("-inf"))
    else:
        s = s * qk_scale
    p, alpha, m_new, l_i = C.softmax_step(s, m_i, l_i)
    if TMA:
        v = C.tma_tile(VD, krow, g * DV, UPCAST)
    else:
        v = _key_rows(Vb, bn, dv, n_ok, H * DV, DV, MASKED, UPCAST)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PREC)
    return acc, m_new, l_i


@triton.jit
def _band_fwd(Q, K, V, KD0, KD1, VD, O, LSE, GATES, OCMP, OSLC, OBR, TBL, SEQ, TUNE_T,
              sm_scale, q_offset, k_offset,
              HQ: tl.constexpr, G: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr,
              MODE: tl.constexpr, CMP_L: tl.constexpr, CMP_D: tl.constexpr, WINDOW: tl.constexpr,
              HP: tl.constexpr, BT: tl.constexpr, BN: tl.constexpr,
              BK0: tl.constexpr, BK1: tl.constexpr, BV: tl.constexpr,
              WRITE_LSE: tl.constexpr, FUSE_GATES: tl.constexpr, WRITE_BRANCH: tl.constexpr,
              PREC: tl.constexpr, UPCAST: tl.constexpr, TMA: tl.constexpr):
    """TMA: key/value tiles through the descriptors KD0, KD1, VD (:func:`_band_step`)."""
    BM: tl.constexpr = BT * HP
    pid = tl.program_id(0)
    g = tl.program_id(1)
    H = HQ // G
    # MODE 0 (cmp) reads the compressed keys' columns of SEQ, MODE 1 (win) the window keys'
    t0, q_start, q_len, k_start, k_len = C.program_rows(TBL, SEQ, pid, 6 - 2 * MODE)

    tq, row_ok, pos, row0, rel = C.tile_rows(t0, g, q_start, q_len, q_offset, HQ, G, HP, BM)
    q_row = rel * DK  # [BM] int32, relative to row0
    Qb = Q + row0 * DK
    q0 = C.load_cols(Qb, q_row, row_ok, 0, BK0, DK, UPCAST)  # [BM, BK0]
    q1 = q0
    if BK1 > 0:
        q1 = C.load_cols(Qb, q_row, row_ok, BK0, BK1, DK, UPCAST)  # [BM, BK1]
    dv = tl.arange(0, BV)
    qk_scale = sm_scale * LOG2E

    t_lo = q_offset + t0  # smallest position of the tile
    t_hi = q_offset + tl.minimum(t0 + BT, q_len) - 1  # largest valid position of the tile
    # key rows [n_lo, n_hi) reach some row; [n_a, n_b) (whole BN tiles from n_lo) reach every
    # valid row and exist, so they run without masks (rows past the sequence or padding heads
    # compute garbage that is never stored)
    if MODE == 0:
        n_lo = 0
        n_hi = tl.where(t_hi >= CMP_L - 1, (t_hi - CMP_L + 1) // CMP_D + 1, 0)
        n_hi = tl.minimum(n_hi, k_len)
        n_all = tl.where(t_lo >= CMP_L - 1, (t_lo - CMP_L + 1) // CMP_D + 1, 0)  # seen by every row
        n_a = n_lo
    else:
        n_lo = tl.maximum(t_lo - WINDOW + 1, k_offset) - k_offset  # key rows
        n_hi = tl.minimum(t_hi + 1 - k_offset, k_len)
        n_all = tl.minimum(t_lo + 1 - k_offset, k_len)
        first = tl.maximum(t_hi - WINDOW + 1 - k_offset, n_lo)  # first key row every row sees
        n_a = n_lo + tl.cdiv(first - n_lo, BN) * BN
    n_b = n_a + tl.maximum(tl.minimum(n_all, n_hi) - n_a, 0) // BN * BN

    m_i = tl.full([BM], -1.0e30, dtype=tl.float32)  # finite: fully masked tiles give p = 0
    l_i = tl.zeros([BM], dtype=tl.float32)
    acc = tl.zeros([BM, BV], dtype=tl.float32)
    for n0 in range(n_lo, n_a, BN):  # window head: rows see different first keys
        acc, m_i, l_i = _band_step(acc, m_i, l_i, q0, q1, K, V, KD0, KD1, VD, k_start, n0, n_hi, pos, g, H, qk_scale,
                                   k_offset, DK, DV, MODE, CMP_L, CMP_D, WINDOW, BN, BK0, BK1, BV,
                                   True, PREC, UPCAST, TMA)
    for n0 in range(n_a, n_b, BN):  # every row sees every key: no masks
        acc, m_i, l_i = _band_step(acc, m_i, l_i, q0, q1, K, V, KD0, KD1, VD, k_start, n0, n_hi, pos, g, H, qk_scale,
                                   k_offset, DK, DV, MODE, CMP_L, CMP_D, WINDOW, BN, BK0, BK1, BV,
                                   False, PREC, UPCAST, TMA)
    for n0 in range(n_b, n_hi, BN):  # tail: the causal edge
        acc, m_i, l_i = _band_step(acc, m_i, l_i, q0, q1, K, V, KD0, KD1, VD, k_start, n0, n_hi, pos, g, H, qk_scale,
                                   k_offset, DK, DV, MODE, CMP_L, CMP_D, WINDOW, BN, BK0, BK1, BV,
                                   True, PREC, UPCAST, TMA)

    nonempty = l_i > 0
    o = acc / tl.where(nonempty, l_i, 1.0)[:, None]  # rows that see no key: exactly 0
    o_off = rel[:, None] * DV + dv[None, :]
    o_mask = row_ok[:, None] & (dv[None, :] < DV)
    if WRITE_LSE:
        lse = tl.where(nonempty, (m_i + tl.log2(tl.where(nonempty, l_i, 1.0))) * 0.6931471805599453,
                       float("-inf"))
        tl.store(LSE + row0 + rel, lse, mask=row_ok)
    if WRITE_BRANCH:  # the branch's own output too (o_win, before the gates mix it in)
        tl.store(OBR + row0 * DV + o_off, o.to(OBR.dtype.element_ty), mask=o_mask)
    if FUSE_GATES:
        Gb = GATES + row0 * 3
        g0 = tl.load(Gb + rel * 3, mask=row_ok, other=0.0).to(tl.float32)
        g1 = tl.load(Gb + rel * 3 + 1, mask=row_ok, other=0.0).to(tl.float32)
        g2 = tl.load(Gb + rel * 3 + 2, mask=row_ok, other=0.0).to(tl.float32)
        oc = tl.load(OCMP + row0 * DV + o_off, mask=o_mask, other=0.0).to(tl.float32)
        osl = tl.load(OSLC + row0 * DV + o_off, mask=o_mask, other=0.0).to(tl.float32)
        o = _mix(g0, g1, g2, oc, osl, o)
    tl.store(O + row0 * DV + o_off, o.to(O.dtype.element_ty), mask=o_mask)


@triton.jit
def _mix(g0, g1, g2, oc, osl, ow):
    """Eq. 5 in fp32, one expression for the window's epilogue and :func:`_gate_mix`."""
    return g0[:, None] * oc + g1[:, None] * osl + g2[:, None] * ow


@triton.jit
def _gate_mix(GATES, OCMP, OSLC, OWIN, O, OBR, n_rows, DV: tl.constexpr, BV: tl.constexpr, BR: tl.constexpr,
              WRITE_BRANCH: tl.constexpr):
    """o = g0*o_cmp + g1*o_slc + g2*o_win for BR rows of [rows, DV] a program, o_win the window's
    fp32 output (unrounded, as the epilogue mixes it: the same o bit for bit); WRITE_BRANCH: o_win
    also in OBR's dtype."""
    r = (tl.program_id(0) * BR + tl.arange(0, BR)).to(tl.int64)
    ok = r < n_rows
    dv = tl.arange(0, BV)
    off = r[:, None] * DV + dv[None, :]
    m = ok[:, None] & (dv[None, :] < DV)
    g0 = tl.load(GATES + r * 3, mask=ok, other=0.0).to(tl.float32)
    g1 = tl.load(GATES + r * 3 + 1, mask=ok, other=0.0).to(tl.float32)
    g2 = tl.load(GATES + r * 3 + 2, mask=ok, other=0.0).to(tl.float32)
    oc = tl.load(OCMP + off, mask=m, other=0.0).to(tl.float32)
    osl = tl.load(OSLC + off, mask=m, other=0.0).to(tl.float32)
    ow = tl.load(OWIN + off, mask=m, other=0.0)
    if WRITE_BRANCH:
        tl.store(OBR + off, ow.to(OBR.dtype.element_ty), mask=m)
    tl.store(O + off, _mix(g0, g1, g2, oc, osl, ow).to(O.dtype.element_ty), mask=m)



def _prune(configs, named_args, **kwargs):
    """Tiles of more than 64 rows (head dims up to 128) at 4 warps spill (sm_90 compile with
    triton 3.6: 16-520 bytes a thread, tests/test_spills.py): they tune over 8 warps."""
    a = {**named_args, **kwargs}
    if a["BT"] * a["HP"] > 64:
        return [c for c in configs if c.num_warps >= 8]
    return configs


_band_fwd_tuned = C.autotuned(_band_fwd, ['TUNE_T', 'HQ', 'G', 'DK', 'DV', 'MODE', 'FUSE_GATES', 'WRITE_BRANCH',
                                          'WINDOW', 'TMA'], [4, 8], [2, 3], prune=_prune)

TMA = True
"""Whether the band forward reads its key/value tiles through tensor descriptors where
:func:`nsa.triton._common.tma_ok` allows. H200, paper configuration, pointer loads -> descriptors
(tma_ab_h200.json): cmp 0.317 -> 0.304 ms at 8k, 12.8 -> 12.2 at 64k; win (with the gates)
0.596 -> 0.575 and 4.89 -> 4.66 (one of two 64k rounds 4.96 against 4.92); outputs bitwise the
same."""


def _config(h: int, Dk: int, Dv: int, interp: bool) -> dict:
    """Tile shape: ~64-128 rows of (position, head), 64-key tiles."""
    if interp:
        # the interpreter pays per op, not per element: big tiles, few programs
        HP, BT, _ = C.rows_for(h, 64)
        return dict(HP=HP, BT=BT, BN=32, num_warps=4, num_stages=1)
    big = max(Dk, Dv) > 128
    HP, BT, _ = C.rows_for(h, 64 if big else 128)
    return dict(HP=HP, BT=BT, BN=64, num_warps=4 if big else 8, num_stages=2 if big else 3)


def band_attention(q, k, v, *, mode: int, scale: float, seq: torch.Tensor, lens: list[int],
                   q_offset: int = 0, k_offset: int = 0, cmp_block: int = 1, cmp_stride: int = 1,
                   window: int = 1, write_lse: bool = False, gates=None, o_cmp=None, o_slc=None,
                   o_branch=None, out_dtype=None):
    """Launch :func:`_band_fwd`. q [B, T, HQ, Dk], k [B, Tk, H, Dk], v [B, Tk, H, Dv] contiguous.
    With gates (and o_cmp, o_slc) o is the gated mix; ``o_branch`` ([B, T, HQ, Dv], contiguous)
    then receives the branch's own output as well.

    Returns (o [B, T, HQ, Dv] in ``out_dtype`` (default q's), lse [B, T, HQ] fp32 or None).
    """
    B, T, HQ, Dk = q.shape
    H, Dv = k.shape[2], v.shape[3]
    h = HQ // H
    o = torch.empty(B, T, HQ, Dv, dtype=out_dtype or q.dtype, device=q.device)
    lse = torch.empty(B, T, HQ, dtype=torch.float32, device=q.device) if write_lse else None
    if B * T == 0:
        return o, lse
    cfg = _config(h, Dk, Dv, C.interpreting())
    tbl = C.prog_table(lens, cfg["BT"], q.device)
    BK0, BK1 = C.split_dim(Dk)
    fuse = gates is not None
    dummy = o
    tma = TMA and C.tma_ok(q, k, v, BK0, BK1, max(16, C.next_pow2(Dv)))
    descs = C.kv_descriptors(k, v, cfg["BN"], BK0, BK1, max(16, C.next_pow2(Dv))) if tma else (q, q, q)
    launch = dict(num_warps=cfg['num_warps'], num_stages=cfg['num_stages']) if C.interpreting() else {}
    _band_fwd_tuned[(tbl.shape[0], H)](
        q, k if k.numel() else q, v if v.numel() else o, *descs, o, lse if write_lse else dummy,
        gates if fuse else dummy, o_cmp if fuse else dummy, o_slc if fuse else dummy,
        o_branch if o_branch is not None else dummy, tbl, seq, C.next_pow2(T),
        float(scale), int(q_offset), int(k_offset),
        HQ=HQ, G=h, DK=Dk, DV=Dv, MODE=mode, CMP_L=cmp_block, CMP_D=cmp_stride, WINDOW=window,
        HP=cfg["HP"], BT=cfg["BT"], BN=cfg["BN"], BK0=BK0, BK1=BK1, BV=max(16, C.next_pow2(Dv)),
        WRITE_LSE=write_lse, FUSE_GATES=fuse, WRITE_BRANCH=o_branch is not None, PREC=C.dot_precision(q.dtype),
        UPCAST=C.upcast(q.dtype), TMA=tma, **launch)
    return o, lse


def gate_mix(gates, o_cmp, o_slc, o_win, o_branch=None):
    """Eq. 5 as a pass of its own (:func:`_gate_mix`): o = g0*o_cmp + g1*o_slc + g2*o_win in
    o_cmp's dtype, equal bit for bit to the window's fused epilogue (:func:`band_attention` with
    gates) when o_win is its fp32 output. gates [B, T, HQ, 3], o_* [B, T, HQ, Dv] contiguous;
    ``o_branch`` (o_win's shape): receives o_win in its own dtype."""
    o = torch.empty_like(o_cmp)
    rows, Dv = o.numel() // max(o.shape[-1], 1), o.shape[-1]
    if rows == 0:
        return o
    BV = max(16, C.next_pow2(Dv))
    BR = max(1, 4096 // BV)  # 4k elements a program
    _gate_mix[(C.cdiv(rows, BR),)](gates, o_cmp, o_slc, o_win, o, o if o_branch is None else o_branch, rows,
                                   DV=Dv, BV=BV, BR=BR, WRITE_BRANCH=o_branch is not None, num_warps=4)
    return o


def default_scale(scale, Dk: int) -> float:
    return 1.0 / math.sqrt(Dk) if scale is None else float(scale)
