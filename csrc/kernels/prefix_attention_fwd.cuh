// prefix_attention forward: FlashAttention-2 style online softmax over the prefix segment and the
// sequence segment of keys, one block per (16-query tile, batch row, query head).
//
// Thread layout (128 threads): 8 threads per query row ("row group", consecutive lanes of one
// warp); a row group splits a key tile's scores 8 ways and the output columns 8 ways
// (column c = lane8 + 8 * j), so the row max / row sum are 3 xor-shuffles inside the group.
// Accumulation in float32 registers; K/V tiles staged in shared memory as float32.
// Block skipping: with causal / window only the sequence keys some query of the tile can see are
// loaded (sequence_key_range); prefix keys are always visible.
#pragma once

#include "prefix_attention_tile.cuh"

namespace ptk {
namespace fwd {

constexpr int kBM = 16;       // queries per block
constexpr int kTPR = 8;       // threads per query row
constexpr int kThreads = kBM * kTPR;

template <int DMAX>
struct Tiles {
  static constexpr int BN = DMAX >= 256 ? 16 : (DMAX >= 128 ? 32 : 64);  // keys per tile
  static constexpr int LDK = DMAX + 1;  // padded: lanes of a row group read different key rows
  static constexpr size_t smem_floats = kBM * DMAX + BN * LDK + BN * DMAX + kBM * BN;
  static constexpr size_t smem_bytes = smem_floats * sizeof(float);
  // 99 KiB: the opt-in limit of sm_86/sm_89 (sm_80: 163 KiB, sm_90: 227 KiB)
  static_assert(smem_bytes <= 99 * 1024, "forward tile does not fit in shared memory");
};

// Online-softmax state of one query row, held by the 8 threads of its row group.
template <int CPT>
struct RowState {
  float m = kNegInf;  // running max of the scores
  float l = 0.f;      // running sum of exp(score - m)
  float acc[CPT];     // running sum of p * V over this thread's columns
};

template <typename T, int DMAX>
__device__ __forceinline__ void process_key_tile(const AttnParams& p, const KeySegment<T>& seg, int kt, int b, int h,
                                                 int i, bool row_ok, const float* sQrow, float* sK, float* sV,
                                                 float* sProw, RowState<DMAX / kTPR>& st) {
  using TL = Tiles<DMAX>;
  constexpr int BN = TL::BN;
  const int lane8 = threadIdx.x % kTPR;
  __syncthreads();  // the previous tile's sK/sV/sP are no longer read
  load_rows<T, BN, kThreads>(sK, TL::LDK, seg.k, seg.k_row, seg.k_col, kt, seg.n, p.D, DMAX);
  load_rows<T, BN, kThreads>(sV, DMAX, seg.v, seg.v_row, seg.v_col, kt, seg.n, p.D, DMAX);
  __syncthreads();

  float s_loc[BN / kTPR];
  float tile_max = kNegInf;
#pragma unroll
  for (int jj = 0; jj < BN / kTPR; ++jj) {
    const int c = lane8 + jj * kTPR;
    const int key = kt + c;
    float s = kNegInf;
    if (row_ok && key < seg.n && (seg.is_prefix || sequence_key_visible(p, b, i, key))) {
      s = apply_softcap(dot_rows(sQrow, sK + c * TL::LDK, p.D) * p.scale, p.softcap);
      s += bias_at(p, b, h, i, seg.bias_col0 + key);
    }
    s_loc[jj] = s;
    tile_max = fmaxf(tile_max, s);
  }
  tile_max = group_max<kTPR>(tile_max);
  const float m_new = fmaxf(st.m, tile_max);
  // exp(-inf) = 0 rescales an empty accumulator; a row that has seen nothing keeps m = -inf.
  const float alpha = m_new == kNegInf ? 1.f : expf(st.m - m_new);
  float psum = 0.f;
#pragma unroll
  for (int jj = 0; jj < BN / kTPR; ++jj) {
    const float pv = s_loc[jj] == kNegInf ? 0.f : expf(s_loc[jj] - m_new);
    sProw[lane8 + jj * kTPR] = pv;
    psum += pv;
  }
  psum = group_sum<kTPR>(psum);
  st.l = st.l * alpha + psum;
  st.m = m_new;
  __syncwarp();  // the row's probabilities were written by the 8 lanes of this warp
  const int n_valid = seg.n - kt < BN ? seg.n - kt : BN;
#pragma unroll
  for (int j = 0; j < DMAX / kTPR; ++j) st.acc[j] *= alpha;
  // key-outer, column-inner: one probability load per key, a register-resident accumulator row
  // (columns >= D hold zeros in sV, so no guard is needed)
  for (int kk = 0; kk < n_valid; ++kk) {
    const float pk = sProw[kk];
    const float* vrow = sV + kk * DMAX + lane8;
#pragma unroll
    for (int j = 0; j < DMAX / kTPR; ++j) st.acc[j] = fmaf(pk, vrow[j * kTPR], st.acc[j]);
  }
}

// grid (ceil(Nq / 16), B * Hq), block 128, dynamic smem Tiles<DMAX>::smem_bytes.
template <typename T, int DMAX>
__global__ void __launch_bounds__(kThreads, 2) prefix_attention_fwd_kernel(const AttnParams p) {
  using TL = Tiles<DMAX>;
  constexpr int CPT = DMAX / kTPR;
  PTK_DYNAMIC_SMEM(float, smem);
  float* sQ = smem;
  float* sK = sQ + kBM * DMAX;
  float* sV = sK + TL::BN * TL::LDK;
  float* sP = sV + TL::BN * DMAX;

  const int r = threadIdx.x / kTPR, lane8 = threadIdx.x % kTPR;
  const int b = blockIdx.y / p.Hq, h = blockIdx.y % p.Hq;
  const int hk = h / (p.Hq / p.Hkv);
  const int i0 = blockIdx.x * kBM;
  const int i = i0 + r;
  const bool row_ok = i < p.Nq;
  const int i1 = i0 + kBM < p.Nq ? i0 + kBM : p.Nq;

  const T* q = static_cast<const T*>(p.q) + b * p.q_stride[0] + h * p.q_stride[1];
  load_rows<T, kBM, kThreads>(sQ, DMAX, q, p.q_stride[2], p.q_stride[3], i0, p.Nq, p.D, DMAX);

  RowState<CPT> st;
#pragma unroll
  for (int j = 0; j < CPT; ++j) st.acc[j] = 0.f;

  // Keys [g0, g1) of the prefix-then-sequence order: all of them, or this split's share.
  const bool split = p.num_splits > 1;
  const int g0 = split ? blockIdx.z * p.split_len : 0;
  const int g1 = split ? g0 + p.split_len : p.P + p.Nk;
  if (p.prefix_mode != kNoPrefix && p.P > 0 && g0 < p.P) {
    KeySegment<T> seg = prefix_segment<T>(p, prefix_of_row(p, b), hk);
    seg.n = g1 < seg.n ? g1 : seg.n;  // keys past the split's end read as absent
    for (int kt = g0; kt < seg.n; kt += TL::BN)
      process_key_tile<T, DMAX>(p, seg, kt, b, h, i, row_ok, sQ + r * DMAX, sK, sV, sP + r * TL::BN, st);
  }
  int lo, hi;
  sequence_key_range(p, i0, i1, lo, hi);
  lo = lo > g0 - p.P ? lo : g0 - p.P;
  hi = hi < g1 - p.P ? hi : g1 - p.P;
  KeySegment<T> seq = sequence_segment<T>(p, b, hk);
  seq.n = hi > 0 ? hi : 0;  // (visibility within [lo, hi) is still checked per key)
  for (int kt = lo; kt < hi; kt += TL::BN)
    process_key_tile<T, DMAX>(p, seq, kt, b, h, i, row_ok, sQ + r * DMAX, sK, sV, sP + r * TL::BN, st);

  if (!row_ok) return;
  const bool empty = st.l <= 0.f;  // the row sees no key: output 0, lse -inf (never NaN)
  const float inv_l = empty ? 0.f : 1.f / st.l;
  if (split) {  // normalized partial + its lse, merged by merge_splits_kernel
    const int64_t prow = ((static_cast<int64_t>(blockIdx.z) * p.B + b) * p.Hq + h) * p.Nq + i;
#pragma unroll
    for (int j = 0; j < CPT; ++j) {
      const int c = lane8 + j * kTPR;
      if (c < p.D) p.part_out[prow * p.D + c] = st.acc[j] * inv_l;
    }
    if (lane8 == 0) p.part_lse[prow] = empty ? kNegInf : st.m + logf(st.l);
    return;
  }
  T* out = static_cast<T*>(p.out) + ((static_cast<int64_t>(b) * p.Hq + h) * p.Nq + i) * p.D;
#pragma unroll
  for (int j = 0; j < CPT; ++j) {
    const int c = lane8 + j * kTPR;
    if (c < p.D) out[c] = from_float<T>(st.acc[j] * inv_l);
  }
  if (lane8 == 0) p.lse[(static_cast<int64_t>(b) * p.Hq + h) * p.Nq + i] = empty ? kNegInf : st.m + logf(st.l);
}

// Split-K merge: one warp per (b, h, i) row; lse = logsumexp of the splits' lse, out = sum of
// exp(lse_z - lse) * out_z. grid (ceil(B * Hq * Nq / 4)), block 128.
template <typename T>
__global__ void __launch_bounds__(128) merge_splits_kernel(const AttnParams p) {
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t rows = static_cast<int64_t>(p.B) * p.Hq * p.Nq;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * 4 + warp;
  if (row >= rows) return;  // whole warps leave together: no shuffles below
  float m = kNegInf;
  for (int z = 0; z < p.num_splits; ++z) m = fmaxf(m, p.part_lse[z * rows + row]);
  float sum = 0.f;
  if (m != kNegInf)
    for (int z = 0; z < p.num_splits; ++z) sum += expf(p.part_lse[z * rows + row] - m);
  const float lse = m == kNegInf ? kNegInf : m + logf(sum);
  T* out = static_cast<T*>(p.out) + row * p.D;
  for (int c = lane; c < p.D; c += 32) {
    float acc = 0.f;
    if (lse != kNegInf)
      for (int z = 0; z < p.num_splits; ++z) {
        const float lz = p.part_lse[z * rows + row];
        if (lz != kNegInf) acc += expf(lz - lse) * p.part_out[(z * rows + row) * p.D + c];
      }
    out[c] = from_float<T>(acc);
  }
  if (lane == 0) p.lse[row] = lse;
}

}  // namespace fwd

// How many key splits a forward call uses: > 1 only for decode-like calls (at most 16 queries)
// whose grid is too small to fill the device (about 2 blocks per SM of its num_sms) and whose key
// count makes splitting worth it. `packed_heads`: the grid has one block per (b, kv head) (the
// tensor-core kernel packs the GQA group's query heads), else one per (b, query head).
// Each split covers a multiple of the key tile. The caller allocates p.part_out / p.part_lse.
inline int prefix_attention_decode_splits(const AttnParams& p, int num_sms, bool packed_heads) {
  const int keys = p.P + p.Nk;
  const int group = p.Hkv > 0 ? p.Hq / p.Hkv : 1;
  const int64_t blocks = packed_heads ? static_cast<int64_t>(p.B) * p.Hkv * ((group * p.Nq + 63) / 64)
                                      : static_cast<int64_t>(p.B) * p.Hq;
  const int64_t target = 2 * static_cast<int64_t>(num_sms > 0 ? num_sms : 1);
  if (p.Nq > fwd::kBM || keys < 512 || blocks == 0 || blocks >= target) return 1;
  int splits = static_cast<int>((target + blocks - 1) / blocks);
  const int max_by_keys = keys / 128;                         // at least 128 keys per split
  splits = splits < max_by_keys ? splits : max_by_keys;
  return splits < 1 ? 1 : (splits > 64 ? 64 : splits);
}

// Key span of each split for `splits` splits: a multiple of 64 (every bucket's key tile divides it).
inline int prefix_attention_split_len(const AttnParams& p, int splits) {
  const int keys = p.P + p.Nk;
  const int per = (keys + splits - 1) / splits;
  return (per + 63) / 64 * 64;
}

template <typename T, int DMAX>
inline void launch_prefix_attention_fwd_d(const AttnParams& p, ptk_stream_t stream) {
  const size_t smem = fwd::Tiles<DMAX>::smem_bytes;
  auto kernel = fwd::prefix_attention_fwd_kernel<T, DMAX>;  // (a comma inside a macro argument)
  allow_dynamic_smem(kernel, smem);
  const unsigned splits = p.num_splits > 1 ? p.num_splits : 1;
  dim3 grid(ceil_div_h(p.Nq, fwd::kBM), p.B * p.Hq, splits);
  PTK_LAUNCH(kernel, grid, dim3(fwd::kThreads), smem, stream, p);
  if (splits > 1) {
    auto merge = fwd::merge_splits_kernel<T>;
    const int64_t rows = static_cast<int64_t>(p.B) * p.Hq * p.Nq;
    PTK_LAUNCH(merge, dim3(static_cast<unsigned>((rows + 3) / 4)), dim3(128), 0, stream, p);
  }
}

// CUDA-core path (float32 inputs; see prefix_attention_launch.cuh for the dispatcher that
// sends float16 / bfloat16 to tensor cores). Head-dim buckets 64 / 128 / 256.
template <typename T>
inline void launch_prefix_attention_fwd_simt(const AttnParams& p, ptk_stream_t stream) {
  if (p.B * p.Hq == 0 || p.Nq == 0) return;
  if (p.D <= 64)
    launch_prefix_attention_fwd_d<T, 64>(p, stream);
  else if (p.D <= 128)
    launch_prefix_attention_fwd_d<T, 128>(p, stream);
  else
    launch_prefix_attention_fwd_d<T, 256>(p, stream);
}

}  // namespace ptk
