// CUDA kernels of ptkernels::gpc_cell_fwd_cuda / _bwd_cuda (the public ops minus `backend`): checks, GpcParams;
// the kernels are in csrc/kernels/gpc_cell*.cuh, the dispatch in gpc_cell_launch.cuh.
// Lean headers only (no torch/extension.h).
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <array>
#include <string_view>
#include <tuple>

#include "dispatch.h"
#include "kernels/gpc_cell_launch.cuh"

namespace ptk {
namespace {

using at::Tensor;

int parse_variant(std::string_view variant) {
  if (variant == "lstm") return kLstm;
  if (variant == "candidate") return kCandidate;
  if (variant == "gru") return kGru;
  if (variant == "reinject") return kReinject;
  TORCH_CHECK(false, "gpc_cell: variant must be one of 'candidate', 'gru', 'lstm', 'reinject', got '", variant, "'");
}

GpcParams prepare(const Tensor& update, const Tensor& state, const Tensor& weight, const Tensor& bias,
                  std::string_view variant) {
  TORCH_CHECK(update.is_cuda(), "gpc_cell (cuda backend): update must be a CUDA tensor");
  TORCH_CHECK(update.dim() == 3, "gpc_cell: update must be (B, m, d)");
  TORCH_CHECK(state.dim() == 2 || state.dim() == 3, "gpc_cell: state must be (B, m, d) or (m, d)");
  for (const Tensor* t : {&state, &weight, &bias})
    TORCH_CHECK(t->scalar_type() == update.scalar_type() && t->device() == update.device(),
                "gpc_cell: state, weight and bias must have update's dtype and device");
  GpcParams p;
  p.variant = parse_variant(variant);
  p.B = update.size(0);
  p.m = update.size(1);
  p.d = update.size(2);
  const int g = gpc_gates(p.variant);
  TORCH_CHECK(weight.dim() == 2 && weight.size(0) == 2 * p.d && weight.size(1) == g * p.d,
              "gpc_cell: weight must be (2d, n_gates * d)");
  TORCH_CHECK(bias.dim() == 1 && bias.size(0) == g * p.d, "gpc_cell: bias must be (n_gates * d,)");
  TORCH_CHECK(static_cast<int64_t>(p.B) * p.m <= 16 * 65535, "gpc_cell (cuda backend): B * m too large");
  p.update = update.data_ptr();
  p.state = state.data_ptr();
  p.weight = weight.data_ptr();
  p.bias = bias.data_ptr();
  for (int i = 0; i < 3; ++i) p.update_stride[i] = update.stride(i);
  p.shared_state = state.dim() == 2;
  if (p.shared_state) {
    p.state_stride[0] = 0;
    p.state_stride[1] = state.stride(0);
    p.state_stride[2] = state.stride(1);
  } else {
    for (int i = 0; i < 3; ++i) p.state_stride[i] = state.stride(i);
  }
  p.weight_stride[0] = weight.stride(0);
  p.weight_stride[1] = weight.stride(1);
  p.bias_stride = bias.stride(0);
  return p;
}

std::tuple<Tensor, Tensor> gpc_cell_fwd_cuda(const Tensor& update, const Tensor& state, const Tensor& weight,
                                             const Tensor& bias, c10::string_view variant) {
  const c10::cuda::CUDAGuard guard(update.device());
  GpcParams p = prepare(update, state, weight, bias, std::string_view(variant.data(), variant.size()));
  const int g = gpc_gates(p.variant);
  Tensor new_state = at::empty(update.sizes(), update.options());
  // preact in float32: (B, m, n_gates * d)
  Tensor preact = at::empty({update.size(0), update.size(1), g * update.size(2)}, update.options().dtype(at::kFloat));
  p.new_state = new_state.data_ptr();
  p.preact = preact.data_ptr<float>();
  auto stream = c10::cuda::getCurrentCUDAStream().stream();
  dispatch_float_dtype("gpc_cell", update.scalar_type(), [&](auto tag) { launch_gpc_cell_fwd<decltype(tag)>(p, stream); });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {new_state, preact};
}

std::tuple<Tensor, Tensor, Tensor, Tensor> gpc_cell_bwd_cuda(const Tensor& grad_new_state, const Tensor& update,
                                                             const Tensor& state, const Tensor& weight,
                                                             const Tensor& bias, const Tensor& preact,
                                                             c10::string_view variant, std::array<bool, 4> output_mask) {
  const c10::cuda::CUDAGuard guard(update.device());
  GpcParams p = prepare(update, state, weight, bias, std::string_view(variant.data(), variant.size()));
  const int g = gpc_gates(p.variant);
  TORCH_CHECK(grad_new_state.sizes() == update.sizes() && grad_new_state.scalar_type() == update.scalar_type(),
              "gpc_cell_bwd: grad_new_state must have update's shape and dtype");
  const int64_t rows = static_cast<int64_t>(p.B) * p.m;
  TORCH_CHECK(preact.numel() == rows * g * p.d, "gpc_cell_bwd: preact must be (B, m, n_gates * d)");
  auto alloc = [&](const Tensor& like, bool need) {
    return need ? at::empty(like.sizes(), like.options()) : at::empty({0}, update.options());
  };
  Tensor gu = alloc(update, output_mask[0]), gs = alloc(state, output_mask[1]);
  Tensor gw = alloc(weight, output_mask[2]), gb = alloc(bias, output_mask[3]);
  if (!(output_mask[0] || output_mask[1] || output_mask[2] || output_mask[3])) return {gu, gs, gw, gb};
  if (rows == 0 || p.d == 0) {  // nothing to reduce: the gradients are zero
    for (Tensor* t : {&gu, &gs, &gw, &gb})
      if (t->numel()) t->zero_();
    return {gu, gs, gw, gb};
  }
  Tensor preact_f = preact.to(at::kFloat).contiguous();
  auto f32 = update.options().dtype(at::kFloat);
  Tensor da = at::empty({rows, g * p.d}, f32), gu_direct = at::empty({rows, p.d}, f32),
         gs_direct = at::empty({rows, p.d}, f32);
  p.grad_new_state = grad_new_state.data_ptr();
  for (int i = 0; i < 3; ++i) p.gns_stride[i] = grad_new_state.stride(i);
  p.preact = preact_f.data_ptr<float>();
  p.da = da.data_ptr<float>();
  p.gu = gu_direct.data_ptr<float>();
  p.gs = gs_direct.data_ptr<float>();
  p.grad_update = output_mask[0] ? gu.data_ptr() : nullptr;
  p.grad_state = output_mask[1] ? gs.data_ptr() : nullptr;
  p.grad_weight = output_mask[2] ? gw.data_ptr() : nullptr;
  p.grad_bias = output_mask[3] ? gb.data_ptr() : nullptr;
  auto stream = c10::cuda::getCurrentCUDAStream().stream();
  dispatch_float_dtype("gpc_cell", update.scalar_type(), [&](auto tag) { launch_gpc_cell_bwd<decltype(tag)>(p, stream); });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {gu, gs, gw, gb};
}

}  // namespace
}  // namespace ptk

// Kernels for the kernel entries ptkernels::<op>_cuda (schemas: ptkernels/ops/_kernel_entries.py).
TORCH_LIBRARY_IMPL(ptkernels, CUDA, m) {
  m.impl("gpc_cell_fwd_cuda", &ptk::gpc_cell_fwd_cuda);
  m.impl("gpc_cell_bwd_cuda", &ptk::gpc_cell_bwd_cuda);
}
