// cat_kernels ops: schemas (TORCH_LIBRARY), the CPU (C++) implementations and the Meta ones.
// Each op mirrors cat_kernels/reference.py with the same arguments; indices match it exactly.
#include <ATen/Parallel.h>
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include <algorithm>
#include <numeric>
#include <vector>

#include "common.h"
#include "ops.h"

namespace cat_kernels {
namespace {

template <typename index_t>
void check_range_cpu(const char* name, const at::Tensor& t, int64_t high) {
  const index_t* p = t.data_ptr<index_t>();
  for (int64_t i = 0, n = t.numel(); i < n; ++i) {
    TORCH_CHECK(p[i] >= 0 && p[i] < high, name, " must lie in [0, ", high, "), got ", static_cast<int64_t>(p[i]));
  }
}

// Contiguous int64 copy of an index tensor after a bounds check (CPU only: values are readable).
at::Tensor checked_index_cpu(const char* name, const at::Tensor& t, int64_t high) {
  at::Tensor c = t.to(at::kLong).contiguous();
  check_range_cpu<int64_t>(name, c, high);
  return c;
}

// ----------------------------------------------------------------------------- gather / scatter

// Copies rows of `count` elements between strided rows; memcpy when both are dense.
template <typename scalar_t>
inline void copy_row(scalar_t* dst, int64_t dst_stride, const scalar_t* src, int64_t src_stride, int64_t count) {
  if (dst_stride == 1 && src_stride == 1) {
    std::memcpy(dst, src, count * sizeof(scalar_t));
  } else {
    for (int64_t e = 0; e < count; ++e) dst[e * dst_stride] = src[e * src_stride];
  }
}

// dir = 0: out[b,h,j,:] = x[b,h,idx[b,j],:] (gather); dir = 1: x[b,h,idx[b,j],:] = out[b,h,j,:] (scatter).
template <typename scalar_t>
void rows_cpu(const at::Tensor& cache4, const at::Tensor& rows4, const int64_t* idx, bool scatter) {
  const int64_t B = cache4.size(0), H = cache4.size(1), D = cache4.size(3), K = rows4.size(2);
  scalar_t* cp = cache4.data_ptr<scalar_t>();
  scalar_t* rp = rows4.data_ptr<scalar_t>();
  const auto cs = cache4.strides();
  const auto rs = rows4.strides();
  const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(D, 1));
  at::parallel_for(0, B * H * K, grain, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const int64_t b = r / (H * K), h = (r / K) % H, j = r % K;
      const int64_t n = idx[b * K + j];
      scalar_t* c = cp + b * cs[0] + h * cs[1] + n * cs[2];
      scalar_t* w = rp + b * rs[0] + h * rs[1] + j * rs[2];
      if (scatter) {
        copy_row(c, cs[3], w, rs[3], D);
      } else {
        copy_row(w, rs[3], c, cs[3], D);
      }
    }
  });
}

at::Tensor gather_tokens_cpu(const at::Tensor& x, const at::Tensor& idx, int64_t dim) {
  check_gather(x, idx, dim);
  CAT_CHECK_DEVICE_TYPE(x, at::kCPU);
  at::Tensor index = checked_index_cpu("idx", idx, x.size(dim));
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
  shape[dim] = idx.size(1);
  at::Tensor out = at::empty(shape, x.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "gather_tokens_cpu", [&] {
    rows_cpu<scalar_t>(as_bhnd(x, dim), as_bhnd(out, dim), index.data_ptr<int64_t>(), /*scatter=*/false);
  });
  return out;
}

void scatter_rows_cpu(const at::Tensor& dst, const at::Tensor& index, const at::Tensor& src, int64_t dim) {
  at::Tensor s = src.to(dst.scalar_type());  // the reference casts src to the cache's dtype
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dst.scalar_type(), "scatter_tokens_cpu", [&] {
    rows_cpu<scalar_t>(as_bhnd(dst, dim), as_bhnd(s, dim), index.data_ptr<int64_t>(), /*scatter=*/true);
  });
}

void scatter_tokens_cpu(at::Tensor& dst, const at::Tensor& idx, const at::Tensor& src, int64_t dim) {
  check_scatter("dst", dst, idx, "src", src, dim);
  CAT_CHECK_DEVICE_TYPE(dst, at::kCPU);
  scatter_rows_cpu(dst, checked_index_cpu("idx", idx, dst.size(dim)), src, dim);
}

void scatter_kv_cpu(at::Tensor& k_cache, at::Tensor& v_cache, const at::Tensor& idx, const at::Tensor& k,
                    const at::Tensor& v, int64_t dim) {
  check_scatter("k_cache", k_cache, idx, "k", k, dim);
  check_scatter("v_cache", v_cache, idx, "v", v, dim);
  TORCH_CHECK(k_cache.sizes() == v_cache.sizes(), "v_cache must have the shape of k_cache ", k_cache.sizes(), ", got ",
              v_cache.sizes());
  CAT_CHECK_DEVICE_TYPE(k_cache, at::kCPU);
  CAT_CHECK_SAME_DEVICE(v_cache, k_cache);
  at::Tensor index = checked_index_cpu("idx", idx, k_cache.size(dim));
  scatter_rows_cpu(k_cache, index, k, dim);
  scatter_rows_cpu(v_cache, index, v, dim);
}

// ----------------------------------------------------------------------------- token_stats

template <typename scalar_t>
void token_stats_kernel_cpu(const at::Tensor& out, const at::Tensor& anchor, const int64_t* labels, int64_t nc,
                            float* d, float* cmax) {
  const int64_t B = out.size(0), N = out.size(1), C = out.size(2);
  const scalar_t* op = out.data_ptr<scalar_t>();
  const scalar_t* ap = anchor.data_ptr<scalar_t>();
  const auto os = out.strides();
  const auto as = anchor.strides();
  // Per-thread partial channel maxima, merged afterwards, so no two threads write one row.
  const int64_t threads = at::get_num_threads();
  std::vector<float> partial(static_cast<size_t>(threads * B * nc * C), -std::numeric_limits<float>::infinity());
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(C, 1));
  at::parallel_for(0, B * N, grain, [&](int64_t begin, int64_t end) {
    float* mine = partial.data() + at::get_thread_num() * B * nc * C;
    for (int64_t t = begin; t < end; ++t) {
      const int64_t b = t / N, i = t % N;
      const scalar_t* o = op + b * os[0] + i * os[1];
      const scalar_t* a = ap + b * as[0] + i * as[1];
      float* m = mine + (b * nc + labels[t]) * C;
      float acc = 0.0f;  // fp32 accumulation whatever the input dtype
      for (int64_t c = 0; c < C; ++c) {
        const float diff = static_cast<float>(o[c * os[2]]) - static_cast<float>(a[c * as[2]]);
        acc += diff * diff;
        m[c] = std::max(m[c], diff);
      }
      d[t] = std::sqrt(acc);
    }
  });
  for (int64_t th = 0; th < threads; ++th) {
    const float* p = partial.data() + th * B * nc * C;
    for (int64_t e = 0; e < B * nc * C; ++e) cmax[e] = std::max(cmax[e], p[e]);
  }
}

std::tuple<at::Tensor, at::Tensor> token_stats_cpu(const at::Tensor& out, const at::Tensor& anchor, const at::Tensor& labels,
                                                   int64_t num_clusters) {
  check_token_stats(out, anchor, labels, num_clusters);
  CAT_CHECK_DEVICE_TYPE(out, at::kCPU);
  const int64_t B = out.size(0), N = out.size(1), C = out.size(2);
  at::Tensor lab = checked_index_cpu("labels", labels, num_clusters);
  at::Tensor o = out, a = anchor;
  if (o.scalar_type() != a.scalar_type()) {  // mixed dtypes: both in fp32, as the reference computes
    o = o.to(at::kFloat);
    a = a.to(at::kFloat);
  }
  at::Tensor d = at::empty({B, N}, out.options().dtype(at::kFloat));
  at::Tensor cmax = at::full({B, num_clusters, C}, -std::numeric_limits<float>::infinity(), d.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, o.scalar_type(), "token_stats_cpu", [&] {
    token_stats_kernel_cpu<scalar_t>(o, a, lab.data_ptr<int64_t>(), num_clusters, d.data_ptr<float>(),
                                     cmax.data_ptr<float>());
  });
  at::Tensor score = at::empty({B, num_clusters}, d.options());
  const float* m = cmax.data_ptr<float>();
  float* s = score.data_ptr<float>();
  for (int64_t r = 0; r < B * num_clusters; ++r) {
    const float* row = m + r * C;
    if (C > 0 && row[0] == -std::numeric_limits<float>::infinity()) {  // empty cluster ranks last
      s[r] = -std::numeric_limits<float>::infinity();
      continue;
    }
    float acc = 0.0f;
    for (int64_t c = 0; c < C; ++c) acc += row[c] * row[c];
    s[r] = std::sqrt(acc);
  }
  return {d, score};
}

// ----------------------------------------------------------------------------- select_tokens

// The k tokens of one sample (reference.select_tokens step by step, with sorts replaced by
// sorts of (key << 32 | index) words, which order exactly as the reference's stable sorts).
void select_one_cpu(const float* d, int64_t d_stride, const float* score, int64_t score_stride, const int64_t* labels,
                    const float* s, int64_t s_stride, int64_t N, int64_t nc, int64_t k, bool first, double fraction,
                    int64_t* out) {
  // Cluster rank: score descending, ties by lower id.
  std::vector<uint64_t> ckey(nc);
  for (int64_t c = 0; c < nc; ++c) ckey[c] = (uint64_t(~float_key(score[c * score_stride])) << 32) | uint64_t(c);
  std::sort(ckey.begin(), ckey.end());
  std::vector<int64_t> rank(nc);
  for (int64_t r = 0; r < nc; ++r) rank[ckey[r] & 0xFFFFFFFFu] = r;

  // Tokens bucketed by rank (index order), then each bucket sorted by d descending, ties by index.
  std::vector<int64_t> size(nc + 1, 0);
  for (int64_t i = 0; i < N; ++i) ++size[rank[labels[i]] + 1];
  std::vector<int64_t> start(nc + 1, 0);
  for (int64_t r = 0; r < nc; ++r) start[r + 1] = start[r] + size[r + 1];
  std::vector<uint64_t> by_d(N);
  {
    std::vector<int64_t> fill(start.begin(), start.end() - 1);
    for (int64_t i = 0; i < N; ++i) {
      by_d[fill[rank[labels[i]]]++] = (uint64_t(float_key(-d[i * d_stride])) << 32) | uint64_t(i);
    }
  }
  for (int64_t r = 0; r < nc; ++r) std::sort(by_d.begin() + start[r], by_d.begin() + start[r + 1]);

  std::vector<uint8_t> chosen(N, 0);
  int64_t taken = 0;
  auto fill_key = [&](int64_t i) -> uint32_t { return first ? float_key(-d[i * d_stride]) : float_key(s[i * s_stride]); };
  if (first) {
    const int64_t per = k / 10;
    for (int64_t r = 0; r < nc && taken < k; ++r) {
      const int64_t n = std::min(per, start[r + 1] - start[r]);
      for (int64_t p = 0; p < n && taken < k; ++p, ++taken) chosen[by_d[start[r] + p] & 0xFFFFFFFFu] = 1;
    }
  } else {
    const int64_t base = quota_base(k);
    const int64_t budget = importance_budget(fraction, k);
    std::vector<uint64_t> rest;
    for (int64_t r = 0; r < nc && taken < budget; ++r) {
      const int64_t n_r = start[r + 1] - start[r];
      const int64_t q = std::min(rank_multiplier(r) * base, n_r);
      for (int64_t p = 0; p < q && taken < budget; ++p, ++taken) chosen[by_d[start[r] + p] & 0xFFFFFFFFu] = 1;
      const int64_t n_stale = r >= 1 ? std::min(q / 2, n_r - q) : 0;
      if (n_stale <= 0 || taken >= budget) continue;
      // The stalest of the cluster's remaining tokens, ties by index, in that order.
      rest.clear();
      for (int64_t p = q; p < n_r; ++p) {
        const int64_t i = by_d[start[r] + p] & 0xFFFFFFFFu;
        rest.push_back((uint64_t(float_key(s[i * s_stride])) << 32) | uint64_t(i));
      }
      std::partial_sort(rest.begin(), rest.begin() + n_stale, rest.end());
      for (int64_t p = 0; p < n_stale && taken < budget; ++p, ++taken) chosen[rest[p] & 0xFFFFFFFFu] = 1;
    }
  }
  // Fill with the best of the others by the fill key (largest d / stalest), ties by index.
  const int64_t need = k - taken;
  if (need > 0) {
    std::vector<uint64_t> others;
    others.reserve(N - taken);
    for (int64_t i = 0; i < N; ++i) {
      if (!chosen[i]) others.push_back((uint64_t(fill_key(i)) << 32) | uint64_t(i));
    }
    std::nth_element(others.begin(), others.begin() + (need - 1), others.end());
    for (int64_t p = 0; p < need; ++p) chosen[others[p] & 0xFFFFFFFFu] = 1;
  }
  for (int64_t i = 0, j = 0; i < N; ++i) {
    if (chosen[i]) out[j++] = i;  // ascending
  }
}

at::Tensor select_tokens_cpu(const at::Tensor& d, const at::Tensor& cluster_score, const at::Tensor& labels,
                             at::Tensor& staleness, int64_t k, bool first, double importance_fraction,
                             double staleness_decay) {
  check_select(d, cluster_score, labels, staleness, k, importance_fraction, staleness_decay);
  CAT_CHECK_DEVICE_TYPE(d, at::kCPU);
  const int64_t B = d.size(0), N = d.size(1), nc = cluster_score.size(1);
  at::Tensor lab = checked_index_cpu("labels", labels, nc);
  at::Tensor idx = at::empty({B, k}, d.options().dtype(at::kLong));
  const float* dp = d.data_ptr<float>();
  const float* cp = cluster_score.data_ptr<float>();
  const float* sp = staleness.data_ptr<float>();
  int64_t* ip = idx.data_ptr<int64_t>();
  at::parallel_for(0, B, 1, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      select_one_cpu(dp + b * d.stride(0), d.stride(1), cp + b * cluster_score.stride(0), cluster_score.stride(1),
                     lab.data_ptr<int64_t>() + b * N, sp + b * staleness.stride(0), staleness.stride(1), N, nc, k, first,
                     importance_fraction, ip + b * k);
    }
  });
  // s = decay * s; s[idx] += 1, the same two roundings as the reference (mul_, then scatter_add_).
  staleness.mul_(staleness_decay);
  float* sw = staleness.data_ptr<float>();
  for (int64_t b = 0; b < B; ++b) {
    for (int64_t j = 0; j < k; ++j) sw[b * staleness.stride(0) + ip[b * k + j] * staleness.stride(1)] += 1.0f;
  }
  return idx;
}

// ----------------------------------------------------------------------------- kmeans

at::Tensor kmeans_assign_cpu(const at::Tensor& features, const at::Tensor& centroids) {
  CAT_CHECK_FLOAT(features);
  CAT_CHECK_DIM(features, 3);
  CAT_CHECK_DIM(centroids, 3);
  TORCH_CHECK(centroids.size(0) == features.size(0) && centroids.size(2) == features.size(2),
              "centroids must have shape (B, nc, F) with B, F of features ", features.sizes(), ", got ", centroids.sizes());
  CAT_CHECK_DEVICE_TYPE(features, at::kCPU);
  CAT_CHECK_SAME_DEVICE(centroids, features);
  const int64_t B = features.size(0), N = features.size(1), F = features.size(2), nc = centroids.size(1);
  at::Tensor x = features.to(at::kFloat).contiguous();
  at::Tensor c = centroids.to(at::kFloat).contiguous();
  at::Tensor labels = at::empty({B, N}, features.options().dtype(at::kLong));
  const float* xp = x.data_ptr<float>();
  const float* cp = c.data_ptr<float>();
  int64_t* lp = labels.data_ptr<int64_t>();
  at::parallel_for(0, B * N, 256, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const float* p = xp + t * F;
      const float* cb = cp + (t / N) * nc * F;
      float best = std::numeric_limits<float>::infinity();
      int64_t arg = 0;
      for (int64_t j = 0; j < nc; ++j) {
        float acc = 0.0f;
        for (int64_t f = 0; f < F; ++f) {
          const float diff = p[f] - cb[j * F + f];
          acc += diff * diff;
        }
        if (acc < best || (j == 0)) {  // strict: ties keep the lower centroid, as argmin does
          best = acc;
          arg = j;
        }
      }
      lp[t] = arg;
    }
  });
  return labels;
}

}  // namespace

// The reference's deterministic update, in the same ATen ops so centroids match it bit for bit.
at::Tensor kmeans_update(const at::Tensor& features, const at::Tensor& labels, const at::Tensor& centroids) {
  at::Tensor one_hot = at::one_hot(labels, centroids.size(1)).to(at::kFloat);
  at::Tensor sums = at::matmul(one_hot.transpose(1, 2), features.to(at::kFloat));
  at::Tensor counts = one_hot.sum(1).unsqueeze(-1);
  return at::where(counts > 0, sums / counts.clamp_min(1), centroids);
}

at::Tensor kmeans_init(const at::Tensor& features, int64_t num_clusters) {
  const int64_t N = features.size(1);
  std::vector<int64_t> pick(num_clusters);
  for (int64_t c = 0; c < num_clusters; ++c) pick[c] = std::min(((c * 2 + 1) * N) / (2 * num_clusters), N - 1);
  at::Tensor index = at::tensor(pick, at::TensorOptions().dtype(at::kLong)).to(features.device());
  return features.to(at::kFloat).index_select(1, index);
}

at::Tensor kmeans_with(const at::Tensor& features, int64_t num_clusters, int64_t iters,
                       at::Tensor (*assign)(const at::Tensor&, const at::Tensor&)) {
  check_kmeans(features, num_clusters, iters);
  at::Tensor centroids = kmeans_init(features, num_clusters);
  for (int64_t it = 0; it < iters; ++it) centroids = kmeans_update(features, assign(features, centroids), centroids);
  return assign(features, centroids);
}

namespace {

at::Tensor kmeans_cpu(const at::Tensor& features, int64_t num_clusters, int64_t iters) {
  CAT_CHECK_DEVICE_TYPE(features, at::kCPU);
  return kmeans_with(features, num_clusters, iters, &kmeans_assign_cpu);
}

// ----------------------------------------------------------------------------- Meta (shapes only)

std::tuple<at::Tensor, at::Tensor> token_stats_meta(const at::Tensor& out, const at::Tensor& anchor,
                                                    const at::Tensor& labels, int64_t num_clusters) {
  check_token_stats(out, anchor, labels, num_clusters);
  auto opts = out.options().dtype(at::kFloat);
  return {at::empty({out.size(0), out.size(1)}, opts), at::empty({out.size(0), num_clusters}, opts)};
}

at::Tensor select_tokens_meta(const at::Tensor& d, const at::Tensor& cluster_score, const at::Tensor& labels,
                              at::Tensor& staleness, int64_t k, bool first, double importance_fraction,
                              double staleness_decay) {
  check_select(d, cluster_score, labels, staleness, k, importance_fraction, staleness_decay);
  return at::empty({d.size(0), k}, d.options().dtype(at::kLong));
}

at::Tensor gather_tokens_meta(const at::Tensor& x, const at::Tensor& idx, int64_t dim) {
  check_gather(x, idx, dim);
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
  shape[dim] = idx.size(1);
  return at::empty(shape, x.options());
}

void scatter_tokens_meta(at::Tensor& dst, const at::Tensor& idx, const at::Tensor& src, int64_t dim) {
  check_scatter("dst", dst, idx, "src", src, dim);
}

void scatter_kv_meta(at::Tensor& k_cache, at::Tensor& v_cache, const at::Tensor& idx, const at::Tensor& k,
                     const at::Tensor& v, int64_t dim) {
  check_scatter("k_cache", k_cache, idx, "k", k, dim);
  check_scatter("v_cache", v_cache, idx, "v", v, dim);
}

at::Tensor kmeans_meta(const at::Tensor& features, int64_t num_clusters, int64_t iters) {
  check_kmeans(features, num_clusters, iters);
  return at::empty({features.size(0), features.size(1)}, features.options().dtype(at::kLong));
}

at::Tensor kmeans_assign_meta(const at::Tensor& features, const at::Tensor& centroids) {
  return at::empty({features.size(0), features.size(1)}, features.options().dtype(at::kLong));
}

}  // namespace
}  // namespace cat_kernels

// Schemas mirror cat_kernels/reference.py. The in-place ops return nothing (the Python wrappers
// return dst), so torch.compile can functionalize them.
TORCH_LIBRARY(cat_kernels, m) {
  m.def("token_stats(Tensor out, Tensor anchor, Tensor labels, int num_clusters) -> (Tensor, Tensor)");
  m.def(
      "select_tokens(Tensor d, Tensor cluster_score, Tensor labels, Tensor(a!) staleness, int k, bool first, "
      "float importance_fraction=0.25, float staleness_decay=0.5) -> Tensor");
  m.def("gather_tokens(Tensor x, Tensor idx, int dim) -> Tensor");
  m.def("scatter_tokens_(Tensor(a!) dst, Tensor idx, Tensor src, int dim) -> ()");
  m.def("scatter_kv_(Tensor(a!) k_cache, Tensor(b!) v_cache, Tensor idx, Tensor k, Tensor v, int dim) -> ()");
  m.def("kmeans(Tensor features, int num_clusters, int iters) -> Tensor");
  m.def("kmeans_assign(Tensor features, Tensor centroids) -> Tensor");
}

TORCH_LIBRARY_IMPL(cat_kernels, CPU, m) {
  using namespace cat_kernels;
  m.impl("token_stats", &token_stats_cpu);
  m.impl("select_tokens", &select_tokens_cpu);
  m.impl("gather_tokens", &gather_tokens_cpu);
  m.impl("scatter_tokens_", &scatter_tokens_cpu);
  m.impl("scatter_kv_", &scatter_kv_cpu);
  m.impl("kmeans", &kmeans_cpu);
  m.impl("kmeans_assign", &kmeans_assign_cpu);
}

TORCH_LIBRARY_IMPL(cat_kernels, Meta, m) {
  using namespace cat_kernels;
  m.impl("token_stats", &token_stats_meta);
  m.impl("select_tokens", &select_tokens_meta);
  m.impl("gather_tokens", &gather_tokens_meta);
  m.impl("scatter_tokens_", &scatter_tokens_meta);
  m.impl("scatter_kv_", &scatter_kv_meta);
  m.impl("kmeans", &kmeans_meta);
  m.impl("kmeans_assign", &kmeans_assign_meta);
}
