// CPU edge_mlp: out = W_b silu(W_a e + b_a + table[t] + s[src] + t[dst]) + b_b (+ s2[src] +
// t2[dst]), optionally SiLU (spec: reference.edge_mlp). Tiles of edges claimed dynamically (no
// reduction); both GEMMs apply their epilogue in registers and
// the hidden tile stays in L1 between the two GEMMs.
#include <torch/library.h>

#include "cpu/fused_common.h"

namespace nino_fast::cpu {
namespace {

constexpr int64_t kDotOut = 4;  // second stages this narrow (and plain) run as dot products

at::Tensor edge_mlp_cpu(const at::Tensor& feat_in, const at::Tensor& src_in,
                        const at::Tensor& dst_in, const at::Tensor& weight_a,
                        const at::Tensor& bias_a, const at::Tensor& weight_b,
                        const at::Tensor& bias_b, const std::optional<at::Tensor>& etype,
                        const std::optional<at::Tensor>& type_table,
                        const std::optional<at::Tensor>& node_src,
                        const std::optional<at::Tensor>& node_dst,
                        const std::optional<at::Tensor>& node_src2,
                        const std::optional<at::Tensor>& node_dst2, bool act_out) {
  constexpr const char* op = "nino_fast::edge_mlp";
  auto feat = f32(op, "feat", feat_in, 2);
  const int64_t e_total = feat.size(0), c = feat.size(1);
  auto src = idx32(op, "src", src_in, e_total);
  auto dst = idx32(op, "dst", dst_in, e_total);
  AffineStage stage(op, "weight_a", weight_a, bias_a, etype, type_table, c, e_total);
  const int64_t dh = stage.d;
  auto wb = f32(op, "weight_b", weight_b, 2);
  NINO_CHECK(wb.size(1) == dh, op, ": weight_b must be (D_out, ", dh, "), got ",
             shape_str(weight_b));
  const int64_t dout = wb.size(0);
  auto bb = f32(op, "bias_b", bias_b, 1);
  NINO_CHECK(bb.numel() == dout, op, ": bias_b must have ", dout, " entries, got ", bb.numel());
  NINO_CHECK(node_src.has_value() == node_dst.has_value() &&
                 node_src2.has_value() == node_dst2.has_value(),
             op, ": node_src/node_dst (and node_src2/node_dst2) go together");
  at::Tensor ns, nd, ns2, nd2;
  int64_t rows = -1;  // gather tables' row count (all must agree)
  auto table = [&](const char* arg, const std::optional<at::Tensor>& t, int64_t width) {
    auto v = f32(op, arg, *t, 2);
    NINO_CHECK(v.size(1) == width, op, ": ", arg, " must have ", width, " columns, got ",
               shape_str(*t));
    NINO_CHECK(rows < 0 || v.size(0) == rows, op, ": ", arg, " must have ", rows, " rows, got ",
               v.size(0));
    rows = v.size(0);
    return v;
  };
  if (node_src) ns = table("node_src", node_src, dh), nd = table("node_dst", node_dst, dh);
  if (node_src2)
    ns2 = table("node_src2", node_src2, dout), nd2 = table("node_dst2", node_dst2, dout);
  if (rows >= 0 && e_total > 0) {
    const int64_t lo = std::min(src.min().item<int32_t>(), dst.min().item<int32_t>());
    const int64_t hi = std::max(src.max().item<int32_t>(), dst.max().item<int32_t>());
    NINO_CHECK(lo >= 0 && hi < rows, op, ": src/dst values must index the node tables' ", rows,
               " rows, got [", lo, ", ", hi, "]");
  }
  auto out = pooled_empty({e_total, dout}, feat.options());
  if (e_total == 0 || dout == 0) return out;

  const float* x = feat.data_ptr<float>();
  const int32_t *s = src.data_ptr<int32_t>(), *t = dst.data_ptr<int32_t>();
  const float* pns = ns.defined() ? ns.data_ptr<float>() : nullptr;
  const float* pnd = nd.defined() ? nd.data_ptr<float>() : nullptr;
  const float* pns2 = ns2.defined() ? ns2.data_ptr<float>() : nullptr;
  const float* pnd2 = nd2.defined() ? nd2.data_ptr<float>() : nullptr;
  const std::vector<float> bbp = padded_copy(bb);
  float* y = out.data_ptr<float>();
  const int64_t nph = padded(dh);
  const int64_t n_tiles = (e_total + kTile - 1) / kTile;
  // A second stage of at most kDotOut plain outputs (the model's head: one per feature slot) runs
  // as dot products over each hidden row, not as a GEMM whose panel would be 16 columns wide.
  const bool dot_out = dout <= kDotOut && !pns2 && !act_out;
  std::vector<float> wbrows(dot_out ? dout * nph : 0, 0.f);  // weight_b rows zero-padded to nph
  for (int64_t j = 0; dot_out && j < dout; ++j)
    std::copy(wb.data_ptr<float>() + j * dh, wb.data_ptr<float>() + (j + 1) * dh,
              wbrows.begin() + j * nph);
  const PackedB second =
      dot_out ? PackedB() : PackedB(wb.data_ptr<float>(), dout, dh);  // GEMM path only

  run_dynamic(n_tiles, [&](auto claim) {
    const int64_t npo = padded(dout);
    std::vector<float> htile(kTile * nph), gtile(pns ? kTile * nph : 0);
    std::vector<float> gtile2(pns2 ? kTile * npo : 0);  // the second stage's gathered node terms
    int64_t dsti[kTile];
    NextTilePrefetch pf1, pf2;
    AffineEp first(stage, true);
    first.pf = &pf1;
    first.out = htile.data(), first.ldo = nph;
    int64_t e0 = 0;
    // second GEMM's epilogue: y[e] = [silu](acc + b_b (+ s2[src] + t2[dst])), written straight out
    auto second_ep = [&](int64_t i, int64_t col0, V16 v) NINO_FAST_LAMBDA_INLINE {
      const int64_t e = e0 + i, valid = dout - col0;
      pf2(i, col0);
      v = vadd(v, vld16(bbp.data() + col0));
      if (pns2) v = vadd(v, vld16(gtile2.data() + i * npo + col0));  // s2[src] + t2[dst]
      if (act_out) v = vsilu(v);
      store16(y + e * dout + col0, valid, v);
    };
    auto cursor = claim_cursor(claim, [&](int64_t u) {
      return std::pair<int64_t, int64_t>{u * kTile, std::min(e_total, (u + 1) * kTile)};
    });
    for (int64_t tile; (tile = cursor.take()) >= 0;) {
      e0 = tile * kTile;
      const int64_t m = std::min(kTile, e_total - e0);
      for (int64_t i = 0; i < m; ++i) dsti[i] = t[e0 + i];
      // the next tile's rows (each unit is one tile: the next unit's): x, and the src-indexed
      // tables (dst rows repeat: mostly cached)
      const auto [n0, n1] = cursor.after(e0 + m, e0 + m);
      pf1.reset(n1), pf2.reset(n1);
      pf1.add(x + n0 * c, nullptr, c), pf1.add(pns, s + n0, dh);
      pf2.add(pns2, s + n0, dout);
      first.e0 = e0;
      if (pns)
        gather_add(pns, s + e0, pnd, dsti, m, dh, gtile.data(), nph), first.gsum = gtile.data();
      gemm_ep(x + e0 * c, c, m, stage.w, first);
      if (dot_out) {
        for (int64_t i = 0; i < m; ++i)
          for (int64_t j = 0; j < dout; ++j)
            y[(e0 + i) * dout + j] =
                dot_padded(htile.data() + i * nph, wbrows.data() + j * nph, nph) + bbp[j];
        continue;
      }
      if (pns2) gather_add(pns2, s + e0, pnd2, dsti, m, dout, gtile2.data(), npo);
      gemm_ep(htile.data(), nph, m, second, second_ep);
    }
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(nino_fast, CPU, m) {
  m.impl("edge_mlp", &edge_mlp_cpu);
}

}  // namespace nino_fast::cpu
