// Input checks of the CUDA kernels: the shared CPU/CUDA metadata checks of
// ../checks.h plus the CUDA-only ones. The TORCH_CHECK_* macros map to Python
// exception types as described there.
#pragma once

#include <ATen/ATen.h>

#include "checks.h"

namespace jit_kernels {

// Largest grid size along axes y and z of a CUDA launch; kernels cover more by grid-stride loops.
constexpr int64_t kMaxGridYZ = 65535;

// CUDA tensors must pass every check on their own device.
inline void check_cuda(const char* op, const char* name, const at::Tensor& t) {
  TORCH_CHECK_VALUE(t.is_cuda(), op, ": ", name, " must be a CUDA tensor, got ", t.device());
}

// Values of a CUDA index tensor (contiguous): all in [0, upper); optionally
// unique per row. One validation kernel plus one small device-to-host copy:
// the only way to raise a clear error before a kernel reads out of bounds.
// Defined in checks.cu.
void check_index_values_cuda(const char* op, const char* name, const at::Tensor& idx, int64_t upper, bool unique);

}  // namespace jit_kernels
