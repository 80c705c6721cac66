"""Fine-tune a converted Llama on the embedded passkey task, through transformers.

    python examples/hf_finetune_passkey.py              # about a minute or two on 2 CPU cores
    python examples/hf_finetune_passkey.py --trainer    # the same with transformers' Trainer (needs accelerate)

Steps: build a small random byte-level ``LlamaForCausalLM`` (vocabulary 256: tokens are bytes, as
in nsa's tasks; a real checkpoint is loaded with ``LlamaForCausalLM.from_pretrained``), turn it
into an NSA model with :func:`nsa.hf.convert_llama` (a short-context geometry and the token shift,
which the conversion starts at zero), check that the conversion kept the Llama's function (with
gates passing the window branch only the logits are the Llama's), fine-tune with labels (the loss
transformers models compute), save with ``save_pretrained``, reload with
``AutoModelForCausalLM`` and answer passkey questions with ``generate``.

A random Llama knows nothing, so the passkey accuracy after a minute of training stays low;
the point is the path. ``nsa needle OUT`` draws the heatmap of the saved folder.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

import nsa.hf  # registers model_type "nsa" with transformers' Auto classes
from nsa.apps.data import PasskeyTask, decode
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

# NSA geometry for a few hundred tokens (nsa's "tiny" preset's): blocks of 16, a window of 32
GEOMETRY = dict(cmp_block=16, cmp_stride=8, sel_block=16, sel_count=8, window=32, token_shift=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--seq-len", type=int, default=160)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--out", default="runs/hf_passkey")
    p.add_argument("--trainer", action="store_true", help="train with transformers.Trainer (needs accelerate)")
    args = p.parse_args()
    torch.manual_seed(0)

    llama = LlamaForCausalLM(LlamaConfig(
        vocab_size=256, hidden_size=128, intermediate_size=352, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=1024, initializer_range=0.08,
        rope_parameters={"rope_type": "default", "rope_theta": 1e6}, tie_word_embeddings=True)).eval()

    # the mapping is exact: window over the whole sequence and only the window gate open
    x = torch.randint(0, 256, (1, 64))
    exact = nsa.hf.convert_llama(llama, gate_init=(0, 0, 1), window=64).eval()
    with torch.no_grad():
        err = (exact(x).logits - llama(x).logits).abs().max().item()
    print(f"converted with the window branch alone: max |logits - Llama's| = {err:.1e}")

    model = nsa.hf.convert_llama(llama, **GEOMETRY)  # default gates (cmp, slc, win) = (0.1, 0.45, 0.45)
    task = PasskeyTask(args.seq_len, answer_weight=1.0)

    def batch(step):
        inputs, targets, _ = task.batch(step, args.batch_size)
        return torch.cat([inputs, targets[:, -1:]], 1)  # whole sequences: labels are input_ids

    t0 = time.time()
    if args.trainer:
        from transformers import Trainer, TrainingArguments

        class Passkey(torch.utils.data.Dataset):
            def __len__(self):
                return args.steps * args.batch_size

            def __getitem__(self, i):
                tokens = batch(i // args.batch_size)[i % args.batch_size]
                return {"input_ids": tokens, "labels": tokens}

        targs = TrainingArguments(output_dir=args.out + "/trainer", per_device_train_batch_size=args.batch_size,
                                  learning_rate=args.lr, max_steps=args.steps, lr_scheduler_type="cosine",
                                  warmup_steps=10, logging_steps=20, save_strategy="no", report_to=[],
                                  use_cpu=not torch.cuda.is_available())
        Trainer(model=model, args=targs, train_dataset=Passkey()).train()
    else:
        model.train()
        opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, args.lr, total_steps=args.steps, pct_start=0.1)
        for step in range(args.steps):
            tokens = batch(step)
            loss = model(input_ids=tokens, labels=tokens).loss  # transformers' shifted causal LM loss
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            if step % 10 == 0 or step == args.steps - 1:
                print(f"step {step:4d}  loss {loss.item():.3f}  ({time.time() - t0:.0f} s)")

    model.save_pretrained(args.out)
    reloaded = AutoModelForCausalLM.from_pretrained(args.out).eval()
    hits = 0
    for i in range(8):
        tokens, a, key = task.example(args.seq_len, (i + 0.5) / 8, np.random.default_rng(1000 + i))
        prompt = torch.from_numpy(tokens[:a].astype(np.int64))[None]
        out = reloaded.generate(prompt, max_new_tokens=len(key), do_sample=False)  # through nsa's KV cache
        hits += decode(out[0, a:].tolist()) == key
    print(f"saved to {args.out}; reloaded, passkeys answered by generate: {hits}/8 "
          f"(training took {time.time() - t0:.0f} s)")


if __name__ == "__main__":
    main()
