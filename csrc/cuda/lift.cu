// CUDA kernels: the nearest-anchor map, the fused lift (nearest fill + separable
// Gaussian blur with reflect padding + exact anchors), and lift fused with an
// Euler step. Semantics are those of jit_kernels/reference/lift.py.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <climits>
#include <cstdlib>
#include <cstring>

#include "checks.cuh"

namespace jit_kernels {
namespace {

// ---------------------------------------------------------------- kernel variants

// A/B switch of the lift family (jit_kernels/_env.py, benchmarks/README.md "Kernel
// variants"), read at every call so one process can time both: JIT_KERNELS_LIFT_VARIANT
// unset, "" or "v2" selects the current kernels, "v1" the kernels before the launch and
// index-math changes (kept for A/B timing). Any other value is a ValueError, raised before
// any work.
bool lift_v1(const char* op) {
  const char* v = std::getenv("JIT_KERNELS_LIFT_VARIANT");
  if (v == nullptr || v[0] == '\0' || std::strcmp(v, "v2") == 0) return false;
  TORCH_CHECK_VALUE(std::strcmp(v, "v1") == 0, op, ": JIT_KERNELS_LIFT_VARIANT='", v,
                    "': expected one of ('v2', 'v1')");
  return true;
}

// Threads that fill an H100 / H200 once (132 SMs x 2048 resident threads): v2 launches
// give each thread more work only while the launch keeps at least this many threads.
constexpr int64_t kFullWaveThreads = 132 * 2048;

// reflect_index (checks.h) in int32: valid for n <= 2^30 (check_grid), where the period
// 2 (n - 1) and every i a kernel forms (a cell plus or minus the blur radius) fit int32.
__device__ __forceinline__ int reflect_index32(int i, int n) {
  if (i >= 0 && i < n) return i;
  if (n == 1) return 0;
  const int period = 2 * (n - 1);
  i %= period;
  if (i < 0) i += period;
  return i >= n ? period - i : i;
}

// ---------------------------------------------------------------- nearest map

constexpr int kNearThreads = 256;

// One thread per grid cell, blockIdx.y = anchor row (sample; rows past the
// 65535 grid limit are visited by a grid-stride loop, uniform per block, so the
// barriers stay block-wide). The anchors are streamed through shared memory in
// tiles of kNearThreads; each thread keeps the smallest exact integer (int64)
// squared distance. Anchors are visited in index order and only a strictly
// smaller distance replaces the best, so ties go to the anchor that comes first
// in anchor_idx, exactly like the reference argmin.
__global__ void nearest_map_kernel(const int64_t* __restrict__ anchors, int64_t rows, int64_t m, int64_t h,
                                   int64_t w, int64_t* __restrict__ out) {
  __shared__ int64_t srow[kNearThreads];
  __shared__ int64_t scol[kNearThreads];
  const int64_t n = h * w;
  const int64_t p = blockIdx.x * int64_t(kNearThreads) + threadIdx.x;
  const int64_t r = p / w, c = p % w;
  for (int64_t row = blockIdx.y; row < rows; row += gridDim.y) {
    const int64_t* a = anchors + row * m;
    int64_t best = INT64_MAX, bj = 0;
    for (int64_t t0 = 0; t0 < m; t0 += kNearThreads) {
      // Every thread takes part in loading and in both barriers, even past the grid end.
      const int64_t jl = t0 + threadIdx.x;
      if (jl < m) {
        const int64_t q = a[jl];
        srow[threadIdx.x] = q / w;
        scol[threadIdx.x] = q % w;
      }
      __syncthreads();
      const int64_t cnt = min(int64_t(kNearThreads), m - t0);
      for (int64_t u = 0; u < cnt; ++u) {
        const int64_t dr = r - srow[u], dc = c - scol[u];
        const int64_t d2 = dr * dr + dc * dc;
        if (d2 < best) best = d2, bj = t0 + u;
      }
      __syncthreads();
    }
    if (p < n) out[row * n + p] = bj;
  }
}

// v2: 16 warps per block share a tile of 32 cells (one per lane) and split the anchor list
// (warp s takes anchors s, s + 16, ... of each shared tile), then reduce the 16 partial
// minima in shared memory. The v1 kernel gives one thread per cell the whole list: 16
// blocks of 256 threads at 64 x 64, on a GPU with 132 SMs. Here 128 blocks of 512 threads
// each scan 1/16 of the list. Grid arithmetic in int32 (cells < 2^30, check_grid); squared
// distances widen to int64. Ties: within a slice only a strictly smaller distance replaces
// (anchors visited in order), across slices the smaller (distance, position) wins, so the
// first-listed anchor at the smallest distance is chosen, as in v1 and the reference.
constexpr int kNearCells = 32;
constexpr int kNearSlices = 16;
constexpr int kNearTile = kNearCells * kNearSlices;  // anchors staged per pass: one per thread

__global__ void nearest_map_kernel_v2(const int64_t* __restrict__ anchors, int64_t rows, int64_t m, int h, int w,
                                      int64_t* __restrict__ out) {
  __shared__ int srow[kNearTile];
  __shared__ int scol[kNearTile];
  __shared__ long long sbest[kNearSlices][kNearCells];
  __shared__ int sidx[kNearSlices][kNearCells];
  const int n = h * w;
  const int tid = threadIdx.y * kNearCells + threadIdx.x;
  const int p = blockIdx.x * kNearCells + threadIdx.x;
  const int r = p / w, c = p % w;
  for (int64_t row = blockIdx.y; row < rows; row += gridDim.y) {
    const int64_t* a = anchors + row * m;
    long long best = LLONG_MAX;
    int bj = 0;
    for (int64_t t0 = 0; t0 < m; t0 += kNearTile) {
      // Every thread takes part in loading and in both barriers, even past the grid end.
      if (t0 + tid < m) {
        const int q = static_cast<int>(a[t0 + tid]);
        srow[tid] = q / w;
        scol[tid] = q % w;
      }
      __syncthreads();
      const int cnt = static_cast<int>(min(int64_t(kNearTile), m - t0));
      for (int u = threadIdx.y; u < cnt; u += kNearSlices) {
        const int dr = r - srow[u], dc = c - scol[u];
        const long long d2 = static_cast<long long>(dr) * dr + static_cast<long long>(dc) * dc;
        if (d2 < best) best = d2, bj = static_cast<int>(t0) + u;
      }
      __syncthreads();
    }
    sbest[threadIdx.y][threadIdx.x] = best;
    sidx[threadIdx.y][threadIdx.x] = bj;
    __syncthreads();
    if (threadIdx.y == 0) {
      for (int s = 1; s < kNearSlices; ++s) {
        const long long d = sbest[s][threadIdx.x];
        const int j = sidx[s][threadIdx.x];
        if (d < best || (d == best && j < bj)) best = d, bj = j;
      }
      if (p < n) out[row * n + p] = bj;
    }
    __syncthreads();  // the next sample reuses the shared arrays
  }
}

at::Tensor nearest_anchor_map_cuda(const at::Tensor& anchor_idx_in, int64_t height, int64_t width, bool validate) {
  constexpr const char* op = "nearest_anchor_map";
  const bool v1 = lift_v1(op);
  check_grid(op, height, width, -1);
  check_cuda(op, "anchor_idx", anchor_idx_in);
  check_index_meta(op, "anchor_idx", anchor_idx_in, anchor_idx_in.dim() == 2 ? anchor_idx_in.size(0) : 1);
  TORCH_CHECK_VALUE(anchor_idx_in.size(-1) > 0, op, ": anchor_idx is empty; at least one anchor is required");
  const c10::cuda::CUDAGuard guard(anchor_idx_in.device());
  const at::Tensor a = anchor_idx_in.contiguous();
  const int64_t n = height * width;
  if (validate) check_index_values_cuda(op, "anchor_idx", a, n, /*unique=*/true);
  const int64_t rows = a.dim() == 1 ? 1 : a.size(0), m = a.size(-1);
  at::Tensor out = a.dim() == 1 ? at::empty({n}, a.options()) : at::empty({rows, n}, a.options());
  if (rows == 0) return out;
  const unsigned grid_y = static_cast<unsigned>(std::min<int64_t>(rows, kMaxGridYZ));
  if (v1) {
    const dim3 grid(static_cast<unsigned>((n + kNearThreads - 1) / kNearThreads), grid_y);
    nearest_map_kernel<<<grid, kNearThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
        a.data_ptr<int64_t>(), rows, m, height, width, out.data_ptr<int64_t>());
  } else {
    const dim3 grid(static_cast<unsigned>((n + kNearCells - 1) / kNearCells), grid_y);
    nearest_map_kernel_v2<<<grid, dim3(kNearCells, kNearSlices), 0, at::cuda::getCurrentCUDAStream()>>>(
        a.data_ptr<int64_t>(), rows, m, static_cast<int>(height), static_cast<int>(width), out.data_ptr<int64_t>());
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

// ---------------------------------------------------------------- lift

constexpr int kLanes = 32;  // threads over channels (one warp reads a contiguous channel run)
constexpr int kCells = 8;   // cells per block (one warp each)

// One thread per (sample, cell, channel): blockIdx.z = sample, blockIdx.x =
// tile of kCells cells, blockIdx.y = tile of kLanes channels (samples and channel
// tiles past the 65535 limit of grid axes y and z are visited by grid-stride
// loops). The filled field
// is never stored: each stencil tap reads its nearest anchor's row through the
// map, so a warp's loads are one contiguous run of channels of one anchor row.
// Horizontal taps are summed per stencil row, then weighted vertically, i.e.
// the same separable order as the reference blur. Anchors keep their value.
// kEuler: out[b, p, ch] += dt * lift (the latent y), else out = lift; out is
// addressed through its strides (os0, os1, os2), so a strided y is updated in place.
// An index read by a lift kernel: in [0, upper), else a device-side assert (as index_select's CUDA
// kernel) and false, so the caller skips the cell instead of reading out of bounds.
__device__ __forceinline__ bool index_ok(int64_t v, int64_t upper) {
  const bool ok = static_cast<uint64_t>(v) < static_cast<uint64_t>(upper);
  CUDA_KERNEL_ASSERT(ok && "jit_kernels: lift index out of range");
  return ok;
}

// A nearest-map entry read by a stencil tap: itself when in [0, m), else (after index_ok's assert) 0,
// a valid anchor row, so a bad entry never reads outside the anchor values.
__device__ __forceinline__ int64_t safe_row(int64_t v, int64_t m) { return index_ok(v, m) ? v : 0; }

template <typename T, bool kEuler>
__global__ void lift_kernel(const float* __restrict__ vals, int64_t bsz, int64_t m, int64_t c,
                            const int64_t* __restrict__ anchors, int64_t anchors_bstride,
                            const int64_t* __restrict__ nearest, int64_t nearest_bstride,
                            const float* __restrict__ weights, int k, int64_t h, int64_t w, float dt,
                            T* __restrict__ out, int64_t os0, int64_t os1, int64_t os2) {
  extern __shared__ float sw[];  // the K blur taps
  for (int t = threadIdx.y * kLanes + threadIdx.x; t < k; t += kLanes * kCells) sw[t] = weights[t];
  __syncthreads();
  const int64_t n = h * w;
  const int64_t p = blockIdx.x * int64_t(kCells) + threadIdx.y;
  if (p >= n) return;
  const int rad = k / 2;
  const int64_t row = p / w, col = p % w;
  for (int64_t b = blockIdx.z; b < bsz; b += gridDim.z) {
    const int64_t* near = nearest + b * nearest_bstride;
    const int64_t j = near[p];
    if (!index_ok(j, m) || !index_ok(anchors[b * anchors_bstride + j], n))
      continue;  // a bad index (device-side assert in index_ok): the cell is skipped, nothing is read
    const bool is_anchor = anchors[b * anchors_bstride + j] == p;
    for (int64_t ch = blockIdx.y * int64_t(kLanes) + threadIdx.x; ch < c; ch += int64_t(gridDim.y) * kLanes) {
      const float* vb = vals + b * m * c + ch;
      float v;
      if (is_anchor) {
        v = vb[j * c];  // an anchor keeps its exact value
      } else {
        v = 0.f;
        for (int ty = 0; ty < k; ++ty) {
          const int64_t* nrow = near + reflect_index(row + ty - rad, h) * w;
          float hs = 0.f;
          for (int tx = 0; tx < k; ++tx) hs += sw[tx] * vb[safe_row(nrow[reflect_index(col + tx - rad, w)], m) * c];
          v += sw[ty] * hs;
        }
      }
      T* dst = out + b * os0 + p * os1 + ch * os2;
      if (kEuler) {
        *dst = static_cast<T>(static_cast<float>(*dst) + dt * v);
      } else {
        *dst = static_cast<T>(v);
      }
    }
  }
}

// v2: lift_kernel with int32 grid arithmetic (cells, rows, columns and the reflect of each
// tap; H * W <= 2^30, check_grid) and kVec channels per thread (channels lane, lane + 32,
// ...), so each tap's reflect and nearest-index load serve kVec outputs. Per channel the
// taps are summed in the same order as lift_kernel, so the results are the same bits.
template <typename T, bool kEuler, int kVec>
__global__ void lift_kernel_v2(const float* __restrict__ vals, int64_t bsz, int64_t m, int64_t c,
                               const int64_t* __restrict__ anchors, int64_t anchors_bstride,
                               const int64_t* __restrict__ nearest, int64_t nearest_bstride,
                               const float* __restrict__ weights, int k, int h, int w, float dt,
                               T* __restrict__ out, int64_t os0, int64_t os1, int64_t os2) {
  extern __shared__ float sw[];  // the K blur taps
  for (int t = threadIdx.y * kLanes + threadIdx.x; t < k; t += kLanes * kCells) sw[t] = weights[t];
  __syncthreads();
  const int n = h * w;
  const int p = blockIdx.x * kCells + threadIdx.y;
  if (p >= n) return;
  const int rad = k / 2;
  const int row = p / w, col = p % w;
  const int64_t span = int64_t(kLanes) * kVec;  // channels of one thread row
  for (int64_t b = blockIdx.z; b < bsz; b += gridDim.z) {
    const int64_t* near = nearest + b * nearest_bstride;
    const int64_t j = near[p];
    if (!index_ok(j, m) || !index_ok(anchors[b * anchors_bstride + j], n))
      continue;  // a bad index (device-side assert in index_ok): the cell is skipped, nothing is read
    const bool is_anchor = anchors[b * anchors_bstride + j] == p;
    for (int64_t ch0 = blockIdx.y * span + threadIdx.x; ch0 < c; ch0 += int64_t(gridDim.y) * span) {
      const float* vb = vals + b * m * c + ch0;
      bool live[kVec];
      float v[kVec];
#pragma unroll
      for (int i = 0; i < kVec; ++i) {
        live[i] = ch0 + int64_t(kLanes) * i < c;
        v[i] = 0.f;
      }
      if (is_anchor) {
#pragma unroll
        for (int i = 0; i < kVec; ++i)
          if (live[i]) v[i] = vb[j * c + kLanes * i];  // an anchor keeps its exact value
      } else {
        for (int ty = 0; ty < k; ++ty) {
          const int64_t* nrow = near + int64_t(reflect_index32(row + ty - rad, h)) * w;
          float hs[kVec];
#pragma unroll
          for (int i = 0; i < kVec; ++i) hs[i] = 0.f;
          for (int tx = 0; tx < k; ++tx) {
            const float wt = sw[tx];
            const float* src = vb + safe_row(nrow[reflect_index32(col + tx - rad, w)], m) * c;
#pragma unroll
            for (int i = 0; i < kVec; ++i)
              if (live[i]) hs[i] += wt * src[kLanes * i];
          }
          const float wy = sw[ty];
#pragma unroll
          for (int i = 0; i < kVec; ++i) v[i] += wy * hs[i];
        }
      }
#pragma unroll
      for (int i = 0; i < kVec; ++i) {
        if (!live[i]) continue;
        T* dst = out + b * os0 + int64_t(p) * os1 + (ch0 + int64_t(kLanes) * i) * os2;
        if (kEuler) {
          *dst = static_cast<T>(static_cast<float>(*dst) + dt * v[i]);
        } else {
          *dst = static_cast<T>(v[i]);
        }
      }
    }
  }
}

// Channels per thread of a v2 lift launch: the widest of 4, 2, 1 that leaves no lane idle
// (C >= 32 * kVec) and still launches a full wave of threads (kFullWaveThreads). At FLUX
// 1024^2 (4096 cells, C = 64) that is 1 at B = 1 and 2 from B = 3.
int lift_vec(int64_t b, int64_t n, int64_t c) {
  const int64_t outputs = b * n * c;
  for (int vec : {4, 2}) {
    if (c >= int64_t(kLanes) * vec && outputs / vec >= kFullWaveThreads) return vec;
  }
  return 1;
}

struct LiftArgs {
  at::Tensor vals;     // [B, M, C] fp32 contiguous
  at::Tensor anchors;  // [M] or [B, M] contiguous
  at::Tensor nearest;  // [N] or [B, N] contiguous
  at::Tensor weights;  // [K] fp32 contiguous
};

// Metadata of a lift (shapes, dtypes, devices): every tensor on values' device, a CUDA one. Runs
// before any device guard or allocation, so a mixed CPU/CUDA call is a ValueError like on CPU.
void lift_meta(const char* op, const at::Tensor& values, const at::Tensor& anchor_idx, const at::Tensor& nearest,
               const at::Tensor& weights, int64_t height, int64_t width) {
  check_lift_meta(op, values, anchor_idx, nearest, weights, height, width);
  check_cuda(op, "values", values);
}

// The index values (with validate) and the fp32 / contiguous operands; under the device guard of values.
LiftArgs lift_prepare(const char* op, const at::Tensor& values, const at::Tensor& anchor_idx,
                      const at::Tensor& nearest, const at::Tensor& weights, int64_t height, int64_t width,
                      bool validate) {
  const int64_t m = values.size(1), n = height * width;
  LiftArgs a{values.to(at::kFloat).contiguous(), anchor_idx.contiguous(), nearest.contiguous(), weights.contiguous()};
  if (validate) check_index_values_cuda(op, "anchor_idx", a.anchors, n, /*unique=*/false);
  if (validate) check_index_values_cuda(op, "nearest", a.nearest, m, /*unique=*/false);
  if (validate) check_nearest_consistent(op, a.anchors, a.nearest);
  return a;
}

template <bool kEuler>
void launch_lift(const LiftArgs& a, at::Tensor& out, int64_t h, int64_t w, float dt, bool v1) {
  const int64_t b = a.vals.size(0), m = a.vals.size(1), c = a.vals.size(2), n = h * w;
  if (b == 0 || c == 0) return;
  const int vec = v1 ? 1 : lift_vec(b, n, c);
  const dim3 grid(static_cast<unsigned>((n + kCells - 1) / kCells),
                  static_cast<unsigned>(std::min<int64_t>((c + kLanes * vec - 1) / (kLanes * vec), kMaxGridYZ)),
                  static_cast<unsigned>(std::min<int64_t>(b, kMaxGridYZ)));
  const dim3 block(kLanes, kCells);
  const int k = static_cast<int>(a.weights.size(0));
  const size_t smem = sizeof(float) * k;
  TORCH_CHECK_VALUE(smem <= 48 * 1024, "lift: kernel size ", k, " is too large");
  auto stream = at::cuda::getCurrentCUDAStream();
  const int64_t abs_ = index_batch_stride(a.anchors), nbs = a.nearest.dim() == 1 ? 0 : n;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, out.scalar_type(), "lift_cuda", [&] {
    const float* vals = a.vals.data_ptr<float>();
    const int64_t* anchors = a.anchors.data_ptr<int64_t>();
    const int64_t* nearest = a.nearest.data_ptr<int64_t>();
    const float* wts = a.weights.data_ptr<float>();
    scalar_t* dst = out.data_ptr<scalar_t>();
    const int hi = static_cast<int>(h), wi = static_cast<int>(w);
    if (v1) {
      lift_kernel<scalar_t, kEuler><<<grid, block, smem, stream>>>(
          vals, b, m, c, anchors, abs_, nearest, nbs, wts, k, h, w, dt, dst, out.stride(0), out.stride(1),
          out.stride(2));
    } else if (vec == 4) {
      lift_kernel_v2<scalar_t, kEuler, 4><<<grid, block, smem, stream>>>(
          vals, b, m, c, anchors, abs_, nearest, nbs, wts, k, hi, wi, dt, dst, out.stride(0), out.stride(1),
          out.stride(2));
    } else if (vec == 2) {
      lift_kernel_v2<scalar_t, kEuler, 2><<<grid, block, smem, stream>>>(
          vals, b, m, c, anchors, abs_, nearest, nbs, wts, k, hi, wi, dt, dst, out.stride(0), out.stride(1),
          out.stride(2));
    } else {
      lift_kernel_v2<scalar_t, kEuler, 1><<<grid, block, smem, stream>>>(
          vals, b, m, c, anchors, abs_, nearest, nbs, wts, k, hi, wi, dt, dst, out.stride(0), out.stride(1),
          out.stride(2));
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

at::Tensor lift_field_cuda(const at::Tensor& values, const at::Tensor& anchor_idx, const at::Tensor& nearest,
                           const at::Tensor& weights, int64_t height, int64_t width, bool validate) {
  constexpr const char* op = "lift_field";
  const bool v1 = lift_v1(op);
  lift_meta(op, values, anchor_idx, nearest, weights, height, width);  // before the guard: values may be a CPU tensor
  const c10::cuda::CUDAGuard guard(values.device());
  const LiftArgs a = lift_prepare(op, values, anchor_idx, nearest, weights, height, width, validate);
  at::Tensor out = at::empty({values.size(0), height * width, values.size(2)}, values.options());
  launch_lift<false>(a, out, height, width, 0.f, v1);
  return out;
}

void lift_euler_cuda(at::Tensor& y, const at::Tensor& values, const at::Tensor& anchor_idx, const at::Tensor& nearest,
                     const at::Tensor& weights, int64_t height, int64_t width, double dt, bool validate) {
  constexpr const char* op = "lift_euler_";
  const bool v1 = lift_v1(op);
  // Every metadata check (the CPU kernel's, in its order, plus CUDA tensors) before the device guard and the
  // value checks.
  check_tokens(op, "y", y);
  lift_meta(op, values, anchor_idx, nearest, weights, height, width);
  check_same_device(op, y, "y", values, "values");
  check_euler_target(op, y, values, anchor_idx, nearest, height * width);
  const c10::cuda::CUDAGuard guard(y.device());
  const LiftArgs a = lift_prepare(op, values, anchor_idx, nearest, weights, height, width, validate);
  launch_lift<true>(a, y, height, width, static_cast<float>(dt), v1);
}

}  // namespace

TORCH_LIBRARY_IMPL(jit_kernels, CUDA, m) {
  m.impl("nearest_anchor_map", &nearest_anchor_map_cuda);
  m.impl("lift_field", &lift_field_cuda);
  m.impl("lift_euler_", &lift_euler_cuda);
}

}  // namespace jit_kernels
