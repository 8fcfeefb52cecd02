// ptkernels._C: op schemas for the `ptk` namespace, their Meta (shape) kernels, and a bare module init.
//
// The schemas mirror the Python custom ops in ptkernels/ops/. The CUDA kernels that implement them live in
// csrc/*.cu and register with TORCH_LIBRARY_IMPL(ptk, CUDA, m); this file stays free of CUDA and of
// <torch/extension.h> (pybind11), so it compiles in seconds with a CPU or a CUDA build of torch.
//
// The Meta kernels make the ops work on meta/fake tensors (torch.compile, shape inference). They use SymInt
// sizes so dynamic shapes trace. Because they are registered here, Python code must not call
// torch.library.register_fake on ptk:: ops (torch refuses a second Meta implementation).

#include <Python.h>

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/core/SymInt.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <array>
#include <optional>
#include <string_view>
#include <tuple>
#include <vector>

namespace ptk {
namespace {

using at::Tensor;
using OptTensor = std::optional<Tensor>;

// A zero-element tensor stands for a gradient that output_mask says is not needed.
Tensor empty_grad(const at::TensorOptions& options) { return at::empty({0}, options); }

Tensor like(const Tensor& t) { return at::empty_symint(t.sym_sizes(), t.options()); }

std::tuple<Tensor, Tensor> prefix_attention_fwd_meta(
    const Tensor& q, const Tensor& k, const Tensor& v, const OptTensor& prefix_k, const OptTensor& prefix_v,
    const OptTensor& prefix_index, const OptTensor& key_padding_mask, const OptTensor& attn_bias,
    const OptTensor& dropout_seed, bool causal, int64_t window, double softcap, double scale, double dropout_p) {
  TORCH_CHECK(q.dim() == 4, "prefix_attention_fwd: q must be (B, Hq, Nq, D), got ", q.dim(), " dims");
  // out: (B, Hq, Nq, D) in q's dtype; lse: natural-log logsumexp, float32 (B, Hq, Nq).
  Tensor out = at::empty_symint(q.sym_sizes(), q.options());
  std::vector<c10::SymInt> lse_shape{q.sym_size(0), q.sym_size(1), q.sym_size(2)};
  Tensor lse = at::empty_symint(lse_shape, q.options().dtype(at::kFloat));
  return {out, lse};
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> prefix_attention_bwd_meta(
    const Tensor& grad_out, const OptTensor& grad_lse, const Tensor& q, const Tensor& k, const Tensor& v,
    const OptTensor& prefix_k, const OptTensor& prefix_v, const OptTensor& prefix_index,
    const OptTensor& key_padding_mask, const OptTensor& attn_bias, const OptTensor& dropout_seed,
    const Tensor& out, const Tensor& lse, bool causal, int64_t window, double softcap, double scale,
    double dropout_p, std::array<bool, 5> output_mask) {
  // Gradients have their input's shape and dtype; a gradient that is not asked for (or whose prefix
  // input is None) is an empty (numel 0) tensor.
  auto grad_of = [](bool wanted, const Tensor& input) { return wanted ? like(input) : empty_grad(input.options()); };
  auto grad_of_opt = [&](bool wanted, const OptTensor& input) {
    return (wanted && input.has_value()) ? like(*input) : empty_grad(input.has_value() ? input->options() : q.options());
  };
  return {grad_of(output_mask[0], q), grad_of(output_mask[1], k), grad_of(output_mask[2], v),
          grad_of_opt(output_mask[3], prefix_k), grad_of_opt(output_mask[4], prefix_v)};
}

std::tuple<Tensor, Tensor> gpc_cell_fwd_meta(const Tensor& update, const Tensor& state, const Tensor& weight,
                                             const Tensor& bias, std::string_view variant) {
  TORCH_CHECK(update.dim() == 3, "gpc_cell_fwd: update must be (B, m, d), got ", update.dim(), " dims");
  // new_state: (B, m, d) in update's dtype (state may be (m, d), broadcast over the batch);
  // preact: the gate pre-activations, float32 (B, m, n_gates * d) = weight's column count
  // (2d for "lstm"/"reinject", 3d for "candidate", d for "gru").
  Tensor new_state = at::empty_symint(update.sym_sizes(), update.options());
  std::vector<c10::SymInt> preact_shape{update.sym_size(0), update.sym_size(1), weight.sym_size(1)};
  Tensor preact = at::empty_symint(preact_shape, update.options().dtype(at::kFloat));
  return {new_state, preact};
}

std::tuple<Tensor, Tensor, Tensor, Tensor> gpc_cell_bwd_meta(
    const Tensor& grad_new_state, const Tensor& update, const Tensor& state, const Tensor& weight,
    const Tensor& bias, const Tensor& preact, std::string_view variant, std::array<bool, 4> output_mask) {
  auto grad_of = [](bool wanted, const Tensor& input) { return wanted ? like(input) : empty_grad(input.options()); };
  return {grad_of(output_mask[0], update), grad_of(output_mask[1], state), grad_of(output_mask[2], weight),
          grad_of(output_mask[3], bias)};
}

}  // namespace
}  // namespace ptk

TORCH_LIBRARY(ptk, m) {
  m.def(
      "prefix_attention_fwd(Tensor q, Tensor k, Tensor v, Tensor? prefix_k, Tensor? prefix_v, "
      "Tensor? prefix_index, Tensor? key_padding_mask, Tensor? attn_bias, Tensor? dropout_seed, bool causal, "
      "int window, float softcap, float scale, float dropout_p) -> (Tensor out, Tensor lse)");
  m.def(
      "prefix_attention_bwd(Tensor grad_out, Tensor? grad_lse, Tensor q, Tensor k, Tensor v, Tensor? prefix_k, "
      "Tensor? prefix_v, Tensor? prefix_index, Tensor? key_padding_mask, Tensor? attn_bias, "
      "Tensor? dropout_seed, Tensor out, Tensor lse, bool causal, int window, float softcap, float scale, "
      "float dropout_p, bool[5] output_mask) -> (Tensor dq, Tensor dk, Tensor dv, Tensor dprefix_k, "
      "Tensor dprefix_v)");
  m.def(
      "gpc_cell_fwd(Tensor update, Tensor state, Tensor weight, Tensor bias, str variant) "
      "-> (Tensor new_state, Tensor preact)");
  m.def(
      "gpc_cell_bwd(Tensor grad_new_state, Tensor update, Tensor state, Tensor weight, Tensor bias, "
      "Tensor preact, str variant, bool[4] output_mask) -> (Tensor grad_update, Tensor grad_state, "
      "Tensor grad_weight, Tensor grad_bias)");
}

TORCH_LIBRARY_IMPL(ptk, Meta, m) {
  m.impl("prefix_attention_fwd", &ptk::prefix_attention_fwd_meta);
  m.impl("prefix_attention_bwd", &ptk::prefix_attention_bwd_meta);
  m.impl("gpc_cell_fwd", &ptk::gpc_cell_fwd_meta);
  m.impl("gpc_cell_bwd", &ptk::gpc_cell_bwd_meta);
}

// `import ptkernels._C` only has to load this library so the static registrars above run; the module
// itself is empty (no pybind11). Ops are called as torch.ops.ptk.<name>(...).
PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module_def = {
      PyModuleDef_HEAD_INIT,
      "_C",                                                   /* m_name */
      "ptkernels native library: registers torch.ops.ptk.*",  /* m_doc */
      -1,                                                     /* m_size */
      nullptr,                                                /* m_methods */
  };
  return PyModule_Create(&module_def);
}
