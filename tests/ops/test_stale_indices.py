"""Stale indices: no index value, however it got there, makes a kernel touch memory outside its tensors.

tests/ops/_stale_worker.py validates every index argument of every op with a valid call, then writes
an invalid value into it behind torch's back (``.data``, a ``set_`` alias, ``.numpy()``, DLPack:
none of them bumps the version counter) and calls again with the same tensors. Each backend and
route of calling runs in its own subprocess, so a segfault fails one test and names the case.

Expected: 0 crashes, 0 writes outside an in-place target (canary margins intact), 0 changes to
the inputs; the public functions (every call checks the values: no cache) and the C++ CPU kernels
(every index is checked where it is read, also on the trusted path) raise ``IndexError`` /
``ValueError``; the Triton kernels, which cannot raise from the device, mask the bad index and
never read or write outside their tensors.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

import jit_kernels as jk
from jit_kernels.testing import compiled_backends

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
WORKER = os.path.join(ROOT, "tests", "ops", "_stale_worker.py")
BACKENDS = ["reference"] + compiled_backends("cpu")


def _run(backend: str, mode: str) -> list[dict]:
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, WORKER, backend, mode], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=900)
    lines = [json.loads(x) for x in proc.stdout.splitlines() if x.startswith("{")]
    started = [x["start"] for x in lines if "start" in x]
    finished = [x for x in lines if "case" in x]
    if proc.returncode != 0 or not any(x.get("done") for x in lines):
        last = started[-1] if started else None
        pytest.fail(f"{backend}/{mode}: the worker died (exit {proc.returncode}) in case {last!r} after "
                    f"{len(finished)} cases\n{proc.stderr[-3000:]}")
    assert len(finished) == len(started) and finished
    return finished


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["public", "kernel", "trusted"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_stale_indices_never_crash_nor_write_outside(backend, mode):
    if mode == "kernel" and backend == "reference":
        pytest.skip("the reference backend has no kernel of its own (plain torch indexing)")
    results = _run(backend, mode)
    bad = [r for r in results if not (r["valid_call_ok"] and r["canary_ok"] and r["inputs_ok"])]
    assert not bad, bad[:5]
    raised = {r["outcome"] for r in results}
    assert raised <= {"IndexError", "ValueError", "RuntimeError", "returned"}, raised
    if mode == "public" or backend == "cpp":
        # Checked on the host (public: every call) or where the kernel reads the index (C++): a clear error.
        wrong = [r for r in results if r["outcome"] not in ("IndexError", "ValueError")]
        assert not wrong, wrong[:5]


def test_every_op_with_an_index_argument_is_covered():
    # A new op with an index argument must join the corpus.
    from tests.ops._stale_worker import cases

    covered = {name.split("/")[0] for name, _ in cases("reference")}
    with_index = {name for name in jk.__all__ if name in (
        "gather_tokens", "scatter_tokens", "scatter_tokens_", "nearest_anchor_map", "lift_field", "lift_euler_",
        "select_new_tokens", "microflow_update", "microflow_update_", "microflow_target", "anchor_attention")}
    assert with_index == covered
