// metapeft._C: the eager call of each op family in C++, registered with the dispatcher's Autograd key.
//
//   metapeft::scaled_lora(x, weight, bias, lora_A, lora_B, modulator, constraint, factor) -> y
//   metapeft::adapter(x, residual, down_weight, down_bias, up_weight, up_bias, modulator, constraint, factor,
//                     activation) -> out
//
// Each is one dispatcher call from Python: the Autograd kernel computes the forward below autograd (scale = factor *
// gamma(modulator), the math of the family's torch backend: metapeft/ops/scaled_lora_torch.py,
// metapeft/ops/adapter_torch.py; no dropout: the Python routes keep every backend's mask), and where an input
// requires grad it attaches one hand-written autograd node whose backward runs without Python and computes only the
// gradients the engine asks for. The backward is built from differentiable ATen ops: with grad mode on
// (create_graph=True) it recomputes what the forward kept from the saved inputs, so a double backward gives exact
// second derivatives. Saved tensors are torch's SavedVariables (version checks, saved-tensor hooks, freed after a
// backward without retain_graph).
// Shapes: as the Python ops (x (..., K); modulator (S,) or (N,) for scaled LoRA, (1,) or (D,) for the adapter: one
// gamma per segment / adapter or one per output channel, told apart by length); the Python layer checks every
// argument before the call (parameters once, x per call), so this file only checks what it relies on. Fake and meta
// tensors run the forward-only kernel (CompositeExplicitAutograd), which serves as the ops' shape functions.
#include <ATen/ATen.h>
#include <torch/csrc/autograd/function.h>
#include <torch/csrc/autograd/functions/utils.h>
#include <torch/csrc/autograd/saved_variable.h>
#include <torch/csrc/dynamo/compiled_autograd.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <memory>
#include <string>
#include <type_traits>
#include <vector>

namespace metapeft {
namespace {

using torch::autograd::Node;
using torch::autograd::SavedVariable;
using torch::autograd::variable_list;

// The graph's owning pointer to a node: std::shared_ptr up to torch 2.11, c10::intrusive_ptr in newer releases.
using NodePtr = decltype(torch::autograd::Edge::function);

template <class T>
NodePtr make_node() {
  if constexpr (std::is_same_v<NodePtr, std::shared_ptr<Node>>) {
    return std::make_shared<T>();
  } else {
    return c10::make_intrusive<T>();
  }
}

// gamma(modulator) (metapeft/modulator.py): softplus (the paper), exp, or the modulator itself.
enum class Constraint { kSoftplus, kExp, kNone };

Constraint parse_constraint(c10::string_view name) {
  if (name == "softplus") {
    return Constraint::kSoftplus;
  }
  if (name == "exp") {
    return Constraint::kExp;
  }
  TORCH_CHECK(name == "none", "constraint must be 'softplus', 'exp' or 'none', got '", name, "'");
  return Constraint::kNone;
}

bool parse_relu(c10::string_view activation) {
  TORCH_CHECK(activation == "relu" || activation == "gelu", "activation must be 'relu' or 'gelu', got '", activation,
              "'");
  return activation == "relu";
}

at::Tensor as_dtype(const at::Tensor& t, at::ScalarType dtype) {
  return t.scalar_type() == dtype ? t : t.to(dtype);
}

at::Tensor gamma_of(const at::Tensor& modulator, Constraint constraint) {
  switch (constraint) {
    case Constraint::kSoftplus:
      return at::softplus(modulator);
    case Constraint::kExp:
      return modulator.exp();
    default:
      return modulator;
  }
}

// scale = factor * gamma(modulator), in the modulator's dtype.
at::Tensor scale_of(const at::Tensor& modulator, Constraint constraint, double factor) {
  const at::Tensor gamma = gamma_of(modulator, constraint);
  return factor == 1.0 ? gamma : gamma * factor;
}

// d loss / d modulator (the modulator's shape) from d loss / d scale (that shape, or a 0-dim total for one gamma);
// `scale` is factor * gamma(modulator).
at::Tensor modulator_grad(const at::Tensor& dscale, const at::Tensor& modulator, const at::Tensor& scale,
                          Constraint constraint, double factor) {
  switch (constraint) {
    case Constraint::kSoftplus: {  // d softplus = sigmoid, with softplus's own threshold
      const at::Tensor dgamma = at::softplus_backward(dscale, modulator, 1.0, 20.0);
      return factor == 1.0 ? dgamma : dgamma * factor;
    }
    case Constraint::kExp:  // d (factor exp(m)) / dm = scale
      return dscale * as_dtype(scale, dscale.scalar_type());
    default: {
      const at::Tensor dgamma = factor == 1.0 ? dscale : dscale * factor;
      return dgamma.sizes() == modulator.sizes() ? dgamma : dgamma.view(modulator.sizes());
    }
  }
}

at::Tensor rows(const at::Tensor& t) {  // (..., K) -> (M, K); a view where t is contiguous (one dispatch)
  if (t.dim() == 2) {
    return t;
  }
  return t.is_contiguous() ? t.view({-1, t.size(-1)}) : t.reshape({-1, t.size(-1)});
}

at::Tensor transposed(const at::Tensor& t) {  // a 2-D t's transpose (one dispatch; Tensor::t() takes two)
  return t.transpose(0, 1);
}

// (M, S*w) -> (S, M, w) view.
at::Tensor segment_view(const at::Tensor& t, int64_t segments) {
  return t.unflatten(1, {segments, t.size(1) / segments}).transpose(0, 1);
}

// At S > 1 the rank-space products with B run per segment (bmm) where they are large (M N r at least
// kSegmentwiseWork) and on one block-diagonal B (one GEMM, fewer calls, S times the rank-space flops) where they are
// small: at ViT-B's qkv (M 1576, N 2304, S 3, r 8 / 16, CPU) per segment saves 1.2 / 4.9 ms a forward+backward, at
// tiny shapes the block-diagonal form saves the calls (docs/design.md, "Where the floors are").
constexpr int64_t kSegmentwiseWork = int64_t{1} << 22;

bool segmentwise(int64_t rows, const at::Tensor& lora_B, int64_t segments) {
  return segments > 1 && rows * lora_B.size(0) * lora_B.size(1) >= kSegmentwiseWork;
}

// B with each row scaled by its gamma, `c` (S,) per segment or (N,) per output channel, in B's dtype: (N, r) at
// S = 1; at S > 1 per segment (S, N/S, r), or block-diagonal (N, S*r) with block (j, j) segment j's scaled rows.
at::Tensor scaled_B_of(const at::Tensor& lora_B, const at::Tensor& c, int64_t segments, bool per_segment) {
  const int64_t rank = lora_B.size(1);
  const bool per_channel = c.size(0) != segments;
  if (segments == 1) {
    return lora_B * (per_channel ? c.unsqueeze(1) : c);
  }
  const at::Tensor blocks = lora_B.view({segments, -1, rank});
  if (per_segment) {
    return blocks * (per_channel ? c.view({segments, -1, 1}) : c.view({segments, 1, 1}));
  }
  const at::Tensor diagonal = per_channel ? at::eye(segments, c.options()) : at::diag_embed(c);
  const at::Tensor rows = per_channel ? (lora_B * c.unsqueeze(1)).view({segments, -1, 1, rank})
                                      : blocks.unsqueeze(2);
  return (rows * diagonal.view({segments, 1, segments, 1})).reshape({lora_B.size(0), segments * rank});
}

// ---------------------------------------------------------------------------------------------------------------
// Compiled autograd (torch._dynamo.compiled_autograd): a node enters the compiled backward graph as one call of its
// functional backward on its packed saved tensors, constants and the gradients it must compute. The saved tensors
// (lifted to graph inputs) and the constants (specialised on) form the node's part of the cache key.

namespace compiled = torch::dynamo::autograd;

// The values a node passes to its functional backward: saved tensors (None when undefined), then constants.
struct LiftedArgs {
  std::vector<SavedVariable*> saved;
  std::vector<at::IValue> constants;
};

void collect_lifted(compiled::CompiledNodeArgs& args, const LiftedArgs& lifted) {
  for (const SavedVariable* saved : lifted.saved) {
    args.collect(*saved, false);
  }
  for (const at::IValue& constant : lifted.constants) {  // specialised on (by value, not lifted to inputs)
    if (constant.isInt()) {
      args.collect(constant.toInt());
    } else if (constant.isDouble()) {
      args.collect(constant.toDouble());
    } else {
      args.collect(constant.toBool());
    }
  }
}

variable_list call_lifted(Node& node, const variable_list& grads, compiled::SwapSavedVariables& swap,
                          const LiftedArgs& lifted, const torch::autograd::functional_apply_t& backward) {
  for (SavedVariable* saved : lifted.saved) {
    swap.before(*saved);
  }
  compiled::PackedArgs packed;
  for (SavedVariable* saved : lifted.saved) {
    const at::Tensor tensor = saved->unpack();
    packed.pack(tensor.defined() ? std::optional<at::Tensor>(tensor) : std::nullopt);
  }
  for (const at::IValue& constant : lifted.constants) {
    packed.pack(constant);
  }
  std::vector<bool> needs;
  for (size_t i = 0; i < node.num_outputs(); ++i) {
    needs.push_back(node.task_should_compute_output(i));
  }
  packed.pack(needs);
  const std::vector<at::IValue> args = std::move(packed).vec();
  std::vector<at::TypePtr> schema;
  for (const at::IValue& arg : args) {
    schema.emplace_back(arg.isTensor() ? at::TensorType::get() : arg.type());
  }
  const auto& python = compiled::getPyCompilerInterface();
  // bound afresh on every cache miss (as torch binds C++ autograd Functions: a fresh name each time), traceable
  const std::string function = python->bind_function(swap.get_py_compiler(), node.name(), backward, schema,
                                                      /*is_custom_function=*/true, /*is_traceable=*/true);
  const auto output_metadata = compiled::IValuePacker<std::vector<std::optional<torch::autograd::InputMetadata>>>::pack(
      compiled::get_input_metadata(node.next_edges()));
  variable_list out =
      python->call_function(swap.get_py_compiler(), "apply_functional", function, grads, args, output_metadata);
  for (SavedVariable* saved : lifted.saved) {
    swap.after(*saved);
  }
  return out;
}

// The functional backward's view of the packed values, in packing order.
struct LiftedReader {
  compiled::PackedArgs packed;

  explicit LiftedReader(const std::vector<at::IValue>& args) : packed(args) {}

  at::Tensor tensor() {
    return packed.unpack<std::optional<at::Tensor>>().value_or(at::Tensor());
  }

  template <size_t N>
  std::array<bool, N> needs() {
    const std::vector<bool> flags = packed.unpack<std::vector<bool>>();
    TORCH_CHECK(flags.size() == N, "expected ", N, " gradient flags, got ", flags.size());
    std::array<bool, N> out;
    std::copy(flags.begin(), flags.end(), out.begin());
    return out;
  }
};

// What both nodes share: the gradient flags, freeing the saved tensors, and compiled autograd's cache key and lifted
// call, from Derived::saved_variables(), Derived::constants() and the static Derived::functional.
template <class Derived, size_t Inputs>
struct LiftedNode : public Node {
  std::array<bool, Inputs> needs() const {  // whether input i gets a gradient in this backward
    std::array<bool, Inputs> out;
    for (size_t i = 0; i < Inputs; ++i) {
      out[i] = task_should_compute_output(i);
    }
    return out;
  }

  void release_variables() override {
    for (SavedVariable* saved : self().saved_variables()) {
      saved->reset_data();
    }
  }

  void compiled_args(compiled::CompiledNodeArgs& args) const override {
    collect_lifted(args, const_cast<LiftedNode*>(this)->lifted());
  }

  variable_list apply_with_saved(const variable_list& grads, compiled::SwapSavedVariables& swap) override {
    return call_lifted(*this, grads, swap, lifted(), &Derived::functional);
  }

 private:
  Derived& self() {
    return static_cast<Derived&>(*this);
  }

  LiftedArgs lifted() {
    return {self().saved_variables(), self().constants()};
  }
};

// ---------------------------------------------------------------------------------------------------------------
// Scaled LoRA: y = x W^T + bias + sum_j c_j h_j B_j^T over segments j, h = x A^T (M, S*r), c = factor gamma.

struct LoRAForward {
  at::Tensor y;         // (M, N)
  at::Tensor h;         // (M, S*r)
  at::Tensor scale;     // (S,) or (N,), the modulator's dtype
  at::Tensor scaled_B;  // scaled_B_of(B, scale): (N, r), (S, N/S, r) or block-diagonal (N, S*r), x's dtype
};

LoRAForward lora_forward(const at::Tensor& x2d, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                         const at::Tensor& lora_A, const at::Tensor& lora_B, const at::Tensor& modulator,
                         Constraint constraint, double factor) {
  LoRAForward f;
  f.h = at::mm(x2d, transposed(lora_A));
  f.scale = scale_of(modulator, constraint, factor);
  const int64_t segments = lora_A.size(0) / lora_B.size(1);
  const bool per_segment = segmentwise(x2d.size(0), lora_B, segments);
  f.scaled_B = scaled_B_of(lora_B, as_dtype(f.scale, x2d.scalar_type()), segments, per_segment);
  f.y = bias.has_value() ? at::addmm(*bias, x2d, transposed(weight)) : at::mm(x2d, transposed(weight));
  if (per_segment) {  // y_j += h_j (c_j B_j)^T
    segment_view(f.y, segments).baddbmm_(segment_view(f.h, segments), f.scaled_B.transpose(1, 2));
  } else {
    f.y.addmm_(f.h, transposed(f.scaled_B));
  }
  return f;
}

at::Tensor with_leading_shape(const at::Tensor& y2d, const at::Tensor& x) {  // (M, N) -> (..., N) as x (..., K)
  if (x.dim() == 2) {
    return y2d;
  }
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
  shape.back() = y2d.size(1);
  return y2d.view(shape);
}

// The backward of scaled LoRA. With cB = scaled_B and cT = dY cB (M, S*r) (segment j: c_j dY_j B_j, or dY_j diag(c_j)
// B_j per channel): dx = dY W + cT A; dA = cT^T x; dW = dY^T x; dbias = sum_m dY_m; P_j = dY_j^T h_j (N/S, r), fp32
// for fp16/bf16 when d scale is needed; dB = c P (per row); d scale = sum(P_j * B_j) per segment, rowsum(P * B) per
// channel. `needs[i]`: whether input i (x, weight, bias, lora_A, lora_B, modulator) gets a gradient; with grad mode
// on (a double backward) h, the scale and scaled B are recomputed from the inputs and the ops are recorded.
struct LoRASaved {
  at::Tensor x, weight, lora_A, lora_B, modulator, h, scale, scaled_B;
};

variable_list scaled_lora_backward(const at::Tensor& grad, const LoRASaved& saved, Constraint constraint,
                                   double factor, const std::array<bool, 6>& needs) {
  variable_list out(6);
  if (!grad.defined()) {
    return out;
  }
  const at::Tensor &x = saved.x, &weight = saved.weight, &lora_A = saved.lora_A, &lora_B = saved.lora_B;
  const at::Tensor& modulator = saved.modulator;
  const bool differentiable = at::GradMode::is_enabled();
  std::optional<at::AutoDispatchBelowADInplaceOrView> below_autograd;
  if (!differentiable) {  // nothing to record: the ops run below autograd
    below_autograd.emplace();
  }
  const at::Tensor x2d = rows(x), grad_y = rows(grad);
  const int64_t segments = lora_A.size(0) / lora_B.size(1);
  at::Tensor h = saved.h, scale = saved.scale, scale_x, scaled_B = saved.scaled_B;
  if (differentiable) {
    h = at::mm(x2d, transposed(lora_A));
    scale = scale_of(modulator, constraint, factor);
    scale_x = as_dtype(scale, x2d.scalar_type());  // cast once: one rounding of the scale's second derivative
    scaled_B = scaled_B_of(lora_B, scale_x, segments, saved.scaled_B.dim() == 3);
  }
  if (needs[0] || needs[3]) {
    const at::Tensor scaled_T =
        scaled_B.dim() == 3 ? at::bmm(segment_view(grad_y, segments), scaled_B).transpose(0, 1).reshape(h.sizes())
                            : at::mm(grad_y, scaled_B);
    if (needs[0]) {
      out[0] = at::mm(grad_y, weight).addmm_(scaled_T, lora_A).view(x.sizes());
    }
    if (needs[3]) {
      out[3] = at::mm(transposed(scaled_T), x2d);
    }
  }
  if (needs[1]) {
    out[1] = at::mm(transposed(grad_y), x2d);
  }
  if (needs[2]) {
    out[2] = grad_y.sum(0);
  }
  const bool need_B = needs[4], need_modulator = needs[5];
  if (need_B || need_modulator) {
    const at::ScalarType acc =
        need_modulator ? at::promote_types(grad_y.scalar_type(), at::kFloat) : grad_y.scalar_type();
    const at::Tensor grad_acc = as_dtype(grad_y, acc), h_acc = as_dtype(h, acc);
    const at::Tensor c = scale_x.defined() && acc == scale_x.scalar_type() ? scale_x : as_dtype(scale, acc);
    const bool per_channel = c.size(0) != segments;
    // P (N, r): row n of segment j is dY[:, n]^T h_j
    const at::Tensor P = segments == 1 ? at::mm(transposed(grad_acc), h_acc)
                                       : at::bmm(segment_view(grad_acc, segments).transpose(1, 2),
                                                 segment_view(h_acc, segments)).view(lora_B.sizes());
    const int64_t rank = lora_B.size(1);
    if (need_B) {
      at::Tensor dB;
      if (per_channel) {
        dB = P * c.unsqueeze(1);
      } else if (segments == 1) {
        dB = P * c;
      } else {
        dB = (P.view({segments, -1, rank}) * c.view({segments, 1, 1})).view(lora_B.sizes());
      }
      out[4] = as_dtype(dB, lora_B.scalar_type());
    }
    if (need_modulator) {
      const at::Tensor B_acc = as_dtype(lora_B, acc);
      at::Tensor dscale;
      if (per_channel) {
        dscale = (P * B_acc).sum(1);
      } else if (segments == 1) {
        dscale = at::dot(P.view(-1), B_acc.reshape(-1));  // reshape: B may be strided
      } else {
        dscale = (P.view({segments, -1, rank}) * B_acc.view({segments, -1, rank})).sum({1, 2});
      }
      out[5] = modulator_grad(as_dtype(dscale, scale.scalar_type()), modulator, scale, constraint, factor);
    }
  }
  return out;
}

struct ScaledLoRABackward : public LiftedNode<ScaledLoRABackward, 6> {
  SavedVariable x_, weight_, lora_A_, lora_B_, modulator_, h_, scale_, scaled_B_;
  Constraint constraint_ = Constraint::kSoftplus;
  double factor_ = 1.0;

  std::string name() const override {
    return "metapeft::ScaledLoRABackward";
  }

  std::vector<SavedVariable*> saved_variables() {
    return {&x_, &weight_, &lora_A_, &lora_B_, &modulator_, &h_, &scale_, &scaled_B_};
  }

  std::vector<at::IValue> constants() const {
    return {static_cast<int64_t>(constraint_), factor_};
  }

  variable_list apply(variable_list&& grads) override {
    const LoRASaved saved{x_.unpack(),         weight_.unpack(), lora_A_.unpack(), lora_B_.unpack(),
                          modulator_.unpack(), h_.unpack(),      scale_.unpack(),  scaled_B_.unpack()};
    return scaled_lora_backward(grads[0], saved, constraint_, factor_, needs());
  }

  static variable_list functional(const variable_list& grads, const std::vector<at::IValue>& args) {
    LiftedReader read(args);
    LoRASaved saved;
    for (at::Tensor* t : {&saved.x, &saved.weight, &saved.lora_A, &saved.lora_B, &saved.modulator, &saved.h,
                          &saved.scale, &saved.scaled_B}) {
      *t = read.tensor();
    }
    const auto constraint = static_cast<Constraint>(read.packed.unpack<int64_t>());
    const double factor = read.packed.unpack<double>();
    return scaled_lora_backward(grads[0], saved, constraint, factor, read.needs<6>());
  }
};

at::Tensor scaled_lora_autograd(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                                const at::Tensor& lora_A, const at::Tensor& lora_B, const at::Tensor& modulator,
                                c10::string_view constraint_name, double factor) {
  const Constraint constraint = parse_constraint(constraint_name);
  const bool record = torch::autograd::compute_requires_grad(x, weight, bias, lora_A, lora_B, modulator);
  LoRAForward f;
  at::Tensor y;
  {  // below autograd: y is no tracked view of the (M, N) result
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    f = lora_forward(rows(x), weight, bias, lora_A, lora_B, modulator, constraint, factor);
    y = with_leading_shape(f.y, x);
  }
  if (record) {
    NodePtr node = make_node<ScaledLoRABackward>();
    auto* backward = static_cast<ScaledLoRABackward*>(node.get());
    backward->set_next_edges(torch::autograd::collect_next_edges(x, weight, bias, lora_A, lora_B, modulator));
    backward->x_ = SavedVariable(x, false);
    backward->weight_ = SavedVariable(weight, false);
    backward->lora_A_ = SavedVariable(lora_A, false);
    backward->lora_B_ = SavedVariable(lora_B, false);
    backward->modulator_ = SavedVariable(modulator, false);
    backward->h_ = SavedVariable(f.h, false);
    backward->scale_ = SavedVariable(f.scale, false);
    backward->scaled_B_ = SavedVariable(f.scaled_B, false);
    backward->constraint_ = constraint;
    backward->factor_ = factor;
    torch::autograd::set_history(y, node);
  }
  return y;
}

// Below autograd (inference mode, no input requiring grad, fake/meta tensors): the forward alone.
at::Tensor scaled_lora_forward_only(const at::Tensor& x, const at::Tensor& weight,
                                    const std::optional<at::Tensor>& bias, const at::Tensor& lora_A,
                                    const at::Tensor& lora_B, const at::Tensor& modulator,
                                    c10::string_view constraint, double factor) {
  return with_leading_shape(
      lora_forward(rows(x), weight, bias, lora_A, lora_B, modulator, parse_constraint(constraint), factor).y, x);
}

// ---------------------------------------------------------------------------------------------------------------
// Adapter: out = base + c * (act(x Wd^T + bd) Wu^T + bu), base the residual (AdaptFormer) or x (Houlsby); c =
// factor gamma, one per adapter or one per output channel (broadcast over the rows).

at::Tensor activation(const at::Tensor& z, bool relu) {
  return relu ? at::relu(z) : at::gelu(z);
}

at::Tensor linear_2d(const at::Tensor& input, const at::Tensor& weight, const std::optional<at::Tensor>& bias) {
  return bias.has_value() ? at::addmm(*bias, input, transposed(weight)) : at::mm(input, transposed(weight));
}

struct AdapterForward {
  at::Tensor out;  // (M, D)
  at::Tensor z;    // the bottleneck before the activation (M, b)
  at::Tensor a;    // after it (M, b)
  at::Tensor gamma;
};

AdapterForward adapter_forward(const at::Tensor& x2d, const at::Tensor& base2d, const at::Tensor& down_weight,
                               const std::optional<at::Tensor>& down_bias, const at::Tensor& up_weight,
                               const std::optional<at::Tensor>& up_bias, const at::Tensor& modulator,
                               Constraint constraint, double factor, bool relu) {
  AdapterForward f;
  f.z = linear_2d(x2d, down_weight, down_bias);
  f.gamma = gamma_of(modulator, constraint);
  f.a = activation(f.z, relu);
  const at::Tensor up = linear_2d(f.a, up_weight, up_bias);
  f.out = at::addcmul(base2d, up, as_dtype(f.gamma, up.scalar_type()), factor);
  return f;
}

// The backward of the adapter (relu's derivative read from a, gelu's from z). With a = act(z), P = dOut^T a (D, b)
// and g = sum_m dOut_m, both fp32 for fp16/bf16: d up = c P (per row), d up_b = c g; d scale = sum(P * up) + g . up_b
// per adapter, rowsum(P * up) + g * up_b per channel; dz = (dOut (c up)) * act'(z); d down = dz^T x; d down_b =
// sum_m dz_m; dx = [dOut if the residual is x] +
// dz down; d residual = dOut. `needs[i]`: whether input i (x, residual, down_weight, down_bias,
// up_weight, up_bias, modulator) gets a gradient; with grad mode on (a double backward) z, a and gamma are
// recomputed.
struct AdapterSaved {
  at::Tensor x, down_weight, down_bias, up_weight, up_bias, modulator, z, a, gamma;
};

variable_list adapter_backward(const at::Tensor& grad, const AdapterSaved& saved, Constraint constraint, double factor,
                               bool relu, bool residual_is_x, const std::array<bool, 7>& needs) {
  variable_list out(7);
  if (!grad.defined()) {
    return out;
  }
  const at::Tensor &x = saved.x, &down_weight = saved.down_weight, &down_bias = saved.down_bias;
  const at::Tensor &up_weight = saved.up_weight, &up_bias = saved.up_bias, &modulator = saved.modulator;
  const bool differentiable = at::GradMode::is_enabled();
  std::optional<at::AutoDispatchBelowADInplaceOrView> below_autograd;
  if (!differentiable) {  // nothing to record: the ops run below autograd
    below_autograd.emplace();
  }
  const at::Tensor x2d = rows(x), grad_out = rows(grad);
  at::Tensor z = saved.z, a = saved.a, gamma = saved.gamma;
  if (differentiable) {
    z = linear_2d(x2d, down_weight, down_bias.defined() ? std::optional<at::Tensor>(down_bias) : std::nullopt);
    a = activation(z, relu);
    gamma = gamma_of(modulator, constraint);
  }
  const bool per_channel = gamma.size(0) != 1;
  const bool need_up = needs[4], need_up_bias = needs[5];
  const bool need_modulator = needs[6], need_x = needs[0];
  const bool need_down = needs[2], need_down_bias = needs[3];
  const at::ScalarType acc = at::promote_types(grad_out.scalar_type(), at::kFloat);
  const at::Tensor gamma_acc = as_dtype(gamma, acc);
  const at::Tensor scale = factor == 1.0 ? gamma_acc : gamma_acc * factor;  // c, in the accumulation dtype
  if (need_up || need_up_bias || need_modulator) {
    const at::Tensor grad_acc = as_dtype(grad_out, acc);
    at::Tensor P, grad_sum;
    if (need_up || need_modulator) {
      P = at::mm(transposed(grad_acc), as_dtype(a, acc));  // (D, b)
    }
    if (up_bias.defined() && (need_up_bias || need_modulator)) {
      grad_sum = grad_acc.sum(0);
    }
    if (need_up) {
      out[4] = as_dtype(P * (per_channel ? scale.unsqueeze(1) : scale), up_weight.scalar_type());
    }
    if (need_up_bias) {
      out[5] = as_dtype(grad_sum * scale, up_bias.scalar_type());
    }
    if (need_modulator) {
      const at::Tensor up_acc = as_dtype(up_weight, acc);
      at::Tensor dscale;
      if (per_channel) {
        dscale = (P * up_acc).sum(1);
        if (up_bias.defined()) {
          dscale = dscale + grad_sum * as_dtype(up_bias, acc);
        }
      } else {
        dscale = at::dot(P.view(-1), up_acc.reshape(-1));  // reshape: up may be strided
        if (up_bias.defined()) {
          dscale = dscale + at::dot(grad_sum, as_dtype(up_bias, acc));
        }
      }
      out[6] = modulator_grad(as_dtype(dscale, modulator.scalar_type()), modulator, scale, constraint, factor);
    }
  }
  if (need_x || need_down || need_down_bias) {
    const at::Tensor c = as_dtype(scale, grad_out.scalar_type());
    const at::Tensor grad_a =
        per_channel ? at::mm(grad_out, up_weight * c.unsqueeze(1)) : at::mm(grad_out, up_weight) * c;
    const at::Tensor dz = relu ? at::threshold_backward(grad_a, a, 0) : at::gelu_backward(grad_a, z);
    if (need_down) {
      out[2] = at::mm(transposed(dz), x2d);
    }
    if (need_down_bias) {
      out[3] = dz.sum(0);
    }
    if (need_x) {
      out[0] = (residual_is_x ? at::addmm(grad_out, dz, down_weight) : at::mm(dz, down_weight)).view(x.sizes());
    }
  }
  if (needs[1]) {
    out[1] = grad;
  }
  return out;
}

struct AdapterBackward : public LiftedNode<AdapterBackward, 7> {
  SavedVariable x_, down_weight_, down_bias_, up_weight_, up_bias_, modulator_, z_, a_, gamma_;
  Constraint constraint_ = Constraint::kSoftplus;
  double factor_ = 1.0;
  bool relu_ = false, residual_is_x_ = true;

  std::string name() const override {
    return "metapeft::AdapterBackward";
  }

  std::vector<SavedVariable*> saved_variables() {
    return {&x_, &down_weight_, &down_bias_, &up_weight_, &up_bias_, &modulator_, &z_, &a_, &gamma_};
  }

  std::vector<at::IValue> constants() const {
    return {static_cast<int64_t>(constraint_), factor_, relu_, residual_is_x_};
  }

  variable_list apply(variable_list&& grads) override {
    const AdapterSaved saved{x_.unpack(),       down_weight_.unpack(), down_bias_.unpack(), up_weight_.unpack(),
                             up_bias_.unpack(), modulator_.unpack(),   z_.unpack(),         a_.unpack(),
                             gamma_.unpack()};
    return adapter_backward(grads[0], saved, constraint_, factor_, relu_, residual_is_x_, needs());
  }

  static variable_list functional(const variable_list& grads, const std::vector<at::IValue>& args) {
    LiftedReader read(args);
    AdapterSaved saved;
    for (at::Tensor* t : {&saved.x, &saved.down_weight, &saved.down_bias, &saved.up_weight, &saved.up_bias,
                          &saved.modulator, &saved.z, &saved.a, &saved.gamma}) {
      *t = read.tensor();
    }
    const auto constraint = static_cast<Constraint>(read.packed.unpack<int64_t>());
    const double factor = read.packed.unpack<double>();
    const bool relu = read.packed.unpack<bool>(), residual_is_x = read.packed.unpack<bool>();
    return adapter_backward(grads[0], saved, constraint, factor, relu, residual_is_x, read.needs<7>());
  }
};

at::Tensor adapter_autograd(const at::Tensor& x, const std::optional<at::Tensor>& residual,
                            const at::Tensor& down_weight, const std::optional<at::Tensor>& down_bias,
                            const at::Tensor& up_weight, const std::optional<at::Tensor>& up_bias,
                            const at::Tensor& modulator, c10::string_view constraint_name, double factor,
                            c10::string_view activation_name) {
  const Constraint constraint = parse_constraint(constraint_name);
  const bool relu = parse_relu(activation_name);
  const bool record =
      torch::autograd::compute_requires_grad(x, residual, down_weight, down_bias, up_weight, up_bias, modulator);
  AdapterForward f;
  at::Tensor out;
  {  // below autograd: out is no tracked view of the (M, D) result
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    const at::Tensor x2d = rows(x);
    f = adapter_forward(x2d, residual.has_value() ? rows(*residual) : x2d, down_weight, down_bias, up_weight,
                        up_bias, modulator, constraint, factor, relu);
    out = x.dim() == 2 ? f.out : f.out.view(x.sizes());
  }
  if (record) {
    NodePtr node = make_node<AdapterBackward>();
    auto* backward = static_cast<AdapterBackward*>(node.get());
    backward->set_next_edges(
        torch::autograd::collect_next_edges(x, residual, down_weight, down_bias, up_weight, up_bias, modulator));
    backward->x_ = SavedVariable(x, false);
    backward->down_weight_ = SavedVariable(down_weight, false);
    backward->down_bias_ = SavedVariable(down_bias, false);
    backward->up_weight_ = SavedVariable(up_weight, false);
    backward->up_bias_ = SavedVariable(up_bias, false);
    backward->modulator_ = SavedVariable(modulator, false);
    if (!relu) {  // relu's derivative is read from a
      backward->z_ = SavedVariable(f.z, false);
    }
    backward->a_ = SavedVariable(f.a, false);
    backward->gamma_ = SavedVariable(f.gamma, false);
    backward->constraint_ = constraint;
    backward->factor_ = factor;
    backward->relu_ = relu;
    backward->residual_is_x_ = !residual.has_value();
    torch::autograd::set_history(out, node);
  }
  return out;
}

at::Tensor adapter_forward_only(const at::Tensor& x, const std::optional<at::Tensor>& residual,
                                const at::Tensor& down_weight, const std::optional<at::Tensor>& down_bias,
                                const at::Tensor& up_weight, const std::optional<at::Tensor>& up_bias,
                                const at::Tensor& modulator, c10::string_view constraint, double factor,
                                c10::string_view activation_name) {
  const at::Tensor x2d = rows(x);
  const at::Tensor out = adapter_forward(x2d, residual.has_value() ? rows(*residual) : x2d, down_weight, down_bias,
                                         up_weight, up_bias, modulator, parse_constraint(constraint), factor,
                                         parse_relu(activation_name)).out;
  return x.dim() == 2 ? out : out.view(x.sizes());
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
