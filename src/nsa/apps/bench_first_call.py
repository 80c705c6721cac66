"""``nsa bench first-call``: how long a user waits for the first forward + backward.

Runs, each in a fresh Python process, a forward + backward of :func:`nsa.nsa_func`
(backend="triton", bf16, batch 1, a configuration of ``nsa bench``, default the paper's at
T = 8192) twice: first with an empty Triton cache (``TRITON_CACHE_DIR`` of the child set to a
new temporary folder: every kernel variant compiles, every autotuned kernel times its
configs), then with the cache the first run filled (compiled kernels and, as
:func:`nsa.triton._common.autotuned` passes ``cache_results=True``, the autotune timings on
disk). Reported per run: seconds from process start to the first result (gradients on the
host side synchronised), of which imports + CUDA start, the forward and the backward; the
process wall clock; a second forward + backward in the same process (the steady state); and
whether the first-call notice (logger "nsa") reached stderr. Targets of the issue: 60 s with
an empty cache, 5 s with a warm one.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

TARGETS_S = {"empty": 60.0, "warm": 5.0}
NOTICE = "compiling and autotuning Triton kernels"


def _inputs(T: int, c: dict, device):
    """Random bf16 inputs of one configuration, as ``nsa bench prefill``'s default mode."""
    import torch

    from ..reference import compress_mean

    g = torch.Generator(device=device).manual_seed(T)
    mk = lambda *s: torch.randn(*s, device=device, dtype=torch.bfloat16, generator=g)  # noqa: E731
    q = mk(1, T, c["HQ"], c["Dk"])
    k, v = mk(1, T, c["H"], c["Dk"]), mk(1, T, c["H"], c["Dv"])
    kw, vw = (k, v) if c["shared"] else (mk(1, T, c["H"], c["Dk"]), mk(1, T, c["H"], c["Dv"]))
    kc, vc = compress_mean(k, c["l"], c["d"]), compress_mean(v, c["l"], c["d"])
    gates = torch.rand(1, T, c["HQ"], 3, device=device, generator=g).to(torch.bfloat16)
    return q, kc, vc, k, v, kw, vw, gates


def child(c: dict, T: int) -> dict:
    """In the fresh process: one forward + backward at geometry ``c`` (a ``bench.CONFIGS``
    entry), then another. Returns wall-clock timestamps (time.time(): the parent measures
    from the moment it started the process) of inputs ready, forward done, backward done, and
    the second call's seconds."""
    import torch

    from .. import nsa_func

    dev = torch.device("cuda")
    torch.cuda.init()
    x = _inputs(T, c, dev)
    torch.cuda.synchronize()
    ready = time.time()
    leaves = [t.detach().clone().requires_grad_() for t in x]
    if c["shared"]:
        leaves = leaves[:5] + [leaves[7]]
    geo = dict(cmp_block=c["l"], cmp_stride=c["d"], sel_block=c["lp"], sel_count=c["n"], window=c["w"])

    def call():
        if c["shared"]:
            q, kc, vc, k, v, g = leaves
            o = nsa_func(q, kc, vc, k, v, k, v, g, backend="triton", **geo)
        else:
            o = nsa_func(*leaves, backend="triton", **geo)
        torch.cuda.synchronize()
        t_fwd = time.time()
        o.float().sum().backward()
        torch.cuda.synchronize()
        return t_fwd

    t_fwd = call()
    done = time.time()
    for t in leaves:
        t.grad = None
    t1 = time.perf_counter()
    call()
    again = time.perf_counter() - t1
    return dict(ready_at=ready, fwd_at=t_fwd, done_at=done, second_call_s=again)


def child_times(start: float, c: dict) -> dict:
    """Seconds of a child's report (:func:`child`) counted from ``start``, when the parent
    started it: setup (interpreter, imports, CUDA, inputs), forward, backward, first result."""
    return dict(setup_s=c["ready_at"] - start, fwd_s=c["fwd_at"] - c["ready_at"], bwd_s=c["done_at"] - c["fwd_at"],
                first_result_s=c["done_at"] - start, second_call_s=c["second_call_s"])


def run_child(c: dict, T: int, cache_dir: str, timeout: float = 900) -> dict:
    """One fresh process with ``TRITON_CACHE_DIR=cache_dir``: its result (or error), wall
    clock and whether the notice reached stderr."""
    env = dict(os.environ, TRITON_CACHE_DIR=cache_dir)
    cmd = [sys.executable, "-m", "nsa.apps.bench_first_call", "--geometry", json.dumps(c), "--seqlen", str(T)]
    start = time.time()
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    res = dict(wall_s=time.time() - start, notice=NOTICE in p.stderr)
    lines = [ln for ln in p.stdout.splitlines() if ln.startswith("{")]
    if p.returncode == 0 and lines:
        res.update(child_times(start, json.loads(lines[-1])))
    else:
        res["error"] = (p.stderr.strip().splitlines() or [f"exit status {p.returncode}"])[-1][:300]
    return res


def _commit() -> str | None:
    """``git rev-parse --short HEAD`` of the package's checkout (None outside one)."""
    try:
        p = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=os.path.dirname(os.path.abspath(__file__)),
                           capture_output=True, text=True, timeout=10)
        return p.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def _save(out: dict, path: str) -> None:
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path + ".json", "w") as f:
        json.dump(out, f, indent=1)


def first_call_sweep(args, meta: dict, out_path: str, configs: dict) -> int:
    """Both runs for each T of ``args.seqlens`` (default 8192) at ``args.configs[0]`` (a key
    of ``configs``, ``bench.CONFIGS``)."""
    config = args.configs[0]
    meta = dict(meta, timing="seconds from a fresh process's start to the first forward + backward (bf16, "
                             "batch 1, nsa_func backend=triton), empty then warm Triton cache",
                config=config, targets_s=TARGETS_S, commit=_commit())
    rows = []
    for T in args.seqlens or [8192]:
        tmp = tempfile.mkdtemp(prefix="nsa-first-call-")
        try:
            for cache in ("empty", "warm"):
                r = dict(config=config, T=T, cache=cache, **run_child(configs[config], T, tmp))
                r["meets_target"] = "first_result_s" in r and r["first_result_s"] <= TARGETS_S[cache]
                rows.append(r)
                print(" ".join(f"{k}={v:.2f}" if isinstance(v, float) else f"{k}={v}" for k, v in r.items()),
                      flush=True)
                _save(dict(meta=meta, results=rows), out_path)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    out = dict(meta=meta, results=rows)
    _save(out, out_path)
    table = markdown_table(out)
    with open(out_path + ".md", "w") as f:
        f.write(table + "\n")
    print(table)
    return 0


def markdown_table(out: dict) -> str:
    """One row per (T, cache): seconds to the first result (setup / forward / backward), the
    process wall clock, the second call in the same process, the target, the notice."""
    lines = ["| config | T | Triton cache | first fwd+bwd s (setup / fwd / bwd) | process wall s | "
             "second call ms | target s | notice on stderr |", "|---|---|---|---|---|---|---|---|"]
    for r in out["results"]:
        tgt = out["meta"].get("targets_s", TARGETS_S)[r["cache"]]
        if "first_result_s" in r:
            first = (f"{r['first_result_s']:.1f} ({r['setup_s']:.1f} / {r['fwd_s']:.1f} / {r['bwd_s']:.1f})"
                     + ("" if r["first_result_s"] <= tgt else " over"))
            again = f"{r['second_call_s'] * 1e3:.0f}"
        else:
            first, again = f"error: {r.get('error', '?')}", "-"
        lines.append(f"| {r['config']} | {r['T'] // 1024}k | {r['cache']} | {first} | {r['wall_s']:.1f} | {again} | "
                     f"{tgt:.0f} | {'yes' if r.get('notice') else 'no'} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m nsa.apps.bench_first_call",
                                description="the child of nsa bench first-call (prints one JSON line)")
    p.add_argument("--geometry", required=True, help="JSON of a bench.CONFIGS entry")
    p.add_argument("--seqlen", type=int, default=8192)
    a = p.parse_args(argv)
    print(json.dumps(child(json.loads(a.geometry), a.seqlen)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
