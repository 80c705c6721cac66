"""KV cache of one NSA layer for chunked prefill and decode (semantics §9).

Everything is preallocated (:meth:`NSACache.allocate`, through
:meth:`nsa.NSAAttention.new_cache`); an append writes in place and never grows a tensor. What
is kept:

* ``k_slc``/``v_slc`` ``[B, max_seq_len, H, D]``: every position (selected branch).
* ``k_win``/``v_win`` ``[B, w, H, D]``: a ring buffer of the last w positions (window branch),
  slot = position % w.
* ``k_cmp``/``v_cmp`` ``[B, Tc(max_seq_len), H, D]``: the compressed stream so far.
* ``k_tail``/``v_tail`` ``[B, l - 1, H, D]``: raw (rotated) compression keys/values of the last
  l - 1 positions, from which the next compressed tokens are formed.

With ``shared_kv`` the three branches use one k/v, so only ``k_slc``/``v_slc`` are stored and
the window and the compression read from them.

The cache owns every write: :meth:`NSACache.append_chunk` (a chunk at the host-known position
``length``) and :meth:`NSACache.append_step` (one token per sequence at positions held on the
device, for CUDA graphs). Both take the new tokens' keys/values per branch and the layer's
compression functions phi_k/phi_v as arguments (the cache holds buffers, not parameters), and
return a :class:`CacheRead`: what the attention op reads next.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, NamedTuple, Sequence

import torch

from . import geometry
from .config import NSAConfig, check_positive_int
from .rope import apply_rope_table

# (k, v) of the new tokens for the cmp, slc and win branches: [B, C, H, Dk], [B, C, H, Dv], keys
# rotated (the layer's projections)
Branches = Sequence[tuple[torch.Tensor, torch.Tensor]]
# phi: raw blocks [B, N, l, H, D] -> compressed tokens [B, N, H, D] (the layer's Compressor)
Phi = Callable[[torch.Tensor], torch.Tensor]


def _allocate_ring_and_tail(cache, c: NSAConfig, slots: int, ring: int, kw: dict) -> None:
    """The per-slot buffers of separate k/v (both caches): the window's ring of ``ring`` rows
    and the raw tail of the block being compressed (l - 1 rows), zeroed."""
    H, Dk, Dv = c.n_kv_heads, c.head_dim, c.v_head_dim
    cache.k_win = torch.zeros(slots, ring, H, Dk, **kw)
    cache.v_win = torch.zeros(slots, ring, H, Dv, **kw)
    cache.k_tail = torch.zeros(slots, c.cmp_block - 1, H, Dk, **kw)
    cache.v_tail = torch.zeros(slots, c.cmp_block - 1, H, Dv, **kw)


def _compress(phi_k: Phi, phi_v: Phi, blocks_k: torch.Tensor, blocks_v: torch.Tensor, dtype: torch.dtype,
              out_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """phi over raw blocks ``[B, N, l, H, D]`` held in the cache's dtype: computed in ``dtype``
    (the layer's), returned in ``out_dtype`` (the cache's)."""
    return phi_k(blocks_k.to(dtype)).to(out_dtype), phi_v(blocks_v.to(dtype)).to(out_dtype)


def kept(cache, key, make) -> torch.Tensor:
    """``cache.kept[key]``, made by ``make()`` the first time: a table that a step reads besides
    the buffers (the rotation's rows, shared between layers through an lru cache), held as long
    as the cache, so that a CUDA graph of the step never reads one that the lru cache let go."""
    t = cache.kept.get(key)
    if t is None:
        t = cache.kept[key] = make()
    return t


def _pool_rows(table: torch.Tensor, pos: torch.Tensor, page_size: int, per_page: int,
               stride: int = 1) -> torch.Tensor:
    """Flat rows of a pool of pages of ``per_page`` rows for items ``pos`` (item i starts at
    position i * stride): row i % per_page of page ``table[..., i * stride // page_size]``. table
    int64 ``[P]`` with pos of any shape, or ``[B, P]`` with pos ``[B, ...]`` (one table row each)."""
    at = (pos * stride // page_size).reshape(*table.shape[:-1], -1)
    return table.gather(-1, at).view(pos.shape) * per_page + pos % per_page


class CacheRead(NamedTuple):
    """What the attention reads after an append, in the cache's dtype.

    ``k_cmp``/``v_cmp`` ``[B, Tc, H, D]``: compressed tokens from position 0. ``k_slc``/``v_slc``
    ``[B, n, H, D]``: keys/values from position 0. ``k_win``/``v_win``: the window's keys/values,
    either positions ``win_offset``, ``win_offset + 1``, ... in order (a chunk's attention takes
    it as ``win_k_offset``), or, with ``win_offset`` None, a ring where position p sits at row
    ``p % rows`` (what :func:`nsa.nsa_decode` reads; with shared k/v that is ``k_slc`` itself).
    """

    k_cmp: torch.Tensor
    v_cmp: torch.Tensor
    k_slc: torch.Tensor
    v_slc: torch.Tensor
    k_win: torch.Tensor
    v_win: torch.Tensor
    win_offset: int | None


@dataclass
class NSACache:
    max_seq_len: int
    cmp_block: int  # l
    cmp_stride: int  # d
    window: int  # w
    k_slc: torch.Tensor
    v_slc: torch.Tensor
    k_cmp: torch.Tensor
    v_cmp: torch.Tensor
    k_win: torch.Tensor | None = None
    v_win: torch.Tensor | None = None
    k_tail: torch.Tensor | None = None
    v_tail: torch.Tensor | None = None
    length: int = 0  # positions held; the next chunk starts at this position
    # what a step reads besides the buffers (:func:`kept`)
    kept: dict = field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def allocate(cls, config: NSAConfig, batch_size: int, max_seq_len: int, *, dtype=None,
                 device=None) -> NSACache:
        """Zeroed buffers for ``batch_size`` sequences of up to ``max_seq_len`` tokens of a layer
        with ``config`` (dtype and device as :func:`torch.zeros` takes them)."""
        check_positive_int("batch_size", batch_size)
        check_positive_int("max_seq_len", max_seq_len)
        c = config
        kw = dict(dtype=dtype, device=device)
        B, H, Dk, Dv = batch_size, c.n_kv_heads, c.head_dim, c.v_head_dim
        tc = geometry.num_cmp_blocks(max_seq_len, c.cmp_block, c.cmp_stride)
        cache = cls(max_seq_len=max_seq_len, cmp_block=c.cmp_block, cmp_stride=c.cmp_stride, window=c.window,
                    k_slc=torch.zeros(B, max_seq_len, H, Dk, **kw),
                    v_slc=torch.zeros(B, max_seq_len, H, Dv, **kw),
                    k_cmp=torch.zeros(B, tc, H, Dk, **kw), v_cmp=torch.zeros(B, tc, H, Dv, **kw))
        if not c.shared_kv:
            _allocate_ring_and_tail(cache, c, B, c.window, kw)
        return cache

    @property
    def batch_size(self) -> int:
        return self.k_slc.shape[0]

    @property
    def shared_kv(self) -> bool:
        return self.k_win is None

    def reset(self) -> None:
        """Forget the held positions (the buffers are reused as they are)."""
        self.length = 0

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (
            self.k_slc, self.v_slc, self.k_cmp, self.v_cmp, self.k_win, self.v_win,
            self.k_tail, self.v_tail) if t is not None)

    # ------------------------------------------------------------------ writes
    def append_chunk(self, branches: Branches, *, phi_k: Phi, phi_v: Phi) -> CacheRead:
        """Append a chunk of C >= 0 tokens at positions s = ``length`` .. s + C - 1 and advance
        ``length`` to s + C.

        Writes the selection keys, the window's ring, the raw tail and the compressed tokens
        whose blocks the chunk completes.

        Args:
            branches: the chunk's (k, v) for the cmp, slc and win branches, ``[B, C, H, Dk]``,
                ``[B, C, H, Dv]``, keys rotated; with shared k/v only the slc pair is read.
            phi_k, phi_v: the compression (raw blocks ``[B, N, l, H, D]`` -> ``[B, N, H, D]``).
                They run in the chunk's dtype (the cache may hold another one).

        Returns the :class:`CacheRead` at s + C: ``Tc(s + C)`` compressed tokens, positions
        0..s+C-1 of k_slc/v_slc and, for C != 1, the window keys of positions
        ``win_offset = s - min(s, w - 1)`` .. s+C-1 (the last w - 1 before the chunk, then the
        chunk); for C == 1 (a decode step) the ring, read in place.

        Raises ValueError, writing nothing, when the chunk's batch is not the cache's or the
        cache cannot take C more positions.
        """
        (kc, vc), (ks, vs), (kw, vw) = branches
        B, C = ks.shape[:2]
        s = self.length
        if B != self.batch_size:
            raise ValueError(f"the chunk has batch {B} but the cache was made for batch {self.batch_size}")
        if s + C > self.max_seq_len:
            raise ValueError(f"cache is full: it holds {s} of max_seq_len={self.max_seq_len} "
                             f"positions and cannot take {C} more; make it with a larger max_seq_len")
        l, d, w = self.cmp_block, self.cmp_stride, self.window
        dev, dt = ks.device, self.k_slc.dtype
        self.k_slc[:, s:s + C] = ks.to(dt)
        self.v_slc[:, s:s + C] = vs.to(dt)

        # compression: the last l-1 raw positions plus this chunk hold every new block
        tail = min(s, l - 1)
        if self.shared_kv:
            raw_k, raw_v = self.k_slc[:, s - tail:s + C], self.v_slc[:, s - tail:s + C]
        else:
            raw_k = torch.cat([self.k_tail[:, l - 1 - tail:], kc.to(dt)], 1)
            raw_v = torch.cat([self.v_tail[:, l - 1 - tail:], vc.to(dt)], 1)
        tc0 = geometry.num_cmp_blocks(s, l, d)
        tc1 = geometry.num_cmp_blocks(s + C, l, d)
        if tc1 > tc0:
            starts = torch.arange(tc0, tc1, device=dev) * d - (s - tail)
            idx = starts[:, None] + torch.arange(l, device=dev)  # [n_new, l]
            self.k_cmp[:, tc0:tc1], self.v_cmp[:, tc0:tc1] = _compress(
                phi_k, phi_v, raw_k[:, idx], raw_v[:, idx], kc.dtype, dt)
        if not self.shared_kv:
            keep = min(l - 1, s + C)
            self.k_tail[:, l - 1 - keep:] = raw_k[:, raw_k.shape[1] - keep:]
            self.v_tail[:, l - 1 - keep:] = raw_v[:, raw_v.shape[1] - keep:]

        # window: the last w-1 positions before the chunk, then the chunk
        kept = min(s, w - 1)
        if self.shared_kv:
            k_w, v_w = self.k_slc[:, s - kept:s + C], self.v_slc[:, s - kept:s + C]
        else:
            if C != 1:  # gathered before the chunk overwrites those slots
                slots = torch.arange(s - kept, s, device=dev) % w
                k_w = torch.cat([self.k_win[:, slots], kw.to(dt)], 1)
                v_w = torch.cat([self.v_win[:, slots], vw.to(dt)], 1)
            new = min(C, w)
            slots = torch.arange(s + C - new, s + C, device=dev) % w
            self.k_win[:, slots] = kw[:, C - new:].to(dt)
            self.v_win[:, slots] = vw[:, C - new:].to(dt)

        self.length = s + C
        k_s, v_s = self.k_slc[:, :s + C], self.v_slc[:, :s + C]
        k_cmp, v_cmp = self.k_cmp[:, :tc1], self.v_cmp[:, :tc1]
        if C == 1:  # a decode step reads the ring in place (with shared k/v: the positions so far)
            ring_k, ring_v = (k_s, v_s) if self.shared_kv else (self.k_win, self.v_win)
            return CacheRead(k_cmp, v_cmp, k_s, v_s, ring_k, ring_v, None)
        return CacheRead(k_cmp, v_cmp, k_s, v_s, k_w, v_w, s - kept)

    def append_step(self, seqlens: torch.Tensor, branches: Branches, *, phi_k: Phi, phi_v: Phi,
                    backend: str = "torch") -> CacheRead:
        """Append one token per sequence at positions ``seqlens`` with fixed shapes and no host
        sync, so that the step can be captured in a CUDA graph and replayed.

        Args:
            seqlens: int tensor ``[B]`` on the buffers' device: the positions each sequence holds
                before this token (each in [0, max_seq_len - 1], not checked: reading them would
                sync). ``length`` is neither read nor advanced.
            branches: the tokens' (k, v) for the cmp, slc and win branches, ``[B, 1, H, Dk]``,
                ``[B, 1, H, Dv]``, keys rotated; with shared k/v only the slc pair is read.
            phi_k, phi_v: as :meth:`append_chunk`.
            backend: "triton" computes phi and writes the compressed token in one kernel (as
                :meth:`append_step_projected` does; traced by torch.compile as its registered op).

        Returns the :class:`CacheRead` of the whole buffers (``max_seq_len`` rows, the ring):
        :func:`nsa.nsa_decode` with ``cache_seqlens = seqlens + 1`` reads what each sequence holds.
        """
        s = seqlens.long()  # [B] the token's position
        raw_k, raw_v = _append_rows(s, torch.arange(s.shape[0], device=s.device), s % self.window, branches,
                                    self.k_slc, self.v_slc, self.k_win, self.v_win, self.k_tail, self.v_tail,
                                    self.cmp_block)
        _write_token(write_cmp_step_ref, self, s, raw_k, raw_v, phi_k, phi_v, branches[0][0].dtype,
                     fused=backend == "triton")
        return self._step_read()

    def append_step_projected(self, seqlens: torch.Tensor, q_proj: torch.Tensor, kv_proj: torch.Tensor,
                              rope: torch.Tensor, *, n_heads: int, phi_k: Phi, phi_v: Phi,
                              backend: str = "torch") -> tuple[torch.Tensor, CacheRead]:
        """:meth:`append_step` from the projections before the rotation, which it applies too:
        ``(q rotated [B, 1, n_heads, Dk], the CacheRead)``. ``q_proj`` ``[B, 1, n_heads * Dk]`` and
        ``kv_proj`` ``[B, 1, n * H * (Dk + Dv)]`` are the layer's projections (n = 3 branches, in
        the order cmp, slc, win, each its keys then its values; n = 1 with shared k/v), ``rope``
        the rotation table (:func:`nsa.rope.rope_table`, ``max_seq_len`` rows). ``backend``
        "triton" does the rotation and every write but the compressed token's in one launch
        (:func:`nsa.triton.append.decode_append_triton`), "torch" runs its reference
        :func:`decode_append_ref`."""
        append, write = _step_functions(backend)
        s = seqlens.long()
        q, raw_k, raw_v = append(q_proj, kv_proj, s, rope, self.k_slc, self.v_slc, self.k_win, self.v_win,
                                 self.k_tail, self.v_tail, n_heads=n_heads, cmp_block=self.cmp_block)
        _write_token(write, self, s, raw_k, raw_v, phi_k, phi_v, q_proj.dtype)
        return q, self._step_read()

    def _step_read(self) -> CacheRead:
        """What nsa_decode reads after a step: the whole buffers and the window's ring (with
        shared k/v the selection's keys)."""
        ring_k, ring_v = (self.k_slc, self.v_slc) if self.shared_kv else (self.k_win, self.v_win)
        return CacheRead(self.k_cmp, self.v_cmp, self.k_slc, self.v_slc, ring_k, ring_v, None)


def _write_token(write, cache, s, raw_k, raw_v, phi_k: Phi, phi_v: Phi, dtype, fused: bool = False,
                 **paging) -> None:
    """A step's compressed token: phi (in ``dtype``) of the raw block ending at the new positions
    s, written into the cache's k_cmp / v_cmp only where the position completes a block by
    ``write`` (:func:`write_cmp_step_ref` or its kernel; ``paging``: the block table and slots),
    phi computed here every step. Where ``write`` is the kernel or ``fused`` (the Triton backend
    traced by torch.compile) and phi is a :class:`nsa.layer.Compressor` with its parameters in
    ``dtype``, phi and the write run in one launch instead (:func:`compress_write_step_ref`'s
    kernel; traced, its registered op ``torch.ops.nsa.compress_write_step``)."""
    if not cache.k_cmp.shape[1]:  # (a contiguous cache shorter than one block never compresses)
        return
    geo = dict(cmp_block=cache.cmp_block, cmp_stride=cache.cmp_stride, **paging)
    params = _phi_params(phi_k, dtype), _phi_params(phi_v, dtype)
    if (fused or write is not write_cmp_step_ref) and all(p is not False for p in params):
        if torch.compiler.is_compiling():
            torch.ops.nsa.compress_write_step(s, raw_k, raw_v, *([] if p is None else list(p) for p in params),
                                              cache.k_cmp, cache.v_cmp, paging.get("block_table"),
                                              paging.get("slots"), cache.cmp_block, cache.cmp_stride, dtype)
        else:
            from .triton.append import compress_write_step_triton

            compress_write_step_triton(s, raw_k, raw_v, *params, cache.k_cmp, cache.v_cmp, dtype=dtype, **geo)
        return
    tok_k, tok_v = _compress(phi_k, phi_v, raw_k[:, None], raw_v[:, None], dtype, cache.k_cmp.dtype)
    write(s, tok_k[:, 0], tok_v[:, 0], cache.k_cmp, cache.v_cmp, **geo)


def _phi_params(phi: Phi, dtype: torch.dtype):
    """phi's parameters for the fused kernel (``Compressor.params()``: a tuple, or None for the
    mean), or False where the kernel cannot run it (another callable, parameters in another
    dtype, or a dtype the kernel does not take)."""
    params = getattr(phi, "params", None)
    if params is None or dtype not in (torch.bfloat16, torch.float16, torch.float32):
        return False
    params = params()
    if params is not None and any(p.dtype != dtype for p in params):
        return False
    return params


def compress_write_step_ref(seqlens, raw_k, raw_v, phi_k, phi_v, k_cmp, v_cmp, *, cmp_block: int, cmp_stride: int,
                            dtype: torch.dtype, block_table=None, slots=None) -> None:
    """Reference of :func:`nsa.triton.append.compress_write_step_triton`: phi
    (:func:`nsa.reference.compress_phi`, in ``dtype``; ``phi_k`` / ``phi_v`` its parameters or
    None for the mean) of the raw blocks ``raw_k`` ``[B, l, H, Dk]`` / ``raw_v`` ending at
    positions ``seqlens``, written as :func:`write_cmp_step_ref` writes its tokens."""
    from .reference import compress_phi

    tok_k = compress_phi(raw_k[:, None].to(dtype), phi_k)[:, 0]
    tok_v = compress_phi(raw_v[:, None].to(dtype), phi_v)[:, 0]
    write_cmp_step_ref(seqlens, tok_k, tok_v, k_cmp, v_cmp, cmp_block=cmp_block, cmp_stride=cmp_stride,
                       block_table=block_table, slots=slots)


def _step_functions(backend: str):
    """(append, write) of a projected step: the kernels of :mod:`nsa.triton.append` ("triton") or
    their references."""
    if backend == "triton":
        from .triton.append import decode_append_triton, write_cmp_step_triton

        return decode_append_triton, write_cmp_step_triton
    return decode_append_ref, write_cmp_step_ref


def _append_rows(s, rows, ring, branches: Branches, k_slc, v_slc, k_win, v_win, k_tail, v_tail, l: int):
    """A one-token step's writes to a contiguous cache's buffers (rows ``rows`` at positions ``s``,
    window ring rows ``ring``): the selection keys, the ring and the raw tail (separate k/v).
    Returns the raw block ending at s, ``[B, l, H, D]`` in the cache's dtype (positions before 0
    read as position 0)."""
    (kc, vc), (ks, vs), (kw, vw) = branches
    dt = k_slc.dtype
    k_slc[rows, s] = ks[:, 0].to(dt)
    v_slc[rows, s] = vs[:, 0].to(dt)
    if k_win is None:  # shared k/v: the block from the selection's keys
        at = (s[:, None] - (l - 1) + torch.arange(l, device=s.device)).clamp_min(0)  # [B, l]
        return k_slc[rows[:, None], at], v_slc[rows[:, None], at]
    raw_k = torch.cat([k_tail, kc.to(dt)], 1)  # [B, l, H, Dk]: positions s-l+1..s
    raw_v = torch.cat([v_tail, vc.to(dt)], 1)
    k_tail.copy_(raw_k[:, 1:])
    v_tail.copy_(raw_v[:, 1:])
    k_win[rows, ring] = kw[:, 0].to(dt)
    v_win[rows, ring] = vw[:, 0].to(dt)
    return raw_k, raw_v


def _append_rows_paged(s, table, slots, ring, branches: Branches, k_slc, v_slc, k_win, v_win, k_tail, v_tail,
                       l: int):
    """:func:`_append_rows` for page pools ``k_slc``/``v_slc`` ``[num_pages, page_size, H, D]``
    through ``table`` (int64, the batch's rows of the block table), the rings and tails of the
    cache's ``slots``."""
    (kc, vc), (ks, vs), (kw, vw) = branches
    dt, ps, H = k_slc.dtype, k_slc.shape[1], k_slc.shape[2]
    k_flat, v_flat = k_slc.view(-1, H, k_slc.shape[3]), v_slc.view(-1, H, v_slc.shape[3])
    at = _pool_rows(table, s, ps, ps)
    k_flat[at] = ks[:, 0].to(dt)
    v_flat[at] = vs[:, 0].to(dt)
    if k_win is None:  # shared k/v: the raw block ending at s, read back from the pages
        at = (s[:, None] - (l - 1) + torch.arange(l, device=s.device)).clamp_min(0)  # [B, l]
        src = _pool_rows(table, at, ps, ps)
        return k_flat[src], v_flat[src]
    raw_k = torch.cat([k_tail[slots], kc.to(dt)], 1)  # [B, l, H, Dk]: positions s-l+1..s
    raw_v = torch.cat([v_tail[slots], vc.to(dt)], 1)
    k_tail[slots] = raw_k[:, 1:]
    v_tail[slots] = raw_v[:, 1:]
    k_win[slots, ring] = kw[:, 0].to(dt)
    v_win[slots, ring] = vw[:, 0].to(dt)
    return raw_k, raw_v


def decode_append_ref(q_proj, kv_proj, seqlens, rope, k_slc, v_slc, k_win, v_win, k_tail, v_tail, *,
                      n_heads: int, cmp_block: int, block_table=None, slots=None):
    """Reference of :func:`nsa.triton.append.decode_append_triton`: one token per sequence at
    positions ``seqlens`` [B] (device), from the layer's projections before the rotation.

    Rotates q and the new keys by the rows ``rope[seqlens]`` of the rotation table
    (:func:`nsa.rope.rope_table`, fp32), writes the selection keys/values at row ``seqlens`` of
    ``k_slc``/``v_slc`` ``[B, max_seq_len, H, D]`` and, with separate k/v (``k_win`` not None), the
    window's at row ``seqlens % rows`` of the rings ``k_win``/``v_win`` ``[B, rows, H, D]`` and the
    compression's into the raw tails ``k_tail``/``v_tail`` ``[B, l - 1, H, D]`` (moved up by one).
    ``q_proj`` ``[B, 1, n_heads * Dk]``; ``kv_proj`` ``[B, 1, n * H * (Dk + Dv)]``, branches cmp,
    slc, win (n = 3) or one shared (n = 1), each its keys then its values.

    Paged (``block_table`` int32 ``[max_batch, max_pages]`` and the sequences' ``slots`` [B]):
    ``k_slc``/``v_slc`` are pools ``[num_pages, page_size, H, D]`` (position p of slot b at row
    p % page_size of page ``block_table[b, p // page_size]``) and the rings and tails the cache's
    ``[max_batch, ...]``, rows ``slots``.

    Returns (q ``[B, 1, n_heads, Dk]`` rotated, in q_proj's dtype; the raw blocks ending at the
    new positions, ``[B, l, H, Dk]`` and ``[B, l, H, Dv]`` in the cache's dtype).
    """
    B = q_proj.shape[0]
    H, Dk, Dv = k_slc.shape[2], k_slc.shape[3], v_slc.shape[3]
    n = kv_proj.shape[-1] // (H * (Dk + Dv))
    kv = kv_proj.reshape(B, 1, -1).split([H * Dk, H * Dv] * n, dim=-1)
    qk = torch.cat([q_proj.reshape(B, 1, n_heads, Dk), *(kv[2 * i].view(B, 1, H, Dk) for i in range(n))], 2)
    s = seqlens.long()
    q, *keys = apply_rope_table(qk, rope[s[:, None]]).split([n_heads] + [H] * n, dim=2)
    pairs = [(keys[i], kv[2 * i + 1].view(B, 1, H, Dv)) for i in range(n)] * (3 // n)
    ring = None if k_win is None else s % k_win.shape[1]
    if block_table is None:
        raw_k, raw_v = _append_rows(s, torch.arange(B, device=s.device), ring, pairs, k_slc, v_slc, k_win, v_win,
                                    k_tail, v_tail, cmp_block)
    else:
        raw_k, raw_v = _append_rows_paged(s, block_table[slots].long(), slots, ring, pairs, k_slc, v_slc, k_win,
                                          v_win, k_tail, v_tail, cmp_block)
    return q, raw_k, raw_v


def write_cmp_step_ref(seqlens, tok_k, tok_v, k_cmp, v_cmp, *, cmp_block: int, cmp_stride: int,
                       block_table=None, slots=None) -> None:
    """Reference of :func:`nsa.triton.append.write_cmp_step_triton`: a one-token step's compressed
    tokens ``tok_k`` ``[B, H, Dk]`` / ``tok_v`` ``[B, H, Dv]`` (phi of the raw blocks ending at
    positions ``seqlens`` [B]) written to token i = (s + 1 - l) / d of ``k_cmp`` / ``v_cmp`` where
    position s completes that block (s + 1 >= l, (s + 1 - l) % d == 0); nothing elsewhere.
    Contiguous: ``[B, Tc, H, D]``, row i. Paged (``block_table``, ``slots`` as
    :func:`decode_append_ref`): pools ``[num_pages, page_size // d, H, D]``, row i % (page_size //
    d) of page ``block_table[slot, i * d // page_size]``."""
    s, l, d = seqlens.long(), cmp_block, cmp_stride
    due = ((s + 1 >= l) & ((s + 1 - l) % d == 0))[:, None, None]
    i = torch.div(s + 1 - l, d, rounding_mode="floor").clamp_min(0)
    for buf, tok in ((k_cmp, tok_k), (v_cmp, tok_v)):
        if block_table is None:
            flat, at = buf.view(-1, *buf.shape[2:]), torch.arange(s.shape[0], device=s.device) * buf.shape[1] + i
        else:
            flat = buf.view(-1, *buf.shape[2:])
            at = _pool_rows(block_table[slots].long(), i, buf.shape[1] * d, buf.shape[1], d)
        flat[at] = torch.where(due, tok.to(buf.dtype), flat[at])


# ---------------------------------------------------------------------------------- paged
# New positions per sequence that one paged step reads through nsa_decode; the window's ring
# keeps window + MAX_NEW - 1 rows so that the oldest of them still finds its whole window.
MAX_NEW = 8


class PagedRead(NamedTuple):
    """What :func:`nsa.nsa_decode` reads after a :meth:`PagedBatch.append_chunk`: the page pools
    (``k_cmp``/``v_cmp`` ``[num_pages, page_size // d, H, D]``, ``k_slc``/``v_slc``
    ``[num_pages, page_size, H, D]``), the window's rings of the batch's sequences ``[B, Tw, H, D]``
    (None with shared k/v: the window reads the pages), ``block_table`` int32 ``[B, max_pages]``
    and ``seqlens`` int32 ``[B]``, the lengths after the chunk."""

    k_cmp: torch.Tensor
    v_cmp: torch.Tensor
    k_slc: torch.Tensor
    v_slc: torch.Tensor
    k_win: torch.Tensor | None
    v_win: torch.Tensor | None
    block_table: torch.Tensor
    seqlens: torch.Tensor


@dataclass
class PagedNSACache:
    """A paged KV cache of one NSA layer for a running batch whose sequences join and leave
    (semantics §9; :meth:`nsa.NSAAttention.new_cache` with ``page_size``).

    Storage (nsa_decode's paged layout, one block table for both pools):

    * ``k_slc``/``v_slc`` ``[num_pages, page_size, H, D]``: position p of the sequence in slot b
      is row ``p % page_size`` of page ``block_table[b, p // page_size]``.
    * ``k_cmp``/``v_cmp`` ``[num_pages, page_size // d, H, D]``: compressed token i (block
      [i*d, i*d + l)) is row ``i % (page_size // d)`` of page ``block_table[b, i*d // page_size]``:
      a page holds the compressed tokens of the blocks that start in it.
    * per slot, not paged (fixed size): ``k_win``/``v_win`` ``[max_batch, w + 7, H, D]`` rings of
      the window's keys (position p at row p % (w + 7): 8 new tokens per step still see their
      whole window) and ``k_tail``/``v_tail`` ``[max_batch, l - 1, H, D]`` raw compression keys;
      with shared k/v neither (the window and the compression read the pages).

    Slots and pages: :meth:`add_sequence` takes a free slot (length 0), :meth:`free` gives its
    pages back to the pool; pages are taken as a sequence grows (each append, host-side, no
    device sync). :meth:`batch` is the view of some slots that the layer takes as ``cache``:
    ``layer(x, cache=cache.batch(slots))`` appends x ``[len(slots), C, d_model]`` at each
    sequence's own length (ragged) and attends.
    """

    max_seq_len: int
    page_size: int
    cmp_block: int  # l
    cmp_stride: int  # d
    window: int  # w
    k_slc: torch.Tensor
    v_slc: torch.Tensor
    k_cmp: torch.Tensor
    v_cmp: torch.Tensor
    block_table: torch.Tensor  # int32 [max_batch, max_pages]
    k_win: torch.Tensor | None = None
    v_win: torch.Tensor | None = None
    k_tail: torch.Tensor | None = None
    v_tail: torch.Tensor | None = None
    lengths: list | None = None  # per slot: positions held, None for a free slot
    pages: list | None = None  # per slot: its pages in order (host)
    free_pages: list | None = None
    kept: dict = field(default_factory=dict, repr=False, compare=False)  # as NSACache's

    @classmethod
    def allocate(cls, config: NSAConfig, max_batch: int, max_seq_len: int, *, page_size: int,
                 num_pages: int | None = None, dtype=None, device=None) -> PagedNSACache:
        """Zeroed pools for up to ``max_batch`` sequences at once of up to ``max_seq_len`` tokens
        each, in pages of ``page_size`` positions (a multiple of cmp_stride d). ``num_pages``
        defaults to what ``max_batch`` full sequences need; fewer is fine when the sequences are
        shorter on the whole (an append that finds no free page raises)."""
        check_positive_int("max_batch", max_batch)
        check_positive_int("max_seq_len", max_seq_len)
        check_positive_int("page_size", page_size)
        c = config
        if page_size % c.cmp_stride:
            raise ValueError(f"page_size={page_size} must be a multiple of cmp_stride={c.cmp_stride} "
                             f"(a page holds page_size // d compressed tokens)")
        max_pages = -(-max_seq_len // page_size)
        num_pages = max_batch * max_pages if num_pages is None else num_pages
        check_positive_int("num_pages", num_pages)
        kw = dict(dtype=dtype, device=device)
        H, Dk, Dv, cpp = c.n_kv_heads, c.head_dim, c.v_head_dim, page_size // c.cmp_stride
        cache = cls(max_seq_len=max_seq_len, page_size=page_size, cmp_block=c.cmp_block,
                    cmp_stride=c.cmp_stride, window=c.window,
                    k_slc=torch.zeros(num_pages, page_size, H, Dk, **kw),
                    v_slc=torch.zeros(num_pages, page_size, H, Dv, **kw),
                    k_cmp=torch.zeros(num_pages, cpp, H, Dk, **kw), v_cmp=torch.zeros(num_pages, cpp, H, Dv, **kw),
                    block_table=torch.zeros(max_batch, max_pages, dtype=torch.int32, device=device),
                    lengths=[None] * max_batch, pages=[[] for _ in range(max_batch)],
                    free_pages=list(range(num_pages - 1, -1, -1)))
        if not c.shared_kv:
            _allocate_ring_and_tail(cache, c, max_batch, c.window + MAX_NEW - 1, kw)
        return cache

    @property
    def max_batch(self) -> int:
        return self.block_table.shape[0]

    @property
    def num_pages(self) -> int:
        return self.k_slc.shape[0]

    @property
    def shared_kv(self) -> bool:
        return self.k_win is None

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (
            self.k_slc, self.v_slc, self.k_cmp, self.v_cmp, self.k_win, self.v_win,
            self.k_tail, self.v_tail, self.block_table) if t is not None)

    def add_sequence(self) -> int:
        """A free slot for a new sequence (length 0, no page yet). Raises ValueError when all
        ``max_batch`` slots hold a sequence."""
        for slot, n in enumerate(self.lengths):
            if n is None:
                self.lengths[slot] = 0
                return slot
        raise ValueError(f"no free slot: all max_batch={self.max_batch} slots hold a sequence; "
                         f"free one (cache.free(slot)) or allocate a larger cache")

    def free(self, slot: int) -> None:
        """The sequence in ``slot`` is done: its slot and pages go back to the pool."""
        self._check_slot(slot)
        self.free_pages.extend(reversed(self.pages[slot]))
        self.pages[slot] = []
        self.lengths[slot] = None

    def batch(self, slots) -> PagedBatch:
        """The view of these slots (a list of distinct slots that hold sequences, in the batch's
        order) that ``layer(x, cache=...)`` takes."""
        slots = [int(s) for s in slots]
        if not slots or len(set(slots)) != len(slots):
            raise ValueError(f"slots must be a non-empty list of distinct slots, got {slots}")
        for s in slots:
            self._check_slot(s)
        return PagedBatch(self, slots)

    def _check_slot(self, slot: int) -> None:
        if not 0 <= slot < self.max_batch or self.lengths[slot] is None:
            raise ValueError(f"slot {slot} holds no sequence (cache.add_sequence() gives a slot)")

    def _rows(self, slot: int, pos: torch.Tensor, per_page: int, stride: int = 1) -> torch.Tensor:
        """Flat pool rows of items ``pos`` of slot's sequence (:func:`_pool_rows`)."""
        return _pool_rows(self.block_table[slot].long(), pos, self.page_size, per_page, stride)

    def _write(self, slot: int, s: int, kv, phi_k: Phi, phi_v: Phi) -> None:
        """Append one sequence's C tokens at positions s .. s + C - 1 (pages already taken)."""
        (kc, vc), (ks, vs), (kw, vw) = kv  # [C, H, D]
        C = ks.shape[0]
        l, d, w, ps = self.cmp_block, self.cmp_stride, self.window, self.page_size
        dev, dt = ks.device, self.k_slc.dtype
        H = self.k_slc.shape[2]
        pos = torch.arange(s, s + C, device=dev)
        at = self._rows(slot, pos, ps)
        k_flat, v_flat = self.k_slc.view(-1, H, self.k_slc.shape[3]), self.v_slc.view(-1, H, self.v_slc.shape[3])
        k_flat[at], v_flat[at] = ks.to(dt), vs.to(dt)
        tail = min(s, l - 1)
        if self.shared_kv:
            src = self._rows(slot, torch.arange(s - tail, s + C, device=dev), ps)
            raw_k, raw_v = k_flat[src], v_flat[src]
        else:
            raw_k = torch.cat([self.k_tail[slot, l - 1 - tail:], kc.to(dt)], 0)
            raw_v = torch.cat([self.v_tail[slot, l - 1 - tail:], vc.to(dt)], 0)
        tc0, tc1 = geometry.num_cmp_blocks(s, l, d), geometry.num_cmp_blocks(s + C, l, d)
        if tc1 > tc0:
            new = torch.arange(tc0, tc1, device=dev)
            idx = (new * d - (s - tail))[:, None] + torch.arange(l, device=dev)  # [n_new, l]
            ck, cv = _compress(phi_k, phi_v, raw_k[idx][None], raw_v[idx][None], kc.dtype, dt)
            cpp = self.k_cmp.shape[1]
            rows = self._rows(slot, new, cpp, stride=d)
            self.k_cmp.view(-1, H, self.k_cmp.shape[3])[rows] = ck[0]
            self.v_cmp.view(-1, H, self.v_cmp.shape[3])[rows] = cv[0]
        if not self.shared_kv:
            keep = min(l - 1, s + C)
            self.k_tail[slot, l - 1 - keep:] = raw_k[raw_k.shape[0] - keep:]
            self.v_tail[slot, l - 1 - keep:] = raw_v[raw_v.shape[0] - keep:]
            tw = self.k_win.shape[1]
            new = min(C, tw)
            ring = torch.arange(s + C - new, s + C, device=dev) % tw
            self.k_win[slot, ring] = kw[C - new:].to(dt)
            self.v_win[slot, ring] = vw[C - new:].to(dt)


@dataclass
class PagedBatch:
    """Some slots of a :class:`PagedNSACache`, in a batch's order (from :meth:`PagedNSACache.batch`).

    Chunks (:meth:`append_chunk`) take pages and advance the lengths on the host. Steps with the
    lengths on the device (:meth:`append_step`, ``layer.decode_step``: CUDA graphs) cannot take
    pages: :meth:`reserve` takes them for n steps ahead, and :meth:`advance` records the n
    tokens that the steps appended (the host lengths that chunks and :meth:`PagedNSACache.free`
    use)."""

    cache: PagedNSACache
    slots: list

    def __post_init__(self):
        # the slots as a device tensor, made once (a graph capture cannot copy from the host)
        self.index = torch.tensor(self.slots, dtype=torch.int64, device=self.cache.block_table.device)

    @property
    def batch_size(self) -> int:
        return len(self.slots)

    @property
    def lengths(self) -> list:
        """Each sequence's positions held (the next chunk starts there)."""
        return [self.cache.lengths[s] for s in self.slots]

    def append_chunk(self, branches: Branches, *, phi_k: Phi, phi_v: Phi) -> PagedRead:
        """Append C >= 1 tokens to each sequence of the view, sequence b at its own positions
        s_b .. s_b + C - 1 (s_b = ``lengths[b]``), taking the pages they need from the pool.

        Args as :meth:`NSACache.append_chunk` (``[B, C, H, D]`` with B = the view's slots).
        Returns the :class:`PagedRead` after the chunk. Raises ValueError, writing nothing, when
        the batch is not the view's, a sequence would pass ``max_seq_len`` or the pool lacks
        free pages.
        """
        c = self.cache
        ks = branches[1][0]
        B, C = ks.shape[:2]
        if B != self.batch_size:
            raise ValueError(f"the chunk has batch {B} but the view holds {self.batch_size} sequences")
        lens = self.lengths
        self._take_pages(C, "the chunk")
        for b, (slot, s) in enumerate(zip(self.slots, lens)):
            c._write(slot, s, [(k[b], v[b]) for k, v in branches], phi_k, phi_v)
            c.lengths[slot] = s + C
        idx = self.index
        win = (None, None) if c.shared_kv else (c.k_win[idx], c.v_win[idx])
        seqlens = torch.tensor([s + C for s in lens], dtype=torch.int32, device=ks.device)
        return PagedRead(c.k_cmp, c.v_cmp, c.k_slc, c.v_slc, *win, c.block_table[idx], seqlens)

    def reserve(self, n: int) -> None:
        """Take the pages that ``n`` more tokens of every sequence of the view need (from its
        host length), so that ``n`` steps of :meth:`append_step` find them in the block table.
        Raises ValueError, taking nothing, past ``max_seq_len`` or when the pool lacks pages."""
        check_positive_int("n", n)
        self._take_pages(n, f"reserving {n} tokens")

    def advance(self, n: int) -> None:
        """Record that :meth:`append_step` appended ``n`` tokens to every sequence of the view
        (the host lengths; their pages must have been reserved)."""
        check_positive_int("n", n)
        c = self.cache
        for slot in self.slots:
            if -(-(c.lengths[slot] + n) // c.page_size) > len(c.pages[slot]):
                raise ValueError(f"slot {slot} holds {c.lengths[slot]} positions and {len(c.pages[slot])} "
                                 f"pages: {n} more tokens were not reserved (view.reserve(n))")
        for slot in self.slots:
            c.lengths[slot] += n

    def append_step(self, seqlens: torch.Tensor, branches: Branches, *, phi_k: Phi, phi_v: Phi,
                    backend: str = "torch") -> PagedRead:
        """One token per sequence at positions ``seqlens`` (device), fixed shapes, no host sync:
        the paged form of :meth:`NSACache.append_step`, for CUDA graphs.

        Args:
            seqlens: int tensor ``[B]`` on the pools' device: the positions each sequence holds
                before this token, whose pages :meth:`reserve` took (not checked: reading the
                values would sync). The host lengths are neither read nor advanced
                (:meth:`advance`).
            branches, phi_k, phi_v: as :meth:`append_chunk`, with C = 1.
            backend: as :meth:`NSACache.append_step`'s.

        Returns the :class:`PagedRead` after the token (``seqlens`` + 1 as its lengths).
        """
        c = self.cache
        s, idx = seqlens.long(), self.index  # [B] the tokens' positions, the sequences' slots
        table = c.block_table[idx].long()  # [B, max_pages]
        ring = None if c.shared_kv else s % c.k_win.shape[1]
        raw_k, raw_v = _append_rows_paged(s, table, idx, ring, branches, c.k_slc, c.v_slc, c.k_win, c.v_win,
                                          c.k_tail, c.v_tail, c.cmp_block)
        _write_token(write_cmp_step_ref, c, s, raw_k, raw_v, phi_k, phi_v, branches[0][0].dtype,
                     fused=backend == "triton", block_table=c.block_table, slots=idx)
        return self._step_read(table, s)

    def append_step_projected(self, seqlens: torch.Tensor, q_proj: torch.Tensor, kv_proj: torch.Tensor,
                              rope: torch.Tensor, *, n_heads: int, phi_k: Phi, phi_v: Phi,
                              backend: str = "torch") -> tuple[torch.Tensor, PagedRead]:
        """:meth:`append_step` from the projections before the rotation, as
        :meth:`NSACache.append_step_projected`: ``(q rotated, the PagedRead)``; "triton" runs the
        two kernels of :mod:`nsa.triton.append` through the block table."""
        c = self.cache
        append, write = _step_functions(backend)
        s, idx = seqlens.long(), self.index
        paging = dict(block_table=c.block_table, slots=idx)
        q, raw_k, raw_v = append(q_proj, kv_proj, s, rope, c.k_slc, c.v_slc, c.k_win, c.v_win, c.k_tail, c.v_tail,
                                 n_heads=n_heads, cmp_block=c.cmp_block, **paging)
        _write_token(write, c, s, raw_k, raw_v, phi_k, phi_v, q_proj.dtype, **paging)
        return q, self._step_read(c.block_table[idx], s)

    def _step_read(self, table: torch.Tensor, s: torch.Tensor) -> PagedRead:
        """The PagedRead after a step at positions s of the batch's sequences (their table rows)."""
        c = self.cache
        win = (None, None) if c.shared_kv else (c.k_win[self.index], c.v_win[self.index])
        return PagedRead(c.k_cmp, c.v_cmp, c.k_slc, c.v_slc, *win, table.to(torch.int32), (s + 1).to(torch.int32))

    def _take_pages(self, n: int, what: str) -> None:
        """Pages for ``n`` more positions of every sequence of the view (host lengths), into the
        block table; raises ValueError, taking nothing, past max_seq_len or out of pages."""
        c = self.cache
        lens = self.lengths
        for slot, s in zip(self.slots, lens):
            if s + n > c.max_seq_len:
                raise ValueError(f"cache is full: slot {slot} holds {s} of max_seq_len={c.max_seq_len} "
                                 f"positions and cannot take {n} more")
        need = [max(0, -(-(s + n) // c.page_size) - len(c.pages[slot])) for slot, s in zip(self.slots, lens)]
        if sum(need) > len(c.free_pages):
            raise ValueError(f"out of pages: {what} needs {sum(need)} more pages of {c.page_size} "
                             f"positions but {len(c.free_pages)} of num_pages={c.num_pages} are free; "
                             f"free finished sequences or allocate more pages")
        for slot, k in zip(self.slots, need):
            for _ in range(k):
                page = c.free_pages.pop()
                c.block_table[slot, len(c.pages[slot])] = page
                c.pages[slot].append(page)
