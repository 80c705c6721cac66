"""nsa.model: baselines equal plain attention, cache = full pass, generate, checkpoints."""

import json
import math
import os

import pytest
import torch

from nsa import NSAConfig
from nsa.model import DenseAttention, ModelConfig, NSAModel, atomic_write, load_model, sample_next, save_model
from nsa.rope import apply_rope, rope_cos_sin


def small(attention, **kw):
    kw = {"backend": "torch", **kw}  # callers may pick another backend
    return ModelConfig.preset("tiny", attention=attention, d_model=64, n_heads=4, n_kv_heads=2,
                              head_dim=16, window=8, cmp_block=8, cmp_stride=4, sel_block=8,
                              sel_count=3, **kw)


def plain_attention(layer: DenseAttention, x, window=None):
    """Causal softmax attention written out with loops over nothing but a dense mask."""
    B, T, _ = x.shape
    H, HQ, D = layer.n_kv, layer.n_heads, layer.head_dim
    cos, sin = rope_cos_sin(torch.arange(T)[None], D, layer.theta)
    q = apply_rope(layer.q_proj(x).view(B, T, HQ, D), cos, sin).double()
    k, v = layer.kv_proj(x).view(B, T, 2, H, D).unbind(2)
    k = apply_rope(k, cos, sin).double().repeat_interleave(HQ // H, 2)
    v = v.double().repeat_interleave(HQ // H, 2)
    s = torch.einsum("bthd,buhd->bhtu", q, k) / math.sqrt(D)
    t, u = torch.arange(T)[:, None], torch.arange(T)[None]
    ok = (u <= t) & ((u > t - window) if window else True)
    p = s.masked_fill(~ok, float("-inf")).softmax(-1)
    o = torch.einsum("bhtu,buhd->bthd", p, v).reshape(B, T, HQ * D).float()
    return layer.o_proj(o)


@pytest.mark.parametrize("attention,window", [("full", None), ("window", 8)])
def test_baselines_equal_plain_causal_attention(attention, window):
    torch.manual_seed(0)
    layer = NSAModel(small(attention)).blocks[0].attn
    x = torch.randn(2, 600, 64)  # longer than a 256-query chunk of the window path
    with torch.no_grad():
        ref = plain_attention(layer, x, window)
        assert (layer(x) - ref).abs().max() < 1e-5
        # through a cache, chunk by chunk: queries sit at the bottom right of the mask
        cache = layer.new_cache(2, 600)
        out = torch.cat([layer(x[:, a:b], cache=cache) for a, b in ((0, 5), (5, 300), (300, 301), (301, 600))], 1)
        assert (out - ref).abs().max() < 1e-5


def test_window_baseline_equals_nsa_window_branch():
    """The window baseline is NSA with gates (0, 0, 1), on shared weights."""
    from nsa.reference import sliding_window_ref

    torch.manual_seed(1)
    layer = NSAModel(small("window")).blocks[0].attn
    x = torch.randn(1, 50, 64)
    B, T = 1, 50
    cos, sin = rope_cos_sin(torch.arange(T)[None], 16, layer.theta)
    q = apply_rope(layer.q_proj(x).view(B, T, 4, 16), cos, sin)
    k, v = layer.kv_proj(x).view(B, T, 2, 2, 16).unbind(2)
    o = sliding_window_ref(q, apply_rope(k, cos, sin), v, window=8)
    with torch.no_grad():
        assert (layer(x) - layer.o_proj(o.reshape(B, T, -1))).abs().max() < 1e-5


@pytest.mark.parametrize("attention", ["nsa", "full", "window"])
def test_cache_chunks_equal_full_pass(attention):
    torch.manual_seed(2)
    model = NSAModel(small(attention)).eval()
    x = torch.randint(0, 256, (2, 70))
    with torch.no_grad():
        full = model(x)
        cache = model.new_cache(2, 70)
        parts = [model(x[:, a:b], cache=cache) for a, b in ((0, 9), (9, 10), (10, 41), (41, 70))]
    assert (torch.cat(parts, 1) - full).abs().max() < 1e-5


@pytest.mark.parametrize("attention", ["nsa", "full", "window"])
def test_greedy_generate_with_cache_equals_without_and_full_argmax(attention):
    torch.manual_seed(3)
    model = NSAModel(small(attention)).eval()
    prompt = torch.randint(0, 256, (2, 20))
    a = model.generate(prompt, 12)
    b = model.generate(prompt, 12, use_cache=False)
    assert torch.equal(a, b)
    with torch.no_grad():
        assert torch.equal(model(a[:, :-1])[:, 19:].argmax(-1), a[:, 20:])


@pytest.mark.parametrize("attention,shared_kv", [
    pytest.param("nsa", False, id="nsa-separate-kv"), pytest.param("nsa", True, id="nsa-shared-kv"),
    pytest.param("full", False, id="full"), pytest.param("window", False, id="window")])
def test_decode_step_equals_cached_forward(attention, shared_kv):
    """The fixed-shape step that generate(cuda_graph=True) captures gives the logits of the
    chunked cache path, token by token, across compression-block and window boundaries."""
    torch.manual_seed(5)
    model = NSAModel(small(attention, shared_kv=shared_kv)).eval()
    x = torch.randint(0, 256, (2, 40))
    with torch.no_grad():
        full = model(x)
        cache = model.new_cache(2, 40)
        model(x[:, :7], cache=cache)
        seqlens = torch.full((2,), 7)
        for t in range(7, 40):
            logits = model.decode_step(x[:, t:t + 1], cache, seqlens)
            assert (logits - full[:, t]).abs().max() < 1e-5, t
        assert seqlens.tolist() == [40, 40] and torch.equal(cache.last, x[:, -1])
        with pytest.raises(ValueError, match="seqlens"):  # every attention kind checks its arguments
            model.decode_step(x[:, :1], cache, seqlens.float())


def test_generate_cuda_graph_needs_cuda():
    model = NSAModel(small("nsa")).eval()
    with pytest.raises(ValueError, match="cuda_graph"):
        model.generate(torch.randint(0, 256, (1, 5)), 4, cuda_graph=True)
    with pytest.raises(ValueError, match="compile=True needs cuda_graph=True"):
        model.generate(torch.randint(0, 256, (1, 5)), 4, compile=True)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("attention,shared_kv", [
    pytest.param("nsa", False, id="nsa-separate-kv"), pytest.param("nsa", True, id="nsa-shared-kv"),
    pytest.param("full", False, id="full"), pytest.param("window", False, id="window")])
def test_gpu_generate_cuda_graph_equals_eager(attention, shared_kv):
    torch.manual_seed(6)
    with pytest.raises(ValueError, match="Triton decode"):
        NSAModel(small("nsa")).cuda().generate(torch.zeros(1, 3, dtype=torch.long, device="cuda"), 2,
                                               cuda_graph=True)  # small() uses the torch backend
    model = NSAModel(small(attention, backend="triton", shared_kv=shared_kv)).cuda().eval()
    prompt = torch.randint(0, 256, (3, 21), device="cuda")
    eager = model.generate(prompt, 40)
    graphed = model.generate(prompt, 40, cuda_graph=True)
    assert torch.equal(graphed, eager)
    g1, g2 = (torch.Generator("cuda").manual_seed(1) for _ in range(2))
    assert torch.equal(model.generate(prompt, 30, temperature=1.0, top_k=20, generator=g1),
                       model.generate(prompt, 30, temperature=1.0, top_k=20, generator=g2, cuda_graph=True))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("attention", ["nsa", "full"])
def test_gpu_generate_compiled_cuda_graph_equals_eager(attention):
    """The compiled step (inductor) captured in the graph gives the eager tokens (fp32: its
    reordered sums move the logits by ~1e-6, far from a greedy tie), and a second call reuses the
    model's compiled step."""
    torch.manual_seed(7)
    model = NSAModel(small(attention, backend="triton")).cuda().eval()
    prompt = torch.randint(0, 256, (2, 37), device="cuda")
    eager = model.generate(prompt, 24)
    assert torch.equal(model.generate(prompt, 24, cuda_graph=True, compile=True), eager)
    compiled = model.compiled_decode_step()
    assert torch.equal(model.generate(prompt, 24, cuda_graph=True, compile=True), eager)
    assert model.compiled_decode_step() is compiled


def test_sampling_is_seeded_and_respects_top_k_top_p():
    torch.manual_seed(4)
    model = NSAModel(small("full")).eval()
    prompt = torch.randint(0, 256, (1, 5))
    g1, g2 = torch.Generator().manual_seed(7), torch.Generator().manual_seed(7)
    assert torch.equal(model.generate(prompt, 8, temperature=1.0, top_k=5, generator=g1),
                       model.generate(prompt, 8, temperature=1.0, top_k=5, generator=g2))
    logits = torch.tensor([[0.0, 5.0, 4.0, -1.0]])
    g = torch.Generator().manual_seed(0)
    draws = {int(sample_next(logits, 1.0, 2, None, g)) for _ in range(200)}
    assert draws == {1, 2}  # top-2
    draws = {int(sample_next(logits, 1.0, None, 0.5, g)) for _ in range(200)}
    assert draws == {1}  # token 1 alone has p > 0.5
    assert int(sample_next(logits, 0.0, None, None)) == 1


def test_save_load_roundtrip(tmp_path):
    torch.manual_seed(5)
    model = NSAModel(small("nsa")).eval()
    path = str(tmp_path / "m.safetensors")
    save_model(model, path)
    loaded = load_model(path).eval()
    x = torch.randint(0, 256, (1, 40))
    with torch.no_grad():
        assert torch.equal(model(x), loaded(x))
    assert loaded.config == model.config


def test_loss_is_weighted_mean_cross_entropy():
    torch.manual_seed(6)
    model = NSAModel(small("full"))
    x = torch.randint(0, 256, (2, 30))
    y = torch.randint(0, 256, (2, 30))
    ce = torch.nn.functional.cross_entropy(model(x).flatten(0, 1), y.flatten(), reduction="none").view(2, 30)
    assert torch.allclose(model.loss(x, y), ce.mean(), atol=1e-6)
    w = torch.rand(2, 30)
    assert torch.allclose(model.loss(x, y, w), (ce * w).sum() / w.sum(), atol=1e-6)
    y[0, :10] = -100  # ignored
    assert torch.allclose(model.loss(x, y), ce[y != -100].mean(), atol=1e-6)


def test_config_validation_names_the_field():
    with pytest.raises(ValueError, match="attention"):
        ModelConfig(attention="dense")
    with pytest.raises(ValueError, match="n_layers"):
        ModelConfig(n_layers=0)
    with pytest.raises(ValueError, match="n_kv_heads"):
        ModelConfig().replace(n_heads=4, n_kv_heads=3)
    with pytest.raises(ValueError, match="cmp_stride"):
        ModelConfig().replace(cmp_block=16, cmp_stride=5)
    with pytest.raises(ValueError, match="preset"):
        ModelConfig.preset("huge")
    with pytest.raises(ValueError, match="windw"):
        ModelConfig.preset("tiny", windw=3)
    with pytest.raises(ValueError, match="attn.windw"):
        ModelConfig.preset("tiny", **{"attn.windw": 3})
    with pytest.raises(TypeError, match="attn"):
        ModelConfig(attn={"window": 3})
    for kind in ("full", "window"):  # the dense baselines have one head dim, no scale and no bias
        with pytest.raises(ValueError, match="v_head_dim"):
            ModelConfig.preset("tiny", attention=kind, v_head_dim=16)
        with pytest.raises(ValueError, match="bias"):
            ModelConfig.preset("tiny", attention=kind, bias=True)
    assert ModelConfig.preset("tiny", v_head_dim=16).attn.v_head_dim == 16  # NSA has both
    model = NSAModel(small("full"))
    with pytest.raises(ValueError, match="tokens"):
        model(torch.randn(1, 4))
    with pytest.raises(ValueError, match="top_p"):
        model.generate(torch.zeros(1, 2, dtype=torch.long), 2, temperature=1.0, top_p=1.5)
    cache = model.new_cache(1, 4)
    with pytest.raises(ValueError, match="cache is full"):
        model(torch.zeros(1, 5, dtype=torch.long), cache=cache)


def test_presets_build():
    for name in ("tiny", "small", "base"):
        c = ModelConfig.preset(name)
        assert c.attn.v_head_dim == c.attn.head_dim
    model = NSAModel(ModelConfig.preset("tiny"))
    assert model.num_params() < 2_000_000
    assert all(b.attn.config == model.config.attn for b in model.blocks)  # the layers take the nested config


def test_config_replace_takes_flat_and_dotted_fields():
    c = ModelConfig.preset("tiny", attention="window", window=64, n_layers=3, **{"attn.sel_count": 5})
    assert (c.attention, c.attn.window, c.n_layers, c.attn.sel_count) == ("window", 64, 3, 5)
    assert c == ModelConfig.preset("tiny").replace(attention="window", n_layers=3, **{"attn.window": 64},
                                                   sel_count=5)
    # head_dim carries v_head_dim along (the presets' Dv = Dk) unless v_head_dim is given
    n = c.replace(attention="nsa")
    assert (n.replace(head_dim=16).attn.v_head_dim, n.replace(head_dim=16, v_head_dim=8).attn.v_head_dim) == (16, 8)
    assert c.replace(attn=NSAConfig(d_model=64, n_heads=2, n_kv_heads=1, head_dim=16, v_head_dim=16)).attn.d_model == 64
    assert ModelConfig.preset("tiny").attn.window == 32  # presets are not changed in place


def test_config_dict_roundtrip_and_flat_dicts_of_old_checkpoints():
    c = ModelConfig.preset("tiny", attention="full", window=48, d_model=64)
    d = c.to_dict()
    assert d["attn"]["window"] == 48 and "window" not in d
    assert ModelConfig.from_dict(json.loads(json.dumps(d))) == c
    # the flat config that checkpoints held before ModelConfig nested NSAConfig (v_head_dim was head_dim)
    old = {"vocab_size": 256, "d_model": 128, "n_layers": 2, "n_heads": 8, "n_kv_heads": 1, "head_dim": 32,
           "ffn_hidden": 0, "max_seq_len": 8192, "attention": "nsa", "cmp_block": 16, "cmp_stride": 8,
           "sel_block": 16, "sel_count": 8, "window": 32, "compress": "mlp", "shared_kv": False,
           "gate_hidden": 0, "rope_theta": 1000000.0, "backend": "auto", "norm_eps": 1e-05,
           "tie_embeddings": True, "token_shift": True, "init_std": 0.08}
    new = ModelConfig.from_dict(old)
    want = ModelConfig.preset("tiny", n_heads=8, n_kv_heads=1, max_seq_len=8192)
    assert new == want and new.attn.v_head_dim == 32


def test_atomic_write_keeps_the_old_file_when_writing_fails(tmp_path):
    path = tmp_path / "m.safetensors"
    path.write_text("old")

    def half(tmp):
        open(tmp, "w").write("half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write(str(path), half)
    assert path.read_text() == "old" and os.listdir(tmp_path) == ["m.safetensors"]
    atomic_write(str(path), lambda tmp: open(tmp, "w").write("new"))
    assert path.read_text() == "new" and os.listdir(tmp_path) == ["m.safetensors"]


def test_load_model_refuses_what_is_not_a_checkpoint(tmp_path):
    log = tmp_path / "log.jsonl"
    log.write_text('{"step": 1}\n' * 10)
    with pytest.raises(ValueError, match="not a safetensors file"):
        load_model(str(log))
    with pytest.raises(ValueError, match="not a file"):
        load_model(str(tmp_path))
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(2)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(ValueError, match="not an nsa checkpoint"):
        load_model(str(tmp_path / "other.safetensors"))


def test_needle_selection_example_scores_pick_the_layers_blocks():
    """examples/needle_selection.py ranks blocks by its own copy of the Eq. 9-10 scores: their
    top free blocks must be the ones the layer selects (else its ranks say nothing)."""
    import importlib.util
    import os

    path = os.path.join(os.path.dirname(__file__), "..", "examples", "needle_selection.py")
    spec = importlib.util.spec_from_file_location("needle_selection", path)
    ex = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ex)
    torch.manual_seed(0)
    config = small("nsa").replace(sel_count=6)  # 3 free blocks next to the 3 forced
    cfg = config.attn
    attn = NSAModel(config).blocks[0].attn.double()
    x = torch.randn(1, 150, 64, dtype=torch.float64)
    with torch.no_grad():
        _, sel = attn(x, return_selection=True)  # [1, T, H, n]
        s = ex.block_scores(attn, x)  # [T, H, n_sel]
    n_free = cfg.sel_count - 3
    for t in range(cfg.sel_count * cfg.sel_block, 150):  # more eligible blocks than slots
        cur = t // cfg.sel_block
        for g in range(cfg.n_kv_heads):
            sg = s[t, g, :cur + 1].clone()
            sg[[0, cur, cur - 1]] = -1
            free = set(sel[0, t, g].tolist()) - {0, cur, cur - 1}
            top = set(sg.topk(n_free).indices.tolist())
            assert free == top, (t, g, free, top)
