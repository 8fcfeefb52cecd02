// prefix_attention forward on tensor cores (float16 / bfloat16): the same online softmax as
// prefix_attention_fwd.cuh, with Q K^T and P V as 16x16x16 WMMA products (nvcuda::wmma, sm_80+).
//
// Block = BM / 16 warps; warp w owns query rows [16w, 16w + 16) of the block's tile.
// Per key tile (BN keys, prefix segment then sequence segment):
//   1. the block stages K, V (BN x DMAX, storage dtype, zero-padded) in shared memory;
//   2. warp w: S_w = Q_w K^T (fp32 accumulators) -> shared sS;
//   3. warp w, 2 lanes per row: scale / softcap / bias / mask, online-softmax update of (m, l),
//      P = exp(S - m) rounded to the storage dtype -> sP, O_w rows rescaled by alpha in sO;
//   4. warp w: O_w += P_w V, accumulator fragments loaded from / stored to sO (fp32).
// The output accumulator lives in shared memory because rescaling rows of a fragment would need
// the (undocumented) fragment register layout.
#pragma once

#include "prefix_attention_fwd.cuh"
#include "prefix_attention_tile.cuh"

#include <type_traits>

#ifndef PTK_HOST_HARNESS
#include <mma.h>
#endif

namespace ptk {
namespace fwd_tc {

template <typename T, int DMAX>
struct Cfg {
  static constexpr int BM = DMAX >= 256 ? 32 : 64;  // queries per block
  static constexpr int BN = DMAX >= 128 ? 32 : 64;  // keys per tile
  static constexpr int WARPS = BM / 16;
  static constexpr int THREADS = WARPS * 32;
  // leading dimensions: multiples of 8 (16-bit) / 4 (fp32) elements as WMMA requires; every
  // 16-row block and every section starts 32-byte aligned
  static constexpr int LDH = DMAX + 8;
  static constexpr int LDS = BN + 4;
  static constexpr int LDP = BN + 8;
  static constexpr int LDO = DMAX + 4;
  static constexpr size_t q_bytes = BM * LDH * sizeof(T);
  static constexpr size_t kv_bytes = BN * LDH * sizeof(T);
  static constexpr size_t s_bytes = BM * LDS * sizeof(float);
  static constexpr size_t p_bytes = BM * LDP * sizeof(T);
  static constexpr size_t o_bytes = BM * LDO * sizeof(float);
  static constexpr size_t smem_bytes = q_bytes + 2 * kv_bytes + s_bytes + p_bytes + o_bytes;
  static_assert(q_bytes % 32 == 0 && kv_bytes % 32 == 0 && s_bytes % 32 == 0 && p_bytes % 32 == 0,
                "shared-memory sections must stay 32-byte aligned for WMMA");
  static_assert(smem_bytes <= 99 * 1024, "tensor-core forward tile does not fit in shared memory");
};

// rows [row0, row0 + ROWS) of a strided (n, D) matrix -> dst[ROWS][ld] in the storage dtype,
// zero-filled past n and past D (so products over the padded head dim are exact).
template <typename T, int ROWS, int DMAX>
__device__ __forceinline__ void stage_rows(T* dst, int ld, const T* src, int64_t s_row, int64_t s_col, int row0, int n,
                                           int D, int nthreads) {
  for (int idx = threadIdx.x; idx < ROWS * DMAX; idx += nthreads) {
    const int r = idx / DMAX, c = idx % DMAX;
    const int row = row0 + r;
    dst[r * ld + c] = (row < n && c < D) ? src[row * s_row + c * s_col] : from_float<T>(0.f);
  }
}

template <typename T, int DMAX>
__device__ __forceinline__ void tc_key_tile(const AttnParams& p, const KeySegment<T>& seg, int kt, int b, int h,
                                            int i0, T* sQ, T* sK, T* sV, float* sS, T* sP, float* sO, float& m_row,
                                            float& l_row) {
  using C = Cfg<T, DMAX>;
  using namespace nvcuda;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int dsteps = (p.D + 15) / 16;  // 16-wide slices of the head dim that hold data
  __syncthreads();                     // every warp is done with the previous tile
  stage_rows<T, C::BN, DMAX>(sK, C::LDH, seg.k, seg.k_row, seg.k_col, kt, seg.n, p.D, C::THREADS);
  stage_rows<T, C::BN, DMAX>(sV, C::LDH, seg.v, seg.v_row, seg.v_col, kt, seg.n, p.D, C::THREADS);
  __syncthreads();

  // 2. S_w = Q_w K^T
  for (int nb = 0; nb < C::BN / 16; ++nb) {
    wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc;
    wmma::fill_fragment(acc, 0.f);
    for (int kb = 0; kb < dsteps; ++kb) {
      wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> a;
      wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::col_major> bk;  // K row-major = K^T col-major
      wmma::load_matrix_sync(a, sQ + warp * 16 * C::LDH + kb * 16, C::LDH);
      wmma::load_matrix_sync(bk, sK + nb * 16 * C::LDH + kb * 16, C::LDH);
      wmma::mma_sync(acc, a, bk, acc);
    }
    wmma::store_matrix_sync(sS + warp * 16 * C::LDS + nb * 16, acc, C::LDS, wmma::mem_row_major);
  }
  __syncwarp();

  // 3. online softmax: lanes 2r, 2r+1 own row r of the warp; columns c = half + 2 * jj
  const int r = lane / 2, half = lane % 2;
  const int i = i0 + warp * 16 + r;
  const bool row_ok = i < p.Nq;
  float* srow = sS + (warp * 16 + r) * C::LDS;
  T* prow = sP + (warp * 16 + r) * C::LDP;
  float tile_max = kNegInf;
  for (int jj = 0; jj < C::BN / 2; ++jj) {
    const int c = half + 2 * jj, key = kt + c;
    float s = kNegInf;
    if (row_ok && key < seg.n && (seg.is_prefix || sequence_key_visible(p, b, i, key)))
      s = apply_softcap(srow[c] * p.scale, p.softcap) + bias_at(p, b, h, i, seg.bias_col0 + key);
    srow[c] = s;
    tile_max = fmaxf(tile_max, s);
  }
  tile_max = group_max<2>(tile_max);
  const float m_new = fmaxf(m_row, tile_max);
  const float alpha = m_new == kNegInf ? 1.f : expf(m_row - m_new);
  float psum = 0.f;
  for (int jj = 0; jj < C::BN / 2; ++jj) {
    const int c = half + 2 * jj;
    const float pv = srow[c] == kNegInf ? 0.f : expf(srow[c] - m_new);
    prow[c] = from_float<T>(pv);
    psum += pv;
  }
  psum = group_sum<2>(psum);
  l_row = l_row * alpha + psum;
  m_row = m_new;
  float* orow = sO + (warp * 16 + r) * C::LDO;
  for (int c = half; c < DMAX; c += 2) orow[c] *= alpha;
  __syncwarp();

  // 4. O_w += P_w V
  for (int db = 0; db < dsteps; ++db) {
    wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc;
    float* o_tile = sO + warp * 16 * C::LDO + db * 16;
    wmma::load_matrix_sync(acc, o_tile, C::LDO, wmma::mem_row_major);
    for (int kb = 0; kb < C::BN / 16; ++kb) {
      wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> a;
      wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::row_major> bv;
      wmma::load_matrix_sync(a, sP + warp * 16 * C::LDP + kb * 16, C::LDP);
      wmma::load_matrix_sync(bv, sV + kb * 16 * C::LDH + db * 16, C::LDH);
      wmma::mma_sync(acc, a, bv, acc);
    }
    wmma::store_matrix_sync(o_tile, acc, C::LDO, wmma::mem_row_major);
  }
  __syncwarp();
}

// grid (ceil(Nq / BM), B * Hq), block Cfg::THREADS, dynamic smem Cfg::smem_bytes.
template <typename T, int DMAX>
// minBlocks = 256 / THREADS lets ptxas use up to 255 registers (without it sm_90 ptxas capped at 64-96 and spilled)
__global__ void __launch_bounds__(Cfg<T, DMAX>::THREADS, 256 / Cfg<T, DMAX>::THREADS) prefix_attention_fwd_wmma_kernel(const AttnParams p) {
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 800
  using C = Cfg<T, DMAX>;
  PTK_DYNAMIC_SMEM(unsigned char, smem);
  T* sQ = reinterpret_cast<T*>(smem);
  T* sK = reinterpret_cast<T*>(smem + C::q_bytes);
  T* sV = reinterpret_cast<T*>(smem + C::q_bytes + C::kv_bytes);
  float* sS = reinterpret_cast<float*>(smem + C::q_bytes + 2 * C::kv_bytes);
  T* sP = reinterpret_cast<T*>(smem + C::q_bytes + 2 * C::kv_bytes + C::s_bytes);
  float* sO = reinterpret_cast<float*>(smem + C::q_bytes + 2 * C::kv_bytes + C::s_bytes + C::p_bytes);

  const int b = blockIdx.y / p.Hq, h = blockIdx.y % p.Hq;
  const int hk = h / (p.Hq / p.Hkv);
  const int i0 = blockIdx.x * C::BM;
  const int i1 = i0 + C::BM < p.Nq ? i0 + C::BM : p.Nq;
  const T* q = static_cast<const T*>(p.q) + b * p.q_stride[0] + h * p.q_stride[1];
  stage_rows<T, C::BM, DMAX>(sQ, C::LDH, q, p.q_stride[2], p.q_stride[3], i0, p.Nq, p.D, C::THREADS);
  for (int idx = threadIdx.x; idx < C::BM * C::LDO; idx += C::THREADS) sO[idx] = 0.f;
  float m_row = kNegInf, l_row = 0.f;

  if (p.prefix_mode != kNoPrefix && p.P > 0) {
    const KeySegment<T> seg = prefix_segment<T>(p, prefix_of_row(p, b), hk);
    for (int kt = 0; kt < seg.n; kt += C::BN)
      tc_key_tile<T, DMAX>(p, seg, kt, b, h, i0, sQ, sK, sV, sS, sP, sO, m_row, l_row);
  }
  int lo, hi;
  sequence_key_range(p, i0, i1, lo, hi);
  const KeySegment<T> seq = sequence_segment<T>(p, b, hk);
  for (int kt = lo; kt < hi; kt += C::BN)
    tc_key_tile<T, DMAX>(p, seq, kt, b, h, i0, sQ, sK, sV, sS, sP, sO, m_row, l_row);
  __syncthreads();  // sO was initialized by other warps when no key tile ran

  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int r = lane / 2, half = lane % 2;
  const int i = i0 + warp * 16 + r;
  if (i >= p.Nq) return;
  const bool empty = l_row <= 0.f;  // no visible key: output 0, lse -inf
  const float inv_l = empty ? 0.f : 1.f / l_row;
  const float* orow = sO + (warp * 16 + r) * C::LDO;
  T* out = static_cast<T*>(p.out) + ((static_cast<int64_t>(b) * p.Hq + h) * p.Nq + i) * p.D;
  for (int c = half; c < p.D; c += 2) out[c] = from_float<T>(orow[c] * inv_l);
  if (half == 0) p.lse[(static_cast<int64_t>(b) * p.Hq + h) * p.Nq + i] = empty ? kNegInf : m_row + logf(l_row);
#endif
}

}  // namespace fwd_tc

template <typename T, int DMAX>
inline void launch_prefix_attention_fwd_wmma_d(const AttnParams& p, ptk_stream_t stream) {
  using C = fwd_tc::Cfg<T, DMAX>;
  auto kernel = fwd_tc::prefix_attention_fwd_wmma_kernel<T, DMAX>;
  allow_dynamic_smem(kernel, C::smem_bytes);
  dim3 grid(ceil_div_h(p.Nq, C::BM), p.B * p.Hq);
  PTK_LAUNCH(kernel, grid, dim3(C::THREADS), C::smem_bytes, stream, p);
}

// float16 / bfloat16 only; head-dim buckets 64 / 128 / 256.
template <typename T>
inline void launch_prefix_attention_fwd_wmma(const AttnParams& p, ptk_stream_t stream) {
  if (p.B * p.Hq == 0 || p.Nq == 0) return;
  if (p.D <= 64)
    launch_prefix_attention_fwd_wmma_d<T, 64>(p, stream);
  else if (p.D <= 128)
    launch_prefix_attention_fwd_wmma_d<T, 128>(p, stream);
  else
    launch_prefix_attention_fwd_wmma_d<T, 256>(p, stream);
}

// The forward dispatcher: float16 / bfloat16 on tensor cores, float32 on CUDA cores (fp32 WMMA
// would be TF32, less precise than the float32 contract).
// Split-K decode calls (p.num_splits > 1, see prefix_attention_decode_splits) take the CUDA-core
// kernel for every dtype: one query tile is memory-bound, tensor cores would idle.
template <typename T>
inline void launch_prefix_attention_fwd(const AttnParams& p, ptk_stream_t stream) {
  if constexpr (std::is_same_v<T, float>) {
    launch_prefix_attention_fwd_simt<T>(p, stream);
  } else {
    if (p.num_splits > 1)
      launch_prefix_attention_fwd_simt<T>(p, stream);
    else
      launch_prefix_attention_fwd_wmma<T>(p, stream);
  }
}

}  // namespace ptk
