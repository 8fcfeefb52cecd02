// Host harness: the csrc/kernels/*.cuh kernels compiled by g++ against simt_shim.h, exposed to
// Python (ctypes) through a flat C ABI. tests/test_cuda_harness.py builds and loads it.
//
// Arguments are packed by tests/host_harness/harness.py:
//   ptrs   : q k v prefix_k prefix_v prefix_index key_padding_mask attn_bias out lse grad_out
//            grad_lse delta dq dk dv dprefix_k dprefix_v
//   ints   : B Hq Hkv Nq Nk P D T prefix_mode causal window, then the strides of q k v prefix_k
//            prefix_v out grad_out attn_bias (4 each) and key_padding_mask (2)
//   floats : softcap scale
// dtype: 0 float32, 1 float16, 2 bfloat16.
#include "gpc_cell.cuh"
#include "prefix_attention_bwd.cuh"
#include "prefix_attention_fwd_wmma.cuh"

#include <cmath>
#include <exception>
#include <vector>
#include <cstdio>

namespace {

ptk::AttnParams unpack(const void* const* ptrs, const int64_t* ints, const double* floats) {
  ptk::AttnParams p;
  p.q = ptrs[0];
  p.k = ptrs[1];
  p.v = ptrs[2];
  p.prefix_k = ptrs[3];
  p.prefix_v = ptrs[4];
  p.prefix_index = static_cast<const int64_t*>(ptrs[5]);
  p.key_padding_mask = static_cast<const uint8_t*>(ptrs[6]);
  p.attn_bias = static_cast<const float*>(ptrs[7]);
  p.out = const_cast<void*>(ptrs[8]);
  p.lse = static_cast<float*>(const_cast<void*>(ptrs[9]));
  p.grad_out = ptrs[10];
  p.grad_lse = static_cast<const float*>(ptrs[11]);
  p.delta = static_cast<float*>(const_cast<void*>(ptrs[12]));
  p.dq = const_cast<void*>(ptrs[13]);
  p.dk = const_cast<void*>(ptrs[14]);
  p.dv = const_cast<void*>(ptrs[15]);
  p.dprefix_k = const_cast<void*>(ptrs[16]);
  p.dprefix_v = const_cast<void*>(ptrs[17]);
  p.B = ints[0];
  p.Hq = ints[1];
  p.Hkv = ints[2];
  p.Nq = ints[3];
  p.Nk = ints[4];
  p.P = ints[5];
  p.D = ints[6];
  p.T = ints[7];
  p.prefix_mode = ints[8];
  p.causal = ints[9] != 0;
  p.window = ints[10];
  int64_t* strides[] = {p.q_stride, p.k_stride, p.v_stride, p.pk_stride, p.pv_stride, p.out_stride, p.dout_stride, p.bias_stride};
  int at = 11;
  for (int64_t* s : strides)
    for (int d = 0; d < 4; ++d) s[d] = ints[at++];
  p.mask_stride[0] = ints[at++];
  p.mask_stride[1] = ints[at++];
  p.softcap = static_cast<float>(floats[0]);
  p.scale = static_cast<float>(floats[1]);
  return p;
}

template <template <typename> class Fn, typename... Extra>
int dispatch(int dtype, const ptk::AttnParams& p, Extra... extra) {
  try {
    if (dtype == 0) Fn<float>::run(p, extra...);
    else if (dtype == 1) Fn<__half>::run(p, extra...);
    else if (dtype == 2) Fn<__nv_bfloat16>::run(p, extra...);
    else return 2;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "harness: %s\n", e.what());
    return 1;
  }
  return 0;
}

// The launcher's split-K decision (or a forced split count), with host scratch for the partials.
template <typename T>
struct Fwd {
  static void run(const ptk::AttnParams& p_in, int force_splits) {
    ptk::AttnParams p = p_in;
    p.num_splits = force_splits > 0 ? force_splits : ptk::prefix_attention_decode_splits(p);
    std::vector<float> part_out, part_lse;
    if (p.num_splits > 1) {
      p.split_len = ptk::prefix_attention_split_len(p, p.num_splits);
      const size_t rows = static_cast<size_t>(p.num_splits) * p.B * p.Hq * p.Nq;
      part_out.assign(rows * p.D, std::nanf(""));  // poisoned: every entry must be written
      part_lse.assign(rows, std::nanf(""));
      p.part_out = part_out.data();
      p.part_lse = part_lse.data();
    }
    ptk::launch_prefix_attention_fwd<T>(p, nullptr);
  }
};

template <typename T>
struct Bwd {
  static void run(const ptk::AttnParams& p, bool need_dq) { ptk::launch_prefix_attention_bwd<T>(p, need_dq, nullptr); }
};

}  // namespace

extern "C" int ptk_attn_bwd(int dtype, const void* const* ptrs, const int64_t* ints, const double* floats, int need_dq) {
  return dispatch<Bwd>(dtype, unpack(ptrs, ints, floats), need_dq != 0);
}

extern "C" int ptk_attn_fwd(int dtype, const void* const* ptrs, const int64_t* ints, const double* floats,
                            int force_splits) {
  return dispatch<Fwd>(dtype, unpack(ptrs, ints, floats), force_splits);
}

// GPC cell. ptrs: update state weight bias new_state preact grad_new_state da gu gs grad_update
// grad_state grad_weight grad_bias; ints: B m d variant shared_state, strides of update (3),
// state (3), weight (2), bias (1), grad_new_state (3).
namespace {
ptk::GpcParams unpack_gpc(const void* const* ptrs, const int64_t* ints) {
  ptk::GpcParams p;
  p.update = ptrs[0];
  p.state = ptrs[1];
  p.weight = ptrs[2];
  p.bias = ptrs[3];
  p.new_state = const_cast<void*>(ptrs[4]);
  p.preact = static_cast<float*>(const_cast<void*>(ptrs[5]));
  p.grad_new_state = ptrs[6];
  p.da = static_cast<float*>(const_cast<void*>(ptrs[7]));
  p.gu = static_cast<float*>(const_cast<void*>(ptrs[8]));
  p.gs = static_cast<float*>(const_cast<void*>(ptrs[9]));
  p.grad_update = const_cast<void*>(ptrs[10]);
  p.grad_state = const_cast<void*>(ptrs[11]);
  p.grad_weight = const_cast<void*>(ptrs[12]);
  p.grad_bias = const_cast<void*>(ptrs[13]);
  p.B = ints[0];
  p.m = ints[1];
  p.d = ints[2];
  p.variant = ints[3];
  p.shared_state = ints[4] != 0;
  int at = 5;
  for (int i = 0; i < 3; ++i) p.update_stride[i] = ints[at++];
  for (int i = 0; i < 3; ++i) p.state_stride[i] = ints[at++];
  for (int i = 0; i < 2; ++i) p.weight_stride[i] = ints[at++];
  p.bias_stride = ints[at++];
  for (int i = 0; i < 3; ++i) p.gns_stride[i] = ints[at++];
  return p;
}

template <typename T>
struct GpcFwd {
  static void run(const ptk::GpcParams& p) { ptk::launch_gpc_cell_fwd<T>(p, nullptr); }
};
template <typename T>
struct GpcBwd {
  static void run(const ptk::GpcParams& p) { ptk::launch_gpc_cell_bwd<T>(p, nullptr); }
};

template <template <typename> class Fn>
int dispatch_gpc(int dtype, const ptk::GpcParams& p) {
  try {
    if (dtype == 0) Fn<float>::run(p);
    else if (dtype == 1) Fn<__half>::run(p);
    else if (dtype == 2) Fn<__nv_bfloat16>::run(p);
    else return 2;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "harness: %s\n", e.what());
    return 1;
  }
  return 0;
}
}  // namespace

extern "C" int ptk_gpc_fwd(int dtype, const void* const* ptrs, const int64_t* ints) {
  return dispatch_gpc<GpcFwd>(dtype, unpack_gpc(ptrs, ints));
}

extern "C" int ptk_gpc_bwd(int dtype, const void* const* ptrs, const int64_t* ints) {
  return dispatch_gpc<GpcBwd>(dtype, unpack_gpc(ptrs, ints));
}
