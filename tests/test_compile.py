"""torch.compile through the ops: the layer's forward + backward, a model's training step and
decode step compile with fullgraph=True (no graph break) and give eager's numbers; the
registered ops (torch.ops.nsa.*) pass torch.library.opcheck.

On the CPU: the torch backend traced with the aot_eager compiler (dynamo and AOTAutograd, where
graph breaks would happen; inductor's C++ code generation would take minutes a test), and the
Triton ops under TRITON_INTERPRET=1 (opcheck, and the layer traced through them: the op
boundary, the fake impls, the op's autograd and the tables' host copy). On a GPU the same
tests compile with inductor, plus (marked gpu) the tiny model's training step and the decode
step with backend="triton".

Tolerances (fp32, relative to eager's largest value): aot_eager runs eager's ops, 1e-5;
inductor fuses and reorders them, 1e-4.
"""

from __future__ import annotations

import os
import sys

import pytest
import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"  # before any kernel module is imported
    for _m in [m for m in sys.modules if m.startswith("nsa.triton")]:
        del sys.modules[_m]  # kernels built without the interpreter elsewhere: rebuild them

import nsa  # noqa: E402
from nsa import NSAAttention, NSAConfig  # noqa: E402
from nsa import reference as R  # noqa: E402
from nsa.model import ModelConfig, NSAModel  # noqa: E402

CUDA = torch.cuda.is_available()
DEV = "cuda" if CUDA else "cpu"
gpu = pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
# inductor's C++ code generation takes minutes a test on a small CPU: CPU runs trace with
# aot_eager (dynamo and AOTAutograd, where graph breaks happen), GPUs compile with inductor
COMPILER = "inductor" if CUDA else "aot_eager"
TOL = 1e-4 if CUDA else 1e-5
needs_triton = pytest.mark.skipif(not nsa.ops.triton_available()[0], reason="needs the triton package")

CU = [0, 13, 13, 40, 64]  # four sequences, one empty, packed in T = 64


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    torch.manual_seed(0)
    yield
    torch._dynamo.reset()


def _close(got, want, tol):
    scale = max(1.0, want.detach().abs().max().item())
    err = (got.detach().double() - want.detach().double()).abs().max().item()
    assert err <= tol * scale, (err, scale)


D = 32 if CUDA else 16  # head dims: the GPU kernels take 32..256; the interpreter runs 16 faster


def _layer(backend, **over):
    cfg = dict(d_model=64, n_heads=4, n_kv_heads=2, head_dim=D, v_head_dim=D, cmp_block=8, cmp_stride=4,
               sel_block=8, sel_count=3, window=8, backend=backend)
    cfg.update(over)
    return NSAAttention(NSAConfig(**cfg)).to(DEV)


def _fwd_bwd(layer, x, cu_seqlens, compile_backend):
    """(y, dx, parameter grads) of layer(x) in eager and compiled with fullgraph=True."""
    def run(fn):
        layer.zero_grad()
        xx = x.detach().clone().requires_grad_()
        y = fn(xx, cu_seqlens)
        (y.float().square().sum()).backward()
        return y, xx.grad, [p.grad.clone() for p in layer.parameters()]

    fn = lambda x, cu: layer(x, cu_seqlens=cu)  # noqa: E731
    want = run(fn)
    got = run(torch.compile(fn, backend=compile_backend, fullgraph=True))
    return got, want


def _compare(got, want, tol):
    (y, dx, dp), (y0, dx0, dp0) = got, want
    _close(y, y0, tol)
    _close(dx, dx0, tol)
    for a, b in zip(dp, dp0):
        _close(a, b, tol)


# --------------------------------------------------------------------------- the registered ops
def test_ops_are_registered():
    for name in ("nsa_fwd", "nsa_bwd", "select_blocks", "nsa_decode", "compress_write_step"):
        assert isinstance(getattr(torch.ops.nsa, name), torch._ops.OpOverloadPacket), name


def _op_inputs(T=24, HQ=2, H=1, D=D, l=8, d=4, cu=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    mk = lambda *s: torch.randn(*s, generator=g).to(DEV)  # noqa: E731
    q, k, v, kw, vw = mk(1, T, HQ, D), mk(1, T, H, D), mk(1, T, H, D), mk(1, T, H, D), mk(1, T, H, D)
    if cu is None:
        kc, vc = R.compress_mean(k, l, d), R.compress_mean(v, l, d)
    else:
        kc = torch.cat([R.compress_mean(k[:, s:e], l, d) for s, e in zip(cu[:-1], cu[1:])], 1)
        vc = torch.cat([R.compress_mean(v[:, s:e], l, d) for s, e in zip(cu[:-1], cu[1:])], 1)
    gates = torch.rand(1, T, HQ, 3, generator=g).to(DEV)
    return [q, kc, vc, k, v, kw, vw, gates]


GEO = dict(cmp_block=8, cmp_stride=4, sel_block=8, sel_count=3, window=8)


@needs_triton
@pytest.mark.parametrize("cu,save_win", [(None, True), ([0, 9, 9, 24], True), ([0, 9, 9, 24], False)],
                         ids=["dense-saved-window", "varlen-saved-window", "varlen-recomputed-window"])
def test_opcheck_nsa_fwd_and_bwd(cu, save_win):
    x = _op_inputs(cu=cu)
    cpu = None if cu is None else nsa.varlen_tables(torch.tensor(cu, dtype=torch.int32, device=DEV),
                                                    cmp_block=8, cmp_stride=4).cu_seqlens_cpu
    geo = (*GEO.values(), 0.25, 0, 0, False)
    leaves = [a.clone().requires_grad_() for a in x]
    torch.library.opcheck(torch.ops.nsa.nsa_fwd.default, (*leaves, cpu, *geo, save_win))
    o, *aux = torch.ops.nsa.nsa_fwd(*x, cpu, *geo, save_win)
    assert (aux[-2].numel() > 0) == save_win
    torch.library.opcheck(torch.ops.nsa.nsa_bwd.default, (torch.randn_like(o), *x, *aux, cpu, *geo))


@needs_triton
def test_opcheck_nsa_fwd_with_offsets():
    """A chunk at positions 10..23 of a sequence, the window keys from position 3."""
    q, kc, vc, k, v, kw, vw, gates = _op_inputs()
    args = (q[:, 10:], kc, vc, k, v, kw[:, 3:], vw[:, 3:], gates[:, 10:])
    leaves = [a.clone().requires_grad_() for a in args]
    torch.library.opcheck(torch.ops.nsa.nsa_fwd.default, (*leaves, None, *GEO.values(), 0.25, 10, 3, True, True))


@needs_triton
def test_opcheck_select_blocks():
    q, kc = _op_inputs()[:2]
    torch.library.opcheck(torch.ops.nsa.select_blocks.default, (q, kc, None, 8, 4, 8, 3, 0.25, 0))


@needs_triton
def test_opcheck_nsa_decode():
    q, kc, vc, k, v, kw, vw, gates = _op_inputs()
    lens = torch.tensor([24], dtype=torch.int32, device=DEV)
    torch.library.opcheck(torch.ops.nsa.nsa_decode.default,
                          (q[:, -1:], kc, vc, k, v, kw, vw, gates[:, -1:], lens, None, 24, *GEO.values(), 0.25))


@needs_triton
def test_opcheck_nsa_decode_paged_several_tokens():
    """The op with a block table (pages of 8 rows, the window read through them) and 3 new tokens."""
    q, kc, vc, k, v, kw, vw, gates = _op_inputs()
    def pages(x, rows):  # positions 0 .. 3*rows - 1 (zero padded) as pages 2, 1, 0
        x = torch.cat([x[0], x.new_zeros(3 * rows - x.shape[1], *x.shape[2:])])
        return x.reshape(3, rows, *x.shape[1:]).flip(0).contiguous()

    table = torch.tensor([[2, 1, 0]], dtype=torch.int32, device=DEV)
    lens = torch.tensor([24], dtype=torch.int32, device=DEV)
    torch.library.opcheck(torch.ops.nsa.nsa_decode.default,
                          (q[:, -3:], pages(kc, 2), pages(vc, 2), pages(k, 8), pages(v, 8), None, None,
                           gates[:, -3:], lens, table, 24, *GEO.values(), 0.25))


@needs_triton
@pytest.mark.parametrize("mlp", [True, False], ids=["mlp", "mean"])
def test_opcheck_compress_write_step(mlp):
    """The decode step's phi + compressed-token write: the op mutates k_cmp and v_cmp (declared),
    its fake runs, and a traced call writes what the eager one does."""
    g = torch.Generator().manual_seed(1)
    mk = lambda *s: torch.randn(*s, generator=g).to(DEV)  # noqa: E731
    l, H = 8, 2
    phi = [[mk(l, D), mk(D, l * D), mk(D), mk(D, D), mk(D)] if mlp else [] for _ in range(2)]
    raw = [mk(2, l, H, D), mk(2, l, H, D)]
    cmp = [mk(2, 6, H, D), mk(2, 6, H, D)]
    seqlens = torch.tensor([l - 1, l + 4 - 1], device=DEV)  # both complete a block
    args = (seqlens, *raw, *phi, *cmp, None, None, l, 4, torch.float32)
    torch.library.opcheck(torch.ops.nsa.compress_write_step.default, args)
    want = [t.clone() for t in cmp]
    torch.ops.nsa.compress_write_step(seqlens, *raw, *phi, *want, None, None, l, 4, torch.float32)
    assert not any(torch.equal(a, b) for a, b in zip(want, cmp))
    torch.compile(lambda *a: torch.ops.nsa.compress_write_step(*a), backend=COMPILER, fullgraph=True)(*args)
    for a, b in zip(cmp, want):
        _close(a, b, 0)


@needs_triton
def test_compiled_decode_step_runs_the_fused_compression(monkeypatch):
    """The tiny model's decode step compiled (fullgraph) on the Triton backend takes phi and the
    compressed token's write as the registered op (one call a layer and step) and gives eager's
    logits and cache (the compression's last layer made non-zero, so that phi is not the mean)."""
    from nsa.triton import append as A
    torch.manual_seed(0)
    model = NSAModel(ModelConfig.preset("tiny", backend="triton", n_layers=1)).to(DEV).eval()
    for m in model.modules():
        if isinstance(m, nsa.layer.Compressor):
            torch.nn.init.normal_(m.fc2.weight, std=0.1)
    steps = 2
    prompt = torch.randint(0, 256, (2, 23), device=DEV)  # position 23 completes a block (l = 16, d = 8)
    toks = torch.randint(0, 256, (steps, 2, 1), device=DEV)
    want, c0 = _decode_steps(model, model.decode_step, prompt, toks)
    calls = []
    real = A.compress_write_step_triton
    monkeypatch.setattr(A, "compress_write_step_triton", lambda *a, **k: calls.append(1) or real(*a, **k))
    got, c1 = _decode_steps(model, torch.compile(model.decode_step, backend=COMPILER, fullgraph=True), prompt, toks)
    assert len(calls) == steps
    _close(got, want, TOL)
    for name in ("k_cmp", "v_cmp", "k_slc", "k_win"):
        _close(getattr(c1.layers[0], name), getattr(c0.layers[0], name), TOL)


def _decode_steps(model, fn, prompt, toks):
    """(logits of decode steps fn(toks[i], cache, seqlens) after a prefill of prompt [B, T], the
    cache): the lengths advanced in place by each step, as generate does."""
    B, T = prompt.shape
    cache = model.new_cache(B, T + toks.shape[0])
    with torch.no_grad():
        model(prompt, cache=cache)
        seqlens = torch.full((B,), T, dtype=torch.int64, device=DEV)
        return torch.stack([fn(tok, cache, seqlens) for tok in toks]), cache


@needs_triton
def test_decode_is_traced_as_the_op_and_runs_without_its_dispatch_eagerly():
    """Eager nsa_decode runs the kernels without the custom op's dispatch (host time of a step);
    torch.compile still sees the registered op (the graph holds it), with eager's result."""
    from torch.utils._python_dispatch import TorchDispatchMode

    q, kc, vc, k, v, kw, vw, gates = _op_inputs()
    lens = torch.tensor([24], dtype=torch.int32, device=DEV)

    def step(q, g):
        return nsa.nsa_decode(q, kc, vc, k, v, kw, vw, g, cache_seqlens=lens, max_seqlen=24, backend="triton",
                              **GEO)

    class Seen(TorchDispatchMode):
        ops = set()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops.add(str(func.overloadpacket))
            return func(*args, **(kwargs or {}))

    with Seen() as seen:
        want = step(q[:, -1:], gates[:, -1:])
    assert seen.ops and not any(o.startswith("nsa.") for o in seen.ops), seen.ops
    graphs = []

    def record(gm, example_inputs):
        graphs.append(gm)
        return gm

    got = torch.compile(step, backend=record, fullgraph=True)(q[:, -1:], gates[:, -1:])
    targets = {n.target for gm in graphs for n in gm.graph.nodes if n.op == "call_function"}
    assert torch.ops.nsa.nsa_decode.default in targets or torch.ops.nsa.nsa_decode in targets, targets
    _close(got, want, 1e-6)


# --------------------------------------------------------------------------- torch backend (CPU CI)
@pytest.mark.parametrize("varlen", [False, True], ids=["dense", "varlen-tables"])
def test_compile_layer_forward_backward_torch(varlen):
    layer = _layer("torch")
    B = 1 if varlen else 2
    x = torch.randn(B, CU[-1], 64, device=DEV)
    cu = layer.varlen_tables(torch.tensor(CU, dtype=torch.int32, device=DEV)) if varlen else None
    got, want = _fwd_bwd(layer, x, cu, COMPILER)
    _compare(got, want, TOL)


def _train_steps(model, batches, compiled: bool, steps=2):
    """Losses of ``steps`` training steps (forward + backward + SGD: its update is the gradient
    scaled, so parameters compare as the gradients do) on ``batches``, and the parameters."""
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    loss_fn = torch.compile(model.loss, backend=COMPILER, fullgraph=True) if compiled else model.loss
    losses = []
    for tokens, targets, cu in batches[:steps]:
        loss = loss_fn(tokens, targets, cu_seqlens=cu)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.detach())
    return torch.stack(losses), [p.detach().clone() for p in model.parameters()]


def _tiny(backend, dtype=torch.float32):
    torch.manual_seed(0)
    return NSAModel(ModelConfig.preset("tiny", backend=backend)).to(DEV, dtype)


def _check_compiled_training(backend: str, T: int, bounds: list[int] | None, tol: float) -> None:
    """Two training steps of the tiny model, compiled (fullgraph) and eager, from the same
    weights: equal losses and parameters; ``bounds`` packs the batch (varlen tables)."""
    model = _tiny(backend)
    B = 1 if bounds else 2
    cu = model.varlen_tables(torch.tensor(bounds, dtype=torch.int32, device=DEV)) if bounds else None
    batches = []
    for _ in range(2):
        tok = torch.randint(0, 256, (B, T + 1), device=DEV)
        batches.append((tok[:, :-1], tok[:, 1:], cu))
    state = {k: v.clone() for k, v in model.state_dict().items()}
    want, p_want = _train_steps(model, batches, compiled=False)
    model.load_state_dict(state)
    got, p_got = _train_steps(model, batches, compiled=True)
    _close(got, want, tol)
    for a, b in zip(p_got, p_want):
        _close(a, b, tol)


@pytest.mark.parametrize("varlen", [False, True], ids=["dense", "varlen-tables"])
def test_compile_tiny_model_training_step_torch(varlen):
    _check_compiled_training("torch", 96, [0, 40, 96] if varlen else None, TOL)


def test_packed_model_equals_separate_sequences():
    """model(tokens, cu_seqlens) gives each sequence's logits alone (attention and token shift)."""
    model = _tiny("torch")
    tok = torch.randint(0, 256, (1, 96), device=DEV)
    cu = model.varlen_tables(torch.tensor([0, 40, 40, 96], dtype=torch.int32, device=DEV))
    packed = model(tok, cu_seqlens=cu)
    alone = torch.cat([model(tok[:, :40]), model(tok[:, 40:])], 1)
    _close(packed, alone, 1e-5)


def test_compiled_decode_step_is_dynamic_across_cache_lengths(monkeypatch):
    """The model's compiled decode step (what generate(compile=True) captures) recompiles once
    for a second cache length and then reuses that graph: ten lengths, two compilations, eager's
    logits each time (static shapes failed at the ninth length, torch's recompile limit)."""
    from torch._dynamo.testing import CompileCounterWithBackend

    counter = CompileCounterWithBackend(COMPILER)
    real = torch.compile
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: real(fn, **dict(kw, backend=counter)))
    torch.manual_seed(0)
    model = NSAModel(ModelConfig.preset("tiny", attention="full", n_layers=1)).to(DEV).eval()
    step = model.compiled_decode_step()
    assert model.compiled_decode_step() is step
    for L in range(40, 120, 8):
        prompt = torch.randint(0, 256, (2, L - 8), device=DEV)
        tok = torch.randint(0, 256, (2, 1), device=DEV)
        out = []
        for fn in (model.decode_step, step):
            cache = model.new_cache(2, L)
            with torch.no_grad():
                model(prompt, cache=cache)
                out.append(fn(tok, cache, torch.full((2,), L - 8, dtype=torch.int64, device=DEV)))
        _close(out[1], out[0], 1e-5)
    assert counter.frame_count == 2


def test_raw_cu_seqlens_inside_compile_is_refused():
    layer = _layer("torch")
    fn = torch.compile(lambda x, cu: layer(x, cu_seqlens=cu), backend="eager", fullgraph=True)
    with pytest.raises(Exception, match="varlen_tables"):
        fn(torch.randn(1, 64, 64, device=DEV), torch.tensor(CU, dtype=torch.int32, device=DEV))


def test_varlen_tables_checked_against_the_call():
    layer = _layer("torch")
    x = torch.randn(1, 64, 64, device=DEV)
    cu = torch.tensor(CU, dtype=torch.int32, device=DEV)
    with pytest.raises(ValueError, match="cmp_block=8, cmp_stride=4"):
        layer(x, cu_seqlens=nsa.varlen_tables(cu, cmp_block=16, cmp_stride=8))
    with pytest.raises(ValueError, match="T=64 tokens but the input has T=63"):
        layer(x[:, :63], cu_seqlens=layer.varlen_tables(cu))
    t = layer.varlen_tables(cu)
    assert t.bounds == tuple(CU) and t.positions.tolist() == [i - s for s, e in zip(CU[:-1], CU[1:])
                                                                for i in range(s, e)]


# --------------------------------------------------------------------------- Triton ops under compile
@needs_triton
@pytest.mark.parametrize("varlen", [False, pytest.param(True, marks=gpu)], ids=["dense", "varlen-tables"])
def test_compile_layer_through_triton_ops(varlen):
    """The Triton path traced whole (on the CPU the kernels run under the interpreter; the
    packed case only on a GPU there: the next test traces packings through the same ops)."""
    layer = _layer("triton")
    T = 40 if not CUDA else 64
    cu_list = [0, 13, 13, T]
    B = 1 if varlen else 2
    x = torch.randn(B, T, 64, device=DEV)
    cu = layer.varlen_tables(torch.tensor(cu_list, dtype=torch.int32, device=DEV)) if varlen else None
    got, want = _fwd_bwd(layer, x, cu, COMPILER)
    _compare(got, want, TOL)


@needs_triton
def test_new_packings_reuse_the_graph_on_the_triton_path():
    """The Triton path reads no host ints of the tables, so a new packing of the same T is a
    new input, not a new graph: one recompile (dynamo making the shapes dynamic), then none."""
    import torch._dynamo.testing

    layer = _layer("triton")
    counter = torch._dynamo.testing.CompileCounterWithBackend(COMPILER)
    fn = torch.compile(lambda x, cu: layer(x, cu_seqlens=cu), backend=counter, fullgraph=True)
    x = torch.randn(1, 40, 64, device=DEV)
    with torch.no_grad():
        for cu in ([0, 13, 13, 40], [0, 20, 40], [0, 5, 17, 30, 40]):
            tables = layer.varlen_tables(torch.tensor(cu, dtype=torch.int32, device=DEV))
            _close(fn(x, tables), layer(x, cu_seqlens=tables), TOL)
    assert counter.frame_count == 2


# --------------------------------------------------------------------------- GPU (Triton + inductor)
@gpu
@pytest.mark.parametrize("varlen", [False, True], ids=["dense", "varlen-tables"])
def test_gpu_compile_tiny_model_training_step_triton(varlen):
    _check_compiled_training("triton", 512, [0, 200, 200, 512] if varlen else None, 1e-4)


@gpu
def test_gpu_compile_layer_bf16_triton():
    layer = _layer("triton").to(torch.bfloat16)
    x = torch.randn(2, 256, 64, device=DEV, dtype=torch.bfloat16)
    got, want = _fwd_bwd(layer, x, None, "inductor")
    _compare(got, want, 2e-2)  # bf16: inductor rounds the projections' outputs in other places


@gpu
def test_gpu_compile_decode_step_triton():
    """model.decode_step compiled (fullgraph) gives eager's logits for several steps, the cache
    and lengths mutated in place as eager does."""
    model = _tiny("triton").eval()
    prompt = torch.randint(0, 256, (2, 100), device=DEV)
    toks = torch.randint(0, 256, (4, 2, 1), device=DEV)
    want = _decode_steps(model, model.decode_step, prompt, toks)[0]
    step = torch.compile(model.decode_step, fullgraph=True)
    got = _decode_steps(model, step, prompt, toks)[0]
    _close(got, want, 1e-4)
