"""What every part of the GPU kit shares: constants, the run's state (Kit, Budget), the Triton mode switch, small helpers."""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch


ROOT = Path(__file__).resolve().parents[2]  # the repository root

SECTIONS = ("parity", "bad_inputs", "sampler", "bench", "e2e", "sanitizer")

# Seconds per section. The GPU run must fit in 8 minutes on an H200 with imports and the env
# section (the extension build of --build is extra): 85 + 45 + 30 + 100 + 150 + 50 = 460 s.
BUDGET_GPU = {"parity": 85, "bad_inputs": 45, "sampler": 30, "bench": 100, "e2e": 150, "sanitizer": 50}

# The CPU dry run (2 shared cores; whole run under 5 minutes).
BUDGET_DRY = {"parity": 70, "bad_inputs": 45, "sampler": 25, "bench": 25, "e2e": 60, "sanitizer": 45}

CHILD_TAG = "GPU_CHECK_CHILD "

DIFFUSERS_HINT = (
    "diffusers is not importable. On an offline box bring the wheels (benchmarks/README.md, "
    "'GPU proof kit'): diffusers-0.42.1-py3-none-any.whl, importlib_metadata-10.2.0-py3-none-any.whl, "
    "lazy_importer-0.1.0-py3-none-any.whl, zipp-4.1.2-py3-none-any.whl, then `python -m pip install --no-index "
    "--find-links wheels/ diffusers==0.42.1` (or `--no-deps --target /tmp/site wheels/*.whl` and PYTHONPATH=/tmp/site)."
)



def _interpret_on() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")



def _prepare_env(dry: bool, reexec_argv: list[str] | None) -> None:
    """Make TRITON_INTERPRET match the mode (on for --dry-run, off on the GPU) before the kernels are defined.

    Triton reads the switch when a ``@triton.jit`` function is defined, i.e. when
    ``jit_kernels`` is imported. If it already was in the other mode, re-execute this command
    (``reexec_argv``) with the switch set, or raise when called as a function.
    """
    if _interpret_on() == dry:
        return
    want = "1" if dry else "0"
    common = sys.modules.get("jit_kernels.triton.common")
    if "jit_kernels" not in sys.modules or (common is not None and bool(common.INTERPRET) == dry):
        os.environ["TRITON_INTERPRET"] = want
        return
    if reexec_argv is None:
        raise RuntimeError(f"jit_kernels was imported with TRITON_INTERPRET={os.environ.get('TRITON_INTERPRET')!r}; "
                           f"the {'dry' if dry else 'GPU'} run needs {want}: run the kit in a fresh process")
    env = dict(os.environ, TRITON_INTERPRET=want)
    os.execve(sys.executable, [sys.executable, "-m", "benchmarks.gpu_check", *reexec_argv], env)



class Budget:
    def __init__(self, seconds: float):
        self.seconds = float(seconds)
        self.start = time.perf_counter()

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def left(self) -> float:
        return self.seconds - self.elapsed()

    def over(self) -> bool:
        return self.left() <= 0



@dataclass
class Kit:
    out: Path
    dry: bool
    small: bool
    device: str
    backends: list[str]
    args: argparse.Namespace
    t0: float = field(default_factory=time.perf_counter)
    failures: list[str] = field(default_factory=list)
    result: dict = field(default_factory=dict)

    def log(self, msg: str) -> None:
        print(f"[{time.perf_counter() - self.t0:7.1f}s] {msg}", flush=True)

    def fail(self, section: str, msg: str) -> None:
        self.failures.append(f"{section}: {msg}")
        self.log(f"FAIL {section}: {msg}")

    def stand_in(self, backend: str) -> str | None:
        """The GPU backend a CPU backend stands in for in the dry run."""
        return "cuda" if self.dry and backend == "cpp" else None

    def sync(self) -> None:
        if self.device == "cuda":
            torch.cuda.synchronize()



def _dname(dt) -> str:
    """A dtype's short name (``float32``) for rows and reports."""
    return str(dt).replace("torch.", "")


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)



@contextlib.contextmanager
def _exact_fp32():
    """fp32 matmuls and convolutions in full fp32 (no TF32) while parity is judged at fp32 tolerances.

    cuDNN may run fp32 convolutions in TF32 by default (about 1e-3 off); the package's own
    reference avoids them, but torch code a check compares against must not depend on the default.
    """
    saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved



@contextlib.contextmanager
def _quiet_fd2():
    """Silence C++ writes to stderr (the profiler's per-window log lines); replayed if the block raises."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile(mode="w+b") as tmp:
        os.dup2(tmp.fileno(), 2)
        ok = False
        try:
            yield
            ok = True
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            if not ok:
                tmp.seek(0)
                sys.stderr.write(tmp.read().decode(errors="replace")[-4000:])



def _text(out) -> str:
    """A subprocess stream as text (a timeout's partial output is bytes even with ``text=True``)."""
    if out is None:
        return ""
    return out.decode(errors="replace") if isinstance(out, bytes) else out
