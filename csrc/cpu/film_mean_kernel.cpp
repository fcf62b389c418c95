// CPU film_mean: FiLM message + mean aggregation over destination-sorted CSR (spec:
// reference.film_mean).
//
// Per tile of edges, one GEMM gives the scale half [W_sc e + b_sc + table_sc[t]]; the epilogue
// multiplies it by (node_dst[n] + node_src[src]) and accumulates into the row, in edge order. The
// shift half is linear in the edge features, so it is not computed per edge: sum_e shift_e = W_sh
// (sum_e e) + deg b_sh
// + sum_e table_sh[t_e], one GEMV per row.
#include <torch/library.h>

#include "cpu/fused_common.h"

namespace nino_fast::cpu {
namespace {

at::Tensor film_mean_cpu(const at::Tensor& feat_in, const at::Tensor& rowptr_in,
                         const at::Tensor& src_in, const at::Tensor& node_dst_in,
                         const at::Tensor& node_src_in, const at::Tensor& weight,
                         const at::Tensor& bias_in, const std::optional<at::Tensor>& etype,
                         const std::optional<at::Tensor>& type_table) {
  constexpr const char* op = "nino_fast::film_mean";
  auto feat = f32(op, "feat", feat_in, 2);
  const int64_t e_total = feat.size(0), c = feat.size(1);
  auto rowptr = rowptr_in.contiguous();
  check_rowptr(op, rowptr, e_total);
  const int64_t n = rowptr.numel() - 1;
  auto src = idx32(op, "src", src_in, e_total);
  auto w = f32(op, "weight", weight, 2);
  NINO_CHECK(w.size(0) % 2 == 0 && w.size(1) == c, op, ": weight must be (2*D, C) with C=", c,
             ", got ", shape_str(weight));
  const int64_t d = w.size(0) / 2;
  auto bias = f32(op, "bias", bias_in, 1);
  NINO_CHECK(bias.numel() == 2 * d, op, ": bias must have 2*D=", 2 * d, " entries, got ",
             bias.numel());
  auto nd = node_table(op, "node_dst", node_dst_in, n, d);
  NINO_CHECK(nd.size(0) == n, op, ": node_dst must have N=", n, " rows, got ", nd.size(0));
  auto ns = f32(op, "node_src", node_src_in, 2);
  NINO_CHECK(ns.size(1) == d, op, ": node_src must have D=", d, " columns, got ",
             shape_str(node_src_in));
  // the scale half as an affine stage (with its half of the type table); the shift half per row
  std::optional<at::Tensor> tab_sc, tab_sh;
  if (type_table.has_value()) {
    auto t = f32(op, "type_table", *type_table, 2);
    NINO_CHECK(t.size(1) == 2 * d, op, ": type_table must be (T, 2*D=", 2 * d, "), got ",
               shape_str(*type_table));
    tab_sc = t.narrow(1, 0, d).contiguous();
    tab_sh = t.narrow(1, d, d).contiguous();
  }
  AffineStage scale(op, "weight", w.narrow(0, 0, d).contiguous(), bias.narrow(0, 0, d).contiguous(),
                    etype, tab_sc, c, e_total);
  auto w_sh = w.narrow(0, d, d).contiguous();
  auto b_sh = bias.narrow(0, d, d).contiguous();
  if (ns.size(0) > 0 && e_total > 0) {
    const int64_t hi = src.max().item<int32_t>(), lo = src.min().item<int32_t>();
    NINO_CHECK(lo >= 0 && hi < ns.size(0), op, ": src values must index node_src's ", ns.size(0),
               " rows, got [", lo, ", ", hi, "]");
  }
  auto out = at::zeros({n, d}, feat.options());
  if (n == 0 || d == 0) return out;

  const int64_t* rp = rowptr.data_ptr<int64_t>();
  const float* x = feat.data_ptr<float>();
  const int32_t* s = src.data_ptr<int32_t>();
  const float *pnd = nd.data_ptr<float>(), *pns = ns.data_ptr<float>();
  const float *pwsh = w_sh.data_ptr<float>(), *pbsh = b_sh.data_ptr<float>();
  const float* ptsh = tab_sh ? tab_sh->data_ptr<float>() : nullptr;
  const int64_t* pet = scale.etype.defined() ? scale.etype.data_ptr<int64_t>() : nullptr;
  float* y = out.data_ptr<float>();
  const auto tasks = row_tasks(rp, n);
  const int64_t np = padded(d);

  at::parallel_for(0, int64_t(tasks.size()) - 1, 1, [&](int64_t t0, int64_t t1) {
    // two-level sums (within a tile, then across tiles) keep fp32 rounding error small on long rows
    std::vector<float> tile(kTile * np), acc(d), fsum(c), tsum(d), tacc(d), tf(c), tt(d);
    for (int64_t task = t0; task < t1; ++task) {
      for (int64_t r = tasks[task]; r < tasks[task + 1]; ++r) {
        const int64_t b = rp[r], e = rp[r + 1];
        if (e <= b) continue;
        std::fill(acc.begin(), acc.end(), 0.f);
        std::fill(fsum.begin(), fsum.end(), 0.f);
        std::fill(tsum.begin(), tsum.end(), 0.f);
        const float* ndr = pnd + r * d;
        for (int64_t e0 = b; e0 < e; e0 += kTile) {
          const int64_t m = std::min(kTile, e - e0);
          scale.run(x, e0, m, s, [r](int64_t) { return r; }, nullptr, nullptr, false, tile.data(),
                    np);
          std::fill(tacc.begin(), tacc.end(), 0.f);
          std::fill(tf.begin(), tf.end(), 0.f);
          std::fill(tt.begin(), tt.end(), 0.f);
          for (int64_t i = 0; i < m; ++i) {
            const float* sc = tile.data() + i * np;
            const float* nsr = pns + int64_t(s[e0 + i]) * d;
            for (int64_t j = 0; j < d; ++j) tacc[j] += sc[j] * (ndr[j] + nsr[j]);
            const float* xe = x + (e0 + i) * c;
            for (int64_t k = 0; k < c; ++k) tf[k] += xe[k];
            if (ptsh) {
              const float* tr = ptsh + pet[e0 + i] * d;
              for (int64_t j = 0; j < d; ++j) tt[j] += tr[j];
            }
          }
          for (int64_t j = 0; j < d; ++j) acc[j] += tacc[j], tsum[j] += tt[j];
          for (int64_t k = 0; k < c; ++k) fsum[k] += tf[k];
        }
        const float deg = float(e - b), inv = 1.f / deg;
        float* yr = y + r * d;
        for (int64_t j = 0; j < d; ++j) {
          const float* wr = pwsh + j * c;
          float shift = 0.f;
          for (int64_t k = 0; k < c; ++k) shift += wr[k] * fsum[k];
          yr[j] = (acc[j] + shift + deg * pbsh[j] + tsum[j]) * inv;
        }
      }
    }
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(nino_fast, CPU, m) {
  m.impl("film_mean", &film_mean_cpu);
}

}  // namespace nino_fast::cpu
