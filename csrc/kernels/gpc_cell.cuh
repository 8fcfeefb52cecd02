// The Global Prompt Cell: one GEMM with a gating epilogue, forward and backward.
//
//   X = [U, S] (M = B*m rows, 2d), a = X @ W + bias (M, G*d), G gates of d columns each;
//   S' = gate(a, U, S) per variant (ptkernels/backends/eager_gpc.py):
//     lstm      (G=2) sigmoid(a_f) * S + sigmoid(a_r) * U
//     candidate (G=3) sigmoid(a_f) * S + sigmoid(a_r) * tanh(a_c)
//     gru       (G=1) sigmoid(a_g) * U + (1 - sigmoid(a_g)) * S
//     reinject  (G=2) sigmoid(a_f) * U + sigmoid(a_r) * S
//
// Every product runs through one tiled kernel (gemm_kernel): a block computes a 16 x 32 output
// tile for all G column groups at once (so the forward epilogue sees every gate of an output
// element), 8 threads per output row, K in chunks of 32 staged in shared memory as float32.
// Operands and epilogues are small functor structs, so the same kernel serves
//   forward   : a = X W (+ bias, gating epilogue, preact written in float32)
//   backward  : dX = dA W^T (+ the direct terms), dW = X^T dA, db = 1^T dA
// Reductions over the batch (dW, db, a shared state's gradient) loop inside a block: no atomics.
// float16 / bfloat16 run the forward (same epilogue) and the backward's dX / dW products on an
// mma.sync GEMM (gpc_cell_mma.cuh); gpc_cell_launch.cuh dispatches.
#pragma once

#include "common.cuh"

namespace ptk {

enum GpcVariant { kLstm = 0, kCandidate = 1, kGru = 2, kReinject = 3 };

struct GpcParams {
  const void* update = nullptr;  // (B, m, d)
  const void* state = nullptr;   // (B, m, d) or (m, d): state_stride[0] == 0 when shared
  const void* weight = nullptr;  // (2d, G*d)
  const void* bias = nullptr;    // (G*d,)
  void* new_state = nullptr;     // (B, m, d) contiguous
  float* preact = nullptr;       // (B, m, G*d) float32 contiguous
  // backward
  const void* grad_new_state = nullptr;  // (B, m, d) strided
  float* da = nullptr;                   // (M, G*d) float32 scratch
  float* gu = nullptr;                   // (M, d) float32 scratch: direct dU
  float* gs = nullptr;                   // (M, d) float32 scratch: direct dS, then the full per-row dS
  void* grad_update = nullptr;           // (B, m, d) contiguous, or null
  void* grad_state = nullptr;            // state's shape, contiguous, or null
  void* grad_weight = nullptr;           // (2d, G*d) contiguous, or null
  void* grad_bias = nullptr;             // (G*d,), or null

  int64_t update_stride[3] = {0, 0, 0};
  int64_t state_stride[3] = {0, 0, 0};
  int64_t weight_stride[2] = {0, 0};
  int64_t bias_stride = 1;
  int64_t gns_stride[3] = {0, 0, 0};
  int B = 0, m = 0, d = 0;
  int variant = kLstm;
  bool shared_state = false;
};

__host__ __device__ __forceinline__ int gpc_gates(int variant) {
  return variant == kCandidate ? 3 : (variant == kGru ? 1 : 2);
}

namespace gpc {

constexpr int kRows = 16, kCols = 32, kK = 32, kTPR = 8, kThreads = kRows * kTPR, kCPT = kCols / kTPR;

__device__ __forceinline__ float sigmoidf_(float x) { return 1.f / (1.f + expf(-x)); }

template <typename T>
__device__ __forceinline__ float load_u(const GpcParams& p, int row, int c) {
  const int b = row / p.m, i = row % p.m;
  return to_float(static_cast<const T*>(p.update)[b * p.update_stride[0] + i * p.update_stride[1] + c * p.update_stride[2]]);
}
template <typename T>
__device__ __forceinline__ float load_s(const GpcParams& p, int row, int c) {
  const int b = row / p.m, i = row % p.m;
  return to_float(static_cast<const T*>(p.state)[b * p.state_stride[0] + i * p.state_stride[1] + c * p.state_stride[2]]);
}
template <typename T>
__device__ __forceinline__ float load_w(const GpcParams& p, int k, int n) {
  return to_float(static_cast<const T*>(p.weight)[k * p.weight_stride[0] + n * p.weight_stride[1]]);
}

// C (rows x cols, G column groups) = sum_k A(row, k) * B(k, g, col); epi(row, col, acc[G]).
// grid (ceil(cols / 32), ceil(rows / 16)), block 128.
template <int G, typename OpA, typename OpB, typename Epi>
__global__ void __launch_bounds__(kThreads, 2) gemm_kernel(const GpcParams p, int rows, int cols, int K, OpA A, OpB Bop,
                                                        Epi epi) {
  __shared__ float sA[kRows][kK + 1];
  __shared__ float sB[G][kK][kCols + 1];
  const int r = threadIdx.x / kTPR, lane8 = threadIdx.x % kTPR;
  const int row0 = blockIdx.y * kRows, col0 = blockIdx.x * kCols;
  float acc[G][kCPT];
#pragma unroll
  for (int g = 0; g < G; ++g)
#pragma unroll
    for (int j = 0; j < kCPT; ++j) acc[g][j] = 0.f;
  for (int k0 = 0; k0 < K; k0 += kK) {
    __syncthreads();
    for (int idx = threadIdx.x; idx < kRows * kK; idx += kThreads) {
      const int rr = idx / kK, kk = idx % kK;
      sA[rr][kk] = (row0 + rr < rows && k0 + kk < K) ? A(p, row0 + rr, k0 + kk) : 0.f;
    }
    for (int idx = threadIdx.x; idx < G * kK * kCols; idx += kThreads) {
      const int g = idx / (kK * kCols), kk = (idx / kCols) % kK, cc = idx % kCols;
      sB[g][kk][cc] = (k0 + kk < K && col0 + cc < cols) ? Bop(p, k0 + kk, g, col0 + cc) : 0.f;
    }
    __syncthreads();
    for (int kk = 0; kk < kK; ++kk) {
      const float a = sA[r][kk];
#pragma unroll
      for (int g = 0; g < G; ++g)
#pragma unroll
        for (int j = 0; j < kCPT; ++j) acc[g][j] = fmaf(a, sB[g][kk][lane8 + j * kTPR], acc[g][j]);
    }
  }
  const int row = row0 + r;
  if (row >= rows) return;
#pragma unroll
  for (int j = 0; j < kCPT; ++j) {
    const int col = col0 + lane8 + j * kTPR;
    if (col >= cols) continue;
    float a[G];
#pragma unroll
    for (int g = 0; g < G; ++g) a[g] = acc[g][j];
    epi(p, row, col, a);
  }
}

// ---- forward ----
template <typename T>
struct XOperand {  // X = [U, S] (M, 2d)
  __device__ float operator()(const GpcParams& p, int row, int k) const {
    return k < p.d ? load_u<T>(p, row, k) : load_s<T>(p, row, k - p.d);
  }
  // &X[row, k] in U or S (unit column stride: the tensor-core GEMM's vector copies)
  __device__ const T* ptr(const GpcParams& p, int row, int k) const {
    const int b = row / p.m, i = row % p.m;
    return k < p.d ? static_cast<const T*>(p.update) + b * p.update_stride[0] + i * p.update_stride[1] + k
                   : static_cast<const T*>(p.state) + b * p.state_stride[0] + i * p.state_stride[1] + (k - p.d);
  }
};
template <typename T>
struct WOperand {  // W[k, g*d + n]
  __device__ float operator()(const GpcParams& p, int k, int g, int n) const { return load_w<T>(p, k, g * p.d + n); }
  __device__ const T* ptr(const GpcParams& p, int k, int g, int n) const {
    return static_cast<const T*>(p.weight) + k * p.weight_stride[0] + (g * p.d + n);
  }
};

template <typename T, int VARIANT>
struct GateEpilogue {
  static constexpr int G = VARIANT == kCandidate ? 3 : (VARIANT == kGru ? 1 : 2);
  __device__ void operator()(const GpcParams& p, int row, int n, const float* acc) const {
    float a[G];
#pragma unroll
    for (int g = 0; g < G; ++g) {
      a[g] = acc[g] + to_float(static_cast<const T*>(p.bias)[(g * p.d + n) * p.bias_stride]);
      p.preact[static_cast<int64_t>(row) * G * p.d + g * p.d + n] = a[g];
    }
    const float u = load_u<T>(p, row, n), s = load_s<T>(p, row, n);
    float out;
    if (VARIANT == kLstm) {
      out = sigmoidf_(a[0]) * s + sigmoidf_(a[G > 1 ? 1 : 0]) * u;
    } else if (VARIANT == kCandidate) {
      out = sigmoidf_(a[0]) * s + sigmoidf_(a[G > 1 ? 1 : 0]) * tanhf(a[G > 2 ? 2 : 0]);
    } else if (VARIANT == kGru) {
      const float z = sigmoidf_(a[0]);
      out = z * u + (1.f - z) * s;
    } else {
      out = sigmoidf_(a[0]) * u + sigmoidf_(a[G > 1 ? 1 : 0]) * s;
    }
    static_cast<T*>(p.new_state)[static_cast<int64_t>(row) * p.d + n] = from_float<T>(out);
  }
};

// ---- backward ----
// Epilogue backward, elementwise over (row, n < d): dA (all gates), direct dU and dS.
// grid (ceil(M * d / 128)), block 128.
template <typename T, int VARIANT>
__global__ void __launch_bounds__(128) gate_backward_kernel(const GpcParams p) {
  constexpr int G = VARIANT == kCandidate ? 3 : (VARIANT == kGru ? 1 : 2);
  const int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t total = static_cast<int64_t>(p.B) * p.m * p.d;
  if (idx >= total) return;
  const int row = static_cast<int>(idx / p.d), n = static_cast<int>(idx % p.d);
  const int b = row / p.m, i = row % p.m;
  const float g =
      to_float(static_cast<const T*>(p.grad_new_state)[b * p.gns_stride[0] + i * p.gns_stride[1] + n * p.gns_stride[2]]);
  const float* a = p.preact + static_cast<int64_t>(row) * G * p.d;
  const float u = load_u<T>(p, row, n), s = load_s<T>(p, row, n);
  float* da = p.da + static_cast<int64_t>(row) * G * p.d;
  float du, ds;
  if (VARIANT == kGru) {
    const float z = sigmoidf_(a[n]);
    da[n] = g * (u - s) * z * (1.f - z);
    du = g * z;
    ds = g * (1.f - z);
  } else {
    const float f = sigmoidf_(a[n]), r = sigmoidf_(a[p.d + n]);
    if (VARIANT == kLstm) {
      da[n] = g * s * f * (1.f - f);
      da[p.d + n] = g * u * r * (1.f - r);
      du = g * r;
      ds = g * f;
    } else if (VARIANT == kReinject) {
      da[n] = g * u * f * (1.f - f);
      da[p.d + n] = g * s * r * (1.f - r);
      du = g * f;
      ds = g * r;
    } else {  // candidate
      const float c = tanhf(a[2 * p.d + n]);
      da[n] = g * s * f * (1.f - f);
      da[p.d + n] = g * c * r * (1.f - r);
      da[2 * p.d + n] = g * r * (1.f - c * c);
      du = 0.f;
      ds = g * f;
    }
  }
  p.gu[idx] = du;
  p.gs[idx] = ds;
}

struct DAOperand {  // dA (M, G*d) float32, as the A operand: dA[row, k]
  int width;
  __device__ float operator()(const GpcParams& p, int row, int k) const {
    return p.da[static_cast<int64_t>(row) * width + k];
  }
};
template <typename T>
struct WTransposed {  // B(k, 0, n) = W[n, k]: dX = dA W^T
  __device__ float operator()(const GpcParams& p, int k, int, int n) const { return load_w<T>(p, n, k); }
};
template <typename T>
struct DXEpilogue {  // dX[row, n]: n < d -> dU, else dS (per row, float32 scratch when shared)
  __device__ void operator()(const GpcParams& p, int row, int n, const float* acc) const {
    if (n < p.d) {
      if (p.grad_update)
        static_cast<T*>(p.grad_update)[static_cast<int64_t>(row) * p.d + n] =
            from_float<T>(p.gu[static_cast<int64_t>(row) * p.d + n] + acc[0]);
    } else {
      const int64_t at = static_cast<int64_t>(row) * p.d + (n - p.d);
      const float v = p.gs[at] + acc[0];
      if (p.shared_state)
        p.gs[at] = v;  // reduced over the batch by state_reduce_kernel
      else if (p.grad_state)
        static_cast<T*>(p.grad_state)[at] = from_float<T>(v);
    }
  }
};
template <typename T>
struct XTransposed {  // A(kk, row) = X[row, kk]: dW = X^T dA
  __device__ float operator()(const GpcParams& p, int kk, int row) const { return XOperand<T>()(p, row, kk); }
};
struct DAasB {  // B(row, 0, n) = dA[row, n]
  int width;
  __device__ float operator()(const GpcParams& p, int row, int, int n) const {
    return p.da[static_cast<int64_t>(row) * width + n];
  }
};
template <typename T>
struct StoreWeightGrad {
  int width;
  __device__ void operator()(const GpcParams& p, int kk, int n, const float* acc) const {
    static_cast<T*>(p.grad_weight)[static_cast<int64_t>(kk) * width + n] = from_float<T>(acc[0]);
  }
};
struct Ones {  // A(0, row) = 1: db = 1^T dA
  __device__ float operator()(const GpcParams&, int, int) const { return 1.f; }
};
template <typename T>
struct StoreBiasGrad {
  __device__ void operator()(const GpcParams& p, int, int n, const float* acc) const {
    static_cast<T*>(p.grad_bias)[n] = from_float<T>(acc[0]);
  }
};

// grad of a state shared by the batch: sum over b of the per-row dS. grid (ceil(m*d / 128)).
template <typename T>
__global__ void __launch_bounds__(128) state_reduce_kernel(const GpcParams p) {
  const int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t per_batch = static_cast<int64_t>(p.m) * p.d;
  if (idx >= per_batch) return;
  float acc = 0.f;
  for (int b = 0; b < p.B; ++b) acc += p.gs[b * per_batch + idx];
  static_cast<T*>(p.grad_state)[idx] = from_float<T>(acc);
}

template <int G, typename OpA, typename OpB, typename Epi>
inline void launch_gemm(const GpcParams& p, int rows, int cols, int K, OpA a, OpB b, Epi e, ptk_stream_t stream) {
  if (rows == 0 || cols == 0) return;
  auto kernel = gemm_kernel<G, OpA, OpB, Epi>;  // (commas inside a macro argument)
  dim3 grid(ceil_div_h(cols, kCols), ceil_div_h(rows, kRows));
  PTK_LAUNCH(kernel, grid, dim3(kThreads), 0, stream, p, rows, cols, K, a, b, e);
}

template <typename T, int VARIANT>
inline void fwd_variant(const GpcParams& p, ptk_stream_t stream) {
  constexpr int G = GateEpilogue<T, VARIANT>::G;
  launch_gemm<G>(p, p.B * p.m, p.d, 2 * p.d, XOperand<T>(), WOperand<T>(), GateEpilogue<T, VARIANT>(), stream);
}

template <typename T, int VARIANT>
inline void launch_gate_backward(const GpcParams& p, ptk_stream_t stream) {
  auto kernel = gate_backward_kernel<T, VARIANT>;
  const int64_t total = static_cast<int64_t>(p.B) * p.m * p.d;
  PTK_LAUNCH(kernel, dim3(static_cast<unsigned>((total + 127) / 128)), dim3(128), 0, stream, p);
}

// A shared state's gradient: the per-row dS (left in p.gs by DXEpilogue) summed over the batch.
template <typename T>
inline void launch_state_reduce(const GpcParams& p, ptk_stream_t stream) {
  if (!(p.shared_state && p.grad_state)) return;
  auto kernel = state_reduce_kernel<T>;
  const int64_t n = static_cast<int64_t>(p.m) * p.d;
  PTK_LAUNCH(kernel, dim3(static_cast<unsigned>((n + 127) / 128)), dim3(128), 0, stream, p);
}

template <typename T, int VARIANT>
inline void bwd_variant(const GpcParams& p, ptk_stream_t stream) {
  constexpr int G = GateEpilogue<T, VARIANT>::G;
  const int M = p.B * p.m, width = G * p.d;
  if (M == 0 || p.d == 0) return;
  launch_gate_backward<T, VARIANT>(p, stream);
  if (p.grad_update || p.grad_state) {
    launch_gemm<1>(p, M, 2 * p.d, width, DAOperand{width}, WTransposed<T>(), DXEpilogue<T>(), stream);
    launch_state_reduce<T>(p, stream);
  }
  if (p.grad_weight)
    launch_gemm<1>(p, 2 * p.d, width, M, XTransposed<T>(), DAasB{width}, StoreWeightGrad<T>{width}, stream);
  if (p.grad_bias) launch_gemm<1>(p, 1, width, M, Ones(), DAasB{width}, StoreBiasGrad<T>(), stream);
}

}  // namespace gpc

}  // namespace ptk
