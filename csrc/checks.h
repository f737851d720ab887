// Shared input checks and grid helpers of the jit_kernels C++/CUDA kernels.
//
// Every kernel validates its arguments here before touching data. The macros
// map to Python exception types: TORCH_CHECK_TYPE -> TypeError,
// TORCH_CHECK_VALUE -> ValueError, TORCH_CHECK_INDEX -> IndexError.
#pragma once

#include <ATen/ATen.h>
#include <ATen/MemoryOverlap.h>
#include <c10/util/Exception.h>

#include <cstdint>
#include <algorithm>
#include <cstring>
#include <utility>
#include <vector>

// Hot CPU loops are compiled twice, for AVX2 and for the baseline ISA,
// and the loader picks one at run time (GCC/Clang ifunc): the extension is
// built without -march, which would otherwise leave them at 4-wide SSE2.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__CUDACC__) && !defined(__clang__)
#define JIT_KERNELS_HOT __attribute__((target_clones("avx2", "default")))
#else
#define JIT_KERNELS_HOT
#endif

namespace jit_kernels {

// Mirror index i into [0, n) without repeating the edge (torch "reflect"),
// extended periodically so kernels wider than the grid stay defined.
#if defined(__CUDACC__)
__host__ __device__
#endif
inline int64_t reflect_index(int64_t i, int64_t n) {
  if (i >= 0 && i < n) return i;  // the common case: no modulo on the hot path
  if (n == 1) return 0;
  const int64_t period = 2 * (n - 1);
  i %= period;
  if (i < 0) i += period;
  return i >= n ? period - i : i;
}

inline void check_tokens(const char* op, const char* name, const at::Tensor& t) {
  TORCH_CHECK_VALUE(t.dim() == 3, op, ": ", name, " must be [B, N, C], got ", t.sizes());
  const auto st = t.scalar_type();
  TORCH_CHECK_TYPE(st == at::kFloat || st == at::kHalf || st == at::kBFloat16, op, ": ", name,
                   " must be float32, float16 or bfloat16, got ", st);
}

inline void check_same_device(const char* op, const at::Tensor& a, const char* an, const at::Tensor& b,
                              const char* bn) {
  TORCH_CHECK_VALUE(a.device() == b.device(), op, ": ", an, " (", a.device(), ") and ", bn, " (", b.device(),
                    ") must be on one device");
}

// Shape and dtype of an index tensor: int64 [M] (shared) or [batch, M] (per sample).
inline void check_index_meta(const char* op, const char* name, const at::Tensor& idx, int64_t batch) {
  TORCH_CHECK_TYPE(idx.scalar_type() == at::kLong, op, ": ", name, " must be int64, got ", idx.scalar_type());
  TORCH_CHECK_VALUE(idx.dim() == 1 || idx.dim() == 2, op, ": ", name,
                    " must be [M] (shared) or [B, M] (per sample), got ", idx.sizes());
  TORCH_CHECK_VALUE(idx.dim() == 1 || idx.size(0) == batch, op, ": ", name, " is per sample with batch ",
                    idx.size(0), ", but the tokens have batch ", batch);
}

// Values of a CPU index tensor (contiguous): all in [0, upper), always (whatever the
// kernel's `validate`: memory safety does not depend on the caller); with `unique`
// (the kernels pass their `validate`), also unique per row (an O(upper) byte map per
// row, no sort). The range test is a branch-free reduction (one unsigned compare
// covers v < 0 too), a small fraction of the work it guards; the slow path only runs
// to name the offending value. Kernels that copy rows check each index where they
// read it instead (checked_row).
inline void check_index_values(const char* op, const char* name, const at::Tensor& idx, int64_t upper, bool unique) {
  const int64_t total = idx.numel();
  const int64_t m = idx.size(-1);
  const int64_t* p = idx.data_ptr<int64_t>();
  const uint64_t lim = static_cast<uint64_t>(upper);
  bool out_of_range = false;
  for (int64_t i = 0; i < total; ++i) out_of_range |= static_cast<uint64_t>(p[i]) >= lim;
  if (C10_UNLIKELY(out_of_range)) {
    for (int64_t i = 0; i < total; ++i)
      TORCH_CHECK_INDEX(p[i] >= 0 && p[i] < upper, op, ": ", name, " has value ", p[i], " outside [0, ", upper,
                        ")");
  }
  if (!unique || m < 2) return;
  std::vector<uint8_t> seen(static_cast<size_t>(upper));
  for (int64_t r = 0; r * m < total; ++r) {
    if (r > 0) std::fill(seen.begin(), seen.end(), uint8_t{0});
    const int64_t* row = p + r * m;
    for (int64_t j = 0; j < m; ++j) {
      TORCH_CHECK_VALUE(!seen[row[j]], op, ": ", name, " contains duplicate indices (", row[j], ")");
      seen[row[j]] = 1;
    }
  }
}

// A nearest map consistent with its anchors (both already range-checked, same
// device): every anchor is its own nearest anchor, nearest[anchor_idx[j]] == j,
// which also makes the anchors unique. Works on CPU and CUDA tensors (one
// host sync on CUDA; the public Python functions check this once per tensor
// and call the kernels with validate=false).
inline void check_nearest_consistent(const char* op, const at::Tensor& anchors, const at::Tensor& nearest) {
  if (anchors.numel() == 0) return;
  const at::Tensor own = nearest.dim() == 1 ? nearest.index_select(0, anchors) : nearest.gather(1, anchors);
  const bool ok = own.eq(at::arange(anchors.size(-1), anchors.options())).all().item<bool>();
  TORCH_CHECK_VALUE(ok, op,
                    ": nearest is not a nearest-anchor map of anchor_idx: some anchor is not its own nearest anchor "
                    "(nearest[anchor_idx[j]] != j; duplicate anchors cause this too); compute it with "
                    "jit_kernels.nearest_anchor_map");
}

// One index read by a kernel: in [0, upper) or an IndexError (TORCH_CHECK_INDEX, as index_select's
// CPU loop). An exception thrown inside at::parallel_for is rethrown by the calling thread.
inline int64_t checked_row(const char* op, const char* name, int64_t v, int64_t upper) {
  TORCH_CHECK_INDEX(static_cast<uint64_t>(v) < static_cast<uint64_t>(upper), op, ": ", name, " has value ", v,
                    " outside [0, ", upper, ")");
  return v;
}

// Per-thread fp32 scratch that only grows. The kernels need an [N, C] fp32
// intermediate; a fresh megabyte-sized allocation is served by mmap and costs
// a page fault per 4 KiB on every call, which at 64 x 64 x 64 was about a
// third of the kernel time. Slot lets one kernel hold several buffers.
inline float* scratch_floats(int slot, size_t count) {
  thread_local std::vector<float> bufs[2];
  std::vector<float>& v = bufs[slot];
  if (v.size() < count) v.resize(count);
  return v.data();
}

// Largest grid (H * W cells) of the grid ops: the Triton kernels address cells in int32, tiles
// included, so 2^30 leaves them headroom (jit_kernels/_checks.py: MAX_GRID_TOKENS, same message).
constexpr int64_t kMaxGridTokens = int64_t{1} << 30;

inline void check_grid(const char* op, int64_t height, int64_t width, int64_t n) {
  TORCH_CHECK_VALUE(height >= 1 && width >= 1, op, ": height and width must be >= 1, got ", height, " x ", width);
  TORCH_CHECK_VALUE(height <= kMaxGridTokens / width, op, ": grid ", height, " x ", width,
                    " is too large: at most 2^30 = ", kMaxGridTokens, " cells are supported");
  TORCH_CHECK_VALUE(n < 0 || height * width == n, op, ": grid ", height, " x ", width, " = ", height * width,
                    " does not match N = ", n, " tokens");
}

inline void check_weights(const char* op, const at::Tensor& w) {
  TORCH_CHECK_TYPE(w.scalar_type() == at::kFloat, op, ": weights must be float32, got ", w.scalar_type());
  TORCH_CHECK_VALUE(w.dim() == 1 && w.size(0) % 2 == 1, op, ": weights must be an odd-length [K] tensor, got ",
                    w.sizes());
}

// Row stride of an index tensor viewed as [B, M]: 0 when shared by the batch.
inline int64_t index_batch_stride(const at::Tensor& idx) { return idx.dim() == 1 ? 0 : idx.size(-1); }

// --- Metadata checks shared by the CPU and CUDA kernels of one op -----------------------
// (shapes, dtypes, devices; index *values* are checked afterwards on the tensors' device).

// scatter_tokens / scatter_tokens_: base [B, N, C], idx [M] | [B, M], src [B, M, C].
inline void check_scatter_meta(const char* op, const at::Tensor& base, const at::Tensor& idx, const at::Tensor& src) {
  check_tokens(op, "base", base);
  check_tokens(op, "src", src);
  check_index_meta(op, "idx", idx, base.size(0));
  check_same_device(op, base, "base", idx, "idx");
  check_same_device(op, base, "base", src, "src");
  TORCH_CHECK_VALUE(src.size(0) == base.size(0) && src.size(1) == idx.size(-1) && src.size(2) == base.size(2), op,
                    ": src must be [B, M, C] = [", base.size(0), ", ", idx.size(-1), ", ", base.size(2), "], got ",
                    src.sizes());
}

// lift_field / lift_euler_: values [B, M, C], anchor_idx [M] | [B, M], nearest [N] | [B, N], odd weights [K].
inline void check_lift_meta(const char* op, const at::Tensor& values, const at::Tensor& anchor_idx,
                            const at::Tensor& nearest, const at::Tensor& weights, int64_t height, int64_t width) {
  check_tokens(op, "values", values);
  check_grid(op, height, width, -1);
  const int64_t b = values.size(0), m = values.size(1), n = height * width;
  check_index_meta(op, "anchor_idx", anchor_idx, b);
  check_index_meta(op, "nearest", nearest, b);
  check_weights(op, weights);
  check_same_device(op, values, "values", anchor_idx, "anchor_idx");
  check_same_device(op, values, "values", nearest, "nearest");
  check_same_device(op, values, "values", weights, "weights");
  TORCH_CHECK_VALUE(m > 0, op, ": anchor_idx is empty; at least one anchor is required");
  TORCH_CHECK_VALUE(anchor_idx.size(-1) == m, op, ": values has ", m, " rows but anchor_idx has ",
                    anchor_idx.size(-1), " anchors");
  TORCH_CHECK_VALUE(nearest.size(-1) == n, op, ": nearest has ", nearest.size(-1), " entries, expected N = ", n);
  TORCH_CHECK_VALUE(nearest.dim() == anchor_idx.dim(), op,
                    ": nearest must be per sample exactly when anchor_idx is ([B, N] with [B, M])");
}

// --- Memory overlap of in-place targets (metadata only; same rules as jit_kernels/_checks.py) ---------

// Whether t may have two elements at one memory location (same rule as jit_kernels/_checks.py).
// ATen's test decides dense layouts and a stride 0; for the layouts it calls too hard (strided
// views), dims sorted by stride, each stride beyond the span of the smaller ones, prove there is
// none; a layout that proof cannot clear counts as overlapping (refused).
inline bool has_internal_overlap(const at::Tensor& t) {
  const at::MemOverlap quick = at::has_internal_overlap(t);
  if (quick != at::MemOverlap::TooHard) return quick == at::MemOverlap::Yes;
  std::vector<std::pair<int64_t, int64_t>> dims;  // (stride, size) of the dims of size > 1
  for (int64_t d = 0; d < t.dim(); ++d)
    if (t.size(d) > 1) dims.emplace_back(t.stride(d), t.size(d));
  std::sort(dims.begin(), dims.end());
  int64_t span = 0;
  for (const auto& [stride, size] : dims) {
    if (stride <= span) return true;
    span += (size - 1) * stride;
  }
  return false;
}

// Whether the address ranges of a and b intersect: ATen's rule for the operands of in-place ops
// (two views of one buffer whose ranges intersect count as overlapping even if they interleave).
inline bool tensors_overlap(const at::Tensor& a, const at::Tensor& b) {
  if (a.numel() == 0 || b.numel() == 0 || a.device() != b.device() || a.device().is_meta()) return false;
  auto extent = [](const at::Tensor& t) {
    int64_t last = 0;
    for (int64_t d = 0; d < t.dim(); ++d) last += (t.size(d) - 1) * t.stride(d);
    return (last + 1) * static_cast<int64_t>(t.element_size());
  };
  const int64_t a0 = reinterpret_cast<int64_t>(a.data_ptr()), b0 = reinterpret_cast<int64_t>(b.data_ptr());
  return a0 < b0 + extent(b) && b0 < a0 + extent(a);
}

// The tensor an op writes in place: no internal overlap (an expand()-ed tensor would be written through
// aliases), no memory shared with an input the op reads meanwhile. Messages match the Python checks.
inline void check_inplace_target(const char* op, const char* name, const at::Tensor& t) {
  TORCH_CHECK_VALUE(!has_internal_overlap(t), op, ": ", name,
                    " has internally overlapping memory (several elements share one memory location, e.g. an "
                    "expand()-ed tensor) and cannot be written in place; pass ",
                    name, ".clone()");
}

inline void check_no_alias(const char* op, const char* target_name, const at::Tensor& target, const char* name,
                           const at::Tensor& input) {
  TORCH_CHECK_VALUE(!tensors_overlap(target, input), op, ": ", name, " overlaps the memory of ", target_name,
                    ", which the op writes in place; pass a copy (", name, ".clone())");
}

// The in-place target of scatter_tokens_: base (any strides) not overlapping itself, idx or src.
inline void check_scatter_target(const char* op, const at::Tensor& base, const at::Tensor& idx,
                                 const at::Tensor& src) {
  check_inplace_target(op, "base", base);
  check_no_alias(op, "base", base, "idx", idx);
  check_no_alias(op, "base", base, "src", src);
}

// The in-place target of lift_euler_: y [B, H*W, C] matching values, any strides, not overlapping
// itself nor the inputs.
inline void check_euler_target(const char* op, const at::Tensor& y, const at::Tensor& values,
                               const at::Tensor& anchor_idx, const at::Tensor& nearest, int64_t n) {
  const int64_t c = values.size(2);
  TORCH_CHECK_VALUE(y.size(0) == values.size(0) && y.size(1) == n && y.size(2) == c, op,
                    ": y must be [B, H*W, C] = [", values.size(0), ", ", n, ", ", c, "], got ", y.sizes());
  check_inplace_target(op, "y", y);
  check_no_alias(op, "y", y, "values", values);
  check_no_alias(op, "y", y, "anchor_idx", anchor_idx);
  check_no_alias(op, "y", y, "nearest", nearest);
}

}  // namespace jit_kernels
