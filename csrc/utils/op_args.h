// The arguments of each fused op family, named once in C++ (the schema in csrc/nino_fast.cpp is the
// op's public contract; this is how its arguments travel below it). Each family's argument list is
// one macro, from which come:
//   - the struct <Family>Args: the op's arguments by name (references to the caller's tensors),
//   - <Family>BackwardArgs: grad_out, the forward's <Family>Args and need_feat (every backward
//     schema is the forward's arguments between grad_out and need_feat),
//   - the entry adapters <family>_entry<Impl> and <family>_backward_entry<Impl>: functions with
//     the schema's signature that pack the arguments and call Impl(args). A backend registers
//     `m.impl("film_mean", &film_mean_entry<film_mean_cpu>)`, and its kernel takes one struct.
// The dispatcher needs a function whose parameters match the schema; the macro lets that parameter
// list, the struct's members and the packing be written from one list, so adding an argument is one
// line here (and one in the schema).
#pragma once

#include <torch/types.h>

#include <optional>
#include <vector>

namespace nino_fast {

using OptTensor = std::optional<at::Tensor>;

// The macro lists are laid out by hand: clang-format does not settle on one layout for them.
// clang-format off
// The argument lists: FIRST(type, name) for the first argument, NEXT(type, name) for the others,
// so that comma-separated expansions (parameters, initializers) need no trailing-comma tricks.
#define NINO_FILM_MEAN_ARGS(FIRST, NEXT)                                                           \
  FIRST(const at::Tensor&, feat)                                                                   \
  NEXT(const at::Tensor&, rowptr)                                                                  \
  NEXT(const at::Tensor&, src) NEXT(const at::Tensor&, node_dst) NEXT(const at::Tensor&, node_src) \
      NEXT(const at::Tensor&, weight) NEXT(const at::Tensor&, bias) NEXT(const OptTensor&, etype)  \
          NEXT(const OptTensor&, type_table) NEXT(const OptTensor&, feat_index)

#define NINO_EDGE_MLP_ARGS(FIRST, NEXT)                                                          \
  FIRST(const at::Tensor&, feat)                                                                 \
  NEXT(const at::Tensor&, src)                                                                   \
  NEXT(const at::Tensor&, dst) NEXT(const at::Tensor&, weight_a) NEXT(const at::Tensor&, bias_a) \
      NEXT(const at::Tensor&, weight_b) NEXT(const at::Tensor&, bias_b)                          \
          NEXT(const OptTensor&, etype) NEXT(const OptTensor&, type_table)                       \
              NEXT(const OptTensor&, node_src) NEXT(const OptTensor&, node_dst)                  \
                  NEXT(const OptTensor&, node_src2) NEXT(const OptTensor&, node_dst2)            \
                      NEXT(bool, act_out) NEXT(const OptTensor&, weight_c)                      \
                          NEXT(const OptTensor&, bias_c) NEXT(const OptTensor&, weight_d)        \
                              NEXT(const OptTensor&, bias_d)

#define NINO_EDGE_FILM_MEAN_ARGS(FIRST, NEXT)                                                    \
  FIRST(const at::Tensor&, feat)                                                                 \
  NEXT(const at::Tensor&, rowptr)                                                                \
  NEXT(const at::Tensor&, src) NEXT(const at::Tensor&, weight_a) NEXT(const at::Tensor&, bias_a) \
      NEXT(const OptTensor&, etype) NEXT(const OptTensor&, type_table)                           \
          NEXT(const at::Tensor&, node_src) NEXT(const at::Tensor&, node_dst)                    \
              NEXT(const at::Tensor&, msg_dst) NEXT(const at::Tensor&, msg_src)                  \
                  NEXT(const at::Tensor&, weight_scale) NEXT(const at::Tensor&, bias_scale)      \
                      NEXT(const at::Tensor&, weight_shift) NEXT(const at::Tensor&, bias_shift)  \
                          NEXT(const OptTensor&, feat_index)

#define NINO_ARG_MEMBER(type, name) type name;
#define NINO_ARG_PARAM(type, name) type name
#define NINO_ARG_PARAM_NEXT(type, name) , type name
#define NINO_ARG_NAME(type, name) name
#define NINO_ARG_NAME_NEXT(type, name) , name

// <Family>Args, <Family>BackwardArgs and the two entry adapters of one op family.
#define NINO_OP_FAMILY(Family, family, LIST)                                                   \
  struct Family##Args {                                                                        \
    LIST(NINO_ARG_MEMBER, NINO_ARG_MEMBER)                                                     \
  };                                                                                           \
  struct Family##BackwardArgs {                                                                \
    const at::Tensor& grad_out;                                                                \
    Family##Args fwd;                                                                          \
    bool need_feat;                                                                            \
  };                                                                                           \
  template <at::Tensor (*Impl)(const Family##Args&)>                                           \
  at::Tensor family##_entry(LIST(NINO_ARG_PARAM, NINO_ARG_PARAM_NEXT)) {                       \
    return Impl(Family##Args{LIST(NINO_ARG_NAME, NINO_ARG_NAME_NEXT)});                        \
  }                                                                                            \
  template <std::vector<at::Tensor> (*Impl)(const Family##BackwardArgs&)>                      \
  std::vector<at::Tensor> family##_backward_entry(                                             \
      const at::Tensor& grad_out, LIST(NINO_ARG_PARAM, NINO_ARG_PARAM_NEXT), bool need_feat) { \
    return Impl(                                                                               \
        Family##BackwardArgs{grad_out, {LIST(NINO_ARG_NAME, NINO_ARG_NAME_NEXT)}, need_feat}); \
  }

NINO_OP_FAMILY(FilmMean, film_mean, NINO_FILM_MEAN_ARGS)
NINO_OP_FAMILY(EdgeMlp, edge_mlp, NINO_EDGE_MLP_ARGS)
NINO_OP_FAMILY(EdgeFilmMean, edge_film_mean, NINO_EDGE_FILM_MEAN_ARGS)

}  // namespace nino_fast
// clang-format on
