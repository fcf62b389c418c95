// CPU edge_film_mean_backward: the gradients of edge_film_mean (forward:
// edge_film_mean_kernel.cpp; formulas: nino_fast/ops/backward.py, edge_film_mean) in one pass over
// the destination-sorted edges. With gn = grad_out / deg (per row) and gm = gn[dst], per tile:
//
//   a = W_a e + b_a + table[t] + s[src] + t[dst],  h = silu(a)           (recomputed, GEMM 1)
//   sc = W_sc h + b_sc                                                   (GEMM 2; epilogue:)
//   dsc = gm * (msg_dst[dst] + msg_src[src]),  row sums of h and sc,  gm * sc (for d msg_src)
//   dW_sc += dsc^T h,  db_sc += sum dsc                                  (outer products)
//   da = (dsc W_sc + (gn W_sh)[dst]) * silu'(a)                          (GEMM 3)
//   dW_a += da^T e,  db_a += sum da,  row sums of da,  d feat = da W_a   (outer products, GEMM 4)
//
// then, per row: d msg_dst = grad_out * mean sc, dW_sh = gn^T (row sums of h), db_sh = sum gn deg,
// d node_dst = row sums of da; and the column-parallel scatters of da (table, node_src) and gm * sc
// (msg_src). Work is split into the forward's row tasks (whole rows, a partition that depends on
// rowptr only): each row's sums run in edge order inside one task, and the weight gradients are
// summed per task and the tasks in order, so nothing depends on the thread count.
#include <torch/library.h>

#include <vector>

#include "cpu/backward_common.h"
#include "cpu/edge_film_mean_common.h"

namespace nino_fast::cpu {
namespace {

// row[dst] += v over 16 floats (padded widths)
NINO_FAST_INLINE void row_add(float* row, V16 v) {
  vst16(row, vadd(vld16(row), v));
}

std::vector<at::Tensor> edge_film_mean_backward_cpu(const EdgeFilmMeanBackwardArgs& b) {
  constexpr const char* op = "nino_fast::edge_film_mean_backward";
  const EdgeFilmMeanInputs in(op, b.fwd);
  const bool need_feat = b.need_feat;
  const AffineStage& stage = in.stage;
  const int64_t e_total = in.e_total, c = in.c, n = in.n, dh = in.dh, d = in.d;
  auto gout = f32(op, "grad_out", b.grad_out, 2);
  check_shape(op, "grad_out", gout, {n, d});
  const auto opt = in.feat.options();
  const int64_t nph = padded(dh), np = padded(d), npc = padded(c);
  const int64_t n_src = in.ns.size(0);
  const bool has_tab = stage.table.defined();
  const int64_t* rp = in.rowptr.data_ptr<int64_t>();

  auto d_feat = need_feat ? pooled_empty({e_total, c}, opt) : at::empty({0}, opt);
  auto d_tab = has_tab ? at::zeros({stage.types, dh}, opt) : at::empty({0}, opt);
  auto d_ns = at::zeros({n_src, dh}, opt), d_ms = at::zeros({n_src, d}, opt);
  auto d_nd = at::zeros({n, dh}, opt), d_md = at::empty({n, d}, opt);
  auto d_wsh = at::empty({d, dh}, opt), d_bsh = at::empty({d}, opt);

  // per row: gn = grad_out / deg and G = gn W_sh (the shift half's edge term)
  const MeanGrad mg(rp, gout.data_ptr<float>(), n, d);
  const Floats gsh = mg.times(in.wsh);
  // per-row sums, each row owned by one task
  Floats hsum(n * nph, 0.f), scsum(n * np, 0.f), dasum(n * nph, 0.f);
  const auto tasks = row_tasks(rp, n);
  const int64_t n_tasks = int64_t(tasks.size()) - 1;
  enum { kWa, kWsc };
  enum { kBa, kBsc };
  ChunkPartials parts({dh * npc, d * nph}, std::max<int64_t>(n_tasks, 1));
  ColumnSums bias_sums({dh, d}, std::max<int64_t>(n_tasks, 1));
  const int32_t* s = in.src.data_ptr<int32_t>();
  std::vector<ScatterTarget> to_da{{d_ns.data_ptr<float>(), s, nullptr}};
  if (has_tab) to_da.push_back({d_tab.data_ptr<float>(), nullptr, stage.et()});
  WaveRows da(dh, to_da), gsc(d, {{d_ms.data_ptr<float>(), s, nullptr}});  // da, gm * sc

  if (e_total > 0) {
    const float *pns = in.ns.data_ptr<float>(), *pnd = in.nd.data_ptr<float>();
    const float *pmd = in.md.data_ptr<float>(), *pms = in.ms.data_ptr<float>();
    const Floats bscp = padded_copy(in.bsc);
    const PackedB wsc_p(in.wsc.data_ptr<float>(), d, dh);
    const auto wsc_t = in.wsc.t().contiguous();
    const PackedB wsc_tp(wsc_t.data_ptr<float>(), dh, d);
    const auto wa_t = need_feat ? b.fwd.weight_a.to(at::kFloat).t().contiguous() : at::Tensor();
    const PackedB wat_p = need_feat ? PackedB(wa_t.data_ptr<float>(), c, dh) : PackedB();
    float* pdf = need_feat ? d_feat.data_ptr<float>() : nullptr;
    auto task_lo = [&](int64_t u) { return rp[tasks[u]]; };

    run_waves(n_tasks, task_lo, {&da, &gsc}, [&](auto claim) {
      Floats atile(kTile * nph), htile(kTile * nph), datile(kTile * nph);
      Floats gh(kTile * nph), gv(kTile * np), dsct(kTile * np), gsct(kTile * np);
      Floats xbuf(in.feat_index.defined() ? kTile * c : 0);  // gathered feature rows
      int64_t dsti[kTile];
      AffineEp first(stage, false);
      first.out = atile.data(), first.ldo = nph;
      NextTilePrefetch& pf = first.pf;
      StagedPartials staged(parts);
      float *const p_wa = staged.at(kWa), *const p_wsc = staged.at(kWsc);
      // the epilogues, their operands held by value (see gemm_ep)
      const int64_t* const di = dsti;
      auto ep_sc = [di, bsc = bscp.data(), scs = scsum.data(), gm0 = mg.row(0), gvt = gv.data(),
                    dsc_t = dsct.data(), gsc_t = gsct.data(), np](int64_t i, int64_t col0, V16 v)
                       NINO_FAST_LAMBDA_INLINE {
        const int64_t r = di[i];
        v = vadd(v, vld16(bsc + col0));  // sc
        row_add(scs + r * np + col0, v);
        const V16 gm = vld16(gm0 + r * np + col0);
        vst16(dsc_t + i * np + col0, vmul(gm, vld16(gvt + i * np + col0)));
        vst16(gsc_t + i * np + col0, vmul(gm, v));
      };
      auto ep_a = [di, gsh0 = gsh.data(), pre = atile.data(), dat = datile.data(),
                   das = dasum.data(), nph](int64_t i, int64_t col0, V16 v)
                      NINO_FAST_LAMBDA_INLINE {
        const int64_t r = di[i];
        v = vadd(v, vld16(gsh0 + r * nph + col0));
        v = vmul(v, vsilu_grad(vld16(pre + i * nph + col0)));
        vst16(dat + i * nph + col0, v);
        row_add(das + r * nph + col0, v);
      };
      for (int64_t task; (task = claim()) >= 0;) {
        staged.start(task);
        double *const p_ba = bias_sums.at(task, kBa), *const p_bsc = bias_sums.at(task, kBsc);
        const int64_t end = rp[tasks[task + 1]];
        for_each_row_tile(rp, tasks[task], tasks[task + 1], dsti, [&](int64_t t0, int64_t m) {
          first.e0 = t0;
          pf.reset(std::min(kTile, end - (t0 + m)));  // the task's next tile
          pf.add_feat(in, t0 + m), pf.add(pns, s + t0 + m, dh);
          pf.add(pms, s + t0 + m, d);
          gather_add(pns, s + t0, pnd, dsti, m, dh, gh.data(), nph), first.gsum = gh.data();
          gather_add(pmd, dsti, pms, s + t0, m, d, gv.data(), np);
          const float* xt = in.tile(t0, m, xbuf.data());
          gemm_ep(xt, c, m, stage.w, first);  // a
          for (int64_t i = 0; i < m; ++i)
            for (int64_t col0 = 0; col0 < nph; col0 += kPanel) {
              const V16 h = vsilu(vld16(atile.data() + i * nph + col0));
              vst16(htile.data() + i * nph + col0, h);
              row_add(hsum.data() + dsti[i] * nph + col0, h);
            }
          gemm_ep(htile.data(), nph, m, wsc_p, ep_sc);
          outer_acc(dsct.data(), np, d, htile.data(), nph, dh, m, p_wsc, nph);
          colsum_acc(dsct.data(), np, d, m, p_bsc);
          gsc.put(gsct.data(), np, t0, m);
          gemm_ep(dsct.data(), np, m, wsc_tp, ep_a);  // da
          outer_acc(datile.data(), nph, dh, xt, c, c, m, p_wa, npc);
          colsum_acc(datile.data(), nph, dh, m, p_ba);
          da.put(datile.data(), nph, t0, m);
          if (pdf) gemm_ep(datile.data(), nph, m, wat_p, feat_grad_rows(in, pdf, t0));
          staged.tile_done();
        });
        staged.finish();
      }
      stream_fence();
    });
  }
  // row-level gradients
  mg.times_scale_mean(scsum.data(), d_md.data_ptr<float>());
  float* pndg = d_nd.data_ptr<float>();
  for (int64_t r = 0; r < n; ++r) std::copy(&dasum[r * nph], &dasum[r * nph] + dh, pndg + r * dh);
  mg.weight_grad(hsum.data(), dh, d_wsh.data_ptr<float>());
  mg.bias_grad(d_bsh.data_ptr<float>());
  auto d_wa = reduced(parts, kWa, dh, c, npc, opt);
  auto d_wsc = reduced(parts, kWsc, d, dh, nph, opt);
  auto d_ba = bias_sums.reduced(kBa, dh, opt), d_bsc = bias_sums.reduced(kBsc, d, opt);
  return {d_feat, d_wa, d_ba, d_tab, d_ns, d_nd, d_md, d_ms, d_wsc, d_bsc, d_wsh, d_bsh};
}

}  // namespace

TORCH_LIBRARY_IMPL(nino_fast, CPU, m) {
  m.impl("edge_film_mean_backward", &edge_film_mean_backward_entry<edge_film_mean_backward_cpu>);
}

}  // namespace nino_fast::cpu
