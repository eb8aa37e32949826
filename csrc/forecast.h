// Shared by the CPU, CUDA and Meta implementations of the forecast ops (forecast.cpp,
// forecast_cuda.cu): argument checks at the boundary (messages name the argument) and the two
// fp32 formulas, written so that every backend rounds exactly as cat_kernels/reference.py.
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <utility>
#include <vector>

#include "common.h"

namespace cat_kernels {

// out of the forecast ops: a slice of a contiguous buffer along its leading dimensions (unit
// stride on the last one, each stride at least the extent of the dimensions inside it), e.g. the
// image rows of a (B, T + N, C) buffer whose text rows the caller fills. cat_kernels.ops._rows_view.
inline bool is_rows_view(const at::Tensor& t) {
  if (t.dim() > 0 && t.size(-1) > 1 && t.stride(-1) != 1) return false;
  int64_t extent = 1;
  for (int64_t i = t.dim() - 1; i >= 0; --i) {
    if (t.size(i) > 1) {
      if (t.stride(i) < extent) return false;
      extent = t.stride(i) * t.size(i);
    }
  }
  return true;
}

// An optional out seen as (B, H, N, D) (as_bhnd), or none.
inline std::optional<at::Tensor> as_bhnd(const std::optional<at::Tensor>& x, int64_t dim) {
  return x.has_value() ? std::optional<at::Tensor>(as_bhnd(*x, dim)) : std::nullopt;
}

// One cache of the forecast ops: base, slope contiguous, out (when given) of base's shape and
// dtype with rows of stride 1 (is_rows_view), rows of that shape with N replaced by K, pos (B, N).
// Names are the schema's argument names.
inline void check_forecast(const char* base_name, const at::Tensor& base, const char* slope_name, const at::Tensor& slope,
                           const char* out_name, const std::optional<at::Tensor>& out, const char* rows_name,
                           const at::Tensor& rows, const at::Tensor& pos, int64_t dim) {
  std::vector<std::pair<const char*, const at::Tensor*>> all = {{base_name, &base}, {slope_name, &slope}, {rows_name, &rows}};
  if (out.has_value()) all.emplace_back(out_name, &*out);
  for (const auto& [name, t] : all) {
    TORCH_CHECK(t->scalar_type() == at::kFloat || t->scalar_type() == at::kHalf || t->scalar_type() == at::kBFloat16, name,
                " must be float32/float16/bfloat16, got ", t->scalar_type());
    TORCH_CHECK(t->device() == base.device(), name, " is on ", t->device(), " but ", base_name, " is on ", base.device());
  }
  check_token_dim(base_name, base, dim);
  TORCH_CHECK(slope.sizes() == base.sizes(), slope_name, " must have the shape of ", base_name, " ", base.sizes(), ", got ",
              slope.sizes());
  for (int i = 0; i < 2; ++i) {
    TORCH_CHECK(all[i].second->is_contiguous(), all[i].first, " must be contiguous, got strides ", all[i].second->strides());
  }
  if (out.has_value()) {
    TORCH_CHECK(out->sizes() == base.sizes(), out_name, " must have the shape of ", base_name, " ", base.sizes(), ", got ",
                out->sizes());
    TORCH_CHECK(out->scalar_type() == base.scalar_type(), out_name, " must have the dtype of ", base_name, " (",
                base.scalar_type(), "), got ", out->scalar_type());
    TORCH_CHECK(is_rows_view(*out), out_name,
                " must be contiguous or a slice of a contiguous buffer along its leading dimensions, got strides ",
                out->strides());
  }
  std::vector<int64_t> expected(base.sizes().begin(), base.sizes().end());
  expected[dim] = rows.dim() == base.dim() ? rows.size(dim) : -1;
  TORCH_CHECK(rows.sizes() == at::IntArrayRef(expected), rows_name, " must have shape ", at::IntArrayRef(expected),
              " (N replaced by K), got ", rows.sizes());
  TORCH_CHECK(pos.dim() == 2 && pos.size(0) == base.size(0) && pos.size(1) == base.size(dim), "pos must have shape (B, N) = (",
              base.size(0), ", ", base.size(dim), "), got ", pos.sizes());
  CAT_CHECK_SAME_DEVICE(pos, base);
}

// Aliases would break the math (a skipped token's out written over its base). CPU and CUDA only:
// Meta and fake tensors have no data pointers.
inline void check_forecast_distinct(const char* what, const at::Tensor& base, const at::Tensor& slope,
                                    const std::optional<at::Tensor>& out) {
  if (base.numel() == 0) return;
  const void* o = out.has_value() ? out->data_ptr() : nullptr;
  TORCH_CHECK(base.data_ptr() != slope.data_ptr() && base.data_ptr() != o && slope.data_ptr() != o, what,
              " must be distinct tensors");
}

inline void check_forecast_inputs(const at::Tensor& pos, const at::Tensor& weight, const at::Tensor& inv_dt) {
  CAT_CHECK_INDEX(pos);
  CAT_CHECK_FP32(weight);
  CAT_CHECK_FP32(inv_dt);
  TORCH_CHECK(weight.sizes() == pos.sizes(), "weight must have the shape of pos ", pos.sizes(), ", got ", weight.sizes());
  TORCH_CHECK(inv_dt.sizes() == pos.sizes(), "inv_dt must have the shape of pos ", pos.sizes(), ", got ", inv_dt.sizes());
  CAT_CHECK_SAME_DEVICE(weight, pos);
  CAT_CHECK_SAME_DEVICE(inv_dt, pos);
}

inline void check_forecast_kv(const at::Tensor& k_base, const at::Tensor& v_base, const at::Tensor& k_slope,
                              const at::Tensor& v_slope, const std::optional<at::Tensor>& k_out,
                              const std::optional<at::Tensor>& v_out, const at::Tensor& pos, const at::Tensor& k,
                              const at::Tensor& v, const at::Tensor& weight, const at::Tensor& inv_dt, int64_t dim) {
  TORCH_CHECK(k_out.has_value() == v_out.has_value(), "k_out and v_out go together: both given or both None");
  check_forecast("k_base", k_base, "k_slope", k_slope, "k_out", k_out, "k", k, pos, dim);
  check_forecast("v_base", v_base, "v_slope", v_slope, "v_out", v_out, "v", v, pos, dim);
  TORCH_CHECK(v_base.sizes() == k_base.sizes(), "v_base must have the shape of k_base ", k_base.sizes(), ", got ",
              v_base.sizes());
  TORCH_CHECK(v.sizes() == k.sizes(), "v must have the shape of k ", k.sizes(), ", got ", v.sizes());
  check_forecast_inputs(pos, weight, inv_dt);
}

// forecast_attention (issue 21 item 2): q (B, H, M, D); bases (B, H, N, D), unit stride along D;
// slopes both or neither, their bases' shapes; all four caches with k_base's strides; weight
// (B, N) fp32, required with slopes; extras both or neither, (B, H, T, D); extra_mask (B, T)
// bool, only with extras; 1 <= D <= 128; N + T >= 1; one device.
inline void check_forecast_attention(const at::Tensor& q, const at::Tensor& k_base, const at::Tensor& v_base,
                                     const std::optional<at::Tensor>& k_slope, const std::optional<at::Tensor>& v_slope,
                                     const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& k_extra,
                                     const std::optional<at::Tensor>& v_extra,
                                     const std::optional<at::Tensor>& extra_mask) {
  CAT_CHECK_FLOAT(q);
  CAT_CHECK_DIM(q, 4);
  const int64_t B = q.size(0), H = q.size(1), D = q.size(3);
  TORCH_CHECK(D >= 1 && D <= 128, "q's head dim D must lie in [1, 128], got ", D);
  CAT_CHECK_FLOAT(k_base);
  CAT_CHECK_FLOAT(v_base);
  TORCH_CHECK(k_base.dim() == 4 && k_base.size(0) == B && k_base.size(1) == H && k_base.size(3) == D,
              "k_base must have shape (B, H, N, D) with q's (B, H, D) = (", B, ", ", H, ", ", D, "), got ", k_base.sizes());
  const int64_t N = k_base.size(2);
  TORCH_CHECK(v_base.sizes() == k_base.sizes(), "v_base must have the shape of k_base ", k_base.sizes(), ", got ",
              v_base.sizes());
  TORCH_CHECK(k_base.stride(3) == 1, "k_base must have unit stride along D, got strides ", k_base.strides());
  TORCH_CHECK(v_base.strides() == k_base.strides(), "v_base must have k_base's strides ", k_base.strides(), ", got ",
              v_base.strides());
  CAT_CHECK_SAME_DEVICE(k_base, q);
  CAT_CHECK_SAME_DEVICE(v_base, q);
  TORCH_CHECK(k_slope.has_value() == v_slope.has_value(), "k_slope and v_slope go together: both or neither");
  if (k_slope.has_value()) {
    const std::pair<const char*, const at::Tensor*> slopes[] = {{"k_slope", &*k_slope}, {"v_slope", &*v_slope}};
    for (const auto& [name, t] : slopes) {
      TORCH_CHECK(t->scalar_type() == at::kFloat || t->scalar_type() == at::kHalf || t->scalar_type() == at::kBFloat16, name,
                  " must be float32/float16/bfloat16, got ", t->scalar_type());
      TORCH_CHECK(t->sizes() == k_base.sizes(), name, " must have the shape of its base ", k_base.sizes(), ", got ",
                  t->sizes());
      TORCH_CHECK(t->strides() == k_base.strides(), name, " must have k_base's strides ", k_base.strides(), ", got ",
                  t->strides());
      TORCH_CHECK(t->device() == q.device(), name, " is on ", t->device(), " but q is on ", q.device());
    }
    TORCH_CHECK(weight.has_value(), "weight must be given with slopes (zeros for plain reuse)");
  }
  if (weight.has_value()) {
    const at::Tensor& w = *weight;
    CAT_CHECK_FP32(w);
    TORCH_CHECK(w.dim() == 2 && w.size(0) == B && w.size(1) == N, "weight must have shape (B, N) = (", B, ", ", N, "), got ",
                w.sizes());
    CAT_CHECK_SAME_DEVICE(w, q);
  }
  TORCH_CHECK(k_extra.has_value() == v_extra.has_value(), "k_extra and v_extra go together: both or neither");
  int64_t T = 0;
  if (k_extra.has_value()) {
    const at::Tensor &kx = *k_extra, &vx = *v_extra;
    CAT_CHECK_FLOAT(kx);
    CAT_CHECK_FLOAT(vx);
    TORCH_CHECK(kx.dim() == 4 && kx.size(0) == B && kx.size(1) == H && kx.size(3) == D,
                "k_extra must have shape (B, H, T, D) with q's (B, H, D) = (", B, ", ", H, ", ", D, "), got ", kx.sizes());
    TORCH_CHECK(vx.sizes() == kx.sizes(), "v_extra must have the shape of k_extra ", kx.sizes(), ", got ", vx.sizes());
    CAT_CHECK_SAME_DEVICE(kx, q);
    CAT_CHECK_SAME_DEVICE(vx, q);
    T = kx.size(2);
  }
  if (extra_mask.has_value()) {
    TORCH_CHECK(k_extra.has_value(), "extra_mask was given without k_extra and v_extra (it masks the extra rows)");
    TORCH_CHECK(extra_mask->scalar_type() == at::kBool, "extra_mask must have dtype bool, got ", extra_mask->scalar_type());
    TORCH_CHECK(extra_mask->dim() == 2 && extra_mask->size(0) == B && extra_mask->size(1) == T,
                "extra_mask must have shape (B, T) = (", B, ", ", T, "), got ", extra_mask->sizes());
    TORCH_CHECK(extra_mask->device() == q.device(), "extra_mask is on ", extra_mask->device(), " but q is on ", q.device());
  }
  TORCH_CHECK(N + T >= 1, "forecast_attention needs at least one key: N + T = 0");
}

// forecast_attention with ATen ops on any device (forecast.cpp): key blocks formed in fp32 as
// forecast_rows does, two fp32 GEMMs and an online softmax per block. Checked by the caller.
at::Tensor forecast_attention_blocked(const at::Tensor& q, const at::Tensor& k_base, const at::Tensor& v_base,
                                      const std::optional<at::Tensor>& k_slope, const std::optional<at::Tensor>& v_slope,
                                      const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& k_extra,
                                      const std::optional<at::Tensor>& v_extra, const std::optional<at::Tensor>& extra_mask,
                                      std::optional<double> scale);

// The forecast of a skipped token, base + w * slope with two roundings (never a fused multiply-add),
// as the reference's torch ops compute it.
CAT_HD float forecast_value(float base, float slope, float w) {
#if defined(__CUDA_ARCH__)
  return __fadd_rn(base, __fmul_rn(w, slope));
#else
  const float step = w * slope;  // a statement of its own: no contraction on x86-64 builds (no -mfma)
  return base + step;
#endif
}

CAT_HD float forecast_slope(float now, float before, float inv_dt) {
#if defined(__CUDA_ARCH__)
  return __fmul_rn(__fsub_rn(now, before), inv_dt);
#else
  return (now - before) * inv_dt;
#endif
}

}  // namespace cat_kernels
