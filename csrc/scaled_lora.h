// Scaled LoRA for metapeft._C: shared declarations and the counter-based dropout hash.
//
// Shapes: x (M, K), weight (N, K), bias (N,) or undefined, lora_A (S*r, K), lora_B (N, r), scale (S,).
// The host code (scaled_lora.cpp) is device-generic ATen; the two small fused passes below have a CPU
// loop (scaled_lora.cpp) and a CUDA kernel (scaled_lora_kernels.cu) behind the same launcher names.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/macros/Macros.h>

#include <cstdint>

namespace metapeft {

// Dropout keep-decision for element `index` (row-major logical index) under `seed`: a splitmix64
// hash of (seed, index), top 24 bits as a uniform in [0, 1). Integer-only up to one exact float
// conversion, so the CPU loop and the CUDA kernel draw bit-identical masks; nothing is stored.
C10_HOST_DEVICE inline uint64_t splitmix64(uint64_t z) {
  z += 0x9E3779B97F4A7C15ULL;
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
  return z ^ (z >> 31);
}

C10_HOST_DEVICE inline bool dropout_keep(uint64_t seed, uint64_t index, float p) {
  const uint64_t z = splitmix64(splitmix64(seed) ^ index);
  return static_cast<float>(z >> 40) * 5.9604644775390625e-08f >= p;  // 2^-24
}

// dst = (accumulate ? dst : 0) + drop(src), drop(v) = keep ? v / (1 - p) : 0, math in fp32 (fp64 for fp64).
// src and dst: contiguous (M, K) tensors of one dtype on one device.
void dropout_apply_cpu(const at::Tensor& src, at::Tensor& dst, double p, int64_t seed, bool accumulate);
// The CUDA kernel reads the seed from device memory (`seed`: one int64 element on src's device).
void dropout_apply_cuda(const at::Tensor& src, at::Tensor& dst, double p, const at::Tensor& seed, bool accumulate);

// The backward's rank-space pass, one read of T and h:
//   scaled_T[m, j*r + k] = c_j * T[j, m, k]        (written in the (M, S*r) layout the GEMMs use)
//   partials[j, b]       = partial sums of T[j] * h[:, j*r:(j+1)*r] over the b-th chunk of kRowsPerChunk rows
// T (S, M, r) and h (M, S*r) contiguous in the op dtype; scale_acc (S,) and partials (S, B), B =
// segment_reduce_chunks(M), in the accumulation dtype (fp32; fp64 for fp64 inputs).
// d scale_j = partials[j].sum(): deterministic, no atomics.
constexpr int64_t kRowsPerChunk = 128;  // rows of T per reduction block (CPU task / CUDA block)
inline int64_t segment_reduce_chunks(int64_t rows) {
  return (rows + kRowsPerChunk - 1) / kRowsPerChunk;  // 0 for an empty batch: d scale = sum of nothing = 0
}
void segment_scale_reduce_cpu(const at::Tensor& T, const at::Tensor& h, const at::Tensor& scale_acc,
                              at::Tensor& scaled_T, at::Tensor& partials);
void segment_scale_reduce_cuda(const at::Tensor& T, const at::Tensor& h, const at::Tensor& scale_acc,
                               at::Tensor& scaled_T, at::Tensor& partials);

}  // namespace metapeft
