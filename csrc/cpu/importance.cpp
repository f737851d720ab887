// CPU kernels of importance-guided token activation: the 3x3 local-variance
// score and the top-k selection among inactive tokens.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <functional>
#include <memory>
#include <vector>

#include "checks.h"

namespace jit_kernels {
namespace {

// Row sums of v and v^2 over a 3-wide window (zero padding) for cells [lo, hi).
JIT_KERNELS_HOT static void importance_hpass(const float* __restrict__ f, float* __restrict__ s1, float* __restrict__ s2,
                                 int64_t lo, int64_t hi, int64_t w, int64_t c) {
  for (int64_t p = lo; p < hi; ++p) {
    const int64_t col = p % w;
    float* __restrict__ a = s1 + p * c;
    float* __restrict__ q = s2 + p * c;
    const float* __restrict__ x = f + p * c;
    for (int64_t ch = 0; ch < c; ++ch) a[ch] = x[ch], q[ch] = x[ch] * x[ch];
    if (col > 0) {
      const float* __restrict__ l = x - c;
      for (int64_t ch = 0; ch < c; ++ch) a[ch] += l[ch], q[ch] += l[ch] * l[ch];
    }
    if (col + 1 < w) {
      const float* __restrict__ r = x + c;
      for (int64_t ch = 0; ch < c; ++ch) a[ch] += r[ch], q[ch] += r[ch] * r[ch];
    }
  }
}

// Column sums of the row sums, then var = E[v^2] - E[v]^2 (window of 9, padding
// counted) averaged over channels, for cells [lo, hi). Missing rows above or
// below read a zero row (adding +0 leaves a sum unchanged), so the channel loop
// has no branches. The channel mean is accumulated in kLanes independent
// partial sums: a single running sum is a serial dependency chain that the
// compiler may not reorder, and it dominated this kernel. Each lane sums
// 81 * var = 9 * sum(v^2) - sum(v)^2, so the only division is one per cell.
constexpr int64_t kLanes = 8;

JIT_KERNELS_HOT static void importance_vpass(const float* __restrict__ s1, const float* __restrict__ s2,
                             const float* __restrict__ zeros, float* __restrict__ out, int64_t lo, int64_t hi,
                             int64_t h, int64_t w, int64_t c) {
  for (int64_t p = lo; p < hi; ++p) {
    const int64_t row = p / w;
    const float* __restrict__ a0 = s1 + p * c;
    const float* __restrict__ q0 = s2 + p * c;
    const float* __restrict__ au = row > 0 ? a0 - w * c : zeros;
    const float* __restrict__ qu = row > 0 ? q0 - w * c : zeros;
    const float* __restrict__ ad = row + 1 < h ? a0 + w * c : zeros;
    const float* __restrict__ qd = row + 1 < h ? q0 + w * c : zeros;
    float part[kLanes] = {};
    int64_t ch = 0;
    for (; ch + kLanes <= c; ch += kLanes) {
      for (int64_t l = 0; l < kLanes; ++l) {
        const float sa = a0[ch + l] + au[ch + l] + ad[ch + l];
        part[l] += 9.f * (q0[ch + l] + qu[ch + l] + qd[ch + l]) - sa * sa;
      }
    }
    for (; ch < c; ++ch) {
      const float sa = a0[ch] + au[ch] + ad[ch];
      part[0] += 9.f * (q0[ch] + qu[ch] + qd[ch]) - sa * sa;
    }
    float tot = 0.f;
    for (int64_t l = 0; l < kLanes; ++l) tot += part[l];
    out[p] = tot / (81.f * static_cast<float>(c));
  }
}

at::Tensor token_importance_cpu(const at::Tensor& field, int64_t height, int64_t width, bool /*validate*/) {
  constexpr const char* op = "token_importance";
  check_tokens(op, "field", field);
  TORCH_CHECK_VALUE(field.size(2) > 0, op,
                    ": field has no channels (C = 0): the channel mean of the local variance is undefined");
  check_grid(op, height, width, field.size(1));
  const at::Tensor f = field.to(at::kFloat).contiguous();
  const int64_t b = f.size(0), n = f.size(1), c = f.size(2);
  at::Tensor out = at::empty({b, n}, field.options().dtype(at::kFloat));
  float* const s1 = scratch_floats(0, static_cast<size_t>(n * c));
  float* const s2 = scratch_floats(1, static_cast<size_t>(n * c));
  const std::vector<float> zeros(static_cast<size_t>(c), 0.f);
  const int64_t grain = std::max<int64_t>(1, 8192 / c);
  for (int64_t bb = 0; bb < b; ++bb) {
    const float* fp = f.data_ptr<float>() + bb * n * c;
    at::parallel_for(0, n, grain, [&](int64_t lo, int64_t hi) {
      importance_hpass(fp, s1, s2, lo, hi, width, c);
    });
    at::parallel_for(0, n, grain, [&](int64_t lo, int64_t hi) {
      importance_vpass(s1, s2, zeros.data(), out.data_ptr<float>() + bb * n, lo, hi, height, width, c);
    });
  }
  return out;
}

// A 64-bit key whose unsigned order is the selection order: score descending
// with NaN first (torch.sort's order), then the lower token index. High word:
// the float bits mapped to an order-preserving unsigned int; low word: ~index.
inline uint64_t rank_key(float score, int64_t index) {
  uint32_t bits;
  if (std::isnan(score)) {
    bits = 0xFFFFFFFFu;
  } else {
    if (score == 0.f) score = 0.f;  // -0 ranks like +0
    std::memcpy(&bits, &score, sizeof(bits));
    bits = (bits & 0x80000000u) ? ~bits : (bits | 0x80000000u);
    if (bits == 0xFFFFFFFFu) bits -= 1;  // keep NaN strictly above everything
  }
  return (static_cast<uint64_t>(bits) << 32) | static_cast<uint32_t>(~static_cast<uint32_t>(index));
}

at::Tensor select_new_tokens_cpu(const at::Tensor& importance, const at::Tensor& active_in, int64_t count,
                                 bool validate) {
  constexpr const char* op = "select_new_tokens";
  TORCH_CHECK_VALUE(importance.dim() == 2 && at::isFloatingType(importance.scalar_type()), op,
                    ": importance must be a float [B, N] tensor, got ", importance.scalar_type(), " ",
                    importance.sizes());
  const int64_t b = importance.size(0), n = importance.size(1);
  // The keys pack ~index into 32 bits; the bound is the grid ops' one (same message as Python).
  TORCH_CHECK_VALUE(n <= kMaxGridTokens, op, ": importance has ", n, " tokens; at most 2^30 = ", kMaxGridTokens,
                    " are supported");
  check_index_meta(op, "active_idx", active_in, b);
  check_same_device(op, importance, "importance", active_in, "active_idx");
  const at::Tensor active = active_in.contiguous();
  check_index_values(op, "active_idx", active, n, /*unique=*/validate);  // the range always
  const int64_t m = active.size(-1);
  TORCH_CHECK_VALUE(count >= 0 && count <= n - m, op, ": count must be in [0, ", n - m,
                    "] (inactive tokens), got ", count);
  const at::Tensor s = importance.to(at::kFloat).contiguous();
  at::Tensor out = at::empty({b, count}, active.options());
  const int64_t abs_ = index_batch_stride(active);
  at::parallel_for(0, b, 1, [&](int64_t lo, int64_t hi) {
    std::vector<uint8_t> is_active(n);
    std::vector<uint64_t> cand;
    for (int64_t bb = lo; bb < hi; ++bb) {
      const float* sc = s.data_ptr<float>() + bb * n;
      const int64_t* ap = active.data_ptr<int64_t>() + bb * abs_;
      std::fill(is_active.begin(), is_active.end(), 0);
      for (int64_t j = 0; j < m; ++j) is_active[ap[j]] = 1;
      cand.clear();
      for (int64_t p = 0; p < n; ++p)
        if (!is_active[p]) cand.push_back(rank_key(sc[p], p));
      // Keys are unique, so the selection and its order are deterministic.
      std::nth_element(cand.begin(), cand.begin() + count, cand.end(), std::greater<uint64_t>());
      std::sort(cand.begin(), cand.begin() + count, std::greater<uint64_t>());
      int64_t* o = out.data_ptr<int64_t>() + bb * count;
      for (int64_t j = 0; j < count; ++j) o[j] = static_cast<int64_t>(~static_cast<uint32_t>(cand[j]));
    }
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(jit_kernels, CPU, m) {
  m.impl("token_importance", &token_importance_cpu);
  m.impl("select_new_tokens", &select_new_tokens_cpu);
}

}  // namespace jit_kernels
