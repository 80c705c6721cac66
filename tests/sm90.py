"""Compile a Triton kernel of nsa for sm_90 on the CPU (no GPU needed) and report its resources.

Used by the spill tests: ``python tests/sm90.py '<json spec>'`` prints one JSON line
{"regs", "stack", "shared"} read from the cubin with the
cuobjdump that the triton package carries. It runs in its own process because the test files
set TRITON_INTERPRET=1, under which nothing is compiled.

spec: {"module": "nsa.triton.backward", "kernel": "_band_bwd_dq", "types": {arg: type},
       "constexprs": {arg: value}, "num_warps": 4, "num_stages": 1}
Arguments not named in types or constexprs are pointers of ``default_ptr`` (default "*bf16").
"""

from __future__ import annotations

import importlib
import json
import os
import re
import subprocess
import sys
import tempfile


def resources(spec: dict) -> dict:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fn = getattr(importlib.import_module(spec["module"]), spec["kernel"])
    if not hasattr(fn, "arg_names"):  # an autotuned kernel wraps the jitted one
        fn = fn.fn
    const, types = spec.get("constexprs", {}), spec.get("types", {})
    names = fn.arg_names
    sig = {a: "constexpr" if a in const else types.get(a, spec.get("default_ptr", "*bf16")) for a in names}
    # as the JIT specialises a launch on a GPU: 16-byte aligned pointers and integers that are
    # multiples of 16 (without these hints there are no vector loads or async copies, and the
    # register allocation differs from what runs)
    aligned = [i for i, a in enumerate(names) if sig[a].startswith("*") or sig[a] in ("i32", "i64")]
    src = ASTSource(fn=fn, signature=sig, constexprs={(names.index(k),): v for k, v in const.items()},
                    attrs={(i,): [["tt.divisibility", 16]] for i in aligned})
    k = triton.compile(src, target=GPUTarget("cuda", 90, 32),
                       options=dict(num_warps=spec.get("num_warps", 4), num_stages=spec.get("num_stages", 1)))
    cuobjdump = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(k.asm["cubin"])
        f.flush()
        out = subprocess.run([cuobjdump, "--dump-resource-usage", f.name], capture_output=True, text=True,
                             check=True).stdout

    def field(name):
        m = re.search(rf"\b{name}:(\d+)", out)
        return int(m.group(1)) if m else 0

    # STACK is the per-thread stack frame: these kernels keep no local arrays, so it is spills
    return dict(regs=field("REG"), stack=field("STACK"), shared=field("SHARED"))


def compile_sm90(spec: dict, timeout: int = 900, triton_path: str | None = None) -> dict:
    """Run :func:`resources` in a clean process (no interpreter) and return its report;
    ``triton_path``: a folder holding another triton, put first on the path."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    if triton_path:
        env["PYTHONPATH"] = os.pathsep.join([triton_path, *filter(None, [env.get("PYTHONPATH")])])
    res = subprocess.run([sys.executable, __file__, json.dumps(spec)], capture_output=True, text=True,
                         env=env, timeout=timeout)
    if res.returncode:
        raise RuntimeError(res.stderr[-3000:])
    return json.loads(res.stdout.strip().splitlines()[-1])


if __name__ == "__main__":
    print(json.dumps(resources(json.loads(sys.argv[1]))))
