// CUDA implementation of the forecast ops (TORCH_LIBRARY_IMPL(cat_kernels, CUDA)); schemas in
// forecast.cpp. Same math as the CPU one and cat_kernels/reference.py: fp32, explicit roundings
// (__fmul_rn/__fadd_rn: no FMA contraction), one rounding per stored value.
#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "forecast.h"

namespace cat_kernels {
namespace {

constexpr int kWarp = 32;
constexpr int kRowsPerBlock = 8;

// One cache: base, slope contiguous (B, H, N, D); out of that shape, rows of stride 1 at strides
// os0..os2 (null: not written); rows (B, H, K, D) in base's dtype, any strides.
template <typename scalar_t, typename slope_t>
struct ForecastCache {
  scalar_t* base;
  slope_t* slope;
  scalar_t* out;
  const scalar_t* rows;
  int64_t rs0, rs1, rs2, rs3;
  int64_t os0, os1, os2;
};

// One warp per cache row (b, h, n), lanes over D; blockIdx.y picks the cache (K or V). pos
// outside [0, K) is a skipped token: values are not checked on the device, nothing faults.
template <typename scalar_t, typename slope_t, typename index_t>
__global__ void forecast_kernel(ForecastCache<scalar_t, slope_t> c0, ForecastCache<scalar_t, slope_t> c1, int caches,
                                const index_t* __restrict__ pos, int64_t ps0, int64_t ps1, const float* __restrict__ weight,
                                int64_t ws0, int64_t ws1, const float* __restrict__ inv_dt, int64_t ts0, int64_t ts1,
                                int64_t B, int64_t H, int64_t N, int64_t K, int64_t D) {
  const int64_t r = static_cast<int64_t>(blockIdx.x) * blockDim.y + threadIdx.y;
  if (r >= B * H * N || static_cast<int>(blockIdx.y) >= caches) return;
  const ForecastCache<scalar_t, slope_t>& c = blockIdx.y == 0 ? c0 : c1;
  const int64_t b = r / (H * N), h = (r / N) % H, n = r % N;
  const int64_t j = static_cast<int64_t>(pos[b * ps0 + n * ps1]);
  scalar_t* bs = c.base + r * D;
  slope_t* ss = c.slope + r * D;
  scalar_t* os = c.out ? c.out + b * c.os0 + h * c.os1 + n * c.os2 : nullptr;
  if (j >= 0 && j < K) {
    const scalar_t* row = c.rows + b * c.rs0 + h * c.rs1 + j * c.rs2;
    const float idt = inv_dt[b * ts0 + n * ts1];
    for (int64_t e = threadIdx.x; e < D; e += kWarp) {
      const scalar_t now = row[e * c.rs3];
      ss[e] = static_cast<slope_t>(forecast_slope(static_cast<float>(now), static_cast<float>(bs[e]), idt));
      bs[e] = now;
      if (os) os[e] = now;
    }
  } else if (os) {
    const float w = weight[b * ws0 + n * ws1];
    for (int64_t e = threadIdx.x; e < D; e += kWarp) {
      os[e] = static_cast<scalar_t>(forecast_value(static_cast<float>(bs[e]), static_cast<float>(ss[e]), w));
    }
  }
}

struct CacheArgs {
  at::Tensor base, slope;
  std::optional<at::Tensor> out4;  // (B, H, N, D) view, or none
  at::Tensor rows4;                // (B, H, K, D) view in base's dtype
};

CacheArgs cache_args(const at::Tensor& base, const at::Tensor& slope, const std::optional<at::Tensor>& out,
                     const at::Tensor& rows, int64_t dim) {
  return {base, slope, as_bhnd(out, dim), as_bhnd(rows.to(base.scalar_type()), dim)};
}

template <typename scalar_t, typename slope_t>
ForecastCache<scalar_t, slope_t> device_cache(const CacheArgs& a) {
  const bool out = a.out4.has_value();
  return {a.base.data_ptr<scalar_t>(), a.slope.data_ptr<slope_t>(),
          out ? a.out4->data_ptr<scalar_t>() : nullptr,
          a.rows4.data_ptr<scalar_t>(), a.rows4.stride(0), a.rows4.stride(1), a.rows4.stride(2), a.rows4.stride(3),
          out ? a.out4->stride(0) : 0, out ? a.out4->stride(1) : 0, out ? a.out4->stride(2) : 0};
}

// One launch for one or two caches of the same dtypes (the second one on blockIdx.y = 1).
void launch_forecast(const CacheArgs& a0, const CacheArgs* a1, const at::Tensor& pos, const at::Tensor& weight,
                     const at::Tensor& inv_dt) {
  const at::Tensor& r4 = a0.rows4;
  const int64_t B = r4.size(0), H = r4.size(1), K = r4.size(2), D = r4.size(3), N = pos.size(1);
  if (B * H * N == 0 || D == 0) return;
  const int caches = a1 ? 2 : 1;
  const dim3 block(kWarp, kRowsPerBlock);
  const dim3 grid(static_cast<unsigned>((B * H * N + kRowsPerBlock - 1) / kRowsPerBlock), caches);
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a0.base.scalar_type(), "forecast_cuda", [&] {
    using cache_t = scalar_t;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a0.slope.scalar_type(), "forecast_cuda_slope", [&] {
      using slope_t = scalar_t;
      const auto c0 = device_cache<cache_t, slope_t>(a0);
      const auto c1 = a1 ? device_cache<cache_t, slope_t>(*a1) : c0;
      AT_DISPATCH_INDEX_TYPES(pos.scalar_type(), "forecast_cuda_pos", [&] {
        forecast_kernel<cache_t, slope_t, index_t><<<grid, block, 0, stream>>>(
            c0, c1, caches, pos.data_ptr<index_t>(), pos.stride(0), pos.stride(1), weight.data_ptr<float>(),
            weight.stride(0), weight.stride(1), inv_dt.data_ptr<float>(), inv_dt.stride(0), inv_dt.stride(1), B, H, N, K,
            D);
      });
    });
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void forecast_tokens_cuda(at::Tensor& base, at::Tensor& slope, const std::optional<at::Tensor>& out, const at::Tensor& pos,
                          const at::Tensor& rows, const at::Tensor& weight, const at::Tensor& inv_dt, int64_t dim) {
  check_forecast("base", base, "slope", slope, "out", out, "rows", rows, pos, dim);
  check_forecast_inputs(pos, weight, inv_dt);
  CAT_CHECK_DEVICE_TYPE(base, at::kCUDA);
  check_forecast_distinct("base, slope and out", base, slope, out);
  const c10::cuda::CUDAGuard guard(base.device());
  launch_forecast(cache_args(base, slope, out, rows, dim), nullptr, pos, weight, inv_dt);
}

void forecast_kv_cuda(at::Tensor& k_base, at::Tensor& v_base, at::Tensor& k_slope, at::Tensor& v_slope,
                      const std::optional<at::Tensor>& k_out, const std::optional<at::Tensor>& v_out, const at::Tensor& pos,
                      const at::Tensor& k, const at::Tensor& v, const at::Tensor& weight, const at::Tensor& inv_dt,
                      int64_t dim) {
  check_forecast_kv(k_base, v_base, k_slope, v_slope, k_out, v_out, pos, k, v, weight, inv_dt, dim);
  CAT_CHECK_DEVICE_TYPE(k_base, at::kCUDA);
  check_forecast_distinct("k_base, k_slope and k_out", k_base, k_slope, k_out);
  check_forecast_distinct("v_base, v_slope and v_out", v_base, v_slope, v_out);
  const c10::cuda::CUDAGuard guard(k_base.device());
  const CacheArgs ka = cache_args(k_base, k_slope, k_out, k, dim);
  const CacheArgs va = cache_args(v_base, v_slope, v_out, v, dim);
  if (k_base.scalar_type() == v_base.scalar_type() && k_slope.scalar_type() == v_slope.scalar_type()) {
    launch_forecast(ka, &va, pos, weight, inv_dt);  // one launch for both
  } else {
    launch_forecast(ka, nullptr, pos, weight, inv_dt);
    launch_forecast(va, nullptr, pos, weight, inv_dt);
  }
}

// forecast_attention on CUDA tensors: the blocked ATen implementation of forecast.cpp (cuBLAS
// GEMMs per key block). No hand-written kernel: the Triton one is what runs on GPUs (backend
// "auto"); this keeps backend="cuda" complete with the CPU path's tested semantics.
at::Tensor forecast_attention_cuda(const at::Tensor& q, const at::Tensor& k_base, const at::Tensor& v_base,
                                   const std::optional<at::Tensor>& k_slope, const std::optional<at::Tensor>& v_slope,
                                   const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& k_extra,
                                   const std::optional<at::Tensor>& v_extra, const std::optional<at::Tensor>& extra_mask,
                                   std::optional<double> scale) {
  check_forecast_attention(q, k_base, v_base, k_slope, v_slope, weight, k_extra, v_extra, extra_mask);
  CAT_CHECK_DEVICE_TYPE(q, at::kCUDA);
  const c10::cuda::CUDAGuard guard(q.device());
  return forecast_attention_blocked(q, k_base, v_base, k_slope, v_slope, weight, k_extra, v_extra, extra_mask, scale);
}

}  // namespace
}  // namespace cat_kernels

TORCH_LIBRARY_IMPL(cat_kernels, CUDA, m) {
  using namespace cat_kernels;
  m.impl("forecast_tokens_", &forecast_tokens_cuda);
  m.impl("forecast_kv_", &forecast_kv_cuda);
  m.impl("forecast_attention", &forecast_attention_cuda);
}
