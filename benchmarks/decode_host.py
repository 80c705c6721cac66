"""Host (Python) time of one eager ``nsa_decode`` step with its Triton launches stubbed: what the
op's checks and the launcher cost on the host around the kernels, without a GPU.

The five decode kernels are replaced by stubs that accept ``kernel[grid](...)`` and return a
stand-in compiled kernel whose C launcher does nothing, and the launcher runs as on a GPU (not
as under the interpreter): the first step goes through the stubs, later steps through
``C.relaunch`` to the stand-ins' launchers. So the timing holds the checks, the launch plan,
the allocations, the argument passing and the relaunch path, not Triton's run or the CUDA
launch itself (a GPU measures those: ``nsa bench decode``, eager rows). Paper geometry
(HQ 64, H 4, Dk 192, Dv 128), batch 1, T = 64k, bf16 tensors on the CPU, tensor lengths with
``max_seqlen`` as a serving loop passes them.

    PYTHONPATH=src python benchmarks/decode_host.py        # a few seconds
writes benchmarks/results/decode_host_cpu.json.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time

os.environ.setdefault("TRITON_INTERPRET", "1")  # the CPU path of backend="triton"; nothing interprets (stubs)

import torch  # noqa: E402

import nsa  # noqa: E402
from nsa.triton import _common as C  # noqa: E402
from nsa.triton import decode as D  # noqa: E402

KERNELS = ("_decode_cmp_tuned", "_decode_scores", "_decode_top_n", "_decode_attend_tuned", "_decode_combine")
HERE = os.path.dirname(os.path.abspath(__file__))


class _Compiled:
    function, packed_metadata = 0, None

    def run(self, *args):
        pass


class _Stub:
    def __init__(self, kernel):
        fn = kernel if hasattr(kernel, "arg_names") else kernel.fn  # an autotuner wraps the jitted kernel
        self.arg_names, self.compiled = fn.arg_names, _Compiled()

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.compiled


def step_us(T: int = 65536, B: int = 1, reps: int = 3000, rounds: int = 5) -> list[float]:
    """Microseconds per eager step (one value per round of ``reps`` steps)."""
    for name in KERNELS:
        setattr(D, name, _Stub(getattr(D, name)))
    C.interpreting = lambda: False  # the launcher as on a GPU: GPU tiles, kernels kept for relaunch
    C._current_stream = lambda: 0
    HQ, H, Dk, Dv, l, d = 64, 4, 192, 128, 32, 16
    mk = lambda *s: torch.randn(*s, dtype=torch.bfloat16)  # noqa: E731
    tc = (T - l) // d + 1
    k, v, kc, vc = mk(B, T, H, Dk), mk(B, T, H, Dv), mk(B, tc, H, Dk), mk(B, tc, H, Dv)
    q, g = mk(B, 1, HQ, Dk), mk(B, 1, HQ, 3)
    lens = torch.full((B,), T, dtype=torch.int32)
    step = lambda: nsa.nsa_decode(q, kc, vc, k, v, None, None, g, cache_seqlens=lens, max_seqlen=T,  # noqa: E731
                                  backend="triton")
    for _ in range(100):
        step()
    out = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        for _ in range(reps):
            step()
        out.append((time.perf_counter() - t0) / reps * 1e6)
    return out


def main() -> int:
    rounds = step_us()
    try:
        commit = subprocess.run(["git", "-C", HERE, "rev-parse", "--short", "HEAD"], capture_output=True,
                                text=True, timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        commit = None
    res = {"meta": {"device": "cpu", "cpu_count": os.cpu_count(), "python": platform.python_version(),
                    "torch": torch.__version__, "commit": commit,
                    "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                    "timing": "eager nsa_decode steps, Triton launches stubbed (relaunch path), median of rounds of 3000",
                    "config": "paper (HQ 64, H 4, Dk 192, Dv 128, l 32, d 16), batch 1, T 65536, bf16"},
           "step_us_median": statistics.median(rounds), "step_us_rounds": rounds}
    path = os.path.join(HERE, "results", "decode_host_cpu.json")
    with open(path, "w") as f:
        json.dump(res, f, indent=1)
    print(f"{res['step_us_median']:.1f} us per step (rounds: {', '.join(f'{r:.1f}' for r in rounds)}) -> {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
