"""``NSAAttention``: the drop-in attention layer (projections, RoPE, phi, gates, cache)."""

from __future__ import annotations

import torch
from torch import nn

from . import geometry, ops, reference
from .cache import MAX_NEW, NSACache, PagedBatch, PagedNSACache, kept
from .config import NSAConfig
from .rope import apply_rope, apply_rope_table, rope_cos_sin, rope_table

DECODE_BUCKET = 1024  # tokens: an eager decode step's grids are sized to its length rounded up to this


class Compressor(nn.Module):
    """phi of semantics §1: pools a block of l rotated keys (or values) into one token.

    "mean" averages the block. "mlp" adds a learned intra-block position embedding and an
    MLP over the flattened block on top of that mean; the position embedding and the MLP's
    last layer start at zero, so at init "mlp" equals "mean" exactly.
    """

    def __init__(self, kind: str, block: int, head_dim: int, hidden: int | None = None):
        super().__init__()
        self.kind = kind
        if kind == "mlp":
            hidden = hidden or head_dim
            self.pos = nn.Parameter(torch.zeros(block, head_dim))
            self.fc1 = nn.Linear(block * head_dim, hidden)
            self.fc2 = nn.Linear(hidden, head_dim)
            nn.init.zeros_(self.fc2.weight)
            nn.init.zeros_(self.fc2.bias)

    def params(self):
        """(pos, fc1 weight, fc1 bias, fc2 weight, fc2 bias) of "mlp", None for "mean": what
        :func:`nsa.reference.compress_phi` and the decode step's kernel take."""
        if self.kind == "mean":
            return None
        return self.pos, self.fc1.weight, self.fc1.bias, self.fc2.weight, self.fc2.bias

    def forward(self, blocks: torch.Tensor) -> torch.Tensor:
        """blocks [B, N, l, H, D] -> [B, N, H, D]."""
        return reference.compress_phi(blocks, self.params())


class NSAAttention(nn.Module):
    """Native Sparse Attention layer: ``layer(x) -> y`` with x, y ``[B, T, d_model]``.

    ``layer(x_chunk, cache=cache)`` continues a sequence held in ``cache`` (from
    :meth:`new_cache`): the chunk sits at the positions after the cache's, and the cache
    advances. One token per call is a decode step; any chunking gives the same outputs as
    one call over the whole sequence. ``layer(x, cache=paged.batch(slots))`` does the same on a
    paged cache (:meth:`new_cache` with ``page_size``) for sequences of different lengths that
    join and leave a running batch. ``cu_seqlens`` (int32 ``[N+1]``, B == 1) packs several
    sequences along T for training; positions restart at 0 in each.
    """

    def __init__(self, config: NSAConfig):
        super().__init__()
        self.config = c = config
        self.n_branches = 1 if c.shared_kv else 3
        self.q_proj = nn.Linear(c.d_model, c.n_heads * c.head_dim, bias=c.bias)
        # one fused projection: per branch (cmp, slc, win) k [H*Dk] then v [H*Dv]
        self.kv_proj = nn.Linear(c.d_model, self.n_branches * c.n_kv_heads * (c.head_dim + c.v_head_dim),
                                 bias=c.bias)
        self.phi_k = Compressor(c.compress, c.cmp_block, c.head_dim)
        self.phi_v = Compressor(c.compress, c.cmp_block, c.v_head_dim)
        if c.gate_hidden:
            self.gate = nn.Sequential(nn.Linear(c.d_model, c.gate_hidden), nn.SiLU(),
                                      nn.Linear(c.gate_hidden, 3 * c.n_heads))
        else:
            self.gate = nn.Linear(c.d_model, 3 * c.n_heads)
        self.o_proj = nn.Linear(c.n_heads * c.v_head_dim, c.d_model, bias=c.bias)

    # ------------------------------------------------------------------ projections
    def _project(self, x: torch.Tensor, pos: torch.Tensor, rope: torch.Tensor | None = None):
        """x [B, T, d_model], pos [B or 1, T] -> q, [(k, v) per branch], gates. q and every
        branch's keys rotate in one pass (the same values as one by one, ~10 kernels instead of
        ~40 each way: a small model's training step is launch-bound). ``rope`` (a decode step:
        :func:`nsa.rope.rope_table` of the cache's positions): the rotation's rows are gathered
        from it instead of computed (a step replayed as a graph pays per launch)."""
        c = self.config
        B, T, _ = x.shape
        H, Dk, Dv = c.n_kv_heads, c.head_dim, c.v_head_dim
        acc = torch.float64 if x.dtype == torch.float64 else torch.float32
        q = self.q_proj(x).view(B, T, c.n_heads, Dk)
        kv = self.kv_proj(x).split([H * Dk, H * Dv] * self.n_branches, dim=-1)
        keys = [kv[2 * i].view(B, T, H, Dk) for i in range(self.n_branches)]
        qk = torch.cat([q, *keys], 2)  # [B, T, HQ + branches * H, Dk]
        if rope is None:
            rotated = apply_rope(qk, *rope_cos_sin(pos, Dk, c.rope_theta, dtype=acc))
        else:
            rotated = apply_rope_table(qk, rope[pos])
        q, *keys = rotated.split([c.n_heads] + [H] * self.n_branches, dim=2)
        if rope is None:  # the op saves its inputs for the backward: contiguous ones, copied once
            q, keys = q.contiguous(), [k.contiguous() for k in keys]
        pairs = [(keys[i], kv[2 * i + 1].view(B, T, H, Dv)) for i in range(self.n_branches)]
        if self.n_branches == 1:
            pairs = pairs * 3
        gates = torch.sigmoid(self.gate(x)).view(B, T, c.n_heads, 3)
        return q, pairs, gates

    def _out(self, o: torch.Tensor) -> torch.Tensor:
        B, T, HQ, Dv = o.shape
        return self.o_proj(o.reshape(B, T, HQ * Dv))  # explicit width: T may be 0

    # ------------------------------------------------------------------ forward
    def forward(self, x: torch.Tensor, cache: NSACache | None = None, cu_seqlens=None,
                return_selection: bool = False):
        """Returns y ``[B, T, d_model]`` (and the block indices ``[B, T, H, n]`` when
        ``return_selection``).

        ``cu_seqlens``: int32 ``[N+1]`` (validated: one host read) or, under ``torch.compile``,
        the tables of :meth:`varlen_tables` built before the compiled region.
        """
        if not isinstance(x, torch.Tensor) or x.dim() != 3 or x.shape[-1] != self.config.d_model:
            shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"x must have shape [B, T, d_model={self.config.d_model}], got {shape}")
        if cache is not None:
            if cu_seqlens is not None:
                raise ValueError("cu_seqlens cannot be combined with a cache")
            if isinstance(cache, PagedBatch):
                return self._forward_paged(x, cache, return_selection)
            if isinstance(cache, PagedNSACache):
                raise TypeError("a paged cache is passed as cache.batch(slots): the sequences the chunk continues")
            return self._forward_cached(x, cache, return_selection)
        c = self.config
        B, T, _ = x.shape
        # before it is used to index x
        tables = ops.as_varlen_tables(cu_seqlens, T, B, x.device, c.cmp_block, c.cmp_stride)
        pos = torch.arange(T, device=x.device)[None] if tables is None else tables.positions[None]  # [1, T]
        q, ((kc, vc), (ks, vs), (kw, vw)), gates = self._project(x, pos)
        k_cmp = self.phi_k(_blocks(kc, c.cmp_block, c.cmp_stride, tables))
        v_cmp = self.phi_v(_blocks(vc, c.cmp_block, c.cmp_stride, tables))
        geom = self._geometry()
        o = ops.nsa_func(q, k_cmp, v_cmp, ks, vs, kw, vw, gates, cu_seqlens=tables,
                         backend=c.backend, deterministic=c.deterministic, **geom)
        y = self._out(o)
        if return_selection:
            sel = ops.select_blocks(q, k_cmp, cu_seqlens=tables, backend=c.backend,
                                    **{k: v for k, v in geom.items() if k != "window"})
            return y, sel
        return y

    def varlen_tables(self, cu_seqlens: torch.Tensor) -> ops.VarlenTables:
        """:func:`nsa.varlen_tables` of ``cu_seqlens`` for this layer's compression geometry:
        what ``forward(x, cu_seqlens=...)`` takes inside ``torch.compile`` (built outside it)."""
        return ops.varlen_tables(cu_seqlens, cmp_block=self.config.cmp_block, cmp_stride=self.config.cmp_stride)

    def _geometry(self) -> dict:
        c = self.config
        return dict(cmp_block=c.cmp_block, cmp_stride=c.cmp_stride, sel_block=c.sel_block,
                    sel_count=c.sel_count, window=c.window, scale=c.scale)

    # ------------------------------------------------------------------ cache
    @torch.no_grad()
    def new_cache(self, batch_size: int, max_seq_len: int, *, dtype=None, device=None,
                  page_size: int | None = None, num_pages: int | None = None) -> NSACache | PagedNSACache:
        """Preallocate the cache for ``batch_size`` sequences of up to ``max_seq_len`` tokens
        (dtype and device default to the layer's).

        With ``page_size`` (a multiple of cmp_stride): a :class:`nsa.PagedNSACache` of up to
        ``batch_size`` sequences at once, in ``num_pages`` pages (default: enough for
        ``batch_size`` full sequences), whose sequences join (``add_sequence``) and leave
        (``free``) a running batch; the layer takes ``cache.batch(slots)`` as ``cache``."""
        p = self.q_proj.weight
        kw = dict(dtype=dtype or p.dtype, device=device or p.device)
        if page_size is not None:
            return PagedNSACache.allocate(self.config, batch_size, max_seq_len, page_size=page_size,
                                          num_pages=num_pages, **kw)
        if num_pages is not None:
            raise ValueError("num_pages needs page_size (a paged cache)")
        return NSACache.allocate(self.config, batch_size, max_seq_len, **kw)

    def _forward_paged(self, x: torch.Tensor, view: PagedBatch, return_selection: bool):
        """A chunk of C tokens per sequence of a paged batch, each sequence at its own length.
        C <= 8: one nsa_decode call (every query of the chunk through the decode kernels);
        a first chunk (every sequence empty): nsa_func on the chunk's own keys, read back from
        the pages; otherwise steps of 8 tokens."""
        from .reference import gather_pages

        if return_selection:
            raise ValueError("return_selection is not supported with a paged cache")
        c = self.config
        B, C, _ = x.shape
        if B != view.batch_size:
            raise ValueError(f"x has batch {B} but the cache view holds {view.batch_size} sequences")
        if C == 0:
            return self._out(x.new_zeros(B, 0, c.n_heads, c.v_head_dim))
        lens = view.lengths
        if C > MAX_NEW and any(lens):
            return torch.cat([self._forward_paged(x[:, i:i + MAX_NEW], view, False)
                              for i in range(0, C, MAX_NEW)], 1)
        pos = torch.tensor(lens, device=x.device)[:, None] + torch.arange(C, device=x.device)  # [B, C]
        q, branches, gates = self._project(x, pos)
        kv = view.append_chunk(branches, phi_k=self.phi_k, phi_v=self.phi_v)
        geom = self._geometry()
        dt = kv.k_slc.dtype
        qd, gd = q.to(dt), gates.to(dt)
        if C <= MAX_NEW:
            o = ops.nsa_decode(qd, kv.k_cmp, kv.v_cmp, kv.k_slc, kv.v_slc, kv.k_win, kv.v_win, gd,
                               cache_seqlens=kv.seqlens, block_table=kv.block_table, backend=c.backend, **geom)
        else:  # the first chunk of every sequence: its keys are all there is
            n_pages = -(-C // view.cache.page_size)
            k_s, v_s = (gather_pages(t, kv.block_table, n_pages)[:, :C] for t in (kv.k_slc, kv.v_slc))
            tc = geometry.num_cmp_blocks(C, c.cmp_block, c.cmp_stride)
            k_c, v_c = (gather_pages(t, kv.block_table, n_pages)[:, :tc] for t in (kv.k_cmp, kv.v_cmp))
            k_w, v_w = (k_s, v_s) if kv.k_win is None else (branches[2][0].to(dt), branches[2][1].to(dt))
            o = ops.nsa_func(qd, k_c, v_c, k_s, v_s, k_w, v_w, gd, backend=c.backend, **geom)
        return self._out(o.to(x.dtype))

    def _forward_cached(self, x: torch.Tensor, cache: NSACache, return_selection: bool):
        c = self.config
        C, s = x.shape[1], cache.length
        pos = torch.arange(s, s + C, device=x.device)[None]
        q, branches, gates = self._project(x, pos)
        kv = cache.append_chunk(branches, phi_k=self.phi_k, phi_v=self.phi_v)
        geom = self._geometry()
        dt = cache.k_slc.dtype
        qd = q.to(dt)
        if C == 1:  # a decode step: nsa_decode reads the window's ring buffer in place
            # the whole buffers, lengths on the device and a bound that moves once per
            # DECODE_BUCKET tokens: the shapes stay, so the step skips nsa_decode's checks and
            # keeps the kernels' launch plan (relaunched) from token to token
            bound = min(cache.max_seq_len, -(-(s + 1) // DECODE_BUCKET) * DECODE_BUCKET)
            lens = torch.full((x.shape[0],), s + 1, dtype=torch.int32, device=x.device)
            k_w, v_w = (None, None) if cache.shared_kv else (kv.k_win, kv.v_win)
            o = ops.nsa_decode(qd, cache.k_cmp, cache.v_cmp, cache.k_slc, cache.v_slc, k_w, v_w, gates.to(dt),
                               cache_seqlens=lens, max_seqlen=bound, backend=c.backend, **geom)
        elif 1 < C <= MAX_NEW:  # a few tokens (speculative verification): the decode path, split over keys
            if c.shared_kv:
                k_w, v_w = kv.k_slc, kv.v_slc  # position p at row p
            else:  # positions win_offset.. in order -> a ring of R rows, position p at row p % R
                R = kv.k_win.shape[1]
                k_w, v_w = (torch.roll(t, kv.win_offset % R, 1) for t in (kv.k_win, kv.v_win))
            o = ops.nsa_decode(qd, kv.k_cmp, kv.v_cmp, kv.k_slc, kv.v_slc, k_w, v_w, gates.to(dt),
                               cache_seqlens=s + C, backend=c.backend, **geom)
        else:
            o = ops.nsa_func(qd, kv.k_cmp, kv.v_cmp, kv.k_slc, kv.v_slc, kv.k_win, kv.v_win, gates.to(dt),
                             q_offset=s, win_k_offset=kv.win_offset, backend=c.backend, **geom)
        y = self._out(o.to(x.dtype))
        if return_selection:
            geom.pop("window")
            sel = reference.select_blocks_ref(qd, kv.k_cmp, q_offset=s, **geom)
            return y, sel
        return y

    @torch.no_grad()
    def decode_step(self, x: torch.Tensor, cache: NSACache | PagedBatch, seqlens: torch.Tensor) -> torch.Tensor:
        """One new token per sequence, with the lengths on the device: fixed shapes and no
        host sync, so the step can be captured in a CUDA graph and replayed.

        Args:
            x: ``[B, 1, d_model]`` the new tokens' inputs.
            cache: this layer's cache (:meth:`new_cache`), filled up to ``seqlens``, or the
                view ``paged.batch(slots)`` of a paged cache whose pages for this token were
                taken beforehand (``view.reserve(n)`` before n steps; ``view.advance(n)``
                after them records the tokens on the host).
            seqlens: int tensor ``[B]`` on x's device: the positions each sequence holds
                before this token (each in [0, max_seq_len - 1], not checked: reading them
                would sync). The cache's ``length`` is neither read nor updated: the caller
                advances ``seqlens`` (and ``cache.length`` when it goes back to chunked calls).

        Returns ``[B, 1, d_model]``, equal to ``self(x, cache=cache)`` at those lengths.
        """
        c = self.config
        if isinstance(cache, PagedNSACache):
            raise TypeError("a paged cache is passed as cache.batch(slots): the sequences the step continues")
        check_decode_step(x, c.d_model, cache.batch_size, seqlens)
        s = seqlens.long()  # [B] this token's position
        paged = isinstance(cache, PagedBatch)
        owner = cache.cache if paged else cache
        rope = None  # traced (torch.compile): the rotation computed in the graph (fused), no table
        if not torch.compiler.is_compiling():
            acc = torch.float64 if x.dtype == torch.float64 else torch.float32
            rope = kept(owner, ("rope", c.head_dim, c.rope_theta, acc),
                        lambda: rope_table(owner.max_seq_len, c.head_dim, c.rope_theta, x.device, acc))
        if rope is not None and x.dtype != torch.float64 and ops.resolve_backend(c.backend, x.device) == "triton":
            # the rotation and the cache's writes in one launch (nsa.triton.append)
            q, kv = cache.append_step_projected(s, self.q_proj(x), self.kv_proj(x), rope, n_heads=c.n_heads,
                                                phi_k=self.phi_k, phi_v=self.phi_v, backend="triton")
            gates = torch.sigmoid(self.gate(x)).view(x.shape[0], 1, c.n_heads, 3)
        else:
            q, branches, gates = self._project(x, s[:, None], rope=rope)
            kv = cache.append_step(s, branches, phi_k=self.phi_k, phi_v=self.phi_v,
                                   backend=ops.resolve_backend(c.backend, x.device))
        dt = kv.k_slc.dtype
        o = ops.nsa_decode(q.to(dt), kv.k_cmp, kv.v_cmp, kv.k_slc, kv.v_slc, kv.k_win, kv.v_win, gates.to(dt),
                           cache_seqlens=s + 1, max_seqlen=owner.max_seq_len,
                           block_table=kv.block_table if paged else None, backend=c.backend, **self._geometry())
        return self._out(o.to(x.dtype))


def check_decode_step(x: torch.Tensor, d_model: int, cache_batch: int, seqlens) -> None:
    """The arguments of a layer's ``decode_step``: x [B, 1, d_model], the cache's batch B and
    seqlens an int tensor [B] on x's device (shapes and types only: values would sync)."""
    B = x.shape[0]
    if x.dim() != 3 or x.shape[1] != 1 or x.shape[2] != d_model:
        raise ValueError(f"x must have shape [B, 1, d_model={d_model}], got {list(x.shape)}")
    if B != cache_batch:
        raise ValueError(f"x has batch {B} but the cache was made for batch {cache_batch}")
    if (not isinstance(seqlens, torch.Tensor) or seqlens.shape != (B,)
            or seqlens.dtype not in (torch.int32, torch.int64) or seqlens.device != x.device):
        raise ValueError(f"seqlens must be an int32/int64 tensor [B] = [{B}] on {x.device}, got "
                         f"{seqlens.dtype if isinstance(seqlens, torch.Tensor) else type(seqlens).__name__}"
                         f"{list(seqlens.shape) if isinstance(seqlens, torch.Tensor) else ''}")


def _blocks(x: torch.Tensor, l: int, d: int, tables: ops.VarlenTables | None) -> torch.Tensor:
    """Raw compression blocks [B, Tc, l, H, D] (packed per sequence with cu_seqlens' tables)."""
    if tables is None:
        return reference.cmp_blocks(x, l, d)
    return x[:, tables.cmp_index]  # [B, Tc, l, H, D]
