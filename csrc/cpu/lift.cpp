// CPU kernels: the nearest-anchor map and the fused lift (nearest fill + separable
// Gaussian blur with reflect padding + exact anchors), plus lift fused with an Euler step.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <limits>
#include <memory>
#include <vector>

#include "checks.h"

namespace jit_kernels {
namespace {

// ---------------------------------------------------------------- nearest map

// Brute force: O(N * M), best when anchors are few and far apart.
void nearest_brute(const int64_t* anchors, int64_t m, int64_t h, int64_t w, int64_t* out) {
  std::vector<int64_t> ar(m), ac(m);
  for (int64_t j = 0; j < m; ++j) ar[j] = anchors[j] / w, ac[j] = anchors[j] % w;
  at::parallel_for(0, h * w, 64, [&](int64_t lo, int64_t hi) {
    for (int64_t p = lo; p < hi; ++p) {
      const int64_t r = p / w, c = p % w;
      int64_t best = std::numeric_limits<int64_t>::max(), bj = 0;
      for (int64_t j = 0; j < m; ++j) {
        const int64_t dr = r - ar[j], dc = c - ac[j];
        const int64_t d2 = dr * dr + dc * dc;
        if (d2 < best) best = d2, bj = j;  // strict: the first anchor wins ties
      }
      out[p] = bj;
    }
  });
}

// Ring search on an owner grid: scan square rings of growing Chebyshev radius R
// around each cell. Every cell of ring R is at squared distance >= R^2, so once
// R^2 exceeds the best distance found nothing closer (or tied) can remain.
void nearest_rings(const int64_t* anchors, int64_t m, int64_t h, int64_t w, int64_t* out) {
  std::vector<int64_t> owner(h * w, -1);
  for (int64_t j = 0; j < m; ++j) owner[anchors[j]] = j;
  const int64_t rmax = std::max(h, w);
  at::parallel_for(0, h * w, 64, [&](int64_t lo, int64_t hi) {
    for (int64_t p = lo; p < hi; ++p) {
      const int64_t r = p / w, c = p % w;
      int64_t best = std::numeric_limits<int64_t>::max(), bj = -1;
      auto visit = [&](int64_t rr, int64_t cc) {
        if (rr < 0 || rr >= h || cc < 0 || cc >= w) return;
        const int64_t j = owner[rr * w + cc];
        if (j < 0) return;
        const int64_t d2 = (rr - r) * (rr - r) + (cc - c) * (cc - c);
        if (d2 < best || (d2 == best && j < bj)) best = d2, bj = j;
      };
      for (int64_t R = 0; R <= rmax && R * R <= best; ++R) {
        if (R == 0) {
          visit(r, c);
          continue;
        }
        for (int64_t cc = c - R; cc <= c + R; ++cc) visit(r - R, cc), visit(r + R, cc);
        for (int64_t rr = r - R + 1; rr <= r + R - 1; ++rr) visit(rr, c - R), visit(rr, c + R);
      }
      out[p] = bj;
    }
  });
}

at::Tensor nearest_anchor_map_cpu(const at::Tensor& anchor_idx_in, int64_t height, int64_t width, bool validate) {
  constexpr const char* op = "nearest_anchor_map";
  check_grid(op, height, width, -1);
  check_index_meta(op, "anchor_idx", anchor_idx_in, anchor_idx_in.dim() == 2 ? anchor_idx_in.size(0) : 1);
  TORCH_CHECK_VALUE(anchor_idx_in.size(-1) > 0, op, ": anchor_idx is empty; at least one anchor is required");
  const at::Tensor a = anchor_idx_in.contiguous();
  const int64_t n = height * width;
  check_index_values(op, "anchor_idx", a, n, /*unique=*/validate);  // the range always
  const int64_t rows = a.dim() == 1 ? 1 : a.size(0), m = a.size(-1);
  at::Tensor out = a.dim() == 1 ? at::empty({n}, a.options()) : at::empty({rows, n}, a.options());
  // Ring search costs about N * (N / M) cell visits, brute force N * M.
  const bool brute = m * m <= 8 * n;
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t* ap = a.data_ptr<int64_t>() + r * m;
    int64_t* op_ = out.data_ptr<int64_t>() + r * n;
    if (brute) {
      nearest_brute(ap, m, height, width, op_);
    } else {
      nearest_rings(ap, m, height, width, op_);
    }
  }
  return out;
}

// ---------------------------------------------------------------- lift

struct LiftArgs {
  at::Tensor vals;     // [B, M, C] fp32 contiguous
  at::Tensor anchors;  // [M] or [B, M] contiguous
  at::Tensor nearest;  // [N] or [B, N] contiguous
  at::Tensor weights;  // [K] fp32 contiguous
  int64_t h, w;
};

// The index values and the fp32 / contiguous operands; after check_lift_meta. Ranges always (no
// index value can make the lift read outside its tensors), the consistency of the map with validate.
LiftArgs lift_prepare(const char* op, const at::Tensor& values, const at::Tensor& anchor_idx,
                      const at::Tensor& nearest, const at::Tensor& weights, int64_t height, int64_t width,
                      bool validate) {
  const int64_t m = values.size(1), n = height * width;
  LiftArgs a{values.to(at::kFloat).contiguous(), anchor_idx.contiguous(), nearest.contiguous(), weights.contiguous(),
             height, width};
  check_index_values(op, "anchor_idx", a.anchors, n, /*unique=*/false);
  check_index_values(op, "nearest", a.nearest, m, /*unique=*/false);
  if (validate) check_nearest_consistent(op, a.anchors, a.nearest);
  return a;
}

// Horizontal taps over the nearest-filled field for cells [lo, hi): the filled
// field is never stored, each tap reads the anchor row through the map.
JIT_KERNELS_HOT static void lift_hpass(const float* __restrict__ vals, const int64_t* __restrict__ near,
                           const int64_t* __restrict__ colmap, const float* __restrict__ wt, float* __restrict__ tmp,
                           int64_t lo, int64_t hi, int64_t w, int64_t k, int64_t c) {
  for (int64_t p = lo; p < hi; ++p) {
    const int64_t row = p / w, col = p % w;
    float* __restrict__ dst = tmp + p * c;
    const int64_t* cm = colmap + col * k;
    const int64_t* nrow = near + row * w;
    // Neighbouring cells mostly share their nearest anchor: merge runs of taps
    // that read the same anchor row into one weighted read.
    int64_t cur = nrow[cm[0]];
    float wsum = wt[0];
    bool first = true;
    for (int64_t t = 1; t <= k; ++t) {
      const int64_t nxt = t < k ? nrow[cm[t]] : -1;
      if (nxt == cur) {
        wsum += wt[t];
        continue;
      }
      const float* __restrict__ src = vals + cur * c;
      if (first) {
        for (int64_t ch = 0; ch < c; ++ch) dst[ch] = wsum * src[ch];
        first = false;
      } else {
        for (int64_t ch = 0; ch < c; ++ch) dst[ch] += wsum * src[ch];
      }
      if (t < k) cur = nxt, wsum = wt[t];
    }
  }
}

// Vertical taps of one cell over the horizontal pass.
JIT_KERNELS_HOT static void lift_vpass(const float* __restrict__ tmp, const int64_t* __restrict__ rows,
                           const float* __restrict__ wt, float* __restrict__ acc, int64_t col, int64_t w, int64_t k,
                           int64_t c) {
  const float* s0 = tmp + (rows[0] * w + col) * c;
  for (int64_t ch = 0; ch < c; ++ch) acc[ch] = wt[0] * s0[ch];
  for (int64_t t = 1; t < k; ++t) {
    const float* __restrict__ src = tmp + (rows[t] * w + col) * c;
    const float wv = wt[t];
    for (int64_t ch = 0; ch < c; ++ch) acc[ch] += wv * src[ch];
  }
}

// Calls emit(b, p, src) for every cell p of every sample, where src points to the
// C fp32 lifted values of that cell: the anchor's own row for anchors, else the
// blurred nearest-filled field. Two passes per sample through an fp32 scratch:
// horizontal taps over the filled field, then vertical taps.
template <typename Emit>
void lift_rows(const LiftArgs& a, Emit emit) {
  const int64_t bsz = a.vals.size(0), m = a.vals.size(1), c = a.vals.size(2);
  const int64_t h = a.h, w = a.w, n = h * w, k = a.weights.size(0), rad = k / 2;
  const float* vals = a.vals.data_ptr<float>();
  const float* wt = a.weights.data_ptr<float>();
  const int64_t abs_ = index_batch_stride(a.anchors), nbs = a.nearest.dim() == 1 ? 0 : n;
  float* const tmp = scratch_floats(0, static_cast<size_t>(n * c));  // fully written by the first pass
  // Reflected column / row offsets of every tap, computed once.
  std::vector<int64_t> colmap(w * k), rowmap(h * k);
  for (int64_t x = 0; x < w; ++x)
    for (int64_t t = 0; t < k; ++t) colmap[x * k + t] = reflect_index(x + t - rad, w);
  for (int64_t y = 0; y < h; ++y)
    for (int64_t t = 0; t < k; ++t) rowmap[y * k + t] = reflect_index(y + t - rad, h);
  const int64_t grain = std::max<int64_t>(1, 4096 / std::max<int64_t>(c, 1));
  for (int64_t b = 0; b < bsz; ++b) {
    const int64_t* near = a.nearest.data_ptr<int64_t>() + b * nbs;
    const int64_t* anc = a.anchors.data_ptr<int64_t>() + b * abs_;
    const float* vb = vals + b * m * c;
    at::parallel_for(0, n, grain, [&](int64_t lo, int64_t hi) {
      lift_hpass(vb, near, colmap.data(), wt, tmp, lo, hi, w, k, c);
    });
    at::parallel_for(0, n, grain, [&](int64_t lo, int64_t hi) {
      std::unique_ptr<float[]> acc(new float[c]);
      for (int64_t p = lo; p < hi; ++p) {
        const int64_t j = near[p];
        if (anc[j] == p) {  // an anchor keeps its exact value
          emit(b, p, vb + j * c);
          continue;
        }
        lift_vpass(tmp, rowmap.data() + (p / w) * k, wt, acc.get(), p % w, w, k, c);
        emit(b, p, acc.get());
      }
    });
  }
}

at::Tensor lift_field_cpu(const at::Tensor& values, const at::Tensor& anchor_idx, const at::Tensor& nearest,
                          const at::Tensor& weights, int64_t height, int64_t width, bool validate) {
  constexpr const char* op = "lift_field";
  check_lift_meta(op, values, anchor_idx, nearest, weights, height, width);
  const LiftArgs a = lift_prepare(op, values, anchor_idx, nearest, weights, height, width, validate);
  const int64_t b = values.size(0), c = values.size(2), n = height * width;
  at::Tensor out = at::empty({b, n, c}, values.options());
  if (out.numel() == 0) return out;  // no samples or no channels: nothing to compute
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, values.scalar_type(), "lift_field_cpu", [&] {
    scalar_t* o = out.data_ptr<scalar_t>();
    lift_rows(a, [&](int64_t bb, int64_t p, const float* src) {
      scalar_t* dst = o + (bb * n + p) * c;
      for (int64_t ch = 0; ch < c; ++ch) dst[ch] = static_cast<scalar_t>(src[ch]);
    });
  });
  return out;
}

// y += dt * lift for a contiguous y.
void euler_rows(const LiftArgs& a, at::Tensor& y, int64_t n, int64_t c, double dt) {
  const float fdt = static_cast<float>(dt);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, y.scalar_type(), "lift_euler_cpu", [&] {
    scalar_t* yo = y.data_ptr<scalar_t>();
    lift_rows(a, [&](int64_t bb, int64_t p, const float* src) {
      scalar_t* dst = yo + (bb * n + p) * c;
      for (int64_t ch = 0; ch < c; ++ch) dst[ch] = static_cast<scalar_t>(static_cast<float>(dst[ch]) + fdt * src[ch]);
    });
  });
}

void lift_euler_cpu(at::Tensor& y, const at::Tensor& values, const at::Tensor& anchor_idx, const at::Tensor& nearest,
                    const at::Tensor& weights, int64_t height, int64_t width, double dt, bool validate) {
  constexpr const char* op = "lift_euler_";
  check_tokens(op, "y", y);
  check_lift_meta(op, values, anchor_idx, nearest, weights, height, width);
  check_same_device(op, y, "y", values, "values");
  const int64_t c = values.size(2), n = height * width;
  check_euler_target(op, y, values, anchor_idx, nearest, n);  // any strides, no overlap
  // Metadata first, then the index values (as every kernel does: a bad shape is reported as such).
  const LiftArgs a = lift_prepare(op, values, anchor_idx, nearest, weights, height, width, validate);
  if (y.numel() == 0) return;  // no samples or no channels: nothing to update
  if (y.is_contiguous()) {
    euler_rows(a, y, n, c, dt);
    return;
  }
  // A strided y: update a contiguous copy and write it back (the same arithmetic, so the same bits).
  at::Tensor yc = y.contiguous();
  euler_rows(a, yc, n, c, dt);
  y.copy_(yc);
}

}  // namespace

TORCH_LIBRARY_IMPL(jit_kernels, CPU, m) {
  m.impl("nearest_anchor_map", &nearest_anchor_map_cpu);
  m.impl("lift_field", &lift_field_cpu);
  m.impl("lift_euler_", &lift_euler_cpu);
}

}  // namespace jit_kernels
