"""One decode step of NSA in Triton (:func:`nsa.nsa_decode`): split over keys, not queries.

A decode step has one query per sequence, so the prefill kernels' grid (query tiles x KV heads)
would be B * H programs, each reading every compressed token alone: 4 of 132 SMs busy at
batch 1 in the paper configuration. Here the work of each (sequence, KV head) is split over
keys, flash-decoding style, and the h query heads of a group share every key they load:

1. cmp: NSPLIT programs per (b, g), each over a slice of the visible compressed tokens: raw
   scores (log2 units) to a small buffer ``[B, HQ, Tc(max n)]`` and a partial softmax (max, sum, PV).
2. scores: programs over the selection blocks: the lse from the cmp partials, then Eq. 9-10
   block scores (group sum of exp(s - lse) times the overlap weights), forced blocks +inf,
   ineligible -inf: ``[B, H, n_sel]``.
3. top-n: the n best blocks by Triton's bitonic top-k on (score, -index) keys (ties to the
   lower index). While the slots' programs fit the GPU a few times over (batch 1), each
   selected-block program of step 4 finds its own block, so the top-n costs no launch; else
   one program per group writes them. Past 4096 blocks (256k keys at l' = 64): a sort in
   PyTorch (:func:`nsa.geometry.top_blocks`).
4. attend: one program per selected-block slot and per window chunk (l' keys each), each a
   partial softmax of its branch; at a large batch a program takes 2 or 4 of them in turn
   (:func:`_slots_per_program`), which leaves the combine fewer partials.
5. combine: one program per (sequence, query head) merges the partials of each branch, all
   loaded at once, and mixes them with the gates.

Kernels 2-5 may launch as programmatic dependents of the one before them (:data:`PDL`).

Reference: :func:`nsa.reference.nsa_decode_ref` (same signature).
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from .. import geometry
from . import _common as C
from ._common import LOG2E
from .band import default_scale

try:  # grid dependency control (sm_90+): triton 3.3 and later
    from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait
except ImportError:  # pragma: no cover - older triton: the launches stay serial
    gdc_launch_dependents = gdc_wait = None

PDL = False
"""Programmatic dependent launch of the step's kernels after the first (Hopper and later,
compiled kernels): each launches while the one before it drains, does what needs nothing of it
(q, the gates, the window's keys) and waits (``griddepcontrol.wait``) before reading its
outputs, so a step does not pay a launch gap between its kernels. Off (serial launches) until
``benchmarks/decode_pdl.py`` has timed it on a GPU and the GPU decode tests have run with it;
the kernels compile with it for sm_90 (tests/test_spills.py)."""


@triton.jit
def _group_q(Q, b, g, HQ: tl.constexpr, G: tl.constexpr, HP: tl.constexpr, DK: tl.constexpr,
             BK0: tl.constexpr, BK1: tl.constexpr, UPCAST: tl.constexpr):
    """The h = G query heads of group g of sequence b, padded to HP rows: ([HP, BK0], [HP, BK1])."""
    hh = tl.arange(0, HP)
    qb = Q + (b * HQ + g * G).to(tl.int64) * DK
    q0 = C.load_cols(qb, hh * DK, hh < G, 0, BK0, DK, UPCAST)
    q1 = q0
    if BK1 > 0:
        q1 = C.load_cols(qb, hh * DK, hh < G, BK0, BK1, DK, UPCAST)
    return q0, q1


@triton.jit
def _scores_tile(q0, q1, kb, keys, k_ok, ROW: tl.constexpr, DK: tl.constexpr, BK0: tl.constexpr,
                 BK1: tl.constexpr, PREC: tl.constexpr, UPCAST: tl.constexpr):
    """q . k for the key rows ``keys`` (row stride ROW elements) of base kb: [HP, len(keys)]."""
    dk0 = tl.arange(0, BK0)
    kt = tl.load(kb + dk0[:, None] + keys[None, :] * ROW, mask=k_ok[None, :] & (dk0[:, None] < DK), other=0.0)
    if UPCAST:  # the CPU interpreter's bf16 dot is wrong (triton 3.9)
        kt = kt.to(tl.float32)
    s = tl.dot(q0, kt, input_precision=PREC)
    if BK1 > 0:
        dk1 = BK0 + tl.arange(0, BK1)
        kt1 = tl.load(kb + dk1[:, None] + keys[None, :] * ROW, mask=k_ok[None, :] & (dk1[:, None] < DK), other=0.0)
        if UPCAST:
            kt1 = kt1.to(tl.float32)
        s += tl.dot(q1, kt1, input_precision=PREC)
    return s


@triton.jit
def _softmax_step(s, v, m_i, l_i, acc, PREC: tl.constexpr, UPCAST: tl.constexpr):
    """One key tile of an online softmax: scores s [rows, keys] (log2 units, -inf where
    masked) and their values v [keys, BV] into the running (max, sum, P V) of each row."""
    p, alpha, m_new, l_i = C.softmax_step(s, m_i, l_i)
    if UPCAST:
        v = v.to(tl.float32)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PREC)
    return m_new, l_i, acc


@triton.jit
def _group(bh, HQ: tl.constexpr, G: tl.constexpr, HP: tl.constexpr):
    """(b, g, rows, h_ok) of program bh = b * H + g: rows [HP] int64 are the group's (sequence,
    head) rows of the [B, HQ, ...] buffers, h_ok [HP] the heads that exist (not padding)."""
    H: tl.constexpr = HQ // G
    b = bh // H
    g = bh % H
    hh = tl.arange(0, HP)
    return b, g, (b * HQ + g * G + hh).to(tl.int64), hh < G


@triton.jit
def _row_len(LENS, r, NQ: tl.constexpr):
    """(b, n) of query row r = b * NQ + s (NQ new tokens per sequence): its sequence and the
    length its query sees, ``cache_seqlens[b] - (NQ - 1 - s)`` (the query at position n - 1;
    n <= 0 for a row before position 0, which finds nothing to attend)."""
    b = r // NQ
    return b, tl.load(LENS + b).to(tl.int32) - (NQ - 1 - r % NQ)


@triton.jit
def _page_rows(BT, b, u, ok, MAXP, NPAGES, PS: tl.constexpr):
    """Pool rows (int64) of the logical rows u of sequence b in pages of PS rows: row u % PS of
    page ``BT[b, u // PS]``. Only entries where ok are read; page indices are clamped into
    [0, NPAGES) so that a bad table never reads outside the pool; 0 where not ok."""
    pi = u // PS
    pg = tl.load(BT + b.to(tl.int64) * MAXP + pi, mask=ok & (pi < MAXP), other=0)
    pg = tl.minimum(tl.maximum(pg, 0), NPAGES - 1).to(tl.int64)
    return tl.where(ok, pg * PS + u % PS, 0)


@triton.jit
def _tile_page_rows(BT, b, i0, hi, MAXP, NPAGES, PS: tl.constexpr, BN: tl.constexpr):
    """:func:`_page_rows` of the BN rows i0 .. of a cmp tile (i0 a multiple of BN; rows >= hi
    give 0): one table entry per page instead of one per row where PS and BN allow it."""
    ar = tl.arange(0, BN)
    ok = i0 + ar < hi
    if PS >= BN and PS % BN == 0:  # the tile lies in one page
        pi = i0 // PS
        pg = tl.load(BT + b.to(tl.int64) * MAXP + pi, mask=(i0 < hi) & (pi < MAXP), other=0)
        pg = tl.minimum(tl.maximum(pg, 0), NPAGES - 1).to(tl.int64)
        return tl.where(ok, pg * PS + (i0 % PS) + ar, 0)
    elif BN % PS == 0:  # BN // PS whole pages (BN a power of two, so PS is one too)
        NPG: tl.constexpr = BN // PS
        pi = i0 // PS + tl.arange(0, NPG)
        pg = tl.load(BT + b.to(tl.int64) * MAXP + pi, mask=(pi * PS < hi) & (pi < MAXP), other=0)
        pg = tl.minimum(tl.maximum(pg, 0), NPAGES - 1).to(tl.int64)
        rows = tl.reshape(pg[:, None] * PS + tl.arange(0, PS)[None, :], [BN])
        return tl.where(ok, rows, 0)
    else:
        return _page_rows(BT, b, i0 + ar, ok, MAXP, NPAGES, PS)


@triton.jit
def _kv_rows(KP, VP, KC, VC, TR, BT, b, g, u, ok, MAXP, NPAGES, H: tl.constexpr, DK: tl.constexpr,
             DV: tl.constexpr, PS: tl.constexpr, PAGED: tl.constexpr, RING: tl.constexpr):
    """(key base, value base, int64 rows) of the logical rows u (where ok) of sequence b, kv head
    g: through the block table BT into the pools KP/VP when PAGED, else in the contiguous
    ``[B, TR, H, D]`` cache KC/VC, at row u % TR when RING (the window's ring buffer). Rows are
    int64 either way: triton rejects branches that give a value two integer types."""
    if PAGED:
        return KP + g * DK, VP + g * DV, _page_rows(BT, b, u, ok, MAXP, NPAGES, PS)
    rows = u % TR if RING else u
    return (KC + (b.to(tl.int64) * TR * H + g) * DK, VC + (b.to(tl.int64) * TR * H + g) * DV,
            tl.where(ok, rows, 0).to(tl.int64))


@triton.jit
def _visible_cmp(n, TC, L_CMP: tl.constexpr, D_CMP: tl.constexpr):
    """Compressed tokens visible to the query at position n - 1: Tc(n), at most TC."""
    return tl.minimum(tl.where(n >= L_CMP, (n - L_CMP) // D_CMP + 1, 0), TC)


@triton.jit
def _decode_cmp(Q, KC, VC, LENS, BT, S, PM, PL, PACC, qk_scale, TC, TS, CH, NSPLIT, MAXP, NPAGES, TUNE_R, TUNE_T,
                HQ: tl.constexpr, G: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr,
                L_CMP: tl.constexpr, D_CMP: tl.constexpr, HP: tl.constexpr, BK0: tl.constexpr,
                BK1: tl.constexpr, BV: tl.constexpr, BN: tl.constexpr, PREC: tl.constexpr,
                UPCAST: tl.constexpr, NQ: tl.constexpr, QT: tl.constexpr, PAGED: tl.constexpr,
                CPP: tl.constexpr, PDL: tl.constexpr):
    """Program (sp, (b, j, g)): split sp of the compressed tokens for the group's heads of QT
    consecutive new tokens of sequence b (tokens j * QT .., rows [QT * HP], token-major), so
    that the tokens of a step share each key tile they load. TUNE_R, TUNE_T: autotuning keys
    only (powers of two of the programs per split and of the visible compressed tokens)."""
    sp = tl.program_id(0)
    H: tl.constexpr = HQ // G
    NJ: tl.constexpr = (NQ + QT - 1) // QT
    bj = tl.program_id(1) // H
    g = tl.program_id(1) % H
    b = bj // NJ
    ri = tl.arange(0, QT * HP)
    s_new = (bj % NJ) * QT + ri // HP  # the new token of each row
    hh = ri % HP
    h_ok = (hh < G) & (s_new < NQ)
    rows = ((b * NQ + s_new) * HQ + g * G + hh).to(tl.int64)  # rows of the [B * NQ, HQ, ...] buffers
    ln = tl.load(LENS + b).to(tl.int32)
    vis = _visible_cmp(ln - (NQ - 1 - s_new), TC, L_CMP, D_CMP)  # [rows]
    last = tl.minimum((bj % NJ) * QT + QT, NQ) - 1  # the program's last token sees the most
    hi = tl.minimum(sp * CH + CH, _visible_cmp(ln - (NQ - 1 - last), TC, L_CMP, D_CMP))
    q0 = C.load_cols(Q, rows * DK, h_ok, 0, BK0, DK, UPCAST)
    q1 = q0
    if BK1 > 0:
        q1 = C.load_cols(Q, rows * DK, h_ok, BK0, BK1, DK, UPCAST)
    if PAGED:  # pools [num_pages, CPP, H, D]: rows through the block table
        kb = KC + g * DK
        vb = VC + g * DV
    else:
        kb = KC + (b.to(tl.int64) * TC * H + g) * DK
        vb = VC + (b.to(tl.int64) * TC * H + g) * DV
    dv = tl.arange(0, BV)
    m_i = tl.full([QT * HP], -1.0e30, dtype=tl.float32)
    l_i = tl.zeros([QT * HP], dtype=tl.float32)
    acc = tl.zeros([QT * HP, BV], dtype=tl.float32)
    ar = tl.arange(0, BN)
    # paged: the next tile's pool rows are looked up one iteration ahead, so that the table load
    # is not a dependent round trip in front of every tile's key loads
    nxt = _tile_page_rows(BT, b, sp * CH, hi, MAXP, NPAGES, CPP, BN) if PAGED else ar.to(tl.int64)
    for i0 in range(sp * CH, hi, BN):
        ii = i0 + ar
        ok = ii < hi
        if PAGED:
            keys = nxt
            nxt = _tile_page_rows(BT, b, i0 + BN, hi, MAXP, NPAGES, CPP, BN)
        else:
            keys = ii
        # the values load with the keys, not after the scores: one memory round trip a tile
        v = tl.load(vb + keys[:, None] * (H * DV) + dv[None, :], mask=ok[:, None] & (dv[None, :] < DV), other=0.0)
        s = _scores_tile(q0, q1, kb, keys, ok, H * DK, DK, BK0, BK1, PREC, UPCAST) * qk_scale
        seen = h_ok[:, None] & (ii[None, :] < vis[:, None])  # an earlier token sees fewer
        tl.store(S + rows[:, None] * TS + ii[None, :], s, mask=seen)
        m_i, l_i, acc = _softmax_step(tl.where(seen, s, float("-inf")), v, m_i, l_i, acc, PREC, UPCAST)
    if PDL:  # the scores kernel may launch (it waits for this one's stores)
        gdc_launch_dependents()
    tl.store(PM + rows * NSPLIT + sp, m_i, mask=h_ok)
    tl.store(PL + rows * NSPLIT + sp, l_i, mask=h_ok)
    tl.store(PACC + (rows * NSPLIT + sp)[:, None] * DV + dv[None, :], acc, mask=h_ok[:, None] & (dv[None, :] < DV))


@triton.jit
def _decode_scores(S, PM, PL, LENS, SCORE, TS, NSPLIT, N_SEL_MAX,
                   HQ: tl.constexpr, G: tl.constexpr, HP: tl.constexpr, NSP: tl.constexpr,
                   BJ: tl.constexpr, L_CMP: tl.constexpr, D_CMP: tl.constexpr,
                   SEL_L: tl.constexpr, RP: tl.constexpr, NQ: tl.constexpr, PDL: tl.constexpr):
    """Program (jb, (r, g)): the Eq. 9-10 scores of blocks jb * BJ .. of row r's group g.
    d divides l and l', so block j's compressed tokens are its own R = l'/d tokens j * R + c
    (c < R: for all BJ blocks one contiguous run of each head's row when R is a power of two,
    else a [HP, BJ, RP] gather, RP = next_pow2(R)) and the l/d - 1 tokens before them that
    reach into it (j * R - k, a gather each), each token's overlap a function of c or k alone.
    A gather per overlap (l'/d + l/d - 1 of them), each with its own cross-lane head sum, had
    made this kernel issue-bound (sm_90: 1,700 instructions a program of 64 blocks, now 660)."""
    jb = tl.program_id(0)
    H: tl.constexpr = HQ // G
    R: tl.constexpr = SEL_L // D_CMP
    r, g, rows, h_ok = _group(tl.program_id(1), HQ, G, HP)
    b, n = _row_len(LENS, r, NQ)
    pos = n - 1
    nvis = _visible_cmp(n, TS, L_CMP, D_CMP)
    if PDL:  # the cmp kernel's scores and partials
        gdc_wait()
        gdc_launch_dependents()
    # each head's lse (log2 units) from the cmp partials
    sps = tl.arange(0, NSP)
    pmask = h_ok[:, None] & (sps[None, :] < NSPLIT)
    pm = tl.load(PM + rows[:, None] * NSPLIT + sps[None, :], mask=pmask, other=-1.0e30)
    pl = tl.load(PL + rows[:, None] * NSPLIT + sps[None, :], mask=pmask, other=0.0)
    mx = tl.max(pm, 1)
    tot = tl.sum(pl * tl.exp2(pm - mx[:, None]), 1)
    lse = mx + tl.log2(tl.where(tot > 0, tot, 1.0))
    j = jb * BJ + tl.arange(0, BJ)
    c = tl.arange(0, RP)
    # token j * R + c covers [c * d, c * d + l) of the block's l' keys
    w = (tl.minimum(c * D_CMP + L_CMP, SEL_L) - c * D_CMP).to(tl.float32) / D_CMP
    if RP == R:  # the tile's tokens are one contiguous run of each head's row: 16-byte loads
        ii = jb * BJ * R + tl.arange(0, BJ * R)
        s2 = tl.load(S + rows[:, None] * TS + ii[None, :], mask=h_ok[:, None] & (ii < TS)[None, :],
                     other=float("-inf"))
        s2 = tl.where(ii[None, :] < nvis, s2, float("-inf"))  # not in the load's mask: it would split it
        p = tl.reshape(tl.sum(tl.exp2(s2 - lse[:, None]), 0), [BJ, RP])  # head sum, 0 where masked
    else:
        i3 = (j * R)[None, :, None] + c[None, None, :]  # [1, BJ, RP]
        ok3 = h_ok[:, None, None] & (c < R)[None, None, :] & (i3 < nvis)
        s3 = tl.load(S + rows[:, None, None] * TS + i3, mask=ok3, other=float("-inf"))
        p = tl.sum(tl.exp2(s3 - lse[:, None, None]), 0)  # [BJ, RP]
    score = tl.sum(p * w[None, :], 1)
    for k in tl.static_range(1, L_CMP // D_CMP):  # token j * R - k: its last l - k * d keys
        i = j * R - k
        ok = (i >= 0) & (i < nvis)
        s = tl.load(S + rows[:, None] * TS + i[None, :], mask=h_ok[:, None] & ok[None, :], other=float("-inf"))
        score += tl.sum(tl.exp2(s - lse[:, None]), 0) * (min(L_CMP - k * D_CMP, SEL_L) / D_CMP)
    cur = pos // SEL_L
    forced = (j == 0) | (j == cur) | (j == cur - 1)
    score = tl.where(forced, float("inf"), tl.where(j * SEL_L <= pos, score, float("-inf")))
    tl.store(SCORE + (r * H + g).to(tl.int64) * N_SEL_MAX + j, score, mask=j < N_SEL_MAX)


@triton.jit
def _top_n(SCORE, N_SEL_MAX, NP: tl.constexpr, NSELP: tl.constexpr):
    """The top n of one group's block scores ``SCORE[0:N_SEL_MAX]`` (forced +inf, ineligible
    -inf): [NP] block indices, best first, equal scores to the lower index; -1 past the
    eligible blocks. Triton's bitonic top-k on one int64 key per block, ordered as
    (score, -index), so one comparison decides both."""
    j = tl.arange(0, NSELP)
    s = tl.load(SCORE + j, mask=j < N_SEL_MAX, other=float("-inf"))
    bits = s.to(tl.int32, bitcast=True)
    ordered = tl.where(bits >= 0, bits, bits ^ 0x7FFFFFFF).to(tl.int64)  # float order as int order
    top = tl.topk((ordered << 32) | (0x7FFFFFFF - j).to(tl.int64), NP)
    jt = (0x7FFFFFFF - (top & 0x7FFFFFFF)).to(tl.int32)
    return tl.where((top >> 32) == -2139095041, -1, jt)  # -2139095041: the key of -inf


@triton.jit
def _decode_top_n(SCORE, IDX, N_SEL_MAX, N_SEL: tl.constexpr, NP: tl.constexpr, NSELP: tl.constexpr,
                  PDL: tl.constexpr):
    bg = tl.program_id(0).to(tl.int64)
    if PDL:  # the scores kernel's block scores
        gdc_wait()
        gdc_launch_dependents()
    ids = _top_n(SCORE + bg * N_SEL_MAX, N_SEL_MAX, NP, NSELP)
    slots = tl.arange(0, NP)
    tl.store(IDX + bg * N_SEL + slots, ids, mask=slots < N_SEL)


@triton.jit
def _decode_attend(Q, KS, VS, KW, VW, IDX, SCORE, N_SEL_MAX, LENS, BT, PM, PL, PACC, qk_scale, TK, TW,
                   MAXP, NPAGES, TUNE_R, HQ: tl.constexpr, G: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr,
                   N_SEL: tl.constexpr, NW: tl.constexpr, WINDOW: tl.constexpr,
                   SEL_L: tl.constexpr, BS: tl.constexpr, HP: tl.constexpr, BK0: tl.constexpr,
                   BK1: tl.constexpr, BV: tl.constexpr, NP: tl.constexpr, NSELP: tl.constexpr,
                   PREC: tl.constexpr, UPCAST: tl.constexpr, NQ: tl.constexpr, PAGED: tl.constexpr,
                   PAGED_WIN: tl.constexpr, PS: tl.constexpr, SPP: tl.constexpr, PDL: tl.constexpr):
    """Program pp: SPP slots of one branch, one partial softmax over them. pp < cdiv(N_SEL, SPP):
    the selected blocks pp * SPP ..; else the window chunks (pp - cdiv(N_SEL, SPP)) * SPP ..
    (BS keys each); slots past a branch's end are empty. NSELP > 0: the blocks from the group's
    block scores (:func:`_top_n`); else from IDX. PAGED: k_slc/v_slc are pools of pages of PS
    rows addressed through BT; PAGED_WIN: the window reads them too (shared k/v), else its ring
    KW/VW [B, TW, H, D]. PDL: the selected blocks' programs wait for the kernel before (their
    block scores or lists) after loading q; the window's, which read nothing of it, before their
    stores, so that every program has waited when this kernel completes."""
    pp = tl.program_id(0)
    H: tl.constexpr = HQ // G
    NPS: tl.constexpr = (N_SEL + SPP - 1) // SPP  # programs of the selected blocks
    NPW: tl.constexpr = (NW + SPP - 1) // SPP
    r, g, rows, h_ok = _group(tl.program_id(1), HQ, G, HP)
    b, n = _row_len(LENS, r, NQ)
    pos = n - 1
    # the step waits on this kernel's memory round trips: q first, before the top-n, and each
    # block's values with its keys (not after the scores), so that the loads overlap
    q0, q1 = _group_q(Q, r, g, HQ, G, HP, DK, BK0, BK1, UPCAST)
    if PDL:
        if pp < NPS:
            gdc_wait()
    ids = tl.full([NP], -1, tl.int32)
    if NSELP > 0:
        if pp < NPS:
            ids = _top_n(SCORE + (r * H + g).to(tl.int64) * N_SEL_MAX, N_SEL_MAX, NP, NSELP)
    ar = tl.arange(0, BS)
    is_slc = (ar * 0 + pp) < NPS  # as a vector: the interpreter mishandles scalar & vector masks
    dv = tl.arange(0, BV)
    dmask = dv[None, :] < DV
    m_i = tl.full([HP], -1.0e30, dtype=tl.float32)
    l_i = tl.zeros([HP], dtype=tl.float32)
    acc = tl.zeros([HP, BV], dtype=tl.float32)
    for t in range(SPP):  # a loop, not unrolled: unrolled, 4 slots spill at 4 warps
        slot = pp * SPP + t  # a selected block's slot, or NPS * SPP + a window chunk
        if NSELP > 0:
            blk = tl.sum(tl.where(tl.arange(0, NP) == slot, ids, 0), 0)
        else:
            blk = tl.load(IDX + (r * H + g).to(tl.int64) * N_SEL + tl.minimum(slot, N_SEL - 1)).to(tl.int32)
        blk = tl.where(slot < N_SEL, blk, -1)
        u_s = blk * SEL_L + ar  # < 0 for an empty slot (blk = -1)
        ok_s = is_slc & (ar < SEL_L) & (u_s >= 0) & (u_s <= pos)
        c = slot - NPS * SPP
        u_w = pos - WINDOW + 1 + c * BS + ar
        ok_w = (~is_slc) & (c * BS + ar < WINDOW) & (u_w >= 0)
        if pp < NPS:  # the selected block's keys ...
            kb, vb, keys = _kv_rows(KS, VS, KS, VS, TK, BT, b, g, u_s, ok_s, MAXP, NPAGES, H, DK, DV, PS, PAGED, False)
            ok = ok_s
        else:  # ... or the window chunk's, from the ring (or the pages)
            kb, vb, keys = _kv_rows(KS, VS, KW, VW, TW, BT, b, g, u_w, ok_w, MAXP, NPAGES, H, DK, DV, PS, PAGED_WIN,
                                    True)
            ok = ok_w
        v = tl.load(vb + keys[:, None] * (H * DV) + dv[None, :], mask=ok[:, None] & dmask, other=0.0)
        s = _scores_tile(q0, q1, kb, keys, ok, H * DK, DK, BK0, BK1, PREC, UPCAST)
        m_i, l_i, acc = _softmax_step(tl.where(ok[None, :], s * qk_scale, float("-inf")), v, m_i, l_i, acc, PREC,
                                      UPCAST)
    rows = rows * (NPS + NPW) + pp
    if PDL:
        gdc_wait()  # (returns at once where it has waited)
        gdc_launch_dependents()
    tl.store(PM + rows, m_i, mask=h_ok)
    tl.store(PL + rows, l_i, mask=h_ok)
    tl.store(PACC + rows[:, None] * DV + dv[None, :], acc, mask=h_ok[:, None] & dmask)


@triton.jit
def _merge_row(PM, PL, PACC, row, lo, cnt, NP, NPP: tl.constexpr, DV: tl.constexpr, BV: tl.constexpr, d0=0):
    """Columns d0..d0+BV of the softmax output of the ``cnt`` partials lo.. of one row (of NP):
    [BV] fp32, 0 if none. All partials load at once ([NPP, BV]): one memory round trip, not
    one per partial."""
    p = tl.arange(0, NPP)
    ok = p < cnt
    at = row * NP + lo + p
    m = tl.load(PM + at, mask=ok, other=-1.0e30)
    w = tl.where(ok, tl.exp2(m - tl.max(m, 0)), 0.0)
    tot = tl.sum(w * tl.load(PL + at, mask=ok, other=0.0), 0)
    dv = d0 + tl.arange(0, BV)
    a = tl.load(PACC + at[:, None] * DV + dv[None, :], mask=ok[:, None] & (dv[None, :] < DV), other=0.0)
    return tl.sum(w[:, None] * a, 0) / tl.where(tot > 0, tot, 1.0)


@triton.jit
def _decode_combine(PM, PL, PACC, PM2, PL2, PACC2, GATES, O, NSPLIT,
                    DV: tl.constexpr, N_SEL: tl.constexpr, NW: tl.constexpr, NSP: tl.constexpr,
                    NS2: tl.constexpr, NW2: tl.constexpr, BV: tl.constexpr, PDL: tl.constexpr):
    """One program per (query row, query head) and BV columns of Dv: merge each branch's
    partials (NSPLIT of cmp, N_SEL of slc, NW of the window), mix by the gates. Column chunks
    give a small batch more programs, each loading fewer partial columns (the step waits on
    these loads)."""
    row = tl.program_id(0).to(tl.int64)
    d0 = tl.program_id(1) * BV
    g0 = tl.load(GATES + row * 3).to(tl.float32)
    g1 = tl.load(GATES + row * 3 + 1).to(tl.float32)
    g2 = tl.load(GATES + row * 3 + 2).to(tl.float32)
    if PDL:  # every branch's partials (the attend kernel waited for the cmp kernel's)
        gdc_wait()
    o_cmp = _merge_row(PM, PL, PACC, row, 0, NSPLIT, NSPLIT, NSP, DV, BV, d0)
    o_slc = _merge_row(PM2, PL2, PACC2, row, 0, N_SEL, N_SEL + NW, NS2, DV, BV, d0)
    o_win = _merge_row(PM2, PL2, PACC2, row, N_SEL, NW, N_SEL + NW, NW2, DV, BV, d0)
    o = g0 * o_cmp + g1 * o_slc + g2 * o_win
    dv = d0 + tl.arange(0, BV)
    tl.store(O + row * DV + dv, o.to(O.dtype.element_ty), mask=dv < DV)


# 255 registers at 4 warps for Dk + Dv = 320 (spills in attend); 8 warps fit (cuobjdump, sm_90)
# keyed by the rows too (and cmp by its length): batch 1 and batch 16 want other configs, and the
# tuned ones persist on disk (a batch-16 step took batch 1's cmp config: 51 -> 96 us at 64k)
_decode_cmp_tuned = C.autotuned(_decode_cmp, ["TUNE_R", "TUNE_T", "HQ", "G", "DK", "DV", "BN", "NQ", "QT", "PAGED"],
                                [4, 8], [1, 2, 3])
_decode_attend_tuned = C.autotuned(_decode_attend, ["TUNE_R", "HQ", "G", "DK", "DV", "BS", "NQ", "PAGED",
                                                    "PAGED_WIN", "SPP"], [4, 8], [1, 2])


def _top_n_where(n_sel: int, slots: int, device) -> str:
    """Where the decode's top-n runs (module doc, step 3): "slots", "kernel" or "torch"."""
    if n_sel > 4096:
        return "torch"
    return "slots" if slots <= 4 * _sms(device) else "kernel"


def _pdl(device) -> bool:
    """Whether the step's kernels 2-5 launch as programmatic dependents (:data:`PDL`)."""
    return PDL and gdc_wait is not None and not C.interpreting() and device.type == "cuda" and _sm90(device)


@functools.lru_cache(maxsize=None)
def _sm90(device) -> bool:
    return torch.cuda.get_device_capability(device)[0] >= 9


@functools.lru_cache(maxsize=None)
def _sms(device) -> int:
    """Multiprocessors of the GPU (a small stand-in under the interpreter)."""
    if C.interpreting() or device.type != "cuda":
        return 2
    return torch.cuda.get_device_properties(device).multi_processor_count


def _slots_per_program(groups: int, n_sel: int, nw: int, device) -> int:
    """Selected blocks (and window chunks) a program of the attend kernel takes: 1 while the
    programs would not fill the GPU twice (a small batch waits on each program's round trips),
    else up to 4 while they still would, so that a large batch writes and merges 4x fewer
    partials."""
    spp = 1
    while spp < 4 and groups * (C.cdiv(n_sel, 2 * spp) + C.cdiv(nw, 2 * spp)) >= 2 * _sms(device):
        spp *= 2
    return spp


def _n_split(tc: int, bh: int, BN: int, device) -> int:
    """Splits of the compressed tokens: enough programs to fill the GPU twice, >= BN tokens each
    (an H200 sweep of 2, 4, 8 and 16 programs per multiprocessor found no difference)."""
    if C.interpreting() or device.type != "cuda":
        return max(1, min(C.cdiv(tc, BN), 3))
    return max(1, min(C.cdiv(tc, BN), C.cdiv(2 * _sms(device), max(bh, 1))))


class _Plan(NamedTuple):
    """What a decode step's launches take besides its tensors, a function of the shapes and the
    geometry alone (:func:`_plan`, cached): host arithmetic done once per signature, not per
    step."""

    R: int  # query rows B * S
    n_sel_max: int  # selection blocks of the longest sequence
    where: str  # where the top-n runs (_top_n_where)
    shapes: tuple  # of the fp32 partial buffers: s, pm, pl, pacc, score, pm2, pl2, pacc2
    offsets: tuple  # of each buffer in the step's one workspace (elements, 128-byte aligned)
    ws_numel: int  # the workspace's elements
    cmp: tuple  # (grid, positional ints, constexprs) of each launch
    scores: tuple
    top_n: tuple
    attend: tuple
    combine: tuple
    compiled: dict  # the launches' compiled kernels (C.relaunch), filled by the first step


@functools.lru_cache(maxsize=256)
def _plan(B, NQ, HQ, Dk, H, Dv, Tc, Tk, Tw, dtype, device, paged, paged_win, maxp, npages, page_size, cpp, n_max,
          cmp_block, cmp_stride, sel_block, sel_count, window, scale, interp, pdl=False) -> _Plan:
    G = HQ // H
    R = B * NQ  # query rows
    HP = max(16, C.next_pow2(G))  # the tensor-core minimum of rows
    BK0, BK1 = C.split_dim(Dk)
    BV = max(16, C.next_pow2(Dv))
    BN = 16 if interp else 64
    qk_scale = default_scale(scale, Dk) * LOG2E.value
    common = dict(HQ=HQ, G=G, HP=HP, PREC=C.dot_precision(dtype), UPCAST=C.upcast(dtype), NQ=NQ)
    launch = dict(num_warps=4, num_stages=1) if interp else {}  # GPUs: autotuned, or the defaults
    dep = dict(PDL=True, launch_pdl=True) if pdl else dict(PDL=False)  # kernels 2-5 (PDL)
    # 1. cmp partials and raw scores; QT new tokens of a sequence share a program's key tiles
    # (up to 64 rows: QT * HP)
    qt = min(C.next_pow2(NQ), max(1, 64 // HP))
    progs = B * C.cdiv(NQ, qt) * H
    tc_used = geometry.num_cmp_blocks(n_max, cmp_block, cmp_stride)
    nsplit = _n_split(tc_used, progs, BN, device)
    ch = C.cdiv(C.cdiv(max(tc_used, 1), nsplit), BN) * BN
    # the raw scores of the visible tokens only (a cache's Tc may be far larger), rows padded to
    # 16 tokens: aligned rows give the scores kernel 16-byte loads
    ts = C.cdiv(max(tc_used, 1), 16) * 16
    tc_bound = max(tc_used, 1) if paged else Tc  # rows of k_cmp a sequence may read (paged: through the table)
    cmp = ((nsplit, progs), (qk_scale, tc_bound, ts, ch, nsplit, maxp, npages, C.next_pow2(progs),
                              C.next_pow2(max(tc_used, 1))),
           dict(DK=Dk, DV=Dv, L_CMP=cmp_block, D_CMP=cmp_stride, BK0=BK0, BK1=BK1, BV=BV, BN=BN, PAGED=paged,
                CPP=cpp, QT=qt, PDL=pdl, **common, **launch))
    # 2. block scores
    n_sel_max = geometry.num_sel_blocks(n_max, sel_block)
    BJ = 16 if interp else 64  # blocks a program; fewer while they would not fill the GPU twice
    while BJ > 16 and C.cdiv(n_sel_max, BJ) * R * H < 2 * _sms(device):
        BJ //= 2
    nsp = max(2, C.next_pow2(nsplit))
    scores = ((C.cdiv(n_sel_max, BJ), R * H), (ts, nsplit, n_sel_max),
              dict(HQ=HQ, G=G, HP=HP, NSP=nsp, BJ=BJ, L_CMP=cmp_block, D_CMP=cmp_stride, SEL_L=sel_block,
                   RP=C.next_pow2(sel_block // cmp_stride), NQ=NQ, **dep, **launch))
    # 3. the top n (ties to the lower index, as the reference)
    np_ = C.next_pow2(sel_count)
    nselp = max(16, np_, C.next_pow2(n_sel_max))
    where = _top_n_where(n_sel_max, R * H * sel_count, device)
    top_n = ((R * H,), (n_sel_max,), dict(N_SEL=sel_count, NP=np_, NSELP=nselp, **dep, **launch))
    # 4. a partial softmax per spp selected blocks and per spp window chunks
    BS = max(16, C.next_pow2(sel_block))
    nw = C.cdiv(window, BS)
    spp = _slots_per_program(R * H, sel_count, nw, device)
    nps, npw = C.cdiv(sel_count, spp), C.cdiv(nw, spp)
    np2 = nps + npw
    attend = ((np2, R * H), (qk_scale, Tk, Tw, maxp, npages, C.next_pow2(R * H)),
              dict(DK=Dk, DV=Dv, N_SEL=sel_count, NW=nw, WINDOW=window, SEL_L=sel_block, BS=BS, BK0=BK0, BK1=BK1,
                   BV=BV, NP=np_, NSELP=nselp if where == "slots" else 0, PAGED=paged, PAGED_WIN=paged_win,
                   PS=page_size, SPP=spp, **dep, **common, **launch))
    # 5. merge and mix, one program per (query row, query head) and column chunk: chunks of 32
    # while the rows alone would not fill the GPU twice
    bvc = BV if R * HQ >= 2 * _sms(device) else max(16, min(BV, 32))
    combine = ((R * HQ, BV // bvc), (nsplit,), dict(DV=Dv, N_SEL=nps, NW=npw, NSP=nsp, NS2=max(2, C.next_pow2(nps)),
                                                    NW2=max(2, C.next_pow2(npw)), BV=bvc, **dep, **launch))
    shapes = ((R, HQ, ts), (R, HQ, nsplit), (R, HQ, nsplit), (R, HQ, nsplit, Dv), (R, H, n_sel_max),
              (R, HQ, np2), (R, HQ, np2), (R, HQ, np2, Dv))
    sizes = [math.prod(x) for x in shapes]
    offsets = tuple(sum(-(-n // 32) * 32 for n in sizes[:i]) for i in range(len(sizes)))
    ws_numel = offsets[-1] + sizes[-1]
    return _Plan(R, n_sel_max, where, shapes, offsets, ws_numel, cmp, scores, top_n, attend, combine, {})


class _Buffer:
    """A pointer into a step's workspace, as triton reads a tensor argument (its address and
    dtype): one allocation and eight of these cost the host less than eight allocations or
    eight views (~3 us each)."""

    __slots__ = ("ptr",)
    dtype = torch.float32

    def __init__(self, ptr: int):
        self.ptr = ptr

    def data_ptr(self) -> int:
        return self.ptr


def _buffers(p: _Plan, device) -> list:
    """The step's eight fp32 partial buffers (``p.shapes``), in one workspace: pointers into it
    on a GPU, views under the interpreter (which copies tensor arguments) and where the top-n
    runs in torch (which reads the scores as a tensor)."""
    ws = torch.empty(p.ws_numel, dtype=torch.float32, device=device)
    if C.interpreting():
        return [ws[o:o + math.prod(x)].view(x) for o, x in zip(p.offsets, p.shapes)]
    base = ws.data_ptr()
    out = [_Buffer(base + 4 * o) for o in p.offsets]
    out.append(ws)  # kept alive until the launches are enqueued (the allocator orders reuse by stream)
    if p.where == "torch":
        out[4] = ws[p.offsets[4]:p.offsets[4] + math.prod(p.shapes[4])].view(p.shapes[4])
    return out


def nsa_decode_triton(q, k_cmp, v_cmp, k_slc, v_slc, k_win, v_win, gates, *, cache_seqlens,
                      cmp_block=32, cmp_stride=16, sel_block=64, sel_count=16, window=512, scale=None,
                      max_seqlen=None, block_table=None):
    """A decode step of S = q.shape[1] new tokens per sequence, ``[B, S, HQ, Dv]`` in q's dtype;
    contract of :func:`nsa.nsa_decode`. Grids and buffers are sized by ``max_seqlen`` when given
    (no host sync: capturable in a CUDA graph); programs past a sequence's own length find
    nothing to read. The B * S queries are the grid's rows (row r = b * S + s, at position
    ``cache_seqlens[b] - S + s``): each selects and attends alone. ``block_table``: paged
    pools (k_win/v_win None: the window reads the k_slc/v_slc pages)."""
    paged = block_table is not None
    if k_win is None:
        if not paged:
            k_win, v_win = k_slc, v_slc
    q, k_cmp, v_cmp, gates = q.contiguous(), k_cmp.contiguous(), v_cmp.contiguous(), gates.contiguous()
    k_slc, v_slc = k_slc.contiguous(), v_slc.contiguous()
    paged_win = k_win is None
    if paged_win:
        k_win, v_win = k_slc, v_slc
    k_win, v_win = k_win.contiguous(), v_win.contiguous()
    B, NQ, HQ, Dk = q.shape
    H, Dv = k_cmp.shape[2], v_cmp.shape[3]
    if paged:
        bt = block_table.contiguous()
        maxp, npages, page_size = bt.shape[1], k_slc.shape[0], k_slc.shape[1]
        cpp = k_cmp.shape[1]  # compressed tokens per page: page_size // d
    else:
        bt, maxp, npages, page_size, cpp = None, 1, 1, 1, 1
    dev = q.device
    if isinstance(cache_seqlens, torch.Tensor):
        lens = cache_seqlens.contiguous()  # int32 or int64: the kernels read either
        n_max = max_seqlen if max_seqlen is not None else (int(cache_seqlens.max()) if B else 1)
    else:
        lens = torch.full((B,), int(cache_seqlens), dtype=torch.int32, device=dev)
        n_max = int(cache_seqlens)
    if not paged:
        bt = lens
    o = torch.empty(B, NQ, HQ, Dv, dtype=q.dtype, device=dev)
    if B == 0:
        return o
    p = _plan(B, NQ, HQ, Dk, H, Dv, k_cmp.shape[1], k_slc.shape[1], k_win.shape[1], q.dtype, dev, paged, paged_win,
              maxp, npages, page_size, cpp, n_max, cmp_block, cmp_stride, sel_block, sel_count, window, scale,
              C.interpreting(), _pdl(dev))
    s_buf, pm, pl, pacc, score, pm2, pl2, pacc2, *_ = _buffers(p, dev)
    # the plan fixes every integer and constexpr; the tensors add their dtypes (lens and the
    # block table may be int32 or int64)
    key = (lens.dtype, bt.dtype, k_slc.dtype, v_slc.dtype, k_win.dtype, gates.dtype)
    # alignment, hooks and stream once for the five launches (the buffers come from torch's allocator)
    stream = C.launch_stream(q, k_cmp, v_cmp, k_slc, v_slc, k_win, v_win, gates, lens, bt)
    grid, ints, const = p.cmp
    C.relaunch(p.compiled, (key, 0), _decode_cmp_tuned, grid, (q, k_cmp, v_cmp, lens, bt, s_buf, pm, pl, pacc, *ints),
               const, stream)
    grid, ints, const = p.scores
    C.relaunch(p.compiled, (key, 1), _decode_scores, grid, (s_buf, pm, pl, lens, score, *ints), const, stream)
    if p.where == "torch":
        idx = geometry.top_blocks(score, sel_count).contiguous()  # [R, H, n]
    elif p.where == "kernel":
        idx = torch.empty(p.R, H, sel_count, dtype=torch.int32, device=dev)
        grid, ints, const = p.top_n
        C.relaunch(p.compiled, (key, 2), _decode_top_n, grid, (score, idx, *ints), const, stream)
    else:  # "slots": in the attend kernel
        idx = score
    grid, ints, const = p.attend  # idx's dtype follows p.where, o's is q's: both in the plan
    C.relaunch(p.compiled, (key, 3), _decode_attend_tuned, grid,
               (q, k_slc, v_slc, k_win, v_win, idx, score, p.n_sel_max, lens, bt, pm2, pl2, pacc2, *ints), const,
               stream)
    grid, ints, const = p.combine
    C.relaunch(p.compiled, (key, 4), _decode_combine, grid, (pm, pl, pacc, pm2, pl2, pacc2, gates, o, *ints),
               const, stream)
    return o
