// A decode step on a CPU: a few queries per example against a long key/value cache,
// read once, as an XLA FFI custom call (kit.attention.cpu_kernels loads and registers it).
//
// Inputs (float32, row-major): q [..., T, N, H], k and v [..., S, K, H], lengths int32
// [...] (the live keys of each example: keys at s >= lengths are not attended). Outputs:
// out [..., T, N, H] and lse [..., T, N], the log-sum-exp of each row's scaled logits
// (-inf, and out = 0, for a row with no live key). Query head n reads key/value head
// n / (N / K).
//
// Work is split in tasks of (example, chunk of keys: kChunkBytes of them at most). A task
// reads its keys once: every query row's logits with its keys, the chunk's softmax
// statistics, and the weighted sum of its values. With 8 or more query rows per key/value
// head it goes head by head, the rows across a vector and the accumulators in registers;
// with 4 (GQA with groups of 4 at T = 1) the logits go two positions at a time, eight dot
// products summed across at once, and the weighted values as with 8; with other counts
// below 8 (T = 1 at K = N among them) position by position, each cache row [K, H] read
// whole. Each task leaves a partial result (row max, row sum, accumulator); the partials
// of an example are merged by log-sum-exp at the end. Tasks run on XLA's intra-op thread
// pool with the calling thread taking tasks too, so the call never waits on a thread that
// has not started.
//
// KitReadF32 reads two arrays once and gives the float32 sum of their elements: the time a
// cache takes to read, on the same threads in the same process, that
// experiments/bench_decode.py times beside a decode step.

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <memory>
#include <thread>
#include <vector>

#include "xla/ffi/api/ffi.h"
#include "vec.h"

namespace ffi = xla::ffi;

namespace {

// Bytes of keys per task (and as many of values). 128 KiB to 2 MiB measured alike within
// the machine's noise at K = 8, T = 1; 512 KiB was among the fastest.
constexpr int64_t kChunkBytes = 512 * 1024;
// At most this many bytes of a task's logits and weights ([keys, T N]), which its passes
// read again: they stay in the core's L2 cache.
constexpr int64_t kWeightBytes = 128 * 1024;
// Positions per block of the weighted values with 4 or 8+ rows per head: a block's value
// rows and weights stay in the L1 cache across the passes of each head.
constexpr int64_t kValueBlock = 32;
// Positions ahead that the GQA logits passes (4 or 8+ rows per head) ask the memory for:
// they compute long enough per cache row that the hardware's prefetcher fell behind (a
// decode step at K = 1 took 0.83-0.87x the time with it). With 4 rows the pass asks for
// the values too, which the weighted values then find in the cache.
constexpr int64_t kPrefetch = 32;

KIT_INLINE float hsum(f8 x) {
  float s = 0.0f;
  for (int i = 0; i < kLanes; ++i) s += x[i];
  return s;
}

struct Shape {
  int64_t examples, T, N, K, H, S;
  float scale;
};

// Query rows per key/value head in a task, Rg = T G of them: padded to a multiple of 8
// from 8 on (the rows go across a vector), else Rg.
int64_t padded_rows(int64_t Rg) { return Rg >= kLanes ? (Rg + kLanes - 1) / kLanes * kLanes : Rg; }

// Rows of a task are ordered by key/value head: head kh's rows are j = 0 .. Rg - 1 (Rg =
// T G), query (t, g) at j = t G + g, padded to Rp rows (a multiple of 8 when Rg >= 8,
// else Rg) with zero queries. Logits and weights are kept [L, K Rp], so the softmax
// statistics run down the positions with rows across a vector.

// Logits of head kh's rows for positions [0, L) when Rp is a multiple of 8: with the
// query rows across a vector, each step of h is a broadcast key element times a vector of
// 8 rows, for 8 positions at a time.
KIT_INLINE void logits_rows_across(const float* k, int64_t stride, int64_t L, int64_t H,
                                   const float* qT, int64_t Rp, float* p, int64_t ldp) {
  constexpr int PB = 8;  // positions at a time: 8 independent sums hide the FMA latency
  for (int64_t rv = 0; rv < Rp; rv += kLanes) {
    int64_t s = 0;
    for (; s + PB <= L; s += PB) {
      f8 a[PB] = {};
      const float* k0 = k + s * stride;
      if (rv == 0 && s + kPrefetch + PB <= L)
        for (int i = 0; i < PB; ++i)
          for (int64_t h = 0; h < H; h += 16) __builtin_prefetch(k0 + (kPrefetch + i) * stride + h);
      for (int64_t h = 0; h < H; ++h) {
        const f8 qv = *(const f8u*)(qT + h * Rp + rv);
        for (int i = 0; i < PB; ++i) a[i] += k0[i * stride + h] * qv;
      }
      for (int i = 0; i < PB; ++i) *(f8u*)(p + (s + i) * ldp + rv) = a[i];
    }
    for (; s < L; ++s) {
      const float* k0 = k + s * stride;
      f8 a0 = f8{};
      for (int64_t h = 0; h < H; ++h) a0 += k0[h] * *(const f8u*)(qT + h * Rp + rv);
      *(f8u*)(p + s * ldp + rv) = a0;
    }
  }
}

// Logits of one position's key kk [H] with head kh's Rg rows when there are fewer than 8
// (Rp = Rg): a vector down h per row, summed across at the end.
KIT_INLINE void logits_h_across(const float* kk, int64_t H, const float* qrows, int64_t Rg,
                                float* p) {
  for (int64_t j = 0; j < Rg; ++j) {
    const float* qq = qrows + j * H;
    f8 a = f8{}, b = f8{};
    int64_t h = 0;
    for (; h + 2 * kLanes <= H; h += 2 * kLanes) {
      a += *(const f8u*)(qq + h) * *(const f8u*)(kk + h);
      b += *(const f8u*)(qq + h + kLanes) * *(const f8u*)(kk + h + kLanes);
    }
    for (; h < H; h += kLanes) a += *(const f8u*)(qq + h) * *(const f8u*)(kk + h);
    p[j] = hsum(a + b);
  }
}

// Eight vectors' sums in one vector: lane i is the sum of x[i]'s lanes.
KIT_INLINE f8 sums8(const f8* x) {
  f8 b[4], c[2];
  for (int i = 0; i < 4; ++i)  // x[i]'s and x[i + 4]'s halves added
    b[i] = __builtin_shufflevector(x[i], x[i + 4], 0, 1, 2, 3, 8, 9, 10, 11) +
           __builtin_shufflevector(x[i], x[i + 4], 4, 5, 6, 7, 12, 13, 14, 15);
  for (int i = 0; i < 2; ++i)
    c[i] = __builtin_shufflevector(b[2 * i], b[2 * i + 1], 0, 1, 8, 9, 4, 5, 12, 13) +
           __builtin_shufflevector(b[2 * i], b[2 * i + 1], 2, 3, 10, 11, 6, 7, 14, 15);
  return __builtin_shufflevector(c[0], c[1], 0, 2, 8, 10, 4, 6, 12, 14) +
         __builtin_shufflevector(c[0], c[1], 1, 3, 9, 11, 5, 7, 13, 15);
}

// Logits of 4 query rows (qrows [4, H]) with two positions' keys k and k + stride: h
// along a vector, the eight dot products summed across at once. Writes p[i * ldp + j].
KIT_INLINE void logits_four_rows(const float* k, int64_t stride, int64_t H, const float* qrows,
                                 float* p, int64_t ldp) {
  f8 a[8];
  for (int i = 0; i < 8; ++i) a[i] = f8{};
  for (int64_t h = 0; h < H; h += kLanes) {
    const f8 k0 = *(const f8u*)(k + h), k1 = *(const f8u*)(k + stride + h);
    for (int j = 0; j < 4; ++j) {
      const f8 qv = *(const f8u*)(qrows + j * H + h);
      a[j] += k0 * qv;
      a[4 + j] += k1 * qv;
    }
  }
  const f8 x = sums8(a);
  for (int i = 0; i < 2; ++i)
    for (int j = 0; j < 4; ++j) p[i * ldp + j] = x[4 * i + j];
}

// acc[j, :] += sum_s p[s, j] v[s, :] for RB rows from j0, HB vectors of h from h0, with
// the accumulators in registers across the positions.
template <int RB, int HB>
KIT_INLINE void weighted_values(const float* v, int64_t stride, int64_t L, const float* p,
                                int64_t ldp, int64_t j0, int64_t h0, float* acc, int64_t H) {
  f8 a[RB][HB];
  for (int r = 0; r < RB; ++r)
    for (int c = 0; c < HB; ++c) a[r][c] = *(const f8u*)(acc + (j0 + r) * H + h0 + c * kLanes);
  for (int64_t s = 0; s < L; ++s) {
    f8 vv[HB];
    for (int c = 0; c < HB; ++c) vv[c] = *(const f8u*)(v + s * stride + h0 + c * kLanes);
    for (int r = 0; r < RB; ++r) {
      const float w = p[s * ldp + j0 + r];
      for (int c = 0; c < HB; ++c) a[r][c] += w * vv[c];
    }
  }
  for (int r = 0; r < RB; ++r)
    for (int c = 0; c < HB; ++c) *(f8u*)(acc + (j0 + r) * H + h0 + c * kLanes) = a[r][c];
}

// One task: keys [s0, s1) of one example (q [T, N, H], k and v [S, K, H]; s1 <= its
// length). Writes the partial row max m, row sum l and accumulator acc [K Rp, H], rows in
// the order above.
KIT_CLONES void chunk_task(const Shape& d, const float* q, const float* k, const float* v,
                           int64_t s0, int64_t s1, float* m, float* l, float* acc,
                           float* qrows, float* qT, float* p) {
  const int64_t T = d.T, N = d.N, K = d.K, H = d.H, G = N / K, Rg = T * G;
  const int64_t Rp = padded_rows(Rg), R = K * Rp, L = s1 - s0, stride = K * H;
  // Scaled queries, per head: rows [Rp, H] and transposed [H, Rp] (padded rows zero).
  std::fill_n(qrows, R * H, 0.0f);
  std::fill_n(qT, R * H, 0.0f);
  for (int64_t kh = 0; kh < K; ++kh)
    for (int64_t t = 0; t < T; ++t)
      for (int64_t g = 0; g < G; ++g) {
        const int64_t j = t * G + g;
        const float* src = q + (t * N + kh * G + g) * H;
        for (int64_t h = 0; h < H; ++h) {
          const float x = src[h] * d.scale;
          qrows[(kh * Rp + j) * H + h] = x;
          qT[kh * Rp * H + h * Rp + j] = x;
        }
      }
  // p [L, R]: the logits, then the weights.
  const float* kc = k + s0 * stride;
  const float* vc = v + s0 * stride;
  if (Rp % kLanes == 0) {
    for (int64_t kh = 0; kh < K; ++kh)
      logits_rows_across(kc + kh * H, stride, L, H, qT + kh * Rp * H, Rp, p + kh * Rp, R);
  } else {  // few rows per head: each cache row read whole
    int64_t s = 0;
    if (Rg == 4)  // two positions at a time
      for (; s + 2 <= L; s += 2) {
        if (s + kPrefetch + 2 <= L)
          for (int64_t i = kPrefetch; i < kPrefetch + 2; ++i)
            for (int64_t h = 0; h < stride; h += 16) {
              __builtin_prefetch(kc + (s + i) * stride + h);
              __builtin_prefetch(vc + (s + i) * stride + h);
            }
        for (int64_t kh = 0; kh < K; ++kh)
          logits_four_rows(kc + s * stride + kh * H, stride, H, qrows + kh * Rp * H,
                           p + s * R + kh * Rp, R);
      }
    for (; s < L; ++s)  // other counts, and 4 rows' odd last position: one at a time
      for (int64_t kh = 0; kh < K; ++kh)
        logits_h_across(kc + s * stride + kh * H, H, qrows + kh * Rp * H, Rg, p + s * R + kh * Rp);
  }
  // Row max, then weights and row sums, with the rows across a vector: per vector of rows,
  // four positions at a time with the running max and sums in registers, so that the
  // positions' steps do not wait on each other.
  const int64_t Rv = R - R % kLanes;
  const float inf = std::numeric_limits<float>::infinity();
  for (int64_t r = 0; r < Rv; r += kLanes) {
    f8 mx[4];
    for (int u = 0; u < 4; ++u) mx[u] = f8{} - inf;
    int64_t s = 0;
    for (; s + 4 <= L; s += 4)
      for (int u = 0; u < 4; ++u) {
        const f8 x = *(const f8u*)(p + (s + u) * R + r);
        mx[u] = x > mx[u] ? x : mx[u];
      }
    for (; s < L; ++s) {
      const f8 x = *(const f8u*)(p + s * R + r);
      mx[0] = x > mx[0] ? x : mx[0];
    }
    const f8 a = mx[0] > mx[1] ? mx[0] : mx[1], b = mx[2] > mx[3] ? mx[2] : mx[3];
    const f8 top = a > b ? a : b;
    *(f8u*)(m + r) = top;
    f8 sum[4] = {};
    for (s = 0; s + 4 <= L; s += 4)
      for (int u = 0; u < 4; ++u) {
        float* x = p + (s + u) * R + r;
        const f8 e = exp_nonpositive(*(const f8u*)x - top);
        *(f8u*)x = e;
        sum[u] += e;
      }
    for (; s < L; ++s) {
      float* x = p + s * R + r;
      const f8 e = exp_nonpositive(*(const f8u*)x - top);
      *(f8u*)x = e;
      sum[0] += e;
    }
    *(f8u*)(l + r) = (sum[0] + sum[1]) + (sum[2] + sum[3]);
  }
  for (int64_t r = Rv; r < R; ++r) {  // rows past the last whole vector
    float top = -inf;
    for (int64_t s = 0; s < L; ++s) top = p[s * R + r] > top ? p[s * R + r] : top;
    m[r] = top;
    float sum = 0.0f;
    for (int64_t s = 0; s < L; ++s) {
      const float e = exp_nonpositive(f8{} + (p[s * R + r] - top))[0];
      p[s * R + r] = e;
      sum += e;
    }
    l[r] = sum;
  }
  // Weighted values: head by head with the accumulators in registers where a head has
  // 4 rows or 8 or more, else position by position, each cache row read whole.
  std::fill_n(acc, R * H, 0.0f);
  if (Rp % kLanes != 0 && Rg != 4) {
    for (int64_t s = 0; s < L; ++s) {
      for (int64_t kh = 0; kh < K; ++kh) {
        const float* vv = vc + s * stride + kh * H;
        for (int64_t j = 0; j < Rg; ++j) {
          const float w = p[s * R + kh * Rp + j];
          float* a = acc + (kh * Rp + j) * H;
          for (int64_t h = 0; h < H; h += kLanes) *(f8u*)(a + h) += w * *(const f8u*)(vv + h);
        }
      }
    }
    return;
  }
  // Positions in blocks of kValueBlock, so that a block's value rows and weights stay in
  // the L1 cache across the head's passes (row blocks x h blocks).
  for (int64_t b0 = 0; b0 < L; b0 += kValueBlock) {
    const int64_t Lb = std::min(kValueBlock, L - b0);
    // The next block's value rows, all heads, asked for ahead (with 4 rows, the logits
    // pass did).
    if (Rp % kLanes == 0 && b0 + 2 * kValueBlock <= L)
      for (int64_t i = 0; i < kValueBlock; ++i)
        for (int64_t h = 0; h < K * H; h += 16)
          __builtin_prefetch(vc + (b0 + kValueBlock + i) * stride + h);
    for (int64_t kh = 0; kh < K; ++kh) {
      const float* vh = vc + b0 * stride + kh * H;
      const float* ph = p + b0 * R + kh * Rp;
      float* ah = acc + kh * Rp * H;
      int64_t j = 0;
      for (; j + 4 <= Rg; j += 4) {
        int64_t h = 0;
        for (; h + 2 * kLanes <= H; h += 2 * kLanes)
          weighted_values<4, 2>(vh, stride, Lb, ph, R, j, h, ah, H);
        for (; h < H; h += kLanes) weighted_values<4, 1>(vh, stride, Lb, ph, R, j, h, ah, H);
      }
      for (; j < Rg; ++j) {
        int64_t h = 0;
        for (; h + 2 * kLanes <= H; h += 2 * kLanes)
          weighted_values<1, 2>(vh, stride, Lb, ph, R, j, h, ah, H);
        for (; h < H; h += kLanes) weighted_values<1, 1>(vh, stride, Lb, ph, R, j, h, ah, H);
      }
    }
  }
}

struct Work {
  Shape d;
  // Per example: where its q, k, v start, and its live keys.
  std::vector<const float*> q, k, v;
  std::vector<int64_t> live;
  int64_t chunk, chunks, tasks, R;
  std::vector<float> m, l, acc;  // per task
  std::atomic<int64_t> next{0}, done{0};

  // Each thread that takes tasks: its scratch, allocated once a call.
  void run_tasks() {
    std::vector<float> qrows(R * d.H), qT(R * d.H), p(chunk * R);
    for (int64_t t; (t = next.fetch_add(1)) < tasks;) {
      const int64_t e = t / chunks, s0 = (t % chunks) * chunk;
      const int64_t s1 = std::min(s0 + chunk, live[e]);
      if (s1 > s0) {
        chunk_task(d, q[e], k[e], v[e], s0, s1, &m[t * R], &l[t * R], &acc[t * R * d.H],
                   qrows.data(), qT.data(), p.data());
      } else {
        std::fill_n(&m[t * R], R, -std::numeric_limits<float>::infinity());
        std::fill_n(&l[t * R], R, 0.0f);
      }
      done.fetch_add(1, std::memory_order_release);
    }
  }
};

// The leading (batch) dims of q, k, v and lengths, each 1 or the full size (vmap with
// vmap_method="expand_dims" leaves an unbatched input's dim at 1): the offset of each
// example's block in one input, in blocks.
bool broadcast_offsets(const std::vector<int64_t>& full, ffi::Span<const int64_t> dims,
                       std::vector<int64_t>& offsets) {
  const size_t lead = full.size();
  std::vector<int64_t> stride(lead, 0);
  int64_t st = 1;
  for (size_t i = lead; i-- > 0;) {
    if (dims[i] != 1 && dims[i] != full[i]) return false;
    stride[i] = dims[i] == 1 ? 0 : st;
    st *= dims[i];
  }
  int64_t examples = 1;
  for (int64_t f : full) examples *= f;
  offsets.assign(examples, 0);
  for (int64_t e = 0; e < examples; ++e) {
    int64_t rest = e, off = 0;
    for (size_t i = lead; i-- > 0;) {
      off += (rest % full[i]) * stride[i];
      rest /= full[i];
    }
    offsets[e] = off;
  }
  return true;
}

ffi::Error Decode(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> k,
                  ffi::Buffer<ffi::F32> v, ffi::Buffer<ffi::S32> lengths, float scale,
                  ffi::ResultBuffer<ffi::F32> out, ffi::ResultBuffer<ffi::F32> lse) {
  auto qd = q.dimensions(), kd = k.dimensions(), vd = v.dimensions(), ld = lengths.dimensions();
  const size_t rank = qd.size();
  if (rank < 3 || kd.size() != rank || vd.size() != rank || ld.size() + 3 != rank) {
    return ffi::Error::InvalidArgument(
        "kit decode: q, k, v need one rank (at least 3), lengths that rank less 3");
  }
  Shape d;
  d.T = qd[rank - 3];
  d.N = qd[rank - 2];
  d.H = qd[rank - 1];
  d.S = kd[rank - 3];
  d.K = kd[rank - 2];
  d.scale = scale;
  if (kd[rank - 1] != d.H || vd[rank - 3] != d.S || vd[rank - 2] != d.K ||
      vd[rank - 1] != d.H || d.H <= 0 || d.H % kLanes != 0 || d.K <= 0 || d.N % d.K != 0) {
    return ffi::Error::InvalidArgument("kit decode: q, k, v shapes do not match");
  }
  if (d.T == 0 || d.N == 0) return ffi::Error::Success();  // no query rows: empty outputs
  const size_t lead = rank - 3;
  std::vector<int64_t> full(lead);
  for (size_t i = 0; i < lead; ++i) full[i] = std::max({qd[i], kd[i], vd[i], ld[i]});
  std::vector<int64_t> qo, ko, vo, lo;
  if (!broadcast_offsets(full, qd, qo) || !broadcast_offsets(full, kd, ko) ||
      !broadcast_offsets(full, vd, vo) || !broadcast_offsets(full, ld, lo)) {
    return ffi::Error::InvalidArgument("kit decode: batch dims do not broadcast");
  }
  d.examples = static_cast<int64_t>(qo.size());
  if (static_cast<int64_t>(out->element_count()) != d.examples * d.T * d.N * d.H) {
    return ffi::Error::InvalidArgument("kit decode: out has the wrong size");
  }
  auto w = std::make_shared<Work>();
  w->d = d;
  for (int64_t e = 0; e < d.examples; ++e) {
    w->q.push_back(q.typed_data() + qo[e] * d.T * d.N * d.H);
    w->k.push_back(k.typed_data() + ko[e] * d.S * d.K * d.H);
    w->v.push_back(v.typed_data() + vo[e] * d.S * d.K * d.H);
    w->live.push_back(std::clamp<int64_t>(lengths.typed_data()[lo[e]], 0, d.S));
  }
  w->R = d.K * padded_rows(d.T * (d.N / d.K));
  const int64_t per_key = int64_t{sizeof(float)};
  w->chunk = std::max<int64_t>(
      16, std::min(kChunkBytes / (d.K * d.H * per_key), kWeightBytes / (w->R * per_key)));
  w->chunks = (d.S + w->chunk - 1) / w->chunk;
  w->tasks = d.examples * w->chunks;
  w->m.resize(w->tasks * w->R);
  w->l.resize(w->tasks * w->R);
  w->acc.resize(w->tasks * w->R * d.H);
  const int64_t helpers = std::min<int64_t>(pool.num_threads(), w->tasks - 1);
  for (int64_t i = 0; i < helpers; ++i) pool.Schedule([w] { w->run_tasks(); });
  w->run_tasks();
  while (w->done.load(std::memory_order_acquire) < w->tasks) std::this_thread::yield();

  float* o = out->typed_data();
  float* z = lse->typed_data();
  const int64_t R = w->R, H = d.H, C = w->chunks, G = d.N / d.K, Rp = R / d.K;
  const float inf = std::numeric_limits<float>::infinity();
  for (int64_t b = 0; b < d.examples; ++b) {
    for (int64_t t = 0; t < d.T; ++t) {
      for (int64_t n = 0; n < d.N; ++n) {
        const int64_t r = (n / G) * Rp + t * G + n % G;  // the row in a task's partials
        float* orow = o + ((b * d.T + t) * d.N + n) * H;
        float* zrow = z + (b * d.T + t) * d.N + n;
        float mx = -inf;
        for (int64_t c = 0; c < C; ++c) mx = std::max(mx, w->m[(b * C + c) * R + r]);
        std::fill_n(orow, H, 0.0f);
        if (mx == -inf) {
          *zrow = -inf;
          continue;
        }
        float total = 0.0f;
        for (int64_t c = 0; c < C; ++c) {
          const int64_t task = b * C + c;
          if (w->l[task * R + r] == 0.0f) continue;
          const float wt = std::exp(w->m[task * R + r] - mx);
          total += wt * w->l[task * R + r];
          const float* a = &w->acc[(task * R + r) * H];
          for (int64_t h = 0; h < H; ++h) orow[h] += wt * a[h];
        }
        for (int64_t h = 0; h < H; ++h) orow[h] /= total;
        *zrow = mx + std::log(total);
      }
    }
  }
  return ffi::Error::Success();
}

// The read reference: floats per task (1 MiB), and one task's sum, four vector sums in
// flight so that the adds keep up with the memory.
constexpr int64_t kReadBlock = 1 << 18;

KIT_CLONES float block_sum(const float* x, int64_t n) {
  f8 a0 = f8{}, a1 = f8{}, a2 = f8{}, a3 = f8{};
  int64_t i = 0;
  for (; i + 4 * kLanes <= n; i += 4 * kLanes) {
    a0 += *(const f8u*)(x + i);
    a1 += *(const f8u*)(x + i + kLanes);
    a2 += *(const f8u*)(x + i + 2 * kLanes);
    a3 += *(const f8u*)(x + i + 3 * kLanes);
  }
  float s = hsum((a0 + a1) + (a2 + a3));
  for (; i < n; ++i) s += x[i];
  return s;
}

ffi::Error Read(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> a, ffi::Buffer<ffi::F32> b,
                ffi::ResultBuffer<ffi::F32> out) {
  const float* data[2] = {a.typed_data(), b.typed_data()};
  const int64_t size[2] = {static_cast<int64_t>(a.element_count()),
                           static_cast<int64_t>(b.element_count())};
  const int64_t a_blocks = (size[0] + kReadBlock - 1) / kReadBlock;
  const int64_t tasks = a_blocks + (size[1] + kReadBlock - 1) / kReadBlock;
  std::vector<float> sums(tasks, 0.0f);
  run_parallel<NoScratch>(pool, tasks, 0, [&](int64_t t, NoScratch&) {
    const int w = t < a_blocks ? 0 : 1;
    const int64_t s0 = (t - (w ? a_blocks : 0)) * kReadBlock;
    sums[t] = block_sum(data[w] + s0, std::min(kReadBlock, size[w] - s0));
  });
  float total = 0.0f;
  for (const float s : sums) total += s;
  out->typed_data()[0] = total;
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(KitDecodeF32, Decode,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Attr<float>("scale")
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(KitReadF32, Read,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());
