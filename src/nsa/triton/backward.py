"""Backward kernels of NSA in Triton (semantics §2, 5, 6, 7): dq, dk, dv of each branch, and the gates.

Every kernel is group-centric like its forward: a tile holds BT query positions x the h heads
of one GQA group (BM = BT * HP rows, see :mod:`._common`), so each key tile serves all heads.
Per (rows, keys) tile p = exp(s - lse) is recomputed from the saved log-sum-exp, then

    dv += p^T do,   dp = do v^T,   ds = p * (dp - delta),   dq += ds k,   dk += ds^T q

with delta = rowsum(do * o), computed by the dq kernel (which runs first) and read by the
dk/dv kernel. dq rows belong to one program, so dq is accumulated in registers and stored
into an fp32 buffer shared by the three branches (the first stores, the next adds, the last
adds and writes q's dtype: :func:`_store_dq`). Everything accumulates in fp32 and is cast to
the input dtype at the end (fp64 inputs go to the reference backward instead).

* :func:`band_backward` - cmp (MODE 0, causal by block completion) and win (MODE 1): dq
  query-centric, dk/dv key-centric (flash-attention-2 style, no atomics: a compressed key is
  seen by every later query tile, atomics would cost O(T * Tc) adds).
* :func:`selected_backward` - slc. dq query-centric over the block lists (reading the lse of
  the slc forward, or recomputing it in a first pass when not given); dk/dv key-centric
  over a transposed index (per group and block, the positions that selected it, in chunks),
  added into fp32 buffers with one ``tl.atomic_add`` per chunk (blocks are scattered).
* the gates (Eq. 5) have no pass of their own: :func:`nsa_backward` gives each branch the
  gated output's do and the gates, and the branch's dq kernel, which owns its rows and runs
  first, writes the gate's gradient rowsum(do * o_i) and the branch's do_i = g_i do (rounded
  once to do's dtype) that its dk/dv kernel reads.

Atomics make the launches non-idempotent: they are never autotuned (an autotuner reruns the
kernel while timing it). Reference: torch autograd through :mod:`nsa.reference`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

from . import _common as C
from . import cmp_dense
from ._common import LOG2E
from .selected import (drop_forced, forced_block, forced_blocks, forced_config, share_split, split_tile,
                       tile_block, tile_uniques, use_forced, use_tma)


@triton.jit
def _tile_grads(q0, q1, do, lse2, delta, ok, Kb, Vb, GKb, GVb, kn, kn_ok, vis, qk_scale, sm_scale,
                dq0, dq1, H: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr,
                BK0: tl.constexpr, BK1: tl.constexpr, BV: tl.constexpr,
                PREC: tl.constexpr, UPCAST: tl.constexpr, KV: tl.constexpr,
                KD0, KD1, VD, krow, kcol, vcol, TMA: tl.constexpr):
    """One key tile: rows x keys ``kn`` (offsets inside the tile's K/V bases). With KV, adds
    dk/dv of the tile atomically; returns the updated dq chunks (unscaled by sm_scale). TMA:
    the tile's keys and values come through the descriptors KD0, KD1, VD (row krow, columns
    kcol / vcol: :func:`nsa.triton._common.kv_descriptors`), rows past the keys hidden by kn_ok."""
    dk0 = tl.arange(0, BK0)
    dv = tl.arange(0, BV)
    if TMA:
        k0 = C.tma_tile(KD0, krow, kcol, UPCAST)
    else:
        k0 = C.load_cols(Kb, kn * (H * DK), kn_ok, 0, BK0, DK, UPCAST)
    s = tl.dot(q0, tl.trans(k0), input_precision=PREC)
    if BK1 > 0:
        dk1 = BK0 + tl.arange(0, BK1)
        if TMA:
            k1 = C.tma_tile(KD1, krow, kcol + BK0, UPCAST)
        else:
            k1 = C.load_cols(Kb, kn * (H * DK), kn_ok, BK0, BK1, DK, UPCAST)
        s += tl.dot(q1, tl.trans(k1), input_precision=PREC)
    vis = vis & ok[:, None] & kn_ok[None, :]
    p = tl.where(vis, tl.exp2(s * qk_scale - lse2[:, None]), 0.0)  # exact probabilities
    if TMA:
        v = C.tma_tile(VD, krow, vcol, UPCAST)
    else:
        v = C.load_cols(Vb, kn * (H * DV), kn_ok, 0, BV, DV, UPCAST)
    if KV:
        gv = tl.dot(tl.trans(p.to(do.dtype)), do, input_precision=PREC)  # [BN, BV]
        tl.atomic_add(GVb + kn[:, None] * (H * DV) + dv[None, :], gv,
                      mask=kn_ok[:, None] & (dv[None, :] < DV), sem="relaxed")
    dp = tl.dot(do, tl.trans(v), input_precision=PREC)
    ds = p * (dp - delta[:, None])  # d loss / d (scaled score), 0 outside vis
    dsq = ds.to(q0.dtype)
    dq0 += tl.dot(dsq, k0, input_precision=PREC)
    if KV:
        gk0 = tl.dot(tl.trans(dsq), q0, input_precision=PREC) * sm_scale
        tl.atomic_add(GKb + kn[:, None] * (H * DK) + dk0[None, :], gk0,
                      mask=kn_ok[:, None] & (dk0[None, :] < DK), sem="relaxed")
    if BK1 > 0:
        dq1 += tl.dot(dsq, k1, input_precision=PREC)
        if KV:
            gk1 = tl.dot(tl.trans(dsq), q1, input_precision=PREC) * sm_scale
            tl.atomic_add(GKb + kn[:, None] * (H * DK) + dk1[None, :], gk1,
                          mask=kn_ok[:, None] & (dk1[None, :] < DK), sem="relaxed")
    return dq0, dq1


@triton.jit
def _kv_tile_grads(q0, q1, do, lse2, delta, vis, k0, k1, v, acc_k0, acc_k1, acc_v, qk_scale,
                   BK1: tl.constexpr, PREC: tl.constexpr):
    """One query tile's share of a key tile's dk/dv (unscaled by sm_scale), kept in registers
    by the key-centric kernels; ``vis`` [rows, keys] already holds the row and key masks (None:
    every row sees every key)."""
    s = tl.dot(q0, tl.trans(k0), input_precision=PREC)
    if BK1 > 0:
        s += tl.dot(q1, tl.trans(k1), input_precision=PREC)
    if vis is None:  # every row sees every key
        p = tl.exp2(s * qk_scale - lse2[:, None])
    else:
        p = tl.where(vis, tl.exp2(s * qk_scale - lse2[:, None]), 0.0)
    acc_v += tl.dot(tl.trans(p.to(do.dtype)), do, input_precision=PREC)
    dp = tl.dot(do, tl.trans(v), input_precision=PREC)
    dsq = (p * (dp - delta[:, None])).to(q0.dtype)
    acc_k0 += tl.dot(tl.trans(dsq), q0, input_precision=PREC)
    if BK1 > 0:
        acc_k1 += tl.dot(tl.trans(dsq), q1, input_precision=PREC)
    return acc_k0, acc_k1, acc_v


@triton.jit
def _load_rows(Q, DO, LSE, DELTA, O, row0, rel, row_ok, DK: tl.constexpr, DV: tl.constexpr,
               BK0: tl.constexpr, BK1: tl.constexpr, BV: tl.constexpr, UPCAST: tl.constexpr,
               MAKE_DELTA: tl.constexpr, GATES=None, DG=None, DOB=None, GIDX: tl.constexpr = -1,
               gm0=0, relg=None, GM: tl.constexpr = 0, QG=None):
    """q chunks, do, lse (base 2, 0 for empty rows), delta and the row mask of a tile.
    MAKE_DELTA: delta = rowsum(do * o) from O, stored to DELTA (the dq kernels, which run
    first and own their rows); otherwise read from DELTA (the dk/dv kernels).
    GIDX >= 0 (with MAKE_DELTA; Eq. 5 in the dq kernel's loads): DO is the gradient of the gated
    NSA output; the gate's gradient rowsum(DO * o) goes to DG[row, GIDX] (fp32) and the
    branch's own do, DO's rows times GATES[row, GIDX] rounded once to DO's dtype, is what the
    tile uses and what DOB receives for the dk/dv kernel.
    Group-major rows (``[H, B * T, G, D]`` copies for the descriptor tiles of the dk/dv kernel,
    :func:`_gm_rows`: gm0, relg): GM 1, DOB is written there (the dq kernel) or DO read from
    there (the dk/dv kernel's edge tiles); with MAKE_DELTA the do rows go there gated or not.
    QG given, the q rows are written there too."""
    dv = tl.arange(0, BV)
    q0 = C.load_cols(Q + row0 * DK, rel * DK, row_ok, 0, BK0, DK, UPCAST)
    q1 = q0
    if BK1 > 0:
        q1 = C.load_cols(Q + row0 * DK, rel * DK, row_ok, BK0, BK1, DK, UPCAST)
    if QG is not None:
        _store_rows(QG + gm0 * DK, relg * DK, row_ok, 0, BK0, DK, q0, False)
        if BK1 > 0:
            _store_rows(QG + gm0 * DK, relg * DK, row_ok, BK0, BK1, DK, q1, False)
    if GM and not MAKE_DELTA:
        do = C.load_cols(DO + gm0 * DV, relg * DV, row_ok, 0, BV, DV, UPCAST)
    else:
        do = C.load_cols(DO + row0 * DV, rel * DV, row_ok, 0, BV, DV, UPCAST)
    lse = tl.load(LSE + row0 + rel, mask=row_ok, other=float("-inf"))
    ok = row_ok & (lse > float("-inf"))  # rows that see no key have zero gradients
    lse2 = tl.where(ok, lse * LOG2E, 0.0)
    if MAKE_DELTA:
        o = tl.load(O + row0 * DV + rel[:, None] * DV + dv[None, :], mask=row_ok[:, None] & (dv[None, :] < DV),
                    other=0.0).to(tl.float32)
        if GIDX >= 0:
            d32 = do.to(tl.float32)
            tl.store(DG + (row0 + rel) * 3 + GIDX, tl.sum(d32 * o, 1), mask=row_ok)
            gt = tl.load(GATES + (row0 + rel) * 3 + GIDX, mask=row_ok, other=0.0).to(tl.float32)
            do = C.round_out(d32 * gt[:, None], DOB.dtype.element_ty, UPCAST)
        if GM:  # gated or not: the dk/dv kernel's descriptor tiles read do from the copy
            _store_rows(DOB + gm0 * DV, relg * DV, row_ok, 0, BV, DV, do, False)
        elif GIDX >= 0:
            _store_rows(DOB + row0 * DV, rel * DV, row_ok, 0, BV, DV, do, False)
        if GIDX >= 0 and UPCAST:
            do = do.to(tl.float32)
        delta = tl.sum(do.to(tl.float32) * o, 1)
        tl.store(DELTA + row0 + rel, delta, mask=row_ok)
    else:
        delta = tl.load(DELTA + row0 + rel, mask=ok, other=0.0)
    return q0, q1, do, lse2, delta, ok


@triton.jit
def _gm_rows(g, NT, q_start, t0, G: tl.constexpr, HP: tl.constexpr, BM: tl.constexpr):
    """A tile's rows in a group-major copy ``[H, NT, G, D]`` of q or do (NT = B * T rows of
    [B * T, HQ, D]; HP = G): (the 64-bit row of the tile's first position, [BM] int32 rows
    relative to it). In such a copy a tile's BT positions x G heads are BM consecutive rows."""
    r = tl.arange(0, BM)
    return (g * NT + q_start + t0).to(tl.int64) * G, (r // HP) * G + r % HP


@triton.jit
def _store_dq(GQ, OUT, row0, rel, row_ok, dq0, dq1, sm_scale, DK: tl.constexpr, BK0: tl.constexpr,
              BK1: tl.constexpr, DQ_MODE: tl.constexpr, EMU_RTNE: tl.constexpr = False):
    """This branch's sm_scale * acc into the rows of dq (the program owns them: no atomics).
    DQ_MODE 0: added into the fp32 buffer GQ; 1 (the first branch): stored there (no zeroed
    buffer to read); 2 (the last): added to GQ's sum and written to OUT in OUT's dtype (no
    fp32 write, no separate cast; rounded to nearest even, emulated under the interpreter:
    :func:`._common.round_out`)."""
    _store_dq_cols(GQ, OUT, row0, rel, row_ok, 0, dq0 * sm_scale, DK, BK0, DQ_MODE, EMU_RTNE)
    if BK1 > 0:
        _store_dq_cols(GQ, OUT, row0, rel, row_ok, BK0, dq1 * sm_scale, DK, BK1, DQ_MODE, EMU_RTNE)


@triton.jit
def _store_dq_cols(GQ, OUT, row0, rel, row_ok, col0, x, DK: tl.constexpr, BK: tl.constexpr,
                   DQ_MODE: tl.constexpr, EMU_RTNE: tl.constexpr):
    if DQ_MODE == 2:
        cols = col0 + tl.arange(0, BK)
        at = row0 * DK + rel[:, None] * DK + cols[None, :]
        m = row_ok[:, None] & (cols[None, :] < DK)
        x += tl.load(GQ + at, mask=m, other=0.0)
        tl.store(OUT + at, C.round_out(x, OUT.dtype.element_ty, EMU_RTNE), mask=m)
    else:  # 0: add into the fp32 buffer, 1: store
        _store_rows(GQ + row0 * DK, rel * DK, row_ok, col0, BK, DK, x, DQ_MODE == 0)


@triton.jit
def _band_bwd_dq(Q, K, V, KD0, KD1, VD, DO, O, LSE, DELTA, GQ, GQOUT, GK, GV, GATES, DG, DOB, QG, TBL, SEQ,
              sm_scale, q_offset, k_offset, NT,
              HQ: tl.constexpr, G: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr,
              MODE: tl.constexpr, CMP_L: tl.constexpr, CMP_D: tl.constexpr, WINDOW: tl.constexpr,
              HP: tl.constexpr, BT: tl.constexpr, BN: tl.constexpr,
              BK0: tl.constexpr, BK1: tl.constexpr, BV: tl.constexpr,
              PREC: tl.constexpr, UPCAST: tl.constexpr, GIDX: tl.constexpr, DQ_MODE: tl.constexpr,
              GM: tl.constexpr, WRITE_QG: tl.constexpr, TMA: tl.constexpr):
    """Query-centric dq of the band; GIDX >= 0: DO is the gated output's gradient and the
    branch's gate is GATES[..., GIDX] (:func:`_load_rows`: DG, DOB); DQ_MODE: :func:`_store_dq`.
    GM: DOB receives the do rows (gated or not) in the group-major copy ``[H, NT, G, Dv]`` that
    the dk/dv kernel's descriptor tiles read; WRITE_QG: the q rows go to the group-major copy
    QG as well (the first band branch). TMA: key/value tiles through KD0, KD1, VD."""
    BM: tl.constexpr = BT * HP
    pid = tl.program_id(0)
    g = tl.program_id(1)
    H: tl.constexpr = HQ // G
    # MODE 0 (cmp) reads the compressed keys' columns of SEQ, MODE 1 (win) the window keys'
    t0, q_start, q_len, k_start, k_len = C.program_rows(TBL, SEQ, pid, 6 - 2 * MODE)

    tq, row_ok, pos, row0, rel = C.tile_rows(t0, g, q_start, q_len, q_offset, HQ, G, HP, BM)
    gm0, relg = _gm_rows(g, NT, q_start, t0, G, HP, BM)
    q0, q1, do, lse2, delta, ok = _load_rows(Q, DO, LSE, DELTA, O, row0, rel, row_ok, DK, DV,
                                             BK0, BK1, BV, UPCAST, True, GATES, DG, DOB, GIDX,
                                             gm0, relg, GM, QG if WRITE_QG else None)
    qk_scale = sm_scale * LOG2E

    t_lo = q_offset + t0
    t_hi = q_offset + tl.minimum(t0 + BT, q_len) - 1
    if MODE == 0:
        n_lo = 0
        n_hi = tl.where(t_hi >= CMP_L - 1, (t_hi - CMP_L + 1) // CMP_D + 1, 0)
        n_hi = tl.minimum(n_hi, k_len)
    else:
        n_lo = tl.maximum(t_lo - WINDOW + 1, k_offset) - k_offset
        n_hi = tl.minimum(t_hi + 1 - k_offset, k_len)

    dq0 = tl.zeros([BM, BK0], dtype=tl.float32)
    dq1 = tl.zeros([BM, BK1 if BK1 > 0 else 16], dtype=tl.float32)
    bn = tl.arange(0, BN)
    for n0 in range(n_lo, n_hi, BN):
        n = n0 + bn
        kv_row = (k_start + n0).to(tl.int64) * H + g
        if MODE == 0:
            vis = (n[None, :] * CMP_D + CMP_L - 1) <= pos[:, None]
        else:
            u = n + k_offset
            vis = (u[None, :] <= pos[:, None]) & (u[None, :] > pos[:, None] - WINDOW)
        dq0, dq1 = _tile_grads(q0, q1, do, lse2, delta, ok, K + kv_row * DK, V + kv_row * DV,
                               GK + kv_row * DK, GV + kv_row * DV, bn, n < n_hi, vis, qk_scale,
                               sm_scale, dq0, dq1, H, DK, DV, BK0, BK1, BV, PREC, UPCAST, False,
                               KD0, KD1, VD, (k_start + n0).to(tl.int32), g * DK, g * DV, TMA)
    _store_dq(GQ, GQOUT, row0, rel, row_ok, dq0, dq1, sm_scale, DK, BK0, BK1, DQ_MODE, UPCAST)


@triton.jit
def _store_rows(base, rows, row_ok, col0, BK: tl.constexpr, D: tl.constexpr, x, ADD: tl.constexpr):
    """Columns col0..col0+BK of row-major rows of width D: ``x`` stored (ADD: added to what
    is there), cast to base's dtype, masked as :func:`._common.load_cols` reads them."""
    cols = col0 + tl.arange(0, BK)
    ptr = base + rows[:, None] + cols[None, :]
    mask = row_ok[:, None] & (cols[None, :] < D)
    if ADD:
        x += tl.load(ptr, mask=mask, other=0.0)
    tl.store(ptr, x.to(base.dtype.element_ty), mask=mask)


@triton.jit
def _kv_walk(Q, DO, LSE, DELTA, lo, n_first, n_tiles, lo2, g, q_start, q_len, q_offset, k_offset, n, k_len, k0,
             k1, v, acc_k0, acc_k1, acc_v, qk_scale, NT, HQ: tl.constexpr, G: tl.constexpr, HP: tl.constexpr,
             BT: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr, BK0: tl.constexpr, BK1: tl.constexpr,
             BV: tl.constexpr, MODE: tl.constexpr, CMP_L: tl.constexpr, CMP_D: tl.constexpr,
             WINDOW: tl.constexpr, PREC: tl.constexpr, UPCAST: tl.constexpr, EDGES: tl.constexpr,
             GM: tl.constexpr):
    """The band dk/dv over query tiles of BT positions, masked (rows past the sequence or seeing
    no key, keys past k_len or out of each row's band): EDGES, n_tiles tiles, n_first from
    position lo and the others from lo2; otherwise the tiles from lo to lo2. GM: DO is the
    group-major copy (:func:`_gm_rows`)."""
    BM: tl.constexpr = BT * HP
    for i in range(0, n_tiles if EDGES else (lo2 - lo + BT - 1) // BT):
        if EDGES:
            tq0 = tl.where(i < n_first, lo + i * BT, lo2 + (i - n_first) * BT)
        else:
            tq0 = lo + i * BT
        tq, row_ok, pos, row0, rel = C.tile_rows(tq0, g, q_start, q_len, q_offset, HQ, G, HP, BM)
        gm0, relg = _gm_rows(g, NT, q_start, tq0, G, HP, BM)
        q0, q1, do, lse2, delta, ok = _load_rows(Q, DO, LSE, DELTA, DO, row0, rel, row_ok, DK, DV,
                                                 BK0, BK1, BV, UPCAST, False, gm0=gm0, relg=relg, GM=GM)
        if MODE == 0:
            vis = (n[None, :] * CMP_D + CMP_L - 1) <= pos[:, None]
        else:
            u = n + k_offset
            vis = (u[None, :] <= pos[:, None]) & (u[None, :] > pos[:, None] - WINDOW)
        vis = vis & ok[:, None] & (n < k_len)[None, :]
        acc_k0, acc_k1, acc_v = _kv_tile_grads(q0, q1, do, lse2, delta, vis, k0, k1, v, acc_k0, acc_k1,
                                               acc_v, qk_scale, BK1, PREC)
    return acc_k0, acc_k1, acc_v


@triton.jit
def _band_bwd_dkdv(Q, K, V, DO, QD, QD1, DOD, LSE, DELTA, GK, GV, KTBL, SEQ, sm_scale, q_offset,
                   k_offset, part_k, part_v, NT, HQ: tl.constexpr, G: tl.constexpr, DK: tl.constexpr,
                   DV: tl.constexpr, MODE: tl.constexpr, CMP_L: tl.constexpr, CMP_D: tl.constexpr,
                   WINDOW: tl.constexpr, HP: tl.constexpr, BT: tl.constexpr, BN: tl.constexpr,
                   BK0: tl.constexpr, BK1: tl.constexpr, BV: tl.constexpr, PREC: tl.constexpr,
                   UPCAST: tl.constexpr, QCH: tl.constexpr, TMA: tl.constexpr, EDGES: tl.constexpr,
                   ADD: tl.constexpr, BTG: tl.constexpr):
    """Key-centric dk/dv (flash-attention-2): a program owns BN keys of one group and walks
    the query tiles that see them, so dk/dv stay in registers. QCH = 0: one program walks every
    such tile and stores dk/dv. QCH > 0 (cmp at long T, where the first key tiles are seen by
    every query and one program would walk them all): program_id(2) takes the query positions
    [c * QCH, (c + 1) * QCH) only and stores its share into chunk c's fp32 slice of GK/GV
    (part_k / part_v elements apart), which the launcher sums in chunk order: deterministic,
    and without atomics, whose addresses would cost the 64-key tiles their spill-free fit.

    TMA (HP = G): the query tiles in which every row sees every key of the tile (all but the
    few at the tile's diagonal and the sequence's end) are walked without masks, and read
    through QD, QD1 (q's columns BK0..) and DOD, 2-D tensor descriptors of group-major copies
    of q and do (``[H * NT * G, D]``, NT = B * T, written by the dq kernels): a tile's rows are
    BM consecutive rows there, which the copy engine loads into shared memory ahead of use
    (the loop is pipelined) as the MMA operand itself, with no per-row addresses in registers.
    EDGES: the other (masked) tiles only, read row by row (do from the group-major copy),
    added into GK/GV (ADD; into chunk c's slice with QCH), a second launch after the TMA one (a
    mask's registers and the pipeline do not fit in one kernel). Neither: every tile, masked, q
    and do as given. BTG: the grid of positions on which the two launches split the tiles (the
    TMA launch's BT; the edges may walk them in smaller tiles of BT, a divisor of BTG)."""
    BM: tl.constexpr = BT * HP
    pid = tl.program_id(0)
    g = tl.program_id(1)
    H: tl.constexpr = HQ // G
    # MODE 0 (cmp) reads the compressed keys' columns of SEQ, MODE 1 (win) the window keys'
    n0, q_start, q_len, k_start, k_len = C.program_rows(KTBL, SEQ, pid, 6 - 2 * MODE)
    bn = tl.arange(0, BN)
    n = n0 + bn
    n_ok = n < k_len
    kv_row = (k_start + n0).to(tl.int64) * H + g
    Kb = K + kv_row * DK
    k0 = C.load_cols(Kb, bn * (H * DK), n_ok, 0, BK0, DK, UPCAST)
    k1 = k0
    if BK1 > 0:
        k1 = C.load_cols(Kb, bn * (H * DK), n_ok, BK0, BK1, DK, UPCAST)
    v = C.load_cols(V + kv_row * DV, bn * (H * DV), n_ok, 0, BV, DV, UPCAST)
    qk_scale = sm_scale * LOG2E

    # local query indices that can see a key of the tile
    n_last = tl.minimum(n0 + BN, k_len) - 1
    if MODE == 0:
        tq_lo = tl.maximum(n0 * CMP_D + CMP_L - 1 - q_offset, 0)
        tq_hi = q_len
    else:
        tq_lo = tl.maximum(n0 + k_offset - q_offset, 0)
        tq_hi = tl.minimum(n_last + k_offset + WINDOW - q_offset, q_len)
    # tiles on one grid of BTG positions from 0, whatever the launch: the chunks (QCH a multiple
    # of BTG) and the edge launch of TMA walk parts of the same tiles
    tq_lo = (tq_lo // BTG) * BTG
    if QCH > 0:  # this program's chunk
        c0 = tl.program_id(2) * QCH
        tq_lo = tl.maximum(tq_lo, c0)
        tq_hi = tl.minimum(tq_hi, c0 + QCH)

    acc_k0 = tl.zeros([BN, BK0], dtype=tl.float32)
    acc_k1 = tl.zeros([BN, BK1 if BK1 > 0 else 16], dtype=tl.float32)
    acc_v = tl.zeros([BN, BV], dtype=tl.float32)
    t_a = tq_hi  # [t_a, t_b): the query tiles in which every row sees every key of the tile
    t_b = tq_hi
    if TMA or EDGES:
        if MODE == 0:  # positions from the last key's completion on, whole tiles
            t_a = n_last * CMP_D + CMP_L - 1 - q_offset
            t_b = tq_hi
        else:  # positions that see the last key and still the first: [n_last, n0 + w - 1] + k_offset
            t_a = n_last + k_offset - q_offset
            t_b = tl.minimum(n0 + k_offset + WINDOW - q_offset, tq_hi)
        t_a = tl.minimum(((tl.maximum(t_a, tq_lo) + BTG - 1) // BTG) * BTG, tq_hi)  # whole tiles, in [tq_lo, tq_hi]
        t_b = tl.maximum((tl.minimum(t_b, tq_hi) // BTG) * BTG, t_a)
    if TMA:
        for tq0 in range(t_a, t_b, BT):
            t = ((g * NT + q_start + tq0) * G).to(tl.int32)  # the tile's first row in the copies
            q0 = QD.load([t, 0])
            q1 = q0
            if BK1 > 0:
                q1 = QD1.load([t, 0])
            do = DOD.load([t, 0])
            if UPCAST:
                q0, q1, do = q0.to(tl.float32), q1.to(tl.float32), do.to(tl.float32)
            _, _, _, row0, rel = C.tile_rows(tq0, g, q_start, q_len, q_offset, HQ, G, HP, BM)  # all rows valid
            lse2 = tl.load(LSE + row0 + rel) * LOG2E
            delta = tl.load(DELTA + row0 + rel)
            acc_k0, acc_k1, acc_v = _kv_tile_grads(q0, q1, do, lse2, delta, None, k0, k1, v, acc_k0, acc_k1,
                                                   acc_v, qk_scale, BK1, PREC)
    elif EDGES:  # the masked tiles: [tq_lo, t_a), then [t_b, tq_hi)
        n_first = (t_a - tq_lo + BT - 1) // BT
        n_tiles = n_first + (tq_hi - t_b + BT - 1) // BT
        acc_k0, acc_k1, acc_v = _kv_walk(Q, DO, LSE, DELTA, tq_lo, n_first, n_tiles, t_b, g, q_start, q_len,
                                         q_offset, k_offset, n, k_len, k0, k1, v, acc_k0, acc_k1, acc_v, qk_scale,
                                         NT, HQ, G, HP, BT, DK, DV, BK0, BK1, BV, MODE, CMP_L, CMP_D, WINDOW,
                                         PREC, UPCAST, True, True)
    else:  # every tile, masked
        acc_k0, acc_k1, acc_v = _kv_walk(Q, DO, LSE, DELTA, tq_lo, 0, 0, tq_hi, g, q_start, q_len, q_offset,
                                         k_offset, n, k_len, k0, k1, v, acc_k0, acc_k1, acc_v, qk_scale, NT, HQ, G,
                                         HP, BT, DK, DV, BK0, BK1, BV, MODE, CMP_L, CMP_D, WINDOW, PREC, UPCAST,
                                         False, False)

    if EDGES:
        if n_tiles <= 0:  # nothing to add (a chunk before or past the tile's rows)
            return
    GKb = GK + kv_row * DK
    GVb = GV + kv_row * DV
    if QCH > 0:  # chunk c's own fp32 slice, written once (zeros from chunks before the keys' queries)
        GKb += tl.program_id(2).to(tl.int64) * part_k
        GVb += tl.program_id(2).to(tl.int64) * part_v
    _store_rows(GKb, bn * (H * DK), n_ok, 0, BK0, DK, acc_k0 * sm_scale, ADD)
    if BK1 > 0:
        _store_rows(GKb, bn * (H * DK), n_ok, BK0, BK1, DK, acc_k1 * sm_scale, ADD)
    _store_rows(GVb, bn * (H * DV), n_ok, 0, BV, DV, acc_v, ADD)


@triton.jit
def _selected_bwd(Q, K, V, KD0, KD1, VD, DO, O, DELTA, GQ, GK, GV, GATES, DG, DOB, IDX, FLAGS, TBL, SEQ, LSEBUF,
                  sm_scale, q_offset,
                  HQ: tl.constexpr, G: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr,
                  SEL_L: tl.constexpr, BS: tl.constexpr, N_SEL: tl.constexpr, NP: tl.constexpr,
                  HP: tl.constexpr, BT: tl.constexpr, BK0: tl.constexpr, BK1: tl.constexpr,
                  BV: tl.constexpr, PREC: tl.constexpr, UPCAST: tl.constexpr, KV: tl.constexpr,
                  HAVE_LSE: tl.constexpr, GIDX: tl.constexpr, SHARE: tl.constexpr, SKIP: tl.constexpr,
                  TMA: tl.constexpr, FORCED: tl.constexpr):
    """slc dq (and with KV, dk/dv by atomics): one program per (position tile, group).
    Without HAVE_LSE a first pass computes the slc lse into LSEBUF. GIDX >= 0: DO is the gated
    output's gradient (:func:`_load_rows`: DG, DOB). SHARE / SKIP: the two passes of a split
    launch, as the forward's (:func:`.selected._selected_fwd`). TMA (one position a tile, no
    KV): the gradient pass reads each block through the descriptors KD0, KD1, VD, as the
    forward does. FORCED (HAVE_LSE, one position a tile): the position's forced blocks are left
    to :func:`_forced_bwd_dq`, which runs after this kernel."""
    BM: tl.constexpr = BT * HP
    pid = tl.program_id(0)
    g = tl.program_id(1)
    H: tl.constexpr = HQ // G
    t0, q_start, q_len, k_start, k_len = C.program_rows(TBL, SEQ, pid, 2)  # slc keys
    go, lists = split_tile(IDX, FLAGS, q_start, t0, q_len, g, H, N_SEL, NP, BT, SHARE, SKIP)
    if not go:
        return
    if FORCED:
        lists, n_rest = drop_forced(lists, q_offset + t0, SEL_L)
    n_steps, uniq = tile_uniques(lists, N_SEL, BT)  # each block once, as the forward
    if FORCED:
        n_steps = n_rest

    tq, row_ok, pos, row0, rel = C.tile_rows(t0, g, q_start, q_len, q_offset, HQ, G, HP, BM)
    ar = tl.arange(0, BS)
    qk_scale = sm_scale * LOG2E

    if not HAVE_LSE:  # pass 1: the slc log-sum-exp of every row, written to LSEBUF for pass 2
        q0 = C.load_cols(Q + row0 * DK, rel * DK, row_ok, 0, BK0, DK, UPCAST)
        q1 = q0
        if BK1 > 0:
            q1 = C.load_cols(Q + row0 * DK, rel * DK, row_ok, BK0, BK1, DK, UPCAST)
        m_i = tl.full([BM], -1.0e30, dtype=tl.float32)
        l_i = tl.zeros([BM], dtype=tl.float32)
        for ps in range(0, n_steps):
            blk, sel, u, u_ok = tile_block(lists, uniq, ps, row_ok, k_len, SEL_L, BS, HP, BT)
            kb = K + ((k_start + tl.maximum(blk, 0).to(tl.int64) * SEL_L) * H + g) * DK
            s = tl.dot(q0, tl.trans(C.load_cols(kb, ar * (H * DK), u_ok, 0, BK0, DK, UPCAST)),
                       input_precision=PREC)
            if BK1 > 0:
                s += tl.dot(q1, tl.trans(C.load_cols(kb, ar * (H * DK), u_ok, BK0, BK1, DK, UPCAST)),
                            input_precision=PREC)
            vis = sel[:, None] & u_ok[None, :] & (u[None, :] <= pos[:, None])
            s = tl.where(vis, s * qk_scale, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            l_i = l_i * tl.exp2(m_i - m_new) + tl.sum(tl.exp2(s - m_new[:, None]), 1)
            m_i = m_new
        lse = tl.where(l_i > 0, (m_i + tl.log2(tl.where(l_i > 0, l_i, 1.0))) * 0.6931471805599453,
                       float("-inf"))
        tl.store(LSEBUF + row0 + rel, lse, mask=row_ok)

    # pass 2: gradients, block by block in the same order
    q0, q1, do, lse2, delta, ok = _load_rows(Q, DO, LSEBUF, DELTA, O, row0, rel, row_ok, DK, DV,
                                             BK0, BK1, BV, UPCAST, True, GATES, DG, DOB, GIDX)
    dq0 = tl.zeros([BM, BK0], dtype=tl.float32)
    dq1 = tl.zeros([BM, BK1 if BK1 > 0 else 16], dtype=tl.float32)
    for ps in range(0, n_steps):
        blk, sel, u, u_ok = tile_block(lists, uniq, ps, row_ok, k_len, SEL_L, BS, HP, BT)
        kv_row = (k_start + tl.maximum(blk, 0).to(tl.int64) * SEL_L) * H + g
        krow = (k_start + tl.maximum(blk, 0) * SEL_L).to(tl.int32)  # the block's first row (TMA)
        vis = sel[:, None] & (u[None, :] <= pos[:, None])
        dq0, dq1 = _tile_grads(q0, q1, do, lse2, delta, ok, K + kv_row * DK, V + kv_row * DV,
                               GK + kv_row * DK, GV + kv_row * DV, ar, u_ok, vis, qk_scale,
                               sm_scale, dq0, dq1, H, DK, DV, BK0, BK1, BV, PREC, UPCAST, KV,
                               KD0, KD1, VD, krow, g * DK, g * DV, TMA)
    _store_dq(GQ, GQ, row0, rel, row_ok, dq0, dq1, sm_scale, DK, BK0, BK1, 0)


@triton.jit
def _forced_bwd_dq(Q, K, V, KD0, KD1, VD, DO, DELTA, LSE, GQ, TBL, SEQ, sm_scale, q_offset,
                   HQ: tl.constexpr, G: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr,
                   SEL_L: tl.constexpr, BS: tl.constexpr, HP: tl.constexpr, BT: tl.constexpr,
                   BK0: tl.constexpr, BK1: tl.constexpr, BV: tl.constexpr, PREC: tl.constexpr,
                   UPCAST: tl.constexpr, TMA: tl.constexpr):
    """The slc dq over the forced blocks (:func:`.selected._forced_fwd`'s tiles), added into the
    fp32 dq buffer GQ after :func:`_selected_bwd` (FORCED) has written the branch's do (DO), delta
    and its share of dq over the other blocks; LSE, the slc log-sum-exp over all blocks. TMA:
    the blocks through the descriptors KD0, KD1, VD."""
    BM: tl.constexpr = BT * HP
    pid = tl.program_id(0)
    g = tl.program_id(1)
    H: tl.constexpr = HQ // G
    t0, q_start, q_len, k_start, k_len = C.program_rows(TBL, SEQ, pid, 2)  # slc keys
    tq, row_ok, pos, row0, rel = C.tile_rows(t0, g, q_start, q_len, q_offset, HQ, G, HP, BM)
    q0, q1, do, lse2, delta, ok = _load_rows(Q, DO, LSE, DELTA, DO, row0, rel, row_ok, DK, DV, BK0, BK1, BV,
                                             UPCAST, False)
    ar = tl.arange(0, BS)
    qk_scale = sm_scale * LOG2E
    first, n_blk = forced_blocks(t0, q_len, q_offset, BT, SEL_L)
    dq0 = tl.zeros([BM, BK0], dtype=tl.float32)
    dq1 = tl.zeros([BM, BK1 if BK1 > 0 else 16], dtype=tl.float32)
    for i in range(0, n_blk):
        blk, forced, u, u_ok = forced_block(i, first, pos, k_len, ar, SEL_L)
        kv_row = (k_start + blk.to(tl.int64) * SEL_L) * H + g
        vis = forced[:, None] & (u[None, :] <= pos[:, None])
        krow = (k_start + blk * SEL_L).to(tl.int32)
        dq0, dq1 = _tile_grads(q0, q1, do, lse2, delta, ok, K + kv_row * DK, V + kv_row * DV, K, V, ar, u_ok, vis,
                               qk_scale, sm_scale, dq0, dq1, H, DK, DV, BK0, BK1, BV, PREC, UPCAST, False,
                               KD0, KD1, VD, krow, g * DK, g * DV, TMA)
    _store_dq(GQ, GQ, row0, rel, row_ok, dq0, dq1, sm_scale, DK, BK0, BK1, 0)


@triton.jit
def _slc_kv_rows(Q, DO, LSE, DELTA, QPOS, st, i0, cnt, q_start, q_offset, g, u, u_ok, k0, k1, v, acc_k0, acc_k1,
                 acc_v, qk_scale, HQ: tl.constexpr, G: tl.constexpr, HP: tl.constexpr, BT: tl.constexpr,
                 DK: tl.constexpr, DV: tl.constexpr, BK0: tl.constexpr, BK1: tl.constexpr, BV: tl.constexpr,
                 PREC: tl.constexpr, UPCAST: tl.constexpr, MASKED: tl.constexpr):
    """The slc dk/dv share of the item's entries i0 .. i0 + BT - 1 (their rows gathered from the
    query positions in QPOS). MASKED: rows past the item and keys past each row's position (or the
    sequence) masked; otherwise BT whole entries that see every key of the block."""
    BM: tl.constexpr = BT * HP
    r = tl.arange(0, BM)
    hh = r % HP
    ent = i0 + r // HP
    in_chunk = ent < cnt
    tq = tl.load(QPOS + st + ent, mask=in_chunk, other=0)  # local query positions
    rel = (q_start + tq).to(tl.int64) * HQ + g * G + hh  # scattered rows: 64-bit each
    if MASKED:
        row_ok = in_chunk & (hh < G)
    else:
        row_ok = tl.full([BM], True, tl.int1)  # every row a position of the item
    q0, q1, do, lse2, delta, ok = _load_rows(Q, DO, LSE, DELTA, DO, 0, rel, row_ok, DK, DV, BK0, BK1, BV,
                                             UPCAST, False)
    if MASKED:
        vis = ok[:, None] & u_ok[None, :] & (u[None, :] <= (q_offset + tq)[:, None])
    else:
        vis = None
    return _kv_tile_grads(q0, q1, do, lse2, delta, vis, k0, k1, v, acc_k0, acc_k1, acc_v, qk_scale, BK1, PREC)


@triton.jit
def _selected_bwd_dkdv(Q, K, V, DO, O, LSE, DELTA, GK, GV, ITEMS, QPOS, SEQ, sm_scale, q_offset,
                       HQ: tl.constexpr, G: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr,
                       SEL_L: tl.constexpr, BS: tl.constexpr, HP: tl.constexpr, BT: tl.constexpr,
                       BK0: tl.constexpr, BK1: tl.constexpr, BV: tl.constexpr,
                       PREC: tl.constexpr, UPCAST: tl.constexpr, PARTIAL: tl.constexpr, CH: tl.constexpr):
    """slc dk/dv through the transposed index: a program owns one selected block j of group g
    and a chunk of the query positions that selected it (ITEMS row: sequence, g, j, first
    entry of QPOS, count); dk/dv of the block stay in registers, one atomic add per chunk.
    Positions that see every key of the block (all but the block's own, a prefix of the
    ascending list) run in whole tiles without the [rows, keys] mask (CH: the chunk rounded up
    to a power of two, to count the prefix): 702 against 859 SASS instructions a tile (sm_90)."""
    BM: tl.constexpr = BT * HP
    it = tl.program_id(0).to(tl.int64) * 5
    seq = tl.load(ITEMS + it)
    g = tl.load(ITEMS + it + 1)
    blk = tl.load(ITEMS + it + 2)
    st = tl.load(ITEMS + it + 3)
    cnt = tl.load(ITEMS + it + 4)
    if cnt == 0:  # an empty item past the real ones (the index is sized by a bound)
        return
    H: tl.constexpr = HQ // G
    q_start = tl.load(SEQ + seq * 8 + 0)
    k_start = tl.load(SEQ + seq * 8 + 2)
    k_len = tl.load(SEQ + seq * 8 + 3)
    ar = tl.arange(0, BS)
    u = blk * SEL_L + ar
    u_ok = (ar < SEL_L) & (u < k_len)
    kv_row = (k_start + blk * SEL_L) * H + g
    dk0 = tl.arange(0, BK0)
    dv = tl.arange(0, BV)
    Kb = K + kv_row * DK
    k0 = C.load_cols(Kb, ar * (H * DK), u_ok, 0, BK0, DK, UPCAST)
    k1 = k0
    if BK1 > 0:
        dk1 = BK0 + tl.arange(0, BK1)
        k1 = C.load_cols(Kb, ar * (H * DK), u_ok, BK0, BK1, DK, UPCAST)
    v = C.load_cols(V + kv_row * DV, ar * (H * DV), u_ok, 0, BV, DV, UPCAST)
    qk_scale = sm_scale * LOG2E

    acc_k0 = tl.zeros([BS, BK0], dtype=tl.float32)
    acc_k1 = tl.zeros([BS, BK1 if BK1 > 0 else 16], dtype=tl.float32)
    acc_v = tl.zeros([BS, BV], dtype=tl.float32)
    # The item's positions ascend, so those that do not yet see the whole block (its own) are a
    # prefix [0, n_m); the whole tiles after it run without the [rows, keys] mask
    e = tl.arange(0, CH)
    t_all = tl.load(QPOS + st + e, mask=e < cnt, other=0)
    n_m = tl.sum(((e < cnt) & (q_offset + t_all < blk * SEL_L + SEL_L - 1)).to(tl.int32))
    i_a = tl.minimum((n_m + BT - 1) // BT * BT, cnt)
    i_b = i_a
    if HP == G:  # no padding rows
        i_b = i_a + (cnt - i_a) // BT * BT
    for i0 in range(0, i_a, BT):
        acc_k0, acc_k1, acc_v = _slc_kv_rows(Q, DO, LSE, DELTA, QPOS, st, i0, cnt, q_start, q_offset, g, u, u_ok,
                                             k0, k1, v, acc_k0, acc_k1, acc_v, qk_scale, HQ, G, HP, BT, DK, DV,
                                             BK0, BK1, BV, PREC, UPCAST, True)
    for i0 in range(i_a, i_b, BT):
        acc_k0, acc_k1, acc_v = _slc_kv_rows(Q, DO, LSE, DELTA, QPOS, st, i0, cnt, q_start, q_offset, g, u, u_ok,
                                             k0, k1, v, acc_k0, acc_k1, acc_v, qk_scale, HQ, G, HP, BT, DK, DV,
                                             BK0, BK1, BV, PREC, UPCAST, False)
    for i0 in range(i_b, cnt, BT):
        acc_k0, acc_k1, acc_v = _slc_kv_rows(Q, DO, LSE, DELTA, QPOS, st, i0, cnt, q_start, q_offset, g, u, u_ok,
                                             k0, k1, v, acc_k0, acc_k1, acc_v, qk_scale, HQ, G, HP, BT, DK, DV,
                                             BK0, BK1, BV, PREC, UPCAST, True)

    if PARTIAL:  # deterministic: this item's share into its own rows GK/GV [n_items, BS, D]
        pi = tl.program_id(0).to(tl.int64) * BS
        tl.store(GK + (pi + ar[:, None]) * DK + dk0[None, :], acc_k0 * sm_scale, mask=dk0[None, :] < DK)
        if BK1 > 0:
            tl.store(GK + (pi + ar[:, None]) * DK + dk1[None, :], acc_k1 * sm_scale, mask=dk1[None, :] < DK)
        tl.store(GV + (pi + ar[:, None]) * DV + dv[None, :], acc_v, mask=dv[None, :] < DV)
    else:
        GKb = GK + kv_row * DK
        tl.atomic_add(GKb + ar[:, None] * (H * DK) + dk0[None, :], acc_k0 * sm_scale,
                      mask=u_ok[:, None] & (dk0[None, :] < DK), sem="relaxed")
        if BK1 > 0:
            tl.atomic_add(GKb + ar[:, None] * (H * DK) + dk1[None, :], acc_k1 * sm_scale,
                          mask=u_ok[:, None] & (dk1[None, :] < DK), sem="relaxed")
        tl.atomic_add(GV + kv_row * DV + ar[:, None] * (H * DV) + dv[None, :], acc_v,
                      mask=u_ok[:, None] & (dv[None, :] < DV), sem="relaxed")


@triton.jit
def _segment_sum(PART, OUT, SEGS, ITEMS, SEQ, H: tl.constexpr, D: tl.constexpr, SEL_L: tl.constexpr,
                 BS: tl.constexpr, BD: tl.constexpr):
    """Deterministic slc dk (or dv): one program per (block of a group, BD columns) sums the
    shares of the block's work items in their order (SEGS row: first item, count) and stores
    them into the block's key rows of OUT."""
    sg = tl.program_id(0).to(tl.int64) * 2
    first = tl.load(SEGS + sg)
    cnt = tl.load(SEGS + sg + 1)
    if cnt == 0:  # an empty segment past the real ones
        return
    seq = tl.load(ITEMS + first * 5)
    g = tl.load(ITEMS + first * 5 + 1)
    blk = tl.load(ITEMS + first * 5 + 2)
    k_start = tl.load(SEQ + seq * 8 + 2)
    k_len = tl.load(SEQ + seq * 8 + 3)
    ar = tl.arange(0, BS)
    col = tl.program_id(1) * BD + tl.arange(0, BD)
    col_ok = col[None, :] < D
    acc = tl.zeros([BS, BD], dtype=tl.float32)
    for i in range(first, first + cnt):
        acc += tl.load(PART + (i * BS + ar[:, None]) * D + col[None, :], mask=col_ok, other=0.0)
    u_ok = (ar < SEL_L) & (blk * SEL_L + ar < k_len)
    row = (k_start + blk * SEL_L) * H + g
    tl.store(OUT + (row + ar[:, None] * H) * D + col[None, :], acc, mask=u_ok[:, None] & col_ok)


@triton.jit
def _tidx_entries(BI, TBL, SEQ, q_offset, n_r, SPAN: tl.constexpr, H: tl.constexpr, N_SEL: tl.constexpr,
                  NP: tl.constexpr, N_BLK: tl.constexpr, SEL_L: tl.constexpr, BR: tl.constexpr):
    """The selections of BR positions of one group (TBL row: sequence, first local position):
    their keys (sequence, group, span of positions, block) in the transposed index, which of
    them are real (not -1, not a block past the sequence's keys nor one that starts after the
    position: neither has a gradient), and which are the block's own positions (those that do
    not see all of it)."""
    seq = tl.load(TBL + tl.program_id(0) * 2).to(tl.int64)
    t0 = tl.load(TBL + tl.program_id(0) * 2 + 1)
    g = tl.program_id(1)
    q_start = tl.load(SEQ + seq * 8 + 0)
    q_len = tl.load(SEQ + seq * 8 + 1)
    k_len = tl.load(SEQ + seq * 8 + 3)  # KSN: the slc keys
    t = t0 + tl.arange(0, BR)
    j = tl.arange(0, NP)
    ok = (t[:, None] < q_len) & (j[None, :] < N_SEL)
    blk = tl.load(BI + ((q_start + t[:, None]) * H + g) * N_SEL + j[None, :], mask=ok, other=-1)
    ok = ok & (blk >= 0) & (blk * SEL_L < k_len) & (blk * SEL_L <= q_offset + t[:, None])
    key = (((seq * H + g) * n_r + t[:, None] // SPAN) * N_BLK) + blk
    own = q_offset + t[:, None] < blk * SEL_L + SEL_L - 1
    return t, key, ok, own


@triton.jit
def _tidx_count(BI, TBL, SEQ, HIST, n_keys, q_offset, n_r, SPAN: tl.constexpr, H: tl.constexpr,
                N_SEL: tl.constexpr, NP: tl.constexpr, N_BLK: tl.constexpr, SEL_L: tl.constexpr,
                BR: tl.constexpr):
    """Transposed index, pass 1: per key, the entries (HIST[key]) and the own ones among them
    (HIST[n_keys + key])."""
    t, key, ok, own = _tidx_entries(BI, TBL, SEQ, q_offset, n_r, SPAN, H, N_SEL, NP, N_BLK, SEL_L, BR)
    tl.atomic_add(HIST + key, 1, mask=ok, sem="relaxed")
    tl.atomic_add(HIST + n_keys + key, 1, mask=ok & own, sem="relaxed")


@triton.jit
def _tidx_place(BI, TBL, SEQ, HIST, STARTS, QPOS, n_keys, q_offset, n_r, SPAN: tl.constexpr, H: tl.constexpr,
                N_SEL: tl.constexpr, NP: tl.constexpr, N_BLK: tl.constexpr, SEL_L: tl.constexpr,
                BR: tl.constexpr):
    """Pass 2: each entry takes a slot of its key's segment by counting the key's pass-1 count
    down: own positions the slots [0, own), the others [own, count), so that the own ones
    (the only ones that need the causal mask) are a prefix. The order inside each part is
    the atomics' (deterministic=True builds the index sorted instead)."""
    t, key, ok, own = _tidx_entries(BI, TBL, SEQ, q_offset, n_r, SPAN, H, N_SEL, NP, N_BLK, SEL_L, BR)
    slot = tl.atomic_add(HIST + key + tl.where(own, n_keys, 0), -1, mask=ok, sem="relaxed") - 1
    start = tl.load(STARTS + key, mask=ok, other=0)
    tl.store(QPOS + start + slot, tl.broadcast_to(t[:, None], [BR, NP]).to(tl.int64), mask=ok)


@triton.jit
def _tidx_items(STARTS, ENDS, FIRST, ITEMS, SEGS, n_r, n_items, H: tl.constexpr, N_BLK: tl.constexpr,
                CHUNK: tl.constexpr):
    """Pass 3, one program per key: its work items (sequence, group, block, first entry,
    count <= CHUNK) from item FIRST[key] on (below n_items, the host's bound of them), and its
    SEGS row (first item, item count)."""
    s = tl.program_id(0).to(tl.int64)
    st = tl.load(STARTS + s)
    cnt = tl.load(ENDS + s) - st
    first = tl.load(FIRST + s)
    nch = (cnt + CHUNK - 1) // CHUNK
    tl.store(SEGS + s * 2, first)
    tl.store(SEGS + s * 2 + 1, nch)
    seq = s // (H * n_r * N_BLK)
    g = (s // (n_r * N_BLK)) % H
    blk = s % N_BLK
    for c in range(0, tl.minimum(nch, n_items - first)):
        row = ITEMS + (first + c) * 5
        tl.store(row, seq)
        tl.store(row + 1, g)
        tl.store(row + 2, blk)
        tl.store(row + 3, st + c * CHUNK)
        tl.store(row + 4, tl.minimum(cnt - c * CHUNK, CHUNK))


# ------------------------------------------------------------------------------ launchers
_FORCED_ARGS = ("HQ", "G", "DK", "DV", "SEL_L", "BS", "BK0", "BK1", "BV", "PREC", "UPCAST")  # _forced_bwd_dq's


def _tma_rows(h: int, dtype: torch.dtype, device, interp: bool) -> bool:
    """Whether the band dk/dv reads its query tiles through tensor descriptors (``TMA`` of
    :func:`_band_bwd_dkdv`): heads a group a power of two up to 128 (tiles without padding
    rows), and on a GPU a Hopper or later one with 16-bit inputs (fp32 tiles would not fit two
    stages in shared memory). The interpreter takes it for every dtype (so CI runs it)."""
    if h & (h - 1) or h > 128:
        return False
    if interp:
        return True
    return dtype in (torch.float16, torch.bfloat16) and torch.cuda.get_device_capability(device)[0] >= 9


def _band_configs(h: int, Dk: int, Dv: int, mode: int, interp: bool, tma: bool = False) -> tuple[dict, dict]:
    """Tiles of the band backward: (dq kernel, dk/dv kernel), each HP, BT (query positions a
    tile), BN (keys a tile), num_warps, num_stages. The two kernels hold different
    accumulators (dq [BT*HP, Dk] against dk/dv [BN, Dk + Dv]), so they get their own tiles:
    dq 64 rows x 32 keys, 3 stages; dk/dv 64 keys (the smallest M of a Hopper warpgroup's MMA
    for dk^T-shaped products, which 32-key tiles ran half empty) walking 128-row query tiles,
    1 stage. Timed on an H200 at the paper geometry, 64k (cmp dk/dv 54.7 -> 40.8 ms with 2
    stages, which spill; 1 stage measured 41.6 before), spill-free with triton 3.6 for sm_90
    (tests/test_spills.py). The window's dk/dv walks 32-row tiles, 3 stages: its 128-row tile
    spills 4 registers with 4 kv heads (an H200 ran it in 12.9 ms at 64k, the spill-free 32-row
    tile 16.0; every other spill-free tile measured slower still: bwd_band_tiles_h200.json).

    ``tma`` (:func:`_tma_rows`): the dk/dv of both branches walks its unmasked tiles through
    tensor descriptors, 128 rows with 2 stages (3 do not fit in shared memory at Dk 192), and
    its masked edge tiles in a second launch of the plain 128-row, 1-stage tile: H200, 64k,
    paper, dk/dv kernels: cmp 43.5 -> 37.2 ms, win 16.2 -> 10.3 (bwd_tma_h200.json).

    The window's dq walks 128 rows x 64 keys at 8 warps, 2 stages (H100, paper, window
    backward 2.62 -> 2.48 ms at 8k, 20.3 -> 19.4 at 64k; cmp's 64 x 32 won for cmp:
    dq_tiles_h100.json)."""
    if interp:  # the interpreter pays per op: big tiles, few programs
        HP, BT, _ = C.rows_for(h, 64)
        cfg = dict(HP=HP, BT=BT, BN=32, num_warps=4, num_stages=1)
        return cfg, dict(cfg, TMA=tma)
    HP, BT, _ = C.rows_for(h, 64)
    cfg_q = dict(HP=HP, BT=BT, BN=32, num_warps=4, num_stages=3)
    if mode == 1:  # the window's dq: 128 rows x 64 keys
        HP, BT, _ = C.rows_for(h, 128)
        cfg_q = dict(HP=HP, BT=BT, BN=64, num_warps=8, num_stages=2)
    if tma:  # 128-row tiles, loads overlapped with the previous tile's products
        HP, BT, _ = C.rows_for(h, 128)
        return cfg_q, dict(HP=HP, BT=BT, BN=64, num_warps=8, num_stages=2, TMA=True)
    if mode == 1:  # the window's 128-row tile spills 4 registers with the paper's 4 kv heads
        HP, BT, _ = C.rows_for(h, 32)
        return cfg_q, dict(HP=HP, BT=BT, BN=64, num_warps=8, num_stages=3, TMA=False)
    HP, BT, _ = C.rows_for(h, 128)
    cfg_kv = dict(HP=HP, BT=BT, BN=64, num_warps=8, num_stages=1, TMA=False)
    return cfg_q, cfg_kv


# The slc dq's shared pass (64 rows, selected.share_split): at the paper geometry 8 warps x 2
# stages is the config without spills (sm_90 compile: 4 warps spill 80-104 bytes a thread,
# 8 warps x 1 stage 152; tests/test_spills.py).
SLC_DQ_SHARED = dict(num_warps=8, num_stages=2)

# The slc dq's one-position tiles of at most 16 heads reading their blocks through descriptors
# run at 2 warps (~243 registers at Dk 192, no spill; pointer loads spill 24 bytes there): H100,
# paper configuration, slc backward 5.31 -> 5.01 ms at 8k, 49.0 -> 46.2 at 64k (slc_warps_h100.json).
SLC_DQ_TMA_WARPS = 2


def slc_dq_config(cfg: dict, tma: bool) -> dict:
    """The slc dq launch's config: ``cfg`` of :func:`_slc_configs`, at SLC_DQ_TMA_WARPS for
    one-position tiles of at most 16 heads through descriptors (``tma``)."""
    if tma and cfg["BT"] == 1 and cfg["HP"] <= 16:
        return dict(cfg, num_warps=SLC_DQ_TMA_WARPS)
    return cfg


SLC_SPAN = None
"""Query positions a span of the slc dk/dv's index (:func:`transposed_index`'s ``span``; 0: the
whole sequence) on a GPU; None: by the longest sequence (:func:`_slc_span`)."""


def _slc_span(span, lens) -> int:
    """The span of the slc dk/dv's index: ``span`` unless None, else T / 16 for the longest
    sequence's T, within 1024 .. 4096 positions (32 in the interpreter, to have several a test).
    A group's q and do rows of 4096 positions (16 heads x (192 + 128) bf16) are 42 MB, near the
    50 MB of L2 that the programs running at once share. H200, paper configuration, slc
    backward against the whole sequence's items (0): 8k 5.52 -> 5.16 ms at 1024, 5.20 at 2048;
    64k 46.0 -> 49.2 at 1024, 46.1 at 2048, 45.3 at 4096, more items costing more (slc_span_h200.json).
    The index has a key per (sequence, group, span, block) with spans and blocks counted for the
    longest sequence, so a pack of many sequences gets longer spans: at most 64 sequence-spans."""
    if span is not None:
        return span
    if C.interpreting():
        return 32
    t = max(lens, default=0)
    span = min(4096, max(1024, C.next_pow2(t) // 16))
    if len(lens) > 1:
        span = max(span, C.cdiv(t, max(1, 64 // len(lens))))
    return span


def _slc_configs(h: int, Dk: int, Dv: int, interp: bool) -> tuple[dict, dict]:
    """Tiles of the slc backward: (dq kernel: HP, BT, num_warps, num_stages; dk/dv kernel over
    the transposed index: HP, BT, num_warps, num_stages and ``chunk``, the query positions of
    one work item). dq: 16 rows a tile as the forward, 2 stages; dk/dv: 128-row query tiles
    (H200, paper geometry at 64k: dq 37.5 -> 24.8 ms, dk/dv 33.0 -> 23.5 ms; spill-free)."""
    HP, BT, _ = C.rows_for(h, 16)  # as the forward: one tile row block per 16 rows
    cfg_q = dict(HP=HP, BT=BT, num_warps=4, num_stages=1 if interp else 2)
    HP, BT, _ = C.rows_for(h, 64 if interp else 128)
    # [l', Dk + Dv] fp32 accumulators: more warps than the dq kernel's 16-row tiles
    cfg_kv = dict(HP=HP, BT=BT, num_warps=4 if interp else 8, num_stages=1, chunk=64 if interp else 256,
                  span=SLC_SPAN)
    return cfg_q, cfg_kv


def band_backward(q, k, v, o, lse, do, *, mode: int, scale: float, seq, lens, q_offset=0,
                  k_offset=0, cmp_block=1, cmp_stride=1, window=1, dq_acc=None, q_chunk=None,
                  gates=None, gate=0, d_gates=None, dq_mode=0, dq_out=None, q_gm=None, write_q_gm=True,
                  dkdv_stream=None):
    """Gradients of :func:`.band.band_attention` (MODE 0 cmp / 1 win): two launches, dq
    query-centric and dk/dv key-centric (flash-attention-2), deterministic on every path (no
    atomics). q_chunk (cmp only; None picks it from the GPU's size, 0 turns it off): query
    positions per dk/dv program, so that the first compressed keys (seen by every query) are
    not one program's walk over all T queries; each chunk's share goes to an fp32 buffer of its
    own (n_chunks x k's and v's size; the automatic choice keeps n_chunks x key programs near
    four waves of the GPU: 63 MB at 64k in the paper geometry), summed in chunk order.

    q ``[B, T, HQ, Dk]``, k ``[B, Tk, H, Dk]``, v ``[B, Tk, H, Dv]``, o and do ``[B, T, HQ, Dv]``,
    lse ``[B, T, HQ]`` (natural log, -inf for empty rows). Returns (dq fp32 ``[B, T, HQ, Dk]``,
    dk, dv in k's / v's dtype); dq is added into ``dq_acc`` when given. ``dq_mode`` (with
    dq_acc), for the branches of one backward: 1, the first, stores its dq into dq_acc (which
    may be uninitialised); 2, the last, adds dq_acc's sum and writes it to ``dq_out`` (q's
    shape, any float dtype), which is then the dq returned. Each saves a pass over the fp32
    buffer (3.2 GB at 64k in the paper configuration).

    gates ``[B, T, HQ, 3]`` (with ``gate``, the branch's index, and ``d_gates``, fp32 of gates'
    shape): do is the gradient of the gated NSA output (Eq. 5); the dq kernel forms the
    branch's do_i = gates[..., gate] * do as it loads its rows (for the dk/dv kernel too) and
    writes the gate's gradient rowsum(do * o) into d_gates[..., gate]: no separate pass.

    q_gm (where :func:`_tma_rows` holds): a group-major copy of q (``[H, B * T, G, Dk]``) that
    the dk/dv kernel's descriptor tiles read, written by this call's dq kernel when
    ``write_q_gm`` (else already written by an earlier branch of the same backward); None: a
    copy of this call's own.

    dkdv_stream (:func:`C.side_stream`, None: the current stream): where the dk/dv launches
    go, after the dq kernel, so that they overlap the caller's next launches; dk and dv are
    then ready after :func:`C.join_side` of that stream.
    """
    q, k, v, do = q.contiguous(), k.contiguous(), v.contiguous(), do.to(q.dtype).contiguous()
    B, T, HQ, Dk = q.shape
    H, Dv = k.shape[2], v.shape[3]
    if dq_mode and dq_acc is None or (dq_mode == 2) != (dq_out is not None):
        raise ValueError("dq_mode 1 and 2 need dq_acc, and 2 (alone) dq_out")
    dq = torch.zeros(B, T, HQ, Dk, dtype=torch.float32, device=q.device) if dq_acc is None else dq_acc
    dk = torch.zeros_like(k)  # keys no query sees keep 0
    dv = torch.zeros_like(v)
    if B * T == 0 or k.numel() == 0:  # no dq kernel: what it would have done to dq
        if dq_mode == 1:
            dq.zero_()
        elif dq_mode == 2:
            dq = dq_out.copy_(dq)
        return dq, dk, dv
    delta = torch.empty(B, T, HQ, dtype=torch.float32, device=q.device)  # by the dq kernel
    o = o.contiguous()
    lse = lse.contiguous()
    gated = _gated_launch(do, gates, gate, d_gates, delta)
    interp = C.interpreting()
    tma = _band_tma(q, H)
    if tma and q_gm is None:
        q_gm, write_q_gm = torch.empty(H, B * T, HQ // H, Dk, dtype=q.dtype, device=q.device), True
    if tma and gates is None:  # a branch alone: the dq kernel copies its do group-major too
        gated["DOB"] = torch.empty_like(do)
    cfg_q, cfg_kv = _band_configs(HQ // H, Dk, Dv, mode, interp, tma)
    BK0, BK1 = C.split_dim(Dk)
    const = dict(HQ=HQ, G=HQ // H, DK=Dk, DV=Dv, MODE=mode, CMP_L=cmp_block, CMP_D=cmp_stride,
                 WINDOW=window, BK0=BK0, BK1=BK1, BV=max(16, C.next_pow2(Dv)),
                 PREC=C.dot_precision(q.dtype), UPCAST=C.upcast(q.dtype))
    tbl = C.prog_table(lens, cfg_q["BT"], q.device)
    kv_tma = BAND_DQ_TMA and C.tma_ok(q, k, v, BK0, BK1, const["BV"])
    descs = C.kv_descriptors(k, v, cfg_q["BN"], BK0, BK1, const["BV"]) if kv_tma else (q, q, q)
    _band_bwd_dq[(tbl.shape[0], H)](
        q, k, v, *descs, do, o, lse, delta, dq, dq if dq_out is None else dq_out, dk, dv, gated["GATES"], gated["DG"],
        gated["DOB"], q_gm if tma else q, tbl, seq, float(scale), int(q_offset), int(k_offset), B * T,
        GIDX=gated["GIDX"], DQ_MODE=dq_mode, GM=tma, WRITE_QG=tma and write_q_gm, TMA=kv_tma, **const, **cfg_q)
    do = gated["DOB"]  # the branch's do (written by the dq kernel when gated or TMA) for the dk/dv kernel
    if dq_mode == 2:
        dq = dq_out
    # the key programs' table on this stream: cached tables outlive the call, and one made on the
    # side stream would go back to that stream's memory when the cache drops it
    ktbl = C.prog_table(lens.k_cmp if mode == 0 else lens.k_win, cfg_kv["BN"], q.device)
    if not ktbl.shape[0]:
        return dq, dk, dv
    used = (q, k, v, do, lse, delta, seq, ktbl, dk, dv) + ((q_gm,) if tma else ())
    with C.on_side(dkdv_stream, *used):
        _band_dkdv(q, k, v, do, lse, delta, dk, dv, q_gm, seq, ktbl, lens, mode, scale, q_offset, k_offset,
                   q_chunk, const, cfg_kv)
    return dq, dk, dv


def _band_dkdv(q, k, v, do, lse, delta, dk, dv, q_gm, seq, ktbl, lens, mode, scale, q_offset, k_offset, q_chunk,
               const, cfg_kv):
    """The dk/dv launches of :func:`band_backward` over the key programs of ``ktbl`` (written into
    dk and dv)."""
    B, T, HQ, Dk = q.shape
    H, Dv = k.shape[2], v.shape[3]
    BK0, BK1 = const["BK0"], const["BK1"]
    qch = _q_chunk(q_chunk, ktbl.shape[0] * H, max(lens), cfg_kv["BT"], q.device) if mode == 0 else 0
    n_ch = C.cdiv(max(lens), qch) if qch else 1
    tma = cfg_kv.pop("TMA")
    # zeros: key rows that no program owns (past a sequence's keys) stay 0; fp32 where launches
    # add up (chunks, TMA's two launches)
    if qch or tma:
        gk = torch.zeros((n_ch, *k.shape), dtype=torch.float32, device=q.device)
        gv = torch.zeros((n_ch, *v.shape), dtype=torch.float32, device=q.device)
    else:
        gk, gv = dk, dv
    grid = (ktbl.shape[0], H, n_ch)
    args = (lse, delta, gk, gv, ktbl, seq, float(scale), int(q_offset), int(k_offset), k.numel(), v.numel(), B * T)
    if tma:  # the group-major copies as [H * B * T * G, D]: a tile's rows are BM consecutive rows
        bm = cfg_kv["BT"] * (HQ // H)
        q2 = q_gm.view(-1, Dk)
        qd = TensorDescriptor.from_tensor(q2, [bm, BK0])
        qd1 = TensorDescriptor.from_tensor(q2[:, BK0:], [bm, BK1]) if BK1 else qd
        dod = TensorDescriptor.from_tensor(do.view(-1, Dv), [bm, const["BV"]])
        _band_bwd_dkdv[grid](q, k, v, do, qd, qd1, dod, *args, QCH=qch, TMA=True, EDGES=False, ADD=False,
                             BTG=cfg_kv["BT"], **const, **cfg_kv)
        # the masked tiles, added into their chunk's slice: cmp's staircase rows (a 64-key tile's
        # last keys complete 1024 positions after its first) spread over the chunks' programs
        _band_bwd_dkdv[grid](q, k, v, do, q, q, do, *args, QCH=qch, TMA=False, EDGES=True, ADD=True,
                             BTG=cfg_kv["BT"], **const, **_edge_config(cfg_kv, HQ // H))
    else:
        _band_bwd_dkdv[grid](q, k, v, do, q, q, do, *args, QCH=qch, TMA=False, EDGES=False, ADD=False,
                             BTG=cfg_kv["BT"], **const, **cfg_kv)
    if qch or tma:
        dk.copy_(gk.sum(0))
        dv.copy_(gv.sum(0))


EDGE_ROWS = None
"""Rows of the band dk/dv's masked edge tiles (the launch after the descriptor tiles' one):
None, the descriptor tile's 128 at 1 stage (pipelining them spills); 32, tiles of 32 rows at 3
stages and 8 warps, the one spill-free pipelined edge tile (sm_90, paper geometry: 64 rows at 2
stages spill 8-48 bytes, 128 rows 56-104). Off until `benchmarks/edge_tiles.py` times it on a GPU."""


def _edge_config(cfg_kv: dict, h: int, rows: int | None = None) -> dict:
    """The edges launch's tiles (``rows``, default :data:`EDGE_ROWS`) from the descriptor
    launch's ``cfg_kv``."""
    rows = EDGE_ROWS if rows is None else rows
    if rows is not None:
        HP, BT, _ = C.rows_for(h, rows)
        if HP == cfg_kv["HP"] and cfg_kv["BT"] % BT == 0:  # the two launches split one grid of tiles
            return dict(cfg_kv, BT=BT, num_warps=8, num_stages=3)
    return dict(cfg_kv, num_stages=1)


BAND_DQ_TMA = True
"""Whether the band dq kernel reads its key/value tiles through tensor descriptors where
:func:`nsa.triton._common.tma_ok` allows. H200, paper configuration, the window's backward
(tma_ab_h200.json): 2.548 -> 2.541 ms at 8k, 19.9-20.1 -> 19.8-20.5 at 64k (a tie), the same
gradients; on with the other descriptor loads, whose training step together went 13.16-13.27 ->
12.77-12.89 ms at 8k and 155.2-155.4 -> 149.3-151.3 at 64k."""


def _band_tma(q, H: int) -> bool:
    """Whether the band dk/dv of q ``[B, T, HQ, Dk]`` with H kv heads takes the descriptor tiles
    (:func:`_tma_rows`; their int32 coordinates index the B * T * HQ rows of q's copy)."""
    B, T, HQ, _ = q.shape
    return _tma_rows(HQ // H, q.dtype, q.device, C.interpreting()) and B * T * HQ < 2 ** 31


def _gated_launch(do, gates, gate: int, d_gates, stand_in) -> dict:
    """The dq kernels' gate arguments (GATES, DG, DOB, GIDX) for the do they read: with gates
    (do the gated output's gradient), DOB a new tensor for the branch's do; without, DOB = do,
    never written (the stand-in pointers are never read)."""
    if gates is None:
        return dict(GATES=stand_in, DG=stand_in, DOB=do, GIDX=-1)
    if d_gates is None or d_gates.dtype != torch.float32 or d_gates.shape != gates.shape:
        raise ValueError("gates needs d_gates, an fp32 tensor of the gates' shape")
    return dict(GATES=gates.contiguous(), DG=d_gates, DOB=torch.empty_like(do), GIDX=gate)


def _q_chunk(q_chunk, n_kprog: int, t_max: int, BT: int, device) -> int:
    """Query positions per cmp dk/dv program (0: no split): enough chunks that the key
    programs fill the GPU about four times, each chunk >= 512 positions (BT-aligned)."""
    if q_chunk is not None:
        if q_chunk < 0:
            raise ValueError(f"q_chunk must be >= 0, got {q_chunk}")
        return 0 if q_chunk == 0 else C.cdiv(q_chunk, BT) * BT
    if C.interpreting() or device.type != "cuda":
        return 0
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    n = min(C.cdiv(4 * sms, n_kprog), t_max // 512)
    return C.cdiv(C.cdiv(t_max, n), BT) * BT if n > 1 else 0


def _span_ranges(lens, span: int) -> int:
    """Position spans a sequence of the index is cut into (``span`` 0: one, the whole)."""
    return max(1, C.cdiv(max(lens, default=0), span)) if span else 1


def _items_bound(lens, H: int, sel_block: int, chunk: int, span: int, q_offset: int, entries: int) -> int:
    """An upper bound of the transposed index's work items: a (sequence, group, span, block)
    key holds entries only for blocks that start at or before the span's last position (and
    within the sequence's keys), and makes at most one item more than its entries // chunk."""
    n_keys = 0
    for n, nk in zip(lens, lens.k_slc):
        nblk = C.cdiv(nk, sel_block)
        for e in (range(span, n + span, span) if span and n else [n]):
            n_keys += min(nblk, (q_offset + min(e, n) - 1) // sel_block + 1) if n else 0
    return H * n_keys + entries // chunk


def transposed_index(block_indices, seq, lens, H: int, sel_block: int, chunk: int, q_offset: int = 0,
                     span: int = 0):
    """Work items of :func:`_selected_bwd_dkdv` (torch ops on the device, no host sync: sizes
    are upper bounds known on the host, and the rows past the real ones are empty).

    block_indices ``[B, T, H, n]`` -> (items int64 ``[I, 5]``: sequence, group, block, first
    entry, count <= chunk (0: an empty item); qpos int64 ``[B*T*H*n]``: local query
    positions sorted by (sequence, group, span, block), ascending inside each; segs int64
    ``[S, 2]``: first item and item count (0: empty) of each (sequence, group, span, block)
    selected). A block selected by many queries (block 0, the local blocks) is split into
    chunks of ``chunk`` positions, so no program walks all T queries. ``span`` > 0 also cuts
    each sequence's positions into spans of that many, keys ordered span by span: the programs
    that run at once then gather the query rows of one span (which the L2 cache can hold)
    rather than of the whole sequence; a block's share is then split over its spans' items.
    Entries of -1, of blocks past the sequence's keys and of blocks that start after their
    position (``q_offset`` + t) are left out: they have no gradient.
    """
    B, T, _, n = block_indices.shape
    dev = block_indices.device
    N = seq.shape[0]
    n_blk = max(1, -(-max(lens.k_slc, default=0) // sel_block))
    n_r = _span_ranges(lens, span)
    sentinel = N * H * n_r * n_blk  # the key of an empty slot (-1): after every real key
    seq_of_row = torch.repeat_interleave(torch.arange(N, device=dev), seq[:, C.QN], output_size=B * T)
    t_local = torch.arange(B * T, device=dev) - seq[seq_of_row, C.Q0]
    flat = block_indices.reshape(B * T, H, n).to(torch.int64)
    grp = torch.arange(H, device=dev)[None, :, None]
    real = ((flat >= 0) & (flat * sel_block < seq[seq_of_row, C.KSN][:, None, None])
            & (flat * sel_block <= q_offset + t_local[:, None, None]))
    rng = (t_local // span if span else torch.zeros_like(t_local))[:, None, None]
    key = torch.where(real, ((seq_of_row[:, None, None] * H + grp) * n_r + rng) * n_blk + flat, sentinel)
    key, order = torch.sort(key.reshape(-1), stable=True)  # stable: positions stay ascending
    qpos = t_local[order // (H * n)]
    E = key.numel()
    S = min(E, sentinel)
    ok = key < sentinel
    new = ok & torch.cat([ok[:1], key[1:] != key[:-1]])  # the first entry of each segment
    seg = torch.cumsum(new, 0) - 1
    at = torch.where(new, seg, S)  # non-first entries go to a spare row S
    starts = torch.zeros(S + 1, dtype=torch.int64, device=dev).scatter_(0, at, torch.arange(E, device=dev))[:S]
    uniq = torch.zeros(S + 1, dtype=torch.int64, device=dev).scatter_(0, at, key)[:S]
    counts = torch.zeros(S + 1, dtype=torch.int64, device=dev).scatter_add_(
        0, torch.where(ok, seg, S), torch.ones_like(key))[:S]
    nch = (counts + chunk - 1) // chunk  # 0 for the segments past the real ones
    first = torch.cumsum(nch, 0) - nch
    n_items = min(S + E // chunk, _items_bound(lens, H, sel_block, chunk, span, q_offset, E))
    item = torch.searchsorted(first + nch, torch.arange(n_items, device=dev), right=True).clamp_(max=max(S - 1, 0))
    c = torch.arange(n_items, device=dev) - first[item]
    cnt = torch.clamp(counts[item] - c * chunk, min=0, max=chunk)
    u = torch.where(cnt > 0, uniq[item], 0)
    items = torch.stack([u // (H * n_r * n_blk), (u // (n_r * n_blk)) % H, u % n_blk, starts[item] + c * chunk,
                         cnt], 1)
    return items.contiguous(), qpos.contiguous(), torch.stack([first, nch], 1).contiguous()


def transposed_index_triton(block_indices, seq, lens, H: int, sel_block: int, chunk: int, q_offset: int = 0,
                            span: int = 0):
    """:func:`transposed_index` in three Triton passes and a few scans (11 launches against ~40,
    no sort): the same items and segments; each segment holds the same positions, its own
    positions (``q_offset + t < (block + 1) * sel_block - 1``) first, the rest after them, each
    part in the atomics' order (not ascending: the dk/dv kernel needs only the own ones first).
    S is every (sequence, group, span, block): N x H x spans x blocks."""
    B, T, _, n = block_indices.shape
    dev = block_indices.device
    n_blk = max(1, -(-max(lens.k_slc, default=0) // sel_block))
    n_r = _span_ranges(lens, span)
    n_keys = seq.shape[0] * H * n_r * n_blk
    E = B * T * H * n
    BR = 64  # positions per program: [64, next_pow2(n)] entries
    tbl = C.prog_table(lens, BR, dev)
    meta = dict(H=H, N_SEL=n, NP=C.next_pow2(n), N_BLK=n_blk, SEL_L=sel_block, BR=BR)
    ranges = (int(q_offset), n_r)
    meta["SPAN"] = span or 1 << 30  # a constant: t // SPAN without a division routine; 0: one span
    hist = torch.zeros(2 * n_keys, dtype=torch.int32, device=dev)  # counts, own counts
    bi = block_indices.contiguous()
    _tidx_count[(tbl.shape[0], H)](bi, tbl, seq, hist, n_keys, *ranges, **meta)
    counts = hist[:n_keys]
    ends = torch.cumsum(counts, 0)  # int64
    starts = ends - counts
    nch = (counts + (chunk - 1)) // chunk
    first = torch.cumsum(nch, 0) - nch
    qpos = torch.empty(E, dtype=torch.int64, device=dev)  # past the real entries: never read
    _tidx_place[(tbl.shape[0], H)](bi, tbl, seq, hist, starts, qpos, n_keys, *ranges, **meta)
    n_items = min(n_keys + E // chunk, _items_bound(lens, H, sel_block, chunk, span, q_offset, E))
    items = torch.zeros(n_items, 5, dtype=torch.int64, device=dev)
    segs = torch.empty(n_keys, 2, dtype=torch.int64, device=dev)
    _tidx_items[(n_keys,)](starts, ends, first, items, segs, n_r, n_items, H=H, N_BLK=n_blk, CHUNK=chunk)
    return items, qpos, segs


def slc_index(block_indices, seq, lens, H: int, sel_block: int, chunk: int, q_offset: int, deterministic: bool,
              span: int = 0):
    """The slc dk/dv kernel's work items: sorted (:func:`transposed_index`, positions ascending,
    one span: the order ``deterministic`` needs, whose sums add a block's items in one segment)
    or counted (:func:`transposed_index_triton`, cut into spans of ``span`` positions)."""
    if deterministic:
        return transposed_index(block_indices, seq, lens, H, sel_block, chunk, q_offset)
    return transposed_index_triton(block_indices, seq, lens, H, sel_block, chunk, q_offset, span)


def slc_index_beside(*args):
    """:func:`slc_index` (same arguments) started on a side stream (:func:`C.side_stream`; the
    current one where there is none), to overlap other work: its small latency-bound kernels
    (at 8k in the paper geometry on an H100 0.25 ms counted, 0.76 sorted) serve only the slc
    dk/dv kernel. Returns ``join``: ``join()`` makes the current stream wait for the index and
    returns it."""
    side = C.side_stream(args[0].device, "index")
    with C.on_side(side, args[0]):
        index = slc_index(*args)

    def join():
        C.join_side(side, *index)  # allocated on the side stream, used and freed on the current one
        return index

    return join


def selected_backward(q, k, v, block_indices, o, do, *, sel_block: int, scale: float, seq, lens,
                      q_offset=0, dq_acc=None, dkdv="transposed", chunk=None, span=None, lse=None,
                      deterministic=False, gates=None, d_gates=None, index=None, forced=False,
                      dkdv_stream=None):
    """Gradients of :func:`.selected.selected_attention_triton`.

    q ``[B, T, HQ, Dk]``, k ``[B, Tk, H, Dk]``, v ``[B, Tk, H, Dv]``, block_indices
    ``[B, T, H, n]``, o and do ``[B, T, HQ, Dv]``. Returns (dq, dk, dv) in fp32; dq is added
    into ``dq_acc`` when given. lse ``[B, T, HQ]`` fp32 (the forward's ``return_lse``) saves
    the kernel's first pass, which recomputes it otherwise. dkdv: "transposed" (key-centric over :func:`transposed_index`,
    one atomic add per block and chunk of ``chunk`` positions, in spans of ``span`` positions:
    :func:`transposed_index`; None: the tile config's) or "atomic" (dk/dv added by the
    query-centric kernel at every selected block: simpler, far more atomic traffic).
    deterministic ("transposed" only): each work item stores its share into a buffer of its
    own and :func:`_segment_sum` adds a block's shares in item order (bitwise the same
    gradients on every run, at the cost of that buffer: n_items x l' x (Dk + Dv) fp32).
    gates / d_gates: as :func:`band_backward`'s, for the slc gate (index 1). index ("transposed"):
    the ``join`` of :func:`slc_index_beside` started earlier with the same ``chunk``, ``span``,
    ``q_offset`` and ``deterministic`` (default: built here). forced (with lse): the lists hold
    their positions' forced blocks, as the forward's ``forced``: their dq share comes from
    :func:`_forced_bwd_dq` where the forward took them apart. dkdv_stream ("transposed"): as
    :func:`band_backward`'s.
    """
    if deterministic and dkdv != "transposed":
        raise ValueError("deterministic=True needs dkdv='transposed'")
    if dkdv not in ("transposed", "atomic"):
        raise ValueError(f"dkdv must be 'transposed' or 'atomic', got {dkdv!r}")
    q, k, v, do = q.contiguous(), k.contiguous(), v.contiguous(), do.to(q.dtype).contiguous()
    block_indices = block_indices.contiguous()
    B, T, HQ, Dk = q.shape
    H, Dv, n = k.shape[2], v.shape[3], block_indices.shape[-1]
    dq = torch.zeros(B, T, HQ, Dk, dtype=torch.float32, device=q.device) if dq_acc is None else dq_acc
    dk = torch.zeros(k.shape, dtype=torch.float32, device=q.device)
    dv = torch.zeros(v.shape, dtype=torch.float32, device=q.device)
    if B * T == 0:
        return dq, dk, dv
    delta = torch.empty(B, T, HQ, dtype=torch.float32, device=q.device)  # by the dq kernel
    o = o.contiguous()
    have_lse = lse is not None
    lse = lse.contiguous() if have_lse else torch.empty(B, T, HQ, dtype=torch.float32, device=q.device)
    gated = _gated_launch(do, gates, 1, d_gates, delta)
    cfg_q, cfg_kv = _slc_configs(HQ // H, Dk, Dv, C.interpreting())
    BK0, BK1 = C.split_dim(Dk)
    common = dict(HQ=HQ, G=HQ // H, DK=Dk, DV=Dv, SEL_L=sel_block, BS=max(16, C.next_pow2(sel_block)),
                  BK0=BK0, BK1=BK1, BV=max(16, C.next_pow2(Dv)), PREC=C.dot_precision(q.dtype),
                  UPCAST=C.upcast(q.dtype))
    # as the forward: tiles of several positions that share their blocks first, then the rest
    split = share_split(HQ // H, n) if k.shape[1] > 0 else None
    flags = torch.empty(B * T, H, dtype=torch.int8, device=q.device) if split else dq
    use_f = forced and have_lse and dkdv != "atomic" and use_forced(HQ // H, cfg_q["BT"], split)

    # one-position tiles read their blocks through descriptors: the dq kernel's and the forced blocks'
    tma1 = dkdv != "atomic" and use_tma(q, k, v, 1, BK0, BK1, common["BV"])
    descs1 = C.kv_descriptors(k, v, common["BS"], BK0, BK1, common["BV"]) if tma1 else (q, q, q)

    def dq_launch(cfg, share, skip):
        tbl = C.prog_table(lens, cfg["BT"], q.device)
        tma = tma1 and cfg["BT"] == 1
        descs = descs1 if tma else (q, q, q)
        cfg = slc_dq_config(cfg, tma)
        _selected_bwd[(tbl.shape[0], H)](
            q, k, v, *descs, do, o, delta, dq, dk, dv, gated["GATES"], gated["DG"], gated["DOB"], block_indices,
            flags, tbl,
            seq, lse, float(scale), int(q_offset), N_SEL=n, NP=max(2, C.next_pow2(n)), KV=dkdv == "atomic",
            HAVE_LSE=have_lse, GIDX=gated["GIDX"], SHARE=share, SKIP=skip, TMA=tma, FORCED=use_f, **common, **cfg)

    if split:
        dq_launch(dict(cfg_q, **({} if C.interpreting() else SLC_DQ_SHARED), BT=split[0]), split[1], False)
    dq_launch(cfg_q, -1, split is not None)
    if use_f:  # the forced blocks' share, from the do_i and delta that the dq kernel wrote
        cfg_f = forced_config(HQ // H, C.interpreting())
        tbl = C.prog_table(lens, cfg_f["BT"], q.device)
        _forced_bwd_dq[(tbl.shape[0], H)](q, k, v, *descs1, gated["DOB"], delta, lse, dq, tbl, seq, float(scale),
                                          int(q_offset), TMA=tma1, **{k_: common[k_] for k_ in _FORCED_ARGS}, **cfg_f)
    do = gated["DOB"]  # the branch's do (written by the dq kernel when gated) for the dk/dv kernel
    if dkdv == "transposed":
        cfg_kv = dict(cfg_kv)
        chunk = chunk or cfg_kv["chunk"]
        span = _slc_span(cfg_kv["span"] if span is None else span, lens)
        del cfg_kv["chunk"], cfg_kv["span"]
        index = index() if index else None
        with C.on_side(dkdv_stream, q, k, v, do, lse, delta, dk, dv, seq, block_indices, *(index or ())):
            if index is None:
                index = slc_index(block_indices, seq, lens, H, sel_block, chunk, q_offset, deterministic, span)
            _slc_dkdv(q, k, v, do, lse, delta, dk, dv, seq, index, sel_block, scale, q_offset, chunk, deterministic,
                      common, cfg_kv)
    return dq, dk, dv


def _slc_dkdv(q, k, v, do, lse, delta, dk, dv, seq, index, sel_block, scale, q_offset, chunk, deterministic,
              common, cfg_kv):
    """The dk/dv launches of :func:`selected_backward`'s transposed path (added into dk and dv)."""
    items, qpos, segs = index
    if not items.shape[0]:
        return
    H, Dk, Dv, BS = k.shape[2], k.shape[3], v.shape[3], common["BS"]
    gk, gv = dk, dv
    if deterministic:
        gk = torch.empty(items.shape[0], BS, Dk, dtype=torch.float32, device=q.device)
        gv = torch.empty(items.shape[0], BS, Dv, dtype=torch.float32, device=q.device)
    _selected_bwd_dkdv[(items.shape[0],)](
        q, k, v, do, do, lse, delta, gk, gv, items, qpos, seq, float(scale), int(q_offset),
        PARTIAL=deterministic, CH=C.next_pow2(chunk), **common, **cfg_kv)
    if deterministic:
        for part, out, D in ((gk, dk, Dk), (gv, dv, Dv)):
            BD = min(64, max(16, C.next_pow2(D)))
            _segment_sum[(segs.shape[0], C.cdiv(D, BD))](
                part, out, segs, items, seq, H=H, D=D, SEL_L=sel_block, BS=BS, BD=BD, num_warps=4)


# ------------------------------------------------------------------------------ functions
def _seq(q, k_slc, k_win, k_cmp, cu_seqlens, cmp_block, cmp_stride):
    B, T = q.shape[:2]
    return C.seq_table(B, T, k_slc.shape[1], k_win.shape[1], k_cmp.shape[1], cu_seqlens,
                       cmp_block, cmp_stride, q.device)


def compressed_attention_backward(q, k_cmp, v_cmp, o, lse, do, *, cmp_block=32, cmp_stride=16,
                                  scale=None, cu_seqlens=None, q_offset=0, q_chunk=None):
    """Branch cmp backward: (dq, dk_cmp, dv_cmp) in the inputs' dtypes. Shapes as
    :func:`nsa.triton.compressed_attention_triton`; o, lse are its outputs, do ``[B, T, HQ, Dv]``;
    q_chunk as :func:`band_backward` (deterministic on every path)."""
    from .band import default_scale
    seq, lens = _seq(q, q[:, :0], q[:, :0], k_cmp, cu_seqlens, cmp_block, cmp_stride)
    dq, dk, dv = band_backward(q, k_cmp, v_cmp, o, lse, do, mode=0,
                               scale=default_scale(scale, q.shape[-1]), seq=seq, lens=lens,
                               q_offset=q_offset, cmp_block=cmp_block, cmp_stride=cmp_stride,
                               q_chunk=q_chunk)
    return dq.to(q.dtype), dk.to(k_cmp.dtype), dv.to(v_cmp.dtype)


def sliding_window_backward(q, k_win, v_win, do, *, window=512, scale=None, cu_seqlens=None,
                            q_offset=0, k_offset=0):
    """Branch win backward: (dq, dk_win, dv_win) in the inputs' dtypes; recomputes o and lse
    with the forward kernel. Shapes as :func:`nsa.triton.sliding_window_triton`."""
    from .band import band_attention, default_scale
    q, k_win, v_win = q.contiguous(), k_win.contiguous(), v_win.contiguous()
    seq, lens = _seq(q, q[:, :0], k_win, q[:, :0], cu_seqlens, 1, 1)
    sc = default_scale(scale, q.shape[-1])
    o, lse = band_attention(q, k_win, v_win, mode=1, scale=sc, seq=seq, lens=lens, q_offset=q_offset,
                            k_offset=k_offset, window=window, write_lse=True)
    dq, dk, dv = band_backward(q, k_win, v_win, o, lse, do, mode=1, scale=sc, seq=seq, lens=lens,
                               q_offset=q_offset, k_offset=k_offset, window=window)
    return dq.to(q.dtype), dk.to(k_win.dtype), dv.to(v_win.dtype)


def selected_attention_backward(q, k_slc, v_slc, block_indices, o, do, *, sel_block=64, scale=None,
                                cu_seqlens=None, q_offset=0, lse=None, deterministic=False):
    """Branch slc backward: (dq, dk_slc, dv_slc) in the inputs' dtypes. Shapes as
    :func:`nsa.triton.selected_attention_triton`; o (and optionally lse, ``return_lse=True``)
    are its outputs, do ``[B, T, HQ, Dv]``; deterministic as :func:`selected_backward`."""
    from .band import default_scale
    seq, lens = _seq(q, k_slc, q[:, :0], q[:, :0], cu_seqlens, 1, 1)
    dq, dk, dv = selected_backward(q, k_slc, v_slc, block_indices, o, do, sel_block=sel_block,
                                   scale=default_scale(scale, q.shape[-1]), seq=seq, lens=lens,
                                   q_offset=q_offset, lse=lse, deterministic=deterministic)
    return dq.to(q.dtype), dk.to(k_slc.dtype), dv.to(v_slc.dtype)


DKDV_BESIDE = False
"""Whether :func:`nsa_backward` runs the cmp (band kernel) and slc dk/dv launches on a side stream
(:func:`nsa.triton._common.side_stream`), beside the slc and window dq kernels that follow them
on the current stream: the dk/dv kernels are latency-bound at one program a multiprocessor, the
slc dq L2-bound. Off until `benchmarks/beside.py` times it on a GPU."""


def nsa_backward(grad_o, inputs, saved, kw, needs=None):
    """Backward of :func:`nsa.triton.nsa_triton` through the Triton kernels.

    inputs: (q, k_cmp, v_cmp, k_slc, v_slc, k_win, v_win, gates) as in the forward; saved:
    (o_cmp, lse_cmp, block_indices, o_slc, lse_slc, o_win, lse_win) of the forward; kw: the
    forward's keywords. Empty o_win / lse_win (a forward that did not keep them): recomputed.
    Returns the 8 gradients in the inputs' dtypes (None for inputs that need none: ``needs``,
    8 bools, default each input's ``requires_grad``).
    kw["deterministic"] (default False): no atomics whose order varies from run to run (only
    the slc dk/dv use atomics by default; the cmp and win backward are deterministic always).
    """
    from .band import band_attention, default_scale
    q, k_cmp, v_cmp, k_slc, v_slc, k_win, v_win, gates = (x.contiguous() for x in inputs)
    o_cmp, lse_cmp, idx, o_slc, lse_slc, o_win, lse_win = saved
    B, T, HQ, Dk = q.shape
    sc = default_scale(kw["scale"], Dk)
    l, d, qo = kw["cmp_block"], kw["cmp_stride"], kw["q_offset"]
    det = bool(kw.get("deterministic", False))
    seq, lens = _seq(q, k_slc, k_win, k_cmp, kw["cu_seqlens"], l, d)
    if not o_win.numel():
        o_win, lse_win = band_attention(q, k_win, v_win, mode=1, scale=sc, seq=seq, lens=lens,
                                        q_offset=qo, k_offset=kw["win_k_offset"], window=kw["window"],
                                        write_lse=True)
    # Eq. 5 in the branches' dq kernels: each reads grad_o and its gate per row, writes the
    # gate's gradient <grad_o, o_i> and the branch's do_i = g_i grad_o: no pass of its own
    d_gates = torch.zeros(gates.shape, dtype=torch.float32, device=q.device)
    # dq: cmp's kernel stores the fp32 buffer, slc's adds, win's adds and writes q's dtype
    dq = torch.empty(B, T, HQ, Dk, dtype=torch.float32, device=q.device)
    gkw = dict(gates=gates, d_gates=d_gates)
    # the group-major q of both band branches' descriptor tiles: written by cmp's dq kernel
    # (by the window's when there are no compressed keys and cmp's does not run)
    H = k_cmp.shape[2]
    # the slc dk/dv kernel's index builds beside the cmp branch's backward, cut as that kernel's default
    cfg_kv = _slc_configs(HQ // k_slc.shape[2], Dk, v_slc.shape[3], C.interpreting())[1]
    chunk, span = cfg_kv["chunk"], _slc_span(cfg_kv["span"], lens)
    index = (slc_index_beside(idx, seq, lens, k_slc.shape[2], kw["sel_block"], chunk, qo, det, span)
             if B * T else None)
    qg = torch.empty(H, B * T, HQ // H, Dk, dtype=q.dtype, device=q.device) if _band_tma(q, H) else None
    dense, spans = None, []
    cmp = dict(mode=0, scale=sc, seq=seq, q_offset=qo, cmp_block=l, cmp_stride=d, dq_acc=dq, gate=0, dq_mode=1,
               q_gm=qg, **gkw)
    if cmp_dense.use(q, v_cmp, cu_seqlens=kw["cu_seqlens"], q_offset=qo, deterministic=det):
        # cuDNN's backward of the folded causal attention, from the branch's do
        dense = cmp_dense.attempt(cmp_dense.gated_backward, grad_o, q, k_cmp, v_cmp, o_cmp, lse_cmp, gates,
                                  d_gates, cmp_block=l, cmp_stride=d, scale=sc, dq=dq)
    else:  # a packed batch: cuDNN for its long sequences, the band kernel for the others
        spans = cmp_dense.dense_spans(q, v_cmp, lens, cu_seqlens=kw["cu_seqlens"], q_offset=qo, deterministic=det)
    if dense is not None:
        _, dk_cmp, dv_cmp = dense
    elif spans:  # the band kernel leaves the long sequences' rows (and their keys' dk, dv: 0) to cuDNN
        blens = cmp_dense.band_lens(lens, spans)
        _, dk_cmp, dv_cmp = band_backward(q, k_cmp, v_cmp, o_cmp, lse_cmp, grad_o, lens=blens, **cmp)
        dense = cmp_dense.attempt(cmp_dense.gated_backward_spans, grad_o, q, k_cmp, v_cmp, o_cmp, lse_cmp, gates,
                                  d_gates, spans, dk_cmp, dv_cmp, cmp_block=l, cmp_stride=d, scale=sc, dq=dq)
    # the cmp and slc dk/dv launches beside the next branches' dq (DKDV_BESIDE)
    side = C.side_stream(q.device, "dkdv") if DKDV_BESIDE else None
    if dense is None:  # (the band dq kernel stores dq and the gate's gradient whole, over a failed attempt's)
        _, dk_cmp, dv_cmp = band_backward(q, k_cmp, v_cmp, o_cmp, lse_cmp, grad_o, lens=lens, dkdv_stream=side,
                                          **cmp)
    _, dk_slc, dv_slc = selected_backward(q, k_slc, v_slc, idx, o_slc, grad_o, sel_block=kw["sel_block"],
                                          scale=sc, seq=seq, lens=lens, q_offset=qo, dq_acc=dq,
                                          lse=lse_slc, deterministic=det, chunk=chunk, span=span, index=index,
                                          forced=True, dkdv_stream=side, **gkw)
    dq, dk_win, dv_win = band_backward(q, k_win, v_win, o_win, lse_win, grad_o, mode=1, scale=sc,
                                       seq=seq, lens=lens, q_offset=qo, k_offset=kw["win_k_offset"],
                                       window=kw["window"], dq_acc=dq, gate=2, dq_mode=2,
                                       dq_out=torch.empty_like(q), q_gm=qg,
                                       write_q_gm=dense is not None or not k_cmp.numel(), **gkw)
    C.join_side(side)
    grads = (dq, dk_cmp, dv_cmp, dk_slc, dv_slc, dk_win, dv_win, d_gates)
    needs = [x.requires_grad for x in inputs] if needs is None else needs
    return tuple(gr.to(x.dtype) if need else None for gr, x, need in zip(grads, inputs, needs))
