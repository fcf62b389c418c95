// Small-GEMM building blocks of the fused CPU kernels: C[M x Np] = A[M x K] * W^T with W (N x K)
// prepacked into 16-column panels (zero-padded to Np = 16 * ceil(N / 16)), and a vectorised SiLU.
//
// Why a micro-kernel and not BLAS: the fused kernels run one GEMM per tile of ~100 edges, inside an
// OpenMP task, with the epilogue (bias, gathers, SiLU, row reduction) applied while the tile is in
// L1/L2. Each output element is a fixed sequence of FMAs over k = 0..K-1, whatever the tile size or
// the row's position in it, so results do not depend on tiling or thread count (determinism).
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define NINO_FAST_AVX2 1
#endif

namespace nino_fast::cpu {

constexpr int64_t kPanel = 16;  // output columns per packed panel (two AVX2 registers)
constexpr int64_t kRows = 6;  // edges per micro-kernel call (6 x 2 accumulators + 2 loads < 16 ymm)

inline int64_t padded(int64_t n) {
  return (n + kPanel - 1) / kPanel * kPanel;
}

// W (N x K, row-major: the torch Linear layout) packed as panels p = 0..Np/16-1 of K x 16 floats.
struct PackedB {
  int64_t k = 0, n = 0, np = 0;
  std::vector<float> data;

  PackedB() = default;
  PackedB(const float* w, int64_t n_, int64_t k_)
      : k(k_), n(n_), np(padded(n_)), data(np * k_, 0.f) {
    for (int64_t p = 0; p < np / kPanel; ++p)
      for (int64_t kk = 0; kk < k; ++kk)
        for (int64_t j = 0; j < kPanel; ++j) {
          const int64_t col = p * kPanel + j;
          data[(p * k + kk) * kPanel + j] = col < n ? w[col * k + kk] : 0.f;
        }
  }
  const float* panel(int64_t p) const { return data.data() + p * k * kPanel; }
};

// C rows [0, MR) x panel p: C[i][p*16 + j] = sum_k A[i][k] * W[p*16 + j][k]
template <int MR>
inline void micro_kernel(const float* a, int64_t lda, const float* b, int64_t k, float* c,
                         int64_t ldc) {
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
  for (int i = 0; i < MR; ++i) {
    _mm256_storeu_ps(c + i * ldc, acc0[i]);
    _mm256_storeu_ps(c + i * ldc + 8, acc1[i]);
  }
#else
  float acc[MR][kPanel] = {};
  for (int64_t kk = 0; kk < k; ++kk)
    for (int i = 0; i < MR; ++i)
      for (int j = 0; j < kPanel; ++j)
        acc[i][j] = std::fma(a[i * lda + kk], b[kk * kPanel + j], acc[i][j]);
  for (int i = 0; i < MR; ++i) std::memcpy(c + i * ldc, acc[i], sizeof(acc[i]));
#endif
}

#ifdef NINO_FAST_AVX2
// The full 6-row kernel with its 12 accumulators as named variables: with arrays, GCC may keep them
// on the stack (a store per FMA pair), which costs 3-4x. Same per-element FMA sequence as
// micro_kernel<MR>.
template <>
inline void micro_kernel<6>(const float* a, int64_t lda, const float* b, int64_t k, float* c,
                            int64_t ldc) {
  __m256 c00 = _mm256_setzero_ps(), c01 = c00, c10 = c00, c11 = c00, c20 = c00, c21 = c00,
         c30 = c00, c31 = c00, c40 = c00, c41 = c00, c50 = c00, c51 = c00;
  const float *a0 = a, *a1 = a + lda, *a2 = a + 2 * lda, *a3 = a + 3 * lda, *a4 = a + 4 * lda,
              *a5 = a + 5 * lda;
  for (int64_t kk = 0; kk < k; ++kk) {
    const __m256 b0 = _mm256_loadu_ps(b + kk * kPanel), b1 = _mm256_loadu_ps(b + kk * kPanel + 8);
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
  _mm256_storeu_ps(c, c00), _mm256_storeu_ps(c + 8, c01);
  _mm256_storeu_ps(c + ldc, c10), _mm256_storeu_ps(c + ldc + 8, c11);
  _mm256_storeu_ps(c + 2 * ldc, c20), _mm256_storeu_ps(c + 2 * ldc + 8, c21);
  _mm256_storeu_ps(c + 3 * ldc, c30), _mm256_storeu_ps(c + 3 * ldc + 8, c31);
  _mm256_storeu_ps(c + 4 * ldc, c40), _mm256_storeu_ps(c + 4 * ldc + 8, c41);
  _mm256_storeu_ps(c + 5 * ldc, c50), _mm256_storeu_ps(c + 5 * ldc + 8, c51);
}
#endif

// C (m x Np, leading dimension ldc >= Np) = A (m x K, leading dimension lda) * W^T
inline void gemm_tile(const float* a, int64_t lda, int64_t m, const PackedB& w, float* c,
                      int64_t ldc) {
  for (int64_t p = 0; p < w.np / kPanel; ++p) {
    const float* b = w.panel(p);
    int64_t i = 0;
    for (; i + kRows <= m; i += kRows)
      micro_kernel<kRows>(a + i * lda, lda, b, w.k, c + i * ldc + p * kPanel, ldc);
    const int64_t rest = m - i;
    const float* ar = a + i * lda;
    float* cr = c + i * ldc + p * kPanel;
    switch (rest) {  // the same per-element FMA sequence as the 6-row kernel
      case 5:
        micro_kernel<5>(ar, lda, b, w.k, cr, ldc);
        break;
      case 4:
        micro_kernel<4>(ar, lda, b, w.k, cr, ldc);
        break;
      case 3:
        micro_kernel<3>(ar, lda, b, w.k, cr, ldc);
        break;
      case 2:
        micro_kernel<2>(ar, lda, b, w.k, cr, ldc);
        break;
      case 1:
        micro_kernel<1>(ar, lda, b, w.k, cr, ldc);
        break;
      default:
        break;
    }
  }
}

// ---- SiLU: x * sigmoid(x) with an exp accurate to ~2 ulp (the goldens need ~1e-6 relative
// overall) ----
#ifdef NINO_FAST_AVX2
inline __m256 exp_avx2(__m256 x) {
  x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-87.3f)), _mm256_set1_ps(88.3f));
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  // r = x - n * ln2, with ln2 split in two for accuracy
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 p = _mm256_set1_ps(1.9875691500e-4f);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
  p = _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.f)));
  const __m256i e =
      _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(p, _mm256_castsi256_ps(e));
}

inline __m256 silu_avx2(__m256 x) {
  const __m256 one = _mm256_set1_ps(1.f);
  return _mm256_div_ps(x, _mm256_add_ps(one, exp_avx2(_mm256_sub_ps(_mm256_setzero_ps(), x))));
}
#endif

inline float silu(float x) {
  return x / (1.f + std::exp(-x));
}

// y[0..n) = silu(y[0..n)) in place
inline void silu_inplace(float* y, int64_t n) {
  int64_t j = 0;
#ifdef NINO_FAST_AVX2
  for (; j + 8 <= n; j += 8) _mm256_storeu_ps(y + j, silu_avx2(_mm256_loadu_ps(y + j)));
#endif
  for (; j < n; ++j) y[j] = silu(y[j]);
}

}  // namespace nino_fast::cpu
