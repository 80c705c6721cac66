"""C.relaunch: a repeated launch calls the kept compiled kernel's C launcher, past triton's run.

No GPU needed: a stand-in kernel records how it was launched (the CPU tensors have addresses
like device tensors). The GPU side (kernels launched this way equal the reference) is
tests/test_triton.py::test_gpu_decode_relaunch_equals_first_launch.
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

pytest.importorskip("triton")

from nsa.triton import _common as C  # noqa: E402


class _Compiled:
    function, packed_metadata = "fn-handle", "meta"

    def __init__(self):
        self.calls = []

    def run(self, *a):
        self.calls.append(a)


class _Kernel:
    """kernel[grid](*args, **const) as triton's JITFunction, with its parameter names."""

    def __init__(self, arg_names):
        self.arg_names, self.compiled, self.launches = arg_names, _Compiled(), []

    def __getitem__(self, grid):
        def launch(*args, **const):
            self.launches.append((grid, args, const))
            return self.compiled
        return launch


@pytest.fixture
def gpu_like(monkeypatch):
    monkeypatch.setattr(C, "interpreting", lambda: False)
    monkeypatch.setattr(C, "_current_stream", lambda: 1234)
    monkeypatch.setattr(C, "_launch_hooked", lambda: False)
    return monkeypatch


def test_second_launch_goes_to_the_c_launcher_with_every_parameter_in_order(gpu_like):
    k = _Kernel(["X", "Y", "n", "A", "B"])
    x, y = torch.zeros(64), torch.zeros(32)
    store = {}
    C.relaunch(store, "key", k, (3, 2), (x, y, 7), dict(B=2, A=1), C.launch_stream(x, y))
    assert len(k.launches) == 1 and not k.compiled.calls
    x2 = torch.ones(64)
    C.relaunch(store, "key", k, (3, 2), (x2, y, 7), dict(B=2, A=1), C.launch_stream(x2, y))
    assert len(k.launches) == 1  # not through triton's run again
    (call,) = k.compiled.calls
    assert call[:8] == (3, 2, 1, 1234, "fn-handle", "meta", None, None)
    assert call[8] is None and call[9] is x2 and call[10] is y
    assert call[11:] == (7, 1, 2)  # the constexprs in parameter order, not keyword order


def test_unaligned_tensors_hooks_and_other_keys_take_triton_s_run(gpu_like):
    k = _Kernel(["X", "n", "A"])
    store = {}
    x = torch.zeros(64)
    C.relaunch(store, "key", k, (1,), (x, 5), dict(A=1), C.launch_stream(x))
    odd = torch.zeros(65)[1:]
    assert C.launch_stream(x) == 1234 and C.launch_stream(x, odd) is None
    C.relaunch(store, "key", k, (1,), (odd, 5), dict(A=1), C.launch_stream(odd))  # unaligned: triton's run
    C.relaunch(store, "other", k, (1,), (x, 5), dict(A=1), 1234)  # another key: triton's run
    gpu_like.setattr(C, "_launch_hooked", lambda: True)
    assert C.launch_stream(x) is None
    C.relaunch(store, "key", k, (1,), (x, 5), dict(A=1), C.launch_stream(x))  # a profiler's hooks: triton's run
    assert len(k.launches) == 4 and not k.compiled.calls


def test_nothing_kept_when_first_launch_is_unaligned_or_a_parameter_is_left_to_its_default(gpu_like):
    k = _Kernel(["X", "n", "A", "B"])
    store = {}
    odd = torch.zeros(65)[1:]
    C.relaunch(store, "key", k, (1,), (odd, 5), dict(A=1, B=2), C.launch_stream(odd))
    C.relaunch(store, "k2", k, (1,), (torch.zeros(64), 5), dict(A=1), 1234)  # B left to a default
    assert store == {}


def test_hooks_count_only_when_a_chain_holds_calls():
    import triton

    knobs = getattr(triton, "knobs", None)
    if knobs is None or not hasattr(knobs.runtime.launch_enter_hook, "calls"):
        pytest.skip("this triton keeps its launch hooks in no HookChain")
    assert not C._launch_hooked()  # triton's chains are always there, empty
    hook = lambda *a: None  # noqa: E731
    knobs.runtime.launch_enter_hook.add(hook)
    try:
        assert C._launch_hooked()
    finally:
        knobs.runtime.launch_enter_hook.remove(hook)


def test_interpreter_never_keeps_a_kernel(monkeypatch):
    monkeypatch.setattr(C, "interpreting", lambda: True)
    k = _Kernel(["X", "A"])
    store = {}
    x = torch.zeros(64)
    assert C.launch_stream(x) is None
    for _ in range(2):
        C.relaunch(store, "key", k, (1,), (x,), dict(A=1), C.launch_stream(x))
    assert store == {} and len(k.launches) == 2
