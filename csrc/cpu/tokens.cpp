// CPU kernels: token gather and scatter (shared [M] or per-sample [B, M] indices).
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>

#include "checks.h"

namespace jit_kernels {
namespace {

// Rows are copied whole with memcpy when the channel dim is contiguous: these
// ops are pure data movement, so the only goal is to move each byte once. Work
// is split over the flattened (sample, row) range; each chunk is walked as
// per-sample segments whose loop keeps every pointer and stride in locals
// (values captured by reference would be reloaded after every memcpy, which
// may alias them) and needs no integer division per row.
// Every row index is checked where it is read (checked_row: an IndexError, as index_select), so
// no index value can make a copy read or write outside src / dst; `op` names the error.
template <typename T>
void copy_rows(const char* op, const at::Tensor& src, const int64_t* src_rows, int64_t src_rows_bstride,
               at::Tensor& dst, const int64_t* dst_rows, int64_t dst_rows_bstride, int64_t batch, int64_t m) {
  const int64_t c = src.size(2);
  if (batch == 0 || m == 0 || c == 0) return;
  const T* s = src.data_ptr<T>();
  T* d = dst.data_ptr<T>();
  const int64_t ss0 = src.stride(0), ss1 = src.stride(1), ss2 = src.stride(2);
  const int64_t ds0 = dst.stride(0), ds1 = dst.stride(1), ds2 = dst.stride(2);
  const bool fast = ss2 == 1 && ds2 == 1;
  const int64_t sn = src.size(1), dn = dst.size(1);
  const size_t row_bytes = sizeof(T) * static_cast<size_t>(c);
  // Below ~64 KiB of rows per thread, waking a second thread costs more than it saves.
  const int64_t grain = std::max<int64_t>(1, 65536 / static_cast<int64_t>(row_bytes));
  at::parallel_for(0, batch * m, grain, [=](int64_t lo, int64_t hi) {
    for (int64_t b = lo / m; b * m < hi; ++b) {
      const int64_t j0 = std::max<int64_t>(lo - b * m, 0), j1 = std::min<int64_t>(hi - b * m, m);
      const T* const sb = s + b * ss0;
      T* const db = d + b * ds0;
      const int64_t* const sr = src_rows ? src_rows + b * src_rows_bstride : nullptr;
      const int64_t* const dr = dst_rows ? dst_rows + b * dst_rows_bstride : nullptr;
      if (fast && sr && !dr) {  // gather
        for (int64_t j = j0; j < j1; ++j)
          std::memcpy(db + j * ds1, sb + checked_row(op, "idx", sr[j], sn) * ss1, row_bytes);
      } else if (fast && !sr && dr) {  // scatter
        for (int64_t j = j0; j < j1; ++j)
          std::memcpy(db + checked_row(op, "idx", dr[j], dn) * ds1, sb + j * ss1, row_bytes);
      } else {
        for (int64_t j = j0; j < j1; ++j) {
          const T* sp = sb + (sr ? checked_row(op, "idx", sr[j], sn) : j) * ss1;
          T* dp = db + (dr ? checked_row(op, "idx", dr[j], dn) : j) * ds1;
          for (int64_t k = 0; k < c; ++k) dp[k * ds2] = sp[k * ss2];
        }
      }
    }
  });
}

at::Tensor gather_tokens_cpu(const at::Tensor& x, const at::Tensor& idx_in, bool validate) {
  constexpr const char* op = "gather_tokens";
  check_tokens(op, "x", x);
  check_index_meta(op, "idx", idx_in, x.size(0));
  check_same_device(op, x, "x", idx_in, "idx");
  const at::Tensor idx = idx_in.contiguous();
  const int64_t b = x.size(0), m = idx.size(-1);
  at::Tensor out = at::empty({b, m, x.size(2)}, x.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "gather_tokens_cpu", [&] {
    copy_rows<scalar_t>(op, x, idx.data_ptr<int64_t>(), index_batch_stride(idx), out, nullptr, 0, b, m);
  });
  return out;
}

void scatter_checks(const char* op, const at::Tensor& base, const at::Tensor& idx, const at::Tensor& src) {
  check_scatter_meta(op, base, idx, src);
}

void scatter_into(const char* op, at::Tensor& base, const at::Tensor& idx, const at::Tensor& src_in) {
  const at::Tensor src = src_in.scalar_type() == base.scalar_type() ? src_in : src_in.to(base.scalar_type());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, base.scalar_type(), "scatter_tokens_cpu", [&] {
    copy_rows<scalar_t>(op, src, nullptr, 0, base, idx.data_ptr<int64_t>(), index_batch_stride(idx), base.size(0),
                        idx.size(-1));
  });
}

void scatter_tokens_inplace_cpu(at::Tensor& base, const at::Tensor& idx_in, const at::Tensor& src, bool validate) {
  constexpr const char* op = "scatter_tokens_";
  scatter_checks(op, base, idx_in, src);
  check_scatter_target(op, base, idx_in, src);
  const at::Tensor idx = idx_in.contiguous();
  // Unique rows (validate): with duplicates the result would depend on thread timing (but stay inside base).
  if (validate) check_index_values(op, "idx", idx, base.size(1), /*unique=*/true);
  scatter_into(op, base, idx, src);
}

at::Tensor scatter_tokens_cpu(const at::Tensor& base, const at::Tensor& idx_in, const at::Tensor& src,
                              bool validate) {
  constexpr const char* op = "scatter_tokens";
  scatter_checks(op, base, idx_in, src);
  const at::Tensor idx = idx_in.contiguous();
  if (validate) check_index_values(op, "idx", idx, base.size(1), /*unique=*/true);
  at::Tensor out = base.clone(at::MemoryFormat::Contiguous);
  scatter_into(op, out, idx, src);
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(jit_kernels, CPU, m) {
  m.impl("gather_tokens", &gather_tokens_cpu);
  m.impl("scatter_tokens", &scatter_tokens_cpu);
  m.impl("scatter_tokens_", &scatter_tokens_inplace_cpu);
}

}  // namespace jit_kernels
