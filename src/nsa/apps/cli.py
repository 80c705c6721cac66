"""The ``nsa`` command line: ``nsa info``, ``nsa demo``, ``nsa generate``, ``nsa convert`` and the
commands other modules register.

A module command is listed in ``MODULE_COMMANDS`` as name -> module. The module defines
``HELP`` (name -> one line for ``nsa --help``), ``add_arguments(name, parser)`` and
``run(name, args) -> int``.

User errors (a bad option, a missing or unreadable file, a value the library rejects with a
``ValueError``) print one line ``nsa: error: ...`` on stderr and return 2, argparse's exit status
for usage errors; never a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import platform
import sys
import time

from .. import geometry
from .checkpoint import load_checkpoint
from .data import PasskeyTask, decode, encode
from .runtime import Dist, comma_list, fraction, nonnegative_float, nonnegative_int, open_fraction, positive_int, resolve_device

MODULE_COMMANDS = {"train": "nsa.apps.train", "needle": "nsa.apps.needle", "bench": "nsa.apps.bench"}


def cmd_info(args) -> int:
    import numpy
    import torch

    from .. import __version__
    from ..ops import triton_available

    print(f"nsa {__version__}")
    print(f"python {platform.python_version()} ({platform.machine()}), torch {torch.__version__}, "
          f"numpy {numpy.__version__}")
    try:
        import triton

        print(f"triton {triton.__version__}")
    except ImportError:
        print("triton: not installed (pip install 'nsa[gpu]')")
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            print(f"cuda:{i} {p.name}, {p.total_memory / 2**30:.0f} GiB, sm_{p.major}{p.minor}")
    else:
        print("cuda: no device")
    ok, why = triton_available()
    print("backends: torch (every device)" + (", triton (CUDA; CPU under TRITON_INTERPRET=1)" if ok
                                             else f"; triton unusable: {why}"))
    return 0


def cmd_demo(args) -> int:
    import torch

    from .. import NSAAttention, NSAConfig

    torch.manual_seed(args.seed)
    cfg = NSAConfig(d_model=args.d_model, backend="torch")  # paper attention geometry
    print(f"NSA layer, paper configuration: HQ={cfg.n_heads} H={cfg.n_kv_heads} Dk={cfg.head_dim} "
          f"Dv={cfg.v_head_dim} l={cfg.cmp_block} d={cfg.cmp_stride} l'={cfg.sel_block} "
          f"n={cfg.sel_count} w={cfg.window} phi={cfg.compress}, d_model={cfg.d_model}")
    layer = NSAAttention(cfg).eval()
    T, steps = args.seq_len, args.decode_steps
    x = torch.randn(1, T + steps, cfg.d_model)
    cache = layer.new_cache(1, T + steps)
    with torch.no_grad():
        t0 = time.perf_counter()
        layer(x[:, :T], cache=cache)
        t_prefill = time.perf_counter() - t0
        print(f"prefill of {T} tokens on {x.device}: {t_prefill:.2f} s")
        t0 = time.perf_counter()
        for i in range(steps):
            y, sel = layer(x[:, T + i:T + i + 1], cache=cache, return_selection=True)
        t_step = (time.perf_counter() - t0) / max(steps, 1)
        # check: the decoded outputs equal one full pass over the same tokens
        y_full = layer(x)[:, -1:]
    print(f"{steps} decode steps: {t_step * 1e3:.0f} ms/step; last step vs full pass: "
          f"max |diff| = {(y - y_full).abs().max().item():.2e}")

    geo = dict(cmp_block=cfg.cmp_block, cmp_stride=cfg.cmp_stride, sel_block=cfg.sel_block,
               sel_count=cfg.sel_count, window=cfg.window)
    t = T + steps - 1  # position of the last decoded query
    blocks = sel[0, 0]  # [H, n]
    forced = geometry.forced_blocks(torch.tensor([t]), geometry.num_sel_blocks(t + 1, cfg.sel_block),
                                    cfg.sel_block)[0].nonzero()[:, 0].tolist()
    print(f"\nselected blocks of the query at position {t} (block = {cfg.sel_block} keys; forced: "
          f"{', '.join(map(str, forced))}):")
    for g in range(cfg.n_kv_heads):
        b = [int(j) for j in blocks[g] if j >= 0]
        print(f"  group {g}: {b}")
    # tokens this step read: visible compressed tokens, keys of the selected blocks, window
    n_cmp, _, n_win = geometry.decode_reads(t + 1, **geo)
    n_slc = [sum(min(cfg.sel_block, t + 1 - j * cfg.sel_block) for j in blocks[g].tolist() if j >= 0)
             for g in range(cfg.n_kv_heads)]
    print(f"this step read {n_cmp} compressed + {n_slc[0]} selected + {n_win} window = "
          f"{n_cmp + n_slc[0] + n_win} tokens (group 0) of {t + 1} for full attention")

    print("\ntokens read per decode step (paper Table 4; Tc(s) = (s - l) // d + 1):")
    print(f"{'context':>8} {'full':>7} {'cmp':>6} {'slc':>6} {'win':>6} {'NSA':>6} {'ratio':>6}")
    for s in (8192, 16384, 32768, 65536):
        c, sl, w = geometry.decode_reads(s, **geo)
        print(f"{s:>8} {s:>7} {c:>6} {sl:>6} {w:>6} {c + sl + w:>6} {s / (c + sl + w):>5.1f}x")
    return 0


def cmd_generate(args) -> int:
    import numpy as np
    import torch

    device = resolve_device(args.device, Dist())
    model = load_checkpoint(args.checkpoint, device)
    encode_, decode_ = _text_codec(args.checkpoint, model.config.vocab_size)
    prompt = args.prompt
    if prompt is None:
        toks, a, key = PasskeyTask(256).example(256, 0.2, np.random.default_rng(args.seed))
        prompt = decode(toks[:a])
        print(f"(a passkey question; the key is {key})")
    if not prompt:
        raise ValueError("--prompt must not be empty (the model continues a prompt)")
    g = torch.Generator(device=device).manual_seed(args.seed)
    x = encode_(prompt)[None].to(device)
    y = model.generate(x, args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                       top_p=args.top_p, use_cache=not args.no_cache, generator=g,
                       cuda_graph=args.cuda_graph, compile=args.compile)
    new = y[0, x.shape[1]:].tolist()
    # labelled, each on its own lines: where the prompt ends is visible in a pipe too
    unit = "bytes" if decode_ is decode else "tokens"
    print(f"--- prompt ({x.shape[1]} {unit})\n{prompt}\n--- continuation ({len(new)} {unit})\n{decode_(new)}")
    return 0


def _text_codec(path: str, vocab_size: int):
    """(encode, decode) of a checkpoint's text: bytes for nsa's byte-level models (vocabulary
    256); the folder's tokenizer for a transformers folder of another vocabulary (a
    converted Llama, with the tokenizer files ``nsa convert`` copies)."""
    if vocab_size == 256:
        return encode, decode
    import os

    if os.path.isdir(path) and any(n.startswith("tokenizer") for n in os.listdir(path)):
        import torch
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(path)
        return (lambda text: torch.tensor(tok.encode(text), dtype=torch.int64),
                lambda ids: tok.decode(ids))
    raise ValueError(f"the model has a vocabulary of {vocab_size} tokens, not 256 bytes, and {path!r} "
                     "holds no tokenizer files to encode the prompt with")


def cmd_convert(args) -> int:
    try:
        from ..hf.convert import convert_llama_folder
    except ImportError:
        raise ValueError("nsa convert needs transformers: pip install 'nsa[hf]'") from None
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # stderr keeps the one-line errors
    from .train import parse_overrides

    gate = tuple(args.gate_init)
    if len(gate) != 3 or not all(0 <= g <= 1 for g in gate):
        raise ValueError(f"--gate-init expects three values in [0, 1] (cmp,slc,win), got {args.gate_init}")
    model = convert_llama_folder(args.llama, args.out, gate_init=gate, **parse_overrides(args.set))
    c = model.config.to_model_config()
    a = c.attn
    print(f"wrote {args.out}: NSA model of {model.model.num_params() / 1e6:.1f}M parameters, {c.n_layers} layers, "
          f"HQ={a.n_heads} H={a.n_kv_heads} D={a.head_dim}, l={a.cmp_block} d={a.cmp_stride} l'={a.sel_block} "
          f"n={a.sel_count} w={a.window} phi={a.compress}, gates (cmp, slc, win) = {gate}")
    return 0


def _convert_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("llama", help="folder of a transformers LlamaForCausalLM (config.json, model.safetensors)")
    p.add_argument("out", help="folder to write the NSA model to (config.json, model.safetensors, tokenizer files)")
    p.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                   help="an NSA field of the new model (repeatable), e.g. --set window=1024 --set sel_count=32; "
                        "the Llama fixes the widths, heads and depth")
    p.add_argument("--gate-init", type=comma_list(fraction), default=[0.1, 0.45, 0.45],
                   help="initial gates of the cmp,slc,win branches (default 0.1,0.45,0.45; 0,0,1: window only)")


def _generate_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("checkpoint", help="checkpoint folder, e.g. runs/tiny/nsa (or a .safetensors file, or a "
                                      "transformers folder of an nsa model)")
    p.add_argument("--prompt", default=None, help="text to continue (default: a passkey question)")
    p.add_argument("--max-new-tokens", type=nonnegative_int, default=64, help="bytes to generate (default 64)")
    p.add_argument("--temperature", type=nonnegative_float, default=0.0, help="0 is greedy (default)")
    p.add_argument("--top-k", type=positive_int, default=None, help="sample among the k most likely bytes")
    p.add_argument("--top-p", type=open_fraction, default=None,
                   help="sample among the most likely bytes whose probability reaches p")
    p.add_argument("--seed", type=int, default=0, help="sampling seed, and the default prompt's (default 0)")
    p.add_argument("--no-cache", action="store_true", help="recompute the whole sequence each step")
    p.add_argument("--cuda-graph", action="store_true",
                   help="replay the decode step as a CUDA graph (CUDA; NSA on the Triton "
                        "backend, or a baseline)")
    p.add_argument("--compile", action="store_true",
                   help="with --cuda-graph: torch.compile the decode step before capturing it "
                        "(fused kernels; the first step compiles for tens of seconds)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")


class UsageError(Exception):
    """A command-line error argparse found (main prints it as one line)."""


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        raise UsageError(f"{message} (see '{self.prog} --help')")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="nsa", description="Native Sparse Attention",
                epilog="'nsa COMMAND --help' lists a command's options.")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    sub.add_parser("info", help="versions, devices and usable backends").set_defaults(func=cmd_info)
    d = sub.add_parser("demo", help="the layer at the paper configuration: prefill, decode, "
                                    "tokens read per step")
    d.add_argument("--seq-len", type=positive_int, default=4096, help="prefill length (default 4096)")
    d.add_argument("--decode-steps", type=positive_int, default=4, help="decode steps after prefill (default 4)")
    d.add_argument("--d-model", type=positive_int, default=1024, help="layer width (default 1024)")
    d.add_argument("--seed", type=int, default=0)
    d.set_defaults(func=cmd_demo)
    for name, module in MODULE_COMMANDS.items():
        try:
            mod = importlib.import_module(module)
        except ModuleNotFoundError as e:
            if e.name != module:
                raise
            continue
        sp = sub.add_parser(name, help=mod.HELP[name])
        mod.add_arguments(name, sp)
        sp.set_defaults(func=lambda a, _m=mod, _n=name: _m.run(_n, a))
    g = sub.add_parser("generate", help="generate text from a checkpoint")
    _generate_arguments(g)
    g.set_defaults(func=cmd_generate)
    c = sub.add_parser("convert", help="a transformers Llama folder to an NSA model folder (nsa[hf])")
    _convert_arguments(c)
    c.set_defaults(func=cmd_convert)
    return p


def _one_line(e: Exception) -> str:
    if isinstance(e, OSError) and e.strerror and e.filename:  # "[Errno 2] ..." -> "PATH: reason"
        return f"{e.filename}: {e.strerror}"
    return " ".join(str(e).split())


def main(argv=None) -> int:
    """Run ``nsa`` with ``argv`` (default sys.argv[1:]); returns the exit status."""
    try:
        args = build_parser().parse_args(argv)
        return int(args.func(args) or 0)
    except (UsageError, ValueError, OSError) as e:
        print(f"nsa: error: {_one_line(e)}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
