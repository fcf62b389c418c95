// CPU edge_mlp_backward: the gradients of edge_mlp (forward: edge_mlp_kernel.cpp; formulas:
// nino_fast/ops/backward.py, edge_mlp) in one pass over tiles of edges. Per tile, in L1:
//
//   a  = W_a e + b_a + table[t] + s[src] + t[dst],  h = silu(a)          (recomputed, GEMM 1)
//   gz = grad_out * silu'(W_b h + b_b + s2[src] + t2[dst])  if act_out   (GEMM 2), else grad_out
//   dW_b += gz^T h,  db_b += sum gz                                      (outer products)
//   da = (gz W_b) * silu'(a)                                             (GEMM 3)
//   dW_a += da^T e,  db_a += sum da,  d feat = da W_a                    (outer products, GEMM 4)
//
// No (E, D) intermediate is written: the per-edge rows that the node / type gradients need (da
// when table or node_src/node_dst are given, gz when node_src2/node_dst2 are) are kept for one
// wave of ~64K edges and scattered by a column-parallel pass after it (backward_common.h:
// run_waves; deterministic, no atomics). Weight gradients are summed per chunk of tiles (bias
// gradients in float64) and the chunks in a fixed order, so the results do not depend on the
// thread count.
#include <torch/library.h>

#include <vector>

#include "cpu/backward_common.h"
#include "cpu/edge_mlp_common.h"

namespace nino_fast::cpu {
namespace {

std::vector<at::Tensor> edge_mlp_backward_cpu(const EdgeMlpBackwardArgs& b) {
  constexpr const char* op = "nino_fast::edge_mlp_backward";
  const EdgeMlpInputs in(op, b.fwd);
  // the readout layers' gradients are composed around this kernel (nino_fast/ops/backward.py)
  NINO_CHECK(!in.has_readout(), op, ": takes no readout layers (weight_c, weight_d)");
  const bool act_out = b.fwd.act_out, need_feat = b.need_feat;
  const AffineStage& stage = in.stage;
  const int64_t e_total = in.e_total, c = in.c, dh = in.dh, dout = in.dout;
  auto gout = f32(op, "grad_out", b.grad_out, 2);
  check_shape(op, "grad_out", gout, {e_total, dout});
  const auto opt = in.feat.options();
  const int64_t nph = padded(dh), npo = padded(dout), npc = padded(c);

  const bool has_tab = stage.table.defined(), has_ns = in.ns.defined(), has_ns2 = in.ns2.defined();
  const int64_t n_rows = has_ns ? in.ns.size(0) : has_ns2 ? in.ns2.size(0) : 0;
  auto d_feat = need_feat ? pooled_empty({e_total, c}, opt) : at::empty({0}, opt);
  auto d_tab = has_tab ? at::zeros({stage.types, dh}, opt) : at::empty({0}, opt);
  auto d_ns = has_ns ? at::zeros({n_rows, dh}, opt) : at::empty({0}, opt);
  auto d_nd = has_ns ? at::zeros({n_rows, dh}, opt) : at::empty({0}, opt);
  auto d_ns2 = has_ns2 ? at::zeros({n_rows, dout}, opt) : at::empty({0}, opt);
  auto d_nd2 = has_ns2 ? at::zeros({n_rows, dout}, opt) : at::empty({0}, opt);

  const int64_t n_tiles = (e_total + kTile - 1) / kTile;
  const int64_t per_chunk = chunk_tiles(n_tiles);
  const int64_t n_chunks = (n_tiles + per_chunk - 1) / per_chunk;
  enum { kWa, kWb };
  enum { kBa, kBb };
  ChunkPartials parts({dh * npc, dout * nph}, std::max<int64_t>(n_chunks, 1));
  ColumnSums bias_sums({dh, dout}, std::max<int64_t>(n_chunks, 1));
  // per-edge rows kept for the scatter passes: da (table, node_src / node_dst) and gz (node_src2 /
  // node_dst2; grad_out itself without act_out)
  const int32_t *s = in.src.data_ptr<int32_t>(), *t = in.dst.data_ptr<int32_t>();
  std::vector<ScatterTarget> to_da, to_gz;
  if (has_tab) to_da.push_back({d_tab.data_ptr<float>(), nullptr, stage.et()});
  if (has_ns) {
    to_da.push_back({d_ns.data_ptr<float>(), s, nullptr});
    to_da.push_back({d_nd.data_ptr<float>(), t, nullptr});
  }
  if (has_ns2) {
    to_gz.push_back({d_ns2.data_ptr<float>(), s, nullptr});
    to_gz.push_back({d_nd2.data_ptr<float>(), t, nullptr});
  }
  WaveRows da(dh, to_da), gz_rows(dout, act_out ? to_gz : std::vector<ScatterTarget>());

  if (e_total > 0) {
    const float* x = in.feat.data_ptr<float>();
    const float* g = gout.data_ptr<float>();
    const float *pns = in.ptr(in.ns), *pnd = in.ptr(in.nd);
    const float *pns2 = in.ptr(in.ns2), *pnd2 = in.ptr(in.nd2);
    const Floats bbp = padded_copy(in.bb);
    const PackedB wb_p = act_out ? PackedB(in.wb.data_ptr<float>(), dout, dh) : PackedB();
    const auto wbt = in.wb.t().contiguous();
    const PackedB wbt_p(wbt.data_ptr<float>(), dh, dout);  // gz W_b: W_b^T as the (N x K) operand
    const auto wa_t = need_feat ? b.fwd.weight_a.to(at::kFloat).t().contiguous() : at::Tensor();
    const PackedB wat_p = need_feat ? PackedB(wa_t.data_ptr<float>(), c, dh) : PackedB();
    float* pdf = need_feat ? d_feat.data_ptr<float>() : nullptr;
    auto chunk_lo = [&](int64_t u) { return std::min(e_total, u * per_chunk * kTile); };

    run_waves(n_chunks, chunk_lo, {&da, &gz_rows}, [&](auto claim) {
      Floats atile(kTile * nph), htile(kTile * nph), datile(kTile * nph);
      Floats gtile(has_ns ? kTile * nph : 0), g2tile(has_ns2 ? kTile * npo : 0);
      Floats gztile(act_out ? kTile * npo : 0);
      AffineEp first(stage, false);
      first.out = atile.data(), first.ldo = nph;
      NextTilePrefetch& pf = first.pf;
      const float* gz = nullptr;  // this tile's gz rows
      int64_t ldg = 0;
      // the epilogues, their operands held by value (see gemm_ep)
      auto ep_a = [pre = atile.data(), dat = datile.data(), nph](int64_t i, int64_t col0, V16 v)
                      NINO_FAST_LAMBDA_INLINE {
        vst16(dat + i * nph + col0, vmul(v, vsilu_grad(vld16(pre + i * nph + col0))));
      };
      for (int64_t chunk; (chunk = claim()) >= 0;) {
        float *p_wa = parts.at(chunk, kWa), *p_wb = parts.at(chunk, kWb);
        double *p_ba = bias_sums.at(chunk, kBa), *p_bb = bias_sums.at(chunk, kBb);
        const int64_t t_end = std::min(n_tiles, (chunk + 1) * per_chunk);
        for (int64_t tile = chunk * per_chunk; tile < t_end; ++tile) {
          const int64_t e0 = tile * kTile;
          const int64_t m = std::min(kTile, e_total - e0);
          first.e0 = e0;
          pf.reset(tile + 1 < t_end ? std::min(kTile, e_total - (e0 + m)) : 0);  // the chunk's next
          pf.add(x + (e0 + m) * c, nullptr, c);
          if (pns) pf.add(pns, s + e0 + m, dh), pf.add(pnd, t + e0 + m, dh);
          if (!act_out) pf.add(g + (e0 + m) * dout, nullptr, dout);  // grad_out: outer_acc's rows
          if (pns)
            gather_add(pns, s + e0, pnd, t + e0, m, dh, gtile.data(), nph),
                first.gsum = gtile.data();
          gemm_ep(x + e0 * c, c, m, stage.w, first);  // a (padding columns 0)
          for (int64_t i = 0; i < m; ++i)
            for (int64_t col0 = 0; col0 < nph; col0 += kPanel)
              vst16(htile.data() + i * nph + col0, vsilu(vld16(atile.data() + i * nph + col0)));
          if (act_out) {
            if (pns2) gather_add(pns2, s + e0, pnd2, t + e0, m, dout, g2tile.data(), npo);
            auto ep_z = [bb = bbp.data(), g2 = pns2 ? g2tile.data() : nullptr, go_t = g + e0 * dout,
                         gzt = gztile.data(), npo, dout](int64_t i, int64_t col0, V16 v)
                            NINO_FAST_LAMBDA_INLINE {
              v = vadd(v, vld16(bb + col0));
              if (g2) v = vadd(v, vld16(g2 + i * npo + col0));
              const V16 go = load16(go_t + i * dout + col0, dout - col0);
              vst16(gzt + i * npo + col0, vmul(go, vsilu_grad(v)));
            };
            gemm_ep(htile.data(), nph, m, wb_p, ep_z);
            gz = gztile.data(), ldg = npo;
            gz_rows.put(gz, npo, e0, m);
          } else {
            gz = g + e0 * dout, ldg = dout;
          }
          outer_acc(gz, ldg, dout, htile.data(), nph, dh, m, p_wb, nph);
          colsum_acc(gz, ldg, dout, m, p_bb);
          gemm_ep(gz, ldg, m, wbt_p, ep_a);  // da
          outer_acc(datile.data(), nph, dh, x + e0 * c, c, c, m, p_wa, npc);
          colsum_acc(datile.data(), nph, dh, m, p_ba);
          da.put(datile.data(), nph, e0, m);
          if (pdf) gemm_ep(datile.data(), nph, m, wat_p, FeatGradEp{pdf + e0 * c, c});
        }
      }
      stream_fence();
    });
    if (!act_out) scatter_rows(g, 0, e_total, dout, dout, to_gz);  // gz = grad_out
  }
  auto d_wa = reduced(parts, kWa, dh, c, npc, opt);
  auto d_wb = reduced(parts, kWb, dout, dh, nph, opt);
  auto d_ba = bias_sums.reduced(kBa, dh, opt), d_bb = bias_sums.reduced(kBb, dout, opt);
  return {d_feat, d_wa, d_ba, d_wb, d_bb, d_tab, d_ns, d_nd, d_ns2, d_nd2};
}

}  // namespace

TORCH_LIBRARY_IMPL(nino_fast, CPU, m) {
  m.impl("edge_mlp_backward", &edge_mlp_backward_entry<edge_mlp_backward_cpu>);
}

}  // namespace nino_fast::cpu
