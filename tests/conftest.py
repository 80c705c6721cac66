"""Shared helpers of the foundation tests: independent, loop-based NSA pieces in fp64.

Nothing here imports nsa.reference: these are the slow, obvious versions of docs/semantics.md that the
vectorised code is checked against.
"""

from __future__ import annotations

import math

import torch


def pytest_collection_modifyitems(config, items):
    """The sm_90 compile tests first (minutes in one file): with whole files to a worker
    (``--dist loadfile``), that file scheduled last kept one worker busy after the other ran out."""
    items.sort(key=lambda item: item.path.name != "test_spills.py")


def num_cmp(T: int, l: int, d: int) -> int:
    return 0 if T < l else (T - l) // d + 1


def causal_attention(q, k, v, scale=None, window=None):
    """Plain causal (optionally banded) softmax attention, fp64, GQA by head // h.

    q [B, T, HQ, Dk], k [B, T, H, Dk], v [B, T, H, Dv] -> [B, T, HQ, Dv] (fp64).
    """
    q, k, v = q.double(), k.double(), v.double()
    B, T, HQ, Dk = q.shape
    H = k.shape[2]
    h = HQ // H
    sc = 1.0 / math.sqrt(Dk) if scale is None else scale
    kk = k.repeat_interleave(h, dim=2)
    vv = v.repeat_interleave(h, dim=2)
    s = torch.einsum("bthd,buhd->bhtu", q, kk) * sc
    t = torch.arange(T)[:, None]
    u = torch.arange(T)[None, :]
    mask = u <= t
    if window is not None:
        mask = mask & (u > t - window)
    s = s.masked_fill(~mask, float("-inf"))
    return torch.einsum("bhtu,buhd->bthd", s.softmax(-1), vv)


def rope(x, positions, theta=10000.0):
    """LLaMA half-split RoPE in fp64, written from the formula: x [B, T, H, D]."""
    x = x.double()
    D = x.shape[-1]
    out = torch.empty_like(x)
    half = D // 2
    for i in range(half):
        freq = theta ** (-2.0 * i / D)
        ang = positions.double() * freq  # [T]
        c, s = ang.cos()[None, :, None], ang.sin()[None, :, None]
        out[..., i] = x[..., i] * c - x[..., i + half] * s
        out[..., i + half] = x[..., i] * s + x[..., i + half] * c
    return out


def loop_cmp_probs(q, k_cmp, l, d, scale=None):
    """p_cmp [B, T, HQ, Tc] by loops (fp64): softmax over visible compressed tokens."""
    q, k_cmp = q.detach().double(), k_cmp.detach().double()
    B, T, HQ, Dk = q.shape
    Tc, H = k_cmp.shape[1], k_cmp.shape[2]
    h = HQ // H
    sc = 1.0 / math.sqrt(Dk) if scale is None else scale
    p = torch.zeros(B, T, HQ, Tc, dtype=torch.float64)
    for b in range(B):
        for t in range(T):
            vis = [i for i in range(Tc) if i * d + l - 1 <= t]
            if not vis:
                continue
            for hd in range(HQ):
                s = torch.stack([(q[b, t, hd] * k_cmp[b, i, hd // h]).sum() * sc for i in vis])
                p[b, t, hd, vis] = s.softmax(0)
    return p


def loop_select(q, k_cmp, l, d, lp, n, scale=None, n_keys=None):
    """semantics §3-4 with Python loops over t, groups and blocks (fp64). Returns [B, T, H, n]."""
    B, T, HQ, _ = q.shape
    H = k_cmp.shape[2]
    h = HQ // H
    n_keys = T if n_keys is None else n_keys
    n_sel = -(-n_keys // lp)
    p = loop_cmp_probs(q, k_cmp, l, d, scale)
    Tc = k_cmp.shape[1]
    out = torch.full((B, T, H, n), -1, dtype=torch.int64)
    for b in range(B):
        for t in range(T):
            cur = t // lp
            forced = {0, cur} | ({cur - 1} if cur >= 1 else set())
            for g in range(H):
                scores = {}
                for j in range(n_sel):
                    if j * lp > t or j in forced:
                        continue
                    sc = 0.0
                    for hd in range(g * h, (g + 1) * h):
                        for i in range(Tc):
                            ov = len(set(range(i * d, i * d + l)) & set(range(j * lp, (j + 1) * lp)))
                            sc += ov / d * float(p[b, t, hd, i])
                    scores[j] = sc
                chosen = sorted(forced)
                rest = sorted(scores, key=lambda j: (-scores[j], j))
                chosen += rest[: n - len(chosen)]
                chosen = sorted(chosen)
                out[b, t, g, : len(chosen)] = torch.tensor(chosen)
    return out


def loop_selected_attention(q, k, v, idx, lp, scale=None):
    """Branch slc by loops (fp64): attention over u <= t inside the listed blocks."""
    q, k, v = q.double(), k.double(), v.double()
    B, T, HQ, Dk = q.shape
    H, Dv = k.shape[2], v.shape[-1]
    h = HQ // H
    sc = 1.0 / math.sqrt(Dk) if scale is None else scale
    o = torch.zeros(B, T, HQ, Dv, dtype=torch.float64)
    for b in range(B):
        for t in range(T):
            for hd in range(HQ):
                g = hd // h
                keys = sorted(u for j in idx[b, t, g].tolist() if j >= 0
                              for u in range(j * lp, (j + 1) * lp) if u <= t)
                s = torch.stack([(q[b, t, hd] * k[b, u, g]).sum() * sc for u in keys])
                o[b, t, hd] = s.softmax(0) @ v[b, keys, g]
    return o


def mean_compress(x, l, d):
    """phi = mean by a loop: [B, T, H, D] -> [B, Tc, H, D]."""
    T = x.shape[1]
    tc = num_cmp(T, l, d)
    if tc == 0:
        return x.new_zeros(x.shape[0], 0, *x.shape[2:])
    return torch.stack([x[:, i * d:i * d + l].mean(1) for i in range(tc)], 1)


def make_inputs(B, T, HQ, H, Dk, Dv, l, d, *, dtype=torch.float64, seed=0, gates=None,
                qscale=1.0):
    """Random NSA inputs (separate k/v per branch), k_cmp/v_cmp = mean compression."""
    gen = torch.Generator().manual_seed(seed)

    def r(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64)

    q = r(B, T, HQ, Dk) * qscale
    kc, vc = r(B, T, H, Dk), r(B, T, H, Dv)
    k_cmp, v_cmp = mean_compress(kc, l, d), mean_compress(vc, l, d)
    k_slc, v_slc, k_win, v_win = r(B, T, H, Dk), r(B, T, H, Dv), r(B, T, H, Dk), r(B, T, H, Dv)
    if gates is None:
        g = torch.rand(B, T, HQ, 3, generator=gen, dtype=torch.float64)
    else:
        g = torch.tensor(gates, dtype=torch.float64).expand(B, T, HQ, 3).clone()
    return [x.to(dtype) for x in (q, k_cmp, v_cmp, k_slc, v_slc, k_win, v_win, g)]


def draw_geometry(data, n_max: int = 6):
    """(l, d, l', n) drawn by hypothesis: d in 1..3, l and l' in d..3d (multiples of d), n in 3..n_max."""
    from hypothesis import strategies as st

    d = data.draw(st.integers(1, 3), label="d")
    l = d * data.draw(st.integers(1, 3), label="l/d")
    lp = d * data.draw(st.integers(1, 3), label="l'/d")
    n = data.draw(st.integers(3, n_max), label="n")
    return l, d, lp, n


def geom(l, d, lp, n, w):
    return dict(cmp_block=l, cmp_stride=d, sel_block=lp, sel_count=n, window=w)


def _masked_softmax_dense(s, mask):
    s = s.masked_fill(~mask, float("-inf"))
    any_ = mask.any(-1, keepdim=True)
    p = torch.where(any_, s, torch.zeros_like(s)).softmax(-1)
    return torch.where(mask, p, torch.zeros_like(p))


def dense_nsa(q, k_cmp, v_cmp, k_slc, v_slc, k_win, v_win, gates, idx, l, d, lp, w, scale=None,
              branches=False):
    """All of NSA given the block indices ``idx`` [B, T, H, n], with dense masks (fp64).

    An independent formulation: every branch is one masked softmax over all keys.
    """
    q = q.double()
    B, T, HQ, Dk = q.shape
    H = k_slc.shape[2]
    h = HQ // H
    sc = 1.0 / math.sqrt(Dk) if scale is None else scale
    t = torch.arange(T)[:, None]

    def att(k, v, mask):  # mask [B or 1, HQ or 1, T, S]
        kk = k.double().repeat_interleave(h, 2)
        vv = v.double().repeat_interleave(h, 2)
        s = torch.einsum("bthd,bshd->bhts", q, kk) * sc
        p = _masked_softmax_dense(s, mask)
        return torch.einsum("bhts,bshd->bthd", p, vv)

    tc = k_cmp.shape[1]
    i = torch.arange(tc)[None, :]
    o_cmp = att(k_cmp, v_cmp, (i * d + l - 1 <= t)[None, None])
    u = torch.arange(T)[None, :]
    n_sel = -(-T // lp)
    bm = torch.zeros(B, T, H, n_sel + 1, dtype=torch.bool)
    bm.scatter_(-1, torch.where(idx < 0, n_sel, idx), True)
    bm = bm[..., :n_sel]
    blk = (torch.arange(T) // lp)
    m = bm[..., blk] & (u <= t)[None, :, None, :]  # [B, T, H, T]
    m = m.permute(0, 2, 1, 3).repeat_interleave(h, 1)  # [B, HQ, T, T]
    o_slc = att(k_slc, v_slc, m)
    o_win = att(k_win, v_win, ((u <= t) & (u > t - w))[None, None])
    g = gates.double()
    o = g[..., 0:1] * o_cmp + g[..., 1:2] * o_slc + g[..., 2:3] * o_win
    if branches:
        return o, (o_cmp, o_slc, o_win)
    return o


def to_pages(k_cmp, v_cmp, k_slc, v_slc, page_size: int, cmp_stride: int, *, spare: int = 3, seed: int = 0):
    """Contiguous caches ([B, Tc, H, D] compressed, [B, Tk, H, D] keys/values) as page pools in a
    random page order (nsa_decode's paged layout): (k_cmp, v_cmp, k_slc, v_slc pools, block_table
    int32 [B, ceil(Tk / page_size)]). ``spare`` extra pages (and the pools' rows past each
    sequence's data) hold large garbage that a correct read never touches."""
    g = torch.Generator().manual_seed(seed)
    B, Tk = k_slc.shape[:2]
    P, cpp = -(-Tk // page_size), page_size // cmp_stride
    n_pages = B * P + spare
    table = torch.randperm(n_pages, generator=g)[:B * P].view(B, P).to(torch.int32).to(k_slc.device)

    def pool(x, rows):  # x [B, <= P*rows, H, D] -> [n_pages, rows, H, D]
        out = 1e3 * torch.randn(n_pages, rows, *x.shape[2:], generator=g).to(x.dtype).to(x.device)
        n = min(x.shape[1], P * rows)
        pad = torch.cat([x[:, :n], out.new_zeros(B, P * rows - n, *x.shape[2:])], 1)
        out[table.long().flatten()] = pad.reshape(B * P, rows, *x.shape[2:])
        return out

    return (pool(k_cmp, cpp), pool(v_cmp, cpp), pool(k_slc, page_size), pool(v_slc, page_size), table)


def nan_fenced(x):
    """x copied into the middle of a NaN-filled buffer (integers: -1): a kernel that reads past
    either end of x pulls NaN into its result, where a bare tensor's ends hold whatever memory
    follows (the CPU interpreter reads it; on a GPU compute-sanitizer would flag it)."""
    if x is None:
        return None
    fill = float("nan") if x.is_floating_point() else -1
    buf = torch.full((3 * x.numel(),), fill, dtype=x.dtype, device=x.device)
    y = buf[x.numel():2 * x.numel()].view(x.shape)
    y.copy_(x)
    return y


def shared_tile_lists(cu, bt: int, n: int, n_blocks: int, seed: int = 0):
    """Block lists for the slc kernels' split launch: per sequence of ``cu`` (boundaries), tiles
    of ``bt`` positions that either all list the same n blocks or list disjoint ones (needs
    ``n_blocks >= bt * n``), a fifth of the entries -1. Returns (rows [T][n], tiles: (distinct
    blocks, positions) per tile, in order)."""
    g = torch.Generator().manual_seed(seed)
    rows, tiles = [], []
    for s0, s1 in zip(cu[:-1], cu[1:]):
        for t0 in range(s0, s1, bt):
            together = torch.rand(1, generator=g).item() < 0.5
            blocks = torch.randperm(n_blocks, generator=g)
            m = min(bt, s1 - t0)
            for j in range(m):
                own = blocks[:n] if together else blocks[j * n:(j + 1) * n]
                rows.append(torch.where(torch.rand(n, generator=g) < 0.2, -1, own).tolist())
            lists = torch.tensor(rows[-m:])
            tiles.append((len(set(lists[lists >= 0].tolist())), m))
    return rows, tiles


def tiles_taken(tiles, most: int) -> list[int]:
    """Per position, 1 where its tile lists at most ``most`` distinct blocks (the split's flags)."""
    return sum(([int(u <= most)] * m for u, m in tiles), [])


class Launches:
    """Wraps an (interpreted) kernel: records each launch's constexprs and, after it, a copy of
    its pointer argument number ``arg``."""

    def __init__(self, kernel, arg: int):
        self.kernel, self.arg, self.calls = kernel, arg, []

    def __getitem__(self, grid):
        def run(*args, **kw):
            self.kernel[grid](*args, **kw)
            self.calls.append((kw, args[self.arg].clone()))
        return run
