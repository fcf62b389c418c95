// Shared pieces of the fused CPU kernels: input checks, the deterministic CSR task partition, and
// the per-tile "affine + gathers (+ SiLU)" stage that film_mean, edge_mlp and edge_film_mean all
// start with.
#pragma once

#include <ATen/Parallel.h>
#include <torch/types.h>

#include <algorithm>
#include <optional>
#include <vector>

#include "cpu/gemm_tile.h"
#include "utils/check.h"

namespace nino_fast::cpu {

constexpr int64_t kTile = 96;         // edges per GEMM tile (A tile + outputs stay in L1/L2)
constexpr int64_t kTaskEdges = 4096;  // target edges per parallel task (whole rows)

// Contiguous row ranges [rows[i], rows[i+1]) of about kTaskEdges edges each, from rowptr alone: the
// same partition for any thread count, so every row is reduced by one task in its own edge order.
inline std::vector<int64_t> row_tasks(const int64_t* rp, int64_t n) {
  std::vector<int64_t> rows{0};
  int64_t start_edge = 0;
  for (int64_t r = 0; r < n; ++r) {
    if (rp[r + 1] - start_edge >= kTaskEdges) {
      rows.push_back(r + 1);
      start_edge = rp[r + 1];
    }
  }
  if (rows.back() != n) rows.push_back(n);
  return rows;
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
  check_dim(op, arg, t, 1);
  check_dtype(op, arg, t, at::kInt);
  NINO_CHECK(t.numel() == len, op, ": ", arg, " must have ", len, " entries, got ", t.numel());
  return t.contiguous();
}

// Per-node (N, D) table used as a gather source.
inline at::Tensor node_table(const char* op, const char* arg, const at::Tensor& t, int64_t n,
                             int64_t d) {
  auto out = f32(op, arg, t, 2);
  NINO_CHECK(out.size(0) >= n && out.size(1) == d, op, ": ", arg, " must be (", n, ", ", d,
             "), got ", shape_str(t));
  return out;
}

// The input stage: y = A W^T + bias (+ table[etype]) (+ node_src[src] + node_dst[dst]), optionally
// SiLU. Weights and optional tables are validated and packed once per call.
struct AffineStage {
  PackedB w;
  at::Tensor bias, table, etype, node_src, node_dst;
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
      etype = etype_in->to(at::kLong).contiguous();
      if (num_edges > 0) {
        const int64_t lo = etype.min().item<int64_t>(), hi = etype.max().item<int64_t>();
        NINO_CHECK(lo >= 0 && hi < types, op, ": etype values must index type_table's ", types,
                   " rows, got [", lo, ", ", hi, "]");
      }
    }
  }

  // rows e0..e0+m of the output tile (m x Np); gathers use src[e], dst_of(e)
  template <typename DstOf>
  void run(const float* feat, int64_t e0, int64_t m, const int32_t* src, DstOf dst_of,
           const float* ns, const float* nd, bool act, float* out, int64_t ldo) const {
    gemm_tile(feat + e0 * c, c, m, w, out, ldo);
    const float* b = bias.data_ptr<float>();
    const float* tab = table.defined() ? table.data_ptr<float>() : nullptr;
    const int64_t* et = etype.defined() ? etype.data_ptr<int64_t>() : nullptr;
    for (int64_t i = 0; i < m; ++i) {
      const int64_t e = e0 + i;
      float* y = out + i * ldo;
      for (int64_t j = 0; j < d; ++j) y[j] += b[j];
      if (tab) {
        const float* tr = tab + et[e] * d;
        for (int64_t j = 0; j < d; ++j) y[j] += tr[j];
      }
      if (ns) {
        const float* a = ns + int64_t(src[e]) * d;
        const float* bb = nd + dst_of(e) * d;
        for (int64_t j = 0; j < d; ++j) y[j] += a[j] + bb[j];
      }
      if (act) silu_inplace(y, d);
    }
  }
};

}  // namespace nino_fast::cpu
