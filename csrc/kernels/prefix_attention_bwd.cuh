// prefix_attention backward, FlashAttention-2 style (recompute the probabilities from the saved
// logsumexp; no probabilities are stored):
//
//   1. delta kernel: delta_i = rowsum(dO_i * O_i) - grad_lse_i            (one warp per row)
//   2. dQ kernel (query side, one block per 16 queries): over prefix + sequence key tiles,
//      dS = P * (dP - delta) [* softcap'] * scale, dQ += dS K.
//   3. key-side kernel, one block per 16 keys: dV += P^T dO, dK += dS^T Q over every query that
//      sees the key. Instantiated twice:
//        - sequence keys: block per (key tile, batch row, kv head), queries of the GQA group
//          limited to those the causal / window bounds allow;
//        - prefix keys: block per (key tile, kv head, prefix t) that loops over the batch rows
//          using prefix t (all rows when shared, row t when per row, rows with prefix_index == t
//          for a bank), so the batch reduction happens in registers: no atomics, deterministic,
//          and bank rows nobody uses get exact zeros.
// Prompt-only backward (q, k, v frozen) launches only kernels 1 and 3-prefix.
// These are the float32 kernels. float16 / bfloat16 run the same algorithm on tensor cores:
// prefix_attention_bwd_mma.cuh (mma.sync, D <= 128) and prefix_attention_bwd_mma_wide.cuh (D = 256);
// prefix_attention_launch.cuh chooses.
// Given the final lse and delta every key segment's backward is independent (no merge backward).
#pragma once

#include "prefix_attention_tile.cuh"

namespace ptk {
namespace bwd {

constexpr int kTPR = 8;  // threads per row (query row in dQ, key row in dK/dV)
constexpr int kRows = 16;
constexpr int kThreads = kRows * kTPR;

template <int DMAX>
struct Tiles {
  static constexpr int BN = DMAX >= 256 ? 16 : (DMAX >= 128 ? 32 : 64);  // key tile of the dQ kernel
  static constexpr int BQ = DMAX >= 256 ? 16 : 32;  // query tile of the dK/dV kernel (64 spills at D=64)
  static constexpr int LD = DMAX + 1;
  // dQ: sQ, sDO (kRows x DMAX), sK, sV (BN x LD), sDS (kRows x BN)
  static constexpr size_t dq_smem_bytes = (2 * kRows * DMAX + 2 * BN * LD + kRows * BN) * sizeof(float);
  // dK/dV: sK, sV (kRows x DMAX), sQ, sDO (BQ x LD), sP, sDS (kRows x BQ), lse, delta (BQ)
  static constexpr size_t kv_smem_bytes = (2 * kRows * DMAX + 2 * BQ * LD + 2 * kRows * BQ + 2 * BQ) * sizeof(float);
  // 99 KiB: the opt-in limit of sm_86/sm_89 (sm_80: 163 KiB, sm_90: 227 KiB)
  static_assert(dq_smem_bytes <= 99 * 1024 && kv_smem_bytes <= 99 * 1024, "backward tile does not fit in shared memory");
};

// P and dS of one (query, key) pair. lse = -inf (a row that sees nothing) gives P = 0.
struct ProbGrad {
  float p, ds;
};

__device__ __forceinline__ ProbGrad prob_and_grad(const AttnParams& p, float qk, float dp, float lse, float delta,
                                                  float bias) {
  const float raw = qk * p.scale;
  float s = raw, dcap = 1.f;
  if (p.softcap > 0.f) {
    const float t = tanhf(raw / p.softcap);
    s = p.softcap * t;
    dcap = 1.f - t * t;
  }
  s += bias;
  const float prob = lse == kNegInf ? 0.f : expf(s - lse);
  return {prob, prob * (dp - delta) * dcap * p.scale};
}

// grid (ceil(B * Hq * Nq / 4)), block 128: one warp per (b, h, i) row.
template <typename T>
__global__ void __launch_bounds__(128) delta_kernel(const AttnParams p) {
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * 4 + warp;
  const int64_t rows = static_cast<int64_t>(p.B) * p.Hq * p.Nq;
  float acc = 0.f;
  int b = 0, h = 0, i = 0;
  if (row < rows) {
    i = static_cast<int>(row % p.Nq);
    h = static_cast<int>((row / p.Nq) % p.Hq);
    b = static_cast<int>(row / (static_cast<int64_t>(p.Nq) * p.Hq));
    const T* o = static_cast<const T*>(p.out) + b * p.out_stride[0] + h * p.out_stride[1] + i * p.out_stride[2];
    const T* g = static_cast<const T*>(p.grad_out) + b * p.dout_stride[0] + h * p.dout_stride[1] + i * p.dout_stride[2];
    for (int c = lane; c < p.D; c += 32) acc = fmaf(to_float(o[c * p.out_stride[3]]), to_float(g[c * p.dout_stride[3]]), acc);
  }
  acc = group_sum<32>(acc);  // the whole warp takes part, also past the last row
  if (row < rows && lane == 0) p.delta[row] = acc - (p.grad_lse ? p.grad_lse[row] : 0.f);
}

// ---------------------------------------------------------------------------------------------
// dQ
// ---------------------------------------------------------------------------------------------

template <typename T, int DMAX>
__device__ __forceinline__ void dq_key_tile(const AttnParams& p, const KeySegment<T>& seg, int kt, int b, int h, int i,
                                            bool row_ok, float lse, float delta, const float* sQrow,
                                            const float* sDOrow, float* sK, float* sV, float* sDSrow,
                                            float (&acc)[DMAX / kTPR]) {
  using TL = Tiles<DMAX>;
  constexpr int BN = TL::BN;
  const int lane8 = threadIdx.x % kTPR;
  __syncthreads();
  load_rows<T, BN, kThreads>(sK, TL::LD, seg.k, seg.k_row, seg.k_col, kt, seg.n, p.D, DMAX);
  load_rows<T, BN, kThreads>(sV, TL::LD, seg.v, seg.v_row, seg.v_col, kt, seg.n, p.D, DMAX);
  __syncthreads();
#pragma unroll
  for (int jj = 0; jj < BN / kTPR; ++jj) {
    const int c = lane8 + jj * kTPR;
    const int key = kt + c;
    float ds = 0.f;
    if (row_ok && key < seg.n && (seg.is_prefix || sequence_key_visible(p, b, i, key))) {
      ds = prob_and_grad(p, dot_rows(sQrow, sK + c * TL::LD, p.D), dot_rows(sDOrow, sV + c * TL::LD, p.D), lse,
                         delta, bias_at(p, b, h, i, seg.bias_col0 + key))
               .ds;
    }
    sDSrow[c] = ds;
  }
  __syncwarp();
  const int n_valid = seg.n - kt < BN ? seg.n - kt : BN;
  for (int kk = 0; kk < n_valid; ++kk) {
    const float ds = sDSrow[kk];
    const float* krow = sK + kk * TL::LD + lane8;
#pragma unroll
    for (int j = 0; j < DMAX / kTPR; ++j) acc[j] = fmaf(ds, krow[j * kTPR], acc[j]);
  }
}

// grid (ceil(Nq / 16), B * Hq), block 128.
template <typename T, int DMAX>
__global__ void __launch_bounds__(kThreads, 2) dq_kernel(const AttnParams p) {
  using TL = Tiles<DMAX>;
  constexpr int CPT = DMAX / kTPR;
  PTK_DYNAMIC_SMEM(float, smem);
  float* sQ = smem;
  float* sDO = sQ + kRows * DMAX;
  float* sK = sDO + kRows * DMAX;
  float* sV = sK + TL::BN * TL::LD;
  float* sDS = sV + TL::BN * TL::LD;

  const int r = threadIdx.x / kTPR, lane8 = threadIdx.x % kTPR;
  const int b = blockIdx.y / p.Hq, h = blockIdx.y % p.Hq;
  const int hk = h / (p.Hq / p.Hkv);
  const int i0 = blockIdx.x * kRows, i = i0 + r;
  const bool row_ok = i < p.Nq;
  const int i1 = i0 + kRows < p.Nq ? i0 + kRows : p.Nq;
  const int64_t row = (static_cast<int64_t>(b) * p.Hq + h) * p.Nq + i;

  const T* q = static_cast<const T*>(p.q) + b * p.q_stride[0] + h * p.q_stride[1];
  const T* go = static_cast<const T*>(p.grad_out) + b * p.dout_stride[0] + h * p.dout_stride[1];
  load_rows<T, kRows, kThreads>(sQ, DMAX, q, p.q_stride[2], p.q_stride[3], i0, p.Nq, p.D, DMAX);
  load_rows<T, kRows, kThreads>(sDO, DMAX, go, p.dout_stride[2], p.dout_stride[3], i0, p.Nq, p.D, DMAX);
  const float lse = row_ok ? p.lse[row] : kNegInf;
  const float delta = row_ok ? p.delta[row] : 0.f;

  float acc[CPT];
#pragma unroll
  for (int j = 0; j < CPT; ++j) acc[j] = 0.f;

  if (p.prefix_mode != kNoPrefix && p.P > 0) {
    const KeySegment<T> seg = prefix_segment<T>(p, prefix_of_row(p, b), hk);
    for (int kt = 0; kt < seg.n; kt += TL::BN)
      dq_key_tile<T, DMAX>(p, seg, kt, b, h, i, row_ok, lse, delta, sQ + r * DMAX, sDO + r * DMAX, sK, sV,
                           sDS + r * TL::BN, acc);
  }
  int lo, hi;
  sequence_key_range(p, i0, i1, lo, hi);
  const KeySegment<T> seq = sequence_segment<T>(p, b, hk);
  for (int kt = lo; kt < hi; kt += TL::BN)
    dq_key_tile<T, DMAX>(p, seq, kt, b, h, i, row_ok, lse, delta, sQ + r * DMAX, sDO + r * DMAX, sK, sV,
                         sDS + r * TL::BN, acc);

  if (!row_ok) return;
  T* dq = static_cast<T*>(p.dq) + row * p.D;
#pragma unroll
  for (int j = 0; j < CPT; ++j) {
    const int c = lane8 + j * kTPR;
    if (c < p.D) dq[c] = from_float<T>(acc[j]);
  }
}

// ---------------------------------------------------------------------------------------------
// dK / dV (sequence keys) and dprefix_k / dprefix_v (prefix keys)
// ---------------------------------------------------------------------------------------------

// One tile of queries [it, it + BN) of (b, h) against the block's 16 keys (already in sK/sV).
template <typename T, int DMAX, bool PREFIX>
__device__ __forceinline__ void kv_query_tile(const AttnParams& p, int it, int b, int h, int j0, int n_keys,
                                              int bias_col0, const float* sK, const float* sV, float* sQ,
                                              float* sDO, float* sLse, float* sDelta, float* sP, float* sDS,
                                              float (&acc_k)[DMAX / kTPR], float (&acc_v)[DMAX / kTPR]) {
  using TL = Tiles<DMAX>;
  constexpr int BN = TL::BQ;
  const int r = threadIdx.x / kTPR, lane8 = threadIdx.x % kTPR;
  const int key = j0 + r;
  const bool key_ok = key < n_keys;
  __syncthreads();
  const T* q = static_cast<const T*>(p.q) + b * p.q_stride[0] + h * p.q_stride[1];
  const T* go = static_cast<const T*>(p.grad_out) + b * p.dout_stride[0] + h * p.dout_stride[1];
  load_rows<T, BN, kThreads>(sQ, TL::LD, q, p.q_stride[2], p.q_stride[3], it, p.Nq, p.D, DMAX);
  load_rows<T, BN, kThreads>(sDO, TL::LD, go, p.dout_stride[2], p.dout_stride[3], it, p.Nq, p.D, DMAX);
  for (int x = threadIdx.x; x < BN; x += kThreads) {
    const int i = it + x;
    const int64_t row = (static_cast<int64_t>(b) * p.Hq + h) * p.Nq + i;
    sLse[x] = i < p.Nq ? p.lse[row] : kNegInf;
    sDelta[x] = i < p.Nq ? p.delta[row] : 0.f;
  }
  __syncthreads();
#pragma unroll
  for (int jj = 0; jj < BN / kTPR; ++jj) {
    const int c = lane8 + jj * kTPR;
    const int i = it + c;
    ProbGrad pg{0.f, 0.f};
    if (key_ok && i < p.Nq && (PREFIX || sequence_key_visible(p, b, i, key))) {
      pg = prob_and_grad(p, dot_rows(sQ + c * TL::LD, sK + r * DMAX, p.D), dot_rows(sDO + c * TL::LD, sV + r * DMAX, p.D),
                         sLse[c], sDelta[c], bias_at(p, b, h, i, bias_col0 + key));
    }
    sP[r * BN + c] = pg.p;
    sDS[r * BN + c] = pg.ds;
  }
  __syncwarp();
  const int n_valid = p.Nq - it < BN ? p.Nq - it : BN;
  for (int x = 0; x < n_valid; ++x) {
    const float pr = sP[r * BN + x], ds = sDS[r * BN + x];
    const float* dorow = sDO + x * TL::LD + lane8;
    const float* qrow = sQ + x * TL::LD + lane8;
#pragma unroll
    for (int j = 0; j < DMAX / kTPR; ++j) {
      acc_v[j] = fmaf(pr, dorow[j * kTPR], acc_v[j]);
      acc_k[j] = fmaf(ds, qrow[j * kTPR], acc_k[j]);
    }
  }
}

// PREFIX = false: grid (ceil(Nk / 16), B * Hkv). PREFIX = true: grid (ceil(P / 16), Hkv, T).
// block 128, dynamic smem Tiles<DMAX>::kv_smem_bytes.
template <typename T, int DMAX, bool PREFIX>
__global__ void __launch_bounds__(kThreads, 2) dkdv_kernel(const AttnParams p) {
  using TL = Tiles<DMAX>;
  constexpr int CPT = DMAX / kTPR;
  constexpr int BN = TL::BQ;
  PTK_DYNAMIC_SMEM(float, smem);
  float* sK = smem;
  float* sV = sK + kRows * DMAX;
  float* sQ = sV + kRows * DMAX;
  float* sDO = sQ + BN * TL::LD;
  float* sP = sDO + BN * TL::LD;
  float* sDS = sP + kRows * BN;
  float* sLse = sDS + kRows * BN;
  float* sDelta = sLse + BN;

  const int r = threadIdx.x / kTPR, lane8 = threadIdx.x % kTPR;
  const int j0 = blockIdx.x * kRows;
  const KeyBlockRole role = key_block_role<PREFIX>(p);
  const int hk = role.hk, t = role.t, b_begin = role.b_begin, b_end = role.b_end;
  const int n_keys = PREFIX ? p.P : p.Nk;
  const int group = p.Hq / p.Hkv;

  // This block's keys/values: rows [j0, j0 + 16) of prefix t or of the sequence of row b_begin.
  const KeySegment<T> seg = PREFIX ? prefix_segment<T>(p, t, hk) : sequence_segment<T>(p, b_begin, hk);
  load_rows<T, kRows, kThreads>(sK, DMAX, seg.k, seg.k_row, seg.k_col, j0, seg.n, p.D, DMAX);
  load_rows<T, kRows, kThreads>(sV, DMAX, seg.v, seg.v_row, seg.v_col, j0, seg.n, p.D, DMAX);

  float acc_k[CPT], acc_v[CPT];
#pragma unroll
  for (int j = 0; j < CPT; ++j) acc_k[j] = acc_v[j] = 0.f;

  int q_lo = 0, q_hi = p.Nq;
  if (!PREFIX) sequence_query_range(p, j0, j0 + kRows < n_keys ? j0 + kRows : n_keys, q_lo, q_hi);
  for (int b = b_begin; b < b_end; ++b) {
    if (PREFIX && p.prefix_mode == kBank && p.prefix_index[b] != t) continue;  // uniform per block
    for (int g = 0; g < group; ++g) {
      const int h = hk * group + g;
      for (int it = q_lo; it < q_hi; it += BN)
        kv_query_tile<T, DMAX, PREFIX>(p, it, b, h, j0, n_keys, seg.bias_col0, sK, sV, sQ, sDO, sLse, sDelta, sP, sDS,
                                       acc_k, acc_v);
    }
  }

  const int key = j0 + r;
  if (key >= n_keys) return;
  const int64_t out_row = PREFIX ? (static_cast<int64_t>(t) * p.Hkv + hk) * p.P + key
                                 : (static_cast<int64_t>(b_begin) * p.Hkv + hk) * p.Nk + key;
  T* dk = static_cast<T*>(PREFIX ? p.dprefix_k : p.dk);
  T* dv = static_cast<T*>(PREFIX ? p.dprefix_v : p.dv);
#pragma unroll
  for (int j = 0; j < CPT; ++j) {
    const int c = lane8 + j * kTPR;
    if (c < p.D) {
      if (dk) dk[out_row * p.D + c] = from_float<T>(acc_k[j]);
      if (dv) dv[out_row * p.D + c] = from_float<T>(acc_v[j]);
    }
  }
}

}  // namespace bwd

// delta = rowsum(dO * O) - grad_lse into p.delta (shared by the CUDA-core and tensor-core paths).
template <typename T>
inline void launch_prefix_attention_bwd_delta(const AttnParams& p, ptk_stream_t stream) {
  const int64_t rows = static_cast<int64_t>(p.B) * p.Hq * p.Nq;
  auto kernel = bwd::delta_kernel<T>;
  PTK_LAUNCH(kernel, dim3(static_cast<unsigned>((rows + 3) / 4)), dim3(128), 0, stream, p);
}

// Which gradient kernels run: need_dq -> dQ kernel; dk/dv pointers set -> sequence key kernel;
// dprefix pointers set -> prefix key kernel. p.delta must point to B*Hq*Nq floats of scratch.
template <typename T, int DMAX>
inline void launch_prefix_attention_bwd_d(const AttnParams& p, bool need_dq, ptk_stream_t stream) {
  using TL = bwd::Tiles<DMAX>;
  launch_prefix_attention_bwd_delta<T>(p, stream);
  if (need_dq) {
    auto kernel = bwd::dq_kernel<T, DMAX>;
    allow_dynamic_smem(kernel, TL::dq_smem_bytes);
    PTK_LAUNCH(kernel, dim3(ceil_div_h(p.Nq, bwd::kRows), p.B * p.Hq), dim3(bwd::kThreads), TL::dq_smem_bytes, stream,
               p);
  }
  if ((p.dk || p.dv) && p.Nk > 0) {
    auto kernel = bwd::dkdv_kernel<T, DMAX, false>;
    allow_dynamic_smem(kernel, TL::kv_smem_bytes);
    PTK_LAUNCH(kernel, dim3(ceil_div_h(p.Nk, bwd::kRows), p.B * p.Hkv), dim3(bwd::kThreads), TL::kv_smem_bytes,
               stream, p);
  }
  if ((p.dprefix_k || p.dprefix_v) && p.prefix_mode != kNoPrefix && p.P > 0) {
    auto kernel = bwd::dkdv_kernel<T, DMAX, true>;
    allow_dynamic_smem(kernel, TL::kv_smem_bytes);
    PTK_LAUNCH(kernel, dim3(ceil_div_h(p.P, bwd::kRows), p.Hkv, p.T), dim3(bwd::kThreads), TL::kv_smem_bytes, stream,
               p);
  }
}

// CUDA-core path (float32; any dtype compiles).
template <typename T>
inline void launch_prefix_attention_bwd_simt(const AttnParams& p, bool need_dq, ptk_stream_t stream) {
  if (p.B * p.Hq == 0 || p.Nq == 0) return;
  if (p.D <= 64)
    launch_prefix_attention_bwd_d<T, 64>(p, need_dq, stream);
  else if (p.D <= 128)
    launch_prefix_attention_bwd_d<T, 128>(p, need_dq, stream);
  else
    launch_prefix_attention_bwd_d<T, 256>(p, need_dq, stream);
}

}  // namespace ptk
