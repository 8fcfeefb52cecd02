// prefix_attention backward on tensor cores for the head-dim bucket 256 (float16 / bfloat16,
// 128 < D <= 256, sm_80+): the structure of prefix_attention_bwd_mma.cuh (mma.sync m16n8k16,
// ldmatrix, a 2-stage cp.async ring, fp32 accumulators in registers, the same work lists, masks,
// prefix splits and fixed-order reduction), re-tiled so that registers and shared memory fit.
//
// Why a different tiling: at D = 256 a warp that owns 16 keys and all D columns holds dK and dV
// as 2 x 16 x 256 fp32 = 256 registers per thread, more than the register file allows. Here the
// two warps of a pair own the SAME 16 keys (or queries) and HALF the columns each (64 + 64
// accumulator registers per thread in dK/dV, 64 in dQ), as FA2's backward lays its dK/dV atoms
// over warps along the head dimension. The score-side products (S, dP) are split between the pair
// along the other tile axis instead of being computed twice, and the probabilities / dS reach the
// partner through a small shared tile (FA2 keeps P and dS in shared memory the same way):
//
//   dK/dV kernel (split over keys): block = 4 warps, BK = 32 keys, query tiles of BQ = 16.
//     warp w: key group kw = w / 2 (16 keys), half h = w % 2.
//     S^T, dP^T of (16 keys, 8 queries [h]) over all of D -> P^T, dS^T -> sP / sdS (16-bit);
//     barrier; dV_w[:, half h] += P^T dO[:, half h], dK_w[:, half h] += dS^T Q[:, half h].
//   dQ kernel (split over queries): block = 4 warps, BM = 32 queries, key tiles of BN = 16.
//     warp w: query group qw = w / 2, half h = w % 2: S, dP of (16 queries, 8 keys [h]) -> dS
//     -> sdS; barrier; dQ_w[:, half h] += dS K[:, half h].
// Shared memory (LD = 264 elements per row): dK/dV 2 x 32 rows (K, V) + 2 stages x 2 x 16 rows
// (Q, dO) + 2 x 32 x 24 (sP, sdS) = 70656 B; dQ 2 x 32 rows (Q, dO) + 2 x 2 x 16 rows (K, V) +
// 32 x 24 (sdS) = 69120 B: under sm_86's 99 KB. Static occupancy (benchmarks/results/
// cuda_kernels_static.md): dK/dV 188 registers, 2 blocks per SM on sm_80 and sm_90; dQ 148
// registers, 2 blocks on sm_80 (shared memory), 3 on sm_90. 0 spills.
#pragma once

#include "prefix_attention_bwd_mma.cuh"

// Testing hook (tests/test_cuda_tensor_core_shim.py): the barrier between a warp pair's P / dS
// stores and their ldmatrix reads is missing. Always 0 in the extension.
#ifndef PTK_PLANT_NO_EXCHANGE_BARRIER
#define PTK_PLANT_NO_EXCHANGE_BARRIER 0
#endif

namespace ptk {
namespace bwd_wide {

using bwd_mma::kLog2e;
using bwd_mma::KvWork;
using bwd_mma::Logit;
using bwd_mma::logit;
using bwd_mma::lse_log2;
using bwd_mma::skip_row;

template <typename T>
struct Cfg {
  static constexpr int DMAX = 256;
  static constexpr int HALF = DMAX / 2;  // columns a warp accumulates
  static constexpr int WARPS = 4;
  static constexpr int THREADS = WARPS * 32;
  static constexpr int BK = 32;  // keys per dK/dV block (2 key groups of 16)
  static constexpr int BQ = 16;  // queries per tile of the dK/dV kernel (8 per warp of a pair)
  static constexpr int BM = 32;  // queries per dQ block
  static constexpr int BN = 16;  // keys per tile of the dQ kernel
  static constexpr int LD = DMAX + 8;
  static constexpr int LDP = 16 + 8;  // rows of sP / sdS: 16 columns + 8 of padding (48 B, 16-B aligned)
  static constexpr size_t kv_bytes =
      (2 * static_cast<size_t>(BK) * LD + 2 * 2 * static_cast<size_t>(BQ) * LD + 2 * static_cast<size_t>(BK) * LDP) *
      sizeof(T);
  static constexpr size_t dq_bytes =
      (2 * static_cast<size_t>(BM) * LD + 2 * 2 * static_cast<size_t>(BN) * LD + static_cast<size_t>(BM) * LDP) *
      sizeof(T);
  static_assert(kv_bytes <= 99 * 1024 && dq_bytes <= 99 * 1024, "backward tiles exceed sm_86 shared memory");
};

template <typename T>
__device__ __forceinline__ void issue_q_tile(const AttnParams& p, int b, int h, int it, T* sQ, T* sDO, int dcols) {
  using C = Cfg<T>;
  const T* q = static_cast<const T*>(p.q) + b * p.q_stride[0] + h * p.q_stride[1];
  const T* go = static_cast<const T*>(p.grad_out) + b * p.dout_stride[0] + h * p.dout_stride[1];
  fwd_mma::load_tile<T, C::BQ, C::LD, C::THREADS>(sQ, q, p.q_stride[2], p.q_stride[3], it, p.Nq, p.D, dcols, p.vec16);
  fwd_mma::load_tile<T, C::BQ, C::LD, C::THREADS>(sDO, go, p.dout_stride[2], p.dout_stride[3], it, p.Nq, p.D, dcols,
                                                 p.vec16);
}

// An accumulator fragment (16 rows x 8 columns, fp32) stored as 16-bit values at column col0 of
// the 16-row shared tile `dst` (row stride Cfg::LDP): c[0..1] -> row g, c[2..3] -> row g + 8.
template <typename T>
__device__ __forceinline__ void store_frag(T* dst, const float (&c)[4], int col0, int lane) {
  constexpr int LDP = Cfg<T>::LDP;
  const int g4 = lane / 4, t4 = lane % 4;
  tc::st_shared_32(dst + g4 * LDP + col0 + 2 * t4, tc::pack2<T>(c[0], c[1]));
  tc::st_shared_32(dst + (g4 + 8) * LDP + col0 + 2 * t4, tc::pack2<T>(c[2], c[3]));
}

// PREFIX = false: grid (ceil(Nk / BK), B * Hkv). PREFIX = true: grid (ceil(P / BK), Hkv, T * splits).
template <typename T, bool PREFIX>
__global__ void __launch_bounds__(Cfg<T>::THREADS, 2) dkdv_wide_kernel(const AttnParams p) {
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 800
  using C = Cfg<T>;
  constexpr int NT_O = C::HALF / 8;  // n8 tiles of the warp's half row
  PTK_DYNAMIC_SMEM(unsigned char, smem);
  T* sK = reinterpret_cast<T*>(smem);
  T* sV = sK + C::BK * C::LD;
  T* sRing = sV + C::BK * C::LD;  // stage s: Q at sRing + 2 s BQ LD, dO right after
  constexpr int kStage = 2 * C::BQ * C::LD;
  T* sP = sRing + 2 * kStage;     // P^T (BK keys x BQ queries)
  T* sdS = sP + C::BK * C::LDP;   // dS^T

  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g4 = lane / 4, t4 = lane % 4;
  const int kw = warp / 2, half = warp % 2;
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
    issue_q_tile<T>(p, b, hk * group + g, it, sRing, sRing + C::BQ * C::LD, dcols);
  }
  tc::cp_async_commit();  // group: K, V and the first query tile

  for (int stage = 0; cur < w_end; ++stage) {
    const int nxt = next_live(cur + 1);
    if (nxt < w_end) {
      int b, g, it;
      work.at(nxt, b, g, it, C::BQ);
      T* s = sRing + ((stage + 1) % 2) * kStage;
      issue_q_tile<T>(p, b, hk * group + g, it, s, s + C::BQ * C::LD, dcols);
    }
    tc::cp_async_commit();
    tc::cp_async_wait<1>();
    __syncthreads();

    int b, g, it;
    work.at(cur, b, g, it, C::BQ);
    const int h = hk * group + g;
    const T* sQ = sRing + (stage % 2) * kStage;
    const T* sDO = sQ + C::BQ * C::LD;

    // S^T = K_kw Q_half^T and dP^T = V_kw dO_half^T: 16 keys x 8 queries, over all of D
    float s[4] = {0.f, 0.f, 0.f, 0.f}, dp[4] = {0.f, 0.f, 0.f, 0.f};
#pragma unroll 4
    for (int ks = 0; ks < C::DMAX / 16; ++ks) {
      if (ks < ksteps) {
        uint32_t ka[4], va[4], qb[2], ob[2];
        tc::ldmatrix_x4(ka, sK + (kw * 16 + lane % 16) * C::LD + ks * 16 + (lane / 16) * 8);
        tc::ldmatrix_x4(va, sV + (kw * 16 + lane % 16) * C::LD + ks * 16 + (lane / 16) * 8);
        const int off = (half * 8 + lane % 8) * C::LD + ks * 16 + ((lane / 8) % 2) * 8;
        tc::ldmatrix_x2(qb, sQ + off);
        tc::ldmatrix_x2(ob, sDO + off);
        tc::mma_16816<T>(s, ka, qb);
        tc::mma_16816<T>(dp, va, ob);
      }
    }

    bool boundary = false;
    if (!PREFIX) {
      const int shift = p.Nk - p.Nq;
      boundary = p.key_padding_mask != nullptr ||
                 (p.causal && j0 + C::BK - 1 > it + shift + PTK_PLANTED_CAUSAL_SHIFT) ||
                 (p.window > 0 && (it + C::BQ - 1) + shift - j0 >= p.window);
    }
    const int64_t row0 = (static_cast<int64_t>(b) * p.Hq + h) * p.Nq;
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const int key = j0 + kw * 16 + g4 + 8 * (e / 2);
      const int i = it + half * 8 + 2 * t4 + (e % 2);
      const bool q_ok = i < p.Nq;
      const float bias = (!plain && q_ok && key < n_keys) ? bias_at(p, b, h, i, seg.bias_col0 + key) : 0.f;
      const Logit lg = logit(p, plain, s[e], bias);
      float pr = exp2f(lg.x - lse_log2(p, row0 + i, q_ok));
      if (boundary && !(key < n_keys && sequence_key_visible(p, b, i, key))) pr = 0.f;
      const float delta = q_ok ? p.delta[row0 + i] : 0.f;
      s[e] = pr;
      dp[e] = pr * (dp[e] - delta) * lg.dcap * p.scale;
    }
    store_frag<T>(sP + kw * 16 * C::LDP, s, half * 8, lane);
    store_frag<T>(sdS + kw * 16 * C::LDP, dp, half * 8, lane);
#if !PTK_PLANT_NO_EXCHANGE_BARRIER
    __syncthreads();  // the pair's two halves of P^T / dS^T are in place
#endif

    // dV_w += P^T dO[:, half], dK_w += dS^T Q[:, half]: A from sP / sdS, B through ldmatrix.trans
    uint32_t pa[4], da[4];
    tc::ldmatrix_x4(pa, sP + (kw * 16 + lane % 16) * C::LDP + (lane / 16) * 8);
    tc::ldmatrix_x4(da, sdS + (kw * 16 + lane % 16) * C::LDP + (lane / 16) * 8);
#pragma unroll
    for (int dpi = 0; dpi < C::HALF / 16; ++dpi) {
      const int col16 = half * (C::HALF / 16) + dpi;
      if (col16 < ksteps) {
        const int off = (((lane / 8) % 2) * 8 + lane % 8) * C::LD + col16 * 16 + (lane / 16) * 8;
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
    __syncthreads();  // the stage and sP / sdS are free before the next iteration refills them
    cur = nxt;
  }

  // epilogue: rows g4 and g4 + 8 of the warp's 16 keys, the warp's half of the columns
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int key = j0 + kw * 16 + g4 + 8 * r;
    if (key >= n_keys) continue;
#pragma unroll
    for (int nt = 0; nt < NT_O; ++nt) {
      const int c = half * C::HALF + nt * 8 + 2 * t4;
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

// grid (ceil(Nq / BM), B * Hq).
template <typename T>
__global__ void __launch_bounds__(Cfg<T>::THREADS, 2) dq_wide_kernel(const AttnParams p) {
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 800
  using C = Cfg<T>;
  constexpr int NT_O = C::HALF / 8;
  PTK_DYNAMIC_SMEM(unsigned char, smem);
  T* sQ = reinterpret_cast<T*>(smem);
  T* sDO = sQ + C::BM * C::LD;
  T* sKV = sDO + C::BM * C::LD;  // stage s: K at sKV + 2 s BN LD, V right after
  constexpr int kStage = 2 * C::BN * C::LD;
  T* sdS = sKV + 2 * kStage;     // dS (BM queries x BN keys)

  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g4 = lane / 4, t4 = lane % 4;
  const int qw = warp / 2, half = warp % 2;
  const int b = blockIdx.y / p.Hq, h = blockIdx.y % p.Hq;
  const int hk = h / (p.Hq / p.Hkv);
  const int i0 = blockIdx.x * C::BM;
  const int i1 = i0 + C::BM < p.Nq ? i0 + C::BM : p.Nq;
  const int dcols = (p.D + 15) / 16 * 16, ksteps = dcols / 16;
  const bool plain = p.softcap <= 0.f && !p.attn_bias;

  fwd_mma::TileList<T> tl;
  const bool has_prefix = p.prefix_mode != kNoPrefix && p.P > 0;
  tl.pre = has_prefix ? prefix_segment<T>(p, prefix_of_row(p, b), hk) : sequence_segment<T>(p, b, hk);
  tl.n_pre = has_prefix ? (p.P + C::BN - 1) / C::BN : 0;
  int seq_hi;
  sequence_key_range(p, i0, i1, tl.seq_lo, seq_hi);
  tl.seq = sequence_segment<T>(p, b, hk);
  tl.n_tiles = tl.n_pre + (seq_hi > tl.seq_lo ? (seq_hi - tl.seq_lo + C::BN - 1) / C::BN : 0);

  const int64_t row0 = (static_cast<int64_t>(b) * p.Hq + h) * p.Nq;
  const int row_q[2] = {i0 + qw * 16 + g4, i0 + qw * 16 + g4 + 8};
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

    // S = Q_qw K_half^T and dP = dO_qw V_half^T: 16 queries x 8 keys, over all of D
    float s[4] = {0.f, 0.f, 0.f, 0.f}, dpv[4] = {0.f, 0.f, 0.f, 0.f};
#pragma unroll 4
    for (int ks = 0; ks < C::DMAX / 16; ++ks) {
      if (ks < ksteps) {
        uint32_t qa[4], oa[4], kb[2], vb[2];
        tc::ldmatrix_x4(qa, sQ + (qw * 16 + lane % 16) * C::LD + ks * 16 + (lane / 16) * 8);
        tc::ldmatrix_x4(oa, sDO + (qw * 16 + lane % 16) * C::LD + ks * 16 + (lane / 16) * 8);
        const int off = (half * 8 + lane % 8) * C::LD + ks * 16 + ((lane / 8) % 2) * 8;
        tc::ldmatrix_x2(kb, sK + off);
        tc::ldmatrix_x2(vb, sV + off);
        tc::mma_16816<T>(s, qa, kb);
        tc::mma_16816<T>(dpv, oa, vb);
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
    for (int e = 0; e < 4; ++e) {
      const int r = e / 2, key = kt + half * 8 + 2 * t4 + (e % 2);
      const bool ok = row_q[r] < p.Nq && key < seg.n;
      const float bias = (!plain && ok) ? bias_at(p, b, h, row_q[r], seg.bias_col0 + key) : 0.f;
      const Logit lg = logit(p, plain, s[e], bias);
      float pr = exp2f(lg.x - lse2[r]);
      if (boundary && !(key < seg.n && (pre || sequence_key_visible(p, b, row_q[r], key)))) pr = 0.f;
      s[e] = pr * (dpv[e] - delta[r]) * lg.dcap * p.scale;  // dS
    }
    store_frag<T>(sdS + qw * 16 * C::LDP, s, half * 8, lane);
#if !PTK_PLANT_NO_EXCHANGE_BARRIER
    __syncthreads();  // both halves of the pair's dS are in place
#endif

    uint32_t da[4];
    tc::ldmatrix_x4(da, sdS + (qw * 16 + lane % 16) * C::LDP + (lane / 16) * 8);
#pragma unroll
    for (int dpi = 0; dpi < C::HALF / 16; ++dpi) {
      const int col16 = half * (C::HALF / 16) + dpi;
      if (col16 < ksteps) {
        uint32_t kb[4];
        tc::ldmatrix_x4_trans(kb, sK + (((lane / 8) % 2) * 8 + lane % 8) * C::LD + col16 * 16 + (lane / 16) * 8);
        const uint32_t k0[2] = {kb[0], kb[1]}, k1[2] = {kb[2], kb[3]};
        tc::mma_16816<T>(dq[2 * dpi], da, k0);
        tc::mma_16816<T>(dq[2 * dpi + 1], da, k1);
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
      const int c = half * C::HALF + nt * 8 + 2 * t4;
      if (c < p.D) orow[c] = from_float<T>(dq[nt][2 * r]);
      if (c + 1 < p.D) orow[c + 1] = from_float<T>(dq[nt][2 * r + 1]);
    }
  }
#endif
}

}  // namespace bwd_wide

// float16 / bfloat16, 128 < D <= 256. The prefix-gradient split count (p.prefix_splits) and its
// workspace come from the caller as for the D <= 128 kernels (prefix_grad_splits with this
// file's key-block size, Cfg::BK).
template <typename T>
inline void launch_prefix_attention_bwd_wide(const AttnParams& p_in, bool need_dq, ptk_stream_t stream) {
  using C = bwd_wide::Cfg<T>;
  if (p_in.B * p_in.Hq == 0 || p_in.Nq == 0) return;
  AttnParams p = p_in;
  p.vec16 = attention_rows_vectorizable(p, sizeof(T)) && (p.dout_stride[3] == 1) &&
            reinterpret_cast<uintptr_t>(p.grad_out) % 16 == 0 && (p.dout_stride[0] * sizeof(T)) % 16 == 0 &&
            (p.dout_stride[1] * sizeof(T)) % 16 == 0 && (p.dout_stride[2] * sizeof(T)) % 16 == 0;
  launch_prefix_attention_bwd_delta<T>(p, stream);
  if (need_dq) {
    auto kernel = bwd_wide::dq_wide_kernel<T>;
    allow_dynamic_smem(kernel, C::dq_bytes);
    PTK_LAUNCH(kernel, dim3(ceil_div_h(p.Nq, C::BM), p.B * p.Hq), dim3(C::THREADS), C::dq_bytes, stream, p);
  }
  if ((p.dk || p.dv) && p.Nk > 0) {
    auto kernel = bwd_wide::dkdv_wide_kernel<T, false>;
    allow_dynamic_smem(kernel, C::kv_bytes);
    PTK_LAUNCH(kernel, dim3(ceil_div_h(p.Nk, C::BK), p.B * p.Hkv), dim3(C::THREADS), C::kv_bytes, stream, p);
  }
  if ((p.dprefix_k || p.dprefix_v) && p.prefix_mode != kNoPrefix && p.P > 0) {
    const int splits = p.prefix_splits > 1 && p.part_dpk && p.part_dpv ? p.prefix_splits : 1;
    p.prefix_splits = splits;
    auto kernel = bwd_wide::dkdv_wide_kernel<T, true>;
    allow_dynamic_smem(kernel, C::kv_bytes);
    PTK_LAUNCH(kernel, dim3(ceil_div_h(p.P, C::BK), p.Hkv, p.T * splits), dim3(C::THREADS), C::kv_bytes, stream, p);
    if (splits > 1) {
      const int64_t n = static_cast<int64_t>(p.T) * p.Hkv * p.P * p.D;
      auto reduce = bwd_mma::prefix_split_reduce_kernel<T>;
      PTK_LAUNCH(reduce, dim3(static_cast<unsigned>((n + 255) / 256)), dim3(256), 0, stream, p);
    }
  }
}

}  // namespace ptk
