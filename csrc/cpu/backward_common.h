// Shared pieces of the fused CPU backward kernels (film_mean_backward, edge_mlp_backward,
// edge_film_mean_backward): SiLU's derivative, weight gradients as register-blocked outer products
// over a tile of edges, deterministic per-chunk partial sums, the row-task tile loop and the FiLM
// ops' row-level terms (MeanGrad), and a column-parallel scatter of per-edge rows into node / type
// tables, run after each wave of work units on that wave's rows (run_waves, WaveRows).
//
// Determinism: every reduction over edges runs in a fixed order that depends on the edge count
// only, never on the thread count or on which thread ran what. Weight gradients: each chunk of
// tiles (chunk_tiles) or row task sums its tiles in edge order into its own partial, and the
// partials are added in a pairwise tree fixed by their count. Scatters: each 16-column block is
// owned by one thread, which visits the edges in order (out[idx[e]] += v[e], e = 0..E-1: the order
// of a sequential index_add_).
#pragma once

#include <ATen/Parallel.h>
#include <torch/types.h>

#include <algorithm>
#include <cstdint>
#include <utility>
#include <vector>

#include "cpu/fused_common.h"
#include "cpu/gemm_tile.h"

namespace nino_fast::cpu {

constexpr int64_t kChunkTiles = 32;  // tiles per deterministic weight-gradient partial, at least
constexpr int64_t kMaxChunks = 256;  // and at most this many partials (memory: a few MB)

// Tiles per chunk for n_tiles tiles: kChunkTiles, more when there would be over kMaxChunks chunks
// (a function of the edge count only, so the reduction order still is).
inline int64_t chunk_tiles(int64_t n_tiles) {
  return std::max(kChunkTiles, (n_tiles + kMaxChunks - 1) / kMaxChunks);
}

// s'(x) = sigmoid(x) (1 + x (1 - sigmoid(x))), SiLU's derivative (the same exp as vsilu).
NINO_FAST_INLINE V16 vsilu_grad(V16 x) {
#if defined(NINO_FAST_AVX512)
  const __m512 one = _mm512_set1_ps(1.f);
  const __m512 sg = _mm512_div_ps(one, _mm512_add_ps(one, exp_neg_avx512(x)));
  return _mm512_mul_ps(sg, _mm512_fmadd_ps(x, _mm512_sub_ps(one, sg), one));
#elif defined(NINO_FAST_AVX2)
  const __m256 one = _mm256_set1_ps(1.f);
  auto half = [&](__m256 v) {
    const __m256 sg = _mm256_div_ps(one, _mm256_add_ps(one, exp_neg_avx2(v)));
    return _mm256_mul_ps(sg, _mm256_fmadd_ps(v, _mm256_sub_ps(one, sg), one));
  };
  return V16{half(x.lo), half(x.hi)};
#else
  alignas(64) float t[kPanel];
  vst16(t, x);
  for (float& v : t) {
    const float sg = 1.f / (1.f + std::exp(-v));
    v = sg * std::fma(v, 1.f - sg, 1.f);
  }
  return vld16(t);
#endif
}

// OB outputs o0.. x PB column blocks (from column col0) of outer_acc: OB * PB accumulators in
// registers (compile-time sizes, no branch in the row loop), started at zero, fed rows in order.
template <int OB, int PB>
NINO_FAST_INLINE void outer_block(const float* g, int64_t ldg, const float* x, int64_t ldx,
                                  int64_t col0, int64_t nin, int64_t m, float* p, int64_t ldp) {
  V16 acc[OB][PB];
#pragma GCC unroll 8
  for (int o = 0; o < OB; ++o)
#pragma GCC unroll 4
    for (int q = 0; q < PB; ++q) acc[o][q] = vzero16();
  const int64_t last_valid = nin - (col0 + (PB - 1) * kPanel);  // the last block may be partial
  for (int64_t i = 0; i < m; ++i) {
    const float* xi = x + i * ldx + col0;
    V16 xv[PB];
#pragma GCC unroll 4
    for (int q = 0; q + 1 < PB; ++q) xv[q] = vld16(xi + q * kPanel);
    xv[PB - 1] = load16(xi + (PB - 1) * kPanel, last_valid);
    const float* gi = g + i * ldg;
#pragma GCC unroll 8
    for (int o = 0; o < OB; ++o) {
      const V16 gv = vset16(gi[o]);
#pragma GCC unroll 4
      for (int q = 0; q < PB; ++q) acc[o][q] = vfma(gv, xv[q], acc[o][q]);
    }
  }
#pragma GCC unroll 8
  for (int o = 0; o < OB; ++o)
#pragma GCC unroll 4
    for (int q = 0; q < PB; ++q) {
      float* po = p + o * ldp + col0 + q * kPanel;
      vst16(po, vadd(vld16(po), acc[o][q]));
    }
}

// OB outputs x the column blocks from q0 on: register blocks of PB column blocks, what is left in
// blocks of PB - 1, PB - 2, ...
template <int OB, int PB>
NINO_FAST_INLINE void outer_cols(const float* g, int64_t ldg, const float* x, int64_t ldx,
                                 int64_t nin, int64_t m, float* p, int64_t ldp, int64_t q0 = 0) {
  const int64_t panels = padded(nin) / kPanel;
  for (; q0 + PB <= panels; q0 += PB)
    outer_block<OB, PB>(g, ldg, x, ldx, q0 * kPanel, nin, m, p, ldp);
  if constexpr (PB > 1)
    if (q0 < panels) outer_cols<OB, PB - 1>(g, ldg, x, ldx, nin, m, p, ldp, q0);
}

// P[o][j] += sum_{i < m} G[i][o] X[i][j] for o < nout, j < nin (P: nout x ldp, ldp >= padded(nin);
// G: m x nout, leading dimension ldg; X: m x nin, leading dimension ldx, columns past nin read as
// 0). Each (o, 16-column block) is one accumulator started at zero and fed the rows in order by
// FMA, then added to P once (the same sum for any grouping of outputs into register blocks).
// Register blocks: 4 outputs x 4 column blocks (16 of the 32 zmm registers) with AVX-512; with
// AVX2's 16 ymm registers 6 outputs x one column block (12 accumulators, the two halves of x and
// the broadcast: the micro-kernel's 6 x 16 shape): 2 x 4 blocks needed 25 and spilled eight
// accumulators to the stack on every row (Zen 3).
inline void outer_acc(const float* g, int64_t ldg, int64_t nout, const float* x, int64_t ldx,
                      int64_t nin, int64_t m, float* p, int64_t ldp) {
  if (m <= 0) return;
  int64_t o0 = 0;
#if defined(NINO_FAST_AVX512)
  for (; o0 + 4 <= nout; o0 += 4) outer_cols<4, 4>(g + o0, ldg, x, ldx, nin, m, p + o0 * ldp, ldp);
  for (; o0 < nout; ++o0) outer_cols<1, 4>(g + o0, ldg, x, ldx, nin, m, p + o0 * ldp, ldp);
#else
  for (; o0 + 6 <= nout; o0 += 6) outer_cols<6, 1>(g + o0, ldg, x, ldx, nin, m, p + o0 * ldp, ldp);
  for (; o0 + 2 <= nout; o0 += 2) outer_cols<2, 2>(g + o0, ldg, x, ldx, nin, m, p + o0 * ldp, ldp);
  for (; o0 < nout; ++o0) outer_cols<1, 2>(g + o0, ldg, x, ldx, nin, m, p + o0 * ldp, ldp);
#endif
}

// s[j] += sum_{i < m} g[i][j] for j < n (g: leading dimension ldg), rows in order, in float64.
inline void colsum_acc(const float* g, int64_t ldg, int64_t n, int64_t m, double* s) {
  for (int64_t i = 0; i < m; ++i)
    for (int64_t j = 0; j < n; ++j) s[j] += g[i * ldg + j];
}

// Per-chunk column sums over edges (the bias gradients) in float64. In float32 (per-tile sums in
// registers, a running sum over a chunk's ~33 tiles, the chunks pairwise) a 400K-edge bias gradient
// lost 1e-5 to 1e-4 (scales 17 to 1,300; AVX-512 Xeon), up to four times ATen's float32 sum of the
// same terms; in float64 it is the terms' own sum to ~1e-12. Chunks are added in order, so the
// result does not depend on the thread count.
struct ColumnSums {
  std::vector<int64_t> off;  // offset of each sum within a chunk's block
  int64_t block = 0, chunks = 0;
  std::vector<double> data;

  ColumnSums(const std::vector<int64_t>& widths, int64_t n_chunks) : chunks(n_chunks) {
    for (int64_t w : widths) off.push_back(block), block += w;
    data.assign(block * chunks, 0.0);
  }
  double* at(int64_t chunk, int64_t which) { return data.data() + chunk * block + off[which]; }
  // (n,) float32 tensor: sum `which` over the chunks
  at::Tensor reduced(int64_t which, int64_t n, const at::TensorOptions& opt) {
    std::vector<double> total(n, 0.0);
    for (int64_t c = 0; c < chunks; ++c)
      for (int64_t j = 0; j < n; ++j) total[j] += at(c, which)[j];
    auto out = at::empty({n}, opt);
    std::copy(total.begin(), total.end(), out.data_ptr<float>());
    return out;
  }
};

// Per-chunk partial sums of a set of gradients (sizes fixed at construction, each padded to a
// 16-float boundary), reduced pairwise over the chunks.
struct ChunkPartials {
  std::vector<int64_t> off;  // offset of each gradient within a chunk's block
  int64_t block = 0, chunks = 0;
  Floats data;

  ChunkPartials(const std::vector<int64_t>& sizes, int64_t n_chunks) : chunks(n_chunks) {
    for (int64_t s : sizes) off.push_back(block), block += padded(s);
    data.assign(block * chunks, 0.f);
  }
  float* at(int64_t chunk, int64_t which) { return data.data() + chunk * block + off[which]; }
  // out[0..n) = sum over chunks of gradient `which`, in a pairwise tree fixed by the chunk count
  // (chunk c + s into chunk c for s = 1, 2, 4, ...): its rounding error grows with log2(chunks),
  // where a running sum's grew with the chunk count (~250 chunks at 400K edges). Consumes the
  // partials of `which` (each gradient is reduced once).
  void reduce(int64_t which, int64_t n, float* out) {
    for (int64_t s = 1; s < chunks; s *= 2)
      for (int64_t c = 0; c + s < chunks; c += 2 * s)
        add_inplace(at(c, which), at(c + s, which), n);
    if (chunks > 0)
      std::copy(at(0, which), at(0, which) + n, out);
    else
      std::fill(out, out + n, 0.f);
  }
};

// Epilogue writing a tile's rows as they are: row i's columns col0.. of `out` (leading dimension
// ld; the first `width` of each row).
struct StoreRowsEp {
  float* out;
  int64_t ld, width;

  NINO_FAST_INLINE void operator()(int64_t i, int64_t col0, V16 v) const {
    store16(out + i * ld + col0, width - col0, v);
  }
};

// Epilogue writing the feature gradient (E x c, a write-once result): row i of the tile to row
// idx[i] of `out`, or row i (idx null), with streaming stores; the worker calls stream_fence()
// when it is done.
struct FeatGradEp {
  float* out;
  int64_t c;
  const int64_t* idx = nullptr;

  NINO_FAST_INLINE void operator()(int64_t i, int64_t col0, V16 v) const {
    store16_stream(out + (idx ? idx[i] : i) * c + col0, c - col0, v);
  }
};

// The feature gradient's rows of the tile of CSR edges from t0 on, put where the forward read
// them: rows feat_index[t0 + i] of `out` (feat's own order), or rows t0 + i. Streamed, scattered
// rows cost no more than contiguous ones here; a gather of a CSR-order result afterwards was a
// second pass over 2 x E x c floats (~15-20% of EdgeFiLMConv's training step at E = 1e5-1e6).
inline FeatGradEp feat_grad_rows(const CsrInputs& in, float* out, int64_t t0) {
  const int64_t* ix = in.fidx();
  return ix ? FeatGradEp{out, in.c, ix + t0} : FeatGradEp{out + t0 * in.c, in.c};
}

// One worker's share of a row task's ChunkPartials block, summed in two levels. A row task is whole
// rows, so the tiles of a row with 1M in-edges (20K tiles; 1M per-edge type-table terms) would all
// be added into one float32 block: relative errors up to ~1e-3. Tiles go into `stage` instead,
// which is added into the task's block every kChunkTiles tiles and at the task's end; the sums then
// run over at most kChunkTiles tiles (or their edges) plus one term per fold. The fold points
// depend on the task's tiles alone, so every thread count gives the same bits.
struct StagedPartials {
  ChunkPartials& parts;
  Floats stage;
  int64_t task = -1, tiles = 0;

  explicit StagedPartials(ChunkPartials& p) : parts(p), stage(p.block, 0.f) {}
  // gradient `which` of the staging block
  float* at(int64_t which) { return stage.data() + parts.off[which]; }
  void start(int64_t t) { task = t, tiles = 0; }
  // after each tile of the task
  void tile_done() {
    if (++tiles % kChunkTiles == 0) fold();
  }
  // after the task's last tile
  void finish() {
    if (tiles % kChunkTiles != 0) fold();
  }

 private:
  void fold() {
    add_inplace(parts.at(task, 0), stage.data(), parts.block);
    std::fill(stage.begin(), stage.end(), 0.f);
  }
};

// (rows x cols) float32 tensor of gradient `which` (laid out rows x ld in each chunk), chunks
// summed
inline at::Tensor reduced(ChunkPartials& parts, int64_t which, int64_t rows, int64_t cols,
                          int64_t ld, const at::TensorOptions& opt) {
  Floats flat(rows * ld);
  parts.reduce(which, rows * ld, flat.data());
  auto out = at::empty({rows, cols}, opt);
  float* o = out.data_ptr<float>();
  for (int64_t r = 0; r < rows; ++r) std::copy(&flat[r * ld], &flat[r * ld] + cols, o + r * cols);
  return out;
}

// The tiles of kTile edges over rows [r0, r1) of a destination-sorted graph (rowptr rp), in order:
// fn(t0, m) for edges t0..t0+m-1, with dsti[i] the row of edge t0 + i.
template <class Fn>
inline void for_each_row_tile(const int64_t* rp, int64_t r0, int64_t r1, int64_t* dsti, Fn&& fn) {
  int64_t r = r0;
  for (int64_t t0 = rp[r0]; t0 < rp[r1]; t0 += kTile) {
    const int64_t m = std::min(t0 + kTile, rp[r1]) - t0;
    for (int64_t i = 0; i < m; ++i) {
      while (rp[r + 1] <= t0 + i) ++r;
      dsti[i] = r;
    }
    fn(t0, m);
  }
}

// The row-level terms of the FiLM ops' backward for output gradient go (n x d) over CSR rows rp:
// gn = go / deg per row (0 for an empty row; rows padded to np floats), the gradient that reaches
// each edge of the row through the mean, and the products the shift half W_sh (d x k) needs.
struct MeanGrad {
  const int64_t* rp;
  const float* go;
  int64_t n, d, np;
  Floats gn;

  MeanGrad(const int64_t* rp_, const float* go_, int64_t n_, int64_t d_)
      : rp(rp_), go(go_), n(n_), d(d_), np(padded(d_)), gn(n_ * padded(d_), 0.f) {
    for (int64_t r = 0; r < n; ++r)
      if (const int64_t deg = rp[r + 1] - rp[r])
        for (int64_t j = 0; j < d; ++j) gn[r * np + j] = go[r * d + j] / float(deg);
  }
  int64_t deg(int64_t r) const { return rp[r + 1] - rp[r]; }
  const float* row(int64_t r) const { return gn.data() + r * np; }

  // gn W_sh, (n x padded(k)): the shift half's term of each edge's input gradient (by its row)
  Floats times(const at::Tensor& w_sh) const {
    const int64_t k = w_sh.size(1), npk = padded(k);
    Floats out(n * npk, 0.f);
    const auto w_t = w_sh.t().contiguous();
    const PackedB packed(w_t.data_ptr<float>(), k, d);
    gemm_ep(gn.data(), np, n, packed, StoreRowsEp{out.data(), npk, npk});
    return out;
  }
  // dW_sh (d x k) = gn^T sums, sums: the rows' sums of the shift half's input (n x padded(k))
  void weight_grad(const float* sums, int64_t k, float* out) const {
    const int64_t npk = padded(k);
    Floats acc(d * npk, 0.f);
    outer_acc(gn.data(), np, d, sums, npk, k, n, acc.data(), npk);
    for (int64_t j = 0; j < d; ++j) std::copy(&acc[j * npk], &acc[j * npk] + k, out + j * k);
  }
  // db_sh (d) = sum over rows of gn deg
  void bias_grad(float* out) const {
    std::fill(out, out + d, 0.f);
    for (int64_t r = 0; r < n; ++r)
      for (int64_t j = 0; j < d; ++j) out[j] += gn[r * np + j] * float(deg(r));
  }
  // (n x d) go * (row sums of the scale half sc) / deg (0 for an empty row): the gradient of the
  // per-row factor that multiplies sc (node_dst, msg_dst); scsum: n x np
  void times_scale_mean(const float* scsum, float* out) const {
    for (int64_t r = 0; r < n; ++r)
      for (int64_t j = 0; j < d; ++j)
        out[r * d + j] = deg(r) ? go[r * d + j] * (scsum[r * np + j] / float(deg(r))) : 0.f;
  }
};

// One target of scatter_rows: out (rows x d) += v[e] at row idx[e].
struct ScatterTarget {
  float* out;
  const int32_t* idx32 = nullptr;  // one of the two index types
  const int64_t* idx64 = nullptr;
  int64_t row(int64_t e) const { return idx32 ? int64_t(idx32[e]) : idx64[e]; }
};

// For every target: out[idx[e]][:] += v[e][:] for e = e0..e1-1 in order (v: the rows of edges
// e0..e1-1, leading dimension ldv). Parallel over 16-column blocks, each thread owning a contiguous
// range of them and visiting the edges in order (all its blocks of edge e, then e + 1: contiguous
// reads and writes): deterministic, no atomics. Calls over consecutive edge ranges, in order, give
// the bits of one call over all edges.
inline void scatter_rows(const float* v, int64_t e0, int64_t e1, int64_t d, int64_t ldv,
                         const std::vector<ScatterTarget>& targets) {
  if (targets.empty() || e1 <= e0) return;
  const int64_t blocks = padded(d) / kPanel;
  at::parallel_for(0, blocks, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t e = e0; e < e1; ++e) {
      const float* ve = v + (e - e0) * ldv;
      for (const auto& t : targets) {
        float* o = t.out + t.row(e) * d;
        for (int64_t col0 = b0 * kPanel; col0 < std::min(d, b1 * kPanel); col0 += kPanel) {
          const int64_t valid = d - col0;
          store16(o + col0, valid, vadd(load16(o + col0, valid), load16(ve + col0, valid)));
        }
      }
    }
  });
}

// Edges per wave: the backward kernels keep the per-edge rows their node / type gradients need for
// one wave of work units at a time, then scatter them (WaveRows). A buffer of the whole E x D
// would cost a page fault per 4 KB on first touch, its release, and a round trip through DRAM;
// a wave's rows are reused (touched once per call) and still in the caches when scattered. Large
// enough that the wave's units keep both threads busy until its end (~16 row tasks).
constexpr int64_t kWaveEdges = int64_t(1) << 16;

// The per-edge rows (width d) of the current wave of edges [e0, e1), and where they are scattered.
struct WaveRows {
  int64_t d = 0, e0 = 0, e1 = 0;
  std::vector<ScatterTarget> targets;
  Floats data;

  WaveRows(int64_t d_, std::vector<ScatterTarget> targets_) : d(d_), targets(std::move(targets_)) {}
  void start(int64_t first, int64_t end) {
    e0 = first, e1 = end;
    if (!targets.empty() && int64_t(data.size()) < (end - first) * d)
      data.resize((end - first) * d);
  }
  float* row(int64_t e) { return data.data() + (e - e0) * d; }
  // rows i < m of a tile (leading dimension ldt) as the rows of edges t0..t0+m-1 (kept only when
  // they have somewhere to go)
  void put(const float* tile, int64_t ldt, int64_t t0, int64_t m) {
    if (targets.empty()) return;
    for (int64_t i = 0; i < m; ++i) std::copy(tile + i * ldt, tile + i * ldt + d, row(t0 + i));
  }
  void scatter() const { scatter_rows(data.data(), e0, e1, d, d, targets); }
};

// Work units 0..n-1 over consecutive edge ranges (unit u: edges [lo(u), lo(u + 1))) run as
// run_dynamic does, in waves of consecutive units spanning at most kWaveEdges edges (at least one
// unit). Per wave: each WaveRows of `rows` starts the wave's edges, worker(claim) runs on each
// thread (claim() returns the wave's units, then -1), and the rows are scattered. The units and
// their results are those of one run_dynamic over all units; the scatters', those of one
// scatter_rows over all edges.
template <class Lo, class Worker>
inline void run_waves(int64_t n, Lo lo, const std::vector<WaveRows*>& rows, Worker&& worker) {
  for (int64_t u0 = 0; u0 < n;) {
    int64_t u1 = u0 + 1;
    while (u1 < n && lo(u1 + 1) - lo(u0) <= kWaveEdges) ++u1;
    for (WaveRows* r : rows) r->start(lo(u0), lo(u1));
    run_dynamic(u1 - u0, [&](auto claim) {
      auto claim_in_wave = [&]() -> int64_t {
        const int64_t u = claim();
        return u < 0 ? u : u0 + u;
      };
      worker(claim_in_wave);
    });
    for (const WaveRows* r : rows) r->scatter();
    u0 = u1;
  }
}

}  // namespace nino_fast::cpu
