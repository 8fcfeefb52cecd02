// The prefix_attention dispatchers: which kernel family runs a call, by dtype and shape. The
// kernels live in their own headers; this is the only header the launch code (csrc/*.cu, the host
// harness, the compile check) includes, and no kernel header includes it.
//
//   forward  float32            -> CUDA cores (prefix_attention_fwd.cuh); fp32 tensor-core
//                                   products would be TF32, less precise than the fp32 contract
//            float16 / bfloat16 -> mma.sync FlashAttention-2 kernel (prefix_attention_fwd_mma.cuh)
//            split-K decode (p.num_splits > 1): the same kernels over key shares + merge; the
//                                   16-bit kernel packs a GQA group's query heads into its rows
//   backward float32            -> CUDA cores (prefix_attention_bwd.cuh)
//            float16 / bfloat16, D <= 128 -> mma.sync FlashAttention-2 kernels
//                                   (prefix_attention_bwd_mma.cuh); the prefix gradient in
//                                   p.prefix_splits shares (the caller sets it with
//                                   prefix_grad_splits and allocates prefix_grad_workspace)
//            float16 / bfloat16, D > 128 -> the same structure re-tiled for D = 256
//                                   (prefix_attention_bwd_mma_wide.cuh): warp pairs split the
//                                   head dim, since two D-wide accumulators per key do not fit
#pragma once

#include "prefix_attention_bwd.cuh"
#include "prefix_attention_bwd_mma.cuh"
#include "prefix_attention_bwd_mma_wide.cuh"
#include "prefix_attention_fwd.cuh"
#include "prefix_attention_fwd_mma.cuh"

#include <type_traits>

namespace ptk {

template <typename T>
inline void launch_prefix_attention_fwd(const AttnParams& p, ptk_stream_t stream) {
  if constexpr (std::is_same_v<T, float>) {
    launch_prefix_attention_fwd_simt<T>(p, stream);
  } else {
    launch_prefix_attention_fwd_mma<T>(p, stream);  // split-K decode included (packed GQA heads)
  }
}

template <typename T>
inline void launch_prefix_attention_bwd(const AttnParams& p, bool need_dq, ptk_stream_t stream) {
  if constexpr (std::is_same_v<T, float>)
    launch_prefix_attention_bwd_simt<T>(p, need_dq, stream);
  else if (p.D <= 128)
    launch_prefix_attention_bwd_mma<T>(p, need_dq, stream);
  else
    launch_prefix_attention_bwd_wide<T>(p, need_dq, stream);
}

}  // namespace ptk
