"""nsa train / generate / needle: deterministic data, bit-exact resume, the CLI end to end."""

import json
import os

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from nsa.apps import cli
from nsa.apps.data import ByteText, PasskeyTask, decode
from nsa.apps.train import read_log

from test_cli import cli_error

# a very small model so that each CLI run takes a second or two
SMALL = ["--preset", "tiny", "--seq-len", "112", "--batch-size", "4", "--warmup", "2",
         "--set", "d_model=32", "--set", "n_layers=1", "--set", "n_heads=2", "--set", "n_kv_heads=1",
         "--set", "head_dim=16", "--set", "window=16", "--set", "cmp_block=8", "--set", "cmp_stride=4",
         "--set", "sel_block=8", "--set", "sel_count=3", "--set", "backend=torch", "--device", "cpu"]


def weights(folder):
    info = json.load(open(os.path.join(folder, "checkpoint.json")))
    return load_file(os.path.join(folder, info["model"]))


def test_passkey_task_is_deterministic_and_well_formed():
    task = PasskeyTask(200, seed=3, answer_weight=4.0)
    x1, y1, w1 = task.batch(5, 4)
    x2, y2, w2 = task.batch(5, 4)
    assert torch.equal(x1, x2) and torch.equal(w1, w2)
    assert not torch.equal(x1, task.batch(6, 4)[0])
    # the slices of two processes make up the global batch
    assert torch.equal(torch.cat([task.batch(5, 4, r, 2)[0] for r in range(2)]), x1)
    assert torch.equal(x1[:, 1:], y1[:, :-1]) and x1.shape == (4, 200)
    toks, a, key = task.example(300, 0.5, np.random.default_rng(0))
    text = decode(toks)
    assert len(toks) == 300 and text.endswith(f"The pass key is {key}.") and decode(toks[a:a + 5]) == key
    assert text.count(key) == 3  # needle, its repeat, and the answer
    assert (w1 == 4.0).sum() == 4 * 5
    with pytest.raises(ValueError, match="seq_len"):
        PasskeyTask(20)
    # variable lengths: one per step, the same on every process
    var = PasskeyTask(384, min_len=128)
    lengths = {var.length(i) for i in range(100)}
    assert min(lengths) >= 128 and max(lengths) <= 384 and len(lengths) > 5
    assert all(n % 16 == 0 for n in lengths)
    assert var.batch(7, 2)[0].shape == (2, var.length(7))
    assert var.batch(7, 2, 1, 2)[0].shape == (1, var.length(7))
    with pytest.raises(ValueError, match="min_len"):
        PasskeyTask(384, min_len=400)
    with pytest.raises(ValueError, match="depth"):
        task.example(300, 1.5, np.random.default_rng(0))


def _needle_distance(x):
    """Bytes from each row's needle to the end of the row."""
    return np.array([len(r) - bytes(r.astype(np.uint8)).find(b"The pass key is") for r in x.numpy()])


@pytest.mark.parametrize("near", [pytest.param(0.25, id="quarter"), pytest.param(1.0, id="all")])
def test_passkey_near_needles(near, capsys):
    base, task = PasskeyTask(4096, seed=2), PasskeyTask(4096, seed=2, near=near, near_span=300)
    n = 64
    x0, x = base.batch(1, n)[0], task.batch(1, n)[0]
    d0, d = _needle_distance(x0), _needle_distance(x)
    # a needle moved near the question ends within near_span (+ the question and the needle's
    # snap back to a sentence start) of the end; the other rows are the same as without the option
    close = d <= 300 + 105 + 40
    moved = ~(x == x0).all(dim=1).numpy()
    assert (moved <= close).all() and abs(close.mean() - near) < 0.2
    assert (d0 > 450).mean() > 0.85  # uniform depths put few needles there
    assert torch.equal(PasskeyTask(4096, seed=2, near=0.0).batch(1, n)[0], x0)
    with pytest.raises(ValueError, match="near"):
        PasskeyTask(4096, near=1.5)
    assert "--near-needles" in cli_error(["train", "--near-needles", "-0.1", "--steps", "1"], capsys)


def test_byte_text(tmp_path):
    p = tmp_path / "t.txt"
    p.write_bytes(bytes(range(256)) * 40)
    data = ByteText(str(p), 32)
    x, y, w = data.batch(0, 3)
    assert x.shape == (3, 32) and torch.equal(x[:, 1:], y[:, :-1]) and w.sum() == 96
    assert torch.equal((x[:, 1:] - x[:, :-1]) % 256, torch.ones(3, 31, dtype=torch.long))
    with pytest.raises(ValueError, match="too short"):
        ByteText(str(p), 5000)


def test_resume_is_bit_exact(tmp_path, monkeypatch, capsys):
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    args = ["train", *SMALL, "--attention", "nsa", "--steps", "6", "--save-every", "3", "--eval-every", "0",
            "--no-needle"]
    assert cli.main([*args, "--out", a]) == 0
    # run b crashes during step 5, after the checkpoint of step 3
    real = PasskeyTask.batch

    def crash(self, step, *rest, **kw):
        if step == 4:
            raise KeyboardInterrupt
        return real(self, step, *rest, **kw)

    monkeypatch.setattr(PasskeyTask, "batch", crash)
    with pytest.raises(KeyboardInterrupt):
        cli.main([*args, "--out", b])
    monkeypatch.setattr(PasskeyTask, "batch", real)
    assert json.load(open(os.path.join(b, "checkpoint.json")))["step"] == 3
    assert "--resume" in cli_error([*args, "--out", b], capsys)  # refuses to overwrite a run
    assert "--lr" in cli_error([*args, "--out", b, "--resume", "--lr", "0.1"], capsys)
    assert cli.main([*args, "--out", b, "--resume"]) == 0
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    assert [r["loss"] for r in read_log(a)] == [r["loss"] for r in read_log(b)]
    assert [r["step"] for r in read_log(b)] == [1, 2, 3, 4, 5, 6]
    # only the latest checkpoint's files remain
    assert sorted(f for f in os.listdir(b) if f.startswith(("model-", "state-"))) == [
        "model-0000006.safetensors", "state-0000006.pt"]


def test_train_two_kinds_then_needle_and_generate(tmp_path, capsys):
    out = str(tmp_path / "run")
    assert cli.main(["train", *SMALL, "--steps", "3", "--eval-every", "2", "--out", out,
                     "--contexts", "112,160", "--depths", "0,1", "--samples", "2"]) == 0
    printed = capsys.readouterr().out
    assert "beyond the window" in printed and "nsa" in printed and "window" in printed
    grid = json.load(open(os.path.join(out, "needle.json")))
    assert grid["contexts"] == [112, 160] and set(grid["models"]) == {"nsa", "window"}
    for m in grid["models"].values():
        assert np.array(m["accuracy"]).shape == (2, 2)
        assert 0 <= m["beyond_window"] <= 1
    assert os.path.getsize(os.path.join(out, "needle.png")) > 1000
    losses = [r["loss"] for r in read_log(os.path.join(out, "nsa"))]
    assert len(losses) == 3 and all(np.isfinite(losses))

    assert cli.main(["needle", os.path.join(out, "nsa"), os.path.join(out, "window"), "--contexts", "128",
                     "--depths", "0.5", "--samples", "2", "--out", str(tmp_path / "n")]) == 0
    assert json.load(open(str(tmp_path / "n.json")))["contexts"] == [128]

    capsys.readouterr()
    assert cli.main(["generate", os.path.join(out, "nsa"), "--prompt", "The pass key is",
                     "--max-new-tokens", "5"]) == 0
    assert "The pass key is" in capsys.readouterr().out
    assert cli.main(["generate", os.path.join(out, "window"), "--prompt", "ab", "--max-new-tokens", "4",
                     "--temperature", "0.8", "--top-k", "10", "--top-p", "0.9"]) == 0
    # the CPU has no CUDA graphs
    assert "cuda_graph" in cli_error(["generate", os.path.join(out, "nsa"), "--prompt", "ab", "--cuda-graph",
                                      "--device", "cpu"], capsys)
    assert "compile=True needs cuda_graph=True" in cli_error(["generate", os.path.join(out, "nsa"), "--prompt",
                                                              "ab", "--compile", "--device", "cpu"], capsys)


def test_train_compiled_matches_eager(tmp_path, monkeypatch, capsys):
    """--compile [MODE] trains the same steps as eager (torch.compile with aot_eager here:
    dynamo and AOTAutograd over the model, the passkey batches' varying lengths included); the
    mode reaches torch.compile, and a bad one is a one-line CLI error."""
    real, modes = torch.compile, []
    monkeypatch.setattr(torch, "compile", lambda m, mode=None: modes.append(mode) or real(m, backend="aot_eager"))
    args = ["train", *SMALL, "--attention", "nsa", "--steps", "3", "--eval-every", "0", "--no-needle"]
    a, b, c = str(tmp_path / "a"), str(tmp_path / "b"), str(tmp_path / "c")
    assert cli.main([*args, "--out", a]) == 0
    assert cli.main([*args, "--out", b, "--compile"]) == 0
    assert cli.main([*args, "--out", c, "--compile", "reduce-overhead"]) == 0
    want = [r["loss"] for r in read_log(a)]
    assert len(set(want)) == 3
    for out in (b, c):
        assert [r["loss"] for r in read_log(out)] == pytest.approx(want, rel=1e-5)
    assert modes == [None, "reduce-overhead"]  # each compiled run's model once, in its mode
    assert "invalid choice: 'fast'" in cli_error([*args, "--out", a, "--compile", "fast"], capsys)


def test_train_on_a_text_file(tmp_path, capsys):
    p = tmp_path / "corpus.txt"
    p.write_text("the quick brown fox jumps over the lazy dog. " * 200)
    out = str(tmp_path / "txt")
    assert cli.main(["train", *SMALL, "--attention", "full", "--data", str(p), "--steps", "2",
                     "--eval-every", "1", "--out", out]) == 0
    assert "val loss" in capsys.readouterr().out
    assert not os.path.exists(os.path.join(out, "needle.json"))  # no needles in a text file


def test_bad_arguments(capsys):
    assert "attention" in cli_error(["train", "--attention", "dense"], capsys)
    assert "--set" in cli_error(["train", "--set", "nofield=3", "--steps", "1"], capsys)
    assert "window expects a number" in cli_error(["train", "--set", "window=wide", "--steps", "1"], capsys)
    assert "--data" in cli_error(["train", "--data", "/nonexistent/file.txt", "--steps", "1"], capsys)


def test_set_takes_flat_and_dotted_fields(capsys):
    """--set names ModelConfig fields, and the nested NSAConfig's flat or dotted."""
    from nsa.apps.train import parse_overrides
    from nsa.model import ModelConfig

    flat = parse_overrides(["window=64", "sel_count=5", "scale=none", "shared_kv=true", "n_layers=3"])
    dotted = parse_overrides(["attn.window=64", "attn.sel_count=5", "attn.scale=none", "attn.shared_kv=1",
                              "n_layers=3"])
    assert flat == {"window": 64, "sel_count": 5, "scale": None, "shared_kv": True, "n_layers": 3}
    a, b = ModelConfig.preset("tiny", **flat), ModelConfig.preset("tiny", **dotted)
    assert a == b and (a.attn.window, a.attn.sel_count, a.attn.shared_kv, a.n_layers) == (64, 5, True, 3)
    assert a.attn.scale is None and a.attn.cmp_block == ModelConfig.preset("tiny").attn.cmp_block
    assert parse_overrides(["attn.scale=0.5"]) == {"attn.scale": 0.5}
    with pytest.raises(ValueError, match="attn.window=64"):
        parse_overrides(["attn=3"])
    with pytest.raises(ValueError, match="no field 'attn.windw'"):
        parse_overrides(["attn.windw=3"])
    # a value the config rejects is a one-line error naming the field
    assert "head_dim must be even" in cli_error(["train", *SMALL, "--set", "head_dim=7", "--steps", "1"], capsys)


def test_init_starts_from_saved_weights_at_another_length(tmp_path, capsys):
    """--init copies a run's weights (per attention kind) into a run with other lengths and a
    fresh schedule; a different architecture, or --init with --resume, is refused."""
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    base = SMALL + ["--attention", "nsa,window", "--eval-every", "0", "--no-needle"]
    assert cli.main(["train", *base, "--steps", "2", "--out", a]) == 0
    # one step at lr 0 keeps the weights: the new run must hold exactly the saved ones
    assert cli.main(["train", *[x if x != "112" else "160" for x in base], "--steps", "1", "--lr", "1e-30",
                     "--warmup", "0", "--init", a, "--out", b]) == 0
    for kind in ("nsa", "window"):
        old, new = weights(os.path.join(a, kind)), weights(os.path.join(b, kind))
        assert old.keys() == new.keys()
        for k in old:
            assert torch.allclose(old[k], new[k], rtol=0, atol=1e-20), (kind, k)
    assert "head_dim" in cli_error(["train", *base, "--set", "head_dim=8", "--steps", "1", "--init", a,
                                    "--out", str(tmp_path / "c")], capsys)
    assert "--init and --resume" in cli_error(["train", *base, "--steps", "3", "--init", a, "--resume",
                                               "--out", a], capsys)


# written before ModelConfig nested its NSAConfig: its metadata holds the flat config of then
GPU_MODEL = os.path.join(os.path.dirname(__file__), "data", "needle_gpu_h8kv1_s3_model.safetensors")


def test_gpu_trained_model_retrieves_on_the_cpu_reference():
    """The README's 100% model was trained on an H200 with the Triton kernels in bf16; the PyTorch
    reference in fp32 must read the same semantics into its weights: teacher-forced and through
    the KV cache (greedy decode), every depth of the needle grid at 2k."""
    from nsa.apps.checkpoint import load_checkpoint
    from nsa.apps.needle import NEEDLE_SEED, needle_accuracy, needle_example

    model = load_checkpoint(GPU_MODEL, "cpu", backend="torch")
    a = model.config.attn  # the flat config of then, nested (its Dv was Dk)
    assert (a.n_heads, a.n_kv_heads, a.head_dim, a.v_head_dim, a.sel_count, a.backend) == (8, 1, 32, 32, 8, "torch")
    task = PasskeyTask(2048)
    depths = [0.0, 0.25, 0.5, 0.75, 1.0]
    assert needle_accuracy(model, task, 2048, depths, samples=2, seed=NEEDLE_SEED, device="cpu") == [1.0] * 5
    tokens, a, key = needle_example(task, 2048, 2, 0.5, 0)
    prompt = torch.from_numpy(tokens[:a].astype(np.int64))[None]
    assert decode(model.generate(prompt, task.digits)[0, a:].tolist()) == key


def test_train_until_needle_stops_at_the_check(tmp_path, capsys):
    """--until-needle ACC: the run stops at the first periodic needle check that reaches ACC
    (0 here: the first one), with that step's checkpoint and log line (holding the accuracy) its
    last; without a reachable ACC it trains every step. Text data or no checks: a CLI error."""
    args = ["train", *SMALL, "--attention", "nsa", "--steps", "6", "--eval-every", "2", "--no-needle"]
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    assert cli.main([*args, "--out", a, "--until-needle", "0"]) == 0
    log = read_log(a)
    assert [r["step"] for r in log] == [1, 2] and 0 <= log[-1]["needle_accuracy"] <= 1
    with open(os.path.join(a, "checkpoint.json")) as f:
        assert json.load(f)["step"] == 2
    with open(os.path.join(a, "summary.json")) as f:
        s = json.load(f)
    assert (s["steps"], s["steps_done"]) == (6, 2)
    assert "stopped" in capsys.readouterr().out
    assert cli.main([*args, "--out", b, "--until-needle", "1"]) == 0
    assert [r["step"] for r in read_log(b)][-1] == 6  # a tiny model never retrieves every needle in 6 steps
    err = cli_error(["train", *SMALL, "--data", "stdlib", "--until-needle", "0.9", "--out", str(tmp_path / "c")], capsys)
    assert "--until-needle needs the passkey task" in err
