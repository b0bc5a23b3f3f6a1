// Fused T5 attention for XLA:CPU, computed in float32: `ptuning/model/cpu_attention.py` compiles
// this file with the host's compiler (-march=native) and registers its handlers as XLA FFI
// targets.
//
//   forward   q [B, Q, H, D], k, v [B, K, H, D], bias [Bb, Hb, Qb, K]  ->  out [B, Q, H, D]
//   backward  q, k, v, bias, dout [B, Q, H, D]                         ->  dq, dk, dv (, dS)
//
// q, k, v are float32 or bfloat16 (converted to float32 as the kernel reads them); everything
// else is float32. The backward with scores also writes dS [B, H, Q, K] (a differentiated bias).
// out = softmax(q k^T + bias) v per (batch, head), logits unscaled (T5); bias broadcasts over its
// size-1 dimensions (Bb in {1, B}, Hb in {1, H}, Qb in {1, Q}). The backward recomputes the
// probabilities. Each (batch, head) pair is one work item for XLA's intra-op thread pool; inside
// it, blocks of kQueryBlock query rows go through small register-blocked products whose operands
// stay in the core's caches, so no [B, H, Q, K] tensor is ever written to memory; softmax's
// division by the row sums scales [m, D] rows (outputs, output gradients), not the [m, K] tile.
#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <thread>
#include <type_traits>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

// Micro-tile C[kRows, kVectors * kLanes] in registers, with kVectors B vectors and one broadcast:
// 24 + 4 + 1 of AVX-512's 32 registers, 12 + 2 + 1 of AVX2's 16 (AVX2 had 4 rows, 8
// accumulators, too few to cover the FMAs' latency: on a 2-core AMD EPYC the 6-row tile takes
// the small model's encoder attention from 22.2 to 17.8 ms forward, 75 to 57 ms with gradients).
constexpr int kRows = 6;
#if defined(__AVX512F__)
constexpr int kLanes = 16;  // floats per vector register
constexpr int kVectors = 4;
#else
constexpr int kLanes = 8;
constexpr int kVectors = 2;
#endif
constexpr int kQueryBlock = 96;  // query rows per block: a [96, K] probability tile per thread

typedef float Vec __attribute__((vector_size(kLanes * 4), aligned(4)));  // unaligned access
typedef int32_t IVec __attribute__((vector_size(kLanes * 4)));
typedef uint32_t UVec __attribute__((vector_size(kLanes * 4)));

inline Vec load(const float* p) { return *reinterpret_cast<const Vec*>(p); }
inline void store(float* p, Vec v) { *reinterpret_cast<Vec*>(p) = v; }
inline Vec splat(float x) { return x - Vec{}; }  // x in every lane

// C[R, V * kLanes] (+)= sum_k a(r, k) B[k, :], a(r, k) = A[r * ars + k * acs], B rows ldb apart.
template <int R, int V>
inline void MicroTile(int64_t depth, const float* A, int64_t ars, int64_t acs, const float* B,
                      int64_t ldb, float* C, int64_t ldc, bool accumulate) {
  Vec acc[R][V];
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < V; ++v) acc[r][v] = accumulate ? load(C + r * ldc + v * kLanes) : Vec{};
  for (int64_t k = 0; k < depth; ++k) {
    Vec b[V];
    for (int v = 0; v < V; ++v) b[v] = load(B + k * ldb + v * kLanes);
    for (int r = 0; r < R; ++r) {
      const Vec a = splat(A[r * ars + k * acs]);
      for (int v = 0; v < V; ++v) acc[r][v] += a * b[v];
    }
  }
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < V; ++v) store(C + r * ldc + v * kLanes, acc[r][v]);
}

template <int R>
inline void MicroRow(int v, int64_t depth, const float* A, int64_t ars, int64_t acs,
                     const float* B, int64_t ldb, float* C, int64_t ldc, bool accumulate) {
  static_assert(kVectors == 4 || kVectors == 2);
  switch (v) {
    case 1: return MicroTile<R, 1>(depth, A, ars, acs, B, ldb, C, ldc, accumulate);
    case 2: return MicroTile<R, 2>(depth, A, ars, acs, B, ldb, C, ldc, accumulate);
#if defined(__AVX512F__)
    case 3: return MicroTile<R, 3>(depth, A, ars, acs, B, ldb, C, ldc, accumulate);
    case 4: return MicroTile<R, 4>(depth, A, ars, acs, B, ldb, C, ldc, accumulate);
#endif
  }
}

// C[M, N] (+)= A[M, depth] B[depth, N] with a(m, k) = A[m * ars + k * acs]; N % kLanes == 0.
void Gemm(int64_t M, int64_t N, int64_t depth, const float* A, int64_t ars, int64_t acs,
          const float* B, int64_t ldb, float* C, int64_t ldc, bool accumulate) {
  for (int64_t n0 = 0; n0 < N; n0 += kVectors * kLanes) {
    const int v = static_cast<int>(std::min<int64_t>(kVectors, (N - n0) / kLanes));
    for (int64_t m0 = 0; m0 < M; m0 += kRows) {
      const float* a = A + m0 * ars;
      float* c = C + m0 * ldc + n0;
      switch (std::min<int64_t>(kRows, M - m0)) {
        case 1: MicroRow<1>(v, depth, a, ars, acs, B + n0, ldb, c, ldc, accumulate); break;
        case 2: MicroRow<2>(v, depth, a, ars, acs, B + n0, ldb, c, ldc, accumulate); break;
        case 3: MicroRow<3>(v, depth, a, ars, acs, B + n0, ldb, c, ldc, accumulate); break;
        case 4: MicroRow<4>(v, depth, a, ars, acs, B + n0, ldb, c, ldc, accumulate); break;
        case 5: MicroRow<5>(v, depth, a, ars, acs, B + n0, ldb, c, ldc, accumulate); break;
        case 6: MicroRow<6>(v, depth, a, ars, acs, B + n0, ldb, c, ldc, accumulate); break;
      }
    }
  }
}

// exp(x) for one vector of x <= 0 (scores minus their row maximum): 2^n * p(r), n = round(x /
// ln 2), |r| <= ln 2 / 2, degree-6 polynomial (relative error about 2e-7); 0 below -87.3 (where
// float32 exp underflows), as masks need.
inline Vec Exp(Vec x) {
  const Vec clamped = x < splat(-87.3f) ? splat(-87.3f) : x;
  const Vec magic = splat(12582912.0f);  // 1.5 * 2^23: adding it rounds to an integer
  const Vec n = (clamped * splat(1.44269504088896341f) + magic) - magic;
  const Vec r = clamped - n * splat(0.693359375f) + n * splat(2.12194440e-4f);
  Vec p = splat(1.3981999507e-3f);
  p = p * r + splat(8.3334519073e-3f);
  p = p * r + splat(4.1665795894e-2f);
  p = p * r + splat(1.6666665459e-1f);
  p = p * r + splat(5.0000001201e-1f);
  p = p * r * r + r + splat(1.0f);
  const IVec bits = (__builtin_convertvector(n, IVec) + 127) << 23;
  Vec scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  const Vec y = p * scale;
  return x < splat(-87.3f) ? Vec{} : y;
}

struct Shape {
  int64_t batch, queries, keys, heads, depth;       // B, Q, K, H, D
  int64_t bias_batch, bias_head, bias_query;        // strides in the bias (0 where broadcast)
  int64_t padded_keys;                              // K rounded up to kLanes
  int64_t row() const { return heads * depth; }     // distance between rows of q, k, v
  // Where (batch b, head h) starts in q / dout, in k / v, and in the bias.
  int64_t query_offset(int64_t b, int64_t h) const { return b * queries * row() + h * depth; }
  int64_t key_offset(int64_t b, int64_t h) const { return b * keys * row() + h * depth; }
  int64_t bias_offset(int64_t b, int64_t h) const { return b * bias_batch + h * bias_head; }
};

struct Scratch {  // per thread, grown as needed, reused across calls
  std::vector<float> keys_t, values_t, probs, grads, rows, key_rows, value_rows, query_rows,
      dout_rows, out_rows, dk_rows, dv_rows;
  float inv_sums[kQueryBlock];
  void Reserve(const Shape& s) {
    const size_t kt = s.depth * s.padded_keys, tile = kQueryBlock * s.padded_keys;
    if (keys_t.size() < kt) keys_t.assign(kt, 0.f), values_t.assign(kt, 0.f);
    if (probs.size() < tile) probs.assign(tile, 0.f), grads.assign(tile, 0.f);
    if (rows.size() < static_cast<size_t>(kQueryBlock * s.depth))
      rows.assign(kQueryBlock * s.depth, 0.f);
  }
};
thread_local Scratch scratch;

using BFloat16 = uint16_t;  // the upper half of a float32's bits
typedef BFloat16 HalfVec __attribute__((vector_size(kLanes * 2), aligned(2)));

// n rows of an operand (rows `stride` apart, `depth` wide) as float32: float32 operands as they
// are, bfloat16 ones converted into `buffer` ([n, depth], rows `depth` apart).
struct Rows {
  const float* data;
  int64_t stride;
};
template <typename T>
Rows AsFloatRows(const T* src, int64_t stride, int64_t n, int64_t depth,
                 std::vector<float>& buffer) {
  if constexpr (std::is_same_v<T, float>) {
    return {src, stride};
  } else {
    static_assert(std::is_same_v<T, BFloat16>);
    if (buffer.size() < static_cast<size_t>(n * depth)) buffer.assign(n * depth, 0.f);
    for (int64_t i = 0; i < n; ++i)
      for (int64_t d = 0; d < depth; d += kLanes) {
        const HalfVec half = *reinterpret_cast<const HalfVec*>(src + i * stride + d);
        const IVec bits = __builtin_convertvector(half, IVec) << 16;
        std::memcpy(buffer.data() + i * depth + d, &bits, sizeof(bits));
      }
    return {buffer.data(), depth};
  }
}

// n result rows of an output (rows `stride` apart, `depth` wide), written as float32 at `data`
// (rows `ld` apart): float32 outputs in place, bfloat16 ones in `buffer` until `Flush`.
template <typename T>
struct OutRows {
  T* dst;
  int64_t stride;
  float* data;
  int64_t ld;
};
template <typename T>
OutRows<T> MakeOutRows(T* dst, int64_t stride, int64_t n, int64_t depth,
                       std::vector<float>& buffer) {
  if constexpr (std::is_same_v<T, float>) {
    return {dst, stride, dst, stride};
  } else {
    if (buffer.size() < static_cast<size_t>(n * depth)) buffer.assign(n * depth, 0.f);
    return {dst, stride, buffer.data(), depth};
  }
}

// Finishes n rows of `o`: each times row_scale[i] (if given), bfloat16 outputs rounded to the
// nearest even bfloat16 (NaN stays NaN).
template <typename T>
void Flush(const OutRows<T>& o, int64_t n, int64_t depth, const float* row_scale) {
  if (std::is_same_v<T, float> && row_scale == nullptr) return;  // written in place already
  for (int64_t i = 0; i < n; ++i)
    for (int64_t d = 0; d < depth; d += kLanes) {
      Vec x = load(o.data + i * o.ld + d);
      if (row_scale != nullptr) x *= splat(row_scale[i]);
      if constexpr (std::is_same_v<T, float>) {
        store(o.dst + i * o.stride + d, x);  // scaled (unscaled float32 returned above)
      } else {
        UVec bits;  // unsigned: the rounding carry wraps (NaNs, replaced below) instead of UB
        std::memcpy(&bits, &x, sizeof(bits));
        UVec rounded = (bits + 0x7FFFu + ((bits >> 16) & 1u)) >> 16;
        rounded = x != x ? UVec{} + 0x7FC0u : rounded;
        *reinterpret_cast<HalfVec*>(o.dst + i * o.stride + d) =
            __builtin_convertvector(rounded, HalfVec);
      }
    }
}

// One butterfly stage of a kLanes x kLanes transpose held in `r` (row i = r[i]): in every 2h x 2h
// block, the upper right and lower left h x h blocks swap. Stages h = kLanes / 2, ..., 1 transpose.
template <int h>
inline void SwapBlocks(Vec* r) {
  IVec upper, lower;
  for (int k = 0; k < kLanes; ++k) {
    upper[k] = (k & h) ? kLanes + k - h : k;
    lower[k] = (k & h) ? kLanes + k : k + h;
  }
  for (int i = 0; i < kLanes; ++i) {
    if (i & h) continue;
    const Vec a = r[i], b = r[i + h];
    r[i] = __builtin_shuffle(a, b, upper);
    r[i + h] = __builtin_shuffle(a, b, lower);
  }
}

// dst[D, padded_keys] = src[K, D] transposed (src rows `stride` apart), padding columns zero:
// kLanes x kLanes tiles transposed in registers.
void Transpose(const Shape& s, Rows src, float* dst) {
  for (int64_t j0 = 0; j0 < s.padded_keys; j0 += kLanes) {
    const int64_t n = std::min<int64_t>(kLanes, s.keys - j0);
    for (int64_t d0 = 0; d0 < s.depth; d0 += kLanes) {
      Vec r[kLanes];
      for (int j = 0; j < kLanes; ++j)
        r[j] = j < n ? load(src.data + (j0 + j) * src.stride + d0) : Vec{};
      if constexpr (kLanes == 16) SwapBlocks<8>(r);
      SwapBlocks<4>(r);
      SwapBlocks<2>(r);
      SwapBlocks<1>(r);
      for (int d = 0; d < kLanes; ++d) store(dst + (d0 + d) * s.padded_keys + j0, r[d]);
    }
  }
}

// probs[m, K] = exp(q_blk k^T + bias - row maximum) for one (batch, head) and its m query rows
// from q0 on, keys_t from Transpose, and inv_sums[m] = 1 / row sums: softmax = probs[i, :] *
// inv_sums[i], a scaling the callers fold into an [m, D] operand or result instead of a pass over
// the [m, K] tile.
void Probabilities(const Shape& s, Rows q_blk, const float* keys_t, const float* bias,
                   int64_t q0, int64_t m, float* probs, float* inv_sums) {
  Gemm(m, s.padded_keys, s.depth, q_blk.data, q_blk.stride, 1, keys_t, s.padded_keys, probs,
       s.padded_keys, false);
  const int64_t full = s.keys / kLanes * kLanes;
  for (int64_t i = 0; i < m; ++i) {
    float* p = probs + i * s.padded_keys;
    const float* b = bias + (q0 + i) * s.bias_query;
    Vec top_v = splat(-INFINITY);
    for (int64_t j = 0; j < full; j += kLanes) {
      const Vec x = load(p + j) + load(b + j);
      store(p + j, x);
      top_v = x > top_v ? x : top_v;
    }
    float top = -INFINITY;
    for (int l = 0; l < kLanes; ++l) top = std::max(top, top_v[l]);
    for (int64_t j = full; j < s.keys; ++j) top = std::max(top, p[j] += b[j]);
    Vec sum_v{};
    for (int64_t j = 0; j < full; j += kLanes) {
      const Vec e = Exp(load(p + j) - splat(top));
      store(p + j, e);
      sum_v += e;
    }
    float sum = 0.f;
    for (int l = 0; l < kLanes; ++l) sum += sum_v[l];
    if (full < s.keys) {  // the tail, through the padded row (columns >= K are ignored)
      const Vec e = Exp(load(p + full) - splat(top));
      for (int64_t j = full; j < s.keys; ++j) sum += (p[j] = e[j - full]);
    }
    inv_sums[i] = 1.f / sum;
    for (int64_t j = s.keys; j < s.padded_keys; ++j) p[j] = 0.f;
  }
}

// T: the element type of q, k and v (float or BFloat16); everything else is float32.
template <typename T>
void Forward(const Shape& s, int64_t b, int64_t h, const T* q, const T* k, const T* v,
             const float* bias, T* out) {
  scratch.Reserve(s);
  const int64_t offset = s.query_offset(b, h), kv_offset = s.key_offset(b, h);
  const float* bias_bh = bias + s.bias_offset(b, h);
  const Rows keys = AsFloatRows(k + kv_offset, s.row(), s.keys, s.depth, scratch.key_rows);
  const Rows values = AsFloatRows(v + kv_offset, s.row(), s.keys, s.depth, scratch.value_rows);
  Transpose(s, keys, scratch.keys_t.data());
  for (int64_t q0 = 0; q0 < s.queries; q0 += kQueryBlock) {
    const int64_t m = std::min<int64_t>(kQueryBlock, s.queries - q0);
    const Rows q_blk = AsFloatRows(q + offset + q0 * s.row(), s.row(), m, s.depth,
                                   scratch.query_rows);
    Probabilities(s, q_blk, scratch.keys_t.data(), bias_bh, q0, m, scratch.probs.data(),
                  scratch.inv_sums);
    const OutRows<T> out_blk = MakeOutRows(out + offset + q0 * s.row(), s.row(), m, s.depth,
                                           scratch.out_rows);
    Gemm(m, s.depth, s.keys, scratch.probs.data(), s.padded_keys, 1, values.data, values.stride,
         out_blk.data, out_blk.ld, false);
    Flush(out_blk, m, s.depth, scratch.inv_sums);  // softmax's 1 / row sums, on the [m, D] result
  }
}

// dscores (optional, [B, H, Q, K]): the score gradient dS, which is the bias gradient before
// the sum over the bias's broadcast dimensions. T as in Forward.
template <typename T>
void Backward(const Shape& s, int64_t b, int64_t h, const T* q, const T* k, const T* v,
              const float* bias, const T* dout, T* dq, T* dk, T* dv, float* dscores) {
  scratch.Reserve(s);
  const int64_t offset = s.query_offset(b, h), kv_offset = s.key_offset(b, h);
  const float* bias_bh = bias + s.bias_offset(b, h);
  float* probs = scratch.probs.data();
  float* grads = scratch.grads.data();
  const Rows keys = AsFloatRows(k + kv_offset, s.row(), s.keys, s.depth, scratch.key_rows);
  Transpose(s, keys, scratch.keys_t.data());
  Transpose(s, AsFloatRows(v + kv_offset, s.row(), s.keys, s.depth, scratch.value_rows),
            scratch.values_t.data());
  float* scaled_dout = scratch.rows.data();  // [m, D]: dout rows times 1 / row sums
  const float* inv_sums = scratch.inv_sums;
  const OutRows<T> dk_rows = MakeOutRows(dk + kv_offset, s.row(), s.keys, s.depth,
                                          scratch.dk_rows);
  const OutRows<T> dv_rows = MakeOutRows(dv + kv_offset, s.row(), s.keys, s.depth,
                                          scratch.dv_rows);
  if (s.queries == 0)  // no query block writes dk, dv
    for (int64_t j = 0; j < s.keys; ++j) {
      std::memset(dk_rows.data + j * dk_rows.ld, 0, s.depth * sizeof(float));
      std::memset(dv_rows.data + j * dv_rows.ld, 0, s.depth * sizeof(float));
    }
  for (int64_t q0 = 0; q0 < s.queries; q0 += kQueryBlock) {
    const int64_t m = std::min<int64_t>(kQueryBlock, s.queries - q0);
    const Rows q_blk = AsFloatRows(q + offset + q0 * s.row(), s.row(), m, s.depth,
                                   scratch.query_rows);
    const Rows dout_blk = AsFloatRows(dout + offset + q0 * s.row(), s.row(), m, s.depth,
                                      scratch.dout_rows);
    Probabilities(s, q_blk, scratch.keys_t.data(), bias_bh, q0, m, probs, scratch.inv_sums);
    // dP = dout v^T; with P = E / sums (E = probs here): dS = P * (dP - rowsum(P * dP)).
    Gemm(m, s.padded_keys, s.depth, dout_blk.data, dout_blk.stride, 1, scratch.values_t.data(),
         s.padded_keys,
         grads, s.padded_keys, false);
    for (int64_t i = 0; i < m; ++i) {
      float* g = grads + i * s.padded_keys;
      const float* e = probs + i * s.padded_keys;
      Vec dot_v{};
      for (int64_t j = 0; j < s.padded_keys; j += kLanes) dot_v += load(e + j) * load(g + j);
      float dot = 0.f;
      for (int l = 0; l < kLanes; ++l) dot += dot_v[l];
      const Vec inv = splat(inv_sums[i]), shift = splat(dot * inv_sums[i]);
      for (int64_t j = 0; j < s.padded_keys; j += kLanes)
        store(g + j, load(e + j) * inv * (load(g + j) - shift));
      for (int64_t d = 0; d < s.depth; d += kLanes)
        store(scaled_dout + i * s.depth + d, load(dout_blk.data + i * dout_blk.stride + d) * inv);
      if (dscores != nullptr)
        std::memcpy(dscores + ((b * s.heads + h) * s.queries + q0 + i) * s.keys, g,
                    s.keys * sizeof(float));
    }
    const OutRows<T> dq_blk = MakeOutRows(dq + offset + q0 * s.row(), s.row(), m, s.depth,
                                          scratch.out_rows);
    Gemm(m, s.depth, s.keys, grads, s.padded_keys, 1, keys.data, keys.stride, dq_blk.data,
         dq_blk.ld, false);
    Flush(dq_blk, m, s.depth, nullptr);
    // dk (+)= dS^T q, dv (+)= E^T (dout / sums): the tiles read transposed (a(j, i) = tile[i, j]);
    // the first block writes, later ones accumulate.
    Gemm(s.keys, s.depth, m, grads, 1, s.padded_keys, q_blk.data, q_blk.stride, dk_rows.data,
         dk_rows.ld, q0 > 0);
    Gemm(s.keys, s.depth, m, probs, 1, s.padded_keys, scaled_dout, s.depth, dv_rows.data,
         dv_rows.ld, q0 > 0);
  }
  Flush(dk_rows, s.keys, s.depth, nullptr);
  Flush(dv_rows, s.keys, s.depth, nullptr);
}

// Runs body(i) for i in [0, n) on the caller and XLA's intra-op pool. Pool tasks that start after
// the work is taken return without touching `body`; the caller waits only for items in progress.
template <typename Body>
void ParallelFor(ffi::ThreadPool& pool, int64_t n, const Body& body) {
  struct State {
    std::atomic<int64_t> next{0}, done{0};
  };
  auto state = std::make_shared<State>();
  auto work = [state, n, &body] {
    for (int64_t i; (i = state->next.fetch_add(1)) < n;) {
      body(i);
      state->done.fetch_add(1);
    }
  };
  const int64_t helpers = std::min<int64_t>(pool.num_threads(), n) - 1;
  for (int64_t t = 0; t < helpers; ++t) pool.Schedule(decltype(work)(work));
  work();
  while (state->done.load() < n) std::this_thread::yield();
}

// q, k, v: AnyBuffer (float32 or bfloat16, all three alike); bias: Buffer<F32>.
template <typename Bias>
ffi::Error MakeShape(const ffi::AnyBuffer& q, const ffi::AnyBuffer& k, const ffi::AnyBuffer& v,
                     const Bias& bias, Shape* s) {
  const auto qd = q.dimensions(), kd = k.dimensions(), vd = v.dimensions(),
             bd = bias.dimensions();
  if (qd.size() != 4 || kd.size() != 4 || vd.size() != 4 || bd.size() != 4)
    return ffi::Error::InvalidArgument("attention: q, k, v and bias must have rank 4");
  if ((q.element_type() != ffi::DataType::F32 && q.element_type() != ffi::DataType::BF16) ||
      k.element_type() != q.element_type() || v.element_type() != q.element_type())
    return ffi::Error::InvalidArgument("attention: q, k, v must be all float32 or all bfloat16");
  s->batch = qd[0], s->queries = qd[1], s->heads = qd[2], s->depth = qd[3], s->keys = kd[1];
  if (kd[0] != s->batch || kd[2] != s->heads || kd[3] != s->depth ||
      !std::equal(kd.begin(), kd.end(), vd.begin()))
    return ffi::Error::InvalidArgument("attention: k and v must be [B, K, H, D] matching q");
  if (s->depth % kLanes != 0)
    return ffi::Error::InvalidArgument("attention: head depth must be a multiple of the lanes");
  if ((bd[0] != 1 && bd[0] != s->batch) || (bd[1] != 1 && bd[1] != s->heads) ||
      (bd[2] != 1 && bd[2] != s->queries) || bd[3] != s->keys)
    return ffi::Error::InvalidArgument("attention: bias must broadcast to [B, H, Q, K]");
  s->bias_query = bd[2] == 1 ? 0 : s->keys;
  s->bias_head = bd[1] == 1 ? 0 : bd[2] * s->keys;
  s->bias_batch = bd[0] == 1 ? 0 : bd[1] * bd[2] * s->keys;
  s->padded_keys = (s->keys + kLanes - 1) / kLanes * kLanes;
  return ffi::Error::Success();
}

// body(T{}, b, h) for every (batch b, head h) pair, one work item each on the pool; T = float or
// BFloat16, q's element type (which MakeShape accepted).
template <typename Body>
void ForEachPair(ffi::ThreadPool& pool, const Shape& s, const ffi::AnyBuffer& q, const Body& body) {
  const auto run = [&](auto tag) {
    ParallelFor(pool, s.batch * s.heads, [&](int64_t i) { body(tag, i / s.heads, i % s.heads); });
  };
  if (q.element_type() == ffi::DataType::BF16)
    run(BFloat16{});
  else
    run(float{});
}

template <typename T>
T* Data(const ffi::AnyBuffer& buffer) {
  return static_cast<T*>(buffer.untyped_data());
}

ffi::Error AttentionForward(ffi::ThreadPool pool, ffi::AnyBuffer q, ffi::AnyBuffer k,
                            ffi::AnyBuffer v, ffi::Buffer<ffi::F32> bias,
                            ffi::Result<ffi::AnyBuffer> out) {
  Shape s;
  if (auto error = MakeShape(q, k, v, bias, &s); error.failure()) return error;
  if (out->element_type() != q.element_type())
    return ffi::Error::InvalidArgument("attention: the output must have q's dtype");
  ForEachPair(pool, s, q, [&](auto tag, int64_t b, int64_t h) {
    using T = decltype(tag);
    Forward(s, b, h, Data<const T>(q), Data<const T>(k), Data<const T>(v), bias.typed_data(),
            Data<T>(*out));
  });
  return ffi::Error::Success();
}

// dq, dk, dv in q's dtype; dscores (float32 [B, H, Q, K]) optional.
ffi::Error RunBackward(ffi::ThreadPool& pool, ffi::AnyBuffer& q, ffi::AnyBuffer& k,
                       ffi::AnyBuffer& v, ffi::Buffer<ffi::F32>& bias, ffi::AnyBuffer& dout,
                       ffi::Result<ffi::AnyBuffer>& dq, ffi::Result<ffi::AnyBuffer>& dk,
                       ffi::Result<ffi::AnyBuffer>& dv, float* dscores) {
  Shape s;
  if (auto error = MakeShape(q, k, v, bias, &s); error.failure()) return error;
  for (const ffi::AnyBuffer* x : {&dout, &*dq, &*dk, &*dv})
    if (x->element_type() != q.element_type())
      return ffi::Error::InvalidArgument("attention: dout, dq, dk, dv must have q's dtype");
  ForEachPair(pool, s, q, [&](auto tag, int64_t b, int64_t h) {
    using T = decltype(tag);
    Backward(s, b, h, Data<const T>(q), Data<const T>(k), Data<const T>(v), bias.typed_data(),
             Data<const T>(dout), Data<T>(*dq), Data<T>(*dk), Data<T>(*dv), dscores);
  });
  return ffi::Error::Success();
}

ffi::Error AttentionBackward(ffi::ThreadPool pool, ffi::AnyBuffer q, ffi::AnyBuffer k,
                             ffi::AnyBuffer v, ffi::Buffer<ffi::F32> bias, ffi::AnyBuffer dout,
                             ffi::Result<ffi::AnyBuffer> dq, ffi::Result<ffi::AnyBuffer> dk,
                             ffi::Result<ffi::AnyBuffer> dv) {
  return RunBackward(pool, q, k, v, bias, dout, dq, dk, dv, nullptr);
}

// The backward that also returns dS [B, H, Q, K] (for a differentiated bias).
ffi::Error AttentionBackwardWithScores(ffi::ThreadPool pool, ffi::AnyBuffer q, ffi::AnyBuffer k,
                                       ffi::AnyBuffer v, ffi::Buffer<ffi::F32> bias,
                                       ffi::AnyBuffer dout, ffi::Result<ffi::AnyBuffer> dq,
                                       ffi::Result<ffi::AnyBuffer> dk,
                                       ffi::Result<ffi::AnyBuffer> dv,
                                       ffi::ResultBuffer<ffi::F32> dscores) {
  const auto qd = q.dimensions(), kd = k.dimensions(), sd = dscores->dimensions();
  if (qd.size() != 4 || kd.size() != 4 || sd.size() != 4 || sd[0] != qd[0] || sd[1] != qd[2] ||
      sd[2] != qd[1] || sd[3] != kd[1])
    return ffi::Error::InvalidArgument("attention: dscores must be [B, H, Q, K]");
  return RunBackward(pool, q, k, v, bias, dout, dq, dk, dv, dscores->typed_data());
}

// Bindings: q, k, v (float32 or bfloat16) and the float32 bias, as every handler takes them;
// the backward's dout in and dq, dk, dv out (q's dtype).
auto BindOperands() {
  return ffi::Ffi::Bind()
      .Ctx<ffi::ThreadPool>()
      .Arg<ffi::AnyBuffer>()            // q
      .Arg<ffi::AnyBuffer>()            // k
      .Arg<ffi::AnyBuffer>()            // v
      .Arg<ffi::Buffer<ffi::F32>>();    // bias
}
auto BindBackward() {
  return BindOperands()
      .Arg<ffi::AnyBuffer>()            // dout
      .Ret<ffi::AnyBuffer>()            // dq
      .Ret<ffi::AnyBuffer>()            // dk
      .Ret<ffi::AnyBuffer>();           // dv
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(PtuningAttentionForward, AttentionForward,
                              BindOperands().Ret<ffi::AnyBuffer>());  // out
XLA_FFI_DEFINE_HANDLER_SYMBOL(PtuningAttentionBackward, AttentionBackward, BindBackward());
XLA_FFI_DEFINE_HANDLER_SYMBOL(PtuningAttentionBackwardWithScores, AttentionBackwardWithScores,
                              BindBackward().Ret<ffi::Buffer<ffi::F32>>());  // dS
