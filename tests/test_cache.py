"""Tests of NSACache's own writes (semantics §1, 9): append_chunk and append_step against a direct
computation from the whole sequence, without the layer."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from conftest import num_cmp

from nsa import NSACache, NSAConfig

SHARED = [pytest.param(False, id="separate-kv"), pytest.param(True, id="shared-kv")]


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(4321)


def make_cfg(shared_kv, **over):
    kw = dict(d_model=32, n_heads=4, n_kv_heads=2, head_dim=8, v_head_dim=6, cmp_block=4, cmp_stride=2,
              sel_block=8, sel_count=3, window=6, shared_kv=shared_kv, backend="torch")
    kw.update(over)
    return NSAConfig(**kw)


class WeightedPhi:
    """An order-sensitive phi (a mean would not see a permuted block): a fixed weighted sum over
    the block's positions; records the dtypes it is called with."""

    def __init__(self, l):
        self.w = torch.randn(l, dtype=torch.float64)
        self.dtypes = set()

    def __call__(self, blocks):  # [B, N, l, H, D] -> [B, N, H, D]
        self.dtypes.add(blocks.dtype)
        return torch.einsum("bnlhd,l->bnhd", blocks, self.w.to(blocks.dtype))


def make_seq(c, B, T, dtype=torch.float64):
    """(k, v) [B, T, H, D] of the whole sequence for the cmp, slc and win branches."""
    H = c.n_kv_heads

    def pair():
        return torch.randn(B, T, H, c.head_dim, dtype=dtype), torch.randn(B, T, H, c.v_head_dim, dtype=dtype)

    return [pair()] * 3 if c.shared_kv else [pair(), pair(), pair()]


def rows(seq, a, b):
    return [(k[:, a:b], v[:, a:b]) for k, v in seq]


def expected_cmp(seq, c, n, phi_k, phi_v):
    """k_cmp, v_cmp of positions 0..n-1 from the raw sequence: phi over [i*d, i*d + l)."""
    (kc, vc), l, d = seq[0], c.cmp_block, c.cmp_stride
    blocks = [list(range(i * d, i * d + l)) for i in range(num_cmp(n, l, d))]
    if not blocks:
        return kc[:, :0], vc[:, :0]
    idx = torch.tensor(blocks)
    return phi_k(kc[:, idx]), phi_v(vc[:, idx])


def check_buffers(cache, seq, c, n, phi_k, phi_v, rtol=0.0, atol=1e-12):
    """The cache holds positions 0..n-1 of seq as semantics §9 says."""
    close = dict(rtol=rtol, atol=atol)
    (kc, vc), (ks, vs), (kw, vw) = seq
    dt = cache.k_slc.dtype
    torch.testing.assert_close(cache.k_slc[:, :n], ks[:, :n].to(dt), **close)
    torch.testing.assert_close(cache.v_slc[:, :n], vs[:, :n].to(dt), **close)
    k_cmp, v_cmp = expected_cmp(seq, c, n, phi_k, phi_v)
    tc = k_cmp.shape[1]
    torch.testing.assert_close(cache.k_cmp[:, :tc], k_cmp.to(dt), **close)
    torch.testing.assert_close(cache.v_cmp[:, :tc], v_cmp.to(dt), **close)
    if cache.shared_kv:
        assert cache.k_win is None and cache.k_tail is None
        return
    w, l = c.window, c.cmp_block
    for p in range(max(0, n - w), n):  # ring: slot p % w holds the last w positions
        torch.testing.assert_close(cache.k_win[:, p % w], kw[:, p].to(dt), **close)
        torch.testing.assert_close(cache.v_win[:, p % w], vw[:, p].to(dt), **close)
    m = min(l - 1, n)  # tail: the last l-1 raw positions, the newest in the last row
    torch.testing.assert_close(cache.k_tail[:, l - 1 - m:], kc[:, n - m:n].to(dt), **close)
    torch.testing.assert_close(cache.v_tail[:, l - 1 - m:], vc[:, n - m:n].to(dt), **close)


def check_read(read, seq, c, s, n, phi_k, phi_v):
    """What append_chunk returned for the chunk s..n-1."""
    close = dict(rtol=0, atol=1e-12)
    (_, _), (ks, vs), (kw, vw) = seq
    k_cmp, v_cmp = expected_cmp(seq, c, n, phi_k, phi_v)
    torch.testing.assert_close(read.k_cmp, k_cmp, **close)
    torch.testing.assert_close(read.v_cmp, v_cmp, **close)
    torch.testing.assert_close(read.k_slc, ks[:, :n], **close)
    torch.testing.assert_close(read.v_slc, vs[:, :n], **close)
    if n - s == 1:  # a step: the ring, position p at row p % rows
        assert read.win_offset is None
        Tw = read.k_win.shape[1]
        for p in range(max(0, n - c.window), n):
            torch.testing.assert_close(read.k_win[:, p % Tw], kw[:, p], **close)
            torch.testing.assert_close(read.v_win[:, p % Tw], vw[:, p], **close)
    else:  # the last w-1 positions before the chunk, then the chunk
        assert read.win_offset == max(0, s - (c.window - 1))
        torch.testing.assert_close(read.k_win, kw[:, read.win_offset:n], **close)
        torch.testing.assert_close(read.v_win, vw[:, read.win_offset:n], **close)


@pytest.mark.parametrize("shared_kv", SHARED)
def test_append_chunk_buffers_equal_direct_computation(shared_kv):
    # l=4, d=2, w=6: chunks of one token, odd sizes, an empty one, chunks longer than the
    # window and than a block, crossing compression-block and ring boundaries
    c = make_cfg(shared_kv)
    sizes = [1, 3, 1, 1, 5, 2, 0, 7, 1, 13, 4, 1]
    T = sum(sizes)
    seq = make_seq(c, 2, T)
    phi_k, phi_v = WeightedPhi(c.cmp_block), WeightedPhi(c.cmp_block)
    cache = NSACache.allocate(c, 2, T + 3, dtype=torch.float64)
    s = 0
    for C in sizes:
        read = cache.append_chunk(rows(seq, s, s + C), phi_k=phi_k, phi_v=phi_v)
        assert cache.length == s + C
        check_read(read, seq, c, s, s + C, phi_k, phi_v)
        check_buffers(cache, seq, c, s + C, phi_k, phi_v)
        s += C
    assert not bool(cache.k_cmp[:, num_cmp(T, c.cmp_block, c.cmp_stride):].any())  # nothing past Tc(T)
    # the buffers depend on the keys: other keys give another compressed stream
    other = NSACache.allocate(c, 2, T, dtype=torch.float64)
    other.append_chunk(rows(make_seq(c, 2, T), 0, T), phi_k=phi_k, phi_v=phi_v)
    assert (other.k_cmp - cache.k_cmp[:, :other.k_cmp.shape[1]]).abs().max() > 1e-2


def _stack(caches):
    """One batch cache from per-sequence caches (each buffer concatenated along the batch)."""
    first = caches[0]
    bufs = {f.name: torch.cat([getattr(cc, f.name) for cc in caches]) for f in dataclasses.fields(NSACache)
            if isinstance(getattr(first, f.name), torch.Tensor)}
    return dataclasses.replace(first, **bufs)


@pytest.mark.parametrize("shared_kv", SHARED)
@pytest.mark.parametrize("lens,T", [pytest.param([0, 5, 11], 30, id="lens-0-5-11"),
                                    pytest.param([0, 2], 3, id="shorter-than-a-block")])
def test_append_step_equals_append_chunk_per_sequence(shared_kv, lens, T):
    """A batch of sequences at different lengths, one token each per append_step (positions on
    the device), equals append_chunk of one token on each sequence's own cache."""
    c = make_cfg(shared_kv)
    B = len(lens)
    seq = make_seq(c, B, T)
    phi_k, phi_v = WeightedPhi(c.cmp_block), WeightedPhi(c.cmp_block)
    own = [NSACache.allocate(c, 1, T, dtype=torch.float64) for _ in lens]
    for b, n in enumerate(lens):
        own[b].append_chunk([(k[b:b + 1, :n], v[b:b + 1, :n]) for k, v in seq], phi_k=phi_k, phi_v=phi_v)
    batch = _stack(own)
    batch.length = 0  # append_step neither reads nor advances it
    seqlens = torch.tensor(lens)
    names = [f.name for f in dataclasses.fields(NSACache) if isinstance(getattr(batch, f.name), torch.Tensor)]
    for _ in range(T - max(lens)):
        at = torch.arange(B)
        step = [(k[at, seqlens][:, None], v[at, seqlens][:, None]) for k, v in seq]  # [B, 1, H, D]
        read = batch.append_step(seqlens, step, phi_k=phi_k, phi_v=phi_v)
        for b in range(B):
            n = int(seqlens[b])
            own[b].append_chunk([(k[b:b + 1, n:n + 1], v[b:b + 1, n:n + 1]) for k, v in seq],
                                phi_k=phi_k, phi_v=phi_v)
            for name in names:  # every buffer, the rows not yet due included
                torch.testing.assert_close(getattr(batch, name)[b:b + 1], getattr(own[b], name),
                                           rtol=0, atol=1e-12, msg=f"{name}, row {b} at {n}")
        # the read: the whole buffers and the ring, as nsa_decode takes them
        assert read.win_offset is None and read.k_slc is batch.k_slc and read.k_cmp is batch.k_cmp
        assert read.k_win is (batch.k_slc if shared_kv else batch.k_win)
        seqlens += 1
    assert batch.length == 0
    for b in range(B):  # and each row holds its sequence
        row = dataclasses.replace(batch, **{name: getattr(batch, name)[b:b + 1] for name in names})
        check_buffers(row, [(k[b:b + 1], v[b:b + 1]) for k, v in seq], c, int(seqlens[b]), phi_k, phi_v)


@pytest.mark.parametrize("shared_kv", SHARED)
def test_cache_dtype_other_than_the_keys(shared_kv):
    # a bf16 cache fed fp32 keys: phi runs in fp32 over the bf16-rounded raw keys, its result
    # is stored in bf16, on both paths
    c = make_cfg(shared_kv)
    T = 17
    seq = make_seq(c, 2, T, torch.float32)
    rounded = [(k.bfloat16().float(), v.bfloat16().float()) for k, v in seq]
    phi_k, phi_v = WeightedPhi(c.cmp_block), WeightedPhi(c.cmp_block)
    chunked = NSACache.allocate(c, 2, T, dtype=torch.bfloat16)
    for a, b in ((0, 6), (6, 7), (7, 17)):
        chunked.append_chunk(rows(seq, a, b), phi_k=phi_k, phi_v=phi_v)
    stepped = NSACache.allocate(c, 2, T, dtype=torch.bfloat16)
    for t in range(T):
        stepped.append_step(torch.tensor([t, t]), rows(seq, t, t + 1), phi_k=phi_k, phi_v=phi_v)
    assert phi_k.dtypes == {torch.float32} and phi_v.dtypes == {torch.float32}
    for cache in (chunked, stepped):  # up to one bf16 ulp where phi's fp32 result is rounded
        check_buffers(cache, rounded, c, T, phi_k, phi_v, rtol=2 ** -7, atol=1e-6)


@pytest.mark.parametrize("shared_kv", SHARED)
def test_full_cache_raises_and_writes_nothing(shared_kv):
    c = make_cfg(shared_kv)
    seq = make_seq(c, 1, 13)
    phi_k, phi_v = WeightedPhi(c.cmp_block), WeightedPhi(c.cmp_block)
    cache = NSACache.allocate(c, 1, 10, dtype=torch.float64)
    cache.append_chunk(rows(seq, 0, 8), phi_k=phi_k, phi_v=phi_v)
    before = {f.name: getattr(cache, f.name).clone() for f in dataclasses.fields(NSACache)
              if isinstance(getattr(cache, f.name), torch.Tensor)}
    with pytest.raises(ValueError, match="cache is full: it holds 8 of max_seq_len=10.*cannot take 3"):
        cache.append_chunk(rows(seq, 8, 11), phi_k=phi_k, phi_v=phi_v)
    two = [(torch.cat([k, k]), torch.cat([v, v])) for k, v in rows(seq, 8, 9)]
    with pytest.raises(ValueError, match="batch 2 .*batch 1"):
        cache.append_chunk(two, phi_k=phi_k, phi_v=phi_v)
    assert cache.length == 8
    for name, t in before.items():
        assert torch.equal(getattr(cache, name), t), name
    cache.append_chunk(rows(seq, 8, 10), phi_k=phi_k, phi_v=phi_v)  # what fits still goes in
    assert cache.length == 10
    check_buffers(cache, seq, c, 10, phi_k, phi_v)
