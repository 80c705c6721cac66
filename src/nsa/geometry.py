"""NSA's geometry in one place: counts, visibility, the Eq. 9 mapping, forced blocks, the tie
rule and what a decode step reads (docs/semantics.md).

The reference, the kernels' launchers, the layer, the cache, the command line and the benchmarks
all take these numbers from here. Names: l = ``cmp_block``, d = ``cmp_stride``,
l' = ``sel_block``, n = ``sel_count``, w = ``window``.
"""

from __future__ import annotations

import math

import torch


def num_cmp_blocks(seq_len: int, cmp_block: int, cmp_stride: int) -> int:
    """Tc: compression blocks [i*d, i*d + l) of a sequence of ``seq_len`` keys."""
    return 0 if seq_len < cmp_block else (seq_len - cmp_block) // cmp_stride + 1


def num_sel_blocks(seq_len: int, sel_block: int) -> int:
    """Selection blocks [j*l', (j+1)*l') covering ``seq_len`` keys (the last one may be cut)."""
    return -(-seq_len // sel_block)


def cmp_block_end(i, cmp_block: int, cmp_stride: int):
    """Last key position of compression block i: the block is visible to query t iff end <= t."""
    return i * cmp_stride + cmp_block - 1


def cmp_visible(t, n_cmp: int, cmp_block: int, cmp_stride: int) -> torch.Tensor:
    """Visibility ``[len(t), n_cmp]`` of the compressed tokens to the queries at positions t."""
    ends = cmp_block_end(torch.arange(n_cmp, device=t.device), cmp_block, cmp_stride)
    return ends[None, :] <= t[:, None]


def visible_cmp_pairs(seq_len: int, cmp_block: int, cmp_stride: int) -> int:
    """Sum over t < seq_len of the compressed tokens visible at t (the cmp branch's work)."""
    tc = num_cmp_blocks(seq_len, cmp_block, cmp_stride)
    # block i is seen by the seq_len - end_i queries t >= end_i
    return tc * seq_len - sum(cmp_block_end(i, cmp_block, cmp_stride) for i in range(tc))


def overlap_weights(n_cmp: int, n_sel: int, cmp_block: int, cmp_stride: int, sel_block: int,
                    *, device=None, dtype=torch.float32) -> torch.Tensor:
    """Eq. 9 mapping W ``[n_cmp, n_sel]``: |[i*d, i*d + l) & [j*l', (j+1)*l')| / d."""
    i = torch.arange(n_cmp, device=device)[:, None]
    j = torch.arange(n_sel, device=device)[None, :]
    lo = torch.maximum(i * cmp_stride, j * sel_block)
    hi = torch.minimum(i * cmp_stride + cmp_block, (j + 1) * sel_block)
    return ((hi - lo).clamp_min(0).to(dtype)) / cmp_stride


def forced_blocks(t, n_sel: int, sel_block: int) -> torch.Tensor:
    """Forced blocks ``[len(t), n_sel]`` (bool): block 0, the block holding t and the one before."""
    j = torch.arange(n_sel, device=t.device)[None]
    cur = (t // sel_block)[:, None]
    return (j == 0) | (j == cur) | (j == cur - 1)


def eligible_blocks(t, n_sel: int, sel_block: int) -> torch.Tensor:
    """Blocks ``[len(t), n_sel]`` (bool) that query t may select: j*l' <= t."""
    j = torch.arange(n_sel, device=t.device)[None]
    return j * sel_block <= t[:, None]


def top_blocks(score: torch.Tensor, sel_count: int) -> torch.Tensor:
    """The ``sel_count`` best blocks of ``score [..., n_sel]`` (forced blocks +inf, ineligible
    -inf): indices ascending, padded with -1; among equal scores the lower index wins."""
    n_sel = score.shape[-1]
    order = torch.sort(score, dim=-1, descending=True, stable=True)
    k = min(sel_count, n_sel)
    idx = torch.where(order.values[..., :k] == -math.inf, n_sel, order.indices[..., :k])
    idx = idx.sort(-1).values  # ascending, invalid (n_sel) last
    idx = torch.where(idx == n_sel, -1, idx)
    if k < sel_count:
        idx = torch.cat([idx, idx.new_full((*idx.shape[:-1], sel_count - k), -1)], -1)
    return idx


def decode_reads(seq_len: int, *, cmp_block: int = 32, cmp_stride: int = 16, sel_block: int = 64,
                 sel_count: int = 16, window: int = 512) -> tuple[int, int, int]:
    """Keys a decode step at context ``seq_len`` reads per KV head, per branch (cmp, slc, win):
    Tc(s), min(n*l', s), min(w, s) (paper Table 4 counts s/d compressed tokens, one more)."""
    return (num_cmp_blocks(seq_len, cmp_block, cmp_stride), min(sel_count * sel_block, seq_len),
            min(window, seq_len))
