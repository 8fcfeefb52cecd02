// prefix_attention forward on tensor cores (float16 / bfloat16, sm_80+; sm_90 runs the same
// code), built like FlashAttention-2 on the primitives of mma_sm80.cuh:
//
//   block = 4 warps, BM = 64 queries of one (batch row, query head); warp w owns rows
//   [16w, 16w + 16). Key tiles of BN keys run over the prefix segment, then the visible part of the
//   sequence segment, as one flat list of tiles.
//   - Q, K, V are staged global -> shared with 16-byte cp.async; K/V in a 2-stage ring: the copy
//     of tile j + 1 is in flight while tile j is computed (one commit group per tile).
//   - S = Q K^T with mma.sync.m16n8k16 (fp32 accumulators in registers), operands by ldmatrix
//     (Q rows and K rows as stored; V through ldmatrix.trans).
//   - online softmax in registers, in the log2 domain: x = s * scale * log2(e) (+ bias * log2(e)),
//     p = exp2(x - m); masks are evaluated only on boundary tiles (tails, causal diagonal, window
//     edge, key padding); interior tiles skip them.
//   - P stays in registers: the accumulator layout of two adjacent n8 tiles is the A-operand layout
//     of one k16 step, so P V needs no shared-memory round trip; O is rescaled in registers.
// Rows are owned by a quad of lanes (lanes 4g..4g+3 hold rows g and g + 8 of the warp tile), so a
// row max is two xor-shuffles; the row sum is reduced once at the end.
#pragma once

#include "mma_sm80.cuh"
#include "prefix_attention_fwd.cuh"  // fwd::merge_splits_kernel
#include "prefix_attention_tile.cuh"

// Testing hooks: the host harness builds variants with one planted bug each, to prove that it
// catches them (tests/test_cuda_tensor_core_shim.py). Always 0 in the extension.
#ifndef PTK_PLANT_SWAP_P_FRAGMENT
#define PTK_PLANT_SWAP_P_FRAGMENT 0  // P as A operand: registers a[1] and a[2] swapped
#endif
#ifndef PTK_PLANT_NO_CP_ASYNC_WAIT
#define PTK_PLANT_NO_CP_ASYNC_WAIT 0  // the cp.async.wait_group before a tile is read is missing
#endif
#ifndef PTK_PLANT_NO_REUSE_BARRIER
#define PTK_PLANT_NO_REUSE_BARRIER 0  // the barrier before a stage's buffer is refilled is missing
#endif

namespace ptk {
namespace fwd_mma {

template <typename T, int DMAX>
struct Cfg {
  static constexpr int WARPS = 4;
  static constexpr int THREADS = WARPS * 32;
  static constexpr int BM = WARPS * 16;                // queries per block
  static constexpr int BN = DMAX >= 256 ? 32 : 64;     // keys per tile
  static constexpr int STAGES = 2;                     // K/V ring
  // Row pitch in elements: + 8 (16 bytes) so the 8 rows an ldmatrix phase reads fall in
  // different bank groups; rows stay 16-byte aligned for cp.async / ldmatrix.
  static constexpr int LD = DMAX + 8;
  static constexpr size_t q_elems = static_cast<size_t>(BM) * LD;
  static constexpr size_t kv_elems = static_cast<size_t>(BN) * LD;
  static constexpr size_t smem_bytes = (q_elems + 2 * STAGES * kv_elems) * sizeof(T);
  static constexpr int MIN_BLOCKS = DMAX >= 256 ? 1 : 2;  // lets ptxas use up to 255 / 255 registers
  // Q's A fragments held in registers across key tiles (DMAX / 4 registers per thread): up to
  // D = 128 (+32); at D = 256 (+64 on top of 220) they would not fit.
  static constexpr bool Q_IN_REGS = DMAX <= 128;
  static_assert(sizeof(T) == 2, "tensor-core forward: 16-bit inputs only");
  static_assert((LD * sizeof(T)) % 16 == 0, "rows must stay 16-byte aligned");
  static_assert(smem_bytes <= 163 * 1024, "forward tile does not fit in sm_80 shared memory");
};

// rows [row0, row0 + ROWS) x columns [0, dcols) of a strided (n, D) matrix -> dst (pitch LD) in
// 16-byte chunks; rows >= n and columns >= D are zero-filled. With p.vec16 (unit column stride,
// 16-byte aligned rows, D % 8 == 0) each chunk is one cp.async; otherwise it is gathered with
// scalar loads and stored synchronously (still tracked by the harness as a shared write).
// The general form: row r's first element is row_ptr(r) (nullptr: a zero row), column stride s_col.
template <typename T, int ROWS, int LD, int THREADS, typename RowPtr>
__device__ __forceinline__ void load_rows_by(T* dst, RowPtr row_ptr, int64_t s_col, int D, int dcols, bool vec16) {
  const int chunks_per_row = dcols / 8;
  for (int idx = threadIdx.x; idx < ROWS * chunks_per_row; idx += THREADS) {
    const int r = idx / chunks_per_row, c = (idx % chunks_per_row) * 8;
    const T* src = row_ptr(r);
    T* d = dst + r * LD + c;
    if (vec16) {
      const bool valid = src != nullptr && c < D;
      tc::cp_async_16(d, valid ? src + c : d, valid);
    } else {
      uint32_t w[4];
      for (int e = 0; e < 4; ++e) {
        const int c0 = c + 2 * e;
        const float lo = (src && c0 < D) ? to_float(src[c0 * s_col]) : 0.f;
        const float hi = (src && c0 + 1 < D) ? to_float(src[(c0 + 1) * s_col]) : 0.f;
        w[e] = tc::pack2<T>(lo, hi);
      }
      tc::st_shared_16(d, uint4{w[0], w[1], w[2], w[3]});
    }
  }
}

template <typename T, int ROWS, int LD, int THREADS>
__device__ __forceinline__ void load_tile(T* dst, const T* src, int64_t s_row, int64_t s_col, int row0, int n,
                                          int D, int dcols, bool vec16) {
  load_rows_by<T, ROWS, LD, THREADS>(
      dst, [&](int r) { return row0 + r < n ? src + (row0 + r) * s_row : static_cast<const T*>(nullptr); }, s_col, D,
      dcols, vec16);
}

// The j-th key tile of a block: segment (prefix / sequence) and first key.
template <typename T>
struct TileList {
  KeySegment<T> pre, seq;
  int pre_lo = 0;  // first prefix key (a split's share starts inside the prefix)
  int n_pre;       // prefix tiles
  int seq_lo;      // first visible sequence key
  int n_tiles;  // prefix + sequence tiles
};

// Field-wise select (a reference chosen at run time would put both segments in local memory).
template <typename T>
__device__ __forceinline__ KeySegment<T> pick(bool pre, const KeySegment<T>& a, const KeySegment<T>& b) {
  KeySegment<T> s;
  s.k = pre ? a.k : b.k;
  s.v = pre ? a.v : b.v;
  s.k_row = pre ? a.k_row : b.k_row;
  s.k_col = pre ? a.k_col : b.k_col;
  s.v_row = pre ? a.v_row : b.v_row;
  s.v_col = pre ? a.v_col : b.v_col;
  s.n = pre ? a.n : b.n;
  s.bias_col0 = pre ? a.bias_col0 : b.bias_col0;
  s.is_prefix = pre;
  return s;
}

// Stage key tile j (BN keys) of the list into sK / sV (pitch LD) with 128 threads.
template <typename T, int BN, int LD>
__device__ __forceinline__ void issue_tile(const AttnParams& p, const TileList<T>& tl, int j, T* sK, T* sV, int dcols) {
  const bool pre = j < tl.n_pre;
  const KeySegment<T> s = pick(pre, tl.pre, tl.seq);
  const int kt = pre ? tl.pre_lo + j * BN : tl.seq_lo + (j - tl.n_pre) * BN;
  load_tile<T, BN, LD, 128>(sK, s.k, s.k_row, s.k_col, kt, s.n, p.D, dcols, p.vec16);
  load_tile<T, BN, LD, 128>(sV, s.v, s.v_row, s.v_col, kt, s.n, p.D, dcols, p.vec16);
}

// Block rows: PACKED = false: 64 queries of one (b, h); grid (ceil(Nq / BM), B * Hq, splits).
// PACKED = true (decode, GQA query-head packing): the group's (head, query) pairs of one (b, kv
// head), row pr -> head hk * group + pr / Nq, query pr % Nq, so K/V are read once per kv head
// instead of once per query head; grid (ceil(group * Nq / BM), B * Hkv, splits).
// Split-K (p.num_splits > 1): split z covers keys [z split_len, (z + 1) split_len) of the
// prefix-then-sequence order and writes a normalized fp32 partial and its lse (merged by
// fwd::merge_splits_kernel). Block Cfg::THREADS, dynamic smem Cfg::smem_bytes.
template <typename T, int DMAX, bool PACKED>
__global__ void __launch_bounds__(Cfg<T, DMAX>::THREADS, Cfg<T, DMAX>::MIN_BLOCKS)
    prefix_attention_fwd_mma_kernel(const AttnParams p) {
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 800
  using C = Cfg<T, DMAX>;
  constexpr int NT_S = C::BN / 8;  // n8 tiles of a score tile
  constexpr int NT_O = DMAX / 8;   // n8 tiles of the output row block
  constexpr float kLog2e = 1.4426950408889634f;
  PTK_DYNAMIC_SMEM(unsigned char, smem);
  T* sQ = reinterpret_cast<T*>(smem);
  T* sKV = sQ + C::q_elems;  // stage s: K at sKV + 2 s kv_elems, V right after

  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int g = lane / 4, t4 = lane % 4;
  const int group = p.Hq / p.Hkv;
  const int b = PACKED ? blockIdx.y / p.Hkv : blockIdx.y / p.Hq;
  const int hk = PACKED ? blockIdx.y % p.Hkv : (blockIdx.y % p.Hq) / group;
  const int h_block = blockIdx.y % p.Hq;  // the head of a non-packed block
  const int r0 = blockIdx.x * C::BM;      // first block row (query, or packed (head, query) pair)
  const int n_rows = PACKED ? group * p.Nq : p.Nq;
  const int r1 = r0 + C::BM < n_rows ? r0 + C::BM : n_rows;
  // the queries [q_lo, q_hi) the block's rows hold (for block skipping and boundary masks)
  int q_lo = r0, q_hi = r1;
  if (PACKED) {
    const bool one_head = r0 / p.Nq == (r1 - 1) / p.Nq;
    q_lo = one_head ? r0 % p.Nq : 0;
    q_hi = one_head ? (r1 - 1) % p.Nq + 1 : p.Nq;
  }
  const int dcols = (p.D + 15) / 16 * 16;  // columns that hold data, rounded to the k16 step
  const int ksteps = dcols / 16;

  // keys [g0, g1) of the prefix-then-sequence order: all, or this split's share
  const bool split = p.num_splits > 1;
  const int g0 = split ? static_cast<int>(blockIdx.z) * p.split_len : 0;
  const int g1 = split ? g0 + p.split_len : p.P + p.Nk;
  TileList<T> tl;
  const bool has_prefix = p.prefix_mode != kNoPrefix && p.P > 0 && g0 < p.P;
  tl.pre = has_prefix ? prefix_segment<T>(p, prefix_of_row(p, b), hk) : sequence_segment<T>(p, b, hk);
  tl.pre.n = has_prefix ? (g1 < p.P ? g1 : p.P) : 0;  // keys past the share's end read as absent
  tl.pre_lo = has_prefix ? g0 : 0;
  tl.n_pre = has_prefix ? (tl.pre.n - g0 + C::BN - 1) / C::BN : 0;
  int seq_hi;
  sequence_key_range(p, q_lo, q_hi, tl.seq_lo, seq_hi);
  tl.seq_lo = tl.seq_lo > g0 - p.P ? tl.seq_lo : g0 - p.P;
  seq_hi = seq_hi < g1 - p.P ? seq_hi : g1 - p.P;
  tl.seq = sequence_segment<T>(p, b, hk);
  tl.seq.n = seq_hi > 0 ? seq_hi : 0;  // (visibility inside [seq_lo, seq_hi) is still checked per key)
  tl.n_tiles = tl.n_pre + (seq_hi > tl.seq_lo ? (seq_hi - tl.seq_lo + C::BN - 1) / C::BN : 0);

  // rows g and g + 8 of this warp's 16: online-softmax state (log2 domain) and the O accumulator
  float m_r[2] = {kNegInf, kNegInf}, l_r[2] = {0.f, 0.f};
  float o[NT_O][4];
#pragma unroll
  for (int nt = 0; nt < NT_O; ++nt)
#pragma unroll
    for (int e = 0; e < 4; ++e) o[nt][e] = 0.f;
  // rows g and g + 8 of the warp: their head and query (row_q >= Nq: no row)
  int row_h[2], row_q[2];
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int pr = r0 + warp * 16 + g + 8 * r;
    row_h[r] = PACKED ? hk * group + pr / p.Nq : h_block;
    row_q[r] = PACKED ? (pr < n_rows ? pr % p.Nq : p.Nq) : pr;
  }
  const bool plain = p.softcap <= 0.f && !p.attn_bias;  // logits are s * scale: one multiply
  const float scale_log2 = p.scale * kLog2e;

  if (tl.n_tiles > 0) {
    const T* q = static_cast<const T*>(p.q) + b * p.q_stride[0];
    load_rows_by<T, C::BM, C::LD, C::THREADS>(
        sQ,
        [&](int r) {
          const int pr = r0 + r;
          if (pr >= r1) return static_cast<const T*>(nullptr);
          const int hh = PACKED ? hk * group + pr / p.Nq : h_block, ii = PACKED ? pr % p.Nq : pr;
          return q + hh * p.q_stride[1] + ii * p.q_stride[2];
        },
        p.q_stride[3], p.D, dcols, p.vec16);
    issue_tile<T, C::BN, C::LD>(p, tl, 0, sKV, sKV + C::kv_elems, dcols);
    tc::cp_async_commit();  // group: Q + tile 0
  }

  uint32_t qf[C::Q_IN_REGS ? DMAX / 16 : 1][4];  // Q fragments (Cfg::Q_IN_REGS)
  for (int j = 0; j < tl.n_tiles; ++j) {
    if (j + 1 < tl.n_tiles) {
      T* nK = sKV + ((j + 1) % C::STAGES) * 2 * C::kv_elems;
      issue_tile<T, C::BN, C::LD>(p, tl, j + 1, nK, nK + C::kv_elems, dcols);
    }
    tc::cp_async_commit();  // one group per iteration (possibly empty): the wait count stays 1
#if !PTK_PLANT_NO_CP_ASYNC_WAIT
    tc::cp_async_wait<1>();  // tile j (and Q) landed for this thread ...
#endif
    __syncthreads();         // ... and for every thread

    const T* sK = sKV + (j % C::STAGES) * 2 * C::kv_elems;
    const T* sV = sK + C::kv_elems;
    const bool pre = j < tl.n_pre;
    const KeySegment<T> seg = pick(pre, tl.pre, tl.seq);
    const int kt = pre ? tl.pre_lo + j * C::BN : tl.seq_lo + (j - tl.n_pre) * C::BN;

    // The warp's Q fragments (16 rows x D) go to registers once, after the first tile's group
    // (which carries Q) has landed, instead of an ldmatrix per key tile.
    if constexpr (C::Q_IN_REGS) {
      if (j == 0) {
#pragma unroll
        for (int ks = 0; ks < DMAX / 16; ++ks)
          if (ks < ksteps) tc::ldmatrix_x4(qf[ks], sQ + (warp * 16 + lane % 16) * C::LD + ks * 16 + (lane / 16) * 8);
      }
    }

    // ---- S = Q K^T (16 x BN per warp) ----
    float s[NT_S][4];
#pragma unroll
    for (int nt = 0; nt < NT_S; ++nt)
#pragma unroll
      for (int e = 0; e < 4; ++e) s[nt][e] = 0.f;
#pragma unroll
    for (int ks = 0; ks < DMAX / 16; ++ks) {
      if (ks < ksteps) {
        uint32_t qa[4];
        if constexpr (C::Q_IN_REGS) {
#pragma unroll
          for (int e = 0; e < 4; ++e) qa[e] = qf[ks][e];
        } else {
          tc::ldmatrix_x4(qa, sQ + (warp * 16 + lane % 16) * C::LD + ks * 16 + (lane / 16) * 8);
        }
#pragma unroll
        for (int np = 0; np < C::BN / 16; ++np) {
          uint32_t kb[4];  // b0/b1 of key tiles 2np and 2np + 1
          tc::ldmatrix_x4(kb, sK + (np * 16 + (lane / 16) * 8 + lane % 8) * C::LD + ks * 16 + ((lane / 8) % 2) * 8);
          const uint32_t b0[2] = {kb[0], kb[1]}, b1[2] = {kb[2], kb[3]};
          tc::mma_16816<T>(s[2 * np], qa, b0);
          tc::mma_16816<T>(s[2 * np + 1], qa, b1);
        }
      }
    }

    // ---- logits (log2 domain), masks on boundary tiles only ----
    bool boundary = kt + C::BN > seg.n;
    if (!pre) {
      const int diag0 = q_lo + p.Nk - p.Nq;  // the block's first query's diagonal
      boundary = boundary || p.key_padding_mask != nullptr ||
                 (p.causal && kt + C::BN - 1 > diag0 + PTK_PLANTED_CAUSAL_SHIFT) ||
                 (p.window > 0 && (q_hi - 1) + p.Nk - p.Nq - kt >= p.window);
    }
#pragma unroll
    for (int nt = 0; nt < NT_S; ++nt)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int r = e / 2, key = kt + nt * 8 + 2 * t4 + (e % 2);
        float x;
        if (plain) {
          x = s[nt][e] * scale_log2;
        } else {
          x = apply_softcap(s[nt][e] * p.scale, p.softcap);
          if (row_q[r] < p.Nq && key < seg.n) x += bias_at(p, b, row_h[r], row_q[r], seg.bias_col0 + key);
          x *= kLog2e;
        }
        if (boundary && !(key < seg.n && (pre || sequence_key_visible(p, b, row_q[r], key)))) x = kNegInf;
        s[nt][e] = x;
      }

    // ---- online softmax: row max over the quad, rescale, P = exp2(x - m) ----
    float alpha[2], m_use[2];
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      float mx = m_r[r];
#pragma unroll
      for (int nt = 0; nt < NT_S; ++nt) mx = fmaxf(mx, fmaxf(s[nt][2 * r], s[nt][2 * r + 1]));
      mx = group_max<4>(mx);
      m_use[r] = mx == kNegInf ? 0.f : mx;  // a row with nothing visible yet: exp2(-inf) = 0
      alpha[r] = exp2f(m_r[r] - m_use[r]);
      m_r[r] = mx;
      l_r[r] *= alpha[r];
    }
#pragma unroll
    for (int nt = 0; nt < NT_S; ++nt)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const float pe = exp2f(s[nt][e] - m_use[e / 2]);
        s[nt][e] = pe;
        l_r[e / 2] += pe;
      }
#pragma unroll
    for (int nt = 0; nt < NT_O; ++nt)
#pragma unroll
      for (int e = 0; e < 4; ++e) o[nt][e] *= alpha[e / 2];

    // ---- O += P V: P from registers (C layout of n8 tiles 2kk, 2kk+1 = A layout of k16 step kk) ----
#pragma unroll
    for (int kk = 0; kk < C::BN / 16; ++kk) {
      uint32_t pa[4];
      pa[0] = tc::pack2<T>(s[2 * kk][0], s[2 * kk][1]);
      pa[1] = tc::pack2<T>(s[2 * kk][2], s[2 * kk][3]);
      pa[2] = tc::pack2<T>(s[2 * kk + 1][0], s[2 * kk + 1][1]);
      pa[3] = tc::pack2<T>(s[2 * kk + 1][2], s[2 * kk + 1][3]);
#if PTK_PLANT_SWAP_P_FRAGMENT
      const uint32_t tmp = pa[1];
      pa[1] = pa[2];
      pa[2] = tmp;
#endif
#pragma unroll
      for (int dp = 0; dp < DMAX / 16; ++dp) {
        if (dp < ksteps) {
          uint32_t vb[4];  // b0/b1 of output column tiles 2dp and 2dp + 1
          tc::ldmatrix_x4_trans(vb, sV + (kk * 16 + ((lane / 8) % 2) * 8 + lane % 8) * C::LD + dp * 16 + (lane / 16) * 8);
          const uint32_t b0[2] = {vb[0], vb[1]}, b1[2] = {vb[2], vb[3]};
          tc::mma_16816<T>(o[2 * dp], pa, b0);
          tc::mma_16816<T>(o[2 * dp + 1], pa, b1);
        }
      }
    }
#if !PTK_PLANT_NO_REUSE_BARRIER
    __syncthreads();  // every warp is done with this stage before iteration j + 1 refills it
#endif
  }

  // ---- epilogue: O / l, lse = (m + log2 l) ln 2; rows without a visible key: 0 and -inf ----
  T* out = static_cast<T*>(p.out);
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const float l = group_sum<4>(l_r[r]);
    const int i = row_q[r];
    if (i >= p.Nq) continue;
    const bool empty = !(l > 0.f);
    const float inv_l = empty ? 0.f : 1.f / l;
    const float lse = empty ? kNegInf : (m_r[r] + log2f(l)) * 0.6931471805599453f;
    const int64_t row = (static_cast<int64_t>(b) * p.Hq + row_h[r]) * p.Nq + i;
    if (split) {  // normalized partial + its lse
      const int64_t prow = static_cast<int64_t>(blockIdx.z) * p.B * p.Hq * p.Nq + row;
#pragma unroll
      for (int nt = 0; nt < NT_O; ++nt) {
        const int c = nt * 8 + 2 * t4;
        if (c < p.D) p.part_out[prow * p.D + c] = o[nt][2 * r] * inv_l;
        if (c + 1 < p.D) p.part_out[prow * p.D + c + 1] = o[nt][2 * r + 1] * inv_l;
      }
      if (t4 == 0) p.part_lse[prow] = lse;
      continue;
    }
    T* orow = out + row * p.D;
#pragma unroll
    for (int nt = 0; nt < NT_O; ++nt) {
      const int c = nt * 8 + 2 * t4;
      if (c < p.D) orow[c] = from_float<T>(o[nt][2 * r] * inv_l);
      if (c + 1 < p.D) orow[c + 1] = from_float<T>(o[nt][2 * r + 1] * inv_l);
    }
    if (t4 == 0) p.lse[row] = lse;
  }
#endif
}

}  // namespace fwd_mma

// Whether q, k, v and the prefix can be staged with 16-byte copies: unit column stride, every
// other stride and the base address 16-byte aligned, D a multiple of 8.
inline bool attention_rows_vectorizable(const AttnParams& p, int elem_bytes) {
  if (p.D % 8 != 0) return false;
  auto ok = [&](const void* ptr, const int64_t* st) {
    if (ptr == nullptr) return true;
    if (reinterpret_cast<uintptr_t>(ptr) % 16 != 0 || st[3] != 1) return false;
    for (int d = 0; d < 3; ++d)
      if ((st[d] * elem_bytes) % 16 != 0) return false;
    return true;
  };
  const bool pre = p.prefix_mode != kNoPrefix && p.P > 0;
  return ok(p.q, p.q_stride) && ok(p.k, p.k_stride) && ok(p.v, p.v_stride) &&
         (!pre || (ok(p.prefix_k, p.pk_stride) && ok(p.prefix_v, p.pv_stride)));
}

// Decode-like calls (few queries) pack the GQA group's query heads into the block rows.
inline bool fwd_mma_packs_heads(const AttnParams& p) { return p.Nq <= 16; }

template <typename T, int DMAX>
inline void launch_prefix_attention_fwd_mma_d(const AttnParams& p_in, ptk_stream_t stream) {
  using C = fwd_mma::Cfg<T, DMAX>;
  AttnParams p = p_in;
  p.vec16 = attention_rows_vectorizable(p, sizeof(T));
  const unsigned splits = p.num_splits > 1 ? p.num_splits : 1;
  if (fwd_mma_packs_heads(p)) {
    auto kernel = fwd_mma::prefix_attention_fwd_mma_kernel<T, DMAX, true>;
    allow_dynamic_smem(kernel, C::smem_bytes);
    dim3 grid(ceil_div_h((p.Hq / p.Hkv) * p.Nq, C::BM), p.B * p.Hkv, splits);
    PTK_LAUNCH(kernel, grid, dim3(C::THREADS), C::smem_bytes, stream, p);
  } else {
    auto kernel = fwd_mma::prefix_attention_fwd_mma_kernel<T, DMAX, false>;
    allow_dynamic_smem(kernel, C::smem_bytes);
    dim3 grid(ceil_div_h(p.Nq, C::BM), p.B * p.Hq, splits);
    PTK_LAUNCH(kernel, grid, dim3(C::THREADS), C::smem_bytes, stream, p);
  }
  if (splits > 1) {
    auto merge = fwd::merge_splits_kernel<T>;
    const int64_t rows = static_cast<int64_t>(p.B) * p.Hq * p.Nq;
    PTK_LAUNCH(merge, dim3(static_cast<unsigned>((rows + 3) / 4)), dim3(128), 0, stream, p);
  }
}

// float16 / bfloat16; head-dim buckets 64 / 128 / 256.
template <typename T>
inline void launch_prefix_attention_fwd_mma(const AttnParams& p, ptk_stream_t stream) {
  if (p.B * p.Hq == 0 || p.Nq == 0) return;
  if (p.D <= 64)
    launch_prefix_attention_fwd_mma_d<T, 64>(p, stream);
  else if (p.D <= 128)
    launch_prefix_attention_fwd_mma_d<T, 128>(p, stream);
  else
    launch_prefix_attention_fwd_mma_d<T, 256>(p, stream);
}

}  // namespace ptk
