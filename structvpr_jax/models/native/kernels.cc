// 3x3 depthwise convolution ('SAME' padding, stride 1 or 2, NHWC, float32)
// and its two gradients, as XLA FFI custom calls for the CPU backend; the
// stem's full 3x3 convolution; MobileNetV2's inverted-residual block as
// one forward pass (`InvertedResidualForward`); and the backward of a
// block's expand 1x1 joined to its depthwise backward
// (`ExpandDepthwiseBackward`, at the end).
//
// Why: on XLA:CPU the depthwise layers were ~half of the MobileNetV2 train
// step (jax.profiler, experiments/profile_step.py), as fusions of 9 shifted
// slices that XLA does not vectorise over channels as well as it could, and
// a kernel gradient that is a 9-output reduction. Here every output pixel is
// one pass over its channels, kept in registers across the 9 taps, and the
// work is split over rows on XLA's own intra-op thread pool.
//
// Semantics (the convolution as lax.conv_general_dilated(x, k[:, :, None, :],
// (s, s), "SAME", feature_group_count=C), then a per-channel bias and, when
// `relu6` is set, min(max(., 0), 6)):
//   y[b, p, q, c] = sum_{i, j} x[b, p*s + i - top, q*s + j - left, c] * k[i, j, c] + bias[c]
//   z = relu6 ? min(max(y, 0), 6) : y
// with out-of-range x read as 0 and (top, left) XLA's SAME padding. The
// bias and the activation are where MobileNetV2 with frozen, folded
// BatchNorm puts them; fusing them saves a read and a write of the output
// forward, and of its gradient backward. The backward takes z itself: the
// activation's derivative is 1 where 0 < z < 6 and 0 elsewhere (PyTorch's
// ReLU6), and z is kept anyway as the next layer's input.
// With `prologue` set, the input is the previous layer's pre-activation m
// and the kernel reads relu6(m + pbias) (MobileNetV2's expand 1x1 with
// folded BN, whose bias and activation are then never written); the
// backward returns the gradient of m and of pbias.
// Rows the taps share (relu6(m + pbias), the masked cotangent) are made once
// per row, not once per tap, and the backward forms the kernel and input
// gradients in one pass over the rows, so x, z and dz are read once.
//
// Built on first use by structvpr_jax/models/native/__init__.py (g++ -O3
// -march=native); never required: the XLA implementation is the fallback.

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <functional>
#include <memory>
#include <thread>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

struct Geometry {
  int64_t batch, h, w, c, ho, wo, stride, top, left;
};

int64_t SamePadBefore(int64_t size, int64_t stride, int64_t out) {
  int64_t total = std::max<int64_t>((out - 1) * stride + 3 - size, 0);
  return total / 2;
}

Geometry MakeGeometry(const ffi::Span<const int64_t>& dims, int64_t stride) {
  Geometry g;
  g.batch = dims[0];
  g.h = dims[1];
  g.w = dims[2];
  g.c = dims[3];
  g.stride = stride;
  g.ho = (g.h + stride - 1) / stride;
  g.wo = (g.w + stride - 1) / stride;
  g.top = SamePadBefore(g.h, stride, g.ho);
  g.left = SamePadBefore(g.w, stride, g.wo);
  return g;
}

// Shared state of one parallel loop; owned jointly by the caller and every
// scheduled task (a task that starts after the caller returned finds no work
// and only drops its reference).
struct LoopState {
  std::atomic<int64_t> next{0};
  std::atomic<int64_t> active{0};
};

// Runs body(begin, end) for the chunks [begin, begin + grain) of [0, n), on
// the calling thread and on up to `helpers` tasks of XLA's intra-op pool
// (whichever is free claims the next chunk). Which thread runs a chunk does
// not change any result: every chunk writes its own outputs.
template <typename Body>
void ParallelFor(ffi::ThreadPool& pool, int64_t n, int64_t grain, int64_t helpers,
                 const Body& body) {
  auto state = std::make_shared<LoopState>();
  // `body` is only touched while a chunk is claimed, and the caller returns
  // only after every chunk was claimed (its own loop ran dry) and every
  // claimer finished (`active` back to 0; a worker counts itself active
  // before it claims).
  auto work = [state, n, grain, &body]() {
    state->active.fetch_add(1);
    for (;;) {
      const int64_t begin = state->next.fetch_add(grain);
      if (begin >= n) break;
      body(begin, std::min(begin + grain, n));
    }
    state->active.fetch_sub(1);
  };
  const int64_t chunks = (n + grain - 1) / grain;
  helpers = std::min<int64_t>(helpers, chunks - 1);
  for (int64_t t = 0; t < helpers; ++t) pool.Schedule([work]() { work(); });
  work();
  while (state->active.load() != 0) std::this_thread::yield();
}

// Tasks to schedule besides the calling thread.
int64_t Helpers(ffi::ThreadPool& pool) {
  return std::max<int64_t>(0, std::min<int64_t>(pool.num_threads(), 64) - 1);
}

// 16 float32 lanes: one AVX-512 register, two AVX2 registers (GCC lowers
// the generic vector to what -march allows). aligned(4): rows of C floats
// start anywhere.
typedef float Vec16 __attribute__((vector_size(64), aligned(4)));
constexpr int64_t kLanes = 16;

inline Vec16 Load(const float* p) { return *reinterpret_cast<const Vec16*>(p); }
inline void Store(float* p, Vec16 v) { *reinterpret_cast<Vec16*>(p) = v; }

// The cotangent the convolution sees: dz where the activation passed it
// (0 < z < 6), else 0; with kMasked false, dz itself.
template <bool kMasked>
inline Vec16 Cotangent(const float* dz, const float* z) {
  if constexpr (kMasked) {
    const Vec16 v = Load(z), zero = {};
    return (v > 0.0f) & (v < 6.0f) ? Load(dz) : zero;
  } else {
    return Load(dz);
  }
}

template <bool kMasked>
inline float Cotangent(float dz, float z) {
  if constexpr (kMasked) return (z > 0.0f && z < 6.0f) ? dz : 0.0f;
  return dz;
}

inline Vec16 Relu6(Vec16 v) {
  const Vec16 zero = {}, six = zero + 6.0f;
  v = v < zero ? zero : v;
  return v > six ? six : v;
}

inline float Relu6(float v) { return v < 0.0f ? 0.0f : (v > 6.0f ? 6.0f : v); }

// The depthwise layer's input as read: x itself, or with kPrologue the
// previous layer's pre-activation m made into relu6(m + pbias) on the fly
// (MobileNetV2's expand 1x1 with folded BN: its bias and activation are
// never written out).
template <bool kPrologue>
inline Vec16 Input(const float* x, const float* pbias) {
  if constexpr (kPrologue) return Relu6(Load(x) + Load(pbias));
  return Load(x);
}

template <bool kPrologue>
inline float Input(float x, float pbias) {
  if constexpr (kPrologue) return Relu6(x + pbias);
  return x;
}

// A row of the cotangent the convolution sees (`Cotangent`) for `len`
// floats from dz (and z): dz itself when unmasked, else written to `buf`
// once, so the 9 taps that read each value do not mask it 9 times.
template <bool kMasked>
inline const float* CotangentRow(const float* dz, const float* z, int64_t len, float* buf) {
  if constexpr (!kMasked) {
    return dz;
  } else {
    int64_t c = 0;
    for (; c + kLanes <= len; c += kLanes) Store(buf + c, Cotangent<true>(dz + c, z + c));
    for (; c < len; ++c) buf[c] = Cotangent<true>(dz[c], z[c]);
    return buf;
  }
}

// A row of the layer's input as read (`Input`), `w` pixels of n channels:
// x itself, or with kPrologue relu6(m + pbias) written to `buf` once.
template <bool kPrologue>
inline const float* InputRow(const float* x, const float* pb, int64_t w, int64_t n, float* buf) {
  if constexpr (!kPrologue) {
    return x;
  } else {
    for (int64_t s = 0; s < w; ++s) {
      const float* xv = x + s * n;
      float* out = buf + s * n;
      int64_t c = 0;
      for (; c + kLanes <= n; c += kLanes) Store(out + c, Input<true>(xv + c, pb + c));
      for (; c < n; ++c) out[c] = Input<true>(xv[c], pb[c]);
    }
    return buf;
  }
}

// Three rows of a [rows, len] array as a kernel reads them, each made by
// fill(key, buf) into its own buffer and kept while it may be asked for
// again: a loop over output rows in order reads the input rows r-1, r, r+1
// (stride 1) or r..r+2 (stride 2), and one over input rows the output rows
// p-1..p+1, so each row is made about once per chunk of rows instead of once
// per tap. A unit of work (`NewUnit`) asks for at most three rows; a miss
// replaces the least recently made row not asked for in this unit, so the
// rows of the current unit stay valid whatever the order.
class RowCache {
 public:
  explicit RowCache(int64_t len) : len_(len), buf_(3 * len) {}

  void NewUnit() { used_[0] = used_[1] = used_[2] = false; }

  template <typename Fill>
  const float* Get(int64_t key, Fill fill) {
    for (int slot = 0; slot < 3; ++slot) {
      if (key_[slot] == key) {
        used_[slot] = true;
        return buf_.data() + slot * len_;
      }
    }
    int slot = -1;
    for (int s = 0; s < 3; ++s)
      if (!used_[s] && (slot < 0 || made_[s] < made_[slot])) slot = s;
    key_[slot] = key;
    made_[slot] = ++clock_;
    used_[slot] = true;
    fill(key, buf_.data() + slot * len_);
    return buf_.data() + slot * len_;
  }

 private:
  int64_t len_;
  std::vector<float> buf_;
  int64_t key_[3] = {-1, -1, -1};
  int64_t made_[3] = {0, 0, 0};
  bool used_[3] = {false, false, false};
  int64_t clock_ = 0;
};

// Rows of a [batch * rows, len] array as a kernel reads them: the array's
// own rows, or with kMade rows made from it once each by make(offset of the
// row, buf) (`RowCache`).
template <bool kMade>
class Rows {
 public:
  using Make = std::function<void(int64_t, float*)>;

  Rows(const float* src, int64_t rows, int64_t len, Make make)
      : src_(src), rows_(rows), len_(len), make_(std::move(make)), cache_(kMade ? len : 0) {}

  void NewUnit() { cache_.NewUnit(); }

  // Row r of image b: [len]; valid until the next unit's fourth row.
  const float* Get(int64_t b, int64_t r) {
    const int64_t key = b * rows_ + r;
    if constexpr (!kMade) return src_ + key * len_;
    return cache_.Get(key, [&](int64_t k, float* buf) { make_(k * len_, buf); });
  }

 private:
  const float* src_;
  int64_t rows_, len_;
  Make make_;
  RowCache cache_;
};

// Input rows (b, r) [w, C] as read (`Input`): x's own, or with kPrologue
// relu6(m + pbias).
template <bool kPrologue>
Rows<kPrologue> InputRows(const Geometry& g, const float* x, const float* pb) {
  return Rows<kPrologue>(x, g.h, g.w * g.c, [&g, x, pb](int64_t off, float* buf) {
    InputRow<true>(x + off, pb, g.w, g.c, buf);
  });
}

// Cotangent rows (b, p) [wo, C] the convolution sees (`Cotangent`): dz's
// own, or masked by the activation.
template <bool kMasked>
Rows<kMasked> CotangentRows(const Geometry& g, const float* dz, const float* z) {
  return Rows<kMasked>(dz, g.ho, g.wo * g.c, [dz, z, len = g.wo * g.c](int64_t off, float* buf) {
    CotangentRow<true>(dz + off, z + off, len, buf);
  });
}

// Forward of one pixel: out[0:n] = act(sum over taps t < count of
// ins[t][0:n] * taps[t][0:n] + bias[0:n]) (ins: the input pixel the tap
// reads, as `InputRows` gives it), accumulated in registers in tap order,
// 64 channels at a time.
template <bool kRelu6>
inline void ForwardPixel(float* __restrict out, const float* const* ins,
                         const float* const* taps, int count, const float* bias, int64_t n) {
  int64_t c = 0;
  for (; c + 4 * kLanes <= n; c += 4 * kLanes) {
    Vec16 a0 = {}, a1 = {}, a2 = {}, a3 = {};
    for (int t = 0; t < count; ++t) {
      const float* r = ins[t] + c;
      const float* k = taps[t] + c;
      a0 += Load(r) * Load(k);
      a1 += Load(r + kLanes) * Load(k + kLanes);
      a2 += Load(r + 2 * kLanes) * Load(k + 2 * kLanes);
      a3 += Load(r + 3 * kLanes) * Load(k + 3 * kLanes);
    }
    a0 += Load(bias + c);
    a1 += Load(bias + c + kLanes);
    a2 += Load(bias + c + 2 * kLanes);
    a3 += Load(bias + c + 3 * kLanes);
    if constexpr (kRelu6) {
      a0 = Relu6(a0);
      a1 = Relu6(a1);
      a2 = Relu6(a2);
      a3 = Relu6(a3);
    }
    Store(out + c, a0);
    Store(out + c + kLanes, a1);
    Store(out + c + 2 * kLanes, a2);
    Store(out + c + 3 * kLanes, a3);
  }
  for (; c + kLanes <= n; c += kLanes) {
    Vec16 a = {};
    for (int t = 0; t < count; ++t) a += Load(ins[t] + c) * Load(taps[t] + c);
    a += Load(bias + c);
    if constexpr (kRelu6) a = Relu6(a);
    Store(out + c, a);
  }
  for (; c < n; ++c) {
    float a = 0.0f;
    for (int t = 0; t < count; ++t) a += ins[t][c] * taps[t][c];
    a += bias[c];
    if constexpr (kRelu6) a = Relu6(a);
    out[c] = a;
  }
}

// Output pixels [q0, q0 + count) of one row whose 9 taps all fall inside
// the input (no padding), channels [c0, c0 + NV*16): pixel n (from q0) is
// written at out + n * ldo and reads rows[i] + n * step + j * c (step =
// stride * c). The chunk's 9 taps stay in registers across the pixels
// (ForwardPixel reloads them for every pixel: two loads per multiply-add)
// and 4 pixels run at once so that their sums are independent chains. Each
// sum runs in ForwardPixel's order (taps 0..8 from zero, then the bias), so
// the results are bitwise ForwardPixel's.
template <bool kRelu6, int NV, bool kUnitStride>
inline void InteriorChunk(float* __restrict out, int64_t ldo, const float* const* rows,
                          int64_t step, int64_t c, int64_t count, const float* k,
                          const float* bias, int64_t c0) {
  if constexpr (kUnitStride) step = c;  // pixel p's tap j reads pixel p + 1's tap j - 1
  Vec16 kv[9][NV], bv[NV];
#pragma GCC unroll 9
  for (int t = 0; t < 9; ++t)
#pragma GCC unroll 2
    for (int v = 0; v < NV; ++v) kv[t][v] = Load(k + t * c + c0 + v * kLanes);
#pragma GCC unroll 2
  for (int v = 0; v < NV; ++v) bv[v] = Load(bias + c0 + v * kLanes);
  const float* r[3] = {rows[0] + c0, rows[1] + c0, rows[2] + c0};
  int64_t n = 0;
  for (; n + 4 <= count; n += 4) {
    Vec16 acc[4][NV];
#pragma GCC unroll 4
    for (int p = 0; p < 4; ++p)
#pragma GCC unroll 2
      for (int v = 0; v < NV; ++v) acc[p][v] = Vec16{};
    if constexpr (kUnitStride) {
      // Row i's 6 input pixels n..n+5 are loaded once each for the 4 output
      // pixels (p reads n + p + j with tap j): per pixel the taps still add
      // in order 0..8, so the sums are bitwise the general path's.
#pragma GCC unroll 3
      for (int i = 0; i < 3; ++i)
#pragma GCC unroll 6
        for (int col = 0; col < 6; ++col)
#pragma GCC unroll 2
          for (int v = 0; v < NV; ++v) {
            const Vec16 in = Load(r[i] + (n + col) * c + v * kLanes);
#pragma GCC unroll 4
            for (int p = 0; p < 4; ++p) {
              const int j = col - p;
              if (j >= 0 && j < 3) acc[p][v] += in * kv[i * 3 + j][v];
            }
          }
    } else {
#pragma GCC unroll 9
      for (int t = 0; t < 9; ++t) {
        const int i = t / 3, j = t % 3;
#pragma GCC unroll 4
        for (int p = 0; p < 4; ++p) {
          const float* src = r[i] + (n + p) * step + j * c;
#pragma GCC unroll 2
          for (int v = 0; v < NV; ++v) acc[p][v] += Load(src + v * kLanes) * kv[t][v];
        }
      }
    }
#pragma GCC unroll 4
    for (int p = 0; p < 4; ++p)
#pragma GCC unroll 2
      for (int v = 0; v < NV; ++v) {
        Vec16 a = acc[p][v] + bv[v];
        if constexpr (kRelu6) a = Relu6(a);
        Store(out + (n + p) * ldo + c0 + v * kLanes, a);
      }
  }
  for (; n < count; ++n) {
    Vec16 acc[NV];
#pragma GCC unroll 2
    for (int v = 0; v < NV; ++v) acc[v] = Vec16{};
#pragma GCC unroll 9
    for (int t = 0; t < 9; ++t) {
      const float* src = r[t / 3] + n * step + (t % 3) * c;
#pragma GCC unroll 2
      for (int v = 0; v < NV; ++v) acc[v] += Load(src + v * kLanes) * kv[t][v];
    }
#pragma GCC unroll 2
    for (int v = 0; v < NV; ++v) {
      Vec16 a = acc[v] + bv[v];
      if constexpr (kRelu6) a = Relu6(a);
      Store(out + n * ldo + c0 + v * kLanes, a);
    }
  }
}

// `InteriorChunk` over all c channels: chunks of 32, then 16, then single
// channels in ForwardPixel's order. Called once per row or tile; kept out
// of line as in the version measured (its own effect was not separated:
// within the A/B harness's noise).
template <bool kRelu6>
__attribute__((noinline)) void ForwardInterior(float* __restrict out, int64_t ldo,
                                               const float* const* rows, int64_t step, int64_t c,
                                               int64_t count, const float* k, const float* bias) {
  int64_t c0 = 0;
  if (step == c) {
    for (; c0 + 2 * kLanes <= c; c0 += 2 * kLanes)
      InteriorChunk<kRelu6, 2, true>(out, ldo, rows, step, c, count, k, bias, c0);
    for (; c0 + kLanes <= c; c0 += kLanes)
      InteriorChunk<kRelu6, 1, true>(out, ldo, rows, step, c, count, k, bias, c0);
  } else {
    for (; c0 + 2 * kLanes <= c; c0 += 2 * kLanes)
      InteriorChunk<kRelu6, 2, false>(out, ldo, rows, step, c, count, k, bias, c0);
    for (; c0 + kLanes <= c; c0 += kLanes)
      InteriorChunk<kRelu6, 1, false>(out, ldo, rows, step, c, count, k, bias, c0);
  }
  for (; c0 < c; ++c0)
    for (int64_t n = 0; n < count; ++n) {
      float a = 0.0f;
      for (int t = 0; t < 9; ++t) a += rows[t / 3][n * step + (t % 3) * c + c0] * k[t * c + c0];
      a += bias[c0];
      if constexpr (kRelu6) a = Relu6(a);
      out[n * ldo + c0] = a;
    }
}

// The output columns [lo, hi) whose three taps along a row all fall inside
// the input (q * stride + j - left in [0, w) for j = 0, 1, 2).
inline void InteriorColumns(const Geometry& g, int64_t* lo, int64_t* hi) {
  *lo = std::min<int64_t>((g.left + g.stride - 1) / g.stride, g.wo);
  *hi = g.w + g.left >= 3 ? std::min<int64_t>((g.w - 3 + g.left) / g.stride + 1, g.wo) : 0;
  if (*hi < *lo) *hi = *lo;
}

// Output pixels [q0, q1) of one row (input rows row_of, null where
// padding; pixel q written at out + (q - q0) * g.c): computes the interior
// ones through ForwardInterior when that pays, and returns in [*lo, *hi)
// the pixels it did (empty otherwise), which the caller's per-pixel loop
// (ForwardPixel) skips. First used below 64 channels only (MobileNetV2's
// first block, 32: there ForwardPixel has only 16-channel steps, each a
// chain of 9 dependent multiply-adds reloading the taps; in-process A/B, 16
// images at 224, 2-core Zen 4 VM: block 0 fused 1.35-1.39x, its depthwise
// alone 1.5x, outputs bitwise unchanged), as at 64 and more channels it
// measured 0.6-1.05x of ForwardPixel's there. On the Zen 5 host (EPYC
// family 26, 2026-12-04) ForwardPixel's two loads per multiply-add bound
// it, and this path at every channel count, with stride 1's input pixels
// loaded once for the 4 output pixels that share them, made the whole
// forward 1.066x [1.052, 1.086] at 480x640 and 1.067x [1.019, 1.085] at
// 224 (experiments/ab_forward.py --b-kernels, 40 pairs; stride-1 blocks
// 1.05-1.17x, stride-2 0.98-1.07x), outputs bitwise unchanged. Not
// re-measured on a Zen 4.
template <bool kRelu6>
inline void InteriorSpan(const Geometry& g, const float* const* row_of, const float* k,
                         const float* bias, int64_t q0, int64_t q1, float* out, int64_t* lo,
                         int64_t* hi) {
  *lo = *hi = q1;
  if (row_of[0] == nullptr || row_of[1] == nullptr || row_of[2] == nullptr)
    return;
  int64_t a, b;
  InteriorColumns(g, &a, &b);
  a = std::clamp(a, q0, q1);
  b = std::clamp(b, a, q1);
  if (b == a) return;
  const int64_t first = (a * g.stride - g.left) * g.c;
  const float* rows[3] = {row_of[0] + first, row_of[1] + first, row_of[2] + first};
  ForwardInterior<kRelu6>(out + (a - q0) * g.c, g.c, rows, g.stride * g.c, g.c, b - a, k, bias);
  *lo = a;
  *hi = b;
}

// Forward: one unit = one output row (b, p).
template <bool kRelu6, bool kPrologue>
void ForwardRows(const Geometry& g, const float* x, const float* k, const float* bias,
                 const float* pb, float* z, int64_t begin, int64_t end) {
  auto in_rows = InputRows<kPrologue>(g, x, pb);
  const float* ins[9];
  const float* taps[9];
  for (int64_t unit = begin; unit < end; ++unit) {
    in_rows.NewUnit();
    const int64_t b = unit / g.ho, p = unit % g.ho;
    float* zrow = z + unit * g.wo * g.c;
    const float* row_of[3] = {nullptr, nullptr, nullptr};
    for (int64_t i = 0; i < 3; ++i) {
      const int64_t r = p * g.stride + i - g.top;
      if (r >= 0 && r < g.h) row_of[i] = in_rows.Get(b, r);
    }
    auto edge = [&](int64_t q) {
      int count = 0;
      for (int64_t i = 0; i < 3; ++i) {
        if (row_of[i] == nullptr) continue;
        for (int64_t j = 0; j < 3; ++j) {
          const int64_t s = q * g.stride + j - g.left;
          if (s < 0 || s >= g.w) continue;
          ins[count] = row_of[i] + s * g.c;
          taps[count] = k + (i * 3 + j) * g.c;
          ++count;
        }
      }
      ForwardPixel<kRelu6>(zrow + q * g.c, ins, taps, count, bias, g.c);
    };
    int64_t lo, hi;
    InteriorSpan<kRelu6>(g, row_of, k, bias, 0, g.wo, zrow, &lo, &hi);
    for (int64_t q = 0; q < lo; ++q) edge(q);
    for (int64_t q = hi; q < g.wo; ++q) edge(q);
  }
}

// With kPrologue, the gradient reaching the previous layer's
// pre-activation m: da where 0 < m + pbias < 6 (relu6's derivative), else
// 0; and that is what the prologue bias's gradient sums.
inline Vec16 PrologueGradient(Vec16 da, const float* m, const float* pbias) {
  const Vec16 v = Load(m) + Load(pbias), zero = {};
  return (v > 0.0f) & (v < 6.0f) ? da : zero;
}

inline float PrologueGradient(float da, float m, float pbias) {
  const float v = m + pbias;
  return (v > 0.0f && v < 6.0f) ? da : 0.0f;
}

// One pixel of the input gradient: out[0:n] = sum over taps t < count of
// cots[t][0:n] * taps[t][0:n] (cots: the cotangent at the output pixel the
// tap reaches); with kPrologue, masked by `PrologueGradient` at this pixel
// (m: its input, xpix) and, with kSumPrologue, added to pacc[0:n].
template <bool kPrologue, bool kSumPrologue = true>
inline void InputGradientPixel(float* __restrict out, const float* const* cots,
                               const float* const* taps, int count, int64_t n,
                               const float* xpix, const float* pb, float* pacc) {
  auto finish = [&](int64_t c, Vec16 a) {
    if constexpr (kPrologue) {
      a = PrologueGradient(a, xpix + c, pb + c);
      if constexpr (kSumPrologue) Store(pacc + c, Load(pacc + c) + a);
    }
    Store(out + c, a);
  };
  int64_t c = 0;
  for (; c + 4 * kLanes <= n; c += 4 * kLanes) {
    Vec16 a0 = {}, a1 = {}, a2 = {}, a3 = {};
    for (int t = 0; t < count; ++t) {
      const float* d = cots[t] + c;
      const float* k = taps[t] + c;
      a0 += Load(d) * Load(k);
      a1 += Load(d + kLanes) * Load(k + kLanes);
      a2 += Load(d + 2 * kLanes) * Load(k + 2 * kLanes);
      a3 += Load(d + 3 * kLanes) * Load(k + 3 * kLanes);
    }
    finish(c, a0);
    finish(c + kLanes, a1);
    finish(c + 2 * kLanes, a2);
    finish(c + 3 * kLanes, a3);
  }
  for (; c + kLanes <= n; c += kLanes) {
    Vec16 a = {};
    for (int t = 0; t < count; ++t) a += Load(cots[t] + c) * Load(taps[t] + c);
    finish(c, a);
  }
  for (; c < n; ++c) {
    float a = 0.0f;
    for (int t = 0; t < count; ++t) a += cots[t][c] * taps[t][c];
    if constexpr (kPrologue) {
      a = PrologueGradient(a, xpix[c], pb[c]);
      if constexpr (kSumPrologue) pacc[c] += a;
    }
    out[c] = a;
  }
}

// The output row that owns input row r in the fused backward: the last
// output row whose taps reach r, so that when it is done every cotangent row
// r's input gradient needs has been made.
inline int64_t OwnerRow(const Geometry& g, int64_t r) {
  return std::min((r + g.top) / g.stride, g.ho - 1);
}

// Both gradients in one pass over output rows [begin, end) (units (b, p)),
// so that x, dz and z stream through the cache once instead of once per
// gradient (the rows shared through `InputRows` / `CotangentRows`):
// - the kernel and bias gradients of row p, partial over the chunk:
//     acc[i, j, c] += sum_q in(x)[b, p*s + i - top, q*s + j - left, c] * cot[b, p, q, c]
//     acc[9, c]    += sum_q cot[b, p, q, c]
//   each row's sums formed in registers and then added to `acc`, so the
//   float32 accumulation error grows with rows, not pixels;
// - the input gradient of the input rows p owns (`OwnerRow`):
//     dx[b, r, s, c] = sum over (i, j) with r = p*stride + i - top and
//     s = q*stride + j - left of cot[b, p, q, c] * k[i, j, c]
//   (taps in reverse order, as autodiff of the forward accumulates them),
//   with a prologue masked by `PrologueGradient`; the previous layer's bias
//   gradient, their sum, is formed afterwards (`SumRows`).
//
// Each input row's gradient goes where `sink` says (`sink.Row(row)`, row =
// b * H + r) and `sink.Finish(row)` runs once it is complete: straight into
// dx (`InputGradientToOutput`), or into a one-row buffer that the expand
// 1x1's backward consumes at once (`ExpandBackwardSink`).
template <bool kMasked, bool kPrologue, class Sink>
void BackwardRows(const Geometry& g, const float* x, const float* k, const float* pb,
                  const float* dz, const float* z, float* acc, Sink& sink, int64_t begin,
                  int64_t end) {
  const int64_t n = g.c;
  auto in_rows = InputRows<kPrologue>(g, x, pb);
  auto cot_rows = CotangentRows<kMasked>(g, dz, z);
  const float* cots[9];
  const float* taps[9];
  for (int64_t unit = begin; unit < end; ++unit) {
    in_rows.NewUnit();
    cot_rows.NewUnit();
    const int64_t b = unit / g.ho, p = unit % g.ho;
    const float* cot = cot_rows.Get(b, p);
    // Kernel and bias gradients of output row p.
    {
      float* out = acc + 9 * n;
      int64_t c = 0;
      for (; c + kLanes <= n; c += kLanes) {
        Vec16 a = {};
        for (int64_t q = 0; q < g.wo; ++q) a += Load(cot + q * n + c);
        Store(out + c, Load(out + c) + a);
      }
      for (; c < n; ++c) {
        float a = 0.0f;
        for (int64_t q = 0; q < g.wo; ++q) a += cot[q * n + c];
        out[c] += a;
      }
    }
    for (int64_t i = 0; i < 3; ++i) {
      const int64_t r = p * g.stride + i - g.top;
      if (r < 0 || r >= g.h) continue;
      const float* xrow = in_rows.Get(b, r);
      for (int64_t j = 0; j < 3; ++j) {
        const int64_t shift = j - g.left;
        const int64_t q_lo = shift >= 0 ? 0 : (-shift + g.stride - 1) / g.stride;
        const int64_t last = g.w - 1 - shift;
        const int64_t q_hi = last < 0 ? 0 : std::min(g.wo, last / g.stride + 1);
        float* out = acc + (i * 3 + j) * n;
        const int64_t xstep = g.stride * n;
        int64_t c = 0;
        for (; c + 4 * kLanes <= n; c += 4 * kLanes) {
          Vec16 a0 = {}, a1 = {}, a2 = {}, a3 = {};
          const float* xv = xrow + (q_lo * g.stride + shift) * n + c;
          const float* d = cot + q_lo * n + c;
          for (int64_t q = q_lo; q < q_hi; ++q, xv += xstep, d += n) {
            a0 += Load(xv) * Load(d);
            a1 += Load(xv + kLanes) * Load(d + kLanes);
            a2 += Load(xv + 2 * kLanes) * Load(d + 2 * kLanes);
            a3 += Load(xv + 3 * kLanes) * Load(d + 3 * kLanes);
          }
          Store(out + c, Load(out + c) + a0);
          Store(out + c + kLanes, Load(out + c + kLanes) + a1);
          Store(out + c + 2 * kLanes, Load(out + c + 2 * kLanes) + a2);
          Store(out + c + 3 * kLanes, Load(out + c + 3 * kLanes) + a3);
        }
        for (; c + kLanes <= n; c += kLanes) {
          Vec16 a = {};
          const float* xv = xrow + (q_lo * g.stride + shift) * n + c;
          const float* d = cot + q_lo * n + c;
          for (int64_t q = q_lo; q < q_hi; ++q, xv += xstep, d += n) a += Load(xv) * Load(d);
          Store(out + c, Load(out + c) + a);
        }
        for (; c < n; ++c) {
          float a = 0.0f;
          const float* xv = xrow + (q_lo * g.stride + shift) * n + c;
          const float* d = cot + q_lo * n + c;
          for (int64_t q = q_lo; q < q_hi; ++q, xv += xstep, d += n) a += *xv * *d;
          out[c] += a;
        }
      }
    }
    // Input gradient of the input rows p owns.
    const int64_t r_lo = std::max<int64_t>(0, p * g.stride - g.top);
    const int64_t r_hi = p == g.ho - 1 ? g.h : std::min(g.h, p * g.stride - g.top + g.stride);
    for (int64_t r = r_lo; r < r_hi; ++r) {
      if (OwnerRow(g, r) != p) continue;
      const float* row_of[3] = {nullptr, nullptr, nullptr};
      for (int64_t i = 2; i >= 0; --i) {
        const int64_t pn = r + g.top - i;
        if (pn < 0 || pn % g.stride) continue;
        const int64_t pi = pn / g.stride;
        if (pi >= g.ho) continue;
        row_of[i] = cot_rows.Get(b, pi);
      }
      const int64_t row = b * g.h + r;
      float* dxrow = sink.Row(row);
      for (int64_t s = 0; s < g.w; ++s) {
        int count = 0;
        for (int64_t i = 2; i >= 0; --i) {
          if (row_of[i] == nullptr) continue;
          for (int64_t j = 2; j >= 0; --j) {
            const int64_t qn = s + g.left - j;
            if (qn < 0 || qn % g.stride) continue;
            const int64_t q = qn / g.stride;
            if (q >= g.wo) continue;
            cots[count] = row_of[i] + q * n;
            taps[count] = k + (i * 3 + j) * n;
            ++count;
          }
        }
        InputGradientPixel<kPrologue, Sink::kSumPrologue>(
            dxrow + s * n, cots, taps, count, n, x + (row * g.w + s) * n, pb,
            sink.PrologueSum());
      }
      sink.Finish(row);
    }
  }
}

// `BackwardRows`' input gradient written straight into dx [rows, W, C].
struct InputGradientToOutput {
  static constexpr bool kSumPrologue = false;  // summed afterwards (`SumRows`)
  float* dx;
  int64_t row_size;  // W * C
  float* Row(int64_t row) { return dx + row * row_size; }
  float* PrologueSum() { return nullptr; }
  void Finish(int64_t) {}
};

// acc[0:n] += every pixel of rows [begin, end) of v [rows, w, n], pixel by
// pixel in order.
void SumRows(const float* v, int64_t w, int64_t n, float* acc, int64_t begin, int64_t end) {
  for (int64_t pix = begin * w; pix < end * w; ++pix) {
    const float* a = v + pix * n;
    int64_t c = 0;
    for (; c + kLanes <= n; c += kLanes) Store(acc + c, Load(acc + c) + Load(a + c));
    for (; c < n; ++c) acc[c] += a[c];
  }
}

// Chunks of rows: about 8 per thread, for balance without much claiming traffic.
int64_t Grain(int64_t units, int64_t helpers) {
  return std::max<int64_t>(1, units / (8 * (helpers + 1)));
}

// The kernel gradient's rows are split into a fixed number of chunks
// whatever the thread count, each summed on its own and then added in chunk
// order: the result is the same bit for bit on every run and thread count.
constexpr int64_t kKernelGradientChunks = 32;

ffi::Error CheckShapes(const ffi::Span<const int64_t>& x, const ffi::Span<const int64_t>& k,
                       const ffi::Span<const int64_t>& bias, int64_t stride) {
  if (x.size() != 4) return ffi::Error::InvalidArgument("depthwise: x must be [B, H, W, C]");
  if (k.size() != 3 || k[0] != 3 || k[1] != 3 || k[2] != x[3])
    return ffi::Error::InvalidArgument("depthwise: kernel must be [3, 3, C]");
  if (bias.size() != 1 || bias[0] != x[3])
    return ffi::Error::InvalidArgument("depthwise: bias must be [C]");
  if (stride != 1 && stride != 2)
    return ffi::Error::InvalidArgument("depthwise: stride must be 1 or 2");
  return ffi::Error::Success();
}

bool SameShape(const ffi::Span<const int64_t>& d, const Geometry& g) {
  return d.size() == 4 && d[0] == g.batch && d[1] == g.ho && d[2] == g.wo && d[3] == g.c;
}

// z = act(depthwise(in(x), kernel) + bias), in(x) = x, or relu6(x + pbias)
// when `prologue` is set.
ffi::Error DepthwiseForward(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x,
                            ffi::Buffer<ffi::F32> kernel, ffi::Buffer<ffi::F32> bias,
                            ffi::Buffer<ffi::F32> pbias, ffi::ResultBuffer<ffi::F32> z,
                            int64_t stride, int64_t relu6, int64_t prologue) {
  if (auto e = CheckShapes(x.dimensions(), kernel.dimensions(), bias.dimensions(), stride);
      e.failure())
    return e;
  if (auto e = CheckShapes(x.dimensions(), kernel.dimensions(), pbias.dimensions(), stride);
      e.failure())
    return e;
  const Geometry g = MakeGeometry(x.dimensions(), stride);
  if (!SameShape(z->dimensions(), g))
    return ffi::Error::InvalidArgument("depthwise: output has the wrong shape");
  const float* xp = x.typed_data();
  const float* kp = kernel.typed_data();
  const float* bp = bias.typed_data();
  const float* pp = pbias.typed_data();
  float* zp = z->typed_data();
  const int64_t units = g.batch * g.ho;
  const int64_t helpers = Helpers(pool);
  ParallelFor(pool, units, Grain(units, helpers), helpers, [&](int64_t begin, int64_t end) {
    if (relu6 && prologue)
      ForwardRows<true, true>(g, xp, kp, bp, pp, zp, begin, end);
    else if (relu6)
      ForwardRows<true, false>(g, xp, kp, bp, pp, zp, begin, end);
    else if (prologue)
      ForwardRows<false, true>(g, xp, kp, bp, pp, zp, begin, end);
    else
      ForwardRows<false, false>(g, xp, kp, bp, pp, zp, begin, end);
  });
  return ffi::Error::Success();
}

// Sums per-chunk partials [chunks, n] in chunk order into out[0:n].
void SumChunks(const std::vector<float>& partial, int64_t chunks, int64_t n, float* out) {
  std::fill(out, out + n, 0.0f);
  for (int64_t chunk = 0; chunk < chunks; ++chunk)
    for (int64_t v = 0; v < n; ++v) out[v] += partial[chunk * n + v];
}

// (dx, dkernel, dbias, dpbias) of DepthwiseForward for the output cotangent
// dz; z is the forward's output (read only with relu6, for the activation's
// mask). With `prologue`, dx is the gradient of the pre-activation x and
// dpbias its sum; without, dpbias is 0.
ffi::Error DepthwiseBackward(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x,
                             ffi::Buffer<ffi::F32> kernel, ffi::Buffer<ffi::F32> pbias,
                             ffi::Buffer<ffi::F32> z, ffi::Buffer<ffi::F32> dz,
                             ffi::ResultBuffer<ffi::F32> dx, ffi::ResultBuffer<ffi::F32> dk,
                             ffi::ResultBuffer<ffi::F32> dbias,
                             ffi::ResultBuffer<ffi::F32> dpbias, int64_t stride, int64_t relu6,
                             int64_t prologue) {
  if (auto e = CheckShapes(x.dimensions(), kernel.dimensions(), dbias->dimensions(), stride);
      e.failure())
    return e;
  if (auto e = CheckShapes(x.dimensions(), kernel.dimensions(), pbias.dimensions(), stride);
      e.failure())
    return e;
  const Geometry g = MakeGeometry(x.dimensions(), stride);
  if (!SameShape(dz.dimensions(), g) || !SameShape(z.dimensions(), g))
    return ffi::Error::InvalidArgument("depthwise: z or dz has the wrong shape");
  const float* xp = x.typed_data();
  const float* kp = kernel.typed_data();
  const float* pp = pbias.typed_data();
  const float* zp = z.typed_data();
  const float* gp = dz.typed_data();
  const int64_t helpers = Helpers(pool);

  float* dxp = dx->typed_data();

  // One pass for both gradients (`BackwardRows`): kernel and bias gradients
  // as per-chunk partial sums [10, C] over fixed chunks of output rows, then
  // their sum in chunk order; the input gradient row by row.
  {
    const int64_t n = 10 * g.c;
    const int64_t out_rows = g.batch * g.ho;
    const int64_t grain = (out_rows + kKernelGradientChunks - 1) / kKernelGradientChunks;
    const int64_t chunks = (out_rows + grain - 1) / grain;
    std::vector<float> partial(chunks * n, 0.0f);
    ParallelFor(pool, out_rows, grain, helpers, [&](int64_t begin, int64_t end) {
      float* acc = partial.data() + (begin / grain) * n;
      InputGradientToOutput sink{dxp, g.w * g.c};
      if (relu6 && prologue)
        BackwardRows<true, true>(g, xp, kp, pp, gp, zp, acc, sink, begin, end);
      else if (relu6)
        BackwardRows<true, false>(g, xp, kp, pp, gp, zp, acc, sink, begin, end);
      else if (prologue)
        BackwardRows<false, true>(g, xp, kp, pp, gp, zp, acc, sink, begin, end);
      else
        BackwardRows<false, false>(g, xp, kp, pp, gp, zp, acc, sink, begin, end);
    });
    std::vector<float> total(n);
    SumChunks(partial, chunks, n, total.data());
    std::copy(total.begin(), total.begin() + 9 * g.c, dk->typed_data());
    std::copy(total.begin() + 9 * g.c, total.end(), dbias->typed_data());
  }

  // With a prologue, its bias's gradient: the sum of dx, in fixed chunks of
  // input rows summed in chunk order.
  const int64_t in_rows = g.batch * g.h;
  const int64_t grain = (in_rows + kKernelGradientChunks - 1) / kKernelGradientChunks;
  const int64_t chunks = prologue ? (in_rows + grain - 1) / grain : 0;
  std::vector<float> partial(chunks * g.c, 0.0f);
  if (prologue) {
    ParallelFor(pool, in_rows, grain, helpers, [&](int64_t begin, int64_t end) {
      SumRows(dxp, g.w, g.c, partial.data() + (begin / grain) * g.c, begin, end);
    });
  }
  SumChunks(partial, chunks, g.c, dpbias->typed_data());
  return ffi::Error::Success();
}

// ---------------------------------------------------------------------------
// Full 3x3 convolution with few input channels (the MobileNetV2 stem: RGB in,
// 32 out, stride 2), 'SAME' padding, plus bias and optional relu6:
//   z[b, p, q, o] = act(sum_{i, j, c} x[b, p*s + i - top, q*s + j - left, c] * w[i, j, c, o] + bias[o])
// w is HWIO [3, 3, Cin, Cout]. XLA:CPU ran this layer at ~25 GFLOP/s; here
// each output pixel's Cout channels stay in registers while its 9*Cin
// inputs are broadcast. The backward computes the kernel and bias
// gradients; the input gradient (the image's, rarely wanted) is XLA's.
// ---------------------------------------------------------------------------

struct ConvGeometry {
  Geometry g;      // g.c = Cin
  int64_t cout;
};

// Output pixel's valid taps: offsets into x of the pixel (i, j) reads and
// the matching offsets into w (rows of Cout per input channel).
inline int ConvTaps(const Geometry& g, int64_t cout, int64_t b, int64_t p, int64_t q,
                    int64_t* xoff, int64_t* woff) {
  int count = 0;
  for (int64_t i = 0; i < 3; ++i) {
    const int64_t r = p * g.stride + i - g.top;
    if (r < 0 || r >= g.h) continue;
    for (int64_t j = 0; j < 3; ++j) {
      const int64_t s = q * g.stride + j - g.left;
      if (s < 0 || s >= g.w) continue;
      xoff[count] = ((b * g.h + r) * g.w + s) * g.c;
      woff[count] = (i * 3 + j) * g.c * cout;
      ++count;
    }
  }
  return count;
}

template <bool kRelu6>
void ConvForwardRows(const ConvGeometry& cg, const float* x, const float* w, const float* bias,
                     float* z, int64_t begin, int64_t end) {
  const Geometry& g = cg.g;
  const int64_t cout = cg.cout, cin = g.c;
  int64_t xoff[9], woff[9];
  for (int64_t unit = begin; unit < end; ++unit) {
    const int64_t b = unit / g.ho, p = unit % g.ho;
    const int64_t r0 = p * g.stride - g.top;
    const bool rows_inside = r0 >= 0 && r0 + 2 < g.h;
    for (int64_t q = 0; q < g.wo;) {
      // Four neighbouring pixels whose 9 taps all lie inside the image: each
      // kernel row loaded once for the four, eight independent sums (the
      // single-pixel loop below waits on two chains of 9*Cin additions).
      // Same sums in the same order as the loop below.
      if (rows_inside && q + 4 <= g.wo && q * g.stride - g.left >= 0 &&
          (q + 3) * g.stride - g.left + 2 < g.w && cout % kLanes == 0) {
        const float* px[4];
        for (int k = 0; k < 4; ++k)
          px[k] = x + ((b * g.h + r0) * g.w + (q + k) * g.stride - g.left) * cin;
        float* out = z + (unit * g.wo + q) * cout;
        int64_t o = 0;
        for (; o + 2 * kLanes <= cout; o += 2 * kLanes) {
          Vec16 a[4][2];
          for (int k = 0; k < 4; ++k) {
            a[k][0] = Load(bias + o);
            a[k][1] = Load(bias + o + kLanes);
          }
          for (int64_t i = 0; i < 3; ++i) {
            for (int64_t j = 0; j < 3; ++j) {
              const int64_t xo = (i * g.w + j) * cin;
              const float* wv = w + (i * 3 + j) * cin * cout + o;
              for (int64_t c = 0; c < cin; ++c, wv += cout) {
                const Vec16 w0 = Load(wv), w1 = Load(wv + kLanes);
                for (int k = 0; k < 4; ++k) {
                  const float v = px[k][xo + c];
                  a[k][0] += v * w0;
                  a[k][1] += v * w1;
                }
              }
            }
          }
          for (int k = 0; k < 4; ++k) {
            if constexpr (kRelu6) {
              a[k][0] = Relu6(a[k][0]);
              a[k][1] = Relu6(a[k][1]);
            }
            Store(out + k * cout + o, a[k][0]);
            Store(out + k * cout + o + kLanes, a[k][1]);
          }
        }
        for (; o < cout; o += kLanes) {
          Vec16 a[4];
          for (int k = 0; k < 4; ++k) a[k] = Load(bias + o);
          for (int64_t i = 0; i < 3; ++i) {
            for (int64_t j = 0; j < 3; ++j) {
              const int64_t xo = (i * g.w + j) * cin;
              const float* wv = w + (i * 3 + j) * cin * cout + o;
              for (int64_t c = 0; c < cin; ++c, wv += cout) {
                const Vec16 w0 = Load(wv);
                for (int k = 0; k < 4; ++k) a[k] += px[k][xo + c] * w0;
              }
            }
          }
          for (int k = 0; k < 4; ++k) {
            if constexpr (kRelu6) a[k] = Relu6(a[k]);
            Store(out + k * cout + o, a[k]);
          }
        }
        q += 4;
        continue;
      }
      const int count = ConvTaps(g, cout, b, p, q, xoff, woff);
      float* out = z + (unit * g.wo + q) * cout;
      int64_t o = 0;
      for (; o + 2 * kLanes <= cout; o += 2 * kLanes) {
        Vec16 a0 = Load(bias + o), a1 = Load(bias + o + kLanes);
        for (int t = 0; t < count; ++t) {
          const float* xv = x + xoff[t];
          const float* wv = w + woff[t] + o;
          for (int64_t c = 0; c < cin; ++c, wv += cout) {
            const float v = xv[c];
            a0 += v * Load(wv);
            a1 += v * Load(wv + kLanes);
          }
        }
        if constexpr (kRelu6) {
          a0 = Relu6(a0);
          a1 = Relu6(a1);
        }
        Store(out + o, a0);
        Store(out + o + kLanes, a1);
      }
      for (; o + kLanes <= cout; o += kLanes) {
        Vec16 a = Load(bias + o);
        for (int t = 0; t < count; ++t) {
          const float* xv = x + xoff[t];
          const float* wv = w + woff[t] + o;
          for (int64_t c = 0; c < cin; ++c, wv += cout) a += xv[c] * Load(wv);
        }
        if constexpr (kRelu6) a = Relu6(a);
        Store(out + o, a);
      }
      for (; o < cout; ++o) {
        float a = bias[o];
        for (int t = 0; t < count; ++t)
          for (int64_t c = 0; c < cin; ++c) a += x[xoff[t] + c] * w[woff[t] + c * cout + o];
        if constexpr (kRelu6) a = Relu6(a);
        out[o] = a;
      }
      ++q;
    }
  }
}

alignas(64) const float kZeros[16] = {};

// Kernel and bias gradients over output rows [begin, end), added to
// acc [9*Cin + 1, Cout] (the last row: bias), 16 output channels at a time.
// kCin > 0: the input channel count known at compile time, every loop over
// (i, j, c) unrolled so the 9*kCin kernel rows of the block stay in
// registers along a row (27 for RGB); kCin == 0: any count, in memory.
template <bool kMasked, int kCin>
void ConvKernelGradientRows(const ConvGeometry& cg, const float* x, const float* dz,
                            const float* z, float* acc, int64_t begin, int64_t end) {
  const Geometry& g = cg.g;
  const int64_t cout = cg.cout, cin = g.c, taps = 9 * cin;
  float* bias_acc = acc + taps * cout;
  // One output row at a time, every 16-channel block of it in turn: the
  // row's dz and z (a few tens of KB) are read from memory once and from
  // cache for the other blocks.
  std::vector<float> cot_buf(kCin > 0 && kMasked ? g.wo * cout : 0);
  for (int64_t unit = begin; unit < end; ++unit) {
    const int64_t b = unit / g.ho, p = unit % g.ho;
    if constexpr (kCin > 0) {
      if (cout % (2 * kLanes) == 0) {
        // 32 output channels at a time, one kernel row i per pass over the
        // row: 2 x 3 x kCin sums in registers (18 for RGB; all 27 taps at
        // once would not fit beside their operands), the row's cotangent
        // masked once. Same sums in the same order as below.
        const float* cot = CotangentRow<kMasked>(dz + unit * g.wo * cout, z + unit * g.wo * cout,
                                                 g.wo * cout, cot_buf.data());
        for (int64_t o = 0; o < cout; o += 2 * kLanes) {
          Vec16 ab0 = Load(bias_acc + o), ab1 = Load(bias_acc + o + kLanes);
          for (int64_t q = 0; q < g.wo; ++q) {
            ab0 += Load(cot + q * cout + o);
            ab1 += Load(cot + q * cout + o + kLanes);
          }
          Store(bias_acc + o, ab0);
          Store(bias_acc + o + kLanes, ab1);
          for (int i = 0; i < 3; ++i) {
            const int64_t r = p * g.stride + i - g.top;
            if (r < 0 || r >= g.h) continue;
            const float* xrow = x + (b * g.h + r) * g.w * kCin;
            float* arow = acc + i * 3 * kCin * cout + o;
            Vec16 a[3 * kCin][2];
            for (int t = 0; t < 3 * kCin; ++t) {
              a[t][0] = Load(arow + t * cout);
              a[t][1] = Load(arow + t * cout + kLanes);
            }
            for (int64_t q = 0; q < g.wo; ++q) {
              const Vec16 d0 = Load(cot + q * cout + o), d1 = Load(cot + q * cout + o + kLanes);
              const float* xv[3];
              for (int j = 0; j < 3; ++j) {
                const int64_t sc = q * g.stride + j - g.left;
                xv[j] = (sc < 0 || sc >= g.w) ? kZeros : xrow + sc * kCin;
              }
#pragma GCC unroll 3
              for (int j = 0; j < 3; ++j) {
#pragma GCC unroll 8
                for (int c = 0; c < kCin; ++c) {
                  const float v = xv[j][c];
                  a[j * kCin + c][0] += v * d0;
                  a[j * kCin + c][1] += v * d1;
                }
              }
            }
            for (int t = 0; t < 3 * kCin; ++t) {
              Store(arow + t * cout, a[t][0]);
              Store(arow + t * cout + kLanes, a[t][1]);
            }
          }
        }
        continue;
      }
    }
    for (int64_t o = 0; o < cout; o += kLanes) {
      const int64_t lanes = std::min(kLanes, cout - o);
      if constexpr (kCin > 0) {
        if (lanes == kLanes) {
          Vec16 a[9 * kCin];
          for (int t = 0; t < 9 * kCin; ++t) a[t] = Load(acc + t * cout + o);
          Vec16 ab = Load(bias_acc + o);
          for (int64_t q = 0; q < g.wo; ++q) {
            const int64_t off = (unit * g.wo + q) * cout + o;
            const Vec16 d = Cotangent<kMasked>(dz + off, z + off);
            ab += d;
            // Taps outside the image read zeros: no branches in the
            // unrolled body, so the accumulators stay in registers.
            const float* xv[9];
            for (int i = 0; i < 3; ++i) {
              const int64_t r = p * g.stride + i - g.top;
              for (int j = 0; j < 3; ++j) {
                const int64_t s = q * g.stride + j - g.left;
                xv[i * 3 + j] = (r < 0 || r >= g.h || s < 0 || s >= g.w)
                                    ? kZeros : x + ((b * g.h + r) * g.w + s) * kCin;
              }
            }
#pragma GCC unroll 9
            for (int t = 0; t < 9; ++t) {
#pragma GCC unroll 8
              for (int c = 0; c < kCin; ++c) a[t * kCin + c] += xv[t][c] * d;
            }
          }
          for (int t = 0; t < 9 * kCin; ++t) Store(acc + t * cout + o, a[t]);
          Store(bias_acc + o, ab);
          continue;
        }
      }
      int64_t xoff[9], woff[9];
      for (int64_t q = 0; q < g.wo; ++q) {
        const int64_t off = (unit * g.wo + q) * cout + o;
        const int count = ConvTaps(g, cout, b, p, q, xoff, woff);
        for (int64_t l = 0; l < lanes; ++l) {
          const float d = Cotangent<kMasked>(dz[off + l], z[off + l]);
          bias_acc[o + l] += d;
          for (int t = 0; t < count; ++t) {
            const int64_t row = woff[t] / cout;
            for (int64_t c = 0; c < cin; ++c) acc[(row + c) * cout + o + l] += x[xoff[t] + c] * d;
          }
        }
      }
    }
  }
}

ffi::Error CheckConvShapes(const ffi::Span<const int64_t>& x, const ffi::Span<const int64_t>& w,
                           const ffi::Span<const int64_t>& bias, int64_t stride) {
  if (x.size() != 4) return ffi::Error::InvalidArgument("conv3x3: x must be [B, H, W, Cin]");
  if (w.size() != 4 || w[0] != 3 || w[1] != 3 || w[2] != x[3])
    return ffi::Error::InvalidArgument("conv3x3: kernel must be [3, 3, Cin, Cout]");
  if (bias.size() != 1 || bias[0] != w[3])
    return ffi::Error::InvalidArgument("conv3x3: bias must be [Cout]");
  if (stride != 1 && stride != 2)
    return ffi::Error::InvalidArgument("conv3x3: stride must be 1 or 2");
  return ffi::Error::Success();
}

ffi::Error Conv3x3Forward(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> w,
                          ffi::Buffer<ffi::F32> bias, ffi::ResultBuffer<ffi::F32> z,
                          int64_t stride, int64_t relu6) {
  if (auto e = CheckConvShapes(x.dimensions(), w.dimensions(), bias.dimensions(), stride);
      e.failure())
    return e;
  ConvGeometry cg{MakeGeometry(x.dimensions(), stride), w.dimensions()[3]};
  const auto zd = z->dimensions();
  if (zd.size() != 4 || zd[0] != cg.g.batch || zd[1] != cg.g.ho || zd[2] != cg.g.wo ||
      zd[3] != cg.cout)
    return ffi::Error::InvalidArgument("conv3x3: output has the wrong shape");
  const float* xp = x.typed_data();
  const float* wp = w.typed_data();
  const float* bp = bias.typed_data();
  float* zp = z->typed_data();
  const int64_t units = cg.g.batch * cg.g.ho;
  const int64_t helpers = Helpers(pool);
  ParallelFor(pool, units, Grain(units, helpers), helpers, [&](int64_t begin, int64_t end) {
    if (relu6)
      ConvForwardRows<true>(cg, xp, wp, bp, zp, begin, end);
    else
      ConvForwardRows<false>(cg, xp, wp, bp, zp, begin, end);
  });
  return ffi::Error::Success();
}

// (dkernel [3, 3, Cin, Cout], dbias [Cout]) of Conv3x3Forward for dz.
ffi::Error Conv3x3KernelGradient(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x,
                                 ffi::Buffer<ffi::F32> z, ffi::Buffer<ffi::F32> dz,
                                 ffi::ResultBuffer<ffi::F32> dw,
                                 ffi::ResultBuffer<ffi::F32> dbias, int64_t stride,
                                 int64_t relu6) {
  if (auto e = CheckConvShapes(x.dimensions(), dw->dimensions(), dbias->dimensions(), stride);
      e.failure())
    return e;
  ConvGeometry cg{MakeGeometry(x.dimensions(), stride), dw->dimensions()[3]};
  for (const auto& d : {z.dimensions(), dz.dimensions()})
    if (d.size() != 4 || d[0] != cg.g.batch || d[1] != cg.g.ho || d[2] != cg.g.wo ||
        d[3] != cg.cout)
      return ffi::Error::InvalidArgument("conv3x3: z or dz has the wrong shape");
  const float* xp = x.typed_data();
  const float* zp = z.typed_data();
  const float* gp = dz.typed_data();
  const int64_t n = (9 * cg.g.c + 1) * cg.cout;
  const int64_t out_rows = cg.g.batch * cg.g.ho;
  const int64_t grain = (out_rows + kKernelGradientChunks - 1) / kKernelGradientChunks;
  const int64_t chunks = (out_rows + grain - 1) / grain;
  std::vector<float> partial(chunks * n, 0.0f);
  ParallelFor(pool, out_rows, grain, Helpers(pool), [&](int64_t begin, int64_t end) {
    float* acc = partial.data() + (begin / grain) * n;
    const bool rgb = cg.g.c == 3;
    if (relu6 && rgb)
      ConvKernelGradientRows<true, 3>(cg, xp, gp, zp, acc, begin, end);
    else if (relu6)
      ConvKernelGradientRows<true, 0>(cg, xp, gp, zp, acc, begin, end);
    else if (rgb)
      ConvKernelGradientRows<false, 3>(cg, xp, gp, zp, acc, begin, end);
    else
      ConvKernelGradientRows<false, 0>(cg, xp, gp, zp, acc, begin, end);
  });
  std::vector<float> total(n);
  SumChunks(partial, chunks, n, total.data());
  const int64_t nw = 9 * cg.g.c * cg.cout;
  std::copy(total.begin(), total.begin() + nw, dw->typed_data());
  std::copy(total.begin() + nw, total.end(), dbias->typed_data());
  return ffi::Error::Success();
}

// ---------------------------------------------------------------------------
// MobileNetV2's inverted-residual block, forward only, in one pass:
//   e = relu6(x @ we + be)             the expand 1x1 with folded BN (with
//                                      no expand layer, e = x)
//   d = relu6(depthwise(e, kd) + bd)   3x3, stride 1 or 2, 'SAME'
//   y = d @ wp + bp (+ x with `residual`)
// Why: XLA ran the three layers as three passes over the block's largest
// tensors: the expand wrote e (6x the block's input) and the depthwise read
// it back, then wrote d and the project read it back; at 480x640 most of the
// network's time went to that traffic and to 1x1 matmuls of 16-32 outputs
// (lanes half used). Here one unit of work is one output row: e's rows are
// made in a 3-row cache (`RowCache`: each made about once per chunk of
// rows) and d exists only as a tile of kTile pixels, so neither is written
// out whole; the 1x1s are register-tiled (kTile pixels x up to 48 outputs)
// with the bias, activation and residual applied on the way out.
// ---------------------------------------------------------------------------

constexpr int64_t kTile = 16;  // pixels per tile of the 1x1s (register tiles of 8 or 16)

inline int64_t Padded(int64_t n) { return (n + kLanes - 1) / kLanes * kLanes; }

// w [k, n] as [k, Padded(n)] with zeros beyond n (so every column block is a
// full vector); a vector [n] as [Padded(n)].
std::vector<float> PackColumns(const float* w, int64_t k, int64_t n) {
  const int64_t np = Padded(n);
  std::vector<float> out(k * np, 0.0f);
  for (int64_t r = 0; r < k; ++r) std::copy(w + r * n, w + (r + 1) * n, out.data() + r * np);
  return out;
}

// c[m, 0:cols] = act(a[m, 0:k] @ b[0:k, 0:NV*16] + bias) (+ res[m, 0:cols])
// for m < rows (a has MR readable rows of stride lda; b and bias are
// padded, stride ldb; cols <= NV*16 are stored). MR x NV accumulators stay
// in registers (at most 24 of AVX-512's 32); accumulates in k order.
// a's values are multiplied as scalars (`av * bv`), which GCC broadcasts
// straight from memory (vbroadcastss m32); the earlier `Vec16{} + a[..]`
// compiled to a scalar add of 0 (not foldable without -ffast-math: -0 + 0
// is +0) and a register broadcast per value, and that was 5 % of the
// forward (in-process A/B, 2026-12-04, Zen 5: 1.054x [1.038, 1.066] at
// 480x640, 1.055x [1.032, 1.077] at 224). Results are bitwise the same: the
// accumulators start at +0 and never hold -0, so a -0 read as +0 adds
// nothing different.
template <int NV, int MR>
inline void GemmTile(const float* a, int64_t lda, int64_t k, const float* b, int64_t ldb,
                     const float* bias, bool relu6, const float* res, int64_t ldr, float* c,
                     int64_t ldc, int64_t rows, int64_t cols) {
  Vec16 acc[MR][NV];
#pragma GCC unroll 16
  for (int m = 0; m < MR; ++m)
#pragma GCC unroll 3
    for (int v = 0; v < NV; ++v) acc[m][v] = Vec16{};
  for (int64_t kk = 0; kk < k; ++kk) {
    Vec16 bv[NV];
#pragma GCC unroll 3
    for (int v = 0; v < NV; ++v) bv[v] = Load(b + kk * ldb + v * kLanes);
#pragma GCC unroll 16
    for (int m = 0; m < MR; ++m) {
      const float av = a[m * lda + kk];
#pragma GCC unroll 3
      for (int v = 0; v < NV; ++v) acc[m][v] += av * bv[v];
    }
  }
  for (int64_t m = 0; m < std::min<int64_t>(rows, MR); ++m) {
    for (int v = 0; v < NV; ++v) {
      const int64_t col = v * kLanes, valid = std::min<int64_t>(kLanes, cols - col);
      if (valid <= 0) break;
      Vec16 r = acc[m][v] + Load(bias + col);
      if (relu6) r = Relu6(r);
      float* out = c + m * ldc + col;
      const float* rr = res ? res + m * ldr + col : nullptr;
      if (valid == kLanes) {
        if (rr) r += Load(rr);
        Store(out, r);
      } else {
        alignas(64) float t[kLanes];
        Store(t, r);
        for (int64_t j = 0; j < valid; ++j) out[j] = t[j] + (rr ? rr[j] : 0.0f);
      }
    }
  }
}

// The column block [n0, n0 + NV*16) of `Gemm` for its rows in register
// tiles of MR.
template <int NV, int MR>
inline void GemmColumns(const float* a, int64_t lda, int64_t rows, int64_t k, const float* b,
                        int64_t np, int64_t n, int64_t n0, const float* bias, bool relu6,
                        const float* res, int64_t ldr, float* c, int64_t ldc) {
  for (int64_t m0 = 0; m0 < rows; m0 += MR)
    GemmTile<NV, MR>(a + m0 * lda, lda, k, b + n0, np, bias + n0, relu6,
                     res ? res + m0 * ldr + n0 : nullptr, ldr, c + m0 * ldc + n0, ldc,
                     rows - m0, n - n0);
}

// c[m, 0:n] = act(a[m, 0:k] @ b + bias) (+ res) for m < rows <= kTile (a
// has kTile readable rows), b packed [k, Padded(n)] (`PackColumns`), in
// column blocks of 48 and 32 (8-row register tiles) or 16 (16 rows).
inline void Gemm(const float* a, int64_t lda, int64_t rows, int64_t k, const float* b,
                 int64_t n, const float* bias, bool relu6, const float* res, int64_t ldr,
                 float* c, int64_t ldc) {
  const int64_t np = Padded(n);
  int64_t n0 = 0;
  for (; n0 + 3 * kLanes <= np; n0 += 3 * kLanes)
    GemmColumns<3, 8>(a, lda, rows, k, b, np, n, n0, bias, relu6, res, ldr, c, ldc);
  if (np - n0 == 2 * kLanes)
    GemmColumns<2, 8>(a, lda, rows, k, b, np, n, n0, bias, relu6, res, ldr, c, ldc);
  else if (np - n0 == kLanes)
    GemmColumns<1, 16>(a, lda, rows, k, b, np, n, n0, bias, relu6, res, ldr, c, ldc);
}

struct BlockWeights {
  const float* we;   // [cin, Padded(ce)] packed, or null without expand
  const float* be;   // [Padded(ce)]
  const float* kd;   // [3, 3, ce]
  const float* bd;   // [ce]
  const float* wp;   // [ce, Padded(cout)] packed
  const float* bp;   // [Padded(cout)]
  int64_t cin, ce, cout;
  bool residual;
};

// One chunk of output rows [begin, end) of the block (g: the depthwise's
// geometry, g.c = ce).
void InvertedResidualRows(const Geometry& g, const BlockWeights& bw, const float* x, float* y,
                          int64_t begin, int64_t end) {
  RowCache cache(bw.we ? g.w * g.c : 0);
  std::vector<float> tile(kTile * g.c, 0.0f), pad(kTile * bw.cin, 0.0f);
  auto expand_row = [&](int64_t key, float* buf) {
    const float* xr = x + key * g.w * bw.cin;
    for (int64_t q0 = 0; q0 < g.w; q0 += kTile) {
      const int64_t rows = std::min(kTile, g.w - q0);
      const float* a = xr + q0 * bw.cin;
      if (rows < kTile) {
        std::copy(a, a + rows * bw.cin, pad.data());
        a = pad.data();
      }
      Gemm(a, bw.cin, rows, bw.cin, bw.we, g.c, bw.be, true, nullptr, 0, buf + q0 * g.c, g.c);
    }
  };
  const float* ins[9];
  const float* taps[9];
  for (int64_t unit = begin; unit < end; ++unit) {
    cache.NewUnit();
    const int64_t b = unit / g.ho, p = unit % g.ho;
    const float* row_of[3] = {nullptr, nullptr, nullptr};
    for (int64_t i = 0; i < 3; ++i) {
      const int64_t r = p * g.stride + i - g.top;
      if (r < 0 || r >= g.h) continue;
      row_of[i] = bw.we ? cache.Get(b * g.h + r, expand_row) : x + (b * g.h + r) * g.w * g.c;
    }
    float* yrow = y + unit * g.wo * bw.cout;
    const float* xrow = bw.residual ? x + unit * g.w * bw.cin : nullptr;  // stride 1: ho == h
    for (int64_t q0 = 0; q0 < g.wo; q0 += kTile) {
      const int64_t rows = std::min(kTile, g.wo - q0);
      auto edge = [&](int64_t q) {
        int count = 0;
        for (int64_t i = 0; i < 3; ++i) {
          if (row_of[i] == nullptr) continue;
          for (int64_t j = 0; j < 3; ++j) {
            const int64_t s = q * g.stride + j - g.left;
            if (s < 0 || s >= g.w) continue;
            ins[count] = row_of[i] + s * g.c;
            taps[count] = bw.kd + (i * 3 + j) * g.c;
            ++count;
          }
        }
        ForwardPixel<true>(tile.data() + (q - q0) * g.c, ins, taps, count, bw.bd, g.c);
      };
      int64_t lo, hi;
      InteriorSpan<true>(g, row_of, bw.kd, bw.bd, q0, q0 + rows, tile.data(), &lo, &hi);
      for (int64_t q = q0; q < lo; ++q) edge(q);
      for (int64_t q = hi; q < q0 + rows; ++q) edge(q);
      Gemm(tile.data(), g.c, rows, g.c, bw.wp, bw.cout, bw.bp, false,
           xrow ? xrow + q0 * bw.cout : nullptr, bw.cout, yrow + q0 * bw.cout, bw.cout);
    }
  }
}

ffi::Error InvertedResidualForward(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x,
                                   ffi::Buffer<ffi::F32> we, ffi::Buffer<ffi::F32> be,
                                   ffi::Buffer<ffi::F32> kd, ffi::Buffer<ffi::F32> bd,
                                   ffi::Buffer<ffi::F32> wp, ffi::Buffer<ffi::F32> bp,
                                   ffi::ResultBuffer<ffi::F32> y, int64_t stride,
                                   int64_t expand, int64_t residual) {
  const auto xd = x.dimensions(), wed = we.dimensions(), bed = be.dimensions(),
             wpd = wp.dimensions(), bpd = bp.dimensions();
  if (xd.size() != 4) return ffi::Error::InvalidArgument("inverted residual: x must be [B, H, W, C]");
  const int64_t cin = xd[3];
  const int64_t ce = expand ? (wed.size() == 2 ? wed[1] : -1) : cin;
  if (expand && (wed.size() != 2 || wed[0] != cin || bed.size() != 1 || bed[0] != ce))
    return ffi::Error::InvalidArgument("inverted residual: expand kernel must be [C, Ce], bias [Ce]");
  if (wpd.size() != 2 || wpd[0] != ce || bpd.size() != 1 || bpd[0] != wpd[1])
    return ffi::Error::InvalidArgument("inverted residual: project kernel must be [Ce, Cout], bias [Cout]");
  const int64_t cout = wpd[1];
  std::vector<int64_t> ed = {xd[0], xd[1], xd[2], ce};
  const ffi::Span<const int64_t> edims(ed.data(), ed.size());
  if (auto e = CheckShapes(edims, kd.dimensions(), bd.dimensions(), stride); e.failure()) return e;
  const Geometry g = MakeGeometry(edims, stride);
  if (residual && (stride != 1 || cin != cout))
    return ffi::Error::InvalidArgument("inverted residual: a residual needs stride 1 and C == Cout");
  const auto yd = y->dimensions();
  if (yd.size() != 4 || yd[0] != g.batch || yd[1] != g.ho || yd[2] != g.wo || yd[3] != cout)
    return ffi::Error::InvalidArgument("inverted residual: output has the wrong shape");
  std::vector<float> wep, bep, wpp = PackColumns(wp.typed_data(), ce, cout),
                             bpp = PackColumns(bp.typed_data(), 1, cout);
  if (expand) {
    wep = PackColumns(we.typed_data(), cin, ce);
    bep = PackColumns(be.typed_data(), 1, ce);
  }
  const BlockWeights bw{expand ? wep.data() : nullptr, expand ? bep.data() : nullptr,
                        kd.typed_data(), bd.typed_data(), wpp.data(), bpp.data(),
                        cin, ce, cout, residual != 0};
  const float* xp = x.typed_data();
  float* yp = y->typed_data();
  const int64_t units = g.batch * g.ho;
  const int64_t helpers = Helpers(pool);
  // A chunk remakes the expanded rows its first unit shares with the
  // previous chunk (2 at stride 1, 1 at stride 2): chunks of at least 16 rows
  // where the rows allow, else one chunk per thread.
  const int64_t threads = helpers + 1;
  const int64_t per_thread = std::clamp<int64_t>(units / (threads * 16), 1, 8);
  const int64_t grain = (units + threads * per_thread - 1) / (threads * per_thread);
  ParallelFor(pool, units, grain, helpers, [&](int64_t begin, int64_t end) {
    InvertedResidualRows(g, bw, xp, yp, begin, end);
  });
  return ffi::Error::Success();
}


// ---------------------------------------------------------------------------
// The backward of MobileNetV2's expand 1x1 and depthwise layers (folded BN)
// in one pass: m = x @ we is the expand's pre-activation, relu6(m + be) the
// depthwise's input (its prologue), z = relu6(depthwise(.) + bd). The
// depthwise's backward (`BackwardRows`) makes dm, the gradient of m, one
// input row at a time, and the expand's backward consumes the row at once:
//   dx[row]  = dm[row] @ we^T
//   dwe     += x[row]^T @ dm[row]   (per fixed chunk of rows, chunks summed in order)
//   dbe     += sum of dm[row]
// so dm, the block's largest gradient, is never written out and read back.
// ---------------------------------------------------------------------------

// acc[ci0 + i, c0 + 0:NV*16] += sum_{s < w} x[s, ci0 + i] * dm[s, c0 + 0:NV*16]
// for i < 4 (x rows of stride cin, dm and acc rows of stride n): a 4 x NV
// register tile, each x value broadcast once per pixel.
template <int NV>
inline void OuterProductTile(const float* x, int64_t cin, int64_t ci0, const float* dm,
                             int64_t n, int64_t c0, int64_t w, float* acc) {
  Vec16 a[4][NV];
  for (int i = 0; i < 4; ++i)
    for (int v = 0; v < NV; ++v) a[i][v] = Vec16{};
  for (int64_t s = 0; s < w; ++s) {
    Vec16 d[NV];
    for (int v = 0; v < NV; ++v) d[v] = Load(dm + s * n + c0 + v * kLanes);
    for (int i = 0; i < 4; ++i) {
      const float xv = x[s * cin + ci0 + i];
      for (int v = 0; v < NV; ++v) a[i][v] += xv * d[v];
    }
  }
  for (int i = 0; i < 4; ++i)
    for (int v = 0; v < NV; ++v) {
      float* p = acc + (ci0 + i) * n + c0 + v * kLanes;
      Store(p, Load(p) + a[i][v]);
    }
}

// `BackwardRows`' input gradient (dm, one row at a time) fed to the expand
// 1x1's backward. Needs n % 16 == 0 and cin % 4 == 0.
struct ExpandBackwardSink {
  static constexpr bool kSumPrologue = true;  // dbe, per chunk
  int64_t w, n, cin;
  const float* x;     // [rows, w, cin], the expand's input
  const float* wet;   // we^T packed [n, Padded(cin)] (`PackColumns`)
  const float* zero;  // [Padded(cin)] zeros (the Gemm's bias)
  float* dx;          // [rows, w, cin]
  float* dwe;         // [cin, n], this chunk's partial sum
  float* dbe;         // [n], this chunk's partial sum
  std::vector<float> dm;  // one row [kTile-padded w, n]

  float* Row(int64_t) { return dm.data(); }
  float* PrologueSum() { return dbe; }
  void Finish(int64_t row) {
    for (int64_t q0 = 0; q0 < w; q0 += kTile)
      Gemm(dm.data() + q0 * n, n, std::min(kTile, w - q0), n, wet, cin, zero, false, nullptr, 0,
           dx + (row * w + q0) * cin, cin);
    const float* xr = x + row * w * cin;
    for (int64_t ci0 = 0; ci0 < cin; ci0 += 4) {
      int64_t c0 = 0;
      for (; c0 + 6 * kLanes <= n; c0 += 6 * kLanes)
        OuterProductTile<6>(xr, cin, ci0, dm.data(), n, c0, w, dwe);
      for (; c0 + 3 * kLanes <= n; c0 += 3 * kLanes)
        OuterProductTile<3>(xr, cin, ci0, dm.data(), n, c0, w, dwe);
      for (; c0 + kLanes <= n; c0 += kLanes)
        OuterProductTile<1>(xr, cin, ci0, dm.data(), n, c0, w, dwe);
    }
  }
};

// (dx, dwe, dkernel, dbias, dbe) of z = relu6(depthwise(relu6(x @ we + be),
// kernel) + bias) for the cotangent dz, given m = x @ we and z.
ffi::Error ExpandDepthwiseBackward(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x,
                                   ffi::Buffer<ffi::F32> we, ffi::Buffer<ffi::F32> m,
                                   ffi::Buffer<ffi::F32> kernel, ffi::Buffer<ffi::F32> be,
                                   ffi::Buffer<ffi::F32> z, ffi::Buffer<ffi::F32> dz,
                                   ffi::ResultBuffer<ffi::F32> dx, ffi::ResultBuffer<ffi::F32> dwe,
                                   ffi::ResultBuffer<ffi::F32> dk, ffi::ResultBuffer<ffi::F32> dbias,
                                   ffi::ResultBuffer<ffi::F32> dbe, int64_t stride) {
  if (auto e = CheckShapes(m.dimensions(), kernel.dimensions(), be.dimensions(), stride);
      e.failure())
    return e;
  const Geometry g = MakeGeometry(m.dimensions(), stride);
  const auto xd = x.dimensions(), wed = we.dimensions();
  if (xd.size() != 4 || xd[0] != g.batch || xd[1] != g.h || xd[2] != g.w)
    return ffi::Error::InvalidArgument("expand+depthwise backward: x must be [B, H, W, C] like m");
  const int64_t cin = xd[3], n = g.c;
  if (wed.size() != 2 || wed[0] != cin || wed[1] != n)
    return ffi::Error::InvalidArgument("expand+depthwise backward: expand kernel must be [C, Ce]");
  if (n % kLanes || cin % 4)
    return ffi::Error::InvalidArgument(
        "expand+depthwise backward: needs Ce a multiple of 16 and C a multiple of 4");
  if (!SameShape(dz.dimensions(), g) || !SameShape(z.dimensions(), g))
    return ffi::Error::InvalidArgument("expand+depthwise backward: z or dz has the wrong shape");
  // we^T [n, cin], packed.
  std::vector<float> transposed(n * cin);
  const float* wp = we.typed_data();
  for (int64_t ci = 0; ci < cin; ++ci)
    for (int64_t c = 0; c < n; ++c) transposed[c * cin + ci] = wp[ci * n + c];
  const std::vector<float> wet = PackColumns(transposed.data(), n, cin);
  const std::vector<float> zero(Padded(cin), 0.0f);
  // Per fixed chunk of output rows: dkernel [9, n], dbias [n], dwe [cin, n],
  // dbe [n]; then summed in chunk order (bitwise repeatable).
  const int64_t per = 10 * n + cin * n + n;
  const int64_t out_rows = g.batch * g.ho;
  const int64_t grain = (out_rows + kKernelGradientChunks - 1) / kKernelGradientChunks;
  const int64_t chunks = (out_rows + grain - 1) / grain;
  std::vector<float> partial(chunks * per, 0.0f);
  ParallelFor(pool, out_rows, grain, Helpers(pool), [&](int64_t begin, int64_t end) {
    float* acc = partial.data() + (begin / grain) * per;
    ExpandBackwardSink sink{g.w, n, cin, x.typed_data(), wet.data(), zero.data(),
                            dx->typed_data(), acc + 10 * n, acc + 10 * n + cin * n,
                            std::vector<float>((g.w + kTile - 1) / kTile * kTile * n, 0.0f)};
    BackwardRows<true, true>(g, m.typed_data(), kernel.typed_data(), be.typed_data(),
                             dz.typed_data(), z.typed_data(), acc, sink, begin, end);
  });
  std::vector<float> total(per);
  SumChunks(partial, chunks, per, total.data());
  const float* t = total.data();
  std::copy(t, t + 9 * n, dk->typed_data());
  std::copy(t + 9 * n, t + 10 * n, dbias->typed_data());
  std::copy(t + 10 * n, t + 10 * n + cin * n, dwe->typed_data());
  std::copy(t + 10 * n + cin * n, t + per, dbe->typed_data());
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(StructvprDepthwiseForward, DepthwiseForward,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // x [B, H, W, C]
                                  .Arg<ffi::Buffer<ffi::F32>>()  // kernel [3, 3, C]
                                  .Arg<ffi::Buffer<ffi::F32>>()  // bias [C]
                                  .Arg<ffi::Buffer<ffi::F32>>()  // prologue bias [C]
                                  .Ret<ffi::Buffer<ffi::F32>>()  // z [B, Ho, Wo, C]
                                  .Attr<int64_t>("stride")
                                  .Attr<int64_t>("relu6")
                                  .Attr<int64_t>("prologue"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(StructvprDepthwiseBackward, DepthwiseBackward,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // x
                                  .Arg<ffi::Buffer<ffi::F32>>()  // kernel
                                  .Arg<ffi::Buffer<ffi::F32>>()  // prologue bias
                                  .Arg<ffi::Buffer<ffi::F32>>()  // z (forward output)
                                  .Arg<ffi::Buffer<ffi::F32>>()  // dz
                                  .Ret<ffi::Buffer<ffi::F32>>()  // dx
                                  .Ret<ffi::Buffer<ffi::F32>>()  // dkernel
                                  .Ret<ffi::Buffer<ffi::F32>>()  // dbias
                                  .Ret<ffi::Buffer<ffi::F32>>()  // dprologue bias
                                  .Attr<int64_t>("stride")
                                  .Attr<int64_t>("relu6")
                                  .Attr<int64_t>("prologue"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(StructvprConv3x3Forward, Conv3x3Forward,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // x [B, H, W, Cin]
                                  .Arg<ffi::Buffer<ffi::F32>>()  // kernel [3, 3, Cin, Cout]
                                  .Arg<ffi::Buffer<ffi::F32>>()  // bias [Cout]
                                  .Ret<ffi::Buffer<ffi::F32>>()  // z [B, Ho, Wo, Cout]
                                  .Attr<int64_t>("stride")
                                  .Attr<int64_t>("relu6"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(StructvprConv3x3KernelGradient, Conv3x3KernelGradient,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // x
                                  .Arg<ffi::Buffer<ffi::F32>>()  // z (forward output)
                                  .Arg<ffi::Buffer<ffi::F32>>()  // dz
                                  .Ret<ffi::Buffer<ffi::F32>>()  // dkernel
                                  .Ret<ffi::Buffer<ffi::F32>>()  // dbias
                                  .Attr<int64_t>("stride")
                                  .Attr<int64_t>("relu6"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(StructvprInvertedResidualForward, InvertedResidualForward,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // x [B, H, W, C]
                                  .Arg<ffi::Buffer<ffi::F32>>()  // expand kernel [C, Ce]
                                  .Arg<ffi::Buffer<ffi::F32>>()  // expand bias [Ce]
                                  .Arg<ffi::Buffer<ffi::F32>>()  // depthwise kernel [3, 3, Ce]
                                  .Arg<ffi::Buffer<ffi::F32>>()  // depthwise bias [Ce]
                                  .Arg<ffi::Buffer<ffi::F32>>()  // project kernel [Ce, Cout]
                                  .Arg<ffi::Buffer<ffi::F32>>()  // project bias [Cout]
                                  .Ret<ffi::Buffer<ffi::F32>>()  // y [B, Ho, Wo, Cout]
                                  .Attr<int64_t>("stride")
                                  .Attr<int64_t>("expand")
                                  .Attr<int64_t>("residual"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(StructvprExpandDepthwiseBackward, ExpandDepthwiseBackward,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // x [B, H, W, C]
                                  .Arg<ffi::Buffer<ffi::F32>>()  // expand kernel [C, Ce]
                                  .Arg<ffi::Buffer<ffi::F32>>()  // m = x @ we [B, H, W, Ce]
                                  .Arg<ffi::Buffer<ffi::F32>>()  // depthwise kernel [3, 3, Ce]
                                  .Arg<ffi::Buffer<ffi::F32>>()  // expand bias [Ce]
                                  .Arg<ffi::Buffer<ffi::F32>>()  // z [B, Ho, Wo, Ce]
                                  .Arg<ffi::Buffer<ffi::F32>>()  // dz
                                  .Ret<ffi::Buffer<ffi::F32>>()  // dx
                                  .Ret<ffi::Buffer<ffi::F32>>()  // dexpand kernel
                                  .Ret<ffi::Buffer<ffi::F32>>()  // ddepthwise kernel
                                  .Ret<ffi::Buffer<ffi::F32>>()  // ddepthwise bias
                                  .Ret<ffi::Buffer<ffi::F32>>()  // dexpand bias
                                  .Attr<int64_t>("stride"));

// The vector instruction set this library was compiled for (-march):
// `native.library_isa`, which "auto" consults (models/ops/dispatch.py).
extern "C" const char* StructvprTargetIsa() {
#if defined(__AVX512F__)
  return "avx512";
#elif defined(__AVX2__)
  return "avx2";
#elif defined(__aarch64__)
  return "aarch64";
#else
  return "other";
#endif
}
