"""Tests of NSAAttention, its KV cache and NSAConfig (semantics §1, 9, 10)."""

from __future__ import annotations

import random

import pytest
import torch
from conftest import causal_attention, dense_nsa, draw_geometry, loop_select, num_cmp, rope
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from nsa import NSAAttention, NSAConfig
from nsa.layer import Compressor


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(1234)  # this module's unseeded draws are the same in every run and order


def make_cfg(**over):
    kw = dict(d_model=32, n_heads=4, n_kv_heads=2, head_dim=8, v_head_dim=6, cmp_block=4,
              cmp_stride=2, sel_block=8, sel_count=3, window=6, compress="mean", shared_kv=False,
              backend="torch")
    kw.update(over)
    return NSAConfig(**kw)


def make_layer(seed=0, randomize=True, dtype=torch.float32, **over):
    torch.manual_seed(seed)
    layer = NSAAttention(make_cfg(**over))
    if randomize:  # every parameter non-trivial (incl. the mlp phi's zero-initialised ones)
        with torch.no_grad():
            for p in layer.parameters():
                p.copy_(torch.randn_like(p) * (0.5 / max(1, p.shape[-1]) ** 0.5 if p.dim() > 1 else 0.1))
    return layer.to(dtype)


def force_gates(layer, gates):
    """Make the gate MLP output exactly ``gates`` (0 or 1) for every token and head."""
    with torch.no_grad():
        layer.gate.weight.zero_()
        b = torch.tensor([1e4 if g else -1e4 for g in gates], dtype=layer.gate.bias.dtype)
        layer.gate.bias.view(layer.config.n_heads, 3).copy_(b)


# --------------------------------------------------------------------------- independent layer


def _proj(layer, x):
    """q, [(k, v) for cmp, slc, win], gates of the layer in fp64, from its weights."""
    c = layer.config
    B, T, _ = x.shape
    x = x.double()
    H, Dk, Dv, HQ = c.n_kv_heads, c.head_dim, c.v_head_dim, c.n_heads
    pos = torch.arange(T)
    q = rope((x @ layer.q_proj.weight.double().T).view(B, T, HQ, Dk), pos, c.rope_theta)
    W = layer.kv_proj.weight.double()
    pairs, r = [], 0
    for _ in range(1 if c.shared_kv else 3):
        k = (x @ W[r:r + H * Dk].T).view(B, T, H, Dk)
        r += H * Dk
        v = (x @ W[r:r + H * Dv].T).view(B, T, H, Dv)
        r += H * Dv
        pairs.append((rope(k, pos, c.rope_theta), v))
    if c.shared_kv:
        pairs *= 3
    g = torch.sigmoid(x @ layer.gate.weight.double().T + layer.gate.bias.double()).view(B, T, HQ, 3)
    return q, pairs, g


def _o(layer, o):
    B, T = o.shape[:2]
    return o.reshape(B, T, -1) @ layer.o_proj.weight.double().T


def independent_layer(layer, x):
    """The whole layer (phi = mean) in fp64 with loop selection and dense masks."""
    c = layer.config
    q, ((kc, vc), (ks, vs), (kw, vw)), g = _proj(layer, x)
    l, d = c.cmp_block, c.cmp_stride
    T = x.shape[1]
    tc = num_cmp(T, l, d)
    k_cmp = torch.stack([kc[:, i * d:i * d + l].mean(1) for i in range(tc)], 1) if tc else kc[:, :0]
    v_cmp = torch.stack([vc[:, i * d:i * d + l].mean(1) for i in range(tc)], 1) if tc else vc[:, :0]
    idx = loop_select(q, k_cmp, l, d, c.sel_block, c.sel_count, scale=c.scale)
    o = dense_nsa(q, k_cmp, v_cmp, ks, vs, kw, vw, g, idx, l, d, c.sel_block, c.window, scale=c.scale)
    return _o(layer, o), idx


# --------------------------------------------------------------------------- semantics §10 equivalences

SHARED = [pytest.param(False, id="separate-kv"), pytest.param(True, id="shared-kv")]


@pytest.mark.parametrize("shared_kv", SHARED)
@pytest.mark.parametrize("T", [pytest.param(1, id="T1"), pytest.param(23, id="T23")])
def test_layer_window_only_is_causal_attention(T, shared_kv):
    layer = make_layer(window=T + 3, shared_kv=shared_kv)
    force_gates(layer, (0, 0, 1))
    x = torch.randn(2, T, 32)
    q, pairs, _ = _proj(layer, x)
    want = _o(layer, causal_attention(q, *pairs[2]))
    assert (layer(x).double() - want).abs().max().item() <= 1e-5


@pytest.mark.parametrize("shared_kv", SHARED)
@pytest.mark.parametrize("T,n", [pytest.param(24, 3, id="n-lp-eq-T"), pytest.param(21, 4, id="n-lp-gt-T")])
def test_layer_full_selection_is_causal_attention(T, n, shared_kv):
    layer = make_layer(sel_count=n, shared_kv=shared_kv, window=2)
    force_gates(layer, (0, 1, 0))
    x = torch.randn(2, T, 32)
    q, pairs, _ = _proj(layer, x)
    want = _o(layer, causal_attention(q, *pairs[1]))
    assert (layer(x).double() - want).abs().max().item() <= 1e-5


@pytest.mark.parametrize("shared_kv", SHARED)
@pytest.mark.parametrize("T,scale", [pytest.param(3, None, id="T-lt-l"), pytest.param(37, None, id="T37"),
                                     pytest.param(29, 0.9, id="T29-scale")])
def test_layer_equals_independent_fp64_layer(T, scale, shared_kv):
    layer = make_layer(seed=T, shared_kv=shared_kv, scale=scale)
    x = torch.randn(1, T, 32) * 2
    want, idx = independent_layer(layer, x)
    y, sel = layer(x, return_selection=True)
    assert (y.double() - want).abs().max().item() <= 1e-5
    y64, sel64 = layer.double()(x.double(), return_selection=True)
    assert (y64 - want).abs().max().item() <= 1e-12
    assert torch.equal(sel64, idx)


# --------------------------------------------------------------------------- prefill = chunks = decode

VARIANTS = [pytest.param(phi, shared, id=f"{phi}-{'shared' if shared else 'separate'}")
            for phi in ("mean", "mlp") for shared in (False, True)]


def _chunked(layer, x, sizes, cache=None):
    cache = cache or layer.new_cache(x.shape[0], x.shape[1])
    ys, sels, s = [], [], 0
    for c in sizes:
        y, sel = layer(x[:, s:s + c], cache=cache, return_selection=True)
        ys.append(y)
        sels.append(sel)
        s += c
    assert cache.length == s
    return torch.cat(ys, 1), torch.cat(sels, 1)


def _random_sizes(T, rng, hi=9):
    sizes = []
    while sum(sizes) < T:
        sizes.append(min(rng.randint(1, hi), T - sum(sizes)))
    return sizes


@pytest.mark.parametrize("phi,shared_kv", VARIANTS)
def test_prefill_equals_chunked_prefill_equals_decode(phi, shared_kv):
    T = 45  # not a multiple of l=4, d=2, l'=8, w=6
    layer = make_layer(seed=3, compress=phi, shared_kv=shared_kv)
    x = torch.randn(2, T, 32)
    with torch.no_grad():
        y, sel = layer(x, return_selection=True)
        rng = random.Random(0)
        for sizes in ([T], [1] * T, _random_sizes(T, rng), _random_sizes(T, rng, 20), [13, 1, 1, 30]):
            yc, selc = _chunked(layer, x, sizes)
            assert (yc - y).abs().max().item() <= 1e-5, sizes
            assert torch.equal(selc, sel), sizes
    # the computation is not trivially insensitive: another x gives other outputs
    assert (layer(torch.randn(2, T, 32)) - y).abs().max().item() > 1e-2


@pytest.mark.parametrize("shared_kv", SHARED)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_decode_projection_from_the_rope_table_is_bitwise_the_computed_one(shared_kv, dtype):
    """A decode step gathers cos/sin from a table of the cache's positions and rotates q and every
    branch's keys in one pass: bit for bit what the computed cos/sin and separate rotations give."""
    layer = make_layer(seed=2, shared_kv=shared_kv, dtype=dtype)
    x = torch.randn(3, 1, 32, dtype=dtype)
    pos = torch.tensor([[0], [17], [40]])
    with torch.no_grad():
        q, pairs, gates = layer._project(x, pos)
        from nsa.rope import rope_table

        rope = rope_table(41, layer.config.head_dim, layer.config.rope_theta, x.device, dtype)
        q2, pairs2, gates2 = layer._project(x, pos, rope=rope)
    assert torch.equal(q, q2) and torch.equal(gates, gates2)
    for (k, v), (k2, v2) in zip(pairs, pairs2):
        assert torch.equal(k, k2) and torch.equal(v, v2)
    with torch.no_grad():  # rotated: position 0 keeps the projection, position 17 does not
        raw = layer.q_proj(x).view(q.shape)
    assert torch.equal(q[0], raw[0]) and not torch.allclose(q[1], raw[1])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32, torch.float64])
def test_rope_table_rotation_is_bitwise_apply_rope(dtype):
    """apply_rope_table (x * [cos, cos] + [x2, x1] * [-sin, sin] from table rows) equals
    apply_rope (fp32 math, fp64 for fp64) bit for bit, far positions and every dtype included."""
    from nsa.rope import apply_rope, apply_rope_table, rope_cos_sin, rope_table

    acc = torch.float64 if dtype == torch.float64 else torch.float32
    x = torch.randn(3, 2, 5, 48, dtype=torch.float64).to(dtype)
    pos = torch.tensor([[0, 1], [777, 4095], [70000, 131071]])
    want = apply_rope(x, *rope_cos_sin(pos, 48, 1e6, dtype=acc))
    got = apply_rope_table(x, rope_table(131072, 48, 1e6, torch.device("cpu"), acc)[pos])
    assert got.dtype == dtype and torch.equal(got, want)
    assert not torch.equal(got[1:], x[1:])  # the positions do rotate


@pytest.mark.parametrize("phi,shared_kv", VARIANTS)
def test_decode_step_with_device_lengths_equals_full(phi, shared_kv):
    """decode_step (lengths as a tensor, fixed shapes: what a CUDA graph replays) after a prefill,
    with sequences of different lengths in one batch, equals the full layer on each sequence."""
    layer = make_layer(seed=6, compress=phi, shared_kv=shared_kv)
    lens, T = [5, 2, 11], 33  # prefill lengths (each row its own), then decode to T
    x = torch.randn(3, T, 32)
    with torch.no_grad():
        full = layer(x)
        caches = [layer.new_cache(1, T) for _ in lens]
        for b, n in enumerate(lens):  # each row prefilled alone, then the rows' buffers stacked
            layer(x[b:b + 1, :n], cache=caches[b])
        cache = layer.new_cache(3, T)
        for name in ("k_slc", "v_slc", "k_cmp", "v_cmp", "k_win", "v_win", "k_tail", "v_tail"):
            if getattr(cache, name) is not None:
                getattr(cache, name).copy_(torch.cat([getattr(cc, name) for cc in caches]))
        seqlens = torch.tensor(lens)
        for _ in range(T - max(lens)):  # every row decodes as many tokens, from its own position
            s = seqlens.clone()
            y = layer.decode_step(x[torch.arange(3), s][:, None], cache, seqlens)  # [3, 1, d]
            err = (y[:, 0] - full[torch.arange(3), s]).abs().max().item()
            assert err <= 1e-5, s.tolist()
            seqlens += 1
    assert (layer(torch.randn(3, T, 32)) - full).abs().max().item() > 1e-2


@pytest.mark.parametrize("shared_kv", SHARED)
def test_decode_step_cache_shorter_than_a_block(shared_kv):
    layer = make_layer(seed=7, shared_kv=shared_kv)  # l = 4
    x = torch.randn(1, 3, 32)
    with torch.no_grad():
        full = layer(x)
        cache = layer.new_cache(1, 3)
        layer(x[:, :1], cache=cache)
        for t in (1, 2):
            y = layer.decode_step(x[:, t:t + 1], cache, torch.tensor([t]))
            assert (y[0, 0] - full[0, t]).abs().max().item() <= 1e-5


def test_decode_step_bad_args():
    layer = make_layer()
    cache = layer.new_cache(2, 10)
    with pytest.raises(ValueError, match="seqlens"):
        layer.decode_step(torch.randn(2, 1, 32), cache, torch.tensor([1.0, 2.0]))
    with pytest.raises(ValueError, match="seqlens"):
        layer.decode_step(torch.randn(2, 1, 32), cache, 3)
    with pytest.raises(ValueError, match=r"\[B, 1, d_model"):
        layer.decode_step(torch.randn(2, 2, 32), cache, torch.tensor([1, 2]))
    with pytest.raises(ValueError, match="batch"):
        layer.decode_step(torch.randn(3, 1, 32), cache, torch.tensor([1, 2, 3]))


def test_cache_reset_and_reuse():
    layer = make_layer(seed=4, compress="mlp")
    x1, x2 = torch.randn(1, 19, 32), torch.randn(1, 26, 32)
    cache = layer.new_cache(1, 30)
    with torch.no_grad():
        _chunked(layer, x1, [5, 14], cache)
        cache.reset()
        y2, _ = _chunked(layer, x2, [1, 7, 18], cache)
        assert (y2 - layer(x2)).abs().max().item() <= 1e-5


def test_cache_contents_follow_spec():
    layer = make_layer(seed=5, window=5)
    c = layer.config
    T = 23
    x = torch.randn(1, T, 32)
    cache = layer.new_cache(1, 30)
    with torch.no_grad():
        _chunked(layer, x, [3, 1, 9, 10], cache)
    q, ((kc, vc), (ks, vs), (kw, vw)), _ = _proj(layer, x)
    l, d, w = c.cmp_block, c.cmp_stride, c.window
    tc = num_cmp(T, l, d)
    k_cmp = torch.stack([kc[:, i * d:i * d + l].mean(1) for i in range(tc)], 1)
    torch.testing.assert_close(cache.k_cmp[:, :tc].double(), k_cmp, rtol=0, atol=1e-5)
    torch.testing.assert_close(cache.k_slc[:, :T].double(), ks, rtol=0, atol=1e-5)
    for p in range(T - w, T):  # ring buffer: slot = position % w holds the last w positions
        torch.testing.assert_close(cache.k_win[:, p % w].double(), kw[:, p], rtol=0, atol=1e-5)
        torch.testing.assert_close(cache.v_win[:, p % w].double(), vw[:, p], rtol=0, atol=1e-5)
    torch.testing.assert_close(cache.k_tail.double(), kc[:, T - (l - 1):], rtol=0, atol=1e-5)


@settings(max_examples=12, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
@given(data=st.data())
def test_property_chunked_decode_equals_full(data):
    l, d, lp, n = draw_geometry(data, n_max=5)
    w = data.draw(st.integers(1, 10), label="w")
    h = data.draw(st.sampled_from([1, 2, 4]), label="h")
    T = data.draw(st.integers(1, 30), label="T")
    phi = data.draw(st.sampled_from(["mean", "mlp"]), label="phi")
    shared = data.draw(st.booleans(), label="shared_kv")
    bias = data.draw(st.booleans(), label="bias")
    gate_hidden = data.draw(st.sampled_from([0, 8]), label="gate_hidden")
    seed = data.draw(st.integers(0, 1000), label="seed")
    layer = make_layer(seed=seed, cmp_block=l, cmp_stride=d, sel_block=lp, sel_count=n, window=w,
                       n_heads=2 * h, n_kv_heads=2, compress=phi, shared_kv=shared, bias=bias,
                       gate_hidden=gate_hidden)
    x = torch.randn(1, T, 32, generator=torch.Generator().manual_seed(seed))
    sizes = _random_sizes(T, random.Random(seed), hi=7)
    with torch.no_grad():
        y, sel = layer(x, return_selection=True)
        yc, selc = _chunked(layer, x, sizes)
    assert (yc - y).abs().max().item() <= 1e-5
    assert torch.equal(selc, sel)


# --------------------------------------------------------------------------- varlen, batch


def test_layer_cu_seqlens_equals_separate_calls():
    layer = make_layer(seed=6, compress="mlp")
    lens = [11, 3, 0, 25]
    xs = [torch.randn(1, n, 32) for n in lens]
    cu = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32)
    with torch.no_grad():
        y, sel = layer(torch.cat(xs, 1), cu_seqlens=cu, return_selection=True)
        for i, xi in enumerate(xs):
            if not lens[i]:
                continue
            a, b = cu[i].item(), cu[i + 1].item()
            yi, si = layer(xi, return_selection=True)
            assert (y[:, a:b] - yi).abs().max().item() <= 1e-5
            assert torch.equal(sel[:, a:b], si)


def test_layer_batch_rows_are_independent():
    layer = make_layer(seed=7)
    x = torch.randn(3, 20, 32)
    with torch.no_grad():
        y = layer(x)
        assert (layer(x[1:2]) - y[1:2]).abs().max().item() <= 1e-6


# --------------------------------------------------------------------------- causality


@pytest.mark.parametrize("phi,shared_kv", VARIANTS)
def test_layer_causality(phi, shared_kv):
    T = 30
    layer = make_layer(seed=8, compress=phi, shared_kv=shared_kv).double()
    x = torch.randn(1, T, 32, dtype=torch.float64)
    y0 = layer(x)
    for t in (0, 3, 4, 12, 25):
        x2 = x.clone()
        x2[:, t + 1:] = torch.randn_like(x2[:, t + 1:]) * 5
        y1 = layer(x2)
        assert torch.equal(y1[:, : t + 1], y0[:, : t + 1]), t
        assert not torch.equal(y1[:, t + 1:], y0[:, t + 1:])
        xg = x.clone().requires_grad_()
        layer(xg)[:, t].pow(2).sum().backward()
        assert torch.equal(xg.grad[:, t + 1:], torch.zeros_like(xg.grad[:, t + 1:])), t
        assert xg.grad[:, t].abs().sum() > 0


def test_layer_no_nan_or_inf_any_length():
    layer = make_layer(seed=9, compress="mlp", sel_block=4)
    for T in range(1, 3 * 4 + 1):
        x = torch.randn(1, T, 32, requires_grad=True)
        y = layer(x)
        y.pow(2).sum().backward()
        assert bool(torch.isfinite(y).all()), T
        assert bool(torch.isfinite(x.grad).all()), T
        for name, p in layer.named_parameters():
            assert bool(torch.isfinite(p.grad).all()), (T, name)
        layer.zero_grad()


# --------------------------------------------------------------------------- phi


def test_mlp_phi_equals_mean_at_init():
    torch.manual_seed(0)
    blocks = torch.randn(2, 5, 32, 3, 16)
    mean = Compressor("mean", 32, 16)(blocks)
    mlp = Compressor("mlp", 32, 16)
    assert (mlp(blocks) - mean).abs().max().item() <= 1e-6
    torch.testing.assert_close(mean, blocks.mean(2), rtol=0, atol=1e-6)
    # a trained (perturbed) mlp no longer equals the mean: the test can fail
    with torch.no_grad():
        mlp.fc2.weight.normal_()
    assert (mlp(blocks) - mean).abs().max().item() > 1e-3


def test_mlp_layer_equals_mean_layer_at_init():
    torch.manual_seed(1)
    a = NSAAttention(make_cfg(compress="mlp"))
    b = NSAAttention(make_cfg(compress="mean"))
    b.load_state_dict({k: v for k, v in a.state_dict().items() if not k.startswith("phi_")})
    x = torch.randn(2, 27, 32)
    with torch.no_grad():
        assert (a(x) - b(x)).abs().max().item() <= 1e-6


def test_mlp_phi_has_position_embedding_and_gradients():
    layer = make_layer(seed=2, randomize=False, compress="mlp")
    x = torch.randn(1, 20, 32)
    layer(x).pow(2).sum().backward()
    for name in ("phi_k.pos", "phi_k.fc2.weight", "phi_v.fc2.weight"):
        assert dict(layer.named_parameters())[name].grad.abs().sum() > 0, name


# --------------------------------------------------------------------------- gradcheck


@pytest.mark.parametrize("phi,shared_kv", [pytest.param("mean", False, id="mean"),
                                           pytest.param("mlp", True, id="mlp-shared")])
def test_gradcheck_layer(phi, shared_kv):
    layer = make_layer(seed=10, d_model=8, n_heads=2, n_kv_heads=1, head_dim=4, v_head_dim=2,
                       cmp_block=2, cmp_stride=1, sel_block=2, sel_count=3, window=3,
                       compress=phi, shared_kv=shared_kv).double()
    x = torch.randn(1, 11, 8, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(layer, (x,), eps=1e-6, atol=1e-7)


# --------------------------------------------------------------------------- errors


def test_cache_full_error():
    layer = make_layer()
    cache = layer.new_cache(1, 10)
    with torch.no_grad():
        layer(torch.randn(1, 8, 32), cache=cache)
        with pytest.raises(ValueError, match="cache is full.*max_seq_len=10"):
            layer(torch.randn(1, 3, 32), cache=cache)
        assert cache.length == 8  # a refused chunk does not advance the cache
        layer(torch.randn(1, 2, 32), cache=cache)
    assert cache.length == 10


def test_cache_batch_mismatch_error():
    layer = make_layer()
    cache = layer.new_cache(2, 10)
    with pytest.raises(ValueError, match="batch 3.*batch 2"):
        layer(torch.randn(3, 4, 32), cache=cache)


@pytest.mark.parametrize("args,word", [
    pytest.param((0, 10), "batch_size", id="batch-zero"),
    pytest.param((1, 0), "max_seq_len", id="len-zero"),
    pytest.param((1.5, 10), "batch_size", id="batch-float"),
])
def test_new_cache_bad_args(args, word):
    with pytest.raises(ValueError, match=word):
        make_layer().new_cache(*args)


def test_layer_bad_x_and_cache_with_cu_seqlens():
    layer = make_layer()
    with pytest.raises(ValueError, match="d_model=32"):
        layer(torch.randn(2, 5, 31))
    with pytest.raises(ValueError, match="d_model"):
        layer(torch.randn(5, 32))
    with pytest.raises(ValueError, match="cu_seqlens"):
        layer(torch.randn(1, 5, 32), cache=layer.new_cache(1, 8),
              cu_seqlens=torch.tensor([0, 5], dtype=torch.int32))


@pytest.mark.parametrize("over,word", [
    pytest.param(dict(d_model=0), "d_model", id="d_model"),
    pytest.param(dict(n_heads=6, n_kv_heads=4), "n_kv_heads", id="HQ-not-multiple"),
    pytest.param(dict(head_dim=7, v_head_dim=4), "head_dim", id="odd-head-dim"),
    pytest.param(dict(cmp_block=5), "cmp_stride", id="d-not-dividing-l"),
    pytest.param(dict(sel_block=7), "sel_block", id="d-not-dividing-lp"),
    pytest.param(dict(sel_count=2), "sel_count", id="n-lt-3"),
    pytest.param(dict(window=0), "window", id="window"),
    pytest.param(dict(compress="max"), "compress", id="phi"),
    pytest.param(dict(backend="cuda"), "backend", id="backend"),
    pytest.param(dict(gate_hidden=-1), "gate_hidden", id="gate_hidden"),
    pytest.param(dict(rope_theta=0.0), "rope_theta", id="rope_theta"),
    pytest.param(dict(n_heads=True), "n_heads", id="bool"),
])
def test_config_validation(over, word):
    with pytest.raises(ValueError, match=word):
        make_cfg(**over)


def test_config_defaults_are_the_paper():
    c = NSAConfig()
    assert (c.n_heads, c.n_kv_heads, c.head_dim, c.v_head_dim) == (64, 4, 192, 128)
    assert (c.cmp_block, c.cmp_stride, c.sel_block, c.sel_count, c.window) == (32, 16, 64, 16, 512)
    assert NSAConfig(v_head_dim=None, head_dim=64).v_head_dim == 64
    assert NSAConfig().to_dict()["window"] == 512


def test_gate_hidden_mlp():
    layer = make_layer(seed=11, gate_hidden=16)
    x = torch.randn(1, 17, 32)
    with torch.no_grad():
        assert (_chunked(layer, x, [5, 1, 11])[0] - layer(x)).abs().max().item() <= 1e-5


# --------------------------------------------------------------------------- low precision


@pytest.mark.parametrize("dtype", [pytest.param(torch.bfloat16, id="bf16"),
                                   pytest.param(torch.float16, id="fp16")])
def test_layer_low_precision_close_to_fp64(dtype):
    # gates (1, 0, 1): no selection involved, so near-ties cannot flip between precisions
    T = 41
    layer = make_layer(seed=12, window=9, compress="mlp")
    force_gates(layer, (1, 0, 1))
    low = layer.to(dtype)
    ref = make_layer(seed=12, window=9, compress="mlp").double()
    ref.load_state_dict({k: v.double() for k, v in low.state_dict().items()})
    x = torch.randn(2, T, 32).to(dtype)
    with torch.no_grad():
        y = low(x)
        want = ref(x.double())
        err = (y.double() - want).abs().max().item() / want.abs().max().item()
        # PyTorch's own error: the same projections and a plain causal SDPA layer in `dtype`
        q, pairs, _ = _proj(ref, x.double())
        qk = [t.to(dtype) for t in (q, *pairs[2])]
        h = layer.config.n_heads // layer.config.n_kv_heads
        o = torch.nn.functional.scaled_dot_product_attention(
            qk[0].transpose(1, 2), qk[1].repeat_interleave(h, 2).transpose(1, 2),
            qk[2].repeat_interleave(h, 2).transpose(1, 2), is_causal=True).transpose(1, 2)
        base = low.o_proj(o.reshape(2, T, -1))
        base_want = _o(ref, causal_attention(*(t.double() for t in qk)))
        base_err = (base.double() - base_want).abs().max().item() / base_want.abs().max().item()
        # decode in low precision stays as close to the fp64 answer
        yc, _ = _chunked(low, x, [20, 1, 1, 19])
        err_dec = (yc.double() - want).abs().max().item() / want.abs().max().item()
    print(f"layer err {err:.3g}, decode err {err_dec:.3g}, plain-attention err {base_err:.3g}")
    assert err <= 2 * base_err and err_dec <= 2 * base_err


@pytest.mark.parametrize("cu,exc", [
    pytest.param([0, 5, 10], TypeError, id="list"),
    pytest.param(torch.tensor([0, 5, 9], dtype=torch.int32), ValueError, id="short"),
    pytest.param(torch.tensor([0, 5, 12], dtype=torch.int32), ValueError, id="beyond-T"),
    pytest.param(torch.tensor([0, 6, 5, 10], dtype=torch.int32), ValueError, id="decreasing"),
])
def test_layer_bad_cu_seqlens(cu, exc):
    with pytest.raises(exc, match="cu_seqlens"):
        make_layer()(torch.randn(1, 10, 32), cu_seqlens=cu)


def test_gradcheck_layer_parameters():
    # gradients reach phi's position embedding and MLP, the gate and the projections correctly
    layer = make_layer(seed=13, d_model=8, n_heads=2, n_kv_heads=1, head_dim=4, v_head_dim=2,
                       cmp_block=2, cmp_stride=1, sel_block=2, sel_count=3, window=3,
                       compress="mlp").double()
    x = torch.randn(1, 9, 8, dtype=torch.float64)
    names = ["phi_k.pos", "phi_v.fc2.weight", "gate.bias", "kv_proj.weight"]
    params = {k: v.detach().clone().requires_grad_() for k, v in layer.named_parameters() if k in names}

    def f(*ps):
        return torch.func.functional_call(layer, dict(zip(params, ps)), (x,))

    assert torch.autograd.gradcheck(f, tuple(params.values()), eps=1e-6, atol=1e-7)


def test_paper_geometry_decode_equals_full():
    # the paper's l, d, l', n, w with narrow heads; T > n*l' + w so that selection matters
    layer = make_layer(seed=14, cmp_block=32, cmp_stride=16, sel_block=64, sel_count=16, window=512,
                       compress="mlp")
    T = 1100
    x = torch.randn(1, T, 32)
    with torch.no_grad():
        y, sel = layer(x, return_selection=True)
        yc, selc = _chunked(layer, x, [517, 64, 1, 1, 500, 1, 16])
    assert (yc - y).abs().max().item() <= 1e-5
    assert torch.equal(selc, sel)
    assert bool((sel[0, -1] >= 0).all())  # n blocks in use at the end: the selection is sparse


@pytest.mark.parametrize("phi,shared_kv", VARIANTS)
def test_cache_dtype_other_than_layer(phi, shared_kv):
    # an fp32 layer decoding with a bf16 cache: runs (phi in the layer's dtype) and stays close
    # to an fp32 layer fed the bf16-rounded keys; an fp64 cache equals the fp32 pass
    layer = make_layer(seed=15, compress=phi, shared_kv=shared_kv)
    x = torch.randn(1, 29, 32)
    with torch.no_grad():
        y = layer(x)
        c64 = layer.new_cache(1, 29, dtype=torch.float64)
        y64 = torch.cat([layer(x[:, s:s + 5], cache=c64) for s in range(0, 29, 5)], 1)
        assert y64.dtype == torch.float32 and c64.k_cmp.dtype == torch.float64
        assert (y64 - y).abs().max().item() <= 1e-5
        c16 = layer.new_cache(1, 29, dtype=torch.bfloat16)
        y16 = torch.cat([layer(x[:, s:s + 5], cache=c16) for s in range(0, 29, 5)], 1)
        assert y16.dtype == torch.float32
        # within about one bf16 ulp (2^-7) of the output scale
        assert (y16 - y).abs().max().item() <= 1e-2 * y.abs().max().item()


def test_empty_chunk_is_a_no_op():
    layer = make_layer(seed=16, compress="mlp")
    x = torch.randn(2, 13, 32)
    cache = layer.new_cache(2, 13)
    with torch.no_grad():
        y = layer(x)
        assert layer(x[:, :0]).numel() == 0
        a = layer(x[:, :6], cache=cache)
        e = layer(x[:, 6:6], cache=cache)
        assert e.shape == (2, 0, 32) and cache.length == 6
        b = layer(x[:, 6:], cache=cache)
    assert (torch.cat([a, b], 1) - y).abs().max().item() <= 1e-5


# --------------------------------------------------------------------------- paged cache
@pytest.mark.parametrize("phi,shared_kv", VARIANTS)
def test_paged_cache_sequences_join_and_leave_a_running_batch(phi, shared_kv):
    """A serving loop on a paged cache (pages of 4 positions, fewer pages than the slots could
    hold, so freed pages are reused): sequences of different prompt lengths join the running
    batch (prefilled into a free slot while the others wait between decode steps), the batch
    decodes 1 token per sequence or verifies 3 at once, and finished sequences leave. Every
    output equals the full layer on that sequence alone."""
    layer = make_layer(seed=8, compress=phi, shared_kv=shared_kv)
    T = 40
    xs = [torch.randn(1, T, 32) for _ in range(5)]
    with torch.no_grad():
        full = [layer(x)[0] for x in xs]
        cache = layer.new_cache(3, T, page_size=4, num_pages=22)
        # (step, sequence, prompt length) joins; (step, sequence) leaves
        joins = {0: [(0, 13), (1, 1)], 2: [(2, 22)], 5: [(3, 9)], 8: [(4, 30)]}
        leaves = {4: [0], 7: [1, 2]}
        slot, pos, got = {}, {}, {i: [] for i in range(5)}
        for step in range(12):
            for i in leaves.get(step, []):
                cache.free(slot.pop(i))
            for i, n in joins.get(step, []):
                slot[i] = cache.add_sequence()
                got[i].append(layer(xs[i][:, :n], cache=cache.batch([slot[i]]))[0])
                pos[i] = n
            run = [i for i in slot if pos[i] + 3 <= T]
            C = 3 if step % 3 == 1 else 1  # a step that verifies 3 tokens per sequence
            x = torch.cat([xs[i][:, pos[i]:pos[i] + C] for i in run])
            y = layer(x, cache=cache.batch([slot[i] for i in run]))
            for b, i in enumerate(run):
                got[i].append(y[b])
                pos[i] += C
        for i in range(5):
            out = torch.cat(got[i])
            assert (out - full[i][:out.shape[0]]).abs().max().item() <= 1e-5, i
    assert sorted(cache.free_pages + [p for s in slot.values() for p in cache.pages[s]]) == list(range(22))


@pytest.mark.parametrize("shared_kv", SHARED)
def test_paged_chunks_equal_contiguous_chunks(shared_kv):
    """Two sequences of different lengths in one paged batch, chunks of 1, 5, 8 and 11 tokens
    (the long ones in steps of 8), equal the contiguous cache's chunked calls per sequence."""
    layer = make_layer(seed=9, shared_kv=shared_kv)
    x = torch.randn(2, 60, 32)
    with torch.no_grad():
        full = layer(x)
        cache = layer.new_cache(2, 60, page_size=6)
        a, b = cache.add_sequence(), cache.add_sequence()
        ya = layer(x[:1, :17], cache=cache.batch([a]))
        yb = layer(x[1:, :4], cache=cache.batch([b]))
        assert (ya[0] - full[0, :17]).abs().max() <= 1e-5 and (yb[0] - full[1, :4]).abs().max() <= 1e-5
        sa, sb = 17, 4
        for C in (1, 5, 8, 11, 1):
            y = layer(torch.cat([x[:1, sa:sa + C], x[1:, sb:sb + C]]), cache=cache.batch([a, b]))
            assert (y[0] - full[0, sa:sa + C]).abs().max().item() <= 1e-5, C
            assert (y[1] - full[1, sb:sb + C]).abs().max().item() <= 1e-5, C
            sa, sb = sa + C, sb + C


def test_paged_cache_errors():
    layer = make_layer()
    with pytest.raises(ValueError, match="page_size=3 must be a multiple of cmp_stride=2"):
        layer.new_cache(2, 16, page_size=3)
    cache = layer.new_cache(2, 16, page_size=4, num_pages=3)
    a = cache.add_sequence()
    cache.add_sequence()
    with pytest.raises(ValueError, match="no free slot"):
        cache.add_sequence()
    with pytest.raises(ValueError, match="out of pages"):
        layer(torch.randn(1, 13, 32), cache=cache.batch([a]))
    assert cache.lengths[a] == 0 and len(cache.free_pages) == 3  # nothing written
    with pytest.raises(ValueError, match="cache is full"):
        layer(torch.randn(1, 17, 32), cache=cache.batch([a]))
    cache.free(a)
    with pytest.raises(ValueError, match="slot 0 holds no sequence"):
        cache.batch([a])
    with pytest.raises(TypeError, match="cache.batch"):
        layer(torch.randn(1, 1, 32), cache=cache)


@pytest.mark.parametrize("phi,shared_kv", VARIANTS)
def test_paged_decode_step_with_device_lengths_equals_full(phi, shared_kv):
    """decode_step on a paged view (lengths on the device, pages reserved ahead: what a CUDA
    graph replays) after prompts of different lengths, pages of 4 positions taken in a
    shuffled order, equals the full layer on each sequence; then the host lengths advance and a
    chunk continues where the steps stopped."""
    layer = make_layer(seed=10, compress=phi, shared_kv=shared_kv)
    lens, T, n = [5, 2, 11], 40, 9
    x = torch.randn(3, T, 32)
    with torch.no_grad():
        full = layer(x)
        cache = layer.new_cache(4, T, page_size=4)
        random.Random(1).shuffle(cache.free_pages)  # pages far from the slot's order
        slots = [cache.add_sequence() for _ in lens]
        for b, m in zip(slots, lens):
            layer(x[b:b + 1, :m], cache=cache.batch([b]))
        view = cache.batch(slots)
        view.reserve(n)
        seqlens = torch.tensor(lens)
        for _ in range(n):
            s = seqlens.clone()
            y = layer.decode_step(x[torch.arange(3), s][:, None], view, seqlens)
            err = (y[:, 0] - full[torch.arange(3), s]).abs().max().item()
            assert err <= 1e-5, s.tolist()
            seqlens += 1
        view.advance(n)
        assert view.lengths == [m + n for m in lens]
        y = layer(torch.stack([x[b, m + n:m + n + 3] for b, m in enumerate(lens)]), cache=view)
        for b, m in enumerate(lens):
            assert (y[b] - full[b, m + n:m + n + 3]).abs().max().item() <= 1e-5
    assert (layer(torch.randn(3, T, 32)) - full).abs().max().item() > 1e-2


def test_paged_decode_step_errors():
    layer = make_layer()
    cache = layer.new_cache(2, 16, page_size=4, num_pages=5)
    a, b = cache.add_sequence(), cache.add_sequence()
    view = cache.batch([a, b])
    with pytest.raises(ValueError, match="out of pages"):
        view.reserve(12)  # 2 x 3 pages
    assert len(cache.free_pages) == 5 and cache.pages[a] == []  # nothing taken
    with pytest.raises(ValueError, match="cache is full"):
        view.reserve(17)
    with pytest.raises(ValueError, match="n must be"):
        view.reserve(0)
    view.reserve(4)
    with pytest.raises(ValueError, match="not reserved"):
        view.advance(5)
    assert cache.lengths[a] == 0
    with pytest.raises(TypeError, match="cache.batch"):
        layer.decode_step(torch.randn(2, 1, 32), cache, torch.tensor([0, 0]))
