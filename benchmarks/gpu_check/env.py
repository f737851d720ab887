"""Section ``env``: versions, the GPU, and which backends are under test."""

from __future__ import annotations

import shutil

import torch

from .build import build_command
from .common import Kit, _interpret_on
from .sanitizer import _find_sanitizer


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
