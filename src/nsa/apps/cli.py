"""The ``nsa`` command line: ``nsa info``, ``nsa demo`` and the commands other modules register.

A module command is listed in ``MODULE_COMMANDS`` as name -> (module, help). The module
defines ``add_arguments(name, parser)`` and ``run(name, args) -> int``.
"""

from __future__ import annotations

import argparse
import importlib
import platform
import sys
import time

from ..geometry import decode_reads

MODULE_COMMANDS = {
    "bench": ("nsa.apps.bench", "benchmarks (nsa bench prefill / train): NSA kernels against full attention"),
    "train": ("nsa.apps.train", "train the small NSA language model"),
    "generate": ("nsa.apps.train", "generate text from a checkpoint"),
    "needle": ("nsa.apps.train", "needle-in-a-haystack accuracy heatmap: NSA vs baselines"),
}


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
    print(f"\nselected blocks of the query at position {t} (block = {cfg.sel_block} keys; forced: 0, "
          f"{t // cfg.sel_block - 1}, {t // cfg.sel_block}):")
    for g in range(cfg.n_kv_heads):
        b = [int(j) for j in blocks[g] if j >= 0]
        print(f"  group {g}: {b}")
    # tokens this step read: visible compressed tokens, keys of the selected blocks, window
    n_cmp, _, n_win = decode_reads(t + 1, **geo)
    n_slc = [sum(min(cfg.sel_block, t + 1 - j * cfg.sel_block) for j in blocks[g].tolist() if j >= 0)
             for g in range(cfg.n_kv_heads)]
    print(f"this step read {n_cmp} compressed + {n_slc[0]} selected + {n_win} window = "
          f"{n_cmp + n_slc[0] + n_win} tokens (group 0) of {t + 1} for full attention")

    print("\ntokens read per decode step (paper Table 4; Tc(s) = (s - l) // d + 1):")
    print(f"{'context':>8} {'full':>7} {'cmp':>6} {'slc':>6} {'win':>6} {'NSA':>6} {'ratio':>6}")
    for s in (8192, 16384, 32768, 65536):
        c, sl, w = decode_reads(s, **geo)
        print(f"{s:>8} {s:>7} {c:>6} {sl:>6} {w:>6} {c + sl + w:>6} {s / (c + sl + w):>5.1f}x")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="nsa", description="Native Sparse Attention")
    sub = p.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="versions, devices and usable backends").set_defaults(func=cmd_info)
    d = sub.add_parser("demo", help="the layer at the paper configuration: prefill, decode, "
                                    "tokens read per step")
    d.add_argument("--seq-len", type=int, default=4096, help="prefill length (default 4096)")
    d.add_argument("--decode-steps", type=int, default=4, help="decode steps after prefill (default 4)")
    d.add_argument("--d-model", type=int, default=1024, help="layer width (default 1024)")
    d.add_argument("--seed", type=int, default=0)
    d.set_defaults(func=cmd_demo)
    for name, (module, help_) in MODULE_COMMANDS.items():
        try:
            mod = importlib.import_module(module)
        except ModuleNotFoundError as e:
            if e.name != module:
                raise
            continue
        sp = sub.add_parser(name, help=help_)
        mod.add_arguments(name, sp)
        sp.set_defaults(func=lambda a, _m=mod, _n=name: _m.run(_n, a))
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
