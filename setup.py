"""Build script: the pure-Python packages always, plus the compiled extension ``jit_kernels._C``.

The extension has CPU kernels (C++/OpenMP) always and CUDA kernels when the
installed torch is a CUDA build and a CUDA toolkit is found. Switches:

- ``JIT_KERNELS_BUILD_EXT=0``: skip the extension entirely (pure Python install).
- ``JIT_KERNELS_CUDA=0|1``: force the CUDA kernels off / on (default: auto).
- ``TORCH_CUDA_ARCH_LIST`` (e.g. ``"9.0"``) and ``MAX_JOBS`` are honoured as usual.

torch is not a build requirement (pip would fetch a multi-GB build into an
isolated environment): install torch first, then ``pip install -e . --no-build-isolation``.
"""

import glob
import os

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _flag(name, default):
    v = os.environ.get(name)
    return default if v is None or v == "" else v not in ("0", "false", "False", "no", "off")


def _extensions():
    if not _flag("JIT_KERNELS_BUILD_EXT", True):
        return [], {}
    try:
        import torch
        from torch.utils import cpp_extension as ce
    except ImportError:
        print("jit_kernels: torch is not installed at build time; building without jit_kernels._C")
        return [], {}

    rel = lambda pattern: sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, pattern)))
    sources = rel("csrc/*.cpp") + rel("csrc/cpu/*.cpp")
    cxx = ["-O3", "-std=c++20", "-fopenmp"]
    define_macros = []  # torch's builder defines Py_LIMITED_API itself for py_limited_api=True
    want_cuda = _flag("JIT_KERNELS_CUDA", torch.version.cuda is not None and ce.CUDA_HOME is not None)
    if want_cuda:
        if torch.version.cuda is None or ce.CUDA_HOME is None:
            raise RuntimeError("JIT_KERNELS_CUDA=1 but torch is not a CUDA build or no CUDA toolkit (CUDA_HOME) was found")
        include_dirs = [os.path.join(ROOT, "csrc")]
        # Headers of the nvidia-* wheels (cusparse.h, ...) that a bare toolkit may lack.
        try:
            import nvidia

            for base in nvidia.__path__:
                include_dirs += sorted(glob.glob(os.path.join(base, "*", "include")))
        except ImportError:
            pass
        ext = ce.CUDAExtension(
            "jit_kernels._C",
            sources + rel("csrc/cuda/*.cu"),
            include_dirs=include_dirs,
            define_macros=define_macros + [("JIT_KERNELS_WITH_CUDA", "1")],
            # No --use_fast_math: it flushes subnormals to zero (-ftz=true), so the lift and Euler update
            # would differ from the Triton kernels and the reference on tiny values; the kernels use no
            # division or transcendental math it could speed up (and -fmad=true is nvcc's default).
            extra_compile_args={"cxx": cxx, "nvcc": ["-O3", "-std=c++20", "-lineinfo"]},
            extra_link_args=["-fopenmp"],
            py_limited_api=True,
        )
    else:
        ext = ce.CppExtension(
            "jit_kernels._C",
            sources,
            include_dirs=[os.path.join(ROOT, "csrc")],
            define_macros=define_macros,
            extra_compile_args={"cxx": cxx},
            extra_link_args=["-fopenmp"],
            py_limited_api=True,
        )
    return [ext], {"build_ext": ce.BuildExtension}


ext_modules, cmdclass = _extensions()

setup(
    packages=find_packages(include=["jit_kernels*", "jit_sampler*"]),
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    options={"bdist_wheel": {"py_limited_api": "cp39"}} if ext_modules else {},
)
