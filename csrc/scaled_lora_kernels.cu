// CUDA kernels of metapeft._C's scaled-LoRA op: the seeded dropout and the backward's rank-space pass.
// The GEMMs stay in cuBLAS (scaled_lora.cpp); these two passes are memory-bound and move:
//   dropout_apply:        reads M*K (plus M*K when accumulating), writes M*K elements; no mask is stored.
//   segment_scale_reduce: reads T and h (2*M*S*r), writes scaled T (M*S*r) and S*ceil(M/128) fp32 partials.
#include "scaled_lora.h"

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

namespace metapeft {
namespace {

constexpr int kThreads = 256;         // 8 warps per block for both kernels
constexpr int64_t kMaxBlocks = 65536;  // grid-stride beyond this: enough blocks to fill 132 SMs many times over

template <typename scalar_t>
__global__ void dropout_apply_kernel(const scalar_t* __restrict__ src, scalar_t* __restrict__ dst, int64_t numel,
                                     float p, at::opmath_type<scalar_t> factor,
                                     const int64_t* __restrict__ seed_ptr, bool accumulate) {
  using acc_t = at::opmath_type<scalar_t>;
  const uint64_t seed = static_cast<uint64_t>(*seed_ptr);
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < numel;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const acc_t kept = dropout_keep(seed, static_cast<uint64_t>(i), p) ? static_cast<acc_t>(src[i]) * factor : acc_t(0);
    dst[i] = static_cast<scalar_t>(accumulate ? static_cast<acc_t>(dst[i]) + kept : kept);
  }
}

// Block (chunk, j): rows [chunk*kRowsPerChunk, ...) of segment j. Each thread sums T*h in fp32 over a
// strided subset of the chunk's elements, then the block reduces (warp shuffles, then one warp).
template <typename scalar_t, typename acc_t>
__global__ void segment_scale_reduce_kernel(const scalar_t* __restrict__ T, const scalar_t* __restrict__ h,
                                            const acc_t* __restrict__ scale, scalar_t* __restrict__ scaled_T,
                                            acc_t* __restrict__ partials, int64_t M, int64_t r) {
  const int64_t S = gridDim.y, j = blockIdx.y, chunk = blockIdx.x;
  const int64_t row0 = chunk * kRowsPerChunk;
  const int64_t count = (min(M, row0 + kRowsPerChunk) - row0) * r;
  const acc_t c = scale[j];
  acc_t acc = 0;
  for (int64_t e = threadIdx.x; e < count; e += blockDim.x) {
    const int64_t m = row0 + e / r, k = e % r;
    const acc_t t = static_cast<acc_t>(T[(j * M + m) * r + k]);
    acc += t * static_cast<acc_t>(h[m * S * r + j * r + k]);
    scaled_T[m * S * r + j * r + k] = static_cast<scalar_t>(c * t);
  }
  for (int offset = 16; offset > 0; offset /= 2) {
    acc += __shfl_down_sync(0xffffffffu, acc, offset);
  }
  __shared__ acc_t warp_sums[kThreads / 32];
  if (threadIdx.x % 32 == 0) {
    warp_sums[threadIdx.x / 32] = acc;
  }
  __syncthreads();
  if (threadIdx.x < 32) {
    acc = threadIdx.x < kThreads / 32 ? warp_sums[threadIdx.x] : acc_t(0);
    for (int offset = 16; offset > 0; offset /= 2) {
      acc += __shfl_down_sync(0xffffffffu, acc, offset);
    }
    if (threadIdx.x == 0) {
      partials[j * gridDim.x + chunk] = acc;
    }
  }
}

}  // namespace

void dropout_apply_cuda(const at::Tensor& src, at::Tensor& dst, double p, const at::Tensor& seed, bool accumulate) {
  const int64_t numel = src.numel();
  if (numel == 0) {
    return;
  }
  const c10::cuda::CUDAGuard guard(src.device());
  const auto stream = c10::cuda::getCurrentCUDAStream();
  const int64_t blocks = std::min((numel + kThreads - 1) / kThreads, kMaxBlocks);
  const float p_f = static_cast<float>(p);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, src.scalar_type(), "dropout_apply_cuda", [&] {
    dropout_apply_kernel<scalar_t><<<blocks, kThreads, 0, stream>>>(
        src.const_data_ptr<scalar_t>(), dst.mutable_data_ptr<scalar_t>(), numel, p_f,
        static_cast<at::opmath_type<scalar_t>>(1.0 / (1.0 - p)),
        seed.const_data_ptr<int64_t>(), accumulate);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

void segment_scale_reduce_cuda(const at::Tensor& T, const at::Tensor& h, const at::Tensor& scale_acc,
                               at::Tensor& scaled_T, at::Tensor& partials) {
  const int64_t S = T.size(0), M = T.size(1), r = T.size(2);
  if (M == 0) {
    return;
  }
  const c10::cuda::CUDAGuard guard(T.device());
  const auto stream = c10::cuda::getCurrentCUDAStream();
  const dim3 grid(static_cast<unsigned>(partials.size(1)), static_cast<unsigned>(S));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, T.scalar_type(), "segment_scale_reduce_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    segment_scale_reduce_kernel<scalar_t, acc_t><<<grid, kThreads, 0, stream>>>(
        T.const_data_ptr<scalar_t>(), h.const_data_ptr<scalar_t>(), scale_acc.const_data_ptr<acc_t>(),
        scaled_T.mutable_data_ptr<scalar_t>(), partials.mutable_data_ptr<acc_t>(), M, r);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

}  // namespace metapeft
