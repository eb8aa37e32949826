// CUDA implementations of the cat_kernels ops (TORCH_LIBRARY_IMPL(cat_kernels, CUDA)).
// Same math and orderings as the CPU ones and cat_kernels/reference.py; indices match exactly.
#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <limits>
#include <vector>

#include "common.h"
#include "ops.h"

namespace cat_kernels {
namespace {

constexpr int kWarp = 32;

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Token-row tensors as (B, H, N, D) with int64 strides, passed by value to the kernels.
struct Rows4 {
  int64_t B, H, N, D;
  int64_t s0, s1, s2, s3;
};

inline Rows4 rows4(const at::Tensor& t4) {
  return {t4.size(0), t4.size(1), t4.size(2), t4.size(3), t4.stride(0), t4.stride(1), t4.stride(2), t4.stride(3)};
}

// ----------------------------------------------------------------------------- gather / scatter

// One warp per (b, h, j) row: lanes stride over D. Out-of-range indices are skipped instead of
// faulting (values are not checked on the device; ops.py checks them on CPU only).
// Up to two (cache, rows) pairs per launch, so K and V caches are written together.
template <typename scalar_t, typename index_t>
__global__ void rows_kernel(scalar_t* cache0, scalar_t* rows0, scalar_t* cache1, scalar_t* rows1, Rows4 c, Rows4 r,
                            const index_t* __restrict__ idx, int64_t K, int pairs, bool scatter) {
  const int64_t row = static_cast<int64_t>(blockIdx.x) * blockDim.y + threadIdx.y;
  const int pair = blockIdx.y;
  if (row >= c.B * c.H * K || pair >= pairs) return;
  const int64_t b = row / (c.H * K), h = (row / K) % c.H, j = row % K;
  const int64_t n = static_cast<int64_t>(idx[b * K + j]);
  if (n < 0 || n >= c.N) return;
  scalar_t* cache = pair == 0 ? cache0 : cache1;
  scalar_t* rows = pair == 0 ? rows0 : rows1;
  scalar_t* cp = cache + b * c.s0 + h * c.s1 + n * c.s2;
  scalar_t* rp = rows + b * r.s0 + h * r.s1 + j * r.s2;
  for (int64_t e = threadIdx.x; e < c.D; e += kWarp) {
    if (scatter) {
      cp[e * c.s3] = rp[e * r.s3];
    } else {
      rp[e * r.s3] = cp[e * c.s3];
    }
  }
}

// Rows of both pairs must share shape and strides (checked by the callers; else two launches).
void launch_rows(const at::Tensor& cache0, const at::Tensor& rows0, const at::Tensor* cache1, const at::Tensor* rows1,
                 const at::Tensor& idx, int64_t dim, bool scatter) {
  const at::Tensor c4 = as_bhnd(cache0, dim), r4 = as_bhnd(rows0, dim);
  const Rows4 c = rows4(c4), r = rows4(r4);
  const int64_t K = idx.size(1);
  const int64_t total = c.B * c.H * K;
  if (total == 0 || c.D == 0) return;
  const int pairs = cache1 ? 2 : 1;
  const dim3 block(kWarp, 8);
  const dim3 grid(static_cast<unsigned>(ceil_div(total, block.y)), pairs);
  auto stream = at::cuda::getCurrentCUDAStream();
  at::Tensor index = idx.contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, cache0.scalar_type(), "cat_rows_cuda", [&] {
    scalar_t* c1 = cache1 ? cache1->data_ptr<scalar_t>() : nullptr;
    scalar_t* r1 = rows1 ? rows1->data_ptr<scalar_t>() : nullptr;
    AT_DISPATCH_INDEX_TYPES(index.scalar_type(), "cat_rows_cuda_idx", [&] {
      rows_kernel<scalar_t, index_t><<<grid, block, 0, stream>>>(cache0.data_ptr<scalar_t>(), rows0.data_ptr<scalar_t>(),
                                                                 c1, r1, c, r, index.data_ptr<index_t>(), K, pairs,
                                                                 scatter);
    });
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

at::Tensor gather_tokens_cuda(const at::Tensor& x, const at::Tensor& idx, int64_t dim) {
  check_gather(x, idx, dim);
  CAT_CHECK_DEVICE_TYPE(x, at::kCUDA);
  const c10::cuda::CUDAGuard guard(x.device());
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
  shape[dim] = idx.size(1);
  at::Tensor out = at::empty(shape, x.options());
  launch_rows(x, out, nullptr, nullptr, idx, dim, /*scatter=*/false);
  return out;
}

void scatter_tokens_cuda(at::Tensor& dst, const at::Tensor& idx, const at::Tensor& src, int64_t dim) {
  check_scatter("dst", dst, idx, "src", src, dim);
  CAT_CHECK_DEVICE_TYPE(dst, at::kCUDA);
  const c10::cuda::CUDAGuard guard(dst.device());
  launch_rows(dst, src.to(dst.scalar_type()), nullptr, nullptr, idx, dim, /*scatter=*/true);
}

void scatter_kv_cuda(at::Tensor& k_cache, at::Tensor& v_cache, const at::Tensor& idx, const at::Tensor& k,
                     const at::Tensor& v, int64_t dim) {
  check_scatter("k_cache", k_cache, idx, "k", k, dim);
  check_scatter("v_cache", v_cache, idx, "v", v, dim);
  TORCH_CHECK(k_cache.sizes() == v_cache.sizes(), "v_cache must have the shape of k_cache ", k_cache.sizes(), ", got ",
              v_cache.sizes());
  CAT_CHECK_DEVICE_TYPE(k_cache, at::kCUDA);
  CAT_CHECK_SAME_DEVICE(v_cache, k_cache);
  const c10::cuda::CUDAGuard guard(k_cache.device());
  at::Tensor ks = k.to(k_cache.scalar_type());
  at::Tensor vs = v.to(v_cache.scalar_type());
  if (k_cache.scalar_type() == v_cache.scalar_type() && k_cache.strides() == v_cache.strides() &&
      ks.strides() == vs.strides()) {
    launch_rows(k_cache, ks, &v_cache, &vs, idx, dim, /*scatter=*/true);  // one launch for both
  } else {
    launch_rows(k_cache, ks, nullptr, nullptr, idx, dim, true);
    launch_rows(v_cache, vs, nullptr, nullptr, idx, dim, true);
  }
}

// ----------------------------------------------------------------------------- token_stats

// d: one warp per token, fp32 sum of squares reduced by shuffles (fixed order: deterministic).
template <typename scalar_t>
__global__ void token_dist_kernel(const scalar_t* __restrict__ out, const scalar_t* __restrict__ anchor, Rows4 o,
                                  Rows4 a, float* __restrict__ d) {
  const int64_t t = static_cast<int64_t>(blockIdx.x) * blockDim.y + threadIdx.y;
  if (t >= o.B * o.N) return;
  const int64_t b = t / o.N, i = t % o.N;
  const scalar_t* op = out + b * o.s0 + i * o.s2;
  const scalar_t* ap = anchor + b * a.s0 + i * a.s2;
  float acc = 0.0f;
  for (int64_t c = threadIdx.x; c < o.D; c += kWarp) {
    const float diff = static_cast<float>(op[c * o.s3]) - static_cast<float>(ap[c * a.s3]);
    acc += diff * diff;
  }
  for (int off = kWarp / 2; off > 0; off /= 2) acc += __shfl_xor_sync(0xffffffffu, acc, off);
  if (threadIdx.x == 0) d[t] = sqrtf(acc);
}

// Float max through integer atomics (-0.0 folded to 0.0 first, so the int order is the float one).
__device__ __forceinline__ void atomic_max_float(float* addr, float v) {
  if (v == 0.0f) v = 0.0f;
  if (v >= 0.0f) {
    atomicMax(reinterpret_cast<int*>(addr), __float_as_int(v));
  } else {
    atomicMin(reinterpret_cast<unsigned int*>(addr), __float_as_uint(v));
  }
}

// Channel-wise cluster max: a thread per channel walks a run of tokens keeping a running max
// while the label stays the same (clusters are spatially compact), flushing atomically on change.
constexpr int kStatsTokens = 64;
constexpr int kStatsChannels = 128;

template <typename scalar_t, typename label_t>
__global__ void cluster_max_kernel(const scalar_t* __restrict__ out, const scalar_t* __restrict__ anchor, Rows4 o,
                                   Rows4 a, const label_t* __restrict__ labels, int64_t nc, float* __restrict__ cmax) {
  const int64_t b = blockIdx.z;
  const int64_t c = static_cast<int64_t>(blockIdx.y) * kStatsChannels + threadIdx.x;
  const int64_t i0 = static_cast<int64_t>(blockIdx.x) * kStatsTokens;
  if (c >= o.D) return;
  const int64_t i1 = min(i0 + kStatsTokens, o.N);
  int64_t cur = -1;
  float run = -INFINITY;
  for (int64_t i = i0; i < i1; ++i) {
    const int64_t lab = static_cast<int64_t>(labels[b * o.N + i]);
    if (lab < 0 || lab >= nc) continue;
    const float diff = static_cast<float>(out[b * o.s0 + i * o.s2 + c * o.s3]) -
                       static_cast<float>(anchor[b * a.s0 + i * a.s2 + c * a.s3]);
    if (lab != cur) {
      if (cur >= 0) atomic_max_float(cmax + (b * nc + cur) * o.D + c, run);
      cur = lab;
      run = diff;
    } else {
      run = fmaxf(run, diff);
    }
  }
  if (cur >= 0) atomic_max_float(cmax + (b * nc + cur) * o.D + c, run);
}

// score = ||cmax||_2 per (b, cluster), -inf for an empty cluster. One warp per cluster.
__global__ void cluster_score_kernel(const float* __restrict__ cmax, int64_t rows, int64_t C, float* __restrict__ score) {
  const int64_t r = static_cast<int64_t>(blockIdx.x) * blockDim.y + threadIdx.y;
  if (r >= rows) return;
  const float* m = cmax + r * C;
  float acc = 0.0f;
  for (int64_t c = threadIdx.x; c < C; c += kWarp) acc += m[c] * m[c];
  for (int off = kWarp / 2; off > 0; off /= 2) acc += __shfl_xor_sync(0xffffffffu, acc, off);
  if (threadIdx.x == 0) score[r] = (C > 0 && m[0] == -INFINITY) ? -INFINITY : sqrtf(acc);
}

std::tuple<at::Tensor, at::Tensor> token_stats_cuda(const at::Tensor& out, const at::Tensor& anchor,
                                                    const at::Tensor& labels, int64_t num_clusters) {
  check_token_stats(out, anchor, labels, num_clusters);
  CAT_CHECK_DEVICE_TYPE(out, at::kCUDA);
  const c10::cuda::CUDAGuard guard(out.device());
  const int64_t B = out.size(0), N = out.size(1), C = out.size(2);
  at::Tensor o = out, a = anchor;
  if (o.scalar_type() != a.scalar_type()) {
    o = o.to(at::kFloat);
    a = a.to(at::kFloat);
  }
  at::Tensor lab = labels.contiguous();
  at::Tensor d = at::empty({B, N}, out.options().dtype(at::kFloat));
  at::Tensor cmax = at::full({B, num_clusters, C}, -std::numeric_limits<float>::infinity(), d.options());
  at::Tensor score = at::empty({B, num_clusters}, d.options());
  if (B * N == 0) return {d, score.fill_(-std::numeric_limits<float>::infinity())};
  const Rows4 ro = rows4(o.unsqueeze(1)), ra = rows4(a.unsqueeze(1));
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, o.scalar_type(), "token_stats_cuda", [&] {
    const dim3 block(kWarp, 8);
    token_dist_kernel<scalar_t><<<static_cast<unsigned>(ceil_div(B * N, 8)), block, 0, stream>>>(
        o.data_ptr<scalar_t>(), a.data_ptr<scalar_t>(), ro, ra, d.data_ptr<float>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    if (C > 0) {
      const dim3 grid(static_cast<unsigned>(ceil_div(N, kStatsTokens)), static_cast<unsigned>(ceil_div(C, kStatsChannels)),
                      static_cast<unsigned>(B));
      AT_DISPATCH_INDEX_TYPES(lab.scalar_type(), "token_stats_cuda_labels", [&] {
        cluster_max_kernel<scalar_t, index_t><<<grid, kStatsChannels, 0, stream>>>(
            o.data_ptr<scalar_t>(), a.data_ptr<scalar_t>(), ro, ra, lab.data_ptr<index_t>(), num_clusters,
            cmax.data_ptr<float>());
      });
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  });
  cluster_score_kernel<<<static_cast<unsigned>(ceil_div(B * num_clusters, 8)), dim3(kWarp, 8), 0, stream>>>(
      cmax.data_ptr<float>(), B * num_clusters, C, score.data_ptr<float>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {d, score};
}

// ----------------------------------------------------------------------------- select_tokens
//
// The reference's stable sorts become sorts of int64 words (group << 32 | float_key), whose
// stable order breaks ties by the lower token index exactly like the reference:
//   1. prepare: cluster ranks (score desc, id asc), rank sizes and starts, key1 = r<<32 | key(-d);
//   2. perm_d = stable sort of key1 (rank asc, d desc, index asc);
//   3. first: candidates p_d < k/10; later: tier/groups key2, perm = its stable sort, candidates;
//   4. take candidates in order while their running count <= limit (k or the budget);
//   5. fill key3 = (not chosen)<<32 | key(-d) or key(s), stable sort, the first k, sorted;
//   6. staleness = decay * staleness (ATen, as the reference), then +1 at idx.

template <typename label_t>
__global__ void select_prepare_kernel(const float* __restrict__ d, int64_t d_s0, int64_t d_s1,
                                      const float* __restrict__ score, int64_t sc_s0, int64_t sc_s1,
                                      const label_t* __restrict__ labels, int64_t N, int64_t nc,
                                      int32_t* __restrict__ r_out, int32_t* __restrict__ size_out,
                                      int32_t* __restrict__ start_out, int64_t* __restrict__ key1) {
  extern __shared__ uint32_t smem[];
  uint32_t* ckey = smem;                                    // nc
  int32_t* rank = reinterpret_cast<int32_t*>(smem + nc);    // nc
  int32_t* size = reinterpret_cast<int32_t*>(smem + 2 * nc);  // nc
  const int64_t b = blockIdx.x;
  for (int64_t c = threadIdx.x; c < nc; c += blockDim.x) {
    ckey[c] = float_key(score[b * sc_s0 + c * sc_s1]);
    size[c] = 0;
  }
  __syncthreads();
  for (int64_t c = threadIdx.x; c < nc; c += blockDim.x) {
    int32_t rc = 0;
    for (int64_t o = 0; o < nc; ++o) rc += (ckey[o] > ckey[c]) || (ckey[o] == ckey[c] && o < c);
    rank[c] = rc;
  }
  __syncthreads();
  for (int64_t i = threadIdx.x; i < N; i += blockDim.x) {
    int64_t lab = static_cast<int64_t>(labels[b * N + i]);
    lab = lab < 0 ? 0 : (lab >= nc ? nc - 1 : lab);  // out of range: clamped, never a fault
    const int32_t r = rank[lab];
    atomicAdd(size + r, 1);
    r_out[b * N + i] = r;
    key1[b * N + i] = (static_cast<int64_t>(r) << 32) | static_cast<int64_t>(float_key(-d[b * d_s0 + i * d_s1]));
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    int32_t acc = 0;
    for (int64_t r = 0; r < nc; ++r) {
      start_out[b * nc + r] = acc;
      size_out[b * nc + r] = size[r];
      acc += size[r];
    }
  }
}

// Over sorted positions j of perm_d. first: cand = p_d < k/10. Later: key2 per token.
__global__ void select_stage2_kernel(const int64_t* __restrict__ perm_d, const int32_t* __restrict__ r_of,
                                     const int32_t* __restrict__ size, const int32_t* __restrict__ start,
                                     const float* __restrict__ d, int64_t d_s0, int64_t d_s1,
                                     const float* __restrict__ s, int64_t s_s0, int64_t s_s1, int64_t B, int64_t N,
                                     int64_t nc, int64_t k, int64_t base, bool first, int32_t* __restrict__ cand_sorted,
                                     int64_t* __restrict__ key2) {
  const int64_t g = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (g >= B * N) return;
  const int64_t b = g / N, j = g % N;
  const int64_t t = perm_d[g];
  const int64_t r = r_of[b * N + t];
  const int64_t p = j - start[b * nc + r];
  if (first) {
    cand_sorted[g] = p < k / 10;
    return;
  }
  const int64_t q = min(rank_multiplier(r) * base, static_cast<int64_t>(size[b * nc + r]));
  const bool cand_d = p < q;
  const uint32_t key = cand_d ? float_key(-d[b * d_s0 + t * d_s1]) : float_key(s[b * s_s0 + t * s_s1]);
  key2[b * N + t] = ((2 * r + (cand_d ? 0 : 1)) << 32) | static_cast<int64_t>(key);
}

// Later selections, over sorted positions j of perm (by key2): importance candidates.
__global__ void select_stage3_kernel(const int64_t* __restrict__ perm, const int64_t* __restrict__ key2,
                                     const int32_t* __restrict__ size, const int32_t* __restrict__ start, int64_t B,
                                     int64_t N, int64_t nc, int64_t base, int32_t* __restrict__ cand_sorted) {
  const int64_t g = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (g >= B * N) return;
  const int64_t b = g / N, j = g % N;
  const int64_t t = perm[g];
  const int64_t group = key2[b * N + t] >> 32;
  const int64_t r = group / 2, tier = group % 2;
  const int64_t q = min(rank_multiplier(r) * base, static_cast<int64_t>(size[b * nc + r]));
  const int64_t p_group = j - (start[b * nc + r] + (tier ? q : 0));
  cand_sorted[g] = tier == 0 || (r >= 1 && p_group < q / 2);
}

// chosen tokens (running count <= limit), and the fill key of every token.
__global__ void select_fill_key_kernel(const int64_t* __restrict__ perm, const int32_t* __restrict__ cand_sorted,
                                       const int32_t* __restrict__ cum, const float* __restrict__ d, int64_t d_s0,
                                       int64_t d_s1, const float* __restrict__ s, int64_t s_s0, int64_t s_s1, int64_t B,
                                       int64_t N, int64_t limit, bool first, int64_t* __restrict__ key3) {
  const int64_t g = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (g >= B * N) return;
  const int64_t b = g / N;
  const int64_t t = perm[g];
  const bool chosen = cand_sorted[g] && cum[g] <= limit;
  const uint32_t key = first ? float_key(-d[b * d_s0 + t * d_s1]) : float_key(s[b * s_s0 + t * s_s1]);
  key3[b * N + t] = (static_cast<int64_t>(chosen ? 0 : 1) << 32) | static_cast<int64_t>(key);
}

__global__ void staleness_add_kernel(float* __restrict__ s, int64_t s_s0, int64_t s_s1, const int64_t* __restrict__ idx,
                                     int64_t B, int64_t k) {
  const int64_t g = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (g >= B * k) return;
  float* p = s + (g / k) * s_s0 + idx[g] * s_s1;
  *p = __fadd_rn(*p, 1.0f);  // idx is unique per row: no race
}

at::Tensor select_tokens_cuda(const at::Tensor& d, const at::Tensor& cluster_score, const at::Tensor& labels,
                              at::Tensor& staleness, int64_t k, bool first, double importance_fraction,
                              double staleness_decay) {
  check_select(d, cluster_score, labels, staleness, k, importance_fraction, staleness_decay);
  CAT_CHECK_DEVICE_TYPE(d, at::kCUDA);
  const c10::cuda::CUDAGuard guard(d.device());
  const int64_t B = d.size(0), N = d.size(1), nc = cluster_score.size(1);
  auto stream = at::cuda::getCurrentCUDAStream();
  auto i32 = d.options().dtype(at::kInt);
  auto i64 = d.options().dtype(at::kLong);
  at::Tensor lab = labels.contiguous();
  at::Tensor r_of = at::empty({B, N}, i32);
  at::Tensor size = at::empty({B, nc}, i32);
  at::Tensor start = at::empty({B, nc}, i32);
  at::Tensor key1 = at::empty({B, N}, i64);
  const unsigned threads = 256;
  const unsigned blocks = static_cast<unsigned>(ceil_div(B * N, threads));
  const size_t smem = 3 * nc * sizeof(uint32_t);
  AT_DISPATCH_INDEX_TYPES(lab.scalar_type(), "select_prepare_cuda", [&] {
    select_prepare_kernel<index_t><<<static_cast<unsigned>(B), 1024, smem, stream>>>(
        d.data_ptr<float>(), d.stride(0), d.stride(1), cluster_score.data_ptr<float>(), cluster_score.stride(0),
        cluster_score.stride(1), lab.data_ptr<index_t>(), N, nc, r_of.data_ptr<int32_t>(), size.data_ptr<int32_t>(),
        start.data_ptr<int32_t>(), key1.data_ptr<int64_t>());
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  at::Tensor perm = std::get<1>(key1.sort(/*stable=*/true, /*dim=*/1, /*descending=*/false)).contiguous();
  at::Tensor cand = at::empty({B, N}, i32);
  const int64_t base = quota_base(k);
  const int64_t limit = first ? k : importance_budget(importance_fraction, k);
  at::Tensor key2 = first ? at::Tensor() : at::empty({B, N}, i64);
  select_stage2_kernel<<<blocks, threads, 0, stream>>>(
      perm.data_ptr<int64_t>(), r_of.data_ptr<int32_t>(), size.data_ptr<int32_t>(), start.data_ptr<int32_t>(),
      d.data_ptr<float>(), d.stride(0), d.stride(1), staleness.data_ptr<float>(), staleness.stride(0),
      staleness.stride(1), B, N, nc, k, base, first, cand.data_ptr<int32_t>(), first ? nullptr : key2.data_ptr<int64_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  if (!first) {
    perm = std::get<1>(key2.sort(/*stable=*/true, /*dim=*/1, /*descending=*/false)).contiguous();
    select_stage3_kernel<<<blocks, threads, 0, stream>>>(perm.data_ptr<int64_t>(), key2.data_ptr<int64_t>(),
                                                         size.data_ptr<int32_t>(), start.data_ptr<int32_t>(), B, N, nc,
                                                         base, cand.data_ptr<int32_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  at::Tensor cum = cand.cumsum(1, at::kInt).contiguous();
  at::Tensor key3 = at::empty({B, N}, i64);
  select_fill_key_kernel<<<blocks, threads, 0, stream>>>(
      perm.data_ptr<int64_t>(), cand.data_ptr<int32_t>(), cum.data_ptr<int32_t>(), d.data_ptr<float>(), d.stride(0),
      d.stride(1), staleness.data_ptr<float>(), staleness.stride(0), staleness.stride(1), B, N, limit, first,
      key3.data_ptr<int64_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  at::Tensor order = std::get<1>(key3.sort(/*stable=*/true, /*dim=*/1, /*descending=*/false));
  at::Tensor idx = std::get<0>(order.narrow(1, 0, k).sort(/*dim=*/1)).contiguous();
  staleness.mul_(staleness_decay);
  staleness_add_kernel<<<static_cast<unsigned>(ceil_div(B * k, threads)), threads, 0, stream>>>(
      staleness.data_ptr<float>(), staleness.stride(0), staleness.stride(1), idx.data_ptr<int64_t>(), B, k);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return idx;
}

// ----------------------------------------------------------------------------- kmeans

// A thread per token; fp32 distances; strict < so ties keep the lower centroid, as argmin.
__global__ void kmeans_assign_kernel(const float* __restrict__ x, const float* __restrict__ cent, int64_t B, int64_t N,
                                     int64_t F, int64_t nc, int64_t* __restrict__ labels) {
  const int64_t t = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (t >= B * N) return;
  const float* p = x + t * F;
  const float* cb = cent + (t / N) * nc * F;
  float best = INFINITY;
  int64_t arg = 0;
  for (int64_t j = 0; j < nc; ++j) {
    float acc = 0.0f;
    for (int64_t f = 0; f < F; ++f) {
      const float diff = p[f] - cb[j * F + f];
      acc = __fadd_rn(acc, __fmul_rn(diff, diff));  // no FMA contraction: the CPU's roundings
    }
    if (j == 0 || acc < best) {
      best = acc;
      arg = j;
    }
  }
  labels[t] = arg;
}

at::Tensor kmeans_assign_cuda(const at::Tensor& features, const at::Tensor& centroids) {
  CAT_CHECK_FLOAT(features);
  CAT_CHECK_DIM(features, 3);
  CAT_CHECK_DIM(centroids, 3);
  TORCH_CHECK(centroids.size(0) == features.size(0) && centroids.size(2) == features.size(2),
              "centroids must have shape (B, nc, F) with B, F of features ", features.sizes(), ", got ", centroids.sizes());
  CAT_CHECK_DEVICE_TYPE(features, at::kCUDA);
  CAT_CHECK_SAME_DEVICE(centroids, features);
  const c10::cuda::CUDAGuard guard(features.device());
  const int64_t B = features.size(0), N = features.size(1), F = features.size(2), nc = centroids.size(1);
  at::Tensor x = features.to(at::kFloat).contiguous();
  at::Tensor c = centroids.to(at::kFloat).contiguous();
  at::Tensor labels = at::empty({B, N}, features.options().dtype(at::kLong));
  if (B * N == 0) return labels;
  kmeans_assign_kernel<<<static_cast<unsigned>(ceil_div(B * N, 256)), 256, 0, at::cuda::getCurrentCUDAStream()>>>(
      x.data_ptr<float>(), c.data_ptr<float>(), B, N, F, nc, labels.data_ptr<int64_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return labels;
}

at::Tensor kmeans_cuda(const at::Tensor& features, int64_t num_clusters, int64_t iters) {
  CAT_CHECK_DEVICE_TYPE(features, at::kCUDA);
  const c10::cuda::CUDAGuard guard(features.device());
  return kmeans_with(features, num_clusters, iters, &kmeans_assign_cuda);
}

}  // namespace
}  // namespace cat_kernels

TORCH_LIBRARY_IMPL(cat_kernels, CUDA, m) {
  using namespace cat_kernels;
  m.impl("token_stats", &token_stats_cuda);
  m.impl("select_tokens", &select_tokens_cuda);
  m.impl("gather_tokens", &gather_tokens_cuda);
  m.impl("scatter_tokens_", &scatter_tokens_cuda);
  m.impl("scatter_kv_", &scatter_kv_cuda);
  m.impl("kmeans", &kmeans_cuda);
  m.impl("kmeans_assign", &kmeans_assign_cuda);
}
