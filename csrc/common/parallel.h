#pragma once
// A tiny parallel-for over independent items (images of a batch): no OpenMP runtime to ship.
#include <algorithm>
#include <cstdint>
#include <exception>
#include <thread>
#include <vector>

namespace pneumoseg {

// Read once: glibc answers hardware_concurrency() by reading a /sys file on every call, about 2.5 us,
// which was a tenth of a small loss step's host time on the CPU.
inline int64_t hardware_threads() {
  static const int64_t threads = std::max<int64_t>(1, std::thread::hardware_concurrency());
  return threads;
}

template <typename F>
void parallel_for(int64_t n, int64_t min_per_thread, F&& body) {
  const int64_t hw = hardware_threads();
  const int64_t threads = std::min<int64_t>(hw, std::max<int64_t>(1, n / std::max<int64_t>(1, min_per_thread)));
  if (threads <= 1) {
    for (int64_t i = 0; i < n; ++i) body(i);
    return;
  }
  std::vector<std::thread> pool;
  std::vector<std::exception_ptr> errors(threads);
  const int64_t chunk = (n + threads - 1) / threads;
  for (int64_t t = 0; t < threads; ++t) {
    pool.emplace_back([&, t] {
      try {
        for (int64_t i = t * chunk; i < std::min(n, (t + 1) * chunk); ++i) body(i);
      } catch (...) {
        errors[t] = std::current_exception();
      }
    });
  }
  for (auto& th : pool) th.join();
  for (auto& e : errors)
    if (e) std::rethrow_exception(e);
}

}  // namespace pneumoseg
