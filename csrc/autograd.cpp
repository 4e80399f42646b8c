// metapeft._C: the eager call of each op family in C++, registered with the dispatcher's Autograd key.
//
//   metapeft::scaled_lora(x, weight, bias, lora_A, lora_B, modulator, constraint, factor) -> y
//   metapeft::adapter(x, residual, down_weight, down_bias, up_weight, up_bias, modulator, constraint, factor,
//                     activation) -> out
//
// Each is one dispatcher call from Python: the forward computes scale = factor * gamma(modulator) and the fused
// math of the family's torch backend (metapeft/ops/scaled_lora_torch.py, metapeft/ops/adapter_torch.py; no
// dropout: the Python routes keep every backend's mask), and one autograd node runs the backward without Python.
// The backward is built from differentiable ATen ops: with grad mode on (create_graph=True) it recomputes the kept
// activation and the scale from the saved inputs, so a double backward gives exact second derivatives.
// Shapes: as the Python ops (x (..., K); modulator (S,) or (N,) for scaled LoRA, (1,) or (D,) for the adapter: one
// gamma per segment / adapter or one per output channel, told apart by length); the Python layer
// checks every argument before the call (parameters once, x per call), so this file only checks what it relies on.
// The Python fake kernels of both ops are in metapeft/ops/cpp_autograd.py.
#include <ATen/ATen.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/library.h>

#include <string>

namespace metapeft {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// gamma(modulator): "softplus" (the paper), "exp" or "none" (metapeft/modulator.py).
at::Tensor gamma_of(const at::Tensor& modulator, const std::string& constraint) {
  if (constraint == "softplus") {
    return at::softplus(modulator);
  }
  if (constraint == "exp") {
    return modulator.exp();
  }
  TORCH_CHECK(constraint == "none", "constraint must be 'softplus', 'exp' or 'none', got '", constraint, "'");
  return modulator;
}

at::Tensor scale_of(const at::Tensor& modulator, const std::string& constraint, double factor) {
  const at::Tensor gamma = gamma_of(modulator, constraint);
  return factor == 1.0 ? gamma : gamma * factor;
}

// d loss / d modulator from d loss / d scale for scale = factor * gamma(modulator).
at::Tensor modulator_grad(const at::Tensor& dscale, const at::Tensor& modulator, const std::string& constraint,
                          double factor) {
  const at::Tensor dgamma = factor == 1.0 ? dscale : dscale * factor;
  if (constraint == "softplus") {
    return dgamma * at::sigmoid(modulator);
  }
  return constraint == "exp" ? dgamma * modulator.exp() : dgamma;
}

at::Tensor as_dtype(const at::Tensor& t, at::ScalarType dtype) {
  return t.scalar_type() == dtype ? t : t.to(dtype);
}

// (M, S*w) -> (S, M, w) view.
at::Tensor segment_view(const at::Tensor& t, int64_t segments) {
  return t.unflatten(1, {segments, t.size(1) / segments}).transpose(0, 1);
}

// (N, r) B rows -> the (N, S*r) block-diagonal B whose block (j, j) is segment j's rows times blocks[j, j].
at::Tensor block_diagonal(const at::Tensor& rows, const at::Tensor& blocks) {
  const int64_t segments = blocks.size(0), rank = rows.size(1);
  return (rows.reshape({segments, -1, 1, rank}) * blocks.view({segments, 1, segments, 1}))
      .reshape({rows.size(0), segments * rank});
}

// y (M, N) from 2-D x, h = x A^T and the scale: the base GEMM, then one rank-space GEMM accumulated onto it (at
// S > 1 on a block-diagonal (N, S*r) B scaled by diag(scale); a per-channel scale (N,) scales B's rows), as
// scaled_lora_fwd_torch.
at::Tensor lora_forward(const at::Tensor& x2d, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                        const at::Tensor& lora_B, const at::Tensor& scale, const at::Tensor& h) {
  const int64_t segments = h.size(1) / lora_B.size(1);
  const at::Tensor c = as_dtype(scale, h.scalar_type());
  at::Tensor scaled_B;
  if (c.size(0) != segments) {  // per channel
    scaled_B = lora_B * c.unsqueeze(1);
    if (segments > 1) {
      scaled_B = block_diagonal(scaled_B, at::eye(segments, c.options()));
    }
  } else if (segments == 1) {
    scaled_B = lora_B * c;
  } else {
    scaled_B = block_diagonal(lora_B, at::diag_embed(c));
  }
  at::Tensor y = bias.has_value() ? at::addmm(*bias, x2d, weight.t()) : at::mm(x2d, weight.t());
  return y.addmm_(h, scaled_B.t());
}

class ScaledLoRAFunction : public torch::autograd::Function<ScaledLoRAFunction> {
 public:
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& weight,
                            const std::optional<at::Tensor>& bias, const at::Tensor& lora_A, const at::Tensor& lora_B,
                            const at::Tensor& modulator, c10::string_view constraint, double factor) {
    const at::Tensor x2d = x.reshape({-1, x.size(-1)});
    const at::Tensor h = at::linear(x2d, lora_A);
    const std::string name(constraint);
    const at::Tensor scale = scale_of(modulator, name, factor);
    at::Tensor y = lora_forward(x2d, weight, bias, lora_B, scale, h);
    ctx->save_for_backward({x, weight, lora_A, lora_B, modulator, h, scale});
    ctx->saved_data["constraint"] = name;
    ctx->saved_data["factor"] = factor;
    ctx->saved_data["needs"] = c10::List<bool>({x.requires_grad(), weight.requires_grad(),
                                                 bias.has_value() && bias->requires_grad(), lora_A.requires_grad(),
                                                 lora_B.requires_grad(), modulator.requires_grad()});
    std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
    shape.back() = y.size(1);
    return y.view(shape);
  }

  // As scaled_lora_bwd_torch: T_j = dY_j B_j; d scale_j = sum(T_j * h_j); dB_j = scale_j dY_j^T h_j;
  // dA = (scale T)^T x; dx = dY W + (scale T) A; dW = dY^T x; dbias = sum_m dY_m. Per channel (scale c (N,)):
  // scale T = dY (c B); P_j = dY_j^T h_j; dB = c P; d c = rowsum(P * B), P in fp32 for fp16/bf16 when d c is needed.
  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    const auto saved = ctx->get_saved_variables();
    const at::Tensor& x = saved[0];
    const at::Tensor &weight = saved[1], &lora_A = saved[2], &lora_B = saved[3], &modulator = saved[4];
    const std::string constraint = ctx->saved_data["constraint"].toStringRef();
    const double factor = ctx->saved_data["factor"].toDouble();
    const c10::List<bool> needs = ctx->saved_data["needs"].toBoolList();
    const at::Tensor x2d = x.reshape({-1, x.size(-1)});
    const at::Tensor grad_y = grad_outputs[0].reshape({-1, weight.size(0)});
    // grad mode on: a double backward; the kept h and the scale become differentiable functions of the inputs
    const bool differentiable = at::GradMode::is_enabled();
    const at::Tensor h = differentiable ? at::linear(x2d, lora_A) : saved[5];
    const at::Tensor scale = differentiable ? scale_of(modulator, constraint, factor) : saved[6];
    const int64_t segments = lora_A.size(0) / lora_B.size(1);
    const at::Tensor c = as_dtype(scale, grad_y.scalar_type());
    const bool per_channel = c.size(0) != segments;

    at::Tensor T, scaled_T, grad_segments;
    if (per_channel) {
      const at::Tensor scaled_B = lora_B * c.unsqueeze(1);
      if (segments == 1) {
        scaled_T = at::mm(grad_y, scaled_B);
      } else {
        scaled_T = at::bmm(segment_view(grad_y, segments), scaled_B.unflatten(0, {segments, -1}))
                       .transpose(0, 1)
                       .reshape({grad_y.size(0), h.size(1)});
      }
    } else if (segments == 1) {
      T = at::mm(grad_y, lora_B);
      scaled_T = T * c;
    } else {
      grad_segments = segment_view(grad_y, segments);
      T = at::bmm(grad_segments, lora_B.unflatten(0, {segments, -1}));
      scaled_T = (T * c.view({segments, 1, 1})).transpose(0, 1).reshape({grad_y.size(0), h.size(1)});
    }
    at::Tensor dx, dweight, dbias, dA, dB, dmodulator;
    if (per_channel && (needs[4] || needs[5])) {
      const at::ScalarType acc = needs[5] ? at::promote_types(grad_y.scalar_type(), at::kFloat) : grad_y.scalar_type();
      const at::Tensor grad_acc = as_dtype(grad_y, acc), h_acc = as_dtype(h, acc);
      const at::Tensor P = segments == 1 ? at::mm(grad_acc.t(), h_acc)
                                         : at::bmm(segment_view(grad_acc, segments).transpose(1, 2),
                                                   segment_view(h_acc, segments)).reshape(lora_B.sizes());
      if (needs[4]) {
        dB = as_dtype(P * as_dtype(c, acc).unsqueeze(1), lora_B.scalar_type());
      }
      if (needs[5]) {
        const at::Tensor dscale = as_dtype((P * as_dtype(lora_B, acc)).sum(1), scale.scalar_type());
        dmodulator = modulator_grad(dscale, modulator, constraint, factor);
      }
    }
    if (needs[5] && !per_channel) {
      at::Tensor dscale;
      if (segments == 1 && (T.scalar_type() == at::kFloat || T.scalar_type() == at::kDouble)) {
        dscale = at::dot(T.reshape(-1), h.reshape(-1)).reshape({1});
      } else {  // fp16/bf16: the products and the sum in fp32
        const at::ScalarType acc = at::promote_types(T.scalar_type(), at::kFloat);
        const at::Tensor hs = segments == 1 ? h : segment_view(h, segments);
        dscale = (as_dtype(T, acc) * as_dtype(hs, acc)).sum({-2, -1}).reshape({segments});
      }
      dmodulator = modulator_grad(as_dtype(dscale, scale.scalar_type()), modulator, constraint, factor);
    }
    if (needs[4] && !per_channel) {
      if (segments == 1) {
        dB = at::mm(grad_y.t(), h * c);
      } else {
        dB = at::bmm(grad_segments.transpose(1, 2), segment_view(h, segments) * c.view({segments, 1, 1}));
        dB = dB.reshape(lora_B.sizes());
      }
    }
    if (needs[3]) {
      dA = at::mm(scaled_T.t(), x2d);
    }
    if (needs[0]) {
      dx = at::mm(grad_y, weight).addmm_(scaled_T, lora_A).view(x.sizes());
    }
    if (needs[1]) {
      dweight = at::mm(grad_y.t(), x2d);
    }
    if (needs[2]) {
      dbias = grad_y.sum(0);
    }
    return {dx, dweight, dbias, dA, dB, dmodulator, at::Tensor(), at::Tensor()};
  }
};

at::Tensor activation(const at::Tensor& z, bool relu) {
  return relu ? at::relu(z) : at::gelu(z);
}

// out = base + up(act(down(x)) * c) with the scale applied in bottleneck space, as adapter_fwd_torch; a per-channel
// scale (D,) scales up's rows instead.
at::Tensor adapter_forward(const at::Tensor& x, const std::optional<at::Tensor>& residual, const at::Tensor& z,
                           const at::Tensor& up_weight, const std::optional<at::Tensor>& up_bias,
                           const at::Tensor& scale, bool relu) {
  const at::Tensor a = activation(z, relu);
  const at::Tensor c = as_dtype(scale, a.scalar_type());
  const std::optional<at::Tensor> scaled_up_bias =
      up_bias.has_value() ? std::optional<at::Tensor>(*up_bias * c) : std::nullopt;
  const at::Tensor base = residual.has_value() ? *residual : x;
  if (c.size(0) != 1) {
    return base + at::linear(a, up_weight * c.unsqueeze(1), scaled_up_bias);
  }
  return base + at::linear(a * c, up_weight, scaled_up_bias);
}

class AdapterFunction : public torch::autograd::Function<AdapterFunction> {
 public:
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, const std::optional<at::Tensor>& residual,
                            const at::Tensor& down_weight, const std::optional<at::Tensor>& down_bias,
                            const at::Tensor& up_weight, const std::optional<at::Tensor>& up_bias,
                            const at::Tensor& modulator, c10::string_view constraint, double factor,
                            c10::string_view activation_name) {
    const std::string name(constraint);
    const bool relu = activation_name == "relu";
    TORCH_CHECK(relu || activation_name == "gelu", "activation must be 'relu' or 'gelu', got '", activation_name,
                "'");
    const at::Tensor z = at::linear(x, down_weight, down_bias);
    const at::Tensor scale = scale_of(modulator, name, factor);
    at::Tensor out = adapter_forward(x, residual, z, up_weight, up_bias, scale, relu);
    const at::Tensor undefined;
    ctx->save_for_backward({x, down_weight, down_bias.value_or(undefined), up_weight, up_bias.value_or(undefined),
                            modulator, z, scale});
    ctx->saved_data["constraint"] = name;
    ctx->saved_data["factor"] = factor;
    ctx->saved_data["relu"] = relu;
    ctx->saved_data["residual_is_x"] = !residual.has_value();
    ctx->saved_data["needs"] = c10::List<bool>(
        {x.requires_grad(), residual.has_value() && residual->requires_grad(), down_weight.requires_grad(),
         down_bias.has_value() && down_bias->requires_grad(), up_weight.requires_grad(),
         up_bias.has_value() && up_bias->requires_grad(), modulator.requires_grad()});
    return out;
  }

  // As adapter_bwd_torch: P = dOut^T a (D, b); d up = c P; d up_b = c sum_m dOut_m;
  // d scale = sum(P * up) + (sum_m dOut_m) . up_b; dz = c (dOut up) * act'(z); d down = dz^T x; d down_b = sum_m dz_m;
  // dx = [dOut if the residual is x] + dz down; d residual = dOut. P and sum_m dOut_m in fp32 for fp16/bf16.
  // Per channel (scale c (D,)): d up = c[:, None] P; d c = rowsum(P * up) + (sum_m dOut_m) * up_b;
  // dz = (dOut (c[:, None] up)) * act'(z).
  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    const auto saved = ctx->get_saved_variables();
    const at::Tensor &x = saved[0], &down_weight = saved[1], &down_bias = saved[2], &up_weight = saved[3];
    const at::Tensor &up_bias = saved[4], &modulator = saved[5];
    const std::string constraint = ctx->saved_data["constraint"].toStringRef();
    const double factor = ctx->saved_data["factor"].toDouble();
    const bool relu = ctx->saved_data["relu"].toBool(), residual_is_x = ctx->saved_data["residual_is_x"].toBool();
    const c10::List<bool> needs = ctx->saved_data["needs"].toBoolList();
    const int64_t dim = x.size(-1), bottleneck = down_weight.size(0);
    const at::Tensor x2d = x.reshape({-1, dim});
    const at::Tensor grad_out = grad_outputs[0].reshape({-1, dim});
    const bool differentiable = at::GradMode::is_enabled();  // a double backward: recompute z differentiably
    const std::optional<at::Tensor> down_b = down_bias.defined() ? std::optional<at::Tensor>(down_bias) : std::nullopt;
    const at::Tensor z = (differentiable ? at::linear(x2d, down_weight, down_b) : saved[6]).reshape({-1, bottleneck});
    const at::Tensor scale = differentiable ? scale_of(modulator, constraint, factor) : saved[7];
    const at::Tensor c = as_dtype(scale, grad_out.scalar_type());
    const bool per_channel = c.size(0) != 1;
    const at::Tensor a = activation(z, relu);

    at::Tensor dx, dresidual, ddown_w, ddown_b, dup_w, dup_b, dmodulator;
    if (needs[6] || needs[4] || needs[5]) {
      const at::ScalarType acc = at::promote_types(grad_out.scalar_type(), at::kFloat);
      const at::Tensor grad_acc = as_dtype(grad_out, acc), c_acc = as_dtype(scale, acc);
      const at::Tensor P = at::mm(grad_acc.t(), as_dtype(a, acc));  // (D, b)
      at::Tensor grad_sum;
      if (up_bias.defined() && (needs[6] || needs[5])) {
        grad_sum = grad_acc.sum(0);
      }
      if (needs[4]) {
        dup_w = as_dtype(P * c_acc.unsqueeze(1), up_weight.scalar_type());
      }
      if (needs[5]) {
        dup_b = as_dtype(grad_sum * c_acc, up_weight.scalar_type());
      }
      if (needs[6] && per_channel) {
        at::Tensor dscale = (P * as_dtype(up_weight, acc)).sum(1);
        if (up_bias.defined()) {
          dscale = dscale + grad_sum * as_dtype(up_bias, acc);
        }
        dmodulator = modulator_grad(as_dtype(dscale, scale.scalar_type()), modulator, constraint, factor);
      } else if (needs[6]) {
        at::Tensor dscale = (P * as_dtype(up_weight, acc)).sum();
        if (up_bias.defined()) {
          dscale = dscale + at::dot(grad_sum, as_dtype(up_bias, acc));
        }
        dmodulator = modulator_grad(as_dtype(dscale.reshape({1}), scale.scalar_type()), modulator, constraint, factor);
      }
    }
    if (needs[0] || needs[2] || needs[3]) {
      const at::Tensor grad_z =
          per_channel ? at::mm(grad_out, up_weight * c.unsqueeze(1)) : at::mm(grad_out, up_weight) * c;
      const at::Tensor dz = relu ? at::threshold_backward(grad_z, z, 0) : at::gelu_backward(grad_z, z);
      if (needs[2]) {
        ddown_w = at::mm(dz.t(), x2d);
      }
      if (needs[3]) {
        ddown_b = dz.sum(0);
      }
      if (needs[0]) {
        dx = (residual_is_x ? at::addmm(grad_out, dz, down_weight) : at::mm(dz, down_weight)).view(x.sizes());
      }
    }
    if (needs[1]) {
      dresidual = grad_outputs[0];
    }
    return {dx, dresidual, ddown_w, ddown_b, dup_w, dup_b, dmodulator, at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

at::Tensor scaled_lora_autograd(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                                const at::Tensor& lora_A, const at::Tensor& lora_B, const at::Tensor& modulator,
                                c10::string_view constraint, double factor) {
  return ScaledLoRAFunction::apply(x, weight, bias, lora_A, lora_B, modulator, constraint, factor);
}

at::Tensor adapter_autograd(const at::Tensor& x, const std::optional<at::Tensor>& residual,
                            const at::Tensor& down_weight, const std::optional<at::Tensor>& down_bias,
                            const at::Tensor& up_weight, const std::optional<at::Tensor>& up_bias,
                            const at::Tensor& modulator, c10::string_view constraint, double factor,
                            c10::string_view activation_name) {
  return AdapterFunction::apply(x, residual, down_weight, down_bias, up_weight, up_bias, modulator, constraint, factor,
                                activation_name);
}

// Below autograd (inference mode, no input requiring grad, fake/meta tensors): the forward alone.
at::Tensor scaled_lora_forward_only(const at::Tensor& x, const at::Tensor& weight,
                                    const std::optional<at::Tensor>& bias, const at::Tensor& lora_A,
                                    const at::Tensor& lora_B, const at::Tensor& modulator,
                                    c10::string_view constraint, double factor) {
  const at::Tensor x2d = x.reshape({-1, x.size(-1)});
  const at::Tensor y =
      lora_forward(x2d, weight, bias, lora_B, scale_of(modulator, std::string(constraint), factor),
                   at::linear(x2d, lora_A));
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
  shape.back() = y.size(1);
  return y.view(shape);
}

at::Tensor adapter_forward_only(const at::Tensor& x, const std::optional<at::Tensor>& residual,
                                const at::Tensor& down_weight, const std::optional<at::Tensor>& down_bias,
                                const at::Tensor& up_weight, const std::optional<at::Tensor>& up_bias,
                                const at::Tensor& modulator, c10::string_view constraint, double factor,
                                c10::string_view activation_name) {
  const bool relu = activation_name == "relu";
  TORCH_CHECK(relu || activation_name == "gelu", "activation must be 'relu' or 'gelu', got '", activation_name, "'");
  return adapter_forward(x, residual, at::linear(x, down_weight, down_bias), up_weight, up_bias,
                         scale_of(modulator, std::string(constraint), factor), relu);
}

}  // namespace
}  // namespace metapeft

TORCH_LIBRARY_FRAGMENT(metapeft, m) {
  m.def("scaled_lora(Tensor x, Tensor weight, Tensor? bias, Tensor lora_A, Tensor lora_B, Tensor modulator, "
        "str constraint, float factor) -> Tensor");
  m.def("adapter(Tensor x, Tensor? residual, Tensor down_weight, Tensor? down_bias, Tensor up_weight, "
        "Tensor? up_bias, Tensor modulator, str constraint, float factor, str activation) -> Tensor");
}

TORCH_LIBRARY_IMPL(metapeft, Autograd, m) {
  m.impl("scaled_lora", &metapeft::scaled_lora_autograd);
  m.impl("adapter", &metapeft::adapter_autograd);
}

TORCH_LIBRARY_IMPL(metapeft, CompositeExplicitAutograd, m) {
  m.impl("scaled_lora", &metapeft::scaled_lora_forward_only);
  m.impl("adapter", &metapeft::adapter_forward_only);
}
