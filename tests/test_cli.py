"""Tests of the ``nsa`` command line (info, demo) through nsa.cli.main."""

from __future__ import annotations

import re

import pytest

import nsa
from nsa.apps import cli


def test_info(capsys):
    assert cli.main(["info"]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert lines[0] == f"nsa {nsa.__version__}"
    import torch

    assert f"torch {torch.__version__}" in lines[1]
    assert re.search(r"^backends: torch \(every device\)", out, re.M)
    if not torch.cuda.is_available():
        assert "cuda: no device" in lines


@pytest.mark.parametrize("s,want", [
    pytest.param(8192, (511, 1024, 512), id="8k"),
    pytest.param(16384, (1023, 1024, 512), id="16k"),
    pytest.param(65536, (4095, 1024, 512), id="64k"),
    pytest.param(100, (5, 100, 100), id="short"),
    pytest.param(31, (0, 31, 31), id="no-cmp"),
])
def test_decode_reads(s, want):
    assert nsa.geometry.decode_reads(s) == want


@pytest.mark.parametrize("T,l,d", [(0, 32, 16), (31, 32, 16), (32, 32, 16), (1000, 32, 16), (4099, 64, 64), (77, 8, 4)])
def test_visible_cmp_pairs_equal_brute_force(T, l, d):
    want = sum(1 for t in range(T) for i in range(nsa.geometry.num_cmp_blocks(T, l, d)) if i * d + l - 1 <= t)
    assert nsa.geometry.visible_cmp_pairs(T, l, d) == want


def test_demo(capsys):
    assert cli.main(["demo", "--seq-len", "300", "--d-model", "128", "--decode-steps", "2"]) == 0
    out = capsys.readouterr().out
    # decode equals the full pass
    diff = float(re.search(r"max \|diff\| = ([0-9.e+-]+)", out).group(1))
    assert diff <= 1e-5
    # the last decoded query sits at 301; its forced blocks 0, 3, 4 are in every group
    assert "query at position 301" in out
    groups = re.findall(r"group (\d+): \[([0-9, ]*)\]", out)
    assert [int(g) for g, _ in groups] == [0, 1, 2, 3]
    for _, blocks in groups:
        b = [int(v) for v in blocks.split(",")]
        assert {0, 3, 4} <= set(b) and b == sorted(b) and max(b) == 4
    m = re.search(r"read (\d+) compressed \+ (\d+) selected \+ (\d+) window = (\d+) tokens", out)
    cmp_, slc, win, total = map(int, m.groups())
    assert cmp_ == (302 - 32) // 16 + 1 == 17
    assert win == 302 and slc <= 302 and total == cmp_ + slc + win
    # paper Table 4 rows: context, full, cmp, slc, win, NSA, ratio
    rows = {int(r[0]): r for r in re.findall(
        r"^\s*(\d+)\s+(\d+)\s+(\d+)\s+(\d+)\s+(\d+)\s+(\d+)\s+([0-9.]+)x$", out, re.M)}
    assert rows[8192][1:6] == ("8192", "511", "1024", "512", "2047")
    assert rows[16384][5] == "2559" and rows[32768][5] == "3583" and rows[65536][5] == "5631"
    assert float(rows[65536][6]) == pytest.approx(65536 / 5631, abs=0.05)


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="checks the no-GPU message")
@pytest.mark.parametrize("what", ["prefill", "train", "generate"])
def test_bench_needs_a_gpu(what, capsys):
    assert cli.main(["bench", what, "--seqlens", "64"]) == 2
    assert "needs a CUDA GPU" in capsys.readouterr().err


def test_bench_train_speedups_and_table():
    """Speedups of the train benchmark are the baseline's time over ours, for forward +
    backward and for the backward alone; the table shows both against the faster SDPA."""
    from nsa.apps import bench

    r = dict(config="paper", T=8192, nsa_fwd_ms=2.0, nsa_bwd_ms=6.0, nsa_ms=8.0,
             sdpa_cudnn_fwd_ms=3.0, sdpa_cudnn_bwd_ms=21.0, sdpa_cudnn_ms=24.0,
             sdpa_flash_fwd_ms=5.0, sdpa_flash_bwd_ms=27.0, sdpa_flash_ms=32.0)
    bench._finish_train(r, ["sdpa_flash", "sdpa_cudnn"])
    assert r["speedup_vs_sdpa_cudnn"] == pytest.approx(24.0 / 8.0)
    assert r["bwd_speedup_vs_sdpa_flash"] == pytest.approx(27.0 / 6.0)
    table = bench.markdown_table(dict(results=[r]))
    assert "| paper | 8k | 2.00 / 6.00 | 5.00 / 27.00 | 3.00 / 21.00 | 3.0x | 3.5x |" in table
    pieces = dict(zip(bench.BWD_PIECES, (0.5, 0.25, 2.0, 4.5, 3.0, 0.75, 1.0)))
    r.update({f"{k}_ms": v for k, v in pieces.items()})
    assert "| 3.5x | 0.50 / 0.25 / 2.00 (4.50) / 3.00 (0.75) / 1.00 |" in bench.markdown_table(dict(results=[r]))


def test_bench_decode_table():
    """The decode table: eager and CUDA-graph times, and NSA's speedups over the faster SDPA."""
    from nsa.apps import bench

    r = dict(config="paper", T=65536, batch=16, keys_nsa=5631, keys_full=65536, nsa_ms=0.5,
             nsa_graph_ms=0.1, sdpa_cudnn_ms=0.7, sdpa_cudnn_graph_ms=0.6, nsa_graph_gbps=1234.0)
    assert ("| paper | 64k | 16 | 500 / 100 | - | - | 700 / 600 | 5631 / 65536 | 1234 | 1.4x / 6.0x |"
            in bench.markdown_table_decode(dict(results=[r])))


def test_gpu_tag():
    from nsa.apps.bench import gpu_tag

    assert [gpu_tag(n) for n in ("NVIDIA H200", "NVIDIA H100 80GB HBM3", "NVIDIA A100-SXM4-40GB")] == \
        ["h200", "h100", "a100"]


def test_bench_generate_step_time_and_table(monkeypatch):
    """Decode-step time from two generate lengths (prefill and one-time cost cancel out), and
    the table that puts NSA eager / graphed next to full attention."""
    import torch

    from nsa.apps import bench

    prefill, once, step = 40.0, 25.0, 0.5  # a fake model whose generate takes exactly this long
    clock = {"t": 0.0}

    class Fake:
        def generate(self, prompt, n, cuda_graph=False):
            clock["t"] += (prefill + (once if n > 1 else 0.0) + (n - 1) * step) / 1e3

    monkeypatch.setattr(torch.cuda, "synchronize", lambda: None)
    monkeypatch.setattr(__import__("time"), "perf_counter", lambda: clock["t"])
    got = bench._generate_ms(Fake(), None, 64, True)
    assert got == pytest.approx((prefill, once, step))
    rows = [dict(preset="small", attention="nsa", graph=False, T=4096, batch=2, step_ms=2.0, prefill_ms=30.0),
            dict(preset="small", attention="nsa", graph=True, T=4096, batch=2, step_ms=0.25, once_ms=12.0,
                 tokens_per_s=8000.0),
            dict(preset="small", attention="full", graph=False, T=4096, batch=2, step_ms=1.0, prefill_ms=20.0),
            dict(preset="small", attention="full", graph=True, T=4096, batch=2, step_ms=0.75)]
    assert ("| small | 4096 | 2 | 2.000 / 0.250 | 1.000 / 0.750 | 8000 | 3.0x | 12.0 | 30.0 / 20.0 |"
            in bench.markdown_table_generate(dict(results=rows)))
