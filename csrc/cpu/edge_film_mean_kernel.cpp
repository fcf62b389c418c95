// CPU edge_film_mean: layer l's edge update fused with layer l+1's FiLM message + mean
// (spec: reference.edge_film_mean). Per tile: GEMM 1 gives h = silu(W_a e + b_a + table[t] + s[src]
// + t[n]), GEMM 2 the scale half W_sc h + b_sc; the epilogue accumulates scale * (msg_dst[n] +
// msg_src[src]) and sum_e h into the row. The shift half is one GEMV per row: W_sh (sum_e h) + deg
// b_sh. h never leaves L1/L2.
#include <torch/library.h>

#include "cpu/fused_common.h"

namespace nino_fast::cpu {
namespace {

at::Tensor edge_film_mean_cpu(const at::Tensor& feat_in, const at::Tensor& rowptr_in,
                              const at::Tensor& src_in, const at::Tensor& weight_a,
                              const at::Tensor& bias_a, const std::optional<at::Tensor>& etype,
                              const std::optional<at::Tensor>& type_table,
                              const at::Tensor& node_src_in, const at::Tensor& node_dst_in,
                              const at::Tensor& msg_dst_in, const at::Tensor& msg_src_in,
                              const at::Tensor& weight_scale, const at::Tensor& bias_scale,
                              const at::Tensor& weight_shift, const at::Tensor& bias_shift) {
  constexpr const char* op = "nino_fast::edge_film_mean";
  auto feat = f32(op, "feat", feat_in, 2);
  const int64_t e_total = feat.size(0), c = feat.size(1);
  auto rowptr = rowptr_in.contiguous();
  check_rowptr(op, rowptr, e_total);
  const int64_t n = rowptr.numel() - 1;
  auto src = idx32(op, "src", src_in, e_total);
  AffineStage stage(op, "weight_a", weight_a, bias_a, etype, type_table, c, e_total);
  const int64_t dh = stage.d;
  auto ns = f32(op, "node_src", node_src_in, 2);
  NINO_CHECK(ns.size(1) == dh, op, ": node_src must have ", dh, " columns, got ",
             shape_str(node_src_in));
  auto nd = node_table(op, "node_dst", node_dst_in, n, dh);
  auto wsc = f32(op, "weight_scale", weight_scale, 2);
  NINO_CHECK(wsc.size(1) == dh, op, ": weight_scale must be (D, ", dh, "), got ",
             shape_str(weight_scale));
  const int64_t d = wsc.size(0);
  PackedB scale(wsc.data_ptr<float>(), d, dh);
  auto bsc = f32(op, "bias_scale", bias_scale, 1);
  auto wsh = f32(op, "weight_shift", weight_shift, 2);
  auto bsh = f32(op, "bias_shift", bias_shift, 1);
  NINO_CHECK(bsc.numel() == d && bsh.numel() == d, op,
             ": bias_scale and bias_shift must have D=", d, " entries");
  NINO_CHECK(wsh.size(0) == d && wsh.size(1) == dh, op, ": weight_shift must be (", d, ", ", dh,
             "), got ", shape_str(weight_shift));
  auto md = node_table(op, "msg_dst", msg_dst_in, n, d);
  auto ms = f32(op, "msg_src", msg_src_in, 2);
  NINO_CHECK(ms.size(1) == d && ns.size(0) == ms.size(0), op, ": msg_src must be (", ns.size(0),
             ", ", d, "), got ", shape_str(msg_src_in));
  if (e_total > 0) {
    const int64_t hi = src.max().item<int32_t>(), lo = src.min().item<int32_t>();
    NINO_CHECK(lo >= 0 && hi < ns.size(0), op, ": src values must index node_src's ", ns.size(0),
               " rows, got [", lo, ", ", hi, "]");
  }
  auto out = at::zeros({n, d}, feat.options());
  if (n == 0 || d == 0) return out;

  const int64_t* rp = rowptr.data_ptr<int64_t>();
  const float* x = feat.data_ptr<float>();
  const int32_t* s = src.data_ptr<int32_t>();
  const float *pns = ns.data_ptr<float>(), *pnd = nd.data_ptr<float>();
  const float *pmd = md.data_ptr<float>(), *pms = ms.data_ptr<float>();
  const float *pbsc = bsc.data_ptr<float>(), *pwsh = wsh.data_ptr<float>(),
              *pbsh = bsh.data_ptr<float>();
  float* y = out.data_ptr<float>();
  const auto tasks = row_tasks(rp, n);
  const int64_t nph = padded(dh), np = padded(d);

  at::parallel_for(0, int64_t(tasks.size()) - 1, 1, [&](int64_t t0, int64_t t1) {
    // two-level sums (within a tile, then across tiles) keep fp32 rounding error small on long rows
    std::vector<float> htile(kTile * nph), stile(kTile * np), acc(d), hsum(dh), tacc(d), th(dh);
    for (int64_t task = t0; task < t1; ++task) {
      for (int64_t r = tasks[task]; r < tasks[task + 1]; ++r) {
        const int64_t b = rp[r], e = rp[r + 1];
        if (e <= b) continue;
        std::fill(acc.begin(), acc.end(), 0.f);
        std::fill(hsum.begin(), hsum.end(), 0.f);
        const float* mdr = pmd + r * d;
        for (int64_t e0 = b; e0 < e; e0 += kTile) {
          const int64_t m = std::min(kTile, e - e0);
          stage.run(x, e0, m, s, [r](int64_t) { return r; }, pns, pnd, true, htile.data(), nph);
          gemm_tile(htile.data(), nph, m, scale, stile.data(), np);
          std::fill(tacc.begin(), tacc.end(), 0.f);
          std::fill(th.begin(), th.end(), 0.f);
          for (int64_t i = 0; i < m; ++i) {
            const float* sc = stile.data() + i * np;
            const float* h = htile.data() + i * nph;
            const float* msr = pms + int64_t(s[e0 + i]) * d;
            for (int64_t j = 0; j < d; ++j) tacc[j] += (sc[j] + pbsc[j]) * (mdr[j] + msr[j]);
            for (int64_t j = 0; j < dh; ++j) th[j] += h[j];
          }
          for (int64_t j = 0; j < d; ++j) acc[j] += tacc[j];
          for (int64_t j = 0; j < dh; ++j) hsum[j] += th[j];
        }
        const float deg = float(e - b), inv = 1.f / deg;
        float* yr = y + r * d;
        for (int64_t j = 0; j < d; ++j) {
          const float* wr = pwsh + j * dh;
          float shift = 0.f;
          for (int64_t k = 0; k < dh; ++k) shift += wr[k] * hsum[k];
          yr[j] = (acc[j] + shift + deg * pbsh[j]) * inv;
        }
      }
    }
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(nino_fast, CPU, m) {
  m.impl("edge_film_mean", &edge_film_mean_cpu);
}

}  // namespace nino_fast::cpu
