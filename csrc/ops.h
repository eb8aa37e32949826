// Pieces shared by the CPU and CUDA translation units.
#pragma once

#include <ATen/ATen.h>

namespace cat_kernels {

// k-means with a device-specific assignment and the reference's ATen update (bitwise equal).
at::Tensor kmeans_update(const at::Tensor& features, const at::Tensor& labels, const at::Tensor& centroids);
at::Tensor kmeans_init(const at::Tensor& features, int64_t num_clusters);
at::Tensor kmeans_with(const at::Tensor& features, int64_t num_clusters, int64_t iters,
                       at::Tensor (*assign)(const at::Tensor&, const at::Tensor&));

}  // namespace cat_kernels
