// The GPC cell's forward GEMM on tensor cores (float16 / bfloat16, sm_80+): a = X W + bias with
// the gating epilogue fused (gpc::GateEpilogue), on mma.sync.m16n8k16 from mma_sm80.cuh.
//
// Block = 4 warps, a 64-row x 32-column output tile for all G gate groups at once (the epilogue
// needs every gate of an output element); warp w owns rows [16w, 16w + 16). K runs in chunks of
// 32: the X chunk (64 x 32) and the G W chunks (32 x 32) are gathered through the operand functors
// (X = [U, S] is two strided tensors) into shared memory as 16-bit rows, then read by ldmatrix
// (W through ldmatrix.trans: its k pairs lie in different rows). Accumulators stay in registers
// (fp32); the epilogue runs on them directly.
#pragma once

#include "gpc_cell.cuh"
#include "mma_sm80.cuh"

namespace ptk {
namespace gpc {

constexpr int kMmaRows = 64, kMmaCols = 32, kMmaK = 32, kMmaThreads = 128;
constexpr int kMmaLd = 40;  // 32 + 8 elements: 16-byte aligned rows, conflict-free ldmatrix phases

// grid (ceil(cols / 32), ceil(rows / 64)), block 128.
template <typename T, int G, typename OpA, typename OpB, typename Epi>
__global__ void __launch_bounds__(kMmaThreads, 2) gemm_mma_kernel(const GpcParams p, int rows, int cols, int K, OpA A,
                                                                 OpB Bop, Epi epi) {
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 800
  __shared__ __align__(16) T sA[kMmaRows * kMmaLd];
  __shared__ __align__(16) T sB[G][kMmaK * kMmaLd];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g4 = lane / 4, t4 = lane % 4;
  const int row0 = blockIdx.y * kMmaRows, col0 = blockIdx.x * kMmaCols;
  float acc[G][kMmaCols / 8][4];
#pragma unroll
  for (int g = 0; g < G; ++g)
#pragma unroll
    for (int nt = 0; nt < kMmaCols / 8; ++nt)
#pragma unroll
      for (int e = 0; e < 4; ++e) acc[g][nt][e] = 0.f;

  for (int k0 = 0; k0 < K; k0 += kMmaK) {
    __syncthreads();  // the previous chunk is no longer read
    // X chunk: 64 rows x 4 chunks of 8
    for (int idx = threadIdx.x; idx < kMmaRows * (kMmaK / 8); idx += kMmaThreads) {
      const int r = idx / (kMmaK / 8), c = (idx % (kMmaK / 8)) * 8;
      uint32_t w[4];
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int k = k0 + c + 2 * e;
        const bool ok = row0 + r < rows;
        w[e] = tc::pack2<T>(ok && k < K ? A(p, row0 + r, k) : 0.f, ok && k + 1 < K ? A(p, row0 + r, k + 1) : 0.f);
      }
      tc::st_shared_16(sA + r * kMmaLd + c, uint4{w[0], w[1], w[2], w[3]});
    }
    // W chunks: G x 32 k-rows x 4 chunks of 8 columns
    for (int idx = threadIdx.x; idx < G * kMmaK * (kMmaCols / 8); idx += kMmaThreads) {
      const int g = idx / (kMmaK * (kMmaCols / 8)), kk = (idx / (kMmaCols / 8)) % kMmaK, c = (idx % (kMmaCols / 8)) * 8;
      const int k = k0 + kk;
      uint32_t w[4];
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int n = col0 + c + 2 * e;
        w[e] = tc::pack2<T>(k < K && n < cols ? Bop(p, k, g, n) : 0.f, k < K && n + 1 < cols ? Bop(p, k, g, n + 1) : 0.f);
      }
      tc::st_shared_16(sB[g] + kk * kMmaLd + c, uint4{w[0], w[1], w[2], w[3]});
    }
    __syncthreads();
#pragma unroll
    for (int ks = 0; ks < kMmaK / 16; ++ks) {
      uint32_t a[4];
      tc::ldmatrix_x4(a, sA + (warp * 16 + lane % 16) * kMmaLd + ks * 16 + (lane / 16) * 8);
#pragma unroll
      for (int g = 0; g < G; ++g)
#pragma unroll
        for (int np = 0; np < kMmaCols / 16; ++np) {
          uint32_t bb[4];
          tc::ldmatrix_x4_trans(bb, sB[g] + (ks * 16 + ((lane / 8) % 2) * 8 + lane % 8) * kMmaLd + np * 16 + (lane / 16) * 8);
          const uint32_t b0[2] = {bb[0], bb[1]}, b1[2] = {bb[2], bb[3]};
          tc::mma_16816<T>(acc[g][2 * np], a, b0);
          tc::mma_16816<T>(acc[g][2 * np + 1], a, b1);
        }
    }
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

template <typename T, int VARIANT>
inline void fwd_variant_mma(const GpcParams& p, ptk_stream_t stream) {
  constexpr int G = GateEpilogue<T, VARIANT>::G;
  const int rows = p.B * p.m;
  if (rows == 0 || p.d == 0) return;
  auto kernel = gemm_mma_kernel<T, G, XOperand<T>, WOperand<T>, GateEpilogue<T, VARIANT>>;
  dim3 grid(ceil_div_h(p.d, kMmaCols), ceil_div_h(rows, kMmaRows));
  PTK_LAUNCH(kernel, grid, dim3(kMmaThreads), 0, stream, p, rows, p.d, 2 * p.d, XOperand<T>(), WOperand<T>(),
             GateEpilogue<T, VARIANT>());
}

}  // namespace gpc
}  // namespace ptk
