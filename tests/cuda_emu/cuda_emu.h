#pragma once
// A CPU emulation of the parts of the CUDA execution model that pneumoseg's labelling and loss kernels
// use, so their very source (csrc/postprocess/components_kernels.cuh, csrc/loss/combo_loss_cuda_*.cuh)
// runs on a machine without a GPU: each block's threads are real threads (so atomics and shared-memory
// unions interleave as the scheduler pleases), __shared__ arrays are shared by the block,
// __syncthreads, __syncthreads_or and the warp collectives (__ballot_sync, __shfl_sync,
// __shfl_down_sync, __shfl_xor_sync) are rendezvous of the block's or the warp's threads. What it checks beyond the results: every thread of a warp reaches the same
// collective (and no exited lane is in its mask), every thread of a block the same __syncthreads,
// nothing waits forever (a 10 s timeout), and, built with AddressSanitizer, every index.
// It does not model the GPU's weaker memory ordering or its scheduling; compute-sanitizer's
// racecheck on a GPU covers that.
#include <array>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <memory>
#include <mutex>
#include <thread>
#include <vector>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __noinline__ __attribute__((noinline))
#define __launch_bounds__(...)
// One block runs at a time, so a function-static array is exactly one block's shared memory.
#define __shared__ static

struct dim3 {
  unsigned x = 1, y = 1, z = 1;
  constexpr dim3() = default;
  constexpr dim3(unsigned x_, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};

inline thread_local dim3 threadIdx, blockIdx, blockDim, gridDim;

namespace emu {

[[noreturn]] inline void fail(const char* what, int site) {
  std::fprintf(stderr, "cuda_emu: %s (kernel source line %d, block %u,%u,%u thread %u,%u,%u)\n", what, site,
               blockIdx.x, blockIdx.y, blockIdx.z, threadIdx.x, threadIdx.y, threadIdx.z);
  std::fflush(stderr);
  std::abort();
}

// A barrier whose participants may leave (a thread that returned), which checks that everyone
// arrives at the same source line and times out instead of hanging. A waiting thread first yields a
// few times before it sleeps: with a block's threads on a few cores, most barriers are met within
// those yields, and that is several times faster than a sleep and wake-up every time.
class Barrier {
 public:
  explicit Barrier(int n) : expected_(n) {}
  void arrive_and_wait(int site) {
    std::unique_lock<std::mutex> lock(m_);
    if (arrived_ == 0) {
      site_ = site;
    } else if (site != site_) {
      fail("threads of one warp or block met at different barriers or collectives", site);
    }
    const long generation = generation_.load(std::memory_order_relaxed);
    if (++arrived_ == expected_) {
      release();
      return;
    }
    lock.unlock();
    for (int spin = 0; spin < 64; ++spin) {
      if (generation_.load(std::memory_order_acquire) != generation) return;
      std::this_thread::yield();
    }
    lock.lock();
    if (!cv_.wait_for(lock, std::chrono::seconds(10), [&] { return generation_.load() != generation; })) {
      fail("timed out at a barrier or collective: some thread never reached it", site);
    }
  }
  void leave() {
    std::lock_guard<std::mutex> lock(m_);
    --expected_;
    if (arrived_ > 0 && arrived_ == expected_) release();
  }

 private:
  void release() {  // under the lock
    arrived_ = 0;
    generation_.fetch_add(1, std::memory_order_release);
    cv_.notify_all();
  }
  std::mutex m_;
  std::condition_variable cv_;
  int expected_, arrived_ = 0, site_ = -1;
  std::atomic<long> generation_{0};
};

struct Warp {
  explicit Warp(int size) : bar(size), size(size) {}
  Barrier bar;
  int size;
  std::atomic<uint32_t> exited{0};
  std::array<uint64_t, 32> slots{};
};

struct Block {
  explicit Block(int threads) : bar(threads), votes(threads) {
    warps.reserve((threads + 31) / 32);
    for (int t = 0; t < threads; t += 32) warps.push_back(std::make_unique<Warp>(std::min(32, threads - t)));
  }
  Barrier bar;
  std::vector<std::unique_ptr<Warp>> warps;
  std::vector<uint8_t> votes;  // __syncthreads_or's predicates, one per thread; 0 outside a call
};

inline Block* g_block = nullptr;
inline thread_local int t_linear = 0;

inline Warp& warp() { return *g_block->warps[t_linear / 32]; }
inline int lane() { return t_linear % 32; }

inline void check_mask(Warp& w, unsigned mask, int site) {
  const unsigned full = w.size == 32 ? 0xffffffffu : (1u << w.size) - 1u;
  if (mask != full) fail("only whole-warp collectives are emulated", site);
  if (w.exited.load() & mask) fail("a warp collective names a lane that has exited", site);
}

// Every lane of the warp puts `value` in its slot, then reads lane `src`'s (its own value if src < 0).
template <typename T>
T exchange(unsigned mask, T value, int src, int site) {
  static_assert(sizeof(T) <= 8, "");
  Warp& w = warp();
  check_mask(w, mask, site);
  uint64_t bits = 0;
  std::memcpy(&bits, &value, sizeof(T));
  w.slots[lane()] = bits;
  w.bar.arrive_and_wait(site);
  check_mask(w, mask, site);  // a lane that exited while the others waited
  T out = value;
  if (src >= 0 && src < w.size) std::memcpy(&out, &w.slots[src], sizeof(T));
  w.bar.arrive_and_wait(site);  // everyone has read before the slots are reused
  return out;
}

inline unsigned ballot(unsigned mask, bool pred, int site) {
  Warp& w = warp();
  check_mask(w, mask, site);
  w.slots[lane()] = pred ? 1 : 0;
  w.bar.arrive_and_wait(site);
  check_mask(w, mask, site);
  unsigned out = 0;
  for (int l = 0; l < w.size; ++l) out |= w.slots[l] ? (1u << l) : 0u;
  w.bar.arrive_and_wait(site);
  return out;
}

template <typename T>
T shfl(unsigned mask, T value, int src_lane, int site) {
  return exchange(mask, value, src_lane, site);
}

template <typename T>
T shfl_down(unsigned mask, T value, unsigned delta, int site) {
  const int src = lane() + static_cast<int>(delta);
  return exchange(mask, value, src < warp().size ? src : -1, site);
}

template <typename T>
T shfl_xor(unsigned mask, T value, int lane_mask, int site) {
  return exchange(mask, value, lane() ^ lane_mask, site);
}

// A block barrier that also returns whether any thread still in the block passed a nonzero predicate
// (threads that have exited are not counted, as on the GPU).
inline bool syncthreads_or(bool pred, int site) {
  Block& b = *g_block;
  b.votes[t_linear] = pred ? 1 : 0;
  b.bar.arrive_and_wait(site);
  bool any = false;
  for (uint8_t v : b.votes) any = any || v != 0;
  b.bar.arrive_and_wait(site);  // everyone has read before a vote changes
  b.votes[t_linear] = 0;        // an exited thread's vote must not count at a later call
  return any;
}

// Runs `body` as a kernel over `grid` x `block`: one OS thread per CUDA thread, blocks in turn.
template <typename Body>
void launch(dim3 grid, dim3 block, Body body) {
  const int threads = static_cast<int>(block.x * block.y * block.z);
  std::vector<dim3> blocks;
  for (unsigned z = 0; z < grid.z; ++z)
    for (unsigned y = 0; y < grid.y; ++y)
      for (unsigned x = 0; x < grid.x; ++x) blocks.emplace_back(x, y, z);
  auto state = std::make_unique<Block>(threads);
  g_block = state.get();
  Barrier between(threads);  // all threads finish a block before the next starts
  std::vector<std::thread> pool;
  for (int t = 0; t < threads; ++t) {
    pool.emplace_back([&, t] {
      t_linear = t;
      threadIdx = dim3(t % block.x, (t / block.x) % block.y, t / (block.x * block.y));
      blockDim = block;
      gridDim = grid;
      for (const dim3& b : blocks) {
        blockIdx = b;
        body();
        // This thread has exited the block: collectives naming it fail, barriers stop waiting for it.
        Warp& w = warp();
        w.exited.fetch_or(1u << lane());
        w.bar.leave();
        g_block->bar.leave();
        between.arrive_and_wait(-1);
        if (t == 0) {
          state = std::make_unique<Block>(threads);
          g_block = state.get();
        }
        between.arrive_and_wait(-2);
      }
    });
  }
  for (auto& th : pool) th.join();
  g_block = nullptr;
}

// The emulator programs' file I/O: exactly `count` values read (a short file exits with status 2) or
// written.
template <typename T>
void read(std::ifstream& in, T* data, size_t count) {
  in.read(reinterpret_cast<char*>(data), static_cast<std::streamsize>(sizeof(T) * count));
  if (!in) {
    std::fprintf(stderr, "cuda_emu: short input\n");
    std::exit(2);
  }
}

template <typename T>
void write(std::ofstream& out, const T* data, size_t count) {
  out.write(reinterpret_cast<const char*>(data), static_cast<std::streamsize>(sizeof(T) * count));
}

}  // namespace emu

#define __syncthreads() ::emu::g_block->bar.arrive_and_wait(__LINE__)
#define __ballot_sync(mask, pred) ::emu::ballot((mask), (pred), __LINE__)
#define __shfl_sync(mask, value, src) ::emu::shfl((mask), (value), (src), __LINE__)
#define __shfl_down_sync(mask, value, delta) ::emu::shfl_down((mask), (value), (delta), __LINE__)
#define __shfl_xor_sync(mask, value, lane_mask) ::emu::shfl_xor((mask), (value), (lane_mask), __LINE__)
#define __syncthreads_or(pred) ::emu::syncthreads_or((pred), __LINE__)

inline float __uint_as_float(unsigned u) { return __builtin_bit_cast(float, u); }
inline unsigned __float_as_uint(float f) { return __builtin_bit_cast(unsigned, f); }

inline int __clz(int x) { return x == 0 ? 32 : __builtin_clz(static_cast<unsigned>(x)); }
inline int __ffs(int x) { return __builtin_ffs(x); }
inline int __popc(unsigned x) { return __builtin_popcount(x); }

inline int atomicMin(int* address, int value) {
  std::atomic_ref<int> r(*address);
  int old = r.load();
  while (value < old && !r.compare_exchange_weak(old, value)) {
  }
  return old;
}
inline int atomicAdd(int* address, int value) { return std::atomic_ref<int>(*address).fetch_add(value); }
