// CPU emulation of the sm_80 primitives of csrc/kernels/mma_sm80.cuh (same names, same
// signatures), included by that header under PTK_HOST_HARNESS.
//
// Every instruction is warp-collective and exchanges registers like the hardware: each lane
// publishes its operand registers (or its row address) into the warp's exchange slots, the warp
// meets, and each lane assembles ITS OWN result registers from the other lanes' values with the
// PTX ISA fragment layout (see the table in mma_sm80.cuh). A kernel that reads a fragment element
// from the wrong register or lane therefore gets a different element, as on the GPU.
//
// Rounding as the tensor cores: 16-bit operands, products exact in fp32 (11x11 / 8x8-bit
// significands), accumulated in fp32.
//
// cp.async: a copy is queued in the issuing thread's open group and its destination is filled with
// 0xFF bytes (NaN in f16 and bf16) at issue; the data lands only when cp_async_wait<N> retires its
// group. Shared-memory hazards are tracked in barrier epochs (see ChunkState in simt_shim.h) and
// reported as the launch's error, so a missing wait_group, a missing __syncthreads after it, or a
// missing barrier before a stage buffer is overwritten fails deterministically.
#pragma once

#include "simt_shim.h"

#include <cstdint>
#include <cstring>
#include <string>

namespace ptk {
namespace tc {

namespace shim_detail {

inline unsigned warp_of_thread() { return ::ptk_shim::tl_linear / 32; }
inline uint32_t* my_slots() { return &::ptk_shim::current_team()->wide[::ptk_shim::tl_linear * ::ptk_shim::kWide]; }
inline const uint32_t* lane_slots(unsigned l) {
  const unsigned base = (::ptk_shim::tl_linear / 32) * 32;
  return &::ptk_shim::current_team()->wide[(base + l) * ::ptk_shim::kWide];
}
inline void warp_meet() { ::ptk_shim::syncwarp(); }

inline ::ptk_shim::ChunkState& chunk(const void* p) {
  return ::ptk_shim::current_team()->chunks[reinterpret_cast<uintptr_t>(p) >> 4];
}
inline uint64_t epoch() { return ::ptk_shim::current_team()->epoch.load(std::memory_order_relaxed); }

inline void check_aligned(const void* p, const char* what) {
  if (reinterpret_cast<uintptr_t>(p) % 16 != 0) ::ptk_shim::report(std::string(what) + ": address not 16-byte aligned");
}

// A read of the 16-byte shared chunk at p by the calling warp.
inline void track_read(const void* p, const char* what) {
  auto* team = ::ptk_shim::current_team();
  std::string err;
  {
    std::lock_guard<std::mutex> lock(team->mu);
    auto& c = chunk(p);
    const uint64_t now = epoch();
    const int warp = static_cast<int>(warp_of_thread());
    // Another warp's copy into this chunk in this epoch, landed or not: the reader was meant to
    // see the old contents (a stage reused without the barrier). Checked before the landing
    // epoch, so the report names the same missing barrier whichever thread ran ahead.
    if (c.issue_epoch == now && c.issuer_warp != warp)
      err = std::string(what) + " read shared data another warp overwrote since the last __syncthreads (missing barrier "
                                "before reusing a stage's buffer)";
    else if (c.pending > 0)
      err = std::string(what) + " read shared data whose cp.async was not waited for (missing cp.async.wait_group)";
    else if (c.land_epoch == now)
      err = std::string(what) + " read shared data written since the last __syncthreads (missing barrier after cp.async.wait_group)";
    if (c.read_epoch != now) {
      c.read_epoch = now;
      c.reader_warp = warp;
    } else if (c.reader_warp != warp) {
      c.reader_warp = -2;
    }
  }
  if (!err.empty()) ::ptk_shim::report(err);
}

// A write (asynchronous or not) into the chunk at p: another warp must not have read it in this epoch.
inline void track_write(void* p, bool async, const char* what) {
  auto* team = ::ptk_shim::current_team();
  std::string err;
  {
    std::lock_guard<std::mutex> lock(team->mu);
    auto& c = chunk(p);
    const uint64_t now = epoch();
    if (c.read_epoch == now && c.reader_warp != static_cast<int>(warp_of_thread()))
      err = std::string(what) + " overwrote shared data another warp read since the last __syncthreads (missing barrier "
                                "before reusing a stage's buffer)";
    if (async) {
      ++c.pending;
      c.issue_epoch = now;
      c.issuer_warp = static_cast<int>(warp_of_thread());
    } else {
      c.land_epoch = now;
    }
  }
  if (!err.empty()) ::ptk_shim::report(err);
}

inline void track_land(void* p) {
  auto* team = ::ptk_shim::current_team();
  std::lock_guard<std::mutex> lock(team->mu);
  auto& c = chunk(p);
  --c.pending;
  c.land_epoch = epoch();
}

template <typename T>
inline float half_to_float(uint32_t reg, int which) {
  const uint16_t bits = static_cast<uint16_t>(which ? reg >> 16 : reg & 0xffffu);
  T v;
  std::memcpy(&v, &bits, 2);
  return ::ptk::to_float(v);
}

template <int N, bool TRANS>
inline void ldmatrix(uint32_t (&r)[N], const void* row) {
  const unsigned l = ::ptk_shim::lane();
  uint32_t* mine = my_slots();
  const uint64_t addr = reinterpret_cast<uint64_t>(row);
  mine[0] = static_cast<uint32_t>(addr);
  mine[1] = static_cast<uint32_t>(addr >> 32);
  if (l < 8u * N) {  // only these lanes' addresses are used
    check_aligned(row, "ldmatrix");
    track_read(row, "ldmatrix");
  }
  warp_meet();
  auto row_of = [](unsigned lane) {
    const uint32_t* s = lane_slots(lane);
    return reinterpret_cast<const uint16_t*>(static_cast<uintptr_t>(s[0]) | (static_cast<uintptr_t>(s[1]) << 32));
  };
  for (int i = 0; i < N; ++i) {
    uint16_t lo, hi;
    if (!TRANS) {
      const uint16_t* src = row_of(8 * i + l / 4);
      lo = src[2 * (l % 4)];
      hi = src[2 * (l % 4) + 1];
    } else {
      lo = row_of(8 * i + 2 * (l % 4))[l / 4];
      hi = row_of(8 * i + 2 * (l % 4) + 1)[l / 4];
    }
    r[i] = static_cast<uint32_t>(lo) | (static_cast<uint32_t>(hi) << 16);
  }
  warp_meet();  // the slots may be reused by the next collective
}

}  // namespace shim_detail

template <typename T>
inline void mma_16816(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
  using namespace shim_detail;
  uint32_t* mine = my_slots();
  for (int i = 0; i < 4; ++i) mine[i] = a[i];
  mine[4] = b[0];
  mine[5] = b[1];
  warp_meet();
  const unsigned l = ::ptk_shim::lane(), g = l / 4, t = l % 4;
  // A[r][k] sits in lane (r % 8) * 4 + (k % 8) / 2, register (r >= 8) + 2 (k >= 8), half k % 2;
  // B[k][n] in lane n * 4 + (k % 8) / 2, register 4 + (k >= 8), half k % 2.
  auto A = [&](unsigned r, unsigned k) {
    return half_to_float<T>(lane_slots((r % 8) * 4 + (k % 8) / 2)[(r >= 8) + 2 * (k >= 8)], k % 2);
  };
  auto B = [&](unsigned k, unsigned n) { return half_to_float<T>(lane_slots(n * 4 + (k % 8) / 2)[4 + (k >= 8)], k % 2); };
  float out[4];
  for (int i = 0; i < 4; ++i) {
    const unsigned r = g + 8 * (i / 2), n = 2 * t + (i % 2);
    float acc = d[i];
    for (unsigned k = 0; k < 16; ++k) acc += A(r, k) * B(k, n);
    out[i] = acc;
  }
  warp_meet();
  for (int i = 0; i < 4; ++i) d[i] = out[i];
}

inline void ldmatrix_x1(uint32_t (&r)[1], const void* row) { shim_detail::ldmatrix<1, false>(r, row); }
inline void ldmatrix_x2(uint32_t (&r)[2], const void* row) { shim_detail::ldmatrix<2, false>(r, row); }
inline void ldmatrix_x4(uint32_t (&r)[4], const void* row) { shim_detail::ldmatrix<4, false>(r, row); }
inline void ldmatrix_x1_trans(uint32_t (&r)[1], const void* row) { shim_detail::ldmatrix<1, true>(r, row); }
inline void ldmatrix_x2_trans(uint32_t (&r)[2], const void* row) { shim_detail::ldmatrix<2, true>(r, row); }
inline void ldmatrix_x4_trans(uint32_t (&r)[4], const void* row) { shim_detail::ldmatrix<4, true>(r, row); }

inline void cp_async_16(void* dst, const void* src, bool valid) {
  using namespace shim_detail;
  check_aligned(dst, "cp.async (shared)");
  if (valid) check_aligned(src, "cp.async (global)");
  track_write(dst, true, "cp.async");
  ::ptk_shim::AsyncCopy c;
  c.dst = dst;
  if (valid)
    std::memcpy(c.data, src, 16);
  else
    std::memset(c.data, 0, 16);
  std::memset(dst, 0xff, 16);  // poison until it lands
  ::ptk_shim::tl_open_group.push_back(c);
}

inline void cp_async_commit() {
  ::ptk_shim::tl_groups.push_back(std::move(::ptk_shim::tl_open_group));
  ::ptk_shim::tl_open_group.clear();
}

template <int N>
inline void cp_async_wait() {
  auto& groups = ::ptk_shim::tl_groups;
  while (groups.size() > static_cast<size_t>(N)) {
    for (auto& c : groups.front()) {
      std::memcpy(c.dst, c.data, 16);
      shim_detail::track_land(c.dst);
    }
    groups.erase(groups.begin());
  }
}

inline void st_shared_16(void* dst, const uint4& v) {
  shim_detail::check_aligned(dst, "st_shared_16");
  shim_detail::track_write(dst, false, "shared store");
  std::memcpy(dst, &v, 16);
}

inline void st_shared_32(void* dst, uint32_t v) {
  if (reinterpret_cast<uintptr_t>(dst) % 4 != 0) ::ptk_shim::report("st_shared_32: address not 4-byte aligned");
  // tracked per 16-byte chunk: a write into a chunk the warp's readers use needs a barrier first
  shim_detail::track_write(reinterpret_cast<void*>(reinterpret_cast<uintptr_t>(dst) & ~uintptr_t{15}), false,
                           "shared store");
  std::memcpy(dst, &v, 4);
}

}  // namespace tc
}  // namespace ptk
