// Validated inputs of edge_mlp, shared by its forward (edge_mlp_kernel.cpp) and backward
// (edge_mlp_backward_kernel.cpp) CPU kernels.
#pragma once

#include <torch/types.h>

#include <algorithm>
#include <optional>

#include "cpu/fused_common.h"
#include "utils/op_args.h"

namespace nino_fast::cpu {

struct EdgeMlpInputs {
  at::Tensor feat;
  int64_t e_total, c;
  at::Tensor src, dst;
  AffineStage stage;  // weight_a, bias_a, etype, type_table
  int64_t dh;
  at::Tensor wb, bb, ns, nd, ns2, nd2;
  int64_t dout = 0;           // W_b's rows
  at::Tensor wc, bc, wd, bd;  // the optional readout layers (undefined when absent)
  int64_t dc = 0, dd = 0;     // their widths

  EdgeMlpInputs(const char* op, const EdgeMlpArgs& a)
      : feat(f32(op, "feat", a.feat, 2)),
        e_total(feat.size(0)),
        c(feat.size(1)),
        src(idx32(op, "src", a.src, e_total)),
        dst(idx32(op, "dst", a.dst, e_total)),
        stage(op, "weight_a", a.weight_a, a.bias_a, a.etype, a.type_table, c, e_total),
        dh(stage.d) {
    const auto &node_src = a.node_src, &node_dst = a.node_dst;
    const auto &node_src2 = a.node_src2, &node_dst2 = a.node_dst2;
    wb = f32(op, "weight_b", a.weight_b, 2);
    NINO_CHECK(wb.size(1) == dh, op, ": weight_b must be (D_out, ", dh, "), got ",
               shape_str(a.weight_b));
    dout = wb.size(0);
    bb = f32(op, "bias_b", a.bias_b, 1);
    NINO_CHECK(bb.numel() == dout, op, ": bias_b must have ", dout, " entries, got ", bb.numel());
    NINO_CHECK(node_src.has_value() == node_dst.has_value() &&
                   node_src2.has_value() == node_dst2.has_value(),
               op, ": node_src/node_dst (and node_src2/node_dst2) go together");
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
    NINO_CHECK(a.weight_c.has_value() == a.bias_c.has_value() &&
                   a.weight_d.has_value() == a.bias_d.has_value(),
               op, ": weight_c/bias_c (and weight_d/bias_d) go together");
    NINO_CHECK(a.weight_c.has_value() || !a.weight_d.has_value(), op,
               ": weight_d needs weight_c (the layers come in order)");
    // layer (w, b) reading `width` features: w must be (rows, width), b (rows,)
    auto layer = [&](const char* wn, const char* bn, const OptTensor& w_in, const OptTensor& b_in,
                     int64_t width, at::Tensor& w, at::Tensor& b) -> int64_t {
      if (!w_in.has_value()) return 0;
      w = f32(op, wn, *w_in, 2);
      NINO_CHECK(w.size(1) == width, op, ": ", wn, " must have ", width, " columns, got ",
                 shape_str(*w_in));
      b = f32(op, bn, *b_in, 1);
      NINO_CHECK(b.numel() == w.size(0), op, ": ", bn, " must have ", w.size(0), " entries, got ",
                 b.numel());
      return w.size(0);
    };
    dc = layer("weight_c", "bias_c", a.weight_c, a.bias_c, dout, wc, bc);
    dd = layer("weight_d", "bias_d", a.weight_d, a.bias_d, dc, wd, bd);
    if (rows >= 0 && e_total > 0) {
      const int64_t lo = std::min(src.min().item<int32_t>(), dst.min().item<int32_t>());
      const int64_t hi = std::max(src.max().item<int32_t>(), dst.max().item<int32_t>());
      NINO_CHECK(lo >= 0 && hi < rows, op, ": src/dst values must index the node tables' ", rows,
                 " rows, got [", lo, ", ", hi, "]");
    }
  }

  bool has_readout() const { return wc.defined(); }
  // the output's width: the last layer's rows
  int64_t out_width() const { return wd.defined() ? dd : wc.defined() ? dc : dout; }

  static const float* ptr(const at::Tensor& t) {
    return t.defined() ? t.data_ptr<float>() : nullptr;
  }
};

}  // namespace nino_fast::cpu
