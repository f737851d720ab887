// CPU kernel of anchor_attention: rotary + online-softmax attention in one pass.
//
// q, k, v [B, L, H, D] (fp32/fp16/bf16, any strides with unit channel stride), cos, sin [L, D]
// (FluxPosEmbed tables, interleaved channel pairs; or [B, L, D] per sample, for per-sample
// anchor sets), key_lengths int64 [B] or none -> out
// [B, L, H, D] contiguous in q's dtype. All arithmetic is fp32.
//
// Work unit = (b, h, block of QS query rows); B * H * ceil(L / QS) units handed to the
// at::parallel_for threads from an atomic counter.
// Everything is laid out so that the vector lanes run over *queries*:
//   Qt [D, QS]   rotated q * scale * log2(e), transposed once per unit;
//   Ot [D, QS]   the output accumulator, transposed; m, l [QS] the softmax state;
//   per key block of KB keys: Kb [KB, D] rotated k rows, Vb [KB, D] v rows (fp32), both in
//   a small per-thread buffer (rotated on the fly: no rotated copy of k is ever stored);
//   per strip of SW = 2W queries: S [KB, SW] = Kb Qt[:, strip] (scores, then probabilities).
// With queries on the lanes, the scores need no transpose and no horizontal reduction:
// the column max, exp2, the row sums and the rescale of Ot are plain vector ops, and the
// two products are broadcast-FMA register tiles (RJ keys x 2 vectors, RD dims x 2 vectors).
// The K/V rotation and packing is amortised over the QS queries of a unit.
//
// The inner loops use GCC vector extensions and are compiled three times (AVX-512, AVX2+FMA,
// baseline), picked once at run time (JIT_KERNELS_ATTN_ISA=avx512|avx2|default overrides,
// for tests); the extension is built without -march.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <atomic>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <string>
#include <utility>

#include "checks.h"

#pragma GCC diagnostic ignored "-Wpsabi"

namespace jit_kernels {
namespace {

constexpr int64_t QS = 128;  // query rows per work unit (a multiple of every strip width)
constexpr int64_t KB = 64;   // keys per block (a multiple of every RJ)

#if defined(__GNUC__)
#define JK_INLINE inline __attribute__((always_inline))
#else
#define JK_INLINE inline
#endif

template <int W>
struct V;
template <>
struct V<16> {
  typedef float f __attribute__((vector_size(64)));
  typedef int32_t i __attribute__((vector_size(64)));
};
template <>
struct V<8> {
  typedef float f __attribute__((vector_size(32)));
  typedef int32_t i __attribute__((vector_size(32)));
};
template <>
struct V<4> {
  typedef float f __attribute__((vector_size(16)));
  typedef int32_t i __attribute__((vector_size(16)));
};

template <class F>
JK_INLINE F vload(const float* p) {
  F v;
  std::memcpy(&v, p, sizeof(F));
  return v;
}

template <class F>
JK_INLINE void vstore(float* p, F v) {
  std::memcpy(p, &v, sizeof(F));
}

template <class F>
JK_INLINE F vset(float s) {
  return F{} + s;
}

template <class F>
JK_INLINE F vmax(F a, F b) {
  return a > b ? a : b;
}

// 2^x for x <= 0 (NaN propagates; x < -127 gives 0): round-to-nearest split x = n + r,
// |r| <= 1/2, degree-6 polynomial for 2^r (rel. error ~2e-7), exponent bits for 2^n.
template <int W>
JK_INLINE typename V<W>::f exp2v(typename V<W>::f x) {
  using F = typename V<W>::f;
  using I = typename V<W>::i;
  const F lo = vset<F>(-127.f);
  x = x < lo ? lo : x;
  const F magic = vset<F>(12582912.f);  // 1.5 * 2^23: adding it rounds to an integer
  const F t = x + magic;
  const F n = t - magic;
  const F r = x - n;
  F p = vset<F>(1.5403530e-4f);
  p = p * r + 1.3333558e-3f;
  p = p * r + 9.6181291e-3f;
  p = p * r + 5.5504109e-2f;
  p = p * r + 2.4022651e-1f;
  p = p * r + 6.9314718e-1f;
  p = p * r + 1.0f;
  const I e = ((I)t - (I)magic + 127) << 23;
  return p * (F)e;
}

template <typename T>
struct Job {
  const T* q;
  const T* k;
  const T* v;
  T* out;
  const float* cos;  // [L, D] or [B, L, D] (tb = L * D)
  const float* sin;
  const int64_t* lens;  // nullptr: every key valid
  int64_t L, H, D, nq, tb;  // tb: batch stride of the tables (0: shared)
  int64_t sq[3], sk[3], sv[3];  // batch, token, head strides (channel stride 1)
  float qmul;                   // scale * log2(e), folded into q
};

// Rotary of one row (diffusers' apply_rotary_emb, use_real_unbind_dim=-1), times mul, to fp32.
template <typename T>
JK_INLINE void rotate_row(const T* x, const float* c, const float* s, float* out, int64_t d, float mul) {
  for (int64_t i = 0; i < d; i += 2) {
    const float a = static_cast<float>(x[i]), b = static_cast<float>(x[i + 1]);
    out[i] = (a * c[i] - b * s[i]) * mul;
    out[i + 1] = (b * c[i + 1] + a * s[i + 1]) * mul;
  }
}

// S[j, strip] = sum_d Kb[j, d] * Qt[d, strip] for RJ keys; returns the running column max.
template <int W, int RJ>
JK_INLINE void scores_tile(const float* kb, const float* qt, float* s, int64_t d, int64_t valid,
                           typename V<W>::f& mx0, typename V<W>::f& mx1) {
  using F = typename V<W>::f;
  F acc[RJ][2];
#pragma GCC unroll 16
  for (int r = 0; r < RJ; ++r) acc[r][0] = acc[r][1] = F{};
  for (int64_t c = 0; c < d; ++c) {
    const F q0 = vload<F>(qt + c * QS), q1 = vload<F>(qt + c * QS + W);
#pragma GCC unroll 16
    for (int r = 0; r < RJ; ++r) {
      const float kv = kb[r * d + c];
      acc[r][0] += kv * q0;
      acc[r][1] += kv * q1;
    }
  }
#pragma GCC unroll 16
  for (int r = 0; r < RJ; ++r) {
    vstore(s + r * 2 * W, acc[r][0]);
    vstore(s + r * 2 * W + W, acc[r][1]);
    if (r < valid) {
      mx0 = vmax(mx0, acc[r][0]);
      mx1 = vmax(mx1, acc[r][1]);
    }
  }
}

// Ot[d0 .. d0+R, strip] = alpha * Ot + sum_j Vb[j, d0 + r] * P[j, strip].
template <int W, int R>
JK_INLINE void pv_tile(const float* vb, const float* p, float* ot, int64_t d, int64_t kn, typename V<W>::f al0,
                       typename V<W>::f al1) {
  using F = typename V<W>::f;
  F acc[R][2];
#pragma GCC unroll 16
  for (int r = 0; r < R; ++r) {
    acc[r][0] = vload<F>(ot + r * QS) * al0;
    acc[r][1] = vload<F>(ot + r * QS + W) * al1;
  }
  for (int64_t j = 0; j < kn; ++j) {
    const F p0 = vload<F>(p + j * 2 * W), p1 = vload<F>(p + j * 2 * W + W);
    const float* vr = vb + j * d;
#pragma GCC unroll 16
    for (int r = 0; r < R; ++r) {
      acc[r][0] += vr[r] * p0;
      acc[r][1] += vr[r] * p1;
    }
  }
#pragma GCC unroll 16
  for (int r = 0; r < R; ++r) {
    vstore(ot + r * QS, acc[r][0]);
    vstore(ot + r * QS + W, acc[r][1]);
  }
}

// Floats of per-thread workspace one unit needs.
inline size_t workspace_floats(int64_t d) { return static_cast<size_t>(2 * d * QS + 2 * QS + 2 * KB * d + KB * 32 + d); }

template <int W, int RJ, int RD, typename T>
JK_INLINE void attention_unit(const Job<T>& J, int64_t u, float* ws) {
  using F = typename V<W>::f;
  constexpr int64_t SW = 2 * W;
  const int64_t D = J.D, L = J.L, H = J.H;
  const int64_t b = u / (H * J.nq), h = (u / J.nq) % H, i0 = (u % J.nq) * QS;
  const int64_t len = J.lens ? J.lens[b] : L;
  const int64_t qn = std::min(QS, L - i0);
  T* out = J.out + ((b * L + i0) * H + h) * D;  // row stride H * D
  const int64_t qv = std::max<int64_t>(0, std::min(qn, len - i0));  // valid (unpadded) query rows
  for (int64_t r = qv; r < qn; ++r) std::fill(out + r * H * D, out + r * H * D + D, static_cast<T>(0.f));
  if (qv == 0) return;
  const int64_t ns = (qv + SW - 1) / SW, cols = ns * SW;

  float* Qt = ws;
  float* Ot = Qt + D * QS;
  float* M = Ot + D * QS;
  float* Ls = M + QS;
  float* Kb = Ls + QS;
  float* Vb = Kb + KB * D;
  float* S = Vb + KB * D;
  float* row = S + KB * SW;

  const T* qb = J.q + b * J.sq[0] + h * J.sq[2];
  const float* cosb = J.cos + b * J.tb;
  const float* sinb = J.sin + b * J.tb;
  for (int64_t r = 0; r < cols; ++r) {
    if (r < qv) {
      const int64_t i = i0 + r;
      rotate_row(qb + i * J.sq[1], cosb + i * D, sinb + i * D, row, D, J.qmul);
      for (int64_t c = 0; c < D; ++c) Qt[c * QS + r] = row[c];
    } else {
      for (int64_t c = 0; c < D; ++c) Qt[c * QS + r] = 0.f;
    }
  }
  for (int64_t c = 0; c < D; ++c) std::fill(Ot + c * QS, Ot + c * QS + cols, 0.f);
  std::fill(M, M + cols, -1e30f);  // finite: exp2(m_old - m_new) must not be inf - inf
  std::fill(Ls, Ls + cols, 0.f);

  const T* kbase = J.k + b * J.sk[0] + h * J.sk[2];
  const T* vbase = J.v + b * J.sv[0] + h * J.sv[2];
  for (int64_t k0 = 0; k0 < len; k0 += KB) {
    const int64_t kn = std::min(KB, len - k0), kt = (kn + RJ - 1) / RJ * RJ;
    for (int64_t j = 0; j < kn; ++j) {
      const int64_t t = k0 + j;
      rotate_row(kbase + t * J.sk[1], cosb + t * D, sinb + t * D, Kb + j * D, D, 1.f);
      const T* vr = vbase + t * J.sv[1];
      float* vd = Vb + j * D;
      for (int64_t c = 0; c < D; ++c) vd[c] = static_cast<float>(vr[c]);
    }
    std::fill(Kb + kn * D, Kb + kt * D, 0.f);
    for (int64_t s = 0; s < ns; ++s) {
      const int64_t c0 = s * SW;
      const F mo0 = vload<F>(M + c0), mo1 = vload<F>(M + c0 + W);
      F mx0 = mo0, mx1 = mo1;
      for (int64_t j0 = 0; j0 < kt; j0 += RJ)
        scores_tile<W, RJ>(Kb + j0 * D, Qt + c0, S + j0 * SW, D, kn - j0, mx0, mx1);
      const F al0 = exp2v<W>(mo0 - mx0), al1 = exp2v<W>(mo1 - mx1);
      F sum0 = F{}, sum1 = F{};
      for (int64_t j = 0; j < kn; ++j) {
        const F p0 = exp2v<W>(vload<F>(S + j * SW) - mx0), p1 = exp2v<W>(vload<F>(S + j * SW + W) - mx1);
        vstore(S + j * SW, p0);
        vstore(S + j * SW + W, p1);
        sum0 += p0;
        sum1 += p1;
      }
      vstore(M + c0, mx0);
      vstore(M + c0 + W, mx1);
      vstore(Ls + c0, vload<F>(Ls + c0) * al0 + sum0);
      vstore(Ls + c0 + W, vload<F>(Ls + c0 + W) * al1 + sum1);
      int64_t d0 = 0;
      for (; d0 + RD <= D; d0 += RD) pv_tile<W, RD>(Vb + d0, S, Ot + d0 * QS + c0, D, kn, al0, al1);
      for (; d0 < D; d0 += 2) pv_tile<W, 2>(Vb + d0, S, Ot + d0 * QS + c0, D, kn, al0, al1);
    }
  }
  for (int64_t r = 0; r < qv; ++r) {
    const float inv = 1.f / Ls[r];
    T* o = out + r * H * D;
    for (int64_t c = 0; c < D; ++c) o[c] = static_cast<T>(Ot[c * QS + r] * inv);
  }
}

template <typename T>
using RangeFn = void (*)(const Job<T>&, int64_t, int64_t, float*);

template <typename T>
void run_default(const Job<T>& J, int64_t lo, int64_t hi, float* ws) {
  for (int64_t u = lo; u < hi; ++u) attention_unit<4, 4, 4>(J, u, ws);
}

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define JK_HAVE_X86_CLONES 1
template <typename T>
__attribute__((target("avx2,fma"))) void run_avx2(const Job<T>& J, int64_t lo, int64_t hi, float* ws) {
  for (int64_t u = lo; u < hi; ++u) attention_unit<8, 4, 4>(J, u, ws);
}

template <typename T>
__attribute__((target("avx512f,avx512vl,avx512dq,avx512bw,avx2,fma"))) void run_avx512(const Job<T>& J, int64_t lo,
                                                                                      int64_t hi, float* ws) {
  for (int64_t u = lo; u < hi; ++u) attention_unit<16, 8, 8>(J, u, ws);
}
#endif

enum class Isa { kDefault, kAvx2, kAvx512 };

Isa detect_isa() {
  Isa best = Isa::kDefault;
#if defined(JK_HAVE_X86_CLONES)
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) best = Isa::kAvx2;
  if (best == Isa::kAvx2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl") &&
      __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512bw"))
    best = Isa::kAvx512;
#endif
  // Tests force the narrower clones; a request above what the CPU has is ignored.
  const char* env = std::getenv("JIT_KERNELS_ATTN_ISA");
  if (env != nullptr) {
    const std::string want(env);
    if (want == "default") return Isa::kDefault;
    if (want == "avx2" && best != Isa::kDefault) return Isa::kAvx2;
  }
  return best;
}

template <typename T>
RangeFn<T> pick_kernel() {
  // Read on every call (not cached) so that tests can switch it; getenv is cheap next to a kernel.
  switch (detect_isa()) {
#if defined(JK_HAVE_X86_CLONES)
    case Isa::kAvx512:
      return &run_avx512<T>;
    case Isa::kAvx2:
      return &run_avx2<T>;
#endif
    default:
      return &run_default<T>;
  }
}

at::Tensor anchor_attention_cpu(const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in,
                                const at::Tensor& cos_in, const at::Tensor& sin_in,
                                const std::optional<at::Tensor>& lens_in, double scale, bool validate) {
  constexpr const char* op = "anchor_attention";
  for (auto [t, name] : {std::pair{&q_in, "q"}, std::pair{&k_in, "k"}, std::pair{&v_in, "v"}}) {
    TORCH_CHECK_VALUE(t->dim() == 4, op, ": ", name, " must be [B, L, H, D], got ", t->sizes());
    const auto st = t->scalar_type();
    TORCH_CHECK_TYPE(st == at::kFloat || st == at::kHalf || st == at::kBFloat16, op, ": ", name,
                     " must be float32, float16 or bfloat16, got ", st);
    TORCH_CHECK_VALUE(t->sizes() == q_in.sizes(), op, ": ", name, " ", t->sizes(), " must match q ", q_in.sizes());
    TORCH_CHECK_TYPE(st == q_in.scalar_type(), op, ": ", name, " is ", st, " but q is ", q_in.scalar_type(),
                     "; q, k and v must share one dtype");
    check_same_device(op, q_in, "q", *t, name);
  }
  const int64_t B = q_in.size(0), L = q_in.size(1), H = q_in.size(2), D = q_in.size(3);
  TORCH_CHECK_VALUE(D % 2 == 0, op, ": the head dim D must be even (rotary works on channel pairs), got D = ", D);
  for (auto [t, name] : {std::pair{&cos_in, "cos"}, std::pair{&sin_in, "sin"}}) {
    TORCH_CHECK_TYPE(at::isFloatingType(t->scalar_type()), op, ": ", name, " must be a floating tensor, got ",
                     t->scalar_type());
    const bool shared = t->dim() == 2 && t->size(0) == L && t->size(1) == D;
    const bool per_sample = t->dim() == 3 && t->size(0) == B && t->size(1) == L && t->size(2) == D;
    TORCH_CHECK_VALUE(shared || per_sample, op, ": ", name, " must be [L, D] = [", L, ", ", D, "] or [B, L, D] = [", B,
                      ", ", L, ", ", D, "], got ", t->sizes());
    check_same_device(op, q_in, "q", *t, name);
  }
  TORCH_CHECK_VALUE(cos_in.dim() == sin_in.dim(), op, ": cos and sin must both be [L, D] or both [B, L, D], got ",
                    cos_in.sizes(), " and ", sin_in.sizes());
  TORCH_CHECK_VALUE(std::isfinite(scale) && scale > 0.0, op, ": scale must be finite and > 0, got ", scale);
  at::Tensor lens;
  if (lens_in.has_value()) {
    lens = *lens_in;
    TORCH_CHECK_TYPE(lens.scalar_type() == at::kLong, op, ": key_lengths must be int64, got ", lens.scalar_type());
    TORCH_CHECK_VALUE(lens.dim() == 1 && lens.size(0) == B, op, ": key_lengths must be [B] = [", B, "], got ",
                      lens.sizes());
    check_same_device(op, q_in, "q", lens, "key_lengths");
    lens = lens.contiguous();
    const int64_t* lp = lens.data_ptr<int64_t>();
    for (int64_t i = 0; i < B; ++i)  // always: a length past L would read keys outside k and v
      TORCH_CHECK_INDEX(lp[i] >= 1 && lp[i] <= L, op, ": key_lengths has value ", lp[i], " outside [1, ", L, "]");
  }
  auto unit_stride = [](const at::Tensor& t) { return t.stride(3) == 1 ? t : t.contiguous(); };
  const at::Tensor q = unit_stride(q_in), k = unit_stride(k_in), v = unit_stride(v_in);
  const at::Tensor cs = cos_in.to(at::kFloat).contiguous(), sn = sin_in.to(at::kFloat).contiguous();
  const int64_t tb = cs.dim() == 3 ? L * D : 0;
  at::Tensor out = at::empty({B, L, H, D}, q.options().memory_format(at::MemoryFormat::Contiguous));
  if (out.numel() == 0) return out;
  const int64_t nq = (L + QS - 1) / QS, units = B * H * nq;
  const size_t wsz = workspace_floats(D);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "anchor_attention_cpu", [&] {
    Job<scalar_t> J{q.data_ptr<scalar_t>(), k.data_ptr<scalar_t>(), v.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(),
                    cs.data_ptr<float>(), sn.data_ptr<float>(), lens.defined() ? lens.data_ptr<int64_t>() : nullptr,
                    L, H, D, nq, tb,
                    {q.stride(0), q.stride(1), q.stride(2)},
                    {k.stride(0), k.stride(1), k.stride(2)},
                    {v.stride(0), v.stride(1), v.stride(2)},
                    static_cast<float>(scale * 1.4426950408889634)};
    const RangeFn<scalar_t> fn = pick_kernel<scalar_t>();
    // Units are handed out from a shared counter rather than split statically: on a shared
    // machine a thread that is descheduled for a while no longer holds the whole op back
    // (every unit is computed the same way, so results do not depend on who runs it).
    std::atomic<int64_t> next{0};
    const int64_t workers = std::min<int64_t>(units, std::max<int64_t>(1, at::get_num_threads()));
    at::parallel_for(0, workers, 1, [&](int64_t, int64_t) {
      float* ws = scratch_floats(0, wsz);
      for (int64_t u = next.fetch_add(1); u < units; u = next.fetch_add(1)) fn(J, u, u + 1, ws);
    });
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(jit_kernels, CPU, m) { m.impl("anchor_attention", &anchor_attention_cpu); }

}  // namespace jit_kernels
