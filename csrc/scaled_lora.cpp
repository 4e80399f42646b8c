// metapeft._C: the `cuda` backend of the scaled-LoRA op, registered as metapeft::scaled_lora_fwd_cuda /
// metapeft::scaled_lora_bwd_cuda (the Python custom ops metapeft::scaled_lora_fwd/_bwd dispatch to them by
// backend name; their fake kernels live in metapeft/ops/cuda_backend.py).
//
//   forward:  xd = drop(x);  h = xd A^T (M, S*r);  y = x W^T + bias;  y[:, seg j] += (c_j h_j) B_j^T
//   backward: T_j = dY_j B_j;  d c_j = sum(T_j * h_j) in fp32;  dB_j = dY_j^T (c_j h_j);
//             dA = (c T)^T drop(x);  dx = dY W + drop'((c T) A);  dW = dY^T x;  dbias = sum_m dY
//   per-channel scale c (N,) (one per output channel; S = lora_A's rows / r): cB = c[:, None] B;
//   forward y[:, seg j] += h_j cB_j^T;  backward cT_j = dY_j cB_j replaces c T, P_j = dY_j^T h_j (fp32 when d c is
//   needed), dB = c[:, None] P, d c = rowsum(P * B): cuBLAS GEMMs only (the rank-space pass serves the segment case).
//
// The GEMMs are ATen matmuls (cuBLAS/cuBLASLt on CUDA, fp32 accumulation); the dropout (regenerated
// from the seed, never stored) and the fused rank-space pass over T and h are our kernels. The host
// code is device-generic: the CPU registration runs it with CPU loops, so the CPU test suite exercises
// the schema, every argument check, the GEMM plumbing and the dropout hash.
#include "scaled_lora.h"

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <Python.h>
#include <torch/library.h>

#include <array>
#include <tuple>

namespace metapeft {
namespace {

void check_tensor(const at::Tensor& t, const char* name, int64_t dim, const at::Tensor& x) {
  TORCH_CHECK(t.dim() == dim, name, " must be ", dim, "-D, got shape ", t.sizes());
  TORCH_CHECK(t.device() == x.device(), name, " is on ", t.device(), " but x is on ", x.device(),
              "; they must be on one device");
  TORCH_CHECK(t.scalar_type() == x.scalar_type(), name, " has dtype ", t.scalar_type(), " but x has dtype ",
              x.scalar_type(), "; they must match");
}

// Checks shared by forward and backward; returns the number of segments S (lora_A's rows over the rank).
int64_t check_common(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& lora_A,
                     const at::Tensor& lora_B, const at::Tensor& scale, double dropout_p) {
  TORCH_CHECK(x.dim() == 2, "x must be 2-D (M, K), got shape ", x.sizes());
  TORCH_CHECK(at::isFloatingType(x.scalar_type()), "x must be a floating-point tensor, got dtype ", x.scalar_type());
  TORCH_CHECK(x.is_cpu() || x.is_cuda(), "x must be a CPU or CUDA tensor, got device ", x.device());
  check_tensor(weight, "weight", 2, x);
  check_tensor(lora_A, "lora_A", 2, x);
  check_tensor(lora_B, "lora_B", 2, x);
  TORCH_CHECK(scale.dim() == 1, "scale must be 1-D (S,) or (N,), got shape ", scale.sizes());
  TORCH_CHECK(at::isFloatingType(scale.scalar_type()), "scale must be a floating-point tensor, got dtype ",
              scale.scalar_type());
  TORCH_CHECK(scale.device() == x.device(), "scale is on ", scale.device(), " but x is on ", x.device(),
              "; they must be on one device");
  const int64_t N = weight.size(0), K = weight.size(1), r = lora_B.size(1);
  TORCH_CHECK(x.size(1) == K, "x's last dimension (", x.size(1), ") must equal weight's in_features (", K, ")");
  TORCH_CHECK(r >= 1, "rank (lora_B's columns) must be in [1, min(in_features, out_features/segments)], got ", r);
  const int64_t S = std::max<int64_t>(lora_A.size(0) / r, 1);
  TORCH_CHECK(lora_A.size(0) == S * r && lora_A.size(1) == K, "lora_A must have shape (", S * r, ", ", K,
              ") = (segments*rank, in_features), got ", lora_A.sizes());
  TORCH_CHECK(N % S == 0, "lora_A holds ", S, " segments, which must divide out_features (", N, ")");
  TORCH_CHECK(r <= std::min(K, N / S), "rank (lora_B's columns) must be in [1, ", std::min(K, N / S), "], got ", r);
  TORCH_CHECK(lora_B.size(0) == N, "lora_B must have shape (", N, ", ", r, "), got ", lora_B.sizes());
  TORCH_CHECK(scale.size(0) == S || scale.size(0) == N, "scale must have shape (", S, ",) (one per segment) or (", N,
              ",) (one per output channel), got ", scale.sizes());
  TORCH_CHECK(dropout_p >= 0.0 && dropout_p < 1.0, "dropout_p must be in [0, 1), got ", dropout_p);
  return S;
}

// The dropout seed: an int64 scalar tensor on x's device, required when p > 0 (a device tensor: the CUDA kernel
// reads it itself, so a new seed never syncs the host and a captured CUDA graph draws a fresh mask per replay).
void check_seed(const std::optional<at::Tensor>& seed, double p, const at::Tensor& x) {
  if (p == 0.0) {
    return;
  }
  TORCH_CHECK(seed.has_value(), "seed must be given when dropout_p > 0");
  TORCH_CHECK(seed->numel() == 1 && seed->scalar_type() == at::kLong, "seed must be one int64 element, got dtype ",
              seed->scalar_type(), " and shape ", seed->sizes());
  TORCH_CHECK(seed->device() == x.device(), "seed is on ", seed->device(), " but x is on ", x.device(),
              "; they must be on one device");
}

// dst = (accumulate ? dst : 0) + drop(src) on src's device; src is made contiguous (the mask is indexed
// by the logical row-major position, so strides never change it).
void dropout_apply(const at::Tensor& src, at::Tensor& dst, double p, const at::Tensor& seed, bool accumulate) {
  const at::Tensor src_c = src.contiguous();
  if (src_c.is_cuda()) {
    dropout_apply_cuda(src_c, dst, p, seed, accumulate);
  } else {
    dropout_apply_cpu(src_c, dst, p, seed.item<int64_t>(), accumulate);
  }
}

// drop(x) (M, K): x itself when p == 0, else a new contiguous tensor (the mask is regenerated, never kept).
at::Tensor dropped(const at::Tensor& x, double p, const std::optional<at::Tensor>& seed) {
  if (p == 0.0) {
    return x;
  }
  at::Tensor out = at::empty(x.sizes(), x.options().memory_format(at::MemoryFormat::Contiguous));
  dropout_apply(x, out, p, *seed, /*accumulate=*/false);
  return out;
}

// (scaled_T (M, S*r) in the op dtype, d scale (S,) in fp32 (fp64 for fp64 inputs)) from T (S, M, r) and h (M, S*r).
std::tuple<at::Tensor, at::Tensor> segment_scale_reduce(const at::Tensor& T, const at::Tensor& h,
                                                        const at::Tensor& scale) {
  const int64_t S = T.size(0), M = T.size(1), r = T.size(2);
  const at::Tensor h_c = h.contiguous();
  const at::ScalarType acc_type = at::toOpMathType(T.scalar_type());
  const at::Tensor scale_acc = scale.to(acc_type).contiguous();
  at::Tensor scaled_T = at::empty({M, S * r}, T.options());
  at::Tensor partials = at::empty({S, segment_reduce_chunks(M)}, T.options().dtype(acc_type));  // all written
  if (T.is_cuda()) {
    segment_scale_reduce_cuda(T, h_c, scale_acc, scaled_T, partials);
  } else {
    segment_scale_reduce_cpu(T, h_c, scale_acc, scaled_T, partials);
  }
  return {scaled_T, partials.sum(1)};
}

// (S, M, w) view of an (M, S*w) matrix of any strides.
at::Tensor segment_view(const at::Tensor& t, int64_t segments) {
  return t.unflatten(1, {segments, t.size(1) / segments}).transpose(0, 1);
}

std::tuple<at::Tensor, at::Tensor> scaled_lora_fwd(const at::Tensor& x, const at::Tensor& weight,
                                                   const std::optional<at::Tensor>& bias, const at::Tensor& lora_A,
                                                   const at::Tensor& lora_B, const at::Tensor& scale,
                                                   double dropout_p, const std::optional<at::Tensor>& seed) {
  const int64_t S = check_common(x, weight, lora_A, lora_B, scale, dropout_p);
  check_seed(seed, dropout_p, x);
  if (bias.has_value()) {
    check_tensor(*bias, "bias", 1, x);
    TORCH_CHECK(bias->size(0) == weight.size(0), "bias must have shape (", weight.size(0), ",), got ", bias->sizes());
  }
  const int64_t n = weight.size(0) / S, r = lora_B.size(1);
  at::Tensor h = at::mm(dropped(x, dropout_p, seed), lora_A.t());
  at::Tensor y = bias.has_value() ? at::addmm(*bias, x, weight.t()) : at::mm(x, weight.t());
  const at::Tensor c = scale.to(h.scalar_type());
  if (scale.size(0) != S) {  // per channel: the scale rides on B's rows
    const at::Tensor scaled_B = lora_B * c.unsqueeze(1);
    for (int64_t j = 0; j < S; ++j) {  // cuBLAS writes the column block of y in place (ldc = N)
      y.narrow(1, j * n, n).addmm_(h.narrow(1, j * r, r), scaled_B.narrow(0, j * n, n).t());
    }
    return {y, h};
  }
  const at::Tensor scaled_h = segment_view(h, S) * c.view({S, 1, 1});  // (S, M, r)
  for (int64_t j = 0; j < S; ++j) {
    y.narrow(1, j * n, n).addmm_(scaled_h[j], lora_B.narrow(0, j * n, n).t());
  }
  return {y, h};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> scaled_lora_bwd(
    const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& weight, const at::Tensor& lora_A,
    const at::Tensor& lora_B, const at::Tensor& scale, const at::Tensor& h, double dropout_p,
    const std::optional<at::Tensor>& seed, std::array<bool, 6> needs) {
  const int64_t S = check_common(x, weight, lora_A, lora_B, scale, dropout_p);
  check_seed(seed, dropout_p, x);
  const int64_t M = x.size(0), N = weight.size(0), r = lora_B.size(1), n = N / S;
  check_tensor(grad_y, "grad_y", 2, x);
  TORCH_CHECK(grad_y.size(0) == M && grad_y.size(1) == N, "grad_y must have shape (", M, ", ", N, "), got ",
              grad_y.sizes());
  check_tensor(h, "h", 2, x);
  TORCH_CHECK(h.size(0) == M && h.size(1) == S * r, "h must have shape (", M, ", ", S * r, "), got ", h.sizes());
  const bool need_dx = needs[0], need_dweight = needs[1], need_dbias = needs[2];
  const bool need_dA = needs[3], need_dB = needs[4], need_dscale = needs[5];
  const at::Tensor empty = at::empty({0}, x.options());
  at::Tensor dx = empty, dweight = empty, dbias = empty, dA = empty, dB = empty;
  at::Tensor dscale = at::empty({0}, scale.options());

  const at::Tensor grad_segments = segment_view(grad_y, S);  // (S, M, n)
  const bool per_channel = scale.size(0) != S;
  if (per_channel && (need_dB || need_dscale)) {
    const at::ScalarType acc = need_dscale ? at::toOpMathType(x.scalar_type()) : x.scalar_type();
    const at::Tensor P = at::bmm(grad_segments.transpose(1, 2).to(acc), segment_view(h, S).to(acc)).view({N, r});
    if (need_dB) {
      dB = (P * scale.to(x.scalar_type()).to(acc).unsqueeze(1)).to(x.scalar_type());
    }
    if (need_dscale) {
      dscale = (P * lora_B.to(acc)).sum(1).to(scale.scalar_type());
    }
  }
  if (need_dx || need_dA || (need_dscale && !per_channel)) {
    at::Tensor scaled_T;
    if (per_channel) {  // dY_j (c B)_j in the (M, S*r) layout
      const at::Tensor scaled_B = lora_B * scale.to(x.scalar_type()).unsqueeze(1);
      scaled_T = at::bmm(grad_segments, scaled_B.reshape({S, n, r})).transpose(0, 1).reshape({M, S * r});
    } else {
      const at::Tensor T = at::bmm(grad_segments, lora_B.reshape({S, n, r})).contiguous();  // (S, M, r)
      at::Tensor dscale_acc;
      std::tie(scaled_T, dscale_acc) = segment_scale_reduce(T, h, scale);
      if (need_dscale) {
        dscale = dscale_acc.to(scale.scalar_type());
      }
    }
    if (need_dA) {
      dA = at::mm(scaled_T.t(), dropped(x, dropout_p, seed));
    }
    if (need_dx) {
      dx = at::mm(grad_y, weight);
      if (dropout_p > 0.0) {
        dropout_apply(at::mm(scaled_T, lora_A), dx, dropout_p, *seed, /*accumulate=*/true);
      } else {
        dx.addmm_(scaled_T, lora_A);
      }
    }
  }
  if (need_dB && !per_channel) {
    const at::Tensor scaled_h = segment_view(h, S) * scale.to(h.scalar_type()).view({S, 1, 1});  // (S, M, r)
    dB = at::bmm(grad_segments.transpose(1, 2), scaled_h).view({N, r});
  }
  if (need_dweight) {
    dweight = at::mm(grad_y.t(), x);
  }
  if (need_dbias) {
    dbias = grad_y.sum(0);
  }
  return {dx, dweight, dbias, dA, dB, dscale};
}

// Standalone seeded dropout (the same mask the ops draw): lets tests compare CPU and CUDA masks.
at::Tensor seeded_dropout(const at::Tensor& x, double p, const at::Tensor& seed) {
  TORCH_CHECK(at::isFloatingType(x.scalar_type()), "x must be a floating-point tensor, got dtype ", x.scalar_type());
  TORCH_CHECK(p >= 0.0 && p < 1.0, "p must be in [0, 1), got ", p);
  check_seed(seed, 1.0, x);
  at::Tensor out = at::empty(x.sizes(), x.options().memory_format(at::MemoryFormat::Contiguous));
  dropout_apply(x, out, p, seed, /*accumulate=*/false);
  return out;
}

}  // namespace

void dropout_apply_cpu(const at::Tensor& src, at::Tensor& dst, double p, int64_t seed, bool accumulate) {
  const float p_f = static_cast<float>(p);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, src.scalar_type(), "dropout_apply_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const acc_t factor = static_cast<acc_t>(1.0 / (1.0 - p));
    const scalar_t* in = src.const_data_ptr<scalar_t>();
    scalar_t* out = dst.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, src.numel(), 4096, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        const acc_t kept = dropout_keep(seed, i, p_f) ? static_cast<acc_t>(in[i]) * factor : acc_t(0);
        out[i] = static_cast<scalar_t>(accumulate ? static_cast<acc_t>(out[i]) + kept : kept);
      }
    });
  });
}

void segment_scale_reduce_cpu(const at::Tensor& T, const at::Tensor& h, const at::Tensor& scale_acc,
                              at::Tensor& scaled_T, at::Tensor& partials) {
  const int64_t S = T.size(0), M = T.size(1), r = T.size(2), chunks = partials.size(1);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, T.scalar_type(), "segment_scale_reduce_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* t = T.const_data_ptr<scalar_t>();
    const scalar_t* hp = h.const_data_ptr<scalar_t>();
    const acc_t* c = scale_acc.const_data_ptr<acc_t>();
    scalar_t* out = scaled_T.mutable_data_ptr<scalar_t>();
    acc_t* part = partials.mutable_data_ptr<acc_t>();
    at::parallel_for(0, S * chunks, 1, [&](int64_t begin, int64_t end) {
      for (int64_t task = begin; task < end; ++task) {
        const int64_t j = task / chunks, row_end = std::min(M, (task % chunks + 1) * kRowsPerChunk);
        acc_t acc = 0;
        for (int64_t m = (task % chunks) * kRowsPerChunk; m < row_end; ++m) {
          for (int64_t k = 0; k < r; ++k) {
            const acc_t tv = static_cast<acc_t>(t[(j * M + m) * r + k]);
            acc += tv * static_cast<acc_t>(hp[m * S * r + j * r + k]);
            out[m * S * r + j * r + k] = static_cast<scalar_t>(c[j] * tv);
          }
        }
        part[task] = acc;
      }
    });
  });
}

}  // namespace metapeft

TORCH_LIBRARY_FRAGMENT(metapeft, m) {
  m.def("scaled_lora_fwd_cuda(Tensor x, Tensor weight, Tensor? bias, Tensor lora_A, Tensor lora_B, Tensor scale, "
        "float dropout_p, Tensor? seed) -> (Tensor, Tensor)");
  m.def("scaled_lora_bwd_cuda(Tensor grad_y, Tensor x, Tensor weight, Tensor lora_A, Tensor lora_B, Tensor scale, "
        "Tensor h, float dropout_p, Tensor? seed, bool[6] needs) -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def("seeded_dropout_cuda(Tensor x, float p, Tensor seed) -> Tensor");
}

TORCH_LIBRARY_IMPL(metapeft, CPU, m) {
  m.impl("scaled_lora_fwd_cuda", &metapeft::scaled_lora_fwd);
  m.impl("scaled_lora_bwd_cuda", &metapeft::scaled_lora_bwd);
  m.impl("seeded_dropout_cuda", &metapeft::seeded_dropout);
}

TORCH_LIBRARY_IMPL(metapeft, CUDA, m) {
  m.impl("scaled_lora_fwd_cuda", &metapeft::scaled_lora_fwd);
  m.impl("scaled_lora_bwd_cuda", &metapeft::scaled_lora_bwd);
  m.impl("seeded_dropout_cuda", &metapeft::seeded_dropout);
}

// Build facts, passed by setup.py / CMakeLists.txt as bare tokens (archs joined by ','), e.g.
// -DMETAPEFT_BUILD_ARCHS=8.0,9.0: stringified here and exposed as metapeft._C.build_* for build_info().
#define METAPEFT_STRINGIFY_(...) #__VA_ARGS__
#define METAPEFT_STRINGIFY(x) METAPEFT_STRINGIFY_(x)

// `import metapeft._C` loads the library (and so the registrations above); the module holds the build facts.
extern "C" PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", "metapeft's C++/CUDA ops", -1, nullptr};
  PyObject* module = PyModule_Create(&module_def);
  if (module == nullptr ||
      PyModule_AddStringConstant(module, "build_torch_version", METAPEFT_STRINGIFY(METAPEFT_BUILD_TORCH)) < 0 ||
      PyModule_AddStringConstant(module, "build_cuda_version", METAPEFT_STRINGIFY(METAPEFT_BUILD_CUDA)) < 0 ||
      PyModule_AddStringConstant(module, "build_arch_list", METAPEFT_STRINGIFY(METAPEFT_BUILD_ARCHS)) < 0) {
    Py_XDECREF(module);
    return nullptr;
  }
  return module;
}
