// Device-side validation of index tensors, shared by every CUDA kernel of the
// extension (declared in checks.cuh).
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>

#include <algorithm>
#include <cstring>

#include "checks.cuh"

namespace jit_kernels {
namespace {

// flags[0]: set to 1 by an out-of-range value, flags[1]: set to 1 by a
// duplicate; bad[0] / bad[1] keep one offending value of each kind (for the
// message). bits is a zeroed bitmap of rows * ceil(upper / 32) words.
__global__ void validate_index_kernel(const int64_t* __restrict__ idx, int64_t rows, int64_t m, int64_t upper,
                                      bool unique, uint32_t* __restrict__ bits, int64_t words_per_row,
                                      int* __restrict__ flags, unsigned long long* __restrict__ bad) {
  const int64_t total = rows * m;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < total; i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t v = idx[i];
    if (v < 0 || v >= upper) {
      atomicExch(&flags[0], 1);
      atomicExch(&bad[0], static_cast<unsigned long long>(v));
      continue;
    }
    if (unique) {
      const int64_t r = i / m;
      const uint32_t bit = 1u << (v & 31);
      const uint32_t old = atomicOr(&bits[r * words_per_row + (v >> 5)], bit);
      if (old & bit) {
        atomicExch(&flags[1], 1);
        atomicExch(&bad[1], static_cast<unsigned long long>(v));
      }
    }
  }
}

}  // namespace

void check_index_values_cuda(const char* op, const char* name, const at::Tensor& idx, int64_t upper, bool unique) {
  // The callers checked the metadata (a CUDA idx on their tensors' device) and hold a guard of that
  // device; checked again here, before the guard, so no caller can launch on the wrong device.
  check_cuda(op, name, idx);
  const c10::cuda::CUDAGuard guard(idx.device());
  const int64_t rows = idx.dim() == 1 ? 1 : idx.size(0);
  const int64_t m = idx.size(-1);
  if (rows * m == 0) return;
  const int64_t words = unique ? (upper + 31) / 32 : 0;
  // One int64 buffer: [flags (2 x int32 = 1 word), bad values (2 words), bitmap].
  at::Tensor scratch = at::zeros({3 + (rows * words + 1) / 2}, idx.options().dtype(at::kLong));
  int64_t* base = scratch.data_ptr<int64_t>();
  int* flags = reinterpret_cast<int*>(base);
  auto* bad = reinterpret_cast<unsigned long long*>(base + 1);
  auto* bits = reinterpret_cast<uint32_t*>(base + 3);
  const int threads = 256;
  const int64_t blocks = std::min<int64_t>((rows * m + threads - 1) / threads, 4096);
  validate_index_kernel<<<blocks, threads, 0, at::cuda::getCurrentCUDAStream()>>>(
      idx.data_ptr<int64_t>(), rows, m, upper, unique, bits, words, flags, bad);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  const at::Tensor host = scratch.narrow(0, 0, 3).cpu();  // synchronises with the stream
  const int64_t* h = host.data_ptr<int64_t>();
  int hf[2];
  std::memcpy(hf, h, sizeof(hf));
  TORCH_CHECK_INDEX(!hf[0], op, ": ", name, " has value ", h[1], " outside [0, ", upper, ")");
  TORCH_CHECK_VALUE(!hf[1], op, ": ", name, " contains duplicate indices (", h[2], ")");
}

}  // namespace jit_kernels
