"""Branch win (semantics §6) in Triton: causal sliding-window attention, group-centric.

The kernel is :mod:`nsa.triton.band` in MODE 1; its reference is
:func:`nsa.reference.sliding_window_ref` (same signature). Needs no flash_attn package.
"""

from __future__ import annotations

from . import _common as C
from .band import band_attention, default_scale


def sliding_window_triton(q, k_win, v_win, *, window=512, scale=None, cu_seqlens=None, q_offset=0,
                          k_offset=0):
    """Branch win: o [B, T, HQ, Dv] in q's dtype, forward only.

    q ``[B, T, HQ, Dk]`` at positions ``q_offset + i``; k_win ``[B, Tk, H, Dk]``, v_win
    ``[B, Tk, H, Dv]`` at positions ``k_offset + j``. Query t attends to keys u in
    [max(0, t - w + 1), t]. Defaults: w = 512, scale = 1/sqrt(Dk).
    """
    q, k_win, v_win = q.contiguous(), k_win.contiguous(), v_win.contiguous()
    B, T = q.shape[:2]
    seq, lens = C.seq_table(B, T, 0, k_win.shape[1], 0, cu_seqlens, 1, 1, q.device)
    o, _ = band_attention(q, k_win, v_win, mode=1, scale=default_scale(scale, q.shape[-1]), seq=seq,
                          lens=lens, q_offset=q_offset, k_offset=k_offset, window=window)
    return o
