"""KV cache of one NSA layer for chunked prefill and decode (SPEC section 9).

Everything is preallocated by :meth:`nsa.NSAAttention.new_cache`; a step writes in place and
never grows a tensor. What is kept:

* ``k_slc``/``v_slc`` ``[B, max_seq_len, H, D]``: every position (selected branch).
* ``k_win``/``v_win`` ``[B, w, H, D]``: a ring buffer of the last w positions (window branch),
  slot = position % w.
* ``k_cmp``/``v_cmp`` ``[B, Tc(max_seq_len), H, D]``: the compressed stream so far.
* ``k_tail``/``v_tail`` ``[B, l - 1, H, D]``: raw (rotated) compression keys/values of the last
  l - 1 positions, from which the next compressed tokens are formed.

With ``shared_kv`` the three branches use one k/v, so only ``k_slc``/``v_slc`` are stored and
the window and the compression read from them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class NSACache:
    max_seq_len: int
    k_slc: torch.Tensor
    v_slc: torch.Tensor
    k_cmp: torch.Tensor
    v_cmp: torch.Tensor
    k_win: torch.Tensor | None = None
    v_win: torch.Tensor | None = None
    k_tail: torch.Tensor | None = None
    v_tail: torch.Tensor | None = None
    length: int = 0  # positions held; the next chunk starts at this position

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
