// dtype dispatch shared by the launchers: calls fn with a value of the CUDA element type
// (float, __half, __nv_bfloat16) matching a torch dtype. Lean: no torch/extension.h.
#pragma once

#include <c10/core/ScalarType.h>
#include <c10/util/Exception.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

namespace ptk {

template <typename Fn>
void dispatch_float_dtype(const char* op, at::ScalarType dt, Fn&& fn) {
  switch (dt) {
    case at::kFloat: fn(float{}); break;
    case at::kHalf: fn(__half{}); break;
    case at::kBFloat16: fn(__nv_bfloat16{}); break;
    default: TORCH_CHECK(false, op, " (cuda backend): dtype must be float32, float16 or bfloat16, got ", dt);
  }
}

}  // namespace ptk
