"""nsa in Hugging Face transformers (nsa.hf): config and Auto classes, save/load, generate through
nsa's cache, the training loss, Llama conversion (against the Llama's own logits), the CLI paths
and the errors. Tiny sizes, CPU, nothing downloaded (the Llamas are random, built here)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

transformers = pytest.importorskip("transformers")

import nsa.hf  # noqa: E402  (registers model_type "nsa")
from nsa.apps import cli  # noqa: E402
from nsa.apps.data import PasskeyTask, decode, encode  # noqa: E402
from nsa.hf import NSAForCausalLM, NSALMCache, NSALMConfig, convert_llama  # noqa: E402
from nsa.hf.convert import DEFAULT_GATE_INIT  # noqa: E402
from nsa.model import PRESETS, ModelConfig, NSAModel, load_model  # noqa: E402
from transformers import AutoConfig, AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAINED = os.path.join(ROOT, "tests", "data", "needle_gpu_h8kv1_s3_model.safetensors")
SRC = os.path.join(ROOT, "src")


def tiny(**kw) -> NSAForCausalLM:
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(AutoConfig.for_model("nsa", preset="tiny", backend="torch", **kw)).eval()


def tiny_llama(**kw) -> LlamaForCausalLM:
    args = dict(vocab_size=256, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=512,
                rope_parameters={"rope_type": "default", "rope_theta": 5000.0}, tie_word_embeddings=False)
    args.update(kw)
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(**args)).eval()


def passkey_prompts(n: int, length: int = 128):
    task = PasskeyTask(length)
    rows = [task.example(length, d, np.random.default_rng(i)) for i, d in enumerate(np.linspace(0.1, 0.6, n))]
    a = rows[0][1]
    return torch.tensor(np.stack([r[0][:a] for r in rows]).astype(np.int64)), [r[2] for r in rows]


# --------------------------------------------------------------------------- import boundary
def run_py(code: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=SRC + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)


def test_core_does_not_import_transformers():
    r = run_py("import sys, nsa, nsa.model, nsa.apps.cli, nsa.apps.checkpoint; "
               "assert 'transformers' not in sys.modules, 'transformers imported'")
    assert r.returncode == 0, r.stderr


def test_import_without_transformers_names_the_extra():
    r = run_py("import sys\n"
               "class Block:\n"
               "    def find_spec(self, name, path=None, target=None):\n"
               "        if name == 'transformers' or name.startswith('transformers.'):\n"
               "            raise ImportError('no transformers here')\n"
               "sys.meta_path.insert(0, Block())\n"
               "try:\n"
               "    import nsa.hf\n"
               "except ImportError as e:\n"
               "    print(e)\n")
    assert r.returncode == 0, r.stderr
    assert "pip install 'nsa[hf]'" in r.stdout


# --------------------------------------------------------------------------- config
@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_for_model_builds_presets(preset):
    assert AutoConfig.for_model("nsa", preset=preset).to_model_config() == ModelConfig.preset(preset)
    c = AutoConfig.for_model("nsa", preset=preset, window=64, n_layers=3, **{"attn.sel_count": 4})
    assert isinstance(c, NSALMConfig)
    assert c.to_model_config() == ModelConfig.preset(preset, window=64, n_layers=3, sel_count=4)
    assert (c.num_hidden_layers, c.hidden_size, c.num_attention_heads) == (3, PRESETS[preset].attn.d_model,
                                                                         PRESETS[preset].attn.n_heads)


def test_config_errors():
    with pytest.raises(ValueError, match="unknown preset 'huge'"):
        AutoConfig.for_model("nsa", preset="huge")
    with pytest.raises(ValueError, match="sel_count must be >= 3"):
        AutoConfig.for_model("nsa", preset="tiny", sel_count=2)
    with pytest.raises(ValueError, match="model_type is 'llama', not 'nsa'"):
        NSALMConfig.from_dict(LlamaConfig().to_dict())


# --------------------------------------------------------------------------- save / load
@pytest.mark.parametrize("tie", [True, False])
def test_save_load_round_trip(tmp_path, tie):
    m = tiny(tie_embeddings=tie)
    x = torch.randint(0, 256, (2, 70))
    m.save_pretrained(tmp_path)
    assert os.path.exists(tmp_path / "model.safetensors")
    with open(tmp_path / "config.json") as f:
        assert json.load(f)["model_type"] == "nsa"
    m2 = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert isinstance(m2, NSAForCausalLM) and m2.config.to_model_config() == m.config.to_model_config()
    assert (m2.model.lm_head.weight is m2.model.embed.weight) == tie
    with torch.no_grad():
        assert torch.equal(m2(x).logits, m(x).logits)
        assert torch.equal(m(x).logits, m.model(x))  # the wrapper's logits are nsa's


def test_folder_errors(tmp_path):
    m = tiny()
    m.save_pretrained(tmp_path / "ok")
    os.makedirs(tmp_path / "noweights")
    m.config.save_pretrained(tmp_path / "noweights")
    with pytest.raises(ValueError, match="has no weights"):
        nsa.hf.load_folder(str(tmp_path / "noweights"))
    with pytest.raises(OSError, match="model.safetensors"):
        NSAForCausalLM.from_pretrained(tmp_path / "noweights")
    tiny_llama().save_pretrained(tmp_path / "llama")
    with pytest.raises(ValueError, match="model_type is 'llama'"):
        NSAForCausalLM.from_pretrained(tmp_path / "llama")
    with pytest.raises(ValueError, match="holds a 'llama' model .* nsa convert"):
        nsa.hf.load_folder(str(tmp_path / "llama"))
    # weights of another config: an error naming the tensors, not a half-initialised model
    bigger = NSALMConfig.from_pretrained(tmp_path / "ok")
    bigger.n_layers = 3
    with pytest.raises(ValueError, match="missing keys .*model.blocks.2"):
        NSAForCausalLM.from_pretrained(tmp_path / "ok", config=bigger)


# --------------------------------------------------------------------------- generate
def test_generate_matches_nsa_generate_and_uncached_forwards():
    nsa_model = load_model(TRAINED, backend="torch").eval()
    m = NSAForCausalLM.from_nsa(nsa_model)
    prompt, keys = passkey_prompts(2)
    n = 7
    ours = m.generate(prompt, max_new_tokens=n, do_sample=False)
    assert torch.equal(ours, nsa_model.generate(prompt, n))
    assert torch.equal(ours, m.generate(prompt, max_new_tokens=n, do_sample=False, use_cache=False))
    assert [decode(r[prompt.shape[1]:prompt.shape[1] + 5].tolist()) for r in ours] == keys
    # repeated full forwards, by hand
    x = prompt
    for _ in range(n):
        with torch.no_grad():
            x = torch.cat([x, nsa_model(x)[:, -1].argmax(-1, keepdim=True)], 1)
    assert torch.equal(ours, x)
    # a cache of the caller's, allocated too short: it grows and gives the same tokens
    cache = NSALMCache(m.config, max_seq_len=8)
    assert torch.equal(m.generate(prompt, max_new_tokens=n, do_sample=False, cache=cache), ours)
    assert cache.get_seq_length() == prompt.shape[1] + n - 1 and cache.capacity >= cache.get_seq_length()
    with pytest.raises(TypeError, match="NSALMCache"):
        m.generate(prompt, max_new_tokens=2, cache=transformers.DynamicCache(config=m.config))


def test_generate_sampling_and_beams():
    m = NSAForCausalLM.from_nsa(load_model(TRAINED, backend="torch").eval())
    prompt, _ = passkey_prompts(2)
    greedy = m.generate(prompt, max_new_tokens=6, do_sample=False)
    assert torch.equal(m.generate(prompt, max_new_tokens=6, do_sample=True, top_k=1), greedy)
    assert torch.equal(m.generate(prompt, max_new_tokens=6, do_sample=True, top_p=1e-6, temperature=0.7), greedy)
    torch.manual_seed(1)
    a = m.generate(prompt, max_new_tokens=8, do_sample=True, temperature=1.5, top_k=50, top_p=0.95)
    torch.manual_seed(1)
    b = m.generate(prompt, max_new_tokens=8, do_sample=True, temperature=1.5, top_k=50, top_p=0.95)
    assert torch.equal(a, b) and torch.equal(a[:, :prompt.shape[1]], prompt)
    many = m.generate(prompt, max_new_tokens=4, do_sample=True, num_return_sequences=3)
    assert many.shape == (6, prompt.shape[1] + 4) and torch.equal(many[::3, :prompt.shape[1]], prompt)
    # beam search reorders the cache: the same beams as without one
    beams = m.generate(prompt, max_new_tokens=4, num_beams=2, do_sample=False)
    assert torch.equal(beams, m.generate(prompt, max_new_tokens=4, num_beams=2, do_sample=False, use_cache=False))


def test_chunked_forward_with_cache_equals_one_pass():
    m = tiny()
    x = torch.randint(0, 256, (2, 90))
    cache = NSALMCache(m.config)
    with torch.no_grad():
        full = m(x, use_cache=False).logits
        parts = [m(x[:, :50], cache=cache).logits, m(x[:, 50:51], cache=cache).logits,
                 m(x[:, 51:], cache=cache, attention_mask=torch.ones(2, 90)).logits]
        last = m(x, use_cache=False, logits_to_keep=1).logits
    torch.testing.assert_close(torch.cat(parts, 1), full, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(last, full[:, -1:], atol=1e-6, rtol=1e-6)  # one row of the same matmul


# --------------------------------------------------------------------------- training
def test_loss_is_the_shifted_cross_entropy_and_trains():
    m = tiny().train()
    task = PasskeyTask(128)
    x, y, _ = task.batch(0, 2)
    tokens = torch.cat([x, y[:, -1:]], 1)  # [B, 129]: labels = input_ids (shifted inside)
    out = m(input_ids=tokens, labels=tokens)
    assert out.loss is not None and getattr(out, "cache", None) is None
    want = F.cross_entropy(out.logits[:, :-1].flatten(0, 1).float(), tokens[:, 1:].flatten())
    torch.testing.assert_close(out.loss, want)
    torch.testing.assert_close(out.loss, m.model.loss(x, y), rtol=1e-5, atol=1e-6)  # nsa's own loss
    # right padding with labels -100 there: the loss of the unpadded tokens only
    labels = tokens.clone()
    labels[:, 100:] = -100
    mask = torch.ones_like(tokens)
    mask[:, 100:] = 0
    padded = m(input_ids=tokens, attention_mask=mask, labels=labels).loss
    torch.testing.assert_close(padded, m(input_ids=tokens[:, :100], labels=tokens[:, :100]).loss)
    opt = torch.optim.AdamW(m.parameters(), lr=1e-2)  # a plain loop fits one batch
    x, y, _ = task.batch(1, 2)
    tokens = torch.cat([x, y[:, -1:]], 1)
    losses = []
    for _ in range(6):
        loss = m(input_ids=tokens, labels=tokens).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0]


def test_input_errors():
    m = tiny()
    x = torch.randint(0, 256, (2, 20))
    left = torch.ones_like(x)
    left[0, :3] = 0
    with pytest.raises(ValueError, match="left padding"):
        m(x, attention_mask=left)
    with pytest.raises(ValueError, match="inputs_embeds"):
        m(inputs_embeds=torch.randn(2, 20, 128))
    with pytest.raises(ValueError, match="position_ids must be 0..19"):
        m(x, position_ids=torch.arange(1, 21)[None])
    with pytest.raises(TypeError, match="NSALMCache"):
        m(x, cache=transformers.DynamicCache(config=m.config))


# --------------------------------------------------------------------------- conversion
def llama_logits(llama, x):
    with torch.no_grad():
        return llama(x).logits


@pytest.mark.parametrize("variant", ["separate", "shared_tied_bias"])
def test_convert_llama_window_only_equals_the_llama(variant):
    kw = dict(tie_word_embeddings=True, attention_bias=True) if variant != "separate" else {}
    llama = tiny_llama(**kw)
    if variant != "separate":  # Llama's init zeroes the biases: make them count
        with torch.no_grad():
            for layer in llama.model.layers:
                for p in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                    p.bias.normal_(0, 0.5)
    x = torch.randint(0, 256, (2, 80))
    ref = llama_logits(llama, x)
    over = dict(window=80, backend="torch", **({"shared_kv": True} if variant != "separate" else {}))
    m = convert_llama(llama, gate_init=(0, 0, 1), **over).eval()
    with torch.no_grad():
        got = m(x).logits
    assert (got - ref).abs().max() < 1e-4
    assert ref.abs().max() > 0.1  # not a trivial comparison
    if variant == "separate":  # the dense baseline from the same weights is the Llama too (it has no biases)
        dense = convert_llama(llama, attention="full").eval()
        assert (llama_logits(dense, x) - ref).abs().max() < 1e-4
    else:
        with pytest.raises(ValueError, match="bias False"):
            convert_llama(llama, attention="full")


def test_convert_llama_initial_values():
    llama = tiny_llama()
    m = convert_llama(llama, backend="torch").eval()
    a = m.model.blocks[0].attn
    want = torch.tensor([math.log(p / (1 - p)) for p in DEFAULT_GATE_INIT]).repeat(4)
    assert torch.equal(a.gate.weight, torch.zeros_like(a.gate.weight))
    torch.testing.assert_close(a.gate.bias, want)
    blocks = torch.randn(2, 3, a.config.cmp_block, 2, 16)
    torch.testing.assert_close(a.phi_k(blocks), blocks.mean(2))  # phi starts as mean pooling
    s = llama.model.layers[0].self_attn
    k = torch.cat([s.k_proj.weight, s.v_proj.weight])
    assert torch.equal(a.kv_proj.weight, torch.cat([k, k, k]))  # every branch from the dense k/v
    # the default gates (0.1, 0.45, 0.45) start close to the Llama on a sequence inside the window
    x = torch.randint(0, 256, (1, 64))
    ref = llama_logits(llama, x)
    diff = (llama_logits(m, x) - ref).abs().max() / ref.abs().max()
    assert diff < 0.25


def test_convert_llama_errors():
    with pytest.raises(ValueError, match="not a multiple of its num_key_value_heads"):
        convert_llama(tiny_llama(num_attention_heads=4, num_key_value_heads=3))
    with pytest.raises(ValueError, match="RoPE is 'linear'"):
        convert_llama(tiny_llama(rope_parameters={"rope_type": "linear", "rope_theta": 1e4, "factor": 2.0}))
    with pytest.raises(ValueError, match="d_model is the Llama's"):
        convert_llama(tiny_llama(), d_model=128)
    with pytest.raises(ValueError, match="sel_count must be >= 3"):
        convert_llama(tiny_llama(), sel_count=1)
    mistral = transformers.MistralForCausalLM(transformers.MistralConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1))
    with pytest.raises(ValueError, match="model_type 'mistral'"):
        convert_llama(mistral)


# --------------------------------------------------------------------------- command line
def cli_error(argv, capsys) -> str:
    capsys.readouterr()
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("nsa: error: ") and err.count("\n") == 1, err
    return err


def test_cli_convert_generate_needle(tmp_path, capsys):
    llama = tiny_llama()
    llama.save_pretrained(tmp_path / "llama")
    out = tmp_path / "nsa"
    assert cli.main(["convert", str(tmp_path / "llama"), str(out), "--set", "window=64", "--set",
                     "backend=torch", "--gate-init", "0,0,1"]) == 0
    assert "gates (cmp, slc, win) = (0.0, 0.0, 1.0)" in capsys.readouterr().out
    m = AutoModelForCausalLM.from_pretrained(out).eval()
    x = torch.randint(0, 256, (1, 60))
    assert (llama_logits(m, x) - llama_logits(llama, x)).abs().max() < 1e-4
    # nsa generate: the transformers folder gives what its nsa model gives
    assert cli.main(["generate", str(out), "--prompt", "The pass key is", "--max-new-tokens", "5",
                     "--device", "cpu"]) == 0
    text = capsys.readouterr().out
    want = m.model.generate(encode("The pass key is")[None], 5)[0, 15:].tolist()
    assert text.endswith(decode(want) + "\n")
    assert cli.main(["needle", str(out), "--contexts", "128", "--depths", "0.5", "--samples", "2",
                     "--out", str(tmp_path / "grid"), "--device", "cpu"]) == 0
    with open(tmp_path / "grid.json") as f:
        assert json.load(f)["models"]["nsa"]["accuracy"] == [[0.0]]  # a random model finds no key


def test_cli_convert_errors(tmp_path, capsys):
    assert "does not exist" in cli_error(["convert", str(tmp_path / "none"), str(tmp_path / "o")], capsys)
    os.makedirs(tmp_path / "empty")
    assert "has no config.json" in cli_error(["convert", str(tmp_path / "empty"), str(tmp_path / "o")], capsys)
    tiny_llama().config.save_pretrained(tmp_path / "cfgonly")
    assert "has no weights" in cli_error(["convert", str(tmp_path / "cfgonly"), str(tmp_path / "o")], capsys)
    tiny().save_pretrained(tmp_path / "nsa")
    assert "holds a 'nsa' model" in cli_error(["convert", str(tmp_path / "nsa"), str(tmp_path / "o")], capsys)
    tiny_llama().save_pretrained(tmp_path / "llama")
    assert "d_model is the Llama's" in cli_error(["convert", str(tmp_path / "llama"), str(tmp_path / "o"),
                                                  "--set", "d_model=32"], capsys)
    assert "--gate-init" in cli_error(["convert", str(tmp_path / "llama"), str(tmp_path / "o"),
                                       "--gate-init", "0,1"], capsys)
    assert "has no weights" in cli_error(["generate", str(tmp_path / "cfgonly")], capsys)
    assert "holds a 'llama' model" in cli_error(["generate", str(tmp_path / "llama")], capsys)


def test_trainer_reports_the_models_loss(tmp_path):
    pytest.importorskip("accelerate")  # Trainer's dependency (not in the test extra)
    from transformers import Trainer, TrainingArguments

    m = tiny()
    x, y, _ = PasskeyTask(128).batch(0, 2)
    tokens = torch.cat([x, y[:, -1:]], 1)
    data = [{"input_ids": t, "labels": t} for t in tokens]
    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=2, learning_rate=0.0,
                             max_steps=1, save_strategy="no", report_to=[], use_cpu=True)
    result = Trainer(model=m, args=args, train_dataset=data).train()
    with torch.no_grad():
        want = m.train()(input_ids=tokens, labels=tokens).loss.item()
    assert result.training_loss == pytest.approx(want, rel=1e-5)


def test_cli_generate_with_the_folders_tokenizer(tmp_path, capsys):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["[UNK]", "the", "pass", "key", "is"] + [f"w{i}" for i in range(59)]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    llama = tiny_llama(vocab_size=64)
    llama.save_pretrained(tmp_path / "llama")
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]").save_pretrained(tmp_path / "llama")
    assert cli.main(["convert", str(tmp_path / "llama"), str(tmp_path / "nsa"), "--set", "backend=torch"]) == 0
    capsys.readouterr()
    assert cli.main(["generate", str(tmp_path / "nsa"), "--prompt", "the pass key is", "--max-new-tokens", "4",
                     "--device", "cpu"]) == 0
    text = capsys.readouterr().out
    m = AutoModelForCausalLM.from_pretrained(tmp_path / "nsa").eval()
    new = m.generate(torch.tensor([[1, 2, 3, 4]]), max_new_tokens=4, do_sample=False)[0, 4:].tolist()
    assert "--- prompt (4 tokens)" in text and text.endswith(" ".join(words[i] for i in new) + "\n")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_generate_on_the_gpu_matches_nsa_generate():
    nsa_model = load_model(TRAINED, device="cuda").eval()  # backend auto: the Triton kernels
    m = NSAForCausalLM.from_nsa(nsa_model)
    prompt, keys = passkey_prompts(4, 512)
    prompt = prompt.cuda()
    ours = m.generate(prompt, max_new_tokens=8, do_sample=False)
    assert torch.equal(ours, nsa_model.generate(prompt, 8))
    assert [decode(r[prompt.shape[1]:prompt.shape[1] + 5].tolist()) for r in ours.cpu()] == keys
    assert torch.equal(m.generate(prompt, max_new_tokens=8, do_sample=True, top_k=1), ours)
