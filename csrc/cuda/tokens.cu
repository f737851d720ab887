// CUDA kernels: token gather and scatter (shared [M] or per-sample [B, M]
// indices). The device-side index validation is in checks.cu.
//
// Layout: one warp per token row, lanes stride over the channels, so every
// warp reads and writes a contiguous run of C elements (coalesced when the
// channel stride is 1). blockIdx.y is the sample (samples past the 65535 limit
// of grid axis y are visited by a grid-stride loop).
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "checks.cuh"

namespace jit_kernels {
namespace {

constexpr int kWarp = 32;
constexpr int kRowsPerBlock = 8;  // 8 warps = 256 threads

// dst[b, dst_row(b, j), :] = src[b, src_row(b, j), :] for j < m, where a null
// row table means the identity. Strides are in elements, so non-contiguous
// tensors (and in-place updates of a strided base) need no copies. Every row
// index is checked where it is read (src rows in [0, sn), dst rows in [0, dn)):
// a bad one trips a device-side assert (as index_select's CUDA kernel) and its
// row is skipped, so no index value reads or writes outside src / dst.
template <typename T>
__global__ void copy_rows_kernel(const T* __restrict__ src, int64_t ss0, int64_t ss1, int64_t ss2,
                                 const int64_t* __restrict__ src_rows, int64_t src_rows_bstride, T* __restrict__ dst,
                                 int64_t ds0, int64_t ds1, int64_t ds2, const int64_t* __restrict__ dst_rows,
                                 int64_t dst_rows_bstride, int64_t batch, int64_t m, int64_t c, int64_t sn,
                                 int64_t dn) {
  const int64_t j = blockIdx.x * int64_t(kRowsPerBlock) + threadIdx.x / kWarp;
  if (j >= m) return;
  const int lane = threadIdx.x % kWarp;
  for (int64_t b = blockIdx.y; b < batch; b += gridDim.y) {
    const int64_t sr = src_rows ? src_rows[b * src_rows_bstride + j] : j;
    const int64_t dr = dst_rows ? dst_rows[b * dst_rows_bstride + j] : j;
    const bool ok = static_cast<uint64_t>(sr) < static_cast<uint64_t>(sn) &&
                    static_cast<uint64_t>(dr) < static_cast<uint64_t>(dn);
    CUDA_KERNEL_ASSERT(ok && "jit_kernels: token index out of range");
    if (!ok) continue;
    const T* sp = src + b * ss0 + sr * ss1;
    T* dp = dst + b * ds0 + dr * ds1;
    for (int64_t k = lane; k < c; k += kWarp) dp[k * ds2] = sp[k * ss2];
  }
}

void launch_copy_rows(const at::Tensor& src, const int64_t* src_rows, int64_t src_rows_bstride, at::Tensor& dst,
                      const int64_t* dst_rows, int64_t dst_rows_bstride, int64_t batch, int64_t m) {
  if (batch == 0 || m == 0 || src.size(2) == 0) return;
  const dim3 grid(static_cast<unsigned>((m + kRowsPerBlock - 1) / kRowsPerBlock),
                  static_cast<unsigned>(std::min<int64_t>(batch, kMaxGridYZ)));
  const dim3 block(kRowsPerBlock * kWarp);
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, src.scalar_type(), "copy_rows_cuda", [&] {
    copy_rows_kernel<scalar_t><<<grid, block, 0, stream>>>(
        src.data_ptr<scalar_t>(), src.stride(0), src.stride(1), src.stride(2), src_rows, src_rows_bstride,
        dst.data_ptr<scalar_t>(), dst.stride(0), dst.stride(1), dst.stride(2), dst_rows, dst_rows_bstride, batch, m,
        src.size(2), src.size(1), dst.size(1));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

at::Tensor gather_tokens_cuda(const at::Tensor& x, const at::Tensor& idx_in, bool validate) {
  constexpr const char* op = "gather_tokens";
  check_tokens(op, "x", x);
  check_cuda(op, "x", x);
  check_index_meta(op, "idx", idx_in, x.size(0));
  check_same_device(op, x, "x", idx_in, "idx");
  const c10::cuda::CUDAGuard guard(x.device());
  const at::Tensor idx = idx_in.contiguous();
  if (validate) check_index_values_cuda(op, "idx", idx, x.size(1), /*unique=*/false);
  const int64_t b = x.size(0), m = idx.size(-1);
  at::Tensor out = at::empty({b, m, x.size(2)}, x.options());
  launch_copy_rows(x, idx.data_ptr<int64_t>(), index_batch_stride(idx), out, nullptr, 0, b, m);
  return out;
}

void scatter_checks(const char* op, const at::Tensor& base, const at::Tensor& idx, const at::Tensor& src) {
  check_scatter_meta(op, base, idx, src);
  check_cuda(op, "base", base);
}

void scatter_into(at::Tensor& base, const at::Tensor& idx, const at::Tensor& src_in) {
  const at::Tensor src = src_in.scalar_type() == base.scalar_type() ? src_in : src_in.to(base.scalar_type());
  launch_copy_rows(src, nullptr, 0, base, idx.data_ptr<int64_t>(), index_batch_stride(idx), base.size(0),
                   idx.size(-1));
}

void scatter_tokens_inplace_cuda(at::Tensor& base, const at::Tensor& idx_in, const at::Tensor& src,
                                 bool validate) {
  constexpr const char* op = "scatter_tokens_";
  scatter_checks(op, base, idx_in, src);
  check_scatter_target(op, base, idx_in, src);
  const c10::cuda::CUDAGuard guard(base.device());
  const at::Tensor idx = idx_in.contiguous();
  // Unique rows: with duplicates the result would depend on thread timing.
  if (validate) check_index_values_cuda(op, "idx", idx, base.size(1), /*unique=*/true);
  scatter_into(base, idx, src);
}

at::Tensor scatter_tokens_cuda(const at::Tensor& base, const at::Tensor& idx_in, const at::Tensor& src,
                               bool validate) {
  constexpr const char* op = "scatter_tokens";
  scatter_checks(op, base, idx_in, src);
  const c10::cuda::CUDAGuard guard(base.device());
  const at::Tensor idx = idx_in.contiguous();
  if (validate) check_index_values_cuda(op, "idx", idx, base.size(1), /*unique=*/true);
  at::Tensor out = base.clone(at::MemoryFormat::Contiguous);
  scatter_into(out, idx, src);
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(jit_kernels, CUDA, m) {
  m.impl("gather_tokens", &gather_tokens_cuda);
  m.impl("scatter_tokens", &scatter_tokens_cuda);
  m.impl("scatter_tokens_", &scatter_tokens_inplace_cuda);
}

}  // namespace jit_kernels
