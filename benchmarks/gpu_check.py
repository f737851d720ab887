"""GPU proof kit: one command that checks and times jit_kernels and jit_sampler on a CUDA machine.

    python -m benchmarks.gpu_check --out DIR                    # a CUDA machine (sized for 8 minutes on an H200)
    python -m benchmarks.gpu_check --out DIR --build            # first build jit_kernels._C for this GPU
    python -m benchmarks.gpu_check --out DIR --section parity   # one section (env always runs)
    python -m benchmarks.gpu_check --out DIR --dry-run          # the same code paths on CPU, tiny shapes

Sections, in run order (each with a time budget; a section that runs out of budget stops
early and says how much it left out; ``--budget-scale`` stretches every budget):

- ``env``: versions, the GPU, and that the ``cuda`` and ``triton`` backends are there (with
  the build command for this GPU when ``jit_kernels._C`` lacks its CUDA kernels).
- ``parity``: every public op on ``cuda`` and compiled ``triton`` against ``reference``:
  fp32 / fp16 / bf16, shared and per-sample indices, strided inputs, odd grids (7 x 13, 1 x 17,
  9 x 1, a grid smaller than the blur radius), 64 x 64 at B = 1 and 8, 128 x 128, nearest-map
  ties under permuted anchor lists, in-place ops on strided destinations, and anchor attention
  at 512 + 1310 and 512 + 4096 tokens with 24 x 128 heads, with and without ``key_lengths``.
  Index ops and copies must be bit-exact; the rest within :func:`jit_kernels.testing.tolerance`.
- ``bad_inputs``: invalid calls on the device, each in a child process (an out-of-bounds write
  can poison a CUDA context): the exception type, then a healthy context and a clean exit.
- ``sampler``: ``jit_sample`` with a small velocity function: kernel launches per step
  (torch.profiler), host syncs per step (``torch.cuda.set_sync_debug_mode``: counted with
  ``"warn"``, then ``"error"`` on the steps between stage transitions, which must not sync),
  and index-validation passes per step (``jit_kernels.validation_passes``; zero between
  transitions).
- ``bench``: first the lift family under ``JIT_KERNELS_LIFT_VARIANT=v1`` and ``v2`` (the A/B of the
  kernel changes, outputs compared bit for bit); then every op timed with ``triton.testing.do_bench``
  (quantiles 0.2 / 0.5 / 0.8) against the plain torch composition (benchmarks/cases.py) and the copy
  bandwidth measured in the same run; anchor attention against rotary + SDPA (benchmarks/bench_attention.py).
- ``e2e``: a ``diffusers.FluxTransformer2DModel`` with FLUX.1-dev's real configuration and
  random bf16 weights made on the GPU, 1024 x 1024 (4096 image + 512 text tokens): dense 50
  steps vs JiT 4x / 7x / reference, with and without the fused anchor attention, through
  ``jit_sample`` + ``FluxVelocity``: wall and transformer time, FLOP ratios, sampler overhead.
  ``--e2e-steps K`` times K dense steps and extrapolates to 50 (default: as many as fit).
- ``sanitizer``: ``compute-sanitizer --tool memcheck`` over ``--section parity --small`` in a
  child process, when ``compute-sanitizer`` is on PATH.

Writes ``DIR/gpu_check.json`` (keys ``ok``, ``env``, ``parity``, ``sampler``, ``syncs``, ``bench``,
``e2e``, ``bad_inputs``, ``sanitizer``, ``sections``, ``failures``, ``known_issues``; rewritten
after every section, so a killed run leaves what it had) and ``DIR/gpu_check.md``; exits 1 on any
failure.

``--dry-run`` runs the same code on CPU with tiny shapes: Triton through its interpreter
(``TRITON_INTERPRET=1``, set before jit_kernels is imported), ``cpp`` standing in for
``cuda``, a 2 + 2 block FLUX at a 16 x 16 grid, a CPU timer for ``do_bench``, and
validation passes per step where the GPU run counts syncs. It proves the kit runs, not the GPU.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

ROOT = Path(__file__).resolve().parent.parent
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

# Differences between backends that are known and reported (not failures of the kit); a key
# is (op, probe). When the behaviour becomes consistent, the record says so.
# (op, probe) -> a disagreement between backends known and tolerated (recorded, not a failure).
# Empty: the strided-destination disagreement of lift_euler_ / microflow_update_ was fixed in
# the hardening merge, so any disagreement now fails the kit.
KNOWN_ISSUES: dict[tuple[str, str], str] = {}


# ---------------------------------------------------------------- environment (before jit_kernels is imported)


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


# ---------------------------------------------------------------- the kit's state


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


# ---------------------------------------------------------------- env section


def build_command(arch: str | None) -> str:
    jobs = os.cpu_count() or 4
    return (f"TORCH_CUDA_ARCH_LIST={arch or '9.0'} MAX_JOBS={jobs} JIT_KERNELS_CUDA=1 "
            f"python setup.py build_ext --inplace   # from {ROOT}")


def _text(out) -> str:
    """A subprocess stream as text (a timeout's partial output is bytes even with ``text=True``)."""
    if out is None:
        return ""
    return out.decode(errors="replace") if isinstance(out, bytes) else out


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


def _backends_under_test(device: str) -> list[str]:
    import jit_kernels as jk

    want = ("cuda", "triton") if device == "cuda" else ("cpp", "triton")
    have = jk.available_backends(device)
    return [b for b in want if b in have]


def section_env(kit: Kit) -> dict:
    import jit_kernels as jk
    from benchmarks.env import environment

    env = environment()
    env.update(dry_run=kit.dry, device=kit.device, triton_interpret=_interpret_on(),
               command=" ".join(["python", "-m", "benchmarks.gpu_check", *kit.args.argv]))
    if kit.device == "cuda":
        major, minor = torch.cuda.get_device_capability()
        arch = f"{major}.{minor}"
        props = torch.cuda.get_device_properties(0)
        env.update(gpu_arch=f"sm_{major}{minor}", gpu_memory_GiB=round(props.total_memory / 2**30, 1),
                   gpu_sms=props.multi_processor_count, cuda=torch.version.cuda,
                   compute_sanitizer=_find_sanitizer() or "absent", nvcc=shutil.which("nvcc") or "absent")
        have = jk.available_backends("cuda")
        env["backends_cuda"] = have
        if "cuda" not in have:
            why = jk.extension_error() or "the extension was built without CUDA kernels"
            kit.fail("env", f"backend 'cuda' missing: jit_kernels._C has no CUDA kernels ({why}). "
                            f"Build them for this GPU: {build_command(arch)} -- or rerun with --build")
        if "triton" not in have:
            kit.fail("env", "backend 'triton' missing for CUDA tensors (triton not importable, or jit_kernels.triton "
                            "failed to import: see the log)")
        kit.backends = _backends_under_test("cuda")
    else:
        have = jk.available_backends("cpu")
        env["backends_cpu"] = have
        for b in ("cpp", "triton"):
            if b not in have:
                kit.fail("env", f"backend {b!r} missing on CPU"
                         + (f" ({jk.extension_error()})" if b == "cpp" else " (triton not importable or TRITON_INTERPRET unset)"))
        kit.backends = _backends_under_test("cpu")
        env["stand_in"] = "cpp stands in for cuda; triton runs in its interpreter"
    env["backends_under_test"] = kit.backends
    return env


# ---------------------------------------------------------------- parity


@dataclass
class PCase:
    op: str
    shape: str
    dtype: str
    run: Callable[[str], torch.Tensor]  # backend -> result
    exact: bool
    tol_dtype: torch.dtype = torch.float32
    kind: str = "op"


@dataclass
class Spec:
    """One family of parity inputs: a grid and batch with one anchor count and index layout."""

    h: int
    w: int
    b: int
    c: int
    ratio: float = 0.32
    per_sample: bool = False
    strided: bool = False
    dtypes: tuple = (torch.float32, torch.float16, torch.bfloat16)
    m: int | None = None
    note: str = ""

    def label(self, m: int) -> str:
        parts = [f"{self.h}x{self.w} B={self.b} C={self.c} M={m}", "per-sample" if self.per_sample else "shared"]
        if self.strided:
            parts.append("strided")
        if self.note:
            parts.append(self.note)
        return " ".join(parts)


F32, F16, BF16 = torch.float32, torch.float16, torch.bfloat16
ALL = (F32, F16, BF16)


def parity_plan(dry: bool, small: bool) -> tuple[list[Spec], list[dict]]:
    """(token-op specs, attention configs), most important first (a budget cut drops the tail)."""
    if small:  # the compute-sanitizer subset: every op, small shapes
        specs = [Spec(7, 13, 2, 16, dtypes=(F32, BF16)), Spec(7, 13, 2, 16, per_sample=True, dtypes=(F32, BF16)),
                 Spec(16, 16, 2, 32, dtypes=(F32,)), Spec(3, 4, 2, 8, m=1, dtypes=(F32,), note="grid < blur radius")]
        attn = [dict(text=16, img=48, heads=2, dim=32, b=1, dtypes=(F32, BF16)),
                dict(text=16, img=48, heads=2, dim=32, b=2, dtypes=(BF16,), lengths=True)]
        return specs, attn
    big = 16 if dry else 64
    huge = 24 if dry else 128
    cb = 16 if dry else 64
    specs = [
        Spec(7, 13, 2, 16), Spec(7, 13, 2, 16, per_sample=True),
        Spec(big, big, 1, cb), Spec(big, big, 1, cb, per_sample=True, dtypes=(BF16, F32)),
        Spec(1, 17, 2, 16), Spec(1, 17, 2, 16, per_sample=True),
        Spec(9, 1, 2, 16), Spec(9, 1, 2, 16, per_sample=True),
        Spec(3, 4, 2, 8, m=1, note="grid < blur radius"), Spec(3, 4, 2, 8, m=2, per_sample=True, note="grid < blur radius"),
        Spec(7, 13, 2, 16, strided=True), Spec(7, 13, 2, 16, per_sample=True, strided=True, dtypes=(F32, BF16)),
        Spec(big, big, 8, cb, dtypes=(BF16, F32)), Spec(big, big, 8, cb, per_sample=True, dtypes=(BF16,)),
        Spec(huge, huge, 1, cb, dtypes=(BF16, F32)),
        Spec(big, big, 2, cb, strided=True, dtypes=(BF16,)),
        Spec(7, 13, 2, 16, ratio=1.0, dtypes=(F32,), note="every token an anchor"),
    ]
    if dry:
        attn = [dict(text=8, img=24, heads=2, dim=32, b=1, dtypes=(F32, BF16)),
                dict(text=8, img=24, heads=2, dim=32, b=2, dtypes=(BF16, F32), lengths=True),
                dict(text=8, img=40, heads=2, dim=32, b=1, dtypes=(F16,), strided=True)]
    else:
        attn = [dict(text=512, img=1310, heads=24, dim=128, b=1, dtypes=(BF16,)),
                dict(text=512, img=4096, heads=24, dim=128, b=1, dtypes=(BF16,)),
                dict(text=512, img=1310, heads=24, dim=128, b=2, dtypes=(BF16,), lengths=True),
                dict(text=512, img=4096, heads=24, dim=128, b=2, dtypes=(BF16,), lengths=True),
                dict(text=512, img=1310, heads=24, dim=128, b=1, dtypes=(F16, F32)),
                dict(text=512, img=1310, heads=24, dim=128, b=1, dtypes=(BF16,), strided=True)]
    return specs, attn


def _strided_copy(t: torch.Tensor) -> torch.Tensor:
    """The same values as ``t [B, N, C]`` in a channel-strided view (stride 2 on C)."""
    buf = torch.zeros(*t.shape[:-1], 2 * t.shape[-1], dtype=t.dtype, device=t.device)
    buf[..., ::2] = t
    return buf[..., ::2]


def _inactive(a: torch.Tensor, n: int, r: int, seed: int) -> torch.Tensor:
    """``r`` tokens not in ``a`` (``[M]`` or ``[B, M]``, on CPU), in random order."""
    def row(ai, s):
        mask = torch.ones(n, dtype=torch.bool)
        mask[ai] = False
        free = mask.nonzero().squeeze(1)
        return free[torch.randperm(free.numel(), generator=_gen(s))[:r]]

    return row(a, seed) if a.dim() == 1 else torch.stack([row(ai, seed + i) for i, ai in enumerate(a)])


def _dname(dt) -> str:
    return str(dt).replace("torch.", "")


def token_cases(spec: Spec, dev: str) -> list[PCase]:
    """Every token op on one spec, for each of its dtypes (dtype-free ops once)."""
    import jit_kernels as jk
    from jit_kernels.testing import anchors, tokens

    h, w, b, c = spec.h, spec.w, spec.b, spec.c
    n = h * w
    m = spec.m if spec.m is not None else max(1, min(n, round(n * spec.ratio)))
    a_cpu = anchors(n, m, batch=b if spec.per_sample else None)
    r = (n - m) // 2 if n - m >= 2 else n - m
    new_cpu = _inactive(a_cpu, n, r, seed=11) if r > 0 else None
    a = a_cpu.to(dev)
    new = new_cpu.to(dev) if new_cpu is not None else None
    near = jk.nearest_anchor_map(a, h, w, backend="reference")
    label = spec.label(m)
    cases: list[PCase] = []

    def maybe_strided(t):
        return _strided_copy(t) if spec.strided else t

    cases.append(PCase("nearest_anchor_map", label, "int64", lambda be: jk.nearest_anchor_map(a, h, w, backend=be), True))
    for i, dt in enumerate(spec.dtypes):
        dn = _dname(dt)
        x = maybe_strided(tokens(b, n, c, dt, seed=1, device=dev))
        vals = maybe_strided(tokens(b, m, c, dt, seed=2, device=dev))
        src = maybe_strided(tokens(b, m, c, dt, seed=3, device=dev))
        ybase = tokens(b, n, c, dt, seed=4, device=dev)  # in-place destinations stay contiguous (probe below)
        v_prev = maybe_strided(tokens(b, n, c, dt, seed=5, offset=0.0, device=dev))
        cases += [
            PCase("gather_tokens", label, dn, lambda be, x=x: jk.gather_tokens(x, a, backend=be), True),
            PCase("scatter_tokens", label, dn, lambda be, x=x, src=src: jk.scatter_tokens(x, a, src, backend=be), True),
            PCase("scatter_tokens_", label, dn,
                  lambda be, y=ybase, src=src: jk.scatter_tokens_(y.clone(), a, src, backend=be), True),
            PCase("lift_field", label, dn,
                  lambda be, v=vals: jk.lift_field(v, a, h, w, nearest=near, backend=be), False, dt),
            PCase("lift_euler_", label, dn,
                  lambda be, y=ybase, v=vals: jk.lift_euler_(y.clone(), v, a, h, w, -0.05, nearest=near, backend=be),
                  False, dt),
            PCase("token_importance", label, dn, lambda be, x=x: jk.token_importance(x, h, w, backend=be), False, dt),
        ]
        if i == 0:
            cases.append(PCase("lift_field", label + " map=internal", dn,
                               lambda be, v=vals: jk.lift_field(v, a, h, w, backend=be), False, dt))
        if new is not None:
            target = maybe_strided(tokens(b, r, c, dt, seed=6, device=dev))
            eps = maybe_strided(tokens(b, r, c, dt, seed=7, offset=0.0, device=dev))
            cases += [
                PCase("microflow_update_", label + " assign", dn,
                      lambda be, y=ybase, t=target: jk.microflow_update_(y.clone(), new, t, backend=be), True),
                PCase("microflow_update_", label + " blend 1/3", dn,
                      lambda be, y=ybase, t=target: jk.microflow_update_(y.clone(), new, t, "blend", 1 / 3, backend=be),
                      False, dt),
                PCase("microflow_update", label + " assign", dn,
                      lambda be, y=ybase, t=target: jk.microflow_update(y, new, t, backend=be), True),
                PCase("microflow_target", label, dn,
                      lambda be, x=x, vp=v_prev, e=eps: jk.microflow_target(x, vp, a, new, e, 0.8, 0.7, h, w,
                                                                            nearest=near, backend=be), False, dt),
            ]
        if i == 0 and new is not None:
            imp = jk.token_importance(x, h, w, backend="reference")
            tied = (imp * 2).round() / 2  # many equal scores: ties go to the lower token index
            cases += [
                PCase("select_new_tokens", label, "float32", lambda be: jk.select_new_tokens(imp, a, r, backend=be), True),
                PCase("select_new_tokens", label + " ties", "float32",
                      lambda be: jk.select_new_tokens(tied, a, r, backend=be), True),
            ]
    return cases


def tie_cases(dev: str) -> list[PCase]:
    """Nearest-anchor ties under permuted anchor lists (ties go to the anchor listed first)."""
    import jit_kernels as jk
    from jit_kernels.testing import tokens

    cases = []
    # 8 x 8 grid, anchors on the even lattice: odd cells are equidistant to 2 or 4 anchors.
    lattice = torch.tensor([r * 8 + c for r in range(0, 8, 2) for c in range(0, 8, 2)])
    perms = [lattice[torch.randperm(lattice.numel(), generator=_gen(s))] for s in range(3)]
    for s, p in enumerate(perms):
        a = p.to(dev)
        vals = tokens(2, a.numel(), 8, seed=s, device=dev)
        cases.append(PCase("nearest_anchor_map", f"8x8 lattice ties perm {s}", "int64",
                           lambda be, a=a: jk.nearest_anchor_map(a, 8, 8, backend=be), True))
        cases.append(PCase("lift_field", f"8x8 lattice ties perm {s} map=internal", "float32",
                           lambda be, a=a, v=vals: jk.lift_field(v, a, 8, 8, backend=be), False))
    ab = torch.stack(perms).to(dev)
    vb = tokens(3, ab.shape[1], 8, seed=9, device=dev)
    cases.append(PCase("nearest_anchor_map", "8x8 lattice ties per-sample (3 perms)", "int64",
                       lambda be: jk.nearest_anchor_map(ab, 8, 8, backend=be), True))
    cases.append(PCase("lift_field", "8x8 lattice ties per-sample (3 perms) map=internal", "float32",
                       lambda be: jk.lift_field(vb, ab, 8, 8, backend=be), False))
    # 3 x 3 grid, the four corners: the centre is equidistant to all four; all 24 orders as a batch.
    import itertools

    corners = [0, 2, 6, 8]
    a24 = torch.tensor(list(itertools.permutations(corners))).to(dev)
    cases.append(PCase("nearest_anchor_map", "3x3 four-way tie, all 24 orders per-sample", "int64",
                       lambda be: jk.nearest_anchor_map(a24, 3, 3, backend=be), True))
    return cases


def attention_cases(cfg: dict, dev: str) -> list[PCase]:
    import jit_kernels as jk
    from benchmarks.bench_attention import AXES, anchor_ids, rope_tables
    from jit_kernels.testing import qkv

    text, img, heads, dim, b = cfg["text"], cfg["img"], cfg["heads"], cfg["dim"], cfg["b"]
    n = text + img
    grid = 64 if img > 256 else 16
    lengths = None
    if cfg.get("lengths"):  # per-sample anchor sets: per-sample tables, the second sample padded
        tabs = [rope_tables(anchor_ids(text, img, grid=grid, seed=s), AXES[dim]) for s in range(b)]
        cos = torch.stack([t[0] for t in tabs]).to(dev)
        sin = torch.stack([t[1] for t in tabs]).to(dev)
        lengths = torch.tensor([n] + [max(1, n - 301 * (i + 1) % n) for i in range(b - 1)], dtype=torch.int32, device=dev)
    else:
        cos, sin = (t.to(dev) for t in rope_tables(anchor_ids(text, img, grid=grid), AXES[dim]))
    label = f"{text}+{img} tokens, {heads}x{dim} heads, B={b}" + (f", key_lengths={lengths.tolist()}" if lengths is not None else "")
    cases = []
    for dt in cfg["dtypes"]:
        q, k, v = (t.to(dev) for t in qkv(b, n, heads, dim, dt, seed=n))
        if cfg.get("strided"):  # views of one fused [B, L, 3, H, D] projection
            fused = torch.stack([q, k, v], 2)
            q, k, v = fused[:, :, 0], fused[:, :, 1], fused[:, :, 2]
        cases.append(PCase("anchor_attention", label + (" strided qkv" if cfg.get("strided") else ""), _dname(dt),
                           lambda be, q=q, k=k, v=v: jk.anchor_attention(q, k, v, cos, sin, lengths, backend=be),
                           False, dt, "attention"))
    return cases


def strided_destination_probes(dev: str) -> list[tuple[str, Callable[[str], torch.Tensor]]]:
    """In-place ops on a channel-strided destination: every backend must agree (accept and match, or refuse alike)."""
    import jit_kernels as jk
    from jit_kernels.testing import anchors, tokens

    h, w, b, c = 7, 13, 2, 8
    n = h * w
    a = anchors(n, 30).to(dev)
    new = _inactive(a.cpu(), n, 20, 3).to(dev)
    vals = tokens(b, 30, c, seed=2, device=dev)
    tgt = tokens(b, 20, c, seed=3, device=dev)

    def y():
        return _strided_copy(tokens(b, n, c, seed=4, device=dev))

    return [
        ("scatter_tokens_", lambda be: jk.scatter_tokens_(y(), a, vals, backend=be)),
        ("lift_euler_", lambda be: jk.lift_euler_(y(), vals, a, h, w, -0.05, backend=be)),
        ("microflow_update_", lambda be: jk.microflow_update_(y(), new, tgt, backend=be)),
    ]


def compare(out, ref, exact: bool, dtype: torch.dtype, kind: str) -> tuple[float, bool, str | None]:
    """(max abs error, ok, why not) of a backend result against the reference."""
    from jit_kernels.testing import tolerance

    if not isinstance(out, torch.Tensor):
        return math.inf, False, f"returned {type(out).__name__}"
    if out.shape != ref.shape or out.dtype != ref.dtype:
        return math.inf, False, f"got {out.dtype} {tuple(out.shape)}, reference {ref.dtype} {tuple(ref.shape)}"
    if out.numel() == 0:
        return 0.0, True, None
    diff = (out.double() - ref.double()).abs()
    err = float(diff.max())
    if exact:
        ok = torch.equal(out, ref)
        return err, ok, None if ok else f"not bit-exact ({int((diff > 0).sum())} elements differ)"
    tol = tolerance(dtype, kind)
    ok = bool(torch.isclose(out.double(), ref.double(), rtol=tol["rtol"], atol=tol["atol"]).all())
    return err, ok, None if ok else f"outside {tol}"


def parity_groups(kit: Kit) -> list[Callable[[], list[PCase]] | str]:
    """The parity work in priority order: builders of case lists, and ``"probes"`` (strided destinations)."""
    dev = kit.device
    specs, attn = parity_plan(kit.dry, kit.small)
    groups: list = []
    for i, s in enumerate(specs):
        groups.append(lambda s=s: token_cases(s, dev))
        if i == 1:
            groups += [lambda: tie_cases(dev), lambda: attention_cases(attn[0], dev), "probes"]
    groups += [lambda cfg=cfg: attention_cases(cfg, dev) for cfg in attn[1:]]
    return groups


def run_probes(kit: Kit) -> list[dict]:
    """In-place ops on a strided destination: the backends must agree (or differ only as a known issue)."""
    probes = []
    for op, fn in strided_destination_probes(kit.device):
        outcome = {}
        for be in ["reference"] + kit.backends:
            try:
                outcome[be] = ("ok", fn(be))
            except Exception as exc:
                outcome[be] = (type(exc).__name__, str(exc)[:160])
        ref = outcome["reference"]
        rec = {"op": op, "probe": "strided destination",
               "outcomes": {be: (o[0] if o[0] != "ok" else "updated") for be, o in outcome.items()}}
        agree = True
        for be in kit.backends:
            o = outcome[be]
            if o[0] != ref[0]:
                agree = False
            elif o[0] == "ok":
                agree &= compare(o[1], ref[1], op != "lift_euler_", torch.float32, "op")[1]
        rec["consistent"] = agree
        known = KNOWN_ISSUES.get((op, "strided destination"))
        if not agree:
            if known:
                rec["known_issue"] = known
            else:
                kit.fail("parity", f"{op} on a strided destination: backends disagree {rec['outcomes']}")
        elif known:
            rec["note"] = "consistent now: the known issue is fixed (remove it from KNOWN_ISSUES)"
        probes.append(rec)
    return probes


def run_parity_groups(kit: Kit, budget: Budget, shard: int = 0, shards: int = 1,
                      emit: Callable[[dict], None] | None = None) -> tuple[list[dict], list[dict], int]:
    """Run the groups ``i`` with ``i % shards == shard``: (records, probes, cases left out for budget).

    ``emit(record)`` is called as each record is made (a child prints it at once, so a later crash
    of the CUDA context does not take the records before it along)."""
    records: list[dict] = []
    probes: list[dict] = []
    skipped = 0
    poisoned = None
    for gi, make in enumerate(parity_groups(kit)):
        if gi % shards != shard:
            continue
        if budget.over() or poisoned:
            skipped += 1
            continue
        if make == "probes":
            probes = run_probes(kit)
            continue
        try:
            cases = make()
        except Exception as exc:
            kit.fail("parity", f"building inputs failed: {exc!r}")
            continue
        for case in cases:
            if budget.over() or poisoned:
                skipped += 1
                continue
            try:
                ref = case.run("reference")
                kit.sync()
            except Exception as exc:
                records.append(dict(op=case.op, backend="reference", dtype=case.dtype, shape=case.shape,
                                    max_err=None, ok=False, error=repr(exc)[:300]))
                kit.fail("parity", f"{case.op} [{case.shape}] {case.dtype}: reference raised {exc!r}"[:300])
                continue
            for be in kit.backends:
                rec = dict(op=case.op, backend=be, dtype=case.dtype, shape=case.shape,
                           check="exact" if case.exact else f"tolerance({_dname(case.tol_dtype)}, {case.kind})")
                if kit.stand_in(be):
                    rec["stand_in_for"] = kit.stand_in(be)
                try:
                    out = case.run(be)
                    kit.sync()
                    err, ok, why = compare(out, ref, case.exact, case.tol_dtype, case.kind)
                    rec.update(max_err=err, ok=ok)
                    if why:
                        rec["why"] = why
                except Exception as exc:
                    rec.update(max_err=None, ok=False, error=repr(exc)[:300])
                    if "CUDA error" in str(exc) or "illegal memory" in str(exc):
                        poisoned = f"{case.op} [{case.shape}] on {be}: {exc}"[:300]
                records.append(rec)
                if emit is not None:
                    emit(rec)
                if not rec["ok"]:
                    kit.fail("parity", f"{case.op} {be} {case.dtype} [{case.shape}]: {rec.get('why') or rec.get('error')}")
            del ref
        if kit.device == "cuda" and not poisoned:
            try:
                torch.cuda.empty_cache()
            except Exception as exc:  # a sticky CUDA error surfaces here too
                poisoned = f"torch.cuda.empty_cache after group {gi}: {exc}"[:300]
    if poisoned:
        kit.fail("parity", f"the CUDA context is unusable after {poisoned}; the rest of this shard did not run")
    return records, probes, skipped


def run_parity_child(shard: int, shards: int, budget_s: float, dry: bool, small: bool) -> int:
    """Child process of a sharded parity section: tagged JSON lines (records, probes, failures, skipped)."""
    dev = "cpu" if dry else "cuda"
    kit = Kit(out=Path("."), dry=dry, small=small, device=dev, backends=_backends_under_test(dev),
              args=argparse.Namespace())
    kit.log = lambda msg: None  # the parent reports

    def emit(r):
        print(CHILD_TAG + json.dumps({"record": r}), flush=True)

    with _exact_fp32():
        records, probes, skipped = run_parity_groups(kit, Budget(budget_s), shard, shards, emit=emit)
    for p in probes:
        print(CHILD_TAG + json.dumps({"probe": p}), flush=True)
    for f in kit.failures:
        print(CHILD_TAG + json.dumps({"failure": f}), flush=True)
    print(CHILD_TAG + json.dumps({"skipped": skipped, "done": True}), flush=True)
    return 0


def parity_shards(kit: Kit) -> int:
    """Child processes for the parity section: compiling Triton kernels dominates a fresh GPU run, and it is
    serial within a process (the shards share Triton's on-disk cache). ``--small`` (the compute-sanitizer
    run) stays in one process; the dry run uses two children to rehearse the path."""
    if kit.small:
        return 1
    if kit.dry:
        return 2
    return max(1, min(6, (os.cpu_count() or 2) // 2))


def section_parity(kit: Kit, budget: Budget) -> tuple[list[dict], dict]:
    from concurrent.futures import ThreadPoolExecutor

    shards = parity_shards(kit)
    if shards == 1:
        with _exact_fp32():
            records, probes, skipped = run_parity_groups(kit, budget)
    else:
        def run(k):
            cmd = [sys.executable, "-m", "benchmarks.gpu_check", "--child-parity", f"{k}/{shards}",
                   "--child-budget", f"{max(1.0, budget.left() - 5):.1f}"] + (["--dry-run"] if kit.dry else [])
            try:
                return k, subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=budget.left() + 20)
            except subprocess.TimeoutExpired as exc:
                return k, exc

        records, probes, skipped = [], [], 0
        with ThreadPoolExecutor(max_workers=shards) as pool:
            for k, p in pool.map(run, range(shards)):
                if isinstance(p, subprocess.TimeoutExpired):
                    kit.fail("parity", f"shard {k}/{shards} timed out")
                    continue
                lines = [json.loads(ln[len(CHILD_TAG):]) for ln in p.stdout.splitlines() if ln.startswith(CHILD_TAG)]
                for ln in lines:
                    if "record" in ln:
                        records.append(ln["record"])
                    elif "probe" in ln:
                        probes.append(ln["probe"])
                    elif "failure" in ln:
                        kit.failures.append(ln["failure"])
                        kit.log(f"FAIL {ln['failure']}")
                    elif "skipped" in ln:
                        skipped += ln["skipped"]
                if p.returncode != 0 or not any(ln.get("done") for ln in lines):
                    kit.fail("parity", f"shard {k}/{shards} died (rc {p.returncode}): {(p.stderr or '')[-600:]}")
    summary = {"records": len(records), "failed": sum(1 for r in records if not r["ok"]), "shards": shards,
               "skipped_for_budget": skipped, "strided_destination_probes": probes}
    return records, summary


# ---------------------------------------------------------------- bad inputs (child processes)


def bad_cases() -> dict[str, tuple[str, Callable[[str, str, str], object]]]:
    """name -> (expected exception type, fn(device, other_device, backend)). Each call is invalid."""
    import jit_kernels as jk
    from jit_kernels._backends import backend_op
    from jit_kernels.testing import anchors, tokens

    h, w, n, m = 7, 13, 91, 30
    cases: dict = {}

    def case(name, exc):
        def deco(fn):
            cases[name] = (exc, fn)
            return fn
        return deco

    def base(d):
        a = anchors(n, m).to(d)
        return tokens(2, n, 8, device=d), a, jk.nearest_anchor_map(a, h, w, backend="reference"), tokens(2, m, 8, device=d)

    def bad_near(d):  # anchors 0 and 1 swap their own entries: not their own nearest anchor
        x, a, near, v = base(d)
        near = near.clone()
        near[a[0]], near[a[1]] = 1, 0
        return x, a, near, v

    def idx(d, vals):
        return torch.tensor(vals, dtype=torch.int64, device=d)

    @case("gather_tokens: index out of range", "IndexError")
    def _(d, o, be):
        jk.gather_tokens(tokens(2, n, 8, device=d), idx(d, [0, 5, n]), backend=be)

    @case("gather_tokens: negative index", "IndexError")
    def _(d, o, be):
        jk.gather_tokens(tokens(2, n, 8, device=d), idx(d, [3, -1]), backend=be)

    @case("gather_tokens: mixed devices", "ValueError")
    def _(d, o, be):
        jk.gather_tokens(tokens(2, n, 8, device=d), idx(o, [0, 1]), backend=be)

    @case("gather_tokens: direct op, validate=True, index out of range", "IndexError")
    def _(d, o, be):
        backend_op("gather_tokens", be)(tokens(2, n, 8, device=d), idx(d, [0, n + 7]), True)

    @case("scatter_tokens_: duplicate index", "ValueError")
    def _(d, o, be):
        jk.scatter_tokens_(tokens(2, n, 8, device=d), idx(d, [4, 9, 4]), tokens(2, 3, 8, device=d), backend=be)

    @case("scatter_tokens: index out of range", "IndexError")
    def _(d, o, be):
        jk.scatter_tokens(tokens(2, n, 8, device=d), idx(d, [4, n]), tokens(2, 2, 8, device=d), backend=be)

    @case("nearest_anchor_map: duplicate anchors", "ValueError")
    def _(d, o, be):
        jk.nearest_anchor_map(idx(d, [3, 8, 3]), h, w, backend=be)

    @case("nearest_anchor_map: anchor out of range", "IndexError")
    def _(d, o, be):
        jk.nearest_anchor_map(idx(d, [3, n]), h, w, backend=be)

    @case("lift_field: inconsistent nearest map", "ValueError")
    def _(d, o, be):
        x, a, near, v = bad_near(d)
        jk.lift_field(v, a, h, w, nearest=near, backend=be)

    @case("lift_field: nearest value out of range", "IndexError")
    def _(d, o, be):
        x, a, near, v = base(d)
        near = near.clone()
        near[near != 0] = m  # every non-anchor-0 cell names anchor M (out of range)
        jk.lift_field(v, a, h, w, nearest=near, backend=be)

    @case("lift_field: direct op, validate=True, inconsistent nearest map", "ValueError")
    def _(d, o, be):
        x, a, near, v = bad_near(d)
        backend_op("lift_field", be)(v, a, near, jk.lift_weights(m, n, device=d), h, w, True)

    @case("lift_euler_: inconsistent nearest map", "ValueError")
    def _(d, o, be):
        x, a, near, v = bad_near(d)
        jk.lift_euler_(x, v, a, h, w, -0.1, nearest=near, backend=be)

    @case("lift_euler_: mixed devices", "ValueError")
    def _(d, o, be):
        x, a, near, v = base(d)
        jk.lift_euler_(x, v, a, h, w, -0.1, nearest=near.to(o), backend=be)

    @case("token_importance: grid does not match N", "ValueError")
    def _(d, o, be):
        jk.token_importance(tokens(2, n, 8, device=d), 7, 12, backend=be)

    @case("select_new_tokens: active index out of range", "IndexError")
    def _(d, o, be):
        jk.select_new_tokens(torch.rand(2, n, generator=torch.Generator().manual_seed(0)).to(d), idx(d, [1, n]), 5,
                             backend=be)

    @case("select_new_tokens: duplicate active index", "ValueError")
    def _(d, o, be):
        jk.select_new_tokens(torch.rand(2, n, generator=torch.Generator().manual_seed(0)).to(d), idx(d, [1, 1]), 5,
                             backend=be)

    @case("microflow_update_: duplicate index", "ValueError")
    def _(d, o, be):
        jk.microflow_update_(tokens(2, n, 8, device=d), idx(d, [2, 2]), tokens(2, 2, 8, device=d), backend=be)

    @case("microflow_update_: index out of range", "IndexError")
    def _(d, o, be):
        jk.microflow_update_(tokens(2, n, 8, device=d), idx(d, [2, n]), tokens(2, 2, 8, device=d), backend=be)

    @case("microflow_target: new index out of range", "IndexError")
    def _(d, o, be):
        x, a, near, v = base(d)
        jk.microflow_target(x, x, a, idx(d, [n + 3]), tokens(2, 1, 8, device=d), 0.8, 0.7, h, w, nearest=near, backend=be)

    @case("microflow_target: mixed devices", "ValueError")
    def _(d, o, be):
        x, a, near, v = base(d)
        jk.microflow_target(x, x, a, idx(d, [2]), tokens(2, 1, 8, device=o), 0.8, 0.7, h, w, nearest=near, backend=be)

    def attn(d, b=2, n_tok=24):
        q = torch.randn(b, n_tok, 2, 16, generator=torch.Generator().manual_seed(0)).to(d)
        cos, sin = torch.ones(n_tok, 16, device=d), torch.zeros(n_tok, 16, device=d)
        return q, cos, sin

    @case("anchor_attention: key_lengths > L", "IndexError")
    def _(d, o, be):
        q, cos, sin = attn(d)
        jk.anchor_attention(q, q, q, cos, sin, torch.tensor([24, 25], device=d), backend=be)

    @case("anchor_attention: key_lengths = 0", "IndexError")
    def _(d, o, be):
        q, cos, sin = attn(d)
        jk.anchor_attention(q, q, q, cos, sin, torch.tensor([0, 24], device=d), backend=be)

    @case("anchor_attention: mixed devices", "ValueError")
    def _(d, o, be):
        q, cos, sin = attn(d)
        jk.anchor_attention(q, q, q, cos.to(o), sin, backend=be)

    @case("anchor_attention: direct op, validate=True, key_lengths > L", "IndexError")
    def _(d, o, be):
        q, cos, sin = attn(d)
        backend_op("anchor_attention", be)(q, q, q, cos, sin, torch.tensor([30, 24], device=d), 0.25, True)

    return cases


def _health(dev: str, be: str) -> bool:
    """A valid gather and lift on this backend after the bad calls: the context still works."""
    import jit_kernels as jk
    from jit_kernels.testing import anchors, tokens

    a = anchors(91, 30).to(dev)
    x = tokens(2, 91, 8, device=dev)
    ok = torch.equal(jk.gather_tokens(x, a, backend=be), jk.gather_tokens(x, a, backend="reference"))
    got = jk.lift_field(x[:, :30], a, 7, 13, backend=be)
    ok &= bool(torch.allclose(got, jk.lift_field(x[:, :30], a, 7, 13, backend="reference"), rtol=1e-5, atol=1e-5))
    if dev == "cuda":
        torch.cuda.synchronize()
    return ok


def run_bad_child(names: list[str], backend: str, dry: bool) -> int:
    """Child process: run the named bad calls, print one tagged JSON line each, then a health check."""
    dev = "cpu" if dry else "cuda"
    other = "meta" if dry else "cpu"
    table = bad_cases()
    for name in names:
        expected, fn = table[name]
        rec = {"case": name, "backend": backend, "expected": expected}
        try:
            fn(dev, other, backend)
            if dev == "cuda":
                torch.cuda.synchronize()
            rec.update(raised=None, ok=False)
        except Exception as exc:
            rec.update(raised=type(exc).__name__, ok=type(exc).__name__ == expected, message=str(exc)[:240])
        print(CHILD_TAG + json.dumps(rec), flush=True)
    try:
        healthy = _health(dev, backend)
        err = None
    except Exception as exc:
        healthy, err = False, repr(exc)[:300]
    print(CHILD_TAG + json.dumps({"health": healthy, "error": err}), flush=True)
    return 0


def section_bad_inputs(kit: Kit, budget: Budget) -> dict:
    from concurrent.futures import ThreadPoolExecutor

    names = list(bad_cases())
    if kit.dry:  # 2 cores: one child per backend runs every case (the GPU run: one child per case and backend)
        jobs = [(names, be) for be in kit.backends]
        workers = 2
    else:
        jobs = [([nm], be) for nm in names for be in kit.backends]
        workers = max(2, min(12, (os.cpu_count() or 4) - 2))
    deadline = time.perf_counter() + budget.left()

    # A child needs seconds to import torch and make a CUDA context: one started with less than this
    # left is not started (counted as left out for budget) rather than timed out as a failure.
    min_start = 2.0 if kit.dry else 20.0

    def run(job):
        group, be = job
        left = deadline - time.perf_counter()
        if left <= min_start:
            return job, None, "skipped: out of budget"
        cmd = [sys.executable, "-m", "benchmarks.gpu_check", "--child-bad", "|".join(group), "--backend", be]
        if kit.dry:
            cmd.append("--dry-run")
        try:
            p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=max(5.0, left))
            return job, p, None
        except subprocess.TimeoutExpired:
            return job, None, f"timed out after {left:.0f}s"

    results = []
    skipped = 0
    with ThreadPoolExecutor(max_workers=workers) as pool:
        for (group, be), p, why in pool.map(run, jobs):
            if p is None:
                if why.startswith("skipped"):
                    skipped += len(group)
                    continue
                for nm in group:
                    results.append({"case": nm, "backend": be, "ok": False, "error": why})
                    kit.fail("bad_inputs", f"{nm} on {be}: {why}")
                continue
            lines = [json.loads(ln[len(CHILD_TAG):]) for ln in p.stdout.splitlines() if ln.startswith(CHILD_TAG)]
            recs = [ln for ln in lines if "case" in ln]
            health = next((ln for ln in lines if "health" in ln), None)
            seen = {r["case"] for r in recs}
            for r in recs:
                r["child_rc"] = p.returncode
                r["child_healthy"] = bool(health and health["health"])
                r["ok"] = bool(r["ok"] and p.returncode == 0 and r["child_healthy"])
                if kit.stand_in(be):
                    r["stand_in_for"] = kit.stand_in(be)
                results.append(r)
                if not r["ok"]:
                    kit.fail("bad_inputs", f"{r['case']} on {be}: raised {r.get('raised')} (expected {r['expected']}), "
                                           f"child rc {p.returncode}, healthy {r['child_healthy']}"
                                           + (f": {health.get('error')}" if health and health.get("error") else ""))
            for nm in group:
                if nm not in seen:
                    results.append({"case": nm, "backend": be, "ok": False, "child_rc": p.returncode,
                                    "error": (p.stderr or p.stdout)[-600:]})
                    kit.fail("bad_inputs", f"{nm} on {be}: the child died (rc {p.returncode}) before reporting")
    return {"cases": results, "children": len(jobs), "skipped_for_budget": skipped,
            "per_child": "one case per child" if not kit.dry else "every case of a backend in one child (dry run)"}


# ---------------------------------------------------------------- sampler: launches, syncs, validation passes


def _field(x, idx, sigma, step):
    """A small velocity function: a few elementwise kernels, no host sync."""
    return 0.7 * x + torch.tanh(x.roll(1, dims=-1)) * sigma


def _passes() -> int:
    import jit_kernels as jk

    return sum(jk.validation_passes().values())


class StepProbe:
    """``interrupt`` + ``step_callback`` hooks of jit_sample that measure every step.

    Records index-validation passes per step and, on CUDA, host syncs per step: ``mode="warn"``
    counts synchronising calls in every step; ``mode="error"`` turns them into errors in the
    ``quiet`` steps (those that are not the first of a stage). The sync debug mode is switched
    on at the start of a step and off at its end, so the loop's setup and final synchronize are
    not counted.
    """

    def __init__(self, cuda: bool, quiet: set[int], mode: str | None):
        self.cuda, self.quiet, self.mode = cuda, quiet, mode
        self.step = 0
        self.passes: list[int] = []
        self.syncs: list[int] = []
        self.caught: list = []
        self._p0 = self._w0 = 0

    def _sync_warnings(self) -> int:
        return sum(1 for w in self.caught if "synchroniz" in str(w.message).lower())

    def interrupt(self) -> bool:
        i = self.step
        self.step += 1
        self._p0 = _passes()
        self._w0 = self._sync_warnings()
        if self.cuda and (self.mode == "warn" or (self.mode == "error" and i in self.quiet)):
            torch.cuda.set_sync_debug_mode(self.mode)
        return False

    def callback(self, i, sigma, y):
        if self.cuda and self.mode:
            torch.cuda.set_sync_debug_mode("default")
        self.passes.append(_passes() - self._p0)
        self.syncs.append(self._sync_warnings() - self._w0)

    @contextlib.contextmanager
    def active(self):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            self.caught = caught
            try:
                yield self
            finally:
                if self.cuda:
                    torch.cuda.set_sync_debug_mode("default")


def count_launches(kit: Kit, run: Callable[[Callable[[], bool]], object]) -> list[dict]:
    """Per profiler window (setup, then one per step): CUDA kernels and memcpy/memsets, or on CPU the op calls.

    ``run(interrupt)`` runs the sampler with ``interrupt`` as its hook; the hook steps the profiler.
    """
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile, schedule

    windows: list[dict] = []
    cuda = kit.device == "cuda"

    def ready(p):
        ev = p.events()
        if cuda:
            # GPU-side user annotations (the schedule's ProfilerStep#N ranges) are not kernels
            dev_ev = [e for e in ev if e.device_type == DeviceType.CUDA and not getattr(e, "is_user_annotation", False)]
            mem = sum(1 for e in dev_ev if e.name.lower().startswith(("memcpy", "memset")))
            windows.append({"kernels": len(dev_ev) - mem, "memcpy_memset": mem})
        else:
            windows.append({"jit_kernels_ops": sum(1 for e in ev if e.name.startswith("jit_kernels::")),
                            "aten_ops": sum(1 for e in ev if e.name.startswith("aten::"))})

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*[Pp]rofiler.*")  # "won't be using warmup", "clears events"
        with _quiet_fd2(), profile(activities=acts, schedule=schedule(wait=0, warmup=0, active=1),
                                   on_trace_ready=ready) as prof:
            def interrupt():
                prof.step()
                return False

            run(interrupt)
    return windows


def section_sampler(kit: Kit, budget: Budget) -> tuple[list[dict], dict]:
    import jit_kernels as jk
    from jit_kernels.testing import tokens
    from jit_sampler import JiTConfig, beta_sigmas, jit_sample, make_plan

    cuda = kit.device == "cuda"
    h = w = 16 if kit.dry else 64
    b, c = 2, (16 if kit.dry else 64)
    lat = tokens(b, h * w, c, offset=0.0, device=kit.device)
    runs = [("7x", "shared", "auto"), ("7x", "per_sample", "auto"), ("4x", "shared", "auto"),
            ("reference", "shared", "auto"), ("7x", "shared", "triton")]
    # What the velocity function launches by itself (subtracted to get the sampler's own launches).
    vwin = count_launches(kit, lambda intr: (intr(), _field(lat[:, : h * w // 3], None, 0.5, 0), intr()))
    v_launch = vwin[1] if len(vwin) > 1 else {}
    rows, sync_rows = [], []
    for preset, policy, backend in runs:
        if budget.over():
            rows.append({"preset": preset, "policy": policy, "backend": backend, "skipped": "out of budget"})
            continue
        name = f"{preset} {policy} backend={backend}"
        cfg = JiTConfig.preset(preset, anchor_policy=policy, backend=backend)
        sig = beta_sigmas(cfg.total_steps, cfg.beta_alpha, cfg.beta_beta)
        plan = make_plan(cfg, h, w, sig)
        quiet = {i for i in range(1, plan.steps) if not plan.is_transition(i)}
        row = {"preset": preset, "policy": policy, "backend": backend,
               "resolved_backend": jk._backends.resolve("lift_euler_", torch.device(kit.device), backend),
               "grid": f"{h}x{w} B={b} C={c}", "steps": plan.steps,
               "transition_steps": [i for i in range(plan.steps) if plan.is_transition(i)],
               "quiet_steps": sorted(quiet)}
        try:
            t = time.perf_counter()
            ref, _ = jit_sample(_field, lat, h, w, sig, cfg, _gen(1))  # warm-up: compiles the kernels
            kit.sync()
            row["warmup_s"] = round(time.perf_counter() - t, 3)
            # 1) launches per step
            wins = count_launches(kit, lambda intr: jit_sample(_field, lat, h, w, sig, cfg, _gen(1), interrupt=intr))
            key = "kernels" if cuda else "jit_kernels_ops"
            per_step = [wn.get(key, 0) for wn in wins[1:plan.steps + 1]]
            row["launch_unit"] = "CUDA kernels" if cuda else "jit_kernels op calls (CPU stand-in for launches)"
            row["setup_launches"] = wins[0] if wins else None
            row["launches_per_step"] = per_step
            row["velocity_fn_launches"] = v_launch.get(key)
            row["launches_quiet_step_max"] = max((per_step[i] for i in quiet if i < len(per_step)), default=None)
            # 2) validation passes (and on CUDA syncs) per step
            probe = StepProbe(cuda, quiet, "warn" if cuda else None)
            jk.reset_validation_passes()
            t = time.perf_counter()
            with probe.active():
                y, rep = jit_sample(_field, lat, h, w, sig, cfg, _gen(1), interrupt=probe.interrupt,
                                    step_callback=probe.callback)
            kit.sync()
            row["time_s"] = round(time.perf_counter() - t, 3)
            row["validation_passes_per_step"] = probe.passes
            row["validation_passes_run"] = jk.validation_passes()
            quiet_passes = sum(probe.passes[i] for i in quiet)
            row["validation_passes_quiet_steps"] = quiet_passes
            same = bool(torch.allclose(y, ref, rtol=1e-6, atol=1e-6))
            row["deterministic"] = same
            ok = quiet_passes == 0 and same
            srow = {"run": name, "quiet_steps": len(quiet)}
            if cuda:
                row["syncs_per_step"] = probe.syncs
                srow["syncs_quiet_steps"] = sum(probe.syncs[i] for i in quiet)
                srow["syncs_transition_and_first_steps"] = sum(s for i, s in enumerate(probe.syncs) if i not in quiet)
                # 3) "error" on the quiet steps: any sync there raises
                probe_e = StepProbe(True, quiet, "error")
                try:
                    with probe_e.active():
                        jit_sample(_field, lat, h, w, sig, cfg, _gen(1), interrupt=probe_e.interrupt,
                                   step_callback=probe_e.callback)
                    srow["error_mode"] = "no sync in the quiet steps"
                except RuntimeError as exc:
                    srow["error_mode"] = f"sync at step {probe_e.step - 1}: {str(exc)[:300]}"
                    ok = False
                ok &= srow["syncs_quiet_steps"] == 0
            else:
                srow["syncs_quiet_steps"] = None
                srow["note"] = "CPU: no syncs to count; validation passes in the quiet steps stand in"
                srow["validation_passes_quiet_steps"] = quiet_passes
            row["ok"] = ok
            sync_rows.append(srow)
            if not ok:
                kit.fail("sampler", f"{name}: quiet-step validation passes {quiet_passes}, deterministic {same}, "
                                    f"syncs {srow.get('syncs_quiet_steps')}, {srow.get('error_mode', '')}")
        except Exception as exc:
            row.update(ok=False, error=repr(exc)[:400])
            kit.fail("sampler", f"{name}: {exc!r}"[:400])
            traceback.print_exc()
        rows.append(row)
        kit.log(f"  sampler {name}: launches/step {row.get('launches_per_step')}, "
                f"validation passes/step {row.get('validation_passes_per_step')}"
                + (f", syncs/step {row.get('syncs_per_step')}" if cuda else ""))
    syncs = {"method": "torch.cuda.set_sync_debug_mode: 'warn' counts per step, 'error' on the quiet steps"
             if cuda else "not measured on CPU (dry run): validation passes per step instead", "runs": sync_rows}
    return rows, syncs


# ---------------------------------------------------------------- bench


def _quantile(xs: list[float], q: float) -> float:
    s = sorted(xs)
    pos = q * (len(s) - 1)
    lo = int(math.floor(pos))
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def time_ms(fn: Callable[[], object], device: str, quantiles=(0.2, 0.5, 0.8)) -> list[float]:
    """Quantiles of one call's time in ms: ``triton.testing.do_bench`` on CUDA, a CPU timer in the dry run."""
    if device == "cuda":
        import triton.testing

        return [float(t) for t in triton.testing.do_bench(fn, warmup=10, rep=40, quantiles=list(quantiles))]
    fn()
    samples = []
    stop = time.perf_counter() + 0.03
    while len(samples) < 5 or (len(samples) < 40 and time.perf_counter() < stop):
        t = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - t) * 1e3)
    return [_quantile(samples, q) for q in quantiles]


def copy_bandwidth_GBps(device: str) -> float:
    """Device-to-device copy, bytes read + written per second (the ceiling of these memory-bound ops)."""
    numel = (256 if device == "cuda" else 4) * 2**20 // 4  # 256 MiB on the GPU (several times the L2)
    src = torch.randn(numel, device=device)
    dst = torch.empty_like(src)
    ms = time_ms(lambda: dst.copy_(src), device)[1]
    return 2 * numel * 4 / (ms * 1e-3) / 1e9


# The ops whose kernels have an A/B switch (JIT_KERNELS_LIFT_VARIANT, jit_kernels/_env.py): the CUDA
# nearest map and lift, the Triton lift (its DMF target included). Timed both ways by the bench section.
VARIANT_OPS = ("nearest_anchor_map", "lift_field", "lift_euler_", "microflow_target")
VARIANT_BUDGET_SHARE = 0.2


def bench_variants(kit: Kit, budget: Budget) -> tuple[list[dict], int]:
    """``ours`` of every :data:`VARIANT_OPS` case timed under ``JIT_KERNELS_LIFT_VARIANT=v1`` and ``v2``
    (64 x 64 grid, C = 64, B = 1 and 2, bf16; the dry run: 16 x 16, fp32), per backend under test.

    ``v2_speedup`` is the ratio of the v1 and v2 medians. ``same_bits``: the two variants' outputs are
    equal bit for bit (out-of-place ops only). The variable is restored afterwards.
    """
    from benchmarks.cases import make_cases
    from jit_kernels._env import LIFT_VARIANT, LIFT_VARIANTS

    dev = kit.device
    sizes = [(16, 1, 0.32)] if kit.dry else [(64, 1, 0.32), (64, 2, 0.32)]
    dtypes = (torch.float32,) if kit.dry else (torch.bfloat16,)
    rows, skipped = [], 0
    saved = os.environ.get(LIFT_VARIANT)
    try:
        for be in kit.backends:
            for case in make_cases(dev, dtypes, sizes, be):
                if case.op not in VARIANT_OPS:
                    continue
                if budget.over():
                    skipped += 1
                    continue
                row = {"op": case.op, "size": case.size, "dtype": case.dtype, "backend": be}
                if kit.stand_in(be):
                    row["stand_in_for"] = kit.stand_in(be)
                outs = {}
                try:
                    for variant in LIFT_VARIANTS:
                        os.environ[LIFT_VARIANT] = variant
                        if case.op != "lift_euler_":
                            outs[variant] = case.impls["ours"]().clone()
                        row[f"{variant}_us"] = [round(x * 1e3, 1) for x in time_ms(case.impls["ours"], dev)]
                except Exception as exc:
                    row["error"] = repr(exc)[:300]
                    kit.fail("bench", f"variants {case.op} {case.size} {be}: {exc!r}"[:300])
                    rows.append(row)
                    continue
                row["v2_speedup"] = float(f"{row['v1_us'][1] / max(row['v2_us'][1], 1e-3):.3g}")  # never rounds to 0
                row["same_bits"] = torch.equal(outs["v1"], outs["v2"]) if outs else None
                if outs and not row["same_bits"]:
                    kit.fail("bench", f"variants {case.op} {case.size} {be}: v1 and v2 outputs differ")
                rows.append(row)
    finally:
        if saved is None:
            os.environ.pop(LIFT_VARIANT, None)
        else:
            os.environ[LIFT_VARIANT] = saved
    return rows, skipped


def section_bench(kit: Kit, budget: Budget) -> dict:
    from benchmarks.bench_attention import AXES, anchor_ids, rope_tables, stock_attention, variant_fns
    from benchmarks.cases import SIZES, make_cases
    import jit_kernels as jk

    dev = kit.device
    bw = copy_bandwidth_GBps(dev)
    kit.log(f"  copy bandwidth {bw:.1f} GB/s")
    sizes = [(16, 1, 0.32), (16, 2, 0.60)] if kit.dry else SIZES
    dtypes = (torch.float32,) if kit.dry else (torch.bfloat16, torch.float32)
    ops_rows = []
    native = kit.backends[0]  # cuda (cpp in the dry run)
    with torch.no_grad():
        # The A/B of the lift variants first, within a fifth of the section's budget (the op
        # table and attention below take what is left).
        variant_rows, skipped = bench_variants(kit, Budget(VARIANT_BUDGET_SHARE * budget.seconds))
        for be in kit.backends:
            for case in make_cases(dev, dtypes, sizes, be):
                if budget.left() < 0.3 * budget.seconds and be != native:
                    skipped += 1  # keep time for attention: the second backend's rows go first
                    continue
                if budget.over():
                    skipped += 1
                    continue
                impls = case.impls if be == native else {"ours": case.impls["ours"]}
                row = {"op": case.op, "size": case.size, "dtype": case.dtype, "backend": be}
                if kit.stand_in(be):
                    row["stand_in_for"] = kit.stand_in(be)
                try:
                    t = {k: time_ms(f, dev) for k, f in impls.items()}
                except Exception as exc:
                    row["error"] = repr(exc)[:300]
                    kit.fail("bench", f"{case.op} {case.size} {be}: {exc!r}"[:300])
                    ops_rows.append(row)
                    continue
                for k, q in t.items():
                    row[f"{k}_us"] = [round(x * 1e3, 1) for x in q]
                ours = t["ours"][1] * 1e-3
                row["GB/s"] = round(case.bytes / ours / 1e9, 1)
                row["of_copy_bw"] = round(case.bytes / ours / 1e9 / bw, 3)
                for k in ("torch", "published"):
                    if k in t:
                        row[f"x_vs_{k}"] = round(t[k][1] / t["ours"][1], 2)
                ops_rows.append(row)
        attn_rows = []
        configs = [(2, 32, 1, 8, (24, 40))] if kit.dry else [(24, 128, 1, 512, (1310, 2457, 4096))]
        dt = torch.float32 if kit.dry else torch.bfloat16
        for heads, dim, b, text, imgs in configs:
            for img in imgs:
                if budget.over():
                    skipped += 1
                    continue
                n = text + img
                g = torch.Generator().manual_seed(img)
                q, k, v = (torch.randn(b, n, heads, dim, generator=g).to(device=dev, dtype=dt) for _ in range(3))
                cos, sin = (t.to(dev) for t in rope_tables(anchor_ids(text, img, grid=64 if img > 256 else 16), AXES[dim]))
                fns = {"stock": lambda: stock_attention(q, k, v, cos, sin)}
                for be in kit.backends:
                    fns[f"ours_{be}"] = lambda be=be: jk.anchor_attention(q, k, v, cos, sin, backend=be)
                # Both Triton kernels ($JIT_KERNELS_ATTN_VARIANT v1 / v2) launched directly; on the GPU
                # also v2's tile sweep while at least half the budget is left (compiles cost seconds).
                variants = variant_fns(q, k, v, cos, sin, sweep=not kit.dry and budget.left() > 0.5 * budget.seconds) \
                    if "triton" in kit.backends else {}
                fns.update(variants)
                try:
                    err = float((fns[f"ours_{kit.backends[0]}"]().float() - fns["stock"]().float()).abs().max())
                    t = {}
                    for kk, f in fns.items():
                        if kk.startswith("v2_") and budget.over():  # the sweep's configs: while budget is left
                            skipped += 1
                            continue
                        t[kk] = time_ms(f, dev)
                    variants = {kk: f for kk, f in variants.items() if kk in t}
                except Exception as exc:
                    kit.fail("bench", f"anchor_attention {text}+{img}: {exc!r}"[:300])
                    continue
                flops = 4.0 * b * heads * n * n * dim
                row = {"case": f"{heads}x{dim}", "tokens": f"{text}+{img}", "batch": b, "dtype": _dname(dt),
                       "stock_ms": [round(x, 3) for x in t["stock"]], "max_abs_diff_vs_stock": f"{err:.1e}"}
                for be in kit.backends:
                    row[f"ours_{be}_ms"] = [round(x, 3) for x in t[f"ours_{be}"]]
                    row[f"x_vs_stock_{be}"] = round(t["stock"][1] / t[f"ours_{be}"][1], 2)
                    row[f"ours_{be}_TFLOPs"] = round(flops / (t[f"ours_{be}"][1] * 1e-3) / 1e12, 2)
                row["stock_TFLOPs"] = round(flops / (t["stock"][1] * 1e-3) / 1e12, 2)
                for name in variants:  # triton_v1, triton_v2, v2_<tiles> (the sweep)
                    row[f"{name}_ms"] = [round(x, 3) for x in t[name]]
                    row[f"x_vs_stock_{name}"] = round(t["stock"][1] / t[name][1], 2)
                sweep = [name for name in variants if name.startswith("v2_")]
                if sweep:
                    best = min(sweep, key=lambda name: t[name][1])
                    row["best_v2_config"], row["best_v2_x_vs_stock"] = best, round(t["stock"][1] / t[best][1], 2)
                attn_rows.append(row)
    timer = "triton.testing.do_bench, quantiles 0.2/0.5/0.8" if dev == "cuda" else "CPU timer (dry run), quantiles 0.2/0.5/0.8"
    return {"timer": timer, "copy_bandwidth_GBps": round(bw, 1), "ops": ops_rows, "attention": attn_rows,
            "variants": variant_rows, "skipped_for_budget": skipped}


# ---------------------------------------------------------------- e2e at FLUX scale


def flux_config(dry: bool) -> dict:
    from jit_sampler.report import FLUX1_DEV_CONFIG

    if dry:
        return dict(patch_size=1, in_channels=16, out_channels=None, num_layers=2, num_single_layers=2,
                    attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=16,
                    guidance_embeds=True, axes_dims_rope=(4, 6, 6))
    return dict(FLUX1_DEV_CONFIG, axes_dims_rope=(16, 56, 56))


def build_random_flux(cfg: dict, device: str, dtype: torch.dtype, seed: int = 0):
    """A ``FluxTransformer2DModel`` made on ``meta`` and materialised on ``device`` in ``dtype`` with random weights.

    Nothing is created in fp32 or on the host first (FLUX.1-dev: 12 B parameters, 24 GB in bf16).
    Weights are N(0, 1/fan_in), norm scales 1, biases 0: activations stay O(1); speed does not
    depend on the values.
    """
    from diffusers import FluxTransformer2DModel
    from diffusers.utils import logging as dlog

    with torch.device("meta"):
        tr = FluxTransformer2DModel(**cfg)
    level = dlog.get_verbosity()
    dlog.set_verbosity_error()  # "modules to keep in float32" notice of .to(dtype): none in FLUX.1
    try:
        tr = tr.to(dtype)
    finally:
        dlog.set_verbosity(level)
    bufs = [n for n, _ in tr.named_buffers()]
    if bufs:
        raise RuntimeError(f"FluxTransformer2DModel has buffers {bufs[:5]}: to_empty would leave them uninitialised")
    tr = tr.to_empty(device=device)
    g = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for name, p in tr.named_parameters():
            if p.dim() >= 2:
                p.normal_(0.0, 1.0 / math.sqrt(p.shape[1]), generator=g)
            elif name.endswith("weight"):
                p.fill_(1.0)
            else:
                p.zero_()
    return tr.eval().requires_grad_(False)


def section_e2e(kit: Kit, budget: Budget) -> dict:
    try:
        import diffusers  # noqa: F401
        from diffusers import FluxTransformer2DModel  # noqa: F401
    except Exception as exc:
        kit.log(f"  e2e skipped: {exc!r}\n  {DIFFUSERS_HINT}")
        return {"status": f"skipped: diffusers not importable ({exc!r})"[:300], "how_to": DIFFUSERS_HINT}
    import jit_kernels as jk
    from jit_sampler import FluxVelocity, JiTConfig, beta_sigmas, jit_sample, linear_sigmas, make_plan
    from jit_sampler.pipelines.attention_processor import install_anchor_attention, remove_anchor_attention
    from jit_sampler.report import flux_run_flops

    dev, cuda = kit.device, kit.device == "cuda"
    cfg = flux_config(kit.dry)
    h = w = 16 if kit.dry else 64
    text = 8 if kit.dry else 512
    dtype = torch.float32 if kit.dry else torch.bfloat16
    out: dict = {"status": "ok", "model": {k: v for k, v in cfg.items()}, "grid": f"{h}x{w}", "image_tokens": h * w,
                 "text_tokens": text, "dtype": _dname(dtype),
                 "weights": "random, made on the device (speed does not depend on weights)"}
    t = time.perf_counter()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    tr = build_random_flux(cfg, dev, dtype)
    kit.sync()
    out["build_s"] = round(time.perf_counter() - t, 2)
    out["parameters"] = sum(p.numel() for p in tr.parameters())
    kit.log(f"  built a {out['parameters'] / 1e6:.1f} M-parameter FLUX transformer in {out['build_s']}s")
    g = _gen(3)
    jd, pd = cfg["joint_attention_dim"], cfg["pooled_projection_dim"]
    prompt = torch.randn(1, text, jd, generator=g).to(device=dev, dtype=dtype)
    pooled = torch.randn(1, pd, generator=g).to(device=dev, dtype=dtype)
    text_ids = torch.zeros(text, 3, device=dev)
    img_ids = torch.zeros(h, w, 3)
    img_ids[..., 1] = torch.arange(h)[:, None]
    img_ids[..., 2] = torch.arange(w)[None, :]
    img_ids = img_ids.view(h * w, 3).to(dev)
    lat = torch.randn(1, h * w, cfg["in_channels"], generator=g).to(dev)
    guidance = torch.full((1,), 3.5, device=dev)

    def velocity():
        return FluxVelocity(tr, prompt, pooled, text_ids, img_ids, guidance=guidance)

    def sched(preset):
        c = JiTConfig.preset(preset)
        return c, beta_sigmas(c.total_steps, c.beta_alpha, c.beta_beta)

    methods = {"dense-50": (JiTConfig.dense(50), linear_sigmas(50), False)}
    for p in ("4x", "7x", "reference"):
        methods[f"JiT {p}"] = (*sched(p), False)
    for p in ("4x", "7x"):
        methods[f"JiT {p} + anchor attn"] = (*sched(p), True)
    devices = ("cuda",) if cuda else ("cpu",)

    def run(name, steps_cap=None, probe=None):
        cfg_, sig, fused = methods[name]
        vel = velocity()
        swapped = install_anchor_attention(tr, devices=devices) if fused else 0
        try:
            state = {"i": 0}

            def stop():
                state["i"] += 1
                return steps_cap is not None and state["i"] > steps_cap

            kw = {}
            if probe is not None:
                kw = dict(interrupt=probe.interrupt, step_callback=probe.callback)
            elif steps_cap is not None:
                kw = dict(interrupt=stop)
            jk.reset_validation_passes()
            y, rep = jit_sample(vel, lat, h, w, sig, cfg_, _gen(0), **kw)
        finally:
            if fused:
                remove_anchor_attention(tr)
        if fused and swapped == 0:
            raise RuntimeError("install_anchor_attention swapped no processor")
        return y, rep, jk.validation_passes()

    # Warm-ups (kernel compiles, cuBLAS/attention setup) and the time estimates that size the plan.
    t = time.perf_counter()
    with torch.no_grad():
        run("dense-50", steps_cap=2)
        _, rep_d, _ = run("dense-50", steps_cap=2)
        t_dense = rep_d.time_total_s / max(1, rep_d.steps)
        est = {"dense-50": 50 * t_dense}
        for name in methods:  # every stage size of every method compiles its kernels here, not in round 1
            if name == "dense-50":
                continue
            _, r, _ = run(name)
            if name in ("JiT 7x", "JiT 7x + anchor attn"):
                _, r, _ = run(name)  # warm: the estimate
                est[name] = r.time_total_s
    out["warmup_s"] = round(time.perf_counter() - t, 2)
    for p in ("4x", "reference"):
        est[f"JiT {p}"] = est["JiT 7x"] * 18 / 11
    est["JiT 4x + anchor attn"] = est["JiT 7x + anchor attn"] * 18 / 11
    jit_cost = sum(v for k, v in est.items() if k != "dense-50")
    sync_cost = 2.0 * est["JiT 7x + anchor attn"]
    avail = budget.left() - sync_cost - 3.0
    k = kit.args.e2e_steps
    if not k:
        k = 50 if est["dense-50"] + jit_cost <= avail else int(max(2, (avail - jit_cost) / max(t_dense, 1e-6)))
    k = max(1, min(50, k))
    round_cost = k * t_dense + jit_cost
    repeats = max(1, min(1 if kit.dry else 3, int(avail // max(round_cost, 1e-6))))
    out.update(dense_steps_timed=k, dense_extrapolated=k < 50, repeats=repeats,
               estimates_s={kk: round(v, 3) for kk, v in est.items()})
    kit.log(f"  e2e plan: dense {k}/50 steps timed{' (extrapolated to 50)' if k < 50 else ''}, {repeats} round(s), "
            f"estimated {round_cost * repeats:.1f}s of {budget.left():.0f}s left")

    samples = {name: {"wall": [], "model": [], "sampler": []} for name in methods}
    reports, passes, finite = {}, {}, {}
    with torch.no_grad():
        for r in range(repeats):
            for name in methods:
                if budget.left() < sync_cost and r > 0:
                    break
                cap = k if name == "dense-50" and k < 50 else None
                y, rep, vp = run(name, steps_cap=cap)
                scale = 50 / rep.steps if cap else 1.0
                samples[name]["wall"].append(rep.time_total_s * scale)
                samples[name]["model"].append(rep.time_model_s * scale)
                samples[name]["sampler"].append(rep.time_sampler_s * scale)
                reports[name], passes[name] = rep, vp
                finite[name] = bool(torch.isfinite(y).all())
            kit.log(f"  e2e round {r + 1}/{repeats}: " + ", ".join(f"{n} {v['wall'][-1]:.2f}s"
                                                                  for n, v in samples.items() if v["wall"]))
    med = {n: {q: statistics.median(v[q]) for q in v} for n, v in samples.items() if v["wall"]}
    tcfg = tr.config
    flops = {}
    for name in med:
        active = [h * w] * 50 if name == "dense-50" else reports[name].active_tokens
        flops[name] = flux_run_flops(tcfg, active, text)
    rows = []
    d50 = med.get("dense-50")
    for name, m in med.items():
        rep = reports[name]
        row = {"method": name, "steps": 50 if name == "dense-50" else rep.steps, "wall_s": round(m["wall"], 3),
               "model_s": round(m["model"], 3), "sampler_overhead": round(m["sampler"] / m["wall"], 4),
               "validation_passes": sum(passes[name].values()), "finite_output": finite[name]}
        if name == "dense-50" and k < 50:
            row["note"] = f"{k} steps timed, x {50 / k:.2f}"
        if name.startswith("JiT") and d50:
            steps = row["steps"]
            same_wall, same_model = d50["wall"] * steps / 50, d50["model"] * steps / 50  # dense steps cost alike
            same_flops = flux_run_flops(tcfg, [h * w] * steps, text)
            row.update(speedup_vs_dense50=round(d50["wall"] / m["wall"], 2),
                       flop_ratio_vs_dense50=round(flops["dense-50"].total / flops[name].total, 2),
                       image_linear_flop_ratio_vs_dense50=round(flops["dense-50"].image_linear / flops[name].image_linear, 2),
                       model_time_ratio_vs_dense50=round(d50["model"] / m["model"], 2),
                       realised_vs_dense50=round((d50["wall"] / m["wall"]) / (d50["model"] / m["model"]), 3),
                       speedup_vs_dense_same_steps=round(same_wall / m["wall"], 2),
                       flop_ratio_vs_dense_same_steps=round(same_flops.total / flops[name].total, 2),
                       model_time_ratio_vs_dense_same_steps=round(same_model / m["model"], 2))
        rows.append(row)
    out["rows"] = rows
    out["dense_same_steps"] = "derived from dense-50's per-step time (every dense step costs the same)"
    # Syncs (CUDA) / validation passes (CPU) in the quiet steps of a JiT run with the fused attention.
    name = "JiT 7x + anchor attn"
    c7, sig7, _ = methods[name]
    plan = make_plan(c7, h, w, sig7)
    quiet = {i for i in range(1, plan.steps) if not plan.is_transition(i)}
    check = {"run": name, "quiet_steps": len(quiet)}
    try:
        with torch.no_grad():
            pw = StepProbe(cuda, quiet, "warn" if cuda else None)
            with pw.active():
                run(name, probe=pw)
            check["validation_passes_per_step"] = pw.passes
            check["validation_passes_quiet_steps"] = sum(pw.passes[i] for i in quiet)
            ok = check["validation_passes_quiet_steps"] == 0
            if cuda:
                check["syncs_per_step"] = pw.syncs
                check["syncs_quiet_steps"] = sum(pw.syncs[i] for i in quiet)
                pe = StepProbe(True, quiet, "error")
                try:
                    with pe.active():
                        run(name, probe=pe)
                    check["error_mode"] = "no sync in the quiet steps"
                except RuntimeError as exc:
                    check["error_mode"] = f"sync at step {pe.step - 1}: {str(exc)[:300]}"
                    ok = False
                ok &= check["syncs_quiet_steps"] == 0
        check["ok"] = ok
        if not ok:
            kit.fail("e2e", f"{name}: quiet steps synced or validated: {check}"[:400])
    except Exception as exc:
        check.update(ok=False, error=repr(exc)[:300])
        kit.fail("e2e", f"sync check: {exc!r}"[:300])
    out["quiet_step_check"] = check
    if cuda:
        out["max_memory_GiB"] = round(torch.cuda.max_memory_allocated() / 2**30, 1)
    del tr
    if cuda:
        torch.cuda.empty_cache()
    return out


# ---------------------------------------------------------------- compute-sanitizer


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


# ---------------------------------------------------------------- report


def _fmt_q(q) -> str:
    return "/".join(f"{x:g}" for x in q) if isinstance(q, list) else str(q)


def write_report(kit: Kit) -> None:
    res = kit.result
    res["ok"] = not kit.failures
    res["failures"] = kit.failures
    probes = res.get("parity_summary", {}).get("strided_destination_probes", [])
    res["known_issues"] = [f"{p['op']} ({p['probe']}): {p['known_issue']}" for p in probes if p.get("known_issue")]
    res["known_issues_fixed"] = [f"{p['op']} ({p['probe']})" for p in probes if p.get("note", "").startswith("consistent now")]
    kit.out.mkdir(parents=True, exist_ok=True)
    (kit.out / "gpu_check.json").write_text(json.dumps(res, indent=1, default=str) + "\n")
    L = [f"# GPU proof kit{' (DRY RUN on CPU: proves the kit runs, not the GPU)' if kit.dry else ''}", "",
         f"**{'PASS' if res['ok'] else 'FAIL'}**: {len(kit.failures)} failure(s)", ""]
    env = res.get("env", {})
    for key in ("date_utc", "gpu", "gpu_arch", "machine", "python", "torch", "cuda", "triton", "diffusers", "git",
                "backends_under_test", "stand_in", "command"):
        if key in env:
            L.append(f"- {key}: {env[key]}")
    L += ["", "## Sections", "", "| section | status | seconds | budget |", "|---|---|---|---|"]
    for name, s in res.get("sections", {}).items():
        L.append(f"| {name} | {s.get('status')} | {s.get('seconds')} | {s.get('budget_s', '')} |")
    if kit.failures:
        L += ["", "## Failures", ""] + [f"- {f}" for f in kit.failures[:60]]
        if len(kit.failures) > 60:
            L.append(f"- ... {len(kit.failures) - 60} more in gpu_check.json")
    par = res.get("parity")
    if par:
        L += ["", "## Parity against reference", "", "| op | backend | records | failed | max abs err | dtypes |", "|---|---|---|---|---|---|"]
        agg: dict = {}
        for r in par:
            a = agg.setdefault((r["op"], r["backend"]), {"n": 0, "bad": 0, "err": 0.0, "dt": set()})
            a["n"] += 1
            a["bad"] += not r["ok"]
            a["dt"].add(r["dtype"])
            if r.get("max_err") is not None and r["check"] != "exact":
                a["err"] = max(a["err"], r["max_err"])
        for (op, be), a in agg.items():
            L.append(f"| {op} | {be} | {a['n']} | {a['bad']} | {a['err']:.2e} | {', '.join(sorted(a['dt']))} |")
        ps = res.get("parity_summary", {})
        L.append("")
        L.append(f"Index ops and copies bit-exact; others within jit_kernels.testing.tolerance. "
                 f"Cases left out for budget: {ps.get('skipped_for_budget', 0)}.")
        for p in ps.get("strided_destination_probes", []):
            L.append(f"- {p['op']} on a strided destination: {p['outcomes']}"
                     + (f" -- known issue: {p['known_issue']}" if p.get("known_issue") else "")
                     + (f" -- {p['note']}" if p.get("note") else ""))
    bad = res.get("bad_inputs")
    if bad and bad.get("cases"):
        n_ok = sum(1 for c in bad["cases"] if c.get("ok"))
        L += ["", "## Bad inputs", "", f"{n_ok}/{len(bad['cases'])} raised the expected type with a healthy context "
              f"and a clean exit ({bad['children']} child processes, {bad['per_child']})."]
        for c in bad["cases"]:
            if not c.get("ok"):
                L.append(f"- FAILED {c['case']} on {c['backend']}: raised {c.get('raised')}, expected {c.get('expected')}")
    smp = res.get("sampler")
    if smp:
        L += ["", "## Sampler (small velocity fn)", "",
              "| run | steps | launches per step | quiet max | validation passes per step | syncs per step | ok |",
              "|---|---|---|---|---|---|---|"]
        for r in smp:
            L.append(f"| {r['preset']} {r['policy']} {r['backend']} | {r.get('steps')} | {r.get('launches_per_step')} | "
                     f"{r.get('launches_quiet_step_max')} | {r.get('validation_passes_per_step')} | "
                     f"{r.get('syncs_per_step', 'n/a (CPU)')} | {r.get('ok', r.get('skipped'))} |")
        if smp and smp[0].get("launch_unit"):
            L.append(f"\nLaunch unit: {smp[0]['launch_unit']}; the velocity fn alone: {smp[0].get('velocity_fn_launches')}.")
        sy = res.get("syncs", {})
        L.append(f"Syncs: {sy.get('method')}.")
        for s in sy.get("runs", []):
            L.append(f"- {s['run']}: quiet steps {s['quiet_steps']}, syncs there {s.get('syncs_quiet_steps')}"
                     + (f", error mode: {s['error_mode']}" if "error_mode" in s else ""))
    bench = res.get("bench")
    if bench and bench.get("ops"):
        L += ["", f"## Bench ({bench['timer']}; copy bandwidth {bench['copy_bandwidth_GBps']} GB/s)", "",
              "| op | size | dtype | backend | ours us | torch us | published us | x vs torch | GB/s | of copy bw |",
              "|---|---|---|---|---|---|---|---|---|---|"]
        for r in bench["ops"]:
            L.append(f"| {r['op']} | {r['size']} | {r['dtype']} | {r['backend']} | {_fmt_q(r.get('ours_us'))} | "
                     f"{_fmt_q(r.get('torch_us', ''))} | {_fmt_q(r.get('published_us', ''))} | {r.get('x_vs_torch', '')} | "
                     f"{r.get('GB/s', '')} | {r.get('of_copy_bw', '')} |")
        if bench.get("attention"):
            L += ["", "| attention | tokens | dtype | stock ms | " + " | ".join(f"{b} ms | x vs stock ({b})" for b in kit.backends) + " |",
                  "|---|---|---|---|" + "---|---|" * len(kit.backends)]
            for r in bench["attention"]:
                L.append(f"| {r['case']} | {r['tokens']} | {r['dtype']} | {_fmt_q(r['stock_ms'])} | " +
                         " | ".join(f"{_fmt_q(r.get(f'ours_{b}_ms'))} | {r.get(f'x_vs_stock_{b}')}" for b in kit.backends) + " |")
        if bench.get("variants"):
            L += ["", "Kernel variants (`JIT_KERNELS_LIFT_VARIANT`, v1 = the kernels before the launch / index-math changes):",
                  "", "| op | size | dtype | backend | v1 us | v2 us | v2 speedup | same bits |", "|---|---|---|---|---|---|---|---|"]
            for r in bench["variants"]:
                be = r["backend"] + (f" (for {r['stand_in_for']})" if r.get("stand_in_for") else "")
                L.append(f"| {r['op']} | {r['size']} | {r['dtype']} | {be} | {_fmt_q(r.get('v1_us'))} | "
                         f"{_fmt_q(r.get('v2_us'))} | {r.get('v2_speedup', r.get('error', ''))} | {r.get('same_bits', '')} |")
        L.append(f"\nTimes are quantiles 0.2/0.5/0.8. Rows left out for budget: {bench.get('skipped_for_budget', 0)}.")
    e2e = res.get("e2e")
    if e2e:
        L += ["", "## End to end (random-weight FLUX transformer)", "", f"Status: {e2e.get('status')}"]
        if e2e.get("rows"):
            m = e2e["model"]
            L.append(f"\n{m.get('num_layers')} double + {m.get('num_single_layers')} single blocks, "
                     f"{m.get('num_attention_heads')} x {m.get('attention_head_dim')} heads, {e2e['parameters'] / 1e6:.1f} M "
                     f"parameters, {e2e['dtype']}, {e2e['grid']} grid + {e2e['text_tokens']} text tokens; "
                     f"dense steps timed {e2e['dense_steps_timed']}/50, {e2e['repeats']} round(s).\n")
            cols = ["method", "steps", "wall_s", "model_s", "sampler_overhead", "speedup_vs_dense50", "flop_ratio_vs_dense50",
                    "model_time_ratio_vs_dense50", "realised_vs_dense50", "speedup_vs_dense_same_steps",
                    "validation_passes"]
            L += ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
            L += ["| " + " | ".join(str(r.get(c, "")) for c in cols) + " |" for r in e2e["rows"]]
            q = e2e.get("quiet_step_check", {})
            L.append(f"\nQuiet-step check ({q.get('run')}): validation passes {q.get('validation_passes_quiet_steps')}, "
                     f"syncs {q.get('syncs_quiet_steps', 'n/a (CPU)')}"
                     + (f", error mode: {q['error_mode']}" if "error_mode" in q else "") + f"; ok {q.get('ok')}")
        elif e2e.get("how_to"):
            L.append(f"\n{e2e['how_to']}")
    san = res.get("sanitizer")
    if san:
        L += ["", "## compute-sanitizer", "", f"Status: {san.get('status')}; {san.get('error_summary') or ''} "
              f"{san.get('note') or ''} (parity records {san.get('parity_records')}, failed {san.get('parity_failed')})"]
    if res["known_issues"]:
        L += ["", "Known issues seen in this run (reported, not counted as failures):"] + [f"- {k}" for k in res["known_issues"]]
    if res["known_issues_fixed"]:
        L += ["", "Known issues no longer seen (remove them from KNOWN_ISSUES in benchmarks/gpu_check.py so a "
              "regression fails): " + ", ".join(res["known_issues_fixed"])]
    (kit.out / "gpu_check.md").write_text("\n".join(L) + "\n")


# ---------------------------------------------------------------- main


def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m benchmarks.gpu_check", description=__doc__.splitlines()[0])
    p.add_argument("--out", default=None, help="output folder (gpu_check.json, gpu_check.md)")
    p.add_argument("--dry-run", action="store_true", help="CPU rehearsal: tiny shapes, interpreter Triton, cpp for cuda")
    p.add_argument("--section", choices=SECTIONS, default=None, help="run one section (env always runs)")
    p.add_argument("--small", action="store_true", help="parity on a small subset (the compute-sanitizer run)")
    p.add_argument("--build", action="store_true", help="first run `python setup.py build_ext --inplace` for this GPU")
    p.add_argument("--e2e-steps", type=int, default=0, help="dense steps to time and extrapolate to 50 (0: as many as fit)")
    p.add_argument("--budget-scale", type=float, default=1.0, help="multiply every section's time budget")
    p.add_argument("--time-limit", type=float, default=None,
                   help="hard wall-clock seconds for the whole command, --build included: every budget shrinks "
                        "to fit what is left after the build (for a machine that kills a command at a fixed limit)")
    p.add_argument("--total-budget", type=float, default=None,
                   help="seconds for all sections (default 470 on a GPU, 300 dry); the sanitizer gets what is left")
    p.add_argument("--child-bad", default=None, help=argparse.SUPPRESS)
    p.add_argument("--child-parity", default=None, help=argparse.SUPPRESS)
    p.add_argument("--child-budget", type=float, default=60.0, help=argparse.SUPPRESS)
    p.add_argument("--backend", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.argv = list(argv)
    if args.child_bad is None and args.child_parity is None and not args.out:
        p.error("--out DIR is required")
    return args


def sanitizer_seconds(total: float, elapsed: float, dry: bool) -> float | None:
    """The last section's budget: what the others left of the total (less 5 s), or None when too
    little is left to start compute-sanitizer and the child it watches."""
    seconds = total - elapsed - 5.0
    return seconds if seconds >= (10.0 if dry else 30.0) else None


def main(argv=None) -> int:
    process_start = time.perf_counter()
    cli = argv is None
    argv = list(sys.argv[1:] if cli else argv)
    args = parse_args(argv)
    if args.out:  # children run from the repo root: hand them (and the report) an absolute path
        args.out = str(Path(args.out).resolve())
    if args.child_bad is not None:
        _prepare_env(args.dry_run, argv if cli else None)
        with _exact_fp32():  # the health check compares fp32 lifts
            return run_bad_child(args.child_bad.split("|"), args.backend, args.dry_run)
    if args.child_parity is not None:
        _prepare_env(args.dry_run, argv if cli else None)
        if args.dry_run:
            torch.set_num_threads(1)
        shard, shards = (int(x) for x in args.child_parity.split("/"))
        return run_parity_child(shard, shards, args.child_budget, args.dry_run, args.small)
    if not args.dry_run and not torch.cuda.is_available():
        print("gpu_check: no CUDA device here. Run on a GPU machine, or rehearse with --dry-run.", file=sys.stderr)
        return 2
    build = run_build(args.dry_run, None if args.time_limit is None else 0.6 * args.time_limit) if args.build else None
    if build is not None and build["rc"] != 0:
        print(build["log_tail"], file=sys.stderr)
    _prepare_env(args.dry_run, argv if cli else None)
    if args.dry_run and cli:
        torch.set_num_threads(1)  # tiny shapes on a shared 2-core machine: threads only contend
    kit = Kit(out=Path(args.out), dry=args.dry_run, small=args.small,
              device="cpu" if args.dry_run else "cuda", backends=[], args=args)
    budgets = {k: v * args.budget_scale for k, v in (BUDGET_DRY if kit.dry else BUDGET_GPU).items()}
    kit.result = {"ok": None, "env": {}, "parity": [], "sampler": [], "syncs": {}, "bench": {}, "e2e": {},
                  "bad_inputs": {}, "sanitizer": {}, "sections": {}}
    kit.log(f"gpu_check: {'DRY RUN on CPU' if kit.dry else 'CUDA'}; output {kit.out}")
    t = time.perf_counter()
    try:
        kit.result["env"] = section_env(kit)
        status = "ok"
    except Exception as exc:
        traceback.print_exc()
        kit.fail("env", repr(exc))
        status = "error"
    if build is not None:
        kit.result["env"]["build"] = build
        if build["rc"] != 0:
            kit.fail("env", f"the extension build failed (rc {build['rc']}): {build['log_tail'][-300:]}")
    kit.result["sections"]["env"] = {"status": status, "seconds": round(time.perf_counter() - t, 1)}
    kit.log(f"env: {kit.result['env'].get('gpu', '')} backends under test {kit.backends}")
    write_report(kit)

    wanted = [args.section] if args.section else list(SECTIONS)
    total = args.total_budget if args.total_budget is not None else (300.0 if kit.dry else 470.0) * args.budget_scale
    if args.time_limit is not None:
        # What the limit leaves after the build, imports and env, less a margin for the last child's
        # teardown and the report: every budget shrinks by the same factor to fit.
        left = args.time_limit - (time.perf_counter() - process_start) - 20.0
        fit = max(0.0, min(1.0, left / total)) if total > 0 else 0.0
        budgets = {k: v * fit for k, v in budgets.items()}
        total *= fit
        kit.result["env"]["time_limit"] = {"seconds": args.time_limit, "budget_fit": round(fit, 3),
                                           "total_budget_s": round(total, 1)}
        kit.log(f"time limit {args.time_limit:.0f}s: {left:.0f}s left for the sections, budgets x {fit:.2f}")
    run_start = time.perf_counter()
    for name in wanted:
        if not kit.backends and name != "e2e":
            kit.result["sections"][name] = {"status": "skipped: no backend under test"}
            continue
        seconds = budgets[name]
        if name == "sanitizer" and len(wanted) > 1:  # the last section: whatever the others left of the total
            seconds = sanitizer_seconds(total, time.perf_counter() - run_start, kit.dry)
            if seconds is None:
                kit.result["sections"][name] = {"status": "skipped: out of time"}
                kit.log(f"{name}: skipped, out of time")
                continue
        budget = Budget(seconds)
        n_fail = len(kit.failures)
        kit.log(f"{name}: start (budget {budget.seconds:.0f}s)")
        status = "ok"
        try:
            if name == "parity":
                kit.result["parity"], kit.result["parity_summary"] = section_parity(kit, budget)
            elif name == "bad_inputs":
                kit.result["bad_inputs"] = section_bad_inputs(kit, budget)
            elif name == "sampler":
                kit.result["sampler"], kit.result["syncs"] = section_sampler(kit, budget)
            elif name == "bench":
                kit.result["bench"] = section_bench(kit, budget)
            elif name == "e2e":
                kit.result["e2e"] = section_e2e(kit, budget)
                if str(kit.result["e2e"].get("status", "")).startswith("skipped"):
                    status = kit.result["e2e"]["status"]
            elif name == "sanitizer":
                kit.result["sanitizer"] = section_sanitizer(kit, budget)
                status = kit.result["sanitizer"].get("status", "ok")
        except Exception as exc:
            traceback.print_exc()
            kit.fail(name, f"section crashed: {exc!r}"[:400])
        if len(kit.failures) > n_fail:
            status = f"FAILED ({len(kit.failures) - n_fail})"
        kit.result["sections"][name] = {"status": status, "seconds": round(budget.elapsed(), 1),
                                        "budget_s": round(budget.seconds)}
        kit.log(f"{name}: {status} in {budget.elapsed():.1f}s")
        write_report(kit)
    write_report(kit)
    kit.log(f"{'PASS' if not kit.failures else 'FAIL'}: {len(kit.failures)} failure(s); wrote "
            f"{kit.out / 'gpu_check.json'} and {kit.out / 'gpu_check.md'}")
    for f in kit.failures[:20]:
        print(f"  - {f}")
    return 0 if not kit.failures else 1


if __name__ == "__main__":
    raise SystemExit(main())
