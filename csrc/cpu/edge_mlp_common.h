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
  int64_t dout = 0;

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
    if (rows >= 0 && e_total > 0) {
      const int64_t lo = std::min(src.min().item<int32_t>(), dst.min().item<int32_t>());
      const int64_t hi = std::max(src.max().item<int32_t>(), dst.max().item<int32_t>());
      NINO_CHECK(lo >= 0 && hi < rows, op, ": src/dst values must index the node tables' ", rows,
                 " rows, got [", lo, ", ", hi, "]");
    }
  }

  static const float* ptr(const at::Tensor& t) {
    return t.defined() ? t.data_ptr<float>() : nullptr;
  }
};

}  // namespace nino_fast::cpu
