// What both CPU kernels (decode.cc, flash.cc) share: 8-float vectors, how their task
// functions are compiled, the exponential of their softmax, and how their tasks run.

#pragma once

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <memory>
#include <thread>

#include "xla/ffi/api/ffi.h"

namespace {

constexpr int kLanes = 8;  // floats per vector

typedef float f8 __attribute__((vector_size(32)));
typedef float f8u __attribute__((vector_size(32), aligned(4)));  // unaligned loads
typedef int32_t i8 __attribute__((vector_size(32)));

// A task's function is compiled twice, for AVX2 with FMA (x86-64-v3) and for the base
// ISA, and the loader picks one for the CPU. Its helpers are always inlined, so that each
// copy has them compiled for its own ISA: a helper left out of line is compiled for the
// base ISA only (measured 10x slower at T = 8 when GCC declined to inline two of them).
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define KIT_CLONES __attribute__((target_clones("arch=x86-64-v3", "default")))
#else
#define KIT_CLONES
#endif
#define KIT_INLINE inline __attribute__((always_inline))

// exp(x) for x <= 0 (also right for small x > 0): x = n ln2 + r with |r| <= ln2 / 2 (ln2
// split in two parts), exp(r) by its Taylor series to r^7 (truncation under 6e-9
// relative), times 2^n. Against exp in float64 it was within 1.2 ulp at every eighth
// float32 in [-87, 0]. Below -87.3 (where 2^n leaves float32's normal range) it is 0, and
// for -inf; a softmax weight there is < 1e-37.
KIT_INLINE f8 exp_nonpositive(f8 x) {
  const f8 lo = x < -87.3f ? f8{} + 0.0f : f8{} + 1.0f;
  x = x < -87.3f ? f8{} - 87.3f : x;
  const f8 shifter = f8{} + 12582912.0f;  // 1.5 * 2^23: rounds to an integer
  f8 n = (x * 1.44269504088896341f + shifter) - shifter;
  f8 r = x - n * 0.693145751953125f;
  r = r - n * 1.428606765330187045e-06f;
  f8 p = f8{} + 1.0f / 5040.0f;
  p = p * r + 1.0f / 720.0f;
  p = p * r + 1.0f / 120.0f;
  p = p * r + 1.0f / 24.0f;
  p = p * r + 1.0f / 6.0f;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  i8 bits = (__builtin_convertvector(n, i8) + 127) << 23;
  f8 two_n;
  std::memcpy(&two_n, &bits, sizeof two_n);
  return p * two_n * lo;
}

// Runs tasks [0, count) on the pool's threads and the calling thread, and returns when
// all are done. `task(index, thread_scratch)`.
template <typename Scratch, typename Fn>
void run_parallel(xla::ffi::ThreadPool& pool, int64_t count, int64_t H, Fn fn) {
  struct State {
    std::atomic<int64_t> next{0}, done{0};
  };
  auto st = std::make_shared<State>();
  auto body = [st, count, H, fn] {
    Scratch scratch(H);
    for (int64_t t; (t = st->next.fetch_add(1)) < count;) {
      fn(t, scratch);
      st->done.fetch_add(1, std::memory_order_release);
    }
  };
  const int64_t helpers = std::min<int64_t>(pool.num_threads(), count - 1);
  for (int64_t i = 0; i < helpers; ++i) pool.Schedule([body] { body(); });
  body();
  while (st->done.load(std::memory_order_acquire) < count) std::this_thread::yield();
}

struct NoScratch {
  explicit NoScratch(int64_t) {}
};

}  // namespace
