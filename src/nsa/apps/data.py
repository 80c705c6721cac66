"""Training data: the embedded passkey task (nothing to download), bytes of any text file, and
the source files of the Python standard library, alone or with the installed packages' (a real
corpus on every machine).

Tokens are bytes (vocabulary 256). Every batch is a pure function of (seed, step): batch i
of a run is the same whether the run was resumed or not, and whatever the number of
processes (each takes its slice of the global batch), which is what makes ``--resume``
bit-exact and DDP equal to one process.

Passkey task (after Mohtashami & Jaggi, 2023, "Landmark Attention"): a haystack of filler
sentences hides one needle, ``The pass key is 38271. Remember it. 38271 is the pass key.``,
and the sequence ends with the question ``What is the pass key? The pass key is 38271.``.
The answer digits can only be predicted by looking back at the needle, so a model whose
attention cannot reach it (the window baseline, for a needle more than ``window`` tokens
back) stays at chance (about 10% a digit; 1 in 30240 for a whole 5-digit key, whose digits
are distinct).
"""

from __future__ import annotations

import functools
import hashlib
import os
import platform
import stat
import sys
import sysconfig

import numpy as np
import torch

FILLER = (
    "The grass is green. ", "The sky is blue. ", "The sun is yellow. ", "Here we go. ",
    "There and back again. ", "The river flows to the sea. ", "Birds sing in the morning. ",
    "A cat sleeps on the warm roof. ", "The wind moves the tall trees. ", "Snow falls in winter. ",
)
NEEDLE = "The pass key is {key}. Remember it. {key} is the pass key. "
QUESTION = "What is the pass key? The pass key is "


def _rng(seed: int, *ids: int) -> np.random.Generator:
    """An independent generator per (seed, ids): no state to save or share between ranks."""
    return np.random.default_rng([seed, *ids])


class PasskeyTask:
    """Passkey retrieval sequences of exactly ``seq_len`` bytes.

    Args:
        seq_len: tokens per training sequence (question and answer included).
        digits: length of the pass key.
        seed: makes every sequence reproducible.
        answer_weight: loss weight of the answer digits relative to other tokens (the
            answer is a handful of tokens in hundreds; weighing it up speeds learning).
        min_len: when set, each training batch has its own length, drawn from
            [min_len, seq_len] by the step (multiples of 16, or of 256 above 1024
            tokens): a model trained at one length
            learns a retrieval tied to it and fails at other lengths.
        near: fraction of training sequences whose needle starts within ``near_span``
            bytes of the question (uniformly there) instead of at a uniform depth. At 16k
            tokens a uniform depth puts 3% of needles in the last 512 bytes, and that is
            where a long-context model copies a digit off by one (docs/needle.md).
            0 (default) keeps the batches of runs made before this option bit for bit.
        near_span: see ``near``.
    """

    def __init__(self, seq_len: int = 512, digits: int = 5, seed: int = 0, answer_weight: float = 1.0,
                 min_len: int | None = None, near: float = 0.0, near_span: int = 512):
        if not isinstance(digits, int) or not 1 <= digits <= 32:
            raise ValueError(f"digits must be an int in [1, 32], got {digits!r}")
        self.digits, self.seed, self.answer_weight = digits, seed, float(answer_weight)
        self.min_len = len(NEEDLE.format(key="0" * digits)) + len(QUESTION) + digits + 2
        if not isinstance(seq_len, int) or seq_len < self.min_len:
            raise ValueError(f"seq_len must be an int >= {self.min_len} (needle and question), got {seq_len!r}")
        self.seq_len = seq_len
        if min_len is not None and (not isinstance(min_len, int) or not self.min_len <= min_len <= seq_len):
            raise ValueError(f"min_len must be an int in [{self.min_len}, seq_len={seq_len}], got {min_len!r}")
        self.min_seq_len = seq_len if min_len is None else min_len
        if not isinstance(near, (int, float)) or not 0.0 <= near <= 1.0:
            raise ValueError(f"near must be a fraction in [0, 1], got {near!r}")
        if not isinstance(near_span, int) or near_span < 1:
            raise ValueError(f"near_span must be a positive int, got {near_span!r}")
        self.near, self.near_span = float(near), near_span

    def length(self, step: int) -> int:
        """Tokens per sequence of batch ``step``."""
        if self.min_seq_len == self.seq_len:
            return self.seq_len
        # few distinct lengths at GPU scale: each new shape costs a compilation/autotuning
        q = 16 if self.seq_len <= 1024 else 256
        lo, hi = -(-self.min_seq_len // q), self.seq_len // q
        n = int(_rng(self.seed, 1 << 40, step).integers(lo, hi + 1)) * q  # its own stream
        return min(max(n, self.min_seq_len), self.seq_len)

    def example(self, context_len: int, depth: float, rng: np.random.Generator):
        """One sequence of ``context_len`` bytes with the needle's start at fraction ``depth``
        of the haystack. Returns (tokens uint8 [context_len], answer_start, key)."""
        if not 0.0 <= depth <= 1.0:
            raise ValueError(f"depth must be in [0, 1], got {depth}")
        if context_len < self.min_len:
            raise ValueError(f"context_len must be >= {self.min_len}, got {context_len}")
        # distinct digits (when there are at most 10): "the digit after 3" is then unique,
        # so a copy that has matched the key's start can follow it without ambiguity
        key = "".join(str(d) for d in (rng.permutation(10)[:self.digits] if self.digits <= 10
                                       else rng.integers(0, 10, self.digits)))
        needle = NEEDLE.format(key=key).encode()
        tail = (QUESTION + key + ".").encode()
        n_hay = context_len - len(needle) - len(tail)
        hay = self._filler(n_hay, rng)
        at = int(round(depth * n_hay))
        # start the needle on a sentence boundary at or before ``at`` when there is one
        cut = hay.rfind(b". ", 0, at)
        at = 0 if at == 0 else (cut + 2 if cut >= 0 and at - cut < 40 else at)
        seq = hay[:at] + needle + hay[at:] + tail
        answer_start = len(seq) - self.digits - 1
        return np.frombuffer(seq, dtype=np.uint8), answer_start, key

    def _filler(self, n: int, rng: np.random.Generator) -> bytes:
        picks = rng.integers(0, len(FILLER), n // 12 + 2)
        text = "".join(FILLER[i] for i in picks)
        while len(text) < n:
            text += FILLER[int(rng.integers(0, len(FILLER)))]
        return text[:n].encode()

    def batch(self, step: int, batch_size: int, rank: int = 0, world_size: int = 1, device="cpu"):
        """This rank's slice of global batch ``step``: (inputs, targets, weights), each
        [b, length(step)].

        Sequence j of the global batch depends on (seed, step, j) only; rank r takes rows
        r*b .. (r+1)*b - 1 with b = batch_size // world_size. Needle depths are uniform,
        except for a fraction ``near`` of sequences, whose needle is near the question.
        """
        b = _local(batch_size, world_size)
        n = self.length(step)
        rows, weights = [], []
        for j in range(rank * b, (rank + 1) * b):
            rng = _rng(self.seed, step, j)
            depth = float(rng.random())
            if self.near > 0:  # its own stream: near=0 draws exactly what it always drew
                pick = _rng(self.seed, step, j, 1 << 41).random(2)
                if pick[0] < self.near:
                    n_hay = n + 2 - self.min_len  # haystack bytes: min_len - 1 are needle and tail
                    depth = max(0.0, 1.0 - pick[1] * min(self.near_span, n_hay) / n_hay)
            toks, a, _ = self.example(n + 1, depth, rng)
            rows.append(toks)
            w = np.ones(n, dtype=np.float32)
            w[a - 1:a - 1 + self.digits] = self.answer_weight  # targets are shifted by one
            weights.append(w)
        x = torch.from_numpy(np.stack(rows).astype(np.int64))
        return (x[:, :-1].to(device), x[:, 1:].to(device), torch.from_numpy(np.stack(weights)).to(device))


class TextCorpus:
    """Byte-level language modelling on a train and a validation byte stream.

    Training batches are random windows of ``seq_len + 1`` bytes of the train stream: window j
    of global batch ``step`` starts at an offset drawn from (seed, step, j) alone, so a batch
    is the same whether the run was resumed or not, and whatever the number of processes.
    Validation (:meth:`val_windows`) reads fixed windows that depend on the stream alone, so
    every model and every seed is scored on the same bytes.
    """

    def __init__(self, train: np.ndarray, val: np.ndarray, seq_len: int, seed: int = 0, name: str = "text"):
        if len(train) < seq_len + 2 or len(val) < seq_len + 2:
            raise ValueError(f"{name}: the train ({len(train)} bytes) and validation ({len(val)} bytes) "
                             f"streams must each hold more than seq_len + 1 = {seq_len + 1} bytes")
        self.train, self.val = train, val  # uint8 [N]
        self.seq_len, self.seed = seq_len, seed

    def length(self, step: int) -> int:
        """Tokens per sequence of batch ``step`` (always ``seq_len``)."""
        return self.seq_len

    def batch(self, step: int, batch_size: int, rank: int = 0, world_size: int = 1, device="cpu",
              split: str = "train"):
        """This rank's slice of global batch ``step``: (inputs, targets, weights) [b, seq_len];
        ``split="val"`` draws random windows of the validation stream instead."""
        data = self.train if split == "train" else self.val
        b = _local(batch_size, world_size)
        rows = []
        for j in range(rank * b, (rank + 1) * b):
            start = int(_rng(self.seed, step, j, split == "val").integers(0, len(data) - self.seq_len - 1))
            rows.append(data[start:start + self.seq_len + 1])
        x = torch.from_numpy(np.stack(rows).astype(np.int64))
        return x[:, :-1].to(device), x[:, 1:].to(device), torch.ones(b, self.seq_len, device=device)

    def val_offsets(self, n: int) -> np.ndarray:
        """Start offsets of the ``n`` validation windows: evenly spaced from the start of the
        validation stream to its last full window (they overlap when the stream holds fewer
        than ``n`` windows)."""
        if not isinstance(n, int) or n < 1:
            raise ValueError(f"the number of validation windows must be a positive int, got {n!r}")
        last = len(self.val) - self.seq_len - 1
        return np.round(np.linspace(0, last, n)).astype(np.int64) if n > 1 else np.zeros(1, np.int64)

    def val_windows(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(inputs, targets) int64 [n, seq_len] of the windows at :meth:`val_offsets`."""
        x = torch.from_numpy(np.stack([self.val[o:o + self.seq_len + 1] for o in self.val_offsets(n)])
                             .astype(np.int64))
        return x[:, :-1], x[:, 1:]


class ByteText(TextCorpus):
    """Byte-level language modelling on a text file: random windows of ``seq_len + 1`` bytes.

    The last ``val_fraction`` of the file is held out for evaluation.
    """

    def __init__(self, path: str, seq_len: int, seed: int = 0, val_fraction: float = 0.05):
        with open(path, "rb") as f:
            data = np.frombuffer(f.read(), dtype=np.uint8)
        n_val = int(len(data) * val_fraction)
        if len(data) - n_val < seq_len + 2 or n_val < seq_len + 2:
            raise ValueError(f"{path!r} has {len(data)} bytes: too short for seq_len={seq_len} "
                             f"with a {val_fraction:.0%} validation split")
        super().__init__(data[:len(data) - n_val], data[len(data) - n_val:], seq_len, seed, path)
        self.info = {"name": "file", "path": os.path.abspath(path), "val_fraction": val_fraction,
                     "bytes": {"train": int(len(self.train)), "val": int(len(self.val))},
                     "sha256": hashlib.sha256(data.tobytes()).hexdigest()}


# --------------------------------------------------------------------------- the Python corpora
STDLIB = "stdlib"  # what --data names it by
PYTHON = "python"  # the standard library and the installed packages
STDLIB_VAL_FRACTION = 0.05
SEPARATOR = 0  # NUL: Python source may not contain it, so it marks file boundaries unambiguously


def stdlib_root() -> str:
    """The standard library folder of the running interpreter (``sysconfig``'s "stdlib")."""
    return sysconfig.get_paths()["stdlib"]


def stdlib_files(root: str | None = None) -> list[str]:
    """The corpus's files: every ``*.py`` under ``root`` (default :func:`stdlib_root`) as
    relative POSIX paths, sorted. Left out: ``site-packages`` and ``dist-packages`` (installed
    packages, not the standard library), ``__pycache__``, and what the interpreter's build
    generated for its machine (``_sysconfigdata_*.py``, the ``config-*`` folder). The test
    suite (``test/``, about half the bytes) stays in: it is real code too; a Python built
    without it gives a smaller corpus, which the run's corpus record shows."""
    root = stdlib_root() if root is None else root
    if not os.path.isdir(root):
        raise ValueError(f"the standard library folder {root!r} does not exist")
    out = []
    for d, dirs, files in os.walk(root):
        rel_d = os.path.relpath(d, root)
        dirs[:] = [x for x in dirs if x not in ("site-packages", "dist-packages", "__pycache__")
                   and not (rel_d == "." and x.startswith("config-"))]
        for f in files:
            if f.endswith(".py") and not f.startswith("_sysconfigdata_"):
                out.append(os.path.relpath(os.path.join(d, f), root).replace(os.sep, "/"))
    return sorted(out)


def is_validation_file(rel: str, val_fraction: float = STDLIB_VAL_FRACTION) -> bool:
    """Whether the file ``rel`` (a relative POSIX path) is in the validation split: the first 8
    bytes of the SHA-256 of its path, read as a fraction of 2**64, fall below ``val_fraction``.
    A file's split depends on its path alone: the same on every machine and Python version."""
    h = int.from_bytes(hashlib.sha256(rel.encode()).digest()[:8], "big")
    return h < val_fraction * 2**64


def package_roots() -> list[str]:
    """The installed packages' folders of the running interpreter: ``sysconfig``'s "purelib"
    and, when it is another folder, "platlib" (absolute paths; missing folders left out)."""
    paths = sysconfig.get_paths()
    return _distinct([paths[k] for k in ("purelib", "platlib") if os.path.isdir(paths[k])])


def _distinct(folders: list[str]) -> list[str]:
    """``folders`` as absolute paths, in order, each folder once (after symlinks)."""
    out, seen = [], set()
    for p in folders:
        real = os.path.realpath(p)
        if real not in seen:
            seen.add(real)
            out.append(os.path.abspath(p))
    return out


def package_files(root: str) -> list[str]:
    """Every ``*.py`` under ``root`` (an installed packages' folder) as relative POSIX paths,
    sorted; ``__pycache__`` left out. Unreadable files and files holding a NUL are dropped when
    the corpus is loaded, not here (that needs their bytes)."""
    if not os.path.isdir(root):
        raise ValueError(f"the packages folder {root!r} does not exist")
    out = []
    for d, dirs, files in os.walk(root):
        dirs[:] = [x for x in dirs if x != "__pycache__"]
        out += [os.path.relpath(os.path.join(d, f), root).replace(os.sep, "/") for f in files if f.endswith(".py")]
    return sorted(out)


def _read_source(path: str) -> bytes | None:
    """The bytes of an installed package's file, or None when it is not a regular file (after
    symlinks), cannot be read or holds a NUL (the file separator)."""
    try:
        if not stat.S_ISREG(os.stat(path).st_mode):
            return None
        with open(path, "rb") as f:
            data = f.read()
    except OSError:
        return None
    return None if bytes([SEPARATOR]) in data else data


@functools.lru_cache(maxsize=4)
def _load_sources(name: str, sources: tuple[tuple[str, str, bool], ...], val_fraction: float):
    """(train, val, info) of the corpus made of ``sources``: (prefix, root, packages) each. A
    file is named ``prefix/rel`` (``rel`` alone for the prefix ""), split by that name and
    streamed in name order. ``packages`` picks :func:`package_files` and drops the files
    :func:`_read_source` rejects; otherwise :func:`stdlib_files`, each read as is."""
    prefixes = [s[0] for s in sources]
    if len(set(prefixes)) != len(prefixes):
        raise ValueError(f"sources: each needs its own prefix, got {prefixes}")
    picked = []  # (name, prefix, path, packages)
    for prefix, root, packages in sources:
        for rel in (package_files if packages else stdlib_files)(root):
            picked.append((f"{prefix}/{rel}" if prefix else rel, prefix, os.path.join(root, rel), packages))
    streams, info_files = {"train": [], "val": []}, {"train": [], "val": []}
    source_files, source_bytes, skipped = ({p: 0 for p in prefixes} for _ in range(3))
    for rel, prefix, path, packages in sorted(picked):
        if packages:
            data = _read_source(path)
            if data is None:
                skipped[prefix] += 1
                continue
        else:
            with open(path, "rb") as f:
                data = f.read()
        split = "val" if is_validation_file(rel, val_fraction) else "train"
        streams[split] += [data, bytes([SEPARATOR])]
        info_files[split].append(f"{rel} {len(data)}")
        source_bytes[prefix] += len(data) + 1
        source_files[prefix] += 1
    arrays = {k: np.frombuffer(b"".join(v), dtype=np.uint8) for k, v in streams.items()}
    listing = "".join(f"{k} {line}\n" for k in ("train", "val") for line in info_files[k])
    info = {"name": name, "python": platform.python_version(), "implementation": sys.implementation.name}
    if len(sources) == 1 and not prefixes[0]:
        info["root"] = sources[0][1]
    else:
        info.update(roots={p: r for p, r, _ in sources}, source_files=source_files,
                    source_bytes=source_bytes, skipped_files=skipped)
    info.update({"val_fraction": val_fraction, "separator": SEPARATOR,
                 "files": {k: len(v) for k, v in info_files.items()},
                 "bytes": {k: int(len(a)) for k, a in arrays.items()},
                 "file_list_sha256": hashlib.sha256(listing.encode()).hexdigest(),
                 "sha256": {k: hashlib.sha256(a.tobytes()).hexdigest() for k, a in arrays.items()}})
    return arrays["train"], arrays["val"], info


def _val_fraction(val_fraction: float) -> float:
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction!r}")
    return float(val_fraction)


class StdlibCorpus(TextCorpus):
    """The ``*.py`` files of the Python standard library (:func:`stdlib_files`), split into
    train and validation by file (:func:`is_validation_file`), each split the concatenation of
    its files in path order, each file followed by a NUL byte. Tokens are bytes.

    ``info`` says exactly which corpus this is: the Python version, the root, file and byte
    counts per split, the SHA-256 of the file list (split, path and size of every file) and of
    each stream. The standard library differs between Python versions, so runs on two machines
    compare only when these agree.
    """

    def __init__(self, seq_len: int, seed: int = 0, root: str | None = None,
                 val_fraction: float = STDLIB_VAL_FRACTION):
        val_fraction = _val_fraction(val_fraction)
        root = os.path.abspath(stdlib_root() if root is None else root)
        train, val, info = _load_sources(STDLIB, (("", root, False),), val_fraction)
        super().__init__(train, val, seq_len, seed, f"the standard library corpus at {root!r}")
        self.info = dict(info)


class PythonCorpus(TextCorpus):
    """The standard library's files (:func:`stdlib_files` of ``root``, named ``stdlib/REL``)
    and the ``*.py`` files of the installed packages (:func:`package_files` of each folder of
    ``packages``, default :func:`package_roots`, a folder given twice counted once; named
    ``site-packages/REL``, then ``site-packages-2/REL`` ... for further folders), less those that
    are not regular files, cannot be read or hold a NUL byte. Split by file on the prefixed name
    (:func:`is_validation_file`); streams as :class:`StdlibCorpus`'s, in name order.

    ``info`` is :class:`StdlibCorpus`'s record with ``roots`` (prefix -> folder) in place of
    ``root``, and per prefix ``source_files``, ``source_bytes`` (separators included) and
    ``skipped_files``. It depends on the installed packages as much as on the Python version.
    """

    def __init__(self, seq_len: int, seed: int = 0, root: str | None = None, packages: list[str] | None = None,
                 val_fraction: float = STDLIB_VAL_FRACTION):
        val_fraction = _val_fraction(val_fraction)
        if isinstance(packages, str):
            raise ValueError(f"packages must be a list of folders, got the string {packages!r}")
        root = os.path.abspath(stdlib_root() if root is None else root)
        pkgs = _distinct(package_roots() if packages is None else list(packages))
        sources = [("stdlib", root, False)]
        sources += [("site-packages" + (f"-{i + 1}" if i else ""), p, True) for i, p in enumerate(pkgs)]
        train, val, info = _load_sources(PYTHON, tuple(sources), val_fraction)
        super().__init__(train, val, seq_len, seed, f"the Python corpus at {root!r} + {pkgs}")
        self.info = dict(info)


CORPORA = {STDLIB: StdlibCorpus, PYTHON: PythonCorpus}  # --data NAME -> its class


def describe_corpus(info: dict) -> str:
    """A short human name of the corpus of ``info`` (a corpus record, e.g. ``corpus.json``)."""
    name = info.get("name", STDLIB)
    if name == STDLIB:
        return f"Python {info.get('python')} standard library"
    if name == PYTHON:
        return f"Python {info.get('python')} standard library + installed packages"
    return f"{name} {os.path.basename(str(info.get('path', '')))}".strip()


def _local(batch_size: int, world_size: int) -> int:
    if batch_size % world_size:
        raise ValueError(f"batch_size ({batch_size}) must be a multiple of the number of "
                         f"processes ({world_size})")
    return batch_size // world_size


def encode(text: str) -> torch.Tensor:
    return torch.tensor(list(text.encode()), dtype=torch.int64)


def decode(tokens) -> str:
    return bytes(int(t) for t in tokens).decode("utf-8", errors="replace")
