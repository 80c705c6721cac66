"""The library API without the CLI: train a tiny NSA model on the passkey task for a few
steps, then decode a pass key with the KV cache.

    python examples/passkey_api.py [steps]

With the default 40 steps the key is not yet retrieved (that takes ~300 steps, what
``nsa train`` does); the point is the calls.
"""

import sys

import numpy as np
import torch

from nsa.apps.data import PasskeyTask, decode, encode
from nsa.model import ModelConfig, NSAModel

steps = int(sys.argv[1]) if len(sys.argv) > 1 else 40
torch.manual_seed(0)
model = NSAModel(ModelConfig.preset("tiny", attention="nsa"))
task = PasskeyTask(256, answer_weight=5.0, min_len=128)
opt = torch.optim.AdamW(model.parameters(), lr=4e-3, betas=(0.9, 0.95))
for step in range(steps):
    x, y, w = task.batch(step, 8)
    loss = model.loss(x, y, w)
    opt.zero_grad()
    loss.backward()
    opt.step()
    if step % 10 == 0:
        print(f"step {step}: loss {loss.item():.3f}")

toks, answer_at, key = task.example(256, 0.3, np.random.default_rng(1))
prompt = encode(decode(toks[:answer_at]))[None]
out = model.eval().generate(prompt, len(key))  # prefill once, then one cached step per token
print(f"key {key}, model says {decode(out[0, answer_at:].tolist())!r}")
