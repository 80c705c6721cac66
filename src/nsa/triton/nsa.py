"""All of NSA in Triton (semantics §1-8): four launches, the gates fused into the last one.

1. cmp: compressed attention, o_cmp and its log-sum-exp: dense causal attention through cuDNN
   where :func:`.cmp_dense.use` holds, or for the long sequences of a packed batch
   (:func:`.cmp_dense.dense_spans`; :mod:`.cmp_dense`), else the band kernel (:mod:`.compressed`).
2. select: scores + top-n in one pass over the compressed tokens, using that lse (:mod:`.select`).
3. slc: selected attention over the chosen blocks (:mod:`.selected`).
4. win: sliding-window attention whose epilogue reads o_cmp, o_slc and the gates and writes
   o = g0*o_cmp + g1*o_slc + g2*o_win, so no separate combine pass (:mod:`.band`); when the
   backward will run, also o_win and its lse (no window recompute there). With
   :data:`WIN_BESIDE` the window runs beside slc and :func:`.band.gate_mix` mixes (a fifth launch).

Autograd lives at the op boundary (:mod:`nsa.ops`): the registered op ``torch.ops.nsa.nsa_fwd``
runs :func:`_nsa_forward` and keeps o_cmp, the block indices, o_slc, o_win and the three lse;
``torch.ops.nsa.nsa_bwd`` runs the Triton backward kernels of :mod:`.backward` (fp64 inputs
recompute through the PyTorch reference :func:`nsa.reference.nsa_ref` instead).
Reference: :func:`nsa.reference.nsa_ref` (same signature).
"""

from __future__ import annotations

import torch

from . import _common as C
from . import cmp_dense
from .band import band_attention, default_scale, gate_mix
from .select import select_blocks_triton
from .selected import selected_attention_triton


WIN_BESIDE = False
"""Whether the forward runs the window as a pass of its own, its fp32 output mixed with the
other branches by :func:`.band.gate_mix` (the same o bit for bit), on a side stream
(:func:`._common.side_stream`) beside the slc kernel: the window's tiles are bound by the
tensor cores, slc's by L2, so each may fill what the other leaves. Off (the window's epilogue
mixes the branches) until `benchmarks/beside.py` times it on a GPU."""


def _nsa_forward(q, k_cmp, v_cmp, k_slc, v_slc, k_win, v_win, gates, *, cmp_block, cmp_stride,
                 sel_block, sel_count, window, scale, cu_seqlens, q_offset, win_k_offset, aux=False,
                 save_win=False):
    """o, and with ``aux`` also what the backward reuses: (o_cmp, lse_cmp, block indices, o_slc,
    lse_slc, o_win, lse_win); o_win and lse_win are empty tensors unless ``save_win`` (the
    window's output and lse written by its gated epilogue, so that the backward does not
    recompute them: 4.5 ms of a 64k backward on an H100, train_h100.json)."""
    q, k_cmp, v_cmp = q.contiguous(), k_cmp.contiguous(), v_cmp.contiguous()
    k_slc, v_slc, k_win, v_win = (x.contiguous() for x in (k_slc, v_slc, k_win, v_win))
    gates = gates.contiguous()
    B, T, HQ, Dk = q.shape
    sc = default_scale(scale, Dk)
    seq, lens = C.seq_table(B, T, k_slc.shape[1], k_win.shape[1], k_cmp.shape[1], cu_seqlens,
                            cmp_block, cmp_stride, q.device)
    dense = None
    if cmp_dense.use(q, v_cmp, cu_seqlens=cu_seqlens, q_offset=q_offset):
        dense = cmp_dense.attempt(cmp_dense.cmp_dense, q, k_cmp, v_cmp, cmp_block=cmp_block,
                                  cmp_stride=cmp_stride, scale=sc)
    if dense is not None:
        o_cmp, lse = dense
    else:  # the band kernel, but for the long packed sequences that cuDNN runs
        spans = cmp_dense.dense_spans(q, v_cmp, lens, cu_seqlens=cu_seqlens, q_offset=q_offset)
        cmp = dict(mode=0, scale=sc, seq=seq, q_offset=q_offset, cmp_block=cmp_block, cmp_stride=cmp_stride,
                   write_lse=True)
        o_cmp, lse = band_attention(q, k_cmp, v_cmp, lens=cmp_dense.band_lens(lens, spans) if spans else lens,
                                    **cmp)  # [B, T, HQ, Dv], [B, T, HQ]
        if spans and cmp_dense.attempt(cmp_dense.cmp_dense_spans, q, k_cmp, v_cmp, o_cmp, lse, spans,
                                       cmp_block=cmp_block, cmp_stride=cmp_stride, scale=sc) is None:
            o_cmp, lse = band_attention(q, k_cmp, v_cmp, lens=lens, **cmp)
    idx = select_blocks_triton(q, k_cmp, cmp_block=cmp_block, cmp_stride=cmp_stride,
                               sel_block=sel_block, sel_count=sel_count, scale=sc,
                               cu_seqlens=cu_seqlens, q_offset=q_offset, lse=lse)  # [B, T, H, n]
    save_win = aux and save_win
    win = dict(mode=1, scale=sc, seq=seq, lens=lens, q_offset=q_offset, k_offset=win_k_offset, window=window,
               write_lse=save_win)
    side = C.side_stream(q.device, "win") if WIN_BESIDE else None
    if WIN_BESIDE:  # the window's fp32 output, on a side stream beside slc where there is one
        with C.on_side(side, q, k_win, v_win, seq):
            o_w32, lse_win = band_attention(q, k_win, v_win, out_dtype=torch.float32, **win)
    # the selection's lists hold every position's forced blocks (attended by tiles of several
    # positions where selected.FORCED is on)
    o_slc = selected_attention_triton(q, k_slc, v_slc, idx, sel_block=sel_block, scale=sc,
                                      cu_seqlens=cu_seqlens, q_offset=q_offset, return_lse=aux, forced=True)
    o_slc, lse_slc = o_slc if aux else (o_slc, None)
    o_win = torch.empty_like(o_cmp) if save_win else o_cmp.new_empty(0)
    if WIN_BESIDE:
        C.join_side(side, o_w32, *([lse_win] if save_win else []))
        o = gate_mix(gates, o_cmp, o_slc, o_w32, o_branch=o_win if save_win else None)
    else:
        o, lse_win = band_attention(q, k_win, v_win, gates=gates, o_cmp=o_cmp, o_slc=o_slc,
                                    o_branch=o_win if save_win else None, **win)
    if not aux:
        return o
    if not save_win:
        lse_win = lse.new_empty(0)
    return o, (o_cmp, lse, idx, o_slc, lse_slc, o_win, lse_win)  # what the Triton backward reuses


def nsa_triton(q, k_cmp, v_cmp, k_slc, v_slc, k_win, v_win, gates, *, cmp_block=32, cmp_stride=16,
               sel_block=64, sel_count=16, window=512, scale=None, cu_seqlens=None, q_offset=0,
               win_k_offset=None, deterministic=False):
    """NSA output ``[B, T, HQ, Dv]`` in q's dtype; same contract as :func:`nsa.nsa_func`.

    q ``[B, T, HQ, Dk]`` at positions ``q_offset + i``; k_cmp/v_cmp ``[B, Tc, H, D]`` and
    k_slc/v_slc ``[B, Tk, H, D]`` hold keys from position 0 (Tk = q_offset + T); k_win/v_win
    ``[B, Tw, H, D]`` hold keys from position ``win_k_offset`` (default 0). gates
    ``[B, T, HQ, 3]`` activated. Defaults l=32, d=16, l'=64, n=16, w=512,
    scale = 1/sqrt(Dk). Differentiable (Triton backward kernels); ``deterministic``: a
    backward without order-dependent atomics (bitwise the same gradients on every run).
    """
    from ..ops import as_varlen_tables, needs_backward

    B, T = q.shape[:2]
    tables = as_varlen_tables(cu_seqlens, T, B, q.device, cmp_block, cmp_stride)
    args = (q, k_cmp, v_cmp, k_slc, v_slc, k_win, v_win, gates)
    return torch.ops.nsa.nsa_fwd(*args, None if tables is None else tables.cu_seqlens_cpu, cmp_block, cmp_stride,
                                 sel_block, sel_count, window, default_scale(scale, q.shape[-1]), int(q_offset),
                                 0 if win_k_offset is None else int(win_k_offset), bool(deterministic),
                                 needs_backward(args))[0]
