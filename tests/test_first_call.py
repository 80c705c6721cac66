"""The first call: autotune results on disk, the first-call notice, ``nsa bench first-call``."""

import logging
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # as the kernel tests: kernels built for the interpreter

triton = pytest.importorskip("triton")

from nsa.apps import bench_first_call as FC  # noqa: E402
from nsa.triton import _common as C  # noqa: E402


def test_autotune_kwargs_persist_timings():
    kw = C.autotune_kwargs(["HQ", "DK"], [4, 8], [1, 2, 3])
    assert kw["cache_results"] is True and kw["key"] == ["HQ", "DK"]
    assert [(c.num_warps, c.num_stages) for c in kw["configs"]] == [(w, s) for w in (4, 8) for s in (1, 2, 3)]


def test_tuned_variants_lists_every_autotuned_kernel():
    from nsa.triton import band, decode, select, selected  # noqa: F401  (registers the kernels)

    v = C.tuned_variants()
    # the launchers' lists (band.py, select.py, selected.py, decode.py)
    want = {"_band_fwd": (2, 2), "_select_fwd": (2, 3), "_selected_fwd": (4, 3), "_decode_cmp": (2, 3),
            "_decode_attend": (2, 2)}
    for name, (nw, ns) in want.items():
        assert len(v[name]) == nw * ns, name
        assert len({(c["num_warps"], c["num_stages"]) for c in v[name]}) == nw * ns
    # the slc forward times at most 3 warps x 3 stages of its 4 x 3 for any launch (the first
    # call's time): 1, 4, 8 warps for one-position descriptor tiles, 2, 4, 8 else, 4, 8 shared
    from types import SimpleNamespace

    cfgs = [SimpleNamespace(**c) for c in v["_selected_fwd"]]
    for args, warps in ((dict(SHARE=-1, TMA=True, BT=1, HP=16), {1, 4, 8}),
                        (dict(SHARE=-1, TMA=False, BT=1, HP=16), {2, 4, 8}),
                        (dict(SHARE=-1, TMA=True, BT=1, HP=32), {2, 4, 8}),
                        (dict(SHARE=-1, TMA=True, BT=4, HP=4), {2, 4, 8}),
                        (dict(SHARE=12, TMA=False, BT=4, HP=16), {4, 8})):
        kept = selected._prune(cfgs, {}, **args)
        assert {c.num_warps for c in kept} == warps and len(kept) == 3 * len(warps), args


@triton.jit
def _noop(X, N: triton.language.constexpr):
    pass


def test_autotuned_builds_a_noticing_autotuner_that_caches(monkeypatch, caplog):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setattr(C, "interpreting", lambda: False)
    tuned = C.autotuned(_noop, ["N"], [4, 8], [1])
    assert isinstance(tuned, C._Autotuner) and tuned.cache_results is True and len(tuned.configs) == 2
    # triton's own Autotuner.run, with the kernel launch and the timing stubbed (no GPU here)
    launched, timed, pruned = [], [], []

    class Kernel:
        def run(self, *a, **k):
            launched.append(k["num_warps"])

    tuned.fn, tuned.cache_results = Kernel(), False
    monkeypatch.setattr(tuned, "_bench", lambda *a, config, **k: timed.append(config) or [float(config.num_warps)])
    prune = C._Autotuner.prune_configs
    monkeypatch.setattr(C._Autotuner, "prune_configs", lambda self, kw: pruned.append(1) or prune(self, kw))
    monkeypatch.setattr(C, "_SEEN", set())
    monkeypatch.setattr(C, "_ANNOUNCED", [False])

    class T:
        dtype = "torch.bfloat16"
    with caplog.at_level(logging.INFO, logger="nsa"):
        for _ in range(3):
            tuned.run(T(), N=16, grid=(1,), warmup=False)
    # tuned once (both configs timed, the faster launched every time); the key it notices is
    # triton's: the key arguments, then the dtypes of tensor arguments; the known key's launches
    # did not reach the notice
    assert len(timed) == 2 and launched == [4, 4, 4] and len(pruned) == 1
    assert ("_noop", (16, "torch.bfloat16")) in C._SEEN
    assert [r.levelname for r in caplog.records].count("WARNING") == 1
    assert sum("first call of _noop at N=16" in r.getMessage() for r in caplog.records) == 1
    assert sum("_noop ready after" in r.getMessage() for r in caplog.records) == 1
    # the known key's launches took the direct path (no second key of triton's built for them);
    # a new key value or another tensor dtype is a new key: tuned again, then direct (the bf16
    # tensor's key is triton's key of the stand-in T above: found in triton's cache, not retuned)
    assert len(tuned._fast) == 1
    for x in (T(), torch.empty(1, dtype=torch.bfloat16), torch.empty(1, dtype=torch.float16)):
        for _ in range(2):
            tuned.run(x, N=32, grid=(1,), warmup=False)
    assert len(pruned) == 3 and len(timed) == 6 and len(tuned._fast) == 4 and launched == [4] * 9


def test_notice_only_when_the_timings_are_not_on_disk(monkeypatch, caplog):
    """With the timings persisted (cache_results), a key found on disk loads without the notice
    (a warm cache takes seconds); a key missing there is tuned after it."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setattr(C, "interpreting", lambda: False)
    tuned = C.autotuned(_noop, ["N"], [4, 8], [1])
    on_disk, timed = {(16,)}, []

    def disk(self, key, configs, bench_fn):  # triton's lookup, with the disk a set of keys
        if key[:1] in on_disk:
            self.cache[key] = configs[1]
            return True
        bench_fn()
        return False

    class Kernel:
        def run(self, *a, **k):
            pass

    tuned.fn, tuned.cache_results = Kernel(), True
    monkeypatch.setattr(triton.runtime.autotuner.Autotuner, "check_disk_cache", disk)
    monkeypatch.setattr(tuned, "_bench", lambda *a, config, **k: timed.append(config) or [float(config.num_warps)])
    monkeypatch.setattr(C, "_SEEN", set())
    monkeypatch.setattr(C, "_ANNOUNCED", [False])
    with caplog.at_level(logging.INFO, logger="nsa"):
        tuned.run(torch.empty(1), N=16, grid=(1,), warmup=False)
        assert not [r for r in caplog.records if "compiling and autotuning" in r.getMessage()] and not timed
        assert tuned.best_config.num_warps == 8  # the disk's choice
        tuned.run(torch.empty(1), N=32, grid=(1,), warmup=False)
    assert len(timed) == 2 and [r.levelname for r in caplog.records].count("WARNING") == 1


def test_notice_once_per_key_and_one_warning_per_process(monkeypatch, caplog):
    monkeypatch.setattr(C, "_SEEN", set())
    monkeypatch.setattr(C, "_ANNOUNCED", [False])
    assert C.first_call("k", (1, 2)) and not C.first_call("k", (1, 2)) and C.first_call("k", (1, 3))
    monkeypatch.setattr(C, "_SEEN", set())
    with caplog.at_level(logging.INFO, logger="nsa"):
        for key in [(64, 192), (64, 192), (64, 128), (64, 192)]:
            C.notice_first_call("_band_fwd", key, ["HQ", "DK"])
    levels = [r.levelname for r in caplog.records]
    assert levels.count("WARNING") == 1 and levels.count("INFO") == 2  # two new keys
    assert "compiling and autotuning Triton kernels" in caplog.records[0].getMessage()
    assert "HQ=64, DK=128" in caplog.records[-1].getMessage()


def test_first_call_arithmetic_and_table():
    t = FC.child_times(100.0, dict(ready_at=104.0, fwd_at=130.5, done_at=150.0, second_call_s=0.012))
    assert t == dict(setup_s=4.0, fwd_s=26.5, bwd_s=19.5, first_result_s=50.0, second_call_s=0.012)
    rows = [dict(config="paper", T=8192, cache="empty", wall_s=52.0, notice=True, **t),
            dict(config="paper", T=8192, cache="warm", wall_s=8.0, notice=False,
                 **FC.child_times(0.0, dict(ready_at=3.0, fwd_at=5.0, done_at=6.5, second_call_s=0.01))),
            dict(config="paper", T=8192, cache="warm", wall_s=1.0, notice=False, error="boom")]
    table = FC.markdown_table(dict(meta=dict(targets_s=FC.TARGETS_S), results=rows)).splitlines()
    assert table[2] == "| paper | 8k | empty | 50.0 (4.0 / 26.5 / 19.5) | 52.0 | 12 | 60 | yes |"
    assert table[3] == "| paper | 8k | warm | 6.5 (3.0 / 2.0 / 1.5) over | 8.0 | 10 | 5 | no |"
    assert table[4] == "| paper | 8k | warm | error: boom | 1.0 | - | 5 | no |"


def test_first_op_call_does_not_import_dynamo():
    """The registered ops are defined with torch.library.define + impl, not custom_op, whose
    implementation wrapper imports torch._dynamo (and sympy) on its first call: seconds of a
    fresh process's first forward. A fresh process runs one op through its registration and
    checks what got imported."""
    import subprocess
    import sys

    code = ("import sys, torch, nsa\n"
            "from nsa.reference import compress_mean\n"
            "q, k = torch.randn(1, 64, 2, 16), torch.randn(1, 64, 1, 16)\n"
            "kc = compress_mean(k, 8, 4)\n"
            "ref = nsa.select_blocks(q, kc, cmp_block=8, cmp_stride=4, sel_block=8, sel_count=3, backend='torch')\n"
            "got = torch.ops.nsa.select_blocks(q, kc, None, 8, 4, 8, 3, 0.25, 0)\n"
            "assert torch.equal(got, ref), (got, ref)\n"
            "print(sorted(m for m in ('torch._dynamo', 'sympy') if m in sys.modules))\n")
    env = dict(os.environ, TRITON_INTERPRET="1")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.strip().splitlines()[-1] == "[]", r.stdout
