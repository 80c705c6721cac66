"""Public functional ops: :func:`nsa_func`, :func:`select_blocks` and :func:`nsa_decode` (semantics §8).

Each op validates its inputs, then dispatches on ``backend``:

* ``"torch"``  - the PyTorch reference (:mod:`nsa.reference`), any device, any float dtype.
* ``"triton"`` - the Triton kernels (:mod:`nsa.triton`); needs CUDA (or TRITON_INTERPRET=1).
* ``"auto"``   - Triton for CUDA tensors when Triton is importable, PyTorch elsewhere.

The op boundary (docs/kernels.md, "The op boundary"): the Triton path runs through operators
registered with :mod:`torch.library` in the namespace ``nsa``, each with a fake (meta)
implementation, so ``torch.compile`` traces them as single nodes:

* ``torch.ops.nsa.nsa_fwd``: the forward; returns o and what the backward reuses (o_cmp, its
  lse, the block indices, o_slc and its lse, and when a backward will run o_win and its lse).
  Differentiable (``register_autograd``).
* ``torch.ops.nsa.nsa_bwd``: the eight input gradients from the forward's saved state.
* ``torch.ops.nsa.select_blocks``: the block indices alone.
* ``torch.ops.nsa.nsa_decode``: one decode step (1-8 new tokens per sequence, contiguous or paged).

Geometry reaches them as explicit ints and floats; packed sequences as the host copy of
``cu_seqlens`` in a :class:`VarlenTables`, built once by :func:`varlen_tables` outside a
compiled region, so nothing reads device values back inside it. The torch backend is plain
PyTorch code that ``torch.compile`` traces directly.
"""

from __future__ import annotations

import functools
import math
import os
from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

from . import geometry, reference
from .config import check_positive_int

BACKENDS = ("auto", "torch", "triton")
_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def triton_available() -> tuple[bool, str]:
    """(usable, reason): whether the Triton backend can run here."""
    try:
        from . import triton as _triton_backend  # noqa: F401
    except ImportError as e:  # triton not installed, or the kernels module not built yet
        return False, f"the Triton backend cannot be imported ({e})"
    return True, "ok"


def resolve_backend(backend: str, device: torch.device) -> str:
    """Map ``backend`` to "torch" or "triton" for tensors on ``device``."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "torch":
        return "torch"
    ok, why = triton_available()
    if backend == "triton":
        if not ok:
            raise ValueError(f"backend='triton' is not available: {why}")
        if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
            raise ValueError(f"backend='triton' needs CUDA tensors (got device {device}); "
                             "set TRITON_INTERPRET=1 to run the kernels on the CPU for debugging")
        return "triton"
    return "triton" if (ok and device.type == "cuda") else "torch"


def _check_tensor(name: str, x, rank: int, expect: str) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape {expect}, got {type(x).__name__}")
    if x.dim() != rank:
        raise ValueError(f"{name} must have shape {expect}, got {tuple(x.shape)}")


def _check_geometry(cmp_block, cmp_stride, sel_block, sel_count=None, window=None) -> None:
    for name, v in (("cmp_block", cmp_block), ("cmp_stride", cmp_stride), ("sel_block", sel_block)):
        check_positive_int(name, v)
    if cmp_block % cmp_stride or sel_block % cmp_stride:
        raise ValueError(f"cmp_stride (d={cmp_stride}) must divide cmp_block (l={cmp_block}) "
                         f"and sel_block (l'={sel_block})")
    if sel_count is not None and (isinstance(sel_count, bool) or not isinstance(sel_count, int)
                                  or sel_count < 3):
        raise ValueError(f"sel_count must be an int >= 3 (block 0 and two local blocks are "
                         f"forced), got {sel_count!r}")
    if window is not None:
        check_positive_int("window", window)


def _scale(scale, head_dim: int) -> float:
    return 1.0 / math.sqrt(head_dim) if scale is None else float(scale)


# --------------------------------------------------------------------------- packed sequences
@dataclass(frozen=True, eq=False)
class VarlenTables:
    """What the ops need to know about N sequences packed along T (from :func:`varlen_tables`).

    Built once per batch, before a compiled region: inside it the ops read only these tensors'
    shapes and the host copy, never device values (which would sync, and break a
    ``torch.compile`` graph). Pass it wherever ``cu_seqlens`` is taken (:func:`nsa_func`,
    :func:`select_blocks`, :class:`nsa.NSAAttention`, :class:`nsa.model.NSAModel`).

    Attributes:
        cu_seqlens: int32 ``[N+1]`` cumulative lengths, on the tensors' device.
        cu_seqlens_cpu: int64 ``[N+1]``, the same on the CPU: the Triton ops size their
            launches from it without a device sync.
        bounds: the same as host ints. The torch backend slices the sequences by them, so a
            compiled graph on that backend specializes on them (one graph per packing); the
            Triton path does not read them.
        positions: int64 ``[T]``: each token's position in its sequence (0 at each start).
        cmp_block, cmp_stride: the compression geometry (l, d) ``cmp_index`` is built for;
            the ops check that theirs is the same.
        cmp_index: int64 ``[Tc, l]``: the rows of T in each compression block, sequence by
            sequence (Tc = the sequences' compressed tokens in all): the raw blocks of a
            ``[B, T, H, D]`` tensor are ``x[:, cmp_index]``.
    """

    cu_seqlens: Tensor
    cu_seqlens_cpu: Tensor
    bounds: tuple[int, ...]
    positions: Tensor
    cmp_block: int
    cmp_stride: int
    cmp_index: Tensor


def _check_cu_seqlens(cu_seqlens, total: int | None, batch: int | None, device) -> tuple[int, ...]:
    """Validate a raw cu_seqlens tensor (reads its values: one host sync); returns them."""
    if not isinstance(cu_seqlens, torch.Tensor):
        raise TypeError(f"cu_seqlens must be an int32 tensor [N+1] or nsa.VarlenTables, "
                        f"got {type(cu_seqlens).__name__}")
    if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2:
        raise ValueError(f"cu_seqlens must have shape [N+1] with N >= 1, got {tuple(cu_seqlens.shape)}")
    if cu_seqlens.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"cu_seqlens must be int32, got {cu_seqlens.dtype}")
    if device is not None and cu_seqlens.device != device:
        raise ValueError(f"cu_seqlens must be on {device}, got {cu_seqlens.device}")
    if batch is not None and batch != 1:
        raise ValueError(f"with cu_seqlens the batch dimension must be 1 (sequences packed along T), "
                         f"got B={batch}")
    c = tuple(int(x) for x in cu_seqlens.tolist())
    end = c[-1] if total is None else total
    if c[0] != 0 or c[-1] != end or any(b < a for a, b in zip(c[:-1], c[1:])):
        raise ValueError(f"cu_seqlens must start at 0, be non-decreasing and end at T={end}, got {list(c)}")
    return c


def varlen_tables(cu_seqlens: Tensor, *, cmp_block: int = 32, cmp_stride: int = 16) -> VarlenTables:
    """The :class:`VarlenTables` of ``cu_seqlens`` (int32 ``[N+1]``: 0, then the cumulative
    lengths of N >= 1 sequences packed along T; empty sequences allowed), on its device, for
    the compression geometry ``cmp_block``/``cmp_stride`` (l, d; a layer's
    :meth:`nsa.NSAAttention.varlen_tables` passes its own).

    Reads ``cu_seqlens`` back once (validated here: starts at 0, non-decreasing) and copies
    the tables to its device: call it outside a compiled region, once per batch.
    """
    check_positive_int("cmp_block", cmp_block)
    check_positive_int("cmp_stride", cmp_stride)
    c = _check_cu_seqlens(cu_seqlens, None, None, None)
    return _build_tables(cu_seqlens, c, cmp_block, cmp_stride)


def _build_tables(cu_seqlens: Tensor, c: tuple[int, ...], l: int, d: int) -> VarlenTables:
    dev = cu_seqlens.device
    cpu = torch.tensor(c, dtype=torch.int64)
    lens = cpu[1:] - cpu[:-1]
    T = c[-1]
    positions = torch.arange(T) - torch.repeat_interleave(cpu[:-1], lens, output_size=T)  # [T]
    tc = torch.where(lens >= l, torch.div(lens - l, d, rounding_mode="floor") + 1, 0)  # [N]
    n_cmp = int(tc.sum())
    seq = torch.repeat_interleave(torch.arange(len(tc)), tc, output_size=n_cmp)  # [Tc] each block's sequence
    first = torch.cumsum(tc, 0) - tc  # index of each sequence's first block
    starts = cpu[seq] + (torch.arange(n_cmp) - first[seq]) * d
    index = starts[:, None] + torch.arange(l)  # [Tc, l]
    return VarlenTables(cu_seqlens=cu_seqlens.to(torch.int32), cu_seqlens_cpu=cpu, bounds=c,
                        positions=positions.to(dev), cmp_block=l, cmp_stride=d, cmp_index=index.to(dev))


@functools.lru_cache(maxsize=64)
def _cached_tables(c: tuple[int, ...], l: int, d: int, device: torch.device) -> VarlenTables:
    return _build_tables(torch.tensor(c, dtype=torch.int32, device=device), c, l, d)


def needs_backward(tensors) -> bool:
    """Whether autograd will take a backward through an op of ``tensors``: grad mode on and one
    of them requiring grad (the forward then keeps the window branch's output for it)."""
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


def as_varlen_tables(cu_seqlens, total: int, batch: int, device, cmp_block: int,
                     cmp_stride: int) -> VarlenTables | None:
    """``cu_seqlens`` as the :class:`VarlenTables` of a call on ``batch`` x ``total`` tokens on
    ``device`` with compression geometry (l, d): None stays None; tables are checked against
    the call (shapes and host ints only); a raw tensor is validated and its tables built (a host
    sync: eager convenience, refused inside ``torch.compile``)."""
    if cu_seqlens is None:
        return None
    if isinstance(cu_seqlens, VarlenTables):
        t = cu_seqlens
        if batch != 1:
            raise ValueError(f"with cu_seqlens the batch dimension must be 1 (sequences packed along T), "
                             f"got B={batch}")
        if t.positions.shape[0] != total:
            raise ValueError(f"cu_seqlens (VarlenTables) packs T={t.positions.shape[0]} tokens but the "
                             f"input has T={total}")
        if t.cu_seqlens.device != device:
            raise ValueError(f"cu_seqlens (VarlenTables) must be on {device}, got {t.cu_seqlens.device}")
        if (t.cmp_block, t.cmp_stride) != (cmp_block, cmp_stride):
            raise ValueError(f"cu_seqlens (VarlenTables) was built for cmp_block={t.cmp_block}, "
                             f"cmp_stride={t.cmp_stride}, but the call has cmp_block={cmp_block}, "
                             f"cmp_stride={cmp_stride}: build it with nsa.varlen_tables(..., cmp_block="
                             f"{cmp_block}, cmp_stride={cmp_stride})")
        return t
    if torch.compiler.is_compiling():
        raise ValueError("cu_seqlens as a tensor is read back to the host, which a compiled graph cannot "
                         "do: build nsa.varlen_tables(cu_seqlens, ...) once outside the compiled region "
                         "and pass that as cu_seqlens")
    c = _check_cu_seqlens(cu_seqlens, total, batch, device)
    return _cached_tables(c, cmp_block, cmp_stride, cu_seqlens.device)


# --------------------------------------------------------------------------- registered ops
# The Triton path's operators. Their implementations import the kernels when first called
# (nsa.triton needs the triton package); the fake implementations give the outputs' shapes
# from the inputs' alone, for torch.compile's tracing.

_LIB = torch.library.Library("nsa", "DEF")  # owns the namespace's definitions (kept alive here)


class _Op:
    """``torch.ops.nsa.<name>`` defined from ``fn``'s annotations (``torch.library.infer_schema``,
    then ``define`` and a CompositeExplicitAutograd ``impl``), with ``register_fake`` and
    ``register_autograd`` as ``torch.library.custom_op``'s. Not custom_op itself: it wraps the
    implementation in ``torch._disable_dynamo``, whose first call imports ``torch._dynamo`` (about
    1,000 modules, sympy among them: 4 of the 5.9 s of a warm first forward on the H200) and
    whose every call goes through dynamo's frame hooks."""

    def __init__(self, name: str, fn, mutates_args=()):
        self.name = f"nsa::{name}"
        _LIB.define(name + torch.library.infer_schema(fn, mutates_args=mutates_args))
        _LIB.impl(name, fn, "CompositeExplicitAutograd")
        functools.update_wrapper(self, fn)

    def register_fake(self, fake):
        torch.library.register_fake(self.name, fake, lib=_LIB)
        return fake

    def register_autograd(self, backward, *, setup_context):
        torch.library.register_autograd(self.name, backward, setup_context=setup_context, lib=_LIB)


def _op(name: str, mutates_args=()):
    return lambda fn: _Op(name, fn, mutates_args)


@_op("nsa_fwd")
def _nsa_fwd(q: Tensor, k_cmp: Tensor, v_cmp: Tensor, k_slc: Tensor, v_slc: Tensor, k_win: Tensor,
             v_win: Tensor, gates: Tensor, cu_seqlens_cpu: Optional[Tensor], cmp_block: int,
             cmp_stride: int, sel_block: int, sel_count: int, window: int, scale: float,
             q_offset: int, win_k_offset: int, deterministic: bool,
             save_win: bool) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """NSA forward through the Triton kernels: (o [B, T, HQ, Dv], o_cmp [B, T, HQ, Dv], lse_cmp
    [B, T, HQ] fp32, block indices [B, T, H, n] int64, o_slc [B, T, HQ, Dv], lse_slc [B, T, HQ]
    fp32, o_win [B, T, HQ, Dv], lse_win [B, T, HQ] fp32; the last two empty unless
    ``save_win``: what a backward reuses instead of recomputing the window). ``cu_seqlens_cpu``:
    :attr:`VarlenTables.cu_seqlens_cpu` or None; ``deterministic`` is the backward's (kept with
    the saved state)."""
    from .triton.nsa import _nsa_forward

    o, aux = _nsa_forward(q, k_cmp, v_cmp, k_slc, v_slc, k_win, v_win, gates, cmp_block=cmp_block,
                          cmp_stride=cmp_stride, sel_block=sel_block, sel_count=sel_count, window=window,
                          scale=scale, cu_seqlens=cu_seqlens_cpu, q_offset=q_offset,
                          win_k_offset=win_k_offset, aux=True, save_win=save_win)
    return (o, *aux)


@_nsa_fwd.register_fake
def _(q, k_cmp, v_cmp, k_slc, v_slc, k_win, v_win, gates, cu_seqlens_cpu, cmp_block, cmp_stride,
      sel_block, sel_count, window, scale, q_offset, win_k_offset, deterministic, save_win):
    B, T, HQ, _ = q.shape
    H, Dv = k_cmp.shape[2], v_cmp.shape[3]
    o = q.new_empty(B, T, HQ, Dv)
    lse = q.new_empty(B, T, HQ, dtype=torch.float32)
    o_win, lse_win = (torch.empty_like(o), torch.empty_like(lse)) if save_win else (o.new_empty(0), lse.new_empty(0))
    return (o, torch.empty_like(o), lse, q.new_empty(B, T, H, sel_count, dtype=torch.int64),
            torch.empty_like(o), torch.empty_like(lse), o_win, lse_win)


@_op("nsa_bwd")
def _nsa_bwd(grad_o: Tensor, q: Tensor, k_cmp: Tensor, v_cmp: Tensor, k_slc: Tensor, v_slc: Tensor,
             k_win: Tensor, v_win: Tensor, gates: Tensor, o_cmp: Tensor, lse_cmp: Tensor,
             block_indices: Tensor, o_slc: Tensor, lse_slc: Tensor, o_win: Tensor, lse_win: Tensor,
             cu_seqlens_cpu: Optional[Tensor],
             cmp_block: int, cmp_stride: int, sel_block: int, sel_count: int, window: int,
             scale: float, q_offset: int, win_k_offset: int, deterministic: bool
             ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """The gradients of q, k_cmp, v_cmp, k_slc, v_slc, k_win, v_win and gates (each in its
    input's dtype) from grad_o and the state ``nsa_fwd`` returned, through the Triton backward
    kernels (:func:`nsa.triton.backward.nsa_backward`); fp16/bf16/fp32. Empty o_win / lse_win:
    the window's forward is recomputed."""
    from .triton.backward import nsa_backward

    kw = dict(cmp_block=cmp_block, cmp_stride=cmp_stride, sel_block=sel_block, sel_count=sel_count,
              window=window, scale=scale, cu_seqlens=cu_seqlens_cpu, q_offset=q_offset,
              win_k_offset=win_k_offset, deterministic=deterministic)
    inputs = (q, k_cmp, v_cmp, k_slc, v_slc, k_win, v_win, gates)
    return nsa_backward(grad_o, inputs, (o_cmp, lse_cmp, block_indices, o_slc, lse_slc, o_win, lse_win), kw,
                        needs=(True,) * 8)


@_nsa_bwd.register_fake
def _(grad_o, q, k_cmp, v_cmp, k_slc, v_slc, k_win, v_win, gates, *rest):
    return tuple(x.new_empty(x.shape) for x in (q, k_cmp, v_cmp, k_slc, v_slc, k_win, v_win, gates))


def _fwd_setup_context(ctx, inputs, output):
    (*tensors, cu, l, d, lp, n, w, scale, qo, wo, det, _save_win) = inputs
    ctx.mark_non_differentiable(*output[1:])
    # no zero gradients for the seven saved outputs (autograd would materialise them: 3.2 GB at
    # 64k in the paper configuration, three [B, T, HQ, Dv] tensors among them)
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(*tensors, *output[1:], cu)
    ctx.geometry = (l, d, lp, n, w, scale, qo, wo, det)


def _fwd_backward(ctx, grad_o, *_aux_grads):
    saved = ctx.saved_tensors
    inputs, aux, cu = saved[:8], saved[8:15], saved[15]
    need = ctx.needs_input_grad[:8]
    if grad_o is None:  # o itself got no gradient (not materialised): neither do the inputs
        return (None,) * 19
    if inputs[0].dtype == torch.float64:  # no fp64 backward kernels: the reference, recomputed
        grads = _reference_grads(grad_o, inputs, need, cu, ctx.geometry)
    else:
        grads = torch.ops.nsa.nsa_bwd(grad_o, *inputs, *aux, cu, *ctx.geometry)
    return (*[g if nd else None for g, nd in zip(grads, need)], *([None] * 11))


def _reference_grads(grad_o, inputs, need, cu, geo):
    l, d, lp, n, w, scale, qo, wo, _ = geo
    with torch.enable_grad():
        leaves = [x.detach().requires_grad_(nd) for x, nd in zip(inputs, need)]
        o = reference.nsa_ref(*leaves, cmp_block=l, cmp_stride=d, sel_block=lp, sel_count=n, window=w,
                              scale=scale, cu_seqlens=None if cu is None else cu.tolist(), q_offset=qo,
                              win_k_offset=wo)
        wrt = [x for x in leaves if x.requires_grad]
        got = iter(torch.autograd.grad(o, wrt, grad_o, allow_unused=True)) if wrt else iter(())
    return [next(got) if x.requires_grad else None for x in leaves]


_nsa_fwd.register_autograd(_fwd_backward, setup_context=_fwd_setup_context)


@_op("select_blocks")
def _select_blocks(q: Tensor, k_cmp: Tensor, cu_seqlens_cpu: Optional[Tensor], cmp_block: int,
                   cmp_stride: int, sel_block: int, sel_count: int, scale: float,
                   q_offset: int) -> Tensor:
    """Block indices [B, T, H, n] int64 through the Triton selection kernel (not differentiable)."""
    from .triton.select import select_blocks_triton

    return select_blocks_triton(q, k_cmp, cmp_block=cmp_block, cmp_stride=cmp_stride, sel_block=sel_block,
                                sel_count=sel_count, scale=scale, cu_seqlens=cu_seqlens_cpu,
                                q_offset=q_offset)


@_select_blocks.register_fake
def _(q, k_cmp, cu_seqlens_cpu, cmp_block, cmp_stride, sel_block, sel_count, scale, q_offset):
    B, T = q.shape[:2]
    return q.new_empty(B, T, k_cmp.shape[2], sel_count, dtype=torch.int64)


@_op("nsa_decode")
def _nsa_decode(q: Tensor, k_cmp: Tensor, v_cmp: Tensor, k_slc: Tensor, v_slc: Tensor,
                k_win: Optional[Tensor], v_win: Optional[Tensor], gates: Tensor, cache_seqlens: Tensor,
                block_table: Optional[Tensor], max_seqlen: int, cmp_block: int, cmp_stride: int,
                sel_block: int, sel_count: int, window: int, scale: float) -> Tensor:
    """A decode step [B, S, HQ, Dv] through the Triton decode kernels; ``cache_seqlens`` int
    [B] on the device, ``max_seqlen`` their upper bound (grids are sized by it: no host sync);
    ``block_table`` int32 [B, max_pages] for paged k/v pools (k_win/v_win None: the window
    reads them)."""
    return _decode_kernels(q, k_cmp, v_cmp, k_slc, v_slc, k_win, v_win, gates, cache_seqlens, block_table,
                           max_seqlen, cmp_block, cmp_stride, sel_block, sel_count, window, scale)


def _decode_kernels(q, k_cmp, v_cmp, k_slc, v_slc, k_win, v_win, gates, cache_seqlens, block_table, max_seqlen,
                    cmp_block, cmp_stride, sel_block, sel_count, window, scale):
    """``nsa::nsa_decode``'s body. Eager calls run it directly: dispatch through the op (then a
    custom_op) cost a decode step more host time than its four launches (torch 2.11, H200)."""
    from .triton.decode import nsa_decode_triton

    return nsa_decode_triton(q, k_cmp, v_cmp, k_slc, v_slc, k_win, v_win, gates, cache_seqlens=cache_seqlens,
                             cmp_block=cmp_block, cmp_stride=cmp_stride, sel_block=sel_block,
                             sel_count=sel_count, window=window, scale=scale, max_seqlen=max_seqlen,
                             block_table=block_table)


@_nsa_decode.register_fake
def _(q, k_cmp, v_cmp, k_slc, v_slc, k_win, v_win, gates, *rest):
    return q.new_empty(*q.shape[:3], v_cmp.shape[3])


@_op("compress_write_step", mutates_args=("k_cmp", "v_cmp"))
def _compress_write_step(seqlens: Tensor, raw_k: Tensor, raw_v: Tensor, phi_k: list[Tensor], phi_v: list[Tensor],
                         k_cmp: Tensor, v_cmp: Tensor, block_table: Optional[Tensor], slots: Optional[Tensor],
                         cmp_block: int, cmp_stride: int, dtype: torch.dtype) -> None:
    """A decode step's compressed token through its Triton kernel, phi and the write in one launch
    (:func:`nsa.triton.append.compress_write_step_triton`, whose contract this is; phi_k / phi_v
    empty for the mean): what a compiled step traces (the eager step calls the kernel directly)."""
    from .triton.append import compress_write_step_triton

    compress_write_step_triton(seqlens, raw_k, raw_v, tuple(phi_k) or None, tuple(phi_v) or None, k_cmp, v_cmp,
                               cmp_block=cmp_block, cmp_stride=cmp_stride, dtype=dtype, block_table=block_table,
                               slots=slots)


@_compress_write_step.register_fake
def _(*args):
    return None


# --------------------------------------------------------------------------- public ops
def _tracing(x: Tensor) -> bool:
    """Whether a call must go through the registered op: torch.compile or torch.export traces it,
    or x is a tensor subclass (fake, functional, distributed tensors dispatch through it)."""
    return torch.compiler.is_compiling() or torch.compiler.is_exporting() or type(x) is not torch.Tensor


def _expected_tc(tables: VarlenTables | None, n_keys: int, cmp_block: int, cmp_stride: int) -> int:
    if tables is None:
        return geometry.num_cmp_blocks(n_keys, cmp_block, cmp_stride)
    return tables.cmp_index.shape[0]  # a shape, not a host read


def _check_q(q) -> None:
    _check_tensor("q", q, 4, "[B, T, HQ, Dk]")
    if q.dtype not in _FLOATS:
        raise TypeError(f"q must be a floating tensor (fp16/bf16/fp32/fp64), got {q.dtype}")


def _check_k_cmp(q, k_cmp, v_cmp, tc: int) -> None:
    B, T, HQ, Dk = q.shape
    _check_tensor("k_cmp", k_cmp, 4, "[B, Tc, H, Dk]")
    H = k_cmp.shape[2]
    if H == 0 or HQ % H:
        raise ValueError(f"q heads HQ={HQ} must be a multiple of the key/value heads H={H} (GQA)")
    if tuple(k_cmp.shape) != (B, tc, H, Dk):
        raise ValueError(f"k_cmp must have shape [B, Tc, H, Dk] = {[B, tc, H, Dk]} "
                         f"(Tc = number of complete compression blocks), got {list(k_cmp.shape)}")
    tensors = [("k_cmp", k_cmp)]
    if v_cmp is not None:
        _check_tensor("v_cmp", v_cmp, 4, "[B, Tc, H, Dv]")
        if tuple(v_cmp.shape[:3]) != (B, tc, H):
            raise ValueError(f"v_cmp must have shape [B, Tc, H, Dv] = {[B, tc, H, 'Dv']}, "
                             f"got {list(v_cmp.shape)}")
        tensors.append(("v_cmp", v_cmp))
    for name, x in tensors:
        _same_dtype_device(name, x, q)


def _same_dtype_device(name, x, q) -> None:
    if x.dtype != q.dtype:
        raise TypeError(f"{name} must have q's dtype {q.dtype}, got {x.dtype}")
    if x.device != q.device:
        raise ValueError(f"{name} must be on q's device {q.device}, got {x.device}")


def _check_offset(name: str, v, hi: int | None = None, why: str = "") -> None:
    if isinstance(v, bool) or not isinstance(v, (int, torch.SymInt)) or v < 0 or (hi is not None and v > hi):
        bound = "" if hi is None else f" <= {hi}{why}"
        raise ValueError(f"{name} must be an int >= 0{bound}, got {v!r}")


def select_blocks(q, k_cmp, *, cmp_block: int = 32, cmp_stride: int = 16, sel_block: int = 64,
                  sel_count: int = 16, scale: float | None = None, cu_seqlens=None,
                  q_offset: int = 0, backend: str = "auto") -> torch.Tensor:
    """Blocks each query selects (semantics §3-4).

    Args:
        q: ``[B, T, HQ, Dk]`` queries (RoPE applied), at positions ``q_offset + i``.
        k_cmp: ``[B, Tc, H, Dk]`` compressed keys from position 0, Tc = 0 if Tk < l else
            (Tk - l) // d + 1 with Tk = q_offset + T. With ``cu_seqlens``: each sequence's Tc_i
            tokens back to back.
        cmp_block, cmp_stride: l and d of the compression (d divides l and l').
        sel_block, sel_count: l' and n (n >= 3; forced blocks count towards n).
        scale: softmax scale, default ``1 / sqrt(Dk)``.
        cu_seqlens: optional: sequences packed in T (B == 1), as :func:`nsa_func` takes them.
        q_offset: position of the first query (0 with ``cu_seqlens``).
        backend: "auto", "torch" or "triton".

    Returns:
        int64 ``[B, T, H, n]``: block indices ascending, padded with -1. Always contains
        block 0, block t // l' and block t // l' - 1 (when >= 0); the rest are the eligible
        blocks (j*l' <= t) with the largest group score, ties to the lower index.
    """
    _check_geometry(cmp_block, cmp_stride, sel_block, sel_count)
    _check_q(q)
    B, T = q.shape[:2]
    tables = as_varlen_tables(cu_seqlens, T, B, q.device, cmp_block, cmp_stride)
    _check_offset("q_offset", q_offset, 0 if tables is not None else None, " with cu_seqlens")
    _check_k_cmp(q, k_cmp, None, _expected_tc(tables, q_offset + T, cmp_block, cmp_stride))
    if resolve_backend(backend, q.device) == "triton":
        return torch.ops.nsa.select_blocks(q, k_cmp, None if tables is None else tables.cu_seqlens_cpu,
                                           cmp_block, cmp_stride, sel_block, sel_count,
                                           _scale(scale, q.shape[-1]), q_offset)
    return reference.select_blocks_ref(q, k_cmp, cmp_block=cmp_block, cmp_stride=cmp_stride, sel_block=sel_block,
                                       sel_count=sel_count, scale=scale, q_offset=q_offset,
                                       cu_seqlens=None if tables is None else tables.bounds)


def _check_kv_rows(q, k_slc, v_slc, k_win, v_win, q_offset: int, win_k_offset: int) -> None:
    """A q whose T disagrees with keys that agree among themselves is q's error."""
    T = q.shape[1]
    end = {x.shape[1] for x in (k_slc, v_slc)} | {x.shape[1] + win_k_offset for x in (k_win, v_win)}
    if len(end) == 1 and (n := next(iter(end))) != q_offset + T:
        if q_offset == 0 and win_k_offset == 0:
            raise ValueError(f"q has T={T} rows but k_slc, v_slc, k_win and v_win have {n}: "
                             f"they must match")
        raise ValueError(f"q has T={T} rows but k_slc, v_slc, k_win and v_win (from win_k_offset="
                         f"{win_k_offset}) end at position {n - 1}: q_offset={q_offset} + T must be {n}")


def nsa_func(q, k_cmp, v_cmp, k_slc, v_slc, k_win, v_win, gates, *, cmp_block: int = 32,
             cmp_stride: int = 16, sel_block: int = 64, sel_count: int = 16, window: int = 512,
             scale: float | None = None, cu_seqlens=None, q_offset: int = 0,
             win_k_offset: int | None = None, backend: str = "auto",
             deterministic: bool = False) -> torch.Tensor:
    """Native Sparse Attention: three causal branches mixed by gates (semantics §1-8).

    Args:
        q: ``[B, T, HQ, Dk]`` queries, RoPE applied. Query i sits at position ``q_offset + i``
            (with ``cu_seqlens``, positions restart at 0 in each sequence).
        k_cmp, v_cmp: ``[B, Tc, H, Dk]``, ``[B, Tc, H, Dv]`` compressed keys/values from
            position 0, one per complete block [i*d, i*d + l) of the Tk = q_offset + T keys;
            Tc = 0 if Tk < l else (Tk - l) // d + 1. Compressed token i is visible to the query
            at position t iff i*d + l - 1 <= t.
        k_slc, v_slc: ``[B, Tk, H, Dk]``, ``[B, Tk, H, Dv]`` keys/values of the selected branch,
            positions 0 .. Tk - 1 (Tk = T when q_offset is 0).
        k_win, v_win: ``[B, Tw, H, Dk]``, ``[B, Tw, H, Dv]`` keys/values of the window branch,
            positions ``win_k_offset`` .. Tk - 1 (Tw = Tk - win_k_offset). The same tensors may
            be passed to several branches (shared KV).
        gates: ``[B, T, HQ, 3]`` activated gates (cmp, slc, win), e.g. sigmoid outputs.
        cmp_block (l=32), cmp_stride (d=16), sel_block (l'=64), sel_count (n=16, >= 3),
            window (w=512, the query included): the paper's defaults.
        scale: softmax scale of all branches, default ``1 / sqrt(Dk)``.
        cu_seqlens: optional: N sequences packed along T with B == 1, either the int32
            ``[N+1]`` cumulative lengths (validated here: one host read, so not inside
            ``torch.compile``) or their :class:`VarlenTables` from :func:`varlen_tables`
            (built once, before a compiled region). Needs q_offset = 0.
        q_offset: position of the first query: a chunk that continues a sequence whose first
            q_offset positions the keys already hold (the layer's KV cache). Default 0.
        win_k_offset: position of k_win's first row, at most max(0, q_offset - w + 1) (the
            oldest key the first query's window reads). Default 0.
        backend: "auto" (Triton on CUDA, PyTorch elsewhere), "torch" or "triton".
        deterministic: Triton backward without atomics whose order varies (bitwise the same
            gradients on every run, about the speed of the default; FlashAttention's flag).
            The torch backend follows PyTorch's own determinism settings. Default False.

    Returns:
        ``[B, T, HQ, Dv]`` in q's dtype. Rows with no visible key in a branch contribute 0
        from that branch (never NaN). Differentiable w.r.t. every floating input; the block
        selection itself is not (gradients reach k_cmp through the cmp branch only).
    """
    _check_geometry(cmp_block, cmp_stride, sel_block, sel_count, window)
    _check_q(q)
    B, T, HQ, Dk = q.shape
    tables = as_varlen_tables(cu_seqlens, T, B, q.device, cmp_block, cmp_stride)
    packed = " with cu_seqlens" if tables is not None else ""
    _check_offset("q_offset", q_offset, 0 if packed else None, packed)
    wo = 0 if win_k_offset is None else win_k_offset
    _check_offset("win_k_offset", wo, 0 if packed else max(0, q_offset - window + 1),
                  packed or f" (max(0, q_offset - window + 1): the first query's window starts there)")
    for name, x in (("k_slc", k_slc), ("v_slc", v_slc), ("k_win", k_win), ("v_win", v_win)):
        _check_tensor(name, x, 4, f"[B, {'Tw' if 'win' in name else 'Tk'}, H, {'Dk' if name[0] == 'k' else 'Dv'}]")
    _check_kv_rows(q, k_slc, v_slc, k_win, v_win, q_offset, wo)
    Tk = q_offset + T
    _check_k_cmp(q, k_cmp, v_cmp, _expected_tc(tables, Tk, cmp_block, cmp_stride))
    H, Dv = k_cmp.shape[2], v_cmp.shape[3]
    for name, x, rows, D in (("k_slc", k_slc, Tk, Dk), ("v_slc", v_slc, Tk, Dv),
                             ("k_win", k_win, Tk - wo, Dk), ("v_win", v_win, Tk - wo, Dv)):
        dims = f"[B, {'Tw' if 'win' in name else 'Tk'}, H, {'Dk' if name[0] == 'k' else 'Dv'}]"
        if tuple(x.shape) != (B, rows, H, D):
            raise ValueError(f"{name} must have shape {dims} = {[B, rows, H, D]}, got {list(x.shape)}")
        _same_dtype_device(name, x, q)
    _check_tensor("gates", gates, 4, f"[B, T, HQ, 3] = {[B, T, HQ, 3]}")
    if tuple(gates.shape) != (B, T, HQ, 3):
        raise ValueError(f"gates must have shape [B, T, HQ, 3] = {[B, T, HQ, 3]}, got {list(gates.shape)}")
    _same_dtype_device("gates", gates, q)
    args = (q, k_cmp, v_cmp, k_slc, v_slc, k_win, v_win, gates)
    if resolve_backend(backend, q.device) == "triton":
        return torch.ops.nsa.nsa_fwd(*args, None if tables is None else tables.cu_seqlens_cpu, cmp_block,
                                     cmp_stride, sel_block, sel_count, window, _scale(scale, Dk), q_offset,
                                     wo, bool(deterministic), needs_backward(args))[0]
    return reference.nsa_ref(*args, cmp_block=cmp_block, cmp_stride=cmp_stride, sel_block=sel_block,
                             sel_count=sel_count, window=window, scale=scale, q_offset=q_offset,
                             win_k_offset=wo, cu_seqlens=None if tables is None else tables.bounds)


MAX_NEW_TOKENS = 8  # new positions per sequence one nsa_decode call takes (speculative decoding, MTP)

# nsa_decode calls that read nothing back (tensor cache_seqlens and max_seqlen) check nothing that
# depends on values: their checks pass or fail alike for every call of the same signature, so a
# signature that passed once skips them (a decode step runs them once per token otherwise)
_DECODE_CHECKED: dict = {}  # signature -> (backend resolved, scale resolved)
_DECODE_CHECKED_MAX = 256


def _decode_signature(tensors, geometry_args, max_seqlen, backend):
    """Everything nsa_decode's checks read on its no-host-read path: each tensor's shape, dtype
    and device, each other argument with its type (True is not 1). None when unhashable (the
    checks then say what is wrong)."""
    try:
        key = (tuple(None if x is None else (x.shape, x.dtype, x.device) for x in tensors),
               tuple((type(v), v) for v in geometry_args), type(max_seqlen), max_seqlen, backend)
        hash(key)
    except (AttributeError, TypeError):
        return None
    return key


def nsa_decode(q, k_cmp, v_cmp, k_slc, v_slc, k_win, v_win, gates, *, cache_seqlens,
               cmp_block: int = 32, cmp_stride: int = 16, sel_block: int = 64, sel_count: int = 16,
               window: int = 512, scale: float | None = None, max_seqlen: int | None = None,
               block_table=None, backend: str = "auto") -> torch.Tensor:
    """A decode step: the S newest tokens of each sequence (S = 1 .. 8) attend to that
    sequence's cache, causally among themselves.

    Same result as :func:`nsa_func` on the whole sequence, read at its last S positions, without
    recomputing anything before them. Not differentiable (inference). S > 1 is what speculative
    decoding and multi-token prediction verify: each of the S queries has its own selection,
    its own window and the compressed tokens visible at its position.

    Args:
        q: ``[B, S, HQ, Dk]`` the new tokens' queries (RoPE applied), S in 1..8; query s of
            sequence b sits at position ``cache_seqlens[b] - S + s`` (the new tokens are already
            in the cache).
        k_cmp, v_cmp: ``[B, Tc, H, Dk]``, ``[B, Tc, H, Dv]`` compressed keys/values from
            position 0; row i is block [i*d, i*d + l). The first Tc(n) = (n - l) // d + 1 rows
            (0 if n < l) of sequence b are read, n = ``cache_seqlens[b]``; Tc >= Tc(max n).
            Paged: pools ``[num_pages, page_size // d, H, D]`` (see ``block_table``).
        k_slc, v_slc: ``[B, Tk, H, Dk]``, ``[B, Tk, H, Dv]`` keys/values of positions 0..n-1
            (the new tokens included); Tk >= max n. Paged: pools ``[num_pages, page_size, H, D]``.
        k_win, v_win: ``[B, Tw, H, Dk]``, ``[B, Tw, H, Dv]`` window keys/values, position p at
            row ``p % Tw``: a ring buffer of Tw >= window + S - 1 rows (the oldest new token's
            window reaches S - 1 positions further back), or the full keys (Tw >= max n). Not
            paged (a ring per sequence, also with ``block_table``). None (both): the window
            reads k_slc/v_slc (shared k/v), paged or not.
        gates: ``[B, S, HQ, 3]`` activated gates (cmp, slc, win).
        cache_seqlens: int, or int tensor ``[B]`` (per-sequence lengths, each >= S) on q's device.
        cmp_block, cmp_stride, sel_block, sel_count, window, scale: as :func:`nsa_func`.
        max_seqlen: an upper bound of ``cache_seqlens`` (e.g. the cache's capacity). With a
            tensor ``cache_seqlens`` it spares the Triton path its host sync (reading the
            lengths back), so the step can be captured in a CUDA graph or traced by
            ``torch.compile`` (the torch backend reads the lengths back whatever); the lengths,
            and the block table, are then not checked (each length must be in [S, max_seqlen];
            the kernels give 0 for a query that would sit before position 0 and clamp page
            indices into the pool, so they never read outside it), and the buffers must hold
            the rows that ``max_seqlen`` needs. Default: read from ``cache_seqlens``.
        block_table: optional int32 ``[B, max_pages]``: a paged cache (as FlashAttention's
            ``flash_attn_with_kvcache``, vLLM, FlashInfer). Position p of sequence b is row
            ``p % page_size`` of page ``block_table[b, p // page_size]`` of k_slc/v_slc;
            compressed token i (its block starts at i*d) is row ``i % (page_size // d)`` of page
            ``block_table[b, i*d // page_size]`` of k_cmp/v_cmp: one table for both pools, and a
            page holds the compressed tokens of the blocks that start in it (page_size must be a
            multiple of d). Sequence b reads its first ceil(n / page_size) entries, each in
            [0, num_pages) (checked when the lengths are read: ValueError naming block_table).
        backend: "auto" (Triton on CUDA, PyTorch elsewhere), "torch" or "triton".

    Returns:
        ``[B, S, HQ, Dv]`` in q's dtype.
    """
    tensors = (q, k_cmp, v_cmp, k_slc, v_slc, k_win, v_win, gates, cache_seqlens, block_table)
    sig = None
    if isinstance(cache_seqlens, torch.Tensor) and max_seqlen is not None and not _tracing(q):
        sig = _decode_signature(tensors, (cmp_block, cmp_stride, sel_block, sel_count, window, scale),
                                max_seqlen, backend)
        known = _DECODE_CHECKED.get(sig) if sig is not None else None
        if known is not None:
            return _decode_dispatch(*tensors, max_seqlen, cmp_block, cmp_stride, sel_block, sel_count, window,
                                    scale, *known)
    _check_geometry(cmp_block, cmp_stride, sel_block, sel_count, window)
    _check_tensor("q", q, 4, "[B, S, HQ, Dk]")
    if q.dtype not in _FLOATS:
        raise TypeError(f"q must be a floating tensor (fp16/bf16/fp32/fp64), got {q.dtype}")
    B, S, HQ, Dk = q.shape
    if not 1 <= S <= MAX_NEW_TOKENS:
        raise ValueError(f"q must have shape [B, S, HQ, Dk] with 1 <= S <= {MAX_NEW_TOKENS} new tokens per "
                         f"sequence, got {list(q.shape)}; use nsa_func or the layer's cache for a longer chunk")
    if isinstance(cache_seqlens, torch.Tensor):
        if cache_seqlens.dim() != 1 or cache_seqlens.shape[0] != B:
            raise ValueError(f"cache_seqlens must be an int or an int tensor [B] = [{B}], "
                             f"got shape {list(cache_seqlens.shape)}")
        if cache_seqlens.dtype not in (torch.int32, torch.int64):
            raise TypeError(f"cache_seqlens must be int32 or int64, got {cache_seqlens.dtype}")
        if cache_seqlens.device != q.device:
            raise ValueError(f"cache_seqlens must be on q's device {q.device}, got {cache_seqlens.device}")
        lens = cache_seqlens.tolist() if max_seqlen is None else []  # the only host sync
    elif isinstance(cache_seqlens, int) and not isinstance(cache_seqlens, bool):
        lens = [cache_seqlens] * B
    else:
        raise TypeError(f"cache_seqlens must be an int or an int tensor [B], got {type(cache_seqlens).__name__}")
    if lens and min(lens) < S:
        raise ValueError(f"cache_seqlens must be >= {S}, the new tokens per sequence (they are in the cache, "
                         f"at positions cache_seqlens - {S} .. cache_seqlens - 1), got {lens}")
    if max_seqlen is not None:
        check_positive_int("max_seqlen", max_seqlen)
        if lens and max(lens) > max_seqlen:
            raise ValueError(f"max_seqlen={max_seqlen} is below cache_seqlens {max(lens)}")
    n_max = max_seqlen if max_seqlen is not None else max(lens, default=1)
    _check_tensor("k_cmp", k_cmp, 4, "[B, Tc, H, Dk]")
    H = k_cmp.shape[2]
    if H == 0 or HQ % H:
        raise ValueError(f"q heads HQ={HQ} must be a multiple of the key/value heads H={H} (GQA)")
    Dv = v_cmp.shape[-1] if isinstance(v_cmp, torch.Tensor) else None
    if (k_win is None) != (v_win is None):
        raise ValueError("k_win and v_win must both be tensors or both None (the window reads k_slc/v_slc)")
    paged = block_table is not None
    if paged:
        _check_tensor("block_table", block_table, 2, f"[B, max_pages] = [{B}, max_pages]")
        if block_table.shape[0] != B:
            raise ValueError(f"block_table must have shape [B, max_pages] = [{B}, max_pages], "
                             f"got {list(block_table.shape)}")
        if block_table.dtype != torch.int32:
            raise TypeError(f"block_table must be int32, got {block_table.dtype}")
        if block_table.device != q.device:
            raise ValueError(f"block_table must be on q's device {q.device}, got {block_table.device}")
        _check_tensor("k_slc", k_slc, 4, "[num_pages, page_size, H, Dk]")
        num_pages, page_size = k_slc.shape[:2]
        if page_size == 0 or page_size % cmp_stride:
            raise ValueError(f"k_slc's page_size={page_size} (dim 1 of the pool [num_pages, page_size, H, Dk]) "
                             f"must be a multiple of cmp_stride={cmp_stride}: a page holds page_size // d "
                             f"compressed tokens")
        if block_table.shape[1] * page_size < n_max:
            raise ValueError(f"block_table has {block_table.shape[1]} pages of page_size={page_size} per "
                             f"sequence, fewer than the longest sequence "
                             f"({'cache_seqlens' if max_seqlen is None else 'max_seqlen'} = {n_max}) needs: "
                             f"ceil({n_max} / {page_size}) = {-(-n_max // page_size)} pages")
        pools = (("k_cmp", k_cmp, Dk, "page_size // d", page_size // cmp_stride),
                 ("v_cmp", v_cmp, Dv, "page_size // d", page_size // cmp_stride),
                 ("k_slc", k_slc, Dk, "page_size", page_size), ("v_slc", v_slc, Dv, "page_size", page_size))
        for name, x, D, rows, want in pools:
            expect = (f"[num_pages, {rows}, H, {'Dk' if name[0] == 'k' else 'Dv'}] = "
                      f"[{num_pages}, {want}, {H}, {D}]")
            _check_tensor(name, x, 4, expect)
            if tuple(x.shape) != (num_pages, want, H, D):
                raise ValueError(f"{name} must be a page pool of shape {expect} (block_table is given), "
                                 f"got {list(x.shape)}")
    checks = [] if paged else [("k_cmp", k_cmp, Dk, "Tc", geometry.num_cmp_blocks(n_max, cmp_block, cmp_stride)),
                               ("v_cmp", v_cmp, Dv, "Tc", geometry.num_cmp_blocks(n_max, cmp_block, cmp_stride)),
                               ("k_slc", k_slc, Dk, "Tk", n_max), ("v_slc", v_slc, Dv, "Tk", n_max)]
    if k_win is not None:
        checks += [("k_win", k_win, Dk, "Tw", 1), ("v_win", v_win, Dv, "Tw", 1)]
    for name, x, D, rows, need in checks:
        expect = f"[B, {rows}, H, {'Dk' if name[0] == 'k' else 'Dv'}] = [{B}, {rows}, {H}, {D}]"
        _check_tensor(name, x, 4, expect)
        if x.shape[0] != B or x.shape[2] != H or x.shape[3] != D:
            raise ValueError(f"{name} must have shape {expect}, got {list(x.shape)}")
        if x.shape[1] < need:
            raise ValueError(f"{name} has {x.shape[1]} rows but the longest sequence "
                             f"({'cache_seqlens' if max_seqlen is None else 'max_seqlen'} = {n_max}) "
                             f"needs {rows} >= {need}")
    for name, x in (("k_cmp", k_cmp), ("v_cmp", v_cmp), ("k_slc", k_slc), ("v_slc", v_slc),
                    ("k_win", k_win), ("v_win", v_win)):
        if x is None:
            continue
        if x.dtype != q.dtype:
            raise TypeError(f"{name} must have q's dtype {q.dtype}, got {x.dtype}")
        if x.device != q.device:
            raise ValueError(f"{name} must be on q's device {q.device}, got {x.device}")
    pairs = [("k_cmp", k_cmp, "v_cmp", v_cmp), ("k_slc", k_slc, "v_slc", v_slc)]
    if k_win is not None:
        pairs.append(("k_win", k_win, "v_win", v_win))
    for kn, kx, vn, vx in pairs:
        if vx.shape[1] != kx.shape[1] or vx.shape[0] != kx.shape[0]:
            raise ValueError(f"{vn} has shape {list(vx.shape)} but {kn} has {list(kx.shape)}: "
                             f"their first two dims must match")
    if k_win is not None:
        Tw = k_win.shape[1]
        if Tw < min(window + S - 1, n_max):
            raise ValueError(f"k_win/v_win must hold Tw >= window + S - 1 = {window + S - 1} rows (a ring "
                             f"buffer, position p at row p % Tw; window={window}, S={S} new tokens) or every "
                             f"position (Tw >= {n_max}), got Tw={Tw}")
    _check_tensor("gates", gates, 4, f"[B, S, HQ, 3] = {[B, S, HQ, 3]}")
    if tuple(gates.shape) != (B, S, HQ, 3):
        raise ValueError(f"gates must have shape [B, S, HQ, 3] = {[B, S, HQ, 3]}, got {list(gates.shape)}")
    if gates.dtype != q.dtype or gates.device != q.device:
        raise TypeError(f"gates must have q's dtype and device ({q.dtype}, {q.device}), "
                        f"got {gates.dtype}, {gates.device}")
    if paged and lens:  # eager: the pages each length needs exist (reads the table back)
        reference.check_block_table(block_table, lens, k_slc.shape[0], k_slc.shape[1])
    known = (resolve_backend(backend, q.device), _scale(scale, Dk))
    if sig is not None:
        if len(_DECODE_CHECKED) >= _DECODE_CHECKED_MAX:
            _DECODE_CHECKED.clear()
        _DECODE_CHECKED[sig] = known
    if not isinstance(cache_seqlens, torch.Tensor):
        cache_seqlens = torch.full((B,), cache_seqlens, dtype=torch.int32, device=q.device)
    return _decode_dispatch(q, k_cmp, v_cmp, k_slc, v_slc, k_win, v_win, gates, cache_seqlens, block_table, n_max,
                            cmp_block, cmp_stride, sel_block, sel_count, window, scale, *known)


def _decode_dispatch(q, k_cmp, v_cmp, k_slc, v_slc, k_win, v_win, gates, cache_seqlens, block_table, n_max,
                     cmp_block, cmp_stride, sel_block, sel_count, window, scale, resolved, scale_value):
    """A checked nsa_decode call on its backend (``resolved``), n_max the lengths' bound."""
    if block_table is None and k_win is None:  # contiguous shared k/v: position p at row p of k_slc
        k_win, v_win = k_slc, v_slc
    args = (q, k_cmp, v_cmp, k_slc, v_slc, k_win, v_win, gates)
    if resolved == "triton" and q.dtype != torch.float64:
        # traced (torch.compile, export): the registered op; eager: its body, without the dispatch
        op = torch.ops.nsa.nsa_decode if _tracing(q) else _decode_kernels
        return op(*args, cache_seqlens, block_table, n_max, cmp_block, cmp_stride, sel_block, sel_count, window,
                  scale_value)
    return reference.nsa_decode_ref(*args, cache_seqlens=cache_seqlens, cmp_block=cmp_block,
                                    cmp_stride=cmp_stride, sel_block=sel_block, sel_count=sel_count,
                                    window=window, scale=scale, max_seqlen=n_max, block_table=block_table)
