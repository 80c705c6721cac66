"""Device time by kernel name (torch.profiler) and wall clock of synchronized calls, shared by
the per-kernel benchmark scripts (``decode_kernels.py``, ``train_kernels.py``,
``model_kernels.py``, ``bwd_tiles.py``)."""

from __future__ import annotations

import collections
import time

import torch


def device_ms(fn, steps: int, before=None, skip=()) -> dict:
    """{kernel name: mean device ms per call} of ``steps`` calls of ``fn`` (warm it up first),
    largest first. ``before`` runs ahead of each call (an L2 flush) and its kernels are left out
    by ``skip``, substrings of their names (lower case)."""
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            if before is not None:
                before()
            fn()
        torch.cuda.synchronize()
    total = collections.defaultdict(float)
    for e in prof.events():
        if e.device_type == torch.autograd.DeviceType.CUDA and not any(s in e.name.lower() for s in skip):
            total[e.name] += e.device_time_total / 1e3 / steps
    return dict(sorted(total.items(), key=lambda x: -x[1]))


def wall_ms(fn, steps: int, warmup: int = 0) -> float:
    """Mean wall-clock milliseconds of ``steps`` calls of ``fn`` after ``warmup`` calls,
    synchronized before and after."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(steps):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t) / steps * 1e3
