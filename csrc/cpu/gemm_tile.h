// Small-GEMM building blocks of the fused CPU kernels: acc[M x Np] = A[M x K] * W^T with W (N x K)
// prepacked into 16-column panels (zero-padded to Np = 16 * ceil(N / 16)), handed to an epilogue
// functor while still in registers, plus a vectorised SiLU.
//
// Why a micro-kernel and not BLAS: the fused kernels run one GEMM per tile of ~50 edges, inside a
// parallel task, and apply the epilogue (bias, gathers, SiLU, row reduction) to each block of
// accumulators before it leaves the registers: no extra pass over the tile. Each output element is
// a fixed sequence of FMAs over k = 0..K-1 starting from zero, whatever the tile size, the row's
// position in it or the instruction set (AVX-512, AVX2, scalar), so results do not depend on
// tiling, thread count or build (determinism).
//
// The epilogue is called as ep(i, col0, v): row i of the tile, columns col0..col0+15 as one V16
// (16 floats: one AVX-512 register, or two AVX2 registers). For each column, rows come in
// increasing order (so an epilogue may reduce over rows in edge order); nothing else about the
// order is promised (the AVX-512 kernel interleaves two panels).
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>
#include <new>
#include <vector>

#if defined(__AVX2__) && defined(__FMA__)
#if defined(__GNUC__) && !defined(__clang__)
// GCC 12's AVX-512 intrinsics (e.g. _mm512_max_ps) pass a self-initialised "undefined" vector as
// the masked-off source; once inlined, -Wmaybe-uninitialized reports it (GCC bug 105593). Not our
// code.
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif
#include <immintrin.h>
#define NINO_FAST_AVX2 1
#endif
#if defined(NINO_FAST_AVX2) && defined(__AVX512F__)
#define NINO_FAST_AVX512 1
#endif

namespace nino_fast::cpu {

#if defined(__GNUC__)
#define NINO_FAST_INLINE inline __attribute__((always_inline))
#define NINO_FAST_LAMBDA_INLINE __attribute__((always_inline))
#else
#define NINO_FAST_INLINE inline
#define NINO_FAST_LAMBDA_INLINE
#endif

// output columns per packed panel (one AVX-512 / two AVX2 registers)
constexpr int64_t kPanel = 16;

// The instruction set the kernels were compiled for (reported by torch.ops.nino_fast.cpu_isa).
inline const char* compiled_isa() {
#if defined(NINO_FAST_AVX512)
  return "avx512";
#elif defined(NINO_FAST_AVX2)
  return "avx2";
#else
  return "scalar";
#endif
}

// A float buffer whose data starts on a 64-byte (cache line) boundary. The kernels' tiles, packed
// weights and row sums have rows of multiples of 16 floats, so every 64-byte vector load and store
// of them stays within one line; with std::vector's 16-byte alignment most of them straddled two
// lines, and the micro-kernel's B loads alone cost ~8% of its time.
template <class T>
struct CacheLineAllocator {
  using value_type = T;
  CacheLineAllocator() = default;
  template <class U>
  CacheLineAllocator(const CacheLineAllocator<U>&) {}
  T* allocate(std::size_t n) {
    return static_cast<T*>(::operator new(n * sizeof(T), std::align_val_t(64)));
  }
  void deallocate(T* p, std::size_t) { ::operator delete(p, std::align_val_t(64)); }
  template <class U>
  bool operator==(const CacheLineAllocator<U>&) const {
    return true;
  }
};
using Floats = std::vector<float, CacheLineAllocator<float>>;

inline int64_t padded(int64_t n) {
  return (n + kPanel - 1) / kPanel * kPanel;
}

// ---- 8-float vectors: AVX2 registers, or a portable struct with the same operations ----
#ifdef NINO_FAST_AVX2
using V8 = __m256;
inline V8 vld(const float* p) {
  return _mm256_loadu_ps(p);
}
inline void vst(float* p, V8 v) {
  _mm256_storeu_ps(p, v);
}
inline V8 vzero() {
  return _mm256_setzero_ps();
}
inline V8 vset1(float x) {
  return _mm256_set1_ps(x);
}
inline V8 vadd(V8 a, V8 b) {
  return _mm256_add_ps(a, b);
}
inline V8 vmul(V8 a, V8 b) {
  return _mm256_mul_ps(a, b);
}
inline V8 vfma(V8 a, V8 b, V8 c) {  // a * b + c, one rounding
  return _mm256_fmadd_ps(a, b, c);
}
#else
struct V8 {
  float x[8];
};
inline V8 vld(const float* p) {
  V8 v;
  std::memcpy(v.x, p, sizeof(v.x));
  return v;
}
inline void vst(float* p, V8 v) {
  std::memcpy(p, v.x, sizeof(v.x));
}
inline V8 vzero() {
  return V8{};
}
inline V8 vset1(float x) {
  V8 v;
  for (float& e : v.x) e = x;
  return v;
}
inline V8 vadd(V8 a, V8 b) {
  for (int i = 0; i < 8; ++i) a.x[i] += b.x[i];
  return a;
}
inline V8 vmul(V8 a, V8 b) {
  for (int i = 0; i < 8; ++i) a.x[i] *= b.x[i];
  return a;
}
inline V8 vfma(V8 a, V8 b, V8 c) {
  for (int i = 0; i < 8; ++i) c.x[i] = std::fma(a.x[i], b.x[i], c.x[i]);
  return c;
}
#endif

// Prefetch the 64-byte line at p into the caches (a hint; no effect on results). The fused kernels
// prefetch the next tile's A rows and gathered rows from the current tile's epilogues, a line per
// call (fused_common.h: NextTilePrefetch): the micro-kernel's loop is too long for out-of-order
// execution to overlap a gather's cache miss on its own.
NINO_FAST_INLINE void prefetch_line(const float* p) {
#if defined(__GNUC__)
  __builtin_prefetch(p, 0, 2);
#endif
}

// How many consecutive panels a micro-kernel reads together, for `left` panels still to go: four
// while four remain, then two, then one (AVX-512); one (AVX2 and scalar builds).
inline int64_t panel_group(int64_t left) {
#ifdef NINO_FAST_AVX512
  return left >= 4 ? 4 : left >= 2 ? 2 : 1;
#else
  (void)left;
  return 1;
#endif
}

// W (N x K, row-major: the torch Linear layout) packed as panels p = 0..Np/16-1 of K x 16 floats,
// zero-padded, in the groups of panel_group: within a group of g panels, row kk of its panel j is
// at (kk * g + j) * 16 from the group's start, so the micro-kernel reads the g vectors of one k at
// constant offsets from one pointer (separate panel pointers did not fit in the general registers
// next to the A rows: the compiler reloaded them from the stack on every k).
struct PackedB {
  int64_t k = 0, n = 0, np = 0;
  Floats data;

  PackedB() = default;
  PackedB(const float* w, int64_t n_, int64_t k_)
      : k(k_), n(n_), np(padded(n_)), data(np * k_, 0.f) {
    const int64_t panels = np / kPanel;
    for (int64_t p0 = 0, g = 0; p0 < panels; p0 += g) {
      g = panel_group(panels - p0);
      float* group = data.data() + p0 * k * kPanel;
      for (int64_t kk = 0; kk < k; ++kk)
        for (int64_t j = 0; j < g; ++j)
          for (int64_t lane = 0; lane < kPanel; ++lane) {
            const int64_t col = (p0 + j) * kPanel + lane;
            group[(kk * g + j) * kPanel + lane] = col < n ? w[col * k + kk] : 0.f;
          }
    }
  }
  // the start of panel p's group (p must start one)
  const float* panel(int64_t p) const { return data.data() + p * k * kPanel; }
};

// ---- SiLU: x / (1 + exp(-x)), with an exp(-x) accurate to ~1 ulp (the goldens need ~1e-6 relative
// overall). The AVX-512 and AVX2 versions run the same operations on the same constants (the same
// bits): exp(-x) = 2^n p(u) with n = round(-x log2 e), taken from the integer grid of a float
// near 1.5 * 2^23 (one FMA, no round instruction), u = x + n ln2 (ln2 split in two for accuracy)
// and p(u) = exp(-u) as a degree-6 minimax polynomial (|rel. error| < 4e-9 on |u| <= ln2 / 2),
// scaled by 2^n with scalef (AVX-512) or exponent bits (AVX2). x is clamped to [-89, 87.3] inside
// the exp only: n stays in [-126, 128], a normal float or (n = 128, x < -88.38) infinity on both
// paths; beyond the clamp 1 + exp(-x) is exactly 1 (x > 87.3: SiLU(x) = x) or infinite (SiLU(x) =
// -0, where the exact value is below 3e-37 in magnitude). ----
struct ExpConst {
  static constexpr float lo = -89.f, hi = 87.3f, neg_log2e = -1.44269504088896341f;
  // 1.5 * 2^23 + 127: fma(x, neg_log2e, shift) rounds to an integer; its low bits are n + 127
  static constexpr float shift = 12583039.f;
  static constexpr float ln2_hi = 0.693359375f, ln2_lo = -2.12194440e-4f;
  // exp(-u) = sum_i q[6 - i] u^i (minimax for exp on [-ln2/2, ln2/2], odd powers negated)
  static constexpr float q[7] = {1.387107535e-3f,
                                 -8.369540796e-3f,
                                 4.166741669e-2f,
                                 -1.666651219e-1f,
                                 4.999999702e-1f,
                                 -1.f,
                                 1.f};
};

#ifdef NINO_FAST_AVX2
NINO_FAST_INLINE __m256 exp_neg_avx2(__m256 x) {
  using C = ExpConst;
  x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(C::lo)), _mm256_set1_ps(C::hi));
  const __m256 k = _mm256_fmadd_ps(x, _mm256_set1_ps(C::neg_log2e), _mm256_set1_ps(C::shift));
  const __m256 n = _mm256_sub_ps(k, _mm256_set1_ps(C::shift));
  __m256 u = _mm256_fmadd_ps(n, _mm256_set1_ps(C::ln2_hi), x);
  u = _mm256_fmadd_ps(n, _mm256_set1_ps(C::ln2_lo), u);
  __m256 p = _mm256_set1_ps(C::q[0]);
#pragma GCC unroll 6
  for (int i = 1; i < 7; ++i) p = _mm256_fmadd_ps(p, u, _mm256_set1_ps(C::q[i]));
  return _mm256_mul_ps(p, _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_castps_si256(k), 23)));
}

NINO_FAST_INLINE __m256 silu_avx2(__m256 x) {
  return _mm256_div_ps(x, _mm256_add_ps(_mm256_set1_ps(1.f), exp_neg_avx2(x)));
}
#endif

#ifdef NINO_FAST_AVX512
NINO_FAST_INLINE __m512 exp_neg_avx512(__m512 x) {
  using C = ExpConst;
  x = _mm512_min_ps(_mm512_max_ps(x, _mm512_set1_ps(C::lo)), _mm512_set1_ps(C::hi));
  const __m512 k = _mm512_fmadd_ps(x, _mm512_set1_ps(C::neg_log2e), _mm512_set1_ps(C::shift));
  const __m512 n = _mm512_sub_ps(k, _mm512_set1_ps(C::shift));
  __m512 u = _mm512_fmadd_ps(n, _mm512_set1_ps(C::ln2_hi), x);
  u = _mm512_fmadd_ps(n, _mm512_set1_ps(C::ln2_lo), u);
  __m512 p = _mm512_set1_ps(C::q[0]);
#pragma GCC unroll 6
  for (int i = 1; i < 7; ++i) p = _mm512_fmadd_ps(p, u, _mm512_set1_ps(C::q[i]));
  return _mm512_scalef_ps(p, n);
}

NINO_FAST_INLINE __m512 silu_avx512(__m512 x) {
  return _mm512_div_ps(x, _mm512_add_ps(_mm512_set1_ps(1.f), exp_neg_avx512(x)));
}
#endif

inline float silu(float x) {
  return x / (1.f + std::exp(-x));
}

NINO_FAST_INLINE V8 vsilu(V8 x) {
#ifdef NINO_FAST_AVX2
  return silu_avx2(x);
#else
  for (float& e : x.x) e = silu(e);
  return x;
#endif
}

// ---- 16-float vectors (one packed panel row), the unit the epilogues work in ----
#ifdef NINO_FAST_AVX512
using V16 = __m512;
NINO_FAST_INLINE V16 vld16(const float* p) {
  return _mm512_loadu_ps(p);
}
NINO_FAST_INLINE void vst16(float* p, V16 v) {
  _mm512_storeu_ps(p, v);
}
NINO_FAST_INLINE V16 vzero16() {
  return _mm512_setzero_ps();
}
NINO_FAST_INLINE V16 vset16(float x) {
  return _mm512_set1_ps(x);
}
NINO_FAST_INLINE V16 vadd(V16 a, V16 b) {
  return _mm512_add_ps(a, b);
}
NINO_FAST_INLINE V16 vmul(V16 a, V16 b) {
  return _mm512_mul_ps(a, b);
}
NINO_FAST_INLINE V16 vfma(V16 a, V16 b, V16 c) {
  return _mm512_fmadd_ps(a, b, c);
}
NINO_FAST_INLINE V16 vsilu(V16 x) {
  return silu_avx512(x);
}
NINO_FAST_INLINE __mmask16 tail_mask(int64_t valid) {
  return valid >= kPanel ? __mmask16(0xFFFF) : __mmask16((1u << valid) - 1u);
}
// 16 floats at p, of which only the first `valid` exist (the rest read as 0)
NINO_FAST_INLINE V16 load16(const float* p, int64_t valid) {
  return valid >= kPanel ? _mm512_loadu_ps(p) : _mm512_maskz_loadu_ps(tail_mask(valid), p);
}
// store the first `valid` of 16 floats at p
NINO_FAST_INLINE void store16(float* p, int64_t valid, V16 v) {
  if (valid >= kPanel) return _mm512_storeu_ps(p, v);
  _mm512_mask_storeu_ps(p, tail_mask(valid), v);
}
#else
struct V16 {
  V8 lo, hi;
};
NINO_FAST_INLINE V16 vld16(const float* p) {
  return {vld(p), vld(p + 8)};
}
NINO_FAST_INLINE void vst16(float* p, V16 v) {
  vst(p, v.lo), vst(p + 8, v.hi);
}
NINO_FAST_INLINE V16 vzero16() {
  return {vzero(), vzero()};
}
NINO_FAST_INLINE V16 vset16(float x) {
  return {vset1(x), vset1(x)};
}
NINO_FAST_INLINE V16 vadd(V16 a, V16 b) {
  return {vadd(a.lo, b.lo), vadd(a.hi, b.hi)};
}
NINO_FAST_INLINE V16 vmul(V16 a, V16 b) {
  return {vmul(a.lo, b.lo), vmul(a.hi, b.hi)};
}
NINO_FAST_INLINE V16 vfma(V16 a, V16 b, V16 c) {
  return {vfma(a.lo, b.lo, c.lo), vfma(a.hi, b.hi, c.hi)};
}
NINO_FAST_INLINE V16 vsilu(V16 x) {
  return {vsilu(x.lo), vsilu(x.hi)};
}
NINO_FAST_INLINE V16 load16(const float* p, int64_t valid) {
  if (valid >= kPanel) return vld16(p);
  alignas(64) float t[kPanel] = {};
  std::memcpy(t, p, sizeof(float) * valid);
  return vld16(t);
}
NINO_FAST_INLINE void store16(float* p, int64_t valid, V16 v) {
  if (valid >= kPanel) return vst16(p, v);
  alignas(64) float t[kPanel];
  vst16(t, v);
  std::memcpy(p, t, sizeof(float) * valid);
}
#endif

// store16 for results that are not read again soon (large outputs written once): full, aligned
// 16-float blocks bypass the cache (non-temporal: no read-for-ownership of the line, which a
// write-once output would otherwise pay in memory traffic). A thread's streamed stores are made
// visible to the others by stream_fence(), which each worker calls before it finishes.
NINO_FAST_INLINE void store16_stream(float* p, int64_t valid, V16 v) {
#if defined(NINO_FAST_AVX512)
  if (valid >= kPanel && (reinterpret_cast<uintptr_t>(p) & 63) == 0) return _mm512_stream_ps(p, v);
#elif defined(NINO_FAST_AVX2)
  if (valid >= kPanel && (reinterpret_cast<uintptr_t>(p) & 31) == 0)
    return _mm256_stream_ps(p, v.lo), _mm256_stream_ps(p + 8, v.hi);
#endif
  store16(p, valid, v);
}
inline void stream_fence() {
#if defined(NINO_FAST_AVX2)
  _mm_sfence();
#endif
}

// ---- micro-kernels ----
#ifdef NINO_FAST_AVX512
// acc[i][p] = sum_k A[i][k] * B_p[k] for rows 0..MR-1 of A and the NP panels of a group (b: its
// start, PackedB layout): MR x NP accumulators (at most 24 of the 32 zmm registers), one broadcast
// of A per row and k. Compiled out of line, once per shape: inlined into the fused kernels, their
// epilogues' state kept the general registers busy and the compiler reloaded the A row pointers
// from the stack on every k. Alone, the loop has the registers to itself; the accumulators go back
// through memory once per block (24 stores and loads against 3,072 FMAs at K = 128; even at K = 5,
// the film_mean GEMMs, measured no slower than inlined). Hidden: called directly, not through the
// shared library's PLT.
template <int MR, int NP>
__attribute__((noinline, visibility("hidden"))) void block_acc(const float* a, int64_t lda,
                                                               const float* b, int64_t k,
                                                               __m512 (&acc)[MR][NP]) {
  // in a local array, copied out at the end: __m512 may alias float, so updating acc in place
  // would store every FMA's result in case a or b read it
  __m512 c[MR][NP];
#pragma GCC unroll 16
  for (int i = 0; i < MR; ++i)
#pragma GCC unroll 4
    for (int p = 0; p < NP; ++p) c[i][p] = _mm512_setzero_ps();
  for (int64_t kk = 0; kk < k; ++kk, b += NP * kPanel) {
    __m512 bv[NP];
#pragma GCC unroll 4
    for (int p = 0; p < NP; ++p) bv[p] = _mm512_load_ps(b + p * kPanel);
#pragma GCC unroll 16
    for (int i = 0; i < MR; ++i) {
      const __m512 x = _mm512_set1_ps(a[i * lda + kk]);
#pragma GCC unroll 4
      for (int p = 0; p < NP; ++p) c[i][p] = _mm512_fmadd_ps(x, bv[p], c[i][p]);
    }
  }
#pragma GCC unroll 16
  for (int i = 0; i < MR; ++i)
#pragma GCC unroll 4
    for (int p = 0; p < NP; ++p) acc[i][p] = c[i][p];
}

// Rows [i0, i0 + MR) x the NP panels of a group (columns col0..col0 + 16 NP - 1): block_acc, then
// ep(row, column block) per panel, rows in increasing order.
template <int MR, int NP, class Ep>
NINO_FAST_INLINE void micro_kernel(const float* a, int64_t lda, const float* b, int64_t k,
                                   int64_t i0, int64_t col0, Ep& ep) {
  __m512 acc[MR][NP];
  block_acc<MR, NP>(a, lda, b, k, acc);
#pragma GCC unroll 4
  for (int p = 0; p < NP; ++p)
#pragma GCC unroll 16
    for (int i = 0; i < MR; ++i) ep(i0 + i, col0 + p * kPanel, acc[i][p]);
}

// Rows 0..m-1 against NP panels starting at b: blocks of 6 rows for a group of four panels (6 x 4
// accumulators: 4 B loads and 6 broadcasts per k), else of 12 then 8 rows; then 4, 2, 1.
template <int NP, class Ep>
NINO_FAST_INLINE void gemm_panels(const float* a, int64_t lda, int64_t m, const float* b, int64_t k,
                                  int64_t col0, Ep& ep) {
  int64_t i = 0;
  if constexpr (NP == 4) {
    for (; i + 6 <= m; i += 6) micro_kernel<6, NP>(a + i * lda, lda, b, k, i, col0, ep);
  } else {
    for (; i + 12 <= m; i += 12) micro_kernel<12, NP>(a + i * lda, lda, b, k, i, col0, ep);
    if (i + 8 <= m) micro_kernel<8, NP>(a + i * lda, lda, b, k, i, col0, ep), i += 8;
  }
  if (i + 4 <= m) micro_kernel<4, NP>(a + i * lda, lda, b, k, i, col0, ep), i += 4;
  if (i + 2 <= m) micro_kernel<2, NP>(a + i * lda, lda, b, k, i, col0, ep), i += 2;
  if (i < m) micro_kernel<1, NP>(a + i * lda, lda, b, k, i, col0, ep);
}

// For each group of panels (panel_group), rows 0..m-1 of A (m x K, leading dimension lda) times
// the group, handed to ep.
template <class Ep>
inline void gemm_ep(const float* a, int64_t lda, int64_t m, const PackedB& w, const Ep& ep_in) {
  // A local copy: the epilogue's vector stores may alias any memory, so the caller's functor
  // (behind a reference) would have its fields reloaded after every store; a copy whose address
  // never escapes keeps them in registers.
  Ep ep = ep_in;
  const int64_t panels = w.np / kPanel;
  for (int64_t p = 0, g = 0; p < panels; p += g) {
    g = panel_group(panels - p);
    if (g == 4)
      gemm_panels<4>(a, lda, m, w.panel(p), w.k, p * kPanel, ep);
    else if (g == 2)
      gemm_panels<2>(a, lda, m, w.panel(p), w.k, p * kPanel, ep);
    else
      gemm_panels<1>(a, lda, m, w.panel(p), w.k, p * kPanel, ep);
  }
}
#else
// Rows [i0, i0 + MR) x one panel (columns col0..col0+15): acc = sum_k A[i][k] * B[k][:], then
// ep(i, col0, acc) for each row in order. The generic version (remainder rows, portable build).
template <int MR, class Ep>
inline void micro_kernel(const float* a, int64_t lda, const float* b, int64_t k, int64_t i0,
                         int64_t col0, Ep& ep) {
#ifdef NINO_FAST_AVX2
  __m256 acc0[MR], acc1[MR];
  for (int i = 0; i < MR; ++i) acc0[i] = acc1[i] = _mm256_setzero_ps();
  for (int64_t kk = 0; kk < k; ++kk) {
    const __m256 b0 = _mm256_loadu_ps(b + kk * kPanel), b1 = _mm256_loadu_ps(b + kk * kPanel + 8);
    for (int i = 0; i < MR; ++i) {
      const __m256 ai = _mm256_broadcast_ss(a + i * lda + kk);
      acc0[i] = _mm256_fmadd_ps(ai, b0, acc0[i]);
      acc1[i] = _mm256_fmadd_ps(ai, b1, acc1[i]);
    }
  }
  for (int i = 0; i < MR; ++i) ep(i0 + i, col0, V16{acc0[i], acc1[i]});
#else
  float acc[MR][kPanel] = {};
  for (int64_t kk = 0; kk < k; ++kk)
    for (int i = 0; i < MR; ++i)
      for (int j = 0; j < kPanel; ++j)
        acc[i][j] = std::fma(a[i * lda + kk], b[kk * kPanel + j], acc[i][j]);
  for (int i = 0; i < MR; ++i) ep(i0 + i, col0, V16{vld(acc[i]), vld(acc[i] + 8)});
#endif
}

#ifdef NINO_FAST_AVX2
// The full 6-row AVX2 block: acc[2 i + h] = sum_k A[i][k] * B[k][8 h .. 8 h + 7] for rows i = 0..5,
// the 12 accumulators as named variables (with arrays, GCC may keep them on the stack: a store per
// FMA pair, 3-4x slower). Out of line for the reason given at the AVX-512 block_acc: inlined into
// a fused kernel, the epilogue's state competed for the 16 ymm registers and the compiler spilled
// accumulators inside the K loop (measured on Zen 3: three of the twelve, reloaded and stored on
// every k). Same per-element FMA sequence as micro_kernel<MR>.
__attribute__((noinline, visibility("hidden"))) inline void block_acc6(const float* a, int64_t lda,
                                                                       const float* b, int64_t k,
                                                                       __m256 (&acc)[12]) {
  __m256 c00 = _mm256_setzero_ps(), c01 = c00, c10 = c00, c11 = c00, c20 = c00, c21 = c00,
         c30 = c00, c31 = c00, c40 = c00, c41 = c00, c50 = c00, c51 = c00;
  const float *a0 = a, *a1 = a + lda, *a2 = a + 2 * lda, *a3 = a + 3 * lda, *a4 = a + 4 * lda,
              *a5 = a + 5 * lda;
  for (int64_t kk = 0; kk < k; ++kk, b += kPanel) {
    const __m256 b0 = _mm256_loadu_ps(b), b1 = _mm256_loadu_ps(b + 8);
    __m256 x = _mm256_broadcast_ss(a0 + kk);
    c00 = _mm256_fmadd_ps(x, b0, c00), c01 = _mm256_fmadd_ps(x, b1, c01);
    x = _mm256_broadcast_ss(a1 + kk);
    c10 = _mm256_fmadd_ps(x, b0, c10), c11 = _mm256_fmadd_ps(x, b1, c11);
    x = _mm256_broadcast_ss(a2 + kk);
    c20 = _mm256_fmadd_ps(x, b0, c20), c21 = _mm256_fmadd_ps(x, b1, c21);
    x = _mm256_broadcast_ss(a3 + kk);
    c30 = _mm256_fmadd_ps(x, b0, c30), c31 = _mm256_fmadd_ps(x, b1, c31);
    x = _mm256_broadcast_ss(a4 + kk);
    c40 = _mm256_fmadd_ps(x, b0, c40), c41 = _mm256_fmadd_ps(x, b1, c41);
    x = _mm256_broadcast_ss(a5 + kk);
    c50 = _mm256_fmadd_ps(x, b0, c50), c51 = _mm256_fmadd_ps(x, b1, c51);
  }
  acc[0] = c00, acc[1] = c01, acc[2] = c10, acc[3] = c11, acc[4] = c20, acc[5] = c21;
  acc[6] = c30, acc[7] = c31, acc[8] = c40, acc[9] = c41, acc[10] = c50, acc[11] = c51;
}

template <class Ep>
NINO_FAST_INLINE void micro_kernel6(const float* a, int64_t lda, const float* b, int64_t k,
                                    int64_t i0, int64_t col0, Ep& ep) {
  __m256 acc[12];
  block_acc6(a, lda, b, k, acc);
#pragma GCC unroll 6
  for (int i = 0; i < 6; ++i) ep(i0 + i, col0, V16{acc[2 * i], acc[2 * i + 1]});
}
#else
template <class Ep>
inline void micro_kernel6(const float* a, int64_t lda, const float* b, int64_t k, int64_t i0,
                          int64_t col0, Ep& ep) {
  micro_kernel<6>(a, lda, b, k, i0, col0, ep);
}
#endif

// For each panel, rows 0..m-1 of A (m x K, leading dimension lda) times the panel, handed to ep
// (copied, as in the AVX-512 version).
template <class Ep>
inline void gemm_ep(const float* a, int64_t lda, int64_t m, const PackedB& w, const Ep& ep_in) {
  Ep ep = ep_in;
  for (int64_t p = 0; p < w.np / kPanel; ++p) {
    const float* b = w.panel(p);
    const int64_t col0 = p * kPanel;
    int64_t i = 0;
    for (; i + 6 <= m; i += 6) micro_kernel6(a + i * lda, lda, b, w.k, i, col0, ep);
    const float* ar = a + i * lda;
    switch (m - i) {  // the same per-element FMA sequence as the 6-row kernel
      case 5:
        micro_kernel<5>(ar, lda, b, w.k, i, col0, ep);
        break;
      case 4:
        micro_kernel<4>(ar, lda, b, w.k, i, col0, ep);
        break;
      case 3:
        micro_kernel<3>(ar, lda, b, w.k, i, col0, ep);
        break;
      case 2:
        micro_kernel<2>(ar, lda, b, w.k, i, col0, ep);
        break;
      case 1:
        micro_kernel<1>(ar, lda, b, w.k, i, col0, ep);
        break;
      default:
        break;
    }
  }
}
#endif

// y[0..n) += x[0..n)
inline void add_inplace(float* y, const float* x, int64_t n) {
  int64_t j = 0;
  for (; j + kPanel <= n; j += kPanel) vst16(y + j, vadd(vld16(y + j), vld16(x + j)));
  for (; j + 8 <= n; j += 8) vst(y + j, vadd(vld(y + j), vld(x + j)));
  for (; j < n; ++j) y[j] += x[j];
}

}  // namespace nino_fast::cpu
