// CPU edge_mlp: out = W_b silu(W_a e + b_a + table[t] + s[src] + t[dst]) + b_b (+ s2[src] +
// t2[dst]), optionally SiLU (spec: reference.edge_mlp). Tiles of edges claimed dynamically (no
// reduction); both GEMMs apply their epilogue in registers and
// the hidden tile stays in L1 between the two GEMMs.
#include <torch/library.h>

#include "cpu/edge_mlp_common.h"

namespace nino_fast::cpu {
namespace {

constexpr int64_t kDotOut = 4;  // second stages this narrow (and plain) run as dot products

at::Tensor edge_mlp_cpu(const EdgeMlpArgs& a) {
  constexpr const char* op = "nino_fast::edge_mlp";
  const EdgeMlpInputs in(op, a);
  const auto& feat = in.feat;
  const auto &src = in.src, &dst = in.dst, &wb = in.wb, &bb = in.bb;
  const AffineStage& stage = in.stage;
  const int64_t e_total = in.e_total, c = in.c, dh = in.dh, dout = in.dout;
  auto out = pooled_empty({e_total, dout}, feat.options());
  if (e_total == 0 || dout == 0) return out;

  const float* x = feat.data_ptr<float>();
  const int32_t *s = src.data_ptr<int32_t>(), *t = dst.data_ptr<int32_t>();
  const float *pns = in.ptr(in.ns), *pnd = in.ptr(in.nd);
  const float *pns2 = in.ptr(in.ns2), *pnd2 = in.ptr(in.nd2);
  const std::vector<float> bbp = padded_copy(bb);
  float* y = out.data_ptr<float>();
  const int64_t nph = padded(dh);
  const int64_t n_tiles = (e_total + kTile - 1) / kTile;
  // A second stage of at most kDotOut plain outputs (the model's head: one per feature slot) runs
  // as dot products over each hidden row, not as a GEMM whose panel would be 16 columns wide.
  const bool act_out = a.act_out;
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
  m.impl("edge_mlp", &edge_mlp_entry<edge_mlp_cpu>);
}

}  // namespace nino_fast::cpu
