"""PyTorch reference of Native Sparse Attention (the contract: docs/semantics.md).

Every branch is a separate function, testable alone (as fla's ``naive.py``):

* :func:`compressed_attention_ref` - branch cmp (semantics §2), with its log-sum-exp.
* :func:`select_blocks_ref` - Eq. 8-11: Eq. 9 overlap mapping, group sum, top-n (semantics §3-4).
* :func:`selected_attention_ref` - branch slc over given block indices (semantics §5).
* :func:`sliding_window_ref` - branch win (semantics §6).
* :func:`nsa_ref` - all three branches mixed by the gates (semantics §7).
* :func:`nsa_decode_ref` - a decode step of 1-8 new tokens per sequence against a cache, contiguous
  or paged (:func:`nsa_ref` on those rows).

All functions are vectorised over positions and blocks. The only Python loops are over
chunks of queries (to bound memory: a chunk's intermediates stay near ``_CHUNK_ELEMS``
elements) and over the sequences of a ``cu_seqlens`` batch. Arithmetic runs in fp32 for
fp32/bf16/fp16 inputs (fp64 for fp64 inputs); outputs are cast back to the input dtype.

Internal keyword arguments ``q_offset``/``k_offset`` place the queries and keys at absolute
positions (used by the KV cache, where a chunk of queries follows what the cache holds).
"""

from __future__ import annotations

import math

import torch

from .geometry import (cmp_visible, eligible_blocks, forced_blocks, num_cmp_blocks, num_sel_blocks,
                       overlap_weights, top_blocks)

# Elements of one chunk's largest intermediate (scores or gathered keys): 2^25 fp32 = 128 MiB.
_CHUNK_ELEMS = 1 << 25


def compress_phi(blocks: torch.Tensor, params=None) -> torch.Tensor:
    """phi over blocks ``[B, N, l, H, D]`` -> ``[B, N, H, D]``: the block's mean, plus with
    ``params`` = (pos ``[l, D]``, w1 ``[hidden, l * D]``, b1, w2 ``[D, hidden]``, b2) an MLP over
    the block flattened position-major, after a learned intra-block position embedding
    (:class:`nsa.layer.Compressor`'s "mlp"; None: its "mean")."""
    if params is None:
        return blocks.mean(2)
    pos, w1, b1, w2, b2 = params
    x = blocks + pos[:, None, :].to(blocks.dtype)
    flat = x.movedim(2, 3).flatten(-2)  # [B, N, H, l*D]
    return x.mean(2) + torch.nn.functional.linear(torch.nn.functional.silu(
        torch.nn.functional.linear(flat, w1, b1)), w2, b2)


def compress_mean(x: torch.Tensor, cmp_block: int, cmp_stride: int) -> torch.Tensor:
    """phi = "mean": [B, T, H, D] -> [B, Tc, H, D], the mean of each block's l positions."""
    return cmp_blocks(x, cmp_block, cmp_stride).mean(2)


def cmp_blocks(x: torch.Tensor, cmp_block: int, cmp_stride: int) -> torch.Tensor:
    """The raw blocks of semantics §1 as a strided view: [B, T, H, D] -> [B, Tc, l, H, D]."""
    B, T, H, D = x.shape
    tc = num_cmp_blocks(T, cmp_block, cmp_stride)
    if tc == 0:
        return x.new_zeros(B, 0, cmp_block, H, D)
    # unfold puts the window last: [B, Tc, H, D, l] -> [B, Tc, l, H, D]
    return x.unfold(1, cmp_block, cmp_stride).permute(0, 1, 4, 2, 3)


def _acc_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _scale(scale: float | None, head_dim: int) -> float:
    return 1.0 / math.sqrt(head_dim) if scale is None else float(scale)


def _chunk_size(n_queries: int, elems_per_query: int) -> int:
    return max(1, min(n_queries, _CHUNK_ELEMS // max(1, elems_per_query)))


def _masked_softmax(s: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax over the last dim where ``mask`` is True ("may attend").

    Rows where the mask admits nothing give probabilities 0 and lse -inf, never NaN; their
    gradients are exactly 0 as well.
    """
    if s.shape[-1] == 0:  # no key at all (e.g. T < l for the compressed branch)
        return s, s.new_full(s.shape[:-1], float("-inf"))
    s = s.masked_fill(~mask, float("-inf"))
    m = s.amax(-1, keepdim=True).detach()
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    p = torch.exp(s - m)
    denom = p.sum(-1, keepdim=True)
    nonempty = denom > 0
    p = p / torch.where(nonempty, denom, torch.ones_like(denom))
    lse = torch.where(nonempty, m + torch.log(torch.where(nonempty, denom, torch.ones_like(denom))),
                      torch.full_like(denom, float("-inf")))
    return p, lse.squeeze(-1)


def _cmp_probs(qc: torch.Tensor, k_cmp: torch.Tensor, t: torch.Tensor, cmp_block: int,
               cmp_stride: int, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Probabilities of one query chunk over the compressed tokens.

    qc [B, C, H, h, Dk] (acc dtype), k_cmp [B, Tc, H, Dk], t [C] absolute positions.
    Returns p [B, H, h, C, Tc] and lse [B, H, h, C].
    """
    visible = cmp_visible(t, k_cmp.shape[1], cmp_block, cmp_stride)  # [C, Tc]: block complete at t
    s = torch.einsum("bchgd,bshd->bhgcs", qc, k_cmp.to(qc.dtype)) * scale
    return _masked_softmax(s, visible)


def _split_heads(q: torch.Tensor, n_kv: int) -> torch.Tensor:
    B, T, HQ, D = q.shape
    return q.reshape(B, T, n_kv, HQ // n_kv, D)  # [B, T, H, h, D]: head = g * h + i


def compressed_attention_ref(q, k_cmp, v_cmp, *, cmp_block=32, cmp_stride=16, scale=None,
                             cu_seqlens=None, q_offset=0):
    """Branch cmp (semantics §2). Returns (o [B, T, HQ, Dv], lse [B, T, HQ] fp32/fp64).

    Query t attends to compressed token i iff i*d + l - 1 <= t; a query that sees none
    gets o = 0 and lse = -inf.
    """
    if cu_seqlens is not None:
        return _varlen(compressed_attention_ref, cu_seqlens, (q, k_cmp, v_cmp), "tcc",
                       dict(cmp_block=cmp_block, cmp_stride=cmp_stride, scale=scale))
    B, Tq, HQ, Dk = q.shape
    H, Dv, tc = k_cmp.shape[2], v_cmp.shape[-1], k_cmp.shape[1]
    sc = _scale(scale, Dk)
    acc = _acc_dtype(q)
    qg = _split_heads(q, H).to(acc)
    vc = v_cmp.to(acc)
    outs, lses = [], []
    step = _chunk_size(Tq, HQ * max(tc, 1))
    for c0 in range(0, Tq, step):
        c1 = min(Tq, c0 + step)
        t = torch.arange(c0, c1, device=q.device) + q_offset
        p, lse = _cmp_probs(qg[:, c0:c1], k_cmp, t, cmp_block, cmp_stride, sc)
        outs.append(torch.einsum("bhgcs,bshd->bchgd", p, vc))  # [B, C, H, h, Dv]
        lses.append(lse.permute(0, 3, 1, 2))  # [B, C, H, h]
    if not outs:  # no query (an empty sequence of a cu_seqlens batch)
        return q.new_zeros(B, 0, HQ, Dv), q.new_zeros(B, 0, HQ, dtype=acc)
    o = torch.cat(outs, 1).reshape(B, Tq, HQ, Dv).to(q.dtype)
    return o, torch.cat(lses, 1).reshape(B, Tq, HQ)


def select_blocks_ref(q, k_cmp, *, cmp_block=32, cmp_stride=16, sel_block=64, sel_count=16,
                      scale=None, cu_seqlens=None, q_offset=0):
    """Top-n selection (semantics §3-4): block indices [B, T, H, n] int64, ascending, -1 padded.

    Scores are the compressed-attention probabilities mapped by the Eq. 9 overlap weights
    and summed over the h heads of each group. Block 0 and the blocks holding t and t - l'
    (when they exist) are always selected; the rest are eligible blocks (j*l' <= t) by
    descending score, ties to the lower index.
    """
    if cu_seqlens is not None:
        return _varlen(select_blocks_ref, cu_seqlens, (q, k_cmp), "tc",
                       dict(cmp_block=cmp_block, cmp_stride=cmp_stride, sel_block=sel_block,
                            sel_count=sel_count, scale=scale))
    B, Tq, HQ, Dk = q.shape
    H, tc = k_cmp.shape[2], k_cmp.shape[1]
    n_sel = num_sel_blocks(q_offset + Tq, sel_block)
    sc = _scale(scale, Dk)
    acc = _acc_dtype(q)
    qg = _split_heads(q, H).to(acc)
    W = overlap_weights(tc, n_sel, cmp_block, cmp_stride, sel_block, device=q.device, dtype=acc)
    out = []
    step = _chunk_size(Tq, HQ * max(tc, n_sel, 1))
    with torch.no_grad():  # selection is not differentiable (semantics §4)
        for c0 in range(0, Tq, step):
            c1 = min(Tq, c0 + step)
            t = torch.arange(c0, c1, device=q.device) + q_offset
            p, _ = _cmp_probs(qg[:, c0:c1], k_cmp.detach(), t, cmp_block, cmp_stride, sc)
            score = torch.einsum("bhgcs,sj->bchj", p, W)  # [B, C, H, n_sel]: Eq. 9 + Eq. 10
            forced = forced_blocks(t, n_sel, sel_block)  # [C, n_sel]
            eligible = eligible_blocks(t, n_sel, sel_block)
            inf = torch.tensor(float("inf"), dtype=acc, device=q.device)
            score = torch.where(forced[None, :, None], inf,
                                torch.where(eligible[None, :, None], score, -inf))
            out.append(top_blocks(score, sel_count))
    if not out:
        return torch.empty(B, 0, H, sel_count, dtype=torch.int64, device=q.device)
    return torch.cat(out, 1).to(torch.int64)


def selected_attention_ref(q, k_slc, v_slc, block_indices, *, sel_block=64, scale=None,
                           cu_seqlens=None, q_offset=0):
    """Branch slc (semantics §5): o [B, T, HQ, Dv].

    Query t attends to every key u <= t inside the blocks listed in ``block_indices``
    [B, T, H, n] (entries -1 are ignored); all heads of a group share the blocks.
    """
    if cu_seqlens is not None:
        return _varlen(selected_attention_ref, cu_seqlens, (q, k_slc, v_slc, block_indices), "tttt",
                       dict(sel_block=sel_block, scale=scale))
    B, Tq, HQ, Dk = q.shape
    Tk, H, Dv = k_slc.shape[1], k_slc.shape[2], v_slc.shape[-1]
    n = block_indices.shape[-1]
    sc = _scale(scale, Dk)
    acc = _acc_dtype(q)
    qg = _split_heads(q, H).to(acc)
    # flat [B*Tk*H, D] rows so that one index_select gathers every query's blocks
    kk, vv = k_slc.to(acc).reshape(-1, Dk), v_slc.to(acc).reshape(-1, Dv)
    S = n * sel_block
    ar = torch.arange(sel_block, device=q.device)
    row0 = (torch.arange(B, device=q.device)[:, None, None, None] * Tk * H
            + torch.arange(H, device=q.device)[None, None, :, None])  # [B, 1, H, 1]
    outs = []
    step = _chunk_size(Tq, H * S * (Dk + Dv) + HQ * S)
    for c0 in range(0, Tq, step):
        c1 = min(Tq, c0 + step)
        t = (torch.arange(c0, c1, device=q.device) + q_offset)[None, :, None, None, None]
        idx = block_indices[:, c0:c1].to(torch.int64)  # [B, C, H, n]
        pos = idx[..., None] * sel_block + ar  # [B, C, H, n, l']
        valid = (idx[..., None] >= 0) & (pos <= t) & (pos < Tk)
        pos = pos.clamp(0, max(Tk - 1, 0)).flatten(-2)  # [B, C, H, S]
        rows = (row0 + pos * H).reshape(-1)
        kg = kk.index_select(0, rows).view(*pos.shape, Dk)  # [B, C, H, S, Dk]
        vg = vv.index_select(0, rows).view(*pos.shape, Dv)  # [B, C, H, S, Dv]
        s = torch.einsum("bchgd,bchsd->bchgs", qg[:, c0:c1], kg) * sc
        p, _ = _masked_softmax(s, valid.flatten(-2)[:, :, :, None, :])
        outs.append(torch.einsum("bchgs,bchsd->bchgd", p, vg))
    if not outs:
        return q.new_zeros(B, 0, HQ, Dv)
    return torch.cat(outs, 1).reshape(B, Tq, HQ, Dv).to(q.dtype)


def sliding_window_ref(q, k_win, v_win, *, window=512, scale=None, cu_seqlens=None,
                       q_offset=0, k_offset=0):
    """Branch win (semantics §6): query t attends to keys u in [max(0, t - w + 1), t].

    Keys sit at positions ``k_offset + arange(Tk)`` (the cache passes only its last w).
    """
    if cu_seqlens is not None:
        return _varlen(sliding_window_ref, cu_seqlens, (q, k_win, v_win), "ttt",
                       dict(window=window, scale=scale))
    B, Tq, HQ, Dk = q.shape
    Tk, H, Dv = k_win.shape[1], k_win.shape[2], v_win.shape[-1]
    sc = _scale(scale, Dk)
    acc = _acc_dtype(q)
    qg = _split_heads(q, H).to(acc)
    outs = []
    # a chunk of C queries reads C + w - 1 keys: C near w keeps the waste at 2x
    step = min(_chunk_size(Tq, HQ * 2 * window), max(window, 64))
    for c0 in range(0, Tq, step):
        c1 = min(Tq, c0 + step)
        t = torch.arange(c0, c1, device=q.device) + q_offset
        ks = max(0, c0 + q_offset - window + 1 - k_offset)
        ke = max(ks, min(Tk, c1 + q_offset - k_offset))
        u = torch.arange(ks, ke, device=q.device) + k_offset
        mask = (u[None, :] <= t[:, None]) & (u[None, :] > t[:, None] - window)  # [C, S]
        kc, vc = k_win[:, ks:ke].to(acc), v_win[:, ks:ke].to(acc)
        s = torch.einsum("bchgd,bshd->bhgcs", qg[:, c0:c1], kc) * sc
        p, _ = _masked_softmax(s, mask)
        outs.append(torch.einsum("bhgcs,bshd->bchgd", p, vc))
    if not outs:
        return q.new_zeros(B, 0, HQ, Dv)
    return torch.cat(outs, 1).reshape(B, Tq, HQ, Dv).to(q.dtype)


def combine_gates(gates, o_cmp, o_slc, o_win):
    """Eq. 5: o = g0 * o_cmp + g1 * o_slc + g2 * o_win; gates [B, T, HQ, 3], already activated."""
    acc = _acc_dtype(o_slc)
    g = gates.to(acc)
    o = g[..., 0:1] * o_cmp.to(acc) + g[..., 1:2] * o_slc.to(acc) + g[..., 2:3] * o_win.to(acc)
    return o.to(o_slc.dtype)


def nsa_ref(q, k_cmp, v_cmp, k_slc, v_slc, k_win, v_win, gates, *, cmp_block=32, cmp_stride=16,
            sel_block=64, sel_count=16, window=512, scale=None, cu_seqlens=None, q_offset=0,
            win_k_offset=None):
    """All of NSA (semantics §1-7) with the same signature as :func:`nsa.nsa_func`.

    Keys of cmp/slc start at position 0; queries start at ``q_offset``; the window keys
    start at ``win_k_offset`` (default 0). The branches run on q upcast to fp32/fp64 so that
    their outputs are rounded to q's dtype once, after the gates mix them.
    """
    out_dtype, q = q.dtype, q.to(_acc_dtype(q))
    o_cmp, _ = compressed_attention_ref(q, k_cmp, v_cmp, cmp_block=cmp_block, cmp_stride=cmp_stride,
                                        scale=scale, cu_seqlens=cu_seqlens, q_offset=q_offset)
    idx = select_blocks_ref(q, k_cmp, cmp_block=cmp_block, cmp_stride=cmp_stride, sel_block=sel_block,
                            sel_count=sel_count, scale=scale, cu_seqlens=cu_seqlens, q_offset=q_offset)
    o_slc = selected_attention_ref(q, k_slc, v_slc, idx, sel_block=sel_block, scale=scale,
                                   cu_seqlens=cu_seqlens, q_offset=q_offset)
    o_win = sliding_window_ref(q, k_win, v_win, window=window, scale=scale, cu_seqlens=cu_seqlens,
                               q_offset=q_offset,
                               k_offset=0 if win_k_offset is None else win_k_offset)
    return combine_gates(gates, o_cmp, o_slc, o_win).to(out_dtype)


def check_block_table(block_table: torch.Tensor, lens: list[int], num_pages: int, page_size: int) -> None:
    """The pages a paged decode reads exist: for each sequence b of length n = ``lens[b]``,
    ``block_table[b]`` has ceil(n / page_size) entries and those entries are in
    [0, num_pages). Reads the table back (one host sync). Raises ValueError naming block_table."""
    max_pages = block_table.shape[1]
    for b, n in enumerate(lens):
        need = -(-n // page_size)
        if need > max_pages:
            raise ValueError(f"block_table has {max_pages} pages per sequence but sequence {b} has "
                             f"length {n}, which needs ceil({n} / page_size={page_size}) = {need} pages")
    need = torch.tensor([-(-n // page_size) for n in lens], device=block_table.device)
    used = torch.arange(max_pages, device=block_table.device)[None] < need[:, None]  # [B, max_pages]
    bad = used & ((block_table < 0) | (block_table >= num_pages))
    if bool(bad.any()):
        b, j = (int(x) for x in bad.nonzero()[0])
        raise ValueError(f"block_table[{b}, {j}] = {int(block_table[b, j])} is not a page of the pool "
                         f"(num_pages = {num_pages}): sequence {b} of length {lens[b]} reads it")


def gather_pages(pool: torch.Tensor, block_table: torch.Tensor, n_pages: int) -> torch.Tensor:
    """The first ``n_pages`` pages of each sequence as one contiguous tensor:
    pool ``[num_pages, P, H, D]``, block_table ``[B, max_pages]`` -> ``[B, n_pages * P, H, D]``
    (row r of sequence b = row r % P of page ``block_table[b, r // P]``). Entries out of
    [0, num_pages) are clamped (the pages a sequence needs are checked by
    :func:`check_block_table`; the others are never read)."""
    B = block_table.shape[0]
    idx = block_table[:, :n_pages].long().clamp(0, max(pool.shape[0] - 1, 0))  # [B, n_pages]
    return pool[idx].reshape(B, n_pages * pool.shape[1], *pool.shape[2:])


def nsa_decode_ref(q, k_cmp, v_cmp, k_slc, v_slc, k_win, v_win, gates, *, cache_seqlens,
                   cmp_block=32, cmp_stride=16, sel_block=64, sel_count=16, window=512, scale=None,
                   max_seqlen=None, block_table=None):
    """A decode step of S = q.shape[1] (1..8) new tokens per sequence (the contract of
    :func:`nsa.nsa_decode`): :func:`nsa_ref` for the S queries of sequence b at positions
    ``cache_seqlens[b] - S`` .. ``cache_seqlens[b] - 1``, causal among them. ``max_seqlen``
    changes nothing here (the lengths are read back: this path is not for CUDA graphs).

    Contiguous: k_cmp/k_slc hold positions from 0 (only the first Tc(n) / n rows are read); the
    window keys of position p sit at row ``p % Tw`` of k_win/v_win (a ring buffer, or the full
    keys); k_win/v_win None: the window reads k_slc/v_slc (shared k/v).

    Paged (``block_table`` int ``[B, max_pages]``): k_slc/v_slc are page pools
    ``[num_pages, page_size, H, D]``, position p of sequence b at row ``p % page_size`` of page
    ``block_table[b, p // page_size]``; k_cmp/v_cmp are pools ``[num_pages, page_size // d, H, D]``
    paged by the same table, compressed token i (block [i*d, i*d + l)) at row ``i % (page_size // d)``
    of page ``block_table[b, i*d // page_size]``. The pages are gathered into contiguous tensors
    (:func:`gather_pages`) and the contiguous path runs on them.

    Raises ValueError when a length is below S (a query would sit before position 0) or, paged,
    when a sequence's table lacks a page its length needs (:func:`check_block_table`).
    """
    B, S = q.shape[:2]
    lens = cache_seqlens.tolist() if isinstance(cache_seqlens, torch.Tensor) else [int(cache_seqlens)] * B
    if lens and min(lens) < S:
        raise ValueError(f"cache_seqlens must be >= the new tokens per sequence S={S} (they are in the "
                         f"cache, at positions cache_seqlens - S .. cache_seqlens - 1), got {lens}")
    if block_table is not None:
        ps = k_slc.shape[1]
        check_block_table(block_table, lens, k_slc.shape[0], ps)
        n_pages = -(-max(lens, default=1) // ps)
        k_slc, v_slc = gather_pages(k_slc, block_table, n_pages), gather_pages(v_slc, block_table, n_pages)
        k_cmp, v_cmp = gather_pages(k_cmp, block_table, n_pages), gather_pages(v_cmp, block_table, n_pages)
    if k_win is None:
        k_win, v_win = k_slc, v_slc
    Tw = k_win.shape[1]
    # one call per group of sequences of the same length (the whole batch when all are equal)
    groups: dict[int, list[int]] = {}
    for b, n in enumerate(lens):
        groups.setdefault(n, []).append(b)
    out = q.new_empty(B, S, q.shape[2], v_slc.shape[3])
    for n, bs in groups.items():
        lo = max(0, n - S - window + 1)  # the first query's window starts there
        rows = torch.arange(lo, n, device=q.device) % Tw  # the ring's slots, oldest first
        tc = num_cmp_blocks(n, cmp_block, cmp_stride)
        i = torch.tensor(bs, device=q.device)
        out[i] = nsa_ref(q[i], k_cmp[i, :tc], v_cmp[i, :tc], k_slc[i, :n], v_slc[i, :n],
                         k_win[i][:, rows], v_win[i][:, rows], gates[i], cmp_block=cmp_block,
                         cmp_stride=cmp_stride, sel_block=sel_block, sel_count=sel_count,
                         window=window, scale=scale, q_offset=n - S, win_k_offset=lo)
    return out


def _varlen(fn, cu_seqlens, args, kinds, kwargs):
    """Run ``fn`` on each sequence of a packed batch (B == 1) and concatenate along T.

    ``cu_seqlens``: int tensor ``[N+1]`` or the same as host ints (what the ops pass: slicing by
    host ints reads nothing back from the device, so ``torch.compile`` traces it).

    ``kinds[i]`` says how ``args[i]`` is split: "t" by ``cu_seqlens`` (one row per token),
    "c" by each sequence's Tc (compressed tokens back to back). Tuple outputs (o, lse) are
    concatenated element-wise.
    """
    bounds = cu_seqlens.tolist() if isinstance(cu_seqlens, torch.Tensor) else list(cu_seqlens)
    l, d = kwargs["cmp_block"] if "c" in kinds else 0, kwargs.get("cmp_stride", 1)
    results = []
    c0 = 0
    for s, e in zip(bounds[:-1], bounds[1:]):
        tc = num_cmp_blocks(e - s, l, d) if "c" in kinds else 0
        parts = [x[:, s:e] if kind == "t" else x[:, c0:c0 + tc] for x, kind in zip(args, kinds)]
        c0 += tc
        results.append(fn(*parts, **kwargs))
    if isinstance(results[0], tuple):
        return tuple(torch.cat(p, 1) for p in zip(*results))
    return torch.cat(results, 1)
