// Tile helpers shared by the forward and backward prefix_attention kernels: where a head's keys
// live, loading rows into shared memory as float32, and the score of one (query, key) pair.
#pragma once

#include "common.cuh"
#include "prefix_attention_params.cuh"

namespace ptk {

// One segment of keys for one (batch row, kv head): the prefix (bias columns 0..P-1) or the
// sequence (bias columns P..P+Nk-1).
template <typename T>
struct KeySegment {
  const T* k;
  const T* v;
  int64_t k_row, k_col, v_row, v_col;  // element strides
  int n;                               // number of keys
  int bias_col0;                       // column of key 0 in attn_bias
  bool is_prefix;
};

// The keys a dK/dV block owns and the batch rows that read them. A prefix block (kv head
// blockIdx.y, prefix t = blockIdx.z) is read by row t for per-row prefixes and otherwise by every
// row (a bank's loop skips rows that chose another prefix); a sequence block belongs to one
// (row, kv head) pair, blockIdx.y = b * Hkv + hk. Shared by the CUDA-core and tensor-core backward.
struct KeyBlockRole {
  int hk, t, b_begin, b_end;
};

template <bool PREFIX>
__device__ __forceinline__ KeyBlockRole key_block_role(const AttnParams& p) {
  KeyBlockRole r;
  if (PREFIX) {
    r.hk = blockIdx.y;
    r.t = blockIdx.z;
    r.b_begin = p.prefix_mode == kPerRow ? r.t : 0;
    r.b_end = p.prefix_mode == kPerRow ? r.t + 1 : p.B;
  } else {
    r.hk = blockIdx.y % p.Hkv;
    r.t = 0;
    r.b_begin = blockIdx.y / p.Hkv;
    r.b_end = r.b_begin + 1;
  }
  return r;
}

template <typename T>
__device__ __forceinline__ KeySegment<T> prefix_segment(const AttnParams& p, int t, int hk) {
  KeySegment<T> s;
  s.k = static_cast<const T*>(p.prefix_k) + t * p.pk_stride[0] + hk * p.pk_stride[1];
  s.v = static_cast<const T*>(p.prefix_v) + t * p.pv_stride[0] + hk * p.pv_stride[1];
  s.k_row = p.pk_stride[2];
  s.k_col = p.pk_stride[3];
  s.v_row = p.pv_stride[2];
  s.v_col = p.pv_stride[3];
  s.n = p.P;
  s.bias_col0 = 0;
  s.is_prefix = true;
  return s;
}

template <typename T>
__device__ __forceinline__ KeySegment<T> sequence_segment(const AttnParams& p, int b, int hk) {
  KeySegment<T> s;
  s.k = static_cast<const T*>(p.k) + b * p.k_stride[0] + hk * p.k_stride[1];
  s.v = static_cast<const T*>(p.v) + b * p.v_stride[0] + hk * p.v_stride[1];
  s.k_row = p.k_stride[2];
  s.k_col = p.k_stride[3];
  s.v_row = p.v_stride[2];
  s.v_col = p.v_stride[3];
  s.n = p.Nk;
  s.bias_col0 = p.P;
  s.is_prefix = false;
  return s;
}

// rows [row0, row0 + ROWS) of a strided (n, D) matrix -> dst[ROWS][ld] as float32; rows >= n and
// columns >= D are zero-filled so that tails need no special case in the dot products.
template <typename T, int ROWS, int NT>
__device__ __forceinline__ void load_rows(float* dst, int ld, const T* src, int64_t s_row, int64_t s_col,
                                          int row0, int n, int D, int DMAX) {
  for (int idx = threadIdx.x; idx < ROWS * DMAX; idx += NT) {
    const int r = idx / DMAX, c = idx % DMAX;
    const int row = row0 + r;
    dst[r * ld + c] = (row < n && c < D) ? to_float(src[row * s_row + c * s_col]) : 0.f;
  }
}

// Scaled, soft-capped, biased score and the raw scaled dot product (the softcap backward needs it).
__device__ __forceinline__ float dot_rows(const float* a, const float* b, int D) {
  float acc = 0.f;
  for (int c = 0; c < D; ++c) acc = fmaf(a[c], b[c], acc);
  return acc;
}

__device__ __forceinline__ float apply_softcap(float raw, float softcap) {
  return softcap > 0.f ? softcap * tanhf(raw / softcap) : raw;
}

__device__ __forceinline__ float bias_at(const AttnParams& p, int b, int h, int i, int col) {
  if (!p.attn_bias) return 0.f;
  return p.attn_bias[b * p.bias_stride[0] + h * p.bias_stride[1] + i * p.bias_stride[2] + col * p.bias_stride[3]];
}

// Dynamic shared memory above 48 KiB must be opted into once per kernel instantiation.
template <typename Kernel>
inline void allow_dynamic_smem(Kernel kernel, size_t bytes) {
#ifndef PTK_HOST_HARNESS
  if (bytes > 48 * 1024) cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes));
#else
  (void)kernel;
  (void)bytes;
#endif
}

}  // namespace ptk
