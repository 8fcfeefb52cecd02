// Used for head dims above 128 only (the mma.sync backward, prefix_attention_bwd_mma.cuh, holds
// dK and dV in registers, which does not fit at D = 256).
// prefix_attention backward on tensor cores (float16 / bfloat16, sm_80+): the FlashAttention-2
// backward of prefix_attention_bwd.cuh with every matrix product as 16x16x16 WMMA products
// (nvcuda::wmma), fp32 accumulation. Same kernels, same work split, same reductions (no atomics,
// deterministic); only the products change:
//
//   dQ kernel (warp w owns 16 queries): per key tile, S_w = Q_w K^T and dP_w = dO_w V^T (fp32, in
//     shared memory), dS = P * (dP - delta) [* softcap'] * scale elementwise (2 lanes per row),
//     rounded to the storage dtype, then dQ_w += dS_w K with the accumulator tile in shared memory.
//   dK/dV kernel (warp w owns 16 keys, sequence or prefix): per query tile, S^T_w = K_w Q^T and
//     dP^T_w = V_w dO^T, P^T / dS^T elementwise, then dV_w += P^T_w dO and dK_w += dS^T_w Q.
//
// P and dS are rounded to float16/bfloat16 before their products, as the tensor-core forward
// rounds P (and FlashAttention-2 does); accumulators stay float32. The accumulator tiles live in
// shared memory (as the forward's O) because addressing rows of a fragment needs the undocumented
// fragment register layout.
#pragma once

#include "prefix_attention_bwd.cuh"

#ifndef PTK_HOST_HARNESS
#include <mma.h>
#endif

namespace ptk {
namespace bwd_tc {

// dQ: BM queries per block (BM / 16 warps), BN keys per tile.
template <typename T, int DMAX>
struct DqCfg {
  static constexpr int BM = DMAX >= 256 ? 16 : (DMAX >= 128 ? 32 : 64);
  static constexpr int BN = 32;
  static constexpr int THREADS = BM / 16 * 32;
  // leading dimensions: multiples of 8 (16-bit) / 4 (fp32) elements as WMMA requires
  static constexpr int LDH = DMAX + 8, LDS = BN + 4, LDP = BN + 8, LDO = DMAX + 4;
  static constexpr size_t qo_bytes = BM * LDH * sizeof(T);   // Q, dO
  static constexpr size_t kv_bytes = BN * LDH * sizeof(T);   // K, V
  static constexpr size_t s_bytes = BM * LDS * sizeof(float);  // S, dP
  static constexpr size_t p_bytes = BM * LDP * sizeof(T);    // dS
  static constexpr size_t o_bytes = BM * LDO * sizeof(float);  // dQ accumulator
  static constexpr size_t smem_bytes = 2 * qo_bytes + 2 * kv_bytes + 2 * s_bytes + p_bytes + o_bytes;
  static_assert(qo_bytes % 32 == 0 && kv_bytes % 32 == 0 && s_bytes % 32 == 0 && p_bytes % 32 == 0,
                "shared-memory sections must stay 32-byte aligned for WMMA");
  static_assert(smem_bytes <= 99 * 1024, "tensor-core dQ tile does not fit in shared memory");
};

// dK/dV: BK keys per block (BK / 16 warps), BQ queries per tile.
template <typename T, int DMAX>
struct KvCfg {
  static constexpr int BK = DMAX >= 256 ? 16 : (DMAX >= 128 ? 32 : 64);
  static constexpr int BQ = 32;
  static constexpr int THREADS = BK / 16 * 32;
  static constexpr int LDH = DMAX + 8, LDS = BQ + 4, LDP = BQ + 8, LDO = DMAX + 4;
  static constexpr size_t kv_bytes = BK * LDH * sizeof(T);     // K, V
  static constexpr size_t qo_bytes = BQ * LDH * sizeof(T);     // Q, dO
  static constexpr size_t s_bytes = BK * LDS * sizeof(float);  // S^T, dP^T
  static constexpr size_t p_bytes = BK * LDP * sizeof(T);      // P^T, dS^T
  static constexpr size_t o_bytes = BK * LDO * sizeof(float);  // dK, dV accumulators
  static constexpr size_t smem_bytes =
      2 * kv_bytes + 2 * qo_bytes + 2 * s_bytes + 2 * p_bytes + 2 * o_bytes + 2 * BQ * sizeof(float);
  static_assert(kv_bytes % 32 == 0 && qo_bytes % 32 == 0 && s_bytes % 32 == 0 && p_bytes % 32 == 0 &&
                    o_bytes % 32 == 0,
                "shared-memory sections must stay 32-byte aligned for WMMA");
  static_assert(smem_bytes <= 99 * 1024, "tensor-core dK/dV tile does not fit in shared memory");
};

// One warp: C[16 x 16*nblocks] (fp32) = A[16 x 16*ksteps] B^T, A and B row-major in shared memory
// (B's rows are C's columns: a row-major B is a col-major B^T).
template <typename T>
__device__ __forceinline__ void warp_mm_abt(float* c, int ldc, const T* a, int lda, const T* b, int ldb, int nblocks,
                                            int ksteps) {
  using namespace nvcuda;
  for (int nb = 0; nb < nblocks; ++nb) {
    wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc;
    wmma::fill_fragment(acc, 0.f);
    for (int kb = 0; kb < ksteps; ++kb) {
      wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> fa;
      wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::col_major> fb;
      wmma::load_matrix_sync(fa, a + kb * 16, lda);
      wmma::load_matrix_sync(fb, b + nb * 16 * ldb + kb * 16, ldb);
      wmma::mma_sync(acc, fa, fb, acc);
    }
    wmma::store_matrix_sync(c + nb * 16, acc, ldc, wmma::mem_row_major);
  }
}

// One warp: C[16 x 16*nblocks] (fp32, shared memory) += A[16 x 16*ksteps] B, both row-major.
template <typename T>
__device__ __forceinline__ void warp_mm_ab_acc(float* c, int ldc, const T* a, int lda, const T* b, int ldb, int nblocks,
                                               int ksteps) {
  using namespace nvcuda;
  for (int nb = 0; nb < nblocks; ++nb) {
    wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc;
    wmma::load_matrix_sync(acc, c + nb * 16, ldc, wmma::mem_row_major);
    for (int kb = 0; kb < ksteps; ++kb) {
      wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> fa;
      wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::row_major> fb;
      wmma::load_matrix_sync(fa, a + kb * 16, lda);
      wmma::load_matrix_sync(fb, b + kb * 16 * ldb + nb * 16, ldb);
      wmma::mma_sync(acc, fa, fb, acc);
    }
    wmma::store_matrix_sync(c + nb * 16, acc, ldc, wmma::mem_row_major);
  }
}

// ---------------------------------------------------------------------------------------------
// dQ
// ---------------------------------------------------------------------------------------------

template <typename T, int DMAX>
__device__ __forceinline__ void dq_key_tile(const AttnParams& p, const KeySegment<T>& seg, int kt, int b, int h, int i0,
                                            const T* sQ, const T* sDO, T* sK, T* sV, float* sS, float* sDP, T* sDS,
                                            float* sDQ, float lse, float delta) {
  using C = DqCfg<T, DMAX>;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int dsteps = (p.D + 15) / 16;  // 16-wide slices of the head dim that hold data
  __syncthreads();                     // every warp is done with the previous tile
  stage_rows<T, C::BN, DMAX>(sK, C::LDH, seg.k, seg.k_row, seg.k_col, kt, seg.n, p.D, C::THREADS);
  stage_rows<T, C::BN, DMAX>(sV, C::LDH, seg.v, seg.v_row, seg.v_col, kt, seg.n, p.D, C::THREADS);
  __syncthreads();

  float* s_w = sS + warp * 16 * C::LDS;
  float* dp_w = sDP + warp * 16 * C::LDS;
  T* ds_w = sDS + warp * 16 * C::LDP;
  warp_mm_abt<T>(s_w, C::LDS, sQ + warp * 16 * C::LDH, C::LDH, sK, C::LDH, C::BN / 16, dsteps);
  warp_mm_abt<T>(dp_w, C::LDS, sDO + warp * 16 * C::LDH, C::LDH, sV, C::LDH, C::BN / 16, dsteps);
  __syncwarp();

  // lanes 2r, 2r+1 own row r of the warp; columns c = half + 2 * jj
  const int r = lane / 2, half = lane % 2;
  const int i = i0 + warp * 16 + r;
  const bool row_ok = i < p.Nq;
  for (int jj = 0; jj < C::BN / 2; ++jj) {
    const int c = half + 2 * jj, key = kt + c;
    float ds = 0.f;
    if (row_ok && key < seg.n && (seg.is_prefix || sequence_key_visible(p, b, i, key)))
      ds = bwd::prob_and_grad(p, s_w[r * C::LDS + c], dp_w[r * C::LDS + c], lse, delta,
                              bias_at(p, b, h, i, seg.bias_col0 + key))
               .ds;
    ds_w[r * C::LDP + c] = from_float<T>(ds);
  }
  __syncwarp();

  warp_mm_ab_acc<T>(sDQ + warp * 16 * C::LDO, C::LDO, ds_w, C::LDP, sK, C::LDH, dsteps, C::BN / 16);
  __syncwarp();
}

// grid (ceil(Nq / BM), B * Hq), block DqCfg::THREADS, dynamic smem DqCfg::smem_bytes.
// minBlocks = 256 / THREADS lets ptxas use up to 255 registers (as the tensor-core forward).
template <typename T, int DMAX>
__global__ void __launch_bounds__(DqCfg<T, DMAX>::THREADS, 256 / DqCfg<T, DMAX>::THREADS) dq_wmma_kernel(const AttnParams p) {
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 800
  using C = DqCfg<T, DMAX>;
  PTK_DYNAMIC_SMEM(unsigned char, smem);
  unsigned char* at = smem;
  T* sQ = reinterpret_cast<T*>(at);
  T* sDO = reinterpret_cast<T*>(at += C::qo_bytes);
  T* sK = reinterpret_cast<T*>(at += C::qo_bytes);
  T* sV = reinterpret_cast<T*>(at += C::kv_bytes);
  float* sS = reinterpret_cast<float*>(at += C::kv_bytes);
  float* sDP = reinterpret_cast<float*>(at += C::s_bytes);
  T* sDS = reinterpret_cast<T*>(at += C::s_bytes);
  float* sDQ = reinterpret_cast<float*>(at += C::p_bytes);

  const int b = blockIdx.y / p.Hq, h = blockIdx.y % p.Hq;
  const int hk = h / (p.Hq / p.Hkv);
  const int i0 = blockIdx.x * C::BM;
  const int i1 = i0 + C::BM < p.Nq ? i0 + C::BM : p.Nq;
  const T* q = static_cast<const T*>(p.q) + b * p.q_stride[0] + h * p.q_stride[1];
  const T* go = static_cast<const T*>(p.grad_out) + b * p.dout_stride[0] + h * p.dout_stride[1];
  stage_rows<T, C::BM, DMAX>(sQ, C::LDH, q, p.q_stride[2], p.q_stride[3], i0, p.Nq, p.D, C::THREADS);
  stage_rows<T, C::BM, DMAX>(sDO, C::LDH, go, p.dout_stride[2], p.dout_stride[3], i0, p.Nq, p.D, C::THREADS);
  for (int idx = threadIdx.x; idx < C::BM * C::LDO; idx += C::THREADS) sDQ[idx] = 0.f;

  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int r = lane / 2, half = lane % 2;
  const int i = i0 + warp * 16 + r;
  const int64_t row = (static_cast<int64_t>(b) * p.Hq + h) * p.Nq + i;
  const float lse = i < p.Nq ? p.lse[row] : kNegInf;
  const float delta = i < p.Nq ? p.delta[row] : 0.f;

  if (p.prefix_mode != kNoPrefix && p.P > 0) {
    const KeySegment<T> seg = prefix_segment<T>(p, prefix_of_row(p, b), hk);
    for (int kt = 0; kt < seg.n; kt += C::BN)
      dq_key_tile<T, DMAX>(p, seg, kt, b, h, i0, sQ, sDO, sK, sV, sS, sDP, sDS, sDQ, lse, delta);
  }
  int lo, hi;
  sequence_key_range(p, i0, i1, lo, hi);
  const KeySegment<T> seq = sequence_segment<T>(p, b, hk);
  for (int kt = lo; kt < hi; kt += C::BN)
    dq_key_tile<T, DMAX>(p, seq, kt, b, h, i0, sQ, sDO, sK, sV, sS, sDP, sDS, sDQ, lse, delta);
  __syncthreads();  // sDQ was zeroed by other warps when no key tile ran

  if (i >= p.Nq) return;
  const float* dqrow = sDQ + (warp * 16 + r) * C::LDO;
  T* dq = static_cast<T*>(p.dq) + row * p.D;
  for (int c = half; c < p.D; c += 2) dq[c] = from_float<T>(dqrow[c]);
#endif
}

// ---------------------------------------------------------------------------------------------
// dK / dV (sequence keys) and dprefix_k / dprefix_v (prefix keys)
// ---------------------------------------------------------------------------------------------

// Queries [it, it + BQ) of (b, h) against the block's BK keys (already in sK / sV).
template <typename T, int DMAX, bool PREFIX>
__device__ __forceinline__ void kv_query_tile(const AttnParams& p, int it, int b, int h, int j0, int n_keys,
                                              int bias_col0, const T* sK, const T* sV, T* sQ, T* sDO, float* sS,
                                              float* sDP, T* sP, T* sDS, float* sDK, float* sDV, float* sLse,
                                              float* sDelta) {
  using C = KvCfg<T, DMAX>;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int dsteps = (p.D + 15) / 16;
  __syncthreads();
  const T* q = static_cast<const T*>(p.q) + b * p.q_stride[0] + h * p.q_stride[1];
  const T* go = static_cast<const T*>(p.grad_out) + b * p.dout_stride[0] + h * p.dout_stride[1];
  stage_rows<T, C::BQ, DMAX>(sQ, C::LDH, q, p.q_stride[2], p.q_stride[3], it, p.Nq, p.D, C::THREADS);
  stage_rows<T, C::BQ, DMAX>(sDO, C::LDH, go, p.dout_stride[2], p.dout_stride[3], it, p.Nq, p.D, C::THREADS);
  for (int x = threadIdx.x; x < C::BQ; x += C::THREADS) {
    const int i = it + x;
    const int64_t row = (static_cast<int64_t>(b) * p.Hq + h) * p.Nq + i;
    sLse[x] = i < p.Nq ? p.lse[row] : kNegInf;
    sDelta[x] = i < p.Nq ? p.delta[row] : 0.f;
  }
  __syncthreads();

  float* s_w = sS + warp * 16 * C::LDS;
  float* dp_w = sDP + warp * 16 * C::LDS;
  T* p_w = sP + warp * 16 * C::LDP;
  T* ds_w = sDS + warp * 16 * C::LDP;
  warp_mm_abt<T>(s_w, C::LDS, sK + warp * 16 * C::LDH, C::LDH, sQ, C::LDH, C::BQ / 16, dsteps);
  warp_mm_abt<T>(dp_w, C::LDS, sV + warp * 16 * C::LDH, C::LDH, sDO, C::LDH, C::BQ / 16, dsteps);
  __syncwarp();

  // lanes 2r, 2r+1 own key r of the warp; query columns c = half + 2 * jj
  const int r = lane / 2, half = lane % 2;
  const int key = j0 + warp * 16 + r;
  const bool key_ok = key < n_keys;
  for (int jj = 0; jj < C::BQ / 2; ++jj) {
    const int c = half + 2 * jj, i = it + c;
    bwd::ProbGrad pg{0.f, 0.f};
    if (key_ok && i < p.Nq && (PREFIX || sequence_key_visible(p, b, i, key)))
      pg = bwd::prob_and_grad(p, s_w[r * C::LDS + c], dp_w[r * C::LDS + c], sLse[c], sDelta[c],
                              bias_at(p, b, h, i, bias_col0 + key));
    p_w[r * C::LDP + c] = from_float<T>(pg.p);
    ds_w[r * C::LDP + c] = from_float<T>(pg.ds);
  }
  __syncwarp();

  warp_mm_ab_acc<T>(sDV + warp * 16 * C::LDO, C::LDO, p_w, C::LDP, sDO, C::LDH, dsteps, C::BQ / 16);
  warp_mm_ab_acc<T>(sDK + warp * 16 * C::LDO, C::LDO, ds_w, C::LDP, sQ, C::LDH, dsteps, C::BQ / 16);
  __syncwarp();
}

// PREFIX = false: grid (ceil(Nk / BK), B * Hkv). PREFIX = true: grid (ceil(P / BK), Hkv, T): the
// block loops over every batch row that uses prefix t, so the batch reduction needs no atomics.
// block KvCfg::THREADS, dynamic smem KvCfg::smem_bytes.
template <typename T, int DMAX, bool PREFIX>
__global__ void __launch_bounds__(KvCfg<T, DMAX>::THREADS, 256 / KvCfg<T, DMAX>::THREADS) dkdv_wmma_kernel(const AttnParams p) {
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 800
  using C = KvCfg<T, DMAX>;
  PTK_DYNAMIC_SMEM(unsigned char, smem);
  unsigned char* at = smem;
  T* sK = reinterpret_cast<T*>(at);
  T* sV = reinterpret_cast<T*>(at += C::kv_bytes);
  T* sQ = reinterpret_cast<T*>(at += C::kv_bytes);
  T* sDO = reinterpret_cast<T*>(at += C::qo_bytes);
  float* sS = reinterpret_cast<float*>(at += C::qo_bytes);
  float* sDP = reinterpret_cast<float*>(at += C::s_bytes);
  T* sP = reinterpret_cast<T*>(at += C::s_bytes);
  T* sDS = reinterpret_cast<T*>(at += C::p_bytes);
  float* sDK = reinterpret_cast<float*>(at += C::p_bytes);
  float* sDV = reinterpret_cast<float*>(at += C::o_bytes);
  float* sLse = reinterpret_cast<float*>(at += C::o_bytes);
  float* sDelta = sLse + C::BQ;

  const int j0 = blockIdx.x * C::BK;
  const KeyBlockRole role = key_block_role<PREFIX>(p);
  const int hk = role.hk, t = role.t, b_begin = role.b_begin, b_end = role.b_end;
  const int n_keys = PREFIX ? p.P : p.Nk;
  const int group = p.Hq / p.Hkv;

  const KeySegment<T> seg = PREFIX ? prefix_segment<T>(p, t, hk) : sequence_segment<T>(p, b_begin, hk);
  stage_rows<T, C::BK, DMAX>(sK, C::LDH, seg.k, seg.k_row, seg.k_col, j0, seg.n, p.D, C::THREADS);
  stage_rows<T, C::BK, DMAX>(sV, C::LDH, seg.v, seg.v_row, seg.v_col, j0, seg.n, p.D, C::THREADS);
  for (int idx = threadIdx.x; idx < C::BK * C::LDO; idx += C::THREADS) sDK[idx] = sDV[idx] = 0.f;

  int q_lo = 0, q_hi = p.Nq;
  if (!PREFIX) sequence_query_range(p, j0, j0 + C::BK < n_keys ? j0 + C::BK : n_keys, q_lo, q_hi);
  for (int b = b_begin; b < b_end; ++b) {
    if (PREFIX && p.prefix_mode == kBank && p.prefix_index[b] != t) continue;  // uniform per block
    for (int g = 0; g < group; ++g) {
      const int h = hk * group + g;
      for (int it = q_lo; it < q_hi; it += C::BQ)
        kv_query_tile<T, DMAX, PREFIX>(p, it, b, h, j0, n_keys, seg.bias_col0, sK, sV, sQ, sDO, sS, sDP, sP, sDS, sDK,
                                       sDV, sLse, sDelta);
    }
  }
  __syncthreads();  // the accumulators were zeroed by other warps when no query tile ran

  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int r = lane / 2, half = lane % 2;
  const int key = j0 + warp * 16 + r;
  if (key >= n_keys) return;
  const int64_t out_row = PREFIX ? (static_cast<int64_t>(t) * p.Hkv + hk) * p.P + key
                                 : (static_cast<int64_t>(b_begin) * p.Hkv + hk) * p.Nk + key;
  T* dk = static_cast<T*>(PREFIX ? p.dprefix_k : p.dk);
  T* dv = static_cast<T*>(PREFIX ? p.dprefix_v : p.dv);
  const float* dkrow = sDK + (warp * 16 + r) * C::LDO;
  const float* dvrow = sDV + (warp * 16 + r) * C::LDO;
  for (int c = half; c < p.D; c += 2) {
    if (dk) dk[out_row * p.D + c] = from_float<T>(dkrow[c]);
    if (dv) dv[out_row * p.D + c] = from_float<T>(dvrow[c]);
  }
#endif
}

}  // namespace bwd_tc

// Same kernel selection as the CUDA-core launcher: need_dq -> dQ; dk/dv set -> sequence keys;
// dprefix set -> prefix keys (prompt-only backward: delta + prefix kernel only).
template <typename T, int DMAX>
inline void launch_prefix_attention_bwd_wmma_d(const AttnParams& p, bool need_dq, ptk_stream_t stream) {
  using QC = bwd_tc::DqCfg<T, DMAX>;
  using KC = bwd_tc::KvCfg<T, DMAX>;
  launch_prefix_attention_bwd_delta<T>(p, stream);
  if (need_dq) {
    auto kernel = bwd_tc::dq_wmma_kernel<T, DMAX>;
    allow_dynamic_smem(kernel, QC::smem_bytes);
    PTK_LAUNCH(kernel, dim3(ceil_div_h(p.Nq, QC::BM), p.B * p.Hq), dim3(QC::THREADS), QC::smem_bytes, stream, p);
  }
  if ((p.dk || p.dv) && p.Nk > 0) {
    auto kernel = bwd_tc::dkdv_wmma_kernel<T, DMAX, false>;
    allow_dynamic_smem(kernel, KC::smem_bytes);
    PTK_LAUNCH(kernel, dim3(ceil_div_h(p.Nk, KC::BK), p.B * p.Hkv), dim3(KC::THREADS), KC::smem_bytes, stream, p);
  }
  if ((p.dprefix_k || p.dprefix_v) && p.prefix_mode != kNoPrefix && p.P > 0) {
    auto kernel = bwd_tc::dkdv_wmma_kernel<T, DMAX, true>;
    allow_dynamic_smem(kernel, KC::smem_bytes);
    PTK_LAUNCH(kernel, dim3(ceil_div_h(p.P, KC::BK), p.Hkv, p.T), dim3(KC::THREADS), KC::smem_bytes, stream, p);
  }
}

// float16 / bfloat16 only; head-dim buckets 64 / 128 / 256.
template <typename T>
inline void launch_prefix_attention_bwd_wmma(const AttnParams& p, bool need_dq, ptk_stream_t stream) {
  if (p.B * p.Hq == 0 || p.Nq == 0) return;
  if (p.D <= 64)
    launch_prefix_attention_bwd_wmma_d<T, 64>(p, need_dq, stream);
  else if (p.D <= 128)
    launch_prefix_attention_bwd_wmma_d<T, 128>(p, need_dq, stream);
  else
    launch_prefix_attention_bwd_wmma_d<T, 256>(p, need_dq, stream);
}

}  // namespace ptk
