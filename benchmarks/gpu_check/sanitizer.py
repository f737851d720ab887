"""Section ``sanitizer``: ``compute-sanitizer --tool memcheck`` over ``--section parity --small`` in a child."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from .build import _toolkit_dirs, _torch_cuda_home
from .common import BUDGET_DRY, BUDGET_GPU, Budget, Kit, ROOT, _text


def _find_sanitizer() -> str | None:
    """compute-sanitizer on PATH, else beside the CUDA toolkit (it is often not on PATH)."""
    exe = shutil.which("compute-sanitizer")
    if exe:
        return exe
    homes = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), _torch_cuda_home(), *_toolkit_dirs()]
    for home in homes:
        if home and (Path(home) / "bin" / "compute-sanitizer").is_file():
            return str(Path(home) / "bin" / "compute-sanitizer")
    return None



def _sanitizer_errors(log: str) -> int | None:
    """The error count of memcheck's last ``ERROR SUMMARY: N error(s)`` line, or None without one."""
    import re

    found = re.findall(r"ERROR SUMMARY:\s*(\d+)\s+error", log)
    return int(found[-1]) if found else None



def section_sanitizer(kit: Kit, budget: Budget) -> dict:
    exe = _find_sanitizer()
    sub = kit.out / "sanitizer"
    # The child plans its parity run inside this budget (memcheck slows kernels down many times over).
    child_scale = max(0.05, 0.7 * budget.seconds / (BUDGET_DRY if kit.dry else BUDGET_GPU)["parity"])
    cmd = [sys.executable, "-m", "benchmarks.gpu_check", "--section", "parity", "--small", "--out", str(sub),
           "--budget-scale", f"{child_scale:.3f}"]
    if kit.dry:
        cmd.append("--dry-run")
        wrap = []
        note = "dry run: the parity subset in a child process without compute-sanitizer (CPU)"
    elif exe is None:
        return {"status": "skipped: compute-sanitizer not found (PATH, $CUDA_HOME/bin, /usr/local/cuda/bin)"}
    else:
        wrap = [exe, "--tool", "memcheck", "--error-exitcode", "3", "--print-limit", "20", "--target-processes", "all"]
        note = "compute-sanitizer --tool memcheck over --section parity --small"
    sub.mkdir(parents=True, exist_ok=True)
    t = time.perf_counter()
    # Without PyTorch's caching allocator every tensor is its own cudaMalloc, so memcheck sees
    # an access past a tensor's end (inside a cached block it would be in bounds).
    env = dict(os.environ, PYTORCH_NO_CUDA_MEMORY_CACHING="1")
    # A session of its own, so a timeout ends the Python child too (not only compute-sanitizer).
    proc = subprocess.Popen(wrap + cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    try:
        log, _ = proc.communicate(timeout=max(5.0, budget.left()))
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, 9)
        log, _ = proc.communicate()
        (sub / "log.txt").write_text(_text(log))
        return {"status": f"incomplete: timed out after {budget.seconds:.0f}s (budget)", "command": " ".join(wrap + cmd),
                "error_summary": _sanitizer_errors(_text(log))}
    log = _text(log)
    (sub / "log.txt").write_text(log)
    res = {"command": " ".join(wrap + cmd), "note": note, "rc": proc.returncode,
           "seconds": round(time.perf_counter() - t, 1), "log": str(sub / "log.txt")}
    summary = [ln for ln in log.splitlines() if "ERROR SUMMARY" in ln]
    res["error_summary"] = summary[-1].strip() if summary else None
    errors = _sanitizer_errors(log)
    try:
        child = json.loads((sub / "gpu_check.json").read_text())
        res["parity_records"] = len(child.get("parity", []))
        res["parity_failed"] = sum(1 for r in child.get("parity", []) if not r.get("ok"))
    except (OSError, ValueError):
        child = None
    if wrap and ("Device not supported" in log or "Unable to find injection" in log):
        res["status"] = "skipped: compute-sanitizer cannot run on this machine (" + \
                        next((ln.strip() for ln in log.splitlines() if "Device not supported" in ln or "injection" in ln), "") + ")"
        return res
    if wrap:
        # The verdict is memcheck's: its error count (or its exit code 3). Parity mismatches of the
        # child are the parity section's business and are only reported here.
        if proc.returncode == 3 or (errors or 0) > 0:
            res["status"] = "failed"
            kit.fail("sanitizer", f"memcheck: {res['error_summary']} (rc {proc.returncode}), tail: {log[-400:]}")
        elif errors == 0:
            res["status"] = "ok"
        else:
            res["status"] = f"incomplete: no ERROR SUMMARY from compute-sanitizer (rc {proc.returncode})"
    elif proc.returncode != 0 or child is None:
        res["status"] = "failed"
        kit.fail("sanitizer", f"the child run failed (rc {proc.returncode}), tail: {log[-400:]}")
    else:
        res["status"] = "ok"
    return res
