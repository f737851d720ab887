// CPU kernels of the deterministic micro-flow: the blend/assign update of the new
// tokens and the fused target (1 - sigma) * Lift_old(x0_hat)[R] + sigma * eps.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <vector>

#include "checks.h"

namespace jit_kernels {
namespace {

void microflow_update_cpu(at::Tensor& y, const at::Tensor& new_in, const at::Tensor& target, double weight,
                          bool validate) {
  constexpr const char* op = "microflow_update_";
  check_tokens(op, "y", y);
  check_tokens(op, "target", target);
  check_index_meta(op, "new_idx", new_in, y.size(0));
  check_same_device(op, y, "y", new_in, "new_idx");
  check_same_device(op, y, "y", target, "target");
  TORCH_CHECK_VALUE(weight > 0.0 && weight <= 1.0, op, ": weight must be in (0, 1], got ", weight);
  const int64_t b = y.size(0), n = y.size(1), c = y.size(2), r = new_in.size(-1);
  TORCH_CHECK_VALUE(target.size(0) == b && target.size(1) == r && target.size(2) == c, op,
                    ": target must be [B, R, C] = [", b, ", ", r, ", ", c, "], got ", target.sizes());
  // y may have any strides, but must not overlap itself nor share memory with the inputs.
  check_inplace_target(op, "y", y);
  check_no_alias(op, "y", y, "new_idx", new_in);
  check_no_alias(op, "y", y, "target", target);
  const at::Tensor idx = new_in.contiguous();
  // Uniqueness with validate; every index is range-checked where it is read (checked_row).
  if (validate) check_index_values(op, "new_idx", idx, n, /*unique=*/true);
  if (b * r * c == 0) return;  // nothing to update
  const at::Tensor t = target.to(at::kFloat).contiguous();
  const float wv = static_cast<float>(weight);
  const int64_t ibs = index_batch_stride(idx);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, y.scalar_type(), "microflow_update_cpu", [&] {
    scalar_t* yp = y.data_ptr<scalar_t>();
    const float* tp = t.data_ptr<float>();
    const int64_t* ip = idx.data_ptr<int64_t>();
    if (y.is_contiguous()) {
      at::parallel_for(0, b * r, std::max<int64_t>(1, 4096 / c), [&](int64_t lo, int64_t hi) {
        for (int64_t i = lo; i < hi; ++i) {
          const int64_t bb = i / r, j = i % r;
          scalar_t* dst = yp + (bb * n + checked_row(op, "new_idx", ip[bb * ibs + j], n)) * c;
          const float* src = tp + i * c;
          if (weight == 1.0) {  // assign: land on the target exactly
            for (int64_t ch = 0; ch < c; ++ch) dst[ch] = static_cast<scalar_t>(src[ch]);
          } else {
            for (int64_t ch = 0; ch < c; ++ch)
              dst[ch] = static_cast<scalar_t>((1.f - wv) * static_cast<float>(dst[ch]) + wv * src[ch]);
          }
        }
      });
      return;
    }
    // A strided y (any layout without internal overlap, checked above): the same arithmetic through its strides.
    const int64_t ys0 = y.stride(0), ys1 = y.stride(1), ys2 = y.stride(2);
    at::parallel_for(0, b * r, std::max<int64_t>(1, 4096 / c), [&](int64_t lo, int64_t hi) {
      for (int64_t i = lo; i < hi; ++i) {
        const int64_t bb = i / r, j = i % r;
        scalar_t* dst = yp + bb * ys0 + checked_row(op, "new_idx", ip[bb * ibs + j], n) * ys1;
        const float* src = tp + i * c;
        if (weight == 1.0) {
          for (int64_t ch = 0; ch < c; ++ch) dst[ch * ys2] = static_cast<scalar_t>(src[ch]);
        } else {
          for (int64_t ch = 0; ch < c; ++ch)
            dst[ch * ys2] = static_cast<scalar_t>((1.f - wv) * static_cast<float>(dst[ch * ys2]) + wv * src[ch]);
        }
      }
    });
  });
}

at::Tensor microflow_target_cpu(const at::Tensor& y_prev, const at::Tensor& v_prev, const at::Tensor& anchor_in,
                                const at::Tensor& nearest_in, const at::Tensor& weights, const at::Tensor& new_in,
                                const at::Tensor& eps, double sigma_prev, double sigma, int64_t height,
                                int64_t width, bool validate) {
  constexpr const char* op = "microflow_target";
  check_tokens(op, "y_prev", y_prev);
  check_tokens(op, "v_prev", v_prev);
  check_tokens(op, "eps", eps);
  TORCH_CHECK_VALUE(v_prev.sizes() == y_prev.sizes(), op, ": v_prev ", v_prev.sizes(), " must match y_prev ",
                    y_prev.sizes());
  const int64_t b = y_prev.size(0), n = y_prev.size(1), c = y_prev.size(2);
  check_grid(op, height, width, n);
  check_index_meta(op, "anchor_idx", anchor_in, b);
  check_index_meta(op, "nearest", nearest_in, b);
  check_index_meta(op, "new_idx", new_in, b);
  check_weights(op, weights);
  for (const at::Tensor* t : {&v_prev, &anchor_in, &nearest_in, &new_in, &eps, &weights})
    check_same_device(op, y_prev, "y_prev", *t, "an argument");
  const int64_t m = anchor_in.size(-1), r = new_in.size(-1);
  TORCH_CHECK_VALUE(m > 0, op, ": anchor_idx is empty; at least one anchor is required");
  TORCH_CHECK_VALUE(nearest_in.size(-1) == n, op, ": nearest has ", nearest_in.size(-1), " entries, expected N = ", n);
  TORCH_CHECK_VALUE(nearest_in.dim() == anchor_in.dim(), op,
                    ": nearest must be per sample exactly when anchor_idx is ([B, N] with [B, M])");
  TORCH_CHECK_VALUE(eps.size(0) == b && eps.size(1) == r && eps.size(2) == c, op, ": eps must be [B, R, C] = [", b,
                    ", ", r, ", ", c, "], got ", eps.sizes());
  TORCH_CHECK_VALUE(0.0 <= sigma && sigma <= sigma_prev && sigma_prev <= 1.0, op,
                    ": need 0 <= sigma <= sigma_prev <= 1, got sigma=", sigma, ", sigma_prev=", sigma_prev);
  const at::Tensor anc = anchor_in.contiguous(), near = nearest_in.contiguous(), idx = new_in.contiguous();
  // Ranges always (every read below stays inside its tensor); uniqueness and consistency with validate.
  check_index_values(op, "anchor_idx", anc, n, false);
  check_index_values(op, "nearest", near, m, false);
  check_index_values(op, "new_idx", idx, n, validate);
  if (validate) check_nearest_consistent(op, anc, near);
  if (b * r * c == 0) return at::empty({b, r, c}, y_prev.options());  // no samples, new tokens or channels
  const at::Tensor yp = y_prev.to(at::kFloat).contiguous(), vp = v_prev.to(at::kFloat).contiguous();
  const at::Tensor ep = eps.to(at::kFloat).contiguous(), wt = weights.contiguous();
  const int64_t k = wt.size(0), rad = k / 2, abs_ = index_batch_stride(anc), ibs = index_batch_stride(idx);
  const int64_t nbs = near.dim() == 1 ? 0 : n;
  const float sp = static_cast<float>(sigma_prev), s = static_cast<float>(sigma);
  at::Tensor out32 = at::empty({b, r, c}, y_prev.options().dtype(at::kFloat));
  const float* w = wt.data_ptr<float>();
  at::parallel_for(0, b * r, std::max<int64_t>(1, 512 / c), [&](int64_t lo, int64_t hi) {
    std::vector<float> acc(c);
    for (int64_t i = lo; i < hi; ++i) {
      const int64_t bb = i / r, p = idx.data_ptr<int64_t>()[bb * ibs + i % r];
      const int64_t* nr = near.data_ptr<int64_t>() + bb * nbs;
      const int64_t* an = anc.data_ptr<int64_t>() + bb * abs_;
      const float* yb = yp.data_ptr<float>() + bb * n * c;
      const float* vb = vp.data_ptr<float>() + bb * n * c;
      // x0_hat of token q, channel ch: y_prev - sigma_prev * v_prev, never materialised.
      auto add_x0 = [&](int64_t q, float wq) {
        const float* yq = yb + q * c;
        const float* vq = vb + q * c;
        for (int64_t ch = 0; ch < c; ++ch) acc[ch] += wq * (yq[ch] - sp * vq[ch]);
      };
      std::fill(acc.begin(), acc.end(), 0.f);
      if (an[nr[p]] == p) {  // an old anchor: the lift keeps its exact value
        add_x0(p, 1.f);
      } else {
        const int64_t row = p / width, col = p % width;
        for (int64_t ty = 0; ty < k; ++ty) {
          const int64_t rr = reflect_index(row + ty - rad, height);
          for (int64_t tx = 0; tx < k; ++tx) {
            const int64_t cc = reflect_index(col + tx - rad, width);
            add_x0(an[nr[rr * width + cc]], w[ty] * w[tx]);
          }
        }
      }
      float* dst = out32.data_ptr<float>() + i * c;
      const float* e = ep.data_ptr<float>() + i * c;
      for (int64_t ch = 0; ch < c; ++ch) dst[ch] = (1.f - s) * acc[ch] + s * e[ch];
    }
  });
  return out32.to(y_prev.scalar_type());
}

}  // namespace

TORCH_LIBRARY_IMPL(jit_kernels, CPU, m) {
  m.impl("microflow_update_", &microflow_update_cpu);
  m.impl("microflow_target", &microflow_target_cpu);
}

}  // namespace jit_kernels
