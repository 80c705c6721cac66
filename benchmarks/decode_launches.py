"""Kernel launches of one decode step (what a CUDA graph replays), counted on the CPU.

A graphed decode step at small batch and context is launch-bound: each kernel costs a couple of
microseconds of GPU time whatever it does (docs/kernels.md, Decode). This counts, for one
layer's ``decode_step`` and for a whole model's (``NSAModel.decode_step``), the PyTorch ops that
launch a kernel (aten ops other than views and allocations, under a dispatch mode) and the
Triton launches of ``nsa_decode`` (its kernels stubbed as in ``decode_host.py``: nothing runs,
the launches are counted). NSA against the full-attention and window-only baselines of the same
preset, bf16, batch 1, the step after a 300-token prefill. Counts, not timings: the same on
any machine for a given torch; ``nsa bench generate`` times the steps on a GPU.

    PYTHONPATH=src python benchmarks/decode_launches.py [OUT.json]   # a few seconds
writes benchmarks/results/decode_launches_cpu.json by default.
"""

from __future__ import annotations

import collections
import datetime
import json
import os
import platform
import subprocess
import sys

os.environ.setdefault("TRITON_INTERPRET", "1")  # the CPU path of backend="triton"; nothing interprets (stubs)

import torch  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import decode_host as DH  # noqa: E402
from nsa.model import ModelConfig, NSAModel  # noqa: E402
from nsa.triton import _common as C  # noqa: E402
from nsa.triton import append as A  # noqa: E402
from nsa.triton import decode as D  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
# aten ops that launch nothing: views, reshapes and allocations
NO_LAUNCH = {"view", "_unsafe_view", "t", "transpose", "unsqueeze", "squeeze", "expand", "slice", "select",
             "permute", "as_strided", "reshape", "alias", "detach", "split", "split_with_sizes", "unbind",
             "_reshape_alias", "lift_fresh", "empty", "empty_strided", "new_empty", "new_empty_strided",
             "unflatten", "flatten", "movedim"}


class _Ops(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if name not in NO_LAUNCH:
            self.ops.append(name)
        return func(*args, **(kwargs or {}))


TRITON = collections.Counter()


class _CountedCompiled(DH._Compiled):
    def run(self, *args):
        TRITON["launches"] += 1


class _CountedStub(DH._Stub):
    def __init__(self, kernel):
        super().__init__(kernel)
        self.compiled = _CountedCompiled()

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            TRITON["launches"] += 1
            return self.compiled
        return launch


def _stub_kernels() -> None:
    for name in DH.KERNELS:
        setattr(D, name, _CountedStub(getattr(D, name)))
    A._decode_append = _CountedStub(A._decode_append)
    A._decode_write_cmp = _CountedStub(A._decode_write_cmp)
    A._decode_compress_write = _CountedStub(A._decode_compress_write)
    C.interpreting = lambda: False  # the launcher as on a GPU
    C._current_stream = lambda: 0


def count(preset: str, attention: str, T: int = 300) -> dict:
    """Launches of one layer's step and of the model's, the step after a T-token prefill."""
    torch.manual_seed(0)
    cfg = ModelConfig.preset(preset, attention=attention, backend="triton")
    model = NSAModel(cfg).to(torch.bfloat16).eval()
    prompt = torch.randint(0, cfg.vocab_size, (1, T))
    cache = model.new_cache(1, T + 8)
    layer, layer_cache = model.blocks[0].attn, cache.layers[0]
    x = torch.randn(1, 1, cfg.attn.d_model, dtype=torch.bfloat16)
    with torch.no_grad():
        cache.length = T  # the buffers' contents do not change what launches
        for c in cache.layers:
            c.length = T
        seqlens = torch.full((1,), T, dtype=torch.int64)
        layer.decode_step(x, layer_cache, seqlens)  # first step: the launchers' one-time work
        model.decode_step(prompt[:, -1:], cache, seqlens.clone())
        res, s1, s2 = {}, seqlens + 1, seqlens + 1
        for what, step in (("layer", lambda: layer.decode_step(x, layer_cache, s1)),
                           ("model", lambda: model.decode_step(prompt[:, -1:], cache, s2))):
            TRITON.clear()
            with _Ops() as mode:
                step()
            res[f"{what}_aten"] = len(mode.ops)
            res[f"{what}_triton"] = TRITON["launches"]
            res[f"{what}_launches"] = len(mode.ops) + TRITON["launches"]
            if what == "layer":
                res["layer_ops"] = mode.ops
    if attention == "nsa":  # the layer's step on a paged batch (a serving loop's)
        pc = layer.new_cache(1, T + 8, page_size=64)
        slot = pc.add_sequence()
        with torch.no_grad():
            layer(torch.randn(1, T, cfg.attn.d_model, dtype=torch.bfloat16), cache=pc.batch([slot]))
            view = pc.batch([slot])
            view.reserve(2)
            layer.decode_step(x, view, seqlens)
            TRITON.clear()
            with _Ops() as mode:
                layer.decode_step(x, view, seqlens + 1)
        res["paged_layer_launches"] = len(mode.ops) + TRITON["launches"]
    return dict(preset=preset, attention=attention, n_layers=cfg.n_layers, **res)


def main(out_path: str | None = None) -> int:
    _stub_kernels()
    rows = [count(p, a) for p in ("small", "base") for a in ("nsa", "full", "window")]
    for r in rows:
        print(f"{r['preset']:5s} {r['attention']:6s} layer {r['layer_launches']:3d} "
              f"({r['layer_aten']} aten + {r['layer_triton']} triton), model of {r['n_layers']} layers "
              f"{r['model_launches']}" + (f", paged layer {r['paged_layer_launches']}" if "paged_layer_launches" in r
                                           else ""), flush=True)

    def git(*a):
        try:
            return subprocess.run(["git", *a], cwd=HERE, capture_output=True, text=True, check=True).stdout.strip()
        except (OSError, subprocess.CalledProcessError):
            return None

    meta = dict(device="cpu (launch counts, not timings)", torch=torch.__version__, python=platform.python_version(),
                date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                commit=git("rev-parse", "--short", "HEAD"), dirty=bool(git("status", "--porcelain", "--", "src")),
                command="python benchmarks/decode_launches.py",
                what="kernel launches of one decode step: aten ops other than views/allocations, plus the "
                     "Triton launches (nsa_decode's and the cache append's, stubbed, counted); bf16, batch 1, "
                     "after a 300-token prefill")
    out_path = out_path or os.path.join(HERE, "results", "decode_launches_cpu.json")
    with open(out_path, "w") as f:
        json.dump(dict(meta=meta, results=rows), f, indent=1)
    print(f"wrote {out_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:2]))
