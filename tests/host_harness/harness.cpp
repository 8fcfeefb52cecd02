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
#include "gpc_cell_launch.cuh"
#include "prefix_attention_launch.cuh"

#include <cmath>
#include <exception>
#include <vector>
#include <cstdio>
#include <cstring>
#include <string>

namespace {

// The message of the last failed call (a hazard found by the tensor-core shim, a bad argument).
std::string& last_error() {
  static std::string msg;
  return msg;
}

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
    last_error() = e.what();
    return 1;
  }
  return 0;
}

// The launcher's split-K decision (or a forced split count), with host scratch for the partials.
template <typename T>
struct Fwd {
  static void run(const ptk::AttnParams& p_in, int force_splits) {
    ptk::AttnParams p = p_in;
    p.num_splits = force_splits > 0 ? force_splits
                                    : ptk::prefix_attention_decode_splits(p, 132, !std::is_same_v<T, float>);
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

// The launcher's prefix-gradient split, with host scratch. The split count is computed for a
// 16-SM device: the test shapes are small, so this still gives several shares per prefix block
// (the 132-SM count of an H100 would give one block per work item and only slow the emulation;
// test_prefix_gradient_split_fills_the_gpu checks the heuristic at real SM counts).
template <typename T>
struct Bwd {
  static void run(const ptk::AttnParams& p_in, bool need_dq) {
    ptk::AttnParams p = p_in;
    p.prefix_splits = ptk::prefix_grad_splits(p, 16);
    std::vector<float> part_k, part_v;
    if (p.prefix_splits > 1) {
      part_k.assign(ptk::prefix_grad_workspace(p), std::nanf(""));  // poisoned: every share writes its part
      part_v.assign(ptk::prefix_grad_workspace(p), std::nanf(""));
      p.part_dpk = part_k.data();
      p.part_dpv = part_v.data();
    }
    ptk::launch_prefix_attention_bwd<T>(p, need_dq, nullptr);
  }
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
    last_error() = e.what();
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

extern "C" const char* ptk_last_error() { return last_error().c_str(); }

// ---- self-test of the tensor-core shim's fragment layouts (tests/test_cuda_tensor_core_shim.py) ----
// One warp. mode 0: D = A B + C for one m16n8k16 tile, with the fragments built HERE by direct
// indexing from the PTX ISA's layout table (not by ldmatrix): in = A (16x16) then B (16x8, K x N),
// row-major 16-bit; out_f = C (16x8 fp32) on entry, D on return. Modes 1..6: ldmatrix .x1 / .x2 /
// .x4, then the same with .trans, on a 32x8 16-bit matrix whose row l is supplied by lane l;
// out_u[lane * 4 + i] = the lane's register i.
namespace {
template <typename T>
__global__ void tc_selftest_kernel(int mode, const uint16_t* in, float* out_f, uint32_t* out_u) {
  PTK_DYNAMIC_SMEM(uint16_t, sm);
  const int l = threadIdx.x, g = l / 4, t = l % 4;
  if (mode == 0) {
    auto A = [&](int r, int c) { return static_cast<uint32_t>(in[r * 16 + c]); };
    auto B = [&](int k, int n) { return static_cast<uint32_t>(in[256 + k * 8 + n]); };
    const uint32_t a[4] = {A(g, 2 * t) | A(g, 2 * t + 1) << 16, A(g + 8, 2 * t) | A(g + 8, 2 * t + 1) << 16,
                           A(g, 2 * t + 8) | A(g, 2 * t + 9) << 16, A(g + 8, 2 * t + 8) | A(g + 8, 2 * t + 9) << 16};
    const uint32_t b[2] = {B(2 * t, g) | B(2 * t + 1, g) << 16, B(2 * t + 8, g) | B(2 * t + 9, g) << 16};
    float d[4];
    for (int i = 0; i < 4; ++i) d[i] = out_f[(g + 8 * (i / 2)) * 8 + 2 * t + i % 2];
    ptk::tc::mma_16816<T>(d, a, b);
    for (int i = 0; i < 4; ++i) out_f[(g + 8 * (i / 2)) * 8 + 2 * t + i % 2] = d[i];
    return;
  }
  for (int c = 0; c < 8; ++c) sm[l * 8 + c] = in[l * 8 + c];
  __syncthreads();
  uint32_t r[4] = {0, 0, 0, 0};
  const uint16_t* row = sm + l * 8;
  switch (mode) {
    case 1: { uint32_t x[1]; ptk::tc::ldmatrix_x1(x, row); r[0] = x[0]; break; }
    case 2: { uint32_t x[2]; ptk::tc::ldmatrix_x2(x, row); r[0] = x[0]; r[1] = x[1]; break; }
    case 3: ptk::tc::ldmatrix_x4(r, row); break;
    case 4: { uint32_t x[1]; ptk::tc::ldmatrix_x1_trans(x, row); r[0] = x[0]; break; }
    case 5: { uint32_t x[2]; ptk::tc::ldmatrix_x2_trans(x, row); r[0] = x[0]; r[1] = x[1]; break; }
    case 6: ptk::tc::ldmatrix_x4_trans(r, row); break;
  }
  for (int i = 0; i < 4; ++i) out_u[l * 4 + i] = r[i];
}
}  // namespace

extern "C" int ptk_tc_selftest(int dtype, int mode, const void* in, float* out_f, uint32_t* out_u) {
  try {
    const auto* src = static_cast<const uint16_t*>(in);
    if (dtype == 1)
      PTK_LAUNCH(tc_selftest_kernel<__half>, dim3(1), dim3(32), 32 * 8 * 2, nullptr, mode, src, out_f, out_u);
    else
      PTK_LAUNCH(tc_selftest_kernel<__nv_bfloat16>, dim3(1), dim3(32), 32 * 8 * 2, nullptr, mode, src, out_f, out_u);
  } catch (const std::exception& e) {
    last_error() = e.what();
    return 1;
  }
  return 0;
}

// The prefix-gradient split heuristic and the grid it gives: ints = B Hq Hkv Nq P T prefix_mode;
// returns splits, writes the prefix kernel's block count to *blocks.
extern "C" int ptk_prefix_grad_splits(const int64_t* ints, int num_sms, int64_t* blocks) {
  ptk::AttnParams p;
  p.B = ints[0];
  p.Hq = ints[1];
  p.Hkv = ints[2];
  p.Nq = ints[3];
  p.P = ints[4];
  p.T = ints[5];
  p.prefix_mode = ints[6];
  const int s = ptk::prefix_grad_splits(p, num_sms);
  *blocks = static_cast<int64_t>((p.P + 63) / 64) * p.Hkv * p.T * s;
  return s;
}

// Launch geometry of the attention kernels for the static kernel report
// (benchmarks/cuda_kernel_report.py): one line per (kernel, dtype bytes, head-dim bucket):
// "<kernel name fragment> <DMAX> <elem bytes> <threads> <dynamic smem bytes>".
namespace {
template <typename T, int DMAX>
void kernel_config_lines(std::string& s) {
  auto add = [&](const char* name, int threads, size_t smem) {
    s += std::string(name) + " " + std::to_string(DMAX) + " " + std::to_string(sizeof(T)) + " " +
         std::to_string(threads) + " " + std::to_string(smem) + "\n";
  };
  if constexpr (sizeof(T) == 2) {
    using F = ptk::fwd_mma::Cfg<T, DMAX>;
    add("prefix_attention_fwd_mma_kernel", F::THREADS, F::smem_bytes);
    if constexpr (DMAX <= 128) {
      using B = ptk::bwd_mma::Cfg<T, DMAX>;
      add("dq_mma_kernel", B::THREADS, B::dq_bytes);
      add("dkdv_mma_kernel", B::THREADS, B::kv_bytes);
    } else {
      using W = ptk::bwd_wide::Cfg<T>;
      add("dq_wide_kernel", W::THREADS, W::dq_bytes);
      add("dkdv_wide_kernel", W::THREADS, W::kv_bytes);
    }
  }
  add("prefix_attention_fwd_kernel", ptk::fwd::kThreads, ptk::fwd::Tiles<DMAX>::smem_bytes);
  add("bwd::dq_kernel", ptk::bwd::kThreads, ptk::bwd::Tiles<DMAX>::dq_smem_bytes);
  add("bwd::dkdv_kernel", ptk::bwd::kThreads, ptk::bwd::Tiles<DMAX>::kv_smem_bytes);
}
}  // namespace

extern "C" int ptk_kernel_configs(char* buf, int cap) {
  std::string s;
  kernel_config_lines<float, 64>(s);
  kernel_config_lines<float, 128>(s);
  kernel_config_lines<float, 256>(s);
  kernel_config_lines<__half, 64>(s);
  kernel_config_lines<__half, 128>(s);
  kernel_config_lines<__half, 256>(s);
  if (static_cast<int>(s.size()) + 1 > cap) return -static_cast<int>(s.size() + 1);
  std::memcpy(buf, s.c_str(), s.size() + 1);
  return static_cast<int>(s.size());
}
