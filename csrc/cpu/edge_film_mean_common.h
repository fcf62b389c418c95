// Validated inputs of edge_film_mean, shared by its forward (edge_film_mean_kernel.cpp) and
// backward (edge_film_mean_backward_kernel.cpp) CPU kernels.
#pragma once

#include <torch/types.h>

#include <optional>

#include "cpu/fused_common.h"

namespace nino_fast::cpu {

struct EdgeFilmMeanInputs : CsrInputs {
  AffineStage stage;  // weight_a, bias_a, etype, type_table
  int64_t dh;
  at::Tensor ns, nd, wsc, bsc, wsh, bsh, md, ms;
  int64_t d = 0;

  EdgeFilmMeanInputs(const char* op, const at::Tensor& feat_in, const at::Tensor& rowptr_in,
                     const at::Tensor& src_in, const at::Tensor& weight_a, const at::Tensor& bias_a,
                     const std::optional<at::Tensor>& etype,
                     const std::optional<at::Tensor>& type_table, const at::Tensor& node_src_in,
                     const at::Tensor& node_dst_in, const at::Tensor& msg_dst_in,
                     const at::Tensor& msg_src_in, const at::Tensor& weight_scale,
                     const at::Tensor& bias_scale, const at::Tensor& weight_shift,
                     const at::Tensor& bias_shift)
      : CsrInputs(op, feat_in, rowptr_in, src_in),
        stage(op, "weight_a", weight_a, bias_a, etype, type_table, c, e_total),
        dh(stage.d) {
    ns = f32(op, "node_src", node_src_in, 2);
    NINO_CHECK(ns.size(1) == dh, op, ": node_src must have ", dh, " columns, got ",
               shape_str(node_src_in));
    nd = node_table(op, "node_dst", node_dst_in, n, dh);
    wsc = f32(op, "weight_scale", weight_scale, 2);
    NINO_CHECK(wsc.size(1) == dh, op, ": weight_scale must be (D, ", dh, "), got ",
               shape_str(weight_scale));
    d = wsc.size(0);
    bsc = f32(op, "bias_scale", bias_scale, 1);
    wsh = f32(op, "weight_shift", weight_shift, 2);
    bsh = f32(op, "bias_shift", bias_shift, 1);
    NINO_CHECK(bsc.numel() == d && bsh.numel() == d, op,
               ": bias_scale and bias_shift must have D=", d, " entries");
    NINO_CHECK(wsh.size(0) == d && wsh.size(1) == dh, op, ": weight_shift must be (", d, ", ", dh,
               "), got ", shape_str(weight_shift));
    md = node_table(op, "msg_dst", msg_dst_in, n, d);
    ms = f32(op, "msg_src", msg_src_in, 2);
    NINO_CHECK(ms.size(1) == d && ns.size(0) == ms.size(0), op, ": msg_src must be (", ns.size(0),
               ", ", d, "), got ", shape_str(msg_src_in));
    check_src(op, ns.size(0));
  }
};

}  // namespace nino_fast::cpu
