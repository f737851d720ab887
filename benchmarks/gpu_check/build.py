"""The --build step: ``python setup.py build_ext --inplace`` with the CUDA kernels for the local GPU."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import torch

from .common import ROOT, _text


def build_command(arch: str | None) -> str:
    jobs = os.cpu_count() or 4
    return (f"TORCH_CUDA_ARCH_LIST={arch or '9.0'} MAX_JOBS={jobs} JIT_KERNELS_CUDA=1 "
            f"python setup.py build_ext --inplace   # from {ROOT}")



def _torch_cuda_home() -> str | None:
    """torch's guess of the CUDA toolkit (from CUDA_HOME / CUDA_PATH, else ``nvcc`` on PATH)."""
    try:
        from torch.utils.cpp_extension import CUDA_HOME
    except Exception:
        return None
    return CUDA_HOME



def _toolkit_dirs() -> list[str]:
    """The usual CUDA toolkit folders: ``/usr/local/cuda``, then ``/usr/local/cuda-*`` by name."""
    return ["/usr/local/cuda", *sorted(str(p) for p in Path("/usr/local").glob("cuda-*"))]



def _cuda_home_with_runtime() -> str | None:
    """A CUDA_HOME whose ``lib64`` holds libcudart, when torch's own guess lacks it.

    torch guesses CUDA_HOME from ``nvcc`` on PATH; where that is a wrapper (``/usr/local/bin/nvcc``)
    the guess is ``/usr/local`` and the link fails on ``-lcudart`` after the whole compile.
    """
    if os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH"):
        return None

    def has_runtime(d):
        return d is not None and any((Path(d) / "lib64").glob("libcudart.so*"))

    if has_runtime(_torch_cuda_home()):
        return None
    for cand in _toolkit_dirs():
        if has_runtime(cand) and (Path(cand) / "bin" / "nvcc").exists():
            return cand
    return None



def run_build(dry: bool, timeout: float | None = None) -> dict:
    """``python setup.py build_ext --inplace`` for this machine (the CUDA kernels for the local GPU)."""
    env = dict(os.environ)
    if not dry and torch.cuda.is_available():
        major, minor = torch.cuda.get_device_capability()
        env.setdefault("TORCH_CUDA_ARCH_LIST", f"{major}.{minor}")
        env["JIT_KERNELS_CUDA"] = "1"
        home = _cuda_home_with_runtime()
        if home:
            env["CUDA_HOME"] = home
            env["PATH"] = f"{home}/bin{os.pathsep}{env.get('PATH', '')}"
    env.setdefault("MAX_JOBS", str(os.cpu_count() or 4))
    t = time.perf_counter()
    try:
        p = subprocess.run([sys.executable, "setup.py", "build_ext", "--inplace"], cwd=ROOT, env=env,
                           capture_output=True, text=True, timeout=timeout)
        rc, log = p.returncode, p.stdout + p.stderr
    except subprocess.TimeoutExpired as exc:
        rc, log = "timeout", f"the build ran past {timeout:.0f}s: " + _text(exc.stdout)[-2000:]
    return {"rc": rc, "seconds": round(time.perf_counter() - t, 1), "CUDA_HOME": env.get("CUDA_HOME"),
            "TORCH_CUDA_ARCH_LIST": env.get("TORCH_CUDA_ARCH_LIST"), "log_tail": log[-3000:]}
