// Validated inputs of edge_film_mean, shared by its forward (edge_film_mean_kernel.cpp) and
// backward (edge_film_mean_backward_kernel.cpp) CPU kernels.
#pragma once

#include <torch/types.h>

#include <optional>

#include "cpu/fused_common.h"
#include "utils/op_args.h"

namespace nino_fast::cpu {

struct EdgeFilmMeanInputs : CsrInputs {
  AffineStage stage;  // weight_a, bias_a, etype, type_table
  int64_t dh;
  at::Tensor ns, nd, wsc, bsc, wsh, bsh, md, ms;
  int64_t d = 0;

  EdgeFilmMeanInputs(const char* op, const EdgeFilmMeanArgs& a)
      : CsrInputs(op, a.feat, a.rowptr, a.src, a.feat_index),
        stage(op, "weight_a", a.weight_a, a.bias_a, a.etype, a.type_table, c, e_total),
        dh(stage.d) {
    ns = f32(op, "node_src", a.node_src, 2);
    NINO_CHECK(ns.size(1) == dh, op, ": node_src must have ", dh, " columns, got ",
               shape_str(a.node_src));
    nd = node_table(op, "node_dst", a.node_dst, n, dh);
    wsc = f32(op, "weight_scale", a.weight_scale, 2);
    NINO_CHECK(wsc.size(1) == dh, op, ": weight_scale must be (D, ", dh, "), got ",
               shape_str(a.weight_scale));
    d = wsc.size(0);
    bsc = f32(op, "bias_scale", a.bias_scale, 1);
    wsh = f32(op, "weight_shift", a.weight_shift, 2);
    bsh = f32(op, "bias_shift", a.bias_shift, 1);
    NINO_CHECK(bsc.numel() == d && bsh.numel() == d, op,
               ": bias_scale and bias_shift must have D=", d, " entries");
    NINO_CHECK(wsh.size(0) == d && wsh.size(1) == dh, op, ": weight_shift must be (", d, ", ", dh,
               "), got ", shape_str(a.weight_shift));
    md = node_table(op, "msg_dst", a.msg_dst, n, d);
    ms = f32(op, "msg_src", a.msg_src, 2);
    NINO_CHECK(ms.size(1) == d && ns.size(0) == ms.size(0), op, ": msg_src must be (", ns.size(0),
               ", ", d, "), got ", shape_str(a.msg_src));
    check_src(op, ns.size(0));
  }
};

}  // namespace nino_fast::cpu
