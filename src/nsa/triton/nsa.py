"""All of NSA in Triton (SPEC 1-8): four launches, the gates fused into the last one.

1. cmp: compressed attention, o_cmp and its log-sum-exp (:mod:`.compressed`).
2. select: scores + top-n in one pass over the compressed tokens, using that lse (:mod:`.select`).
3. slc: selected attention over the chosen blocks (:mod:`.selected`).
4. win: sliding-window attention whose epilogue reads o_cmp, o_slc and the gates and writes
   o = g0*o_cmp + g1*o_slc + g2*o_win, so no separate combine pass (:mod:`.band`).

Autograd: the forward runs these kernels and keeps o_cmp, the block indices, o_slc and the
two lse; the backward runs the Triton backward kernels of :mod:`.backward` (fp64 inputs
recompute through the PyTorch reference :func:`nsa.reference.nsa_ref` instead).
Reference: :func:`nsa.reference.nsa_ref` (same signature).
"""

from __future__ import annotations

import torch

from .. import reference
from . import _common as C
from .backward import nsa_backward
from .band import band_attention, default_scale
from .select import select_blocks_triton
from .selected import selected_attention_triton


def _nsa_forward(q, k_cmp, v_cmp, k_slc, v_slc, k_win, v_win, gates, *, cmp_block, cmp_stride,
                 sel_block, sel_count, window, scale, cu_seqlens, q_offset, win_k_offset, aux=False):
    q, k_cmp, v_cmp = q.contiguous(), k_cmp.contiguous(), v_cmp.contiguous()
    k_slc, v_slc, k_win, v_win = (x.contiguous() for x in (k_slc, v_slc, k_win, v_win))
    gates = gates.contiguous()
    B, T, HQ, Dk = q.shape
    sc = default_scale(scale, Dk)
    seq, lens = C.seq_table(B, T, k_slc.shape[1], k_win.shape[1], k_cmp.shape[1], cu_seqlens,
                            cmp_block, cmp_stride, q.device)
    o_cmp, lse = band_attention(q, k_cmp, v_cmp, mode=0, scale=sc, seq=seq, lens=lens,
                                q_offset=q_offset, cmp_block=cmp_block, cmp_stride=cmp_stride,
                                write_lse=True)  # [B, T, HQ, Dv], [B, T, HQ]
    idx = select_blocks_triton(q, k_cmp, cmp_block=cmp_block, cmp_stride=cmp_stride,
                               sel_block=sel_block, sel_count=sel_count, scale=sc,
                               cu_seqlens=cu_seqlens, q_offset=q_offset, lse=lse)  # [B, T, H, n]
    o_slc = selected_attention_triton(q, k_slc, v_slc, idx, sel_block=sel_block, scale=sc,
                                      cu_seqlens=cu_seqlens, q_offset=q_offset, return_lse=aux)
    o_slc, lse_slc = o_slc if aux else (o_slc, None)
    o, _ = band_attention(q, k_win, v_win, mode=1, scale=sc, seq=seq, lens=lens, q_offset=q_offset,
                          k_offset=win_k_offset, window=window, gates=gates, o_cmp=o_cmp,
                          o_slc=o_slc)
    return (o, (o_cmp, lse, idx, o_slc, lse_slc)) if aux else o  # aux: what the Triton backward reuses


class _NSAFunction(torch.autograd.Function):
    """Triton forward; Triton backward (:func:`.backward.nsa_backward`) for fp32/bf16/fp16,
    the reference recomputed under autograd for other dtypes (fp64)."""

    @staticmethod
    def forward(ctx, kw, q, k_cmp, v_cmp, k_slc, v_slc, k_win, v_win, gates):
        ctx.kw = kw  # the forward's keywords, and the backward's ``deterministic``
        fwd = {k: v for k, v in kw.items() if k != "deterministic"}
        o, aux = _nsa_forward(q, k_cmp, v_cmp, k_slc, v_slc, k_win, v_win, gates, aux=True, **fwd)
        ctx.save_for_backward(q, k_cmp, v_cmp, k_slc, v_slc, k_win, v_win, gates, *aux)
        return o

    @staticmethod
    def backward(ctx, grad_o):
        inputs, aux = ctx.saved_tensors[:8], ctx.saved_tensors[8:]
        if inputs[0].dtype in (torch.float32, torch.bfloat16, torch.float16):
            return (None, *nsa_backward(grad_o, inputs, aux, ctx.kw))
        with torch.enable_grad():
            leaves = [x.detach().requires_grad_(x.requires_grad) for x in inputs]
            o = reference.nsa_ref(*leaves, **{k: v for k, v in ctx.kw.items() if k != "deterministic"})
            wrt = [x for x in leaves if x.requires_grad]
            grads = iter(torch.autograd.grad(o, wrt, grad_o, allow_unused=True)) if wrt else iter(())
        return (None, *[next(grads) if x.requires_grad else None for x in leaves])


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
    kw = dict(cmp_block=cmp_block, cmp_stride=cmp_stride, sel_block=sel_block, sel_count=sel_count,
              window=window, scale=scale, cu_seqlens=cu_seqlens, q_offset=int(q_offset),
              win_k_offset=0 if win_k_offset is None else int(win_k_offset))
    args = (q, k_cmp, v_cmp, k_slc, v_slc, k_win, v_win, gates)
    if torch.is_grad_enabled() and any(x.requires_grad for x in args):
        return _NSAFunction.apply(dict(kw, deterministic=bool(deterministic)), *args)
    return _nsa_forward(*args, **kw)
