"""Tests of the ``nsa`` command line through nsa.apps.cli.main: info, demo, generate, the
one-line user errors of every command, and the library/applications boundary."""

from __future__ import annotations

import argparse
import ast
import os
import re
import subprocess
import sys

import pytest

import nsa
from nsa.apps import cli

SRC = os.path.dirname(nsa.__file__)


def cli_error(argv, capsys) -> str:
    """The message of a user error: ``nsa ARGV`` exits 2 with one line ``nsa: error: ...`` on
    stderr (no traceback)."""
    capsys.readouterr()
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("nsa: error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    return err


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
    assert "query at position 301" in out and "forced: 0, 3, 4)" in out
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
@pytest.mark.parametrize("what", ["prefill", "train", "generate", "model-train", "compile"])
def test_bench_needs_a_gpu(what, capsys):
    assert "needs a CUDA GPU" in cli_error(["bench", what, "--seqlens", "64"], capsys)


def test_bench_train_speedups_and_table():
    """Speedups of the train benchmark are the baseline's time over ours, for forward +
    backward and for the backward alone; the table shows both against the faster SDPA."""
    from nsa.apps import bench

    r = dict(config="paper", T=8192, nsa_fwd_ms=2.0, nsa_bwd_ms=6.0, nsa_ms=8.0,
             sdpa_cudnn_fwd_ms=3.0, sdpa_cudnn_bwd_ms=21.0, sdpa_cudnn_ms=24.0,
             sdpa_flash_fwd_ms=5.0, sdpa_flash_bwd_ms=27.0, sdpa_flash_ms=32.0)
    c = bench.CONFIGS["paper"]
    bench._finish_train(r, ["sdpa_flash", "sdpa_cudnn"], 8192, c)
    assert r["speedup_vs_sdpa_cudnn"] == pytest.approx(24.0 / 8.0)
    assert r["bwd_speedup_vs_sdpa_flash"] == pytest.approx(27.0 / 6.0)
    # useful backward FLOPs: five matmuls per (row, key) pair of each branch's forward
    fwd, bwd = bench.nsa_flops(8192, c), bench.nsa_bwd_flops(8192, c)
    for b in ("cmp", "slc", "win"):
        assert bwd[b] * (c["Dk"] + c["Dv"]) == fwd[b] * (3 * c["Dk"] + 2 * c["Dv"])
    assert r["nsa_bwd_tflops"] == pytest.approx(bwd["total"] / 6.0e-3 / 1e12)
    table = bench.markdown_table(dict(results=[r]))
    assert "| paper | 8k | 2.00 / 6.00 | 5.00 / 27.00 | 3.00 / 21.00 | 3.0x | 3.5x |" in table
    pieces = dict(zip(bench.BWD_PIECES, (2.0, 4.5, 3.0, 0.75, 0.9, 1.0)))
    r.update({f"{k}_ms": v for k, v in pieces.items()})
    assert "| 3.5x | 2.00 (4.50) / 3.00 (0.75) / 1.00 |" in bench.markdown_table(dict(results=[r]))


@pytest.mark.parametrize("preset", ["small", "base"])
def test_bench_preset_configs_are_the_presets_layers(preset):
    """The kernel benchmarks' small / base configurations are one attention layer of those model
    presets, so that kernel timings explain `model-train`'s."""
    from nsa.apps import bench
    from nsa.model import PRESETS

    a = PRESETS[preset].attn
    assert bench.CONFIGS[preset] == dict(HQ=a.n_heads, H=a.n_kv_heads, Dk=a.head_dim, Dv=a.v_head_dim, l=a.cmp_block,
                                         d=a.cmp_stride, lp=a.sel_block, n=a.sel_count, w=a.window,
                                         shared=a.shared_kv)


def test_bench_prefill_kernel_rates_and_table():
    """Each kernel of the prefill breakdown gets its useful TFLOP/s from its own FLOP count, and
    slc its gathered bytes per second: (Dk + Dv) bf16 values of n * l' keys per (position, group)
    once a position sees that many."""
    from nsa.apps import bench

    c = bench.CONFIGS["paper"]
    T = 65536
    r = dict(config="paper", T=T, flops_nsa=bench.nsa_flops(T, c)["total"], flops_full=bench.full_flops(T, c),
             nsa_ms=50.0, k_cmp_ms=10.0,
             k_select_ms=8.0, k_slc_ms=20.0, k_win_ms=4.0, sdpa_cudnn_ms=150.0)
    bench._finish_prefill(r, ["sdpa_cudnn"], T, c)
    f = bench.nsa_flops(T, c)
    for k, ms in (("cmp", 10.0), ("select", 8.0), ("slc", 20.0), ("win", 4.0)):
        assert r[f"k_{k}_tflops"] == pytest.approx(f[k] / ms / 1e9)
    S = c["n"] * c["lp"]
    keys = sum(t + 1 for t in range(S)) + (T - S) * S  # selected keys summed over positions
    assert bench.slc_gather_bytes(T, c) == keys * c["H"] * (c["Dk"] + c["Dv"]) * 2
    assert r["k_slc_gather_tb_s"] == pytest.approx(keys * c["H"] * (c["Dk"] + c["Dv"]) * 2 / 20.0e-3 / 1e12)
    assert r["speedup_vs_sdpa_cudnn"] == pytest.approx(3.0)
    row = bench.markdown_table(dict(results=[r])).splitlines()[-1]
    rates = " / ".join(f"{r[f'k_{k}_tflops']:.0f}" for k in ("cmp", "select", "slc", "win"))
    assert f"| 10.00 / 8.00 / 20.00 / 4.00 | {rates} | {r['k_slc_gather_tb_s']:.1f} | - | 150.00 |" in row, row


def test_bench_compile_table():
    """Speedup = eager ms / compiled ms; tokens/s and the compiled first call per step; the
    decode step's CUDA-graph times where measured."""
    from nsa.apps import bench

    runs = (("train", 1, False, 30.0, 136533.3, 2.0), ("train", 1, True, 20.0, 204800.0, 55.5),
            ("decode", 4, False, 4.0, 1000.0, 0.1), ("decode", 4, True, 1.0, 4000.0, 20.25))
    rows = [dict(preset="small", step=step, compiled=c, T=4096, batch=b, ms=ms, tokens_per_s=tok, first_call_s=fc)
            for step, b, c, ms, tok, fc in runs]
    rows[2]["graph_ms"], rows[3]["graph_ms"] = 0.75, 0.3125
    table = bench.markdown_table_compile(dict(results=rows[::-1]))
    lines = table.splitlines()
    assert lines[2] == "| small | train | 4096 | 1 | 30.000 | 20.000 | 1.50x | 136533 / 204800 | 55.5 | - / - |"
    assert lines[3] == "| small | decode | 4096 | 4 | 4.000 | 1.000 | 4.00x | 1000 / 4000 | 20.2 | 0.750 / 0.312 |"


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
        def generate(self, prompt, n, cuda_graph=False, compile=False):
            clock["t"] += (prefill + (once if n > 1 else 0.0) + (n - 1) * step) / 1e3

    monkeypatch.setattr(torch.cuda, "synchronize", lambda: None)
    monkeypatch.setattr(__import__("time"), "perf_counter", lambda: clock["t"])
    got = bench._generate_ms(Fake(), None, 64, True)
    assert got == pytest.approx((prefill, once, step))
    rows = [dict(preset="small", attention="nsa", graph=False, T=4096, batch=2, step_ms=2.0, prefill_ms=30.0),
            dict(preset="small", attention="nsa", graph=True, T=4096, batch=2, step_ms=0.25, once_ms=12.0,
                 tokens_per_s=8000.0),
            dict(preset="small", attention="full", graph=False, T=4096, batch=2, step_ms=1.0, prefill_ms=20.0),
            dict(preset="small", attention="full", graph=True, T=4096, batch=2, step_ms=0.75),
            dict(preset="small", attention="nsa", graph=True, compiled=True, T=4096, batch=2, step_ms=0.125),
            dict(preset="small", attention="full", graph=True, compiled=True, T=4096, batch=2, step_ms=0.5)]
    assert ("| small | 4096 | 2 | 2.000 / 0.250 / 0.125 | 1.000 / 0.750 / 0.500 | 8000 | 3.0x / 4.0x | 12.0 | "
            "30.0 / 20.0 | - / - |" in bench.markdown_table_generate(dict(results=rows)))
    # window-only (--attentions nsa full window), the floor of NSA's step, in the last column
    win = [dict(preset="small", attention="window", graph=True, compiled=c, T=4096, batch=2, step_ms=ms)
           for c, ms in ((False, 0.1), (True, 0.05))]
    assert "30.0 / 20.0 | 0.100 / 0.050 |" in bench.markdown_table_generate(dict(results=rows + win))
    # rows of older files, without "compiled": the compiled columns stay empty
    assert ("| small | 4096 | 2 | 2.000 / 0.250 / - | 1.000 / 0.750 / - | 8000 | 3.0x / - | 12.0 | 30.0 / 20.0 |"
            in bench.markdown_table_generate(dict(results=rows[:4])))


def test_demo_short_sequence_lists_valid_forced_blocks(capsys):
    """Before block 1 the three forced blocks are block 0 alone (no block -1)."""
    assert cli.main(["demo", "--seq-len", "1", "--decode-steps", "1", "--d-model", "64"]) == 0
    out = capsys.readouterr().out
    assert "query at position 1 (block = 64 keys; forced: 0):" in out
    assert re.findall(r"group \d+: \[([0-9, ]*)\]", out) == ["0"] * 4


TRAIN = ["train", "--attention", "nsa", "--set", "d_model=32", "--set", "n_layers=1", "--steps", "1",
         "--seq-len", "112", "--device", "cpu", "--no-needle"]


@pytest.mark.parametrize("argv,names", [
    pytest.param(["train", "--batch-size", "0"], "--batch-size", id="train-batch-0"),
    pytest.param(["train", "--steps", "0"], "--steps", id="train-steps-0"),
    pytest.param(["train", "--seq-len", "-5"], "--seq-len", id="train-seq-len-negative"),
    pytest.param(["train", "--lr", "0"], "--lr", id="train-lr-0"),
    pytest.param(["train", "--batch-size", "two"], "--batch-size", id="train-batch-not-a-number"),
    pytest.param(["train", "--contexts", "128,0"], "--contexts", id="train-contexts-0"),
    pytest.param(["needle", "x", "--depths", "0.5,2"], "--depths", id="needle-depth-2"),
    pytest.param(["demo", "--seq-len", "0"], "--seq-len", id="demo-seq-len-0"),
    pytest.param(["demo", "--decode-steps", "0"], "--decode-steps", id="demo-decode-0"),
    pytest.param(["generate", "x", "--top-p", "0"], "--top-p", id="generate-top-p-0"),
    pytest.param(["generate", "x", "--max-new-tokens", "-1"], "--max-new-tokens", id="generate-tokens-negative"),
    pytest.param(["bench", "prefill", "--seqlens", "0"], "--seqlens", id="bench-seqlens-0"),
    pytest.param(["trian"], "invalid choice", id="unknown-command"),
])
def test_bad_values_are_one_line_errors(argv, names, capsys):
    """Found: --batch-size 0 trained with the default 16, --seq-len 0 ran the demo on nothing."""
    err = cli_error(argv, capsys)
    assert names in err and "--help')" in err  # argparse's message, and where the options are


def test_out_that_cannot_be_a_folder(tmp_path, capsys):
    """--out naming a file, or a place no folder can be made, is a user error before any work."""
    f = tmp_path / "afile"
    f.write_text("x")
    assert f"--out {str(f)!r} is a file, not a folder" in cli_error([*TRAIN, "--out", str(f)], capsys)
    assert "cannot create the folder (Not a directory)" in cli_error([*TRAIN, "--out", str(f / "sub")], capsys)
    assert "is a file, not a folder" in cli_error(["needle", "missing.safetensors", "--out", str(f / "grid")],
                                                  capsys)
    os.makedirs(tmp_path / "grid.json")
    assert "grid.json' is a folder" in cli_error(["needle", "m.safetensors", "--out", str(tmp_path / "grid")],
                                                  capsys)
    assert f.read_text() == "x" and sorted(os.listdir(tmp_path)) == ["afile", "grid.json"]  # nothing written


def test_generate_reads_only_checkpoints(tmp_path, capsys):
    """Found: ``nsa generate runs/tiny/nsa/log.jsonl`` failed inside safetensors."""
    log = tmp_path / "log.jsonl"
    log.write_text('{"step": 1, "loss": 5.0}\n' * 20)
    assert "is not a safetensors file" in cli_error(["generate", str(log)], capsys)
    assert "does not exist" in cli_error(["generate", str(tmp_path / "nothing")], capsys)
    for kind in ("nsa", "window"):  # what `nsa train` writes: one folder per attention kind
        os.makedirs(tmp_path / "run" / kind)
        (tmp_path / "run" / kind / "checkpoint.json").write_text("{}")
    assert "its subfolders nsa, window do" in cli_error(["generate", str(tmp_path / "run")], capsys)


def test_generate_prints_prompt_and_continuation_apart(tmp_path, capsys):
    """Found: the prompt and the continuation were printed glued together."""
    import torch

    from nsa.apps.data import decode, encode
    from nsa.model import ModelConfig, NSAModel, save_model

    torch.manual_seed(0)
    model = NSAModel(ModelConfig.preset("tiny", attention="full", n_layers=1, d_model=32)).eval()
    path = str(tmp_path / "m.safetensors")
    save_model(model, path)
    capsys.readouterr()
    assert cli.main(["generate", path, "--prompt", "The pass key is", "--max-new-tokens", "6",
                     "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    want = decode(model.generate(encode("The pass key is")[None], 6)[0, 15:].tolist())
    assert out == f"--- prompt (15 bytes)\nThe pass key is\n--- continuation (6 bytes)\n{want}\n"


def test_help_lists_every_bench_mode(capsys):
    """Found: ``nsa --help`` listed two of the four bench modes."""
    p = cli.build_parser()
    sub = next(a for a in p._actions if isinstance(a, argparse._SubParsersAction))
    modes = next(a for a in sub.choices["bench"]._actions if a.dest == "what").choices
    with pytest.raises(SystemExit):
        cli.main(["--help"])
    listed = re.search(r"nsa bench \{([a-z,-]+)\}", " ".join(capsys.readouterr().out.split())).group(1)
    assert listed.split(",") == list(modes) and len(modes) >= 4


def test_os_errors_are_one_line(monkeypatch, capsys):
    """An OSError a command meets (a disk full, a file it may not read) is reported, not raised."""
    def fail(args):
        raise PermissionError(13, "Permission denied", "/some/file")

    monkeypatch.setattr(cli, "cmd_info", fail)
    assert cli_error(["info"], capsys) == "nsa: error: /some/file: Permission denied\n"


def _imports(path: str, package: str) -> set[str]:
    """Absolute names of the nsa modules that the file ``path`` of ``package`` imports."""
    tree = ast.parse(open(path).read())
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = package.split(".")
            base = base[:len(base) - node.level + 1] if node.level else []
            mod = ".".join(base + ([node.module] if node.module else []))
            out |= {mod} | {f"{mod}.{a.name}" for a in node.names}
    return {m for m in out if m == "nsa" or m.startswith("nsa.")}


def test_library_never_imports_the_applications():
    """No module outside nsa/apps imports nsa.apps (the `python -m nsa` entry point aside), and
    `import nsa` (and nsa.model) loads none of the applications."""
    offenders = []
    for root, _, files in os.walk(SRC):
        rel = os.path.relpath(root, SRC)
        package = "nsa" if rel == "." else "nsa." + rel.replace(os.sep, ".")
        if package == "nsa.apps" or package.startswith("nsa.apps."):
            continue
        for f in files:
            if f.endswith(".py") and not (package == "nsa" and f == "__main__.py"):
                bad = {m for m in _imports(os.path.join(root, f), package) if m.startswith("nsa.apps")}
                offenders += [f"{package}/{f} imports {m}" for m in sorted(bad)]
    assert not offenders
    code = ("import sys, nsa, nsa.model, nsa.geometry; "
            "print(sorted(m for m in sys.modules if m.startswith('nsa.apps')))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       env={**os.environ, "PYTHONPATH": os.path.dirname(SRC)})
    assert r.returncode == 0 and r.stdout.strip() == "[]", r.stdout + r.stderr


def test_applications_import_each_other_without_cycles():
    """checkpoint, needle, runtime and train import each other one way (runtime at the bottom)."""
    apps = os.path.join(SRC, "apps")
    names = [f[:-3] for f in os.listdir(apps) if f.endswith(".py") and f != "__init__.py"]
    deps = {n: {m.split(".")[2] for m in _imports(os.path.join(apps, n + ".py"), "nsa.apps")
                if m.startswith("nsa.apps.") and m.split(".")[2] in names} - {n} for n in names}
    done: set = set()
    while len(done) < len(deps):  # peel off the modules whose imports are all peeled off
        ready = {n for n in deps if n not in done and deps[n] <= done}
        assert ready, f"an import cycle among {sorted(set(deps) - done)}"
        done |= ready
    assert deps["runtime"] == set() and "train" not in deps["checkpoint"] | deps["needle"]
