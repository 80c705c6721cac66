"""Block scoring and top-n selection (semantics §3-4) in one Triton pass, fused.

Per program: BT positions x the h heads of one group (BM rows), with the log-sum-exp of the
compressed branch as input. The program walks the selection blocks in chunks of BJE blocks.
For a chunk it recomputes the scores of the BC compressed tokens that touch those blocks
(``i0 = j0*l'/d - (l/d - 1)``, so every block of the chunk is complete inside it), turns
them into probabilities ``exp(s - lse)``, sums the group's heads (Eq. 10), maps them onto
blocks with the Eq. 9 overlap weights (exact fp32 products; W is built from indices) and merges
the chunk's blocks into a running top-n kept in registers. With one head a group the mapping
runs on tensor cores instead (``EQ9_DOT``: p in three bf16 pieces times the integer overlaps,
fp32 accumulation). No [T, Tc] or [T, n_sel_blocks] matrix is written.

Interior chunks (every token complete before the tile's first position and in the sequence,
every row a position of the sequence) run without the [BM, BC] visibility mask and the key
loads' masks: a third fewer instructions in the loop (sm_90 SASS) and, with 64-row tiles for
groups of 4+ heads, the paper geometry's select at 64k from 18.3 to 14.5 ms on an H100
(`benchmarks/select_parts.py`, select_parts_h100.json), and to 12.2 ms with the Eq. 9 mapping
reduced within a warp's lanes. The first chunk (tokens before 0) and the last ones keep the
masks.

Top-n: each block becomes one int64 key ``(bits(score) + 1) << 32 | (2^31 - 1 - j)``; scores
are >= 0, so the float bits order like the floats, and equal scores order the lower j first.
Forced blocks get score +inf, blocks that are not eligible get key 0. The running list keeps
the NB = next_pow2(n) best keys, sorted descending. A chunk's BJ keys are cut to their NB best
(:func:`_chunk_top`: sorts of NB keys and bitonic halvings, not a sort of BJ); that list,
ascending, and the running one merge by one elementwise max (the bitonic merge step), then one
bitonic merge (log2 NB steps) re-sorts it. With l = l' = d (fla's geometry: BJ = 64 blocks a
chunk) this took select from 11.2 to 9.0 ms at 64k on the H200, against sorting all 64 keys and
keeping the best 64; merging every chunk instead of testing first whether any key beats a row's
n-th best took it to 6.9 ms. Reference: :func:`nsa.reference.select_blocks_ref`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import _common as C
from ._common import LOG2E
from .band import default_scale


@triton.jit
def _sort_rows(x, descending: tl.constexpr, INTERP: tl.constexpr):
    """Sort a [R, N] tensor along dim 1 (R, N powers of two).

    On GPUs this is tl.sort. Under the CPU interpreter tl.sort's xor reduction runs element
    by element in Python (minutes per test), so there the same bitonic network runs with
    each compare-and-swap as a min/max over a size-2 axis of the hypercube view; the result
    is the same sorted tensor.
    """
    if INTERP:
        log_n: tl.constexpr = tl.standard._log2(x.shape[1])
        n_dims: tl.constexpr = tl.standard._log2(x.numel)
        h = tl.reshape(x, [2] * n_dims)
        for stage in tl.static_range(1, log_n + 1):
            if stage < log_n:  # alternating directions, by bit `stage` of the position
                flip = tl.reshape(tl.arange(0, 2), [1] * (n_dims - stage - 1) + [2] + [1] * stage)
            else:
                flip = descending
            for i in tl.static_range(stage):  # bit stage - 1 - i of the position
                lo = tl.reduce(h, n_dims - stage + i, tl.standard._elementwise_min, keep_dims=True)
                hi = tl.reduce(h, n_dims - stage + i, tl.standard._elementwise_max, keep_dims=True)
                right = tl.reshape(tl.arange(0, 2), [1] * (n_dims - stage + i) + [2] + [1] * (stage - 1 - i))
                h = tl.where((flip ^ right) != 0, hi, lo)
        return tl.reshape(h, x.shape)
    else:
        return tl.sort(x, 1, descending=descending)


@triton.jit
def _bitonic_merge_rows(x, descending: tl.constexpr):
    """Sort each row of a [R, N] tensor whose rows are bitonic (log2 N compare-and-swap steps),
    each step a min/max over a size-2 axis of the hypercube view."""
    log_n: tl.constexpr = tl.standard._log2(x.shape[1])
    n_dims: tl.constexpr = tl.standard._log2(x.numel)
    h = tl.reshape(x, [2] * n_dims)
    for i in tl.static_range(log_n):  # bit log_n - 1 - i of the position: axis n_dims - log_n + i
        lo = tl.reduce(h, n_dims - log_n + i, tl.standard._elementwise_min, keep_dims=True)
        hi = tl.reduce(h, n_dims - log_n + i, tl.standard._elementwise_max, keep_dims=True)
        right = tl.reshape(tl.arange(0, 2), [1] * (n_dims - log_n + i) + [2] + [1] * (log_n - 1 - i))
        h = tl.where((right ^ descending) != 0, hi, lo)
    return tl.reshape(h, x.shape)


@triton.jit
def _flip_odd(x, M: tl.constexpr):
    """x [R, M, N] int64 with its odd rows of axis 1 bitwise negated: ~ reverses the order of
    int64, so an ascending sort or merge of those rows leaves them descending once negated back."""
    if M > 1:
        m = tl.arange(0, M)[None, :, None]
        x = tl.where((m % 2) == 1, ~x, x)
    return x


@triton.jit
def _chunk_top(key, NB: tl.constexpr, INTERP: tl.constexpr):
    """[R, NB]: the NB largest keys of each row of key [R, BJ] (BJ = NB * 2^k), ascending.

    Instead of sorting BJ keys (log2(BJ) (log2(BJ) + 1) / 2 steps over all of them), sorts
    BJ/NB rows of NB, alternately ascending and descending, then halves the rows log2(BJ/NB)
    times: the elementwise max of an ascending and a descending row is a bitonic row holding
    the NB largest of both, and one bitonic merge sorts it.
    """
    R: tl.constexpr = key.shape[0]
    M: tl.constexpr = key.shape[1] // NB
    tl.static_assert(M <= 8, "at most 8 rows of NB keys")
    if M == 1:
        top = _sort_rows(key, False, INTERP)
    else:
        x = _flip_odd(tl.reshape(key, [R, M, NB]), M)
        x = _flip_odd(tl.reshape(_sort_rows(tl.reshape(x, [R * M, NB]), False, INTERP), [R, M, NB]), M)
        x = _halve(x, R, M, NB)
        if M >= 4:
            x = _halve(x, R, M // 2, NB)
        if M == 8:
            x = _halve(x, R, M // 4, NB)
        top = tl.reshape(x, [R, NB])
    return top


@triton.jit
def _halve(x, R: tl.constexpr, M: tl.constexpr, NB: tl.constexpr):
    """[R, M, NB] rows alternately ascending and descending -> [R, M/2, NB], the NB largest of
    each pair, again alternately ascending and descending (ascending when M/2 = 1)."""
    x = _flip_odd(tl.max(tl.reshape(x, [R, M // 2, 2, NB]), 2), M // 2)  # bitonic rows
    x = tl.reshape(_bitonic_merge_rows(tl.reshape(x, [R * (M // 2), NB]), False), [R, M // 2, NB])
    return _flip_odd(x, M // 2)


@triton.jit
def _merge_chunk(best, q0, q1, KC, KD0, KD1, c_start, c_len, g, j0, lse, pos, row_ok, posp, cur, ovb, w, qk_scale, H,
                 DK: tl.constexpr, A: tl.constexpr, CM1: tl.constexpr, CMP_L: tl.constexpr, CMP_D: tl.constexpr,
                 SEL_L: tl.constexpr, HP: tl.constexpr, BT: tl.constexpr, BC: tl.constexpr, BJ: tl.constexpr,
                 NB: tl.constexpr, BJE: tl.constexpr, BK0: tl.constexpr, BK1: tl.constexpr, PREC: tl.constexpr,
                 INTERP: tl.constexpr, UPCAST: tl.constexpr, EQ9_DOT: tl.constexpr, MASKED: tl.constexpr,
                 TMA: tl.constexpr):
    """One chunk of selection blocks from j0 on: its scores, their group sum and Eq. 9 mapping,
    merged into the running top list ``best`` [BT, NB] (returned). MASKED: rows, tokens and
    visibility masked; otherwise the chunk is interior (every row sees every token). TMA: the
    chunk's compressed keys through the descriptors KD0, KD1 (rows before 0 or past the tensor
    read zeros, other sequences' rows are masked as i_ok says)."""
    ci = tl.arange(0, BC)
    cj = tl.arange(0, BJ)
    dk0 = tl.arange(0, BK0)
    dk1 = BK0 + tl.arange(0, BK1 if BK1 > 0 else 16)  # unused when BK1 = 0
    i = j0 * A - CM1 + ci  # compressed tokens of this chunk
    i_ok = (i >= 0) & (i < c_len)
    KCb = KC + ((c_start + j0 * A - CM1).to(tl.int64) * H + g) * DK  # may point before row 0: masked
    # interior chunks: every token is in the sequence, the loads need no mask
    krow = (c_start + j0 * A - CM1).to(tl.int32)
    if TMA:
        k0 = KD0.load([krow, g * DK])
    else:
        k0 = C.load_tile(KCb + ci[:, None] * (H * DK) + dk0[None, :], i_ok[:, None], not MASKED)
    if UPCAST:  # the CPU interpreter's bf16 dot is wrong (triton 3.9)
        k0 = k0.to(tl.float32)
    s = tl.dot(q0, tl.trans(k0), input_precision=PREC)
    if BK1 > 0:
        if TMA:
            k1 = KD1.load([krow, g * DK + BK0])
        else:
            # columns past DK (Dk = 40: 32 + 16) would read the next row, or past the tensor's end
            k1 = C.load_tile(KCb + ci[:, None] * (H * DK) + dk1[None, :], i_ok[:, None] & (dk1[None, :] < DK),
                             (not MASKED) and BK0 + BK1 == DK)
        if UPCAST:  # the CPU interpreter's bf16 dot is wrong (triton 3.9)
            k1 = k1.to(tl.float32)
        s += tl.dot(q1, tl.trans(k1), input_precision=PREC)
    if MASKED:
        vis = i_ok[None, :] & ((i[None, :] * CMP_D + CMP_L - 1) <= pos[:, None]) & row_ok[:, None]
        p = tl.where(vis, tl.exp2(s * qk_scale - lse[:, None]), 0.0)  # [BM, BC]
    else:  # an interior chunk: every row sees every token
        p = tl.exp2(s * qk_scale - lse[:, None])
    j = j0 + cj
    if EQ9_DOT:
        # Eq. 9 before Eq. 10, on tensor cores: p = p1 + p2 + p3 in bf16 pieces holds p's 24
        # bits, each piece times the integer overlaps is exact, accumulated in fp32; then the
        # group's sum runs over [BM, BJ] instead of [BM, BC]
        p1 = p.to(tl.bfloat16)
        r1 = p - p1.to(tl.float32)
        p2 = r1.to(tl.bfloat16)
        p3 = (r1 - p2.to(tl.float32)).to(tl.bfloat16)
        if INTERP:
            p1, p2, p3 = p1.to(tl.float32), p2.to(tl.float32), p3.to(tl.float32)
        # bf16 operands (tf32 is what the flag says for them); the interpreter's fp32 pieces
        # and overlaps are bf16 values, which tf32 holds exactly
        sm = tl.dot(p1, ovb, input_precision="tf32")
        sm = tl.dot(p2, ovb, sm, input_precision="tf32")
        sm = tl.dot(p3, ovb, sm, input_precision="tf32")  # [BM, BJ]
        sc = tl.sum(tl.reshape(sm, [BT, HP, BJ]), 1) * (1.0 / CMP_D)
    else:
        pg = tl.sum(tl.reshape(p, [BT, HP, BC]), 1)  # Eq. 10 first: sum over the group's heads
        # Eq. 9: [BT, BJ] in fp32 with exact products. From 16 rows on, triton's combine pass
        # turns sum(pg[:, :, None] * w[None], 1) into a dot of its own, with tf32 operands up
        # to triton 3.6 (triton-lang/triton#9831): pg lost 13 mantissa bits and 0.3-2% of rows
        # took another block. So there the dot is explicit and IEEE (CUDA-core FMAs); below 16
        # rows (tl.dot's minimum) the pattern does not match and the broadcast product stays.
        if BT >= 16:
            sc = tl.dot(pg, w, input_precision="ieee")
        elif BT * HP <= 64:  # reduced over the last axis: the tokens lie in one warp's lanes, no
            # shared-memory round trip or barrier (H100, paper geometry at 64k: 14.6 -> 12.2 ms)
            sc = tl.sum(pg[:, None, :] * tl.trans(w)[None, :, :], 2)
        else:  # 128 rows: the form above spills (fla's geometry 5.6 -> 7.7 ms)
            sc = tl.sum(pg[:, :, None] * w[None, :, :], 1)
    forced = (j[None, :] == 0) | (j[None, :] == cur[:, None]) | (j[None, :] == cur[:, None] - 1)
    sc = tl.where(forced, float("inf"), sc)
    elig = (cj[None, :] < BJE) & (j[None, :] * SEL_L <= posp[:, None])
    bits = (sc.to(tl.int32, bitcast=True) & 0x7FFFFFFF).to(tl.int64)
    key = tl.where(elig, ((bits + 1) << 32) | (0x7FFFFFFF - j[None, :]).to(tl.int64), 0)
    # every chunk merges: skipping chunks whose keys all fall below the rows' n-th best
    # (a tile-wide test and branch) measured slower on the H200 (fla geometry 9.0 vs 6.9 ms)
    top = _chunk_top(key, NB, INTERP)  # the chunk's NB best, ascending
    # max(descending, ascending) holds the top NB of both as a bitonic sequence: one merge
    # sorts it
    best = _bitonic_merge_rows(tl.maximum(best, top), True)
    return best


@triton.jit
def _select_fwd(Q, KC, KD0, KD1, LSE, OUT, TBL, SEQ, TUNE_T, sm_scale, q_offset,
                HQ: tl.constexpr, G: tl.constexpr, DK: tl.constexpr,
                CMP_L: tl.constexpr, CMP_D: tl.constexpr, SEL_L: tl.constexpr, N_SEL: tl.constexpr,
                HP: tl.constexpr, BT: tl.constexpr, BC: tl.constexpr, BJ: tl.constexpr, NB: tl.constexpr,
                BJE: tl.constexpr, BK0: tl.constexpr, BK1: tl.constexpr, PREC: tl.constexpr,
                INTERP: tl.constexpr, UPCAST: tl.constexpr, EQ9_DOT: tl.constexpr, TMA: tl.constexpr):
    """TMA: the compressed keys through the descriptors KD0, KD1 (:func:`_merge_chunk`)."""
    BM: tl.constexpr = BT * HP
    A: tl.constexpr = SEL_L // CMP_D  # compressed-token starts per selection block
    CM1: tl.constexpr = CMP_L // CMP_D - 1  # compressed tokens reaching into the next block
    pid = tl.program_id(0)
    g = tl.program_id(1)
    H = HQ // G
    t0, q_start, q_len, c_start, c_len = C.program_rows(TBL, SEQ, pid, 6)  # compressed keys

    tq, row_ok, pos, row0, rel = C.tile_rows(t0, g, q_start, q_len, q_offset, HQ, G, HP, BM)
    q_row = rel * DK
    Qb = Q + row0 * DK
    q0 = C.load_cols(Qb, q_row, row_ok, 0, BK0, DK, UPCAST)  # [BM, BK0]
    q1 = q0
    if BK1 > 0:
        q1 = C.load_cols(Qb, q_row, row_ok, BK0, BK1, DK, UPCAST)  # [BM, BK1]
    qk_scale = sm_scale * LOG2E
    lse = tl.load(LSE + row0 + rel, mask=row_ok, other=0.0) * LOG2E

    # per-position view of the tile: [BT]
    tp = t0 + tl.arange(0, BT)
    posp = q_offset + tp
    cur = posp // SEL_L
    t_hi = q_offset + tl.minimum(t0 + BT, q_len) - 1
    n_blocks = (t_hi // SEL_L + 1).to(tl.int32)  # eligible blocks of the tile's last position

    ci = tl.arange(0, BC)
    cj = tl.arange(0, BJ)
    cb = tl.arange(0, NB)
    best = tl.zeros([BT, NB], dtype=tl.int64)  # running top NB keys, sorted descending
    # Eq. 9 overlaps of [i*d, i*d+l) with [j*l', (j+1)*l'): the same [BC, BJ] for every chunk
    # (i and j shift together by j0 * l'/d and j0)
    lo0 = tl.maximum((ci[:, None] - CM1) * CMP_D, cj[None, :] * SEL_L)
    hi0 = tl.minimum((ci[:, None] - CM1) * CMP_D + CMP_L, cj[None, :] * SEL_L + SEL_L)
    ov = tl.maximum(hi0 - lo0, 0)  # [BC, BJ] int
    w = ov.to(tl.float32) * (1.0 / CMP_D)  # [BC, BJ] Eq. 9 weights
    ovb = w
    if EQ9_DOT:
        if INTERP:  # the CPU interpreter's bf16 dot is wrong (triton 3.9): the pieces go in as fp32
            ovb = ov.to(tl.float32)
        else:
            ovb = ov.to(tl.bfloat16)  # integers <= 256: exact
    # Chunks [j_a, j_b) are interior: every token of the chunk is in the sequence and complete
    # before the tile's first position, and every row is a position of the sequence, so their
    # scores need no [BM, BC] visibility mask (its index arithmetic was a third of the loop's
    # instructions); the first chunk (tokens before 0) and the last ones are masked.
    J_A: tl.constexpr = ((CM1 + A - 1) // A + BJE - 1) // BJE * BJE  # first chunk with no token before 0
    full = (t0 + BT <= q_len) & (HP == G)
    # the last token complete at the tile's first position, and in the sequence (divisions of
    # non-negative ints only: triton's // truncates)
    i_end = tl.minimum((tl.maximum(q_offset + t0 - CMP_L + 1, 0)) // CMP_D, c_len - 1)
    interior = full & (q_offset + t0 >= CMP_L - 1) & (i_end >= J_A * A - CM1 + BC - 1)
    n_int = tl.where(interior, ((i_end + CM1 - BC + 1) // A - J_A) // BJE + 1, 0)  # interior chunks
    j_b = tl.minimum(J_A + n_int * BJE, n_blocks).to(tl.int32)
    j_a = tl.minimum(J_A, j_b)
    for j0 in range(0, j_a, BJE):
        best = _merge_chunk(best, q0, q1, KC, KD0, KD1, c_start, c_len, g, j0, lse, pos, row_ok, posp, cur, ovb, w,
                            qk_scale, H, DK, A, CM1, CMP_L, CMP_D, SEL_L, HP, BT, BC, BJ, NB, BJE, BK0, BK1, PREC,
                            INTERP, UPCAST, EQ9_DOT, True, TMA)
    for j0 in range(j_a, j_b, BJE):
        best = _merge_chunk(best, q0, q1, KC, KD0, KD1, c_start, c_len, g, j0, lse, pos, row_ok, posp, cur, ovb, w,
                            qk_scale, H, DK, A, CM1, CMP_L, CMP_D, SEL_L, HP, BT, BC, BJ, NB, BJE, BK0, BK1, PREC,
                            INTERP, UPCAST, EQ9_DOT, False, TMA)
    for j0 in range(j_b, n_blocks, BJE):
        best = _merge_chunk(best, q0, q1, KC, KD0, KD1, c_start, c_len, g, j0, lse, pos, row_ok, posp, cur, ovb, w,
                            qk_scale, H, DK, A, CM1, CMP_L, CMP_D, SEL_L, HP, BT, BC, BJ, NB, BJE, BK0, BK1, PREC,
                            INTERP, UPCAST, EQ9_DOT, True, TMA)

    # the first N_SEL keys are I_t; emit their blocks ascending, -1 padded
    BIG: tl.constexpr = 0x7FFFFFFF
    take = (cb[None, :] < N_SEL) & (best > 0)
    blk = tl.where(take, BIG - (best & 0xFFFFFFFF), BIG)
    blk = _sort_rows(blk, False, INTERP)
    blk = tl.where(blk == BIG, -1, blk)
    out_off = ((q_start + tp).to(tl.int64) * H + g) * N_SEL
    tl.store(OUT + out_off[:, None] + cb[None, :], blk, mask=(tp[:, None] < q_len) & (cb[None, :] < N_SEL))



def _prune(configs, named_args, **kwargs):
    """Groups of 1-2 heads (64-128 positions a tile) spill at 4 warps (sm_90 compile: 24-560
    bytes a thread, tests/test_spills.py): they tune over 8 warps only. 64-row tiles tune over 4
    warps only: 8 took twice as long (H100, paper geometry at 64k: 34.9 against 16.1 ms,
    select_parts_h100.json), and each config is a compile on the first call."""
    args = {**named_args, **kwargs}
    if args["G"] <= 2:
        return [c for c in configs if c.num_warps == 8]
    if args["BT"] * args["HP"] <= 64:
        return [c for c in configs if c.num_warps == 4]
    return configs


_select_fwd_tuned = C.autotuned(_select_fwd, ['TUNE_T', 'HQ', 'G', 'DK', 'CMP_L', 'CMP_D', 'SEL_L', 'N_SEL', 'TMA'],
                                [4, 8], [1, 2, 3], prune=_prune)

TMA = True
"""Whether the selection kernel reads its chunks of compressed keys through tensor descriptors
where :func:`nsa.triton._common.tma_ok` allows. H200, paper configuration (tma_ab_h200.json):
0.302 -> 0.273 ms at 8k, 12.5-12.9 -> 12.0-12.1 at 64k, the same blocks."""


def _config(h: int, n: int, cmp_block: int, cmp_stride: int, sel_block: int, interp: bool) -> dict:
    a, cm1 = sel_block // cmp_stride, cmp_block // cmp_stride - 1
    # 128 rows of the group's own heads, no padded heads: small groups get more positions per
    # tile (h = 1: 128), so the QK recompute does no masked work. (Tiles of 16+ positions used to
    # pick wrong blocks on GPUs: the tf32 Eq. 9 mapping, see _select_fwd.)
    # The interpreter pays per op, not per element: big tiles, few chunks.
    BC = max(64, C.next_pow2(a + cm1))
    BJE = (BC - cm1) // a
    BJ = max(16, C.next_pow2(BJE), C.next_pow2(n))
    # 64 rows for groups of 4+ heads with few blocks a chunk (the paper's 15): 3 CTAs an SM instead
    # of 2 (H100, paper geometry at 64k: 15.8 -> 14.5 ms; 4 heads 5.3 -> 5.2); 128 rows for fla's
    # 64 blocks a chunk (5.6 against 5.8 ms) and for 1-2 heads (select_parts_h100.json)
    rows = 64 if C.next_pow2(h) >= 4 and BJ <= 16 else 128
    HP, BT, _ = C.rows_for(h, 256 if interp else rows)
    # Eq. 9 on tensor cores (the overlaps, integers <= min(l, l'), exact in bf16) pays with one
    # head a group, where no head sum follows: H200, paper geometry at 64k, select 3.6 -> 2.3 ms
    # at h = 1, but 18.5 -> 20.9 at h = 16, 5.9 -> 7.6 at h = 4 and 5.8 -> 11.6 with l = l' = d
    eq9_dot = HP == 1 and min(cmp_block, sel_block) <= 256
    return dict(HP=HP, BT=BT, BC=BC, BJ=BJ, NB=max(C.next_pow2(n), BJ // 8), BJE=BJE, EQ9_DOT=eq9_dot,
                num_warps=8, num_stages=2)


def select_blocks_triton(q, k_cmp, *, cmp_block=32, cmp_stride=16, sel_block=64, sel_count=16,
                         scale=None, cu_seqlens=None, q_offset=0, lse=None):
    """Top-n block indices [B, T, H, n] int64, ascending, -1 padded (semantics §3-4); forward only.

    Same contract as :func:`nsa.reference.select_blocks_ref`. ``lse`` ([B, T, HQ] fp32, the
    compressed branch's log-sum-exp) is computed here when not given.
    Scores are fp32 (exact overlap weights), so indices equal the reference's away from
    near-ties.
    """
    from .compressed import compressed_attention_triton

    q, k_cmp = q.contiguous(), k_cmp.contiguous()
    B, T, HQ, Dk = q.shape
    H = k_cmp.shape[2]
    out = torch.empty(B, T, H, sel_count, dtype=torch.int64, device=q.device)
    if B * T == 0:
        return out
    if lse is None:
        # lse only: values are never read, so pass the keys as values (Dv = Dk)
        _, lse = compressed_attention_triton(q, k_cmp, k_cmp, cmp_block=cmp_block, cmp_stride=cmp_stride,
                                             scale=scale, cu_seqlens=cu_seqlens, q_offset=q_offset)
    seq, lens = C.seq_table(B, T, 0, 0, k_cmp.shape[1], cu_seqlens, cmp_block, cmp_stride, q.device)
    cfg = _config(HQ // H, sel_count, cmp_block, cmp_stride, sel_block, C.interpreting())
    tbl = C.prog_table(lens, cfg["BT"], q.device)
    BK0, BK1 = C.split_dim(Dk)
    launch = dict(num_warps=cfg['num_warps'], num_stages=cfg['num_stages']) if C.interpreting() else {}
    tma = TMA and C.tma_ok(q, k_cmp, k_cmp, BK0, BK1, Dk)
    descs = C.kv_descriptors(k_cmp, None, cfg["BC"], BK0, BK1, BK0)[:2] if tma else (q, q)
    _select_fwd_tuned[(tbl.shape[0], H)](
        q, k_cmp if k_cmp.numel() else q, *descs, lse, out, tbl, seq, C.next_pow2(T), default_scale(scale, Dk),
        int(q_offset),
        HQ=HQ, G=HQ // H, DK=Dk, CMP_L=cmp_block, CMP_D=cmp_stride, SEL_L=sel_block, N_SEL=sel_count,
        HP=cfg["HP"], BT=cfg["BT"], BC=cfg["BC"], BJ=cfg["BJ"], NB=cfg["NB"], BJE=cfg["BJE"],
        EQ9_DOT=cfg["EQ9_DOT"], BK0=BK0, BK1=BK1,
        PREC=C.dot_precision(q.dtype), UPCAST=C.upcast(q.dtype), INTERP=C.interpreting(), TMA=tma, **launch)
    return out
