// CPU film_mean_backward: the gradients of film_mean (forward: film_mean_kernel.cpp; formulas:
// nino_fast/ops/backward.py, film_mean) in one pass over the destination-sorted edges. With gn =
// grad_out / deg (per row) and gm = gn[dst], per tile:
//
//   sc  = W_sc e + b_sc + table_sc[t]                     (recomputed, GEMM 1; epilogue:)
//   dsc = gm * (node_dst[dst] + node_src[src]),  row sums of sc and of e,  gm * sc (d node_src),
//         the scale half's table gradient: rows of dsc summed per edge type; in-edges per (row,
//         type)
//   dW_sc += dsc^T e,  db_sc += sum dsc                   (outer products)
//   d feat = dsc W_sc + (gn W_sh)[dst]                    (GEMM 2, when needed)
//
// then, per row: d node_dst = grad_out * mean sc, dW_sh = gn^T (row sums of e), db_sh = sum gn deg,
// the shift half's table gradient sum_n count[n, t] gn[n] (a row's gm is the same on all its edges:
// summing it per edge would add rounding error on rows with thousands of edges);
// and the column-parallel scatter of gm * sc into d node_src. Row tasks, per-task partials summed
// in task order: deterministic, independent of the thread count (backward_common.h).
#include <torch/library.h>

#include <vector>

#include "cpu/backward_common.h"
#include "cpu/film_mean_common.h"

namespace nino_fast::cpu {
namespace {

std::vector<at::Tensor> film_mean_backward_cpu(const FilmMeanBackwardArgs& b) {
  constexpr const char* op = "nino_fast::film_mean_backward";
  const FilmMeanInputs in(op, b.fwd);
  const bool need_feat = b.need_feat;
  const AffineStage& stage = in.scale;
  const int64_t e_total = in.e_total, c = in.c, n = in.n, d = in.d;
  auto gout = f32(op, "grad_out", b.grad_out, 2);
  check_shape(op, "grad_out", gout, {n, d});
  const auto opt = in.feat.options();
  const int64_t np = padded(d), npc = padded(c);
  const int64_t n_src = in.ns.size(0), types = stage.types;
  const bool has_tab = stage.table.defined();
  const int64_t* rp = in.rowptr.data_ptr<int64_t>();
  const float* go = gout.data_ptr<float>();

  auto d_feat = need_feat ? pooled_empty({e_total, c}, opt) : at::empty({0}, opt);
  auto d_ns = at::zeros({n_src, d}, opt), d_nd = at::empty({n, d}, opt);

  const MeanGrad mg(rp, go, n, d);  // gn = grad_out / deg per row
  // gn W_sh (n x c, padded): the shift half's part of d feat
  const Floats gsh = need_feat ? mg.times(in.w_sh) : Floats();
  Floats scsum(n * np, 0.f), fsum(n * npc, 0.f);
  const auto tasks = row_tasks(rp, n);
  const int64_t n_tasks = int64_t(tasks.size()) - 1;
  enum { kWsc, kTsc };
  ChunkPartials parts({d * npc, types * np}, std::max<int64_t>(n_tasks, 1));
  ColumnSums bias_sums({d}, std::max<int64_t>(n_tasks, 1));
  std::vector<int64_t> tcount(has_tab ? n * types : 0, 0);  // in-edges per (row, type)
  WaveRows gsc(d, {{d_ns.data_ptr<float>(), in.src.data_ptr<int32_t>(), nullptr}});  // gm * sc

  if (e_total > 0) {
    const int32_t* s = in.src.data_ptr<int32_t>();
    const float *pnd = in.nd.data_ptr<float>(), *pns = in.ns.data_ptr<float>();
    const int64_t* pet = stage.et();
    const float* ptab = stage.tab();
    const auto w_sc = in.w.narrow(0, 0, d);
    const auto wsc_t = need_feat ? w_sc.t().contiguous() : at::Tensor();
    const PackedB wsc_tp = need_feat ? PackedB(wsc_t.data_ptr<float>(), c, d) : PackedB();
    float* pdf = need_feat ? d_feat.data_ptr<float>() : nullptr;
    auto task_lo = [&](int64_t u) { return rp[tasks[u]]; };

    run_waves(n_tasks, task_lo, {&gsc}, [&](auto claim) {
      Floats gv(kTile * np), dsct(kTile * np);
      Floats xbuf(in.feat_index.defined() ? kTile * c : 0);  // gathered feature rows
      int64_t dsti[kTile];
      StagedPartials staged(parts);
      float* const p_wsc = staged.at(kWsc);
      float* const p_tsc = staged.at(kTsc);
      // the epilogues' operands, held by value (see gemm_ep)
      const int64_t* const di = dsti;
      const float *const bias = stage.bias_p.data(), *const gm0 = mg.row(0), *const gvt = gv.data();
      const float* const gsh0 = gsh.data();
      float *const scs = scsum.data(), *const dsc_t = dsct.data();
      for (int64_t task; (task = claim()) >= 0;) {
        staged.start(task);
        double* const p_bsc = bias_sums.at(task, 0);
        const int64_t end = rp[tasks[task + 1]];
        for_each_row_tile(rp, tasks[task], tasks[task + 1], dsti, [&](int64_t t0, int64_t m) {
          NextTilePrefetch pf;
          pf.reset(std::min(kTile, end - (t0 + m)));  // the task's next tile
          pf.add_feat(in, t0 + m), pf.add(pns, s + t0 + m, d);
          const int64_t* const et = pet ? pet + t0 : nullptr;  // the tile's edge types
          float* const gsc_t = gsc.row(t0);                    // the tile's gm * sc rows
          auto ep_sc = [pf, di, bias, et, ptab, d, np, scs, gm0, gvt, dsc_t, gsc_t, p_tsc](
                           int64_t i, int64_t col0, V16 v) NINO_FAST_LAMBDA_INLINE {
            const int64_t r = di[i];
            pf(i, col0);
            v = vadd(v, vld16(bias + col0));
            if (et) v = vadd(v, load16(ptab + et[i] * d + col0, d - col0));
            float* row = scs + r * np + col0;
            vst16(row, vadd(vld16(row), v));
            const V16 gm = vld16(gm0 + r * np + col0);
            const V16 dsc = vmul(gm, vld16(gvt + i * np + col0));
            vst16(dsc_t + i * np + col0, dsc);
            store16(gsc_t + i * d + col0, d - col0, vmul(gm, v));
            if (et) {
              float* ts = p_tsc + et[i] * np + col0;
              vst16(ts, vadd(vld16(ts), dsc));
            }
          };
          const FeatGradEp feat_rows = feat_grad_rows(in, pdf, t0);
          auto ep_feat = [di, gsh0, npc, feat_rows](int64_t i, int64_t col0, V16 v)
                             NINO_FAST_LAMBDA_INLINE {
            feat_rows(i, col0, vadd(v, vld16(gsh0 + di[i] * npc + col0)));
          };
          const float* xt = in.tile(t0, m, xbuf.data());
          for (int64_t i = 0; i < m; ++i) {
            const int64_t r = dsti[i];
            if (pet) ++tcount[r * types + pet[t0 + i]];
            float* fr = fsum.data() + r * npc;
            for (int64_t col0 = 0; col0 < c; col0 += kPanel)
              vst16(fr + col0, vadd(vld16(fr + col0), load16(xt + i * c + col0, c - col0)));
          }
          gather_add(pnd, dsti, pns, s + t0, m, d, gv.data(), np);
          gemm_ep(xt, c, m, stage.w, ep_sc);
          outer_acc(dsct.data(), np, d, xt, c, c, m, p_wsc, npc);
          colsum_acc(dsct.data(), np, d, m, p_bsc);
          if (pdf) gemm_ep(dsct.data(), np, m, wsc_tp, ep_feat);
          staged.tile_done();
        });
        staged.finish();
      }
      stream_fence();
    });
  }
  mg.times_scale_mean(scsum.data(), d_nd.data_ptr<float>());
  // weight and bias: [scale half; shift half]
  auto d_w = at::empty({2 * d, c}, opt), d_b = at::empty({2 * d}, opt);
  d_w.narrow(0, 0, d).copy_(reduced(parts, kWsc, d, c, npc, opt));
  mg.weight_grad(fsum.data(), c, d_w.data_ptr<float>() + d * c);
  d_b.narrow(0, 0, d).copy_(bias_sums.reduced(0, d, opt));
  mg.bias_grad(d_b.data_ptr<float>() + d);
  at::Tensor d_tab = at::empty({0}, opt);
  if (has_tab) {
    d_tab = at::zeros({types, 2 * d}, opt);
    d_tab.narrow(1, 0, d).copy_(reduced(parts, kTsc, types, d, np, opt));
    float* pt = d_tab.data_ptr<float>();
    for (int64_t r = 0; r < n; ++r)
      for (int64_t ty = 0; ty < types; ++ty)
        if (const int64_t k = tcount[r * types + ty])
          for (int64_t j = 0; j < d; ++j) pt[ty * 2 * d + d + j] += float(k) * mg.row(r)[j];
  }
  return {d_feat, d_nd, d_ns, d_w, d_b, d_tab};
}

}  // namespace

TORCH_LIBRARY_IMPL(nino_fast, CPU, m) {
  m.impl("film_mean_backward", &film_mean_backward_entry<film_mean_backward_cpu>);
}

}  // namespace nino_fast::cpu
