// The forecast ops (issue 10, CAT-F): schemas (a TORCH_LIBRARY_FRAGMENT of cat_kernels), the CPU
// (C++) implementation and the Meta one. Mirrors forecast_tokens_ / forecast_kv_ in
// cat_kernels/reference.py bit for bit: fp32 math, one rounding per stored value. Also
// forecast_attention (issue 21 item 2): a blocked ATen implementation shared with CUDA.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <tuple>

#include "forecast.h"

namespace cat_kernels {
namespace {

// A computed token's row: slope = (new - base) * inv_dt, base = out = new (os null: no out).
// Restrict-qualified and with a unit-stride case, so the compiler can vectorize the dtype
// conversions.
template <typename scalar_t, typename slope_t>
inline void refresh_row(scalar_t* __restrict__ bs, slope_t* __restrict__ ss, scalar_t* __restrict__ os,
                        const scalar_t* __restrict__ row, int64_t stride, int64_t D, float idt) {
  if (stride == 1) {
    for (int64_t e = 0; e < D; ++e) {
      ss[e] = static_cast<slope_t>(forecast_slope(static_cast<float>(row[e]), static_cast<float>(bs[e]), idt));
      bs[e] = row[e];
    }
  } else {
    for (int64_t e = 0; e < D; ++e) {
      const scalar_t now = row[e * stride];
      ss[e] = static_cast<slope_t>(forecast_slope(static_cast<float>(now), static_cast<float>(bs[e]), idt));
      bs[e] = now;
    }
  }
  if (os != nullptr) std::copy(bs, bs + D, os);
}

// A skipped token's row: out = base + w * slope.
template <typename scalar_t, typename slope_t>
inline void forecast_row(const scalar_t* __restrict__ bs, const slope_t* __restrict__ ss, scalar_t* __restrict__ os,
                         int64_t D, float w) {
  for (int64_t e = 0; e < D; ++e) {
    os[e] = static_cast<scalar_t>(forecast_value(static_cast<float>(bs[e]), static_cast<float>(ss[e]), w));
  }
}

// One pass over the B*H*N cache rows (base and slope contiguous, so row r starts at r * D; out4's
// rows at its strides; without out4 the skipped rows are not touched). The new rows are already
// in base's dtype; pos is contiguous int64, checked to lie in [-1, K).
template <typename scalar_t, typename slope_t>
void forecast_rows_cpu(const at::Tensor& base, const at::Tensor& slope, const std::optional<at::Tensor>& out4,
                       const at::Tensor& rows4, const at::Tensor& index, const at::Tensor& weight,
                       const at::Tensor& inv_dt) {
  const int64_t B = rows4.size(0), H = rows4.size(1), K = rows4.size(2), D = rows4.size(3);
  const int64_t N = index.size(1);
  scalar_t* bp = base.data_ptr<scalar_t>();
  slope_t* sp = slope.data_ptr<slope_t>();
  scalar_t* op = out4.has_value() ? out4->data_ptr<scalar_t>() : nullptr;
  const int64_t os0 = op ? out4->stride(0) : 0, os1 = op ? out4->stride(1) : 0, os2 = op ? out4->stride(2) : 0;
  const scalar_t* rp = rows4.data_ptr<scalar_t>();
  const auto rs = rows4.strides();
  const int64_t* pos = index.data_ptr<int64_t>();
  const float* wp = weight.data_ptr<float>();
  const float* tp = inv_dt.data_ptr<float>();
  const int64_t ws0 = weight.stride(0), ws1 = weight.stride(1), ts0 = inv_dt.stride(0), ts1 = inv_dt.stride(1);
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(D, 1));
  at::parallel_for(0, B * H * N, grain, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const int64_t b = r / (H * N), h = (r / N) % H, n = r % N;
      const int64_t j = pos[b * N + n];
      scalar_t* orow = op ? op + b * os0 + h * os1 + n * os2 : nullptr;
      if (j >= 0 && j < K) {
        refresh_row(bp + r * D, sp + r * D, orow, rp + b * rs[0] + h * rs[1] + j * rs[2], rs[3], D, tp[b * ts0 + n * ts1]);
      } else if (orow != nullptr) {
        forecast_row(bp + r * D, sp + r * D, orow, D, wp[b * ws0 + n * ws1]);
      }
    }
  });
}

void forecast_one_cpu(at::Tensor& base, at::Tensor& slope, const std::optional<at::Tensor>& out, const at::Tensor& rows,
                      const at::Tensor& index, const at::Tensor& weight, const at::Tensor& inv_dt, int64_t dim) {
  if (base.numel() == 0) return;
  const at::Tensor r4 = as_bhnd(rows.to(base.scalar_type()), dim);  // rounded once, as base stores it
  const std::optional<at::Tensor> out4 = as_bhnd(out, dim);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, base.scalar_type(), "forecast_cpu", [&] {
    using cache_t = scalar_t;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, slope.scalar_type(), "forecast_cpu_slope", [&] {
      forecast_rows_cpu<cache_t, scalar_t>(base, slope, out4, r4, index, weight, inv_dt);
    });
  });
}

// pos as contiguous int64 after the range check [-1, K) (CPU only: values are readable).
at::Tensor checked_pos_cpu(const at::Tensor& pos, int64_t K) {
  at::Tensor p = pos.to(at::kLong).contiguous();
  const int64_t* v = p.data_ptr<int64_t>();
  for (int64_t i = 0, n = p.numel(); i < n; ++i) {
    TORCH_CHECK(v[i] >= -1 && v[i] < K, "pos must lie in [-1, K=", K, ") (-1: not computed), got ", v[i]);
  }
  return p;
}

void forecast_tokens_cpu(at::Tensor& base, at::Tensor& slope, const std::optional<at::Tensor>& out, const at::Tensor& pos,
                         const at::Tensor& rows, const at::Tensor& weight, const at::Tensor& inv_dt, int64_t dim) {
  check_forecast("base", base, "slope", slope, "out", out, "rows", rows, pos, dim);
  check_forecast_inputs(pos, weight, inv_dt);
  CAT_CHECK_DEVICE_TYPE(base, at::kCPU);
  check_forecast_distinct("base, slope and out", base, slope, out);
  forecast_one_cpu(base, slope, out, rows, checked_pos_cpu(pos, rows.size(dim)), weight, inv_dt, dim);
}

void forecast_kv_cpu(at::Tensor& k_base, at::Tensor& v_base, at::Tensor& k_slope, at::Tensor& v_slope,
                     const std::optional<at::Tensor>& k_out, const std::optional<at::Tensor>& v_out, const at::Tensor& pos,
                     const at::Tensor& k, const at::Tensor& v, const at::Tensor& weight, const at::Tensor& inv_dt, int64_t dim) {
  check_forecast_kv(k_base, v_base, k_slope, v_slope, k_out, v_out, pos, k, v, weight, inv_dt, dim);
  CAT_CHECK_DEVICE_TYPE(k_base, at::kCPU);
  check_forecast_distinct("k_base, k_slope and k_out", k_base, k_slope, k_out);
  check_forecast_distinct("v_base, v_slope and v_out", v_base, v_slope, v_out);
  const at::Tensor index = checked_pos_cpu(pos, k.size(dim));
  forecast_one_cpu(k_base, k_slope, k_out, k, index, weight, inv_dt, dim);
  forecast_one_cpu(v_base, v_slope, v_out, v, index, weight, inv_dt, dim);
}

void forecast_tokens_meta(at::Tensor& base, at::Tensor& slope, const std::optional<at::Tensor>& out, const at::Tensor& pos,
                          const at::Tensor& rows, const at::Tensor& weight, const at::Tensor& inv_dt, int64_t dim) {
  check_forecast("base", base, "slope", slope, "out", out, "rows", rows, pos, dim);
  check_forecast_inputs(pos, weight, inv_dt);
}

void forecast_kv_meta(at::Tensor& k_base, at::Tensor& v_base, at::Tensor& k_slope, at::Tensor& v_slope,
                      const std::optional<at::Tensor>& k_out, const std::optional<at::Tensor>& v_out, const at::Tensor& pos,
                      const at::Tensor& k, const at::Tensor& v, const at::Tensor& weight, const at::Tensor& inv_dt, int64_t dim) {
  check_forecast_kv(k_base, v_base, k_slope, v_slope, k_out, v_out, pos, k, v, weight, inv_dt, dim);
}

// ----------------------------------------------------------------------------- forecast_attention

// Keys or values [start, start + len) of one cache in fp32: base + w * slope rounded to base's
// dtype (the product and the sum are separate ATen ops: two roundings, no fused multiply-add),
// or the base itself without slopes. w: weight as (B, 1, N, 1).
at::Tensor formed_block(const at::Tensor& base, const std::optional<at::Tensor>& slope, const at::Tensor& w, int64_t start,
                        int64_t len) {
  const at::Tensor b = base.narrow(2, start, len).to(at::kFloat);
  if (!slope.has_value()) return b;
  const at::Tensor step = at::mul(w.narrow(2, start, len), slope->narrow(2, start, len).to(at::kFloat));
  return at::add(b, step).to(base.scalar_type()).to(at::kFloat);
}

// Running max, normaliser and fp32 accumulator of the online softmax, (B, H, M, 1|D).
struct OnlineSoftmax {
  // the running maximum's start: below any logit, finite (as the Triton kernel's MIN_LOGIT)
  static constexpr float kMinLogit = -1.0e30f;
  at::Tensor m, l, acc;

  // left_out: (B, 1, 1, len) bool, keys whose logits are -inf (tokens of negative weight), or undefined
  void update(const at::Tensor& qf, const at::Tensor& k, const at::Tensor& v, double scale,
              const at::Tensor& left_out = at::Tensor()) {
    at::Tensor s = at::matmul(qf, k.transpose(-1, -2)).mul_(scale);
    if (left_out.defined()) s.masked_fill_(left_out, -std::numeric_limits<float>::infinity());
    // m starts at kMinLogit, not -inf: a block whose keys are all left out gives alpha 1 and p 0, not NaN
    const at::Tensor m_new = at::maximum(m, std::get<0>(s.max(-1, /*keepdim=*/true)));
    const at::Tensor alpha = (m - m_new).exp_();  // 0 at the first block with a key
    at::Tensor& p = s.sub_(m_new).exp_();
    l = l.mul_(alpha).add_(p.sum(-1, /*keepdim=*/true));
    acc = acc.mul_(alpha).add_(at::matmul(p, v));
    m = m_new;
  }
};

}  // namespace

at::Tensor forecast_attention_blocked(const at::Tensor& q, const at::Tensor& k_base, const at::Tensor& v_base,
                                      const std::optional<at::Tensor>& k_slope, const std::optional<at::Tensor>& v_slope,
                                      const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& k_extra,
                                      const std::optional<at::Tensor>& v_extra, const std::optional<at::Tensor>& extra_mask,
                                      std::optional<double> scale) {
  const int64_t B = q.size(0), H = q.size(1), M = q.size(2), D = q.size(3), N = k_base.size(2);
  if (q.numel() == 0) return at::empty(q.sizes(), q.options());
  const double sc = scale.has_value() ? *scale : 1.0 / std::sqrt(static_cast<double>(D));
  // Keys per block: the (B, H, M, block) logits stay near 16M floats (64 MB).
  const int64_t block = std::clamp<int64_t>((int64_t(1) << 24) / (B * H * M), 64, 4096);
  const at::Tensor qf = q.to(at::kFloat);
  const auto f32 = qf.options().memory_format(at::MemoryFormat::Contiguous);
  OnlineSoftmax st{at::full({B, H, M, 1}, OnlineSoftmax::kMinLogit, f32), at::zeros({B, H, M, 1}, f32),
                   at::zeros({B, H, M, D}, f32)};
  const at::Tensor w = weight.has_value() ? weight->view({B, 1, N, 1}) : at::Tensor();
  for (int64_t start = 0; start < N; start += block) {
    const int64_t len = std::min(block, N - start);
    const at::Tensor left_out = k_slope.has_value() ? w.narrow(2, start, len).lt(0).reshape({B, 1, 1, len}) : at::Tensor();
    st.update(qf, formed_block(k_base, k_slope, w, start, len), formed_block(v_base, v_slope, w, start, len), sc,
              left_out);
  }
  const int64_t T = k_extra.has_value() ? k_extra->size(2) : 0;
  for (int64_t start = 0; start < T; start += block) {
    const int64_t len = std::min(block, T - start);
    const at::Tensor left_out =
        extra_mask.has_value() ? extra_mask->narrow(1, start, len).logical_not().reshape({B, 1, 1, len}) : at::Tensor();
    st.update(qf, k_extra->narrow(2, start, len).to(at::kFloat), v_extra->narrow(2, start, len).to(at::kFloat), sc,
              left_out);
  }
  return st.acc.div_(st.l).to(q.scalar_type());
}

namespace {

at::Tensor forecast_attention_cpu(const at::Tensor& q, const at::Tensor& k_base, const at::Tensor& v_base,
                                  const std::optional<at::Tensor>& k_slope, const std::optional<at::Tensor>& v_slope,
                                  const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& k_extra,
                                  const std::optional<at::Tensor>& v_extra, const std::optional<at::Tensor>& extra_mask,
                                  std::optional<double> scale) {
  check_forecast_attention(q, k_base, v_base, k_slope, v_slope, weight, k_extra, v_extra, extra_mask);
  CAT_CHECK_DEVICE_TYPE(q, at::kCPU);
  return forecast_attention_blocked(q, k_base, v_base, k_slope, v_slope, weight, k_extra, v_extra, extra_mask, scale);
}

at::Tensor forecast_attention_meta(const at::Tensor& q, const at::Tensor& k_base, const at::Tensor& v_base,
                                   const std::optional<at::Tensor>& k_slope, const std::optional<at::Tensor>& v_slope,
                                   const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& k_extra,
                                   const std::optional<at::Tensor>& v_extra, const std::optional<at::Tensor>& extra_mask,
                                   std::optional<double> scale) {
  check_forecast_attention(q, k_base, v_base, k_slope, v_slope, weight, k_extra, v_extra, extra_mask);
  return at::empty(q.sizes(), q.options().memory_format(at::MemoryFormat::Contiguous));
}

}  // namespace

}  // namespace cat_kernels

// In-place ops return nothing, so torch.compile can functionalize them.
TORCH_LIBRARY_FRAGMENT(cat_kernels, m) {
  m.def(
      "forecast_tokens_(Tensor(a!) base, Tensor(b!) slope, Tensor(c!)? out, Tensor pos, Tensor rows, Tensor weight, "
      "Tensor inv_dt, int dim) -> ()");
  m.def(
      "forecast_kv_(Tensor(a!) k_base, Tensor(b!) v_base, Tensor(c!) k_slope, Tensor(d!) v_slope, Tensor(e!)? k_out, "
      "Tensor(f!)? v_out, Tensor pos, Tensor k, Tensor v, Tensor weight, Tensor inv_dt, int dim) -> ()");
  m.def(
      "forecast_attention(Tensor q, Tensor k_base, Tensor v_base, Tensor? k_slope, Tensor? v_slope, Tensor? weight, "
      "Tensor? k_extra=None, Tensor? v_extra=None, Tensor? extra_mask=None, float? scale=None) -> Tensor");
}

TORCH_LIBRARY_IMPL(cat_kernels, CPU, m) {
  using namespace cat_kernels;
  m.impl("forecast_tokens_", &forecast_tokens_cpu);
  m.impl("forecast_kv_", &forecast_kv_cpu);
  m.impl("forecast_attention", &forecast_attention_cpu);
}

TORCH_LIBRARY_IMPL(cat_kernels, Meta, m) {
  using namespace cat_kernels;
  m.impl("forecast_tokens_", &forecast_tokens_meta);
  m.impl("forecast_kv_", &forecast_kv_meta);
  m.impl("forecast_attention", &forecast_attention_meta);
}
