// Flash attention on a CPU, forward and backward, as XLA FFI custom calls
// (kit.attention.cpu_kernels loads and registers them; kit.attention.passes calls them).
//
// Inputs (float32, row-major): q [E, T, N, H], k and v [E, S, K, H], q_len and kv_len int32
// [E] (query t of example e is live for t < q_len[e], key s for s < kv_len[e]); causal:
// query t sees keys s <= t. Query head n reads key/value head n / (N / K). The forward
// gives out [E, T, N, H] and lse [E, K, T G] (row t G + g of key/value head kh is query
// head kh G + g at position t: the chunked kernel's layout), the log-sum-exp of each row's
// scaled logits; a row with no live key gets out = 0 and lse = mask_value. The backward
// takes lse, delta (the rows' sum_h dO O, same layout) and d_out, and gives dq, dk, dv.
//
// Both passes are blocked as FlashAttention-2 is (Dao, 2023), laid out for a CPU's
// vectors: all products run through one register-tiled micro-kernel (6 rows x 16 columns
// of accumulators, a broadcast operand and a vector operand). Once per call the inputs are
// copied head-major ([K, S, H] keys and values, [N, T, H] queries and output cotangents in
// the backward; in [T, N, H] a head's rows are N H floats apart and fall into a few sets of
// the L1 cache); the products read those rows in place, so that only one small transpose
// is packed per task.
//
// Forward: a task is (example, query head, block of kBlockQ queries). It packs its
// queries transposed, Q^T [H, kBlockQ], once, and for each block of kBlockK keys
// computes the logits transposed, S^T = K Q^T [keys, queries] (K's rows read in place), so that
// the softmax statistics of a query run down a column with the queries across a vector
// (no horizontal sums), and then O = alpha O + P V, with P^T as the broadcast operand and
// V read from a copy in panels of 16 columns ([H / 16, S, 16] per head), so that each
// step of the product reads the next 64 bytes.
//
// Backward: a task is (example, query head, range of key blocks). Per key block it packs
// K^T and V^T [H, kBlockKb] once, then for each block of queries: S = Q K^T and dP = dO
// V^T (Q, dO read in place), P = exp(scale S - lse), dS = scale P (dP - delta), then
// dV += P^T dO, dK += dS^T Q and dQ += dS K. dK and dV stay in the task's scratch until
// the key block is done, then are written (G = 1) or added under the key/value head's
// lock (the G query heads of a group); dQ is added straight into the task's own rows of
// dq, or, where a head is split over several tasks to keep the threads busy, into a
// buffer per extra task that is summed in at the end.
//
// Tasks run on XLA's intra-op thread pool, the calling thread taking tasks too.

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <memory>
#include <mutex>
#include <thread>
#include <vector>

#include "xla/ffi/api/ffi.h"
#include "vec.h"

namespace ffi = xla::ffi;

namespace {

constexpr int kRows = 6;    // rows of the micro-kernel's tile
constexpr int kCols = 16;   // its columns: two vectors
// Queries per forward task (a multiple of kCols: they run across the vectors of S^T) and
// keys per step of it: 48 keys keep a step's S^T [48, 64] and its values in the L1 cache
// (at 128, 32 KiB each, the P V product ran below the logits' rate).
constexpr int64_t kBlockQ = 64;
constexpr int64_t kBlockK = 48;
// The backward's queries per step and keys per block (a multiple of kCols).
constexpr int64_t kBlockQb = 64;
constexpr int64_t kBlockKb = 64;

KIT_INLINE f8 load(const float* p) { return *(const f8u*)p; }
KIT_INLINE void store(float* p, f8 x) { *(f8u*)p = x; }
KIT_INLINE f8 vmax(f8 a, f8 b) { return a > b ? a : b; }

// The micro-kernel: C[r, 0:16] (row stride ldc) = [C[r, :] * scale[r]] + sum_p A(r, p)
// B[p, 0:16], for r < M, with A(r, p) = a[r a_rs + p a_cs] (broadcast) and B[p, :] = b[p
// b_rs : p b_rs + 16]. kLoad: add to C (scaled by row_scale where given), else overwrite.
template <int M, bool kLoad>
KIT_INLINE void tile(int64_t depth, const float* a, int64_t a_rs, int64_t a_cs, const float* b,
                     int64_t b_rs, float* c, int64_t ldc, const float* row_scale) {
  f8 c0[M], c1[M];
  for (int r = 0; r < M; ++r) {
    if (kLoad) {
      c0[r] = load(c + r * ldc);
      c1[r] = load(c + r * ldc + kLanes);
      if (row_scale != nullptr) {
        c0[r] *= row_scale[r];
        c1[r] *= row_scale[r];
      }
    } else {
      c0[r] = f8{};
      c1[r] = f8{};
    }
  }
  for (int64_t p = 0; p < depth; ++p) {
    const f8 b0 = load(b), b1 = load(b + kLanes);
    for (int r = 0; r < M; ++r) {
      const float x = a[r * a_rs];  // scalar * vector: one broadcast
      c0[r] += x * b0;
      c1[r] += x * b1;
    }
    a += a_cs;
    b += b_rs;
  }
  for (int r = 0; r < M; ++r) {
    store(c + r * ldc, c0[r]);
    store(c + r * ldc + kLanes, c1[r]);
  }
}

// C[rows, cols] as `tile` computes it, over tiles of 6 rows (the last one shorter) and
// 16 columns; cols is a multiple of 16. B's columns c0 .. c0 + 15 start at b + c0 (b_strip
// 16: rows of B contiguous) or at b + (c0 / 16) b_strip (B in panels of 16 columns).
template <bool kLoad>
KIT_INLINE void product(int64_t rows, int64_t cols, int64_t depth, const float* a, int64_t a_rs,
                        int64_t a_cs, const float* b, int64_t b_rs, float* c, int64_t ldc,
                        const float* row_scale = nullptr, int64_t b_strip = kCols) {
  for (int64_t c0 = 0; c0 < cols; c0 += kCols) {
    const float* bs = b + (c0 / kCols) * b_strip - c0;  // bs + c0: B's columns c0 .. c0 + 15
    int64_t r0 = 0;
    for (; r0 + kRows <= rows; r0 += kRows) {
      tile<kRows, kLoad>(depth, a + r0 * a_rs, a_rs, a_cs, bs + c0, b_rs, c + r0 * ldc + c0, ldc,
                         row_scale == nullptr ? nullptr : row_scale + r0);
    }
    const float* ar = a + r0 * a_rs;
    float* cr = c + r0 * ldc + c0;
    const float* sr = row_scale == nullptr ? nullptr : row_scale + r0;
    switch (rows - r0) {
      case 1: tile<1, kLoad>(depth, ar, a_rs, a_cs, bs + c0, b_rs, cr, ldc, sr); break;
      case 2: tile<2, kLoad>(depth, ar, a_rs, a_cs, bs + c0, b_rs, cr, ldc, sr); break;
      case 3: tile<3, kLoad>(depth, ar, a_rs, a_cs, bs + c0, b_rs, cr, ldc, sr); break;
      case 4: tile<4, kLoad>(depth, ar, a_rs, a_cs, bs + c0, b_rs, cr, ldc, sr); break;
      case 5: tile<5, kLoad>(depth, ar, a_rs, a_cs, bs + c0, b_rs, cr, ldc, sr); break;
      default: break;
    }
  }
}

struct Shape {
  int64_t E, T, S, N, K, H, G;
  float scale, mask_value;
  bool causal;
};

// The online softmax of one key block, column by column of S^T [L, kBlockQ] (a column is
// a query): the new column max m, the rescale alpha of the old sums and the sums l, and
// the weights P^T = exp(S^T - m) in place of the logits.
KIT_INLINE void column_softmax(float* sT, int64_t L, float* m, float* l, float* alpha) {
  const float inf = std::numeric_limits<float>::infinity();
  // Column statistics: the new max, the rescale of the old sums, the weights P^T. Row by
  // row with every vector of queries at once, so that the exponentials (a chain of
  // dependent operations each) of several vectors are in flight together.
  constexpr int kVecs = kBlockQ / kLanes;
  f8 base[kVecs];
  {
    f8 mx[kVecs];
    for (int c = 0; c < kVecs; ++c) mx[c] = load(m + c * kLanes);
    for (int64_t j = 0; j < L; ++j)
      for (int c = 0; c < kVecs; ++c) mx[c] = vmax(mx[c], load(sT + j * kBlockQ + c * kLanes));
    for (int c = 0; c < kVecs; ++c) {
      base[c] = mx[c] == -inf ? f8{} : mx[c];  // a column with no live key yet
      const f8 a = exp_nonpositive(load(m + c * kLanes) - base[c]);
      store(alpha + c * kLanes, a);
      store(l + c * kLanes, load(l + c * kLanes) * a);
      store(m + c * kLanes, mx[c]);
    }
  }
  constexpr int kHalf = kVecs / 2 > 0 ? kVecs / 2 : 1;
  for (int c0 = 0; c0 < kVecs; c0 += kHalf) {
    f8 sum[kHalf];
    for (int c = 0; c < kHalf; ++c) sum[c] = f8{};
    for (int64_t j = 0; j < L; ++j) {
      float* row = sT + j * kBlockQ + c0 * kLanes;
      for (int c = 0; c < kHalf; ++c) {
        const f8 e = exp_nonpositive(load(row + c * kLanes) - base[c0 + c]);
        store(row + c * kLanes, e);
        sum[c] += e;
      }
    }
    for (int c = 0; c < kHalf; ++c) store(l + (c0 + c) * kLanes, load(l + (c0 + c) * kLanes) + sum[c]);
  }
}

// Per-thread scratch of the forward.
struct ForwardScratch {
  std::vector<float> qT, sT, o, m, l, alpha;
  explicit ForwardScratch(int64_t H)
      : qT(H * kBlockQ), sT(kBlockK * kBlockQ), o(kBlockQ * H), m(kBlockQ), l(kBlockQ),
        alpha(kBlockQ) {}
};

// One forward task: q and out at the example's start ([T, N, H]), k at its key/value
// head's keys [S, H] (a head-major copy, `head_major`), v at its values in panels
// [H / 16, S, 16] (`value_panels`), lse at the example's [K, T G];
// query head n, queries [i0, i0 + kBlockQ) cut to T.
KIT_CLONES void forward_task(const Shape& d, const float* q, const float* k, const float* v,
                             int64_t q_live, int64_t kv_live, int64_t n, int64_t i0, float* out,
                             float* lse, ForwardScratch& s) {
  const int64_t H = d.H, N = d.N, G = d.G, kh = n / G, g = n % G;
  const int64_t rows = std::min(kBlockQ, d.T - i0);        // rows this task writes
  const int64_t live = std::clamp<int64_t>(q_live - i0, 0, rows);  // rows with live queries
  int64_t kv_end = kv_live;
  if (d.causal) kv_end = std::min(kv_end, i0 + live);
  if (live == 0) kv_end = 0;
  const float inf = std::numeric_limits<float>::infinity();
  // Q^T [H, kBlockQ], scaled; columns past the live rows zero.
  float* qT = s.qT.data();
  std::fill_n(qT, H * kBlockQ, 0.0f);
  for (int64_t i = 0; i < live; ++i) {
    const float* src = q + ((i0 + i) * N + n) * H;
    for (int64_t h = 0; h < H; ++h) qT[h * kBlockQ + i] = src[h] * d.scale;
  }
  float *sT = s.sT.data(), *o = s.o.data(), *m = s.m.data(), *l = s.l.data();
  float* alpha = s.alpha.data();
  std::fill_n(m, kBlockQ, -inf);
  std::fill_n(l, kBlockQ, 0.0f);
  std::fill_n(o, kBlockQ * H, 0.0f);
  i8 lane;
  for (int i = 0; i < kLanes; ++i) lane[i] = i;
  for (int64_t j0 = 0; j0 < kv_end; j0 += kBlockK) {
    const int64_t L = std::min(kBlockK, kv_end - j0);
    const float* kb = k + j0 * H;
    // S^T [L, kBlockQ] = K Q^T
    product<false>(L, kBlockQ, H, kb, H, 1, qT, kBlockQ, sT, kBlockQ);
    // The causal mask where the block reaches past its first query: key j0 + j is dead for
    // query i0 + i < j0 + j.
    if (d.causal && j0 + L - 1 > i0) {
      for (int64_t j = 0; j < L; ++j) {
        const int64_t first_live = j0 + j - i0;  // lanes i >= first_live see key j
        if (first_live <= 0) continue;
        float* row = sT + j * kBlockQ;
        for (int64_t i = 0; i < kBlockQ; i += kLanes) {
          const i8 idx = lane + static_cast<int32_t>(i);
          const f8 x = load(row + i);
          store(row + i, idx < static_cast<int32_t>(first_live) ? f8{} - inf : x);
        }
      }
    }
    column_softmax(sT, L, m, l, alpha);
    // O = alpha O + P V, rows of O the live queries
    product<true>(live, H, L, sT, 1, kBlockQ, v + j0 * kCols, kCols, o, H, alpha, d.S * kCols);
  }
  for (int64_t i = 0; i < rows; ++i) {
    const int64_t t = i0 + i;
    float* dst = out + (t * N + n) * H;
    float* z = lse + kh * d.T * G + t * G + g;
    if (i >= live || l[i] == 0.0f) {
      std::fill_n(dst, H, 0.0f);
      *z = d.mask_value;
      continue;
    }
    const float inv = 1.0f / l[i];
    for (int64_t h = 0; h < H; ++h) dst[h] = o[i * H + h] * inv;
    *z = m[i] + std::log(l[i]);
  }
}

// Per-thread scratch of the backward.
struct BackwardScratch {
  std::vector<float> kT, vT, p, ds, dk, dv;
  explicit BackwardScratch(int64_t H)
      : kT(H * kBlockKb), vT(H * kBlockKb), p(kBlockQb * kBlockKb), ds(kBlockQb * kBlockKb),
        dk(kBlockKb * H), dv(kBlockKb * H) {}
};

// One backward task: key blocks [jb0, jb1) of one example and query head n. q and dout
// are the example's head-major copies [N, T, H], k and v its [K, S, H] (`head_major`); lse
// and delta at the example's [K, T G]; dk and dv at the example's [S, K, H]. dq is where
// this task adds its dq ([T, N, H], the example's or a buffer's). With G = 1 a task owns
// its rows of dk and dv and writes them; with G > 1 the G query heads of a key/value head
// add theirs, holding `lock` (dk and dv start at zero).
KIT_CLONES void backward_task(const Shape& d, const float* q, const float* k, const float* v,
                              const float* lse, const float* delta, const float* dout,
                              int64_t q_live, int64_t kv_live, int64_t n, int64_t jb0,
                              int64_t jb1, float* dq, float* dk, float* dv, std::mutex& lock,
                              BackwardScratch& s) {
  const int64_t H = d.H, N = d.N, K = d.K, G = d.G, T = d.T, kh = n / G, g = n % G;
  const int64_t kv_stride = K * H, q_stride = N * H;
  float *kT = s.kT.data(), *vT = s.vT.data(), *p = s.p.data(), *ds = s.ds.data();
  float *dkb = s.dk.data(), *dvb = s.dv.data();
  i8 lane;
  for (int i = 0; i < kLanes; ++i) lane[i] = i;
  for (int64_t jb = jb0; jb < jb1; ++jb) {
    const int64_t j0 = jb * kBlockKb;
    const int64_t keys = std::min(kBlockKb, d.S - j0);            // rows this block writes
    const int64_t L = std::clamp<int64_t>(kv_live - j0, 0, keys);  // live keys
    std::fill_n(dkb, kBlockKb * H, 0.0f);
    std::fill_n(dvb, kBlockKb * H, 0.0f);
    if (L > 0) {
      std::fill_n(kT, H * kBlockKb, 0.0f);
      std::fill_n(vT, H * kBlockKb, 0.0f);
      for (int64_t j = 0; j < L; ++j) {
        const float* ks = k + (kh * d.S + j0 + j) * H;
        const float* vs = v + (kh * d.S + j0 + j) * H;
        for (int64_t h = 0; h < H; ++h) {
          kT[h * kBlockKb + j] = ks[h];
          vT[h * kBlockKb + j] = vs[h];
        }
      }
      const float* kb = k + (kh * d.S + j0) * H;
      {
        const int64_t first = d.causal ? j0 : 0;
        for (int64_t i0 = first; i0 < q_live; i0 += kBlockQb) {
          const int64_t Lq = std::min(kBlockQb, q_live - i0);
          const float* qb = q + (n * T + i0) * H;
          const float* db = dout + (n * T + i0) * H;
          // S = Q K^T and dP = dO V^T, [Lq, kBlockKb]
          product<false>(Lq, kBlockKb, H, qb, H, 1, kT, kBlockKb, p, kBlockKb);
          product<false>(Lq, kBlockKb, H, db, H, 1, vT, kBlockKb, ds, kBlockKb);
          // P = exp(scale S - lse), dS = scale P (dP - delta); dead pairs 0
          const bool diagonal = d.causal && j0 + L - 1 > i0;
          for (int64_t i = 0; i < Lq; ++i) {
            const int64_t t = i0 + i;
            const int64_t row = kh * T * G + t * G + g;
            const float z = lse[row], dl = delta[row];
            float* pr = p + i * kBlockKb;
            float* dr = ds + i * kBlockKb;
            if (z == d.mask_value) {  // a row with no live key
              std::fill_n(pr, kBlockKb, 0.0f);
              std::fill_n(dr, kBlockKb, 0.0f);
              continue;
            }
            // keys j < live_keys are live for this row
            int64_t live_keys = L;
            if (diagonal) live_keys = std::min<int64_t>(L, t - j0 + 1);
            for (int64_t j = 0; j < kBlockKb; j += kLanes) {
              const i8 idx = lane + static_cast<int32_t>(j);
              const f8 x = load(pr + j) * d.scale - z;
              f8 e = exp_nonpositive(x);
              e = idx < static_cast<int32_t>(live_keys) ? e : f8{};
              store(pr + j, e);
              store(dr + j, e * (load(dr + j) - dl) * d.scale);
            }
          }
          // dV += P^T dO, dK += dS^T Q: rows the live keys, depth the queries
          product<true>(L, H, Lq, p, 1, kBlockKb, db, H, dvb, H);
          product<true>(L, H, Lq, ds, 1, kBlockKb, qb, H, dkb, H);
          // dQ += dS K
          product<true>(Lq, H, L, ds, kBlockKb, 1, kb, H, dq + (i0 * N + n) * H, q_stride);
        }
      }
    }
    if (G == 1) {
      for (int64_t j = 0; j < keys; ++j) {
        std::copy_n(dkb + j * H, H, dk + (j0 + j) * kv_stride + kh * H);
        std::copy_n(dvb + j * H, H, dv + (j0 + j) * kv_stride + kh * H);
      }
    } else if (L > 0) {
      std::lock_guard<std::mutex> hold(lock);
      for (int64_t j = 0; j < L; ++j) {
        float* dks = dk + (j0 + j) * kv_stride + kh * H;
        float* dvs = dv + (j0 + j) * kv_stride + kh * H;
        for (int64_t h = 0; h < H; h += kLanes) {
          store(dks + h, load(dks + h) + load(dkb + j * H + h));
          store(dvs + h, load(dvs + h) + load(dvb + j * H + h));
        }
      }
    }
  }
}

// Buffers for the head-major copies, kept between calls: a fresh allocation of several MiB
// is zero-filled page by page on first touch (thousands of page faults a call), a kept one
// is not. Up to kKeptBuffers of at most kKeptBytes in all are kept (the smallest dropped
// first); calls running at once each take their own.
constexpr size_t kKeptBuffers = 8;
constexpr int64_t kKeptBytes = int64_t{256} << 20;

class Buffer {
 public:
  explicit Buffer(int64_t size) {
    std::lock_guard<std::mutex> lock(mutex());
    auto& kept = free_list();
    // the smallest kept buffer that is large enough, else a new one
    auto best = kept.end();
    for (auto it = kept.begin(); it != kept.end(); ++it)
      if (it->second >= size && (best == kept.end() || it->second < best->second)) best = it;
    if (best != kept.end()) {
      data_ = std::move(best->first);
      size_ = best->second;
      kept.erase(best);
    } else {
      data_.reset(new float[size]);  // not zeroed
      size_ = size;
    }
  }
  ~Buffer() {
    std::lock_guard<std::mutex> lock(mutex());
    auto& kept = free_list();
    kept.emplace_back(std::move(data_), size_);
    auto bytes = [&kept] {
      int64_t total = 0;
      for (auto& b : kept) total += b.second * int64_t{sizeof(float)};
      return total;
    };
    while (!kept.empty() && (kept.size() > kKeptBuffers || bytes() > kKeptBytes)) {
      auto smallest = std::min_element(kept.begin(), kept.end(),
                                       [](auto& a, auto& b) { return a.second < b.second; });
      kept.erase(smallest);
    }
  }
  Buffer(const Buffer&) = delete;
  Buffer& operator=(const Buffer&) = delete;
  float* data() const { return data_.get(); }

 private:
  using Kept = std::vector<std::pair<std::unique_ptr<float[]>, int64_t>>;
  static std::mutex& mutex() {
    static std::mutex m;
    return m;
  }
  static Kept& free_list() {
    static Kept* kept = new Kept();  // never destroyed: no order problems at exit
    return *kept;
  }
  std::unique_ptr<float[]> data_;
  int64_t size_ = 0;
};

// x [E, L, Hn, H] -> [E, Hn, L, H] in `out`, one task per (example, head): the kernels read
// each head's rows contiguous. (Read in place, rows N H floats apart, 2 KiB at N H = 512,
// fall into a few sets of the L1 cache and push each other out; copied once per call
// rather than once per block that reads them.)
void head_major(ffi::ThreadPool& pool, const float* x, int64_t E, int64_t L, int64_t Hn,
                int64_t H, float* out) {
  run_parallel<NoScratch>(pool, E * Hn, H, [&](int64_t t, NoScratch&) {
    const int64_t e = t / Hn, n = t % Hn;
    for (int64_t i = 0; i < L; ++i)
      std::copy_n(x + ((e * L + i) * Hn + n) * H, H, out + ((e * Hn + n) * L + i) * H);
  });
}

// x [E, L, Hn, H] -> panels [E, Hn, H / 16, L, 16] in `out`: the forward's values, which
// its P V product reads 16 columns at a time.
void value_panels(ffi::ThreadPool& pool, const float* x, int64_t E, int64_t L, int64_t Hn,
                  int64_t H, float* out) {
  run_parallel<NoScratch>(pool, E * Hn, H, [&](int64_t t, NoScratch&) {
    const int64_t e = t / Hn, n = t % Hn;
    float* head = out + (e * Hn + n) * L * H;
    for (int64_t i = 0; i < L; ++i) {
      const float* row = x + ((e * L + i) * Hn + n) * H;
      for (int64_t c = 0; c < H; c += kCols) std::copy_n(row + c, kCols, head + c * L + i * kCols);
    }
  });
}

// Checks the shapes and fills `d`; an empty string when they are right. Leading dims
// before [T, N, H] (the batch, and any that vmap adds with vmap_method="broadcast_all",
// equal in every input) are flattened into E examples.
const char* read_shape(ffi::Span<const int64_t> qd, ffi::Span<const int64_t> kd,
                       ffi::Span<const int64_t> vd, ffi::Span<const int64_t> qld,
                       ffi::Span<const int64_t> kld, Shape& d) {
  const size_t rank = qd.size();
  if (rank < 4 || kd.size() != rank || vd.size() != rank || qld.size() + 3 != rank ||
      kld.size() + 3 != rank)
    return "kit flash: q, k, v need one rank of 4 or more ([..., T, N, H]), the lengths 3 less";
  d.E = 1;
  for (size_t i = 0; i + 3 < rank; ++i) {
    if (kd[i] != qd[i] || vd[i] != qd[i] || qld[i] != qd[i] || kld[i] != qd[i])
      return "kit flash: the leading dims of q, k, v and the lengths differ";
    d.E *= qd[i];
  }
  d.T = qd[rank - 3];
  d.N = qd[rank - 2];
  d.H = qd[rank - 1];
  d.S = kd[rank - 3];
  d.K = kd[rank - 2];
  if (kd[rank - 1] != d.H || vd[rank - 3] != d.S || vd[rank - 2] != d.K || vd[rank - 1] != d.H)
    return "kit flash: q, k and v do not match";
  if (d.H <= 0 || d.H % kCols != 0) return "kit flash: the head dim must be a multiple of 16";
  if (d.K <= 0 || d.N % d.K != 0) return "kit flash: N must be a multiple of K (K > 0)";
  d.G = d.N / d.K;
  return "";
}

ffi::Error Forward(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> k,
                   ffi::Buffer<ffi::F32> v, ffi::Buffer<ffi::S32> q_len,
                   ffi::Buffer<ffi::S32> kv_len, float scale, bool causal, float mask_value,
                   ffi::ResultBuffer<ffi::F32> out, ffi::ResultBuffer<ffi::F32> lse) {
  Shape d;
  const char* err = read_shape(q.dimensions(), k.dimensions(), v.dimensions(),
                               q_len.dimensions(), kv_len.dimensions(), d);
  if (*err) return ffi::Error::InvalidArgument(err);
  d.scale = scale;
  d.causal = causal;
  d.mask_value = mask_value;
  if (d.E == 0 || d.T == 0 || d.N == 0) return ffi::Error::Success();
  const int64_t blocks = (d.T + kBlockQ - 1) / kBlockQ;
  const int64_t count = d.E * d.N * blocks;
  const float* qp = q.typed_data();
  const Buffer kvh_k(d.E * d.S * d.K * d.H), kvh_v(d.E * d.S * d.K * d.H);
  head_major(pool, k.typed_data(), d.E, d.S, d.K, d.H, kvh_k.data());
  value_panels(pool, v.typed_data(), d.E, d.S, d.K, d.H, kvh_v.data());
  const int32_t *ql = q_len.typed_data(), *kl = kv_len.typed_data();
  float *op = out->typed_data(), *zp = lse->typed_data();
  run_parallel<ForwardScratch>(pool, count, d.H, [&](int64_t t, ForwardScratch& s) {
    // The last query blocks first: under a causal mask they have the most keys.
    const int64_t block = blocks - 1 - t % blocks, rest = t / blocks;
    const int64_t n = rest % d.N, e = rest / d.N;
    const int64_t q_live = std::clamp<int64_t>(ql[e], 0, d.T);
    const int64_t kv_live = std::clamp<int64_t>(kl[e], 0, d.S);
    const int64_t head = (e * d.K + n / d.G) * d.S * d.H;
    forward_task(d, qp + e * d.T * d.N * d.H, kvh_k.data() + head, kvh_v.data() + head, q_live,
                 kv_live, n, block * kBlockQ,
                 op + e * d.T * d.N * d.H, zp + e * d.K * d.T * d.G, s);
  });
  return ffi::Error::Success();
}

ffi::Error Backward(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> k,
                    ffi::Buffer<ffi::F32> v, ffi::Buffer<ffi::S32> q_len,
                    ffi::Buffer<ffi::S32> kv_len, ffi::Buffer<ffi::F32> lse,
                    ffi::Buffer<ffi::F32> delta, ffi::Buffer<ffi::F32> d_out, float scale,
                    bool causal, float mask_value, ffi::ResultBuffer<ffi::F32> dq,
                    ffi::ResultBuffer<ffi::F32> dk, ffi::ResultBuffer<ffi::F32> dv) {
  Shape d;
  const char* err = read_shape(q.dimensions(), k.dimensions(), v.dimensions(),
                               q_len.dimensions(), kv_len.dimensions(), d);
  if (*err) return ffi::Error::InvalidArgument(err);
  d.scale = scale;
  d.causal = causal;
  d.mask_value = mask_value;
  const int64_t rows = d.E * d.K * d.T * d.G;
  if (static_cast<int64_t>(lse.element_count()) != rows ||
      static_cast<int64_t>(delta.element_count()) != rows ||
      d_out.element_count() != q.element_count()) {
    return ffi::Error::InvalidArgument("kit flash: lse, delta or d_out do not match q");
  }
  if (d.E == 0 || d.K == 0) return ffi::Error::Success();
  const int64_t q_size = d.T * d.N * d.H, kv_size = d.S * d.K * d.H;
  const int64_t kblocks = (d.S + kBlockKb - 1) / kBlockKb;
  float *dqp = dq->typed_data(), *dkp = dk->typed_data(), *dvp = dv->typed_data();
  if (kblocks == 0) {
    std::fill_n(dqp, d.E * q_size, 0.0f);
    return ffi::Error::Success();
  }
  // Each (example, query head) in `parts` tasks of consecutive key blocks, enough of them
  // to keep the threads busy: part 0 adds into dq, part p > 0 into a buffer of its own.
  const int64_t heads = d.E * d.N;
  const int64_t threads = pool.num_threads() + 1;
  const int64_t parts = std::min(kblocks, std::max<int64_t>(1, (2 * threads + heads - 1) / heads));
  std::vector<float> extra;
  if (parts > 1) extra.assign((parts - 1) * d.E * q_size, 0.0f);
  // Split the key blocks so that each part has about the same work: under a causal mask a
  // key block's work is the number of queries at or after it.
  std::vector<int64_t> bounds(parts + 1, kblocks);
  bounds[0] = 0;
  {
    std::vector<double> work(kblocks);
    double total = 0.0;
    for (int64_t jb = 0; jb < kblocks; ++jb) {
      work[jb] = d.causal ? static_cast<double>(std::max<int64_t>(d.T - jb * kBlockKb, 1)) : 1.0;
      total += work[jb];
    }
    double acc = 0.0;
    int64_t part = 1;
    for (int64_t jb = 0; jb < kblocks && part < parts; ++jb) {
      acc += work[jb];
      if (acc >= total * part / parts) bounds[part++] = jb + 1;
    }
  }
  const Buffer qh(d.E * q_size), doh(d.E * q_size), kvh_k(d.E * kv_size), kvh_v(d.E * kv_size);
  head_major(pool, q.typed_data(), d.E, d.T, d.N, d.H, qh.data());
  head_major(pool, d_out.typed_data(), d.E, d.T, d.N, d.H, doh.data());
  head_major(pool, k.typed_data(), d.E, d.S, d.K, d.H, kvh_k.data());
  head_major(pool, v.typed_data(), d.E, d.S, d.K, d.H, kvh_v.data());
  const float *zp = lse.typed_data(), *dlp = delta.typed_data();
  const int32_t *ql = q_len.typed_data(), *kl = kv_len.typed_data();
  const int64_t G = d.G, H = d.H, N = d.N;
  if (G > 1) {  // the query heads of a key/value head add into dk and dv
    run_parallel<NoScratch>(pool, d.E, H, [&](int64_t e, NoScratch&) {
      std::fill_n(dkp + e * kv_size, kv_size, 0.0f);
      std::fill_n(dvp + e * kv_size, kv_size, 0.0f);
    });
  }
  std::unique_ptr<std::mutex[]> locks(new std::mutex[d.E * d.K]);
  run_parallel<BackwardScratch>(pool, heads * parts, d.H, [&](int64_t t, BackwardScratch& s) {
    const int64_t part = t % parts, n = (t / parts) % N, e = t / parts / N;
    float* dq_e = part == 0 ? dqp + e * q_size : extra.data() + ((part - 1) * d.E + e) * q_size;
    if (part == 0) {  // this task's rows of dq start at zero (the buffers already are)
      for (int64_t r = 0; r < d.T; ++r) std::fill_n(dq_e + (r * N + n) * H, H, 0.0f);
    }
    const int64_t q_live = std::clamp<int64_t>(ql[e], 0, d.T);
    const int64_t kv_live = std::clamp<int64_t>(kl[e], 0, d.S);
    backward_task(d, qh.data() + e * q_size, kvh_k.data() + e * kv_size, kvh_v.data() + e * kv_size,
                  zp + e * d.K * d.T * G, dlp + e * d.K * d.T * G, doh.data() + e * q_size, q_live,
                  kv_live, n, bounds[part], bounds[part + 1], dq_e, dkp + e * kv_size,
                  dvp + e * kv_size, locks[e * d.K + n / G], s);
  });
  for (int64_t part = 1; part < parts; ++part) {
    const float* src = extra.data() + (part - 1) * d.E * q_size;
    for (int64_t i = 0; i < d.E * q_size; ++i) dqp[i] += src[i];
  }
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(KitFlashForwardF32, Forward,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Attr<float>("scale")
                                  .Attr<bool>("causal")
                                  .Attr<float>("mask_value")
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(KitFlashBackwardF32, Backward,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Attr<float>("scale")
                                  .Attr<bool>("causal")
                                  .Attr<float>("mask_value")
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());
