"""The README as a front page: its Python blocks run as pasted, it stays short, and nothing in
the repository points outside it.

Every ```python block of README.md runs in a fresh namespace from the repository root. Lines
whose comment starts with ``# cuda`` need a GPU: without CUDA they are dropped, with CUDA the
block runs whole.
"""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
CUDA_LINE = re.compile(r"#\s*cuda\b")
MAX_LINES = 260


def python_blocks(text: str) -> list[str]:
    return re.findall(r"^```python\n(.*?)^```\s*$", text, flags=re.M | re.S)


def runnable(block: str, cuda: bool) -> str:
    """The block as it runs here: CUDA-only lines dropped unless CUDA is available."""
    if cuda:
        return block
    return "".join(line for line in block.splitlines(keepends=True) if not CUDA_LINE.search(line))


def tracked_files() -> list[Path]:
    try:
        out = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT, capture_output=True, check=True).stdout
        names = [n for n in out.decode().split("\0") if n]
    except (OSError, subprocess.CalledProcessError):  # not a git checkout (e.g. an unpacked sdist)
        names = [str(p.relative_to(ROOT)) for p in ROOT.rglob("*")
                 if p.is_file() and ".git" not in p.parts and "__pycache__" not in p.parts]
    return [ROOT / n for n in names if (ROOT / n).is_file()]


def text_of(path: Path) -> str | None:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError:  # binary (PNG, safetensors)
        return None


BLOCKS = python_blocks(README.read_text(encoding="utf-8"))


def test_readme_has_its_python_blocks():
    # the usage section has one block each for the op, decode, the layer and the model: if the
    # pattern stopped matching, the test below would run nothing
    assert len(BLOCKS) >= 4
    assert sum(bool(CUDA_LINE.search(line)) for b in BLOCKS for line in b.splitlines()) >= 1


@pytest.mark.parametrize("i", range(len(BLOCKS)))
def test_readme_python_block_runs(i, monkeypatch):
    # a fresh namespace, as a new interpreter would have, from the repository root (the model
    # block loads a committed checkpoint by its relative path)
    monkeypatch.chdir(ROOT)
    code = compile(runnable(BLOCKS[i], torch.cuda.is_available()), f"README.md python block {i + 1}", "exec")
    exec(code, {"__name__": "__main__"})


def test_readme_is_a_front_page():
    lines = README.read_text(encoding="utf-8").splitlines()
    assert len(lines) <= MAX_LINES, f"README.md has {len(lines)} lines (at most {MAX_LINES}): move detail to docs/"


def test_readme_has_the_ci_test_command():
    # .ci/run runs the README's test command (quietly: pip -q); the two must not drift apart
    quiet = lambda s: s.strip().replace("pip install -q ", "pip install ")  # noqa: E731
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    cmd = [quiet(line) for line in ci.splitlines() if "pytest" in line and not line.lstrip().startswith("#")]
    assert len(cmd) == 1
    assert cmd[0] in [quiet(line) for line in README.read_text(encoding="utf-8").splitlines()]


def test_no_file_points_outside_the_repository():
    # the patterns are built from pieces so that this file does not match itself
    forbidden = ["../" + "shared", "/" + "work/", "SPEC" + ".md"]
    hits = []
    for path in tracked_files():
        text = text_of(path)
        if text is None:
            continue
        for n, line in enumerate(text.splitlines(), 1):
            hits += [f"{path.relative_to(ROOT)}:{n}: {p}" for p in forbidden if p in line]
    assert not hits, "references to files outside the repository:\n" + "\n".join(hits)


REPO_PATH = re.compile(r"(?<![\w./-])((?:src|benchmarks|tests|examples|docs)/[\w./-]*\w\.\w+)")
LINK = re.compile(r"\]\(([^)\s#]+)(?:#[^)]*)?\)")


def test_paths_named_in_the_repository_exist():
    """Every repository path a tracked text file names (``benchmarks/results/prefill_h200.json``,
    ``docs/kernels.md``, a relative markdown link) is a file of the repository."""
    files = tracked_files()
    have = {p.relative_to(ROOT).as_posix() for p in files}
    dirs = {Path(p).parent.as_posix() for p in have}
    missing = []
    for path in files:
        text = text_of(path)
        if text is None:
            continue
        rel = path.relative_to(ROOT)
        named = set(REPO_PATH.findall(text))
        if path.suffix == ".md":
            for link in LINK.findall(text):
                if "://" in link or link.startswith("mailto:"):
                    continue
                named.add(os.path.normpath(os.path.join(rel.parent.as_posix(), link)).replace(os.sep, "/"))
        missing += [f"{rel}: {p}" for p in sorted(named) if p.rstrip("/") not in have | dirs]
    assert not missing, "named but not in the repository:\n" + "\n".join(missing)
