// The GPC cell dispatchers: which kernels run a call, by dtype and variant. Kernels live in
// gpc_cell.cuh (CUDA-core GEMM, gate backward, reductions) and gpc_cell_mma.cuh (tensor-core
// GEMMs); this is the header the launch code includes, and no kernel header includes it.
//   forward  float32            -> CUDA-core GEMM + gating epilogue (fp32 tensor-core products
//                                   would be TF32, less precise than the fp32 contract)
//            float16 / bfloat16 -> mma.sync GEMM + the same gating epilogue, fused
//   backward float32            -> CUDA-core kernels (gpc_cell.cuh)
//            float16 / bfloat16 -> the same gate backward and db on CUDA cores, dX and dW on the
//                                   mma.sync GEMM
#pragma once

#include "gpc_cell.cuh"
#include "gpc_cell_mma.cuh"

#include <type_traits>

namespace ptk {

namespace gpc {
template <typename T, int VARIANT>
inline void fwd_dispatch(const GpcParams& p, ptk_stream_t stream) {
  if constexpr (std::is_same_v<T, float>)
    fwd_variant<T, VARIANT>(p, stream);
  else
    fwd_variant_mma<T, VARIANT>(p, stream);
}
template <typename T, int VARIANT>
inline void bwd_dispatch(const GpcParams& p, ptk_stream_t stream) {
  if constexpr (std::is_same_v<T, float>)
    bwd_variant<T, VARIANT>(p, stream);
  else
    bwd_variant_mma<T, VARIANT>(p, stream);
}
}  // namespace gpc

template <typename T>
inline void launch_gpc_cell_fwd(const GpcParams& p, ptk_stream_t stream) {
  switch (p.variant) {
    case kLstm: gpc::fwd_dispatch<T, kLstm>(p, stream); break;
    case kCandidate: gpc::fwd_dispatch<T, kCandidate>(p, stream); break;
    case kGru: gpc::fwd_dispatch<T, kGru>(p, stream); break;
    default: gpc::fwd_dispatch<T, kReinject>(p, stream); break;
  }
}

// Needs p.da (M x G*d), p.gu, p.gs (M x d) float32 scratch; writes the gradients whose pointers are set.
template <typename T>
inline void launch_gpc_cell_bwd(const GpcParams& p, ptk_stream_t stream) {
  switch (p.variant) {
    case kLstm: gpc::bwd_dispatch<T, kLstm>(p, stream); break;
    case kCandidate: gpc::bwd_dispatch<T, kCandidate>(p, stream); break;
    case kGru: gpc::bwd_dispatch<T, kGru>(p, stream); break;
    default: gpc::bwd_dispatch<T, kReinject>(p, stream); break;
  }
}

}  // namespace ptk
