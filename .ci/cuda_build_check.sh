#!/usr/bin/env bash
# CI step: prove that the CUDA extension compiles for sm_90 without a GPU.
#
# Usage: .ci/cuda_build_check.sh [VENV_DIR]   (default /tmp/jit-cuda-venv)
#
# A second venv gets the CUDA 13.0 build of torch (2.14.1, from local wheels)
# so that the main .venv (CPU torch) is never touched. The extension is built
# with JIT_KERNELS_CUDA=1 into a temporary directory (never into the source
# tree), then imported in that venv without a GPU, and the CUDA kernels must
# be registered with the dispatcher. A venv that already holds torch 2.14.1
# is reused, so reruns only pay for the compile.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
VENV=${1:-/tmp/jit-cuda-venv}
PY=${PYTHON:-python3}
TORCH_CUDA_PIN=torch==2.14.1
t0=$(date +%s)
stamp() { echo "--- [cuda-build $(( $(date +%s) - t0 ))s] $*"; }

if [ ! -x "$VENV/bin/python" ] || ! "$VENV/bin/python" -c "import torch, sys; sys.exit(torch.__version__.split('+')[0] != '2.14.1' or torch.version.cuda is None)" 2>/dev/null; then
  stamp "creating $VENV with $TORCH_CUDA_PIN (CUDA build)"
  rm -rf "$VENV"
  "$PY" -m venv "$VENV"
  "$VENV/bin/pip" install -q "$TORCH_CUDA_PIN" 2> >(grep -v "is ignored: it is neither a file nor a directory" >&2)
else
  stamp "reusing $VENV"
fi
"$VENV/bin/pip" install -q pybind11 ninja setuptools wheel 2> >(grep -v "is ignored: it is neither a file nor a directory" >&2)
"$VENV/bin/python" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'gpu', torch.cuda.is_available())"

WORK=$(mktemp -d /tmp/jit-cuda-build.XXXXXX)
trap 'rm -rf "$WORK"' EXIT
# Build from a copy of the sources: setup.py build_ext writes egg-info and
# build/ next to setup.py, and the tree may be in use by other builds.
mkdir -p "$WORK/src"
cp -r setup.py pyproject.toml README.md csrc jit_kernels jit_sampler "$WORK/src/"
find "$WORK/src" \( -name '*.so' -o -name '__pycache__' \) -prune -exec rm -rf {} +

stamp "compiling jit_kernels._C with CUDA (sm_90, MAX_JOBS=${MAX_JOBS:-2})"
(
  cd "$WORK/src"
  export JIT_KERNELS_CUDA=1 CUDA_HOME=${CUDA_HOME:-/usr/local/cuda} TORCH_CUDA_ARCH_LIST="9.0" MAX_JOBS=${MAX_JOBS:-2}
  export PATH="$CUDA_HOME/bin:$PATH"
  "$VENV/bin/python" setup.py -q build_ext --build-lib "$WORK/lib" --build-temp "$WORK/tmp"
)
SO=$(ls "$WORK"/lib/jit_kernels/_C*.so 2>/dev/null | head -1)
[ -n "$SO" ] || { echo "FAIL: no jit_kernels/_C*.so was built"; exit 1; }
stamp "built $(basename "$SO") ($(du -h "$SO" | cut -f1))"
# The cubins inside must target sm_90.
if command -v cuobjdump >/dev/null 2>&1 || [ -x "${CUDA_HOME:-/usr/local/cuda}/bin/cuobjdump" ]; then
  CUOBJ=$(command -v cuobjdump || echo "${CUDA_HOME:-/usr/local/cuda}/bin/cuobjdump")
  "$CUOBJ" --list-elf "$SO" | sed 's/^/    /' | head -5 || true
fi

stamp "importing the built package without a GPU"
cp -r "$WORK/src/jit_kernels/." "$WORK/lib/jit_kernels/"
cd "$WORK"  # away from the source tree, so the built copy is the one imported
PYTHONPATH="$WORK/lib" "$VENV/bin/python" - <<'EOF'
import torch
import jit_kernels
from jit_kernels import _backends

assert _backends._C is not None, f"jit_kernels._C did not load: {jit_kernels.extension_error()}"
print("loaded", _backends._C.__file__)
# Every op of the table needs a CPU kernel, and a CUDA C++ kernel unless its row routes CUDA to Triton.
missing = []
for op, row in sorted(jit_kernels._library.OPS.items()):
    cpu = torch._C._dispatch_has_kernel_for_dispatch_key(f"jit_kernels::{op}", "CPU")
    cuda = torch._C._dispatch_has_kernel_for_dispatch_key(f"jit_kernels::{op}", "CUDA")
    print(f"  {op:20s} CPU={cpu} CUDA={cuda}{' (Triton)' if row.cuda_via_triton else ''}")
    if not cpu or (not row.cuda_via_triton and not cuda):
        missing.append(op)
assert not missing, f"kernels missing: {missing}"
assert torch._C._dispatch_has_kernel_for_dispatch_key("jit_kernels::lift_field", "CUDA")
# The CPU kernels of the CUDA build still work.
x = torch.randn(2, 12, 4)
idx = torch.tensor([3, 0, 7])
assert torch.equal(torch.ops.jit_kernels.gather_tokens(x, idx), x[:, idx])
print("OK: CUDA kernels registered; CPU kernels run")
EOF
stamp "done"
