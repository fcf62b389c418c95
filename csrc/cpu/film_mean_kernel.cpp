// CPU film_mean: FiLM message + mean aggregation over destination-sorted CSR (spec:
// reference.film_mean).
//
// Per tile of edges, one GEMM gives the scale half [W_sc e + b_sc + table_sc[t]]; the epilogue
// multiplies it by (node_dst[n] + node_src[src]) and accumulates into the row, in edge order. The
// shift half is linear in the edge features, so it is not computed per edge: sum_e shift_e = W_sh
// (sum_e e) + deg b_sh
// + sum_e table_sh[t_e], one GEMV per row.
#include <torch/library.h>

#include "cpu/film_mean_common.h"

namespace nino_fast::cpu {
namespace {

at::Tensor film_mean_cpu(const FilmMeanArgs& a) {
  constexpr const char* op = "nino_fast::film_mean";
  const FilmMeanInputs in(op, a);
  const auto &feat = in.feat, &rowptr = in.rowptr, &src = in.src, &nd = in.nd, &ns = in.ns;
  const auto &w_sh = in.w_sh, &b_sh = in.b_sh;
  const auto& tab_sh = in.tab_sh;
  const AffineStage& scale = in.scale;
  const int64_t c = in.c, n = in.n, d = in.d;
  auto out = pooled_empty({n, d}, feat.options());
  if (n == 0 || d == 0) return out;

  const int64_t* rp = rowptr.data_ptr<int64_t>();
  const int32_t* s = src.data_ptr<int32_t>();
  const float *pnd = nd.data_ptr<float>(), *pns = ns.data_ptr<float>();
  const float* ptsh = tab_sh ? tab_sh->data_ptr<float>() : nullptr;
  const float* ptsc = scale.tab();
  const int64_t* pet = scale.et();
  const float* pbsc = scale.bias_p.data();
  const Floats bshp = padded_copy(b_sh);
  const PackedB shift_w(w_sh.data_ptr<float>(), d, c);
  float* y = out.data_ptr<float>();
  const int64_t np = padded(d);
  const FilmRowTasks rows(rp, n, np, c, shift_w, bshp.data(), y, d);

  run_dynamic(rows.count(), [&](auto claim) {
    Floats part(kTile * np), fpart(kTile * c), gtile(kTile * np);
    Floats xbuf(in.feat_index.defined() ? kTile * c : 0);  // gathered feature rows
    TileRows tr;
    const float* g = gtile.data();
    float* pt = part.data();
    const int32_t* seg = tr.seg;
    // the shift half is linear in x: its rows sum x (fpart)
    rows.run(claim, tr, part, fpart, [&](int64_t t0, int64_t m, std::pair<int64_t, int64_t> next) {
      const auto [p0, n1] = next;
      NextTilePrefetch pf;
      pf.reset(n1);
      pf.add_feat(in, p0), pf.add(pns, s + p0, d);
      gather_add(pnd, tr.dsti, pns, s + t0, m, d, gtile.data(), np);
      const float* xt = in.tile(t0, m, xbuf.data());
      const int64_t* et = pet ? pet + t0 : nullptr;  // the tile's edge types
      // per edge: (W_sc x + b_sc + T_sc[t]) * (node_dst[n] + node_src[src]) + T_sh[t], summed per
      // row; captured by value (see gemm_ep)
      auto scale_ep = [pf, pbsc, ptsc, ptsh, et, g, pt, seg, d, np](int64_t i, int64_t col0, V16 v)
                          NINO_FAST_LAMBDA_INLINE {
        const int64_t valid = d - col0;
        pf(i, col0);
        V16 t = vzero16();
        v = vadd(v, vld16(pbsc + col0));
        if (ptsc) {
          v = vadd(v, load16(ptsc + et[i] * d + col0, valid));
          t = load16(ptsh + et[i] * d + col0, valid);
        }
        const V16 gi = vld16(g + i * np + col0);  // node_dst[n] + node_src[src]
        float* pp = pt + seg[i] * np + col0;
        vst16(pp, vadd(vld16(pp), vfma(v, gi, t)));
      };
      gemm_ep(xt, c, m, scale.w, scale_ep);
      for (int64_t i = 0; i < m; ++i) add_inplace(fpart.data() + tr.seg[i] * c, xt + i * c, c);
    });
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(nino_fast, CPU, m) {
  m.impl("film_mean", &film_mean_entry<film_mean_cpu>);
}

}  // namespace nino_fast::cpu
