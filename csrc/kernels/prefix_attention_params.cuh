// The argument block of every prefix_attention kernel: raw pointers + element strides.
//
// Conventions (the normalized arguments of ptkernels/ops/prefix_attention.py):
//   q (B, Hq, Nq, D); k, v (B, Hkv, Nk, D); prefix_k/v (T, Hkv, P, D) with prefix_mode
//   0 = none, 1 = shared (T == 1), 2 = per row (T == B), 3 = bank (prefix_index (B,) int64);
//   key_padding_mask bool (B, Nk), true = a real key; attn_bias float32 (B, Hq, Nq, P + Nk) by
//   strides (0 on broadcast dims), prefix columns first; window <= 0 = none; softcap <= 0 = none.
// Outputs the kernels write are dense and contiguous: out/dq (B, Hq, Nq, D), lse/delta
// (B, Hq, Nq) float32, dk/dv (B, Hkv, Nk, D), dprefix_k/v (T, Hkv, P, D).
#pragma once

#include <cstdint>

// Testing hook: the host harness compiles a variant with the causal bound shifted by one to prove
// that its checks can fail. Always 0 in the extension.
#ifndef PTK_PLANTED_CAUSAL_SHIFT
#define PTK_PLANTED_CAUSAL_SHIFT 0
#endif

namespace ptk {

struct AttnParams {
  const void* q = nullptr;
  const void* k = nullptr;
  const void* v = nullptr;
  const void* prefix_k = nullptr;
  const void* prefix_v = nullptr;
  const int64_t* prefix_index = nullptr;
  const uint8_t* key_padding_mask = nullptr;  // torch bool = one byte
  const float* attn_bias = nullptr;
  // forward outputs / backward inputs
  void* out = nullptr;
  float* lse = nullptr;
  // backward
  const void* grad_out = nullptr;
  const float* grad_lse = nullptr;  // (B, Hq, Nq) float32, contiguous, or null
  float* delta = nullptr;           // (B, Hq, Nq) float32 scratch
  void* dq = nullptr;
  void* dk = nullptr;
  void* dv = nullptr;
  void* dprefix_k = nullptr;
  void* dprefix_v = nullptr;

  int64_t q_stride[4] = {0, 0, 0, 0};
  int64_t k_stride[4] = {0, 0, 0, 0};
  int64_t v_stride[4] = {0, 0, 0, 0};
  int64_t pk_stride[4] = {0, 0, 0, 0};
  int64_t pv_stride[4] = {0, 0, 0, 0};
  int64_t out_stride[4] = {0, 0, 0, 0};   // forward output `out` as read by the backward
  int64_t dout_stride[4] = {0, 0, 0, 0};
  int64_t bias_stride[4] = {0, 0, 0, 0};
  int64_t mask_stride[2] = {0, 0};

  // split-K decode (forward, small Nq): split z covers global keys [z * split_len, (z+1) * split_len)
  // of the prefix-then-sequence order and writes a normalized partial output (num_splits, B, Hq,
  // Nq, D) and its lse (num_splits, B, Hq, Nq), both float32; a merge kernel combines them.
  float* part_out = nullptr;
  float* part_lse = nullptr;
  int num_splits = 1;
  int split_len = 0;

  // set by the tensor-core forward's launcher: q, k, v and the prefix can be staged with 16-byte
  // copies (see attention_rows_vectorizable)
  bool vec16 = false;

  // prefix gradient of the tensor-core backward, cut into prefix_splits shares of the batch work
  // (see prefix_grad_splits); with > 1 share each writes fp32 partials (prefix_splits, T, Hkv, P,
  // D) into part_dpk / part_dpv, reduced in split order. Allocated by the caller.
  float* part_dpk = nullptr;
  float* part_dpv = nullptr;
  int prefix_splits = 1;

  int B = 0, Hq = 0, Hkv = 0, Nq = 0, Nk = 0, P = 0, D = 0, T = 0;
  int prefix_mode = 0;
  bool causal = false;
  int window = -1;
  float softcap = 0.f;
  float scale = 1.f;
};

enum PrefixMode { kNoPrefix = 0, kShared = 1, kPerRow = 2, kBank = 3 };

// Which prefix (0..T-1) batch row b sees.
__host__ __device__ __forceinline__ int prefix_of_row(const AttnParams& p, int b) {
  if (p.prefix_mode == kShared) return 0;
  if (p.prefix_mode == kPerRow) return b;
  return static_cast<int>(p.prefix_index[b]);
}

// Sequence key j is visible to query i of batch row b (prefix keys are always visible).
__host__ __device__ __forceinline__ bool sequence_key_visible(const AttnParams& p, int b, int i, int j) {
  const int diag = i + p.Nk - p.Nq;  // bottom-right alignment
  if (p.causal && j > diag + PTK_PLANTED_CAUSAL_SHIFT) return false;
  if (p.window > 0 && diag - j >= p.window) return false;
  if (p.key_padding_mask && !p.key_padding_mask[b * p.mask_stride[0] + j * p.mask_stride[1]]) return false;
  return true;
}

// The sequence keys [lo, hi) that queries [i0, i1) can see at all (causal / window block skipping).
__host__ __device__ __forceinline__ void sequence_key_range(const AttnParams& p, int i0, int i1, int& lo, int& hi) {
  lo = 0;
  hi = p.Nk;
  if (p.causal) {
    const int last = (i1 - 1) + p.Nk - p.Nq + PTK_PLANTED_CAUSAL_SHIFT;
    hi = last + 1 < hi ? last + 1 : hi;
    if (hi < 0) hi = 0;
  }
  if (p.window > 0) {
    const int first = i0 + p.Nk - p.Nq - p.window + 1;
    lo = first > 0 ? first : 0;
  }
}

// The queries [lo, hi) that can see any of the sequence keys [j0, j1).
__host__ __device__ __forceinline__ void sequence_query_range(const AttnParams& p, int j0, int j1, int& lo, int& hi) {
  lo = 0;
  hi = p.Nq;
  if (p.causal) {
    const int first = j0 - (p.Nk - p.Nq) - PTK_PLANTED_CAUSAL_SHIFT;
    lo = first > 0 ? first : 0;
  }
  if (p.window > 0) {
    const int last_excl = (j1 - 1) + p.window - (p.Nk - p.Nq);
    hi = last_excl < hi ? last_excl : hi;
  }
}

}  // namespace ptk
