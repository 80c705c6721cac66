"""The language-modelling study: the standard library corpus and its split, the sampler and exact
resume on it, the validation loss (overall and by position) against a direct computation, the
study script's CPU smoke run and its --data option, and the model-level training benchmark's
arithmetic (the python corpus: test_data.py)."""

import hashlib
import importlib.util
import json
import os

import numpy as np
import pytest
import torch

from nsa.apps import cli, data
from nsa.apps.data import SEPARATOR, StdlibCorpus, TextCorpus, is_validation_file, stdlib_files
from nsa.apps.runtime import Dist
from nsa.apps.train import evaluate_text, read_log
from nsa.model import ModelConfig, NSAModel

from test_cli import cli_error
from test_train import SMALL, weights

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _fake_stdlib(root, n=40):
    """A standard library folder: n modules in packages, and what the corpus leaves out."""
    rng = np.random.default_rng(0)
    for i in range(n):
        p = root / ("pkg%d" % (i % 3)) / f"mod{i}.py" if i % 2 else root / f"mod{i}.py"
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(b"".join(b"x = %d\n" % v for v in rng.integers(0, 1000, 10 + i)))
    for skip in ("site-packages/foo.py", "dist-packages/bar.py", "__pycache__/mod1.py", "_sysconfigdata_x.py",
                 "config-3.11-x86_64/python-config.py", "pkg0/__pycache__/mod1.py"):
        (root / skip).parent.mkdir(parents=True, exist_ok=True)
        (root / skip).write_text("skipped = True\n")
    (root / "README.txt").write_text("not python")
    (root / "pkg0" / "site-packages").mkdir()
    (root / "pkg0" / "site-packages" / "x.py").write_text("y = 1\n")


def _fake_packages(root, n=30):
    """An installed packages' folder: n modules, and what the python corpus leaves out (a cache,
    a file holding a NUL, a FIFO, a dangling link, a non-.py file). Returns {rel: bytes} of the
    files it keeps."""
    rng = np.random.default_rng(1)
    kept = {}
    for i in range(n):
        rel = f"pkg{i % 4}/sub/m{i}.py" if i % 3 else f"top{i}.py"
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        kept[rel] = b"".join(b"def f%d(): return %d\n" % (j, v) for j, v in enumerate(rng.integers(0, 99, 5 + i)))
        (root / rel).write_bytes(kept[rel])
    (root / "pkg0" / "__pycache__").mkdir()
    (root / "pkg0" / "__pycache__" / "m1.py").write_text("cached = 1\n")
    (root / "pkg1" / "nul.py").write_bytes(b"x = 1\n\0y = 2\n")
    os.mkfifo(root / "fifo.py")
    os.symlink(root / "missing.py", root / "dangling.py")
    (root / "pkg2" / "data.txt").write_text("not python")
    return kept


def _fake_roots(tmp_path, monkeypatch):
    """The running Python's folders replaced by small fake ones (the real site-packages is 100s of MB)."""
    std, pkgs = tmp_path / "lib", tmp_path / "site"
    std.mkdir()
    pkgs.mkdir()
    _fake_stdlib(std, n=60)
    _fake_packages(pkgs, n=60)
    monkeypatch.setattr(data, "stdlib_root", lambda: str(std))
    monkeypatch.setattr(data, "package_roots", lambda: [str(pkgs)])
    return std, pkgs


def test_corpus_split_is_by_file_disjoint_and_reproducible(tmp_path):
    _fake_stdlib(tmp_path)
    files = stdlib_files(str(tmp_path))
    want = sorted([f"mod{i}.py" for i in range(0, 40, 2)] + [f"pkg{i % 3}/mod{i}.py" for i in range(1, 40, 2)])
    assert files == want  # sorted POSIX paths; installed packages, caches and build files left out
    c = StdlibCorpus(16, root=str(tmp_path), val_fraction=0.3)
    val = [f for f in files if is_validation_file(f, 0.3)]
    train = [f for f in files if f not in val]
    assert 0 < len(val) < len(files)
    # each stream is its files in path order, each followed by the separator
    sep = bytes([SEPARATOR])
    for stream, names in ((c.train, train), (c.val, val)):
        assert stream.tobytes() == b"".join((tmp_path / f).read_bytes() + sep for f in names)
    assert c.info["files"] == {"train": len(train), "val": len(val)}
    assert c.info["bytes"] == {"train": len(c.train), "val": len(c.val)}
    assert c.info["sha256"]["val"] == hashlib.sha256(c.val.tobytes()).hexdigest()
    # a file's split depends on its path alone: the same under another root and fraction order
    other = tmp_path / "copy"
    other.mkdir()
    for f in files:
        (other / f).parent.mkdir(parents=True, exist_ok=True)
        (other / f).write_bytes((tmp_path / f).read_bytes())
    c2 = StdlibCorpus(16, root=str(other), val_fraction=0.3)
    assert np.array_equal(c2.train, c.train) and np.array_equal(c2.val, c.val)
    assert c2.info["file_list_sha256"] == c.info["file_list_sha256"]
    # a larger fraction moves files from train to validation only
    assert set(val) <= {f for f in files if is_validation_file(f, 0.6)}
    with pytest.raises(ValueError, match="validation"):
        StdlibCorpus(10**6, root=str(tmp_path), val_fraction=0.3)


def test_the_running_pythons_stdlib():
    c = StdlibCorpus(64)
    files = stdlib_files()
    n_val = sum(is_validation_file(f) for f in files)
    assert c.info["files"] == {"train": len(files) - n_val, "val": n_val}
    assert abs(n_val / len(files) - 0.05) < 0.02 and len(c.train) > 10**6
    assert c.info["bytes"]["train"] + c.info["bytes"]["val"] == sum(
        os.path.getsize(os.path.join(c.info["root"], f)) for f in files) + len(files)
    assert not any("site-packages" in f for f in files) and "os.py" in files


def test_sampler_is_reproducible_and_val_windows_fixed(tmp_path):
    _fake_stdlib(tmp_path)
    c = StdlibCorpus(24, seed=5, root=str(tmp_path), val_fraction=0.3)
    x, y, w = c.batch(3, 4)
    assert torch.equal(x, c.batch(3, 4)[0]) and not torch.equal(x, c.batch(4, 4)[0])
    assert torch.equal(torch.cat([c.batch(3, 4, r, 2)[0] for r in range(2)]), x)  # two processes' slices
    assert torch.equal(x[:, 1:], y[:, :-1]) and w.shape == (4, 24) and bool((w == 1).all())
    stream = c.train.tobytes()
    for row, tgt in zip(x, y):  # each row is a window of the train stream
        assert stream.find(bytes(row.tolist()) + bytes(tgt[-1:].tolist())) >= 0
    # the same seed and step on another corpus object: the same batch; another seed: another
    assert torch.equal(StdlibCorpus(24, seed=5, root=str(tmp_path), val_fraction=0.3).batch(3, 4)[0], x)
    assert not torch.equal(StdlibCorpus(24, seed=6, root=str(tmp_path), val_fraction=0.3).batch(3, 4)[0], x)
    # validation windows: evenly spaced from the start to the last full window, seed-free
    off = c.val_offsets(5)
    assert off[0] == 0 and off[-1] == len(c.val) - 25 and np.all(np.diff(off) > 0)
    vx, vy = c.val_windows(5)
    assert torch.equal(vx, StdlibCorpus(24, seed=9, root=str(tmp_path), val_fraction=0.3).val_windows(5)[0])
    for o, a, b in zip(off, vx, vy):
        assert bytes(a.tolist()) == c.val[o:o + 24].tobytes() and bytes(b.tolist()) == c.val[o + 1:o + 25].tobytes()


@pytest.mark.parametrize("bucket", [16, 30])
def test_eval_loss_equals_direct_computation(bucket):
    rng = np.random.default_rng(1)
    task = TextCorpus(rng.integers(0, 256, 5000).astype(np.uint8), rng.integers(0, 256, 3000).astype(np.uint8), 112)
    cfg = ModelConfig.preset("tiny", attention="nsa", n_layers=1, d_model=32, n_heads=2, n_kv_heads=1,
                             head_dim=16, window=16, cmp_block=8, cmp_stride=4, sel_block=8, sel_count=3,
                             backend="torch")
    torch.manual_seed(0)
    model = NSAModel(cfg).train()
    got = evaluate_text(model, task, 5, bucket, 2, "cpu", Dist())
    assert model.training  # put back
    x, y = task.val_windows(5)
    with torch.no_grad():
        model.eval()
        direct = float(model.loss(x, y))
        ce = torch.nn.functional.cross_entropy(model(x).flatten(0, 1), y.flatten(), reduction="none").view(5, 112)
    assert got["loss"] == pytest.approx(direct, rel=1e-5)
    per_pos = ce.double().mean(0)
    edges = list(range(0, 112, bucket))
    assert got["position_bucket"] == bucket and len(got["position_loss"]) == len(edges)
    for s, v in zip(edges, got["position_loss"]):
        assert v == pytest.approx(float(per_pos[s:s + bucket].mean()), rel=1e-6)
    # per window: each window's own bucket means, which average back to the buckets
    per_win = got["window_position_loss"]
    assert len(per_win) == 5 and all(len(r) == len(edges) for r in per_win)
    for j in (0, 4):
        for s, v in zip(edges, per_win[j]):
            assert v == pytest.approx(float(ce[j, s:s + bucket].double().mean()), rel=1e-6)
    for i, v in enumerate(got["position_loss"]):
        assert sum(r[i] for r in per_win) / 5 == pytest.approx(v, rel=1e-9)
    # the buckets, weighted by their sizes, average back to the overall mean
    sizes = [min(bucket, 112 - s) for s in edges]
    assert sum(v * n for v, n in zip(got["position_loss"], sizes)) / 112 == pytest.approx(got["loss"], rel=1e-9)
    assert evaluate_text(model, task, 5, 0, 5, "cpu", Dist())["position_bucket"] == 112 // 64  # auto


def test_stdlib_resume_equals_uninterrupted(tmp_path, monkeypatch, capsys):
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    args = ["train", *SMALL, "--data", "stdlib", "--attention", "nsa", "--steps", "6", "--save-every", "3",
            "--eval-every", "2", "--eval-windows", "3", "--position-bucket", "16"]
    assert cli.main([*args, "--out", a]) == 0
    real = TextCorpus.batch

    def crash(self, step, *rest, **kw):
        if step == 4:
            raise KeyboardInterrupt
        return real(self, step, *rest, **kw)

    monkeypatch.setattr(TextCorpus, "batch", crash)
    with pytest.raises(KeyboardInterrupt):
        cli.main([*args, "--out", b])
    monkeypatch.setattr(TextCorpus, "batch", real)
    assert cli.main([*args, "--out", b, "--resume"]) == 0
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    la, lb = read_log(a), read_log(b)
    for key in ("step", "loss", "tokens", "val_loss", "val_position_loss"):
        assert [r.get(key) for r in la] == [r.get(key) for r in lb], key
    assert [r["step"] for r in la if "val_loss" in r] == [2, 4, 6]
    assert [r["tokens"] for r in lb] == [4 * 112 * s for s in range(1, 7)]
    secs = [r["train_seconds"] for r in lb]
    assert all(s1 > s0 for s0, s1 in zip(secs, secs[1:]))  # carried over the resume
    s = json.load(open(os.path.join(b, "summary.json")))
    assert s["tokens"] == 6 * 4 * 112 and s["val_loss"] == lb[-1]["val_loss"]
    assert s["tokens_per_s"] == pytest.approx(s["tokens"] / s["train_seconds"], rel=1e-2)
    corpus = json.load(open(os.path.join(b, "corpus.json")))
    assert corpus == s["data"] and corpus["name"] == "stdlib"
    # a run resumed on another corpus (another Python's standard library) is refused
    corpus["sha256"]["train"] = "0" * 64
    json.dump(corpus, open(os.path.join(b, "corpus.json"), "w"))
    assert "the data differs" in cli_error([*args, "--steps", "6", "--out", b, "--resume"], capsys)


def _study():
    spec = importlib.util.spec_from_file_location("lm_study", os.path.join(ROOT, "benchmarks", "lm_study.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_study_smoke_writes_json_and_png(tmp_path, monkeypatch):
    study = _study()
    out, res = str(tmp_path / "runs"), str(tmp_path / "res" / "lm")
    assert study.main(["--smoke", "--out", out, "--results", res]) == 0
    r = json.load(open(res + ".json"))
    assert list(r["models"]) == ["nsa", "full", "window"] and r["corpus"]["name"] == r["data"] == "stdlib"
    c = r["corpus"]
    assert study.title(r).startswith(f"Python {c['python']} standard library ({c['bytes']['train'] / 1e6:.1f} MB train")
    assert os.path.getsize(res + ".png") > 10_000
    for kind, m in r["models"].items():
        log = read_log(os.path.join(out, kind))
        evals = [x for x in log if "val_loss" in x]
        assert m["val"]["loss"] == [x["val_loss"] for x in evals] and m["val"]["step"] == [1, 2, 3, 4]
        assert m["val"]["tokens"] == [4 * 112 * s for s in (1, 2, 3, 4)] and m["tokens"] == 4 * 4 * 112
        b, pos = m["position_bucket"], m["position_loss"]
        beyond = [v for i, v in enumerate(pos) if i * b >= m["window"]]
        assert m["position_loss_beyond_window"] == pytest.approx(sum(beyond) / len(beyond))
        # per window beyond w, from the last evaluation's per-window buckets; they average back
        per = m["window_loss_beyond_window"]
        assert len(per) == evals[-1]["val_window_position_loss"].__len__() > 1
        assert sum(per) / len(per) == pytest.approx(m["position_loss_beyond_window"], rel=1e-9)
    # paired differences against NSA over the same windows
    for kind in ("full", "window"):
        p = r["beyond_window_vs_nsa"][kind]
        diff = [x - y for x, y in zip(r["models"][kind]["window_loss_beyond_window"],
                                      r["models"]["nsa"]["window_loss_beyond_window"])]
        assert p["windows"] == len(diff) and p["mean"] == pytest.approx(sum(diff) / len(diff))
        assert p["se"] == pytest.approx(float(np.std(diff, ddof=1)) / len(diff) ** 0.5)
    # the three models differ in attention alone
    cfgs = [dict(m["config"], attention=None) for m in r["models"].values()]
    assert cfgs[0] == cfgs[1] == cfgs[2]
    # redrawing from the logs gives the same numbers
    assert study.main(["--smoke", "--out", out, "--results", res + "2", "--plot-only"]) == 0
    r2 = json.load(open(res + "2.json"))
    assert r2["models"] == r["models"]
    # --resume keeps finished runs; resuming one that stopped early finishes it
    assert study.main(["--smoke", "--out", out, "--results", res + "3", "--resume"]) == 0
    assert json.load(open(res + "3.json"))["models"] == r["models"]
    out2 = str(tmp_path / "runs2")
    real = TextCorpus.batch

    def crash(self, step, *rest, **kw):
        if step == 3:
            raise KeyboardInterrupt
        return real(self, step, *rest, **kw)

    monkeypatch.setattr(TextCorpus, "batch", crash)
    with pytest.raises(KeyboardInterrupt):
        study.main(["--smoke", "--out", out2, "--kinds", "nsa", "--save-every", "2"])
    monkeypatch.setattr(TextCorpus, "batch", real)
    assert study.main(["--smoke", "--out", out2, "--kinds", "nsa", "--save-every", "2", "--resume",
                       "--results", res + "4"]) == 0
    assert [x["loss"] for x in read_log(os.path.join(out2, "nsa"))] == [x["loss"] for x in read_log(os.path.join(out, "nsa"))]


def test_study_data_option(tmp_path, monkeypatch):
    """--data picks the corpus: python for the GPU study, stdlib for --smoke unless given; the
    results name it (JSON and title), and --resume does not keep a finished run on another."""
    import argparse

    study = _study()
    a = argparse.Namespace(steps=None, eval_every=None, out="r", seed=0, smoke=False, data=None)
    argv = study.train_argv(a, [], "nsa")
    assert argv[argv.index("--data") + 1] == "python" and argv[argv.index("--steps") + 1] == "2400"
    for smoke, given, want in ((True, None, "stdlib"), (True, "python", "python"), (False, "stdlib", "stdlib")):
        argv = study.train_argv(argparse.Namespace(**dict(vars(a), smoke=smoke, data=given)), [], "nsa")
        assert argv[argv.index("--data") + 1] == want
    std, pkgs = _fake_roots(tmp_path, monkeypatch)
    out, res = str(tmp_path / "runs"), str(tmp_path / "lm")
    assert study.main(["--smoke", "--data", "python", "--kinds", "nsa", "--steps", "2", "--out", out,
                       "--results", res]) == 0
    r = json.load(open(res + ".json"))
    assert r["data"] == r["corpus"]["name"] == "python" and r["train_commands"][0].startswith("nsa train --data python")
    assert r["corpus"]["roots"] == {"stdlib": str(std), "site-packages": str(pkgs)}
    mb = r["corpus"]["bytes"]["train"] / 1e6
    assert study.title(r).startswith(f"Python {r['python']} standard library + installed packages ({mb:.1f} MB train")
    with pytest.raises(ValueError, match="trained on --data python, not stdlib"):
        study.main(["--smoke", "--data", "stdlib", "--kinds", "nsa", "--steps", "2", "--out", out, "--resume"])


def test_model_train_compiled_steps_match_eager(monkeypatch):
    """`model-train --compile`: the same optimizer steps through torch.compile give eager's
    losses (compiled here with aot_eager, dynamo and AOTAutograd: where a graph break or a bad
    trace shows; inductor's codegen is the GPU run's)."""
    from nsa.apps import bench_model

    real, modes = torch.compile, []
    monkeypatch.setattr(torch, "compile", lambda m, mode=None: modes.append(mode) or real(m, backend="aot_eager"))
    cfg = ModelConfig.preset("tiny", attention="nsa", n_layers=1, d_model=32, n_heads=2, n_kv_heads=1, head_dim=16,
                             backend="torch")
    tokens = torch.randint(0, 256, (2, 97), generator=torch.Generator().manual_seed(0))
    losses = []
    for compile in (None, "default", "reduce-overhead"):
        torch.manual_seed(0)
        losses.append(bench_model.time_train_steps(NSAModel(cfg), tokens, 2, warmup=1, compile=compile)["losses"])
    assert losses[1] == pytest.approx(losses[0], rel=1e-5) and len(set(losses[0])) == 3
    assert losses[2] == pytest.approx(losses[0], rel=1e-5)
    assert modes == [None, "reduce-overhead"]  # each compiled run's model once, in its mode


def test_model_train_timing_and_table():
    """The model-level training benchmark: tokens/s from the step time, the loss of the first
    step is the model's loss before any update, NSA's speedup is full's time over NSA's."""
    from nsa.apps import bench_model

    cfg = ModelConfig.preset("tiny", attention="full", n_layers=1, d_model=32, n_heads=2, n_kv_heads=1, head_dim=16)
    torch.manual_seed(0)
    model = NSAModel(cfg)
    tokens = torch.randint(0, 256, (2, 65))
    with torch.no_grad():
        before = float(model.loss(tokens[:, :-1], tokens[:, 1:]))
    w0 = model.embed.weight.detach().clone()
    r = bench_model.time_train_steps(model, tokens, 3, warmup=1)
    assert r["losses"][0] == pytest.approx(before, rel=1e-5) and len(r["losses"]) == 4
    assert r["tokens_per_s"] == pytest.approx(2 * 64 * 1e3 / r["step_ms"])
    assert not torch.equal(model.embed.weight, w0)
    rows = [dict(preset="small", attention="nsa", T=8192, batch=1, step_ms=50.0, fwd_bwd_ms=45.0, opt_ms=5.0,
                 tokens_per_s=163840.0, peak_gb=3.0),
            dict(preset="small", attention="full", T=8192, batch=1, step_ms=40.0, fwd_bwd_ms=36.0, opt_ms=4.0,
                 tokens_per_s=204800.0, peak_gb=2.5),
            dict(preset="base", attention="nsa", T=32768, batch=1, error="out of memory"),
            dict(preset="base", attention="full", T=32768, batch=1, step_ms=400.0, fwd_bwd_ms=390.0, opt_ms=10.0,
                 tokens_per_s=81920.0, peak_gb=70.0)]
    bench_model.finish(rows)
    assert rows[0]["speedup_vs_full"] == pytest.approx(40.0 / 50.0) and "speedup_vs_full" not in rows[2]
    t = bench_model.markdown_table(dict(results=rows))
    assert "| small | 8k | 1 | 50.0 (45.0 / 5.0) | 40.0 (36.0 / 4.0) | 163,840 / 204,800 | 0.80x | 3.0 / 2.5 |" in t
    assert "| base | 32k | 1 | OOM | 400.0 (390.0 / 10.0) |" in t
