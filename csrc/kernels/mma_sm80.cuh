// The sm_80 tensor-core and async-copy primitives of the FlashAttention-2-style kernels:
// mma.sync.aligned.m16n8k16 (f16/bf16 in, f32 accumulate), ldmatrix (.x1/.x2/.x4, .trans) and
// cp.async (16 bytes, commit_group / wait_group). sm_90 runs the same instructions.
//
// On the GPU these are inline PTX. Under the host harness (PTK_HOST_HARNESS) the same names come
// from tests/host_harness/tensor_core_shim.h, which emulates each instruction with the exact
// per-thread fragment layout of the PTX ISA (and models cp.async as invisible until waited for),
// so a kernel that assumes a wrong layout or a wrong pipeline order fails on the CPU.
//
// Fragment layouts (PTX ISA, "Matrix Fragments for mma.m16n8k16 with floating point type";
// groupID g = lane >> 2, threadID_in_group t = lane % 4; each .b32 register holds two 16-bit
// elements, the lower column / row index in the low half):
//   A 16x16 (row-major), a[0..3]: a[0] = A[g][2t..2t+1], a[1] = A[g+8][2t..2t+1],
//                                 a[2] = A[g][2t+8..2t+9], a[3] = A[g+8][2t+8..2t+9]
//   B 16x8  (K x N, "col"), b[0..1]: b[0] = B[2t..2t+1][g], b[1] = B[2t+8..2t+9][g]
//   C/D 16x8 f32, c[0..3]: c[0..1] = C[g][2t..2t+1], c[2..3] = C[g+8][2t..2t+1]
// The same layouts are used by CUTLASS's SM80_16x8x16_F32F16F16F32_TN atom and FlashAttention-2.
// ldmatrix .m8n8 (PTX ISA "Warp-level matrix load instruction: ldmatrix"): matrix i's 8 row
// addresses come from lanes 8i..8i+7; lane l receives r[i] = M_i[l / 4][2 (l % 4) .. 2 (l % 4) + 1],
// or with .trans r[i] = {M_i[2 (l % 4)][l / 4], M_i[2 (l % 4) + 1][l / 4]}.
#pragma once

#include "common.cuh"

#include <cstdint>
#include <type_traits>

#ifdef PTK_HOST_HARNESS
#include "tensor_core_shim.h"
#endif

namespace ptk {
namespace tc {

__device__ __forceinline__ uint16_t bits16(__half x) { return __half_as_ushort(x); }
__device__ __forceinline__ uint16_t bits16(__nv_bfloat16 x) { return __bfloat16_as_ushort(x); }

// Two 16-bit values of type T (T = __half or __nv_bfloat16) in one register, `lo` in the low half.
template <typename T>
__device__ __forceinline__ uint32_t pack2(float lo, float hi) {
  return static_cast<uint32_t>(bits16(from_float<T>(lo))) | (static_cast<uint32_t>(bits16(from_float<T>(hi))) << 16);
}

#ifndef PTK_HOST_HARNESS

__device__ __forceinline__ uint32_t smem_addr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// d += A * B for one 16x8x16 tile (fp32 accumulators in place).
template <typename T>
__device__ __forceinline__ void mma_16816(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
  if constexpr (std::is_same_v<T, __half>) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
  } else {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
  }
}

// `row` is this lane's row address (16-byte aligned, shared memory); see the layout note above.
__device__ __forceinline__ void ldmatrix_x1(uint32_t (&r)[1], const void* row) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x1.shared.b16 {%0}, [%1];\n" : "=r"(r[0]) : "r"(smem_addr(row)));
}
__device__ __forceinline__ void ldmatrix_x2(uint32_t (&r)[2], const void* row) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x2.shared.b16 {%0,%1}, [%2];\n"
               : "=r"(r[0]), "=r"(r[1]) : "r"(smem_addr(row)));
}
__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], const void* row) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(smem_addr(row)));
}
__device__ __forceinline__ void ldmatrix_x1_trans(uint32_t (&r)[1], const void* row) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x1.trans.shared.b16 {%0}, [%1];\n" : "=r"(r[0]) : "r"(smem_addr(row)));
}
__device__ __forceinline__ void ldmatrix_x2_trans(uint32_t (&r)[2], const void* row) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x2.trans.shared.b16 {%0,%1}, [%2];\n"
               : "=r"(r[0]), "=r"(r[1]) : "r"(smem_addr(row)));
}
__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], const void* row) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(smem_addr(row)));
}

// 16 bytes global -> shared, asynchronous; `valid == false` writes 16 zero bytes (src-size 0)
// and reads nothing. Both addresses must be 16-byte aligned.
__device__ __forceinline__ void cp_async_16(void* dst, const void* src, bool valid) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_addr(dst)), "l"(src),
               "r"(valid ? 16 : 0));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
// Waits until at most N of this thread's committed groups are still in flight. The data is then
// visible to this thread only: a __syncthreads must follow before other threads read it.
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
}
// A synchronous 16-byte shared store (the fallback for operands that cannot be copied as 16-byte
// vectors); under the harness it is tracked like a copy that lands at once.
__device__ __forceinline__ void st_shared_16(void* dst, const uint4& v) { *reinterpret_cast<uint4*>(dst) = v; }
// A 4-byte shared store (two 16-bit values of an accumulator fragment handed to other warps).
__device__ __forceinline__ void st_shared_32(void* dst, uint32_t v) { *reinterpret_cast<uint32_t*>(dst) = v; }

#endif  // !PTK_HOST_HARNESS

}  // namespace tc
}  // namespace ptk
