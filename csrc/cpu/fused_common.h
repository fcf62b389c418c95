// Shared pieces of the fused CPU kernels: input checks, the deterministic CSR task partition, and
// the per-tile "affine + gathers (+ SiLU)" stage that film_mean, edge_mlp and edge_film_mean all
// start with.
#pragma once

#include <ATen/Parallel.h>
#include <torch/types.h>

#include <algorithm>
#include <atomic>
#include <optional>
#include <utility>
#include <vector>

#include "cpu/gemm_tile.h"
#include "cpu/out_pool.h"
#include "utils/check.h"

namespace nino_fast::cpu {

constexpr int64_t kTile = 48;         // edges per GEMM tile (a 48 x 128 A tile is 24 KB: L1)
constexpr int64_t kTaskEdges = 4096;  // target edges per parallel task (whole rows)
constexpr int64_t kTaskRows = 512;  // and at most this many rows (bounds the per-task row buffers)

// Contiguous row ranges [rows[i], rows[i+1]) of about kTaskEdges edges each, from rowptr alone: the
// same partition for any thread count, so every row is reduced by one task in its own edge order.
inline std::vector<int64_t> row_tasks(const int64_t* rp, int64_t n) {
  std::vector<int64_t> rows{0};
  int64_t start_edge = 0;
  for (int64_t r = 0; r < n; ++r) {
    if (rp[r + 1] - start_edge >= kTaskEdges || r + 1 - rows.back() >= kTaskRows) {
      rows.push_back(r + 1);
      start_edge = rp[r + 1];
    }
  }
  if (rows.back() != n) rows.push_back(n);
  return rows;
}

// Work units 0..n-1 claimed dynamically (an atomic counter) by up to at::get_num_threads() workers:
// worker(claim) runs once per thread and calls claim() until it returns -1. Each unit must write
// only its own outputs; results are then independent of which thread ran which unit (and of the
// load).
template <class Worker>
inline void run_dynamic(int64_t n, Worker&& worker) {
  if (n <= 0) return;
  std::atomic<int64_t> next{0};
  auto claim = [&next, n]() -> int64_t {
    const int64_t u = next.fetch_add(1, std::memory_order_relaxed);
    return u < n ? u : -1;
  };
  const int64_t nt = std::min<int64_t>(at::get_num_threads(), n);
  if (nt <= 1 || at::in_parallel_region()) {
    worker(claim);
    return;
  }
  at::parallel_for(0, nt, 1, [&](int64_t, int64_t) { worker(claim); });
}

inline at::Tensor f32(const char* op, const char* arg, const at::Tensor& t, int64_t dim) {
  NINO_CHECK(t.device().is_cpu(), op, ": ", arg, " must be a CPU tensor, got ", t.device());
  check_dim(op, arg, t, dim);
  NINO_CHECK(t.scalar_type() == at::kFloat || t.scalar_type() == at::kDouble, op, ": ", arg,
             " must be float32 (or float64), got ", c10::toString(t.scalar_type()));
  return t.to(at::kFloat).contiguous();
}

inline at::Tensor idx32(const char* op, const char* arg, const at::Tensor& t, int64_t len) {
  NINO_CHECK(t.device().is_cpu(), op, ": ", arg, " must be a CPU tensor, got ", t.device());
  return as_index32(op, arg, t, len);
}

// A float vector zero-padded to a multiple of kPanel.
inline Floats padded_copy(const at::Tensor& v) {
  Floats out(padded(v.numel()), 0.f);
  std::copy(v.data_ptr<float>(), v.data_ptr<float>() + v.numel(), out.begin());
  return out;
}

// Per-node (N, D) table used as a gather source.
inline at::Tensor node_table(const char* op, const char* arg, const at::Tensor& t, int64_t n,
                             int64_t d) {
  auto out = f32(op, arg, t, 2);
  NINO_CHECK(out.size(0) >= n && out.size(1) == d, op, ": ", arg, " must be (", n, ", ", d,
             "), got ", shape_str(t));
  return out;
}

// The first inputs of film_mean and edge_film_mean, validated: feat (E, C) as float32, a
// destination-sorted CSR rowptr (N + 1), src (E,) int32 and the optional feat_index (CSR edge p
// reads feat row feat_index[p]; as int64).
struct CsrInputs {
  at::Tensor feat;
  int64_t e_total, c;
  at::Tensor rowptr;
  int64_t n;
  at::Tensor src;
  at::Tensor feat_index;

  CsrInputs(const char* op, const at::Tensor& feat_in, const at::Tensor& rowptr_in,
            const at::Tensor& src_in, const std::optional<at::Tensor>& feat_index_in)
      : feat(f32(op, "feat", feat_in, 2)),
        e_total(feat.size(0)),
        c(feat.size(1)),
        rowptr(rowptr_in.contiguous()),
        n((check_rowptr(op, rowptr, e_total), rowptr.numel() - 1)),
        src(idx32(op, "src", src_in, e_total)) {
    if (feat_index_in.has_value()) {
      check_feat_index(op, *feat_index_in, e_total, at::kCPU);
      feat_index = feat_index_in->to(at::kLong).contiguous();
    }
  }

  const int64_t* fidx() const {
    return feat_index.defined() ? feat_index.data_ptr<int64_t>() : nullptr;
  }
  // The feature rows of the tile of CSR edges t0..t0+m-1 as a GEMM operand (leading dimension c):
  // feat's own rows, or with a feat_index those rows gathered into buf (kTile x c floats).
  const float* tile(int64_t t0, int64_t m, float* buf) const {
    const float* x = feat.data_ptr<float>();
    if (!feat_index.defined()) return x + t0 * c;
    const int64_t* ix = fidx();
    for (int64_t i = 0; i < m; ++i)
      std::copy(x + ix[t0 + i] * c, x + (ix[t0 + i] + 1) * c, buf + i * c);
    return buf;
  }

  // src values must index the rows of node_src (`rows` of them)
  void check_src(const char* op, int64_t rows) const {
    if (e_total == 0) return;
    const int64_t hi = src.max().item<int32_t>(), lo = src.min().item<int32_t>();
    NINO_CHECK(lo >= 0 && hi < rows, op, ": src values must index node_src's ", rows,
               " rows, got [", lo, ", ", hi, "]");
  }
};

// The input stage: y = A W^T + bias (+ table[etype]) (+ node_src[src] + node_dst[dst]), optionally
// SiLU. Weights and optional tables are validated and packed once per call; ep() gives the epilogue
// that applies it to the GEMM accumulators of one tile.
struct AffineStage {
  PackedB w;
  at::Tensor bias, table, etype, node_src, node_dst;
  Floats bias_p;  // bias zero-padded to Np
  int64_t d = 0, c = 0, types = 0;

  AffineStage(const char* op, const char* wname, const at::Tensor& weight,
              const at::Tensor& bias_in, const std::optional<at::Tensor>& etype_in,
              const std::optional<at::Tensor>& table_in, int64_t c_expected, int64_t num_edges) {
    auto wt = f32(op, wname, weight, 2);
    d = wt.size(0);
    c = wt.size(1);
    NINO_CHECK(c == c_expected, op, ": ", wname, " must have ", c_expected,
               " input columns (the feature width), got ", shape_str(weight));
    w = PackedB(wt.data_ptr<float>(), d, c);
    bias = f32(op, "bias", bias_in, 1);
    NINO_CHECK(bias.numel() == d, op, ": the bias of ", wname, " must have ", d, " entries, got ",
               bias.numel());
    bias_p = padded_copy(bias);
    NINO_CHECK(etype_in.has_value() == table_in.has_value(), op,
               ": etype and type_table go together");
    if (table_in.has_value()) {
      table = f32(op, "type_table", *table_in, 2);
      NINO_CHECK(table.size(1) == d, op, ": type_table must be (T, ", d, "), got ",
                 shape_str(*table_in));
      types = table.size(0);
      NINO_CHECK(
          etype_in->device().is_cpu() && etype_in->dim() == 1 && etype_in->numel() == num_edges, op,
          ": etype must be a CPU (E,) tensor with E=", num_edges, ", got ", shape_str(*etype_in));
      NINO_CHECK(!at::isFloatingType(etype_in->scalar_type()) &&
                     !at::isComplexType(etype_in->scalar_type()),
                 op, ": etype must be an integer tensor, got ",
                 c10::toString(etype_in->scalar_type()));
      etype = etype_in->to(at::kLong).contiguous();
      if (num_edges > 0) {
        const int64_t lo = etype.min().item<int64_t>(), hi = etype.max().item<int64_t>();
        NINO_CHECK(lo >= 0 && hi < types, op, ": etype values must index type_table's ", types,
                   " rows, got [", lo, ", ", hi, "]");
      }
    }
  }

  const float* tab() const { return table.defined() ? table.data_ptr<float>() : nullptr; }
  const int64_t* et() const { return etype.defined() ? etype.data_ptr<int64_t>() : nullptr; }
};

// Epilogue of the shift-half GEMM over a task's rows r0 + i (the FiLM ops): y[row] = (acc[i] + W_sh
// sum + deg b_sh) / deg for the (row, 16-column) block, zeros for a row without in-edges. acc:
// (rows, np); b_sh: padded.
struct ShiftMeanEp {
  const int64_t* rp;
  int64_t r0;
  float* y;
  int64_t d;
  const float* acc;
  int64_t np;
  const float* b_sh;

  NINO_FAST_INLINE void operator()(int64_t i, int64_t col0, V16 v) const {
    const int64_t row = r0 + i, deg = rp[row + 1] - rp[row], valid = d - col0;
    float* yr = y + row * d + col0;
    if (deg == 0) return store16(yr, valid, vzero16());
    const V16 dg = vset16(float(deg)), inv = vset16(1.f / float(deg));
    v = vmul(vadd(vadd(vld16(acc + i * np + col0), v), vmul(dg, vld16(b_sh + col0))), inv);
    store16(yr, valid, v);
  }
};

// The next tile's rows, prefetched a line at a time from the current tile's epilogue: the call for
// (row i, columns col0..col0+15) prefetches the 64-byte line at column col0 of the next tile's row
// i in each table, so the prefetches are spread over the GEMM instead of issued as one burst of
// hundreds (which overflows the core's miss buffers: most are dropped and the gathers stall).
struct NextTilePrefetch {
  struct Table {
    const float* base;
    const int32_t* idx;  // row i of the next tile is base[idx[i]] (null: base[i], contiguous rows)
    int64_t width;
    const int64_t* idx64 = nullptr;  // or base[idx64[i]]
    int64_t row(int64_t i) const { return idx ? int64_t(idx[i]) : idx64 ? idx64[i] : i; }
  };
  Table t[4] = {};
  int n = 0;
  int64_t rows = 0;  // rows of the next tile (0: none)

  void reset(int64_t next_rows) { n = 0, rows = next_rows; }
  void add(const float* base, const int32_t* idx, int64_t width) {
    if (base != nullptr) t[n++] = Table{base, idx, width};
  }
  void add64(const float* base, const int64_t* idx64, int64_t width) {
    if (base != nullptr) t[n++] = Table{base, nullptr, width, idx64};
  }
  // the feature rows of the CSR edges from p0 on (in.feat_index's rows, else contiguous)
  void add_feat(const CsrInputs& in, int64_t p0) {
    const float* x = in.feat.data_ptr<float>();
    if (in.feat_index.defined())
      add64(x, in.fidx() + p0, in.c);
    else
      add(x + p0 * in.c, nullptr, in.c);
  }
  NINO_FAST_INLINE void operator()(int64_t i, int64_t col0) const {
    if (i >= rows) return;
    for (int k = 0; k < n; ++k)
      if (col0 < t[k].width) prefetch_line(t[k].base + t[k].row(i) * t[k].width + col0);
  }
};

// Claims work units for one worker (claim: run_dynamic's) and says where the tile after the current
// one starts, for the prefetches in the current tile's epilogues: the unit's next tile, or on its
// last tile the first tile of the unit this worker runs next (claimed then, not earlier, so a
// worker never holds a unit it has not started for longer than one tile). Units are claimed
// dynamically, so a worker's next unit is rarely the one after its current. range(u): unit u's
// edges [lo, hi) (a row task of film_mean / edge_film_mean, one tile of edge_mlp).
template <class Claim, class Range>
struct ClaimCursor {
  Claim& claim;
  Range range;
  int64_t next = -2;  // -2: not claimed yet

  // the unit to run now (-1: none left)
  int64_t take() {
    const int64_t u = next == -2 ? claim() : next;
    next = -2;
    return u;
  }
  // (first edge, edge count) of the tile after the one ending at edge t1 of a unit ending at `end`
  std::pair<int64_t, int64_t> after(int64_t t1, int64_t end) {
    if (t1 < end) return {t1, std::min(kTile, end - t1)};
    if (next == -2) next = claim();
    if (next < 0) return {0, 0};
    const auto [lo, hi] = range(next);
    return {lo, std::min(kTile, hi - lo)};
  }
};

template <class Claim, class Range>
ClaimCursor<Claim, Range> claim_cursor(Claim& claim, Range range) {
  return {claim, range};
}

// Epilogue of the input stage for the tile of edges e0..e0+m: row i of the output tile (out,
// leading dimension ldo >= Np) = [silu](acc + bias + table[et[e]] + gsum[i]), e = e0 + i, where
// gsum (optional, leading dimension ldo) holds the tile's gathered node terms ns[src] + nd[dst]
// (gather_add, before the GEMM). Optionally also hpart[seg[i]] += that row (the per-row sum of h
// within the tile).
struct AffineEp {
  const float* bias = nullptr;  // Np, zero-padded
  const float* tab = nullptr;
  const int64_t* et = nullptr;
  const float* gsum = nullptr;
  int64_t d = 0, e0 = 0;
  bool act = false;
  float* out = nullptr;
  int64_t ldo = 0;
  float* hpart = nullptr;
  const int32_t* seg = nullptr;
  int64_t ldp = 0;
  NextTilePrefetch pf;  // the next tile's lines, one per call (held by value: see gemm_ep)

  AffineEp(const AffineStage& st, bool act_)
      : bias(st.bias_p.data()), tab(st.tab()), et(st.et()), d(st.d), act(act_) {}

  NINO_FAST_INLINE void operator()(int64_t i, int64_t col0, V16 v) const {
    const int64_t e = e0 + i, valid = d - col0;
    pf(i, col0);
    v = vadd(v, vld16(bias + col0));
    if (tab) v = vadd(v, load16(tab + et[e] * d + col0, valid));
    if (gsum) v = vadd(v, vld16(gsum + i * ldo + col0));
    if (act) v = vsilu(v);
    vst16(out + i * ldo + col0, v);
    if (hpart) {
      float* hp = hpart + seg[i] * ldp + col0;
      vst16(hp, vadd(vld16(hp), v));
    }
  }
};

// sum_k a[k] b[k] over n (a multiple of kPanel) floats: one FMA chain per lane over the 16-float
// blocks, then the 16 lanes added pairwise in a fixed order: the same bits on every ISA.
NINO_FAST_INLINE float dot_padded(const float* a, const float* b, int64_t n) {
  V16 acc = vzero16();
  for (int64_t k = 0; k < n; k += kPanel) acc = vfma(vld16(a + k), vld16(b + k), acc);
  alignas(64) float t[kPanel];
  vst16(t, acc);
  for (int64_t w = kPanel / 2; w > 0; w /= 2)
    for (int64_t i = 0; i < w; ++i) t[i] += t[i + w];
  return t[0];
}

// out[i] (leading dimension ldo >= padded(d), padding zero) = a[ia[i]] + b[ib[i]] for i < m, rows
// of width d. Gathering a tile's rows in one tight loop, before its GEMM, lets the core keep many
// cache misses in flight; the epilogue then reads them from L1/L2.
template <class IA, class IB>
NINO_FAST_INLINE void gather_add(const float* a, const IA* ia, const float* b, const IB* ib,
                                 int64_t m, int64_t d, float* out, int64_t ldo) {
  for (int64_t i = 0; i < m; ++i) {
    const float *ra = a + int64_t(ia[i]) * d, *rb = b + int64_t(ib[i]) * d;
    for (int64_t col0 = 0; col0 < d; col0 += kPanel) {
      const int64_t valid = d - col0;
      vst16(out + i * ldo + col0, vadd(load16(ra + col0, valid), load16(rb + col0, valid)));
    }
  }
}

// The CSR rows met by the GEMM tile of edges [t0, t1) of a destination-sorted graph. GEMM tiles run
// across row boundaries (full micro-kernel blocks even on short rows), but each row's two-level sum
// is grouped by the row alone: groups of kTile consecutive edges from the row's first edge, so a
// row's bits do not depend on which other rows share the call (streamed row tiles == in memory). A
// segment is the part of one (row, group) inside this tile; per tile row: its row (dsti) and
// segment (seg). done[s]: the group ends inside this tile (else it is the last segment and
// continues in the next tile, whose segment 0 it then is).
struct TileRows {
  int64_t dsti[kTile];
  int32_t seg[kTile];
  int64_t seg_row[kTile];
  bool done[kTile];
  int64_t nseg = 0;

  // r: in/out, the row holding edge t0 (advanced past empty rows as needed)
  void build(const int64_t* rp, int64_t& r, int64_t t0, int64_t t1) {
    nseg = 0;
    for (int64_t e = t0; e < t1; ++e) {
      while (rp[r + 1] <= e) ++r;
      if (nseg == 0 || seg_row[nseg - 1] != r || (e - rp[r]) % kTile == 0) {
        seg_row[nseg] = r;
        done[nseg++] = true;
      }
      seg[e - t0] = int32_t(nseg - 1);
      dsti[e - t0] = r;
    }
    if (nseg > 0) done[nseg - 1] = t1 == rp[r + 1] || (t1 - rp[r]) % kTile == 0;
  }
};

// Per task: the partial sums of the tile's segments (parts: width w each) folded into the rows'
// accumulators (acc: row r at (r - r0) * w) when their group is done; an unfinished last segment is
// moved to slot 0, where the next tile continues it. Returns whether it did (carry).
inline bool fold_segments(const TileRows& tr, int64_t r0, float* part, float* acc, int64_t w) {
  for (int64_t sg = 0; sg < tr.nseg; ++sg) {
    if (tr.done[sg]) {
      add_inplace(acc + (tr.seg_row[sg] - r0) * w, part + sg * w, w);
    } else {  // only the last segment
      if (sg != 0) std::memmove(part, part + sg * w, sizeof(float) * w);
      return true;
    }
  }
  return false;
}

// The forward FiLM ops' row tasks (film_mean, edge_film_mean): each task (whole rows, from
// row_tasks) runs its tiles in edge order. Per tile, tile(t0, m, next) adds its edges into the
// segment parts (`part`, the message sums, np wide; `lpart`, the sums the shift half is linear in,
// nl wide), `next` being the tile after it ((first edge, count): for prefetches); the parts are
// folded into per-row accumulators, then each task's rows are written as (acc + W_sh sum + deg
// b_sh) / deg.
struct FilmRowTasks {
  const int64_t* rp;
  std::vector<int64_t> tasks;
  int64_t np, nl;  // the widths of part and lpart
  const PackedB& shift_w;
  const float* b_sh;  // padded
  float* y;
  int64_t d;

  FilmRowTasks(const int64_t* rp_, int64_t n, int64_t np_, int64_t nl_, const PackedB& shift_w_,
               const float* b_sh_, float* y_, int64_t d_)
      : rp(rp_),
        tasks(row_tasks(rp_, n)),
        np(np_),
        nl(nl_),
        shift_w(shift_w_),
        b_sh(b_sh_),
        y(y_),
        d(d_) {}

  int64_t count() const { return int64_t(tasks.size()) - 1; }

  // One worker's tasks (claim: run_dynamic's); part / lpart hold kTile segments each.
  template <class Claim, class Tile>
  void run(Claim& claim, TileRows& tr, Floats& part, Floats& lpart, Tile&& tile) const {
    // two-level sums (within a tile, then across tiles) keep fp32 rounding error small on long rows
    Floats acc, sum;
    auto cursor = claim_cursor(claim, [&](int64_t u) {
      return std::pair<int64_t, int64_t>{rp[tasks[u]], rp[tasks[u + 1]]};
    });
    for (int64_t task; (task = cursor.take()) >= 0;) {
      const int64_t r0 = tasks[task], r1 = tasks[task + 1], nr = r1 - r0;
      acc.assign(nr * np, 0.f);
      sum.assign(nr * nl, 0.f);
      int64_t r = r0;
      bool carry = false;  // slot 0 of the parts continues the last tile's unfinished group
      for (int64_t t0 = rp[r0]; t0 < rp[r1]; t0 += kTile) {
        const int64_t t1 = std::min(t0 + kTile, rp[r1]);
        tr.build(rp, r, t0, t1);
        std::fill(part.begin() + (carry ? np : 0), part.begin() + tr.nseg * np, 0.f);
        std::fill(lpart.begin() + (carry ? nl : 0), lpart.begin() + tr.nseg * nl, 0.f);
        tile(t0, t1 - t0, cursor.after(t1, rp[r1]));
        carry = fold_segments(tr, r0, part.data(), acc.data(), np);
        fold_segments(tr, r0, lpart.data(), sum.data(), nl);  // the same segments: the same carry
      }
      // the shift half, one GEMM over the task's rows: W_sh (sum) + deg b_sh
      const ShiftMeanEp fin{rp, r0, y, d, acc.data(), np, b_sh};
      gemm_ep(sum.data(), nl, nr, shift_w, fin);
    }
  }
};

}  // namespace nino_fast::cpu
