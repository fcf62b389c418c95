// CPU edge_film_mean: layer l's edge update fused with layer l+1's FiLM message + mean
// (spec: reference.edge_film_mean). Per tile: GEMM 1 gives h = silu(W_a e + b_a + table[t] + s[src]
// + t[n]), GEMM 2 the scale half W_sc h + b_sc; the epilogue accumulates scale * (msg_dst[n] +
// msg_src[src]) and sum_e h into the row. The shift half is one GEMV per row: W_sh (sum_e h) + deg
// b_sh. h never leaves L1/L2.
#include <torch/library.h>

#include "cpu/edge_film_mean_common.h"

namespace nino_fast::cpu {
namespace {

at::Tensor edge_film_mean_cpu(const EdgeFilmMeanArgs& a) {
  constexpr const char* op = "nino_fast::edge_film_mean";
  const EdgeFilmMeanInputs in(op, a);
  const auto &feat = in.feat, &rowptr = in.rowptr, &src = in.src;
  const AffineStage& stage = in.stage;
  const int64_t c = in.c, n = in.n, dh = in.dh, d = in.d;
  const PackedB scale(in.wsc.data_ptr<float>(), d, dh);
  auto out = pooled_empty({n, d}, feat.options());
  if (n == 0 || d == 0) return out;

  const int64_t* rp = rowptr.data_ptr<int64_t>();
  const int32_t* s = src.data_ptr<int32_t>();
  const float *pns = in.ns.data_ptr<float>(), *pnd = in.nd.data_ptr<float>();
  const float *pmd = in.md.data_ptr<float>(), *pms = in.ms.data_ptr<float>();
  const Floats bscp = padded_copy(in.bsc), bshp = padded_copy(in.bsh);
  const PackedB shift_w(in.wsh.data_ptr<float>(), d, dh);
  float* y = out.data_ptr<float>();
  const int64_t nph = padded(dh), np = padded(d);
  const FilmRowTasks rows(rp, n, np, nph, shift_w, bshp.data(), y, d);

  run_dynamic(rows.count(), [&](auto claim) {
    Floats htile(kTile * nph), part(kTile * np), hpart(kTile * nph);
    Floats gh(kTile * nph), gm(kTile * np);                // the tile's gathered node terms
    Floats xbuf(in.feat_index.defined() ? kTile * c : 0);  // gathered feature rows
    TileRows tr;
    AffineEp first(stage, true);
    first.out = htile.data(), first.ldo = nph;
    first.hpart = hpart.data(), first.seg = tr.seg, first.ldp = nph;
    const float *bsc = bscp.data(), *g = gm.data();
    float* pt = part.data();
    const int32_t* seg = tr.seg;
    // the shift half is linear in h: its rows sum h (hpart, filled by the first GEMM's epilogue)
    rows.run(claim, tr, part, hpart, [&](int64_t t0, int64_t m, std::pair<int64_t, int64_t> next) {
      const auto [p0, n1] = next;
      NextTilePrefetch pf;
      first.pf.reset(n1), pf.reset(n1);
      first.pf.add_feat(in, p0), first.pf.add(pns, s + p0, dh), pf.add(pms, s + p0, d);
      first.e0 = t0;
      gather_add(pns, s + t0, pnd, tr.dsti, m, dh, gh.data(), nph), first.gsum = gh.data();
      gather_add(pmd, tr.dsti, pms, s + t0, m, d, gm.data(), np);
      // h = silu(...) into htile, sum_e h into hpart
      gemm_ep(in.tile(t0, m, xbuf.data()), c, m, stage.w, first);
      // per edge: (W_sc h + b_sc) * (msg_dst[n] + msg_src[src]), summed per row; captured by
      // value (see gemm_ep)
      auto scale_ep = [pf, bsc, g, pt, seg, np](int64_t i, int64_t col0, V16 v)
                          NINO_FAST_LAMBDA_INLINE {
        pf(i, col0);
        v = vadd(v, vld16(bsc + col0));
        const V16 gi = vld16(g + i * np + col0);  // msg_dst[n] + msg_src[src]
        float* pp = pt + seg[i] * np + col0;
        vst16(pp, vfma(v, gi, vld16(pp)));
      };
      gemm_ep(htile.data(), nph, m, scale, scale_ep);
    });
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(nino_fast, CPU, m) {
  m.impl("edge_film_mean", &edge_film_mean_entry<edge_film_mean_cpu>);
}

}  // namespace nino_fast::cpu
