"""Branch slc (semantics §5) in Triton: attention over each query's selected key blocks, group-centric.

As the paper's Figure 3: a program holds the h query heads of one group at BT consecutive
positions (BM = BT * HP rows) and makes one pass over their selected blocks; each key/value
block it loads serves every head of the group. h is padded to a power of two HP inside the
kernel, and BT = 16 / HP positions fill the tensor-core minimum of 16 rows when h < 16, so
every h from 1 to 64 works. With BT > 1 the program walks the tile's distinct blocks
(:func:`tile_uniques`, in first-occurrence order), each once for every row whose position
selected it (the local blocks always coincide): the same sums as a walk over every slot whose
repeats add exact zeros, in a third of its steps at h = 4 (~20 distinct blocks of 64 slots).

Tried and measured (docs/kernels.md): two selected blocks per step for one-position tiles
(a [Dk, 2 l'] key tile): slower on the H100, slc 23.5 -> 26.0 ms at 64k (paper config). Four
positions per tile at h = 16 (64 rows, repeated blocks skipped by a branch) on the H200: 1.5x
slower with the benchmark's random inputs, 1.6x faster when every 64 positions share one list;
a trained model's lists are 50-70% distinct over 4 positions, so one position per tile stays.
Walking the distinct blocks only, 4 positions a tile won on realistic inputs and lost on random
ones on an H100 (prefill_slc_tile_ab_h100.json); the split launch (:func:`share_split`) picks
per tile, and is off by default (:data:`SPLIT`: it lost on random inputs at 64k and in the dq).
With one position per tile, the slc branch's time hardly depends on how the lists overlap
(random vs shared lists: 20.9 vs 20.4 ms at 64k), so it is not bound by L2 bandwidth. Those
tiles read each block through TMA descriptors (:func:`use_tma`): 21.2 -> 21.0 ms at 64k,
2.42 -> 2.33 at 8k on an H100 (slc_tma_ab_h100.json).

Reference: :func:`nsa.reference.selected_attention_ref` (same signature).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import _common as C
from ._common import LOG2E
from .band import default_scale


@triton.jit
def tile_lists(IDX, q_start, t0, q_len, g, H: tl.constexpr, N_SEL: tl.constexpr, NP: tl.constexpr,
               BT: tl.constexpr):
    """The block lists [BT, NP] of a tile's positions (-1: none): with BT > 1 to find blocks
    shared between positions, with BT = 1 so that no K/V address waits on a load in the loop."""
    tp = t0 + tl.arange(0, BT)
    cs = tl.arange(0, NP)
    idx_off = ((q_start + tp).to(tl.int64) * H + g) * N_SEL
    lists = tl.load(IDX + idx_off[:, None] + cs[None, :],
                    mask=(tp[:, None] < q_len) & (cs[None, :] < N_SEL), other=-1).to(tl.int32)
    return lists


@triton.jit
def tile_firsts(lists, BT: tl.constexpr):
    """(first [BT * NP], whether each slot of the tile's lists [BT, NP] holds a block that no
    earlier position lists (a list's own blocks are distinct; empty slots, -1, are not firsts);
    their count, the tile's distinct blocks). Compares only: one position's row at a time,
    [M, NP] each, not [M, M]."""
    NP: tl.constexpr = lists.shape[1]
    M: tl.constexpr = BT * NP
    flat = tl.reshape(lists, [M])
    e = tl.arange(0, M)
    prow = tl.arange(0, BT)
    seen = e < 0
    for p in tl.static_range(BT - 1):
        row = tl.sum(tl.where(prow[:, None] == p, lists, 0), 0)  # [NP]
        hit = tl.sum(tl.where(flat[:, None] == row[None, :], 1, 0), 1) > 0
        seen = seen | (hit & (e // NP > p))
    first = (flat >= 0) & (~seen)
    return first, tl.sum(first.to(tl.int32), 0)


@triton.jit
def tile_uniques(lists, N_SEL: tl.constexpr, BT: tl.constexpr):
    """(the tile's walk length, uniq): with BT = 1 every slot of the position's list, N_SEL
    steps; with BT > 1 the distinct blocks of the tile's lists [BT, NP] in first-occurrence
    order (position by position, slot by slot), uniq [BT * NP] holding them first, and their
    count. Empty slots (-1) are left out."""
    M: tl.constexpr = BT * lists.shape[1]
    flat = tl.reshape(lists, [M])
    if BT == 1:
        n = N_SEL
        uniq = flat
    else:
        first, n = tile_firsts(lists, BT)
        # the firsts in slot order: sort (slot << 32 | block), the others after them
        e = tl.arange(0, M)
        key = tl.where(first, (e.to(tl.int64) << 32) | flat.to(tl.int64), 0x7FFFFFFFFFFFFFFF)
        uniq = (tl.sort(key, 0) & 0xFFFFFFFF).to(tl.int32)
    return n, uniq


@triton.jit
def share_take(IDX, FLAGS, q_start, t0, q_len, g, H: tl.constexpr, N_SEL: tl.constexpr, NP: tl.constexpr,
               BT: tl.constexpr, SHARE: tl.constexpr):
    """The shared pass of a split launch: (the tile's lists, whether it takes the tile: at most
    SHARE distinct blocks), with its positions marked in FLAGS [rows, H] (int8: 1 taken, 0
    left to the one-position pass). Decided before the walk's sort, which a left tile skips."""
    lists = tile_lists(IDX, q_start, t0, q_len, g, H, N_SEL, NP, BT)
    _, n = tile_firsts(lists, BT)
    take = n <= SHARE
    tp = t0 + tl.arange(0, BT)
    tl.store(FLAGS + (q_start + tp).to(tl.int64) * H + g, tl.full([BT], 1, tl.int8) * take.to(tl.int8),
             mask=tp < q_len)
    return lists, take


@triton.jit
def split_tile(IDX, FLAGS, q_start, t0, q_len, g, H: tl.constexpr, N_SEL: tl.constexpr, NP: tl.constexpr,
               BT: tl.constexpr, SHARE: tl.constexpr, SKIP: tl.constexpr):
    """(whether the program has work, the tile's lists) in a slc kernel that may be one pass of
    a split launch: SHARE >= 0, the shared pass (:func:`share_take`); SKIP, the one-position
    pass after it, whose positions the shared pass took (FLAGS 1) are done."""
    go = True
    if SKIP:
        go = tl.load(FLAGS + (q_start + t0).to(tl.int64) * H + g) == 0
    if SHARE >= 0:
        lists, go = share_take(IDX, FLAGS, q_start, t0, q_len, g, H, N_SEL, NP, BT, SHARE)
    else:
        lists = tile_lists(IDX, q_start, t0, q_len, g, H, N_SEL, NP, BT)
    return go, lists


@triton.jit
def tile_block(lists, uniq, ps, row_ok, k_len, SEL_L: tl.constexpr, BS: tl.constexpr, HP: tl.constexpr,
               BT: tl.constexpr):
    """Step ps of a tile's walk (:func:`tile_uniques`): (blk, the block, -1 for an empty slot;
    sel [BT * HP], the rows whose position lists it; u [BS], its key positions; u_ok, the
    existing ones). A block is attended once, for every row that selected it."""
    if BT == 1:  # from registers: no K/V address waits on a load
        cs = tl.arange(0, lists.shape[1])
        blk = tl.sum(tl.sum(tl.where(cs[None, :] == ps, lists, 0), 1), 0)
        sel = row_ok
    else:
        blk = tl.sum(tl.where(tl.arange(0, uniq.shape[0]) == ps, uniq, 0), 0)
        has = tl.sum(tl.where(lists == blk, 1, 0), 1)  # [BT]
        sel = tl.reshape(tl.broadcast_to(has[:, None], [BT, HP]), [BT * HP]) > 0
    ar = tl.arange(0, BS)
    u = blk * SEL_L + ar
    u_ok = (ar < SEL_L) & (u < k_len) & (u >= 0)
    return blk, sel, u, u_ok


@triton.jit
def drop_forced(lists, pos, SEL_L: tl.constexpr):
    """One position's list [1, NP] without its forced blocks (block 0, its own block pos // l' and
    the one before it), which :func:`_forced_fwd` attends: (the other blocks ascending, then -1;
    their count)."""
    j = pos // SEL_L
    keep = (lists > 0) & (lists != j) & (lists != j - 1)
    srt = tl.sort(tl.where(keep, lists, 0x7FFFFFFF), 1)
    return tl.where(srt == 0x7FFFFFFF, -1, srt), tl.sum(tl.sum(keep.to(tl.int32), 1), 0)


@triton.jit
def forced_blocks(t0, q_len, q_offset, BT: tl.constexpr, SEL_L: tl.constexpr):
    """(the first non-zero block, the count) of the forced blocks of a tile's positions: block 0,
    then the blocks from max(j_lo - 1, 1) to j_hi, where j_lo .. j_hi (j_hi <= j_lo + 1) are the
    positions' own blocks."""
    j_lo = (q_offset + t0) // SEL_L
    j_hi = (q_offset + tl.minimum(t0 + BT, q_len) - 1) // SEL_L
    first = tl.maximum(j_lo - 1, 1)
    return first, 1 + tl.maximum(j_hi - first + 1, 0)


@triton.jit
def forced_block(i, first, pos, k_len, ar, SEL_L: tl.constexpr):
    """Step i of a tile's forced blocks (:func:`forced_blocks`): (blk; [rows] whether it is one
    of each row's forced blocks, 0, pos // l' or the one before; u [BS], its key positions;
    u_ok, the existing ones)."""
    blk = tl.where(i == 0, 0, first + i - 1)
    jr = pos // SEL_L
    u = blk * SEL_L + ar
    return blk, (blk == 0) | (blk == jr) | (blk == jr - 1), u, (ar < SEL_L) & (u < k_len)


@triton.jit
def _forced_fwd(Q, K, V, KD0, KD1, VD, OF, LSEF, TBL, SEQ, sm_scale, q_offset,
                HQ: tl.constexpr, G: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr,
                SEL_L: tl.constexpr, BS: tl.constexpr, HP: tl.constexpr, BT: tl.constexpr,
                BK0: tl.constexpr, BK1: tl.constexpr, BV: tl.constexpr, PREC: tl.constexpr,
                UPCAST: tl.constexpr, TMA: tl.constexpr):
    """The forced blocks of every selection (block 0, the position's own block and the one
    before it: the same for all l' positions of a selection block), BT positions x the group's
    heads a tile, each block's keys loaded once for the tile instead of once a position. Writes
    the rows' output over those blocks (normalised, fp32) to OF and its log-sum-exp (base 2,
    in units of the scaled score) to LSEF, from which the slc kernel goes on (FORCED) over the
    other blocks. TMA: the blocks through the descriptors KD0, KD1, VD, as the slc kernel's."""
    BM: tl.constexpr = BT * HP
    pid = tl.program_id(0)
    g = tl.program_id(1)
    H = HQ // G
    t0, q_start, q_len, k_start, k_len = C.program_rows(TBL, SEQ, pid, 2)  # slc keys
    tq, row_ok, pos, row0, rel = C.tile_rows(t0, g, q_start, q_len, q_offset, HQ, G, HP, BM)
    Qb = Q + row0 * DK
    q0 = C.load_cols(Qb, rel * DK, row_ok, 0, BK0, DK, UPCAST)  # [BM, BK0]
    q1 = q0
    if BK1 > 0:
        q1 = C.load_cols(Qb, rel * DK, row_ok, BK0, BK1, DK, UPCAST)
    qk_scale = sm_scale * LOG2E
    ar = tl.arange(0, BS)
    first, n_blk = forced_blocks(t0, q_len, q_offset, BT, SEL_L)
    m_i = tl.full([BM], -1.0e30, dtype=tl.float32)
    l_i = tl.zeros([BM], dtype=tl.float32)
    acc = tl.zeros([BM, BV], dtype=tl.float32)
    for i in range(0, n_blk):
        blk, forced, u, u_ok = forced_block(i, first, pos, k_len, ar, SEL_L)
        kb = K + ((k_start + blk.to(tl.int64) * SEL_L) * H + g) * DK
        krow = (k_start + blk * SEL_L).to(tl.int32)  # TMA: rows past the keys are hidden by vis
        if TMA:
            k0 = C.tma_tile(KD0, krow, g * DK, UPCAST)
        else:
            k0 = C.load_cols(kb, ar * (H * DK), u_ok, 0, BK0, DK, UPCAST)
        s = tl.dot(q0, tl.trans(k0), input_precision=PREC)
        if BK1 > 0:
            if TMA:
                k1 = C.tma_tile(KD1, krow, g * DK + BK0, UPCAST)
            else:
                k1 = C.load_cols(kb, ar * (H * DK), u_ok, BK0, BK1, DK, UPCAST)
            s += tl.dot(q1, tl.trans(k1), input_precision=PREC)
        vis = (forced & row_ok)[:, None] & u_ok[None, :] & (u[None, :] <= pos[:, None])
        s = tl.where(vis, s * qk_scale, float("-inf"))
        p, alpha, m_new, l_i = C.softmax_step(s, m_i, l_i)
        if TMA:
            v = C.tma_tile(VD, krow, g * DV, UPCAST)
        else:
            v = C.load_cols(V + ((k_start + blk.to(tl.int64) * SEL_L) * H + g) * DV, ar * (H * DV), u_ok, 0, BV,
                            DV, UPCAST)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PREC)
        m_i = m_new
    dv = tl.arange(0, BV)
    o = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
    tl.store(OF + (row0 + rel)[:, None] * DV + dv[None, :], o, mask=row_ok[:, None] & (dv[None, :] < DV))
    tl.store(LSEF + row0 + rel, tl.where(l_i > 0, m_i + tl.log2(tl.where(l_i > 0, l_i, 1.0)), -1.0e30),
             mask=row_ok)


@triton.jit
def _selected_fwd(Q, K, V, KD0, KD1, VD, O, LSE, OF, LSEF, IDX, FLAGS, TBL, SEQ, TUNE_T, sm_scale, q_offset,
                  HQ: tl.constexpr, G: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr,
                  SEL_L: tl.constexpr, BS: tl.constexpr, N_SEL: tl.constexpr, NP: tl.constexpr,
                  HP: tl.constexpr, BT: tl.constexpr, BK0: tl.constexpr, BK1: tl.constexpr,
                  BV: tl.constexpr, PREC: tl.constexpr, UPCAST: tl.constexpr,
                  WRITE_LSE: tl.constexpr, CLAMP: tl.constexpr, K0_FULL: tl.constexpr,
                  V_FULL: tl.constexpr, SHARE: tl.constexpr, SKIP: tl.constexpr, TMA: tl.constexpr,
                  FORCED: tl.constexpr):
    """SHARE >= 0: the shared pass (BT > 1) of a split launch; it takes the tiles whose walk has
    at most SHARE distinct blocks and marks their positions in FLAGS [rows, H] (int8: 1 taken,
    0 left). SKIP: the one-position pass after it, which leaves the marked positions alone.
    TMA (one position a tile): each block's keys and values arrive through the tensor
    descriptors KD0, KD1 (K viewed [B * Tk, H * Dk], boxes [BS, BK0] and [BS, BK1]) and VD (V,
    [BS, BV]; :func:`nsa.triton._common.kv_descriptors`), so the copy engine fetches the next
    blocks while this one is computed. FORCED (one position a tile, lists that hold the
    position's forced blocks): the walk starts from :func:`_forced_fwd`'s output and lse over
    those blocks (OF, LSEF) and steps over the others only."""
    BM: tl.constexpr = BT * HP
    pid = tl.program_id(0)
    g = tl.program_id(1)
    H = HQ // G
    t0, q_start, q_len, k_start, k_len = C.program_rows(TBL, SEQ, pid, 2)  # slc keys
    go, lists = split_tile(IDX, FLAGS, q_start, t0, q_len, g, H, N_SEL, NP, BT, SHARE, SKIP)
    if not go:
        return
    if FORCED:
        lists, n_rest = drop_forced(lists, q_offset + t0, SEL_L)

    tq, row_ok, pos, row0, rel = C.tile_rows(t0, g, q_start, q_len, q_offset, HQ, G, HP, BM)
    q_row = rel * DK
    Qb = Q + row0 * DK
    dk0 = tl.arange(0, BK0)
    q0 = C.load_cols(Qb, q_row, row_ok, 0, BK0, DK, UPCAST)  # [BM, BK0]
    if BK1 > 0:
        dk1 = BK0 + tl.arange(0, BK1)
        q1 = C.load_cols(Qb, q_row, row_ok, BK0, BK1, DK, UPCAST)  # [BM, BK1]
    dv = tl.arange(0, BV)
    qk_scale = sm_scale * LOG2E
    ar = tl.arange(0, BS)  # BS = l' rounded up to a power of two >= 16 (the dot minimum)
    n_steps, uniq = tile_uniques(lists, N_SEL, BT)  # with BT > 1 the dedup runs while the q loads are in flight

    m_i = tl.full([BM], -1.0e30, dtype=tl.float32)
    l_i = tl.zeros([BM], dtype=tl.float32)
    acc = tl.zeros([BM, BV], dtype=tl.float32)
    if FORCED:  # continue from the forced blocks' softmax: max lse, sum 1, the normalised output
        n_steps = n_rest
        m_i = tl.load(LSEF + row0 + rel, mask=row_ok, other=-1.0e30)
        l_i = tl.where(row_ok, 1.0, 0.0)
        acc = tl.load(OF + (row0 + rel)[:, None] * DV + dv[None, :], mask=row_ok[:, None] & (dv[None, :] < DV),
                      other=0.0)
    for ps in range(0, n_steps):
        blk, sel, u, u_ok = tile_block(lists, uniq, ps, row_ok, k_len, SEL_L, BS, HP, BT)
        # one scalar base per block, small offsets inside it: fewer 64-bit address registers
        blk_row = tl.maximum(blk, 0).to(tl.int64) * SEL_L
        kr = ar  # K/V rows of the block
        if CLAMP:  # rows clamped into the sequence instead of masked (vis masks their scores):
            # unmasked loads, measured 5-10% faster on the H200 with one position per tile. A
            # block past the keys (allowed, ignored) reads the last row.
            blk_row = tl.minimum(blk_row, k_len - 1)
            kr = tl.minimum(ar, (k_len - 1 - blk_row).to(tl.int32))
        kb = K + ((k_start + blk_row) * H + g) * DK
        vb = V + ((k_start + blk_row) * H + g) * DV
        if TMA:  # rows past the keys: the next sequence's or zeros, both hidden by vis
            krow = (k_start + tl.maximum(blk, 0) * SEL_L).to(tl.int32)
            kt0 = tl.trans(KD0.load([krow, g * DK]))
        else:
            kt0 = C.load_tile(kb + dk0[:, None] + kr[None, :] * (H * DK), u_ok[None, :] & (dk0[:, None] < DK),
                              K0_FULL)
        if UPCAST:  # the CPU interpreter's bf16 dot is wrong (triton 3.9)
            kt0 = kt0.to(tl.float32)
        s = tl.dot(q0, kt0, input_precision=PREC)
        if BK1 > 0:
            if TMA:
                kt1 = tl.trans(KD1.load([krow, g * DK + BK0]))
            else:
                k1_ok = dk1[:, None] < DK
                if not CLAMP:  # repeats of a block inside the tile (blk = -1) load nothing
                    k1_ok = k1_ok & u_ok[None, :]
                kt1 = tl.load(kb + dk1[:, None] + kr[None, :] * (H * DK), mask=k1_ok, other=0.0)
            if UPCAST:  # the CPU interpreter's bf16 dot is wrong (triton 3.9)
                kt1 = kt1.to(tl.float32)
            s += tl.dot(q1, kt1, input_precision=PREC)
        vis = sel[:, None] & u_ok[None, :] & (u[None, :] <= pos[:, None])
        s = tl.where(vis, s * qk_scale, float("-inf"))
        p, alpha, m_new, l_i = C.softmax_step(s, m_i, l_i)
        if TMA:
            v = VD.load([krow, g * DV])
        else:
            v = C.load_tile(vb + kr[:, None] * (H * DV) + dv[None, :], u_ok[:, None] & (dv[None, :] < DV), V_FULL)
        if UPCAST:  # the CPU interpreter's bf16 dot is wrong (triton 3.9)
            v = v.to(tl.float32)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PREC)
        m_i = m_new

    o = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
    o_off = rel[:, None] * DV + dv[None, :]
    tl.store(O + row0 * DV + o_off, o.to(O.dtype.element_ty), mask=row_ok[:, None] & (dv[None, :] < DV))
    if WRITE_LSE:  # natural-log lse for the backward (nsa.triton.backward)
        lse = (m_i + tl.log2(tl.where(l_i > 0, l_i, 1.0))) * 0.6931471805599453
        tl.store(LSE + row0 + rel, tl.where(l_i > 0, lse, float("-inf")), mask=row_ok)



def _prune(configs, named_args, **kwargs):
    """The shared pass of a split launch (64 rows of 16-32 heads) spills at 2 warps (sm_90
    compile of the paper geometry: 208-568 bytes a thread, tests/test_spills.py): it tunes
    over 4 and 8 warps. One warp (instead of 2) only for one-position tiles of at most 16 heads that read
    their blocks through descriptors (~205 registers at Dk 192); with pointer loads, 32 heads
    or groups of one head it spills. It runs as Scalable-Flash-NSA's one-position tiles do and
    won on an H100, paper configuration: slc forward 2.33 -> 2.22 ms at 8k, 20.8 -> 20.7 at
    64k against 2-8 warps (slc_warps_h100.json)."""
    a = {**named_args, **kwargs}
    if a["SHARE"] >= 0:
        return [c for c in configs if c.num_warps >= 4]
    if not (a["TMA"] and a["BT"] == 1 and a["HP"] <= 16):
        return [c for c in configs if c.num_warps >= 2]
    return [c for c in configs if c.num_warps != 2]  # as many candidates as elsewhere


_selected_fwd_tuned = C.autotuned(_selected_fwd, ['TUNE_T', 'HQ', 'G', 'DK', 'DV', 'SEL_L', 'N_SEL', 'BT', 'WRITE_LSE',
                                                  'CLAMP', 'SHARE', 'TMA', 'FORCED'], [1, 2, 4, 8], [1, 2, 3],
                                prune=_prune)

# A shared tile of BT positions costs about 1.4x a one-position tile per block step at h = 16
# (H100, prefill_slc_tile_ab_h100.json: 64 rows against 16), so it pays when its walk has at
# most ~0.7 of the BT * n steps that BT one-position tiles take.
SHARE_FRACTION = 0.7
# The split launch is off by default: on an H100 (prefill_slc_split2_h100.json, paper geometry)
# it took the forward at 8k from 3.56 to 2.89 ms on realistic inputs (random: unchanged) and at
# 64k from 49.8 to 44.4, but from 52.8 to 58.9 on random inputs at 64k, and its dq made the
# training step slower (13.9 -> 14.7 ms at 8k, realistic inputs).
SPLIT = False

TMA = True
"""Whether one-position tiles load their blocks through tensor descriptors (:func:`use_tma`)."""


def use_tma(q, k, v, BT: int, BK0: int, BK1: int, BV: int) -> bool:
    """Whether a slc kernel's one-position tiles (BT = 1) read each selected block's keys and
    values through tensor descriptors (TMA boxes of ``[l', Dk]`` and ``[l', Dv]``:
    :func:`nsa.triton._common.kv_descriptors`): :data:`TMA` and :func:`nsa.triton._common.tma_ok`."""
    return TMA and BT == 1 and C.tma_ok(q, k, v, BK0, BK1, BV)


def share_split(h: int, n: int) -> tuple[int, int] | None:
    """(BT, SHARE) of the split launch for groups of h heads selecting n blocks: tiles of BT
    positions (64 rows) that walk their distinct blocks when there are at most SHARE of them,
    one position a tile elsewhere; None where it is off (:data:`SPLIT`), where tiles already
    hold several positions (h < 16) or where one position fills 64 rows (h > 32)."""
    HP = C.next_pow2(h)
    if not SPLIT or not 16 <= HP <= 32:
        return None
    bt = 64 // HP
    return bt, int(SHARE_FRACTION * bt * n)


FORCED = False
"""Whether one-position tiles leave their forced blocks to :func:`_forced_fwd` where the caller
says the lists hold them (``forced=True``; nsa_func's own selection does). Off until
``benchmarks/slc_forced.py`` has timed it on a GPU; the CPU tests run it."""


def use_forced(h: int, BT: int, split) -> bool:
    """Whether the forced blocks go through :func:`_forced_fwd`: one position a tile (h >= 16),
    no split launch (whose shared tiles walk every block they list)."""
    return FORCED and BT == 1 and split is None and h >= 16


def forced_config(h: int, interp: bool) -> dict:
    """The forced-block tiles: 128 rows of (position, head) on a GPU (8 positions at h = 16)."""
    HP, BT, _ = C.rows_for(h, 64 if interp else 128)
    return dict(HP=HP, BT=BT, num_warps=4 if interp else 8, num_stages=1)


def forced_attention(q, k_slc, v_slc, seq, lens, scale: float, q_offset: int, common: dict, descs):
    """:func:`_forced_fwd` over every position: (of fp32 ``[B, T, HQ, Dv]``, lsef fp32
    ``[B, T, HQ]``, base 2 in units of the scaled score). descs: the one-position tiles'
    (KD0, KD1, VD) (:func:`nsa.triton._common.kv_descriptors`), or None for pointer loads."""
    B, T, HQ, _ = q.shape
    H = k_slc.shape[2]
    of = torch.empty(B, T, HQ, common["DV"], dtype=torch.float32, device=q.device)
    lsef = torch.empty(B, T, HQ, dtype=torch.float32, device=q.device)
    cfg = forced_config(HQ // H, C.interpreting())
    tbl = C.prog_table(lens, cfg["BT"], q.device)
    _forced_fwd[(tbl.shape[0], H)](q, k_slc, v_slc, *(descs or (q, q, q)), of, lsef, tbl, seq, float(scale),
                                   int(q_offset), TMA=descs is not None, **common, **cfg)
    return of, lsef


def _config(h: int, Dk: int, Dv: int, interp: bool) -> dict:
    HP, BT, _ = C.rows_for(h, 16)
    if interp:
        return dict(HP=HP, BT=BT, num_warps=4, num_stages=1)
    rows = BT * HP
    return dict(HP=HP, BT=BT, num_warps=1 if rows <= 16 else (2 if rows <= 32 else 4), num_stages=3)


def selected_attention_triton(q, k_slc, v_slc, block_indices, *, sel_block=64, scale=None,
                              cu_seqlens=None, q_offset=0, return_lse=False, forced=False):
    """Branch slc: o [B, T, HQ, Dv] in q's dtype, forward only (with ``return_lse``:
    (o, lse [B, T, HQ] fp32 natural log), the lse the backward reuses).

    q ``[B, T, HQ, Dk]`` at positions ``q_offset + i``; k_slc ``[B, Tk, H, Dk]`` and v_slc
    ``[B, Tk, H, Dv]`` from position 0; block_indices ``[B, T, H, n]`` (-1 entries ignored).
    Query t attends to every key u <= t of its group's blocks. Defaults: l' = 64,
    scale = 1/sqrt(Dk).

    At 16-32 heads a group the launch is split (:func:`share_split`): tiles of several
    positions whose lists share enough blocks go first, the other positions one a tile.
    ``forced``: every list holds its position's forced blocks (block 0, t // l' and the one
    before it; the selection's semantics), so that where one position is a tile (h >= 16, no
    split) :func:`_forced_fwd` attends those for several positions at once (:func:`use_forced`).
    """
    q, k_slc, v_slc = q.contiguous(), k_slc.contiguous(), v_slc.contiguous()
    block_indices = block_indices.contiguous()
    B, T, HQ, Dk = q.shape
    H, Dv, n = k_slc.shape[2], v_slc.shape[3], block_indices.shape[-1]
    o = torch.empty(B, T, HQ, Dv, dtype=q.dtype, device=q.device)
    lse = torch.empty(B, T, HQ, dtype=torch.float32, device=q.device) if return_lse else None
    if B * T == 0:
        return (o, lse) if return_lse else o
    seq, lens = C.seq_table(B, T, k_slc.shape[1], 0, 0, cu_seqlens, 1, 1, q.device)
    cfg = _config(HQ // H, Dk, Dv, C.interpreting())
    BK0, BK1 = C.split_dim(Dk)
    BV = max(16, C.next_pow2(Dv))
    BS = max(16, C.next_pow2(sel_block))
    split = share_split(HQ // H, n) if k_slc.shape[1] > 0 else None
    flags = torch.empty(B * T, H, dtype=torch.int8, device=q.device) if split else o
    common = dict(HQ=HQ, G=HQ // H, DK=Dk, DV=Dv, SEL_L=sel_block, BS=BS, BK0=BK0, BK1=BK1, BV=BV,
                  PREC=C.dot_precision(q.dtype), UPCAST=C.upcast(q.dtype))
    of = lsef = o  # stand-ins, never read
    # one-position tiles read their blocks through descriptors: the slc kernel's and the forced blocks'
    descs1 = C.kv_descriptors(k_slc, v_slc, BS, BK0, BK1, BV) if use_tma(q, k_slc, v_slc, 1, BK0, BK1, BV) else None
    use_f = forced and use_forced(HQ // H, cfg["BT"], split) and k_slc.shape[1] > 0
    if use_f:
        of, lsef = forced_attention(q, k_slc, v_slc, seq, lens, default_scale(scale, Dk), q_offset, common, descs1)

    def launch(BT, share, skip):
        # one position per tile: K/V rows clamped into the sequence (no row masks); with several,
        # a block's repeats must load nothing
        clamp = BT == 1 and k_slc.shape[1] > 0
        tma = descs1 is not None and BT == 1
        descs = descs1 if tma else (q, q, q)
        tbl = C.prog_table(lens, BT, q.device)
        fixed = dict(num_warps=cfg['num_warps'], num_stages=cfg['num_stages']) if C.interpreting() else {}
        _selected_fwd_tuned[(tbl.shape[0], H)](
            q, k_slc, v_slc, *descs, o, lse if return_lse else o, of, lsef, block_indices, flags, tbl, seq,
            C.next_pow2(T), default_scale(scale, Dk), int(q_offset), N_SEL=n, NP=max(2, C.next_pow2(n)),
            HP=cfg["HP"], BT=BT, WRITE_LSE=return_lse, CLAMP=clamp, K0_FULL=clamp and BK0 <= Dk,
            V_FULL=clamp and BV == Dv, SHARE=share, SKIP=skip, TMA=tma, FORCED=use_f, **common, **fixed)

    if split:
        launch(split[0], split[1], False)
    launch(cfg["BT"], -1, split is not None)
    return (o, lse) if return_lse else o
