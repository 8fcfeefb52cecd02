// prefix_attention backward on tensor cores (float16 / bfloat16, head dim <= 128, sm_80+), the
// FlashAttention-2 backward on the primitives of mma_sm80.cuh (mma.sync m16n8k16, ldmatrix,
// cp.async), accumulators in registers, probabilities recomputed from the saved lse in the log2
// domain (scale folded into the exponent). delta = rowsum(dO * O) - grad_lse comes from
// prefix_attention_bwd.cuh's delta kernel.
//
//   dK/dV kernel, split over keys as FA2: block = 4 warps x 16 keys (BK = 64 keys); the block's K
//     and V rows stay in shared memory; Q and dO tiles of BQ queries stream through a 2-stage
//     cp.async ring. Per query tile, warp w: S^T = K_w Q^T, dP^T = V_w dO^T (registers),
//     P^T = exp2(x - lse), dS^T = P^T (dP^T - delta) [softcap'] scale, then dV_w += P^T dO and
//     dK_w += dS^T Q with P^T / dS^T taken from registers as A operands (no shared round trip).
//     Sequence keys: block per (key tile, batch row, kv head), query tiles limited by causal /
//     window. Prefix keys ("designed for its shape": P is small, the batch is the long axis): the
//     block's work list is every (batch row using prefix t, GQA head, query tile); it is cut into
//     `prefix_splits` contiguous shares, one block each, which write fp32 partial sums; a reduce
//     kernel adds the shares in a fixed order. Deterministic, no atomics, and the grid holds
//     ceil(P / 64) * Hkv * T * splits blocks, splits chosen from the device's SM count.
//   dQ kernel, split over queries: block = 4 warps x 16 queries, K/V tiles through the ring
//     (the forward's tile list), dQ_w += dS K in registers.
// Masks are evaluated only where a tile crosses a causal / window edge or a padding mask exists;
// query and key tails need none (zero-filled rows, lse = +inf for absent queries gives P = 0).
#pragma once

#include "mma_sm80.cuh"
#include "prefix_attention_bwd.cuh"
#include "prefix_attention_fwd_mma.cuh"

namespace ptk {
namespace bwd_mma {

constexpr float kLog2e = 1.4426950408889634f;

template <typename T, int DMAX>
struct Cfg {
  static_assert(DMAX <= 128, "the register-accumulator backward covers head dims up to 128");
  static constexpr int WARPS = 4;
  static constexpr int THREADS = WARPS * 32;
  static constexpr int BK = WARPS * 16;            // keys per dK/dV block
  // Queries per tile of the dK/dV kernel. Per thread the kernel holds dK + dV (DMAX / 2 fp32
  // registers each) and S^T + dP^T (BQ / 4 each): at D = 64, BQ = 64 made that 128 registers and
  // ptxas filled the rest of the 255 allowed with unrolled ldmatrix prefetch; BQ = 32 (96) fits
  // the 168 of 3 blocks per SM without spills (BQ = 64 under that cap spills 32-40 bytes). At
  // D = 128 the accumulators alone are 160 registers: 2 blocks per SM (224 / 255 registers).
  static constexpr int BQ = 32;
  static constexpr int KV_MIN_BLOCKS = DMAX <= 64 ? 3 : 2;  // __launch_bounds__ of dkdv_mma_kernel
  static constexpr int BM = WARPS * 16;            // queries per dQ block
  static constexpr int BN = DMAX >= 128 ? 32 : 64;  // keys per tile of the dQ kernel
  static constexpr int LD = DMAX + 8;
  static constexpr size_t kv_bytes = (2 * static_cast<size_t>(BK) * LD + 2 * 2 * static_cast<size_t>(BQ) * LD) * sizeof(T);
  static constexpr size_t dq_bytes = (2 * static_cast<size_t>(BM) * LD + 2 * 2 * static_cast<size_t>(BN) * LD) * sizeof(T);
  static_assert(kv_bytes <= 99 * 1024 && dq_bytes <= 99 * 1024, "backward tiles exceed shared memory");
};

// log2-domain logit of one score, and the softcap derivative (1 when there is no softcap).
struct Logit {
  float x, dcap;
};
__device__ __forceinline__ Logit logit(const AttnParams& p, bool plain, float qk, float bias) {
  if (plain) return {qk * p.scale * kLog2e, 1.f};
  const float raw = qk * p.scale;
  float s = raw, dcap = 1.f;
  if (p.softcap > 0.f) {
    const float t = tanhf(raw / p.softcap);
    s = p.softcap * t;
    dcap = 1.f - t * t;
  }
  return {(s + bias) * kLog2e, dcap};
}

// lse of a query in the log2 domain; +inf for absent queries and rows that saw no key (P = 0).
__device__ __forceinline__ float lse_log2(const AttnParams& p, int64_t row, bool ok) {
  const float l = ok ? p.lse[row] : kNegInf;
  return l == kNegInf ? INFINITY : l * kLog2e;
}

// ---------------------------------------------------------------------------------------------
// dK / dV (sequence) and dprefix_k / dprefix_v (prefix, split partials)
// ---------------------------------------------------------------------------------------------

// The (batch row, head in group, query tile) work items of a key block, in a fixed order.
struct KvWork {
  int b_begin, n_items, group, n_qt, q_lo;
  __device__ __forceinline__ void at(int idx, int& b, int& g, int& it, int BQ) const {
    const int per_b = group * n_qt;
    b = b_begin + idx / per_b;
    g = (idx % per_b) / n_qt;
    it = q_lo + (idx % n_qt) * BQ;
  }
};

template <typename T, int DMAX>
__device__ __forceinline__ void issue_q_tile(const AttnParams& p, int b, int h, int it, T* sQ, T* sDO, int dcols) {
  using C = Cfg<T, DMAX>;
  const T* q = static_cast<const T*>(p.q) + b * p.q_stride[0] + h * p.q_stride[1];
  const T* go = static_cast<const T*>(p.grad_out) + b * p.dout_stride[0] + h * p.dout_stride[1];
  fwd_mma::load_tile<T, C::BQ, C::LD, C::THREADS>(sQ, q, p.q_stride[2], p.q_stride[3], it, p.Nq, p.D, dcols, p.vec16);
  fwd_mma::load_tile<T, C::BQ, C::LD, C::THREADS>(sDO, go, p.dout_stride[2], p.dout_stride[3], it, p.Nq, p.D, dcols,
                                                 p.vec16);
}

// Whether a bank row is skipped by the prefix-t block (uniform per block).
__device__ __forceinline__ bool skip_row(const AttnParams& p, bool prefix, int t, int b) {
  return prefix && p.prefix_mode == kBank && p.prefix_index[b] != t;
}

// PREFIX = false: grid (ceil(Nk / BK), B * Hkv). PREFIX = true: grid (ceil(P / BK), Hkv, T * splits).
template <typename T, int DMAX, bool PREFIX>
__global__ void __launch_bounds__(Cfg<T, DMAX>::THREADS, Cfg<T, DMAX>::KV_MIN_BLOCKS) dkdv_mma_kernel(const AttnParams p) {
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 800
  using C = Cfg<T, DMAX>;
  constexpr int NT_S = C::BQ / 8;  // n8 tiles over the query tile
  constexpr int NT_O = DMAX / 8;
  PTK_DYNAMIC_SMEM(unsigned char, smem);
  T* sK = reinterpret_cast<T*>(smem);
  T* sV = sK + C::BK * C::LD;
  T* sRing = sV + C::BK * C::LD;  // stage s: Q at sRing + 2 s BQ LD, dO right after
  constexpr int kStage = 2 * C::BQ * C::LD;

  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g4 = lane / 4, t4 = lane % 4;
  const int j0 = blockIdx.x * C::BK;
  const int splits = PREFIX ? p.prefix_splits : 1;
  const int t = PREFIX ? static_cast<int>(blockIdx.z) / splits : 0;
  const int split = PREFIX ? static_cast<int>(blockIdx.z) % splits : 0;
  const int hk = PREFIX ? static_cast<int>(blockIdx.y) : static_cast<int>(blockIdx.y) % p.Hkv;
  const int b_seq = PREFIX ? 0 : static_cast<int>(blockIdx.y) / p.Hkv;
  const int n_keys = PREFIX ? p.P : p.Nk;
  const int group = p.Hq / p.Hkv;
  const int dcols = (p.D + 15) / 16 * 16, ksteps = dcols / 16;
  const bool plain = p.softcap <= 0.f && !p.attn_bias;

  KvWork work;
  work.group = group;
  int q_lo = 0, q_hi = p.Nq;
  if (!PREFIX) sequence_query_range(p, j0, j0 + C::BK < n_keys ? j0 + C::BK : n_keys, q_lo, q_hi);
  work.q_lo = q_lo;
  work.n_qt = q_hi > q_lo ? (q_hi - q_lo + C::BQ - 1) / C::BQ : 0;
  int nb;
  if (PREFIX) {
    work.b_begin = p.prefix_mode == kPerRow ? t : 0;
    nb = p.prefix_mode == kPerRow ? 1 : p.B;
  } else {
    work.b_begin = b_seq;
    nb = 1;
  }
  const int total = nb * group * work.n_qt;
  const int per = (total + splits - 1) / splits;
  const int w_begin = split * per < total ? split * per : total;
  const int w_end = w_begin + per < total ? w_begin + per : total;

  const KeySegment<T> seg = PREFIX ? prefix_segment<T>(p, t, hk) : sequence_segment<T>(p, b_seq, hk);
  fwd_mma::load_tile<T, C::BK, C::LD, C::THREADS>(sK, seg.k, seg.k_row, seg.k_col, j0, seg.n, p.D, dcols, p.vec16);
  fwd_mma::load_tile<T, C::BK, C::LD, C::THREADS>(sV, seg.v, seg.v_row, seg.v_col, j0, seg.n, p.D, dcols, p.vec16);

  // The block's items, skipping bank rows that use another prefix (the next live item after idx).
  auto next_live = [&](int idx) {
    while (idx < w_end) {
      int b, g, it;
      work.at(idx, b, g, it, C::BQ);
      if (!skip_row(p, PREFIX, t, b)) break;
      idx += group * work.n_qt - (idx % (group * work.n_qt));  // jump to the next batch row
    }
    return idx < w_end ? idx : w_end;
  };

  float dk[NT_O][4], dv[NT_O][4];
#pragma unroll
  for (int nt = 0; nt < NT_O; ++nt)
#pragma unroll
    for (int e = 0; e < 4; ++e) dk[nt][e] = dv[nt][e] = 0.f;

  int cur = next_live(w_begin);
  if (cur < w_end) {
    int b, g, it;
    work.at(cur, b, g, it, C::BQ);
    issue_q_tile<T, DMAX>(p, b, hk * group + g, it, sRing, sRing + C::BQ * C::LD, dcols);
  }
  tc::cp_async_commit();  // group: K, V and the first query tile

  for (int stage = 0; cur < w_end; ++stage) {
    const int nxt = next_live(cur + 1);
    if (nxt < w_end) {
      int b, g, it;
      work.at(nxt, b, g, it, C::BQ);
      T* s = sRing + ((stage + 1) % 2) * kStage;
      issue_q_tile<T, DMAX>(p, b, hk * group + g, it, s, s + C::BQ * C::LD, dcols);
    }
    tc::cp_async_commit();
    tc::cp_async_wait<1>();
    __syncthreads();

    int b, g, it;
    work.at(cur, b, g, it, C::BQ);
    const int h = hk * group + g;
    const T* sQ = sRing + (stage % 2) * kStage;
    const T* sDO = sQ + C::BQ * C::LD;

    // S^T = K_w Q^T and dP^T = V_w dO^T: 16 keys x BQ queries per warp
    float s[NT_S][4], dp[NT_S][4];
#pragma unroll
    for (int nt = 0; nt < NT_S; ++nt)
#pragma unroll
      for (int e = 0; e < 4; ++e) s[nt][e] = dp[nt][e] = 0.f;
#pragma unroll
    for (int ks = 0; ks < DMAX / 16; ++ks) {
      if (ks < ksteps) {
        uint32_t ka[4], va[4];
        tc::ldmatrix_x4(ka, sK + (warp * 16 + lane % 16) * C::LD + ks * 16 + (lane / 16) * 8);
        tc::ldmatrix_x4(va, sV + (warp * 16 + lane % 16) * C::LD + ks * 16 + (lane / 16) * 8);
#pragma unroll
        for (int np = 0; np < C::BQ / 16; ++np) {
          const int off = (np * 16 + (lane / 16) * 8 + lane % 8) * C::LD + ks * 16 + ((lane / 8) % 2) * 8;
          uint32_t qb[4], ob[4];
          tc::ldmatrix_x4(qb, sQ + off);
          tc::ldmatrix_x4(ob, sDO + off);
          const uint32_t q0[2] = {qb[0], qb[1]}, q1[2] = {qb[2], qb[3]};
          const uint32_t o0[2] = {ob[0], ob[1]}, o1[2] = {ob[2], ob[3]};
          tc::mma_16816<T>(s[2 * np], ka, q0);
          tc::mma_16816<T>(s[2 * np + 1], ka, q1);
          tc::mma_16816<T>(dp[2 * np], va, o0);
          tc::mma_16816<T>(dp[2 * np + 1], va, o1);
        }
      }
    }

    // P^T and dS^T; masks only where the tile crosses a causal / window edge or padding exists
    bool boundary = false;
    if (!PREFIX) {
      const int shift = p.Nk - p.Nq;
      boundary = p.key_padding_mask != nullptr ||
                 (p.causal && j0 + C::BK - 1 > it + shift + PTK_PLANTED_CAUSAL_SHIFT) ||
                 (p.window > 0 && (it + C::BQ - 1) + shift - j0 >= p.window);
    }
    const int64_t row0 = (static_cast<int64_t>(b) * p.Hq + h) * p.Nq;
#pragma unroll
    for (int nt = 0; nt < NT_S; ++nt)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int key = j0 + warp * 16 + g4 + 8 * (e / 2);
        const int i = it + nt * 8 + 2 * t4 + (e % 2);
        const bool q_ok = i < p.Nq;
        const float bias = (!plain && q_ok && key < n_keys) ? bias_at(p, b, h, i, seg.bias_col0 + key) : 0.f;
        const Logit lg = logit(p, plain, s[nt][e], bias);
        float pr = exp2f(lg.x - lse_log2(p, row0 + i, q_ok));
        if (boundary && !(key < n_keys && sequence_key_visible(p, b, i, key))) pr = 0.f;
        const float delta = q_ok ? p.delta[row0 + i] : 0.f;
        s[nt][e] = pr;
        dp[nt][e] = pr * (dp[nt][e] - delta) * lg.dcap * p.scale;
      }

    // dV_w += P^T dO, dK_w += dS^T Q (A operands from registers, B = dO / Q through ldmatrix.trans)
#pragma unroll
    for (int kk = 0; kk < C::BQ / 16; ++kk) {
      uint32_t pa[4], da[4];
      pa[0] = tc::pack2<T>(s[2 * kk][0], s[2 * kk][1]);
      pa[1] = tc::pack2<T>(s[2 * kk][2], s[2 * kk][3]);
      pa[2] = tc::pack2<T>(s[2 * kk + 1][0], s[2 * kk + 1][1]);
      pa[3] = tc::pack2<T>(s[2 * kk + 1][2], s[2 * kk + 1][3]);
      da[0] = tc::pack2<T>(dp[2 * kk][0], dp[2 * kk][1]);
      da[1] = tc::pack2<T>(dp[2 * kk][2], dp[2 * kk][3]);
      da[2] = tc::pack2<T>(dp[2 * kk + 1][0], dp[2 * kk + 1][1]);
      da[3] = tc::pack2<T>(dp[2 * kk + 1][2], dp[2 * kk + 1][3]);
#pragma unroll
      for (int dpi = 0; dpi < DMAX / 16; ++dpi) {
        if (dpi < ksteps) {
          const int off = (kk * 16 + ((lane / 8) % 2) * 8 + lane % 8) * C::LD + dpi * 16 + (lane / 16) * 8;
          uint32_t ob[4], qb[4];
          tc::ldmatrix_x4_trans(ob, sDO + off);
          tc::ldmatrix_x4_trans(qb, sQ + off);
          const uint32_t o0[2] = {ob[0], ob[1]}, o1[2] = {ob[2], ob[3]};
          const uint32_t q0[2] = {qb[0], qb[1]}, q1[2] = {qb[2], qb[3]};
          tc::mma_16816<T>(dv[2 * dpi], pa, o0);
          tc::mma_16816<T>(dv[2 * dpi + 1], pa, o1);
          tc::mma_16816<T>(dk[2 * dpi], da, q0);
          tc::mma_16816<T>(dk[2 * dpi + 1], da, q1);
        }
      }
    }
    __syncthreads();  // every warp is done with this stage before the next iteration refills it
    cur = nxt;
  }

  // epilogue: rows g4 and g4 + 8 of the warp's 16 keys
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int key = j0 + warp * 16 + g4 + 8 * r;
    if (key >= n_keys) continue;
#pragma unroll
    for (int nt = 0; nt < NT_O; ++nt) {
      const int c = nt * 8 + 2 * t4;
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        if (c + e >= p.D) continue;
        const float vk = dk[nt][2 * r + e], vv = dv[nt][2 * r + e];
        if (PREFIX && splits > 1) {
          const int64_t at = (((static_cast<int64_t>(split) * p.T + t) * p.Hkv + hk) * p.P + key) * p.D + c + e;
          if (p.dprefix_k) p.part_dpk[at] = vk;
          if (p.dprefix_v) p.part_dpv[at] = vv;
        } else {
          const int64_t out_row = PREFIX ? (static_cast<int64_t>(t) * p.Hkv + hk) * p.P + key
                                         : (static_cast<int64_t>(b_seq) * p.Hkv + hk) * p.Nk + key;
          T* gk = static_cast<T*>(PREFIX ? p.dprefix_k : p.dk);
          T* gv = static_cast<T*>(PREFIX ? p.dprefix_v : p.dv);
          if (gk) gk[out_row * p.D + c + e] = from_float<T>(vk);
          if (gv) gv[out_row * p.D + c + e] = from_float<T>(vv);
        }
      }
    }
  }
#endif
}

// dprefix = sum over the splits of the fp32 partials, in split order (deterministic).
// grid (ceil(T * Hkv * P * D / 256)), block 256.
template <typename T>
__global__ void __launch_bounds__(256) prefix_split_reduce_kernel(const AttnParams p) {
  const int64_t n = static_cast<int64_t>(p.T) * p.Hkv * p.P * p.D;
  const int64_t idx = static_cast<int64_t>(blockIdx.x) * 256 + threadIdx.x;
  if (idx >= n) return;
  float sk = 0.f, sv = 0.f;
  for (int s = 0; s < p.prefix_splits; ++s) {
    if (p.dprefix_k) sk += p.part_dpk[s * n + idx];
    if (p.dprefix_v) sv += p.part_dpv[s * n + idx];
  }
  if (p.dprefix_k) static_cast<T*>(p.dprefix_k)[idx] = from_float<T>(sk);
  if (p.dprefix_v) static_cast<T*>(p.dprefix_v)[idx] = from_float<T>(sv);
}

// ---------------------------------------------------------------------------------------------
// dQ
// ---------------------------------------------------------------------------------------------

// grid (ceil(Nq / BM), B * Hq).
template <typename T, int DMAX>
__global__ void __launch_bounds__(Cfg<T, DMAX>::THREADS, 2) dq_mma_kernel(const AttnParams p) {
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 800
  using C = Cfg<T, DMAX>;
  constexpr int NT_S = C::BN / 8;
  constexpr int NT_O = DMAX / 8;
  PTK_DYNAMIC_SMEM(unsigned char, smem);
  T* sQ = reinterpret_cast<T*>(smem);
  T* sDO = sQ + C::BM * C::LD;
  T* sKV = sDO + C::BM * C::LD;  // stage s: K at sKV + 2 s BN LD, V right after
  constexpr int kStage = 2 * C::BN * C::LD;

  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g4 = lane / 4, t4 = lane % 4;
  const int b = blockIdx.y / p.Hq, h = blockIdx.y % p.Hq;
  const int hk = h / (p.Hq / p.Hkv);
  const int i0 = blockIdx.x * C::BM;
  const int i1 = i0 + C::BM < p.Nq ? i0 + C::BM : p.Nq;
  const int dcols = (p.D + 15) / 16 * 16, ksteps = dcols / 16;
  const bool plain = p.softcap <= 0.f && !p.attn_bias;

  // the forward's flat tile list (prefix tiles, then the visible sequence tiles), tiles of BN
  fwd_mma::TileList<T> tl;
  const bool has_prefix = p.prefix_mode != kNoPrefix && p.P > 0;
  tl.pre = has_prefix ? prefix_segment<T>(p, prefix_of_row(p, b), hk) : sequence_segment<T>(p, b, hk);
  tl.n_pre = has_prefix ? (p.P + C::BN - 1) / C::BN : 0;
  int seq_hi;
  sequence_key_range(p, i0, i1, tl.seq_lo, seq_hi);
  tl.seq = sequence_segment<T>(p, b, hk);
  tl.n_tiles = tl.n_pre + (seq_hi > tl.seq_lo ? (seq_hi - tl.seq_lo + C::BN - 1) / C::BN : 0);

  const int64_t row0 = (static_cast<int64_t>(b) * p.Hq + h) * p.Nq;
  const int row_q[2] = {i0 + warp * 16 + g4, i0 + warp * 16 + g4 + 8};
  float lse2[2], delta[2];
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    lse2[r] = lse_log2(p, row0 + row_q[r], row_q[r] < p.Nq);
    delta[r] = row_q[r] < p.Nq ? p.delta[row0 + row_q[r]] : 0.f;
  }
  float dq[NT_O][4];
#pragma unroll
  for (int nt = 0; nt < NT_O; ++nt)
#pragma unroll
    for (int e = 0; e < 4; ++e) dq[nt][e] = 0.f;

  if (tl.n_tiles > 0) {
    const T* q = static_cast<const T*>(p.q) + b * p.q_stride[0] + h * p.q_stride[1];
    const T* go = static_cast<const T*>(p.grad_out) + b * p.dout_stride[0] + h * p.dout_stride[1];
    fwd_mma::load_tile<T, C::BM, C::LD, C::THREADS>(sQ, q, p.q_stride[2], p.q_stride[3], i0, p.Nq, p.D, dcols, p.vec16);
    fwd_mma::load_tile<T, C::BM, C::LD, C::THREADS>(sDO, go, p.dout_stride[2], p.dout_stride[3], i0, p.Nq, p.D, dcols,
                                                   p.vec16);
    fwd_mma::issue_tile<T, C::BN, C::LD>(p, tl, 0, sKV, sKV + C::BN * C::LD, dcols);
    tc::cp_async_commit();
  }

  for (int j = 0; j < tl.n_tiles; ++j) {
    if (j + 1 < tl.n_tiles) {
      T* nK = sKV + ((j + 1) % 2) * kStage;
      fwd_mma::issue_tile<T, C::BN, C::LD>(p, tl, j + 1, nK, nK + C::BN * C::LD, dcols);
    }
    tc::cp_async_commit();
    tc::cp_async_wait<1>();
    __syncthreads();

    const T* sK = sKV + (j % 2) * kStage;
    const T* sV = sK + C::BN * C::LD;
    const bool pre = j < tl.n_pre;
    const KeySegment<T> seg = fwd_mma::pick(pre, tl.pre, tl.seq);
    const int kt = pre ? j * C::BN : tl.seq_lo + (j - tl.n_pre) * C::BN;

    float s[NT_S][4], dpv[NT_S][4];
#pragma unroll
    for (int nt = 0; nt < NT_S; ++nt)
#pragma unroll
      for (int e = 0; e < 4; ++e) s[nt][e] = dpv[nt][e] = 0.f;
#pragma unroll
    for (int ks = 0; ks < DMAX / 16; ++ks) {
      if (ks < ksteps) {
        uint32_t qa[4], oa[4];
        tc::ldmatrix_x4(qa, sQ + (warp * 16 + lane % 16) * C::LD + ks * 16 + (lane / 16) * 8);
        tc::ldmatrix_x4(oa, sDO + (warp * 16 + lane % 16) * C::LD + ks * 16 + (lane / 16) * 8);
#pragma unroll
        for (int np = 0; np < C::BN / 16; ++np) {
          const int off = (np * 16 + (lane / 16) * 8 + lane % 8) * C::LD + ks * 16 + ((lane / 8) % 2) * 8;
          uint32_t kb[4], vb[4];
          tc::ldmatrix_x4(kb, sK + off);
          tc::ldmatrix_x4(vb, sV + off);
          const uint32_t k0[2] = {kb[0], kb[1]}, k1[2] = {kb[2], kb[3]};
          const uint32_t v0[2] = {vb[0], vb[1]}, v1[2] = {vb[2], vb[3]};
          tc::mma_16816<T>(s[2 * np], qa, k0);
          tc::mma_16816<T>(s[2 * np + 1], qa, k1);
          tc::mma_16816<T>(dpv[2 * np], oa, v0);
          tc::mma_16816<T>(dpv[2 * np + 1], oa, v1);
        }
      }
    }

    bool boundary = kt + C::BN > seg.n;
    if (!pre) {
      const int diag0 = i0 + p.Nk - p.Nq;
      boundary = boundary || p.key_padding_mask != nullptr ||
                 (p.causal && kt + C::BN - 1 > diag0 + PTK_PLANTED_CAUSAL_SHIFT) ||
                 (p.window > 0 && (i1 - 1) + p.Nk - p.Nq - kt >= p.window);
    }
#pragma unroll
    for (int nt = 0; nt < NT_S; ++nt)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int r = e / 2, key = kt + nt * 8 + 2 * t4 + (e % 2);
        const bool ok = row_q[r] < p.Nq && key < seg.n;
        const float bias = (!plain && ok) ? bias_at(p, b, h, row_q[r], seg.bias_col0 + key) : 0.f;
        const Logit lg = logit(p, plain, s[nt][e], bias);
        float pr = exp2f(lg.x - lse2[r]);
        if (boundary && !(key < seg.n && (pre || sequence_key_visible(p, b, row_q[r], key)))) pr = 0.f;
        s[nt][e] = pr * (dpv[nt][e] - delta[r]) * lg.dcap * p.scale;  // dS
      }

#pragma unroll
    for (int kk = 0; kk < C::BN / 16; ++kk) {
      uint32_t da[4];
      da[0] = tc::pack2<T>(s[2 * kk][0], s[2 * kk][1]);
      da[1] = tc::pack2<T>(s[2 * kk][2], s[2 * kk][3]);
      da[2] = tc::pack2<T>(s[2 * kk + 1][0], s[2 * kk + 1][1]);
      da[3] = tc::pack2<T>(s[2 * kk + 1][2], s[2 * kk + 1][3]);
#pragma unroll
      for (int dpi = 0; dpi < DMAX / 16; ++dpi) {
        if (dpi < ksteps) {
          uint32_t kb[4];
          tc::ldmatrix_x4_trans(kb, sK + (kk * 16 + ((lane / 8) % 2) * 8 + lane % 8) * C::LD + dpi * 16 + (lane / 16) * 8);
          const uint32_t k0[2] = {kb[0], kb[1]}, k1[2] = {kb[2], kb[3]};
          tc::mma_16816<T>(dq[2 * dpi], da, k0);
          tc::mma_16816<T>(dq[2 * dpi + 1], da, k1);
        }
      }
    }
    __syncthreads();
  }

  T* out = static_cast<T*>(p.dq);
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int i = row_q[r];
    if (i >= p.Nq) continue;
    T* orow = out + (row0 + i) * p.D;
#pragma unroll
    for (int nt = 0; nt < NT_O; ++nt) {
      const int c = nt * 8 + 2 * t4;
      if (c < p.D) orow[c] = from_float<T>(dq[nt][2 * r]);
      if (c + 1 < p.D) orow[c + 1] = from_float<T>(dq[nt][2 * r + 1]);
    }
  }
#endif
}

}  // namespace bwd_mma

// How many shares the prefix-gradient work of each (key tile, kv head, prefix) is cut into: enough
// blocks for about 2 per SM, at most one share per (batch row, head, query tile) item and 64.
// block_keys / block_queries 0: the tiles of the kernel that runs p (64 x 32 for D <= 128, the
// 32-key / 16-query tiles of prefix_attention_bwd_mma_wide.cuh).
inline int prefix_grad_splits(const AttnParams& p, int num_sms, int block_keys = 0, int block_queries = 0) {
  if (p.prefix_mode == kNoPrefix || p.P <= 0 || p.Nq <= 0) return 1;
  if (block_keys <= 0) block_keys = p.D > 128 ? 32 : 64;
  if (block_queries <= 0) block_queries = p.D > 128 ? 16 : 32;
  const int64_t base = static_cast<int64_t>((p.P + block_keys - 1) / block_keys) * p.Hkv * p.T;
  const int64_t rows = p.prefix_mode == kPerRow ? 1 : p.B;
  const int64_t items = rows * (p.Hq / p.Hkv) * ((p.Nq + block_queries - 1) / block_queries);
  int64_t s = (2 * static_cast<int64_t>(num_sms) + base - 1) / base;
  if (s > items) s = items;
  if (s > 64) s = 64;
  return s < 1 ? 1 : static_cast<int>(s);
}

// Floats of fp32 workspace for each of p.part_dpk / p.part_dpv when p.prefix_splits > 1.
inline int64_t prefix_grad_workspace(const AttnParams& p) {
  return p.prefix_splits > 1 ? static_cast<int64_t>(p.prefix_splits) * p.T * p.Hkv * p.P * p.D : 0;
}

template <typename T, int DMAX>
inline void launch_prefix_attention_bwd_mma_d(const AttnParams& p_in, bool need_dq, ptk_stream_t stream) {
  using C = bwd_mma::Cfg<T, DMAX>;
  AttnParams p = p_in;
  p.vec16 = attention_rows_vectorizable(p, sizeof(T)) && (p.dout_stride[3] == 1) &&
            reinterpret_cast<uintptr_t>(p.grad_out) % 16 == 0 && (p.dout_stride[0] * sizeof(T)) % 16 == 0 &&
            (p.dout_stride[1] * sizeof(T)) % 16 == 0 && (p.dout_stride[2] * sizeof(T)) % 16 == 0;
  launch_prefix_attention_bwd_delta<T>(p, stream);
  if (need_dq) {
    auto kernel = bwd_mma::dq_mma_kernel<T, DMAX>;
    allow_dynamic_smem(kernel, C::dq_bytes);
    PTK_LAUNCH(kernel, dim3(ceil_div_h(p.Nq, C::BM), p.B * p.Hq), dim3(C::THREADS), C::dq_bytes, stream, p);
  }
  if ((p.dk || p.dv) && p.Nk > 0) {
    auto kernel = bwd_mma::dkdv_mma_kernel<T, DMAX, false>;
    allow_dynamic_smem(kernel, C::kv_bytes);
    PTK_LAUNCH(kernel, dim3(ceil_div_h(p.Nk, C::BK), p.B * p.Hkv), dim3(C::THREADS), C::kv_bytes, stream, p);
  }
  if ((p.dprefix_k || p.dprefix_v) && p.prefix_mode != kNoPrefix && p.P > 0) {
    const int splits = p.prefix_splits > 1 && p.part_dpk && p.part_dpv ? p.prefix_splits : 1;
    p.prefix_splits = splits;
    auto kernel = bwd_mma::dkdv_mma_kernel<T, DMAX, true>;
    allow_dynamic_smem(kernel, C::kv_bytes);
    PTK_LAUNCH(kernel, dim3(ceil_div_h(p.P, C::BK), p.Hkv, p.T * splits), dim3(C::THREADS), C::kv_bytes, stream, p);
    if (splits > 1) {
      const int64_t n = static_cast<int64_t>(p.T) * p.Hkv * p.P * p.D;
      auto reduce = bwd_mma::prefix_split_reduce_kernel<T>;
      PTK_LAUNCH(reduce, dim3(static_cast<unsigned>((n + 255) / 256)), dim3(256), 0, stream, p);
    }
  }
}

// float16 / bfloat16 with D <= 128 (head-dim buckets 64 / 128).
template <typename T>
inline void launch_prefix_attention_bwd_mma(const AttnParams& p, bool need_dq, ptk_stream_t stream) {
  if (p.B * p.Hq == 0 || p.Nq == 0) return;
  if (p.D <= 64)
    launch_prefix_attention_bwd_mma_d<T, 64>(p, need_dq, stream);
  else
    launch_prefix_attention_bwd_mma_d<T, 128>(p, need_dq, stream);
}

}  // namespace ptk
