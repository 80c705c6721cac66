"""Branch cmp (semantics §2) in Triton: attention over the compressed tokens, with its log-sum-exp.

The kernel is the group-centric band kernel of :mod:`nsa.triton.band` in MODE 0; its reference
is :func:`nsa.reference.compressed_attention_ref` (same signature).
"""

from __future__ import annotations

from . import _common as C
from .band import band_attention, default_scale


def compressed_attention_triton(q, k_cmp, v_cmp, *, cmp_block=32, cmp_stride=16, scale=None,
                                cu_seqlens=None, q_offset=0):
    """Branch cmp: (o [B, T, HQ, Dv] in q's dtype, lse [B, T, HQ] fp32), forward only.

    q ``[B, T, HQ, Dk]`` at positions ``q_offset + i``; k_cmp ``[B, Tc, H, Dk]`` and v_cmp
    ``[B, Tc, H, Dv]`` (with ``cu_seqlens``: each sequence's Tc_i back to back, B == 1).
    Query t attends to compressed token i iff i*d + l - 1 <= t; a row that sees none gets
    o = 0 and lse = -inf. Defaults: l = 32, d = 16, scale = 1/sqrt(Dk).
    """
    q, k_cmp, v_cmp = q.contiguous(), k_cmp.contiguous(), v_cmp.contiguous()
    B, T = q.shape[:2]
    seq, lens = C.seq_table(B, T, 0, 0, k_cmp.shape[1], cu_seqlens, cmp_block, cmp_stride, q.device)
    return band_attention(q, k_cmp, v_cmp, mode=0, scale=default_scale(scale, q.shape[-1]), seq=seq,
                          lens=lens, q_offset=q_offset, cmp_block=cmp_block, cmp_stride=cmp_stride,
                          write_lse=True)
