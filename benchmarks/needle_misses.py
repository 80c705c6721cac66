"""Why did a model miss a needle? Its answer next to what each NSA layer selected.

``python benchmarks/needle_misses.py CHECKPOINT --context 16384 --depth 1`` rebuilds the needles
of that cell of ``nsa needle`` (same seed, same depths list), runs the model teacher-forced on
each and, for every needle it gets wrong (all of them with ``--all``), prints the key, the answer,
how far back the needle is and, per layer and answer digit, the blocks each KV group selected,
marked ``*`` when they hold that digit in the needle. A digit that no group of the last layer
selects can only come from the compressed branch (and the window when the needle is that close).
Runs anywhere (``--device cpu`` and the reference backend by default).
"""
from __future__ import annotations

import argparse

import numpy as np
import torch

from nsa.apps.data import PasskeyTask, decode
from nsa.apps.checkpoint import load_checkpoint
from nsa.apps.needle import needle_example


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("checkpoint", help="checkpoint folder (or .safetensors file) of an NSA model")
    ap.add_argument("--context", type=int, required=True, help="context length of the cell")
    ap.add_argument("--depth", type=float, required=True, help="needle depth of the cell")
    ap.add_argument("--depths", default="0,0.25,0.5,0.75,1", help="the grid's depths (nsa needle's default)")
    ap.add_argument("--samples", type=int, default=32, help="needles per cell, as in the grid")
    ap.add_argument("--all", action="store_true", help="show the needles the model got right too")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--backend", default="torch", choices=("torch", "triton", "auto"))
    a = ap.parse_args()

    depths = [float(x) for x in a.depths.split(",")]
    if a.depth not in depths:
        raise ValueError(f"--depth {a.depth} is not one of --depths {depths}")
    di = depths.index(a.depth)
    model = load_checkpoint(a.checkpoint, a.device, backend=a.backend)
    c = model.config.attn
    if model.config.attention != "nsa":
        raise ValueError(f"{a.checkpoint!r} has attention={model.config.attention!r}: no selection to show")
    sel = {}  # layer -> [B, T, H, n] block indices of the last forward
    for i, block in enumerate(model.blocks):
        def hooked(x, cache=None, _f=block.attn.forward, _i=i):
            y, sel[_i] = _f(x, cache=cache, return_selection=True)
            return y
        block.attn.forward = hooked

    task = PasskeyTask(a.context)
    misses = 0
    for j in range(a.samples):
        toks, ans, key = needle_example(task, a.context, di, a.depth, j)  # as nsa needle draws them
        x = torch.from_numpy(toks.astype(np.int64))[None].to(a.device)
        with torch.no_grad():
            pred = model(x[:, :ans + task.digits - 1])[0, ans - 1:].argmax(-1).tolist()
        got = decode(pred)
        if got == key and not a.all:
            continue
        misses += got != key
        text = bytes(toks)
        first = text.find(key.encode())  # the needle states the key twice
        second = text.find(key.encode(), first + 1)
        print(f"sample {j}: key {key}, answer {got}{'' if got == key else '  MISS'}; needle {ans - first} "
              f"tokens before the answer, key at {first} and {second}")
        for li in sorted(sel):
            for d in range(task.digits):
                t = ans - 1 + d  # the position whose output predicts digit d
                want = {(first + d) // c.sel_block, (second + d) // c.sel_block}
                groups = []
                for g in range(sel[li].shape[2]):
                    blocks = sorted(int(b) for b in sel[li][0, t, g])
                    groups.append(" ".join(f"{b}*" if b in want else str(b) for b in blocks))
                print(f"  layer {li} digit {d}: " + " | ".join(groups))
    print(f"{misses} of {a.samples} missed at context {a.context}, depth {a.depth}")


if __name__ == "__main__":
    main()
