// A CPU SIMT model of the CUDA features ptkernels' kernels use, so that the SAME torch-free
// csrc/kernels/*.cuh compile with g++ (C++20, pthreads) and run on the host.
//
// Model: one std::thread per CUDA thread of a block; the blocks of a grid run one after another on
// the same thread team. __syncthreads is a std::barrier over the block, warp shuffles go through a
// per-warp exchange buffer between two warp barriers, __shared__ is static storage (one block at a
// time), dynamic shared memory is one buffer owned by the launch.
//
// What this cannot model: the hardware memory model (every barrier here is a full fence, so a race
// can pass), warp-synchronous code without __syncwarp, timing, occupancy, fast-math ULPs.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <atomic>
#include <barrier>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <memory>
#include <mutex>
#include <string>
#include <unordered_map>
#include <stdexcept>
#include <thread>
#include <type_traits>
#include <vector>

namespace ptk_shim {

// Shared-memory hazard tracking for the tensor-core shim (tensor_core_shim.h), per 16-byte chunk
// touched by ldmatrix / cp.async / st_shared_16. Time is counted in barrier epochs (one per
// __syncthreads), so a hazard is found whatever order the host threads happen to run in:
//   - a read of a chunk whose cp.async has not been waited for (missing cp.async.wait_group);
//   - a read in the same epoch as the chunk's copy landed (missing __syncthreads after the wait);
//   - a write into a chunk another warp read in the same epoch, or a read of a chunk another
//     warp copied into in the same epoch (missing barrier before a stage's buffer is reused).
struct ChunkState {
  int pending = 0;                      // copies issued, not yet landed
  uint64_t issue_epoch = ~uint64_t{0};  // epoch and warp of the last issue
  int issuer_warp = -1;
  uint64_t land_epoch = ~uint64_t{0};   // epoch of the last landing
  uint64_t read_epoch = ~uint64_t{0};   // epoch of the last read
  int reader_warp = -1;                 // warp that read it in read_epoch (-2: several)
};

struct EpochTick {
  std::atomic<uint64_t>* epoch;
  void operator()() noexcept { epoch->fetch_add(1, std::memory_order_relaxed); }
};

struct Team {
  dim3 block;
  dim3 grid;
  std::atomic<uint64_t> epoch{0};
  std::unique_ptr<std::barrier<EpochTick>> block_barrier;
  std::vector<std::unique_ptr<std::barrier<>>> warp_barriers;
  std::vector<uint64_t> exchange;  // one slot per thread, read by the other lanes of its warp
  std::vector<uint32_t> wide;      // kWide words per thread (fragment exchange of the tensor-core shim)
  std::vector<unsigned char> dynamic_smem;
  std::mutex mu;                   // guards chunks and error
  std::unordered_map<uintptr_t, ChunkState> chunks;
  std::string error;               // the first hazard found; launch() throws it
};
constexpr unsigned kWide = 8;

inline Team*& current_team() {
  static Team* team = nullptr;
  return team;
}

inline thread_local uint3 tl_thread_idx;
inline thread_local uint3 tl_block_idx;
inline thread_local unsigned tl_linear = 0;

inline unsigned block_threads(const Team& t) { return t.block.x * t.block.y * t.block.z; }

inline void syncthreads() { current_team()->block_barrier->arrive_and_wait(); }

inline void syncwarp() { current_team()->warp_barriers[tl_linear / 32]->arrive_and_wait(); }

// Every lane publishes its value, the warp meets, every lane reads its partner's, the warp meets
// again (so the buffer can be reused by the next shuffle).
template <typename T>
T shuffle(T value, unsigned src_lane) {
  static_assert(sizeof(T) <= sizeof(uint64_t), "shuffle of a type wider than 64 bits");
  Team* team = current_team();
  unsigned warp = tl_linear / 32;
  uint64_t slot = 0;
  std::memcpy(&slot, &value, sizeof(T));
  team->exchange[tl_linear] = slot;
  team->warp_barriers[warp]->arrive_and_wait();
  uint64_t got = team->exchange[warp * 32 + (src_lane & 31)];
  team->warp_barriers[warp]->arrive_and_wait();
  T out;
  std::memcpy(&out, &got, sizeof(T));
  return out;
}

inline unsigned lane() { return tl_linear & 31; }

inline void report(const std::string& what) {
  Team* team = current_team();
  std::lock_guard<std::mutex> lock(team->mu);
  if (team->error.empty()) team->error = what;
}

// cp.async state of the calling thread: the open (uncommitted) group and the committed groups,
// oldest first. Each copy carries the 16 bytes it will write (snapshot of the source at issue).
struct AsyncCopy {
  void* dst;
  unsigned char data[16];
};
inline thread_local std::vector<AsyncCopy> tl_open_group;
inline thread_local std::vector<std::vector<AsyncCopy>> tl_groups;

// Launch: `block` threads, each walks the whole grid in order; a block barrier separates blocks so
// static __shared__ storage is reused safely.
template <typename Kernel, typename... Args>
void launch(Kernel kernel, dim3 grid, dim3 block, size_t dynamic_smem, Args... args) {
  Team team;
  team.block = block;
  team.grid = grid;
  unsigned n = block_threads(team);
  if (n == 0 || n % 32 != 0) throw std::invalid_argument("simt_shim: block size must be a multiple of 32");
  team.block_barrier = std::make_unique<std::barrier<EpochTick>>(n, EpochTick{&team.epoch});
  for (unsigned w = 0; w < n / 32; ++w) team.warp_barriers.push_back(std::make_unique<std::barrier<>>(32));
  team.exchange.assign(n, 0);
  team.wide.assign(static_cast<size_t>(n) * kWide, 0);
  team.dynamic_smem.assign(dynamic_smem + 16, 0);
  current_team() = &team;
  std::vector<std::thread> threads;
  threads.reserve(n);
  for (unsigned t = 0; t < n; ++t) {
    threads.emplace_back([&, t]() {
      tl_linear = t;
      tl_thread_idx = uint3{t % block.x, (t / block.x) % block.y, t / (block.x * block.y)};
      for (unsigned z = 0; z < grid.z; ++z)
        for (unsigned y = 0; y < grid.y; ++y)
          for (unsigned x = 0; x < grid.x; ++x) {
            tl_block_idx = uint3{x, y, z};
            tl_open_group.clear();
            tl_groups.clear();
            kernel(args...);
            team.block_barrier->arrive_and_wait();
            if (t == 0) team.chunks.clear();  // the next block starts with fresh shared memory
            team.block_barrier->arrive_and_wait();
          }
    });
  }
  for (auto& th : threads) th.join();
  current_team() = nullptr;
  if (!team.error.empty()) throw std::runtime_error(team.error);
}

inline unsigned char* dynamic_smem() { return current_team()->dynamic_smem.data(); }

}  // namespace ptk_shim

// ---- the CUDA names the kernels use ----
#define threadIdx (::ptk_shim::tl_thread_idx)
#define blockIdx (::ptk_shim::tl_block_idx)
#define blockDim (::ptk_shim::current_team()->block)
#define gridDim (::ptk_shim::current_team()->grid)
#undef __global__
#define __global__
#undef __device__
#define __device__
#undef __host__
#define __host__
#undef __forceinline__
#define __forceinline__ inline
#undef __shared__
#define __shared__ static
#define __restrict__
#define __launch_bounds__(...)

inline void __syncthreads() { ptk_shim::syncthreads(); }
inline void __syncwarp(unsigned = 0xffffffffu) { ptk_shim::syncwarp(); }
template <typename T>
T __shfl_xor_sync(unsigned, T v, int lane_mask, int width = 32) {
  unsigned me = ptk_shim::lane();
  unsigned src = me ^ static_cast<unsigned>(lane_mask);
  if (src / width != me / width) src = me;  // outside the segment: own value, as on the GPU
  return ptk_shim::shuffle(v, src);
}
template <typename T>
T __shfl_sync(unsigned, T v, int src_lane, int width = 32) {
  unsigned me = ptk_shim::lane();
  return ptk_shim::shuffle(v, (me / width) * width + (static_cast<unsigned>(src_lane) % width));
}
template <typename T>
T __shfl_down_sync(unsigned, T v, unsigned delta, int width = 32) {
  unsigned me = ptk_shim::lane();
  unsigned src = me + delta;
  if (src / width != me / width) src = me;
  return ptk_shim::shuffle(v, src);
}
template <typename T>
T atomicAdd(T* addr, T v) {
  return std::atomic_ref<T>(*addr).fetch_add(v);
}
inline float __expf(float x) { return std::exp(x); }

// Launch syntax shared with nvcc (see csrc/kernels/common.cuh).
#define PTK_LAUNCH(kernel, grid, block, smem, stream, ...) \
  ::ptk_shim::launch(kernel, grid, block, smem, __VA_ARGS__)
#define PTK_DYNAMIC_SMEM(type, name) type* name = reinterpret_cast<type*>(::ptk_shim::dynamic_smem())

