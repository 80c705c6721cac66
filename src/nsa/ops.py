"""Public functional ops: :func:`nsa_func`, :func:`select_blocks` and :func:`nsa_decode` (SPEC section 8).

Each op validates its inputs, then dispatches on ``backend``:

* ``"torch"``  - the PyTorch reference (:mod:`nsa.reference`), any device, any float dtype.
* ``"triton"`` - the Triton kernels (:mod:`nsa.triton`); needs CUDA (or TRITON_INTERPRET=1).
* ``"auto"``   - Triton for CUDA tensors when Triton is importable, PyTorch elsewhere.
"""

from __future__ import annotations

import os

import torch

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


def _check_cu_seqlens(cu_seqlens, total: int, batch: int, device) -> None:
    if cu_seqlens is None:
        return
    if not isinstance(cu_seqlens, torch.Tensor):
        raise TypeError(f"cu_seqlens must be an int32 tensor [N+1], got {type(cu_seqlens).__name__}")
    if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2:
        raise ValueError(f"cu_seqlens must have shape [N+1] with N >= 1, got {tuple(cu_seqlens.shape)}")
    if cu_seqlens.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"cu_seqlens must be int32, got {cu_seqlens.dtype}")
    if cu_seqlens.device != device:
        raise ValueError(f"cu_seqlens must be on {device}, got {cu_seqlens.device}")
    if batch != 1:
        raise ValueError(f"with cu_seqlens the batch dimension must be 1 (sequences packed along T), "
                         f"got B={batch}")
    c = cu_seqlens.tolist()
    if c[0] != 0 or c[-1] != total or any(b < a for a, b in zip(c[:-1], c[1:])):
        raise ValueError(f"cu_seqlens must start at 0, be non-decreasing and end at T={total}, got {c}")


def _expected_tc(cu_seqlens, n_keys: int, cmp_block: int, cmp_stride: int) -> int:
    if cu_seqlens is None:
        return geometry.num_cmp_blocks(n_keys, cmp_block, cmp_stride)
    c = cu_seqlens.tolist()
    return sum(geometry.num_cmp_blocks(b - a, cmp_block, cmp_stride) for a, b in zip(c[:-1], c[1:]))


def _check_qk_cmp(q, k_cmp, v_cmp, cmp_block, cmp_stride, cu_seqlens, n_keys):
    _check_tensor("q", q, 4, "[B, T, HQ, Dk]")
    _check_tensor("k_cmp", k_cmp, 4, "[B, Tc, H, Dk]")
    if q.dtype not in _FLOATS:
        raise TypeError(f"q must be a floating tensor (fp16/bf16/fp32/fp64), got {q.dtype}")
    B, T, HQ, Dk = q.shape
    _check_cu_seqlens(cu_seqlens, T, B, q.device)  # before Tc is computed from it
    H = k_cmp.shape[2]
    if H == 0 or HQ % H:
        raise ValueError(f"q heads HQ={HQ} must be a multiple of the key/value heads H={H} (GQA)")
    tc = _expected_tc(cu_seqlens, n_keys, cmp_block, cmp_stride)
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
        if x.dtype != q.dtype:
            raise TypeError(f"{name} must have q's dtype {q.dtype}, got {x.dtype}")
        if x.device != q.device:
            raise ValueError(f"{name} must be on q's device {q.device}, got {x.device}")


def select_blocks(q, k_cmp, *, cmp_block: int = 32, cmp_stride: int = 16, sel_block: int = 64,
                  sel_count: int = 16, scale: float | None = None, cu_seqlens=None,
                  backend: str = "auto") -> torch.Tensor:
    """Blocks each query selects (SPEC 3-4).

    Args:
        q: ``[B, T, HQ, Dk]`` queries (RoPE applied).
        k_cmp: ``[B, Tc, H, Dk]`` compressed keys, Tc = 0 if T < l else (T - l) // d + 1.
            With ``cu_seqlens``: each sequence's Tc_i tokens back to back.
        cmp_block, cmp_stride: l and d of the compression (d divides l and l').
        sel_block, sel_count: l' and n (n >= 3; forced blocks count towards n).
        scale: softmax scale, default ``1 / sqrt(Dk)``.
        cu_seqlens: optional int32 ``[N+1]`` cumulative lengths of sequences packed in T (B == 1).
        backend: "auto", "torch" or "triton".

    Returns:
        int64 ``[B, T, H, n]``: block indices ascending, padded with -1. Always contains
        block 0, block t // l' and block t // l' - 1 (when >= 0); the rest are the eligible
        blocks (j*l' <= t) with the largest group score, ties to the lower index.
    """
    _check_geometry(cmp_block, cmp_stride, sel_block, sel_count)
    _check_tensor("q", q, 4, "[B, T, HQ, Dk]")
    _check_qk_cmp(q, k_cmp, None, cmp_block, cmp_stride, cu_seqlens, q.shape[1])
    _check_cu_seqlens(cu_seqlens, q.shape[1], q.shape[0], q.device)
    kw = dict(cmp_block=cmp_block, cmp_stride=cmp_stride, sel_block=sel_block, sel_count=sel_count,
              scale=scale, cu_seqlens=cu_seqlens)
    if resolve_backend(backend, q.device) == "triton":
        from . import triton as tk

        return tk.select_blocks_triton(q, k_cmp, **kw)
    return reference.select_blocks_ref(q, k_cmp, **kw)


def nsa_func(q, k_cmp, v_cmp, k_slc, v_slc, k_win, v_win, gates, *, cmp_block: int = 32,
             cmp_stride: int = 16, sel_block: int = 64, sel_count: int = 16, window: int = 512,
             scale: float | None = None, cu_seqlens=None, backend: str = "auto",
             deterministic: bool = False) -> torch.Tensor:
    """Native Sparse Attention: three causal branches mixed by gates (SPEC 1-8).

    Args:
        q: ``[B, T, HQ, Dk]`` queries, RoPE applied. Query t sits at position t (with
            ``cu_seqlens``, positions restart at 0 in each sequence).
        k_cmp, v_cmp: ``[B, Tc, H, Dk]``, ``[B, Tc, H, Dv]`` compressed keys/values, one per
            complete block [i*d, i*d + l); Tc = 0 if T < l else (T - l) // d + 1.
            Compressed token i is visible to query t iff i*d + l - 1 <= t.
        k_slc, v_slc: ``[B, T, H, Dk]``, ``[B, T, H, Dv]`` keys/values of the selected branch.
        k_win, v_win: ``[B, T, H, Dk]``, ``[B, T, H, Dv]`` keys/values of the window branch.
            The same tensors may be passed to several branches (shared KV).
        gates: ``[B, T, HQ, 3]`` activated gates (cmp, slc, win), e.g. sigmoid outputs.
        cmp_block (l=32), cmp_stride (d=16), sel_block (l'=64), sel_count (n=16, >= 3),
            window (w=512, the query included): the paper's defaults.
        scale: softmax scale of all branches, default ``1 / sqrt(Dk)``.
        cu_seqlens: optional int32 ``[N+1]``: N sequences packed along T with B == 1.
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
    _check_tensor("q", q, 4, "[B, T, HQ, Dk]")
    _check_qk_cmp(q, k_cmp, v_cmp, cmp_block, cmp_stride, cu_seqlens, q.shape[1])
    B, T, HQ, Dk = q.shape
    H, Dv = k_cmp.shape[2], v_cmp.shape[3]
    for name, x, D in (("k_slc", k_slc, Dk), ("v_slc", v_slc, Dv), ("k_win", k_win, Dk),
                       ("v_win", v_win, Dv)):
        expect = f"[B, T, H, {'Dk' if D == Dk and name[0] == 'k' else 'Dv'}] = {[B, T, H, D]}"
        _check_tensor(name, x, 4, expect)
        if tuple(x.shape) != (B, T, H, D):
            raise ValueError(f"{name} must have shape {expect}, got {list(x.shape)}")
        if x.dtype != q.dtype:
            raise TypeError(f"{name} must have q's dtype {q.dtype}, got {x.dtype}")
        if x.device != q.device:
            raise ValueError(f"{name} must be on q's device {q.device}, got {x.device}")
    _check_tensor("gates", gates, 4, f"[B, T, HQ, 3] = {[B, T, HQ, 3]}")
    if tuple(gates.shape) != (B, T, HQ, 3):
        raise ValueError(f"gates must have shape [B, T, HQ, 3] = {[B, T, HQ, 3]}, got {list(gates.shape)}")
    if gates.dtype != q.dtype:
        raise TypeError(f"gates must have q's dtype {q.dtype}, got {gates.dtype}")
    if gates.device != q.device:
        raise ValueError(f"gates must be on q's device {q.device}, got {gates.device}")
    _check_cu_seqlens(cu_seqlens, T, B, q.device)
    kw = dict(cmp_block=cmp_block, cmp_stride=cmp_stride, sel_block=sel_block, sel_count=sel_count,
              window=window, scale=scale, cu_seqlens=cu_seqlens)
    args = (q, k_cmp, v_cmp, k_slc, v_slc, k_win, v_win, gates)
    if resolve_backend(backend, q.device) == "triton":
        from . import triton as tk

        return tk.nsa_triton(*args, deterministic=deterministic, **kw)
    return reference.nsa_ref(*args, **kw)


def nsa_at(q, k_cmp, v_cmp, k_slc, v_slc, k_win, v_win, gates, *, q_offset: int,
           win_k_offset: int, backend: str = "auto", **geometry) -> torch.Tensor:
    """NSA for a chunk of queries that continues a sequence (used by the KV cache).

    The T_q queries sit at positions ``q_offset + i``; k_cmp/k_slc hold positions from 0 and
    k_win/v_win hold positions from ``win_k_offset``. Inputs are trusted (built by the layer).
    """
    kw = dict(geometry, q_offset=q_offset, win_k_offset=win_k_offset)
    if resolve_backend(backend, q.device) == "triton":
        from . import triton as tk

        return tk.nsa_triton(q, k_cmp, v_cmp, k_slc, v_slc, k_win, v_win, gates, **kw)
    return reference.nsa_ref(q, k_cmp, v_cmp, k_slc, v_slc, k_win, v_win, gates, **kw)


def nsa_decode(q, k_cmp, v_cmp, k_slc, v_slc, k_win, v_win, gates, *, cache_seqlens,
               cmp_block: int = 32, cmp_stride: int = 16, sel_block: int = 64, sel_count: int = 16,
               window: int = 512, scale: float | None = None, max_seqlen: int | None = None,
               backend: str = "auto") -> torch.Tensor:
    """One decode step: the newest token of each sequence attends to that sequence's cache.

    Same result as :func:`nsa_func` on the whole sequence, read at its last position, without
    recomputing anything before it. Not differentiable (inference).

    Args:
        q: ``[B, 1, HQ, Dk]`` the new token's queries (RoPE applied); its position in sequence b
            is ``cache_seqlens[b] - 1``.
        k_cmp, v_cmp: ``[B, Tc, H, Dk]``, ``[B, Tc, H, Dv]`` compressed keys/values from
            position 0; row i is block [i*d, i*d + l). The first Tc(n) = (n - l) // d + 1 rows
            (0 if n < l) of sequence b are read, n = ``cache_seqlens[b]``; Tc >= Tc(max n).
        k_slc, v_slc: ``[B, Tk, H, Dk]``, ``[B, Tk, H, Dv]`` keys/values of positions 0..n-1
            (the new token's included); Tk >= max n.
        k_win, v_win: ``[B, Tw, H, Dk]``, ``[B, Tw, H, Dv]`` window keys/values, position p at
            row ``p % Tw``: a ring buffer of Tw >= window rows, or the full keys (Tw >= max n,
            e.g. k_slc/v_slc again for shared k/v).
        gates: ``[B, 1, HQ, 3]`` activated gates (cmp, slc, win).
        cache_seqlens: int, or int tensor ``[B]`` (per-sequence lengths, each >= 1) on q's device.
        cmp_block, cmp_stride, sel_block, sel_count, window, scale: as :func:`nsa_func`.
        max_seqlen: an upper bound of ``cache_seqlens`` (e.g. the cache's capacity). With a
            tensor ``cache_seqlens`` it spares the Triton path its host sync (reading the
            lengths back), so the step can be captured in a CUDA graph; the lengths are then
            not checked (each must be in [1, max_seqlen]), and the buffers must hold the rows
            that ``max_seqlen`` needs. Default: read from ``cache_seqlens``.
        backend: "auto" (Triton on CUDA, PyTorch elsewhere), "torch" or "triton".

    Returns:
        ``[B, 1, HQ, Dv]`` in q's dtype.
    """
    _check_geometry(cmp_block, cmp_stride, sel_block, sel_count, window)
    _check_tensor("q", q, 4, "[B, 1, HQ, Dk]")
    if q.dtype not in _FLOATS:
        raise TypeError(f"q must be a floating tensor (fp16/bf16/fp32/fp64), got {q.dtype}")
    B, T, HQ, Dk = q.shape
    if T != 1:
        raise ValueError(f"q must have shape [B, 1, HQ, Dk] (one new token per sequence), got "
                         f"{list(q.shape)}; use nsa_func or the layer's cache for a chunk")
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
    if lens and min(lens) < 1:
        raise ValueError(f"cache_seqlens must be >= 1 (the new token is in the cache), got {lens}")
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
    tc = geometry.num_cmp_blocks(n_max, cmp_block, cmp_stride)
    for name, x, D, rows, need in (
            ("k_cmp", k_cmp, Dk, "Tc", tc), ("v_cmp", v_cmp, Dv, "Tc", tc),
            ("k_slc", k_slc, Dk, "Tk", n_max), ("v_slc", v_slc, Dv, "Tk", n_max),
            ("k_win", k_win, Dk, "Tw", 1), ("v_win", v_win, Dv, "Tw", 1)):
        expect = f"[B, {rows}, H, {'Dk' if name[0] == 'k' else 'Dv'}] = [{B}, {rows}, {H}, {D}]"
        _check_tensor(name, x, 4, expect)
        if x.shape[0] != B or x.shape[2] != H or x.shape[3] != D:
            raise ValueError(f"{name} must have shape {expect}, got {list(x.shape)}")
        if x.shape[1] < need:
            raise ValueError(f"{name} has {x.shape[1]} rows but the longest sequence "
                             f"({'cache_seqlens' if max_seqlen is None else 'max_seqlen'} = {n_max}) "
                             f"needs {rows} >= {need}")
        if x.dtype != q.dtype:
            raise TypeError(f"{name} must have q's dtype {q.dtype}, got {x.dtype}")
        if x.device != q.device:
            raise ValueError(f"{name} must be on q's device {q.device}, got {x.device}")
    for kn, kx, vn, vx in (("k_cmp", k_cmp, "v_cmp", v_cmp), ("k_slc", k_slc, "v_slc", v_slc),
                           ("k_win", k_win, "v_win", v_win)):
        if vx.shape[1] != kx.shape[1]:
            raise ValueError(f"{vn} has {vx.shape[1]} rows but {kn} has {kx.shape[1]}: they must match")
    Tw = k_win.shape[1]
    if Tw < min(window, n_max):
        raise ValueError(f"k_win/v_win must hold Tw >= window={window} rows (a ring buffer, position "
                         f"p at row p % Tw) or every position (Tw >= {n_max}), got Tw={Tw}")
    _check_tensor("gates", gates, 4, f"[B, 1, HQ, 3] = {[B, 1, HQ, 3]}")
    if tuple(gates.shape) != (B, 1, HQ, 3):
        raise ValueError(f"gates must have shape [B, 1, HQ, 3] = {[B, 1, HQ, 3]}, got {list(gates.shape)}")
    if gates.dtype != q.dtype or gates.device != q.device:
        raise TypeError(f"gates must have q's dtype and device ({q.dtype}, {q.device}), "
                        f"got {gates.dtype}, {gates.device}")
    kw = dict(cache_seqlens=cache_seqlens, cmp_block=cmp_block, cmp_stride=cmp_stride,
              sel_block=sel_block, sel_count=sel_count, window=window, scale=scale, max_seqlen=n_max)
    args = (q, k_cmp, v_cmp, k_slc, v_slc, k_win, v_win, gates)
    if resolve_backend(backend, q.device) == "triton" and q.dtype != torch.float64:
        from . import triton as tk

        return tk.nsa_decode_triton(*args, **kw)
    return reference.nsa_decode_ref(*args, **kw)
