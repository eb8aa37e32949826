// Shared by the CPU, CUDA and Meta implementations of the cat_kernels ops: argument checks at the
// boundary (messages name the argument) and the order-preserving float keys used by selection.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <cstring>

namespace cat_kernels {

#if defined(__CUDACC__)
#define CAT_HD __host__ __device__ __forceinline__
#else
#define CAT_HD inline
#endif

#define CAT_CHECK_DIM(t, n) TORCH_CHECK((t).dim() == (n), #t " must have " #n " dimensions, got shape ", (t).sizes())
#define CAT_CHECK_FLOAT(t)                                                                                           \
  TORCH_CHECK((t).scalar_type() == at::kFloat || (t).scalar_type() == at::kHalf || (t).scalar_type() == at::kBFloat16, \
              #t " must be float32/float16/bfloat16, got ", (t).scalar_type())
#define CAT_CHECK_FP32(t) TORCH_CHECK((t).scalar_type() == at::kFloat, #t " must be float32, got ", (t).scalar_type())
#define CAT_CHECK_INDEX(t) \
  TORCH_CHECK((t).scalar_type() == at::kInt || (t).scalar_type() == at::kLong, #t " must be int32/int64, got ", (t).scalar_type())
#define CAT_CHECK_SAME_DEVICE(t, ref) \
  TORCH_CHECK((t).device() == (ref).device(), #t " is on ", (t).device(), " but " #ref " is on ", (ref).device())
#define CAT_CHECK_DEVICE_TYPE(t, kind) \
  TORCH_CHECK((t).device().type() == (kind), #t " must be a ", (kind), " tensor, got ", (t).device())
#define CAT_CHECK_SHAPE(t, ...)                                                                                  \
  TORCH_CHECK((t).sizes() == at::IntArrayRef({__VA_ARGS__}), #t " must have shape ", at::IntArrayRef({__VA_ARGS__}), \
              ", got ", (t).sizes())

// Token layout: x is (B, N, C) with dim=1 or (B, H, N, D) with dim=2; viewed as (B, H, N, D).
inline at::Tensor as_bhnd(const at::Tensor& x, int64_t dim) { return dim == 1 ? x.unsqueeze(1) : x; }

inline void check_token_dim(const char* name, const at::Tensor& x, int64_t dim) {
  TORCH_CHECK((dim == 1 || dim == 2) && x.dim() == dim + 2, "dim must be 1 for (B, N, C) or 2 for (B, H, N, D); got dim=",
              dim, " with ", name, " of shape ", x.sizes());
}

inline void check_gather(const at::Tensor& x, const at::Tensor& idx, int64_t dim) {
  CAT_CHECK_FLOAT(x);
  check_token_dim("x", x, dim);
  CAT_CHECK_INDEX(idx);
  CAT_CHECK_DIM(idx, 2);
  TORCH_CHECK(idx.size(0) == x.size(0), "idx must have batch size ", x.size(0), ", got ", idx.size(0));
  CAT_CHECK_SAME_DEVICE(idx, x);
}

inline void check_scatter(const char* dst_name, const at::Tensor& dst, const at::Tensor& idx, const char* src_name,
                          const at::Tensor& src, int64_t dim) {
  TORCH_CHECK(dst.scalar_type() == at::kFloat || dst.scalar_type() == at::kHalf || dst.scalar_type() == at::kBFloat16,
              dst_name, " must be float32/float16/bfloat16, got ", dst.scalar_type());
  TORCH_CHECK(src.scalar_type() == at::kFloat || src.scalar_type() == at::kHalf || src.scalar_type() == at::kBFloat16,
              src_name, " must be float32/float16/bfloat16, got ", src.scalar_type());
  check_token_dim(dst_name, dst, dim);
  CAT_CHECK_INDEX(idx);
  CAT_CHECK_DIM(idx, 2);
  std::vector<int64_t> expected(dst.sizes().begin(), dst.sizes().end());
  TORCH_CHECK(idx.size(0) == dst.size(0), "idx must have batch size ", dst.size(0), ", got ", idx.size(0));
  expected[dim] = idx.size(1);
  TORCH_CHECK(src.sizes() == at::IntArrayRef(expected), src_name, " must have shape ", at::IntArrayRef(expected), ", got ",
              src.sizes());
  TORCH_CHECK(idx.device() == dst.device() && src.device() == dst.device(), "idx and ", src_name, " must be on ", dst_name,
              "'s device ", dst.device(), ", got ", idx.device(), " and ", src.device());
}

inline void check_token_stats(const at::Tensor& out, const at::Tensor& anchor, const at::Tensor& labels, int64_t num_clusters) {
  CAT_CHECK_FLOAT(out);
  CAT_CHECK_FLOAT(anchor);
  CAT_CHECK_DIM(out, 3);
  TORCH_CHECK(anchor.sizes() == out.sizes(), "anchor must have the shape of out ", out.sizes(), ", got ", anchor.sizes());
  CAT_CHECK_INDEX(labels);
  TORCH_CHECK(labels.dim() == 2 && labels.size(0) == out.size(0) && labels.size(1) == out.size(1),
              "labels must have shape (B, N) = (", out.size(0), ", ", out.size(1), "), got ", labels.sizes());
  CAT_CHECK_SAME_DEVICE(anchor, out);
  CAT_CHECK_SAME_DEVICE(labels, out);
  TORCH_CHECK(num_clusters >= 1, "num_clusters must be >= 1, got ", num_clusters);
}

inline void check_select(const at::Tensor& d, const at::Tensor& cluster_score, const at::Tensor& labels,
                         const at::Tensor& staleness, int64_t k, double importance_fraction, double staleness_decay) {
  CAT_CHECK_FP32(d);
  CAT_CHECK_DIM(d, 2);
  CAT_CHECK_FP32(cluster_score);
  CAT_CHECK_DIM(cluster_score, 2);
  CAT_CHECK_INDEX(labels);
  CAT_CHECK_FP32(staleness);
  TORCH_CHECK(labels.sizes() == d.sizes(), "labels must have the shape of d ", d.sizes(), ", got ", labels.sizes());
  TORCH_CHECK(staleness.sizes() == d.sizes(), "staleness must have the shape of d ", d.sizes(), ", got ", staleness.sizes());
  TORCH_CHECK(cluster_score.size(0) == d.size(0), "cluster_score must have batch size ", d.size(0), ", got ",
              cluster_score.size(0));
  TORCH_CHECK(cluster_score.size(1) >= 1 && cluster_score.size(1) <= 1023, "cluster_score must have 1 to 1023 clusters, got ",
              cluster_score.size(1));
  TORCH_CHECK(d.size(1) <= (int64_t(1) << 20), "d has N=", d.size(1), " tokens; at most 2^20 are supported");
  TORCH_CHECK(k >= 1 && k <= d.size(1), "k must lie in [1, N=", d.size(1), "], got ", k);
  TORCH_CHECK(importance_fraction >= 0.0 && importance_fraction <= 1.0, "importance_fraction must lie in [0, 1], got ",
              importance_fraction);
  TORCH_CHECK(staleness_decay >= 0.0 && staleness_decay <= 1.0, "staleness_decay must lie in [0, 1], got ", staleness_decay);
  CAT_CHECK_SAME_DEVICE(cluster_score, d);
  CAT_CHECK_SAME_DEVICE(labels, d);
  CAT_CHECK_SAME_DEVICE(staleness, d);
}

inline void check_kmeans(const at::Tensor& features, int64_t num_clusters, int64_t iters) {
  CAT_CHECK_FLOAT(features);
  CAT_CHECK_DIM(features, 3);
  TORCH_CHECK(features.size(1) >= 1, "features must have at least one token, got shape ", features.sizes());
  TORCH_CHECK(num_clusters >= 1 && num_clusters <= 1023, "num_clusters must lie in [1, 1023], got ", num_clusters);
  TORCH_CHECK(iters >= 0, "iters must be >= 0, got ", iters);
}

// The selection policy's integer budgets, truncated exactly like Python's int(0.05 * k) and
// int(importance_fraction * k) (a double product, truncated toward zero).
inline int64_t quota_base(int64_t k) { return static_cast<int64_t>(0.05 * static_cast<double>(k)); }
inline int64_t importance_budget(double fraction, int64_t k) { return static_cast<int64_t>(fraction * static_cast<double>(k)); }

CAT_HD int64_t rank_multiplier(int64_t r) { return r == 0 ? 3 : (r == 1 ? 2 : 1); }

// A uint32 whose unsigned order is the float order of torch.sort: -0.0 equals 0.0 and NaN sorts
// after +inf (ascending). Keys of -x give "descending, NaN last", as sorting -d does in the reference.
CAT_HD uint32_t float_key(float x) {
  if (x != x) return 0xFFFFFFFFu;
  if (x == 0.0f) x = 0.0f;
  uint32_t bits;
#if defined(__CUDA_ARCH__)
  bits = __float_as_uint(x);
#else
  std::memcpy(&bits, &x, sizeof(bits));
#endif
  return (bits & 0x80000000u) ? ~bits : (bits | 0x80000000u);
}

}  // namespace cat_kernels
