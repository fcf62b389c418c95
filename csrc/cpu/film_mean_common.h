// Validated inputs of film_mean, shared by its forward (film_mean_kernel.cpp) and backward
// (film_mean_backward_kernel.cpp) CPU kernels: the scale half as an affine stage (with its half of
// the type table), the shift half's weight, bias and table half on their own.
#pragma once

#include <torch/types.h>

#include <optional>

#include "cpu/fused_common.h"
#include "utils/op_args.h"

namespace nino_fast::cpu {

struct FilmMeanInputs : CsrInputs {
  at::Tensor w, bias;
  int64_t d;
  at::Tensor nd, ns;
  std::optional<at::Tensor> tab_sc, tab_sh;
  AffineStage scale;
  at::Tensor w_sh, b_sh;

  static std::optional<at::Tensor> half(const char* op, const std::optional<at::Tensor>& table,
                                        int64_t d, int64_t which) {
    if (!table.has_value()) return std::nullopt;
    auto t = f32(op, "type_table", *table, 2);
    NINO_CHECK(t.size(1) == 2 * d, op, ": type_table must be (T, 2*D=", 2 * d, "), got ",
               shape_str(*table));
    return t.narrow(1, which * d, d).contiguous();
  }

  static int64_t half_width(const char* op, const at::Tensor& w, int64_t c) {
    NINO_CHECK(w.size(0) % 2 == 0 && w.size(1) == c, op, ": weight must be (2*D, C) with C=", c,
               ", got ", shape_str(w));
    return w.size(0) / 2;
  }

  static at::Tensor scale_bias(const char* op, const at::Tensor& bias, int64_t d) {
    NINO_CHECK(bias.numel() == 2 * d, op, ": bias must have 2*D=", 2 * d, " entries, got ",
               bias.numel());
    return bias.narrow(0, 0, d).contiguous();
  }

  FilmMeanInputs(const char* op, const FilmMeanArgs& a)
      : CsrInputs(op, a.feat, a.rowptr, a.src, a.feat_index),
        w(f32(op, "weight", a.weight, 2)),
        bias(f32(op, "bias", a.bias, 1)),
        d(half_width(op, w, c)),
        nd(node_table(op, "node_dst", a.node_dst, n, d)),
        ns(f32(op, "node_src", a.node_src, 2)),
        tab_sc(half(op, a.type_table, d, 0)),
        tab_sh(half(op, a.type_table, d, 1)),
        scale(op, "weight", w.narrow(0, 0, d).contiguous(), scale_bias(op, bias, d), a.etype,
              tab_sc, c, e_total),
        w_sh(w.narrow(0, d, d).contiguous()),
        b_sh(bias.narrow(0, d, d).contiguous()) {
    NINO_CHECK(nd.size(0) == n, op, ": node_dst must have N=", n, " rows, got ", nd.size(0));
    NINO_CHECK(ns.size(1) == d, op, ": node_src must have D=", d, " columns, got ",
               shape_str(a.node_src));
    check_src(op, ns.size(0));
  }
};

}  // namespace nino_fast::cpu
