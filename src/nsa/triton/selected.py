"""Branch slc (SPEC 5) in Triton: attention over each query's selected key blocks, group-centric.

As the paper's Figure 3: a program holds the h query heads of one group at BT consecutive
positions (BM = BT * HP rows) and makes one pass over their selected blocks; each key/value
block it loads serves every head of the group. h is padded to a power of two HP inside the
kernel, and BT = 16 / HP positions fill the tensor-core minimum of 16 rows when h < 16, so
every h from 1 to 64 works. With BT > 1 the program walks the positions' lists in turn and
skips a block that an earlier position of the tile already selected: such a block is computed
once for every row that selected it (the local blocks always coincide).

Reference: :func:`nsa.reference.selected_attention_ref` (same signature).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import _common as C
from .band import default_scale


@triton.jit
def _attend(q0, q1, kb, vb, u, vis, m_i, l_i, acc, k_len, qk_scale, H, DK: tl.constexpr,
            DV: tl.constexpr, BK0: tl.constexpr, BK1: tl.constexpr, BV: tl.constexpr,
            PREC: tl.constexpr, UPCAST: tl.constexpr):
    """One online-softmax step over the keys at positions u ([N]; vis [BM, N] says who sees
    which). Rows are clamped into the sequence instead of masking the loads (the clamped
    columns are not visible), which keeps the loads unconditional."""
    uc = tl.minimum(tl.maximum(u, 0), k_len - 1).to(tl.int64)
    dk0 = tl.arange(0, BK0)
    kt0 = tl.load(kb + dk0[:, None] + uc[None, :] * (H * DK), mask=dk0[:, None] < DK, other=0.0)
    if UPCAST:  # the CPU interpreter's bf16 dot is wrong (triton 3.9)
        kt0 = kt0.to(tl.float32)
    s = tl.dot(q0, kt0, input_precision=PREC)
    if BK1 > 0:
        dk1 = BK0 + tl.arange(0, BK1)
        kt1 = tl.load(kb + dk1[:, None] + uc[None, :] * (H * DK), mask=dk1[:, None] < DK, other=0.0)
        if UPCAST:
            kt1 = kt1.to(tl.float32)
        s += tl.dot(q1, kt1, input_precision=PREC)
    s = tl.where(vis, s * qk_scale, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(s - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    dv = tl.arange(0, BV)
    v = tl.load(vb + uc[:, None] * (H * DV) + dv[None, :], mask=dv[None, :] < DV, other=0.0)
    if UPCAST:
        v = v.to(tl.float32)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PREC)
    return m_new, l_i, acc


@triton.jit
def _selected_fwd(Q, K, V, O, IDX, TBL, SEQ, TUNE_T, sm_scale, q_offset,
                  HQ: tl.constexpr, G: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr,
                  SEL_L: tl.constexpr, BS: tl.constexpr, N_SEL: tl.constexpr, NP: tl.constexpr,
                  HP: tl.constexpr, BT: tl.constexpr, KB: tl.constexpr, BK0: tl.constexpr, BK1: tl.constexpr,
                  BV: tl.constexpr, PREC: tl.constexpr, UPCAST: tl.constexpr):
    BM: tl.constexpr = BT * HP
    pid = tl.program_id(0)
    g = tl.program_id(1)
    H = HQ // G
    seq = tl.load(TBL + pid * 2)
    t0 = tl.load(TBL + pid * 2 + 1)
    q_start = tl.load(SEQ + seq * 8 + 0)
    q_len = tl.load(SEQ + seq * 8 + 1)
    k_start = tl.load(SEQ + seq * 8 + 2)
    k_len = tl.load(SEQ + seq * 8 + 3)

    r = tl.arange(0, BM)
    tq = t0 + r // HP
    hh = r % HP
    row_ok = (tq < q_len) & (hh < G)
    pos = q_offset + tq
    head = g * G + hh
    row0 = (q_start + t0).to(tl.int64) * HQ  # 64-bit scalar base, 32-bit offsets in the tile
    rel = (r // HP) * HQ + head
    q_row = rel * DK
    Qb = Q + row0 * DK
    dk0 = tl.arange(0, BK0)
    q0 = tl.load(Qb + q_row[:, None] + dk0[None, :], mask=row_ok[:, None] & (dk0[None, :] < DK), other=0.0)
    if UPCAST:  # the CPU interpreter's bf16 dot is wrong (triton 3.9)
        q0 = q0.to(tl.float32)
    if BK1 > 0:
        dk1 = BK0 + tl.arange(0, BK1)
        q1 = tl.load(Qb + q_row[:, None] + dk1[None, :], mask=row_ok[:, None] & (dk1[None, :] < DK), other=0.0)
        if UPCAST:  # the CPU interpreter's bf16 dot is wrong (triton 3.9)
            q1 = q1.to(tl.float32)
    else:
        q1 = q0  # unused: no second Dk chunk
    dv = tl.arange(0, BV)
    qk_scale = sm_scale * 1.4426950408889634
    ar = tl.arange(0, BS)  # BS = l' rounded up to a power of two >= 16 (the dot minimum)

    if BT > 1:
        # the tile's block lists [BT, NP] (-1: none), to find blocks shared between positions
        tp = t0 + tl.arange(0, BT)
        cs = tl.arange(0, NP)
        idx_off = ((q_start + tp).to(tl.int64) * H + g) * N_SEL
        lists = tl.load(IDX + idx_off[:, None] + cs[None, :],
                        mask=(tp[:, None] < q_len) & (cs[None, :] < N_SEL), other=-1).to(tl.int32)
        prow = tl.arange(0, BT)

    m_i = tl.full([BM], -1.0e30, dtype=tl.float32)
    l_i = tl.zeros([BM], dtype=tl.float32)
    acc = tl.zeros([BM, BV], dtype=tl.float32)
    kb = K + (k_start.to(tl.int64) * H + g) * DK
    vb = V + (k_start.to(tl.int64) * H + g) * DV
    if BT == 1:
        # one position: KB blocks per step ([Dk, KB*BS] key tile), so each step has KB blocks'
        # loads in flight and the dots are KB times wider
        cols = tl.arange(0, KB * BS)
        crow = cols % BS
        idx_base = IDX + ((q_start + t0).to(tl.int64) * H + g) * N_SEL
        for it in range(0, tl.cdiv(N_SEL, KB)):
            slot = it * KB + cols // BS
            blk = tl.load(idx_base + slot, mask=(slot < N_SEL) & (t0 + cols * 0 < q_len), other=-1).to(tl.int32)
            u = blk * SEL_L + crow  # key positions of each column
            u_ok = (crow < SEL_L) & (blk >= 0) & (u < k_len)
            vis = row_ok[:, None] & u_ok[None, :] & (u[None, :] <= pos[:, None])
            m_i, l_i, acc = _attend(q0, q1, kb, vb, u, vis, m_i, l_i, acc, k_len, qk_scale, H, DK, DV,
                                    BK0, BK1, BV, PREC, UPCAST)
    else:
        bcol = tl.arange(0, BS)
        for ps in range(0, BT * N_SEL):
            p_loc = ps // N_SEL
            slot = ps % N_SEL
            p_ok = t0 + p_loc < q_len
            blk = tl.load(IDX + ((q_start + t0 + p_loc).to(tl.int64) * H + g) * N_SEL + slot,
                          mask=p_ok, other=-1).to(tl.int32)
            # first occurrence in the tile only; rows whose position lists blk take part
            seen = tl.sum(tl.where((lists == blk) & (prow[:, None] < p_loc), 1, 0))
            has = tl.sum(tl.where(lists == blk, 1, 0), 1)  # [BT]
            sel = tl.reshape(tl.broadcast_to(has[:, None], [BT, HP]), [BM]) > 0
            blk = tl.where(seen == 0, blk, -1)
            u = blk * SEL_L + bcol
            u_ok = (bcol < SEL_L) & (blk >= 0) & (u < k_len)
            vis = sel[:, None] & u_ok[None, :] & (u[None, :] <= pos[:, None])
            m_i, l_i, acc = _attend(q0, q1, kb, vb, u, vis, m_i, l_i, acc, k_len, qk_scale, H, DK, DV,
                                    BK0, BK1, BV, PREC, UPCAST)

    o = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
    o_off = rel[:, None] * DV + dv[None, :]
    tl.store(O + row0 * DV + o_off, o.to(O.dtype.element_ty), mask=row_ok[:, None] & (dv[None, :] < DV))



_selected_fwd_tuned = C.autotuned(_selected_fwd, ['TUNE_T', 'HQ', 'G', 'DK', 'DV', 'SEL_L', 'N_SEL', 'BT', 'KB'], [4, 8], [1, 2, 3])

def _config(h: int, Dk: int, Dv: int, interp: bool) -> dict:
    HP, BT, _ = C.rows_for(h, 16)
    if interp:
        return dict(HP=HP, BT=BT, KB=2, num_warps=4, num_stages=1)
    # KB blocks per step when one position fills the tile; 2 keeps the key tile at 128 columns
    return dict(HP=HP, BT=BT, KB=2, num_warps=4, num_stages=2)


def selected_attention_triton(q, k_slc, v_slc, block_indices, *, sel_block=64, scale=None,
                              cu_seqlens=None, q_offset=0):
    """Branch slc: o [B, T, HQ, Dv] in q's dtype, forward only.

    q ``[B, T, HQ, Dk]`` at positions ``q_offset + i``; k_slc ``[B, Tk, H, Dk]`` and v_slc
    ``[B, Tk, H, Dv]`` from position 0; block_indices ``[B, T, H, n]`` (-1 entries ignored).
    Query t attends to every key u <= t of its group's blocks. Defaults: l' = 64,
    scale = 1/sqrt(Dk).
    """
    q, k_slc, v_slc = q.contiguous(), k_slc.contiguous(), v_slc.contiguous()
    block_indices = block_indices.contiguous()
    B, T, HQ, Dk = q.shape
    H, Dv, n = k_slc.shape[2], v_slc.shape[3], block_indices.shape[-1]
    o = torch.empty(B, T, HQ, Dv, dtype=q.dtype, device=q.device)
    if B * T == 0:
        return o
    seq, lens = C.seq_table(B, T, k_slc.shape[1], 0, 0, cu_seqlens, 1, 1, q.device)
    cfg = _config(HQ // H, Dk, Dv, C.interpreting())
    tbl = C.prog_table(lens, cfg["BT"], q.device)
    BK0, BK1 = C.split_dim(Dk)
    launch = dict(num_warps=cfg['num_warps'], num_stages=cfg['num_stages']) if C.interpreting() else {}
    _selected_fwd_tuned[(tbl.shape[0], H)](
        q, k_slc, v_slc, o, block_indices, tbl, seq, C.next_pow2(T), default_scale(scale, Dk), int(q_offset),
        HQ=HQ, G=HQ // H, DK=Dk, DV=Dv, SEL_L=sel_block, BS=max(16, C.next_pow2(sel_block)), N_SEL=n, NP=max(2, C.next_pow2(n)),
        HP=cfg["HP"], BT=cfg["BT"], KB=cfg["KB"], BK0=BK0, BK1=BK1, BV=max(16, C.next_pow2(Dv)),
        PREC=C.dot_precision(q.dtype), UPCAST=C.upcast(q.dtype), **launch)
    return o
