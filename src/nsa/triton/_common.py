"""Shared launch helpers of the Triton kernels: tile shapes and per-sequence tables.

Every kernel walks a table of programs. A program owns ``BT`` consecutive query positions of
one sequence and one key/value head g, and holds the ``h`` query heads of g for each of them:
its tile has ``BM = BT * HP`` rows, row ``r`` being position ``r // HP`` and head ``r % HP``
of the group (``HP`` = h rounded up to a power of two; rows with head >= h are padding).
Batches and ``cu_seqlens`` packs are the same thing to the kernels: a list of sequences,
each with its start row in the flattened ``[B*T]`` query, key and compressed-key tensors.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import time

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

from ..geometry import num_cmp_blocks

# SEQ columns (int64): start row / length of the queries, of the slc keys, of the window keys
# and of the compressed keys of each sequence.
Q0, QN, KS0, KSN, KW0, KWN, KC0, KCN = range(8)
SEQ_COLS = 8

# log2(e): the kernels compute softmax with exp2, so scores and lse are scaled by it
LOG2E = tl.constexpr(1.4426950408889634)


@triton.jit
def program_rows(TBL, SEQ, pid, KCOL: tl.constexpr):
    """(first position t0, query start row, query length, key start row, key length) of
    program ``pid`` of a program table; ``KCOL`` picks the key columns of SEQ (KS0/KW0/KC0)."""
    seq = tl.load(TBL + pid * 2)
    t0 = tl.load(TBL + pid * 2 + 1)
    q_start = tl.load(SEQ + seq * 8 + 0)  # SEQ_COLS = 8, columns Q0 = 0, QN = 1
    q_len = tl.load(SEQ + seq * 8 + 1)
    k_start = tl.load(SEQ + seq * 8 + KCOL)
    k_len = tl.load(SEQ + seq * 8 + KCOL + 1)
    return t0, q_start, q_len, k_start, k_len


@triton.jit
def tile_rows(t0, g, q_start, q_len, q_offset, HQ: tl.constexpr, G: tl.constexpr,
              HP: tl.constexpr, BM: tl.constexpr):
    """Rows of a program's tile: row r is local position t0 + r // HP, head r % HP of group g.

    Returns (tq [BM] local positions, row_ok [BM] (in the sequence and not a padding head),
    pos [BM] absolute positions, row0 the 64-bit (position, head) row of the tile's first
    position, rel [BM] int32 rows relative to row0). 64-bit scalar base plus 32-bit offsets:
    per-element 64-bit addresses spill.
    """
    r = tl.arange(0, BM)
    tq = t0 + r // HP
    hh = r % HP
    row_ok = (tq < q_len) & (hh < G)
    row0 = (q_start + t0).to(tl.int64) * HQ
    rel = (r // HP) * HQ + g * G + hh
    return tq, row_ok, q_offset + tq, row0, rel


@triton.jit
def round_out(x, dtype: tl.constexpr, EMU_RTNE: tl.constexpr):
    """fp32 ``x`` cast to ``dtype`` rounding to nearest even. EMU_RTNE (bf16 under the CPU
    interpreter, whose cast truncates) rounds the fp32 bits first, so the cast is exact."""
    if EMU_RTNE:
        b = x.to(tl.int32, bitcast=True)
        b = (b + 0x7FFF + ((b >> 16) & 1)) & -65536
        x = b.to(tl.float32, bitcast=True)
    return x.to(dtype)


@triton.jit
def softmax_step(s, m_i, l_i):
    """One online-softmax step over a tile of base-2 scores s [M, N]: the tile's weights p, the
    factor alpha that rescales what was accumulated, and the new running max and sum."""
    m_new = tl.maximum(m_i, tl.max(s, 1))
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(s - m_new[:, None])
    return p, alpha, m_new, l_i * alpha + tl.sum(p, 1)


@triton.jit
def load_tile(ptr, mask, FULL: tl.constexpr):
    """A tile load, without a mask when FULL (every address valid: no predicates), else 0 where
    ``mask`` is off."""
    if FULL:
        return tl.load(ptr)
    else:
        return tl.load(ptr, mask=mask, other=0.0)


@triton.jit
def load_cols(base, rows, row_ok, col0, BK: tl.constexpr, D: tl.constexpr, UPCAST: tl.constexpr):
    """Tile [len(rows), BK] of columns col0..col0+BK of row-major rows of width D (masked).

    Under UPCAST the tile is fp32: the CPU interpreter's bf16 dot is wrong (triton 3.9).
    """
    cols = col0 + tl.arange(0, BK)
    x = tl.load(base + rows[:, None] + cols[None, :], mask=row_ok[:, None] & (cols[None, :] < D),
                other=0.0)
    if UPCAST:
        x = x.to(tl.float32)
    return x


def tma_ok(q, k, v, BK0: int, BK1: int, BV: int) -> bool:
    """Whether a kernel may read tiles of k ``[B, Tk, H, Dk]`` and v through tensor descriptors
    (:func:`kv_descriptors`): 16-bit inputs on a Hopper or later GPU (every dtype under the
    interpreter, so that the CPU tests run it), head dims that the two dot chunks and the value
    tile cover exactly, 16-byte aligned bases, int32 row coordinates."""
    if not k.numel() or BK0 + BK1 != k.shape[-1] or BV != v.shape[-1]:
        return False
    if k.shape[0] * k.shape[1] >= 2 ** 31 or k.data_ptr() % 16 or v.data_ptr() % 16:
        return False
    if interpreting():
        return True
    return (q.dtype in (torch.float16, torch.bfloat16) and q.device.type == "cuda"
            and torch.cuda.get_device_capability(q.device)[0] >= 9)


def kv_descriptors(k, v, rows: int, BK0: int, BK1: int, BV: int) -> tuple:
    """(KD0, KD1, VD): k ``[B, Tk, H, Dk]`` and v viewed ``[B * Tk, H * D]``, boxes of ``rows``
    key rows x BK0 / BK1 / BV columns (a kernel reads head g's tile at row r from column g * Dk,
    g * Dk + BK0 and g * Dv: :func:`tma_tile`). Rows past the tensor read zeros. v None: VD
    None (keys only)."""
    k2 = k.view(-1, k.shape[2] * k.shape[3])
    kd0 = TensorDescriptor.from_tensor(k2, [rows, BK0])
    kd1 = TensorDescriptor.from_tensor(k2, [rows, BK1]) if BK1 else kd0
    vd = None if v is None else TensorDescriptor.from_tensor(v.view(-1, v.shape[2] * v.shape[3]), [rows, BV])
    return kd0, kd1, vd


@triton.jit
def tma_tile(D, row, col, UPCAST: tl.constexpr):
    """The descriptor D's box at (row, col) (:func:`kv_descriptors`); fp32 under UPCAST."""
    x = D.load([row, col])
    if UPCAST:  # the CPU interpreter's bf16 dot is wrong (triton 3.9)
        x = x.to(tl.float32)
    return x


def interpreting() -> bool:
    """True when Triton runs on the CPU interpreter (CPU debugging and CI)."""
    return os.environ.get("TRITON_INTERPRET") == "1"


_STREAMS: dict = {}  # (device, name) -> a side stream


def side_stream(device, name: str):
    """The CUDA device's side stream ``name``, for launches that may overlap the current
    stream's; None under the interpreter, off CUDA and while a graph is captured (the launches
    then stay on the current stream)."""
    if device.type != "cuda" or interpreting() or torch.cuda.is_current_stream_capturing():
        return None
    key = (device, name)
    if key not in _STREAMS:
        _STREAMS[key] = torch.cuda.Stream(device)
    return _STREAMS[key]


@contextlib.contextmanager
def on_side(stream, *used):
    """Launches in the block go to ``stream`` (None: the current stream), after the current
    stream's work so far. ``used``: tensors of the current stream that the block reads or
    writes; the allocator does not hand out their memory again before ``stream`` has done that
    work. The current stream waits for it at :func:`join_side`."""
    if stream is None:
        yield
        return
    stream.wait_stream(torch.cuda.current_stream(stream.device))
    for t in used:
        t.record_stream(stream)
    with torch.cuda.stream(stream):
        yield


def join_side(stream, *made) -> None:
    """The current stream waits for ``stream``'s work (None: nothing to wait for); ``made``:
    tensors allocated on ``stream`` that the current stream uses and frees from here."""
    if stream is None:
        return
    torch.cuda.current_stream(stream.device).wait_stream(stream)
    for t in made:
        t.record_stream(torch.cuda.current_stream(stream.device))


def cdiv(a: int, b: int) -> int:
    """ceil(a / b) for host ints (triton.cdiv is a constexpr function: ~4 us a call on the host,
    a few a launch)."""
    return -(-a // b)


def next_pow2(x: int) -> int:
    return 1 << max(0, (int(x) - 1).bit_length())


def split_dim(D: int) -> tuple[int, int]:
    """Split a head dim into two power-of-two dot chunks (192 -> 128 + 64, 128 -> 128 + 0).

    Splitting instead of padding to the next power of two saves a third of the QK work at
    Dk = 192. The second chunk is masked past D and is at least 16 wide (the dot minimum).
    """
    b0 = 1 << (int(D).bit_length() - 1)
    if b0 == D:
        return max(b0, 16), 0
    return b0, max(16, next_pow2(D - b0))


class SeqLens(tuple):
    """The query length of each sequence (a tuple), with the key lengths of each branch on the
    host as ``k_slc``, ``k_win`` and ``k_cmp``: launchers size grids from them without
    reading the device table back (a host sync that stalls the queue)."""

    def __new__(cls, q, k_slc, k_win, k_cmp):
        obj = super().__new__(cls, q)
        obj.k_slc, obj.k_win, obj.k_cmp = tuple(k_slc), tuple(k_win), tuple(k_cmp)
        return obj


def seq_table(B: int, Tq: int, Tks: int, Tkw: int, tc: int, cu_seqlens, cmp_block: int,
              cmp_stride: int, device) -> tuple[torch.Tensor, SeqLens]:
    """(SEQ int64 [N, 8], lengths): per-sequence start rows and lengths (see SEQ_COLS), and
    the same lengths on the host (:class:`SeqLens`).

    Cached per shape (and per ``cu_seqlens`` content): building the table copies host ->
    device, which waits for the stream, so building it on every launch stalled the GPU queue
    between kernels and could not be captured in a CUDA graph.
    """
    if cu_seqlens is None:
        return _dense_seq_table(B, Tq, Tks, Tkw, tc, torch.device(device))
    cu = tuple(int(x) for x in cu_seqlens.tolist())
    return _packed_seq_table(cu, cmp_block, cmp_stride, torch.device(device))


@functools.lru_cache(maxsize=64)
def _dense_seq_table(B, Tq, Tks, Tkw, tc, device):
    b = torch.arange(B, dtype=torch.int64)
    cols = [b * Tq, torch.full_like(b, Tq), b * Tks, torch.full_like(b, Tks),
            b * Tkw, torch.full_like(b, Tkw), b * tc, torch.full_like(b, tc)]
    lens = SeqLens((Tq,) * B, (Tks,) * B, (Tkw,) * B, (tc,) * B)
    return torch.stack(cols, 1).contiguous().to(device), lens


@functools.lru_cache(maxsize=64)
def _packed_seq_table(cu, cmp_block, cmp_stride, device):
    lens = [e - s for s, e in zip(cu[:-1], cu[1:])]
    tcs = [num_cmp_blocks(n, cmp_block, cmp_stride) for n in lens]
    c0 = [0]
    for x in tcs[:-1]:
        c0.append(c0[-1] + x)
    st = torch.tensor(cu[:-1], dtype=torch.int64)
    ln = torch.tensor(lens, dtype=torch.int64)
    cols = [st, ln, st, ln, st, ln, torch.tensor(c0, dtype=torch.int64), torch.tensor(tcs, dtype=torch.int64)]
    return torch.stack(cols, 1).contiguous().to(device), SeqLens(lens, lens, lens, tcs)


def prog_table(lens: list[int], BT: int, device) -> torch.Tensor:
    """int32 [n_prog, 2]: (sequence, first local position) of each program's BT positions.

    Built with device ops (no Python loop over programs: T = 128k with BT = 1 is 128k rows),
    cached per (lengths, BT) like :func:`seq_table`.
    """
    return _prog_table(tuple(lens), BT, torch.device(device))


@functools.lru_cache(maxsize=64)
def _prog_table(lens, BT, device):
    nb = [cdiv(n, BT) for n in lens]
    total = sum(nb)
    if total == 0:
        return torch.zeros(0, 2, dtype=torch.int32, device=device)
    nbt = torch.tensor(nb, dtype=torch.int64, device=device)
    seq = torch.repeat_interleave(torch.arange(len(nb), device=device), nbt, output_size=total)
    first = torch.cumsum(nbt, 0) - nbt  # program index of each sequence's first block
    t0 = (torch.arange(total, device=device) - first[seq]) * BT
    return torch.stack([seq, t0], 1).to(torch.int32).contiguous()


def rows_for(h: int, target: int) -> tuple[int, int, int]:
    """(HP, BT, BM): heads padded to a power of two, positions per program, tile rows."""
    HP = next_pow2(h)
    BT = max(1, target // HP)
    return HP, BT, BT * HP


def dot_precision(dtype: torch.dtype) -> str:
    """fp32 inputs get IEEE dots (tf32 would cost ~3e-4 relative error); 16-bit use tensor cores."""
    return "ieee" if dtype == torch.float32 else "tf32"


def upcast(dtype: torch.dtype) -> bool:
    """Whether kernels cast bf16 operands to fp32 before their dots: only under the CPU
    interpreter, whose bf16 dot returns garbage (seen with triton 3.9)."""
    return interpreting() and dtype == torch.bfloat16


# ------------------------------------------------------------------------------ autotuning
log = logging.getLogger("nsa")

# kernel name -> the (num_warps, num_stages) configs its autotuner tries per new key
TUNED: dict[str, list[dict]] = {}
_SEEN: set = set()  # (kernel name, key) pairs this process has launched
_ANNOUNCED = [False]  # the one WARNING of a process has been logged


def autotune_kwargs(key: list[str], warps: list[int], stages: list[int]) -> dict:
    """Keywords of ``triton.autotune`` for :func:`autotuned`: one config per num_warps x
    num_stages, and ``cache_results=True``: the timings of each key are stored in the Triton
    cache directory, so a later process (same kernel source, GPU and Triton) skips the tuning."""
    return dict(configs=[triton.Config({}, num_warps=w, num_stages=s) for w in warps for s in stages],
                key=list(key), cache_results=True)


def tuned_variants() -> dict[str, list[dict]]:
    """Per autotuned kernel (module import registers it), the configs tried on each new key:
    ``{name: [{"num_warps": w, "num_stages": s}, ...]}``; every config is one compilation and
    one timing on the first call, what pruning a list saves."""
    return {k: [dict(c) for c in v] for k, v in TUNED.items()}


def first_call(name: str, key: tuple) -> bool:
    """Whether this process launches kernel ``name`` at autotuning key ``key`` for the first
    time (and remember that it has now)."""
    k = (name, tuple(key))
    if k in _SEEN:
        return False
    _SEEN.add(k)
    return True


def notice_first_call(name: str, key: tuple, arg_names: list[str]) -> None:
    """Say that a launch will compile and autotune: once per process a WARNING (the first
    new key; logger "nsa"), an INFO line for every other new key."""
    if not first_call(name, key):
        return
    shown = ", ".join(f"{n}={v}" for n, v in zip(arg_names, key))
    if not _ANNOUNCED[0]:
        _ANNOUNCED[0] = True
        log.warning("nsa: compiling and autotuning Triton kernels (first call at a new shape in this process: "
                    "seconds with a warm Triton cache, a minute or more with an empty one; autotune results "
                    "are cached on disk afterwards)")
    log.info("nsa: first call of %s at %s: compiling and autotuning", name, shown)


class _Autotuner(triton.runtime.autotuner.Autotuner):
    """triton's Autotuner that notices a new key before tuning (:func:`notice_first_call`)
    and logs how long the first call took. The notice hooks ``prune_configs``, which triton
    calls only for a key it has not tuned. A launch at a key tuned in this process skips
    triton's run altogether (:meth:`run`)."""

    _t_first = None  # perf_counter at the start of a first call, until it returns
    _pending = None  # (kernel name, key, key names) of the key being tuned, for the notice

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._key_at = [(self.arg_names.index(k), k) for k in self.keys]
        self._fast: dict = {}  # _fast_key -> the tuned config's launch keywords

    def prune_configs(self, kwargs, *rest, **kw):
        named = {k: v for k, v in {**self.nargs, **kwargs}.items() if k in self.arg_names}
        # the key as triton's Autotuner.run builds it: the key arguments, then tensor dtypes
        key = tuple([named[k] for k in self.keys if k in named]
                    + [str(v.dtype) for v in named.values() if hasattr(v, "dtype")])
        self._pending = (self.base_fn.__name__, key, [k for k in self.keys if k in named])
        if not self.cache_results:  # triton times every config next
            notice_first_call(*self._pending)
        self._t_first = time.perf_counter()
        return super().prune_configs(kwargs, *rest, **kw)

    def check_disk_cache(self, tuning_key, configs, bench_fn):
        """Triton's lookup of the timings on disk; the notice only when they are not there
        (then every config compiles and is timed): a warm cache loads in seconds, silently."""
        def tune():
            notice_first_call(*self._pending)
            bench_fn()

        return super().check_disk_cache(tuning_key, configs, tune)

    def _fast_key(self, args, kwargs) -> tuple:
        """The tuning key from positions known in advance: the key arguments (positional or
        keyword), then the dtypes of tensor arguments, as triton's key holds them."""
        n = len(args)
        return (tuple([args[i] if i < n else kwargs.get(k) for i, k in self._key_at]),
                tuple([a.dtype for a in args if isinstance(a, torch.Tensor)]),
                tuple([v.dtype for v in kwargs.values() if isinstance(v, torch.Tensor)]))

    def run(self, *args, **kwargs):
        # a tuned key launches its config directly: triton's run rebuilds a dict of every
        # argument and the key on each call (a decode cmp launch, the kernel stubbed, on this
        # repo's CPU: 33 us through triton's run, 17 us this way)
        fk = self._fast_key(args, kwargs)
        launch = self._fast.get(fk)
        if launch is not None:
            return self.fn.run(*args, **kwargs, **launch)
        out = super().run(*args, **kwargs)
        if self._t_first is not None:
            log.info("nsa: %s ready after %.1f s (%d configs)", self.base_fn.__name__,
                     time.perf_counter() - self._t_first, len(self.configs))
            self._t_first = None
        if self.best_config.pre_hook is None:
            self._fast[fk] = self.best_config.all_kwargs()
        return out


def autotuned(kernel, key: list[str], warps: list[int], stages: list[int], prune=None):
    """``kernel`` autotuned over num_warps x num_stages on GPUs (first call per key times each;
    the timings persist in the Triton cache, :func:`autotune_kwargs`; the first call logs a
    notice, :func:`notice_first_call`); under the interpreter the plain kernel (the launcher
    passes fixed values there). The configs are listed by :func:`tuned_variants`. ``prune``:
    triton's ``early_config_prune`` (configs, positional arguments by name, keyword arguments
    -> the configs to time), for configs that spill at some constexprs."""
    kw = autotune_kwargs(key, warps, stages)
    TUNED[kernel.__name__] = [dict(num_warps=c.num_warps, num_stages=c.num_stages) for c in kw["configs"]]
    if interpreting():
        return kernel
    return _Autotuner(kernel, kernel.arg_names, kw["configs"], kw["key"], reset_to_zero=None, restore_value=None,
                      cache_results=kw["cache_results"],
                      prune_configs_by={"early_config_prune": prune} if prune else None)


def _launch_hooked() -> bool:
    """Whether triton's launch hooks are set (profilers such as proton read them)."""
    knobs = getattr(triton, "knobs", None)
    if knobs is None:
        hooks = (getattr(triton.compiler.CompiledKernel, "launch_enter_hook", None),)
    else:
        hooks = (knobs.runtime.launch_enter_hook, knobs.runtime.launch_exit_hook)
    # triton 3.6 holds its hooks in HookChains, always there: set means a chain that holds calls
    return any(h is not None and getattr(h, "calls", True) for h in hooks)


def _current_stream() -> int:
    """The current CUDA stream of the current device, where triton launches too."""
    return torch.cuda.current_stream().cuda_stream


def launch_stream(*tensors) -> int | None:
    """The CUDA stream that :func:`relaunch` may launch kept kernels on, for launches whose
    tensors are ``tensors`` (and buffers from torch's allocator, 512-byte aligned); None where
    each launch must go through triton's run: a tensor's data not 16-byte aligned (what triton
    specialises pointers on), triton's launch hooks set (profilers read them), the CPU
    interpreter. Read once per step, not per launch (~1 us of host time each)."""
    if interpreting() or _launch_hooked() or any(t.data_ptr() % 16 for t in tensors):
        return None
    return _current_stream()


def relaunch(compiled: dict, key, kernel, grid: tuple, args: tuple, const: dict, stream: int | None) -> None:
    """``kernel[grid](*args, **const)``, past ``JITFunction.run`` when ``compiled`` holds the
    kernel for ``key`` (launchers that repeat one signature many times: the decode step).

    triton's run binds every argument, builds the specialisation key, looks the kernel up and
    checks its globals on each launch: with the CUDA launch about 30 us of host time a decode
    launch on the H200's host, where a whole graphed step takes 20-40 us of GPU time. The
    caller's ``key`` must name everything the launch is specialised on besides the tensors
    (shapes, dtypes, integer arguments, constexprs). Its first launch goes through triton's run
    (compiling, autotuning) and keeps the compiled kernel it returns in ``compiled``; later
    launches call that kernel's C launcher on ``stream`` (:func:`launch_stream` of the caller's
    inputs, once for all its launches). With ``stream`` None every launch goes through
    triton's run and nothing is kept.
    """
    hit = compiled.get(key)
    if hit is not None and stream is not None:
        ck, tail = hit
        g = (*grid, 1, 1)
        ck.run(g[0], g[1], g[2], stream, ck.function, ck.packed_metadata, None, None, None, *args, *tail)
        return
    ck = kernel[grid](*args, **const)
    if hit is None and stream is not None:
        names = (kernel.fn if isinstance(kernel, triton.runtime.autotuner.Autotuner) else kernel).arg_names
        rest = names[len(args):]
        # every parameter after the positional ones passed by name (none left to a default),
        # and a compiled kernel of the layout that triton 3.2 and later return
        if all(n in const for n in rest) and all(hasattr(ck, a) for a in ("run", "function", "packed_metadata")):
            compiled[key] = (ck, tuple(const[n] for n in rest))
