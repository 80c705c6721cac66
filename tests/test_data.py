"""The ``python`` corpus (the standard library and the installed packages): its split rule on
prefixed names, its streams on small fake folders (what it leaves out, byte for byte), that it
holds the whole standard library corpus, and ``nsa train --data python`` with its resume check."""

import hashlib
import json
import os
import sysconfig

import pytest

from nsa.apps import cli
from nsa.apps.data import (SEPARATOR, PythonCorpus, StdlibCorpus, describe_corpus, is_validation_file,
                           package_files, package_roots, stdlib_files)
from nsa.apps.train import read_log

from test_cli import cli_error
from test_lm_study import _fake_packages, _fake_roots, _fake_stdlib
from test_train import SMALL


def test_split_on_prefixed_names_is_fixed():
    # the rule is the SHA-256 of the name: pinned numbers, the same on every machine
    names = [f"site-packages/pkg{i}/mod.py" for i in range(2000)]
    val = [i for i, n in enumerate(names) if is_validation_file(n)]
    want = [i for i, n in enumerate(names)
            if int.from_bytes(hashlib.sha256(n.encode()).digest()[:8], "big") < 0.05 * 2**64]
    assert val == want and len(val) == 123 and val[:5] == [39, 45, 64, 87, 103]
    # the prefix is part of the name: a stdlib file's split in the python corpus is its own draw
    assert is_validation_file("stdlib/asyncio/transports.py") and not is_validation_file("asyncio/transports.py")
    assert is_validation_file("copyreg.py") and not is_validation_file("stdlib/copyreg.py")
    assert not is_validation_file("stdlib/os.py") and not is_validation_file("os.py")


def _stream_files(c) -> list[bytes]:
    """The files of both streams, split at the separators (no kept file holds one)."""
    out = []
    for s in (c.train, c.val):
        parts = s.tobytes().split(bytes([SEPARATOR]))
        assert parts[-1] == b""  # every file, the last too, is followed by a separator
        out += parts[:-1]
    return out


def test_python_corpus_on_fake_folders(tmp_path):
    std, pkgs, pkgs2 = tmp_path / "lib", tmp_path / "site", tmp_path / "site2"
    for p in (std, pkgs, pkgs2):
        p.mkdir()
    _fake_stdlib(std)
    kept = _fake_packages(pkgs)
    (pkgs2 / "extra.py").write_bytes(b"import os\n" * 20)
    # the folder given twice counts once
    c = PythonCorpus(16, root=str(std), packages=[str(pkgs), str(pkgs2), str(pkgs)], val_fraction=0.3)
    names = {f"stdlib/{f}": (std / f).read_bytes() for f in stdlib_files(str(std))}
    names.update({f"site-packages/{f}": b for f, b in kept.items()})
    names["site-packages-2/extra.py"] = (pkgs2 / "extra.py").read_bytes()
    assert len(package_files(str(pkgs))) == len(kept) + 3  # nul.py, fifo.py, dangling.py: listed, not kept
    sep = bytes([SEPARATOR])
    val = sorted(n for n in names if is_validation_file(n, 0.3))
    train = sorted(n for n in names if n not in val)
    assert 0 < len(val) < len(names)
    for stream, ns in ((c.train, train), (c.val, val)):
        assert stream.tobytes() == b"".join(names[n] + sep for n in ns)
    i = c.info
    assert i["name"] == "python" and "root" not in i
    assert i["roots"] == {"stdlib": str(std), "site-packages": str(pkgs), "site-packages-2": str(pkgs2)}
    assert i["files"] == {"train": len(train), "val": len(val)}
    assert i["source_files"] == {"stdlib": 40, "site-packages": 30, "site-packages-2": 1}
    assert i["skipped_files"] == {"stdlib": 0, "site-packages": 3, "site-packages-2": 0}
    assert i["source_bytes"]["site-packages"] == sum(len(b) + 1 for b in kept.values())
    assert sum(i["source_bytes"].values()) == i["bytes"]["train"] + i["bytes"]["val"]
    assert i["sha256"]["train"] == hashlib.sha256(c.train.tobytes()).hexdigest()
    assert b"y = 2" not in c.train.tobytes() + c.val.tobytes()  # the file holding a NUL
    assert describe_corpus(i) == f"Python {i['python']} standard library + installed packages"
    # the split hangs on the prefixed name alone: the same files under other folders, same streams
    other = tmp_path / "copy"
    for n, b in names.items():
        src, rel = n.split("/", 1)
        dst = other / {"stdlib": "lib", "site-packages": "site", "site-packages-2": "site2"}[src] / rel
        dst.parent.mkdir(parents=True, exist_ok=True)
        dst.write_bytes(b)
    c2 = PythonCorpus(16, root=str(other / "lib"), packages=[str(other / "site"), str(other / "site2")],
                      val_fraction=0.3)
    assert c2.info["sha256"] == i["sha256"] and c2.info["file_list_sha256"] == i["file_list_sha256"]
    with pytest.raises(ValueError, match="packages must be a list"):
        PythonCorpus(16, root=str(std), packages=str(pkgs))
    with pytest.raises(ValueError, match="packages folder"):
        PythonCorpus(16, root=str(std), packages=[str(tmp_path / "none")])
    with pytest.raises(ValueError, match="val_fraction"):
        PythonCorpus(16, root=str(std), packages=[], val_fraction=1.0)


def test_python_corpus_holds_the_stdlib(tmp_path):
    kept = _fake_packages(tmp_path)
    s, p = StdlibCorpus(64), PythonCorpus(64, packages=[str(tmp_path)])
    n_std = len(s.train) + len(s.val)
    assert len(p.train) + len(p.val) == n_std + sum(len(b) + 1 for b in kept.values()) > n_std
    assert p.info["source_bytes"]["stdlib"] == n_std and p.info["source_files"]["stdlib"] == len(stdlib_files())
    # every stdlib file's bytes, each once, and the packages' files: nothing else
    got = sorted(_stream_files(p))
    assert got == sorted(_stream_files(s) + list(kept.values()))
    os_py = open(os.path.join(s.info["root"], "os.py"), "rb").read()
    assert (bytes([SEPARATOR]) + os_py + bytes([SEPARATOR])) in p.train.tobytes()  # stdlib/os.py is in train


def test_package_roots_are_purelib_and_platlib_once(tmp_path, monkeypatch):
    paths = sysconfig.get_paths()
    assert package_roots() == [os.path.abspath(paths["purelib"])] + (
        [os.path.abspath(paths["platlib"])]
        if os.path.realpath(paths["platlib"]) != os.path.realpath(paths["purelib"]) else [])
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    os.symlink(a, tmp_path / "link")
    for pure, plat, want in ((a, b, [a, b]), (a, tmp_path / "link", [a]), (a, tmp_path / "none", [a])):
        monkeypatch.setattr(sysconfig, "get_paths", lambda: {"purelib": str(pure), "platlib": str(plat)})
        assert package_roots() == [str(w) for w in want]


def test_train_data_python_and_its_resume_check(tmp_path, monkeypatch, capsys):
    std, pkgs = _fake_roots(tmp_path, monkeypatch)
    out = str(tmp_path / "run")
    args = ["train", *SMALL, "--attention", "window", "--steps", "2", "--eval-every", "2", "--eval-windows", "2",
            "--position-bucket", "16", "--out", out]
    assert cli.main([*args, "--data", "python"]) == 0
    assert "standard library + installed packages" in capsys.readouterr().out
    corpus = json.load(open(os.path.join(out, "corpus.json")))
    want = PythonCorpus(112, root=str(std), packages=[str(pkgs)]).info
    assert corpus == want and corpus["roots"] == {"stdlib": str(std), "site-packages": str(pkgs)}
    assert [r["tokens"] for r in read_log(out)] == [4 * 112, 8 * 112]
    # the same run resumed on the standard library alone, or on other packages: refused
    assert "the data differs" in cli_error([*args, "--steps", "3", "--data", "stdlib", "--resume"], capsys)
    corpus["file_list_sha256"] = "0" * 64
    json.dump(corpus, open(os.path.join(out, "corpus.json"), "w"))
    assert "the data differs" in cli_error([*args, "--steps", "3", "--data", "python", "--resume"], capsys)
