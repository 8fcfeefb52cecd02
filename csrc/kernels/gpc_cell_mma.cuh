// The GPC cell's GEMMs on tensor cores (float16 / bfloat16, sm_80+), on mma.sync.m16n8k16 from
// mma_sm80.cuh: the forward a = X W + bias with the gating epilogue fused (gpc::GateEpilogue),
// and the backward's dX = dA W^T and dW = X^T dA.
//
// Block = 4 warps, a 64-row x 32-column output tile for all G gate groups at once (the epilogue
// needs every gate of an output element); warp w owns rows [16w, 16w + 16). K runs in chunks of
// 32 through a 2-stage ring: the A chunk (64 x 32) and the G B chunks (32 x 32) land in shared
// memory as 16-bit rows, then are read by ldmatrix (B through ldmatrix.trans: its k pairs lie in
// different rows). The forward's X = [U, S] chunk comes from two tensors: each 8-column piece is
// one cp.async from U or from S (two sources, one tile), W's pieces likewise. Accumulators stay
// in registers (fp32); the epilogue runs on them directly.
#pragma once

#include "gpc_cell.cuh"
#include "mma_sm80.cuh"

namespace ptk {
namespace gpc {

constexpr int kMmaRows = 64, kMmaCols = 32, kMmaK = 32, kMmaThreads = 128;
constexpr int kMmaLd = 40;  // 32 + 8 elements: 16-byte aligned rows, conflict-free ldmatrix phases

// One K chunk of the operands into shared memory stage buffers sA (64 x 32) and sB[g] (32 x 32).
// vec (VEC operands only, see gemm_mma_kernel): every 8-element piece is one 16-byte cp.async
// from A.ptr / Bop.ptr (a piece lies wholly inside U or S, inside or outside the matrix, since
// d % 8 == 0); otherwise the elements are gathered through the functors, rounded to T and stored
// synchronously.
template <typename T, int G, bool VEC, typename OpA, typename OpB>
__device__ __forceinline__ void gemm_mma_load_chunk(const GpcParams& p, int rows, int cols, int K, int row0, int col0,
                                                    int k0, const OpA& A, const OpB& Bop, bool vec, T* sA, T* sB) {
  for (int idx = threadIdx.x; idx < kMmaRows * (kMmaK / 8); idx += kMmaThreads) {
    const int r = idx / (kMmaK / 8), c = (idx % (kMmaK / 8)) * 8;
    const bool row_ok = row0 + r < rows;
    if constexpr (VEC) {
      if (vec) {
        const bool ok = row_ok && k0 + c < K;
        tc::cp_async_16(sA + r * kMmaLd + c, ok ? A.ptr(p, row0 + r, k0 + c) : static_cast<const T*>(sA), ok);
        continue;
      }
    }
    uint32_t w[4];
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const int k = k0 + c + 2 * e;
      w[e] = tc::pack2<T>(row_ok && k < K ? A(p, row0 + r, k) : 0.f, row_ok && k + 1 < K ? A(p, row0 + r, k + 1) : 0.f);
    }
    tc::st_shared_16(sA + r * kMmaLd + c, uint4{w[0], w[1], w[2], w[3]});
  }
  for (int idx = threadIdx.x; idx < G * kMmaK * (kMmaCols / 8); idx += kMmaThreads) {
    const int g = idx / (kMmaK * (kMmaCols / 8)), kk = (idx / (kMmaCols / 8)) % kMmaK, c = (idx % (kMmaCols / 8)) * 8;
    const int k = k0 + kk;
    T* dst = sB + g * (kMmaK * kMmaLd) + kk * kMmaLd + c;
    if constexpr (VEC) {
      if (vec) {
        const bool ok = k < K && col0 + c < cols;
        tc::cp_async_16(dst, ok ? Bop.ptr(p, k, g, col0 + c) : static_cast<const T*>(dst), ok);
        continue;
      }
    }
    uint32_t w[4];
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const int n = col0 + c + 2 * e;
      w[e] = tc::pack2<T>(k < K && n < cols ? Bop(p, k, g, n) : 0.f, k < K && n + 1 < cols ? Bop(p, k, g, n + 1) : 0.f);
    }
    tc::st_shared_16(dst, uint4{w[0], w[1], w[2], w[3]});
  }
}

// C (rows x cols, G column groups) = sum_k A(row, k) B(k, g, col) on mma.sync, fp32 accumulators
// in registers, epi(row, col, acc[G]) on them. K chunks go through a 2-stage ring (the next
// chunk's copies fly while this one is multiplied). VEC: the operands also provide ptr() (16-bit
// storage, contiguous 8-element pieces) and `vec` says the call's strides and alignment allow
// cp.async; otherwise (and for float32 operands such as dA) they are gathered element-wise.
// grid (ceil(cols / 32), ceil(rows / 64)), block 128.
template <typename T, int G, bool VEC, typename OpA, typename OpB, typename Epi>
__global__ void __launch_bounds__(kMmaThreads, 2) gemm_mma_kernel(const GpcParams p, int rows, int cols, int K, OpA A,
                                                                 OpB Bop, Epi epi, bool vec) {
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 800
  __shared__ __align__(16) T sA[2][kMmaRows * kMmaLd];
  __shared__ __align__(16) T sB[2][G * kMmaK * kMmaLd];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g4 = lane / 4, t4 = lane % 4;
  const int row0 = blockIdx.y * kMmaRows, col0 = blockIdx.x * kMmaCols;
  float acc[G][kMmaCols / 8][4];
#pragma unroll
  for (int g = 0; g < G; ++g)
#pragma unroll
    for (int nt = 0; nt < kMmaCols / 8; ++nt)
#pragma unroll
      for (int e = 0; e < 4; ++e) acc[g][nt][e] = 0.f;

  const int n_chunks = (K + kMmaK - 1) / kMmaK;
  if (n_chunks > 0) gemm_mma_load_chunk<T, G, VEC>(p, rows, cols, K, row0, col0, 0, A, Bop, vec, sA[0], sB[0]);
  tc::cp_async_commit();
  for (int c = 0; c < n_chunks; ++c) {
    if (c + 1 < n_chunks)
      gemm_mma_load_chunk<T, G, VEC>(p, rows, cols, K, row0, col0, (c + 1) * kMmaK, A, Bop, vec, sA[(c + 1) % 2],
                                     sB[(c + 1) % 2]);
    tc::cp_async_commit();
    tc::cp_async_wait<1>();
    __syncthreads();
    const T* cA = sA[c % 2];
    const T* cB = sB[c % 2];
#pragma unroll
    for (int ks = 0; ks < kMmaK / 16; ++ks) {
      uint32_t a[4];
      tc::ldmatrix_x4(a, cA + (warp * 16 + lane % 16) * kMmaLd + ks * 16 + (lane / 16) * 8);
#pragma unroll
      for (int g = 0; g < G; ++g)
#pragma unroll
        for (int np = 0; np < kMmaCols / 16; ++np) {
          uint32_t bb[4];
          tc::ldmatrix_x4_trans(bb, cB + g * (kMmaK * kMmaLd) + (ks * 16 + ((lane / 8) % 2) * 8 + lane % 8) * kMmaLd +
                                        np * 16 + (lane / 16) * 8);
          const uint32_t b0[2] = {bb[0], bb[1]}, b1[2] = {bb[2], bb[3]};
          tc::mma_16816<T>(acc[g][2 * np], a, b0);
          tc::mma_16816<T>(acc[g][2 * np + 1], a, b1);
        }
    }
    __syncthreads();  // this stage is read by every warp before the next iteration refills it
  }

  // fused epilogue on the accumulator registers: rows g4 / g4 + 8, columns 2 t4 / 2 t4 + 1
#pragma unroll
  for (int nt = 0; nt < kMmaCols / 8; ++nt)
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const int row = row0 + warp * 16 + g4 + 8 * (e / 2), col = col0 + nt * 8 + 2 * t4 + (e % 2);
      if (row >= rows || col >= cols) continue;
      float a[G];
#pragma unroll
      for (int g = 0; g < G; ++g) a[g] = acc[g][nt][e];
      epi(p, row, col, a);
    }
#endif
}

// Whether the forward's X = [U, S] and W pieces can be copied as aligned 16-byte vectors.
template <typename T>
inline bool gpc_forward_vectorizable(const GpcParams& p) {
  auto aligned = [](const void* ptr) { return reinterpret_cast<uintptr_t>(ptr) % 16 == 0; };
  auto row_ok = [](int64_t stride) { return (stride * static_cast<int64_t>(sizeof(T))) % 16 == 0; };
  return p.d % 8 == 0 && p.update_stride[2] == 1 && p.state_stride[2] == 1 && p.weight_stride[1] == 1 &&
         aligned(p.update) && aligned(p.state) && aligned(p.weight) && row_ok(p.update_stride[0]) &&
         row_ok(p.update_stride[1]) && row_ok(p.state_stride[0]) && row_ok(p.state_stride[1]) &&
         row_ok(p.weight_stride[0]);
}

template <int G, bool VEC, typename T, typename OpA, typename OpB, typename Epi>
inline void launch_gemm_mma(const GpcParams& p, int rows, int cols, int K, OpA a, OpB b, Epi e, bool vec,
                            ptk_stream_t stream) {
  if (rows == 0 || cols == 0) return;
  auto kernel = gemm_mma_kernel<T, G, VEC, OpA, OpB, Epi>;  // (commas inside a macro argument)
  dim3 grid(ceil_div_h(cols, kMmaCols), ceil_div_h(rows, kMmaRows));
  PTK_LAUNCH(kernel, grid, dim3(kMmaThreads), 0, stream, p, rows, cols, K, a, b, e, vec);
}

template <typename T, int VARIANT>
inline void fwd_variant_mma(const GpcParams& p, ptk_stream_t stream) {
  constexpr int G = GateEpilogue<T, VARIANT>::G;
  const int rows = p.B * p.m;
  if (rows == 0 || p.d == 0) return;
  launch_gemm_mma<G, true, T>(p, rows, p.d, 2 * p.d, XOperand<T>(), WOperand<T>(), GateEpilogue<T, VARIANT>(),
                              gpc_forward_vectorizable<T>(p), stream);
}

// The backward's two GEMMs on mma.sync: dX = dA W^T (M x 2d, K = G d) and dW = X^T dA (2d x G d,
// K = M: the batch reduction runs inside each block's K loop, in a fixed order, no atomics). dA
// is the fp32 output of gate_backward_kernel, rounded to T as an MMA operand (the same rounding as
// an eager float16 / bfloat16 backward). db = 1^T dA stays an fp32 column sum on CUDA cores (a
// reduction, not a product worth a tensor-core tile).
template <typename T, int VARIANT>
inline void bwd_variant_mma(const GpcParams& p, ptk_stream_t stream) {
  constexpr int G = GateEpilogue<T, VARIANT>::G;
  const int M = p.B * p.m, width = G * p.d;
  if (M == 0 || p.d == 0) return;
  launch_gate_backward<T, VARIANT>(p, stream);
  if (p.grad_update || p.grad_state) {
    launch_gemm_mma<1, false, T>(p, M, 2 * p.d, width, DAOperand{width}, WTransposed<T>(), DXEpilogue<T>(), false,
                                 stream);
    launch_state_reduce<T>(p, stream);
  }
  if (p.grad_weight)
    launch_gemm_mma<1, false, T>(p, 2 * p.d, width, M, XTransposed<T>(), DAasB{width}, StoreWeightGrad<T>{width},
                                 false, stream);
  if (p.grad_bias) launch_gemm<1>(p, 1, width, M, Ones(), DAasB{width}, StoreBiasGrad<T>(), stream);
}

}  // namespace gpc
}  // namespace ptk
