"""Which blocks does a trained model select when it answers the passkey question?

    python examples/needle_selection.py runs/tiny/nsa --contexts 384,768 --depths 0.25,0.5,0.9

For each needle it prints the predicted key and, for every layer and KV group, the rank of the
block that the answer position should read (the needle's copy of the digit after the current
one; rank 0 = the best free block, forced blocks left out), that block's score and the best
block. A rank below sel_count - 3 means the slc branch sees the needle. CPU, reference backend.
"""
from __future__ import annotations

import argparse

import numpy as np
import torch

from nsa import geometry as G
from nsa import reference as R
from nsa.apps.data import PasskeyTask
from nsa.apps.checkpoint import load_checkpoint
from nsa.layer import _blocks


def block_scores(attn, x: torch.Tensor) -> torch.Tensor:
    """Selection scores [T, H, n_sel] of one NSA layer for input x [1, T, d_model] (Eq. 9-10)."""
    c = attn.config
    q, ((kc, _), _, _), _ = attn._project(x, torch.arange(x.shape[1], device=x.device)[None])
    k_cmp = attn.phi_k(_blocks(kc, c.cmp_block, c.cmp_stride, None))  # [1, Tc, H, Dk]
    t = torch.arange(x.shape[1])
    p, _ = R._cmp_probs(R._split_heads(q, c.n_kv_heads), k_cmp, t, c.cmp_block, c.cmp_stride,
                        R._scale(c.scale, c.head_dim))  # [1, H, h, T, Tc]
    W = G.overlap_weights(k_cmp.shape[1], G.num_sel_blocks(x.shape[1], c.sel_block), c.cmp_block,
                          c.cmp_stride, c.sel_block, device=x.device, dtype=p.dtype)
    return torch.einsum("bhgcs,sj->bchj", p, W)[0]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("checkpoint")
    ap.add_argument("--contexts", default="384,768")
    ap.add_argument("--depths", default="0.25,0.5,0.9")
    ap.add_argument("--digits", type=int, default=5, help="pass key length used in training")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    model = load_checkpoint(a.checkpoint, "cpu", backend="torch").float()
    if model.config.attention != "nsa":
        raise SystemExit(f"{a.checkpoint} is a {model.config.attention!r} model: nothing is selected")
    inputs = {}
    for i, blk in enumerate(model.blocks):  # the normed input of every attention layer
        blk.attn.register_forward_pre_hook(lambda mod, args, i=i: inputs.__setitem__(i, args[0]))
    lp = model.config.attn.sel_block
    for n in map(int, a.contexts.split(",")):
        task = PasskeyTask(seq_len=n, digits=a.digits)
        for depth in map(float, a.depths.split(",")):
            toks, ans, key = task.example(n, depth, np.random.default_rng([a.seed, n, int(depth * 1000)]))
            text = bytes(toks)
            first = text.find(key.encode())
            copies = [first, text.find(key.encode(), first + 1)]  # the needle states the key twice
            with torch.no_grad():
                logits = model(torch.from_numpy(toks.astype(np.int64))[None, :-1])
                pred = bytes(logits[0, ans - 1:ans - 1 + len(key)].argmax(-1).tolist()).decode(errors="replace")
                scores = {i: block_scores(model.blocks[i].attn, x) for i, x in inputs.items()}
            print(f"context {n}, depth {depth}: key {key}, predicted {pred}")
            for t in range(ans - 1, ans - 1 + len(key)):
                cur = chr(text[t])
                # the answer position holding digit `cur` must read the digit after it in the needle
                want = sorted({(o + key.index(cur) + 1) // lp if cur in key else o // lp for o in copies})
                cells = []
                for i, s in scores.items():
                    for g in range(s.shape[1]):
                        sg = s[t, g].clone()
                        sg[[0, t // lp, t // lp - 1]] = -1  # forced blocks
                        ranks = [int((sg > sg[j]).sum()) for j in want]
                        cells.append(f"L{i}g{g} rank {min(ranks):>3} ({float(sg[want].max()):.2f}, "
                                     f"best {int(sg.argmax())}: {float(sg.max()):.2f})")
                print(f"  t={t} {cur!r}: " + " | ".join(cells))


if __name__ == "__main__":
    main()
