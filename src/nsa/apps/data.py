"""Training data: the embedded passkey task (nothing to download) and bytes of any text file.

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


class ByteText:
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
        self.train, self.val = data[:len(data) - n_val], data[len(data) - n_val:]
        self.seq_len, self.seed = seq_len, seed

    def batch(self, step: int, batch_size: int, rank: int = 0, world_size: int = 1, device="cpu",
              split: str = "train"):
        data = self.train if split == "train" else self.val
        b = _local(batch_size, world_size)
        rows = []
        for j in range(rank * b, (rank + 1) * b):
            start = int(_rng(self.seed, step, j, split == "val").integers(0, len(data) - self.seq_len - 1))
            rows.append(data[start:start + self.seq_len + 1])
        x = torch.from_numpy(np.stack(rows).astype(np.int64))
        return x[:, :-1].to(device), x[:, 1:].to(device), torch.ones(b, self.seq_len, device=device)


def _local(batch_size: int, world_size: int) -> int:
    if batch_size % world_size:
        raise ValueError(f"batch_size ({batch_size}) must be a multiple of the number of "
                         f"processes ({world_size})")
    return batch_size // world_size


def encode(text: str) -> torch.Tensor:
    return torch.tensor(list(text.encode()), dtype=torch.int64)


def decode(tokens) -> str:
    return bytes(int(t) for t in tokens).decode("utf-8", errors="replace")
