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

from dataclasses import dataclass
from typing import Callable, NamedTuple, Sequence

import torch

from . import geometry
from .config import NSAConfig, check_positive_int

# (k, v) of the new tokens for the cmp, slc and win branches: [B, C, H, Dk], [B, C, H, Dv], keys
# rotated (the layer's projections)
Branches = Sequence[tuple[torch.Tensor, torch.Tensor]]
# phi: raw blocks [B, N, l, H, D] -> compressed tokens [B, N, H, D] (the layer's Compressor)
Phi = Callable[[torch.Tensor], torch.Tensor]


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
            cache.k_win = torch.zeros(B, c.window, H, Dk, **kw)
            cache.v_win = torch.zeros(B, c.window, H, Dv, **kw)
            cache.k_tail = torch.zeros(B, c.cmp_block - 1, H, Dk, **kw)
            cache.v_tail = torch.zeros(B, c.cmp_block - 1, H, Dv, **kw)
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
            self.k_cmp[:, tc0:tc1], self.v_cmp[:, tc0:tc1] = self._compress(
                phi_k, phi_v, raw_k[:, idx], raw_v[:, idx], kc.dtype)
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

    def append_step(self, seqlens: torch.Tensor, branches: Branches, *, phi_k: Phi, phi_v: Phi) -> CacheRead:
        """Append one token per sequence at positions ``seqlens`` with fixed shapes and no host
        sync, so that the step can be captured in a CUDA graph and replayed.

        Args:
            seqlens: int tensor ``[B]`` on the buffers' device: the positions each sequence holds
                before this token (each in [0, max_seq_len - 1], not checked: reading them would
                sync). ``length`` is neither read nor advanced.
            branches: the tokens' (k, v) for the cmp, slc and win branches, ``[B, 1, H, Dk]``,
                ``[B, 1, H, Dv]``, keys rotated; with shared k/v only the slc pair is read.
            phi_k, phi_v: as :meth:`append_chunk`.

        Returns the :class:`CacheRead` of the whole buffers (``max_seq_len`` rows, the ring):
        :func:`nsa.nsa_decode` with ``cache_seqlens = seqlens + 1`` reads what each sequence holds.
        """
        (kc, vc), (ks, vs), (kw, vw) = branches
        l, d, w = self.cmp_block, self.cmp_stride, self.window
        dev, dt = ks.device, self.k_slc.dtype
        s = seqlens.long()  # [B] the token's position
        rows = torch.arange(s.shape[0], device=dev)
        self.k_slc[rows, s] = ks[:, 0].to(dt)
        self.v_slc[rows, s] = vs[:, 0].to(dt)

        # the raw block ending at s and the window's keys
        if self.shared_kv:  # both read the selection's keys
            at = (s[:, None] - (l - 1) + torch.arange(l, device=dev)).clamp_min(0)  # [B, l]
            raw_k, raw_v = self.k_slc[rows[:, None], at], self.v_slc[rows[:, None], at]
            ring_k, ring_v = self.k_slc, self.v_slc
        else:
            raw_k = torch.cat([self.k_tail, kc.to(dt)], 1)  # [B, l, H, Dk]: positions s-l+1..s
            raw_v = torch.cat([self.v_tail, vc.to(dt)], 1)
            self.k_tail.copy_(raw_k[:, 1:])
            self.v_tail.copy_(raw_v[:, 1:])
            ring_k, ring_v = self.k_win, self.v_win
            ring_k[rows, s % w] = kw[:, 0].to(dt)
            ring_v[rows, s % w] = vw[:, 0].to(dt)
        # compression: the block is due when s + 1 >= l and (s + 1 - l) % d == 0; it is computed
        # every step and written only when due (a data-dependent branch would sync)
        if self.k_cmp.shape[1]:  # (a cache shorter than one block never compresses)
            due = ((s + 1 >= l) & ((s + 1 - l) % d == 0))[:, None, None]  # [B, 1, 1]
            slot = torch.div(s + 1 - l, d, rounding_mode="floor").clamp(0, self.k_cmp.shape[1] - 1)
            new = self._compress(phi_k, phi_v, raw_k[:, None], raw_v[:, None], kc.dtype)
            for buf, tok in zip((self.k_cmp, self.v_cmp), new):
                buf[rows, slot] = torch.where(due, tok[:, 0], buf[rows, slot])  # [B, H, D]
        return CacheRead(self.k_cmp, self.v_cmp, self.k_slc, self.v_slc, ring_k, ring_v, None)

    def _compress(self, phi_k: Phi, phi_v: Phi, blocks_k: torch.Tensor, blocks_v: torch.Tensor,
                  dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """phi over raw blocks ``[B, N, l, H, D]`` held in the cache's dtype: computed in ``dtype``
        (the layer's), returned in the cache's."""
        dt = self.k_cmp.dtype
        return phi_k(blocks_k.to(dtype)).to(dt), phi_v(blocks_v.to(dtype)).to(dt)
