// CUDA kernels of ptkernels::prefix_attention_fwd_cuda / _bwd_cuda (the public ops minus `backend`): checks,
// output allocation and the AttnParams block; the kernels are in csrc/kernels/prefix_attention_*.cuh.
// Lean headers only (no torch/extension.h): this file compiles in ~30 s instead of ~3 min.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <array>
#include <optional>
#include <tuple>

#include "dispatch.h"
#include "kernels/prefix_attention_launch.cuh"

namespace ptk {
namespace {

using at::Tensor;
using OptTensor = std::optional<Tensor>;

void copy_strides(int64_t* dst, const Tensor& t) {
  for (int64_t d = 0; d < t.dim(); ++d) dst[d] = t.stride(d);
}

void check_dtype(const Tensor& q) {
  const auto dt = q.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kHalf || dt == at::kBFloat16,
              "prefix_attention (cuda backend): q must be float32, float16 or bfloat16, got ", dt);
}

// Fills the common part of AttnParams; keeps normalized copies alive in `keep`.
struct Prepared {
  AttnParams p;
  Tensor prefix_index, mask, bias;
};

Prepared prepare(const Tensor& q, const Tensor& k, const Tensor& v, const OptTensor& prefix_k,
                 const OptTensor& prefix_v, const OptTensor& prefix_index, const OptTensor& key_padding_mask,
                 const OptTensor& attn_bias, bool causal, int64_t window, double softcap, double scale,
                 double dropout_p) {
  TORCH_CHECK(dropout_p == 0.0,
              "prefix_attention (cuda backend): dropout_p > 0 is not implemented by the CUDA kernels; use the "
              "triton or eager backend for attention dropout");
  check_dtype(q);
  TORCH_CHECK(q.is_cuda() && k.is_cuda() && v.is_cuda(), "prefix_attention (cuda backend): tensors must be on CUDA");
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && v.dim() == 4, "prefix_attention: q, k, v must be 4-d");
  TORCH_CHECK(k.scalar_type() == q.scalar_type() && v.scalar_type() == q.scalar_type(),
              "prefix_attention: q, k, v must share a dtype");
  Prepared r;
  AttnParams& p = r.p;
  p.B = q.size(0);
  p.Hq = q.size(1);
  p.Nq = q.size(2);
  p.D = q.size(3);
  p.Hkv = k.size(1);
  p.Nk = k.size(2);
  TORCH_CHECK(p.D >= 1 && p.D <= 256, "prefix_attention (cuda backend): head dim must be in [1, 256], got ", p.D);
  TORCH_CHECK(p.Hkv > 0 && p.Hq % p.Hkv == 0, "prefix_attention: Hq must be a multiple of Hkv");
  TORCH_CHECK(static_cast<int64_t>(p.B) * p.Hq <= 65535, "prefix_attention (cuda backend): B * Hq must be <= 65535");
  p.q = q.data_ptr();
  p.k = k.data_ptr();
  p.v = v.data_ptr();
  copy_strides(p.q_stride, q);
  copy_strides(p.k_stride, k);
  copy_strides(p.v_stride, v);
  if (prefix_k.has_value() && prefix_k->size(2) > 0) {
    TORCH_CHECK(prefix_v.has_value(), "prefix_attention: prefix_v missing");
    TORCH_CHECK(prefix_k->dim() == 4 && prefix_v->dim() == 4, "prefix_attention: prefix_k/v must be (T, Hkv, P, D)");
    TORCH_CHECK(prefix_k->scalar_type() == q.scalar_type() && prefix_v->scalar_type() == q.scalar_type(),
                "prefix_attention: prefix_k/v must have q's dtype");
    p.T = prefix_k->size(0);
    p.P = prefix_k->size(2);
    TORCH_CHECK(p.T <= 65535, "prefix_attention (cuda backend): at most 65535 prefixes");
    p.prefix_k = prefix_k->data_ptr();
    p.prefix_v = prefix_v->data_ptr();
    copy_strides(p.pk_stride, *prefix_k);
    copy_strides(p.pv_stride, *prefix_v);
    if (prefix_index.has_value()) {
      r.prefix_index = prefix_index->to(at::kLong).contiguous();
      p.prefix_index = r.prefix_index.data_ptr<int64_t>();
      p.prefix_mode = kBank;
    } else {
      p.prefix_mode = p.T == 1 ? kShared : kPerRow;
      TORCH_CHECK(p.T == 1 || p.T == p.B, "prefix_attention: a prefix without prefix_index must have T == 1 or T == B");
    }
  }
  if (key_padding_mask.has_value()) {
    r.mask = key_padding_mask->scalar_type() == at::kBool ? *key_padding_mask : key_padding_mask->ne(0);
    p.key_padding_mask = reinterpret_cast<const uint8_t*>(r.mask.data_ptr<bool>());
    copy_strides(p.mask_stride, r.mask);
  }
  if (attn_bias.has_value()) {
    TORCH_CHECK(attn_bias->dim() == 4, "prefix_attention: attn_bias must be (B, Hq, Nq, P + Nk) (expanded)");
    r.bias = attn_bias->scalar_type() == at::kFloat ? *attn_bias : attn_bias->to(at::kFloat);
    p.attn_bias = r.bias.data_ptr<float>();
    copy_strides(p.bias_stride, r.bias);
  }
  p.causal = causal;
  p.window = static_cast<int>(window);
  p.softcap = static_cast<float>(softcap);
  p.scale = static_cast<float>(scale);
  return r;
}

std::tuple<Tensor, Tensor> prefix_attention_fwd_cuda(const Tensor& q, const Tensor& k, const Tensor& v,
                                                     const OptTensor& prefix_k, const OptTensor& prefix_v,
                                                     const OptTensor& prefix_index, const OptTensor& key_padding_mask,
                                                     const OptTensor& attn_bias, const OptTensor& dropout_seed,
                                                     bool causal, int64_t window, double softcap, double scale,
                                                     double dropout_p) {
  const c10::cuda::CUDAGuard guard(q.device());
  Prepared r = prepare(q, k, v, prefix_k, prefix_v, prefix_index, key_padding_mask, attn_bias, causal, window, softcap,
                       scale, dropout_p);
  Tensor out = at::empty(q.sizes(), q.options());
  Tensor lse = at::empty({q.size(0), q.size(1), q.size(2)}, q.options().dtype(at::kFloat));
  r.p.out = out.data_ptr();
  r.p.lse = lse.data_ptr<float>();
  // Decode-like calls split the keys across blocks (split-K) and merge the partials by lse.
  Tensor part_out, part_lse;
  int sms = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, q.get_device()));
  r.p.num_splits = prefix_attention_decode_splits(r.p, sms, q.scalar_type() != at::kFloat);
  if (r.p.num_splits > 1) {
    r.p.split_len = prefix_attention_split_len(r.p, r.p.num_splits);
    auto f32 = q.options().dtype(at::kFloat);
    part_out = at::empty({r.p.num_splits, q.size(0), q.size(1), q.size(2), q.size(3)}, f32);
    part_lse = at::empty({r.p.num_splits, q.size(0), q.size(1), q.size(2)}, f32);
    r.p.part_out = part_out.data_ptr<float>();
    r.p.part_lse = part_lse.data_ptr<float>();
  }
  auto stream = c10::cuda::getCurrentCUDAStream().stream();
  dispatch_float_dtype("prefix_attention", q.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    launch_prefix_attention_fwd<T>(r.p, stream);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {out, lse};
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> prefix_attention_bwd_cuda(
    const Tensor& grad_out, const OptTensor& grad_lse, const Tensor& q, const Tensor& k, const Tensor& v,
    const OptTensor& prefix_k, const OptTensor& prefix_v, const OptTensor& prefix_index,
    const OptTensor& key_padding_mask, const OptTensor& attn_bias, const OptTensor& dropout_seed, const Tensor& out,
    const Tensor& lse, bool causal, int64_t window, double softcap, double scale, double dropout_p,
    std::array<bool, 5> output_mask) {
  const c10::cuda::CUDAGuard guard(q.device());
  Prepared r = prepare(q, k, v, prefix_k, prefix_v, prefix_index, key_padding_mask, attn_bias, causal, window, softcap,
                       scale, dropout_p);
  AttnParams& p = r.p;
  TORCH_CHECK(grad_out.sizes() == q.sizes() && out.sizes() == q.sizes(), "prefix_attention_bwd: grad_out/out must have q's shape");
  TORCH_CHECK(grad_out.scalar_type() == q.scalar_type() && out.scalar_type() == q.scalar_type(),
              "prefix_attention_bwd: grad_out/out must have q's dtype");
  const bool has_prefix = p.prefix_mode != kNoPrefix;
  const bool need_dq = output_mask[0], need_dk = output_mask[1], need_dv = output_mask[2];
  const bool need_dpk = output_mask[3] && has_prefix, need_dpv = output_mask[4] && has_prefix;

  // The kernels write every element of what they compute; an empty problem computes nothing.
  const bool empty_problem = p.Nq == 0 || p.B * p.Hq == 0;
  auto alloc = [&](const Tensor& like, bool need) {
    if (!need) return at::empty({0}, q.options());
    return empty_problem ? at::zeros(like.sizes(), like.options()) : at::empty(like.sizes(), like.options());
  };
  Tensor dq = alloc(q, need_dq), dk = alloc(k, need_dk), dv = alloc(v, need_dv);
  Tensor dpk = has_prefix ? alloc(*prefix_k, need_dpk) : at::empty({0}, q.options());
  Tensor dpv = has_prefix ? alloc(*prefix_v, need_dpv) : at::empty({0}, q.options());

  Tensor lse_f = lse.to(at::kFloat).contiguous();
  Tensor glse;
  if (grad_lse.has_value()) {
    glse = grad_lse->to(at::kFloat).contiguous();
    p.grad_lse = glse.data_ptr<float>();
  }
  Tensor delta = at::empty({q.size(0), q.size(1), q.size(2)}, q.options().dtype(at::kFloat));
  p.out = const_cast<void*>(out.data_ptr());
  copy_strides(p.out_stride, out);
  p.grad_out = grad_out.data_ptr();
  copy_strides(p.dout_stride, grad_out);
  p.lse = lse_f.data_ptr<float>();
  p.delta = delta.data_ptr<float>();
  p.dq = need_dq ? dq.data_ptr() : nullptr;
  p.dk = need_dk ? dk.data_ptr() : nullptr;
  p.dv = need_dv ? dv.data_ptr() : nullptr;
  p.dprefix_k = need_dpk ? dpk.data_ptr() : nullptr;
  p.dprefix_v = need_dpv ? dpv.data_ptr() : nullptr;
  // The tensor-core backward (16-bit) cuts the prefix-gradient work into shares that fill the
  // device (about 2 blocks per SM); the fp32 partials are reduced in a fixed order.
  Tensor part_dpk, part_dpv;
  if (!empty_problem && (need_dpk || need_dpv) && q.scalar_type() != at::kFloat) {
    int sms = 0;
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, q.get_device()));
    p.prefix_splits = prefix_grad_splits(p, sms);
    if (p.prefix_splits > 1) {
      const int64_t n = prefix_grad_workspace(p);
      part_dpk = at::empty({n}, q.options().dtype(at::kFloat));
      part_dpv = at::empty({n}, q.options().dtype(at::kFloat));
      p.part_dpk = part_dpk.data_ptr<float>();
      p.part_dpv = part_dpv.data_ptr<float>();
    }
  }
  if (!empty_problem && (need_dq || need_dk || need_dv || need_dpk || need_dpv)) {
    auto stream = c10::cuda::getCurrentCUDAStream().stream();
    dispatch_float_dtype("prefix_attention", q.scalar_type(), [&](auto tag) {
      using T = decltype(tag);
      launch_prefix_attention_bwd<T>(p, need_dq, stream);
    });
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  return {dq, dk, dv, dpk, dpv};
}

}  // namespace
}  // namespace ptk

// Kernels for the kernel entries ptkernels::<op>_cuda (schemas: ptkernels/ops/_kernel_entries.py).
TORCH_LIBRARY_IMPL(ptkernels, CUDA, m) {
  m.impl("prefix_attention_fwd_cuda", &ptk::prefix_attention_fwd_cuda);
  m.impl("prefix_attention_bwd_cuda", &ptk::prefix_attention_bwd_cuda);
}
